package prommetrics_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/goleak"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/prommetrics"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// env is a hub served on loopback, with its metrics, and a /metrics
// endpoint on loopback too.
type env struct {
	reg     *prometheus.Registry
	m       *prommetrics.Metrics
	hub     *tether.Hub
	wsURL   string
	metrics string // URL of /metrics
}

func newEnv(t *testing.T, opts ...tether.HubOption) *env {
	t.Helper()
	reg := prometheus.NewRegistry()
	m, err := prommetrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	hub, err := tether.NewHub(append([]tether.HubOption{tether.WithObserver(m.Observer())}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	m.Watch(hub)
	ws := httptest.NewServer(hub)
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	ms := httptest.NewServer(mux)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := hub.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		ws.Close()
		ms.Close()
	})
	return &env{reg: reg, m: m, hub: hub, wsURL: "ws" + strings.TrimPrefix(ws.URL, "http"), metrics: ms.URL + "/metrics"}
}

// scrape fetches /metrics over HTTP and parses the text exposition.
func (e *env) scrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(e.metrics)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET /metrics: %s: %s", resp.Status, b)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("Content-Type %q, want the text format", ct)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// sample finds the sample of family name whose labels include the given
// name/value pairs.
func sample(fams map[string]*dto.MetricFamily, name string, labels ...string) (*dto.Metric, dto.MetricType, bool) {
	f, ok := fams[name]
	if !ok {
		return nil, 0, false
	}
next:
	for _, m := range f.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		return m, f.GetType(), true
	}
	return nil, 0, false
}

// value is a counter's or gauge's value, or -1 when absent.
func value(fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	m, typ, ok := sample(fams, name, labels...)
	if !ok {
		return -1
	}
	switch typ {
	case dto.MetricType_COUNTER:
		return m.GetCounter().GetValue()
	case dto.MetricType_GAUGE:
		return m.GetGauge().GetValue()
	case dto.MetricType_UNTYPED:
		return m.GetUntyped().GetValue()
	}
	return -1
}

// want is one expected value.
type want struct {
	name   string
	labels []string
	value  float64
}

func (w want) String() string {
	if len(w.labels) == 0 {
		return w.name
	}
	return fmt.Sprintf("%s%v", w.name, w.labels)
}

// waitMetrics scrapes until every wanted value is there, failing after a
// few seconds with what the last scrape showed.
func (e *env) waitMetrics(t *testing.T, wants ...want) map[string]*dto.MetricFamily {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		fams := e.scrape(t)
		var bad []string
		for _, w := range wants {
			if got := value(fams, w.name, w.labels...); got != w.value {
				bad = append(bad, fmt.Sprintf("%v = %v, want %v", w, got, w.value))
			}
		}
		if len(bad) == 0 {
			return fams
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 5 s: %s", strings.Join(bad, "; "))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// dialRaw opens a raw coder/websocket conn to the hub; the test closes it.
func dialRaw(t *testing.T, url string) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.CloseNow() })
	return c
}

