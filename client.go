package tether

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/internal/wire"
	"golang.org/x/time/rate"
)

// Client is a protocol v1 client that keeps itself connected: when its
// conn is lost it reconnects with backoff and jitter, trying the fallback
// URLs in turn, subscribes again from where each topic left off so that
// nothing is missed or repeated, and then sends what was buffered while
// offline. It is safe for use by multiple goroutines.
//
// Handlers ([Client.Subscribe], [OnMessage], [Observer].Resync and Error) run
// one at a time on the conn's reader, in the order the server sent; while
// one runs, nothing else is read. They may publish and send, but must not
// wait for the server: not call Subscribe, nor Close (Close waits for the
// reader). To close from a handler, call Close in a goroutine of its own.
//
// The client paces what it sends within the rate limit the server's
// welcome advertises (see PROTOCOL.md, section 4): its re-subscriptions
// and its offline buffer after a reconnect, and Subscribe; Publish and
// Send past the limit return [ErrRateLimited] instead of sending what the
// server would refuse.
//
// # The user's inbox
//
// With a hub that keeps an inbox for each user (PROTOCOL.md, section 10.1;
// [WithInbox]), the direct messages sent to the client's user come
// numbered, and the hub keeps each one until a client of the user
// acknowledges it. The client hands them to the [OnMessage] handler, with
// [Message].Position set to their place in the inbox (without a handler
// they are dropped, and acknowledged all the same), then acknowledges them:
// one received for the last of each WebSocket message it read, paced within
// the server's rate limit like its other requests (several WebSocket
// messages then share one), so that a replay of thousands costs a few. An
// acknowledgement is never kept for the next conn. A message handed over
// whose acknowledgement was lost with the conn comes again on the next one:
// the client remembers the last position it handed over, across its
// reconnects, and drops what it had, so that within one Client each message
// reaches the handler exactly once. That memory is the Client object's: a
// new Client, in a new process say, starts without it, and gets again
// whatever was handed over but not acknowledged before the old one ended.
// Across restarts delivery is at least once; an application that must not
// act twice keeps the last Position it handled and skips a message of its
// epoch at or below its seq.
type Client struct {
	cfg      *dialConfig
	ctx      context.Context // ends when the client closes
	cancel   context.CancelFunc
	done     chan struct{}
	wg       sync.WaitGroup // OnOffline calls
	ids      atomic.Uint64
	idPrefix string // random, for ids unique to this client: see newID
	dedupe   bool   // the last server drops repeated ids (its welcome said so)

	mu       sync.Mutex // guards what follows
	state    State
	err      error
	closed   bool
	conn     *Conn                    // the current conn; nil while none is up
	live     bool                     // conn is resubscribed and flushed: send on it
	subs     map[string]*subscription // by topic
	requests map[string]*request      // sent on conn and not yet answered, by id
	resubs   int                      // re-subscriptions not yet answered
	resubbed chan struct{}            // closed when resubs reaches 0
	buffer   []*request               // kept while offline, oldest first
	bufBytes int
	lim      *rate.Limiter // the conn's advertised rate limit; nil for none
	offline  *time.Timer   // OnOffline, armed while not Connected

	// The user's inbox (PROTOCOL.md, section 10.1). inbox outlives conns;
	// the rest is ackConn's, the conn the acknowledgements go on.
	inbox    Position    // of the last inbox message handed to the application
	ackConn  *Conn       // the conn of ackDue, acked and ackTimer; nil for none
	ackDue   Position    // what to acknowledge: inbox, once handed over
	acked    Position    // the last received queued on ackConn
	ackTimer *time.Timer // a received paced by the rate limit, not sent yet
}

// subscription is one topic the application subscribed to. It outlives
// conns: each new conn subscribes again from pos.
type subscription struct {
	topic   string
	handler func(Message)
	pos     Position    // of the last message delivered
	known   bool        // pos holds one; else subscribe without since
	acked   bool        // the server has accepted it once
	latest  bool        // ask for the topic's last message, until acked
	waiter  chan error  // the first Subscribe waits here; nil once answered
	retry   *time.Timer // re-sends a re-subscription refused for a while
	retries int         // refusals in a row, for the retry's backoff

	// The topic's presence, as the server's presence messages tell it:
	// the members it lists, by user, and how many there are. members is
	// nil until the first snapshot.
	members map[string]Member
	count   int
}

