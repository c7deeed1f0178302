package redisbroker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/redisbroker"
	"github.com/tether-ws/tether/redisbroker/internal/redistest"
)

// startRedis starts a redis-server for the test and returns it with a
// client of the test's own (for PUBSUB NUMSUB and the like).
func startRedis(t *testing.T) (*redistest.Server, *redis.Client) {
	t.Helper()
	srv := redistest.Start(t)
	rdb := newRedisClient(srv.Addr())
	t.Cleanup(func() { rdb.Close() })
	return srv, rdb
}

// hubNode is a node in this process: a hub with the Redis broker behind
// an HTTP server on loopback, recording its presence events and its
// broker's health reports.
type hubNode struct {
	t      testing.TB
	name   string
	hub    *tether.Hub
	rdb    redis.UniversalClient
	srv    *http.Server
	addr   string
	served sync.WaitGroup
	logs   *logBuffer
	events *eventLog
	health *healthLog
	once   sync.Once
}

// startHub starts a node linked to the Redis at redisAddr and waits until
// its broker is linked. It is closed when the test ends, before its
// Redis client.
func startHub(t testing.TB, name, redisAddr string, extra ...tether.HubOption) *hubNode {
	t.Helper()
	return startHubOn(t, name, newRedisClient(redisAddr), extra...)
}

// startHubOn is startHub on a client of any kind (a cluster's, a
// Sentinel's), which the node owns.
func startHubOn(t testing.TB, name string, rdb redis.UniversalClient, extra ...tether.HubOption) *hubNode {
	t.Helper()
	return startHubWith(t, name, rdb, nil, extra...)
}

// startHubWith is startHubOn with options that need the node's broker.
func startHubWith(t testing.TB, name string, rdb redis.UniversalClient, withBroker func(*redisbroker.Broker) []tether.HubOption, extra ...tether.HubOption) *hubNode {
	t.Helper()
	n := &hubNode{t: t, name: name, logs: &logBuffer{}, events: &eventLog{}, health: &healthLog{}}
	logger := slog.New(slog.NewTextHandler(n.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	n.rdb = rdb
	base, broker := nodeBroker(n.rdb, logger)
	if withBroker != nil {
		base = append(base, withBroker(broker)...)
	}
	opts := append(base,
		tether.WithObserver(tether.Observer{Presence: n.events.add}),
		tether.WithObserver(tether.Observer{Broker: n.health.add}),
	)
	hub, err := tether.NewHub(append(opts, extra...)...)
	if err != nil {
		n.rdb.Close()
		t.Fatalf("NewHub: %v", err)
	}
	n.hub = hub
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		hub.Close()
		n.rdb.Close()
		t.Fatal(err)
	}
	n.addr = ln.Addr().String()
	n.srv = &http.Server{Handler: hub}
	n.served.Add(1)
	go func() {
		defer n.served.Done()
		n.srv.Serve(ln)
	}()
	t.Cleanup(func() {
		n.stop()
		if t.Failed() {
			t.Logf("node %s log:\n%s", n.name, n.logs.String())
		}
	})
	waitUntil(t, 10*time.Second, "node "+name+"'s broker to link", func() bool { return brokerUp(hub) })
	return n
}

func (n *hubNode) url(user string) string {
	return "ws://" + n.addr + "/ws?user=" + url.QueryEscape(user)
}

// stop stops the node as a rolling restart would: its listener first,
// so that clients coming back find the port closed, then the hub (every
// conn dropped, the broker closed), then its Redis client.
func (n *hubNode) stop() {
	n.once.Do(func() {
		n.srv.Close()
		n.hub.Close()
		n.served.Wait()
		n.rdb.Close()
	})
}

// eventLog records a hub's Observer.Presence events.
type eventLog struct {
	mu     sync.Mutex
	events []timedEvent
}

type timedEvent struct {
	tether.PresenceEvent
	at time.Time
}

func (l *eventLog) add(e tether.PresenceEvent) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, timedEvent{e, time.Now()})
}

// find returns when the first event of topic with user among its joins
// (leave false) or leaves (leave true) arrived.
func (l *eventLog) find(topic, user string, leave bool) (time.Time, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.events {
		if e.Topic != topic {
			continue
		}
		list := e.Joins
		if leave {
			list = e.Leaves
		}
		if slices.ContainsFunc(list, func(m tether.Member) bool { return m.UserID == user }) {
			return e.at, true
		}
	}
	return time.Time{}, false
}

// count returns how many events of topic list user as joining (leave
// false) or leaving (leave true).
func (l *eventLog) count(topic, user string, leave bool) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, e := range l.events {
		list := e.Joins
		if leave {
			list = e.Leaves
		}
		if e.Topic == topic && slices.ContainsFunc(list, func(m tether.Member) bool { return m.UserID == user }) {
			n++
		}
	}
	return n
}

func (l *eventLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	for _, e := range l.events {
		fmt.Fprintf(&b, "%s %s joins=%v leaves=%v\n", e.at.Format("15:04:05.000"), e.Topic, users(e.Joins), users(e.Leaves))
	}
	return b.String()
}

// healthLog records the calls of a hub's Observer.Broker.
type healthLog struct {
	mu    sync.Mutex
	calls []healthCall
}

type healthCall struct {
	err error
	at  time.Time
}

func (l *healthLog) add(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls = append(l.calls, healthCall{err, time.Now()})
}

func (l *healthLog) all() []healthCall {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.calls)
}

// users lists the user IDs of members.
func users(ms []tether.Member) []string {
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.UserID)
	}
	return out
}

// present reports whether user is among members.
func present(ms []tether.Member, user string) bool {
	return slices.Contains(users(ms), user)
}

