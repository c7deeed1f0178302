package tether

// This file is the client's reconnect loop: one conn after another, each
// dialled, welcomed, resubscribed and flushed, and what ends each.

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/internal/wire"
	"golang.org/x/time/rate"
)

// run keeps the client connected until it closes. It owns the conns.
func (cl *Client) run(first chan<- error) {
	defer close(cl.done)
	b := cl.cfg.backoff
	var (
		attempt  int           // backoff step: failures since the last stable conn
		failures int           // attempts in a row that failed, for MaxRetries
		good     int           // the URL to try first: the last that worked
		wait     time.Duration // before the next attempt
	)
	for {
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-cl.ctx.Done():
				t.Stop()
				cl.finish(nil, first)
				return
			}
		}
		conn, idx, err := cl.connectAny(good)
		if err != nil {
			if cl.ctx.Err() != nil {
				cl.finish(nil, first)
				return
			}
			failures++
			if terminal(err) {
				cl.finish(err, first)
				return
			}
			if b.MaxRetries > 0 && failures >= b.MaxRetries {
				if b.Quiet <= 0 {
					cl.finish(fmt.Errorf("tether: gave up after %d attempts: %w", failures, err), first)
					return
				}
				// A pause, then another round from the first delay.
				cl.cfg.conn.logger.Info("tether: connect failed; quiet before another round", "attempts", failures, "quiet", b.Quiet, "err", err)
				failures, attempt, wait = 0, 0, b.Quiet
				continue
			}
			wait = b.Delay(attempt)
			if after := retryAfter(err); after > 0 {
				// Retry-After counts whole seconds: clients told the same
				// spread over that second.
				wait = max(wait, after+rand.N(time.Second))
			}
			attempt++
			cl.cfg.conn.logger.Debug("tether: connect failed", "err", err, "retry_in", wait)
			continue
		}
		good, failures = idx, 0
		up := time.Now()
		if cl.resume(conn) && first != nil {
			first <- nil
			first = nil
		}
		select {
		case <-conn.Done():
		case <-cl.ctx.Done():
			// Close has begun a graceful close, unless the conn came up
			// after it looked; the write timeout bounds either.
			conn.Close(websocket.StatusNormalClosure, "")
			<-conn.Done()
		}
		reason := conn.Err()
		cl.lost(conn, reason)
		if cl.ctx.Err() != nil {
			cl.finish(nil, first)
			return
		}
		if time.Since(up) >= b.StableAfter {
			attempt = 0
		}
		hint, code := closeHint(reason), websocket.CloseStatus(reason)
		if ce := (*CloseError)(nil); errors.As(reason, &ce) && ce.Local {
			// Closed on this side (through Client.Conn): the code is
			// ours, not the server's word.
			hint, code = 0, -1
		}
		switch code {
		case StatusUnauthorized:
			cl.finish(fmt.Errorf("%w: the server closed the conn with %d: %w", ErrUnauthorized, StatusUnauthorized, reason), first)
			return
		case StatusForbidden:
			cl.finish(fmt.Errorf("%w: the server closed the conn with %d: %w", ErrForbidden, StatusForbidden, reason), first)
			return
		case websocket.StatusGoingAway:
			if hint > 0 {
				// The server spread its clients over the hint already;
				// a little more keeps equal hints apart.
				wait = hint + uniform(hint/5)
				break
			}
			wait = b.Delay(attempt)
			attempt++
		default:
			// 4008 and 4429 included: a client the server had to shed
			// backs off further each time.
			wait = max(b.Delay(attempt), hint)
			attempt++
		}
	}
}

// finish closes the client for reason (nil for Close) and reports it to
// Dial if the first conn was never made.
func (cl *Client) finish(reason error, first chan<- error) {
	cl.mu.Lock()
	cl.closed = true
	cl.err = reason
	if cl.offline != nil {
		cl.offline.Stop()
	}
	cl.buffer, cl.bufBytes = nil, 0
	cl.stopAckLocked()
	for _, sub := range cl.subs {
		if sub.retry != nil {
			sub.retry.Stop()
		}
		if sub.waiter != nil {
			sub.waiter <- fmt.Errorf("tether: subscribe: %w", net.ErrClosed)
			sub.waiter = nil
		}
	}
	clear(cl.subs)
	cl.mu.Unlock()
	cl.setState(Closed, reason)
	cl.cancel()
	cl.wg.Wait()
	if first != nil {
		if reason == nil {
			reason = fmt.Errorf("tether: dial: %w", net.ErrClosed)
		}
		first <- reason
	}
}

