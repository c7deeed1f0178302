package tether

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/internal/workers"
	"golang.org/x/time/rate"
)

// Option configures a conn wherever it is made: by [Wrap], by [Accept], by
// a [Hub] (each of its conns) and by a [Client] (each of its conns).
//
// Options are typed by where they apply, so that the compiler refuses one
// where it means nothing: an Option applies everywhere; a [ServerOption]
// to the handshakes of Accept and of a Hub; a [HubOption] to a Hub only; a
// [DialOption] to a Client only. Every Option is a ServerOption, a
// HubOption and a DialOption, and every ServerOption a HubOption.
//
// Later options override earlier ones (but [WithObserver], which adds);
// nil options are ignored. Options are validated once, by the constructor,
// which returns an error for a nonsensical set.
type Option interface {
	ServerOption
	DialOption
	applyConn(*config)
}

type optionFunc func(*config)

func (f optionFunc) applyConn(c *config)     { f(c) }
func (f optionFunc) applyServer(c *config)   { f(c) }
func (f optionFunc) applyHub(h *hubConfig)   { f(h.conn) }
func (f optionFunc) applyDial(d *dialConfig) { f(d.conn) }

// ServerOption configures the handshakes of [Accept] and of a [Hub]'s
// conns: which origins and subprotocols they accept. Every [Option] is a
// ServerOption too.
type ServerOption interface {
	HubOption
	applyServer(*config)
}

type serverOptionFunc func(*config)

func (f serverOptionFunc) applyServer(c *config) { f(c) }
func (f serverOptionFunc) applyHub(h *hubConfig) { f(h.conn) }

// HubOption configures a [Hub] made by [NewHub]. Every [ServerOption] and
// [Option] is a HubOption too, applying to each of the hub's conns.
type HubOption interface {
	applyHub(*hubConfig)
}

type hubOptionFunc func(*hubConfig)

func (f hubOptionFunc) applyHub(h *hubConfig) { f(h) }

// Hub defaults, documented on the options that change them.
const (
	defaultRateLimit      = 100 // inbound messages per second and conn
	defaultRateBurst      = 200
	defaultHistoryLen     = 256
	defaultHistoryAge     = 2 * time.Minute
	defaultOfflineLen     = 100
	defaultOfflineBytes   = 256 << 10
	defaultOfflineAge     = 24 * time.Hour
	defaultOfflineTotal   = 64 << 20
	defaultPresenceGrace  = 5 * time.Second
	defaultPresenceList   = 100
	defaultPresenceSettle = 25 * time.Millisecond
	// A topic's presence announcements are at least this far apart per
	// v1 subscriber on the node, so that they cost the node at most about
	// 4,000 messages a second per topic however big the topic (a few per
	// cent of a core: each is a write to a socket): 25 ms up to 100
	// subscribers, 4.75 s at 19,000. A count that lags a few seconds in
	// a room of thousands is the price.
	presencePerSubscriber = 250 * time.Microsecond
)

type hubConfig struct {
	conn          *config
	auth          func(*http.Request) (string, error)
	connMeta      func(*http.Request) json.RawMessage
	maxConns      int
	admitRate     rate.Limit // handshakes per second; 0: no limit
	admitBurst    int
	rateLimit     rate.Limit
	rateBurst     int
	clientPublish func(*Conn, string) bool
	subscribeAuth func(*Conn, string) bool
	history       adapter.History
	offline       adapter.OfflineStore
	inbox         adapter.Inbox // nil: none
	broker        adapter.Broker
	presence      func(string) PresencePolicy // nil: the default for every topic
	topicPolicy   func(string) TopicPolicy    // nil: the default for every topic
	breakerTrip   time.Duration               // 0: no breaker
}

