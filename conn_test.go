package tether_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/internal/testpeer"
)

func TestHealthyPeerStaysConnected(t *testing.T) {
	// The timeout leaves room for a loaded CI machine's scheduling stalls;
	// the exact bounds are checked in fake time (synctest_test.go).
	const interval, timeout = 20 * time.Millisecond, time.Second
	const period = 45 * interval
	srv := newServer(t, tether.WithHeartbeat(interval, timeout))
	p := testpeer.New(t, srv.url(), testpeer.Options{})
	c := srv.next(t)

	time.Sleep(period) // many intervals of silence
	if err := c.Err(); err != nil {
		t.Fatalf("healthy idle peer dropped: %v", err)
	}
	if n := p.PingCount(); n < 5 {
		t.Fatalf("peer got %d pings in %v, want several", n, period)
	}
	rtt := c.RTT()
	if rtt <= 0 || rtt > timeout {
		t.Fatalf("RTT %v not plausible for loopback", rtt)
	}
	if c.State() != tether.Connected {
		t.Fatalf("state %v, want healthy", c.State())
	}
}

func TestZombieDetected(t *testing.T) {
	const interval, timeout = 20 * time.Millisecond, 60 * time.Millisecond
	srv := newServer(t, tether.WithHeartbeat(interval, timeout))
	testpeer.New(t, srv.url(), testpeer.Options{NoPong: true})
	c := srv.next(t)
	waitDone(t, c, 5*time.Second)
	if !errors.Is(c.Err(), tether.ErrHeartbeatTimeout) {
		t.Fatalf("Err = %v, want ErrHeartbeatTimeout", c.Err())
	}
	silent := time.Since(c.LastSeen())
	if silent < timeout {
		t.Fatalf("dropped after %v of silence, before the timeout %v", silent, timeout)
	}
}

func TestSendDelivers(t *testing.T) {
	srv := newServer(t)
	p := testpeer.New(t, srv.url(), testpeer.Options{})
	c := srv.next(t)
	for i := range 100 {
		if err := c.Send(context.Background(), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 100 {
		select {
		case m := <-p.Messages():
			if m[0] != byte(i) {
				t.Fatalf("message %d arrived as %d", i, m[0])
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("message %d never arrived", i)
		}
	}
}

// A peer that floods pings is closed with 1008 and ErrProtocolViolation; another
// conn of the same server is unaffected.
func TestPingFloodClosed(t *testing.T) {
	srv := newServer(t)
	good := testpeer.New(t, srv.url(), testpeer.Options{})
	cGood := srv.next(t)
	flood := testpeer.New(t, srv.url(), testpeer.Options{})
	cFlood := srv.next(t)

	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for flood.Conn().Ping(ctx) == nil {
		}
	}()
	t.Cleanup(func() {
		stop()
		wg.Wait()
	})

	waitDone(t, cFlood, 5*time.Second)
	if !errors.Is(cFlood.Err(), tether.ErrProtocolViolation) {
		t.Fatalf("flooder's Err = %v, want ErrProtocolViolation", cFlood.Err())
	}
	if err := flood.ReadErr(t, 5*time.Second); websocket.CloseStatus(err) != websocket.StatusPolicyViolation {
		t.Fatalf("flooder's read error %v, want close status 1008", err)
	}

	assertOpen(t, cGood, "well-behaved conn")
	if d := roundTrip(t, cGood, good, "still here"); d > time.Second {
		t.Fatalf("message to the well-behaved conn took %v", d)
	}
	assertOpen(t, cGood, "well-behaved conn")
}

// A message over the size limit closes the conn with 1009 and
// ErrMessageTooBig; a message at the limit passes, and another conn is
// unaffected.
func TestMessageTooBig(t *testing.T) {
	const limit = 1024
	echo := tether.OnMessage(func(c *tether.Conn, m tether.Message) { c.Send(context.Background(), m.Data) })
	srv := newServer(t, tether.WithLimits(tether.Limits{MaxMessageSize: limit}), echo)
	good := testpeer.New(t, srv.url(), testpeer.Options{})
	cGood := srv.next(t)
	big := testpeer.New(t, srv.url(), testpeer.Options{})
	cBig := srv.next(t)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := big.Conn().Write(ctx, websocket.MessageBinary, make([]byte, 2*limit)); err != nil {
		t.Logf("write of the big message: %v", err) // the server may close first
	}
	waitDone(t, cBig, 5*time.Second)
	if !errors.Is(cBig.Err(), tether.ErrMessageTooBig) {
		t.Fatalf("Err = %v, want ErrMessageTooBig", cBig.Err())
	}
	if err := big.ReadErr(t, 5*time.Second); websocket.CloseStatus(err) != websocket.StatusMessageTooBig {
		t.Fatalf("peer's read error %v, want close status 1009", err)
	}

	// Both ways on the other conn, with a message exactly at the limit.
	at := bytes.Repeat([]byte("x"), limit)
	if err := good.Conn().Write(ctx, websocket.MessageText, at); err != nil {
		t.Fatalf("write: %v", err)
	}
	if got := good.Next(t, 5*time.Second); !bytes.Equal(got, at) {
		t.Fatalf("echo of a %d-byte message came back with %d bytes", len(at), len(got))
	}
	if err := good.Conn().Write(ctx, websocket.MessageText, []byte("hello")); err != nil {
		t.Fatalf("write: %v", err)
	}
	if got := good.Next(t, 5*time.Second); string(got) != "hello" {
		t.Fatalf("echo %q, want hello", got)
	}
	assertOpen(t, cGood, "other conn")
}

// seqMsg is message i of a run, padded to size.
func seqMsg(i, size int) []byte {
	m := make([]byte, size)
	copy(m, fmt.Sprintf("m%08d", i))
	return m
}

func seqOf(t *testing.T, m []byte) int {
	t.Helper()
	var i int
	if _, err := fmt.Sscanf(string(m[:9]), "m%08d", &i); err != nil {
		t.Fatalf("unexpected message %q", m[:min(len(m), 20)])
	}
	return i
}

// drain reads messages from p until its reader ends or until stopAt
// returns true, and returns them with the reader's error.
func drain(t *testing.T, p *testpeer.Peer, stopAt func([]byte) bool) (msgs [][]byte, err error) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case m := <-p.Messages():
			msgs = append(msgs, m)
			if stopAt != nil && stopAt(m) {
				return msgs, nil
			}
		case <-p.Done():
			for len(p.Messages()) > 0 {
				msgs = append(msgs, <-p.Messages())
			}
			return msgs, p.Err()
		case <-timeout:
			t.Fatalf("peer still reading after 10 s and %d messages", len(msgs))
		}
	}
}

