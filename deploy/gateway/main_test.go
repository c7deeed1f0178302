package main

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The gateway as Kubernetes runs it: a process that serves /ws, /ready,
// /healthz and /metrics, and on SIGTERM turns /ready to 503 at once, moves
// its conns over -drain, a few at a time, and exits 0.
func TestGatewayDrainsOnSIGTERM(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "gateway")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	const drain = 2 * time.Second
	cmd := exec.Command(bin, "-addr", "127.0.0.1:0", "-drain", drain.String())
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	var logs strings.Builder
	var logMu sync.Mutex
	first := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case first <- sc.Text():
			default:
			}
			logMu.Lock()
			logs.WriteString(sc.Text() + "\n")
			logMu.Unlock()
		}
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	var addr string
	select {
	case line := <-first:
		var ok bool
		if addr, ok = strings.CutPrefix(line, "gateway on "); !ok {
			t.Fatalf("first line %q, want the address", line)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the gateway did not start")
	}
	base := "http://" + addr
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(base + path)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}

	const n = 20
	var (
		mu    sync.Mutex
		drops []time.Time
	)
	ctx := context.Background()
	var clients []*tether.Client
	for range n {
		c, err := tether.Dial(ctx, "ws://"+addr+"/ws",
			tether.WithBackoff(tether.Backoff{Base: 5 * time.Second, Max: 5 * time.Second}),
			tether.WithObserver(tether.Observer{State: func(s tether.State, _ error) {
				if s == tether.Reconnecting {
					mu.Lock()
					drops = append(drops, time.Now())
					mu.Unlock()
				}
			}}))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
	}
	if code, body := get("/ready"); code != http.StatusOK {
		t.Fatalf("/ready: %d %s before SIGTERM", code, body)
	}
	if code, _ := get("/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz: %d", code)
	}
	if code, body := get("/metrics"); code != http.StatusOK || !strings.Contains(body, "tether_connections 20") {
		t.Fatalf("/metrics: %d, want tether_connections 20 among:\n%.2000s", code, body)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	// Not ready at once, while conns are still being moved.
	deadline := time.Now().Add(drain / 2)
	for {
		code, _ := get("/ready")
		if code == http.StatusServiceUnavailable {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/ready still %d %v after SIGTERM", code, time.Since(sent))
		}
		time.Sleep(20 * time.Millisecond)
	}
	mu.Lock()
	early := len(drops)
	mu.Unlock()
	if early == n {
		t.Errorf("every conn was dropped before /ready turned 503")
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			logMu.Lock()
			t.Fatalf("the gateway exited with %v:\n%s", err, logs.String())
		}
	case <-time.After(drain + 20*time.Second):
		t.Fatal("the gateway did not exit after the drain")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(drops) != n {
		t.Fatalf("%d of %d clients saw their conn go", len(drops), n)
	}
	if spread := drops[len(drops)-1].Sub(drops[0]); spread < drain/2 {
		t.Errorf("the %d conns went within %v, want them spread over about %v", n, spread, drain)
	}
	for _, c := range clients {
		if c.State() == tether.Connected {
			t.Error("a client still connected to a gateway that exited")
		}
	}
}
