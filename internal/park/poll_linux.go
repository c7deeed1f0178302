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
	pc := &Conn{Conn: nc, prefix: prefix, reg: pollReg{rc: rc}}
	pc.between.L = &pc.wmu
	return pc
}

// readNow reads what the socket holds without waiting: errWouldBlock when
// it holds nothing. The fd stays referenced (and cannot be reused by
// another socket) for the duration of the call.
func (pc *Conn) readNow(b []byte) (int, error) {
	var n int
	var rerr error
	err := pc.reg.rc.Read(func(fd uintptr) bool {
		for {
			n, rerr = syscall.Read(int(fd), b)
			if rerr != syscall.EINTR {
				return true // never wait: parking is the wait
			}
		}
	})
	switch {
	case err != nil:
		return 0, err
	case rerr == syscall.EAGAIN:
		return 0, errWouldBlock
	case rerr != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Addr: pc.LocalAddr(), Err: os.NewSyscallError("read", rerr)}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// writeNow writes what the socket takes without waiting.
func (pc *Conn) writeNow(b []byte) (int, error) {
	var n int
	var werr error
	err := pc.reg.rc.Write(func(fd uintptr) bool {
		for {
			n, werr = syscall.Write(int(fd), b)
			if werr != syscall.EINTR {
				return true
			}
		}
	})
	switch {
	case err != nil:
		return 0, err
	case werr == syscall.EAGAIN:
		return 0, nil
	case werr != nil:
		return 0, werr
	}
	return max(n, 0), nil
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
// goroutine, which runs while any conn is registered.
type poller struct {
	epfd int
	pipe [2]int // a byte on pipe[1] stops the loop
	done chan struct{}

	nextID atomic.Uint64
	mu     sync.Mutex
	conns  map[uint64]*Conn
}

var pollers struct {
	mu   sync.Mutex
	p    *poller
	refs int
}

// pipeID marks the stop pipe's events; conn IDs start at 1.
const pipeID = 0

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
	_, _ = syscall.Write(p.pipe[1], []byte{0})
	<-p.done
}

func newPoller() (*poller, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("tether: epoll_create1: %w", err)
	}
	p := &poller{epfd: epfd, done: make(chan struct{}), conns: make(map[uint64]*Conn)}
	if err := syscall.Pipe2(p.pipe[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		syscall.Close(epfd)
		return nil, fmt.Errorf("tether: pipe2: %w", err)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN} // Fd, Pad: pipeID
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, p.pipe[0], &ev); err != nil {
		p.closeFDs()
		return nil, fmt.Errorf("tether: epoll_ctl: %w", err)
	}
	return p, nil
}

func (p *poller) closeFDs() {
	syscall.Close(p.pipe[0])
	syscall.Close(p.pipe[1])
	syscall.Close(p.epfd)
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

func (p *poller) run() {
	defer close(p.done)
	defer p.closeFDs()
	events := make([]syscall.EpollEvent, 256)
	for {
		n, err := syscall.EpollWait(p.epfd, events, -1)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			// Not expected for a valid epoll fd; keep the poller's state
			// whole (conns hold its fds) and try again shortly.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		for i := range n {
			id := uint64(uint32(events[i].Fd)) | uint64(uint32(events[i].Pad))<<32
			if id == pipeID {
				return
			}
			p.mu.Lock()
			pc := p.conns[id]
			p.mu.Unlock()
			if pc != nil {
				pc.pending.Store(true)
				pc.wake()
			}
		}
	}
}

// Consumed returns how far into what we wrote the peer's application has
// read, give or take its receive buffer: the bytes its TCP acknowledged
// plus the window it advertises, the right edge of that window (RFC 9293,
// section 3.8.6). It grows only when the application reads (and the
// buffer has room for more), never as data merely arrives: a frozen
// process with data waiting does not move it. ok is false when the kernel
// does not say (Linux before 5.4 has no tcpi_snd_wnd).
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
