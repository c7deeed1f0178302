package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"time"
)

// deadpeerConfig is one dead-peer run: n conns, k of which go silent.
type deadpeerConfig struct {
	loadFlags
	n, k int
}

func deadpeerMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg deadpeerConfig
	s := newScenario("deadpeer", implFlag{}, &cfg.loadFlags, loadDefaults{
		// centrifuge allows timeout-interval for the pong and checks for it
		// only if that is below the interval: timeout < 2 x interval.
		interval: 6 * time.Second, timeout: 10 * time.Second,
		timeoutNote: "a silent peer should be declared dead this long after its last pong (below 2 x interval, or centrifuge never drops it)",
		setupHelp:   "time allowed to start the server and dial",
	}, stderr)
	fs := s.fs
	fs.IntVar(&cfg.n, "n", 1000, "conns to open")
	fs.IntVar(&cfg.k, "k", 100, "conns that go silent: stop answering pings and stop reading")
	return s.run(ctx, args, cfg.validate, stdout, stderr, func(ctx context.Context, im implSpec) (implResult, error) {
		return runDeadpeer(ctx, cfg, im, stderr)
	})
}

func (cfg *deadpeerConfig) validate() error {
	var errs []error
	if cfg.n <= 0 || cfg.k <= 0 || cfg.k > cfg.n {
		errs = append(errs, fmt.Errorf("need 0 < -k %d <= -n %d", cfg.k, cfg.n))
	}
	if cfg.interval <= 0 || cfg.timeout <= cfg.interval {
		errs = append(errs, fmt.Errorf("heartbeat %v/%v: need 0 < interval < timeout", cfg.interval, cfg.timeout))
	}
	if cfg.sources < 1 || cfg.sources > 253 || cfg.concurrency < 1 || cfg.setup <= 0 {
		errs = append(errs, errors.New("need -sources within 1..253, positive -concurrency and -setup"))
	}
	return errors.Join(errs...)
}

// DeadpeerResult is what one dead-peer run measured. A silent conn's
// detection time is the server's end of it (/events) minus the last ping
// the client answered: what the heartbeat timeout promises to bound.
type DeadpeerResult struct {
	Impl     string `json:"impl"`
	Conns    int    `json:"conns"`
	Silent   int    `json:"silent"`
	Interval string `json:"interval"`
	Timeout  string `json:"timeout"`

	Detected       int     `json:"detected"`        // silent conns the server ended by heartbeat
	EndedOtherwise int     `json:"ended_otherwise"` // silent conns the server ended for another reason
	Undetected     int     `json:"undetected"`      // silent conns still open when the wait ended
	WaitSecs       float64 `json:"wait_seconds"`    // from silencing to the last detection (or giving up)
	NoPingFirst    int     `json:"no_ping_before_silence"`

	MinMS float64 `json:"detection_min_ms"`
	P50MS float64 `json:"detection_p50_ms"`
	P99MS float64 `json:"detection_p99_ms"`
	MaxMS float64 `json:"detection_max_ms"`
	// The same over the timeout.
	MinRatio float64 `json:"detection_min_over_timeout"`
	P50Ratio float64 `json:"detection_p50_over_timeout"`
	P99Ratio float64 `json:"detection_p99_over_timeout"`
	MaxRatio float64 `json:"detection_max_over_timeout"`
	Early    int     `json:"detected_before_timeout"`
	Late     int     `json:"detected_after_timeout_plus_5pct"`
	// ServerP50MS/ServerMaxMS: the server's end minus the last pong the
	// server itself saw (last_pong_ns), over the conns where it knows it.
	ServerKnown  int     `json:"server_last_pong_known"`
	ServerP50MS  float64 `json:"server_detection_p50_ms"`
	ServerMaxMS  float64 `json:"server_detection_max_ms"`
	DetectionsMS []int64 `json:"detections_ms"` // every silent conn's, sorted; -1 for undetected

	// The healthy conns: none may end.
	OthersEndedServer int   `json:"others_ended_server"`
	OthersEndedClient int64 `json:"others_ended_client"`
	OpenAfter         int64 `json:"open_after"`
	HeartbeatTimeouts int64 `json:"heartbeat_timeouts"`
}

