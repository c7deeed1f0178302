package tether_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// What a person reads of an error names tether's condition, never the
// transport's internal steps.
func assertReadable(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want %q", want)
	}
	msg := err.Error()
	if msg != want {
		t.Errorf("error reads %q, want %q", msg, want)
	}
	for _, leak := range []string{"failed to", "status =", "Status", "received close frame"} {
		if strings.Contains(msg, leak) {
			t.Errorf("error %q repeats the transport's wording %q", msg, leak)
		}
	}
}

func TestCloseErrorMessage(t *testing.T) {
	for _, tc := range []struct {
		err  *tether.CloseError
		want string
	}{
		{&tether.CloseError{Code: websocket.StatusGoingAway, Reason: "retry_ms=531"}, "tether: peer closed the connection: going away (1001), retry in 531 ms"},
		{&tether.CloseError{Code: websocket.StatusNormalClosure}, "tether: peer closed the connection: normal closure (1000)"},
		{&tether.CloseError{Code: tether.StatusSlowConsumer, Reason: "slow consumer"}, "tether: peer closed the connection: slow consumer (4008): slow consumer"},
		{&tether.CloseError{Code: 4003, Reason: "bye"}, "tether: peer closed the connection: status (4003): bye"},
		{&tether.CloseError{Code: websocket.StatusGoingAway, Reason: "retry_ms=x1"}, "tether: peer closed the connection: going away (1001): retry_ms=x1"},
		{&tether.CloseError{Code: websocket.StatusPolicyViolation, Reason: "ping flood", Local: true}, "tether: closed the connection: policy violation (1008): ping flood"},
	} {
		assertReadable(t, tc.err, tc.want)
		if got := websocket.CloseStatus(tc.err); got != tc.err.Code {
			t.Errorf("websocket.CloseStatus(%v) = %d, want %d", tc.err, got, tc.err.Code)
		}
		if errors.Is(tc.err, net.ErrClosed) != tc.err.Local {
			t.Errorf("%v: errors.Is(net.ErrClosed) = %v, want Local = %v", tc.err, !tc.err.Local, tc.err.Local)
		}
	}
}

// acceptOne serves one tether conn over loopback (newServer), dials it
// with a plain coder/websocket peer and returns both ends.
func acceptOne(t *testing.T, opts ...tether.Option) (*websocket.Conn, *tether.Conn) {
	t.Helper()
	srv := newServer(t, opts...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, srv.url(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.CloseNow() })
	return ws, srv.next(t)
}

func endOf(t *testing.T, c *tether.Conn) error {
	t.Helper()
	select {
	case <-c.Done():
		return c.Err()
	case <-time.After(10 * time.Second):
		t.Fatal("conn did not end")
		return nil
	}
}

// Why a conn ended reads as tether's words, over real sockets, and still
// answers errors.Is and errors.As for what caused it.
func TestReasonsReadable(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	t.Run("peer vanishes", func(t *testing.T) {
		ws, c := acceptOne(t)
		ws.CloseNow() // TCP closes with no close frame
		err := endOf(t, c)
		assertReadable(t, err, "tether: connection lost: EOF")
		if !errors.Is(err, tether.ErrConnLost) || !errors.Is(err, io.EOF) {
			t.Errorf("%v: not ErrConnLost and io.EOF", err)
		}
	})

	t.Run("peer closes", func(t *testing.T) {
		ws, c := acceptOne(t)
		go ws.Close(4003, "bye")
		err := endOf(t, c)
		assertReadable(t, err, "tether: peer closed the connection: status (4003): bye")
		var ce *tether.CloseError
		if !errors.As(err, &ce) || ce.Code != 4003 || ce.Reason != "bye" || ce.Local {
			t.Errorf("%v: CloseError %+v", err, ce)
		}
	})

	t.Run("closed here", func(t *testing.T) {
		ws, c := acceptOne(t)
		go func() {
			for {
				if _, _, err := ws.Read(ctx); err != nil {
					return
				}
			}
		}()
		if err := c.Close(websocket.StatusNormalClosure, "done"); err != nil {
			t.Fatal(err)
		}
		err := endOf(t, c)
		assertReadable(t, err, "tether: closed the connection: normal closure (1000): done")
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("%v: not net.ErrClosed", err)
		}
	})

	t.Run("message too big", func(t *testing.T) {
		ws, c := acceptOne(t, tether.WithLimits(tether.Limits{MaxMessageSize: 16}))
		_ = ws.Write(ctx, websocket.MessageText, []byte(strings.Repeat("x", 17)))
		err := endOf(t, c)
		assertReadable(t, err, "tether: message too big: over the limit of 16 bytes")
		if !errors.Is(err, tether.ErrMessageTooBig) {
			t.Errorf("%v: not ErrMessageTooBig", err)
		}
	})

	t.Run("server going away, seen by a client", func(t *testing.T) {
		conns := make(chan *tether.Conn, 1)
		hub, err := tether.NewHub(tether.WithObserver(tether.Observer{
			Connect: func(c *tether.Conn) { conns <- c },
		}))
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(hub)
		defer srv.Close()
		defer hub.Close()
		reasons := make(chan error, 8)
		cl, err := tether.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"),
			tether.WithBackoff(tether.Backoff{Base: time.Hour, MaxRetries: 1}),
			tether.WithObserver(tether.Observer{State: func(s tether.State, err error) {
				if s == tether.Reconnecting {
					reasons <- err
				}
			}}))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		// Closed once the client is up, as Hub.Shutdown would.
		if err := (<-conns).Close(websocket.StatusGoingAway, "retry_ms=531"); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-reasons:
			assertReadable(t, err, "tether: server closed the connection: going away (1001), retry in 531 ms")
		case <-ctx.Done():
			t.Fatal("the client never lost its conn")
		}
	})
}
