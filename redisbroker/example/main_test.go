package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/redisbroker/internal/redistest"
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

// -demo runs two nodes against a real Redis, carries a message from a
// client on node 1 to a client on node 2, and returns nil.
func TestDemo(t *testing.T) {
	rs := redistest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out syncBuffer
	if err := run(ctx, []string{"-redis", rs.Addr(), "-demo"}, &out); err != nil {
		t.Fatalf("run -demo: %v\n%s", err, out.String())
	}
	text := out.String()
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`node 2 sees in room:demo: ann \(on 127\.0\.0\.1:\d+\), bob \(on 127\.0\.0\.1:\d+\)`),
		regexp.MustCompile(`bob received on node 2 after \S+: room:demo #\d+ \{"user":"ann","text":"hello from node 1"\}`),
		regexp.MustCompile(`(?m)^ok: `),
	} {
		if !want.MatchString(text) {
			t.Errorf("the output does not match %s:\n%s", want, text)
		}
	}
}

// runNode runs one chat node as the command would, on a free loopback
// port, and returns its address once it listens, and a function that
// stops it (as SIGINT does) and returns run's error.
func runNode(t *testing.T, redisAddr string) (addr string, stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	out := &syncBuffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"-redis", redisAddr, "-addr", "127.0.0.1:0"}, out) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(20 * time.Second):
				t.Fatalf("run did not return within 20 s of its context's end\n%s", out.String())
			}
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("run: %v", err)
		}
		if t.Failed() {
			t.Logf("node %s printed:\n%s", addr, out.String())
		}
	})
	listening := regexp.MustCompile(`msg=listening .*hub=ws://(127\.0\.0\.1:\d+)/ws`)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if m := listening.FindStringSubmatch(out.String()); m != nil {
			return m[1], stop
		}
		select {
		case err := <-done:
			t.Fatalf("run returned before listening: %v\n%s", err, out.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no node listening after 10 s:\n%s", out.String())
		}
	}
}

// v1Peer is what the chat page is: a protocol v1 conn over a plain
// WebSocket, whose every line the test reads.
type v1Peer struct {
	ws    *websocket.Conn
	lines chan map[string]json.RawMessage
	done  chan error
}

func dialV1(ctx context.Context, t *testing.T, url string) *v1Peer {
	t.Helper()
	ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{Subprotocols: []string{tether.Subprotocol}})
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	if ws.Subprotocol() != tether.Subprotocol {
		t.Fatalf("the hub chose subprotocol %q", ws.Subprotocol())
	}
	p := &v1Peer{ws: ws, lines: make(chan map[string]json.RawMessage, 1024), done: make(chan error, 1)}
	go func() {
		defer close(p.lines)
		for {
			_, frame, err := ws.Read(context.Background())
			if err != nil {
				p.done <- err
				return
			}
			for line := range bytes.SplitSeq(frame, []byte("\n")) {
				if len(line) == 0 {
					continue
				}
				var m map[string]json.RawMessage
				if err := json.Unmarshal(line, &m); err != nil {
					p.done <- err
					return
				}
				p.lines <- m
			}
		}
	}()
	t.Cleanup(func() {
		ws.CloseNow()
		for range p.lines {
		}
	})
	return p
}

func (p *v1Peer) send(ctx context.Context, t *testing.T, line string) {
	t.Helper()
	if err := p.ws.Write(ctx, websocket.MessageText, []byte(line)); err != nil {
		t.Fatalf("write %s: %v", line, err)
	}
}

// await reads lines until one satisfies ok, and fails the test after
// timeout.
func (p *v1Peer) await(t *testing.T, what string, timeout time.Duration, ok func(m map[string]json.RawMessage) bool) map[string]json.RawMessage {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case m, open := <-p.lines:
			if !open {
				t.Fatalf("conn ended waiting for %s: %v", what, <-p.done)
			}
			if ok(m) {
				return m
			}
		case <-deadline:
			t.Fatalf("no %s within %v", what, timeout)
		}
	}
}

func str(raw json.RawMessage) string {
	var s string
	json.Unmarshal(raw, &s)
	return s
}

