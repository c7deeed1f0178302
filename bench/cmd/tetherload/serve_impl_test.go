package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	centrifugego "github.com/centrifugal/centrifuge-go"
	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// serveTestImpls are the impls every TestServeImpl* test runs against.
var serveTestImpls = []string{"tether", "tether-raw", "gorilla", "melody", "naive", "centrifuge"}

// serveTestSubscribed is the waitStats condition of n subscribers
// registered for the broadcast. tether-raw's hub counts a conn before its
// Observer.Connect subscribes it: there, n subscribed too.
func serveTestSubscribed(impl string, n int64) func(Stats) bool {
	return func(st Stats) bool { return st.HubConns == n && (impl != "tether-raw" || st.RoomSubscribed == n) }
}

// serveTestHeartbeat is the heartbeat of the tests: pings every 50 ms, dead
// 300 ms after the last pong. centrifuge checks pongs only when PongTimeout
// (timeout-interval) is not above the ping interval, and centrifuge-go (cfgo)
// answers pings only with an interval of 1 s or more (see
// TestServeCentrifugeWarnings): it gets 200 ms and 300 ms with a raw
// client, 1 s and 1.5 s with centrifuge-go.
func serveTestHeartbeat(impl string, cfgo bool) (interval, timeout time.Duration) {
	switch {
	case impl == "centrifuge" && cfgo:
		return time.Second, 1500 * time.Millisecond
	case impl == "centrifuge":
		return 200 * time.Millisecond, 300 * time.Millisecond
	}
	return 50 * time.Millisecond, 300 * time.Millisecond
}

// serveTestCentrifugeCloseWait is centrifuge's closeFrameWait: after
// dropping a client it waits this long for the client's close frame before
// it closes the conn and calls OnDisconnect, which a silent client never
// sends.
const serveTestCentrifugeCloseWait = 5 * time.Second

// serveTestSlack is how much earlier than timeout after its last answered
// ping a silent peer may be declared dead: the round trip of that ping,
// for the impls that time the pong from the ping (naive, centrifuge).
const serveTestSlack = 50 * time.Millisecond

// serveTestServer is serve() running in the test process.
type serveTestServer struct {
	t      *testing.T
	impl   string
	addr   string
	hc     *http.Client
	cancel context.CancelFunc
	done   chan error
	stderr *serveTestBuffer
	once   sync.Once
}

type serveTestBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *serveTestBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *serveTestBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// serveTestAddr takes serve's first line of stdout: its address.
type serveTestAddr chan string

func (w serveTestAddr) Write(p []byte) (int, error) {
	select {
	case w <- strings.TrimSpace(string(p)):
	default:
	}
	return len(p), nil
}

func startServeTest(t *testing.T, cfg serveConfig) *serveTestServer {
	t.Helper()
	cfg.addr = cmpOr(cfg.addr, "127.0.0.1:0")
	if cfg.queue == 0 {
		cfg.queue = 256
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &serveTestServer{
		t: t, impl: cfg.impl, cancel: cancel, done: make(chan error, 1),
		stderr: new(serveTestBuffer),
		// No keep-alive: no idle conn outlives the test for goleak to find.
		hc: &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second},
	}
	addr := make(serveTestAddr, 1)
	go func() { s.done <- serve(ctx, cfg, addr, s.stderr) }()
	select {
	case s.addr = <-addr:
	case err := <-s.done:
		t.Fatalf("serve -impl %s: %v", cfg.impl, err)
	case <-time.After(5 * time.Second):
		cancel()
		t.Fatalf("serve -impl %s printed no address in 5s", cfg.impl)
	}
	t.Cleanup(s.stop)
	return s
}