// Overflow policies, against a peer that does not read (yet): sends in a
// tight loop outrun the writer, and the peer's TCP buffers can only take
// so much, so the send queue overflows after a bounded number of sends.
func TestSendQueueOverflow(t *testing.T) {
	const size, queue, maxSends = 64 << 10, 8, 20000

	t.Run("Disconnect", func(t *testing.T) {
		srv := newServer(t, tether.WithLimits(tether.Limits{SendQueue: queue, SendQueueBytes: 1 << 30}), tether.WithLimits(tether.Limits{WriteTimeout: 300 * time.Millisecond}))
		testpeer.New(t, srv.url(), testpeer.Options{Gate: make(chan struct{})}) // never reads
		c := srv.next(t)
		msg := make([]byte, size)
		var err error
		for i := 0; err == nil; i++ {
			if i == maxSends {
				t.Fatalf("%d sends of %d bytes to a peer that does not read, and no overflow", i, size)
			}
			err = c.Send(context.Background(), msg)
		}
		if !errors.Is(err, tether.ErrQueueFull) {
			t.Fatalf("Send = %v, want ErrQueueFull", err)
		}
		if !errors.Is(c.Err(), tether.ErrQueueFull) {
			t.Fatalf("Err = %v right after the overflow, want ErrQueueFull", c.Err())
		}
		if err := c.Send(context.Background(), msg); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Send after the overflow = %v, want net.ErrClosed", err)
		}
		// The close handshake cannot finish with a peer that does not read;
		// the write timeout bounds it.
		waitDone(t, c, 5*time.Second)
		if !errors.Is(c.Err(), tether.ErrQueueFull) {
			t.Fatalf("Err = %v at the end, want ErrQueueFull", c.Err())
		}
	})

	t.Run("DisconnectSlowReader", func(t *testing.T) {
		gate := make(chan struct{})
		srv := newServer(t, tether.WithLimits(tether.Limits{SendQueue: queue, SendQueueBytes: 1 << 30}), tether.WithLimits(tether.Limits{WriteTimeout: 5 * time.Second}))
		p := testpeer.New(t, srv.url(), testpeer.Options{Gate: gate})
		c := srv.next(t)
		sent := 0
		for {
			if sent == maxSends {
				t.Fatalf("%d sends to a peer that does not read, and no overflow", sent)
			}
			err := c.Send(context.Background(), seqMsg(sent, size))
			if err != nil {
				if !errors.Is(err, tether.ErrQueueFull) {
					t.Fatalf("Send = %v, want ErrQueueFull", err)
				}
				break
			}
			sent++
		}
		// The peer starts reading: it gets what was already on its way (a
		// prefix, in order), then 4008 at once; the rest of the full queue
		// is dropped rather than sent to a consumer that cannot keep up.
		close(gate)
		msgs, err := drain(t, p, nil)
		if websocket.CloseStatus(err) != tether.StatusSlowConsumer {
			t.Fatalf("peer's read error %v, want close status %d", err, tether.StatusSlowConsumer)
		}
		if len(msgs) >= sent {
			t.Fatalf("peer got all %d queued messages before the close frame; the queue should be dropped", sent)
		}
		for i, m := range msgs {
			if seqOf(t, m) != i {
				t.Fatalf("message %d is %d", i, seqOf(t, m))
			}
		}
		waitDone(t, c, 5*time.Second)
		if !errors.Is(c.Err(), tether.ErrQueueFull) {
			t.Fatalf("Err = %v, want ErrQueueFull", c.Err())
		}
	})

	t.Run("DropNewest", func(t *testing.T) {
		var dropped atomic.Int64
		obs := tether.Observer{Drop: func(_ *tether.Conn, n int) { dropped.Add(int64(n)) }}
		gate := make(chan struct{})
		srv := newServer(t, tether.WithLimits(tether.Limits{SendQueue: queue, SendQueueBytes: 1 << 30}), tether.WithLimits(tether.Limits{Overflow: tether.DropNewest}), tether.WithObserver(obs))
		p := testpeer.New(t, srv.url(), testpeer.Options{Gate: gate})
		c := srv.next(t)
		refused := map[int]bool{}
		for i := 0; len(refused) < 3; i++ {
			if i == maxSends {
				t.Fatalf("%d sends to a peer that does not read, and no overflow", i)
			}
			if err := c.Send(context.Background(), seqMsg(i, size)); err != nil {
				if !errors.Is(err, tether.ErrQueueFull) {
					t.Fatalf("Send = %v, want ErrQueueFull", err)
				}
				refused[i] = true
			}
		}
		assertOpen(t, c, "after the overflow")
		if n := dropped.Load(); n != int64(len(refused)) {
			t.Fatalf("Drop hook counted %d, want %d refused messages", n, len(refused))
		}

		close(gate)
		// Once the queue has room, sends succeed again.
		last := -1
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			if err := c.Send(context.Background(), seqMsg(maxSends, size)); err == nil {
				break
			} else if !errors.Is(err, tether.ErrQueueFull) || time.Now().After(deadline) {
				t.Fatalf("Send after the peer started reading: %v", err)
			}
		}
		msgs, _ := drain(t, p, func(m []byte) bool { return seqOf(t, m) == maxSends })
		for _, m := range msgs {
			i := seqOf(t, m)
			if i <= last {
				t.Fatalf("message %d after %d", i, last)
			}
			if refused[i] {
				t.Fatalf("refused message %d was delivered", i)
			}
			last = i
		}
		if last != maxSends {
			t.Fatalf("last message %d, want %d", last, maxSends)
		}
		assertOpen(t, c, "after the peer caught up")
	})

	t.Run("DropOldest", func(t *testing.T) {
		var dropped atomic.Int64
		obs := tether.Observer{Drop: func(_ *tether.Conn, n int) { dropped.Add(int64(n)) }}
		gate := make(chan struct{})
		srv := newServer(t, tether.WithLimits(tether.Limits{SendQueue: queue, SendQueueBytes: 1 << 30}), tether.WithLimits(tether.Limits{Overflow: tether.DropOldest}), tether.WithObserver(obs))
		p := testpeer.New(t, srv.url(), testpeer.Options{Gate: gate})
		c := srv.next(t)
		sent := 0
		for dropped.Load() < 3 {
			if sent == maxSends {
				t.Fatalf("%d sends to a peer that does not read, and nothing dropped", sent)
			}
			if err := c.Send(context.Background(), seqMsg(sent, size)); err != nil {
				t.Fatalf("Send %d = %v, want nil under DropOldest", sent, err)
			}
			sent++
		}
		assertOpen(t, c, "after the overflow")
		if err := c.Send(context.Background(), seqMsg(maxSends, size)); err != nil {
			t.Fatalf("Send = %v, want nil under DropOldest", err)
		}
		sent++

		close(gate)
		msgs, _ := drain(t, p, func(m []byte) bool { return seqOf(t, m) == maxSends })
		last := -1
		for _, m := range msgs {
			i := seqOf(t, m)
			if i <= last {
				t.Fatalf("message %d after %d", i, last)
			}
			last = i
		}
		if last != maxSends {
			t.Fatalf("last message %d, want the newest, %d", last, maxSends)
		}
		if n := dropped.Load(); int(n) != sent-len(msgs) {
			t.Fatalf("Drop hook counted %d, but %d of %d messages were not delivered", n, sent-len(msgs), sent)
		}
		assertOpen(t, c, "after the peer caught up")
	})
}

