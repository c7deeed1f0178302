package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"
)

// churnConfig is one churn run: conns opened at rate per second, each held
// for hold and closed, for duration, beside n0 steady conns.
type churnConfig struct {
	loadFlags
	rate           float64
	duration, hold time.Duration
	n0             int
	settle         time.Duration // after the last churned conn is closed
	sample         time.Duration
}

func churnMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg churnConfig
	s := newScenario("churn", implFlag{}, &cfg.loadFlags, loadDefaults{
		interval: 15 * time.Second, timeout: 30 * time.Second,
		concurrencyHelp: "dials in flight at once for the steady conns",
		setupHelp:       "time allowed to start the server and dial the steady conns",
	}, stderr)
	fs := s.fs
	fs.Float64Var(&cfg.rate, "rate", 100, "conns opened per second")
	fs.DurationVar(&cfg.duration, "duration", time.Minute, "how long to keep opening conns")
	fs.DurationVar(&cfg.hold, "hold", time.Second, "how long each churned conn lives before the client closes it (with a close handshake)")
	fs.IntVar(&cfg.n0, "n0", 0, "steady conns held throughout: the baseline")
	fs.DurationVar(&cfg.settle, "settle", 10*time.Second, "how long to wait, sampling, once every churned conn is closed")
	fs.DurationVar(&cfg.sample, "sample", time.Second, "/stats sampling period")
	return s.run(ctx, args, cfg.validate, stdout, stderr, func(ctx context.Context, im implSpec) (implResult, error) {
		return runChurn(ctx, cfg, im, stderr)
	})
}

func (cfg *churnConfig) validate() error {
	var errs []error
	if cfg.rate <= 0 || cfg.duration <= 0 || cfg.hold < 0 || cfg.n0 < 0 {
		errs = append(errs, fmt.Errorf("need -rate %v and -duration %v positive, -hold %v and -n0 %d not negative", cfg.rate, cfg.duration, cfg.hold, cfg.n0))
	}
	if cfg.settle < 0 || cfg.sample <= 0 || cfg.setup <= 0 {
		errs = append(errs, errors.New("need -settle not negative, -sample and -setup positive"))
	}
	if cfg.interval <= 0 || cfg.timeout <= cfg.interval {
		errs = append(errs, fmt.Errorf("heartbeat %v/%v: need 0 < interval < timeout", cfg.interval, cfg.timeout))
	}
	if cfg.sources < 1 || cfg.sources > 253 || cfg.concurrency < 1 {
		errs = append(errs, errors.New("need -sources within 1..253 and positive -concurrency"))
	}
	return errors.Join(errs...)
}

// ChurnResult is what one churn run measured: whether the server returns
// to its baseline once the churn is over.
type ChurnResult struct {
	Impl     string  `json:"impl"`
	Rate     float64 `json:"rate_per_second"`
	Duration string  `json:"duration"`
	Hold     string  `json:"hold"`
	Steady   int     `json:"steady_conns"`
	Settle   string  `json:"settle"`

	Empty    Stats   `json:"empty"`    // before any conn, after GC
	Baseline Stats   `json:"baseline"` // the steady conns open, after GC
	Samples  []Stats `json:"samples"`  // during the churn and the settle, without forced GC
	End      Stats   `json:"end"`      // after the settle, after GC
	Floor    Stats   `json:"end_scavenged"`

	Opened     int64 `json:"churned_opened"`
	DialFailed int64 `json:"churned_dial_failed"`
	Skipped    int64 `json:"churned_skipped"` // not started: too many dials in flight
	SteadyLost int64 `json:"steady_conns_ended"`
	ChurnLost  int64 `json:"churned_ended_early"` // churned conns the server ended before their hold was over

	PeakOpen       int64   `json:"peak_open"`
	PeakGoroutines int     `json:"peak_goroutines"`
	PeakRSS        uint64  `json:"peak_rss_bytes"`
	BackSecs       float64 `json:"open_back_to_baseline_seconds"` // from the last close to open == steady; -1: never

	ResidualRSS        int64 `json:"residual_rss_bytes"` // End - Baseline
	ResidualFloorRSS   int64 `json:"residual_scavenged_rss_bytes"`
	ResidualHeap       int64 `json:"residual_heap_inuse_bytes"`
	ResidualGoroutines int   `json:"residual_goroutines"`
	ResidualOpen       int64 `json:"residual_open_conns"`
	Accepted           int64 `json:"accepted_during_run"` // End.Accepted - Baseline.Accepted: want Opened
}

