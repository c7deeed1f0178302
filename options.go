package tether

import (
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// Option configures a connection made by [Accept] or [Wrap]. Later options
// override earlier ones; nil options are ignored. Options are validated once,
// by the constructor, which returns an error for a nonsensical set.
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

// Defaults, documented on the options that change them.
const (
	defaultMaxMessageSize = 64 << 10
	defaultQueueMessages  = 256
	defaultQueueBytes     = 1 << 20
	defaultWriteTimeout   = 10 * time.Second
)

// Heartbeat presets from field practice. Each is an Option, usable wherever
// [WithHeartbeat] is.
var (
	// HeartbeatLAN pings after 30 s of silence and drops the peer after 60 s.
	HeartbeatLAN = WithHeartbeat(30*time.Second, 60*time.Second)
	// HeartbeatInternet pings after 15 s of silence and drops the peer after
	// 30 s: under the common 30-60 s idle timeouts of NATs and proxies.
	// It is the default.
	HeartbeatInternet = WithHeartbeat(15*time.Second, 30*time.Second)
	// HeartbeatMobile pings after 5 s of silence and drops the peer after
	// 10 s, for links that vanish without a FIN.
	HeartbeatMobile = WithHeartbeat(5*time.Second, 10*time.Second)
)

// OverflowPolicy says what happens when a message does not fit in a
// connection's send queue.
type OverflowPolicy int

const (
	// Disconnect closes the connection with [StatusSlowConsumer] (4008):
	// a client that cannot keep up reconnects and resumes, instead of
	// silently missing messages. It is the default.
	Disconnect OverflowPolicy = iota
	// DropOldest discards the oldest queued messages to make room: right for
	// state snapshots where only the latest matters.
	DropOldest
	// DropNewest discards the message that does not fit.
	DropNewest
)

func (p OverflowPolicy) String() string {
	switch p {
	case Disconnect:
		return "Disconnect"
	case DropOldest:
		return "DropOldest"
	case DropNewest:
		return "DropNewest"
	}
	return fmt.Sprintf("OverflowPolicy(%d)", int(p))
}

type config struct {
	interval, timeout time.Duration
	adaptiveMax       time.Duration // 0: adaptive heartbeat off
	maxMessageSize    int64
	queueMessages     int
	queueBytes        int
	overflow          OverflowPolicy
	writeTimeout      time.Duration
	originPatterns    []string
	subprotocols      []string
	logger            *slog.Logger
	observer          Observer
	onMessage         func(*Conn, Message)
}

func newConfig(opts []Option) (*config, error) {
	c := &config{
		interval:       15 * time.Second,
		timeout:        30 * time.Second,
		maxMessageSize: defaultMaxMessageSize,
		queueMessages:  defaultQueueMessages,
		queueBytes:     defaultQueueBytes,
		writeTimeout:   defaultWriteTimeout,
	}
	for _, o := range opts {
		if o != nil {
			o.apply(c)
		}
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	if c.logger == nil {
		c.logger = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// errInvalidOption is wrapped by every validation error so callers can tell
// misconfiguration from run-time failures.
var errInvalidOption = errors.New("tether: invalid option")

func (c *config) validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{errInvalidOption}, args...)...))
	}
	if c.interval <= 0 {
		bad("heartbeat interval %v must be positive", c.interval)
	}
	if c.timeout <= c.interval {
		bad("heartbeat timeout %v must exceed the interval %v", c.timeout, c.interval)
	}
	if c.adaptiveMax != 0 && c.adaptiveMax < c.interval {
		bad("adaptive heartbeat max %v is below the interval %v", c.adaptiveMax, c.interval)
	}
	if c.maxMessageSize <= 0 {
		bad("max message size %d must be positive", c.maxMessageSize)
	}
	if c.queueMessages <= 0 || c.queueBytes <= 0 {
		bad("send queue bounds (%d messages, %d bytes) must be positive", c.queueMessages, c.queueBytes)
	}
	if c.overflow < Disconnect || c.overflow > DropNewest {
		bad("unknown overflow policy %v", c.overflow)
	}
	if c.writeTimeout <= 0 {
		bad("write timeout %v must be positive", c.writeTimeout)
	}
	return errors.Join(errs...)
}

