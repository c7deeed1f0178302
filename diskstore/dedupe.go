package diskstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// This file makes the history an adapter.Deduper, so that a hub without a
// broker remembers its clients' request ids across its own restarts: a
// client that sends a publication again after a restart, with the same id
// (PROTOCOL.md, "pub"), because it had no ack, gets the ack without a
// second publication, if the first was committed.
//
// # When an id is on disk
//
// Once returns at once, having written nothing: the id is written by the
// committer with the next commit of a write called after Once, which for
// a publication is the hub's Append of it, and usually that very
// transaction. The id and the message it guards are then on disk
// together, or neither is: after a crash, a publication whose ack the
// client may have had is known as a repeat, and one that was lost is
// published when the client sends it again. An id that no write follows
// (a direct message to the server application) is written on its own
// after keyFlushDelay.
//
// Writing the id before Once returns, in a commit of its own, would open
// a window at every publication: the id on disk, its message not yet, a
// crash, and the repeat is acked and never published (5 runs of TestKill9
// in 8 failed that way, BENCHMARKS.md, "Disk store"). What is left of the window: when
// another caller's write comes between Once and the publication's Append
// and is committed before it, the id goes with that commit, one ahead of
// its message. Only a hub that handed the id to Append could close it.
//
// # Where ids are kept
//
// On disk, in one bucket ordered by expiry (dexp: expiry, id), which a
// commit appends to and sweeps from the front; in memory, every id on
// disk or on its way there, with its expiry (dedupeKeys.known, loaded at
// Open), which Once looks up without reading the file. So an id costs a
// commit about one page more, and Once no read.

// Bounds of the ids kept.
const (
	// defaultDedupeKeys bounds the ids on disk, as the hub bounds those
	// it keeps in memory: past it the one closest to expiry goes.
	defaultDedupeKeys = 1 << 17
	// keyFlushDelay is how long an id waits for a write to go with
	// before it is committed on its own.
	keyFlushDelay = 50 * time.Millisecond
	// flushPending is how many ids waiting make the committer write them
	// at once, and maxPending how many make Once fail (the disk is not
	// keeping up: the hub remembers ids in memory meanwhile).
	flushPending = 4096
	maxPending   = 1 << 16
)

var errKeyBacklog = errors.New("too many request ids waiting for the disk")

// dedupeKeys are the ids the store knows: on disk, waiting to be written
// (or deleted, after Forget), or both.
type dedupeKeys struct {
	mu      sync.Mutex
	known   map[string]*keyRec
	order   []pendingKey // the writes waiting, by Once: after and added never go back
	head    int
	pending int    // keys with a write waiting
	stamp   uint64 // of the last write queued
	onDisk  int    // entries of dexp, as the last commit left them
}

// keyRec is what the store knows of an id. A record with no entry on
// disk and no write waiting is dropped.
type keyRec struct {
	exp   int64  // unix ns: the id is known until then; 0 once forgotten
	disk  int64  // the expiry of its entry in dexp; 0 for none
	stamp uint64 // of its write waiting (exp, or a delete when exp is 0); 0 for none
}

// pendingKey is a write of order; it is stale when its key's record
// holds another stamp.
type pendingKey struct {
	key   string
	stamp uint64
	after uint64    // the idx of the last op queued before it
	added time.Time // when, for keyFlushDelay
}

// load reads the ids on disk, at Open.
func (d *dedupeKeys) load(tx *bolt.Tx, now int64) error {
	d.known = make(map[string]*keyRec)
	return tx.Bucket(bucketDExp).ForEach(func(k, _ []byte) error {
		exp, key, err := decodeExpKey(k)
		if err != nil {
			return err
		}
		d.onDisk++
		if exp > now {
			if r := d.known[key]; r == nil || r.disk < exp {
				d.known[key] = &keyRec{exp: exp, disk: exp}
			}
		}
		return nil // the expired ones, sweeps drop
	})
}

// flushKeys is what a commit writes: the writes waiting it took, and how
// many entries of order, from head, they stand for.
type flushKeys struct {
	writes []keyWrite
	n      int
	onDisk int // entries of dexp before the commit
}

// keyWrite is a write of an id: its new entry (exp; none when 0) in
// place of its old one (disk; none when 0).
type keyWrite struct {
	key       string
	exp, disk int64
	stamp     uint64
}

// take returns the writes of order, oldest first, for which due holds
// (all of them when too many wait), for the commit about to start.
func (d *dedupeKeys) take(due func(pendingKey) bool) flushKeys {
	d.mu.Lock()
	defer d.mu.Unlock()
	all := d.pending >= flushPending
	f := flushKeys{onDisk: d.onDisk}
	for _, p := range d.order[d.head:] {
		if !all && !due(p) {
			break
		}
		f.n++
		if r := d.known[p.key]; r != nil && r.stamp == p.stamp {
			f.writes = append(f.writes, keyWrite{key: p.key, exp: r.exp, disk: r.disk, stamp: p.stamp})
		}
	}
	return f
}

