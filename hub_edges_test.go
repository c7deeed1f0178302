package tether_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// TestHubReplayFitsReadLimit resumes a topic whose missed messages add up
// to far more than 32 KiB: the replay must come in frames that a client
// with coder/websocket's default read limit (32 KiB) can read, complete
// and in order.
func TestHubReplayFitsReadLimit(t *testing.T) {
	s := newHubServer(t, tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Off: true} }))
	payload := `"` + strings.Repeat("x", 1000) + `"`
	var epoch string
	for i := range 100 {
		if err := s.hub.Publish("big", []byte(payload)); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			c := dialClient(t, s.url(), clientOpts{})
			c.welcome()
			c.send(`{"op":"sub","topic":"big","since":{"epoch":"x","seq":0},"id":"1"}`)
			c.expect("ack")
			epoch = c.expect("resync").Epoch
			c.Close()
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, s.url(), &websocket.DialOptions{Subprotocols: []string{tether.Subprotocol}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow() // the default read limit, 32 KiB, stays
	sub := fmt.Sprintf(`{"op":"sub","topic":"big","since":{"epoch":%q,"seq":0},"id":"1"}`, epoch)
	if err := ws.Write(ctx, websocket.MessageText, []byte(sub)); err != nil {
		t.Fatal(err)
	}
	next := uint64(1)
	for next <= 100 {
		_, data, err := ws.Read(ctx)
		if err != nil {
			t.Fatalf("read after seq %d: %v", next-1, err)
		}
		for line := range bytes.SplitSeq(data, []byte("\n")) {
			var w wire
			if err := json.Unmarshal(line, &w); err != nil {
				t.Fatalf("line %q: %v", line, err)
			}
			if w.Op != "msg" {
				continue
			}
			if w.Seq != next {
				t.Fatalf("seq %d, want %d", w.Seq, next)
			}
			next++
		}
	}
}

// TestHubOnConnectPanics checks that a panic in Observer.Connect, which net/http
// recovers, leaves no conn behind: the conn runs and ends as usual, and
// Close returns.
func TestHubOnConnectPanics(t *testing.T) {
	hub, err := tether.NewHub(tether.WithObserver(tether.Observer{Connect: func(*tether.Conn) { panic("app bug") }}))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(hub)
	srv.Config.ErrorLog = nil
	srv.Start()
	defer srv.Close()
	c := dialClient(t, "ws"+strings.TrimPrefix(srv.URL, "http"), clientOpts{})
	c.welcome()
	c.send(`{"op":"ping","ts":1}`)
	if p := c.expect("pong"); p.TS != 1 {
		t.Fatalf("pong %s", p.line)
	}
	done := make(chan struct{})
	go func() {
		hub.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return")
	}
	if n := hub.Len(); n != 0 {
		t.Fatalf("Len after Close = %d", n)
	}
}

// TestHubSendToUserEndedConn sends to a user whose only conn has ended but
// is still closing (its peer does not answer the close): the message must
// go to the offline store, and reach the user's next conn.
func TestHubSendToUserEndedConn(t *testing.T) {
	var conns = make(chan *tether.Conn, 2)
	s := newHubServer(t,
		tether.WithAuth(func(r *http.Request) (string, error) { return "zoe", nil }),
		tether.WithLimits(tether.Limits{WriteTimeout: 5 * time.Second}),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) { conns <- c }}),
	)
	stuck := dialClient(t, s.url(), clientOpts{readGate: make(chan struct{})}) // never reads
	c := <-conns
	if err := c.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Fatal(err)
	}
	if err := s.hub.SendToUser("zoe", []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	stuck.Close()
	waitFor(t, 10*time.Second, "old conn unregistered", func() bool { return s.hub.Len() == 0 })
	again := dialClient(t, s.url(), clientOpts{})
	again.welcome()
	if m := again.expect("msg"); string(m.Data) != `{"n":1}` {
		t.Fatalf("got %s, want the message sent while the old conn was closing", m.line)
	}
}
