package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestDeadpeer silences 10 of 30 conns under a 100 ms / 300 ms heartbeat:
// the server must end exactly those, by heartbeat, never before the
// timeout (less the ping's own trip and scheduler slack), and keep the
// others.
func TestDeadpeer(t *testing.T) {
	for _, name := range []string{"tether", "gorilla", "naive"} {
		t.Run(name, func(t *testing.T) { testDeadpeer(t, name) })
	}
}

// TestDeadpeerCentrifuge is TestDeadpeer against centrifuge, whose silent
// conns are bare clients speaking its JSON protocol; on its own, since its
// ends are reported 5 s late (see testDeadpeer).
func TestDeadpeerCentrifuge(t *testing.T) { testDeadpeer(t, "centrifuge") }

func testDeadpeer(t *testing.T, name string) {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	cfg := deadpeerConfig{
		n: 30, k: 10,
		loadFlags: loadFlags{
			// centrifuge checks for the pong only if timeout < 2 x interval.
			interval: 200 * time.Millisecond, timeout: 300 * time.Millisecond,
			sources: 49, concurrency: 16, setup: 10 * time.Second,
		},
	}
	res, err := runDeadpeer(ctx, cfg, implOf(t, name), t.Output())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: detection min %.0f p50 %.0f p99 %.0f max %.0f ms (timeout %v); server's view p50 %.0f max %.0f ms over %d",
		name, res.MinMS, res.P50MS, res.P99MS, res.MaxMS, cfg.timeout, res.ServerP50MS, res.ServerMaxMS, res.ServerKnown)
	if res.Detected != cfg.k || res.Undetected != 0 || res.EndedOtherwise != 0 {
		t.Errorf("%d of %d silent conns detected by heartbeat, %d ended otherwise, %d undetected",
			res.Detected, cfg.k, res.EndedOtherwise, res.Undetected)
	}
	if res.OthersEndedServer != 0 || res.OthersEndedClient != 0 || res.OpenAfter != int64(cfg.n-cfg.k) {
		t.Errorf("healthy conns: %d ended on the server, %d on the client, %d open; want 0, 0, %d",
			res.OthersEndedServer, res.OthersEndedClient, res.OpenAfter, cfg.n-cfg.k)
	}
	if res.HeartbeatTimeouts != int64(cfg.k) {
		t.Errorf("server counts %d heartbeat timeouts, want %d", res.HeartbeatTimeouts, cfg.k)
	}
	// The naive impl counts from the ping it sent, a little before
	// the client's pong; -race and a busy 2-core machine add more.
	if slack := 40 * time.Millisecond; res.MinMS < float64((cfg.timeout-slack)/time.Millisecond) {
		t.Errorf("a silent conn was declared dead %.0f ms after its last pong, before the timeout %v less %v", res.MinMS, cfg.timeout, slack)
	}
	if limit := cfg.timeout + 500*time.Millisecond; res.MaxMS > float64(limit/time.Millisecond) {
		// centrifuge reports the end of a peer it declared dead only
		// once it has waited up to 5 s for the close handshake that
		// a silent peer never sends: the serve side's end time is
		// late, not the detection.
		if name == "centrifuge" && res.MaxMS > 4500 {
			t.Logf("centrifuge: end reported %.0f ms after the last pong: the server logs it after its 5 s close wait", res.MaxMS)
		} else {
			t.Errorf("a silent conn was declared dead %.0f ms after its last pong, after the timeout %v + 500 ms", res.MaxMS, cfg.timeout)
		}
	}
	if len(res.DetectionsMS) != cfg.k {
		t.Errorf("%d detections listed, want %d", len(res.DetectionsMS), cfg.k)
	}
}

