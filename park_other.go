//go:build !linux

package tether

import (
	"errors"
	"net"
)

// Parking needs epoll; elsewhere every conn keeps its reader goroutine.

var errWouldBlock = errors.New("would block")

func newParkConn(net.Conn, []byte) *parkConn { return nil }

func (pc *parkConn) readNow([]byte) (int, error) { return 0, errWouldBlock }

func (pc *parkConn) writeNow([]byte) (int, error) { return 0, errors.ErrUnsupported }

type pollReg struct{}

func (*pollReg) arm(*parkConn) error { return errors.ErrUnsupported }
func (*pollReg) release()            {}
