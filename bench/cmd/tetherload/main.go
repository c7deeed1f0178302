// Command tetherload measures what tether costs a server, side by side
// with the libraries a Go user would pick instead.
//
//	tetherload serve -impl tether|tether-raw|centrifuge|melody|gorilla|naive [-addr 127.0.0.1:0] [-interval 15s -timeout 30s] [-queue 256] [-pprof]
//	                 [-overload [-breaker 20ms]] [-admission 0]
//	tetherload idle -impl all -n 10000 -interval 15s -timeout 30s -hold 30s [-json]
//	tetherload broadcast -impl all -n 1000 -m 1000 -size 64 [-rate 0] [-queue 256] [-pin 0,1] [-json]
//	tetherload deadpeer -impl all -n 1000 -k 100 -interval 5s -timeout 10s [-json]
//	tetherload churn -impl all -rate 100 -duration 60s -hold 1s [-n0 0] [-settle 10s] [-json]
//	tetherload storm -impl all -n 1000 [-wait 2m] [-admission 0] [-json]
//	tetherload room -n 19000 [-peers v1,raw,v1-nopresence] [-runs 3] [-pin 0,1] [-hold 0] [-json]
//	tetherload overload -n 5000 -duration 20s -lorate 20000 -hirate 20 [-breaker 20ms] [-pin 0,1] [-json]
//
// serve runs the measured server (one impl per process): its /sub
// endpoint, /publish, /stats (memory, goroutines, CPU time and conn counts
// as JSON) and /events (every accept and every end). It prints its
// listening address as its first line of standard output. With -impl
// tether, -overload makes topic hi high priority and lo low priority
// (WithTopicPolicy) and adds WithBreaker(-breaker), and -admission R adds
// WithAdmission(R, R); /stats then also reports the hub's drops, dead
// peers, refusals, shed deliveries and the breaker's state, openings and
// open time.
//
// Every other subcommand is a scenario. It starts serve as a child process
// for each impl of -impl (a name, a comma list, "all" or "list"), one
// after another, opens its conns from the source IPs 127.0.0.2 ..
// 127.0.0.50 with the client a user of that impl would use, prints each
// impl's result and then a table of ratios tether/alternative for the
// scenario's headline figures (with -json, all of it as one JSON
// document). It always exits by itself, closing its conns and killing its
// child.
//
//   - idle: n conns that do nothing but answer the server's heartbeat
//     pings, held: RSS, heap and goroutines per conn, server CPU.
//     -impl tether-conn measures bare tether conns (/ws, no hub).
//   - broadcast: n subscribers, m messages published by the server:
//     deliveries per second, latency, and healthy conns dropped.
//     -impl tether-raw (not in all) runs the tether hub with plain
//     WebSocket clients that the server subscribes as they connect.
//   - deadpeer: k of n conns go silent: how long after its last pong the
//     server declares each dead, against the timeout.
//   - churn: conns opened and closed at a fixed rate: whether memory,
//     goroutines and open conns return to the baseline.
//   - storm: n reconnecting clients, the server SIGKILLed and restarted on
//     the same port: time until all are back and the peak accept rate.
//     -admission R (tether only) paces the server's handshakes: the
//     refusals and whether any client gave up.
//   - room (tether only): n conns, each with a user ID of its own, join
//     one topic of a hub with every option at its default (presence on,
//     serve -room), as v1 peers, raw peers or v1 peers with presence off:
//     the time to join them all, the conns lost, and the presence the v1
//     peers were sent.
//   - overload (tether only): n protocol v1 conns subscribed to hi and lo
//     of a serve -overload hub; the server floods lo (-lorate, more than
//     it can write) while hi gets -hirate timed publications: healthy
//     conns dropped, hi deliveries and their latency, lo shed by the
//     breaker and dropped by the queues, the breaker's openings and open
//     time, new handshakes refused meanwhile, server CPU. -breaker 0 runs
//     it without the breaker, for comparison.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `usage:
  tetherload serve [flags]   run the measured server (see tetherload serve -h)
  tetherload idle [flags]    measure idle conns against a child server (see tetherload idle -h)
  tetherload broadcast [flags]
                             measure fan-out to subscribers of a child server (see tetherload broadcast -h)
  tetherload deadpeer [flags]
                             measure how fast silent peers are declared dead (see tetherload deadpeer -h)
  tetherload churn [flags]   open and close conns at a fixed rate: does the server return to its baseline? (see tetherload churn -h)
  tetherload storm [flags]   crash and restart the server under reconnecting clients (see tetherload storm -h)
  tetherload room [flags]    join one big room of distinct users, v1 and raw peers, to a tether hub with presence on (see tetherload room -h)
  tetherload overload [flags]
                             flood a low-priority topic past what the server can write beside a high-priority one: the breaker, shedding, hi latency (see tetherload overload -h)

Every scenario but room and overload takes -impl NAME|list|all (default
tether) and runs against each impl in turn, then prints the ratios
tether/alternative; room runs tether alone, v1 and raw peers in turn, and
prints the ratio v1/raw; overload runs tether alone.
`

// run runs one subcommand and returns the process's exit code.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	var err error
	switch args[0] {
	case "serve":
		err = serveMain(ctx, args[1:], stdout, stderr)
	case "idle":
		err = idleMain(ctx, args[1:], stdout, stderr)
	case "broadcast":
		err = broadcastMain(ctx, args[1:], stdout, stderr)
	case "deadpeer":
		err = deadpeerMain(ctx, args[1:], stdout, stderr)
	case "churn":
		err = churnMain(ctx, args[1:], stdout, stderr)
	case "storm":
		err = stormMain(ctx, args[1:], stdout, stderr)
	case "room":
		err = roomMain(ctx, args[1:], stdout, stderr)
	case "overload":
		err = overloadMain(ctx, args[1:], stdout, stderr)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "tetherload: unknown subcommand %q\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintf(stderr, "tetherload %s: %v\n", args[0], err)
		return 1
	}
}

// writeJSON prints a scenario's result as indented JSON.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// errUsage is returned for bad flags, which the flag package has reported.
var errUsage = errors.New("usage")

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected arguments: %q\n", fs.Args())
		return errUsage
	}
	return nil
}
