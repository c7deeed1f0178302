package tether_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

// This file checks topic policies (WithTopicPolicy): priorities decide
// what a conn that falls behind gets first and loses first, and a
// latest-value topic keeps one message queued per conn, the newest.

// A raw peer stops reading until its socket is full and the hub queues for
// it. Then: low-priority messages make room for the others and are
// dropped, never closing the conn; high-priority ones are written first; a
// latest-value topic keeps only its newest message; each topic keeps its
// order.
func TestHubTopicPriorities(t *testing.T) {
	var hub *tether.Hub
	gate := make(chan struct{})
	s := newHubServer(t,
		tether.WithLimits(tether.Limits{SendQueue: 8, SendQueueBytes: 4 << 20, WriteTimeout: time.Minute}),
		tether.WithTopicPolicy(func(topic string) tether.TopicPolicy {
			switch {
			case strings.HasPrefix(topic, "hi"):
				return tether.TopicPolicy{Priority: tether.PriorityHigh}
			case strings.HasPrefix(topic, "lo"):
				return tether.TopicPolicy{Priority: tether.PriorityLow}
			case strings.HasPrefix(topic, "px"):
				return tether.TopicPolicy{Latest: true}
			}
			return tether.TopicPolicy{}
		}),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			for _, topic := range []string{"fill", "hi", "lo", "n", "px"} {
				if err := hub.Subscribe(c, topic); err != nil {
					t.Errorf("Subscribe: %v", err)
				}
			}
		}}))
	hub = s.hub
	peer := dialClient(t, s.url(), clientOpts{raw: true, readGate: gate})
	waitFor(t, 5*time.Second, "the peer subscribed", func() bool { return hub.Stats().Topics == 5 })

	// Fill the socket: 64 KiB messages until one stays queued.
	fill := 0
	for {
		fill++
		if fill > 2000 {
			t.Fatal("the socket never filled")
		}
		if err := hub.Publish("fill", []byte(fmt.Sprintf("fill %d %s", fill, strings.Repeat("x", 64<<10)))); err != nil {
			t.Fatal(err)
		}
		// Queued for half a second: the writer is blocked on a full
		// socket, not merely waiting for a CPU.
		stuck := true
		for deadline := time.Now().Add(500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if hub.Stats().QueuedMessages == 0 {
				stuck = false
				break
			}
		}
		if stuck {
			break
		}
	}
	// Queued now: one fill. Then, with room for 8:
	pub := func(topic string, i int) {
		t.Helper()
		if err := hub.Publish(topic, []byte(fmt.Sprintf("%s %d", topic, i))); err != nil {
			t.Fatal(err)
		}
	}
	for i := 1; i <= 6; i++ {
		pub("lo", i) // fill, lo1..lo6
	}
	for i := 1; i <= 3; i++ {
		pub("n", i) // lo1 and lo2 make room
	}
	for i := 1; i <= 2; i++ {
		pub("hi", i) // lo3 and lo4 make room
	}
	pub("lo", 7) // lo5 makes room
	for i := 1; i <= 3; i++ {
		pub("px", i) // lo6 makes room for px1; px2 and px3 take its place in turn
	}
	st := hub.Stats()
	if st.Conns != 1 || st.QueuedMessages != 8 {
		t.Fatalf("conns %d, queued %d; want the conn kept and 8 queued", st.Conns, st.QueuedMessages)
	}
	if st.Drops != 8 {
		t.Errorf("%d drops, want 8: lo1 to lo6, px1 and px2", st.Drops)
	}

	close(gate)
	var got []string
	fills := 0
	for len(got) < 7 {
		line := peer.next(30 * time.Second).line
		if strings.HasPrefix(line, "fill ") {
			fills++
			continue
		}
		got = append(got, line)
	}
	want := []string{"hi 1", "hi 2", "n 1", "n 2", "n 3", "px 3", "lo 7"}
	if strings.Join(got, ", ") != strings.Join(want, ", ") {
		t.Errorf("got %q, want %q: high first, then normal in order, the latest value, then low", got, want)
	}
	// The queued fill came out with the normal ones: every fill arrived.
	for fills < fill {
		if line := peer.next(30 * time.Second).line; !strings.HasPrefix(line, "fill ") {
			t.Fatalf("got %q after the last expected message", line)
		}
		fills++
	}
	peer.quiet(100 * time.Millisecond)
	if st := hub.Stats(); st.Conns != 1 || st.Evictions != 0 {
		t.Fatalf("stats %+v: the conn must stay", st)
	}
}

