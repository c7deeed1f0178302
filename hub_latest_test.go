package tether_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

// This file checks a sub with "latest": true (PROTOCOL.md, "sub"): the ack,
// carrying the position before the topic's last message, then that
// message as an ordinary msg, then live messages, without a gap or a
// repeat; nothing when there is no such message; since winning over
// latest. It reads the protocol as a raw v1 peer would, record by record,
// text and binary, with the hub alone and with a broker.

// ltRecord is one protocol message a raw v1 peer read: its line, the data
// that followed it in a binary message (len), and whether it came in one.
type ltRecord struct {
	wire
	bytes  []byte // the data after the line; nil without len
	text   bool   // "text": true
	binary bool   // it came in a binary WebSocket message
}

// ltPeer is a raw protocol v1 peer that splits what it reads into records
// as PROTOCOL.md section 2 says, for text and binary messages alike.
type ltPeer struct {
	t    *testing.T
	ws   *websocket.Conn
	recs chan ltRecord
}

// ltDial connects an ltPeer to url and reads the welcome.
func ltDial(t *testing.T, url string) *ltPeer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{Subprotocols: []string{tether.Subprotocol}})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	if ws.Subprotocol() != tether.Subprotocol {
		t.Fatalf("subprotocol %q", ws.Subprotocol())
	}
	ws.SetReadLimit(-1)
	p := &ltPeer{t: t, ws: ws, recs: make(chan ltRecord, 1<<16)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(p.recs)
		for {
			typ, data, err := ws.Read(context.Background())
			if err != nil {
				return
			}
			for _, r := range ltSplit(typ == websocket.MessageBinary, data) {
				p.recs <- r
			}
		}
	}()
	t.Cleanup(func() {
		ws.CloseNow()
		wg.Wait()
	})
	if w := p.next(); w.Op != "welcome" {
		t.Fatalf("first message %s, want a welcome", w.line)
	}
	return p
}

// ltSplit splits one WebSocket message into its records: lines of a text
// message, or lines each followed by len bytes of a binary one. A record
// that cannot be read is returned with op "unreadable".
func ltSplit(binary bool, b []byte) []ltRecord {
	var out []ltRecord
	for len(b) > 0 {
		if b[0] == '\n' {
			b = b[1:]
			continue
		}
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		r := ltRecord{binary: binary}
		var extra struct {
			Len  *uint64 `json:"len"`
			Text bool    `json:"text"`
		}
		if json.Unmarshal(line, &r.wire) != nil || json.Unmarshal(line, &extra) != nil {
			return append(out, ltRecord{wire: wire{Op: "unreadable", line: string(line)}})
		}
		r.line, r.text = string(line), extra.Text
		if extra.Len != nil {
			if !binary || *extra.Len > uint64(len(b)) {
				return append(out, ltRecord{wire: wire{Op: "unreadable", line: string(line)}})
			}
			r.bytes, b = b[:*extra.Len], b[*extra.Len:]
		}
		out = append(out, r)
	}
	return out
}

func (p *ltPeer) send(line string) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.ws.Write(ctx, websocket.MessageText, []byte(line)); err != nil {
		p.t.Fatalf("write %s: %v", line, err)
	}
}

// next returns the next record, failing the test after 10 s.
func (p *ltPeer) next() ltRecord {
	p.t.Helper()
	select {
	case r, ok := <-p.recs:
		if !ok {
			p.t.Fatal("the conn ended")
		}
		if r.Op == "unreadable" {
			p.t.Fatalf("unreadable record %q", r.line)
		}
		return r
	case <-time.After(10 * time.Second):
		p.t.Fatal("no message within 10 s")
	}
	return ltRecord{}
}

// quiet fails the test if a record arrives within d.
func (p *ltPeer) quiet(d time.Duration) {
	p.t.Helper()
	select {
	case r, ok := <-p.recs:
		if ok {
			p.t.Fatalf("unexpected %s", r.line)
		}
	case <-time.After(d):
	}
}

// ack reads the next record, which must be the ack of id, and returns
// it.
func (p *ltPeer) ack(id string) ltRecord {
	p.t.Helper()
	a := p.next()
	if a.Op != "ack" || a.ID != id {
		p.t.Fatalf("got %s, want the ack of %s", a.line, id)
	}
	return a
}

