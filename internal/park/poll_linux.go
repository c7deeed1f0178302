package park

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// errWouldBlock: the socket has nothing to read right now.
var errWouldBlock = errors.New("would block")

// newConn returns nc wrapped for parking, or nil if nc cannot park.
func newConn(nc net.Conn, prefix []byte) *Conn {
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	// The descriptor, for readNow and writeNow, which must never wait: the
	// runtime makes every socket non-blocking, but check.
	fd := -1
	err = rc.Control(func(f uintptr) {
		flags, _, errno := syscall.Syscall(syscall.SYS_FCNTL, f, syscall.F_GETFL, 0)
		if errno == 0 && flags&syscall.O_NONBLOCK != 0 {
			fd = int(f)
		}
	})
	if err != nil || fd < 0 {
		return nil
	}
	pc := &Conn{Conn: nc, prefix: prefix, reg: pollReg{rc: rc, fd: fd}}
	pc.between.L = &pc.wmu
	return pc
}

// readNow reads what the socket holds without waiting: errWouldBlock when
// it holds nothing. It reads the descriptor directly, not through the
// runtime's poller, which the conn does not wait in for this read: see
// pollReg.fd for why the descriptor cannot be another socket's meanwhile.
func (pc *Conn) readNow(b []byte) (int, error) {
	r := &pc.reg
	if !r.fdmu.TryRLock() {
		return 0, net.ErrClosed // the socket is being closed
	}
	if r.fdClosed {
		r.fdmu.RUnlock()
		return 0, net.ErrClosed
	}
	n, rerr := rawIO(syscall.SYS_RECVFROM, r.fd, b)
	r.fdmu.RUnlock()
	switch {
	case rerr == syscall.EAGAIN:
		return 0, errWouldBlock
	case rerr != 0:
		return 0, &net.OpError{Op: "read", Net: "tcp", Addr: pc.LocalAddr(), Err: os.NewSyscallError("recvfrom", rerr)}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// writeNow writes what the socket takes without waiting, on the
// descriptor directly, as readNow reads.
func (pc *Conn) writeNow(b []byte) (int, error) {
	r := &pc.reg
	if !r.fdmu.TryRLock() {
		return 0, net.ErrClosed
	}
	if r.fdClosed {
		r.fdmu.RUnlock()
		return 0, net.ErrClosed
	}
	n, werr := rawIO(syscall.SYS_SENDTO, r.fd, b)
	r.fdmu.RUnlock()
	switch {
	case werr == syscall.EAGAIN:
		return 0, nil
	case werr != 0:
		return 0, werr
	}
	return max(n, 0), nil
}

// rawIO is recvfrom(2) or sendto(2) (trap), with no address, of b on a
// non-blocking socket, which returns without waiting: read(2) and
// write(2) would do the same through the file layer first. Up to rawMax
// bytes it is a raw system call, which the scheduler is not told of, as
// the runtime's poller makes its own epoll_wait when it does not wait: of
// a call it is told of, the monitor thread hands the caller's P to another
// thread when it sees the call last over 20 µs, and the wheel's pings, a
// burst of writes of about 10 µs each (the kernel delivers each over
// loopback within the write), turned that into thread switches that cost
// more than the writes. A larger read may copy long enough for the
// handoff to pay.
func rawIO(trap uintptr, fd int, b []byte) (int, syscall.Errno) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	// Never wait, whatever the socket's mode; and a peer gone is an
	// error, not a SIGPIPE.
	const flags = syscall.MSG_DONTWAIT | syscall.MSG_NOSIGNAL
	for {
		var n uintptr
		var errno syscall.Errno
		if len(b) <= rawMax {
			n, _, errno = syscall.RawSyscall6(trap, uintptr(fd), uintptr(p), uintptr(len(b)), flags, 0, 0)
		} else {
			n, _, errno = syscall.Syscall6(trap, uintptr(fd), uintptr(p), uintptr(len(b)), flags, 0, 0)
		}
		if errno != syscall.EINTR {
			return int(n), errno
		}
	}
}

// rawMax is the most bytes rawIO moves in a raw system call: the
// read-ahead buffer.
const rawMax = readAhead

// closeSocket closes the socket once no readNow or writeNow is using its
// descriptor, and keeps them from using it afterwards, when the number may
// already be another file's.
func (pc *Conn) closeSocket() error {
	r := &pc.reg
	r.fdmu.Lock()
	r.fdClosed = true
	r.fdmu.Unlock()
	return pc.Conn.Close()
}

// maxIovecs is IOV_MAX on Linux: the most buffers one writev takes.
const maxIovecs = 1024

// iovecs holds the iovec arrays of writes under way. The runtime's own
// vectored write (net.Buffers.WriteTo) keeps one for each socket, up to
// maxIovecs entries (16 KiB), for as long as the socket lives: after one
// burst, an idle conn would hold it.
var iovecs = sync.Pool{New: func() any {
	v := make([]syscall.Iovec, 0, 64)
	return &v
}}

// writev writes bufs, consuming them as they are written, with writev(2)
// on the socket, waiting for room when it is full. It returns the bytes
// written.
func (pc *Conn) writev(bufs *net.Buffers) (int64, error) {
	iov := iovecs.Get().(*[]syscall.Iovec)
	defer iovecs.Put(iov)
	var total int64
	for len(*bufs) > 0 {
		vec := (*iov)[:0]
		for _, b := range *bufs {
			if len(b) == 0 {
				continue
			}
			v := syscall.Iovec{Base: &b[0]}
			v.SetLen(len(b))
			if vec = append(vec, v); len(vec) == maxIovecs {
				break
			}
		}
		*iov = vec
		if len(vec) == 0 {
			*bufs = nil // only empty buffers left
			break
		}
		var n uintptr
		var errno syscall.Errno
		err := pc.reg.rc.Write(func(fd uintptr) bool {
			for {
				n, _, errno = syscall.Syscall(syscall.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&vec[0])), uintptr(len(vec)))
				switch errno {
				case syscall.EINTR:
					continue
				case syscall.EAGAIN:
					return false // the runtime's poller waits for room
				}
				return true
			}
		})
		clear(vec) // the pool must not keep the buffers alive
		switch {
		case err != nil:
			return total, err
		case errno != 0:
			return total, &net.OpError{Op: "write", Net: "tcp", Addr: pc.LocalAddr(), Err: os.NewSyscallError("writev", errno)}
		}
		total += int64(n)
		consume(bufs, int(n))
	}
	return total, nil
}

