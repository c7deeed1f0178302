package redisbroker_test

import (
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/redisbroker"
)

// publisher is a way to publish on one node: in this process, or in the
// node process.
type publisher struct {
	name string
	pub  func(t testing.TB, topic, data string)
}

func hubPublisher(n *hubNode) publisher {
	return publisher{n.name, func(t testing.TB, topic, data string) {
		t.Helper()
		if err := n.hub.Publish(topic, []byte(data)); err != nil {
			t.Errorf("%s: Publish: %v", n.name, err)
		}
	}}
}

func procPublisher(name string, p *procNode) publisher {
	return publisher{name, p.publish}
}

// TestPublishReachesEveryNodeOnce: three nodes, one of them in another
// process, two subscribers on each. Publications from each node in turn,
// then from all three at once, reach every subscriber exactly once, at
// the same position everywhere, contiguous in one epoch, each node's own
// publications in the order it made them.
func TestPublishReachesEveryNodeOnce(t *testing.T) {
	srv, _ := startRedis(t)
	n1 := startHub(t, "n1", srv.Addr())
	n2 := startHub(t, "n2", srv.Addr())
	n3 := startProc(t, srv.Addr())
	pubs := []publisher{hubPublisher(n1), hubPublisher(n2), procPublisher("n3", n3)}
	urls := []string{n1.url("u1"), n2.url("u2"), n3.url("u3")}

	const topic = "room"
	type sub struct {
		name string
		rec  *recorder
	}
	var subs []sub
	for i, u := range urls {
		for j := range 2 {
			cl, rec := dialRecorded(t, u)
			subscribe(t, cl, topic, rec)
			subs = append(subs, sub{fmt.Sprintf("client %d on n%d", j, i+1), rec})
		}
	}

	// Each node in turn, twice, then all at once. A payload is
	// node|stream|k: k counts each node's publications of a stream.
	const perRound = 15
	total := 0
	for round := range 2 {
		for _, p := range pubs {
			for k := range perRound {
				p.pub(t, topic, quoted(fmt.Sprintf("%s|seq|%d", p.name, round*perRound+k)))
				total++
			}
		}
	}
	var wg sync.WaitGroup
	for _, p := range pubs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range perRound {
				p.pub(t, topic, quoted(fmt.Sprintf("%s|con|%d", p.name, k)))
			}
		}()
		total += perRound
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	var ref []tether.Message
	for _, s := range subs {
		s.rec.awaitCount(t, total, 10*time.Second, s.name)
	}
	time.Sleep(200 * time.Millisecond) // room for a duplicate to show up
	for _, s := range subs {
		msgs := s.rec.messages()
		if len(msgs) != total {
			t.Errorf("%s: %d messages, want %d: %s", s.name, len(msgs), total, summary(msgs))
			continue
		}
		checkContiguous(t, s.name, msgs)
		if n := s.rec.resyncCount(); n != 0 {
			t.Errorf("%s: %d resyncs, want none", s.name, n)
		}
		// Per publisher, in the order published.
		next := map[string]int{}
		for _, m := range msgs {
			var data string
			if err := json.Unmarshal(m.Data, &data); err != nil {
				t.Fatalf("%s: payload %s: %v", s.name, m.Data, err)
			}
			i := strings.LastIndexByte(data, '|')
			key := data[:i]
			k, _ := strconv.Atoi(data[i+1:])
			if k != next[key] {
				t.Errorf("%s: %s arrived when %s|%d was next", s.name, data, key, next[key])
			}
			next[key] = k + 1
		}
		// The same message at the same position for everyone.
		if ref == nil {
			ref = msgs
			continue
		}
		for i := range msgs {
			if msgs[i].Position != ref[i].Position || string(msgs[i].Data) != string(ref[i].Data) {
				t.Errorf("%s: message %d is %v=%s, %s had %v=%s", s.name, i, msgs[i].Position, msgs[i].Data,
					subs[0].name, ref[i].Position, ref[i].Data)
				break
			}
		}
	}
}

