package tether_test

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

// This file checks resume (PROTOCOL.md section 10: replay or resync, then
// live messages, as one sequence) and the offline store of SendToUser,
// over real sockets.

// rsNoPresence keeps presence messages out of the streams these tests read
// message by message.
var rsNoPresence = tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Off: true} })

func rsData(n int) string { return `{"n":` + strconv.Itoa(n) + `}` }

// rsPublish publishes rsData(from) to rsData(to) on topic.
func rsPublish(t *testing.T, s *hubServer, topic string, from, to int) {
	t.Helper()
	for n := from; n <= to; n++ {
		if err := s.hub.Publish(topic, []byte(rsData(n))); err != nil {
			t.Fatalf("Publish %d: %v", n, err)
		}
	}
}

// rsExpectMsgs reads the next messages of c, which must be the msgs of
// topic with seqs from to to, in epoch (any epoch when ""), carrying
// rsData(seq). It returns the epoch.
func rsExpectMsgs(t *testing.T, c *client, topic, epoch string, from, to int) string {
	t.Helper()
	for n := from; n <= to; n++ {
		m := c.next(5 * time.Second)
		if m.Op != "msg" || m.Topic != topic || m.Seq != uint64(n) || string(m.Data) != rsData(n) || m.Epoch == "" {
			t.Fatalf("got %s, want msg %s seq %d", m.line, topic, n)
		}
		if epoch == "" {
			epoch = m.Epoch
		} else if m.Epoch != epoch {
			t.Fatalf("got %s, want epoch %s", m.line, epoch)
		}
	}
	return epoch
}

// rsResume dials a new client and subscribes it to topic since
// {epoch, seq}; the ack must come first.
func rsResume(t *testing.T, s *hubServer, topic, epoch string, seq uint64) *client {
	t.Helper()
	c := dialClient(t, s.url(), clientOpts{})
	c.welcome()
	c.send(`{"op":"sub","topic":` + quote(topic) + `,"since":{"epoch":` + quote(epoch) + `,"seq":` +
		strconv.FormatUint(seq, 10) + `},"id":"r"}`)
	if a := c.next(5 * time.Second); a.Op != "ack" || a.ID != "r" {
		t.Fatalf("resume since %s/%d: got %s, want ack r first", epoch, seq, a.line)
	}
	return c
}

// rsExpectResync reads a resync of topic in epoch (any epoch when "") and
// returns its epoch.
func rsExpectResync(t *testing.T, c *client, topic, epoch string) string {
	t.Helper()
	m := c.next(5 * time.Second)
	if m.Op != "resync" || m.Topic != topic || m.Epoch == "" || epoch != "" && m.Epoch != epoch {
		t.Fatalf("got %s, want a resync of %s in epoch %q", m.line, topic, epoch)
	}
	return m.Epoch
}

// rsFirstRun subscribes a client to topic, publishes 1 to n, reads them,
// disconnects it and waits until the hub has let it go. It returns the
// topic's epoch.
func rsFirstRun(t *testing.T, s *hubServer, topic string, n int) string {
	t.Helper()
	a := dialClient(t, s.url(), clientOpts{})
	a.welcome()
	a.subscribe(topic)
	rsPublish(t, s, topic, 1, n)
	epoch := rsExpectMsgs(t, a, topic, "", 1, n)
	a.Close()
	waitFor(t, 5*time.Second, "first client unregistered", func() bool { return s.hub.Len() == 0 })
	return epoch
}

// 17. A client that resumes gets the ack, then exactly what it missed, in
// order, then live messages, without a gap or a duplicate.
func TestHubResumeReplaysMissed(t *testing.T) {
	s := newHubServer(t, rsNoPresence)
	epoch := rsFirstRun(t, s, "t", 10)
	rsPublish(t, s, "t", 11, 20) // while nobody listens

	b := rsResume(t, s, "t", epoch, 10)
	rsExpectMsgs(t, b, "t", epoch, 11, 20)
	rsPublish(t, s, "t", 21, 30)
	rsExpectMsgs(t, b, "t", epoch, 21, 30)
	b.quiet(200 * time.Millisecond)
}

