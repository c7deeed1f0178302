package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// room: one big room. N conns, each with a user ID of its own, join one
// topic of a tether hub whose options are all at their defaults (presence
// on): as protocol v1 peers (sub, then the ack; they are sent the
// topic's presence) or as raw peers (the server subscribes them itself;
// presence tracks them but sends them nothing). The figures: the time to
// connect and subscribe them all, the conns lost, and for v1 peers the
// presence bytes and messages they were sent and whether every one ends
// up knowing the room's true count.

type roomConfig struct {
	loadFlags
	n          int
	peers      []string // "v1", "raw", "v1-nopresence", in the order to run them
	runs       int
	handshake  time.Duration // one conn's handshake (and, for v1, its ack)
	settle     time.Duration // after the last join: conns lost now are lost too
	converge   time.Duration // after the last join: longest wait for every v1 count to be n
	hold       time.Duration // after the settle: the conns held idle before the memory is read
	pin        string        // "S,L": the server on CPU S, the load on CPU L; "" no pinning
	profile    string        // file for the server's CPU profile of the join's first profileFor
	profileFor time.Duration

	serverCPUs string // serve -cpus, from pin
}

// roomTopic is the topic every conn joins.
const roomTopic = "bench"

func roomMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg roomConfig
	fs := flag.NewFlagSet("tetherload room", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg.loadFlags.register(fs, loadDefaults{
		interval: 15 * time.Second, timeout: 30 * time.Second,
		timeoutNote:     "both default to the hub's defaults",
		concurrencyHelp: "handshakes in flight at once (for v1 peers, each until its ack)",
		setupHelp:       "time allowed to start the server and join every conn; past it the run reports how far it got",
	})
	var peers string
	fs.IntVar(&cfg.n, "n", 19000, "conns, each with a user ID of its own (u0, u1, ...), all joining topic "+roomTopic)
	fs.StringVar(&peers, "peers", "v1,raw", "which peers to run, in turn, as a comma list: v1 (protocol v1: sub, wait for the ack, read presence), raw (plain WebSocket; the server subscribes them), "+
		"v1-nopresence (v1 peers, presence off on the server: what presence costs the v1 peers)")
	fs.IntVar(&cfg.runs, "runs", 1, "runs of each kind of peers, alternating (v1, raw, v1, raw, ...), each against a fresh server")
	fs.DurationVar(&cfg.handshake, "handshake", 30*time.Second, "time allowed to one conn's handshake (and, for v1, its ack); past it the conn counts as failed")
	fs.DurationVar(&cfg.settle, "settle", 3*time.Second, "how long to watch the conns after the last join (drops then count too)")
	fs.DurationVar(&cfg.converge, "converge", 30*time.Second, "longest wait after the last join for every v1 peer's presence count to reach -n")
	fs.DurationVar(&cfg.hold, "hold", 0, "after the settle, hold the conns idle this long (heartbeats on; drops count) before reading the server's memory: RSS per conn of an idle big room")
	fs.StringVar(&cfg.pin, "pin", "", "pin the server to CPU S and this load process to CPU L, given as `S,L` (GOMAXPROCS 1 each), as in the issue's setup; empty: no pinning")
	fs.StringVar(&cfg.profile, "cpuprofile", "", "write the server's CPU profile of the first -profilefor of each join to `file` (with -peers and -runs, suffixed -v1-1, -raw-1...)")
	fs.DurationVar(&cfg.profileFor, "profilefor", 10*time.Second, "how long -cpuprofile profiles, from the first dial (whole seconds)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	for p := range strings.SplitSeq(peers, ",") {
		cfg.peers = append(cfg.peers, strings.TrimSpace(p))
	}
	if err := cfg.validate(); err != nil {
		return err
	}
	if cfg.pin != "" {
		cpus, _ := parseCPUs(cfg.pin) // validated
		cfg.serverCPUs = strconv.Itoa(cpus[0])
		if err := pinProcess(cpus[1:]); err != nil {
			return fmt.Errorf("-pin: %w", err)
		}
	}
	// Each conn is a file here and one in the server child, which
	// inherits the limit; a few hundred more for everything else.
	if err := raiseFileLimit(uint64(cfg.n) + 512); err != nil {
		return err
	}

	doc := RoomDoc{Scenario: "room"}
	var firstErr error
	for run := 1; run <= cfg.runs && ctx.Err() == nil; run++ {
		for _, p := range cfg.peers {
			if ctx.Err() != nil {
				break
			}
			fmt.Fprintf(stderr, "tetherload room: %d %s peers, run %d\n", cfg.n, p, run)
			c := cfg
			if c.profile != "" && (cfg.runs > 1 || len(cfg.peers) > 1) {
				ext := filepath.Ext(c.profile)
				c.profile = fmt.Sprintf("%s-%s-%d%s", strings.TrimSuffix(c.profile, ext), p, run, ext)
			}
			res, err := runRoom(ctx, c, p, stderr)
			if err != nil {
				err = fmt.Errorf("%s peers, run %d: %w", p, run, err)
				firstErr = cmpOrErr(firstErr, err)
				doc.Errors = append(doc.Errors, err.Error())
				if !cfg.jsonOut {
					fmt.Fprintf(stdout, "== %s peers, run %d: FAILED: %v\n\n", p, run, err)
				}
				continue
			}
			res.Run = run
			doc.Runs = append(doc.Runs, res)
			if !cfg.jsonOut {
				fmt.Fprintf(stdout, "== %s peers, run %d\n", p, run)
				if err := res.print(stdout); err != nil {
					return err
				}
				fmt.Fprintln(stdout)
			}
		}
	}
	doc.Summary = summarizeRoom(cfg.peers, doc.Runs)
	if cfg.jsonOut {
		if err := writeJSON(stdout, doc); err != nil {
			return err
		}
	} else if err := printRoomSummary(stdout, doc.Summary); err != nil {
		return err
	}
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return firstErr
}

