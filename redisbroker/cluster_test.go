package redisbroker_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/go-redis/v9"
	"github.com/tether-ws/tether/redisbroker"
	"github.com/tether-ws/tether/redisbroker/internal/redistest"
)

// startClusterHubs starts a Redis Cluster of masters with a replica each
// and n hubs on it.
func startClusterHubs(t *testing.T, masters, n int) (*redistest.Cluster, []*hubNode) {
	t.Helper()
	cl := redistest.StartCluster(t, masters, 1)
	var nodes []*hubNode
	for i := range n {
		nodes = append(nodes, startHubOn(t, "n"+strconv.Itoa(i+1), newClusterClient(cl.Addrs())))
	}
	return cl, nodes
}

// TestClusterPublishPresenceResume: three hubs on a Redis Cluster of
// three masters. Topics spread over every master; publications from
// every node reach every subscriber once, in order; presence crosses
// nodes; a client resumes on another node from the cluster's history.
func TestClusterPublishPresenceResume(t *testing.T) {
	cl, nodes := startClusterHubs(t, 3, 3)

	// The hash tags spread topics over the masters: 24 names that differ
	// in one character land on all three.
	var topics []string
	onMaster := map[int]int{}
	for i := range 24 {
		topic := "room-" + strconv.Itoa(i)
		topics = append(topics, topic)
		onMaster[cl.MasterFor(t, redisbroker.KeyOf("t", topic)).Port()]++
	}
	if len(onMaster) != 3 {
		t.Errorf("24 topics sit on %d masters (%v), want all 3", len(onMaster), onMaster)
	}
	for _, topic := range topics {
		h, x, ch := redisbroker.KeyOf("h", topic), redisbroker.KeyOf("x", topic), redisbroker.KeyOf("t", topic)
		if redistest.KeySlot(h) != redistest.KeySlot(x) || redistest.KeySlot(h) != redistest.KeySlot(ch) {
			t.Fatalf("topic %q: its keys and channel are in different slots", topic)
		}
	}

	// Two subscribers of every topic on each node; each node publishes
	// to every topic in turn.
	recs := map[string][]*recorder{}
	for _, topic := range topics[:6] {
		for _, n := range nodes {
			c, r := dialRecorded(t, n.url("sub-"+n.name))
			subscribe(t, c, topic, r)
			recs[topic] = append(recs[topic], r)
		}
	}
	const perNode = 20
	for i := range perNode {
		for _, n := range nodes {
			for _, topic := range topics[:6] {
				if err := n.hub.Publish(topic, []byte(strconv.Quote(n.name+"-"+strconv.Itoa(i)))); err != nil {
					t.Fatalf("%s: Publish: %v", n.name, err)
				}
			}
		}
	}
	want := perNode * len(nodes)
	for topic, rs := range recs {
		for i, r := range rs {
			r.awaitCount(t, want, 15*time.Second, fmt.Sprintf("subscriber %d of %s", i, topic))
			msgs := r.messages()
			checkContiguous(t, topic, msgs)
			if len(msgs) != want || r.resyncCount() != 0 {
				t.Errorf("subscriber %d of %s: %d messages, %d resyncs; want %d, 0", i, topic, len(msgs), r.resyncCount(), want)
			}
		}
		// Every subscriber sees one order.
		first := summary(rs[0].messages())
		for i, r := range rs[1:] {
			if got := summary(r.messages()); got != first {
				t.Errorf("%s: subscriber %d saw another order than subscriber 0", topic, i+1)
			}
		}
	}

	// Presence: ann on n1 and bob on n3 are both listed by n2.
	const lobby = "lobby"
	ann := dialWire(t, nodes[0].url("ann"))
	ann.subscribe(lobby)
	bob := dialWire(t, nodes[2].url("bob"))
	bob.subscribe(lobby)
	carl := dialWire(t, nodes[1].url("carl"))
	carl.subscribe(lobby)
	limit := presenceGrace + 5*time.Second
	carl.awaitPresence(lobby, limit, "ann, bob and carl listed at carl", listedExactly("ann", "bob", "carl"))
	waitUntil(t, limit, "n2's PresenceCount at 3", func() bool { return nodes[1].hub.PresenceCount(lobby) == 3 })

	// Resume on another node: a client of n1 goes away, n3 publishes,
	// and the client comes back on n2 from where it was.
	const topic = "resume"
	c1, r1 := dialRecorded(t, nodes[0].url("mover"))
	subscribe(t, c1, topic, r1)
	for i := range 3 {
		if err := nodes[2].hub.Publish(topic, []byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	r1.awaitCount(t, 3, 10*time.Second, "the mover before it moves")
	at := r1.messages()[2].Position
	c1.Close()
	for i := 3; i < 8; i++ {
		if err := nodes[2].hub.Publish(topic, []byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	c2, r2 := dialRecorded(t, nodes[1].url("mover"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c2.SubscribeFrom(ctx, topic, at, r2.handle); err != nil {
		t.Fatal(err)
	}
	r2.awaitCount(t, 5, 10*time.Second, "the mover on n2")
	var got []string
	for _, m := range r2.messages() {
		got = append(got, string(m.Data))
	}
	if strings.Join(got, " ") != "3 4 5 6 7" || r2.resyncCount() != 0 {
		t.Errorf("on n2 the mover got %q with %d resyncs, want 3 4 5 6 7 replayed from the cluster's history, no resync", got, r2.resyncCount())
	}
}

// streamCheck publishes numbered messages to topic from one hub, as fast
// as a paced loop allows, and checks each subscriber: in order, never
// twice, and every message published unless the subscriber was told to
// resync. It returns a stop function that ends the stream and reports
// how many were published.
type streamCheck struct {
	t     *testing.T
	topic string
	pub   *hubNode
	stop  chan struct{}
	done  chan struct{}
	sent  atomic.Int64
}

func startStream(t *testing.T, pub *hubNode, topic string) *streamCheck {
	s := &streamCheck{t: t, topic: topic, pub: pub, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for i := 1; ; i++ {
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
			if err := pub.hub.Publish(topic, []byte(strconv.Itoa(i))); err != nil {
				t.Errorf("Publish %d: %v", i, err)
				return
			}
			s.sent.Store(int64(i))
		}
	}()
	t.Cleanup(s.end)
	return s
}

func (s *streamCheck) end() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
}

// finish waits until every node's broker is linked and every subscriber
// (recs[i] on nodes[i]) got messages published after that, ends the
// stream and checks what each received.
func (s *streamCheck) finish(nodes []*hubNode, recs []*recorder) {
	t := s.t
	t.Helper()
	for _, n := range nodes {
		waitUntil(t, 30*time.Second, n.name+"'s broker to be linked", func() bool { return brokerUp(n.hub) })
	}
	linkedAt := s.sent.Load()
	waitUntil(t, 20*time.Second, "messages after the link is back at every subscriber", func() bool {
		for _, r := range recs {
			msgs := r.messages()
			if len(msgs) == 0 {
				return false
			}
			if n, _ := strconv.Atoi(string(msgs[len(msgs)-1].Data)); n <= int(linkedAt)+20 {
				return false
			}
		}
		return true
	})
	s.end()
	for i, r := range recs {
		s.check("subscriber on "+nodes[i].name, r)
	}
}

// check verifies what r received of the stream: increasing numbers, and
// with no resync every number from its first to its last.
func (s *streamCheck) check(who string, r *recorder) {
	t := s.t
	t.Helper()
	msgs := r.messages()
	prev := 0
	gaps := 0
	for _, m := range msgs {
		n, err := strconv.Atoi(string(m.Data))
		if err != nil {
			t.Errorf("%s: unexpected message %q", who, m.Data)
			return
		}
		if n <= prev {
			t.Errorf("%s: %d after %d: repeated or out of order", who, n, prev)
		}
		if prev != 0 && n != prev+1 {
			gaps++
		}
		prev = n
	}
	if gaps > 0 && r.resyncCount() == 0 {
		t.Errorf("%s: %d gaps in the stream and no resync: messages were lost silently", who, gaps)
	}
	t.Logf("%s: %d messages, %d gaps, %d resyncs", who, len(msgs), gaps, r.resyncCount())
}

// TestClusterMasterKilled: a stream of publications to a topic whose
// master is killed with SIGKILL midway. Its replica is promoted, the
// hubs link again, and every subscriber on every node got every message
// or was told to resync (none lost silently), and gets the messages
// published after the failover.
func TestClusterMasterKilled(t *testing.T) {
	cl, nodes := startClusterHubs(t, 3, 3)
	const topic = "ticker"
	var recs []*recorder
	for _, n := range nodes {
		c, r := dialRecorded(t, n.url("watcher-"+n.name))
		subscribe(t, c, topic, r)
		recs = append(recs, r)
	}
	s := startStream(t, nodes[0], topic)
	waitUntil(t, 10*time.Second, "the stream to start", func() bool { return recs[2].len() >= 20 })

	master := cl.MasterFor(t, redisbroker.KeyOf("h", topic))
	master.Kill()
	killedAt := s.sent.Load()
	promoted := cl.WaitFailover(t, master, 60*time.Second)
	t.Logf("killed %s at message %d; %s promoted", master.Addr(), killedAt, promoted.Addr())
	s.finish(nodes, recs)
}

// TestSentinelFailover: the same stream on a master behind three
// sentinels, killed with SIGKILL; the sentinels promote its replica.
func TestSentinelFailover(t *testing.T) {
	sen := redistest.StartSentinel(t, 1, 3)
	var nodes []*hubNode
	for i := range 2 {
		nodes = append(nodes, startHubOn(t, "n"+strconv.Itoa(i+1), newSentinelClient(sen.MasterName(), sen.SentinelAddrs())))
	}
	const topic = "ticker"
	var recs []*recorder
	for _, n := range nodes {
		c, r := dialRecorded(t, n.url("watcher-"+n.name))
		subscribe(t, c, topic, r)
		recs = append(recs, r)
	}
	s := startStream(t, nodes[0], topic)
	waitUntil(t, 10*time.Second, "the stream to start", func() bool { return recs[1].len() >= 20 })

	master := sen.Master(t)
	master.Kill()
	promoted := sen.WaitFailover(t, master, 60*time.Second)
	t.Logf("killed %s; %s promoted", master.Addr(), promoted.Addr())
	s.finish(nodes, recs)
}

// closingPeer is a raw peer that records its messages and how its conn
// was closed.
type closingPeer struct {
	ws   *websocket.Conn
	mu   sync.Mutex
	msgs []string
	err  error
	done chan struct{}
}

func dialClosing(t testing.TB, url string) *closingPeer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		t.Fatalf("raw dial %s: %v", url, err)
	}
	p := &closingPeer{ws: ws, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for {
			_, data, err := ws.Read(context.Background())
			p.mu.Lock()
			if err != nil {
				p.err = err
				p.mu.Unlock()
				return
			}
			p.msgs = append(p.msgs, string(data))
			p.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ws.CloseNow()
		<-p.done
	})
	return p
}

func (p *closingPeer) has(msg string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.msgs {
		if m == msg {
			return true
		}
	}
	return false
}

func (p *closingPeer) closed() (websocket.StatusCode, string, bool) {
	select {
	case <-p.done:
	default:
		return 0, "", false
	}
	var ce websocket.CloseError
	if errors.As(p.err, &ce) {
		return ce.Code, ce.Reason, true
	}
	return -1, "", true
}

// TestRelayAcrossNodes runs the hub operations that reach every node on
// one Redis and on a cluster: SubscribeUser and UnsubscribeUser,
// Broadcast, Online and LastSeen, DisconnectUser.
func TestRelayAcrossNodes(t *testing.T) {
	t.Run("one Redis", func(t *testing.T) {
		srv, _ := startRedis(t)
		var nodes []*hubNode
		for i := range 3 {
			nodes = append(nodes, startHub(t, "n"+strconv.Itoa(i+1), srv.Addr()))
		}
		testRelay(t, nodes, newTestClient(t, srv.Addr()), func(ch string) int64 { return numSub(t, newTestClient(t, srv.Addr()), ch) })
	})
	t.Run("cluster", func(t *testing.T) {
		cl, nodes := startClusterHubs(t, 3, 3)
		rdb := newClusterClient(cl.Addrs())
		t.Cleanup(func() { rdb.Close() })
		testRelay(t, nodes, rdb, func(ch string) int64 {
			return numSub(t, newTestClient(t, cl.MasterFor(t, ch).Addr()), ch)
		})
	})
}

func newTestClient(t testing.TB, addr string) *redis.Client {
	c := newRedisClient(addr)
	t.Cleanup(func() { c.Close() })
	return c
}

func testRelay(t *testing.T, nodes []*hubNode, rdb redis.UniversalClient, numSub func(channel string) int64) {
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	alice1, alice2 := dialClosing(t, n1.url("alice")), dialClosing(t, n2.url("alice"))
	bob := dialClosing(t, n3.url("bob"))
	limit := 10 * time.Second

	// SubscribeUser on n3 reaches alice's conns on n1 and n2.
	const room = "room"
	// A relay reaches the nodes where the user is recorded: both of
	// alice's, once their brokers have written her in.
	waitUntil(t, limit, "alice recorded on n1 and n2", func() bool {
		n, err := rdb.SCard(context.Background(), redisbroker.KeyOf("u", "alice")).Result()
		return err == nil && n == 2
	})
	if err := n3.hub.SubscribeUser("alice", room); err != nil {
		t.Fatalf("SubscribeUser: %v", err)
	}
	// Both conns subscribed: n1 lists alice in the room with both
	// (its own, and n2's, announced once subscribed there).
	waitUntil(t, limit, "alice's two conns in the room", func() bool {
		for _, m := range n1.hub.Presence(room) {
			if m.UserID == "alice" && len(m.Conns) == 2 {
				return true
			}
		}
		return false
	})
	if got := numSub(redisbroker.KeyOf("t", room)); got != 2 {
		t.Errorf("%d subscriptions to the room's channel, want 2 (n1 and n2)", got)
	}
	if err := n3.hub.Publish(room, []byte(`"to the room"`)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, limit, "the room's message at both of alice's conns", func() bool {
		return alice1.has(`"to the room"`) && alice2.has(`"to the room"`)
	})

	// Broadcast from n2 reaches every conn of every node, once.
	if err := n2.hub.Broadcast([]byte("everyone")); err != nil {
		t.Fatalf("Broadcast: %v", err)
	}
	waitUntil(t, limit, "the broadcast everywhere", func() bool {
		return alice1.has("everyone") && alice2.has("everyone") && bob.has("everyone")
	})

	// UnsubscribeUser from n1: the room's next message reaches nobody.
	if err := n1.hub.UnsubscribeUser("alice", room); err != nil {
		t.Fatalf("UnsubscribeUser: %v", err)
	}
	waitUntil(t, limit, "n1 and n2 to let the room go", func() bool { return numSub(redisbroker.KeyOf("t", room)) == 0 })
	if err := n3.hub.Publish(room, []byte(`"too late"`)); err != nil {
		t.Fatal(err)
	}

	// Online and LastSeen on a node where alice has no conn.
	before := time.Now()
	if at, ok := n3.hub.LastSeen("alice"); !ok || at.Before(before.Add(-time.Second)) {
		t.Errorf("n3: LastSeen(alice) = %v, %v while she is online on n1 and n2, want about now", at, ok)
	}

	// DisconnectUser on n3 closes alice's conns on n1 and n2 with its code
	// and reason, and not bob's.
	n, err := n3.hub.DisconnectUser("alice", 4001, "signed out")
	if err != nil || n != 0 {
		t.Fatalf("DisconnectUser = %d, %v; want 0 here, nil", n, err)
	}
	for _, p := range []*closingPeer{alice1, alice2} {
		waitUntil(t, limit, "alice's conn closed", func() bool { _, _, ok := p.closed(); return ok })
		if code, reason, _ := p.closed(); code != 4001 || reason != "signed out" {
			t.Errorf("alice's conn closed with %d %q, want 4001 \"signed out\"", code, reason)
		}
	}
	if alice1.has(`"too late"`) || alice2.has(`"too late"`) {
		t.Errorf("alice got the room's message after UnsubscribeUser")
	}
	gone := time.Now()
	if _, _, ok := bob.closed(); ok {
		t.Errorf("bob's conn closed too")
	}
	waitUntil(t, limit, "alice offline everywhere", func() bool { return !n3.hub.Online("alice") })
	at, ok := n3.hub.LastSeen("alice")
	if !ok || at.Before(before.Add(-time.Second)) || at.After(time.Now()) {
		t.Errorf("n3: LastSeen(alice) after she left n1 and n2 = %v, %v; want between %v and now (she left about %v)", at, ok, before, gone)
	}
	if _, ok := n3.hub.LastSeen("nobody"); ok {
		t.Errorf("LastSeen of a user never seen is ok")
	}
}

// TestClusterSlotMoved: the slot of a streaming topic moves to another
// master (CLUSTER SETSLOT MIGRATING/IMPORTING, MIGRATE of its keys, then
// SETSLOT NODE, as redis-cli --cluster reshard does). The nodes meet
// MOVED, ASK or the server's notice that it dropped their subscriptions,
// link again to the new master, and every subscriber got every message
// or was told to resync.
func TestClusterSlotMoved(t *testing.T) {
	cl, nodes := startClusterHubs(t, 3, 2)
	const topic = "moving"
	var recs []*recorder
	for _, n := range nodes {
		c, r := dialRecorded(t, n.url("watcher-"+n.name))
		subscribe(t, c, topic, r)
		recs = append(recs, r)
	}
	s := startStream(t, nodes[0], topic)
	waitUntil(t, 10*time.Second, "the stream to start", func() bool { return recs[1].len() >= 20 })

	key := redisbroker.KeyOf("h", topic)
	slot := redistest.KeySlot(key)
	from := cl.MasterFor(t, key)
	var to *redistest.Server
	for _, m := range cl.Masters(t) {
		if m != from {
			to = m
			break
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, dst := newTestClient(t, from.Addr()), newTestClient(t, to.Addr())
	srcID, err1 := src.ClusterMyID(ctx).Result()
	dstID, err2 := dst.ClusterMyID(ctx).Result()
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	must("IMPORTING", dst.Do(ctx, "CLUSTER", "SETSLOT", slot, "IMPORTING", srcID).Err())
	must("MIGRATING", src.Do(ctx, "CLUSTER", "SETSLOT", slot, "MIGRATING", dstID).Err())
	moved := 0
	for {
		keys, err := src.ClusterGetKeysInSlot(ctx, slot, 100).Result()
		must("GETKEYSINSLOT", err)
		if len(keys) == 0 {
			break
		}
		args := []any{"MIGRATE", "127.0.0.1", to.Port(), "", 0, 5000, "KEYS"}
		for _, k := range keys {
			args = append(args, k)
		}
		must("MIGRATE", src.Do(ctx, args...).Err())
		moved += len(keys)
	}
	for _, m := range cl.Masters(t) {
		must("SETSLOT NODE", newTestClient(t, m.Addr()).Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", dstID).Err())
	}
	t.Logf("moved slot %d (%d keys) from %s to %s at message %d", slot, moved, from.Addr(), to.Addr(), s.sent.Load())
	if moved == 0 {
		t.Fatalf("no key of the topic was in slot %d: the test moved nothing", slot)
	}

	s.finish(nodes, recs)
	if got := cl.MasterFor(t, key); got != to {
		t.Errorf("after the move the topic's master is %s, want %s", got.Addr(), to.Addr())
	}
	if got := numSubOn(t, to.Addr(), redisbroker.KeyOf("t", topic)); got != 2 {
		t.Errorf("the new master has %d subscriptions to the topic's channel, want 2", got)
	}
}

func numSubOn(t testing.TB, addr, channel string) int64 {
	return numSub(t, newTestClient(t, addr), channel)
}
