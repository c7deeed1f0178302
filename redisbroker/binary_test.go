package redisbroker_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// This file checks that a message keeps its type, text or binary, and its
// bytes across nodes sharing one Redis: topic messages live and resumed
// from the broker's history, direct messages live and from the broker's
// offline store, to Go clients and to raw peers.

// binFrame is one message as a receiver got it: its type and its bytes.
type binFrame struct {
	binary bool
	data   string
}

func (f binFrame) String() string {
	kind := "text"
	if f.binary {
		kind = "binary"
	}
	if len(f.data) > 40 {
		return fmt.Sprintf("%s %q… (%d bytes)", kind, f.data[:40], len(f.data))
	}
	return fmt.Sprintf("%s %q", kind, f.data)
}

// binFrames renders frames for failure messages.
func binFrames(fs []binFrame) string {
	s := make([]string, len(fs))
	for i, f := range fs {
		s[i] = f.String()
	}
	return "[" + strings.Join(s, ", ") + "]"
}

// framesOf returns the types and bytes of a Go client's messages.
func framesOf(msgs []tether.Message) []binFrame {
	out := make([]binFrame, len(msgs))
	for i, m := range msgs {
		out[i] = binFrame{m.Binary, string(m.Data)}
	}
	return out
}

// publishFrame publishes f on n: PublishBinary for binary, Publish for
// text.
func publishFrame(t testing.TB, n *hubNode, topic string, f binFrame) {
	t.Helper()
	var err error
	if f.binary {
		err = n.hub.PublishBinary(topic, []byte(f.data))
	} else {
		err = n.hub.Publish(topic, []byte(f.data))
	}
	if err != nil {
		t.Fatalf("%s: publish %v: %v", n.name, f, err)
	}
}

// sendFrame sends f to user on n: SendToUserBinary for binary,
// SendToUser for text.
func sendFrame(t testing.TB, n *hubNode, user string, f binFrame) {
	t.Helper()
	var err error
	if f.binary {
		err = n.hub.SendToUserBinary(user, []byte(f.data))
	} else {
		err = n.hub.SendToUser(user, []byte(f.data))
	}
	if err != nil {
		t.Fatalf("%s: send %v to %s: %v", n.name, f, user, err)
	}
}

// binInbox collects frames from a handler or a reader.
type binInbox struct {
	mu  sync.Mutex
	got []binFrame
}

func (in *binInbox) add(f binFrame) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.got = append(in.got, f)
}

func (in *binInbox) frames() []binFrame {
	in.mu.Lock()
	defer in.mu.Unlock()
	return slices.Clone(in.got)
}

// onDirect is a DialOption recording a Go client's direct messages, with
// their types, into in; given after dialRecorded's own, it replaces it.
func (in *binInbox) onDirect() tether.DialOption {
	return tether.OnMessage(func(_ *tether.Conn, m tether.Message) { in.add(binFrame{m.Binary, string(m.Data)}) })
}

// expectFrames waits until got returns at least len(want) frames, then,
// after a moment for anything extra to show, checks that they are want,
// types included.
func expectFrames(t testing.TB, who string, got func() []binFrame, want []binFrame) {
	t.Helper()
	start := time.Now()
	for len(got()) < len(want) {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("%s: %d messages after 10 s, want %d:\n got  %s\n want %s", who, len(got()), len(want), binFrames(got()), binFrames(want))
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // room for a duplicate to show up
	g := got()
	if len(g) != len(want) {
		t.Errorf("%s: %d messages, want %d:\n got  %s\n want %s", who, len(g), len(want), binFrames(g), binFrames(want))
		return
	}
	for i := range want {
		if g[i].binary != want[i].binary {
			t.Errorf("%s: message %d arrived with Binary=%v, want %v: got %v, want %v", who, i, g[i].binary, want[i].binary, g[i], want[i])
		} else if g[i].data != want[i].data {
			t.Errorf("%s: message %d is %v, want %v", who, i, g[i], want[i])
		}
	}
}

// rawPeer is a peer speaking no subprotocol, over coder/websocket, that
// records each WebSocket message it reads with its type.
type rawPeer struct {
	binInbox
	ws   *websocket.Conn
	done chan struct{}
}

// dialRaw connects a raw peer to url and reads in the background until
// the test ends.
func dialRaw(t testing.TB, url string) *rawPeer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		t.Fatalf("raw dial %s: %v", url, err)
	}
	if p := ws.Subprotocol(); p != "" {
		ws.CloseNow()
		t.Fatalf("raw dial %s: subprotocol %q, want none", url, p)
	}
	ws.SetReadLimit(-1)
	p := &rawPeer{ws: ws, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for {
			typ, data, err := ws.Read(context.Background())
			if err != nil {
				return
			}
			p.add(binFrame{typ == websocket.MessageBinary, string(data)})
		}
	}()
	t.Cleanup(func() {
		ws.CloseNow()
		<-p.done
	})
	return p
}

