package interop_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// nodeLimit bounds the life of every Node process a test starts.
const nodeLimit = 30 * time.Second

// event is one line a Node script wrote on stdout. Fields are those of
// every event kind; each kind uses some.
type event struct {
	Ev       string          `json:"ev"`
	WS       string          `json:"ws"`
	Protocol string          `json:"protocol"`
	Text     *string         `json:"text"`
	Binary   string          `json:"binary"`
	Code     int             `json:"code"`
	Reason   string          `json:"reason"`
	Error    json.RawMessage `json:"error"`

	// The JS client's events (node/client.mjs).
	State     string          `json:"state"`
	Topic     string          `json:"topic"`
	Epoch     string          `json:"epoch"`
	Seq       *uint64         `json:"seq"`
	Data      json.RawMessage `json:"data"`
	Heartbeat *struct {
		IntervalMS int64 `json:"interval_ms"`
		TimeoutMS  int64 `json:"timeout_ms"`
	} `json:"heartbeat"`
	Session string          `json:"session"`
	RTT     float64         `json:"rtt"`
	Joins   []member        `json:"joins"`
	Leaves  []member        `json:"leaves"`
	Step    string          `json:"step"`
	OK      bool            `json:"ok"`
	Value   json.RawMessage `json:"value"`

	// A presence event's count: nil when it has none, to tell it from 0.
	Count    *int `json:"count"`
	Snapshot bool `json:"snapshot"`

	line string
}

func (e event) String() string { return e.line }

// nodeProc is a Node script the test drives: commands on its stdin,
// events on its stdout, one JSON object per line each way.
type nodeProc struct {
	t      testing.TB
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr lockedBuffer
	cancel context.CancelFunc
	exited chan struct{} // closed once the process has exited and stdout is drained

	mu     sync.Mutex
	events []event
	notify chan struct{}
	err    error // from Wait; set before exited is closed
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// checkNodeModules fails the test, never skips it, when the Node packages
// are not installed.
func checkNodeModules(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatalf("node is not on PATH (Node.js 20 or later is needed): %v", err)
	}
	if _, err := os.Stat(filepath.Join("node", "node_modules", "ws", "package.json")); err != nil {
		t.Fatalf("the Node packages of interop/node are not installed (%v): run: cd interop/node && npm ci", err)
	}
}

// startNode runs `node script args...` in interop/node, for at most
// nodeLimit. When the test ends, its stdin is closed, which makes the
// script close its socket and exit; a script that does not exit within a
// few seconds is killed and fails the test.
func startNode(t testing.TB, script string, args ...string) *nodeProc {
	t.Helper()
	checkNodeModules(t)
	ctx, cancel := context.WithTimeout(context.Background(), nodeLimit)
	cmd := exec.CommandContext(ctx, "node", append([]string{script}, args...)...)
	cmd.Dir = "node"
	cmd.WaitDelay = 2 * time.Second
	p := &nodeProc{t: t, name: script, cmd: cmd, cancel: cancel, exited: make(chan struct{}), notify: make(chan struct{})}
	cmd.Stderr = &p.stderr
	var err error
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("node %s: %v", script, err)
	}
	go p.read(stdout)
	t.Cleanup(p.stop)
	return p
}

func (p *nodeProc) read(stdout io.Reader) {
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Text()
		var e event
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			e = event{Ev: "garbage", Reason: err.Error()}
		}
		e.line = line
		p.mu.Lock()
		p.events = append(p.events, e)
		p.changedLocked()
		p.mu.Unlock()
	}
	err := p.cmd.Wait()
	p.mu.Lock()
	p.err = err
	p.changedLocked()
	p.mu.Unlock()
	close(p.exited)
}

func (p *nodeProc) changedLocked() {
	close(p.notify)
	p.notify = make(chan struct{})
}

