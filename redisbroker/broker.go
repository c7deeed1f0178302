// Package redisbroker links tether hubs in several processes through
// Redis: one server, one behind Sentinel, or a Redis Cluster. It is a
// [adapter.Broker].
//
//	rdb := redis.NewUniversalClient(&redis.UniversalOptions{Addrs: []string{"127.0.0.1:6379"}})
//	hub, err := tether.NewHub(tether.WithBroker(redisbroker.New(rdb)))
//	...
//	hub.Shutdown(ctx) // closes the broker
//	rdb.Close()
//
// The same constructor takes a [redis.Client], a failover client of
// Sentinel ([redis.NewFailoverClient], or UniversalOptions with
// MasterName) or a [redis.ClusterClient] (UniversalOptions with several
// Addrs). It needs Redis 7.0 or later, for sharded pub/sub.
//
// A topic's publications are numbered and kept in a Redis stream by one
// Lua script, which also publishes them on the topic's channel with
// SPUBLISH, so every node sees one order. A node subscribes (SSUBSCRIBE)
// to a topic's channel only while one of its conns holds the topic, so in
// a cluster it receives only the topics it holds, from the masters that
// serve them, over one connection per master. Direct messages go to the
// channel of each node where the user has a conn, or to the user's
// offline stream. Presence lives in a hash per topic, written by each
// node for its own users; each node renews its own expiry in a sorted set
// (its heartbeat), and when a node stops renewing, another removes what
// it recorded and announces its users' leaves.
//
// Beyond [adapter.Broker], it relays the hub's operations on every conn
// or on a user's conns to the other nodes ([adapter.Relay]: Broadcast,
// DisconnectUser, SubscribeUser, LastSeen), drops a client's repeated
// request on any node ([adapter.Deduper]), and keeps the users' inboxes
// for tether.WithInbox ([Broker.Inbox]).
//
// Every key and channel of one topic (or user, or node) carries the same
// hash tag, so that each script touches one slot of a cluster; the tag is
// a hash of the name, so names spread evenly over the slots, and so over
// the masters, whatever they look like.
//
// When Redis cannot be reached, or a master of the cluster fails, the
// broker says so to the hub, which goes on delivering to its own conns,
// and reconnects with the backoff of [WithBackoff]; once back it
// re-subscribes, writes its users and presence again, and the hub catches
// up every topic it holds: it replays what it missed or, when a failover
// lost messages, tells the topic's clients to resync (see "run_id" in
// scripts.go).
package redisbroker

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tether-ws/tether/adapter"
)

// ErrUnavailable is returned, wrapped, while the broker has no working
// link to Redis.
var ErrUnavailable = errors.New("redisbroker: redis unavailable")

// Broker is a [adapter.Broker] over Redis. Create it with [New] and pass
// it to [tether.WithBroker]; it serves one hub.
type Broker struct {
	rdb     redis.UniversalClient
	cluster *redis.ClusterClient // rdb, when it is a cluster's
	cfg     config
	log     *slog.Logger

	node adapter.Node
	id   string
	// ownChannel is this node's channel, set with id: the numbering
	// scripts check for its subscription on every call (sameRun).
	ownChannel string

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex      // guards the fields below
	sess      *session        // nil between sessions
	live      context.Context // ends with the session; valid while up
	gen       uint64          // counts sessions: a Hold waiting on one that ended gives up
	up        bool            // subscribed and reconciled: calls go to Redis
	holds     map[string]*hold
	users     map[string]struct{}                        // users with a conn here
	present   map[string]map[string][]adapter.MemberConn // topic → user → conns here
	snapshots map[string]*pendingSnapshot                // by marker
	ops       []op                                       // for the writer, in order
	held      []string                                   // direct messages received before up, in order
	run       string                                     // the run_id of the server (not a cluster), read at each session
	runs      map[string]string                          // a cluster's masters' run_ids, by address, read once a session
	directMu  sync.Mutex                                 // orders direct deliveries with reconcile's
	wake      chan struct{}
	closing   bool

	writerStop, writerDone chan struct{}
}

// session is one run of the broker's link to Redis: a pub/sub connection
// to each server it subscribes to channels of (one server, or in a
// cluster the masters of the slots of those channels). The connections
// end together: when one fails, or a cluster moves a slot away, the next
// session subscribes again to wherever the channels are then.
type session struct {
	ctx       context.Context
	cancel    context.CancelFunc
	subs      map[string]*redis.PubSub // by server address; "" for a server that is not a cluster's
	unsubs    map[string]int           // SUNSUBSCRIBEs sent and not yet confirmed, by channel
	nodeReady chan struct{}            // closed when the node's channel is subscribed
	err       error                    // why it ended
	receivers sync.WaitGroup
}

// hold is a topic's references and the SSUBSCRIBEs sent for it.
type hold struct {
	n               int
	sent, confirmed uint64
	changed         chan struct{} // closed and replaced at each confirmation
	channel         string
	server          string // the address its SSUBSCRIBE went to in this session
	subscribed      bool   // whether it went
}

// op is a write that the writer goroutine makes in order. An op made for
// a session that has ended is skipped, since the next session writes the
// records in full, unless it is durable (a message to keep offline, which
// no record holds).
type op struct {
	run     func(ctx context.Context) ([][]byte, error)
	gen     uint64
	durable bool
	reply   *handoff // nil: nobody waits
}

// handoff passes an op's result to a waiter that may give up: then the
// writer deals with the messages itself, so that none is lost.
type handoff struct {
	mu        sync.Mutex
	result    chan opResult // buffered
	abandoned bool
	user      string // whose offline messages they are
}

type opResult struct {
	msgs [][]byte
	err  error
}

// New returns a broker over rdb, configured by opts. It does not own rdb:
// close rdb after the hub has shut down. rdb may be a [redis.Client], a
// Sentinel failover client or a [redis.ClusterClient].
func New(rdb redis.UniversalClient, opts ...Option) *Broker {
	cfg := defaults()
	for _, o := range opts {
		o(&cfg)
	}
	log := cfg.logger
	if log == nil {
		log = slog.Default()
	}
	cluster, _ := rdb.(*redis.ClusterClient)
	return &Broker{
		rdb:       rdb,
		cluster:   cluster,
		cfg:       cfg,
		log:       log,
		holds:     make(map[string]*hold),
		users:     make(map[string]struct{}),
		present:   make(map[string]map[string][]adapter.MemberConn),
		snapshots: make(map[string]*pendingSnapshot),
		wake:      make(chan struct{}, 1),
	}
}

// names are the keys and channels of one topic, user or node: P:{tag}:K:N
// for prefix P, kind K and name N. They share the hash tag, so that a
// script may touch all of them in a cluster; the tag is a 64-bit hash of
// the name, so that names spread evenly over the cluster's slots however
// alike they are, and a name holding braces cannot break the tag.
type names struct{ base, name string }

func (b *Broker) names(name string) names {
	h := fnv.New64a()
	h.Write([]byte(name))
	return names{b.cfg.prefix + ":{" + strconv.FormatUint(h.Sum64(), 36) + "}:", name}
}

