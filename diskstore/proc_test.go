package diskstore_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
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

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/diskstore"
	"golang.org/x/time/rate"
)

// This file runs a hub over the store in a process of its own, which a
// test can kill -9 and start again on the same file and address: the test
// binary runs itself with -test.run=^TestHelperServer$ and helperEnv set.

const (
	helperEnv     = "DISKSTORE_HELPER_DB"   // the store's file
	helperAddrEnv = "DISKSTORE_HELPER_ADDR" // where to listen
	addrPrefix    = "helper listening on "
)

// helperHubOptions are the options of the helper's hub: users from the
// query parameter "user", clients may publish anywhere as fast as they
// like, no presence messages in the streams the tests read.
// With st nil, the first two (the store) are nil: the hub's defaults.
func helperHubOptions(st *diskstore.Store) []tether.HubOption {
	var hist, off tether.HubOption
	if st != nil {
		hist, off = tether.WithHistory(st.History()), tether.WithOfflineStore(st.Offline())
	}
	return []tether.HubOption{
		hist,
		off,
		tether.WithAuth(func(r *http.Request) (string, error) { return r.URL.Query().Get("user"), nil }),
		tether.WithClientPublish(func(*tether.Conn, string) bool { return true }),
		tether.WithRateLimit(rate.Inf, 0),
		tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Off: true} }),
	}
}

// runHelperServer is the hub process of the kill -9 tests, which start
// this test binary with helperEnv set (TestMain runs it instead of the
// tests). It serves the hub on /ws, SendToUser on /send?user=&data=, the
// hub's Stats on /stats, the store's Inbox on /inbox?user=&data= (Append:
// answers the position as JSON) and /pending?user= (Pending: answers
// {"epoch":..., "entries":[{"Seq":1,"Data":"<base64>"}]}), prints its
// address, and runs until its stdin closes or it is killed. It returns
// the process's exit code.
func runHelperServer(path string) int {
	st, err := diskstore.Open(path, diskstore.WithHistory(10000, time.Hour), diskstore.WithLockTimeout(10*time.Second))
	if err != nil {
		fmt.Fprintln(os.Stderr, "hub process: open:", err)
		return 1
	}
	defer st.Close()
	hub, err := tether.NewHub(helperHubOptions(st)...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "hub process: NewHub:", err)
		return 1
	}
	defer hub.Close()
	mux := http.NewServeMux()
	mux.Handle("/ws", hub)
	mux.HandleFunc("/send", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if err := hub.SendToUser(q.Get("user"), []byte(q.Get("data"))); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
	})
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(hub.Stats())
	})
	mux.HandleFunc("/inbox", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		pos, err := st.Inbox().Append(r.Context(), q.Get("user"), []byte(q.Get("data")))
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		json.NewEncoder(w).Encode(pos)
	})
	mux.HandleFunc("/pending", func(w http.ResponseWriter, r *http.Request) {
		epoch, entries, err := st.Inbox().Pending(r.Context(), r.URL.Query().Get("user"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		json.NewEncoder(w).Encode(inboxPending{epoch, entries})
	})
	var ln net.Listener
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		if ln, err = net.Listen("tcp", os.Getenv(helperAddrEnv)); err == nil || time.Since(start) > 10*time.Second {
			break
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "hub process: listen:", err)
		return 1
	}
	srv := &http.Server{Handler: mux}
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(ln)
	}()
	fmt.Println(addrPrefix + ln.Addr().String())
	io.Copy(io.Discard, os.Stdin)
	srv.Close()
	<-served
	return 0
}

// helperProc is a running hub process.
type helperProc struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	addr   string
	stderr *syncBuffer
	done   chan struct{} // closed once the process was waited for
}