// binGate holds the handshakes of chosen users in a hub's auth, to keep
// their clients away for as long as a test needs.
type binGate struct {
	mu    sync.Mutex
	held  map[string]chan struct{}
	tries map[string]int // handshakes held, by user
}

func newBinGate(t testing.TB) *binGate {
	g := &binGate{held: map[string]chan struct{}{}, tries: map[string]int{}}
	t.Cleanup(g.releaseAll)
	return g
}

// option is the hub option that authenticates by the query parameter
// "user", as every node here does, after waiting while the user is held.
func (g *binGate) option() tether.HubOption {
	return tether.WithAuth(func(r *http.Request) (string, error) {
		user := r.URL.Query().Get("user")
		g.mu.Lock()
		ch := g.held[user]
		if ch != nil {
			g.tries[user]++
		}
		g.mu.Unlock()
		if ch != nil {
			select {
			case <-ch:
			case <-r.Context().Done():
			case <-time.After(20 * time.Second): // a safety net, not a timing
			}
		}
		return user, nil
	})
}

func (g *binGate) hold(users ...string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, u := range users {
		if g.held[u] == nil {
			g.held[u] = make(chan struct{})
		}
	}
}

func (g *binGate) release(users ...string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, u := range users {
		if ch := g.held[u]; ch != nil {
			close(ch)
			delete(g.held, u)
		}
	}
}

func (g *binGate) releaseAll() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for u, ch := range g.held {
		close(ch)
		delete(g.held, u)
	}
}

// heldTries returns how many handshakes of user were held.
func (g *binGate) heldTries(user string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.tries[user]
}

// binTopicFrames are published in the tests of topics: binary data with
// every byte that could be mistaken for framing or a tag (a leading 0x01,
// 0x00, 0x02, a newline, 0xff), binary data that is valid JSON or plain
// UTF-8 (kept binary only if the type travels), text that is not JSON,
// text that starts with a tag byte, text with a newline, a JSON value,
// empty text and binary, and a binary message of 100 KB.
func binTopicFrames() []binFrame {
	return []binFrame{
		{true, "\x01\x00\x01\x02\n\xff"},
		{false, "plain text"},
		{false, "\x01 text that starts with a tag byte"},
		{true, "\x00\x01\x02\n\xff"},
		{false, "\x02"},
		{false, `{"json": [1, 2], "s": "x"}`},
		{true, `{"looks":"like JSON"}`},
		{true, "looks like text"},
		{false, "two\nlines"},
		{false, `"a JSON string"`},
		{true, ""},
		{false, ""},
		{true, string(bytes.Repeat([]byte{0x01, 0, 0x02, '\n', 0xff}, 20000))},
	}
}