func (n names) key(kind string) string { return n.base + kind + ":" + n.name }

func (b *Broker) key(kind, name string) string     { return b.names(name).key(kind) }
func (b *Broker) topicChannel(topic string) string { return b.key("t", topic) }
func (b *Broker) nodeChannel(id string) string     { return b.key("n", id) }
func (b *Broker) nodesKey() string                 { return b.cfg.prefix + ":nodes" }

// parseChannel splits a channel's name into its kind and name.
func (b *Broker) parseChannel(channel string) (kind, name string, ok bool) {
	rest, ok := strings.CutPrefix(channel, b.cfg.prefix+":{")
	if !ok {
		return "", "", false
	}
	if _, rest, ok = strings.Cut(rest, "}:"); !ok {
		return "", "", false
	}
	return strings.Cut(rest, ":")
}

// Open implements [adapter.Broker]: it starts the broker's goroutines. It
// does not wait for Redis: until the broker is linked, the hub delivers
// to its own conns only.
func (b *Broker) Open(node adapter.Node) error {
	if b.node != nil {
		return errors.New("redisbroker: a broker serves one hub")
	}
	b.node, b.id = node, node.ID()
	b.ownChannel = b.nodeChannel(b.id)
	b.ctx, b.cancel = context.WithCancel(context.Background())
	b.writerStop, b.writerDone = make(chan struct{}), make(chan struct{})
	b.wg.Add(2)
	go b.link()
	go b.heartbeat()
	go b.writer()
	return nil
}

