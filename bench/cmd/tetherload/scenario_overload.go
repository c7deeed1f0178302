package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// overload (tether only): n protocol v1 conns, each subscribed to two
// topics of a hub made by serve -overload: hi (PriorityHigh) and lo
// (PriorityLow), with WithBreaker(-breaker) unless it is 0. For -duration
// the server floods lo at -lorate (more than it can write to n conns on
// its one core) while hi gets -hirate publications stamped with their
// time, both through /publish at once. The figures: healthy conns
// dropped (heartbeat, evictions, anything else), hi deliveries received
// against those expected and their latency, lo deliveries received, shed
// (the breaker) and dropped (the queues), how often and how long the
// breaker was open, whether new handshakes were refused meanwhile, and
// the server's CPU.

type overloadConfig struct {
	loadFlags
	n         int
	duration  time.Duration // of the flood
	loRate    float64       // lo publications per second; 0: as fast as Publish returns
	hiRate    float64       // hi publications per second
	size      int           // bytes per lo message
	breaker   time.Duration // serve -breaker; 0: none
	queue     int           // serve -queue
	deliver   time.Duration // after the flood, the longest wait for the hi deliveries
	quiet     time.Duration // after the flood, stop waiting once no hi delivery came for this long
	sample    time.Duration // /stats sampling period during the flood
	probe     time.Duration // a new handshake every probe during the flood; 0: none
	handshake time.Duration // one conn's handshake and its two acks
	pin       string        // "S,L": the server on CPU S, the load on CPU L; "" no pinning
	profile   string        // file for the server's CPU profile of the flood

	serverCPUs string // serve -cpus, from pin
}

func overloadMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg overloadConfig
	fs := flag.NewFlagSet("tetherload overload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg.loadFlags.register(fs, loadDefaults{
		interval: 15 * time.Second, timeout: 30 * time.Second,
		concurrencyHelp: "handshakes in flight at once (each until its two acks)",
		setupHelp:       "time allowed to start the server, join every conn and see the breaker closed",
	})
	fs.IntVar(&cfg.n, "n", 5000, "protocol v1 conns, each subscribed to hi and lo")
	fs.DurationVar(&cfg.duration, "duration", 20*time.Second, "how long lo is flooded and hi published")
	fs.Float64Var(&cfg.loRate, "lorate", 20000, "lo publications per second (PriorityLow); 0 publishes as fast as Publish returns")
	fs.Float64Var(&cfg.hiRate, "hirate", 20, "hi publications per second (PriorityHigh), each stamped with its time: their latency is measured")
	fs.IntVar(&cfg.size, "size", 64, "bytes of data per lo message (at least 48; hi messages are 64 B)")
	fs.DurationVar(&cfg.breaker, "breaker", 20*time.Millisecond, "the server's breaker trip (serve -breaker: scheduler latency p99 over 1 s); 0: no breaker, for comparison")
	fs.IntVar(&cfg.queue, "queue", 256, "the server's send queue per conn, in messages (with 1 MiB)")
	fs.DurationVar(&cfg.deliver, "deliver", 30*time.Second, "after the flood, the longest wait for every hi delivery")
	fs.DurationVar(&cfg.quiet, "quiet", 5*time.Second, "after the flood, stop waiting once no hi delivery came for this long (a dropped conn never gets its share)")
	fs.DurationVar(&cfg.sample, "sample", 250*time.Millisecond, "period of the /stats samples during the flood")
	fs.DurationVar(&cfg.probe, "probe", time.Second, "during the flood, try a new handshake this often (refused with 503 while the breaker is open); 0: none")
	fs.DurationVar(&cfg.handshake, "handshake", 30*time.Second, "time allowed to one conn's handshake and its two acks")
	fs.StringVar(&cfg.pin, "pin", "", "pin the server to CPU S and this load process to CPU L, given as `S,L` (GOMAXPROCS 1 each), as broadcast -pin does; empty: no pinning")
	fs.StringVar(&cfg.profile, "cpuprofile", "", "write the server's CPU profile of the flood (whole seconds) to `file`")
	if err := parseFlags(fs, args); err != nil {
		return err
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
	if err := raiseFileLimit(uint64(cfg.n) + 512); err != nil {
		return err
	}
	res, err := runOverload(ctx, cfg, stderr)
	if err != nil {
		return err
	}
	if cfg.jsonOut {
		return writeJSON(stdout, res)
	}
	return res.print(stdout)
}

