package tether_test

// Time is the subject of these tests of the client and of presence, so
// they run in a testing/synctest bubble (see synctest_test.go): a hub
// behind a real http.Server, dialed by a real Client, over in-memory
// pipes, with fake time and exact bounds.

import (
	"context"
	"errors"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// bubbleHub is a hub served over pipes that can be stopped and started
// again; call it inside a bubble.
type bubbleHub struct {
	t    *testing.T
	opts []tether.HubOption

	mu       sync.Mutex
	ln       *pipeListener // nil while stopped: dials are refused
	srv      *http.Server
	hub      *tether.Hub
	attempts []time.Time // every dial, refused or not
}

func newBubbleHub(t *testing.T, opts ...tether.HubOption) *bubbleHub {
	b := &bubbleHub{t: t, opts: opts}
	b.start()
	return b
}

func (b *bubbleHub) start() {
	hub, err := tether.NewHub(b.opts...)
	if err != nil {
		b.t.Fatalf("NewHub: %v", err)
	}
	ln := newPipeListener()
	srv := &http.Server{Handler: hub}
	go srv.Serve(ln)
	b.mu.Lock()
	b.ln, b.srv, b.hub = ln, srv, hub
	b.mu.Unlock()
}

// stop drops every conn at once, as a crash would, and refuses dials.
func (b *bubbleHub) stop() {
	b.mu.Lock()
	srv, hub := b.srv, b.hub
	b.ln, b.srv, b.hub = nil, nil, nil
	b.mu.Unlock()
	if hub != nil {
		hub.Close()
		srv.Close()
	}
}

var errRefused = errors.New("connection refused")

func (b *bubbleHub) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	b.mu.Lock()
	ln := b.ln
	b.attempts = append(b.attempts, time.Now())
	b.mu.Unlock()
	if ln == nil {
		return nil, errRefused
	}
	return ln.dial(ctx, network, addr)
}

func (b *bubbleHub) httpClient() *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: b.dial, DisableKeepAlives: true}}
}

func (b *bubbleHub) attemptsSince(t0 time.Time) []time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	var d []time.Duration
	for _, at := range b.attempts {
		if !at.Before(t0) {
			d = append(d, at.Sub(t0))
		}
	}
	return d
}

// stateLog records a client's states with the fake time of each.
type stateLog struct {
	mu  sync.Mutex
	at  map[tether.State][]time.Time
	all []tether.State
}

func (l *stateLog) observer() tether.Observer {
	l.at = make(map[tether.State][]time.Time)
	return tether.Observer{State: func(s tether.State, _ error) {
		l.mu.Lock()
		l.at[s] = append(l.at[s], time.Now())
		l.all = append(l.all, s)
		l.mu.Unlock()
	}}
}

func (l *stateLog) last(s tether.State) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	ts := l.at[s]
	if len(ts) == 0 {
		return time.Time{}
	}
	return ts[len(ts)-1]
}

// After a conn is lost, the client's attempts come exactly when its
// Backoff says: Delay(0), Delay(1), ... after the loss, each step counted
// from the failed attempt before it.
func TestSynctestClientBackoffDelays(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newBubbleHub(t)
		defer b.stop()
		backoff := tether.Backoff{Base: time.Second, Max: 8 * time.Second, Jitter: tether.NoJitter}
		var states stateLog
		cl, err := tether.Dial(t.Context(), "ws://pipe/", tether.WithHTTPClient(b.httpClient()),
			tether.WithBackoff(backoff), tether.WithObserver(states.observer()))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()

		time.Sleep(time.Second) // the loss comes after the first dial
		b.stop()
		synctest.Wait()
		lost := states.last(tether.Reconnecting)
		if lost.IsZero() {
			t.Fatal("the client did not see its conn go")
		}
		time.Sleep(30 * time.Second)
		synctest.Wait()
		var want []time.Duration
		var at time.Duration
		for i := 0; at+backoff.Delay(i) <= 30*time.Second; i++ {
			at += backoff.Delay(i)
			want = append(want, at)
		}
		if got := b.attemptsSince(lost); !slices.Equal(got, want) {
			t.Fatalf("attempts at %v after the loss, want %v", got, want)
		}

		// Back up: the next attempt finds it, and the client is Connected.
		b.start()
		time.Sleep(backoff.Max)
		synctest.Wait()
		if s := cl.State(); s != tether.Connected {
			t.Fatalf("state %v after the hub came back, want connected", s)
		}
	})
}