// startHelper starts a hub process on the store at path, listening on
// addr ("127.0.0.1:0" for any port), and waits for it to listen. It is
// killed when the test ends, if it still runs.
func startHelper(t *testing.T, path, addr string) *helperProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+path, helperAddrEnv+"="+addr)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // if this process dies first
	p := &helperProc{cmd: cmd, stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = p.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the hub process: %v", err)
	}
	addrs := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), addrPrefix); ok {
				addrs <- a
			}
		}
		io.Copy(io.Discard, stdout)
		cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("hub process %s stderr:\n%s", p.addr, p.stderr.String())
		}
	})
	select {
	case p.addr = <-addrs:
	case <-p.done:
		t.Fatalf("the hub process exited at start: %v\n%s", cmd.ProcessState, p.stderr.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("the hub process printed no address in 30 s\n%s", p.stderr.String())
	}
	return p
}

// kill kills the process with SIGKILL, as a crash would, and returns once
// it is gone.
func (p *helperProc) kill() {
	p.cmd.Process.Kill()
	<-p.done
}

// stop asks the process to stop (its stdin closes) and waits for it;
// it kills it after 10 s.
func (p *helperProc) stop(t *testing.T) {
	p.stdin.Close()
	select {
	case <-p.done:
		if !p.cmd.ProcessState.Success() {
			t.Errorf("the hub process stopped with %v:\n%s", p.cmd.ProcessState, p.stderr.String())
		}
	case <-time.After(10 * time.Second):
		p.kill()
		t.Errorf("the hub process did not stop in 10 s")
	}
}

func (p *helperProc) url(user string) string {
	return "ws://" + p.addr + "/ws?user=" + url.QueryEscape(user)
}

// duplicates returns how many publications the hub process acked as
// repeats without publishing them (Stats.Duplicates), or -1 if it cannot
// tell.
func (p *helperProc) duplicates() int64 {
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + p.addr + "/stats")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var st tether.Stats
	if json.NewDecoder(resp.Body).Decode(&st) != nil {
		return -1
	}
	return int64(st.Duplicates)
}

// sendToUser makes the hub process call SendToUser.
func (p *helperProc) sendToUser(t *testing.T, user, data string) {
	t.Helper()
	// No keep-alive: the test leaves no conn behind.
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + p.addr + "/send?" + url.Values{"user": {user}, "data": {data}}.Encode())
	if err != nil {
		t.Fatalf("SendToUser: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("SendToUser: %s: %s", resp.Status, b)
	}
}

