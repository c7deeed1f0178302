package tether_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"golang.org/x/time/rate"
)

// admServer is a hub behind an httptest server whose handler calls
// Hub.Serve and records what it returns.
type admServer struct {
	*httptest.Server
	hub  *tether.Hub
	errs chan error // every Serve's result, nil included
}

func newAdmServer(t *testing.T, opts ...tether.HubOption) *admServer {
	t.Helper()
	hub, err := tether.NewHub(opts...)
	if err != nil {
		t.Fatalf("NewHub: %v", err)
	}
	s := &admServer{hub: hub, errs: make(chan error, 1000)}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		err := hub.Serve(w, r)
		select {
		case s.errs <- err:
		default:
		}
	}))
	t.Cleanup(func() {
		hub.Close()
		s.Close()
	})
	return s
}

func (s *admServer) url() string { return "ws" + strings.TrimPrefix(s.URL, "http") }

// served returns what the next Serve returned.
func (s *admServer) served(t *testing.T) error {
	t.Helper()
	select {
	case err := <-s.errs:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return within 5 s")
	}
	return nil
}

// refused dials with o and checks that the handshake fails with HTTP
// status, and that Serve returned an error wrapping want.
func (s *admServer) refused(t *testing.T, url string, o clientOpts, status int, want error) error {
	t.Helper()
	_, resp, err := tryDial(t, url, o)
	if err == nil {
		t.Fatalf("dial succeeded, want HTTP %d", status)
	}
	if resp == nil || resp.StatusCode != status {
		got := 0
		if resp != nil {
			got = resp.StatusCode
		}
		t.Fatalf("dial: %v (HTTP %d), want HTTP %d", err, got, status)
	}
	serr := s.served(t)
	if !errors.Is(serr, want) {
		t.Fatalf("Serve returned %v, want %v", serr, want)
	}
	return serr
}

// accepted dials a v1 client with o, reads its welcome, and checks that
// Serve returned nil.
func (s *admServer) accepted(t *testing.T, url string, o clientOpts) (*client, wire) {
	t.Helper()
	c := dialClient(t, url, o)
	w := c.welcome()
	if err := s.served(t); err != nil {
		t.Fatalf("Serve returned %v for an accepted conn", err)
	}
	return c, w
}

var errBadToken = errors.New("bad token")

// TestHubAdmissionAuth refuses a handshake in WithAuth: 401 for the
// client, ErrUnauthorized wrapping the auth function's error from Serve,
// and nothing changes for the conns already there.
func TestHubAdmissionAuth(t *testing.T) {
	s := newAdmServer(t, tether.WithAuth(func(r *http.Request) (string, error) {
		if tok := r.Header.Get("Authorization"); strings.HasPrefix(tok, "Bearer ") && tok != "Bearer bad" {
			return strings.TrimPrefix(tok, "Bearer "), nil
		}
		return "", errBadToken
	}))
	ann, w := s.accepted(t, s.url(), clientOpts{header: http.Header{"Authorization": {"Bearer ann"}}})
	if c := s.hub.Conn(w.Session); c == nil || c.UserID() != "ann" {
		t.Fatalf("ann's conn: %v", c)
	}
	ann.subscribe("room")

	for _, o := range []clientOpts{
		{header: http.Header{"Authorization": {"Bearer bad"}}},
		{}, // no credentials
		{raw: true},
	} {
		err := s.refused(t, s.url(), o, http.StatusUnauthorized, tether.ErrUnauthorized)
		if !errors.Is(err, errBadToken) {
			t.Fatalf("Serve returned %v, which does not wrap the auth function's error", err)
		}
	}
	if n := s.hub.Len(); n != 1 {
		t.Fatalf("Len() = %d after refusals, want 1", n)
	}
	if st := s.hub.Stats(); st.Connects != 1 || st.Disconnects != 0 {
		t.Fatalf("Stats() = %+v: refusals counted as conns", st)
	}
	// The conn already in is unaffected.
	if err := s.hub.Publish("room", []byte(`"still here"`)); err != nil {
		t.Fatal(err)
	}
	if m := ann.expect("msg"); string(m.Data) != `"still here"` {
		t.Fatalf("ann got %s", m.line)
	}
	bob, _ := s.accepted(t, s.url(), clientOpts{header: http.Header{"Authorization": {"Bearer bob"}}})
	bob.send(`{"op":"ping","ts":1}`)
	bob.expect("pong")
}

