package tether

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"net"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/internal/queue"
	"github.com/tether-ws/tether/internal/wire"
)

// This file is a conn's write side: the send queue, the writer goroutine
// that drains it (joining queued protocol v1 messages into one frame), and
// the write timeout that drops a peer that does not read.

// Send queues a text message and returns at once; a writer goroutine sends
// it within the write timeout. data must be valid UTF-8
// ([ErrInvalidUTF8] otherwise). Send keeps no reference to data.
//
// When the queue is full (see [Limits]), the overflow policy decides:
// with Disconnect, Send returns [ErrQueueFull] and the conn closes with
// [StatusSlowConsumer], the close frame going out right after the write in
// flight; with DropNewest it returns [ErrQueueFull] and the conn stays; with
// DropOldest older messages make room and Send succeeds. A message larger
// than the queue's byte bound can never fit: Send returns [ErrQueueFull]
// and, whatever the policy, the conn stays.
// After the conn has ended, Send returns an error that wraps
// [net.ErrClosed]. ctx is only checked on entry: Send never blocks.
//
// On a conn that speaks protocol v1, data travels in a protocol message:
// a hub conn sends it as a direct msg, a [Client]'s conn as a send
// (see PROTOCOL.md).
func (c *Conn) Send(ctx context.Context, data []byte) error { return c.send(ctx, data, false) }

// SendBinary is [Conn.Send] for bytes, sent in a binary message (on a v1
// conn, after a protocol line in one).
func (c *Conn) SendBinary(ctx context.Context, data []byte) error { return c.send(ctx, data, true) }

func (c *Conn) send(ctx context.Context, data []byte, binary bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !c.coalesce {
		if !binary && !utf8.Valid(data) {
			return fmt.Errorf("tether: send: %w", ErrInvalidUTF8)
		}
		return c.enqueue(rawEntry(data, binary))
	}
	kind, body, err := kindOf(data, binary)
	if err != nil {
		return fmt.Errorf("tether: send: %w", err)
	}
	// A protocol v1 peer reads protocol messages: data travels as a direct
	// msg from a hub, as a send to the server application from a client.
	buf := make([]byte, 0, len(body)+len(`?{"op":"send","len":,"text":true}`)+24)
	if c.pings != nil {
		return c.enqueue(appendEntry(buf, kind, func(b []byte) []byte { return wire.AppendSendOf(b, kind, body, "") }))
	}
	return c.enqueue(appendEntry(buf, kind, func(b []byte) []byte { return wire.AppendMsgOf(b, "", "", 0, kind, body) }))
}

// enqueue queues msg, which the caller gives up: it may be shared by many
// conns, and is never written to.
func (c *Conn) enqueue(msg []byte) error { return c.enqueueAt(msg, PriorityNormal, 0) }

// lanes are a conn's queues for topics of high and low priority, made on
// first use: most conns never need them.
type lanes struct{ high, low queue.Queue }

// enqueueAt queues msg, of priority prio, as enqueue does. A key other
// than 0 is a latest-value topic's: msg takes the place of a message of
// the same key still queued, if any. When the queues are full, room is
// made by dropping low-priority messages first, oldest first; a
// low-priority message that finds no room is dropped, without closing the
// conn, and a high-priority one makes room by dropping normal ones; only
// then does the overflow policy apply.
func (c *Conn) enqueueAt(msg []byte, prio Priority, key uint64) error {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return fmt.Errorf("tether: send: %w", net.ErrClosed)
	}
	if len(msg) > c.cfg.queueBytes {
		c.mu.Unlock()
		// The caller's mistake, not a slow peer: nothing to drop or close.
		return fmt.Errorf("%w: a message of %d bytes exceeds the queue's %d", ErrQueueFull, len(msg), c.cfg.queueBytes)
	}
	lane := c.laneLocked(prio)
	dropped, ok := 0, true
	switch {
	case key != 0 && lane.Replace(key, msg):
		dropped = 1 // the older value, never to be written
	default:
		dropped, ok = c.makeRoomLocked(len(msg), prio)
		if ok {
			lane.PushKey(msg, key)
		}
	}
	if ok && !c.writing {
		c.writing = true
		c.startWriterLocked()
	}
	c.mu.Unlock()
	refused := !ok && (c.cfg.overflow != Disconnect || prio < PriorityNormal)
	if dropped > 0 || refused {
		if f := c.cfg.observer.Drop; f != nil {
			f(c, max(dropped, 1))
		}
	}
	if ok {
		return nil
	}
	if c.cfg.overflow == Disconnect && prio >= PriorityNormal {
		c.end(ErrQueueFull, endPolicy, StatusSlowConsumer, "slow consumer")
	}
	return ErrQueueFull
}

