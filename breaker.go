package tether

import (
	"math"
	"runtime/metrics"
	"sync"
	"time"
)

// This file is the hub's breaker (WithBreaker): it watches how long
// runnable goroutines wait for a CPU, and how busy the process keeps the
// CPUs it may use, and while goroutines wait too long on saturated CPUs it
// sheds low-priority topics and refuses new conns, so that the heartbeats
// and high-priority messages of the conns already there keep their time.
//
// Latency alone is not enough: one message to 5,000 subscribers wakes
// 5,000 writers at once, and the last waits for the others, tens of
// milliseconds on one core, on a server that is otherwise idle. Such a
// burst is the work, not an overload; a server that is overloaded also
// has no CPU to spare.

// The breaker's defaults and its hysteresis.
const (
	breakerEvery  = 250 * time.Millisecond // sampling period
	breakerWindow = 4                      // samples the latency is taken over: 1 s
	breakerCalm   = 8                      // calm samples in a row that close it: 2 s
	// The CPU use, of what GOMAXPROCS allows, at which the CPUs count as
	// saturated (the breaker may open), and below which they have room
	// again (it may close).
	busyOpen  = 0.7
	busyClose = 0.45
)

// schedLatency is the runtime's histogram of how long goroutines waited,
// runnable, before they ran.
const schedLatency = "/sched/latencies:seconds"

// breaker opens when the scheduling latency's p99 over the last second is
// above trip, and closes after breakerCalm samples in a row below half of
// it.
type breaker struct {
	h        *Hub
	trip     time.Duration
	stop     chan struct{}
	once     sync.Once // closes stop
	done     chan struct{}
	ring     [][]uint64  // the histogram's counts at the last samples
	cpu      []cpuSample // the process's CPU time at the same samples
	capacity float64     // CPUs the process may use
	calm     int
	probe    []metrics.Sample
}

func newBreaker(h *Hub, trip time.Duration) *breaker {
	if trip <= 0 {
		return nil
	}
	b := &breaker{h: h, trip: trip, stop: make(chan struct{}), done: make(chan struct{}),
		probe: []metrics.Sample{{Name: schedLatency}}, capacity: cpuCapacity()}
	go b.run()
	return b
}

// close stops the breaker's goroutine and waits for it. It may be called
// more than once (Shutdown, then Close).
func (b *breaker) close() {
	if b == nil {
		return
	}
	b.once.Do(func() { close(b.stop) })
	<-b.done
}

func (b *breaker) run() {
	defer close(b.done)
	t := time.NewTicker(breakerEvery)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			return
		case <-t.C:
			b.sample()
		}
	}
}

// sample reads the histogram and opens or closes the breaker.
func (b *breaker) sample() {
	metrics.Read(b.probe)
	if b.probe[0].Value.Kind() != metrics.KindFloat64Histogram {
		return // not this runtime: the breaker never opens
	}
	hist := b.probe[0].Value.Float64Histogram()
	counts := append([]uint64(nil), hist.Counts...)
	b.ring = append(b.ring, counts)
	used, known := processCPU()
	b.cpu = append(b.cpu, cpuSample{used: used, at: time.Now(), known: known})
	if len(b.ring) <= breakerWindow {
		return // a full window first
	}
	from, cpuFrom := b.ring[0], b.cpu[0]
	b.ring, b.cpu = b.ring[1:], b.cpu[1:]
	p99 := quantile(hist.Buckets, from, counts, 0.99)
	busy := 1.0 // unknown: latency alone decides
	if now := b.cpu[len(b.cpu)-1]; now.known && cpuFrom.known {
		busy = float64(now.used-cpuFrom.used) / (float64(now.at.Sub(cpuFrom.at)) * b.capacity)
	}
	h := b.h
	switch {
	case p99 > b.trip && busy >= busyOpen:
		b.calm = 0
		if !h.overloaded.Swap(true) {
			h.count.overloads.Add(1)
			h.connCfg.logger.Warn("tether: overloaded: shedding low-priority topics and refusing new conns", "sched_latency_p99", p99, "cpu_busy", busy)
			if f := h.connCfg.observer.Overload; f != nil {
				f(true, p99)
			}
		}
	case (p99 < b.trip/2 || busy < busyClose) && h.overloaded.Load():
		if b.calm++; b.calm >= breakerCalm {
			b.calm = 0
			h.overloaded.Store(false)
			h.connCfg.logger.Info("tether: no longer overloaded", "sched_latency_p99", p99, "cpu_busy", busy)
			if f := h.connCfg.observer.Overload; f != nil {
				f(false, p99)
			}
		}
	default:
		b.calm = 0
	}
}

// cpuSample is the process's CPU time, read at a time.
type cpuSample struct {
	used  time.Duration
	at    time.Time
	known bool
}

// quantile returns the q-quantile of what the histogram counted between
// two readings of its counts, from and to: the upper bound of the bucket
// that holds it (so within a bucket's width, which the runtime keeps
// under about 20 %). 0 when nothing was counted.
func quantile(bounds []float64, from, to []uint64, q float64) time.Duration {
	var total uint64
	for i := range to {
		total += to[i] - from[i]
	}
	if total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(total)))
	var seen uint64
	for i := range to {
		if seen += to[i] - from[i]; seen >= rank {
			upper := bounds[i+1]
			if math.IsInf(upper, 1) {
				upper = bounds[i]
			}
			return time.Duration(upper * float64(time.Second))
		}
	}
	return 0
}