// stop ends serve as SIGTERM does, and checks that it returns, cleanly and
// within a few seconds.
func (s *serveTestServer) stop() {
	s.once.Do(func() {
		start := time.Now()
		s.cancel()
		select {
		case err := <-s.done:
			if err != nil {
				s.t.Errorf("serve -impl %s returned %v", s.impl, err)
			}
			if d := time.Since(start); d > 4*time.Second {
				s.t.Errorf("serve -impl %s took %v to shut down", s.impl, d)
			}
		case <-time.After(10 * time.Second):
			s.t.Errorf("serve -impl %s still running 10s after its ctx ended", s.impl)
		}
		if e := s.stderr.String(); strings.Contains(e, "closing the") {
			s.t.Errorf("serve -impl %s did not close cleanly:\n%s", s.impl, e)
		} else if e != "" {
			s.t.Logf("serve -impl %s stderr:\n%s", s.impl, e)
		}
	})
}

func (s *serveTestServer) url(path string) string { return "http://" + s.addr + path }

func (s *serveTestServer) stats() Stats {
	s.t.Helper()
	var st Stats
	s.getJSON("/stats?gc=0", &st)
	return st
}

func (s *serveTestServer) events() serveEventsJSON {
	s.t.Helper()
	var ev serveEventsJSON
	s.getJSON("/events", &ev)
	return ev
}

func (s *serveTestServer) getJSON(path string, v any) {
	s.t.Helper()
	resp, err := s.hc.Get(s.url(path))
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		s.t.Fatalf("GET %s: %s", path, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		s.t.Fatalf("GET %s: %v", path, err)
	}
}

func (s *serveTestServer) publish(n, size int) {
	s.t.Helper()
	resp, err := s.hc.Post(s.url(fmt.Sprintf("/publish?topic=bench&n=%d&size=%d", n, size)), "", nil)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var got, ns int64
	if _, err := fmt.Sscanf(string(body), "%d %d\n", &got, &ns); resp.StatusCode != http.StatusOK || err != nil || got != int64(n) {
		s.t.Fatalf("POST /publish: %s %q", resp.Status, body)
	}
}

// waitStats polls /stats until ok holds, for at most bound.
func (s *serveTestServer) waitStats(bound time.Duration, what string, ok func(Stats) bool) Stats {
	s.t.Helper()
	deadline := time.Now().Add(bound)
	for {
		st := s.stats()
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s: not within %v; /stats %+v", what, bound, st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// serveTestClient is one subscriber of the impl under test: a coder/websocket
// client (speaking tether's protocol v1 or centrifuge's JSON protocol where
// the impl needs it), or a centrifuge-go client.
type serveTestClient struct {
	impl  string
	local atomic.Pointer[string] // the client's address, the "remote" of /events

	ws *websocket.Conn
	cf *centrifugego.Client

	msgs     chan []byte   // every bench message received, as published
	readDone chan struct{} // closed when the reader stops (ws clients)

	silent   atomic.Bool  // stop answering pings, and reading at the next frame
	answered atomic.Int64 // Unix ns just before the last ping answered
	nPings   atomic.Int64 // pings answered
}

// dialServeTest connects a subscriber to s. cf picks centrifuge-go for the
// centrifuge impl, which cannot go silent; otherwise centrifuge's protocol
// is spoken over coder/websocket.
func dialServeTest(t *testing.T, s *serveTestServer, cf bool) *serveTestClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c := &serveTestClient{impl: s.impl, msgs: make(chan []byte, 1024), readDone: make(chan struct{})}
	dialer := &net.Dialer{}
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := dialer.DialContext(ctx, network, addr)
		if err == nil {
			local := nc.LocalAddr().String()
			c.local.Store(&local)
		}
		return nc, err
	}
	url := "ws://" + s.addr + "/sub"

	if s.impl == "centrifuge" && cf {
		close(c.readDone)
		subscribed := make(chan error, 1)
		c.cf = centrifugego.NewJsonClient(url, centrifugego.Config{NetDialContext: dial})
		sub, err := c.cf.NewSubscription("bench")
		if err != nil {
			t.Fatal(err)
		}
		sub.OnPublication(func(e centrifugego.PublicationEvent) { c.msgs <- bytes.Clone(e.Data) })
		sub.OnSubscribed(func(centrifugego.SubscribedEvent) { subscribed <- nil })
		sub.OnError(func(e centrifugego.SubscriptionErrorEvent) { subscribed <- e.Error })
		t.Cleanup(c.cf.Close)
		if err := sub.Subscribe(); err != nil {
			t.Fatal(err)
		}
		if err := c.cf.Connect(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-subscribed:
			if err != nil {
				t.Fatalf("centrifuge-go subscribe: %v", err)
			}
		case <-ctx.Done():
			t.Fatal("centrifuge-go: not subscribed within 5s")
		}
		return c
	}

	opts := &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}},
		OnPingReceived: func(context.Context, []byte) bool {
			if c.silent.Load() {
				return false
			}
			c.answered.Store(time.Now().UnixNano())
			c.nPings.Add(1)
			return true
		},
	}
	if s.impl == "tether" {
		opts.Subprotocols = []string{tether.Subprotocol}
	}
	ws, _, err := websocket.Dial(ctx, url, opts)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	c.ws = ws
	ws.SetReadLimit(-1) // gorilla's frames hold many messages
	t.Cleanup(func() {
		_ = ws.CloseNow()
		<-c.readDone
	})
	switch s.impl {
	case "tether":
		c.command(ctx, t, `{"op":"sub","topic":"bench","id":"1"}`, `"op":"ack"`)
	case "centrifuge":
		c.command(ctx, t, `{"id":1,"connect":{}}`, `{"id":1,`)
		c.command(ctx, t, `{"id":2,"subscribe":{"channel":"bench"}}`, `{"id":2,`)
	}
	go c.read()
	return c
}

