package tether

import (
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/internal/wire"
)

// This file is presence: who is on each topic, keyed by user ID, and who is
// online at all. Changes are announced to the topic's v1 subscribers and to
// Observer.Presence, joins after a short settling delay, so that a burst of
// arrivals makes one message, and leaves after a grace period, so that a
// client that reconnects at once never leaves.
//
// What a join or a leave costs must not grow with the topic, or filling a
// room of 20,000 costs 20,000² (PROTOCOL.md, "presence"). So:
//   - A topic announces at most once per interval, which grows with its v1
//     subscribers here (presencePerSubscriber): one message per subscriber
//     per interval however many came and went.
//   - A topic lists its members to subscribers only while it has at most
//     PresencePolicy.List of them; above that, a subscriber's snapshot
//     and every announcement carry only the count. It lists them again
//     once they are down to half the limit, so that a room around the
//     limit does not send the whole list back and forth.
//   - An announcement looks only at the users that changed since the last
//     one (presence.dirty), and the count is kept, not counted.

// PresencePolicy is how a topic tracks presence; [WithPresence] chooses
// one per topic. The zero value is the default.
type PresencePolicy struct {
	// Off means the topic tracks no presence at all.
	Off bool
	// List is the most members the topic lists to its v1 subscribers:
	// while it has at most this many, a new subscriber is sent all of
	// them and every subscriber each join and leave; above it,
	// subscribers are sent only how many there are, until the count is
	// down to List/2. 0 means 100; a negative List sends counts only.
	// Listing costs O(List) per join; counting costs O(1).
	List int
	// Grace is how long a user whose last conn left the topic stays
	// present, so that a user back within it never leaves. 0 means 5 s; a
	// negative Grace means none.
	Grace time.Duration
}

// Member is a user present on a topic: UserID, and Conns, the user's conns
// on the topic (empty in a leave), each with its ID ([Conn.ID]) and the
// metadata [WithConnMeta] gave it. A [Client] sees each user's first
// conn's metadata only, without its ID.
type Member = adapter.Member

// PresenceEvent is a change of presence on a topic: users who arrived,
// users who left, and Count, how many users are present after it.
//
// A hub's observer is told of every user who arrives or leaves. A
// [Client]'s is told what the server sent: with Snapshot set, Joins
// replaces what the client knew of the topic, and lists every member, or
// none when the topic is too big to list them (Count > len(Joins)); a
// topic that only counts its members sends events with Count alone.
type PresenceEvent struct {
	Topic    string
	Joins    []Member
	Leaves   []Member
	Count    int
	Snapshot bool
}

// presence is a topic's presence, guarded by the topic's lock.
type presence struct {
	users map[string]*presentUser
	dirty []string // users whose presentUser.dirty is set, each once, and others
	count int      // users announced present
	told  int      // the count last announced to every subscriber
	// listing: subscribers are told who is present, not only how many;
	// listed holds the announced users then, so that a snapshot costs
	// what it lists, however many others are arriving.
	listing bool
	listed  map[string]struct{}
	list    int // PresencePolicy.List, resolved; <= 0: never list
	grace   time.Duration

	timer *time.Timer // armed while a change waits to be announced
	due   time.Time   // when timer fires
	last  time.Time   // when the last announcement was made
}

type presentUser struct {
	conns     []*Conn
	announced bool            // subscribers have been told of the join
	dirty     bool            // changed since the last announcement
	goneAt    time.Time       // when the last conn left; zero while one is here
	lastMeta  json.RawMessage // the last conn's metadata, shown during the grace

	// With a broker: the user's conns on the topic at other nodes, by
	// node; whether the broker knows of the user's presence here, and
	// whether conns changed since it was told.
	remote  map[string][]adapter.MemberConn
	joined  bool
	changed bool
}

// newPresence returns the presence of a new topic called name, or nil if
// the topic tracks none.
func (h *Hub) newPresence(name string) *presence {
	var pol PresencePolicy
	if h.cfg.presence != nil {
		pol = h.cfg.presence(name)
	}
	if pol.Off {
		return nil
	}
	p := &presence{users: make(map[string]*presentUser), list: pol.List, grace: pol.Grace}
	if p.list == 0 {
		p.list = defaultPresenceList
	}
	switch {
	case p.grace == 0:
		p.grace = defaultPresenceGrace
	case p.grace < 0:
		p.grace = 0
	}
	if p.listing = p.list > 0; p.listing {
		p.listed = make(map[string]struct{})
	}
	return p
}

func (p *presence) empty() bool { return p == nil || len(p.users) == 0 }

// mark notes that user id, u, changed since the last announcement.
func (p *presence) mark(id string, u *presentUser) {
	if !u.dirty {
		u.dirty = true
		p.dirty = append(p.dirty, id)
	}
}