// The metric types and sources are the documented ones, and the counters
// read from Stats are counters, not gauges.
func TestTypes(t *testing.T) {
	e := newEnv(t)
	fams := e.scrape(t)
	types := map[string]dto.MetricType{
		"tether_connections":           dto.MetricType_GAUGE,
		"tether_topics":                dto.MetricType_GAUGE,
		"tether_queued_messages":       dto.MetricType_GAUGE,
		"tether_queued_bytes":          dto.MetricType_GAUGE,
		"tether_connects_total":        dto.MetricType_COUNTER,
		"tether_disconnects_total":     dto.MetricType_COUNTER,
		"tether_heartbeat_rtt_seconds": dto.MetricType_HISTOGRAM,
		"tether_published_total":       dto.MetricType_COUNTER,
		"tether_queue_drops_total":     dto.MetricType_COUNTER,
		"tether_evictions_total":       dto.MetricType_COUNTER,
		"tether_dead_peers_total":      dto.MetricType_COUNTER,
		"tether_suspects_total":        dto.MetricType_COUNTER,
		"tether_pings_total":           dto.MetricType_COUNTER,
		"tether_rate_limited_total":    dto.MetricType_COUNTER,
		"tether_bad_requests_total":    dto.MetricType_COUNTER,
		"tether_denied_total":          dto.MetricType_COUNTER,
		"tether_refused_total":         dto.MetricType_COUNTER,
		"tether_overloaded":            dto.MetricType_GAUGE,
		"tether_overloads_total":       dto.MetricType_COUNTER,
		"tether_shed_total":            dto.MetricType_COUNTER,
		"tether_broker_outages_total":  dto.MetricType_COUNTER,
		"tether_local_only_total":      dto.MetricType_COUNTER,
	}
	for name, typ := range types {
		f, ok := fams[name]
		if !ok {
			t.Errorf("%s missing", name)
			continue
		}
		if f.GetType() != typ {
			t.Errorf("%s is a %v, want %v", name, f.GetType(), typ)
		}
		delete(fams, name)
	}
	for name := range fams {
		t.Errorf("unexpected family %s", name)
	}
	// No broker: tether_broker_up is absent (checked by the loop above),
	// and every reason is there from the start, at 0.
	fams = e.scrape(t)
	if n := len(fams["tether_disconnects_total"].GetMetric()); n != 10 {
		t.Errorf("%d reasons, want 10", n)
	}
	problems, err := testutil.GatherAndLint(e.reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

// Conns of both kinds are counted while connected; a client's normal
// close is a peer_closed disconnect.
func TestConnectAndPeerClose(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	raw := dialRaw(t, e.wsURL)
	raw.CloseRead(ctx) // answers pings and takes the close handshake
	client, err := tether.Dial(ctx, e.wsURL)
	if err != nil {
		t.Fatal(err)
	}
	e.waitMetrics(t,
		want{"tether_connections", nil, 2},
		want{"tether_connects_total", nil, 2},
		want{"tether_disconnects_total", []string{"reason", "peer_closed"}, 0},
	)
	if got := e.hub.Stats().Conns; got != 2 {
		t.Fatalf("hub has %d conns, want 2", got)
	}

	if err := raw.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Fatal(err)
	}
	e.waitMetrics(t,
		want{"tether_connections", nil, 1},
		want{"tether_disconnects_total", []string{"reason", "peer_closed"}, 1},
	)

	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	e.waitMetrics(t,
		want{"tether_connections", nil, 0},
		want{"tether_connects_total", nil, 2},
		want{"tether_disconnects_total", []string{"reason", "peer_closed"}, 2},
		want{"tether_disconnects_total", []string{"reason", "other"}, 0},
		want{"tether_dead_peers_total", nil, 0},
	)
}

// A peer that never reads, so never answers a ping, is dropped by the
// heartbeat: a heartbeat_timeout disconnect and a dead peer.
func TestDeadPeer(t *testing.T) {
	const interval, timeout = 30 * time.Millisecond, 120 * time.Millisecond
	e := newEnv(t, tether.WithHeartbeat(interval, timeout))
	dialRaw(t, e.wsURL) // never reads: its pongs are never sent
	e.waitMetrics(t, want{"tether_connections", nil, 1})
	e.waitMetrics(t,
		want{"tether_connections", nil, 0},
		want{"tether_disconnects_total", []string{"reason", "heartbeat_timeout"}, 1},
		want{"tether_dead_peers_total", nil, 1},
		want{"tether_disconnects_total", []string{"reason", "peer_closed"}, 0},
	)
	fams := e.scrape(t)
	if v := value(fams, "tether_pings_total"); v < 1 {
		t.Errorf("tether_pings_total = %v, want at least 1", v)
	}
}

// Pongs fill the RTT histogram, and pings are counted.
func TestHeartbeatRTT(t *testing.T) {
	e := newEnv(t, tether.WithHeartbeat(20*time.Millisecond, 2*time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	raw := dialRaw(t, e.wsURL)
	raw.CloseRead(ctx) // the reader answers pings

	deadline := time.Now().Add(5 * time.Second)
	for {
		fams := e.scrape(t)
		m, typ, ok := sample(fams, "tether_heartbeat_rtt_seconds")
		if !ok || typ != dto.MetricType_HISTOGRAM {
			t.Fatalf("tether_heartbeat_rtt_seconds missing or not a histogram")
		}
		h := m.GetHistogram()
		if h.GetSampleCount() >= 3 {
			if h.GetSampleSum() <= 0 || h.GetSampleSum() > 5*float64(h.GetSampleCount()) {
				t.Errorf("RTT sum %v s over %d samples", h.GetSampleSum(), h.GetSampleCount())
			}
			b := h.GetBucket()
			// The text format adds the +Inf bucket.
			n := len(prommetrics.RTTBuckets)
			if len(b) != n+1 || b[0].GetUpperBound() != 0.0001 || b[n-1].GetUpperBound() != 10 || b[n].GetCumulativeCount() != h.GetSampleCount() {
				t.Errorf("buckets %v", b)
			}
			if pings := value(fams, "tether_pings_total"); pings < float64(h.GetSampleCount()) {
				t.Errorf("tether_pings_total %v < %d pongs", pings, h.GetSampleCount())
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d RTT samples after 5 s, want 3", h.GetSampleCount())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := raw.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatal(err)
	}
}

// Publications are counted, and a subscribed topic is a topic.
func TestPublished(t *testing.T) {
	var hub atomic.Pointer[tether.Hub]
	e := newEnv(t, tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
		if err := hub.Load().Subscribe(c, "room"); err != nil {
			t.Errorf("Subscribe: %v", err)
		}
	}}))
	hub.Store(e.hub)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	raw := dialRaw(t, e.wsURL)
	e.waitMetrics(t, want{"tether_topics", nil, 1}, want{"tether_connections", nil, 1})
	for _, d := range []string{`"one"`, `"two"`} {
		if err := e.hub.Publish("room", []byte(d)); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.hub.Publish("nobody", []byte(`"three"`)); err != nil {
		t.Fatal(err)
	}
	var got string
	for got != `"one"`+"\n"+`"two"` {
		_, b, err := raw.Read(ctx)
		if err != nil {
			t.Fatalf("Read: %v (so far %q)", err, got)
		}
		// Messages queued together leave in one frame, newline-joined.
		if got != "" {
			got += "\n"
		}
		got += string(b)
	}
	e.waitMetrics(t, want{"tether_published_total", nil, 3}, want{"tether_queued_messages", nil, 0})
	_ = raw.Close(websocket.StatusNormalClosure, "")
}

// A conn closed by the server is "closed"; at hub shutdown the gauges
// drop to zero.
func TestServerClose(t *testing.T) {
	e := newEnv(t, tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
		go func() { _ = c.Close(websocket.StatusNormalClosure, "go away") }()
	}}))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	raw := dialRaw(t, e.wsURL)
	_, _, err := raw.Read(ctx) // takes the close handshake
	if websocket.CloseStatus(err) != websocket.StatusNormalClosure {
		t.Fatalf("Read: %v, want close 1000", err)
	}
	e.waitMetrics(t,
		want{"tether_connections", nil, 0},
		want{"tether_connects_total", nil, 1},
		want{"tether_disconnects_total", []string{"reason", "closed"}, 1},
		want{"tether_disconnects_total", []string{"reason", "peer_closed"}, 0},
	)
}