// OnOffline fires once per outage, exactly its delay after the client
// left Connected, and not at all for an outage shorter than the delay.
func TestSynctestClientOnOffline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const after = 10 * time.Second
		b := newBubbleHub(t)
		defer b.stop()
		var states stateLog
		var mu sync.Mutex
		var offline []time.Time
		cl, err := tether.Dial(t.Context(), "ws://pipe/", tether.WithHTTPClient(b.httpClient()),
			tether.WithBackoff(tether.Backoff{Base: time.Second, Max: 2 * time.Second, Jitter: tether.NoJitter}),
			tether.WithObserver(states.observer()),
			tether.OnOffline(after, func() {
				mu.Lock()
				offline = append(offline, time.Now())
				mu.Unlock()
			}))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()

		// A brief outage: back within a second.
		b.stop()
		synctest.Wait()
		b.start()
		time.Sleep(3 * time.Second)
		synctest.Wait()
		if s := cl.State(); s != tether.Connected {
			t.Fatalf("state %v after a brief outage, want connected", s)
		}
		time.Sleep(2 * after)
		synctest.Wait()
		mu.Lock()
		n := len(offline)
		mu.Unlock()
		if n != 0 {
			t.Fatalf("OnOffline fired %d times for an outage shorter than its delay", n)
		}

		// A long one.
		b.stop()
		synctest.Wait()
		lost := states.last(tether.Reconnecting)
		time.Sleep(5 * after)
		synctest.Wait()
		mu.Lock()
		got := slices.Clone(offline)
		mu.Unlock()
		if len(got) != 1 {
			t.Fatalf("OnOffline fired %d times for one outage, want once", len(got))
		}
		if d := got[0].Sub(lost); d != after {
			t.Fatalf("OnOffline %v after the loss, want exactly %v", d, after)
		}
	})
}

