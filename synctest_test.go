package tether_test

// Tests here run in a testing/synctest bubble: time is fake, so production
// heartbeat settings (seconds) run in milliseconds and timing bounds can be
// exact. The transport is net.Pipe behind a real http.Server and a real
// coder/websocket client, because real sockets are not durably blocking.

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// pipeListener is a net.Listener whose conns are in-memory pipes.
type pipeListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }

func (l *pipeListener) dial(ctx context.Context, _, _ string) (net.Conn, error) {
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.closed:
		return nil, net.ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// bubbleServer serves tether.Accept over pipes; call it inside a bubble.
type bubbleServer struct {
	ln    *pipeListener
	srv   *http.Server
	conns chan *tether.Conn
	t     *testing.T
}

func newBubbleServer(t *testing.T, opts ...tether.ServerOption) *bubbleServer {
	s := &bubbleServer{ln: newPipeListener(), conns: make(chan *tether.Conn, 100), t: t}
	s.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := tether.Accept(w, r, opts...)
		if err != nil {
			t.Errorf("accept: %v", err)
			return
		}
		s.conns <- c
	})}
	go s.srv.Serve(s.ln)
	return s
}

func (s *bubbleServer) close() { s.srv.Close() }

type bubblePeer struct {
	ws    *websocket.Conn
	pings chan time.Time
	done  chan struct{}
}

// dial connects a coder/websocket client that reads until closed. answer
// says whether it answers a ping (after sleeping for delay, in fake time).
func (s *bubbleServer) dial(answer func() (bool, time.Duration)) (*bubblePeer, *tether.Conn) {
	p := &bubblePeer{pings: make(chan time.Time, 10000), done: make(chan struct{})}
	ws, _, err := websocket.Dial(context.Background(), "ws://pipe/", &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: &http.Transport{DialContext: s.ln.dial, DisableKeepAlives: true}},
		OnPingReceived: func(context.Context, []byte) bool {
			p.pings <- time.Now()
			ok, delay := answer()
			time.Sleep(delay)
			return ok
		},
	})
	if err != nil {
		s.t.Fatalf("dial: %v", err)
	}
	p.ws = ws
	go func() {
		defer close(p.done)
		for {
			if _, _, err := ws.Read(context.Background()); err != nil {
				return
			}
		}
	}()
	return p, <-s.conns
}

func (p *bubblePeer) close() {
	p.ws.CloseNow()
	<-p.done
}

func healthy() (bool, time.Duration) { return true, 0 }
func zombie() (bool, time.Duration)  { return false, 0 }

// With the production default (15 s / 30 s), a zombie is dropped after
// exactly 30 s of silence plus at most one scheduler tick, and is Suspect
// before that.
func TestSynctestZombieDetectedWithinTimeoutPlusTick(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const timeout = 30 * time.Second
		const tick = 250 * time.Millisecond // timeout/64 capped at 250 ms
		suspected := make(chan time.Time, 1)
		srv := newBubbleServer(t, tether.WithObserver(tether.Observer{
			Suspect: func(*tether.Conn) { suspected <- time.Now() },
		}))
		defer srv.close()
		p, c := srv.dial(zombie)
		defer p.close()

		select {
		case <-c.Done():
		case <-time.After(2 * timeout):
			t.Fatal("zombie not dropped after twice the timeout")
		}
		dead := time.Now()
		if !errors.Is(c.Err(), tether.ErrHeartbeatTimeout) {
			t.Fatalf("Err = %v, want ErrHeartbeatTimeout", c.Err())
		}
		silence := dead.Sub(c.LastSeen())
		if silence < timeout || silence > timeout+tick {
			t.Fatalf("dropped after %v of silence, want within [%v, %v]", silence, timeout, timeout+tick)
		}
		select {
		case at := <-suspected:
			if !at.Before(dead) {
				t.Fatalf("suspect at %v, not before death at %v", at, dead)
			}
		default:
			t.Fatal("zombie was never reported suspect")
		}
		if len(p.pings) == 0 {
			t.Fatal("zombie was never pinged")
		}
	})
}

