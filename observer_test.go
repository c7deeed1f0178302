package tether_test

import (
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// Observers given with several WithObserver options are all called, in the
// order given, and a hub's Connect comes after registration and before the
// conn's first message is read.
func TestObserversCompose(t *testing.T) {
	var mu sync.Mutex
	var calls []string
	record := func(s string) {
		mu.Lock()
		calls = append(calls, s)
		mu.Unlock()
	}
	var hub *tether.Hub
	gone := make(chan struct{})
	first := tether.Observer{
		Connect: func(c *tether.Conn) {
			record("a.connect")
			if hub.Conn(c.ID()) != c {
				t.Error("Connect before the conn is registered")
			}
		},
		Disconnect: func(*tether.Conn, error) { record("a.disconnect") },
	}
	second := tether.Observer{
		Connect:    func(*tether.Conn) { record("b.connect") },
		Disconnect: func(*tether.Conn, error) { record("b.disconnect"); close(gone) },
	}
	var err error
	hub, err = tether.NewHub(
		tether.WithObserver(first),
		tether.OnMessage(func(*tether.Conn, tether.Message) { record("message") }),
		tether.WithObserver(second),
		tether.WithObserver(tether.Observer{}), // nothing to add
	)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(hub)
	defer srv.Close()
	defer hub.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	// Sent at once: the hub must not read it before Connect has run.
	if err := ws.Write(ctx, websocket.MessageText, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		n := len(calls)
		mu.Unlock()
		if n >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("message not delivered")
		}
		time.Sleep(time.Millisecond)
	}
	ws.Close(websocket.StatusNormalClosure, "")
	select {
	case <-gone:
	case <-ctx.Done():
		t.Fatal("no Disconnect")
	}
	mu.Lock()
	defer mu.Unlock()
	want := []string{"a.connect", "b.connect", "message", "a.disconnect", "b.disconnect"}
	if !slices.Equal(calls, want) {
		t.Fatalf("calls %v, want %v", calls, want)
	}
}

// A panic in Connect on a conn from Accept, whose caller never gets the
// conn, drops it rather than leaving a conn nobody can reach.
func TestAcceptConnectPanicDropsConn(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tether.Accept(w, r, tether.WithObserver(tether.Observer{
			Connect: func(*tether.Conn) { panic("app bug") },
		}))
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // net/http logs the recovered panic
	srv.Start()
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	if _, _, err := ws.Read(ctx); err == nil || ctx.Err() != nil {
		t.Fatalf("the peer's conn is still up (read: %v)", err)
	}
}

// Closing a Client's conn with a code of its own makes the client
// reconnect: the code is not taken for the server's refusal.
func TestClientOwnCloseCodeIsNotTheServers(t *testing.T) {
	s := newSite(t)
	st := newStates()
	cl := dial(t, s.url(), fastBackoff, st.option())
	if err := cl.Conn().Close(tether.StatusForbidden, ""); err != nil {
		t.Fatal(err)
	}
	st.await(t, tether.Reconnecting)
	st.await(t, tether.Connected)
	if s := cl.State(); s != tether.Connected {
		t.Fatalf("state %v, want connected again", s)
	}
}
