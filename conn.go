package tether

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/time/rate"
)

// Message is one inbound application message.
type Message struct {
	// Data is the message's payload, owned by the receiver.
	Data []byte
	// Binary is true for a binary frame, false for a text frame.
	Binary bool
}

// Inbound pings beyond this rate are a policy violation: a peer needs one
// ping per heartbeat interval, not hundreds per second.
const (
	pingRateLimit = 10 // per second, sustained
	pingBurst     = 20
)

// Conn is one live WebSocket connection with a heartbeat: the peer is
// pinged when it has been silent for the heartbeat interval and dropped when
// it has been silent for the timeout. It is safe for use by multiple
// goroutines.
//
// An idle conn from [Accept] on Linux holds no goroutine: its reader parks
// in a poller shared by all conns between messages (see park.go). Elsewhere,
// and for a wrapped conn, an idle conn costs one goroutine, its reader. A
// writer goroutine exists only while the send queue holds messages, and
// heartbeats are driven by a scheduler shared with other conns.
//
// Receive messages with the [OnMessage] option. Wait for the end with
// [Conn.Done], then read the reason with [Conn.Err].
type Conn struct {
	ws     *websocket.Conn
	nc     net.Conn // the socket, for an accepted conn; nil for a wrapped one
	cfg    *config
	sched  *scheduler
	remote string

	ctx    context.Context // cancelled when the conn ends
	cancel context.CancelFunc
	// ioCtx is passed to every read and write. For an accepted conn it is
	// context.Background(): coder/websocket then registers nothing per frame,
	// and closing nc aborts the I/O instead. A wrapped conn has no nc and
	// uses ctx.
	ioCtx context.Context
	hb    heartbeat

	pingLimiter *rate.Limiter // created at the first inbound ping; reader only
	// park lets an accepted conn's reader give its goroutine up while the
	// peer is quiet; nil where it cannot (see park.go).
	park *parkConn

	// hc is the conn's state in a Hub; nil for a conn made by Accept or
	// Wrap. coalesce joins queued messages into one frame, for protocol v1
	// peers, who split frames on newlines.
	hc       *hubConn
	coalesce bool
	// pings is set on a [Client]'s conns, which speak protocol v1 to a
	// hub: see protocolPings.
	pings *protocolPings

	mu        sync.Mutex // guards the fields below
	queue     sendQueue
	writing   bool // a writer goroutine owns the queue
	err       error
	closeCode websocket.StatusCode // graceful close to send once the queue is drained
	closeText string
	budget    *time.Timer // forces a graceful close that takes too long
	unsent    [][]byte    // a client conn's queue when it ended abruptly

	wg   sync.WaitGroup // writer, closer and ping goroutines
	done chan struct{}
}

// Accept upgrades an HTTP request to a WebSocket connection with a
// heartbeat. On failure it has already written an HTTP error response.
//
// Cross-origin requests are refused with 403 unless allowed by
// [WithOriginPatterns].
func Accept(w http.ResponseWriter, r *http.Request, opts ...Option) (*Conn, error) {
	cfg, err := newConfig(opts)
	if err != nil {
		http.Error(w, http.StatusText(http.StatusInternalServerError), http.StatusInternalServerError)
		return nil, err
	}
	c, err := accept(w, r, cfg)
	if err != nil {
		return nil, err
	}
	c.start()
	return c, nil
}

// accept upgrades the request to a conn that does not read yet: the hub
// registers it first, so that nothing it reads can precede its welcome.
func accept(w http.ResponseWriter, r *http.Request, cfg *config) (*Conn, error) {
	c := newConn(cfg, r.RemoteAddr)
	rw, hw := wrapForHijack(w)
	ws, err := websocket.Accept(rw, r, &websocket.AcceptOptions{
		Subprotocols:   cfg.subprotocols,
		OriginPatterns: cfg.originPatterns,
		OnPingReceived: c.onPing,
		OnPongReceived: c.onPong,
	})
	if err != nil {
		c.cancel()
		return nil, fmt.Errorf("tether: accept: %w", err)
	}
	if hw != nil && hw.nc != nil {
		c.nc, c.ioCtx = hw.nc, context.Background()
		if c.park = hw.park; c.park != nil {
			c.park.c = c
		}
	}
	c.ws = ws
	return c, nil
}