// TestHubAdmissionOrigin refuses a cross-origin handshake with 403 and
// ErrForbidden, and accepts same-origin ones, ones without Origin,
// and those that WithOriginPatterns allows.
func TestHubAdmissionOrigin(t *testing.T) {
	t.Run("default", func(t *testing.T) {
		s := newAdmServer(t)
		s.refused(t, s.url(), clientOpts{header: http.Header{"Origin": {"https://evil.example"}}},
			http.StatusForbidden, tether.ErrForbidden)
		s.refused(t, s.url(), clientOpts{raw: true, header: http.Header{"Origin": {"http://evil.example"}}},
			http.StatusForbidden, tether.ErrForbidden)
		// Same origin: the page was served by this host.
		s.accepted(t, s.url(), clientOpts{header: http.Header{"Origin": {s.URL}}})
		// No Origin: not a browser.
		s.accepted(t, s.url(), clientOpts{})
		if n := s.hub.Len(); n != 2 {
			t.Fatalf("Len() = %d, want 2", n)
		}
	})
	t.Run("patterns", func(t *testing.T) {
		s := newAdmServer(t, tether.WithOriginPatterns("allowed.example"))
		s.accepted(t, s.url(), clientOpts{header: http.Header{"Origin": {"https://allowed.example"}}})
		s.accepted(t, s.url(), clientOpts{header: http.Header{"Origin": {s.URL}}})
		s.refused(t, s.url(), clientOpts{header: http.Header{"Origin": {"https://evil.example"}}},
			http.StatusForbidden, tether.ErrForbidden)
		s.refused(t, s.url(), clientOpts{header: http.Header{"Origin": {"https://sub.allowed.example"}}},
			http.StatusForbidden, tether.ErrForbidden)
	})
}

// TestHubAdmissionMaxConns caps the hub at 3 conns: the 4th handshake gets
// 503 and ErrHubFull, and a slot frees when a conn leaves.
func TestHubAdmissionMaxConns(t *testing.T) {
	s := newAdmServer(t, tether.WithMaxConns(3))
	var cs []*client
	for range 3 {
		c, _ := s.accepted(t, s.url(), clientOpts{})
		cs = append(cs, c)
	}
	s.refused(t, s.url(), clientOpts{}, http.StatusServiceUnavailable, tether.ErrHubFull)
	s.refused(t, s.url(), clientOpts{raw: true}, http.StatusServiceUnavailable, tether.ErrHubFull)

	cs[0].Close()
	waitFor(t, 5*time.Second, "Len() == 2 after a close", func() bool { return s.hub.Len() == 2 })
	// The slot is given back at the very end of the conn's teardown, just
	// after Len drops: allow a moment's lag, not a lasting refusal.
	retries := 0
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, resp, err := tryDial(t, s.url(), clientOpts{})
		serr := s.served(t)
		if err == nil {
			c.welcome()
			if serr != nil {
				t.Fatalf("Serve returned %v for an accepted conn", serr)
			}
			break
		}
		if resp == nil || resp.StatusCode != http.StatusServiceUnavailable || !errors.Is(serr, tether.ErrHubFull) || time.Now().After(deadline) {
			t.Fatalf("dial after a conn left: %v (Serve: %v)", err, serr)
		}
		retries++
		time.Sleep(10 * time.Millisecond)
	}
	if retries > 0 {
		t.Logf("the freed slot was refused %d times after Len() dropped", retries)
	}
	if n := s.hub.Len(); n != 3 {
		t.Fatalf("Len() = %d, want 3", n)
	}
	s.refused(t, s.url(), clientOpts{}, http.StatusServiceUnavailable, tether.ErrHubFull)
}

var retryRE = regexp.MustCompile(`retry_ms=(\d+)`)

