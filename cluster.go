package tether

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/coder/websocket"

	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/internal/wire"
)

// This file is the hub's side of a Broker (see package adapter):
// publishing through it, and taking what it delivers. Each topic the node holds has
// a cursor, t.pos, the position of the last message its subscribers were
// sent; every message goes through deliverLocked, which keeps the
// subscribers' stream free of repeats and holes whatever the broker does.

// brokerTimeout bounds each call the hub makes to its broker.
const brokerTimeout = 5 * time.Second

func brokerContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), brokerTimeout)
}

// node is the hub as its broker sees it (adapter.Node).
type node struct {
	h  *Hub
	id string
}

func (n *node) ID() string { return n.id }

func (n *node) Deliver(topic string, pos Position, data []byte) {
	n.h.deliverRemote(topic, pos, data)
}

func (n *node) DeliverUser(userID string, data []byte) bool {
	return n.h.deliverUser(userID, data)
}

func (n *node) Presence(topic string, members []adapter.RemoteMember, snapshot bool) {
	n.h.remotePresence(topic, members, snapshot)
}

func (n *node) Health(err error) { n.h.brokerHealth(err) }

func (n *node) Relay(cmd []byte) { n.h.relayed(cmd) }

// publishShared publishes data through the broker, which delivers it back
// to this node along with every other node's. While the broker cannot be
// reached, this node's subscribers still get it.
func (h *Hub) publishShared(name string, data []byte) error {
	if !h.brokerDown.Load() {
		ctx, cancel := brokerContext()
		_, err := h.broker.Publish(ctx, name, data)
		cancel()
		if err == nil {
			h.count.published.Add(1)
			return nil
		}
	}
	// Numbered by the hub's own history, whose epochs are never the
	// broker's: subscribers see a new epoch now and another when the link
	// is back, and resync then.
	h.count.published.Add(1)
	h.count.localOnly.Add(1)
	t := h.lockExisting(name)
	if t == nil {
		return nil
	}
	defer t.mu.Unlock()
	pos, err := h.cfg.history.Append(context.Background(), name, data)
	if err != nil {
		return historyErr(err)
	}
	h.deliverLocked(t, pos, data, false)
	return nil
}

// deliverRemote is Node.Deliver.
func (h *Hub) deliverRemote(name string, pos Position, data []byte) {
	t := h.lockExisting(name)
	if t == nil {
		return // no subscriber here any more
	}
	defer t.mu.Unlock()
	if len(t.subs) == 0 && t.pending == 0 {
		return // in flight as the broker let go: the cursor stays unset
	}
	h.deliverLocked(t, pos, data, true)
}

// deliverLocked sends t's message at pos to its subscribers, t locked,
// unless they had it: a message that skips some is preceded by those
// skipped, replayed from the broker when shared is set and it still has
// them, or else by a resync.
func (h *Hub) deliverLocked(t *topic, pos Position, data []byte, shared bool) {
	switch {
	case t.pos.Epoch == "":
	case pos.Epoch == t.pos.Epoch && pos.Seq <= t.pos.Seq:
		return
	case pos.Epoch == t.pos.Epoch && pos.Seq == t.pos.Seq+1:
	case shared && h.fillLocked(t, pos):
	default:
		h.resyncLocked(t, pos.Epoch)
	}
	t.pos = pos
	h.fanOutLocked(t, pos, data, data)
}

// fillLocked sends t's subscribers the messages between t.pos and to,
// from the broker's history, and reports whether it could.
func (h *Hub) fillLocked(t *topic, to Position) bool {
	ctx, cancel := brokerContext()
	entries, last, ok, err := h.broker.Since(ctx, t.name, t.pos)
	cancel()
	if err != nil || !ok || last.Epoch != to.Epoch || last.Seq+1 < to.Seq {
		return false
	}
	for _, e := range entries {
		if e.Seq >= to.Seq {
			break
		}
		t.pos = Position{Epoch: to.Epoch, Seq: e.Seq}
		h.fanOutLocked(t, t.pos, e.Data, e.Data)
	}
	return true
}

