package redisbroker

import (
	"context"
	"fmt"

	"github.com/redis/go-redis/v9"
	"github.com/tether-ws/tether/adapter"
)

// Inbox returns the users' inboxes kept in Redis, for
// tether.WithInbox: every node of the cluster shares them, so a user
// gets what was not acknowledged whichever node they come back to. Its
// bounds are set by [WithInbox]. Each user's inbox is a stream and a
// hash in the user's slot; like a topic's history, it starts a new epoch
// when the server that holds it is another run (a restart, a failover),
// since it may have lost what was acknowledged to the application.
func (b *Broker) Inbox() adapter.Inbox { return inbox{b} }

type inbox struct{ b *Broker }

func (ib inbox) Append(ctx context.Context, userID string, data []byte) (adapter.Position, error) {
	b := ib.b
	if b.cfg.inboxLen <= 0 {
		return adapter.Position{}, fmt.Errorf("%w: it keeps no messages", adapter.ErrInboxFull)
	}
	ctx, done, err := b.call(ctx)
	if err != nil {
		return adapter.Position{}, err
	}
	defer done()
	u := b.names(userID)
	srv, run, guard, err := b.topicServer(ctx, u.key("ie"))
	if err != nil {
		return adapter.Position{}, err
	}
	res, err := inboxAppendScript.Run(ctx, srv, []string{u.key("ie"), u.key("i")},
		data, newEpoch(), b.cfg.inboxLen, b.ttl(b.cfg.inboxAge), run, b.cfg.inboxAge.Milliseconds(), guard).Slice()
	if err != nil {
		b.topicFailed(err)
		return adapter.Position{}, err
	}
	pos, err := position(res)
	if err == nil && pos.Seq == 0 {
		return adapter.Position{}, fmt.Errorf("%w: %d unacknowledged messages for the user", adapter.ErrInboxFull, b.cfg.inboxLen)
	}
	return pos, err
}

func (ib inbox) Pending(ctx context.Context, userID string) (string, []adapter.InboxEntry, error) {
	b := ib.b
	ctx, done, err := b.call(ctx)
	if err != nil {
		return "", nil, err
	}
	defer done()
	u := b.names(userID)
	srv, run, guard, err := b.topicServer(ctx, u.key("ie"))
	if err != nil {
		return "", nil, err
	}
	res, err := inboxPendingScript.Run(ctx, srv, []string{u.key("ie"), u.key("i")}, run, b.cfg.inboxAge.Milliseconds(), guard).Slice()
	if err != nil {
		b.topicFailed(err)
		return "", nil, err
	}
	if len(res) == 0 {
		return "", nil, nil
	}
	epoch, _ := res[0].(string)
	var out []adapter.InboxEntry
	for i := 1; i+1 < len(res); i += 2 {
		seq, _ := res[i].(int64)
		data, _ := res[i+1].(string)
		out = append(out, adapter.InboxEntry{Seq: uint64(seq), Data: []byte(data)})
	}
	return epoch, out, nil
}

func (ib inbox) Ack(ctx context.Context, userID string, pos adapter.Position) error {
	b := ib.b
	ctx, done, err := b.call(ctx)
	if err != nil {
		return err
	}
	defer done()
	u := b.names(userID)
	return inboxAckScript.Run(ctx, b.rdb, []string{u.key("ie"), u.key("i")}, pos.Epoch, min(pos.Seq, 1<<53-1)).Err()
}

// inboxAppendScript: KEYS meta (e epoch, s last seq, r run_id), stream
// (IDs <seq>-0, fields d data, t ms); ARGV data, candidate epoch, max
// messages, key ttl ms, run_id, max age ms (0: none), guard (sameRun).
// Returns {epoch,
// seq}, seq 0 when the inbox is full.
var inboxAppendScript = redis.NewScript(nowMs + sameRun + `
local e = redis.call('HGET', KEYS[1], 'e')
if not e or redis.call('HGET', KEYS[1], 'r') ~= ARGV[5] then
  e = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 's', 0, 'r', ARGV[5])
end
local now = now_ms()
if tonumber(ARGV[6]) > 0 then
  for _, en in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 64)) do
    local t
    for i = 1, #en[2], 2 do if en[2][i] == 't' then t = tonumber(en[2][i + 1]) end end
    if t and t < now - tonumber(ARGV[6]) then
      redis.call('XDEL', KEYS[2], en[1])
    else
      break
    end
  end
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then
  return {e, 0}
end
local s = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('XADD', KEYS[2], string.format('%d', s) .. '-0', 'd', ARGV[1], 't', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {e, s}
`)

// inboxPendingScript: KEYS meta, stream; ARGV run_id, max age ms, guard
// (sameRun).
// Returns {} when the user has none, else {epoch, seq, data, seq, data,
// ...}, oldest first, without the expired.
var inboxPendingScript = redis.NewScript(nowMs + sameRun + `
local e = redis.call('HGET', KEYS[1], 'e')
if not e or redis.call('HGET', KEYS[1], 'r') ~= ARGV[1] then
  return {}
end
local oldest = 0
if tonumber(ARGV[2]) > 0 then
  oldest = now_ms() - tonumber(ARGV[2])
end
local out = {e}
for _, en in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
  local d, t
  for i = 1, #en[2], 2 do
    if en[2][i] == 'd' then d = en[2][i + 1] elseif en[2][i] == 't' then t = tonumber(en[2][i + 1]) end
  end
  if d and (not t or t >= oldest) then
    out[#out + 1] = tonumber(string.match(en[1], '^(%d+)'))
    out[#out + 1] = d
  end
end
if #out == 1 then
  return {}
end
return out
`)

// inboxAckScript: KEYS meta, stream; ARGV epoch, seq. Drops the messages
// up to seq when epoch is the inbox's.
var inboxAckScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'e') ~= ARGV[1] then
  return 0
end
redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', tonumber(ARGV[2]) + 1) .. '-0')
return 1
`)
