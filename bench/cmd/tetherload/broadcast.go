package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// broadcastConfig is one fan-out run: n protocol v1 subscribers of one
// topic, m messages of size bytes published by the server.
type broadcastConfig struct {
	n, m, size        int
	rate              float64 // publications per second; 0: as fast as Publish goes
	interval, timeout time.Duration
	sources           int
	concurrency       int
	setup             time.Duration
	deliver           time.Duration // budget for every delivery after the last publish
	queue             int           // the hub's send queue, in messages
	jsonOut           bool
	serverCmd         []string
}

func broadcastMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg broadcastConfig
	fs := flag.NewFlagSet("tetherload broadcast", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&cfg.n, "n", 1000, "subscribers")
	fs.IntVar(&cfg.m, "m", 1000, "messages to publish")
	fs.IntVar(&cfg.size, "size", 64, "bytes of data per message (at least 48)")
	fs.Float64Var(&cfg.rate, "rate", 0, "publications per second; 0 publishes as fast as Hub.Publish returns")
	fs.DurationVar(&cfg.interval, "interval", 15*time.Second, "server heartbeat interval")
	fs.DurationVar(&cfg.timeout, "timeout", 30*time.Second, "server heartbeat timeout")
	fs.IntVar(&cfg.sources, "sources", 49, "source IPs to spread conns over: 127.0.0.2 .. 127.0.0.(1+sources)")
	fs.IntVar(&cfg.concurrency, "concurrency", 64, "dials in flight at once")
	fs.DurationVar(&cfg.setup, "setup", 3*time.Minute, "time allowed to start the server, dial and subscribe")
	fs.DurationVar(&cfg.deliver, "deliver", time.Minute, "time allowed for every delivery once publishing is done")
	fs.IntVar(&cfg.queue, "queue", 256, "the server's send queue per conn, in messages: a burst longer than it evicts subscribers that fall behind (tether's default policy)")
	fs.BoolVar(&cfg.jsonOut, "json", false, "print the result as JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	res, err := runBroadcast(ctx, cfg, stderr)
	if err != nil {
		return err
	}
	if cfg.jsonOut {
		return writeJSON(stdout, res)
	}
	_, err = fmt.Fprintf(stdout, "%d subscribers x %d messages of %d B (rate %s): %d deliveries in %.3fs = %.0f/s; latency p50 %.2fms p99 %.2fms max %.2fms; %d out of order, %d duplicates, %d missing, %d evicted\n",
		res.Subscribers, res.Messages, res.Size, res.Rate, res.Deliveries, res.Seconds, res.PerSecond,
		res.P50ms, res.P99ms, res.MaxMS, res.OutOfOrder, res.Duplicates, res.Missing, res.Evicted)
	return err
}

// BroadcastResult is what one fan-out run measured. Latency is from just
// before Hub.Publish in the server to the subscriber's read of the frame
// that holds the message, on the same host's clock.
type BroadcastResult struct {
	Subscribers int     `json:"subscribers"`
	Messages    int     `json:"messages"`
	Size        int     `json:"size_bytes"`
	Rate        string  `json:"rate"`
	Deliveries  int64   `json:"deliveries"`
	Seconds     float64 `json:"seconds"` // first publish to last delivery
	PublishSecs float64 `json:"publish_seconds"`
	PerSecond   float64 `json:"deliveries_per_second"`
	P50ms       float64 `json:"latency_p50_ms"`
	P99ms       float64 `json:"latency_p99_ms"`
	MaxMS       float64 `json:"latency_max_ms"`
	Frames      int64   `json:"frames"` // WebSocket messages read: deliveries/frames is the coalescing
	OutOfOrder  int64   `json:"out_of_order"`
	Duplicates  int64   `json:"duplicates"`
	Missing     int64   `json:"missing"`
	Evicted     int64   `json:"evicted"`
}

