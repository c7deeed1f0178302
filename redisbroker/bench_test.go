package redisbroker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/go-redis/v9"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/redisbroker"
	"github.com/tether-ws/tether/redisbroker/internal/redistest"
)

// Fan-out through Redis, end to end over loopback. Everything but
// redis-server runs in this process: the hubs, their HTTP servers and the
// subscribers (protocol v1 WebSocket conns over coder/websocket, each
// reading in a goroutine of its own) share the machine's cores with
// redis-server.
//
//	go test -run '^$' -bench 'CrossNode|SingleNode' -benchtime 200x     # ~30 s on 2 cores
//
// (bench_cluster_test.go has the three-node and cluster benchmarks.)
//
// BenchmarkCrossNode/subs=2x1000: two hubs linked by one Redis, with
// 1,000 subscribers of one topic on each (2,000 in all); node 1 publishes
// 64-byte messages with Hub.Publish. BenchmarkSingleNode/*/subs=2000 is
// the baseline, the same 2,000 subscribers on one hub: without a broker
// (memory) and with the Redis broker but no other node (redis), which
// separates the trip through Redis from the second node. The subs=2x1
// and subs=2 variants, one subscriber per node, time the path alone,
// without the walk over 2,000 conns.
//
// One op is one publication delivered to every subscriber. paced
// publishes a message once the previous one has reached every subscriber
// and 2 ms have passed (time not counted): each message travels alone,
// on an idle machine. inflight=64 publishes message i+64 as soon as
// message i has reached every subscriber: the pipeline stays full, within
// the hubs' 256-message send queues, so nobody is evicted. Each message
// carries the time just before Publish; each subscriber takes read time
// minus that for every message in the frames it reads (one clock).
//
// Reported, besides ns/op: deliveries/s (subscribers x publications /
// time from the first publish to the last delivery); p50-ms and p99-ms
// over every delivery (10 µs buckets); first-p50-ms, the median over the
// messages of the earliest delivery on node 1 (the time to get there,
// before the walk over its subscribers); publish-ms, the mean time
// Hub.Publish took (through Redis: the script's round trip); msgs/frame,
// how many messages a WebSocket frame carried (the hub coalesces what
// queued up); cpu-ms/op, this process's CPU time (user + system) per
// publication; for the cross-node runs the same latencies for node 2's
// subscribers alone (remote-). A lost, repeated or reordered message, an
// eviction or a publication kept local fails the benchmark.

const (
	benchPerNode  = 1000 // subscribers on each node of BenchmarkCrossNode
	benchTopic    = "bench"
	benchSize     = 64 // bytes of data per message
	benchDeadline = 30 * time.Second
)

// benchMode is how a sub-benchmark publishes: at most inflight messages
// outstanding, and with a pause (the machine idle) before each one; from
// one goroutine, or from publishers goroutines at once (0 or 1: one).
type benchMode struct {
	name       string
	inflight   int
	pause      time.Duration
	publishers int
}

var (
	// benchPaced publishes each message alone, once the previous one has
	// reached every subscriber and the machine has been idle for 2 ms.
	benchPaced = benchMode{name: "paced", inflight: 1, pause: 2 * time.Millisecond}
	// benchPipelined keeps 64 messages outstanding.
	benchPipelined = benchMode{name: "inflight=64", inflight: 64}
)

func BenchmarkCrossNode(b *testing.B) {
	rs := redistest.Start(b)
	b.Run(fmt.Sprintf("subs=2x%d", benchPerNode), func(b *testing.B) {
		startBenchCluster(b, rs.Addr(), []int{benchPerNode, benchPerNode}).runAll(b, benchPaced, benchPipelined)
	})
	b.Run("subs=2x1", func(b *testing.B) {
		startBenchCluster(b, rs.Addr(), []int{1, 1}).runAll(b, benchPaced)
	})
}

func BenchmarkSingleNode(b *testing.B) {
	for _, broker := range []string{"memory", "redis"} {
		b.Run(broker, func(b *testing.B) {
			addr := ""
			if broker == "redis" {
				addr = redistest.Start(b).Addr()
			}
			b.Run(fmt.Sprintf("subs=%d", 2*benchPerNode), func(b *testing.B) {
				startBenchCluster(b, addr, []int{2 * benchPerNode}).runAll(b, benchPaced, benchPipelined)
			})
			b.Run("subs=2", func(b *testing.B) {
				startBenchCluster(b, addr, []int{2}).runAll(b, benchPaced)
			})
		})
	}
}

