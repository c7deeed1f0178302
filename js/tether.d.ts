// Type declarations of tether.js, the client of tether's wire protocol v1.

/** The subprotocol of wire protocol v1: "tether.v1". */
export declare const SUBPROTOCOL: 'tether.v1'

/** The client's states. */
export type TetherState = 'connecting' | 'connected' | 'reconnecting' | 'closed'

/** How a delay is drawn below its ceiling min(max, base·factor^attempt). */
export type Jitter = 'full' | 'equal' | 'none' | 'decorrelated'

export interface BackoffOptions {
  /** Ceiling of the first delay, ms. Default 500. */
  base?: number
  /** Cap of every delay, ms. Default 30000 (or base, if longer). */
  max?: number
  /** Growth of the ceiling per attempt, at least 1. Default 2. */
  factor?: number
  /** Default 'full': uniform in [0, ceiling]. */
  jitter?: Jitter
  /** How long a conn must stay up before the attempt count resets, ms. Default 10000. */
  stableAfter?: number
  /** Rounds of attempts in a row that may fail before the client closes with 'gave_up'; 0 (default) retries forever. */
  maxRetries?: number
  /** With maxRetries: after that many failed rounds in a row, wait this long (ms), then start another round instead of giving up. 0 (the default) gives up. */
  quiet?: number
}

/** The constructor of a WHATWG WebSocket: the browser's, or the ws package's in Node. */
export interface WebSocketConstructor {
  new (url: string, protocols?: string | string[]): WebSocketLike
}

/** What the client uses of a WebSocket. */
export interface WebSocketLike {
  readonly readyState: number
  readonly protocol: string
  readonly bufferedAmount: number
  binaryType: string
  onopen: ((ev: any) => void) | null
  onmessage: ((ev: { data: any }) => void) | null
  onerror: ((ev: any) => void) | null
  onclose: ((ev: { code: number, reason: string }) => void) | null
  send (data: string | Uint8Array): void
  close (code?: number, reason?: string): void
  /** ws (Node) only: drops the socket at once. */
  terminate? (): void
}

export interface TetherOptions {
  backoff?: BackoffOptions
  /** Bounds of what publish() and send() keep while offline. Default 256 messages, 1 MiB (of encoded messages). 0 messages disables it. */
  offlineBuffer?: { messages?: number, bytes?: number }
  /** Subprotocols offered; 'tether.v1' is always offered, first. */
  protocols?: string[]
  /** The WebSocket constructor. Default globalThis.WebSocket; in Node 20, pass the ws package's. */
  WebSocket?: WebSocketConstructor
  /** Returns the token for each connection attempt, sent as ?token=… (browsers cannot set headers). A failure fails that attempt. */
  token?: () => string | Promise<string>
  /** The heartbeat until a welcome gives the server's, ms; timeout also bounds each attempt. Default 15000 / 30000. */
  heartbeat?: { interval?: number, timeout?: number }
  /** How long a probe (a ping when the page becomes visible, the network comes back, or probe()) waits for an answer, ms, bounded by timeout − interval. Default 2000. */
  /** How long the client may be without a conn before it emits 'offline', once per outage, ms. Default 5000; 0: never. */
  offlineAfter?: number
  probeGrace?: number
  /** Clock and timers, for tests: now() is wall-clock ms (default Date.now). */
  timers?: {
    now?: () => number
    setTimeout?: (fn: () => void, ms: number) => any
    clearTimeout?: (handle: any) => void
  }
}

/** Where a topic message sits in its topic's history. */
export interface MessageMeta {
  topic: string
  epoch: string
  seq: number
}

/** Where a message of the user's inbox sits in it (PROTOCOL.md, section 10.1): the inbox's epoch and the message's seq. */
export interface InboxMeta {
  epoch: string
  seq: number
}

/** Options of subscribe(). */
export interface SubscribeOptions {
  /** Start after this message (the meta of the last one the application handled): the server replays what came after it, or the client gets a 'resync' event. Wins over latest. */
  since?: { epoch: string, seq: number }
  /** Receive the topic's last message first, when the server's history still holds it (its current value), then the live ones; nothing more when the topic has had none. Only on the first subscription: a reconnect resumes with since. */
  latest?: boolean
}

/** The answer to subscribe(): the topic's position when the subscription took effect, when the server gave one (with latest, the position before the latest message, which follows). */
export interface SubscribePosition {
  topic: string
  epoch?: string
  seq?: number
}

/** A user on a topic: the application's user id, and its data about the user's first connection (its device, …) when it gives any. */
export interface PresenceMember {
  user: string
  meta?: unknown
}

/** A presence message of a topic (PROTOCOL.md, "presence"). */
export interface PresenceChange {
  /** Users who arrived; with snapshot, every user the topic lists (none while it only counts them). */
  joins: PresenceMember[]
  /** Users who left (empty in a snapshot, and while the topic only counts its members). */
  leaves: PresenceMember[]
  /** How many users are present after this change: the server's count, or, from a server before count, the length of the client's list. */
  count: number
  /** joins replaces everything known of the topic's presence. */
  snapshot: boolean
}

/** Who is on a topic, as the server last told: presence(topic). */
export interface PresenceView {
  /** How many users are present. */
  count: number
  /** Every member, sorted by user; null while the topic only counts its members (it has more than the server lists). */
  members: PresenceMember[] | null
}

