package tether

import (
	"context"
	crand "crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/internal/shrink"
	"github.com/tether-ws/tether/internal/wire"
	"github.com/tether-ws/tether/internal/workers"
	"golang.org/x/time/rate"
)

// Subprotocol is the WebSocket subprotocol of tether's wire protocol v1
// (see PROTOCOL.md). A peer that does not ask for it during the handshake
// is a plain WebSocket peer: its messages pass through untouched.
const Subprotocol = "tether.v1"

// Position is a place in a topic's history: its Epoch, which names the
// topic's current run of seqs (compare it only for equality: it changes
// when the history loses continuity), and the Seq of a message in it, 0
// meaning before the first message. It is what a client sends as `since`
// to resume (PROTOCOL.md, section 10).
type Position = adapter.Position

// Hub is an in-process registry of connections: it serves WebSocket
// handshakes, keeps each conn alive with a heartbeat, and delivers
// messages to one conn, a user's conns, a topic's subscribers or everyone.
// It is safe for use by multiple goroutines.
//
// Peers that ask for the subprotocol [Subprotocol] speak wire protocol v1
// (PROTOCOL.md): they subscribe, resume and see presence by themselves.
// Other peers are raw: they get the application's messages as they are,
// and the application decides their topics with [Hub.Subscribe].
//
// A Hub runs no goroutine of its own while idle: each conn has its reader,
// a writer while it has something to send, and presence changes are
// announced from short-lived timers. [Hub.Shutdown] ends them all.
//
// # Concurrency
//
// Goroutines. [Hub.Serve] runs on the HTTP server's goroutine and returns
// once the conn is registered and its reader started; each conn's
// goroutines are its own (see [Conn]). Presence timers are armed under a
// topic's lock, counted, and stopped or waited for by Shutdown. A broker's
// goroutines belong to the broker, which Shutdown closes last.
//
// Locks, taken in this order, never the reverse: a conn's hub state lock
// (its topics, and whether it is gone); a topic shard's lock, held only to
// find or drop a topic; a topic's lock, which orders its publications,
// subscriptions and presence, or a user shard's lock, which orders a
// user's direct messages (never both at once); then the locks of the conns
// being queued onto (see [Conn]). The registry shards' locks and the hub's own (closing state and
// the count of live conns) are taken alone. Calls to the broker that take
// a context are made with no lock held, but for Broker.Since, which runs
// under the topic's lock to keep its stream in order. Hooks are called
// with no hub lock held, but for [Observer].Drop (see there).
type Hub struct {
	cfg       *hubConfig
	connCfg   *config // shared by every conn of the hub
	onMessage func(*Conn, Message)
	broker    adapter.Broker // nil: the hub is alone
	node      *node
	// brokerDown is set while the broker reports its link lost: the hub
	// then delivers to its own conns only, without waiting on the broker.
	brokerDown   atomic.Bool
	brokerLinked atomic.Bool // the broker has reported its link up once
	brokerClose  sync.Once
	relayMu      sync.Mutex     // guards relayStopped
	relayStopped bool           // Shutdown or Close waits for relays
	relays       sync.WaitGroup // subscriptions relayed by other nodes
	// inboxMu orders, per user (striped), what is appended to a user's
	// inbox with its delivery and with the replay to a new conn.
	inboxMu [shards]sync.Mutex

	conns  [shards]connShard
	topics [shards]topicShard
	users  [shards]userShard
	seed   maphash.Seed

	mu      sync.Mutex // guards the fields below
	closing bool
	abrupt  bool          // Close: conns are dropped, not closed gracefully
	live    int           // conns registered or in their handshake
	drained chan struct{} // closed when closing and live is 0

	admission  *admission    // nil: every handshake is admitted
	topicKeys  atomic.Uint64 // the last key given to a latest-value topic
	dedupe     dedupe        // recent pub and send ids
	draining   atomic.Bool   // Rebalance of every conn: refuse new ones
	overloaded atomic.Bool   // the breaker is open
	breaker    *breaker      // nil without WithBreaker

	closed     atomic.Bool    // closing, for the publishing paths
	timers     sync.WaitGroup // armed presence timers
	timersDone atomic.Bool    // no presence timer may be armed any more

	count stats
}

// shards splits the registry, the topic index and the user index so that
// conns coming and going on many cores do not queue on one lock.
const shards = 32

type connShard struct {
	mu   sync.Mutex
	m    map[string]*Conn
	peak shrink.Peak // of m
}

type topicShard struct {
	mu   sync.Mutex
	m    map[string]*topic
	peak shrink.Peak // of m
}

type userShard struct {
	mu   sync.Mutex
	m    map[string][]*Conn   // the user's live conns
	peak shrink.Peak          // of m
	seen map[string]time.Time // when users with no live conn left
}

// maxLastSeen bounds how many offline users' last-seen times a user shard
// keeps; past it, the oldest are forgotten.
const maxLastSeen = 4096

// topic is one topic's subscribers and presence. Publications to it are
// serialised by mu, so that every subscriber gets them in seq order.
type topic struct {
	name string
	mu   sync.Mutex
	subs []*Conn
	idx  map[*Conn]int // position in subs
	nV1  int           // subscribers that speak protocol v1
	pres *presence     // nil when the topic does not track presence

	policy TopicPolicy
	key    uint64 // a latest-value topic's queue key; 0 for others

	// With a broker: the position of the last message delivered to subs
	// (zero until known), and the subscriptions waiting on Broker.Hold,
	// which keep the topic in the index meanwhile.
	pos     Position
	pending int
}

func (t *topic) empty() bool { return len(t.subs) == 0 && t.pres.empty() && t.pending == 0 }

