package interop_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	cws "github.com/coder/websocket"
	"github.com/gorilla/websocket"
	"github.com/tether-ws/tether"
)

// gorillaPeer is a gorilla/websocket client that reads all the time in a
// goroutine of its own, as gorilla requires for its control frame
// handlers (the ping handler runs inside ReadMessage).
type gorillaPeer struct {
	t     testing.TB
	ws    *websocket.Conn
	in    chan gorillaMsg // text and binary messages, in order
	pings atomic.Int32
	done  chan struct{}
	err   error // why the reader stopped; set before done is closed
	lines []wire
}

// dialGorilla connects a gorilla client. Unless suppressPongs, it keeps
// gorilla's default ping handler, which answers every ping with a pong.
func dialGorilla(t testing.TB, url string, suppressPongs bool, subprotocols ...string) *gorillaPeer {
	t.Helper()
	d := websocket.Dialer{HandshakeTimeout: 5 * time.Second, Subprotocols: subprotocols}
	ws, resp, err := d.Dial(url, nil)
	if err != nil {
		t.Fatalf("gorilla dial %s: %v", url, err)
	}
	resp.Body.Close()
	p := &gorillaPeer{t: t, ws: ws, in: make(chan gorillaMsg, 1024), done: make(chan struct{})}
	if suppressPongs {
		// Still reading, so the pings arrive; they are just never answered.
		ws.SetPingHandler(func(string) error {
			p.pings.Add(1)
			return nil
		})
	}
	go p.read()
	t.Cleanup(func() {
		ws.Close()
		<-p.done
	})
	return p
}

func (p *gorillaPeer) read() {
	defer close(p.done)
	for {
		typ, data, err := p.ws.ReadMessage()
		if err != nil {
			p.err = err
			return
		}
		select {
		case p.in <- gorillaMsg{typ == websocket.BinaryMessage, data}:
		default:
			p.err = errors.New("test reader overflow")
			p.ws.Close()
			return
		}
	}
}

// gorillaMsg is one message a gorilla peer received.
type gorillaMsg struct {
	binary bool
	data   []byte
}

// next returns the data of the next message the peer received.
func (p *gorillaPeer) next(d time.Duration) []byte {
	p.t.Helper()
	return p.nextMsg(d).data
}

// nextMsg returns the next message the peer received.
func (p *gorillaPeer) nextMsg(d time.Duration) gorillaMsg {
	p.t.Helper()
	select {
	case m := <-p.in:
		return m
	case <-p.done:
		select {
		case m := <-p.in:
			return m
		default:
		}
		p.t.Fatalf("gorilla peer: conn ended (%v) while waiting for a message", p.err)
	case <-time.After(d):
		p.t.Fatalf("gorilla peer: no message within %v", d)
	}
	return gorillaMsg{}
}

// line returns the next protocol v1 message, skipping presence (every
// named peer sees its own join).
func (p *gorillaPeer) line() wire {
	p.t.Helper()
	for {
		for len(p.lines) == 0 {
			p.lines = splitLines(p.t, p.next(2*time.Second))
		}
		w := p.lines[0]
		p.lines = p.lines[1:]
		if w.Op != "presence" {
			return w
		}
	}
}

// expect returns the next protocol v1 message but presence, and fails
// unless its op is op.
func (p *gorillaPeer) expect(op string) wire {
	p.t.Helper()
	w := p.line()
	if w.Op != op {
		p.t.Fatalf("got %s, want op %q", w, op)
	}
	return w
}

func (p *gorillaPeer) writeText(s string) {
	p.t.Helper()
	if err := p.ws.WriteMessage(websocket.TextMessage, []byte(s)); err != nil {
		p.t.Fatalf("gorilla write: %v", err)
	}
}

func (p *gorillaPeer) closeNormally() {
	p.t.Helper()
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "bye")
	if err := p.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second)); err != nil {
		p.t.Fatalf("gorilla close: %v", err)
	}
}

// checkAlive checks that a conn is still up and has answered heartbeat
// pings.
func checkAlive(t testing.TB, rec connRecord, minPongs int) {
	t.Helper()
	if !rec.ended.IsZero() {
		t.Fatalf("%s was dropped after %v: %v", rec.name, rec.ended.Sub(rec.connected), rec.reason)
	}
	up := time.Since(rec.connected)
	if rec.pongs < minPongs {
		t.Fatalf("%s answered %d heartbeat pings in %v, want at least %d", rec.name, rec.pongs, up, minPongs)
	}
	t.Logf("%s: up for %v (%d heartbeat timeouts), %d pings answered",
		rec.name, up.Round(time.Millisecond), up/hbTimeout, rec.pongs)
}

