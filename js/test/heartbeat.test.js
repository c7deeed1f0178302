// Dead servers: found by the heartbeat, not mistaken for throttled timers,
// probed when a page becomes visible or the network comes back. Against
// the Go test server, whose /freeze makes a conn silent both ways.
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { client, closeAll, next, recordingWebSocket, sleep, startServer, state, until } from '../testlib/helpers.js'

// Heartbeat of tens of ms: ping after 50 ms of silence, dead after 150 ms.
let srv, slow
before(async () => {
  ;[srv, slow] = await Promise.all([
    startServer(['-interval', '50ms', '-timeout', '150ms']),
    startServer(['-interval', '2s', '-timeout', '6s'])
  ])
})
after(async () => {
  await closeAll()
  await Promise.all([srv.stop(), slow.stop()])
})

test('a server that stops answering is found dead and replaced; nothing is lost', async () => {
  const c = client(srv.url('dee'), { backoff: { base: 50, max: 200 } })
  const got = []
  await c.subscribe('dead:a', (d, m) => got.push([d, m.seq]))
  assert.deepEqual(c.heartbeat, { interval: 50, timeout: 150 })
  await srv.publish('dead:a', 1)
  await until(() => got.length === 1, 2000, 'first message')

  const lost = next(c, 'state', (s) => s === 'reconnecting', 3000)
  const back = next(c, 'state', (s) => s === 'connected', 3000)
  const frozenAt = Date.now()
  assert.equal((await srv.ctl('freeze', { user: 'dee' })).frozen, 1)
  await srv.publish('dead:a', 2) // swallowed by the frozen conn
  const [, err] = await lost
  const found = Date.now() - frozenAt
  assert.equal(err.code, 'heartbeat_timeout')
  // timeout (150) + the ping's grace (at most timeout - interval = 100) + slack
  assert.ok(found < 150 + 100 + 400, `found dead after ${found} ms`)
  await back
  const replaced = Date.now() - frozenAt
  // + the backoff (at most 200 ms) and the handshake.
  assert.ok(replaced < 150 + 100 + 200 + 600, `replaced after ${replaced} ms`)
  await srv.publish('dead:a', 3)
  await until(() => got.length === 3, 2000, 'all messages')
  await sleep(50)
  assert.deepEqual(got, [[1, 1], [2, 2], [3, 3]])
})

/** Timers as a background tab has them: none fires sooner than floor ms. */
function throttled (floor) {
  return {
    setTimeout: (fn, ms) => setTimeout(fn, Math.max(ms, floor)),
    clearTimeout: (h) => clearTimeout(h)
  }
}

test('throttled timers do not make a live server look dead', async () => {
  // Every timer fires at least 500 ms late: the client's own pings go out
  // long after the 150 ms timeout, and each check finds a silence longer
  // than the timeout. Wall-clock time says it is the client's doing: it
  // probes instead of dropping the conn.
  const c = client(srv.url('tab'), { timers: throttled(500) })
  await state(c, 'connected')
  let rtts = 0
  c.on('rtt', () => rtts++)
  const states = []
  c.on('state', (s, e) => states.push([s, e?.code]))
  await sleep(3000)
  assert.deepEqual(states, [], 'the conn was kept')
  assert.ok(rtts >= 2, `${rtts} probes answered`)
  assert.equal(await srv.conns('tab'), 1)

  // And with the same timers, a server that really stopped answering is
  // still found: one probe, one more for the late check, then dead.
  const lost = next(c, 'state', (s) => s === 'reconnecting', 5000)
  const at = Date.now()
  await srv.ctl('freeze', { user: 'tab' })
  const [, err] = await lost
  assert.equal(err.code, 'heartbeat_timeout')
  assert.ok(Date.now() - at < 3 * 500 + 700, `found dead after ${Date.now() - at} ms`)
})

test('the timeout path consults the wall clock: a late check after a recent frame keeps the conn', async () => {
  // A clock the test moves: the client's checks see it jump, as after a
  // tab was frozen, while the server answered all along.
  let skew = 0
  const c = client(srv.url('clk'), { timers: { now: () => Date.now() + skew } })
  await state(c, 'connected')
  const states = []
  c.on('state', (s) => states.push(s))
  for (let i = 0; i < 5; i++) {
    skew += 10000 // ten seconds "pass" between two checks
    await sleep(120)
  }
  assert.deepEqual(states, [])
  assert.equal(await srv.conns('clk'), 1)
})

test('a page becoming visible, or the network coming back, probes at once', async () => {
  // A browser's globals, as far as the client uses them.
  const doc = Object.assign(new EventTarget(), { visibilityState: 'visible' })
  const win = new EventTarget()
  globalThis.document = doc
  globalThis.window = win
  try {
    // The slow server's heartbeat is 2 s / 6 s: without a probe, a dead
    // conn would take up to 6 s to find.
    const c = client(slow.url('vis'), { probeGrace: 300 })
    await state(c, 'connected')
    assert.deepEqual(c.heartbeat, { interval: 2000, timeout: 6000 })

    // A live server answers the probe.
    const rtt = next(c, 'rtt', () => true, 1000)
    doc.dispatchEvent(new Event('visibilitychange'))
    await rtt
    const rtt2 = next(c, 'rtt', () => true, 1000)
    win.dispatchEvent(new Event('online'))
    await rtt2
    assert.equal(c.state, 'connected')

    // A hidden page does not probe.
    doc.visibilityState = 'hidden'
    let probed = false
    c.on('rtt', () => { probed = true })
    doc.dispatchEvent(new Event('visibilitychange'))
    await sleep(100)
    assert.equal(probed, false)

    // A dead one is found within the grace.
    await slow.ctl('freeze', { user: 'vis' })
    const lost = next(c, 'state', (s) => s === 'reconnecting', 3000)
    const at = Date.now()
    doc.visibilityState = 'visible'
    doc.dispatchEvent(new Event('visibilitychange'))
    const [, err] = await lost
    assert.equal(err.code, 'heartbeat_timeout')
    assert.ok(Date.now() - at < 300 + 400, `found dead after ${Date.now() - at} ms`)
    await state(c, 'connected')
    await c.close()

    // 'online' while waiting out a backoff: the next attempt goes at once.
    const rec = recordingWebSocket()
    const d = client('ws://127.0.0.1:1/ws', { WebSocket: rec.WebSocket, backoff: { base: 20000, jitter: 'none' } })
    await until(() => rec.urls.length === 1, 2000, 'first attempt')
    await sleep(100) // refused by now: waiting 20 s
    assert.equal(rec.urls.length, 1)
    win.dispatchEvent(new Event('online'))
    await until(() => rec.urls.length === 2, 1000, 'an attempt on online')
    await d.close()
  } finally {
    delete globalThis.document
    delete globalThis.window
  }
})