// runChurn runs one churn scenario against a child server running im. It
// returns within cfg.setup + cfg.duration + cfg.hold + cfg.settle + a
// minute.
func runChurn(ctx context.Context, cfg churnConfig, im implSpec, progress io.Writer) (_ *ChurnResult, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.setup+cfg.duration+cfg.hold+cfg.settle+time.Minute)
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
	res := &ChurnResult{Impl: im.name, Rate: cfg.rate, Duration: cfg.duration.String(), Hold: cfg.hold.String(),
		Steady: cfg.n0, Settle: cfg.settle.String()}
	if res.Empty, err = sc.get(setupCtx, "gc=1"); err != nil {
		return nil, err
	}

	srcs := newSources(cfg.sources)
	defer srcs.close()
	url := "ws://" + child.addr + im.path
	steady := newConnPool(srcs, im.client, url)
	defer func() {
		if cerr := steady.close(time.Minute); err == nil && cerr != nil {
			err = cerr
		}
	}()
	if cfg.n0 > 0 {
		fmt.Fprintf(progress, "tetherload: dialling %d steady conns to %s (%s)\n", cfg.n0, url, im.name)
		if err := steady.dialAll(setupCtx, cfg.n0, cfg.concurrency); err != nil {
			return nil, err
		}
		if _, err := waitOpen(setupCtx, sc, int64(cfg.n0), 20*time.Millisecond); err != nil {
			return nil, err
		}
	}
	if res.Baseline, err = sc.get(ctx, "gc=1"); err != nil {
		return nil, err
	}

	// Sample all along, without forced GCs.
	sampleCtx, stopSampling := context.WithCancel(ctx)
	var samples []Stats
	var sampling sync.WaitGroup
	sampling.Go(func() {
		for {
			select {
			case <-sampleCtx.Done():
				return
			case <-time.After(cfg.sample):
			}
			if st, err := sc.get(sampleCtx, "gc=0"); err == nil {
				samples = append(samples, st)
			}
		}
	})
	defer func() {
		stopSampling()
		sampling.Wait()
	}()

	fmt.Fprintf(progress, "tetherload: churning %g conns/s, each held %v, for %v\n", cfg.rate, cfg.hold, cfg.duration)
	var (
		churners            sync.WaitGroup
		inFlight            atomic.Int64
		opened, failed      atomic.Int64
		skipped, endedEarly atomic.Int64
	)
	// Each churned conn is dialled, held and closed by a goroutine of its
	// own, started on a fixed schedule, so that a slow server does not slow
	// the rate down; past maxInFlight, ticks are skipped and counted.
	maxInFlight := int64(cfg.rate*(cfg.hold.Seconds()+10)) + 64
	start := time.Now()
	period := time.Duration(float64(time.Second) / cfg.rate)
	for i := 0; ; i++ {
		at := start.Add(time.Duration(i) * period)
		if at.Sub(start) >= cfg.duration {
			break
		}
		select {
		case <-ctx.Done():
			churners.Wait()
			return nil, ctx.Err()
		case <-time.After(time.Until(at)):
		}
		if inFlight.Load() >= maxInFlight {
			skipped.Add(1)
			continue
		}
		inFlight.Add(1)
		churners.Go(func() {
			defer inFlight.Add(-1)
			var early atomic.Bool
			h := connHandlers{ended: func() { early.Store(true) }}
			dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			c, err := im.client.dial(dctx, srcs.pick(i), url, h)
			cancel()
			if err != nil {
				failed.Add(1)
				return
			}
			opened.Add(1)
			select {
			case <-time.After(cfg.hold):
			case <-ctx.Done():
			}
			if early.Load() {
				endedEarly.Add(1)
			}
			c.close(true)
		})
	}
	churners.Wait()
	closedAt := time.Now()
	fmt.Fprintf(progress, "tetherload: churn over (%d opened, %d failed, %d skipped); settling for %v\n",
		opened.Load(), failed.Load(), skipped.Load(), cfg.settle)
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(cfg.settle):
	}
	stopSampling()
	sampling.Wait()
	res.Samples = samples
	if res.End, err = sc.get(ctx, "gc=1"); err != nil {
		return nil, err
	}
	if res.Floor, err = sc.get(ctx, "free=1"); err != nil {
		return nil, err
	}
	res.Opened, res.DialFailed, res.Skipped = opened.Load(), failed.Load(), skipped.Load()
	res.ChurnLost = endedEarly.Load()
	res.SteadyLost = steady.lost.Load()
	res.compute(closedAt)
	return res, nil
}

