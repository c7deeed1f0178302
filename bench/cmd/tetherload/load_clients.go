package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	centrifuge "github.com/centrifugal/centrifuge-go"
	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// The load side's clients, one adapter per server impl, all in this file:
// what a user of each library would connect with. Every scenario dials
// through an adapter and a source, so that the impls are driven alike.

// source is one source IP that load conns are dialled from: the server
// sees 127.0.0.2 .. 127.0.0.50, so that no address runs out of ports.
type source struct {
	ip    net.IP
	d     *net.Dialer
	hc    *http.Client // for coder/websocket and tether.Dial
	dials *atomic.Int64
}

// dialContext makes one TCP conn from the source IP, counting it: a
// reconnecting client's attempts are its TCP dials.
func (s *source) dialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	s.dials.Add(1)
	return s.d.DialContext(ctx, network, addr)
}

// sources is the set of source IPs a scenario dials from, round-robin.
type sources struct {
	list  []*source
	dials atomic.Int64 // TCP dials made from any of them
}

func newSources(n int) *sources {
	ss := &sources{}
	for i := range n {
		s := &source{
			ip:    net.IPv4(127, 0, 0, byte(2+i)),
			dials: &ss.dials,
		}
		s.d = &net.Dialer{LocalAddr: &net.TCPAddr{IP: s.ip}, Timeout: 10 * time.Second}
		s.hc = &http.Client{Transport: &http.Transport{DialContext: s.dialContext}}
		ss.list = append(ss.list, s)
	}
	return ss
}

func (ss *sources) pick(i int) *source { return ss.list[i%len(ss.list)] }

func (ss *sources) close() {
	for _, s := range ss.list {
		s.hc.CloseIdleConnections()
	}
}

// benchMsg is one benchMessage as a client received it.
type benchMsg struct {
	t int64 // unix ns just before the server's publish call
	i int   // index in the publication run
}

// connHandlers are what a load conn reports. The callbacks of one conn
// are called one at a time.
type connHandlers struct {
	// recv gets the bench messages of each WebSocket message the conn
	// read (centrifuge-go: of each publication; it does not show frames),
	// with the time it was read.
	recv func(now int64, msgs []benchMsg)
	// ended is called once if the conn ends other than by close: the
	// server ended it, or the network did.
	ended func()
	// bare: the conn is a bare coder/websocket conn, able to go silent and
	// as light as a client gets. centrifuge-go cannot stop answering pings,
	// so with bare the centrifuge adapter speaks centrifuge's JSON protocol
	// by hand instead.
	bare bool
}

// loadConn is one client conn of a scenario, subscribed to the bench
// topic where the impl has topics.
type loadConn interface {
	// local is the conn's local address, "127.0.0.7:40123": the remote the
	// server reports in /events.
	local() string
	// silence makes the conn a dead peer: it stops answering pings and
	// stops reading, and the server is left to find out by its heartbeat.
	silence()
	// lastPing is when the conn last answered a ping; until its first
	// ping, when it was set up.
	lastPing() time.Time
	// close drops the conn (graceful: with a close handshake, bounded by a
	// few seconds) and waits for its goroutines.
	close(graceful bool)
}

// reconnecting is a client that keeps itself connected, for storm.
type reconnecting interface {
	// stop closes the client and waits for its goroutines.
	stop()
}

// adapter dials one impl's clients.
type adapter interface {
	// dial opens one conn to url from src and returns once it is
	// subscribed.
	dial(ctx context.Context, src *source, url string, h connHandlers) (loadConn, error)
	// dialReconnecting starts one reconnecting client and returns once it
	// is first subscribed. Its TCP dials are counted in src.
	dialReconnecting(ctx context.Context, src *source, url string) (reconnecting, error)
	// framesVisible: connHandlers.recv is called per WebSocket message
	// (always so for bare conns).
	framesVisible() bool
}

// wsConn is a coder/websocket client conn with a reader goroutine that
// reads all the time: coder/websocket answers pings only while reading.
type wsConn struct {
	c       *websocket.Conn
	addr    string
	appPing func(frame []byte) bool // the frame is a protocol ping to answer with "{}"

	silent   atomic.Bool
	lastPong atomic.Int64  // unix ns
	release  chan struct{} // closed by close: frees a silenced reader
	done     chan struct{} // closed when the reader has returned
	closing  atomic.Bool
	once     sync.Once
}

// onPing is DialOptions.OnPingReceived, run on the reader.
func (w *wsConn) onPing(context.Context, []byte) bool {
	if w.silent.Load() {
		// Hold the reader here: a dead peer neither answers nor reads.
		<-w.release
		return false
	}
	w.lastPong.Store(time.Now().UnixNano())
	return true
}