// A peer that stops reading is dropped by the write timeout, and meanwhile
// another conn of the same server gets its messages at once.
func TestWriteTimeoutEvictsStalledReader(t *testing.T) {
	// Long enough that a round on the healthy conn stuck behind the stalled
	// one would stand out even on a loaded machine.
	const writeTimeout = time.Second
	obs, disconnects := disconnectObserver()
	srv := newServer(t, tether.WithLimits(tether.Limits{WriteTimeout: writeTimeout}), tether.WithLimits(tether.Limits{SendQueue: 128, SendQueueBytes: 1 << 30}), tether.WithObserver(obs))
	testpeer.New(t, srv.url(), testpeer.Options{Gate: make(chan struct{})}) // never reads
	cStalled := srv.next(t)
	healthy := testpeer.New(t, srv.url(), testpeer.Options{})
	cHealthy := srv.next(t)

	start := time.Now()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // 1 MiB every 10 ms until the kernel buffers are full and beyond
		defer wg.Done()
		big := make([]byte, 1<<20)
		for {
			if cStalled.Send(context.Background(), big) != nil {
				return
			}
			select {
			case <-cStalled.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(wg.Wait)

	type round struct {
		start time.Time
		took  time.Duration
	}
	var rounds []round
	for i := 0; ; i++ {
		select {
		case <-cStalled.Done():
		default:
			if time.Since(start) > 10*time.Second {
				t.Fatalf("stalled reader still connected after 10 s (err %v)", cStalled.Err())
			}
			s := time.Now()
			rounds = append(rounds, round{s, roundTrip(t, cHealthy, healthy, fmt.Sprint("round ", i))})
			time.Sleep(2 * time.Millisecond)
			continue
		}
		break
	}
	d := <-disconnects
	if !errors.Is(cStalled.Err(), tether.ErrWriteTimeout) {
		t.Errorf("stalled conn's Err = %v, want ErrWriteTimeout", cStalled.Err())
	}
	t.Logf("stalled reader dropped %v after the first send, %d rounds on the healthy conn", d.at.Sub(start), len(rounds))
	if d.at.Sub(start) < writeTimeout {
		t.Errorf("stalled reader dropped %v after the first send, before the write timeout %v", d.at.Sub(start), writeTimeout)
	}
	// The last write was stuck for the write timeout before the drop: the
	// rounds in that window ran while the stalled conn's writer was blocked.
	during := 0
	for _, r := range rounds {
		if r.took > writeTimeout/2 {
			t.Errorf("round at %v took %v, want well under the write timeout %v", r.start.Sub(start), r.took, writeTimeout)
		}
		if r.start.After(d.at.Add(-writeTimeout)) {
			during++
		}
	}
	if during == 0 {
		t.Fatal("no round measured while the stalled conn's write was blocked")
	}
	assertOpen(t, cHealthy, "healthy conn")
}

// Close delivers what is queued, then the close frame; later closes fail.
func TestClose(t *testing.T) {
	t.Run("QueuedThenCloseFrame", func(t *testing.T) {
		obs, disconnects := disconnectObserver()
		srv := newServer(t, tether.WithObserver(obs))
		p := testpeer.New(t, srv.url(), testpeer.Options{})
		c := srv.next(t)
		for i := range 50 {
			if err := c.Send(context.Background(), seqMsg(i, 100)); err != nil {
				t.Fatalf("send %d: %v", i, err)
			}
		}
		if err := c.Close(websocket.StatusNormalClosure, "bye"); err != nil {
			t.Fatalf("Close: %v", err)
		}
		msgs, err := drain(t, p, nil)
		if len(msgs) != 50 {
			t.Fatalf("peer got %d messages before the close frame, want 50", len(msgs))
		}
		for i, m := range msgs {
			if seqOf(t, m) != i {
				t.Fatalf("message %d is %d", i, seqOf(t, m))
			}
		}
		var ce websocket.CloseError
		if !errors.As(err, &ce) || ce != (websocket.CloseError{Code: websocket.StatusNormalClosure, Reason: "bye"}) {
			t.Fatalf("peer's read error %v, want close 1000 \"bye\"", err)
		}

		waitDone(t, c, 5*time.Second)
		if !errors.Is(c.Err(), net.ErrClosed) {
			t.Fatalf("Err = %v, want net.ErrClosed", c.Err())
		}
		ce = websocket.CloseError{}
		if !errors.As(c.Err(), &ce) || ce != (websocket.CloseError{Code: websocket.StatusNormalClosure, Reason: "bye"}) {
			t.Fatalf("Err = %v, want it to carry close 1000 \"bye\"", c.Err())
		}
		if d := <-disconnects; d.c != c || d.err != c.Err() {
			t.Fatalf("Disconnect reported %v, want %v", d.err, c.Err())
		}
		if err := c.Close(websocket.StatusNormalClosure, "again"); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("second Close = %v, want net.ErrClosed", err)
		}
		if err := c.Send(context.Background(), []byte("late")); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Send after Close = %v, want net.ErrClosed", err)
		}
	})

	t.Run("CloseNow", func(t *testing.T) {
		srv := newServer(t)
		p := testpeer.New(t, srv.url(), testpeer.Options{})
		c := srv.next(t)
		if err := c.CloseNow(); err != nil {
			t.Fatalf("CloseNow: %v", err)
		}
		waitDone(t, c, time.Second)
		if !errors.Is(c.Err(), net.ErrClosed) {
			t.Fatalf("Err = %v, want net.ErrClosed", c.Err())
		}
		if err := p.ReadErr(t, 5*time.Second); websocket.CloseStatus(err) != -1 {
			t.Fatalf("peer's read error %v, want no close frame", err)
		}
		if err := c.CloseNow(); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("second CloseNow = %v, want net.ErrClosed", err)
		}
		if err := c.Close(websocket.StatusNormalClosure, ""); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Close after CloseNow = %v, want net.ErrClosed", err)
		}
	})

	t.Run("PeerGoingAway", func(t *testing.T) {
		srv := newServer(t)
		p := testpeer.New(t, srv.url(), testpeer.Options{})
		c := srv.next(t)
		if err := p.Conn().Close(websocket.StatusGoingAway, "moving"); err != nil {
			t.Fatalf("peer's Close: %v", err)
		}
		waitDone(t, c, 5*time.Second)
		if websocket.CloseStatus(c.Err()) != websocket.StatusGoingAway {
			t.Fatalf("Err = %v, want close status 1001", c.Err())
		}
		if errors.Is(c.Err(), net.ErrClosed) {
			t.Fatalf("Err = %v wraps net.ErrClosed, but this side did not close", c.Err())
		}
	})

	t.Run("PeerVanishes", func(t *testing.T) {
		srv := newServer(t)
		p := testpeer.New(t, srv.url(), testpeer.Options{})
		c := srv.next(t)
		p.Conn().CloseNow() // TCP close, no close frame
		waitDone(t, c, 5*time.Second)
		if !errors.Is(c.Err(), tether.ErrConnLost) {
			t.Fatalf("Err = %v, want ErrConnLost", c.Err())
		}
	})

	t.Run("RawPeerVanishes", func(t *testing.T) {
		srv := newServer(t)
		conn := dialRaw(t, srv.URL)
		c := srv.next(t)
		conn.Close()
		waitDone(t, c, 5*time.Second)
		if !errors.Is(c.Err(), tether.ErrConnLost) {
			t.Fatalf("Err = %v, want ErrConnLost", c.Err())
		}
	})

	t.Run("FromOnMessage", func(t *testing.T) {
		closeErrs := make(chan error, 10)
		srv := newServer(t, tether.OnMessage(func(c *tether.Conn, m tether.Message) {
			closeErrs <- c.Close(websocket.StatusNormalClosure, "from handler")
		}))
		p := testpeer.New(t, srv.url(), testpeer.Options{})
		c := srv.next(t)
		if err := p.Conn().Write(context.Background(), websocket.MessageText, []byte("close me")); err != nil {
			t.Fatalf("write: %v", err)
		}
		waitDone(t, c, 5*time.Second)
		if err := <-closeErrs; err != nil {
			t.Fatalf("Close in OnMessage: %v", err)
		}
		var ce websocket.CloseError
		if err := p.ReadErr(t, 5*time.Second); !errors.As(err, &ce) || ce.Code != websocket.StatusNormalClosure || ce.Reason != "from handler" {
			t.Fatalf("peer's read error %v, want close 1000 \"from handler\"", err)
		}
		if !errors.Is(c.Err(), net.ErrClosed) {
			t.Fatalf("Err = %v, want net.ErrClosed", c.Err())
		}
	})
}