// Close implements [adapter.Broker]: it withdraws this node's users and
// presence from Redis, announcing the leaves, and stops the broker.
func (b *Broker) Close() error {
	b.mu.Lock()
	if b.closing || b.node == nil {
		b.mu.Unlock()
		return nil
	}
	up := b.up
	b.mu.Unlock()
	// The writer finishes its queue (messages to keep offline are in it),
	// for a while, then stops, so that no write of its lands after the
	// node's records are removed.
	for deadline := time.Now().Add(2 * time.Second); up && time.Now().Before(deadline); {
		b.mu.Lock()
		n := len(b.ops)
		b.mu.Unlock()
		if n == 0 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	b.mu.Lock()
	b.closing = true
	b.ops = nil
	b.mu.Unlock()
	close(b.writerStop)
	<-b.writerDone
	var err error
	if up {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err = b.reap(ctx, b.id, true)
		cancel()
	}
	b.cancel()
	b.mu.Lock()
	if b.sess != nil {
		b.endLocked(b.sess, errors.New("closed")) // ends the receive loops
	}
	b.mu.Unlock()
	b.wg.Wait()
	return err
}

// link keeps a pub/sub session with Redis, starting a new one after a
// backoff whenever it fails, until Close.
func (b *Broker) link() {
	defer b.wg.Done()
	failures := 0
	stable := b.cfg.backoff.StableAfter
	if stable == 0 {
		stable = 10 * time.Second
	}
	for {
		start := time.Now()
		err := b.session()
		if b.ctx.Err() != nil {
			return
		}
		b.node.Health(fmt.Errorf("%w: %w", ErrUnavailable, err))
		b.relearn()
		if time.Since(start) > stable {
			failures = 0
		}
		t := time.NewTimer(b.cfg.backoff.Delay(failures))
		failures++
		select {
		case <-t.C:
		case <-b.ctx.Done():
			t.Stop()
			return
		}
	}
}

// session subscribes to this node's channel and every held topic's,
// reconciles the node's records in Redis, reports the link up, and
// receives until a connection fails.
func (b *Broker) session() error {
	s := &session{
		subs:      make(map[string]*redis.PubSub),
		unsubs:    make(map[string]int),
		nodeReady: make(chan struct{}),
	}
	s.ctx, s.cancel = context.WithCancel(b.ctx)
	defer s.cancel()
	nodeChannel := b.ownChannel

	// Where each channel goes is asked of the cluster before taking mu.
	b.mu.Lock()
	channels := []string{nodeChannel}
	for _, h := range b.holds {
		if h.n > 0 {
			channels = append(channels, h.channel)
		}
	}
	b.mu.Unlock()
	servers := make(map[string]server, len(channels))
	for _, ch := range channels {
		srv, err := b.serverFor(s.ctx, ch)
		if err != nil {
			return err
		}
		servers[ch] = srv
	}
	run := ""
	if b.cluster == nil {
		info, err := b.rdb.Info(s.ctx, "server").Result()
		if err != nil {
			return err
		}
		var ok bool
		if run, ok = infoField(info, "run_id"); !ok {
			return errors.New("redisbroker: INFO server has no run_id")
		}
	}

	b.mu.Lock()
	if b.closing {
		b.mu.Unlock()
		return errors.New("closing")
	}
	b.sess, b.live = s, s.ctx
	b.gen++
	gen := b.gen
	b.run, b.runs = run, make(map[string]string)
	// Ops of the last session are covered by the records reconcile
	// writes, but for messages to keep offline.
	b.ops = slices.DeleteFunc(b.ops, func(o op) bool {
		if !o.durable {
			o.fail(b.unavailable())
		}
		return !o.durable
	})
	err := b.subscribeLocked(s, nodeChannel, servers[nodeChannel])
	var tickets []ticket
	for topic, h := range b.holds {
		// A new connection: the counts start again.
		h.sent, h.confirmed, h.subscribed = 0, 0, false
		if h.n == 0 {
			delete(b.holds, topic)
			continue
		}
		h.sent = 1
		tickets = append(tickets, ticket{h, 1})
		if err != nil {
			continue
		}
		srv, ok := servers[h.channel]
		if !ok { // held while the others were resolved: rare
			b.mu.Unlock()
			srv, err = b.serverFor(s.ctx, h.channel)
			b.mu.Lock()
			if err != nil || b.sess != s {
				continue
			}
		}
		err = b.subscribeHoldLocked(s, h, srv)
	}
	if err != nil {
		b.endLocked(s, err)
	}
	b.mu.Unlock()

	var ready sync.WaitGroup
	defer func() {
		b.mu.Lock()
		b.endLocked(s, errors.New("session over"))
		b.mu.Unlock()
		ready.Wait()
		s.receivers.Wait()
		b.mu.Lock()
		b.sess, b.up = nil, false
		b.gen++
		for _, h := range b.holds {
			close(h.changed) // wakes Holds waiting on this session
			h.changed = make(chan struct{})
		}
		b.mu.Unlock()
	}()
	ready.Add(1)
	go func() {
		defer ready.Done()
		if err := b.reconcile(s.ctx, gen, s.nodeReady, tickets); err != nil {
			if s.ctx.Err() == nil {
				b.log.Warn("redisbroker: reconcile", "err", err)
			}
			b.mu.Lock()
			b.endLocked(s, err)
			b.mu.Unlock()
		}
	}()
	<-s.ctx.Done()
	b.mu.Lock()
	defer b.mu.Unlock()
	if s.err == nil {
		return b.ctx.Err()
	}
	return s.err
}

// server is where a channel's subscription goes: a cluster's master, or
// the one server.
type server struct {
	client redis.UniversalClient
	addr   string
}

// serverFor returns the server that serves channel: in a cluster, the
// master of its slot, as the client last learnt the cluster's layout.
func (b *Broker) serverFor(ctx context.Context, channel string) (server, error) {
	if b.cluster == nil {
		return server{client: b.rdb}, nil
	}
	c, err := b.cluster.MasterForKey(ctx, channel)
	if err != nil {
		return server{}, err
	}
	return server{client: c, addr: c.Options().Addr}, nil
}

// subscribeLocked sends SSUBSCRIBE channel to srv in session s, opening
// the session's connection to srv on first use.
func (b *Broker) subscribeLocked(s *session, channel string, srv server) error {
	if s.err != nil {
		return s.err
	}
	ps := s.subs[srv.addr]
	if ps == nil {
		ps = srv.client.SSubscribe(s.ctx)
		s.subs[srv.addr] = ps
		s.receivers.Add(1)
		go b.receive(s, srv.addr, ps)
	}
	// Sent under mu, so that SSUBSCRIBE and SUNSUBSCRIBE reach Redis in
	// the order of Hold and Release.
	return ps.SSubscribe(s.ctx, channel)
}

func (b *Broker) subscribeHoldLocked(s *session, h *hold, srv server) error {
	h.server, h.subscribed = srv.addr, true
	return b.subscribeLocked(s, h.channel, srv)
}

// endLocked ends session s, if it has not ended, because of err: its
// connections close, which ends their receive loops.
func (b *Broker) endLocked(s *session, err error) {
	if s.err != nil {
		return
	}
	s.err = err
	s.cancel()
	for _, ps := range s.subs {
		ps.Close()
	}
}

type ticket struct {
	h *hold
	n uint64
}

// receive reads the messages of one of the session's connections until it
// fails.
func (b *Broker) receive(s *session, addr string, ps *redis.PubSub) {
	defer s.receivers.Done()
	nodeChannel := b.ownChannel
	for {
		msg, err := ps.Receive(s.ctx)
		if err != nil {
			b.mu.Lock()
			b.endLocked(s, err)
			b.mu.Unlock()
			return
		}
		switch m := msg.(type) {
		case *redis.Subscription:
			switch {
			case m.Kind == "ssubscribe" && m.Channel == nodeChannel:
				select {
				case <-s.nodeReady:
				default:
					close(s.nodeReady)
				}
			case m.Kind == "ssubscribe":
				if kind, topic, ok := b.parseChannel(m.Channel); ok && kind == "t" {
					b.confirm(topic)
				}
			case m.Kind == "sunsubscribe":
				b.unsubscribed(s, addr, m.Channel)
			}
		case *redis.Message:
			switch kind, name, _ := b.parseChannel(m.Channel); {
			case m.Channel == nodeChannel:
				b.nodeMessage(m.Payload)
			case kind == "t":
				b.topicMessage(s.ctx, name, m.Payload)
			}
		}
	}
}

// unsubscribed takes an SUNSUBSCRIBE of channel: the confirmation of one
// that Release sent or, when none was, the server's notice that it no
// longer serves the channel's slot (a cluster moved it): the session
// ends, and the next subscribes where the slot is now.
func (b *Broker) unsubscribed(s *session, addr, channel string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if n := s.unsubs[channel]; n > 0 {
		if n == 1 {
			delete(s.unsubs, channel)
		} else {
			s.unsubs[channel] = n - 1
		}
		return
	}
	b.endLocked(s, fmt.Errorf("%w: %s no longer serves %s (its slot moved)", ErrUnavailable, addr, channel))
}

// confirm counts an SSUBSCRIBE of topic's channel as in effect.
func (b *Broker) confirm(topic string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.holds[topic]
	if h == nil {
		return
	}
	h.confirmed++
	close(h.changed)
	h.changed = make(chan struct{})
	if h.n == 0 && h.confirmed >= h.sent {
		delete(b.holds, topic)
	}
}

// nodeMessage takes a message on this node's channel: a direct message
// for one of its users, or a relayed command of another node's hub.
func (b *Broker) nodeMessage(payload string) {
	if cmd, ok := strings.CutPrefix(payload, "c"); ok {
		b.node.Relay([]byte(cmd))
		return
	}
	b.direct(payload)
}

// direct hands a direct message to the node, keeping it offline if the
// user left meanwhile.
func (b *Broker) direct(payload string) {
	b.directMu.Lock()
	defer b.directMu.Unlock()
	b.mu.Lock()
	if !b.up {
		// Until reconcile has handed over the offline messages kept
		// while this node was unreachable, which are older.
		b.held = append(b.held, payload)
		b.mu.Unlock()
		return
	}
	b.mu.Unlock()
	b.deliverDirect(payload)
}

// deliverDirect hands a direct message to the node, keeping it offline if
// the user left meanwhile.
func (b *Broker) deliverDirect(payload string) {
	user, data, ok := parseDirect(payload)
	if !ok {
		b.log.Warn("redisbroker: malformed direct message", "payload", truncate(payload))
		return
	}
	if b.node.DeliverUser(user, data) {
		return
	}
	b.enqueue(op{durable: true, run: func(ctx context.Context) ([][]byte, error) { return nil, b.keep(ctx, user, data) }})
}

// appendDirect encodes a direct message for a node's channel:
// "u<len(user)>:<user><data>".
func appendDirect(dst []byte, user string, data []byte) []byte {
	dst = append(dst, 'u')
	dst = strconv.AppendInt(dst, int64(len(user)), 10)
	dst = append(dst, ':')
	dst = append(dst, user...)
	return append(dst, data...)
}

func parseDirect(payload string) (user string, data []byte, ok bool) {
	rest, ok := strings.CutPrefix(payload, "u")
	if !ok {
		return "", nil, false
	}
	user, rest, ok = parseSized(rest)
	return user, []byte(rest), ok
}

// parseSized splits "<n>:<s><rest>" into s, of n bytes, and rest.
func parseSized(p string) (s, rest string, ok bool) {
	n, tail, ok := strings.Cut(p, ":")
	size, err := strconv.Atoi(n)
	if !ok || err != nil || size < 0 || size > len(tail) || n != strconv.Itoa(size) {
		return "", "", false
	}
	return tail[:size], tail[size:], true
}

// topicMessage hands a topic's message or presence change to the node.
func (b *Broker) topicMessage(ctx context.Context, topic, payload string) {
	if marker, ok := strings.CutPrefix(payload, "s"); ok {
		b.applySnapshot(ctx, topic, marker)
		return
	}
	pos, data, ev, err := parseTopicPayload(payload)
	switch {
	case err != nil:
		b.log.Warn("redisbroker: malformed topic message", "topic", topic, "payload", truncate(payload), "err", err)
	case ev != nil:
		if ev.Node != b.id {
			b.node.Presence(topic, []adapter.RemoteMember{ev.member()}, false)
		}
	default:
		b.node.Deliver(topic, pos, data)
	}
}

var errMalformed = errors.New("malformed")

// parseTopicPayload reads what the publish script ("m<epoch>:<seq>:<data>")
// or a node ("p<json>") published on a topic's channel.
func parseTopicPayload(payload string) (adapter.Position, []byte, *presenceEvent, error) {
	if rest, ok := strings.CutPrefix(payload, "m"); ok {
		epoch, rest, ok1 := strings.Cut(rest, ":")
		seq, data, ok2 := strings.Cut(rest, ":")
		n, err := strconv.ParseUint(seq, 10, 64)
		if !ok1 || !ok2 || err != nil || epoch == "" || n == 0 {
			return adapter.Position{}, nil, nil, errMalformed
		}
		return adapter.Position{Epoch: epoch, Seq: n}, []byte(data), nil, nil
	}
	if rest, ok := strings.CutPrefix(payload, "p"); ok {
		var ev presenceEvent
		if err := json.Unmarshal([]byte(rest), &ev); err != nil || ev.Node == "" || ev.User == "" {
			return adapter.Position{}, nil, nil, errMalformed
		}
		return adapter.Position{}, nil, &ev, nil
	}
	return adapter.Position{}, nil, nil, errMalformed
}

// presenceEvent is a user's presence change at a node, as published on
// the topic's channel; Conns is empty for a leave.
type presenceEvent struct {
	Node  string               `json:"n"`
	User  string               `json:"u"`
	Conns []adapter.MemberConn `json:"c,omitempty"`
}

func (ev presenceEvent) member() adapter.RemoteMember {
	return adapter.RemoteMember{Node: ev.Node, Member: adapter.Member{UserID: ev.User, Conns: noNullMeta(ev.Conns)}}
}

// noNullMeta restores the nil Meta of conns without metadata, which JSON
// turned into null.
func noNullMeta(conns []adapter.MemberConn) []adapter.MemberConn {
	for i := range conns {
		if string(conns[i].Meta) == "null" {
			conns[i].Meta = nil
		}
	}
	return conns
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

// reconcile runs once a session's SUBSCRIBEs are in effect: it renews the
// node, writes again the users and presence it holds (Redis may have lost
// them, or another node reaped them), hands the node the presence of the
// topics it holds, and reports the link up.
func (b *Broker) reconcile(ctx context.Context, gen uint64, nodeReady chan struct{}, tickets []ticket) error {
	select {
	case <-nodeReady:
	case <-ctx.Done():
		return ctx.Err()
	}
	for _, t := range tickets {
		if err := b.waitConfirmed(ctx, gen, t); err != nil {
			return err
		}
	}
	if _, err := b.beat(ctx); err != nil {
		return err
	}
	// Ops queued from now on are written after the records: in order,
	// and again for those the records already show, which is harmless.
	b.mu.Lock()
	users := slices.Collect(maps.Keys(b.users))
	var joins []presenceRecord
	for topic, m := range b.present {
		for user, conns := range m {
			joins = append(joins, presenceRecord{topic, user, conns})
		}
	}
	b.mu.Unlock()
	if err := b.rewrite(ctx, users, joins); err != nil {
		return err
	}
	b.mu.Lock()
	topics := make([]string, 0, len(b.holds))
	for t, h := range b.holds {
		if h.n > 0 {
			topics = append(topics, t)
		}
	}
	b.mu.Unlock()
	for _, t := range topics {
		if err := b.snapshot(ctx, t); err != nil {
			return err
		}
	}
	// Direct messages that arrived meanwhile follow the offline ones
	// rewrite handed over.
	b.directMu.Lock()
	b.mu.Lock()
	if b.gen != gen {
		b.mu.Unlock()
		b.directMu.Unlock()
		return errors.New("session ended")
	}
	held := b.held
	b.held = nil
	b.up = true
	b.mu.Unlock()
	for _, p := range held {
		b.deliverDirect(p)
	}
	b.directMu.Unlock()
	b.signal()
	b.node.Health(nil)
	return nil
}

// rewrite makes Redis hold this node's users and presence as recorded:
// those Redis lost, or another node reaped while this one could not renew
// its heartbeat, are written again (with the offline messages kept
// meanwhile handed to the node), and those that left meanwhile are
// removed, announcing the leaves.
func (b *Broker) rewrite(ctx context.Context, users []string, joins []presenceRecord) error {
	keep := make(map[string]bool, len(joins))
	for _, j := range joins {
		keep[presenceKey(j.topic, j.user)] = true
	}
	recorded, err := b.rdb.SMembers(ctx, b.key("np", b.id)).Result()
	if err != nil {
		return err
	}
	for _, r := range recorded {
		if topic, user, ok := parsePresenceKey(r); ok && !keep[r] {
			if err := b.leave(ctx, b.id, topic, user); err != nil {
				return err
			}
		}
	}
	here, err := b.rdb.SMembers(ctx, b.key("nu", b.id)).Result()
	if err != nil {
		return err
	}
	isUser := make(map[string]bool, len(users))
	for _, u := range users {
		isUser[u] = true
	}
	for _, u := range here {
		if !isUser[u] {
			if err := b.disconnect(ctx, b.id, u); err != nil {
				return err
			}
		}
	}
	for _, u := range users {
		kept, err := b.connect(ctx, u)
		if err != nil {
			return err
		}
		for _, m := range kept {
			if !b.node.DeliverUser(u, m) {
				if err := b.keep(ctx, u, m); err != nil {
					return err
				}
			}
		}
	}
	for _, j := range joins {
		if err := b.join(ctx, j.topic, j.user, j.conns); err != nil {
			return err
		}
	}
	return nil
}

type presenceRecord struct {
	topic, user string
	conns       []adapter.MemberConn
}

// waitConfirmed waits until t's SUBSCRIBE is in effect, or the session
// gen has ended.
func (b *Broker) waitConfirmed(ctx context.Context, gen uint64, t ticket) error {
	for {
		b.mu.Lock()
		if b.gen != gen {
			b.mu.Unlock()
			return fmt.Errorf("%w: the session ended", ErrUnavailable)
		}
		if t.h.confirmed >= t.n {
			b.mu.Unlock()
			return nil
		}
		ch := t.h.changed
		b.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// heartbeat renews this node's expiry every third of the TTL and reaps
// the nodes that let theirs pass. A failure ends the session, so that a
// Redis that stopped answering is noticed even with no traffic.
func (b *Broker) heartbeat() {
	defer b.wg.Done()
	t := time.NewTicker(b.cfg.nodeTTL / 3)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-b.ctx.Done():
			return
		}
		b.mu.Lock()
		up, sess := b.up, b.sess
		b.mu.Unlock()
		if !up {
			continue
		}
		ctx, cancel := context.WithTimeout(b.ctx, b.cfg.nodeTTL/3)
		dead, err := b.beat(ctx)
		for _, n := range dead {
			if err == nil {
				err = b.reap(ctx, n, false)
			}
		}
		cancel()
		if err != nil && b.ctx.Err() == nil {
			b.log.Warn("redisbroker: heartbeat", "err", err)
			b.mu.Lock()
			b.endLocked(sess, err)
			b.mu.Unlock()
		}
	}
}

func (b *Broker) beat(ctx context.Context) ([]string, error) {
	return heartbeatScript.Run(ctx, b.rdb, []string{b.nodesKey()},
		b.id, b.cfg.nodeTTL.Milliseconds()).StringSlice()
}

// reap removes node and what it recorded, announcing its users' leaves;
// force removes it even before it expires (a node leaving). The node's
// records, its users' and the topics' are in different slots of a
// cluster, so this takes several calls: the node leaves the set of nodes
// last, so that if this reaper fails midway, the next one starts again.
// Two reapers at once do the same work twice, which is harmless.
func (b *Broker) reap(ctx context.Context, node string, force bool) error {
	f := "0"
	if force {
		f = "1"
	}
	if n, err := expiredScript.Run(ctx, b.rdb, []string{b.nodesKey()}, node, f).Int(); err != nil || n == 0 {
		return err
	}
	users, err := b.rdb.SMembers(ctx, b.key("nu", node)).Result()
	if err != nil {
		return err
	}
	for _, u := range users {
		if err := b.disconnect(ctx, node, u); err != nil {
			return err
		}
	}
	records, err := b.rdb.SMembers(ctx, b.key("np", node)).Result()
	if err != nil {
		return err
	}
	for _, r := range records {
		if topic, user, ok := parsePresenceKey(r); ok {
			if err := b.leave(ctx, node, topic, user); err != nil {
				return err
			}
		}
	}
	if err := b.rdb.Del(ctx, b.key("nu", node), b.key("np", node)).Err(); err != nil {
		return err
	}
	n, err := forgetNodeScript.Run(ctx, b.rdb, []string{b.nodesKey()}, node, f).Int()
	if err == nil && n == 1 && node != b.id {
		b.log.Info("redisbroker: reaped a node that stopped renewing", "node", node)
	}
	return err
}

// writer makes the queued writes in order, while the link is up.
func (b *Broker) writer() {
	defer close(b.writerDone)
	for {
		select {
		case <-b.wake:
		case <-b.writerStop:
			return
		}
		for {
			b.mu.Lock()
			if !b.up || len(b.ops) == 0 {
				b.mu.Unlock()
				break
			}
			o := b.ops[0]
			b.ops[0] = op{}
			b.ops = b.ops[1:]
			stale := !o.durable && o.gen != b.gen
			b.mu.Unlock()
			if stale {
				o.fail(b.unavailable())
				continue
			}
			ctx, cancel := context.WithTimeout(b.ctx, opTimeout)
			msgs, err := o.run(ctx)
			if o.reply != nil {
				b.handOver(ctx, o.reply, opResult{msgs, err})
			} else if err != nil && b.ctx.Err() == nil {
				b.log.Warn("redisbroker: write", "err", err)
			}
			cancel()
		}
	}
}

// fail answers a waiter, if any, with err.
func (o op) fail(err error) {
	if o.reply != nil {
		o.reply.mu.Lock()
		o.reply.result <- opResult{err: err}
		o.reply.mu.Unlock()
	}
}

// handOver gives r to the waiter of h or, if it gave up, delivers the
// offline messages in r itself, or keeps them again.
func (b *Broker) handOver(ctx context.Context, h *handoff, r opResult) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.abandoned {
		h.result <- r
		return
	}
	for _, m := range r.msgs {
		if !b.node.DeliverUser(h.user, m) {
			if err := b.keep(ctx, h.user, m); err != nil {
				b.log.Warn("redisbroker: offline message lost", "user", h.user, "err", err)
			}
		}
	}
}

// opTimeout bounds one write of the writer.
const opTimeout = 5 * time.Second

func (b *Broker) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// enqueue queues a write for the writer, which makes it once the session
// is up. Without a session it is dropped, as the next session writes the
// records in full, unless it is durable.
func (b *Broker) enqueue(o op) bool {
	b.mu.Lock()
	if b.closing || b.sess == nil && !o.durable {
		b.mu.Unlock()
		return false
	}
	o.gen = b.gen
	b.ops = append(b.ops, o)
	b.mu.Unlock()
	b.signal()
	return true
}

func (b *Broker) unavailable() error {
	return fmt.Errorf("%w: reconnecting", ErrUnavailable)
}

// topicServer returns the server that runs the scripts of a topic whose
// keys include key, that server's run_id, and the guard the scripts check
// it with (sameRun). In a cluster the scripts
// run on the slot's master itself, following no redirection: a script
// sent to a master that failed, and retried by the client on the replica
// promoted in its place, would carry the failed master's run_id, which
// the topic's record also holds (it was replicated), and the new master
// would go on numbering where its copy stopped, reusing seqs that
// clients may already have for other messages.
func (b *Broker) topicServer(ctx context.Context, key string) (srv redis.Scripter, run, guard string, err error) {
	if b.cluster == nil {
		b.mu.Lock()
		defer b.mu.Unlock()
		// Until the session's subscription is in effect its run_id is
		// fresh from the server, and there is nothing to check against.
		if s := b.sess; s != nil {
			select {
			case <-s.nodeReady:
				guard = b.ownChannel
			default:
			}
		}
		return b.rdb, b.run, guard, nil
	}
	c, err := b.cluster.MasterForKey(ctx, key)
	if err != nil {
		return nil, "", "", err
	}
	addr := c.Options().Addr
	b.mu.Lock()
	run, ok := b.runs[addr]
	b.mu.Unlock()
	if ok {
		return c, run, "", nil
	}
	info, err := c.Info(ctx, "server").Result()
	if err != nil {
		return nil, "", "", err
	}
	if run, ok = infoField(info, "run_id"); !ok {
		return nil, "", "", errors.New("redisbroker: INFO server has no run_id")
	}
	b.mu.Lock()
	if b.runs != nil {
		b.runs[addr] = run
	}
	b.mu.Unlock()
	return c, run, "", nil
}

// infoField returns a field of an INFO reply.
func infoField(info, name string) (string, bool) {
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+":"); ok {
			return v, true
		}
	}
	return "", false
}