// TestHubAdmissionShutdown shuts down a hub with 50 reading clients: each
// gets the message published just before, then 1001 with a retry hint
// drawn from [1, 1000] ms; the hub then refuses handshakes and
// publications with ErrHubClosed.
func TestHubAdmissionShutdown(t *testing.T) {
	const conns = 50
	s := newAdmServer(t)
	var got [conns]atomic.Bool
	cs := dialFans(t, s.url(), conns, 10, func(i int) fanOpts {
		return fanOpts{topics: []string{"t"}, onLine: func(line []byte) {
			if strings.HasPrefix(string(line), `{"op":"msg",`) && strings.Contains(string(line), `"data":{"bye":1}`) {
				got[i].Store(true)
			}
		}}
	})
	for range conns {
		if err := s.served(t); err != nil {
			t.Fatal(err)
		}
	}

	if err := s.hub.Publish("t", []byte(`{"bye":1}`)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := s.hub.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown = %v, want nil", err)
	}
	t.Logf("Shutdown of %d conns took %v", conns, time.Since(start).Round(time.Millisecond))
	if n := s.hub.Len(); n != 0 {
		t.Fatalf("Len() = %d after Shutdown", n)
	}

	hints := map[int]bool{}
	lo, hi := 1<<30, 0
	for i, c := range cs {
		err := c.ReadErr(t, 5*time.Second)
		if code := websocket.CloseStatus(err); code != websocket.StatusGoingAway {
			t.Fatalf("client %d ended with %v (code %d), want 1001", i, err, code)
		}
		var ce websocket.CloseError
		errors.As(err, &ce)
		m := retryRE.FindStringSubmatch(ce.Reason)
		if m == nil {
			t.Fatalf("client %d: close reason %q has no retry_ms", i, ce.Reason)
		}
		ms, _ := strconv.Atoi(m[1])
		if ms < 1 || ms > 1000 {
			t.Fatalf("client %d: retry_ms=%d, want 1 to 1000 for %d conns", i, ms, conns)
		}
		hints[ms] = true
		lo, hi = min(lo, ms), max(hi, ms)
		if !got[i].Load() {
			t.Fatalf("client %d did not get the message published before Shutdown", i)
		}
	}
	t.Logf("retry_ms hints: %d distinct, from %d to %d", len(hints), lo, hi)
	if len(hints) < 2 {
		t.Fatalf("all %d clients got the same retry hint: not jittered", conns)
	}

	s.refused(t, s.url(), clientOpts{}, http.StatusServiceUnavailable, tether.ErrHubClosed)
	if err := s.hub.Publish("t", []byte(`1`)); !errors.Is(err, tether.ErrHubClosed) {
		t.Fatalf("Publish after Shutdown = %v, want ErrHubClosed", err)
	}
	if err := s.hub.Broadcast([]byte(`1`)); !errors.Is(err, tether.ErrHubClosed) {
		t.Fatalf("Broadcast after Shutdown = %v, want ErrHubClosed", err)
	}
	if err := s.hub.Shutdown(ctx); err != nil {
		t.Fatalf("second Shutdown = %v, want nil", err)
	}
}

