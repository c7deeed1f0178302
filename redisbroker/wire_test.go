package redisbroker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// wireClient is a protocol v1 peer over coder/websocket that records
// every message, to see what a browser would: presence messages, which
// tether.Client does not surface.
type wireClient struct {
	t      testing.TB
	conn   *websocket.Conn
	cancel context.CancelFunc
	done   chan struct{}

	mu   sync.Mutex
	msgs []wireMsg
	err  error
}

// wireMsg is one protocol message received, with when it arrived.
type wireMsg struct {
	Op     string          `json:"op"`
	ID     string          `json:"id"`
	Topic  string          `json:"topic"`
	Epoch  string          `json:"epoch"`
	Seq    uint64          `json:"seq"`
	Data   json.RawMessage `json:"data"`
	Code   string          `json:"code"`
	Joins  []wireMember    `json:"joins"`
	Leaves []wireMember    `json:"leaves"`

	line string
	at   time.Time
}

type wireMember struct {
	User string          `json:"user"`
	Meta json.RawMessage `json:"meta"`
}

// dialWire connects to a hub's ws:// URL offering tether.v1, and reads in
// the background until closed (when the test ends at the latest).
func dialWire(t testing.TB, wsURL string) *wireClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, resp, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{Subprotocols: []string{tether.Subprotocol}})
	if err != nil {
		t.Fatalf("dial %s: %v", wsURL, err)
	}
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != tether.Subprotocol {
		conn.CloseNow()
		t.Fatalf("handshake: subprotocol %q, want %q", got, tether.Subprotocol)
	}
	conn.SetReadLimit(16 << 20)
	readCtx, stop := context.WithCancel(context.Background())
	c := &wireClient{t: t, conn: conn, cancel: stop, done: make(chan struct{})}
	go c.read(readCtx)
	t.Cleanup(c.close)
	return c
}

// read records every message until the conn ends; coder/websocket
// answers pings and closes meanwhile.
func (c *wireClient) read(ctx context.Context) {
	defer close(c.done)
	for {
		_, msg, err := c.conn.Read(ctx)
		if err != nil {
			c.fail(err)
			return
		}
		now := time.Now()
		for line := range bytes.SplitSeq(msg, []byte("\n")) {
			if len(bytes.TrimSpace(line)) == 0 {
				continue
			}
			var m wireMsg
			if err := json.Unmarshal(line, &m); err != nil {
				c.fail(fmt.Errorf("unreadable line %q: %w", line, err))
				return
			}
			m.line, m.at = string(line), now
			c.mu.Lock()
			c.msgs = append(c.msgs, m)
			c.mu.Unlock()
		}
	}
}

func (c *wireClient) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
}

// send sends one protocol message.
func (c *wireClient) send(line string) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.conn.Write(ctx, websocket.MessageText, []byte(line)); err != nil {
		c.t.Fatalf("send %s: %v", line, err)
	}
}

// subscribe subscribes to topic and waits for the ack.
func (c *wireClient) subscribe(topic string) {
	c.t.Helper()
	id := "sub-" + topic
	c.send(fmt.Sprintf(`{"op":"sub","topic":%s,"id":%s}`, quoted(topic), quoted(id)))
	c.await(5*time.Second, "the ack of sub "+topic, func(m wireMsg) bool {
		if m.ID == id && m.Op == "error" {
			c.t.Fatalf("sub %s refused: %s", topic, m.line)
		}
		return m.ID == id && m.Op == "ack"
	})
}

// await waits for a message that satisfies match, among all received.
func (c *wireClient) await(limit time.Duration, what string, match func(wireMsg) bool) wireMsg {
	c.t.Helper()
	start := time.Now()
	for {
		c.mu.Lock()
		i := slices.IndexFunc(c.msgs, match)
		var m wireMsg
		if i >= 0 {
			m = c.msgs[i]
		}
		err := c.err
		c.mu.Unlock()
		if i >= 0 {
			return m
		}
		if err != nil {
			c.t.Fatalf("waiting for %s: the conn ended: %v\nreceived:\n%s", what, err, c.dump())
		}
		if time.Since(start) > limit {
			c.t.Fatalf("no %s within %v; received:\n%s", what, limit, c.dump())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// presenceOf returns the presence messages of topic that list user among
// joins (leave false) or leaves (leave true).
func (c *wireClient) presenceOf(topic, user string, leave bool) []wireMsg {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []wireMsg
	for _, m := range c.msgs {
		if m.Op != "presence" || m.Topic != topic {
			continue
		}
		list := m.Joins
		if leave {
			list = m.Leaves
		}
		if slices.ContainsFunc(list, func(w wireMember) bool { return w.User == user }) {
			out = append(out, m)
		}
	}
	return out
}

// isPresence matches a presence of topic listing user as joining or
// leaving.
func isPresence(topic, user string, leave bool) func(wireMsg) bool {
	return func(m wireMsg) bool {
		if m.Op != "presence" || m.Topic != topic {
			return false
		}
		list := m.Joins
		if leave {
			list = m.Leaves
		}
		return slices.ContainsFunc(list, func(w wireMember) bool { return w.User == user })
	}
}

func (c *wireClient) dump() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var b strings.Builder
	for _, m := range c.msgs {
		if m.Op == "ping" || m.Op == "pong" {
			continue
		}
		fmt.Fprintf(&b, "  %s %s\n", m.at.Format("15:04:05.000"), m.line)
	}
	return b.String()
}

// close drops the conn, as a tab being closed does, and waits for the
// reader.
func (c *wireClient) close() {
	c.conn.CloseNow()
	c.cancel()
	<-c.done
}