// TestBinaryPublishAcrossNodes: what node A publishes reaches node B's
// subscribers with its type and bytes. A Go client on B gets
// Hub.PublishBinary's data as a Message with Binary set, and text that is
// not JSON (text starting with a tag byte too) or a JSON value with Binary
// false, each byte for byte, in order, contiguous, without a resync; a raw
// peer on B, subscribed by the server, gets a binary WebSocket message for
// each binary publication and a text message for each text one, byte for
// byte. A Go client on A, the publisher's own node, gets the same.
func TestBinaryPublishAcrossNodes(t *testing.T) {
	const topic = "t"
	srv, _ := startRedis(t)
	var hubB atomic.Pointer[tether.Hub]
	rawSubscribed := make(chan error, 1)
	a := startHub(t, "A", srv.Addr())
	b := startHub(t, "B", srv.Addr(), tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
		if c.Subprotocol() == "" {
			rawSubscribed <- hubB.Load().Subscribe(c, topic)
		}
	}}))
	hubB.Store(b.hub)

	onB, recB := dialRecorded(t, b.url("reader-b"))
	subscribe(t, onB, topic, recB)
	onA, recA := dialRecorded(t, a.url("reader-a"))
	subscribe(t, onA, topic, recA)
	raw := dialRaw(t, b.url("raw"))
	select {
	case err := <-rawSubscribed:
		if err != nil {
			t.Fatalf("B: Subscribe of the raw peer: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("B never subscribed the raw peer")
	}

	want := binTopicFrames()
	for _, f := range want {
		publishFrame(t, a, topic, f)
	}

	expectFrames(t, "Go client on B", func() []binFrame { return framesOf(recB.messages()) }, want)
	expectFrames(t, "raw peer on B", raw.frames, want)
	expectFrames(t, "Go client on A", func() []binFrame { return framesOf(recA.messages()) }, want)
	for _, c := range []struct {
		name string
		r    *recorder
	}{{"Go client on B", recB}, {"Go client on A", recA}} {
		checkContiguous(t, c.name, c.r.messages())
		if n := c.r.resyncCount(); n != 0 {
			t.Errorf("%s: %d resyncs, want none", c.name, n)
		}
	}
	// The same message at the same position on both nodes.
	ma, mb := recA.messages(), recB.messages()
	for i := range min(len(ma), len(mb)) {
		if ma[i].Position != mb[i].Position {
			t.Errorf("message %d: at %v on A, %v on B", i, ma[i].Position, mb[i].Position)
			break
		}
	}
}

// TestBinaryResumeAcrossNodes: clients that were away while node B
// published binary and text messages get them when they come back,
// replayed from the broker's history with their types and bytes, in
// order, contiguous with what they had, with no resync. One client was
// subscribed on node A and comes back to A (which holds the topic for
// another subscriber throughout); the other was on node C, which stops,
// and comes back to B, which holds no subscriber of the topic. Their
// handshakes are held until every message is published, so that none can
// come live. The subscriber that stayed on A got them live, with their
// types too.
func TestBinaryResumeAcrossNodes(t *testing.T) {
	const topic = "t"
	srv, _ := startRedis(t)
	gate := newBinGate(t)
	var (
		mu      sync.Mutex
		serverA = map[string]*tether.Conn{} // A's conns by user
	)
	a := startHub(t, "A", srv.Addr(), gate.option(), tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
		mu.Lock()
		serverA[c.UserID()] = c
		mu.Unlock()
	}}))
	b := startHub(t, "B", srv.Addr(), gate.option())
	c := startHub(t, "C", srv.Addr(), gate.option())

	stayCl, stay := dialRecorded(t, a.url("stay"))
	subscribe(t, stayCl, topic, stay)
	c1, r1 := dialRecorded(t, a.url("c1"))
	subscribe(t, c1, topic, r1)
	c2, r2 := dialRecorded(t, c.url("c2"), tether.WithFallbackURLs(b.url("c2")))
	subscribe(t, c2, topic, r2)

	// A first message, from B, gives each a position to resume from.
	first := binFrame{true, "\x01first\x00"}
	publishFrame(t, b, topic, first)
	for _, x := range []struct {
		name string
		r    *recorder
	}{{"stay", stay}, {"c1", r1}, {"c2", r2}} {
		x.r.awaitCount(t, 1, 10*time.Second, x.name+" before the drop")
	}

	// Away: c1's conn on A is dropped, C stops; their handshakes, to A
	// and to B, are held.
	gate.hold("c1", "c2")
	mu.Lock()
	sc := serverA["c1"]
	mu.Unlock()
	if sc == nil {
		t.Fatal("A saw no conn of c1")
	}
	sc.CloseNow()
	c.stop()
	waitUntil(t, 10*time.Second, "c1 to try A again, and be held", func() bool { return gate.heldTries("c1") > 0 })
	waitUntil(t, 10*time.Second, "c2 to try B, and be held", func() bool { return gate.heldTries("c2") > 0 })
	if s1, s2 := c1.State(), c2.State(); s1 == tether.Connected || s2 == tether.Connected {
		t.Fatalf("while held: c1 %v, c2 %v, want neither connected", s1, s2)
	}

	missed := []binFrame{
		{true, "\x01\x02\x00"},
		{false, "plain text"},
		{false, "\x01 text that starts with a tag byte"},
		{false, `{"json":true}`},
		{true, "\n\n\xff"},
		{true, `"binary that is JSON"`},
		{false, "\x02"},
		{true, "\x02"},
	}
	for _, f := range missed {
		publishFrame(t, b, topic, f)
	}
	want := append([]binFrame{first}, missed...)
	// Every message is in Redis and through to A before anyone returns.
	expectFrames(t, "stay (on A throughout)", func() []binFrame { return framesOf(stay.messages()) }, want)
	if n := len(r1.messages()) + len(r2.messages()); n != 2 {
		t.Fatalf("the clients away got %d messages while held, want only the first each", n)
	}

	gate.release("c1", "c2")
	expectFrames(t, "c1 (back to A)", func() []binFrame { return framesOf(r1.messages()) }, want)
	expectFrames(t, "c2 (from C to B)", func() []binFrame { return framesOf(r2.messages()) }, want)
	for _, x := range []struct {
		name string
		cl   *tether.Client
		r    *recorder
	}{{"stay", stayCl, stay}, {"c1", c1, r1}, {"c2", c2, r2}} {
		checkContiguous(t, x.name, x.r.messages())
		if n := x.r.resyncCount(); n != 0 {
			t.Errorf("%s: %d resyncs, want none: the history had every message", x.name, n)
		}
		if s := x.cl.State(); s != tether.Connected {
			t.Errorf("%s: state %v, want connected", x.name, s)
		}
	}
	for _, x := range []struct {
		name string
		r    *recorder
	}{{"c1", r1}, {"c2", r2}} {
		x.r.mu.Lock()
		states := slices.Clone(x.r.states)
		x.r.mu.Unlock()
		if !slices.Contains(states, tether.Reconnecting) {
			t.Errorf("%s: states %v, want a reconnection", x.name, states)
		}
	}
	if la, lb := a.hub.Len(), b.hub.Len(); la != 2 || lb != 1 {
		t.Errorf("conns: A %d (want stay and c1), B %d (want c2)", la, lb)
	}
}

