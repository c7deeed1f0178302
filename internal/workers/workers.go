// Package workers keeps the goroutines that ran a task for the next one.
//
// Why: a conn's writer is a goroutine started when data is queued for an
// idle conn, and it ends once the queue is empty. A paced publisher to
// 1,000 subscribers starts 1,000 of them per message, and each one's stack
// grows from the runtime's 2 KiB start to reach the socket's write call,
// which copies it: in CPU profiles of that load the growth alone was 16 %
// of the server's time. A worker that has written once keeps its stack for
// the next writer. Tasks may block (a writer waits for a slow peer's
// socket); a task never waits for a worker, since one is started when none
// is idle.
package workers

import (
	"sync"
	"time"
)

// A Pool runs tasks on goroutines it keeps, up to MaxIdle of them idle,
// each for at most IdleTimeout. The zero Pool is not usable: see New.
type Pool struct {
	maxIdle int
	ttl     time.Duration

	mu     sync.Mutex
	idle   []*worker // the most recently idle last: taken first, warmest
	closed bool
	sweep  *time.Timer // armed while any worker is idle
	wg     sync.WaitGroup
}

type worker struct {
	task  chan func() // one task at a time; closed to stop the worker
	since time.Time   // when it became idle
}

// New returns a pool that keeps at most maxIdle idle workers, each for at
// most ttl.
func New(maxIdle int, ttl time.Duration) *Pool {
	return &Pool{maxIdle: maxIdle, ttl: ttl}
}

// Go runs task on an idle worker, or on a new one. Once the pool is
// closed, task runs on a goroutine of its own, which the pool does not
// wait for: the caller owns it, as it would a go statement's.
func (p *Pool) Go(task func()) {
	p.mu.Lock()
	if n := len(p.idle); n > 0 {
		w := p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		w.task <- task // buffered, and w waits for it: never blocks
		return
	}
	if p.closed {
		p.mu.Unlock()
		go task()
		return
	}
	p.wg.Add(1)
	p.mu.Unlock()
	go p.run(&worker{task: make(chan func(), 1)}, task)
}

func (p *Pool) run(w *worker, task func()) {
	defer p.wg.Done()
	for {
		task()
		if !p.park(w) {
			return
		}
		var ok bool
		if task, ok = <-w.task; !ok {
			return
		}
	}
}

// park puts w among the idle workers, and reports false when w should end
// instead: the pool is closed or has enough idle workers.
func (p *Pool) park(w *worker) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || len(p.idle) >= p.maxIdle {
		return false
	}
	w.since = time.Now()
	p.idle = append(p.idle, w)
	if p.sweep == nil {
		p.sweep = time.AfterFunc(p.ttl, p.trim)
	}
	return true
}

// trim ends the workers idle for ttl or longer, and is armed again while
// any stay idle.
func (p *Pool) trim() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	now := time.Now()
	old := 0 // the oldest idle are first
	for old < len(p.idle) && now.Sub(p.idle[old].since) >= p.ttl {
		close(p.idle[old].task)
		old++
	}
	p.idle = append(p.idle[:0], p.idle[old:]...)
	clear(p.idle[len(p.idle) : len(p.idle)+old])
	if len(p.idle) == 0 {
		p.sweep = nil
		return
	}
	p.sweep.Reset(p.ttl - now.Sub(p.idle[0].since))
}

// Idle returns the number of idle workers.
func (p *Pool) Idle() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// Close ends the idle workers, and the others once their tasks return,
// and waits for them. Tasks given to Go afterwards run on goroutines of
// their own.
func (p *Pool) Close() {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		for _, w := range p.idle {
			close(w.task)
		}
		p.idle = nil
		if p.sweep != nil {
			p.sweep.Stop()
		}
	}
	p.mu.Unlock()
	p.wg.Wait()
}
