package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-ws/tether"
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

// startChat runs the command on a free loopback port until the test ends,
// and returns its base URL (http://127.0.0.1:port).
func startChat(t *testing.T, args ...string) string {
	t.Helper()
	base, stop := runChat(t, "127.0.0.1:0", args...)
	t.Cleanup(stop)
	return base
}

// runChat runs the command on addr until stop is called, and returns its
// base URL (http://127.0.0.1:port). stop waits for run to return, and
// fails the test if it returned an error.
func runChat(t *testing.T, addr string, args ...string) (base string, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var out syncBuffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"-addr", addr}, args...), &out)
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("run: %v\n%s", err, out.String())
				}
			case <-time.After(15 * time.Second):
				t.Errorf("run did not return after its context ended\n%s", out.String())
			}
		})
	}
	listening := regexp.MustCompile(`chat on (http://127\.0\.0\.1:\d+)/`)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if m := listening.FindStringSubmatch(out.String()); m != nil {
			return m[1], stop
		}
		select {
		case err := <-done:
			cancel()
			t.Fatalf("run returned before listening: %v\n%s", err, out.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	stop()
	t.Fatalf("the chat did not say where it listens:\n%s", out.String())
	return "", nil
}

func get(t *testing.T, url string) (*http.Response, []byte) {
	t.Helper()
	res, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res, body
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	res, body := get(t, url)
	if res.StatusCode != http.StatusOK || res.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET %s: %s, %q: %s", url, res.Status, res.Header.Get("Content-Type"), body)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("GET %s: %v: %s", url, err, body)
	}
}

// The page, its script and the browser client are served with their
// types, the client as it is in the repository's js/.
func TestServesPageAndClient(t *testing.T) {
	base := startChat(t)
	repoClient, err := os.ReadFile(filepath.Join("..", "..", "js", "tether.js"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path, ctype, contains string
	}{
		{"/", "text/html; charset=utf-8", `<script type="module" src="/static/chat.js">`},
		{"/?user=ann&room=lobby", "text/html; charset=utf-8", `id="log"`},
		{"/static/chat.js", "text/javascript; charset=utf-8", `from "/tether.js"`},
		{"/static/chat.css", "text/css; charset=utf-8", "#log"},
		{"/tether.js", "text/javascript; charset=utf-8", string(repoClient)},
	} {
		res, body := get(t, base+c.path)
		if res.StatusCode != http.StatusOK {
			t.Errorf("GET %s: %s", c.path, res.Status)
			continue
		}
		if got := res.Header.Get("Content-Type"); got != c.ctype {
			t.Errorf("GET %s: Content-Type %q, want %q", c.path, got, c.ctype)
		}
		if !strings.Contains(string(body), c.contains) {
			t.Errorf("GET %s: the body lacks %.60q", c.path, c.contains)
		}
	}
	// Browsers ask for it whatever the page says: no 404.
	if res, body := get(t, base+"/favicon.ico"); res.StatusCode != http.StatusNoContent || len(body) != 0 {
		t.Errorf("GET /favicon.ico: %s, %d bytes, want 204 and none", res.Status, len(body))
	}
	for _, path := range []string{"/static/nope.js", "/static/", "/nope", "/api/rooms/bad%20name/messages"} {
		if res, _ := get(t, base+path); res.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: %s, want 404", path, res.Status)
		}
	}
}