// command sends cmd and reads until a line holding reply, answering
// centrifuge's pings meanwhile.
func (c *serveTestClient) command(ctx context.Context, t *testing.T, cmd, reply string) {
	t.Helper()
	if err := c.ws.Write(ctx, websocket.MessageText, []byte(cmd)); err != nil {
		t.Fatalf("send %s: %v", cmd, err)
	}
	for {
		_, frame, err := c.ws.Read(ctx)
		if err != nil {
			t.Fatalf("waiting for the reply to %s: %v", cmd, err)
		}
		for line := range bytes.SplitSeq(frame, []byte("\n")) {
			if c.impl == "centrifuge" && bytes.Equal(line, []byte("{}")) {
				c.answerCentrifugePing(ctx)
			}
			if bytes.Contains(line, []byte(`"error"`)) {
				t.Fatalf("%s: %s", cmd, line)
			}
			if bytes.Contains(line, []byte(reply)) {
				return
			}
		}
	}
}

func (c *serveTestClient) answerCentrifugePing(ctx context.Context) {
	c.answered.Store(time.Now().UnixNano())
	c.nPings.Add(1)
	_ = c.ws.Write(ctx, websocket.MessageText, []byte("{}"))
}

// read reads frames and passes on their bench messages until the conn
// ends, or until the first frame after the client went silent: from then
// on the client reads nothing, as a dead peer.
func (c *serveTestClient) read() {
	defer close(c.readDone)
	ctx := context.Background()
	for {
		_, frame, err := c.ws.Read(ctx)
		if err != nil || c.silent.Load() {
			return
		}
		for line := range bytes.SplitSeq(frame, []byte("\n")) {
			if msg := serveTestPayload(c.impl, line); msg != nil {
				c.msgs <- msg
			} else if c.impl == "centrifuge" && bytes.Equal(line, []byte("{}")) {
				c.answerCentrifugePing(ctx)
			}
		}
	}
}