func newHubConfig(opts []HubOption) (*hubConfig, error) {
	h := &hubConfig{
		conn:      defaultConfig(),
		rateLimit: defaultRateLimit,
		rateBurst: defaultRateBurst,
	}
	for _, o := range opts {
		if o != nil {
			o.applyHub(h)
		}
	}
	err := h.conn.validate()
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{errInvalidOption}, args...)...))
	}
	if h.maxConns < 0 {
		bad("max conns %d must not be negative", h.maxConns)
	}
	if h.admitRate < 0 || h.admitRate > 0 && h.admitRate != rate.Inf && h.admitBurst <= 0 {
		bad("admission rate %v with burst %d: both must be positive", h.admitRate, h.admitBurst)
	}
	if h.rateLimit <= 0 || h.rateBurst <= 0 && h.rateLimit != rate.Inf {
		bad("rate limit %v with burst %d: both must be positive", h.rateLimit, h.rateBurst)
	}
	if err := errors.Join(append([]error{err}, errs...)...); err != nil {
		return nil, err
	}
	h.conn.finish()
	if h.history == nil {
		h.history = adapter.NewMemoryHistory(defaultHistoryLen, defaultHistoryAge)
	}
	if h.offline == nil {
		h.offline = adapter.NewMemoryOfflineStore(defaultOfflineLen, defaultOfflineBytes, defaultOfflineAge, defaultOfflineTotal)
	}
	return h, nil
}

// WithAuth sets the function that authenticates a handshake request and
// names its user. An error refuses the request with 401 before the
// upgrade, and [Hub.Serve] returns it wrapped in [ErrUnauthorized]. The
// user ID keys [Hub.SendToUser] and presence; "" is an anonymous conn, which
// takes no part in either. By default every request is accepted,
// anonymous.
func WithAuth(f func(r *http.Request) (userID string, err error)) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.auth = f })
}

// WithConnMeta sets the function that gives a conn its metadata from its
// handshake request: a JSON value (the device, a display name) that
// presence shows for the conn. A value that is not valid JSON is ignored.
func WithConnMeta(f func(r *http.Request) json.RawMessage) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.connMeta = f })
}

// WithMaxConns caps the hub's conns, counting handshakes in progress and
// conns whose [Observer].Disconnect hooks have not returned yet; requests past
// the cap are refused with 503 and [ErrHubFull]. 0, the default, means no
// cap.
func WithMaxConns(n int) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.maxConns = n })
}

// Priority ranks a topic's messages against the others queued for a conn
// that falls behind: see [TopicPolicy].
type Priority int8

// The priorities. Control messages (acks, errors, pongs, presence) come
// before any.
const (
	PriorityLow    Priority = -1
	PriorityNormal Priority = 0
	PriorityHigh   Priority = 1
)

// TopicPolicy is how the hub treats one topic's messages; see
// [WithTopicPolicy].
type TopicPolicy struct {
	// Priority orders the messages queued for a conn that falls behind:
	// high-priority ones are written first and dropped last, low-priority
	// ones written last and dropped first. When a conn's queue is full, its
	// low-priority messages are dropped, oldest first, to make room; a
	// low-priority message that finds no room is dropped, and never closes
	// the conn; a high-priority one makes room by dropping normal ones.
	// Only then does the overflow policy of [Limits] apply. Messages of
	// different topics are ordered only within a priority (as PROTOCOL.md
	// promises no order between topics); each topic's stay in order.
	Priority Priority
	// Latest marks a topic of which only the newest message matters (a
	// price, a position, a score): a message for a conn that still has one
	// of the topic's queued, not yet written, takes its place. A conn that
	// keeps up gets every message; one that falls behind gets the latest,
	// and a v1 client sees the seq jump, as after a loss (a resync).
	Latest bool
}

// WithTopicPolicy sets each topic's [TopicPolicy], from its name: called
// once when the topic gets its first subscriber, and again after it had
// none, with a lock of the hub's held: it must not call the Hub. The
// default is normal priority, every message kept.
func WithTopicPolicy(policy func(topic string) TopicPolicy) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.topicPolicy = policy })
}

