package tether_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// This file checks that a hub keeps the promises of PROTOCOL.md about bad
// input: each refusal is answered as the protocol says, abuse ends only the
// abusive conn, and a healthy bystander on the same hub notices nothing.

// hpEnd is one Observer.Disconnect call.
type hpEnd struct {
	c      *tether.Conn
	reason error
}

// hpEnds returns an Observer.Disconnect option that reports every ended conn on
// the returned channel.
func hpEnds() (tether.HubOption, chan hpEnd) {
	ch := make(chan hpEnd, 100)
	return tether.WithObserver(tether.Observer{Disconnect: func(c *tether.Conn, reason error) { ch <- hpEnd{c, reason} }}), ch
}

// hpWaitEnd returns the Observer.Disconnect reason of the conn with this session.
func hpWaitEnd(t *testing.T, ch chan hpEnd, session string) error {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case e := <-ch:
			if e.c.ID() == session {
				return e.reason
			}
		case <-deadline:
			t.Fatalf("no OnDisconnect for conn %s", session)
			return nil
		}
	}
}

// hpCloseError returns the close frame that ended a client's reader.
func hpCloseError(t *testing.T, c *client) websocket.CloseError {
	t.Helper()
	err := c.ReadErr(t, 10*time.Second)
	var ce websocket.CloseError
	if !errors.As(err, &ce) {
		t.Fatalf("reader ended with %v, want a close frame", err)
	}
	return ce
}

// hpBystander is a healthy client subscribed to a topic of its own.
type hpBystander struct {
	c       *client
	session string
	topic   string
}

func hpNewBystander(t *testing.T, s *hubServer, topic string) *hpBystander {
	t.Helper()
	c := dialClient(t, s.url(), clientOpts{})
	w := c.welcome()
	c.subscribe(topic)
	return &hpBystander{c: c, session: w.Session, topic: topic}
}

// check proves the bystander unaffected: it is still registered and
// reading, gets a publication of its topic and answers a ping.
func (b *hpBystander) check(t *testing.T, s *hubServer) {
	t.Helper()
	select {
	case <-b.c.Done():
		t.Fatalf("bystander's reader ended: %v", b.c.Err())
	default:
	}
	if s.hub.Conn(b.session) == nil {
		t.Fatal("bystander is no longer registered")
	}
	data := fmt.Sprintf(`{"still":%q}`, b.topic)
	if err := s.hub.Publish(b.topic, []byte(data)); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	if m := b.c.expect("msg"); m.Topic != b.topic || string(m.Data) != data {
		t.Fatalf("bystander got %s, want a msg of %s with %s", m.line, b.topic, data)
	}
	b.c.send(`{"op":"ping","ts":4242}`)
	for {
		// Skip the pongs of earlier pings the test may have sent.
		if p := b.c.expect("pong"); p.TS == 4242 {
			break
		}
	}
}

// hpRetryHint matches the reconnect hint of a close reason (PROTOCOL.md
// section 8).
var hpRetryHint = regexp.MustCompile(`retry_ms=[0-9]+`)

// hpWrite writes one message, reporting instead of failing: for peers the
// server may close while they write.
func hpWrite(c *client, typ websocket.MessageType, msg []byte) error {
	return c.Send(typ, msg)
}

// hpKeys returns the members of a received line.
func hpKeys(t *testing.T, line string) map[string]json.RawMessage {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(line), &m); err != nil {
		t.Fatalf("line %q: %v", line, err)
	}
	return m
}

