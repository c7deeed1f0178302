package tether_test

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

// The Go client's side of the user's inbox (PROTOCOL.md, section 10.1),
// over loopback against a hub WithInbox: inbox messages reach the
// OnMessage handler once each, in order, with their position, across
// zombie conns, lost acknowledgements and reconnects, and are
// acknowledged a WebSocket message at a time.

// countingInbox is an adapter.Inbox that counts the acknowledgements the
// hub passes on: one per received a client sent.
type countingInbox struct {
	adapter.Inbox
	acks atomic.Int64
}

func (b *countingInbox) Ack(ctx context.Context, userID string, pos tether.Position) error {
	b.acks.Add(1)
	return b.Inbox.Ack(ctx, userID, pos)
}

// inboxSite is a hub with an inbox, its users named by the query
// parameter user, behind an HTTP server that can refuse handshakes (503)
// for a while, so that a client stays away while messages pile up.
type inboxSite struct {
	hub  *tether.Hub
	box  *countingInbox
	srv  *httptest.Server
	down atomic.Bool
}

func newInboxSite(t *testing.T, opts ...tether.HubOption) *inboxSite {
	t.Helper()
	s := &inboxSite{box: &countingInbox{Inbox: adapter.NewMemoryInbox(5000, 10*time.Minute, 64<<20)}}
	hub, err := tether.NewHub(append([]tether.HubOption{
		tether.WithInbox(s.box),
		tether.WithAuth(func(r *http.Request) (string, error) { return r.URL.Query().Get("user"), nil }),
	}, opts...)...)
	if err != nil {
		t.Fatalf("NewHub: %v", err)
	}
	s.hub = hub
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.down.Load() {
			http.Error(w, "down for a while", http.StatusServiceUnavailable)
			return
		}
		hub.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		hub.Close()
		s.srv.Close()
	})
	return s
}

func (s *inboxSite) addr() string { return s.srv.Listener.Addr().String() }

func (s *inboxSite) url(user string) string { return "ws://" + s.addr() + "/ws?user=" + user }

// pending returns the seqs of the user's unacknowledged messages.
func (s *inboxSite) pending(t testing.TB, user string) []uint64 {
	t.Helper()
	_, entries, err := s.box.Pending(context.Background(), user)
	if err != nil {
		t.Fatal(err)
	}
	seqs := make([]uint64, len(entries))
	for i, e := range entries {
		seqs[i] = e.Seq
	}
	return seqs
}

// awaitAcked waits until the user's inbox holds nothing unacknowledged.
func (s *inboxSite) awaitAcked(t testing.TB, user string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		p := s.pending(t, user)
		if len(p) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's inbox still holds %d messages after 10 s (first seq %d): not acknowledged", user, len(p), p[0])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// send sends n1..n2 to the user, numbered.
func (s *inboxSite) send(t testing.TB, user string, from, to int) {
	t.Helper()
	for i := from; i <= to; i++ {
		if err := s.hub.SendToUser(user, numbered(i)); err != nil {
			t.Fatalf("SendToUser %d: %v", i, err)
		}
	}
}

// directBox collects what a client's OnMessage handler gets, and on
// which conn.
type directBox struct {
	mu    sync.Mutex
	msgs  []tether.Message
	conns []*tether.Conn
	ch    chan struct{}
}

func newDirectBox() *directBox { return &directBox{ch: make(chan struct{}, 1)} }

func (b *directBox) option() tether.DialOption {
	return tether.OnMessage(func(c *tether.Conn, m tether.Message) {
		b.mu.Lock()
		b.msgs = append(b.msgs, m)
		b.conns = append(b.conns, c)
		b.mu.Unlock()
		select {
		case b.ch <- struct{}{}:
		default:
		}
	})
}

func (b *directBox) len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.msgs)
}

func (b *directBox) all() ([]tether.Message, []*tether.Conn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]tether.Message(nil), b.msgs...), append([]*tether.Conn(nil), b.conns...)
}

