package adapter

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"sync"
	"time"

	"github.com/tether-ws/tether/internal/shrink"
)

// maxSeq bounds seqs below 2^53 so that JavaScript clients, whose numbers
// are float64, read them exactly.
const maxSeq = 1<<53 - 1

// maxHistoryRecords bounds how many topics a memory history tracks at
// once. Beyond it the topic appended to least recently is forgotten, and
// gets a fresh epoch if it comes back: its clients resync, which is
// correct, where unbounded growth (one record per topic name a client
// subscribes to) would not be. A record without messages costs about
// 150 bytes besides its topic name, so records at the cap take about
// 150 MB before their messages.
const maxHistoryRecords = 1 << 20

// sweepBatch bounds how many idle topics (history) or expired messages
// (offline store) one call forgets, so that a mass expiry is spread over
// calls rather than paid by one. Each call creates at most one record or
// message, so sweeping up to sweepBatch per call always keeps up.
const sweepBatch = 64

// NewMemoryHistory returns a [History] held in this process's memory that
// keeps, for each topic, up to messages of its latest messages, none older
// than maxAge.
//
// With messages <= 0 it keeps no messages but still numbers them: a client
// resumes only when it missed nothing, and resyncs otherwise. With
// maxAge <= 0 messages do not expire.
//
// Epochs are random, so a restart always changes them. A topic gets a
// fresh epoch too when its record is forgotten: when nothing was appended
// to it for maxAge or an hour, whichever is longer (its messages have all
// expired by then, so only a client that missed nothing loses by it, with
// a needless resync; Since does not keep a topic alive), or when more than 2^20 topics are tracked (the least recently
// appended to goes). The seq also starts a
// new epoch rather than reach 2^53, the largest integer a JavaScript client
// reads exactly.
//
// A topic that never had a message, which Since learnt of (a subscription
// to a topic nobody publishes to), is forgotten after 10 minutes, and at
// most 8,192 such topics are kept, the oldest going first: whatever
// topics clients subscribe to, they hold about 1.6 MiB at most. This costs their
// subscribers nothing while they stay (the first message, seq 1 of a new
// epoch, follows on from seq 0); one that reconnects after it was
// forgotten resyncs.
//
// Idle records are forgotten as a side effect of Append and Since, with no
// goroutine: each call checks the least recently appended topics, in O(1),
// and forgets up to 64 idle ones. The memory it holds is thus about
// (topics published to within the last hour or maxAge, at most 2^20) ×
// messages entries plus their data.
//
// Append and Since ignore ctx: they never block.
func NewMemoryHistory(messages int, maxAge time.Duration) History {
	return &memoryHistory{
		messages:    max(messages, 0),
		maxAge:      max(maxAge, 0),
		forgetAfter: forgetAfter(maxAge),
		base:        time.Now(),
		topics:      make(map[string]*histRecord),
	}
}

type memoryHistory struct {
	messages    int
	maxAge      time.Duration // 0: no limit
	forgetAfter time.Duration // 0: never, but for the record cap
	base        time.Time     // times are durations since base: monotonic, and 8 bytes each
	mu          sync.Mutex    // guards the fields below and every record
	topics      map[string]*histRecord
	peak        shrink.Peak // of topics
	// Records in two lists ordered by touched, so that the idle ones and
	// the one to evict are found without a scan: those of topics that
	// have had a message, and those Since made for topics that have not
	// (a subscription to a topic nobody publishes to), which are bounded
	// apart, so that clients subscribing to made-up topics cannot make
	// the history hold much.
	kept, empty recordList
}

// recordList is a list of records, oldest first.
type recordList struct {
	oldest, newest *histRecord
	n              int
}

// link puts r at the newest end.
func (l *recordList) link(r *histRecord) {
	r.prev, r.next = l.newest, nil
	if l.newest != nil {
		l.newest.next = r
	} else {
		l.oldest = r
	}
	l.newest = r
	l.n++
}

func (l *recordList) unlink(r *histRecord) {
	if r.prev != nil {
		r.prev.next = r.next
	} else {
		l.oldest = r.next
	}
	if r.next != nil {
		r.next.prev = r.prev
	} else {
		l.newest = r.prev
	}
	r.prev, r.next = nil, nil
	l.n--
}

// histRecord is a topic's history. Its ring holds the seqs
// seq-ring.len()+1 to seq, oldest first, so a seq's entry is found by
// arithmetic.
type histRecord struct {
	topic      string
	epoch      string
	seq        uint64
	ring       fifo[histItem]
	touched    time.Duration // last Append, or creation: when the record goes idle
	appended   bool          // it has had a message: it is in kept, not empty
	prev, next *histRecord
}

type histItem struct {
	seq  uint64
	data []byte
	at   time.Duration
}

func (h *memoryHistory) Append(_ context.Context, topic string, data []byte) (Position, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Since(h.base)
	r := h.recordLocked(topic, now)
	if r.seq == maxSeq {
		// Forget the old epoch's messages: their seqs would collide with
		// the new epoch's in the ring.
		r.epoch, r.seq, r.ring = newEpoch(), 0, fifo[histItem]{}
	}
	r.seq++
	if h.messages > 0 {
		if r.ring.len() == h.messages {
			r.ring.pop()
		}
		r.ring.push(histItem{seq: r.seq, data: data, at: now}, h.messages)
	}
	r.touched = now
	h.listOf(r).unlink(r) // from empty, on its first message
	r.appended = true
	h.kept.link(r)
	return Position{Epoch: r.epoch, Seq: r.seq}, nil
}