// 1. A message over Limits.MaxMessageSize closes its conn with 1009 and
// ErrMessageTooBig; the others carry on.
func TestHubProtoOversizedMessageCloses1009(t *testing.T) {
	ends, endCh := hpEnds()
	s := newHubServer(t, tether.WithLimits(tether.Limits{MaxMessageSize: 1024}), ends)
	by := hpNewBystander(t, s, "calm")

	bad := dialClient(t, s.url(), clientOpts{})
	w := bad.welcome()
	// A message just under the limit is fine...
	under := `{"op":"ping","ts":1,"pad":"` + strings.Repeat("x", 900) + `"}`
	bad.send(under)
	if p := bad.expect("pong"); p.TS != 1 {
		t.Fatalf("pong %s, want ts 1", p.line)
	}
	// ...2 KiB is not.
	big := `{"op":"ping","ts":2,"pad":"` + strings.Repeat("x", 2048) + `"}`
	if err := hpWrite(bad, websocket.MessageText, []byte(big)); err != nil {
		t.Fatalf("write: %v", err)
	}
	if ce := hpCloseError(t, bad); ce.Code != websocket.StatusMessageTooBig {
		t.Fatalf("close %v, want 1009", ce)
	}
	if reason := hpWaitEnd(t, endCh, w.Session); !errors.Is(reason, tether.ErrMessageTooBig) {
		t.Fatalf("OnDisconnect reason %v, want ErrMessageTooBig", reason)
	}
	waitFor(t, 5*time.Second, "oversized conn unregistered", func() bool { return s.hub.Conn(w.Session) == nil })
	by.check(t, s)
	if n := s.hub.Len(); n != 1 {
		t.Fatalf("hub has %d conns, want the bystander only", n)
	}
}