func (cfg *roomConfig) validate() error {
	var errs []error
	if cfg.n <= 0 || cfg.runs <= 0 {
		errs = append(errs, fmt.Errorf("-n %d and -runs %d must be positive", cfg.n, cfg.runs))
	}
	if len(cfg.peers) == 0 {
		errs = append(errs, errors.New("-peers: none"))
	}
	for _, p := range cfg.peers {
		if p != "v1" && p != "raw" && p != "v1-nopresence" {
			errs = append(errs, fmt.Errorf("-peers: unknown %q (v1, raw or v1-nopresence)", p))
		}
	}
	if cfg.sources < 1 || cfg.sources > 253 || cfg.concurrency < 1 {
		errs = append(errs, fmt.Errorf("-sources %d must be within 1..253 and -concurrency %d positive", cfg.sources, cfg.concurrency))
	}
	if cfg.interval <= 0 || cfg.timeout <= cfg.interval {
		errs = append(errs, fmt.Errorf("heartbeat %v/%v: need 0 < interval < timeout", cfg.interval, cfg.timeout))
	}
	if cfg.setup <= 0 || cfg.handshake <= 0 || cfg.settle < 0 || cfg.converge < 0 || cfg.hold < 0 {
		errs = append(errs, errors.New("need -setup and -handshake positive, -settle, -converge and -hold not negative"))
	}
	if cfg.pin != "" {
		if cpus, err := parseCPUs(cfg.pin); err != nil || len(cpus) != 2 || cpus[0] == cpus[1] {
			errs = append(errs, fmt.Errorf("-pin %q: want two different CPUs, server first: 0,1", cfg.pin))
		}
	}
	return errors.Join(errs...)
}

