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

// Member is a user present on a topic: UserID, and Conns, the user's conns
// on the topic (empty in a leave), each with its ID ([Conn.ID]) and the
// metadata [WithConnMeta] gave it.
type Member = adapter.Member

// PresenceEvent is a change of presence on a topic: users who arrived
// and users who left.
type PresenceEvent struct {
	Topic  string
	Joins  []Member
	Leaves []Member
}

// presence is a topic's presence, guarded by the topic's lock.
type presence struct {
	users map[string]*presentUser
	timer *time.Timer // armed while a change waits to be announced
	due   time.Time   // when timer fires
}

type presentUser struct {
	conns     []*Conn
	announced bool      // subscribers have been told of the join
	goneAt    time.Time // when the last conn left; zero while one is here

	// With a broker: the user's conns on the topic at other nodes, by
	// node; whether the broker knows of the user's presence here, and
	// whether conns changed since it was told.
	remote  map[string][]adapter.MemberConn
	joined  bool
	changed bool
}

func (p *presence) empty() bool { return p == nil || len(p.users) == 0 }

// snapshot encodes the presence message that opens a subscription: every
// user whose arrival has been announced, as joins.
func (p *presence) snapshot(topic string) []byte {
	var joins []wire.Member
	for id, u := range p.users {
		if u.announced {
			joins = append(joins, wire.Member{User: id, Meta: u.meta()})
		}
	}
	slices.SortFunc(joins, func(a, b wire.Member) int { return strings.Compare(a.User, b.User) })
	return wire.AppendPresence(nil, topic, joins, []wire.Member{})
}

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
	return nil
}

// presenceJoinLocked records that c, whose user is set, is on topic t, which is
// locked and tracks presence.
func (h *Hub) presenceJoinLocked(t *topic, c *Conn) {
	user := c.hc.user
	u := t.pres.users[user]
	if u == nil {
		u = &presentUser{}
		t.pres.users[user] = u
	}
	u.conns = append(u.conns, c)
	u.goneAt = time.Time{}
	u.changed = true
	if !u.announced || h.broker != nil {
		h.armPresenceLocked(t, time.Now().Add(defaultPresenceSettle))
	}
}

// presenceLeaveLocked records that c has left t, which is locked and tracks
// presence.
func (h *Hub) presenceLeaveLocked(t *topic, c *Conn) {
	user := c.hc.user
	u := t.pres.users[user]
	if u == nil {
		return
	}
	if i := slices.Index(u.conns, c); i >= 0 {
		u.conns = slices.Delete(u.conns, i, i+1)
	}
	u.changed = true
	if len(u.conns) > 0 {
		if u.joined {
			h.armPresenceLocked(t, time.Now().Add(defaultPresenceSettle))
		}
		return
	}
	if !u.announced && !u.joined && len(u.remote) == 0 {
		delete(t.pres.users, user) // came and went unseen
		return
	}
	u.goneAt = time.Now()
	h.armPresenceLocked(t, u.goneAt.Add(h.cfg.presenceGrace))
}

// armPresenceLocked makes sure t's changes are announced no later than at.
func (h *Hub) armPresenceLocked(t *topic, at time.Time) {
	p := t.pres
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
	var joins, leaves []wire.Member
	var ev PresenceEvent
	var next time.Time
	for id, u := range p.users {
		local := len(u.conns) > 0
		due := u.goneAt.Add(h.cfg.presenceGrace)
		grace := !local && !u.goneAt.IsZero() && now.Before(due)
		if grace && (next.IsZero() || due.Before(next)) {
			next = due
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
			joins = append(joins, wire.Member{User: id, Meta: u.meta()})
			if h.connCfg.observer.Presence != nil {
				ev.Joins = append(ev.Joins, u.member(id))
			}
		case !local && !grace && len(u.remote) == 0:
			delete(p.users, id)
			if !u.announced {
				continue
			}
			leaves = append(leaves, wire.Member{User: id})
			if h.connCfg.observer.Presence != nil {
				ev.Leaves = append(ev.Leaves, Member{UserID: id})
			}
		}
	}
	if len(joins)+len(leaves) > 0 {
		byUser := func(a, b wire.Member) int { return strings.Compare(a.User, b.User) }
		slices.SortFunc(joins, byUser)
		slices.SortFunc(leaves, byUser)
		msg := wire.AppendPresence(nil, t.name, nonNil(joins), nonNil(leaves))
		for _, c := range t.subs {
			if c.coalesce {
				c.enqueue(msg)
			}
		}
	}
	if !next.IsZero() {
		h.armPresenceLocked(t, next)
	}
	h.unlockTopic(t)
	if len(ev.Joins)+len(ev.Leaves) > 0 {
		ev.Topic = t.name
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
		for _, u := range p.users {
			u.remote = nil
		}
	}
	for _, m := range members {
		u := p.users[m.UserID]
		if len(m.Conns) == 0 {
			if u != nil {
				delete(u.remote, m.Node)
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
	for id, u := range t.pres.users {
		u.remote = nil
		if len(u.conns) == 0 && u.goneAt.IsZero() {
			delete(t.pres.users, id)
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
func (h *Hub) LastSeen(userID string) (at time.Time, ok bool) {
	u := &h.users[h.shard(userID)]
	u.mu.Lock()
	defer u.mu.Unlock()
	if conns := u.m[userID]; len(conns) > 0 {
		for _, c := range conns {
			if t := c.LastSeen(); t.After(at) {
				at = t
			}
		}
		return at, true
	}
	at, ok = u.seen[userID]
	return at, ok
}