// snapshot encodes the presence message that opens a subscription, or
// that tells every subscriber the topic lists its members again: every
// user whose arrival has been announced, or only how many there are
// while the topic is too big to list them.
func (p *presence) snapshot(topic string) []byte {
	if !p.listing {
		return wire.AppendPresence(nil, topic, p.count, true, nil, nil)
	}
	joins := make([]wire.Member, 0, len(p.listed))
	for id := range p.listed {
		joins = append(joins, wire.Member{User: id, Meta: p.users[id].meta()})
	}
	slices.SortFunc(joins, byUser)
	return wire.AppendPresence(nil, topic, p.count, true, joins, nil)
}

func byUser(a, b wire.Member) int { return strings.Compare(a.User, b.User) }

// meta is what a join shows of the user: its first conn's metadata.
func (u *presentUser) meta() json.RawMessage {
	if len(u.conns) > 0 {
		return u.conns[0].hc.meta
	}
	for _, n := range slices.Sorted(maps.Keys(u.remote)) {
		if cs := u.remote[n]; len(cs) > 0 {
			return cs[0].Meta
		}
	}
	return u.lastMeta
}

// presenceJoinLocked records that c, whose user is set, is on topic t, which is
// locked and tracks presence.
func (h *Hub) presenceJoinLocked(t *topic, c *Conn) {
	user := c.hc.user
	p := t.pres
	u := p.users[user]
	if u == nil {
		u = &presentUser{}
		p.users[user] = u
	}
	u.conns = append(u.conns, c)
	u.goneAt = time.Time{}
	u.changed = true
	if !u.announced || h.broker != nil {
		p.mark(user, u)
		h.armPresenceLocked(t, time.Now().Add(defaultPresenceSettle))
	}
}

// presenceLeaveLocked records that c has left t, which is locked and tracks
// presence.
func (h *Hub) presenceLeaveLocked(t *topic, c *Conn) {
	user := c.hc.user
	p := t.pres
	u := p.users[user]
	if u == nil {
		return
	}
	if i := slices.Index(u.conns, c); i >= 0 {
		u.conns = slices.Delete(u.conns, i, i+1)
	}
	u.changed = true
	if len(u.conns) > 0 {
		if u.joined {
			p.mark(user, u)
			h.armPresenceLocked(t, time.Now().Add(defaultPresenceSettle))
		}
		return
	}
	if !u.announced && !u.joined && len(u.remote) == 0 {
		delete(p.users, user) // came and went unseen
		return
	}
	u.goneAt, u.lastMeta = time.Now(), c.hc.meta
	p.mark(user, u)
	h.armPresenceLocked(t, u.goneAt.Add(p.grace))
}

// armPresenceLocked makes sure t's changes are announced no later than at,
// or than one interval after the last announcement if that is later.
func (h *Hub) armPresenceLocked(t *topic, at time.Time) {
	p := t.pres
	interval := max(defaultPresenceSettle, time.Duration(t.nV1)*presencePerSubscriber)
	if next := p.last.Add(interval); at.Before(next) {
		at = next
	}
	if p.timer != nil {
		if !at.Before(p.due) {
			return
		}
		if !p.timer.Stop() {
			return // firing now: it re-arms for what is not due yet
		}
		h.timers.Done()
		p.timer = nil
	}
	if h.timersDone.Load() {
		return
	}
	h.timers.Add(1)
	p.due = at
	p.timer = time.AfterFunc(time.Until(at), func() { h.announce(t) })
}

