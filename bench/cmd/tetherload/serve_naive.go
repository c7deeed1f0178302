package main

import (
	"context"
	"errors"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// naiveServer is coder/websocket used the way its chat example
// (internal/examples/chat) uses it, by someone who adds a heartbeat of
// their own: websocket.Accept, CloseRead to keep reading control frames,
// and the handler goroutine selecting over the subscriber's messages, a
// time.Ticker and the conn's end.
//
// Heartbeat: every interval the handler calls Ping with timeout-interval to
// get the pong, so a silent peer is declared dead timeout after the
// previous ping was sent: its pong's round trip less than timeout after
// that pong. A Ping that fails for its deadline is a heartbeat death, one
// that fails because the conn ended is not. Queue: each
// subscriber has a chan of -queue slots; publish never blocks, and a full
// chan closes the subscriber as too slow (the example's closeSlow):
// hub_evictions counts those, and subscribers whose write timed out.
// Publish: a non-blocking send to every subscriber's chan under one mutex.
// The handler does one thing at a time: while it waits for a pong, its
// messages wait in the chan.
type naiveServer struct {
	log      *serveLog
	interval time.Duration
	timeout  time.Duration
	queue    int

	ctx    context.Context // ends at close: every handler returns
	cancel context.CancelFunc

	handlers serveGate // handlers and closeSlow goroutines

	mu   sync.Mutex
	subs map[*naiveSub]struct{}
}

// naiveSub is the example's subscriber.
type naiveSub struct {
	msgs      chan []byte
	closeSlow func()
	evicted   atomic.Bool // counted in hub_evictions already
}

// evict counts the subscriber in hub_evictions, once: a write stuck when
// closeSlow runs may time out after it.
func (sub *naiveSub) evict(log *serveLog) {
	if sub.evicted.CompareAndSwap(false, true) {
		log.evict(1)
	}
}

// naiveWriteTimeout bounds each message's write, as the example's
// writeTimeout does.
const naiveWriteTimeout = 10 * time.Second

func newNaiveServer(cfg serveConfig, log *serveLog, _ io.Writer) (serveImpl, error) {
	s := &naiveServer{
		log:      log,
		interval: cfg.interval,
		timeout:  cfg.timeout,
		queue:    cfg.queue,
		subs:     make(map[*naiveSub]struct{}),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

func (s *naiveServer) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /sub", s.subscribe)
}

// subscribe serves one subscriber until its conn ends.
func (s *naiveServer) subscribe(w http.ResponseWriter, r *http.Request) {
	if !s.handlers.enter() {
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
		return
	}
	defer s.handlers.leave()
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return // Accept has answered the request
	}
	rec := s.log.accept(r.RemoteAddr)
	heartbeat := false
	defer func() {
		s.log.end(rec, heartbeat)
		_ = c.CloseNow()
	}()

	sub := &naiveSub{msgs: make(chan []byte, s.queue)}
	sub.closeSlow = func() {
		sub.evict(s.log)
		_ = c.Close(websocket.StatusPolicyViolation, "connection too slow to keep up with messages")
	}
	s.mu.Lock()
	s.subs[sub] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.subs, sub)
		s.mu.Unlock()
	}()

	// The server's end ends the conn too: CloseRead's reader closes it
	// when its ctx ends.
	ctx := c.CloseRead(s.ctx)
	ticker := time.NewTicker(s.interval)
	defer ticker.Stop()
	for {
		select {
		case msg := <-sub.msgs:
			if err := naiveWrite(ctx, c, msg); err != nil {
				if errors.Is(err, context.DeadlineExceeded) {
					sub.evict(s.log) // not reading for naiveWriteTimeout
				}
				return
			}
		case <-ticker.C:
			pingCtx, cancel := context.WithTimeout(ctx, s.timeout-s.interval)
			err := c.Ping(pingCtx)
			// The ping's own deadline, not the conn's end (which cancels
			// ctx): coder/websocket closes the conn when the deadline passes
			// while the ping is still being written to a peer not reading,
			// and that too is a failed Ping.
			timedOut := errors.Is(pingCtx.Err(), context.DeadlineExceeded)
			cancel()
			if err != nil {
				heartbeat = timedOut
				return
			}
			s.log.pong(rec)
		case <-ctx.Done():
			return
		}
	}
}

func naiveWrite(ctx context.Context, c *websocket.Conn, msg []byte) error {
	ctx, cancel := context.WithTimeout(ctx, naiveWriteTimeout)
	defer cancel()
	return c.Write(ctx, websocket.MessageText, msg)
}

// publish is the example's publish, less its rate limit: it never blocks,
// and a subscriber whose chan is full is dropped from the set and closed as
// too slow. The example spawns closeSlow for every message such a
// subscriber misses until its handler deletes it; dropping it at once
// spawns one.
func (s *naiveServer) publish(_ string, msg []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx.Err() != nil {
		return errServeClosed
	}
	for sub := range s.subs {
		select {
		case sub.msgs <- msg:
		default:
			delete(s.subs, sub)
			if s.handlers.enter() {
				go func() {
					defer s.handlers.leave()
					sub.closeSlow()
				}()
			}
		}
	}
	return nil
}

func (s *naiveServer) fill(st *Stats) {
	s.mu.Lock()
	st.HubConns = int64(len(s.subs))
	s.mu.Unlock()
}

// close ends every handler (their conns close as CloseRead's ctx ends) and
// waits for them and for the closeSlow goroutines.
func (s *naiveServer) close(ctx context.Context) error {
	s.handlers.shut()
	s.mu.Lock()
	s.cancel()
	s.mu.Unlock()
	return s.handlers.wait(ctx)
}
