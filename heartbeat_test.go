package tether_test

// Heartbeat behaviour over real loopback sockets. Durations are tens of
// milliseconds; lower bounds are strict where the spec demands it, upper
// bounds leave room for a loaded machine.

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/internal/testpeer"
)

// A client that completes the upgrade by hand and then never reads or
// writes another byte is dropped for its silence: not before the timeout,
// and not long after it.
func TestSilentRawClientTimesOut(t *testing.T) {
	const interval, timeout = 30 * time.Millisecond, 100 * time.Millisecond
	obs, disconnects := disconnectObserver()
	srv := newServer(t, tether.WithHeartbeat(interval, timeout), tether.WithObserver(obs))
	dialRaw(t, srv.URL)
	c := srv.next(t)

	var d disconnect
	select {
	case d = <-disconnects:
	case <-time.After(timeout + 5*time.Second):
		t.Fatalf("silent client still connected after %v (state %v)", timeout+5*time.Second, c.State())
	}
	waitDone(t, c, time.Second)
	if d.c != c {
		t.Fatal("Disconnect reported another conn")
	}
	if !errors.Is(c.Err(), tether.ErrHeartbeatTimeout) {
		t.Fatalf("Err = %v, want ErrHeartbeatTimeout", c.Err())
	}
	if d.err != c.Err() {
		t.Fatalf("Disconnect reason %v, Err %v: want the same", d.err, c.Err())
	}
	silence := d.at.Sub(c.LastSeen())
	if silence < timeout {
		t.Fatalf("dropped after %v of silence, before the timeout %v", silence, timeout)
	}
	if silence > timeout+time.Second {
		t.Fatalf("dropped after %v of silence, want about the timeout %v", silence, timeout)
	}
}

// Any inbound frame is proof of life: a peer that sends data more often
// than the interval is never pinged, while an idle peer of the same server
// is pinged all along.
func TestBusyPeerIsNotPinged(t *testing.T) {
	const interval, timeout = 100 * time.Millisecond, 300 * time.Millisecond
	const period = 20 * interval
	srv := newServer(t, tether.WithHeartbeat(interval, timeout))

	busy := testpeer.New(t, srv.url(), testpeer.Options{})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the busy peer writes every interval/2, from the start
		defer wg.Done()
		tick := time.NewTicker(interval / 2)
		defer tick.Stop()
		for {
			if err := busy.Conn().Write(context.Background(), websocket.MessageText, []byte("data")); err != nil {
				return
			}
			select {
			case <-tick.C:
			case <-stop:
				return
			}
		}
	}()
	t.Cleanup(func() {
		close(stop)
		wg.Wait()
	})
	cBusy := srv.next(t)

	idle := testpeer.New(t, srv.url(), testpeer.Options{})
	cIdle := srv.next(t)

	time.Sleep(period)
	if n := busy.PingCount(); n != 0 {
		t.Errorf("busy peer got %d pings in %v, want none", n, period)
	}
	if n := idle.PingCount(); n < 5 {
		t.Errorf("idle peer got %d pings in %v, want about %d", n, period, int(period/interval))
	}
	assertOpen(t, cBusy, "busy peer")
	assertOpen(t, cIdle, "idle peer")
}

// An idle peer is pinged each time it has been silent for the interval:
// not before (the jitter's floor is 0.8 × interval) and not much later,
// even when the interval is shorter than the suspect threshold (200 ms at
// least), which bounds how long a ping may wait for its pong.
func TestIdlePeerPingedEveryInterval(t *testing.T) {
	const interval, timeout = 20 * time.Millisecond, time.Second
	srv := newServer(t, tether.WithHeartbeat(interval, timeout))
	p := testpeer.New(t, srv.url(), testpeer.Options{})
	c := srv.next(t)
	time.Sleep(50 * interval)
	assertOpen(t, c, "idle peer")

	pings := p.Pings()
	if len(pings) < 3 {
		t.Fatalf("%d pings in %v at a %v interval", len(pings), 50*interval, interval)
	}
	var gaps []time.Duration
	for i := 1; i < len(pings); i++ {
		gaps = append(gaps, pings[i].Sub(pings[i-1]))
	}
	for _, g := range gaps {
		if g < interval*4/5 {
			t.Errorf("ping %v after the previous one, want at least %v", g, interval*4/5)
		}
	}
	slices.Sort(gaps)
	if median := gaps[len(gaps)/2]; median > 3*interval {
		t.Errorf("median gap between pings %v (%d pings in %v), want about the interval %v",
			median, len(pings), 50*interval, interval)
	}
}