// TestChurn opens 40 conns/s, each held 200 ms, for 1 s beside 10 steady
// conns: the server must end with the baseline's conns open, every churned
// conn accepted, and no steady conn lost.
func TestChurn(t *testing.T) {
	for _, name := range []string{"tether", "gorilla"} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			cfg := churnConfig{
				rate: 40, duration: time.Second, hold: 200 * time.Millisecond, n0: 10,
				settle: time.Second, sample: 200 * time.Millisecond,
				loadFlags: loadFlags{
					interval: time.Second, timeout: 5 * time.Second,
					sources: 49, concurrency: 16, setup: 10 * time.Second,
				},
			}
			res, err := runChurn(ctx, cfg, implOf(t, name), t.Output())
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: %d churned, residual RSS %d B, heap %d B, goroutines %d, open %d; back after %.1fs",
				name, res.Opened, res.ResidualRSS, res.ResidualHeap, res.ResidualGoroutines, res.ResidualOpen, res.BackSecs)
			if res.Opened < 30 || res.DialFailed != 0 || res.Skipped != 0 {
				t.Errorf("%d churned conns opened, %d failed, %d skipped; want about 40, 0, 0", res.Opened, res.DialFailed, res.Skipped)
			}
			if res.End.Open != int64(cfg.n0) || res.ResidualOpen != 0 || res.BackSecs < 0 {
				t.Errorf("%d conns open at the end (residual %d, back after %.1fs), want the baseline's %d", res.End.Open, res.ResidualOpen, res.BackSecs, cfg.n0)
			}
			if res.Accepted != res.Opened {
				t.Errorf("server accepted %d conns during the run, want the %d opened", res.Accepted, res.Opened)
			}
			if res.SteadyLost != 0 || res.ChurnLost != 0 || res.End.HeartbeatTimeouts != 0 {
				t.Errorf("%d steady and %d churned conns ended early, %d by heartbeat; want none", res.SteadyLost, res.ChurnLost, res.End.HeartbeatTimeouts)
			}
			// Goroutines return to the baseline, give or take the server's
			// own housekeeping.
			if res.ResidualGoroutines > 5 {
				t.Errorf("%d goroutines more than at the baseline after the churn", res.ResidualGoroutines)
			}
			if len(res.Samples) == 0 || res.PeakOpen <= int64(cfg.n0) {
				t.Errorf("%d samples, peak open %d: the churn was not seen", len(res.Samples), res.PeakOpen)
			}
		})
	}
}

// TestStorm kills the server under 30 reconnecting clients and restarts
// it on the same port: every client must come back, whether it is
// tether.Dial, the plain 1 s redial loop or centrifuge-go.
func TestStorm(t *testing.T) {
	for _, name := range []string{"tether", "gorilla", "centrifuge"} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 25*time.Second)
			defer cancel()
			const n = 30
			cfg := stormConfig{
				n: n,
				loadFlags: loadFlags{
					interval: time.Second, timeout: 5 * time.Second,
					sources: 49, concurrency: 16, setup: 10 * time.Second,
				},
				wait: 10 * time.Second, window: 100 * time.Millisecond,
			}
			res, err := runStorm(ctx, cfg, implOf(t, name), t.Output())
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: restarted in %.3fs, all back after %.3fs, %d accepts, peak %d per 100 ms, mean %.1f, %d dials",
				name, res.StartSecs, res.AllBackSecs, res.Accepts, res.Peak, res.Mean, res.DialsAfter)
			if !res.AllBack || res.Open != n {
				t.Fatalf("%d of %d clients back", res.Open, n)
			}
			if res.Accepts < n || res.Peak < 1 || res.Peak > res.Accepts || res.Mean <= 0 {
				t.Errorf("implausible accepts: %d, peak %d, mean %.1f", res.Accepts, res.Peak, res.Mean)
			}
			if res.DialsAfter < n {
				t.Errorf("%d client dials after the crash, want at least one per client (%d)", res.DialsAfter, n)
			}
		})
	}
}