// announce sends t's due presence changes and arms the timer for the
// others.
func (h *Hub) announce(t *topic) {
	defer h.timers.Done()
	t.mu.Lock()
	p := t.pres
	p.timer = nil
	now := time.Now()
	observe := h.connCfg.observer.Presence != nil
	var joins, leaves []wire.Member
	var ev PresenceEvent
	var next time.Time
	dirty := p.dirty
	p.dirty = nil
	for _, id := range dirty {
		u := p.users[id]
		if u == nil || !u.dirty {
			continue // gone unseen, or met earlier in the list
		}
		u.dirty = false
		local := len(u.conns) > 0
		due := u.goneAt.Add(p.grace)
		grace := !local && !u.goneAt.IsZero() && now.Before(due)
		if grace {
			p.mark(id, u) // looked at again when due
			if next.IsZero() || due.Before(next) {
				next = due
			}
		}
		if h.broker != nil {
			// The other nodes learn of this node's changes as its own
			// subscribers do: joins once settled, leaves after the grace.
			switch {
			case local && u.changed:
				h.broker.Join(t.name, id, u.localConns())
				u.joined, u.changed = true, false
			case !local && !grace && u.joined:
				h.broker.Leave(t.name, id)
				u.joined = false
			}
		}
		switch {
		case (local || len(u.remote) > 0) && !u.announced:
			u.announced = true
			p.count++
			if p.listing {
				p.listed[id] = struct{}{}
				joins = append(joins, wire.Member{User: id, Meta: u.meta()})
			}
			if observe {
				ev.Joins = append(ev.Joins, u.member(id))
			}
		case !local && !grace && len(u.remote) == 0:
			delete(p.users, id)
			if !u.announced {
				continue
			}
			p.count--
			if p.listing {
				delete(p.listed, id)
				leaves = append(leaves, wire.Member{User: id})
			}
			if observe {
				ev.Leaves = append(ev.Leaves, Member{UserID: id})
			}
		}
	}
	var msg []byte
	switch {
	case p.listing && p.count > p.list:
		p.listing, p.listed = false, nil
		msg = p.snapshot(t.name) // the count alone, from now on
	case !p.listing && p.list > 0 && p.count <= p.list/2:
		p.listing, p.listed = true, make(map[string]struct{}, p.count)
		for id, u := range p.users {
			if u.announced {
				p.listed[id] = struct{}{}
			}
		}
		msg = p.snapshot(t.name)
	case p.listing && len(joins)+len(leaves) > 0:
		slices.SortFunc(joins, byUser)
		slices.SortFunc(leaves, byUser)
		msg = wire.AppendPresence(nil, t.name, p.count, false, nonNil(joins), nonNil(leaves))
	case !p.listing && p.count != p.told:
		msg = wire.AppendPresence(nil, t.name, p.count, false, nil, nil)
	}
	if msg != nil {
		p.last, p.told = now, p.count
		for _, c := range t.subs {
			if c.coalesce {
				c.enqueueControl(msg)
			}
		}
	}
	if !next.IsZero() {
		h.armPresenceLocked(t, next)
	}
	count := p.count
	h.unlockTopic(t)
	if len(ev.Joins)+len(ev.Leaves) > 0 {
		ev.Topic, ev.Count = t.name, count
		h.connCfg.observer.Presence(ev)
	}
}

func nonNil(ms []wire.Member) []wire.Member {
	if ms == nil {
		return []wire.Member{}
	}
	return ms
}

// member returns the user as a Member, with its conns here and, after
// them, those on other nodes.
func (u *presentUser) member(id string) Member {
	m := Member{UserID: id, Conns: u.localConns()}
	for _, n := range slices.Sorted(maps.Keys(u.remote)) {
		m.Conns = append(m.Conns, u.remote[n]...)
	}
	return m
}

func (u *presentUser) localConns() []adapter.MemberConn {
	out := make([]adapter.MemberConn, len(u.conns))
	for i, c := range u.conns {
		out[i] = adapter.MemberConn{ID: c.hc.id, Meta: c.hc.meta}
	}
	return out
}

// remotePresence is Node.Presence.
func (h *Hub) remotePresence(name string, members []adapter.RemoteMember, snapshot bool) {
	t := h.lockExisting(name)
	if t == nil {
		return
	}
	if t.pres == nil || len(t.subs) == 0 && t.pending == 0 {
		// Not held here any more: a change still in flight when the
		// broker let go of the topic, which nothing would ever undo.
		t.mu.Unlock()
		return
	}
	p := t.pres
	if snapshot {
		for id, u := range p.users {
			if u.remote != nil {
				u.remote = nil
				p.mark(id, u)
			}
		}
	}
	for _, m := range members {
		u := p.users[m.UserID]
		if len(m.Conns) == 0 {
			if u != nil {
				delete(u.remote, m.Node)
				p.mark(m.UserID, u)
			}
			continue
		}
		if u == nil {
			u = &presentUser{}
			p.users[m.UserID] = u
		}
		if u.remote == nil {
			u.remote = make(map[string][]adapter.MemberConn)
		}
		u.remote[m.Node] = m.Conns
		p.mark(m.UserID, u)
	}
	h.armPresenceLocked(t, time.Now())
	h.unlockTopic(t)
}

// forgetRemoteLocked drops what t, locked, knows of other nodes' presence
// once it has no subscriber here: the broker no longer tells it.
func (t *topic) forgetRemoteLocked() {
	if t.pres == nil {
		return
	}
	p := t.pres
	for id, u := range p.users {
		u.remote = nil
		if len(u.conns) == 0 && u.goneAt.IsZero() {
			delete(p.users, id)
			if u.announced {
				p.count-- // no subscriber here to tell
				delete(p.listed, id)
			}
		}
	}
}

