package redisbroker_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// TestPresenceBoundsAcrossNodes: presence across two nodes on Redis with
// the same bounds as on one (PROTOCOL.md, presence). A topic whose list
// limit is 8 fills to 40 users, 20 at each node, in bursts, over real
// sockets: while it has at most 8 members every subscriber lists them,
// from both nodes; above, every subscriber's count reaches 40 and a late
// subscriber's snapshot carries the count alone; Hub.PresenceCount agrees
// on both nodes. Then users leave, 17 at each node: after the grace the
// count is 6 everywhere, and the topic still only counts (6 is above half
// the limit); two more leave and, at 4, every remaining subscriber is
// sent a snapshot listing exactly the four, two at each node. No conn is
// dropped meanwhile.
func TestPresenceBoundsAcrossNodes(t *testing.T) {
	const (
		topic   = "stage"
		list    = 8
		perNode = 20
		total   = 2 * perNode
	)
	// Generous: the bounds are what is checked, not how fast; this must
	// hold under -race on a busy 2-core machine.
	limit := 20 * time.Second
	srv, _ := startRedis(t)
	policy := tether.WithPresence(func(string) tether.PresencePolicy {
		return tether.PresencePolicy{List: list, Grace: presenceGrace}
	})
	n1 := startHub(t, "n1", srv.Addr(), policy)
	n2 := startHub(t, "n2", srv.Addr(), policy)
	nodes := []*hubNode{n1, n2}

	// u00..u19 connect to n1, u20..u39 to n2, arriving in turn from one
	// node and the other.
	type member struct {
		user string
		node *hubNode
		c    *wireClient
	}
	name := func(m *member) string { return m.user + "@" + m.node.name }
	var order []*member
	for i := range perNode {
		order = append(order,
			&member{user: fmt.Sprintf("u%02d", i), node: n1},
			&member{user: fmt.Sprintf("u%02d", perNode+i), node: n2})
	}
	userList := func(ms []*member) []string {
		var out []string
		for _, m := range ms {
			if !slices.Contains(out, m.user) {
				out = append(out, m.user)
			}
		}
		slices.Sort(out)
		return out
	}
	// burst connects ms and subscribes them all at once, then waits for
	// their acks.
	burst := func(ms []*member) {
		t.Helper()
		for _, m := range ms {
			m.c = dialWire(t, m.node.url(m.user))
		}
		for _, m := range ms {
			m.c.startSub(topic)
		}
		for _, m := range ms {
			m.c.awaitAck(topic, limit)
		}
	}
	// converge waits until every one of ms knows what ok wants.
	converge := func(what string, ms []*member, ok func(presenceView) bool) {
		t.Helper()
		start := time.Now()
		for {
			var off []string
			var first *member
			for _, m := range ms {
				if err := m.c.ended(); err != nil {
					t.Fatalf("%s: %s's conn ended: %v\nreceived:\n%s", what, name(m), err, m.c.dump())
				}
				if v := m.c.presence(topic); !ok(v) {
					off = append(off, fmt.Sprintf("  %s: %v", name(m), v))
					if first == nil {
						first = m
					}
				}
			}
			if len(off) == 0 {
				t.Logf("%s: %v", what, time.Since(start))
				return
			}
			if time.Since(start) > limit {
				t.Fatalf("%s: not within %v for %d of %d subscribers:\n%s\n%s received:\n%s",
					what, limit, len(off), len(ms), strings.Join(off, "\n"), name(first), first.c.dump())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	countIs := func(what string, want int) {
		t.Helper()
		for _, n := range nodes {
			waitUntil(t, limit, fmt.Sprintf("%s: %s's PresenceCount at %d", what, n.name, want),
				func() bool { return n.hub.PresenceCount(topic) == want })
		}
	}
	counted := func(want int) func(presenceView) bool {
		return func(v presenceView) bool { return !v.listing && v.count == want }
	}

	// Six, three at each node: listed, from both nodes, everywhere.
	first := order[:6]
	burst(first)
	converge("6 users listed everywhere", first, listedExactly(userList(first)...))
	countIs("6 users", 6)

	// The other 34 in three bursts, without waiting in between: over the
	// limit, so every subscriber ends up counting all 40.
	for _, b := range [][]*member{order[6:16], order[16:28], order[28:]} {
		burst(b)
	}
	converge("40 users counted everywhere", order, counted(total))
	countIs("40 users", total)

	// Late subscribers, second devices of users already there, at the
	// other node: their snapshot carries the count alone, and they change
	// no one's count.
	late := []*member{{user: "u00", node: n2}, {user: "u20", node: n1}}
	burst(late)
	for _, m := range late {
		snap := m.c.await(limit, "the snapshot of late "+name(m), func(w wireMsg) bool { return w.Op == "presence" && w.Topic == topic })
		if !snap.Snapshot || len(snap.Joins) != 0 || snap.Count == nil || *snap.Count != total {
			t.Errorf("late %s's first presence is %s, want a snapshot with joins [] and count %d", name(m), snap.line, total)
		}
	}
	time.Sleep(4 * presenceGrace) // time for a miscount to show
	all := append(slices.Clone(order), late...)
	converge("still 40 after the second devices", all, counted(total))
	countIs("40 users with second devices", total)

	// Every snapshot anyone was sent is bounded by the limit: the whole
	// list while there are at most 8, the count alone above.
	for _, m := range all {
		for _, s := range m.c.presence(topic).snaps {
			if *s.Count > list && len(s.Joins) != 0 || len(s.Joins) > list {
				t.Errorf("%s was sent a snapshot of %d members listing %d (limit %d): %s", name(m), *s.Count, len(s.Joins), list, s.line)
			}
		}
	}

	// 34 leave, 17 at each node, in two bursts: 6 users remain, each
	// with its conns.
	keep := []string{"u00", "u01", "u20", "u21"}
	lastTwo := []string{"u02", "u22"}
	var leaving, staying []*member
	for _, m := range all {
		if slices.Contains(keep, m.user) || slices.Contains(lastTwo, m.user) {
			staying = append(staying, m)
		} else {
			leaving = append(leaving, m)
		}
	}
	if len(leaving) != 34 {
		t.Fatalf("%d leaving, want 34", len(leaving))
	}
	closed := map[*hubNode]int{}
	leave := func(ms []*member) {
		for _, m := range ms {
			m.c.close()
			closed[m.node]++
		}
	}
	seen := map[*member]int{} // how many messages each had before the leaves
	for _, m := range staying {
		seen[m] = len(m.c.messages())
	}
	left := time.Now()
	leave(leaving[:17])
	leave(leaving[17:])
	// 6 is at most the limit but above half of it: still counted.
	converge("6 users counted everywhere", staying, counted(6))
	countIs("6 users", 6)
	for _, m := range staying {
		after := m.c.messages()[seen[m]:]
		i := slices.IndexFunc(after, func(w wireMsg) bool { return w.Op == "presence" && w.Topic == topic })
		if i < 0 {
			t.Fatalf("%s: no presence since the leaves, yet its count is 6", name(m))
		}
		if d := after[i].at.Sub(left); d < presenceGrace {
			t.Errorf("%s was told of a leave %v after the first one, before the grace of %v: %s", name(m), d, presenceGrace, after[i].line)
		}
	}

	// Two more leave, one at each node: at 4, half the limit, the topic
	// lists its members again, a snapshot of the four from both nodes.
	var last []*member
	for _, m := range staying {
		if slices.Contains(lastTwo, m.user) {
			leave([]*member{m})
		} else {
			last = append(last, m)
		}
	}
	converge("4 users listed again everywhere", last, listedExactly(keep...))
	countIs("4 users", len(keep))
	for _, m := range last {
		v := m.c.presence(topic)
		s := v.snaps[len(v.snaps)-1]
		var got []string
		for _, j := range s.Joins {
			got = append(got, j.User)
		}
		if !slices.Equal(got, keep) || *s.Count != len(keep) {
			t.Errorf("%s's last snapshot is %s, want %v listed with count %d", name(m), s.line, keep, len(keep))
		}
	}
	for _, n := range nodes {
		if got := users(n.hub.Presence(topic)); !slices.Equal(got, keep) {
			t.Errorf("%s: Presence(%q) = %v, want %v", n.name, topic, got, keep)
		}
	}

	// The hubs' observers saw each user join once and each leaver leave
	// once.
	for _, n := range nodes {
		for _, m := range order {
			wantLeaves := 1
			if slices.Contains(keep, m.user) {
				wantLeaves = 0
			}
			if k := n.events.count(topic, m.user, false); k != 1 {
				t.Errorf("%s: OnPresence reported %s joining %d times, want once", n.name, m.user, k)
			}
			if k := n.events.count(topic, m.user, true); k != wantLeaves {
				t.Errorf("%s: OnPresence reported %s leaving %d times, want %d", n.name, m.user, k, wantLeaves)
			}
		}
	}

	// No conn was dropped: those still open are up, and each node saw
	// only the closes made here.
	for _, m := range last {
		if err := m.c.ended(); err != nil {
			t.Errorf("%s's conn ended: %v", name(m), err)
		}
	}
	for _, n := range nodes {
		open := 0
		for _, m := range last {
			if m.node == n {
				open++
			}
		}
		waitUntil(t, limit, n.name+"'s closes counted", func() bool { return n.hub.Stats().Disconnects >= uint64(closed[n]) })
		st := n.hub.Stats()
		if st.Conns != open || st.Disconnects != uint64(closed[n]) || st.Evictions != 0 || st.DeadPeers != 0 || st.Drops != 0 || st.BrokerOutages != 0 {
			t.Errorf("%s: Stats %+v, want %d conns, %d disconnects (those closed here), no eviction, dead peer, drop or broker outage",
				n.name, st, open, closed[n])
		}
	}
}

// TestPresenceView: the wire client's replay of presence messages
// follows PROTOCOL.md and flags what it rules out, so that the tests
// relying on it check something.
func TestPresenceView(t *testing.T) {
	replay := func(lines ...string) presenceView {
		c := &wireClient{t: t}
		for _, l := range lines {
			if err := c.record([]byte(l), time.Now()); err != nil {
				t.Fatal(err)
			}
		}
		return c.presence("r")
	}
	good := []struct {
		lines []string
		want  string
	}{
		{[]string{
			`{"op":"presence","topic":"r","count":1,"snapshot":true,"joins":[{"user":"ann","meta":{"d":1}}]}`,
			`{"op":"presence","topic":"r","count":2,"joins":[{"user":"bob"}],"leaves":[]}`,
			`{"op":"presence","topic":"r","count":1,"joins":[],"leaves":[{"user":"ann"}]}`,
		}, "count=1 listing=true listed=[bob] presences=3 snapshots=1 problems=0"},
		{[]string{
			`{"op":"presence","topic":"r","count":2,"snapshot":true,"joins":[{"user":"ann"},{"user":"bob"}]}`,
			`{"op":"presence","topic":"r","count":9,"snapshot":true,"joins":[]}`,
			`{"op":"presence","topic":"r","count":12}`,
			`{"op":"presence","topic":"other","count":1,"snapshot":true,"joins":[{"user":"x"}]}`,
			`{"op":"presence","topic":"r","count":3,"snapshot":true,"joins":[{"user":"a"},{"user":"b"},{"user":"c"}]}`,
		}, "count=3 listing=true listed=[a b c] presences=4 snapshots=3 problems=0"},
		{[]string{ // a topic that never lists (List < 0), empty at first
			`{"op":"presence","topic":"r","count":0,"snapshot":true,"joins":[]}`,
			`{"op":"presence","topic":"r","count":1}`,
		}, "count=1 listing=false listed=[] presences=2 snapshots=1 problems=0"},
		{[]string{ // a listed topic, empty at first
			`{"op":"presence","topic":"r","count":0,"snapshot":true,"joins":[]}`,
			`{"op":"presence","topic":"r","count":1,"joins":[{"user":"a"}],"leaves":[]}`,
		}, "count=1 listing=true listed=[a] presences=2 snapshots=1 problems=0"},
	}
	for _, g := range good {
		if v := replay(g.lines...); v.String() != g.want || len(v.problems) > 0 {
			t.Errorf("replay of %q: %v %q, want %s", g.lines, v, v.problems, g.want)
		}
	}
	snap := `{"op":"presence","topic":"r","count":1,"snapshot":true,"joins":[{"user":"ann"}]}`
	counted := `{"op":"presence","topic":"r","count":20,"snapshot":true,"joins":[]}`
	bad := [][]string{
		{`{"op":"presence","topic":"r","snapshot":true,"joins":[]}`},                                    // no count
		{`{"op":"presence","topic":"r","count":0,"snapshot":true}`},                                     // no joins
		{`{"op":"presence","topic":"r","count":0,"snapshot":true,"joins":[],"leaves":[]}`},              // leaves
		{`{"op":"presence","topic":"r","count":3,"snapshot":true,"joins":[{"user":"a"}]}`},              // partial
		{`{"op":"presence","topic":"r","count":1,"joins":[{"user":"a"}],"leaves":[]}`},                  // no snapshot first
		{snap, `{"op":"presence","topic":"r","count":2,"joins":[{"user":"bob"}]}`},                      // one array
		{snap, `{"op":"presence","topic":"r","count":2}`},                                               // count alone, listed
		{snap, `{"op":"presence","topic":"r","count":2,"joins":[{"user":"ann"}],"leaves":[]}`},          // joined twice
		{snap, `{"op":"presence","topic":"r","count":0,"joins":[],"leaves":[{"user":"bob"}]}`},          // not listed
		{snap, `{"op":"presence","topic":"r","count":5,"joins":[{"user":"bob"}],"leaves":[]}`},          // count off
		{counted, `{"op":"presence","topic":"r","count":21,"joins":[{"user":"bob"}],"leaves":[]}`},      // joins, counted
		{counted, `{"op":"presence","topic":"r","count":21,"joins":[],"leaves":[],"snapshot":false}`},   // joins, counted
		{counted, `{"op":"presence","topic":"r","count":21,"extra":1}`},                                 // other fields
		{`{"op":"presence","topic":"r","count":2,"snapshot":true,"joins":[{"user":"a"},{"user":"a"}]}`}, // twice
	}
	bad = append(bad, []string{ // counted from an empty snapshot on, then joins
		`{"op":"presence","topic":"r","count":0,"snapshot":true,"joins":[]}`,
		`{"op":"presence","topic":"r","count":1}`,
		`{"op":"presence","topic":"r","count":2,"joins":[{"user":"b"}],"leaves":[]}`,
	})
	for _, lines := range bad {
		if v := replay(lines...); len(v.problems) == 0 {
			t.Errorf("replay of %q found no problem: %v", lines, v)
		}
	}
}
