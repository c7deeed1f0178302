package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"text/tabwriter"
)

// implSpec is one server impl a scenario can run against, with its client.
type implSpec struct {
	name   string // as -impl takes it
	server string // the server's -impl
	path   string // the endpoint the clients dial
	desc   string
	client adapter
}

// allImpls is what -impl all runs, tether first: the ratios are
// tether/alternative.
var allImpls = []string{"tether", "centrifuge", "melody", "gorilla", "naive"}

func lookupImpl(name string) (implSpec, bool) {
	switch name {
	case "tether":
		return implSpec{name, "tether", "/sub", "tether.Hub; protocol v1 clients subscribed to bench (sub, then the ack)", newTetherAdapter()}, true
	case "tether-conn":
		return implSpec{name, "tether", "/ws", "tether.Accept conns on the bare /ws endpoint, plain clients (idle only)", &wsAdapter{}}, true
	case "tether-raw":
		return implSpec{name, "tether-raw", "/sub", "tether.Hub (the tether impl's options); plain clients, subscribed to bench by the server on connect (broadcast only)", &wsAdapter{}}, true
	case "centrifuge":
		return implSpec{name, "centrifuge", "/sub", "centrifugal/centrifuge; centrifuge-go JSON clients subscribed to bench", newCentrifugeAdapter()}, true
	case "melody":
		return implSpec{name, "melody", "/sub", "olahol/melody; plain clients (connecting is subscribing)", &wsAdapter{}}, true
	case "gorilla":
		return implSpec{name, "gorilla", "/sub", "gorilla/websocket chat-hub pattern; plain clients", &wsAdapter{}}, true
	case "naive":
		return implSpec{name, "naive", "/sub", "coder/websocket with a ticker per conn; plain clients", &wsAdapter{}}, true
	}
	return implSpec{}, false
}

// implFlag is the -impl flag of every scenario: one name, a comma list,
// "all" or "list".
type implFlag struct {
	value     string
	allowConn bool // tether-conn is valid (idle)
	allowRaw  bool // tether-raw is valid (broadcast); not in all
}

// extra is the impls the scenario takes besides allImpls.
func (f *implFlag) extra() []string {
	var names []string
	if f.allowConn {
		names = append(names, "tether-conn")
	}
	if f.allowRaw {
		names = append(names, "tether-raw")
	}
	return names
}

func (f *implFlag) register(fs *flag.FlagSet) {
	f.value = "tether"
	names := strings.Join(append(allImpls[:len(allImpls):len(allImpls)], f.extra()...), ", ")
	fs.StringVar(&f.value, "impl", f.value, "server impl(s) to run against, one after another: a name ("+names+
		"), a comma list, all (= "+strings.Join(allImpls, ",")+") or list (print them)")
}

// parse returns the impls, or nil after printing them for -impl list.
func (f *implFlag) parse(stdout io.Writer) ([]implSpec, error) {
	if f.value == "list" {
		names := append(allImpls[:len(allImpls):len(allImpls)], f.extra()...)
		for _, n := range names {
			im, _ := lookupImpl(n)
			fmt.Fprintf(stdout, "%-12s %s\n", n, im.desc)
		}
		return nil, nil
	}
	names := strings.Split(f.value, ",")
	if f.value == "all" {
		names = allImpls
	}
	var specs []implSpec
	seen := map[string]bool{}
	for _, n := range names {
		n = strings.TrimSpace(n)
		im, ok := lookupImpl(n)
		if !ok || (n == "tether-conn" && !f.allowConn) || (n == "tether-raw" && !f.allowRaw) {
			return nil, fmt.Errorf("-impl: unknown impl %q (try -impl list)", n)
		}
		if !seen[n] {
			seen[n] = true
			specs = append(specs, im)
		}
	}
	return specs, nil
}

// figure is one headline figure of a run, compared across impls.
type figure struct {
	name   string
	value  float64 // NaN: not measured
	better string  // "lower" or "higher"
}

// implResult is what a scenario's run against one impl returns.
type implResult interface {
	print(w io.Writer) error
	figures() []figure
}

// ImplRun is one impl's run in the JSON output.
type ImplRun struct {
	Impl   string `json:"impl"`
	Result any    `json:"result,omitempty"`
	Error  string `json:"error,omitempty"`
}

// RatioRow is one headline figure across the impls: its values, and
// tether's value divided by each alternative's (null where either is not
// measured or the alternative's is 0).
type RatioRow struct {
	Figure string              `json:"figure"`
	Better string              `json:"better"`
	Values map[string]*float64 `json:"values"`
	Ratios map[string]*float64 `json:"tether_over"`
}