// stopTimers stops the presence timers once every conn has gone, and
// waits for those already firing.
func (h *Hub) stopTimers() {
	h.timersDone.Store(true)
	for i := range h.topics {
		s := &h.topics[i]
		s.mu.Lock()
		for _, t := range s.m {
			t.mu.Lock()
			if p := t.pres; p != nil && p.timer != nil && p.timer.Stop() {
				p.timer = nil
				h.timers.Done()
			}
			t.mu.Unlock()
		}
		s.mu.Unlock()
	}
	h.timers.Wait()
}

// Presence returns the users present on topic, sorted by user ID, with
// their conns on it. A user whose last conn left less than the grace
// period ago (see [WithPresence]) is still present, with no conns.
//
// With a broker, the answer covers every node: from what the hub was
// told while it has a subscriber to topic, and from the broker otherwise
// (without the users in their grace period there).
//
// It copies and sorts every member: for how many there are, use
// [Hub.PresenceCount].
func (h *Hub) Presence(topic string) []Member {
	t := h.lockExisting(topic)
	if h.broker != nil && (t == nil || len(t.subs) == 0) {
		if t != nil {
			t.mu.Unlock()
		}
		if !h.brokerDown.Load() {
			ctx, cancel := brokerContext()
			m, err := h.broker.Members(ctx, topic)
			cancel()
			if err == nil {
				return m
			}
		}
		t = h.lockExisting(topic) // this hub's own view, then
	}
	if t == nil {
		return nil
	}
	defer t.mu.Unlock()
	if t.pres == nil {
		return nil
	}
	out := make([]Member, 0, len(t.pres.users))
	for id, u := range t.pres.users {
		out = append(out, u.member(id))
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.UserID, b.UserID) })
	return out
}

// PresenceCount returns how many users are present on topic, as its
// subscribers are told: a user is counted once its arrival has been
// announced, and until its leave is. It takes constant time, except with
// a broker while the hub has no subscriber to topic: then it asks the
// broker for the topic's members and counts them, like [Hub.Presence].
func (h *Hub) PresenceCount(topic string) int {
	t := h.lockExisting(topic)
	if h.broker != nil && (t == nil || len(t.subs) == 0) && !h.brokerDown.Load() {
		if t != nil {
			t.mu.Unlock()
		}
		ctx, cancel := brokerContext()
		m, err := h.broker.Members(ctx, topic)
		cancel()
		if err == nil {
			return len(m)
		}
		t = h.lockExisting(topic) // this hub's own view, then
	}
	if t == nil {
		return 0
	}
	defer t.mu.Unlock()
	if t.pres == nil {
		return 0
	}
	return t.pres.count
}

// Online reports whether the user has a live conn on this hub or, with a
// broker, on any node (this hub's answer alone while the broker cannot
// be reached).
func (h *Hub) Online(userID string) bool {
	u := &h.users[h.shard(userID)]
	u.mu.Lock()
	here := len(u.m[userID]) > 0
	u.mu.Unlock()
	if here || h.broker == nil || h.brokerDown.Load() {
		return here
	}
	ctx, cancel := brokerContext()
	defer cancel()
	on, err := h.broker.Online(ctx, userID)
	return err == nil && on
}

// LastSeen returns when the user was last heard from: the latest frame
// of its live conns, or when its last conn ended. ok is false for a user
// the hub does not know, or has forgotten (it remembers 131,072 offline
// users, forgetting the longest gone first).
//
// With a broker that relays (redisbroker does), a user with no conn here
// is looked up on every node: one online elsewhere was heard from within
// a heartbeat, and LastSeen returns the time of the call; one gone from
// every node was last seen when their last conn on any node ended. While
// the broker cannot be reached it answers from this node alone.
func (h *Hub) LastSeen(userID string) (at time.Time, ok bool) {
	at, ok, here := h.lastSeenHere(userID)
	r, relays := h.broker.(adapter.Relay)
	if here || !relays || h.brokerDown.Load() {
		return at, ok
	}
	ctx, cancel := brokerContext()
	defer cancel()
	if on, err := h.broker.Online(ctx, userID); err == nil && on {
		return time.Now(), true
	}
	if t, found, err := r.LastSeen(ctx, userID); err == nil && found && t.After(at) {
		return t, true
	}
	return at, ok
}

// lastSeenHere is LastSeen on this node; here reports a live conn.
func (h *Hub) lastSeenHere(userID string) (at time.Time, ok, here bool) {
	u := &h.users[h.shard(userID)]
	u.mu.Lock()
	defer u.mu.Unlock()
	if conns := u.m[userID]; len(conns) > 0 {
		for _, c := range conns {
			if t := c.LastSeen(); t.After(at) {
				at = t
			}
		}
		return at, true, true
	}
	at, ok = u.seen[userID]
	return at, ok, false
}
