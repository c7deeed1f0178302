// Package park lets an idle accepted WebSocket conn give its reader
// goroutine up: it sits between coder/websocket's buffers and the socket,
// parks the reader in one epoll poller shared by every conn, settles the
// pongs of the heartbeat's raw pings on the poller, and writes those pings
// between two frames of the conn. On other systems nothing parks.
package park

import (
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"sync/atomic"
)

// An idle accepted conn gives its reader goroutine up. Most of what a
// connection costs while it waits is that goroutine's stack (4 KiB, as
// coder/websocket's read path outgrows the first 2 KiB) and the garbage its
// wakeups leave; a server holding many quiet conns pays it per conn. So when
// the reader finds nothing to read between two messages, it registers the
// socket with a poller shared by every conn (epoll on Linux) and returns;
// when bytes arrive, the poller settles them itself if they are the pong
// of the heartbeat's ping, and otherwise starts a reader, which reads them
// through coder/websocket as usual.
//
// Parking happens only where nothing can be lost: between frames, outside
// a fragmented message, with coder/websocket's buffer empty (it reads from
// the socket only then), on a plain TCP socket (TLS buffers records of its
// own), and only on a read the reader itself asked for, not on the one
// coder/websocket's Close makes to wait for the close handshake.

// ErrParked ends a read that found nothing to read at a frame boundary:
// the reader then calls [Conn.Park] instead of reporting an error.
var ErrParked = errors.New("tether: reader parked")

// Owner is the conn a parking socket belongs to: what the socket needs of
// it. Its methods are called on the poller, on the heartbeat scheduler or
// on the conn's own reader, and must not block.
type Owner interface {
	// Ending reports whether the conn is ending. An ending conn's reads
	// never park: its close handshake reads too.
	Ending() bool
	// Resume starts a reader goroutine: bytes came for a parked reader, or
	// it must meet the end of its conn.
	Resume()
	// Pong is the payload of a pong frame the poller read, 8 bytes as a
	// big-endian number, which proves the peer alive. It reports whether
	// that was the pong of the raw ping in flight (see [Conn.Ping]) and so
	// is settled; if not, the frame goes to a reader.
	Pong(payload uint64) bool
	// GoWrite runs write on a goroutine the conn owns, bounded by its
	// write timeout: a ping that finds the socket taken waits there.
	GoWrite(write func())
	// ParkFailed reports that the poller refused the socket: the conn
	// reads with a goroutine from now on.
	ParkFailed(err error)
}

// Reader states of a parking conn.
const (
	readerRunning int32 = iota
	readerParked
)

// Conn sits between coder/websocket's buffers and the socket. Those
// buffers are tiny for a parking conn (parkBufSize), as they live as long as
// the conn: reads go through a pooled read-ahead buffer held only while
// there is something to read, and a frame coder/websocket writes in two
// pieces (its buffer, then the rest of the payload) goes out in one writev.
type Conn struct {
	net.Conn
	prefix []byte // bytes the client sent right behind its handshake

	// Read side: the reader or Close's handshake, one at a time.
	frames frameTracker // what has been handed up to coder/websocket
	ahead  *[]byte      // pooled read-ahead buffer; nil when drained
	ar, aw int          // its unread bytes: (*ahead)[ar:aw]

	// Write side: coder/websocket's writers, one at a time, and the
	// heartbeat's raw pings, all under wmu.
	wmu  sync.Mutex
	out  frameTracker // what coder/websocket has written
	held []byte       // the start of a frame not yet written; within hold
	hold [parkBufSize]byte
	// A raw ping goes out between two frames: at once if the socket is
	// free, else right behind the frame being written. rest is the part of
	// a ping frame the socket did not take.
	pingDue   bool
	pingFrame [pingFrameLen]byte
	rest      []byte // within restBuf
	restBuf   [pingFrameLen]byte
	vec       [4][]byte
	bufs      net.Buffers
	// between is signalled, under wmu, when coder/websocket ends a frame
	// or the socket closes: WriteFrames waits for it mid-frame.
	between sync.Cond
	closed  bool

	// mayPark is set by the reader around its reads: a read that finds the
	// socket empty at a frame boundary then returns errParked.
	mayPark atomic.Bool
	state   atomic.Int32 // readerRunning or readerParked
	// pending: bytes arrived since the reader last read the socket. The
	// poller sets it; a reader clears it before each read.
	pending atomic.Bool
	// drained: the last read from the socket took less than it asked
	// for, so the socket was empty then, and any byte since has set
	// pending: parking needs no read to find the socket empty.
	drained bool
	off     atomic.Bool // parking failed once: this conn reads with a goroutine
	// rmu: the read side has one user at a time. The reader (or Close's
	// handshake) holds it in Read; the poller tries it for takePongs and
	// leaves the bytes to a reader if it is taken.
	rmu sync.Mutex

	owner Owner // set by Bind before the first read
	reg   pollReg
}

