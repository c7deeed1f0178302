package diskstore

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"time"

	"github.com/tether-ws/tether/adapter"
	bolt "go.etcd.io/bbolt"
)

// The bounds of adapter.NewMemoryHistory, which this history keeps too.
const (
	// maxSeq bounds seqs below 2^53, which JavaScript clients read
	// exactly: a topic starts a new epoch rather than reach it.
	maxSeq = 1<<53 - 1
	// maxHistoryRecords bounds the topics tracked at once; beyond it the
	// one appended to least recently is forgotten.
	maxHistoryRecords = 1 << 20
	// maxEmptyRecords and emptyForgetAfter bound the records of topics
	// that never had a message, which Since creates: a subscription to a
	// topic nobody publishes to.
	maxEmptyRecords  = 1 << 13
	emptyForgetAfter = 10 * time.Minute
	// sweepBatch bounds how many idle records one call forgets, and
	// trimBatch how many of its topic's old messages one Append removes:
	// each call adds at most one of either, so they keep up.
	sweepBatch = 64
	trimBatch  = 64
	// purgeBatch bounds how many messages of forgotten topics one call
	// removes from the file.
	purgeBatch = 256
)

// history is the store's adapter.History.
type history struct{ s *Store }

// forgetAfter is how long a topic's record outlives its last message: an
// hour, or maxAge when longer; never without maxAge, but for the cap.
func (h *history) forgetAfter() time.Duration {
	if h.s.cfg.histAge <= 0 {
		return 0
	}
	return max(h.s.cfg.histAge, time.Hour)
}

// idle reports whether r is forgotten at now (see adapter.NewMemoryHistory).
func (h *history) idle(r topicRec, now int64) bool {
	if !r.appended {
		return now-r.touched > int64(emptyForgetAfter)
	}
	f := h.forgetAfter()
	return f > 0 && now-r.touched > int64(f)
}

// expired reports whether a message kept at at has expired at now.
func (h *history) expired(at, now int64) bool {
	return h.s.cfg.histAge > 0 && now-at > int64(h.s.cfg.histAge)
}

func (h *history) Append(ctx context.Context, topic string, data []byte) (adapter.Position, error) {
	var pos adapter.Position
	err := h.s.update(ctx, func(tx *bolt.Tx) error {
		var err error
		pos, err = h.appendTx(tx, topic, data, time.Now().UnixNano())
		return err
	})
	if err != nil {
		return adapter.Position{}, fmt.Errorf("diskstore: append to %q: %w", topic, err)
	}
	return pos, nil
}

func (h *history) Since(ctx context.Context, topic string, pos adapter.Position) ([]adapter.HistoryEntry, adapter.Position, bool, error) {
	var (
		entries []adapter.HistoryEntry
		last    adapter.Position
		ok      bool
		found   bool
	)
	// Most calls find the topic's record: a read, which waits for no
	// write.
	err := h.s.view(func(tx *bolt.Tx) error {
		now := time.Now().UnixNano()
		r, exists, err := getTopic(tx, topic)
		if err != nil || !exists || h.idle(r, now) {
			return err
		}
		found = true
		entries, last, ok, err = h.sinceTx(tx, r, pos, now)
		return err
	})
	if err == nil && !found {
		// An unknown topic gets its record now, so that the epoch
		// returned is the one the next Append uses and the client's
		// position stays valid; an idle one is forgotten first.
		err = h.s.update(ctx, func(tx *bolt.Tx) error {
			now := time.Now().UnixNano()
			r, err := h.recordTx(tx, topic, now, false)
			if err != nil {
				return err
			}
			entries, last, ok, err = h.sinceTx(tx, r, pos, now)
			return err
		})
	}
	if err != nil {
		return nil, adapter.Position{}, false, fmt.Errorf("diskstore: history of %q: %w", topic, err)
	}
	return entries, last, ok, nil
}

