package tether

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// Observer holds the hooks tether calls on events, for the application,
// metrics and logs: it is the one place to set each. Nil fields are
// skipped. Each field says which endpoints call it; on the others it is
// never called. A hook runs on the goroutine that saw the event (the
// conn's reader, the heartbeat scheduler, a ping goroutine, the poller
// that wakes idle conns, a timer of the hub's, the client's own goroutine,
// or the caller of Send or Ping): it must return quickly and must not
// block.
type Observer struct {
	// Connect reports a new conn, before its reader starts: for a hub's
	// conn, after it is registered, on the goroutine of [Hub.Serve],
	// which makes it the place to [Hub.Subscribe] the conn to the topics
	// the server picks for it (with a broker, Subscribe may wait for it,
	// up to 5 s: the one hook that may); for [Accept] and [Wrap], before
	// they return; for a [Client], each conn it makes, once the server's
	// welcome, and the direct messages kept while the client was away,
	// have come. If Connect panics, a hub's conn runs on, and one from
	// Accept or Wrap is dropped.
	Connect func(c *Conn)
	// Disconnect reports a conn that ended, and why (see [Conn.Err]): for a
	// hub's conn, after it has left the registry, its topics and presence.
	// It runs on the conn's reader.
	Disconnect func(c *Conn, reason error)
	// Suspect reports a peer whose pong is late (see [Suspect]). It may
	// recover. It runs on the heartbeat scheduler.
	Suspect func(c *Conn)
	// Pong reports the round trip of a heartbeat or [Conn.Ping].
	Pong func(c *Conn, rtt time.Duration)
	// Drop reports messages discarded for a conn that fell behind: by the
	// overflow policy, to make room for higher-priority ones, or replaced
	// by a newer value of a latest-value topic ([TopicPolicy]). It runs
	// inside the call that queued the message, which in a hub holds the
	// locks of the topic or registry it is delivering to, and in a client
	// the client's lock: it must not call methods of the Hub, the Client
	// or the Conn.
	Drop func(c *Conn, messages int)

	// Presence reports a hub's change of presence on a topic: every user
	// who arrives or leaves, once, on a timer goroutine of the hub. For a
	// Client, it reports each presence message of the server (see
	// [PresenceEvent]), on the client's reader goroutine.
	Presence func(e PresenceEvent)
	// Broker reports a hub's broker (see [WithBroker]) linking up, with
	// nil (first soon after NewHub), losing its link, with the error, and
	// regaining it, with nil again. It runs on the broker's goroutine,
	// which Hub.Shutdown waits for: start a shutdown from it in a
	// goroutine of its own.
	Broker func(err error)
	// Overload reports a hub's breaker (see [WithBreaker]) opening, with
	// overloaded true, and closing, with false, and the scheduling
	// latency that decided it. It runs on the breaker's goroutine, which
	// Hub.Shutdown waits for: start a shutdown from it in a goroutine of
	// its own.
	Overload func(overloaded bool, latency time.Duration)

	// State reports each new state of a [Client] and the error that caused
	// it: the end of the previous conn when Reconnecting, why the client
	// closed when Closed (nil after [Client.Close]), nil otherwise. Calls
	// come one at a time, in order, from the client's own goroutine: they
	// must not block for long, nor call Client.Close.
	State func(state State, err error)
	// Resync reports that a [Client] cannot resume a topic: the server's
	// history no longer holds what was missed (PROTOCOL.md, section 10).
	// The application must reload the topic's state (over HTTP, say); the
	// handler then receives live messages. It runs on the conn's reader,
	// before the topic's next message.
	Resync func(topic string)
	// Error reports what goes wrong for a [Client] away from any call: the
	// server refused a publication, a message or a re-subscription (a
	// [*ProtocolError], with the topic in the message), or sent something
	// the client cannot read. The client goes on. Without it, these are
	// logged at warning level with the [WithLogger] logger. It runs on
	// the conn's reader, like the handlers (see [Client]): it must not
	// call [Client.Close].
	Error func(err error)
}

// add makes o call p's hooks after its own.
func (o *Observer) add(p Observer) {
	o.Connect = join1(o.Connect, p.Connect)
	o.Disconnect = join2(o.Disconnect, p.Disconnect)
	o.Suspect = join1(o.Suspect, p.Suspect)
	o.Pong = join2(o.Pong, p.Pong)
	o.Drop = join2(o.Drop, p.Drop)
	o.Presence = join1(o.Presence, p.Presence)
	o.Broker = join1(o.Broker, p.Broker)
	o.Overload = join2(o.Overload, p.Overload)
	o.State = join2(o.State, p.State)
	o.Resync = join1(o.Resync, p.Resync)
	o.Error = join1(o.Error, p.Error)
}

// join1 returns a hook that calls a then b, either of which may be nil.
func join1[T any](a, b func(T)) func(T) {
	switch {
	case a == nil:
		return b
	case b == nil:
		return a
	}
	return func(x T) { a(x); b(x) }
}

// join2 is join1 for hooks of two arguments.
func join2[T, U any](a, b func(T, U)) func(T, U) {
	switch {
	case a == nil:
		return b
	case b == nil:
		return a
	}
	return func(x T, y U) { a(x, y); b(x, y) }
}

