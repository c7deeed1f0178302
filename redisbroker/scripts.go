package redisbroker

import "github.com/redis/go-redis/v9"

// The broker's Redis operations that must be atomic are Lua scripts:
// Redis runs each alone, so a topic's numbering, its history and its
// pub/sub fan-out happen in one order on every node.
//
// Keys, under the prefix P (T a topic, U a user, N a node ID, which is
// base64url and so never holds a colon):
//
//	P:h:T   hash   the topic's epoch (e) and last seq (s)
//	P:x:T   stream the topic's history; entry IDs are <seq>-0, fields d (data), t (ms)
//	P:t:T   channel the topic's messages ("m<epoch>:<seq>:<data>") and presence ("p<json>")
//	P:n:N   channel direct messages for node N's users ("u<len>:<user><data>")
//	P:p:T   hash   presence on the topic: field N:U, value the conns (JSON)
//	P:o:U   stream the user's offline messages (auto IDs: their ms is their age)
//	P:u:U   set    the nodes where the user has a conn
//	P:nodes zset   every node, scored by when it expires (ms, Redis clock)
//	P:nu:N  set    the users node N has recorded, for when it dies
//	P:np:N  set    the presences node N has recorded ("<len(T)>:<T><U>")
//	P:d:K   string a client request's id (K: user, NUL, id), for 2 minutes:
//	               a repeat on any node is dropped (Broker.Once)

// nowMs is the Redis clock in ms, so that nodes with skewed clocks agree
// on expiries.
const nowMs = `
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
`

// An epoch belongs to one run of the Redis server (its run_id, in the
// topic's hash as r): a server restarted from a snapshot, or a replica
// promoted by Sentinel, may have lost the last writes, and its seqs would
// repeat ones clients already have. Such a topic starts a new epoch.

// publishScript: KEYS meta, stream; ARGV data, candidate epoch, history
// length, key ttl ms, channel, run_id. Returns {epoch, seq}.
var publishScript = redis.NewScript(nowMs + `
local e = redis.call('HGET', KEYS[1], 'e')
local s
if e and redis.call('HGET', KEYS[1], 'r') == ARGV[6] then
  s = redis.call('HINCRBY', KEYS[1], 's', 1)
end
if not s or s > 9007199254740991 then
  -- a new topic, one whose history was lost or is spent, or one from
  -- another run of the server: a new epoch
  e = ARGV[2]
  s = 1
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 's', 1, 'r', ARGV[6])
end
local id = string.format('%d', s)
if tonumber(ARGV[3]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id .. '-0', 'd', ARGV[1], 't', now_ms())
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[5], 'm' .. e .. ':' .. id .. ':' .. ARGV[1])
return {e, s}
`)

// sinceScript: KEYS meta, stream; ARGV epoch, seq, candidate epoch, key
// ttl ms, max age ms (0: none), run_id. Returns {epoch, last seq, ok,
// data...}. A topic without a record (or with one from another run of the
// server) gets one, so that the epoch returned is the one its next
// publication will have.
var sinceScript = redis.NewScript(nowMs + `
local e = redis.call('HGET', KEYS[1], 'e')
if not e or redis.call('HGET', KEYS[1], 'r') ~= ARGV[6] then
  e = ARGV[3]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 's', 0, 'r', ARGV[6])
end
-- A topic read is a topic in use: its epoch lives on.
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local last = tonumber(redis.call('HGET', KEYS[1], 's'))
local since = tonumber(ARGV[2])
if ARGV[1] ~= e or since > last then
  return {e, last, 0}
end
if since == last then
  return {e, last, 1}
end
local entries = redis.call('XRANGE', KEYS[2], string.format('%d', since + 1), '+')
if #entries ~= last - since then
  return {e, last, 0}
end
local oldest = 0
if tonumber(ARGV[5]) > 0 then
  oldest = now_ms() - tonumber(ARGV[5])
end
local out = {e, last, 1}
for _, en in ipairs(entries) do
  local f = en[2]
  local data, t
  for i = 1, #f, 2 do
    if f[i] == 'd' then data = f[i + 1] elseif f[i] == 't' then t = tonumber(f[i + 1]) end
  end
  if t and t < oldest then
    return {e, last, 0}
  end
  out[#out + 1] = data
end
return out
`)

