package redisbroker_test

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/redisbroker"
	"github.com/tether-ws/tether/redisbroker/internal/redistest"
)

func withInbox(b *redisbroker.Broker) []tether.HubOption {
	return []tether.HubOption{tether.WithInbox(b.Inbox())}
}

// TestInboxAcrossNodes: on one Redis and on a cluster, a user's inbox is
// shared by the nodes. Messages sent from one node reach the user's
// conns on the others, numbered in one inbox; what no client
// acknowledged comes again on whichever node the user reconnects to; an
// acknowledgement on one node empties it for all; past the bound,
// SendToUser says so.
func TestInboxAcrossNodes(t *testing.T) {
	t.Run("one Redis", func(t *testing.T) {
		srv, _ := startRedis(t)
		var nodes []*hubNode
		for i := range 2 {
			nodes = append(nodes, startHubWith(t, "n"+strconv.Itoa(i+1), newRedisClient(srv.Addr()), withInbox))
		}
		testInbox(t, nodes)
	})
	t.Run("cluster", func(t *testing.T) {
		cl := startClusterOnly(t)
		var nodes []*hubNode
		for i := range 2 {
			nodes = append(nodes, startHubWith(t, "n"+strconv.Itoa(i+1), newClusterClient(cl), withInbox))
		}
		testInbox(t, nodes)
	})
}

func testInbox(t *testing.T, nodes []*hubNode) {
	n1, n2 := nodes[0], nodes[1]
	limit := 10 * time.Second
	ann := dialWire(t, n2.url("ann"))
	waitUntil(t, limit, "ann online for n1", func() bool { return n1.hub.Online("ann") })

	// From n1 to ann's conn on n2, numbered.
	for i := 1; i <= 3; i++ {
		if err := n1.hub.SendToUser("ann", []byte(strconv.Itoa(i))); err != nil {
			t.Fatalf("SendToUser %d: %v", i, err)
		}
	}
	var epoch string
	for i := 1; i <= 3; i++ {
		m := ann.await(limit, "inbox message "+strconv.Itoa(i), func(m wireMsg) bool { return m.Op == "msg" && m.Seq == uint64(i) })
		if m.Topic != "" || m.Epoch == "" || string(m.Data) != strconv.Itoa(i) || (epoch != "" && m.Epoch != epoch) {
			t.Fatalf("inbox message %d: %s", i, m.line)
		}
		epoch = m.Epoch
	}
	// ann acknowledges 1 on n2, then leaves; 2 and 3 come again on n1,
	// then 4, sent meanwhile from n2.
	ann.send(`{"op":"received","epoch":"` + epoch + `","seq":1,"id":"r"}`)
	ann.await(limit, "the ack of received", func(m wireMsg) bool { return m.Op == "ack" && m.ID == "r" })
	ann.close()
	waitUntil(t, limit, "ann offline", func() bool { return !n1.hub.Online("ann") })
	if err := n2.hub.SendToUser("ann", []byte("4")); err != nil {
		t.Fatal(err)
	}
	again := dialWire(t, n1.url("ann"))
	for _, want := range []uint64{2, 3, 4} {
		m := again.await(limit, "replay of "+strconv.FormatUint(want, 10), func(m wireMsg) bool { return m.Op == "msg" && m.Seq == want })
		if m.Epoch != epoch {
			t.Fatalf("replayed %s in another epoch than %q", m.line, epoch)
		}
	}
	var seqs []uint64
	for _, m := range again.messages() {
		if m.Op == "msg" {
			seqs = append(seqs, m.Seq)
		}
	}
	if len(seqs) != 3 || seqs[0] != 2 || seqs[2] != 4 {
		t.Fatalf("on n1 ann got inbox seqs %v, want 2 3 4 in order", seqs)
	}
	again.send(`{"op":"received","epoch":"` + epoch + `","seq":4,"id":"r2"}`)
	again.await(limit, "the ack of received", func(m wireMsg) bool { return m.Op == "ack" && m.ID == "r2" })
	// Empty now, for every node: a third conn, on n2, gets no replay.
	third := dialWire(t, n2.url("ann"))
	if err := n1.hub.SendToUser("ann", []byte("5")); err != nil {
		t.Fatal(err)
	}
	m := third.await(limit, "message 5", func(m wireMsg) bool { return m.Op == "msg" })
	if m.Seq != 5 {
		t.Fatalf("the first message of a conn after everything was acknowledged: %s, want seq 5", m.line)
	}

	// The bound: bob, never connected, fills his inbox.
	for i := range inboxLen {
		if err := n1.hub.SendToUser("bob", []byte(strconv.Itoa(i))); err != nil {
			t.Fatalf("SendToUser %d to bob: %v", i, err)
		}
	}
	if err := n2.hub.SendToUser("bob", []byte("one more")); !errors.Is(err, adapter.ErrInboxFull) {
		t.Fatalf("SendToUser past the bound = %v, want ErrInboxFull", err)
	}
}

// startClusterOnly starts a cluster of 3 masters and 3 replicas and
// returns its addresses.
func startClusterOnly(t *testing.T) []string {
	cl, _ := startClusterHubs(t, 3, 0)
	return cl.Addrs()
}

// TestInboxNewEpochAfterRestart: Redis restarted (from its append-only
// file, so the inbox is still there) is another run of the server: the
// inbox starts a new epoch rather than number on from a copy that may
// have lost messages, and a client knows to take them as new.
func TestInboxNewEpochAfterRestart(t *testing.T) {
	srv := redistest.Start(t, "--appendonly", "yes", "--appendfsync", "always")
	rdb := newTestClient(t, srv.Addr())
	n := startHubWith(t, "n1", newRedisClient(srv.Addr()), withInbox)
	if err := n.hub.SendToUser("ann", []byte("1")); err != nil {
		t.Fatal(err)
	}
	ann := dialWire(t, n.url("ann"))
	first := ann.await(10*time.Second, "the kept message", func(m wireMsg) bool { return m.Op == "msg" })
	ann.close()
	srv.Restart(t)
	if n, err := rdb.Exists(context.Background(), redisbroker.KeyOf("i", "ann")).Result(); err != nil || n != 1 {
		t.Fatalf("after the restart the inbox stream exists: %d, %v; want 1: the append-only file kept nothing, so this test proves nothing", n, err)
	}
	waitUntil(t, 20*time.Second, "the broker linked again", func() bool { return brokerUp(n.hub) })
	if err := n.hub.SendToUser("ann", []byte("2")); err != nil {
		t.Fatal(err)
	}
	back := dialWire(t, n.url("ann"))
	m := back.await(10*time.Second, "the message after the restart", func(m wireMsg) bool { return m.Op == "msg" })
	if m.Epoch == first.Epoch || m.Seq != 1 || string(m.Data) != "2" {
		t.Fatalf("after a restart of Redis: %s (before: %s); want seq 1 of a new epoch", m.line, first.line)
	}
}
