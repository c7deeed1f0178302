// Command tetherload measures what idle tether connections cost a server.
//
//	tetherload serve -addr 127.0.0.1:0 -interval 15s -timeout 30s [-pprof]
//	tetherload idle -n 10000 -interval 15s -timeout 30s -hold 30s [-json]
//	tetherload broadcast -n 1000 -m 1000 -size 64 [-rate 0] [-json]
//
// serve runs a WebSocket server whose /ws handler accepts tether conns and
// keeps them, and whose /stats endpoint reports the process's memory,
// goroutines, CPU time and conn counts as JSON. It prints its listening
// address as its first line of standard output.
//
// idle starts serve as a child process, opens n client conns to it that do
// nothing but answer the server's heartbeat pings, holds them, and prints
// what each conn costs the server. It always exits by itself, closing its
// conns and killing its child.
//
// broadcast starts serve as a child process, subscribes n protocol v1
// clients to one topic of its hub, has the server publish m messages, and
// prints deliveries per second and delivery latency.
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
                             measure fan-out to subscribers of a child server's hub (see tetherload broadcast -h)
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
