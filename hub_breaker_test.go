package tether_test

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// burn keeps n goroutines busy on the CPU until stop is called: what an
// overloaded server looks like to its scheduler.
func burn(n int) (stop func()) {
	var quit atomic.Bool
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x := 0
			for !quit.Load() {
				for i := range 10000 {
					x += i
				}
			}
			_ = x
		}()
	}
	return func() {
		quit.Store(true)
		wg.Wait()
	}
}

// The breaker opens when goroutines wait too long for a CPU: low-priority
// topics are shed (high-priority ones still go out), new conns get 503,
// Ready answers 503, and the conns already there stay. Once the load is
// gone it closes, and everything flows again.
func TestHubBreaker(t *testing.T) {
	// One CPU: the breaker measures busy CPUs against what the process may
	// use, and on a machine shared with other processes this one may not
	// get 70 % of two, but gets one.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	var hub *tether.Hub
	var mu sync.Mutex
	var changes []bool
	s := newHubServer(t,
		tether.WithBreaker(20*time.Millisecond),
		tether.WithTopicPolicy(func(topic string) tether.TopicPolicy {
			if topic == "lo" {
				return tether.TopicPolicy{Priority: tether.PriorityLow}
			}
			return tether.TopicPolicy{Priority: tether.PriorityHigh}
		}),
		tether.WithObserver(tether.Observer{
			Connect: func(c *tether.Conn) {
				if c.Subprotocol() == "" {
					hub.Subscribe(c, "lo")
					hub.Subscribe(c, "hi")
				}
			},
			Overload: func(overloaded bool, latency time.Duration) {
				mu.Lock()
				changes = append(changes, overloaded)
				mu.Unlock()
				t.Logf("overloaded %v at a scheduling latency of %v", overloaded, latency)
			},
		}))
	hub = s.hub
	ready := httptest.NewServer(hub.Ready())
	defer ready.Close()
	status := func() int {
		resp, err := http.Get(ready.URL)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	peer := dialClient(t, s.url(), clientOpts{raw: true})
	waitFor(t, 5*time.Second, "the peer subscribed", func() bool { return hub.Stats().Topics == 2 })
	hub.Publish("lo", []byte(`"before"`))
	if got := peer.next(5 * time.Second).line; got != `"before"` {
		t.Fatalf("got %q, want the low-priority message while not overloaded", got)
	}
	if st := hub.Stats(); st.Overloaded {
		t.Fatal("overloaded at rest")
	}

	stop := burn(32)
	stopped := false
	defer func() {
		if !stopped {
			stop()
		}
	}()
	waitFor(t, 15*time.Second, "the breaker open", func() bool { return hub.Stats().Overloaded })
	hub.Publish("lo", []byte(`"shed"`))
	hub.Publish("hi", []byte(`"kept"`))
	if got := peer.next(10 * time.Second).line; got != `"kept"` {
		t.Fatalf("got %q while overloaded, want the high-priority message alone", got)
	}
	if st := hub.Stats(); st.Shed != 1 || st.Overloads != 1 {
		t.Errorf("stats %+v: want 1 delivery shed, 1 overload", st)
	}
	_, resp, err := tryDial(t, s.url(), clientOpts{})
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Errorf("dial while overloaded: %v, want 503 with Retry-After", err)
	}
	if code := status(); code != http.StatusServiceUnavailable {
		t.Errorf("Ready answered %d while overloaded", code)
	}
	stop()
	stopped = true

	waitFor(t, 20*time.Second, "the breaker closed", func() bool { return !hub.Stats().Overloaded })
	hub.Publish("lo", []byte(`"after"`))
	if got := peer.next(5 * time.Second).line; got != `"after"` {
		t.Fatalf("got %q after the overload, want the low-priority message", got)
	}
	c := dialClient(t, s.url(), clientOpts{})
	c.welcome()
	if code := status(); code != http.StatusOK {
		t.Errorf("Ready answered %d after the overload", code)
	}
	if st := hub.Stats(); st.Conns != 2 || st.DeadPeers != 0 {
		t.Errorf("stats %+v: the conn that was there must have stayed", st)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(changes) != 2 || !changes[0] || changes[1] {
		t.Errorf("Observer.Overload reported %v, want [true false]", changes)
	}
}

// Without load the breaker stays closed, and NewHub's goroutine for it
// ends with the hub (goleak checks it).
func TestHubBreakerAtRest(t *testing.T) {
	hub, err := tether.NewHub(tether.WithBreaker(20 * time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	if hub.Stats().Overloaded {
		t.Error("overloaded at rest")
	}
	if err := hub.Close(); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(hub.Publish("t", []byte("1")), tether.ErrHubClosed) {
		t.Error("Publish after Close")
	}
}

// Shutdown then Close: the breaker stops once, and neither panics.
func TestHubBreakerClosedTwice(t *testing.T) {
	hub, err := tether.NewHub(tether.WithBreaker(20 * time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if err := hub.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := hub.Close(); err != nil {
		t.Fatal(err)
	}
}
