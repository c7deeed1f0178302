package wheel

import (
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Timers fire during the first tick at or after their time, never before,
// and at most one tick late.
func TestFiresWithinOneTick(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const tick = 10 * time.Millisecond
		w := New(tick)
		start := time.Now()
		delays := []time.Duration{0, 1 * time.Millisecond, tick, 15 * time.Millisecond, 999 * time.Millisecond,
			slotCount * tick, 3*slotCount*tick + 7*time.Millisecond} // beyond one rotation
		var wg sync.WaitGroup
		timers := make([]Timer, len(delays))
		for i, d := range delays {
			wg.Add(1)
			want := start.Add(d)
			w.Add(&timers[i], func(now time.Time) time.Time {
				got := time.Now()
				if got.Before(want) {
					t.Errorf("timer for +%v fired early at +%v", d, got.Sub(start))
				}
				if got.Sub(want) > tick {
					t.Errorf("timer for +%v fired late at +%v", d, got.Sub(start))
				}
				wg.Done()
				return time.Time{}
			}, want)
		}
		wg.Wait()
		for i := range timers {
			w.Remove(&timers[i])
		}
		w.Wait()
	})
}

// A Func's return value re-arms the timer; Reset moves it; Remove stops it
// and, for the last timer, the wheel's goroutine.
func TestRearmResetRemove(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := New(time.Millisecond)
		var fired atomic.Int32
		var a, b Timer
		w.Add(&a, func(now time.Time) time.Time {
			fired.Add(1)
			return now.Add(10 * time.Millisecond) // periodic
		}, time.Now().Add(10*time.Millisecond))
		time.Sleep(105 * time.Millisecond)
		synctest.Wait()
		if n := fired.Load(); n != 10 {
			t.Fatalf("periodic timer fired %d times in 105ms at 10ms, want 10", n)
		}

		var bFired atomic.Bool
		w.Add(&b, func(time.Time) time.Time { bFired.Store(true); return time.Time{} }, time.Now().Add(time.Hour))
		w.Reset(&b, time.Now().Add(5*time.Millisecond))
		time.Sleep(6 * time.Millisecond)
		synctest.Wait()
		if !bFired.Load() {
			t.Fatal("Reset did not move the timer earlier")
		}

		w.Remove(&a)
		n := fired.Load()
		time.Sleep(50 * time.Millisecond)
		if fired.Load() != n {
			t.Fatal("removed timer fired")
		}
		w.Remove(&b)
		w.Wait() // the goroutine has stopped: synctest would report it otherwise
	})
}

// A stopped wheel starts again on the next Add, with a fresh time origin.
func TestRestart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := New(time.Millisecond)
		for range 3 {
			var tm Timer
			done := make(chan struct{})
			w.Add(&tm, func(time.Time) time.Time { close(done); return time.Time{} }, time.Now().Add(3*time.Millisecond))
			<-done
			w.Remove(&tm)
			w.Wait()
			time.Sleep(time.Second)
		}
	})
}

// BenchmarkTick measures one tick that fires 10,000 due timers, each of
// which re-arms itself: the scheduler's share of a heartbeat round.
func BenchmarkTick(b *testing.B) {
	const n = 10_000
	w := New(time.Hour) // the ticker never fires: advance is driven by hand
	timers := make([]Timer, n)
	var fn Func = func(now time.Time) time.Time { return now.Add(time.Hour) }
	start := time.Now()
	for i := range timers {
		w.Add(&timers[i], fn, start)
	}
	stop := make(chan struct{})
	// One warm-up tick sizes the scratch slice, as the first real tick does.
	due := w.advance(start, stop, nil)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		due = w.advance(start.Add(time.Duration(i+1)*time.Hour), stop, due[:0])
	}
	b.StopTimer()
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/timer")
	for i := range timers {
		w.Remove(&timers[i])
	}
	w.Wait()
}
