package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/olahol/melody"
)

// melodyServer is olahol/melody used as its README shows: melody.New, the
// handler calls HandleRequest, publish is Broadcast.
//
// Heartbeat: Config.PingPeriod = interval and PongWait = timeout; melody's
// readPump sets the read deadline to now+PongWait at start and on every pong
// (HandlePong reports those), so a silent peer's read times out about
// timeout after its last pong: that read timeout is a heartbeat death.
// Queue: MessageBufferSize = queue; melody drops the message, not the conn,
// when a session's buffer is full (HandleError with ErrMessageBufferFull),
// so hub_evictions counts dropped messages here, not conns. Publish:
// Broadcast, which returns once melody's hub goroutine has taken the message.
type melodyServer struct {
	log *serveLog
	m   *melody.Melody

	handlers serveGate

	mu      sync.Mutex
	conns   map[*http.Request]*melodyPeer // by the request melody keeps as Session.Request
	closing bool                          // close has dropped the conns: drop any hijacked later
}

// melodyPeer is our state for one session.
type melodyPeer struct {
	rec      *serveConn
	netConn  net.Conn              // set once hijacked, under melodyServer.mu
	firstErr atomic.Pointer[error] // the first error that ended the session
}

func newMelodyServer(cfg serveConfig, log *serveLog, _ io.Writer) (serveImpl, error) {
	s := &melodyServer{log: log, m: melody.New(), conns: make(map[*http.Request]*melodyPeer)}
	s.m.Config.PingPeriod = cfg.interval
	s.m.Config.PongWait = cfg.timeout
	s.m.Config.MessageBufferSize = cfg.queue
	s.m.HandleConnect(func(ss *melody.Session) {
		if p := s.peer(ss); p != nil {
			p.rec = log.accept(ss.Request.RemoteAddr)
		}
	})
	s.m.HandlePong(func(ss *melody.Session) {
		var rec *serveConn
		if p := s.peer(ss); p != nil {
			rec = p.rec
		}
		log.pong(rec)
	})
	s.m.HandleError(func(ss *melody.Session, err error) {
		switch {
		case errors.Is(err, melody.ErrMessageBufferFull):
			log.evict(1) // the message is dropped; the session stays
		case errors.Is(err, melody.ErrWriteClosed):
			// A write to a session that has ended already.
		default:
			if p := s.peer(ss); p != nil {
				p.firstErr.CompareAndSwap(nil, &err)
			}
		}
	})
	return s, nil
}

func (s *melodyServer) peer(ss *melody.Session) *melodyPeer {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns[ss.Request]
}

func (s *melodyServer) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /sub", s.handle)
}

// handle runs one session: melody's HandleRequest returns when it is over.
func (s *melodyServer) handle(w http.ResponseWriter, r *http.Request) {
	if !s.handlers.enter() {
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
		return
	}
	defer s.handlers.leave()
	p := new(melodyPeer)
	s.mu.Lock()
	s.conns[r] = p
	s.mu.Unlock()
	_ = s.m.HandleRequest(&melodyHijacker{ResponseWriter: w, srv: s, peer: p}, r)
	s.mu.Lock()
	delete(s.conns, r)
	s.mu.Unlock()
	if p.rec != nil {
		s.log.end(p.rec, melodyHeartbeatDeath(p.firstErr.Load()))
	}
}

// melodyHeartbeatDeath reports whether the error that ended a session is
// its read deadline firing. melody reports read and write errors alike
// through HandleError, and gorilla/websocket hides the net.OpError of a
// deadline behind an error of its own that keeps only the message and
// Timeout: "read tcp ...: i/o timeout" for the read deadline, "write tcp
// ..." for a write that timed out (WriteWait, a peer not reading). The
// first error is the one that ended the session: a write error closes the
// conn before the read fails, and a read error ends the session before the
// writer can fail.
func melodyHeartbeatDeath(first *error) bool {
	if first == nil {
		return false
	}
	var ne net.Error
	return errors.As(*first, &ne) && ne.Timeout() && strings.HasPrefix(ne.Error(), "read ")
}

// melodyHijacker hands melody's upgrader the conn as usual and keeps it, so
// that close can drop it: melody has no way to close a session at once,
// and its own Close only queues a close message behind what is buffered.
type melodyHijacker struct {
	http.ResponseWriter
	srv  *melodyServer
	peer *melodyPeer
}

func (h *melodyHijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return c, brw, err
	}
	h.srv.mu.Lock()
	h.peer.netConn = c
	if h.srv.closing {
		_ = c.Close()
	}
	h.srv.mu.Unlock()
	return c, brw, nil
}

func (s *melodyServer) publish(_ string, msg []byte) error {
	return s.m.Broadcast(msg)
}

func (s *melodyServer) fill(st *Stats) {
	st.HubConns = int64(s.m.Len())
}

// close drops every conn, waits for every session to end, and only then
// closes melody, whose hub goroutine must still be running while sessions
// end: a session that ends while Close stops the hub can block for ever on
// the hub's unregister channel.
func (s *melodyServer) close(ctx context.Context) error {
	s.handlers.shut()
	s.mu.Lock()
	s.closing = true
	for _, p := range s.conns {
		if p.netConn != nil {
			_ = p.netConn.Close()
		}
	}
	s.mu.Unlock()
	err := s.handlers.wait(ctx)
	if cerr := s.m.Close(); cerr != nil && !errors.Is(cerr, melody.ErrClosed) {
		err = errors.Join(err, cerr)
	}
	return err
}
