// Reconnecting: failover URLs, close codes, backoff, against the Go test
// server.
import assert from 'node:assert/strict'
import net from 'node:net'
import { after, before, test } from 'node:test'
import { client, closeAll, next, recordingWebSocket, sleep, startServer, state, until } from '../testlib/helpers.js'

let srv
before(async () => { srv = await startServer(['-interval', '200ms', '-timeout', '600ms']) })
after(async () => {
  await closeAll()
  await srv.stop()
})

/** A loopback URL on which nothing listens: connections are refused. */
async function refusedURL () {
  const s = net.createServer()
  await new Promise((resolve) => s.listen(0, '127.0.0.1', resolve))
  const { port } = s.address()
  await new Promise((resolve) => s.close(resolve))
  return `ws://127.0.0.1:${port}/ws`
}

test('failover: the first URL refused, the second used, and kept after a drop', async () => {
  const bad = await refusedURL()
  const good = srv.url('fox')
  const rec = recordingWebSocket()
  const c = client([bad, good], { WebSocket: rec.WebSocket })
  await state(c, 'connected')
  assert.deepEqual(rec.urls, [bad, good])
  assert.equal(c.url, good)
  const back = next(c, 'state', (s) => s === 'connected')
  await srv.ctl('kick', { user: 'fox' })
  await back
  assert.deepEqual(rec.urls, [bad, good, good], 'sticks to the last URL that worked')
})

test('every URL refused: backoff between rounds, growing; maxRetries gives up', async () => {
  const [a, b] = [await refusedURL(), await refusedURL()]
  const rec = recordingWebSocket()
  const c = client([a, b], { WebSocket: rec.WebSocket, backoff: { base: 100, max: 1000, jitter: 'none', maxRetries: 3 } })
  const [st, err] = await next(c, 'state', (s) => s === 'closed', 5000)
  assert.equal(st, 'closed')
  assert.equal(err.code, 'gave_up')
  assert.equal(c.error, err)
  assert.deepEqual(rec.urls, [a, b, a, b, a, b], 'each round tries every URL once')
  const t = rec.times
  // No wait within a round; 100 ms, then 200 ms between rounds.
  assert.ok(t[1] - t[0] < 90, `within a round: ${t[1] - t[0]} ms`)
  assert.ok(t[2] - t[1] >= 95 && t[2] - t[1] < 400, `first pause ${t[2] - t[1]} ms`)
  assert.ok(t[4] - t[3] >= 195 && t[4] - t[3] < 600, `second pause ${t[4] - t[3]} ms`)
})

for (const [code, name] of [[4401, 'unauthorized'], [4403, 'forbidden']]) {
  test(`close ${code} is final: closed with the error, no reconnect`, async () => {
    const user = `final${code}`
    const rec = recordingWebSocket()
    const c = client(srv.url(user), { WebSocket: rec.WebSocket })
    await state(c, 'connected')
    await c.subscribe('never', () => {})
    const closed = next(c, 'state', (s) => s === 'closed')
    await srv.ctl('close', { user, code, reason: 'token expired' })
    const [, err] = await closed
    assert.equal(err.code, name)
    assert.equal(err.closeCode, code)
    assert.equal(err.reason, 'token expired')
    assert.equal(c.error, err)
    await assert.rejects(c.publish('never', 1), (e) => e.code === 'closed')
    await sleep(300)
    assert.equal(rec.urls.length, 1, 'no new attempt')
    assert.equal(await srv.conns(user), 0)
  })
}

test('HTTP 401 at the handshake is final (Node: ws reports the status)', async () => {
  const rec = recordingWebSocket()
  const c = client(srv.url(), { WebSocket: rec.WebSocket, token: () => 'deny' })
  const [, err] = await next(c, 'state', (s) => s === 'closed')
  assert.equal(err.code, 'unauthorized')
  assert.equal(err.status, 401)
  await sleep(200)
  assert.equal(rec.urls.length, 1)
})