// call returns a context for a call to Redis on behalf of the hub: ctx,
// cut short when the session ends, so that a call under way when the link
// is lost fails at once rather than after go-redis's retries, and the hub
// goes on delivering locally. It fails while the link is down.
func (b *Broker) call(ctx context.Context) (context.Context, context.CancelFunc, error) {
	return b.callIn(ctx, false)
}

// callIn is call; with starting, it also works while a session is
// starting, for reads that the hub needs to catch up.
func (b *Broker) callIn(ctx context.Context, starting bool) (context.Context, context.CancelFunc, error) {
	b.mu.Lock()
	up, live := b.up, b.live
	if starting && b.sess != nil {
		up = true
	}
	b.mu.Unlock()
	if !up {
		return nil, nil, b.unavailable()
	}
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(live, cancel)
	return ctx, func() { stop(); cancel() }, nil
}

// ttl is how long a key lives after its last write: age, or an hour when
// longer, so that a quiet topic keeps its epoch.
func (b *Broker) ttl(age time.Duration) int64 {
	return max(age, time.Hour).Milliseconds()
}

// Publish implements [adapter.Broker].
func (b *Broker) Publish(ctx context.Context, topic string, data []byte) (adapter.Position, error) {
	ctx, done, err := b.call(ctx)
	if err != nil {
		return adapter.Position{}, err
	}
	defer done()
	n := b.names(topic)
	srv, run, guard, err := b.topicServer(ctx, n.key("h"))
	if err != nil {
		return adapter.Position{}, err
	}
	res, err := publishScript.Run(ctx, srv, []string{n.key("h"), n.key("x")},
		data, newEpoch(), b.cfg.historyLen, b.ttl(b.cfg.historyAge), n.key("t"), run, guard).Slice()
	if err != nil {
		b.topicFailed(err)
		return adapter.Position{}, err
	}
	return position(res)
}

