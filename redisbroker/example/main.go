// Command example is a chat served by two tether hubs (nodes) linked by
// one Redis through redisbroker: people on either node share the rooms,
// their messages and who is here.
//
//	go run ./example -redis 127.0.0.1:6379 -addr 127.0.0.1:8081   # node 1
//	go run ./example -redis 127.0.0.1:6379 -addr 127.0.0.1:8082   # node 2
//
// Each node serves a chat page at / and the hub at /ws; open
// http://127.0.0.1:8081/?user=ann and http://127.0.0.1:8082/?user=bob.
// The page is plain JavaScript speaking protocol v1 (PROTOCOL.md).
//
//	go run ./example -redis 127.0.0.1:6379 -demo
//
// runs both nodes in this process, connects a Go client to each, sends a
// message through node 1, prints what the client on node 2 received and
// exits: a quick check that the Redis link works.
//
// Users are named by the ?user= query parameter, which anybody can set:
// demo-only authentication. A real server names users from a session
// cookie or a token in WithAuth.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/redisbroker"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		stop() // a second Ctrl-C ends the process at once
	}()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		fmt.Fprintln(os.Stderr, "example:", err)
		os.Exit(1)
	}
}

// config is what the command line sets.
type config struct {
	redis  string
	addr   string
	prefix string
	demo   bool
	grace  time.Duration
}

// run parses args and serves one chat node until ctx ends, or with -demo
// runs the two-node check and returns. It writes its log to stdout.
func run(ctx context.Context, args []string, stdout io.Writer) error {
	var cfg config
	fs := flag.NewFlagSet("example", flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.StringVar(&cfg.redis, "redis", "127.0.0.1:6379", "Redis address (host:port) shared by the nodes")
	fs.StringVar(&cfg.addr, "addr", "127.0.0.1:8081", "this node's HTTP listen address (ignored with -demo)")
	fs.StringVar(&cfg.prefix, "prefix", "tether-example", "prefix of the Redis keys: nodes with the same prefix share rooms")
	fs.DurationVar(&cfg.grace, "grace", 2*time.Second, "how long a user who left stays present, so that a reload does not flicker")
	fs.BoolVar(&cfg.demo, "demo", false, "run two nodes in this process, send a message from one to the other, print it and exit")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if cfg.demo {
		return demo(ctx, cfg, stdout)
	}

	log := slog.New(slog.NewTextHandler(&lockedWriter{w: stdout}, nil))
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	n, err := startNode(ctx, cfg, ln, log)
	if err != nil {
		ln.Close()
		return err
	}
	log.Info("listening", "chat", n.url+"/", "hub", n.wsURL(""), "redis", cfg.redis, "prefix", cfg.prefix)
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err := <-n.served: // the listener failed: put the error back for stop
		n.served <- err
	}
	return n.stop(10 * time.Second)
}

// node is one chat server: a hub linked to the others through Redis, and
// the HTTP server in front of it.
type node struct {
	url    string // http://host:port
	hub    *tether.Hub
	rdb    *redis.Client
	srv    *http.Server
	served chan error
}

func (n *node) wsURL(user string) string {
	u := "ws" + strings.TrimPrefix(n.url, "http") + "/ws"
	if user != "" {
		u += "?user=" + user
	}
	return u
}