// Two nodes run as the README says, sharing one Redis. A message
// published by a client on node 1 reaches the subscribers on node 2 (a Go
// client and a v1 conn like the chat page) exactly once each, the users
// on node 1 are present on node 2, and each node shuts down gracefully:
// its conns are closed with 1001 going away and run returns nil.
func TestTwoNodes(t *testing.T) {
	rs := redistest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	node1, _ := runNode(t, rs.Addr())
	node2, stop2 := runNode(t, rs.Addr())
	ws := func(node, user string) string { return "ws://" + node + "/ws?user=" + user }

	// The page, and demo-only auth: no user, no conn.
	resp, err := http.Get("http://" + node1 + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !bytes.Contains(body, []byte(`new WebSocket(`)) || !bytes.Contains(body, []byte(`"tether.v1"`)) {
		t.Fatalf("GET /: %s, %d bytes without the chat script", resp.Status, len(body))
	}
	for _, url := range []string{"ws://" + node1 + "/ws", ws(node1, "not%20a%20name")} {
		if _, resp, err := websocket.Dial(ctx, url, nil); err == nil || resp == nil || resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("dial %s: %v, want 401", url, err)
		}
	}

	const topic = "room:test"
	// On node 2: bob with the Go client, carol as the chat page does.
	var bobGot atomic.Int32
	bobFirst := make(chan tether.Message, 1)
	bob, err := dialSubscribed(ctx, ws(node2, "bob"), topic, func(m tether.Message) {
		if bobGot.Add(1) == 1 {
			bobFirst <- m
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer bob.Close()
	carol := dialV1(ctx, t, ws(node2, "carol"))
	carol.send(ctx, t, `{"op":"sub","topic":"`+topic+`","id":"s1"}`)
	carol.await(t, "ack of the sub", 10*time.Second, func(m map[string]json.RawMessage) bool {
		return str(m["op"]) == "ack" && str(m["id"]) == "s1"
	})

	// ann on node 1 joins the room: node 2's subscribers see her arrive,
	// with node 1 as her node.
	ann, err := dialSubscribed(ctx, ws(node1, "ann"), topic, func(tether.Message) {})
	if err != nil {
		t.Fatal(err)
	}
	defer ann.Close()
	carol.await(t, "ann's join on node 2", 10*time.Second, func(m map[string]json.RawMessage) bool {
		if str(m["op"]) != "presence" || str(m["topic"]) != topic {
			return false
		}
		var joins []struct {
			User string
			Meta struct{ Node string }
		}
		json.Unmarshal(m["joins"], &joins)
		for _, j := range joins {
			if j.User == "ann" {
				if j.Meta.Node != node1 {
					t.Errorf("ann's join says node %q, want %s", j.Meta.Node, node1)
				}
				return true
			}
		}
		return false
	})

	// Publishing is for rooms only.
	carol.send(ctx, t, `{"op":"pub","topic":"secret","data":1,"id":"p0"}`)
	carol.await(t, "the refusal of a pub outside the rooms", 10*time.Second, func(m map[string]json.RawMessage) bool {
		return str(m["op"]) == "error" && str(m["id"]) == "p0" && str(m["code"]) == "forbidden"
	})

	// ann says hello on node 1; bob and carol get it once each on node 2.
	hello := `{"user":"ann","text":"hello from node 1"}`
	if err := ann.Publish(ctx, topic, []byte(hello)); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-bobFirst:
		if string(m.Data) != hello || m.Topic != topic || m.Position.Seq == 0 {
			t.Fatalf("bob got %s #%d %s, want %s %s", m.Topic, m.Position.Seq, m.Data, topic, hello)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("bob on node 2 got nothing within 10 s")
	}
	carol.await(t, "ann's message on node 2", 10*time.Second, func(m map[string]json.RawMessage) bool {
		return str(m["op"]) == "msg" && string(m["data"]) == hello
	})
	// A second copy would come right behind the first: give it time.
	time.Sleep(300 * time.Millisecond)
	if n := bobGot.Load(); n != 1 {
		t.Errorf("bob got %d messages, want 1", n)
	}
drain:
	for {
		select {
		case m := <-carol.lines:
			if str(m["op"]) == "msg" {
				t.Errorf("carol got a second message: %v", m)
			}
		default:
			break drain
		}
	}

	// Node 2 shuts down: carol is told to go away and come back later.
	if err := stop2(); err != nil {
		t.Fatalf("node 2: %v", err)
	}
	for range carol.lines {
	}
	if err := <-carol.done; websocket.CloseStatus(err) != websocket.StatusGoingAway {
		t.Errorf("carol's conn ended with %v, want 1001 going away", err)
	}
}

// Bad flags and an unreachable Redis are errors, not hangs.
func TestRunErrors(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := run(ctx, []string{"-nope"}, io.Discard); err == nil {
		t.Error("run -nope: no error")
	}
	if err := run(ctx, []string{"extra"}, io.Discard); err == nil {
		t.Error("run with an argument: no error")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String() // nothing listens there once closed
	ln.Close()
	for _, args := range [][]string{{"-redis", closed, "-addr", "127.0.0.1:0"}, {"-redis", closed, "-demo"}} {
		err := run(ctx, args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "redis-server") {
			t.Errorf("run %q: %v, want an error about Redis", args, err)
		}
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Error("run hung")
	}
}