// A healthy idle peer survives an hour of fake time, pinged about once per
// interval; a peer that sends data every interval/2 is never pinged.
func TestSynctestPingsOnlyWhenSilent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const interval, timeout = 15 * time.Second, 30 * time.Second
		srv := newBubbleServer(t, tether.WithHeartbeat(interval, timeout))
		defer srv.close()
		idle, idleConn := srv.dial(healthy)
		defer idle.close()
		busy, busyConn := srv.dial(healthy)
		defer busy.close()

		// Cancelling a Write's ctx closes a coder/websocket conn, so the
		// writer stops on its own channel instead.
		stop := make(chan struct{})
		writerDone := make(chan struct{})
		go func() {
			defer close(writerDone)
			for {
				busy.ws.Write(context.Background(), websocket.MessageText, []byte("tick"))
				select {
				case <-stop:
					return
				case <-time.After(interval / 2):
				}
			}
		}()
		time.Sleep(time.Hour)
		close(stop)
		<-writerDone

		for _, c := range []*tether.Conn{idleConn, busyConn} {
			if err := c.Err(); err != nil {
				t.Fatalf("healthy conn dropped: %v", err)
			}
		}
		// Pings come after [0.8, 1]·interval of silence, plus up to a tick:
		// between 3600/15.25 ≥ 236 and 3600/12 = 300.
		if n := len(idle.pings); n < 230 || n > 305 {
			t.Fatalf("idle peer got %d pings in an hour at a 15 s interval", n)
		}
		if n := len(busy.pings); n != 0 {
			t.Fatalf("busy peer got %d pings, want 0", n)
		}
		idleConn.CloseNow()
		busyConn.CloseNow()
		<-idleConn.Done()
		<-busyConn.Done()
	})
}

// Conns that connect together do not ping together: first pings spread
// over [interval/2, interval].
func TestSynctestFirstPingsSpread(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const interval, timeout = 10 * time.Second, 30 * time.Second
		const n = 40
		srv := newBubbleServer(t, tether.WithHeartbeat(interval, timeout))
		defer srv.close()
		start := time.Now()
		var peers []*bubblePeer
		var conns []*tether.Conn
		for range n {
			p, c := srv.dial(healthy)
			peers = append(peers, p)
			conns = append(conns, c)
		}
		time.Sleep(interval + time.Second)
		var lo, hi time.Duration = time.Hour, 0
		for _, p := range peers {
			select {
			case at := <-p.pings:
				d := at.Sub(start)
				lo, hi = min(lo, d), max(hi, d)
			default:
				t.Fatal("a conn was not pinged within the interval")
			}
		}
		if lo < interval/2-time.Second || hi > interval+time.Second {
			t.Fatalf("first pings in [%v, %v], want within [%v, %v]", lo, hi, interval/2, interval)
		}
		if hi-lo < interval/4 {
			t.Fatalf("first pings of %d conns bunched within %v", n, hi-lo)
		}
		for i := range conns {
			conns[i].CloseNow()
			<-conns[i].Done()
			peers[i].close()
		}
	})
}

// Adaptive heartbeat: doubles after 3 on-time pongs up to max, then a late
// pong snaps it back to the base, without dropping the conn.
func TestSynctestAdaptiveStretchAndSnapBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const base, timeout, max = 5 * time.Second, 10 * time.Second, 40 * time.Second
		var mu sync.Mutex
		delay := time.Duration(0)
		answer := func() (bool, time.Duration) {
			mu.Lock()
			defer mu.Unlock()
			return true, delay
		}
		srv := newBubbleServer(t, tether.WithHeartbeat(base, timeout), tether.WithAdaptiveHeartbeat(max))
		defer srv.close()
		p, c := srv.dial(answer)
		defer p.close()

		seen := map[time.Duration]bool{}
		for range 60 {
			time.Sleep(base)
			iv, to := c.Heartbeat()
			if iv > max {
				t.Fatalf("interval stretched to %v beyond max %v", iv, max)
			}
			if to < iv {
				t.Fatalf("timeout %v below interval %v", to, iv)
			}
			seen[iv] = true
		}
		for _, want := range []time.Duration{5, 10, 20, 40} {
			if !seen[want*time.Second] {
				t.Fatalf("interval never reached %v; saw %v", want*time.Second, seen)
			}
		}

		// Pongs now come 3 s late: past the suspect threshold (200 ms floor,
		// RTT is zero in fake time) and well within the stretched timeout.
		mu.Lock()
		delay = 3 * time.Second
		mu.Unlock()
		deadline := time.Now().Add(5 * time.Minute)
		for {
			if iv, _ := c.Heartbeat(); iv == base {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("interval never snapped back after late pongs")
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err := c.Err(); err != nil {
			t.Fatalf("late-ponging peer dropped: %v", err)
		}
		c.CloseNow()
		<-c.Done()
	})
}

