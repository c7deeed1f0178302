package park

// frameTracker follows WebSocket frame boundaries in the bytes read from a
// client, from the lengths in the headers alone, so that the reader knows
// when parking loses nothing. It never judges a frame: coder/websocket does.
type frameTracker struct {
	hdr  [14]byte // the header being collected
	hn   int      // its bytes so far
	left int64    // payload bytes of the current frame still to come
	// inMessage: a data frame without FIN has been seen and its final
	// continuation has not; the message reader must not be interrupted.
	inMessage bool
}

// atBoundary: between messages, nothing of a frame pending.
func (t *frameTracker) atBoundary() bool {
	return t.frameDone() && !t.inMessage
}

// frameDone: between frames.
func (t *frameTracker) frameDone() bool { return t.hn == 0 && t.left == 0 }

func (t *frameTracker) feed(b []byte) {
	for len(b) > 0 {
		if t.left > 0 {
			k := min(int64(len(b)), t.left)
			t.left -= k
			b = b[k:]
			continue
		}
		t.hdr[t.hn] = b[0]
		t.hn++
		b = b[1:]
		if t.hn < 2 || t.hn < t.headerLen() {
			continue
		}
		t.left = t.payloadLen()
		if op := t.hdr[0] & 0x0f; op < 0x8 { // data or continuation, not control
			t.inMessage = t.hdr[0]&0x80 == 0
		}
		t.hn = 0
	}
}

// headerLen is the header's full length, once its first two bytes are in.
func (t *frameTracker) headerLen() int {
	n := 2
	switch t.hdr[1] & 0x7f {
	case 126:
		n += 2
	case 127:
		n += 8
	}
	if t.hdr[1]&0x80 != 0 {
		n += 4 // masking key
	}
	return n
}

func (t *frameTracker) payloadLen() int64 {
	switch l := t.hdr[1] & 0x7f; l {
	case 126:
		return int64(t.hdr[2])<<8 | int64(t.hdr[3])
	case 127:
		var v uint64
		for _, b := range t.hdr[2:10] {
			v = v<<8 | uint64(b)
		}
		// RFC 6455 keeps the top bit clear; coder/websocket rejects such a
		// frame and ends the conn. Until then, nothing here is a boundary.
		return int64(min(v, 1<<62))
	default:
		return int64(l)
	}
}