// msg reads the next record, which must be the msg of topic at seq
// carrying the JSON data rsData(seq), in epoch.
func (p *ltPeer) msg(topic, epoch string, seq uint64) {
	p.t.Helper()
	m := p.next()
	if m.Op != "msg" || m.Topic != topic || m.Epoch != epoch || m.Seq != seq || string(m.Data) != rsData(int(seq)) || m.bytes != nil {
		p.t.Fatalf("got %s, want msg %s %s/%d carrying %s", m.line, topic, epoch, seq, rsData(int(seq)))
	}
}

// ltSub is a sub with latest and an id.
func ltSub(topic, id string) string {
	return `{"op":"sub","topic":` + quote(topic) + `,"latest":true,"id":` + quote(id) + `}`
}

// ltEpoch returns the topic's epoch in the hub's history.
func ltEpoch(t *testing.T, h adapter.History, topic string) string {
	t.Helper()
	_, last, _, err := h.Since(context.Background(), topic, adapter.Position{})
	if err != nil || last.Epoch == "" {
		t.Fatalf("Since: %v, %+v", err, last)
	}
	return last.Epoch
}

// The order on the wire: the ack, with the position before the latest;
// the latest; then live messages, one each, in seq order.
func TestHubLatestWireOrder(t *testing.T) {
	hist := adapter.NewMemoryHistory(256, time.Minute)
	s := newHubServer(t, rsNoPresence, tether.WithHistory(hist))
	rsPublish(t, s, "prices", 1, 5)
	epoch := ltEpoch(t, hist, "prices")

	p := ltDial(t, s.url())
	p.send(ltSub("prices", "l1"))
	a := p.ack("l1")
	if a.Epoch != epoch || a.Seq != 4 {
		t.Fatalf("ack %s, want epoch %s seq 4: the position before the latest", a.line, epoch)
	}
	p.msg("prices", epoch, 5)
	rsPublish(t, s, "prices", 6, 8)
	for seq := uint64(6); seq <= 8; seq++ {
		p.msg("prices", epoch, seq)
	}
	p.quiet(150 * time.Millisecond)

	// Again on the same conn: already subscribed, so a plain ack and no
	// latest.
	p.send(ltSub("prices", "l2"))
	if a := p.ack("l2"); a.Epoch != "" || a.Seq != 0 {
		t.Fatalf("ack of a second sub %s, want no position", a.line)
	}
	p.quiet(150 * time.Millisecond)

	// Without an id: no ack, the latest all the same.
	q := ltDial(t, s.url())
	q.send(`{"op":"sub","topic":"prices","latest":true}`)
	q.msg("prices", epoch, 8)
	rsPublish(t, s, "prices", 9, 9)
	q.msg("prices", epoch, 9)
	q.quiet(150 * time.Millisecond)
}

// Binary and text that is not JSON come back as they were published, in
// a record of a binary message with their seq, then live messages follow.
func TestHubLatestBinaryAndText(t *testing.T) {
	hist := adapter.NewMemoryHistory(256, time.Minute)
	s := newHubServer(t, rsNoPresence, tether.WithHistory(hist))
	frame := []byte{0xff, 0xd8, '\n', 0x00}
	if err := s.hub.PublishBinary("cam", frame); err != nil {
		t.Fatal(err)
	}
	epoch := ltEpoch(t, hist, "cam")

	p := ltDial(t, s.url())
	p.send(ltSub("cam", "b"))
	if a := p.ack("b"); a.Epoch != epoch || a.Seq != 0 {
		t.Fatalf("ack %s, want %s/0", a.line, epoch)
	}
	m := p.next()
	if m.Op != "msg" || m.Topic != "cam" || m.Epoch != epoch || m.Seq != 1 || !m.binary || m.text || !bytes.Equal(m.bytes, frame) {
		t.Fatalf("got %s %q (binary %v), want the binary latest at seq 1", m.line, m.bytes, m.binary)
	}
	if err := s.hub.Publish("cam", []byte("caption, not JSON")); err != nil {
		t.Fatal(err)
	}
	m = p.next()
	if m.Op != "msg" || m.Seq != 2 || !m.text || string(m.bytes) != "caption, not JSON" {
		t.Fatalf("got %s %q, want the live text at seq 2", m.line, m.bytes)
	}
	p.quiet(150 * time.Millisecond)

	// A text latest, then a binary live one.
	q := ltDial(t, s.url())
	q.send(ltSub("cam", "t"))
	if a := q.ack("t"); a.Seq != 1 {
		t.Fatalf("ack %s, want seq 1", a.line)
	}
	m = q.next()
	if m.Op != "msg" || m.Seq != 2 || !m.binary || !m.text || string(m.bytes) != "caption, not JSON" {
		t.Fatalf("got %s %q, want the text latest at seq 2", m.line, m.bytes)
	}
	if err := s.hub.PublishBinary("cam", frame); err != nil {
		t.Fatal(err)
	}
	m = q.next()
	if m.Op != "msg" || m.Seq != 3 || m.text || !bytes.Equal(m.bytes, frame) {
		t.Fatalf("got %s %q, want the live binary at seq 3", m.line, m.bytes)
	}
	q.quiet(150 * time.Millisecond)
}