// 2. Each kind of unreadable request gets the error code PROTOCOL.md gives
// it, with the request's id when it can be read, and the conn stays open.
func TestHubProtoBadRequestsAnswered(t *testing.T) {
	s := newHubServer(t)
	by := hpNewBystander(t, s, "calm")
	c := dialClient(t, s.url(), clientOpts{})
	w := c.welcome()

	cases := []struct {
		name, msg, code, id string
	}{
		{"invalid UTF-8", "{\"op\":\"ping\",\"note\":\"\xff\xfe\"}", "bad_request", ""},
		{"malformed JSON", `{"op":"sub","topic":"a","id":"j1"`, "bad_request", ""},
		{"JSON array", `[{"op":"ping","id":"a1"}]`, "bad_request", ""},
		{"spaces only", `     `, "bad_request", ""},
		{"unknown op", `{"op":"dance","id":"d1"}`, "unknown_op", "d1"},
		{"server-only op", `{"op":"welcome","session":"x","id":"w1"}`, "unknown_op", "w1"},
		{"sub without topic", `{"op":"sub","id":"m1"}`, "bad_request", "m1"},
		{"topic of the wrong type", `{"op":"sub","topic":42,"id":"n1"}`, "bad_request", "n1"},
		{"id over 64 bytes", `{"op":"sub","topic":"a","id":"` + strings.Repeat("i", 65) + `"}`, "bad_request", ""},
	}
	for _, tc := range cases {
		c.send(tc.msg)
		e := c.next(5 * time.Second)
		if e.Op != "error" || e.Code != tc.code || e.ID != tc.id {
			t.Errorf("%s: got %s, want an error %s with id %q", tc.name, e.line, tc.code, tc.id)
		}
		if e.Op == "error" && e.Reason == "" {
			t.Errorf("%s: error without a reason: %s", tc.name, e.line)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// The conn is still open and serves requests.
	if s.hub.Conn(w.Session) == nil {
		t.Fatal("conn unregistered after a few bad requests")
	}
	c.subscribe("after")
	if err := s.hub.Publish("after", []byte(`{"ok":true}`)); err != nil {
		t.Fatal(err)
	}
	if m := c.expect("msg"); m.Topic != "after" || string(m.Data) != `{"ok":true}` {
		t.Fatalf("got %s, want the msg of after", m.line)
	}
	if n := s.hub.Stats().BadRequests; n != uint64(len(cases)) {
		t.Errorf("Stats.BadRequests = %d, want %d", n, len(cases))
	}
	by.check(t, s)
}

// 3. A peer that keeps sending unreadable messages is closed with 1008 and
// ErrProtocolViolation.
func TestHubProtoRepeatedAbuseCloses1008(t *testing.T) {
	ends, endCh := hpEnds()
	s := newHubServer(t, ends)
	by := hpNewBystander(t, s, "calm")
	bad := dialClient(t, s.url(), clientOpts{})
	w := bad.welcome()

	for i := range 30 {
		if err := hpWrite(bad, websocket.MessageText, []byte(`{"op":"sub","topic":`+strconv.Itoa(i))); err != nil {
			break // closed under us: that is the point
		}
	}
	if ce := hpCloseError(t, bad); ce.Code != websocket.StatusPolicyViolation {
		t.Fatalf("close %v, want 1008", ce)
	}
	if reason := hpWaitEnd(t, endCh, w.Session); !errors.Is(reason, tether.ErrProtocolViolation) {
		t.Fatalf("OnDisconnect reason %v, want ErrProtocolViolation", reason)
	}
	// Whatever arrived before the close answered the garbage.
	for _, m := range bad.queued() {
		if m.Op != "error" || m.Code != "bad_request" {
			t.Fatalf("got %s before the close, want only bad_request errors", m.line)
		}
	}
	by.check(t, s)
}

// 4. A binary message holds records (PROTOCOL.md, "Binary messages"): its
// lines are read as a text message's are; one whose records cannot be
// told apart is refused with bad_request, and the conn stays.
func TestHubProtoBinaryFromV1(t *testing.T) {
	s := newHubServer(t)
	by := hpNewBystander(t, s, "calm")
	c := dialClient(t, s.url(), clientOpts{})
	w := c.welcome()
	if err := hpWrite(c, websocket.MessageBinary, []byte(`{"op":"ping","ts":1}`)); err != nil {
		t.Fatal(err)
	}
	if p := c.expect("pong"); p.TS != 1 {
		t.Fatalf("pong %s, want ts 1", p.line)
	}
	if err := hpWrite(c, websocket.MessageBinary, []byte(`{"op":"send","len":50}`+"\nshort")); err != nil {
		t.Fatal(err)
	}
	if e := c.next(5 * time.Second); e.Op != "error" || e.Code != "bad_request" || !strings.Contains(e.Reason, "past the end") {
		t.Fatalf("got %s, want an error bad_request about len", e.line)
	}
	c.send(`{"op":"ping","ts":2}`)
	if p := c.expect("pong"); p.TS != 2 {
		t.Fatalf("pong %s, want ts 2", p.line)
	}
	if s.hub.Conn(w.Session) == nil {
		t.Fatal("conn unregistered after a bad binary message")
	}
	by.check(t, s)
}

// 5. A raw peer that sends a text message in invalid UTF-8 is failed with
// 1007 (RFC 6455, 8.1) and ErrProtocolViolation.
func TestHubProtoRawInvalidUTF8Closes1007(t *testing.T) {
	ends, endCh := hpEnds()
	got := make(chan tether.Message, 10)
	conns := make(chan *tether.Conn, 10)
	s := newHubServer(t, ends,
		tether.OnMessage(func(_ *tether.Conn, m tether.Message) { got <- m }),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) { conns <- c }}))
	by := hpNewBystander(t, s, "calm")
	<-conns

	raw := dialClient(t, s.url(), clientOpts{raw: true})
	var rc *tether.Conn
	select {
	case rc = <-conns:
	case <-time.After(5 * time.Second):
		t.Fatal("raw conn not connected")
	}
	if rc.Subprotocol() != "" {
		t.Fatalf("raw conn negotiated %q", rc.Subprotocol())
	}
	// A valid text message reaches the application untouched.
	raw.send("hello, not JSON")
	select {
	case m := <-got:
		if string(m.Data) != "hello, not JSON" || m.Binary {
			t.Fatalf("OnMessage got %+v", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("raw message not delivered")
	}
	if err := hpWrite(raw, websocket.MessageText, []byte("bad \xc3\x28 text")); err != nil {
		t.Fatal(err)
	}
	if ce := hpCloseError(t, raw); ce.Code != websocket.StatusInvalidFramePayloadData {
		t.Fatalf("close %v, want 1007", ce)
	}
	if reason := hpWaitEnd(t, endCh, rc.ID()); !errors.Is(reason, tether.ErrProtocolViolation) {
		t.Fatalf("OnDisconnect reason %v, want ErrProtocolViolation", reason)
	}
	select {
	case m := <-got:
		t.Fatalf("invalid UTF-8 reached the application: %q", m.Data)
	default:
	}
	by.check(t, s)
}

// 6. WithSubscribeAuth: a refused topic is answered forbidden with the
// request's id and delivers nothing; an allowed one is acknowledged.
func TestHubProtoSubscribeAuth(t *testing.T) {
	s := newHubServer(t, tether.WithSubscribeAuth(func(_ *tether.Conn, topic string) bool { return topic != "secret" }))
	by := hpNewBystander(t, s, "calm")
	c := dialClient(t, s.url(), clientOpts{})
	w := c.welcome()

	c.send(`{"op":"sub","topic":"secret","id":"s1"}`)
	if e := c.next(5 * time.Second); e.Op != "error" || e.Code != "forbidden" || e.ID != "s1" {
		t.Fatalf("got %s, want an error forbidden with id s1", e.line)
	}
	c.send(`{"op":"sub","topic":"public","id":"s2"}`)
	if a := c.next(5 * time.Second); a.Op != "ack" || a.ID != "s2" {
		t.Fatalf("got %s, want ack s2", a.line)
	}
	if got := s.hub.Conn(w.Session).Topics(); len(got) != 1 || got[0] != "public" {
		t.Fatalf("Topics() = %v, want [public]", got)
	}
	// Nothing of the refused topic arrives.
	if err := s.hub.Publish("secret", []byte(`"hidden"`)); err != nil {
		t.Fatal(err)
	}
	if err := s.hub.Publish("public", []byte(`"shown"`)); err != nil {
		t.Fatal(err)
	}
	if m := c.expect("msg"); m.Topic != "public" || string(m.Data) != `"shown"` {
		t.Fatalf("got %s, want the msg of public", m.line)
	}
	if n := s.hub.Stats().Denied; n != 1 {
		t.Errorf("Stats.Denied = %d, want 1", n)
	}
	by.check(t, s)
}

// 7. Client publication: refused without WithClientPublish; with it, an
// allowed pub is acknowledged and reaches every subscriber, the publisher
// included, as a msg with a seq.
func TestHubProtoClientPublishForbiddenByDefault(t *testing.T) {
	s := newHubServer(t)
	by := hpNewBystander(t, s, "calm")
	c := dialClient(t, s.url(), clientOpts{})
	c.welcome()
	c.subscribe("chat")
	c.send(`{"op":"pub","topic":"chat","data":{"x":1},"id":"p1"}`)
	if e := c.expect("error"); e.Code != "forbidden" || e.ID != "p1" {
		t.Fatalf("got %s, want an error forbidden with id p1", e.line)
	}
	c.quiet(200 * time.Millisecond) // in particular, no msg
	by.check(t, s)
}

func TestHubProtoClientPublishAllowed(t *testing.T) {
	s := newHubServer(t, tether.WithClientPublish(func(_ *tether.Conn, topic string) bool { return topic == "chat" }))
	by := hpNewBystander(t, s, "calm")
	pub := dialClient(t, s.url(), clientOpts{})
	pub.welcome()
	pub.subscribe("chat")
	sub := dialClient(t, s.url(), clientOpts{})
	sub.welcome()
	sub.subscribe("chat")

	pub.send(`{"op":"pub","topic":"chat","data":{"text":"hi","n":[1,2]},"id":"p1"}`)
	// The ack and the publisher's own msg may come in either order.
	var ack, own wire
	for ack.Op == "" || own.Op == "" {
		m := pub.next(5 * time.Second)
		switch {
		case m.Op == "ack" && ack.Op == "":
			ack = m
		case m.Op == "msg" && own.Op == "":
			own = m
		case m.Op == "presence":
		default:
			t.Fatalf("publisher got %s", m.line)
		}
	}
	if ack.ID != "p1" {
		t.Fatalf("ack %s, want id p1", ack.line)
	}
	m := sub.expect("msg")
	for _, got := range []wire{own, m} {
		if got.Topic != "chat" || got.Seq != 1 || got.Epoch == "" || string(got.Data) != `{"text":"hi","n":[1,2]}` {
			t.Fatalf("got %s, want msg chat seq 1 with the published data", got.line)
		}
	}
	// A second pub without an id: no answer, next seq.
	pub.send(`{"op":"pub","topic":"chat","data":2}`)
	if m := sub.expect("msg"); m.Seq != 2 || string(m.Data) != "2" || m.Epoch != own.Epoch {
		t.Fatalf("got %s, want msg seq 2 in epoch %s", m.line, own.Epoch)
	}
	if m := pub.expect("msg"); m.Seq != 2 {
		t.Fatalf("publisher got %s, want its msg seq 2", m.line)
	}
	// A topic allow refuses.
	pub.send(`{"op":"pub","topic":"other","data":3,"id":"p3"}`)
	if e := pub.expect("error"); e.Code != "forbidden" || e.ID != "p3" {
		t.Fatalf("got %s, want an error forbidden with id p3", e.line)
	}
	pub.quiet(200 * time.Millisecond)
	sub.quiet(0)
	by.check(t, s)
}

// 8. send hands data to OnMessage byte for byte, then acks; without
// OnMessage it is refused.
func TestHubProtoSendToApplication(t *testing.T) {
	type got struct {
		session string
		m       tether.Message
	}
	ch := make(chan got, 10)
	s := newHubServer(t, tether.OnMessage(func(c *tether.Conn, m tether.Message) { ch <- got{c.ID(), m} }))
	by := hpNewBystander(t, s, "calm")
	c := dialClient(t, s.url(), clientOpts{})
	w := c.welcome()

	data := `{"cmd":"typing", "at":[1, 2.5e3],"s":"\u00e9\n"}`
	c.send(`{"op":"send","data":` + data + `,"id":"q1"}`)
	if a := c.next(5 * time.Second); a.Op != "ack" || a.ID != "q1" {
		t.Fatalf("got %s, want ack q1", a.line)
	}
	// OnMessage runs before the ack is queued: it has been called.
	select {
	case g := <-ch:
		if g.session != w.Session || string(g.m.Data) != data || g.m.Binary {
			t.Fatalf("OnMessage got %q from %s, want %q from %s", g.m.Data, g.session, data, w.Session)
		}
	default:
		t.Fatal("acked before OnMessage got the data")
	}
	// Without an id: delivered, not acknowledged.
	c.send(`{"op":"send","data":null}`)
	select {
	case g := <-ch:
		if string(g.m.Data) != "null" {
			t.Fatalf("OnMessage got %q, want null", g.m.Data)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("send without id not delivered")
	}
	c.quiet(200 * time.Millisecond)
	by.check(t, s)
}

func TestHubProtoSendWithoutOnMessageForbidden(t *testing.T) {
	s := newHubServer(t)
	by := hpNewBystander(t, s, "calm")
	c := dialClient(t, s.url(), clientOpts{})
	c.welcome()
	c.send(`{"op":"send","data":{"cmd":"typing"},"id":"q1"}`)
	if e := c.next(5 * time.Second); e.Op != "error" || e.Code != "forbidden" || e.ID != "q1" {
		t.Fatalf("got %s, want an error forbidden with id q1", e.line)
	}
	by.check(t, s)
}

// 9. Requests in one WebSocket message are answered in request order.
func TestHubProtoAnswersInRequestOrder(t *testing.T) {
	s := newHubServer(t, tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Off: true} }))
	c := dialClient(t, s.url(), clientOpts{})
	w := c.welcome()
	c.send(`{"op":"sub","topic":"a","id":"1"}` + "\n" +
		`{"op":"bogus","id":"x"}` + "\r\n" +
		"\n" + // an empty line is skipped
		`{"op":"unsub","topic":"a","id":"2"}` + "\n" +
		`{"op":"ping","ts":77}` + "\n")
	want := []string{`ack 1`, `error unknown_op x`, `ack 2`, `pong 77`}
	for i, wnt := range want {
		m := c.next(5 * time.Second)
		var g string
		switch m.Op {
		case "ack":
			g = "ack " + m.ID
		case "error":
			g = "error " + m.Code + " " + m.ID
		case "pong":
			g = "pong " + strconv.FormatInt(m.TS, 10)
		default:
			g = m.line
		}
		if g != wnt {
			t.Fatalf("answer %d: got %s, want %s", i, m.line, wnt)
		}
	}
	c.quiet(200 * time.Millisecond)
	if topics := s.hub.Conn(w.Session).Topics(); len(topics) != 0 {
		t.Fatalf("Topics() = %v after sub then unsub", topics)
	}
}

