package prommetrics_test

import (
	"context"
	"fmt"
	"log"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/prommetrics"
)

// Metrics on a registry of the application's, fed by the hub's observer
// and by its Stats at scrape time.
func Example() {
	reg := prometheus.NewRegistry()
	m, err := prommetrics.New(reg)
	if err != nil {
		log.Fatal(err)
	}
	hub, err := tether.NewHub(tether.WithObserver(m.Observer()))
	if err != nil {
		log.Fatal(err)
	}
	defer hub.Shutdown(context.Background())
	m.Watch(hub)

	mux := http.NewServeMux()
	mux.Handle("/ws", hub)
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	// http.ListenAndServe(addr, mux)

	fams, err := reg.Gather() // what a scrape of /metrics sees, sorted by name
	if err != nil {
		log.Fatal(err)
	}
	for _, f := range fams {
		fmt.Println(f.GetName(), f.GetType())
	}
	// Output:
	// tether_bad_requests_total COUNTER
	// tether_broker_outages_total COUNTER
	// tether_connections GAUGE
	// tether_connects_total COUNTER
	// tether_dead_peers_total COUNTER
	// tether_denied_total COUNTER
	// tether_disconnects_total COUNTER
	// tether_evictions_total COUNTER
	// tether_heartbeat_rtt_seconds HISTOGRAM
	// tether_local_only_total COUNTER
	// tether_overloaded GAUGE
	// tether_overloads_total COUNTER
	// tether_pings_total COUNTER
	// tether_published_total COUNTER
	// tether_queue_drops_total COUNTER
	// tether_queued_bytes GAUGE
	// tether_queued_messages GAUGE
	// tether_rate_limited_total COUNTER
	// tether_refused_total COUNTER
	// tether_shed_total COUNTER
	// tether_suspects_total COUNTER
	// tether_topics GAUGE
}

// Hooks of the application's own next to the metrics': each observer is
// passed with a WithObserver of its own, and both are called.
func ExampleMetrics_Observer() {
	m, err := prommetrics.New(prometheus.NewRegistry())
	if err != nil {
		log.Fatal(err)
	}
	hub, err := tether.NewHub(
		tether.WithObserver(m.Observer()),
		tether.WithObserver(tether.Observer{Disconnect: func(c *tether.Conn, reason error) {
			log.Printf("%s gone: %s", c.RemoteAddr(), prommetrics.Reason(reason))
		}}),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer hub.Shutdown(context.Background())
	m.Watch(hub)
}