func (cfg *overloadConfig) validate() error {
	var errs []error
	if cfg.n <= 0 || cfg.duration <= 0 || cfg.hiRate <= 0 || cfg.loRate < 0 {
		errs = append(errs, fmt.Errorf("-n %d, -duration %v and -hirate %v must be positive, -lorate %v not negative", cfg.n, cfg.duration, cfg.hiRate, cfg.loRate))
	}
	if cfg.size < 48 || cfg.queue < 1 || cfg.breaker < 0 {
		errs = append(errs, fmt.Errorf("-size %d must be at least 48, -queue %d positive, -breaker %v not negative", cfg.size, cfg.queue, cfg.breaker))
	}
	if cfg.sources < 1 || cfg.sources > 253 || cfg.concurrency < 1 {
		errs = append(errs, fmt.Errorf("-sources %d must be within 1..253 and -concurrency %d positive", cfg.sources, cfg.concurrency))
	}
	if cfg.interval <= 0 || cfg.timeout <= cfg.interval || cfg.setup <= 0 || cfg.deliver <= 0 || cfg.quiet <= 0 ||
		cfg.sample <= 0 || cfg.probe < 0 || cfg.handshake <= 0 {
		errs = append(errs, errors.New("need 0 < interval < timeout, -probe not negative, and positive -setup, -deliver, -quiet, -sample and -handshake"))
	}
	if cfg.pin != "" {
		if cpus, err := parseCPUs(cfg.pin); err != nil || len(cpus) != 2 || cpus[0] == cpus[1] {
			errs = append(errs, fmt.Errorf("-pin %q: want two different CPUs, server first: 0,1", cfg.pin))
		}
	}
	return errors.Join(errs...)
}

// OverloadResult is what one overload run measured. Latency is from just
// before the server's Publish of a hi message to a client's read of the
// frame that holds it, on the same host's clock.
type OverloadResult struct {
	Scenario  string `json:"scenario"`
	Conns     int    `json:"conns"`
	Heartbeat string `json:"heartbeat"`
	Pinned    string `json:"pinned,omitempty"`
	Breaker   string `json:"breaker"` // the trip, or "off"
	Queue     int    `json:"queue"`
	Duration  string `json:"duration"`
	LoRate    string `json:"lo_rate"`
	HiRate    string `json:"hi_rate"`
	Size      int    `json:"lo_size_bytes"`

	JoinSecs     float64 `json:"join_seconds"`
	SetupRefused int64   `json:"setup_refused"` // handshakes refused with 503 while joining (retried)

	// What /publish made of the flood: publications, and the seconds it
	// took (the flood's duration, or a little more for the last call).
	LoPublished   int64   `json:"lo_published"`
	HiPublished   int64   `json:"hi_published"`
	PublishSecs   float64 `json:"publish_seconds"`
	LoPerSecAsked float64 `json:"lo_published_per_second"`

	HiExpected int64   `json:"hi_expected"` // hi publications x conns
	HiReceived int64   `json:"hi_received"`
	HiMissing  int64   `json:"hi_missing"` // over the conns: hi publications each did not get
	HiP50ms    float64 `json:"hi_latency_p50_ms"`
	HiP99ms    float64 `json:"hi_latency_p99_ms"`
	HiMaxMS    float64 `json:"hi_latency_max_ms"`
	// HiLastSecs is from the end of the flood to the last hi delivery.
	HiLastSecs float64 `json:"hi_last_after_flood_seconds"`

	LoReceived int64  `json:"lo_received"`
	Shed       uint64 `json:"lo_shed"`         // hub.Stats().Shed during the run: lo deliveries the breaker skipped
	QueueDrops uint64 `json:"queue_drops"`     // hub.Stats().Drops during the run: queued messages dropped for room (lo first)
	Frames     int64  `json:"frames_received"` // WebSocket messages the clients read

	Overloads        uint64  `json:"breaker_openings"`     // hub.Stats().Overloads during the run
	OpenSecs         float64 `json:"breaker_open_seconds"` // from Observer.Overload, during the run
	OverloadedAtEnd  bool    `json:"breaker_open_at_end"`
	Samples          int     `json:"samples"`
	SamplesOverload  int     `json:"samples_overloaded"`
	MaxSampleGapSecs float64 `json:"max_sample_gap_seconds"` // the longest wait for a /stats answer, plus the period

	// Healthy conns dropped: the client side's count of conns that ended
	// other than by its own close, and the server's view.
	Dropped           int64            `json:"conns_dropped"`
	DropReasons       map[string]int64 `json:"drop_reasons,omitempty"`
	HeartbeatTimeouts int64            `json:"server_heartbeat_timeouts"`
	DeadPeers         uint64           `json:"server_dead_peers"` // hub.Stats().DeadPeers during the run
	Evictions         int64            `json:"server_evictions"`
	OtherEnds         int64            `json:"server_other_ends"` // the probes' conns included
	OpenAtEnd         int64            `json:"server_open_at_end"`

	// New handshakes tried during the flood.
	ProbeAccepted int `json:"probe_accepted"`
	ProbeRefused  int `json:"probe_refused"` // 503
	ProbeFailed   int `json:"probe_failed"`  // anything else

	ServerCPU float64 `json:"server_cpu_seconds"` // flood start to the end of the hi wait
	LoadCPU   float64 `json:"load_cpu_seconds"`

	Timeline []OverloadSample `json:"timeline"`
}

