package redisbroker_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tether-ws/tether/redisbroker"
	"github.com/tether-ws/tether/redisbroker/internal/redistest"
)

// Three nodes on one Redis and on a Redis Cluster, many topics; and what
// a sharded publication costs a Redis master per subscribing node.
//
//	go test -run '^$' -bench ThreeNodes -benchtime 3000x -v       # ~40 s on 2 cores
//	go test -run '^$' -bench SPublishFanout -benchtime 5000x       # ~8 s
//
// BenchmarkThreeNodes/redis=single|cluster-1|cluster-3: three hubs on the
// same backend: one redis-server, or a Redis Cluster of 1 or 3 masters
// (no replicas: they would only add replication). 300 topics; each is
// held by two of the three nodes (topic t not by node (t+t/3)%3), with 4
// subscribers on each, so a node holds 200 topics with 800 subscribers
// (2,400 in all) and a publication has 8 deliveries. Topic t is
// published by node t%3, so every node publishes, a third of the time to
// a topic it does not hold. Message i goes to topic i%300.
//
// Modes (see benchMode): paced, one message at a time from one goroutine
// (the node of its topic), 2 ms apart once the previous one has reached
// all its subscribers; pubs=3,inflight=64, one publishing goroutine per
// node and 64 messages outstanding in all; pubs=30,inflight=512, ten per
// node and 512 outstanding, which keeps the machine saturated. Each topic
// has one publishing goroutine, so its messages keep their order, which
// every subscriber checks.
//
// Reported besides BenchmarkCrossNode's figures (no first- and remote-
// ones: there is no single publishing node): recv/pub/node, the topic
// messages a node received over pub/sub per publication, averaged over
// the nodes (max-: the node that received most), counted where the
// broker hands them to its hub; with sharded pub/sub and subscriptions
// per held topic, it is 2/3 here (a node holds 2 topics of 3), not 1.
// redis-cpu-us/pub: the CPU time (user + system, INFO cpu) of every
// redis-server of the backend per publication, all masters together;
// script-us/pub: the time Redis spent running the publish script
// (commandstats of EVALSHA and EVAL: the numbering, the stream, the
// SPUBLISH, not the socket reads and writes); busiest-master-share: the
// share of the scripts that the busiest master ran (1 for one master,
// about 1/3 for three).
//
// BenchmarkSPublishFanout/nodes=N: one redis-server; N go-redis
// connections (as N nodes would have) SSUBSCRIBE one channel, each read
// by a goroutine; one op is one SPUBLISH of a 100-byte payload (a topic
// message's size on the channel) delivered to all N. paced: one at a
// time, the next once all N have the previous; pubs=8,inflight=256:
// eight publishing goroutines, 256 outstanding. redis-cpu-us/op is
// redis-server's CPU per SPUBLISH: per-subscriber cost is its slope in N.
//
// Everything shares the machine's cores: redis-servers, hubs and
// subscribers.

const (
	threeNodeCount  = 3
	threeTopicCount = 300
	threeSubs       = 4 // per topic, on each node that holds it
)

var threeModes = []benchMode{
	{name: "paced", inflight: 1, pause: 2 * time.Millisecond},
	{name: "pubs=3,inflight=64", inflight: 64, publishers: 3},
	{name: "pubs=30,inflight=512", inflight: 512, publishers: 30},
}

// threeNodeSpec is BenchmarkThreeNodes's layout.
func threeNodeSpec() benchSpec {
	spec := benchSpec{subs: make([][]int, threeNodeCount)}
	for t := range threeTopicCount {
		spec.topics = append(spec.topics, fmt.Sprintf("room-%03d", t))
		spec.publisher = append(spec.publisher, t%threeNodeCount)
		for n := range threeNodeCount {
			count := threeSubs
			if n == (t+t/threeNodeCount)%threeNodeCount {
				count = 0
			}
			spec.subs[n] = append(spec.subs[n], count)
		}
	}
	return spec
}

// benchBackend is a Redis for the hubs: a client for each, and the
// addresses of its masters.
type benchBackend struct {
	name    string
	masters int // 0: one redis-server, not a cluster
}