// On a stable link an adaptive heartbeat stretches up to its max, and the
// peer sees the pings thin out; one late pong snaps it back to the
// configured interval without dropping the conn.
func TestAdaptiveHeartbeatStretchesAndSnapsBack(t *testing.T) {
	const interval, timeout, maxInterval = 20 * time.Millisecond, 60 * time.Millisecond, 160 * time.Millisecond
	// At the max the heartbeat is 160 ms / 480 ms, so a pong is late after
	// min(max(srtt+4·rttvar, 200 ms), (480-160)/2) = 160 ms, and the peer is
	// dead 480 ms after its last frame, about 300 ms after the ping.
	const pongDelay = 190 * time.Millisecond

	type pong struct{ rtt, interval, timeout time.Duration }
	pongs := make(chan pong, 1000)
	obs := tether.Observer{Pong: func(c *tether.Conn, rtt time.Duration) {
		iv, to := c.Heartbeat()
		select {
		case pongs <- pong{rtt, iv, to}:
		default:
		}
	}}
	srv := newServer(t, tether.WithHeartbeat(interval, timeout), tether.WithAdaptiveHeartbeat(maxInterval), tether.WithObserver(obs))
	var delayNext atomic.Bool
	p := testpeer.New(t, srv.url(), testpeer.Options{PongDelay: func() time.Duration {
		if delayNext.CompareAndSwap(true, false) {
			return pongDelay
		}
		return 0
	}})
	c := srv.next(t)

	// Stretch: poll the heartbeat in force until it reaches the max.
	grown := false
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		iv, to := c.Heartbeat()
		if iv < interval || iv > maxInterval {
			t.Fatalf("Heartbeat interval %v outside [%v, %v]", iv, interval, maxInterval)
		}
		if to <= iv {
			t.Fatalf("Heartbeat timeout %v does not exceed interval %v", to, iv)
		}
		grown = grown || iv > interval
		if iv == maxInterval {
			break
		}
		if err := c.Err(); err != nil {
			t.Fatalf("conn ended while stretching: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("interval still %v after 5 s of on-time pongs, want %v", iv, maxInterval)
		}
	}
	if !grown {
		t.Fatal("interval never grew")
	}
	reached := time.Now()

	// The pings the peer sees thin out accordingly: each ping after the
	// stretch comes at least 0.8 × max (the jitter's floor) after the one
	// before, since the pong in between was the peer's last frame.
	var pings []time.Time
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		pings = p.Pings()
		i := slices.IndexFunc(pings, func(at time.Time) bool { return at.After(reached) })
		if i > 0 && len(pings)-i >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d pings in total 5 s after the stretch", len(pings))
		}
	}
	if iv, _ := c.Heartbeat(); iv != maxInterval {
		t.Fatalf("interval %v after the stretch, want %v", iv, maxInterval)
	}
	first := slices.IndexFunc(pings, func(at time.Time) bool { return at.After(reached) }) - 1
	for i := first + 1; i < len(pings); i++ {
		if gap := pings[i].Sub(pings[i-1]); gap < maxInterval*4/5 {
			t.Errorf("ping gap %v at interval %v, want at least %v", gap, maxInterval, maxInterval*4/5)
		}
	}
	if len(pings) < 4 {
		t.Fatalf("only %d pings", len(pings))
	}
	early := min(pings[1].Sub(pings[0]), pings[2].Sub(pings[1]), pings[3].Sub(pings[2]))
	if early >= maxInterval*9/20 {
		t.Errorf("shortest of the first ping gaps %v, want near the base interval %v", early, interval)
	}

	// Snap back: one pong later than the suspect threshold but well within
	// the timeout.
	for len(pongs) > 0 {
		<-pongs
	}
	delayNext.Store(true)
	var late pong
	for deadline := time.After(5 * time.Second); late.rtt < pongDelay; {
		select {
		case late = <-pongs:
		case <-deadline:
			t.Fatalf("no pong of at least %v (conn err %v)", pongDelay, c.Err())
		}
	}
	if late.interval != interval {
		t.Fatalf("interval %v after a late pong (rtt %v), want the base %v", late.interval, late.rtt, interval)
	}
	if late.timeout <= late.interval {
		t.Fatalf("timeout %v after snap back, want above the interval %v", late.timeout, late.interval)
	}
	assertOpen(t, c, "after the late pong")
	time.Sleep(10 * interval)
	assertOpen(t, c, "after the snap back")
	if iv, _ := c.Heartbeat(); iv < interval || iv > maxInterval {
		t.Fatalf("interval %v outside [%v, %v]", iv, interval, maxInterval)
	}
}

