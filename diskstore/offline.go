package diskstore

import (
	"bytes"
	"context"
	"fmt"
	"time"

	"github.com/tether-ws/tether/adapter"
	bolt "go.etcd.io/bbolt"
)

// What a message and a user with messages count against the total bound
// beyond their data, as in adapter.NewMemoryOfflineStore (on disk they
// cost about as much: keys, the age index, page slack).
const (
	offlineMsgOverhead  = 64
	offlineUserOverhead = 128
	// fullSweep bounds the expired messages Store drops before it
	// refuses a message for the total bound: a store full of expired
	// messages makes room over a few calls rather than in one long
	// transaction that would hold up every other write.
	fullSweep = 4096
)

// offline is the store's adapter.OfflineStore.
type offline struct{ s *Store }

func (o *offline) expired(at, now int64) bool {
	return o.s.cfg.offAge > 0 && now-at > int64(o.s.cfg.offAge)
}

func (o *offline) Store(ctx context.Context, userID string, data []byte) error {
	cfg := &o.s.cfg
	if cfg.offMessages <= 0 || cfg.offBytes <= 0 || cfg.offTotal <= 0 {
		return fmt.Errorf("%w: it keeps no messages", adapter.ErrOfflineFull)
	}
	if len(data) > cfg.offBytes {
		return fmt.Errorf("%w: message of %d bytes over the per-user limit of %d", adapter.ErrOfflineFull, len(data), cfg.offBytes)
	}
	if len(data)+offlineMsgOverhead > cfg.offTotal {
		return fmt.Errorf("%w: message of %d bytes over the total limit of %d", adapter.ErrOfflineFull, len(data), cfg.offTotal)
	}
	var refused error
	err := o.s.update(ctx, func(tx *bolt.Tx) error {
		var err error
		refused, err = o.storeTx(tx, userID, data, time.Now().UnixNano())
		return err
	})
	if err != nil {
		return fmt.Errorf("diskstore: offline store for %q: %w", userID, err)
	}
	return refused
}

// storeTx is Store in tx at now. refused is the refusal for the total
// bound, after which tx holds only the sweep's removals.
func (o *offline) storeTx(tx *bolt.Tx, userID string, data []byte, now int64) (refused, err error) {
	cfg := &o.s.cfg
	if err := o.sweepTx(tx, now, sweepBatch); err != nil {
		return nil, err
	}
	r, exists, err := o.trimTx(tx, userID, now)
	if err != nil {
		return nil, err
	}
	cost := int64(len(data) + offlineMsgOverhead)
	if !exists {
		cost += offlineUserOverhead
	}

	// Find the user's oldest messages that must go to make room, without
	// dropping them yet: if the total bound refuses data they stay.
	msgs := tx.Bucket(bucketOMsgs)
	drop, freedBytes := 0, int64(0)
	if exists {
		c := msgs.Cursor()
		k, v := c.Seek(key2(r.id, r.head))
		for r.n()-drop+1 > cfg.offMessages || r.bytes-freedBytes+int64(len(data)) > int64(cfg.offBytes) {
			if !bytes.Equal(k, key2(r.id, r.head+uint64(drop))) {
				return nil, corrupt("user %q: message %d missing", userID, r.head+uint64(drop))
			}
			_, d, err := decodeMsg(v)
			if err != nil {
				return nil, err
			}
			freedBytes += int64(len(d))
			drop++
			k, v = c.Next()
		}
	}
	freed := freedBytes + int64(drop)*offlineMsgOverhead
	total, err := counter(tx, keyOTotal)
	if err != nil {
		return nil, err
	}
	if int64(total)-freed+cost > int64(cfg.offTotal) {
		// The user has no expired message left, so this cannot change
		// freed.
		if err := o.sweepTx(tx, now, fullSweep); err != nil {
			return nil, err
		}
		if total, err = counter(tx, keyOTotal); err != nil {
			return nil, err
		}
		if int64(total)-freed+cost > int64(cfg.offTotal) {
			return fmt.Errorf("%w: over the total limit of %d bytes", adapter.ErrOfflineFull, cfg.offTotal), nil
		}
	}

	if !exists {
		id, err := tx.Bucket(bucketUsers).NextSequence()
		if err != nil {
			return nil, err
		}
		r = userRec{id: id, head: 1, tail: 1}
	}
	for range drop {
		if err := o.popTx(tx, &r); err != nil {
			return nil, err
		}
	}
	at := max(now, r.lastAt) // times never go back within a user's messages
	n := r.tail
	if err := msgs.Put(key2(r.id, n), encodeMsg(at, data)); err != nil {
		return nil, err
	}
	if err := tx.Bucket(bucketOAge).Put(key3(timeKey(at), r.id, n), []byte(userID)); err != nil {
		return nil, err
	}
	r.tail++
	r.bytes += int64(len(data))
	r.lastAt = at
	if err := tx.Bucket(bucketUsers).Put(nameKey(userID), r.encode()); err != nil {
		return nil, err
	}
	return nil, addCounter(tx, keyOTotal, cost) // the drops took out what they freed
}

