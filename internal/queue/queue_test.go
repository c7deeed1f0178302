package queue

import (
	"fmt"
	"testing"
)

func msg(i int) []byte { return []byte(fmt.Sprintf("m%03d", i)) } // 4 bytes

// Messages come out in order across chunk boundaries, and the queue's
// length follows every push and pop.
func TestQueueOrder(t *testing.T) {
	var q Queue
	const n = 3*queueChunkLen + 5
	for i := range n {
		if dropped, ok := q.Push(msg(i), n, 4*n, false); !ok || dropped != 0 {
			t.Fatalf("push %d: ok %v, dropped %d", i, ok, dropped)
		}
	}
	if m, b := q.Len(); m != n || b != 4*n {
		t.Fatalf("Len = %d, %d; want %d, %d", m, b, n, 4*n)
	}
	var seen int
	q.Each(func(m []byte) bool {
		if string(m) != string(msg(seen)) {
			t.Fatalf("Each %d: %q", seen, m)
		}
		seen++
		return seen < 20
	})
	if seen != 20 {
		t.Fatalf("Each did not stop when told: %d", seen)
	}
	for i := range n {
		if p, ok := q.Peek(); !ok || string(p) != string(msg(i)) {
			t.Fatalf("peek %d: %q %v", i, p, ok)
		}
		if m, ok := q.Pop(); !ok || string(m) != string(msg(i)) {
			t.Fatalf("pop %d: %q %v", i, m, ok)
		}
	}
	if _, ok := q.Pop(); ok {
		t.Fatal("pop from an empty queue")
	}
	if q.head != nil || q.tail != nil {
		t.Fatal("a drained queue holds a chunk")
	}
}

// The bounds hold in messages and in bytes; without dropOldest a message
// that does not fit is refused, with it the oldest make room.
func TestQueueBounds(t *testing.T) {
	var q Queue
	for i := range 3 {
		q.Push(msg(i), 3, 100, false)
	}
	if _, ok := q.Push(msg(3), 3, 100, false); ok {
		t.Fatal("a fourth message past a bound of 3")
	}
	if dropped, ok := q.Push(msg(3), 3, 100, true); !ok || dropped != 1 {
		t.Fatalf("drop oldest: ok %v, dropped %d", ok, dropped)
	}
	if m, _ := q.Peek(); string(m) != "m001" {
		t.Fatalf("oldest after a drop is %q", m)
	}
	if dropped, ok := q.Push(make([]byte, 10), 10, 12, true); !ok || dropped != 3 {
		t.Fatalf("byte bound: ok %v, dropped %d", ok, dropped)
	}
	if _, ok := q.Push(make([]byte, 13), 10, 12, true); ok {
		t.Fatal("a message larger than the byte bound was queued")
	}
	q.Reset()
	if m, b := q.Len(); m != 0 || b != 0 || q.head != nil {
		t.Fatalf("after Reset: %d messages, %d bytes", m, b)
	}
}

// Replace swaps the message pushed with a key, in its place, across chunk
// boundaries, and keeps the byte count right; a key never pushed, or
// popped already, is not found.
func TestQueueReplace(t *testing.T) {
	var q Queue
	const n = 2*queueChunkLen + 3
	for i := range n {
		q.PushKey(msg(i), uint64(i%5)) // keys 1..4 repeat; 0 is none
	}
	if !q.Replace(3, []byte("new-three")) {
		t.Fatal("key 3 not found")
	}
	if _, b := q.Len(); b != 4*n+len("new-three")-4 {
		t.Fatalf("bytes %d after Replace, want %d", b, 4*n+5)
	}
	q.PushKey(msg(99), 42)
	if !q.Replace(42, []byte("x")) || q.Replace(7, nil) {
		t.Fatal("Replace found the wrong keys")
	}
	var got []string
	q.Each(func(m []byte) bool { got = append(got, string(m)); return true })
	if got[3] != "new-three" || got[8] != string(msg(8)) || got[n] != "x" {
		t.Fatalf("after Replace: %q", got)
	}
	for range 4 {
		q.Pop()
	}
	if q.Replace(3, []byte("again")) != true { // the next 3 is at index 8
		t.Fatal("the second message of key 3 not found")
	}
	if got, _ := q.Pop(); string(got) != string(msg(4)) {
		t.Fatalf("pop %q", got)
	}
}
