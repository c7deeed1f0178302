package tether_test

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

// This file checks presence (PROTOCOL.md, presence; DESIGN.md section 5):
// joins with a snapshot, leaves debounced by a grace period, the topics
// that track it, and anonymous conns, over real sockets. Users come from
// the X-User header (WithAuth), conn metadata from X-Device (WithConnMeta).

// prHub starts a hub that names users and tracks presence on the topics
// track selects (nil: all) with the given grace, and reports Observer.Presence
// events on the returned channel.
func prHub(t *testing.T, track func(string) bool, grace time.Duration, opts ...tether.HubOption) (*hubServer, chan tether.PresenceEvent) {
	t.Helper()
	events := make(chan tether.PresenceEvent, 100)
	opts = append([]tether.HubOption{
		tether.WithAuth(func(r *http.Request) (string, error) { return r.Header.Get("X-User"), nil }),
		tether.WithConnMeta(func(r *http.Request) json.RawMessage {
			if d := r.Header.Get("X-Device"); d != "" {
				return json.RawMessage(`{"device":` + quote(d) + `}`)
			}
			return nil
		}),
		tether.WithPresence(func(topic string) tether.PresencePolicy {
			return tether.PresencePolicy{Off: track != nil && !track(topic), Grace: grace}
		}),
		tether.WithObserver(tether.Observer{Presence: func(e tether.PresenceEvent) { events <- e }}),
	}, opts...)
	return newHubServer(t, opts...), events
}

// prDial connects user (anonymous when "") from device and returns the
// client and its session, once the welcome has arrived.
func prDial(t *testing.T, s *hubServer, user, device string) (*client, string) {
	t.Helper()
	h := http.Header{}
	if user != "" {
		h.Set("X-User", user)
	}
	if device != "" {
		h.Set("X-Device", device)
	}
	c := dialClient(t, s.url(), clientOpts{header: h})
	return c, c.welcome().Session
}

// prSub subscribes c to topic and returns the presence snapshot that
// follows the ack.
func prSub(t *testing.T, c *client, topic string) wire {
	t.Helper()
	c.send(`{"op":"sub","topic":` + quote(topic) + `,"id":"ps"}`)
	if a := c.next(5 * time.Second); a.Op != "ack" || a.ID != "ps" {
		t.Fatalf("sub %s: got %s, want ack ps", topic, a.line)
	}
	return prNext(t, c, topic, 5*time.Second)
}

// prNext returns the next message of c, which must be a presence of topic
// shaped as PROTOCOL.md says: with a count; a snapshot with a joins array
// and no leaves; a change with both arrays, or neither when the topic
// only counts.
func prNext(t *testing.T, c *client, topic string, limit time.Duration) wire {
	t.Helper()
	for {
		w := c.next(limit)
		if w.Op == "ping" || w.Op == "pong" {
			continue
		}
		if w.Op != "presence" || w.Topic != topic {
			t.Fatalf("got %s, want a presence of %s", w.line, topic)
		}
		k := hpKeys(t, w.line)
		isArray := func(f string) bool { return strings.HasPrefix(strings.TrimSpace(string(k[f])), "[") }
		switch {
		case w.Count == nil || *w.Count < 0:
			t.Fatalf("presence without a count: %s", w.line)
		case w.Snapshot && (!isArray("joins") || k["leaves"] != nil):
			t.Fatalf("snapshot without a joins array, or with leaves: %s", w.line)
		case !w.Snapshot && isArray("joins") != isArray("leaves"):
			t.Fatalf("change with one of joins and leaves: %s", w.line)
		case !w.Snapshot && k["joins"] == nil && len(k) != 3:
			t.Fatalf("count-only presence with other fields: %s", w.line)
		}
		return w
	}
}

// prList renders presence members as user=meta, in order.
func prList(ms []wireMember) string {
	var s []string
	for _, m := range ms {
		if m.User == "" {
			s = append(s, "<anonymous>")
			continue
		}
		e := m.User
		if m.Meta != nil {
			e += "=" + string(m.Meta)
		}
		s = append(s, e)
	}
	return strings.Join(s, ",")
}

// prMembers renders hub.Presence as user[conn=meta ...], conns sorted.
func prMembers(ms []tether.Member) string {
	var s []string
	for _, m := range ms {
		var cs []string
		for _, c := range m.Conns {
			cs = append(cs, c.ID+"="+string(c.Meta))
		}
		slices.Sort(cs)
		s = append(s, m.UserID+"["+strings.Join(cs, " ")+"]")
	}
	return strings.Join(s, ",")
}