// TestTopicInterest: a node holding only topic A gets no Redis traffic of
// topic B (it does not subscribe to B's channel), while B's subscribers
// elsewhere still get B's publications, from any node. A node releases A's
// channel when its last local subscriber of A leaves, not before, and
// takes it again for a new one.
func TestTopicInterest(t *testing.T) {
	srv, rdb := startRedis(t)
	n1 := startHub(t, "n1", srv.Addr())
	n2 := startHub(t, "n2", srv.Addr())
	n3 := startHub(t, "n3", srv.Addr())
	chanA, chanB := redisbroker.KeyOf("t", "A"), redisbroker.KeyOf("t", "B")

	a1cl, a1 := dialRecorded(t, n1.url("a1"))
	subscribe(t, a1cl, "A", a1)
	a2cl, a2 := dialRecorded(t, n2.url("a2"))
	subscribe(t, a2cl, "A", a2)
	a2bcl, a2b := dialRecorded(t, n2.url("a2b"))
	subscribe(t, a2bcl, "A", a2b)
	b3cl, b3 := dialRecorded(t, n3.url("b3"))
	subscribe(t, b3cl, "B", b3)

	if got := numSub(t, rdb, chanA); got != 2 {
		t.Errorf("NUMSUB %s = %d, want 2 (n1 and n2 hold A)", chanA, got)
	}
	if got := numSub(t, rdb, chanB); got != 1 {
		t.Errorf("NUMSUB %s = %d, want 1 (only n3 holds B)", chanB, got)
	}

	// B from nodes that do not hold it reaches n3's subscriber.
	for i := range 5 {
		hubPublisher([]*hubNode{n1, n2}[i%2]).pub(t, "B", quoted(fmt.Sprint("b", i)))
	}
	hubPublisher(n3).pub(t, "A", `"A-0"`)
	b3.awaitCount(t, 5, 10*time.Second, "b3")
	for _, r := range []*recorder{a1, a2, a2b} {
		r.awaitCount(t, 1, 10*time.Second, "A subscriber")
	}
	checkContiguous(t, "b3", b3.messages())

	// Reference counting on n2: one of two subscribers leaves (unsub),
	// A stays held; the other goes (conn closed), A is released.
	if err := a2cl.Unsubscribe("A"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(400 * time.Millisecond)
	for time.Now().Before(deadline) {
		if got := numSub(t, rdb, chanA); got != 2 {
			t.Fatalf("NUMSUB %s = %d after one of n2's two subscribers left, want 2", chanA, got)
		}
		time.Sleep(20 * time.Millisecond)
	}
	a2bcl.Close()
	took := waitUntil(t, 3*time.Second, "n2 to unsubscribe A's channel", func() bool { return numSub(t, rdb, chanA) == 1 })
	t.Logf("A's channel released %v after n2's last subscriber left", took)
	if got := numSub(t, rdb, chanB); got != 1 {
		t.Errorf("NUMSUB %s = %d, want 1", chanB, got)
	}

	// A's publications still reach n1; a new subscriber on n2 takes the
	// channel again and gets those published from then on, and no older
	// one (PROTOCOL.md, sub: "Without since, the client receives the
	// messages published after the subscription took effect, and no
	// history"). It subscribes within the presence grace of the users
	// who left, while n2 may still keep the topic for their presence.
	released := time.Now()
	before := a1.len()
	hubPublisher(n3).pub(t, "A", `"A-1"`)
	a1.awaitCount(t, before+1, 10*time.Second, "a1")
	a2.mu.Lock()
	a2.msgs = nil
	a2.mu.Unlock()
	subscribe(t, a2cl, "A", a2)
	t.Logf("subscribed again on n2 %v after it released A (presence grace %v)", time.Since(released), presenceGrace)
	if got := numSub(t, rdb, chanA); got != 2 {
		t.Errorf("NUMSUB %s = %d after a new subscriber on n2, want 2", chanA, got)
	}
	hubPublisher(n1).pub(t, "A", `"A-2"`)
	a2.awaitCount(t, 1, 10*time.Second, "a2 subscribed again")
	a1.awaitCount(t, before+2, 10*time.Second, "a1")
	checkContiguous(t, "a1", a1.messages())
	if got := string(a2.messages()[0].Data); got != `"A-2"` {
		t.Errorf("a2, subscribed again after \"A-1\" was published and delivered, got %s first, want \"A-2\": %s", got, summary(a2.messages()))
	}
}

// TestSendToUser: a direct message sent on one node reaches each of the
// user's conns on other nodes exactly once, and is not kept for later; a
// user connected nowhere gets what was sent, in order and once, when
// connecting to a node that never saw those messages.
func TestSendToUser(t *testing.T) {
	srv, _ := startRedis(t)
	n1 := startHub(t, "n1", srv.Addr())
	n2 := startHub(t, "n2", srv.Addr())
	n3 := startProc(t, srv.Addr())
	n4 := startHub(t, "n4", srv.Addr())

	dave2cl, dave2 := dialRecorded(t, n2.url("dave"))
	dave3cl, dave3 := dialRecorded(t, n3.url("dave"))
	waitUntil(t, 5*time.Second, "n1 to see dave online", func() bool { return n1.hub.Online("dave") })
	if err := n1.hub.SendToUser("dave", []byte(`{"n":1}`)); err != nil {
		t.Fatalf("SendToUser: %v", err)
	}
	n3.call(t, "/send", url.Values{"user": {"dave"}, "data": {`{"n":2}`}})
	for _, r := range []*recorder{dave2, dave3} {
		waitUntil(t, 5*time.Second, "dave's direct messages", func() bool { return len(r.directs()) >= 2 })
	}
	time.Sleep(200 * time.Millisecond)
	for i, r := range []*recorder{dave2, dave3} {
		if got := r.directs(); !slices.Equal(got, []string{`{"n":1}`, `{"n":2}`}) {
			t.Errorf("dave's conn %d got %q, want each message once", i, got)
		}
	}
	dave2cl.Close()
	dave3cl.Close()
	waitUntil(t, 5*time.Second, "dave offline everywhere", func() bool { return !n1.hub.Online("dave") && !n4.hub.Online("dave") })
	_, daveAgain := dialRecorded(t, n4.url("dave"))
	time.Sleep(300 * time.Millisecond)
	if got := daveAgain.directs(); len(got) != 0 {
		t.Errorf("dave reconnecting got %q: messages delivered live were kept offline too", got)
	}

	// erin is connected nowhere: kept in Redis, delivered at her connect
	// on n4, which was never asked to send them.
	if n1.hub.Online("erin") {
		t.Fatal("erin online before connecting")
	}
	want := []string{`"e0"`, `"e1"`, `"e2"`, `"e3"`}
	for i, m := range want {
		if i%2 == 0 {
			if err := n1.hub.SendToUser("erin", []byte(m)); err != nil {
				t.Fatalf("SendToUser erin: %v", err)
			}
		} else {
			if err := n2.hub.SendToUser("erin", []byte(m)); err != nil {
				t.Fatalf("SendToUser erin: %v", err)
			}
		}
	}
	erinCl, erin := dialRecorded(t, n4.url("erin"))
	waitUntil(t, 5*time.Second, "erin's kept messages", func() bool { return len(erin.directs()) >= len(want) })
	time.Sleep(200 * time.Millisecond)
	if got := erin.directs(); !slices.Equal(got, want) {
		t.Errorf("erin got %q, want %q", got, want)
	}
	erinCl.Close()
	waitUntil(t, 5*time.Second, "erin offline", func() bool { return !n1.hub.Online("erin") })
	_, erinAgain := dialRecorded(t, n2.url("erin"))
	time.Sleep(300 * time.Millisecond)
	if got := erinAgain.directs(); len(got) != 0 {
		t.Errorf("erin's second connect got %q again: what was delivered must not be kept", got)
	}
}
