package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-ws/tether"
	"golang.org/x/time/rate"
)

type serveConfig struct {
	addr              string
	interval, timeout time.Duration
	pprof             bool
	memProfileRate    int
	queue             int // the hub's send queue, in messages
}

func serveMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg serveConfig
	fs := flag.NewFlagSet("tetherload serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&cfg.addr, "addr", "127.0.0.1:0", "listen `address`")
	fs.DurationVar(&cfg.interval, "interval", 15*time.Second, "heartbeat interval (tether.WithHeartbeat)")
	fs.DurationVar(&cfg.timeout, "timeout", 30*time.Second, "heartbeat timeout (tether.WithHeartbeat)")
	fs.BoolVar(&cfg.pprof, "pprof", false, "serve net/http/pprof under /debug/pprof/")
	fs.IntVar(&cfg.queue, "queue", 256, "send queue of the /hub conns, in messages (tether.WithSendQueue; 1 MiB)")
	fs.IntVar(&cfg.memProfileRate, "memprofilerate", 0, "set runtime.MemProfileRate (1 records every allocation; 0 keeps the default)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if cfg.memProfileRate > 0 {
		runtime.MemProfileRate = cfg.memProfileRate
	}
	return serve(ctx, cfg, stdout, stderr)
}

// server accepts tether conns on /ws and keeps them until they end, and
// serves a hub on /hub whose topics /publish publishes to.
type server struct {
	opts   []tether.Option
	stderr io.Writer
	hub    *tether.Hub

	mu    sync.Mutex
	conns map[*tether.Conn]bool // true: registered; false: ended before it was registered

	accepted, ended, hbTimeouts, pongs, acceptErrors atomic.Int64
}

func newServer(cfg serveConfig, stderr io.Writer) *server {
	s := &server{stderr: stderr, conns: make(map[*tether.Conn]bool)}
	s.opts = []tether.Option{
		tether.WithHeartbeat(cfg.interval, cfg.timeout),
		tether.WithObserver(tether.Observer{
			Disconnect: s.disconnected,
			Pong:       func(*tether.Conn, time.Duration) { s.pongs.Add(1) },
		}),
	}
	hub, err := tether.NewHub(
		tether.WithHeartbeat(cfg.interval, cfg.timeout),
		tether.WithSendQueue(max(cfg.queue, 1), 1<<20),
		tether.WithPresence(func(string) bool { return false }, 0),
		// Load clients subscribe in a burst: no inbound limit.
		tether.WithRateLimit(rate.Inf, 0),
	)
	if err != nil {
		panic(err) // constant options
	}
	s.hub = hub
	return s
}

