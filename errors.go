package tether

import (
	"errors"

	"github.com/coder/websocket"
)

// Reasons a connection ends, as returned by [Conn.Err] and passed to
// [Observer].Disconnect. Test for them with [errors.Is].
//
// When the peer closed the connection with a close frame, the reason wraps
// a [websocket.CloseError]: read the peer's code with [websocket.CloseStatus].
// When this side closed it with [Conn.Close], the reason wraps both
// [net.ErrClosed] and the [websocket.CloseError] that was sent.
var (
	// ErrHeartbeatTimeout: the peer sent nothing at all (no data, ping or
	// pong) for the heartbeat timeout. The conn was dropped without a close
	// handshake, since a dead peer cannot answer one.
	ErrHeartbeatTimeout = errors.New("tether: heartbeat timeout")

	// ErrQueueFull: the send queue was full. With the Disconnect overflow
	// policy the conn is closed with [StatusSlowConsumer]; [Conn.Send]
	// returns it too, for a message that was not queued.
	ErrQueueFull = errors.New("tether: send queue full")

	// ErrWriteTimeout: a write did not complete within the write timeout;
	// the peer is not reading. The conn was dropped.
	ErrWriteTimeout = errors.New("tether: write timeout")

	// ErrMessageTooBig: the peer sent a message over the size limit. The
	// conn was closed with [websocket.StatusMessageTooBig] (1009).
	ErrMessageTooBig = errors.New("tether: message too big")

	// ErrPingFlood: the peer sent ping frames faster than the inbound ping
	// limit. The conn was closed with [websocket.StatusPolicyViolation] (1008).
	ErrPingFlood = errors.New("tether: ping flood")

	// ErrConnLost: the transport failed (EOF, reset) without a close frame.
	ErrConnLost = errors.New("tether: connection lost")

	// ErrRateLimited: a hub conn kept sending past its rate limit (see
	// [WithRateLimit]). It was closed with [StatusRateLimited] and a
	// retry_ms hint. A [Client] returns it from Publish and Send past the
	// limit the server advertised, without sending.
	ErrRateLimited = errors.New("tether: rate limited")

	// ErrProtocolViolation: a hub conn kept sending messages the hub could
	// not read (more than 10 in a burst, or one a second sustained), and
	// was closed with [websocket.StatusPolicyViolation] (1008); or a raw
	// peer sent a text message in invalid UTF-8, and was closed with
	// [websocket.StatusInvalidFramePayloadData] (1007).
	ErrProtocolViolation = errors.New("tether: protocol violation")
)

// Errors of the [Hub]'s API and handshakes. [Hub.Serve] returns the
// handshake refusals, after answering the request.
var (
	// ErrHubClosed: the hub is shutting down or closed. Serve answers 503.
	ErrHubClosed = errors.New("tether: hub closed")

	// ErrHubFull: the hub has as many conns as [WithMaxConns] allows.
	// Serve answers 503.
	ErrHubFull = errors.New("tether: hub full")

	// ErrUnauthorized: [WithAuth] refused the handshake; the error wraps
	// the one it returned. Serve answers 401.
	ErrUnauthorized = errors.New("tether: unauthorized")

	// ErrOriginNotAllowed: a cross-origin handshake that
	// [WithOriginPatterns] does not allow. Serve answers 403.
	ErrOriginNotAllowed = errors.New("tether: origin not allowed")

	// ErrNotJSON: data for a protocol v1 peer must be a JSON value, since
	// it travels inside a protocol message.
	ErrNotJSON = errors.New("tether: data is not a JSON value")
)

// Close codes tether uses beyond RFC 6455's. Codes 4000-4999 are private
// use; the client treats 4401 and 4403 as final and retries after the others.
const (
	// StatusSlowConsumer (4008): the peer read too slowly and its send
	// queue overflowed. Reconnecting is fine.
	StatusSlowConsumer websocket.StatusCode = 4008
	// StatusUnauthorized (4401): authentication failed; do not retry.
	StatusUnauthorized websocket.StatusCode = 4401
	// StatusForbidden (4403): the peer may not do this; do not retry.
	StatusForbidden websocket.StatusCode = 4403
	// StatusRateLimited (4429): too many messages; retry later.
	StatusRateLimited websocket.StatusCode = 4429
)
