package tether

import (
	"strconv"
	"testing"
	"time"
)

// A repeat within the window is caught, per user; one after it, or of a
// short id (an older client's count), or forgotten, is not; the oldest go
// first past the bound.
func TestDedupe(t *testing.T) {
	var d dedupe
	t0 := time.Unix(1000, 0)
	id := "abcdefghijklmnop.1" // 18 bytes, as a Client makes them
	if !d.first("ann", id, t0) {
		t.Fatal("a new id taken for a repeat")
	}
	if d.first("ann", id, t0.Add(time.Minute)) {
		t.Error("a repeat within the window not caught")
	}
	if !d.first("bob", id, t0.Add(time.Minute)) {
		t.Error("another user's id taken for a repeat")
	}
	if !d.first("ann", id, t0.Add(dedupeWindow+time.Second)) {
		t.Error("a repeat after the window caught")
	}
	for range 2 {
		if !d.first("ann", "7", t0) {
			t.Error("a short id remembered")
		}
	}
	d.forget("ann", id)
	if !d.first("ann", id, t0.Add(dedupeWindow+2*time.Second)) {
		t.Error("a forgotten id still caught")
	}

	// The bound: the oldest ids go first.
	var b dedupe
	now := t0
	for i := range dedupeMax + 10 {
		if !b.first("", "0123456789abcdef."+strconv.Itoa(i), now) {
			t.Fatalf("id %d taken for a repeat", i)
		}
	}
	if !b.first("", "0123456789abcdef.0", now) {
		t.Error("the oldest id still remembered past the bound")
	}
	if b.first("", "0123456789abcdef."+strconv.Itoa(dedupeMax+9), now) {
		t.Error("the newest id forgotten")
	}
	if n := len(b.seen); n > dedupeMax {
		t.Errorf("%d ids remembered, want at most %d", n, dedupeMax)
	}
}