// prEvent renders an Observer.Presence event.
func prEvent(e tether.PresenceEvent) string {
	var j, l []string
	for _, m := range e.Joins {
		j = append(j, m.UserID)
	}
	for _, m := range e.Leaves {
		l = append(l, m.UserID)
	}
	return e.Topic + " +" + strings.Join(j, ",") + " -" + strings.Join(l, ",")
}

// prWantEvents reads the next Observer.Presence events and compares them, then
// checks that no other event is pending.
func prWantEvents(t *testing.T, events chan tether.PresenceEvent, want ...string) {
	t.Helper()
	for _, w := range want {
		select {
		case e := <-events:
			if g := prEvent(e); g != w {
				t.Fatalf("OnPresence %s, want %s", g, w)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no OnPresence event, want %s", w)
		}
	}
	select {
	case e := <-events:
		t.Fatalf("unexpected OnPresence %s", prEvent(e))
	default:
	}
}

// 13. Joins: the first presence after a sub lists who is there, with meta;
// the others are told of a new user once, however many conns it has; the
// hub's view agrees.
func TestHubPresenceJoin(t *testing.T) {
	start := time.Now()
	s, events := prHub(t, nil, 200*time.Millisecond)
	ann, annID := prDial(t, s, "ann", "phone")
	if snap := prSub(t, ann, "room"); len(snap.Joins) != 0 || len(snap.Leaves) != 0 {
		t.Fatalf("ann's snapshot of an empty room: %s", snap.line)
	}
	if p := prNext(t, ann, "room", 5*time.Second); prList(p.Joins) != `ann={"device":"phone"}` || len(p.Leaves) != 0 {
		t.Fatalf("ann got %s, want her own join", p.line)
	}
	prWantEvents(t, events, "room +ann -")

	bob, bobID := prDial(t, s, "bob", "laptop")
	if snap := prSub(t, bob, "room"); prList(snap.Joins) != `ann={"device":"phone"}` || len(snap.Leaves) != 0 {
		t.Fatalf("bob's first presence %s, want a snapshot of ann with her meta", snap.line)
	}
	for _, c := range []*client{ann, bob} {
		if p := prNext(t, c, "room", 5*time.Second); prList(p.Joins) != `bob={"device":"laptop"}` || len(p.Leaves) != 0 {
			t.Fatalf("got %s, want bob's join", p.line)
		}
	}
	var e tether.PresenceEvent
	select {
	case e = <-events:
	case <-time.After(5 * time.Second):
		t.Fatal("no OnPresence event for bob's join")
	}
	if prEvent(e) != "room +bob -" || len(e.Joins[0].Conns) != 1 || e.Joins[0].Conns[0].ID != bobID ||
		string(e.Joins[0].Conns[0].Meta) != `{"device":"laptop"}` {
		t.Fatalf("OnPresence %+v, want bob's join with his conn", e)
	}

	// Bob's second device: no new join.
	bob2, bob2ID := prDial(t, s, "bob", "tablet")
	if snap := prSub(t, bob2, "room"); prList(snap.Joins) != `ann={"device":"phone"},bob={"device":"laptop"}` {
		t.Fatalf("bob2's snapshot %s, want ann and bob", snap.line)
	}
	ann.quiet(400 * time.Millisecond)
	bob.quiet(0)
	bob2.quiet(0)
	prWantEvents(t, events)

	want := prMembers([]tether.Member{
		{UserID: "ann", Conns: []adapter.MemberConn{{ID: annID, Meta: json.RawMessage(`{"device":"phone"}`)}}},
		{UserID: "bob", Conns: []adapter.MemberConn{
			{ID: bobID, Meta: json.RawMessage(`{"device":"laptop"}`)},
			{ID: bob2ID, Meta: json.RawMessage(`{"device":"tablet"}`)}}},
	})
	if got := prMembers(s.hub.Presence("room")); got != want {
		t.Fatalf("Presence(room) = %s, want %s", got, want)
	}
	if got := s.hub.Presence("elsewhere"); len(got) != 0 {
		t.Fatalf("Presence(elsewhere) = %v", got)
	}
	for _, u := range []string{"ann", "bob"} {
		if !s.hub.Online(u) {
			t.Errorf("Online(%s) = false", u)
		}
		at, ok := s.hub.LastSeen(u)
		if !ok || at.Before(start) || at.After(time.Now()) {
			t.Errorf("LastSeen(%s) = %v, %v; want a time since the test began", u, at, ok)
		}
	}
	if s.hub.Online("zed") {
		t.Error("Online(zed) = true for an unknown user")
	}
	if _, ok := s.hub.LastSeen("zed"); ok {
		t.Error("LastSeen(zed) ok for an unknown user")
	}
}

// 14. Leaves: a user whose only conn drops and who is back within the
// grace never leaves; one who stays away leaves after the grace, as
// subscribers and Observer.Presence see alike.
func TestHubPresenceLeaveDebounced(t *testing.T) {
	const grace = 300 * time.Millisecond
	s, events := prHub(t, nil, grace)
	ann, _ := prDial(t, s, "ann", "phone")
	prSub(t, ann, "room")
	prNext(t, ann, "room", 5*time.Second) // her join
	bob, bobID := prDial(t, s, "bob", "laptop")
	prSub(t, bob, "room")
	if p := prNext(t, ann, "room", 5*time.Second); prList(p.Joins) != `bob={"device":"laptop"}` {
		t.Fatalf("ann got %s, want bob's join", p.line)
	}
	prWantEvents(t, events, "room +ann -", "room +bob -")

	// Bob's connection drops; he is back on the room within the grace. (His
	// new conn is dialed beforehand, so that the test does not hinge on how
	// fast a loaded machine dials; it is on no topic until the sub.)
	bob2, bob2ID := prDial(t, s, "bob", "laptop")
	bob.Close()
	waitFor(t, 5*time.Second, "bob's first conn unregistered", func() bool { return s.hub.Conn(bobID) == nil })
	prSub(t, bob2, "room")
	if got := s.hub.Presence("room"); len(got) != 2 || got[1].UserID != "bob" || len(got[1].Conns) != 1 || got[1].Conns[0].ID != bob2ID {
		t.Fatalf("Presence(room) = %s, want ann and bob on his new conn", prMembers(got))
	}
	ann.quiet(grace + 400*time.Millisecond) // no leave, no second join
	prWantEvents(t, events)

	// Bob drops for good.
	dropped := time.Now() // before the socket closes: the hub sees the drop after this
	bob2.Close()
	p := prNext(t, ann, "room", grace+5*time.Second)
	took := time.Since(dropped)
	if len(p.Joins) != 0 || prList(p.Leaves) != "bob" {
		t.Fatalf("ann got %s, want bob's leave", p.line)
	}
	if took < grace || took > grace+3*time.Second {
		t.Fatalf("leave announced %v after the drop, want the grace %v (within a generous bound)", took, grace)
	}
	prWantEvents(t, events, "room + -bob")
	ann.quiet(200 * time.Millisecond)

	waitFor(t, 5*time.Second, "bob offline", func() bool { return !s.hub.Online("bob") })
	at, ok := s.hub.LastSeen("bob")
	if !ok || at.Before(dropped) || at.After(time.Now()) {
		t.Fatalf("LastSeen(bob) = %v, %v; want the time of his drop (after %v)", at, ok, dropped)
	}
	if got := prMembers(s.hub.Presence("room")); !strings.HasPrefix(got, "ann[") || strings.Contains(got, "bob") {
		t.Fatalf("Presence(room) = %s, want ann alone", got)
	}
	if !s.hub.Online("ann") {
		t.Fatal("Online(ann) = false")
	}
}

// 15. WithPresence's topic filter: a topic it does not select gets no
// presence message at all, while a selected one does.
func TestHubPresenceTopicFilter(t *testing.T) {
	const grace = 150 * time.Millisecond
	s, events := prHub(t, func(topic string) bool { return strings.HasPrefix(topic, "room:") }, grace)
	ann, _ := prDial(t, s, "ann", "phone")
	bob, _ := prDial(t, s, "bob", "laptop")
	for _, c := range []*client{ann, bob} {
		c.send(`{"op":"sub","topic":"feed","id":"f"}`)
		if a := c.next(5 * time.Second); a.Op != "ack" || a.ID != "f" {
			t.Fatalf("got %s, want ack f", a.line)
		}
	}
	prSub(t, ann, "room:1")
	prNext(t, ann, "room:1", 5*time.Second) // her join
	if snap := prSub(t, bob, "room:1"); prList(snap.Joins) != `ann={"device":"phone"}` {
		t.Fatalf("bob's snapshot %s, want ann", snap.line)
	}
	for _, c := range []*client{ann, bob} {
		if p := prNext(t, c, "room:1", 5*time.Second); prList(p.Joins) != `bob={"device":"laptop"}` {
			t.Fatalf("got %s, want bob's join on room:1", p.line)
		}
	}
	if got := s.hub.Presence("feed"); len(got) != 0 {
		t.Fatalf("Presence(feed) = %s, want none", prMembers(got))
	}
	if got := prMembers(s.hub.Presence("room:1")); !strings.Contains(got, "ann[") || !strings.Contains(got, "bob[") {
		t.Fatalf("Presence(room:1) = %s, want ann and bob", got)
	}
	// The feed still delivers messages.
	if err := s.hub.Publish("feed", []byte(`"news"`)); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*client{ann, bob} {
		if m := c.next(5 * time.Second); m.Op != "msg" || m.Topic != "feed" {
			t.Fatalf("got %s, want the msg of feed", m.line)
		}
	}
	bob.Close()
	if p := prNext(t, ann, "room:1", grace+5*time.Second); prList(p.Leaves) != "bob" {
		t.Fatalf("ann got %s, want bob's leave of room:1", p.line)
	}
	ann.quiet(grace + 200*time.Millisecond)
	prWantEvents(t, events, "room:1 +ann -", "room:1 +bob -", "room:1 + -bob")
}

// 16. Anonymous conns take no part in presence: they see others, nobody
// sees them.
func TestHubPresenceAnonymousInvisible(t *testing.T) {
	const grace = 150 * time.Millisecond
	s, events := prHub(t, nil, grace)
	anon1, _ := prDial(t, s, "", "phone")
	if snap := prSub(t, anon1, "room"); len(snap.Joins)+len(snap.Leaves) != 0 {
		t.Fatalf("anon1's snapshot %s, want an empty room", snap.line)
	}
	anon1.quiet(300 * time.Millisecond) // no join of its own

	ann, _ := prDial(t, s, "ann", "")
	if snap := prSub(t, ann, "room"); len(snap.Joins)+len(snap.Leaves) != 0 {
		t.Fatalf("ann's snapshot %s lists an anonymous conn", snap.line)
	}
	for _, c := range []*client{ann, anon1} {
		if p := prNext(t, c, "room", 5*time.Second); prList(p.Joins) != "ann" || len(p.Leaves) != 0 {
			t.Fatalf("got %s, want ann's join (without meta)", p.line)
		}
	}
	anon2, _ := prDial(t, s, "", "")
	if snap := prSub(t, anon2, "room"); prList(snap.Joins) != "ann" {
		t.Fatalf("anon2's snapshot %s, want ann alone", snap.line)
	}
	anon1.Close()
	ann.quiet(grace + 300*time.Millisecond) // neither a join nor a leave
	anon2.quiet(0)
	if got := s.hub.Presence("room"); len(got) != 1 || got[0].UserID != "ann" {
		t.Fatalf("Presence(room) = %s, want ann alone", prMembers(got))
	}
	if s.hub.Online("") {
		t.Error(`Online("") = true`)
	}
	prWantEvents(t, events, "room +ann -")
}

// 13, under a burst: users (one of them with two conns) subscribe at once.
// Whatever the timing, each subscriber's view (its snapshot, then the
// presence messages) lists every user exactly once, and nobody leaves.
func TestHubPresenceBurstJoinsOnce(t *testing.T) {
	s, events := prHub(t, nil, 200*time.Millisecond)
	users := []string{"ann", "bob", "cat", "dan", "dan"}
	var cs []*client
	for _, u := range users {
		c, _ := prDial(t, s, u, "")
		cs = append(cs, c)
	}
	for _, c := range cs {
		c.send(`{"op":"sub","topic":"room","id":"b"}`)
	}
	for i, c := range cs {
		seen := map[string]int{}
		if a := c.next(5 * time.Second); a.Op != "ack" {
			t.Fatalf("%s: got %s, want the ack", users[i], a.line)
		}
		for len(seen) < 4 {
			p := prNext(t, c, "room", 5*time.Second)
			if len(p.Leaves) != 0 {
				t.Fatalf("%s: unexpected leave in %s", users[i], p.line)
			}
			for _, m := range p.Joins {
				if seen[m.User]++; seen[m.User] > 1 {
					t.Fatalf("%s saw %s join twice (last in %s)", users[i], m.User, p.line)
				}
			}
		}
	}
	for _, c := range cs {
		c.quiet(300 * time.Millisecond)
	}
	joined := map[string]int{}
	for len(events) > 0 {
		e := <-events
		if len(e.Leaves) != 0 {
			t.Fatalf("OnPresence %s", prEvent(e))
		}
		for _, m := range e.Joins {
			joined[m.UserID]++
		}
	}
	if len(joined) != 4 || joined["ann"] != 1 || joined["bob"] != 1 || joined["cat"] != 1 || joined["dan"] != 1 {
		t.Fatalf("OnPresence joins %v, want each user once", joined)
	}
	if got := s.hub.Presence("room"); len(got) != 4 || len(got[3].Conns) != 2 {
		t.Fatalf("Presence(room) = %s, want 4 users, dan with 2 conns", prMembers(got))
	}
}
