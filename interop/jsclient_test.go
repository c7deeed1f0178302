package interop_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"golang.org/x/time/rate"
)

// jsClient is node/client.mjs: tether's JavaScript client on ws, driven
// step by step.
type jsClient struct {
	*nodeProc
	steps int
}

func startJSClient(t testing.TB, url string) *jsClient {
	t.Helper()
	p := startNode(t, "client.mjs", url, "--backoff-ms=20")
	ready, _ := p.wait(0, "ready", 10*time.Second)
	checkWSVersion(t, ready)
	return &jsClient{nodeProc: p}
}

// do runs one command of client.mjs and returns its result.
func (c *jsClient) do(cmd string, args ...any) event {
	c.t.Helper()
	c.steps++
	step := fmt.Sprintf("%s#%d", cmd, c.steps)
	m := map[string]any{"cmd": cmd, "step": step}
	for i := 0; i+1 < len(args); i += 2 {
		m[args[i].(string)] = args[i+1]
	}
	c.command(m)
	r, _ := c.waitFor(0, 5*time.Second, "the result of "+step, func(e event) bool { return e.Ev == "result" && e.Step == step })
	return r
}

// must runs a command that must succeed and returns its value.
func (c *jsClient) must(cmd string, args ...any) json.RawMessage {
	c.t.Helper()
	r := c.do(cmd, args...)
	if !r.OK {
		c.t.Fatalf("%s %v failed: %s", cmd, args, r.Error)
	}
	return r.Value
}

// errCode is the code of a TetherError an event carries.
func (e event) errCode() string {
	var te struct {
		Code string `json:"code"`
	}
	json.Unmarshal(e.Error, &te)
	return te.Code
}

// msgOf matches the subscription handler's call for a message of topic
// with this data.
func msgOf(topic, data string) func(event) bool {
	return func(e event) bool { return e.Ev == "msg" && e.Topic == topic && string(e.Data) == data }
}

func seqOf(e event) int64 {
	if e.Seq == nil {
		return -1
	}
	return int64(*e.Seq)
}

// jsHubOptions: clients may publish on open:*, may not subscribe to
// secret:*, presence is tracked with a short grace, and each conn's meta
// names its peer.
func jsHubOptions() []tether.HubOption {
	return []tether.HubOption{
		tether.WithClientPublish(func(_ *tether.Conn, topic string) bool { return strings.HasPrefix(topic, "open:") }),
		tether.WithSubscribeAuth(func(_ *tether.Conn, topic string) bool { return !strings.HasPrefix(topic, "secret:") }),
		tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Grace: 100 * time.Millisecond} }),
		tether.WithConnMeta(func(r *http.Request) json.RawMessage {
			b, _ := json.Marshal(map[string]string{"peer": r.URL.Query().Get("peer")})
			return b
		}),
	}
}

