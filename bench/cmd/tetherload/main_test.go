package main

import (
	"context"
	"errors"
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

// TestIdle runs the idle scenario end to end on a small scale: a server
// process, 50 client conns over several source IPs, heartbeats firing
// every 50 ms.
func TestIdle(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 45*time.Second)
	defer cancel()
	const n = 50
	cfg := idleConfig{
		n:           n,
		interval:    50 * time.Millisecond,
		timeout:     time.Second, // pings every 50 ms; no drop on a loaded CI machine
		hold:        time.Second,
		sample:      250 * time.Millisecond,
		sources:     49,
		concurrency: 64,
		setup:       20 * time.Second,
	}
	res, err := runIdle(ctx, cfg, t.Output())
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
	if g := res.GoroutinesPerConn; g < 0.5 || g > 1.5 {
		t.Errorf("%.3f goroutines per conn, want 1 (within 0.5 .. 1.5)", g)
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