func dial(t *testing.T, ctx context.Context, base, user string) *tether.Client {
	t.Helper()
	c, err := tether.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+"/ws?user="+user)
	if err != nil {
		t.Fatalf("%s: %v", user, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

type people struct {
	Present []struct {
		User     string
		Conns    int
		Meta     json.RawMessage
		LastSeen *time.Time `json:"last_seen"`
	}
	Away []struct {
		User     string
		LastSeen *time.Time `json:"last_seen"`
	}
}

func (p people) present() (users []string) {
	for _, u := range p.Present {
		users = append(users, u.User)
	}
	return users
}

func (p people) away() (users []string) {
	for _, u := range p.Away {
		users = append(users, u.User)
	}
	return users
}

// Two users in a room: one's publication reaches the other, the room's
// transcript keeps it, and the people endpoint lists them present with
// their last-seen times, then the one who left as away.
func TestRoom(t *testing.T) {
	base := startChat(t, "-grace", "50ms")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	const topic = "room:test"
	ann := dial(t, ctx, base, "ann")
	got := make(chan tether.Message, 16)
	if err := ann.Subscribe(ctx, topic, func(m tether.Message) { got <- m }); err != nil {
		t.Fatal(err)
	}
	bob := dial(t, ctx, base, "bob")
	if err := bob.Subscribe(ctx, topic, func(tether.Message) {}); err != nil {
		t.Fatal(err)
	}
	data := `{"id":"m1","user":"bob","text":"hello ann","ts":1700000000000}`
	if err := bob.Publish(ctx, topic, []byte(data)); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if string(m.Data) != data || m.Topic != topic || m.Position.Seq != 1 {
			t.Fatalf("ann received %s #%d %s, want %s #1 %s", m.Topic, m.Position.Seq, m.Data, topic, data)
		}
	case <-ctx.Done():
		t.Fatal("ann did not receive bob's message")
	}

	var transcript struct {
		Messages []struct {
			Epoch string
			Seq   uint64
			Data  json.RawMessage
		}
	}
	getJSON(t, base+"/api/rooms/test/messages", &transcript)
	if len(transcript.Messages) != 1 || string(transcript.Messages[0].Data) != data || transcript.Messages[0].Seq != 1 || transcript.Messages[0].Epoch == "" {
		t.Fatalf("transcript %+v, want bob's message at seq 1", transcript.Messages)
	}
	// A room nobody spoke in, visited or not.
	if err := ann.Subscribe(ctx, "room:quiet", func(tether.Message) {}); err != nil {
		t.Fatal(err)
	}
	for _, room := range []string{"quiet", "empty"} {
		res, body := get(t, base+"/api/rooms/"+room+"/messages")
		if res.StatusCode != http.StatusOK || strings.TrimSpace(string(body)) != `{"messages":[]}` {
			t.Fatalf("transcript of room %s: %s %s, want no messages", room, res.Status, body)
		}
	}

	var p people
	getJSON(t, base+"/api/rooms/test/people", &p)
	if !slices.Equal(p.present(), []string{"ann", "bob"}) || len(p.Away) != 0 {
		t.Fatalf("people %+v, want ann and bob present", p)
	}
	for _, u := range p.Present {
		if u.Conns != 1 || u.LastSeen == nil || time.Since(*u.LastSeen) > time.Minute || string(u.Meta) != `{"device":"app"}` {
			t.Errorf("%s: %d conns, meta %s, last seen %v", u.User, u.Conns, u.Meta, u.LastSeen)
		}
	}

	// bob leaves: after the grace period he is away, last seen when he left.
	bob.Close()
	left := time.Now()
	deadline := time.Now().Add(10 * time.Second)
	for {
		getJSON(t, base+"/api/rooms/test/people", &p)
		if slices.Equal(p.present(), []string{"ann"}) && slices.Equal(p.away(), []string{"bob"}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("people %+v, want ann present and bob away", p)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if at := p.Away[0].LastSeen; at == nil || at.Sub(left).Abs() > 5*time.Second {
		t.Errorf("bob last seen %v, he left at %v", at, left)
	}
}

// Demo-only authentication and the room rules: no user, no conn; topics
// that are not rooms are refused.
func TestRules(t *testing.T) {
	base := startChat(t)
	for _, q := range []string{"", "?user=", "?user=a%20b", "?user=" + strings.Repeat("x", 33)} {
		if res, _ := get(t, base+"/ws"+q); res.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET /ws%s: %s, want 401", q, res.Status)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var mu sync.Mutex
	var refusals []error
	c, err := tether.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+"/ws?user=eve",
		tether.WithObserver(tether.Observer{Error: func(err error) {
			mu.Lock()
			defer mu.Unlock()
			refusals = append(refusals, err)
		}}))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, topic := range []string{"news", "room:", "room:a b", "room:" + strings.Repeat("x", 33)} {
		var pe *tether.ProtocolError
		if err := c.Subscribe(ctx, topic, func(tether.Message) {}); !errors.As(err, &pe) || pe.Code != tether.CodeForbidden {
			t.Errorf("subscribe %q: %v, want forbidden", topic, err)
		}
	}
	if err := c.Publish(ctx, "news", []byte(`{"text":"spam"}`)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		n := len(refusals)
		mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a publication outside the rooms was not refused")
		}
		time.Sleep(10 * time.Millisecond)
	}
	var pe *tether.ProtocolError
	if !errors.As(refusals[0], &pe) || pe.Code != tether.CodeForbidden {
		t.Errorf("publish to news: %v, want forbidden", refusals[0])
	}
}

func TestStats(t *testing.T) {
	base := startChat(t)
	var stats map[string]any
	getJSON(t, base+"/api/stats", &stats)
	for _, k := range []string{"conns", "users", "topics", "published", "dead_peers", "rtt_samples", "rtt_p50_ms", "connects"} {
		if _, ok := stats[k]; !ok {
			t.Errorf("stats lack %q: %v", k, stats)
		}
	}
}

// pushed collects the figures the server pushes to a client.
type pushed struct {
	mu   sync.Mutex
	all  []figures
	more chan struct{} // a value after each push
}

func (p *pushed) option() tether.Option {
	return tether.OnMessage(func(_ *tether.Conn, m tether.Message) {
		var push struct{ Stats *figures }
		if m.Topic != "" || json.Unmarshal(m.Data, &push) != nil || push.Stats == nil {
			return
		}
		p.mu.Lock()
		p.all = append(p.all, *push.Stats)
		p.mu.Unlock()
		select {
		case p.more <- struct{}{}:
		default:
		}
	})
}

// wait returns the first figures pushed that satisfy ok, failing after a
// bound.
func (p *pushed) wait(t *testing.T, what string, ok func(figures) bool) figures {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for seen := 0; ; {
		p.mu.Lock()
		all := p.all
		p.mu.Unlock()
		for ; seen < len(all); seen++ {
			if ok(all[seen]) {
				return all[seen]
			}
		}
		select {
		case <-p.more:
		case <-deadline:
			t.Fatalf("no push of the figures with %s in 10 s; pushed: %+v", what, all)
		}
	}
}

// Every conn is pushed the server-wide figures when they change, a new
// conn too, counting itself; the pushes are not publications.
func TestStatsPushed(t *testing.T) {
	base := startChat(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	url := "ws" + strings.TrimPrefix(base, "http") + "/ws?user="
	dialPushed := func(user string) *pushed {
		p := &pushed{more: make(chan struct{}, 1)}
		c, err := tether.Dial(ctx, url+user, p.option())
		if err != nil {
			t.Fatalf("%s: %v", user, err)
		}
		t.Cleanup(func() { c.Close() })
		return p
	}

	ann := dialPushed("ann")
	ann.wait(t, "ann's conn", func(f figures) bool { return f.Conns == 1 && f.Users == 1 && f.Connects == 1 })
	bob := dialPushed("bob")
	for _, p := range []*pushed{ann, bob} {
		p.wait(t, "ann's and bob's conns", func(f figures) bool { return f.Conns == 2 && f.Users == 2 })
	}
	// A second tab of ann's: one more conn, no more users.
	dialPushed("ann")
	want := func(f figures) bool { return f.Conns == 3 && f.Users == 2 && f.Connects == 3 }
	got := ann.wait(t, "ann's second conn", want)
	if other := bob.wait(t, "ann's second conn", want); other != got {
		t.Errorf("ann was pushed %+v, bob %+v", got, other)
	}
	if got.Published != 0 {
		t.Errorf("%d publications after pushes alone, want 0: a push is a direct message", got.Published)
	}
	var now figures
	getJSON(t, base+"/api/stats", &now)
	if now.Conns != 3 || now.Users != 2 {
		t.Errorf("GET /api/stats: %+v, want 3 conns of 2 users", now)
	}
}

// On shutdown, a client is told to go away and come back later (1001),
// and run returns.
func TestShutdown(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"-addr", "127.0.0.1:0"}, &out) }()
	listening := regexp.MustCompile(`chat on http://(127\.0\.0\.1:\d+)/`)
	var addr string
	for deadline := time.Now().Add(10 * time.Second); addr == "" && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if m := listening.FindStringSubmatch(out.String()); m != nil {
			addr = m[1]
		}
	}
	if addr == "" {
		cancel()
		t.Fatalf("not listening:\n%s", out.String())
	}
	states := make(chan tether.State, 16)
	dialCtx, dialCancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dialCancel()
	c, err := tether.Dial(dialCtx, "ws://"+addr+"/ws?user=ann", tether.WithObserver(tether.Observer{State: func(s tether.State, _ error) {
		select {
		case states <- s:
		default:
		}
	}}))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	defer c.Close()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("run did not return")
	}
	for reconnecting := false; !reconnecting; {
		select {
		case s := <-states:
			reconnecting = s == tether.Reconnecting
		case <-time.After(10 * time.Second):
			t.Fatal("the client was not told to reconnect")
		}
	}
	if !strings.Contains(out.String(), "shutting down") {
		t.Errorf("no word of the shutdown in the log:\n%s", out.String())
	}
}