// With a timeout of several intervals the cadence still follows the
// interval: a quick pong must bring the next ping forward, not leave it
// waiting for the suspect deadline.
func TestSynctestPingCadenceWithLongTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// The interval is below the 200 ms suspect floor, so the suspect
		// deadline of each ping lies beyond the next ping.
		const interval, timeout = 100 * time.Millisecond, 2 * time.Second
		srv := newBubbleServer(t, tether.WithHeartbeat(interval, timeout))
		defer srv.close()
		p, c := srv.dial(healthy)
		defer p.close()
		time.Sleep(100 * time.Second)
		// [0.8, 1]·interval, plus up to one tick (2 s/64) late, over 100 s:
		// between 100/(0.1+0.03125) = 762 and 100/0.08 = 1250 pings.
		if n := len(p.pings); n < 740 || n > 1260 {
			t.Fatalf("%d pings in 100 s at a 100 ms interval", n)
		}
		c.CloseNow()
		<-c.Done()
	})
}

// A timeout just above the interval is valid, so the peer must always be
// pinged early enough to answer: an idle, healthy peer survives 12 hours.
func TestSynctestTightTimeoutKeepsHealthyPeer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := newBubbleServer(t, tether.WithHeartbeat(10*time.Second, 10500*time.Millisecond))
		defer srv.close()
		p, c := srv.dial(healthy)
		defer p.close()
		time.Sleep(12 * time.Hour)
		if err := c.Err(); err != nil {
			t.Fatalf("healthy peer dropped after %d pings: %v", len(p.pings), err)
		}
		c.CloseNow()
		<-c.Done()
	})
}

// A pong that waits behind a message our handler is slow with measures the
// handler, not the link: it must not enter the RTT estimate, nor ratchet up
// the adaptive timeout, which keeps the configured ratio to the interval.
func TestSynctestHandlerTimeIsNotRTT(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const base, timeout, max = 5 * time.Second, 10 * time.Second, 10 * time.Second
		var slowOnce sync.Once
		srv := newBubbleServer(t, tether.WithHeartbeat(base, timeout), tether.WithAdaptiveHeartbeat(max),
			tether.OnMessage(func(*tether.Conn, tether.Message) {
				// Under coder/websocket's 5 s limit on writing a pong: net.Pipe
				// has no buffer, so the peer's pong waits for our reader.
				slowOnce.Do(func() { time.Sleep(4 * time.Second) })
			}))
		defer srv.close()
		peerc := make(chan *bubblePeer, 1)
		var sendOnce sync.Once
		answer := func() (bool, time.Duration) {
			// A message right before the first pong: the pong is read only
			// after the handler has run.
			sendOnce.Do(func() { (<-peerc).ws.Write(context.Background(), websocket.MessageText, []byte("x")) })
			return true, 0
		}
		p, c := srv.dial(answer)
		peerc <- p
		defer p.close()

		time.Sleep(5 * time.Minute)
		if rtt := c.RTT(); rtt > time.Second {
			t.Fatalf("RTT %v: the handler's 4 s entered the estimate", rtt)
		}
		iv, to := c.Heartbeat()
		if iv != max || to != 2*max {
			t.Fatalf("heartbeat %v / %v after stretching, want %v / %v", iv, to, max, 2*max)
		}
		if err := c.Err(); err != nil {
			t.Fatalf("conn dropped: %v", err)
		}
		c.CloseNow()
		<-c.Done()
	})
}