// sinceTx is Since over r, the topic's record, valid at now.
func (h *history) sinceTx(tx *bolt.Tx, r topicRec, pos adapter.Position, now int64) ([]adapter.HistoryEntry, adapter.Position, bool, error) {
	last := adapter.Position{Epoch: r.epoch, Seq: r.seq}
	if pos.Epoch != r.epoch || pos.Seq > r.seq {
		return nil, last, false, nil
	}
	missed := r.seq - pos.Seq
	if missed == 0 {
		return nil, last, true, nil
	}
	if missed > uint64(h.s.cfg.histMessages) {
		return nil, last, false, nil // beyond the bound, whatever the file still holds
	}
	// The messages are contiguous up to r.seq, and their times never go
	// back: the first one missed being there, and not expired, is enough.
	c := tx.Bucket(bucketMsgs).Cursor()
	k, v := c.Seek(key2(r.id, pos.Seq+1))
	entries := make([]adapter.HistoryEntry, 0, missed)
	for want := pos.Seq + 1; want <= r.seq; want++ {
		if !bytes.Equal(k, key2(r.id, want)) {
			if want == pos.Seq+1 {
				return nil, last, false, nil // trimmed
			}
			return nil, last, false, corrupt("topic id %d: seq %d missing before %d", r.id, want, r.seq)
		}
		at, data, err := decodeMsg(v)
		if err != nil {
			return nil, last, false, err
		}
		if want == pos.Seq+1 && h.expired(at, now) {
			return nil, last, false, nil
		}
		// bbolt's memory is valid only in the transaction.
		entries = append(entries, adapter.HistoryEntry{Seq: want, Data: bytes.Clone(data)})
		k, v = c.Next()
	}
	return entries, last, true, nil
}

// appendTx is Append in tx at now.
func (h *history) appendTx(tx *bolt.Tx, topic string, data []byte, now int64) (adapter.Position, error) {
	r, err := h.recordTx(tx, topic, now, true)
	if err != nil {
		return adapter.Position{}, err
	}
	oldIdx := indexKey(r)
	wasEmpty := !r.appended
	if r.seq == maxSeq {
		// A new epoch: the old one's messages go with the old id.
		if err := tx.Bucket(bucketGC).Put(u64(r.id), nil); err != nil {
			return adapter.Position{}, err
		}
		if r.id, err = tx.Bucket(bucketTopics).NextSequence(); err != nil {
			return adapter.Position{}, err
		}
		r.epoch, r.seq = newEpoch(), 0
	}
	r.seq++
	at := max(now, r.touched) // times never go back within a topic
	msgs := tx.Bucket(bucketMsgs)
	if h.s.cfg.histMessages > 0 {
		if err := msgs.Put(key2(r.id, r.seq), encodeMsg(at, data)); err != nil {
			return adapter.Position{}, err
		}
	}
	// Trim the oldest messages: those past the bound, and the expired.
	c := msgs.Cursor()
	start := key2(r.id, 0)
	for range trimBatch {
		k, v := c.Seek(start)
		if !bytes.HasPrefix(k, start[:8]) {
			break
		}
		ks, err := decodeKey(k, 2)
		if err != nil {
			return adapter.Position{}, err
		}
		msgAt, _, err := decodeMsg(v)
		if err != nil {
			return adapter.Position{}, err
		}
		if ks[1]+uint64(h.s.cfg.histMessages) > r.seq && !h.expired(msgAt, now) {
			break
		}
		if err := c.Delete(); err != nil {
			return adapter.Position{}, err
		}
	}

	r.touched, r.appended = at, true
	if err := tx.Bucket(indexBucket(wasEmpty)).Delete(oldIdx); err != nil {
		return adapter.Position{}, err
	}
	if err := tx.Bucket(bucketHIdx).Put(indexKey(r), []byte(topic)); err != nil {
		return adapter.Position{}, err
	}
	if wasEmpty {
		if err := addCounter(tx, keyNEmpty, -1); err != nil {
			return adapter.Position{}, err
		}
	}
	if err := tx.Bucket(bucketTopics).Put(nameKey(topic), r.encode()); err != nil {
		return adapter.Position{}, err
	}
	return adapter.Position{Epoch: r.epoch, Seq: r.seq}, nil
}

// recordTx returns topic's record, creating it if it has none or if it
// is idle, after a sweep of a few idle records and forgotten messages.
// forAppend says the record is made for a message, so that it does not
// count against the cap on records without one.
func (h *history) recordTx(tx *bolt.Tx, topic string, now int64, forAppend bool) (topicRec, error) {
	if err := h.sweepTx(tx, now); err != nil {
		return topicRec{}, err
	}
	r, exists, err := getTopic(tx, topic)
	if err != nil {
		return topicRec{}, err
	}
	if exists && h.idle(r, now) {
		if err := h.forgetTx(tx, r, topic); err != nil {
			return topicRec{}, err
		}
		exists = false
	}
	if exists {
		return r, nil
	}

	// Make room under the caps, as the memory history does.
	nEmpty, err := counter(tx, keyNEmpty)
	if err != nil {
		return topicRec{}, err
	}
	nTopics, err := counter(tx, keyNTopics)
	if err != nil {
		return topicRec{}, err
	}
	switch {
	case !forAppend && nEmpty >= uint64(h.s.cfg.maxEmpty):
		err = h.forgetOldestTx(tx, bucketHEmpty)
	case nTopics >= uint64(h.s.cfg.maxTopics):
		if nEmpty > 0 {
			err = h.forgetOldestTx(tx, bucketHEmpty)
		} else {
			err = h.forgetOldestTx(tx, bucketHIdx)
		}
	}
	if err != nil {
		return topicRec{}, err
	}

	id, err := tx.Bucket(bucketTopics).NextSequence()
	if err != nil {
		return topicRec{}, err
	}
	r = topicRec{id: id, epoch: newEpoch(), touched: now}
	if err := tx.Bucket(bucketTopics).Put(nameKey(topic), r.encode()); err != nil {
		return topicRec{}, err
	}
	if err := tx.Bucket(bucketHEmpty).Put(indexKey(r), []byte(topic)); err != nil {
		return topicRec{}, err
	}
	if err := addCounter(tx, keyNTopics, 1); err != nil {
		return topicRec{}, err
	}
	return r, addCounter(tx, keyNEmpty, 1)
}