func (cl *Client) setState(s State, err error) {
	cl.mu.Lock()
	changed := cl.state != s
	cl.state = s
	cl.mu.Unlock()
	if f := cl.cfg.conn.observer.State; changed && f != nil {
		f(s, err)
	}
}

// armOfflineLocked starts the OnOffline countdown of an outage: from
// when the client stopped being Connected to when it is again.
func (cl *Client) armOfflineLocked() {
	if cl.cfg.onOffline == nil {
		return
	}
	cl.offline = time.AfterFunc(cl.cfg.offlineAfter, func() {
		cl.mu.Lock()
		if cl.closed || cl.live {
			cl.mu.Unlock()
			return
		}
		// Added under the lock that Close takes before it waits.
		cl.wg.Add(1)
		cl.mu.Unlock()
		defer cl.wg.Done()
		cl.cfg.onOffline()
	})
}

// connectAny tries each URL once, from the one at index from, and returns
// the first conn made and its URL's index. A terminal refusal ends the
// round: every URL serves the same application.
func (cl *Client) connectAny(from int) (*Conn, int, error) {
	urls := cl.cfg.urls
	var errs []error
	for i := range urls {
		idx := (from + i) % len(urls)
		conn, err := cl.connect(urls[idx])
		if err == nil {
			return conn, idx, nil
		}
		if terminal(err) || cl.ctx.Err() != nil {
			return nil, idx, err
		}
		errs = append(errs, err)
	}
	if len(errs) == 1 {
		return nil, from, errs[0]
	}
	return nil, from, errors.Join(errs...)
}

// connect makes one conn to url and reads its welcome: the conn's
// heartbeat is the one the welcome advertises.
func (cl *Client) connect(url string) (*Conn, error) {
	ctx, cancel := context.WithTimeout(cl.ctx, cl.cfg.conn.timeout)
	defer cancel()
	header := cl.cfg.header.Clone()
	if cl.cfg.token != nil {
		tok, err := cl.cfg.token(ctx)
		if err != nil {
			return nil, fmt.Errorf("tether: dial %s: token: %w", url, err)
		}
		if header == nil {
			header = http.Header{}
		}
		header.Set("Authorization", "Bearer "+tok)
	}
	// The conn is made after the welcome, the ping hooks before the dial.
	var cp atomic.Pointer[Conn]
	ws, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPClient:   cl.cfg.httpClient,
		HTTPHeader:   header,
		Subprotocols: []string{Subprotocol},
		OnPingReceived: func(ctx context.Context, p []byte) bool {
			if c := cp.Load(); c != nil {
				return c.onPing(ctx, p)
			}
			return true
		},
		OnPongReceived: func(ctx context.Context, p []byte) {
			if c := cp.Load(); c != nil {
				c.onPong(ctx, p)
			}
		},
	})
	if err != nil {
		return nil, handshakeError(url, resp, err)
	}
	if ws.Subprotocol() != Subprotocol {
		ws.Close(websocket.StatusNormalClosure, Subprotocol+" required")
		return nil, fmt.Errorf("tether: dial %s: %w: the server does not speak %s", url, ErrRejected, Subprotocol)
	}
	ws.SetReadLimit(cl.cfg.conn.maxMessageSize)
	typ, data, err := ws.Read(ctx)
	if err != nil {
		ws.CloseNow()
		err = readError(err, "server", cl.cfg.conn.maxMessageSize)
		switch websocket.CloseStatus(err) {
		case StatusUnauthorized:
			err = fmt.Errorf("%w: %w", ErrUnauthorized, err)
		case StatusForbidden:
			err = fmt.Errorf("%w: %w", ErrForbidden, err)
		}
		return nil, fmt.Errorf("tether: dial %s: before the welcome: %w", url, err)
	}
	line, rest, _ := bytes.Cut(bytes.TrimLeft(data, "\n"), []byte{'\n'})
	welcome, err := wire.DecodeServer(line)
	err = protocolError(err)
	if err == nil && welcome.Op != wire.OpWelcome {
		err = fmt.Errorf("got %q", welcome.Op)
	}
	if err != nil {
		ws.Close(websocket.StatusProtocolError, "welcome expected")
		return nil, fmt.Errorf("tether: dial %s: the first message is not a welcome: %w", url, err)
	}

	cfg := *cl.cfg.conn
	if welcome.Interval > 0 && welcome.Timeout > welcome.Interval {
		cfg.interval, cfg.timeout = welcome.Interval, welcome.Timeout
	}
	cfg.overflow = DropNewest // Publish reports a full queue; the conn stays
	cfg.onMessage = cl.onMessage
	c := newConn(&cfg, url)
	c.ws, c.coalesce, c.pings = ws, true, &protocolPings{}
	cp.Store(c)
	cl.mu.Lock()
	if cl.closed {
		cl.mu.Unlock()
		ws.CloseNow()
		return nil, fmt.Errorf("tether: dial %s: %w", url, net.ErrClosed)
	}
	cl.conn = c
	cl.dedupe = welcome.Dedupe > 0
	cl.lim = nil
	if l := welcome.Limits; l.PerSecond > 0 {
		// 90 % of the rate and the burst: the rest is for what is not
		// paced, pings and unsubs.
		cl.lim = rate.NewLimiter(rate.Limit(l.PerSecond*0.9), int(max(min(l.Burst, math.MaxInt32)*9/10, 1)))
	}
	cl.mu.Unlock()
	// What came with the welcome (an offline backlog), before the reader
	// starts, to keep the order.
	cl.onMessage(c, Message{Data: rest, Binary: typ == websocket.MessageBinary})
	c.start()
	return c, nil
}

