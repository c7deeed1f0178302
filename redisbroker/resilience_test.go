package redisbroker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/redisbroker/internal/redistest"
)

// steadyPublisher publishes "p<i>" to topic on a node every interval
// until stopped, recording when each went out.
type steadyPublisher struct {
	stopc chan struct{}
	done  chan struct{}
	n     atomic.Int64 // published so far

	mu      sync.Mutex
	slowest time.Duration // the longest Publish call
	slowAt  time.Time     // when it began
}

// slowestCall returns the longest Publish call so far and when it began.
func (p *steadyPublisher) slowestCall() (time.Duration, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.slowest, p.slowAt
}

func publishSteadily(t *testing.T, n *hubNode, topic string, every time.Duration) *steadyPublisher {
	p := &steadyPublisher{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for i := 0; ; i++ {
			start := time.Now()
			err := n.hub.Publish(topic, []byte(quoted("p"+strconv.Itoa(i))))
			if d := time.Since(start); err == nil {
				p.mu.Lock()
				if d > p.slowest {
					p.slowest, p.slowAt = d, start
				}
				p.mu.Unlock()
			}
			if err != nil {
				t.Errorf("%s: Publish: %v", n.name, err)
				return
			}
			p.n.Add(1)
			select {
			case <-tick.C:
			case <-p.stopc:
				return
			}
		}
	}()
	t.Cleanup(func() { p.stop() })
	return p
}

// stop stops the publisher and returns how many it published.
func (p *steadyPublisher) stop() int {
	select {
	case <-p.stopc:
	default:
		close(p.stopc)
	}
	<-p.done
	return int(p.n.Load())
}

// index returns i of a payload "p<i>".
func index(t testing.TB, m tether.Message) int {
	var s string
	if err := json.Unmarshal(m.Data, &s); err != nil || !strings.HasPrefix(s, "p") {
		t.Fatalf("unexpected payload %s", m.Data)
	}
	i, err := strconv.Atoi(s[1:])
	if err != nil {
		t.Fatalf("unexpected payload %s", m.Data)
	}
	return i
}

// checkIncreasing fails the test unless the publisher's indices only go
// up: one publisher's messages in the order it published them.
func checkIncreasing(t testing.TB, who string, msgs []tether.Message) {
	t.Helper()
	for i := 1; i < len(msgs); i++ {
		if index(t, msgs[i]) <= index(t, msgs[i-1]) {
			t.Errorf("%s: %s after %s", who, msgs[i].Data, msgs[i-1].Data)
			return
		}
	}
}

// TestClientMovesNode: a publisher keeps publishing while the node two
// clients are on stops; they reconnect to their fallback, one to a node
// that holds the topic already and one to a node that holds nothing, and
// resume from their position: nothing missed, nothing twice, no resync.
func TestClientMovesNode(t *testing.T) {
	srv, _ := startRedis(t)
	n1 := startHub(t, "n1", srv.Addr())
	n2 := startHub(t, "n2", srv.Addr())
	n3 := startHub(t, "n3", srv.Addr())
	const topic = "stream"

	scl, steady := dialRecorded(t, n2.url("steady"))
	subscribe(t, scl, topic, steady)
	c1, r1 := dialRecorded(t, n1.url("c1"), tether.WithFallbackURLs(n2.url("c1")))
	subscribe(t, c1, topic, r1)
	c2, r2 := dialRecorded(t, n1.url("c2"), tether.WithFallbackURLs(n3.url("c2")))
	subscribe(t, c2, topic, r2)

	pub := publishSteadily(t, n3, topic, 3*time.Millisecond)
	r1.awaitCount(t, 30, 10*time.Second, "c1 before the move")
	r2.awaitCount(t, 30, 10*time.Second, "c2 before the move")
	before1, before2 := r1.len(), r2.len()
	stopped := time.Now()
	n1.stop()
	r1.awaitCount(t, before1+1, 10*time.Second, "c1 after the move")
	r2.awaitCount(t, before2+1, 10*time.Second, "c2 after the move")
	moved := time.Since(stopped)
	t.Logf("both clients moved and got messages again within %v", moved)
	if bound := clientBackoff.Max + 2*time.Second; moved > bound {
		t.Errorf("the clients took %v to get messages again after their node stopped, want within %v", moved, bound)
	}
	r1.awaitCount(t, before1+30, 10*time.Second, "c1 after the move")
	r2.awaitCount(t, before2+30, 10*time.Second, "c2 after the move")
	total := pub.stop()

	steady.awaitCount(t, total, 10*time.Second, "the steady subscriber")
	last := steady.messages()[total-1].Position
	for _, c := range []struct {
		name string
		cl   *tether.Client
		r    *recorder
	}{{"c1 (to a node holding the topic)", c1, r1}, {"c2 (to a node holding nothing)", c2, r2}} {
		waitUntil(t, 10*time.Second, c.name+" to reach the last message", func() bool {
			msgs := c.r.messages()
			return len(msgs) > 0 && msgs[len(msgs)-1].Position.Seq >= last.Seq
		})
		time.Sleep(100 * time.Millisecond)
		msgs := c.r.messages()
		checkContiguous(t, c.name, msgs)
		checkIncreasing(t, c.name, msgs)
		if got := msgs[len(msgs)-1].Position; got != last {
			t.Errorf("%s ends at %v, the steady subscriber at %v", c.name, got, last)
		}
		if n := c.r.resyncCount(); n != 0 {
			t.Errorf("%s: %d resyncs, want none (the history covers the move)", c.name, n)
		}
		c.r.mu.Lock()
		states := slices.Clone(c.r.states)
		c.r.mu.Unlock()
		if !slices.Contains(states, tether.Reconnecting) || c.cl.State() != tether.Connected {
			t.Errorf("%s: states %v, now %v: want a reconnection, connected now", c.name, states, c.cl.State())
		}
	}
	msgs := steady.messages()
	checkContiguous(t, "steady", msgs)
	if got := msgs[0].Position.Seq; got != 1 {
		t.Errorf("steady's first message at seq %d, want 1", got)
	}
	if n2.hub.Len() != 2 || n3.hub.Len() != 1 {
		t.Errorf("conns: n2 %d (want steady and c1), n3 %d (want c2)", n2.hub.Len(), n3.hub.Len())
	}
}

