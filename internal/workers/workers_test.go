package workers

import (
	"runtime"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// A worker that finished a task runs the next one: no goroutine is
// started for it.
func TestReuse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(4, time.Minute)
		defer p.Close()
		done := make(chan struct{})
		p.Go(func() { done <- struct{}{} })
		<-done
		synctest.Wait() // the worker is idle
		if got := p.Idle(); got != 1 {
			t.Fatalf("idle workers: %d, want 1", got)
		}
		before := runtime.NumGoroutine()
		p.Go(func() { done <- struct{}{} })
		if now := runtime.NumGoroutine(); now != before {
			t.Fatalf("goroutines %d → %d: a new one was started for the second task", before, now)
		}
		<-done
		synctest.Wait()
		if got := p.Idle(); got != 1 {
			t.Fatalf("idle workers: %d, want 1", got)
		}
	})
}

// Tasks that block do not hold the others up: each runs on a worker of
// its own, and at most maxIdle stay once they are done.
func TestBlockingTasksAndMaxIdle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(3, time.Minute)
		defer p.Close()
		release := make(chan struct{})
		var started sync.WaitGroup
		for range 10 {
			started.Add(1)
			p.Go(func() {
				started.Done()
				<-release
			})
		}
		started.Wait() // all 10 run at once
		close(release)
		synctest.Wait()
		if got := p.Idle(); got != 3 {
			t.Fatalf("idle workers: %d, want 3 (maxIdle)", got)
		}
	})
}

// Idle workers end after ttl, the longest idle first.
func TestIdleTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(8, 10*time.Second)
		defer p.Close()
		var wg sync.WaitGroup
		for range 3 {
			wg.Add(1)
			p.Go(wg.Done)
		}
		wg.Wait()
		synctest.Wait()
		time.Sleep(6 * time.Second)
		wg.Add(1)
		p.Go(wg.Done) // takes one of the 3, idle again from now
		wg.Wait()
		synctest.Wait()
		if got := p.Idle(); got != 3 {
			t.Fatalf("idle workers at 6 s: %d, want 3", got)
		}
		time.Sleep(5 * time.Second) // 11 s: two idle for 11 s, one for 5
		synctest.Wait()
		if got := p.Idle(); got != 1 {
			t.Fatalf("idle workers at 11 s: %d, want 1", got)
		}
		time.Sleep(6 * time.Second)
		synctest.Wait()
		if got := p.Idle(); got != 0 {
			t.Fatalf("idle workers at 17 s: %d, want 0", got)
		}
		before := runtime.NumGoroutine()
		wg.Add(1)
		p.Go(wg.Done) // a new worker
		if now := runtime.NumGoroutine(); now != before+1 {
			t.Fatalf("goroutines %d → %d, want one more", before, now)
		}
		wg.Wait()
	})
}

// Close waits for running tasks and ends idle workers; tasks given after
// it still run.
func TestClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(8, time.Minute)
		release := make(chan struct{})
		var ran sync.WaitGroup
		ran.Add(2)
		p.Go(ran.Done)
		p.Go(func() {
			<-release
			ran.Done()
		})
		synctest.Wait()
		closed := make(chan struct{})
		go func() {
			p.Close()
			close(closed)
		}()
		synctest.Wait()
		select {
		case <-closed:
			t.Fatal("Close returned while a task ran")
		default:
		}
		close(release)
		<-closed
		ran.Wait()
		if got := p.Idle(); got != 0 {
			t.Fatalf("idle workers after Close: %d", got)
		}
		after := make(chan struct{})
		p.Go(func() { close(after) })
		<-after
		p.Close() // twice is fine
	})
}