// WithBreaker sheds load before the conns already there suffer from it.
// The signal is the Go scheduler's latency, how long runnable goroutines
// wait for a CPU, which is what delays heartbeats, pongs and writes,
// together with how busy the process keeps the CPUs it may use
// (GOMAXPROCS, or a cgroup's CPU quota when lower). When the latency's
// 99th percentile over the last second exceeds trip while those CPUs are
// at least 70 % busy, the hub is overloaded: it stops
// delivering low-priority topics ([TopicPolicy]), counted in
// [Stats].Shed, refuses new conns with 503, [ErrOverloaded] and a
// Retry-After, and [Hub.Ready] answers 503. It recovers once, for 2
// seconds in a row, the latency has stayed under trip/2 or the CPUs under
// 45 % busy. A process starved by others on its machine (CPU steal, a
// noisy neighbour) does not look busy, and does not trip it. [Observer].Overload reports each change. 0, the default,
// means no breaker. Choose trip above the time one publication to your
// biggest topic takes to go out (about 13 µs per subscriber per core, 65
// ms for 5,000 on one): a burst of fan-out makes the latency spike on an
// otherwise idle server. 100 ms suits most servers.
func WithBreaker(trip time.Duration) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.breakerTrip = trip })
}

// WithAdmission paces new connections: a token bucket of burst
// handshakes refilled at perSecond. A handshake past it is refused before
// any work is done for it (before [WithAuth]), with 503,
// [ErrOverloaded] and a Retry-After that gives each refused client its own
// slot at the admission rate, up to a minute ahead, so that a crowd
// reconnecting after an outage comes back spread out instead of all at
// once. [Client] waits for
// its slot (plus up to a second of jitter). The default, perSecond 0 or
// rate.Inf, admits every handshake.
func WithAdmission(perSecond rate.Limit, burst int) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.admitRate, h.admitBurst = perSecond, burst })
}

// WithRateLimit limits the messages each conn may send: limit per second
// sustained, in bursts of up to burst. A protocol v1 message over the limit
// is dropped with an error rate_limited; a raw one is dropped silently.
// A conn that keeps sending past the limit (more than 10 drops in a burst,
// or more than one a second sustained) is closed with
// [StatusRateLimited] and [ErrRateLimited]. The default is 100 messages
// per second with bursts of 200; rate.Inf turns the limit off.
func WithRateLimit(limit rate.Limit, burst int) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.rateLimit, h.rateBurst = limit, burst })
}

// WithClientPublish lets protocol v1 clients publish: allow reports
// whether conn c may publish on topic. Without it, a client pub is
// refused with an error forbidden. allow runs on c's reader goroutine.
func WithClientPublish(allow func(c *Conn, topic string) bool) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.clientPublish = allow })
}

// WithSubscribeAuth sets the function that decides whether a protocol v1
// client may subscribe to topic; a refusal is answered with an error
// forbidden. By default clients may subscribe to any topic.
// [Hub.Subscribe], called by the application, is not checked.
func WithSubscribeAuth(allow func(c *Conn, topic string) bool) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.subscribeAuth = allow })
}

// WithHistory sets where topics keep their recent messages, for clients
// that resume. The default is [adapter.NewMemoryHistory] with 256 messages and 2
// minutes per topic.
func WithHistory(hist adapter.History) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.history = hist })
}

// WithOfflineStore sets where [Hub.SendToUser] keeps messages for users
// who are not connected. The default is [adapter.NewMemoryOfflineStore] with 100
// messages and 256 KiB per user, kept 24 hours, 64 MiB in all.
func WithOfflineStore(s adapter.OfflineStore) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.offline = s })
}

// WithInbox gives each user an inbox (PROTOCOL.md, "The inbox"):
// [Hub.SendToUser] numbers each direct message in the user's inbox and
// keeps it there until a client of the user acknowledges it, and every
// new protocol v1 conn of the user gets the messages not yet
// acknowledged first, so a message sent while the user's only conn was
// dying, or while the user had none, is not lost. The Go [Client] and
// tether.js acknowledge, and drop what they had already handed over.
// The offline store is then not used by SendToUser. Raw peers get direct
// messages only while connected, at most once, since they cannot
// acknowledge; so an inbox suits applications whose users connect with
// v1 clients.
//
// The inbox is per user: an acknowledgement from any of the user's
// clients drops the messages for all of them. A full inbox refuses the
// message: SendToUser returns an error wrapping [adapter.ErrInboxFull].
// [adapter.NewMemoryInbox] keeps inboxes in memory, diskstore on disk;
// with a broker, use an inbox every node shares (redisbroker's), since
// a user may come back on any node.
func WithInbox(inbox adapter.Inbox) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.inbox = inbox })
}