// laneLocked returns the queue of priority prio, making the lanes if
// needed.
func (c *Conn) laneLocked(prio Priority) *queue.Queue {
	if prio == PriorityNormal {
		return &c.queue
	}
	if c.lanes == nil {
		c.lanes = new(lanes)
	}
	if prio > PriorityNormal {
		return &c.lanes.high
	}
	return &c.lanes.low
}

// makeRoomLocked makes room in the data lanes for one more message of n
// bytes and priority prio, as enqueueAt says, and returns how many queued
// messages it dropped and whether there is room now.
func (c *Conn) makeRoomLocked(n int, prio Priority) (dropped int, ok bool) {
	for {
		msgs, bytes := c.queue.Len()
		var low, high *queue.Queue
		if l := c.lanes; l != nil {
			low, high = &l.low, &l.high
			lm, lb := low.Len()
			hm, hb := high.Len()
			msgs, bytes = msgs+lm+hm, bytes+lb+hb
		}
		if msgs+1 <= c.cfg.queueMessages && bytes+n <= c.cfg.queueBytes {
			return dropped, true
		}
		switch {
		case low != nil && drop(low): // low priority goes first
		case prio < PriorityNormal: // and never displaces the others
			return dropped, false
		case prio > PriorityNormal && drop(&c.queue):
		case c.cfg.overflow != DropOldest:
			return dropped, false
		// DropOldest: the oldest of the message's own priority.
		case prio == PriorityNormal && drop(&c.queue):
		case prio > PriorityNormal && high != nil && drop(high):
		default:
			return dropped, false
		}
		dropped++
	}
}

// drop drops q's oldest message, if any.
func drop(q *queue.Queue) bool {
	_, ok := q.Pop()
	return ok
}

// maxControlBytes bounds a conn's control lane. What it holds answers the
// peer's own requests, which the rate limit bounds (a burst of 200 subs is
// 200 acks and 200 presence snapshots of at most 100 members), and presence
// changes, one per topic per interval: only a peer that stops reading
// fills it, and the write timeout drops such a peer first.
const maxControlBytes = 4 << 20

// enqueueControl queues msg, one of the protocol's own messages, on the
// control lane: ahead of queued data, outside the send queue's bounds and
// its overflow policy. Past maxControlBytes the conn ends with
// ErrQueueFull and StatusSlowConsumer.
func (c *Conn) enqueueControl(msg []byte) error {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return fmt.Errorf("tether: send: %w", net.ErrClosed)
	}
	_, ok := c.control.Push(msg, math.MaxInt, maxControlBytes, false)
	if ok && !c.writing {
		c.writing = true
		c.startWriterLocked()
	}
	c.mu.Unlock()
	if !ok {
		c.end(ErrQueueFull, endPolicy, StatusSlowConsumer, "slow consumer")
		return ErrQueueFull
	}
	return nil
}

// enqueueAll queues msgs past the queue's bounds: for what the hub owes a
// conn as it starts or subscribes (an offline backlog, a replay), which is
// bounded by the offline store or the history rather than by the queue,
// and must not be lost to it. Messages queued afterwards meet a fuller
// queue, so a peer too slow to take the backlog is handled by the
// overflow policy as usual.
// It reports false, queueing nothing, if the conn has ended.
func (c *Conn) enqueueAll(msgs ...[]byte) bool { return c.enqueueAllAt(PriorityNormal, msgs...) }