// The client is found from the working directory (the package's, in a
// test) and -js overrides it; a wrong -js is an error that says so.
func TestFindClient(t *testing.T) {
	got, err := findClient("")
	if err != nil {
		t.Fatal(err)
	}
	want, _ := filepath.Abs(filepath.Join("..", "..", "js", "tether.js"))
	if got != want {
		t.Errorf("found %s, want %s", got, want)
	}
	if got, err := findClient("main.go"); err != nil || got != "main.go" {
		t.Errorf("-js main.go: %q, %v", got, err)
	}
	if _, err := findClient("nope.js"); err == nil || !strings.Contains(err.Error(), "-js") {
		t.Errorf("-js nope.js: %v, want an error about -js", err)
	}
	if root := moduleRoot(t.TempDir()); root != "" {
		t.Errorf("module root above a temporary directory: %q", root)
	}
	for gomod, want := range map[string]bool{
		"module github.com/tether-ws/tether\n\ngo 1.26.0\n": true,
		"// x\nmodule \"github.com/tether-ws/tether\"\n":    true,
		"module github.com/tether-ws/tether/redisbroker\n":  false,
		"go 1.26.0\n": false,
	} {
		if got := declares(gomod, modulePath); got != want {
			t.Errorf("declares(%q) = %v", gomod, got)
		}
	}
}