// topicFailed follows a topic script that failed on a cluster's master:
// the run_ids read in this session are dropped (the server may have
// restarted at the same address) and the slots read again. A master that
// answers MOVED or ASK no longer serves the slot, or not all of its keys:
// the session ends, since this node's subscriptions to the slot's
// channels went with it, and the hub catches up once the next session
// is linked, which tells clients to resync if the move changed the
// topic's epoch (a slot moved to another master carries the first
// master's run_id, so it does).
func (b *Broker) topicFailed(err error) {
	if b.cluster == nil {
		if redis.HasErrorPrefix(err, staleRun) {
			// Another run of the server than the session's: a new
			// session reads its run_id.
			b.mu.Lock()
			if s := b.sess; s != nil {
				b.endLocked(s, fmt.Errorf("%w: %w", ErrUnavailable, err))
			}
			b.mu.Unlock()
		}
		return
	}
	b.mu.Lock()
	if b.runs != nil {
		clear(b.runs)
	}
	if s := b.sess; s != nil && (redis.HasErrorPrefix(err, "MOVED") || redis.HasErrorPrefix(err, "ASK") || redis.HasErrorPrefix(err, "TRYAGAIN")) {
		b.endLocked(s, fmt.Errorf("%w: %w", ErrUnavailable, err))
	}
	b.mu.Unlock()
	b.relearn()
}

