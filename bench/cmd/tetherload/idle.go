package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"
)

type idleConfig struct {
	loadFlags
	n              int
	hold           time.Duration
	sample         time.Duration // /stats sampling period during the hold
	bare           bool          // centrifuge: its protocol by hand, not centrifuge-go
	heapProfile    string        // file for the server's heap profile at the end of the hold
	memProfileRate int           // the server's runtime.MemProfileRate, with heapProfile
	cpuProfile     string        // file for the server's CPU profile of the hold
	pin            string        // "S,L": the server on CPU S, the load on CPU L; "" no pinning
}

func idleMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg idleConfig
	s := newScenario("idle", implFlag{allowConn: true}, &cfg.loadFlags, loadDefaults{
		interval: 15 * time.Second, timeout: 30 * time.Second,
		setupHelp: "time allowed to start the server, dial and settle",
	}, stderr)
	fs := s.fs
	fs.IntVar(&cfg.n, "n", 10000, "client conns to open and hold")
	fs.DurationVar(&cfg.hold, "hold", 30*time.Second, "how long to hold the conns once all are open")
	fs.DurationVar(&cfg.sample, "sample", 5*time.Second, "/stats sampling period during the hold")
	fs.BoolVar(&cfg.bare, "bare", false, "centrifuge: dial bare coder/websocket clients that speak its JSON protocol by hand instead of centrifuge-go (the other impls' clients are bare already)")
	fs.StringVar(&cfg.heapProfile, "heapprofile", "", "write the server's heap profile at the end of the hold to `file` (starts it with -pprof; with several impls, the impl's name is added)")
	fs.IntVar(&cfg.memProfileRate, "memprofilerate", 0, "the server's runtime.MemProfileRate (1: every allocation); 0 keeps the default")
	fs.StringVar(&cfg.cpuProfile, "cpuprofile", "", "write the server's CPU profile of the hold (whole seconds, from its start) to `file` (with several impls, the impl's name is added)")
	fs.StringVar(&cfg.pin, "pin", "", "pin the server to CPU S and this load process to CPU L, given as `S,L` (GOMAXPROCS 1 each), as room -pin does; empty: no pinning")
	return s.run(ctx, args, cfg.validate, stdout, stderr, func(ctx context.Context, im implSpec) (implResult, error) {
		c := cfg
		if c.heapProfile != "" && len(s.specs) > 1 {
			dir, file := filepath.Split(c.heapProfile)
			c.heapProfile = filepath.Join(dir, im.name+"-"+file)
		}
		if c.cpuProfile != "" && len(s.specs) > 1 {
			dir, file := filepath.Split(c.cpuProfile)
			c.cpuProfile = filepath.Join(dir, im.name+"-"+file)
		}
		return runIdle(ctx, c, im, stderr)
	})
}

func (cfg *idleConfig) validate() error {
	var errs []error
	if cfg.n <= 0 {
		errs = append(errs, fmt.Errorf("-n %d must be positive", cfg.n))
	}
	if cfg.sources < 1 || cfg.sources > 253 {
		errs = append(errs, fmt.Errorf("-sources %d must be within 1..253", cfg.sources))
	}
	if cfg.concurrency < 1 {
		errs = append(errs, fmt.Errorf("-concurrency %d must be positive", cfg.concurrency))
	}
	if cfg.interval <= 0 || cfg.timeout <= cfg.interval {
		errs = append(errs, fmt.Errorf("heartbeat %v/%v: need 0 < interval < timeout", cfg.interval, cfg.timeout))
	}
	if cfg.pin != "" {
		if cpus, err := parseCPUs(cfg.pin); err != nil || len(cpus) != 2 || cpus[0] == cpus[1] {
			errs = append(errs, fmt.Errorf("-pin %q: want two different CPUs, server first: 0,1", cfg.pin))
		}
	}
	if cfg.cpuProfile != "" && cfg.hold < time.Second {
		errs = append(errs, errors.New("-cpuprofile needs a -hold of at least 1s"))
	}
	if cfg.hold < 0 || cfg.sample <= 0 || cfg.setup <= 0 {
		errs = append(errs, errors.New("-hold must not be negative, -sample and -setup must be positive"))
	}
	return errors.Join(errs...)
}

