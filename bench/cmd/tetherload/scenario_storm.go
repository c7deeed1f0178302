package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"
)

// stormConfig is one reconnect-storm run: n reconnecting clients, then the
// server crashes and comes back on the same port.
type stormConfig struct {
	loadFlags
	n      int
	down   time.Duration // between the kill and the restart
	wait   time.Duration // for every client to be back after the restart
	window time.Duration // of the peak accept rate
	// admission: the server's WithAdmission(admission, admission),
	// handshakes per second (tether only); 0: none.
	admission float64
}

func stormMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg stormConfig
	s := newScenario("storm", implFlag{}, &cfg.loadFlags, loadDefaults{
		interval: 15 * time.Second, timeout: 30 * time.Second,
		concurrencyHelp: "clients dialling at once before the crash",
		setupHelp:       "time allowed to start the server and connect every client",
	}, stderr)
	fs := s.fs
	fs.IntVar(&cfg.n, "n", 1000, "reconnecting clients")
	fs.DurationVar(&cfg.down, "down", 0, "how long the server stays down between the SIGKILL and the restart (clients retry meanwhile)")
	fs.DurationVar(&cfg.wait, "wait", 2*time.Minute, "time allowed for every client to be back after the restart")
	fs.DurationVar(&cfg.window, "window", 100*time.Millisecond, "window of the peak connect rate")
	fs.Float64Var(&cfg.admission, "admission", 0, "tether only: the server admits R handshakes per second in bursts of R (serve -admission R: WithAdmission; refused ones get 503 and a Retry-After, which tether.Client honours); 0: no admission control")
	return s.run(ctx, args, cfg.validate, stdout, stderr, func(ctx context.Context, im implSpec) (implResult, error) {
		return runStorm(ctx, cfg, im, stderr)
	})
}

func (cfg *stormConfig) validate() error {
	var errs []error
	if cfg.n <= 0 {
		errs = append(errs, fmt.Errorf("-n %d must be positive", cfg.n))
	}
	if cfg.interval <= 0 || cfg.timeout <= cfg.interval {
		errs = append(errs, fmt.Errorf("heartbeat %v/%v: need 0 < interval < timeout", cfg.interval, cfg.timeout))
	}
	if cfg.sources < 1 || cfg.sources > 253 || cfg.concurrency < 1 || cfg.setup <= 0 || cfg.wait <= 0 || cfg.window <= 0 || cfg.down < 0 || cfg.admission < 0 {
		errs = append(errs, errors.New("need -sources within 1..253, -down and -admission not negative, and positive -concurrency, -setup, -wait and -window"))
	}
	return errors.Join(errs...)
}

// StormResult is what one storm run measured. The clients are what a user
// of each impl would reconnect with: tether.Dial (default Backoff: full
// jitter over 500 ms x 2^attempt), centrifuge-go's own reconnect (jittered
// backoff from 200 ms), and for gorilla, melody and naive the common
// hand-written loop that redials after a fixed 1 s, with no jitter.
type StormResult struct {
	Impl    string `json:"impl"`
	Clients int    `json:"clients"`
	Client  string `json:"client"`
	Window  string `json:"window"`

	Down        string  `json:"down"`                 // -down
	StartSecs   float64 `json:"server_start_seconds"` // SIGKILL to the new server listening, -down included
	AllBackSecs float64 `json:"all_back_seconds"`     // the new server listening to its last accept with all clients open
	AllBack     bool    `json:"all_back"`
	Open        int64   `json:"open_at_end"`
	Accepts     int     `json:"accepts"` // by the new server, until all were back
	Peak        int     `json:"peak_accepts_per_window"`
	Mean        float64 `json:"mean_accepts_per_window"` // over listening .. all back
	DialsAfter  int64   `json:"client_dials"`            // TCP dials of the clients from the crash until all were back (or the wait ended)
	// PeakPerSec is the most accepts in any 1 s, like Peak.
	PeakPerSec int `json:"peak_accepts_per_second"`
	// Admission is the server's -admission (0: none); Refused, the
	// handshakes the restarted server refused with 503 until all were
	// back (hub.Stats().Refused; tether only).
	Admission float64 `json:"admission_per_second,omitempty"`
	Refused   uint64  `json:"refused"`
	// GaveUp is the clients that had closed by themselves by the end of
	// the wait (tether.Client's Done: its Backoff gave up, or it met a
	// terminal error); the other impls' clients retry for ever: 0.
	GaveUp int `json:"clients_gave_up"`
}