// Accept and Wrap refuse nonsensical options with an error that says what
// is wrong.
func TestInvalidOptions(t *testing.T) {
	cases := []struct {
		name string
		opts []tether.Option
		want []string // substrings of the error
	}{
		{"TimeoutNotAboveInterval", []tether.Option{tether.WithHeartbeat(time.Second, time.Second)}, []string{"timeout", "interval", "1s"}},
		{"ZeroInterval", []tether.Option{tether.WithHeartbeat(0, time.Second)}, []string{"interval", "positive"}},
		{"NegativeMaxMessageSize", []tether.Option{tether.WithLimits(tether.Limits{MaxMessageSize: -1})}, []string{"message size", "-1"}},
		{"NegativeQueueMessages", []tether.Option{tether.WithLimits(tether.Limits{SendQueue: -1, SendQueueBytes: 1 << 20})}, []string{"send queue", "-1"}},
		{"NegativeQueueBytes", []tether.Option{tether.WithLimits(tether.Limits{SendQueue: 16, SendQueueBytes: -5})}, []string{"send queue", "-5"}},
		{"NegativeWriteTimeout", []tether.Option{tether.WithLimits(tether.Limits{WriteTimeout: -time.Second})}, []string{"write timeout", "positive"}},
		{"AdaptiveMaxBelowInterval", []tether.Option{tether.WithHeartbeat(time.Second, 2*time.Second), tether.WithAdaptiveHeartbeat(500 * time.Millisecond)}, []string{"adaptive", "500ms", "1s"}},
		{"UnknownOverflow", []tether.Option{tether.WithLimits(tether.Limits{Overflow: tether.OverflowPolicy(7)})}, []string{"overflow"}},
	}
	check := func(t *testing.T, err error, want []string) {
		t.Helper()
		if err == nil {
			t.Fatal("no error")
		}
		msg := err.Error()
		if !strings.Contains(msg, "invalid option") {
			t.Errorf("error %q does not say it is an invalid option", msg)
		}
		for _, w := range want {
			if !strings.Contains(msg, w) {
				t.Errorf("error %q does not mention %q", msg, w)
			}
		}
	}
	for _, tc := range cases {
		t.Run(tc.name+"/Accept", func(t *testing.T) {
			srv := newServer(t, tc.opts...)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			ws, resp, err := websocket.Dial(ctx, srv.url(), nil)
			if err == nil {
				ws.CloseNow()
				t.Fatal("handshake succeeded")
			}
			if resp == nil || resp.StatusCode != http.StatusInternalServerError {
				t.Fatalf("handshake failed with %v, want HTTP 500", err)
			}
			check(t, srv.nextErr(t), tc.want)
		})
		t.Run(tc.name+"/Wrap", func(t *testing.T) {
			srv := newWrapServer(t, tc.opts...)
			p := testpeer.New(t, srv.url(), testpeer.Options{})
			check(t, srv.nextErr(t), tc.want)
			// The handler dropped the conn it could not wrap.
			if err := p.ReadErr(t, 5*time.Second); err == nil {
				t.Fatal("peer's conn still open")
			}
		})
	}

	t.Run("WrapNil", func(t *testing.T) {
		if c, err := tether.Wrap(nil); err == nil || c != nil {
			t.Fatalf("Wrap(nil) = %v, %v; want an error", c, err)
		}
	})

	t.Run("Valid", func(t *testing.T) {
		opts := []tether.Option{
			tether.WithHeartbeat(time.Second, 2*time.Second), tether.WithAdaptiveHeartbeat(time.Second),
			tether.WithLimits(tether.Limits{MaxMessageSize: 1}), tether.WithLimits(tether.Limits{SendQueue: 1, SendQueueBytes: 1}), tether.WithLimits(tether.Limits{WriteTimeout: time.Millisecond}),
			nil,
		}
		srv := newServer(t, opts...)
		testpeer.New(t, srv.url(), testpeer.Options{})
		assertOpen(t, srv.next(t), "valid options")
		wsrv := newWrapServer(t, opts...)
		testpeer.New(t, wsrv.url(), testpeer.Options{})
		assertOpen(t, wsrv.next(t), "valid options")
	})
}