// enqueueAllAt is enqueueAll onto the lane of priority prio: a topic's
// replay goes where its live messages go, so that they stay in order.
func (c *Conn) enqueueAllAt(prio Priority, msgs ...[]byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return false
	}
	lane := c.laneLocked(prio)
	for _, m := range msgs {
		lane.PushKey(m, 0)
	}
	if !c.writing && len(msgs) > 0 {
		c.writing = true
		c.startWriterLocked()
	}
	return true
}

// startWriterLocked starts the conn's writer, on one of the hub's writer
// workers if it has them (see internal/workers for why). c.writing must
// have just been set, under c.mu.
func (c *Conn) startWriterLocked() {
	c.wg.Add(1)
	if w := c.cfg.writers; w != nil {
		w.Go(c.writeLoop)
		return
	}
	go c.writeLoop()
}

func (c *Conn) writeLoop() {
	defer c.wg.Done()
	// The timeout is a timer that ends the conn with its reason before
	// anything closes the socket, so the reader cannot report the aborted
	// socket first. One timer serves the whole run.
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	var batch *frameBatch
	if c.park != nil {
		batch = frameBatches.Get().(*frameBatch)
		defer frameBatches.Put(batch)
	}
	for {
		c.mu.Lock()
		if batch != nil {
			// The socket is the conn's own: everything queued goes out
			// in one vectored write of frames encoded here.
			if c.batchLocked(batch) {
				c.mu.Unlock()
				if !c.writeBatch(batch, &timer) {
					return
				}
				continue
			}
		}
		msg, ok := c.popLocked()
		if !ok {
			c.writing = false
			code, text := c.closeCode, c.closeText
			c.mu.Unlock()
			if code != 0 {
				// The peer's close reply ends the reader; errors here mean
				// the peer is gone, which the reader reports.
				_ = c.ws.Close(code, text)
			}
			return
		}
		var joined *[]byte
		var bin bool
		if c.coalesce {
			msg, joined, bin = c.coalesceLocked(msg)
		} else {
			msg, bin = wire.Untag(msg)
		}
		c.mu.Unlock()

		typ := websocket.MessageText
		if bin {
			typ = websocket.MessageBinary
		}
		if !c.timedWrite(&timer, func() error {
			err := c.ws.Write(c.ioCtx, typ, msg)
			if joined != nil {
				frameBufs[frameBufClass(cap(*joined))].Put(joined)
			}
			return err
		}) {
			return
		}
	}
}

// popLocked pops the next message to write: the control lane's first,
// then high-priority, normal, low-priority messages.
func (c *Conn) popLocked() ([]byte, bool) {
	qs, n := c.lanesLocked()
	for _, q := range qs[:n] {
		if m, ok := q.Pop(); ok {
			return m, true
		}
	}
	return nil, false
}

// peekLocked is popLocked without the pop.
func (c *Conn) peekLocked() ([]byte, bool) {
	qs, n := c.lanesLocked()
	for _, q := range qs[:n] {
		if m, ok := q.Peek(); ok {
			return m, true
		}
	}
	return nil, false
}

// lanesLocked returns the conn's n queues in the order they are written.
func (c *Conn) lanesLocked() (qs [4]*queue.Queue, n int) {
	if l := c.lanes; l != nil {
		return [4]*queue.Queue{&c.control, &l.high, &c.queue, &l.low}, 4
	}
	return [4]*queue.Queue{&c.control, &c.queue}, 2
}

// A frameBatch is what a writer sends in vectored writes: whole frames,
// each a header encoded here and the queued messages themselves, shared
// with every other conn they were queued on. A raw peer's message is a
// frame of its own; a v1 peer's messages are joined, newline-separated,
// in frames of up to maxCoalesced, without being copied. The frames go
// out in chunks of about maxChunk bytes, each one write, between which a
// ping or a pong can go; a message longer than maxChunk is sent in
// fragments of maxChunk (RFC 6455, section 5.4), so that it does not
// hold the socket either.
type frameBatch struct {
	frames net.Buffers // the chunk being written, consumed by the write
	vec    [][]byte    // every chunk's buffers, kept to be reused
	cuts   []int       // where in vec each chunk ends
	hdrs   []byte      // the headers' bytes
	chunk  int         // bytes in vec since the last cut
}

