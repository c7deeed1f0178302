package tether_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// hubServer is a real HTTP server on loopback whose handler is a hub.
type hubServer struct {
	*httptest.Server
	hub *tether.Hub
}

// newHubServer starts a hub behind an httptest server. When the test ends
// the hub is closed, then the server; the goleak check in TestMain then
// proves the hub left no goroutine.
func newHubServer(t testing.TB, opts ...tether.HubOption) *hubServer {
	t.Helper()
	hub, err := tether.NewHub(opts...)
	if err != nil {
		t.Fatalf("NewHub: %v", err)
	}
	s := &hubServer{hub: hub}
	s.Server = httptest.NewServer(hub)
	t.Cleanup(func() {
		hub.Close()
		s.Close()
	})
	return s
}

func (s *hubServer) url() string { return "ws" + strings.TrimPrefix(s.URL, "http") }

// wire is one protocol v1 message as a client reads it.
type wire struct {
	Op        string          `json:"op"`
	ID        string          `json:"id"`
	Topic     string          `json:"topic"`
	Epoch     string          `json:"epoch"`
	Seq       uint64          `json:"seq"`
	Data      json.RawMessage `json:"data"`
	TS        int64           `json:"ts"`
	Code      string          `json:"code"`
	Reason    string          `json:"reason"`
	Session   string          `json:"session"`
	Heartbeat struct {
		IntervalMS int64 `json:"interval_ms"`
		TimeoutMS  int64 `json:"timeout_ms"`
	} `json:"heartbeat"`
	Joins  []wireMember `json:"joins"`
	Leaves []wireMember `json:"leaves"`

	line string // the line as received
}

type wireMember struct {
	User string          `json:"user"`
	Meta json.RawMessage `json:"meta"`
}

// client is a protocol v1 client on coder/websocket that reads in the
// background, splitting frames into lines as PROTOCOL.md says.
type client struct {
	t      testing.TB
	ws     *websocket.Conn
	in     chan wire
	frames chan int // lines per frame, for coalescing tests
	quit   chan struct{}
	done   chan struct{}

	mu  sync.Mutex
	err error // why the reader ended
}

type clientOpts struct {
	raw      bool        // no subprotocol: raw mode
	header   http.Header // handshake headers
	readGate chan struct{}
}

// dialClient connects a client to the hub server; it fails the test if
// the handshake fails.
func dialClient(t testing.TB, url string, o clientOpts) *client {
	t.Helper()
	c, resp, err := tryDial(t, url, o)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial: %v (HTTP %d)", err, status)
	}
	return c
}

func tryDial(t testing.TB, url string, o clientOpts) (*client, *http.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	do := &websocket.DialOptions{HTTPHeader: o.header}
	if !o.raw {
		do.Subprotocols = []string{tether.Subprotocol}
	}
	ws, resp, err := websocket.Dial(ctx, url, do)
	if err != nil {
		return nil, resp, err
	}
	ws.SetReadLimit(-1)
	c := &client{t: t, ws: ws, in: make(chan wire, 100000), frames: make(chan int, 100000),
		quit: make(chan struct{}), done: make(chan struct{})}
	go c.read(o.readGate, o.raw)
	t.Cleanup(c.close)
	return c, resp, nil
}

func (c *client) close() {
	select {
	case <-c.quit:
	default:
		close(c.quit)
	}
	c.ws.CloseNow()
	<-c.done
}

func (c *client) read(gate chan struct{}, raw bool) {
	defer close(c.done)
	if gate != nil {
		select {
		case <-gate:
		case <-c.quit:
			return
		}
	}
	for {
		_, data, err := c.ws.Read(context.Background())
		if err != nil {
			c.mu.Lock()
			c.err = err
			c.mu.Unlock()
			return
		}
		lines := bytes.Split(data, []byte("\n"))
		if raw {
			lines = [][]byte{data}
		}
		n := 0
		for _, line := range lines {
			if len(line) == 0 {
				continue
			}
			var w wire
			if !raw {
				if err := json.Unmarshal(line, &w); err != nil {
					c.mu.Lock()
					c.err = err
					c.mu.Unlock()
					return
				}
			}
			w.line = string(line)
			n++
			select {
			case c.in <- w:
			case <-c.quit:
				return
			}
		}
		select {
		case c.frames <- n:
		default:
		}
	}
}

// send writes one text message.
func (c *client) send(msg string) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.ws.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		c.t.Fatalf("write %q: %v", msg, err)
	}
}

// next returns the next message, failing the test after limit.
func (c *client) next(limit time.Duration) wire {
	c.t.Helper()
	select {
	case w := <-c.in:
		return w
	case <-time.After(limit):
		c.t.Fatalf("no message within %v", limit)
	}
	return wire{}
}

// expect returns the next message whose op is op, failing the test if
// another op comes first (except pings, pongs and presence, which are
// skipped unless asked for).
func (c *client) expect(op string) wire {
	c.t.Helper()
	for {
		w := c.next(5 * time.Second)
		if w.Op == op {
			return w
		}
		if w.Op == "ping" || w.Op == "pong" || w.Op == "presence" {
			continue
		}
		c.t.Fatalf("got %s, want %s", w.line, op)
	}
}

// welcome reads the welcome, which must be the first message.
func (c *client) welcome() wire {
	c.t.Helper()
	w := c.next(5 * time.Second)
	if w.Op != "welcome" {
		c.t.Fatalf("first message %s, want a welcome", w.line)
	}
	return w
}

// subscribe sends a sub with an id and waits for its ack.
func (c *client) subscribe(topic string) {
	c.t.Helper()
	c.send(`{"op":"sub","topic":` + quote(topic) + `,"id":"s-` + topic + `"}`)
	if a := c.expect("ack"); a.ID != "s-"+topic {
		c.t.Fatalf("ack %q, want s-%s", a.ID, topic)
	}
}

// readErr waits for the reader to end and returns why.
func (c *client) readErr(limit time.Duration) error {
	c.t.Helper()
	select {
	case <-c.done:
	case <-time.After(limit):
		c.t.Fatalf("client still reading after %v", limit)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// quiet fails the test if a message other than a ping or pong arrives
// within d.
func (c *client) quiet(d time.Duration) {
	c.t.Helper()
	deadline := time.After(d)
	for {
		select {
		case w := <-c.in:
			if w.Op == "ping" || w.Op == "pong" {
				continue
			}
			c.t.Fatalf("unexpected message %s", w.line)
		case <-deadline:
			return
		}
	}
}

func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// waitFor polls cond until it holds, failing the test after limit.
func waitFor(t testing.TB, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", limit, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