// OverloadSample is one /stats sample during the flood.
type OverloadSample struct {
	Secs       float64 `json:"t"` // since the flood began
	Overloaded bool    `json:"overloaded"`
	Shed       uint64  `json:"shed"`
	Drops      uint64  `json:"drops"`
	Queued     int64   `json:"queued"`
	CPU        float64 `json:"cpu_seconds"`
	HiReceived int64   `json:"hi_received"`
	LoReceived int64   `json:"lo_received"`
}

// overloadRun is one run's load side.
type overloadRun struct {
	cfg  overloadConfig
	url  string
	srcs *sources

	mu      sync.Mutex
	peers   []*overloadPeer
	dropped map[string]int64

	lat          *latencies
	hi, lo       atomic.Int64
	frames       atomic.Int64
	lastHi       atomic.Int64 // unix ns
	nDropped     atomic.Int64
	setupRefused atomic.Int64
	closing      atomic.Bool
}

// overloadPeer is one client conn; hi is written by its reader only.
type overloadPeer struct {
	c    *websocket.Conn
	hi   atomic.Int64
	done chan struct{}
}

var (
	overloadSubs = [][]byte{[]byte(`{"op":"sub","topic":"hi","id":"1"}`), []byte(`{"op":"sub","topic":"lo","id":"2"}`)}
	hiPrefix     = []byte(`{"op":"msg","topic":"hi"`)
	loPrefix     = []byte(`{"op":"msg","topic":"lo"`)
)

