package redisbroker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
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
	// Count and Snapshot are a presence's; Count is nil when absent.
	Count    *int `json:"count"`
	Snapshot bool `json:"snapshot"`

	line  string
	at    time.Time
	shape string // what is wrong with a presence's shape; "" if nothing
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
	t.Cleanup(func() {
		c.close()
		c.checkPresence()
	})
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
			if err := c.record(line, now); err != nil {
				c.fail(err)
				return
			}
		}
	}
}

// record adds a received line to the client's messages.
func (c *wireClient) record(line []byte, at time.Time) error {
	var m wireMsg
	if err := json.Unmarshal(line, &m); err != nil {
		return fmt.Errorf("unreadable line %q: %w", line, err)
	}
	m.line, m.at = string(line), at
	if m.Op == "presence" {
		m.shape = presenceShape(line, m)
	}
	c.mu.Lock()
	c.msgs = append(c.msgs, m)
	c.mu.Unlock()
	return nil
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
	c.startSub(topic)
	c.awaitAck(topic, 5*time.Second)
}

// startSub sends a sub of topic without waiting for its ack, so that a
// burst of clients can subscribe at once; awaitAck waits for it.
func (c *wireClient) startSub(topic string) {
	c.t.Helper()
	c.send(fmt.Sprintf(`{"op":"sub","topic":%s,"id":%s}`, quoted(topic), quoted("sub-"+topic)))
}