// relearn has a cluster's client read again which master serves which
// slot, in the background: go-redis does so by itself only on a MOVED
// reply or once a minute, and a master that died answers nothing, so
// after a failover it would go on sending there.
func (b *Broker) relearn() {
	if b.cluster != nil {
		b.cluster.ReloadState(b.ctx)
	}
}

func position(res []any) (adapter.Position, error) {
	if len(res) < 2 {
		return adapter.Position{}, fmt.Errorf("redisbroker: unexpected reply %v", res)
	}
	epoch, _ := res[0].(string)
	seq, _ := res[1].(int64)
	return adapter.Position{Epoch: epoch, Seq: uint64(seq)}, nil
}

// Since implements [adapter.Broker].
func (b *Broker) Since(ctx context.Context, topic string, pos adapter.Position) ([]adapter.HistoryEntry, adapter.Position, bool, error) {
	ctx, done, err := b.callIn(ctx, true)
	if err != nil {
		return nil, adapter.Position{}, false, err
	}
	defer done()
	n := b.names(topic)
	srv, run, guard, err := b.topicServer(ctx, n.key("h"))
	if err != nil {
		return nil, adapter.Position{}, false, err
	}
	res, err := sinceScript.Run(ctx, srv, []string{n.key("h"), n.key("x")},
		pos.Epoch, pos.Seq, newEpoch(), b.ttl(b.cfg.historyAge), b.cfg.historyAge.Milliseconds(), run, guard).Slice()
	if err != nil {
		b.topicFailed(err)
		return nil, adapter.Position{}, false, err
	}
	last, err := position(res)
	if err != nil || len(res) < 3 {
		return nil, last, false, err
	}
	if ok, _ := res[2].(int64); ok != 1 {
		return nil, last, false, nil
	}
	entries := make([]adapter.HistoryEntry, 0, len(res)-3)
	for i, d := range res[3:] {
		s, _ := d.(string)
		entries = append(entries, adapter.HistoryEntry{Seq: pos.Seq + uint64(i) + 1, Data: []byte(s)})
	}
	return entries, last, true, nil
}

// Hold implements [adapter.Broker]. The first reference subscribes to the
// topic's channel and, once Redis confirms it, hands the node the
// topic's presence on the other nodes.
func (b *Broker) Hold(ctx context.Context, topic string) error {
	b.mu.Lock()
	h := b.holds[topic]
	if h == nil {
		h = &hold{channel: b.topicChannel(topic), changed: make(chan struct{})}
		b.holds[topic] = h
	}
	h.n++
	first := h.n == 1
	s, gen := b.sess, b.gen
	if s == nil {
		b.mu.Unlock()
		return b.unavailable() // the next session subscribes
	}
	if !first {
		t := ticket{h, h.sent}
		b.mu.Unlock()
		return b.waitConfirmed(ctx, gen, t)
	}
	// The SSUBSCRIBE is counted now, so that another Hold waits for it,
	// and sent once the channel's server is known, which may take a
	// question to the cluster: not under mu.
	h.sent++
	t := ticket{h, h.sent}
	b.mu.Unlock()
	srv, err := b.serverFor(ctx, h.channel)
	b.mu.Lock()
	switch {
	case b.gen != gen:
		// The session ended: the next subscribes to held topics.
	case h.n == 0:
		// Released meanwhile: nothing to subscribe to.
		h.confirmed = max(h.confirmed, t.n)
		close(h.changed)
		h.changed = make(chan struct{})
		if h.confirmed >= h.sent {
			delete(b.holds, topic)
		}
	case err != nil:
		// The cluster cannot say where the channel is: the session
		// ends, and the next subscribes to it.
		b.endLocked(s, err)
	default:
		if err = b.subscribeHoldLocked(s, h, srv); err != nil {
			b.endLocked(s, err)
		}
	}
	b.mu.Unlock()
	if err := b.waitConfirmed(ctx, gen, t); err != nil {
		return err
	}
	return b.snapshot(ctx, topic)
}

// Release implements [adapter.Broker]: the last reference unsubscribes.
func (b *Broker) Release(topic string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.holds[topic]
	if h == nil || h.n == 0 {
		return
	}
	h.n--
	if h.n > 0 {
		return
	}
	if h.confirmed >= h.sent {
		delete(b.holds, topic)
	}
	s := b.sess
	if s == nil || s.err != nil || !h.subscribed {
		return
	}
	h.subscribed = false
	if ps := s.subs[h.server]; ps != nil {
		// A failure ends the session, whose successor subscribes to
		// held topics only.
		s.unsubs[h.channel]++
		if err := ps.SUnsubscribe(s.ctx, h.channel); err != nil {
			b.endLocked(s, err)
		}
	}
}