func (r *ChurnResult) compute(closedAt time.Time) {
	b, e := r.Baseline, r.End
	r.ResidualRSS = int64(e.RSS) - int64(b.RSS)
	r.ResidualFloorRSS = int64(r.Floor.RSS) - int64(b.RSS)
	r.ResidualHeap = int64(e.HeapInuse) - int64(b.HeapInuse)
	r.ResidualGoroutines = e.Goroutines - b.Goroutines
	r.ResidualOpen = e.Open - b.Open
	r.Accepted = e.Accepted - b.Accepted
	r.BackSecs = -1
	for _, s := range append(r.Samples, e) {
		r.PeakOpen = max(r.PeakOpen, s.Open)
		r.PeakGoroutines = max(r.PeakGoroutines, s.Goroutines)
		r.PeakRSS = max(r.PeakRSS, s.RSS)
		if r.BackSecs < 0 && !s.Time.Before(closedAt) && s.Open == b.Open {
			r.BackSecs = max(s.Time.Sub(closedAt).Seconds(), 0)
		}
	}
}

func (r *ChurnResult) print(w io.Writer) error {
	fmt.Fprintf(w, "churn %g conns/s held %s for %s beside %d steady conns, settle %s: %d opened, %d dials failed, %d skipped\n\n",
		r.Rate, r.Hold, r.Duration, r.Steady, r.Settle, r.Opened, r.DialFailed, r.Skipped)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "server\tRSS MiB\theap MiB\tgoroutines\topen conns\taccepted\t")
	mib := func(v uint64) float64 { return float64(v) / (1 << 20) }
	for _, row := range []struct {
		name string
		s    Stats
	}{{"empty", r.Empty}, {"baseline", r.Baseline}, {"end", r.End}, {"end, FreeOSMemory", r.Floor}} {
		fmt.Fprintf(tw, "%s\t%.2f\t%.2f\t%d\t%d\t%d\t\n", row.name, mib(row.s.RSS), mib(row.s.HeapInuse), row.s.Goroutines, row.s.Open, row.s.Accepted)
	}
	fmt.Fprintf(tw, "peak in the churn\t%.2f\t\t%d\t%d\t\t\n", mib(r.PeakRSS), r.PeakGoroutines, r.PeakOpen)
	if err := tw.Flush(); err != nil {
		return err
	}
	kib := func(v int64) float64 { return float64(v) / (1 << 10) }
	fmt.Fprintf(w, "\nresidual (end - baseline): RSS %+.0f KiB (%+.0f KiB after FreeOSMemory), heap %+.0f KiB, goroutines %+d, open conns %+d; %d accepted during the run for %d opened\n",
		kib(r.ResidualRSS), kib(r.ResidualFloorRSS), kib(r.ResidualHeap), r.ResidualGoroutines, r.ResidualOpen, r.Accepted, r.Opened)
	back := "never within the settle"
	if r.BackSecs >= 0 {
		back = fmt.Sprintf("%.1fs after the last close (sampling every period)", r.BackSecs)
	}
	_, err := fmt.Fprintf(w, "open conns back to baseline: %s; %d steady conns ended, %d churned conns ended before their close\n",
		back, r.SteadyLost, r.ChurnLost)
	return err
}

func (r *ChurnResult) figures() []figure {
	return []figure{
		{"residual RSS KiB", float64(r.ResidualRSS) / (1 << 10), "lower"},
		{"residual RSS KiB, floor", float64(r.ResidualFloorRSS) / (1 << 10), "lower"},
		{"residual heap KiB", float64(r.ResidualHeap) / (1 << 10), "lower"},
		{"residual goroutines", float64(r.ResidualGoroutines), "lower"},
		{"residual open conns", float64(r.ResidualOpen), "lower"},
	}
}