// consume drops the first n bytes of bufs.
func consume(bufs *net.Buffers, n int) {
	for len(*bufs) > 0 {
		b := (*bufs)[0]
		if len(b) > n {
			(*bufs)[0] = b[n:]
			return
		}
		n -= len(b)
		(*bufs)[0] = nil
		*bufs = (*bufs)[1:]
	}
}

// pollReg is a conn's registration with the poller.
type pollReg struct {
	rc syscall.RawConn
	// fd is the socket's descriptor, for readNow and writeNow: a read and
	// a write that never wait need nothing of the runtime's poller, and
	// going around it saves its locks and bookkeeping on the heartbeat's
	// path. fdmu (read-locked around each of those calls) and fdClosed
	// (set under its write lock) keep them off the number once the socket
	// is closed: every close of the socket goes through closeSocket (the
	// conn's Close, or Abort), never through the net.Conn beneath.
	fd       int
	fdmu     sync.RWMutex
	fdClosed bool

	mu sync.Mutex // guards the fields below
	p  *poller    // set by the first arm, until release
	id uint64
	// released: the conn has ended; a late arm must not register it anew.
	released bool
}

// arm makes sure the poller watches pc's socket. The first call registers
// it, edge-triggered, for the conn's life: the poller then marks pc
// pending whenever bytes arrive, and wakes the conn if it is parked.
func (r *pollReg) arm(pc *Conn) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.released {
		return net.ErrClosed
	}
	if r.p != nil {
		return nil
	}
	p, err := acquirePoller()
	if err != nil {
		return err
	}
	id := p.add(pc)
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | epollET}
	ev.Fd, ev.Pad = int32(uint32(id)), int32(uint32(id>>32))
	var cerr error
	// Control holds the fd: it cannot be closed and reused by another
	// socket while epoll_ctl runs.
	err = r.rc.Control(func(fd uintptr) {
		cerr = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if err == nil && cerr != nil {
		err = fmt.Errorf("tether: epoll_ctl: %w", cerr)
	}
	if err != nil {
		p.remove(id)
		releasePoller()
		return err
	}
	r.p, r.id = p, id
	return nil
}

// epollET is EPOLLET as the uint32 of EpollEvent.Events.
const epollET = 1 << 31

// release forgets the conn in the poller, which stops once no conn is
// left. The kernel drops the socket from the epoll set when it is closed.
func (r *pollReg) release() {
	r.mu.Lock()
	p, id := r.p, r.id
	r.p, r.released = nil, true
	r.mu.Unlock()
	if p != nil {
		p.remove(id)
		releasePoller()
	}
}

// poller waits for parked conns' sockets with one epoll instance and one
// goroutine, which runs while any conn is registered. The epoll instance
// itself waits in the runtime's poller (it is readable while it has events
// to report), so the goroutine parks there, as a socket read does: no
// thread blocks in epoll_wait, and a wakeup takes every event that came
// meanwhile in one call.
type poller struct {
	epfd int
	file *os.File // epfd, registered with the runtime's poller
	rc   syscall.RawConn
	done chan struct{}
	// stopping is set before file is closed, which ends run.
	stopping atomic.Bool

	nextID atomic.Uint64
	mu     sync.Mutex
	conns  map[uint64]*Conn

	// Used by run alone: the events of one wakeup, their conns, and the
	// buffer takePongs reads a parked conn's socket into.
	events []syscall.EpollEvent
	batch  []*Conn
	buf    [pongBuf]byte
	poll   func(fd uintptr) bool // pollOnce
	n      int                   // pollOnce's events
	werr   error                 // and its error
}

// pongBuf is the size of the poller's read buffer: room for several
// pongs, and for the start of whatever else came, which goes to a reader.
const pongBuf = 256

// maxEvents is the most events one epoll_wait returns.
const maxEvents = 256

var pollers struct {
	mu   sync.Mutex
	p    *poller
	refs int
}

func acquirePoller() (*poller, error) {
	pollers.mu.Lock()
	defer pollers.mu.Unlock()
	if pollers.p == nil {
		p, err := newPoller()
		if err != nil {
			return nil, err
		}
		pollers.p = p
		go p.run()
	}
	pollers.refs++
	return pollers.p, nil
}

// Running reports whether the poller's goroutine runs: while any conn is
// registered with it. For tests that check it stops.
func Running() bool {
	pollers.mu.Lock()
	defer pollers.mu.Unlock()
	return pollers.p != nil
}

func releasePoller() {
	pollers.mu.Lock()
	defer pollers.mu.Unlock()
	pollers.refs--
	if pollers.refs > 0 {
		return
	}
	p := pollers.p
	pollers.p = nil
	p.stopping.Store(true)
	_ = p.file.Close() // wakes run, which returns; the fd closes then
	<-p.done
}

func newPoller() (*poller, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("tether: epoll_create1: %w", err)
	}
	// Non-blocking, so that os.NewFile registers it with the runtime's
	// poller; epoll_wait's own timeout (always 0 here) is what counts.
	if err := syscall.SetNonblock(epfd, true); err != nil {
		syscall.Close(epfd)
		return nil, fmt.Errorf("tether: epoll fd: %w", err)
	}
	file := os.NewFile(uintptr(epfd), "tether-epoll")
	rc, err := file.SyscallConn()
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("tether: epoll fd: %w", err)
	}
	p := &poller{
		epfd: epfd, file: file, rc: rc, done: make(chan struct{}),
		conns:  make(map[uint64]*Conn),
		events: make([]syscall.EpollEvent, maxEvents),
		batch:  make([]*Conn, maxEvents),
	}
	p.poll = p.pollOnce
	return p, nil
}