// inboxPending is the answer of the helper's /pending.
type inboxPending struct {
	Epoch   string
	Entries []adapter.InboxEntry
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
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

// rawPublisher is a protocol v1 client over a bare WebSocket, so that the
// test knows exactly which publications the hub acknowledged, which
// tether.Client does not tell. Like tether.Client, it sends a publication
// that was not acknowledged again on its next conn, with the same id.
type rawPublisher struct {
	url    string
	prefix string // of its ids: 16 bytes and more, so that the hub remembers them
	conn   *websocket.Conn
	lines  chan string   // what the reader read, line by line
	failed chan struct{} // closed when the reader stops: the conn is lost
}

func newRawPublisher(url string) *rawPublisher {
	return &rawPublisher{url: url, prefix: fmt.Sprintf("rawpub-%d-%09d.", os.Getpid(), time.Now().Nanosecond())}
}

// connect dials until a conn is up, for up to 30 s, and reads its welcome.
func (p *rawPublisher) connect(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, _, err := websocket.Dial(ctx, p.url, &websocket.DialOptions{Subprotocols: []string{"tether.v1"}})
		cancel()
		if err == nil {
			p.conn, p.lines, p.failed = c, make(chan string, 1024), make(chan struct{})
			go p.read(c, p.lines, p.failed)
			select {
			case l := <-p.lines:
				if !strings.Contains(l, `"op":"welcome"`) {
					t.Fatalf("first line %s, want a welcome", l)
				}
				return
			case <-p.failed:
				c.CloseNow()
			case <-time.After(5 * time.Second):
				c.CloseNow()
				<-p.failed
				t.Fatal("no welcome in 5 s")
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("raw publisher: no conn in 30 s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *rawPublisher) read(c *websocket.Conn, lines chan<- string, failed chan struct{}) {
	defer close(failed)
	for {
		_, b, err := c.Read(context.Background())
		if err != nil {
			return
		}
		for l := range strings.SplitSeq(string(b), "\n") {
			if l != "" {
				lines <- l
			}
		}
	}
}

// publish sends publication n to topic, with data {"n":n}, and waits for
// its ack. It reports false if the conn was lost first: the ack may or
// may not have been sent.
func (p *rawPublisher) publish(t testing.TB, topic string, n int) bool {
	t.Helper()
	id := p.send(topic, n)
	return id != "" && p.awaitAck(t, id)
}

// send sends publication n to topic without waiting for its ack, and
// returns its id, or "" if the conn was lost.
func (p *rawPublisher) send(topic string, n int) string {
	id := p.prefix + fmt.Sprint(n)
	line := fmt.Sprintf(`{"op":"pub","topic":%q,"data":{"n":%d},"id":%q}`, topic, n, id)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.conn.Write(ctx, websocket.MessageText, []byte(line)); err != nil {
		return ""
	}
	return id
}

// awaitAck waits for the ack of id, answering pings meanwhile.
func (p *rawPublisher) awaitAck(t testing.TB, id string) bool {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case l := <-p.lines:
			var f struct {
				Op, ID string
				TS     json.RawMessage
			}
			if err := json.Unmarshal([]byte(l), &f); err != nil {
				t.Fatalf("raw publisher read %q: %v", l, err)
			}
			switch f.Op {
			case "ack":
				if f.ID == id {
					return true
				}
			case "error":
				t.Fatalf("raw publisher: the hub refused: %s", l)
			case "ping":
				p.conn.Write(context.Background(), websocket.MessageText, []byte(`{"op":"pong","ts":`+string(f.TS)+`}`))
			}
		case <-p.failed:
			return false
		case <-timeout:
			t.Fatalf("raw publisher: no ack of %s in 10 s", id)
		}
	}
}

func (p *rawPublisher) close() {
	if p.conn != nil {
		p.conn.CloseNow()
		<-p.failed
	}
}

// subscriber is a tether.Client subscribed to topics, which records what
// it receives and its resyncs.
type subscriber struct {
	cl *tether.Client

	mu      sync.Mutex
	got     map[string][]tether.Message // by topic
	resyncs []string
	changed chan struct{} // signalled at each message
}

// fastBackoff reconnects within tens of milliseconds.
var fastBackoff = tether.WithBackoff(tether.Backoff{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond})

func newSubscriber(t testing.TB, url string, topics ...string) *subscriber {
	t.Helper()
	s := &subscriber{got: make(map[string][]tether.Message), changed: make(chan struct{}, 1)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := tether.Dial(ctx, url, fastBackoff, tether.WithObserver(tether.Observer{Resync: func(topic string) {
		s.mu.Lock()
		s.resyncs = append(s.resyncs, topic)
		s.mu.Unlock()
	}}))
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { cl.Close() })
	s.cl = cl
	for _, topic := range topics {
		if err := cl.Subscribe(ctx, topic, func(m tether.Message) {
			s.mu.Lock()
			s.got[m.Topic] = append(s.got[m.Topic], m)
			s.mu.Unlock()
			select {
			case s.changed <- struct{}{}:
			default:
			}
		}); err != nil {
			t.Fatalf("Subscribe(%q): %v", topic, err)
		}
	}
	return s
}

// messages returns what s received on topic.
func (s *subscriber) messages(topic string) []tether.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]tether.Message(nil), s.got[topic]...)
}

// distinct counts the distinct data s received on topic.
func (s *subscriber) distinct(topic string) int {
	seen := make(map[string]bool)
	for _, m := range s.messages(topic) {
		seen[string(m.Data)] = true
	}
	return len(seen)
}

// awaitDistinct waits until s has received n distinct messages of topic.
func (s *subscriber) awaitDistinct(t *testing.T, topic string, n int, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for s.distinct(topic) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d distinct messages of %s in %v, want %d", s.distinct(topic), topic, limit, n)
		}
		select {
		case <-s.changed:
		case <-time.After(50 * time.Millisecond):
		}
	}
}
