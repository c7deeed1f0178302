package park

import (
	"bufio"
	"bytes"
	"crypto/tls"
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

// Hijacker intercepts the Hijack that websocket.Accept performs, to keep
// the net.Conn (closing it is the one way to abort every pending operation
// of a conn at once) and to give coder/websocket small buffers.
type Hijacker struct {
	http.ResponseWriter
	// NetConn is the hijacked socket (under TLS, the TCP conn beneath),
	// once websocket.Accept has hijacked it. When Park is set, close the
	// socket through Park (Close or Abort), never through NetConn: Park
	// reads and writes its descriptor directly.
	NetConn net.Conn
	// Park is the socket wrapped for parking, or nil when it cannot park
	// (TLS, not TCP, not Linux).
	Park *Conn
}

// WrapForHijack returns w wrapped in a Hijacker, or w itself and nil when
// no http.Hijacker is reachable through Unwrap: coder/websocket must then
// see that and answer 501 before it writes the 101.
func WrapForHijack(w http.ResponseWriter) (http.ResponseWriter, *Hijacker) {
	for u := w; ; {
		switch t := u.(type) {
		case http.Hijacker:
			hw := &Hijacker{ResponseWriter: w}
			return hw, hw
		case interface{ Unwrap() http.ResponseWriter }:
			u = t.Unwrap()
		default:
			return w, nil
		}
	}
}

// Unwrap lets http.ResponseController reach the writer underneath.
func (h *Hijacker) Unwrap() http.ResponseWriter { return h.ResponseWriter }

// WriteHeaderNow forwards to writers that defer WriteHeader until told
// (gin's); coder/websocket calls it before hijacking.
func (h *Hijacker) WriteHeaderNow() {
	if w, ok := h.ResponseWriter.(interface{ WriteHeaderNow() }); ok {
		w.WriteHeaderNow()
	}
}

func (h *Hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	h.NetConn = nc
	if tc, ok := nc.(*tls.Conn); ok {
		// Closing a tls.Conn writes close_notify, which can block for 5 s on
		// a peer that does not read; aborting must not. Close the socket.
		h.NetConn = tc.NetConn()
	}
	var prefix []byte
	if n := brw.Reader.Buffered(); n > 0 {
		// The client sent frames right behind its handshake: keep them.
		b, _ := brw.Reader.Peek(n)
		prefix = bytes.Clone(b)
	}
	var conn net.Conn = nc
	if h.Park = newConn(nc, prefix); h.Park != nil {
		conn = h.Park
	} else if prefix != nil {
		conn = &prefixConn{Conn: nc, prefix: prefix}
	}
	rsize, wsize := readBufferSize, writeBufferSize
	if h.Park != nil {
		rsize, wsize = parkBufSize, parkBufSize
	}
	return conn, bufio.NewReadWriter(
		bufio.NewReaderSize(conn, rsize),
		bufio.NewWriterSize(conn, wsize),
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