// await waits until the handler has had n messages, and returns them.
func (b *directBox) await(t testing.TB, n int) ([]tether.Message, []*tether.Conn) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for b.len() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the handler got %d direct messages in 15 s, want %d", b.len(), n)
		}
		select {
		case <-b.ch:
		case <-time.After(50 * time.Millisecond):
		}
	}
	return b.all()
}

// errorLog records what a client reports to Observer.Error.
type errorLog struct {
	mu   sync.Mutex
	errs []error
}

func (l *errorLog) option() tether.DialOption {
	return tether.WithObserver(tether.Observer{Error: func(err error) {
		l.mu.Lock()
		l.errs = append(l.errs, err)
		l.mu.Unlock()
	}})
}

func (l *errorLog) all() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]error(nil), l.errs...)
}

// checkInboxRun fails unless msgs are n=from..to, in order, once each,
// each an inbox message of epoch at seq first..: the epoch is that of
// the first when epoch is "".
func checkInboxRun(t testing.TB, msgs []tether.Message, from, to int, epoch string, first uint64) {
	t.Helper()
	checkRun(t, msgs, from, to)
	if epoch == "" && len(msgs) > 0 {
		epoch = msgs[0].Position.Epoch
	}
	for i, m := range msgs {
		if want := (tether.Position{Epoch: epoch, Seq: first + uint64(i)}); m.Position != want || epoch == "" || m.Topic != "" {
			t.Fatalf("message %d: topic %q position %+v, want an inbox message at %+v", i, m.Topic, m.Position, want)
		}
	}
}

// checkInboxPositions fails unless msgs are inbox messages in the order of
// their positions: seq one more than the message before's in its epoch,
// or 1 in a new epoch (a memory inbox forgets a user's emptied inbox).
func checkInboxPositions(t testing.TB, msgs []tether.Message) {
	t.Helper()
	var last tether.Position
	for i, m := range msgs {
		p := m.Position
		ok := m.Topic == "" && p.Epoch != "" && (p.Epoch == last.Epoch && p.Seq == last.Seq+1 || p.Epoch != last.Epoch && p.Seq == 1)
		if !ok {
			t.Fatalf("message %d: topic %q position %+v after %+v", i, m.Topic, p, last)
		}
		last = p
	}
}

// TestClientInboxLive: messages sent while the client is connected reach
// the handler once each, in order, with their position in the inbox; the
// client acknowledges them, so a second conn of the user gets no replay.
// Once the inbox has emptied, the next message starts a new epoch from
// seq 1: the client takes it as new.
func TestClientInboxLive(t *testing.T) {
	s := newInboxSite(t)
	box := newDirectBox()
	errs := &errorLog{}
	cl := dial(t, s.url("ann"), box.option(), errs.option(), fastBackoff)
	conn := cl.Conn()

	s.send(t, "ann", 1, 20)
	msgs, conns := box.await(t, 20)
	checkRun(t, msgs, 1, 20)
	checkInboxPositions(t, msgs)
	for i, c := range conns {
		if c != conn {
			t.Fatalf("message %d arrived on another conn: the client reconnected", i)
		}
	}
	epoch := msgs[19].Position.Epoch
	s.awaitAcked(t, "ann")
	if n := s.box.acks.Load(); n < 1 || n > 20 {
		t.Errorf("%d received for 20 messages", n)
	}

	// A second client of ann gets no replay: the first message it gets is
	// the next one sent.
	other := newDirectBox()
	dial(t, s.url("ann"), other.option(), fastBackoff)
	s.send(t, "ann", 21, 21)
	got, _ := other.await(t, 1)
	if numOf(t, got[0].Data) != 21 {
		t.Fatalf("the second client's first message is n=%d, want 21: acknowledged messages were replayed", numOf(t, got[0].Data))
	}
	msgs, _ = box.await(t, 21)
	checkRun(t, msgs, 1, 21)
	// The inbox was empty, so forgotten: a new epoch, from 1, which the
	// client takes as new although 1 <= 20.
	if p := msgs[20].Position; p.Epoch == epoch || p.Seq != 1 || got[0].Position != p {
		t.Errorf("after the inbox emptied: positions %+v and %+v, want one new epoch at seq 1 (old epoch %q)", p, got[0].Position, epoch)
	}
	s.awaitAcked(t, "ann")
	if e := errs.all(); len(e) > 0 {
		t.Errorf("the client reported %v", e)
	}
}