// request is a protocol request sent, or to be sent, to the server.
type request struct {
	id    string
	n     uint64 // the order requests were made in
	op    string
	topic string
	line  []byte
	sub   *subscription // for sub
	since bool          // a sub from a known position
	batch bool          // a sub of the re-subscription of a new conn
}

// Dial connects to a tether hub at url (ws://, wss://, http:// or
// https://) and returns a client once the first conn is up. It fails at
// once if the server refuses the client for good (HTTP 401, 403, 404 or
// another 4xx but 408, 425 and 429; close code 4401 or 4403): the error
// wraps [ErrUnauthorized], [ErrForbidden] or [ErrRejected]. Other failures
// are retried with backoff until ctx ends, or until [Backoff].MaxRetries
// attempts in a row have failed (without [Backoff].Quiet). Dial returns an error that starts
// "tether: invalid option" for options that make no sense.
//
// After Dial, the client stays connected in the background until
// [Client.Close], or until the server refuses it for good.
func Dial(ctx context.Context, url string, opts ...DialOption) (*Client, error) {
	cfg, err := newDialConfig(url, opts)
	if err != nil {
		return nil, err
	}
	cl := &Client{
		cfg:      cfg,
		done:     make(chan struct{}),
		subs:     make(map[string]*subscription),
		requests: make(map[string]*request),
		idPrefix: newConnID() + ".",
	}
	cl.ctx, cl.cancel = context.WithCancel(context.Background())
	cl.armOfflineLocked() // no one else has cl yet
	first := make(chan error, 1)
	go cl.run(first)
	select {
	case err := <-first:
		if err != nil {
			<-cl.done
			return nil, err
		}
		return cl, nil
	case <-ctx.Done():
		cl.Close()
		return nil, fmt.Errorf("tether: dial %s: %w", url, ctx.Err())
	}
}

// State returns the client's state.
func (cl *Client) State() State {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.state
}

// Conn returns the current conn, for its [Conn.RTT] or [Conn.Heartbeat],
// or nil while none is up. Closing it makes the client reconnect.
func (cl *Client) Conn() *Conn {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.conn
}

// Done returns a channel closed once the client has closed and its
// goroutines have returned.
func (cl *Client) Done() <-chan struct{} { return cl.done }

// Err returns why the client closed: nil after [Client.Close], or the
// terminal error; nil while it is open.
func (cl *Client) Err() error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.err
}

// Close closes the client: what the conn has queued is sent, then a close
// frame (1000), within the write timeout. The offline buffer is dropped.
// Close returns once every goroutine of the client has returned. Closing
// a closed client returns an error that wraps [net.ErrClosed].
func (cl *Client) Close() error {
	cl.mu.Lock()
	if cl.closed {
		cl.mu.Unlock()
		<-cl.done
		return fmt.Errorf("tether: client: %w", net.ErrClosed)
	}
	cl.closed = true
	conn := cl.conn
	cl.mu.Unlock()
	if conn != nil {
		// Graceful before the cancel, which the run loop answers with
		// CloseNow: the close frame gets its chance first.
		conn.Close(websocket.StatusNormalClosure, "")
	}
	cl.cancel()
	<-cl.done
	return nil
}

// Subscribe subscribes the client to topic and returns once the server
// has acknowledged it: handler then receives the topic's messages,
// published from that moment on. After a reconnect the client subscribes
// again from the last message handler received, so that it gets exactly
// the messages it missed; when the server no longer has them, [Observer].Resync
// is called instead.
//
// While the client is offline, Subscribe waits for the next conn. If the
// server refuses, Subscribe returns the [*ProtocolError] (code
// [CodeForbidden] for a topic the application does not allow). If ctx
// ends first, the subscription is cancelled and Subscribe returns
// ctx.Err(). Subscribing twice to a topic is an error. Do not call
// Subscribe from a handler: it waits for the server, whose answer the
// handler holds up.
func (cl *Client) Subscribe(ctx context.Context, topic string, handler func(Message)) error {
	return cl.subscribe(ctx, topic, nil, false, handler)
}

