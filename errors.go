package tether

import (
	"errors"
	"net"
	"strconv"
	"strings"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether/internal/wire"
)

// The conditions tether reports. Test for them with [errors.Is]: the
// errors returned wrap them with what happened. Why a conn ended ([Conn.Err],
// [Observer].Disconnect) is one of the first seven, a [*CloseError] when a
// close frame ended it, or an error wrapping [net.ErrClosed] when this side
// dropped it ([Conn.CloseNow], [Hub.Close], a [Hub.Shutdown] past its
// deadline).
var (
	// ErrHeartbeatTimeout: the peer sent nothing at all (no data, ping or
	// pong) for the heartbeat timeout. The conn was dropped without a close
	// handshake, since a dead peer cannot answer one.
	ErrHeartbeatTimeout = errors.New("tether: heartbeat timeout")

	// ErrWriteTimeout: a write did not complete within the write timeout;
	// the peer is not reading. The conn was dropped.
	ErrWriteTimeout = errors.New("tether: write timeout")

	// ErrConnLost: the transport failed (EOF, reset) without a close frame.
	ErrConnLost = errors.New("tether: connection lost")

	// ErrQueueFull: a message found no room. A conn's send queue was full
	// (see [Limits]): with the Disconnect overflow policy the conn was
	// closed with [StatusSlowConsumer]; [Conn.Send] returns it too, for a
	// message it did not queue. A [Client]'s offline buffer was full (see
	// [WithOfflineBuffer]): the message was not kept.
	ErrQueueFull = errors.New("tether: queue full")

	// ErrMessageTooBig: the peer sent a message over the size limit. The
	// conn was closed with [websocket.StatusMessageTooBig] (1009).
	ErrMessageTooBig = errors.New("tether: message too big")

	// ErrRateLimited: a hub conn kept sending past its rate limit (see
	// [WithRateLimit]). It was closed with [StatusRateLimited] and a
	// retry_ms hint. A [Client] returns it from Publish and Send past the
	// limit the server advertised, without sending.
	ErrRateLimited = errors.New("tether: rate limited")

	// ErrProtocolViolation: the peer broke the rules. It sent ping frames
	// faster than 10 a second sustained, or, on a hub, kept sending
	// messages the hub could not read (more than 10 in a burst, or one a
	// second sustained), and was closed with
	// [websocket.StatusPolicyViolation] (1008); or a raw peer sent a text
	// message in invalid UTF-8, and was closed with
	// [websocket.StatusInvalidFramePayloadData] (1007).
	ErrProtocolViolation = errors.New("tether: protocol violation")

	// ErrUnauthorized: [WithAuth] refused a handshake, and [Hub.Serve]
	// answered 401; the error wraps the one WithAuth returned. A [Client]
	// returns it when the server refused it with HTTP 401 or close code
	// [StatusUnauthorized], and does not retry.
	ErrUnauthorized = errors.New("tether: unauthorized")

	// ErrForbidden: a cross-origin handshake that [WithOriginPatterns]
	// does not allow, which Serve answered with 403. A [Client] returns it
	// when the server refused it with HTTP 403 or close code
	// [StatusForbidden], and does not retry.
	ErrForbidden = errors.New("tether: forbidden")

	// ErrRejected: the server refused a [Client]'s handshake with an HTTP
	// status that retrying will not change (400, 404 and the other 4xx but
	// 408, 425 and 429), or does not speak protocol v1. The client does
	// not retry.
	ErrRejected = errors.New("tether: handshake rejected")

	// ErrHubClosed: the hub is shutting down, closed, or draining (a
	// [Hub.Rebalance] of every conn). Serve answers 503.
	ErrHubClosed = errors.New("tether: hub closed")

	// ErrHubFull: the hub has as many conns as [WithMaxConns] allows.
	// Serve answers 503.
	ErrHubFull = errors.New("tether: hub full")

	// ErrOverloaded: the hub takes new conns more slowly than they come
	// ([WithAdmission]), or sheds load ([WithBreaker]). Serve answers 503
	// with a Retry-After.
	ErrOverloaded = errors.New("tether: overloaded")

	// ErrInvalidUTF8: data sent as text is not valid UTF-8, which a
	// text message must be (RFC 6455, section 5.6). Send bytes as binary.
	ErrInvalidUTF8 = errors.New("tether: text is not valid UTF-8")

	// ErrBrokerDown: an operation that reaches every node
	// ([Hub.Broadcast], [Hub.DisconnectUser], [Hub.SubscribeUser]) could
	// not reach the other nodes: the broker's link is down. This node's
	// conns were reached.
	ErrBrokerDown = errors.New("tether: broker unreachable")

	// ErrOffline: a volatile message found the [Client] not Connected and
	// was dropped.
	ErrOffline = errors.New("tether: offline")
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

// CloseError is a close frame that ended a conn: the one the peer sent,
// or, with Local set, the one this side sent with [Conn.Close]. Find it in
// [Conn.Err] with [errors.As]. It unwraps to the [websocket.CloseError]
// with the same code and reason, so [websocket.CloseStatus] reads it too;
// a local one also wraps [net.ErrClosed].
type CloseError struct {
	Code   websocket.StatusCode
	Reason string
	// Local is true when this side sent the close frame.
	Local bool
	peer  string // who sent it, for the message: "server", "client" or "peer"
}

// Error says who closed the conn, with what code and why, such as
// "tether: server closed the connection: going away (1001), retry in 531 ms".
func (e *CloseError) Error() string {
	var b strings.Builder
	b.WriteString("tether: ")
	switch {
	case e.Local:
		b.WriteString("closed the connection")
	case e.peer != "":
		b.WriteString(e.peer + " closed the connection")
	default:
		b.WriteString("peer closed the connection")
	}
	b.WriteString(": ")
	b.WriteString(statusText(e.Code))
	b.WriteString(" (" + strconv.Itoa(int(e.Code)) + ")")
	if ms, ok := strings.CutPrefix(e.Reason, "retry_ms="); ok && ms != "" && strings.Trim(ms, "0123456789") == "" {
		b.WriteString(", retry in " + ms + " ms")
	} else if e.Reason != "" {
		b.WriteString(": " + e.Reason)
	}
	return b.String()
}

// Unwrap returns the [websocket.CloseError], and for a local close
// [net.ErrClosed].
func (e *CloseError) Unwrap() []error {
	ws := websocket.CloseError{Code: e.Code, Reason: e.Reason}
	if e.Local {
		return []error{ws, net.ErrClosed}
	}
	return []error{ws}
}

// statusText names a close code for people.
func statusText(code websocket.StatusCode) string {
	switch code {
	case websocket.StatusNormalClosure:
		return "normal closure"
	case websocket.StatusGoingAway:
		return "going away"
	case websocket.StatusProtocolError:
		return "protocol error"
	case websocket.StatusUnsupportedData:
		return "unsupported data"
	case websocket.StatusNoStatusRcvd:
		return "no status"
	case websocket.StatusInvalidFramePayloadData:
		return "invalid data"
	case websocket.StatusPolicyViolation:
		return "policy violation"
	case websocket.StatusMessageTooBig:
		return "message too big"
	case websocket.StatusMandatoryExtension:
		return "extension required"
	case websocket.StatusInternalError:
		return "internal error"
	case websocket.StatusServiceRestart:
		return "service restart"
	case websocket.StatusTryAgainLater:
		return "try again later"
	case websocket.StatusBadGateway:
		return "bad gateway"
	case StatusSlowConsumer:
		return "slow consumer"
	case StatusUnauthorized:
		return "unauthorized"
	case StatusForbidden:
		return "forbidden"
	case StatusRateLimited:
		return "rate limited"
	}
	return "status"
}

// causeError is an error with a message of its own, for people, that
// still wraps what caused it, for errors.Is and errors.As.
type causeError struct {
	msg  string
	errs []error
}

func (e *causeError) Error() string   { return e.msg }
func (e *causeError) Unwrap() []error { return e.errs }

// because returns an error that reads "<what>: <the root cause of err>"
// and wraps err and the conditions it stands for. The transport's errors
// nest its internal steps ("failed to get reader: failed to read frame
// header: EOF"); a person needs the last of them.
func because(what string, err error, conds ...error) error {
	return &causeError{msg: what + ": " + rootCause(err), errs: append(conds, err)}
}

// rootCause returns the message of the innermost error that err wraps.
func rootCause(err error) string {
	for {
		var next error
		switch e := err.(type) {
		case interface{ Unwrap() error }:
			next = e.Unwrap()
		case interface{ Unwrap() []error }:
			if errs := e.Unwrap(); len(errs) > 0 {
				next = errs[0]
			}
		}
		if next == nil {
			return err.Error()
		}
		err = next
	}
}

// ErrorCode says why a protocol message was refused. It travels as the
// code field of an error message, and as [ProtocolError].Code. Clients
// must accept codes they do not know: later versions may add some.
type ErrorCode string

// The error codes of protocol v1.
const (
	// CodeBadRequest: the message is not one JSON object in valid UTF-8,
	// or a field is missing, of the wrong type or out of bounds (a topic
	// over 256 bytes, an id over 64). Sending it again fails again.
	CodeBadRequest = ErrorCode(wire.CodeBadRequest)
	// CodeUnknownOp: the op is unknown, or is one the other side sends.
	CodeUnknownOp = ErrorCode(wire.CodeUnknownOp)
	// CodeForbidden: the application refused this subscription or
	// publication. The connection stays open.
	CodeForbidden = ErrorCode(wire.CodeForbidden)
	// CodeRateLimited: the message exceeded a rate limit and was dropped.
	// Sending it later may succeed.
	CodeRateLimited = ErrorCode(wire.CodeRateLimited)
	// CodeTooBig: a payload is over a limit the server sets on it, below
	// the message size limit (over that one the connection is closed with
	// 1009 instead).
	CodeTooBig = ErrorCode(wire.CodeTooBig)
	// CodeInternal: the server failed to carry out a valid request.
	// Sending it again later may succeed.
	CodeInternal = ErrorCode(wire.CodeInternal)
)

// ProtocolError is a protocol message that was refused, or the error
// message that says so: the server sends it to the client as an error
// message with the same code, reason and id.
type ProtocolError struct {
	// Code says why, for programs.
	Code ErrorCode
	// Reason says why, for people.
	Reason string
	// ID is the id of the refused request, or "" if it had none or its id
	// could not be read.
	ID string
}

// Error returns "tether: protocol: <code>: <reason>".
func (e *ProtocolError) Error() string {
	return "tether: protocol: " + string(e.Code) + ": " + e.Reason
}

// protocolError gives a refusal of the codec's the API's type; other
// errors, nil included, pass as they are.
func protocolError(err error) error {
	var we *wire.Error
	if errors.As(err, &we) {
		return &ProtocolError{Code: ErrorCode(we.Code), Reason: we.Reason, ID: we.ID}
	}
	return err
}

// checkTopic returns nil if s may name a topic, or a [*ProtocolError] with
// [CodeBadRequest] that says why not.
func checkTopic(s string) error { return protocolError(wire.CheckTopic(s)) }

// appendError encodes an error message of protocol v1.
func appendError(code ErrorCode, reason, id string) []byte {
	return wire.AppendError(nil, wire.Code(code), reason, id)
}