// TestRedisRestart: Redis is killed and started again, empty, on the same
// port while a node publishes. The node's own subscribers keep receiving
// throughout; both nodes report the outage to their observer, then its
// end; cross-node delivery resumes within the broker's backoff cap plus a
// margin; subscribers may be told to resync but never get a position
// twice, nor a message out of order.
func TestRedisRestart(t *testing.T) {
	srv, _ := startRedis(t)
	n1 := startHub(t, "n1", srv.Addr())
	n2 := startHub(t, "n2", srv.Addr())
	const topic = "feed"

	cl1, s1 := dialRecorded(t, n1.url("s1"))
	subscribe(t, cl1, topic, s1)
	cl2, s2 := dialRecorded(t, n2.url("s2"))
	subscribe(t, cl2, topic, s2)

	pub := publishSteadily(t, n1, topic, 10*time.Millisecond)
	s2.awaitCount(t, 10, 10*time.Second, "s2 before the outage")

	// What each observer heard before the outage (nothing, or a first
	// link reported up) is left aside.
	prior := map[*hubNode]int{n1: len(n1.health.all()), n2: len(n2.health.all())}
	srv.Stop()
	stopped := time.Now()
	for _, n := range []*hubNode{n1, n2} {
		waitUntil(t, 5*time.Second, n.name+" to report the outage", func() bool {
			calls := n.health.all()[prior[n]:]
			return len(calls) > 0 && calls[0].err != nil
		})
	}
	t.Logf("outage reported %v after Redis died", time.Since(stopped))
	time.Sleep(700 * time.Millisecond)

	atRestart := int(pub.n.Load())
	srv.Restart(t)
	restarted := time.Now()
	bound := brokerBackoff.Max + 2*time.Second
	var back time.Time
	for _, n := range []*hubNode{n1, n2} {
		waitUntil(t, 10*time.Second, n.name+" to report the link back", func() bool {
			calls := n.health.all()[prior[n]:]
			return len(calls) > 1 && calls[len(calls)-1].err == nil
		})
		calls := n.health.all()
		upAt := calls[len(calls)-1].at
		if d := upAt.Sub(restarted); d > bound {
			t.Errorf("%s reported the link back %v after Redis was, want within %v", n.name, d, bound)
		}
		if n == n1 {
			back = upAt
		}
	}
	waitUntil(t, 10*time.Second, "s2 to get a publication of n1 made after the restart", func() bool {
		_, ok := s2.firstMatch(func(m tether.Message) bool { return index(t, m) >= atRestart })
		return ok
	})
	at, _ := s2.firstMatch(func(m tether.Message) bool { return index(t, m) >= atRestart })
	t.Logf("cross-node delivery back %v after Redis", at.Sub(restarted))
	if d := at.Sub(restarted); d > bound {
		t.Errorf("cross-node delivery back %v after Redis restarted, want within %v", d, bound)
	}

	// Some more after recovery, then stop and settle.
	n := s2.len()
	s2.awaitCount(t, n+20, 10*time.Second, "s2 after the recovery")
	total := pub.stop()
	waitUntil(t, 10*time.Second, "s1 to get the last publication", func() bool {
		msgs := s1.messages()
		return len(msgs) > 0 && index(t, msgs[len(msgs)-1]) == total-1
	})
	waitUntil(t, 10*time.Second, "s2 to get the last publication", func() bool {
		msgs := s2.messages()
		return len(msgs) > 0 && index(t, msgs[len(msgs)-1]) == total-1
	})
	time.Sleep(200 * time.Millisecond)

	slowest, slowAt := pub.slowestCall()
	t.Logf("the slowest hub.Publish took %v, from %v after Redis died", slowest, slowAt.Sub(stopped))
	if during := s1.receivedBetween(stopped, back); during == 0 {
		t.Errorf("s1 received nothing in the %v while Redis was away: local delivery stopped (the slowest hub.Publish took %v, from %v after Redis died)",
			back.Sub(stopped), slowest, slowAt.Sub(stopped))
	} else {
		t.Logf("s1 received %d messages during the outage", during)
	}
	for _, c := range []struct {
		name string
		r    *recorder
	}{{"s1", s1}, {"s2", s2}} {
		msgs := c.r.messages()
		checkNoRepeat(t, c.name, msgs)
		checkIncreasing(t, c.name, msgs)
		// Once both links are back, one epoch, contiguous.
		lastEpoch := msgs[len(msgs)-1].Position.Epoch
		tail := msgs[slices.IndexFunc(msgs, func(m tether.Message) bool { return m.Position.Epoch == lastEpoch }):]
		checkContiguous(t, c.name+" after the recovery", tail)
		t.Logf("%s: %d messages of %d published, %d resyncs", c.name, len(msgs), total, c.r.resyncCount())
	}
	// The same position holds the same message for both.
	byPos := make(map[tether.Position]string)
	for _, m := range s1.messages() {
		byPos[m.Position] = string(m.Data)
	}
	for _, m := range s2.messages() {
		if d, ok := byPos[m.Position]; ok && d != string(m.Data) {
			t.Errorf("position %v holds %s for s1 and %s for s2", m.Position, d, m.Data)
		}
	}
	for _, n := range []*hubNode{n1, n2} {
		if got := n.hub.Stats().BrokerOutages; got < 1 {
			t.Errorf("%s: Stats().BrokerOutages = %d, want at least 1", n.name, got)
		}
		calls := n.health.all()[prior[n]:]
		var seq []string
		for _, c := range calls {
			seq = append(seq, fmt.Sprint(c.err != nil))
		}
		if calls[0].err == nil || calls[len(calls)-1].err != nil {
			t.Errorf("%s: observer calls since the outage (err?) %v: want an error first, nil last", n.name, seq)
		}
	}
}