// A batch holds at most maxBatchMessages messages and, past its first,
// maxBatchBytes bytes, in chunks of maxChunk.
const (
	maxBatchMessages = 1024
	maxBatchBytes    = 256 << 10
	maxChunk         = 64 << 10
)

var frameBatches = sync.Pool{New: func() any {
	return &frameBatch{vec: make([][]byte, 0, 2*maxBatchMessages+16), hdrs: make([]byte, 0, 256)}
}}

var newline = []byte{'\n'}

// WebSocket opcodes (RFC 6455, section 5.2).
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
)

func opOf(binary bool) byte {
	if binary {
		return opBinary
	}
	return opText
}

// header appends to b the header of a server (unmasked) frame of n bytes
// and returns it.
func (b *frameBatch) header(fin bool, op byte, n int) []byte {
	if fin {
		op |= 0x80
	}
	at := len(b.hdrs)
	switch {
	case n < 126:
		b.hdrs = append(b.hdrs, op, byte(n))
	case n <= 0xffff:
		b.hdrs = append(b.hdrs, op, 126, byte(n>>8), byte(n))
	default:
		b.hdrs = binary.BigEndian.AppendUint64(append(b.hdrs, op, 127), uint64(n))
	}
	// Capped, so that a later append never writes into it; the slice
	// keeps its bytes even if hdrs grows into a new array.
	return b.hdrs[at:len(b.hdrs):len(b.hdrs)]
}

// frameDone notes that a frame of n bytes ends at the end of vec, and
// cuts a chunk there once the chunk holds maxChunk bytes.
func (b *frameBatch) frameDone(n int) {
	if b.chunk += n; b.chunk >= maxChunk {
		b.cut()
	}
}

func (b *frameBatch) cut() {
	if b.chunk > 0 {
		b.cuts = append(b.cuts, len(b.vec))
		b.chunk = 0
	}
}

// message adds m as a message of its own: one frame, or fragments of
// maxChunk.
func (b *frameBatch) message(op byte, m []byte) {
	for {
		part := m[:min(len(m), maxChunk)]
		m = m[len(part):]
		h := b.header(len(m) == 0, op, len(part))
		b.vec = append(b.vec, h, part)
		b.frameDone(len(h) + len(part))
		if len(m) == 0 {
			return
		}
		op = opContinuation
	}
}

// batchLocked fills b with the messages queued, and reports whether it
// took any. c.mu must be held.
func (c *Conn) batchLocked(b *frameBatch) bool {
	b.vec, b.cuts, b.hdrs, b.chunk = b.vec[:0], b.cuts[:0], b.hdrs[:0], 0
	msgs, size := 0, 0
	for msgs < maxBatchMessages && size < maxBatchBytes {
		m, ok := c.popLocked()
		if !ok {
			break
		}
		msgs++
		size += len(m)
		body, bin := wire.Untag(m)
		if !c.coalesce {
			b.message(opOf(bin), body) // a raw peer's message is a frame of its own
			continue
		}
		next, more := c.peekLocked()
		if !more || len(body)+len(next) >= maxCoalesced {
			b.message(opOf(bin), body)
			continue
		}
		// A v1 message: body and the entries behind it that fit, binary
		// if any of them is.
		first, payload := len(b.vec), len(body)
		b.vec = append(b.vec, nil, body)
		for more && msgs < maxBatchMessages {
			nb, nbin := wire.Untag(next)
			if payload+1+len(nb) > maxCoalesced {
				break
			}
			c.popLocked()
			msgs++
			size += len(next)
			payload += 1 + len(nb)
			bin = bin || nbin
			b.vec = append(b.vec, newline, nb)
			next, more = c.peekLocked()
		}
		h := b.header(true, opOf(bin), payload)
		b.vec[first] = h
		b.frameDone(len(h) + payload)
	}
	b.cut()
	return msgs > 0
}

// writeBatch writes b's chunks, each within the write timeout, armed on
// *timer, and reports whether the writer goes on: not once the conn has
// ended.
func (c *Conn) writeBatch(b *frameBatch, timer **time.Timer) bool {
	defer clear(b.vec) // the messages may be freed
	from := 0
	for _, to := range b.cuts {
		b.frames = b.vec[from:to:to] // a ping appended must not overwrite the next chunk
		from = to
		if !c.timedWrite(timer, func() error { return c.park.WriteFrames(&b.frames) }) {
			return false
		}
	}
	return true
}