// Every op of PROTOCOL.md, from tether's JavaScript client in Node (ws as
// its WebSocket) to a Go hub, with a Go tether.Client on the same topic.
func TestJSClientProtocol(t *testing.T) {
	s := newServer(t, jsHubOptions()...)
	js := startJSClient(t, s.url("js"))

	// welcome: the client reports it, and adopts its heartbeat.
	w, _ := js.wait(0, "welcome", 5*time.Second)
	rec := s.conn("js", 1, time.Second)
	if w.Session != rec.conn.ID() {
		t.Errorf("welcome session %q, want the conn's ID %q", w.Session, rec.conn.ID())
	}
	if w.Heartbeat == nil || w.Heartbeat.IntervalMS != hbInterval.Milliseconds() || w.Heartbeat.TimeoutMS != hbTimeout.Milliseconds() {
		t.Fatalf("welcome %s: want heartbeat %v / %v", w, hbInterval, hbTimeout)
	}
	js.waitFor(0, 2*time.Second, "state connected", func(e event) bool { return e.Ev == "state" && e.State == "connected" })
	var info struct {
		State     string `json:"state"`
		Heartbeat struct {
			Interval int64 `json:"interval"`
			Timeout  int64 `json:"timeout"`
		} `json:"heartbeat"`
	}
	if err := json.Unmarshal(js.must("inspect"), &info); err != nil {
		t.Fatal(err)
	}
	if info.State != "connected" || info.Heartbeat.Interval != hbInterval.Milliseconds() || info.Heartbeat.Timeout != hbTimeout.Milliseconds() {
		t.Fatalf("client after the welcome: %+v, want connected with heartbeat %v / %v", info, hbInterval, hbTimeout)
	}

	// ping/pong: with the welcome's 50 ms interval (not its 15 s default)
	// the client pings the hub, which answers: 'rtt' events, soon.
	rtt, _ := js.wait(0, "rtt", time.Second)
	t.Logf("JS client: first rtt %v ms", rtt.RTT)

	// Idle across several timeouts, the conn stays.
	time.Sleep(alive)
	if rec := s.record("js", 1); !rec.ended.IsZero() {
		t.Fatalf("the JS client's conn was dropped: %v", rec.reason)
	}
	if n := js.count("rtt"); n < 3 {
		t.Errorf("%d rtt events in %v, want the client to keep pinging", n, alive)
	}
	if _, i := js.find(func(e event) bool { return e.Ev == "state" && e.State != "connected" }); i >= 0 {
		t.Fatalf("the JS client left connected: %s", js.transcript())
	}

	// sub: the ack's position resolves subscribe().
	var pos struct {
		Topic string  `json:"topic"`
		Epoch string  `json:"epoch"`
		Seq   *uint64 `json:"seq"`
	}
	if err := json.Unmarshal(js.must("subscribe", "topic", "open:room"), &pos); err != nil {
		t.Fatal(err)
	}
	if pos.Topic != "open:room" || pos.Epoch == "" || pos.Seq == nil || *pos.Seq != 0 {
		t.Fatalf("subscribe resolved with %+v, want open:room at an epoch, seq 0", pos)
	}
	if topics := rec.conn.Topics(); !slices.Contains(topics, "open:room") {
		t.Fatalf("hub: the JS conn's topics are %v", topics)
	}
	// presence: the first presence after the sub is a snapshot of the
	// room, empty but for the JS client's own user if it was announced
	// already; its join follows otherwise. A Go client joining the topic
	// is announced, with its meta. Every presence carries the count.
	snap, _ := js.waitFor(0, 2*time.Second, "presence snapshot", func(e event) bool { return e.Ev == "presence" && e.Topic == "open:room" })
	if !snap.Snapshot || snap.Count == nil || *snap.Count != len(snap.Joins) || len(snap.Leaves) != 0 {
		t.Fatalf("first presence %s: want a snapshot listing its count", snap)
	}
	js.waitFor(0, 2*time.Second, "presence with js", func(e event) bool {
		return e.Ev == "presence" && e.Topic == "open:room" && hasMember(e.Joins, "js", `{"peer":"js"}`) && countIs(e, 1)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	gopher, err := tether.Dial(ctx, s.url("gopher"))
	if err != nil {
		t.Fatalf("tether.Dial: %v", err)
	}
	defer gopher.Close()
	gotGo := make(chan tether.Message, 16)
	if err := gopher.Subscribe(ctx, "open:room", func(m tether.Message) { gotGo <- m }); err != nil {
		t.Fatalf("Go client Subscribe: %v", err)
	}
	js.waitFor(0, 2*time.Second, "presence join of gopher", func(e event) bool {
		return e.Ev == "presence" && e.Topic == "open:room" && hasMember(e.Joins, "gopher", `{"peer":"gopher"}`) && countIs(e, 2)
	})
	checkPresence(t, js, "open:room", `{"count":2,"members":[{"user":"gopher","meta":{"peer":"gopher"}},{"user":"js","meta":{"peer":"js"}}]}`)

	// msg: published by the Go hub, to both clients.
	if err := s.Hub().Publish("open:room", []byte(`{"from":"hub"}`)); err != nil {
		t.Fatal(err)
	}
	m, _ := js.waitFor(0, 2*time.Second, "msg from the hub", msgOf("open:room", `{"from":"hub"}`))
	if m.Epoch != pos.Epoch || seqOf(m) != 1 {
		t.Fatalf("JS got %s, want epoch %s seq 1", m, pos.Epoch)
	}
	checkGo(t, gotGo, `{"from":"hub"}`, pos.Epoch, 1)

	// pub: acknowledged (publish() resolves), and delivered to the Go
	// client and to the JS client itself.
	js.must("publish", "topic", "open:room", "data", map[string]string{"from": "js"})
	m, _ = js.waitFor(0, 2*time.Second, "its own msg", msgOf("open:room", `{"from":"js"}`))
	if m.Epoch != pos.Epoch || seqOf(m) != 2 {
		t.Fatalf("JS got %s, want epoch %s seq 2", m, pos.Epoch)
	}
	checkGo(t, gotGo, `{"from":"js"}`, pos.Epoch, 2)

	// error forbidden: a pub the hub does not allow, a sub it refuses.
	if r := js.do("publish", "topic", "closed:room", "data", 1); r.OK || r.errCode() != "forbidden" {
		t.Fatalf("publish on closed:room: %s, want a rejection with code forbidden", r)
	}
	if r := js.do("subscribe", "topic", "secret:plans"); r.OK || r.errCode() != "forbidden" {
		t.Fatalf("subscribe to secret:plans: %s, want a rejection with code forbidden", r)
	}

	// send: the hub's OnMessage gets the data, and acknowledges it.
	js.must("send", "data", map[string]string{"cmd": "typing"})
	s.message("js", 1, `{"cmd":"typing"}`, time.Second)

	// A direct message from the hub: the 'message' event.
	if err := s.Hub().SendToUser("js", []byte(`{"direct":true}`)); err != nil {
		t.Fatal(err)
	}
	js.waitFor(0, 2*time.Second, "the direct message", func(e event) bool { return e.Ev == "message" && string(e.Data) == `{"direct":true}` })

	// presence: the Go client leaves; after the grace, the JS client sees it.
	gopher.Close()
	js.waitFor(0, 2*time.Second, "presence leave of gopher", func(e event) bool {
		return e.Ev == "presence" && e.Topic == "open:room" && hasMember(e.Leaves, "gopher", "") && countIs(e, 1)
	})
	checkPresence(t, js, "open:room", `{"count":1,"members":[{"user":"js","meta":{"peer":"js"}}]}`)

	// unsub: once the hub has it, the topic's messages stop; a direct
	// message sent after a publication arrives alone.
	js.must("unsubscribe", "topic", "open:room")
	checkPresence(t, js, "open:room", "null") // forgotten
	s.waitFor(time.Second, "the hub to unsubscribe the JS conn", func() bool { return len(rec.conn.Topics()) == 0 })
	if err := s.Hub().Publish("open:room", []byte(`{"after":"unsub"}`)); err != nil {
		t.Fatal(err)
	}
	if err := s.Hub().SendToUser("js", []byte(`{"barrier":1}`)); err != nil {
		t.Fatal(err)
	}
	js.waitFor(0, 2*time.Second, "the barrier", func(e event) bool { return e.Ev == "message" && string(e.Data) == `{"barrier":1}` })
	if _, i := js.find(msgOf("open:room", `{"after":"unsub"}`)); i >= 0 {
		t.Fatal("the JS client got a message of a topic it had left")
	}

	// close: a close frame 1000, and state closed.
	js.must("close")
	checkClosedNormally(t, s.ended("js", 1, 2*time.Second))
	js.waitFor(0, time.Second, "state closed", func(e event) bool { return e.Ev == "state" && e.State == "closed" })
	if n := js.count("error"); n != 0 {
		t.Errorf("the JS client reported %d errors: %s", n, js.transcript())
	}
	if st := s.Hub().Stats(); st.BadRequests != 0 {
		t.Errorf("the hub could not read %d messages of the clients", st.BadRequests)
	}
}

// Resume: after a lost conn the JS client gets exactly what it missed
// (replay), and after a restart of the server, whose history is gone, a
// resync for each topic, even one it only knows from the ack of its sub.
func TestJSClientResume(t *testing.T) {
	s := newServer(t)
	js := startJSClient(t, s.url("js"))
	js.waitFor(0, 5*time.Second, "state connected", func(e event) bool { return e.Ev == "state" && e.State == "connected" })

	var feed, quiet struct {
		Epoch string `json:"epoch"`
		Seq   uint64 `json:"seq"`
	}
	json.Unmarshal(js.must("subscribe", "topic", "feed"), &feed)
	json.Unmarshal(js.must("subscribe", "topic", "quiet"), &quiet)
	if feed.Epoch == "" || quiet.Epoch == "" {
		t.Fatalf("subscribe resolved without a position: %+v %+v", feed, quiet)
	}
	publish := func(from, to int) {
		t.Helper()
		for i := from; i <= to; i++ {
			if err := s.Hub().Publish("feed", fmt.Appendf(nil, `{"n":%d}`, i)); err != nil {
				t.Fatal(err)
			}
		}
	}
	publish(1, 2)
	js.waitFor(0, 2*time.Second, "feed 2", msgOf("feed", `{"n":2}`))

	// The conn drops without a close frame; 3 to 5 are published while
	// the client is away (or while its old conn dies).
	s.record("js", 1).conn.CloseNow()
	publish(3, 5)
	js.waitFor(0, 5*time.Second, "state reconnecting", func(e event) bool { return e.Ev == "state" && e.State == "reconnecting" })
	s.conn("js", 2, 5*time.Second)
	js.waitFor(0, 5*time.Second, "feed 5", msgOf("feed", `{"n":5}`))
	publish(6, 6)
	js.waitFor(0, 2*time.Second, "feed 6", msgOf("feed", `{"n":6}`))
	var seqs []int64
	for _, e := range js.all() {
		if e.Ev == "msg" {
			if e.Topic != "feed" || e.Epoch != feed.Epoch || string(e.Data) != fmt.Sprintf(`{"n":%d}`, seqOf(e)) {
				t.Errorf("unexpected %s", e)
			}
			seqs = append(seqs, seqOf(e))
		}
	}
	if !slices.Equal(seqs, []int64{1, 2, 3, 4, 5, 6}) {
		t.Fatalf("feed seqs %v, want 1 to 6, each once, in order", seqs)
	}
	if n := js.count("resync"); n != 0 {
		t.Fatalf("%d resyncs after a replayable gap", n)
	}

	// The server restarts: a new hub, a new history. Both topics resync,
	// quiet included, whose position came from the ack alone.
	from := js.len()
	s.restart()
	s.conn("js", 3, 5*time.Second)
	for _, topic := range []string{"feed", "quiet"} {
		js.waitFor(from, 5*time.Second, "resync of "+topic, func(e event) bool { return e.Ev == "resync" && e.Topic == topic })
	}
	if err := s.Hub().Publish("quiet", []byte(`"first"`)); err != nil {
		t.Fatal(err)
	}
	m, _ := js.waitFor(from, 2*time.Second, "quiet's first message", msgOf("quiet", `"first"`))
	if m.Epoch == quiet.Epoch || seqOf(m) != 1 {
		t.Fatalf("after the restart: %s, want seq 1 of a new epoch (the old was %s)", m, quiet.Epoch)
	}
	js.must("close")
	checkClosedNormally(t, s.ended("js", 3, 2*time.Second))
}

func hasMember(ms []member, user, meta string) bool {
	for _, m := range ms {
		if m.User == user && (meta == "" || string(m.Meta) == meta) {
			return true
		}
	}
	return false
}

func countIs(e event, n int) bool { return e.Count != nil && *e.Count == n }

// checkPresence checks what the JS client's presence(topic) returns, as
// JSON (undefined comes as null).
func checkPresence(t testing.TB, js *jsClient, topic, want string) {
	t.Helper()
	got := js.must("presence", "topic", topic)
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Fatalf("presence(%q) = %s, want %s", topic, got, want)
	}
}

// checkGo checks the next message the Go client got.
func checkGo(t testing.TB, ch <-chan tether.Message, data, epoch string, seq uint64) {
	t.Helper()
	select {
	case m := <-ch:
		if string(m.Data) != data || m.Position.Epoch != epoch || m.Position.Seq != seq {
			t.Fatalf("Go client got %s at %+v, want %s at %s/%d", m.Data, m.Position, data, epoch, seq)
		}
	case <-time.After(2 * time.Second):
		t.Fatalf("Go client: no message (want %s)", data)
	}
}

// The JS client keeps within the rate limit the welcome advertises: a
// burst of publications past it is refused by the client itself with
// rate_limited, so the hub never has to refuse or close anything.
func TestJSClientRateLimit(t *testing.T) {
	s := newServer(t,
		tether.WithRateLimit(rate.Limit(50), 20),
		tether.WithClientPublish(func(*tether.Conn, string) bool { return true }),
	)
	js := startJSClient(t, s.url("js"))
	js.waitFor(0, 5*time.Second, "state connected", func(e event) bool { return e.Ev == "state" && e.State == "connected" })

	const n = 60
	for i := range n {
		js.command(map[string]any{"cmd": "publish", "step": fmt.Sprintf("burst#%d", i), "topic": "open:burst", "data": i})
	}
	var ok, limited int
	for i := range n {
		step := fmt.Sprintf("burst#%d", i)
		r, _ := js.waitFor(0, 5*time.Second, "the result of "+step, func(e event) bool { return e.Ev == "result" && e.Step == step })
		switch {
		case r.OK:
			ok++
		case r.errCode() == "rate_limited":
			limited++
		default:
			t.Errorf("%s: %s", step, r)
		}
	}
	t.Logf("%d publications at once, limit 50/s burst 20: %d published, %d refused by the client", n, ok, limited)
	if ok < 10 || limited == 0 {
		t.Errorf("%d published and %d refused: want the client to send about its share of the burst, and refuse the rest", ok, limited)
	}
	st := s.Hub().Stats()
	if st.RateLimited != 0 {
		t.Errorf("the hub refused %d messages over its rate limit", st.RateLimited)
	}
	if int(st.Published) != ok {
		t.Errorf("the hub published %d, the client reported %d", st.Published, ok)
	}
	if rec := s.record("js", 1); !rec.ended.IsZero() {
		t.Errorf("the conn ended: %v", rec.reason)
	}
}