// 17, under concurrency: a publisher keeps publishing while the client
// resubscribes; what follows the ack is one contiguous sequence from 11.
func TestHubResumeWhilePublishing(t *testing.T) {
	s := newHubServer(t, rsNoPresence,
		tether.WithHistory(adapter.NewMemoryHistory(1<<16, time.Minute)),
		tether.WithLimits(tether.Limits{SendQueue: 1 << 16, SendQueueBytes: 32 << 20}))
	epoch := rsFirstRun(t, s, "t", 10)

	const most = 40000
	var published atomic.Int64
	published.Store(10)
	stop := make(chan struct{})
	pubDone := make(chan error, 1)
	go func() {
		pubDone <- func() error {
			for n := 11; n <= most; n++ {
				select {
				case <-stop:
					return nil
				default:
				}
				if err := s.hub.Publish("t", []byte(rsData(n))); err != nil {
					return err
				}
				published.Store(int64(n))
				if n%8 == 0 {
					time.Sleep(100 * time.Microsecond)
				}
			}
			return nil
		}()
	}()
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
			<-pubDone
		}
	}()
	waitFor(t, 5*time.Second, "publisher under way", func() bool { return published.Load() >= 30 })

	b := rsResume(t, s, "t", epoch, 10)
	atAck := published.Load()
	next := 11
	read := func(upTo int) {
		t.Helper()
		for next <= upTo {
			m := b.next(5 * time.Second)
			if m.Op != "msg" || m.Topic != "t" || m.Epoch != epoch || m.Seq != uint64(next) || string(m.Data) != rsData(next) {
				t.Fatalf("after %d: got %s, want msg t seq %d in epoch %s", next-1, m.line, next, epoch)
			}
			next++
		}
	}
	// Read past the messages published while the sub was handled, and
	// then some, with the publisher still going.
	read(int(min(atAck+200, most)))
	close(stop)
	stopped = true
	if err := <-pubDone; err != nil {
		t.Fatalf("Publish: %v", err)
	}
	last := int(published.Load())
	read(last)
	b.quiet(200 * time.Millisecond)
	t.Logf("replay and live: seqs 11..%d, %d published by the ack", last, atAck)
}

// 18. Resync: when history cannot fill the gap (too old, another epoch,
// a seq beyond the last), a resync in the current epoch follows the ack,
// then live messages; within history, the replay; at the last seq, only
// live messages.
func TestHubResumeResync(t *testing.T) {
	s := newHubServer(t, rsNoPresence, tether.WithHistory(adapter.NewMemoryHistory(5, time.Minute)))
	epoch := rsFirstRun(t, s, "t", 3)
	rsPublish(t, s, "t", 4, 23) // a gap of 20; history keeps 19..23

	gap := rsResume(t, s, "t", epoch, 3)
	rsExpectResync(t, gap, "t", epoch)
	wrongEpoch := rsResume(t, s, "t", "not-"+epoch, 3)
	rsExpectResync(t, wrongEpoch, "t", epoch)
	beyond := rsResume(t, s, "t", epoch, 1000)
	rsExpectResync(t, beyond, "t", epoch)
	tooOld := rsResume(t, s, "t", epoch, 17) // needs 18..23: one too many
	rsExpectResync(t, tooOld, "t", epoch)
	inHistory := rsResume(t, s, "t", epoch, 18) // needs 19..23: all kept
	rsExpectMsgs(t, inHistory, "t", epoch, 19, 23)
	atLast := rsResume(t, s, "t", epoch, 23)
	atLast.quiet(200 * time.Millisecond)

	// A topic without history: resync, in the epoch of its first message.
	fresh := rsResume(t, s, "fresh", "whatever", 5)
	freshEpoch := rsExpectResync(t, fresh, "fresh", "")

	rsPublish(t, s, "t", 24, 25)
	rsPublish(t, s, "fresh", 1, 1)
	for _, c := range []*client{gap, wrongEpoch, beyond, tooOld, inHistory, atLast} {
		rsExpectMsgs(t, c, "t", epoch, 24, 25)
		c.quiet(0)
	}
	rsExpectMsgs(t, fresh, "fresh", freshEpoch, 1, 1)
	fresh.quiet(100 * time.Millisecond)
	for _, c := range []*client{gap, wrongEpoch, beyond, tooOld, inHistory, atLast} {
		c.quiet(0)
	}
}

