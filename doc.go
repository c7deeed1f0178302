// Package tether keeps WebSocket connections alive and honest at scale.
//
// # Heartbeats
//
// [Accept] upgrades an HTTP request, and [Wrap] adopts an existing
// coder/websocket conn, giving a [Conn] whose peer is pinged after a
// silence of the heartbeat interval and dropped with [ErrHeartbeatTimeout]
// after a silence of the timeout ([WithHeartbeat], default 15 s / 30 s).
// Any inbound frame is proof of life, so busy conns are never pinged.
// Round trips feed an RFC 6298 estimator ([Conn.RTT]); a ping unanswered
// past srtt + 4·rttvar makes the conn [Suspect]; [WithAdaptiveHeartbeat]
// stretches the heartbeat on stable links.
//
// Heartbeats cost no goroutine or timer per conn: a shared timing wheel
// wakes the conns that are due, and a ping runs in a short-lived goroutine.
// An idle conn is one goroutine (its reader) and a few kilobytes.
//
// # Sending and receiving
//
// [Conn.Send] queues without blocking onto a queue bounded in messages and
// bytes ([WithSendQueue], [WithOverflow]); a writer goroutine exists only
// while the queue holds messages, and each write has a timeout
// ([WithWriteTimeout]) so a stalled reader is dropped rather than holding
// anyone up. Inbound messages go to the [OnMessage] function.
//
// # Errors and close codes
//
// [Conn.Err] says why a conn ended, as one of the Err* values (test with
// [errors.Is]) or a wrapped [websocket.CloseError]. tether's own close codes
// are the Status* constants.
package tether