// WithBroker links the hub with the hubs of other processes through b
// (see [adapter.Broker]; tether/redisbroker is one over Redis): topics, direct
// messages, history, offline messages and presence are then shared, and
// [Hub.Publish], [Hub.SendToUser], [Hub.Presence] and [Hub.Online] answer
// for every node; with a broker that relays (adapter.Relay), so do
// [Hub.Broadcast], [Hub.LastSeen], [Hub.DisconnectUser] and
// [Hub.SubscribeUser].
// The hub opens b in NewHub and closes it when it is shut down. NewHub
// does not wait for the broker to link up (a few milliseconds on a LAN):
// until it has, as while it is down, the hub serves its own conns only.
// [Observer].Broker reports the moment.
//
// The broker's shared history replaces [WithHistory]'s for publications,
// and raw peers get the one-line form of the data published (a v1 peer
// gets that anyway). While the broker reports its link lost, the hub
// delivers to its own conns only: publications under an epoch of its
// own, numbered by its own history, so that clients resync when the link
// is back; direct messages to the user's conns here, or to the hub's
// own offline store.
func WithBroker(b adapter.Broker) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.broker = b })
}

// WithPresence chooses how each topic tracks presence: policy is asked
// once each time the hub starts holding a topic. Without it, or with a
// nil policy, every topic has the zero [PresencePolicy]: it tracks
// presence, lists up to 100 members to its subscribers and counts them
// above that, and keeps a user who left present for 5 s. Only conns with
// a user ID (see [WithAuth]) are present.
func WithPresence(policy func(topic string) PresencePolicy) HubOption {
	return hubOptionFunc(func(h *hubConfig) { h.presence = policy })
}

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
	// (The zero OverflowPolicy is none: in [Limits] it keeps the policy
	// as it was.)
	Disconnect OverflowPolicy = iota + 1
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

	// Set by a Hub for its conns.
	onEnd     func(*Conn, error) // after the conn's goroutines, before observer.Disconnect
	onDone    func(*Conn)        // last thing the conn's reader does
	pingsSent *atomic.Uint64     // heartbeat pings, counted for Stats
	writers   *workers.Pool      // runs the conns' writers; nil: a go statement each
}

func defaultConfig() *config {
	return &config{
		interval:       15 * time.Second,
		timeout:        30 * time.Second,
		maxMessageSize: defaultMaxMessageSize,
		queueMessages:  defaultQueueMessages,
		queueBytes:     defaultQueueBytes,
		writeTimeout:   defaultWriteTimeout,
		overflow:       Disconnect,
	}
}

// newConfig makes the config of a conn of [Accept] or [Wrap]: apply sets
// the options.
func newConfig(apply func(*config)) (*config, error) {
	c := defaultConfig()
	apply(c)
	if err := c.validate(); err != nil {
		return nil, err
	}
	c.finish()
	return c, nil
}

