// tether.js: the browser and Node client of tether's wire protocol v1
// (PROTOCOL.md). One dependency-free ES module; it mirrors the Go Client
// (client.go, reconnect.go): it reconnects with backoff and jitter, tries
// failover URLs in turn, resumes every topic from its position so that
// nothing is missed or repeated, keeps what is published while offline and
// sends it once the subscriptions are back, acknowledges the messages of
// the user's inbox and drops their replays, and finds dead servers with
// protocol pings, without mistaking a throttled background tab for one.
//
//   import { TetherClient } from './tether.js'
//   const client = new TetherClient('wss://example.com/ws')
//   await client.subscribe('room:42', (data, { seq }) => show(data))
//   await client.publish('room:42', { text: 'hi' })

const encoder = new TextEncoder()
const strictUTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/** The bytes of data if it is an ArrayBuffer or a view of one, else undefined. */
function asBytes (data) {
  if (data instanceof ArrayBuffer) return new Uint8Array(data)
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
  return undefined
}

/**
 * The protocol messages of a binary message: {line, m} for each, m.data
 * holding a record's bytes (a Uint8Array of its own) or text; or
 * {line, problem} for one that cannot be read. After a line that is not
 * JSON, or a len past the end, the records cannot be told apart: that
 * problem is the last.
 */
function * records (buf) {
  const bytes = asBytes(buf)
  let i = 0
  while (i < bytes.length) {
    if (bytes[i] === 10) { i++; continue }
    let nl = bytes.indexOf(10, i)
    if (nl < 0) nl = bytes.length
    let line
    try {
      line = strictUTF8.decode(bytes.subarray(i, nl))
    } catch {
      yield { problem: 'a line is not valid UTF-8' }
      return
    }
    i = nl + 1
    let m
    try {
      m = JSON.parse(line)
    } catch (err) {
      yield { line, problem: `not JSON: ${err.message}` }
      return
    }
    if (m === null || typeof m !== 'object' || Array.isArray(m)) {
      yield { line, problem: 'not a JSON object' }
      return
    }
    if (m.len != null) {
      if (!isUint(m.len) || i + m.len > bytes.length) {
        yield { line, problem: '"len" is not an integer within the message' }
        return
      }
      const body = bytes.slice(i, i + m.len)
      i += m.len
      if ('data' in m) {
        yield { line, problem: '"data" and "len" together' }
        continue
      }
      if (m.text === true) {
        try {
          m.data = strictUTF8.decode(body)
        } catch {
          yield { line, problem: 'text data is not valid UTF-8' }
          continue
        }
      } else {
        m.data = body
      }
    }
    yield { line, m }
  }
}

/** The subprotocol of wire protocol v1. */
export const SUBPROTOCOL = 'tether.v1'

const OPEN = 1 // WebSocket.OPEN, the same in browsers and in ws

const DEFAULT_BACKOFF = { base: 500, max: 30000, factor: 2, jitter: 'full', stableAfter: 10000, maxRetries: 0, quiet: 0 }
const DEFAULT_HEARTBEAT = { interval: 15000, timeout: 30000 }
const DEFAULT_BUFFER = { messages: 256, bytes: 1 << 20 }
const DEFAULT_PROBE_GRACE = 2000
const DEFAULT_OFFLINE_AFTER = 5000
const MAX_RETRY_HINT = 3600000 // what a server may ask a client to wait, at most (1 h)

/**
 * An error of the client. `code` says what happened: one of the server's
 * error codes (`forbidden`, `bad_request`, `rate_limited`, `too_big`,
 * `internal`, `unknown_op`, or a newer one) for a refused request, or one
 * of the client's own: `buffer_full`, `offline`, `rate_limited` (refused
 * before sending), `conn_lost`, `closed`, `unauthorized`, `forbidden`,
 * `rejected`, `heartbeat_timeout`, `connect_failed`, `gave_up`,
 * `bad_frame`, `handler`, `already_subscribed`, `not_json`, `bad_request`
 * (an invalid topic).
 */
export class TetherError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{closeCode?: number, reason?: string, id?: string, topic?: string, retryMs?: number, status?: number, terminal?: boolean, cause?: unknown}} [extra]
   */
  constructor (code, message, extra) {
    super(message, extra && 'cause' in extra ? { cause: extra.cause } : undefined)
    this.name = 'TetherError'
    /** @type {string} */
    this.code = code
    if (extra) {
      for (const [k, v] of Object.entries(extra)) {
        if (k !== 'cause' && v !== undefined) this[k] = v
      }
    }
  }
}

/**
 * A protocol v1 client that keeps itself connected. See README.md.
 *
 * Events (`on(event, fn)`):
 * - `state` (state, err): a new state; err is why the conn was lost
 *   (reconnecting) or why the client closed (closed), else undefined.
 * - `message` (data, meta): a direct message from the server application;
 *   meta is {epoch, seq}, its place in the user's inbox, for a message of
 *   the inbox (PROTOCOL.md, section 10.1), else undefined. The client
 *   acknowledges inbox messages once the listeners have had them, and
 *   drops one it handed over already (a replay on a new conn of a message
 *   whose acknowledgement was lost): within one TetherClient, each reaches
 *   the listeners once. A new TetherClient (a reloaded page) starts
 *   without that memory: what was handed over but not acknowledged comes
 *   again, at least once across reloads.
 * - `presence` (topic, {joins, leaves, count, snapshot}): who arrived at
 *   and left a topic, and how many are on it now; with snapshot, joins
 *   replaces everything known of it. presence(topic) holds what they
 *   add up to, updated before the event.
 * - `resync` (topic): the client cannot resume topic; reload its state.
 * - `error` (err): something went wrong away from any call; the client
 *   goes on.
 * - `rtt` (ms): the round trip of a protocol ping.
 * - `welcome` (welcome): the welcome of each new conn, as the server sent it.
 * - `offline` (): the client has not been connected for offlineAfter ms
 *   (default 5000), once per outage, counted from the start or from
 *   leaving 'connected': to show "offline" without flickering at every
 *   brief reconnect.
 */