// sendScript: KEYS user's nodes, nodes, user's offline stream; ARGV data
// payload for nodes, data, offline length, offline ttl ms, node channel
// prefix. Returns the number of nodes that took it, 0 when it was kept
// offline, -1 when it could not be kept.
var sendScript = redis.NewScript(nowMs + `
local now = now_ms()
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local exp = redis.call('ZSCORE', KEYS[2], id)
  if exp and tonumber(exp) >= now then
    n = n + redis.call('PUBLISH', ARGV[5] .. id, ARGV[1])
  else
    redis.call('SREM', KEYS[1], id)
  end
end
if n > 0 then
  return n
end
if tonumber(ARGV[3]) <= 0 then
  return -1
end
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[3], '*', 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return 0
`)

// keepScript: KEYS offline stream; ARGV data, offline length, ttl ms.
var keepScript = redis.NewScript(`
if tonumber(ARGV[2]) <= 0 then
  return -1
end
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '*', 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
`)

// connectScript: KEYS user's nodes, node's users, user's offline stream;
// ARGV node, user, max age ms (0: none). Returns the offline messages,
// oldest first, and forgets them.
var connectScript = redis.NewScript(nowMs + `
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
local oldest = 0
if tonumber(ARGV[3]) > 0 then
  oldest = now_ms() - tonumber(ARGV[3])
end
local out = {}
for _, en in ipairs(redis.call('XRANGE', KEYS[3], '-', '+')) do
  local ms = tonumber(string.match(en[1], '^(%d+)'))
  if ms >= oldest then
    local f = en[2]
    for i = 1, #f, 2 do
      if f[i] == 'd' then out[#out + 1] = f[i + 1] end
    end
  end
end
redis.call('DEL', KEYS[3])
return out
`)

// disconnectScript: KEYS user's nodes, node's users; ARGV node, user.
var disconnectScript = redis.NewScript(`
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 0
`)

// joinScript: KEYS topic's presence, node's presences; ARGV field, conns,
// record, channel, event.
var joinScript = redis.NewScript(`
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 0
`)

// leaveScript: as joinScript, without conns.
var leaveScript = redis.NewScript(`
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 0
`)

// heartbeatScript: KEYS nodes; ARGV node, ttl ms. Renews the node and
// returns up to 16 nodes that expired.
var heartbeatScript = redis.NewScript(nowMs + `
local now = now_ms()
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 16)
`)

// reapScript: KEYS nodes, node's users, node's presences; ARGV node,
// prefix, force (1: even if not expired, for a node leaving). Removes a
// dead node and everything it recorded, announcing its users' leaves;
// returns 0 when another node did it first.
var reapScript = redis.NewScript(nowMs + `
local exp = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[3] ~= '1' and (not exp or tonumber(exp) >= now_ms()) then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
local p = ARGV[2]
for _, u in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('SREM', p .. ':u:' .. u, ARGV[1])
end
redis.call('DEL', KEYS[2])
for _, m in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local i = string.find(m, ':', 1, true)
  local n = tonumber(string.sub(m, 1, i - 1))
  local topic = string.sub(m, i + 1, i + n)
  local user = string.sub(m, i + n + 1)
  redis.call('HDEL', p .. ':p:' .. topic, ARGV[1] .. ':' .. user)
  redis.call('PUBLISH', p .. ':t:' .. topic, 'p' .. cjson.encode({n = ARGV[1], u = user}))
end
redis.call('DEL', KEYS[3])
return 1
`)

// membersScript: KEYS topic's presence, nodes; ARGV topic's channel,
// marker ("": none). Returns field, conns pairs of the live nodes, and
// publishes the marker, so that subscribers know where in the channel's
// stream the snapshot was read. Each node's liveness is looked up once,
// not once per member: a room of 20,000 on a few nodes is read in a
// third of the time.
var membersScript = redis.NewScript(nowMs + `
local now = now_ms()
if ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
end
local all = redis.call('HGETALL', KEYS[1])
local out = {}
local live = {}
for i = 1, #all, 2 do
  local node = string.match(all[i], '^([^:]*):')
  if live[node] == nil then
    local exp = redis.call('ZSCORE', KEYS[2], node)
    live[node] = exp ~= false and tonumber(exp) >= now
  end
  if live[node] then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
`)

// onlineScript: KEYS user's nodes, nodes. Returns 1 if a live node has
// the user.
var onlineScript = redis.NewScript(nowMs + `
local now = now_ms()
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local exp = redis.call('ZSCORE', KEYS[2], id)
  if exp and tonumber(exp) >= now then
    return 1
  end
end
return 0
`)
