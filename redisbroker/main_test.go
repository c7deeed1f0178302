package redisbroker_test

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/redisbroker"
	"go.uber.org/goleak"
)

// nodeEnv, when set to a Redis address, makes the test binary run a node
// (a hub with the Redis broker, serving on loopback) instead of the
// tests: the parent test starts it with startProc, to have a node in
// another OS process that it can kill -9.
const nodeEnv = "REDISBROKER_NODE"

func TestMain(m *testing.M) {
	if addr := os.Getenv(nodeEnv); addr != "" {
		os.Exit(runNode(addr))
	}
	// go-redis leaves no goroutine behind once its clients are closed,
	// which every test does: nothing is ignored.
	goleak.VerifyTestMain(m)
}

// The short settings every node of the suite uses, in this process and
// in the node processes (the same binary, so the same constants).
const (
	nodeTTL       = 600 * time.Millisecond // a killed node is reaped within about this
	presenceGrace = 100 * time.Millisecond
	hbInterval    = 50 * time.Millisecond
	hbTimeout     = 1500 * time.Millisecond
	historyLen    = 1000
	inboxLen      = 50
	probeTopic    = "probe"
)

// brokerBackoff is how fast a broker tries Redis again.
var brokerBackoff = tether.Backoff{Base: 20 * time.Millisecond, Max: 300 * time.Millisecond}

// clientBackoff is how fast a tether.Client reconnects.
var clientBackoff = tether.Backoff{Base: 20 * time.Millisecond, Max: 300 * time.Millisecond}

// newRedisClient is the Redis client of a node.
func newRedisClient(addr string) *redis.Client {
	return redis.NewClient(&redis.Options{Addr: addr, DialTimeout: time.Second})
}

// newClusterClient is the Redis client of a node on a cluster.
func newClusterClient(addrs []string) *redis.ClusterClient {
	return redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, DialTimeout: time.Second})
}

// newSentinelClient is the Redis client of a node behind Sentinel.
func newSentinelClient(master string, sentinels []string) *redis.Client {
	return redis.NewFailoverClient(&redis.FailoverOptions{MasterName: master, SentinelAddrs: sentinels, DialTimeout: time.Second})
}

// nodeOptions are the hub options of every node: the Redis broker with
// short settings, users from the query parameter "user", presence on
// every topic, fast heartbeats.
func nodeOptions(rdb redis.UniversalClient, logger *slog.Logger) []tether.HubOption {
	opts, _ := nodeBroker(rdb, logger)
	return opts
}

// nodeBroker is nodeOptions, with the node's broker.
func nodeBroker(rdb redis.UniversalClient, logger *slog.Logger) ([]tether.HubOption, *redisbroker.Broker) {
	b := redisbroker.New(rdb,
		redisbroker.WithNodeTTL(nodeTTL),
		redisbroker.WithBackoff(brokerBackoff),
		redisbroker.WithHistory(historyLen, time.Minute),
		redisbroker.WithOffline(100, time.Hour),
		redisbroker.WithInbox(inboxLen, time.Hour),
		redisbroker.WithLogger(logger),
	)
	return []tether.HubOption{
		tether.WithBroker(b),
		tether.WithAuth(func(r *http.Request) (string, error) { return r.URL.Query().Get("user"), nil }),
		tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Grace: presenceGrace} }),
		tether.WithHeartbeat(hbInterval, hbTimeout),
		tether.WithLogger(logger),
	}, b
}

// brokerUp reports whether the hub's broker is linked: a publication
// (to a topic nobody holds) went through Redis rather than falling back
// to this node alone, which Stats().LocalOnly would count.
func brokerUp(h *tether.Hub) bool {
	before := h.Stats().LocalOnly
	if err := h.Publish(probeTopic, []byte(`0`)); err != nil {
		return false
	}
	return h.Stats().LocalOnly == before
}