// resume subscribes the new conn to every topic, each from its position,
// waits for the answers, then sends the offline buffer and marks the
// client Connected. Both are paced within the rate limit the welcome
// advertised. It reports false if the conn or the client ended first.
func (cl *Client) resume(c *Conn) bool {
	ctx, cancel := context.WithCancel(cl.ctx)
	defer cancel()
	defer context.AfterFunc(c.ctx, cancel)()

	cl.mu.Lock()
	lim := cl.lim
	subs := make([]*subscription, 0, len(cl.subs))
	for _, sub := range cl.subs {
		subs = append(subs, sub)
	}
	done := make(chan struct{})
	// One for this loop, so that answers cannot close done before every
	// sub is out.
	cl.resubs, cl.resubbed = 1, done
	cl.mu.Unlock()
	for _, sub := range subs {
		if lim != nil && lim.Wait(ctx) != nil {
			return false
		}
		cl.mu.Lock()
		if cl.subs[sub.topic] == sub { // not unsubscribed meanwhile
			cl.resubs++
			cl.subscribeLocked(c, sub).batch = true
		}
		cl.mu.Unlock()
	}
	cl.mu.Lock()
	cl.resubAnsweredLocked()
	cl.mu.Unlock()
	select {
	case <-done:
	case <-ctx.Done():
		return false
	}

	// The buffer, oldest first; what is published meanwhile joins its end.
	for {
		cl.mu.Lock()
		if len(cl.buffer) == 0 {
			cl.live = true
			if cl.offline != nil {
				cl.offline.Stop()
				cl.offline = nil
			}
			cl.mu.Unlock()
			break
		}
		cl.mu.Unlock()
		if lim != nil && lim.Wait(ctx) != nil {
			return false
		}
		cl.mu.Lock()
		if len(cl.buffer) > 0 {
			req := cl.buffer[0]
			if !c.enqueueAll(req.line) {
				cl.mu.Unlock()
				return false
			}
			cl.buffer[0] = nil
			cl.buffer = cl.buffer[1:]
			cl.bufBytes -= len(req.line)
			cl.requests[req.id] = req
		}
		cl.mu.Unlock()
	}
	cl.setState(Connected, nil)
	return true
}

// resubAnsweredLocked counts one re-subscription settled.
func (cl *Client) resubAnsweredLocked() {
	if cl.resubs--; cl.resubs == 0 {
		close(cl.resubbed)
	}
}