// broker_up is absent without a broker report, then 1 while the link is
// up and 0 while it is lost.
func TestBrokerUp(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := prommetrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	gather := func() float64 {
		fams, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fams {
			if f.GetName() == "tether_broker_up" {
				return f.GetMetric()[0].GetGauge().GetValue()
			}
		}
		return -1
	}
	if v := gather(); v != -1 {
		t.Fatalf("broker_up = %v before any report, want absent", v)
	}
	obs := m.Observer()
	obs.Broker(nil)
	if v := gather(); v != 1 {
		t.Fatalf("broker_up = %v after link up, want 1", v)
	}
	obs.Broker(errors.New("redis: connection refused"))
	if v := gather(); v != 0 {
		t.Fatalf("broker_up = %v after link lost, want 0", v)
	}
	obs.Broker(nil)
	if v := gather(); v != 1 {
		t.Fatalf("broker_up = %v after link back, want 1", v)
	}
	// Stats metrics appear only once a hub is watched.
	fams, _ := reg.Gather()
	for _, f := range fams {
		if f.GetName() == "tether_connections" {
			t.Fatal("tether_connections without a watched hub")
		}
	}
}

func TestReason(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("tether: %w: %w", err, io.EOF) }
	peer := websocket.CloseError{Code: websocket.StatusGoingAway, Reason: "bye"}
	for _, c := range []struct {
		err  error
		want string
	}{
		{tether.ErrHeartbeatTimeout, "heartbeat_timeout"},
		{wrap(tether.ErrQueueFull), "queue_full"},
		{wrap(tether.ErrWriteTimeout), "write_timeout"},
		{wrap(tether.ErrMessageTooBig), "message_too_big"},
		{fmt.Errorf("%w: %w", tether.ErrConnLost, net.ErrClosed), "conn_lost"},
		{wrap(tether.ErrRateLimited), "rate_limited"},
		{wrap(tether.ErrProtocolViolation), "protocol_violation"},
		{fmt.Errorf("tether: peer closed: %w", peer), "peer_closed"},
		{fmt.Errorf("tether: closed: %w: %w", net.ErrClosed, peer), "closed"},
		{fmt.Errorf("tether: closed: %w", net.ErrClosed), "closed"},
		{io.ErrUnexpectedEOF, "other"},
		{nil, "other"},
	} {
		if got := prommetrics.Reason(c.err); got != c.want {
			t.Errorf("Reason(%v) = %q, want %q", c.err, got, c.want)
		}
	}
}

