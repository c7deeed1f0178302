package tether

// sendQueue is a FIFO of messages bounded in count and bytes. Its ring
// grows with use and is released when drained after a burst, so an idle
// conn's queue costs at most a few words. It is not safe for concurrent use: Conn.mu guards it.
// keptRing is the largest ring kept once drained: small enough to be cheap
// on an idle conn, large enough that steady traffic does not reallocate.
const keptRing = 8

type sendQueue struct {
	ring  [][]byte
	head  int
	n     int
	bytes int
}

// push appends msg if it fits within maxMsgs and maxBytes. If it does not
// and dropOldest is set, the oldest messages are dropped to make room.
// It returns how many were dropped and whether msg was queued.
func (q *sendQueue) push(msg []byte, maxMsgs, maxBytes int, dropOldest bool) (dropped int, ok bool) {
	if len(msg) > maxBytes {
		return 0, false // could never fit: dropping everything would not help
	}
	for q.n+1 > maxMsgs || q.bytes+len(msg) > maxBytes {
		if !dropOldest {
			return dropped, false
		}
		q.pop()
		dropped++
	}
	if q.n == len(q.ring) {
		q.grow(maxMsgs)
	}
	q.ring[(q.head+q.n)%len(q.ring)] = msg
	q.n++
	q.bytes += len(msg)
	return dropped, true
}

func (q *sendQueue) grow(maxMsgs int) {
	size := min(max(2*len(q.ring), 4), maxMsgs)
	ring := make([][]byte, size)
	for i := range q.n {
		ring[i] = q.ring[(q.head+i)%len(q.ring)]
	}
	q.ring, q.head = ring, 0
}

func (q *sendQueue) pop() ([]byte, bool) {
	if q.n == 0 {
		if len(q.ring) > keptRing {
			q.reset() // drained after a burst: give the memory back
		}
		return nil, false
	}
	msg := q.ring[q.head]
	q.ring[q.head] = nil
	q.head = (q.head + 1) % len(q.ring)
	q.n--
	q.bytes -= len(msg)
	return msg, true
}

// peek returns the oldest message without removing it.
func (q *sendQueue) peek() ([]byte, bool) {
	if q.n == 0 {
		return nil, false
	}
	return q.ring[q.head], true
}

// len returns the number of queued messages and their bytes.
func (q *sendQueue) len() (msgs, bytes int) { return q.n, q.bytes }

func (q *sendQueue) reset() { *q = sendQueue{} }