// sweepTx forgets up to sweepBatch idle records of each kind, the least
// recently appended to first, and removes up to purgeBatch messages of
// forgotten topics.
func (h *history) sweepTx(tx *bolt.Tx, now int64) error {
	for _, name := range [][]byte{bucketHIdx, bucketHEmpty} {
		limit := int64(emptyForgetAfter)
		if bytes.Equal(name, bucketHIdx) {
			if limit = int64(h.forgetAfter()); limit == 0 {
				continue
			}
		}
		for range sweepBatch {
			k, _ := tx.Bucket(name).Cursor().First()
			if k == nil {
				break
			}
			ks, err := decodeKey(k, 2)
			if err != nil {
				return err
			}
			if now-int64(ks[0]) <= limit {
				break
			}
			if err := h.forgetOldestTx(tx, name); err != nil {
				return err
			}
		}
	}

	gc := tx.Bucket(bucketGC).Cursor()
	c := tx.Bucket(bucketMsgs).Cursor()
	purged := 0
	for k, _ := gc.First(); k != nil && purged < purgeBatch; k, _ = gc.First() {
		for ; purged < purgeBatch; purged++ {
			mk, _ := c.Seek(k)
			if !bytes.HasPrefix(mk, k) {
				break
			}
			if err := c.Delete(); err != nil {
				return err
			}
		}
		if purged == purgeBatch {
			break
		}
		if err := gc.Delete(); err != nil { // all its messages are gone
			return err
		}
	}
	return nil
}

// forgetOldestTx forgets the record that comes first in the index of
// the given bucket (hidx or hempty).
func (h *history) forgetOldestTx(tx *bolt.Tx, index []byte) error {
	k, topic := tx.Bucket(index).Cursor().First()
	if k == nil {
		return nil
	}
	name := string(topic)
	r, exists, err := getTopic(tx, name)
	if err != nil {
		return err
	}
	if !exists || !bytes.Equal(indexKey(r), k) {
		return corrupt("index entry of topic %q points to no record", name)
	}
	return h.forgetTx(tx, r, name)
}

// forgetTx forgets r, topic's record: the topic starts a new epoch if it
// comes back. Its messages are purged later, a few at a time.
func (h *history) forgetTx(tx *bolt.Tx, r topicRec, topic string) error {
	if err := tx.Bucket(bucketTopics).Delete(nameKey(topic)); err != nil {
		return err
	}
	if err := tx.Bucket(indexBucket(!r.appended)).Delete(indexKey(r)); err != nil {
		return err
	}
	if err := addCounter(tx, keyNTopics, -1); err != nil {
		return err
	}
	if !r.appended {
		return addCounter(tx, keyNEmpty, -1) // and it has no message
	}
	return tx.Bucket(bucketGC).Put(u64(r.id), nil)
}

// getTopic reads topic's record.
func getTopic(tx *bolt.Tx, topic string) (topicRec, bool, error) {
	v := tx.Bucket(bucketTopics).Get(nameKey(topic))
	if v == nil {
		return topicRec{}, false, nil
	}
	r, err := decodeTopicRec(v)
	if err != nil {
		return topicRec{}, false, fmt.Errorf("topic %q: %w", topic, err)
	}
	return r, true, nil
}

// indexKey is r's key in its index: by when it was touched.
func indexKey(r topicRec) []byte { return key2(timeKey(r.touched), r.id) }

// indexBucket is the index of records with a message, or without.
func indexBucket(empty bool) []byte {
	if empty {
		return bucketHEmpty
	}
	return bucketHIdx
}

// newEpoch returns a random epoch, as the memory history makes them:
// 64 bits, in 11 bytes of base64.
func newEpoch() string {
	var b [8]byte
	rand.Read(b[:]) // never fails: it crashes the program instead
	return base64.RawURLEncoding.EncodeToString(b[:])
}