// The hooks that run on conn goroutines do not allocate.
func TestObserverAllocs(t *testing.T) {
	m, err := prommetrics.New(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	obs := m.Observer()
	peer := fmt.Errorf("tether: peer closed: %w", websocket.CloseError{Code: websocket.StatusNormalClosure})
	lost := fmt.Errorf("%w: %w", tether.ErrConnLost, io.EOF)
	if n := testing.AllocsPerRun(1000, func() {
		obs.Disconnect(nil, peer)
		obs.Disconnect(nil, lost)
		obs.Disconnect(nil, io.EOF)
		obs.Pong(nil, 3*time.Millisecond)
		obs.Broker(nil)
	}); n != 0 {
		t.Fatalf("%v allocations per event batch, want 0", n)
	}
}

// Beside hooks of the application's own, the metrics still count.
func TestObserverBesideApplication(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := prommetrics.New(reg, prommetrics.WithNamespace("app"), prommetrics.WithConstLabels(prometheus.Labels{"hub": "chat"}))
	if err != nil {
		t.Fatal(err)
	}
	gone := make(chan error, 1)
	hub, err := tether.NewHub(tether.WithObserver(m.Observer()), tether.WithObserver(tether.Observer{
		Disconnect: func(_ *tether.Conn, reason error) { gone <- reason },
	}))
	if err != nil {
		t.Fatal(err)
	}
	m.Watch(hub)
	m.Watch(hub) // twice: counted once
	srv := httptest.NewServer(hub)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	defer func() { _ = hub.Shutdown(ctx) }()

	raw := dialRaw(t, "ws"+strings.TrimPrefix(srv.URL, "http"))
	raw.CloseRead(ctx)
	if err := raw.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatal(err)
	}
	select {
	case <-gone:
	case <-ctx.Done():
		t.Fatal("the application's Disconnect hook was not called")
	}
	const expected = `
# HELP app_connects_total Conns registered (Hub.Stats).
# TYPE app_connects_total counter
app_connects_total{hub="chat"} 1
# HELP app_disconnects_total Conns that ended, by reason (Observer.Disconnect).
# TYPE app_disconnects_total counter
app_disconnects_total{hub="chat",reason="closed"} 0
app_disconnects_total{hub="chat",reason="conn_lost"} 0
app_disconnects_total{hub="chat",reason="heartbeat_timeout"} 0
app_disconnects_total{hub="chat",reason="message_too_big"} 0
app_disconnects_total{hub="chat",reason="other"} 0
app_disconnects_total{hub="chat",reason="peer_closed"} 1
app_disconnects_total{hub="chat",reason="protocol_violation"} 0
app_disconnects_total{hub="chat",reason="queue_full"} 0
app_disconnects_total{hub="chat",reason="rate_limited"} 0
app_disconnects_total{hub="chat",reason="write_timeout"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(expected), "app_connects_total", "app_disconnects_total"); err != nil {
		t.Fatal(err)
	}
}

// Unwatch keeps the counters of the hub it drops, and drops its gauges.
func TestWatchUnwatch(t *testing.T) {
	e := newEnv(t)
	raw := dialRaw(t, e.wsURL)
	e.waitMetrics(t, want{"tether_connections", nil, 1}, want{"tether_connects_total", nil, 1})

	other, err := tether.NewHub(tether.WithObserver(e.m.Observer()))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(other)
	defer srv.Close()
	e.m.Watch(other)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	raw2 := dialRaw(t, "ws"+strings.TrimPrefix(srv.URL, "http"))
	raw2.CloseRead(ctx) // takes the close handshake of the shutdown
	e.waitMetrics(t, want{"tether_connections", nil, 2}, want{"tether_connects_total", nil, 2})

	if err := other.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	e.m.Unwatch(other)
	e.m.Unwatch(other) // twice: no-op
	e.waitMetrics(t,
		want{"tether_connections", nil, 1},
		want{"tether_connects_total", nil, 2}, // not down to 1
		want{"tether_disconnects_total", []string{"reason", "closed"}, 1},
	)
	_ = raw.CloseNow()
	_ = raw2.CloseNow()
}

func TestNewErrors(t *testing.T) {
	if _, err := prommetrics.New(nil); err == nil {
		t.Error("New(nil) succeeded")
	}
	reg := prometheus.NewRegistry()
	hub := func(name string) prommetrics.Option {
		return prommetrics.WithConstLabels(prometheus.Labels{"hub": name})
	}
	if _, err := prommetrics.New(reg, hub("a")); err != nil {
		t.Fatal(err)
	}
	_, err := prommetrics.New(reg, hub("a"))
	if _, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); !ok {
		t.Errorf("second New on one registry: %v, want AlreadyRegisteredError", err)
	}
	if _, err := prommetrics.New(reg, hub("b")); err != nil {
		t.Errorf("New with other const label values: %v", err)
	}
	if _, err := prommetrics.New(reg, prommetrics.WithNamespace("other")); err != nil {
		t.Errorf("New with another namespace: %v", err)
	}
	if _, err := prommetrics.New(reg); err == nil {
		t.Error("New without the const labels of the others succeeded")
	}
}

func BenchmarkObserver(b *testing.B) {
	m, err := prommetrics.New(prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	obs := m.Observer()
	peer := fmt.Errorf("tether: peer closed: %w", websocket.CloseError{Code: websocket.StatusNormalClosure})
	b.Run("Pong", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			obs.Pong(nil, 3*time.Millisecond)
		}
	})
	b.Run("Disconnect", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			obs.Disconnect(nil, peer)
		}
	})
}