// Nothing to send: a topic that never had a message, a history that keeps
// no messages, a message history let expire. The ack then carries the
// topic's position, and live messages follow it.
func TestHubLatestNothingToSend(t *testing.T) {
	t.Run("empty topic", func(t *testing.T) {
		s := newHubServer(t, rsNoPresence)
		p := ltDial(t, s.url())
		p.send(ltSub("nothing", "e"))
		a := p.ack("e")
		if a.Epoch == "" || a.Seq != 0 {
			t.Fatalf("ack %s, want the topic's epoch and seq 0", a.line)
		}
		p.quiet(150 * time.Millisecond)
		rsPublish(t, s, "nothing", 1, 1)
		p.msg("nothing", a.Epoch, 1)
	})
	t.Run("history of no messages", func(t *testing.T) {
		s := newHubServer(t, rsNoPresence, tether.WithHistory(adapter.NewMemoryHistory(0, 0)))
		rsPublish(t, s, "t", 1, 3)
		p := ltDial(t, s.url())
		p.send(ltSub("t", "z"))
		a := p.ack("z")
		if a.Epoch == "" || a.Seq != 3 {
			t.Fatalf("ack %s, want seq 3: nothing kept to send", a.line)
		}
		p.quiet(150 * time.Millisecond)
		rsPublish(t, s, "t", 4, 4)
		p.msg("t", a.Epoch, 4)
	})
	t.Run("expired", func(t *testing.T) {
		const age = 50 * time.Millisecond
		s := newHubServer(t, rsNoPresence, tether.WithHistory(adapter.NewMemoryHistory(8, age)))
		rsPublish(t, s, "t", 1, 2)
		time.Sleep(4 * age) // at least age: the messages have expired
		p := ltDial(t, s.url())
		p.send(ltSub("t", "x"))
		a := p.ack("x")
		if a.Seq != 2 {
			t.Fatalf("ack %s, want seq 2", a.line)
		}
		p.quiet(150 * time.Millisecond)
	})
}

// With since, since wins: the replay of everything after it (the latest
// included), not the latest alone; and the ack carries the topic's
// position, as for any resume.
func TestHubLatestSinceWins(t *testing.T) {
	hist := adapter.NewMemoryHistory(256, time.Minute)
	s := newHubServer(t, rsNoPresence, tether.WithHistory(hist))
	rsPublish(t, s, "t", 1, 6)
	epoch := ltEpoch(t, hist, "t")
	p := ltDial(t, s.url())
	p.send(`{"op":"sub","topic":"t","latest":true,"since":{"epoch":` + quote(epoch) + `,"seq":3},"id":"s"}`)
	if a := p.ack("s"); a.Epoch != epoch || a.Seq != 6 {
		t.Fatalf("ack %s, want %s/6", a.line, epoch)
	}
	for seq := uint64(4); seq <= 6; seq++ {
		p.msg("t", epoch, seq)
	}
	rsPublish(t, s, "t", 7, 7)
	p.msg("t", epoch, 7)
	p.quiet(150 * time.Millisecond)

	// Up to date: since at the last message, nothing replayed, and no
	// latest either.
	q := ltDial(t, s.url())
	q.send(`{"op":"sub","topic":"t","since":{"epoch":` + quote(epoch) + `,"seq":7},"latest":true,"id":"u"}`)
	q.ack("u")
	q.quiet(150 * time.Millisecond)
}