// stop ends the script (closing its stdin asks it to) and reports how it
// went.
func (p *nodeProc) stop() {
	p.t.Helper()
	defer p.cancel()
	p.stdin.Close()
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		p.cancel() // kills the process
		<-p.exited
		p.t.Errorf("node %s did not exit when its stdin closed", p.name)
	}
	p.mu.Lock()
	err := p.err
	p.mu.Unlock()
	if err != nil || p.t.Failed() {
		p.t.Logf("node %s exited: %v\n--- its stdout:\n%s--- its stderr:\n%s", p.name, err, p.transcript(), p.stderr.String())
	}
	if err != nil {
		p.t.Errorf("node %s failed: %v", p.name, err)
	}
}

func (p *nodeProc) transcript() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b strings.Builder
	for _, e := range p.events {
		b.WriteString(e.line)
		b.WriteByte('\n')
	}
	return b.String()
}

// command writes one command line to the script.
func (p *nodeProc) command(c map[string]any) {
	p.t.Helper()
	b, err := json.Marshal(c)
	if err != nil {
		p.t.Fatal(err)
	}
	if _, err := p.stdin.Write(append(b, '\n')); err != nil {
		p.t.Fatalf("node %s: writing %s: %v", p.name, b, err)
	}
}

// waitFor waits up to d for an event at index from or later that match
// accepts, and returns it with its index. A fatal event, or the process
// exiting, fails the test at once.
func (p *nodeProc) waitFor(from int, d time.Duration, what string, match func(event) bool) (event, int) {
	p.t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		p.mu.Lock()
		for i := from; i < len(p.events); i++ {
			e := p.events[i]
			if e.Ev == "fatal" {
				p.mu.Unlock()
				p.t.Fatalf("node %s failed: %s", p.name, e.Error)
			}
			if match(e) {
				p.mu.Unlock()
				return e, i
			}
		}
		from = len(p.events)
		ch, exited := p.notify, p.err != nil || isClosed(p.exited)
		p.mu.Unlock()
		if exited {
			p.t.Fatalf("node %s exited (%v) while the test waited for %s", p.name, p.exitErr(), what)
		}
		select {
		case <-ch:
		case <-timer.C:
			p.t.Fatalf("node %s: after %v, still waiting for %s", p.name, d, what)
		}
	}
}

func (p *nodeProc) exitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// wait waits for an event of kind ev at index from or later.
func (p *nodeProc) wait(from int, ev string, d time.Duration) (event, int) {
	p.t.Helper()
	return p.waitFor(from, d, "event "+ev, func(e event) bool { return e.Ev == ev })
}

// count counts the events of kind ev so far.
func (p *nodeProc) count(ev string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, e := range p.events {
		if e.Ev == ev {
			n++
		}
	}
	return n
}

// find returns the first event so far that match accepts, and its
// index, or -1.
func (p *nodeProc) find(match func(event) bool) (event, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, e := range p.events {
		if match(e) {
			return e, i
		}
	}
	return event{}, -1
}

// all returns the events so far.
func (p *nodeProc) all() []event {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.events)
}

// len is the number of events so far.
func (p *nodeProc) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.events)
}

// waitExit waits for the script to exit by itself.
func (p *nodeProc) waitExit(d time.Duration) error {
	p.t.Helper()
	select {
	case <-p.exited:
		return p.exitErr()
	case <-time.After(d):
		p.t.Fatalf("node %s did not exit within %v", p.name, d)
		return errors.New("unreachable")
	}
}

// checkWSVersion checks that the ws package the script loaded is 8.16 or
// later, the first with the autoPong option.
func checkWSVersion(t testing.TB, ready event) {
	t.Helper()
	var major, minor int
	if _, err := fmt.Sscanf(ready.WS, "%d.%d", &major, &minor); err != nil || major < 8 || major == 8 && minor < 16 {
		t.Fatalf("ws %q: need 8.16 or later; run: cd interop/node && npm ci", ready.WS)
	}
	t.Logf("Node %s, ws %s", nodeVersion(), ready.WS)
}

var nodeVersion = sync.OnceValue(func() string {
	out, err := exec.Command("node", "--version").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
})