// A user whose last conn leaves a topic is announced gone exactly the
// grace period after, and one back within the grace never leaves.
func TestSynctestPresenceLeaveAfterGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const grace = 5 * time.Second
		type event struct {
			at     time.Time
			joins  []string
			leaves []string
		}
		var mu sync.Mutex
		var events []event
		var gone []time.Time
		var hub *tether.Hub
		names := func(ms []tether.Member) []string {
			var s []string
			for _, m := range ms {
				s = append(s, m.UserID)
			}
			slices.Sort(s) // a burst's joins come in no set order
			return s
		}
		b := newBubbleHub(t,
			tether.WithAuth(func(r *http.Request) (string, error) { return r.URL.Query().Get("user"), nil }),
			tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Grace: grace} }),
			tether.WithObserver(tether.Observer{
				Connect: func(c *tether.Conn) {
					if err := hub.Subscribe(c, "room"); err != nil {
						t.Errorf("Subscribe: %v", err)
					}
				},
				Disconnect: func(*tether.Conn, error) {
					mu.Lock()
					gone = append(gone, time.Now())
					mu.Unlock()
				},
				Presence: func(e tether.PresenceEvent) {
					mu.Lock()
					events = append(events, event{time.Now(), names(e.Joins), names(e.Leaves)})
					mu.Unlock()
				},
			}))
		defer b.stop()
		hub = b.hub
		dialUser := func(user string) *websocket.Conn {
			ws, _, err := websocket.Dial(context.Background(), "ws://pipe/?user="+user, &websocket.DialOptions{HTTPClient: b.httpClient()})
			if err != nil {
				t.Fatalf("dial %s: %v", user, err)
			}
			go func() {
				for {
					if _, _, err := ws.Read(context.Background()); err != nil {
						return
					}
				}
			}()
			return ws
		}
		render := func() string {
			mu.Lock()
			defer mu.Unlock()
			var s []string
			for _, e := range events {
				s = append(s, "+"+strings.Join(e.joins, ",")+" -"+strings.Join(e.leaves, ","))
			}
			return strings.Join(s, " | ")
		}

		ann := dialUser("ann")
		defer ann.CloseNow()
		bob := dialUser("bob")
		time.Sleep(time.Second)
		synctest.Wait()
		if got := render(); got != "+ann,bob -" {
			t.Fatalf("events %q, want both joining in one", got)
		}

		// Bob drops and is back within the grace: no leave, no join.
		bob.CloseNow()
		synctest.Wait()
		time.Sleep(grace - time.Second)
		bob = dialUser("bob")
		defer bob.CloseNow()
		time.Sleep(2 * grace)
		synctest.Wait()
		if got := render(); got != "+ann,bob -" {
			t.Fatalf("events %q after a reconnect within the grace, want no change", got)
		}

		// Bob drops for good: his leave comes exactly the grace later.
		bob.CloseNow()
		time.Sleep(2 * grace)
		synctest.Wait()
		if got := render(); got != "+ann,bob - | + -bob" {
			t.Fatalf("events %q, want bob's leave", got)
		}
		mu.Lock()
		leaveAt, droppedAt := events[len(events)-1].at, gone[len(gone)-1]
		mu.Unlock()
		if d := leaveAt.Sub(droppedAt); d != grace {
			t.Fatalf("leave announced %v after the drop, want exactly the grace %v", d, grace)
		}
	})
}

// With MaxRetries and Quiet, the client tries a round of MaxRetries
// attempts, waits Quiet, and tries another round from the first delay:
// exactly, never giving up.
func TestSynctestClientQuietBetweenRounds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newBubbleHub(t)
		defer b.stop()
		backoff := tether.Backoff{Base: time.Second, Max: 8 * time.Second, Jitter: tether.NoJitter, MaxRetries: 5, Quiet: time.Minute}
		var states stateLog
		cl, err := tether.Dial(t.Context(), "ws://pipe/", tether.WithHTTPClient(b.httpClient()),
			tether.WithBackoff(backoff), tether.WithObserver(states.observer()))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()

		time.Sleep(time.Second)
		b.stop()
		synctest.Wait()
		lost := states.last(tether.Reconnecting)
		if lost.IsZero() {
			t.Fatal("the client did not see its conn go")
		}
		time.Sleep(3 * time.Minute)
		synctest.Wait()
		// The first round: Delay(0) to Delay(4) after the loss. Each next
		// round: a minute after the last failure, then Delay(0) to Delay(3).
		var want []time.Duration
		var at time.Duration
		for i := range backoff.MaxRetries {
			at += backoff.Delay(i)
			want = append(want, at)
		}
		for at+backoff.Quiet <= 3*time.Minute {
			at += backoff.Quiet
			want = append(want, at)
			for i := range backoff.MaxRetries - 1 {
				if at+backoff.Delay(i) > 3*time.Minute {
					break
				}
				at += backoff.Delay(i)
				want = append(want, at)
			}
		}
		if got := b.attemptsSince(lost); !slices.Equal(got, want) {
			t.Fatalf("attempts at %v after the loss, want %v", got, want)
		}
		if s := cl.State(); s != tether.Reconnecting {
			t.Fatalf("state %v after three rounds, want reconnecting still", s)
		}
		b.start()
		time.Sleep(2 * time.Minute)
		synctest.Wait()
		if s := cl.State(); s != tether.Connected {
			t.Fatalf("state %v after the hub came back, want connected", s)
		}
	})
}