// catchUpLocked brings t's subscribers up to the broker's last message,
// after the link was lost: what the broker missed delivering is replayed
// when it still has it, and a resync sent otherwise.
func (h *Hub) catchUpLocked(t *topic) {
	ctx, cancel := brokerContext()
	entries, last, ok, err := h.broker.Since(ctx, t.name, t.pos)
	cancel()
	switch {
	case err != nil:
		return // lost again: the next Health(nil) tries again
	case t.pos.Epoch == "" || !ok:
		// Subscribed while the link was down, with no position, or
		// missed what history no longer holds.
		h.resyncLocked(t, last.Epoch)
	default:
		for _, e := range entries {
			h.fanOutLocked(t, Position{Epoch: last.Epoch, Seq: e.Seq}, e.Data, e.Data)
		}
	}
	t.pos = last
}

// resyncLocked tells t's v1 subscribers that they missed messages that
// cannot be replayed.
func (h *Hub) resyncLocked(t *topic, epoch string) {
	var msg []byte
	for _, c := range t.subs {
		if c.coalesce {
			if msg == nil {
				msg = wire.AppendResync(nil, t.name, epoch)
			}
			c.enqueueAt(msg, t.policy.Priority, 0) // where the topic's messages go
		}
	}
}

// catchUpSharedLocked is catchUp with a broker, t locked: it returns what c
// resuming at since (nil: not resuming) must receive before live
// messages, or, with latest and no since, the topic's last message; and
// the position the ack gives: t's cursor, where live messages start, or
// the one before the latest message, which ends there.
func (h *Hub) catchUpSharedLocked(c *Conn, t *topic, since *wire.Since, latest bool) ([][]byte, Position, error) {
	if t.pos.Epoch == "" {
		ctx, cancel := brokerContext()
		_, last, _, err := h.broker.Since(ctx, t.name, Position{})
		cancel()
		if err != nil {
			if since == nil {
				return nil, Position{}, nil // a plain ack: no position to give
			}
			// The broker cannot be reached, so nothing can be replayed:
			// the client resyncs, to where this node's own history
			// numbers what it publishes meanwhile (it resyncs again
			// when the link is back).
			_, last, _, err := h.cfg.history.Since(context.Background(), t.name, Position{})
			if err != nil {
				return nil, Position{}, err
			}
			return [][]byte{wire.AppendResync(nil, t.name, last.Epoch)}, last, nil
		}
		t.pos = last
	}
	if since == nil {
		if latest && t.pos.Seq > 0 {
			return h.latestSharedLocked(t)
		}
		return nil, t.pos, nil
	}
	pos := Position{Epoch: since.Epoch, Seq: since.Seq}
	resync := [][]byte{wire.AppendResync(nil, t.name, t.pos.Epoch)}
	if pos.Epoch != t.pos.Epoch {
		return resync, t.pos, nil
	}
	if pos.Seq == t.pos.Seq {
		return nil, t.pos, nil
	}
	ctx, cancel := brokerContext()
	entries, last, ok, err := h.broker.Since(ctx, t.name, pos)
	cancel()
	if err != nil || !ok || last.Epoch != t.pos.Epoch || last.Seq < t.pos.Seq {
		// Not replayable, or not now (the broker cannot be reached): the
		// client resyncs rather than fail to subscribe.
		return resync, t.pos, nil
	}
	// Live messages go on after t.pos: replay up to there. A client
	// ahead of t.pos (it saw them on another node) ignores the live ones
	// it has.
	n := 0
	for n < len(entries) && entries[n].Seq <= t.pos.Seq {
		n++
	}
	return replay(c, t.name, entries[:n], t.pos), t.pos, nil
}

// latestSharedLocked returns t's last message as of its cursor, from the
// broker's history, and the position before it; or nothing and the
// cursor when the broker no longer has it, or cannot be reached (the
// subscription is not refused for a message it may do without).
func (h *Hub) latestSharedLocked(t *topic) ([][]byte, Position, error) {
	ctx, cancel := brokerContext()
	entries, last, ok, err := h.broker.Since(ctx, t.name, Position{Epoch: t.pos.Epoch, Seq: t.pos.Seq - 1})
	cancel()
	if err != nil || !ok || last.Epoch != t.pos.Epoch {
		return nil, t.pos, nil
	}
	// The broker may have more than the cursor (on its way to this node):
	// live messages go on after the cursor, so the latest is at it.
	for i, e := range entries {
		if e.Seq == t.pos.Seq {
			return latestEntry(t.name, entries[i:i+1], t.pos, true)
		}
	}
	return nil, t.pos, nil
}