// 19. A sub with since on a topic the conn is already subscribed to is
// acknowledged and changes nothing: no replay, no second snapshot.
func TestHubResumeAlreadySubscribed(t *testing.T) {
	s := newHubServer(t) // presence on: a second snapshot would show
	c := dialClient(t, s.url(), clientOpts{})
	c.welcome()
	c.subscribe("t")
	if p := c.next(5 * time.Second); p.Op != "presence" || p.Topic != "t" {
		t.Fatalf("got %s, want the presence snapshot of t", p.line)
	}
	rsPublish(t, s, "t", 1, 5)
	epoch := rsExpectMsgs(t, c, "t", "", 1, 5)

	resub := `{"op":"sub","topic":"t","since":{"epoch":` + quote(epoch) + `,"seq":2},"id":"again"}`
	c.send(resub)
	if a := c.next(5 * time.Second); a.Op != "ack" || a.ID != "again" {
		t.Fatalf("got %s, want ack again", a.line)
	}
	c.quiet(300 * time.Millisecond)

	// The same since on a conn not yet subscribed does replay: a control.
	// The snapshot, on the control lane, may come before the replay or
	// within it.
	d := rsResume(t, s, "t", epoch, 2)
	next, snapshots := 3, 0
	for next <= 5 || snapshots == 0 {
		switch m := d.next(5 * time.Second); {
		case m.Op == "presence" && m.Snapshot && snapshots == 0:
			snapshots++
		case m.Op == "msg" && m.Seq == uint64(next) && m.Epoch == epoch && string(m.Data) == rsData(next):
			next++
		default:
			t.Fatalf("got %s, want msg t seq %d or the presence snapshot", m.line, next)
		}
	}
	d.send(resub)
	if a := d.next(5 * time.Second); a.Op != "ack" || a.ID != "again" {
		t.Fatalf("got %s, want ack again", a.line)
	}

	rsPublish(t, s, "t", 6, 6)
	for _, cl := range []*client{c, d} {
		rsExpectMsgs(t, cl, "t", epoch, 6, 6)
		cl.quiet(200 * time.Millisecond)
	}
}

// rsUser returns the handshake header of user.
func rsUser(user string) http.Header {
	h := http.Header{}
	h.Set("X-User", user)
	return h
}

var rsAuth = tether.WithAuth(func(r *http.Request) (string, error) { return r.Header.Get("X-User"), nil })

// rsExpectDirect reads the next message, which must be a direct msg (no
// topic, epoch or seq) with data.
func rsExpectDirect(t *testing.T, c *client, data string) {
	t.Helper()
	m := c.next(5 * time.Second)
	if m.Op != "msg" || string(m.Data) != data {
		t.Fatalf("got %s, want a direct msg with %s", m.line, data)
	}
	for k := range hpKeys(t, m.line) {
		if k == "topic" || k == "epoch" || k == "seq" {
			t.Fatalf("direct msg %s has a %s", m.line, k)
		}
	}
}