// Raw peers, subscribed by the application with Hub.Subscribe, get no
// latest: live messages only, as before.
func TestHubLatestNotForRawPeers(t *testing.T) {
	subscribed := make(chan struct{})
	var hub atomic.Pointer[tether.Hub]
	s := newHubServer(t, rsNoPresence, tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
		if c.Subprotocol() == "" {
			if err := hub.Load().Subscribe(c, "t"); err != nil {
				t.Errorf("Subscribe: %v", err)
			}
			close(subscribed)
		}
	}}))
	hub.Store(s.hub)
	rsPublish(t, s, "t", 1, 3)
	raw := dialClient(t, s.url(), clientOpts{raw: true})
	<-subscribed
	rsPublish(t, s, "t", 4, 4)
	if w := raw.next(5 * time.Second); w.line != rsData(4) {
		t.Fatalf("raw peer got %q first, want the live %s", w.line, rsData(4))
	}
	raw.quiet(150 * time.Millisecond)
}

// While a publisher publishes, clients subscribe with latest: what follows
// each ack is one contiguous run of seqs from the ack's seq + 1, the first
// being the latest, to the last published.
func TestHubLatestWhilePublishing(t *testing.T) {
	hist := adapter.NewMemoryHistory(1<<12, time.Minute)
	s := newHubServer(t, rsNoPresence, tether.WithHistory(hist),
		tether.WithLimits(tether.Limits{SendQueue: 1 << 14, SendQueueBytes: 16 << 20}))
	rsPublish(t, s, "t", 1, 1)
	epoch := ltEpoch(t, hist, "t")
	const last = 3000
	var published atomic.Int64
	published.Store(1)
	pubDone := make(chan error, 1)
	go func() {
		pubDone <- func() error {
			for n := 2; n <= last; n++ {
				if err := s.hub.Publish("t", []byte(rsData(n))); err != nil {
					return err
				}
				published.Store(int64(n))
				if n%16 == 0 {
					time.Sleep(200 * time.Microsecond)
				}
			}
			return nil
		}()
	}()
	var peers []*ltPeer
	var acks []uint64
	for i := range 6 {
		// Spread over the run: wait for some publications between subs.
		want := int64(1 + i*last/8)
		waitFor(t, 20*time.Second, "publications", func() bool { return published.Load() >= want })
		p := ltDial(t, s.url())
		id := "w" + strconv.Itoa(i)
		p.send(ltSub("t", id))
		a := p.ack(id)
		if a.Epoch != epoch || a.Seq+1 < uint64(want) {
			t.Fatalf("ack %s, want %s and a seq of at least %d", a.line, epoch, want-1)
		}
		peers, acks = append(peers, p), append(acks, a.Seq)
	}
	if err := <-pubDone; err != nil {
		t.Fatal(err)
	}
	for i, p := range peers {
		for seq := acks[i] + 1; seq <= last; seq++ {
			p.msg("t", epoch, seq)
		}
		p.quiet(50 * time.Millisecond)
	}
}

// ltBroker is an adapter.Broker of one node over a memory history: enough
// to drive the hub's broker path in-process. Its deliveries can be held
// back, as a broker's lag behind its own history.
type ltBroker struct {
	hist adapter.History

	mu      sync.Mutex // orders publications and their deliveries
	node    adapter.Node
	held    bool
	pending []ltDelivery
}

type ltDelivery struct {
	topic string
	pos   adapter.Position
	data  []byte
}

func (b *ltBroker) Open(n adapter.Node) error {
	b.mu.Lock()
	b.node = n
	b.mu.Unlock()
	n.Health(nil)
	return nil
}

func (b *ltBroker) Close() error { return nil }

