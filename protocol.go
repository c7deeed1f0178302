package tether

import "github.com/tether-ws/tether/internal/wire"

// Subprotocol is the WebSocket subprotocol of tether's wire protocol v1
// (see PROTOCOL.md). A peer that does not ask for it during the handshake
// is a plain WebSocket peer: its messages pass through untouched.
const Subprotocol = "tether.v1"

// ErrorCode says why a protocol message was refused. It travels as the
// code field of an error message, and as [ProtocolError].Code. Clients
// must accept codes they do not know: later versions may add some.
type ErrorCode = wire.Code

// The error codes of protocol v1.
const (
	// CodeBadRequest: the message is not one JSON object in valid UTF-8,
	// or a field is missing, of the wrong type or out of bounds (a topic
	// over 256 bytes, an id over 64). Sending it again fails again.
	CodeBadRequest ErrorCode = wire.CodeBadRequest
	// CodeUnknownOp: the op is unknown, or is one the other side sends.
	CodeUnknownOp ErrorCode = wire.CodeUnknownOp
	// CodeForbidden: the application refused this subscription or
	// publication. The connection stays open.
	CodeForbidden ErrorCode = wire.CodeForbidden
	// CodeRateLimited: the message exceeded a rate limit and was dropped.
	// Sending it later may succeed.
	CodeRateLimited ErrorCode = wire.CodeRateLimited
	// CodeTooBig: a payload is over a limit the server sets on it, below
	// the message size limit (over that one the connection is closed with
	// 1009 instead).
	CodeTooBig ErrorCode = wire.CodeTooBig
	// CodeInternal: the server failed to carry out a valid request.
	// Sending it again later may succeed.
	CodeInternal ErrorCode = wire.CodeInternal
)

// ProtocolError is a protocol message that was refused, or the error
// message that says so: the server sends it to the client as an error
// message with the same code, reason and id. Its fields: Code ([ErrorCode])
// says why, for programs; Reason says why, for people; ID is the id of the
// refused request, or "" if it had none or its id could not be read.
// Error returns "tether: protocol: <code>: <reason>".
type ProtocolError = wire.Error