// awaitAck waits for the ack of startSub(topic), failing on a refusal.
func (c *wireClient) awaitAck(topic string, limit time.Duration) {
	c.t.Helper()
	id := "sub-" + topic
	c.await(limit, "the ack of sub "+topic, func(m wireMsg) bool {
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
// joins (leave false) or leaves (leave true). A snapshot's joins count:
// it is how a subscriber first learns who is there.
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
// leaving (a snapshot listing user counts as joining).
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

// messages returns what the client received so far.
func (c *wireClient) messages() []wireMsg {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.msgs)
}

// ended returns why the conn ended, nil while it is up (or was closed
// by close, whose read error is then recorded too: ask before closing).
func (c *wireClient) ended() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// presenceShape says what is wrong with the shape of a presence line, m
// (PROTOCOL.md, presence): it must carry a count; a snapshot has a joins
// array and no leaves; a change has both arrays, or neither (then only
// op, topic and count) when the topic only counts.
func presenceShape(line []byte, m wireMsg) string {
	var k map[string]json.RawMessage
	if err := json.Unmarshal(line, &k); err != nil {
		return err.Error()
	}
	isArray := func(f string) bool { return bytes.HasPrefix(bytes.TrimSpace(k[f]), []byte("[")) }
	switch {
	case m.Count == nil || *m.Count < 0:
		return "no count"
	case m.Snapshot && (!isArray("joins") || k["leaves"] != nil):
		return "a snapshot without a joins array, or with leaves"
	case !m.Snapshot && isArray("joins") != isArray("leaves"):
		return "a change with one of joins and leaves"
	case !m.Snapshot && k["joins"] == nil && len(k) != 3:
		return "a count-only presence with other fields"
	}
	return ""
}

// presenceView is what a client knows of a topic's presence after the
// presence messages it received, applied as PROTOCOL.md says.
type presenceView struct {
	seen     bool            // a presence of the topic arrived
	count    int             // the last count
	listing  bool            // the last snapshot listed every member
	either   bool            // it listed no one, of 0: listed or counted, the next change tells
	users    map[string]bool // the members listed, while listing
	msgs     int             // presence messages of the topic
	snaps    []wireMsg       // the snapshots, in order
	problems []string        // breaches of the protocol, with their line
}

// listed returns the members listed, sorted.
func (v presenceView) listed() []string {
	return slices.Sorted(maps.Keys(v.users))
}

func (v presenceView) String() string {
	return fmt.Sprintf("count=%d listing=%v listed=%v presences=%d snapshots=%d problems=%d",
		v.count, v.listing, v.listed(), v.msgs, len(v.snaps), len(v.problems))
}

// presence replays the presence messages of topic received so far.
// Besides a shape that is wrong, it records as problems what the
// protocol rules out: a change before the first snapshot; a snapshot
// that lists some members but not all (over the limit, joins is empty);
// a listed topic sending a count alone, a join of a user already listed
// or a leave of one not listed, or a list whose length is not the count
// after a change; a counted topic sending joins or leaves.
func (c *wireClient) presence(topic string) presenceView {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := presenceView{users: map[string]bool{}}
	bad := func(m wireMsg, format string, args ...any) {
		v.problems = append(v.problems, fmt.Sprintf(format, args...)+": "+m.line)
	}
	for _, m := range c.msgs {
		if m.Op != "presence" || m.Topic != topic {
			continue
		}
		v.msgs++
		if m.shape != "" {
			bad(m, "%s", m.shape)
		}
		count := len(m.Joins) // what a client takes without a count
		if m.Count != nil {
			count = *m.Count
		}
		switch {
		case m.Snapshot:
			v.snaps = append(v.snaps, m)
			clear(v.users)
			for _, j := range m.Joins {
				if v.users[j.User] {
					bad(m, "%s twice in a snapshot", j.User)
				}
				v.users[j.User] = true
			}
			v.listing = len(m.Joins) == count
			// An empty snapshot of no one may be either: the next change
			// tells.
			v.either = count == 0
			if !v.listing && len(m.Joins) > 0 {
				bad(m, "a snapshot of %d members listing %d", count, len(m.Joins))
			}
		case !v.seen:
			bad(m, "a change before the first snapshot")
		case m.Joins == nil && m.Leaves == nil:
			if v.either {
				v.listing, v.either = false, false
			}
			if v.listing {
				bad(m, "a count alone in a listed topic")
			}
		case !v.listing && !v.either:
			bad(m, "joins or leaves in a counted topic")
		default:
			for _, j := range m.Joins {
				if v.users[j.User] {
					bad(m, "a join of %s, already listed", j.User)
				}
				v.users[j.User] = true
			}
			for _, l := range m.Leaves {
				if !v.users[l.User] {
					bad(m, "a leave of %s, not listed", l.User)
				}
				delete(v.users, l.User)
			}
			if len(v.users) != count {
				bad(m, "%d listed after a change, count %d", len(v.users), count)
			}
			v.listing, v.either = true, false
		}
		if !v.listing {
			clear(v.users)
		}
		v.seen, v.count = true, count
	}
	return v
}

// awaitPresence waits until what the client knows of topic's presence
// satisfies ok, and returns it; it fails the test if the conn ends or
// limit passes first.
func (c *wireClient) awaitPresence(topic string, limit time.Duration, what string, ok func(presenceView) bool) presenceView {
	c.t.Helper()
	start := time.Now()
	for {
		v := c.presence(topic)
		if ok(v) {
			return v
		}
		if err := c.ended(); err != nil {
			c.t.Fatalf("waiting for %s: the conn ended: %v\nreceived:\n%s", what, err, c.dump())
		}
		if time.Since(start) > limit {
			c.t.Fatalf("no %s within %v: %v\nreceived:\n%s", what, limit, v, c.dump())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// listedExactly matches a view that lists exactly users (sorted), with
// the count to match.
func listedExactly(users ...string) func(presenceView) bool {
	return func(v presenceView) bool {
		return v.listing && v.count == len(users) && slices.Equal(v.listed(), users)
	}
}

// checkPresence fails the test if a presence the client received, of any
// topic, breaks the protocol (see presence).
func (c *wireClient) checkPresence() {
	c.t.Helper()
	c.mu.Lock()
	var topics []string
	for _, m := range c.msgs {
		if m.Op == "presence" && !slices.Contains(topics, m.Topic) {
			topics = append(topics, m.Topic)
		}
	}
	c.mu.Unlock()
	for _, topic := range topics {
		if v := c.presence(topic); len(v.problems) > 0 {
			c.t.Errorf("presence of %s breaks the protocol:\n  %s\nreceived:\n%s", topic, strings.Join(v.problems, "\n  "), c.dump())
		}
	}
}

// close drops the conn, as a tab being closed does, and waits for the
// reader.
func (c *wireClient) close() {
	c.conn.CloseNow()
	c.cancel()
	<-c.done
}