// hubConn is a conn's state in its hub.
type hubConn struct {
	hub  *Hub
	id   string
	user string
	meta json.RawMessage
	v1   bool

	// Reader only.
	limiter *rate.Limiter // nil without a rate limit
	denials *rate.Limiter // messages refused by limiter
	faults  *rate.Limiter // malformed messages

	mu     sync.Mutex // guards topics and gone
	topics map[string]struct{}
	gone   bool

	// With a broker, while the conn's offline backlog is fetched: the
	// direct messages that arrive meanwhile, to queue after it. Guarded
	// by the user's shard lock.
	backlog *[][]byte
	// With an inbox, while the user's unacknowledged messages are
	// fetched: inbox messages sent meanwhile (v1 entries), which follow
	// them. Guarded by the user shard's lock.
	inboxLater *[][]byte
}

// maxSubscriptions bounds one conn's topics, so that a client cannot grow
// the topic index without limit.
const maxSubscriptions = 1024

// Refused messages allowed before a conn is closed: 10 in a burst, one a
// second sustained.
const (
	strikeRate  = 1
	strikeBurst = 10
)

// A hub keeps up to maxIdleWriters of its conns' writer goroutines idle,
// each for up to idleWriterTTL, for the next conn that has data to write
// (see internal/workers): enough that a paced fan-out to a thousand
// subscribers starts none, and an idle worker costs its stack, which the
// garbage collector shrinks, and a small struct.
const (
	maxIdleWriters = 1024
	idleWriterTTL  = 10 * time.Second
)

// NewHub returns a hub configured by opts. Every [Option] applies to the
// hub's conns. An invalid set of options is an error.
func NewHub(opts ...HubOption) (*Hub, error) {
	cfg, err := newHubConfig(opts)
	if err != nil {
		return nil, err
	}
	h := &Hub{cfg: cfg, seed: maphash.MakeSeed(), drained: make(chan struct{}), admission: newAdmission(cfg.admitRate, cfg.admitBurst)}
	for i := range shards {
		h.conns[i].m = make(map[string]*Conn)
		h.topics[i].m = make(map[string]*topic)
		h.users[i].m = make(map[string][]*Conn)
		h.users[i].seen = make(map[string]time.Time)
	}
	cc := *cfg.conn
	h.onMessage = cc.onMessage
	cc.onMessage = h.handle
	cc.onEnd = h.unregister
	cc.onDone = func(*Conn) { h.release() }
	cc.pingsSent = &h.count.pings
	cc.writers = workers.New(maxIdleWriters, idleWriterTTL)
	others := slices.DeleteFunc(slices.Clone(cc.subprotocols), func(p string) bool { return p == Subprotocol })
	cc.subprotocols = append([]string{Subprotocol}, others...)
	user := cc.observer
	cc.observer.Pong = func(c *Conn, rtt time.Duration) {
		h.count.rtt.add(rtt)
		if user.Pong != nil {
			user.Pong(c, rtt)
		}
	}
	cc.observer.Suspect = func(c *Conn) {
		h.count.suspects.Add(1)
		if user.Suspect != nil {
			user.Suspect(c)
		}
	}
	cc.observer.Drop = func(c *Conn, n int) {
		h.count.drops.Add(uint64(n))
		if user.Drop != nil {
			user.Drop(c, n)
		}
	}
	h.connCfg = &cc
	if b := cfg.broker; b != nil {
		h.broker, h.node = b, &node{h: h, id: newConnID()}
		// Down until the broker first reports its link up: meanwhile the
		// hub serves its own conns.
		h.brokerDown.Store(true)
		if err := b.Open(h.node); err != nil {
			return nil, fmt.Errorf("tether: broker: %w", err)
		}
	}
	h.breaker = newBreaker(h, cfg.breakerTrip)
	return h, nil
}

// ServeHTTP serves a WebSocket handshake, as [Hub.Serve] does, and logs
// a refusal at Debug level.
func (h *Hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := h.Serve(w, r); err != nil {
		h.connCfg.logger.Debug("tether: refused", "remote", r.RemoteAddr, "err", err)
	}
}

// Serve upgrades the request to a WebSocket conn and registers it. It
// returns once the conn is registered (the conn lives on after Serve
// returns: it does not hold up the handler), or with the reason it was
// refused, after answering the request:
//
//   - 503 and [ErrHubClosed] once [Hub.Shutdown] or [Hub.Close] has begun;
//   - 503 and [ErrHubFull] past [WithMaxConns];
//   - 403 and [ErrForbidden] for a cross-origin request that
//     [WithOriginPatterns] does not allow;
//   - 401 and [ErrUnauthorized] when [WithAuth] refuses it;
//   - whatever coder/websocket answers to a request that is not a valid
//     WebSocket handshake, and its error.
func (h *Hub) Serve(w http.ResponseWriter, r *http.Request) error {
	if wait, err := h.admit(); err != nil {
		h.count.refused.Add(1)
		// Whole seconds (RFC 9110), at least 1, rounded up.
		w.Header().Set("Retry-After", strconv.FormatInt(max(int64((wait+time.Second-1)/time.Second), 1), 10))
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return err
	}
	registered := false
	defer func() {
		if !registered {
			h.release()
		}
	}()
	if err := checkOrigin(r, h.connCfg.originPatterns); err != nil {
		http.Error(w, "tether: origin not allowed", http.StatusForbidden)
		return err
	}
	var user string
	if h.cfg.auth != nil {
		u, err := h.cfg.auth(r)
		if err != nil {
			http.Error(w, http.StatusText(http.StatusUnauthorized), http.StatusUnauthorized)
			return fmt.Errorf("%w: %w", ErrUnauthorized, err)
		}
		user = u
	}
	c, err := accept(w, r, h.connCfg)
	if err != nil {
		return err
	}
	hc := &hubConn{hub: h, id: newConnID(), user: user, v1: c.ws.Subprotocol() == Subprotocol}
	if h.cfg.connMeta != nil {
		if m, err := wire.CompactData(h.cfg.connMeta(r)); err == nil {
			hc.meta = m
		}
	}
	if h.cfg.rateLimit != rate.Inf {
		hc.limiter = rate.NewLimiter(h.cfg.rateLimit, h.cfg.rateBurst)
	}
	c.hc, c.coalesce = hc, hc.v1
	registered = true
	h.register(c)
	c.start() // Observer.Connect, then the reader
	return nil
}

