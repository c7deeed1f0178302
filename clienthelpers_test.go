package tether_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// site is a hub on a fixed loopback address that a test can stop and
// start again, as a server restart would: a new hub on the same address,
// with the same history, so that clients resume across it. It records
// when each handshake request arrived.
type site struct {
	t    testing.TB
	addr string
	opts []tether.HubOption

	mu       sync.Mutex
	hub      *tether.Hub
	srv      *http.Server
	served   sync.WaitGroup
	attempts []time.Time
	conns    []*tether.Conn
}

// newSite starts a site; opts apply to every hub it starts. Give it a
// shared History (WithHistory) to keep topics' positions across restarts.
func newSite(t testing.TB, opts ...tether.HubOption) *site {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &site{t: t, addr: ln.Addr().String()}
	// Recorded for kick; observers in opts are called too.
	s.opts = append([]tether.HubOption{tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
		s.mu.Lock()
		s.conns = append(s.conns, c)
		s.mu.Unlock()
	}})}, opts...)
	s.serve(ln)
	t.Cleanup(s.stop)
	return s
}

func (s *site) url() string { return "ws://" + s.addr + "/ws" }

// Hub returns the running hub, or nil while stopped.
func (s *site) Hub() *tether.Hub {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hub
}

func (s *site) serve(ln net.Listener) {
	hub, err := tether.NewHub(s.opts...)
	if err != nil {
		s.t.Fatalf("NewHub: %v", err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			s.mu.Lock()
			s.attempts = append(s.attempts, time.Now())
			s.mu.Unlock()
			hub.ServeHTTP(w, r)
		}),
	}
	s.mu.Lock()
	s.hub, s.srv = hub, srv
	s.mu.Unlock()
	s.served.Add(1)
	go func() {
		defer s.served.Done()
		srv.Serve(ln)
	}()
}

// stop closes the hub and the server: every conn drops at once, without
// a close frame, and the address refuses connections.
func (s *site) stop() {
	s.mu.Lock()
	hub, srv := s.hub, s.srv
	s.hub, s.srv = nil, nil
	s.mu.Unlock()
	if hub == nil {
		return
	}
	// The listener first: a client that comes back while the hub closes
	// finds the port closed, as after a crash, rather than a 503.
	srv.Close()
	hub.Close()
	s.served.Wait()
}

// kick closes every conn the site has accepted with 1000, as a server
// application that ends them would. It waits for at least one: the hub
// sends the welcome, which a client takes for being connected, before its
// Observer.Connect records the conn here.
func (s *site) kick() {
	s.t.Helper()
	var conns []*tether.Conn
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		s.mu.Lock()
		conns = s.conns
		s.conns = nil
		s.mu.Unlock()
		if len(conns) > 0 {
			break
		}
		if time.Now().After(deadline) {
			s.t.Fatal("kick: no conn to close within 10 s")
		}
	}
	for _, c := range conns {
		c.Close(websocket.StatusNormalClosure, "kicked")
	}
}

// restart replaces the hub with a new one on the same address, with no
// gap: the new one listens before the old one drops its conns, all at once.
func (s *site) restart() {
	s.t.Helper()
	s.mu.Lock()
	hub, srv := s.hub, s.srv
	s.mu.Unlock()
	srv.Close()
	s.start()
	hub.Close()
}

// start serves again on the same address, with a new hub.
func (s *site) start() {
	s.t.Helper()
	var ln net.Listener
	var err error
	// The old listener's port is free once it is closed; retry briefly in
	// case the kernel is slow to release it.
	for range 100 {
		if ln, err = net.Listen("tcp", s.addr); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		s.t.Fatalf("listen again on %s: %v", s.addr, err)
	}
	s.serve(ln)
}

// attemptsSince returns the handshake requests that arrived after t.
func (s *site) attemptsSince(t time.Time) []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []time.Time
	for _, a := range s.attempts {
		if !a.Before(t) {
			out = append(out, a)
		}
	}
	return out
}

// dial makes a client for the test; it is closed when the test ends.
func dial(t testing.TB, url string, opts ...tether.DialOption) *tether.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := tether.Dial(ctx, url, opts...)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// fastBackoff reconnects within tens of milliseconds, for tests.
var fastBackoff = tether.WithBackoff(tether.Backoff{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond})