export class TetherClient {
  /**
   * @param {string | string[]} urls the URL (ws:, wss:, http:, https:, or
   *   relative to the page in a browser), or several to fail over between
   * @param {import('./tether.d.ts').TetherOptions} [options]
   */
  constructor (urls, options = {}) {
    const list = (Array.isArray(urls) ? urls : [urls]).map((u) => resolveURL(u))
    if (list.length === 0) throw new TypeError('tether: no URL')
    const o = options ?? {}
    const backoff = { ...DEFAULT_BACKOFF, ...(o.backoff ?? {}) }
    if (o.backoff?.max === undefined) backoff.max = Math.max(DEFAULT_BACKOFF.max, backoff.base)
    checkBackoff(backoff)
    const buffer = { ...DEFAULT_BUFFER, ...(o.offlineBuffer ?? {}) }
    if (!(buffer.messages >= 0) || !(buffer.bytes >= 0)) throw new TypeError('tether: offline buffer bounds must not be negative')
    const hb = { ...DEFAULT_HEARTBEAT, ...(o.heartbeat ?? {}) }
    if (!(hb.interval > 0) || !(hb.timeout > hb.interval)) throw new TypeError('tether: heartbeat timeout must exceed a positive interval')
    const WS = o.WebSocket ?? globalThis.WebSocket
    if (typeof WS !== 'function') throw new TypeError('tether: no WebSocket constructor: pass the WebSocket option (in Node 20, the ws package)')
    if (o.token !== undefined && typeof o.token !== 'function') throw new TypeError('tether: token must be a function')
    const t = o.timers ?? {}

    /** @internal */ this._urls = list
    /** @internal */ this._WS = WS
    /** @internal */ this._protocols = [...new Set([SUBPROTOCOL, ...(o.protocols ?? [])])]
    /** @internal */ this._backoff = backoff
    /** @internal */ this._buf = buffer
    /** @internal */ this._hb = hb
    /** @internal */ this._probeGrace = o.probeGrace ?? DEFAULT_PROBE_GRACE
    /** @internal */ this._offlineAfter = o.offlineAfter ?? DEFAULT_OFFLINE_AFTER
    if (!(this._offlineAfter >= 0)) throw new TypeError('tether: offlineAfter must not be negative')
    /** @internal */ this._offlineTimer = null // runs while not connected, until offline is emitted
    /** @internal */ this._token = o.token
    /** @internal */ this._now = t.now ?? (() => Date.now())
    /** @internal */ this._setTimeout = t.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms))
    /** @internal */ this._clearTimeout = t.clearTimeout ?? ((h) => globalThis.clearTimeout(h))

    /** @internal @type {Map<string, Set<Function>>} */ this._listeners = new Map()
    /** @internal */ this._state = 'connecting'
    this._armOffline() // the outage runs from the start too
    /** @internal */ this._closed = false
    /** @internal @type {Link | null} */ this._link = null // the conn being made or up
    /** @internal */ this._live = false // the link is resubscribed and flushed: send on it
    /** @internal @type {Map<string, Sub>} */ this._subs = new Map()
    /** @internal @type {Req[]} */ this._buffer = []
    /** @internal */ this._bufBytes = 0
    /** @internal */ this._ids = 0
    /** @internal The position of the last inbox message handed to the listeners, across conns. */
    this._inbox = { epoch: '', seq: 0 }
    /** @internal */ this._attempt = 0 // backoff step: failures since the last stable conn
    /** @internal */ this._failures = 0 // rounds in a row that failed, for maxRetries
    /** @internal */ this._good = 0 // the URL to try first: the last that worked
    /** @internal */ this._round = 0 // URLs tried in this round
    /** @internal */ this._wait = null // the timer before the next round
    /** @internal */ this._waitHinted = false // that wait is the server's hint
    /** @internal */ this._closing = null
    /** @type {number | undefined} */
    this.rtt = undefined
    /** The URL of the current or last conn (without the token). @type {string | undefined} */
    this.url = undefined
    /** Why the client closed, once it has; undefined after close(). @type {TetherError | undefined} */
    this.error = undefined

    // A page coming back to the foreground, or a network coming back, may
    // have left a dead conn behind (or throttled the timers that would
    // have noticed): check at once.
    /** @internal */ this._onVisible = () => {
      if (globalThis.document?.visibilityState === 'visible') this.probe()
    }
    /** @internal */ this._onOnline = () => {
      this.probe()
      if (this._wait !== null && !this._waitHinted) {
        // The network is back: no point waiting out the backoff.
        this._clearTimeout(this._wait)
        this._wait = null
        this._connectRound()
      }
    }
    const doc = globalThis.document
    if (doc && typeof doc.addEventListener === 'function') doc.addEventListener('visibilitychange', this._onVisible)
    const win = globalThis.window
    if (win && typeof win.addEventListener === 'function') win.addEventListener('online', this._onOnline)

    Promise.resolve().then(() => this._connectRound())
  }

  /** 'connecting' | 'connected' | 'reconnecting' | 'closed' */
  get state () { return this._state }

  /** The topics subscribed to. @returns {string[]} */
  get topics () { return [...this._subs.keys()] }

  /** The heartbeat in force: the welcome's, or the defaults before it. */
  get heartbeat () {
    const hb = this._link?.welcomed ? this._link.hb : this._hb
    return { interval: hb.interval, timeout: hb.timeout }
  }

  /**
   * Adds a listener.
   * @param {string} event
   * @param {Function} fn
   * @returns {this}
   */
  on (event, fn) {
    if (typeof fn !== 'function') throw new TypeError('tether: listener must be a function')
    let set = this._listeners.get(event)
    if (!set) this._listeners.set(event, (set = new Set()))
    set.add(fn)
    return this
  }

  /**
   * Removes a listener.
   * @param {string} event
   * @param {Function} fn
   * @returns {this}
   */
  off (event, fn) {
    this._listeners.get(event)?.delete(fn)
    return this
  }

  /**
   * Subscribes to topic and resolves once the server has acknowledged it,
   * with the topic's position then; handler receives the messages
   * published from then on. After a reconnect the client subscribes again
   * from the last message handler received, so that it gets exactly what
   * it missed, or a 'resync' event when the server no longer has it.
   * While offline, it waits for the next conn. Rejects with a TetherError
   * carrying the server's code (forbidden, ...) when refused. With
   * {since: {epoch, seq}}, the meta of the last message the application
   * handled (kept in localStorage, say), it starts from there: the
   * messages after it first, or a 'resync' event when the server no
   * longer has them. With {latest: true}, handler first receives the
   * topic's last message, when the server's history still holds it (its
   * current value: no HTTP endpoint needed for it), then the live ones;
   * nothing more when the topic has had no message. The position it
   * resolves with is then the one before that message. since wins over
   * latest; after a reconnect the client resumes with since, and the
   * latest is not sent again.
   * @param {string} topic
   * @param {(data: any, meta: {topic: string, epoch: string, seq: number}) => void} handler
   * @param {{since?: {epoch: string, seq: number}, latest?: boolean}} [options]
   * @returns {Promise<{topic: string, epoch?: string, seq?: number}>}
   */
  subscribe (topic, handler, options) {
    if (this._closed) return Promise.reject(closedError('subscribe'))
    const since = options?.since
    if (since != null && (typeof since.epoch !== 'string' || !isUint(since.seq))) {
      return Promise.reject(new TypeError('tether: subscribe: since must be {epoch: string, seq: integer}, the meta of a message'))
    }
    const latest = options?.latest
    if (latest != null && typeof latest !== 'boolean') {
      return Promise.reject(new TypeError('tether: subscribe: latest must be a boolean'))
    }
    const problem = topicProblem(topic)
    if (problem) return Promise.reject(new TetherError('bad_request', `tether: subscribe: ${problem}`, { topic }))
    if (typeof handler !== 'function') return Promise.reject(new TypeError('tether: subscribe: handler must be a function'))
    if (this._subs.has(topic)) return Promise.reject(new TetherError('already_subscribed', `tether: subscribe: already subscribed to ${JSON.stringify(topic)}`, { topic }))
    return new Promise((resolve, reject) => {
      /** @type {Sub} */
      const sub = { topic, handler, epoch: '', seq: 0, known: false, acked: false, latest: latest === true, waiter: { resolve, reject }, retry: null, retries: 0, pres: null, presFirst: true }
      if (since?.epoch) {
        // From a position the application kept: the server replays what
        // came after it, or answers with a resync.
        sub.epoch = since.epoch
        sub.seq = since.seq
        sub.known = true
      }
      this._subs.set(topic, sub)
      const link = this._link
      // A conn already welcomed has taken its list of topics: this one
      // goes on it now (paced like the rest), else with the next conn's.
      if (link && link.welcomed && !link.ended) {
        const go = () => {
          if (this._link === link && !link.ended && this._subs.get(topic) === sub && sub.waiter) this._subscribeOn(link, sub, false)
        }
        if (link.bucket) link.pace().then(go)
        else go()
      }
    })
  }

  /**
   * Ends the subscription to topic: its handler receives nothing more,
   * and its presence is forgotten. A subscribe() still waiting for the
   * server rejects.
   * @param {string} topic
   */
  unsubscribe (topic) {
    const sub = this._subs.get(topic)
    if (!sub) return
    this._subs.delete(topic)
    if (sub.retry !== null) {
      this._link?.clear(sub.retry)
      sub.retry = null
    }
    if (sub.waiter) {
      sub.waiter.reject(new TetherError('closed', `tether: subscribe: unsubscribed from ${JSON.stringify(topic)} meanwhile`, { topic }))
      sub.waiter = null
    }
    const link = this._link
    if (link && link.welcomed && !link.ended) {
      // Without id: nothing to do with the answer. A sub still in flight
      // is undone by this unsub, which follows it.
      link.send(JSON.stringify({ op: 'unsub', topic }))
    }
  }

  /**
   * Who is on topic, as the server last told: `count`, how many users are
   * present, and `members`, each `{user, meta}`, sorted by user; members
   * is null while the topic only counts its members (it has more than
   * the server lists). undefined when the client is not subscribed to
   * topic or has had no presence of it yet (none comes for a topic that
   * tracks none).
   * @param {string} topic
   * @returns {{count: number, members: Array<{user: string, meta?: any}> | null} | undefined}
   */
  presence (topic) {
    const p = this._subs.get(topic)?.pres
    if (!p) return undefined
    if (p.members.size !== p.count) return { count: p.count, members: null }
    const members = [...p.members.values()].map((m) => ({ ...m }))
    members.sort((a, b) => (a.user < b.user ? -1 : a.user > b.user ? 1 : 0))
    return { count: p.count, members }
  }

  /**
   * Publishes data (any JSON value) to topic. Resolves once the server has
   * published it; rejects with the server's code if it refuses
   * (forbidden, ...). While offline the message waits in the offline
   * buffer and goes out, in order, once the subscriptions are back;
   * past the buffer's bounds it rejects with code 'buffer_full'. With
   * {volatile: true} it rejects with 'offline' instead of buffering. A
   * message sent on a conn that was then lost before the server's answer
   * is sent again on the next conn with the same id when the server drops
   * repeated ids (its welcome has dedupe_ms, as every tether hub's): it
   * takes effect exactly once. With a server that does not, it is sent
   * again only if it was still unsent, and otherwise rejects with
   * 'conn_lost' (it may or may not have been published): never twice.
   *
   * data is any JSON value, or bytes (an ArrayBuffer, a typed array or a
   * DataView), which subscribers get as bytes: a Uint8Array here, a
   * binary message on a raw peer, a binary Message in Go.
   * @param {string} topic
   * @param {any} data
   * @param {{volatile?: boolean}} [options]
   * @returns {Promise<void>}
   */
  publish (topic, data, options) {
    const problem = topicProblem(topic)
    if (problem) return Promise.reject(new TetherError('bad_request', `tether: publish: ${problem}`, { topic }))
    return this._request('pub', topic, data, options?.volatile === true)
  }

  /**
   * Sends data (any JSON value, or bytes as for publish()) to the server
   * application, outside any topic: the 'send' op. Buffered and answered
   * like publish().
   * @param {any} data
   * @param {{volatile?: boolean}} [options]
   * @returns {Promise<void>}
   */
  send (data, options) {
    return this._request('send', undefined, data, options?.volatile === true)
  }

  /**
   * Checks the conn now: sends a ping, and presumes the server dead if
   * nothing at all arrives within a short grace (probeGrace, 2 s by
   * default, bounded by the heartbeat). Called by itself when a page
   * becomes visible and when the browser comes back online.
   */
  probe () {
    const link = this._link
    if (link && link.welcomed && !link.ended) link.probe()
  }

  /**
   * Closes the client for good: a close frame (1000) to the server, the
   * offline buffer dropped, every pending promise rejected with 'closed',
   * state 'closed'. Resolves once the socket has closed.
   * @returns {Promise<void>}
   */
  close () {
    if (this._closed) return this._closing ?? Promise.resolve()
    const link = this._link
    if (link && !link.ended) link.end(closedError('close'), false, { graceful: true })
    this._closing = link ? link.socketClosed() : Promise.resolve()
    this._finish(undefined)
    return this._closing
  }

  // --- Connecting -----------------------------------------------------------

  /** @internal Tries every URL once, from the last that worked. */
  _connectRound () {
    this._wait = null
    if (this._closed) return
    this._round = 0
    this._tryNext()
  }

  /** @internal */
  _tryNext () {
    const idx = (this._good + this._round) % this._urls.length
    this._round++
    const link = new Link(this, this._urls[idx], idx)
    this._link = link
    link.open()
  }

  /** @internal An attempt failed before the welcome. */
  _attemptFailed (link, err) {
    if (this._link === link) this._link = null
    if (this._closed) return
    if (err.terminal) {
      this._finish(err)
      return
    }
    if (this._round < this._urls.length) {
      this._tryNext()
      return
    }
    this._failures++
    const b = this._backoff
    if (b.maxRetries > 0 && this._failures >= b.maxRetries) {
      if (!(b.quiet > 0)) {
        this._finish(new TetherError('gave_up', `tether: gave up after ${this._failures} attempts: ${err.message}`, { cause: err }))
        return
      }
      // A pause, then another round from the first delay.
      this._failures = 0
      this._attempt = 0
      this._schedule(b.quiet, false)
      return
    }
    const d = backoffDelay(b, this._attempt)
    this._attempt++
    const hint = err.retryMs ?? 0
    this._schedule(Math.max(d, hint), hint > d)
  }

  /** @internal */
  _schedule (ms, hinted) {
    this._waitHinted = hinted
    this._wait = this._setTimeout(() => this._connectRound(), ms)
  }

  /** @internal A conn is up and welcomed. */
  _welcomed (link, welcome) {
    this._good = link.index
    this._failures = 0
    this.url = link.url
    this._emit('welcome', welcome)
    // What the client knows of presence stays until the first presence of
    // each topic on this conn replaces it.
    for (const sub of this._subs.values()) sub.presFirst = true
    for (const r of welcome.resume ?? []) {
      // Topics the server resumed by itself: an "ok" replay follows (what
      // the client had already is dropped by seq); a "resync" starts over.
      const sub = this._subs.get(r.topic)
      if (sub && r.status === 'resync') {
        sub.epoch = r.epoch
        sub.seq = r.seq
        sub.known = true
        this._emit('resync', r.topic)
      }
    }
    if (link.ended) return
    this._resume(link)
  }

  /**
   * @internal Subscribes the new conn to every topic, each from its
   * position, waits for the answers, then sends the offline buffer and
   * marks the client connected; both paced within the welcome's limits.
   */
  async _resume (link) {
    const subs = [...this._subs.values()]
    link.resubs = 1 // this loop's own, so that answers cannot finish it early
    for (const sub of subs) {
      if (link.bucket && !(await link.pace())) return
      if (link.ended || this._closed) return
      if (this._subs.get(sub.topic) === sub) {
        link.resubs++
        this._subscribeOn(link, sub, true)
      }
    }
    link.resubAnswered()
    await link.resubbed
    // The buffer, oldest first; what is published meanwhile joins its end.
    for (;;) {
      if (link.ended || this._closed) return
      if (this._buffer.length === 0) break
      if (link.bucket && !(await link.pace())) return
      if (link.ended || this._closed) return
      const req = this._buffer[0]
      if (!link.send(req.line, req)) return
      this._buffer.shift()
      this._bufBytes -= req.bytes
    }
    this._live = true
    this._setState('connected', undefined)
  }

  /** @internal */
  _subscribeOn (link, sub, batch) {
    const id = this._newID()
    const msg = { op: 'sub', topic: sub.topic }
    if (sub.known) msg.since = { epoch: sub.epoch, seq: sub.seq }
    else if (sub.latest && !sub.acked) msg.latest = true // the first sub only: a reconnect resumes with since
    msg.id = id
    /** @type {Req} */
    const req = { id, op: 'sub', topic: sub.topic, line: '', bytes: 0, sub, since: sub.known, batch }
    link.send(JSON.stringify(msg), req)
  }

  /** @internal The conn, welcomed once, has ended. */
  _lost (link, err) {
    if (this._link === link) this._link = null
    this._live = false
    // What the conn never transmitted goes back to the front of the buffer;
    // what it did may have arrived: at most once, never twice. The socket's
    // bufferedAmount says how many bytes, at the end of what was sent, it
    // still held; the ledger counts frame headers too, so that the estimate
    // errs towards "transmitted".
    const unsentFrom = link.unsent > 0 ? link.bytesSent - link.unsent : Infinity
    const back = []
    for (const req of link.requests.values()) {
      if (req.op === 'sub') continue // made afresh by the next conn; its waiter waits on
      // A server that drops repeated ids takes what it had already once:
      // everything unanswered goes again.
      if (!this._closed && (link.dedupe || req.start >= unsentFrom)) {
        back.push(req)
      } else {
        req.reject?.(new TetherError('conn_lost', `tether: ${req.op}: the connection was lost before the server answered; the message may or may not have arrived`, { id: req.id, topic: req.topic, cause: err }))
      }
    }
    link.requests.clear()
    if (back.length > 0) {
      // Past the bound: these were accepted and must not be lost to it.
      for (const req of back) this._bufBytes += req.bytes
      this._buffer = back.concat(this._buffer)
    }
    for (const sub of this._subs.values()) sub.retry = null // the link's timers are gone; the next conn subscribes anyway
    if (this._closed) return

    if (this._now() - link.upAt >= this._backoff.stableAfter) this._attempt = 0
    const b = this._backoff
    const hint = err.retryMs ?? 0
    switch (err.closeCode) {
      case 4401:
      case 4403:
        this._finish(err)
        return
      case 1001:
        this._setState('reconnecting', err)
        if (this._closed) return
        if (hint > 0) {
          // The server spread its clients over the hint already; a little
          // more keeps equal hints apart.
          this._schedule(hint + Math.random() * hint / 5, true)
        } else {
          this._schedule(backoffDelay(b, this._attempt++), false)
        }
        return
      default: {
        // 4008 and 4429 included: a client the server had to shed backs
        // off further each time.
        this._setState('reconnecting', err)
        if (this._closed) return
        const d = backoffDelay(b, this._attempt++)
        this._schedule(Math.max(d, hint), hint > d)
      }
    }
  }

  /** @internal Closes the client for reason (undefined for close()). */
  _finish (reason) {
    if (this._closed) return
    this._closed = true
    this._live = false
    this.error = reason
    if (this._wait !== null) {
      this._clearTimeout(this._wait)
      this._wait = null
    }
    const doc = globalThis.document
    if (doc && typeof doc.removeEventListener === 'function') doc.removeEventListener('visibilitychange', this._onVisible)
    const win = globalThis.window
    if (win && typeof win.removeEventListener === 'function') win.removeEventListener('online', this._onOnline)
    const link = this._link
    this._link = null
    if (link && !link.ended) link.end(closedError('close'), false)
    const gone = () => closedError('client')
    for (const req of this._buffer) req.reject?.(gone())
    this._buffer = []
    this._bufBytes = 0
    if (link) {
      for (const req of link.requests.values()) req.reject?.(gone())
      link.requests.clear()
    }
    for (const sub of this._subs.values()) {
      if (sub.waiter) {
        sub.waiter.reject(reason ?? closedError('subscribe'))
        sub.waiter = null
      }
    }
    this._subs.clear()
    this._setState('closed', reason)
  }

  // --- Requests -------------------------------------------------------------

  /** @internal */
  _request (op, topic, data, volatile) {
    if (this._closed) return Promise.reject(closedError(op === 'pub' ? 'publish' : 'send'))
    const id = this._newID()
    const head = op === 'pub' ? `{"op":"pub","topic":${JSON.stringify(topic)},"id":"${id}"` : `{"op":"send","id":"${id}"`
    let line
    let bytes
    const bin = asBytes(data)
    if (bin) {
      // A record: the line with len, then the bytes, in a binary message.
      const header = encoder.encode(`${head},"len":${bin.byteLength}}\n`)
      line = new Uint8Array(header.byteLength + bin.byteLength)
      line.set(header)
      line.set(bin, header.byteLength)
      bytes = line.byteLength
    } else {
      let json
      try {
        json = JSON.stringify(data)
      } catch (err) {
        return Promise.reject(new TetherError('not_json', `tether: ${op}: data is not a JSON value: ${err.message}`, { cause: err }))
      }
      if (json === undefined) return Promise.reject(new TetherError('not_json', `tether: ${op}: data is not a JSON value`))
      line = `${head},"data":${json}}`
      bytes = utf8Length(line)
    }
    return new Promise((resolve, reject) => {
      /** @type {Req} */
      const req = { id, op, topic, line, bytes, resolve, reject }
      const link = this._link
      if (this._live && link && !link.ended) {
        if (link.bucket && link.bucket.take(this._now()) > 0) {
          // The server would refuse it, and close the conn if this went on.
          reject(new TetherError('rate_limited', `tether: ${op}: over the rate limit the server advertised`, { id, topic }))
          return
        }
        if (link.send(line, req)) return
      }
      if (volatile) {
        reject(new TetherError('offline', `tether: ${op}: offline`, { id, topic }))
        return
      }
      if (this._buffer.length >= this._buf.messages || this._bufBytes + req.bytes > this._buf.bytes) {
        reject(new TetherError('buffer_full', `tether: ${op}: offline buffer full (${this._buf.messages} messages, ${this._buf.bytes} bytes)`, { id, topic }))
        return
      }
      this._buffer.push(req)
      this._bufBytes += req.bytes
    })
  }

  /**
   * @internal An id unique to this client: a random prefix and a count, so
   * that a hub that drops repeated ids (PROTOCOL.md, "pub") tells it from
   * any other client's.
   */
  _newID () {
    if (!this._idPrefix) {
      const b = new Uint8Array(12)
      globalThis.crypto.getRandomValues(b)
      this._idPrefix = btoa(String.fromCharCode(...b)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '') + '.'
    }
    return this._idPrefix + (++this._ids).toString(36)
  }

  // --- Reading --------------------------------------------------------------

  /** @internal One protocol message (one line) from the server. */
  _onLine (link, line) {
    let m
    try {
      m = JSON.parse(line)
    } catch (err) {
      this._bad(`not JSON: ${err.message}`, line)
      return
    }
    if (m === null || typeof m !== 'object' || Array.isArray(m)) {
      this._bad('not a JSON object', line)
      return
    }
    if (m.len != null) {
      this._bad('"len" in a text message', line)
      return
    }
    this._onProtocolMessage(link, m, line)
  }

  /**
   * @internal One protocol message, decoded: from a line, or a record of
   * a binary message whose data (a Uint8Array, or a string for text) is
   * in m.data.
   */
  _onProtocolMessage (link, m, line) {
    const op = m.op
    if (typeof op !== 'string') {
      this._bad('no string "op"', line)
      return
    }
    switch (op) {
      case 'ping': {
        const ts = m.ts ?? 0
        if (!Number.isSafeInteger(ts)) return this._bad('"ts" is not an integer', line)
        link.send(`{"op":"pong","ts":${ts}}`)
        return
      }
      case 'pong': {
        const ts = m.ts ?? 0
        if (!Number.isSafeInteger(ts)) return this._bad('"ts" is not an integer', line)
        if (ts === link.pingTs && link.pingTs !== 0) {
          link.pingTs = 0
          const rtt = Math.max(0, this._now() - ts)
          this.rtt = rtt
          this._emit('rtt', rtt)
        }
        return
      }
      case 'msg': {
        if (!('data' in m)) return this._bad('"data" missing', line)
        const topic = m.topic ?? ''
        if (typeof topic !== 'string') return this._bad('"topic" is not a string', line)
        if (topic === '') {
          if (m.epoch == null && m.seq == null) {
            this._emit('message', m.data)
            return
          }
          // A message of the user's inbox (PROTOCOL.md, section 10.1).
          if (typeof m.epoch !== 'string' || m.epoch === '') return this._bad('"epoch" missing', line)
          if (!isUint(m.seq)) return this._bad('"seq" missing or not an integer', line)
          link.inboxSeen = true
          this._deliverInbox(m.epoch, m.seq, m.data)
          return
        }
        if (typeof m.epoch !== 'string') return this._bad('"epoch" missing', line)
        if (!isUint(m.seq)) return this._bad('"seq" missing or not an integer', line)
        this._deliver(topic, m.epoch, m.seq, m.data)
        return
      }
      case 'presence': {
        if (typeof m.topic !== 'string') return this._bad('"topic" missing', line)
        const joins = m.joins ?? []
        const leaves = m.leaves ?? []
        if (!Array.isArray(joins) || !Array.isArray(leaves)) return this._bad('"joins" and "leaves" must be arrays', line)
        for (const e of [...joins, ...leaves]) {
          if (e === null || typeof e !== 'object' || typeof e.user !== 'string') return this._bad('a member without "user"', line)
        }
        // Absent (a server before count): the client's list gives it.
        const count = m.count ?? undefined
        if (count !== undefined && !isUint(count)) return this._bad('"count" is not a non-negative integer', line)
        if (m.snapshot != null && typeof m.snapshot !== 'boolean') return this._bad('"snapshot" is not a boolean', line)
        this._presence(m.topic, joins, leaves, count, m.snapshot === true)
        return
      }
      case 'resync': {
        if (typeof m.topic !== 'string' || typeof m.epoch !== 'string') return this._bad('"topic" or "epoch" missing', line)
        const sub = this._subs.get(m.topic)
        if (!sub) return
        // Stale: the position is unknown until the next message.
        sub.known = false
        this._emit('resync', m.topic)
        return
      }
      case 'ack': {
        if (typeof m.id !== 'string') return this._bad('"id" missing', line)
        if (m.epoch != null && typeof m.epoch !== 'string') return this._bad('"epoch" is not a string', line)
        if (m.seq != null && !isUint(m.seq)) return this._bad('"seq" is not an integer', line)
        this._answer(link, m.id, m, undefined)
        return
      }
      case 'error': {
        if (typeof m.code !== 'string') return this._bad('"code" missing', line)
        if (m.id != null && typeof m.id !== 'string') return this._bad('"id" is not a string', line)
        if (m.reason != null && typeof m.reason !== 'string') return this._bad('"reason" is not a string', line)
        const id = m.id ?? ''
        const reason = m.reason ?? ''
        const err = new TetherError(m.code, `tether: the server refused: ${m.code}${reason ? ': ' + reason : ''}`, { reason, id: id || undefined })
        if (id === '') {
          this._report(err)
          return
        }
        this._answer(link, id, m, err)
        return
      }
      case 'welcome': {
        const problem = welcomeProblem(m)
        if (problem) this._bad(problem, line)
        return // only the first counts
      }
      default:
        // A newer server's op, or one only clients send: ignored, as
        // PROTOCOL.md asks.
    }
  }

  /** @internal */
  _bad (why, line) {
    const shown = line.length > 200 ? line.slice(0, 200) + '…' : line
    this._report(new TetherError('bad_frame', `tether: unreadable message from the server (${why}): ${shown}`))
  }

  /** @internal Hands a topic message to its handler, unless it had it already. */
  _deliver (topic, epoch, seq, data) {
    const sub = this._subs.get(topic)
    if (!sub) return // unsubscribed: what was in flight is ignored
    if (sub.known && epoch === sub.epoch && seq <= sub.seq) return // had it already
    // A jump in seq, or a new epoch that does not start at 1, means
    // messages were lost: the topic's state is stale, as after a resync.
    const gap = sub.known && ((epoch === sub.epoch && seq > sub.seq + 1) || (epoch !== sub.epoch && seq !== 1))
    sub.epoch = epoch
    sub.seq = seq
    sub.known = true
    if (gap) this._emit('resync', topic)
    if (this._subs.get(topic) !== sub) return
    try {
      sub.handler(data, { topic, epoch, seq })
    } catch (err) {
      this._report(new TetherError('handler', `tether: the handler of ${JSON.stringify(topic)} threw: ${err?.message ?? err}`, { topic, cause: err }))
    }
  }

  /**
   * @internal Hands a message of the user's inbox to the message listeners,
   * unless they had it already: a replay, on a new conn, of a message whose
   * received was lost with the old one. Another epoch is new whatever its
   * seq: the inbox was emptied and forgotten, or the server lost it.
   */
  _deliverInbox (epoch, seq, data) {
    const last = this._inbox
    if (epoch === last.epoch && seq <= last.seq) return // had it; acknowledged again after this message
    this._inbox = { epoch, seq }
    this._emit('message', data, { epoch, seq })
  }

  /**
   * @internal Acknowledges, on link, the inbox messages handed over so
   * far: once per WebSocket message read, after its listeners ran. The
   * received goes at once when the welcome's rate limit allows, else when
   * it does, with whatever has been handed over by then, so that many
   * WebSocket messages in a row cost one. It is never kept for another
   * conn: the server replays there what was not acknowledged, and the
   * client drops what it had.
   */
  _ackInbox (link) {
    if (link.ended || this._closed || this._link !== link) return
    link.ackDue = this._inbox
    if (link.ackTimer !== null || link.ackDue === link.acked) return // due already, or said already
    const go = () => {
      const wait = link.bucket ? link.bucket.take(this._now()) : 0
      if (wait > 0) {
        link.ackTimer = link.timer(() => { link.ackTimer = null; go() }, wait)
        return
      }
      const { epoch, seq } = link.ackDue
      if (link.send(`{"op":"received","epoch":${JSON.stringify(epoch)},"seq":${seq}}`)) link.acked = link.ackDue
    }
    go()
  }

  /**
   * @internal Applies a presence message to the topic's list and count,
   * and emits it. count is undefined from a server before count.
   */
  _presence (topic, joins, leaves, count, snapshot) {
    const sub = this._subs.get(topic)
    if (!sub) return // unsubscribed: what was in flight is ignored
    const first = sub.presFirst
    sub.presFirst = false
    if (!snapshot && count === undefined && first) {
      // A server before snapshot existed lists everyone in the first
      // presence after each sub (so the first on each conn): that is its
      // snapshot, and what the client knew from before a reconnect goes.
      snapshot = true
    }
    if (!snapshot && count !== undefined && sub.pres === null) {
      // A server that counts opens every subscription with a snapshot: a
      // change before it belongs to an earlier subscription to the topic,
      // still in flight when it ended.
      return
    }
    let members = sub.pres?.members
    if (snapshot || !members) members = new Map()
    for (const e of leaves) members.delete(e.user)
    for (const e of joins) members.set(e.user, e.meta === undefined ? { user: e.user } : { user: e.user, meta: e.meta })
    const n = count ?? members.size
    sub.pres = { members, count: n }
    this._emit('presence', topic, { joins, leaves, count: n, snapshot })
  }

  /** @internal Settles the request that an ack (err undefined) or an error answers. */
  _answer (link, id, m, err) {
    const req = link.requests.get(id)
    if (!req) return
    link.requests.delete(id)
    if (req.op !== 'sub') {
      if (err) {
        err.topic = req.topic
        req.reject(err)
      } else {
        req.resolve()
      }
      return
    }
    const sub = req.sub
    const current = this._subs.get(sub.topic) === sub
    let report
    let stale = false
    if (err && current && !sub.waiter && (err.code === 'rate_limited' || err.code === 'internal')) {
      // For a while only: try again on this conn, backing off.
      const delay = backoffDelay(this._backoff, sub.retries++)
      sub.retry = link.timer(() => {
        sub.retry = null
        if (!this._closed && this._link === link && !link.ended && this._subs.get(sub.topic) === sub) this._subscribeOn(link, sub, false)
      }, delay)
      report = new TetherError(err.code, `tether: re-subscription to ${JSON.stringify(sub.topic)} refused, retrying in ${Math.round(delay)} ms: ${err.message}`, { topic: sub.topic, reason: err.reason })
    } else if (err && current) {
      this._subs.delete(sub.topic)
      if (!sub.waiter) report = new TetherError(err.code, `tether: re-subscription to ${JSON.stringify(sub.topic)} refused, the subscription is gone: ${err.message}`, { topic: sub.topic, reason: err.reason })
    } else if (!err && current && !req.since && typeof m.epoch === 'string' && m.epoch !== '') {
      // Live messages start after the ack's position. A topic subscribed
      // before without a position (a resync, then the conn was lost before
      // any message) missed what came between.
      stale = sub.acked
      sub.epoch = m.epoch
      sub.seq = m.seq ?? 0
      sub.known = true
    }
    if (!err) {
      sub.acked = true
      sub.retries = 0
    }
    // Before the waiter: the resumption goes on (and may mark the client
    // connected) before the caller of subscribe() hears of the ack.
    if (req.batch) link.resubAnswered()
    const w = sub.waiter
    if (w) {
      sub.waiter = null
      if (err) {
        err.topic = sub.topic
        w.reject(err)
      } else {
        const pos = { topic: sub.topic }
        if (typeof m.epoch === 'string' && m.epoch !== '') {
          pos.epoch = m.epoch
          pos.seq = m.seq ?? 0
        }
        w.resolve(pos)
      }
    }
    if (report) this._report(report)
    if (stale) this._emit('resync', sub.topic)
  }

  // --- Events ---------------------------------------------------------------

  /** @internal */
  _setState (state, err) {
    if (this._state === state) return
    const was = this._state
    this._state = state
    if (state === 'connected' || state === 'closed') {
      if (this._offlineTimer) this._clearTimeout(this._offlineTimer)
      this._offlineTimer = null
    } else if (was === 'connected') {
      this._armOffline()
    }
    this._emit('state', state, err)
  }

  /**
   * @internal Emits 'offline' once the client has not been connected for
   * offlineAfter, once per outage.
   */
  _armOffline () {
    if (this._offlineTimer || !(this._offlineAfter > 0)) return
    this._offlineTimer = this._setTimeout(() => {
      if (this._state !== 'connected' && this._state !== 'closed') this._emit('offline')
    }, this._offlineAfter)
    this._offlineTimer?.unref?.()
  }

  /** @internal */
  _report (err) {
    this._emit('error', err)
  }

  /** @internal */
  _emit (event, ...args) {
    const set = this._listeners.get(event)
    if (!set) return
    for (const fn of [...set]) {
      try {
        fn(...args)
      } catch (err) {
        if (event !== 'error') this._report(new TetherError('handler', `tether: a listener of ${event} threw: ${err?.message ?? err}`, { cause: err }))
      }
    }
  }
}