// TestClientInboxZombie: a message sent while the client's conn is a
// zombie (alive to the hub, which queues to it, but carrying nothing)
// reaches the handler once, on the next conn, from the inbox's replay.
func TestClientInboxZombie(t *testing.T) {
	// The client follows the welcome's heartbeat: it finds the frozen conn
	// dead after a few hundred ms of silence at the least, long after the
	// message is sent into it.
	s := newInboxSite(t, tether.WithHeartbeat(500*time.Millisecond, 2*time.Second))
	p := newProxy(t, s.addr())
	box := newDirectBox()
	st := newStates()
	cl := dial(t, p.url()+"?user=ann", box.option(), st.option(), fastBackoff)

	s.send(t, "ann", 1, 1)
	box.await(t, 1)
	s.awaitAcked(t, "ann")
	zombie := cl.Conn()

	p.freeze()
	s.send(t, "ann", 2, 2)
	if cl.Conn() != zombie {
		t.Fatal("the client left its frozen conn before the message was sent: no zombie window")
	}
	if got := s.pending(t, "ann"); len(got) != 1 {
		t.Fatalf("pending after the send into the zombie: seqs %v, want one", got)
	}

	msgs, conns := box.await(t, 2)
	checkRun(t, msgs, 1, 2)
	// Message 1 was acknowledged, which emptied the inbox: message 2
	// starts a new epoch.
	checkInboxRun(t, msgs[1:], 2, 2, "", 1)
	if msgs[1].Position.Epoch == msgs[0].Position.Epoch {
		t.Errorf("positions %+v then %+v: want a new epoch once the inbox emptied", msgs[0].Position, msgs[1].Position)
	}
	if conns[1] == zombie {
		t.Fatal("message 2 arrived on the frozen conn")
	}
	if !contains(st.all(), tether.Reconnecting) {
		t.Errorf("states %v: the client did not reconnect", st.all())
	}
	s.awaitAcked(t, "ann")

	// And nothing more: the next message is 3.
	s.send(t, "ann", 3, 3)
	msgs, _ = box.await(t, 3)
	checkRun(t, msgs, 1, 3)
}

func contains(states []tether.State, s tether.State) bool {
	for _, x := range states {
		if x == s {
			return true
		}
	}
	return false
}

// TestClientInboxLostReceived: a message handed to the application whose
// received never reached the hub comes again on the next conn; the client
// drops it, so the application sees it once, and acknowledges it.
func TestClientInboxLostReceived(t *testing.T) {
	s := newInboxSite(t)
	p := newProxy(t, s.addr())
	box := newDirectBox()
	cl := dial(t, p.url()+"?user=ann", box.option(), fastBackoff)

	s.send(t, "ann", 1, 1)
	box.await(t, 1)
	s.awaitAcked(t, "ann")

	// What the client sends from now on is lost on the way: the received
	// of message 2 among it.
	p.freezeRequests()
	s.send(t, "ann", 2, 2)
	msgs, conns := box.await(t, 2)
	first := conns[1]
	if got := s.pending(t, "ann"); len(got) != 1 || got[0] != msgs[1].Position.Seq {
		t.Fatalf("pending after message 2 (at %+v) was handed over: seqs %v, want it alone (its received lost)", msgs[1].Position, got)
	}

	// The hub ends the conn: the next one (through the proxy, forwarding
	// again) gets message 2 again, which the client drops and acknowledges.
	if _, err := s.hub.DisconnectUser("ann", websocket.StatusNormalClosure, "bye"); err != nil {
		t.Fatal(err)
	}
	s.awaitAcked(t, "ann")
	if cl.Conn() == first {
		t.Fatal("acknowledged through the frozen conn")
	}
	s.send(t, "ann", 3, 3)
	msgs, _ = box.await(t, 3)
	checkRun(t, msgs, 1, 3)
	if n := box.len(); n != 3 {
		t.Fatalf("the handler got %d messages, want 3", n)
	}
}