// TestScenarioCLI runs deadpeer through the command line against two impls
// with -json: one document, both runs, and the ratio rows.
func TestScenarioCLI(t *testing.T) {
	// The server child's stderr is copied into errOut by a goroutine of
	// os/exec, beside the scenario's own progress lines.
	var out bytes.Buffer
	var errOut lockedBuffer
	code := run([]string{"deadpeer", "-impl", "tether,naive", "-n", "10", "-k", "3",
		"-interval", "100ms", "-timeout", "300ms", "-json"}, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit code %d; stderr:\n%s", code, errOut.String())
	}
	var doc struct {
		Scenario string `json:"scenario"`
		Runs     []struct {
			Impl   string          `json:"impl"`
			Result json.RawMessage `json:"result"`
			Error  string          `json:"error"`
		} `json:"runs"`
		Ratios []RatioRow `json:"ratios"`
	}
	if err := json.Unmarshal(out.Bytes(), &doc); err != nil {
		t.Fatalf("%v in:\n%s", err, out.String())
	}
	if doc.Scenario != "deadpeer" || len(doc.Runs) != 2 || doc.Runs[0].Impl != "tether" || doc.Runs[1].Impl != "naive" {
		t.Fatalf("unexpected document:\n%s", out.String())
	}
	for _, r := range doc.Runs {
		var res DeadpeerResult
		if err := json.Unmarshal(r.Result, &res); err != nil || r.Error != "" || res.Detected != 3 {
			t.Errorf("impl %s: error %q, result %s", r.Impl, r.Error, r.Result)
		}
	}
	if len(doc.Ratios) == 0 {
		t.Fatal("no ratio rows")
	}
	for _, row := range doc.Ratios {
		if row.Values["tether"] == nil || row.Values["naive"] == nil {
			t.Errorf("row %q: values %v", row.Figure, row.Values)
		}
	}
	if p := doc.Ratios[0].Ratios["naive"]; p == nil || *p <= 0 {
		t.Errorf("no ratio tether/naive for %q", doc.Ratios[0].Figure)
	}
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestImplFlag(t *testing.T) {
	names := func(f implFlag) string {
		t.Helper()
		specs, err := f.parse(new(bytes.Buffer))
		if err != nil {
			return "error"
		}
		var s []string
		for _, im := range specs {
			s = append(s, im.name)
		}
		return strings.Join(s, ",")
	}
	for _, c := range []struct {
		value               string
		allowConn, allowRaw bool
		want                string
	}{
		{"tether", false, false, "tether"},
		{"all", false, false, "tether,centrifuge,melody,gorilla,naive"},
		{"all", false, true, "tether,centrifuge,melody,gorilla,naive"},
		{"gorilla, tether,gorilla", false, false, "gorilla,tether"},
		{"tether-conn", true, false, "tether-conn"},
		{"tether-conn", false, false, "error"},
		{"tether-raw,centrifuge", false, true, "tether-raw,centrifuge"},
		{"tether-raw", true, false, "error"},
		{"nope", false, false, "error"},
		{"list", false, false, ""},
	} {
		if got := names(implFlag{value: c.value, allowConn: c.allowConn, allowRaw: c.allowRaw}); got != c.want {
			t.Errorf("-impl %q (tether-conn allowed: %v, tether-raw: %v): %q, want %q", c.value, c.allowConn, c.allowRaw, got, c.want)
		}
	}
	var out bytes.Buffer
	if code := run([]string{"storm", "-impl", "list"}, &out, &out); code != 0 || !strings.Contains(out.String(), "centrifuge") {
		t.Errorf("storm -impl list: exit %d, output %q", code, out.String())
	}
	if code := run([]string{"churn", "-impl", "tether-conn"}, &out, &out); code != 1 {
		t.Errorf("churn -impl tether-conn: exit %d, want 1", code)
	}
	if code := run([]string{"idle", "-impl", "tether-raw"}, &out, &out); code != 1 {
		t.Errorf("idle -impl tether-raw: exit %d, want 1", code)
	}
	out.Reset()
	if code := run([]string{"broadcast", "-impl", "list"}, &out, &out); code != 0 || !strings.Contains(out.String(), "tether-raw") {
		t.Errorf("broadcast -impl list: exit %d, output %q", code, out.String())
	}
	for _, args := range [][]string{{"broadcast", "-pin", "0,0"}, {"broadcast", "-window", "10", "-rate", "5"}, {"broadcast", "-window", "-1"}} {
		if code := run(args, &out, &out); code != 1 {
			t.Errorf("%q: exit %d, want 1", args, code)
		}
	}
	for _, args := range [][]string{{"overload", "-pin", "0,0"}, {"overload", "-hirate", "0"}, {"overload", "-breaker", "-1s"}} {
		if code := run(args, &out, &out); code != 1 {
			t.Errorf("%q: exit %d, want 1", args, code)
		}
	}
}

func TestPeakIn(t *testing.T) {
	ms := int64(time.Millisecond)
	at := []int64{0, 10 * ms, 50 * ms, 99 * ms, 100 * ms, 150 * ms, 500 * ms}
	if got := peakIn(at, 100*time.Millisecond); got != 4 {
		t.Errorf("peakIn = %d, want 4 (0, 10, 50, 99 ms)", got)
	}
	if got := peakIn(nil, 100*time.Millisecond); got != 0 {
		t.Errorf("peakIn(nil) = %d", got)
	}
}

func TestScanBench(t *testing.T) {
	m1 := benchMessage(nil, 111, 1, 64)
	m2 := benchMessage(nil, 222, 2, 64)
	tetherFrame := append(append(append([]byte(`{"op":"msg","topic":"bench","epoch":"e","seq":1,"data":`), m1...), "}\n"...),
		append(append([]byte(`{"op":"msg","topic":"bench","epoch":"e","seq":2,"data":`), m2...), '}')...)
	centrifugePush := append(append([]byte(`{"push":{"channel":"bench","pub":{"data":`), m1...), "}}}"...)
	for name, c := range map[string]struct {
		frame []byte
		want  []benchMsg
	}{
		"tether":     {tetherFrame, []benchMsg{{111, 1}, {222, 2}}},
		"gorilla":    {append(append(append([]byte{}, m1...), '\n'), m2...), []benchMsg{{111, 1}, {222, 2}}},
		"naive":      {m2, []benchMsg{{222, 2}}},
		"centrifuge": {centrifugePush, []benchMsg{{111, 1}}},
		"welcome":    {[]byte(`{"op":"welcome","v":1}`), nil},
	} {
		got := scanBench(c.frame, nil)
		if len(got) != len(c.want) {
			t.Errorf("%s: %v, want %v", name, got, c.want)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("%s: %v, want %v", name, got, c.want)
			}
		}
	}
	if !centrifugePing([]byte("{}")) || !centrifugePing([]byte(`{"push":{}}`+"\n{}")) || centrifugePing([]byte(`{"id":1}`)) {
		t.Error("centrifugePing")
	}
}

