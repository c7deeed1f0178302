package park

import (
	"errors"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Races between the poller, raw reads and writes, and closes, for a
// second each: run them longer with -count to look harder.

const stressFor = time.Second

// onePair is a parked server conn and its peer, made on any goroutine.
func onePair(ln net.Listener) (pair, error) {
	peer, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return pair{}, err
	}
	nc, err := ln.Accept()
	if err != nil {
		peer.Close()
		return pair{}, err
	}
	pc := newConn(nc, nil)
	o := newOwner()
	o.resume = make(chan struct{}, 1<<16)
	pc.Bind(o)
	if !pc.Park() {
		nc.Close()
		peer.Close()
		return pair{}, errors.New("not parked")
	}
	return pair{pc, o, peer}, nil
}

// The poller starts and stops over and over, with pongs in flight.
func TestStressPollerChurn(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	var mu sync.Mutex // Accept pairing
	end := time.Now().Add(stressFor)
	var iters atomic.Int64
	for g := range 4 {
		wg.Go(func() {
			for i := 0; time.Now().Before(end); i++ {
				mu.Lock()
				p, err := onePair(ln)
				mu.Unlock()
				if err != nil {
					t.Error(err)
					return
				}
				want := uint64(g*1_000_000 + i + 1)
				p.o.want.Store(want)
				if _, err := p.peer.Write(pongFrame(want)); err != nil {
					t.Error(err)
					return
				}
				if rand.IntN(2) == 0 {
					deadline := time.Now().Add(10 * time.Second)
					for p.o.pongs.Load() == 0 {
						if time.Now().After(deadline) {
							t.Error("pong not settled")
							return
						}
						time.Sleep(50 * time.Microsecond)
					}
				}
				p.o.ending.Store(true)
				_ = p.pc.Close()
				p.pc.Release()
				_ = p.peer.Close()
				iters.Add(1)
			}
		})
	}
	wg.Wait()
	t.Logf("%d iterations", iters.Load())
	if Running() {
		t.Fatal("poller still running")
	}
}

// Conns close while the poller reads their pongs and pings are written,
// and new sockets take the freed numbers: none of them gets a byte.
func TestStressCloseVsRawIO(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	vln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer vln.Close()
	var stray atomic.Int64
	var wg sync.WaitGroup
	end := time.Now().Add(stressFor)
	var mu sync.Mutex
	keep, err := onePair(ln) // keeps the poller running throughout
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = keep.pc.Close(); keep.pc.Release(); _ = keep.peer.Close() }()
	for range 4 {
		wg.Go(func() {
			for i := 0; time.Now().Before(end); i++ {
				mu.Lock()
				p, err := onePair(ln)
				mu.Unlock()
				if err != nil {
					t.Error(err)
					return
				}
				stop := make(chan struct{})
				var inner sync.WaitGroup
				inner.Go(func() { // the wheel's pings
					for k := uint64(1); ; k++ {
						select {
						case <-stop:
							return
						default:
						}
						p.pc.Ping(k)
						time.Sleep(time.Duration(rand.IntN(50)) * time.Microsecond)
					}
				})
				inner.Go(func() { // the peer's pongs
					for k := uint64(1); ; k++ {
						select {
						case <-stop:
							return
						default:
						}
						p.o.want.Store(k)
						if _, err := p.peer.Write(pongFrame(k)); err != nil {
							return
						}
						time.Sleep(time.Duration(rand.IntN(50)) * time.Microsecond)
					}
				})
				time.Sleep(time.Duration(rand.IntN(500)) * time.Microsecond)
				_ = p.pc.Close() // not ending: as coder/websocket's timeout
				// New sockets, likely on the freed number.
				mu.Lock()
				v, err := net.Dial("tcp", vln.Addr().String())
				var va net.Conn
				if err == nil {
					va, err = vln.Accept()
				}
				mu.Unlock()
				if err != nil {
					t.Error(err)
					close(stop)
					inner.Wait()
					return
				}
				time.Sleep(200 * time.Microsecond)
				close(stop)
				inner.Wait()
				p.o.ending.Store(true)
				p.pc.Release()
				_ = p.peer.Close()
				for _, c := range []net.Conn{v, va} {
					_ = c.SetReadDeadline(time.Now().Add(time.Millisecond))
					if n, _ := c.Read(make([]byte, 64)); n > 0 {
						stray.Add(int64(n))
					}
					_ = c.Close()
				}
			}
		})
	}
	wg.Wait()
	if n := stray.Load(); n > 0 {
		t.Fatalf("%d stray bytes reached new sockets", n)
	}
}