// runNode is the node process: it serves the hub on /ws and a few
// controls for the parent test, prints its address on stdout, and runs
// until stdin closes (the parent stops it, or died) or it is killed.
func runNode(redisAddr string) int {
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	rdb := newRedisClient(redisAddr)
	defer rdb.Close()
	hub, err := tether.NewHub(nodeOptions(rdb, logger)...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "node: NewHub:", err)
		return 1
	}
	defer hub.Close()
	mux := http.NewServeMux()
	mux.Handle("/ws", hub)
	mux.HandleFunc("/ready", func(w http.ResponseWriter, r *http.Request) {
		if !brokerUp(hub) {
			http.Error(w, "broker not linked", http.StatusServiceUnavailable)
		}
	})
	mux.HandleFunc("/publish", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if err := hub.Publish(q.Get("topic"), []byte(q.Get("data"))); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
	})
	mux.HandleFunc("/send", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if err := hub.SendToUser(q.Get("user"), []byte(q.Get("data"))); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "node: listen:", err)
		return 1
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	defer srv.Close()
	fmt.Println(ln.Addr().String())
	io.Copy(io.Discard, os.Stdin)
	return 0
}

// procNode is a node running in a process of its own.
type procNode struct {
	t      testing.TB
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	addr   string
	stderr *logBuffer
	done   chan struct{} // closed once the process has been waited for
	http   *http.Client
}

// startProc starts a node process linked to the Redis at redisAddr and
// waits until its broker is linked. It is stopped when the test ends.
func startProc(t testing.TB, redisAddr string) *procNode {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), nodeEnv+"="+redisAddr)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	addrs := make(chan string, 1)
	p := &procNode{
		t:      t,
		cmd:    cmd,
		stderr: &logBuffer{},
		done:   make(chan struct{}),
		http:   &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}},
	}
	cmd.Stdout = &firstLine{ch: addrs}
	cmd.Stderr = p.stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.stdin = stdin
	if err := cmd.Start(); err != nil {
		t.Fatalf("start node process: %v", err)
	}
	go func() {
		cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("node process %s stderr:\n%s", p.addr, p.stderr.String())
		}
	})
	select {
	case p.addr = <-addrs:
	case <-p.done:
		t.Fatalf("node process exited at start: %v\n%s", cmd.ProcessState, p.stderr.String())
	case <-time.After(20 * time.Second):
		t.Fatalf("node process printed no address in 20 s\n%s", p.stderr.String())
	}
	waitUntil(t, 10*time.Second, "the node process's broker to link", func() bool {
		resp, err := p.http.Get("http://" + p.addr + "/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return p
}

func (p *procNode) url(user string) string {
	return "ws://" + p.addr + "/ws?user=" + url.QueryEscape(user)
}

// call makes the node do something (path /publish or /send), failing the
// test if it cannot.
func (p *procNode) call(t testing.TB, path string, q url.Values) {
	t.Helper()
	resp, err := p.http.Get("http://" + p.addr + path + "?" + q.Encode())
	if err != nil {
		t.Errorf("node process %s: %v", path, err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Errorf("node process %s: %s: %s", path, resp.Status, b)
	}
}

// publish makes the node process publish data (JSON) to topic.
func (p *procNode) publish(t testing.TB, topic, data string) {
	t.Helper()
	p.call(t, "/publish", url.Values{"topic": {topic}, "data": {data}})
}

// kill kills the process with SIGKILL, as a crash would: it says goodbye
// to no one. It returns once the process is gone.
func (p *procNode) kill() {
	p.cmd.Process.Kill()
	<-p.done
}

// stop asks the process to end (stdin closed), and kills it if it has
// not within 5 s.
func (p *procNode) stop() {
	p.stdin.Close()
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.kill()
	}
}

// firstLine passes the first line written to it to ch, and swallows the
// rest.
type firstLine struct {
	mu   sync.Mutex
	buf  strings.Builder
	ch   chan string
	sent bool
}

func (f *firstLine) Write(b []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.sent {
		return len(b), nil
	}
	f.buf.Write(b)
	if line, _, ok := strings.Cut(f.buf.String(), "\n"); ok {
		f.sent = true
		f.ch <- strings.TrimSpace(line)
	}
	return len(b), nil
}

// logBuffer collects log output safely from many goroutines.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitUntil polls cond every 10 ms until it holds, and fails the test if
// it does not within limit. It returns how long it took.
func waitUntil(t testing.TB, limit time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			t.Fatalf("timed out after %v waiting for %s", limit, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}