func TestRatioTable(t *testing.T) {
	a := &BroadcastResult{PerSecond: 2000, P50ms: 1, P99ms: 2, HeartbeatDrops: 0}
	b := &BroadcastResult{PerSecond: 1000, P50ms: 2, P99ms: 8, HeartbeatDrops: 3}
	rows := ratioRows([]string{"tether", "gorilla"}, []implResult{a, b})
	if len(rows) != 5 {
		t.Fatalf("%d rows", len(rows))
	}
	want := []float64{2, 0.5, 0.25, 0}
	for i, r := range rows[:4] {
		if p := r.Ratios["gorilla"]; p == nil || *p != want[i] {
			t.Errorf("%s: ratio %v, want %v", r.Figure, p, want[i])
		}
	}
	if p := rows[4].Ratios["gorilla"]; p != nil { // 0 / 0
		t.Errorf("%s: ratio %v, want none", rows[4].Figure, *p)
	}
	var out bytes.Buffer
	if err := printRatios(&out, []string{"tether", "gorilla"}, rows); err != nil || !strings.Contains(out.String(), "deliveries/s") {
		t.Errorf("printRatios: %v\n%s", err, out.String())
	}
	if rows := ratioRows([]string{"gorilla"}, []implResult{b}); rows != nil {
		t.Errorf("ratios without tether: %v", rows)
	}
}

