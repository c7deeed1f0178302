package park

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// owner is a conn's owner for these tests: a pong settles when its
// payload is want; Resume records that a reader was asked for.
type owner struct {
	want    atomic.Uint64
	pongs   atomic.Int64
	resumed atomic.Int64
	ending  atomic.Bool
	resume  chan struct{}
}

func newOwner() *owner { return &owner{resume: make(chan struct{}, 16)} }

func (o *owner) Ending() bool { return o.ending.Load() }
func (o *owner) Resume() {
	o.resumed.Add(1)
	o.resume <- struct{}{}
}
func (o *owner) Pong(payload uint64) bool {
	if payload != o.want.Load() {
		return false
	}
	o.pongs.Add(1)
	return true
}
func (o *owner) GoWrite(write func()) { go write() }
func (o *owner) ParkFailed(error)     {}

// pair is a parking server conn and the peer's end of its socket.
type pair struct {
	pc   *Conn
	o    *owner
	peer net.Conn
}

// parkedPairs makes n server conns over loopback, bound to owners and
// parked, and closes them at the end of the test.
func parkedPairs(t *testing.T, n int) []pair {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pairs := make([]pair, n)
	for i := range pairs {
		peer, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		nc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		pc := newConn(nc, nil)
		if pc == nil {
			t.Fatal("a TCP conn cannot park")
		}
		o := newOwner()
		pc.Bind(o)
		if !pc.Park() {
			t.Fatal("an idle conn did not park")
		}
		pairs[i] = pair{pc, o, peer}
	}
	t.Cleanup(func() {
		for _, p := range pairs {
			p.o.ending.Store(true)
			_ = p.pc.Close()
			p.pc.Release()
			_ = p.peer.Close()
		}
	})
	return pairs
}