// runDeadpeer runs one dead-peer scenario against a child server running
// im. It returns within cfg.setup + 3 intervals + 3 timeouts + a minute
// and 6 s.
func runDeadpeer(ctx context.Context, cfg deadpeerConfig, im implSpec, progress io.Writer) (_ *DeadpeerResult, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	// A few timeouts, and then some: centrifuge waits up to 5 s for the
	// close handshake of a peer it has declared dead before it reports the
	// end, and a late detection is a result, not a reason to give up.
	waitMax := 3*cfg.timeout + cfg.interval + 6*time.Second
	ctx, cancel := context.WithTimeout(ctx, cfg.setup+2*cfg.interval+waitMax+time.Minute)
	defer cancel()
	setupCtx, setupCancel := context.WithTimeout(ctx, cfg.setup)
	defer setupCancel()

	child, sc, err := startImpl(setupCtx, serverSpec{impl: im.server, interval: cfg.interval, timeout: cfg.timeout, cmd: cfg.serverCmd}, progress)
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := child.stop(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	defer sc.close()

	srcs := newSources(cfg.sources)
	defer srcs.close()
	pool := newConnPool(srcs, im.client, "ws://"+child.addr+im.path)
	pool.handlers = func(int) connHandlers { return connHandlers{bare: true} }
	defer func() {
		if cerr := pool.close(time.Minute); err == nil && cerr != nil {
			err = cerr
		}
	}()
	fmt.Fprintf(progress, "tetherload: dialling %d conns to %s%s (%s)\n", cfg.n, child.addr, im.path, im.name)
	if err := pool.dialAll(setupCtx, cfg.n, cfg.concurrency); err != nil {
		return nil, err
	}
	if _, err := waitOpen(setupCtx, sc, int64(cfg.n), 20*time.Millisecond); err != nil {
		return nil, err
	}
	conns := pool.list()
	silent := make(map[string]loadConn, cfg.k)
	for j := range cfg.k {
		c := conns[j*len(conns)/cfg.k] // spread over the dial order, so over the source IPs
		if c.local() == "" {
			return nil, errors.New("a conn's local address is unknown")
		}
		silent[c.local()] = c
	}

	// Let every conn to be silenced answer a ping first, so that each
	// detection counts from a pong; a conn still without one counts from
	// its setup, its last frame.
	dialled := time.Now()
	for pinged := 0; pinged < len(silent) && time.Since(dialled) < 2*cfg.interval; {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(min(cfg.interval/10, 100*time.Millisecond)):
		}
		pinged = 0
		for _, c := range silent {
			if c.lastPing().After(dialled) {
				pinged++
			}
		}
	}
	res := &DeadpeerResult{Impl: im.name, Conns: cfg.n, Silent: cfg.k, Interval: cfg.interval.String(), Timeout: cfg.timeout.String()}
	for _, c := range silent {
		if !c.lastPing().After(dialled) {
			res.NoPingFirst++
		}
		c.silence()
	}
	silencedAt := time.Now()
	fmt.Fprintf(progress, "tetherload: %d of %d conns silent; waiting for the server to find them (timeout %v)\n", cfg.k, cfg.n, cfg.timeout)

	// Poll /events until every silent conn has ended, within a few timeouts.
	poll := min(max(cfg.timeout/50, 10*time.Millisecond), 250*time.Millisecond)
	var ev *serverEvents
	for {
		if ev, err = sc.events(ctx); err != nil {
			return nil, err
		}
		ended := 0
		for _, e := range ev.Ends {
			if silent[e.Remote] != nil {
				ended++
			}
		}
		if ended >= len(silent) || time.Since(silencedAt) > waitMax {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(poll):
		}
	}
	res.WaitSecs = time.Since(silencedAt).Seconds()
	st, err := sc.get(ctx, "gc=0")
	if err != nil {
		return nil, err
	}
	res.OpenAfter, res.HeartbeatTimeouts = st.Open, st.HeartbeatTimeouts
	res.OthersEndedClient = pool.lost.Load()
	res.compute(ev, silent, cfg.timeout)
	return res, nil
}

