// Command testserver is the tether hub that the JavaScript client's tests
// (js/test) run against over loopback. It is a test fixture, not an
// example: it believes any user name it is given.
//
//	go build -o /tmp/testserver ./js/testserver
//	/tmp/testserver -interval 50ms -timeout 150ms
//
// It serves a hub at /ws on 127.0.0.1 (a free port unless -addr says),
// prints the address (host:port) as the first line of its stdout, and
// exits when its stdin closes. The hub:
//
//   - authenticates from the query: ?token=<user> or ?user=<user> (the
//     token "deny" is refused with 401; neither is an anonymous conn), with
//     ?device=<d> as the conn's presence metadata {"device":"<d>"};
//   - lets clients publish on every topic but those starting "readonly:",
//     and subscribe to every topic but those starting "forbidden:";
//   - tracks presence on every topic (grace -grace), listing at most
//     -presence-list members (0: the hub's default, 100) and only counting
//     them above that;
//   - answers a client's send by sending the same data, text or binary,
//     back to its user (to the conn itself when anonymous);
//   - with -inbox N, keeps a user's direct messages in an inbox (WithInbox,
//     a memory inbox of N messages per user) until a client acknowledges
//     them; the inbox outlives /restart, as a shared store would.
//
// Control routes (GET unless said), answering JSON:
//
//	/publish?topic=T&data=J    publish J (any text); or POST a body of JSON values,
//	                           one a line; or &b64=B: publish the bytes B (base64)
//	                           with PublishBinary
//	/send?user=U&data=J        hub.SendToUser; or &b64=B: SendToUserBinary; or POST
//	                           a body of JSON values, one a line, each a SendToUser
//	/conns?user=U              {"conns": n}: U's live conns
//	/refused                   {"refused": n}: handshakes the hub refused with 503
//	/mute?user=U               nothing reaches U's conns any more, but what they
//	                           send is still handled (answers lost on the way)
//	/duplicates                {"duplicates": n}: repeated pub and send ids dropped
//	/kick?user=U               drop U's conns without a close frame
//	/close?user=U&code=C&reason=R   close U's conns with code C
//	/freeze?user=U             U's conns go silent: what they send is lost and
//	                           nothing reaches them (a dead server, as U sees it)
//	/deafen?user=U             what U's conns send is lost (the hub hears nothing,
//	                           and drops them after its heartbeat timeout); what
//	                           the hub sends still arrives
//	/pending?user=U            {"epoch": e, "seqs": [...]}: U's unacknowledged
//	                           inbox messages (with -inbox)
//	/received                  {"received": n}: acknowledgements the inbox got
//	/restart?delay=ms[&mode=shutdown]  drop every conn (or shut down: 1001 and
//	                           retry_ms), stop listening, and listen again on the
//	                           same port after the delay, with a new hub (new epochs)
package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
	"golang.org/x/time/rate"
)

type server struct {
	addr     string
	interval time.Duration
	timeout  time.Duration
	history  int
	grace    time.Duration
	list     int // PresencePolicy.List
	slow     bool
	admit    float64
	inbox    *countingInbox // nil without -inbox

	mu    sync.Mutex
	hub   *tether.Hub
	srv   *http.Server
	conns map[string]map[*tether.Conn]bool // by user
	socks map[string]map[*freezable]bool   // TCP conns of /ws requests, by user
}

