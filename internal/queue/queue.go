// Package queue holds a connection's send queue.
package queue

import "sync"

// Queue is a FIFO of messages bounded in count and bytes. It is a list
// of fixed-size chunks shared through a pool: an idle conn's queue holds
// no chunk, and a busy one takes chunks from the pool and gives them back
// as it drains, so fan-out to many conns allocates nothing per message in
// the steady state. It is not safe for concurrent use: the conn's lock guards it.
type Queue struct {
	head, tail *queueChunk
	hi, ti     int // next read in head, next write in tail
	n          int
	bytes      int
}

// queueChunkLen messages fit in one chunk: 520 bytes, so that a conn with
// a short burst queued holds little.
const queueChunkLen = 16

type queueChunk struct {
	msgs [queueChunkLen][]byte
	keys [queueChunkLen]uint64 // for Replace; 0: none
	next *queueChunk
}

var queueChunks = sync.Pool{New: func() any { return new(queueChunk) }}

// Push appends msg if it fits within maxMsgs and maxBytes. If it does not
// and dropOldest is set, the oldest messages are dropped to make room.
// It returns how many were dropped and whether msg was queued.
func (q *Queue) Push(msg []byte, maxMsgs, maxBytes int, dropOldest bool) (dropped int, ok bool) {
	if len(msg) > maxBytes {
		return 0, false // could never fit: dropping everything would not help
	}
	for q.n+1 > maxMsgs || q.bytes+len(msg) > maxBytes {
		if !dropOldest {
			return dropped, false
		}
		q.Pop()
		dropped++
	}
	q.PushKey(msg, 0)
	return dropped, true
}

// PushKey appends msg, whatever the bounds, with key for [Queue.Replace]
// (0 for none).
func (q *Queue) PushKey(msg []byte, key uint64) {
	if q.tail == nil || q.ti == queueChunkLen {
		c := queueChunks.Get().(*queueChunk)
		if q.tail == nil {
			q.head, q.hi = c, 0
		} else {
			q.tail.next = c
		}
		q.tail, q.ti = c, 0
	}
	q.tail.msgs[q.ti] = msg
	q.tail.keys[q.ti] = key
	q.ti++
	q.n++
	q.bytes += len(msg)
}

// Replace puts msg in the place of the queued message pushed with key,
// which must not be 0, and reports whether there was one. It scans the
// queue: O(length). It checks no bound: a larger msg may take the queue
// past the bytes it was pushed within, until it drains.
func (q *Queue) Replace(key uint64, msg []byte) bool {
	c, i := q.head, q.hi
	for range q.n {
		if i == queueChunkLen {
			c, i = c.next, 0
		}
		if c.keys[i] == key {
			q.bytes += len(msg) - len(c.msgs[i])
			c.msgs[i] = msg
			return true
		}
		i++
	}
	return false
}

// Peek returns the oldest message without removing it.
func (q *Queue) Peek() ([]byte, bool) {
	if q.n == 0 {
		return nil, false
	}
	return q.head.msgs[q.hi], true
}

// Each calls f with each queued message, oldest first, until f returns
// false.
func (q *Queue) Each(f func([]byte) bool) {
	c, i := q.head, q.hi
	for range q.n {
		if i == queueChunkLen {
			c, i = c.next, 0
		}
		if !f(c.msgs[i]) {
			return
		}
		i++
	}
}

func (q *Queue) Pop() ([]byte, bool) {
	if q.n == 0 {
		return nil, false
	}
	msg := q.head.msgs[q.hi]
	q.head.msgs[q.hi], q.head.keys[q.hi] = nil, 0
	q.hi++
	q.n--
	q.bytes -= len(msg)
	switch {
	case q.n == 0:
		q.Reset() // drained: the chunk goes back to the pool
	case q.hi == queueChunkLen:
		done := q.head
		q.head, q.hi = done.next, 0
		done.next = nil
		queueChunks.Put(done)
	}
	return msg, true
}

// Len returns the number of queued messages and their bytes.
func (q *Queue) Len() (msgs, bytes int) { return q.n, q.bytes }

// Reset drops every message and gives the chunks back to the pool.
func (q *Queue) Reset() {
	for c := q.head; c != nil; {
		next := c.next
		*c = queueChunk{}
		queueChunks.Put(c)
		c = next
	}
	*q = Queue{}
}
