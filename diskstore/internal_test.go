package diskstore

import (
	"bytes"
	"context"
	"path/filepath"
	"strconv"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tether-ws/tether/adapter"
	bolt "go.etcd.io/bbolt"
)

// These tests look into the file: what it holds must stay within the
// bounds, whatever the calls.

func openInternal(t testing.TB, opts ...Option) *Store {
	t.Helper()
	st, err := Open(filepath.Join(t.TempDir(), "tether.db"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// keys counts the keys of each bucket.
func keys(t *testing.T, st *Store) map[string]int {
	t.Helper()
	n := make(map[string]int)
	err := st.db.View(func(tx *bolt.Tx) error {
		for _, b := range allBuckets {
			n[string(b)] = tx.Bucket(b).Stats().KeyN
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func counters(t *testing.T, st *Store) (topics, empty, total uint64) {
	t.Helper()
	err := st.db.View(func(tx *bolt.Tx) error {
		var err error
		if topics, err = counter(tx, keyNTopics); err != nil {
			return err
		}
		if empty, err = counter(tx, keyNEmpty); err != nil {
			return err
		}
		total, err = counter(tx, keyOTotal)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return topics, empty, total
}

// TestFileHistoryBounded checks that the file holds at most the bound of
// messages per topic, that expired messages leave it as the topic goes on,
// and that a forgotten topic's messages are purged, a few per call.
func TestFileHistoryBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Without fsync, for speed: what the file holds is the same.
		st := openInternal(t, WithHistory(10, time.Minute), WithSync(SyncNever))
		defer st.Close()
		h := st.History()
		ctx := context.Background()
		for i := range 400 {
			if _, err := h.Append(ctx, "t"+strconv.Itoa(i%4), []byte("x")); err != nil {
				t.Fatal(err)
			}
		}
		if n := keys(t, st); n["msgs"] != 40 || n["topics"] != 4 || n["hidx"] != 4 || n["hempty"] != 0 {
			t.Errorf("after 400 messages to 4 topics of 10: %v", n)
		}
		if topics, empty, _ := counters(t, st); topics != 4 || empty != 0 {
			t.Errorf("counters: %d topics, %d empty; want 4, 0", topics, empty)
		}

		// Expired messages go as their topic goes on.
		time.Sleep(2 * time.Minute)
		if _, err := h.Append(ctx, "t0", []byte("y")); err != nil {
			t.Fatal(err)
		}
		if n := keys(t, st); n["msgs"] != 31 {
			t.Errorf("after t0's messages expired and one more: %d messages in the file, want 31", n["msgs"])
		}

		// A topic with many messages (a bigger bound before), once idle,
		// is forgotten at once and purged over several calls.
		st.cfg.histMessages = 1000
		for range 600 {
			h.Append(ctx, "big", []byte("x"))
		}
		st.cfg.histMessages = 10
		time.Sleep(2 * time.Hour) // every topic is idle
		h.Append(ctx, "other", []byte("x"))
		n := keys(t, st)
		if n["topics"] != 1 || n["gc"] == 0 || n["msgs"] < 600-purgeBatch {
			t.Errorf("after one call once all is idle: %v; want 1 topic, messages still to purge", n)
		}
		for range 10 {
			h.Append(ctx, "other", []byte("x"))
		}
		if n := keys(t, st); n["msgs"] != 10 || n["gc"] != 0 || n["topics"] != 1 || n["hidx"] != 1 {
			t.Errorf("after 10 more calls: %v; want only other's 10 messages", n)
		}
		if topics, empty, _ := counters(t, st); topics != 1 || empty != 0 {
			t.Errorf("counters: %d topics, %d empty; want 1, 0", topics, empty)
		}
	})
}

// TestFileOfflineBounded checks that taken, pushed out and expired
// messages leave the file, with their index entries and their users'
// records, and the total comes back to 0.
func TestFileOfflineBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := openInternal(t, WithOffline(3, 1000, time.Minute, 1<<20))
		defer st.Close()
		s := st.Offline()
		ctx := context.Background()
		for i := range 100 {
			if err := s.Store(ctx, "u"+strconv.Itoa(i%10), []byte("x")); err != nil {
				t.Fatal(err)
			}
		}
		if n := keys(t, st); n["omsgs"] != 30 || n["oage"] != 30 || n["users"] != 10 {
			t.Errorf("after 100 messages to 10 users of 3: %v", n)
		}
		for i := range 5 {
			if msgs, err := s.Take(ctx, "u"+strconv.Itoa(i)); err != nil || len(msgs) != 3 {
				t.Fatalf("Take: %d messages, %v", len(msgs), err)
			}
		}
		if n := keys(t, st); n["omsgs"] != 15 || n["oage"] != 15 || n["users"] != 5 {
			t.Errorf("after 5 users took theirs: %v", n)
		}
		time.Sleep(2 * time.Minute)
		if err := s.Store(ctx, "late", []byte("y")); err != nil {
			t.Fatal(err)
		}
		if n := keys(t, st); n["omsgs"] != 1 || n["oage"] != 1 || n["users"] != 1 {
			t.Errorf("after the rest expired: %v", n)
		}
		if _, _, total := counters(t, st); total != 1+offlineMsgOverhead+offlineUserOverhead {
			t.Errorf("total %d, want %d", total, 1+offlineMsgOverhead+offlineUserOverhead)
		}
		s.Take(ctx, "late")
		if _, _, total := counters(t, st); total != 0 {
			t.Errorf("total %d once empty, want 0", total)
		}
	})
}

// TestEpochRollover checks that a topic whose seq would reach 2^53 starts
// a new epoch at seq 1, and that the old epoch's messages go.
func TestEpochRollover(t *testing.T) {
	st := openInternal(t, WithHistory(10, time.Minute))
	h := st.History()
	ctx := context.Background()
	pos, err := h.Append(ctx, "t", []byte("a"))
	if err != nil {
		t.Fatal(err)
	}
	// Move the topic to just before the limit.
	err = st.db.Update(func(tx *bolt.Tx) error {
		r, _, err := getTopic(tx, "t")
		if err != nil {
			return err
		}
		r.seq = maxSeq - 1
		return tx.Bucket(bucketTopics).Put(nameKey("t"), r.encode())
	})
	if err != nil {
		t.Fatal(err)
	}
	last, err := h.Append(ctx, "t", []byte("b"))
	if err != nil || last != (adapter.Position{Epoch: pos.Epoch, Seq: maxSeq}) {
		t.Fatalf("Append at 2^53-1: %+v, %v; want {%s %d}", last, err, pos.Epoch, uint64(maxSeq))
	}
	next, err := h.Append(ctx, "t", []byte("c"))
	if err != nil || next.Epoch == pos.Epoch || next.Seq != 1 {
		t.Fatalf("Append past 2^53-1: %+v, %v; want a new epoch at 1", next, err)
	}
	entries, cur, ok, err := h.Since(ctx, "t", adapter.Position{Epoch: next.Epoch})
	if err != nil || !ok || cur != next || len(entries) != 1 || !bytes.Equal(entries[0].Data, []byte("c")) {
		t.Errorf("Since in the new epoch: %v, %+v, ok %v, %v; want [c]", entries, cur, ok, err)
	}
	if _, _, ok, _ := h.Since(ctx, "t", last); ok {
		t.Error("Since in the old epoch: ok; want not ok")
	}
	h.Append(ctx, "t", []byte("d")) // purges the old epoch's messages
	if n := keys(t, st); n["msgs"] != 2 || n["gc"] != 0 {
		t.Errorf("file after the new epoch: %v; want its 2 messages only", n)
	}
}

// TestFileDedupe checks when request ids reach the file: with the first
// write called after Once, or on their own after keyFlushDelay; that the
// file holds at most the bound of them, and that expired ones leave it.
func TestFileDedupe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := openInternal(t, WithSync(SyncNever), WithDedupeCap(100))
		defer st.Close()
		h := st.hist
		ctx := context.Background()
		once := func(key string) {
			t.Helper()
			if first, err := h.Once(ctx, key, time.Minute); err != nil || !first {
				t.Fatalf("Once(%q) = %v, %v; want new", key, first, err)
			}
		}
		dkeys := func() int {
			t.Helper()
			n := keys(t, st)["dexp"]
			st.keys.mu.Lock()
			onDisk := st.keys.onDisk
			st.keys.mu.Unlock()
			if onDisk != n {
				t.Fatalf("%d ids counted on disk, %d in the file", onDisk, n)
			}
			return n
		}
		// The ids known in memory: those on disk, and those on their way.
		known := func() int {
			st.keys.mu.Lock()
			defer st.keys.mu.Unlock()
			return len(st.keys.known)
		}

		// With the next write: the Append of the publication it guards.
		once("k1")
		if n := dkeys(); n != 0 {
			t.Fatalf("%d ids in the file before any write, want 0", n)
		}
		if _, err := h.Append(ctx, "t", []byte("m")); err != nil {
			t.Fatal(err)
		}
		if n := dkeys(); n != 1 {
			t.Fatalf("%d ids in the file once the next Append returned, want 1", n)
		}
		// Alone, after keyFlushDelay.
		once("k2")
		time.Sleep(keyFlushDelay - time.Millisecond)
		if n := dkeys(); n != 1 {
			t.Fatalf("%d ids in the file before the delay, want 1", n)
		}
		time.Sleep(2 * time.Millisecond)
		synctest.Wait()
		if n := dkeys(); n != 2 {
			t.Fatalf("%d ids in the file after the delay, want 2", n)
		}

		// The bound: the oldest go.
		for i := range 250 {
			once("b" + strconv.Itoa(i))
			h.Append(ctx, "t", []byte("m"))
		}
		if n := dkeys(); n != 100 {
			t.Fatalf("%d ids in the file after 252, want the bound, 100", n)
		}
		if n := known(); n != 100 {
			t.Fatalf("%d ids known in memory after 252, want those in the file, 100", n)
		}
		if first, _ := h.Once(ctx, "b0", time.Minute); !first {
			t.Error("the oldest id, pushed out by the bound: not new")
		}
		if first, _ := h.Once(ctx, "b249", time.Minute); first {
			t.Error("the newest id: new")
		}

		// Expired ids leave as new ones come, as many as come and
		// sweepBatch more per commit.
		time.Sleep(2 * time.Minute)
		once("late1")
		h.Append(ctx, "t", []byte("m"))
		if n := dkeys(); n != 101-1-sweepBatch {
			t.Fatalf("%d ids in the file after one commit past the expiry, want %d", n, 101-1-sweepBatch)
		}
		once("late2")
		h.Append(ctx, "t", []byte("m"))
		if n := dkeys(); n != 2 {
			t.Fatalf("%d ids in the file after two commits past the expiry, want 2", n)
		}
		if n := known(); n != 2 {
			t.Fatalf("%d ids known in memory after two commits past the expiry, want 2", n)
		}
	})
}

