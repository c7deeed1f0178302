package tether_test

import (
	"context"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// stormWindow is the window the storm criterion is measured in.
const stormWindow = 100 * time.Millisecond

// peakAndMean returns the most attempts in any window of stormWindow (a
// sliding window starting at each attempt) and the mean per window over
// the reconnect period, from the drop to the last attempt. The period
// starts at the drop, not at the first attempt, so that clients that all
// wait the same delay and then come at once show as the storm they are.
func peakAndMean(drop time.Time, at []time.Time) (peak int, mean float64, span time.Duration) {
	if len(at) == 0 {
		return 0, 0, 0
	}
	j := 0
	for i := range at {
		for j < len(at) && at[j].Sub(at[i]) < stormWindow {
			j++
		}
		peak = max(peak, j-i)
	}
	span = at[len(at)-1].Sub(drop)
	mean = float64(len(at)) * float64(stormWindow) / float64(max(span, stormWindow))
	return peak, mean, span
}

// 1,000 clients dropped at once by a server restart all come back, spread
// by the backoff's jitter: no 100 ms window holds more than 3x the mean
// rate of connection attempts.
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
	peak, mean, span := peakAndMean(restart, at)
	t.Logf("%d clients back %v after the restart; %d attempts in %v from the drop: peak %d per 100 ms, mean %.1f, ratio %.2f",
		n, back.Round(time.Millisecond), len(at), span.Round(time.Millisecond), peak, mean, float64(peak)/mean)
	if len(at) < n {
		t.Fatalf("%d handshakes for %d clients", len(at), n)
	}
	if float64(peak) > 3*mean {
		t.Errorf("peak of %d attempts in 100 ms is over 3x the mean %.1f: reconnects are not spread", peak, mean)
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

func TestPeakAndMean(t *testing.T) {
	drop := time.Now()
	// 10 attempts 10 ms apart from the drop, then one at 1.09 s: the first
	// 100 ms hold 10; the mean over 1.09 s is about 1 per window.
	var at []time.Time
	for i := range 10 {
		at = append(at, drop.Add(time.Duration(i)*10*time.Millisecond))
	}
	at = append(at, drop.Add(1090*time.Millisecond))
	peak, mean, _ := peakAndMean(drop, at)
	if peak != 10 || mean < 1.0 || mean > 1.01 {
		t.Errorf("peak %d mean %.3f, want 10 and 1.0", peak, mean)
	}
	// Everyone waits 500 ms, then comes at once: a storm, whatever the
	// span of the attempts themselves.
	var herd []time.Time
	for i := range 100 {
		herd = append(herd, drop.Add(500*time.Millisecond+time.Duration(i)*time.Microsecond))
	}
	if peak, mean, _ := peakAndMean(drop, herd); float64(peak) <= 3*mean {
		t.Errorf("a herd after a fixed delay: peak %d mean %.1f passes the 3x criterion", peak, mean)
	}
}