// handlePublish publishes n messages of size bytes to topic, at rate per
// second (0: as fast as Publish goes), each holding its publication time
// in Unix nanoseconds as "t", and answers once they are all published.
//
//	POST /publish?topic=bench&n=1000&size=64&rate=0
func (s *server) handlePublish(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	topic := q.Get("topic")
	n, err1 := strconv.Atoi(q.Get("n"))
	size, err2 := strconv.Atoi(q.Get("size"))
	perSec, err3 := strconv.ParseFloat(cmpOr(q.Get("rate"), "0"), 64)
	if err := errors.Join(err1, err2, err3); err != nil || n < 0 || perSec < 0 {
		http.Error(w, "bad n, size or rate", http.StatusBadRequest)
		return
	}
	start := time.Now()
	buf := make([]byte, 0, size+64)
	for i := range n {
		if perSec > 0 {
			if d := time.Until(start.Add(time.Duration(float64(i) / perSec * float64(time.Second)))); d > 0 {
				time.Sleep(d)
			}
		}
		buf = benchMessage(buf[:0], time.Now().UnixNano(), i, size)
		if err := s.hub.Publish(topic, buf); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
	}
	fmt.Fprintf(w, "%d %d\n", n, time.Since(start).Nanoseconds())
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// benchMessage appends a JSON object of size bytes (at least ~40) holding
// the time t and the index i: {"t":<t>,"i":<i>,"p":"xxx..."}.
func benchMessage(dst []byte, t int64, i, size int) []byte {
	start := len(dst)
	dst = strconv.AppendInt(append(dst, `{"t":`...), t, 10)
	dst = strconv.AppendInt(append(dst, `,"i":`...), int64(i), 10)
	dst = append(dst, `,"p":"`...)
	for len(dst)-start < size-2 {
		dst = append(dst, 'x')
	}
	return append(dst, `"}`...)
}

func (s *server) handleWS(w http.ResponseWriter, r *http.Request) {
	c, err := tether.Accept(w, r, s.opts...)
	if err != nil {
		if s.acceptErrors.Add(1) <= 5 {
			fmt.Fprintf(s.stderr, "tetherload serve: %v\n", err)
		}
		return
	}
	s.accepted.Add(1)
	s.mu.Lock()
	if _, ended := s.conns[c]; ended {
		delete(s.conns, c)
	} else {
		s.conns[c] = true
	}
	s.mu.Unlock()
	// The handler returns: net/http's goroutine for this conn ends, and the
	// conn lives on in its tether reader alone.
}

// disconnected is the Observer.Disconnect hook, run on the conn's reader.
func (s *server) disconnected(c *tether.Conn, reason error) {
	s.mu.Lock()
	if _, ok := s.conns[c]; ok {
		delete(s.conns, c)
	} else {
		s.conns[c] = false // handleWS has not registered it yet
	}
	s.mu.Unlock()
	s.ended.Add(1)
	if errors.Is(reason, tether.ErrHeartbeatTimeout) {
		s.hbTimeouts.Add(1)
	}
}

func (s *server) handleStats(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if q.Get("free") == "1" {
		debug.FreeOSMemory() // a GC, then every free page back to the OS
	}
	st, err := sampleStats(q.Get("gc") != "0")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	s.fill(&st)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(st)
}

func (s *server) fill(st *Stats) {
	ended := s.ended.Load()
	st.Accepted = s.accepted.Load()
	st.Open = st.Accepted - ended
	st.HeartbeatTimeouts = s.hbTimeouts.Load()
	st.OtherEnds = ended - st.HeartbeatTimeouts
	st.Pongs = s.pongs.Load()
	hs := s.hub.Stats()
	st.HubConns, st.HubEvictions = int64(hs.Conns), int64(hs.Evictions)
}

// closeAll drops every conn and waits, until ctx ends, for them to be gone.
func (s *server) closeAll(ctx context.Context) {
	s.mu.Lock()
	conns := make([]*tether.Conn, 0, len(s.conns))
	for c, registered := range s.conns {
		if registered {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		_ = c.CloseNow()
	}
	for _, c := range conns {
		select {
		case <-c.Done():
		case <-ctx.Done():
			return
		}
	}
}

func (s *server) mux(withPprof bool) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ws", s.handleWS)
	mux.HandleFunc("GET /stats", s.handleStats)
	mux.Handle("GET /hub", s.hub)
	mux.HandleFunc("POST /publish", s.handlePublish)
	if withPprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// serve runs the server until ctx ends. Its first line on stdout is the
// listening address.
func serve(ctx context.Context, cfg serveConfig, stdout, stderr io.Writer) error {
	s := newServer(cfg, stderr)
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           s.mux(cfg.pprof),
		ReadHeaderTimeout: 10 * time.Second,
	}
	if _, err := fmt.Fprintln(stdout, ln.Addr().String()); err != nil {
		ln.Close()
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()

	select {
	case err = <-errc:
	case <-ctx.Done():
	}
	// Close stops the listener and every conn net/http still owns; the
	// hijacked ones are tether's and are dropped by closeAll.
	_ = srv.Close()
	if err == nil {
		err = <-errc
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.closeAll(shutdownCtx)
	s.hub.Close()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}
