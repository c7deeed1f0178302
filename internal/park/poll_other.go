//go:build !linux

package park

import (
	"errors"
	"net"
)

// Parking needs epoll; elsewhere every conn keeps its reader goroutine.

var errWouldBlock = errors.New("would block")

func newConn(net.Conn, []byte) *Conn { return nil }

func (pc *Conn) readNow([]byte) (int, error) { return 0, errWouldBlock }

func (pc *Conn) writeNow([]byte) (int, error) { return 0, errors.ErrUnsupported }

func (pc *Conn) Consumed() (uint64, bool) { return 0, false }

func (pc *Conn) closeSocket() error { return pc.Conn.Close() }

func (pc *Conn) writev(*net.Buffers) (int64, error) { return 0, errors.ErrUnsupported }

type pollReg struct{}

func (*pollReg) arm(*Conn) error { return errors.ErrUnsupported }
func (*pollReg) release()        {}

// Running reports whether the poller runs: never here.
func Running() bool { return false }