// runOverload runs the scenario against a child server. It returns within
// cfg.setup + cfg.duration + cfg.deliver + 2 minutes, with its conns
// closed and its child gone.
func runOverload(ctx context.Context, cfg overloadConfig, progress io.Writer) (_ *OverloadResult, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.setup+cfg.duration+cfg.deliver+2*time.Minute)
	defer cancel()
	setupCtx, setupCancel := context.WithTimeout(ctx, cfg.setup)
	defer setupCancel()

	child, sc, err := startImpl(setupCtx, serverSpec{
		impl: "tether", interval: cfg.interval, timeout: cfg.timeout, cmd: cfg.serverCmd, queue: cfg.queue,
		cpus: cfg.serverCPUs, overload: true, breaker: cfg.breaker, pprof: cfg.profile != "",
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

	res := &OverloadResult{
		Scenario: "overload", Conns: cfg.n, Heartbeat: cfg.interval.String() + "/" + cfg.timeout.String(),
		Pinned: cfg.pin, Breaker: "off", Queue: cfg.queue, Duration: cfg.duration.String(),
		LoRate: "max", HiRate: strconv.FormatFloat(cfg.hiRate, 'f', -1, 64) + "/s", Size: cfg.size,
	}
	if cfg.breaker > 0 {
		res.Breaker = cfg.breaker.String()
	}
	if cfg.loRate > 0 {
		res.LoRate = strconv.FormatFloat(cfg.loRate, 'f', -1, 64) + "/s"
	}
	r := &overloadRun{cfg: cfg, url: "ws://" + child.addr + "/sub", srcs: newSources(cfg.sources),
		lat: new(latencies), dropped: map[string]int64{}}
	defer r.srcs.close()
	defer r.closeAll()

	fmt.Fprintf(progress, "tetherload overload: joining %d v1 peers to hi and lo at %s (breaker %s)\n", cfg.n, r.url, res.Breaker)
	start := time.Now()
	if err := forEach(setupCtx, cfg.n, cfg.concurrency, r.join); err != nil {
		return nil, fmt.Errorf("join: %w", err)
	}
	res.JoinSecs = time.Since(start).Seconds()
	res.SetupRefused = r.setupRefused.Load()
	// Every conn registered, and the breaker closed (the join itself may
	// have opened it).
	for {
		st, err := sc.get(setupCtx, "gc=0")
		if err != nil {
			return nil, err
		}
		if st.HubConns >= int64(cfg.n) && !st.HubOverloaded {
			break
		}
		select {
		case <-setupCtx.Done():
			return nil, fmt.Errorf("before the flood: %d of %d conns registered, breaker open %v: %w", st.HubConns, cfg.n, st.HubOverloaded, setupCtx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}

	fmt.Fprintf(progress, "tetherload overload: %d joined in %.1fs (%d refused and retried); flooding lo at %s and publishing hi at %s for %v\n",
		cfg.n, res.JoinSecs, res.SetupRefused, res.LoRate, res.HiRate, cfg.duration)
	base, err := sc.get(ctx, "gc=0")
	if err != nil {
		return nil, err
	}
	loadCPU0, _ := cpuSeconds()
	floodStart := time.Now()
	floodCtx, floodCancel := context.WithCancel(ctx)
	defer floodCancel()
	profiled := fetchCPUProfile(ctx, sc, cfg.profile, cfg.duration)
	var bg sync.WaitGroup
	bg.Go(func() { res.Timeline, res.MaxSampleGapSecs = r.sampleStats(floodCtx, sc, floodStart, base) })
	if cfg.probe > 0 {
		bg.Go(func() { r.probes(floodCtx, res) })
	}
	type published struct {
		n   int64
		err error
	}
	pub := func(topic string, rate float64, size int, out chan<- published) {
		n, err := publishFor(ctx, sc, topic, rate, size, cfg.duration)
		out <- published{n, err}
	}
	loC, hiC := make(chan published, 1), make(chan published, 1)
	go pub("lo", cfg.loRate, cfg.size, loC)
	go pub("hi", cfg.hiRate, 64, hiC)
	lo, hi := <-loC, <-hiC
	floodEnd := time.Now()
	if err := errors.Join(lo.err, hi.err); err != nil {
		floodCancel()
		bg.Wait()
		return nil, err
	}
	res.LoPublished, res.HiPublished = lo.n, hi.n
	res.PublishSecs = floodEnd.Sub(floodStart).Seconds()
	res.LoPerSecAsked = float64(lo.n) / res.PublishSecs
	peers := r.list()
	res.HiExpected = hi.n * int64(len(peers))
	fmt.Fprintf(progress, "tetherload overload: published %d lo and %d hi in %.1fs; waiting for the hi deliveries\n", lo.n, hi.n, res.PublishSecs)

	deadline := time.Now().Add(cfg.deliver)
	for r.hi.Load() < res.HiExpected && time.Now().Before(deadline) {
		last := max(r.lastHi.Load(), floodEnd.UnixNano())
		if time.Since(time.Unix(0, last)) >= cfg.quiet {
			break
		}
		select {
		case <-ctx.Done():
			floodCancel()
			bg.Wait()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	floodCancel()
	bg.Wait()
	loadCPU1, _ := cpuSeconds()
	if err := profiled(); err != nil {
		return nil, err
	}
	// The server sees the last probe's conn end a little after the probe
	// closed it: give it a moment.
	var st Stats
	for settle := time.Now().Add(2 * time.Second); ; {
		if st, err = sc.get(ctx, "gc=0"); err != nil {
			return nil, err
		}
		if st.Open <= int64(len(peers)) || time.Now().After(settle) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}

	res.HiReceived, res.LoReceived, res.Frames = r.hi.Load(), r.lo.Load(), r.frames.Load()
	for _, p := range peers {
		res.HiMissing += max(hi.n-p.hi.Load(), 0)
	}
	if total := uint64(res.HiReceived); total > 0 {
		ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
		res.HiP50ms = ms(r.lat.quantile(0.5, total))
		res.HiP99ms = ms(r.lat.quantile(0.99, total))
		res.HiMaxMS = ms(time.Duration(r.lat.max.Load()))
		res.HiLastSecs = max(time.Unix(0, r.lastHi.Load()).Sub(floodEnd).Seconds(), 0)
	}
	res.Shed, res.QueueDrops = st.HubShed-base.HubShed, st.HubDrops-base.HubDrops
	res.Overloads, res.OpenSecs = st.HubOverloads-base.HubOverloads, st.OverloadOpenSecs-base.OverloadOpenSecs
	res.OverloadedAtEnd = st.HubOverloaded
	res.Samples = len(res.Timeline)
	for _, s := range res.Timeline {
		if s.Overloaded {
			res.SamplesOverload++
		}
	}
	r.mu.Lock()
	res.Dropped = r.nDropped.Load()
	if len(r.dropped) > 0 {
		res.DropReasons = make(map[string]int64, len(r.dropped))
		for k, v := range r.dropped {
			res.DropReasons[k] = v
		}
	}
	r.mu.Unlock()
	res.HeartbeatTimeouts = st.HeartbeatTimeouts - base.HeartbeatTimeouts
	res.DeadPeers = st.HubDeadPeers - base.HubDeadPeers
	res.Evictions = st.HubEvictions - base.HubEvictions
	res.OtherEnds = st.OtherEnds - base.OtherEnds
	res.OpenAtEnd = st.Open
	res.ServerCPU = st.CPUSeconds - base.CPUSeconds
	res.LoadCPU = loadCPU1 - loadCPU0
	return res, nil
}

// publishFor asks the server to publish on topic at rate for d, and
// returns how many it published.
func publishFor(ctx context.Context, sc *statsClient, topic string, rate float64, size int, d time.Duration) (int64, error) {
	url := fmt.Sprintf("%s/publish?topic=%s&n=0&size=%d&rate=%g&for=%s", sc.base, topic, size, rate, d)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, nil)
	if err != nil {
		return 0, err
	}
	// The publishing takes d: ctx bounds this request, not the stats
	// client's 30 s.
	resp, err := (&http.Client{Transport: sc.hc.Transport}).Do(req)
	if err != nil {
		return 0, fmt.Errorf("publish %s: %w", topic, err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var n, ns int64
	if _, err := fmt.Sscanf(string(body), "%d %d", &n, &ns); resp.StatusCode != http.StatusOK || err != nil {
		return 0, fmt.Errorf("publish %s: %s: %q", topic, resp.Status, body)
	}
	return n, nil
}

// join dials conn i and subscribes it to hi and lo, retrying a handshake
// refused with 503 (the breaker, opened by the join itself) until ctx
// ends, and anything else twice.
func (r *overloadRun) join(ctx context.Context, i int) error {
	src := r.srcs.pick(i)
	failures := 0
	for {
		dctx, cancel := context.WithTimeout(ctx, r.cfg.handshake)
		c, resp, err := websocket.Dial(dctx, r.url, &websocket.DialOptions{
			HTTPClient: src.hc, Subprotocols: []string{tether.Subprotocol},
		})
		if err == nil {
			c.SetReadLimit(-1)
			if err = subscribeOverload(dctx, c); err == nil {
				cancel()
				p := &overloadPeer{c: c, done: make(chan struct{})}
				r.mu.Lock()
				r.peers = append(r.peers, p)
				r.mu.Unlock()
				go r.read(p)
				return nil
			}
			c.CloseNow()
		}
		cancel()
		wait := time.Duration(failures+1) * 100 * time.Millisecond
		if resp != nil && resp.StatusCode == http.StatusServiceUnavailable {
			r.setupRefused.Add(1)
			wait = 500*time.Millisecond + rand.N(500*time.Millisecond)
		} else if failures++; failures > 2 {
			return fmt.Errorf("conn %d: %w", i, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("conn %d: %w (last: %w)", i, ctx.Err(), err)
		case <-time.After(wait):
		}
	}
}

// subscribeOverload sends the two subs and reads until both acks.
func subscribeOverload(ctx context.Context, c *websocket.Conn) error {
	for _, sub := range overloadSubs {
		if err := c.Write(ctx, websocket.MessageText, sub); err != nil {
			return err
		}
	}
	for acks := 0; acks < len(overloadSubs); {
		_, data, err := c.Read(ctx)
		if err != nil {
			return err
		}
		for line := range bytes.SplitSeq(data, []byte("\n")) {
			switch {
			case bytes.HasPrefix(line, []byte(`{"op":"ack"`)):
				acks++
			case bytes.HasPrefix(line, []byte(`{"op":"error"`)):
				return fmt.Errorf("subscribe: %s", line)
			}
		}
	}
	return nil
}

// read reads p until it ends, counting hi and lo deliveries and timing the
// hi ones, and counts its end as a drop unless the client closed it.
func (r *overloadRun) read(p *overloadPeer) {
	defer close(p.done)
	for {
		_, data, err := p.c.Read(context.Background())
		if err != nil {
			if !r.closing.Load() {
				r.drop(err)
			}
			return
		}
		now := time.Now().UnixNano()
		var hi, lo int64
		for line := range bytes.SplitSeq(data, []byte("\n")) {
			switch {
			case bytes.HasPrefix(line, loPrefix):
				lo++
			case bytes.HasPrefix(line, hiPrefix):
				if t, _, ok := parseBenchAny(line); ok {
					r.lat.add(time.Duration(now - t))
					hi++
				}
			}
		}
		r.frames.Add(1)
		if lo > 0 {
			r.lo.Add(lo)
		}
		if hi > 0 {
			p.hi.Add(hi)
			r.hi.Add(hi)
			for {
				last := r.lastHi.Load()
				if now <= last || r.lastHi.CompareAndSwap(last, now) {
					break
				}
			}
		}
	}
}

func (r *overloadRun) drop(err error) {
	r.nDropped.Add(1)
	key := digitRun.ReplaceAllString(err.Error(), "N")
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		key = fmt.Sprintf("close %d %q", int(ce.Code), ce.Reason)
	}
	r.mu.Lock()
	r.dropped[key]++
	r.mu.Unlock()
}

func (r *overloadRun) list() []*overloadPeer {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.peers
}

// sampleStats samples /stats every cfg.sample until ctx ends, and returns
// the samples and the longest time between two of them.
func (r *overloadRun) sampleStats(ctx context.Context, sc *statsClient, start time.Time, base Stats) ([]OverloadSample, float64) {
	var out []OverloadSample
	var maxGap time.Duration
	last := start
	for {
		select {
		case <-ctx.Done():
			return out, maxGap.Seconds()
		case <-time.After(r.cfg.sample):
		}
		st, err := sc.get(ctx, "gc=0")
		if err != nil {
			if ctx.Err() != nil {
				return out, maxGap.Seconds()
			}
			continue
		}
		now := time.Now()
		maxGap = max(maxGap, now.Sub(last))
		last = now
		out = append(out, OverloadSample{
			Secs: now.Sub(start).Seconds(), Overloaded: st.HubOverloaded,
			Shed: st.HubShed - base.HubShed, Drops: st.HubDrops - base.HubDrops, Queued: st.HubQueued,
			CPU: st.CPUSeconds - base.CPUSeconds, HiReceived: r.hi.Load(), LoReceived: r.lo.Load(),
		})
	}
}

// probes tries a new handshake every cfg.probe until ctx ends, closing
// the conns that are accepted at once.
func (r *overloadRun) probes(ctx context.Context, res *OverloadResult) {
	for k := 0; ; k++ {
		select {
		case <-ctx.Done():
			return
		case <-time.After(r.cfg.probe):
		}
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		c, resp, err := websocket.Dial(dctx, r.url, &websocket.DialOptions{
			HTTPClient: r.srcs.pick(r.cfg.n + k).hc, Subprotocols: []string{tether.Subprotocol},
		})
		cancel()
		switch {
		case err == nil:
			res.ProbeAccepted++
			c.CloseNow()
		case resp != nil && resp.StatusCode == http.StatusServiceUnavailable:
			res.ProbeRefused++
		case ctx.Err() != nil:
			return
		default:
			res.ProbeFailed++
		}
	}
}

// closeAll drops every conn without a close handshake, 64 at a time, and
// waits for the readers.
func (r *overloadRun) closeAll() {
	r.closing.Store(true)
	forEach64(r.list(), func(p *overloadPeer) {
		_ = p.c.CloseNow()
		<-p.done
	})
}

func (r *OverloadResult) print(w io.Writer) error {
	pin := ""
	if r.Pinned != "" {
		pin = ", pinned " + r.Pinned
	}
	fmt.Fprintf(w, "overload: %d v1 conns on hi (high) and lo (low), breaker %s, queue %d, heartbeat %s%s; joined in %.1fs (%d handshakes refused and retried)\n",
		r.Conns, r.Breaker, r.Queue, r.Heartbeat, pin, r.JoinSecs, r.SetupRefused)
	fmt.Fprintf(w, "flood %s: lo asked at %s of %d B, %d published (%.0f/s); hi at %s, %d published\n",
		r.Duration, r.LoRate, r.Size, r.LoPublished, r.LoPerSecAsked, r.HiRate, r.HiPublished)
	fmt.Fprintf(w, "hi: %d of %d received (%d missing), latency p50 %.2fms p99 %.2fms max %.2fms; last %.2fs after the flood\n",
		r.HiReceived, r.HiExpected, r.HiMissing, r.HiP50ms, r.HiP99ms, r.HiMaxMS, r.HiLastSecs)
	fmt.Fprintf(w, "lo: %d received, %d shed by the breaker, %d queued messages dropped; %d frames read\n",
		r.LoReceived, r.Shed, r.QueueDrops, r.Frames)
	fmt.Fprintf(w, "breaker: opened %d times, open %.1fs in all (open in %d of %d /stats samples, longest gap %.2fs), open at the end %v; probes: %d accepted, %d refused (503), %d failed\n",
		r.Overloads, r.OpenSecs, r.SamplesOverload, r.Samples, r.MaxSampleGapSecs, r.OverloadedAtEnd, r.ProbeAccepted, r.ProbeRefused, r.ProbeFailed)
	fmt.Fprintf(w, "healthy conns dropped: %d (client side); server: %d heartbeat timeouts (%d dead peers), %d evictions, %d other ends (probes included), %d open at the end\n",
		r.Dropped, r.HeartbeatTimeouts, r.DeadPeers, r.Evictions, r.OtherEnds, r.OpenAtEnd)
	for k, v := range r.DropReasons {
		fmt.Fprintf(w, "  dropped: %d × %s\n", v, k)
	}
	_, err := fmt.Fprintf(w, "CPU: server %.2fs, load %.2fs, from the flood's start to the end of the hi wait\n", r.ServerCPU, r.LoadCPU)
	return err
}