// TestClientInboxReplay: 1,000 messages sent while the client was away
// come, after its reconnect, in order, once each; the client acknowledges
// them a WebSocket message at a time, far below the hub's rate limit
// (burst 200), and its conn stays.
func TestClientInboxReplay(t *testing.T) {
	const n = 1000
	s := newInboxSite(t)
	box := newDirectBox()
	st := newStates()
	errs := &errorLog{}
	cl := dial(t, s.url("ann"), box.option(), st.option(), errs.option(), fastBackoff)

	s.send(t, "ann", 1, 1)
	box.await(t, 1)
	s.awaitAcked(t, "ann")
	before := s.box.acks.Load()

	s.down.Store(true)
	if _, err := s.hub.DisconnectUser("ann", websocket.StatusNormalClosure, "away"); err != nil {
		t.Fatal(err)
	}
	st.await(t, tether.Reconnecting)
	s.send(t, "ann", 2, n+1)
	if got := len(s.pending(t, "ann")); got != n {
		t.Fatalf("%d pending, want %d", got, n)
	}
	s.down.Store(false)
	st.await(t, tether.Connected)

	msgs, conns := box.await(t, n+1)
	// The inbox emptied after message 1: a new epoch, from seq 1.
	checkInboxRun(t, msgs[1:], 2, n+1, "", 1)
	s.awaitAcked(t, "ann")
	if got := s.hub.Stats().RateLimited; got != 0 {
		t.Errorf("the hub refused %d messages of the client for its rate limit", got)
	}
	acks := s.box.acks.Load() - before
	t.Logf("%d received for a replay of %d messages", acks, n)
	// The hub joins the replay into a few WebSocket messages. A received
	// per message, even paced, would be at least the burst the client
	// allows itself (180 of the hub's 200) before the pacing set in.
	if acks < 1 || acks >= 100 {
		t.Errorf("%d received for a replay of %d messages: want a few, one per WebSocket message at most", acks, n)
	}

	// The conn that took the replay is still up: the next message arrives
	// on it.
	s.send(t, "ann", n+2, n+2)
	more, moreConns := box.await(t, n+2)
	checkRun(t, more, 1, n+2)
	if moreConns[n+1] != conns[n] || cl.Conn() != conns[n] {
		t.Fatalf("the conn of the replay ended (states %v)", st.all())
	}
	for _, err := range errs.all() {
		t.Errorf("the client reported %v", err)
	}
}

