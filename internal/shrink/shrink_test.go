package shrink

import (
	"runtime"
	"testing"
)

func heap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// A map that held 100,000 entries and holds 10 gives its room back, and
// keeps its entries; a small one is left alone.
func TestMapGivesRoomBack(t *testing.T) {
	before := heap()
	m := map[int][64]byte{}
	var p Peak
	for i := range 100000 {
		m[i] = [64]byte{}
		p.Grew(len(m))
	}
	full := heap()
	for i := range 100000 - 10 {
		delete(m, i)
		m = Map(m, &p)
	}
	after := heap()
	if len(m) != 10 {
		t.Fatalf("%d entries left, want 10", len(m))
	}
	for i := 100000 - 10; i < 100000; i++ {
		if _, ok := m[i]; !ok {
			t.Fatalf("entry %d lost", i)
		}
	}
	if grown, kept := full-before, int64(after)-int64(before); kept > int64(grown)/10 {
		t.Errorf("the map held %d bytes at its peak and %d after, want under a tenth", grown, kept)
	}

	small := map[int]int{1: 1, 2: 2}
	var sp Peak
	sp.Grew(2)
	delete(small, 1)
	if got := Map(small, &sp); len(got) != 1 {
		t.Fatal("a small map changed")
	}
}
