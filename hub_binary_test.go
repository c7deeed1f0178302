package tether_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// This file checks that a message keeps its type, text or binary, end to
// end: from the hub, a Go client and a raw peer, to raw peers and Go
// clients, live, resumed from history and from the offline store.

// typed is one message as a receiver got it.
type typed struct {
	binary bool
	data   string
}

func (m typed) String() string {
	if m.binary {
		return fmt.Sprintf("binary %q", m.data)
	}
	return fmt.Sprintf("text %q", m.data)
}

// typedInbox collects typed messages from handlers.
type typedInbox struct {
	ch chan typed
}

func newTypedInbox() *typedInbox { return &typedInbox{ch: make(chan typed, 1000)} }

func (in *typedInbox) put(m tether.Message) {
	in.ch <- typed{m.Binary, string(m.Data)}
}

func (in *typedInbox) expect(t *testing.T, who string, want typed) {
	t.Helper()
	select {
	case got := <-in.ch:
		if got != want {
			t.Fatalf("%s got %v, want %v", who, got, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s got nothing, want %v", who, want)
	}
}

// rawReader reads a raw peer's messages with their types.
func rawReader(t *testing.T, ws *websocket.Conn) *typedInbox {
	in := newTypedInbox()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			typ, data, err := ws.Read(context.Background())
			if err != nil {
				return
			}
			in.ch <- typed{typ == websocket.MessageBinary, string(data)}
		}
	}()
	t.Cleanup(func() {
		ws.CloseNow()
		wg.Wait()
	})
	return in
}

func TestHubBinaryEndToEnd(t *testing.T) {
	var hub *tether.Hub
	fromPeers := newTypedInbox()
	var (
		mu     sync.Mutex
		rawSrv *tether.Conn
	)
	s := newHubServer(t,
		tether.WithAuth(func(r *http.Request) (string, error) { return r.URL.Query().Get("user"), nil }),
		tether.WithClientPublish(func(*tether.Conn, string) bool { return true }),
		tether.OnMessage(func(c *tether.Conn, m tether.Message) { fromPeers.put(m) }),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			if c.Subprotocol() == "" {
				mu.Lock()
				rawSrv = c
				mu.Unlock()
				if err := hub.Subscribe(c, "t"); err != nil {
					t.Errorf("Subscribe: %v", err)
				}
			}
		}}))
	hub = s.hub
	ctx := context.Background()

	ws, _, err := websocket.Dial(ctx, s.url()+"?user=raw", nil)
	if err != nil {
		t.Fatal(err)
	}
	ws.SetReadLimit(-1)
	raw := rawReader(t, ws)
	waitFor(t, 5*time.Second, "the raw peer subscribed", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return rawSrv != nil && len(rawSrv.Topics()) == 1
	})

	direct := newTypedInbox()
	cl := dial(t, s.url()+"?user=bob", tether.OnMessage(func(_ *tether.Conn, m tether.Message) { direct.put(m) }))
	sub := newTypedInbox()
	if err := cl.Subscribe(ctx, "t", sub.put); err != nil {
		t.Fatal(err)
	}

	big := bytes.Repeat([]byte{0, 1, 2, '\n', 0xff}, 20000) // 100 KB: fragments, and a record longer than a joined frame
	for _, m := range []typed{
		{true, "\x00\x01\xff\n{\"op\":\"msg\"}\n"},
		{false, "plain text, not JSON"},
		{false, "\x01 text that starts like a tag"},
		{false, "\x02"},
		{false, `{"json": [1, 2]}`},
		{true, ""},
		{false, ""},
		{true, string(big)},
	} {
		if m.binary {
			err = hub.PublishBinary("t", []byte(m.data))
		} else {
			err = hub.Publish("t", []byte(m.data))
		}
		if err != nil {
			t.Fatalf("publish %v: %v", m, err)
		}
		raw.expect(t, "raw peer", m)
		sub.expect(t, "Go client", m)
	}

	// From the Go client: a binary publish reaches the raw peer and the
	// client itself; a binary send reaches the server application.
	pub := typed{true, "\xde\xad\xbe\xef"}
	if err := cl.PublishBinary(ctx, "t", []byte(pub.data)); err != nil {
		t.Fatal(err)
	}
	raw.expect(t, "raw peer", pub)
	sub.expect(t, "Go client", pub)
	if err := cl.Publish(ctx, "t", []byte("from the client")); err != nil {
		t.Fatal(err)
	}
	raw.expect(t, "raw peer", typed{false, "from the client"})
	sub.expect(t, "Go client", typed{false, "from the client"})
	if err := cl.SendBinary(ctx, []byte{9, 8, 7}); err != nil {
		t.Fatal(err)
	}
	fromPeers.expect(t, "server application", typed{true, "\x09\x08\x07"})
	if err := cl.SendVolatile(ctx, []byte("volatile text"), false); err != nil {
		t.Fatal(err)
	}
	fromPeers.expect(t, "server application", typed{false, "volatile text"})

	// From the raw peer, both types reach the server application.
	if err := ws.Write(ctx, websocket.MessageBinary, []byte{0, 0}); err != nil {
		t.Fatal(err)
	}
	fromPeers.expect(t, "server application", typed{true, "\x00\x00"})

	// Direct: broadcast, to a user, and from a conn.
	if err := hub.BroadcastBinary([]byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	raw.expect(t, "raw peer", typed{true, "\x01\x02\x03"})
	direct.expect(t, "Go client", typed{true, "\x01\x02\x03"})
	if err := hub.SendToUserBinary("bob", []byte{4}); err != nil {
		t.Fatal(err)
	}
	direct.expect(t, "Go client", typed{true, "\x04"})
	if err := hub.SendToUser("raw", []byte("just text")); err != nil {
		t.Fatal(err)
	}
	raw.expect(t, "raw peer", typed{false, "just text"})
	mu.Lock()
	c := rawSrv
	mu.Unlock()
	if err := c.SendBinary(ctx, []byte{0x01}); err != nil {
		t.Fatal(err)
	}
	raw.expect(t, "raw peer", typed{true, "\x01"})
	if err := c.Send(ctx, []byte{0x01}); err != nil {
		t.Fatal(err)
	}
	raw.expect(t, "raw peer", typed{false, "\x01"})

	// Text must be UTF-8, everywhere; nothing was sent for those refused.
	for what, err := range map[string]error{
		"Hub.Publish":      hub.Publish("t", []byte{0xff}),
		"Hub.Broadcast":    hub.Broadcast([]byte{0xff}),
		"Hub.SendToUser":   hub.SendToUser("bob", []byte{0xff}),
		"Conn.Send":        c.Send(ctx, []byte{0xff}),
		"Client.Publish":   cl.Publish(ctx, "t", []byte{0xff}),
		"Client.Send":      cl.Send(ctx, []byte{0xff}),
		"PublishVolatile":  cl.PublishVolatile(ctx, "t", []byte{0xff}, false),
		"Client.SendVolat": cl.SendVolatile(ctx, []byte{0xff}, false),
	} {
		if !errors.Is(err, tether.ErrInvalidUTF8) {
			t.Errorf("%s of invalid UTF-8: %v, want ErrInvalidUTF8", what, err)
		}
	}
	if err := hub.PublishBinary("t", []byte{0xff}); err != nil {
		t.Fatal(err)
	}
	raw.expect(t, "raw peer", typed{true, "\xff"})
	sub.expect(t, "Go client", typed{true, "\xff"})
}

