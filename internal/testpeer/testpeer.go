// Package testpeer is the WebSocket peer of tether's tests: a
// coder/websocket client on a real socket that reads in the background,
// as a well-behaved peer does, and lets a test look at what it read.
//
// A Peer runs one reader goroutine, which it owns: Close stops it and
// waits for it, and New has the test's cleanup call Close. The reader
// cuts every message it reads into lines (each message is one line unless
// Options.Lines is set), hands each line to Options.OnLine, queues it for
// Next and Messages, and counts messages and lines. Options.Gate holds the
// reader back, so that a test can let the peer's TCP buffers fill, and
// the peer records every ping it gets.
//
// It knows nothing of tether: the protocol v1 helpers of the root
// package's tests are thin layers over it. It is modelled on
// coder/websocket's internal/test/wstest.
package testpeer

import (
	"bytes"
	"context"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// DefaultBuffer is how many lines Messages buffers when Options.Buffer
// is 0.
const DefaultBuffer = 1000

// sendTimeout bounds Send.
const sendTimeout = 5 * time.Second

// Options configure a Peer. The zero value is a peer that offers no
// subprotocol, reads messages of any size, answers pings, and queues up to
// DefaultBuffer messages.
type Options struct {
	Subprotocols []string    // offered in the handshake
	Header       http.Header // sent with the handshake request

	// ReadLimit is the largest message the peer reads; 0 means no limit.
	ReadLimit int64

	// Handshake, if set, runs on the conn after the dial and before the
	// reader starts, with the dial's context; an error fails the dial.
	Handshake func(ctx context.Context, ws *websocket.Conn) error

	// Gate, if set, holds the reader back until it is closed: until then
	// the peer reads nothing, answers no ping and its TCP buffers fill. A
	// gate that is never closed makes a peer that never reads.
	Gate <-chan struct{}

	// Lines splits every message into lines at '\n' and skips the empty
	// ones, as protocol v1 frames its messages. Without it, a message is
	// one line.
	Lines bool

	// OnLine, if set, gets every line on the reader before it is queued.
	// An error ends the reader: Err returns it, and the line is not
	// queued.
	OnLine func(line []byte) error

	// Buffer is how many lines Messages holds; the reader waits while it
	// is full. 0 means DefaultBuffer. Negative means no queue: lines reach
	// OnLine only, and Messages returns nil.
	Buffer int

	// NoPong makes the peer a zombie: it answers no ping.
	NoPong bool
	// PongDelay, if set, is how long the reader sleeps before it answers
	// a ping.
	PongDelay func() time.Duration
}

// Peer is one WebSocket client conn and its reader.
type Peer struct {
	ws    *websocket.Conn
	msgs  chan []byte
	quit  chan struct{} // closed by Close: unblocks the reader
	done  chan struct{} // closed when the reader has returned
	close sync.Once

	frames   atomic.Int64 // messages read
	lines    atomic.Int64 // lines in them
	maxLines atomic.Int64 // most lines in one message

	mu    sync.Mutex
	pings []time.Time
	err   error // why the reader returned; set before done is closed
}

// Dial connects a Peer to url and starts its reader. The caller must
// Close it. On a failed handshake the response, if any, is returned with
// the error.
func Dial(ctx context.Context, url string, o Options) (*Peer, *http.Response, error) {
	p := &Peer{quit: make(chan struct{}), done: make(chan struct{})}
	switch {
	case o.Buffer == 0:
		p.msgs = make(chan []byte, DefaultBuffer)
	case o.Buffer > 0:
		p.msgs = make(chan []byte, o.Buffer)
	}
	ws, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPHeader:   o.Header,
		Subprotocols: o.Subprotocols,
		OnPingReceived: func(context.Context, []byte) bool {
			p.mu.Lock()
			p.pings = append(p.pings, time.Now())
			p.mu.Unlock()
			if o.PongDelay != nil {
				if d := o.PongDelay(); d > 0 {
					time.Sleep(d)
				}
			}
			return !o.NoPong
		},
	})
	if err != nil {
		return nil, resp, err
	}
	if o.ReadLimit > 0 {
		ws.SetReadLimit(o.ReadLimit)
	} else {
		ws.SetReadLimit(-1)
	}
	p.ws = ws
	if o.Handshake != nil {
		if err := o.Handshake(ctx, ws); err != nil {
			ws.CloseNow()
			return nil, resp, err
		}
	}
	go p.read(o)
	return p, resp, nil
}

