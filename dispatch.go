package tether

import (
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/internal/wire"
	"golang.org/x/time/rate"
)

// This file is what a hub does with each inbound message: the requests of
// protocol v1 (PROTOCOL.md), and raw messages, after the rate limit.

// handle is the OnMessage of every hub conn: it runs on the conn's reader,
// one message at a time, so a conn's requests are answered in order.
func (h *Hub) handle(c *Conn, m Message) {
	hc := c.hc
	if !hc.v1 {
		h.handleRaw(c, m)
		return
	}
	for f, err := range wire.ClientFrames(m.Data, m.Binary) {
		err = protocolError(err)
		if !h.allow(c) {
			id := ""
			if err == nil {
				id = f.ID
			}
			c.enqueueControl(appendError(CodeRateLimited, "over the rate limit", id))
		} else if err != nil {
			h.refuse(c, err)
		} else {
			h.request(c, f)
			continue
		}
		if c.Err() != nil {
			return // closed for abuse: read no further
		}
	}
}

// handleRaw passes a raw peer's message to the application.
func (h *Hub) handleRaw(c *Conn, m Message) {
	if !m.Binary && !utf8.Valid(m.Data) {
		// RFC 6455, 8.1: a text message in invalid UTF-8 fails the conn.
		c.end(fmt.Errorf("%w: invalid UTF-8 in a text message", ErrProtocolViolation),
			endPolicy, websocket.StatusInvalidFramePayloadData, "invalid UTF-8")
		return
	}
	if !h.allow(c) {
		return // a raw peer has no error message to read: dropped
	}
	if h.onMessage != nil {
		h.onMessage(c, m)
	}
}

// allow takes a token from c's rate limit. A conn that keeps sending past
// the limit is closed with 4429 and a hint of when to come back.
func (h *Hub) allow(c *Conn) bool {
	hc := c.hc
	if hc.limiter == nil || hc.limiter.Allow() {
		return true
	}
	h.count.rateLimited.Add(1)
	if hc.denials == nil {
		hc.denials = rate.NewLimiter(strikeRate, strikeBurst)
	}
	if !hc.denials.Allow() {
		// Long enough for the bucket to refill.
		wait := int64(float64(h.cfg.rateBurst) / float64(h.cfg.rateLimit) * 1000)
		c.end(ErrRateLimited, endPolicy, StatusRateLimited, "retry_ms="+strconv.FormatInt(max(wait, 1000), 10))
	}
	return false
}

// refuse answers a message the hub could not read. A conn that keeps
// sending such messages is closed with 1008.
func (h *Hub) refuse(c *Conn, err error) {
	hc := c.hc
	h.count.badRequests.Add(1)
	var pe *ProtocolError
	if !errors.As(err, &pe) {
		pe = &ProtocolError{Code: CodeInternal, Reason: err.Error()}
	}
	c.enqueueControl(appendError(pe.Code, pe.Reason, pe.ID))
	if hc.faults == nil {
		hc.faults = rate.NewLimiter(strikeRate, strikeBurst)
	}
	if !hc.faults.Allow() {
		c.end(&causeError{
			msg:  "tether: protocol violation: too many bad messages, the last: " + pe.Reason,
			errs: []error{ErrProtocolViolation, err},
		}, endPolicy, websocket.StatusPolicyViolation, "too many bad messages")
	}
}

// request carries out one request of a v1 client.
func (h *Hub) request(c *Conn, f wire.Frame) {
	switch f.Op {
	case wire.OpPing:
		c.enqueueControl(wire.AppendPong(nil, f.TS))
		return
	case wire.OpPong:
		return // proof of life, already counted by the reader
	case wire.OpSub:
		if a := h.cfg.subscribeAuth; a != nil && !a(c, f.Topic) {
			h.deny(c, f.ID, "subscription refused")
			return
		}
		// subscribe queues the ack itself, ahead of the replay.
		if err := h.subscribe(c, f.Topic, f.Since, f.Latest, f.ID); err != nil {
			h.fail(c, f.ID, err)
		}
		return
	case wire.OpUnsub:
		if err := h.Unsubscribe(c, f.Topic); err != nil {
			h.fail(c, f.ID, err)
			return
		}
	case wire.OpPub:
		if a := h.cfg.clientPublish; a == nil || !a(c, f.Topic) {
			h.deny(c, f.ID, "publication refused")
			return
		}
		if !h.once(c.hc.user, f.ID) {
			h.count.duplicates.Add(1)
			break // published already: the repeat is acked, not published
		}
		stored := []byte(f.Data) // a JSON value is a copy the frame owns
		if f.Kind != wire.KindJSON {
			stored = wire.Store(f.Kind, f.Data)
		}
		if err := h.publish(f.Topic, stored, stored); err != nil {
			h.forgetID(c.hc.user, f.ID) // not published: a repeat must be
			h.fail(c, f.ID, err)
			return
		}
	case wire.OpSend:
		if h.onMessage == nil {
			h.deny(c, f.ID, "the server takes no direct messages")
			return
		}
		if !h.once(c.hc.user, f.ID) {
			h.count.duplicates.Add(1)
			break // handed over already
		}
		h.onMessage(c, Message{Data: f.Data, Binary: f.Kind == wire.KindBinary})
	case wire.OpReceived:
		if err := h.received(c, Position{Epoch: f.Epoch, Seq: f.Seq}, f.ID); err != nil {
			h.fail(c, f.ID, err)
			return
		}
	}
	if f.ID != "" {
		c.enqueueControl(wire.AppendAck(nil, f.ID))
	}
}

// deny answers a request the application refused.
func (h *Hub) deny(c *Conn, id, reason string) {
	h.count.denied.Add(1)
	c.enqueueControl(appendError(CodeForbidden, reason, id))
}

// fail answers a valid request the hub could not carry out.
func (h *Hub) fail(c *Conn, id string, err error) {
	var pe *ProtocolError
	if errors.As(err, &pe) {
		if pe.Code == CodeBadRequest {
			h.refuse(c, pe)
			return
		}
		c.enqueueControl(appendError(pe.Code, pe.Reason, id))
		return
	}
	if c.Err() != nil {
		return // the conn has ended: nobody to answer
	}
	h.connCfg.logger.Warn("tether: request failed", "conn", c.hc.id, "err", err)
	c.enqueueControl(appendError(CodeInternal, "the server failed", id))
}
