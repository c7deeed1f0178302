package tether

import (
	"fmt"
)

// This file is the hub's side of an inbox (WithInbox, PROTOCOL.md "The
// inbox"): SendToUser numbers a user's direct messages in the inbox and
// delivers them; a new v1 conn of the user gets the unacknowledged ones
// first; a client's received drops them.

// sendToInbox keeps raw, a direct message as raw peers get it, in the
// user's inbox and delivers it to the user's conns, here and, through a
// broker that relays, on the other nodes. Appends and deliveries for a
// user are made one at a time, so that conns get a user's messages in
// seq order.
func (h *Hub) sendToInbox(userID string, raw []byte) error {
	mu := &h.inboxMu[h.shard(userID)]
	mu.Lock()
	defer mu.Unlock()
	ctx, cancel := brokerContext()
	pos, err := h.cfg.inbox.Append(ctx, userID, raw)
	cancel()
	if err != nil {
		return fmt.Errorf("tether: inbox: %w", err)
	}
	entry, ok := directEntryAt(pos, raw)
	if !ok {
		return nil
	}
	h.deliverInbox(userID, raw, entry)
	if h.broker != nil {
		// Kept in the inbox whatever happens here: a conn on another
		// node that misses it gets it when it next connects.
		if err := h.relay(relayCmd{Op: relayInbox, User: userID, Data: raw, Epoch: pos.Epoch, Seq: pos.Seq}); err != nil {
			h.connCfg.logger.Debug("tether: inbox relay", "user", userID, "err", err)
		}
	}
	return nil
}

// deliverInbox queues an inbox message for the user's conns on this
// node: numbered for v1 peers (behind the replay, for a conn that is
// getting it), as it is for raw peers.
func (h *Hub) deliverInbox(userID string, raw, entry []byte) {
	u := &h.users[h.shard(userID)]
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, c := range u.m[userID] {
		switch {
		case !c.hc.v1:
			c.enqueue(raw)
		case c.hc.inboxLater != nil:
			*c.hc.inboxLater = append(*c.hc.inboxLater, entry)
		default:
			c.enqueue(entry)
		}
	}
}

// replayInbox queues for c, a new v1 conn of a user, the messages of the
// user's inbox not yet acknowledged, then those relayed to it meanwhile.
// The caller holds the user's inboxMu.
func (h *Hub) replayInbox(c *Conn) {
	hc := c.hc
	ctx, cancel := brokerContext()
	epoch, pending, err := h.cfg.inbox.Pending(ctx, hc.user)
	cancel()
	if err != nil {
		h.connCfg.logger.Warn("tether: inbox", "user", hc.user, "err", err)
	}
	var j joiner
	for _, e := range pending {
		if entry, ok := directEntryAt(Position{Epoch: epoch, Seq: e.Seq}, e.Data); ok {
			j.add(entry)
		}
	}
	u := &h.users[h.shard(hc.user)]
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, entry := range *hc.inboxLater {
		j.add(entry)
	}
	hc.inboxLater = nil
	if entries := j.entries(); len(entries) > 0 {
		c.enqueueAll(entries...) // bounded by the inbox: it must not be lost
	}
}

// received is a client's received: its user's inbox messages up to pos
// were handed to the application.
func (h *Hub) received(c *Conn, pos Position, id string) error {
	if h.cfg.inbox == nil || c.hc.user == "" {
		return &ProtocolError{Code: CodeBadRequest, Reason: "the server keeps no inbox for this connection", ID: id}
	}
	ctx, cancel := brokerContext()
	defer cancel()
	if err := h.cfg.inbox.Ack(ctx, c.hc.user, pos); err != nil {
		h.connCfg.logger.Warn("tether: inbox", "user", c.hc.user, "err", err)
		return &ProtocolError{Code: CodeInternal, Reason: "inbox unavailable"}
	}
	return nil
}