// Wrap adds a heartbeat to an established WebSocket connection, from
// [websocket.Accept] or [websocket.Dial]. Wrap takes over reading: do not
// call ws.Read or ws.Reader afterwards.
//
// A wrapped conn cannot observe the peer's pings or pongs (coder/websocket
// only reports them to hooks set when the conn is made), so only data and
// the pongs to its own pings count as proof of life, and the inbound ping
// limit does not apply. Prefer [Accept] where you can.
func Wrap(ws *websocket.Conn, opts ...Option) (*Conn, error) {
	if ws == nil {
		return nil, errors.New("tether: Wrap of a nil *websocket.Conn")
	}
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	c := newConn(cfg, "")
	c.ws = ws
	c.start()
	return c, nil
}

func newConn(cfg *config, remote string) *Conn {
	c := &Conn{
		cfg:    cfg,
		sched:  sharedScheduler(tickFor(cfg.timeout)),
		remote: remote,
		done:   make(chan struct{}),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.ioCtx = c.ctx
	c.hb.init(cfg)
	return c
}

func (c *Conn) start() {
	c.ws.SetReadLimit(c.cfg.maxMessageSize)
	c.hb.mu.Lock()
	first := c.hb.born.Add(c.hb.pingAfter)
	c.hb.mu.Unlock()
	c.sched.wheel.Add(&c.hb.timer, c.check, first)
	go c.readLoop()
}

// Subprotocol returns the negotiated subprotocol, or "" for none.
func (c *Conn) Subprotocol() string { return c.ws.Subprotocol() }

// RemoteAddr returns the peer's address as the HTTP server saw it, or ""
// for a wrapped conn.
func (c *Conn) RemoteAddr() string { return c.remote }

// Done returns a channel that is closed once the conn has ended and its
// reader, writer and ping goroutines have returned.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err returns why the conn ended, or nil while it is open. See the Err*
// variables for the reasons.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// State returns the conn's liveness.
func (c *Conn) State() State { return State(c.hb.state.Load()) }

// LastSeen returns when the peer last sent a frame of any kind; before the
// first, it returns when the conn was made.
func (c *Conn) LastSeen() time.Time {
	return c.hb.born.Add(time.Duration(c.hb.lastSeen.Load()))
}

// RTT returns the smoothed round-trip time of pings (RFC 6298's SRTT), or 0
// before the first pong.
func (c *Conn) RTT() time.Duration {
	c.hb.mu.Lock()
	defer c.hb.mu.Unlock()
	return c.hb.srtt
}

// Heartbeat returns the heartbeat in force: the configured one, or its
// stretched form under [WithAdaptiveHeartbeat].
func (c *Conn) Heartbeat() (interval, timeout time.Duration) {
	c.hb.mu.Lock()
	defer c.hb.mu.Unlock()
	return c.hb.interval, c.hb.timeout
}

// Ping sends a ping now and waits for its pong or for ctx to end. It
// returns the round trip, which also feeds [Conn.RTT]. If ctx ends while
// the ping frame itself is still being written (the peer is not reading),
// coder/websocket closes the conn.
func (c *Conn) Ping(ctx context.Context) (time.Duration, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(c.ctx, cancel)
	defer stop()
	start := time.Now()
	if err := c.ping(ctx); err != nil {
		if e := c.Err(); e != nil {
			return 0, e
		}
		return 0, fmt.Errorf("tether: ping: %w", err)
	}
	rtt := time.Since(start)
	c.hb.touch()
	c.hb.mu.Lock()
	c.hb.sampleLocked(rtt)
	c.hb.mu.Unlock()
	if f := c.cfg.observer.Pong; f != nil {
		f(c, rtt)
	}
	return rtt, nil
}

// Send queues a text message and returns at once; a writer goroutine sends
// it within the write timeout. Send keeps no reference to data.
//
// When the queue is full (see [WithSendQueue]), the overflow policy decides:
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
	raw, err := compactData(data)
	if err != nil {
		return fmt.Errorf("tether: send: %w", ErrNotJSON)
	}
	buf := make([]byte, 0, len(raw)+len(`{"op":"send","data":}`))
	if c.pings != nil {
		return c.enqueue(appendSend(buf, raw, ""))
	}
	return c.enqueue(appendMsg(buf, "", "", 0, raw))
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
	dropped, ok := c.queue.push(msg, c.cfg.queueMessages, c.cfg.queueBytes, c.cfg.overflow == DropOldest)
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
		c.queue.push(m, math.MaxInt, math.MaxInt, false)
	}
	if !c.writing && len(msgs) > 0 {
		c.writing = true
		c.wg.Add(1)
		go c.writeLoop()
	}
	return true
}

