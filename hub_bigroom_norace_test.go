//go:build !race && unix

// 5,000 conns with their peers in one process are 10,000 sockets and
// their goroutines: under the race detector that is minutes and gigabytes.
// .ci/test runs this without -race, after the -race suite, which runs the
// same rules on 300 members (TestHubPresenceListsThenCounts).

package tether_test

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// A room of 5,000 with the default options: every member gets in, in
// bursts of 64 handshakes, and stays; every member's count converges to
// 5,000, from snapshots that list at most 100 members; a late joiner's
// snapshot holds the count alone; after 1,000 leave, every remaining
// member's count converges to 4,000. A few of the members are Go
// clients, whose Client.Presence follows too.
func TestHubPresenceBigRoom(t *testing.T) {
	const n, leave, defaultList = 5000, 1000, 100
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < 2*n+1000 {
		// Go raises the soft limit to the hard one at start; this machine's
		// hard limit is too low for both ends of 5,000 conns.
		t.Skipf("RLIMIT_NOFILE %d (%v): too low for %d conns and their peers", lim.Cur, err, n)
	}
	r := newRoom(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var clients []*tether.Client
	for _, u := range []string{"go1", "go2", "go3"} {
		cl, err := tether.Dial(ctx, r.s.url()+"?user="+u)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		if err := cl.Subscribe(ctx, r.topic, func(tether.Message) {}); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, cl)
	}
	total := n + len(clients)

	start := time.Now()
	r.join(0, n)
	t.Logf("%d handshakes and subs in %v", n, time.Since(start))
	r.converge(2*time.Minute, "the count of the full room", r.peers, func(count int, listed []string) bool {
		return count == total && listed == nil
	})
	t.Logf("every count at %d %v after the first handshake", total, time.Since(start))
	r.checkPeers(r.peers, defaultList)
	if got := r.ended.Load(); got != 0 {
		t.Fatalf("the hub ended %d conns", got)
	}
	if got := r.s.hub.PresenceCount(r.topic); got != total {
		t.Fatalf("PresenceCount = %d, want %d", got, total)
	}
	for _, cl := range clients {
		waitFor(t, time.Minute, "a Go client's count", func() bool {
			ms, count := cl.Presence(r.topic)
			return count == total && ms == nil
		})
	}

	late := r.join(n, 1)[0]
	r.converge(time.Minute, "the late joiner's count", []*roomPeer{late}, func(count int, _ []string) bool { return count == total+1 })
	late.mu.Lock()
	snap := late.snapshots[0]
	late.mu.Unlock()
	if len(snap.Joins) != 0 || *snap.Count < total || len(snap.line) > 100 {
		t.Fatalf("the late joiner's snapshot %s, want the count alone", snap.line)
	}
	late.Close()

	for _, p := range r.peers[:leave] {
		p.Close()
	}
	stay := r.peers[leave:n]
	// The leaves wait for the default grace of 5 s.
	r.converge(2*time.Minute, "the count after 1,000 left", stay, func(count int, listed []string) bool {
		return count == total-leave && listed == nil
	})
	r.checkPeers(stay, defaultList)
	for _, cl := range clients {
		waitFor(t, time.Minute, "a Go client's count after the leaves", func() bool {
			_, count := cl.Presence(r.topic)
			return count == total-leave
		})
	}
	if got := r.s.hub.PresenceCount(r.topic); got != total-leave {
		t.Fatalf("PresenceCount = %d, want %d", got, total-leave)
	}
}
