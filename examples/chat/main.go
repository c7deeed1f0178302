// Command chat is a chat server: a tether hub and a page that uses the
// browser client, js/tether.js. Each room is a topic, "room:<name>"; the
// page shows who is here and when the others were last seen, the state of
// the connection and its round-trip time, and it keeps working through a
// restart of the server: what you type while it is down is sent when it
// is back, and what the others said meanwhile is shown. With -data, the
// rooms' messages are kept on disk (tether/diskstore), so that after a
// restart the pages resume where they were instead of reloading.
//
// It is a module of its own (it depends on tether/diskstore); from the
// repository's root:
//
//	go run -C examples/chat .                        # then open http://127.0.0.1:8080/?user=ann
//	go run -C examples/chat . -data /tmp/chat-data   # rooms kept across restarts
//	go run -C examples/chat . -addr :9000 -grace 2s
//
// Users are named by the ?user= query parameter, which anybody can set:
// demo-only authentication. A real server names users from a session
// cookie or a token in WithAuth. For the same reason the name shown with
// a message is the one the sender's page put in it.
//
// The footer of every page shows the same server-wide figures: the server
// pushes them to all pages at once (see pushStats) rather than each page
// asking on a timer of its own, which left each showing another moment.
//
// The page is embedded (static/); the client, js/tether.js, is served
// from the repository on disk so that it is never a stale copy: the
// command finds it by walking up from the working directory, the
// executable and this source file to the module root, or takes -js.
package main

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/diskstore"
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
		fmt.Fprintln(os.Stderr, "chat:", err)
		os.Exit(1)
	}
}

// config is what the command line sets.
type config struct {
	addr  string
	js    string // tether.js; "" to find it
	grace time.Duration
	data  string // the directory of the store; "" for memory
}

// run parses args and serves the chat until ctx ends, then shuts down
// gracefully: new requests are refused and every WebSocket is closed with
// 1001 and a hint of when to come back. It writes its log to stdout, the
// first line naming the address.
func run(ctx context.Context, args []string, stdout io.Writer) error {
	var cfg config
	fs := flag.NewFlagSet("chat", flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.StringVar(&cfg.addr, "addr", "127.0.0.1:8080", "HTTP listen address")
	fs.StringVar(&cfg.js, "js", "", "path of the browser client tether.js (default: js/tether.js of the repository, found from the working directory, the executable or the source)")
	fs.DurationVar(&cfg.grace, "grace", 5*time.Second, "how long a user who left stays present, so that a reload or a reconnect does not flicker (negative: not at all)")
	fs.StringVar(&cfg.data, "data", "", "keep the rooms' last "+fmt.Sprint(keptMessages)+" messages, and the offline messages, in `DIR`/chat.db (DIR created if need be), so that they survive a restart (default: in memory, lost at exit)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	js, err := findClient(cfg.js)
	if err != nil {
		return err
	}
	out := &lockedWriter{w: stdout}
	log := slog.New(slog.NewTextHandler(out, nil))
	var st *diskstore.Store
	if cfg.data != "" {
		if st, err = openStore(cfg.data); err != nil {
			return err
		}
		// After the hub, on every way out.
		defer func() {
			if err := st.Close(); err != nil {
				log.Error("closing the store", "err", err)
			}
		}()
	}
	s, err := newServer(cfg, js, log, st)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		s.hub.Close()
		return err
	}
	srv := &http.Server{
		Handler:           s.mux,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	// The pages' figures (pushStats) stop before the hub does, on both
	// ways out below.
	pushCtx, stopPush := context.WithCancel(ctx)
	pushed := make(chan struct{})
	go func() {
		defer close(pushed)
		s.pushStats(pushCtx, statsEvery)
	}()
	stopPushing := func() { stopPush(); <-pushed }
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	base := "http://" + ln.Addr().String()
	fmt.Fprintf(out, "chat on %s/ - open %s/?user=ann and %s/?user=bob\n", base, base, base)
	if st != nil {
		log.Info("listening", "addr", ln.Addr().String(), "client", js, "data", st.Path())
	} else {
		log.Info("listening", "addr", ln.Addr().String(), "client", js, "data", "in memory")
	}

	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err := <-served: // the listener failed
		stopPushing()
		s.hub.Close()
		return err
	}
	stopPushing()
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// http.Server.Shutdown leaves hijacked conns alone: the hub closes its
	// own, with 1001 and a retry_ms hint so that pages do not all come
	// back at once.
	err = srv.Shutdown(shutdown)
	if serr := <-served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return errors.Join(err, s.hub.Shutdown(shutdown))
}

// keptMessages is how many messages of each room the store keeps with
// -data, however old: a page that comes back after a restart, or
// after hours, resumes from them, and a page that joins shows the last
// transcriptLen.
const keptMessages = 256

// openStore opens the store in dir, creating dir if need be. It fails
// when another process has the file open (another chat on the same
// directory), after a second.
func openStore(dir string) (*diskstore.Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("-data: %w", err)
	}
	st, err := diskstore.Open(filepath.Join(dir, "chat.db"), diskstore.WithHistory(keptMessages, 0))
	if err != nil {
		return nil, fmt.Errorf("-data: %w", err)
	}
	return st, nil
}

