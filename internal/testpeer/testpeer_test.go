package testpeer_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/internal/testpeer"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// newServer serves each conn with handle, on loopback, after a
// coder/websocket Accept that agrees to subprotocol "v1". It waits for
// the handlers when the test ends.
func newServer(t *testing.T, handle func(ctx context.Context, ws *websocket.Conn)) string {
	t.Helper()
	var wg sync.WaitGroup
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Refuse") != "" {
			http.Error(w, "refused", http.StatusForbidden)
			return
		}
		ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"v1"}})
		if err != nil {
			t.Errorf("accept: %v", err)
			return
		}
		wg.Add(1)
		defer wg.Done()
		defer ws.CloseNow()
		ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		defer cancel()
		handle(ctx, ws)
	}))
	t.Cleanup(func() {
		srv.Close()
		wg.Wait()
	})
	return "ws" + strings.TrimPrefix(srv.URL, "http")
}

// Lines: frames are split at '\n', empty lines skipped, and counted;
// what the peer sends reaches the server; a close frame ends the reader.
func TestLinesSendAndClose(t *testing.T) {
	got := make(chan string, 1)
	url := newServer(t, func(ctx context.Context, ws *websocket.Conn) {
		if ws.Subprotocol() != "v1" {
			t.Errorf("subprotocol %q, want v1", ws.Subprotocol())
		}
		ws.Write(ctx, websocket.MessageText, []byte("a\nb\n\nc\n"))
		ws.Write(ctx, websocket.MessageText, []byte("d"))
		_, data, err := ws.Read(ctx)
		if err != nil {
			t.Errorf("server read: %v", err)
		}
		got <- string(data)
		ws.Close(websocket.StatusGoingAway, "bye")
	})
	var seen []string
	p := testpeer.New(t, url, testpeer.Options{
		Subprotocols: []string{"v1"},
		Lines:        true,
		OnLine:       func(line []byte) error { seen = append(seen, string(line)); return nil },
	})
	for _, want := range []string{"a", "b", "c", "d"} {
		if line := p.Next(t, 5*time.Second); string(line) != want {
			t.Fatalf("Next = %q, want %q", line, want)
		}
	}
	if err := p.Send(websocket.MessageText, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if s := <-got; s != "hello" {
		t.Fatalf("server read %q, want hello", s)
	}
	if err := p.ReadErr(t, 5*time.Second); websocket.CloseStatus(err) != websocket.StatusGoingAway {
		t.Fatalf("ReadErr = %v, want close status 1001", err)
	}
	if strings.Join(seen, " ") != "a b c d" {
		t.Fatalf("OnLine saw %q", seen)
	}
	if p.Frames() != 2 || p.Lines() != 4 || p.MaxLines() != 3 {
		t.Fatalf("Frames %d, Lines %d, MaxLines %d; want 2, 4, 3", p.Frames(), p.Lines(), p.MaxLines())
	}
	if _, ok := p.TryNext(10 * time.Millisecond); ok {
		t.Fatal("TryNext found a line after the last")
	}
}

// Without Lines a message is one line, however many '\n' it holds, and a
// message over the read limit ends the reader and closes the conn with
// 1009.
func TestWholeMessagesAndReadLimit(t *testing.T) {
	closed := make(chan websocket.StatusCode, 1)
	url := newServer(t, func(ctx context.Context, ws *websocket.Conn) {
		ws.Write(ctx, websocket.MessageText, []byte("a\nb"))
		ws.Write(ctx, websocket.MessageBinary, make([]byte, 100))
		_, _, err := ws.Read(ctx)
		closed <- websocket.CloseStatus(err)
	})
	p := testpeer.New(t, url, testpeer.Options{ReadLimit: 10})
	if line := p.Next(t, 5*time.Second); string(line) != "a\nb" {
		t.Fatalf("Next = %q, want the whole message", line)
	}
	if err := p.ReadErr(t, 5*time.Second); err == nil {
		t.Fatal("reader ended without an error")
	}
	if code := <-closed; code != websocket.StatusMessageTooBig {
		t.Fatalf("server saw close status %v, want 1009", code)
	}
}

// A gate holds the reader back: no line, no pong, until it opens. Pings
// are recorded; NoPong answers none.
func TestGateAndPings(t *testing.T) {
	pinged := make(chan error, 1)
	url := newServer(t, func(ctx context.Context, ws *websocket.Conn) {
		ctx = ws.CloseRead(ctx)
		ws.Write(ctx, websocket.MessageText, []byte("x"))
		pinged <- ws.Ping(ctx)
		<-ctx.Done()
	})
	gate := make(chan struct{})
	p := testpeer.New(t, url, testpeer.Options{Gate: gate})
	select {
	case err := <-pinged:
		t.Fatalf("ping answered (%v) through a closed gate", err)
	case line := <-p.Messages():
		t.Fatalf("read %q through a closed gate", line)
	case <-time.After(100 * time.Millisecond):
	}
	close(gate)
	if line := p.Next(t, 5*time.Second); string(line) != "x" {
		t.Fatalf("Next = %q, want x", line)
	}
	if err := <-pinged; err != nil {
		t.Fatalf("ping: %v", err)
	}
	if n, times := p.PingCount(), p.Pings(); n != 1 || len(times) != 1 {
		t.Fatalf("PingCount %d, Pings %v; want one", n, times)
	}

	zombie := testpeer.New(t, url, testpeer.Options{NoPong: true})
	zombie.Next(t, 5*time.Second)
	select {
	case err := <-pinged:
		t.Fatalf("a zombie answered a ping (%v)", err)
	case <-time.After(100 * time.Millisecond):
	}
	if zombie.PingCount() != 1 {
		t.Fatalf("zombie's PingCount %d, want 1", zombie.PingCount())
	}
	zombie.Close()
	zombie.Close() // twice is fine
	<-pinged       // the server's ping ends with the conn
}

// A Handshake runs before the reader, an OnLine error ends the reader,
// and Buffer < 0 queues nothing.
func TestHandshakeOnLineErrorNoQueue(t *testing.T) {
	url := newServer(t, func(ctx context.Context, ws *websocket.Conn) {
		ws.Write(ctx, websocket.MessageText, []byte("welcome"))
		ws.Write(ctx, websocket.MessageText, []byte("ok\nbad\nnever"))
		ctx = ws.CloseRead(ctx)
		<-ctx.Done()
	})
	errBad := errors.New("bad line")
	var lines []string
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p, _, err := testpeer.Dial(ctx, url, testpeer.Options{
		Lines:  true,
		Buffer: -1,
		Handshake: func(ctx context.Context, ws *websocket.Conn) error {
			if _, data, err := ws.Read(ctx); err != nil || string(data) != "welcome" {
				return errors.New("no welcome")
			}
			return nil
		},
		OnLine: func(line []byte) error {
			lines = append(lines, string(line))
			if string(line) == "bad" {
				return errBad
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.ReadErr(t, 5*time.Second); !errors.Is(err, errBad) {
		t.Fatalf("ReadErr = %v, want the OnLine error", err)
	}
	if strings.Join(lines, " ") != "ok bad" || p.Messages() != nil {
		t.Fatalf("OnLine saw %q, Messages %v; want ok bad, nil", lines, p.Messages())
	}
}

// A refused handshake returns the response.
func TestDialRefused(t *testing.T) {
	url := newServer(t, func(context.Context, *websocket.Conn) {})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p, resp, err := testpeer.Dial(ctx, url, testpeer.Options{Header: http.Header{"X-Refuse": {"1"}}})
	if err == nil {
		p.Close()
		t.Fatal("dial succeeded, want a refusal")
	}
	if resp == nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("dial: %v, response %v; want HTTP 403", err, resp)
	}
}
