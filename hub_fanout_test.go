package tether_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/internal/testpeer"
)

// fanClient is a light protocol v1 client for tests with many conns or many
// messages: a testpeer.Peer that queues nothing and hands every line to a
// callback instead, so a thousand of them cost little memory, and a
// callback can time a message the moment it is read. The peer counts the
// frames and lines it reads.
type fanClient struct {
	*testpeer.Peer
	session string
}

type fanOpts struct {
	header http.Header
	topics []string // subscribed to, in one frame, before dialFan returns
	// gate, if set, holds the reader back, after the handshake, until it is
	// closed: until then the client reads nothing and its TCP buffers fill.
	gate chan struct{}
	// onLine gets every line read after the handshake, on the reader.
	onLine func(line []byte)
}

// fanLine is what the handshake and most callbacks read of a line.
type fanLine struct {
	Op      string `json:"op"`
	ID      string `json:"id"`
	Session string `json:"session"`
	Code    string `json:"code"`
	Reason  string `json:"reason"`
}

// dialFan connects a protocol v1 client, reads its welcome, subscribes it
// to o.topics and waits for the acks. It returns an error rather than
// failing the test, so that it can run on any goroutine; the caller closes
// the client.
func dialFan(url string, o fanOpts) (*fanClient, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c := &fanClient{}
	var hsErr error // the handshake's
	po := testpeer.Options{
		Header:       o.header,
		Subprotocols: []string{tether.Subprotocol},
		Handshake: func(ctx context.Context, ws *websocket.Conn) error {
			c.session, hsErr = fanHandshake(ctx, ws, o.topics)
			return hsErr
		},
		Gate:   o.gate,
		Lines:  true,
		Buffer: -1,
	}
	if o.onLine != nil {
		po.OnLine = func(line []byte) error { o.onLine(line); return nil }
	}
	p, resp, err := testpeer.Dial(ctx, url, po)
	switch {
	case hsErr != nil:
		return nil, hsErr
	case err != nil && resp != nil:
		return nil, fmt.Errorf("dial: %w (HTTP %d)", err, resp.StatusCode)
	case err != nil:
		return nil, fmt.Errorf("dial: %w", err)
	}
	c.Peer = p
	return c, nil
}

// fanHandshake reads the welcome, subscribes to topics and waits for the
// acks; it returns the session.
func fanHandshake(ctx context.Context, ws *websocket.Conn, topics []string) (string, error) {
	_, data, err := ws.Read(ctx)
	if err != nil {
		return "", fmt.Errorf("read welcome: %w", err)
	}
	var w fanLine
	if err := json.Unmarshal(data, &w); err != nil || w.Op != "welcome" || w.Session == "" {
		return "", fmt.Errorf("first frame %q, want a welcome", data)
	}
	if len(topics) == 0 {
		return w.Session, nil
	}
	// Several requests in one frame, as PROTOCOL.md section 2 allows.
	var req []byte
	for i, topic := range topics {
		if i > 0 {
			req = append(req, '\n')
		}
		req = fmt.Appendf(req, `{"op":"sub","topic":%s,"id":"%d"}`, quote(topic), i)
	}
	if err := ws.Write(ctx, websocket.MessageText, req); err != nil {
		return "", fmt.Errorf("write subs: %w", err)
	}
	acked := 0
	for acked < len(topics) {
		_, data, err := ws.Read(ctx)
		if err != nil {
			return "", fmt.Errorf("read acks: %w", err)
		}
		for line := range bytes.SplitSeq(data, []byte("\n")) {
			if len(line) == 0 {
				continue
			}
			var m fanLine
			if err := json.Unmarshal(line, &m); err != nil {
				return "", fmt.Errorf("line %q: %w", line, err)
			}
			switch m.Op {
			case "presence":
			case "ack":
				if m.ID != strconv.Itoa(acked) {
					return "", fmt.Errorf("ack %q, want %d", m.ID, acked)
				}
				acked++
			default:
				return "", fmt.Errorf("got %s while waiting for acks", line)
			}
		}
	}
	return w.Session, nil
}

// dialFans dials n clients concurrently, with at most workers dials in
// flight; opts(i) configures the i-th. They are closed when the test ends.
func dialFans(t testing.TB, url string, n, workers int, opts func(i int) fanOpts) []*fanClient {
	t.Helper()
	clients := make([]*fanClient, n)
	t.Cleanup(func() {
		for _, c := range clients {
			if c != nil {
				c.Close()
			}
		}
	})
	var (
		wg      sync.WaitGroup
		next    atomic.Int64
		failed  atomic.Bool
		errOnce sync.Once
		first   error
	)
	for range workers {
		wg.Go(func() {
			for !failed.Load() {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				c, err := dialFan(url, opts(i))
				if err != nil {
					errOnce.Do(func() { first = fmt.Errorf("client %d: %w", i, err) })
					failed.Store(true)
					return
				}
				clients[i] = c
			}
		})
	}
	wg.Wait()
	if first != nil {
		t.Fatal(first)
	}
	return clients
}

// fanState checks what one client of TestHubFanoutThousandConns receives.
type fanState struct {
	mu       sync.Mutex
	topics   map[string]*fanTopic
	finished int
	errs     []string
	complete chan struct{} // closed once every topic's end marker is in
}

type fanTopic struct {
	epoch string
	seq   uint64 // last seq seen; 0 before the first
	lastN []int  // per publisher, the last n seen
	count int    // messages before the end marker
	ended bool
}

func newFanState(topics []string, publishers int) *fanState {
	st := &fanState{topics: make(map[string]*fanTopic), complete: make(chan struct{})}
	for _, name := range topics {
		ft := &fanTopic{lastN: make([]int, publishers)}
		for p := range ft.lastN {
			ft.lastN[p] = -1
		}
		st.topics[name] = ft
	}
	return st
}