// TestRoom joins 50 conns with users of their own to one topic of a hub
// with presence at its defaults, as v1 peers and as raw peers: none lost,
// every v1 peer told presence and its count reaching 50, and the raw
// peers subscribed by the server.
func TestRoom(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 40*time.Second)
	defer cancel()
	const n = 50
	cfg := roomConfig{
		n: n, handshake: 10 * time.Second, settle: 300 * time.Millisecond, converge: 10 * time.Second,
		loadFlags: loadFlags{
			interval: time.Second, timeout: 5 * time.Second,
			sources: 49, concurrency: 64, setup: 20 * time.Second,
		},
	}
	for _, peers := range []string{"v1", "raw"} {
		t.Run(peers, func(t *testing.T) {
			res, err := runRoom(ctx, cfg, peers, t.Output())
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			if err := res.print(&out); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s", out.String())
			if res.Joined != n || res.Failed != 0 || res.Dropped != 0 || res.NotDialled != 0 || res.TimedOut {
				t.Errorf("%d of %d joined, %d failed, %d dropped, %d not dialled, timed out %v; want all joined, none lost",
					res.Joined, n, res.Failed, res.Dropped, res.NotDialled, res.TimedOut)
			}
			if res.ServerOpen != n || res.ServerHeartbeats != 0 || res.ServerOtherEnds != 0 || res.ServerEvictions != 0 {
				t.Errorf("server: %d open, %d heartbeat timeouts, %d other ends, %d evicted; want %d, 0, 0, 0",
					res.ServerOpen, res.ServerHeartbeats, res.ServerOtherEnds, res.ServerEvictions, n)
			}
			if res.JoinSecs <= 0 || res.JoinSecs < res.HandshakeSecs {
				t.Errorf("join took %.3fs, handshakes %.3fs", res.JoinSecs, res.HandshakeSecs)
			}
			switch peers {
			case "v1":
				if res.CountsWrong != 0 || res.ConvergeSecs < 0 {
					t.Errorf("%d counts not at %d (%d never told), converged after %.2fs", res.CountsWrong, n, res.CountsUnknown, res.ConvergeSecs)
				}
				// Every peer is sent a snapshot at least, in a listed room
				// (50 < 100) with the members in it.
				if res.PresenceSnapshots < n || res.PresenceMsgs < res.PresenceSnapshots || res.BytesPerJoin <= 0 {
					t.Errorf("presence: %d messages, %d snapshots, %.1f B/join", res.PresenceMsgs, res.PresenceSnapshots, res.BytesPerJoin)
				}
			case "raw":
				if res.ServerSubscribed != n || res.PresenceMsgs != 0 {
					t.Errorf("server subscribed %d raw peers, want %d; %d presence messages read, want 0", res.ServerSubscribed, n, res.PresenceMsgs)
				}
			}
		})
	}
}

func TestPresenceCount(t *testing.T) {
	for _, c := range []struct {
		line     string
		prev     int64
		snapshot bool
		want     int64
	}{
		{`{"op":"presence","topic":"bench","count":19000}`, 18000, false, 19000},
		{`{"op":"presence","topic":"bench","count":120,"snapshot":true,"joins":[]}`, -1, true, 120},
		{`{"op":"presence","topic":"bench","count":3,"joins":[{"user":"u1"}],"leaves":[]}`, 2, false, 3},
		// Before count existed: the first is the snapshot, then changes.
		{`{"op":"presence","topic":"bench","joins":[{"user":"u1"},{"user":"u2"}],"leaves":[]}`, -1, false, 2},
		{`{"op":"presence","topic":"bench","joins":[{"user":"u3"}],"leaves":[{"user":"u1"},{"user":"u2"}]}`, 2, false, 1},
		{`{"op":"presence","topic":"bench","joins":[{"user":"u3","meta":{"d":1}}],"leaves":[]}`, 5, false, 6},
	} {
		if got := presenceCount([]byte(c.line), c.prev, c.snapshot); got != c.want {
			t.Errorf("presenceCount(%s, %d) = %d, want %d", c.line, c.prev, got, c.want)
		}
	}
}