// RoomResult is one room run: n conns of one kind joining the topic.
type RoomResult struct {
	Peers       string `json:"peers"` // v1, raw or v1-nopresence
	Run         int    `json:"run"`
	Conns       int    `json:"conns"`
	Concurrency int    `json:"handshakes_in_flight"`
	Heartbeat   string `json:"heartbeat"`
	Pinned      string `json:"pinned,omitempty"` // server CPU, load CPU

	// JoinSecs is from the first dial to the last conn subscribed: for
	// v1 peers its ack read, for raw peers the server's count of conns it
	// subscribed reaching the conns that connected (polled every 5 ms
	// once the last handshake is done).
	JoinSecs      float64          `json:"join_seconds"`
	HandshakeSecs float64          `json:"handshake_seconds"` // first dial to the last handshake done
	TimedOut      bool             `json:"timed_out,omitempty"`
	Joined        int              `json:"joined"`
	NotDialled    int              `json:"not_dialled,omitempty"` // cut off by -setup
	Failed        int64            `json:"failed"`                // handshake or subscribe failed
	FailReasons   map[string]int64 `json:"fail_reasons,omitempty"`
	// Dropped is the conns that ended, other than by the client's close,
	// before the end of the settle and the hold.
	Dropped          int64            `json:"dropped"`
	DropReasons      map[string]int64 `json:"drop_reasons,omitempty"`
	FirstDropSecs    float64          `json:"first_drop_seconds,omitempty"` // after the first dial
	ServerHeartbeats int64            `json:"server_heartbeat_timeouts"`
	ServerOtherEnds  int64            `json:"server_other_ends"`
	ServerEvictions  int64            `json:"server_evictions"`
	ServerOpen       int64            `json:"server_open_at_end"`
	ServerSubscribed int64            `json:"server_subscribed_raw,omitempty"`

	// Presence the v1 peers read, in all: messages, of which snapshots,
	// and the bytes of their lines.
	PresenceMsgs      int64   `json:"presence_messages"`
	PresenceSnapshots int64   `json:"presence_snapshots"`
	PresenceBytes     int64   `json:"presence_bytes"`
	PresenceMaxLine   int64   `json:"presence_largest_bytes"`
	BytesPerJoin      float64 `json:"presence_bytes_per_join"`
	MsgsPerJoin       float64 `json:"presence_messages_per_join"`
	// CountsWrong is the v1 peers whose last known count is not Conns at
	// the end of the settle; CountsUnknown, of those, the ones never told.
	CountsWrong   int     `json:"counts_wrong"`
	CountsUnknown int     `json:"counts_unknown"`
	ConvergeSecs  float64 `json:"converge_seconds"` // after the last join, until every v1 count was Conns; -1: never
	SettleSecs    float64 `json:"settle_seconds"`   // how long the conns were watched after the last join
	Hold          string  `json:"hold,omitempty"`   // then held idle before End was read

	ServerJoinCPU    float64 `json:"server_join_cpu_seconds"`
	ServerCPUPerJoin float64 `json:"server_cpu_us_per_join"`
	ServerSettleCPU  float64 `json:"server_settle_cpu_seconds_per_second"`
	LoadJoinCPU      float64 `json:"load_join_cpu_seconds"`
	RSSPerConn       float64 `json:"rss_per_conn_bytes"`  // after the settle, after GC, over the baseline
	HeapPerConn      float64 `json:"heap_per_conn_bytes"` // HeapInuse, likewise

	Baseline Stats `json:"baseline"`
	AtJoined Stats `json:"at_joined"`
	End      Stats `json:"end"` // after the settle and the hold, after GC
}

// roomRun is one run's load side.
type roomRun struct {
	cfg   roomConfig
	v1    bool
	base  string // ws://addr/sub
	srcs  *sources
	start time.Time

	mu      sync.Mutex
	peers   []*roomPeer
	failed  map[string]int64
	dropped map[string]int64

	lastJoin  atomic.Int64 // unix ns of the latest subscription
	lastHS    atomic.Int64 // unix ns of the latest handshake done
	nFailed   atomic.Int64
	nDropped  atomic.Int64
	firstDrop atomic.Int64 // unix ns; 0: none
	closing   atomic.Bool

	presMsgs, presSnaps, presBytes, presMax atomic.Int64
}

// roomPeer is one client conn. count is written by the goroutine reading
// the conn only.
type roomPeer struct {
	run   *roomRun
	c     *websocket.Conn
	count atomic.Int64 // the room's count as last told; -1: never told
	done  chan struct{}
}

var (
	roomSub  = []byte(`{"op":"sub","topic":"` + roomTopic + `","id":"1"}`)
	digitRun = regexp.MustCompile(`[0-9]+`)
)

