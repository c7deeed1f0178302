package main

import (
	"context"
	"flag"
	"io"
	"time"
)

// loadFlags is the configuration every scenario shares, embedded in each
// scenario's config: the server's heartbeat, how the conns are dialled,
// the output and the server's command line.
type loadFlags struct {
	interval, timeout time.Duration // the server's heartbeat
	sources           int           // source IPs 127.0.0.2 .. 127.0.0.(1+sources)
	concurrency       int           // dials in flight
	setup             time.Duration // budget to start the server and dial (and settle, subscribe...)
	jsonOut           bool

	// serverCmd is the server's command line, "serve" included; by default
	// this very executable with "serve".
	serverCmd []string
}

// loadDefaults is what differs between the scenarios in the shared flags.
type loadDefaults struct {
	interval, timeout time.Duration
	timeoutNote       string // appended to -timeout's help, if any
	concurrencyHelp   string // -concurrency's help; "" for "dials in flight at once"
	setupHelp         string // -setup's help
}

// register adds -interval, -timeout, -sources, -concurrency, -setup and
// -json to fs, with the scenario's defaults d.
func (lf *loadFlags) register(fs *flag.FlagSet, d loadDefaults) {
	timeoutHelp := "server heartbeat timeout"
	if d.timeoutNote != "" {
		timeoutHelp += ": " + d.timeoutNote
	}
	concurrencyHelp := d.concurrencyHelp
	if concurrencyHelp == "" {
		concurrencyHelp = "dials in flight at once"
	}
	fs.DurationVar(&lf.interval, "interval", d.interval, "server heartbeat interval")
	fs.DurationVar(&lf.timeout, "timeout", d.timeout, timeoutHelp)
	fs.IntVar(&lf.sources, "sources", 49, "source IPs to spread conns over: 127.0.0.2 .. 127.0.0.(1+sources)")
	fs.IntVar(&lf.concurrency, "concurrency", 64, concurrencyHelp)
	fs.DurationVar(&lf.setup, "setup", 3*time.Minute, d.setupHelp)
	fs.BoolVar(&lf.jsonOut, "json", false, "print the results as JSON")
}

// scenario is one scenario's command line: -impl, the shared loadFlags and
// the flags the scenario adds to fs itself.
type scenario struct {
	name  string
	fs    *flag.FlagSet
	impls implFlag
	load  *loadFlags
	specs []implSpec // the impls of -impl, once run has parsed it
}

// newScenario returns the command line of scenario name with -impl (impls)
// and lf's flags registered, for the scenario to add its own to s.fs.
func newScenario(name string, impls implFlag, lf *loadFlags, d loadDefaults, stderr io.Writer) *scenario {
	s := &scenario{name: name, fs: flag.NewFlagSet("tetherload "+name, flag.ContinueOnError), impls: impls, load: lf}
	s.fs.SetOutput(stderr)
	s.impls.register(s.fs)
	lf.register(s.fs, d)
	return s
}

// run parses args, resolves -impl (printing the impls for -impl list),
// checks the config with validate and runs the scenario against each impl
// in turn with runImpls.
func (s *scenario) run(ctx context.Context, args []string, validate func() error, stdout, stderr io.Writer,
	run func(ctx context.Context, im implSpec) (implResult, error)) error {
	if err := parseFlags(s.fs, args); err != nil {
		return err
	}
	specs, err := s.impls.parse(stdout)
	if err != nil || specs == nil {
		return err
	}
	if err := validate(); err != nil {
		return err
	}
	s.specs = specs
	return runImpls(ctx, s.name, specs, s.load.jsonOut, stdout, stderr, run)
}
