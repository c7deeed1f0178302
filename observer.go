package tether

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// Observer holds optional hooks for connection events, for metrics and
// logs. Nil fields are skipped. A hook runs on the goroutine that saw the
// event (the conn's reader, the heartbeat scheduler, a ping goroutine, the
// poller that wakes idle conns, or the caller of Send or Ping): it must return quickly and must not block.
type Observer struct {
	// Disconnect reports a connection that ended, and why (see [Conn.Err]).
	Disconnect func(c *Conn, reason error)
	// Suspect reports a peer whose pong is late. It may recover.
	Suspect func(c *Conn)
	// Pong reports the round trip of a heartbeat or [Conn.Ping].
	Pong func(c *Conn, rtt time.Duration)
	// Drop reports messages discarded by the overflow policy. It runs
	// inside the call that queued the message, which in a hub holds the
	// locks of the topic or registry it is delivering to: it must not call
	// methods of the Hub or the Conn.
	Drop func(c *Conn, messages int)
	// Broker reports a hub's broker (see [WithBroker]) linking up, with
	// nil (first soon after NewHub), losing its link, with the error, and
	// regaining it, with nil again. It runs on the broker's
	// goroutine, which Hub.Shutdown waits for: start a shutdown from it
	// in a goroutine of its own.
	Broker func(err error)
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
	Drops       uint64 // messages discarded by the overflow policy
	Evictions   uint64 // conns dropped for not reading: queue full or write timeout
	DeadPeers   uint64 // conns dropped by the heartbeat
	Suspects    uint64
	Pings       uint64 // heartbeat pings sent
	RateLimited uint64 // inbound messages dropped by the rate limit
	BadRequests uint64 // inbound messages the hub could not read
	Denied      uint64 // subscriptions and publications refused by the application

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
	brokerOutages, localOnly atomic.Uint64
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
		BrokerOutages: c.brokerOutages.Load(),
		LocalOnly:     c.localOnly.Load(),
		RTT:           c.rtt.summary(),
	}
	for _, conn := range h.snapshot() {
		conn.mu.Lock()
		n, b := conn.queue.Len()
		conn.mu.Unlock()
		s.QueuedMessages += n
		s.QueuedBytes += b
	}
	return s
}
