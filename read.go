package tether

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/internal/park"
	"golang.org/x/time/rate"
)

// This file is a conn's read side: the reader goroutine, the hooks that
// see the peer's pings and pongs, and what the parking socket
// (internal/park) needs of the conn.

// Inbound pings beyond this rate are a policy violation: a peer needs one
// ping per heartbeat interval, not hundreds per second.
const (
	pingRateLimit = 10 // per second, sustained
	pingBurst     = 20
)

// readLoop is the conn's reader. A parking conn's reader returns when it
// parks and a new one starts when the peer sends; the last one to run
// finishes the conn.
func (c *Conn) readLoop() {
	for {
		parkable := c.park != nil && c.park.BeginRead()
		typ, data, err := c.ws.Read(c.ioCtx)
		if parkable {
			c.park.EndRead()
		}
		if err != nil {
			if parkable && errors.Is(err, park.ErrParked) {
				if c.park.Park() {
					return
				}
				continue
			}
			c.end(c.readError(err), endForced, 0, "")
			break
		}
		c.hb.touch()
		if f := c.cfg.onMessage; f != nil {
			c.hb.busy.Store(true)
			c.hb.handled.Add(1)
			f(c, Message{Data: data, Binary: typ == websocket.MessageBinary})
			c.hb.touch() // before clearing busy: see check
			c.hb.busy.Store(false)
		}
	}
	c.abort()
	// A read error does not release coder/websocket's pending pings and
	// close handshake; CloseNow does, now that the socket is closed.
	_ = c.ws.CloseNow()
	if c.park != nil {
		c.park.Release()
	}
	c.wg.Wait()
	c.mu.Lock()
	if c.budget != nil {
		c.budget.Stop()
	}
	err := c.err
	c.mu.Unlock()
	c.sched.wheel.Remove(&c.hb.timer)
	c.cfg.logger.Debug("tether: disconnect", "remote", c.remote, "reason", err)
	if f := c.cfg.onEnd; f != nil {
		f(c, err)
	}
	if f := c.cfg.observer.Disconnect; f != nil {
		f(c, err)
	}
	close(c.done)
	if f := c.cfg.onDone; f != nil {
		f(c)
	}
}

// readError turns the error that ended the reader into a reason.
func (c *Conn) readError(err error) error {
	peer := "peer"
	switch {
	case c.pings != nil:
		peer = "server"
	case c.hc != nil:
		peer = "client"
	}
	return readError(err, peer, c.cfg.maxMessageSize)
}

// readError turns the error a read returned into a reason, in tether's
// words rather than the transport's: peer names who sent a close frame,
// limit is the read limit.
func readError(err error, peer string, limit int64) error {
	var ce websocket.CloseError
	switch {
	case errors.Is(err, websocket.ErrMessageTooBig):
		return &causeError{
			msg:  fmt.Sprintf("tether: message too big: over the limit of %d bytes", limit),
			errs: []error{ErrMessageTooBig, err},
		}
	case errors.As(err, &ce):
		return &CloseError{Code: ce.Code, Reason: ce.Reason, peer: peer}
	default:
		return because("tether: connection lost", err, ErrConnLost)
	}
}

// onPing runs on the reader for every inbound ping; false withholds the pong.
func (c *Conn) onPing(context.Context, []byte) bool {
	c.hb.touch()
	if c.pingLimiter == nil {
		c.pingLimiter = rate.NewLimiter(pingRateLimit, pingBurst)
	}
	if !c.pingLimiter.Allow() {
		c.end(fmt.Errorf("%w: ping flood", ErrProtocolViolation), endPolicy, websocket.StatusPolicyViolation, "ping flood")
		return false
	}
	return true
}

// onPong runs on the reader for every inbound pong, even a late one whose
// ping has given up waiting.
func (c *Conn) onPong(_ context.Context, payload []byte) {
	c.hb.touch()
	if c.park != nil {
		c.rawPong(payload)
	}
}

// unpark starts a reader for a parked conn; it does nothing for a conn
// whose reader runs.
func (c *Conn) unpark() {
	if c.park != nil {
		c.park.Unpark()
	}
}

// parkOwner is the conn as its parking socket sees it (park.Owner),
// kept off Conn's own method set.
type parkOwner Conn

func (o *parkOwner) conn() *Conn { return (*Conn)(o) }

func (o *parkOwner) Ending() bool { return o.hb.state.Load() == int32(Closed) }

func (o *parkOwner) Resume() { go o.conn().readLoop() }

func (o *parkOwner) Pong(payload uint64) bool {
	now := time.Now()
	o.hb.touchAt(now)
	return o.conn().rawPongAt(time.Duration(payload), now)
}

func (o *parkOwner) GoWrite(write func()) { o.conn().goWrite(write) }

func (o *parkOwner) ParkFailed(err error) {
	o.cfg.logger.Debug("tether: reading without parking", "remote", o.remote, "err", err)
}