// admit counts a handshake in, unless the hub is closing, past its
// admission rate or full; a refusal comes with how long the client should
// wait.
func (h *Hub) admit() (time.Duration, error) {
	if h.isClosing() || h.draining.Load() {
		return time.Second, ErrHubClosed
	}
	if h.overloaded.Load() {
		// Back when the breaker may have closed, spread over 2 to 5 s.
		return 2*time.Second + rand.N(3*time.Second), ErrOverloaded
	}
	if a := h.admission; a != nil {
		if ok, wait := a.take(time.Now()); !ok {
			return wait, ErrOverloaded
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing {
		return time.Second, ErrHubClosed
	}
	if h.cfg.maxConns > 0 && h.live >= h.cfg.maxConns {
		return time.Second, ErrHubFull
	}
	h.live++
	return 0, nil
}

// admission paces handshakes ([WithAdmission]) and gives each one it
// refuses a slot of its own to come back in, one every 1/rate from when
// the bucket next has a token, so that a crowd returns at the rate the
// hub admits.
type admission struct {
	lim  *rate.Limiter
	gap  time.Duration // 1/rate: between two slots
	mu   sync.Mutex
	next time.Time // the last slot handed out
}

func newAdmission(perSecond rate.Limit, burst int) *admission {
	if perSecond <= 0 || perSecond == rate.Inf {
		return nil
	}
	return &admission{lim: rate.NewLimiter(perSecond, burst), gap: time.Duration(float64(time.Second) / float64(perSecond))}
}

// take admits a handshake at now, or says how long its client should wait.
func (a *admission) take(now time.Time) (bool, time.Duration) {
	if a.lim.AllowN(now, 1) {
		return true, 0
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.next.Before(now) {
		// The first refusal since the line emptied: it starts when the
		// bucket next has a token.
		r := a.lim.ReserveN(now, 1)
		a.next = now.Add(r.DelayFrom(now))
		r.CancelAt(now)
	} else {
		a.next = a.next.Add(a.gap)
	}
	// The line forgets what is far ahead: refused clients that never come
	// back for their slot (a browser cannot read it, a scanner does not
	// care) must not make those who do wait long.
	if a.next.Sub(now) > admissionHorizon {
		a.next = now.Add(admissionHorizon)
	}
	return false, a.next.Sub(now)
}

// admissionHorizon caps the wait a refused handshake is given: the slots
// handed out reach at most this far ahead.
const admissionHorizon = time.Minute

// release counts a conn or handshake out.
func (h *Hub) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.live--
	if h.closing && h.live == 0 {
		close(h.drained)
	}
}

// checkOrigin allows requests without an Origin header (not from a
// browser), same-origin requests and origins matching a pattern, as
// coder/websocket does; it runs first so that the refusal has an error
// value of its own.
func checkOrigin(r *http.Request, patterns []string) error {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return nil
	}
	u, err := url.Parse(origin)
	if err != nil {
		return fmt.Errorf("%w: %q is not a URL", ErrForbidden, origin)
	}
	if strings.EqualFold(u.Host, r.Host) {
		return nil
	}
	for _, p := range patterns {
		target := u.Host
		if strings.Contains(p, "://") {
			target = u.Scheme + "://" + u.Host
		}
		if ok, _ := path.Match(strings.ToLower(p), strings.ToLower(target)); ok {
			return nil
		}
	}
	return fmt.Errorf("%w: %q on host %q", ErrForbidden, origin, r.Host)
}

func newConnID() string {
	var b [12]byte
	crand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func (h *Hub) shard(key string) int {
	return int(maphash.String(h.seed, key) % shards)
}

// register adds a new conn, not yet reading, to the registry and the user
// index. The welcome goes first in its queue, then what the offline store
// held for its user, so nothing sent to the user later can overtake them.
func (h *Hub) register(c *Conn) {
	hc := c.hc
	if hc.v1 {
		interval, timeout := c.Heartbeat()
		var limits wire.Limits
		if h.cfg.rateLimit != rate.Inf {
			limits = wire.Limits{PerSecond: float64(h.cfg.rateLimit), Burst: int64(h.cfg.rateBurst)}
		}
		c.enqueueControl(wire.AppendWelcome(nil, hc.id, interval, timeout, limits, dedupeWindow, nil))
	}
	if hc.user != "" {
		inbox := h.cfg.inbox != nil && hc.v1
		if inbox {
			// The replay of the inbox comes before any inbox message sent
			// from now on: those sent here wait (inboxMu), those relayed
			// from other nodes queue behind it (inboxLater).
			h.inboxMu[h.shard(hc.user)].Lock()
			hc.inboxLater = new([][]byte)
		}
		// Before the registry: nothing sent to every conn (Broadcast) may
		// overtake what was sent to this user earlier.
		if h.broker != nil {
			h.registerShared(c)
		} else {
			u := &h.users[h.shard(hc.user)]
			u.mu.Lock()
			u.m[hc.user] = append(u.m[hc.user], c)
			u.peak.Grew(len(u.m))
			delete(u.seen, hc.user)
			h.takeOffline(c, nil, nil)
			u.mu.Unlock()
		}
		if inbox {
			// Before the registry too, and so before any broadcast.
			h.replayInbox(c)
			h.inboxMu[h.shard(hc.user)].Unlock()
		}
	}

	s := &h.conns[h.shard(hc.id)]
	s.mu.Lock()
	s.m[hc.id] = c
	s.peak.Grew(len(s.m))
	s.mu.Unlock()
	h.count.conns.Add(1)
	h.count.connects.Add(1)

	h.mu.Lock()
	closing, abrupt := h.closing, h.abrupt
	h.mu.Unlock()
	switch {
	case abrupt:
		c.CloseNow()
	case closing:
		// Shutdown began during the handshake, maybe after its sweep of
		// the registry: this conn closes itself the same way.
		c.Close(websocket.StatusGoingAway, retryHint(h.Len()))
	}
}

// takeOffline queues for c, under its user's lock, the messages first
// (the broker's backlog), then those the hub's own offline store kept,
// then later (sent while the broker answered).
func (h *Hub) takeOffline(c *Conn, first, later [][]byte) {
	user := c.hc.user
	msgs, err := h.cfg.offline.Take(context.Background(), user)
	if err != nil {
		h.connCfg.logger.Warn("tether: offline store", "user", user, "err", err)
	}
	msgs = append(append(first, msgs...), later...)
	if !h.deliverDirect(c, msgs) {
		// The conn ended already: keep the backlog, in order (the user's
		// lock holds off SendToUser for this user).
		for _, m := range msgs {
			if err := h.cfg.offline.Store(context.Background(), user, m); err != nil {
				h.connCfg.logger.Warn("tether: offline store", "user", user, "err", err)
			}
		}
	}
}

// deliverDirect queues the offline backlog for c, whatever its queue's
// bounds (see enqueueAll): for a v1 peer joined in entries of up to
// maxCoalesced bytes, which the writer sends as they are.
// It reports false if c has ended, and nothing was queued.
func (h *Hub) deliverDirect(c *Conn, msgs [][]byte) bool {
	if len(msgs) == 0 {
		return true
	}
	if !c.coalesce {
		return c.enqueueAll(msgs...)
	}
	var j joiner
	for _, m := range msgs {
		if e, ok := directEntry(m); ok {
			j.add(e)
		}
	}
	return c.enqueueAll(j.entries()...)
}

// unregister removes an ended conn from the hub. It is the conns' onEnd.
func (h *Hub) unregister(c *Conn, reason error) {
	hc := c.hc
	if hc == nil {
		return
	}
	hc.mu.Lock()
	hc.gone = true
	topics := hc.topics
	hc.topics = nil
	hc.mu.Unlock()
	for name := range topics {
		h.leave(c, name)
	}

	s := &h.conns[h.shard(hc.id)]
	s.mu.Lock()
	delete(s.m, hc.id)
	s.m = shrink.Map(s.m, &s.peak)
	s.mu.Unlock()
	h.count.conns.Add(-1)

	if hc.user != "" {
		u := &h.users[h.shard(hc.user)]
		u.mu.Lock()
		list := u.m[hc.user]
		for i, o := range list {
			if o == c {
				list = append(list[:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(u.m, hc.user)
			u.m = shrink.Map(u.m, &u.peak)
			u.remember(hc.user, time.Now())
			if h.broker != nil {
				h.broker.Disconnect(hc.user)
			}
		} else {
			u.m[hc.user] = list
		}
		u.mu.Unlock()
	}

	h.count.disconnects.Add(1)
	switch {
	case errors.Is(reason, ErrQueueFull), errors.Is(reason, ErrWriteTimeout):
		h.count.evictions.Add(1)
	case errors.Is(reason, ErrHeartbeatTimeout):
		h.count.deadPeers.Add(1)
	}
}

// remember records when a user's last conn left, forgetting the oldest
// records past maxLastSeen.
func (u *userShard) remember(user string, at time.Time) {
	if len(u.seen) >= maxLastSeen {
		var oldest string
		var t time.Time
		for k, v := range u.seen {
			if oldest == "" || v.Before(t) {
				oldest, t = k, v
			}
		}
		delete(u.seen, oldest)
	}
	u.seen[user] = at
}

// Len returns the number of registered conns.
func (h *Hub) Len() int { return int(h.count.conns.Load()) }

// Conn returns the registered conn with this ID (see [Conn.ID]), or nil.
func (h *Hub) Conn(id string) *Conn {
	s := &h.conns[h.shard(id)]
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.m[id]
}

// Broadcast sends data, text in valid UTF-8 ([ErrInvalidUTF8] otherwise),
// to every conn of the hub: as a direct message to protocol v1 peers, and
// byte for byte in a text message to raw peers. With a broker that
// relays (redisbroker does), it reaches every conn of every node: this
// node's at once, the others' once the broker has taken it, which
// Broadcast waits for; [ErrBrokerDown] says the other nodes could not be
// reached. Broadcast keeps no reference to data. It never waits on a
// conn: one whose queue is full is handled by the overflow policy.
func (h *Hub) Broadcast(data []byte) error { return h.broadcastAll(data, false) }

// BroadcastBinary is [Hub.Broadcast] for bytes, which raw peers get in a
// binary message.
func (h *Hub) BroadcastBinary(data []byte) error { return h.broadcastAll(data, true) }

func (h *Hub) broadcastAll(data []byte, binary bool) error {
	if err := h.broadcast(data, binary); err != nil || h.broker == nil {
		return err
	}
	return h.relay(relayCmd{Op: relayBroadcast, Data: data, Binary: binary})
}

func (h *Hub) broadcast(data []byte, binary bool) error {
	raw, v1, err := h.encodeDirect(data, binary)
	if err != nil {
		return err
	}
	for i := range h.conns {
		s := &h.conns[i]
		s.mu.Lock()
		for _, c := range s.m {
			if c.coalesce {
				c.enqueue(v1)
			} else {
				c.enqueue(raw)
			}
		}
		s.mu.Unlock()
	}
	return nil
}

// encodeDirect checks data and returns it as raw peers get it (which is
// also what the offline store keeps) and as v1 peers get it (a direct msg).
func (h *Hub) encodeDirect(data []byte, binary bool) (raw, v1 []byte, err error) {
	if h.isClosing() {
		return nil, nil, ErrHubClosed
	}
	raw, stored, err := ownData(data, binary)
	if err != nil {
		return nil, nil, err
	}
	return raw, msgEntry("", "", 0, stored), nil
}

// isClosing reports whether Shutdown or Close has begun, without the
// lock that every publisher would otherwise take.
func (h *Hub) isClosing() bool { return h.closed.Load() }

// SendToUser sends data, text, to every live conn of the user, as
// [Hub.Broadcast] does to all. When the user has none, the message is kept
// in the offline store (see [WithOfflineStore]) and delivered, in order
// with the others kept, when the user next connects; an error wrapping
// [adapter.ErrOfflineFull] means it was not kept.
func (h *Hub) SendToUser(userID string, data []byte) error {
	return h.sendToUser(userID, data, false)
}

// SendToUserBinary is [Hub.SendToUser] for bytes, which raw peers get in
// a binary message.
func (h *Hub) SendToUserBinary(userID string, data []byte) error {
	return h.sendToUser(userID, data, true)
}

func (h *Hub) sendToUser(userID string, data []byte, binary bool) error {
	raw, v1, err := h.encodeDirect(data, binary)
	if err != nil {
		return err
	}
	if h.cfg.inbox != nil {
		return h.sendToInbox(userID, raw)
	}
	if h.broker != nil && !h.brokerDown.Load() {
		ctx, cancel := brokerContext()
		err := h.broker.SendToUser(ctx, userID, raw)
		cancel()
		if err == nil || errors.Is(err, adapter.ErrOfflineFull) {
			return err
		}
		h.count.localOnly.Add(1)
	}
	u := &h.users[h.shard(userID)]
	u.mu.Lock()
	defer u.mu.Unlock()
	if !h.sendToUserLocked(userID, raw, v1) {
		return h.cfg.offline.Store(context.Background(), userID, raw)
	}
	return nil
}

// sendToUserLocked queues a direct message for the user's conns, its
// user shard locked, and reports whether any took it. A conn still
// taking its offline backlog from the broker gets it after the backlog.
func (h *Hub) sendToUserLocked(userID string, raw, v1 []byte) bool {
	taken := false
	for _, c := range h.users[h.shard(userID)].m[userID] {
		if b := c.hc.backlog; b != nil {
			*b = append(*b, raw)
			taken = true
			continue
		}
		var err error
		if c.coalesce {
			err = c.enqueue(v1)
		} else {
			err = c.enqueue(raw)
		}
		// A conn that ended but is not unregistered yet takes nothing.
		taken = taken || !errors.Is(err, net.ErrClosed)
	}
	return taken
}

// Publish sends data, text in valid UTF-8 ([ErrInvalidUTF8] otherwise),
// to the subscribers of topic: byte for byte in a text message to raw
// peers, and as a topic message with the topic's next seq to protocol v1
// peers; and keeps it in the topic's history for clients that resume. It
// is encoded once, whatever the number of subscribers; Publish keeps no
// reference to data. Each subscriber gets the topic's messages in
// publication order. Publish never blocks on a subscriber: one whose
// queue is full is handled by the overflow policy.
//
// A JSON value reaches v1 peers inline in a protocol line (on one line:
// a value that spans lines is compacted, and with a broker, raw peers get
// it compacted too); other text, and binary data, after the line in a
// binary message (PROTOCOL.md, "Binary messages").
func (h *Hub) Publish(topic string, data []byte) error {
	return h.publishData(topic, data, false)
}

// PublishBinary is [Hub.Publish] for bytes, which raw peers get in a
// binary message and the [Client] and tether.js as bytes.
func (h *Hub) PublishBinary(topic string, data []byte) error {
	return h.publishData(topic, data, true)
}

func (h *Hub) publishData(topic string, data []byte, binary bool) error {
	if err := checkTopic(topic); err != nil {
		return err
	}
	if h.isClosing() {
		return ErrHubClosed
	}
	raw, stored, err := ownData(data, binary)
	if err != nil {
		return err
	}
	return h.publish(topic, raw, stored)
}

// publish publishes data, which the hub owns from now on: raw for raw
// peers, data in stored form (the same slice unless raw is JSON spanning
// lines) for the history and v1 peers.
func (h *Hub) publish(name string, raw, data []byte) error {
	if h.broker != nil {
		return h.publishShared(name, data)
	}
	s := &h.topics[h.shard(name)]
	s.mu.Lock()
	t := s.m[name]
	if t == nil {
		// No subscriber: history only. The shard lock orders this with a
		// subscription that would create the topic.
		_, err := h.cfg.history.Append(context.Background(), name, data)
		s.mu.Unlock()
		if err != nil {
			return historyErr(err)
		}
		h.count.published.Add(1)
		return nil
	}
	t.mu.Lock()
	s.mu.Unlock()
	defer t.mu.Unlock()
	pos, err := h.cfg.history.Append(context.Background(), name, data)
	if err != nil {
		return historyErr(err)
	}
	h.count.published.Add(1)
	h.fanOutLocked(t, pos, raw, data)
	return nil
}

// fanOutLocked queues a message of t, which is locked, for its
// subscribers: raw for raw peers, data (stored form) in a topic message
// at pos for v1 peers.
func (h *Hub) fanOutLocked(t *topic, pos Position, raw, data []byte) {
	var v1 []byte
	if t.nV1 > 0 {
		v1 = msgEntry(t.name, pos.Epoch, pos.Seq, data)
	}
	prio, key := t.policy.Priority, t.key
	if prio < PriorityNormal && h.overloaded.Load() {
		h.count.shed.Add(uint64(len(t.subs)))
		return
	}
	for _, c := range t.subs {
		if c.coalesce {
			c.enqueueAt(v1, prio, key)
		} else {
			c.enqueueAt(raw, prio, key)
		}
	}
}

func historyErr(err error) error { return fmt.Errorf("tether: history: %w", err) }

// Subscribe subscribes conn c, which must be one of the hub's, to topic:
// c receives the topic's messages published from now on. Subscribing
// twice changes nothing. It is how the application picks the topics of
// raw peers; protocol v1 peers may also subscribe by themselves.
func (h *Hub) Subscribe(c *Conn, topic string) error {
	if err := checkTopic(topic); err != nil {
		return err
	}
	return h.subscribe(c, topic, nil, false, "")
}

// errNotMember refuses an operation on a conn of another hub, or on a conn
// made by Accept or Wrap.
var errNotMember = errors.New("tether: the conn does not belong to this hub")

// subscribe subscribes c to name and, for a client's request, queues the
// ack (when id is set), then the replay or resync for since, or else the
// topic's last message when latest is set, then the topic's presence, all
// before any live message of the topic.
func (h *Hub) subscribe(c *Conn, name string, since *wire.Since, latest bool, id string) error {
	hc := c.hc
	if hc == nil || hc.hub != h {
		return errNotMember
	}
	if h.broker == nil {
		_, err := h.subscribeOnce(c, name, since, latest, id, false)
		return err
	}
	hc.mu.Lock()
	_, already := hc.topics[name]
	hc.mu.Unlock()
	if already {
		_, err := h.subscribeOnce(c, name, since, latest, id, false)
		return err
	}
	// The broker is asked to hold the topic without any lock held; the
	// topic is pinned meanwhile, so that the presence snapshot that Hold
	// delivers finds it.
	t := h.lockTopic(name)
	t.pending++
	t.mu.Unlock()
	ctx, cancel := brokerContext()
	if err := h.broker.Hold(ctx, name); err != nil {
		h.connCfg.logger.Debug("tether: broker hold", "topic", name, "err", err)
	}
	cancel()
	added, err := h.subscribeOnce(c, name, since, latest, id, true)
	if !added {
		h.broker.Release(name)
	}
	return err
}

// subscribeOnce carries out subscribe under c's and the topic's locks,
// and reports whether it added c to the topic's subscribers. pinned is
// set when subscribe has pinned the topic.
func (h *Hub) subscribeOnce(c *Conn, name string, since *wire.Since, latest bool, id string, pinned bool) (bool, error) {
	hc := c.hc
	hc.mu.Lock()
	defer hc.mu.Unlock()
	var t *topic
	if pinned {
		t = h.lockTopic(name)
		t.pending--
	}
	if hc.gone {
		if t != nil {
			h.unpinLocked(t)
		}
		return false, fmt.Errorf("tether: subscribe: %w", net.ErrClosed)
	}
	_, already := hc.topics[name]
	if !already && len(hc.topics) >= maxSubscriptions {
		if t != nil {
			h.unpinLocked(t)
		}
		return false, &ProtocolError{Code: CodeBadRequest, Reason: "too many subscriptions (the limit is " + strconv.Itoa(maxSubscriptions) + ")", ID: id}
	}

	if t == nil {
		t = h.lockTopic(name)
	}
	// since wins over latest: a replay holds the latest message already.
	// Raw peers never get one (they cannot ask, and Hub.Subscribe does not).
	latest = latest && since == nil && c.coalesce
	var catchUp [][]byte
	var last Position
	var err error
	switch {
	case already:
	case h.broker != nil:
		catchUp, last, err = h.catchUpSharedLocked(c, t, since, latest)
	case since != nil:
		catchUp, last, err = h.catchUp(c, name, since)
	case latest:
		catchUp, last, err = h.catchUpLatest(name)
	case id != "" && c.coalesce:
		// The ack tells the client where live messages start, so that it
		// can resume from there even if none arrive before a reconnect.
		_, last, _, err = h.cfg.history.Since(context.Background(), name, Position{})
	}
	if err != nil {
		h.unpinLocked(t)
		return false, &ProtocolError{Code: CodeInternal, Reason: "history unavailable", ID: id}
	}
	switch {
	case id == "":
	case last.Epoch != "":
		c.enqueueControl(wire.AppendSubAck(nil, id, last.Epoch, last.Seq))
	default:
		c.enqueueControl(wire.AppendAck(nil, id))
	}
	if catchUp != nil {
		c.enqueueAllAt(t.policy.Priority, catchUp...) // bounded by catchUp: it must not be lost
	}
	if !already {
		if hc.topics == nil {
			hc.topics = make(map[string]struct{})
		}
		hc.topics[name] = struct{}{}
		t.idx[c] = len(t.subs)
		t.subs = append(t.subs, c)
		if c.coalesce {
			t.nV1++
		}
		if t.pres != nil {
			if c.coalesce {
				c.enqueueControl(t.pres.snapshot(name))
			}
			if hc.user != "" {
				h.presenceJoinLocked(t, c)
			}
		}
	}
	h.unlockTopic(t)
	return !already, nil
}

// unpinLocked unlocks t, pinned by a subscription that did not happen,
// forgetting what the broker told it if nothing else holds it.
func (h *Hub) unpinLocked(t *topic) {
	if len(t.subs) == 0 && t.pending == 0 {
		t.pos = Position{}
		t.forgetRemoteLocked()
	}
	h.unlockTopic(t)
}

// catchUp returns what a v1 client resuming at since must receive before
// live messages: the missed messages joined in queue entries of up to
// maxCoalesced bytes, or a resync when history cannot replay them or they
// would not fit in c's queue; and the topic's position, where live
// messages start. The topic must be locked.
func (h *Hub) catchUp(c *Conn, name string, since *wire.Since) ([][]byte, Position, error) {
	entries, last, ok, err := h.cfg.history.Since(context.Background(), name, Position{Epoch: since.Epoch, Seq: since.Seq})
	if err != nil {
		return nil, last, err
	}
	if !ok {
		return [][]byte{wire.AppendResync(nil, name, last.Epoch)}, last, nil
	}
	return replay(c, name, entries, last), last, nil
}

// catchUpLatest returns the last message of topic name, for a v1 client
// that asked for it on subscribing, when history still holds it, and the
// position the ack gives: the one just before that message, which thus
// follows as the next one and moves the client's position to its own.
// Without such a message it returns nothing, and the topic's position.
// The topic must be locked.
func (h *Hub) catchUpLatest(name string) ([][]byte, Position, error) {
	ctx := context.Background()
	_, last, _, err := h.cfg.history.Since(ctx, name, Position{})
	if err != nil || last.Seq == 0 {
		return nil, last, err
	}
	entries, last, ok, err := h.cfg.history.Since(ctx, name, Position{Epoch: last.Epoch, Seq: last.Seq - 1})
	if err != nil {
		return nil, last, err
	}
	return latestEntry(name, entries, last, ok)
}

// latestEntry picks, from what History.Since returned, the message at
// last (the topic's last) and returns it encoded with the position before
// it; or nothing and last when it is not there: the history no longer
// keeps it, or keeps no messages.
func latestEntry(name string, entries []adapter.HistoryEntry, last Position, ok bool) ([][]byte, Position, error) {
	if !ok || last.Seq == 0 || len(entries) == 0 || entries[len(entries)-1].Seq != last.Seq {
		return nil, last, nil
	}
	e := entries[len(entries)-1]
	return [][]byte{msgEntry(name, last.Epoch, e.Seq, e.Data)}, Position{Epoch: last.Epoch, Seq: last.Seq - 1}, nil
}

// replay encodes entries of topic name, which end at last, for c: joined
// in queue entries of up to maxCoalesced bytes, or as a resync when they
// would not fit in c's queue.
func replay(c *Conn, name string, entries []adapter.HistoryEntry, last Position) [][]byte {
	if len(entries) == 0 {
		return nil
	}
	var j joiner
	total := 0
	for _, e := range entries {
		m := msgEntry(name, last.Epoch, e.Seq, e.Data)
		if total += len(m); total > c.cfg.queueBytes/2 {
			// Too much to queue without crowding out live messages.
			return [][]byte{wire.AppendResync(nil, name, last.Epoch)}
		}
		j.add(m)
	}
	return j.entries()
}

// lockTopic returns the topic called name, locked, creating it if needed.
func (h *Hub) lockTopic(name string) *topic {
	s := &h.topics[h.shard(name)]
	s.mu.Lock()
	t := s.m[name]
	if t == nil {
		t = &topic{name: name, idx: make(map[*Conn]int)}
		t.pres = h.newPresence(name)
		if f := h.cfg.topicPolicy; f != nil {
			t.policy = f(name)
			if t.policy.Latest {
				t.key = h.topicKeys.Add(1)
			}
		}
		s.m[name] = t
		s.peak.Grew(len(s.m))
		h.count.topics.Add(1)
	}
	t.mu.Lock()
	s.mu.Unlock()
	return t
}

// unlockTopic unlocks t, first removing it from the index if it holds
// nothing any more.
func (h *Hub) unlockTopic(t *topic) {
	if !t.empty() {
		t.mu.Unlock()
		return
	}
	t.mu.Unlock()
	s := &h.topics[h.shard(t.name)]
	s.mu.Lock()
	t.mu.Lock()
	if t.empty() && s.m[t.name] == t {
		delete(s.m, t.name)
		s.m = shrink.Map(s.m, &s.peak)
		h.count.topics.Add(-1)
	}
	t.mu.Unlock()
	s.mu.Unlock()
}

// Unsubscribe ends c's subscription to topic, if any. Messages already
// queued for c are still sent.
func (h *Hub) Unsubscribe(c *Conn, topic string) error {
	hc := c.hc
	if hc == nil || hc.hub != h {
		return errNotMember
	}
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if _, ok := hc.topics[topic]; !ok {
		return nil
	}
	delete(hc.topics, topic)
	h.leave(c, topic)
	return nil
}

// lockExisting returns the topic called name, locked, or nil if the
// index has none.
func (h *Hub) lockExisting(name string) *topic {
	s := &h.topics[h.shard(name)]
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.m[name]
	if t != nil {
		t.mu.Lock()
	}
	return t
}

// leave removes c from the topic's subscribers and presence.
func (h *Hub) leave(c *Conn, name string) {
	t := h.lockExisting(name)
	if t == nil {
		return
	}
	i, subscribed := t.idx[c]
	if subscribed {
		last := len(t.subs) - 1
		t.subs[i] = t.subs[last]
		t.idx[t.subs[i]] = i
		t.subs[last] = nil
		t.subs = t.subs[:last]
		delete(t.idx, c)
		if c.coalesce {
			t.nV1--
		}
	}
	if t.pres != nil && c.hc.user != "" {
		h.presenceLeaveLocked(t, c)
	}
	if h.broker != nil && len(t.subs) == 0 && t.pending == 0 {
		// The broker stops delivering the topic here: the cursor would go
		// stale, and a later subscriber must start from the topic's head.
		t.pos = Position{}
		t.forgetRemoteLocked()
	}
	h.unlockTopic(t)
	if h.broker != nil && subscribed {
		h.broker.Release(name)
	}
}

// Topics returns the topics c is subscribed to.
func (c *Conn) Topics() []string {
	hc := c.hc
	if hc == nil {
		return nil
	}
	hc.mu.Lock()
	defer hc.mu.Unlock()
	out := make([]string, 0, len(hc.topics))
	for t := range hc.topics {
		out = append(out, t)
	}
	return out
}

// ID returns the conn's ID in its hub, which is also the session of its
// welcome; "" for a conn made by [Accept] or [Wrap].
func (c *Conn) ID() string {
	if c.hc == nil {
		return ""
	}
	return c.hc.id
}

// UserID returns the user that [WithAuth] named for the conn; "" for an
// anonymous conn or one made by [Accept] or [Wrap].
func (c *Conn) UserID() string {
	if c.hc == nil {
		return ""
	}
	return c.hc.user
}

// Shutdown closes the hub gracefully. It refuses new conns with 503,
// closes the registered ones with 1001 (going away) and a reconnect hint
// (retry_ms, drawn for each conn from a window that widens with the number
// of conns, 1 ms each, between 1 s and 30 s, so that they do not all come
// back at once), in batches, and waits for them to end. When ctx ends
// first, it drops the remaining conns at once and returns ctx's error. It
// returns only when every goroutine of the hub has returned.
//
// http.Server.Shutdown does not close hijacked connections: register
// Shutdown with http.Server.RegisterOnShutdown, or call it after. net/http
// runs such hooks in goroutines of their own and does not wait for them,
// so wait for Shutdown to return before the process exits (see the
// example).
func (h *Hub) Shutdown(ctx context.Context) error {
	return h.shutdown(ctx, true)
}

// Close drops every conn at once, without a close handshake, and returns
// when every goroutine of the hub has returned. New conns are refused.
func (h *Hub) Close() error {
	return h.shutdown(context.Background(), false)
}

// Ready returns a readiness check for a load balancer, or for a
// Kubernetes readinessProbe: it answers 200 while the hub takes new conns
// and 503, with a Retry-After, while it would refuse them: once
// [Hub.Shutdown] or [Hub.Close] has begun, after [Hub.Rebalance] of all
// conns, while overloaded ([WithBreaker]), and at [WithMaxConns]. It says
// nothing about the conns already there, which are not affected. An empty
// [WithAdmission] bucket does not count: in a reconnect storm every node's
// is, and a load balancer with no ready node would refuse everyone
// without the Retry-After that spreads them.
func (h *Hub) Ready() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if why := h.unready(); why != nil {
			w.Header().Set("Retry-After", "1")
			http.Error(w, why.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok\n")
	})
}

// unready says why the hub would refuse a handshake now, or nil.
func (h *Hub) unready() error {
	if h.isClosing() || h.draining.Load() {
		return ErrHubClosed
	}
	if h.overloaded.Load() {
		return ErrOverloaded
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cfg.maxConns > 0 && h.live >= h.cfg.maxConns {
		return ErrHubFull
	}
	return nil
}

// Rebalance moves fraction (0 to 1) of the hub's conns, picked at random,
// to other nodes: for after a scale-up, when the new nodes have none. It
// closes them with 1001 (going away) and a reconnect hint under a second,
// one at a time, evenly over the period over, so that their clients come
// back through the load balancer a few at a time, and resume where they
// were. It returns how many it closed, when done or when ctx ends.
//
// With fraction 1 the hub drains: from the call on it refuses new conns
// with 503 and [ErrHubClosed], and [Hub.Ready] answers 503, for good (also
// when ctx ends first). Call [Hub.Shutdown] once it returns. Conns still
// in their handshake are not moved; Shutdown closes them.
func (h *Hub) Rebalance(ctx context.Context, fraction float64, over time.Duration) (int, error) {
	if !(fraction >= 0 && fraction <= 1) {
		return 0, fmt.Errorf("tether: rebalance: fraction %v is not between 0 and 1", fraction)
	}
	if fraction == 1 {
		h.draining.Store(true)
	}
	all := h.snapshot()
	rand.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	n := int(math.Round(fraction * float64(len(all))))
	start := time.Now()
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for i, c := range all[:n] {
		// The i-th goes at (i+1)/n of the period: the last at its end.
		at := time.Duration(float64(over) * float64(i+1) / float64(n))
		if wait := time.Until(start.Add(at)); wait > 0 {
			if timer == nil {
				timer = time.NewTimer(wait)
			} else {
				timer.Reset(wait)
			}
			select {
			case <-timer.C:
			case <-ctx.Done():
				return i, ctx.Err()
			}
		}
		c.Close(websocket.StatusGoingAway, "retry_ms="+strconv.FormatInt(rand.Int64N(1000)+1, 10))
	}
	return n, nil
}

// shutdownBatch conns are sent their close frame at a time, with a pause
// between batches, so that a large hub does not spend a burst of CPU.
const (
	shutdownBatch = 256
	shutdownPause = 5 * time.Millisecond
)

func (h *Hub) shutdown(ctx context.Context, graceful bool) error {
	h.mu.Lock()
	if !h.closing {
		h.closing = true
		h.closed.Store(true)
		if h.live == 0 {
			close(h.drained)
		}
	}
	h.mu.Unlock()

	all := h.snapshot()
	var err error
	if graceful {
		hint := len(all)
		for i, c := range all {
			if i > 0 && i%shutdownBatch == 0 {
				select {
				case <-time.After(shutdownPause):
				case <-ctx.Done():
				}
			}
			if ctx.Err() != nil {
				break
			}
			c.Close(websocket.StatusGoingAway, retryHint(hint))
		}
		select {
		case <-h.drained:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	if !graceful || err != nil {
		h.mu.Lock()
		h.abrupt = true
		h.mu.Unlock()
		for _, c := range h.snapshot() {
			c.CloseNow()
		}
		// Registered conns end at once now; a handshake in progress
		// registers, sees the hub closing and closes itself.
		<-h.drained
	}
	h.stopTimers()
	h.connCfg.writers.Close() // every conn has ended: its writer too
	h.breaker.close()
	h.stopRelays()
	if h.broker != nil {
		if cerr := h.closeBroker(); err == nil {
			err = cerr
		}
	}
	return err
}

func (h *Hub) snapshot() []*Conn {
	var all []*Conn
	for i := range h.conns {
		s := &h.conns[i]
		s.mu.Lock()
		for _, c := range s.m {
			all = append(all, c)
		}
		s.mu.Unlock()
	}
	return all
}

// retryHint returns a close reason that asks a client to wait before it
// reconnects, drawn from a window of 1 ms per conn, between 1 s and 30 s.
func retryHint(conns int) string {
	window := min(max(time.Duration(conns)*time.Millisecond, time.Second), 30*time.Second)
	return "retry_ms=" + strconv.FormatInt(rand.Int64N(window.Milliseconds())+1, 10)
}
