package tether

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/internal/park"
)

// parkServer accepts tether conns over loopback and hands them over.
type parkServer struct {
	*httptest.Server
	conns chan *Conn
	msgs  chan Message
}

func newParkServer(t *testing.T, opts ...ServerOption) *parkServer {
	t.Helper()
	s := &parkServer{conns: make(chan *Conn, 64), msgs: make(chan Message, 1024)}
	opts = append([]ServerOption{OnMessage(func(_ *Conn, m Message) {
		m.Data = bytes.Clone(m.Data)
		s.msgs <- m
	})}, opts...)
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := Accept(w, r, opts...)
		if err != nil {
			t.Errorf("accept: %v", err)
			return
		}
		s.conns <- c
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *parkServer) dial(t *testing.T, opts *websocket.DialOptions) (*websocket.Conn, *Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(s.URL, "http"), opts)
	if err != nil {
		t.Fatal(err)
	}
	ws.SetReadLimit(-1)
	select {
	case c := <-s.conns:
		t.Cleanup(func() {
			_ = c.CloseNow()
			<-c.Done()
		})
		return ws, c
	case <-ctx.Done():
		t.Fatal("no conn accepted")
		return nil, nil
	}
}

// waitParked waits until c's reader has given its goroutine up.
func waitParked(t *testing.T, c *Conn) {
	t.Helper()
	if c.park == nil {
		t.Fatal("accepted conn over TCP cannot park")
	}
	deadline := time.Now().Add(5 * time.Second)
	for !c.park.Parked() {
		if time.Now().After(deadline) {
			t.Fatal("reader did not park within 5s")
		}
		time.Sleep(time.Millisecond)
	}
}

func (s *parkServer) recv(t *testing.T) Message {
	t.Helper()
	select {
	case m := <-s.msgs:
		return m
	case <-time.After(5 * time.Second):
		t.Fatal("no message within 5s")
		return Message{}
	}
}