test('1001 with retry_ms: the client waits the hint, plus at most 20 %', async () => {
  const rec = recordingWebSocket()
  const c = client(srv.url('gone'), { WebSocket: rec.WebSocket })
  await state(c, 'connected')
  const lost = next(c, 'state', (s) => s === 'reconnecting')
  const back = next(c, 'state', (s) => s === 'connected')
  await srv.ctl('close', { user: 'gone', code: 1001, reason: 'retry_ms=600' })
  const [, err] = await lost
  const at = Date.now()
  assert.equal(err.closeCode, 1001)
  assert.equal(err.retryMs, 600)
  await back
  const waited = rec.times[1] - at
  assert.ok(waited >= 590 && waited <= 600 * 1.2 + 150, `waited ${waited} ms`)
})

test('4429 and 4008 back off further: at least the hint, the attempt count grows', async () => {
  const rec = recordingWebSocket()
  const c = client(srv.url('shed'), { WebSocket: rec.WebSocket, backoff: { base: 100, max: 1000, jitter: 'none' } })
  await state(c, 'connected')
  // The wait is timed from the state change, which the client emits just
  // before it arms its timer, not from when the test gets to run again:
  // the control request's answer may come later than the close.
  let at
  const dropped = (s) => s === 'reconnecting' && (at = Date.now()) > 0
  let back = next(c, 'state', (s) => s === 'connected')
  let lost = next(c, 'state', dropped)
  await srv.ctl('close', { user: 'shed', code: 4429, reason: 'retry_ms=400' })
  await lost
  await back
  const first = rec.times[1] - at
  assert.ok(first >= 390 && first < 700, `after 4429: ${first} ms`)
  // Not stable yet (under stableAfter): the next drop waits the next step.
  back = next(c, 'state', (s) => s === 'connected')
  lost = next(c, 'state', dropped)
  await srv.ctl('close', { user: 'shed', code: 4008, reason: 'slow consumer' })
  await lost
  await back
  const second = rec.times[2] - at
  assert.ok(second >= 190 && second < 500, `after 4008: ${second} ms (base·2)`)
})

test('a dropped conn is retried with backoff and the client keeps its subscriptions', async () => {
  const c = client(srv.url('dru'))
  const got = []
  await c.subscribe('drop:a', (d) => got.push(d))
  for (let i = 0; i < 3; i++) {
    const back = next(c, 'state', (s) => s === 'connected')
    await srv.ctl('close', { user: 'dru', code: 1000 })
    await back
  }
  await srv.publish('drop:a', 'still here')
  await until(() => got.length > 0, 2000, 'the message')
  assert.deepEqual(got, ['still here'])
})

test('maxRetries with quiet: a round, a pause, another round, never giving up', async () => {
  const bad = await refusedURL()
  const rec = recordingWebSocket()
  const c = client(bad, { WebSocket: rec.WebSocket, backoff: { base: 50, max: 50, jitter: 'none', maxRetries: 3, quiet: 600 } })
  await until(() => rec.urls.length >= 6, 5000, 'two rounds')
  assert.notEqual(c.state, 'closed')
  const t = rec.times
  // Within a round 50 ms apart; between rounds the quiet 600 ms.
  assert.ok(t[1] - t[0] < 400 && t[2] - t[1] < 400, `within the first round: ${t[1] - t[0]}, ${t[2] - t[1]} ms`)
  assert.ok(t[3] - t[2] >= 590, `the pause: ${t[3] - t[2]} ms, want the quiet 600`)
  assert.ok(t[4] - t[3] < 400, `the second round: ${t[4] - t[3]} ms`)
})

test("'offline' once per outage, after offlineAfter, and not for a short one", async () => {
  const c = client(srv.url('olga'), { offlineAfter: 1500, backoff: { base: 50, max: 50, jitter: 'none' } })
  let offline = 0
  c.on('offline', () => offline++)
  await state(c, 'connected')
  // A short outage: kicked, back after a 50 ms backoff and a handshake.
  const back = next(c, 'state', (s) => s === 'connected')
  await srv.ctl('kick', { user: 'olga' })
  await back
  await sleep(1700)
  assert.equal(offline, 0, 'a short outage emitted offline')
  // A long one: the server gone for 3 s.
  await srv.ctl('restart', { delay: 3000 })
  await until(() => offline === 1, 5000, 'offline')
  await state(c, 'connected', 8000)
  await sleep(500)
  assert.equal(offline, 1, 'offline emitted more than once for one outage')
})