// checkClosedNormally checks that the conn ended with the peer's close
// frame 1000.
func checkClosedNormally(t testing.TB, rec connRecord) {
	t.Helper()
	if got := cws.CloseStatus(rec.reason); got != cws.StatusNormalClosure {
		t.Fatalf("%s ended with %v (close status %d), want the peer's 1000", rec.name, rec.reason, got)
	}
}

// A gorilla client in raw mode (no subprotocol) that reads, and so answers
// pings with gorilla's default handler, outlives several heartbeat
// timeouts without sending anything, and exchanges raw messages both
// ways.
func TestGorillaRawStaysConnected(t *testing.T) {
	s := newServer(t)
	s.setOnConnect(func(c *tether.Conn) {
		if err := s.Hub().Subscribe(c, "raw:feed"); err != nil {
			t.Errorf("Subscribe: %v", err)
		}
	})
	p := dialGorilla(t, s.url("gorilla"), false)
	if p.ws.Subprotocol() != "" {
		t.Fatalf("subprotocol %q, want raw mode", p.ws.Subprotocol())
	}
	s.conn("gorilla", 1, time.Second)

	time.Sleep(alive)
	checkAlive(t, s.record("gorilla", 1), 3)

	p.writeText("hello from gorilla")
	s.message("gorilla", 1, "hello from gorilla", time.Second)

	if err := s.Hub().Publish("raw:feed", []byte(`{"x": 1}`)); err != nil {
		t.Fatal(err)
	}
	if got := string(p.next(time.Second)); got != `{"x": 1}` {
		t.Fatalf("published: got %q, want the data byte for byte", got)
	}
	rec := s.record("gorilla", 1)
	if err := rec.conn.Send(context.Background(), []byte("not JSON, raw")); err != nil {
		t.Fatal(err)
	}
	if got := string(p.next(time.Second)); got != "not JSON, raw" {
		t.Fatalf("Conn.Send: got %q", got)
	}

	p.closeNormally()
	checkClosedNormally(t, s.ended("gorilla", 1, time.Second))
}

