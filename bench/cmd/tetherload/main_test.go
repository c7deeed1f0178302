package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// runIdle starts its server by re-executing its own executable, which
	// here is the test binary: run as the server then.
	if os.Getenv(childEnv) == "serve" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	goleak.VerifyTestMain(m)
}

// implOf returns the impl name, or fails the test.
func implOf(t *testing.T, name string) implSpec {
	t.Helper()
	im, ok := lookupImpl(name)
	if !ok {
		t.Fatalf("no impl %q", name)
	}
	return im
}

// TestIdle runs the idle scenario end to end on a small scale against bare
// tether conns (-impl tether-conn): a server process, 50 client conns over
// several source IPs, heartbeats firing every 50 ms.
func TestIdle(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 45*time.Second)
	defer cancel()
	const n = 50
	cfg := idleConfig{
		n:      n,
		hold:   time.Second,
		sample: 250 * time.Millisecond,
		loadFlags: loadFlags{
			interval:    50 * time.Millisecond,
			timeout:     time.Second, // pings every 50 ms; no drop on a loaded CI machine
			sources:     49,
			concurrency: 64,
			setup:       20 * time.Second,
		},
	}
	res, err := runIdle(ctx, cfg, implOf(t, "tether-conn"), t.Output())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d conns: %.2f goroutines, %.0f B RSS, %.0f B heap, %.0f B stack per conn; %d pongs in the hold",
		res.Conns, res.GoroutinesPerConn, res.RSSPerConn, res.HeapPerConn, res.StackPerConn, res.HeartbeatPongs)

	if res.Final.Accepted != n || res.Final.Open != n {
		t.Errorf("server accepted %d conns and has %d open at the end, want %d and %d", res.Final.Accepted, res.Final.Open, n, n)
	}
	if res.HeartbeatTimeouts != 0 || res.OtherEnds != 0 || res.ClientReadsEnded != 0 {
		t.Errorf("conns ended during the run: %d by heartbeat timeout, %d otherwise on the server; %d client reads ended",
			res.HeartbeatTimeouts, res.OtherEnds, res.ClientReadsEnded)
	}
	// A parked idle conn may have no goroutine at all; none has more than one.
	if g := res.GoroutinesPerConn; g > 1.5 {
		t.Errorf("%.3f goroutines per conn, want at most 1", g)
	}
	// 50 conns pinged every ~50 ms for 1 s: about a thousand pongs.
	if res.HeartbeatPongs < n {
		t.Errorf("%d heartbeat pongs during the hold, want heartbeats firing (>= %d)", res.HeartbeatPongs, n)
	}
	if len(res.Samples) == 0 {
		t.Error("no /stats sample taken during the hold")
	}
	// The server process is gone.
	if err := syscall.Kill(res.ServerPID, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("server process %d still exists after runIdle: kill(0) = %v", res.ServerPID, err)
	}
}

func TestIdleBadFlags(t *testing.T) {
	var out, errOut writerCounter
	if code := run([]string{"idle", "-n", "0"}, &out, &errOut); code != 1 {
		t.Errorf("idle -n 0: exit code %d, want 1", code)
	}
	if code := run([]string{"idle", "-nope"}, &out, &errOut); code != 2 {
		t.Errorf("idle -nope: exit code %d, want 2", code)
	}
	if code := run([]string{"frobnicate"}, &out, &errOut); code != 2 {
		t.Errorf("unknown subcommand: exit code %d, want 2", code)
	}
	if errOut == 0 {
		t.Error("no error message written")
	}
}

type writerCounter int

func (w *writerCounter) Write(p []byte) (int, error) {
	*w += writerCounter(len(p))
	return len(p), nil
}

