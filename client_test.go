package tether_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
	"golang.org/x/time/rate"
)

// numOf returns the integer a test message carries: {"n":17}.
func numOf(t testing.TB, data []byte) int {
	t.Helper()
	var v struct{ N int }
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("message %s: %v", data, err)
	}
	return v.N
}

func numbered(n int) []byte { return []byte(`{"n":` + strconv.Itoa(n) + `}`) }

// checkRun fails unless msgs carry exactly from..to, in order, once each.
func checkRun(t testing.TB, msgs []tether.Message, from, to int) {
	t.Helper()
	if len(msgs) != to-from+1 {
		t.Errorf("got %d messages, want %d (%d..%d)", len(msgs), to-from+1, from, to)
	}
	for i, m := range msgs {
		if got := numOf(t, m.Data); got != from+i {
			t.Fatalf("message %d is n=%d, want %d: lost, repeated or reordered", i, got, from+i)
		}
	}
}

func TestClientSubscribePublishSend(t *testing.T) {
	sent := make(chan string, 10)
	srv := newHubServer(t,
		tether.WithAuth(func(r *http.Request) (string, error) { return r.Header.Get("X-User"), nil }),
		tether.WithClientPublish(func(*tether.Conn, string) bool { return true }),
		tether.OnMessage(func(c *tether.Conn, m tether.Message) { sent <- c.UserID() + ":" + string(m.Data) }),
	)
	direct := make(chan string, 10)
	cl := dial(t, srv.url()+"/ws",
		tether.WithHeader(http.Header{"X-User": {"ann"}}),
		tether.OnMessage(func(c *tether.Conn, m tether.Message) { direct <- string(m.Data) }),
	)
	if cl.State() != tether.Connected {
		t.Fatalf("state after Dial = %v, want connected", cl.State())
	}
	box := newInbox()
	ctx := context.Background()
	if err := cl.Subscribe(ctx, "room", box.handler); err != nil {
		t.Fatal(err)
	}
	if err := cl.Subscribe(ctx, "room", box.handler); err == nil {
		t.Error("a second Subscribe to the same topic succeeded")
	}
	for i := 1; i <= 3; i++ {
		if err := srv.hub.Publish("room", numbered(i)); err != nil {
			t.Fatal(err)
		}
	}
	// The client's own publication comes back to it, as to any subscriber.
	if err := cl.Publish(ctx, "room", numbered(4)); err != nil {
		t.Fatal(err)
	}
	msgs := box.await(t, 4)
	checkRun(t, msgs, 1, 4)
	for i, m := range msgs {
		if m.Topic != "room" || m.Position.Seq != uint64(i+1) || m.Position.Epoch == "" {
			t.Errorf("message %d: topic %q position %+v", i, m.Topic, m.Position)
		}
	}

	if err := srv.hub.SendToUser("ann", []byte(`{"hi":"ann"}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-direct:
		if got != `{"hi":"ann"}` {
			t.Errorf("direct message %s", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no direct message")
	}
	if err := cl.Send(ctx, []byte(`{"cmd": "typing"}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-sent:
		if got != `ann:{"cmd": "typing"}` { // byte for byte
			t.Errorf("server got %s", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the server application got nothing")
	}

	// The conn pings with protocol pings, which the hub answers.
	rtt, err := cl.Conn().Ping(ctx)
	if err != nil || rtt <= 0 || cl.Conn().RTT() <= 0 {
		t.Errorf("Ping over the client's conn: %v, %v (RTT %v)", rtt, err, cl.Conn().RTT())
	}
	// Conn.Send on the client's conn is a send to the server application.
	if err := cl.Conn().Send(ctx, []byte(`{"via":"conn"}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-sent:
		if got != `ann:{"via":"conn"}` {
			t.Errorf("server got %s", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the server application got nothing from Conn.Send")
	}

	if err := cl.Publish(ctx, "room", []byte("not \xffUTF-8")); !errors.Is(err, tether.ErrInvalidUTF8) {
		t.Errorf("Publish of invalid UTF-8: %v, want ErrInvalidUTF8", err)
	}
	if err := cl.Publish(ctx, strings.Repeat("x", 300), numbered(1)); err == nil {
		t.Error("Publish to a 300-byte topic succeeded")
	}
	if err := cl.Unsubscribe("room"); err != nil {
		t.Fatal(err)
	}
	if got := cl.Topics(); len(got) != 0 {
		t.Errorf("Topics after Unsubscribe = %v", got)
	}
	srv.hub.Publish("room", numbered(5))
	if err := cl.Close(); err != nil {
		t.Fatal(err)
	}
	if n := box.len(); n != 4 {
		t.Errorf("handler got %d messages after Unsubscribe, want 4", n)
	}
	if err := cl.Close(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("second Close: %v, want net.ErrClosed", err)
	}
	if err := cl.Publish(ctx, "room", numbered(6)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Publish after Close: %v, want net.ErrClosed", err)
	}
	if cl.State() != tether.Closed || cl.Err() != nil {
		t.Errorf("after Close: state %v err %v", cl.State(), cl.Err())
	}
}

// The restart test: the server goes away mid-stream and a new hub
// with the same history takes its address; the client gets every message
// exactly once and in order, those published while it was away included.
func TestClientResumesAcrossRestart(t *testing.T) {
	hist := adapter.NewMemoryHistory(10_000, time.Minute)
	s := newSite(t, tether.WithHistory(hist))
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option())
	box := newInbox()
	if err := cl.Subscribe(context.Background(), "feed", box.handler); err != nil {
		t.Fatal(err)
	}

	// A publisher that keeps going whatever the server does: it publishes
	// on whichever hub is up, and retries while none is.
	var published atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := 1; ; {
			select {
			case <-stop:
				return
			default:
			}
			if h := s.Hub(); h != nil && h.Publish("feed", numbered(n)) == nil {
				published.Store(int64(n))
				n++
			}
			time.Sleep(time.Millisecond)
		}
	}()
	box.await(t, 50)
	s.stop()
	st.await(t, tether.Reconnecting)
	s.start()
	// Published before the client is back: it must get these by replay.
	for box.len() < int(published.Load())+50 && published.Load() < 2000 {
		time.Sleep(10 * time.Millisecond)
	}
	st.await(t, tether.Connected)
	s.stop()
	s.start()
	st.await(t, tether.Connected)
	want := int(published.Load()) + 50
	box.await(t, want)
	close(stop)
	wg.Wait()
	checkRun(t, box.await(t, int(published.Load())), 1, int(published.Load()))
}

func TestClientResyncWhenHistoryIsShort(t *testing.T) {
	hist := adapter.NewMemoryHistory(5, time.Minute)
	s := newSite(t, tether.WithHistory(hist))
	st := newStates()
	resyncs := make(chan string, 10)
	cl := dial(t, s.url(), fastBackoff, st.option(), tether.WithObserver(tether.Observer{Resync: func(topic string) { resyncs <- topic }}))
	box := newInbox()
	if err := cl.Subscribe(context.Background(), "feed", box.handler); err != nil {
		t.Fatal(err)
	}
	s.Hub().Publish("feed", numbered(1))
	box.await(t, 1)
	s.stop()
	st.await(t, tether.Reconnecting)
	s.start()
	// More than the history keeps, before the client is back.
	for i := 2; i <= 12; i++ {
		s.Hub().Publish("feed", numbered(i))
	}
	st.await(t, tether.Connected)
	select {
	case topic := <-resyncs:
		if topic != "feed" {
			t.Errorf("resync of %q", topic)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no OnResync for a gap longer than the history")
	}
	s.Hub().Publish("feed", numbered(13))
	msgs := box.await(t, 2)
	if got := numOf(t, msgs[1].Data); got != 13 || len(msgs) != 2 {
		t.Errorf("after the resync got %d messages, the second n=%d; want live messages only, from 13", len(msgs), got)
	}
}

// A quiet topic: nothing arrives between the subscription and the outage.
// The ack's position still lets the client resume exactly.
func TestClientResumesQuietTopic(t *testing.T) {
	s := newSite(t, tether.WithHistory(adapter.NewMemoryHistory(100, time.Minute)))
	s.Hub().Publish("quiet", numbered(0)) // before the subscription: not wanted
	st := newStates()
	resyncs := make(chan string, 10)
	cl := dial(t, s.url(), fastBackoff, st.option(), tether.WithObserver(tether.Observer{Resync: func(topic string) { resyncs <- topic }}))
	box := newInbox()
	if err := cl.Subscribe(context.Background(), "quiet", box.handler); err != nil {
		t.Fatal(err)
	}
	s.stop()
	st.await(t, tether.Reconnecting)
	s.start()
	s.Hub().Publish("quiet", numbered(1))
	s.Hub().Publish("quiet", numbered(2))
	st.await(t, tether.Connected)
	checkRun(t, box.await(t, 2), 1, 2)
	select {
	case <-resyncs:
		t.Error("OnResync for a topic that could be resumed")
	default:
	}
}

func TestClientTerminalRefusals(t *testing.T) {
	var requests atomic.Int32
	refuse := func(code int) *httptest.Server {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			requests.Add(1)
			w.WriteHeader(code)
		}))
		t.Cleanup(srv.Close)
		return srv
	}
	for _, tc := range []struct {
		code int
		want error
	}{
		{http.StatusUnauthorized, tether.ErrUnauthorized},
		{http.StatusForbidden, tether.ErrForbidden},
		{http.StatusNotFound, tether.ErrRejected},
	} {
		requests.Store(0)
		srv := refuse(tc.code)
		start := time.Now()
		_, err := tether.Dial(context.Background(), srv.URL, fastBackoff)
		if !errors.Is(err, tc.want) {
			t.Errorf("HTTP %d: Dial error %v, want %v", tc.code, err, tc.want)
		}
		if n := requests.Load(); n != 1 {
			t.Errorf("HTTP %d: %d handshake requests, want 1 (no retries)", tc.code, n)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("HTTP %d: Dial took %v", tc.code, d)
		}
	}

	// The hub's own refusal, through WithAuth.
	srv := newHubServer(t, tether.WithAuth(func(*http.Request) (string, error) { return "", errors.New("bad token") }))
	if _, err := tether.Dial(context.Background(), srv.url(), fastBackoff); !errors.Is(err, tether.ErrUnauthorized) {
		t.Errorf("hub WithAuth refusal: %v, want ErrUnauthorized", err)
	}
}

// 503 (a hub shutting down) is not terminal: Dial retries until the server
// is back, and honours Retry-After.
func TestClientRetriesUnavailable(t *testing.T) {
	var requests atomic.Int32
	hub, err := tether.NewHub()
	if err != nil {
		t.Fatal(err)
	}
	defer hub.Close()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if requests.Add(1) <= 2 {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		hub.ServeHTTP(w, r)
	}))
	defer srv.Close()
	start := time.Now()
	cl, err := tether.Dial(context.Background(), srv.URL, fastBackoff)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if d := time.Since(start); d < 2*time.Second {
		t.Errorf("connected after %v: two Retry-After: 1 should have made it wait at least 2 s", d)
	}
	if n := requests.Load(); n != 3 {
		t.Errorf("%d requests, want 3", n)
	}
}

func TestClientClosedForGoodBy4401(t *testing.T) {
	s := newSite(t, tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
		go func() {
			time.Sleep(50 * time.Millisecond)
			c.Close(tether.StatusUnauthorized, "token expired")
		}()
	}}))
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option())
	closed := st.await(t, tether.Closed)
	if !errors.Is(closed.err, tether.ErrUnauthorized) || !errors.Is(cl.Err(), tether.ErrUnauthorized) {
		t.Errorf("closed with %v (Err %v), want ErrUnauthorized", closed.err, cl.Err())
	}
	<-cl.Done()
	time.Sleep(100 * time.Millisecond)
	if n := len(s.attemptsSince(time.Time{})); n != 1 {
		t.Errorf("%d handshakes, want 1: 4401 is terminal", n)
	}
}

func TestClientFailoverSticks(t *testing.T) {
	var refused atomic.Int32
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		refused.Add(1)
		w.WriteHeader(http.StatusBadGateway)
	}))
	defer down.Close()
	s := newSite(t)
	st := newStates()
	cl := dial(t, down.URL, tether.WithFallbackURLs(s.url()), fastBackoff, st.option())
	if refused.Load() != 1 || len(s.attemptsSince(time.Time{})) != 1 {
		t.Fatalf("first connect: %d refused, %d served; want 1 and 1", refused.Load(), len(s.attemptsSince(time.Time{})))
	}
	// Drop the conn three times: each reconnect goes to the URL that
	// worked, not back to the first.
	for range 3 {
		s.kick()
		st.await(t, tether.Reconnecting)
		st.await(t, tether.Connected)
	}
	if n := refused.Load(); n != 1 {
		t.Errorf("the failed URL was tried %d times, want 1: the client must stick to the good one", n)
	}
	if n := len(s.attemptsSince(time.Time{})); n != 4 {
		t.Errorf("the good URL got %d handshakes, want 4", n)
	}
	_ = cl
}

func TestClientDeadServerDetected(t *testing.T) {
	const interval, timeout = 50 * time.Millisecond, 250 * time.Millisecond
	s := newSite(t, tether.WithHeartbeat(interval, timeout), tether.WithHistory(adapter.NewMemoryHistory(100, time.Minute)))
	p := newProxy(t, s.addr)
	st := newStates()
	// The client's own heartbeat is the default, 15 s / 30 s: it must
	// follow the one the welcome advertises.
	cl := dial(t, p.url(), fastBackoff, st.option())
	if iv, to := cl.Conn().Heartbeat(); iv != interval || to != timeout {
		t.Fatalf("client heartbeat %v/%v, want the advertised %v/%v", iv, to, interval, timeout)
	}
	box := newInbox()
	if err := cl.Subscribe(context.Background(), "t", box.handler); err != nil {
		t.Fatal(err)
	}
	s.Hub().Publish("t", numbered(1))
	box.await(t, 1)

	p.freeze()
	frozen := time.Now()
	lost := st.await(t, tether.Reconnecting)
	if !errors.Is(lost.err, tether.ErrHeartbeatTimeout) {
		t.Errorf("conn ended with %v, want ErrHeartbeatTimeout", lost.err)
	}
	// Not before the timeout of silence, and well within a loaded
	// machine's slack after it. The last frame came at most one interval
	// before the freeze.
	if d := lost.at.Sub(frozen); d < timeout-interval || d > timeout+time.Second {
		t.Errorf("dead server detected %v after the freeze, want within [%v, %v]", d, timeout-interval, timeout+time.Second)
	}
	// The proxy forwards new conns: the client comes back through it and
	// misses nothing published meanwhile.
	s.Hub().Publish("t", numbered(2))
	st.await(t, tether.Connected)
	s.Hub().Publish("t", numbered(3))
	checkRun(t, box.await(t, 3), 1, 3)
}

func TestClientGoingAwayHint(t *testing.T) {
	s := newSite(t)
	st := newStates()
	dial(t, s.url(), fastBackoff, st.option())
	hub := s.Hub()
	go hub.Shutdown(context.Background())
	lost := st.await(t, tether.Reconnecting)
	var ce websocket.CloseError
	if !errors.As(lost.err, &ce) || ce.Code != websocket.StatusGoingAway {
		t.Fatalf("conn ended with %v, want 1001", lost.err)
	}
	_, ms, ok := strings.Cut(ce.Reason, "retry_ms=")
	hint, err := strconv.Atoi(ms)
	if !ok || err != nil {
		t.Fatalf("close reason %q has no retry_ms", ce.Reason)
	}
	s.stop()
	s.start()
	st.await(t, tether.Connected)
	again := s.attemptsSince(lost.at)
	if len(again) == 0 {
		t.Fatal("no new handshake")
	}
	if d := again[0].Sub(lost.at); d < time.Duration(hint)*time.Millisecond {
		t.Errorf("came back after %v, before the %d ms hint", d, hint)
	}
}

func TestClientOfflineBuffer(t *testing.T) {
	var tokens atomic.Int32
	var authMu sync.Mutex
	var auths []string
	got := make(chan string, 100)
	s := newSite(t,
		tether.WithAuth(func(r *http.Request) (string, error) {
			authMu.Lock()
			auths = append(auths, r.Header.Get("Authorization"))
			authMu.Unlock()
			return "u", nil
		}),
		tether.WithClientPublish(func(*tether.Conn, string) bool { return true }),
		tether.OnMessage(func(c *tether.Conn, m tether.Message) { got <- "send " + string(m.Data) }),
		tether.WithHistory(adapter.NewMemoryHistory(100, time.Minute)),
	)
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option(),
		tether.WithOfflineBuffer(6, 1<<20),
		tether.WithToken(func(context.Context) (string, error) {
			return "tok" + strconv.Itoa(int(tokens.Add(1))), nil
		}),
	)
	box := newInbox()
	ctx := context.Background()
	if err := cl.Subscribe(ctx, "chat", box.handler); err != nil {
		t.Fatal(err)
	}
	s.stop()
	st.await(t, tether.Reconnecting)
	for i := 1; i <= 5; i++ {
		if err := cl.Publish(ctx, "chat", numbered(i)); err != nil {
			t.Fatalf("offline Publish %d: %v", i, err)
		}
	}
	if err := cl.Send(ctx, numbered(6)); err != nil {
		t.Fatalf("offline Send: %v", err)
	}
	if err := cl.Publish(ctx, "chat", numbered(7)); !errors.Is(err, tether.ErrQueueFull) {
		t.Errorf("Publish past the bound: %v, want ErrQueueFull", err)
	}
	if err := cl.PublishVolatile(ctx, "chat", numbered(8), false); !errors.Is(err, tether.ErrOffline) {
		t.Errorf("offline PublishVolatile: %v, want ErrOffline", err)
	}
	if err := cl.SendVolatile(ctx, numbered(9), true); !errors.Is(err, tether.ErrOffline) {
		t.Errorf("offline SendVolatile: %v, want ErrOffline", err)
	}
	s.start()
	st.await(t, tether.Connected)
	// The buffer went out after the re-subscription: the client receives
	// its own publications, in order, once.
	msgs := box.await(t, 5)
	checkRun(t, msgs, 1, 5)
	select {
	case m := <-got:
		if m != `send {"n":6}` {
			t.Errorf("server application got %s", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the buffered Send never arrived")
	}
	// Online again: volatile messages go through.
	if err := cl.PublishVolatile(ctx, "chat", numbered(6), false); err != nil {
		t.Fatal(err)
	}
	checkRun(t, box.await(t, 6), 1, 6)
	time.Sleep(50 * time.Millisecond)
	if n := box.len(); n != 6 {
		t.Errorf("%d messages, want 6: something was sent twice", n)
	}
	authMu.Lock()
	defer authMu.Unlock()
	if len(auths) < 2 || auths[0] == auths[len(auths)-1] || !strings.HasPrefix(auths[len(auths)-1], "Bearer tok") {
		t.Errorf("Authorization headers %q: the token must be fetched again for each conn", auths)
	}
}

func TestClientOfflineBufferBytes(t *testing.T) {
	s := newSite(t)
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option(), tether.WithOfflineBuffer(100, 200))
	s.stop()
	st.await(t, tether.Reconnecting)
	big := []byte(`"` + strings.Repeat("x", 100) + `"`)
	if err := cl.Send(context.Background(), big); err != nil {
		t.Fatal(err)
	}
	if err := cl.Send(context.Background(), big); !errors.Is(err, tether.ErrQueueFull) {
		t.Errorf("second 100-byte Send with a 200-byte buffer: %v, want ErrQueueFull", err)
	}
}

func TestClientSubscribeRefused(t *testing.T) {
	errs := make(chan error, 10)
	srv := newHubServer(t,
		tether.WithSubscribeAuth(func(_ *tether.Conn, topic string) bool { return topic != "secret" }),
	)
	cl := dial(t, srv.url(), tether.WithObserver(tether.Observer{Error: func(err error) { errs <- err }}))
	err := cl.Subscribe(context.Background(), "secret", func(tether.Message) {})
	var pe *tether.ProtocolError
	if !errors.As(err, &pe) || pe.Code != tether.CodeForbidden {
		t.Fatalf("Subscribe to a refused topic: %v, want a forbidden ProtocolError", err)
	}
	if got := cl.Topics(); len(got) != 0 {
		t.Errorf("Topics after a refusal = %v", got)
	}
	// A publication the hub does not allow (no WithClientPublish) is
	// refused later, through Observer.Error.
	if err := cl.Publish(context.Background(), "open", numbered(1)); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errs:
		if !errors.As(err, &pe) || pe.Code != tether.CodeForbidden || !strings.Contains(err.Error(), `"open"`) {
			t.Errorf("OnError got %v, want a forbidden ProtocolError naming the topic", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no OnError for a refused publication")
	}
}

func TestClientSubscribeWaitsWhileOffline(t *testing.T) {
	s := newSite(t)
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option())
	s.stop()
	st.await(t, tether.Reconnecting)
	done := make(chan error, 1)
	box := newInbox()
	go func() { done <- cl.Subscribe(context.Background(), "later", box.handler) }()
	select {
	case err := <-done:
		t.Fatalf("Subscribe returned %v while offline", err)
	case <-time.After(100 * time.Millisecond):
	}
	s.start()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	s.Hub().Publish("later", numbered(1))
	checkRun(t, box.await(t, 1), 1, 1)

	// A Subscribe whose ctx ends while offline is cancelled.
	s.stop()
	st.await(t, tether.Reconnecting)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := cl.Subscribe(ctx, "never", box.handler); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Subscribe with an expiring ctx: %v", err)
	}
	for _, topic := range cl.Topics() {
		if topic == "never" {
			t.Error("a cancelled subscription is still listed")
		}
	}
}

func TestClientOnOffline(t *testing.T) {
	s := newSite(t)
	st := newStates()
	offline := make(chan time.Time, 10)
	cl := dial(t, s.url(), fastBackoff, st.option(), tether.OnOffline(200*time.Millisecond, func() { offline <- time.Now() }))
	// A brief outage: no event.
	s.stop()
	s.start()
	st.await(t, tether.Connected)
	select {
	case <-offline:
		t.Error("OnOffline fired for an outage shorter than its delay")
	case <-time.After(300 * time.Millisecond):
	}
	s.stop()
	lost := st.await(t, tether.Reconnecting)
	select {
	case at := <-offline:
		if d := at.Sub(lost.at); d < 200*time.Millisecond {
			t.Errorf("OnOffline after %v, before its 200 ms", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("OnOffline never fired")
	}
	select {
	case <-offline:
		t.Error("OnOffline fired twice for one outage")
	case <-time.After(300 * time.Millisecond):
	}
	cl.Close()
}

func TestClientMaxRetries(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens: every attempt is refused
	_, err = tether.Dial(context.Background(), "ws://"+addr, tether.WithBackoff(tether.Backoff{Base: time.Millisecond, Max: 5 * time.Millisecond, MaxRetries: 3}))
	if err == nil || !strings.Contains(err.Error(), "gave up after 3 attempts") {
		t.Errorf("Dial to a closed port: %v, want a give-up after 3 attempts", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := tether.Dial(ctx, "ws://"+addr, fastBackoff); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Dial ending with its ctx: %v", err)
	}
}

// Options are typed by where they apply: the compiler refuses a server's
// option on Dial, and a hub's on Accept.
func TestOptionsTypedByWhereTheyApply(t *testing.T) {
	dial := reflect.TypeFor[tether.DialOption]()
	server := reflect.TypeFor[tether.ServerOption]()
	for name, opt := range map[string]any{
		"WithOriginPatterns": tether.WithOriginPatterns("x"),
		"WithSubprotocols":   tether.WithSubprotocols("x"),
		"WithAuth":           tether.WithAuth(nil),
		"WithMaxConns":       tether.WithMaxConns(1),
	} {
		if reflect.TypeOf(opt).Implements(dial) {
			t.Errorf("%s is a DialOption", name)
		}
	}
	for name, opt := range map[string]any{"WithAuth": tether.WithAuth(nil), "WithBackoff": tether.WithBackoff(tether.Backoff{})} {
		if reflect.TypeOf(opt).Implements(server) {
			t.Errorf("%s is a ServerOption", name)
		}
	}
	for name, opt := range map[string]any{"WithHeartbeat": tether.HeartbeatLAN, "WithLimits": tether.WithLimits(tether.Limits{})} {
		if !reflect.TypeOf(opt).Implements(dial) || !reflect.TypeOf(opt).Implements(server) {
			t.Errorf("%s does not apply everywhere", name)
		}
	}
}

func TestDialOptionValidation(t *testing.T) {
	for name, opt := range map[string]tether.DialOption{
		"bad backoff":     tether.WithBackoff(tether.Backoff{Factor: 0.5}),
		"bad heartbeat":   tether.WithHeartbeat(time.Second, time.Second),
		"negative buffer": tether.WithOfflineBuffer(-1, 0),
	} {
		if _, err := tether.Dial(context.Background(), "ws://127.0.0.1:1", opt); err == nil {
			t.Errorf("%s: Dial accepted it", name)
		}
	}
}

func TestClientNeedsProtocolV1(t *testing.T) {
	// A plain WebSocket server that does not select tether.v1.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		c.Read(r.Context())
		c.CloseNow()
	}))
	defer srv.Close()
	_, err := tether.Dial(context.Background(), srv.URL, fastBackoff)
	if !errors.Is(err, tether.ErrRejected) {
		t.Errorf("Dial to a server without tether.v1: %v, want ErrRejected", err)
	}
}

// A server that sends what the client cannot read: the client reports it
// and keeps the conn.
func TestClientBadServerFrames(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{tether.Subprotocol}})
		if err != nil {
			return
		}
		defer c.CloseNow()
		ctx := r.Context()
		c.Write(ctx, websocket.MessageText, []byte(`{"op":"welcome","session":"s","heartbeat":{"interval_ms":15000,"timeout_ms":30000}}`))
		c.Write(ctx, websocket.MessageText, []byte("not json\n{\"op\":\"msg\"}\n{\"op\":\"future_op\",\"x\":1}\n{\"op\":\"msg\",\"data\":{\"ok\":1}}"))
		c.Write(ctx, websocket.MessageBinary, []byte{1, 2, 3})
		c.Write(ctx, websocket.MessageText, []byte(`{"op":"msg","data":{"ok":2}}`))
		c.Read(ctx)
	}))
	defer srv.Close()
	var mu sync.Mutex
	var errs []error
	direct := make(chan string, 10)
	cl := dial(t, srv.URL,
		tether.WithObserver(tether.Observer{Error: func(err error) { mu.Lock(); errs = append(errs, err); mu.Unlock() }}),
		tether.OnMessage(func(_ *tether.Conn, m tether.Message) { direct <- string(m.Data) }),
	)
	for _, want := range []string{`{"ok":1}`, `{"ok":2}`} {
		select {
		case got := <-direct:
			if got != want {
				t.Errorf("direct message %s, want %s", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no direct message %s: the conn did not survive bad frames", want)
		}
	}
	if cl.State() != tether.Connected {
		t.Errorf("state %v after bad frames", cl.State())
	}
	mu.Lock()
	defer mu.Unlock()
	// not json, msg without data, binary: three reports; the unknown op
	// is ignored as PROTOCOL.md asks.
	if len(errs) != 3 {
		t.Errorf("OnError got %d errors, want 3: %v", len(errs), errs)
	}
	var pe *tether.ProtocolError
	if len(errs) > 0 && !errors.As(errs[0], &pe) {
		t.Errorf("first error %v is not a ProtocolError", errs[0])
	}
}

// Messages queued on, or written to, a conn that dies before the server
// answered them are sent again on the next conn: a client sending into a
// frozen link loses nothing, and nothing arrives twice.
func TestClientKeepsUnwrittenMessages(t *testing.T) {
	var mu sync.Mutex
	var got []int
	const n = 400
	s := newSite(t,
		tether.WithHeartbeat(100*time.Millisecond, 400*time.Millisecond),
		tether.WithRateLimit(rate.Inf, 0),
		tether.OnMessage(func(c *tether.Conn, m tether.Message) {
			var v struct{ N int }
			json.Unmarshal(m.Data, &v)
			mu.Lock()
			got = append(got, v.N)
			mu.Unlock()
		}),
	)
	p := newProxy(t, s.addr)
	st := newStates()
	cl := dial(t, p.url(), fastBackoff, st.option(), tether.WithLimits(tether.Limits{SendQueue: n, SendQueueBytes: 64 << 20}), tether.WithOfflineBuffer(n, 64<<20))
	p.freeze()
	pad := strings.Repeat("x", 30<<10)
	for i := 1; i <= n; i++ {
		if err := cl.Send(context.Background(), []byte(fmt.Sprintf(`{"n":%d,"pad":%q}`, i, pad))); err != nil {
			t.Fatalf("Send %d: %v", i, err)
		}
	}
	st.await(t, tether.Reconnecting)
	st.await(t, tether.Connected)
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		last := 0
		if len(got) > 0 {
			last = got[len(got)-1]
		}
		mu.Unlock()
		if last == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the last message never arrived (last %d)", last)
		}
		time.Sleep(20 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	for i := 1; i < len(got); i++ {
		if got[i] <= got[i-1] {
			t.Fatalf("message %d after %d: repeated or reordered", got[i], got[i-1])
		}
	}
	if len(got) != n {
		t.Errorf("%d of %d messages arrived, each once: those in the frozen link's buffers were not sent again", len(got), n)
	}
}

// A client whose answers stop coming (its messages arrive, the acks do
// not) reconnects and sends again what was not acknowledged, with the same
// ids: the hub carries each out once and acks the repeats.
func TestClientSendsTakeEffectOnce(t *testing.T) {
	var mu sync.Mutex
	var got []int
	const n = 200
	s := newSite(t,
		tether.WithHeartbeat(100*time.Millisecond, 400*time.Millisecond),
		tether.WithRateLimit(rate.Inf, 0),
		tether.WithClientPublish(func(*tether.Conn, string) bool { return true }),
		tether.OnMessage(func(c *tether.Conn, m tether.Message) {
			var v struct{ N int }
			json.Unmarshal(m.Data, &v)
			mu.Lock()
			got = append(got, v.N)
			mu.Unlock()
		}),
	)
	p := newProxy(t, s.addr)
	st := newStates()
	cl := dial(t, p.url(), fastBackoff, st.option(), tether.WithLimits(tether.Limits{SendQueue: 2 * n, SendQueueBytes: 64 << 20}), tether.WithOfflineBuffer(2*n, 64<<20))
	p.freezeReplies()
	for i := 1; i <= n; i++ {
		if err := cl.Send(context.Background(), []byte(fmt.Sprintf(`{"n":%d}`, i))); err != nil {
			t.Fatalf("Send %d: %v", i, err)
		}
	}
	if err := cl.Publish(context.Background(), "once", []byte(`"published once"`)); err != nil {
		t.Fatal(err)
	}
	// The sends reach the server; no ack comes back, nor any pong: the
	// client finds the server silent and reconnects.
	waitFor(t, 10*time.Second, "the sends at the server", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) == n
	})
	st.await(t, tether.Reconnecting)
	st.await(t, tether.Connected)
	waitFor(t, 10*time.Second, "the repeats acked and dropped", func() bool { return s.Hub().Stats().Duplicates >= n+1 })
	time.Sleep(100 * time.Millisecond) // room for a repeat carried out twice to show
	mu.Lock()
	defer mu.Unlock()
	if len(got) != n {
		t.Fatalf("%d sends carried out, want each of the %d once", len(got), n)
	}
	for i, v := range got {
		if v != i+1 {
			t.Fatalf("send %d carried out as %d: repeated or reordered", i+1, v)
		}
	}
	if pub := s.Hub().Stats().Published; pub != 1 {
		t.Errorf("%d publications, want 1", pub)
	}
}

// SubscribeFrom resumes from a position a previous client kept: the
// messages after it, then live ones; from a position the history cannot
// serve, a resync, then live ones.
func TestClientSubscribeFrom(t *testing.T) {
	s := newSite(t)
	ctx := context.Background()
	for i := 1; i <= 5; i++ {
		if err := s.Hub().Publish("saved", numbered(i)); err != nil {
			t.Fatal(err)
		}
	}
	first := dial(t, s.url())
	got := make(chan tether.Message, 10)
	if err := first.SubscribeFrom(ctx, "saved", tether.Position{}, func(m tether.Message) { got <- m }); err != nil {
		t.Fatal(err)
	}
	if err := s.Hub().Publish("saved", numbered(6)); err != nil {
		t.Fatal(err)
	}
	m := recvWithin(t, got) // live only: the zero position is a plain Subscribe
	if m.Position.Seq != 6 {
		t.Fatalf("a plain subscription got seq %d first, want the live 6", m.Position.Seq)
	}
	kept := tether.Position{Epoch: m.Position.Epoch, Seq: 3}
	first.Close()

	resyncs := make(chan string, 4)
	again := dial(t, s.url(), tether.WithObserver(tether.Observer{Resync: func(topic string) { resyncs <- topic }}))
	replay := make(chan tether.Message, 10)
	if err := again.SubscribeFrom(ctx, "saved", kept, func(m tether.Message) { replay <- m }); err != nil {
		t.Fatal(err)
	}
	for want := uint64(4); want <= 6; want++ {
		select {
		case m := <-replay:
			if m.Position != (tether.Position{Epoch: kept.Epoch, Seq: want}) || string(m.Data) != string(numbered(int(want))) {
				t.Fatalf("got %+v %s, want seq %d", m.Position, m.Data, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("seq %d never came", want)
		}
	}
	select {
	case topic := <-resyncs:
		t.Fatalf("resync of %q from a position the history holds", topic)
	default:
	}

	stale := dial(t, s.url(), tether.WithObserver(tether.Observer{Resync: func(topic string) { resyncs <- topic }}))
	live := make(chan tether.Message, 10)
	if err := stale.SubscribeFrom(ctx, "saved", tether.Position{Epoch: "gone", Seq: 2}, func(m tether.Message) { live <- m }); err != nil {
		t.Fatal(err)
	}
	select {
	case topic := <-resyncs:
		if topic != "saved" {
			t.Fatalf("resync of %q", topic)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no resync from a position of an epoch the server never had")
	}
	if err := s.Hub().Publish("saved", numbered(7)); err != nil {
		t.Fatal(err)
	}
	if m := recvWithin(t, live); m.Position.Seq != 7 {
		t.Fatalf("after the resync got seq %d, want the live 7", m.Position.Seq)
	}
}

// recvWithin receives from ch within 5 s, or fails the test.
func recvWithin[T any](t *testing.T, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(5 * time.Second):
		t.Fatal("nothing received within 5 s")
	}
	var zero T
	return zero
}
