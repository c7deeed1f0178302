//go:build !race

// 200,000 subscriptions, each answered from the history: under the race
// detector that is most of a minute on a busy machine. .ci/test runs this
// without -race, after the -race suite.

package tether_test

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"golang.org/x/time/rate"
)

// What abusive clients leave behind: 200 conns subscribe to 1,000 made-up
// topics each (the rate limit, not the subject here, is off), then leave.
// The hub forgets the topics, and the history keeps at most 8,192 of
// those never published to (about 1.6 MiB), and the maps that held them
// give their room back (internal/shrink): the heap comes back to within
// 3 MiB of where it was.
func TestHubAbusiveSubscribersLeaveLittle(t *testing.T) {
	const conns, topics = 200, 1000
	s := newHubServer(t, tether.WithRateLimit(rate.Inf, 0))
	heap := func() int64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return int64(ms.HeapAlloc)
	}
	var cs []*client
	for range conns {
		c := dialClient(t, s.url(), clientOpts{})
		c.welcome()
		cs = append(cs, c)
	}
	// With the conns there: closing them frees what they hold in the hub,
	// and the test's own clients stay referenced until it ends.
	before := heap()
	for i, c := range cs {
		var b strings.Builder
		for j := range topics {
			fmt.Fprintf(&b, `{"op":"sub","topic":"junk:%d:%d","id":"%d"}`+"\n", i, j, j) // with an id, as clients send: the ack needs the history's position
		}
		c.send(b.String())
	}
	waitFor(t, 30*time.Second, "every subscription in place", func() bool { return s.hub.Stats().Topics == conns*topics })
	for _, c := range cs {
		c.Close()
		for n := len(c.Messages()); n > 0; n-- { // what the test's client kept: not the hub's
			<-c.Messages()
		}
	}
	waitFor(t, 30*time.Second, "every conn and topic gone", func() bool {
		st := s.hub.Stats()
		return st.Conns == 0 && st.Topics == 0
	})
	after := heap()
	t.Logf("heap %d → %d: %+d KiB after %d subscriptions came and went", before, after, (after-before)>>10, conns*topics)
	if after-before > 3<<20 {
		t.Errorf("the heap grew by %d KiB after the abusive conns left, want at most 3 MiB", (after-before)>>10)
	}
}
