package tether_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// This file checks how the hub frames what it writes to its own sockets
// (write.go, frameBatch): everything queued goes out in vectored writes
// of frames encoded once per write, long messages in fragments, and
// peers of every kind read the same messages that were published.

// burstSizes returns n message sizes from 1 byte to 70 KB, with the sizes
// at which a frame header changes (125/126, 65,535/65,536) and those
// around the fragment size among them, shuffled by a fixed seed.
func burstSizes(n int) []int {
	sizes := []int{1, 2, 125, 126, 127, 65535, 65536, 65537, 64 << 10, 64<<10 - 1, 64<<10 + 1, 32 << 10, 32<<10 + 1, 70000}
	r := rand.New(rand.NewPCG(1, 2))
	for len(sizes) < n {
		sizes = append(sizes, 1+r.IntN(70000))
	}
	r.Shuffle(len(sizes), func(i, j int) { sizes[i], sizes[j] = sizes[j], sizes[i] })
	return sizes
}

// burstMessage is message i of size n: a JSON string, which a hub
// publishes as it is, so that a raw peer gets these very bytes.
func burstMessage(i, n int) []byte {
	if n < 2 {
		return []byte{byte('0' + i%10)} // a JSON number
	}
	b := bytes.Repeat([]byte{byte('a' + i%26)}, n)
	b[0], b[n-1] = '"', '"'
	copy(b[1:n-1], fmt.Sprintf("%d:", i))
	return b
}

// 1,000 messages of random sizes up to 70 KB, published in bursts, reach
// a raw peer as the same 1,000 text messages, byte for byte and in order,
// and a v1 peer as the same 1,000 msgs, though joined into frames.
func TestHubFramesRandomSizesInBursts(t *testing.T) {
	const n, burst = 1000, 100
	var hub *tether.Hub
	s := newHubServer(t,
		tether.WithLimits(tether.Limits{SendQueue: 2 * n, SendQueueBytes: 128 << 20}),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			if c.Subprotocol() == "" {
				if err := hub.Subscribe(c, "t"); err != nil {
					t.Errorf("Subscribe: %v", err)
				}
			}
		}}))
	hub = s.hub
	raw := dialClient(t, s.url(), clientOpts{raw: true})
	v1 := dialClient(t, s.url(), clientOpts{})
	v1.welcome()
	v1.subscribe("t")
	v1.next(5 * time.Second) // the presence snapshot
	waitFor(t, 5*time.Second, "the raw peer subscribed", func() bool { return s.hub.Stats().Conns == 2 })

	sizes := burstSizes(n)
	for i := 0; i < n; i += burst {
		for j := i; j < i+burst; j++ {
			if err := s.hub.Publish("t", burstMessage(j, sizes[j])); err != nil {
				t.Fatalf("Publish %d: %v", j, err)
			}
		}
	}
	for i := range n {
		want := burstMessage(i, sizes[i])
		if got := raw.next(10 * time.Second); got.line != string(want) {
			t.Fatalf("raw message %d: got %d bytes %.40q, want %d bytes %.40q", i, len(got.line), got.line, len(want), want)
		}
		m := v1.next(10 * time.Second)
		if m.Op != "msg" || m.Seq != uint64(i+1) || !bytes.Equal(m.Data, want) {
			t.Fatalf("v1 message %d: got %.80s, want msg seq %d with %d bytes", i, m.line, i+1, len(want))
		}
	}
	raw.quiet(100 * time.Millisecond)
	v1.quiet(0)
	if st := s.hub.Stats(); st.Evictions != 0 || st.Drops != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// A raw peer gets each message in one frame when it fits in 64 KiB and in
