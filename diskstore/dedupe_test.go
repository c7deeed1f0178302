package diskstore_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/diskstore"
)

// deduper is the store's history as the hub sees it when it looks for an
// adapter.Deduper (dedupe.go of the hub, sharedDeduper).
func deduper(t testing.TB, st *diskstore.Store) adapter.Deduper {
	t.Helper()
	d, ok := st.History().(adapter.Deduper)
	if !ok {
		t.Fatal("the store's History is not an adapter.Deduper")
	}
	return d
}

// once calls d.Once and fails the test on an error.
func once(t testing.TB, d adapter.Deduper, key string, ttl time.Duration) bool {
	t.Helper()
	first, err := d.Once(context.Background(), key, ttl)
	if err != nil {
		t.Fatalf("Once(%q): %v", key, err)
	}
	return first
}

func TestDeduper(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := deduper(t, open(t, tempPath(t)))
		ctx := context.Background()
		if !once(t, d, "ann\x00id-1", time.Minute) {
			t.Fatal("first Once: not new")
		}
		if once(t, d, "ann\x00id-1", time.Minute) {
			t.Fatal("second Once within the ttl: new")
		}
		if !once(t, d, "bob\x00id-1", time.Minute) {
			t.Fatal("Once of another key: not new")
		}
		// Forgotten: new again, whether it reached the disk or not.
		if err := d.Forget(ctx, "ann\x00id-1"); err != nil {
			t.Fatal(err)
		}
		if !once(t, d, "ann\x00id-1", time.Minute) {
			t.Fatal("Once after Forget: not new")
		}
		time.Sleep(time.Second) // on disk by now
		if once(t, d, "ann\x00id-1", time.Minute) {
			t.Fatal("Once of a key on disk: new")
		}
		if err := d.Forget(ctx, "ann\x00id-1"); err != nil {
			t.Fatal(err)
		}
		if !once(t, d, "ann\x00id-1", time.Minute) {
			t.Fatal("Once after Forget of a key on disk: not new")
		}
		if err := d.Forget(ctx, "never seen"); err != nil {
			t.Fatalf("Forget of an unknown key: %v", err)
		}
		// Past the ttl, a key is new again.
		time.Sleep(time.Minute + time.Second)
		if !once(t, d, "bob\x00id-1", time.Minute) {
			t.Fatal("Once past the ttl: not new")
		}
		if once(t, d, "bob\x00id-1", time.Minute) {
			t.Fatal("Once of the key recorded again: new")
		}
		// ttl <= 0 records nothing.
		for range 2 {
			if !once(t, d, "zero", 0) {
				t.Fatal("Once with no ttl: not new")
			}
		}
	})
}

// TestDeduperReopen checks that keys survive a Close and an Open, those
// written with a write and those that waited for none, and that they
// still expire.
func TestDeduperReopen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		path := tempPath(t)
		st, err := diskstore.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		d := deduper(t, st)
		once(t, d, "with-a-write", time.Minute)
		appendAll(t, st.History(), "topic", "m")
		once(t, d, "alone", time.Minute)
		once(t, d, "at-close", time.Minute) // written by Close
		if err := st.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Once(context.Background(), "after-close", time.Minute); err == nil {
			t.Error("Once after Close: no error")
		}

		d = deduper(t, open(t, path))
		for _, k := range []string{"with-a-write", "alone", "at-close"} {
			if once(t, d, k, time.Minute) {
				t.Errorf("%s: new after a reopen", k)
			}
		}
		time.Sleep(2 * time.Minute)
		if !once(t, d, "alone", time.Minute) {
			t.Error("a key past its ttl after a reopen: not new")
		}
	})
}

// TestDeduperConcurrent checks that of many Onces of one key at once,
// one is new.
func TestDeduperConcurrent(t *testing.T) {
	d := deduper(t, open(t, tempPath(t)))
	for round := range 20 {
		key := fmt.Sprintf("key-%d", round)
		var firsts atomic.Int32
		var wg sync.WaitGroup
		for range 16 {
			wg.Go(func() {
				if first, err := d.Once(context.Background(), key, time.Minute); err != nil {
					t.Error(err)
				} else if first {
					firsts.Add(1)
				}
			})
		}
		wg.Wait()
		if n := firsts.Load(); n != 1 {
			t.Fatalf("%s: %d Onces of 16 new, want 1", key, n)
		}
	}
}