// registerShared adds c, whose user is set, to the user index and queues
// its offline backlog from the broker, without holding the user's lock
// while the broker answers: direct messages arriving meanwhile wait in
// c's backlog, and follow it.
func (h *Hub) registerShared(c *Conn) {
	hc := c.hc
	u := &h.users[h.shard(hc.user)]
	var later [][]byte
	u.mu.Lock()
	u.m[hc.user] = append(u.m[hc.user], c)
	u.peak.Grew(len(u.m))
	delete(u.seen, hc.user)
	hc.backlog = &later
	u.mu.Unlock()

	ctx, cancel := brokerContext()
	kept, err := h.broker.Connect(ctx, hc.user)
	cancel()
	if err != nil {
		h.connCfg.logger.Debug("tether: broker connect", "user", hc.user, "err", err)
	}

	u.mu.Lock()
	defer u.mu.Unlock()
	hc.backlog = nil
	h.takeOffline(c, kept, later)
}

// deliverUser is Node.DeliverUser.
func (h *Hub) deliverUser(userID string, data []byte) bool {
	v1, ok := directEntry(data)
	if !ok {
		return true // not from SendToUser: nothing anyone could read
	}
	u := &h.users[h.shard(userID)]
	u.mu.Lock()
	defer u.mu.Unlock()
	return h.sendToUserLocked(userID, data, v1)
}

// brokerHealth is Node.Health.
func (h *Hub) brokerHealth(err error) {
	if err != nil {
		if h.brokerDown.CompareAndSwap(false, true) {
			h.count.brokerOutages.Add(1)
			h.connCfg.logger.Warn("tether: broker link lost: delivering on this node only", "err", err)
			if f := h.connCfg.observer.Broker; f != nil {
				f(err)
			}
		}
		return
	}
	if !h.brokerDown.CompareAndSwap(true, false) {
		return
	}
	if h.brokerLinked.Swap(true) {
		h.connCfg.logger.Info("tether: broker link back")
	} else {
		h.connCfg.logger.Debug("tether: broker linked")
	}
	if f := h.connCfg.observer.Broker; f != nil {
		f(nil)
	}
	var held []*topic
	for i := range h.topics {
		s := &h.topics[i]
		s.mu.Lock()
		for _, t := range s.m {
			held = append(held, t)
		}
		s.mu.Unlock()
	}
	for _, t := range held {
		t.mu.Lock()
		if len(t.subs) > 0 {
			h.catchUpLocked(t)
		}
		t.mu.Unlock()
	}
}

// closeBroker closes the broker once, when the hub's conns and timers are
// gone.
func (h *Hub) closeBroker() error {
	var err error
	h.brokerClose.Do(func() { err = h.broker.Close() })
	return err
}

// What a hub relays to the other nodes through a broker that implements
// adapter.Relay, so that an operation on every conn, or on all of a
// user's conns, reaches them wherever they are.
type relayCmd struct {
	Op     string `json:"op"` // one of the relay* constants
	User   string `json:"user,omitempty"`
	Topic  string `json:"topic,omitempty"`
	Data   []byte `json:"data,omitempty"`
	Binary bool   `json:"binary,omitempty"`
	Code   int    `json:"code,omitempty"`
	Reason string `json:"reason,omitempty"`
	Epoch  string `json:"epoch,omitempty"` // inbox
	Seq    uint64 `json:"seq,omitempty"`   // inbox
}

const (
	relayBroadcast   = "broadcast"
	relayDisconnect  = "disconnect"
	relaySubscribe   = "subscribe"
	relayUnsubscribe = "unsubscribe"
	relayInbox       = "inbox"
)

// relay sends cmd to the other nodes: all of them, or those of cmd.User.
// Without a broker that relays, there are none to reach. While the
// broker's link is down it fails with ErrBrokerDown.
func (h *Hub) relay(cmd relayCmd) error {
	r, ok := h.broker.(adapter.Relay)
	if !ok {
		return nil
	}
	if h.brokerDown.Load() {
		return fmt.Errorf("tether: %s: %w", cmd.Op, ErrBrokerDown)
	}
	b, err := json.Marshal(cmd)
	if err != nil {
		return err
	}
	ctx, cancel := brokerContext()
	defer cancel()
	if err := r.Relay(ctx, cmd.User, b); err != nil {
		return fmt.Errorf("tether: %s: %w: %w", cmd.Op, ErrBrokerDown, err)
	}
	return nil
}

