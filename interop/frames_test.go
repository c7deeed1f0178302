package interop_test

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// The hub writes everything queued for a conn in vectored writes of
// frames, long messages in 64 KiB fragments (write.go): a gorilla and a
// Node ws peer get a burst of messages of sizes across the frame header's
// bounds (125/126, 65,535/65,536) and the fragment size, as the same
// messages in order.
func TestRawPeersReadBatchedFrames(t *testing.T) {
	const n = 300
	// A slow heartbeat: peers busy with megabytes under the race detector
	// can be late with a pong, and this test is about frames.
	s := newServer(t, tether.WithHeartbeat(time.Second, 10*time.Second),
		tether.WithLimits(tether.Limits{SendQueue: 2 * n, SendQueueBytes: 64 << 20}))
	s.setOnConnect(func(c *tether.Conn) {
		if err := s.Hub().Subscribe(c, "t"); err != nil {
			t.Errorf("Subscribe: %v", err)
		}
	})
	g := dialGorilla(t, s.url("gorilla"), false)
	s.conn("gorilla", 1, 5*time.Second)
	node := startPeer(t, s.url("node"))
	s.conn("node", 1, 5*time.Second)

	sizes := []int{1, 125, 126, 127, 65535, 65536, 65537, 64<<10 + 1, 70000}
	r := rand.New(rand.NewPCG(3, 4))
	for len(sizes) < n {
		sizes = append(sizes, 1+r.IntN(70000))
	}
	msgs := make([][]byte, n)
	for i, size := range sizes {
		msgs[i] = frameMessage(i, size)
		if err := s.Hub().Publish("t", msgs[i]); err != nil {
			t.Fatalf("Publish %d: %v", i, err)
		}
	}
	for i, want := range msgs {
		if got := g.next(10 * time.Second); !bytes.Equal(got, want) {
			t.Fatalf("gorilla message %d: %d bytes %.40q, want %d bytes %.40q", i, len(got), got, len(want), want)
		}
	}
	from := 0
	for i, want := range msgs {
		e, at := node.waitFor(from, 10*time.Second, fmt.Sprintf("ws message %d", i), func(e event) bool { return e.Ev == "message" })
		from = at + 1
		if e.Text == nil || *e.Text != string(want) {
			t.Fatalf("ws message %d: %.60s, want a text of %d bytes", i, e.line, len(want))
		}
	}
	if st := s.Hub().Stats(); st.Evictions != 0 || st.Drops != 0 || st.Conns != 2 {
		t.Fatalf("hub stats %+v", st)
	}
}

// The same for a mix of binary and text messages, binary ones of any
// bytes: each arrives with its type and its bytes, in order, however the
// hub batched them.
func TestRawPeersReadBinaryAndText(t *testing.T) {
	const n = 200
	s := newServer(t, tether.WithHeartbeat(time.Second, 10*time.Second),
		tether.WithLimits(tether.Limits{SendQueue: 2 * n, SendQueueBytes: 64 << 20}))
	s.setOnConnect(func(c *tether.Conn) {
		if err := s.Hub().Subscribe(c, "t"); err != nil {
			t.Errorf("Subscribe: %v", err)
		}
	})
	g := dialGorilla(t, s.url("gorilla"), false)
	s.conn("gorilla", 1, 5*time.Second)
	node := startPeer(t, s.url("node"))
	s.conn("node", 1, 5*time.Second)

	sizes := []int{0, 1, 125, 126, 65535, 65536, 65537, 70000}
	r := rand.New(rand.NewPCG(5, 6))
	for len(sizes) < n {
		sizes = append(sizes, r.IntN(70000))
	}
	type msg struct {
		binary bool
		data   []byte
	}
	msgs := make([]msg, n)
	for i, size := range sizes {
		if i%2 == 0 {
			b := make([]byte, size)
			for j := range b {
				b[j] = byte(r.Uint32())
			}
			msgs[i] = msg{true, b}
			if err := s.Hub().PublishBinary("t", b); err != nil {
				t.Fatalf("PublishBinary %d: %v", i, err)
			}
			continue
		}
		text := bytes.Repeat([]byte("é"), size/2) // text, not JSON
		msgs[i] = msg{false, text}
		if err := s.Hub().Publish("t", text); err != nil {
			t.Fatalf("Publish %d: %v", i, err)
		}
	}
	for i, want := range msgs {
		if got := g.nextMsg(10 * time.Second); got.binary != want.binary || !bytes.Equal(got.data, want.data) {
			t.Fatalf("gorilla message %d: binary=%v %d bytes, want binary=%v %d bytes", i, got.binary, len(got.data), want.binary, len(want.data))
		}
	}
	from := 0
	for i, want := range msgs {
		e, at := node.waitFor(from, 10*time.Second, fmt.Sprintf("ws message %d", i), func(e event) bool { return e.Ev == "message" })
		from = at + 1
		if want.binary {
			got, err := base64.StdEncoding.DecodeString(e.Binary)
			if e.Text != nil || err != nil || !bytes.Equal(got, want.data) {
				t.Fatalf("ws message %d: %.60s, want binary of %d bytes", i, e.line, len(want.data))
			}
		} else if e.Text == nil || *e.Text != string(want.data) {
			t.Fatalf("ws message %d: %.60s, want a text of %d bytes", i, e.line, len(want.data))
		}
	}
	if st := s.Hub().Stats(); st.Evictions != 0 || st.Drops != 0 || st.Conns != 2 {
		t.Fatalf("hub stats %+v", st)
	}
}

// frameMessage is message i of size n, a JSON value the hub publishes as
// it is.
func frameMessage(i, n int) []byte {
	if n < 2 {
		return []byte{byte('0' + i%10)}
	}
	b := bytes.Repeat([]byte{byte('a' + i%26)}, n)
	b[0], b[n-1] = '"', '"'
	copy(b[1:n-1], fmt.Sprintf("%d:", i))
	return b
}