// A client that was away gets what it missed with its types: topic
// messages from history when it resumes, and direct messages from the
// offline store, in order and without a resync.
func TestClientBinaryResume(t *testing.T) {
	resyncs := make(chan string, 10)
	var away sync.Mutex // held while bob must stay away: his handshakes wait for it
	s := newSite(t, tether.WithAuth(func(r *http.Request) (string, error) {
		away.Lock()
		defer away.Unlock()
		return "bob", nil
	}))
	direct := newTypedInbox()
	states := newStates()
	cl := dial(t, s.url(), states.option(),
		tether.OnMessage(func(_ *tether.Conn, m tether.Message) { direct.put(m) }),
		tether.WithObserver(tether.Observer{Resync: func(topic string) { resyncs <- topic }}))
	states.await(t, tether.Connected)
	ctx := context.Background()
	sub := newTypedInbox()
	if err := cl.Subscribe(ctx, "t", sub.put); err != nil {
		t.Fatal(err)
	}
	if err := s.Hub().PublishBinary("t", []byte{0}); err != nil {
		t.Fatal(err)
	}
	sub.expect(t, "Go client", typed{true, "\x00"})

	// Away: the server application ends the conn and holds the next
	// handshake; what is published meanwhile stays in the topic's history,
	// what is sent to bob in the offline store.
	away.Lock()
	s.kick()
	states.await(t, tether.Reconnecting)
	waitFor(t, 5*time.Second, "bob gone", func() bool { return s.Hub().Len() == 0 })
	missed := []typed{{true, "\x01\x02"}, {false, "text"}, {false, `"json"`}, {true, "\n\n"}}
	for _, m := range missed {
		if m.binary {
			err := s.Hub().PublishBinary("t", []byte(m.data))
			if err != nil {
				t.Fatal(err)
			}
		} else if err := s.Hub().Publish("t", []byte(m.data)); err != nil {
			t.Fatal(err)
		}
	}
	offline := []typed{{true, "\xff\x00"}, {false, "hello bob"}}
	for _, m := range offline {
		var err error
		if m.binary {
			err = s.Hub().SendToUserBinary("bob", []byte(m.data))
		} else {
			err = s.Hub().SendToUser("bob", []byte(m.data))
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	away.Unlock()
	states.await(t, tether.Connected)
	for _, m := range offline {
		direct.expect(t, "Go client (offline store)", m)
	}
	for _, m := range missed {
		sub.expect(t, "Go client (resumed)", m)
	}
	select {
	case topic := <-resyncs:
		t.Fatalf("resync of %q: the history had every message", topic)
	default:
	}
}
