package diskstore

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// BenchmarkCommit compares ways to group writes into commits, each write
// one Put of 64 bytes, by conc goroutines at once, with an fsync at each
// commit:
//
//   - committer, the store's: the calls queued while a commit runs go
//     into the next one, which starts as soon as it is done;
//   - batch-10ms and batch-1ms: bbolt's DB.Batch with MaxBatchDelay 10 ms
//     (its default) and 1 ms: a batch waits for that delay, or for
//     MaxBatchSize (1,000) calls, before it commits;
//   - update: a DB.Update per call, no grouping.
//
// Reported: writes/s and the p99 of one call's latency.
func BenchmarkCommit(b *testing.B) {
	for _, way := range []string{"committer", "batch-10ms", "batch-1ms", "update"} {
		for _, conc := range []int{1, 8, 64} {
			b.Run(fmt.Sprintf("%s/conc=%d", way, conc), func(b *testing.B) {
				st := openInternal(b)
				if way == "batch-1ms" {
					st.db.MaxBatchDelay = time.Millisecond
				}
				bucket := []byte("bench")
				st.db.Update(func(tx *bolt.Tx) error {
					_, err := tx.CreateBucketIfNotExists(bucket)
					return err
				})
				put := func(k uint64) func(tx *bolt.Tx) error {
					return func(tx *bolt.Tx) error {
						return tx.Bucket(bucket).Put(u64(k), benchValue)
					}
				}
				lat := make([][]time.Duration, conc)
				var next atomic.Uint64
				var wg sync.WaitGroup
				b.ResetTimer()
				start := time.Now()
				for g := range conc {
					wg.Go(func() {
						for k := next.Add(1); k <= uint64(b.N); k = next.Add(1) {
							t0 := time.Now()
							var err error
							switch way {
							case "committer":
								err = st.update(context.Background(), put(k))
							case "update":
								err = st.db.Update(put(k))
							default:
								err = st.db.Batch(put(k))
							}
							if err != nil {
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
				var all []time.Duration
				for _, l := range lat {
					all = append(all, l...)
				}
				if len(all) > 0 {
					slices.Sort(all)
					b.ReportMetric(float64(all[len(all)*99/100].Microseconds())/1000, "p99-ms")
				}
				b.ReportMetric(float64(b.N)/elapsed.Seconds(), "writes/s")
			})
		}
	}
}

var benchValue = make([]byte, 64)