// writeTx writes the ids of f, then drops expired entries, at most as
// many as it wrote and sweepBatch more, and those closest to expiry
// beyond bound. It returns the entries it dropped and how many are left.
func (f flushKeys) writeTx(tx *bolt.Tx, now int64, bound int) (dropped []keyWrite, onDisk int, err error) {
	b := tx.Bucket(bucketDExp)
	onDisk = f.onDisk
	for _, w := range f.writes {
		if w.disk != 0 {
			if err := b.Delete(expKey(w.disk, w.key)); err != nil {
				return nil, 0, err
			}
			onDisk--
		}
		if w.exp != 0 {
			if err := b.Put(expKey(w.exp, w.key), nil); err != nil {
				return nil, 0, err
			}
			onDisk++
		}
	}
	c := b.Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.First() {
		exp, key, err := decodeExpKey(k)
		if err != nil {
			return nil, 0, err
		}
		expired := exp <= now && len(dropped) < len(f.writes)+sweepBatch
		if !expired && onDisk <= bound {
			break
		}
		if err := c.Delete(); err != nil {
			return nil, 0, err
		}
		dropped = append(dropped, keyWrite{key: key, disk: exp})
		onDisk--
	}
	return dropped, onDisk, nil
}

// written records that f was committed, dropped with it, leaving
// onDisk entries; or, for an f without writes, that the stale entries of
// order it passed are gone.
func (d *dedupeKeys) written(f flushKeys, dropped []keyWrite, onDisk int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, w := range f.writes {
		r := d.known[w.key]
		r.disk = w.exp
		if r.stamp == w.stamp { // not recorded again, or forgotten, since
			r.stamp = 0
			d.pending--
		}
		d.dropIfGone(w.key, r)
	}
	for _, w := range dropped {
		if r := d.known[w.key]; r != nil && r.disk == w.disk {
			r.disk = 0
			d.dropIfGone(w.key, r)
		}
	}
	d.onDisk = onDisk
	d.advance(f.n)
}

// dropIfGone forgets r, key's record, when it has no entry on disk and no
// write waiting: it was forgotten, pushed out or expired.
func (d *dedupeKeys) dropIfGone(key string, r *keyRec) {
	if r.disk == 0 && r.stamp == 0 {
		delete(d.known, key)
	}
}

// advance drops n entries of order, which a commit wrote or were stale.
func (d *dedupeKeys) advance(n int) {
	clear(d.order[d.head : d.head+n])
	d.head += n
	if d.head > len(d.order)/2 { // compact the queue now and then
		d.order = append(d.order[:0], d.order[d.head:]...)
		d.head = 0
	}
}

// oldest returns when the oldest write waiting was queued.
func (d *dedupeKeys) oldest() (time.Time, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for ; d.head < len(d.order); d.head++ {
		p := d.order[d.head]
		if r := d.known[p.key]; r != nil && r.stamp == p.stamp {
			return p.added, true
		}
		d.order[d.head] = pendingKey{} // stale
	}
	return time.Time{}, false
}

// queueLocked queues a write of r, key's record, as it now is.
func (d *dedupeKeys) queueLocked(s *Store, key string, r *keyRec, now time.Time) {
	s.mu.Lock()
	after := s.enqueued
	s.mu.Unlock()
	if r.stamp == 0 {
		d.pending++
	}
	d.stamp++
	r.stamp = d.stamp
	d.order = append(d.order, pendingKey{key: key, stamp: r.stamp, after: after, added: now})
	if d.pending == 1 || d.pending == flushPending {
		s.signal() // the committer sets its timer, or writes them all
	}
}

// Once records key for ttl and reports whether it is new: false when it
// was recorded within ttl, before a restart too if it reached the disk
// (see above). With ttl <= 0 it records nothing.
func (h *history) Once(ctx context.Context, key string, ttl time.Duration) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	s, d := h.s, &h.s.keys
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	r := d.known[key]
	if r != nil && r.exp > now.UnixNano() {
		return false, nil
	}
	if ttl <= 0 {
		return true, nil
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return false, fmt.Errorf("diskstore: request id: %w", ErrClosed)
	}
	if d.pending >= maxPending {
		return false, fmt.Errorf("diskstore: request id: %w", errKeyBacklog)
	}
	if r == nil {
		r = &keyRec{}
		d.known[key] = r
	}
	r.exp = now.Add(ttl).UnixNano()
	d.queueLocked(s, key, r, now)
	return true, nil
}

// Forget drops key, on disk when it returns.
func (h *history) Forget(ctx context.Context, key string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s, d := h.s, &h.s.keys
	d.mu.Lock()
	r := d.known[key]
	if r == nil {
		d.mu.Unlock()
		return nil
	}
	r.exp = 0
	d.queueLocked(s, key, r, time.Now())
	d.mu.Unlock()
	// A commit of nothing, which takes the delete along.
	if err := s.update(ctx, func(*bolt.Tx) error { return nil }); err != nil {
		return fmt.Errorf("diskstore: forget request id: %w", err)
	}
	return nil
}

// expKey is the key of an id's entry in dexp: its expiry, then the id.
func expKey(exp int64, key string) []byte {
	return append(binary.BigEndian.AppendUint64(nil, timeKey(exp)), key...)
}

func decodeExpKey(k []byte) (int64, string, error) {
	if len(k) < 8 || k[0]&0x80 != 0 {
		return 0, "", corrupt("request id entry of %d bytes, %x", len(k), k[:min(len(k), 8)])
	}
	return int64(binary.BigEndian.Uint64(k)), string(k[8:]), nil
}
