package redisbroker

import "github.com/redis/go-redis/v9"

// The broker's Redis operations that must be atomic are Lua scripts:
// Redis runs each alone, so a topic's numbering, its history and its
// pub/sub fan-out happen in one order on every node. Each script touches
// the keys of one name only (a topic, a user, or the set of nodes), which
// share one hash tag and so one slot of a cluster; what spans several
// names takes several calls, ordered so that a failure midway leaves
// nothing that the next call, or the node's next session, does not mend.
//
// Keys, under the prefix P (T a topic, U a user, N a node ID, which is
// base64url and so never holds a colon; {t} the name's hash tag, see
// Broker.names):
//
//	P:{t}:h:T   hash    the topic's epoch (e), last seq (s), and the run_id of the server that numbered it (r)
//	P:{t}:x:T   stream  the topic's history; entry IDs are <seq>-0, fields d (data), t (ms)
//	P:{t}:t:T   channel the topic's messages ("m<epoch>:<seq>:<data>"), presence ("p<json>") and snapshot markers ("s<marker>"), with SPUBLISH
//	P:{t}:p:T   hash    presence on the topic: field N:U, value the conns (JSON)
//	P:{t}:n:N   channel node N's direct messages ("u<len>:<user><data>") and relayed commands ("c<cmd>")
//	P:{t}:o:U   stream  the user's offline messages (auto IDs: their ms is their age)
//	P:{t}:u:U   set     the nodes where the user has a conn
//	P:{t}:s:U   string  when the user's last conn on a node ended (ms), for 30 days
//	P:{t}:nu:N  set     the users node N has recorded, for when it dies
//	P:{t}:np:N  set     the presences node N has recorded ("<len(T)>:<T><U>")
//	P:nodes     zset    every node, scored by when it expires (ms, Redis clock)
//	P:{t}:d:K   string  a client request's id (K: user, NUL, id), for 2 minutes:
//	                    a repeat on any node is dropped (Broker.Once)

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
// promoted by Sentinel or by a cluster's failover, may have lost the last
// writes, and its seqs would repeat ones clients already have. Such a
// topic starts a new epoch, and the hub tells its clients to resync.
// The caller passes the run_id of the server the script runs on
// (Broker.topicServer): a script reading INFO itself would halve the
// rate of publications.

// sameRun is the first lines of the scripts that number messages. Their
// last ARGV is this node's own channel, or "" to skip the check: the script
// fails with a STALERUN error when no one is subscribed to it there, which
// means the server is not the one the broker's session subscribed on (on
// one Redis or under Sentinel). Why: the broker reads the server's run_id
// once a session, and between a restart (or a failover) and the moment its
// subscription's connection reports the loss, a call that go-redis retries
// on a new connection would reach the new server with the old run_id, and
// number on in the old epoch on a server that may have lost writes. In
// tests that restart Redis the subscription reported the loss up to 40 ms
// after the kill, and calls made meanwhile did just that. Subscriptions
// are state a Redis server never saves nor replicates, and the check is a
// dictionary lookup.
// In a cluster each master would need a subscription of the node's own: not
// checked there (guard ""), where the run_ids are read per master.
const sameRun = `
local guard = ARGV[#ARGV]
if guard ~= '' and redis.call('PUBSUB', 'SHARDNUMSUB', guard)[2] == 0 then
  return redis.error_reply('STALERUN not the server of the broker\'s session')
end
`

// staleRun is the prefix of sameRun's error.
const staleRun = "STALERUN"

// publishScript: KEYS meta, stream; ARGV data, candidate epoch, history
// length, key ttl ms, channel, run_id, guard (sameRun). Returns {epoch,
// seq}.
var publishScript = redis.NewScript(nowMs + sameRun + `
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
redis.call('SPUBLISH', ARGV[5], 'm' .. e .. ':' .. id .. ':' .. ARGV[1])
return {e, s}
`)