func main() {
	s := &server{conns: map[string]map[*tether.Conn]bool{}, socks: map[string]map[*freezable]bool{}}
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on")
	flag.DurationVar(&s.interval, "interval", 100*time.Millisecond, "heartbeat interval")
	flag.DurationVar(&s.timeout, "timeout", 300*time.Millisecond, "heartbeat timeout")
	flag.IntVar(&s.history, "history", 256, "messages of history per topic")
	flag.DurationVar(&s.grace, "grace", 100*time.Millisecond, "presence grace period")
	flag.IntVar(&s.list, "presence-list", 0, "most members a topic lists in its presence (0: the hub's default; negative: counts only)")
	flag.BoolVar(&s.slow, "slow", false, "a low rate limit: 20 messages/s, bursts of 10")
	flag.Float64Var(&s.admit, "admission", 0, "handshakes admitted per second, bursts of 1 (0: no limit)")
	inbox := flag.Int("inbox", 0, "keep each user's direct messages in an inbox of this many, until acknowledged (0: no inbox)")
	flag.Parse()
	if *inbox > 0 {
		s.inbox = &countingInbox{Inbox: adapter.NewMemoryInbox(*inbox, 10*time.Minute, 64<<20)}
	}
	log.SetPrefix("testserver: ")

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	s.addr = ln.Addr().String()
	if err := s.newHub(); err != nil {
		log.Fatal(err)
	}
	s.serve(ln)
	fmt.Println(s.addr)

	// Until stdin closes: the test process holds its other end.
	// Then exit at once: conns end with the process (a frozen one would
	// hold up hub.Close).
	io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

func (s *server) newHub() error {
	opts := []tether.HubOption{
		tether.WithHeartbeat(s.interval, s.timeout),
		tether.WithAuth(func(r *http.Request) (string, error) {
			q := r.URL.Query()
			if t := q.Get("token"); t != "" {
				if t == "deny" {
					return "", errors.New("token denied")
				}
				return t, nil
			}
			return q.Get("user"), nil
		}),
		tether.WithConnMeta(func(r *http.Request) json.RawMessage {
			d := r.URL.Query().Get("device")
			if d == "" {
				return nil
			}
			b, _ := json.Marshal(map[string]string{"device": d})
			return b
		}),
		tether.WithClientPublish(func(_ *tether.Conn, topic string) bool { return !strings.HasPrefix(topic, "readonly:") }),
		tether.WithSubscribeAuth(func(_ *tether.Conn, topic string) bool { return !strings.HasPrefix(topic, "forbidden:") }),
		tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{List: s.list, Grace: s.grace} }),
		tether.WithHistory(adapter.NewMemoryHistory(s.history, 2*time.Minute)),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			s.mu.Lock()
			defer s.mu.Unlock()
			u := c.UserID()
			if s.conns[u] == nil {
				s.conns[u] = map[*tether.Conn]bool{}
			}
			s.conns[u][c] = true
		}}),
		tether.WithObserver(tether.Observer{Disconnect: func(c *tether.Conn, _ error) {
			s.mu.Lock()
			defer s.mu.Unlock()
			delete(s.conns[c.UserID()], c)
		}}),
		tether.OnMessage(func(c *tether.Conn, m tether.Message) {
			if u := c.UserID(); u != "" {
				if m.Binary {
					s.current().SendToUserBinary(u, m.Data)
				} else {
					s.current().SendToUser(u, m.Data)
				}
				return
			}
			if m.Binary {
				c.SendBinary(context.Background(), m.Data)
			} else {
				c.Send(context.Background(), m.Data)
			}
		}),
	}
	if s.admit > 0 {
		opts = append(opts, tether.WithAdmission(rate.Limit(s.admit), 1))
	}
	if s.slow {
		opts = append(opts, tether.WithRateLimit(20, 10))
	}
	if s.inbox != nil {
		opts = append(opts, tether.WithInbox(s.inbox))
	}
	hub, err := tether.NewHub(opts...)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.hub = hub
	s.mu.Unlock()
	return nil
}

func (s *server) current() *tether.Hub {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hub
}

type sockKey struct{}

// serve serves ln with a new http.Server whose TCP conns can be frozen.
func (s *server) serve(ln net.Listener) {
	mux := http.NewServeMux()
	mux.HandleFunc("/ws", s.ws)
	mux.HandleFunc("/publish", s.publish)
	mux.HandleFunc("/send", s.send)
	mux.HandleFunc("/conns", s.count)
	mux.HandleFunc("/refused", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, map[string]uint64{"refused": s.current().Stats().Refused})
	})
	mux.HandleFunc("/kick", s.kick)
	mux.HandleFunc("/close", s.close)
	mux.HandleFunc("/freeze", s.freeze)
	mux.HandleFunc("/mute", s.mute)
	mux.HandleFunc("/deafen", s.deafen)
	mux.HandleFunc("/pending", s.pending)
	mux.HandleFunc("/received", func(w http.ResponseWriter, _ *http.Request) {
		var n int64
		if s.inbox != nil {
			n = s.inbox.acks.Load()
		}
		reply(w, map[string]int64{"received": n})
	})
	mux.HandleFunc("/duplicates", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, map[string]uint64{"duplicates": s.current().Stats().Duplicates})
	})
	mux.HandleFunc("/restart", s.restart)
	srv := &http.Server{
		Handler:     mux,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context { return context.WithValue(ctx, sockKey{}, c) },
	}
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
	go srv.Serve(freezingListener{ln})
}