// A pong later than the RTT estimate allows makes the peer Suspect for the
// time it is late; the pong makes it Connected again and the conn lives on.
func TestLatePongMakesPeerSuspect(t *testing.T) {
	// suspect threshold: min(max(srtt+4·rttvar, 200 ms), (1000-20)/2 ms) =
	// 200 ms on loopback; death 1 s after the last frame, so a pong 350 ms
	// late is in time even for a ping sent a whole suspect threshold after
	// the last frame.
	const interval, timeout = 20 * time.Millisecond, time.Second
	const threshold, pongDelay = 200 * time.Millisecond, 350 * time.Millisecond

	type event struct {
		at    time.Time
		state tether.State
	}
	suspects := make(chan event, 100)
	pongs := make(chan time.Duration, 1000)
	obs := tether.Observer{
		Suspect: func(c *tether.Conn) { suspects <- event{time.Now(), c.State()} },
		Pong: func(_ *tether.Conn, rtt time.Duration) {
			select {
			case pongs <- rtt:
			default:
			}
		},
	}
	srv := newServer(t, tether.WithHeartbeat(interval, timeout), tether.WithObserver(obs))
	var delayNext, delayOver atomic.Bool
	var delayedPing atomic.Int64 // unix ns when the delayed ping arrived
	p := testpeer.New(t, srv.url(), testpeer.Options{PongDelay: func() time.Duration {
		if !delayNext.CompareAndSwap(true, false) {
			return 0
		}
		delayedPing.Store(time.Now().UnixNano())
		time.Sleep(pongDelay)
		delayOver.Store(true)
		return 0
	}})
	c := srv.next(t)

	// A few prompt pongs first, so the RTT estimate is settled.
	for i := range 3 {
		select {
		case <-pongs:
		case <-time.After(5 * time.Second):
			t.Fatalf("only %d pongs after 5 s", i)
		}
	}
	if len(suspects) != 0 {
		t.Fatal("prompt peer was suspect")
	}
	if s := c.State(); s != tether.Connected {
		t.Fatalf("state %v with prompt pongs, want healthy", s)
	}

	delayNext.Store(true)
	var ev event
	select {
	case ev = <-suspects:
	case <-time.After(5 * time.Second):
		t.Fatalf("no Suspect within 5 s of a pong delayed by %v (peer got %d pings, err %v)", pongDelay, p.PingCount(), c.Err())
	}
	state := c.State()
	over := delayOver.Load()
	if ev.state != tether.Suspect {
		t.Errorf("State() in the Suspect hook is %v, want suspect", ev.state)
	}
	if !over && state != tether.Suspect {
		t.Errorf("State() %v while the pong is late, want suspect", state)
	}
	pinged := time.Unix(0, delayedPing.Load())
	if after := ev.at.Sub(pinged); after < threshold*3/4 {
		t.Errorf("Suspect %v after the delayed ping arrived, want about %v", after, threshold)
	}

	for deadline := time.After(5 * time.Second); ; {
		var rtt time.Duration
		select {
		case rtt = <-pongs:
		case <-deadline:
			t.Fatalf("delayed pong not seen (err %v)", c.Err())
		}
		if rtt >= pongDelay {
			break
		}
	}
	if s := c.State(); s != tether.Connected {
		t.Fatalf("state %v after the late pong, want healthy", s)
	}
	time.Sleep(5 * interval)
	assertOpen(t, c, "after the late pong")
	if s := c.State(); s != tether.Connected {
		t.Fatalf("state %v with prompt pongs again, want healthy", s)
	}
	if n := len(suspects); n != 0 {
		t.Fatalf("%d more Suspect events after the late pong", n)
	}
}