// SubscribeLatest is [Client.Subscribe] with the topic's current value:
// handler first receives the topic's last message, when the server's
// history still holds it, then the live messages, without a gap or a
// repeat between them. When the topic has had no message, or history
// keeps it no longer, handler receives live messages only, as with
// Subscribe. After a reconnect the client resumes from the last message
// handler received, as Subscribe does: the latest is not sent again.
// A server from before this option ignores it (PROTOCOL.md, "sub").
func (cl *Client) SubscribeLatest(ctx context.Context, topic string, handler func(Message)) error {
	return cl.subscribe(ctx, topic, nil, true, handler)
}

// SubscribeFrom is [Client.Subscribe] from a position the application
// kept, across a restart of its process say: the [Message].Position of
// the last message of topic it handled. The server replays what came
// after it, then live messages; when its history no longer holds them,
// [Observer].Resync reports the topic (reload it), and live messages
// follow. A zero from is Subscribe.
func (cl *Client) SubscribeFrom(ctx context.Context, topic string, from Position, handler func(Message)) error {
	if from.Epoch == "" {
		return cl.subscribe(ctx, topic, nil, false, handler)
	}
	return cl.subscribe(ctx, topic, &from, false, handler)
}

func (cl *Client) subscribe(ctx context.Context, topic string, from *Position, latest bool, handler func(Message)) error {
	if err := checkTopic(topic); err != nil {
		return fmt.Errorf("tether: subscribe: %w", err)
	}
	if handler == nil {
		return errors.New("tether: subscribe: nil handler")
	}
	answer := make(chan error, 1)
	sub := &subscription{topic: topic, handler: handler, waiter: answer, latest: latest}
	if from != nil {
		sub.pos, sub.known = *from, true
	}
	cl.mu.Lock()
	switch {
	case cl.closed:
		cl.mu.Unlock()
		return fmt.Errorf("tether: subscribe: %w", net.ErrClosed)
	case cl.subs[topic] != nil:
		cl.mu.Unlock()
		return fmt.Errorf("tether: subscribe: already subscribed to %q", topic)
	}
	cl.subs[topic] = sub
	lim := cl.lim
	cl.mu.Unlock()
	// Paced like the rest, so that many Subscribe calls at once stay
	// within the server's rate limit. The conn may change meanwhile: the
	// sub goes on the one up now, or with the next conn's re-subscription.
	if lim != nil {
		lim.Wait(ctx)
	}
	cl.mu.Lock()
	if cl.conn != nil && cl.subs[topic] == sub && sub.waiter != nil && ctx.Err() == nil {
		cl.subscribeLocked(cl.conn, sub)
	}
	cl.mu.Unlock()

	select {
	case err := <-answer:
		return err
	case <-ctx.Done():
	case <-cl.done:
	}
	cl.mu.Lock()
	select {
	case err := <-answer:
		// Answered while we gave up: keep the answer.
		cl.mu.Unlock()
		return err
	default:
	}
	sub.waiter = nil
	cl.unsubscribeLocked(sub)
	closed := cl.closed
	cl.mu.Unlock()
	if closed && ctx.Err() == nil {
		return fmt.Errorf("tether: subscribe: %w", net.ErrClosed)
	}
	return ctx.Err()
}

// Unsubscribe ends the subscription to topic. Its handler receives
// nothing more, even what the server had already sent, except a message
// whose delivery had begun when Unsubscribe was called. A Subscribe to
// the topic still waiting for the server returns an error. Unsubscribing
// from a topic the client is not subscribed to does nothing.
func (cl *Client) Unsubscribe(topic string) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.closed {
		return fmt.Errorf("tether: unsubscribe: %w", net.ErrClosed)
	}
	if sub := cl.subs[topic]; sub != nil {
		cl.unsubscribeLocked(sub)
	}
	return nil
}

// Topics returns the topics the client is subscribed to, in no order.
func (cl *Client) Topics() []string {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	topics := make([]string, 0, len(cl.subs))
	for t := range cl.subs {
		topics = append(topics, t)
	}
	return topics
}