// IdleResult is what one idle run measured. Per-conn figures are the
// server's growth over its baseline (before any conn) divided by Conns, at
// the end of the hold.
type IdleResult struct {
	Impl      string  `json:"impl"`
	Conns     int     `json:"conns"`
	Interval  string  `json:"interval"`
	Timeout   string  `json:"timeout"`
	Hold      string  `json:"hold"`
	Sources   int     `json:"source_ips"`
	Bare      bool    `json:"bare_clients,omitempty"`
	DialSecs  float64 `json:"dial_seconds"`
	Baseline  Stats   `json:"baseline"`        // before any conn
	Loaded    Stats   `json:"loaded"`          // all conns open, start of the hold
	HoldStart Stats   `json:"hold_start"`      // just after Loaded, without GC: the hold's CPU origin
	Samples   []Stats `json:"hold_samples"`    // during the hold, without forced GC
	Final     Stats   `json:"final"`           // end of the hold
	Scavenged Stats   `json:"final_scavenged"` // after debug.FreeOSMemory

	RSSPerConn          float64 `json:"rss_per_conn_bytes"`
	StartRSSPerConn     float64 `json:"start_rss_per_conn_bytes"`     // at the start of the hold, after GC
	PeakRSSPerConn      float64 `json:"peak_rss_per_conn_bytes"`      // highest sample in the hold
	ScavengedRSSPerConn float64 `json:"scavenged_rss_per_conn_bytes"` // floor: no free pages kept
	HeapPerConn         float64 `json:"heap_inuse_per_conn_bytes"`
	HeapAllocPerConn    float64 `json:"heap_alloc_per_conn_bytes"`
	StackPerConn        float64 `json:"stack_per_conn_bytes"`
	GoroutinesPerConn   float64 `json:"goroutines_per_conn"`
	CPUPerSecond        float64 `json:"server_cpu_seconds_per_second"` // during the hold
	CPUPerPong          float64 `json:"server_cpu_us_per_pong"`        // hold CPU over the hold's pongs
	HeartbeatTimeouts   int64   `json:"heartbeat_timeouts"`
	OtherEnds           int64   `json:"other_ends"`
	ClientReadsEnded    int64   `json:"client_reads_ended"` // client conns that died during the run
	HeartbeatPongs      int64   `json:"heartbeat_pongs"`    // during the hold
	// PongsEstimated: the server cannot observe pongs (centrifuge), so
	// HeartbeatPongs is conns x hold / interval, one ping per interval.
	PongsEstimated bool   `json:"pongs_estimated,omitempty"`
	ServerPID      int    `json:"server_pid"`
	Pinned         string `json:"pinned,omitempty"` // server CPU, load CPU
	HeapProfile    string `json:"heap_profile,omitempty"`
	CPUProfile     string `json:"cpu_profile,omitempty"`
}