// 20. SendToUser to an offline user keeps the messages; they follow the
// welcome of the user's next conn, in order, once.
func TestHubOfflineDeliveredOnConnect(t *testing.T) {
	s := newHubServer(t, rsAuth)
	for n := 1; n <= 5; n++ {
		if err := s.hub.SendToUser("carol", []byte(rsData(n))); err != nil {
			t.Fatalf("SendToUser %d while offline: %v", n, err)
		}
	}
	if err := s.hub.SendToUser("dave", []byte(`"for dave"`)); err != nil {
		t.Fatal(err)
	}
	if s.hub.Online("carol") {
		t.Fatal("Online(carol) before she connects")
	}

	carol := dialClient(t, s.url(), clientOpts{header: rsUser("carol")})
	carol.welcome()
	for n := 1; n <= 5; n++ {
		rsExpectDirect(t, carol, rsData(n))
	}
	if !s.hub.Online("carol") {
		t.Fatal("Online(carol) = false while connected")
	}
	if err := s.hub.SendToUser("carol", []byte(`{"live":true}`)); err != nil {
		t.Fatalf("SendToUser while online: %v", err)
	}
	rsExpectDirect(t, carol, `{"live":true}`)
	carol.quiet(200 * time.Millisecond) // nothing of dave's

	// A second device gets nothing kept, but live messages like the first.
	carol2 := dialClient(t, s.url(), clientOpts{header: rsUser("carol")})
	carol2.welcome()
	carol2.quiet(200 * time.Millisecond)
	if err := s.hub.SendToUser("carol", []byte(`[1,2]`)); err != nil {
		t.Fatal(err)
	}
	rsExpectDirect(t, carol, `[1,2]`)
	rsExpectDirect(t, carol2, `[1,2]`)

	// Gone and back: the store was drained, nothing comes again.
	carol.Close()
	carol2.Close()
	waitFor(t, 5*time.Second, "carol offline", func() bool { return !s.hub.Online("carol") })
	carol3 := dialClient(t, s.url(), clientOpts{header: rsUser("carol")})
	carol3.welcome()
	carol3.quiet(300 * time.Millisecond)
}

// 20, bounds: a message over the per-user bytes is refused with
// ErrOfflineFull; past the per-user count the oldest messages go.
func TestHubOfflineFull(t *testing.T) {
	s := newHubServer(t, rsAuth, tether.WithOfflineStore(adapter.NewMemoryOfflineStore(2, 1<<20, time.Hour, 1<<20)))
	big := []byte(`"` + strings.Repeat("x", 1<<20) + `"`)
	if err := s.hub.SendToUser("dave", big); !errors.Is(err, adapter.ErrOfflineFull) {
		t.Fatalf("SendToUser of %d bytes: %v, want ErrOfflineFull", len(big), err)
	}
	for n := 1; n <= 3; n++ {
		if err := s.hub.SendToUser("dave", []byte(rsData(n))); err != nil {
			t.Fatalf("SendToUser %d: %v", n, err)
		}
	}
	dave := dialClient(t, s.url(), clientOpts{header: rsUser("dave")})
	dave.welcome()
	rsExpectDirect(t, dave, rsData(2))
	rsExpectDirect(t, dave, rsData(3))
	dave.quiet(200 * time.Millisecond)
}

// 20, raw mode: a raw peer gets its kept messages as the application sent
// them, one WebSocket message each, and no welcome.
func TestHubOfflineRawPeer(t *testing.T) {
	s := newHubServer(t, rsAuth)
	sent := []string{`{"n":1}`, `[2, 3]`, `"four"`}
	for _, m := range sent {
		if err := s.hub.SendToUser("carol", []byte(m)); err != nil {
			t.Fatal(err)
		}
	}
	carol := dialClient(t, s.url(), clientOpts{raw: true, header: rsUser("carol")})
	for _, want := range sent {
		if m := carol.next(5 * time.Second); m.line != want {
			t.Fatalf("raw peer got %q, want %q", m.line, want)
		}
	}
	if err := s.hub.SendToUser("carol", []byte(`{"live": 5}`)); err != nil {
		t.Fatal(err)
	}
	if m := carol.next(5 * time.Second); m.line != `{"live": 5}` {
		t.Fatalf("raw peer got %q, want the live message as sent", m.line)
	}
	carol.quiet(200 * time.Millisecond)
}

