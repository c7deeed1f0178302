package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/coder/websocket"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The example echoes over a real socket, and on shutdown closes its conns
// with 1001 going away before serve returns.
func TestEchoAndShutdown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- serve(ctx, ln, 50*time.Millisecond, time.Second, slog.New(slog.NewTextHandler(io.Discard, nil)))
	}()

	dialCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(dialCtx, "ws://"+ln.Addr().String()+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	if err := ws.Write(dialCtx, websocket.MessageText, []byte("ping me back")); err != nil {
		t.Fatal(err)
	}
	_, got, err := ws.Read(dialCtx)
	if err != nil || string(got) != "ping me back" {
		t.Fatalf("echo: %q, %v", got, err)
	}

	stop()
	_, _, err = ws.Read(dialCtx)
	if code := websocket.CloseStatus(err); code != websocket.StatusGoingAway {
		t.Fatalf("on shutdown the client read %v, want close 1001", err)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not return after shutdown")
	}
}
