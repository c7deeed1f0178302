// Package prommetrics exposes the metrics of tether hubs to Prometheus.
//
// Wire it in three steps: make the metrics on a registry of yours, hand
// their [Metrics.Observer] to the hub, and watch the hub so that its
// [tether.Hub.Stats] are read at scrape time:
//
//	reg := prometheus.NewRegistry()
//	m, err := prommetrics.New(reg)
//	if err != nil { ... }
//	hub, err := tether.NewHub(tether.WithObserver(m.Observer()))
//	if err != nil { ... }
//	m.Watch(hub)
//	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
//
// Each metric has exactly one source, so nothing is counted twice:
//
//   - The Observer feeds what the hub's Stats cannot tell: disconnects by
//     reason (tether_disconnects_total{reason}), the round trips of pings
//     (tether_heartbeat_rtt_seconds, a histogram) and the state of the
//     broker link (tether_broker_up). Its hooks run on the conns'
//     goroutines and cost a few atomic operations, without allocating.
//   - Everything else (connections, topics, queued messages and bytes,
//     connects, publications, drops, evictions, dead peers, suspects,
//     pings, rate-limited, bad and denied requests, refused handshakes, broker outages,
//     local-only deliveries) is read from [tether.Hub.Stats] of the
//     watched hubs when Prometheus scrapes, and summed over them.
//
// [tether.WithObserver] adds to the observers given before it: pass the
// metrics' and your own hooks each with one.
package prommetrics

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/tether-ws/tether"
)

// Values of the reason label of tether_disconnects_total, as [Reason]
// returns them.
const (
	ReasonHeartbeatTimeout  = "heartbeat_timeout"  // [tether.ErrHeartbeatTimeout]
	ReasonQueueFull         = "queue_full"         // [tether.ErrQueueFull]
	ReasonWriteTimeout      = "write_timeout"      // [tether.ErrWriteTimeout]
	ReasonMessageTooBig     = "message_too_big"    // [tether.ErrMessageTooBig]
	ReasonConnLost          = "conn_lost"          // [tether.ErrConnLost]
	ReasonRateLimited       = "rate_limited"       // [tether.ErrRateLimited]
	ReasonProtocolViolation = "protocol_violation" // [tether.ErrProtocolViolation]
	ReasonPeerClosed        = "peer_closed"        // the peer's close frame: a [websocket.CloseError]
	ReasonClosed            = "closed"             // closed on this side ([tether.Conn.Close], hub shutdown): [net.ErrClosed]
	ReasonOther             = "other"              // anything else
)

// reasons lists the label values in the order [classify] tests them; the
// index is the counter's.
var reasons = [...]struct {
	label string
	err   error
}{
	{ReasonHeartbeatTimeout, tether.ErrHeartbeatTimeout},
	{ReasonQueueFull, tether.ErrQueueFull},
	{ReasonWriteTimeout, tether.ErrWriteTimeout},
	{ReasonMessageTooBig, tether.ErrMessageTooBig},
	{ReasonConnLost, tether.ErrConnLost},
	{ReasonRateLimited, tether.ErrRateLimited},
	{ReasonProtocolViolation, tether.ErrProtocolViolation},
	// A close on this side wraps both net.ErrClosed and the CloseError it
	// sent: test it before the peer's.
	{ReasonClosed, net.ErrClosed},
	{ReasonPeerClosed, nil}, // a websocket.CloseError
	{ReasonOther, nil},
}

const (
	idxPeerClosed = len(reasons) - 2
	idxOther      = len(reasons) - 1
)

// classify returns the index in reasons of a disconnect reason.
func classify(err error) int {
	if err == nil {
		return idxOther
	}
	for i, r := range reasons[:idxPeerClosed] {
		if errors.Is(err, r.err) {
			return i
		}
	}
	if _, ok := errors.AsType[websocket.CloseError](err); ok {
		return idxPeerClosed
	}
	return idxOther
}

// Reason returns the reason label that tether_disconnects_total gives a
// conn that ended with err (see [tether.Conn.Err]): one of the Reason
// constants, [ReasonOther] for nil or an error it does not know.
func Reason(err error) string { return reasons[classify(err)].label }

// RTTBuckets are the upper bounds, in seconds, of the classic buckets of
// tether_heartbeat_rtt_seconds: from 100 µs to 10 s. [New] reads them;
// changing them later changes no metrics made before.
var RTTBuckets = []float64{
	.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10,
}

// Option configures [New].
type Option func(*config)

type config struct {
	namespace string
	labels    prometheus.Labels
}

// WithNamespace sets the prefix of every metric name, "tether" by
// default; "" leaves the names bare (connections, connects_total...).
func WithNamespace(ns string) Option {
	return func(c *config) { c.namespace = ns }
}

// WithConstLabels adds labels with fixed values to every metric: to tell
// apart several sets of metrics on one registry, say {"hub": "chat"} and
// {"hub": "admin"}. Sets that share a namespace on one registry must use
// the same label names.
func WithConstLabels(l prometheus.Labels) Option {
	return func(c *config) { c.labels = maps.Clone(l) }
}