// relayed is Node.Relay: it carries out what another node's hub relayed.
// A subscription may wait on the broker, so it is made by a goroutine of
// its own, which Shutdown and Close wait for.
func (h *Hub) relayed(b []byte) {
	var cmd relayCmd
	if err := json.Unmarshal(b, &cmd); err != nil {
		h.connCfg.logger.Warn("tether: malformed relayed command", "err", err)
		return
	}
	switch cmd.Op {
	case relayBroadcast:
		if err := h.broadcast(cmd.Data, cmd.Binary); err != nil && !errors.Is(err, ErrHubClosed) {
			h.connCfg.logger.Warn("tether: relayed broadcast", "err", err)
		}
	case relayDisconnect:
		h.disconnectUser(cmd.User, websocket.StatusCode(cmd.Code), cmd.Reason)
	case relayInbox:
		if h.cfg.inbox == nil {
			return
		}
		if entry, ok := directEntryAt(Position{Epoch: cmd.Epoch, Seq: cmd.Seq}, cmd.Data); ok {
			h.deliverInbox(cmd.User, cmd.Data, entry)
		}
	case relaySubscribe, relayUnsubscribe:
		h.relayMu.Lock()
		defer h.relayMu.Unlock()
		if h.relayStopped {
			return
		}
		h.relays.Add(1)
		go func() {
			defer h.relays.Done()
			h.subscribeUser(cmd.User, cmd.Topic, cmd.Op == relaySubscribe)
		}()
	default:
		h.connCfg.logger.Warn("tether: unknown relayed command", "op", cmd.Op)
	}
}

// stopRelays waits for the relayed subscriptions under way and refuses
// new ones.
func (h *Hub) stopRelays() {
	h.relayMu.Lock()
	h.relayStopped = true
	h.relayMu.Unlock()
	h.relays.Wait()
}

// userConns returns the user's live conns on this node.
func (h *Hub) userConns(userID string) []*Conn {
	u := &h.users[h.shard(userID)]
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.m[userID])
}

// DisconnectUser closes every conn of the user, on this node and, with a
// broker, on every other, with code and reason as [Conn.Close] does: to
// sign a user out everywhere, or after revoking their access. It returns
// how many conns it closed on this node; an error says that the other
// nodes could not be reached (the broker's link is down) or that code or
// reason is invalid, which closes nothing.
func (h *Hub) DisconnectUser(userID string, code websocket.StatusCode, reason string) (int, error) {
	if !validCloseCode(code) || len(reason) > maxCloseReason {
		return 0, fmt.Errorf("tether: disconnect: invalid code %d or reason of %d bytes", code, len(reason))
	}
	n := h.disconnectUser(userID, code, reason)
	if h.broker == nil {
		return n, nil
	}
	return n, h.relay(relayCmd{Op: relayDisconnect, User: userID, Code: int(code), Reason: reason})
}

func (h *Hub) disconnectUser(userID string, code websocket.StatusCode, reason string) int {
	n := 0
	for _, c := range h.userConns(userID) {
		if c.Close(code, reason) == nil {
			n++
		}
	}
	return n
}

// SubscribeUser subscribes every conn of the user, on this node and, with
// a broker, on every other, to topic, as [Hub.Subscribe] does for one: to
// add a user to a room from the server. Conns the user opens later are
// not subscribed by it. An error says that the topic is invalid or that
// the other nodes could not be reached.
func (h *Hub) SubscribeUser(userID, topic string) error {
	return h.userTopic(userID, topic, true)
}

// UnsubscribeUser is the reverse of [Hub.SubscribeUser].
func (h *Hub) UnsubscribeUser(userID, topic string) error {
	return h.userTopic(userID, topic, false)
}

func (h *Hub) userTopic(userID, topic string, sub bool) error {
	if err := checkTopic(topic); err != nil {
		return err
	}
	if h.isClosing() {
		return ErrHubClosed
	}
	h.subscribeUser(userID, topic, sub)
	if h.broker == nil {
		return nil
	}
	op := relayUnsubscribe
	if sub {
		op = relaySubscribe
	}
	return h.relay(relayCmd{Op: op, User: userID, Topic: topic})
}

func (h *Hub) subscribeUser(userID, topic string, sub bool) {
	for _, c := range h.userConns(userID) {
		var err error
		if sub {
			err = h.Subscribe(c, topic)
		} else {
			err = h.Unsubscribe(c, topic)
		}
		if err != nil && !errors.Is(err, net.ErrClosed) {
			h.connCfg.logger.Debug("tether: subscribe user", "user", userID, "topic", topic, "err", err)
		}
	}
}