// member is a client in a room that records what it receives and its
// resyncs.
type member struct {
	cl      *tether.Client
	mu      sync.Mutex
	got     []tether.Message
	resyncs []string
}

func (m *member) messages() []tether.Message {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.got)
}

func (m *member) resynced() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.resyncs)
}

// await waits until m has n messages.
func (m *member) await(t *testing.T, who string, n int) []tether.Message {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if got := m.messages(); len(got) >= n {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s has %d messages after 10 s, want %d", who, len(m.messages()), n)
		}
	}
}

// join dials base as user, with a fast reconnect, and subscribes to
// topic from from (the zero Position: from now on).
func join(t *testing.T, base, user, topic string, from tether.Position) *member {
	t.Helper()
	m := &member{}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := tether.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+"/ws?user="+user,
		tether.WithBackoff(tether.Backoff{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond}),
		tether.WithObserver(tether.Observer{Resync: func(topic string) {
			m.mu.Lock()
			m.resyncs = append(m.resyncs, topic)
			m.mu.Unlock()
		}}))
	if err != nil {
		t.Fatalf("%s: %v", user, err)
	}
	t.Cleanup(func() { cl.Close() })
	m.cl = cl
	if err := cl.SubscribeFrom(ctx, topic, from, func(msg tether.Message) {
		m.mu.Lock()
		m.got = append(m.got, msg)
		m.mu.Unlock()
	}); err != nil {
		t.Fatalf("%s: subscribe: %v", user, err)
	}
	return m
}