// snapshot hands the node the presence of topic on the other nodes.
//
// The presence changes on the channel and the snapshot must reach the
// node in the order they happened, or a change made just after the
// snapshot was read could be undone by it. So the script that reads the
// snapshot also publishes a marker on the channel, and the receive loop
// hands the node the snapshot when it meets the marker: what came before
// it happened before the read, what follows, after.
func (b *Broker) snapshot(ctx context.Context, topic string) error {
	marker := newEpoch()
	sn := &pendingSnapshot{members: make(chan []adapter.RemoteMember, 1), applied: make(chan struct{})}
	b.mu.Lock()
	b.snapshots[marker] = sn
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.snapshots, marker)
		b.mu.Unlock()
	}()
	all, err := b.members(ctx, topic, marker)
	if err != nil {
		close(sn.members) // the receive loop may be waiting: nothing comes
		return err
	}
	sn.members <- slices.DeleteFunc(all, func(m adapter.RemoteMember) bool { return m.Node == b.id })
	select {
	case <-sn.applied:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// pendingSnapshot is a snapshot on its way to the node: read by snapshot,
// handed to the node by the receive loop.
type pendingSnapshot struct {
	members chan []adapter.RemoteMember // closed if the read failed
	applied chan struct{}
}

// applySnapshot hands the node the snapshot whose marker the receive loop
// met on topic's channel, waiting for its reply if needed; markers of
// other nodes are ignored.
func (b *Broker) applySnapshot(ctx context.Context, topic, marker string) {
	b.mu.Lock()
	sn := b.snapshots[marker]
	b.mu.Unlock()
	if sn == nil {
		return
	}
	select {
	case m, ok := <-sn.members:
		if ok {
			b.node.Presence(topic, m, true)
		}
		close(sn.applied)
	case <-ctx.Done():
	}
}

// members returns the presence on topic at every live node; with a
// marker, it also publishes it on the topic's channel.
func (b *Broker) members(ctx context.Context, topic, marker string) ([]adapter.RemoteMember, error) {
	live, err := b.liveNodes(ctx)
	if err != nil {
		return nil, err
	}
	n := b.names(topic)
	res, err := membersScript.Run(ctx, b.rdb, []string{n.key("p")}, n.key("t"), marker).StringSlice()
	if err != nil {
		return nil, err
	}
	var out []adapter.RemoteMember
	for i := 0; i+1 < len(res); i += 2 {
		node, user, ok := strings.Cut(res[i], ":")
		var conns []adapter.MemberConn
		if !ok || !live[node] || json.Unmarshal([]byte(res[i+1]), &conns) != nil || len(conns) == 0 {
			continue
		}
		out = append(out, adapter.RemoteMember{Node: node, Member: adapter.Member{UserID: user, Conns: noNullMeta(conns)}})
	}
	return out, nil
}

// liveNodes returns the nodes whose heartbeat has not expired.
func (b *Broker) liveNodes(ctx context.Context) (map[string]bool, error) {
	ids, err := liveScript.Run(ctx, b.rdb, []string{b.nodesKey()}).StringSlice()
	if err != nil {
		return nil, err
	}
	live := make(map[string]bool, len(ids))
	for _, id := range ids {
		live[id] = true
	}
	return live, nil
}

// Members implements [adapter.Broker].
func (b *Broker) Members(ctx context.Context, topic string) ([]adapter.Member, error) {
	ctx, done, err := b.call(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	all, err := b.members(ctx, topic, "")
	if err != nil {
		return nil, err
	}
	slices.SortFunc(all, func(a, c adapter.RemoteMember) int {
		return cmpOr(strings.Compare(a.UserID, c.UserID), strings.Compare(a.Node, c.Node))
	})
	var out []adapter.Member
	for _, m := range all {
		if n := len(out); n > 0 && out[n-1].UserID == m.UserID {
			out[n-1].Conns = append(out[n-1].Conns, m.Conns...)
			continue
		}
		out = append(out, adapter.Member{UserID: m.UserID, Conns: slices.Clone(m.Conns)})
	}
	return out, nil
}

func cmpOr(a, b int) int {
	if a != 0 {
		return a
	}
	return b
}

// Join implements [adapter.Broker].
func (b *Broker) Join(topic, userID string, conns []adapter.MemberConn) {
	b.mu.Lock()
	m := b.present[topic]
	if m == nil {
		m = make(map[string][]adapter.MemberConn)
		b.present[topic] = m
	}
	m[userID] = conns
	b.mu.Unlock()
	b.enqueue(op{run: func(ctx context.Context) ([][]byte, error) {
		return nil, b.join(ctx, topic, userID, conns)
	}})
}

// Leave implements [adapter.Broker].
func (b *Broker) Leave(topic, userID string) {
	b.mu.Lock()
	if m := b.present[topic]; m != nil {
		delete(m, userID)
		if len(m) == 0 {
			delete(b.present, topic)
		}
	}
	b.mu.Unlock()
	b.enqueue(op{run: func(ctx context.Context) ([][]byte, error) {
		return nil, b.leave(ctx, b.id, topic, userID)
	}})
}

// join records a user's presence on a topic: first in the node's
// records, so that if the node dies the reaper finds it, then in the
// topic's hash, announced on its channel.
func (b *Broker) join(ctx context.Context, topic, user string, conns []adapter.MemberConn) error {
	cj, err := json.Marshal(conns)
	if err != nil {
		return err
	}
	ev, err := json.Marshal(presenceEvent{Node: b.id, User: user, Conns: conns})
	if err != nil {
		return err
	}
	if err := b.rdb.SAdd(ctx, b.key("np", b.id), presenceKey(topic, user)).Err(); err != nil {
		return err
	}
	n := b.names(topic)
	return joinScript.Run(ctx, b.rdb, []string{n.key("p")},
		b.id+":"+user, cj, n.key("t"), append([]byte("p"), ev...)).Err()
}

// leave removes a user's presence on a topic at node, announcing it, then
// from the node's records.
func (b *Broker) leave(ctx context.Context, node, topic, user string) error {
	ev, err := json.Marshal(presenceEvent{Node: node, User: user})
	if err != nil {
		return err
	}
	n := b.names(topic)
	if err := leaveScript.Run(ctx, b.rdb, []string{n.key("p")},
		node+":"+user, n.key("t"), append([]byte("p"), ev...)).Err(); err != nil {
		return err
	}
	return b.rdb.SRem(ctx, b.key("np", node), presenceKey(topic, user)).Err()
}

// presenceKey names a user's presence on a topic in a node's records.
func presenceKey(topic, user string) string {
	return strconv.Itoa(len(topic)) + ":" + topic + user
}

func parsePresenceKey(k string) (topic, user string, ok bool) {
	return parseSized(k)
}

// SendToUser implements [adapter.Broker]: the message goes to the channel
// of each node where the user has a conn and, when none took it, to the
// user's offline stream, unless a node recorded the user meanwhile: then
// it tries again.
func (b *Broker) SendToUser(ctx context.Context, userID string, data []byte) error {
	ctx, done, err := b.call(ctx)
	if err != nil {
		return err
	}
	defer done()
	payload := appendDirect(make([]byte, 0, len(data)+len(userID)+8), userID, data)
	u := b.names(userID)
	for range 3 {
		nodes, err := b.rdb.SMembers(ctx, u.key("u")).Result()
		if err != nil {
			return err
		}
		if n, err := b.publishTo(ctx, nodes, payload); err != nil || n > 0 {
			return err
		}
		args := []any{data, b.cfg.offlineLen, b.ttl(b.cfg.offlineAge)}
		for _, n := range nodes {
			args = append(args, n)
		}
		n, err := keepScript.Run(ctx, b.rdb, []string{u.key("o"), u.key("u")}, args...).Int()
		switch {
		case err != nil:
			return err
		case n == -1:
			return fmt.Errorf("%w: the broker keeps no offline messages", adapter.ErrOfflineFull)
		case n == 0:
			return nil
		}
	}
	return fmt.Errorf("%w: the user's nodes kept changing", ErrUnavailable)
}

// publishTo publishes payload on the channels of nodes and returns how
// many subscribers took it.
func (b *Broker) publishTo(ctx context.Context, nodes []string, payload []byte) (int64, error) {
	if len(nodes) == 0 {
		return 0, nil
	}
	cmds := make([]*redis.IntCmd, len(nodes))
	_, err := b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, n := range nodes {
			cmds[i] = p.SPublish(ctx, b.nodeChannel(n), payload)
		}
		return nil
	})
	var sum int64
	for _, c := range cmds {
		sum += c.Val()
	}
	if sum > 0 {
		return sum, nil // taken, if not by all: as with a node that just died
	}
	return 0, err
}

