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
// wakes the conns that are due. On Linux a quiet accepted conn holds no
// goroutine and no I/O buffer either: its reader parks in a shared epoll
// poller between messages, the wheel writes its pings between two of its
// frames, and the poller settles their pongs. An idle conn costs a few
// kilobytes.
//
// # Sending and receiving
//
// [Conn.Send] queues without blocking onto a queue bounded in messages and
// bytes ([Limits]); a writer goroutine runs only while the queue holds
// messages (a hub keeps finished ones for the next writer), and each write
// has a timeout so a stalled reader is dropped
// rather than holding anyone up. Inbound messages go to the [OnMessage]
// function.
//
// # Hub
//
// A [Hub] serves many conns from an existing http.Handler ([Hub.Serve], or
// the hub itself as a handler) and delivers to them: [Hub.Publish] to a
// topic's subscribers, [Hub.SendToUser] to every device of a user (or,
// when none is connected, to an offline store until the next connect),
// [Hub.Broadcast] to all. A message is encoded once, whatever the number
// of receivers, and queued without blocking; queued messages leave in one
// frame, newline-joined, so a busy conn costs one write for many messages.
//
// Peers that ask for the subprotocol [Subprotocol] speak wire protocol v1
// (PROTOCOL.md in the repository): they subscribe by themselves, resume a
// topic after a reconnect from its history without loss or duplicates
// (or are told to resync), see who is present on a topic
// ([Hub.Presence]), and keep the server alive with app-level pings.
// Other peers are raw: plain WebSocket, whose topics the application
// picks with [Hub.Subscribe].
//
// Admission ([WithAuth], [WithOriginPatterns], [WithMaxConns]), limits
// ([WithRateLimit], [Limits]) and [Hub.Shutdown] answer bad
// input and overload with documented close codes and error values, and
// never let one conn slow down another.
//
// # Client
//
// [Dial] connects a Go program to a hub as a protocol v1 [Client] that
// keeps itself connected: it reconnects with a jittered [Backoff], tries
// [WithFallbackURLs] in turn, follows the heartbeat the server advertises,
// subscribes again from each topic's last position ([Client.Subscribe]),
// and keeps what [Client.Publish] and [Client.Send] are given while
// offline until the next conn ([WithOfflineBuffer]). Refusals that
// retrying cannot fix (401, 403, close 4401 and 4403) end it for good.
//
// # Several nodes
//
// [WithBroker] links hubs in several processes through a broker (the
// module tether/redisbroker is one over Redis): publications reach every
// node's subscribers in one order, direct messages reach the user on any
// node, and history, offline messages and presence are shared, so a
// client resumes on whichever node it reaches. While the broker is down a
// hub goes on serving its own conns. What a broker, a history or an
// offline store implements is in package tether/adapter, with the
// in-memory defaults.
//
// # Options and hooks
//
// Options are typed by where they apply: an [Option] everywhere, a
// [ServerOption] on [Accept] and [NewHub], a [HubOption] on NewHub only, a
// [DialOption] on [Dial] only, so the compiler refuses one where it means
// nothing. Every event hook, for the application as for metrics, is a
// field of [Observer]; [WithObserver] may be given more than once.
//
// # Errors and close codes
//
// [Conn.Err] says why a conn ended, as one of the Err* values (test with
// [errors.Is]) or a [*CloseError] carrying the close frame's code and
// reason (find it with [errors.As]), or, when this side dropped it, an
// error wrapping [net.ErrClosed]; the messages are tether's, readable as
// they are ("tether: connection lost: EOF"). tether's own close codes are
// the Status* constants.
package tether