// recorder records what a tether.Client receives: the messages of the
// topic it subscribes to, direct messages, resyncs and state changes.
type recorder struct {
	mu      sync.Mutex
	msgs    []tether.Message
	times   []time.Time
	direct  []string
	resyncs int
	states  []tether.State
}

// dialRecorded dials url with a recorder; the client is closed when the
// test ends.
func dialRecorded(t testing.TB, url string, opts ...tether.DialOption) (*tether.Client, *recorder) {
	t.Helper()
	r := &recorder{}
	all := append([]tether.DialOption{
		tether.WithBackoff(clientBackoff),
		tether.WithObserver(tether.Observer{Resync: func(string) {
			r.mu.Lock()
			r.resyncs++
			r.mu.Unlock()
		}}),
		tether.OnMessage(func(_ *tether.Conn, m tether.Message) {
			r.mu.Lock()
			r.direct = append(r.direct, string(m.Data))
			r.mu.Unlock()
		}),
		tether.WithObserver(tether.Observer{State: func(s tether.State, _ error) {
			r.mu.Lock()
			r.states = append(r.states, s)
			r.mu.Unlock()
		}}),
	}, opts...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := tether.Dial(ctx, url, all...)
	if err != nil {
		t.Fatalf("Dial %s: %v", url, err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl, r
}

// subscribe subscribes cl to topic, recording into r.
func subscribe(t testing.TB, cl *tether.Client, topic string, r *recorder) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := cl.Subscribe(ctx, topic, r.handle); err != nil {
		t.Fatalf("Subscribe %q: %v", topic, err)
	}
}

func (r *recorder) handle(m tether.Message) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, m)
	r.times = append(r.times, time.Now())
}

func (r *recorder) messages() []tether.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.msgs)
}

func (r *recorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.msgs)
}

func (r *recorder) directs() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.direct)
}

func (r *recorder) resyncCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.resyncs
}

// receivedBetween counts the messages received in [from, to).
func (r *recorder) receivedBetween(from, to time.Time) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, at := range r.times {
		if !at.Before(from) && at.Before(to) {
			n++
		}
	}
	return n
}

// firstMatch returns when the first message that satisfies match
// arrived.
func (r *recorder) firstMatch(match func(tether.Message) bool) (time.Time, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, m := range r.msgs {
		if match(m) {
			return r.times[i], true
		}
	}
	return time.Time{}, false
}

// awaitCount waits until r holds at least n messages.
func (r *recorder) awaitCount(t testing.TB, n int, limit time.Duration, who string) {
	t.Helper()
	start := time.Now()
	for r.len() < n {
		if time.Since(start) > limit {
			t.Fatalf("%s: %d messages after %v, want %d; got %s", who, r.len(), limit, n, summary(r.messages()))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// checkContiguous fails the test unless msgs are in one epoch with seqs
// that follow each other, no gap, no repeat.
func checkContiguous(t testing.TB, who string, msgs []tether.Message) {
	t.Helper()
	for i := 1; i < len(msgs); i++ {
		prev, cur := msgs[i-1].Position, msgs[i].Position
		if cur.Epoch != prev.Epoch || cur.Seq != prev.Seq+1 {
			t.Errorf("%s: message %d at %v follows %v: want %s/%d; all: %s", who, i, cur, prev, prev.Epoch, prev.Seq+1, summary(msgs))
			return
		}
	}
}

// checkNoRepeat fails the test if a position or a payload comes twice,
// or if seqs go backwards within an epoch.
func checkNoRepeat(t testing.TB, who string, msgs []tether.Message) {
	t.Helper()
	seenPos := make(map[tether.Position]int)
	seenData := make(map[string]int)
	for i, m := range msgs {
		if j, ok := seenPos[m.Position]; ok {
			t.Errorf("%s: position %v delivered twice (messages %d and %d)", who, m.Position, j, i)
		}
		if j, ok := seenData[string(m.Data)]; ok {
			t.Errorf("%s: %s delivered twice (messages %d at %v and %d at %v)", who, m.Data, j, msgs[j].Position, i, m.Position)
		}
		seenPos[m.Position], seenData[string(m.Data)] = i, i
		if i > 0 && msgs[i-1].Position.Epoch == m.Position.Epoch && msgs[i-1].Position.Seq >= m.Position.Seq {
			t.Errorf("%s: seq went back within epoch %s: %d after %d", who, m.Position.Epoch, m.Position.Seq, msgs[i-1].Position.Seq)
		}
	}
}

// summary renders messages briefly, for failure messages.
func summary(msgs []tether.Message) string {
	var b strings.Builder
	for i, m := range msgs {
		if i == 40 && len(msgs) > 60 {
			fmt.Fprintf(&b, " … (%d more)", len(msgs)-60)
			msgs = msgs[len(msgs)-20:]
			for _, m := range msgs {
				fmt.Fprintf(&b, " %s/%d=%s", short(m.Position.Epoch), m.Position.Seq, m.Data)
			}
			break
		}
		fmt.Fprintf(&b, " %s/%d=%s", short(m.Position.Epoch), m.Position.Seq, m.Data)
	}
	return b.String()
}

func short(s string) string {
	if len(s) > 6 {
		return s[:6]
	}
	return s
}

// quoted returns s as a JSON string.
func quoted(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// numSub returns how many Redis connections subscribe to channel.
func numSub(t testing.TB, rdb *redis.Client, channel string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := rdb.PubSubShardNumSub(ctx, channel).Result()
	if err != nil {
		t.Fatalf("PUBSUB SHARDNUMSUB %s: %v", channel, err)
	}
	return m[channel]
}
