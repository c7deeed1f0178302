package tether_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/internal/testpeer"
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
	Joins    []wireMember `json:"joins"`
	Leaves   []wireMember `json:"leaves"`
	Count    *int         `json:"count"`
	Snapshot bool         `json:"snapshot"`

	line string // the line as received
}

type wireMember struct {
	User string          `json:"user"`
	Meta json.RawMessage `json:"meta"`
}

// client is a protocol v1 client: a testpeer.Peer that splits frames into
// lines as PROTOCOL.md says, with helpers for the protocol. In raw mode
// (no subprotocol) each message is one line, not parsed.
type client struct {
	*testpeer.Peer
	t   testing.TB
	raw bool
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

// tryDial connects a client, closed when the test ends, or returns why
// it could not.
func tryDial(t testing.TB, url string, o clientOpts) (*client, *http.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	po := testpeer.Options{Header: o.header, Gate: o.readGate, Buffer: 100000}
	if !o.raw {
		po.Subprotocols = []string{tether.Subprotocol}
		po.Lines = true
		// A line that is not a v1 message ends the reader with the error.
		po.OnLine = func(line []byte) error {
			_, err := parseWire(line, false)
			return err
		}
	}
	p, resp, err := testpeer.Dial(ctx, url, po)
	if err != nil {
		return nil, resp, err
	}
	t.Cleanup(p.Close)
	return &client{Peer: p, t: t, raw: o.raw}, resp, nil
}

// parseWire reads a line; in raw mode it only keeps it.
func parseWire(line []byte, raw bool) (wire, error) {
	var w wire
	if !raw {
		if err := json.Unmarshal(line, &w); err != nil {
			return wire{}, err
		}
	}
	w.line = string(line)
	return w, nil
}

// wire returns a line the reader has checked.
func (c *client) wire(line []byte) wire {
	w, _ := parseWire(line, c.raw)
	return w
}

// send writes one text message.
func (c *client) send(msg string) {
	c.t.Helper()
	if err := c.Send(websocket.MessageText, []byte(msg)); err != nil {
		c.t.Fatalf("write %q: %v", msg, err)
	}
}

// next returns the next message, failing the test after limit.
func (c *client) next(limit time.Duration) wire {
	c.t.Helper()
	line, ok := c.TryNext(limit)
	if !ok {
		c.t.Fatalf("no message within %v", limit)
	}
	return c.wire(line)
}

// poll returns the next message, or false if none comes within limit.
func (c *client) poll(limit time.Duration) (wire, bool) {
	line, ok := c.TryNext(limit)
	if !ok {
		return wire{}, false
	}
	return c.wire(line), true
}

// queued takes the messages already read and not yet taken.
func (c *client) queued() []wire {
	var ws []wire
	for n := len(c.Messages()); n > 0; n-- {
		ws = append(ws, c.wire(<-c.Messages()))
	}
	return ws
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

// quiet fails the test if a message other than a ping or pong arrives
// within d.
func (c *client) quiet(d time.Duration) {
	c.t.Helper()
	deadline := time.After(d)
	for {
		select {
		case line := <-c.Messages():
			if w := c.wire(line); w.Op == "ping" || w.Op == "pong" {
				continue
			}
			c.t.Fatalf("unexpected message %s", line)
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
