package main

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// serveLog keeps the conn counts of /stats and the log of /events in one
// place, so that every impl counts the same way: an impl only says when a
// conn was accepted, when it answered a heartbeat and when and why it ended.
//
// It is on the path of every accept, pong and end of every conn, so it only
// bumps atomics and appends to slices under a mutex.
type serveLog struct {
	accepted, ended, heartbeats, pongs, evictions atomic.Int64

	mu      sync.Mutex
	accepts []int64        // Unix ns of each accepted upgrade
	ends    []serveEndJSON // every conn that ended
}

// serveConn is what the log knows of one accepted conn. Impls keep a pointer
// to it beside their own conn state, to report its pongs and its end.
type serveConn struct {
	remote   string
	lastPong atomic.Int64 // Unix ns of the last pong observed; 0 before the first
	ended    atomic.Bool  // the end was logged: later reports are ignored
}

// serveEndJSON is one entry of /events' "ends".
type serveEndJSON struct {
	Remote     string `json:"remote"`
	AtNs       int64  `json:"at_ns"`
	Heartbeat  bool   `json:"heartbeat"`
	LastPongNs int64  `json:"last_pong_ns"`
}

// serveEventsJSON is the /events answer.
type serveEventsJSON struct {
	Ends    []serveEndJSON `json:"ends"`
	Accepts []int64        `json:"accepts"`
}

// accept logs an upgrade that succeeded and returns the conn's record.
func (l *serveLog) accept(remote string) *serveConn {
	return l.acceptAt(remote, time.Now().UnixNano())
}

func (l *serveLog) acceptAt(remote string, at int64) *serveConn {
	l.accepted.Add(1)
	l.mu.Lock()
	l.accepts = append(l.accepts, at)
	l.mu.Unlock()
	return &serveConn{remote: remote}
}

// pong logs a heartbeat answered by c; c may be nil when the impl saw the
// pong before it could tell which accepted conn it came from.
func (l *serveLog) pong(c *serveConn) {
	l.pongs.Add(1)
	if c != nil {
		c.lastPong.Store(time.Now().UnixNano())
	}
}

// end logs the end of c, now. heartbeat says the server ended it because
// its peer's heartbeat failed. Only the first report for a conn counts, so
// that an impl may report from every path that can end a conn.
func (l *serveLog) end(c *serveConn, heartbeat bool) {
	l.endAt(c, time.Now().UnixNano(), heartbeat)
}

func (l *serveLog) endAt(c *serveConn, at int64, heartbeat bool) {
	if c == nil || !c.ended.CompareAndSwap(false, true) {
		return
	}
	l.ended.Add(1)
	if heartbeat {
		l.heartbeats.Add(1)
	}
	e := serveEndJSON{Remote: c.remote, AtNs: at, Heartbeat: heartbeat, LastPongNs: c.lastPong.Load()}
	l.mu.Lock()
	l.ends = append(l.ends, e)
	l.mu.Unlock()
}

// evict counts a subscriber dropped as too slow (or, for an impl that drops
// messages rather than conns, a dropped message).
func (l *serveLog) evict(n int64) { l.evictions.Add(n) }

// fill sets the conn figures of st; the impl may then refine the hub ones.
func (l *serveLog) fill(st *Stats) {
	ended := l.ended.Load()
	st.Accepted = l.accepted.Load()
	st.Open = st.Accepted - ended
	st.HeartbeatTimeouts = l.heartbeats.Load()
	st.OtherEnds = ended - st.HeartbeatTimeouts
	st.Pongs = l.pongs.Load()
	st.HubEvictions = l.evictions.Load()
}

// snapshot copies the log, so that encoding it does not hold up the conns.
func (l *serveLog) snapshot() serveEventsJSON {
	l.mu.Lock()
	defer l.mu.Unlock()
	return serveEventsJSON{
		Ends:    append(make([]serveEndJSON, 0, len(l.ends)), l.ends...),
		Accepts: append(make([]int64, 0, len(l.accepts)), l.accepts...),
	}
}

func (l *serveLog) handleEvents(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(l.snapshot())
}

// serveGate lets an impl refuse new work once its shutdown has begun and
// wait for the work already admitted: handlers and goroutines that net/http
// does not wait for once their conn is hijacked.
type serveGate struct {
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

// enter admits one unit of work, unless the gate is shut; leave must follow.
func (g *serveGate) enter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.wg.Add(1)
	return true
}

func (g *serveGate) leave() { g.wg.Done() }

// shut refuses all later work.
func (g *serveGate) shut() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
}

// wait waits, until ctx ends, for the admitted work to be over. Call shut
// first: wait does not stop new work from coming in.
func (g *serveGate) wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		g.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