// pongFrame is what a client sends back for a raw ping carrying payload:
// a masked pong with those 8 bytes.
func pongFrame(payload uint64) []byte {
	f := []byte{0x8a, 0x80 | 8, 0x11, 0x22, 0x33, 0x44, 0, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint64(f[6:], payload)
	for i := range 8 {
		f[6+i] ^= f[2+i%4]
	}
	return f
}

// binaryFrame is a masked binary frame carrying data, as a client sends it.
func binaryFrame(data []byte) []byte {
	f := []byte{0x82}
	switch n := len(data); {
	case n < 126:
		f = append(f, 0x80|byte(n))
	case n < 1<<16:
		f = append(f, 0x80|126, byte(n>>8), byte(n))
	default:
		t := make([]byte, 8)
		binary.BigEndian.PutUint64(t, uint64(n))
		f = append(append(f, 0x80|127), t...)
	}
	key := []byte{1, 2, 3, 4}
	f = append(f, key...)
	for i, b := range data {
		f = append(f, b^key[i%4])
	}
	return f
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 10s: %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// The poller's goroutine waits in the runtime's poller, as a socket read
// does, not in a blocking epoll_wait that holds a thread.
func TestPollerWaitsInRuntimePoller(t *testing.T) {
	pairs := parkedPairs(t, 3)
	// A round trip first, so that the poller has waited and woken once.
	pairs[0].o.want.Store(7)
	if _, err := pairs[0].peer.Write(pongFrame(7)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the pong settled", func() bool { return pairs[0].o.pongs.Load() == 1 })
	// Idle, it is always found waiting there, never in a system call.
	waitFor(t, "the poller's goroutine waiting", func() bool { return strings.Contains(pollerState(), "[IO wait") })
	for range 20 {
		if state := pollerState(); !strings.Contains(state, "[IO wait") {
			t.Fatalf("idle poller goroutine: %s", state)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// pollerState is the header of the poller goroutine's stack: its state.
func pollerState() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for g := range bytes.SplitSeq(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte("park.(*poller).run")) {
			return string(g[:bytes.IndexByte(g, '\n')])
		}
	}
	return "no poller goroutine"
}

// Pongs that reach many parked conns at once are all settled by the
// poller, without a reader for any; each conn is parked again after.
func TestPollerSettlesPongsOfManyConns(t *testing.T) {
	const n = 300 // more than one epoll_wait returns
	pairs := parkedPairs(t, n)
	for round := range 3 {
		for i, p := range pairs {
			p.o.want.Store(uint64(1000*round + i + 1))
		}
		var wg sync.WaitGroup
		for i, p := range pairs {
			wg.Go(func() {
				if _, err := p.peer.Write(pongFrame(uint64(1000*round + i + 1))); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		waitFor(t, "every pong settled", func() bool {
			for _, p := range pairs {
				if p.o.pongs.Load() != int64(round+1) {
					return false
				}
			}
			return true
		})
	}
	for i, p := range pairs {
		if r := p.o.resumed.Load(); r != 0 {
			t.Fatalf("conn %d: %d readers started for pongs alone", i, r)
		}
		if !p.pc.Parked() {
			t.Fatalf("conn %d not parked after its pongs", i)
		}
	}
}

// Whatever the poller reads that is not the pong of the ping in flight
// goes to a reader whole and in order: a data frame behind a pong, more
// than the poller's buffer holds, and a pong it does not expect.
func TestPollerHandsDataToReader(t *testing.T) {
	pairs := parkedPairs(t, 1)
	p := pairs[0]
	p.o.want.Store(42)
	data := bytes.Repeat([]byte("0123456789"), 100) // 1,000 bytes: past pongBuf
	stale := pongFrame(41)                          // a late pong: coder/websocket's to judge
	frame := binaryFrame(data)
	sent := append(append(pongFrame(42), frame...), stale...)
	if _, err := p.peer.Write(sent); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.o.resume:
	case <-time.After(10 * time.Second):
		t.Fatal("no reader asked for data")
	}
	if got := p.o.pongs.Load(); got != 1 {
		t.Fatalf("%d pongs settled, want the 1 in front of the data", got)
	}
	// The reader: what the poller read first, then the socket.
	want := sent[pongFrameLen:]
	got := make([]byte, 0, len(want))
	buf := make([]byte, 100)
	for len(got) < len(want) {
		n, err := p.pc.Read(buf)
		if err != nil {
			t.Fatalf("after %d of %d bytes: %v", len(got), len(want), err)
		}
		got = append(got, buf[:n]...)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("the reader got %d bytes that differ from the %d sent after the pong", len(got), len(want))
	}
}

// Once the conn has closed its socket, the raw reads and writes of the
// poller and of the wheel's pings never touch its descriptor again,
// though the number may by then be another socket's.
func TestClosedSocketNotUsedAgain(t *testing.T) {
	pairs := parkedPairs(t, 1)
	p := pairs[0]
	old := p.pc.reg.fd
	p.o.ending.Store(true)
	if err := p.pc.Close(); err != nil {
		t.Fatal(err)
	}
	// A new socket, most likely on the freed number (the lowest free).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	other, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	acc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer acc.Close()
	reused := false
	for _, c := range []syscall.Conn{ln.(*net.TCPListener), other.(*net.TCPConn), acc.(*net.TCPConn)} {
		rc, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		_ = rc.Control(func(fd uintptr) { reused = reused || int(fd) == old })
	}
	if !reused {
		t.Logf("descriptor %d not reused by the new sockets: the test shows less", old)
	}

	p.pc.Ping(99)
	if n, err := p.pc.readNow(make([]byte, 16)); n != 0 || err == nil {
		t.Fatalf("read on a closed conn: %d bytes, %v", n, err)
	}
	if n, err := p.pc.writeNow([]byte("x")); n != 0 || err == nil {
		t.Fatalf("write on a closed conn: %d bytes, %v", n, err)
	}
	// Nothing reached the new socket's peers.
	for _, c := range []net.Conn{other, acc} {
		_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if n, err := c.Read(make([]byte, 16)); n > 0 || (err != nil && err != io.EOF && !isTimeout(err)) {
			t.Fatalf("the new socket got %d bytes (%v)", n, err)
		}
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// A heartbeat round trip through the poller allocates nothing: the ping's
// write, the wakeup, the read of the pong and its settling.
func TestRoundTripAllocatesNothing(t *testing.T) {
	const n, rounds = 20, 50
	pairs := parkedPairs(t, n)
	frames := make([][]byte, rounds)
	for r := range frames {
		frames[r] = pongFrame(uint64(r + 1))
	}
	ping := make([]byte, pingFrameLen)
	roundTrip := func(r int) {
		for _, p := range pairs {
			p.o.want.Store(uint64(r + 1))
			p.pc.Ping(uint64(r + 1))
			if _, err := io.ReadFull(p.peer, ping); err != nil {
				t.Fatal(err)
			}
			if _, err := p.peer.Write(frames[r]); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.Now().Add(10 * time.Second)
		for _, p := range pairs {
			for p.o.pongs.Load() != int64(r+1) {
				if time.Now().After(deadline) {
					t.Fatalf("round %d: pong not settled within 10s", r)
				}
				runtime.Gosched()
			}
		}
	}
	roundTrip(0) // warm up: the poller's goroutine and buffers
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for r := 1; r < rounds; r++ {
		roundTrip(r)
	}
	runtime.ReadMemStats(&after)
	trips := (rounds - 1) * n
	per := float64(after.Mallocs-before.Mallocs) / float64(trips)
	t.Logf("%d round trips: %d allocations (%.3f each)", trips, after.Mallocs-before.Mallocs, per)
	// Some slack for the runtime and the test itself; the write of the
	// ping through RawConn alone took 2 per round trip.
	if per > 0.25 {
		t.Fatalf("%.2f allocations per heartbeat round trip, want none", per)
	}
	for i, p := range pairs {
		if r := p.o.resumed.Load(); r != 0 {
			t.Fatalf("conn %d: %d readers started", i, r)
		}
	}
}