// TestHubAdmissionShutdownDeadline shuts down a hub whose one client does
// not read, so its close handshake cannot finish: Shutdown gives up when
// its context ends, drops the conn and returns the context's error.
func TestHubAdmissionShutdownDeadline(t *testing.T) {
	s := newAdmServer(t, tether.WithLimits(tether.Limits{WriteTimeout: 10 * time.Second}))
	reader, err := dialFan(s.url(), fanOpts{topics: []string{"t"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(reader.Close)
	stalled, err := dialFan(s.url(), fanOpts{topics: []string{"t"}, gate: make(chan struct{})})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stalled.Close)
	for range 2 {
		if err := s.served(t); err != nil {
			t.Fatal(err)
		}
	}
	if n := s.hub.Len(); n != 2 {
		t.Fatalf("Len() = %d, want 2", n)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = s.hub.Shutdown(ctx)
	took := time.Since(start)
	t.Logf("Shutdown returned %v after %v", err, took.Round(time.Millisecond))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want context.DeadlineExceeded", err)
	}
	// Past the deadline the remaining conns are dropped at once: neither
	// the write timeout (10 s) nor a close handshake's wait may hold
	// Shutdown up.
	if took > 3*time.Second {
		t.Errorf("Shutdown took %v with a 300 ms context, want within 3 s", took)
	}
	if n := s.hub.Len(); n != 0 {
		t.Fatalf("Len() = %d after Shutdown, want 0", n)
	}
	// The reading client had its 1001 before the deadline.
	if err := reader.ReadErr(t, 5*time.Second); websocket.CloseStatus(err) != websocket.StatusGoingAway {
		t.Fatalf("reading client ended with %v, want 1001", err)
	}
	s.refused(t, s.url(), clientOpts{}, http.StatusServiceUnavailable, tether.ErrHubClosed)
}

// TestHubAdmissionClose closes a hub at once: its clients see the
// connection drop without a close frame, and it is empty when Close
// returns.
func TestHubAdmissionClose(t *testing.T) {
	s := newAdmServer(t)
	cs := dialFans(t, s.url(), 5, 5, func(int) fanOpts { return fanOpts{topics: []string{"t"}} })
	for range cs {
		if err := s.served(t); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	if err := s.hub.Close(); err != nil {
		t.Fatalf("Close = %v", err)
	}
	took := time.Since(start)
	t.Logf("Close took %v", took)
	if took > 5*time.Second {
		t.Fatalf("Close took %v", took)
	}
	if n := s.hub.Len(); n != 0 {
		t.Fatalf("Len() = %d after Close, want 0", n)
	}
	for i, c := range cs {
		err := c.ReadErr(t, 5*time.Second)
		if err == nil || websocket.CloseStatus(err) != -1 {
			t.Fatalf("client %d ended with %v (code %d), want a dropped conn without close frame", i, err, websocket.CloseStatus(err))
		}
	}
	if st := s.hub.Stats(); st.Disconnects != 5 || st.Conns != 0 {
		t.Fatalf("Stats() = %+v after Close", st)
	}
	s.refused(t, s.url(), clientOpts{}, http.StatusServiceUnavailable, tether.ErrHubClosed)
	if err := s.hub.Publish("t", []byte(`1`)); !errors.Is(err, tether.ErrHubClosed) {
		t.Fatalf("Publish after Close = %v, want ErrHubClosed", err)
	}
}

// TestHubAdmissionServeHTTP uses the hub as an http.Handler: it accepts,
// and it answers refusals and plain HTTP requests with their status.
func TestHubAdmissionServeHTTP(t *testing.T) {
	var _ http.Handler = (*tether.Hub)(nil)
	s := newHubServer(t, tether.WithMaxConns(1))
	c := dialClient(t, s.url(), clientOpts{})
	c.welcome()
	c.subscribe("x")
	if err := s.hub.Publish("x", []byte(`true`)); err != nil {
		t.Fatal(err)
	}
	if m := c.expect("msg"); string(m.Data) != "true" {
		t.Fatalf("got %s", m.line)
	}
	if _, resp, err := tryDial(t, s.url(), clientOpts{}); err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("second dial past WithMaxConns(1): %v, want HTTP 503", err)
	}
	c.Close()
	waitFor(t, 5*time.Second, "Len() == 0", func() bool { return s.hub.Len() == 0 })

	// A plain GET is not a handshake: ServeHTTP answers it with 426, and
	// Serve returns coder/websocket's error.
	resp, err := s.Client().Get(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET through ServeHTTP: HTTP %d, want 426", resp.StatusCode)
	}
	a := newAdmServer(t)
	resp, err = a.Client().Get(a.URL)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err := a.served(t); err == nil || resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET through Serve: HTTP %d, Serve returned %v; want 426 and an error", resp.StatusCode, err)
	}
	if a.hub.Len() != 0 {
		t.Fatal("a plain GET left a conn")
	}
}

// WithAdmission: past the bucket, handshakes are refused with 503 and
// ErrOverloaded before any work (the auth function never runs for them),
// and each refused client gets a slot of its own at the admission rate:
// their Retry-After values climb one second apiece instead of sending
// them all back at once.
func TestHubAdmissionRate(t *testing.T) {
	var authed atomic.Int32
	s := newAdmServer(t,
		tether.WithAdmission(1, 5), // one a second, bursts of 5
		tether.WithAuth(func(*http.Request) (string, error) { authed.Add(1); return "", nil }))
	const tries = 40
	start := time.Now()
	var accepted int
	var slots []time.Time // when each refused client was told to come back
	for range tries {
		c, resp, err := tryDial(t, s.url(), clientOpts{})
		serr := s.served(t)
		if err == nil {
			c.welcome()
			accepted++
			continue
		}
		if resp == nil || resp.StatusCode != http.StatusServiceUnavailable || !errors.Is(serr, tether.ErrOverloaded) {
			t.Fatalf("dial: %v (Serve: %v), want 503 and ErrOverloaded", err, serr)
		}
		h, perr := strconv.Atoi(resp.Header.Get("Retry-After"))
		if perr != nil || h < 1 {
			t.Fatalf("Retry-After %q, want whole seconds, at least 1", resp.Header.Get("Retry-After"))
		}
		slots = append(slots, time.Now().Add(time.Duration(h)*time.Second))
	}
	// The bucket refills one a second while the test runs.
	elapsed := time.Since(start)
	if accepted < 5 || accepted > 5+int(elapsed/time.Second)+1 {
		t.Fatalf("%d of %d admitted in %v, want the burst of 5 and one a second", accepted, tries, elapsed)
	}
	if got := int(authed.Load()); got != accepted {
		t.Errorf("the auth function ran %d times, want %d: only for admitted handshakes", got, accepted)
	}
	// Slots one second apart, in order: however long the dials took, the
	// refused clients are told to come back one a second (rounded up to
	// whole seconds: at most 2 in any second).
	perSecond := map[int64]int{}
	for k, at := range slots {
		if k > 0 && at.Before(slots[k-1].Add(-time.Second)) {
			t.Errorf("refusal %d is told to come back before refusal %d", k, k-1)
		}
		perSecond[at.Sub(start).Milliseconds()/1000]++
	}
	for sec, n := range perSecond {
		if n > 2 {
			t.Errorf("%d refused clients told to come back in second %d, want at most 2", n, sec)
		}
	}
	if spread := slots[len(slots)-1].Sub(slots[0]); spread < time.Duration(len(slots)-3)*time.Second {
		t.Errorf("%d refused clients told to come back within %v, want them a second apart", len(slots), spread)
	}
	if st := s.hub.Stats(); st.Refused != uint64(len(slots)) || st.Conns != accepted {
		t.Errorf("stats: %d refused, %d conns; want %d and %d", st.Refused, st.Conns, len(slots), accepted)
	}
}

// A crowd of Clients dialling at once past the admission rate all get in,
// each waiting for the slot it was given; none gives up.
func TestClientsAdmittedAtTheRate(t *testing.T) {
	const n = 120
	s := newAdmServer(t, tether.WithAdmission(60, 10)) // Serve's results are dropped past 1,000: only the hub's counters matter here
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	errs := make(chan error, n)
	clients := make(chan *tether.Client, n)
	for range n {
		go func() {
			c, err := tether.Dial(ctx, s.url(), tether.WithBackoff(tether.Backoff{Base: 50 * time.Millisecond, Max: 200 * time.Millisecond}))
			if err == nil {
				clients <- c
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Errorf("Dial: %v", err)
		}
	}
	close(clients)
	t.Cleanup(func() {
		for c := range clients {
			c.Close()
		}
	})
	st := s.hub.Stats()
	if st.Conns != n {
		t.Errorf("%d conns, want %d", st.Conns, n)
	}
	if st.Refused == 0 {
		t.Error("no handshake refused: the crowd did not test admission")
	}
	t.Logf("%d handshakes refused on the way in", st.Refused)
}

func TestHubAdmissionOptions(t *testing.T) {
	for _, tc := range []struct {
		rate  rate.Limit
		burst int
		ok    bool
	}{{0, 0, true}, {rate.Inf, 0, true}, {10, 1, true}, {-1, 5, false}, {10, 0, false}} {
		hub, err := tether.NewHub(tether.WithAdmission(tc.rate, tc.burst))
		if tc.ok != (err == nil) {
			t.Errorf("WithAdmission(%v, %d): %v, want ok=%v", tc.rate, tc.burst, err, tc.ok)
		}
		if err == nil {
			hub.Close()
		} else if !strings.Contains(err.Error(), "admission") {
			t.Errorf("WithAdmission(%v, %d): %q does not say what is wrong", tc.rate, tc.burst, err)
		}
	}
}

// Ready answers 200 while the hub takes conns, 503 while it would refuse
// them: full, shutting down. An empty admission bucket does not count: in
// a storm every node's is, and no node would be ready.
func TestHubReady(t *testing.T) {
	s := newAdmServer(t, tether.WithMaxConns(1), tether.WithAdmission(0.01, 1))
	ready := httptest.NewServer(s.hub.Ready())
	defer ready.Close()
	probe := func(want int, why string) {
		t.Helper()
		resp, err := http.Get(ready.URL)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("%s: Ready answered %d %q, want %d", why, resp.StatusCode, body, want)
		}
		if want == http.StatusServiceUnavailable && resp.Header.Get("Retry-After") == "" {
			t.Errorf("%s: 503 without Retry-After", why)
		}
	}
	probe(http.StatusOK, "empty hub")
	c, _ := s.accepted(t, s.url(), clientOpts{}) // the bucket's one token
	probe(http.StatusServiceUnavailable, "at WithMaxConns")
	c.Close()
	waitFor(t, 5*time.Second, "the conn gone", func() bool { return s.hub.Len() == 0 })
	s.refused(t, s.url(), clientOpts{}, http.StatusServiceUnavailable, tether.ErrOverloaded)
	probe(http.StatusOK, "with the admission bucket empty")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.hub.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	probe(http.StatusServiceUnavailable, "after Shutdown")
}

// Rebalance moves the fraction asked for, spread over the period: each
// client reconnects and resumes; with 1, the hub drains.
func TestHubRebalance(t *testing.T) {
	const n = 40
	var (
		mu     sync.Mutex
		closes []time.Time
	)
	s := newSite(t, tether.WithObserver(tether.Observer{Disconnect: func(c *tether.Conn, err error) {
		var ce *tether.CloseError
		if errors.As(err, &ce) && ce.Code == websocket.StatusGoingAway {
			mu.Lock()
			closes = append(closes, time.Now())
			mu.Unlock()
		}
	}}))
	ctx := context.Background()
	var clients []*tether.Client
	got := make(chan int, 10*n)
	for i := range n {
		c := dial(t, s.url(), tether.WithBackoff(tether.Backoff{Base: 20 * time.Millisecond, Max: 100 * time.Millisecond}))
		if err := c.Subscribe(ctx, "t", func(m tether.Message) { got <- i }); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	hub := s.Hub()
	const over = time.Second
	start := time.Now()
	moved, err := hub.Rebalance(ctx, 0.25, over)
	if err != nil || moved != n/4 {
		t.Fatalf("Rebalance = %d, %v; want %d", moved, err, n/4)
	}
	if took := time.Since(start); took < over {
		t.Errorf("Rebalance returned after %v, want the whole period of %v", took, over)
	}
	waitFor(t, 5*time.Second, "the moved conns ended", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(closes) == n/4
	})
	mu.Lock()
	spread := closes[len(closes)-1].Sub(closes[0])
	mu.Unlock()
	if spread < over/2 {
		t.Errorf("the %d closes came within %v, want them spread over about %v", n/4, spread, over)
	}
	waitFor(t, 10*time.Second, "every client back", func() bool { return hub.Len() == n })
	// Each of them is subscribed again: one message reaches all.
	if err := hub.Publish("t", []byte(`"after"`)); err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for len(seen) < n {
		select {
		case i := <-got:
			seen[i] = true
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d clients got the message after the rebalance", len(seen), n)
		}
	}

	// Everything: the hub drains and refuses newcomers.
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if moved, err := hub.Rebalance(dctx, 1, 200*time.Millisecond); err != nil || moved != n {
		t.Fatalf("Rebalance(1) = %d, %v; want %d", moved, err, n)
	}
	_, resp, err := tryDial(t, s.url(), clientOpts{})
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("dial while draining: %v, want 503", err)
	}
	// Every conn was closed and none may come back.
	waitFor(t, 5*time.Second, "every client off the draining hub", func() bool { return hub.Len() == 0 })
	for _, c := range clients {
		waitFor(t, 5*time.Second, "the client off the draining hub", func() bool { return c.State() != tether.Connected })
	}
	if n := hub.Len(); n != 0 {
		t.Fatalf("%d conns on a draining hub", n)
	}
	if _, err := hub.Rebalance(ctx, 1.5, 0); err == nil {
		t.Error("Rebalance(1.5) succeeded")
	}
}