func (w *wsConn) local() string       { return w.addr }
func (w *wsConn) silence()            { w.silent.Store(true) }
func (w *wsConn) lastPing() time.Time { return time.Unix(0, w.lastPong.Load()) }

func (w *wsConn) read(h connHandlers) {
	defer close(w.done)
	w.c.SetReadLimit(-1)
	var msgs []benchMsg
	buf := make([]byte, 0, 4096)
	for {
		data, err := readMessage(w.c, buf)
		buf = data[:0]
		if err != nil {
			if !w.closing.Load() && h.ended != nil {
				h.ended()
			}
			return
		}
		if w.silent.Load() {
			<-w.release // stop reading
			continue    // the conn is closed: Read fails
		}
		now := time.Now().UnixNano()
		if w.appPing != nil && w.appPing(data) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if w.c.Write(ctx, websocket.MessageText, []byte("{}")) == nil {
				w.lastPong.Store(now)
			}
			cancel()
		}
		if h.recv != nil {
			if msgs = scanBench(data, msgs[:0]); len(msgs) > 0 {
				h.recv(now, msgs)
			}
		}
	}
}

// readMessage reads the next message into buf, grown when it is too
// small, and returns it. Why not websocket.Conn.Read: it allocates each
// message anew, and a load client reading one small message per frame (a
// raw peer's) spent its core on that and the garbage it made, so that the
// figure measured the client; every impl's conns read through here.
func readMessage(c *websocket.Conn, buf []byte) ([]byte, error) {
	_, r, err := c.Reader(context.Background())
	if err != nil {
		return buf[:0], err
	}
	buf = buf[:0]
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		switch {
		case err == io.EOF:
			return buf, nil
		case err != nil:
			return buf, err
		}
	}
}

func (w *wsConn) close(graceful bool) {
	w.once.Do(func() {
		w.closing.Store(true)
		close(w.release)
		if graceful {
			_ = w.c.Close(websocket.StatusNormalClosure, "")
		}
		_ = w.c.CloseNow()
		<-w.done
	})
}

// wsAdapter is a coder/websocket client: tether's protocol v1 over a
// plain conn, a conn that only has to connect (gorilla, melody, naive,
// tether-conn), or centrifuge's JSON protocol spoken by hand.
type wsAdapter struct {
	subprotocols []string
	// setup runs after the handshake and subscribes; nil: connecting is
	// subscribing.
	setup   func(ctx context.Context, c *websocket.Conn) error
	appPing func(frame []byte) bool
}

func (a *wsAdapter) framesVisible() bool { return true }

func (a *wsAdapter) dial(ctx context.Context, src *source, url string, h connHandlers) (loadConn, error) {
	w := &wsConn{appPing: a.appPing, release: make(chan struct{}), done: make(chan struct{})}
	// The conn the handshake went over: its local address is the remote
	// the server knows it by.
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		GotConn: func(info httptrace.GotConnInfo) { w.addr = info.Conn.LocalAddr().String() },
	})
	c, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPClient:     src.hc,
		Subprotocols:   a.subprotocols,
		OnPingReceived: w.onPing,
	})
	if err != nil {
		return nil, err
	}
	if a.setup != nil {
		if err := a.setup(ctx, c); err != nil {
			c.CloseNow()
			return nil, err
		}
	}
	w.c = c
	w.lastPong.Store(time.Now().UnixNano())
	go w.read(h)
	return w, nil
}

// plainRedial is how long the plain reconnecting client waits before each
// dial once its conn is lost: the fixed delay of the loop most hand-written
// clients have, with no backoff and no jitter.
const plainRedial = time.Second

func (a *wsAdapter) dialReconnecting(ctx context.Context, src *source, url string) (reconnecting, error) {
	if a.setup != nil {
		return nil, errors.New("no reconnecting client for this impl")
	}
	return dialPlainLoop(ctx, src, url)
}

