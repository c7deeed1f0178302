package redisbroker_test

import (
	"syscall"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// TestPresenceAcrossNodes: a user joining a topic on one node is present
// on the others, and their subscribers are told, once; a second device
// on another node and the first one leaving makes no leave; the last
// device leaving makes one leave everywhere, after the grace period.
func TestPresenceAcrossNodes(t *testing.T) {
	srv, _ := startRedis(t)
	n1 := startHub(t, "n1", srv.Addr())
	n2 := startHub(t, "n2", srv.Addr())
	const topic = "lobby"
	limit := presenceGrace + 3*time.Second

	bob := dialWire(t, n2.url("bob")) // watches from n2
	bob.subscribe(topic)
	carl := dialWire(t, n1.url("carl")) // keeps n1 holding the topic
	carl.subscribe(topic)
	bob.await(limit, "carl's join at bob", isPresence(topic, "carl", false))

	ann1 := dialWire(t, n1.url("ann"))
	ann1.subscribe(topic)
	joined := time.Now()
	bob.await(limit, "ann's join at bob on n2", isPresence(topic, "ann", false))
	waitUntil(t, limit, "ann in n2's Presence", func() bool { return present(n2.hub.Presence(topic), "ann") })
	waitUntil(t, limit, "n2's OnPresence join of ann", func() bool { _, ok := n2.events.find(topic, "ann", false); return ok })
	t.Logf("ann's join reached n2 in %v", time.Since(joined))
	ann1.await(limit, "bob's join in ann's first presence", isPresence(topic, "bob", false))
	if !present(n1.hub.Presence(topic), "bob") {
		t.Errorf("n1's Presence(%q) = %v, want bob (on n2) in it", topic, users(n1.hub.Presence(topic)))
	}
	// Every subscriber, on either node, lists and counts the three.
	for _, w := range []struct {
		name string
		c    *wireClient
	}{{"bob", bob}, {"carl", carl}, {"ann", ann1}} {
		w.c.awaitPresence(topic, limit, "ann, bob and carl listed at "+w.name, listedExactly("ann", "bob", "carl"))
	}
	for _, n := range []*hubNode{n1, n2} {
		waitUntil(t, limit, n.name+"'s PresenceCount at 3", func() bool { return n.hub.PresenceCount(topic) == 3 })
	}

	// A second device on n2, then the first one (on n1) goes: ann never
	// leaves, and joins only once.
	ann2 := dialWire(t, n2.url("ann"))
	ann2.subscribe(topic)
	ann1.close()
	time.Sleep(4*presenceGrace + 300*time.Millisecond)
	for _, w := range []struct {
		name string
		c    *wireClient
	}{{"bob", bob}, {"carl", carl}} {
		if got := w.c.presenceOf(topic, "ann", true); len(got) != 0 {
			t.Errorf("%s was told ann left while her second device is on: %s", w.name, got[0].line)
		}
		if got := w.c.presenceOf(topic, "ann", false); len(got) != 1 {
			t.Errorf("%s was told %d times that ann joined, want once:\n%s", w.name, len(got), w.c.dump())
		}
	}
	for _, n := range []*hubNode{n1, n2} {
		if k := n.events.count(topic, "ann", true); k != 0 {
			t.Errorf("%s: OnPresence reported ann leaving while her second device is on:\n%s", n.name, n.events)
		}
		if k := n.events.count(topic, "ann", false); k != 1 {
			t.Errorf("%s: OnPresence reported ann joining %d times, want once:\n%s", n.name, k, n.events)
		}
		if !present(n.hub.Presence(topic), "ann") {
			t.Errorf("%s: Presence(%q) = %v, want ann in it", n.name, topic, users(n.hub.Presence(topic)))
		}
	}

	// The last device goes: one leave on both nodes, not before the grace.
	left := time.Now()
	ann2.close()
	for _, w := range []struct {
		name string
		c    *wireClient
	}{{"bob", bob}, {"carl", carl}} {
		m := w.c.await(limit, "ann's leave at "+w.name, isPresence(topic, "ann", true))
		if d := m.at.Sub(left); d < presenceGrace {
			t.Errorf("%s was told ann left %v after she did, before the grace of %v", w.name, d, presenceGrace)
		}
	}
	for _, n := range []*hubNode{n1, n2} {
		waitUntil(t, limit, n.name+"'s OnPresence leave of ann", func() bool { _, ok := n.events.find(topic, "ann", true); return ok })
		at, _ := n.events.find(topic, "ann", true)
		if d := at.Sub(left); d < presenceGrace {
			t.Errorf("%s: OnPresence leave of ann %v after she left, before the grace of %v", n.name, d, presenceGrace)
		}
		waitUntil(t, limit, "ann gone from "+n.name+"'s Presence", func() bool { return !present(n.hub.Presence(topic), "ann") })
		waitUntil(t, limit, "ann offline on "+n.name, func() bool { return !n.hub.Online("ann") })
	}
	time.Sleep(2 * presenceGrace)
	for _, w := range []struct {
		name string
		c    *wireClient
	}{{"bob", bob}, {"carl", carl}} {
		if got := w.c.presenceOf(topic, "ann", true); len(got) != 1 {
			t.Errorf("%s was told %d times that ann left, want once:\n%s", w.name, len(got), w.c.dump())
		}
	}
	for _, n := range []*hubNode{n1, n2} {
		if k := n.events.count(topic, "ann", true); k != 1 {
			t.Errorf("%s: OnPresence reported ann leaving %d times, want once:\n%s", n.name, k, n.events)
		}
		if k := n.hub.PresenceCount(topic); k != 2 {
			t.Errorf("%s: PresenceCount(%q) = %d after ann left, want 2 (bob and carl)", n.name, topic, k)
		}
	}
	for _, w := range []struct {
		name string
		c    *wireClient
	}{{"bob", bob}, {"carl", carl}} {
		if v := w.c.presence(topic); !listedExactly("bob", "carl")(v) {
			t.Errorf("%s knows %v after ann left, want bob and carl listed", w.name, v)
		}
	}
}

// TestNodeKilled: a node process killed with SIGKILL says goodbye to no
// one; the others reap it once its heartbeat has expired, so its users
// leave presence and go offline everywhere within about the node TTL.
func TestNodeKilled(t *testing.T) {
	srv, _ := startRedis(t)
	n1 := startHub(t, "n1", srv.Addr())
	n2 := startHub(t, "n2", srv.Addr())
	p := startProc(t, srv.Addr())
	const topic = "room"
	limit := 5 * time.Second

	ann := dialWire(t, n1.url("ann")) // n1 holds the topic; n2 does not
	ann.subscribe(topic)
	carol, rec := dialRecorded(t, p.url("carol"), tether.WithBackoff(tether.Backoff{Base: time.Second, Max: time.Second}))
	subscribe(t, carol, topic, rec)

	ann.await(limit, "carol's join at ann on n1", isPresence(topic, "carol", false))
	waitUntil(t, limit, "carol in n1's OnPresence", func() bool { _, ok := n1.events.find(topic, "carol", false); return ok })
	for _, n := range []*hubNode{n1, n2} {
		waitUntil(t, limit, "carol in "+n.name+"'s Presence", func() bool { return present(n.hub.Presence(topic), "carol") })
		waitUntil(t, limit, "carol online on "+n.name, func() bool { return n.hub.Online("carol") })
	}

	p.kill()
	killed := time.Now()
	if ws, ok := p.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("the node process ended with %v, want killed by SIGKILL", p.cmd.ProcessState)
	}
	carol.Close() // it could only try the dead node again

	// Reaped by the next heartbeat of a survivor after the TTL expired,
	// the leave then waiting out the grace at most: a margin on top for
	// the race detector on a busy machine.
	bound := nodeTTL + nodeTTL/3 + presenceGrace + 1500*time.Millisecond
	check := func(what string, cond func() bool) {
		t.Helper()
		waitUntil(t, 10*time.Second, what, cond)
		d := time.Since(killed)
		t.Logf("%s %v after the kill", what, d)
		if d > bound {
			t.Errorf("%s took %v after the kill, want within %v (node TTL %v)", what, d, bound, nodeTTL)
		}
	}
	check("carol gone from n1's Presence", func() bool { return !present(n1.hub.Presence(topic), "carol") })
	check("carol gone from n2's Presence", func() bool { return !present(n2.hub.Presence(topic), "carol") })
	check("n1's OnPresence leave of carol", func() bool { _, ok := n1.events.find(topic, "carol", true); return ok })
	check("ann told carol left", func() bool { return len(ann.presenceOf(topic, "carol", true)) > 0 })
	check("carol offline on n1", func() bool { return !n1.hub.Online("carol") })
	check("carol offline on n2", func() bool { return !n2.hub.Online("carol") })

	// A direct message to carol is now kept for her, not lost on the dead
	// node, and she gets it on reconnecting elsewhere.
	if err := n1.hub.SendToUser("carol", []byte(`"while you were away"`)); err != nil {
		t.Fatalf("SendToUser carol: %v", err)
	}
	_, back := dialRecorded(t, n2.url("carol"))
	waitUntil(t, 5*time.Second, "carol's kept message", func() bool { return len(back.directs()) > 0 })
	if got := back.directs(); len(got) != 1 || got[0] != `"while you were away"` {
		t.Errorf("carol got %q on reconnecting", got)
	}
}