// Connect implements [adapter.Broker].
func (b *Broker) Connect(ctx context.Context, userID string) ([][]byte, error) {
	b.mu.Lock()
	b.users[userID] = struct{}{}
	b.mu.Unlock()
	h := &handoff{result: make(chan opResult, 1), user: userID}
	if !b.enqueue(op{run: func(ctx context.Context) ([][]byte, error) { return b.connect(ctx, userID) }, reply: h}) {
		return nil, b.unavailable()
	}
	select {
	case r := <-h.result:
		return r.msgs, r.err
	case <-ctx.Done():
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	select {
	case r := <-h.result: // came as it gave up
		return r.msgs, r.err
	default:
		h.abandoned = true
		return nil, ctx.Err()
	}
}

// connect records the user in the node's records first, so that if the
// node dies the reaper finds it, then the node in the user's, taking the
// user's offline messages in the same script.
func (b *Broker) connect(ctx context.Context, user string) ([][]byte, error) {
	if err := b.rdb.SAdd(ctx, b.key("nu", b.id), user).Err(); err != nil {
		return nil, err
	}
	u := b.names(user)
	res, err := connectScript.Run(ctx, b.rdb, []string{u.key("u"), u.key("o")},
		b.id, b.cfg.offlineAge.Milliseconds()).StringSlice()
	if err != nil {
		return nil, err
	}
	out := make([][]byte, len(res))
	for i, s := range res {
		out[i] = []byte(s)
	}
	return out, nil
}

// Disconnect implements [adapter.Broker].
func (b *Broker) Disconnect(userID string) {
	b.mu.Lock()
	delete(b.users, userID)
	b.mu.Unlock()
	b.enqueue(op{run: func(ctx context.Context) ([][]byte, error) { return nil, b.disconnect(ctx, b.id, userID) }})
}

// disconnect removes node from the user's records, noting when the user
// was last seen, then the user from the node's.
func (b *Broker) disconnect(ctx context.Context, node, user string) error {
	u := b.names(user)
	if err := disconnectScript.Run(ctx, b.rdb, []string{u.key("u"), u.key("s")}, node, lastSeenTTL.Milliseconds()).Err(); err != nil {
		return err
	}
	return b.rdb.SRem(ctx, b.key("nu", node), user).Err()
}

// lastSeenTTL is how long Redis remembers when a user was last seen.
const lastSeenTTL = 30 * 24 * time.Hour

// keep keeps data in the user's offline stream.
func (b *Broker) keep(ctx context.Context, user string, data []byte) error {
	u := b.names(user)
	return keepScript.Run(ctx, b.rdb, []string{u.key("o"), u.key("u")}, data, b.cfg.offlineLen, b.ttl(b.cfg.offlineAge), "*").Err()
}

// Online implements [adapter.Broker].
func (b *Broker) Online(ctx context.Context, userID string) (bool, error) {
	ctx, done, err := b.call(ctx)
	if err != nil {
		return false, err
	}
	defer done()
	nodes, err := b.userNodes(ctx, userID)
	return len(nodes) > 0, err
}

// userNodes returns the live nodes where the user has a conn.
func (b *Broker) userNodes(ctx context.Context, userID string) ([]string, error) {
	nodes, err := b.rdb.SMembers(ctx, b.key("u", userID)).Result()
	if err != nil || len(nodes) == 0 {
		return nil, err
	}
	live, err := b.liveNodes(ctx)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(nodes, func(n string) bool { return !live[n] }), nil
}

// LastSeen implements [adapter.Relay]: when the user's last conn on a
// node ended, as Redis remembers it (for 30 days).
func (b *Broker) LastSeen(ctx context.Context, userID string) (time.Time, bool, error) {
	ctx, done, err := b.call(ctx)
	if err != nil {
		return time.Time{}, false, err
	}
	defer done()
	ms, err := b.rdb.Get(ctx, b.key("s", userID)).Int64()
	if errors.Is(err, redis.Nil) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, err
	}
	return time.UnixMilli(ms), true, nil
}

// Relay implements [adapter.Relay]: cmd goes to the channel of every
// other live node or, for a user, of every other node where the user has
// a conn.
func (b *Broker) Relay(ctx context.Context, userID string, cmd []byte) error {
	ctx, done, err := b.call(ctx)
	if err != nil {
		return err
	}
	defer done()
	var nodes []string
	if userID == "" {
		live, err := b.liveNodes(ctx)
		if err != nil {
			return err
		}
		nodes = slices.Collect(maps.Keys(live))
	} else if nodes, err = b.userNodes(ctx, userID); err != nil {
		return err
	}
	nodes = slices.DeleteFunc(nodes, func(n string) bool { return n == b.id })
	_, err = b.publishTo(ctx, nodes, append([]byte("c"), cmd...))
	return err
}

// Once implements [adapter.Deduper]: a key set with NX and a TTL, so that
// a client's request repeated on another node takes effect once.
func (b *Broker) Once(ctx context.Context, key string, ttl time.Duration) (bool, error) {
	ctx, done, err := b.call(ctx)
	if err != nil {
		return false, err
	}
	defer done()
	return b.rdb.SetNX(ctx, b.key("d", key), 1, ttl).Result()
}

// Forget implements [adapter.Deduper].
func (b *Broker) Forget(ctx context.Context, key string) error {
	ctx, done, err := b.call(ctx)
	if err != nil {
		return err
	}
	defer done()
	return b.rdb.Del(ctx, b.key("d", key)).Err()
}

// newEpoch returns a random epoch, offered to Redis for a topic that has
// none: 64 bits, in base64url as the core's own.
func newEpoch() string {
	var b [8]byte
	rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}
