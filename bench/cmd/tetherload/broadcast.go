package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// broadcastConfig is one fan-out run: n subscribers of one topic, m
// messages of size bytes published by the server.
type broadcastConfig struct {
	loadFlags
	n, m, size int
	rate       float64       // publications per second; 0: as fast as Publish goes
	window     int           // publish this many, wait for their deliveries, go on; 0: all at once
	deliver    time.Duration // budget for every delivery after the last publish
	quiet      time.Duration // once published, give up after this long without a delivery
	queue      int           // the server's send queue per conn, in messages
	bare       bool          // centrifuge: its protocol by hand, not centrifuge-go
	pin        string        // "S,L": the server on CPU S, the load on CPU L; "" no pinning
	profile    string        // file for the server's CPU profile while publishing
}

func broadcastMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg broadcastConfig
	s := newScenario("broadcast", implFlag{allowRaw: true}, &cfg.loadFlags, loadDefaults{
		interval: 15 * time.Second, timeout: 30 * time.Second,
		setupHelp: "time allowed to start the server, dial and subscribe",
	}, stderr)
	fs := s.fs
	fs.IntVar(&cfg.n, "n", 1000, "subscribers")
	fs.IntVar(&cfg.m, "m", 1000, "messages to publish")
	fs.IntVar(&cfg.size, "size", 64, "bytes of data per message (at least 48)")
	fs.Float64Var(&cfg.rate, "rate", 0, "publications per second; 0 publishes as fast as the impl's publish call returns")
	fs.IntVar(&cfg.window, "window", 0, "publish in windows of this many messages, each once every subscriber has the window before it (as a publisher that waits for its readers would); 0: all at once")
	fs.DurationVar(&cfg.deliver, "deliver", time.Minute, "time allowed for every delivery once publishing is done")
	fs.DurationVar(&cfg.quiet, "quiet", 3*time.Second, "once publishing is done, stop waiting after this long without any delivery (conns the server dropped never get the rest)")
	fs.IntVar(&cfg.queue, "queue", 256, "the server's send buffer per conn, in messages: a burst longer than it drops subscribers (or messages) that fall behind")
	fs.BoolVar(&cfg.bare, "bare", false, "centrifuge: dial bare coder/websocket clients that speak its JSON protocol by hand instead of centrifuge-go, whose decoding costs CPU on the shared machine (the other impls' clients are bare already)")
	fs.StringVar(&cfg.profile, "cpuprofile", "", "write the server's CPU profile of the publishing (whole seconds, at least 1) to `file`")
	fs.StringVar(&cfg.pin, "pin", "", "pin the server to CPU S and this load process to CPU L, given as `S,L` (GOMAXPROCS 1 each), as room -pin does; empty: no pinning")
	return s.run(ctx, args, cfg.validate, stdout, stderr, func(ctx context.Context, im implSpec) (implResult, error) {
		return runBroadcast(ctx, cfg, im, stderr)
	})
}

// BroadcastResult is what one fan-out run measured. Latency is from just
// before the server's publish call to the subscriber's read of the frame
// that holds the message, on the same host's clock.
type BroadcastResult struct {
	Impl        string  `json:"impl"`
	Subscribers int     `json:"subscribers"`
	Messages    int     `json:"messages"`
	Size        int     `json:"size_bytes"`
	Rate        string  `json:"rate"`
	Heartbeat   string  `json:"heartbeat"`
	Bare        bool    `json:"bare_clients,omitempty"`
	Pinned      string  `json:"pinned,omitempty"` // server CPU, load CPU
	Deliveries  int64   `json:"deliveries"`
	Seconds     float64 `json:"seconds"` // first publish to last delivery
	PublishSecs float64 `json:"publish_seconds"`
	PerSecond   float64 `json:"deliveries_per_second"`
	P50ms       float64 `json:"latency_p50_ms"`
	P99ms       float64 `json:"latency_p99_ms"`
	MaxMS       float64 `json:"latency_max_ms"`
	// Frames is the WebSocket messages read that held deliveries:
	// deliveries/frames is the coalescing. Not visible with centrifuge-go,
	// which hands over publications one by one: 0.
	Frames     int64 `json:"frames"`
	OutOfOrder int64 `json:"out_of_order"`
	Duplicates int64 `json:"duplicates"`
	Missing    int64 `json:"missing"`
	Evicted    int64 `json:"evicted"` // the server's hub_evictions during the run
	// HeartbeatDrops is the conns the server ended by heartbeat during the
	// run: healthy subscribers, busy receiving, declared dead.
	HeartbeatDrops int64 `json:"heartbeat_drops"`
	OtherEnds      int64 `json:"server_other_ends"` // conns the server saw end otherwise
	ClientEnded    int64 `json:"client_conns_ended"`
	// ServerCPU and LoadCPU are the user + system CPU seconds of the server
	// process and of this load process from just before the first publish
	// to the end of the wait for deliveries: with -pin, which side's one
	// core was full.
	ServerCPU float64 `json:"server_cpu_seconds"`
	LoadCPU   float64 `json:"load_cpu_seconds"`
}