// PROTOCOL.md section 1: the server sends a raw peer "the application's
// messages untouched" (Hub.Publish and Hub.Broadcast: "as it is to raw
// peers"), pretty-printed JSON included.
func TestHubRawPeerGetsDataUntouched(t *testing.T) {
	conns := make(chan *tether.Conn, 10)
	s := newHubServer(t, rsAuth, tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) { conns <- c }}))
	pretty := "{\n  \"n\": 1,\n  \"list\": [\n    2,\n    3\n  ]\n}"
	if err := s.hub.SendToUser("carol", []byte(pretty)); err != nil {
		t.Fatal(err)
	}
	carol := dialClient(t, s.url(), clientOpts{raw: true, header: rsUser("carol")})
	var rc *tether.Conn
	select {
	case rc = <-conns:
	case <-time.After(5 * time.Second):
		t.Fatal("no conn")
	}
	if m := carol.next(5 * time.Second); m.line != pretty {
		t.Errorf("kept SendToUser: raw peer got %q, want %q", m.line, pretty)
	}
	if err := s.hub.SendToUser("carol", []byte(pretty)); err != nil {
		t.Fatal(err)
	}
	if m := carol.next(5 * time.Second); m.line != pretty {
		t.Errorf("live SendToUser: raw peer got %q, want %q", m.line, pretty)
	}
	if err := s.hub.Subscribe(rc, "news"); err != nil {
		t.Fatal(err)
	}
	if err := s.hub.Publish("news", []byte(pretty)); err != nil {
		t.Fatal(err)
	}
	if m := carol.next(5 * time.Second); m.line != pretty {
		t.Errorf("Publish: raw peer got %q, want %q", m.line, pretty)
	}
	if err := s.hub.Broadcast([]byte(pretty)); err != nil {
		t.Fatal(err)
	}
	if m := carol.next(5 * time.Second); m.line != pretty {
		t.Errorf("Broadcast: raw peer got %q, want %q", m.line, pretty)
	}
}

// SendToUser's promise: a message it kept (nil error) is delivered when
// the user next connects, whatever the conn's send queue bounds.
func TestHubOfflineBacklogBeyondSendQueue(t *testing.T) {
	for _, raw := range []bool{false, true} {
		t.Run(map[bool]string{false: "v1", true: "raw"}[raw], func(t *testing.T) {
			ends, endCh := hpEnds()
			s := newHubServer(t, rsAuth, ends, tether.WithLimits(tether.Limits{SendQueue: 8, SendQueueBytes: 4096}))
			pad := strings.Repeat("p", 300)
			const n = 20 // 20 messages of ~320 bytes: over 8 messages and 4 KiB
			var want []string
			for i := 1; i <= n; i++ {
				m := `{"n":` + strconv.Itoa(i) + `,"pad":"` + pad + `"}`
				want = append(want, m)
				if err := s.hub.SendToUser("erin", []byte(m)); err != nil {
					t.Fatalf("SendToUser %d: %v", i, err)
				}
			}
			erin := dialClient(t, s.url(), clientOpts{raw: raw, header: rsUser("erin")})
			if !raw {
				erin.welcome()
			}
			for i, w := range want {
				m, ok := erin.poll(2 * time.Second)
				if !ok {
					select {
					case e := <-endCh:
						t.Fatalf("got %d of %d kept messages; the conn ended: %v", i, n, e.reason)
					default:
					}
					t.Fatalf("got %d of %d kept messages, then nothing", i, n)
				}
				got := m.line
				if !raw {
					got = string(m.Data)
				}
				if got != w {
					t.Fatalf("message %d: got %.60q, want %.60q", i+1, got, w)
				}
			}
		})
	}
}
