package main

import (
	"bytes"
	"context"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// syncBuffer is written by run and read by the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Through several restarts of the demo hub, the client prints every tick
// once, in order, and its state changes.
func TestClientThroughRestarts(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	demoErr := make(chan error, 1)
	go func() {
		defer wg.Done()
		demoErr <- demo(ctx, ln, "ticks", 10*time.Millisecond, 300*time.Millisecond)
	}()
	var out syncBuffer
	runErr := make(chan error, 1)
	go func() {
		defer wg.Done()
		runErr <- run(ctx, "ws://"+ln.Addr().String()+"/ws", "ticks", &out)
	}()
	// Until the client has come back from three restarts.
	deadline := time.Now().Add(20 * time.Second)
	for strings.Count(out.String(), "state: connected") < 4 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	cancel()
	wg.Wait()
	if err := <-demoErr; err != nil {
		t.Errorf("demo: %v", err)
	}
	if err := <-runErr; err != nil {
		t.Errorf("run: %v", err)
	}

	text := out.String()
	if n := strings.Count(text, "state: reconnecting"); n < 3 {
		t.Errorf("%d reconnects, want at least 3:\n%s", n, text)
	}
	if strings.Contains(text, "gap") || strings.Contains(text, "resync") {
		t.Errorf("the client missed messages:\n%s", text)
	}
	ticks := regexp.MustCompile(`(?m)^ticks #(\d+) \{"tick":(\d+),`).FindAllStringSubmatch(text, -1)
	if len(ticks) < 30 {
		t.Fatalf("%d ticks printed:\n%s", len(ticks), text)
	}
	first, _ := strconv.Atoi(ticks[0][2])
	for i, m := range ticks {
		if n, _ := strconv.Atoi(m[2]); n != first+i {
			t.Fatalf("tick %d printed where %d was due: lost or repeated\n%s", n, first+i, text)
		}
	}
}