// runIdle runs one idle scenario against a child server process running
// im. It always returns within cfg.setup + cfg.hold + a minute, with its
// conns closed and its child gone.
func runIdle(ctx context.Context, cfg idleConfig, im implSpec, progress io.Writer) (_ *IdleResult, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.setup+cfg.hold+time.Minute)
	defer cancel()
	setupCtx, setupCancel := context.WithTimeout(ctx, cfg.setup)
	defer setupCancel()

	var serverCPUs string
	if cfg.pin != "" {
		cpus, _ := parseCPUs(cfg.pin) // validated
		serverCPUs = strconv.Itoa(cpus[0])
		if err := pinProcess(cpus[1:]); err != nil {
			return nil, fmt.Errorf("-pin: %w", err)
		}
	}
	child, sc, err := startImpl(setupCtx, serverSpec{
		impl: im.server, interval: cfg.interval, timeout: cfg.timeout, cmd: cfg.serverCmd,
		pprof: cfg.heapProfile != "" || cfg.cpuProfile != "", memProfileRate: cfg.memProfileRate,
		cpus: serverCPUs,
	}, progress)
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := child.stop(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	defer sc.close()

	res := &IdleResult{
		Impl:      im.name,
		Conns:     cfg.n,
		Interval:  cfg.interval.String(),
		Timeout:   cfg.timeout.String(),
		Hold:      cfg.hold.String(),
		Sources:   cfg.sources,
		Bare:      cfg.bare,
		Pinned:    cfg.pin,
		ServerPID: child.cmd.Process.Pid,
	}
	if res.Baseline, err = sc.get(setupCtx, "gc=1"); err != nil {
		return nil, fmt.Errorf("baseline: %w", err)
	}

	srcs := newSources(cfg.sources)
	defer srcs.close()
	pool := newConnPool(srcs, im.client, "ws://"+child.addr+im.path)
	pool.handlers = func(int) connHandlers { return connHandlers{bare: cfg.bare} }
	defer func() {
		if cerr := pool.close(time.Minute); err == nil && cerr != nil {
			err = cerr
		}
	}()
	fmt.Fprintf(progress, "tetherload: dialling %d conns to %s%s (%s) from %d source IPs\n", cfg.n, child.addr, im.path, im.name, cfg.sources)
	start := time.Now()
	if err := pool.dialAll(setupCtx, cfg.n, cfg.concurrency); err != nil {
		return nil, err
	}
	res.DialSecs = time.Since(start).Seconds()

	// Settle: every conn accepted by the server.
	for {
		st, err := sc.get(setupCtx, "gc=0")
		if err != nil {
			return nil, fmt.Errorf("waiting for the server to accept every conn: %w", err)
		}
		if st.Open >= int64(cfg.n) {
			break
		}
		if st.OtherEnds+st.HeartbeatTimeouts > 0 {
			return nil, fmt.Errorf("conns ended while dialling: %d by heartbeat timeout, %d otherwise", st.HeartbeatTimeouts, st.OtherEnds)
		}
		select {
		case <-setupCtx.Done():
			return nil, fmt.Errorf("server has %d of %d conns open: %w", st.Open, cfg.n, setupCtx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	if res.Loaded, err = sc.get(ctx, "gc=1"); err != nil {
		return nil, err
	}
	// The hold's CPU time counts from here, after the forced GC above.
	if res.HoldStart, err = sc.get(ctx, "gc=0"); err != nil {
		return nil, err
	}
	fmt.Fprintf(progress, "tetherload: %d conns open after %.1fs; holding for %v\n", cfg.n, res.DialSecs, cfg.hold)

	// Hold, sampling without forcing GCs, which would be charged as CPU.
	holdEnd := time.Now().Add(cfg.hold)
	// The profile covers the hold's whole seconds; its own cost (the
	// runtime's sampling) is in the hold's CPU figure.
	profiled := fetchCPUProfile(ctx, sc, cfg.cpuProfile, cfg.hold.Truncate(time.Second))
	for {
		left := time.Until(holdEnd)
		if left <= 0 {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("hold: %w", ctx.Err())
		case <-time.After(min(cfg.sample, left)):
		}
		if time.Until(holdEnd) <= 0 {
			break
		}
		st, err := sc.get(ctx, "gc=0")
		if err != nil {
			return nil, fmt.Errorf("hold: %w", err)
		}
		res.Samples = append(res.Samples, st)
		fmt.Fprintf(progress, "tetherload: +%3.0fs open %d, rss %.1f MiB (%.2f KiB/conn), goroutines %d, pongs %d, heartbeat timeouts %d, other ends %d\n",
			st.Time.Sub(res.Loaded.Time).Seconds(), st.Open, float64(st.RSS)/(1<<20),
			(float64(st.RSS)-float64(res.Baseline.RSS))/float64(cfg.n)/(1<<10), st.Goroutines,
			st.Pongs, st.HeartbeatTimeouts, st.OtherEnds)
	}
	if res.Final, err = sc.get(ctx, "gc=1"); err != nil {
		return nil, err
	}
	if err := profiled(); err != nil {
		return nil, err
	}
	res.CPUProfile = cfg.cpuProfile
	if cfg.heapProfile != "" {
		if err := sc.saveHeapProfile(ctx, cfg.heapProfile); err != nil {
			return nil, err
		}
		res.HeapProfile = cfg.heapProfile
	}
	if res.Scavenged, err = sc.get(ctx, "free=1"); err != nil {
		return nil, err
	}
	res.ClientReadsEnded = pool.lost.Load()
	res.compute(cfg.interval, im.server == "centrifuge")
	return res, nil
}

// compute derives the per-conn figures. noPongs: the server cannot count
// pongs, so the hold's pongs are estimated as one per conn per interval.
func (r *IdleResult) compute(interval time.Duration, noPongs bool) {
	n := float64(r.Conns)
	per := func(v, base uint64) float64 { return (float64(v) - float64(base)) / n }
	b, f := r.Baseline, r.Final
	r.RSSPerConn = per(f.RSS, b.RSS)
	r.ScavengedRSSPerConn = per(r.Scavenged.RSS, b.RSS)
	r.HeapPerConn = per(f.HeapInuse, b.HeapInuse)
	r.HeapAllocPerConn = per(f.HeapAlloc, b.HeapAlloc)
	r.StackPerConn = per(f.StackInuse, b.StackInuse)
	r.GoroutinesPerConn = float64(f.Goroutines-b.Goroutines) / n
	r.StartRSSPerConn = per(r.Loaded.RSS, b.RSS)
	r.PeakRSSPerConn = max(r.RSSPerConn, r.StartRSSPerConn)
	for _, s := range r.Samples {
		r.PeakRSSPerConn = max(r.PeakRSSPerConn, per(s.RSS, b.RSS))
	}
	// CPU over the hold: neither end includes a forced GC, since
	// sampleStats reads CPU time before collecting.
	d := f.Time.Sub(r.HoldStart.Time).Seconds()
	cpu := f.CPUSeconds - r.HoldStart.CPUSeconds
	if d > 0 {
		r.CPUPerSecond = cpu / d
	}
	r.HeartbeatTimeouts = f.HeartbeatTimeouts
	r.OtherEnds = f.OtherEnds
	r.HeartbeatPongs = f.Pongs - r.Loaded.Pongs
	if noPongs && r.HeartbeatPongs == 0 && interval > 0 {
		r.HeartbeatPongs = int64(float64(f.Open) * d / interval.Seconds())
		r.PongsEstimated = true
	}
	if r.HeartbeatPongs > 0 {
		r.CPUPerPong = cpu / float64(r.HeartbeatPongs) * 1e6
	}
}

func (r *IdleResult) figures() []figure {
	const kib = 1 << 10
	perPong := r.CPUPerPong
	if r.HeartbeatPongs == 0 {
		perPong = math.NaN()
	}
	return []figure{
		{"RSS/conn KiB, end of hold", r.RSSPerConn / kib, "lower"},
		{"RSS/conn KiB, floor (FreeOSMemory)", r.ScavengedRSSPerConn / kib, "lower"},
		{"heap/conn KiB", r.HeapPerConn / kib, "lower"},
		{"goroutines/conn", r.GoroutinesPerConn, "lower"},
		{"server CPU s/s", r.CPUPerSecond, "lower"},
		{"server CPU µs/pong", perPong, "lower"},
	}
}

func (r *IdleResult) print(w io.Writer) error {
	const kib = 1 << 10
	pin := ""
	if r.Pinned != "" {
		pin = ", pinned " + r.Pinned
	}
	fmt.Fprintf(w, "tetherload idle -impl %s: %d conns, heartbeat %s/%s, hold %s, %d source IPs%s, dialled in %.1fs\n\n",
		r.Impl, r.Conns, r.Interval, r.Timeout, r.Hold, r.Sources, pin, r.DialSecs)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "server\tRSS MiB\theap MiB\tstack MiB\tgoroutines\topen conns\t")
	for _, row := range []struct {
		name string
		s    Stats
	}{
		{"baseline", r.Baseline},
		{"start of hold", r.Loaded},
		{"end of hold", r.Final},
		{"after FreeOSMemory", r.Scavenged},
	} {
		mib := func(v uint64) float64 { return float64(v) / (1 << 20) }
		fmt.Fprintf(tw, "%s\t%.1f\t%.1f\t%.2f\t%d\t%d\t\n",
			row.name, mib(row.s.RSS), mib(row.s.HeapInuse), mib(row.s.StackInuse), row.s.Goroutines, row.s.Open)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	fmt.Fprintln(tw, "conns\tRSS/conn KiB\theap/conn KiB\tstack/conn KiB\tgoroutines/conn\tserver CPU s/s\tCPU µs/pong\tdropped by heartbeat\tother ends\t")
	fmt.Fprintf(tw, "%d\t%.2f\t%.2f\t%.2f\t%.4f\t%.4f\t%.1f\t%d\t%d\t\n",
		r.Conns, r.RSSPerConn/kib, r.HeapPerConn/kib, r.StackPerConn/kib, r.GoroutinesPerConn,
		r.CPUPerSecond, r.CPUPerPong, r.HeartbeatTimeouts, r.OtherEnds)
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "per conn at the end of the hold; RSS/conn was %.2f KiB at its start, peaked at %.2f KiB, and is %.2f KiB after FreeOSMemory\n",
		r.StartRSSPerConn/kib, r.PeakRSSPerConn/kib, r.ScavengedRSSPerConn/kib)
	est := ""
	if r.PongsEstimated {
		est = " (estimated: the server cannot count them, one per conn per interval)"
	}
	fmt.Fprintf(w, "heap alloc/conn %.2f KiB; %d heartbeat pongs during the hold%s\n", r.HeapAllocPerConn/kib, r.HeartbeatPongs, est)
	if r.ClientReadsEnded > 0 {
		fmt.Fprintf(w, "WARNING: %d client conns died during the run\n", r.ClientReadsEnded)
	}
	if r.HeapProfile != "" {
		fmt.Fprintf(w, "server heap profile: %s\n", r.HeapProfile)
	}
	if r.CPUProfile != "" {
		fmt.Fprintf(w, "server CPU profile of the hold: %s\n", r.CPUProfile)
	}
	return nil
}

// childEnv marks a child process that must run as "tetherload serve"
// whatever its executable is: the test binary looks for it.
const childEnv = "TETHERLOAD_CHILD"

// child is the server process.
type child struct {
	cmd     *exec.Cmd
	addr    string
	exited  chan struct{} // closed once Wait has returned
	waitErr error
	drained chan struct{} // closed once its stdout is at EOF
	once    sync.Once
	stopErr error
}

func startServer(ctx context.Context, spec serverSpec, stderr io.Writer) (*child, error) {
	argv := spec.cmd
	if len(argv) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		argv = []string{exe, "serve"}
	}
	args := append(argv[1:len(argv):len(argv)], spec.args()...)
	cmd := exec.Command(argv[0], args...)
	cmd.Env = append(os.Environ(), childEnv+"=serve")
	cmd.Stderr = stderr
	// The server must not outlive us, even if we are killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = w
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("start server: %w", err)
	}
	w.Close()
	c := &child{cmd: cmd, exited: make(chan struct{}), drained: make(chan struct{})}
	go func() {
		c.waitErr = cmd.Wait()
		close(c.exited)
	}()
	first := make(chan string, 1)
	go func() {
		defer close(c.drained)
		defer r.Close()
		br := bufio.NewReader(r)
		line, _ := br.ReadString('\n')
		first <- strings.TrimSpace(line)
		_, _ = io.Copy(io.Discard, br)
	}()

	select {
	case line := <-first:
		if _, _, err := net.SplitHostPort(line); err != nil {
			c.stop()
			return nil, fmt.Errorf("server's first line %q is not an address", line)
		}
		c.addr = line
		return c, nil
	case <-ctx.Done():
		c.stop()
		return nil, fmt.Errorf("waiting for the server's address: %w", ctx.Err())
	}
}

