package tether_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/internal/testpeer"
)

// server is a real HTTP server on loopback that accepts tether conns.
type server struct {
	*httptest.Server
	conns chan *tether.Conn
	errs  chan error
}

func newServer(t *testing.T, opts ...tether.Option) *server {
	t.Helper()
	sopts := make([]tether.ServerOption, len(opts))
	for i, o := range opts {
		sopts[i] = o
	}
	return newServerFunc(t, func(w http.ResponseWriter, r *http.Request) (*tether.Conn, error) {
		return tether.Accept(w, r, sopts...)
	})
}

// newWrapServer is newServer for tether.Wrap: its handler accepts with
// coder/websocket and wraps the result.
func newWrapServer(t *testing.T, opts ...tether.Option) *server {
	t.Helper()
	return newServerFunc(t, func(w http.ResponseWriter, r *http.Request) (*tether.Conn, error) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return nil, err
		}
		c, err := tether.Wrap(ws, opts...)
		if err != nil {
			ws.CloseNow()
			return nil, err
		}
		return c, nil
	})
}

func newServerFunc(t *testing.T, accept func(http.ResponseWriter, *http.Request) (*tether.Conn, error)) *server {
	t.Helper()
	s := &server{conns: make(chan *tether.Conn, 100), errs: make(chan error, 100)}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := accept(w, r)
		if err != nil {
			s.errs <- err
			return
		}
		s.conns <- c
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *server) url() string { return "ws" + strings.TrimPrefix(s.URL, "http") }

// next returns the next accepted conn and closes it when the test ends.
func (s *server) next(t *testing.T) *tether.Conn {
	t.Helper()
	select {
	case c := <-s.conns:
		t.Cleanup(func() {
			c.CloseNow()
			<-c.Done()
		})
		return c
	case err := <-s.errs:
		t.Fatalf("accept: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("no conn accepted")
	}
	return nil
}

// nextErr returns the error of the next failed accept.
func (s *server) nextErr(t *testing.T) error {
	t.Helper()
	select {
	case c := <-s.conns:
		t.Cleanup(func() {
			c.CloseNow()
			<-c.Done()
		})
		t.Fatal("conn accepted, want an accept error")
	case err := <-s.errs:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("no accept error")
	}
	return nil
}

// roundTrip sends msg on c and returns how long the peer took to get it.
func roundTrip(t *testing.T, c *tether.Conn, p *testpeer.Peer, msg string) time.Duration {
	t.Helper()
	start := time.Now()
	if err := c.Send(context.Background(), []byte(msg)); err != nil {
		t.Fatalf("send: %v", err)
	}
	if got := string(p.Next(t, 5*time.Second)); got != msg {
		t.Fatalf("peer got %q, want %q", got, msg)
	}
	return time.Since(start)
}

// dialRaw opens a WebSocket to url with a hand-written upgrade request on a
// plain TCP conn and returns the conn once the 101 response has been read.
// The conn is closed when the test ends.
func dialRaw(t *testing.T, httpURL string) net.Conn {
	t.Helper()
	host := strings.TrimPrefix(httpURL, "http://")
	conn, err := net.DialTimeout("tcp", host, 5*time.Second)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { conn.Close() })

	nonce := make([]byte, 16)
	rand.Read(nonce)
	key := base64.StdEncoding.EncodeToString(nonce)
	req := fmt.Sprintf("GET / HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n", host, key)
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte(req)); err != nil {
		t.Fatalf("write upgrade request: %v", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("read upgrade response: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade response %s, want 101", resp.Status)
	}
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if got, want := resp.Header.Get("Sec-WebSocket-Accept"), base64.StdEncoding.EncodeToString(sum[:]); got != want {
		t.Fatalf("Sec-WebSocket-Accept %q, want %q", got, want)
	}
	conn.SetDeadline(time.Time{})
	return conn
}

// disconnect is one Observer.Disconnect event.
type disconnect struct {
	c   *tether.Conn
	err error
	at  time.Time
}

// disconnectObserver returns an observer that reports every disconnect,
// with its time, on the returned channel.
func disconnectObserver() (tether.Observer, chan disconnect) {
	ch := make(chan disconnect, 100)
	return tether.Observer{Disconnect: func(c *tether.Conn, err error) {
		ch <- disconnect{c, err, time.Now()}
	}}, ch
}

// waitDone waits for c to end, failing the test after limit.
func waitDone(t *testing.T, c *tether.Conn, limit time.Duration) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(limit):
		t.Fatalf("conn still open after %v (state %v)", limit, c.State())
	}
}

// assertOpen fails the test if c has ended.
func assertOpen(t *testing.T, c *tether.Conn, what string) {
	t.Helper()
	if err := c.Err(); err != nil {
		t.Fatalf("%s: conn ended: %v", what, err)
	}
	select {
	case <-c.Done():
		t.Fatalf("%s: conn done", what)
	default:
	}
}