// New dials like Dial, within 10 s, and fails the test if that fails. The
// peer is closed when the test ends.
func New(t testing.TB, url string, o Options) *Peer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, resp, err := Dial(ctx, url, o)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s: %v (HTTP %d)", url, err, status)
	}
	t.Cleanup(p.Close)
	return p
}

func (p *Peer) read(o Options) {
	defer close(p.done)
	if o.Gate != nil {
		select {
		case <-o.Gate:
		case <-p.quit:
			return
		}
	}
	for {
		_, data, err := p.ws.Read(context.Background())
		if err != nil {
			p.end(err)
			return
		}
		n := int64(0)
		for line := range split(data, o.Lines) {
			n++
			if o.OnLine != nil {
				if err := o.OnLine(line); err != nil {
					p.end(err)
					return
				}
			}
			if p.msgs == nil {
				continue
			}
			select {
			case p.msgs <- line:
			case <-p.quit:
				return
			}
		}
		p.frames.Add(1)
		p.lines.Add(n)
		for {
			m := p.maxLines.Load()
			if n <= m || p.maxLines.CompareAndSwap(m, n) {
				break
			}
		}
	}
}

// split yields the lines of a message.
func split(data []byte, lines bool) func(yield func([]byte) bool) {
	return func(yield func([]byte) bool) {
		if !lines {
			yield(data)
			return
		}
		for line := range bytes.SplitSeq(data, []byte("\n")) {
			if len(line) > 0 && !yield(line) {
				return
			}
		}
	}
}

func (p *Peer) end(err error) {
	p.mu.Lock()
	p.err = err
	p.mu.Unlock()
}

// Close drops the conn without a close handshake and waits for the
// reader to return. It may be called more than once, from any goroutine.
func (p *Peer) Close() {
	p.close.Do(func() {
		close(p.quit)
		p.ws.CloseNow()
		<-p.done
	})
}

// Conn returns the peer's conn, for writes, pings and closes of its own.
// Only the peer's reader may read from it.
func (p *Peer) Conn() *websocket.Conn { return p.ws }

// Send writes one message, within 5 s.
func (p *Peer) Send(typ websocket.MessageType, data []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), sendTimeout)
	defer cancel()
	return p.ws.Write(ctx, typ, data)
}

// Messages returns the queue of lines read and not yet taken, or nil if
// Options.Buffer is negative. When the reader has returned, it holds the
// lines read before.
func (p *Peer) Messages() <-chan []byte { return p.msgs }

// TryNext returns the next line read, waiting up to limit; ok is false if
// none came.
func (p *Peer) TryNext(limit time.Duration) (line []byte, ok bool) {
	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case line := <-p.msgs:
		return line, true
	case <-timer.C:
		return nil, false
	}
}

// Next returns the next line read, failing the test if none comes within
// limit.
func (p *Peer) Next(t testing.TB, limit time.Duration) []byte {
	t.Helper()
	line, ok := p.TryNext(limit)
	if !ok {
		t.Fatalf("peer received no message within %v", limit)
	}
	return line
}

// Done is closed when the reader has returned.
func (p *Peer) Done() <-chan struct{} { return p.done }

// Err returns why the reader returned: the read error, or the error of
// Options.OnLine. It is nil while the reader runs, and if Close stopped
// it at its gate or at a full queue.
func (p *Peer) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// ReadErr waits for the reader to return and returns why, failing the
// test if it still reads after limit.
func (p *Peer) ReadErr(t testing.TB, limit time.Duration) error {
	t.Helper()
	select {
	case <-p.done:
		return p.Err()
	default:
	}
	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case <-p.done:
	case <-timer.C:
		t.Fatalf("peer still reading after %v", limit)
	}
	return p.Err()
}

// Frames returns how many messages the reader has read.
func (p *Peer) Frames() int64 { return p.frames.Load() }

// Lines returns how many lines the reader has read.
func (p *Peer) Lines() int64 { return p.lines.Load() }

// MaxLines returns the most lines the reader has read in one message.
func (p *Peer) MaxLines() int64 { return p.maxLines.Load() }

// PingCount returns how many pings the peer has received.
func (p *Peer) PingCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pings)
}

// Pings returns when the peer received each ping, in order.
func (p *Peer) Pings() []time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]time.Time(nil), p.pings...)
}