// timedWrite runs write within the write timeout, armed on *timer (made
// on first use; one timer serves a writer's whole run), notes when it
// completed and whether it waited for the peer to drain the socket, and
// reports whether the writer goes on: not once the conn has ended, by the
// timeout or by the write's failure.
func (c *Conn) timedWrite(timer **time.Timer, write func() error) bool {
	if *timer == nil {
		*timer = time.AfterFunc(c.cfg.writeTimeout, c.writeTimedOut)
	} else {
		(*timer).Reset(c.cfg.writeTimeout)
	}
	began := time.Now()
	err := write()
	ended := time.Now()
	if !(*timer).Stop() {
		return false // timed out: the conn has ended
	}
	if err != nil {
		c.end(because("tether: connection lost", err, ErrConnLost), endForced, 0, "")
		return false
	}
	at := int64(ended.Sub(c.hb.born))
	c.hb.lastWrite.Store(at)
	if ended.Sub(began) >= drainWait {
		c.hb.lastDrain.Store(at)
	}
	return true
}

// drainWait: a write that took this long waited for the socket, which the
// peer had to drain by reading; a write into a socket with room takes
// microseconds.
const drainWait = time.Millisecond

// maxCoalesced bounds a frame of joined messages: large enough that one
// write carries hundreds of small messages, small enough that a peer's
// read limit of 64 KiB, the common default, is never hit by joining.
const maxCoalesced = 32 << 10

// frameBufs holds the buffers writers join messages in, in size classes
// of 1, 4 and 32 KiB, so that a writer that comes and goes with bursts
// does not allocate one each time, and a frame of a few small messages
// does not hold 32 KiB.
var frameBufs = [...]sync.Pool{
	{New: func() any { b := make([]byte, 0, 1<<10); return &b }},
	{New: func() any { b := make([]byte, 0, 4<<10); return &b }},
	{New: func() any { b := make([]byte, 0, maxCoalesced); return &b }},
}

func frameBufClass(n int) int {
	switch {
	case n <= 1<<10:
		return 0
	case n <= 4<<10:
		return 1
	}
	return 2
}

// coalesceLocked joins first and the entries queued behind it, the
// control lane's then the data's, as many as fit in maxCoalesced, with
// newlines (protocol v1 framing). It returns the message to write, whether
// it is binary (any entry was), and, when it joined any, the pooled buffer
// that holds it, to give back once written. c.mu must be held.
func (c *Conn) coalesceLocked(first []byte) ([]byte, *[]byte, bool) {
	body, bin := wire.Untag(first)
	size, more := len(body), 0
	fits := func(m []byte) bool {
		m, _ = wire.Untag(m)
		if size+1+len(m) > maxCoalesced {
			return false
		}
		size += 1 + len(m)
		more++
		return true
	}
	qs, nq := c.lanesLocked()
	for _, q := range qs[:nq] {
		n, _ := q.Len()
		before := more
		q.Each(fits)
		if more-before < n {
			break // the next one does not fit: keep the order
		}
	}
	if more == 0 {
		return body, nil, bin
	}
	buf := frameBufs[frameBufClass(size)].Get().(*[]byte)
	b := append((*buf)[:0], body...)
	for range more {
		m, _ := c.popLocked()
		m, mbin := wire.Untag(m)
		bin = bin || mbin
		b = append(append(b, '\n'), m...)
	}
	*buf = b
	return b, buf, bin
}

func (c *Conn) writeTimedOut() { c.end(ErrWriteTimeout, endForced, 0, "") }

// goWrite runs a write of the heartbeat's in a goroutine the conn owns,
// bounded by the write timeout like any write: a peer that does not read
// is dropped with ErrWriteTimeout, not waited for.
func (c *Conn) goWrite(write func()) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		timer := time.AfterFunc(c.cfg.writeTimeout, c.writeTimedOut)
		write()
		timer.Stop()
	}()
}
