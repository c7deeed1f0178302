//go:build !race

// The storm test measures how attempts spread in time, which the race
// detector's 5-10x slowdown blurs: timers that come due during a stall
// fire together. .ci/test runs it without -race, after the -race suite.

package tether_test

import (
	"context"
	"net"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// 1,000 clients dropped at once by a server restart all come back, spread
// by the backoff's jitter: no 100 ms window holds more than 4x the mean
// rate of connection attempts. (A herd that waits a fixed delay is 6x and
// more, see TestPeakAndMean; a machine whose CPUs other processes keep
// busy stalls timers and bunches the first retries up to about 3.2x.)
func TestClientReconnectStorm(t *testing.T) {
	const n = 1000
	s := newSite(t)
	// Attempts are timed where they start, in the clients' dialer: the
	// server's view is blurred by its accept backlog under load, and
	// misses the attempts that found the port closed.
	var mu sync.Mutex
	var attempts []time.Time
	var dialer net.Dialer
	httpClient := &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			mu.Lock()
			attempts = append(attempts, time.Now())
			mu.Unlock()
			return dialer.DialContext(ctx, network, addr)
		},
	}}
	clients := make([]*tether.Client, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	errs := make(chan error, n)
	for i := range clients {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cl, err := tether.Dial(ctx, s.url(), tether.WithHTTPClient(httpClient)) // the default Backoff
			if err != nil {
				errs <- err
				return
			}
			clients[i] = cl
		}()
	}
	wg.Wait()
	defer func() {
		for _, cl := range clients {
			if cl != nil {
				wg.Add(1)
				go func() { defer wg.Done(); cl.Close() }()
			}
		}
		wg.Wait()
	}()
	select {
	case err := <-errs:
		t.Fatalf("Dial: %v", err)
	default:
	}
	waitConns(t, s, n)

	restart := time.Now()
	s.restart()
	waitConns(t, s, n)
	back := time.Since(restart)

	mu.Lock()
	var at []time.Time
	for _, a := range attempts {
		if a.After(restart) {
			at = append(at, a)
		}
	}
	mu.Unlock()
	if len(at) < n {
		t.Fatalf("%d attempts for %d clients", len(at), n)
	}
	slices.SortFunc(at, time.Time.Compare)
	peak, mean, span := peakAndMean(restart, at)
	// The period ends at the 99th percentile attempt: on a loaded machine
	// the old hub takes up to a second to drop its last conns, and those
	// few stragglers would stretch the period and dilute the mean. A herd
	// that waits a fixed delay still fails it (see TestPeakAndMean).
	p99 := at[:len(at)*99/100]
	_, mean99, span99 := peakAndMean(restart, p99)
	t.Logf("%d clients back %v after the restart; %d attempts, the last %v after the drop, the 99th percentile %v; peak %d per 100 ms; mean %.1f (to the last) %.1f (to p99); peak/mean %.2f, %.2f",
		n, back.Round(time.Millisecond), len(at), span.Round(time.Millisecond), span99.Round(time.Millisecond),
		peak, mean, mean99, float64(peak)/mean, float64(peak)/mean99)
	if float64(peak) > stormFactor*mean99 {
		t.Errorf("peak of %d attempts in 100 ms is over %vx the mean %.1f: reconnects are not spread", peak, stormFactor, mean99)
	}
}

func waitConns(t *testing.T, s *site, n int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if h := s.Hub(); h != nil && h.Len() == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d conns after 60 s, want %d", s.Hub().Len(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