// parkBufSize is the size of coder/websocket's own read and write buffers
// for a parking conn (bufio's minimum is 16).
const parkBufSize = 16

// readAhead is the size of the pooled buffer a reading conn fills from
// the socket: one syscall for a burst of small frames.
const readAhead = 4 << 10

var readAheadBufs = sync.Pool{New: func() any { b := make([]byte, readAhead); return &b }}

func (pc *Conn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	pc.rmu.Lock()
	defer pc.rmu.Unlock()
	if len(pc.prefix) > 0 {
		n := copy(b, pc.prefix)
		pc.prefix = pc.prefix[n:]
		pc.frames.feed(b[:n])
		return n, nil
	}
	if pc.ar == pc.aw {
		// An ending conn's reads wait: the close handshake reads too.
		park := pc.mayPark.Load() && pc.frames.atBoundary() && !pc.owner.Ending()
		if len(b) >= readAhead {
			// A large payload: straight into it.
			n, err := pc.fill(b, park)
			pc.frames.feed(b[:n])
			return n, err
		}
		if pc.ahead == nil {
			pc.ahead = readAheadBufs.Get().(*[]byte)
		}
		n, err := pc.fill(*pc.ahead, park)
		if n == 0 {
			pc.drop()
			return 0, err
		}
		pc.ar, pc.aw = 0, n
	}
	n := copy(b, (*pc.ahead)[pc.ar:pc.aw])
	pc.ar += n
	if pc.ar == pc.aw {
		pc.drop()
	}
	pc.frames.feed(b[:n])
	return n, nil
}

// fill reads from the socket into b; without waiting if park, when an
// empty socket means errParked.
func (pc *Conn) fill(b []byte, park bool) (int, error) {
	if park && pc.drained && !pc.pending.Load() {
		return 0, ErrParked
	}
	pc.pending.Store(false)
	var n int
	var err error
	if park {
		n, err = pc.readNow(b)
		if errors.Is(err, errWouldBlock) {
			pc.drained = true
			return 0, ErrParked
		}
	} else {
		n, err = pc.Conn.Read(b)
	}
	n = max(n, 0)
	pc.drained = n < len(b)
	return n, err
}

// drop gives the drained read-ahead buffer back.
func (pc *Conn) drop() {
	if pc.ahead != nil {
		readAheadBufs.Put(pc.ahead)
		pc.ahead, pc.ar, pc.aw = nil, 0, 0
	}
}

func (pc *Conn) Write(b []byte) (int, error) {
	pc.wmu.Lock()
	defer pc.wmu.Unlock()
	return pc.writeLocked(b)
}

func (pc *Conn) writeLocked(b []byte) (int, error) {
	pc.out.feed(b)
	if !pc.out.frameDone() && len(pc.held) == 0 && len(pc.rest) == 0 && len(b) <= len(pc.hold) {
		// The start of a frame: wait for the rest.
		pc.held = pc.hold[:copy(pc.hold[:], b)]
		return len(b), nil
	}
	vec := pc.vec[:0]
	before := len(pc.rest) + len(pc.held)
	if len(pc.rest) > 0 {
		vec = append(vec, pc.rest)
	}
	if len(pc.held) > 0 {
		vec = append(vec, pc.held)
	}
	vec = append(vec, b)
	if pc.pingDue && pc.out.frameDone() {
		vec = append(vec, pc.pingFrame[:])
		pc.pingDue = false
	}
	pc.bufs = vec
	n, err := pc.writev(&pc.bufs)
	pc.vec, pc.bufs, pc.rest, pc.held = [4][]byte{}, nil, nil, nil
	if pc.out.frameDone() {
		pc.between.Broadcast()
	}
	return min(max(int(n)-before, 0), len(b)), err
}