func (st *fanState) failf(format string, args ...any) {
	if len(st.errs) < 5 {
		st.errs = append(st.errs, fmt.Sprintf(format, args...))
	}
}

// fanMsg is a msg line as TestHubFanoutThousandConns reads it.
type fanMsg struct {
	Op    string `json:"op"`
	Topic string `json:"topic"`
	Epoch string `json:"epoch"`
	Seq   uint64 `json:"seq"`
	Data  struct {
		P int `json:"p"`
		N int `json:"n"`
	} `json:"data"`
}

func (st *fanState) onLine(line []byte) {
	var m fanMsg
	if err := json.Unmarshal(line, &m); err != nil {
		st.mu.Lock()
		st.failf("line %q: %v", line, err)
		st.mu.Unlock()
		return
	}
	if m.Op != "msg" {
		return // presence
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	ft := st.topics[m.Topic]
	switch {
	case ft == nil:
		st.failf("message of topic %q, not subscribed: %s", m.Topic, line)
		return
	case ft.ended:
		st.failf("message after the end marker: %s", line)
		return
	case ft.seq == 0 && m.Seq != 1:
		// Subscribed before the first publication: it sees them all.
		st.failf("first message %s, want seq 1", line)
	case ft.seq != 0 && m.Seq != ft.seq+1:
		st.failf("seq %d after %d: %s", m.Seq, ft.seq, line)
	case ft.seq != 0 && m.Epoch != ft.epoch:
		st.failf("epoch %q after %q", m.Epoch, ft.epoch)
	}
	ft.seq, ft.epoch = m.Seq, m.Epoch
	if m.Data.P < 0 {
		ft.ended = true
		st.finished++
		if st.finished == len(st.topics) {
			close(st.complete)
		}
		return
	}
	if m.Data.P >= len(ft.lastN) {
		st.failf("unknown publisher: %s", line)
		return
	}
	if want := ft.lastN[m.Data.P] + 1; m.Data.N != want {
		st.failf("publisher %d: n %d, want %d", m.Data.P, m.Data.N, want)
	}
	ft.lastN[m.Data.P] = m.Data.N
	ft.count++
}

// TestHubFanoutThousandConns publishes from two goroutines per topic to
// 1,000 protocol v1 conns, each on one of 4 topics or on all of them, and
// checks that every conn gets every message of its topics exactly once and
// in order, and that the writers coalesced messages into frames.
func TestHubFanoutThousandConns(t *testing.T) {
	const (
		conns        = 1000
		dialers      = 50
		nTopics      = 4
		pubsPerTopic = 2
		perPub       = 50 // messages per publisher
	)
	// The queue holds all a conn gets (4 × 101 messages at most): this
	// test is about fan-out, not overflow.
	s := newHubServer(t, tether.WithLimits(tether.Limits{SendQueue: 1024, SendQueueBytes: 1 << 20}))
	var topics []string
	for i := range nTopics {
		topics = append(topics, "fan:"+strconv.Itoa(i))
	}
	// Client i takes topic i%5, or all of them when i%5 == 4: each topic
	// has 400 subscribers, 200 of them on every topic.
	topicsOf := func(i int) []string {
		if k := i % (nTopics + 1); k < nTopics {
			return topics[k : k+1]
		}
		return topics
	}
	states := make([]*fanState, conns)
	deliveries := 0
	for i := range states {
		states[i] = newFanState(topicsOf(i), pubsPerTopic)
		deliveries += len(topicsOf(i)) * pubsPerTopic * perPub
	}

	start := time.Now()
	clients := dialFans(t, s.url(), conns, dialers, func(i int) fanOpts {
		return fanOpts{topics: topicsOf(i), onLine: states[i].onLine}
	})
	t.Logf("dialled and subscribed %d conns in %v", conns, time.Since(start).Round(time.Millisecond))
	if n := s.hub.Len(); n != conns {
		t.Fatalf("Len() = %d, want %d", n, conns)
	}

	start = time.Now()
	var wg sync.WaitGroup
	pubErrs := make(chan error, nTopics*pubsPerTopic)
	for _, topic := range topics {
		for p := range pubsPerTopic {
			wg.Go(func() {
				for n := range perPub {
					if err := s.hub.Publish(topic, fmt.Appendf(nil, `{"p":%d,"n":%d}`, p, n)); err != nil {
						pubErrs <- fmt.Errorf("Publish(%s, p %d, n %d): %w", topic, p, n, err)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	close(pubErrs)
	for err := range pubErrs {
		t.Fatal(err)
	}
	// One end marker per topic, behind everything else.
	for _, topic := range topics {
		if err := s.hub.Publish(topic, []byte(`{"p":-1,"n":-1}`)); err != nil {
			t.Fatal(err)
		}
	}
	published := time.Since(start)

	deadline := time.After(60 * time.Second)
	for i, st := range states {
		select {
		case <-st.complete:
		case <-deadline:
			incomplete := 0
			for _, st := range states {
				select {
				case <-st.complete:
				default:
					incomplete++
				}
			}
			st.mu.Lock()
			t.Fatalf("after 60 s, %d of %d conns still miss messages; conn %d has finished %d of %d topics, errors %q (hub %+v)",
				incomplete, conns, i, st.finished, len(st.topics), st.errs, s.hub.Stats())
		}
	}
	elapsed := time.Since(start)

	bad := 0
	for i, st := range states {
		st.mu.Lock()
		for name, ft := range st.topics {
			if ft.count != pubsPerTopic*perPub {
				st.failf("topic %s: %d messages, want %d", name, ft.count, pubsPerTopic*perPub)
			}
			for p, n := range ft.lastN {
				if n != perPub-1 {
					st.failf("topic %s: publisher %d's last n %d, want %d", name, p, n, perPub-1)
				}
			}
		}
		if len(st.errs) > 0 {
			bad++
			if bad <= 5 {
				t.Errorf("conn %d (topics %v): %s", i, topicsOf(i), strings.Join(st.errs, "; "))
			}
		}
		st.mu.Unlock()
	}
	if bad > 0 {
		t.Errorf("%d of %d conns got a wrong stream", bad, conns)
	}

	var frames, lines, most int64
	for _, c := range clients {
		frames += c.Frames()
		lines += c.Lines()
		most = max(most, c.MaxLines())
	}
	t.Logf("%d deliveries in %v (publishing took %v): %.0f/s; %d lines in %d frames (%.2f per frame, at most %d)",
		deliveries, elapsed.Round(time.Millisecond), published.Round(time.Millisecond),
		float64(deliveries)/elapsed.Seconds(), lines, frames, float64(lines)/float64(max(frames, 1)), most)
	if most < 2 {
		t.Errorf("no frame carried more than one message: the writers never coalesced")
	}

	st := s.hub.Stats()
	if want := uint64(nTopics * (pubsPerTopic*perPub + 1)); st.Published != want {
		t.Errorf("Stats().Published = %d, want %d", st.Published, want)
	}
	if st.Conns != conns || st.Topics != nTopics || st.Evictions != 0 || st.Drops != 0 || st.Disconnects != 0 {
		t.Errorf("Stats() = %+v, want %d conns on %d topics, no eviction, drop or disconnect", st, conns, nTopics)
	}
}

// TestHubFanoutRawPeers checks raw mode: no welcome, topics picked by the
// application in Observer.Connect, data as it was published (no envelope) while a
// v1 subscriber of the same topic gets a msg, and the raw peer's own
// messages passed to OnMessage untouched.
func TestHubFanoutRawPeers(t *testing.T) {
	var hub atomic.Pointer[tether.Hub]
	connected := make(chan connectEvent, 10)
	received := make(chan rawInbound, 10)
	s := newHubServer(t,
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			var err error
			if c.Subprotocol() == "" {
				err = hub.Load().Subscribe(c, "news")
			}
			connected <- connectEvent{c, err}
		}}),
		tether.OnMessage(func(c *tether.Conn, m tether.Message) {
			received <- rawInbound{c, m}
		}))
	hub.Store(s.hub)

	raw := dialClient(t, s.url(), clientOpts{raw: true})
	rc := nextConn(t, connected)
	if rc.Subprotocol() != "" {
		t.Fatalf("raw conn negotiated %q", rc.Subprotocol())
	}
	if got := rc.Topics(); !slices.Equal(got, []string{"news"}) {
		t.Fatalf("raw conn's topics %q, want [news]", got)
	}
	v1 := dialClient(t, s.url(), clientOpts{})
	v1.welcome()
	if c := nextConn(t, connected); c.Subprotocol() != tether.Subprotocol || len(c.Topics()) != 0 {
		t.Fatalf("v1 conn: subprotocol %q, topics %q", c.Subprotocol(), c.Topics())
	}
	v1.subscribe("news")

	// Spaces, escapes and non-ASCII: nothing a byte-for-byte copy may touch.
	data := `{ "text" : "h\u00e9llo wörld" , "n" : [1, 2.50, -3e2], "ok": true }`
	if err := s.hub.Publish("news", []byte(data)); err != nil {
		t.Fatal(err)
	}
	if got := raw.next(5 * time.Second); got.line != data {
		t.Fatalf("raw peer's first message %q, want the published data %q byte for byte (and no welcome)", got.line, data)
	}
	m := v1.expect("msg")
	if m.Topic != "news" || m.Seq != 1 || m.Epoch == "" || string(m.Data) != data {
		t.Fatalf("v1 peer got %s, want a msg of news, seq 1, with data %s", m.line, data)
	}

	if err := s.hub.Publish("news", []byte("not \xffUTF-8")); !errors.Is(err, tether.ErrInvalidUTF8) {
		t.Fatalf("Publish(invalid UTF-8) = %v, want ErrInvalidUTF8", err)
	}
	if err := s.hub.Publish("news", []byte("{\"a\":\"\xc3\"}")); !errors.Is(err, tether.ErrInvalidUTF8) {
		t.Fatalf("Publish(JSON with a truncated UTF-8 sequence) = %v, want ErrInvalidUTF8", err)
	}
	// The refused ones went nowhere and took no seq.
	if err := s.hub.Publish("news", []byte(`"second"`)); err != nil {
		t.Fatal(err)
	}
	if got := raw.next(5 * time.Second); got.line != `"second"` {
		t.Fatalf("raw peer got %q, want %q", got.line, `"second"`)
	}
	if m := v1.expect("msg"); m.Seq != 2 || string(m.Data) != `"second"` {
		t.Fatalf("v1 peer got %s, want seq 2", m.line)
	}

	// What a raw peer sends reaches OnMessage untouched, text or binary.
	text := "plain text, not JSON\n  with a newline, a tab\tand ✓ "
	bin := []byte{0, 0xff, 0xfe, '\n', 'x', 0x80}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := raw.Conn().Write(ctx, websocket.MessageText, []byte(text)); err != nil {
		t.Fatal(err)
	}
	if err := raw.Conn().Write(ctx, websocket.MessageBinary, bin); err != nil {
		t.Fatal(err)
	}
	for _, want := range []tether.Message{{Data: []byte(text)}, {Data: bin, Binary: true}} {
		select {
		case got := <-received:
			if got.c != rc || got.m.Binary != want.Binary || !bytes.Equal(got.m.Data, want.Data) {
				t.Fatalf("OnMessage(%s, %q binary %v), want (%s, %q binary %v)",
					got.c.ID(), got.m.Data, got.m.Binary, rc.ID(), want.Data, want.Binary)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("OnMessage not called with %q", want.Data)
		}
	}
	raw.quiet(50 * time.Millisecond) // no error message or echo for a raw peer
}

// TestHubFanoutRawPeerMultilineUntouched publishes, broadcasts and sends
// JSON that spans lines. A v1 peer must get it on one line, but a raw peer
// is promised the data "as it is" (Hub.Publish, Hub.Broadcast) and
// "untouched" (PROTOCOL.md section 1).
func TestHubFanoutRawPeerMultilineUntouched(t *testing.T) {
	var hub atomic.Pointer[tether.Hub]
	connected := make(chan connectEvent, 10)
	s := newHubServer(t,
		tether.WithAuth(func(r *http.Request) (string, error) { return r.Header.Get("X-User"), nil }),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			connected <- connectEvent{c, hub.Load().Subscribe(c, "news")}
		}}))
	hub.Store(s.hub)
	raw := dialClient(t, s.url(), clientOpts{raw: true, header: http.Header{"X-User": {"ann"}}})
	nextConn(t, connected)
	v1 := dialClient(t, s.url(), clientOpts{})
	v1.welcome()
	nextConn(t, connected)

	data := "{\n  \"text\": \"hi\",\n  \"n\": [\n    1,\n    2\n  ]\n}\n"
	compact := `{"text":"hi","n":[1,2]}`
	for _, send := range []struct {
		name string
		f    func([]byte) error
	}{
		{"Publish", func(b []byte) error { return s.hub.Publish("news", b) }},
		{"Broadcast", s.hub.Broadcast},
		{"SendToUser", func(b []byte) error { return s.hub.SendToUser("ann", b) }},
	} {
		if err := send.f([]byte(data)); err != nil {
			t.Fatalf("%s: %v", send.name, err)
		}
		if got := raw.next(5 * time.Second); got.line != data {
			t.Errorf("%s: raw peer got %q, want the data as it is, %q", send.name, got.line, data)
		}
		if send.name == "SendToUser" {
			continue // the v1 client is anonymous
		}
		if m := v1.expect("msg"); string(m.Data) != compact {
			t.Errorf("%s: v1 peer got %s, want data %s on one line", send.name, m.line, compact)
		}
	}
}

type rawInbound struct {
	c *tether.Conn
	m tether.Message
}

// connectEvent is an Observer.Connect call, and how its Hub.Subscribe went.
type connectEvent struct {
	c   *tether.Conn
	err error
}

func nextConn(t *testing.T, ch chan connectEvent) *tether.Conn {
	t.Helper()
	select {
	case e := <-ch:
		if e.err != nil {
			t.Fatalf("Subscribe in OnConnect: %v", e.err)
		}
		return e.c
	case <-time.After(5 * time.Second):
		t.Fatal("OnConnect not called within 5 s")
	}
	return nil
}

// TestHubFanoutDirect covers Broadcast, SendToUser, Conn, UserID and Len.
func TestHubFanoutDirect(t *testing.T) {
	s := newHubServer(t, tether.WithAuth(func(r *http.Request) (string, error) {
		if u := r.Header.Get("X-User"); u != "" {
			return u, nil
		}
		return r.URL.Query().Get("user"), nil // "" is anonymous
	}))
	phone := dialClient(t, s.url(), clientOpts{header: http.Header{"X-User": {"alice"}}})
	laptop := dialClient(t, s.url()+"?user=alice", clientOpts{})
	bob := dialClient(t, s.url()+"?user=bob", clientOpts{})
	raw := dialClient(t, s.url(), clientOpts{raw: true}) // anonymous
	sessions := map[*client]string{}
	for c, user := range map[*client]string{phone: "alice", laptop: "alice", bob: "bob"} {
		w := c.welcome()
		sessions[c] = w.Session
		conn := s.hub.Conn(w.Session)
		if conn == nil {
			t.Fatalf("Conn(%q) = nil for %s's conn", w.Session, user)
		}
		if conn.ID() != w.Session || conn.UserID() != user || conn.Subprotocol() != tether.Subprotocol {
			t.Fatalf("Conn(%q): ID %q, UserID %q, subprotocol %q; want %s's v1 conn", w.Session, conn.ID(), conn.UserID(), conn.Subprotocol(), user)
		}
	}
	if s.hub.Conn("no-such-conn") != nil {
		t.Fatal("Conn of an unknown ID is not nil")
	}
	// The raw conn may still be between its 101 and its registration.
	waitFor(t, 5*time.Second, "Len() == 4", func() bool { return s.hub.Len() == 4 })
	if !s.hub.Online("alice") || !s.hub.Online("bob") || s.hub.Online("carol") {
		t.Fatal("Online: want alice and bob, not carol")
	}

	// Broadcast: a direct msg (no topic, epoch or seq) to v1, data as is to raw.
	if err := s.hub.Broadcast([]byte(`{"all": 1}`)); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*client{phone, laptop, bob} {
		m := c.expect("msg")
		var fields map[string]json.RawMessage
		if err := json.Unmarshal([]byte(m.line), &fields); err != nil {
			t.Fatal(err)
		}
		if len(fields) != 2 || string(fields["op"]) != `"msg"` || string(fields["data"]) != `{"all": 1}` {
			t.Fatalf("broadcast reached a v1 peer as %s, want {\"op\":\"msg\",\"data\":{\"all\": 1}}", m.line)
		}
	}
	if got := raw.next(5 * time.Second); got.line != `{"all": 1}` {
		t.Fatalf("broadcast reached the raw peer as %q", got.line)
	}
	if err := s.hub.Broadcast([]byte("{oops\xff")); !errors.Is(err, tether.ErrInvalidUTF8) {
		t.Fatalf("Broadcast(invalid UTF-8) = %v, want ErrInvalidUTF8", err)
	}

	// SendToUser reaches both of alice's devices and nobody else. The
	// broadcast that follows it is the next thing everybody else gets:
	// a conn's messages keep their order.
	if err := s.hub.SendToUser("alice", []byte(`{"for":"alice"}`)); err != nil {
		t.Fatal(err)
	}
	if err := s.hub.Broadcast([]byte(`"marker"`)); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*client{phone, laptop} {
		if m := c.expect("msg"); string(m.Data) != `{"for":"alice"}` || m.Topic != "" || m.Seq != 0 {
			t.Fatalf("alice's device got %s, want her direct message", m.line)
		}
		if m := c.expect("msg"); string(m.Data) != `"marker"` {
			t.Fatalf("alice's device got %s, want the marker", m.line)
		}
	}
	if m := bob.expect("msg"); string(m.Data) != `"marker"` {
		t.Fatalf("bob got %s, want the marker (alice's message is not for him)", m.line)
	}
	if got := raw.next(5 * time.Second); got.line != `"marker"` {
		t.Fatalf("the anonymous raw peer got %q, want the marker", got.line)
	}
	if err := s.hub.SendToUser("bob", []byte(`{"for":"bob"}`)); err != nil {
		t.Fatal(err)
	}
	if m := bob.expect("msg"); string(m.Data) != `{"for":"bob"}` {
		t.Fatalf("bob got %s", m.line)
	}

	// Len follows conns as they leave.
	laptop.Close()
	waitFor(t, 5*time.Second, "Len() == 3 after a close", func() bool { return s.hub.Len() == 3 })
	if s.hub.Conn(sessions[laptop]) != nil {
		t.Fatal("Conn of a closed conn is not nil")
	}
	if !s.hub.Online("alice") {
		t.Fatal("alice offline with her phone still connected")
	}
	if err := s.hub.SendToUser("alice", []byte(`2`)); err != nil {
		t.Fatal(err)
	}
	if m := phone.expect("msg"); string(m.Data) != `2` {
		t.Fatalf("alice's phone got %s", m.line)
	}
	phone.Close()
	bob.Close()
	raw.Close()
	waitFor(t, 5*time.Second, "Len() == 0 after every close", func() bool { return s.hub.Len() == 0 })
	if s.hub.Online("alice") {
		t.Fatal("alice online with no conn")
	}
}

// slowMsg is a msg line as the slow-consumer tests read it.
type slowMsg struct {
	Seq uint64
	I   int   // the data's "i"
	TS  int64 // the data's "t": when it was published, in Unix ns
}

// parseSlowMsg reads a msg line whose data is {"i":…,"t":…,"pad":"…"}
// without scanning its padding, so that twenty readers keep up with
// megabytes under the race detector: ok is false for another op. It
// relies on the server writing op first, as PROTOCOL.md says it does,
// and on the padding holding no quote.
func parseSlowMsg(line []byte) (m slowMsg, ok bool, err error) {
	if !bytes.HasPrefix(line, []byte(`{"op":"msg",`)) {
		return m, false, nil
	}
	num := func(key string) (int64, error) {
		i := bytes.Index(line, []byte(key))
		if i < 0 {
			return 0, fmt.Errorf("no %s in %.120q", key, line)
		}
		rest := line[i+len(key):]
		j := bytes.IndexAny(rest, ",}")
		if j < 0 {
			return 0, fmt.Errorf("bad %s in %.120q", key, line)
		}
		return strconv.ParseInt(string(rest[:j]), 10, 64)
	}
	seq, err1 := num(`"seq":`)
	i, err2 := num(`"data":{"i":`)
	ts, err3 := num(`,"t":`)
	if err := errors.Join(err1, err2, err3); err != nil {
		return m, true, err
	}
	return slowMsg{Seq: uint64(seq), I: int(i), TS: ts}, true, nil
}

// healthyReader checks, for one reading client, that message i arrives
// i-th, and times each from its publication.
type healthyReader struct {
	recv   atomic.Int64 // messages received
	notify chan struct{}

	mu   sync.Mutex
	seq  uint64
	lat  []time.Duration
	errs []string
}

func (h *healthyReader) onLine(line []byte) {
	now := time.Now()
	m, ok, err := parseSlowMsg(line)
	if err != nil {
		h.fail("%v", err)
		return
	}
	if !ok {
		return
	}
	h.mu.Lock()
	if i := int(h.recv.Load()); m.I != i {
		h.failLocked("message %d, want %d", m.I, i)
	}
	if h.seq != 0 && m.Seq != h.seq+1 {
		h.failLocked("seq %d after %d", m.Seq, h.seq)
	}
	h.seq = m.Seq
	h.lat = append(h.lat, now.Sub(time.Unix(0, m.TS)))
	h.mu.Unlock()
	h.recv.Add(1)
	select {
	case h.notify <- struct{}{}:
	default:
	}
}

func (h *healthyReader) fail(format string, args ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.failLocked(format, args...)
}

func (h *healthyReader) failLocked(format string, args ...any) {
	if len(h.errs) < 5 {
		h.errs = append(h.errs, fmt.Sprintf(format, args...))
	}
}

type hubDisconnect struct {
	id  string
	err error
	at  time.Time
}

// TestHubFanoutSlowConsumerEvicted publishes to 20 reading clients and one
// that never reads, on one topic, with a small send queue: the stalled one
// is evicted for a full queue or a write timeout, while the others get
// every message, in order and in time.
func TestHubFanoutSlowConsumerEvicted(t *testing.T) {
	const (
		healthyN = 20
		window   = 8       // messages in flight to the healthy clients at most
		padding  = 4 << 10 // bytes of each message's data
		maxMsgs  = 10000   // 40 MiB to the stalled client: far more than its TCP buffers hold
		after    = 50      // messages published after the eviction
	)
	ended := make(chan hubDisconnect, 100)
	s := newHubServer(t,
		tether.WithLimits(tether.Limits{SendQueue: 32, SendQueueBytes: 64 << 10}),
		tether.WithLimits(tether.Limits{WriteTimeout: 500 * time.Millisecond}),
		tether.WithObserver(tether.Observer{Disconnect: func(c *tether.Conn, err error) {
			select {
			case ended <- hubDisconnect{c.ID(), err, time.Now()}:
			default:
			}
		}}))
	never := make(chan struct{}) // the stalled client's gate: never opened
	stalled, err := dialFan(s.url(), fanOpts{topics: []string{"feed"}, gate: never})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stalled.Close)
	notify := make(chan struct{}, 1)
	readers := make([]*healthyReader, healthyN)
	for i := range readers {
		readers[i] = &healthyReader{notify: notify}
	}
	dialFans(t, s.url(), healthyN, 10, func(i int) fanOpts {
		return fanOpts{topics: []string{"feed"}, onLine: readers[i].onLine}
	})
	minRecv := func() int64 {
		m := readers[0].recv.Load()
		for _, h := range readers[1:] {
			m = min(m, h.recv.Load())
		}
		return m
	}
	// waitRecv waits until every healthy client has received n messages.
	waitRecv := func(n int64, limit time.Duration) {
		t.Helper()
		timeout := time.NewTimer(limit)
		defer timeout.Stop()
		for minRecv() < n {
			select {
			case <-notify:
			case <-timeout.C:
				t.Fatalf("healthy clients still short of %d messages after %v (least: %d)", n, limit, minRecv())
			}
		}
	}

	pad := strings.Repeat("x", padding)
	start := time.Now()
	var evicted *hubDisconnect
	evictedAt := 0 // messages published when the eviction was seen
	n := 0
	for ; n < maxMsgs; n++ {
		if evicted == nil {
			select {
			case d := <-ended:
				evicted, evictedAt = &d, n
			default:
			}
		}
		if evicted != nil && n >= evictedAt+after {
			break
		}
		// At most window messages in flight to the healthy ones, so that
		// their queues, 32 messages and 64 KiB, never overflow.
		waitRecv(int64(n-window+1), 10*time.Second)
		data := fmt.Appendf(nil, `{"i":%d,"t":%d,"pad":"%s"}`, n, time.Now().UnixNano(), pad)
		if err := s.hub.Publish("feed", data); err != nil {
			t.Fatal(err)
		}
	}
	if evicted == nil {
		t.Fatalf("the stalled client was not evicted after %d messages of %d KiB in %v (hub %+v)", n, padding>>10, time.Since(start), s.hub.Stats())
	}
	waitRecv(int64(n), 10*time.Second)

	took := evicted.at.Sub(start)
	t.Logf("stalled client evicted after %v (%v), at message %d of %d", took.Round(time.Millisecond), evicted.err, evictedAt, n)
	if evicted.id != stalled.session {
		t.Fatalf("conn %s ended (%v), want the stalled one, %s", evicted.id, evicted.err, stalled.session)
	}
	if !errors.Is(evicted.err, tether.ErrQueueFull) && !errors.Is(evicted.err, tether.ErrWriteTimeout) {
		t.Fatalf("stalled client ended with %v, want ErrQueueFull or ErrWriteTimeout", evicted.err)
	}
	if took > 10*time.Second {
		t.Errorf("stalled client evicted %v after the first publication, want within 10 s", took)
	}
	select {
	case d := <-ended:
		t.Fatalf("conn %s ended too (%v): only the stalled one should", d.id, d.err)
	default:
	}

	var all []time.Duration
	for i, h := range readers {
		h.mu.Lock()
		if len(h.errs) > 0 {
			t.Errorf("healthy client %d: %s", i, strings.Join(h.errs, "; "))
		}
		all = append(all, h.lat...)
		h.mu.Unlock()
	}
	if len(all) != healthyN*n {
		t.Fatalf("%d latencies, want %d", len(all), healthyN*n)
	}
	slices.Sort(all)
	p50, p99, worst := all[len(all)/2], all[len(all)*99/100], all[len(all)-1]
	t.Logf("%d messages of %d KiB to %d healthy clients: delivery latency p50 %v, p99 %v, max %v",
		n, padding>>10, healthyN, p50, p99, worst)
	if p99 > time.Second {
		t.Errorf("healthy clients' p99 delivery latency %v, want under 1 s", p99)
	}

	st := s.hub.Stats()
	if st.Evictions != 1 || st.Conns != healthyN || st.Disconnects != 1 || st.Published != uint64(n) {
		t.Errorf("Stats() = %+v, want 1 eviction and disconnect, %d conns, %d published", st, healthyN, n)
	}
	if s.hub.Conn(stalled.session) != nil {
		t.Error("the evicted conn is still registered")
	}
}

// TestHubFanoutDropPolicies fills the queue of a client that does not read,
// under DropNewest and DropOldest: the conn stays, the drops are reported
// to the Observer and counted in Stats, and once the client reads again it
// gets every message that was not dropped, in order.
func TestHubFanoutDropPolicies(t *testing.T) {
	for _, policy := range []tether.OverflowPolicy{tether.DropNewest, tether.DropOldest} {
		t.Run(policy.String(), func(t *testing.T) { testDropPolicy(t, policy) })
	}
}

func testDropPolicy(t *testing.T, policy tether.OverflowPolicy) {
	const (
		queueMsgs = 8
		padding   = 32 << 10
		maxMsgs   = 2000 // 64 MiB: far more than the client's TCP buffers hold
		extra     = 20   // messages published after the first drop
	)
	var drops, dropCalls atomic.Int64
	var dropConn sync.Map // IDs of the conns that dropped
	ended := make(chan hubDisconnect, 10)
	s := newHubServer(t,
		tether.WithLimits(tether.Limits{SendQueue: queueMsgs, SendQueueBytes: 1 << 20}),
		tether.WithLimits(tether.Limits{Overflow: policy}),
		// Long enough never to evict the stalled client during the test.
		tether.WithLimits(tether.Limits{WriteTimeout: time.Minute}),
		tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Off: true} }),
		tether.WithObserver(tether.Observer{Drop: func(c *tether.Conn, n int) {
			dropConn.Store(c.ID(), true)
			dropCalls.Add(1)
			drops.Add(int64(n))
		}}),
		tether.WithObserver(tether.Observer{Disconnect: func(c *tether.Conn, err error) {
			ended <- hubDisconnect{c.ID(), err, time.Now()}
		}}))

	var (
		mu       sync.Mutex
		got      []slowMsg
		parseErr error
	)
	last := make(chan struct{}) // closed when the final message arrives
	final := -1                 // the final message's i, set before it is published
	gate := make(chan struct{})
	c, err := dialFan(s.url(), fanOpts{topics: []string{"feed"}, gate: gate, onLine: func(line []byte) {
		m, ok, err := parseSlowMsg(line)
		if !ok {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			parseErr = err
			return
		}
		got = append(got, m)
		if m.I == final {
			close(last)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	conn := s.hub.Conn(c.session)
	if conn == nil {
		t.Fatal("the client's conn is not registered")
	}

	pad := strings.Repeat("x", padding)
	publish := func(i int) {
		t.Helper()
		if err := s.hub.Publish("feed", fmt.Appendf(nil, `{"i":%d,"t":%d,"pad":"%s"}`, i, time.Now().UnixNano(), pad)); err != nil {
			t.Fatalf("Publish %d: %v", i, err)
		}
	}
	// Fill the client's TCP buffers without overflowing its queue: publish
	// only while the queue has room. Once the queue has stayed full for
	// stallAfter, its writer is stuck on a full socket.
	const stallAfter = time.Second
	n := 0
	for stalled := false; !stalled; {
		if n >= maxMsgs {
			t.Fatalf("the writer still takes messages after %d of %d KiB (hub %+v)", n, padding>>10, s.hub.Stats())
		}
		full := time.Now()
		for s.hub.Stats().QueuedMessages >= queueMsgs {
			if time.Since(full) > stallAfter {
				stalled = true
				break
			}
			time.Sleep(time.Millisecond)
		}
		if !stalled {
			publish(n)
			n++
		}
	}
	if d := drops.Load(); d != 0 {
		t.Fatalf("%d messages dropped while the queue had room", d)
	}
	// Every message from now on overflows the queue.
	firstDrop := n
	for range extra {
		publish(n)
		n++
	}
	t.Logf("%v: stalled after %d messages of %d KiB; %d dropped in %d calls out of %d published",
		policy, firstDrop, padding>>10, drops.Load(), dropCalls.Load(), n)
	if drops.Load() != extra || dropCalls.Load() != extra {
		t.Errorf("Observer.Drop reported %d messages in %d calls, want %d in %d", drops.Load(), dropCalls.Load(), extra, extra)
	}

	// The conn is still there, its queue full, its drops counted.
	if err := conn.Err(); err != nil {
		t.Fatalf("the conn ended: %v", err)
	}
	if s.hub.Conn(c.session) != conn || s.hub.Len() != 1 {
		t.Fatal("the conn left the registry")
	}
	dropConn.Range(func(id, _ any) bool {
		if id != c.session {
			t.Errorf("Observer.Drop reported conn %v, want %s", id, c.session)
		}
		return true
	})
	st := s.hub.Stats()
	t.Logf("Stats while stalled: %d messages, %d bytes queued", st.QueuedMessages, st.QueuedBytes)
	if st.Drops == 0 || st.Drops != uint64(drops.Load()) {
		t.Errorf("Stats().Drops = %d, want the %d the Observer saw", st.Drops, drops.Load())
	}
	if st.Evictions != 0 || st.Disconnects != 0 {
		t.Errorf("Stats() = %+v: want no eviction or disconnect", st)
	}
	if st.QueuedMessages != queueMsgs ||
		st.QueuedBytes < queueMsgs*padding || st.QueuedBytes > queueMsgs*(padding+200) {
		t.Errorf("Stats(): %d messages, %d bytes queued; want a full queue, %d messages of %d to %d bytes",
			st.QueuedMessages, st.QueuedBytes, queueMsgs, padding, padding+200)
	}

	// The client reads again. Once its queue has drained, one more
	// message fits and ends the stream.
	close(gate)
	waitFor(t, 10*time.Second, "the queue drains once the client reads", func() bool {
		return s.hub.Stats().QueuedMessages == 0
	})
	mu.Lock()
	final = n
	mu.Unlock()
	dropsBefore := drops.Load()
	publish(n)
	n++
	select {
	case <-last:
	case <-time.After(10 * time.Second):
		t.Fatalf("the final message did not arrive within 10 s")
	}
	if drops.Load() != dropsBefore {
		t.Fatalf("the final message dropped %d", drops.Load()-dropsBefore)
	}

	mu.Lock()
	defer mu.Unlock()
	if parseErr != nil {
		t.Fatal(parseErr)
	}
	for k, m := range got {
		if k > 0 && (m.I <= got[k-1].I || m.Seq <= got[k-1].Seq) {
			t.Fatalf("message %d (seq %d) after %d (seq %d): out of order", m.I, m.Seq, got[k-1].I, got[k-1].Seq)
		}
		if m.Seq != uint64(m.I)+1 {
			t.Fatalf("message %d has seq %d, want %d", m.I, m.Seq, m.I+1)
		}
	}
	if len(got)+int(drops.Load()) != n {
		t.Errorf("received %d + dropped %d, want the %d published", len(got), drops.Load(), n)
	}
	// The client got what was written or queued before the stall, less
	// what the policy dropped: with DropNewest, every message published
	// after; with DropOldest, the queue's oldest to make room for them.
	var want []int
	for i := range n - 1 {
		switch {
		case i < firstDrop-queueMsgs,
			policy == tether.DropNewest && i < firstDrop,
			policy == tether.DropOldest && i >= n-1-queueMsgs:
			want = append(want, i)
		}
	}
	want = append(want, n-1) // the final message
	var gotI []int
	for _, m := range got {
		gotI = append(gotI, m.I)
	}
	if !slices.Equal(gotI, want) {
		t.Errorf("received %v, want %v", compactRanges(gotI), compactRanges(want))
	}
	select {
	case d := <-ended:
		t.Fatalf("conn ended: %v", d.err)
	default:
	}
}

// TestHubFanoutStats checks the Stats counters after a scenario of
// connects, subscriptions, publications, refused requests and
// disconnects.
func TestHubFanoutStats(t *testing.T) {
	s := newHubServer(t)
	if st := s.hub.Stats(); st != (tether.Stats{}) {
		t.Fatalf("Stats() of a new hub = %+v, want zeros", st)
	}
	var a, b []*client
	for i := range 5 {
		c := dialClient(t, s.url(), clientOpts{})
		c.welcome()
		if i < 3 {
			c.subscribe("stats:a")
			a = append(a, c)
		} else {
			c.subscribe("stats:b")
			b = append(b, c)
		}
	}
	st := s.hub.Stats()
	if st.Conns != 5 || st.Connects != 5 || st.Disconnects != 0 || st.Topics != 2 || st.Published != 0 {
		t.Fatalf("after 5 conns on 2 topics: Stats() = %+v", st)
	}

	for i := range 5 {
		if err := s.hub.Publish("stats:a", fmt.Appendf(nil, `{"a":%d}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 3 {
		if err := s.hub.Publish("stats:b", fmt.Appendf(nil, `{"b":%d}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range a {
		for range 5 {
			c.expect("msg")
		}
	}
	for _, c := range b {
		for range 3 {
			c.expect("msg")
		}
	}
	// Everything was read: nothing waits in a queue.
	waitFor(t, 5*time.Second, "empty queues", func() bool {
		st := s.hub.Stats()
		return st.QueuedMessages == 0 && st.QueuedBytes == 0
	})
	if st := s.hub.Stats(); st.Published != 8 {
		t.Fatalf("after 8 publications: Stats().Published = %d", st.Published)
	}

	// A request of an unknown op is a bad request; a pub without
	// WithClientPublish is denied.
	a[0].send(`{"op":"bogus","id":"x"}`)
	if e := a[0].expect("error"); e.Code != "unknown_op" {
		t.Fatalf("got %s, want an error unknown_op", e.line)
	}
	a[0].send(`{"op":"pub","topic":"stats:a","data":1,"id":"p"}`)
	if e := a[0].expect("error"); e.Code != "forbidden" || e.ID != "p" {
		t.Fatalf("got %s, want an error forbidden", e.line)
	}

	for _, c := range b {
		c.Close()
	}
	waitFor(t, 5*time.Second, "2 disconnects", func() bool { return s.hub.Stats().Disconnects == 2 })
	st = s.hub.Stats()
	t.Logf("Stats() = %+v", st)
	if st.Conns != 3 || st.Connects != 5 || st.Topics != 1 || st.Published != 8 ||
		st.BadRequests != 1 || st.Denied != 1 || st.Evictions != 0 || st.Drops != 0 || st.DeadPeers != 0 ||
		st.RateLimited != 0 || st.QueuedMessages != 0 || st.QueuedBytes != 0 {
		t.Fatalf("Stats() = %+v; want 3 conns, 5 connects, 1 topic (stats:b went with its subscribers), 8 published, 1 bad request, 1 denied, nothing else", st)
	}
	if st.Conns != s.hub.Len() {
		t.Fatalf("Stats().Conns %d != Len() %d", st.Conns, s.hub.Len())
	}
}

// TestHubFanoutStatsPublishedWithoutSubscribers publishes to a topic that
// has no subscriber. The publication is real: it takes a seq and history
// keeps it for clients that resume. So Stats.Published, "topic
// publications", counts it.
func TestHubFanoutStatsPublishedWithoutSubscribers(t *testing.T) {
	s := newHubServer(t)
	if err := s.hub.Publish("quiet", []byte(`1`)); err != nil {
		t.Fatal(err)
	}
	c1 := dialClient(t, s.url(), clientOpts{})
	c1.welcome()
	c1.subscribe("quiet")
	if err := s.hub.Publish("quiet", []byte(`2`)); err != nil {
		t.Fatal(err)
	}
	m := c1.expect("msg")
	if m.Seq != 2 {
		t.Fatalf("got %s, want seq 2: the first publication took seq 1", m.line)
	}
	c2 := dialClient(t, s.url(), clientOpts{})
	c2.welcome()
	c2.send(`{"op":"sub","topic":"quiet","since":{"epoch":` + quote(m.Epoch) + `,"seq":0},"id":"r"}`)
	c2.expect("ack")
	for seq := uint64(1); seq <= 2; seq++ {
		if r := c2.expect("msg"); r.Seq != seq || string(r.Data) != strconv.FormatUint(seq, 10) {
			t.Fatalf("replay: got %s, want seq %d", r.line, seq)
		}
	}
	if st := s.hub.Stats(); st.Published != 2 {
		t.Errorf("Stats().Published = %d after 2 publications, one before the topic had a subscriber; want 2", st.Published)
	}
}

// compactRanges writes ascending ints as ranges, "0-129 150", for
// messages.
func compactRanges(xs []int) string {
	var b strings.Builder
	for i := 0; i < len(xs); {
		j := i
		for j+1 < len(xs) && xs[j+1] == xs[j]+1 {
			j++
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		if j > i {
			fmt.Fprintf(&b, "%d-%d", xs[i], xs[j])
		} else {
			fmt.Fprintf(&b, "%d", xs[i])
		}
		i = j + 1
	}
	return b.String()
}