// Publish publishes data, text in valid UTF-8, to topic, if the server
// allows this client to (see [WithClientPublish]). It returns at once: the
// message goes on the conn's send queue, or, while the client is
// offline, into the offline buffer, which is sent in order on the next
// conn, after the subscriptions are back in place. ctx is only checked on
// entry.
//
// Publish returns [ErrInvalidUTF8] for data that is not UTF-8,
// [ErrQueueFull] when not Connected with a full buffer, [ErrRateLimited]
// past the rate limit the server advertised, and [ErrQueueFull] when the
// send queue is full (the link is slower than the publisher). A refusal
// by the server arrives later, at [Observer].Error.
//
// A message that was handed to a conn that then broke, and that the server
// had not acknowledged, is sent again on the next conn with the same id.
// A hub that drops repeated ids (its welcome says for how long: every
// tether hub from 2026-12, for 2 minutes) answers a repeat without
// carrying it out, so each message takes effect exactly once. With a
// server that does not, only messages not written yet are sent again, and
// what had been written may be lost with the conn: at most once.
func (cl *Client) Publish(ctx context.Context, topic string, data []byte) error {
	return cl.request(ctx, wire.OpPub, topic, data, false, false)
}

// PublishBinary is [Client.Publish] for bytes, which subscribers get as
// bytes: a [Message] with Binary set, a Uint8Array in tether.js, a binary
// message on a raw peer.
func (cl *Client) PublishBinary(ctx context.Context, topic string, data []byte) error {
	return cl.request(ctx, wire.OpPub, topic, data, true, false)
}

// PublishVolatile is [Client.Publish] without the offline buffer: while
// the client is not Connected (also while a new conn is being
// resubscribed) it returns [ErrOffline] and drops the message. For data
// that is stale by the time the client reconnects: cursor positions,
// typing indicators. binary says whether data is bytes, as with
// [Client.PublishBinary], or text.
func (cl *Client) PublishVolatile(ctx context.Context, topic string, data []byte, binary bool) error {
	return cl.request(ctx, wire.OpPub, topic, data, binary, true)
}

// Send sends data, text in valid UTF-8, to the server application (see
// [OnMessage] on the server side), the way [Client.Publish] publishes.
func (cl *Client) Send(ctx context.Context, data []byte) error {
	return cl.request(ctx, wire.OpSend, "", data, false, false)
}

// SendBinary is [Client.Send] for bytes, which the server application
// gets in a [Message] with Binary set.
func (cl *Client) SendBinary(ctx context.Context, data []byte) error {
	return cl.request(ctx, wire.OpSend, "", data, true, false)
}

// SendVolatile is [Client.Send] without the offline buffer: while the
// client is not Connected it returns [ErrOffline] and drops the message.
// binary says whether data is bytes or text.
func (cl *Client) SendVolatile(ctx context.Context, data []byte, binary bool) error {
	return cl.request(ctx, wire.OpSend, "", data, binary, true)
}

func (cl *Client) request(ctx context.Context, op, topic string, data []byte, binary, volatile bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if op == wire.OpPub {
		if err := checkTopic(topic); err != nil {
			return fmt.Errorf("tether: publish: %w", err)
		}
	}
	kind, body, err := kindOf(data, binary)
	if err != nil {
		return fmt.Errorf("tether: %s: %w", op, err)
	}
	id, n := cl.newID()
	req := &request{id: id, n: n, op: op, topic: topic}
	buf := make([]byte, 0, len(body)+len(topic)+64)
	if op == wire.OpPub {
		req.line = appendEntry(buf, kind, func(b []byte) []byte { return wire.AppendPubOf(b, topic, kind, body, req.id) })
	} else {
		req.line = appendEntry(buf, kind, func(b []byte) []byte { return wire.AppendSendOf(b, kind, body, req.id) })
	}

	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.closed {
		return fmt.Errorf("tether: %s: %w", op, net.ErrClosed)
	}
	if cl.live {
		if cl.lim != nil && !cl.lim.Allow() {
			// The server would refuse it, and close the conn if this went
			// on: better said now, to the caller.
			return fmt.Errorf("tether: %s: %w: over the server's limit of %v messages/s", op, ErrRateLimited, cl.lim.Limit())
		}
		err := cl.conn.enqueue(req.line)
		if err == nil {
			cl.requests[req.id] = req
			return nil
		}
		if errors.Is(err, ErrQueueFull) {
			return err
		}
		// The conn has just ended; the run loop has yet to notice.
	}
	if volatile {
		return fmt.Errorf("tether: %s: %w", op, ErrOffline)
	}
	if len(cl.buffer) >= cl.cfg.bufMessages || cl.bufBytes+len(req.line) > cl.cfg.bufBytes {
		return fmt.Errorf("tether: %s: %w", op, ErrQueueFull)
	}
	cl.buffer = append(cl.buffer, req)
	cl.bufBytes += len(req.line)
	return nil
}

