package interop_test

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// Heartbeat of every hub in these tests: tens of milliseconds, so that a
// test lives through several timeouts in about a second.
const (
	hbInterval = 50 * time.Millisecond
	hbTimeout  = 150 * time.Millisecond

	// deadMargin bounds how late after the timeout a silent peer may be
	// reported dead. tether promises the timeout plus one scheduler tick
	// (timeout/64, about 2 ms here); the rest is room for scheduling under
	// -race on a loaded CI machine.
	deadMargin = 250 * time.Millisecond

	// alive is how long the tests that expect a peer to stay connected
	// keep it idle: several heartbeat timeouts.
	alive = 6 * hbTimeout
)

// server is a tether hub behind a real HTTP server on loopback, which
// records every conn it serves. Peers name themselves with the query
// parameter "peer", which the hub's WithAuth takes as the user ID (so
// presence and SendToUser work for them too).
//
// The hub behind the server can be replaced (restart), to simulate a
// server process that restarts and loses its in-memory history.
type server struct {
	*httptest.Server
	t    testing.TB
	opts []tether.HubOption
	hub  atomic.Pointer[tether.Hub]

	mu        sync.Mutex
	arrived   map[string]time.Time // latest handshake request per peer name
	conns     []*connRecord
	notify    chan struct{}      // closed and replaced at each change
	onConnect func(*tether.Conn) // see setOnConnect
}

// connRecord is what the server saw of one conn.
type connRecord struct {
	name      string
	conn      *tether.Conn
	arrived   time.Time // the handshake request reached the server
	connected time.Time // the hub registered the conn (Observer.Connect)
	ended     time.Time // zero while the conn is up
	reason    error     // from Observer.Disconnect
	messages  [][]byte  // raw messages, or the data of v1 sends, in order
	pongs     int       // heartbeat pings the peer answered
}

// newServer starts a hub with the tests' heartbeat and opts, and the
// recording hooks (which override any Observer.Connect, Observer.Disconnect, OnMessage
// or WithAuth in opts). The hub and the server are closed when the test
// ends.
func newServer(t testing.TB, opts ...tether.HubOption) *server {
	t.Helper()
	s := &server{t: t, opts: opts, arrived: map[string]time.Time{}, notify: make(chan struct{})}
	s.hub.Store(s.newHub())
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.arrived[r.URL.Query().Get("peer")] = time.Now()
		s.mu.Unlock()
		s.hub.Load().ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		s.hub.Load().Close()
		s.Close()
	})
	return s
}

func (s *server) newHub() *tether.Hub {
	s.t.Helper()
	opts := append([]tether.HubOption{tether.WithHeartbeat(hbInterval, hbTimeout)}, s.opts...)
	opts = append(opts,
		tether.WithObserver(tether.Observer{Pong: func(c *tether.Conn, _ time.Duration) {
			s.mu.Lock()
			defer s.mu.Unlock()
			if rec := s.recordLocked(c); rec != nil {
				rec.pongs++
			}
		}}),
		tether.WithAuth(func(r *http.Request) (string, error) {
			return r.URL.Query().Get("peer"), nil
		}),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			s.mu.Lock()
			rec := &connRecord{name: c.UserID(), conn: c, arrived: s.arrived[c.UserID()], connected: time.Now()}
			s.conns = append(s.conns, rec)
			f := s.onConnect
			s.changedLocked()
			s.mu.Unlock()
			if f != nil {
				f(c)
			}
		}}),
		tether.WithObserver(tether.Observer{Disconnect: func(c *tether.Conn, reason error) {
			s.mu.Lock()
			defer s.mu.Unlock()
			if rec := s.recordLocked(c); rec != nil {
				rec.ended, rec.reason = time.Now(), reason
			}
			s.changedLocked()
		}}),
		tether.OnMessage(func(c *tether.Conn, m tether.Message) {
			s.mu.Lock()
			defer s.mu.Unlock()
			if rec := s.recordLocked(c); rec != nil {
				rec.messages = append(rec.messages, m.Data)
			}
			s.changedLocked()
		}),
	)
	hub, err := tether.NewHub(opts...)
	if err != nil {
		s.t.Fatalf("NewHub: %v", err)
	}
	return hub
}

// restart closes the hub, dropping every conn without a close handshake
// as a crashed process would, and serves the same URL with a new hub of
// the same options, whose history starts empty under a new epoch.
func (s *server) restart() {
	s.t.Helper()
	old := s.hub.Swap(s.newHub())
	old.Close()
}