/**
 * One WebSocket, from its attempt to its end.
 * @internal
 */
class Link {
  /**
   * @param {TetherClient} client
   * @param {string} url
   * @param {number} index
   */
  constructor (client, url, index) {
    this.c = client
    this.url = url
    this.index = index
    /** @type {any} */ this.ws = null
    this.welcomed = false
    this.ended = false
    this.upAt = 0
    /** @type {Set<any>} */ this.timers = new Set()
    /** @type {Set<() => void>} */ this.sleepers = new Set()
    /** @type {Map<string, Req>} sent on this conn, not yet answered, in send order */
    this.requests = new Map()
    this.bytesSent = 0
    this.unsent = 0 // bytes the socket had not transmitted when it ended
    this.hb = { ...client._hb }
    /** @type {Bucket | null} */ this.bucket = null
    this.sockErr = null
    this.resubs = 0
    /** @type {() => void} */ this._resubDone = () => {}
    /** @type {Promise<void>} resolved once the re-subscriptions are answered, or the conn ended */
    this.resubbed = new Promise((resolve) => { this._resubDone = () => resolve() })
    // Heartbeat (PROTOCOL.md, section 9), in wall-clock time.
    this.lastRecv = 0
    this.pingAt = 0
    this.pingTs = 0
    this.awaiting = false // a ping was sent and nothing has arrived since
    this.probing = false // that ping is a probe: it gets the grace, not the timeout
    this.reprobed = false // a late timer has had its one extra probe
    this.hbTimer = null
    this.hbDue = 0
    // The user's inbox: a message of it was read in the WebSocket message
    // being read; the position to acknowledge, and the last acknowledged,
    // on this conn; a received waiting for the rate limit.
    this.inboxSeen = false
    this.ackDue = null
    this.acked = null
    this.ackTimer = null
  }