// With -data, a room's messages survive a restart of the chat: a page
// that stayed open resumes where it was, without a resync, a page that
// joins afterwards gets them in the transcript, and a client subscribing
// from the start of the room's epoch gets them replayed. In memory
// (without -data) the same restart makes the page resync, and the
// messages are gone.
func TestDataKeepsRooms(t *testing.T) {
	for _, kept := range []bool{true, false} {
		t.Run(fmt.Sprintf("data=%v", kept), func(t *testing.T) {
			var args []string
			if kept {
				args = []string{"-data", filepath.Join(t.TempDir(), "new-dir")}
			}
			base, stop := runChat(t, "127.0.0.1:0", args...)
			t.Cleanup(stop)
			const topic = "room:kept"
			ann := join(t, base, "ann", topic, tether.Position{})
			bob := join(t, base, "bob", topic, tether.Position{})
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			text := func(i int) string {
				return fmt.Sprintf(`{"id":"m%d","user":"bob","text":"message %d","ts":1700000000000}`, i, i)
			}
			for i := 1; i <= 3; i++ {
				if err := bob.cl.Publish(ctx, topic, []byte(text(i))); err != nil {
					t.Fatal(err)
				}
			}
			before := ann.await(t, "ann", 3)
			epoch := before[0].Position.Epoch

			// The restart, on the same address (and directory): the
			// clients reconnect by themselves.
			addr := strings.TrimPrefix(base, "http://")
			stop()
			base, stop = runChat(t, addr, args...)
			t.Cleanup(stop)
			if err := bob.cl.Publish(ctx, topic, []byte(text(4))); err != nil {
				t.Fatal(err)
			}
			type transcript struct {
				Messages []struct {
					Epoch string
					Seq   uint64
					Data  json.RawMessage
				}
			}
			if !kept {
				// As before -data: a new history, so the page resyncs, and
				// reloads a transcript that has only what came after.
				for deadline := time.Now().Add(10 * time.Second); len(ann.resynced()) == 0; time.Sleep(10 * time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatal("in memory, ann did not resync after the restart")
					}
				}
				for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
					var tr transcript
					getJSON(t, base+"/api/rooms/kept/messages", &tr)
					if len(tr.Messages) > 0 {
						if len(tr.Messages) != 1 || string(tr.Messages[0].Data) != text(4) {
							t.Errorf("in memory, the transcript after the restart is %+v, want message 4 alone", tr.Messages)
						}
						break
					}
					if time.Now().After(deadline) {
						t.Fatal("in memory, message 4 is not in the transcript after 10 s")
					}
				}
				return
			}

			after := ann.await(t, "ann", 4)
			var tr transcript
			getJSON(t, base+"/api/rooms/kept/messages", &tr)
			// A client of a restarted process, from the position it kept;
			// and one from the start of the epoch.
			resumed := join(t, base, "dave", topic, before[2].Position)
			fresh := join(t, base, "carol", topic, tether.Position{Epoch: epoch})
			time.Sleep(200 * time.Millisecond) // for a late resync or repeat
			if got := ann.resynced(); len(got) > 0 {
				t.Errorf("ann resynced %v after the restart: she should have resumed", got)
			}
			if m := after[3]; m.Position != (tether.Position{Epoch: epoch, Seq: 4}) || string(m.Data) != text(4) {
				t.Errorf("after the restart ann got %s at %+v, want message 4 at seq 4 of epoch %q", m.Data, m.Position, epoch)
			}
			if len(tr.Messages) != 4 {
				t.Fatalf("the transcript after the restart has %d messages, want 4", len(tr.Messages))
			}
			for i, m := range tr.Messages {
				if m.Epoch != epoch || m.Seq != uint64(i+1) || string(m.Data) != text(i+1) {
					t.Errorf("transcript message %d: %+v, want message %d at seq %d of epoch %q", i, m, i+1, i+1, epoch)
				}
			}
			replayed := fresh.await(t, "carol", 4)
			for i, m := range replayed {
				if m.Position != (tether.Position{Epoch: epoch, Seq: uint64(i + 1)}) || string(m.Data) != text(i+1) {
					t.Errorf("carol, from the start of the epoch: message %d is %s at %+v, want message %d", i, m.Data, m.Position, i+1)
				}
			}
			if got := fresh.resynced(); len(got) > 0 {
				t.Errorf("carol resynced %v", got)
			}
			if got := resumed.messages(); len(got) != 1 || got[0].Position != after[3].Position || len(resumed.resynced()) > 0 {
				t.Errorf("dave, from message 3: %d messages, resyncs %v; want message 4 alone", len(got), resumed.resynced())
			}
		})
	}
}