// MultiResult is the JSON output of every scenario.
type MultiResult struct {
	Scenario string     `json:"scenario"`
	Runs     []ImplRun  `json:"runs"`
	Ratios   []RatioRow `json:"ratios,omitempty"`
}

// runImpls runs a scenario against each impl in turn, each against a
// fresh server, printing each result as it comes (or all of it as JSON at
// the end), then the ratio table. A failed run does not stop the others;
// the first error is returned at the end.
func runImpls(ctx context.Context, scenario string, specs []implSpec, jsonOut bool, stdout, stderr io.Writer,
	run func(ctx context.Context, im implSpec) (implResult, error)) error {
	out := MultiResult{Scenario: scenario}
	var results []implResult
	var names []string
	var firstErr error
	for _, im := range specs {
		if ctx.Err() != nil {
			break
		}
		fmt.Fprintf(stderr, "tetherload %s: impl %s\n", scenario, im.name)
		res, err := run(ctx, im)
		if err != nil {
			err = fmt.Errorf("impl %s: %w", im.name, err)
			firstErr = cmpOrErr(firstErr, err)
			out.Runs = append(out.Runs, ImplRun{Impl: im.name, Error: err.Error()})
			if !jsonOut {
				fmt.Fprintf(stdout, "== %s: FAILED: %v\n\n", im.name, err)
			}
			continue
		}
		out.Runs = append(out.Runs, ImplRun{Impl: im.name, Result: res})
		results = append(results, res)
		names = append(names, im.name)
		if !jsonOut {
			fmt.Fprintf(stdout, "== %s\n", im.name)
			if err := res.print(stdout); err != nil {
				return err
			}
			fmt.Fprintln(stdout)
		}
	}
	out.Ratios = ratioRows(names, results)
	if jsonOut {
		if err := writeJSON(stdout, out); err != nil {
			return err
		}
	} else if len(out.Ratios) > 0 {
		if err := printRatios(stdout, names, out.Ratios); err != nil {
			return err
		}
	}
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return firstErr
}

func cmpOrErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// isTether reports whether the impl named n is one of tether's: the
// reference of the ratios.
func isTether(n string) bool { return n == "tether" || n == "tether-conn" || n == "tether-raw" }

// ratioRows compares tether (tether, tether-conn or tether-raw, whichever
// ran first) with every other impl that ran; nil if there is nothing to
// compare.
func ratioRows(names []string, results []implResult) []RatioRow {
	ref := -1
	for i, n := range names {
		if isTether(n) {
			ref = i
			break
		}
	}
	if ref < 0 || len(names) < 2 {
		return nil
	}
	refFigs := results[ref].figures()
	rows := make([]RatioRow, len(refFigs))
	for j, f := range refFigs {
		rows[j] = RatioRow{Figure: f.name, Better: f.better, Values: map[string]*float64{}, Ratios: map[string]*float64{}}
	}
	for i, n := range names {
		figs := results[i].figures()
		for j := range rows {
			if j >= len(figs) {
				continue
			}
			v := figs[j].value
			rows[j].Values[n] = finite(v)
			if i == ref {
				continue
			}
			if v != 0 {
				rows[j].Ratios[n] = finite(refFigs[j].value / v)
			} else {
				rows[j].Ratios[n] = nil
			}
		}
	}
	return rows
}

func finite(v float64) *float64 {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return nil
	}
	return &v
}

func printRatios(w io.Writer, names []string, rows []RatioRow) error {
	ref := ""
	for _, n := range names {
		if isTether(n) {
			ref = n
			break
		}
	}
	fmt.Fprintf(w, "%s / alternative (below 1 is better for tether where lower is better, above 1 where higher is)\n", ref)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "figure\tbetter\t%s\t", ref)
	for _, n := range names {
		if n != ref {
			fmt.Fprintf(tw, "%s\tratio\t", n)
		}
	}
	fmt.Fprintln(tw)
	num := func(p *float64) string {
		if p == nil {
			return "n/a"
		}
		return fmtNum(*p)
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t", r.Figure, r.Better, num(r.Values[ref]))
		for _, n := range names {
			if n != ref {
				fmt.Fprintf(tw, "%s\t%s\t", num(r.Values[n]), num(r.Ratios[n]))
			}
		}
		fmt.Fprintln(tw)
	}
	return tw.Flush()
}

// fmtNum prints a figure with 4 significant digits, without exponents.
func fmtNum(v float64) string {
	if math.Abs(v) >= 1000 {
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'g', 4, 64)
}