// WriteFrames writes frames, whole WebSocket frames the caller encoded,
// in one vectored write between two of coder/websocket's frames (waiting
// if one is under way), with a raw ping that is due after them. frames is
// left as the write left it: the caller may reuse it. A write that fails
// leaves the socket in an unknown state: the caller must end the conn.
func (pc *Conn) WriteFrames(frames *net.Buffers) error {
	pc.wmu.Lock()
	defer pc.wmu.Unlock()
	for !pc.closed && (!pc.out.frameDone() || len(pc.held) > 0) {
		pc.between.Wait()
	}
	if pc.closed {
		return net.ErrClosed
	}
	if len(pc.rest) > 0 {
		if _, err := pc.writeLocked(nil); err != nil {
			return err
		}
	}
	if pc.pingDue {
		*frames = append(*frames, pc.pingFrame[:])
		pc.pingDue = false
	}
	_, err := pc.writev(frames)
	return err
}

// pingFrameLen: FIN + ping opcode, an unmasked 8-byte length, 8 bytes.
const pingFrameLen = 10

// Ping sends a ping frame carrying payload between two of coder/websocket's
// frames. It runs on the heartbeat scheduler and must not wait: when a
// writer holds the socket, a goroutine of the conn's sends the ping once
// the writer lets go.
func (pc *Conn) Ping(payload uint64) {
	if pc.wmu.TryLock() {
		stuck := pc.pingLocked(payload)
		pc.wmu.Unlock()
		if stuck {
			// The socket is full and no write may come to carry the
			// rest. GoWrite takes the conn's lock: not under wmu.
			pc.owner.GoWrite(pc.flushPing)
		}
		return
	}
	pc.owner.GoWrite(func() {
		pc.wmu.Lock()
		stuck := pc.pingLocked(payload)
		pc.wmu.Unlock()
		if stuck {
			pc.flushPing() // on a goroutine of the conn's already
		}
	})
}

// flushPing writes what the socket did not take of a raw ping, waiting
// for room; the caller bounds it with the write timeout.
func (pc *Conn) flushPing() {
	pc.wmu.Lock()
	defer pc.wmu.Unlock()
	if len(pc.rest) > 0 {
		_, _ = pc.writeLocked(nil)
	}
}

// pingLocked writes the ping frame, or leaves it to the write under way,
// and reports whether part of it is stuck in pc.rest with no write to
// carry it: the caller must then flush it, without wmu held.
func (pc *Conn) pingLocked(payload uint64) (stuck bool) {
	pc.pingFrame = [pingFrameLen]byte{0x89, 8}
	binary.BigEndian.PutUint64(pc.pingFrame[2:], payload)
	if !pc.out.frameDone() || len(pc.held) > 0 || len(pc.rest) > 0 {
		pc.pingDue = true // behind the frame under way
		return false
	}
	n, err := pc.writeNow(pc.pingFrame[:])
	if err != nil || n == len(pc.pingFrame) {
		return false // a broken socket: the reader reports it
	}
	pc.rest = pc.restBuf[:copy(pc.restBuf[:], pc.pingFrame[n:])]
	return true
}

// Close releases the conn's place in the poller along with the socket. A
// closed socket raises no epoll event: a parked reader is woken here, to
// meet the end and report it (coder/websocket closes the socket itself
// when a write's context expires).
func (pc *Conn) Close() error {
	err := pc.closeSocket()
	pc.Closed()
	pc.reg.release()
	if pc.owner != nil {
		pc.Unpark()
	}
	return err
}

// Abort closes the socket, which fails every operation on it at once, and
// tells WriteFrames (Closed). The conn's owner closes the socket this way,
// never through the net.Conn beneath: see pollReg.
func (pc *Conn) Abort() {
	_ = pc.closeSocket()
	pc.Closed()
}

// Closed tells a WriteFrames waiting for coder/websocket to end a frame
// that it never will: the socket is closed. Call it after closing the
// socket, which releases a write blocked on it and holding wmu.
func (pc *Conn) Closed() {
	pc.wmu.Lock()
	pc.closed = true
	pc.between.Broadcast()
	pc.wmu.Unlock()
}

// Bind gives the conn its owner, before its first read.
func (pc *Conn) Bind(o Owner) { pc.owner = o }

// BeginRead is called by the reader before each read, and reports whether
// the read may park (then returning ErrParked when the socket is empty at a
// message boundary): not once parking has failed, nor for an ending conn.
// A read that may park must be followed by EndRead.
func (pc *Conn) BeginRead() bool {
	if pc.off.Load() || pc.owner.Ending() {
		return false
	}
	pc.mayPark.Store(true)
	return true
}

