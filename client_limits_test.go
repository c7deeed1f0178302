package tether_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

// A full default offline buffer (256) is more than the hub's default
// burst (200): the client paces the flush within the limit the welcome
// advertises, so everything arrives and nothing is refused.
//
// The hub answers each publication twice on the publisher's conn (the
// ack, and the message itself, as the client subscribes to the topic),
// and reads a burst in one frame: up to 2×180 entries queued before its
// writer runs, if the machine is loaded. The acks go on the control lane,
// outside the send queue's bound, so the default queue of 256 holds the
// rest and the hub never takes the client for a slow consumer.
func TestClientFlushesBufferWithinRateLimit(t *testing.T) {
	s := newSite(t,
		tether.WithClientPublish(func(*tether.Conn, string) bool { return true }),
		tether.WithHistory(adapter.NewMemoryHistory(1000, time.Minute)),
	)
	var refused atomic.Int32
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option(), tether.WithObserver(tether.Observer{Error: func(error) { refused.Add(1) }}))
	box := newInbox()
	ctx := context.Background()
	if err := cl.Subscribe(ctx, "chat", box.handler); err != nil {
		t.Fatal(err)
	}
	s.stop()
	st.await(t, tether.Reconnecting)
	for i := 1; i <= 256; i++ {
		if err := cl.Publish(ctx, "chat", numbered(i)); err != nil {
			t.Fatalf("Publish %d: %v", i, err)
		}
	}
	s.start()
	st.await(t, tether.Connected)
	// Connected comes after the flush: a conn lost during it shows here,
	// not in the states.
	if n := s.Hub().Stats().Disconnects; n != 0 {
		t.Errorf("%d conns dropped by the hub during the flush", n)
	}
	checkRun(t, box.await(t, 256), 1, 256)
	if n := refused.Load(); n != 0 {
		t.Errorf("%d refusals", n)
	}
	if got := st.all(); got[len(got)-1] != tether.Connected {
		t.Errorf("states %v: the flush cost the conn", got)
	}
}

// 250 subscriptions, more than the default burst, all come back after a
// reconnect.
func TestClientManySubscriptionsResume(t *testing.T) {
	s := newSite(t)
	st := newStates()
	var refused atomic.Int32
	cl := dial(t, s.url(), fastBackoff, st.option(), tether.WithObserver(tether.Observer{Error: func(error) { refused.Add(1) }}))
	const n = 250
	box := newInbox()
	for i := range n {
		if err := cl.Subscribe(context.Background(), "t"+strconv.Itoa(i), box.handler); err != nil {
			t.Fatalf("Subscribe %d: %v", i, err)
		}
	}
	s.kick()
	st.await(t, tether.Reconnecting)
	st.await(t, tether.Connected)
	if got := len(cl.Topics()); got != n {
		t.Errorf("%d of %d subscriptions after a reconnect", got, n)
	}
	for i := range n {
		s.Hub().Publish("t"+strconv.Itoa(i), numbered(i))
	}
	box.await(t, n)
	if r := refused.Load(); r != 0 {
		t.Errorf("%d refusals", r)
	}
}

// Past the advertised limit, Publish says so at once instead of sending
// what the server would refuse, and the conn stays.
func TestClientPublishOverRateLimit(t *testing.T) {
	srv := newHubServer(t, tether.WithRateLimit(10, 5), tether.WithClientPublish(func(*tether.Conn, string) bool { return true }))
	cl := dial(t, srv.url())
	var limited int
	for i := range 20 {
		err := cl.Publish(context.Background(), "t", numbered(i))
		switch {
		case errors.Is(err, tether.ErrRateLimited):
			limited++
		case err != nil:
			t.Fatal(err)
		}
	}
	if limited < 10 {
		t.Errorf("%d of 20 immediate publications refused by the client, with a server limit of 10/s burst 5", limited)
	}
	time.Sleep(300 * time.Millisecond)
	if cl.State() != tether.Connected || srv.hub.Len() != 1 {
		t.Errorf("state %v, %d conns: the client went past the limit", cl.State(), srv.hub.Len())
	}
}