func (cfg *broadcastConfig) validate() error {
	var errs []error
	if cfg.n <= 0 || cfg.m <= 0 {
		errs = append(errs, fmt.Errorf("-n %d and -m %d must be positive", cfg.n, cfg.m))
	}
	if cfg.size < 48 {
		errs = append(errs, fmt.Errorf("-size %d must be at least 48", cfg.size))
	}
	if cfg.rate < 0 {
		errs = append(errs, fmt.Errorf("-rate %v must not be negative", cfg.rate))
	}
	if cfg.sources < 1 || cfg.sources > 253 || cfg.concurrency < 1 {
		errs = append(errs, fmt.Errorf("-sources %d must be within 1..253 and -concurrency %d positive", cfg.sources, cfg.concurrency))
	}
	if cfg.interval <= 0 || cfg.timeout <= cfg.interval || cfg.setup <= 0 || cfg.deliver <= 0 {
		errs = append(errs, errors.New("need 0 < interval < timeout, and positive -setup and -deliver"))
	}
	return errors.Join(errs...)
}

// subscriber is one load client's receiving state.
type subscriber struct {
	next int // index of the next message expected
}

// latencies is a histogram of delivery latencies in 10 µs buckets up to
// 10 s, safe for concurrent use.
type latencies struct {
	buckets [1_000_001]atomic.Uint64
	max     atomic.Int64
}

const latencyBucket = 10 * time.Microsecond

func (l *latencies) add(d time.Duration) {
	i := min(max(int(d/latencyBucket), 0), len(l.buckets)-1)
	l.buckets[i].Add(1)
	for {
		m := l.max.Load()
		if int64(d) <= m || l.max.CompareAndSwap(m, int64(d)) {
			return
		}
	}
}

func (l *latencies) quantile(q float64, total uint64) time.Duration {
	rank := uint64(q*float64(total-1)) + 1
	var seen uint64
	for i := range l.buckets {
		seen += l.buckets[i].Load()
		if seen >= rank {
			return time.Duration(i+1) * latencyBucket
		}
	}
	return time.Duration(l.max.Load())
}