func (cfg *broadcastConfig) validate() error {
	var errs []error
	if cfg.n <= 0 || cfg.m <= 0 {
		errs = append(errs, fmt.Errorf("-n %d and -m %d must be positive", cfg.n, cfg.m))
	}
	if cfg.size < 48 {
		errs = append(errs, fmt.Errorf("-size %d must be at least 48", cfg.size))
	}
	if cfg.window < 0 || (cfg.window > 0 && cfg.rate > 0) {
		errs = append(errs, fmt.Errorf("-window %d must not be negative, nor set with -rate", cfg.window))
	}
	if cfg.rate < 0 {
		errs = append(errs, fmt.Errorf("-rate %v must not be negative", cfg.rate))
	}
	if cfg.sources < 1 || cfg.sources > 253 || cfg.concurrency < 1 {
		errs = append(errs, fmt.Errorf("-sources %d must be within 1..253 and -concurrency %d positive", cfg.sources, cfg.concurrency))
	}
	if cfg.interval <= 0 || cfg.timeout <= cfg.interval || cfg.setup <= 0 || cfg.deliver <= 0 || cfg.quiet <= 0 {
		errs = append(errs, errors.New("need 0 < interval < timeout, and positive -setup, -deliver and -quiet"))
	}
	if cfg.pin != "" {
		if cpus, err := parseCPUs(cfg.pin); err != nil || len(cpus) != 2 || cpus[0] == cpus[1] {
			errs = append(errs, fmt.Errorf("-pin %q: want two different CPUs, server first: 0,1", cfg.pin))
		}
	}
	return errors.Join(errs...)
}

// subscriber is one load client's receiving state.
type subscriber struct {
	next int // index of the next message expected
}

// latencies is a histogram of delivery latencies in 10 µs buckets up to
// 10 s, safe for concurrent use.
type latencies struct {
	buckets [1_000_001]atomic.Uint64
	max     atomic.Int64
}

const latencyBucket = 10 * time.Microsecond

func (l *latencies) add(d time.Duration) {
	i := min(max(int(d/latencyBucket), 0), len(l.buckets)-1)
	l.buckets[i].Add(1)
	for {
		m := l.max.Load()
		if int64(d) <= m || l.max.CompareAndSwap(m, int64(d)) {
			return
		}
	}
}

func (l *latencies) quantile(q float64, total uint64) time.Duration {
	rank := uint64(q*float64(total-1)) + 1
	var seen uint64
	for i := range l.buckets {
		seen += l.buckets[i].Load()
		if seen >= rank {
			return time.Duration(i+1) * latencyBucket
		}
	}
	return time.Duration(l.max.Load())
}