// Names of users and rooms: what the demo accepts.
var validName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,32}$`)

const roomPrefix = "room:"

// roomOf returns the room of a topic, or "" if the topic is not a room.
func roomOf(topic string) string {
	name, ok := strings.CutPrefix(topic, roomPrefix)
	if !ok || !validName.MatchString(name) {
		return ""
	}
	return name
}

// server is the chat: a hub, what the application keeps of each room,
// and the HTTP routes.
type server struct {
	hub    *tether.Hub
	rooms  *rooms
	online *online
	mux    *http.ServeMux
	js     string
	log    *slog.Logger
}

//go:embed static
var static embed.FS

// newServer makes the chat; with st, its history and offline messages are
// kept there (the caller closes st after the hub).
func newServer(cfg config, js string, log *slog.Logger, st *diskstore.Store) (*server, error) {
	s := &server{rooms: newRooms(), online: newOnline(), mux: http.NewServeMux(), js: js, log: log}
	var kept []tether.HubOption
	if st != nil {
		s.rooms.kept = st.History()
		kept = append(kept, tether.WithOfflineStore(st.Offline()))
	}
	hub, err := tether.NewHub(append(kept,
		// Demo-only: whoever says ?user=ann is ann.
		tether.WithAuth(func(r *http.Request) (string, error) {
			user := r.URL.Query().Get("user")
			if !validName.MatchString(user) {
				return "", errors.New("?user= must be 1-32 letters, digits, '_', '.' or '-'")
			}
			return user, nil
		}),
		// What presence says of each conn.
		tether.WithConnMeta(func(r *http.Request) json.RawMessage {
			meta, _ := json.Marshal(map[string]string{"device": device(r.UserAgent())})
			return meta
		}),
		// Rooms only: clients may subscribe and publish to "room:<name>".
		// A subscription is also a visit, remembered for last-seen times
		// (presence events would miss a visit shorter than their delay).
		tether.WithSubscribeAuth(func(c *tether.Conn, topic string) bool {
			room := roomOf(topic)
			if room != "" {
				s.rooms.visited(room, c.UserID())
			}
			return room != ""
		}),
		tether.WithClientPublish(func(_ *tether.Conn, topic string) bool { return roomOf(topic) != "" }),
		tether.WithPresence(func(string) tether.PresencePolicy { return tether.PresencePolicy{Grace: cfg.grace} }),
		// The hub's history, resumes use it, and the room's transcript,
		// which a page reloads when it cannot resume: in memory, or the
		// store's with -data.
		tether.WithHistory(s.rooms.history()),
		tether.WithObserver(tether.Observer{Presence: func(e tether.PresenceEvent) {
			log.Info("presence", "topic", e.Topic, "joins", userIDs(e.Joins), "leaves", userIDs(e.Leaves))
		}}),
		tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
			s.online.add(c.UserID(), 1)
			log.Info("connect", "user", c.UserID(), "remote", c.RemoteAddr())
		}}),
		tether.WithObserver(tether.Observer{Disconnect: func(c *tether.Conn, reason error) {
			s.online.add(c.UserID(), -1)
			log.Info("disconnect", "user", c.UserID(), "reason", reason, "rtt", c.RTT())
		}}),
		tether.WithLogger(log),
		// METRICS: the Prometheus metrics (prommetrics) will be wired in
		// here, their observer among these options and their handler on
		// the mux below. Nothing is wired yet.
	)...)
	if err != nil {
		return nil, err
	}
	s.hub = hub

	page, err := fs.Sub(static, "static")
	if err != nil {
		return nil, err
	}
	s.mux.Handle("/ws", hub)
	s.mux.HandleFunc("GET /{$}", s.serveStatic(page, "index.html"))
	s.mux.HandleFunc("GET /static/{file}", func(w http.ResponseWriter, r *http.Request) {
		s.serveStatic(page, r.PathValue("file"))(w, r)
	})
	s.mux.HandleFunc("GET /tether.js", s.serveClient)
	// The page names its icon inline (index.html), but browsers and other
	// clients still ask for /favicon.ico now and then: nothing, rather
	// than a 404 in their console.
	s.mux.HandleFunc("GET /favicon.ico", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Cache-Control", "max-age=86400")
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("GET /api/rooms/{room}/messages", s.serveTranscript)
	s.mux.HandleFunc("GET /api/rooms/{room}/people", s.servePeople)
	s.mux.HandleFunc("GET /api/stats", s.serveStats)
	return s, nil
}

// contentTypes are the types of the files served, set here rather than
// taken from the system's MIME tables, which vary.
var contentTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".css":  "text/css; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
}

// serveStatic serves one embedded file of the page.
func (s *server) serveStatic(page fs.FS, name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		b, err := fs.ReadFile(page, name)
		ctype, known := contentTypes[path.Ext(name)]
		if err != nil || !known {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", ctype)
		w.Header().Set("Cache-Control", "no-cache")
		w.Write(b)
	}
}

// serveClient serves the browser client from the repository, read anew
// for each request so that the page always gets the current one.
func (s *server) serveClient(w http.ResponseWriter, r *http.Request) {
	f, err := os.Open(s.js)
	if err != nil {
		s.log.Error("tether.js", "err", err)
		http.Error(w, "tether.js: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		http.Error(w, "tether.js: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", contentTypes[".js"])
	w.Header().Set("Cache-Control", "no-cache")
	http.ServeContent(w, r, "tether.js", st.ModTime(), f)
}

// serveTranscript answers GET /api/rooms/{room}/messages with the room's
// latest messages, oldest first, each with its place in the topic:
//
//	{"messages":[{"epoch":"x1","seq":1,"data":{"id":"...","user":"ann","text":"hi","ts":1700000000000}}]}
//
// A page loads it when it joins a room, and again when its client reports
// a resync (the server restarted, or the page was away for longer than
// the history keeps).
func (s *server) serveTranscript(w http.ResponseWriter, r *http.Request) {
	room := r.PathValue("room")
	if !validName.MatchString(room) {
		http.Error(w, "no such room", http.StatusNotFound)
		return
	}
	messages, err := s.rooms.transcript(r.Context(), room)
	if err != nil {
		s.log.Error("transcript", "room", room, "err", err)
		http.Error(w, "the room's messages cannot be read", http.StatusInternalServerError)
		return
	}
	writeJSON(w, struct {
		Messages []message `json:"messages"`
	}{messages})
}

// person is one user in the answer of servePeople.
type person struct {
	User string `json:"user"`
	// Conns is how many conns the user has in the room; 0 for a user who
	// left less than the grace period ago.
	Conns    int             `json:"conns,omitempty"`
	Meta     json.RawMessage `json:"meta,omitempty"`
	LastSeen *time.Time      `json:"last_seen,omitempty"`
}

// servePeople answers GET /api/rooms/{room}/people with who is in the
// room and who was lately, with when the hub last heard from each:
//
//	{"present":[{"user":"ann","conns":1,"meta":{"device":"desktop"},"last_seen":"..."}],
//	 "away":[{"user":"bob","last_seen":"..."}]}
func (s *server) servePeople(w http.ResponseWriter, r *http.Request) {
	room := r.PathValue("room")
	if !validName.MatchString(room) {
		http.Error(w, "no such room", http.StatusNotFound)
		return
	}
	lastSeen := func(user string) *time.Time {
		if at, ok := s.hub.LastSeen(user); ok {
			at = at.UTC().Truncate(time.Millisecond)
			return &at
		}
		return nil
	}
	answer := struct {
		Present []person `json:"present"`
		Away    []person `json:"away"`
	}{Present: []person{}, Away: []person{}}
	here := make(map[string]bool)
	for _, m := range s.hub.Presence(roomPrefix + room) {
		p := person{User: m.UserID, Conns: len(m.Conns), LastSeen: lastSeen(m.UserID)}
		if len(m.Conns) > 0 {
			p.Meta = m.Conns[0].Meta
		}
		answer.Present = append(answer.Present, p)
		here[m.UserID] = true
	}
	for _, user := range s.rooms.visitors(room) {
		if here[user] {
			continue
		}
		if at := lastSeen(user); at != nil {
			answer.Away = append(answer.Away, person{User: user, LastSeen: at})
		}
	}
	slices.SortFunc(answer.Away, func(a, b person) int { return b.LastSeen.Compare(*a.LastSeen) })
	writeJSON(w, answer)
}

// figures are the server-wide numbers of the pages' footer: a few of the
// hub's Stats and how many users are connected. The type is comparable,
// so that pushStats sees when they change.
type figures struct {
	Conns      int     `json:"conns"`
	Users      int     `json:"users"` // with at least one conn
	Topics     int     `json:"topics"`
	Published  uint64  `json:"published"`
	DeadPeers  uint64  `json:"dead_peers"`
	RTTSamples uint64  `json:"rtt_samples"`
	RTTP50ms   float64 `json:"rtt_p50_ms"`
	// Connects counts the conns ever made: it changes with every new
	// conn, even one that takes the place of another within a tick, so
	// that each new page gets the figures.
	Connects uint64 `json:"connects"`
}

func (s *server) figures() figures {
	st := s.hub.Stats()
	return figures{
		Conns:      st.Conns,
		Users:      s.online.users(),
		Topics:     st.Topics,
		Published:  st.Published,
		DeadPeers:  st.DeadPeers,
		RTTSamples: st.RTT.Samples,
		RTTP50ms:   float64(st.RTT.P50.Microseconds()) / 1000,
		Connects:   st.Connects,
	}
}

// serveStats answers GET /api/stats with the figures as they are now
// (the pages get them pushed: see pushStats):
//
//	{"conns":2,"users":2,"topics":1,"published":5,"dead_peers":0,"rtt_samples":3,"rtt_p50_ms":0.128,"connects":2}
func (s *server) serveStats(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, s.figures())
}

// statsEvery is how often pushStats looks at the figures.
const statsEvery = time.Second

// pushStats sends the figures to every conn, as a direct message
//
//	{"stats":{"conns":2,"users":2,...}}
//
// each time they have changed, looking every interval, until ctx ends.
// Every page is sent the same figures at the same moment, so two pages
// show the same; when each page asked GET /api/stats on a timer of its
// own, each showed the server at another moment (the page opened first
// said "1 conns" while the second said 2, for up to the timer's 5 s, and
// so on after each change). A new conn changes Connects, so it gets the
// figures within an interval, counting itself: the hub counts a conn
// once it is registered, and Broadcast reaches every registered conn.
//
// Broadcast sends direct messages, which are not publications: the
// pushes do not count themselves in Published, and need no topic that
// pages subscribe to.
func (s *server) pushStats(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var last figures // nothing to say before the first conn
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		f := s.figures()
		if f == last {
			continue
		}
		msg, err := json.Marshal(struct {
			Stats figures `json:"stats"`
		}{f})
		if err != nil {
			s.log.Error("stats", "err", err)
			return
		}
		if err := s.hub.Broadcast(msg); err != nil {
			return // the hub is closing
		}
		last = f
	}
}

// online counts the conns of each connected user, from the hub's Connect
// and Disconnect observers.
type online struct {
	mu sync.Mutex
	m  map[string]int
}

func newOnline() *online { return &online{m: make(map[string]int)} }

// add adds n, 1 or -1, to user's conns.
func (o *online) add(user string, n int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.m[user] += n
	if o.m[user] <= 0 {
		delete(o.m, user)
	}
}

// users returns how many users have a conn.
func (o *online) users() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.m)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(v)
}

// device names the kind of device a User-Agent header comes from, for
// presence.
func device(ua string) string {
	switch {
	case !strings.Contains(ua, "Mozilla/"):
		return "app"
	case strings.Contains(ua, "Mobi"):
		return "phone"
	}
	return "desktop"
}

func userIDs(ms []tether.Member) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.UserID
	}
	return out
}

// Bounds of what the chat keeps per room, and of the rooms it keeps.
const (
	transcriptLen = 100
	visitorsLen   = 50
	maxRooms      = 1000
)

// message is one message of a room's transcript.
type message struct {
	Epoch string          `json:"epoch"`
	Seq   uint64          `json:"seq"`
	Data  json.RawMessage `json:"data"`
}

// rooms is what the application keeps of each room: its latest messages,
// for pages that reload, and who came lately, for their last-seen times.
// With -data the messages are those of the store's history, kept, and
// the transcripts are read from it.
type rooms struct {
	kept adapter.History // the store's; nil: in memory

	mu sync.Mutex
	m  map[string]*room
}

type room struct {
	messages []message            // oldest first; none with kept
	visitors map[string]time.Time // user -> when they last arrived
	touched  time.Time
}

func newRooms() *rooms { return &rooms{m: make(map[string]*room)} }

// roomLocked returns the room called name, creating it if needed, and
// forgetting the least recently used room past maxRooms.
func (rs *rooms) roomLocked(name string) *room {
	r := rs.m[name]
	if r == nil {
		if len(rs.m) >= maxRooms {
			var oldest string
			for n, o := range rs.m {
				if oldest == "" || o.touched.Before(rs.m[oldest].touched) {
					oldest = n
				}
			}
			delete(rs.m, oldest)
		}
		r = &room{visitors: make(map[string]time.Time)}
		rs.m[name] = r
	}
	r.touched = time.Now()
	return r
}

// visited records that user came to room.
func (rs *rooms) visited(name, user string) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	r := rs.roomLocked(name)
	if _, known := r.visitors[user]; !known && len(r.visitors) >= visitorsLen {
		var oldest string
		for u, at := range r.visitors {
			if oldest == "" || at.Before(r.visitors[oldest]) {
				oldest = u
			}
		}
		delete(r.visitors, oldest)
	}
	r.visitors[user] = time.Now()
}

// visitors returns the users who came to room lately.
func (rs *rooms) visitors(name string) []string {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	r := rs.m[name]
	if r == nil {
		return nil
	}
	out := make([]string, 0, len(r.visitors))
	for u := range r.visitors {
		out = append(out, u)
	}
	return out
}

// transcript returns room's latest messages, oldest first, at most
// transcriptLen.
func (rs *rooms) transcript(ctx context.Context, name string) ([]message, error) {
	out := []message{} // [] rather than null in JSON
	if rs.kept != nil {
		return rs.keptTranscript(ctx, roomPrefix+name, out)
	}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if r := rs.m[name]; r != nil {
		out = append(out, r.messages...)
	}
	return out, nil
}

// keptTranscript appends to out the latest messages of topic in the
// store's history, at most transcriptLen: the history tells the topic's
// position, then replays what follows the position transcriptLen
// before. (The store keeps messages however old, so it still has them.)
// A room the store does not know gets a record there, and an epoch, as
// a subscription would.
func (rs *rooms) keptTranscript(ctx context.Context, topic string, out []message) ([]message, error) {
	_, last, _, err := rs.kept.Since(ctx, topic, adapter.Position{})
	if err != nil || last.Seq == 0 {
		return out, err
	}
	from := adapter.Position{Epoch: last.Epoch, Seq: last.Seq - min(last.Seq, transcriptLen)}
	entries, _, ok, err := rs.kept.Since(ctx, topic, from)
	if err != nil || !ok {
		return out, err // !ok: a new epoch came between the calls
	}
	for _, e := range entries {
		// The transcript is JSON, as recordingHistory keeps it.
		if json.Valid(e.Data) {
			out = append(out, message{Epoch: last.Epoch, Seq: e.Seq, Data: e.Data})
		}
	}
	return out, nil
}

// history returns the hub's History: the store's with -data, which the
// transcripts read; else tether's in-memory one, which also records each
// room's messages in its transcript.
func (rs *rooms) history() adapter.History {
	if rs.kept != nil {
		// As it is: the hub also finds in it an adapter.Deduper, which
		// remembers the ids of clients' publications across restarts.
		return rs.kept
	}
	return &recordingHistory{History: adapter.NewMemoryHistory(256, 2*time.Minute), rooms: rs}
}

// recordingHistory is a History that copies every message appended to a
// room into the room's transcript. The hub calls Append for a topic one
// call at a time, in publication order, so the transcript is in order.
type recordingHistory struct {
	adapter.History
	rooms *rooms
}

func (h *recordingHistory) Append(ctx context.Context, topic string, data []byte) (tether.Position, error) {
	pos, err := h.History.Append(ctx, topic, data)
	name := roomOf(topic)
	if err != nil || name == "" || !json.Valid(data) {
		// The transcript is JSON: data that is not (bytes, or text that
		// is not JSON, which a client may publish) stays out of it.
		return pos, err
	}
	h.rooms.mu.Lock()
	defer h.rooms.mu.Unlock()
	r := h.rooms.roomLocked(name)
	if len(r.messages) == transcriptLen {
		r.messages = slices.Delete(r.messages, 0, 1)
	}
	// The hub never modifies data after passing it: no copy needed.
	r.messages = append(r.messages, message{Epoch: pos.Epoch, Seq: pos.Seq, Data: data})
	return pos, nil
}

// modulePath is the module whose js/tether.js the page uses.
const modulePath = "github.com/tether-ws/tether"

// findClient returns the path of the browser client: explicit if set,
// else js/tether.js in the root of the module github.com/tether-ws/tether
// (the repository's root: this command's own module, examples/chat, is
// skipped on the way), found by walking up from the working directory
// (go run -C examples/chat . from the root, or go run . in
// examples/chat), from the executable (a binary built into the checkout)
// and from this source file as the compiler saw it (a binary run from
// elsewhere on the machine that built it).
func findClient(explicit string) (string, error) {
	if explicit != "" {
		if _, err := os.Stat(explicit); err != nil {
			return "", fmt.Errorf("-js: %w", err)
		}
		return explicit, nil
	}
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if exe, err := os.Executable(); err == nil {
		starts = append(starts, filepath.Dir(exe))
	}
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		starts = append(starts, filepath.Dir(file))
	}
	for _, dir := range starts {
		if root := moduleRoot(dir); root != "" {
			js := filepath.Join(root, "js", "tether.js")
			if _, err := os.Stat(js); err == nil {
				return js, nil
			}
		}
	}
	return "", fmt.Errorf("cannot find js/tether.js: looked for the root of module %s (its go.mod) above %s; run the chat from inside a checkout of the repository, or pass -js path/to/tether.js", modulePath, strings.Join(starts, ", "))
}

// moduleRoot returns the directory at or above dir whose go.mod declares
// modulePath, or "".
func moduleRoot(dir string) string {
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && declares(string(b), modulePath) {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

// declares reports whether the go.mod text gomod declares module mod.
func declares(gomod, mod string) bool {
	for line := range strings.Lines(gomod) {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`) == mod
		}
	}
	return false
}

// lockedWriter serialises writes from the hub's goroutines.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
