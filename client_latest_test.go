package tether_test

import (
	"context"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// This file checks Client.SubscribeLatest: the topic's last message
// first, then live ones; and after a reconnect a resume from the last
// message handled, never the latest again.

// expectMsg receives the next message of ch, which must be topic's at seq
// carrying numbered(seq).
func expectMsg(t *testing.T, ch <-chan tether.Message, topic string, seq uint64) tether.Message {
	t.Helper()
	m := recvWithin(t, ch)
	if m.Topic != topic || m.Position.Seq != seq || string(m.Data) != string(numbered(int(seq))) {
		t.Fatalf("got %s %+v %s, want %s seq %d", m.Topic, m.Position, m.Data, topic, seq)
	}
	return m
}

// noMsg fails the test if ch receives within d.
func noMsg(t *testing.T, ch <-chan tether.Message, d time.Duration) {
	t.Helper()
	select {
	case m := <-ch:
		t.Fatalf("unexpected %s %+v %s", m.Topic, m.Position, m.Data)
	case <-time.After(d):
	}
}

func publishNumbered(t *testing.T, h *tether.Hub, topic string, from, to int) {
	t.Helper()
	for i := from; i <= to; i++ {
		if err := h.Publish(topic, numbered(i)); err != nil {
			t.Fatal(err)
		}
	}
}

// awaySite is a site whose handshakes wait while away is held, so that a
// test can keep a client away while it publishes.
func awaySite(t *testing.T) (*site, *sync.Mutex) {
	away := new(sync.Mutex)
	s := newSite(t, rsNoPresence, tether.WithAuth(func(*http.Request) (string, error) {
		away.Lock()
		defer away.Unlock()
		return "", nil
	}))
	return s, away
}

func TestClientSubscribeLatest(t *testing.T) {
	s, away := awaySite(t)
	publishNumbered(t, s.Hub(), "prices", 1, 3)
	resyncs := make(chan string, 10)
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option(),
		tether.WithObserver(tether.Observer{Resync: func(topic string) { resyncs <- topic }}))
	st.await(t, tether.Connected)
	ctx := context.Background()
	got := make(chan tether.Message, 100)
	if err := cl.SubscribeLatest(ctx, "prices", func(m tether.Message) { got <- m }); err != nil {
		t.Fatal(err)
	}
	first := expectMsg(t, got, "prices", 3) // the latest
	publishNumbered(t, s.Hub(), "prices", 4, 4)
	if m := expectMsg(t, got, "prices", 4); m.Position.Epoch != first.Position.Epoch {
		t.Fatalf("epoch %q then %q", first.Position.Epoch, m.Position.Epoch)
	}
	noMsg(t, got, 100*time.Millisecond)

	// Away while 5 is published: the new conn resumes after 4, without the
	// latest again.
	away.Lock()
	s.kick()
	st.await(t, tether.Reconnecting)
	waitFor(t, 5*time.Second, "the client gone", func() bool { return s.Hub().Len() == 0 })
	publishNumbered(t, s.Hub(), "prices", 5, 5)
	away.Unlock()
	st.await(t, tether.Connected)
	expectMsg(t, got, "prices", 5)
	publishNumbered(t, s.Hub(), "prices", 6, 6)
	expectMsg(t, got, "prices", 6)
	noMsg(t, got, 150*time.Millisecond)
	select {
	case topic := <-resyncs:
		t.Fatalf("resync of %q", topic)
	default:
	}

	// A topic without a message: nothing, then live ones.
	empty := make(chan tether.Message, 10)
	if err := cl.SubscribeLatest(ctx, "quiet", func(m tether.Message) { empty <- m }); err != nil {
		t.Fatal(err)
	}
	noMsg(t, empty, 150*time.Millisecond)
	publishNumbered(t, s.Hub(), "quiet", 1, 1)
	expectMsg(t, empty, "quiet", 1)

	// Binary: the latest comes as bytes.
	if err := s.Hub().PublishBinary("cam", []byte{0xff, '\n', 0}); err != nil {
		t.Fatal(err)
	}
	cam := make(chan tether.Message, 10)
	if err := cl.SubscribeLatest(ctx, "cam", func(m tether.Message) { cam <- m }); err != nil {
		t.Fatal(err)
	}
	if m := recvWithin(t, cam); !m.Binary || string(m.Data) != "\xff\n\x00" || m.Position.Seq != 1 {
		t.Fatalf("got %+v binary=%v %q, want the binary latest at seq 1", m.Position, m.Binary, m.Data)
	}
	noMsg(t, cam, 100*time.Millisecond)
}

// SubscribeLatest called while offline asks for the latest on the next
// conn, which the server has not acknowledged yet.
func TestClientSubscribeLatestWhileOffline(t *testing.T) {
	s, away := awaySite(t)
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option())
	st.await(t, tether.Connected)
	away.Lock()
	s.kick()
	st.await(t, tether.Reconnecting)

	got := make(chan tether.Message, 10)
	subscribed := make(chan error, 1)
	go func() {
		subscribed <- cl.SubscribeLatest(context.Background(), "t", func(m tether.Message) { got <- m })
	}()
	publishNumbered(t, s.Hub(), "t", 1, 2)
	time.Sleep(50 * time.Millisecond) // room for SubscribeLatest to wait for the conn
	away.Unlock()
	if err := recvWithin(t, subscribed); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, got, "t", 2)
	publishNumbered(t, s.Hub(), "t", 3, 3)
	expectMsg(t, got, "t", 3)
	noMsg(t, got, 100*time.Millisecond)
}

// Once the server has accepted a SubscribeLatest, a reconnect never asks
// for the latest again, also when the topic's position is unknown (after
// a resync): the message published meanwhile is not delivered, a resync
// is reported, and live messages follow.
func TestClientSubscribeLatestNotAgainAfterResync(t *testing.T) {
	s, away := awaySite(t)
	publishNumbered(t, s.Hub(), "t", 1, 2)
	resyncs := make(chan string, 10)
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option(),
		tether.WithObserver(tether.Observer{Resync: func(topic string) { resyncs <- topic }}))
	st.await(t, tether.Connected)
	got := make(chan tether.Message, 10)
	if err := cl.SubscribeLatest(context.Background(), "t", func(m tether.Message) { got <- m }); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, got, "t", 2)

	// A new hub, with a new history: the resume gets a resync, and the
	// position is unknown.
	s.restart()
	if topic := recvWithin(t, resyncs); topic != "t" {
		t.Fatalf("resync of %q", topic)
	}
	st.await(t, tether.Connected)

	// Away again while the new hub's topic gets a message: the client
	// subscribes without since, and without latest.
	away.Lock()
	s.kick()
	st.await(t, tether.Reconnecting)
	waitFor(t, 5*time.Second, "the client gone", func() bool { return s.Hub().Len() == 0 })
	publishNumbered(t, s.Hub(), "t", 1, 1)
	away.Unlock()
	st.await(t, tether.Connected)
	if topic := recvWithin(t, resyncs); topic != "t" {
		t.Fatalf("resync of %q", topic)
	}
	noMsg(t, got, 150*time.Millisecond)
	publishNumbered(t, s.Hub(), "t", 2, 2)
	expectMsg(t, got, "t", 2)
}
