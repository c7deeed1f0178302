package diskstore

import (
	"bytes"
	"context"
	"fmt"
	"time"

	"github.com/tether-ws/tether/adapter"
	bolt "go.etcd.io/bbolt"
)

// inboxMsgOverhead is what a message counts against the total bound
// beyond its data, as in adapter.NewMemoryInbox.
const inboxMsgOverhead = 64

// Defaults of WithInbox.
const (
	defaultInboxLen   = 1000
	defaultInboxAge   = 7 * 24 * time.Hour
	defaultInboxTotal = 64 << 20
)

// WithInbox bounds the inbox ([Store.Inbox]) as [adapter.NewMemoryInbox]
// does: per user, at most messages unacknowledged messages, each for at
// most maxAge, and at most totalBytes over all users, each message
// counting its length plus 64 bytes. A message past a bound is refused
// with [adapter.ErrInboxFull], never pushing out another. The default is
// 1,000 messages per user for 7 days, 64 MiB in all. With messages or
// totalBytes <= 0 it keeps nothing; with maxAge <= 0 messages do not
// expire. Before it refuses a message for totalBytes, the inbox drops up
// to 4,096 expired messages (the memory inbox drops them all), as the
// offline store does.
func WithInbox(messages int, maxAge time.Duration, totalBytes int) Option {
	return func(c *config) { c.inMessages, c.inAge, c.inTotal = messages, max(maxAge, 0), totalBytes }
}

// Inbox returns the store's [adapter.Inbox]: each user's direct messages
// until a client of the user acknowledges them, on disk when Append
// returns, in an epoch per user that a restart keeps (see [WithInbox] for
// the bounds).
func (s *Store) Inbox() adapter.Inbox { return s.ib }

// inbox is the store's adapter.Inbox.
type inbox struct{ s *Store }

func (ib *inbox) expired(at, now int64) bool {
	return ib.s.cfg.inAge > 0 && now-at > int64(ib.s.cfg.inAge)
}

func (ib *inbox) Append(ctx context.Context, userID string, data []byte) (adapter.Position, error) {
	cfg := &ib.s.cfg
	if cfg.inMessages <= 0 || cfg.inTotal <= 0 {
		return adapter.Position{}, fmt.Errorf("%w: it keeps no messages", adapter.ErrInboxFull)
	}
	if len(data)+inboxMsgOverhead > cfg.inTotal {
		return adapter.Position{}, fmt.Errorf("%w: message of %d bytes over the total limit of %d", adapter.ErrInboxFull, len(data), cfg.inTotal)
	}
	var (
		pos     adapter.Position
		refused error
	)
	err := ib.s.update(ctx, func(tx *bolt.Tx) error {
		var err error
		pos, refused, err = ib.appendTx(tx, userID, data, time.Now().UnixNano())
		return err
	})
	if err != nil {
		return adapter.Position{}, fmt.Errorf("diskstore: inbox of %q: %w", userID, err)
	}
	return pos, refused
}

// appendTx is Append in tx at now. refused is the refusal for a bound,
// after which tx holds only the sweeps' removals.
func (ib *inbox) appendTx(tx *bolt.Tx, userID string, data []byte, now int64) (pos adapter.Position, refused, err error) {
	cfg := &ib.s.cfg
	if err := ib.sweepTx(tx, now, sweepBatch); err != nil {
		return pos, nil, err
	}
	r, exists, err := ib.trimTx(tx, userID, now)
	if err != nil {
		return pos, nil, err
	}
	if exists && r.n() >= cfg.inMessages {
		return pos, fmt.Errorf("%w: %d unacknowledged messages for the user", adapter.ErrInboxFull, r.n()), nil
	}
	cost := int64(len(data) + inboxMsgOverhead)
	total, err := counter(tx, keyITotal)
	if err != nil {
		return pos, nil, err
	}
	if int64(total)+cost > int64(cfg.inTotal) {
		// The user has no expired message left: r stands.
		if err := ib.sweepTx(tx, now, fullSweep); err != nil {
			return pos, nil, err
		}
		if total, err = counter(tx, keyITotal); err != nil {
			return pos, nil, err
		}
		if int64(total)+cost > int64(cfg.inTotal) {
			return pos, fmt.Errorf("%w: over the total limit of %d bytes", adapter.ErrInboxFull, cfg.inTotal), nil
		}
	}
	if !exists {
		id, err := tx.Bucket(bucketIUsers).NextSequence()
		if err != nil {
			return pos, nil, err
		}
		r = inboxRec{id: id, head: 1, next: 1, epoch: newEpoch()}
	}
	at := max(now, r.lastAt) // times never go back within a user's messages
	seq := r.next
	if err := tx.Bucket(bucketIMsgs).Put(key2(r.id, seq), encodeMsg(at, data)); err != nil {
		return pos, nil, err
	}
	if err := tx.Bucket(bucketIAge).Put(key3(timeKey(at), r.id, seq), []byte(userID)); err != nil {
		return pos, nil, err
	}
	r.next++
	r.lastAt = at
	if err := tx.Bucket(bucketIUsers).Put(nameKey(userID), r.encode()); err != nil {
		return pos, nil, err
	}
	return adapter.Position{Epoch: r.epoch, Seq: seq}, nil, addCounter(tx, keyITotal, cost)
}