// runBroadcast runs one fan-out scenario against a child server process
// running im. It returns within cfg.setup + cfg.deliver + the publishing
// time + a minute, with its conns closed and its child gone.
func runBroadcast(ctx context.Context, cfg broadcastConfig, im implSpec, progress io.Writer) (_ *BroadcastResult, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	publishBudget := 10 * time.Minute
	if cfg.rate > 0 {
		publishBudget = time.Duration(float64(cfg.m)/cfg.rate*float64(time.Second)) + time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.setup+publishBudget+cfg.deliver+time.Minute)
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
	child, sc, err := startImpl(setupCtx, serverSpec{impl: im.server, interval: cfg.interval, timeout: cfg.timeout,
		queue: max(cfg.queue, 1), cpus: serverCPUs, cmd: cfg.serverCmd, pprof: cfg.profile != ""}, progress)
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := child.stop(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	defer sc.close()

	var (
		lat        = new(latencies)
		delivered  atomic.Int64
		frames     atomic.Int64
		outOfOrder atomic.Int64
		dups       atomic.Int64
		lastAt     atomic.Int64 // unix ns of the latest delivery
		all        = make(chan struct{})
		allOnce    sync.Once
	)
	want := int64(cfg.n) * int64(cfg.m)
	srcs := newSources(cfg.sources)
	defer srcs.close()
	pool := newConnPool(srcs, im.client, "ws://"+child.addr+im.path)
	pool.handlers = func(int) connHandlers {
		sub := &subscriber{}
		return connHandlers{bare: cfg.bare, recv: func(now int64, msgs []benchMsg) {
			frames.Add(1)
			for _, m := range msgs {
				lat.add(time.Duration(now - m.t))
				switch {
				case m.i == sub.next:
					sub.next++
				case m.i < sub.next:
					dups.Add(1)
				default:
					outOfOrder.Add(1)
					sub.next = m.i + 1
				}
			}
			lastAt.Store(now)
			if delivered.Add(int64(len(msgs))) >= want {
				allOnce.Do(func() { close(all) })
			}
		}}
	}
	defer func() {
		if cerr := pool.close(time.Minute); err == nil && cerr != nil {
			err = cerr
		}
	}()
	fmt.Fprintf(progress, "tetherload: dialling %d subscribers to %s%s (%s)\n", cfg.n, child.addr, im.path, im.name)
	if err := pool.dialAll(setupCtx, cfg.n, cfg.concurrency); err != nil {
		return nil, err
	}
	// Every conn registered for the broadcast: for the impls where
	// connecting is subscribing, the server may register a conn just after
	// the client's handshake returns. tether-raw's hub counts a conn
	// before its Observer.Connect subscribes it: there, every conn
	// subscribed.
	for {
		st, err := sc.get(setupCtx, "gc=0")
		if err != nil {
			return nil, err
		}
		registered := st.HubConns
		if im.server == "tether-raw" {
			registered = st.RoomSubscribed
		}
		if registered >= int64(cfg.n) || (st.HubConns == 0 && st.Open >= int64(cfg.n)) {
			break
		}
		select {
		case <-setupCtx.Done():
			return nil, fmt.Errorf("server has %d of %d subscribers registered: %w", registered, cfg.n, setupCtx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}

	fmt.Fprintf(progress, "tetherload: publishing %d messages of %d B\n", cfg.m, cfg.size)
	base, err := sc.get(ctx, "gc=0")
	if err != nil {
		return nil, err
	}
	loadCPU0, _ := cpuSeconds()
	start := time.Now()
	// Paced, the profile spans the publishing; a burst's deliveries take a
	// second or two (m seconds, as the pace of 1/s it was taken for, made
	// a burst of 1,000 a profile of 17 minutes).
	profileFor := 2 * time.Second
	if cfg.rate > 0 {
		profileFor = time.Duration(float64(cfg.m) / cfg.rate * float64(time.Second))
	}
	profiled := fetchCPUProfile(ctx, sc, cfg.profile, profileFor)
	publish := func(from, n int) error {
		url := fmt.Sprintf("%s/publish?topic=bench&n=%d&from=%d&size=%d&rate=%g", sc.base, n, from, cfg.size, cfg.rate)
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, nil)
		if err != nil {
			return err
		}
		// Publishing to 10,000 subscribers takes some impls longer than
		// the stats client's 30 s: ctx bounds this request instead.
		resp, err := (&http.Client{Transport: sc.hc.Transport}).Do(req)
		if err != nil {
			return fmt.Errorf("publish: %w", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("publish: %s: %s", resp.Status, body)
		}
		return nil
	}
	window := cfg.m
	if cfg.window > 0 {
		window = cfg.window
	}
	for from := 0; from < cfg.m; from += window {
		n := min(window, cfg.m-from)
		if err := publish(from, n); err != nil {
			return nil, err
		}
		if from+n == cfg.m {
			break
		}
		// The window's deliveries, or a quiet spell (subscribers the
		// server dropped never get theirs).
		for delivered.Load() < int64(from+n)*int64(cfg.n) {
			if time.Since(time.Unix(0, max(lastAt.Load(), start.UnixNano()))) >= cfg.quiet {
				break
			}
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(100 * time.Microsecond):
			}
		}
	}
	publishSecs := time.Since(start).Seconds()
	// Wait for every delivery; but subscribers the server dropped never get
	// theirs, so a quiet spell once publishing is done ends the wait too.
	deadline := time.After(cfg.deliver)
	tick := time.NewTicker(min(cfg.quiet/4, 250*time.Millisecond))
	defer tick.Stop()
wait:
	for {
		select {
		case <-all:
			break wait
		case <-deadline:
			break wait
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
			last := max(lastAt.Load(), start.UnixNano()+int64(publishSecs*1e9))
			if time.Since(time.Unix(0, last)) >= cfg.quiet {
				break wait
			}
		}
	}
	loadCPU1, _ := cpuSeconds()
	st, err := sc.get(ctx, "gc=0")
	if err != nil {
		return nil, err
	}
	if err := profiled(); err != nil {
		return nil, err
	}
	total := uint64(delivered.Load())
	res := &BroadcastResult{
		Impl:           im.name,
		Subscribers:    cfg.n,
		Messages:       cfg.m,
		Size:           cfg.size,
		Rate:           "max",
		Heartbeat:      cfg.interval.String() + "/" + cfg.timeout.String(),
		Bare:           cfg.bare,
		Pinned:         cfg.pin,
		Deliveries:     int64(total),
		Seconds:        time.Duration(lastAt.Load() - start.UnixNano()).Seconds(),
		PublishSecs:    publishSecs,
		OutOfOrder:     outOfOrder.Load(),
		Duplicates:     dups.Load(),
		Missing:        max(want-int64(total), 0),
		Evicted:        st.HubEvictions - base.HubEvictions,
		HeartbeatDrops: st.HeartbeatTimeouts - base.HeartbeatTimeouts,
		OtherEnds:      st.OtherEnds - base.OtherEnds,
		ClientEnded:    pool.lost.Load(),
		ServerCPU:      st.CPUSeconds - base.CPUSeconds,
		LoadCPU:        loadCPU1 - loadCPU0,
	}
	if cfg.bare || im.client.framesVisible() {
		res.Frames = frames.Load()
	}
	if cfg.rate > 0 {
		res.Rate = strconv.FormatFloat(cfg.rate, 'f', -1, 64) + "/s"
	}
	if cfg.window > 0 {
		res.Rate = "windows of " + strconv.Itoa(cfg.window)
	}
	if total > 0 && res.Seconds > 0 {
		res.PerSecond = float64(total) / res.Seconds
		ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
		res.P50ms = ms(lat.quantile(0.5, total))
		res.P99ms = ms(lat.quantile(0.99, total))
		res.MaxMS = ms(time.Duration(lat.max.Load()))
	}
	return res, nil
}

func (r *BroadcastResult) print(w io.Writer) error {
	frames := "frames not visible"
	if r.Frames > 0 {
		frames = fmt.Sprintf("%d frames", r.Frames)
	}
	_, err := fmt.Fprintf(w, "%d subscribers x %d messages of %d B (rate %s, heartbeat %s): %d deliveries in %.3fs = %.0f/s (%s); latency p50 %.2fms p99 %.2fms max %.2fms\n"+
		"%d out of order, %d duplicates, %d missing, %d evicted; %d conns dropped by heartbeat, %d ended otherwise on the server, %d client conns ended\n",
		r.Subscribers, r.Messages, r.Size, r.Rate, r.Heartbeat, r.Deliveries, r.Seconds, r.PerSecond, frames,
		r.P50ms, r.P99ms, r.MaxMS, r.OutOfOrder, r.Duplicates, r.Missing, r.Evicted,
		r.HeartbeatDrops, r.OtherEnds, r.ClientEnded)
	return err
}

func (r *BroadcastResult) figures() []figure {
	return []figure{
		{"deliveries/s", r.PerSecond, "higher"},
		{"latency p50 ms", r.P50ms, "lower"},
		{"latency p99 ms", r.P99ms, "lower"},
		{"conns dropped by heartbeat", float64(r.HeartbeatDrops), "lower"},
		{"deliveries missing", float64(r.Missing), "lower"},
	}
}

// parseBench reads t and i from a msg line of the bench topic:
// {"op":"msg",...,"data":{"t":<t>,"i":<i>,...}}.
func parseBench(line []byte) (t int64, i int, ok bool) {
	if !bytes.Contains(line, []byte(`"data":{"t":`)) {
		return 0, 0, false
	}
	return parseBenchAny(line)
}
