package tether

import (
	"errors"
	"net"
	"sync/atomic"
)

// An idle accepted conn gives its reader goroutine up. Most of what a
// connection costs while it waits is that goroutine's stack (4 KiB, as
// coder/websocket's read path outgrows the first 2 KiB) and the garbage its
// wakeups leave; a server holding many quiet conns pays it per conn. So when
// the reader finds nothing to read between two messages, it registers the
// socket with a poller shared by every conn (epoll on Linux) and returns;
// the poller starts a new reader when bytes arrive. Nothing is read ahead
// and nothing is parsed twice: coder/websocket still reads every byte.
//
// Parking happens only where nothing can be lost: between frames, outside
// a fragmented message, with coder/websocket's buffer empty (it reads from
// the socket only then), on a plain TCP socket (TLS buffers records of its
// own), and only on a read the reader itself asked for, not on the one
// coder/websocket's Close makes to wait for the close handshake.

// errParked ends a read that found nothing to read at a frame boundary. It
// never leaves the package: the reader parks on it.
var errParked = errors.New("tether: reader parked")

// Reader states of a parking conn.
const (
	readerRunning int32 = iota
	readerParked
)

// parkConn sits between coder/websocket's read buffer and the socket.
type parkConn struct {
	net.Conn
	prefix []byte // bytes the client sent right behind its handshake

	frames frameTracker // read side only: the reader or Close's handshake
	// mayPark is set by the reader around its reads: a read that finds the
	// socket empty at a frame boundary then returns errParked.
	mayPark atomic.Bool
	state   atomic.Int32 // readerRunning or readerParked
	off     bool         // parking failed once: this conn reads with a goroutine

	wake func() // starts a reader; set by the conn before its first read
	reg  pollReg
}

func (pc *parkConn) Read(b []byte) (int, error) {
	if len(pc.prefix) > 0 {
		n := copy(b, pc.prefix)
		pc.prefix = pc.prefix[n:]
		pc.frames.feed(b[:n])
		return n, nil
	}
	if len(b) > 0 && pc.mayPark.Load() && pc.frames.atBoundary() {
		n, err := pc.readNow(b)
		if errors.Is(err, errWouldBlock) {
			return 0, errParked
		}
		pc.frames.feed(b[:max(n, 0)])
		return n, err
	}
	n, err := pc.Conn.Read(b)
	pc.frames.feed(b[:max(n, 0)])
	return n, err
}

// Close releases the conn's place in the poller along with the socket.
func (pc *parkConn) Close() error {
	err := pc.Conn.Close()
	pc.reg.release()
	return err
}

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

func (t *frameTracker) atBoundary() bool {
	return t.hn == 0 && t.left == 0 && !t.inMessage
}

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

// parkReader is called by the reader after a read returned errParked. It
// registers the socket with the poller and reports whether the reader must
// return: true when it parked, or when another reader has already taken
// over; false when this one must read on (the conn is ending, or the
// poller refused the socket).
func (c *Conn) parkReader() bool {
	pc := c.park
	pc.state.Store(readerParked)
	// end sets Closed before it unparks: one of the two sees the other.
	if c.hb.state.Load() != int32(Closed) {
		err := pc.reg.arm(pc)
		if err == nil {
			return true
		}
		if !errors.Is(err, net.ErrClosed) {
			c.cfg.logger.Debug("tether: reading without parking", "remote", c.remote, "err", err)
			pc.off = true
		}
	}
	return !pc.state.CompareAndSwap(readerParked, readerRunning)
}

// unpark starts a reader for a parked conn; it does nothing for a conn
// whose reader runs.
func (c *Conn) unpark() {
	if pc := c.park; pc != nil && pc.state.CompareAndSwap(readerParked, readerRunning) {
		go c.readLoop()
	}
}