// WithHeartbeat sets the heartbeat: a peer silent (no inbound frame of any
// kind) for interval is pinged (after a silence drawn from [0.8, 1]·interval,
// the first time from [0.5, 1]·interval, so that conns do not ping in
// step), and a peer silent for timeout is dead and dropped with
// [ErrHeartbeatTimeout]. Detection takes at most timeout plus
// the scheduler's tick (timeout/64, between 1 ms and 250 ms). timeout must
// exceed interval; 2×interval lets one ping go unanswered before death.
// The default is [HeartbeatInternet], 15 s / 30 s.
func WithHeartbeat(interval, timeout time.Duration) Option {
	return optionFunc(func(c *config) { c.interval, c.timeout = interval, timeout })
}

// WithAdaptiveHeartbeat lets the heartbeat stretch on a quiet, stable link:
// after 3 pongs in a row arrive on time, interval and timeout double
// together, never taking the interval beyond max. A late pong (later than
// the RTT estimate allows: srtt + 4·rttvar) snaps both back to the
// configured values. Keep max under the idle timeout of the NATs and proxies
// between you and your peers. Off by default.
func WithAdaptiveHeartbeat(max time.Duration) Option {
	return optionFunc(func(c *config) { c.adaptiveMax = max })
}

// WithMaxMessageSize limits inbound messages to n bytes; a bigger one closes
// the conn with 1009 and [ErrMessageTooBig]. The default is 64 KiB.
func WithMaxMessageSize(n int64) Option {
	return optionFunc(func(c *config) { c.maxMessageSize = n })
}

// WithSendQueue bounds a conn's send queue to the given number of messages
// and bytes; what happens past either bound is set by [WithOverflow].
// The default is 256 messages and 1 MiB. An idle conn's queue costs nothing.
func WithSendQueue(messages, bytes int) Option {
	return optionFunc(func(c *config) { c.queueMessages, c.queueBytes = messages, bytes })
}

// WithOverflow sets what happens when the send queue is full. The default
// is [Disconnect].
func WithOverflow(p OverflowPolicy) Option {
	return optionFunc(func(c *config) { c.overflow = p })
}

// WithWriteTimeout bounds each write, and a graceful close handshake. A
// peer that does not take a message within d is dropped with
// [ErrWriteTimeout], so one stalled reader never holds up anyone else.
// The default is 10 s.
func WithWriteTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.writeTimeout = d })
}

// WithOriginPatterns authorises cross-origin handshakes from these host
// patterns (see [websocket.AcceptOptions].OriginPatterns). By default only
// same-origin requests, and requests without an Origin header (non-browser
// clients), are accepted; others get 403.
func WithOriginPatterns(patterns ...string) Option {
	return optionFunc(func(c *config) { c.originPatterns = append([]string(nil), patterns...) })
}

// WithSubprotocols lists the subprotocols [Accept] may negotiate, in order
// of preference; read the result with [Conn.Subprotocol].
func WithSubprotocols(protocols ...string) Option {
	return optionFunc(func(c *config) { c.subprotocols = append([]string(nil), protocols...) })
}

// WithLogger sets where tether logs routine events (suspect peers,
// disconnects with their reason), at Debug level. By default it logs
// nothing.
func WithLogger(l *slog.Logger) Option {
	return optionFunc(func(c *config) { c.logger = l })
}

// WithObserver sets the hooks that report connection events.
func WithObserver(o Observer) Option {
	return optionFunc(func(c *config) { c.observer = o })
}

// OnMessage sets the function that receives inbound messages.
//
// It runs on the conn's reader goroutine, one message at a time, in order.
// While it runs no frame is read from this conn, so keep it short or hand
// the work off. Its running time is not held against the peer: the conn is
// not declared dead meanwhile, and a pong that waited for it does not enter
// the RTT estimate. Without it, inbound messages are read and discarded.
// The Message's Data is owned by the function.
func OnMessage(f func(c *Conn, m Message)) Option {
	return optionFunc(func(c *config) { c.onMessage = f })
}

// Observer holds optional hooks for connection events, for metrics and
// logs. Nil fields are skipped. A hook runs on the goroutine that saw the
// event (the conn's reader, the heartbeat scheduler, a ping goroutine, or
// the caller of Send or Ping): it must return quickly and must not block.
type Observer struct {
	// Disconnect reports a connection that ended, and why (see [Conn.Err]).
	Disconnect func(c *Conn, reason error)
	// Suspect reports a peer whose pong is late. It may recover.
	Suspect func(c *Conn)
	// Pong reports the round trip of a heartbeat or [Conn.Ping].
	Pong func(c *Conn, rtt time.Duration)
	// Drop reports messages discarded by the overflow policy.
	Drop func(c *Conn, messages int)
}
