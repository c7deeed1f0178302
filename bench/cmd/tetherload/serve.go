package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"time"
)

type serveConfig struct {
	impl              string // a key of serveImpls
	addr              string
	interval, timeout time.Duration
	pprof             bool
	memProfileRate    int
	queue             int // the per-conn send buffer, in messages, where the impl has one
	// room: tether only, the hub of the room scenario: presence at its
	// default, each conn's user ID from its "user" query parameter, raw
	// peers subscribed to bench by the server (see serve_tether.go).
	room       bool
	noPresence bool   // with room: presence off, to tell its cost from the rest of protocol v1's
	cpus       string // CPUs to pin the process to, "0" or "0,1"; "" leaves it
	// overload: tether only, the hub of the overload scenario: topic hi
	// high priority, lo low priority, and WithBreaker(breaker) unless
	// breaker is 0 (see serve_tether.go).
	overload bool
	breaker  time.Duration
	// admission: tether only, WithAdmission(admission, burst admission):
	// handshakes per second; 0: none.
	admission float64
}

func serveMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg serveConfig
	fs := flag.NewFlagSet("tetherload serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&cfg.impl, "impl", "tether", "the server `library`: "+strings.Join(serveImplNames(), ", "))
	fs.StringVar(&cfg.addr, "addr", "127.0.0.1:0", "listen `address`")
	fs.DurationVar(&cfg.interval, "interval", 15*time.Second, "heartbeat interval (tether.WithHeartbeat; mapped onto each impl)")
	fs.DurationVar(&cfg.timeout, "timeout", 30*time.Second, "heartbeat timeout: a peer silent this long after its last pong is dropped")
	fs.BoolVar(&cfg.pprof, "pprof", false, "serve net/http/pprof under /debug/pprof/")
	fs.IntVar(&cfg.queue, "queue", 256, "per-conn send buffer in messages (tether.Limits.SendQueue with 1 MiB; the others' send channels)")
	fs.IntVar(&cfg.memProfileRate, "memprofilerate", 0, "set runtime.MemProfileRate (1 records every allocation; 0 keeps the default)")
	fs.BoolVar(&cfg.room, "room", false, "tether only: the hub of the room scenario, every option at its default (presence on; -queue ignored) but the heartbeat, "+
		"WithAuth naming each conn's user by its ?user= query parameter, and raw peers subscribed to topic bench by the server on connect")
	fs.BoolVar(&cfg.noPresence, "nopresence", false, "with -room: presence off on every topic, to tell its cost from the rest of protocol v1's")
	fs.StringVar(&cfg.cpus, "cpus", "", "pin the process to these `CPUs` (a comma list, e.g. 0) and set GOMAXPROCS to their number; empty: no pinning")
	fs.BoolVar(&cfg.overload, "overload", false, "tether only: the hub of the overload scenario: WithTopicPolicy making topic hi PriorityHigh and lo PriorityLow, and WithBreaker(-breaker)")
	fs.DurationVar(&cfg.breaker, "breaker", 20*time.Millisecond, "with -overload: the breaker's trip, the Go scheduler latency p99 over 1 s past which the hub sheds low-priority topics and refuses new conns; 0: no breaker")
	fs.Float64Var(&cfg.admission, "admission", 0, "tether only: WithAdmission(R, R): admit at most R handshakes per second, in bursts of R (refused: 503 with a Retry-After); 0: no admission control")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	breakerSet := false
	fs.Visit(func(f *flag.Flag) { breakerSet = breakerSet || f.Name == "breaker" })
	isTether := cfg.impl == "tether" || cfg.impl == "tether-raw"
	switch {
	case cfg.room && cfg.impl != "tether" || cfg.noPresence && !cfg.room:
		fmt.Fprintf(stderr, "-room is for -impl tether only (here %q), -nopresence for -room only\n", cfg.impl)
		return errUsage
	case cfg.overload && (cfg.impl != "tether" || cfg.room), breakerSet && !cfg.overload:
		fmt.Fprintf(stderr, "-overload is for -impl tether only (here %q), without -room; -breaker for -overload only\n", cfg.impl)
		return errUsage
	case cfg.breaker < 0 || cfg.admission < 0 || cfg.admission > 0 && !isTether:
		fmt.Fprintf(stderr, "-breaker %v and -admission %v must not be negative, and -admission is for tether only (here %q)\n", cfg.breaker, cfg.admission, cfg.impl)
		return errUsage
	}
	if cfg.cpus != "" {
		cpus, err := parseCPUs(cfg.cpus)
		if err != nil {
			fmt.Fprintf(stderr, "-cpus: %v\n", err)
			return errUsage
		}
		if err := pinProcess(cpus); err != nil {
			return fmt.Errorf("-cpus %s: %w", cfg.cpus, err)
		}
	}
	if _, ok := serveImpls[cfg.impl]; !ok {
		fmt.Fprintf(stderr, "unknown -impl %q: want one of %s\n", cfg.impl, strings.Join(serveImplNames(), ", "))
		return errUsage
	}
	if cfg.interval <= 0 || cfg.timeout <= cfg.interval {
		fmt.Fprintf(stderr, "want 0 < -interval < -timeout, have %v and %v\n", cfg.interval, cfg.timeout)
		return errUsage
	}
	if cfg.memProfileRate > 0 {
		runtime.MemProfileRate = cfg.memProfileRate
	}
	return serve(ctx, cfg, stdout, stderr)
}