// newID returns a request id unique to this client: a random prefix and a
// count, so that a hub that drops repeated ids (PROTOCOL.md, "pub") can
// tell this client's from any other's.
func (cl *Client) newID() (string, uint64) {
	n := cl.ids.Add(1)
	return cl.idPrefix + strconv.FormatUint(n, 36), n
}

// subscribeLocked sends sub's subscription on c, from its position when
// it has one; else, for SubscribeLatest not yet accepted, asking for the
// topic's last message.
func (cl *Client) subscribeLocked(c *Conn, sub *subscription) *request {
	var since *wire.Since
	if sub.known {
		since = &wire.Since{Epoch: sub.pos.Epoch, Seq: sub.pos.Seq}
	}
	id, n := cl.newID()
	req := &request{id: id, n: n, op: wire.OpSub, topic: sub.topic, sub: sub, since: sub.known}
	req.line = wire.AppendSub(nil, sub.topic, since, sub.latest && !sub.known && !sub.acked, req.id)
	cl.requests[req.id] = req
	c.enqueueAll(req.line)
	return req
}

// unsubscribeLocked forgets sub and tells the server, if a conn is up.
func (cl *Client) unsubscribeLocked(sub *subscription) {
	if cl.subs[sub.topic] != sub {
		return
	}
	delete(cl.subs, sub.topic)
	if sub.retry != nil {
		sub.retry.Stop()
	}
	if sub.waiter != nil {
		sub.waiter <- fmt.Errorf("tether: subscribe: unsubscribed from %q meanwhile", sub.topic)
		sub.waiter = nil
	}
	if cl.conn != nil {
		// Without id: there is nothing to do with the answer. A sub still
		// in flight is undone by this unsub, which follows it.
		cl.conn.enqueueAll(wire.AppendUnsub(nil, sub.topic, ""))
	}
}

// onMessage reads the protocol messages of one WebSocket message.
func (cl *Client) onMessage(c *Conn, m Message) {
	inbox := false // an inbox message came in this WebSocket message
	for f, err := range wire.ServerFrames(m.Data, m.Binary) {
		if err != nil {
			err = protocolError(err)
			var pe *ProtocolError
			if errors.As(err, &pe) && pe.Code == CodeUnknownOp {
				continue // a newer server's op: ignored, as PROTOCOL.md asks
			}
			cl.report(fmt.Errorf("tether: unreadable message from the server: %w", err))
			continue
		}
		switch f.Op {
		case wire.OpPing:
			_ = c.enqueueControl(wire.AppendPong(nil, f.TS))
		case wire.OpPong:
			c.pings.pong(f.TS)
		case wire.OpMsg:
			if f.Topic == "" && f.Epoch != "" {
				inbox = true
				cl.deliverInbox(c, f)
				continue
			}
			if f.Topic == "" {
				if h := cl.cfg.conn.onMessage; h != nil {
					h(c, Message{Data: f.Data, Binary: f.Kind == wire.KindBinary})
				}
				continue
			}
			cl.deliver(f)
		case wire.OpPresence:
			cl.presence(f)
		case wire.OpResync:
			cl.resync(f.Topic)
		case wire.OpAck:
			cl.answer(f, nil)
		case wire.OpError:
			pe := &ProtocolError{Code: ErrorCode(f.Code), Reason: f.Reason, ID: f.ID}
			if f.ID == "" {
				cl.report(fmt.Errorf("tether: the server refused a message: %w", pe))
				continue
			}
			cl.answer(f, pe)
		}
		// welcome (only first, read by connect): nothing to do.
	}
	if inbox {
		// Once the handler has had them, and once per WebSocket message:
		// a replay of many messages costs few received.
		cl.ackInbox(c)
	}
}