// A conn wrapped by tether.Wrap in an HTTP handler has the same heartbeat:
// a zombie peer is dropped, a healthy one is measured.
func TestWrapHeartbeat(t *testing.T) {
	const interval, timeout = 20 * time.Millisecond, 60 * time.Millisecond

	t.Run("zombie", func(t *testing.T) {
		obs, disconnects := disconnectObserver()
		srv := newWrapServer(t, tether.WithHeartbeat(interval, timeout), tether.WithObserver(obs))
		p := testpeer.New(t, srv.url(), testpeer.Options{NoPong: true})
		c := srv.next(t)
		waitDone(t, c, timeout+5*time.Second)
		if !errors.Is(c.Err(), tether.ErrHeartbeatTimeout) {
			t.Fatalf("Err = %v, want ErrHeartbeatTimeout", c.Err())
		}
		d := <-disconnects
		if silence := d.at.Sub(c.LastSeen()); silence < timeout {
			t.Fatalf("dropped after %v of silence, before the timeout %v", silence, timeout)
		}
		if p.PingCount() == 0 {
			t.Fatal("zombie was never pinged")
		}
	})

	t.Run("healthy", func(t *testing.T) {
		const timeout = 200 * time.Millisecond // room for a loaded machine
		srv := newWrapServer(t, tether.WithHeartbeat(interval, timeout))
		p := testpeer.New(t, srv.url(), testpeer.Options{})
		c := srv.next(t)
		time.Sleep(10 * interval)
		assertOpen(t, c, "healthy wrapped peer")
		if rtt := c.RTT(); rtt <= 0 || rtt > timeout {
			t.Fatalf("RTT %v after %v, want a loopback round trip", rtt, 10*interval)
		}
		if p.PingCount() == 0 {
			t.Fatal("peer was never pinged")
		}
		if c.RemoteAddr() != "" {
			t.Fatalf("RemoteAddr %q for a wrapped conn, want empty", c.RemoteAddr())
		}
	})
}

// Conn.Ping measures a round trip, feeds the Pong hook and RTT, and gives
// up when its context ends.
func TestConnPing(t *testing.T) {
	t.Run("healthy", func(t *testing.T) {
		pongs := make(chan time.Duration, 10)
		srv := newServer(t, tether.WithObserver(tether.Observer{Pong: func(_ *tether.Conn, rtt time.Duration) { pongs <- rtt }}))
		testpeer.New(t, srv.url(), testpeer.Options{})
		c := srv.next(t)
		if c.RTT() != 0 {
			t.Fatalf("RTT %v before any pong, want 0", c.RTT())
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		rtt, err := c.Ping(ctx)
		if err != nil {
			t.Fatalf("Ping: %v", err)
		}
		if rtt <= 0 || rtt > time.Second {
			t.Fatalf("Ping RTT %v, want a loopback round trip", rtt)
		}
		select {
		case got := <-pongs:
			if got != rtt {
				t.Fatalf("Pong hook got %v, Ping returned %v", got, rtt)
			}
		default:
			t.Fatal("Pong hook not called by the time Ping returned")
		}
		if c.RTT() <= 0 {
			t.Fatalf("RTT %v after a Ping, want positive", c.RTT())
		}
	})

	t.Run("zombie", func(t *testing.T) {
		const wait = 100 * time.Millisecond
		pongs := make(chan time.Duration, 10)
		srv := newServer(t, tether.WithObserver(tether.Observer{Pong: func(_ *tether.Conn, rtt time.Duration) { pongs <- rtt }}))
		testpeer.New(t, srv.url(), testpeer.Options{NoPong: true})
		c := srv.next(t)
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		start := time.Now()
		rtt, err := c.Ping(ctx)
		elapsed := time.Since(start)
		if err == nil {
			t.Fatalf("Ping of a zombie returned %v, want an error", rtt)
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Ping error %v, want one that wraps context.DeadlineExceeded", err)
		}
		if elapsed < wait {
			t.Fatalf("Ping gave up after %v, before its context's %v", elapsed, wait)
		}
		if elapsed > wait+time.Second {
			t.Fatalf("Ping gave up after %v, long after its context's %v", elapsed, wait)
		}
		if len(pongs) != 0 {
			t.Fatal("Pong hook called for a ping without a pong")
		}
	})
}

// Conns that end while their heartbeat is due: a conn's Done must account
// for every goroutine the heartbeat starts. Under -race this catches a
// ping started concurrently with the end of the conn.
func TestCloseWhileHeartbeatDue(t *testing.T) {
	// Pings every millisecond; the timeout is long so that only the close
	// ends these healthy conns, even on a loaded machine.
	srv := newServer(t, tether.WithHeartbeat(time.Millisecond, 2*time.Second))
	for i := range 300 {
		p := testpeer.New(t, srv.url(), testpeer.Options{})
		c := srv.next(t)
		time.Sleep(time.Duration(i%7) * 300 * time.Microsecond)
		c.CloseNow()
		waitDone(t, c, 5*time.Second)
		if !errors.Is(c.Err(), net.ErrClosed) {
			t.Fatalf("conn %d: Err = %v, want net.ErrClosed", i, c.Err())
		}
		p.Conn().CloseNow()
	}
}
