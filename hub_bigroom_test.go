package tether_test

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/internal/testpeer"
)

// This file checks presence in rooms too big to list (PROTOCOL.md,
// presence: listed and counted topics) over real sockets: bounded
// snapshots, counts that converge, the switch from listing to counting
// and back. The 5,000-member room is in hub_bigroom_norace_test.go.

// roomPeer is a protocol v1 peer that subscribes to one topic and keeps
// the topic's presence as PROTOCOL.md tells a client to: the members
// listed, the count, and the snapshots it was sent.
type roomPeer struct {
	*testpeer.Peer
	user string

	mu        sync.Mutex
	acked     bool
	count     int             // -1 until the first presence
	members   map[string]bool // as listed; nil until the first snapshot
	snapshots []wire
	bad       string // the first presence that broke the protocol's rules
}

// dialRoomPeer connects user to the hub at url and subscribes it to topic.
func dialRoomPeer(ctx context.Context, url, user, topic string) (*roomPeer, error) {
	rp := &roomPeer{user: user, count: -1}
	p, _, err := testpeer.Dial(ctx, url+"?user="+user, testpeer.Options{
		Subprotocols: []string{tether.Subprotocol},
		Lines:        true,
		Buffer:       -1,
		OnLine:       rp.line,
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", user, err)
	}
	rp.Peer = p
	if err := p.Send(websocket.MessageText, []byte(`{"op":"sub","topic":`+quote(topic)+`,"id":"s"}`)); err != nil {
		p.Close()
		return nil, fmt.Errorf("%s: sub: %w", user, err)
	}
	return rp, nil
}

// line applies one line the peer read.
func (rp *roomPeer) line(b []byte) error {
	w, err := parseWire(b, false)
	if err != nil {
		return err
	}
	rp.mu.Lock()
	defer rp.mu.Unlock()
	switch w.Op {
	case "ack":
		rp.acked = true
	case "error":
		return fmt.Errorf("error from the hub: %s", w.line)
	case "presence":
		if w.Count == nil {
			rp.fail("no count", w)
			break
		}
		if w.Snapshot {
			rp.members = make(map[string]bool, len(w.Joins))
			rp.snapshots = append(rp.snapshots, w)
		} else if rp.members == nil {
			rp.fail("a change before the snapshot", w)
		}
		for _, m := range w.Joins {
			if rp.members[m.User] {
				rp.fail("a join of a member already listed", w)
			}
			rp.members[m.User] = true
		}
		for _, m := range w.Leaves {
			if !rp.members[m.User] {
				rp.fail("a leave of a member not listed", w)
			}
			delete(rp.members, m.User)
		}
		rp.count = *w.Count
	}
	return nil
}

func (rp *roomPeer) fail(what string, w wire) {
	if rp.bad == "" {
		rp.bad = what + ": " + w.line
	}
}

// view returns what the peer knows of the topic: the count, and the
// members listed (sorted) when the list is complete, else nil.
func (rp *roomPeer) view() (count int, listed []string) {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	if len(rp.members) == rp.count {
		for u := range rp.members {
			listed = append(listed, u)
		}
		slices.Sort(listed)
	}
	return rp.count, listed
}

// room is a hub with users in one topic.
type room struct {
	t     testing.TB
	s     *hubServer
	topic string
	peers []*roomPeer
	ended atomic.Int64 // conns the hub ended
}

func newRoom(t testing.TB, opts ...tether.HubOption) *room {
	r := &room{t: t, topic: "stream:7"}
	r.s = newHubServer(t, append([]tether.HubOption{
		tether.WithAuth(func(req *http.Request) (string, error) { return req.URL.Query().Get("user"), nil }),
		tether.WithObserver(tether.Observer{Disconnect: func(*tether.Conn, error) { r.ended.Add(1) }}),
	}, opts...)...)
	return r
}

// join connects n users, u<first> on, with at most 64 handshakes in
// flight, each subscribing as soon as it is up: a burst.
func (r *room) join(first, n int) []*roomPeer {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	peers := make([]*roomPeer, n)
	errs := make(chan error, n)
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			p, err := dialRoomPeer(ctx, r.s.url(), fmt.Sprintf("u%05d", first+i), r.topic)
			if err != nil {
				errs <- err
				return
			}
			peers[i] = p
		}()
	}
	wg.Wait()
	close(errs)
	for _, p := range peers {
		if p != nil {
			r.t.Cleanup(p.Close)
		}
	}
	for err := range errs {
		r.t.Fatalf("dial: %v", err)
	}
	r.peers = append(r.peers, peers...)
	return peers
}