// TestBinarySendToUserAcrossNodes: a direct message sent on node A keeps
// its type to a user connected only on node B: SendToUserBinary reaches
// the user's Go client's OnMessage with Binary set, SendToUser's text and
// JSON with Binary false, byte for byte and in order; a raw peer on B gets
// binary and text WebSocket messages. Sent to users connected nowhere,
// from A and B, they are kept by the broker's offline store and delivered
// with their types, in order, when the users connect to B; once delivered
// they are not kept any more.
func TestBinarySendToUserAcrossNodes(t *testing.T) {
	srv, _ := startRedis(t)
	a := startHub(t, "A", srv.Addr())
	b := startHub(t, "B", srv.Addr())

	msgs := []binFrame{
		{true, "\x01\x00\x01\x02\n\xff"},
		{false, "plain text"},
		{false, "\x01 text that starts with a tag byte"},
		{true, `{"looks":"like JSON"}`},
		{false, `{"json": [1, 2]}`},
		{true, ""},
	}

	// Online on B only.
	bob := &binInbox{}
	dialRecorded(t, b.url("bob"), bob.onDirect())
	rawDan := dialRaw(t, b.url("dan"))
	for _, u := range []string{"bob", "dan"} {
		waitUntil(t, 5*time.Second, "A to see "+u+" online", func() bool { return a.hub.Online(u) })
	}
	if a.hub.Len() != 0 {
		t.Fatalf("A has %d conns, want none: the users must be on B only", a.hub.Len())
	}
	for _, f := range msgs {
		sendFrame(t, a, "bob", f)
		sendFrame(t, a, "dan", f)
	}
	expectFrames(t, "bob's Go client on B", bob.frames, msgs)
	expectFrames(t, "dan, a raw peer on B", rawDan.frames, msgs)

	// Offline: kept in Redis, sent from both nodes, delivered on connect.
	for _, u := range []string{"erin", "fay"} {
		if a.hub.Online(u) || b.hub.Online(u) {
			t.Fatalf("%s online before connecting", u)
		}
	}
	for i, f := range msgs {
		n := []*hubNode{a, b}[i%2]
		sendFrame(t, n, "erin", f)
		sendFrame(t, n, "fay", f)
	}
	erin := &binInbox{}
	erinCl, _ := dialRecorded(t, b.url("erin"), erin.onDirect())
	expectFrames(t, "erin's Go client, from the offline store", erin.frames, msgs)
	rawFay := dialRaw(t, b.url("fay"))
	expectFrames(t, "fay, a raw peer, from the offline store", rawFay.frames, msgs)

	// Delivered, so no longer kept: erin connecting again gets only what
	// is sent from now on.
	erinCl.Close()
	waitUntil(t, 5*time.Second, "erin offline", func() bool { return !a.hub.Online("erin") })
	after := binFrame{true, "\xffafter"}
	sendFrame(t, a, "erin", after)
	erinAgain := &binInbox{}
	dialRecorded(t, a.url("erin"), erinAgain.onDirect())
	expectFrames(t, "erin connecting again", erinAgain.frames, []binFrame{after})
}