// sinceScript: KEYS meta, stream; ARGV epoch, seq, candidate epoch, key
// ttl ms, max age ms (0: none), run_id, guard (sameRun). Returns {epoch,
// last seq, ok,
// data...}. A topic without a record (or with one from another run of the
// server) gets one, so that the epoch returned is the one its next
// publication will have.
var sinceScript = redis.NewScript(nowMs + sameRun + `
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

// keepScript: KEYS offline stream, user's nodes; ARGV data, offline
// length, ttl ms, then the nodes the caller found ("*": keep whatever
// they are). Keeps data offline unless the user now has a node that the
// caller did not find (it connected meanwhile: -2, try again); -1 when
// nothing is kept offline.
var keepScript = redis.NewScript(`
if tonumber(ARGV[2]) <= 0 then
  return -1
end
if ARGV[4] ~= '*' then
  local seen = {}
  for i = 4, #ARGV do seen[ARGV[i]] = true end
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if not seen[id] then return -2 end
  end
end
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '*', 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
`)

// connectScript: KEYS user's nodes, user's offline stream; ARGV node, max
// age ms (0: none). Returns the offline messages, oldest first, and
// forgets them.
var connectScript = redis.NewScript(nowMs + `
redis.call('SADD', KEYS[1], ARGV[1])
local oldest = 0
if tonumber(ARGV[2]) > 0 then
  oldest = now_ms() - tonumber(ARGV[2])
end
local out = {}
for _, en in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
  local ms = tonumber(string.match(en[1], '^(%d+)'))
  if ms >= oldest then
    local f = en[2]
    for i = 1, #f, 2 do
      if f[i] == 'd' then out[#out + 1] = f[i + 1] end
    end
  end
end
redis.call('DEL', KEYS[2])
return out
`)

// disconnectScript: KEYS user's nodes, user's last seen; ARGV node, ttl
// ms.
var disconnectScript = redis.NewScript(nowMs + `
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], now_ms(), 'PX', ARGV[2])
return 0
`)

// joinScript: KEYS topic's presence; ARGV field, conns, channel, event.
var joinScript = redis.NewScript(`
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SPUBLISH', ARGV[3], ARGV[4])
return 0
`)

// leaveScript: KEYS topic's presence; ARGV field, channel, event.
var leaveScript = redis.NewScript(`
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SPUBLISH', ARGV[2], ARGV[3])
return 0
`)

// heartbeatScript: KEYS nodes; ARGV node, ttl ms. Renews the node and
// returns up to 16 nodes that expired.
var heartbeatScript = redis.NewScript(nowMs + `
local now = now_ms()
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 16)
`)

// expiredScript: KEYS nodes; ARGV node, force. Returns 1 if the node is
// to be reaped: it expired, or force is 1 (a node leaving).
var expiredScript = redis.NewScript(nowMs + `
local exp = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[2] == '1' or (exp and tonumber(exp) < now_ms()) then
  return 1
end
return 0
`)

// forgetNodeScript: KEYS nodes; ARGV node, force. Removes the node from
// the nodes once it is reaped, unless it renewed its heartbeat meanwhile
// (force 0); returns 1 if it removed it.
var forgetNodeScript = redis.NewScript(nowMs + `
local exp = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not exp or (ARGV[2] ~= '1' and tonumber(exp) >= now_ms()) then
  return 0
end
return redis.call('ZREM', KEYS[1], ARGV[1])
`)

// liveScript: KEYS nodes. Returns the nodes that have not expired.
var liveScript = redis.NewScript(nowMs + `
return redis.call('ZRANGEBYSCORE', KEYS[1], now_ms(), '+inf')
`)

// membersScript: KEYS topic's presence; ARGV topic's channel, marker ("":
// none). Returns field, conns pairs, and publishes the marker, so that
// subscribers know where in the channel's stream the snapshot was read.
// The caller drops the members of nodes that are not live.
var membersScript = redis.NewScript(`
if ARGV[2] ~= '' then
  redis.call('SPUBLISH', ARGV[1], 's' .. ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
`)