// Stats is a snapshot of a hub's counters, from [Hub.Stats]. Counters
// count from the hub's creation.
type Stats struct {
	Conns  int // registered now
	Topics int // with a subscriber or a presence now

	// QueuedMessages and QueuedBytes wait in the conns' send queues now.
	QueuedMessages int
	QueuedBytes    int

	Connects    uint64
	Disconnects uint64
	Published   uint64 // topic publications
	Drops       uint64 // messages discarded for conns that fell behind (see Observer.Drop)
	Evictions   uint64 // conns dropped for not reading: queue full or write timeout
	DeadPeers   uint64 // conns dropped by the heartbeat
	Suspects    uint64
	Pings       uint64 // heartbeat pings sent
	RateLimited uint64 // inbound messages dropped by the rate limit
	BadRequests uint64 // inbound messages the hub could not read
	Denied      uint64 // subscriptions and publications refused by the application
	Duplicates  uint64 // pubs and sends a client sent again after a reconnect, acked and dropped
	Refused     uint64 // handshakes refused with 503: closing, full, overloaded or past WithAdmission

	// With WithBreaker: whether the hub is overloaded now, how many times
	// it was, and the deliveries of low-priority topics it shed meanwhile.
	Overloaded bool
	Overloads  uint64
	Shed       uint64

	// With a broker: times its link was lost, and publications and direct
	// messages delivered on this node only because it was.
	BrokerOutages uint64
	LocalOnly     uint64

	// RTT summarises the round trips of heartbeat pings.
	RTT RTTSummary
}

// RTTSummary summarises round-trip times. Quantiles are upper bounds of
// the power-of-two bucket (from 64 µs up) that holds them, so they are
// within a factor of two.
type RTTSummary struct {
	Samples        uint64
	Mean, P50, P99 time.Duration
	Max            time.Duration
}

// stats holds a hub's counters.
type stats struct {
	conns, topics atomic.Int64
	connects, disconnects, published, drops, evictions, deadPeers,
	suspects, pings, rateLimited, badRequests, denied,
	brokerOutages, localOnly, refused, overloads, shed, duplicates atomic.Uint64
	rtt rttHistogram
}

// rttHistogram counts round trips in power-of-two buckets: bucket i holds
// those under 64 µs · 2^i, the last one the rest.
type rttHistogram struct {
	buckets [20]atomic.Uint64
	sum     atomic.Int64 // ns
	max     atomic.Int64
}

const rttBase = 64 * time.Microsecond

func (r *rttHistogram) add(d time.Duration) {
	i := 0
	if d >= rttBase {
		i = min(bits.Len64(uint64(d/rttBase)), len(r.buckets)-1)
	}
	r.buckets[i].Add(1)
	r.sum.Add(int64(d))
	for {
		m := r.max.Load()
		if int64(d) <= m || r.max.CompareAndSwap(m, int64(d)) {
			break
		}
	}
}

func (r *rttHistogram) summary() RTTSummary {
	var counts [len(r.buckets)]uint64
	var s RTTSummary
	for i := range r.buckets {
		counts[i] = r.buckets[i].Load()
		s.Samples += counts[i]
	}
	if s.Samples == 0 {
		return s
	}
	s.Mean = time.Duration(r.sum.Load() / int64(s.Samples))
	s.Max = time.Duration(r.max.Load())
	quantile := func(q float64) time.Duration {
		rank := uint64(q*float64(s.Samples-1)) + 1
		var seen uint64
		for i, n := range counts {
			seen += n
			if seen >= rank {
				return min(rttBase<<i, s.Max)
			}
		}
		return s.Max
	}
	s.P50, s.P99 = quantile(0.5), quantile(0.99)
	return s
}

// Stats returns a snapshot of the hub's counters. It visits every conn for
// the queue figures: call it every few seconds, not per message.
func (h *Hub) Stats() Stats {
	c := &h.count
	s := Stats{
		Conns:         int(c.conns.Load()),
		Topics:        int(c.topics.Load()),
		Connects:      c.connects.Load(),
		Disconnects:   c.disconnects.Load(),
		Published:     c.published.Load(),
		Drops:         c.drops.Load(),
		Evictions:     c.evictions.Load(),
		DeadPeers:     c.deadPeers.Load(),
		Suspects:      c.suspects.Load(),
		Pings:         c.pings.Load(),
		RateLimited:   c.rateLimited.Load(),
		BadRequests:   c.badRequests.Load(),
		Denied:        c.denied.Load(),
		Refused:       c.refused.Load(),
		Duplicates:    c.duplicates.Load(),
		Overloaded:    h.overloaded.Load(),
		Overloads:     c.overloads.Load(),
		Shed:          c.shed.Load(),
		BrokerOutages: c.brokerOutages.Load(),
		LocalOnly:     c.localOnly.Load(),
		RTT:           c.rtt.summary(),
	}
	for _, conn := range h.snapshot() {
		conn.mu.Lock()
		var n, b int
		qs, nq := conn.lanesLocked()
		for _, q := range qs[:nq] {
			qn, qb := q.Len()
			n, b = n+qn, b+qb
		}
		conn.mu.Unlock()
		s.QueuedMessages += n
		s.QueuedBytes += b
	}
	return s
}
