package tether

import (
	"testing"
	"time"
)

// BenchmarkHeartbeatCheck is the scheduler's work for one tick in which
// 10,000 idle conns are due but none needs a ping yet (the common case: a
// check finds recent traffic and re-arms). It must not allocate.
// Together with internal/wheel's BenchmarkTick it is the CPU cost of one
// heartbeat tick with 10,000 conns due.
func BenchmarkHeartbeatCheck(b *testing.B) {
	const n = 10_000
	cfg, err := newConfig(nil)
	if err != nil {
		b.Fatal(err)
	}
	conns := make([]*Conn, n)
	for i := range conns {
		conns[i] = newConn(cfg, "")
		conns[i].hb.seenLife = true
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		now := time.Now()
		for _, c := range conns {
			c.hb.touch() // traffic since the last check
			c.check(now)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/conn")
	for _, c := range conns {
		c.cancel()
	}
}