func (s *server) ws(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	user := q.Get("token")
	if user == "" {
		user = q.Get("user")
	}
	if fc, ok := r.Context().Value(sockKey{}).(*freezable); ok {
		s.mu.Lock()
		if s.socks[user] == nil {
			s.socks[user] = map[*freezable]bool{}
		}
		s.socks[user][fc] = true
		s.mu.Unlock()
		fc.onClose = func() {
			s.mu.Lock()
			delete(s.socks[user], fc)
			s.mu.Unlock()
		}
	}
	s.current().ServeHTTP(w, r)
}

// reply answers with v in JSON, with its length, so that a client has
// the whole answer once it is flushed: /restart closes the conn right
// after, and a chunked answer cut before its last chunk never ends.
func reply(w http.ResponseWriter, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	b = append(b, '\n')
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.Write(b)
}

func fail(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
}

func (s *server) publish(w http.ResponseWriter, r *http.Request) {
	topic := r.URL.Query().Get("topic")
	var values [][]byte
	if r.Method == http.MethodPost {
		sc := bufio.NewScanner(r.Body)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if line := strings.TrimSpace(sc.Text()); line != "" {
				values = append(values, []byte(line))
			}
		}
	} else {
		values = [][]byte{[]byte(r.URL.Query().Get("data"))}
	}
	hub := s.current()
	publish := hub.Publish
	if b64 := r.URL.Query().Get("b64"); b64 != "" {
		data, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
		values, publish = [][]byte{data}, hub.PublishBinary
	}
	for _, v := range values {
		if err := publish(topic, v); err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
	}
	reply(w, map[string]int{"published": len(values)})
}

func (s *server) send(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if r.Method == http.MethodPost {
		sc := bufio.NewScanner(r.Body)
		sc.Buffer(nil, 1<<20)
		n := 0
		for sc.Scan() {
			if line := strings.TrimSpace(sc.Text()); line != "" {
				if err := s.current().SendToUser(q.Get("user"), []byte(line)); err != nil {
					fail(w, http.StatusBadRequest, err)
					return
				}
				n++
			}
		}
		reply(w, map[string]int{"sent": n})
		return
	}
	send, data := s.current().SendToUser, []byte(q.Get("data"))
	if b64 := q.Get("b64"); b64 != "" {
		var err error
		if data, err = base64.StdEncoding.DecodeString(b64); err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
		send = s.current().SendToUserBinary
	}
	if err := send(q.Get("user"), data); err != nil {
		fail(w, http.StatusBadRequest, err)
		return
	}
	reply(w, map[string]bool{"ok": true})
}

// userConns returns the live conns of the user.
func (s *server) userConns(user string) []*tether.Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	var cs []*tether.Conn
	for c := range s.conns[user] {
		cs = append(cs, c)
	}
	return cs
}

func (s *server) count(w http.ResponseWriter, r *http.Request) {
	reply(w, map[string]int{"conns": len(s.userConns(r.URL.Query().Get("user")))})
}

func (s *server) kick(w http.ResponseWriter, r *http.Request) {
	cs := s.userConns(r.URL.Query().Get("user"))
	for _, c := range cs {
		c.CloseNow()
	}
	reply(w, map[string]int{"kicked": len(cs)})
}

func (s *server) close(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	code, err := strconv.Atoi(q.Get("code"))
	if err != nil {
		fail(w, http.StatusBadRequest, err)
		return
	}
	cs := s.userConns(q.Get("user"))
	for _, c := range cs {
		if err := closeWith(c.Close, code, q.Get("reason")); err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
	}
	reply(w, map[string]int{"closed": len(cs)})
}

// closeWith calls close with code as the close code type it takes, which
// this command does not import.
func closeWith[T ~int](close func(T, string) error, code int, reason string) error {
	return close(T(code), reason)
}