// TestClientInboxKinds: bytes (SendToUserBinary) and text that is not
// JSON go through the inbox as they were sent, live and replayed (records
// of a binary message), with their positions, and are acknowledged.
func TestClientInboxKinds(t *testing.T) {
	s := newInboxSite(t)
	box := newDirectBox()
	st := newStates()
	dial(t, s.url("ann"), box.option(), st.option(), fastBackoff)

	type sent struct {
		data   []byte
		binary bool
	}
	batch := []sent{
		{[]byte{0, 1, 2, 0xff, '\n', '{'}, true},
		{[]byte("plain text, not JSON\nover two lines"), false},
		{[]byte(`{"n": 1}`), false},
		{[]byte{}, true},
	}
	sendAll := func() {
		for _, m := range batch {
			var err error
			if m.binary {
				err = s.hub.SendToUserBinary("ann", m.data)
			} else {
				err = s.hub.SendToUser("ann", m.data)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	check := func(msgs []tether.Message) {
		t.Helper()
		checkInboxPositions(t, msgs)
		for i, m := range msgs {
			if want := batch[i]; !bytes.Equal(m.Data, want.data) || m.Binary != want.binary {
				t.Errorf("message %d: %q binary=%v, want %q binary=%v", i, m.Data, m.Binary, want.data, want.binary)
			}
		}
	}

	// Live.
	sendAll()
	msgs, _ := box.await(t, len(batch))
	check(msgs)
	s.awaitAcked(t, "ann")

	// Replayed after a reconnect.
	s.down.Store(true)
	if _, err := s.hub.DisconnectUser("ann", websocket.StatusNormalClosure, "away"); err != nil {
		t.Fatal(err)
	}
	st.await(t, tether.Reconnecting)
	sendAll()
	s.down.Store(false)
	msgs, _ = box.await(t, 2*len(batch))
	// Kept while the client was away: one epoch, from 1.
	check(msgs[len(batch):])
	if p := msgs[2*len(batch)-1].Position; p.Seq != uint64(len(batch)) {
		t.Errorf("the last replayed message is at %+v, want seq %d", p, len(batch))
	}
	s.awaitAcked(t, "ann")
	if got := box.len(); got != 2*len(batch) {
		t.Errorf("the handler got %d messages, want %d", got, 2*len(batch))
	}
}

// TestClientDirectWithoutInbox: without an inbox, direct messages have
// no position and the client acknowledges nothing (a hub without an inbox
// would refuse a received).
func TestClientDirectWithoutInbox(t *testing.T) {
	srv := newHubServer(t, tether.WithAuth(func(r *http.Request) (string, error) { return r.URL.Query().Get("user"), nil }))
	box := newDirectBox()
	errs := &errorLog{}
	cl := dial(t, srv.url()+"/ws?user=ann", box.option(), errs.option())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := 1; i <= 3; i++ {
		if err := srv.hub.SendToUser("ann", numbered(i)); err != nil {
			t.Fatal(err)
		}
	}
	msgs, _ := box.await(t, 3)
	checkRun(t, msgs, 1, 3)
	for i, m := range msgs {
		if m.Position != (tether.Position{}) {
			t.Errorf("message %d has position %+v without an inbox", i, m.Position)
		}
	}
	// A ping's round trip: the refusal of a received sent before it
	// would have been read, and reported, before the pong.
	if _, err := cl.Conn().Ping(ctx); err != nil {
		t.Fatal(err)
	}
	for _, err := range errs.all() {
		t.Errorf("the client reported %v", err)
	}
}

// TestClientInboxPacedReceived: inbox messages that come one WebSocket
// message each, faster than the hub's rate limit allows the client to
// send, get their received paced within it: several WebSocket messages
// then share one, and the hub refuses none.
func TestClientInboxPacedReceived(t *testing.T) {
	const n = 100
	s := newInboxSite(t, tether.WithRateLimit(20, 10))
	box := newDirectBox()
	errs := &errorLog{}
	st := newStates()
	cl := dial(t, s.url("ann"), box.option(), errs.option(), st.option(), fastBackoff)
	conn := cl.Conn()
	for i := 1; i <= n; i++ {
		s.send(t, "ann", i, i)
		box.await(t, i) // apart: each in a WebSocket message of its own
	}
	msgs, conns := box.await(t, n)
	checkRun(t, msgs, 1, n)
	checkInboxPositions(t, msgs)
	s.awaitAcked(t, "ann")
	t.Logf("%d received for %d messages", s.box.acks.Load(), n)
	// The last received has been read, and so every request before it.
	if got := s.hub.Stats().RateLimited; got != 0 {
		t.Errorf("the hub refused %d messages of the client for its rate limit", got)
	}
	for _, err := range errs.all() {
		t.Errorf("the client reported %v", err)
	}
	if cl.Conn() != conn || conns[n-1] != conn {
		t.Errorf("the conn ended (states %v)", st.all())
	}
}