// runStorm runs one storm scenario against a child server running im. It
// returns within cfg.setup + cfg.down + cfg.wait + a minute.
func runStorm(ctx context.Context, cfg stormConfig, im implSpec, progress io.Writer) (_ *StormResult, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if im.name == "tether-conn" {
		return nil, errors.New("storm needs a reconnecting client: not with tether-conn")
	}
	if cfg.admission > 0 && im.server != "tether" {
		return nil, fmt.Errorf("-admission is for tether only, not %s", im.name)
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.setup+cfg.down+cfg.wait+time.Minute)
	defer cancel()
	setupCtx, setupCancel := context.WithTimeout(ctx, cfg.setup)
	defer setupCancel()

	// A fixed port, so that the restarted server is where the clients
	// look for it.
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	spec := serverSpec{impl: im.server, addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		interval: cfg.interval, timeout: cfg.timeout, cmd: cfg.serverCmd, admission: cfg.admission}
	first, sc, err := startImpl(setupCtx, spec, progress)
	if err != nil {
		return nil, err
	}
	defer first.stop()
	defer sc.close()

	srcs := newSources(cfg.sources)
	defer srcs.close()
	url := "ws://" + spec.addr + im.path
	var (
		mu      sync.Mutex
		clients []reconnecting
		stopped sync.Once
	)
	// The clients stop before the server does, or they would see it go and
	// start reconnecting.
	stopClients := func() { stopped.Do(func() { stopAll(clients) }) }
	defer stopClients()
	fmt.Fprintf(progress, "tetherload: connecting %d reconnecting clients to %s (%s)\n", cfg.n, url, im.name)
	if err := forEach(setupCtx, cfg.n, cfg.concurrency, func(ctx context.Context, i int) error {
		c, err := im.client.dialReconnecting(ctx, srcs.pick(i), url)
		if err != nil {
			return fmt.Errorf("client %d: %w", i, err)
		}
		mu.Lock()
		clients = append(clients, c)
		mu.Unlock()
		return nil
	}); err != nil {
		return nil, err
	}
	if _, err := waitOpen(setupCtx, sc, int64(cfg.n), 20*time.Millisecond); err != nil {
		return nil, err
	}

	fmt.Fprintf(progress, "tetherload: %d clients connected; killing the server\n", cfg.n)
	dialsBefore := srcs.dials.Load()
	killed := time.Now()
	first.kill()
	if cfg.down > 0 {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(cfg.down):
		}
	}
	second, sc2, err := startImpl(ctx, spec, progress)
	if err != nil {
		return nil, fmt.Errorf("restart: %w", err)
	}
	listening := time.Now()
	defer func() {
		stopClients()
		if cerr := second.stop(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	defer sc2.close()
	res := &StormResult{Impl: im.name, Clients: cfg.n, Window: cfg.window.String(), Down: cfg.down.String(), StartSecs: listening.Sub(killed).Seconds(),
		Admission: cfg.admission}
	switch im.server {
	case "tether":
		res.Client = "tether.Dial, default Backoff"
	case "centrifuge":
		res.Client = "centrifuge-go's reconnect"
	default:
		res.Client = "redial after a fixed 1 s"
	}

	waitCtx, waitCancel := context.WithTimeout(ctx, cfg.wait)
	defer waitCancel()
	st, werr := waitOpen(waitCtx, sc2, int64(cfg.n), 25*time.Millisecond)
	dials := srcs.dials.Load() - dialsBefore
	if werr != nil && ctx.Err() != nil {
		return nil, werr
	}
	mu.Lock()
	for _, c := range clients {
		if g, ok := c.(interface{ gaveUp() bool }); ok && g.gaveUp() {
			res.GaveUp++
		}
	}
	mu.Unlock()
	ev, err := sc2.events(ctx)
	if err != nil {
		return nil, err
	}
	res.AllBack = werr == nil
	res.Open = st.Open
	res.DialsAfter = dials
	// All back at the last accept before the /stats sample that saw them
	// all. An accept is stamped as the server logs it, which may come a
	// little after the sample counted its conn as open: the conns the
	// sample saw are accepted, whatever their stamps say.
	accepts := slices.Clone(ev.Accepts)
	slices.Sort(accepts)
	if res.AllBack {
		n := 0
		for n < len(accepts) && accepts[n] <= st.Time.UnixNano() {
			n++
		}
		accepts = accepts[:min(len(accepts), max(n, int(st.Open)))]
	}
	res.Accepts = len(accepts)
	end := time.Now()
	if res.AllBack && len(accepts) > 0 {
		end = time.Unix(0, accepts[len(accepts)-1])
	}
	res.AllBackSecs = max(end.Sub(listening).Seconds(), 0)
	res.Peak = peakIn(accepts, cfg.window)
	res.PeakPerSec = peakIn(accepts, time.Second)
	res.Refused = st.HubRefused
	if span := end.Sub(listening); span > 0 {
		res.Mean = float64(len(accepts)) / (float64(span) / float64(cfg.window))
	}
	if !res.AllBack {
		fmt.Fprintf(progress, "tetherload: only %d of %d clients back after %v\n", st.Open, cfg.n, cfg.wait)
	}
	return res, nil
}

// peakIn returns the most times in any window-long span of sorted.
func peakIn(sorted []int64, window time.Duration) int {
	peak, j := 0, 0
	for i := range sorted {
		for sorted[i]-sorted[j] >= int64(window) {
			j++
		}
		peak = max(peak, i-j+1)
	}
	return peak
}

// stopAll stops clients, 32 at a time.
func stopAll(clients []reconnecting) {
	work := make(chan reconnecting)
	var wg sync.WaitGroup
	for range min(32, len(clients)) {
		wg.Go(func() {
			for c := range work {
				c.stop()
			}
		})
	}
	for _, c := range clients {
		work <- c
	}
	close(work)
	wg.Wait()
}

// forEach calls f for 0 .. n-1, concurrency at a time, and stops at the
// first error.
func forEach(ctx context.Context, n, concurrency int, f func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(concurrency, n) {
		wg.Go(func() {
			for i := range next {
				if err := f(ctx, i); err != nil {
					cancel(err)
				}
			}
		})
	}
feed:
	for i := range n {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	return context.Cause(ctx)
}

func (r *StormResult) print(w io.Writer) error {
	back := fmt.Sprintf("all %d back %.3fs after the restart", r.Clients, r.AllBackSecs)
	if !r.AllBack {
		back = fmt.Sprintf("only %d of %d back after %.3fs", r.Open, r.Clients, r.AllBackSecs)
	}
	_, err := fmt.Fprintf(w, "%d clients (%s), server SIGKILLed and restarted (listening %.3fs after the kill): %s\n"+
		"%d accepts, peak %d per %s (%d per 1s), mean %.1f per %s; %d client TCP dials (%.2f per client)\n",
		r.Clients, r.Client, r.StartSecs, back, r.Accepts, r.Peak, r.Window, r.PeakPerSec, r.Mean, r.Window,
		r.DialsAfter, float64(r.DialsAfter)/float64(r.Clients))
	if err != nil {
		return err
	}
	admission := "no admission control"
	if r.Admission > 0 {
		admission = fmt.Sprintf("admission %g/s", r.Admission)
	}
	_, err = fmt.Fprintf(w, "%s: %d handshakes refused by the restarted server; %d clients gave up\n", admission, r.Refused, r.GaveUp)
	return err
}

func (r *StormResult) figures() []figure {
	all := r.AllBackSecs
	if !r.AllBack {
		all = math.NaN()
	}
	return []figure{
		{"seconds until all back", all, "lower"},
		{"peak accepts per " + r.Window, float64(r.Peak), "lower"},
		{"peak accepts per 1s", float64(r.PeakPerSec), "lower"},
		{"mean accepts per " + r.Window, r.Mean, "higher"},
		{"client dials per client", float64(r.DialsAfter) / float64(r.Clients), "lower"},
	}
}