// TestFileInboxBounded checks that acknowledged and expired messages
// leave the file, with their index entries and their users' records, and
// the total comes back to 0.
func TestFileInboxBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := openInternal(t, WithInbox(10, time.Minute, 1<<20))
		defer st.Close()
		ib := st.Inbox()
		ctx := context.Background()
		epochs := make(map[string]string)
		for i := range 50 {
			user := "u" + strconv.Itoa(i%10)
			pos, err := ib.Append(ctx, user, []byte("x"))
			if err != nil {
				t.Fatal(err)
			}
			epochs[user] = pos.Epoch
		}
		for i := range 5 {
			user := "u" + strconv.Itoa(i)
			if err := ib.Ack(ctx, user, adapter.Position{Epoch: epochs[user], Seq: 5}); err != nil {
				t.Fatal(err)
			}
		}
		if n := keys(t, st); n["imsgs"] != 25 || n["iage"] != 25 || n["iusers"] != 5 {
			t.Errorf("after 5 users of 10 acknowledged their 5: %v", n)
		}
		itotal := func() uint64 {
			var v uint64
			st.db.View(func(tx *bolt.Tx) error {
				v, _ = counter(tx, keyITotal)
				return nil
			})
			return v
		}
		if got := itotal(); got != 25*(1+inboxMsgOverhead) {
			t.Errorf("total %d, want %d", got, 25*(1+inboxMsgOverhead))
		}
		time.Sleep(2 * time.Minute)
		if _, err := ib.Append(ctx, "late", []byte("y")); err != nil {
			t.Fatal(err)
		}
		if n := keys(t, st); n["imsgs"] != 1 || n["iage"] != 1 || n["iusers"] != 1 {
			t.Errorf("after the rest expired: %v", n)
		}
		e, _, _ := ib.Pending(ctx, "late")
		ib.Ack(ctx, "late", adapter.Position{Epoch: e, Seq: 1})
		if n := keys(t, st); n["imsgs"] != 0 || n["iage"] != 0 || n["iusers"] != 0 {
			t.Errorf("once all is acknowledged: %v", n)
		}
		if got := itotal(); got != 0 {
			t.Errorf("total %d once empty, want 0", got)
		}
	})
}