// deliver hands a topic message to its handler, unless it is one the
// handler already had.
func (cl *Client) deliver(f wire.Frame) {
	cl.mu.Lock()
	sub := cl.subs[f.Topic]
	if sub == nil {
		cl.mu.Unlock()
		return // unsubscribed: what was in flight is ignored
	}
	if sub.known && f.Epoch == sub.pos.Epoch && f.Seq <= sub.pos.Seq {
		cl.mu.Unlock()
		return // had it already
	}
	// A jump in seq, or a new epoch that does not start at 1, means
	// messages were lost (a server that drops for slow clients): the
	// topic's state is stale, as after a resync.
	gap := sub.known && (f.Epoch == sub.pos.Epoch && f.Seq > sub.pos.Seq+1 || f.Epoch != sub.pos.Epoch && f.Seq != 1)
	sub.pos, sub.known = Position{Epoch: f.Epoch, Seq: f.Seq}, true
	cl.mu.Unlock()
	if gap && cl.cfg.conn.observer.Resync != nil {
		cl.cfg.conn.observer.Resync(f.Topic)
	}
	sub.handler(Message{Topic: f.Topic, Position: Position{Epoch: f.Epoch, Seq: f.Seq}, Data: f.Data, Binary: f.Kind == wire.KindBinary})
}

// deliverInbox hands a message of the user's inbox to the OnMessage
// handler, unless it is one the handler already had: a replay, on a new
// conn, of a message whose received was lost with the old one.
func (cl *Client) deliverInbox(c *Conn, f wire.Frame) {
	pos := Position{Epoch: f.Epoch, Seq: f.Seq}
	cl.mu.Lock()
	if pos.Epoch == cl.inbox.Epoch && pos.Seq <= cl.inbox.Seq {
		cl.mu.Unlock()
		return // had it already; acknowledged again after this message
	}
	// Another epoch is new whatever its seq: the inbox was emptied and
	// forgotten, or the server lost it.
	cl.inbox = pos
	cl.mu.Unlock()
	if h := cl.cfg.conn.onMessage; h != nil {
		h(c, Message{Position: pos, Data: f.Data, Binary: f.Kind == wire.KindBinary})
	}
}

// ackInbox acknowledges, on c, the inbox messages handed over so far.
// The received goes at once when the rate limit the server advertised
// allows; else a timer sends it when it does, with whatever has been
// handed over by then, so that many WebSocket messages in a row cost one.
// It is never kept for another conn: the server replays there what was
// not acknowledged, and the client drops what it had.
func (cl *Client) ackInbox(c *Conn) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.closed || cl.conn != c {
		return
	}
	if cl.ackConn != c {
		cl.stopAckLocked()
		cl.ackConn = c
	}
	cl.ackDue = cl.inbox
	if cl.ackTimer != nil || cl.ackDue == cl.acked {
		return // due already, or said already on this conn
	}
	var delay time.Duration
	if cl.lim != nil {
		delay = cl.lim.Reserve().Delay()
	}
	if delay <= 0 {
		cl.sendAckLocked(c)
		return
	}
	cl.ackTimer = time.AfterFunc(delay, func() {
		cl.mu.Lock()
		defer cl.mu.Unlock()
		if cl.ackConn != c || cl.ackTimer == nil {
			return // the conn is gone
		}
		cl.ackTimer = nil
		if !cl.closed && cl.conn == c {
			cl.sendAckLocked(c)
		}
	})
}

// sendAckLocked queues a received of ackDue on c, past the queue's
// bounds as a subscription goes: it is small, and without it the hub
// keeps the messages.
func (cl *Client) sendAckLocked(c *Conn) {
	c.enqueueAll(wire.AppendReceived(nil, cl.ackDue.Epoch, cl.ackDue.Seq, ""))
	cl.acked = cl.ackDue
}

// stopAckLocked forgets the acknowledgements of the conn they were for.
func (cl *Client) stopAckLocked() {
	if cl.ackTimer != nil {
		cl.ackTimer.Stop()
	}
	cl.ackConn, cl.ackTimer = nil, nil
	cl.ackDue, cl.acked = Position{}, Position{}
}

// presence applies a presence message to its subscription and reports
// it to the observer.
func (cl *Client) presence(f wire.Frame) {
	cl.mu.Lock()
	sub := cl.subs[f.Topic]
	if sub == nil {
		cl.mu.Unlock()
		return
	}
	ev := PresenceEvent{Topic: f.Topic, Snapshot: f.Snapshot}
	if f.Snapshot || sub.members == nil {
		sub.members = make(map[string]Member, len(f.Joins))
	}
	for _, j := range f.Joins {
		m := Member{UserID: j.User}
		if j.Meta != nil {
			m.Conns = []adapter.MemberConn{{Meta: j.Meta}}
		}
		sub.members[j.User] = m
		ev.Joins = append(ev.Joins, m)
	}
	for _, l := range f.Leaves {
		delete(sub.members, l.User)
		ev.Leaves = append(ev.Leaves, Member{UserID: l.User})
	}
	sub.count = len(sub.members) // from a server that does not count
	if f.Count >= 0 {
		sub.count = int(f.Count)
	}
	ev.Count = sub.count
	cl.mu.Unlock()
	if h := cl.cfg.conn.observer.Presence; h != nil {
		h(ev)
	}
}