// lost settles the end of a conn: what it never wrote goes back to the
// front of the buffer, unanswered requests are forgotten.
func (cl *Client) lost(c *Conn, reason error) {
	cl.mu.Lock()
	c.mu.Lock()
	unsent := c.unsent
	c.unsent = nil
	c.mu.Unlock()
	var back []*request
	for _, line := range unsent {
		// The entries are the client's own encoding, one request each;
		// only publications and sends are kept, subscriptions are made
		// afresh.
		body, bin := wire.Untag(line)
		for f, err := range wire.ClientFrames(body, bin) {
			if err == nil && (f.Op == wire.OpPub || f.Op == wire.OpSend) {
				if req := cl.requests[f.ID]; req != nil && !slices.Contains(back, req) {
					back = append(back, req)
				}
			}
			break
		}
	}
	if cl.dedupe {
		// The server drops a repeated id: what was written but not yet
		// answered goes again, and takes effect once.
		for _, req := range cl.requests {
			if (req.op == wire.OpPub || req.op == wire.OpSend) && !slices.Contains(back, req) {
				back = append(back, req)
			}
		}
	}
	slices.SortFunc(back, func(a, b *request) int { return cmp.Compare(a.n, b.n) })
	if len(back) > 0 && !cl.closed {
		for _, req := range back {
			cl.bufBytes += len(req.line)
		}
		// Past the bound: these were accepted and must not be lost to it.
		cl.buffer = append(back, cl.buffer...)
	}
	clear(cl.requests)
	for _, sub := range cl.subs {
		if sub.retry != nil {
			sub.retry.Stop() // the next conn subscribes it anyway
		}
	}
	cl.conn, cl.live, cl.lim = nil, false, nil
	// A received not yet queued is not carried over: the next conn gets
	// the messages again, and the client drops and acknowledges them.
	cl.stopAckLocked()
	closed := cl.closed
	if !closed && cl.offline == nil {
		cl.armOfflineLocked()
	}
	cl.mu.Unlock()
	if !closed {
		cl.setState(Reconnecting, reason)
	}
}

// terminal reports whether err means the server refused the client for
// good.
func terminal(err error) bool {
	return errors.Is(err, ErrUnauthorized) || errors.Is(err, ErrForbidden) || errors.Is(err, ErrRejected)
}

// handshakeError names a failed handshake: terminal for an HTTP status
// that retrying will not change, with the Retry-After of a 429 or 503.
func handshakeError(url string, resp *http.Response, err error) error {
	if resp == nil {
		return because("tether: dial "+url, err)
	}
	code := resp.StatusCode
	switch {
	case code == http.StatusUnauthorized:
		return fmt.Errorf("tether: dial %s: HTTP %d: %w", url, code, ErrUnauthorized)
	case code == http.StatusForbidden:
		return fmt.Errorf("tether: dial %s: HTTP %d: %w", url, code, ErrForbidden)
	case code >= 400 && code < 500 && code != http.StatusRequestTimeout &&
		code != http.StatusTooEarly && code != http.StatusTooManyRequests:
		return fmt.Errorf("tether: dial %s: HTTP %d: %w", url, code, ErrRejected)
	}
	e := &retryError{err: &causeError{
		msg:  fmt.Sprintf("tether: dial %s: HTTP %d %s", url, code, http.StatusText(code)),
		errs: []error{err},
	}}
	if s, perr := strconv.Atoi(resp.Header.Get("Retry-After")); perr == nil && s > 0 {
		e.after = min(time.Duration(min(s, 1<<30))*time.Second, maxRetryHint)
	}
	return e
}

// maxRetryHint caps what a server can ask a client to wait, by Retry-After
// or retry_ms: a misconfigured server must not silence its clients for days.
const maxRetryHint = time.Hour

// retryError is a failed attempt with the server's word on when to retry.
type retryError struct {
	err   error
	after time.Duration
}

func (e *retryError) Error() string { return e.err.Error() }
func (e *retryError) Unwrap() error { return e.err }

// retryAfter returns the longest Retry-After in err, or 0.
func retryAfter(err error) time.Duration {
	var d time.Duration
	var visit func(error)
	visit = func(err error) {
		switch e := err.(type) {
		case *retryError:
			d = max(d, e.after)
		case interface{ Unwrap() []error }:
			for _, e := range e.Unwrap() {
				visit(e)
			}
		}
	}
	visit(err)
	return d
}

// closeHint returns the retry_ms hint of the close reason in err, or 0.
func closeHint(err error) time.Duration {
	var ce *CloseError
	if !errors.As(err, &ce) {
		return 0
	}
	_, after, ok := strings.Cut(ce.Reason, "retry_ms=")
	if !ok {
		return 0
	}
	end := strings.IndexFunc(after, func(r rune) bool { return r < '0' || r > '9' })
	if end < 0 {
		end = len(after)
	}
	ms, err := strconv.ParseInt(after[:end], 10, 64)
	if err != nil || ms <= 0 {
		return 0
	}
	return time.Duration(min(ms, maxRetryHint.Milliseconds())) * time.Millisecond
}