func (r *DeadpeerResult) compute(ev *serverEvents, silent map[string]loadConn, timeout time.Duration) {
	var det, srv []time.Duration
	seen := map[string]bool{}
	for _, e := range ev.Ends {
		c := silent[e.Remote]
		if c == nil {
			r.OthersEndedServer++
			continue
		}
		if seen[e.Remote] {
			continue
		}
		seen[e.Remote] = true
		if !e.Heartbeat {
			r.EndedOtherwise++
			continue
		}
		r.Detected++
		d := time.Duration(e.AtNS - c.lastPing().UnixNano())
		det = append(det, d)
		r.DetectionsMS = append(r.DetectionsMS, d.Milliseconds())
		if d < timeout {
			r.Early++
		}
		if float64(d) > 1.05*float64(timeout) {
			r.Late++
		}
		if e.LastPongNS > 0 {
			srv = append(srv, time.Duration(e.AtNS-e.LastPongNS))
		}
	}
	r.Undetected = len(silent) - r.Detected - r.EndedOtherwise
	slices.Sort(r.DetectionsMS)
	for range r.Undetected {
		r.DetectionsMS = append(r.DetectionsMS, -1)
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	// JSON has no NaN: no detection leaves the figures 0.
	if len(det) > 0 {
		slices.Sort(det)
		r.MinMS, r.P50MS, r.P99MS, r.MaxMS = ms(det[0]), ms(quantileOf(det, 0.5)), ms(quantileOf(det, 0.99)), ms(det[len(det)-1])
	}
	t := ms(timeout)
	if len(det) > 0 {
		r.MinRatio, r.P50Ratio, r.P99Ratio, r.MaxRatio = r.MinMS/t, r.P50MS/t, r.P99MS/t, r.MaxMS/t
	}
	r.ServerKnown = len(srv)
	if len(srv) > 0 {
		slices.Sort(srv)
		r.ServerP50MS, r.ServerMaxMS = ms(quantileOf(srv, 0.5)), ms(srv[len(srv)-1])
	}
}

// quantileOf returns the q quantile of sorted (nearest rank).
func quantileOf(sorted []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func (r *DeadpeerResult) print(w io.Writer) error {
	fmt.Fprintf(w, "%d conns, %d silent, heartbeat %s/%s: %d detected by heartbeat, %d ended otherwise, %d undetected after %.1fs\n",
		r.Conns, r.Silent, r.Interval, r.Timeout, r.Detected, r.EndedOtherwise, r.Undetected, r.WaitSecs)
	fmt.Fprintf(w, "detection (server's end - last answered ping): min %.0fms p50 %.0fms p99 %.0fms max %.0fms = %.3f / %.3f / %.3f / %.3f x timeout; %d before the timeout, %d after timeout + 5%%\n",
		r.MinMS, r.P50MS, r.P99MS, r.MaxMS, r.MinRatio, r.P50Ratio, r.P99Ratio, r.MaxRatio, r.Early, r.Late)
	if r.ServerKnown > 0 {
		fmt.Fprintf(w, "server's view (end - last pong it saw), %d conns: p50 %.0fms max %.0fms\n", r.ServerKnown, r.ServerP50MS, r.ServerMaxMS)
	}
	if r.NoPingFirst > 0 {
		fmt.Fprintf(w, "%d silent conns had answered no ping yet: their detection counts from their setup\n", r.NoPingFirst)
	}
	_, err := fmt.Fprintf(w, "healthy conns: %d ended on the server, %d on the client; %d open after (want %d)\n",
		r.OthersEndedServer, r.OthersEndedClient, r.OpenAfter, r.Conns-r.Silent)
	return err
}

func (r *DeadpeerResult) figures() []figure {
	p50, mx := r.P50Ratio, r.MaxRatio
	if r.Detected == 0 {
		p50, mx = math.NaN(), math.NaN()
	}
	return []figure{
		{"detection p50 / timeout", p50, "lower, >= 1"},
		{"detection max / timeout", mx, "lower, >= 1"},
		{"detected before timeout", float64(r.Early), "lower"},
		{"late (> timeout+5%) or undetected", float64(r.Late + r.Undetected), "lower"},
	}
}