  /** A timer of this conn, cleared when it ends. */
  timer (fn, ms) {
    const c = this.c
    const h = c._setTimeout(() => {
      this.timers.delete(h)
      if (!this.ended) fn()
    }, Math.max(0, ms))
    this.timers.add(h)
    return h
  }

  clear (h) {
    if (h === null || h === undefined) return
    this.c._clearTimeout(h)
    this.timers.delete(h)
  }

  /** Resolves true after ms, or false as soon as the conn ends. */
  sleep (ms) {
    return new Promise((resolve) => {
      const wake = () => {
        this.sleepers.delete(wake)
        this.clear(h)
        resolve(!this.ended)
      }
      this.sleepers.add(wake)
      const h = this.timer(wake, ms)
    })
  }

  /** Waits for a token of the welcome's rate limit; false if the conn ended. */
  async pace () {
    for (;;) {
      if (this.ended) return false
      if (!this.bucket) return true
      const wait = this.bucket.take(this.c._now())
      if (wait <= 0) return true
      if (!(await this.sleep(wait))) return false
    }
  }

  resubAnswered () {
    if (--this.resubs === 0) this._resubDone()
  }

  async open () {
    const c = this.c
    // The attempt, welcome included, is bounded by the heartbeat timeout.
    this.timer(() => this.end(new TetherError('connect_failed', `tether: ${this.url}: no welcome within ${c._hb.timeout} ms`), true), c._hb.timeout)
    let url = this.url
    if (c._token) {
      let tok
      try {
        tok = await c._token()
      } catch (err) {
        this.end(new TetherError('connect_failed', `tether: ${this.url}: token: ${err?.message ?? err}`, { cause: err }), true)
        return
      }
      if (this.ended) return
      const u = new URL(url)
      u.searchParams.set('token', String(tok))
      url = u.href
    }
    let ws
    try {
      ws = new c._WS(url, c._protocols)
    } catch (err) {
      this.end(new TetherError('rejected', `tether: ${this.url}: ${err?.message ?? err}`, { cause: err, terminal: true }), true)
      return
    }
    this.ws = ws
    try { ws.binaryType = 'arraybuffer' } catch {}
    if (typeof ws.on === 'function' && typeof ws.terminate === 'function') {
      // ws (Node) shows a refused handshake's response, which browsers
      // hide: its status, and the Retry-After of a 429 or 503, honoured
      // (spread over the second it names).
      ws.on('unexpected-response', (req, res) => {
        this.httpStatus = res.statusCode
        const after = Number(res.headers?.['retry-after'])
        if (Number.isInteger(after) && after > 0) this.retryAfterMs = Math.min(after * 1000, MAX_RETRY_HINT) + Math.random() * 1000
        res.resume?.()
        ws.terminate()
      })
    }
    // Handlers stay attached after the end (ws throws on an 'error' event
    // without a listener); they do nothing then.
    ws.onopen = () => this.onOpen()
    ws.onmessage = (ev) => this.onMessage(ev)
    ws.onerror = (ev) => { this.sockErr = ev }
    ws.onclose = (ev) => this.onClose(ev)
  }

