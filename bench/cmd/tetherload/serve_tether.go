package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-ws/tether"
	"golang.org/x/time/rate"
)

// tetherServer is the library under test: bare conns from tether.Accept on
// /ws (the idle measurement of a conn alone) and a tether.Hub on /sub (and
// its old name /hub) for everything that subscribes.
//
// Heartbeat: WithHeartbeat(interval, timeout), tether's own semantics.
// Queue: Limits{SendQueue: queue, SendQueueBytes: 1 MiB}, overflow policy Disconnect (the
// default): hub_evictions is the hub's Evictions, conns dropped for a full
// queue or a write timeout. Publish: Hub.Publish(topic). Pongs and heartbeat
// deaths come from the Observer, for /ws and hub conns alike. Presence is
// off, every conn anonymous: except with -room (roomOptions), the hub of
// the room scenario, which keeps every hub option at its default.
//
// As -impl tether-raw, the same hub (same options) for plain WebSocket
// peers: the server subscribes each conn that did not ask for protocol v1
// to bench as it connects (Observer.Connect), counting them in
// room_subscribed, as an application picks a raw peer's topics.
//
// With -overload (the overload scenario), topic hi is PriorityHigh and lo
// PriorityLow (WithTopicPolicy), and WithBreaker(-breaker) watches the
// scheduler unless -breaker is 0; the clients, protocol v1 peers,
// subscribe to both themselves. The breaker's openings are timed through
// Observer.Overload (overload_open_seconds). With -admission R,
// WithAdmission(R, R) paces handshakes (either impl, with or without
// -overload).
type tetherServer struct {
	log    *serveLog
	stderr io.Writer
	opts   []tether.ServerOption
	hub    *tether.Hub

	mu    sync.Mutex
	conns map[*tether.Conn]*tetherPeer

	acceptErrors   atomic.Int64
	roomSubscribed atomic.Int64 // raw peers subscribed to bench by subscribeRaw (-room, tether-raw)

	// The breaker's open time (-overload): the sum of its closed spells,
	// and since when it is open now (zero: closed).
	overMu    sync.Mutex
	overTotal time.Duration
	overSince time.Time
}

// tetherPeer is a conn as the server knows it. The Observer may report a
// conn's end before the handler that accepted it has registered it: the
// end then waits here for the registration.
type tetherPeer struct {
	rec *serveConn // nil until registered
	ws  bool       // a /ws conn, which close drops (the hub drops its own)

	// Set when the end came first.
	endedAt   int64
	heartbeat bool
}

func newTetherServer(cfg serveConfig, log *serveLog, stderr io.Writer) (serveImpl, error) {
	s := &tetherServer{log: log, stderr: stderr, conns: make(map[*tether.Conn]*tetherPeer)}
	obs := tether.WithObserver(tether.Observer{
		Disconnect: s.disconnected,
		Pong:       s.ponged,
	})
	s.opts = []tether.ServerOption{tether.WithHeartbeat(cfg.interval, cfg.timeout), obs}
	hubOpts := []tether.HubOption{
		tether.WithHeartbeat(cfg.interval, cfg.timeout),
		tether.WithLimits(tether.Limits{SendQueue: cfg.queue, SendQueueBytes: 1 << 20}),
		tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Off: true} }),
		// Load clients subscribe in a burst: no inbound limit.
		tether.WithRateLimit(rate.Inf, 0),
	}
	if cfg.impl == "tether-raw" {
		hubOpts = append(hubOpts, tether.WithObserver(tether.Observer{Connect: s.subscribeRaw}))
	}
	if cfg.room {
		hubOpts = s.roomOptions(cfg)
	}
	if cfg.overload {
		hubOpts = append(hubOpts, tether.WithTopicPolicy(overloadPolicy), tether.WithObserver(tether.Observer{Overload: s.overloaded}))
		if cfg.breaker > 0 {
			hubOpts = append(hubOpts, tether.WithBreaker(cfg.breaker))
		}
	}
	if cfg.admission > 0 {
		hubOpts = append(hubOpts, tether.WithAdmission(rate.Limit(cfg.admission), max(int(math.Ceil(cfg.admission)), 1)))
	}
	hub, err := tether.NewHub(append(hubOpts,
		obs,
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) { s.register(c, false) }}),
	)...)
	if err != nil {
		return nil, err
	}
	s.hub = hub
	return s, nil
}

// roomOptions are the hub's options for the room scenario (serve -room):
// every option at its default but the heartbeat (whose flags default to
// the hub's defaults), so presence is on, listing up to 100 members per
// topic; each conn's user ID is its "user" query parameter; and the
// server subscribes raw peers to bench itself as they connect, as an
// application picks a raw peer's topics, counting them in
// room_subscribed. With -nopresence, presence is off, to tell its cost
// from the rest of protocol v1's.
func (s *tetherServer) roomOptions(cfg serveConfig) []tether.HubOption {
	var presence tether.HubOption
	if cfg.noPresence {
		presence = tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Off: true} })
	}
	return []tether.HubOption{
		tether.WithHeartbeat(cfg.interval, cfg.timeout),
		presence, // nil: the default
		tether.WithAuth(func(r *http.Request) (string, error) { return r.URL.Query().Get("user"), nil }),
		tether.WithObserver(tether.Observer{Connect: s.subscribeRaw}),
	}
}