// Conns that wait park their reader; what the peer then sends, in frames
// of every length encoding, fragmented or with control frames in between,
// arrives whole and in order, and the conn parks again after each burst.
func TestParkedReaderLosesNothing(t *testing.T) {
	s := newParkServer(t, WithLimits(Limits{MaxMessageSize: 1 << 20}))
	ws, c := s.dial(t, nil)
	defer ws.CloseNow()
	// The client must read for its pings to be answered; it reads nothing else.
	ws.CloseRead(t.Context())
	waitParked(t, c)

	sizes := []int{0, 1, 125, 126, 127, 4000, 65535, 65536, 300_000}
	for _, n := range sizes {
		want := bytes.Repeat([]byte{byte('a' + n%26)}, n)
		if err := ws.Write(t.Context(), websocket.MessageBinary, want); err != nil {
			t.Fatal(err)
		}
		if m := s.recv(t); !bytes.Equal(m.Data, want) || !m.Binary {
			t.Fatalf("size %d: got %d bytes (binary %v)", n, len(m.Data), m.Binary)
		}
		waitParked(t, c)
	}

	// A fragmented message with pings between its frames: the reader must
	// not park inside the message even when the socket runs dry.
	w, err := ws.Writer(t.Context(), websocket.MessageText)
	if err != nil {
		t.Fatal(err)
	}
	var want []byte
	for i := range 5 {
		// Larger than the client's write buffer, so that every fragment
		// reaches the socket at once.
		part := bytes.Repeat([]byte{byte('0' + i)}, 5000+i*100)
		want = append(want, part...)
		if _, err := w.Write(part); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond) // the socket drains between frames
		if c.park.Parked() {
			t.Fatalf("reader parked inside a fragmented message, after fragment %d", i)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if m := s.recv(t); !bytes.Equal(m.Data, want) || m.Binary {
		t.Fatalf("fragmented message: got %d bytes, want %d", len(m.Data), len(want))
	}
	waitParked(t, c)

	// A burst of small messages in one go.
	for i := range 200 {
		if err := ws.Write(t.Context(), websocket.MessageText, []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 200 {
		if m := s.recv(t); len(m.Data) != 1 || m.Data[0] != byte(i) {
			t.Fatalf("burst message %d: got %q", i, m.Data)
		}
	}
	waitParked(t, c)
	if err := c.Err(); err != nil {
		t.Fatalf("conn ended: %v", err)
	}
}

// Heartbeats run while the reader is parked: the pong wakes a reader,
// which parks again, and a peer that stops answering is still found dead.
func TestParkedReaderHeartbeat(t *testing.T) {
	var pongs atomic.Int64
	s := newParkServer(t, WithHeartbeat(30*time.Millisecond, 300*time.Millisecond),
		WithObserver(Observer{Pong: func(*Conn, time.Duration) { pongs.Add(1) }}))
	var silent atomic.Bool
	var lastAnswer atomic.Int64
	ws, c := s.dial(t, &websocket.DialOptions{OnPingReceived: func(context.Context, []byte) bool {
		if silent.Load() {
			return false
		}
		lastAnswer.Store(time.Now().UnixNano())
		return true
	}})
	defer ws.CloseNow()
	ws.CloseRead(t.Context())
	waitParked(t, c)

	deadline := time.Now().Add(5 * time.Second)
	for pongs.Load() < 5 {
		if time.Now().After(deadline) {
			t.Fatalf("%d pongs in 5s with a 30ms heartbeat", pongs.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	waitParked(t, c)
	if err := c.Err(); err != nil {
		t.Fatalf("healthy peer ended: %v", err)
	}
	// An explicit Ping's pong is coder/websocket's, not the heartbeat's:
	// it must reach the waiting Ping even while heartbeat pongs are
	// settled without a reader.
	for range 20 {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		_, err := c.Ping(ctx)
		cancel()
		if err != nil {
			t.Fatalf("Ping on a parking conn: %v", err)
		}
	}

	silent.Store(true)
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("silent peer not detected within 5s")
	}
	if !errors.Is(c.Err(), ErrHeartbeatTimeout) {
		t.Fatalf("silent peer ended with %v, want ErrHeartbeatTimeout", c.Err())
	}
	// Found dead no earlier than the timeout after the last sign of life
	// (the scheduler's tick is 5ms at this timeout).
	if silence := time.Since(time.Unix(0, lastAnswer.Load())); silence < 300*time.Millisecond-10*time.Millisecond {
		t.Errorf("declared dead %v after its last pong, before the 300ms timeout", silence)
	}
}

// Every way a parked conn can end reaches Done: the peer closes, the peer
// vanishes, the server closes gracefully, the server drops it.
func TestParkedReaderEnds(t *testing.T) {
	s := newParkServer(t)
	t.Run("peer closes", func(t *testing.T) {
		ws, c := s.dial(t, nil)
		waitParked(t, c)
		go ws.Close(websocket.StatusGoingAway, "bye")
		waitDoneIn(t, c)
		if websocket.CloseStatus(c.Err()) != websocket.StatusGoingAway {
			t.Errorf("reason %v, want the peer's 1001", c.Err())
		}
	})
	t.Run("peer vanishes", func(t *testing.T) {
		ws, c := s.dial(t, nil)
		waitParked(t, c)
		ws.CloseNow()
		waitDoneIn(t, c)
		if !errors.Is(c.Err(), ErrConnLost) {
			t.Errorf("reason %v, want ErrConnLost", c.Err())
		}
	})
	t.Run("server closes", func(t *testing.T) {
		ws, c := s.dial(t, nil)
		defer ws.CloseNow()
		got := make(chan error, 1)
		go func() {
			_, _, err := ws.Read(context.Background())
			got <- err
		}()
		waitParked(t, c)
		if err := c.Close(websocket.StatusNormalClosure, "done"); err != nil {
			t.Fatal(err)
		}
		waitDoneIn(t, c)
		if err := <-got; websocket.CloseStatus(err) != websocket.StatusNormalClosure {
			t.Errorf("client read %v, want the server's 1000", err)
		}
	})
	t.Run("server drops", func(t *testing.T) {
		ws, c := s.dial(t, nil)
		defer ws.CloseNow()
		waitParked(t, c)
		_ = c.CloseNow()
		waitDoneIn(t, c)
	})
	// Each conn's cleanup has run by now except the subtests' shared
	// server; with no conn registered the poller has stopped.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if !park.Running() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("poller still running with no conn registered")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitDoneIn(t *testing.T, c *Conn) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("conn not done within 5s (state %v, err %v)", c.State(), c.Err())
	}
}

// Parked conns hold no goroutine.
func TestParkedConnsHoldNoGoroutine(t *testing.T) {
	s := newParkServer(t, WithHeartbeat(time.Minute, 2*time.Minute))
	before := runtime.NumGoroutine()
	const n = 50
	conns := make([]*Conn, n)
	for i := range conns {
		ws, c := s.dial(t, nil)
		defer ws.CloseNow()
		conns[i] = c
	}
	for _, c := range conns {
		waitParked(t, c)
	}
	// The clients' own readers do not run (they read nothing); the
	// server side adds the poller and the heartbeat wheel at most, plus
	// net/http's goroutines for conns it has not yet let go.
	if got := runtime.NumGoroutine() - before; got > n/5 {
		t.Errorf("%d parked conns added %d goroutines", n, got)
	}
}

// What a parking conn writes through its tiny buffer arrives whole, for
// every payload length around the buffer's size and the length encodings.
func TestParkedConnWrites(t *testing.T) {
	s := newParkServer(t, WithLimits(Limits{MaxMessageSize: 1 << 20}))
	ws, c := s.dial(t, nil)
	defer ws.CloseNow()
	sizes := []int{0, 1, 12, 13, 14, 15, 16, 17, 31, 32, 33, 100, 125, 126, 127, 4095, 4096, 65535, 65536, 200_000}
	for _, n := range sizes {
		want := bytes.Repeat([]byte{byte('a' + n%26)}, n)
		if err := c.Send(t.Context(), want); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range sizes {
		_, got, err := ws.Read(t.Context())
		if err != nil {
			t.Fatalf("size %d: %v", n, err)
		}
		if want := bytes.Repeat([]byte{byte('a' + n%26)}, n); !bytes.Equal(got, want) {
			t.Fatalf("size %d: got %d bytes", n, len(got))
		}
	}
	// A close reason long enough to be written in two pieces.
	reason := strings.Repeat("r", 120)
	if err := c.Close(websocket.StatusGoingAway, reason); err != nil {
		t.Fatal(err)
	}
	_, _, err := ws.Read(t.Context())
	var ce websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.StatusGoingAway || ce.Reason != reason {
		t.Fatalf("client read %v, want 1001 with the 120-byte reason", err)
	}
	waitDoneIn(t, c)
}

// A peer busy reading what we sent it answers our ping late, behind the
// backlog: it is not dead as long as it answers within the timeout of the
// ping, however long since its last frame. One that stops reading
// altogether still is.
//
// The backlog fits in the socket buffers, so once written the server sees
// nothing of the reading: the peer lives by answering within the timeout of
// the ping. The reading is paced by the clock to end just past the timeout
// since connect, not by a sum of sleeps that a loaded machine stretches: it
// leaves the pong the time from there to ping + timeout, at least
// interval/2 - timeout/20 (175 ms), and delay can only make the silence
// longer, never shorter than the timeout.
func TestBusyReceiverNotDeclaredDead(t *testing.T) {
	const interval, timeout = 400 * time.Millisecond, 500 * time.Millisecond
	s := newParkServer(t, WithHeartbeat(interval, timeout), WithLimits(Limits{SendQueue: 8192, SendQueueBytes: 64 << 20}))
	ws, c := s.dial(t, nil)
	defer ws.CloseNow()
	msg := bytes.Repeat([]byte("x"), 5<<10)
	const n = 100
	for range n {
		if err := c.Send(t.Context(), msg); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	end := c.hb.born.Add(timeout + timeout/20)
	for i := range n {
		if _, _, err := ws.Read(t.Context()); err != nil {
			t.Fatalf("message %d after %v: %v (conn: %v)", i, time.Since(start), err, c.Err())
		}
		time.Sleep(time.Until(start.Add(end.Sub(start) * time.Duration(i+1) / n)))
	}
	// The ping went out behind the backlog; a message behind the ping makes
	// the peer read it, and answer.
	for c.hb.lastSeen.Load() == 0 {
		if err := c.Send(t.Context(), []byte("behind the ping")); err != nil {
			t.Fatalf("busy receiver ended after %v of reading: %v", time.Since(start), c.Err())
		}
		if _, _, err := ws.Read(t.Context()); err != nil {
			t.Fatalf("busy receiver ended after %v of reading: %v (conn: %v)", time.Since(start), err, c.Err())
		}
	}
	if err := c.Err(); err != nil {
		t.Fatalf("busy receiver ended after %v of reading: %v", time.Since(start), err)
	}
	if silent := time.Duration(c.hb.lastSeen.Load()); silent < timeout {
		t.Fatalf("the peer answered after %v of silence, within the timeout: the test proves nothing", silent)
	}

	// Now silent, with data still flowing to it: found dead, late by at
	// most an interval or so.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
				_ = c.Send(context.Background(), msg)
			}
		}
	}()
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("silent peer with traffic not found dead within 5s")
	}
	if !errors.Is(c.Err(), ErrHeartbeatTimeout) && !errors.Is(c.Err(), ErrWriteTimeout) && !errors.Is(c.Err(), ErrQueueFull) {
		t.Fatalf("silent peer ended with %v", c.Err())
	}
}

// A ping is not held up by megabytes draining to a slow reader: the
// writer sends long messages in 64 KiB fragments and its batches in
// chunks, and a ping goes out between two of them. Two 4 MiB messages
// to a peer that reads about 2 MB a second take seconds to drain; the
// peer sees pings all along, never more than about one interval and a
// chunk apart, not one per message.
func TestPingBetweenChunksToSlowReader(t *testing.T) {
	const interval, size = 100 * time.Millisecond, 4 << 20
	s := newParkServer(t, WithHeartbeat(interval, time.Minute), WithLimits(Limits{SendQueueBytes: 3 * size}))
	var mu sync.Mutex
	var pings []time.Time
	var read atomic.Int64
	dialer := &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) {
			// A small receive buffer, so that the server's writes wait
			// for the reader.
			_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 32<<10)
		})
	}}
	ws, c := s.dial(t, &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}},
		OnPingReceived: func(context.Context, []byte) bool {
			mu.Lock()
			pings = append(pings, time.Now())
			mu.Unlock()
			return true
		},
	})
	if tc, ok := c.nc.(*net.TCPConn); ok {
		_ = tc.SetWriteBuffer(32 << 10)
	}
	msg := bytes.Repeat([]byte("x"), size)
	for range 2 {
		if err := c.Send(t.Context(), msg); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	buf := make([]byte, 4<<10)
	for range 2 {
		_, r, err := ws.Reader(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		for {
			n, err := r.Read(buf)
			read.Add(int64(n))
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	drained := time.Since(start) // at least 4 s: 2,048 reads after a 2 ms sleep each
	if read.Load() != 2*size {
		t.Fatalf("read %d bytes, want %d", read.Load(), 2*size)
	}
	mu.Lock()
	defer mu.Unlock()
	var during []time.Time
	for _, p := range pings {
		if p.After(start) {
			during = append(during, p)
		}
	}
	var gap time.Duration
	for i := 1; i < len(during); i++ {
		gap = max(gap, during[i].Sub(during[i-1]))
	}
	t.Logf("%d pings in the %v drain, at most %v apart", len(during), drained, gap)
	if len(during) < 4 || gap > drained/4 {
		t.Fatalf("%d pings in the %v drain, at most %v apart: want them every interval or so, not once per message",
			len(during), drained, gap)
	}
}

// A peer reading a backlog larger than its receive buffer, slowly, reads
// our ping only seconds later; no write of ours waits (our send buffer
// holds the backlog), so nothing but its TCP tells us that it reads: the
// window it advertises moving on (park.Conn.Consumed). It is not declared
// dead while it reads; once it stops reading, with data still waiting for
// it, it is, within a couple of timeouts.
func TestSlowReaderBehindBuffersNotDeclaredDead(t *testing.T) {
	const interval, timeout = 200 * time.Millisecond, 400 * time.Millisecond
	const chunk, chunks = 64 << 10, 32 // 2 MiB, read over about 2.5 s
	s := newParkServer(t, WithHeartbeat(interval, timeout), WithLimits(Limits{SendQueue: 1024, SendQueueBytes: 64 << 20}))
	dialer := &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) {
			// A small receive buffer: the backlog waits in ours, and
			// leaves it only as the reader reads.
			_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 32<<10)
		})
	}}
	ws, c := s.dial(t, &websocket.DialOptions{HTTPClient: &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}}})
	defer ws.CloseNow()
	if _, ok := c.park.Consumed(); !ok {
		t.Skip("this kernel's TCP_INFO has no tcpi_snd_wnd (Linux 5.4 and later have)")
	}
	tc, ok := c.nc.(*net.TCPConn)
	if !ok {
		t.Fatalf("server conn is %T", c.nc)
	}
	if err := tc.SetWriteBuffer(16 << 20); err != nil {
		t.Fatal(err)
	}
	msg := bytes.Repeat([]byte("x"), chunk)
	send := func() {
		for range chunks {
			if err := c.Send(t.Context(), msg); err != nil {
				t.Fatal(err)
			}
		}
	}
	send()
	start := time.Now()
	for i := range chunks {
		if _, _, err := ws.Read(t.Context()); err != nil {
			t.Fatalf("chunk %d after %v: %v (conn: %v)", i, time.Since(start), err, c.Err())
		}
		time.Sleep(80 * time.Millisecond)
	}
	drained := time.Duration(c.hb.lastDrain.Load())
	// The ping went out behind the backlog; a message behind the ping
	// makes the peer read it, and answer.
	for c.hb.lastSeen.Load() == 0 {
		if err := c.Send(t.Context(), []byte("behind the ping")); err != nil {
			t.Fatalf("slow reader ended after %v of reading: %v", time.Since(start), c.Err())
		}
		if _, _, err := ws.Read(t.Context()); err != nil {
			t.Fatalf("slow reader ended after %v of reading: %v (conn: %v)", time.Since(start), err, c.Err())
		}
	}
	if err := c.Err(); err != nil {
		t.Fatalf("slow reader ended after %v of reading: %v", time.Since(start), err)
	}
	// What the test is about: silent past ping + timeout, with no write of
	// ours that waited for the socket after the ping, so that the rule of
	// TestBusyReceiverNotDeclaredDead would have ended it.
	c.hb.mu.Lock()
	lastPing := c.hb.lastPing
	c.hb.mu.Unlock()
	if answered := time.Duration(c.hb.lastSeen.Load()); answered < lastPing+timeout {
		t.Fatalf("the peer answered %v after its first ping, within the timeout: the test proves nothing", answered-lastPing)
	}
	if drained >= lastPing {
		t.Fatalf("a write waited for the socket at %v, after the ping at %v: the test proves nothing", drained, lastPing)
	}

	// Now it stops reading, with a backlog waiting: found dead.
	send()
	stopped := time.Now()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("a peer that stopped reading was not found dead within 10 s")
	}
	if !errors.Is(c.Err(), ErrHeartbeatTimeout) {
		t.Fatalf("peer that stopped reading ended with %v", c.Err())
	}
	t.Logf("read for %v; found dead %v after it stopped reading", stopped.Sub(start), time.Since(stopped))
}