  onOpen () {
    if (this.ended) return
    if (this.ws.protocol !== SUBPROTOCOL) {
      this.end(new TetherError('rejected', `tether: ${this.url}: the server does not speak ${SUBPROTOCOL}`, { terminal: true }), true, { reason: `${SUBPROTOCOL} required` })
      return
    }
    this.lastRecv = this.c._now()
  }

  onMessage (ev) {
    if (this.ended) return
    const c = this.c
    this.lastRecv = c._now()
    this.awaiting = this.probing = this.reprobed = false
    const data = ev.data
    if (typeof data !== 'string') {
      this.onBinary(data)
      return
    }
    const lines = data.split('\n')
    let i = 0
    if (!this.welcomed) {
      while (i < lines.length && lines[i] === '') i++
      let w
      let problem = 'empty'
      if (i < lines.length) {
        try {
          w = JSON.parse(lines[i])
          problem = welcomeProblem(w)
        } catch (err) {
          problem = err.message
        }
      }
      if (problem) {
        this.end(new TetherError('connect_failed', `tether: ${this.url}: the first message is not a welcome: ${problem}`), true, { reason: 'welcome expected' })
        return
      }
      i++
      this.onWelcome(w)
      if (this.ended) return
    }
    for (; i < lines.length && !this.ended; i++) {
      if (lines[i] !== '') c._onLine(this, lines[i])
    }
    this.acknowledge()
  }