// A low-priority topic never closes a conn for being slow, whatever the
// overflow policy; a normal one does (Disconnect, the default).
func TestHubLowPriorityNeverCloses(t *testing.T) {
	var hub *tether.Hub
	conns := make(chan *tether.Conn, 1)
	gate := make(chan struct{})
	defer close(gate)
	s := newHubServer(t,
		tether.WithLimits(tether.Limits{SendQueue: 4, WriteTimeout: time.Minute}),
		tether.WithTopicPolicy(func(topic string) tether.TopicPolicy {
			if topic == "lo" {
				return tether.TopicPolicy{Priority: tether.PriorityLow}
			}
			return tether.TopicPolicy{}
		}),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			hub.Subscribe(c, "lo")
			hub.Subscribe(c, "n")
			conns <- c
		}}))
	hub = s.hub
	dialClient(t, s.url(), clientOpts{raw: true, readGate: gate})
	c := <-conns
	big := strings.Repeat("y", 64<<10)
	for range 500 { // far more than the socket and the queue hold
		if err := hub.Publish("lo", []byte(big)); err != nil {
			t.Fatal(err)
		}
	}
	if st := hub.Stats(); c.Err() != nil || st.Drops == 0 {
		t.Fatalf("after a low-priority flood: %v, %+v; want the conn kept, drops counted", c.Err(), st)
	}
	for range 500 {
		hub.Publish("n", []byte(big))
		if c.Err() != nil {
			break
		}
	}
	if !errors.Is(c.Err(), tether.ErrQueueFull) {
		t.Fatalf("after a normal flood: %v, want the conn ended with ErrQueueFull", c.Err())
	}
}

// A high-priority topic resumed from its history by a conn that is behind:
// the replay goes where the topic's live messages go, so they arrive in
// order (the live one would otherwise overtake the replay, and a client
// would take the replay for messages it had).
func TestHubHighPriorityReplayInOrder(t *testing.T) {
	hist := adapter.NewMemoryHistory(100, time.Hour)
	_, last, _, _ := hist.Since(context.Background(), "hi", tether.Position{})
	gate := make(chan struct{})
	s := newHubServer(t,
		tether.WithHistory(hist),
		tether.WithLimits(tether.Limits{SendQueue: 64, SendQueueBytes: 16 << 20, WriteTimeout: time.Minute}),
		tether.WithTopicPolicy(func(topic string) tether.TopicPolicy {
			if topic == "hi" {
				return tether.TopicPolicy{Priority: tether.PriorityHigh}
			}
			return tether.TopicPolicy{}
		}))
	hub := s.hub
	for i := 1; i <= 3; i++ {
		hub.Publish("hi", []byte(fmt.Sprint(i)))
	}
	peer := dialClient(t, s.url(), clientOpts{readGate: gate})
	peer.send(`{"op":"sub","topic":"fill"}`)
	waitFor(t, 5*time.Second, "the fill subscription", func() bool { return hub.Stats().Topics == 1 })
	for fill := 0; hub.Stats().QueuedMessages <= 2; fill++ {
		if fill > 2000 {
			t.Fatal("the socket never filled")
		}
		hub.Publish("fill", []byte(fmt.Sprintf("%q", strings.Repeat("x", 64<<10))))
		time.Sleep(20 * time.Millisecond)
	}
	peer.send(fmt.Sprintf(`{"op":"sub","topic":"hi","since":{"epoch":%q,"seq":0}}`, last.Epoch))
	waitFor(t, 5*time.Second, "the hi subscription", func() bool { return hub.Stats().Topics == 2 })
	hub.Publish("hi", []byte("4"))
	close(gate)
	var seqs []uint64
	for len(seqs) < 4 {
		if w := peer.next(30 * time.Second); w.Op == "msg" && w.Topic == "hi" {
			seqs = append(seqs, w.Seq)
		}
	}
	if fmt.Sprint(seqs) != "[1 2 3 4]" {
		t.Errorf("hi arrived as seqs %v, want [1 2 3 4]", seqs)
	}
}