// TestRestartFromDiskStartsNewEpochs restarts a Redis that keeps its data
// (append-only file): the topic's hash survives with its seq, but the
// server may have lost its last writes, so the broker starts a new epoch
// rather than numbering on, and the subscriber is told to resync instead
// of being handed seqs it may already have had.
func TestRestartFromDiskStartsNewEpochs(t *testing.T) {
	srv := redistest.Start(t, "--appendonly", "yes", "--appendfsync", "always")
	rdb := newRedisClient(srv.Addr())
	t.Cleanup(func() { rdb.Close() })
	n1 := startHub(t, "n1", srv.Addr())
	const topic = "ledger"
	cl, rec := dialRecorded(t, n1.url("reader"))
	subscribe(t, cl, topic, rec)
	for i := range 3 {
		if err := n1.hub.Publish(topic, []byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	rec.awaitCount(t, 3, 10*time.Second, "the reader before the restart")
	before := rec.messages()[2].Position
	if before.Seq != 3 {
		t.Fatalf("before the restart the reader is at %v, want seq 3", before)
	}

	// Written after the publications: if the append-only file kept it, it
	// kept them. (The topic's own record cannot be read for this: the
	// broker, linked again, may have started the new epoch in it already.)
	if err := rdb.Set(context.Background(), "kept", "yes", 0).Err(); err != nil {
		t.Fatal(err)
	}
	srv.Restart(t)
	if v, err := rdb.Get(context.Background(), "kept").Result(); err != nil || v != "yes" {
		t.Fatalf("after the restart a key written before it reads %q (%v): the append-only file did not keep it, so this test proves nothing", v, err)
	}
	// Catching up once linked, n1 finds the new epoch and tells the
	// reader to resync; what follows is in the new epoch. (A publication
	// made before that catch-up is covered by the resync, and the reader
	// need not get it as a message: so the next one waits for it.)
	waitUntil(t, 10*time.Second, "the reader to be told to resync", func() bool { return rec.resyncCount() > 0 })
	if err := n1.hub.Publish(topic, []byte(`"after"`)); err != nil {
		t.Fatal(err)
	}
	rec.awaitCount(t, 4, 10*time.Second, "the reader after the restart")
	after := rec.messages()[3].Position
	if after.Epoch == before.Epoch {
		t.Errorf("after the restart the topic numbers on in epoch %q (%v): a server that lost writes would repeat seqs", before.Epoch, after)
	}
	checkNoRepeat(t, "reader", rec.messages())
}