// overloadPolicy is the topic policy of -overload: hi is high priority, lo
// low, the rest normal.
func overloadPolicy(topic string) tether.TopicPolicy {
	switch topic {
	case "hi":
		return tether.TopicPolicy{Priority: tether.PriorityHigh}
	case "lo":
		return tether.TopicPolicy{Priority: tether.PriorityLow}
	}
	return tether.TopicPolicy{}
}

// overloaded is the Observer.Overload of -overload: it times the breaker's
// open spells.
func (s *tetherServer) overloaded(on bool, _ time.Duration) {
	now := time.Now()
	s.overMu.Lock()
	defer s.overMu.Unlock()
	switch {
	case on && s.overSince.IsZero():
		s.overSince = now
	case !on && !s.overSince.IsZero():
		s.overTotal += now.Sub(s.overSince)
		s.overSince = time.Time{}
	}
}

// overloadOpen returns how long the breaker has been open in all, the
// spell going on now included.
func (s *tetherServer) overloadOpen() time.Duration {
	s.overMu.Lock()
	defer s.overMu.Unlock()
	d := s.overTotal
	if !s.overSince.IsZero() {
		d += time.Since(s.overSince)
	}
	return d
}

// subscribeRaw is the Observer.Connect of -room and of tether-raw: it
// subscribes a raw peer (a conn without protocol v1) to bench, counting it
// in room_subscribed. v1 peers subscribe by themselves.
func (s *tetherServer) subscribeRaw(c *tether.Conn) {
	if c.Subprotocol() == tether.Subprotocol {
		return
	}
	if err := s.hub.Subscribe(c, "bench"); err != nil {
		if s.acceptErrors.Add(1) <= 5 {
			fmt.Fprintf(s.stderr, "tetherload serve: subscribing a raw peer: %v\n", err)
		}
		return
	}
	s.roomSubscribed.Add(1)
}

func (s *tetherServer) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /ws", s.handleWS)
	mux.Handle("GET /sub", s.hub)
	mux.Handle("GET /hub", s.hub)
}

func (s *tetherServer) publish(topic string, msg []byte) error {
	return s.hub.Publish(topic, msg)
}

func (s *tetherServer) fill(st *Stats) {
	hs := s.hub.Stats()
	st.HubConns, st.HubEvictions = int64(hs.Conns), int64(hs.Evictions)
	st.RoomSubscribed = s.roomSubscribed.Load()
	st.HubDrops, st.HubDeadPeers, st.HubRefused = hs.Drops, hs.DeadPeers, hs.Refused
	st.HubShed, st.HubOverloaded, st.HubOverloads = hs.Shed, hs.Overloaded, hs.Overloads
	st.HubQueued = int64(hs.QueuedMessages)
	st.OverloadOpenSecs = s.overloadOpen().Seconds()
}

func (s *tetherServer) handleWS(w http.ResponseWriter, r *http.Request) {
	c, err := tether.Accept(w, r, s.opts...)
	if err != nil {
		if s.acceptErrors.Add(1) <= 5 {
			fmt.Fprintf(s.stderr, "tetherload serve: %v\n", err)
		}
		return
	}
	s.register(c, true)
	// The handler returns: net/http's goroutine for this conn ends, and the
	// conn lives on in its tether reader alone.
}

// register logs an accepted conn, or its accept and its end when the end
// was reported first.
func (s *tetherServer) register(c *tether.Conn, ws bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p, ended := s.conns[c]; ended {
		delete(s.conns, c)
		s.log.endAt(s.log.accept(c.RemoteAddr()), p.endedAt, p.heartbeat)
		return
	}
	s.conns[c] = &tetherPeer{rec: s.log.accept(c.RemoteAddr()), ws: ws}
}

// disconnected is the Observer.Disconnect hook, run on the conn's reader.
func (s *tetherServer) disconnected(c *tether.Conn, reason error) {
	now := time.Now().UnixNano()
	hb := errors.Is(reason, tether.ErrHeartbeatTimeout)
	s.mu.Lock()
	p, ok := s.conns[c]
	if ok {
		delete(s.conns, c)
	} else {
		s.conns[c] = &tetherPeer{endedAt: now, heartbeat: hb} // not registered yet
	}
	s.mu.Unlock()
	if ok {
		s.log.endAt(p.rec, now, hb)
	}
}

// ponged is the Observer.Pong hook. It also sees the round trips of
// Conn.Ping, which the server never calls: every one is a heartbeat's.
func (s *tetherServer) ponged(c *tether.Conn, _ time.Duration) {
	s.mu.Lock()
	p := s.conns[c]
	s.mu.Unlock()
	var rec *serveConn
	if p != nil {
		rec = p.rec
	}
	s.log.pong(rec)
}

// close drops every /ws conn and waits, until ctx ends, for them to be gone,
// then closes the hub, which drops its own conns.
func (s *tetherServer) close(ctx context.Context) error {
	s.mu.Lock()
	var conns []*tether.Conn
	for c, p := range s.conns {
		if p.ws && p.rec != nil {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		_ = c.CloseNow()
	}
	var err error
	for _, c := range conns {
		select {
		case <-c.Done():
		case <-ctx.Done():
			err = ctx.Err()
		}
		if err != nil {
			break
		}
	}
	return errors.Join(err, s.hub.Close())
}