// serveImpl is one WebSocket server library behind the endpoints that every
// scenario uses, so that the load side drives each library the same way and
// the only difference measured is the library.
//
// An impl reports accepts, pongs and ends to the serveLog it was made with;
// the server turns that log into /stats and /events.
type serveImpl interface {
	// routes adds the impl's WebSocket endpoints (at least GET /sub) to mux.
	routes(mux *http.ServeMux)
	// publish sends msg to every subscriber of topic (which only tether
	// uses). It may keep msg: the caller never reuses it.
	publish(topic string, msg []byte) error
	// fill sets the figures of st that only the impl knows (hub_conns, and
	// hub_evictions where the library counts them itself), after the log
	// has set the others.
	fill(st *Stats)
	// close drops every conn and stops every goroutine the impl started,
	// waiting for them until ctx ends. The HTTP server is already closed.
	close(ctx context.Context) error
}

// serveImpls makes each impl by its -impl name.
var serveImpls = map[string]func(cfg serveConfig, log *serveLog, stderr io.Writer) (serveImpl, error){
	"tether":     newTetherServer,
	"tether-raw": newTetherServer, // the same hub; plain conns subscribed to bench on connect
	"gorilla":    newGorillaServer,
	"melody":     newMelodyServer,
	"naive":      newNaiveServer,
	"centrifuge": newCentrifugeServer,
}

func serveImplNames() []string {
	names := make([]string, 0, len(serveImpls))
	for name := range serveImpls {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// errServeClosed is what publish returns once the impl is shutting down.
var errServeClosed = errors.New("server closed")

// server serves one impl's WebSocket endpoints beside the endpoints every
// impl shares: /publish, /stats and /events.
type server struct {
	name string
	log  *serveLog
	impl serveImpl
}

func newServer(cfg serveConfig, stderr io.Writer) (*server, error) {
	mk, ok := serveImpls[cfg.impl]
	if !ok {
		return nil, fmt.Errorf("unknown impl %q", cfg.impl)
	}
	cfg.queue = max(cfg.queue, 1)
	s := &server{name: cfg.impl, log: new(serveLog)}
	var err error
	if s.impl, err = mk(cfg, s.log, stderr); err != nil {
		return nil, fmt.Errorf("impl %s: %w", cfg.impl, err)
	}
	return s, nil
}

// handlePublish publishes n messages of size bytes, at rate per second (0:
// as fast as the impl's publish returns), each holding its publication time
// in Unix nanoseconds as "t", and answers once they are all published with
// the count published and the nanoseconds it took.
//
//	POST /publish?topic=bench&n=1000&size=64&rate=0[&for=20s][&from=0]
//
// from is the index of the first message (the next window's, say).
// With for, publishing also stops once that long has passed (n 0: no
// count limit), so that a flood is bounded in time whatever the server
// manages; it stops too when the request's client goes away. Requests run
// concurrently: two topics can be published at once.
//
// Each message is a buffer of its own, since some impls keep it until every
// subscriber has been sent it: every impl pays for that allocation alike.
func (s *server) handlePublish(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	topic := cmpOr(q.Get("topic"), "bench")
	n, err1 := strconv.Atoi(q.Get("n"))
	size, err2 := strconv.Atoi(q.Get("size"))
	perSec, err3 := strconv.ParseFloat(cmpOr(q.Get("rate"), "0"), 64)
	dur, err4 := time.ParseDuration(cmpOr(q.Get("for"), "0s"))
	from, err5 := strconv.Atoi(cmpOr(q.Get("from"), "0"))
	if err := errors.Join(err1, err2, err3, err4, err5); err != nil || n < 0 || size < 0 || perSec < 0 || dur < 0 || from < 0 {
		http.Error(w, "bad n, size, rate, for or from", http.StatusBadRequest)
		return
	}
	if dur > 0 && n == 0 {
		n = math.MaxInt
	}
	start := time.Now()
	ctx := r.Context()
	published := 0
	for i := range n {
		if dur > 0 && time.Since(start) >= dur || ctx.Err() != nil {
			break
		}
		if perSec > 0 {
			if d := time.Until(start.Add(time.Duration(float64(i) / perSec * float64(time.Second)))); d > 0 {
				time.Sleep(d)
			}
		}
		msg := benchMessage(make([]byte, 0, size+64), time.Now().UnixNano(), from+i, size)
		if err := s.impl.publish(topic, msg); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		published++
	}
	fmt.Fprintf(w, "%d %d\n", published, time.Since(start).Nanoseconds())
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
	st.Impl = s.name
	s.log.fill(&st)
	s.impl.fill(&st)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(st)
}

func (s *server) mux(withPprof bool) *http.ServeMux {
	mux := http.NewServeMux()
	s.impl.routes(mux)
	mux.HandleFunc("GET /stats", s.handleStats)
	mux.HandleFunc("GET /events", s.log.handleEvents)
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
	s, err := newServer(cfg, stderr)
	if err != nil {
		return err
	}
	// Every impl holds goroutines from the start (melody's hub, centrifuge's
	// node): close it on every way out. An impl that has not closed within
	// 5 s is reported, but does not fail the process, whose measurement is
	// over: the load side would take it for a failed run.
	shutdown := func() {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.impl.close(shutdownCtx); err != nil {
			fmt.Fprintf(stderr, "tetherload serve: closing the %s server: %v\n", s.name, err)
		}
	}
	defer shutdown()
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
	// hijacked ones are the impl's, dropped by its close.
	_ = srv.Close()
	if err == nil {
		err = <-errc
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}