// benchCluster is hubs (nodes) with their subscribers.
type benchCluster struct {
	spec  benchSpec
	nodes []*benchNode
	subs  []*benchSub
	want  []int32 // per topic, its subscribers on every node
	// masters are clients of every Redis master, for INFO: set, the
	// many-topic runs report what Redis spent (see redisSample).
	masters []*redis.Client
	run     atomic.Pointer[benchRun] // the run the subscribers report to
	wg      sync.WaitGroup           // subscribers' readers
}

// benchSpec is what startBenchHubs sets up: subs[node][topic]
// subscribers of each topic on each node, and per topic the node that
// publishes it. Message i of a run goes to topic i % len(topics).
type benchSpec struct {
	topics    []string
	subs      [][]int
	publisher []int
}

type benchNode struct {
	hub    *tether.Hub
	rdb    redis.UniversalClient // nil without a broker
	broker *countingBroker       // nil without a broker
	srv    *http.Server
	url    string
}

// countingBroker is the Redis broker counting the topic messages it
// hands its hub: the publications this node received over pub/sub.
type countingBroker struct {
	*redisbroker.Broker
	delivered atomic.Uint64
}

func (b *countingBroker) Open(node adapter.Node) error {
	return b.Broker.Open(countingNode{node, &b.delivered})
}

type countingNode struct {
	adapter.Node
	delivered *atomic.Uint64
}

func (n countingNode) Deliver(topic string, pos adapter.Position, data []byte) {
	n.delivered.Add(1)
	n.Node.Deliver(topic, pos, data)
}

// startBenchCluster starts a hub for each element of perNode, linked by
// the Redis at redisAddr ("": one hub without a broker), and connects
// perNode[i] subscribers of benchTopic to hub i; node 1 publishes.
// Everything is closed when b ends.
func startBenchCluster(b *testing.B, redisAddr string, perNode []int) *benchCluster {
	b.Helper()
	var client func() redis.UniversalClient
	if redisAddr != "" {
		client = func() redis.UniversalClient { return newRedisClient(redisAddr) }
	}
	spec := benchSpec{topics: []string{benchTopic}, publisher: []int{0}}
	for _, n := range perNode {
		spec.subs = append(spec.subs, []int{n})
	}
	return startBenchHubs(b, client, spec)
}

// startBenchHubs starts a hub for each element of spec.subs, each with
// the Redis broker on a client of its own from client (nil: one hub
// without a broker), and connects their subscribers. Everything is
// closed when b ends.
func startBenchHubs(b *testing.B, client func() redis.UniversalClient, spec benchSpec) *benchCluster {
	b.Helper()
	c := &benchCluster{spec: spec, want: make([]int32, len(spec.topics))}
	b.Cleanup(c.close)
	for range spec.subs {
		n := &benchNode{}
		opts := []tether.HubOption{tether.WithLogger(slog.New(slog.DiscardHandler))}
		if client != nil {
			n.rdb = client()
			n.broker = &countingBroker{Broker: redisbroker.New(n.rdb, redisbroker.WithLogger(slog.New(slog.DiscardHandler)))}
			opts = append(opts, tether.WithBroker(n.broker))
		}
		hub, err := tether.NewHub(opts...)
		if err != nil {
			if n.rdb != nil {
				n.rdb.Close()
			}
			b.Fatal(err)
		}
		n.hub, n.srv = hub, &http.Server{Handler: hub}
		c.nodes = append(c.nodes, n)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		n.url = "ws://" + ln.Addr().String() + "/"
		go n.srv.Serve(ln)
	}
	for i, n := range c.nodes {
		if n.rdb != nil {
			benchWaitLinked(b, n.hub)
		}
		for t, count := range spec.subs[i] {
			if err := c.dial(n.url, i, t, count); err != nil {
				b.Fatalf("node %d, topic %s: %v", i+1, spec.topics[t], err)
			}
			c.want[t] += int32(count)
		}
	}
	return c
}