// converge waits until every live peer's view satisfies ok, failing the
// test with the first peer that does not after limit.
func (r *room) converge(limit time.Duration, what string, peers []*roomPeer, ok func(count int, listed []string) bool) {
	r.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		var lagging *roomPeer
		for _, p := range peers {
			if !ok(p.view()) {
				lagging = p
				break
			}
		}
		if lagging == nil {
			return
		}
		if time.Now().After(deadline) {
			count, listed := lagging.view()
			r.t.Fatalf("after %v, %s is not there yet: count %d, listed %d (%v)", limit, lagging.user, count, len(listed), what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkPeers fails the test if a peer's conn ended or broke the
// protocol's presence rules, or if any snapshot it got listed more than
// limit members or a partial list.
func (r *room) checkPeers(peers []*roomPeer, limit int) {
	r.t.Helper()
	for _, p := range peers {
		select {
		case <-p.Done():
			r.t.Fatalf("%s's conn ended: %v", p.user, p.Err())
		default:
		}
		p.mu.Lock()
		bad, acked, snaps := p.bad, p.acked, slices.Clone(p.snapshots)
		p.mu.Unlock()
		if bad != "" {
			r.t.Fatalf("%s: %s", p.user, bad)
		}
		if !acked || len(snaps) == 0 {
			r.t.Fatalf("%s: acked %v, %d snapshots", p.user, acked, len(snaps))
		}
		for _, s := range snaps {
			if len(s.Joins) > limit || len(s.Joins) != 0 && len(s.Joins) != *s.Count {
				r.t.Fatalf("%s: snapshot lists %d of %d members (limit %d): %.200s", p.user, len(s.Joins), *s.Count, limit, s.line)
			}
		}
	}
}

func users(first, n int) []string {
	var out []string
	for i := range n {
		out = append(out, fmt.Sprintf("u%05d", first+i))
	}
	return out
}

// A topic with a small list limit lists its members, counts them once
// they outnumber the limit, telling every subscriber with a snapshot
// without members, and lists them again, with a full snapshot, once they
// are down to half the limit. Every subscriber's count follows; a late
// joiner's snapshot holds the count alone; PresenceCount agrees.
func TestHubPresenceListsThenCounts(t *testing.T) {
	const list, n = 20, 300
	r := newRoom(t, tether.WithPresence(func(string) tether.PresencePolicy {
		return tether.PresencePolicy{List: list, Grace: 100 * time.Millisecond}
	}))
	// A few first, in a listed room: each of them gets the full list.
	early := r.join(0, 5)
	r.converge(time.Minute, "5 listed", early, func(count int, listed []string) bool {
		return count == 5 && slices.Equal(listed, users(0, 5))
	})
	r.checkPeers(early, list)

	// The rest in bursts: the room goes past the limit.
	for i := 5; i < n; i += 59 {
		r.join(i, min(59, n-i))
	}
	r.converge(time.Minute, "300 counted", r.peers, func(count int, listed []string) bool { return count == n && listed == nil })
	r.checkPeers(r.peers, list)
	if got := r.s.hub.PresenceCount(r.topic); got != n {
		t.Fatalf("PresenceCount = %d, want %d", got, n)
	}
	late := r.join(n, 1)[0]
	r.converge(time.Minute, "the late joiner counted", []*roomPeer{late}, func(count int, _ []string) bool { return count == n+1 })
	late.mu.Lock()
	snap := late.snapshots[0]
	late.mu.Unlock()
	if len(snap.Joins) != 0 || *snap.Count < n {
		t.Fatalf("the late joiner's snapshot %s, want the count (at least %d) and no member", snap.line, n)
	}

	// All but 5 leave: the 5 get the full list back.
	stay := r.peers[:5]
	for _, p := range r.peers[5:] {
		p.Close()
	}
	r.converge(time.Minute, "5 listed again", stay, func(count int, listed []string) bool {
		return count == 5 && slices.Equal(listed, users(0, 5))
	})
	r.checkPeers(stay, list)
	waitFor(t, 10*time.Second, "PresenceCount down to 5", func() bool { return r.s.hub.PresenceCount(r.topic) == 5 })
	if got := len(r.s.hub.Presence(r.topic)); got != 5 {
		t.Fatalf("Presence lists %d users, want 5", got)
	}
	waitFor(t, 10*time.Second, "the hub ended the conns that left", func() bool { return r.ended.Load() == int64(n+1-5) })
}

// A topic that never lists (List < 0) sends counts from the first
// snapshot on, and tells its subscribers of a count that goes back and
// forth only if it changed.
func TestHubPresenceCountsOnly(t *testing.T) {
	r := newRoom(t, tether.WithPresence(func(string) tether.PresencePolicy {
		return tether.PresencePolicy{List: -1, Grace: -1}
	}))
	peers := r.join(0, 3)
	r.converge(time.Minute, "3 counted", peers, func(count int, listed []string) bool { return count == 3 && listed == nil })
	r.checkPeers(peers, 0)
	peers[2].Close()
	r.converge(time.Minute, "2 counted", peers[:2], func(count int, listed []string) bool { return count == 2 && listed == nil })
	for _, p := range peers[:2] {
		p.mu.Lock()
		for _, s := range p.snapshots {
			if len(s.Joins) != 0 {
				t.Errorf("%s: snapshot %s lists members", p.user, s.line)
			}
		}
		p.mu.Unlock()
	}
}

// The Go client keeps a topic's presence from the server's messages:
// Client.Presence lists the members of a listed topic and counts those of
// a counted one, and Observer.Presence sees each message.
func TestClientPresence(t *testing.T) {
	const list = 4
	r := newRoom(t, tether.WithPresence(func(string) tether.PresencePolicy {
		return tether.PresencePolicy{List: list, Grace: -1}
	}))
	events := make(chan tether.PresenceEvent, 100)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cl, err := tether.Dial(ctx, r.s.url()+"?user=zed", tether.WithObserver(tether.Observer{
		Presence: func(e tether.PresenceEvent) { events <- e },
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.Subscribe(ctx, r.topic, func(tether.Message) {}); err != nil {
		t.Fatal(err)
	}
	want := func(what string, ok func(members []tether.Member, count int) bool) {
		t.Helper()
		waitFor(t, 30*time.Second, what, func() bool { return ok(cl.Presence(r.topic)) })
	}
	ids := func(ms []tether.Member) string {
		var s []string
		for _, m := range ms {
			s = append(s, m.UserID)
		}
		return strings.Join(s, ",")
	}
	want("zed listed", func(ms []tether.Member, n int) bool { return n == 1 && ids(ms) == "zed" })
	e := <-events
	if !e.Snapshot || e.Topic != r.topic || e.Count != 0 || len(e.Joins) != 0 {
		t.Fatalf("first event %+v, want an empty snapshot", e)
	}

	peers := r.join(0, 2)
	want("3 listed", func(ms []tether.Member, n int) bool { return n == 3 && ids(ms) == "u00000,u00001,zed" })
	more := r.join(2, 3)
	want("6 counted", func(ms []tether.Member, n int) bool { return n == 6 && ms == nil })
	for _, p := range more {
		p.Close()
	}
	peers[1].Close()
	want("2 listed again", func(ms []tether.Member, n int) bool { return n == 2 && ids(ms) == "u00000,zed" })

	// The events tell the same story: counts up to 6, a snapshot without
	// members on the way up, one with both users on the way down.
	var counts []int
	var emptySnap, fullSnap bool
	for len(events) > 0 {
		e := <-events
		counts = append(counts, e.Count)
		if e.Snapshot && len(e.Joins) == 0 && e.Count > list {
			emptySnap = true
		}
		if e.Snapshot && e.Count == 2 && len(e.Joins) == 2 {
			fullSnap = true
		}
	}
	if !emptySnap || !fullSnap || !slices.Contains(counts, 6) || counts[len(counts)-1] != 2 {
		t.Fatalf("events: counts %v, snapshot without members %v, full snapshot %v", counts, emptySnap, fullSnap)
	}
	if ms, n := cl.Presence("elsewhere"); ms != nil || n != 0 {
		t.Fatalf("Presence(elsewhere) = %v, %d", ms, n)
	}
}

// Announcements to a topic are at least one interval apart, and the
// interval grows with the topic's v1 subscribers (0.25 ms each, 25 ms at
// least): 400 subscribers watching 100 users arrive one every 2 ms get
// one presence per 100 ms with the arrivals of those 100 ms, each
// arrival once, rather than a presence per arrival.
func TestSynctestPresenceInterval(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const watchers, users, every = 400, 100, 2 * time.Millisecond
		const interval = watchers * 250 * time.Microsecond
		var hub *tether.Hub
		b := newBubbleHub(t,
			tether.WithAuth(func(r *http.Request) (string, error) { return r.URL.Query().Get("user"), nil }),
			tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
				if c.UserID() != "" { // the users are raw peers the server subscribes
					if err := hub.Subscribe(c, "room"); err != nil {
						t.Errorf("Subscribe: %v", err)
					}
				}
			}}))
		defer b.stop()
		hub = b.hub
		type seen struct {
			at time.Time
			w  wire
		}
		var mu sync.Mutex
		got := make([][]seen, watchers)
		dial := func(user string, v1 bool) *websocket.Conn {
			o := &websocket.DialOptions{HTTPClient: b.httpClient()}
			if v1 {
				o.Subprotocols = []string{tether.Subprotocol}
			}
			ws, _, err := websocket.Dial(context.Background(), "ws://pipe/?user="+user, o)
			if err != nil {
				t.Fatalf("dial %q: %v", user, err)
			}
			return ws
		}
		for i := range watchers {
			ws := dial("", true)
			defer ws.CloseNow()
			if err := ws.Write(context.Background(), websocket.MessageText, []byte(`{"op":"sub","topic":"room"}`)); err != nil {
				t.Fatal(err)
			}
			go func() {
				for {
					_, b, err := ws.Read(context.Background())
					if err != nil {
						return
					}
					for line := range strings.SplitSeq(string(b), "\n") {
						w, err := parseWire([]byte(line), false)
						if err == nil && w.Op == "presence" {
							mu.Lock()
							got[i] = append(got[i], seen{time.Now(), w})
							mu.Unlock()
						}
					}
				}
			}()
		}
		synctest.Wait()
		time.Sleep(time.Second) // every watcher subscribed and snapshotted
		for i := range users {
			ws := dial(fmt.Sprintf("u%03d", i), false)
			defer ws.CloseNow()
			go func() {
				for {
					if _, _, err := ws.Read(context.Background()); err != nil {
						return
					}
				}
			}()
			time.Sleep(every)
		}
		time.Sleep(time.Second)
		synctest.Wait()

		mu.Lock()
		defer mu.Unlock()
		for i, msgs := range got {
			if len(msgs) == 0 || !msgs[0].w.Snapshot {
				t.Fatalf("watcher %d: no snapshot first", i)
			}
			joined := map[string]int{}
			for k, m := range msgs[1:] {
				if d := m.at.Sub(msgs[k].at); k > 0 && d < interval {
					t.Fatalf("watcher %d: presences %v apart, want at least %v", i, d, interval)
				}
				for _, j := range m.w.Joins {
					joined[j.User]++
				}
			}
			if len(joined) != users {
				t.Fatalf("watcher %d saw %d users join, want %d", i, len(joined), users)
			}
			for u, n := range joined {
				if n != 1 {
					t.Fatalf("watcher %d saw %s join %d times", i, u, n)
				}
			}
			// The arrivals span users×every; one presence per interval.
			if max := int(users*every/interval) + 2; len(msgs)-1 > max {
				t.Fatalf("watcher %d got %d presences for %d arrivals, want at most %d", i, len(msgs)-1, users, max)
			}
			if last := msgs[len(msgs)-1].w; *last.Count != users {
				t.Fatalf("watcher %d: last count %d, want %d", i, *last.Count, users)
			}
		}
	})
}