// TestIdleImpls runs the idle scenario against the tether hub (/sub,
// subscribed conns), the gorilla pattern and centrifuge (centrifuge-go
// clients): every conn stays, heartbeats fire, nothing is dropped.
func TestIdleImpls(t *testing.T) {
	for _, name := range []string{"tether", "gorilla", "centrifuge"} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			const n = 30
			cfg := idleConfig{
				n: n, hold: time.Second, sample: 500 * time.Millisecond,
				loadFlags: loadFlags{
					interval: 50 * time.Millisecond, timeout: time.Second,
					sources: 49, concurrency: 16, setup: 20 * time.Second,
				},
			}
			res, err := runIdle(ctx, cfg, implOf(t, name), t.Output())
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: %.2f goroutines, %.0f B RSS, %.0f B heap per conn; %d pongs, %.1f µs CPU per pong",
				name, res.GoroutinesPerConn, res.RSSPerConn, res.HeapPerConn, res.HeartbeatPongs, res.CPUPerPong)
			if res.Impl != name || res.Final.Impl != name {
				t.Errorf("result of impl %q, server %q; want %q", res.Impl, res.Final.Impl, name)
			}
			if res.Final.Accepted != n || res.Final.Open != n {
				t.Errorf("server accepted %d conns and has %d open at the end, want %d and %d", res.Final.Accepted, res.Final.Open, n, n)
			}
			if res.HeartbeatTimeouts != 0 || res.OtherEnds != 0 || res.ClientReadsEnded != 0 {
				t.Errorf("conns ended during the run: %d by heartbeat timeout, %d otherwise on the server; %d client reads ended",
					res.HeartbeatTimeouts, res.OtherEnds, res.ClientReadsEnded)
			}
			if res.HeartbeatPongs < n || res.CPUPerPong <= 0 {
				t.Errorf("%d heartbeat pongs during the hold (%.1f µs each), want heartbeats firing (>= %d)", res.HeartbeatPongs, res.CPUPerPong, n)
			}
			if res.GoroutinesPerConn <= 0 {
				t.Errorf("%.3f goroutines per conn, want some", res.GoroutinesPerConn)
			}
		})
	}
}

// TestBroadcast runs the broadcast scenario end to end on a small scale
// against tether, tether's hub with raw peers, the gorilla pattern and
// centrifuge (centrifuge-go clients): a server process fans 200 messages
// out to 50 subscribers; and tether-raw in windows of 40 (-window), whose
// indexes go on from window to window.
func TestBroadcast(t *testing.T) {
	for _, run := range []struct {
		name   string
		window int
	}{{"tether", 0}, {"tether-raw", 0}, {"gorilla", 0}, {"centrifuge", 0}, {"tether-raw", 40}} {
		name, test := run.name, run.name
		if run.window > 0 {
			test = fmt.Sprintf("%s-window-%d", name, run.window)
		}
		t.Run(test, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			cfg := broadcastConfig{
				n: 50, m: 200, size: 64, queue: 256,
				loadFlags: loadFlags{
					interval: time.Second, timeout: 5 * time.Second,
					sources: 49, concurrency: 16, setup: 20 * time.Second,
				},
				deliver: 20 * time.Second, quiet: 3 * time.Second, window: run.window,
			}
			res, err := runBroadcast(ctx, cfg, implOf(t, name), t.Output())
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: %.0f deliveries/s, p50 %.2f ms, p99 %.2f ms, %d frames", name, res.PerSecond, res.P50ms, res.P99ms, res.Frames)
			if want := int64(cfg.n * cfg.m); res.Deliveries != want || res.Missing != 0 {
				t.Errorf("%d deliveries, %d missing; want %d and 0", res.Deliveries, res.Missing, want)
			}
			if res.Duplicates != 0 || res.OutOfOrder != 0 || res.Evicted != 0 {
				t.Errorf("%d duplicates, %d out of order, %d evicted; want none", res.Duplicates, res.OutOfOrder, res.Evicted)
			}
			if res.HeartbeatDrops != 0 || res.OtherEnds != 0 || res.ClientEnded != 0 {
				t.Errorf("conns ended: %d by heartbeat, %d otherwise, %d on the client; want none", res.HeartbeatDrops, res.OtherEnds, res.ClientEnded)
			}
			// centrifuge-go does not show frames: 0.
			framesOK := res.Frames > 0 && res.Frames <= res.Deliveries || name == "centrifuge" && res.Frames == 0
			if res.P50ms <= 0 || res.P99ms < res.P50ms || res.PerSecond <= 0 || !framesOK {
				t.Errorf("implausible figures: %+v", res)
			}
			if run.window > 0 && res.Rate != fmt.Sprintf("windows of %d", run.window) {
				t.Errorf("rate %q, want windows of %d", res.Rate, run.window)
			}
			// The server sends a raw peer each message in a frame of its own.
			if name == "tether-raw" && res.Frames != res.Deliveries {
				t.Errorf("tether-raw: %d frames for %d deliveries, want one each", res.Frames, res.Deliveries)
			}
		})
	}
}

func TestBenchMessage(t *testing.T) {
	for _, size := range []int{48, 64, 200} {
		msg := benchMessage(nil, 1732467891234567890, 42, size)
		if len(msg) != size || !json.Valid(msg) {
			t.Errorf("size %d: %q (%d bytes, valid JSON %v)", size, msg, len(msg), json.Valid(msg))
		}
		line := append([]byte(`{"op":"msg","topic":"bench","epoch":"e","seq":1,"data":`), append(msg, '}')...)
		if ts, i, ok := parseBench(line); !ok || ts != 1732467891234567890 || i != 42 {
			t.Errorf("size %d: parseBench = %d, %d, %v", size, ts, i, ok)
		}
	}
}