  /** After a WebSocket message that held inbox messages: one received for them all. */
  acknowledge () {
    if (!this.inboxSeen) return
    this.inboxSeen = false
    this.c._ackInbox(this)
  }

  /**
   * A binary message: records, each a line and, when the line has len,
   * that many bytes of data (PROTOCOL.md, "Binary messages").
   */
  onBinary (data) {
    const c = this.c
    if (!(data instanceof ArrayBuffer) && !ArrayBuffer.isView(data)) {
      // A Blob: binaryType could not be set. Nothing can read it in order.
      c._report(new TetherError('bad_frame', `tether: a binary message of ${data?.size ?? 0} bytes arrived as a Blob; set binaryType to 'arraybuffer'`))
      return
    }
    for (const r of records(data)) {
      if (this.ended) return
      if (r.problem) {
        if (!this.welcomed) {
          this.end(new TetherError('connect_failed', `tether: ${this.url}: the first message is not a welcome: ${r.problem}`), true, { reason: 'welcome expected' })
          return
        }
        c._bad(r.problem, r.line ?? '')
        continue
      }
      if (!this.welcomed) {
        const problem = welcomeProblem(r.m)
        if (problem) {
          this.end(new TetherError('connect_failed', `tether: ${this.url}: the first message is not a welcome: ${problem}`), true, { reason: 'welcome expected' })
          return
        }
        this.onWelcome(r.m)
        continue
      }
      c._onProtocolMessage(this, r.m, r.line)
    }
    this.acknowledge()
  }