// setOnConnect sets a function the hub's Observer.Connect calls with each new
// conn: to subscribe raw peers to topics.
func (s *server) setOnConnect(f func(*tether.Conn)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onConnect = f
}

func (s *server) Hub() *tether.Hub { return s.hub.Load() }

func (s *server) recordLocked(c *tether.Conn) *connRecord {
	for _, r := range s.conns {
		if r.conn == c {
			return r
		}
	}
	return nil
}

func (s *server) changedLocked() {
	close(s.notify)
	s.notify = make(chan struct{})
}

// url is the server's WebSocket URL for a peer of this name.
func (s *server) url(peer string) string {
	return "ws" + strings.TrimPrefix(s.URL, "http") + "/ws?peer=" + peer
}

// waitFor waits up to d for cond, run with the server's lock held, and
// fails the test with what when it does not come. cond is checked at each
// change of the server's records, and every few milliseconds for what
// the records do not hold (a conn's topics).
func (s *server) waitFor(d time.Duration, what string, cond func() bool) {
	s.t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		s.mu.Lock()
		ok, ch := cond(), s.notify
		s.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-tick.C:
		case <-timer.C:
			s.t.Fatalf("after %v, still waiting for %s", d, what)
		}
	}
}

// nthLocked returns the n-th conn (from 1) of the named peer, or nil.
func (s *server) nthLocked(name string, n int) *connRecord {
	i := 0
	for _, r := range s.conns {
		if r.name == name {
			if i++; i == n {
				return r
			}
		}
	}
	return nil
}

// copyOf returns a copy of rec, its lock held, that the test may read at
// leisure.
func copyOf(rec *connRecord) connRecord {
	out := *rec
	out.messages = append([][]byte(nil), rec.messages...)
	return out
}

// conn waits for the n-th conn (from 1) of the named peer and returns a
// copy of its record.
func (s *server) conn(name string, n int, d time.Duration) connRecord {
	s.t.Helper()
	var out connRecord
	s.waitFor(d, fmt.Sprintf("conn %d of %s", n, name), func() bool {
		if r := s.nthLocked(name, n); r != nil {
			out = copyOf(r)
			return true
		}
		return false
	})
	return out
}

// ended waits for the n-th conn of the named peer to end and returns a
// copy of its record.
func (s *server) ended(name string, n int, d time.Duration) connRecord {
	s.t.Helper()
	var out connRecord
	s.waitFor(d, fmt.Sprintf("the end of conn %d of %s", n, name), func() bool {
		if r := s.nthLocked(name, n); r != nil && !r.ended.IsZero() {
			out = copyOf(r)
			return true
		}
		return false
	})
	return out
}

// record returns a copy of the n-th conn of the named peer as it is now.
func (s *server) record(name string, n int) connRecord {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.nthLocked(name, n)
	if r == nil {
		s.t.Fatalf("no conn %d of %s", n, name)
	}
	return copyOf(r)
}

// message waits for a message equal to want from the n-th conn of the
// named peer.
func (s *server) message(name string, n int, want string, d time.Duration) {
	s.t.Helper()
	s.waitFor(d, fmt.Sprintf("message %s from conn %d of %s", want, n, name), func() bool {
		if r := s.nthLocked(name, n); r != nil {
			for _, m := range r.messages {
				if string(m) == want {
					return true
				}
			}
		}
		return false
	})
}

// checkDeadOnTime checks that a conn was dropped for its silence within
// the heartbeat's promise: never before the timeout (counted from the
// handshake request, which precedes the conn's first moment), and at most
// deadMargin after it (counted from registration, which follows it).
func checkDeadOnTime(t testing.TB, rec connRecord) {
	t.Helper()
	if rec.arrived.IsZero() {
		t.Fatalf("no handshake time recorded for %s", rec.name)
	}
	early, late := rec.ended.Sub(rec.arrived), rec.ended.Sub(rec.connected)
	if !errors.Is(rec.reason, tether.ErrHeartbeatTimeout) {
		t.Fatalf("conn %s ended %v after its handshake request with %v, want ErrHeartbeatTimeout", rec.name, early, rec.reason)
	}
	t.Logf("%s: dropped %v after its handshake request, %v after registration (timeout %v)",
		rec.name, early.Round(time.Millisecond), late.Round(time.Millisecond), hbTimeout)
	if early < hbTimeout {
		t.Errorf("%s dropped %v after its handshake, before the %v timeout", rec.name, early, hbTimeout)
	}
	if late > hbTimeout+deadMargin {
		t.Errorf("%s dropped %v after registration, want at most timeout %v + %v", rec.name, late, hbTimeout, deadMargin)
	}
}
