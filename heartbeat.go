package tether

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-ws/tether/internal/wheel"
	"github.com/tether-ws/tether/internal/wire"
)

// State is where a [Conn] or a [Client] is in its life. A conn is
// Connected, Suspect or Closed; a client is Connecting, Connected,
// Reconnecting or Closed.
type State int32

const (
	// Connecting: Dial is making a client's first conn.
	Connecting State = iota
	// Connected: a conn's peer has shown life within the heartbeat
	// interval, or answered its last ping on time. A client has a conn
	// up, its subscriptions back in place and its offline buffer sent.
	Connected
	// Suspect: a conn's ping has gone unanswered for longer than the RTT
	// estimate allows. Any inbound frame makes it Connected again.
	Suspect
	// Reconnecting: a client lost its conn and is making another,
	// waiting between attempts as its [Backoff] says.
	Reconnecting
	// Closed: the conn or client has ended for good; its Err says why. A
	// client closes on [Client.Close], when the server refuses it for
	// good, or when it gives up.
	Closed
)

func (s State) String() string {
	switch s {
	case Connecting:
		return "connecting"
	case Connected:
		return "connected"
	case Suspect:
		return "suspect"
	case Reconnecting:
		return "reconnecting"
	case Closed:
		return "closed"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

const (
	// stretchAfter on-time pongs in a row double an adaptive heartbeat.
	stretchAfter = 3
	// suspectFloor keeps a jittery RTT from flagging healthy peers.
	suspectFloor = 200 * time.Millisecond
	// maxPingsInFlight bounds the short-lived ping goroutines per scheduler.
	// A due conn that finds no slot is retried a tick later.
	maxPingsInFlight = 4096
)

// scheduler wakes connections whose heartbeat is due. One scheduler serves
// many conns: a timing wheel with one goroutine, which runs only while a
// conn is registered, and a bound on the pings in flight.
type scheduler struct {
	wheel *wheel.Wheel
	pings atomic.Int32
}

// Conns with the same tick share one scheduler.
var schedulers sync.Map // time.Duration -> *scheduler

// tickFor is the scheduler resolution for a heartbeat timeout: fine enough
// that detection is late by under 2 %, coarse enough to cost nothing.
func tickFor(timeout time.Duration) time.Duration {
	return min(max(timeout/64, time.Millisecond), 250*time.Millisecond)
}

func sharedScheduler(tick time.Duration) *scheduler {
	if s, ok := schedulers.Load(tick); ok {
		return s.(*scheduler)
	}
	s, _ := schedulers.LoadOrStore(tick, &scheduler{wheel: wheel.New(tick)})
	return s.(*scheduler)
}

// heartbeat is one conn's liveness bookkeeping. lastSeen is written by the
// reader on every frame and read by the scheduler; the rest is guarded by mu.
type heartbeat struct {
	born     time.Time    // monotonic origin for lastSeen
	lastSeen atomic.Int64 // ns since born of the last inbound frame
	// lastWrite is when a write of ours to the peer last completed, and
	// lastDrain when one completed after waiting for the socket: the peer
	// had to read for it to complete.
	lastWrite, lastDrain atomic.Int64
	busy                 atomic.Bool   // the message handler is running
	handled              atomic.Uint64 // messages handed to the handler so far
	state                atomic.Int32  // State

	mu           sync.Mutex
	base, baseTO time.Duration // configured interval and timeout
	max          time.Duration // adaptive cap; 0 = off
	interval     time.Duration // current, possibly stretched
	timeout      time.Duration
	pingAfter    time.Duration // silence before the next ping, jittered
	pingSent     time.Duration // since born; 0 = no ping in flight
	pingHandled  uint64        // handled when a raw ping was sent
	lastPing     time.Duration // since born: the last ping sent, answered or not
	srtt, rttvar time.Duration
	sampled      bool // srtt and rttvar hold a measurement
	onTime       int
	seenLife     bool // any frame or pong since connect
	// consumed is how far the peer had read what we sent when the conn
	// was last looked at for being silent past a ping (parking conns
	// only; consumedOK: it was known): see check.
	consumed   uint64
	consumedOK bool
	timer      wheel.Timer
}

func (h *heartbeat) init(cfg *config) {
	h.born = time.Now()
	h.state.Store(int32(Connected))
	h.base, h.baseTO, h.max = cfg.interval, cfg.timeout, cfg.adaptiveMax
	h.interval, h.timeout = cfg.interval, cfg.timeout
	// Conns that connect together (after a restart) must not ping together:
	// the first ping comes after a silence uniform in [interval/2, interval].
	h.pingAfter = h.interval/2 + rand.N(h.interval/2+1)
}

func (h *heartbeat) since(t time.Time) time.Duration { return t.Sub(h.born) }

// touch records an inbound frame: proof of life. It is on the hot path of
// every frame, so it is two atomic operations and nothing else.
func (h *heartbeat) touch() { h.touchAt(time.Now()) }

// touchAt is touch with the time already read.
func (h *heartbeat) touchAt(now time.Time) {
	h.lastSeen.Store(int64(now.Sub(h.born)))
	if h.state.Load() == int32(Suspect) {
		h.state.CompareAndSwap(int32(Suspect), int32(Connected))
	}
}

func (h *heartbeat) jitter() {
	// Within [0.8, 1]·interval, so that pings of conns with equal settings
	// drift apart, and never later than the interval: a timeout just above
	// the interval must still leave the peer time to answer.
	h.pingAfter = h.interval*4/5 + rand.N(h.interval/5+1)
}

// suspectAfter is how long a pong may take before the peer is suspect:
// RFC 6298's RTO (srtt + 4·rttvar) with a floor, and always leaving room
// before the timeout so that Suspect comes before death.
func (h *heartbeat) suspectAfter() time.Duration {
	d := time.Second
	if h.sampled {
		d = max(h.srtt+4*h.rttvar, suspectFloor)
	}
	return max(min(d, (h.timeout-h.interval)/2), time.Millisecond)
}

// sample feeds one RTT measurement to the estimator (RFC 6298, 2.2-2.3).
func (h *heartbeat) sampleLocked(rtt time.Duration) {
	if !h.sampled {
		h.srtt, h.rttvar, h.sampled = rtt, rtt/2, true
		return
	}
	diff := h.srtt - rtt
	if diff < 0 {
		diff = -diff
	}
	h.rttvar = (3*h.rttvar + diff) / 4
	h.srtt = (7*h.srtt + rtt) / 8
}

// pongLocked settles a heartbeat ping: rtt < 0 means no pong came. A
// measurement taken while our own message handler held up the reader says
// nothing about the link (the pong waited for us), so it is not sampled and
// does not count for or against the adaptive heartbeat.
func (h *heartbeat) pongLocked(rtt time.Duration, heldUp bool) {
	h.pingSent = 0
	defer h.jitter()
	if rtt >= 0 {
		h.seenLife = true
		if heldUp {
			return
		}
	}
	late := rtt < 0 || rtt > h.suspectAfter() // judged by the estimate before this sample
	if rtt >= 0 {
		h.sampleLocked(rtt)
	}
	if h.max > 0 {
		switch {
		case late:
			h.onTime = 0
			h.interval, h.timeout = h.base, h.baseTO
		default:
			h.onTime++
			if h.onTime >= stretchAfter && h.interval < h.max {
				h.onTime = 0
				h.interval = min(2*h.interval, h.max)
			}
		}
		// The timeout keeps the configured ratio to the interval, computed
		// from the base each time so that no floor ratchets it up; and a
		// slow link must still have time to answer.
		scaled := time.Duration(float64(h.baseTO) * float64(h.interval) / float64(h.base))
		h.timeout = max(scaled, h.interval+h.srtt+4*h.rttvar)
	}
}

// progressLocked reads how far the peer has read what we sent, as its TCP
// reports it (park.Conn.Consumed), and reports whether that grew since it
// last did. Only parking conns can tell; c.hb.mu must be held.
func (c *Conn) progressLocked() bool {
	if c.park == nil {
		return false
	}
	h := &c.hb
	n, ok := c.park.Consumed()
	grew := ok && h.consumedOK && n > h.consumed
	h.consumed, h.consumedOK = n, ok
	return grew
}

// check runs on the scheduler when the conn's timer is due. It decides
// between nothing, a ping and death, and returns when to look again.
func (c *Conn) check(now time.Time) time.Time {
	h := &c.hb
	if h.state.Load() == int32(Closed) {
		return time.Time{}
	}
	h.mu.Lock()
	// busy before lastSeen: the reader touches before it clears busy, so a
	// handler that just returned is never taken for a long silence.
	if h.busy.Load() {
		// Our own handler is slow, not the peer: look again later.
		interval := h.interval
		h.mu.Unlock()
		return now.Add(interval)
	}
	last := time.Duration(h.lastSeen.Load())
	silent := h.since(now) - last
	if silent >= h.timeout {
		// A peer we have been sending to since we last heard from it reads
		// our ping only after what we sent before it, which may take it a
		// while when we sent much: it has the timeout from the ping, and
		// from the last time it made room in the socket for our writes.
		// A peer we sent nothing to is judged by its silence alone.
		if wrote := time.Duration(h.lastWrite.Load()); wrote > last {
			busy := max(time.Duration(h.lastDrain.Load()), h.lastPing)
			if busy > last && h.since(now)-busy < h.timeout {
				next := h.born.Add(busy + h.timeout)
				h.mu.Unlock()
				return next
			}
			// Our writes may all fit in the socket buffers, so that none
			// waits and none tells us the peer drains them; then it reads
			// our ping only after megabytes. Its TCP reporting since we
			// last looked that it read more says it is alive: another
			// timeout. A peer that stopped reading, or whose host is
			// gone, gets none.
			if c.progressLocked() {
				next := now.Add(h.timeout)
				h.mu.Unlock()
				return next
			}
		}
		h.mu.Unlock()
		c.end(ErrHeartbeatTimeout, endForced, 0, "")
		return time.Time{}
	}
	next := h.born.Add(last + h.timeout)
	var suspect, ping bool
	switch {
	case h.pingSent != 0 && c.park != nil && h.since(now)-h.pingSent >= h.timeout:
		// A raw ping whose pong never came from a peer that still sends:
		// give up on it, as heartbeatPing's timeout does, and ping anew.
		h.pongLocked(-1, false)
		next = earliest(next, h.born.Add(last+h.pingAfter))
	case h.pingSent != 0:
		deadline := h.pingSent + h.suspectAfter()
		if h.since(now) >= deadline {
			suspect = h.state.CompareAndSwap(int32(Connected), int32(Suspect))
			if suspect {
				c.progressLocked() // where the timeout's look will start from
			}
		} else {
			next = earliest(next, h.born.Add(deadline))
		}
	case last > 0 && !h.seenLife:
		// Data arrived before any ping: the conn is busy, not in a connect
		// herd, so the regular jitter applies from now on.
		h.seenLife = true
		h.jitter()
		next = earliest(next, h.born.Add(last+h.pingAfter))
	case silent >= h.pingAfter:
		// A parking conn writes its ping frame from here, without a
		// goroutine, and the poller or the reader settles it when the pong
		// comes; any other conn pings from a goroutine, bounded in number.
		if c.park == nil && c.sched.pings.Add(1) > maxPingsInFlight {
			c.sched.pings.Add(-1)
			next = earliest(next, now.Add(c.sched.wheel.Tick()))
			break
		}
		ping = true
		if n := c.cfg.pingsSent; n != nil {
			n.Add(1)
		}
		h.pingSent = max(h.since(now), 1)
		h.lastPing = h.pingSent
		h.pingHandled = h.handled.Load()
		next = earliest(next, now.Add(h.suspectAfter()))
	default:
		next = earliest(next, h.born.Add(last+h.pingAfter))
	}
	pingTimeout, pingSent := h.timeout, h.pingSent
	h.mu.Unlock()

	if suspect && h.state.Load() == int32(Suspect) {
		c.cfg.logger.Debug("tether: peer suspect", "remote", c.remote, "silent", silent)
		if f := c.cfg.observer.Suspect; f != nil {
			f(c)
		}
	}
	if ping && c.park != nil {
		c.park.Ping(uint64(pingSent))
		return next
	}
	if ping {
		// The reader waits for c.wg once the conn has ended; Add only
		// while it has not, under the lock that end takes.
		c.mu.Lock()
		if c.err != nil {
			c.mu.Unlock()
			c.sched.pings.Add(-1)
			return time.Time{}
		}
		c.wg.Add(1)
		c.mu.Unlock()
		go c.heartbeatPing(pingTimeout)
	}
	return next
}

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// heartbeatPing sends one heartbeat ping and waits for its pong. The end of
// the conn ends the wait; so does timeout, for a peer that sends data but
// never pongs. timeout must reach beyond the death the scheduler enforces:
// coder/websocket closes the conn when a write's context expires, and a dead
// peer must be reported as ErrHeartbeatTimeout, not as a failed write.
func (c *Conn) heartbeatPing(timeout time.Duration) {
	defer c.wg.Done()
	defer c.sched.pings.Add(-1)
	// Not derived from c.ctx, which would keep a registry of children for
	// the conn's life: the reader's CloseNow ends the wait when the conn ends.
	// The deadline counts from now, not from the scheduler's tick: after a
	// stall of the process the tick is old, and a deadline already past
	// would close the socket and report a live or silent peer as lost
	// rather than let the heartbeat judge it.
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	handled := c.hb.handled.Load()
	sent := time.Now()
	err := c.ping(ctx)
	cancel()
	rtt := time.Duration(-1)
	if err == nil {
		rtt = time.Since(sent)
		c.hb.touch()
	}
	heldUp := c.hb.handled.Load() != handled || c.hb.busy.Load()
	c.hb.mu.Lock()
	c.settlePingAndUnlock(rtt, heldUp)
}

// settlePingAndUnlock is called with hb.mu held and releases it: it
// settles the ping in flight with its round trip (< 0: no pong), then,
// unlocked, re-arms the conn's timer and reports the pong.
func (c *Conn) settlePingAndUnlock(rtt time.Duration, heldUp bool) {
	h := &c.hb
	h.pongLocked(rtt, heldUp)
	// The timer waits for the suspect deadline; with the pong in, the next
	// thing due is the next ping, which may come sooner.
	next := h.born.Add(time.Duration(h.lastSeen.Load()) + h.pingAfter)
	h.mu.Unlock()
	c.sched.wheel.Reset(&h.timer, next)
	if f := c.cfg.observer.Pong; f != nil && rtt >= 0 {
		f(c, rtt)
	}
}

// rawPong settles a parking conn's raw ping if payload is its pong, and
// reports whether it was. It runs where the pong is read: on the reader, or
// on the poller. The payload is the ping's send time, so a late pong of a
// ping given up on is not taken for the pong of the next.
func (c *Conn) rawPong(payload []byte) bool {
	if len(payload) != 8 {
		return false
	}
	return c.rawPongAt(time.Duration(binary.BigEndian.Uint64(payload)), time.Now())
}

// rawPongAt is rawPong with the payload read, sent, and the time it came.
func (c *Conn) rawPongAt(sent time.Duration, now time.Time) bool {
	h := &c.hb
	h.mu.Lock()
	if h.pingSent == 0 || sent != h.pingSent {
		h.mu.Unlock()
		return false
	}
	// A message handled between ping and pong held the pong up.
	c.settlePingAndUnlock(max(h.since(now)-sent, 0), h.handled.Load() != h.pingHandled)
	return true
}

// protocolPings makes a [Client]'s conn ping with protocol ping messages
// instead of WebSocket ping frames. Their pong proves that the server
// application read and answered, end to end: a proxy that terminates
// WebSockets answers ping frames by itself, even for a dead backend.
type protocolPings struct {
	mu      sync.Mutex
	last    int64 // ts of the last ping, so that every ts is unique
	waiting map[int64]chan struct{}
}

// ping sends a ping, a protocol one on a client's conn, and waits for its
// pong.
func (c *Conn) ping(ctx context.Context) error {
	p := c.pings
	if p == nil {
		return c.ws.Ping(ctx)
	}
	ch := make(chan struct{})
	p.mu.Lock()
	// The clock in ms, as PROTOCOL.md suggests, so that server logs read
	// well; bumped when two pings share a millisecond.
	ts := max(time.Now().UnixMilli(), p.last+1)
	p.last = ts
	if p.waiting == nil {
		p.waiting = make(map[int64]chan struct{})
	}
	p.waiting[ts] = ch
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.waiting, ts)
		p.mu.Unlock()
	}()
	if err := c.enqueueControl(wire.AppendPing(nil, ts)); err != nil {
		return err
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.ctx.Done():
		return fmt.Errorf("tether: ping: %w", net.ErrClosed)
	}
}

// pong settles the ping that carried ts. A pong nobody waits for (its
// ping gave up, or the server sent it unasked) is ignored.
func (p *protocolPings) pong(ts int64) {
	p.mu.Lock()
	ch := p.waiting[ts]
	delete(p.waiting, ts)
	p.mu.Unlock()
	if ch != nil {
		close(ch)
	}
}
