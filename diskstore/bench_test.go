package diskstore_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/diskstore"
)

// The store against the memory history, in the same run:
//
//	go test -run '^$' -bench . -benchtime 3s
//
// BenchmarkAppend times History.Append alone: topics goroutines append
// to a topic each (the hub appends to a topic one call at a time, so
// concurrency comes from topics), 64-byte messages, with the default
// bounds (256 messages, 2 minutes). disk is the default policy (every
// Append on disk when it returns, calls at the same time sharing a
// commit), disk-nosync WithSync(SyncNever). Reported: appends/s over all
// goroutines, and the p50 and p99 of one call's latency.
//
// BenchmarkHubPublish is end to end over loopback: a hub with the store
// (disk; disk-ids-in-memory hides from the hub that the history is a
// Deduper, to show what remembering the publications' ids costs) or
// the memory defaults, 100 subscribers (tether.Clients) of each
// topic, and pubs publishers speaking the protocol over bare WebSockets,
// each publishing to a topic of its own and waiting for each ack before
// the next publication. Reported: acked publications/s, the p50 and p99
// of a publication's ack latency (send to ack), and deliveries/s; every
// subscriber must get every publication.

var benchData = []byte(`{"op":"msg","topic":"room","data":"hello, this is 64 bytes.."}`)

func BenchmarkAppend(b *testing.B) {
	for _, kind := range []string{"memory", "disk", "disk-nosync"} {
		for _, topics := range []int{1, 8, 64} {
			b.Run(fmt.Sprintf("%s/topics=%d", kind, topics), func(b *testing.B) {
				var h adapter.History
				switch kind {
				case "memory":
					h = adapter.NewMemoryHistory(256, 2*time.Minute)
				case "disk":
					h = open(b, tempPath(b)).History()
				case "disk-nosync":
					h = open(b, tempPath(b), diskstore.WithSync(diskstore.SyncNever)).History()
				}
				ctx := context.Background()
				lat := make([][]time.Duration, topics)
				var next atomic.Int64
				var wg sync.WaitGroup
				b.ResetTimer()
				start := time.Now()
				for g := range topics {
					wg.Go(func() {
						topic := fmt.Sprintf("topic-%d", g)
						for next.Add(1) <= int64(b.N) {
							t0 := time.Now()
							if _, err := h.Append(ctx, topic, benchData); err != nil {
								b.Error(err)
								return
							}
							lat[g] = append(lat[g], time.Since(t0))
						}
					})
				}
				wg.Wait()
				elapsed := time.Since(start)
				b.StopTimer()
				reportLatency(b, slices.Concat(lat...), "")
				b.ReportMetric(float64(b.N)/elapsed.Seconds(), "appends/s")
			})
		}
	}
}

// reportLatency reports the p50 and p99 of lat, in ms.
func reportLatency(b *testing.B, lat []time.Duration, prefix string) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, prefix+"p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, prefix+"p99-ms")
}