func (o *offline) Take(ctx context.Context, userID string) ([][]byte, error) {
	// Most users who connect have nothing waiting: a read tells, which
	// waits for no write.
	var exists bool
	err := o.s.view(func(tx *bolt.Tx) error {
		exists = tx.Bucket(bucketUsers).Get(nameKey(userID)) != nil
		return nil
	})
	if err != nil || !exists {
		if err != nil {
			err = fmt.Errorf("diskstore: offline messages of %q: %w", userID, err)
		}
		return nil, err
	}
	var out [][]byte
	err = o.s.update(ctx, func(tx *bolt.Tx) error {
		var err error
		out, err = o.takeTx(tx, userID, time.Now().UnixNano())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("diskstore: offline messages of %q: %w", userID, err)
	}
	return out, nil
}

// takeTx is Take in tx at now.
func (o *offline) takeTx(tx *bolt.Tx, userID string, now int64) ([][]byte, error) {
	if err := o.sweepTx(tx, now, sweepBatch); err != nil {
		return nil, err
	}
	r, exists, err := o.trimTx(tx, userID, now)
	if err != nil || !exists {
		return nil, err
	}
	c := tx.Bucket(bucketOMsgs).Cursor()
	out := make([][]byte, 0, r.n())
	k, v := c.Seek(key2(r.id, r.head))
	for n := r.head; n < r.tail; n++ {
		if !bytes.Equal(k, key2(r.id, n)) {
			return nil, corrupt("user %q: message %d missing", userID, n)
		}
		_, data, err := decodeMsg(v)
		if err != nil {
			return nil, err
		}
		out = append(out, bytes.Clone(data)) // bbolt's memory is valid only in tx
		k, v = c.Next()
	}
	for r.n() > 0 {
		if err := o.popTx(tx, &r); err != nil {
			return nil, err
		}
	}
	return out, o.removeTx(tx, userID)
}

// getUser reads the user's record.
func getUser(tx *bolt.Tx, userID string) (userRec, bool, error) {
	v := tx.Bucket(bucketUsers).Get(nameKey(userID))
	if v == nil {
		return userRec{}, false, nil
	}
	r, err := decodeUserRec(v)
	if err != nil {
		return userRec{}, false, fmt.Errorf("user %q: %w", userID, err)
	}
	return r, true, nil
}

// trimTx drops the user's expired messages, and returns the record, if
// the user still has messages. The record in tx is up to date.
func (o *offline) trimTx(tx *bolt.Tx, userID string, now int64) (userRec, bool, error) {
	r, exists, err := getUser(tx, userID)
	if err != nil || !exists {
		return r, false, err
	}
	msgs := tx.Bucket(bucketOMsgs)
	dropped := false
	for r.n() > 0 {
		at, _, err := decodeMsg(msgs.Get(key2(r.id, r.head)))
		if err != nil {
			return userRec{}, false, fmt.Errorf("user %q: %w", userID, err)
		}
		if !o.expired(at, now) {
			break
		}
		if err := o.popTx(tx, &r); err != nil {
			return userRec{}, false, err
		}
		dropped = true
	}
	if r.n() == 0 {
		return userRec{}, false, o.removeTx(tx, userID)
	}
	if dropped {
		return r, true, tx.Bucket(bucketUsers).Put(nameKey(userID), r.encode())
	}
	return r, true, nil
}

// popTx drops the oldest message of r, which must have one, and its cost.
// The caller writes r, or removes it once it has no message left.
func (o *offline) popTx(tx *bolt.Tx, r *userRec) error {
	size, err := deleteMsg(tx, bucketOMsgs, bucketOAge, r.id, r.head)
	if err != nil {
		return err
	}
	r.head++
	r.bytes -= size
	return addCounter(tx, keyOTotal, -(size + offlineMsgOverhead))
}

// removeTx forgets the record of a user whose messages are all gone.
func (o *offline) removeTx(tx *bolt.Tx, userID string) error {
	if err := tx.Bucket(bucketUsers).Delete(nameKey(userID)); err != nil {
		return err
	}
	return addCounter(tx, keyOTotal, -offlineUserOverhead)
}

// sweepTx drops up to limit expired messages, oldest first, whoever's
// they are.
func (o *offline) sweepTx(tx *bolt.Tx, now int64, limit int) error {
	if o.s.cfg.offAge <= 0 {
		return nil
	}
	return sweepAges(tx, bucketOAge, limit, func(t int64) bool { return o.expired(t, now) }, func(userID string, id, head uint64) error {
		r, exists, err := getUser(tx, userID)
		if err != nil {
			return err
		}
		if !exists || r.id != id || r.head != head {
			return corrupt("age entry of user %q's message %d points to no oldest message", userID, head)
		}
		if err := o.popTx(tx, &r); err != nil {
			return err
		}
		if r.n() == 0 {
			return o.removeTx(tx, userID)
		}
		return tx.Bucket(bucketUsers).Put(nameKey(userID), r.encode())
	})
}

// deleteMsg deletes message i of the user record id from the msgs bucket,
// and its entry from the age bucket, and returns the size of its data.
func deleteMsg(tx *bolt.Tx, msgsBucket, ageBucket []byte, id, i uint64) (int64, error) {
	k := key2(id, i)
	msgs := tx.Bucket(msgsBucket)
	at, data, err := decodeMsg(msgs.Get(k))
	if err != nil {
		return 0, err
	}
	size := int64(len(data))
	if err := tx.Bucket(ageBucket).Delete(key3(timeKey(at), id, i)); err != nil {
		return 0, err
	}
	return size, msgs.Delete(k)
}

// sweepAges drops up to limit of the oldest messages an age bucket lists
// (keys: time, record id, message index; values: the user), while expired
// says their time is past: drop removes the user's oldest message, which
// the entry must be, and its entry with it.
func sweepAges(tx *bolt.Tx, bucket []byte, limit int, expired func(t int64) bool, drop func(userID string, id, head uint64) error) error {
	age := tx.Bucket(bucket)
	for range limit {
		k, user := age.Cursor().First()
		if k == nil {
			return nil
		}
		ks, err := decodeKey(k, 3)
		if err != nil {
			return err
		}
		if !expired(int64(ks[0])) {
			return nil
		}
		if err := drop(string(user), ks[1], ks[2]); err != nil {
			return err
		}
	}
	return nil
}