// fragments beyond: coder/websocket reads either as one message. This
// checks the frames themselves, read off the socket.
func TestHubFramesOnTheWire(t *testing.T) {
	var hub *tether.Hub
	s := newHubServer(t, tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
		if err := hub.Subscribe(c, "t"); err != nil {
			t.Errorf("Subscribe: %v", err)
		}
	}}))
	hub = s.hub
	nc := rawHandshake(t, s.URL)
	waitFor(t, 5*time.Second, "the peer subscribed", func() bool { return s.hub.Stats().Conns == 1 })
	small, big := burstMessage(1, 125), burstMessage(2, 64<<10+10)
	if err := s.hub.Publish("t", small); err != nil {
		t.Fatal(err)
	}
	if err := s.hub.Publish("t", big); err != nil {
		t.Fatal(err)
	}
	type frame struct {
		fin     bool
		op      byte
		payload []byte
	}
	read := func() frame {
		h := make([]byte, 2)
		readFull(t, nc, h)
		if h[1]&0x80 != 0 {
			t.Fatalf("a masked frame from the server: % x", h)
		}
		n := int(h[1] & 0x7f)
		switch n {
		case 126:
			b := make([]byte, 2)
			readFull(t, nc, b)
			n = int(b[0])<<8 | int(b[1])
		case 127:
			b := make([]byte, 8)
			readFull(t, nc, b)
			n = 0
			for _, x := range b {
				n = n<<8 | int(x)
			}
		}
		p := make([]byte, n)
		readFull(t, nc, p)
		return frame{h[0]&0x80 != 0, h[0] & 0x0f, p}
	}
	f := read()
	if !f.fin || f.op != 1 || !bytes.Equal(f.payload, small) {
		t.Fatalf("first frame fin=%v op=%d %d bytes, want one text frame of %d", f.fin, f.op, len(f.payload), len(small))
	}
	f1, f2 := read(), read()
	if f1.fin || f1.op != 1 || len(f1.payload) != 64<<10 || !f2.fin || f2.op != 0 ||
		!bytes.Equal(append(f1.payload, f2.payload...), big) {
		t.Fatalf("fragments fin=%v op=%d %d bytes, fin=%v op=%d %d bytes; want text 64 KiB then the final continuation",
			f1.fin, f1.op, len(f1.payload), f2.fin, f2.op, len(f2.payload))
	}
}

// rawHandshake opens a WebSocket to the server at url by hand, and
// returns what reads the server's frames off the socket.
func rawHandshake(t *testing.T, url string) io.Reader {
	t.Helper()
	nc, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	if err := req.Write(nc); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, req)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %v %v", resp, err)
	}
	return br
}

func readFull(t *testing.T, r io.Reader, b []byte) {
	t.Helper()
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatalf("read: %v", err)
	}
}

// What a conn holds once a burst has drained: its writes borrowed their
// iovec arrays and gave them back. (The runtime's own vectored write
// keeps one per socket, up to 16 KiB, for the socket's life.)
func TestHubMemoryAfterBurst(t *testing.T) {
	const conns, burst = 300, 1000
	var hub *tether.Hub
	s := newHubServer(t,
		tether.WithLimits(tether.Limits{SendQueue: 2 * burst}),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			if err := hub.Subscribe(c, "t"); err != nil {
				t.Errorf("Subscribe: %v", err)
			}
		}}))
	hub = s.hub
	// Raw sockets that read and discard, with their buffers allocated
	// before the baseline.
	var read sync.WaitGroup
	var got atomic.Int64
	t.Cleanup(read.Wait) // after the sockets close: cleanups run last first
	for range conns {
		r := rawHandshake(t, s.URL)
		read.Add(1)
		go func() {
			defer read.Done()
			buf := make([]byte, 4096)
			for {
				n, err := r.Read(buf)
				got.Add(int64(n))
				if err != nil {
					return
				}
			}
		}()
	}
	waitFor(t, 10*time.Second, "every conn subscribed", func() bool { return s.hub.Stats().Conns == conns })
	msg := bytes.Repeat([]byte("x"), 64)
	heap := func() uint64 {
		runtime.GC()
		runtime.GC() // pools keep what they held through one
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	t0 := time.Now()
	for range burst {
		if err := s.hub.Publish("t", msg); err != nil {
			t.Fatal(err)
		}
	}
	want := int64(conns * burst * (64 + 2))
	waitFor(t, 30*time.Second, "the burst delivered", func() bool { return got.Load() >= want })
	waitFor(t, 10*time.Second, "the queues drained", func() bool { return s.hub.Stats().QueuedBytes == 0 })
	t.Logf("delivered and drained in %v", time.Since(t0))
	after := heap()
	grown := int64(after) - int64(before)
	t.Logf("heap %d → %d bytes: %+d B per conn", before, after, grown/conns)
	if grown > conns*2048 {
		t.Errorf("the heap grew by %d B per conn after a drained burst, want under 2 KiB", grown/conns)
	}
}
