package tether_test

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// This file checks the control lane: the protocol's own messages (acks,
// errors, presence, pongs) go out ahead of queued data and outside the
// send queue's bounds, so a client that stays within the limits the hub
// advertises and reads is never taken for a slow consumer.

// A client subscribes to 1,000 topics that track presence, in bursts at
// the advertised rate limit (200 subs in one message, then 100 a second):
// each sub is answered by an ack and a presence snapshot, 400 entries at
// once against a send queue of 256, and the hub keeps the client.
func TestHubControlLaneSubscribeBursts(t *testing.T) {
	const topics, burst, perSecond = 1000, 200, 100
	// On one CPU the hub's reader answers a whole burst before the
	// writer runs, as on a one-core server: 400 entries queued at once.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	s := newHubServer(t)
	c := dialClient(t, s.url(), clientOpts{})
	c.welcome()
	sub := func(from, n int) {
		var b strings.Builder
		for i := from; i < from+n; i++ {
			fmt.Fprintf(&b, `{"op":"sub","topic":"t%d","id":"%d"}`+"\n", i, i)
		}
		if err := c.Send(websocket.MessageText, []byte(b.String())); err != nil {
			t.Fatalf("subs from t%d: %v (the reader: %v)", from, err, c.Err())
		}
	}
	sub(0, burst)
	for i := burst; i < topics; i += perSecond {
		// The bucket refills at 100 a second, from when the hub read the
		// last batch, which may be later than it was sent: a little more.
		time.Sleep(1200 * time.Millisecond)
		sub(i, perSecond)
	}
	acks, snapshots := 0, 0
	for acks < topics || snapshots < topics {
		w := c.next(30 * time.Second)
		switch {
		case w.Op == "ack":
			acks++
		case w.Op == "presence" && w.Snapshot:
			snapshots++
		case w.Op == "ping" || w.Op == "pong":
		default:
			t.Fatalf("after %d acks and %d snapshots: %s", acks, snapshots, w.line)
		}
	}
	if st := s.hub.Stats(); st.Conns != 1 || st.Evictions != 0 || st.Drops != 0 || st.RateLimited != 0 {
		t.Fatalf("stats %+v: the client was taken for a slow consumer, or over the limit", st)
	}
	c.quiet(200 * time.Millisecond)
}