// TestOverload floods lo at 2,000/s beside hi at 20/s to 50 v1 conns for
// 2 s, with the breaker at 20 ms and without: every hi delivery arrives,
// no conn is dropped, and without the breaker nothing is shed. Whether
// the breaker opens depends on the machine: not checked.
func TestOverload(t *testing.T) {
	for _, trip := range []time.Duration{20 * time.Millisecond, 0} {
		t.Run(fmt.Sprint("breaker=", trip), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 40*time.Second)
			defer cancel()
			const n = 50
			cfg := overloadConfig{
				n: n, duration: 2 * time.Second, loRate: 2000, hiRate: 20, size: 64, breaker: trip, queue: 256,
				deliver: 10 * time.Second, quiet: 3 * time.Second, sample: 100 * time.Millisecond, probe: 500 * time.Millisecond,
				handshake: 10 * time.Second,
				loadFlags: loadFlags{
					interval: time.Second, timeout: 5 * time.Second,
					sources: 49, concurrency: 16, setup: 15 * time.Second,
				},
			}
			res, err := runOverload(ctx, cfg, t.Output())
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			if err := res.print(&out); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s", out.String())
			if res.HiPublished < 20 || res.HiReceived != res.HiExpected || res.HiMissing != 0 || res.HiExpected != res.HiPublished*n {
				t.Errorf("hi: %d published, %d of %d received, %d missing; want every one", res.HiPublished, res.HiReceived, res.HiExpected, res.HiMissing)
			}
			if res.Dropped != 0 || res.HeartbeatTimeouts != 0 || res.Evictions != 0 || res.OpenAtEnd != n {
				t.Errorf("%d conns dropped, %d heartbeat timeouts, %d evictions, %d open; want 0, 0, 0, %d",
					res.Dropped, res.HeartbeatTimeouts, res.Evictions, res.OpenAtEnd, n)
			}
			if res.LoPublished == 0 || res.Samples == 0 || res.HiP99ms <= 0 {
				t.Errorf("%d lo published, %d samples, hi p99 %.2f ms", res.LoPublished, res.Samples, res.HiP99ms)
			}
			if trip == 0 && (res.Shed != 0 || res.Overloads != 0 || res.ProbeRefused != 0) {
				t.Errorf("no breaker, yet %d shed, %d openings, %d probes refused", res.Shed, res.Overloads, res.ProbeRefused)
			}
			if res.LoReceived+int64(res.Shed)+int64(res.QueueDrops) == 0 {
				t.Error("lo neither received, shed nor dropped")
			}
		})
	}
}

// TestStormAdmission is TestStorm against a tether server that admits 10
// handshakes a second: every client back, some refused, none gave up.
func TestStormAdmission(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 40*time.Second)
	defer cancel()
	const n = 30
	cfg := stormConfig{
		n: n, admission: 10,
		loadFlags: loadFlags{
			interval: time.Second, timeout: 5 * time.Second,
			sources: 49, concurrency: 16, setup: 20 * time.Second,
		},
		wait: 15 * time.Second, window: 100 * time.Millisecond,
	}
	res, err := runStorm(ctx, cfg, implOf(t, "tether"), t.Output())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("all back after %.3fs, %d refused, peak %d per 1 s, %d gave up", res.AllBackSecs, res.Refused, res.PeakPerSec, res.GaveUp)
	if !res.AllBack || res.Open != n || res.GaveUp != 0 {
		t.Fatalf("%d of %d clients back, %d gave up", res.Open, n, res.GaveUp)
	}
	if res.Refused == 0 || res.Admission != 10 {
		t.Errorf("%d handshakes refused at admission %v: want some", res.Refused, res.Admission)
	}
	if _, err := runStorm(ctx, cfg, implOf(t, "gorilla"), t.Output()); err == nil {
		t.Error("storm -admission against gorilla: no error")
	}
}