// benchWaitLinked waits until the hub's broker is linked: a publication
// goes through Redis instead of staying on this node (Stats.LocalOnly).
func benchWaitLinked(b *testing.B, hub *tether.Hub) {
	b.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		before := hub.Stats().LocalOnly
		if err := hub.Publish("bench-probe", []byte(`0`)); err == nil && hub.Stats().LocalOnly == before {
			return
		}
		if time.Now().After(deadline) {
			b.Fatal("the broker did not link to Redis within 10 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// dial connects n subscribers of topic (an index of c.spec.topics) to
// url, 50 at a time, each subscribed (acked) before dial returns.
func (c *benchCluster) dial(url string, node, topic, n int) error {
	ctx, cancel := context.WithTimeout(context.Background(), benchDeadline)
	defer cancel()
	subs := make([]*benchSub, n)
	errs := make(chan error, n)
	sem := make(chan struct{}, 50)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			s, err := dialBenchSub(ctx, url, node, topic, c.spec.topics[topic])
			subs[i] = s
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for _, s := range subs {
		if s != nil {
			c.subs = append(c.subs, s)
			c.wg.Add(1)
			go c.read(s)
		}
	}
	var err error
	for e := range errs {
		err = errors.Join(err, e)
	}
	return err
}

func (c *benchCluster) close() {
	for _, s := range c.subs {
		s.ws.CloseNow()
	}
	c.wg.Wait()
	for _, n := range c.nodes {
		n.srv.Close()
		n.hub.Close()
		if n.rdb != nil {
			n.rdb.Close()
		}
	}
}

// benchSub is one subscriber.
type benchSub struct {
	ws    *websocket.Conn
	node  int
	topic int       // an index of spec.topics
	run   *benchRun // the run next belongs to
	next  int       // index of the next message due in run
}

func dialBenchSub(ctx context.Context, url string, node, topic int, name string) (*benchSub, error) {
	ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{Subprotocols: []string{tether.Subprotocol}})
	if err != nil {
		return nil, err
	}
	if err := ws.Write(ctx, websocket.MessageText, []byte(`{"op":"sub","topic":"`+name+`","id":"1"}`)); err != nil {
		ws.CloseNow()
		return nil, err
	}
	for { // the welcome, then the ack
		_, data, err := ws.Read(ctx)
		if err != nil {
			ws.CloseNow()
			return nil, err
		}
		if bytes.Contains(data, []byte(`"op":"ack"`)) {
			return &benchSub{ws: ws, node: node, topic: topic}, nil
		}
		if bytes.Contains(data, []byte(`"op":"error"`)) {
			ws.CloseNow()
			return nil, fmt.Errorf("sub refused: %s", data)
		}
	}
}

// read reads s's frames into a reused buffer until its conn ends, and
// reports every bench message to the current run.
func (c *benchCluster) read(s *benchSub) {
	defer c.wg.Done()
	buf := make([]byte, 0, 4096)
	for {
		_, r, err := s.ws.Reader(context.Background())
		if err != nil {
			return
		}
		buf = buf[:0]
		for {
			if len(buf) == cap(buf) {
				buf = slices.Grow(buf, cap(buf))
			}
			n, err := r.Read(buf[len(buf):cap(buf)])
			buf = buf[:len(buf)+n]
			if err == io.EOF {
				break
			}
			if err != nil {
				return
			}
		}
		now := time.Now().UnixNano()
		run := c.run.Load()
		if run == nil {
			continue
		}
		counted := false
		for line := range bytes.SplitSeq(buf, []byte("\n")) {
			if t, id, i, ok := parseBenchLine(line); ok && id == run.id {
				run.receive(s, i, time.Duration(now-t))
				if !counted {
					run.frames.Add(1)
					counted = true
				}
			}
		}
	}
}

// benchRun is one run of n publications, message i to topic i % topics.
type benchRun struct {
	id     int64
	n      int
	topics int
	want   []int32          // per topic, its subscribers
	total  int32            // subscribers
	counts []atomic.Int32   // per message, the subscribers that have it
	done   chan struct{}    // a message every subscriber has, one each
	lat    []*benchHist     // per node
	first  [][]atomic.Int64 // per node, per message: the earliest delivery's latency
	frames atomic.Int64     // frames read that held messages of the run
	bad    atomic.Int64     // repeated, skipped or reordered messages
	badMsg atomic.Value     // the first one, as text
}

var benchRunID atomic.Int64

func (c *benchCluster) newRun(n int) *benchRun {
	r := &benchRun{
		id:     benchRunID.Add(1),
		n:      n,
		topics: len(c.spec.topics),
		want:   c.want,
		total:  int32(len(c.subs)),
		counts: make([]atomic.Int32, n),
		done:   make(chan struct{}, n),
	}
	for range c.nodes {
		r.lat = append(r.lat, new(benchHist))
		r.first = append(r.first, make([]atomic.Int64, n))
	}
	return r
}

// receive records that s got message i of r after lat. It runs on s's
// reader.
func (r *benchRun) receive(s *benchSub, i int, lat time.Duration) {
	if s.run != r {
		s.run, s.next = r, s.topic
	}
	if i != s.next || i >= r.n {
		if r.bad.Add(1) == 1 {
			r.badMsg.Store(fmt.Sprintf("a subscriber of node %d got message %d when %d was due", s.node+1, i, s.next))
		}
		if i < s.next || i >= r.n {
			return // repeated: counted once already
		}
	}
	s.next = i + r.topics
	r.lat[s.node].add(lat)
	for f := &r.first[s.node][i]; ; {
		cur := f.Load()
		if cur != 0 && cur <= int64(lat) || f.CompareAndSwap(cur, int64(lat)) {
			break
		}
	}
	if r.counts[i].Add(1) == r.want[i%r.topics] {
		r.done <- struct{}{}
	}
}

func (c *benchCluster) runAll(b *testing.B, modes ...benchMode) {
	for _, m := range modes {
		b.Run(m.name, func(b *testing.B) { c.measure(b, m) })
	}
}

// measure publishes b.N messages, message i to topic i % len(topics) on
// that topic's publisher node, with at most m.inflight outstanding, from
// one goroutine or from m.publishers at once; waits until every
// subscriber has every message of its topic, and reports.
func (c *benchCluster) measure(b *testing.B, m benchMode) {
	run := c.newRun(b.N)
	c.run.Store(run)
	defer c.run.Store(nil)
	before := make([]tether.Stats, len(c.nodes))
	delivered := make([]uint64, len(c.nodes))
	for i, n := range c.nodes {
		before[i] = n.hub.Stats()
		if n.broker != nil {
			delivered[i] = n.broker.delivered.Load()
		}
	}
	redis0 := c.redisSample(b)
	cpu0 := benchCPU()
	b.ResetTimer()
	start := time.Now()
	var paused, publishing time.Duration
	if m.publishers <= 1 {
		paused, publishing = c.publishSerial(b, run, m)
	} else {
		publishing = c.publishConcurrent(b, run, m)
	}
	elapsed := time.Since(start) - paused
	cpu := benchCPU() - cpu0
	b.StopTimer()
	redis1 := c.redisSample(b)
	if n := run.bad.Load(); n > 0 {
		b.Fatalf("%d messages repeated, skipped or reordered; the first: %v", n, run.badMsg.Load())
	}
	for i, n := range c.nodes {
		st := n.hub.Stats()
		if evicted, local := st.Evictions-before[i].Evictions, st.LocalOnly-before[i].LocalOnly; evicted != 0 || local != 0 {
			b.Fatalf("node %d: %d subscribers evicted, %d publications kept local (broker link down)", i+1, evicted, local)
		}
	}
	all := new(benchHist)
	for _, h := range run.lat {
		all.merge(h)
	}
	var deliveries float64
	for i := range b.N {
		deliveries += float64(run.want[i%run.topics])
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(deliveries/elapsed.Seconds(), "deliveries/s")
	b.ReportMetric(float64(cpu.Microseconds())/1000/float64(b.N), "cpu-ms/op")
	b.ReportMetric(deliveries/float64(run.frames.Load()), "msgs/frame")
	b.ReportMetric(ms(publishing)/float64(b.N), "publish-ms")
	b.ReportMetric(ms(all.quantile(0.50)), "p50-ms")
	b.ReportMetric(ms(all.quantile(0.99)), "p99-ms")
	if run.topics == 1 {
		b.ReportMetric(ms(firstMedian(run.first, 0)), "first-p50-ms")
		if len(run.lat) > 1 {
			b.ReportMetric(ms(firstMedian(run.first, 1)), "remote-first-p50-ms")
			b.ReportMetric(ms(run.lat[1].quantile(0.50)), "remote-p50-ms")
			b.ReportMetric(ms(run.lat[1].quantile(0.99)), "remote-p99-ms")
		}
		return
	}
	// Many topics: what each node received over pub/sub, and what Redis
	// spent on it.
	var recv, recvMax float64
	for i, n := range c.nodes {
		if n.broker != nil {
			got := float64(n.broker.delivered.Load()-delivered[i]) / float64(b.N)
			recv += got / float64(len(c.nodes))
			recvMax = max(recvMax, got)
		}
	}
	if c.nodes[0].broker != nil {
		b.ReportMetric(recv, "recv/pub/node")
		b.ReportMetric(recvMax, "max-recv/pub/node")
	}
	if len(redis0) > 0 {
		var cpuUs, scriptUs, calls, maxCalls float64
		for i := range redis0 {
			d := redis1[i].minus(redis0[i])
			cpuUs += d.cpuUs
			scriptUs += d.scriptUs
			calls += d.calls
			maxCalls = max(maxCalls, d.calls)
		}
		b.ReportMetric(cpuUs/float64(b.N), "redis-cpu-us/pub")
		b.ReportMetric(scriptUs/float64(b.N), "script-us/pub")
		b.ReportMetric(maxCalls/calls, "busiest-master-share")
	}
}

// publishSerial publishes from this goroutine, each message once fewer
// than m.inflight are outstanding, after m.pause (not timed). It returns
// the time paused and the time spent in Publish.
func (c *benchCluster) publishSerial(b *testing.B, run *benchRun, m benchMode) (paused, publishing time.Duration) {
	msg := make([]byte, 0, 2*benchSize)
	completed := 0
	await := func() {
		select {
		case <-run.done:
			completed++
		case <-time.After(benchDeadline):
			b.Fatalf("message %d of %d has reached %d of %d subscribers after %v (%d repeated, skipped or reordered: %v)",
				completed, run.n, run.counts[completed].Load(), run.want[completed%run.topics], benchDeadline, run.bad.Load(), run.badMsg.Load())
		}
	}
	for i := range b.N {
		if i-completed >= m.inflight {
			await()
		}
		if m.pause > 0 && i > 0 {
			b.StopTimer()
			time.Sleep(m.pause)
			paused += m.pause
			b.StartTimer()
		}
		t := i % run.topics
		at := time.Now()
		msg = appendBenchMessage(msg[:0], run.id, i, at.UnixNano())
		if err := c.nodes[c.spec.publisher[t]].hub.Publish(c.spec.topics[t], msg); err != nil {
			b.Fatal(err)
		}
		publishing += time.Since(at)
	}
	for completed < b.N {
		await()
	}
	return paused, publishing
}

// publishConcurrent publishes from m.publishers goroutines: goroutine g
// publishes the messages i with i % m.publishers == g, in order, so each
// topic has one publishing goroutine and its messages keep their order
// (m.publishers divides the number of topics). A message is published
// once fewer than m.inflight are outstanding in all. It returns the time
// spent in Publish, summed over the goroutines.
func (c *benchCluster) publishConcurrent(b *testing.B, run *benchRun, m benchMode) time.Duration {
	if run.topics%m.publishers != 0 {
		b.Fatalf("%d publishers for %d topics: they must divide them", m.publishers, run.topics)
	}
	slots := make(chan struct{}, m.inflight) // a token per outstanding message
	stop := make(chan struct{})
	failed := make(chan error, m.publishers)
	var publishing atomic.Int64
	var wg sync.WaitGroup
	for g := range m.publishers {
		wg.Go(func() {
			msg := make([]byte, 0, 2*benchSize)
			for i := g; i < b.N; i += m.publishers {
				select {
				case slots <- struct{}{}:
				case <-stop:
					return
				}
				t := i % run.topics
				at := time.Now()
				msg = appendBenchMessage(msg[:0], run.id, i, at.UnixNano())
				if err := c.nodes[c.spec.publisher[t]].hub.Publish(c.spec.topics[t], msg); err != nil {
					failed <- err
					return
				}
				publishing.Add(int64(time.Since(at)))
			}
		})
	}
	fail := func(format string, args ...any) {
		close(stop)
		wg.Wait()
		b.Fatalf(format, args...)
	}
	for completed := 0; completed < b.N; {
		select {
		case <-run.done:
			completed++
			<-slots
		case err := <-failed:
			fail("publish: %v", err)
		case <-time.After(benchDeadline):
			fail("%d of %d messages reached every subscriber of their topic, none more in %v (%d repeated, skipped or reordered: %v)",
				completed, run.n, benchDeadline, run.bad.Load(), run.badMsg.Load())
		}
	}
	wg.Wait()
	return time.Duration(publishing.Load())
}

// firstMedian returns the median, over the messages, of the earliest
// delivery to a subscriber of node: how long a message takes to get
// there, before the walk over the node's subscribers.
func firstMedian(first [][]atomic.Int64, node int) time.Duration {
	ds := make([]time.Duration, len(first[node]))
	for i := range ds {
		ds[i] = time.Duration(first[node][i].Load())
	}
	slices.Sort(ds)
	return ds[len(ds)/2]
}

// appendBenchMessage appends a message of benchSize bytes:
// {"t":<publish time, ns>,"r":<run>,"i":<index>,"p":"xxx..."}.
func appendBenchMessage(dst []byte, run int64, i int, t int64) []byte {
	dst = append(dst, `{"t":`...)
	dst = strconv.AppendInt(dst, t, 10)
	dst = append(dst, `,"r":`...)
	dst = strconv.AppendInt(dst, run, 10)
	dst = append(dst, `,"i":`...)
	dst = strconv.AppendInt(dst, int64(i), 10)
	dst = append(dst, `,"p":"`...)
	for len(dst) < benchSize-2 {
		dst = append(dst, 'x')
	}
	return append(dst, `"}`...)
}

// parseBenchLine reads t, r and i from a msg line of the bench topic:
// {"op":"msg",...,"data":{"t":<t>,"r":<r>,"i":<i>,...}}.
func parseBenchLine(line []byte) (t, run int64, i int, ok bool) {
	at := bytes.Index(line, []byte(`"data":{"t":`))
	if at < 0 {
		return 0, 0, 0, false
	}
	rest := line[at+len(`"data":{`):]
	var v [3]int64
	for k, key := range []string{`"t":`, `,"r":`, `,"i":`} {
		if !bytes.HasPrefix(rest, []byte(key)) {
			return 0, 0, 0, false
		}
		rest = rest[len(key):]
		end := bytes.IndexByte(rest, ',')
		if end < 0 {
			return 0, 0, 0, false
		}
		n, err := strconv.ParseInt(string(rest[:end]), 10, 64)
		if err != nil {
			return 0, 0, 0, false
		}
		v[k], rest = n, rest[end:]
	}
	return v[0], v[1], int(v[2]), true
}

// benchHist is a histogram of latencies in 10 µs buckets up to 5 s (the
// last bucket holds everything above), safe for concurrent use.
type benchHist struct {
	buckets [500_000]atomic.Uint64
	count   atomic.Uint64
}

const benchBucket = 10 * time.Microsecond

func (h *benchHist) add(d time.Duration) {
	h.buckets[min(max(int(d/benchBucket), 0), len(h.buckets)-1)].Add(1)
	h.count.Add(1)
}

func (h *benchHist) merge(o *benchHist) {
	for i := range o.buckets {
		if n := o.buckets[i].Load(); n > 0 {
			h.buckets[i].Add(n)
		}
	}
	h.count.Add(o.count.Load())
}

// quantile returns the upper bound of the bucket holding quantile q.
func (h *benchHist) quantile(q float64) time.Duration {
	total := h.count.Load()
	if total == 0 {
		return 0
	}
	rank := uint64(q*float64(total-1)) + 1
	var seen uint64
	for i := range h.buckets {
		seen += h.buckets[i].Load()
		if seen >= rank {
			return time.Duration(i+1) * benchBucket
		}
	}
	return time.Duration(len(h.buckets)) * benchBucket
}

// benchCPU returns the CPU time this process has used, user and system:
// the hubs and the subscribers, not redis-server.
func benchCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