// states records a client's state changes.
type states struct {
	mu  sync.Mutex
	log []stateChange
	ch  chan stateChange
}

type stateChange struct {
	state tether.State
	err   error
	at    time.Time
}

func newStates() *states { return &states{ch: make(chan stateChange, 1000)} }

func (s *states) option() tether.DialOption {
	return tether.WithObserver(tether.Observer{State: func(st tether.State, err error) {
		c := stateChange{st, err, time.Now()}
		s.mu.Lock()
		s.log = append(s.log, c)
		s.mu.Unlock()
		select {
		case s.ch <- c:
		default:
		}
	}})
}

// await waits for the client to enter state, and returns that change.
func (s *states) await(t testing.TB, want tether.State) stateChange {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case c := <-s.ch:
			if c.state == want {
				return c
			}
		case <-timeout:
			t.Fatalf("state %v not reached in 10 s; changes: %v", want, s.all())
		}
	}
}

func (s *states) all() []tether.State {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]tether.State, len(s.log))
	for i, c := range s.log {
		out[i] = c.state
	}
	return out
}

// inbox collects what a subscription handler receives.
type inbox struct {
	mu   sync.Mutex
	msgs []tether.Message
	ch   chan struct{}
}

func newInbox() *inbox { return &inbox{ch: make(chan struct{}, 1)} }

func (b *inbox) handler(m tether.Message) {
	b.mu.Lock()
	b.msgs = append(b.msgs, m)
	b.mu.Unlock()
	select {
	case b.ch <- struct{}{}:
	default:
	}
}

func (b *inbox) len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.msgs)
}

func (b *inbox) all() []tether.Message {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]tether.Message(nil), b.msgs...)
}

// await waits until the inbox holds n messages.
func (b *inbox) await(t testing.TB, n int) []tether.Message {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for b.len() < n {
		if time.Now().After(deadline) {
			t.Fatalf("got %d messages in 10 s, want %d", b.len(), n)
		}
		select {
		case <-b.ch:
		case <-time.After(50 * time.Millisecond):
		}
	}
	return b.all()
}

// proxy is a TCP proxy on loopback that can freeze: its conns stay open
// but it stops forwarding, as a peer behind a dead NAT or a pulled cable
// looks. Conns accepted after a freeze forward normally.
type proxy struct {
	ln     net.Listener
	target string

	mu       sync.Mutex
	frozen   []chan struct{} // one per pair; closed to freeze it
	replies  []chan struct{} // one per pair; closed to stop the server's side alone
	requests []chan struct{} // one per pair; closed to stop the client's side alone
	conns    []net.Conn
	wg       sync.WaitGroup
}

func newProxy(t testing.TB, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *proxy) url() string { return "ws://" + p.ln.Addr().String() + "/ws" }

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			continue
		}
		freeze, replies, requests := make(chan struct{}), make(chan struct{}), make(chan struct{})
		p.mu.Lock()
		p.frozen = append(p.frozen, freeze)
		p.replies = append(p.replies, replies)
		p.requests = append(p.requests, requests)
		p.conns = append(p.conns, in, out)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(in, out, freeze, replies)
		go p.pipe(out, in, freeze, requests)
	}
}

// pipe copies until an error or a freeze. Once frozen it forwards
// nothing more but keeps both sockets open: each side sees a live TCP
// conn that carries nothing.
func (p *proxy) pipe(dst, src net.Conn, freeze, also chan struct{}) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-freeze:
			return
		case <-also: // nil: never
			return
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				if tc, ok := dst.(*net.TCPConn); ok {
					tc.CloseWrite()
				}
			}
			return
		}
	}
}

// freeze stops forwarding on every conn open now.
func (p *proxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.frozen {
		select {
		case <-f:
		default:
			close(f)
		}
	}
}

// freezeReplies stops forwarding from the server on every conn open now:
// what the client sends still arrives, but no answer comes back.
func (p *proxy) freezeReplies() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.replies {
		select {
		case <-f:
		default:
			close(f)
		}
	}
}

// freezeRequests stops forwarding from the client on every conn open now:
// what the server sends still arrives, but nothing the client sends does.
func (p *proxy) freezeRequests() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.requests {
		select {
		case <-f:
		default:
			close(f)
		}
	}
}

func (p *proxy) close() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
