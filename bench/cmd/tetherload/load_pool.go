package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// serverSpec is how a scenario starts its server child.
type serverSpec struct {
	impl              string // the server's -impl
	addr              string // listen address; "" is 127.0.0.1:0
	interval, timeout time.Duration
	queue             int // the per-conn send buffer in messages; 0 keeps the server's default
	pprof             bool
	memProfileRate    int
	room              bool          // serve -room (tether only)
	noPresence        bool          // serve -nopresence (with room)
	cpus              string        // serve -cpus: the CPUs to pin the server to; "" none
	overload          bool          // serve -overload (tether only), with -breaker breaker
	breaker           time.Duration // 0: no breaker
	admission         float64       // serve -admission (tether only); 0: none
	// cmd is the server's command line, "serve" included; by default this
	// very executable with "serve".
	cmd []string
}

func (s serverSpec) args() []string {
	addr := s.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	args := []string{"-impl", s.impl, "-addr", addr, "-interval", s.interval.String(), "-timeout", s.timeout.String()}
	if s.queue > 0 {
		args = append(args, "-queue", strconv.Itoa(s.queue))
	}
	if s.room {
		args = append(args, "-room")
	}
	if s.noPresence {
		args = append(args, "-nopresence")
	}
	if s.cpus != "" {
		args = append(args, "-cpus", s.cpus)
	}
	if s.overload {
		args = append(args, "-overload", "-breaker", s.breaker.String())
	}
	if s.admission > 0 {
		args = append(args, "-admission", strconv.FormatFloat(s.admission, 'f', -1, 64))
	}
	if s.pprof {
		args = append(args, "-pprof")
		if s.memProfileRate > 0 {
			args = append(args, "-memprofilerate", strconv.Itoa(s.memProfileRate))
		}
	}
	return args
}

// startImpl starts the server child and checks, where its /stats says,
// that it runs the impl asked for.
func startImpl(ctx context.Context, spec serverSpec, stderr io.Writer) (*child, *statsClient, error) {
	c, err := startServer(ctx, spec, stderr)
	if err != nil {
		return nil, nil, err
	}
	sc := newStatsClient(c.addr)
	st, err := sc.get(ctx, "gc=0")
	if err == nil && st.Impl != spec.impl {
		err = fmt.Errorf("server runs impl %q, want %q", st.Impl, spec.impl)
	}
	if err != nil {
		sc.close()
		c.stop()
		return nil, nil, err
	}
	return c, sc, nil
}

// serverEnd is one conn the server saw end, from /events.
type serverEnd struct {
	Remote     string `json:"remote"`
	AtNS       int64  `json:"at_ns"`
	Heartbeat  bool   `json:"heartbeat"`
	LastPongNS int64  `json:"last_pong_ns"`
}

// serverEvents is the server's /events: every end and every accept since
// it started.
type serverEvents struct {
	Ends    []serverEnd `json:"ends"`
	Accepts []int64     `json:"accepts"`
}

func (s *statsClient) events(ctx context.Context) (*serverEvents, error) {
	var buf bytes.Buffer
	if err := s.fetch(ctx, "/events", &buf); err != nil {
		return nil, err
	}
	ev := new(serverEvents)
	if err := json.Unmarshal(buf.Bytes(), ev); err != nil {
		return nil, fmt.Errorf("/events: %w", err)
	}
	return ev, nil
}

// waitOpen polls /stats until the server has want conns open, or ctx ends.
// every is the polling period.
func waitOpen(ctx context.Context, sc *statsClient, want int64, every time.Duration) (Stats, error) {
	for {
		st, err := sc.get(ctx, "gc=0")
		if err != nil {
			return st, err
		}
		if st.Open == want {
			return st, nil
		}
		select {
		case <-ctx.Done():
			return st, fmt.Errorf("server has %d conns open, want %d: %w", st.Open, want, ctx.Err())
		case <-time.After(every):
		}
	}
}

// connPool holds a scenario's client conns.
type connPool struct {
	srcs *sources
	ad   adapter
	url  string
	// handlers returns the handlers of the i-th conn dialled; nil: none.
	handlers func(i int) connHandlers

	mu    sync.Mutex
	conns []loadConn

	closing atomic.Bool
	lost    atomic.Int64 // conns that ended other than by close
	next    atomic.Int64 // dial index
}

func newConnPool(srcs *sources, ad adapter, url string) *connPool {
	return &connPool{srcs: srcs, ad: ad, url: url}
}

// dialAll opens n conns, concurrency at a time, so that the server's accept
// backlog is never overrun. It stops at the first conn that cannot be made.
func (p *connPool) dialAll(ctx context.Context, n, concurrency int) error {
	err := forEach(ctx, n, concurrency, func(ctx context.Context, _ int) error {
		_, err := p.dial(ctx)
		return err
	})
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	return nil
}

// dial opens one more conn, with two retries, and keeps it.
func (p *connPool) dial(ctx context.Context) (loadConn, error) {
	i := int(p.next.Add(1) - 1)
	var h connHandlers
	if p.handlers != nil {
		h = p.handlers(i)
	}
	ended := h.ended
	h.ended = func() {
		if !p.closing.Load() {
			p.lost.Add(1)
		}
		if ended != nil {
			ended()
		}
	}
	src := p.srcs.pick(i)
	var err error
	for attempt := range 3 {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("conn %d: %w", i, err)
			case <-time.After(time.Duration(attempt) * 100 * time.Millisecond):
			}
		}
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		var c loadConn
		c, err = p.ad.dial(dctx, src, p.url, h)
		cancel()
		if err == nil {
			p.mu.Lock()
			p.conns = append(p.conns, c)
			p.mu.Unlock()
			return c, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("conn %d: %w", i, err)
}

// list returns the conns kept, in the order they were made.
func (p *connPool) list() []loadConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]loadConn(nil), p.conns...)
}

// close drops every conn, a few dozen at a time, and gives up waiting after
// timeout.
func (p *connPool) close(timeout time.Duration) error {
	p.closing.Store(true)
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	return closeConns(conns, false, timeout)
}

// closeConns closes conns, 32 at a time, within timeout.
func closeConns(conns []loadConn, graceful bool, timeout time.Duration) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		work := make(chan loadConn)
		var wg sync.WaitGroup
		for range min(32, len(conns)) {
			wg.Go(func() {
				for c := range work {
					c.close(graceful)
				}
			})
		}
		for _, c := range conns {
			work <- c
		}
		close(work)
		wg.Wait()
	}()
	select {
	case <-done:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("client conns still closing %v after close", timeout)
	}
}

// freePort returns a TCP port of 127.0.0.1 that nothing listens on now.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// forEach64 calls f for every item, 64 at a time, and returns when all
// calls have.
func forEach64[T any](items []T, f func(T)) {
	work := make(chan T)
	var wg sync.WaitGroup
	for range min(64, len(items)) {
		wg.Go(func() {
			for it := range work {
				f(it)
			}
		})
	}
	for _, it := range items {
		work <- it
	}
	close(work)
	wg.Wait()
}
