// Command gateway is the WebSocket gateway that deploy/kubernetes runs: a
// tether hub with the endpoints a Kubernetes deployment needs, and the
// drain on SIGTERM that lets a rolling update or a scale-down move its
// connections without a storm.
//
//	go run ./deploy/gateway -addr :8080
//
// It serves, on one port:
//
//	/ws       the hub (protocol v1 clients and raw WebSocket peers)
//	/ready    readiness: 503 while draining, overloaded or full
//	/healthz  liveness: 200 while the process serves HTTP
//	/metrics  Prometheus metrics (prommetrics), tether_connections included
//
// On SIGTERM it drains: /ready answers 503 at once, new conns are refused,
// and the conns it holds are closed one at a time over -drain (1001 with a
// reconnect hint), so that their clients reconnect to other pods a few at a
// time and resume where they were; then it shuts down. Kubernetes'
// terminationGracePeriodSeconds must cover the preStop sleep, -drain and a
// few seconds more.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/prommetrics"
	"golang.org/x/time/rate"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		fmt.Fprintln(os.Stderr, "gateway:", err)
		os.Exit(1)
	}
}

type config struct {
	addr      string
	drain     time.Duration
	admission float64
	burst     int
	maxConns  int
	breaker   time.Duration
}

// run serves until ctx ends, then drains and shuts down. Its first line
// of output names the address.
func run(ctx context.Context, args []string, stdout io.Writer) error {
	var cfg config
	fs := flag.NewFlagSet("gateway", flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.StringVar(&cfg.addr, "addr", ":8080", "HTTP listen address")
	fs.DurationVar(&cfg.drain, "drain", 20*time.Second, "on SIGTERM, how long to spread the closing of the conns over")
	fs.Float64Var(&cfg.admission, "admission", 500, "new conns admitted per second (0: no limit)")
	fs.IntVar(&cfg.burst, "admission-burst", 1000, "new conns admitted at once")
	fs.IntVar(&cfg.maxConns, "max-conns", 0, "conns held at most (0: no cap)")
	fs.DurationVar(&cfg.breaker, "breaker", 100*time.Millisecond, "scheduling latency (p99) past which the gateway sheds low-priority topics and refuses new conns (0: never)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	log := slog.New(slog.NewTextHandler(stdout, nil))

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics, err := prommetrics.New(reg)
	if err != nil {
		return err
	}
	hub, err := tether.NewHub(
		tether.WithAdmission(rate.Limit(cfg.admission), cfg.burst),
		tether.WithMaxConns(cfg.maxConns),
		tether.WithBreaker(cfg.breaker),
		tether.WithLogger(log),
		tether.WithObserver(metrics.Observer()),
	)
	if err != nil {
		return err
	}
	metrics.Watch(hub)

	mux := http.NewServeMux()
	mux.Handle("/ws", hub)
	mux.Handle("/ready", hub.Ready())
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		hub.Close()
		return err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	fmt.Fprintf(stdout, "gateway on %s\n", ln.Addr())

	select {
	case <-ctx.Done():
	case err := <-served:
		hub.Close()
		return err
	}
	// Drain: /ready turns 503 and new conns are refused at once; the
	// conns held are moved over cfg.drain; what is left then is closed.
	log.Info("draining", "conns", hub.Len(), "over", cfg.drain)
	drainCtx, cancel := context.WithTimeout(context.Background(), cfg.drain+5*time.Second)
	defer cancel()
	moved, err := hub.Rebalance(drainCtx, 1, cfg.drain)
	log.Info("drained", "moved", moved, "err", err)
	err = errors.Join(err, hub.Shutdown(drainCtx))
	// The HTTP server last: probes and scrapes are answered meanwhile.
	err = errors.Join(err, srv.Shutdown(drainCtx))
	if serr := <-served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return err
}