// A client may send its first frame in the same packet as its handshake;
// the bytes buffered by net/http at Hijack must reach the conn.
func TestFrameRightBehindHandshake(t *testing.T) {
	got := make(chan string, 1)
	srv := newServer(t, tether.OnMessage(func(_ *tether.Conn, m tether.Message) { got <- string(m.Data) }))
	host := strings.TrimPrefix(srv.URL, "http://")
	conn, err := net.DialTimeout("tcp", host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	payload := []byte("hello in the first packet")
	mask := [4]byte{1, 2, 3, 4}
	frame := []byte{0x81, 0x80 | byte(len(payload))} // FIN, text; masked, short length
	frame = append(frame, mask[:]...)
	for i, b := range payload {
		frame = append(frame, b^mask[i%4])
	}
	req := "GET / HTTP/1.1\r\nHost: " + host + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
	if _, err := conn.Write(append([]byte(req), frame...)); err != nil {
		t.Fatal(err)
	}
	c := srv.next(t)
	select {
	case m := <-got:
		if m != string(payload) {
			t.Fatalf("got %q, want %q", m, payload)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("frame sent behind the handshake never arrived (conn err %v)", c.Err())
	}
}

// noHijack is middleware whose writer offers neither Hijack nor Unwrap.
type noHijack struct{ http.ResponseWriter }

// deferredHeader is a gin-like writer: WriteHeader only records the status,
// WriteHeaderNow sends it, and Hijack delegates.
type deferredHeader struct {
	http.ResponseWriter
	status  int
	written bool
}

func (d *deferredHeader) WriteHeader(code int) { d.status = code }
func (d *deferredHeader) WriteHeaderNow() {
	if !d.written {
		d.written = true
		d.ResponseWriter.WriteHeader(d.status)
	}
}
func (d *deferredHeader) Write(b []byte) (int, error) {
	d.WriteHeaderNow()
	return d.ResponseWriter.Write(b)
}
func (d *deferredHeader) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(d.ResponseWriter).Hijack()
}

// Accept behind middleware that cannot hijack answers 501, as
// coder/websocket does, instead of a 101 for a failed upgrade.
func TestAcceptWithoutHijacker(t *testing.T) {
	errs := make(chan error, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, err := tether.Accept(noHijack{w}, r)
		errs <- err
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusNotImplemented {
		t.Fatalf("dial through a writer without Hijack: resp %v, err %v; want 501", resp, err)
	}
	if err := <-errs; err == nil {
		t.Fatal("Accept returned no error")
	}
}

// Accept works through writers that defer the status line until
// WriteHeaderNow, such as gin's.
func TestAcceptThroughDeferredHeaderWriter(t *testing.T) {
	conns := make(chan *tether.Conn, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := tether.Accept(&deferredHeader{ResponseWriter: w, status: http.StatusOK}, r)
		if err != nil {
			t.Errorf("accept: %v", err)
			return
		}
		conns <- c
	}))
	defer srv.Close()
	p := testpeer.New(t, "ws"+strings.TrimPrefix(srv.URL, "http"), testpeer.Options{})
	c := <-conns
	defer func() { c.CloseNow(); <-c.Done() }()
	if err := c.Send(context.Background(), []byte("through gin")); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-p.Messages():
		if string(m) != "through gin" {
			t.Fatalf("got %q", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no message through the deferred-header writer")
	}
}

// smallBufListener shrinks the server's socket send buffers, so that a
// slow reader fills them within a few messages.
type smallBufListener struct{ net.Listener }

func (l smallBufListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		c.(*net.TCPConn).SetWriteBuffer(16 << 10)
	}
	return c, err
}