// Metrics are the Prometheus metrics of one or more tether hubs. Make
// them with [New]; their methods are safe for concurrent use.
type Metrics struct {
	disconnects [len(reasons)]atomic.Uint64
	rtt         prometheus.Histogram
	broker      atomic.Int32 // brokerUnknown, brokerDown or brokerUp

	disconnectsDesc, brokerUpDesc *prometheus.Desc
	gauges                        []statDesc
	counters                      []statDesc

	mu      sync.Mutex
	hubs    []*tether.Hub
	watched bool         // a hub was ever watched
	retired tether.Stats // counters of hubs no longer watched
}

const (
	brokerUnknown int32 = iota
	brokerDown
	brokerUp
)

// statDesc is a metric read from the summed Stats.
type statDesc struct {
	desc *prometheus.Desc
	get  func(*tether.Stats) float64
}

type stat struct {
	name, help string
	get        func(*tether.Stats) float64
}

var statGauges = []stat{
	{"connections", "Conns registered with the watched hubs now (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Conns) }},
	{"topics", "Topics with a subscriber or a presence now (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Topics) }},
	{"queued_messages", "Messages waiting in the conns' send queues now (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.QueuedMessages) }},
	{"queued_bytes", "Bytes waiting in the conns' send queues now (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.QueuedBytes) }},
	{"overloaded", "1 while a watched hub's breaker is open: shedding low-priority topics, refusing new conns (Hub.Stats).",
		func(s *tether.Stats) float64 {
			if s.Overloaded {
				return 1
			}
			return 0
		}},
}

var statCounters = []stat{
	{"connects_total", "Conns registered (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Connects) }},
	{"published_total", "Topic publications (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Published) }},
	{"queue_drops_total", "Messages discarded by the overflow policy of a full send queue (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Drops) }},
	{"evictions_total", "Conns dropped for not reading: queue full or write timeout (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Evictions) }},
	{"dead_peers_total", "Conns dropped by the heartbeat (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.DeadPeers) }},
	{"suspects_total", "Times a conn's pong was late (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Suspects) }},
	{"pings_total", "Heartbeat pings sent (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Pings) }},
	{"rate_limited_total", "Inbound messages dropped by the rate limit (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.RateLimited) }},
	{"bad_requests_total", "Inbound messages the hub could not read (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.BadRequests) }},
	{"denied_total", "Subscriptions and publications refused by the application (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Denied) }},
	{"refused_total", "Handshakes refused with 503: shutting down, full, or past the admission rate (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Refused) }},
	{"overloads_total", "Times a breaker opened (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Overloads) }},
	{"shed_total", "Deliveries of low-priority topics shed while overloaded (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.Shed) }},
	{"broker_outages_total", "Times the broker link was lost (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.BrokerOutages) }},
	{"local_only_total", "Publications and direct messages delivered on this node only, the broker being down (Hub.Stats).",
		func(s *tether.Stats) float64 { return float64(s.LocalOnly) }},
}

// New makes the metrics and registers them on reg, which must not be nil
// (pass [prometheus.DefaultRegisterer] to use the global registry). It
// fails if reg refuses them, for instance because metrics of the same
// names and labels are registered already: give each set its own
// [WithNamespace], or its own values of the same [WithConstLabels].
//
// The metrics read from Hub.Stats appear once a hub is watched (see
// [Metrics.Watch]); tether_broker_up once a broker reports.
func New(reg prometheus.Registerer, opts ...Option) (*Metrics, error) {
	if reg == nil {
		return nil, errors.New("prommetrics: nil Registerer")
	}
	cfg := config{namespace: "tether"}
	for _, o := range opts {
		if o != nil {
			o(&cfg)
		}
	}
	name := func(n string) string { return prometheus.BuildFQName(cfg.namespace, "", n) }
	m := &Metrics{
		rtt: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace:   cfg.namespace,
			Name:        "heartbeat_rtt_seconds",
			Help:        "Round trips of heartbeat pings and Conn.Ping (Observer.Pong).",
			ConstLabels: cfg.labels,
			Buckets:     slices.Clone(RTTBuckets),
			// Native (sparse) buckets too, for a Prometheus that scrapes
			// them: about 9% wide, at most 160 of them.
			NativeHistogramBucketFactor:     1.1,
			NativeHistogramMaxBucketNumber:  160,
			NativeHistogramMinResetDuration: time.Hour,
		}),
		disconnectsDesc: prometheus.NewDesc(name("disconnects_total"),
			"Conns that ended, by reason (Observer.Disconnect).", []string{"reason"}, cfg.labels),
		brokerUpDesc: prometheus.NewDesc(name("broker_up"),
			"1 while the hub's broker link is up, 0 while it is lost; absent until a broker reports (Observer.Broker).",
			nil, cfg.labels),
	}
	for _, s := range statGauges {
		m.gauges = append(m.gauges, statDesc{prometheus.NewDesc(name(s.name), s.help, nil, cfg.labels), s.get})
	}
	for _, s := range statCounters {
		m.counters = append(m.counters, statDesc{prometheus.NewDesc(name(s.name), s.help, nil, cfg.labels), s.get})
	}
	if err := reg.Register(collector{m}); err != nil {
		return nil, fmt.Errorf("prommetrics: %w", err)
	}
	return m, nil
}

// Observer returns the hooks that feed the event metrics: pass them to
// [tether.NewHub] with [tether.WithObserver]. They count every conn they
// observe, so give them to the hubs you [Metrics.Watch], and to no
// [tether.Client]. Hooks of your own go in an observer of their own:
//
//	tether.NewHub(tether.WithObserver(m.Observer()), tether.WithObserver(mine))
func (m *Metrics) Observer() tether.Observer {
	return tether.Observer{
		Disconnect: func(_ *tether.Conn, reason error) {
			m.disconnects[classify(reason)].Add(1)
		},
		Pong: func(_ *tether.Conn, rtt time.Duration) {
			m.rtt.Observe(rtt.Seconds())
		},
		Broker: func(err error) {
			if err != nil {
				m.broker.Store(brokerDown)
			} else {
				m.broker.Store(brokerUp)
			}
		},
	}
}

// Watch adds hub to the hubs whose [tether.Hub.Stats] are read at each
// scrape; the values are summed over the watched hubs. Watching a hub
// twice changes nothing. A hub stays watched, after its shutdown too,
// until [Metrics.Unwatch].
func (m *Metrics) Watch(hub *tether.Hub) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.watched = true
	if !slices.Contains(m.hubs, hub) {
		m.hubs = append(m.hubs, hub)
	}
}

// Unwatch stops reading hub's Stats, typically once it is shut down. Its
// counters keep the values it had, so that no counter goes down; its
// gauges (connections, topics, queued messages and bytes) no longer
// include it.
func (m *Metrics) Unwatch(hub *tether.Hub) {
	m.mu.Lock()
	defer m.mu.Unlock()
	i := slices.Index(m.hubs, hub)
	if i < 0 {
		return
	}
	m.hubs = slices.Delete(m.hubs, i, i+1)
	s := hub.Stats()
	addCounters(&m.retired, &s)
}

// addCounters adds the counters of src, not its gauges, to dst.
func addCounters(dst, src *tether.Stats) {
	dst.Connects += src.Connects
	dst.Disconnects += src.Disconnects
	dst.Published += src.Published
	dst.Drops += src.Drops
	dst.Evictions += src.Evictions
	dst.DeadPeers += src.DeadPeers
	dst.Suspects += src.Suspects
	dst.Pings += src.Pings
	dst.RateLimited += src.RateLimited
	dst.BadRequests += src.BadRequests
	dst.Denied += src.Denied
	dst.Refused += src.Refused
	dst.Overloads += src.Overloads
	dst.Shed += src.Shed
	dst.BrokerOutages += src.BrokerOutages
	dst.LocalOnly += src.LocalOnly
}

// collector is the prometheus.Collector of a Metrics. It is kept apart so
// that Metrics has no Describe and Collect methods of its own.
type collector struct{ m *Metrics }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	m := c.m
	ch <- m.disconnectsDesc
	ch <- m.brokerUpDesc
	m.rtt.Describe(ch)
	for _, s := range m.gauges {
		ch <- s.desc
	}
	for _, s := range m.counters {
		ch <- s.desc
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	m := c.m
	for i := range reasons {
		ch <- prometheus.MustNewConstMetric(m.disconnectsDesc, prometheus.CounterValue,
			float64(m.disconnects[i].Load()), reasons[i].label)
	}
	switch m.broker.Load() {
	case brokerUp:
		ch <- prometheus.MustNewConstMetric(m.brokerUpDesc, prometheus.GaugeValue, 1)
	case brokerDown:
		ch <- prometheus.MustNewConstMetric(m.brokerUpDesc, prometheus.GaugeValue, 0)
	}
	m.rtt.Collect(ch)

	m.mu.Lock()
	watched, sum, hubs := m.watched, m.retired, slices.Clone(m.hubs)
	m.mu.Unlock()
	if !watched {
		return
	}
	for _, h := range hubs {
		s := h.Stats()
		addCounters(&sum, &s)
		sum.Conns += s.Conns
		sum.Overloaded = sum.Overloaded || s.Overloaded
		sum.Topics += s.Topics
		sum.QueuedMessages += s.QueuedMessages
		sum.QueuedBytes += s.QueuedBytes
	}
	for _, s := range m.gauges {
		ch <- prometheus.MustNewConstMetric(s.desc, prometheus.GaugeValue, s.get(&sum))
	}
	for _, s := range m.counters {
		ch <- prometheus.MustNewConstMetric(s.desc, prometheus.CounterValue, s.get(&sum))
	}
}
