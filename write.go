package tether

import (
	"context"
	"fmt"
	"math"
	"net"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/internal/wire"
)

// This file is a conn's write side: the send queue, the writer goroutine
// that drains it (joining queued protocol v1 messages into one frame), and
// the write timeout that drops a peer that does not read.

// Send queues a text message and returns at once; a writer goroutine sends
// it within the write timeout. Send keeps no reference to data.
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
// On a conn that speaks protocol v1, data must be a JSON value, and
// anything else returns [ErrNotJSON]: a hub conn sends it as a direct msg,
// a [Client]'s conn as a send (see PROTOCOL.md).
func (c *Conn) Send(ctx context.Context, data []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !c.coalesce {
		return c.enqueue(append([]byte(nil), data...))
	}
	// A protocol v1 peer reads protocol messages: data travels as a direct
	// msg from a hub, as a send to the server application from a client.
	raw, err := wire.CompactData(data)
	if err != nil {
		return fmt.Errorf("tether: send: %w", ErrNotJSON)
	}
	buf := make([]byte, 0, len(raw)+len(`{"op":"send","data":}`))
	if c.pings != nil {
		return c.enqueue(wire.AppendSend(buf, raw, ""))
	}
	return c.enqueue(wire.AppendMsg(buf, "", "", 0, raw))
}

// enqueue queues msg, which the caller gives up: it may be shared by many
// conns, and is never written to.
func (c *Conn) enqueue(msg []byte) error {
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
	dropped, ok := c.queue.Push(msg, c.cfg.queueMessages, c.cfg.queueBytes, c.cfg.overflow == DropOldest)
	if ok && !c.writing {
		c.writing = true
		c.wg.Add(1)
		go c.writeLoop()
	}
	c.mu.Unlock()
	if dropped > 0 || !ok && c.cfg.overflow == DropNewest {
		if f := c.cfg.observer.Drop; f != nil {
			f(c, max(dropped, 1))
		}
	}
	if ok {
		return nil
	}
	if c.cfg.overflow == Disconnect {
		c.end(ErrQueueFull, endPolicy, StatusSlowConsumer, "slow consumer")
	}
	return ErrQueueFull
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
		c.wg.Add(1)
		go c.writeLoop()
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
func (c *Conn) enqueueAll(msgs ...[]byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return false
	}
	for _, m := range msgs {
		c.queue.Push(m, math.MaxInt, math.MaxInt, false)
	}
	if !c.writing && len(msgs) > 0 {
		c.writing = true
		c.wg.Add(1)
		go c.writeLoop()
	}
	return true
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
	for {
		c.mu.Lock()
		msg, ok := c.control.Pop()
		if !ok {
			msg, ok = c.queue.Pop()
		}
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
		if c.coalesce {
			msg, joined = c.coalesceLocked(msg)
		}
		c.mu.Unlock()

		if timer == nil {
			timer = time.AfterFunc(c.cfg.writeTimeout, c.writeTimedOut)
		} else {
			timer.Reset(c.cfg.writeTimeout)
		}
		began := time.Now()
		err := c.ws.Write(c.ioCtx, websocket.MessageText, msg)
		ended := time.Now()
		if joined != nil {
			frameBufs[frameBufClass(cap(*joined))].Put(joined)
		}
		if !timer.Stop() {
			return // timed out: the conn has ended
		}
		if err != nil {
			c.end(because("tether: connection lost", err, ErrConnLost), endForced, 0, "")
			return
		}
		at := int64(ended.Sub(c.hb.born))
		c.hb.lastWrite.Store(at)
		if ended.Sub(began) >= drainWait {
			c.hb.lastDrain.Store(at)
		}
	}
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

// coalesceLocked joins first and the messages queued behind it, the
// control lane's then the data's, as many as fit in maxCoalesced, with
// newlines (protocol v1 framing). It returns the frame to write and, when
// it joined any, the pooled buffer that holds it, to give back once
// written. c.mu must be held.
func (c *Conn) coalesceLocked(first []byte) ([]byte, *[]byte) {
	size, fromControl, fromData := len(first), 0, 0
	fits := func(n *int) func([]byte) bool {
		return func(m []byte) bool {
			if size+1+len(m) > maxCoalesced {
				return false
			}
			size += 1 + len(m)
			*n++
			return true
		}
	}
	c.control.Each(fits(&fromControl))
	if n, _ := c.control.Len(); fromControl == n {
		c.queue.Each(fits(&fromData))
	}
	if fromControl+fromData == 0 {
		return first, nil
	}
	buf := frameBufs[frameBufClass(size)].Get().(*[]byte)
	b := append((*buf)[:0], first...)
	for range fromControl {
		m, _ := c.control.Pop()
		b = append(append(b, '\n'), m...)
	}
	for range fromData {
		m, _ := c.queue.Pop()
		b = append(append(b, '\n'), m...)
	}
	*buf = b
	return b, buf
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