// stop ends the server: SIGTERM, then SIGKILL if it has not exited within
// 10 s. It returns an error if the server did not exit cleanly.
func (c *child) stop() error {
	c.once.Do(func() {
		select {
		case <-c.exited:
		default:
			_ = c.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-c.exited:
			case <-time.After(10 * time.Second):
				_ = c.cmd.Process.Kill()
				<-c.exited
				c.stopErr = errors.New("server ignored SIGTERM for 10s and was killed")
			}
		}
		<-c.drained
		if c.stopErr == nil && c.waitErr != nil {
			c.stopErr = fmt.Errorf("server: %w", c.waitErr)
		}
	})
	return c.stopErr
}

// kill crashes the server with SIGKILL, as a machine or an OOM kill would,
// and waits for it to be gone.
func (c *child) kill() {
	c.once.Do(func() {
		_ = c.cmd.Process.Kill()
		<-c.exited
		<-c.drained
	})
}

// statsClient reads the server's /stats.
type statsClient struct {
	base string
	hc   *http.Client
}

func newStatsClient(addr string) *statsClient {
	return &statsClient{
		base: "http://" + addr,
		hc:   &http.Client{Transport: &http.Transport{}, Timeout: 30 * time.Second},
	}
}

func (s *statsClient) close() { s.hc.CloseIdleConnections() }

func (s *statsClient) fetch(ctx context.Context, path string, w io.Writer) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := s.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(msg))
	}
	_, err = io.Copy(w, resp.Body)
	return err
}

func (s *statsClient) get(ctx context.Context, query string) (Stats, error) {
	var buf bytes.Buffer
	var st Stats
	if err := s.fetch(ctx, "/stats?"+query, &buf); err != nil {
		return st, err
	}
	if err := json.Unmarshal(buf.Bytes(), &st); err != nil {
		return st, fmt.Errorf("/stats: %w", err)
	}
	return st, nil
}

func (s *statsClient) saveHeapProfile(ctx context.Context, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	err = s.fetch(ctx, "/debug/pprof/heap?gc=1", f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("heap profile: %w", err)
	}
	return nil
}
