package tether

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/internal/park"
	"github.com/tether-ws/tether/internal/queue"
	"golang.org/x/time/rate"
)

// Message is one message as it reaches the application: what a conn read
// ([OnMessage]), or a message of a topic a [Client] subscribed to
// ([Client.Subscribe]).
type Message struct {
	// Topic is the topic of a Client's subscription; "" for a message a
	// conn read, and for a direct message.
	Topic string
	// Position is where a topic's message sits in the topic's history (the
	// client resumes from the last one it delivered), or where a direct
	// message from the user's inbox sits in the inbox ([WithInbox],
	// PROTOCOL.md section 10.1): the inbox's epoch and the message's seq.
	// Zero elsewhere.
	Position Position
	// Data is the payload, owned by the receiver: exactly the bytes that
	// were sent, but that a JSON value a protocol v1 peer sent or received
	// is on one line (compacted if it spanned lines).
	Data []byte
	// Binary is true for bytes (a binary message from a raw peer; data
	// sent with a ...Binary method), false for text in UTF-8.
	Binary bool
}

// Conn is one live WebSocket connection with a heartbeat: the peer is
// pinged when it has been silent for the heartbeat interval and dropped when
// it has been silent for the timeout. It is safe for use by multiple
// goroutines.
//
// An idle conn from [Accept] on Linux holds no goroutine: its reader parks
// in a poller shared by all conns between messages (internal/park).
// Elsewhere, and for a wrapped conn, an idle conn costs one goroutine, its
// reader. A writer goroutine exists only while the send queue holds
// messages, and heartbeats are driven by a scheduler shared with other
// conns.
//
// Receive messages with the [OnMessage] option. Wait for the end with
// [Conn.Done], then read the reason with [Conn.Err].
//
// # Concurrency
//
// Goroutines. The reader is started by Accept, Wrap or the hub once the
// conn is set up; a parked conn's reader returns, and the poller (or the
// conn's end) starts a new one when the peer sends. The writer is started
// by whatever queues onto an empty queue, or by a close that needs a close
// frame sent, and returns when the queue is drained. A ping goroutine is
// started by the heartbeat for a conn that cannot park, and a raw ping
// that finds the socket taken waits in one. Writer and ping goroutines are
// counted in a WaitGroup; the last reader waits for them, then unregisters
// the conn, calls [Observer].Disconnect and closes Done: after Done only
// that reader is left, returning (a hub's frees its place for [WithMaxConns]
// first).
//
// Locks, taken in this order, never the reverse: the parking socket's read
// lock, held by whoever reads the socket (the reader, coder/websocket's
// close handshake, or the poller settling pongs); the heartbeat's lock
// (hb.mu: RTT estimate, ping in flight, stretched interval); the conn's
// lock (mu: send queue, writer flag, end reason, close to send); the
// parking socket's write lock (between coder/websocket's writes and the
// heartbeat's raw pings); and the scheduler's lock, held briefly to re-arm
// the conn's timer. A hub may hold its own locks (topic, user shard) while
// it queues onto a conn, so those come before mu. Hooks and handlers are
// called with none of the conn's locks held, but for [Observer].Pong of a
// pong that the poller settles, which runs with the parking socket's read
// lock held (no reader can run meanwhile; nothing else waits on it). A
// function named ...Locked is called with the lock it names held, and
// keeps it.
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
	// peer is quiet; nil where it cannot (see internal/park).
	park *park.Conn

	// hc is the conn's state in a Hub; nil for a conn made by Accept or
	// Wrap. coalesce joins queued messages into one frame, for protocol v1
	// peers, who split frames on newlines.
	hc       *hubConn
	coalesce bool
	// pings is set on a [Client]'s conns, which speak protocol v1 to a
	// hub: see protocolPings.
	pings *protocolPings

	mu    sync.Mutex // guards the fields below
	queue queue.Queue
	// control is the control lane: the protocol's own messages (welcome,
	// ack, error, ping, pong, presence), which go out before queued data
	// and are bounded by maxControlBytes rather than by Limits, so that a
	// peer that reads is never dropped for what it asked of the protocol.
	control   queue.Queue
	lanes     *lanes // high and low priority; nil until used
	writing   bool   // a writer goroutine owns the queues
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
func Accept(w http.ResponseWriter, r *http.Request, opts ...ServerOption) (*Conn, error) {
	cfg, err := newConfig(func(c *config) {
		for _, o := range opts {
			if o != nil {
				o.applyServer(c)
			}
		}
	})
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
	rw, hw := park.WrapForHijack(w)
	ws, err := websocket.Accept(rw, r, &websocket.AcceptOptions{
		Subprotocols:   cfg.subprotocols,
		OriginPatterns: cfg.originPatterns,
		OnPingReceived: c.onPing,
		OnPongReceived: c.onPong,
	})
	if err != nil {
		c.cancel()
		return nil, because("tether: accept", err)
	}
	if hw != nil && hw.NetConn != nil {
		c.nc, c.ioCtx = hw.NetConn, context.Background()
		if c.park = hw.Park; c.park != nil {
			c.park.Bind((*parkOwner)(c))
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
	cfg, err := newConfig(func(c *config) {
		for _, o := range opts {
			if o != nil {
				o.applyConn(c)
			}
		}
	})
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
	// The reader owns the conn's end (and a hub's unregistration): it
	// starts even if Connect panics. A hub's conn is registered and runs
	// on; one from Accept or Wrap would reach nobody, so it is dropped.
	defer func() {
		if r := recover(); r != nil {
			if c.hc == nil {
				c.CloseNow()
			}
			go c.readLoop()
			panic(r)
		}
		go c.readLoop()
	}()
	if f := c.cfg.observer.Connect; f != nil {
		f(c)
	}
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
		return 0, because("tether: ping", err)
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
	if !c.end(&CloseError{Code: code, Reason: reason, Local: true}, endGraceful, code, reason) {
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
			c.queue.Each(func(m []byte) bool { c.unsent = append(c.unsent, m); return true })
		}
		c.queue.Reset()
		c.control.Reset()
		if c.lanes != nil {
			c.lanes.high.Reset()
			c.lanes.low.Reset()
		}
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
		c.startWriterLocked()
	}
	c.mu.Unlock()
	// The peer's close reply, or the budget's abort, ends a running reader.
	c.unpark()
	return true
}

// abort fails every pending and future operation on the conn at once.
func (c *Conn) abort() {
	c.cancel()
	switch {
	case c.park != nil:
		c.park.Abort() // the parking socket's own way: see park.Conn
	case c.nc != nil:
		c.nc.Close()
	}
}