  onWelcome (w) {
    const c = this.c
    this.welcomed = true
    this.dedupe = Number.isSafeInteger(w.dedupe_ms) && w.dedupe_ms > 0
    for (const h of this.timers) c._clearTimeout(h) // the attempt's timeout
    this.timers.clear()
    this.upAt = c._now()
    const { interval_ms: interval, timeout_ms: timeout } = w.heartbeat
    if (interval > 0 && timeout > interval) this.hb = { interval, timeout }
    const l = w.limits
    if (l) {
      // 90 % of the rate and the burst: the rest is for what is not
      // paced, pings and unsubs.
      this.bucket = new Bucket(l.msgs_per_s * 0.9, Math.max(1, Math.floor(Math.min(l.burst, 2 ** 31) * 9 / 10)), c._now())
    }
    this.schedule()
    c._welcomed(this, w)
  }

  onClose (ev) {
    this._sockClosed = true
    if (this._kill) {
      this.c._clearTimeout(this._kill)
      this._kill = null
    }
    this._onSockClosed?.()
    if (this.ended) return
    const code = ev?.code ?? 1006
    const reason = typeof ev?.reason === 'string' ? ev.reason : ''
    const retryMs = this.retryAfterMs || retryHint(reason)
    const desc = `${code}${reason ? ' (' + reason + ')' : ''}`
    if (code === 4401) {
      this.end(new TetherError('unauthorized', `tether: the server closed the connection with ${desc}`, { closeCode: code, reason, terminal: true }), true)
      return
    }
    if (code === 4403) {
      this.end(new TetherError('forbidden', `tether: the server closed the connection with ${desc}`, { closeCode: code, reason, terminal: true }), true)
      return
    }
    if (!this.welcomed) {
      // Browsers hide a refused handshake's HTTP status; ws (Node) tells.
      const msg = String(this.sockErr?.message ?? this.sockErr?.error?.message ?? '')
      const status = this.httpStatus || Number(/Unexpected server response: (\d{3})/.exec(msg)?.[1] ?? 0)
      if (status === 401) return this.end(new TetherError('unauthorized', `tether: ${this.url}: HTTP 401`, { status, terminal: true }), true)
      if (status === 403) return this.end(new TetherError('forbidden', `tether: ${this.url}: HTTP 403`, { status, terminal: true }), true)
      if (status >= 400 && status < 500 && status !== 408 && status !== 425 && status !== 429) {
        return this.end(new TetherError('rejected', `tether: ${this.url}: HTTP ${status}`, { status, terminal: true }), true)
      }
      if (/subprotocol/i.test(msg)) {
        // ws fails the handshake of a server that selects no subprotocol,
        // where a browser opens the socket with protocol "".
        return this.end(new TetherError('rejected', `tether: ${this.url}: the server does not speak ${SUBPROTOCOL}: ${msg}`, { terminal: true }), true)
      }
      const why = this.httpStatus ? `HTTP ${this.httpStatus}` : msg || `closed with ${desc}`
      this.end(new TetherError('connect_failed', `tether: ${this.url}: ${why}`, { closeCode: code, reason, status: status || undefined, retryMs }), true)
      return
    }
    this.end(new TetherError('conn_lost', `tether: the connection closed with ${desc}`, { closeCode: code, reason, retryMs }), true)
  }

  /**
   * Ends the conn: its timers stop, its socket closes (with a close frame
   * if graceful, else at once), and the client hears of it if notify.
   */
  end (err, notify, { reason = '', graceful = false } = {}) {
    if (this.ended) return
    this.ended = true
    const c = this.c
    for (const h of this.timers) c._clearTimeout(h)
    this.timers.clear()
    this.hbTimer = null
    for (const wake of [...this.sleepers]) wake()
    this._resubDone()
    const ws = this.ws
    if (ws) {
      const n = Number(ws.bufferedAmount)
      this.unsent = Number.isFinite(n) && n > 0 ? n : 0
      if (ws.readyState === 0 || ws.readyState === OPEN) {
        if (graceful && ws.readyState === OPEN) {
          try { ws.close(1000) } catch {}
          if (typeof ws.terminate === 'function') {
            // ws (Node) waits 30 s for a dead server's close frame.
            this._kill = c._setTimeout(() => { this._kill = null; ws.terminate() }, 2000)
            this._kill?.unref?.()
          }
        } else if (typeof ws.terminate === 'function') {
          ws.terminate() // ws (Node): dropped at once, no close handshake to wait out
        } else {
          try { ws.close(1000, reason) } catch { try { ws.close() } catch {} }
        }
      }
    }
    if (!notify) return
    if (this.welcomed) c._lost(this, err)
    else c._attemptFailed(this, err)
  }

  /** Resolves once the socket has closed. */
  socketClosed () {
    const ws = this.ws
    if (!ws || ws.readyState === 3 || this._sockClosed) return Promise.resolve()
    return new Promise((resolve) => { this._onSockClosed = resolve })
  }

  /** Sends a line; with req, remembers it as waiting for its answer. */
  send (line, req) {
    const ws = this.ws
    if (this.ended || !ws || ws.readyState !== OPEN) return false
    try {
      ws.send(line)
    } catch {
      return false
    }
    const bytes = req?.bytes || utf8Length(line)
    const start = this.bytesSent
    // A client frame's header: 2 bytes, the length's extension, the mask.
    this.bytesSent += bytes + 2 + (bytes < 126 ? 0 : bytes < 65536 ? 2 : 8) + 4
    if (req) {
      req.line = line
      req.bytes = bytes
      req.start = start
      this.requests.set(req.id, req)
    }
    return true
  }

  // --- Heartbeat ------------------------------------------------------------
  //
  // Silence decides, in wall-clock time (now()), never a timer alone: a
  // background tab's timers may fire late, long after the ping they were
  // to send, and the silence that follows is the client's own doing. So a
  // server is presumed dead only when a ping was actually sent and nothing
  // at all arrived within the timeout and a grace after it; a check that
  // finds a long silence without a ping sent probes first, and a check
  // that fires late gives the server one more probe.

  grace () {
    const { interval, timeout } = this.hb
    return Math.min(timeout - interval, Math.max(this.c._probeGrace, 4 * (this.c.rtt ?? 0)))
  }

  ping (probing) {
    const ts = Math.floor(this.c._now())
    if (!this.send(`{"op":"ping","ts":${ts}}`)) return
    this.pingAt = ts
    this.pingTs = ts
    this.awaiting = true
    this.probing = probing
  }

  probe () {
    if (this.awaiting && this.probing) return
    this.ping(true)
    this.schedule()
  }