// runBroadcast runs one fan-out scenario against a child server process.
// It returns within cfg.setup + cfg.deliver + the publishing time + a
// minute, with its conns closed and its child gone.
func runBroadcast(ctx context.Context, cfg broadcastConfig, progress io.Writer) (_ *BroadcastResult, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	publishBudget := 10 * time.Minute
	if cfg.rate > 0 {
		publishBudget = time.Duration(float64(cfg.m)/cfg.rate*float64(time.Second)) + time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.setup+publishBudget+cfg.deliver+time.Minute)
	defer cancel()
	setupCtx, setupCancel := context.WithTimeout(ctx, cfg.setup)
	defer setupCancel()

	child, err := startServer(setupCtx, idleConfig{interval: cfg.interval, timeout: cfg.timeout, serverCmd: cfg.serverCmd,
		serverArgs: []string{"-queue", strconv.Itoa(max(cfg.queue, 1))}}, progress)
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := child.stop(); err == nil && cerr != nil {
			err = cerr
		}
	}()

	var (
		lat        = new(latencies)
		delivered  atomic.Int64
		frames     atomic.Int64
		outOfOrder atomic.Int64
		dups       atomic.Int64
		lastAt     atomic.Int64 // unix ns of the latest delivery
		all        = make(chan struct{})
		allOnce    sync.Once
	)
	want := int64(cfg.n) * int64(cfg.m)
	pool := newClientPool(cfg.sources)
	pool.subprotocols = []string{tether.Subprotocol}
	pool.setup = func(ctx context.Context, c *websocket.Conn) error {
		if err := c.Write(ctx, websocket.MessageText, []byte(`{"op":"sub","topic":"bench","id":"1"}`)); err != nil {
			return err
		}
		for { // the welcome, then the ack
			_, data, err := c.Read(ctx)
			if err != nil {
				return err
			}
			if bytes.Contains(data, []byte(`"op":"ack"`)) {
				return nil
			}
		}
	}
	pool.newHandler = func() func([]byte) {
		sub := &subscriber{}
		return func(frame []byte) {
			now := time.Now().UnixNano()
			frames.Add(1)
			var n int64
			for line := range bytes.SplitSeq(frame, []byte("\n")) {
				t, i, ok := parseBench(line)
				if !ok {
					continue
				}
				n++
				lat.add(time.Duration(now - t))
				switch {
				case i == sub.next:
					sub.next++
				case i < sub.next:
					dups.Add(1)
				default:
					outOfOrder.Add(1)
					sub.next = i + 1
				}
			}
			if n > 0 {
				lastAt.Store(now)
				if delivered.Add(n) >= want {
					allOnce.Do(func() { close(all) })
				}
			}
		}
	}
	defer func() {
		if cerr := pool.close(10 * time.Second); err == nil && cerr != nil {
			err = cerr
		}
	}()
	fmt.Fprintf(progress, "tetherload: dialling %d subscribers to %s\n", cfg.n, child.addr)
	if err := pool.dialAll(setupCtx, "ws://"+child.addr+"/hub", cfg.n, cfg.concurrency); err != nil {
		return nil, err
	}
	sc := newStatsClient(child.addr)
	defer sc.close()

	fmt.Fprintf(progress, "tetherload: publishing %d messages of %d B\n", cfg.m, cfg.size)
	base, err := sc.get(ctx, "gc=0")
	if err != nil {
		return nil, err
	}
	start := time.Now()
	url := fmt.Sprintf("%s/publish?topic=bench&n=%d&size=%d&rate=%g", sc.base, cfg.m, cfg.size, cfg.rate)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := sc.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("publish: %s: %s", resp.Status, body)
	}
	publishSecs := time.Since(start).Seconds()
	select {
	case <-all:
	case <-time.After(cfg.deliver):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	st, err := sc.get(ctx, "gc=0")
	if err != nil {
		return nil, err
	}
	total := uint64(delivered.Load())
	res := &BroadcastResult{
		Subscribers: cfg.n,
		Messages:    cfg.m,
		Size:        cfg.size,
		Rate:        "max",
		Deliveries:  int64(total),
		Seconds:     time.Duration(lastAt.Load() - start.UnixNano()).Seconds(),
		PublishSecs: publishSecs,
		Frames:      frames.Load(),
		OutOfOrder:  outOfOrder.Load(),
		Duplicates:  dups.Load(),
		Missing:     max(want-int64(total), 0),
		Evicted:     st.HubEvictions - base.HubEvictions,
	}
	if cfg.rate > 0 {
		res.Rate = strconv.FormatFloat(cfg.rate, 'f', -1, 64) + "/s"
	}
	if total > 0 {
		res.PerSecond = float64(total) / res.Seconds
		ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
		res.P50ms = ms(lat.quantile(0.5, total))
		res.P99ms = ms(lat.quantile(0.99, total))
		res.MaxMS = ms(time.Duration(lat.max.Load()))
	}
	return res, nil
}

// parseBench reads t and i from a msg line of the bench topic:
// {"op":"msg",...,"data":{"t":<t>,"i":<i>,...}}.
func parseBench(line []byte) (t int64, i int, ok bool) {
	at := bytes.Index(line, []byte(`"data":{"t":`))
	if at < 0 {
		return 0, 0, false
	}
	rest := line[at+len(`"data":{"t":`):]
	end := bytes.IndexByte(rest, ',')
	if end < 0 {
		return 0, 0, false
	}
	t, err := strconv.ParseInt(string(rest[:end]), 10, 64)
	if err != nil {
		return 0, 0, false
	}
	rest = rest[end:]
	if !bytes.HasPrefix(rest, []byte(`,"i":`)) {
		return 0, 0, false
	}
	rest = rest[len(`,"i":`):]
	end = bytes.IndexByte(rest, ',')
	if end < 0 {
		return 0, 0, false
	}
	n, err := strconv.Atoi(string(rest[:end]))
	if err != nil {
		return 0, 0, false
	}
	return t, n, true
}