// finish fills in what validation leaves unset.
func (c *config) finish() {
	if c.logger == nil {
		c.logger = slog.New(slog.DiscardHandler)
	}
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
//
// A peer we are sending to reads our ping only after what we sent before
// it, which may take it longer than timeout. Such a peer's silence counts
// from the latest of: our last ping, a write of ours that waited for it to
// make room in the socket, and (accepted conns on Linux) a look, once it
// is silent past a ping, at which its TCP reported that it had read more
// of what we sent. A peer whose host is gone moves none of these, and is
// dropped at most one timeout later than a peer silent all along; one
// whose application stopped reading, once its receive buffer is full.
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

// Limits bounds what one conn may cost: the size of what it reads, what it
// may have queued to send, and how long a write may take. Pass it with
// [WithLimits]; zero fields leave a limit as it was (the default, or what
// an earlier WithLimits set).
type Limits struct {
	// MaxMessageSize bounds inbound messages, in bytes; a larger one closes
	// the conn with 1009 and [ErrMessageTooBig]. Default 64 KiB, and 1 MiB
	// for a [Client]'s conns, since a server's messages are as large as its
	// application makes them.
	MaxMessageSize int64
	// SendQueue and SendQueueBytes bound the send queue, in messages and in
	// bytes; Overflow says what happens past either. Default 256 messages
	// and 1 MiB. An idle conn's queue costs nothing. The protocol's own
	// messages to a v1 peer (acks, errors, pings, pongs, presence) do not
	// count: they go ahead of the queue, never dropped, bounded by the
	// rate limit on what the peer asks and by 4 MiB.
	SendQueue, SendQueueBytes int
	// Overflow is what happens when a message does not fit in the send
	// queue. Default [Disconnect]; the zero value keeps the policy as it
	// was.
	Overflow OverflowPolicy
	// WriteTimeout bounds each write, and a graceful close handshake. A
	// peer that does not take a message within it is dropped with
	// [ErrWriteTimeout], so one stalled reader never holds up anyone
	// else. Default 10 s.
	WriteTimeout time.Duration
}

// WithLimits sets the limits of each conn; see [Limits] for the defaults.
func WithLimits(l Limits) Option {
	return optionFunc(func(c *config) {
		c.maxMessageSize = cmp.Or(l.MaxMessageSize, c.maxMessageSize)
		c.queueMessages = cmp.Or(l.SendQueue, c.queueMessages)
		c.queueBytes = cmp.Or(l.SendQueueBytes, c.queueBytes)
		c.overflow = cmp.Or(l.Overflow, c.overflow)
		c.writeTimeout = cmp.Or(l.WriteTimeout, c.writeTimeout)
	})
}

// WithOriginPatterns authorises cross-origin handshakes from these host
// patterns (see [websocket.AcceptOptions].OriginPatterns). By default only
// same-origin requests, and requests without an Origin header (non-browser
// clients), are accepted; others get 403 and [ErrForbidden].
func WithOriginPatterns(patterns ...string) ServerOption {
	return serverOptionFunc(func(c *config) { c.originPatterns = append([]string(nil), patterns...) })
}

// WithSubprotocols lists the subprotocols [Accept] may negotiate, in order
// of preference; read the result with [Conn.Subprotocol]. A [Hub]
// negotiates [Subprotocol] first, then these.
func WithSubprotocols(protocols ...string) ServerOption {
	return serverOptionFunc(func(c *config) { c.subprotocols = append([]string(nil), protocols...) })
}

// WithLogger sets where tether logs routine events (suspect peers,
// disconnects with their reason), at Debug level. By default it logs
// nothing.
func WithLogger(l *slog.Logger) Option {
	return optionFunc(func(c *config) { c.logger = l })
}

// WithObserver adds hooks for events (see [Observer]). Unlike other
// options it adds rather than replaces: given more than once, every
// observer's hooks are called, in the order given, so that metrics (such
// as tether/prommetrics) and the application each pass their own.
func WithObserver(o Observer) Option {
	return optionFunc(func(c *config) { c.observer.add(o) })
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

// DialOption configures a [Client] made by [Dial]. Later options override
// earlier ones; nil options are ignored.
//
// Every [Option] is a DialOption too, applying to each of the client's
// conns, with these differences:
//   - [WithHeartbeat] applies until the server's welcome, which advertises
//     the heartbeat the client then follows (PROTOCOL.md, section 9); its
//     timeout also bounds each connection attempt, welcome included.
//     [WithAdaptiveHeartbeat] does not apply: the server's timeout rules.
//   - [OnMessage] receives the server application's direct messages (see
//     [Hub.SendToUser]); [Message].Data is what was sent, and with a hub's
//     inbox ([WithInbox]) [Message].Position is its place in the inbox:
//     the client acknowledges it and drops replays (see [Client]).
//   - [Limits].MaxMessageSize defaults to 1 MiB.
//   - When the send queue is full, [Client.Publish] and [Client.Send]
//     return [ErrQueueFull] and the conn stays, whatever
//     [Limits].Overflow says.
//   - [Observer].Drop may be called with the client's lock held: it must
//     not call the Client's methods.
type DialOption interface {
	applyDial(*dialConfig)
}

type dialOptionFunc func(*dialConfig)

func (f dialOptionFunc) applyDial(d *dialConfig) { f(d) }

// Client defaults, documented on the options that change them.
const (
	defaultClientMaxMessage = 1 << 20
	defaultBufferMessages   = 256
	defaultBufferBytes      = 1 << 20
)

type dialConfig struct {
	conn         *config
	urls         []string // the Dial URL, then the fallbacks
	header       http.Header
	token        func(context.Context) (string, error)
	httpClient   *http.Client
	backoff      Backoff
	bufMessages  int
	bufBytes     int
	offlineAfter time.Duration
	onOffline    func()
}

func newDialConfig(url string, opts []DialOption) (*dialConfig, error) {
	d := &dialConfig{
		conn:        defaultConfig(),
		urls:        []string{url},
		bufMessages: defaultBufferMessages,
		bufBytes:    defaultBufferBytes,
	}
	d.conn.maxMessageSize = defaultClientMaxMessage
	for _, o := range opts {
		if o != nil {
			o.applyDial(d)
		}
	}
	errs := []error{d.conn.validate(), d.backoff.validate()}
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{errInvalidOption}, args...)...))
	}
	if d.bufMessages < 0 || d.bufBytes < 0 {
		bad("offline buffer bounds (%d messages, %d bytes) must not be negative", d.bufMessages, d.bufBytes)
	}
	if d.onOffline != nil && d.offlineAfter < 0 {
		bad("OnOffline delay %v must not be negative", d.offlineAfter)
	}
	for _, u := range d.urls {
		if u == "" {
			bad("empty URL")
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	d.conn.finish()
	d.conn.adaptiveMax = 0
	d.backoff = d.backoff.withDefaults()
	if d.httpClient == nil {
		d.httpClient = http.DefaultClient
	}
	return d, nil
}

// WithBackoff sets how the client waits between connection attempts; see
// [Backoff] for the defaults.
func WithBackoff(b Backoff) DialOption {
	return dialOptionFunc(func(d *dialConfig) { d.backoff = b })
}

// WithFallbackURLs adds URLs to try, in order, when the one in use fails.
// The client sticks to the last URL that worked: after a conn drops, it
// tries that one first. It tries every URL once before it backs off.
func WithFallbackURLs(urls ...string) DialOption {
	return dialOptionFunc(func(d *dialConfig) { d.urls = append(d.urls[:1:1], urls...) })
}

// WithHeader sets HTTP headers sent with every handshake: a cookie, an
// API key.
func WithHeader(h http.Header) DialOption {
	return dialOptionFunc(func(d *dialConfig) { d.header = h.Clone() })
}

// WithToken sets a function that returns a bearer token, sent as
// "Authorization: Bearer <token>" with every handshake. It is called for
// each connection attempt, so that an expired token is refreshed before a
// reconnect; an error fails that attempt, which is retried with backoff.
func WithToken(f func(ctx context.Context) (string, error)) DialOption {
	return dialOptionFunc(func(d *dialConfig) { d.token = f })
}

// WithHTTPClient sets the HTTP client the handshakes use, for TLS
// settings or a proxy. Its Timeout, if set, bounds each handshake.
// Default [http.DefaultClient].
func WithHTTPClient(c *http.Client) DialOption {
	return dialOptionFunc(func(d *dialConfig) { d.httpClient = c })
}

// WithOfflineBuffer bounds the messages [Client.Publish] and [Client.Send]
// keep while no conn is up, by count and by total encoded bytes; beyond
// either they return [ErrQueueFull]. 0 messages disables the buffer.
// Default 256 messages, 1 MiB.
func WithOfflineBuffer(messages, bytes int) DialOption {
	return dialOptionFunc(func(d *dialConfig) { d.bufMessages, d.bufBytes = messages, bytes })
}

// OnOffline sets a function called once the client has not been
// Connected for after, once per outage: to show "offline" in a UI without
// flickering at every brief reconnect. The outage runs from Dial, or from
// leaving Connected, until Connected again, however many conns come and
// go in between. f runs on a goroutine of its own and may overlap
// [Observer].State calls. [Client.Close] waits for it, so to give up after
// an outage, f must call Close in a new goroutine: go client.Close().
func OnOffline(after time.Duration, f func()) DialOption {
	return dialOptionFunc(func(d *dialConfig) { d.offlineAfter, d.onOffline = after, f })
}
