package tether

import (
	"context"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// A hub's conns write on goroutines it keeps: after a broadcast, the
// writers that finished wait idle for the next (at most maxIdleWriters),
// and Close ends them.
func TestHubWritersKeptAndStopped(t *testing.T) {
	h, err := NewHub()
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	const n = 20
	peers := make([]*websocket.Conn, 0, n)
	for range n {
		ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.CloseNow()
		peers = append(peers, ws)
	}
	for h.Stats().Conns < n {
		if ctx.Err() != nil {
			t.Fatalf("%d of %d conns registered", h.Stats().Conns, n)
		}
		time.Sleep(time.Millisecond)
	}
	writers := h.connCfg.writers
	for round := range 2 {
		if err := h.Broadcast([]byte(`"hello"`)); err != nil {
			t.Fatal(err)
		}
		for i, ws := range peers {
			if _, data, err := ws.Read(ctx); err != nil || string(data) != `"hello"` {
				t.Fatalf("round %d, peer %d: %q, %v", round, i, data, err)
			}
		}
		// The writers end once their queues are empty, just after the
		// peers read: they are then kept.
		for writers.Idle() == 0 {
			if ctx.Err() != nil {
				t.Fatalf("round %d: no writer kept after a broadcast to %d conns", round, n)
			}
			time.Sleep(time.Millisecond)
		}
		if idle := writers.Idle(); idle > n {
			t.Fatalf("round %d: %d idle writers for %d conns", round, idle, n)
		}
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if idle := writers.Idle(); idle != 0 {
		t.Fatalf("%d idle writers after Close", idle)
	}
}