// serveTestPayload returns the bench message a line carries, as the impl
// wraps it: tether's {"op":"msg",...,"data":<msg>}, centrifuge's
// {"push":{"channel":"bench","pub":{"data":<msg>}}}, the others' bare
// message (gorilla's frames hold several, one a line; tether-raw's one).
func serveTestPayload(impl string, line []byte) []byte {
	switch impl {
	case "tether":
		var m struct {
			Op   string          `json:"op"`
			Data json.RawMessage `json:"data"`
		}
		if json.Unmarshal(line, &m) != nil || m.Op != "msg" {
			return nil
		}
		return m.Data
	case "centrifuge":
		var m struct {
			Push struct {
				Pub *struct {
					Data json.RawMessage `json:"data"`
				} `json:"pub"`
			} `json:"push"`
		}
		if json.Unmarshal(line, &m) != nil || m.Push.Pub == nil {
			return nil
		}
		return m.Push.Pub.Data
	default:
		return bytes.Clone(line)
	}
}

// goSilent stops the client answering pings, and reading at its next frame.
func (c *serveTestClient) goSilent() { c.silent.Store(true) }

func (c *serveTestClient) waitPings(t *testing.T, n int64) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for c.nPings.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d pings answered in 3s, want %d", c.nPings.Load(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// closeNormally closes the conn with a close handshake (centrifuge-go: its
// Close, which disconnects).
func (c *serveTestClient) closeNormally(t *testing.T) {
	t.Helper()
	if c.cf != nil {
		c.cf.Close()
		return
	}
	if err := c.ws.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Errorf("close: %v", err)
	}
}

// serveTestOneEnd returns the one end /events reports, failing unless
// there is exactly one and it is remote's.
func serveTestOneEnd(t *testing.T, s *serveTestServer, remote string) serveEndJSON {
	t.Helper()
	ev := s.events()
	if len(ev.Ends) != 1 || len(ev.Accepts) != 1 {
		t.Fatalf("/events: %d ends and %d accepts, want 1 and 1: %+v", len(ev.Ends), len(ev.Accepts), ev)
	}
	end := ev.Ends[0]
	if end.Remote != remote {
		t.Errorf("end of %q reported, want %q", end.Remote, remote)
	}
	if end.AtNs < ev.Accepts[0] {
		t.Errorf("ended at %d, before its accept at %d", end.AtNs, ev.Accepts[0])
	}
	return end
}

// TestServeImplPublish checks, for every impl, that a subscriber gets each
// /publish message once, whole and in order.
func TestServeImplPublish(t *testing.T) {
	for _, impl := range serveTestImpls {
		t.Run(impl, func(t *testing.T) {
			t.Parallel()
			interval, timeout := serveTestHeartbeat(impl, true)
			s := startServeTest(t, serveConfig{impl: impl, interval: interval, timeout: timeout})
			c := dialServeTest(t, s, true)
			s.waitStats(3*time.Second, "subscriber registered", serveTestSubscribed(impl, 1))

			const n, size = 50, 120
			s.publish(n, size)
			for i := range n {
				var msg []byte
				select {
				case msg = <-c.msgs:
				case <-time.After(3 * time.Second):
					t.Fatalf("message %d of %d not received in 3s", i, n)
				}
				var m struct {
					T int64 `json:"t"`
					I int   `json:"i"`
				}
				if err := json.Unmarshal(msg, &m); err != nil {
					t.Fatalf("message %d: %v: %q", i, err, msg)
				}
				if want := benchMessage(nil, m.T, i, size); !bytes.Equal(msg, want) {
					t.Fatalf("message %d: %q, want %q", i, msg, want)
				}
			}
			select {
			case msg := <-c.msgs:
				t.Errorf("message after the %d published: %q", n, msg)
			case <-time.After(50 * time.Millisecond):
			}
			st := s.stats()
			if st.Impl != impl || st.Accepted != 1 || st.Open != 1 || st.HubEvictions != 0 {
				t.Errorf("/stats: impl %q, %d accepted, %d open, %d evictions; want %q, 1, 1, 0", st.Impl, st.Accepted, st.Open, st.HubEvictions, impl)
			}
		})
	}
}

