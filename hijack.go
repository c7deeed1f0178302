package tether

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
)

// Buffer sizes handed to coder/websocket for an accepted conn. net/http
// hands over 4 KiB for each at Hijack, two thirds of an idle conn's heap.
// A frame larger than the read buffer is read straight into the message,
// and a write larger than the write buffer goes to the socket directly, so
// small buffers cost an extra syscall for large messages only.
const (
	readBufferSize  = 512
	writeBufferSize = 1024
)

// hijackWriter intercepts the Hijack that websocket.Accept performs, to
// keep the net.Conn (closing it is the one way to abort every pending
// operation of a conn at once) and to give coder/websocket small buffers.
type hijackWriter struct {
	http.ResponseWriter
	nc net.Conn
}

func (h *hijackWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	h.nc = nc
	var conn net.Conn = nc
	if n := brw.Reader.Buffered(); n > 0 {
		// The client sent frames right behind its handshake: keep them.
		b, _ := brw.Reader.Peek(n)
		conn = &prefixConn{Conn: nc, prefix: bytes.Clone(b)}
	}
	return conn, bufio.NewReadWriter(
		bufio.NewReaderSize(conn, readBufferSize),
		bufio.NewWriterSize(conn, writeBufferSize),
	), nil
}

// prefixConn reads prefix before the conn's own bytes.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}