// Presence returns the presence on topic as the server last told it:
// count, how many users are present, and members, who they are, sorted by
// user ID, or nil while the topic is too big for the server to list them
// (PROTOCOL.md, presence). Both are zero until the client is subscribed
// and the server has sent the topic's first presence, and for a topic
// that tracks none.
func (cl *Client) Presence(topic string) (members []Member, count int) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	sub := cl.subs[topic]
	if sub == nil {
		return nil, 0
	}
	if len(sub.members) == sub.count {
		members = slices.SortedFunc(maps.Values(sub.members), func(a, b Member) int { return strings.Compare(a.UserID, b.UserID) })
	}
	return members, sub.count
}

// resync marks topic stale: its position is unknown until the next
// message, and the application must reload it.
func (cl *Client) resync(topic string) {
	cl.mu.Lock()
	sub := cl.subs[topic]
	if sub == nil {
		cl.mu.Unlock()
		return
	}
	sub.known = false
	cl.mu.Unlock()
	if cl.cfg.conn.observer.Resync != nil {
		cl.cfg.conn.observer.Resync(topic)
	}
}

// answer settles the request that f, an ack or an error, answers: err
// is nil for an ack.
func (cl *Client) answer(f wire.Frame, err *ProtocolError) {
	cl.mu.Lock()
	req := cl.requests[f.ID]
	if req == nil {
		cl.mu.Unlock()
		return
	}
	delete(cl.requests, f.ID)
	var report error
	var stale bool
	switch {
	case req.op == wire.OpSub:
		sub := req.sub
		current := cl.subs[sub.topic] == sub
		switch {
		case err != nil && current && sub.waiter == nil && (err.Code == CodeRateLimited || err.Code == CodeInternal):
			// For a while only: try again on this conn, backing off.
			delay := cl.cfg.backoff.Delay(sub.retries)
			sub.retries++
			c := cl.conn
			sub.retry = time.AfterFunc(delay, func() {
				cl.mu.Lock()
				defer cl.mu.Unlock()
				if !cl.closed && cl.conn == c && cl.subs[sub.topic] == sub {
					cl.subscribeLocked(c, sub)
				}
			})
			report = fmt.Errorf("tether: re-subscription to %q refused, retrying in %v: %w", sub.topic, delay.Round(time.Millisecond), err)
		case err != nil && current:
			delete(cl.subs, sub.topic)
			if sub.waiter == nil {
				report = fmt.Errorf("tether: re-subscription to %q refused, the subscription is gone: %w", sub.topic, err)
			}
		case err == nil && current && !req.since && f.Epoch != "":
			// Live messages start after the ack's position. A topic
			// subscribed before without a position (a resync, then the
			// conn was lost before any message) missed what came between.
			stale = sub.acked
			sub.pos, sub.known = Position{Epoch: f.Epoch, Seq: f.Seq}, true
		}
		if err == nil {
			sub.acked, sub.retries = true, 0
		}
		if w := sub.waiter; w != nil {
			sub.waiter = nil
			if err != nil {
				w <- err
			} else {
				w <- nil
			}
		}
		if req.batch {
			cl.resubAnsweredLocked()
		}
	case err != nil:
		what := "message"
		if req.op == wire.OpPub {
			what = fmt.Sprintf("publication to %q", req.topic)
		}
		report = fmt.Errorf("tether: the server refused a %s: %w", what, err)
	}
	topic := req.topic
	cl.mu.Unlock()
	if report != nil {
		cl.report(report)
	}
	if stale && cl.cfg.conn.observer.Resync != nil {
		cl.cfg.conn.observer.Resync(topic)
	}
}

func (cl *Client) report(err error) {
	if f := cl.cfg.conn.observer.Error; f != nil {
		f(err)
		return
	}
	cl.cfg.conn.logger.Warn("tether: client", "err", err)
}