func (be benchBackend) start(b *testing.B) (client func() redis.UniversalClient, masters []string) {
	b.Helper()
	if be.masters == 0 {
		s := redistest.Start(b)
		return func() redis.UniversalClient { return newRedisClient(s.Addr()) }, []string{s.Addr()}
	}
	c := redistest.StartCluster(b, be.masters, 0)
	for _, m := range c.Masters(b) {
		masters = append(masters, m.Addr())
	}
	return func() redis.UniversalClient { return newClusterClient(c.Addrs()) }, masters
}

func BenchmarkThreeNodes(b *testing.B) {
	for _, be := range []benchBackend{{"single", 0}, {"cluster-1", 1}, {"cluster-3", 3}} {
		b.Run("redis="+be.name, func(b *testing.B) {
			client, masters := be.start(b)
			c := startBenchHubs(b, client, threeNodeSpec())
			c.watch(b, masters)
			c.logSubscriptions(b)
			c.runAll(b, threeModes...)
		})
	}
}

// watch opens a client of each master for redisSample, closed when b
// ends.
func (c *benchCluster) watch(b *testing.B, masters []string) {
	for _, addr := range masters {
		rdb := newRedisClient(addr)
		b.Cleanup(func() { rdb.Close() })
		c.masters = append(c.masters, rdb)
	}
}

// logSubscriptions logs, from Redis, how many nodes subscribe to each
// topic's channel (PUBSUB SHARDNUMSUB on the channel's master) and how
// many shard channels each master serves (INFO pubsubshard_channels):
// that the topics spread over the masters, each to the nodes holding it.
func (c *benchCluster) logSubscriptions(b *testing.B) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rdb := c.nodes[0].rdb
	var subs int64
	for _, topic := range c.spec.topics {
		ch := redisbroker.KeyOf("t", topic)
		var on redis.UniversalClient = rdb
		if cl, ok := rdb.(*redis.ClusterClient); ok {
			m, err := cl.MasterForKey(ctx, ch)
			if err != nil {
				b.Fatal(err)
			}
			on = m
		}
		n, err := on.PubSubShardNumSub(ctx, ch).Result()
		if err != nil {
			b.Fatalf("PUBSUB SHARDNUMSUB: %v", err)
		}
		subs += n[ch]
	}
	var perMaster []string
	for _, m := range c.masters {
		info, err := m.Info(ctx, "stats").Result()
		if err != nil {
			b.Fatal(err)
		}
		perMaster = append(perMaster, infoValue(info, "pubsubshard_channels"))
	}
	b.Logf("node subscriptions per topic channel: %.2f (SHARDNUMSUB, %d topics); shard channels per master: %s",
		float64(subs)/float64(len(c.spec.topics)), len(c.spec.topics), strings.Join(perMaster, ", "))
}

// redisCounters are a redis-server's CPU time and publish scripts.
type redisCounters struct {
	cpuUs    float64 // used_cpu_user + used_cpu_sys, µs
	scriptUs float64 // time in EVALSHA and EVAL, µs
	calls    float64 // EVALSHA and EVAL calls
}

func (a redisCounters) minus(o redisCounters) redisCounters {
	return redisCounters{a.cpuUs - o.cpuUs, a.scriptUs - o.scriptUs, a.calls - o.calls}
}

// redisSample reads the counters of every master c watches (none: nil).
func (c *benchCluster) redisSample(b *testing.B) []redisCounters {
	var out []redisCounters
	for _, m := range c.masters {
		out = append(out, readRedisCounters(b, m))
	}
	return out
}

func readRedisCounters(b *testing.B, rdb *redis.Client) redisCounters {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := rdb.Info(ctx, "cpu", "commandstats").Result()
	if err != nil {
		b.Fatalf("INFO: %v", err)
	}
	var r redisCounters
	for _, f := range []string{"used_cpu_user", "used_cpu_sys"} {
		v, _ := strconv.ParseFloat(infoValue(info, f), 64)
		r.cpuUs += v * 1e6
	}
	for _, cmd := range []string{"cmdstat_evalsha", "cmdstat_eval"} {
		// calls=N,usec=N,usec_per_call=F,...
		for kv := range strings.SplitSeq(infoValue(info, cmd), ",") {
			k, v, _ := strings.Cut(kv, "=")
			n, _ := strconv.ParseFloat(v, 64)
			switch k {
			case "calls":
				r.calls += n
			case "usec":
				r.scriptUs += n
			}
		}
	}
	return r
}