  schedule () {
    if (this.ended) return
    const { interval, timeout } = this.hb
    let due
    if (this.awaiting) {
      due = this.probing ? this.pingAt + this.grace() : Math.max(this.lastRecv + timeout, this.pingAt + this.grace())
    } else {
      due = Math.min(Math.max(this.lastRecv, this.pingAt) + interval, this.lastRecv + timeout)
    }
    const t = this.c._now()
    this.hbDue = Math.max(due, t)
    this.clear(this.hbTimer)
    this.hbTimer = this.timer(() => this.check(), due - t)
  }

  check () {
    this.hbTimer = null
    if (this.ended) return
    const { interval, timeout } = this.hb
    const t = this.c._now()
    const late = t - this.hbDue > Math.max(50, Math.min(1000, (timeout - interval) / 2))
    const silence = t - this.lastRecv
    if (this.awaiting) {
      const g = this.grace()
      const since = t - this.pingAt
      const expired = this.probing ? since >= g : silence >= timeout && since >= g
      if (expired) {
        if (late && !this.reprobed) {
          // This check itself was held up: what answered the ping may be
          // waiting behind it. One more probe before judging.
          this.reprobed = true
          this.ping(true)
        } else {
          this.end(new TetherError('heartbeat_timeout', `tether: the server sent nothing for ${Math.round(silence)} ms (heartbeat timeout ${timeout} ms)`), true)
          return
        }
      }
    } else if (silence >= timeout) {
      // Silent for the whole timeout without a ping from us: our timers
      // were held up (a background tab). Ask before judging.
      this.ping(true)
    } else if (silence >= interval && t - this.pingAt >= interval) {
      this.ping(false)
    }
    this.schedule()
  }
}

/** A token bucket: rate per second, burst tokens. @internal */
class Bucket {
  constructor (rate, burst, now) {
    this.perMs = rate / 1000
    this.burst = burst
    this.tokens = burst
    this.t = now
  }

  /** Takes a token and returns 0, or returns how many ms until one. */
  take (now) {
    this.tokens = Math.min(this.burst, this.tokens + Math.max(0, now - this.t) * this.perMs)
    this.t = now
    if (this.tokens >= 1) {
      this.tokens -= 1
      return 0
    }
    return Math.max(1, Math.ceil((1 - this.tokens) / this.perMs))
  }
}

// --- Helpers ------------------------------------------------------------------

/**
 * How long to wait before attempt (from 0), as the Go client's Backoff.
 * @param {{base: number, max: number, factor: number, jitter: string}} b
 * @param {number} attempt
 */
export function backoffDelay (b, attempt) {
  attempt = Math.max(0, attempt)
  if (b.jitter === 'decorrelated') {
    let d = b.base
    for (let i = 0; i <= Math.min(attempt, 256); i++) d = Math.min(b.max, b.base + Math.random() * (3 * d - b.base))
    return d
  }
  const raw = b.base * Math.pow(b.factor, attempt)
  const c = raw >= b.max || !Number.isFinite(raw) ? b.max : raw
  switch (b.jitter) {
    case 'equal': return c / 2 + Math.random() * (c / 2)
    case 'none': return c
    default: return Math.random() * c
  }
}

function checkBackoff (b) {
  const bad = (why) => { throw new TypeError(`tether: backoff: ${why}`) }
  if (!(b.base >= 0) || !(b.max >= 0) || !(b.stableAfter >= 0)) bad('durations must not be negative')
  if (b.base > b.max) bad(`base ${b.base} exceeds max ${b.max}`)
  if (!(b.factor >= 1) || !Number.isFinite(b.factor)) bad('factor must be a number of at least 1')
  if (!['full', 'equal', 'none', 'decorrelated'].includes(b.jitter)) bad(`unknown jitter ${JSON.stringify(b.jitter)}`)
  if (!(b.maxRetries >= 0)) bad('maxRetries must not be negative')
  if (!(b.quiet >= 0)) bad('quiet must not be negative')
}

/** The retry_ms hint of a close reason, or 0. */
function retryHint (reason) {
  const m = /retry_ms=(\d+)/.exec(reason)
  if (!m) return 0
  const ms = Number(m[1])
  return ms > 0 ? Math.min(ms, MAX_RETRY_HINT) : 0
}

function resolveURL (u) {
  if (typeof u !== 'string' || u === '') throw new TypeError('tether: a URL must be a non-empty string')
  const base = globalThis.location?.href
  let url
  try {
    url = base ? new URL(u, base) : new URL(u)
  } catch {
    throw new TypeError(`tether: invalid URL ${JSON.stringify(u)}`)
  }
  if (url.protocol === 'http:') url.protocol = 'ws:'
  else if (url.protocol === 'https:') url.protocol = 'wss:'
  if (url.protocol !== 'ws:' && url.protocol !== 'wss:') throw new TypeError(`tether: ${JSON.stringify(u)} is not a ws:, wss:, http: or https: URL`)
  url.hash = ''
  return url.href
}

function closedError (what) {
  return new TetherError('closed', `tether: ${what}: the client is closed`)
}

function isUint (n) {
  return Number.isSafeInteger(n) && n >= 0
}

/** Why s cannot name a topic, or '' (PROTOCOL.md, section 3). */
function topicProblem (s) {
  if (typeof s !== 'string') return 'a topic must be a string'
  const n = utf8Length(s)
  if (n === 0) return 'empty topic'
  if (n > 256) return `topic of ${n} bytes, over 256`
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f]/.test(s)) return 'control character in topic'
  return ''
}

/** What is wrong with a welcome, or ''. */
function welcomeProblem (w) {
  if (w === null || typeof w !== 'object' || Array.isArray(w)) return 'not a JSON object'
  if (w.op !== 'welcome') return `op ${JSON.stringify(w.op)}`
  if (typeof w.session !== 'string') return '"session" missing'
  const hb = w.heartbeat
  if (hb === null || typeof hb !== 'object' || !isUint(hb.interval_ms ?? 0) || !isUint(hb.timeout_ms ?? 0)) return '"heartbeat" missing or invalid'
  if (w.limits != null) {
    const l = w.limits
    if (typeof l !== 'object' || typeof l.msgs_per_s !== 'number' || !(l.msgs_per_s > 0) || !Number.isSafeInteger(l.burst) || l.burst <= 0) return '"limits" invalid'
  }
  if (w.resume != null) {
    if (!Array.isArray(w.resume)) return '"resume" is not an array'
    for (const r of w.resume) {
      if (r === null || typeof r !== 'object' || typeof r.topic !== 'string' || typeof r.epoch !== 'string' || !isUint(r.seq) || typeof r.status !== 'string') return 'a "resume" entry is invalid'
    }
  }
  return ''
}

/** The length of s in UTF-8. */
function utf8Length (s) {
  let n = 0
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i)
    if (c < 0x80) n += 1
    else if (c < 0x800) n += 2
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      n += 4
      i++
    } else n += 3
  }
  return n
}

/**
 * @typedef {object} Sub a topic subscribed to; it outlives conns
 * @property {string} topic
 * @property {Function} handler
 * @property {string} epoch position: the last message delivered
 * @property {number} seq
 * @property {boolean} known the position holds one; else subscribe without since
 * @property {boolean} acked the server has accepted it once
 * @property {boolean} latest ask for the topic's last message, until acked
 * @property {{resolve: Function, reject: Function} | null} waiter the first subscribe()
 * @property {any} retry re-sends a re-subscription refused for a while
 * @property {number} retries
 * @property {{members: Map<string, {user: string, meta?: any}>, count: number} | null} pres
 *   the topic's presence, as the server last told; null before any
 * @property {boolean} presFirst no presence of the topic yet on this conn
 */

/**
 * @typedef {object} Req a request sent, or to be sent
 * @property {string} id
 * @property {string} op
 * @property {string | undefined} topic
 * @property {string} line
 * @property {number} bytes its length in UTF-8
 * @property {number} [start] bytes sent on its conn before it
 * @property {Function} [resolve]
 * @property {Function} [reject]
 * @property {Sub} [sub]
 * @property {boolean} [since]
 * @property {boolean} [batch] a re-subscription of a new conn
 */
