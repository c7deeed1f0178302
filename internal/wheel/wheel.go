// Package wheel is a hashed timing wheel: one goroutine and one ticker serve
// any number of timers, each timer is an intrusive list node embedded in its
// owner, and nothing is allocated to arm, move or fire a timer.
//
// It exists so that 100,000 idle connections cost one ticker between them
// instead of one timer goroutine each. Resolution is one tick: a timer due at
// t fires during the first tick at or after t, never before it.
package wheel

import (
	"sync"
	"time"
)

const slotCount = 512 // power of two; one rotation is 512 ticks

// Func is called when a timer is due, on the wheel's goroutine, with the
// tick's time. It returns when the timer should fire next, or the zero Time
// to disarm it. It must not block: hand slow work to another goroutine.
type Func func(now time.Time) (next time.Time)

// Timer is one timer on a wheel. Embed it in the object it serves; the zero
// value is disarmed.
type Timer struct {
	next, prev *Timer
	due        int64 // tick number at which it fires
	armed      bool
	fn         Func
}

// Wheel is a timing wheel. It is safe for use by multiple goroutines.
// Its goroutine runs only while at least one timer is registered with Add.
type Wheel struct {
	tick  time.Duration
	start time.Time // tick n ends at start + n·tick

	mu      sync.Mutex
	slots   [slotCount]Timer // list heads (sentinels)
	cur     int64            // next tick to process
	members int              // timers between Add and Remove
	stop    chan struct{}    // closed to stop the goroutine; nil when not running
	done    chan struct{}    // closed when the goroutine has returned
}

// New returns a wheel that fires timers with the given resolution.
func New(tick time.Duration) *Wheel {
	if tick <= 0 {
		panic("wheel: tick must be positive")
	}
	w := &Wheel{tick: tick}
	for i := range w.slots {
		w.slots[i].next = &w.slots[i]
		w.slots[i].prev = &w.slots[i]
	}
	return w
}

// Tick returns the wheel's resolution.
func (w *Wheel) Tick() time.Duration { return w.tick }

// Add registers t with fn, arms it for at, and starts the wheel's goroutine
// if it is not running. A registered timer must be removed with Remove.
func (w *Wheel) Add(t *Timer, fn Func, at time.Time) {
	w.mu.Lock()
	t.fn = fn
	w.members++
	if w.stop == nil {
		// A stopped goroutine may still be returning; it no longer touches
		// the wheel's state once it has seen its stop channel closed.
		w.stop = make(chan struct{})
		w.done = make(chan struct{})
		// No timer is armed while no goroutine runs, so the time origin can
		// move: ticks count from now, whatever clock the last run used.
		w.start = time.Now()
		w.cur = 0
		go w.run(w.stop, w.done)
	}
	w.armLocked(t, at)
	w.mu.Unlock()
}

// Reset re-arms a registered timer for at (or disarms it for the zero Time).
func (w *Wheel) Reset(t *Timer, at time.Time) {
	w.mu.Lock()
	if t.fn != nil {
		w.armLocked(t, at)
	}
	w.mu.Unlock()
}

// Remove disarms and unregisters t. When it was the last timer, the wheel's
// goroutine is told to stop. Remove does not wait for it: use Wait for that.
// A Func already running may still return a time; it is ignored.
func (w *Wheel) Remove(t *Timer) {
	w.mu.Lock()
	if t.fn == nil {
		w.mu.Unlock()
		return
	}
	w.unlinkLocked(t)
	t.fn = nil
	w.members--
	if w.members == 0 && w.stop != nil {
		close(w.stop)
		w.stop = nil
	}
	w.mu.Unlock()
}

// Wait blocks until the wheel's goroutine, if one was stopped by Remove,
// has returned. It is for owners that must account for every goroutine.
func (w *Wheel) Wait() {
	w.mu.Lock()
	done, running := w.done, w.stop != nil
	w.mu.Unlock()
	if done != nil && !running {
		<-done
	}
}

func (w *Wheel) tickOf(at time.Time) int64 {
	d := at.Sub(w.start)
	if d <= 0 {
		return 0
	}
	// Round up: a timer must never fire before its time.
	return int64((d + w.tick - 1) / w.tick)
}

func (w *Wheel) armLocked(t *Timer, at time.Time) {
	w.unlinkLocked(t)
	if at.IsZero() {
		return
	}
	n := max(w.tickOf(at), w.cur)
	t.due = n
	head := &w.slots[n&(slotCount-1)]
	t.prev = head.prev
	t.next = head
	head.prev.next = t
	head.prev = t
	t.armed = true
}

func (w *Wheel) unlinkLocked(t *Timer) {
	if !t.armed {
		return
	}
	t.prev.next = t.next
	t.next.prev = t.prev
	t.next, t.prev = nil, nil
	t.armed = false
}

func (w *Wheel) run(stop, done chan struct{}) {
	defer close(done)
	ticker := time.NewTicker(w.tick)
	defer ticker.Stop()
	var due []*Timer // reused across ticks: firing allocates nothing
	for {
		select {
		case <-stop:
			return
		case now := <-ticker.C:
			due = w.advance(now, stop, due[:0])
		}
	}
}

// advance fires every timer due up to now. Ticks missed while the process
// was descheduled are caught up, so no timer is skipped.
func (w *Wheel) advance(now time.Time, stop chan struct{}, due []*Timer) []*Timer {
	w.mu.Lock()
	select {
	case <-stop:
		w.mu.Unlock()
		return due
	default:
	}
	last := int64(now.Sub(w.start) / w.tick)
	// Far behind, one visit of every slot finds every due timer.
	w.cur = max(w.cur, last-slotCount+1)
	for ; w.cur <= last; w.cur++ {
		head := &w.slots[w.cur&(slotCount-1)]
		for t := head.next; t != head; {
			next := t.next
			if t.due <= last {
				w.unlinkLocked(t)
				due = append(due, t)
			}
			t = next
		}
	}
	w.mu.Unlock()

	for i, t := range due {
		w.mu.Lock()
		fn := t.fn
		w.mu.Unlock()
		if fn == nil { // removed meanwhile
			due[i] = nil
			continue
		}
		next := fn(now)
		w.mu.Lock()
		if t.fn != nil && !t.armed && !next.IsZero() {
			w.armLocked(t, next)
		}
		w.mu.Unlock()
		due[i] = nil
	}
	return due
}