// infoValue returns a field of an INFO reply, "" when absent.
func infoValue(info, name string) string {
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+":"); ok {
			return v
		}
	}
	return ""
}

const fanoutChannel = "fanout"

func BenchmarkSPublishFanout(b *testing.B) {
	srv := redistest.Start(b)
	for _, nodes := range []int{1, 10, 100} {
		b.Run(fmt.Sprintf("nodes=%d", nodes), func(b *testing.B) {
			f := startFanout(b, srv.Addr(), nodes)
			b.Run("paced", func(b *testing.B) { f.measure(b, 1, 1) })
			b.Run("pubs=8,inflight=256", func(b *testing.B) { f.measure(b, 8, 256) })
		})
	}
}

// fanout is subscribers of fanoutChannel, one connection each, counting
// what they read.
type fanout struct {
	pub  *redis.Client
	info *redis.Client
	subs []*redis.PubSub
	wg   sync.WaitGroup
	run  atomic.Pointer[fanoutRun]
}

// fanoutRun counts, per message in the order Redis sent them, the
// subscribers that have it.
type fanoutRun struct {
	counts []atomic.Int32
	want   int32
	done   chan struct{}
}

func startFanout(b *testing.B, addr string, n int) *fanout {
	b.Helper()
	f := &fanout{pub: newRedisClient(addr), info: newRedisClient(addr)}
	b.Cleanup(func() {
		for _, ps := range f.subs {
			ps.Close()
		}
		f.wg.Wait()
		f.pub.Close()
		f.info.Close()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range n {
		ps := f.pub.SSubscribe(ctx, fanoutChannel) // a connection of its own
		if _, err := ps.Receive(ctx); err != nil { // the confirmation
			ps.Close()
			b.Fatalf("SSUBSCRIBE: %v", err)
		}
		f.subs = append(f.subs, ps)
		f.wg.Go(func() {
			next := 0 // messages read in this run
			var cur *fanoutRun
			for {
				msg, err := ps.Receive(context.Background())
				if err != nil {
					return
				}
				if _, ok := msg.(*redis.Message); !ok {
					continue
				}
				r := f.run.Load()
				if r == nil {
					continue
				}
				if r != cur {
					cur, next = r, 0
				}
				if next < len(r.counts) && r.counts[next].Add(1) == r.want {
					r.done <- struct{}{}
				}
				next++
			}
		})
	}
	return f
}

// measure publishes b.N messages from publishers goroutines, at most
// inflight outstanding, and reports redis-server's CPU per message.
func (f *fanout) measure(b *testing.B, publishers, inflight int) {
	r := &fanoutRun{counts: make([]atomic.Int32, b.N), want: int32(len(f.subs)), done: make(chan struct{}, b.N)}
	f.run.Store(r)
	defer f.run.Store(nil)
	payload := "m" + strings.Repeat("e", 16) + ":123456:" + strings.Repeat("x", 76) // 100 bytes
	slots := make(chan struct{}, inflight)
	var left atomic.Int64
	left.Store(int64(b.N))
	stop := make(chan struct{})
	failed := make(chan error, publishers)
	var wg sync.WaitGroup
	before := readRedisCounters(b, f.info)
	b.ResetTimer()
	start := time.Now()
	for range publishers {
		wg.Go(func() {
			for left.Add(-1) >= 0 {
				select {
				case slots <- struct{}{}:
				case <-stop:
					return
				}
				if err := f.pub.SPublish(context.Background(), fanoutChannel, payload).Err(); err != nil {
					failed <- err
					return
				}
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
		case <-r.done:
			completed++
			<-slots
		case err := <-failed:
			fail("SPUBLISH: %v", err)
		case <-time.After(benchDeadline):
			fail("%d of %d messages reached all %d subscribers, none more in %v", completed, b.N, len(f.subs), benchDeadline)
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	wg.Wait()
	d := readRedisCounters(b, f.info).minus(before)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(float64(b.N)*float64(len(f.subs))/elapsed.Seconds(), "deliveries/s")
	b.ReportMetric(d.cpuUs/float64(b.N), "redis-cpu-us/op")
}