// Close starts a close handshake and returns at once: messages already
// queued are sent first, then a close frame with code and reason. The conn
// is dropped if the handshake has not finished within the write timeout
// (for a wrapped conn, coder/websocket's own 5 s waits may add to that).
// [Conn.Done] is closed when it is over. Close may be called from an
// [OnMessage] function. Closing an ended conn returns an error that wraps
// [net.ErrClosed]; an invalid code (not 1000-1003, 1007-1014 or
// 3000-4999) or a reason over 123 bytes is an error and closes nothing.
func (c *Conn) Close(code websocket.StatusCode, reason string) error {
	if !validCloseCode(code) || len(reason) > maxCloseReason {
		return fmt.Errorf("tether: close: invalid code %d or reason of %d bytes", code, len(reason))
	}
	ce := websocket.CloseError{Code: code, Reason: reason}
	if !c.end(fmt.Errorf("tether: closed: %w: %w", net.ErrClosed, ce), endGraceful, code, reason) {
		return fmt.Errorf("tether: close: %w", net.ErrClosed)
	}
	return nil
}

// CloseNow drops the conn without a close handshake, as for a dead peer,
// or cuts short a close handshake under way. It returns at once; [Conn.Done] is closed when the conn's goroutines have
// returned.
func (c *Conn) CloseNow() error {
	if !c.end(fmt.Errorf("tether: closed: %w", net.ErrClosed), endForced, 0, "") {
		// Already ending, maybe in a close handshake with a peer that
		// does not answer: cut it short, keeping the first reason.
		c.abort()
		return fmt.Errorf("tether: close: %w", net.ErrClosed)
	}
	return nil
}

// maxCloseReason is what fits in a close frame's 125-byte payload after the
// 2-byte code (RFC 6455, 5.5).
const maxCloseReason = 123

// validCloseCode reports whether an endpoint may send code (RFC 6455, 7.4).
func validCloseCode(code websocket.StatusCode) bool {
	switch {
	case code >= 1000 && code <= 1003, code >= 1007 && code <= 1014:
		return true
	case code >= 3000 && code <= 4999:
		return true
	}
	return false
}

type endMode int

const (
	// endForced aborts all I/O at once: for dead peers.
	endForced endMode = iota
	// endGraceful sends what is queued, then the close frame: for Close.
	endGraceful
	// endPolicy drops what is queued and sends the close frame next: the
	// peer broke a rule (too slow, flooding) and must learn why, which it
	// would not if it had to read a full queue first.
	endPolicy
)

// end ends the conn once: the first reason wins and later calls return
// false. A close frame, when one is sent, is bounded by the write timeout.
func (c *Conn) end(reason error, mode endMode, code websocket.StatusCode, text string) bool {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return false
	}
	c.err = reason
	c.hb.state.Store(int32(Closed))
	if mode != endGraceful {
		if c.pings != nil {
			// Never written, so the client may send them on its next conn
			// without sending anything twice.
			c.queue.each(func(m []byte) bool { c.unsent = append(c.unsent, m); return true })
		}
		c.queue.reset()
	}
	if mode == endForced {
		c.mu.Unlock()
		c.abort()
		c.unpark() // a parked reader would not see the socket close
		return true
	}
	c.closeCode, c.closeText = code, text
	c.budget = time.AfterFunc(c.cfg.writeTimeout, c.abort)
	if !c.writing {
		// No writer to hand the close to: start one with an empty queue.
		c.writing = true
		c.wg.Add(1)
		go c.writeLoop()
	}
	c.mu.Unlock()
	// The peer's close reply, or the budget's abort, ends a running reader.
	c.unpark()
	return true
}