// plainLoop is the reconnecting client of gorilla, melody and naive: the
// common hand-written loop that reads until the conn fails, waits a fixed
// plainRedial and dials again, for ever.
type plainLoop struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func dialPlainLoop(ctx context.Context, src *source, url string) (*plainLoop, error) {
	opts := &websocket.DialOptions{HTTPClient: src.hc}
	c, _, err := websocket.Dial(ctx, url, opts)
	if err != nil {
		return nil, err
	}
	lctx, cancel := context.WithCancel(context.Background())
	p := &plainLoop{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for {
			if c != nil {
				c.SetReadLimit(-1)
				for {
					// lctx ending closes the conn, which ends the read.
					if _, _, err := c.Read(lctx); err != nil {
						break
					}
				}
				c.CloseNow()
			}
			select {
			case <-lctx.Done():
				return
			case <-time.After(plainRedial):
			}
			dctx, dcancel := context.WithTimeout(lctx, 10*time.Second)
			c, _, _ = websocket.Dial(dctx, url, opts)
			dcancel()
		}
	}()
	return p, nil
}

func (p *plainLoop) stop() {
	p.cancel()
	<-p.done
}

// tetherAdapter: protocol v1 conns for the scenarios, tether.Dial (the
// reconnecting client, default Backoff) for storm.
type tetherAdapter struct{ wsAdapter }

func newTetherAdapter() *tetherAdapter {
	return &tetherAdapter{wsAdapter{
		subprotocols: []string{tether.Subprotocol},
		setup: func(ctx context.Context, c *websocket.Conn) error {
			if err := c.Write(ctx, websocket.MessageText, []byte(`{"op":"sub","topic":"bench","id":"1"}`)); err != nil {
				return err
			}
			for { // the welcome, then the ack
				_, data, err := c.Read(ctx)
				if err != nil {
					return err
				}
				if bytes.Contains(data, []byte(`"op":"error"`)) {
					return fmt.Errorf("subscribe: %s", data)
				}
				if bytes.Contains(data, []byte(`"op":"ack"`)) {
					return nil
				}
			}
		},
	}}
}

type tetherClient struct{ cl *tether.Client }

func (t tetherClient) stop() { t.cl.Close() }

// gaveUp reports whether the client closed by itself: its Backoff gave up,
// or it met a terminal error.
func (t tetherClient) gaveUp() bool {
	select {
	case <-t.cl.Done():
		return true
	default:
		return false
	}
}

func (a *tetherAdapter) dialReconnecting(ctx context.Context, src *source, url string) (reconnecting, error) {
	cl, err := tether.Dial(ctx, url, tether.WithHTTPClient(src.hc))
	if err != nil {
		return nil, err
	}
	if err := cl.Subscribe(ctx, "bench", func(tether.Message) {}); err != nil {
		cl.Close()
		return nil, err
	}
	return tetherClient{cl}, nil
}

// centrifugeAdapter: centrifuge-go with the JSON protocol, subscribed to
// bench; for a conn that must be able to go silent, centrifuge's JSON
// protocol spoken over coder/websocket (connect, subscribe, and "{}"
// answered to the server's "{}" pings), since centrifuge-go always answers.
type centrifugeAdapter struct{ raw wsAdapter }

func newCentrifugeAdapter() *centrifugeAdapter {
	return &centrifugeAdapter{raw: wsAdapter{
		setup: func(ctx context.Context, c *websocket.Conn) error {
			for id, cmd := range []string{`"connect":{"name":"tetherload"}`, `"subscribe":{"channel":"bench"}`} {
				id := strconv.Itoa(id + 1)
				if err := c.Write(ctx, websocket.MessageText, []byte(`{"id":`+id+`,`+cmd+`}`)); err != nil {
					return err
				}
				if err := centrifugeReply(ctx, c, id); err != nil {
					return err
				}
			}
			return nil
		},
		appPing: centrifugePing,
	}}
}

// centrifugeReply reads until the reply to command id, answering pings.
func centrifugeReply(ctx context.Context, c *websocket.Conn, id string) error {
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			return err
		}
		if centrifugePing(data) {
			if err := c.Write(ctx, websocket.MessageText, []byte("{}")); err != nil {
				return err
			}
		}
		for line := range bytes.SplitSeq(data, []byte("\n")) {
			if !bytes.HasPrefix(line, []byte(`{"id":`+id+`,`)) {
				continue
			}
			if bytes.HasPrefix(line[len(`{"id":`+id+`,`):], []byte(`"error"`)) {
				return fmt.Errorf("centrifuge command %s: %s", id, line)
			}
			return nil
		}
	}
}

// centrifugePing reports whether a frame of centrifuge's JSON protocol
// holds a ping: an empty object on a line of its own.
func centrifugePing(frame []byte) bool {
	for line := range bytes.SplitSeq(frame, []byte("\n")) {
		if bytes.Equal(bytes.TrimSpace(line), []byte("{}")) {
			return true
		}
	}
	return false
}

func (a *centrifugeAdapter) framesVisible() bool { return false }

