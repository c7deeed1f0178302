package park

import "testing"

// FuzzFrameTracker feeds arbitrary bytes in two chunkings: the state after
// each must agree, whatever the bytes (coder/websocket judges them).
func FuzzFrameTracker(f *testing.F) {
	f.Add([]byte{0x81, 0x85, 1, 2, 3, 4, 'h', 'e', 'l', 'l', 'o'}, uint8(3))
	f.Add([]byte{0x01, 0x81, 0, 0, 0, 0, 'a', 0x89, 0x80, 0, 0, 0, 0, 0x80, 0x81, 0, 0, 0, 0, 'b'}, uint8(1))
	f.Add([]byte{0x82, 0xfe, 0x01, 0x00, 9, 9, 9, 9}, uint8(2))
	f.Add([]byte{0x82, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 1, 9, 9, 9, 9}, uint8(5))
	f.Fuzz(func(t *testing.T, b []byte, step uint8) {
		var whole, chunked frameTracker
		whole.feed(b)
		k := int(step%16) + 1
		for i := 0; i < len(b); i += k {
			chunked.feed(b[i:min(i+k, len(b))])
		}
		if whole != chunked {
			t.Fatalf("state differs by chunking: %+v vs %+v", whole, chunked)
		}
		if whole.left < 0 || whole.hn < 0 || whole.hn >= len(whole.hdr) {
			t.Fatalf("bad state %+v", whole)
		}
	})
}

// The tracker finds the boundaries of frames as RFC 6455 lays them out:
// header, extended length, masking key, payload.
func TestFrameTrackerBoundaries(t *testing.T) {
	frame := func(fin bool, op byte, n int) []byte {
		b := []byte{op}
		if fin {
			b[0] |= 0x80
		}
		switch {
		case n < 126:
			b = append(b, 0x80|byte(n))
		case n < 1<<16:
			b = append(b, 0x80|126, byte(n>>8), byte(n))
		default:
			b = append(b, 0x80|127, 0, 0, 0, 0, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
		}
		b = append(b, 1, 2, 3, 4) // masking key
		return append(b, make([]byte, n)...)
	}
	type step struct {
		bytes    []byte
		boundary bool // after these bytes
	}
	steps := []step{
		{frame(true, 0x1, 5), true},
		{frame(true, 0x2, 300), true},
		{frame(true, 0x2, 70_000), true},
		{frame(false, 0x1, 3), false},   // a message begins
		{frame(true, 0x9, 4), false},    // a ping inside it
		{frame(false, 0x0, 200), false}, // a continuation
		{frame(true, 0x0, 1), true},     // the final one
		{frame(true, 0xA, 0), true},     // a pong between messages
	}
	for _, chunk := range []int{1, 3, 7, 1 << 20} {
		var tr frameTracker
		for i, s := range steps {
			for j := 0; j < len(s.bytes); j += chunk {
				tr.feed(s.bytes[j:min(j+chunk, len(s.bytes))])
				if j+chunk < len(s.bytes) && tr.atBoundary() {
					t.Fatalf("chunk %d, step %d: boundary inside a frame at byte %d", chunk, i, j+chunk)
				}
			}
			if tr.atBoundary() != s.boundary {
				t.Fatalf("chunk %d, step %d: boundary %v, want %v", chunk, i, tr.atBoundary(), s.boundary)
			}
		}
	}
}