// TestServeImplHeartbeatTimeout checks, for every impl, that a client that
// answers pings and then goes silent (answers none and reads nothing) is
// ended by the server as a heartbeat death, about timeout after the last
// ping it answered: not before (less the slack), nor seconds later.
func TestServeImplHeartbeatTimeout(t *testing.T) {
	type hbCase struct {
		name, impl        string
		interval, timeout time.Duration
	}
	var cases []hbCase
	for _, impl := range serveTestImpls {
		interval, timeout := serveTestHeartbeat(impl, false)
		cases = append(cases, hbCase{impl, impl, interval, timeout})
	}
	// centrifuge with the default's proportions, -timeout 2*interval: its
	// PongTimeout equals its ping interval (see newCentrifugeServer).
	cases = append(cases, hbCase{"centrifuge-timeout=2interval", "centrifuge", 150 * time.Millisecond, 300 * time.Millisecond})
	for _, tc := range cases {
		impl, interval, timeout := tc.impl, tc.interval, tc.timeout
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := startServeTest(t, serveConfig{impl: impl, interval: interval, timeout: timeout})
			c := dialServeTest(t, s, false)
			c.waitPings(t, 2)
			c.goSilent()
			if impl != "centrifuge" {
				// A message to wake the reader, which then stops reading;
				// centrifuge's next ping does that.
				s.publish(1, 64)
			}
			select {
			case <-c.readDone:
			case <-time.After(3 * time.Second):
				t.Fatal("the client's reader did not stop within 3s of going silent")
			}
			lastAnswered := c.answered.Load()

			bound := 3 * time.Second
			if impl == "centrifuge" {
				bound += serveTestCentrifugeCloseWait
			}
			st := s.waitStats(bound+time.Second, "silent client ended", func(st Stats) bool { return st.Open == 0 })
			if st.HeartbeatTimeouts != 1 || st.OtherEnds != 0 || st.Accepted != 1 {
				t.Errorf("/stats: %d heartbeat timeouts, %d other ends of %d accepted; want 1, 0, 1", st.HeartbeatTimeouts, st.OtherEnds, st.Accepted)
			}
			end := serveTestOneEnd(t, s, *c.local.Load())
			if !end.Heartbeat {
				t.Error("/events: end not flagged heartbeat")
			}
			after := time.Duration(end.AtNs - lastAnswered)
			t.Logf("ended %v after the last ping answered (timeout %v)", after, timeout)
			if end.LastPongNs != 0 {
				t.Logf("server's last pong %v before the end", time.Duration(end.AtNs-end.LastPongNs))
			}
			if after < timeout-serveTestSlack || after > bound {
				t.Errorf("ended %v after the last ping answered, want within [%v, %v]", after, timeout-serveTestSlack, bound)
			}
			if impl == "centrifuge" {
				if end.LastPongNs != 0 || st.Pongs != 0 {
					t.Errorf("centrifuge pongs are not observable, yet last pong %d and %d pongs", end.LastPongNs, st.Pongs)
				}
				return
			}
			if end.LastPongNs < lastAnswered || time.Duration(end.AtNs-end.LastPongNs) < timeout-serveTestSlack {
				t.Errorf("last pong at %d (client answered at %d), end at %d: want the pong after the answer and the end >= %v after it",
					end.LastPongNs, lastAnswered, end.AtNs, timeout-serveTestSlack)
			}
			if st.Pongs < 2 {
				t.Errorf("%d pongs observed, want >= 2", st.Pongs)
			}
		})
	}
}