func (b *ltBroker) Publish(ctx context.Context, topic string, data []byte) (adapter.Position, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	pos, err := b.hist.Append(ctx, topic, data)
	if err != nil {
		return pos, err
	}
	if b.held {
		b.pending = append(b.pending, ltDelivery{topic, pos, data})
	} else {
		b.node.Deliver(topic, pos, data)
	}
	return pos, nil
}

// hold holds deliveries back until release.
func (b *ltBroker) hold() {
	b.mu.Lock()
	b.held = true
	b.mu.Unlock()
}

func (b *ltBroker) release() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, d := range b.pending {
		b.node.Deliver(d.topic, d.pos, d.data)
	}
	b.pending, b.held = nil, false
}

// Since does not take mu: the hub calls it under a topic's lock, which
// Deliver takes.
func (b *ltBroker) Since(ctx context.Context, topic string, pos adapter.Position) ([]adapter.HistoryEntry, adapter.Position, bool, error) {
	return b.hist.Since(ctx, topic, pos)
}

func (b *ltBroker) Hold(context.Context, string) error                        { return nil }
func (b *ltBroker) Release(string)                                            {}
func (b *ltBroker) SendToUser(context.Context, string, []byte) error          { return nil }
func (b *ltBroker) Connect(context.Context, string) ([][]byte, error)         { return nil, nil }
func (b *ltBroker) Disconnect(string)                                         {}
func (b *ltBroker) Online(context.Context, string) (bool, error)              { return false, nil }
func (b *ltBroker) Join(string, string, []adapter.MemberConn)                 {}
func (b *ltBroker) Leave(string, string)                                      {}
func (b *ltBroker) Members(context.Context, string) ([]adapter.Member, error) { return nil, nil }

// With a broker: the latest comes from the broker's history, at the
// topic's cursor on this node, also when the broker has more that it has
// not delivered yet; then live messages, without a gap or a repeat.
func TestHubLatestBroker(t *testing.T) {
	b := &ltBroker{hist: adapter.NewMemoryHistory(256, time.Minute)}
	s := newHubServer(t, rsNoPresence, tether.WithBroker(b))
	rsPublish(t, s, "t", 1, 5) // no subscriber on the node yet
	epoch := ltEpoch(t, b.hist, "t")

	p := ltDial(t, s.url())
	p.send(ltSub("t", "a"))
	if a := p.ack("a"); a.Epoch != epoch || a.Seq != 4 {
		t.Fatalf("ack %s, want %s/4", a.line, epoch)
	}
	p.msg("t", epoch, 5)
	rsPublish(t, s, "t", 6, 6)
	p.msg("t", epoch, 6)

	// The broker lags: 7 is in its history, not yet delivered. A new
	// subscriber gets 6, the node's cursor, then 7 live.
	b.hold()
	rsPublish(t, s, "t", 7, 7)
	q := ltDial(t, s.url())
	q.send(ltSub("t", "b"))
	if a := q.ack("b"); a.Epoch != epoch || a.Seq != 5 {
		t.Fatalf("ack %s, want %s/5", a.line, epoch)
	}
	q.msg("t", epoch, 6)
	q.quiet(100 * time.Millisecond)
	b.release()
	q.msg("t", epoch, 7)
	p.msg("t", epoch, 7)
	q.quiet(150 * time.Millisecond)
	p.quiet(0)

	// since wins with a broker too.
	r := ltDial(t, s.url())
	r.send(`{"op":"sub","topic":"t","latest":true,"since":{"epoch":` + quote(epoch) + `,"seq":4},"id":"c"}`)
	if a := r.ack("c"); a.Seq != 7 {
		t.Fatalf("ack %s, want seq 7", a.line)
	}
	for seq := uint64(5); seq <= 7; seq++ {
		r.msg("t", epoch, seq)
	}
	r.quiet(150 * time.Millisecond)

	// An empty topic: nothing.
	e := ltDial(t, s.url())
	e.send(ltSub("empty", "d"))
	if a := e.ack("d"); a.Seq != 0 || a.Epoch == "" {
		t.Fatalf("ack %s, want seq 0", a.line)
	}
	e.quiet(150 * time.Millisecond)
}