// validUser is what the demo accepts as a user name.
var validUser = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,32}$`)

// roomTopic reports whether topic is a chat room, the only topics clients
// may subscribe and publish to.
func roomTopic(topic string) bool {
	return strings.HasPrefix(topic, "room:") && len(topic) > len("room:") && len(topic) <= 64
}

// startNode connects to Redis and serves the chat page and a hub on ln.
func startNode(ctx context.Context, cfg config, ln net.Listener, log *slog.Logger) (*node, error) {
	rdb := redis.NewClient(&redis.Options{Addr: cfg.redis})
	pingCtx, cancel := context.WithTimeout(ctx, 3*time.Second)
	err := rdb.Ping(pingCtx).Err()
	cancel()
	if err != nil {
		rdb.Close()
		return nil, fmt.Errorf("redis at %s: %w (is redis-server running? redis-server --port 6379)", cfg.redis, err)
	}
	self := ln.Addr().String()
	meta, _ := json.Marshal(map[string]string{"node": self})
	hub, err := tether.NewHub(
		tether.WithBroker(redisbroker.New(rdb, redisbroker.WithPrefix(cfg.prefix), redisbroker.WithLogger(log))),
		// Demo-only: whoever says ?user=ann is ann.
		tether.WithAuth(func(r *http.Request) (string, error) {
			user := r.URL.Query().Get("user")
			if !validUser.MatchString(user) {
				return "", errors.New("?user= must be 1-32 letters, digits, '_', '.' or '-'")
			}
			return user, nil
		}),
		tether.WithConnMeta(func(*http.Request) json.RawMessage { return meta }),
		tether.WithSubscribeAuth(func(_ *tether.Conn, topic string) bool { return roomTopic(topic) }),
		tether.WithClientPublish(func(_ *tether.Conn, topic string) bool { return roomTopic(topic) }),
		tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Grace: cfg.grace} }),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			log.Info("connect", "user", c.UserID(), "remote", c.RemoteAddr())
		}}),
		tether.WithObserver(tether.Observer{Disconnect: func(c *tether.Conn, reason error) {
			log.Info("disconnect", "user", c.UserID(), "reason", reason)
		}}),
		tether.WithObserver(tether.Observer{Presence: func(e tether.PresenceEvent) {
			log.Info("presence", "topic", e.Topic, "joins", users(e.Joins), "leaves", users(e.Leaves))
		}}),
		tether.WithLogger(log), // the hub logs the Redis link lost and back
	)
	if err != nil {
		rdb.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/ws", hub)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, page)
	})
	n := &node{
		url:    "http://" + self,
		hub:    hub,
		rdb:    rdb,
		srv:    &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)},
		served: make(chan error, 1),
	}
	go func() { n.served <- n.srv.Serve(ln) }()
	return n, nil
}

// stop shuts the node down: no new requests, every conn closed with 1001
// and a hint of when to come back (the page reconnects, to this node or
// another), the broker withdrawn from Redis, then the Redis client closed.
func (n *node) stop(timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err := n.srv.Shutdown(ctx) // hijacked WebSocket conns are the hub's
	if serr := <-n.served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	err = errors.Join(err, n.hub.Shutdown(ctx))
	return errors.Join(err, n.rdb.Close())
}

func users(ms []tether.Member) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.UserID
	}
	return out
}

// demo runs two nodes on loopback ports, each with a Go client in room
// "demo": ann on node 1, bob on node 2. It shows that node 2 sees ann,
// sends a message from ann through node 1 and prints what bob received on
// node 2.
func demo(ctx context.Context, cfg config, out io.Writer) (err error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(&lockedWriter{w: out}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var nodes []*node
	defer func() {
		for _, n := range nodes {
			err = errors.Join(err, n.stop(10*time.Second))
		}
	}()
	for range 2 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		n, err := startNode(ctx, cfg, ln, quiet)
		if err != nil {
			ln.Close()
			return err
		}
		nodes = append(nodes, n)
	}
	fmt.Fprintf(out, "node 1 on %s, node 2 on %s, linked by Redis at %s\n", nodes[0].url, nodes[1].url, cfg.redis)

	const topic = "room:demo"
	got := make(chan tether.Message, 16)
	bob, err := dialSubscribed(ctx, nodes[1].wsURL("bob"), topic, func(m tether.Message) {
		select {
		case got <- m:
		default:
		}
	})
	if err != nil {
		return fmt.Errorf("bob on node 2: %w", err)
	}
	defer bob.Close()
	ann, err := dialSubscribed(ctx, nodes[0].wsURL("ann"), topic, func(tether.Message) {})
	if err != nil {
		return fmt.Errorf("ann on node 1: %w", err)
	}
	defer ann.Close()
	fmt.Fprintf(out, "ann joined %s on node 1, bob on node 2\n", topic)

	// Presence travels through Redis too: wait until node 2 lists ann.
	var present []tether.Member
	for {
		present = nodes[1].hub.Presence(topic)
		if slices.ContainsFunc(present, func(m tether.Member) bool { return m.UserID == "ann" }) {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("node 2 never saw ann in %s (it sees %v): %w", topic, users(present), ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	fmt.Fprintf(out, "node 2 sees in %s: %s\n", topic, describe(present))

	data := []byte(`{"user":"ann","text":"hello from node 1"}`)
	sent := time.Now()
	if err := ann.Publish(ctx, topic, data); err != nil {
		return fmt.Errorf("ann publishes: %w", err)
	}
	fmt.Fprintf(out, "ann sent on node 1: %s\n", data)
	for received := false; !received; {
		select {
		case m := <-got:
			// Anything else is someone chatting in room "demo" on the same Redis.
			received = string(m.Data) == string(data)
			if received {
				fmt.Fprintf(out, "bob received on node 2 after %v: %s #%d %s\n", time.Since(sent).Round(10*time.Microsecond), m.Topic, m.Position.Seq, m.Data)
			}
		case <-ctx.Done():
			return fmt.Errorf("bob did not receive it on node 2: %w", ctx.Err())
		}
	}
	fmt.Fprintln(out, "ok: the two nodes share rooms through Redis")
	return nil
}

// dialSubscribed connects a Go client to url and subscribes it to topic.
func dialSubscribed(ctx context.Context, url, topic string, handler func(tether.Message)) (*tether.Client, error) {
	c, err := tether.Dial(ctx, url)
	if err != nil {
		return nil, err
	}
	if err := c.Subscribe(ctx, topic, handler); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// describe lists members with the node of each of their conns.
func describe(ms []tether.Member) string {
	var parts []string
	for _, m := range ms {
		var where []string
		for _, c := range m.Conns {
			var meta struct{ Node string }
			if json.Unmarshal(c.Meta, &meta) == nil && meta.Node != "" {
				where = append(where, meta.Node)
			}
		}
		parts = append(parts, fmt.Sprintf("%s (on %s)", m.UserID, strings.Join(where, ", ")))
	}
	return strings.Join(parts, ", ")
}

// lockedWriter serialises writes from the hubs' goroutines.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// page is the chat: plain JavaScript speaking protocol v1 (PROTOCOL.md).
// It subscribes to room:<room>, publishes what you type, lists who is
// here on every node, answers and sends heartbeats, and reconnects with
// backoff, resuming from its position so that it misses nothing.
const page = `<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tether chat</title>
<style>
  body { font: 15px system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; }
  header { padding: .5em 1em; background: #234; color: #fff; }
  header b { color: #fd6; }
  main { flex: 1; display: flex; min-height: 0; }
  #log { flex: 1; overflow-y: auto; margin: 0; padding: .5em 1em; list-style: none; }
  #log .note { color: #777; font-style: italic; }
  aside { width: 14em; border-left: 1px solid #ccc; padding: .5em 1em; overflow-y: auto; }
  aside ul { padding-left: 1em; }
  aside small { color: #777; }
  form { display: flex; gap: .5em; padding: .5em 1em; border-top: 1px solid #ccc; }
  form input { flex: 1; font: inherit; }
</style>
<header>tether chat · room <b id="room"></b> · you are <b id="me"></b> · on node <b id="node"></b> · <span id="state">connecting</span></header>
<main>
  <ul id="log"></ul>
  <aside>here (every node): <ul id="people"></ul></aside>
</main>
<form id="say"><input id="text" autocomplete="off" placeholder="say something" autofocus><button>send</button></form>
<form id="login" hidden>name <input id="name" required pattern="[A-Za-z0-9_.\-]{1,32}"> room <input id="roomname" value="lobby" required><button>join</button></form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const user = params.get("user");
const room = params.get("room") || "lobby";
const topic = "room:" + room;


const note = (text) => add(text, "note");
function add(text, cls) {
  const li = document.createElement("li");
  li.textContent = text;
  if (cls) li.className = cls;
  const log = $("log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 5;
  log.appendChild(li);
  if (atEnd) log.scrollTop = log.scrollHeight;
}

// Who is here: user -> the node of their first conn, from presence joins.
const people = new Map();
function render() {
  const ul = $("people");
  ul.textContent = "";
  for (const [who, node] of [...people].sort()) {
    const li = document.createElement("li");
    li.textContent = who + " ";
    const small = document.createElement("small");
    small.textContent = node ? "on " + node : "";
    li.appendChild(small);
    ul.appendChild(li);
  }
}

let ws = null;
let ids = 0;
let pos = null;           // {epoch, seq} of the last message shown: resume from it
let subID = "";           // id of the pending sub
let subSince = false;     // whether that sub resumed from pos
let firstPresence = true; // the first presence after a sub lists everyone
let heartbeat = { interval_ms: 15000, timeout_ms: 30000 }; // until the welcome says
let deadTimer = 0, pingTimer = 0;
let attempt = 0, upSince = 0, terminal = false;

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  ws = new WebSocket(scheme + location.host + "/ws?user=" + encodeURIComponent(user), "tether.v1");
  ws.onopen = () => {
    if (ws.protocol !== "tether.v1") {
      note("the server does not speak tether.v1");
      terminal = true;
      ws.close(1000);
      return;
    }
    upSince = Date.now();
    $("state").textContent = "connected";
    alive();
    subID = "s" + (++ids);
    subSince = pos !== null;
    firstPresence = true;
    const sub = { op: "sub", topic: topic, id: subID };
    if (subSince) sub.since = pos;
    send(sub);
  };
  ws.onmessage = (ev) => {
    alive();
    for (const line of ev.data.split("\n")) {
      if (line !== "") handle(JSON.parse(line));
    }
  };
  ws.onclose = (ev) => {
    clearTimeout(deadTimer);
    clearTimeout(pingTimer);
    people.clear();
    render();
    if (terminal || ev.code === 4401 || ev.code === 4403) {
      $("state").textContent = "closed (" + ev.code + ")";
      return;
    }
    if (upSince && Date.now() - upSince > 10000) attempt = 0; // it stayed up: back off from the start
    upSince = 0;
    // Full jitter, or the server's hint (1001 on shutdown says when).
    let delay = Math.random() * Math.min(30000, 500 * 2 ** attempt++);
    const hint = /retry_ms=(\d+)/.exec(ev.reason || "");
    if (hint) delay = Math.max(delay, Number(hint[1]));
    $("state").textContent = "disconnected (" + ev.code + "), retrying in " + (delay / 1000).toFixed(1) + " s";
    setTimeout(connect, delay);
  };
}

function send(m) {
  ws.send(JSON.stringify(m));
}

// Heartbeat (PROTOCOL.md section 9): anything received proves the server
// alive; after interval_ms of silence ping it, after timeout_ms give up.
function alive() {
  clearTimeout(deadTimer);
  clearTimeout(pingTimer);
  deadTimer = setTimeout(() => { note("server silent: reconnecting"); ws.close(); }, heartbeat.timeout_ms);
  pingTimer = setTimeout(() => send({ op: "ping", ts: Date.now() }), heartbeat.interval_ms);
}

function handle(m) {
  switch (m.op) {
  case "welcome":
    heartbeat = m.heartbeat;
    alive();
    break;
  case "ping":
    send({ op: "pong", ts: m.ts });
    break;
  case "ack":
    // A fresh sub starts from the position in its ack; a resumed one
    // keeps its own until the replay arrives.
    if (m.id === subID && !subSince && m.epoch !== undefined) pos = { epoch: m.epoch, seq: m.seq };
    break;
  case "msg":
    if (m.topic === undefined) { add("(direct) " + JSON.stringify(m.data)); break; }
    if (m.topic !== topic) break;
    if (pos && pos.epoch === m.epoch && m.seq <= pos.seq) break; // seen already
    pos = { epoch: m.epoch, seq: m.seq };
    if (m.data && typeof m.data.text === "string") add(m.data.user + ": " + m.data.text);
    else add(JSON.stringify(m.data));
    break;
  case "presence":
    if (m.topic !== topic) break;
    for (const j of m.joins || []) {
      people.set(j.user, (j.meta && j.meta.node) || "");
      if (!firstPresence) note(j.user + " joined" + (j.meta && j.meta.node ? " on " + j.meta.node : ""));
    }
    for (const l of m.leaves || []) {
      people.delete(l.user);
      note(l.user + " left");
    }
    if (firstPresence && people.size > 0) note("here: " + [...people.keys()].sort().join(", "));
    firstPresence = false;
    render();
    break;
  case "resync":
    if (m.topic !== topic) break;
    pos = null; // unknown until the next message
    note("some messages are older than the history Redis keeps: not shown");
    break;
  case "error":
    note("error " + m.code + ": " + (m.reason || ""));
    break;
  }
}

$("say").onsubmit = (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  if (!ws || ws.readyState !== WebSocket.OPEN || !upSince) { note("offline: not sent"); return; }
  send({ op: "pub", topic: topic, data: { user: user, text: text }, id: "p" + (++ids) });
  $("text").value = "";
};

$("node").textContent = location.host;
$("room").textContent = room;
// Without ?user=, ask for a name. Demo-only authentication: the server
// believes any name.
if (user) {
  $("me").textContent = user;
  connect();
} else {
  $("me").textContent = "?";
  $("state").textContent = "pick a name";
  $("say").hidden = true;
  $("login").hidden = false;
  $("login").onsubmit = (e) => {
    e.preventDefault();
    location.search = "?" + new URLSearchParams({ user: $("name").value, room: $("roomname").value });
  };
}
</script>
`