func BenchmarkHubPublish(b *testing.B) {
	const subs = 100
	for _, kind := range []string{"memory", "disk", "disk-ids-in-memory"} {
		for _, pubs := range []int{1, 8} {
			b.Run(fmt.Sprintf("%s/subs=%d/pubs=%d", kind, subs, pubs), func(b *testing.B) {
				var opts []tether.HubOption
				switch kind {
				case "disk":
					opts = helperHubOptions(open(b, tempPath(b)))
				case "disk-ids-in-memory":
					// The history without its Deduper: the hub remembers
					// the publications' ids in memory, as before the
					// store kept them.
					st := open(b, tempPath(b))
					opts = append(helperHubOptions(st), tether.WithHistory(struct{ adapter.History }{st.History()}))
				default:
					// The same without the store: the hub's memory defaults.
					opts = helperHubOptions(nil)
				}
				// Room for a burst of 8 publishers' messages: nobody is
				// evicted.
				opts = append(opts, tether.WithLimits(tether.Limits{SendQueue: 1 << 14, SendQueueBytes: 16 << 20}))
				url := serveHub(b, opts...)

				topics := make([]string, pubs)
				for i := range topics {
					topics[i] = fmt.Sprintf("bench-%d", i)
				}
				var delivered atomic.Int64
				for i := range subs {
					benchSubscriber(b, url+fmt.Sprint(i), topics, &delivered)
				}
				publishers := make([]*rawPublisher, pubs)
				for i := range publishers {
					publishers[i] = newRawPublisher(url + fmt.Sprintf("pub%d", i))
					publishers[i].connect(b)
					defer publishers[i].close()
				}

				lat := make([][]time.Duration, pubs)
				var next atomic.Int64
				var wg sync.WaitGroup
				b.ResetTimer()
				start := time.Now()
				for p, pub := range publishers {
					wg.Go(func() {
						for i := next.Add(1); i <= int64(b.N); i = next.Add(1) {
							t0 := time.Now()
							if !pub.publish(b, topics[p], int(i)) {
								b.Error("publisher lost its conn")
								return
							}
							lat[p] = append(lat[p], time.Since(t0))
						}
					})
				}
				wg.Wait()
				acked := time.Since(start)
				want := int64(b.N) * subs
				for deadline := time.Now().Add(time.Minute); delivered.Load() < want; time.Sleep(time.Millisecond) {
					if time.Now().After(deadline) {
						b.Fatalf("%d deliveries in a minute, want %d", delivered.Load(), want)
					}
				}
				all := time.Since(start)
				b.StopTimer()
				reportLatency(b, slices.Concat(lat...), "ack-")
				b.ReportMetric(float64(b.N)/acked.Seconds(), "acked/s")
				b.ReportMetric(float64(want)/all.Seconds(), "deliveries/s")
			})
		}
	}
}

// serveHub serves a hub with opts on loopback until the benchmark ends,
// and returns its URL, to which a user name is appended.
func serveHub(b *testing.B, opts ...tether.HubOption) string {
	b.Helper()
	hub, err := tether.NewHub(opts...)
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: hub}
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(ln)
	}()
	b.Cleanup(func() {
		srv.Close()
		hub.Close()
		<-served
	})
	return "ws://" + ln.Addr().String() + "/ws?user=u"
}

// benchSubscriber is a tether.Client subscribed to topics that counts
// what it receives.
func benchSubscriber(b *testing.B, url string, topics []string, n *atomic.Int64) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := tether.Dial(ctx, url)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cl.Close() })
	for _, topic := range topics {
		if err := cl.Subscribe(ctx, topic, func(tether.Message) { n.Add(1) }); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAppendOnce times what a publication with an id costs the
// store: Once(user+id, 2 minutes), then Append, as the hub calls them,
// against Append alone; topics goroutines, a topic each, 64-byte
// messages, ids of 32 bytes. Reported as BenchmarkAppend.
func BenchmarkAppendOnce(b *testing.B) {
	for _, kind := range []string{"append", "once+append"} {
		for _, topics := range []int{1, 8, 64} {
			b.Run(fmt.Sprintf("%s/topics=%d", kind, topics), func(b *testing.B) {
				st := open(b, tempPath(b))
				h, d := st.History(), st.History().(adapter.Deduper)
				ctx := context.Background()
				lat := make([][]time.Duration, topics)
				var next atomic.Int64
				var wg sync.WaitGroup
				b.ResetTimer()
				start := time.Now()
				for g := range topics {
					wg.Go(func() {
						topic := fmt.Sprintf("topic-%d", g)
						for i := next.Add(1); i <= int64(b.N); i = next.Add(1) {
							t0 := time.Now()
							if kind == "once+append" {
								key := fmt.Sprintf("user-%d\x00%016x.%d", g, uint64(g)*0x9e3779b97f4a7c15, i)
								if first, err := d.Once(ctx, key, 2*time.Minute); err != nil || !first {
									b.Errorf("Once: %v, %v", first, err)
									return
								}
							}
							if _, err := h.Append(ctx, topic, benchData); err != nil {
								b.Error(err)
								return
							}
							lat[g] = append(lat[g], time.Since(t0))
						}
					})
				}
				wg.Wait()
				elapsed := time.Since(start)
				b.StopTimer()
				reportLatency(b, slices.Concat(lat...), "")
				b.ReportMetric(float64(b.N)/elapsed.Seconds(), "appends/s")
			})
		}
	}
}