/** The welcome, as the server sent it (PROTOCOL.md, section 4). */
export interface Welcome {
  op: 'welcome'
  session: string
  heartbeat: { interval_ms: number, timeout_ms: number }
  limits?: { msgs_per_s: number, burst: number }
  resume?: Array<{ topic: string, epoch: string, seq: number, status: 'ok' | 'resync' | string }>
  [field: string]: unknown
}

export interface TetherEvents {
  /** A new state; err is why the conn was lost (reconnecting) or why the client closed (closed). */
  state: (state: TetherState, err: TetherError | undefined) => void
  /** A direct message from the server application: a JSON value, a string for text that is not JSON, or a Uint8Array for bytes. meta is its place in the user's inbox for a message of the inbox (a server with one, such as a hub WithInbox), else undefined; the client acknowledges inbox messages once the listeners have had them, and drops a replay of one they had: once each within a TetherClient, at least once across page loads. */
  message: (data: any, meta: InboxMeta | undefined) => void
  /** The client has not been connected for offlineAfter ms: once per outage. */
  offline: () => void
  /** A presence message of a subscribed topic, applied to presence(topic) before the event. */
  presence: (topic: string, change: PresenceChange) => void
  /** The client cannot resume topic: reload its state; live messages follow. */
  resync: (topic: string) => void
  /** Something went wrong away from any call (a malformed frame, a refused message without id, a listener that threw); the client goes on. */
  error: (err: TetherError) => void
  /** Round trip of a protocol ping, ms. */
  rtt: (ms: number) => void
  welcome: (welcome: Welcome) => void
}

/** Codes the client itself gives; the server's error codes (forbidden, bad_request, rate_limited, too_big, internal, …) come as they are. */
export type TetherErrorCode =
  | 'buffer_full' | 'offline' | 'rate_limited' | 'conn_lost' | 'closed'
  | 'unauthorized' | 'forbidden' | 'rejected' | 'heartbeat_timeout' | 'connect_failed' | 'gave_up'
  | 'bad_frame' | 'handler' | 'already_subscribed' | 'not_json' | 'bad_request'
  | (string & {})

export declare class TetherError extends Error {
  constructor (code: string, message: string, extra?: object)
  readonly name: 'TetherError'
  code: TetherErrorCode
  /** The close code, for errors that a close caused. */
  closeCode?: number
  /** The close reason, or the server's error reason. */
  reason?: string
  /** The HTTP status of a refused handshake (Node only: browsers hide it). */
  status?: number
  /** The retry_ms hint of the close reason. */
  retryMs?: number
  /** The request's id, for a refused request. */
  id?: string
  topic?: string
  /** The server refused the client for good: it closed (4401, 4403, or not tether.v1). */
  terminal?: boolean
}

export declare class TetherClient {
  /**
   * Connects at once, and stays connected until close().
   * @param urls one URL (ws:, wss:, http:, https:, or relative to the page), or several to fail over between: tried in turn, sticking to the last that worked.
   */
  constructor (urls: string | string[], options?: TetherOptions)

  readonly state: TetherState
  /** Round trip of the last protocol ping, ms; undefined before the first. */
  rtt: number | undefined
  /** The URL of the current or last conn. */
  url: string | undefined
  /** Why the client closed, once closed by the server or by giving up; undefined after close(). */
  error: TetherError | undefined
  /** The topics subscribed to. */
  readonly topics: string[]
  /** The heartbeat in force, ms: the welcome's, or the defaults before it. */
  readonly heartbeat: { interval: number, timeout: number }

  on<E extends keyof TetherEvents> (event: E, fn: TetherEvents[E]): this
  off<E extends keyof TetherEvents> (event: E, fn: TetherEvents[E]): this

  /** Resolves on the server's ack (rejects with its error code); the handler gets the messages from then on, resumed across reconnects: a JSON value, a string for text that is not JSON, or a Uint8Array for bytes. */
  subscribe (topic: string, handler: (data: any, meta: MessageMeta) => void, options?: SubscribeOptions): Promise<SubscribePosition>
  /** Also forgets the topic's presence. */
  unsubscribe (topic: string): void
  /** Who is on topic, as the server last told; undefined when not subscribed to it, or no presence of it has come yet (a topic that tracks none sends none). Kept across reconnects until the new conn's snapshot replaces it. */
  presence (topic: string): PresenceView | undefined
  /** Resolves on the server's ack. data is a JSON value, or bytes (ArrayBuffer, typed array, DataView), which subscribers get as bytes. Buffered while offline (rejects 'buffer_full' past the bound; 'offline' with volatile). */
  publish (topic: string, data: unknown, options?: { volatile?: boolean }): Promise<void>
  /** A direct message to the server application, buffered like publish(). */
  send (data: unknown, options?: { volatile?: boolean }): Promise<void>
  /** Checks the conn now: a ping, and the server presumed dead without an answer within probeGrace. */
  probe (): void
  /** Final: state 'closed', pending promises rejected with 'closed'. Resolves once the socket has closed. */
  close (): Promise<void>
}

/** The delay before attempt (from 0), as the client draws it. */
export declare function backoffDelay (backoff: Required<Pick<BackoffOptions, 'base' | 'max' | 'factor' | 'jitter'>>, attempt: number): number