// 10. The rate limit: a burst past it gets pongs then rate_limited errors,
// persistent flooding closes the conn with 4429 and a retry_ms hint, and a
// client under the limit notices nothing.
func TestHubProtoRateLimit(t *testing.T) {
	ends, endCh := hpEnds()
	s := newHubServer(t, tether.WithRateLimit(10, 5), ends)
	calm := hpNewBystander(t, s, "calm")
	flood := dialClient(t, s.url(), clientOpts{})
	fw := flood.welcome()

	// A burst of 12 requests in one frame: 5 pings, which fit in the
	// bucket, then 7 unsubs with ids, answered in order: ack, or (nearly
	// all, as the bucket refills at 10/s) an error rate_limited that
	// carries the request's id.
	var b strings.Builder
	for i := 1; i <= 5; i++ {
		fmt.Fprintf(&b, `{"op":"ping","ts":%d}`+"\n", i)
	}
	for i := 6; i <= 12; i++ {
		fmt.Fprintf(&b, `{"op":"unsub","topic":"x","id":"u%d"}`+"\n", i)
	}
	flood.send(b.String())
	limited := 0
	for i := 1; i <= 12; i++ {
		m := flood.next(5 * time.Second)
		id := "u" + strconv.Itoa(i)
		switch {
		case i <= 5 && m.Op == "pong" && m.TS == int64(i):
		case i > 5 && m.Op == "ack" && m.ID == id:
		case i > 5 && m.Op == "error" && m.Code == "rate_limited" && m.ID == id:
			limited++
		default:
			t.Fatalf("answer to request %d: %s", i, m.line)
		}
	}
	if limited < 3 {
		t.Fatalf("12 requests in one frame with a burst of 5: %d rate limited", limited)
	}
	if s.hub.Conn(fw.Session) == nil {
		t.Fatal("conn closed after one burst")
	}

	// The calm client pings 5 times a second during the flood.
	calmDone := make(chan error, 1)
	stopCalm := make(chan struct{})
	go func() {
		calmDone <- func() error {
			for i := 0; ; i++ {
				select {
				case <-stopCalm:
					return nil
				case <-time.After(200 * time.Millisecond):
				}
				if err := hpWrite(calm.c, websocket.MessageText, []byte(`{"op":"ping","ts":`+strconv.Itoa(1000+i)+`}`)); err != nil {
					return err
				}
			}
		}()
	}()

	// Persistent flooding: frames of 50 pings.
	b.Reset()
	for i := range 50 {
		fmt.Fprintf(&b, `{"op":"ping","ts":%d}`+"\n", 100+i)
	}
	start := time.Now()
	for time.Since(start) < 5*time.Second {
		if err := hpWrite(flood, websocket.MessageText, []byte(b.String())); err != nil {
			break
		}
		select {
		case <-flood.Done():
		case <-time.After(20 * time.Millisecond):
			continue
		}
		break
	}
	ce := hpCloseError(t, flood)
	if ce.Code != tether.StatusRateLimited || !hpRetryHint.MatchString(ce.Reason) {
		t.Fatalf("close %v, want 4429 with a retry_ms hint", ce)
	}
	if reason := hpWaitEnd(t, endCh, fw.Session); !errors.Is(reason, tether.ErrRateLimited) {
		t.Fatalf("OnDisconnect reason %v, want ErrRateLimited", reason)
	}

	// A fresh conn's single frame of 50 pings: 5 pongs fit, 10 refusals
	// are tolerated, the 11th closes it. What the writer sent before the
	// close answers the pings in order: pongs, then rate_limited errors.
	burst := dialClient(t, s.url(), clientOpts{})
	bw := burst.welcome()
	b.Reset()
	for i := 1; i <= 50; i++ {
		fmt.Fprintf(&b, `{"op":"ping","ts":%d}`+"\n", i)
	}
	burst.send(b.String())
	if ce := hpCloseError(t, burst); ce.Code != tether.StatusRateLimited || !hpRetryHint.MatchString(ce.Reason) {
		t.Fatalf("close %v after 50 pings in one frame, want 4429 with a retry_ms hint", ce)
	}
	if reason := hpWaitEnd(t, endCh, bw.Session); !errors.Is(reason, tether.ErrRateLimited) {
		t.Fatalf("OnDisconnect reason %v, want ErrRateLimited", reason)
	}
	for k, m := range burst.queued() {
		i := k + 1
		ok := m.Op == "pong" && m.TS == int64(i) || m.Op == "error" && m.Code == "rate_limited" && i > 5
		if !ok || i > 20 {
			t.Fatalf("answer %d to a frame of 50 pings: %s", i, m.line)
		}
	}
	// Let the calm client go on a little after the flood.
	time.Sleep(500 * time.Millisecond)
	close(stopCalm)
	if err := <-calmDone; err != nil {
		t.Fatalf("calm client write: %v", err)
	}
	pongs := 0
	for _, m := range calm.c.queued() {
		if m.Op == "presence" && m.Topic == "calm" {
			continue // its subscription's snapshot
		}
		if m.Op != "pong" || m.TS < 1000 {
			t.Fatalf("calm client got %s, want only its pongs", m.line)
		}
		pongs++
	}
	if pongs == 0 {
		t.Fatal("calm client got no pong during the flood")
	}
	calm.check(t, s)
	if n := s.hub.Stats().RateLimited; n == 0 {
		t.Error("Stats.RateLimited = 0")
	}
}

