package interop_test

import (
	"encoding/base64"
	"errors"
	"testing"
	"time"

	cws "github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// startPeer runs node/peer.mjs (a ws client) against url and waits for
// its handshake.
func startPeer(t testing.TB, url string, flags ...string) *nodeProc {
	t.Helper()
	p := startNode(t, "peer.mjs", append([]string{url}, flags...)...)
	ready, _ := p.wait(0, "ready", 10*time.Second)
	checkWSVersion(t, ready)
	p.wait(0, "open", 10*time.Second)
	return p
}

// A ws client with autoPong: false that sends nothing is found dead
// within the timeout plus a margin, with ErrHeartbeatTimeout, after it
// was pinged; its socket is dropped without a close handshake (1006). A
// ws client with the default autoPong on the same hub stays.
func TestNodeWSAutoPongOffDetectedDead(t *testing.T) {
	s := newServer(t)
	healthy := startPeer(t, s.url("node-healthy"))
	s.conn("node-healthy", 1, time.Second)
	mute := startPeer(t, s.url("node-mute"), "--auto-pong=false")
	s.conn("node-mute", 1, time.Second)

	dead := s.ended("node-mute", 1, hbTimeout+deadMargin+time.Second)
	checkDeadOnTime(t, dead)
	if n := mute.count("ping"); n < 1 {
		t.Errorf("the mute ws peer saw %d pings before it was dropped, want at least 1", n)
	}
	if n := mute.count("pong"); n != 0 {
		t.Errorf("the mute ws peer got %d pongs: it sent a ping?", n)
	}
	cl, _ := mute.wait(0, "close", 2*time.Second)
	if cl.Code != 1006 {
		t.Errorf("the mute ws peer saw close %d, want 1006 (dropped without a close handshake)", cl.Code)
	}
	if err := mute.waitExit(5 * time.Second); err != nil {
		t.Errorf("mute peer: %v", err)
	}

	time.Sleep(2 * hbTimeout)
	checkAlive(t, s.record("node-healthy", 1), 2)
	if st := s.Hub().Stats(); st.Conns != 1 || st.DeadPeers != 1 {
		t.Errorf("hub stats: %d conns, %d dead peers; want 1 and 1", st.Conns, st.DeadPeers)
	}
	healthy.command(map[string]any{"cmd": "close", "code": 1000})
	checkClosedNormally(t, s.ended("node-healthy", 1, 2*time.Second))
}

// A ws client with the default autoPong answers the hub's pings and stays
// connected across several timeouts without sending anything, then
// exchanges raw messages both ways and closes with 1000.
func TestNodeWSStaysConnected(t *testing.T) {
	s := newServer(t)
	s.setOnConnect(func(c *tether.Conn) {
		if err := s.Hub().Subscribe(c, "raw:node"); err != nil {
			t.Errorf("Subscribe: %v", err)
		}
	})
	p := startPeer(t, s.url("node"))
	if open, _ := p.wait(0, "open", time.Second); open.Protocol != "" {
		t.Fatalf("ws negotiated %q, want raw mode", open.Protocol)
	}
	s.conn("node", 1, time.Second)

	time.Sleep(alive)
	checkAlive(t, s.record("node", 1), 3)
	if n := p.count("ping"); n < 3 {
		t.Errorf("the ws peer saw %d pings, want at least 3", n)
	}

	p.command(map[string]any{"cmd": "send", "text": "hello from ws"})
	s.message("node", 1, "hello from ws", time.Second)
	p.command(map[string]any{"cmd": "send", "binary": base64.StdEncoding.EncodeToString([]byte{0, 1, 2, 0xff})})
	s.message("node", 1, "\x00\x01\x02\xff", time.Second)

	from := p.len()
	if err := s.Hub().Publish("raw:node", []byte(`{"to":"node"}`)); err != nil {
		t.Fatal(err)
	}
	m, _ := p.wait(from, "message", time.Second)
	if m.Text == nil || *m.Text != `{"to":"node"}` {
		t.Fatalf("published: ws got %s", m)
	}

	p.command(map[string]any{"cmd": "close", "code": 1000, "reason": "done"})
	checkClosedNormally(t, s.ended("node", 1, 2*time.Second))
	if cl, _ := p.wait(0, "close", 2*time.Second); cl.Code != 1000 {
		t.Errorf("ws saw close %d, want the hub to echo 1000", cl.Code)
	}
}

// v1Reader reads the protocol v1 messages a node/peer.mjs received.
type v1Reader struct {
	t     testing.TB
	p     *nodeProc
	next  int // index of the next event to read
	lines []wire
}

// expect returns the next protocol message, skipping presence, and fails
// unless its op is op.
func (r *v1Reader) expect(op string) wire {
	r.t.Helper()
	for {
		for len(r.lines) == 0 {
			e, i := r.r(2 * time.Second)
			r.next = i + 1
			if e.Text == nil {
				r.t.Fatalf("the hub sent a binary message to a v1 peer: %s", e)
			}
			r.lines = splitLines(r.t, []byte(*e.Text))
		}
		w := r.lines[0]
		r.lines = r.lines[1:]
		if w.Op == "presence" && op != "presence" {
			continue
		}
		if w.Op != op {
			r.t.Fatalf("got %s, want op %q", w, op)
		}
		return w
	}
}

func (r *v1Reader) r(d time.Duration) (event, int) {
	r.t.Helper()
	return r.p.waitFor(r.next, d, "a message", func(e event) bool {
		if e.Ev == "close" {
			r.t.Fatalf("the socket closed while waiting for a message: %s", e)
		}
		return e.Ev == "message"
	})
}

// A raw ws client that offers tether.v1 and sends frames the JS client
// never would: each gets the documented answer (PROTOCOL.md, sections 4,
// 5 and 7) and the conn stays, until a message over the size limit closes
// it with 1009.
func TestNodeWSProtocolV1BadInput(t *testing.T) {
	s := newServer(t) // the default message size limit, 64 KiB
	p := startPeer(t, s.url("node-raw-v1"), "--protocol="+tether.Subprotocol)
	if open, _ := p.wait(0, "open", time.Second); open.Protocol != tether.Subprotocol {
		t.Fatalf("ws negotiated %q, want %q", open.Protocol, tether.Subprotocol)
	}
	r := &v1Reader{t: t, p: p}
	r.expect("welcome")

	send := func(text string) { p.command(map[string]any{"cmd": "send", "text": text}) }
	wantError := func(code, id string) {
		t.Helper()
		w := r.expect("error")
		if w.Code != code || w.ID != id || w.Reason == "" {
			t.Fatalf("got %s, want error %s with id %q and a reason", w, code, id)
		}
	}

	send(`{"op":"subscribe","topic":"t","id":"u1"}`)
	wantError("unknown_op", "u1")
	send(`{"op":"welcome","session":"x","heartbeat":{"interval_ms":1,"timeout_ms":2}}`) // only servers send it
	wantError("unknown_op", "")
	send(`this is not JSON`)
	wantError("bad_request", "")
	send(`{"op":"sub","id":"b1"}`) // no topic
	wantError("bad_request", "b1")
	send(`{"op":"pub","topic":"t","data":1,"id":"b2","seq":1.5}`) // unknown members are ignored
	wantError("forbidden", "b2")                                  // and without WithClientPublish, pub is refused
	send(`{"op":"sub","topic":17,"id":"b3"}`)                     // wrong type
	wantError("bad_request", "b3")
	// A binary message holds records (PROTOCOL.md 2.1): a len past its end
	// is refused; a line without len is read as in a text message.
	p.command(map[string]any{"cmd": "send", "binary": base64.StdEncoding.EncodeToString([]byte(`{"op":"send","len":99}` + "\nab"))})
	wantError("bad_request", "")
	p.command(map[string]any{"cmd": "send", "binary": base64.StdEncoding.EncodeToString([]byte(`{"op":"ping","ts":7}`))})
	if w := r.expect("pong"); w.TS != 7 {
		t.Fatalf("pong %s: want ts 7", w)
	}

	// Two requests in one message, and a resume from an epoch the hub
	// never had: ack, then resync with the current epoch.
	send(`{"op":"ping","ts":-5}` + "\n" + `{"op":"sub","topic":"t","since":{"epoch":"stale","seq":3},"id":"r1"}` + "\n")
	if w := r.expect("pong"); w.TS != -5 {
		t.Fatalf("pong %s: want ts -5", w)
	}
	ack := r.expect("ack")
	rs := r.expect("resync")
	if ack.ID != "r1" || rs.Topic != "t" || rs.Epoch == "" || rs.Epoch == "stale" {
		t.Fatalf("resume from a stale epoch: got %s then %s, want ack r1 then resync of t with the current epoch", ack, rs)
	}

	// The conn survived all of that.
	if rec := s.record("node-raw-v1", 1); !rec.ended.IsZero() {
		t.Fatalf("conn ended after bad input: %v", rec.reason)
	}
	if st := s.Hub().Stats(); st.BadRequests != 6 {
		t.Errorf("hub counted %d bad requests, want 6", st.BadRequests)
	}

	// Exactly 64 KiB is read (and refused as not JSON); one byte more
	// closes the conn.
	p.command(map[string]any{"cmd": "send", "repeat": "x", "times": 64 << 10})
	wantError("bad_request", "")
	p.command(map[string]any{"cmd": "send", "repeat": "x", "times": 64<<10 + 1})
	end := s.ended("node-raw-v1", 1, 2*time.Second)
	if !errors.Is(end.reason, tether.ErrMessageTooBig) {
		t.Errorf("conn ended with %v, want ErrMessageTooBig", end.reason)
	}
	if cl, _ := p.wait(0, "close", 2*time.Second); cl.Code != int(cws.StatusMessageTooBig) {
		t.Errorf("ws saw close %d %q, want 1009", cl.Code, cl.Reason)
	}
}