// A gorilla client that speaks protocol v1 through the raw socket: the
// welcome advertises the hub's heartbeat, WebSocket pings keep it up, and
// ping, sub, pub, send and unsub are answered as PROTOCOL.md says.
func TestGorillaProtocolV1(t *testing.T) {
	s := newServer(t, tether.WithClientPublish(func(*tether.Conn, string) bool { return true }))
	p := dialGorilla(t, s.url("gorilla-v1"), false, tether.Subprotocol)
	if p.ws.Subprotocol() != tether.Subprotocol {
		t.Fatalf("subprotocol %q, want %q", p.ws.Subprotocol(), tether.Subprotocol)
	}
	rec := s.conn("gorilla-v1", 1, time.Second)

	w := p.expect("welcome")
	if w.Session != rec.conn.ID() {
		t.Errorf("welcome session %q, want the conn's ID %q", w.Session, rec.conn.ID())
	}
	if w.Heartbeat == nil || w.Heartbeat.IntervalMS != hbInterval.Milliseconds() || w.Heartbeat.TimeoutMS != hbTimeout.Milliseconds() {
		t.Errorf("welcome %s: want heartbeat %v / %v", w, hbInterval, hbTimeout)
	}
	if w.Limits == nil || w.Limits.MsgsPerS != 100 || w.Limits.Burst != 200 {
		t.Errorf("welcome %s: want the default limits 100/s, burst 200", w)
	}

	time.Sleep(alive)
	checkAlive(t, s.record("gorilla-v1", 1), 3)

	p.writeText(`{"op":"ping","ts":1700000000123}`)
	if w := p.expect("pong"); w.TS != 1700000000123 {
		t.Errorf("pong %s: want ts 1700000000123", w)
	}

	p.writeText(`{"op":"sub","topic":"news","id":"1"}`)
	ack := p.expect("ack")
	if ack.ID != "1" || ack.Epoch == "" || ack.seq() != 0 {
		t.Fatalf("ack of sub %s: want id 1, an epoch and seq 0", ack)
	}
	epoch := ack.Epoch

	if err := s.Hub().Publish("news", []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	if m := p.expect("msg"); m.Topic != "news" || m.Epoch != epoch || m.seq() != 1 || string(m.Data) != `{"n":1}` {
		t.Fatalf("msg %s: want news, epoch %s, seq 1, {\"n\":1}", m, epoch)
	}

	// pub: the publisher is subscribed, so it gets the msg as well as the
	// ack, in either order.
	p.writeText(`{"op":"pub","topic":"news","data":{"n":2},"id":"2"}`)
	var gotAck, gotMsg bool
	for !gotAck || !gotMsg {
		switch w := p.line(); {
		case w.Op == "ack" && w.ID == "2":
			gotAck = true
		case w.Op == "msg" && w.Topic == "news" && w.seq() == 2 && string(w.Data) == `{"n":2}`:
			gotMsg = true
		default:
			t.Fatalf("after pub: unexpected %s", w)
		}
	}

	p.writeText(`{"op":"send","data":{"hi":true},"id":"3"}`)
	if a := p.expect("ack"); a.ID != "3" {
		t.Fatalf("ack of send %s: want id 3", a)
	}
	s.message("gorilla-v1", 1, `{"hi":true}`, time.Second)

	p.writeText(`{"op":"unsub","topic":"news","id":"4"}`)
	if a := p.expect("ack"); a.ID != "4" {
		t.Fatalf("ack of unsub %s: want id 4", a)
	}
	if err := s.Hub().Publish("news", []byte(`{"n":3}`)); err != nil {
		t.Fatal(err)
	}
	// A direct message queued after the publication: the next thing the
	// client gets, since nothing of news may come any more.
	if err := s.Hub().SendToUser("gorilla-v1", []byte(`{"direct":1}`)); err != nil {
		t.Fatal(err)
	}
	if m := p.expect("msg"); m.Topic != "" || m.Seq != nil || string(m.Data) != `{"direct":1}` {
		t.Fatalf("after unsub: got %s, want the direct message", m)
	}

	p.closeNormally()
	checkClosedNormally(t, s.ended("gorilla-v1", 1, time.Second))
}

// A gorilla client that reads but never answers pings (its ping handler
// does nothing) is found dead within the timeout plus a margin, with
// ErrHeartbeatTimeout; a healthy peer on the same hub is untouched.
func TestGorillaSuppressedPongsDetectedDead(t *testing.T) {
	s := newServer(t)
	s.setOnConnect(func(c *tether.Conn) {
		if err := s.Hub().Subscribe(c, "feed"); err != nil {
			t.Errorf("Subscribe: %v", err)
		}
	})
	healthy := dialGorilla(t, s.url("healthy"), false)
	s.conn("healthy", 1, time.Second)
	victim := dialGorilla(t, s.url("mute"), true)
	s.conn("mute", 1, time.Second)

	dead := s.ended("mute", 1, hbTimeout+deadMargin+time.Second)
	checkDeadOnTime(t, dead)
	if n := victim.pings.Load(); n < 1 {
		t.Errorf("the mute peer received %d pings before it was dropped, want at least 1", n)
	}
	// The hub dropped the socket: the mute peer's read fails.
	select {
	case <-victim.done:
		t.Logf("mute peer's read ended with: %v", victim.err)
	case <-time.After(2 * time.Second):
		t.Fatal("the mute peer's conn is still open on its side after it was dropped")
	}

	// The healthy peer lives on, through more timeouts, and still gets
	// what is published.
	time.Sleep(2 * hbTimeout)
	checkAlive(t, s.record("healthy", 1), 2)
	if err := s.Hub().Publish("feed", []byte(`"still here"`)); err != nil {
		t.Fatal(err)
	}
	if got := string(healthy.next(time.Second)); got != `"still here"` {
		t.Fatalf("healthy peer got %q", got)
	}
	st := s.Hub().Stats()
	if st.Conns != 1 || st.DeadPeers != 1 {
		t.Errorf("hub stats: %d conns, %d dead peers; want 1 and 1", st.Conns, st.DeadPeers)
	}
	healthy.closeNormally()
	checkClosedNormally(t, s.ended("healthy", 1, time.Second))
}