func (p *poller) add(pc *Conn) uint64 {
	id := p.nextID.Add(1)
	p.mu.Lock()
	p.conns[id] = pc
	p.mu.Unlock()
	return id
}

func (p *poller) remove(id uint64) {
	p.mu.Lock()
	delete(p.conns, id)
	p.mu.Unlock()
}

// wait returns the events that came since the last call, waiting in the
// runtime's poller while there are none.
func (p *poller) wait() (int, error) {
	p.n, p.werr = 0, nil
	if err := p.rc.Read(p.poll); err != nil {
		return 0, err
	}
	return p.n, p.werr
}

// pollOnce is wait's try, as p.poll (made once, by newPoller): it takes
// the events there are without waiting, and reports whether there were
// any.
func (p *poller) pollOnce(fd uintptr) bool {
	for {
		// Raw, as the runtime's poller makes it: it never waits (see
		// rawIO).
		r, _, errno := syscall.RawSyscall6(syscall.SYS_EPOLL_WAIT, fd,
			uintptr(unsafe.Pointer(&p.events[0])), uintptr(len(p.events)), 0, 0, 0)
		switch errno {
		case 0:
			p.n = int(r)
			return p.n > 0 // none: wait until the epoll fd is readable
		case syscall.EINTR:
			continue
		}
		p.werr = os.NewSyscallError("epoll_wait", errno)
		return true
	}
}