// abort fails every pending and future operation on the conn at once.
func (c *Conn) abort() {
	c.cancel()
	if c.nc != nil {
		c.nc.Close()
	}
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
		msg, ok := c.queue.pop()
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
			c.end(fmt.Errorf("%w: %w", ErrConnLost, err), endForced, 0, "")
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

// coalesceLocked joins first and the messages queued behind it, as many as
// fit in maxCoalesced, with newlines (protocol v1 framing). It returns the
// frame to write and, when it joined any, the pooled buffer that holds it,
// to give back once written. c.mu must be held.
func (c *Conn) coalesceLocked(first []byte) ([]byte, *[]byte) {
	next, ok := c.queue.peek()
	if !ok || len(first)+1+len(next) > maxCoalesced {
		return first, nil
	}
	size, count := len(first), 0
	c.queue.each(func(m []byte) bool {
		if size+1+len(m) > maxCoalesced {
			return false
		}
		size += 1 + len(m)
		count++
		return true
	})
	buf := frameBufs[frameBufClass(size)].Get().(*[]byte)
	b := append((*buf)[:0], first...)
	for range count {
		m, _ := c.queue.pop()
		b = append(append(b, '\n'), m...)
	}
	*buf = b
	return b, buf
}

func (c *Conn) writeTimedOut() { c.end(ErrWriteTimeout, endForced, 0, "") }

// readLoop is the conn's reader. A parking conn's reader returns when it
// parks and a new one starts when the peer sends; the last one to run
// finishes the conn.
func (c *Conn) readLoop() {
	for {
		parkable := c.park != nil && !c.park.off.Load() && c.hb.state.Load() != int32(Closed)
		if parkable {
			c.park.mayPark.Store(true)
		}
		typ, data, err := c.ws.Read(c.ioCtx)
		if parkable {
			c.park.mayPark.Store(false)
		}
		if err != nil {
			if parkable && errors.Is(err, errParked) {
				if c.parkReader() {
					return
				}
				continue
			}
			c.end(readError(err), endForced, 0, "")
			break
		}
		c.hb.touch()
		if f := c.cfg.onMessage; f != nil {
			c.hb.busy.Store(true)
			c.hb.handled.Add(1)
			f(c, Message{Data: data, Binary: typ == websocket.MessageBinary})
			c.hb.touch() // before clearing busy: see check
			c.hb.busy.Store(false)
		}
	}
	c.abort()
	// A read error does not release coder/websocket's pending pings and
	// close handshake; CloseNow does, now that the socket is closed.
	_ = c.ws.CloseNow()
	if c.park != nil {
		c.park.reg.release()
	}
	c.wg.Wait()
	c.mu.Lock()
	if c.budget != nil {
		c.budget.Stop()
	}
	err := c.err
	c.mu.Unlock()
	c.sched.wheel.Remove(&c.hb.timer)
	c.cfg.logger.Debug("tether: disconnect", "remote", c.remote, "reason", err)
	if f := c.cfg.onEnd; f != nil {
		f(c, err)
	}
	if f := c.cfg.observer.Disconnect; f != nil {
		f(c, err)
	}
	close(c.done)
	if f := c.cfg.onDone; f != nil {
		f(c)
	}
}

// readError turns the error that ended the reader into a reason.
func readError(err error) error {
	switch {
	case errors.Is(err, websocket.ErrMessageTooBig):
		return fmt.Errorf("%w: %w", ErrMessageTooBig, err)
	case websocket.CloseStatus(err) != -1:
		return fmt.Errorf("tether: peer closed: %w", err)
	default:
		return fmt.Errorf("%w: %w", ErrConnLost, err)
	}
}

// onPing runs on the reader for every inbound ping; false withholds the pong.
func (c *Conn) onPing(context.Context, []byte) bool {
	c.hb.touch()
	if c.pingLimiter == nil {
		c.pingLimiter = rate.NewLimiter(pingRateLimit, pingBurst)
	}
	if !c.pingLimiter.Allow() {
		c.end(ErrPingFlood, endPolicy, websocket.StatusPolicyViolation, "ping flood")
		return false
	}
	return true
}

// onPong runs on the reader for every inbound pong, even a late one whose
// ping has given up waiting.
func (c *Conn) onPong(_ context.Context, payload []byte) {
	c.hb.touch()
	if c.park != nil {
		c.rawPong(payload)
	}
}