// A consumer that reads, but too slowly, overflows its queue and learns why:
// the 4008 close frame follows the write in flight instead of waiting
// behind a full queue it could not read within the write timeout.
func TestSlowConsumerGets4008(t *testing.T) {
	conns := make(chan *tether.Conn, 1)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := tether.Accept(w, r, tether.WithLimits(tether.Limits{SendQueue: 64, SendQueueBytes: 1 << 20}), tether.WithLimits(tether.Limits{WriteTimeout: 500 * time.Millisecond}))
		if err != nil {
			t.Error(err)
			return
		}
		conns <- c
	}))
	srv.Listener = smallBufListener{srv.Listener}
	srv.Start()
	defer srv.Close()

	ctx := context.Background()
	d := &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10) })
	}}
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: &http.Transport{DialContext: d.DialContext}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	ws.SetReadLimit(-1)
	c := <-conns
	defer func() { c.CloseNow(); <-c.Done() }()

	readErr := make(chan error, 1)
	go func() {
		for {
			if _, _, err := ws.Read(ctx); err != nil {
				readErr <- err
				return
			}
			time.Sleep(20 * time.Millisecond) // a slow consumer: 16 KiB per 20 ms
		}
	}()
	msg := make([]byte, 16<<10)
	for c.Send(ctx, msg) == nil {
	}
	waitDone(t, c, 10*time.Second)
	if !errors.Is(c.Err(), tether.ErrQueueFull) {
		t.Fatalf("server Err = %v, want ErrQueueFull", c.Err())
	}
	select {
	case err := <-readErr:
		if code := websocket.CloseStatus(err); code != tether.StatusSlowConsumer {
			t.Fatalf("slow consumer read %v (close status %d), want close 4008", err, code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("slow consumer's read never ended")
	}
}

// Close refuses codes an endpoint may not send and reasons that do not fit
// in a close frame, and leaves the conn open.
func TestCloseRejectsInvalidCodeAndReason(t *testing.T) {
	srv := newServer(t)
	testpeer.New(t, srv.url(), testpeer.Options{})
	c := srv.next(t)
	for _, tc := range []struct {
		code   websocket.StatusCode
		reason string
	}{
		{0, ""}, {1005, ""}, {1006, ""}, {999, ""}, {5000, ""},
		{websocket.StatusNormalClosure, strings.Repeat("x", 124)},
	} {
		if err := c.Close(tc.code, tc.reason); err == nil || errors.Is(err, net.ErrClosed) {
			t.Errorf("Close(%d, %d bytes) = %v, want a validation error", tc.code, len(tc.reason), err)
		}
	}
	assertOpen(t, c, "after invalid closes")
	if err := c.Close(4000, strings.Repeat("x", 123)); err != nil {
		t.Fatalf("valid Close: %v", err)
	}
	waitDone(t, c, 5*time.Second)
}

// A message larger than the whole queue is refused, under every policy,
// without closing a peer that is not slow at all.
func TestSendOversizedMessageKeepsConn(t *testing.T) {
	for _, policy := range []tether.OverflowPolicy{tether.Disconnect, tether.DropOldest, tether.DropNewest} {
		t.Run(policy.String(), func(t *testing.T) {
			srv := newServer(t, tether.WithLimits(tether.Limits{SendQueue: 8, SendQueueBytes: 1024}), tether.WithLimits(tether.Limits{Overflow: policy}))
			p := testpeer.New(t, srv.url(), testpeer.Options{})
			c := srv.next(t)
			if err := c.Send(context.Background(), make([]byte, 1025)); !errors.Is(err, tether.ErrQueueFull) {
				t.Fatalf("Send of 1025 bytes into a 1024-byte queue = %v, want ErrQueueFull", err)
			}
			roundTrip(t, c, p, "still fine")
			assertOpen(t, c, "after an oversized Send")
		})
	}
}