func (ib *inbox) Pending(ctx context.Context, userID string) (string, []adapter.InboxEntry, error) {
	if err := ctx.Err(); err != nil {
		return "", nil, err
	}
	var (
		epoch   string
		entries []adapter.InboxEntry
	)
	// A read, which waits for no write: expired messages are skipped
	// here, and dropped by the next write.
	err := ib.s.view(func(tx *bolt.Tx) error {
		r, exists, err := getInbox(tx, userID)
		if err != nil || !exists {
			return err
		}
		now := time.Now().UnixNano()
		c := tx.Bucket(bucketIMsgs).Cursor()
		k, v := c.Seek(key2(r.id, r.head))
		for seq := r.head; seq < r.next; seq++ {
			if !bytes.Equal(k, key2(r.id, seq)) {
				return corrupt("inbox of %q: message %d missing", userID, seq)
			}
			at, data, err := decodeMsg(v)
			if err != nil {
				return err
			}
			// Times never go back: the expired are the oldest.
			if !ib.expired(at, now) {
				entries = append(entries, adapter.InboxEntry{Seq: seq, Data: bytes.Clone(data)})
			}
			k, v = c.Next()
		}
		if len(entries) > 0 {
			epoch = r.epoch
		}
		return nil
	})
	if err != nil {
		return "", nil, fmt.Errorf("diskstore: inbox of %q: %w", userID, err)
	}
	return epoch, entries, nil
}

func (ib *inbox) Ack(ctx context.Context, userID string, pos adapter.Position) error {
	// Most acknowledgements that drop nothing are told by a read.
	var drops bool
	err := ib.s.view(func(tx *bolt.Tx) error {
		r, exists, err := getInbox(tx, userID)
		drops = exists && r.epoch == pos.Epoch && pos.Seq >= r.head
		return err
	})
	if err == nil && drops {
		err = ib.s.update(ctx, func(tx *bolt.Tx) error {
			return ib.ackTx(tx, userID, pos, time.Now().UnixNano())
		})
	}
	if err != nil {
		return fmt.Errorf("diskstore: inbox of %q: %w", userID, err)
	}
	return nil
}

// ackTx is Ack in tx at now.
func (ib *inbox) ackTx(tx *bolt.Tx, userID string, pos adapter.Position, now int64) error {
	if err := ib.sweepTx(tx, now, sweepBatch); err != nil {
		return err
	}
	r, exists, err := getInbox(tx, userID)
	if err != nil || !exists || r.epoch != pos.Epoch {
		return err
	}
	for r.n() > 0 && r.head <= pos.Seq {
		if err := ib.popTx(tx, &r); err != nil {
			return err
		}
	}
	return ib.putTx(tx, userID, r)
}

// getInbox reads the user's inbox record.
func getInbox(tx *bolt.Tx, userID string) (inboxRec, bool, error) {
	v := tx.Bucket(bucketIUsers).Get(nameKey(userID))
	if v == nil {
		return inboxRec{}, false, nil
	}
	r, err := decodeInboxRec(v)
	if err != nil {
		return inboxRec{}, false, fmt.Errorf("inbox of %q: %w", userID, err)
	}
	return r, true, nil
}

// putTx writes r, the user's record, or forgets it when it has no
// message left: the user's next message starts a new epoch.
func (ib *inbox) putTx(tx *bolt.Tx, userID string, r inboxRec) error {
	if r.n() == 0 {
		return tx.Bucket(bucketIUsers).Delete(nameKey(userID))
	}
	return tx.Bucket(bucketIUsers).Put(nameKey(userID), r.encode())
}

// trimTx drops the user's expired messages and returns the record, if
// the user still has messages. The record in tx is up to date.
func (ib *inbox) trimTx(tx *bolt.Tx, userID string, now int64) (inboxRec, bool, error) {
	r, exists, err := getInbox(tx, userID)
	if err != nil || !exists {
		return r, false, err
	}
	msgs := tx.Bucket(bucketIMsgs)
	dropped := false
	for r.n() > 0 {
		at, _, err := decodeMsg(msgs.Get(key2(r.id, r.head)))
		if err != nil {
			return inboxRec{}, false, fmt.Errorf("inbox of %q: %w", userID, err)
		}
		if !ib.expired(at, now) {
			break
		}
		if err := ib.popTx(tx, &r); err != nil {
			return inboxRec{}, false, err
		}
		dropped = true
	}
	if dropped {
		if err := ib.putTx(tx, userID, r); err != nil {
			return inboxRec{}, false, err
		}
	}
	return r, r.n() > 0, nil
}

// popTx drops the oldest message of r, which must have one, and its
// cost. The caller writes r (putTx).
func (ib *inbox) popTx(tx *bolt.Tx, r *inboxRec) error {
	size, err := deleteMsg(tx, bucketIMsgs, bucketIAge, r.id, r.head)
	if err != nil {
		return err
	}
	r.head++
	return addCounter(tx, keyITotal, -(size + inboxMsgOverhead))
}

// sweepTx drops up to limit expired messages, oldest first, whoever's
// they are.
func (ib *inbox) sweepTx(tx *bolt.Tx, now int64, limit int) error {
	if ib.s.cfg.inAge <= 0 {
		return nil
	}
	return sweepAges(tx, bucketIAge, limit, func(t int64) bool { return ib.expired(t, now) }, func(userID string, id, head uint64) error {
		r, exists, err := getInbox(tx, userID)
		if err != nil {
			return err
		}
		if !exists || r.id != id || r.head != head {
			return corrupt("age entry of the inbox of %q, message %d, points to no oldest message", userID, head)
		}
		if err := ib.popTx(tx, &r); err != nil {
			return err
		}
		return ib.putTx(tx, userID, r)
	})
}