func (p *poller) run() {
	defer close(p.done)
	for {
		n, err := p.wait()
		if err != nil {
			if p.stopping.Load() {
				return
			}
			// Not expected for a valid epoll fd: keep the poller's
			// state whole (conns hold its fds) and look again shortly.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		// One lock for the whole batch.
		p.mu.Lock()
		for i, ev := range p.events[:n] {
			p.batch[i] = p.conns[uint64(uint32(ev.Fd))|uint64(uint32(ev.Pad))<<32]
		}
		p.mu.Unlock()
		for i, pc := range p.batch[:n] {
			p.batch[i] = nil
			if pc != nil {
				pc.pending.Store(true)
				pc.wake(p.buf[:])
			}
		}
	}
}

// Consumed returns how far into what we wrote the peer's application has
// read, give or take its receive buffer: the bytes its TCP acknowledged
// plus the window it advertises, the right edge of that window (RFC 9293,
// section 3.8.6). It grows when the application reads. As data merely
// arrives it grows only while the peer's kernel still enlarges the
// receive buffer toward its limit: a frozen process moves it by at most
// that buffer, and once the buffer is full not at all. ok is false when
// the kernel does not say (Linux before 5.4 has no tcpi_snd_wnd).
func (pc *Conn) Consumed() (edge uint64, ok bool) {
	var info [tcpInfoLen]byte
	size := uint32(len(info))
	var errno syscall.Errno
	err := pc.reg.rc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_INFO,
			uintptr(unsafe.Pointer(&info[0])), uintptr(unsafe.Pointer(&size)), 0)
	})
	if err != nil || errno != 0 || size < tcpInfoLen {
		return 0, false
	}
	acked := binary.NativeEndian.Uint64(info[tcpiBytesAcked:])
	wnd := binary.NativeEndian.Uint32(info[tcpiSndWnd:])
	return acked + uint64(wnd), true
}

// Offsets in struct tcp_info (include/uapi/linux/tcp.h), the same on every
// Linux architecture: tcpi_bytes_acked (since 4.1) and tcpi_snd_wnd, the
// peer's window after scaling (since 5.4).
const (
	tcpiBytesAcked = 120
	tcpiSndWnd     = 228
	tcpInfoLen     = tcpiSndWnd + 4
)