// TestServeImplNormalClose checks, for every impl, that a client that keeps
// answering pings for twice the timeout is kept, and that when it closes
// normally its end counts as an other end, not a heartbeat death.
func TestServeImplNormalClose(t *testing.T) {
	for _, impl := range serveTestImpls {
		t.Run(impl, func(t *testing.T) {
			t.Parallel()
			interval, timeout := serveTestHeartbeat(impl, true)
			s := startServeTest(t, serveConfig{impl: impl, interval: interval, timeout: timeout})
			c := dialServeTest(t, s, true)
			s.waitStats(3*time.Second, "client registered", func(st Stats) bool { return st.Open == 1 && st.HubConns == 1 })
			time.Sleep(2 * timeout)
			st := s.stats()
			if st.Open != 1 || st.HeartbeatTimeouts != 0 || st.OtherEnds != 0 {
				t.Fatalf("a live client was dropped: %+v", st)
			}
			if impl != "centrifuge" && st.Pongs == 0 {
				t.Errorf("no pong observed in %v with a %v heartbeat", 2*timeout, interval)
			}
			c.closeNormally(t)
			st = s.waitStats(3*time.Second, "closed client ended", func(st Stats) bool { return st.Open == 0 })
			if st.HeartbeatTimeouts != 0 || st.OtherEnds != 1 {
				t.Errorf("/stats: %d heartbeat timeouts and %d other ends, want 0 and 1", st.HeartbeatTimeouts, st.OtherEnds)
			}
			if end := serveTestOneEnd(t, s, *c.local.Load()); end.Heartbeat {
				t.Error("/events: a normal close flagged heartbeat")
			}
			s.waitStats(3*time.Second, "client unregistered", func(st Stats) bool { return st.HubConns == 0 })
		})
	}
}

// TestServeImplShutdown checks, for every impl, that ending serve's ctx (as
// SIGTERM does) closes the conns of live subscribers and returns within a
// few seconds; TestMain's goleak then checks that no goroutine is left.
func TestServeImplShutdown(t *testing.T) {
	for _, impl := range serveTestImpls {
		t.Run(impl, func(t *testing.T) {
			t.Parallel()
			interval, timeout := serveTestHeartbeat(impl, false)
			s := startServeTest(t, serveConfig{impl: impl, interval: interval, timeout: timeout})
			clients := []*serveTestClient{dialServeTest(t, s, false), dialServeTest(t, s, false)}
			s.waitStats(3*time.Second, "clients registered", serveTestSubscribed(impl, 2))
			s.stop()
			for i, c := range clients {
				select {
				case <-c.readDone:
				case <-time.After(5 * time.Second):
					t.Errorf("client %d: conn still open 5s after the server stopped", i)
				}
			}
		})
	}
}

// TestServeImplEviction checks, for every impl, what becomes of a
// subscriber that reads nothing while a lot is published: tether (v1 or
// raw peers), gorilla, naive and centrifuge drop it as too slow (one eviction), melody drops
// messages and keeps it (evictions count the messages). Either way, once the
// client goes, its end is an other end, not a heartbeat death.
func TestServeImplEviction(t *testing.T) {
	for _, impl := range serveTestImpls {
		t.Run(impl, func(t *testing.T) {
			t.Parallel()
			// A heartbeat slow enough not to fire during the test.
			s := startServeTest(t, serveConfig{impl: impl, interval: 10 * time.Second, timeout: 20 * time.Second, queue: 4})
			c := dialServeTest(t, s, false)
			c.goSilent()
			s.waitStats(3*time.Second, "subscriber registered", serveTestSubscribed(impl, 1))
			// Far more than the socket buffers, 4 queued messages and
			// centrifuge's 1 MiB queue hold.
			s.publish(400, 64<<10)
			switch impl {
			case "melody":
				st := s.waitStats(3*time.Second, "messages dropped", func(st Stats) bool { return st.HubEvictions > 0 })
				if st.Open != 1 || st.HubConns != 1 {
					t.Errorf("/stats: %d open, %d hub conns; melody drops messages, not conns", st.Open, st.HubConns)
				}
			case "centrifuge", "tether", "tether-raw":
				// They count the eviction when the conn has ended: centrifuge
				// waits for a close frame the client will not send, tether
				// for the write in flight to time out (10 s).
			default:
				s.waitStats(3*time.Second, "slow subscriber dropped", func(st Stats) bool { return st.HubEvictions > 0 && st.HubConns == 0 })
			}
			// The server's write may wait for its timeout (10 s) before the
			// conn ends: the client ending it ends the wait.
			_ = c.ws.CloseNow()
			st := s.waitStats(3*time.Second, "subscriber's conn ended", func(st Stats) bool { return st.Open == 0 })
			if st.HeartbeatTimeouts != 0 || st.OtherEnds != 1 {
				t.Errorf("/stats: %d heartbeat timeouts, %d other ends; want 0 and 1", st.HeartbeatTimeouts, st.OtherEnds)
			}
			if impl != "melody" && st.HubEvictions != 1 {
				t.Errorf("/stats: %d evictions, want 1", st.HubEvictions)
			}
			t.Logf("%d evictions", st.HubEvictions)
		})
	}
}