func (h *memoryHistory) Since(_ context.Context, topic string, pos Position) ([]HistoryEntry, Position, bool, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	// An unknown topic gets its record now, so the epoch returned is the
	// one the next Append will use and the client's position stays valid.
	r := h.recordLocked(topic, time.Since(h.base))
	last := Position{Epoch: r.epoch, Seq: r.seq}
	if pos.Epoch != r.epoch || pos.Seq > r.seq {
		return nil, last, false, nil
	}
	missed := r.seq - pos.Seq // the ring holds the last ring.len() seqs
	if missed > uint64(r.ring.len()) {
		return nil, last, false, nil
	}
	if missed == 0 {
		return nil, last, true, nil
	}
	entries := make([]HistoryEntry, missed)
	first := r.ring.len() - int(missed)
	for i := range entries {
		it := r.ring.at(first + i)
		entries[i] = HistoryEntry{Seq: it.seq, Data: it.data}
	}
	return entries, last, true, nil
}

// recordLocked returns topic's record, creating it if needed, with its
// expired messages dropped. It first forgets a few idle records, and
// treats topic's own as forgotten if it is idle, so that whether a topic
// keeps its epoch does not depend on when the sweep ran.
func (h *memoryHistory) recordLocked(topic string, now time.Duration) *histRecord {
	for range sweepBatch {
		if h.kept.oldest == nil || !h.idle(h.kept.oldest, now) {
			break
		}
		h.forgetLocked(h.kept.oldest)
	}
	for range sweepBatch {
		if h.empty.oldest == nil || !h.idle(h.empty.oldest, now) {
			break
		}
		h.forgetLocked(h.empty.oldest)
	}
	r := h.topics[topic]
	if r != nil && h.idle(r, now) {
		h.forgetLocked(r)
		r = nil
	}
	if r == nil {
		switch {
		case h.empty.n >= maxEmptyRecords:
			h.forgetLocked(h.empty.oldest)
		case len(h.topics) >= maxHistoryRecords:
			if h.empty.oldest != nil {
				h.forgetLocked(h.empty.oldest)
			} else {
				h.forgetLocked(h.kept.oldest)
			}
		}
		r = &histRecord{topic: topic, epoch: newEpoch(), touched: now}
		h.topics[topic] = r
		h.peak.Grew(len(h.topics))
		h.empty.link(r)
		return r
	}
	for r.ring.len() > 0 && h.expired(r.ring.at(0).at, now) {
		r.ring.pop()
	}
	return r
}

// idle reports whether record r is forgotten at now: after forgetAfter,
// at least an hour, from its last message, so that a quiet topic whose
// subscribers missed nothing keeps its epoch, and they need not resync;
// after emptyForgetAfter from its creation for a topic that never had a
// message. Forgetting one costs its subscribers nothing while they stay
// (their first message, seq 1 of a new epoch, follows on from seq 0); a
// subscriber that comes back after it was forgotten resyncs.
func (h *memoryHistory) idle(r *histRecord, now time.Duration) bool {
	if !r.appended {
		return now-r.touched > emptyForgetAfter
	}
	return h.forgetAfter > 0 && now-r.touched > h.forgetAfter
}

// Bounds on the records of topics that never had a message: about 200
// bytes each with the index's share, so 1.6 MiB at most, whatever clients
// subscribe to.
const (
	maxEmptyRecords  = 1 << 13
	emptyForgetAfter = 10 * time.Minute
)

// forgetAfter is how long a topic's record outlives its last message.
func forgetAfter(maxAge time.Duration) time.Duration {
	if maxAge <= 0 {
		return 0
	}
	return max(maxAge, time.Hour)
}

// expired reports whether something that happened at t is older than
// maxAge.
func (h *memoryHistory) expired(t, now time.Duration) bool {
	return h.maxAge > 0 && now-t > h.maxAge
}

func (h *memoryHistory) forgetLocked(r *histRecord) {
	h.listOf(r).unlink(r)
	delete(h.topics, r.topic)
	h.topics = shrink.Map(h.topics, &h.peak)
}

// listOf returns the list r is in.
func (h *memoryHistory) listOf(r *histRecord) *recordList {
	if r.appended {
		return &h.kept
	}
	return &h.empty
}

// newEpoch returns a random epoch. 64 bits make a repeat, which could let
// a client resume across a gap, negligible; base64 keeps it to 11 bytes in
// every message.
func newEpoch() string {
	var b [8]byte
	rand.Read(b[:]) // never fails: it crashes the program instead
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// fifo is a queue backed by a ring that grows with use up to a limit, so
// a topic or user with few messages costs little. History and the offline
// store both use it. It is not safe for concurrent use.
type fifo[T any] struct {
	buf  []T
	head int
	n    int
}

func (q *fifo[T]) len() int { return q.n }

// at returns the i-th oldest element, 0 <= i < len().
func (q *fifo[T]) at(i int) *T { return &q.buf[(q.head+i)%len(q.buf)] }

// push appends v, growing the ring up to limit elements. The caller keeps
// len() below limit.
func (q *fifo[T]) push(v T, limit int) {
	if q.n == len(q.buf) {
		buf := make([]T, min(max(2*len(q.buf), 4), max(limit, q.n+1)))
		for i := range q.n {
			buf[i] = *q.at(i)
		}
		q.buf, q.head = buf, 0
	}
	*q.at(q.n) = v
	q.n++
}

// pop removes and returns the oldest element; the queue must not be empty.
func (q *fifo[T]) pop() T {
	var zero T
	v := q.buf[q.head]
	q.buf[q.head] = zero // let the data go
	q.head = (q.head + 1) % len(q.buf)
	q.n--
	return v
}