func (a *centrifugeAdapter) dial(ctx context.Context, src *source, url string, h connHandlers) (loadConn, error) {
	if h.bare {
		return a.raw.dial(ctx, src, url, h)
	}
	return dialCentrifuge(ctx, src, url, h)
}

func (a *centrifugeAdapter) dialReconnecting(ctx context.Context, src *source, url string) (reconnecting, error) {
	// centrifuge-go reconnects by itself, with its own backoff.
	return dialCentrifuge(ctx, src, url, connHandlers{})
}

// centrifugeConn is a centrifuge-go client.
type centrifugeConn struct {
	cl        *centrifuge.Client
	addr      atomic.Pointer[string]
	connected atomic.Bool
	closing   atomic.Bool
	at        time.Time
	once      sync.Once
}

func dialCentrifuge(ctx context.Context, src *source, url string, h connHandlers) (*centrifugeConn, error) {
	cc := &centrifugeConn{}
	cl := centrifuge.NewJsonClient(url, centrifuge.Config{
		Name: "tetherload",
		NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := src.dialContext(ctx, network, addr)
			if err == nil {
				local := c.LocalAddr().String()
				cc.addr.Store(&local)
			}
			return c, err
		},
	})
	cc.cl = cl
	subscribed := make(chan error, 1)
	answer := func(err error) {
		select {
		case subscribed <- err:
		default:
		}
	}
	cl.OnConnected(func(centrifuge.ConnectedEvent) { cc.connected.Store(true) })
	lost := func() {
		if cc.connected.Swap(false) && !cc.closing.Load() && h.ended != nil {
			h.ended()
		}
	}
	cl.OnConnecting(func(centrifuge.ConnectingEvent) { lost() })
	cl.OnDisconnected(func(centrifuge.DisconnectedEvent) { lost() })
	sub, err := cl.NewSubscription("bench")
	if err != nil {
		cl.Close()
		return nil, err
	}
	var msgs []benchMsg
	sub.OnPublication(func(e centrifuge.PublicationEvent) {
		if h.recv == nil {
			return
		}
		now := time.Now().UnixNano()
		if msgs = scanBench(e.Data, msgs[:0]); len(msgs) > 0 {
			h.recv(now, msgs)
		}
	})
	sub.OnSubscribed(func(centrifuge.SubscribedEvent) { answer(nil) })
	sub.OnError(func(e centrifuge.SubscriptionErrorEvent) { answer(fmt.Errorf("centrifuge subscribe: %w", e.Error)) })
	if err := sub.Subscribe(); err != nil {
		cl.Close()
		return nil, err
	}
	if err := cl.Connect(); err != nil {
		cl.Close()
		return nil, err
	}
	select {
	case err = <-subscribed:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		cl.Close()
		return nil, err
	}
	cc.at = time.Now()
	return cc, nil
}

func (c *centrifugeConn) local() string {
	if p := c.addr.Load(); p != nil {
		return *p
	}
	return ""
}

// silence is not possible with centrifuge-go: dial with bare.
func (c *centrifugeConn) silence()            { panic("centrifuge-go conns cannot go silent") }
func (c *centrifugeConn) lastPing() time.Time { return c.at }

func (c *centrifugeConn) stop() { c.close(false) }

func (c *centrifugeConn) close(bool) {
	c.once.Do(func() {
		c.closing.Store(true)
		c.cl.Close()
	})
}

// scanBench appends the bench messages of a frame to msgs: lines holding
// {"t":<t>,"i":<i>,...}, bare (gorilla, melody, naive, centrifuge
// publication data) or as the data of a tether msg line.
func scanBench(frame []byte, msgs []benchMsg) []benchMsg {
	for line := range bytes.SplitSeq(frame, []byte("\n")) {
		if t, i, ok := parseBenchAny(line); ok {
			msgs = append(msgs, benchMsg{t, i})
		}
	}
	return msgs
}

// parseBenchAny reads t and i from the first {"t":<t>,"i":<i>, in line.
func parseBenchAny(line []byte) (t int64, i int, ok bool) {
	at := bytes.Index(line, []byte(`{"t":`))
	if at < 0 {
		return 0, 0, false
	}
	rest := line[at+len(`{"t":`):]
	end := bytes.IndexByte(rest, ',')
	if end < 0 {
		return 0, 0, false
	}
	t, err := strconv.ParseInt(string(rest[:end]), 10, 64)
	if err != nil {
		return 0, 0, false
	}
	rest, found := bytes.CutPrefix(rest[end:], []byte(`,"i":`))
	if !found {
		return 0, 0, false
	}
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
