package tether_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// server is a real HTTP server on loopback that accepts tether conns.
type server struct {
	*httptest.Server
	conns chan *tether.Conn
	errs  chan error
}

func newServer(t *testing.T, opts ...tether.Option) *server {
	t.Helper()
	s := &server{conns: make(chan *tether.Conn, 100), errs: make(chan error, 100)}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := tether.Accept(w, r, opts...)
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

// peer is a coder/websocket client that reads in the background, as a
// well-behaved peer does, and counts the pings it receives.
type peer struct {
	ws    *websocket.Conn
	mu    sync.Mutex
	pings []time.Time
	msgs  chan []byte
	done  chan error
}

type peerOpts struct {
	noPong    bool          // OnPingReceived returns false: a zombie
	pongDelay func() time.Duration
	noRead    bool // never reads: no pongs, no close handshake
}

func dialPeer(t *testing.T, url string, o peerOpts) *peer {
	t.Helper()
	p := &peer{msgs: make(chan []byte, 1000), done: make(chan error, 1)}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		OnPingReceived: func(ctx context.Context, _ []byte) bool {
			p.mu.Lock()
			p.pings = append(p.pings, time.Now())
			p.mu.Unlock()
			if o.pongDelay != nil {
				if d := o.pongDelay(); d > 0 {
					time.Sleep(d)
				}
			}
			return !o.noPong
		},
	})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	p.ws = ws
	if o.noRead {
		close(p.done)
	} else {
		go func() {
			for {
				_, data, err := ws.Read(context.Background())
				if err != nil {
					p.done <- err
					return
				}
				p.msgs <- data
			}
		}()
	}
	t.Cleanup(func() {
		ws.CloseNow()
		<-p.done
	})
	return p
}

func (p *peer) pingCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pings)
}

func (p *peer) pingTimes() []time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]time.Time(nil), p.pings...)
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