// EndRead ends what BeginRead began.
func (pc *Conn) EndRead() { pc.mayPark.Store(false) }

// Parked reports whether the conn's reader is parked.
func (pc *Conn) Parked() bool { return pc.state.Load() == readerParked }

// Park is called by the reader after a read returned ErrParked, and by the
// poller after takePongs. It registers the socket with the poller and
// reports whether the caller must stop reading: true when the conn parked,
// or when another reader has already taken over; false when the caller
// must read on (the conn is ending, the poller refused the socket, or
// bytes came meanwhile).
func (pc *Conn) Park() bool {
	pc.state.Store(readerParked)
	// The owner's end marks it ending before it calls Unpark, and the
	// poller sets pending before it wakes the conn: in each pair, one of
	// the two sees the other.
	if !pc.owner.Ending() {
		err := pc.reg.arm(pc)
		if err == nil && !pc.pending.Load() {
			return true
		}
		if err != nil && !errors.Is(err, net.ErrClosed) {
			pc.owner.ParkFailed(err)
			pc.off.Store(true)
		}
	}
	// Ending, refused, or bytes came meanwhile: read on, unless the poller
	// or end has already started another reader.
	return !pc.state.CompareAndSwap(readerParked, readerRunning)
}

// Unpark starts a reader (Owner.Resume) for a parked conn; it does nothing
// for a conn whose reader runs.
func (pc *Conn) Unpark() {
	if pc.state.CompareAndSwap(readerParked, readerRunning) {
		pc.owner.Resume()
	}
}

// Release takes the conn out of the poller for good, once it has ended.
func (pc *Conn) Release() { pc.reg.release() }

// wake runs on the poller when bytes reached a parked conn's socket. Most
// often they are the pong of the heartbeat's last ping: settled here, with
// no reader started and nothing for coder/websocket to do. Anything else
// goes to a reader, which coder/websocket reads it through. buf is the
// poller's own buffer, to read the socket into.
func (pc *Conn) wake(buf []byte) {
	if !pc.state.CompareAndSwap(readerParked, readerRunning) {
		return // a reader runs, and sees pending
	}
	if !pc.takePongs(buf) {
		pc.owner.Resume()
	}
}

// takePongs reads the socket into buf while all it holds is pongs to the
// raw pings, then parks the conn again and reports true. It reports false
// when a reader must take over, with whatever it read in the read-ahead
// buffer. The caller owns the read side (it won the conn from
// readerParked).
func (pc *Conn) takePongs(buf []byte) bool {
	if !pc.rmu.TryLock() {
		return false // Close's handshake reads: a reader waits behind it
	}
	defer pc.rmu.Unlock()
	for {
		if pc.owner.Ending() || pc.off.Load() || len(pc.prefix) > 0 ||
			pc.ar != pc.aw || !pc.frames.atBoundary() {
			return false
		}
		pc.pending.Store(false)
		n, err := pc.readNow(buf)
		switch {
		case errors.Is(err, errWouldBlock):
			pc.drained = true
		case err != nil:
			// The reader must read to meet the error (or end of stream)
			// again and report it, not park on an empty socket.
			pc.drained = false
			return false
		default:
			pc.drained = n < len(buf)
			rest := buf[:n]
			for len(rest) >= pongFrameLen && pc.takePong(rest[:pongFrameLen]) {
				rest = rest[pongFrameLen:]
			}
			if len(rest) > 0 {
				pc.ahead = readAheadBufs.Get().(*[]byte)
				pc.ar, pc.aw = 0, copy(*pc.ahead, rest)
				return false
			}
			if !pc.drained {
				continue
			}
		}
		if pc.Park() {
			return true
		}
	}
}

// pongFrameLen: a client's pong to a raw ping, masked, 8 bytes of payload.
const pongFrameLen = 2 + 4 + 8

// takePong settles the raw ping whose pong is frame, if it is one: FIN and
// the pong opcode, masked, 8 bytes, and the payload of the ping in flight.
// Any other frame, a pong to an explicit ping included, is coder/websocket's.
func (pc *Conn) takePong(frame []byte) bool {
	if frame[0] != 0x8a || frame[1] != 0x80|8 {
		return false
	}
	var payload uint64
	for i := range 8 {
		payload = payload<<8 | uint64(frame[6+i]^frame[2+i%4])
	}
	return pc.owner.Pong(payload)
}