// TestServeMelodyHeartbeatDeath checks how the melody impl tells its read
// deadline from other errors, as gorilla/websocket reports them.
func TestServeMelodyHeartbeatDeath(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}, true},
		{&net.OpError{Op: "write", Net: "tcp", Err: os.ErrDeadlineExceeded}, false},
		{&net.OpError{Op: "read", Net: "tcp", Err: net.ErrClosed}, false},
		{&websocket.CloseError{Code: websocket.StatusNormalClosure}, false},
	} {
		err := tc.err
		if got := melodyHeartbeatDeath(&err); got != tc.want {
			t.Errorf("%v: heartbeat death %v, want %v", tc.err, got, tc.want)
		}
	}
	if melodyHeartbeatDeath(nil) {
		t.Error("no error: heartbeat death")
	}
}

// TestServeCentrifugeWarnings checks that serve warns of the heartbeats
// centrifuge cannot honour: a PongTimeout it never checks, and a ping
// interval below 1 s, which centrifuge-go clients never answer.
func TestServeCentrifugeWarnings(t *testing.T) {
	for _, tc := range []struct {
		interval, timeout time.Duration
		pong, cfgo        bool
	}{
		{50 * time.Millisecond, 300 * time.Millisecond, true, true},
		{200 * time.Millisecond, 300 * time.Millisecond, false, true},
		{time.Second, 2500 * time.Millisecond, true, false},
		{time.Second, 2 * time.Second, false, false}, // the check runs, just
		{time.Second, 1500 * time.Millisecond, false, false},
	} {
		s := startServeTest(t, serveConfig{impl: "centrifuge", interval: tc.interval, timeout: tc.timeout})
		s.stop()
		stderr := s.stderr.String()
		if got := strings.Contains(stderr, "will not drop silent clients"); got != tc.pong {
			t.Errorf("interval %v, timeout %v: PongTimeout warning %v, want %v", tc.interval, tc.timeout, got, tc.pong)
		}
		if got := strings.Contains(stderr, "centrifuge-go clients will not answer pings"); got != tc.cfgo {
			t.Errorf("interval %v, timeout %v: centrifuge-go warning %v, want %v", tc.interval, tc.timeout, got, tc.cfgo)
		}
	}
}

// TestServeImplFlags checks -impl, the heartbeat flags, -room, -cpus,
// -overload, -breaker and -admission.
func TestServeImplFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-impl", "nope"},
		{"-impl", "gorilla", "-interval", "1s", "-timeout", "1s"},
		{"-interval", "0s"},
		{"-impl", "gorilla", "-room"},
		{"-impl", "tether-raw", "-room"},
		{"-cpus", "x"},
		{"-impl", "gorilla", "-overload"},
		{"-overload", "-room"},
		{"-breaker", "50ms"},
		{"-overload", "-breaker", "-1s"},
		{"-impl", "melody", "-admission", "100"},
		{"-admission", "-1"},
	} {
		var out, errOut serveTestBuffer
		err := serveMain(context.Background(), args, &out, &errOut)
		if !errors.Is(err, errUsage) || errOut.String() == "" {
			t.Errorf("serve %q: %v with %q, want a usage error", args, err, errOut.String())
		}
	}
}