func (s *server) freeze(w http.ResponseWriter, r *http.Request) {
	user := r.URL.Query().Get("user")
	s.mu.Lock()
	n := 0
	for fc := range s.socks[user] {
		fc.frozen.Store(true)
		n++
	}
	s.mu.Unlock()
	reply(w, map[string]int{"frozen": n})
}

func (s *server) mute(w http.ResponseWriter, r *http.Request) {
	user := r.URL.Query().Get("user")
	s.mu.Lock()
	n := 0
	for fc := range s.socks[user] {
		fc.muted.Store(true)
		n++
	}
	s.mu.Unlock()
	reply(w, map[string]int{"muted": n})
}

func (s *server) deafen(w http.ResponseWriter, r *http.Request) {
	user := r.URL.Query().Get("user")
	s.mu.Lock()
	n := 0
	for fc := range s.socks[user] {
		fc.deaf.Store(true)
		n++
	}
	s.mu.Unlock()
	reply(w, map[string]int{"deafened": n})
}

func (s *server) pending(w http.ResponseWriter, r *http.Request) {
	if s.inbox == nil {
		fail(w, http.StatusBadRequest, errors.New("no inbox: start with -inbox"))
		return
	}
	epoch, entries, err := s.inbox.Pending(r.Context(), r.URL.Query().Get("user"))
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	seqs := make([]uint64, len(entries))
	for i, e := range entries {
		seqs[i] = e.Seq
	}
	reply(w, map[string]any{"epoch": epoch, "seqs": seqs})
}

// countingInbox is the inbox of -inbox, counting the acknowledgements
// (one per received a client sent).
type countingInbox struct {
	adapter.Inbox
	acks atomic.Int64
}

func (b *countingInbox) Ack(ctx context.Context, userID string, pos adapter.Position) error {
	b.acks.Add(1)
	return b.Inbox.Ack(ctx, userID, pos)
}

func (s *server) restart(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	delay, err := strconv.Atoi(q.Get("delay"))
	if err != nil {
		fail(w, http.StatusBadRequest, err)
		return
	}
	graceful := q.Get("mode") == "shutdown"
	s.mu.Lock()
	hub, srv := s.hub, s.srv
	s.mu.Unlock()
	// This reply's conn is closed with the others: answer first.
	reply(w, map[string]bool{"ok": true})
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	go func() {
		srv.Close() // the listener, and every conn not hijacked
		if graceful {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			hub.Shutdown(ctx)
			cancel()
		} else {
			hub.Close()
		}
		if err := s.newHub(); err != nil {
			log.Fatal(err)
		}
		time.Sleep(time.Duration(delay) * time.Millisecond)
		for i := 0; ; i++ {
			ln, err := net.Listen("tcp", s.addr)
			if err == nil {
				s.serve(ln)
				return
			}
			if i == 100 {
				log.Fatalf("listen again on %s: %v", s.addr, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
}

// freezingListener makes every accepted conn a *freezable.
type freezingListener struct{ net.Listener }

func (l freezingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &freezable{Conn: c}, nil
}

// freezable is a TCP conn that can go silent: once frozen, what arrives
// is read and dropped and what is written goes nowhere, as on a path
// through a dead server. The server closing it (its own heartbeat finds
// the client silent) must not tell the client either: the socket stays
// open until the client gives up on it, or for 10 s.
type freezable struct {
	net.Conn
	frozen  atomic.Bool
	muted   atomic.Bool // what is written goes nowhere; what arrives is read
	deaf    atomic.Bool // what arrives is read and dropped; what is written goes
	onClose func()
	once    sync.Once
}

func (c *freezable) Read(p []byte) (int, error) {
	for {
		n, err := c.Conn.Read(p)
		if err != nil || !c.frozen.Load() && !c.deaf.Load() {
			if err != nil && c.frozen.Load() {
				c.Conn.Close() // the client left: close for real
			}
			return n, err
		}
	}
}

func (c *freezable) Write(p []byte) (int, error) {
	if c.frozen.Load() || c.muted.Load() {
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *freezable) Close() error {
	c.once.Do(func() {
		if c.onClose != nil {
			c.onClose()
		}
	})
	if c.frozen.Load() {
		time.AfterFunc(10*time.Second, func() { c.Conn.Close() })
		return nil
	}
	return c.Conn.Close()
}