// flakyHistory fails Since while fail is set, as a shared store would in
// a brief outage.
type flakyHistory struct {
	adapter.History
	fail atomic.Bool
}

func (h *flakyHistory) Since(ctx context.Context, topic string, pos tether.Position) ([]adapter.HistoryEntry, tether.Position, bool, error) {
	if h.fail.Load() {
		return nil, tether.Position{}, false, errors.New("backend blip")
	}
	return h.History.Since(ctx, topic, pos)
}

// A re-subscription refused for a while (internal: the history store is
// down) is retried, not dropped.
func TestClientRetriesTransientResubscribeRefusal(t *testing.T) {
	hist := &flakyHistory{History: adapter.NewMemoryHistory(100, time.Minute)}
	s := newSite(t, tether.WithHistory(hist))
	errs := make(chan error, 10)
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option(), tether.WithObserver(tether.Observer{Error: func(err error) { errs <- err }}))
	box := newInbox()
	if err := cl.Subscribe(context.Background(), "chat", box.handler); err != nil {
		t.Fatal(err)
	}
	s.Hub().Publish("chat", numbered(1))
	box.await(t, 1)
	hist.fail.Store(true)
	s.kick()
	st.await(t, tether.Reconnecting)
	st.await(t, tether.Connected)
	select {
	case err := <-errs:
		var pe *tether.ProtocolError
		if !errors.As(err, &pe) || pe.Code != tether.CodeInternal || !strings.Contains(err.Error(), "retrying") {
			t.Errorf("OnError got %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no report of the refused re-subscription")
	}
	hist.fail.Store(false)
	s.Hub().Publish("chat", numbered(2)) // while the retry waits: replayed from history
	s.Hub().Publish("chat", numbered(3))
	checkRun(t, box.await(t, 3), 1, 3)
	if got := cl.Topics(); len(got) != 1 {
		t.Errorf("Topics %v", got)
	}
}

func TestClientUnsubscribeAnswersPendingSubscribe(t *testing.T) {
	s := newSite(t)
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option())
	s.stop()
	st.await(t, tether.Reconnecting)
	done := make(chan error, 1)
	go func() { done <- cl.Subscribe(context.Background(), "x", func(tether.Message) {}) }()
	for len(cl.Topics()) == 0 {
		time.Sleep(time.Millisecond)
	}
	if err := cl.Unsubscribe("x"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err == nil {
			t.Error("Subscribe returned nil for a subscription undone by Unsubscribe")
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Subscribe still waiting after Unsubscribe")
	}
}

// A server that drops every conn right after the welcome: the client is
// never Connected, and OnOffline fires once, however often conns come
// and go.
func TestClientOnOfflineWhileFlapping(t *testing.T) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{tether.Subprotocol}})
		if err != nil {
			return
		}
		ctx := r.Context()
		ws.Write(ctx, websocket.MessageText, []byte(`{"op":"welcome","session":"s","heartbeat":{"interval_ms":15000,"timeout_ms":30000}}`))
		if n.Add(1) == 1 {
			ws.Read(ctx) // the first conn stays until the client goes
			return
		}
		time.Sleep(20 * time.Millisecond)
		ws.Close(websocket.StatusInternalError, "boom")
	}))
	defer srv.Close()
	offline := make(chan struct{}, 10)
	st := newStates()
	cl := dial(t, "ws"+strings.TrimPrefix(srv.URL, "http"), fastBackoff, st.option(),
		tether.OnOffline(500*time.Millisecond, func() { offline <- struct{}{} }))
	// The subscription is never answered: no conn gets Connected again.
	go cl.Subscribe(context.Background(), "x", func(tether.Message) {})
	cl.Conn().CloseNow()
	select {
	case <-offline:
	case <-time.After(5 * time.Second):
		t.Fatalf("never Connected for 5 s (changes %v), and OnOffline(500ms) never fired", st.all())
	}
	time.Sleep(time.Second)
	if len(offline) != 0 {
		t.Errorf("OnOffline fired %d more times in one outage", len(offline))
	}
	cl.Close()
}