func runRoom(ctx context.Context, cfg roomConfig, peers string, progress io.Writer) (_ *RoomResult, err error) {
	ctx, cancel := context.WithTimeout(ctx, cfg.setup+cfg.converge+cfg.settle+cfg.hold+2*time.Minute)
	defer cancel()
	setupCtx, setupCancel := context.WithTimeout(ctx, cfg.setup)
	defer setupCancel()

	child, sc, err := startImpl(setupCtx, serverSpec{
		impl: "tether", interval: cfg.interval, timeout: cfg.timeout, cmd: cfg.serverCmd,
		room: true, noPresence: peers == "v1-nopresence", cpus: cfg.serverCPUs, pprof: cfg.profile != "",
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

	res := &RoomResult{
		Peers: peers, Conns: cfg.n, Concurrency: cfg.concurrency,
		Heartbeat: cfg.interval.String() + "/" + cfg.timeout.String(), Pinned: cfg.pin,
	}
	if res.Baseline, err = sc.get(setupCtx, "gc=1"); err != nil {
		return nil, fmt.Errorf("baseline: %w", err)
	}
	r := &roomRun{
		cfg: cfg, v1: peers != "raw", base: "ws://" + child.addr + "/sub", srcs: newSources(cfg.sources),
		failed: map[string]int64{}, dropped: map[string]int64{},
	}
	defer r.srcs.close()
	defer r.closeAll()

	startStats, err := sc.get(setupCtx, "gc=0")
	if err != nil {
		return nil, err
	}
	loadCPU0, _ := cpuSeconds()
	fmt.Fprintf(progress, "tetherload room: joining %d %s peers to %s, %d handshakes in flight\n", cfg.n, peers, r.base, cfg.concurrency)
	r.start = time.Now()
	profiled := r.cpuProfile(ctx, sc)
	stopProgress := r.progress(progress)
	_ = forEach(setupCtx, cfg.n, cfg.concurrency, func(ctx context.Context, i int) error {
		r.join(ctx, i)
		return nil
	})
	res.Joined = len(r.list())
	res.NotDialled = cfg.n - res.Joined - int(r.nFailed.Load())
	res.TimedOut = setupCtx.Err() != nil
	if !r.v1 && !res.TimedOut {
		// Raw peers are subscribed by the server as they connect: wait
		// for it to have subscribed every one that connected.
		for {
			st, err := sc.get(setupCtx, "gc=0")
			if err != nil {
				res.TimedOut = setupCtx.Err() != nil
				break
			}
			res.ServerSubscribed = st.RoomSubscribed
			if st.RoomSubscribed >= int64(res.Joined) {
				r.lastJoin.Store(max(r.lastJoin.Load(), time.Now().UnixNano()))
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	stopProgress()
	joinedAt := time.Unix(0, r.lastJoin.Load())
	if res.TimedOut || res.Joined == 0 {
		joinedAt = time.Now()
	}
	res.JoinSecs = joinedAt.Sub(r.start).Seconds()
	res.HandshakeSecs = time.Unix(0, r.lastHS.Load()).Sub(r.start).Seconds()
	if res.AtJoined, err = sc.get(ctx, "gc=0"); err != nil {
		return nil, err
	}
	loadCPU1, _ := cpuSeconds()
	res.ServerJoinCPU = res.AtJoined.CPUSeconds - startStats.CPUSeconds
	res.LoadJoinCPU = loadCPU1 - loadCPU0
	fmt.Fprintf(progress, "tetherload room: %d joined in %.2fs (%d failed, %d dropped, %d not dialled); settling\n",
		res.Joined, res.JoinSecs, r.nFailed.Load(), r.nDropped.Load(), res.NotDialled)

	// Settle: watch for drops for cfg.settle at least, and for v1 peers
	// until every count is n, up to cfg.converge.
	res.ConvergeSecs = -1
	counted := peers == "v1" // the v1 peers are told the count
	for {
		since := time.Since(joinedAt)
		if counted && res.ConvergeSecs < 0 && r.countsWrong(cfg.n) == 0 {
			res.ConvergeSecs = since.Seconds()
		}
		if since >= cfg.settle && (!counted || res.ConvergeSecs >= 0 || since >= cfg.converge) {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	res.SettleSecs = time.Since(joinedAt).Seconds()
	settleEnd, err := sc.get(ctx, "gc=0")
	if err != nil {
		return nil, err
	}
	if d := settleEnd.Time.Sub(res.AtJoined.Time).Seconds(); d > 0 {
		res.ServerSettleCPU = (settleEnd.CPUSeconds - res.AtJoined.CPUSeconds) / d
	}
	if counted {
		for _, p := range r.list() {
			if c := p.count.Load(); c != int64(cfg.n) {
				res.CountsWrong++
				if c < 0 {
					res.CountsUnknown++
				}
			}
		}
	}
	if cfg.hold > 0 {
		fmt.Fprintf(progress, "tetherload room: holding the conns for %v\n", cfg.hold)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(cfg.hold):
		}
		res.Hold = cfg.hold.String()
	}
	if res.End, err = sc.get(ctx, "gc=1"); err != nil {
		return nil, err
	}
	if err := profiled(); err != nil {
		return nil, err
	}
	r.result(res)
	return res, nil
}

// cpuProfile fetches the server's CPU profile of the next cfg.profileFor
// into cfg.profile, if set; wait waits for it.
func (r *roomRun) cpuProfile(ctx context.Context, sc *statsClient) (wait func() error) {
	return fetchCPUProfile(ctx, sc, r.cfg.profile, r.cfg.profileFor)
}

// fetchCPUProfile fetches the server's CPU profile of the next d (whole
// seconds) into file, if set, in the background; wait waits for it.
func fetchCPUProfile(ctx context.Context, sc *statsClient, file string, d time.Duration) (wait func() error) {
	if file == "" {
		return func() error { return nil }
	}
	secs := max(int(d.Round(time.Second)/time.Second), 1)
	errc := make(chan error, 1)
	go func() {
		f, err := os.Create(file)
		if err != nil {
			errc <- err
			return
		}
		hc := &http.Client{Transport: sc.hc.Transport} // no 30 s timeout
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, sc.base+"/debug/pprof/profile?seconds="+strconv.Itoa(secs), nil)
		if err == nil {
			var resp *http.Response
			if resp, err = hc.Do(req); err == nil {
				_, err = io.Copy(f, resp.Body)
				resp.Body.Close()
			}
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		errc <- err
	}()
	return func() error {
		if err := <-errc; err != nil {
			return fmt.Errorf("cpu profile: %w", err)
		}
		return nil
	}
}

// result fills in the counters of the run.
func (r *roomRun) result(res *RoomResult) {
	r.mu.Lock()
	res.FailReasons = maps.Clone(r.failed)
	res.DropReasons = maps.Clone(r.dropped)
	r.mu.Unlock()
	res.Failed, res.Dropped = r.nFailed.Load(), r.nDropped.Load()
	if fd := r.firstDrop.Load(); fd != 0 {
		res.FirstDropSecs = time.Unix(0, fd).Sub(r.start).Seconds()
	}
	e := res.End
	res.ServerHeartbeats, res.ServerOtherEnds, res.ServerEvictions, res.ServerOpen = e.HeartbeatTimeouts, e.OtherEnds, e.HubEvictions, e.Open
	if !r.v1 {
		res.ServerSubscribed = e.RoomSubscribed
	}
	res.PresenceMsgs, res.PresenceSnapshots = r.presMsgs.Load(), r.presSnaps.Load()
	res.PresenceBytes, res.PresenceMaxLine = r.presBytes.Load(), r.presMax.Load()
	if res.Joined > 0 {
		n := float64(res.Joined)
		res.BytesPerJoin = float64(res.PresenceBytes) / n
		res.MsgsPerJoin = float64(res.PresenceMsgs) / n
		res.RSSPerConn = (float64(e.RSS) - float64(res.Baseline.RSS)) / n
		res.HeapPerConn = (float64(e.HeapInuse) - float64(res.Baseline.HeapInuse)) / n
		res.ServerCPUPerJoin = res.ServerJoinCPU / n * 1e6
	}
}

// progress prints the joins every 10 s until stopped.
func (r *roomRun) progress(w io.Writer) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-done:
				return
			case <-time.After(10 * time.Second):
			}
			fmt.Fprintf(w, "tetherload room: +%.0fs %d joined, %d failed, %d dropped\n",
				time.Since(r.start).Seconds(), len(r.list()), r.nFailed.Load(), r.nDropped.Load())
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

func (r *roomRun) list() []*roomPeer {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.peers
}

func (r *roomRun) countsWrong(n int) int {
	wrong := 0
	for _, p := range r.list() {
		if p.count.Load() != int64(n) {
			wrong++
		}
	}
	return wrong
}

// join dials conn i, subscribes it (v1) and keeps it with its reader.
// What fails is counted, not returned: the run goes on.
func (r *roomRun) join(ctx context.Context, i int) {
	url := r.base + "?user=u" + strconv.Itoa(i)
	dctx, cancel := context.WithTimeout(ctx, r.cfg.handshake)
	defer cancel()
	opts := &websocket.DialOptions{HTTPClient: r.srcs.pick(i).hc}
	if r.v1 {
		opts.Subprotocols = []string{tether.Subprotocol}
	}
	c, _, err := websocket.Dial(dctx, url, opts)
	if err != nil {
		r.fail(ctx, "handshake", err)
		return
	}
	r.lastHS.Store(max(r.lastHS.Load(), time.Now().UnixNano()))
	c.SetReadLimit(-1)
	p := &roomPeer{run: r, c: c, done: make(chan struct{})}
	p.count.Store(-1)
	if r.v1 {
		if err := p.subscribe(dctx); err != nil {
			c.CloseNow()
			r.fail(ctx, "subscribe", err)
			return
		}
	}
	now := time.Now().UnixNano()
	for {
		last := r.lastJoin.Load()
		if now <= last || r.lastJoin.CompareAndSwap(last, now) {
			break
		}
	}
	r.mu.Lock()
	r.peers = append(r.peers, p)
	r.mu.Unlock()
	go p.read()
}

// fail counts a conn that could not join, by the kind of error (digits
// blanked, so that ports and user IDs do not make a reason each); one
// cut off by the end of -setup is counted as not dialled instead.
func (r *roomRun) fail(ctx context.Context, what string, err error) {
	if ctx.Err() != nil {
		return
	}
	r.nFailed.Add(1)
	key := what + ": " + digitRun.ReplaceAllString(err.Error(), "N")
	r.mu.Lock()
	r.failed[key]++
	r.mu.Unlock()
}

// subscribe sends the sub and reads until its ack, reading whatever comes
// before it as the reader would.
func (p *roomPeer) subscribe(ctx context.Context) error {
	if err := p.c.Write(ctx, websocket.MessageText, roomSub); err != nil {
		return err
	}
	for {
		_, data, err := p.c.Read(ctx)
		if err != nil {
			return err
		}
		acked, refused := p.frame(data)
		if refused != nil {
			return fmt.Errorf("refused: %s", refused)
		}
		if acked {
			return nil
		}
	}
}

// read reads the conn until it ends, counting its presence, and counts
// its end as a drop unless the client closed it.
func (p *roomPeer) read() {
	defer close(p.done)
	for {
		_, data, err := p.c.Read(context.Background())
		if err != nil {
			if !p.run.closing.Load() {
				p.run.drop(err)
			}
			return
		}
		if p.run.v1 {
			p.frame(data)
		}
	}
}

func (r *roomRun) drop(err error) {
	r.nDropped.Add(1)
	r.firstDrop.CompareAndSwap(0, time.Now().UnixNano())
	key := digitRun.ReplaceAllString(err.Error(), "N")
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		key = fmt.Sprintf("close %d %q", int(ce.Code), ce.Reason)
	}
	r.mu.Lock()
	r.dropped[key]++
	r.mu.Unlock()
}

// frame reads the lines of one message: presence is counted and its count
// kept; the ack and an error are reported.
func (p *roomPeer) frame(data []byte) (acked bool, refused []byte) {
	r := p.run
	for line := range bytes.SplitSeq(data, []byte("\n")) {
		switch {
		case bytes.HasPrefix(line, []byte(`{"op":"presence"`)):
			r.presMsgs.Add(1)
			r.presBytes.Add(int64(len(line)))
			for {
				m := r.presMax.Load()
				if int64(len(line)) <= m || r.presMax.CompareAndSwap(m, int64(len(line))) {
					break
				}
			}
			snapshot := bytes.Contains(line, []byte(`"snapshot":true`))
			if snapshot {
				r.presSnaps.Add(1)
			}
			p.count.Store(presenceCount(line, p.count.Load(), snapshot))
		case bytes.HasPrefix(line, []byte(`{"op":"ack"`)):
			acked = true
		case bytes.HasPrefix(line, []byte(`{"op":"error"`)):
			refused = line
		}
	}
	return acked, refused
}

// presenceCount is the room's count after a presence line, given the count
// before it (-1: none yet): its count field, or for a server that sends
// none (before count existed), the length of a snapshot's joins or the
// count before plus the joins less the leaves. A first presence without a
// count is a snapshot (or the first change of an empty room) either way.
func presenceCount(line []byte, prev int64, snapshot bool) int64 {
	if _, rest, ok := bytes.Cut(line, []byte(`"count":`)); ok {
		end := 0
		for end < len(rest) && rest[end] >= '0' && rest[end] <= '9' {
			end++
		}
		if n, err := strconv.ParseInt(string(rest[:end]), 10, 64); err == nil {
			return n
		}
	}
	joins, leaves := line, []byte(nil)
	if i := bytes.Index(line, []byte(`"leaves":`)); i >= 0 {
		joins, leaves = line[:i], line[i:]
	}
	if j := bytes.Index(joins, []byte(`"joins":`)); j >= 0 {
		joins = joins[j:]
	} else {
		joins = nil
	}
	nj := int64(bytes.Count(joins, []byte(`{"user":`)))
	nl := int64(bytes.Count(leaves, []byte(`{"user":`)))
	if snapshot || prev < 0 {
		prev = 0
	}
	return prev + nj - nl
}

// closeAll drops every conn without a close handshake, 64 at a time, and
// waits for the readers.
func (r *roomRun) closeAll() {
	r.closing.Store(true)
	forEach64(r.list(), func(p *roomPeer) {
		_ = p.c.CloseNow()
		<-p.done
	})
}

func (r *RoomResult) print(w io.Writer) error {
	pin := ""
	if r.Pinned != "" {
		pin = ", pinned " + r.Pinned
	}
	status := fmt.Sprintf("%d of %d joined in %.2fs (handshakes %.2fs)", r.Joined, r.Conns, r.JoinSecs, r.HandshakeSecs)
	if r.TimedOut {
		status = fmt.Sprintf("TIMED OUT: %d of %d joined after %.2fs, %d not dialled", r.Joined, r.Conns, r.JoinSecs, r.NotDialled)
	}
	fmt.Fprintf(w, "room: %d %s peers, %d handshakes in flight, heartbeat %s%s: %s\n",
		r.Conns, r.Peers, r.Concurrency, r.Heartbeat, pin, status)
	held := ""
	if r.Hold != "" {
		held = " and the hold of " + r.Hold
	}
	fmt.Fprintf(w, "lost: %d failed to join, %d dropped within %.1fs after the last join%s; server: %d heartbeat timeouts, %d other ends, %d evicted, %d open at the end\n",
		r.Failed, r.Dropped, r.SettleSecs, held, r.ServerHeartbeats, r.ServerOtherEnds, r.ServerEvictions, r.ServerOpen)
	for _, m := range []struct {
		what string
		m    map[string]int64
	}{{"failed", r.FailReasons}, {"dropped", r.DropReasons}} {
		for _, k := range slices.Sorted(maps.Keys(m.m)) {
			fmt.Fprintf(w, "  %s: %d × %s\n", m.what, m.m[k], k)
		}
	}
	if r.FirstDropSecs > 0 {
		fmt.Fprintf(w, "  first drop %.2fs after the first dial\n", r.FirstDropSecs)
	}
	switch r.Peers {
	case "v1":
		conv := "never within the settle"
		if r.ConvergeSecs >= 0 {
			conv = fmt.Sprintf("%.2fs after the last join", r.ConvergeSecs)
		}
		fmt.Fprintf(w, "presence: %d messages (%d snapshots), %d bytes = %.1f B and %.2f messages per join, largest %d B; every count at %d %s; %d counts wrong (%d never told)\n",
			r.PresenceMsgs, r.PresenceSnapshots, r.PresenceBytes, r.BytesPerJoin, r.MsgsPerJoin, r.PresenceMaxLine,
			r.Conns, conv, r.CountsWrong, r.CountsUnknown)
	case "raw":
		fmt.Fprintf(w, "the server subscribed %d raw peers\n", r.ServerSubscribed)
	default:
		fmt.Fprintf(w, "presence off: %d presence messages\n", r.PresenceMsgs)
	}
	after := "the settle"
	if r.Hold != "" {
		after = "a hold of " + r.Hold
	}
	_, err := fmt.Fprintf(w, "server: %.2f CPU s for the join (%.0f µs per join), %.3f CPU s/s in the settle; RSS %+.2f KiB, heap %+.2f KiB per conn after %s (GC'd); load process %.2f CPU s for the join\n",
		r.ServerJoinCPU, r.ServerCPUPerJoin, r.ServerSettleCPU, r.RSSPerConn/1024, r.HeapPerConn/1024, after, r.LoadJoinCPU)
	return err
}

// RoomDoc is the room scenario's output: every run, and a summary per
// kind of peers.
type RoomDoc struct {
	Scenario string        `json:"scenario"`
	Runs     []*RoomResult `json:"runs"`
	Errors   []string      `json:"errors,omitempty"`
	Summary  *RoomSummary  `json:"summary,omitempty"`
}

// RoomSummary is the runs of each kind of peers side by side.
type RoomSummary struct {
	Rows []RoomRow `json:"rows"`
}

// RoomRow is the runs of one kind of peers.
type RoomRow struct {
	Peers        string    `json:"peers"`
	Conns        int       `json:"conns"`
	JoinSecs     []float64 `json:"join_seconds"`
	MinSecs      float64   `json:"join_seconds_min"`
	MedianSecs   float64   `json:"join_seconds_median"`
	Lost         int64     `json:"lost"` // failed + dropped + not dialled, over the runs
	BytesPerJoin float64   `json:"presence_bytes_per_join_median"`
	MsgsPerJoin  float64   `json:"presence_messages_per_join_median"`
	CountsWrong  int       `json:"counts_wrong"` // over the runs
	CPUPerJoin   float64   `json:"server_cpu_us_per_join_median"`
	// The join time over the raw peers': of the fastest runs and of the
	// medians; null unless raw peers ran.
	OverRawMin    *float64 `json:"join_over_raw_min"`
	OverRawMedian *float64 `json:"join_over_raw_median"`
}

func summarizeRoom(peers []string, runs []*RoomResult) *RoomSummary {
	if len(runs) == 0 {
		return nil
	}
	s := &RoomSummary{}
	for _, p := range peers {
		var row RoomRow
		var bytesPer, msgsPer, cpuPer []float64
		for _, r := range runs {
			if r.Peers != p {
				continue
			}
			row.Peers, row.Conns = p, r.Conns
			row.JoinSecs = append(row.JoinSecs, r.JoinSecs)
			row.Lost += r.Failed + r.Dropped + int64(r.NotDialled)
			row.CountsWrong += r.CountsWrong
			bytesPer = append(bytesPer, r.BytesPerJoin)
			msgsPer = append(msgsPer, r.MsgsPerJoin)
			cpuPer = append(cpuPer, r.ServerCPUPerJoin)
		}
		if len(row.JoinSecs) == 0 {
			continue
		}
		row.MinSecs, row.MedianSecs = slices.Min(row.JoinSecs), median(row.JoinSecs)
		row.BytesPerJoin, row.MsgsPerJoin, row.CPUPerJoin = median(bytesPer), median(msgsPer), median(cpuPer)
		s.Rows = append(s.Rows, row)
	}
	if i := slices.IndexFunc(s.Rows, func(r RoomRow) bool { return r.Peers == "raw" }); i >= 0 {
		raw := s.Rows[i]
		for j := range s.Rows {
			s.Rows[j].OverRawMin = finite(s.Rows[j].MinSecs / raw.MinSecs)
			s.Rows[j].OverRawMedian = finite(s.Rows[j].MedianSecs / raw.MedianSecs)
		}
	}
	return s
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Sorted(slices.Values(v))
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func printRoomSummary(w io.Writer, s *RoomSummary) error {
	if s == nil {
		return nil
	}
	num := func(p *float64) string {
		if p == nil {
			return "n/a"
		}
		return fmt.Sprintf("%.2f", *p)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "peers	conns	runs	join s min	median	÷ raw min	÷ raw median	lost	presence B/join	msgs/join	counts wrong	server µs/join	")
	for _, r := range s.Rows {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.2f\t%.2f\t%s\t%s\t%d\t%.1f\t%.2f\t%d\t%.0f\t\n",
			r.Peers, r.Conns, len(r.JoinSecs), r.MinSecs, r.MedianSecs, num(r.OverRawMin), num(r.OverRawMedian),
			r.Lost, r.BytesPerJoin, r.MsgsPerJoin, r.CountsWrong, r.CPUPerJoin)
	}
	return tw.Flush()
}