// 11. An application ping is answered with a pong carrying the same ts.
func TestHubProtoAppPing(t *testing.T) {
	s := newHubServer(t)
	c := dialClient(t, s.url(), clientOpts{})
	c.welcome()
	for _, ts := range []string{"123", "-5", "9007199254740991", "1700000000000"} {
		c.send(`{"op":"ping","ts":` + ts + `}`)
		p := c.next(5 * time.Second)
		if p.Op != "pong" || strconv.FormatInt(p.TS, 10) != ts {
			t.Fatalf("ping ts %s: got %s", ts, p.line)
		}
	}
	c.send(`{"op":"ping"}`)
	if p := c.next(5 * time.Second); p.Op != "pong" || p.TS != 0 {
		t.Fatalf("ping without ts: got %s, want pong ts 0", p.line)
	}
	c.send(`{"ts":31,"topic":"ignored","op":"ping"}`) // any member order, foreign members ignored
	if p := c.next(5 * time.Second); p.Op != "pong" || p.TS != 31 {
		t.Fatalf("reordered ping: got %s, want pong ts 31", p.line)
	}
}

// 12. The welcome is the first message, even when the client speaks first;
// it carries the configured heartbeat and the server-side conn's ID.
func TestHubProtoWelcomeFirst(t *testing.T) {
	conns := make(chan *tether.Conn, 10)
	s := newHubServer(t, tether.WithHeartbeat(2*time.Second, 7*time.Second),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) { conns <- c }}))
	sessions := map[string]bool{}
	for range 3 {
		c := dialClient(t, s.url(), clientOpts{})
		c.send(`{"op":"ping","ts":9}`) // before reading anything
		w := c.welcome()
		if w.Heartbeat.IntervalMS != 2000 || w.Heartbeat.TimeoutMS != 7000 {
			t.Fatalf("welcome %s, want heartbeat 2000/7000", w.line)
		}
		if p := c.next(5 * time.Second); p.Op != "pong" || p.TS != 9 {
			t.Fatalf("after the welcome: %s, want pong 9", p.line)
		}
		var sc *tether.Conn
		select {
		case sc = <-conns:
		case <-time.After(5 * time.Second):
			t.Fatal("OnConnect not called")
		}
		if w.Session == "" || w.Session != sc.ID() {
			t.Fatalf("welcome session %q, server conn ID %q", w.Session, sc.ID())
		}
		if s.hub.Conn(w.Session) != sc {
			t.Fatal("hub.Conn(session) is not the server conn")
		}
		if sc.Subprotocol() != tether.Subprotocol {
			t.Fatalf("subprotocol %q", sc.Subprotocol())
		}
		if sessions[w.Session] {
			t.Fatalf("session %q reused", w.Session)
		}
		sessions[w.Session] = true
		if k := hpKeys(t, w.line); string(k["op"]) != `"welcome"` {
			t.Fatalf("welcome line %s", w.line)
		}
	}
}
