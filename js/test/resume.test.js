// Resuming topics across lost conns, resyncs, the offline buffer and
// pacing within the server's rate limit, against the Go test server.
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { client, closeAll, errors, next, sleep, startServer, state, until } from '../testlib/helpers.js'

// A fixed pause before reconnecting: room for what the tests do meanwhile.
const PAUSE = { base: 300, max: 300, jitter: 'none' }

let srv, short
before(async () => {
  ;[srv, short] = await Promise.all([
    startServer(['-interval', '200ms', '-timeout', '600ms']),
    startServer(['-interval', '200ms', '-timeout', '600ms', '-history', '5'])
  ])
})
after(async () => {
  await closeAll()
  await Promise.all([srv.stop(), short.stop()])
})

const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i)

test('resumes across a dropped conn: every message once, in order, seq contiguous', async () => {
  const c = client(srv.url('rex'), { backoff: PAUSE })
  const errs = errors(c)
  const resyncs = []
  c.on('resync', (t) => resyncs.push(t))
  const got = []
  const pos = await c.subscribe('res:a', (data, m) => got.push([data.i, m.seq, m.epoch]))
  await srv.publish('res:a', ...range(1, 3).map((i) => ({ i })))
  await until(() => got.length === 3, 2000, 'first messages')

  const lost = next(c, 'state', (s) => s === 'reconnecting')
  const back = next(c, 'state', (s) => s === 'connected')
  await srv.ctl('kick', { user: 'rex' }) // no close frame: 1006
  const [, why] = await lost
  assert.equal(why.code, 'conn_lost')
  assert.equal(why.closeCode, 1006)
  await srv.publish('res:a', ...range(4, 8).map((i) => ({ i }))) // while the client is away
  await back
  await srv.publish('res:a', ...range(9, 10).map((i) => ({ i })))
  await until(() => got.length >= 10, 3000, 'all messages')
  await sleep(100) // nothing more comes
  assert.deepEqual(got.map(([i]) => i), range(1, 10))
  assert.deepEqual(got.map(([, seq]) => seq), range(1, 10))
  assert.ok(got.every(([, , e]) => e === pos.epoch))
  assert.deepEqual(resyncs, [])
  assert.deepEqual(errs, [])
  assert.equal(await srv.conns('rex'), 1)
})

test('resumes from the ack position when no message came before the conn was lost', async () => {
  await srv.publish('res:b', 'old')
  const c = client(srv.url('ron'), { backoff: PAUSE })
  const got = []
  await c.subscribe('res:b', (data, m) => got.push([data, m.seq]))
  const back = next(c, 'state', (s) => s === 'connected')
  await srv.ctl('kick', { user: 'ron' })
  await srv.publish('res:b', 'missed')
  await back
  await until(() => got.length === 1, 2000, 'the missed message')
  assert.deepEqual(got, [['missed', 2]])
})

test('resync when the history no longer holds what was missed', async () => {
  const c = client(short.url('sue'), { backoff: PAUSE })
  const events = []
  c.on('resync', (t) => events.push(['resync', t]))
  await c.subscribe('rs:a', (data, m) => events.push(['msg', data, m.seq]))
  await short.publish('rs:a', 1)
  await until(() => events.length === 1, 2000, 'first message')
  const back = next(c, 'state', (s) => s === 'connected')
  await short.ctl('kick', { user: 'sue' })
  await short.publish('rs:a', ...range(2, 12)) // 11 messages; the history keeps 5
  await back
  await until(() => events.length === 2, 2000, 'the resync')
  await short.publish('rs:a', 13)
  await until(() => events.length === 3, 2000, 'the next live message')
  assert.deepEqual(events, [['msg', 1, 1], ['resync', 'rs:a'], ['msg', 13, 13]])
})

test('the offline buffer: kept while away, sent in order after resubscribing, bounded', async () => {
  const watcher = client(srv.url('wes'))
  const seen = []
  await watcher.subscribe('buf:a', (data) => seen.push(data))

  const c = client(srv.url('ola'), { backoff: PAUSE, offlineBuffer: { messages: 5, bytes: 1 << 20 } })
  const own = []
  await c.subscribe('buf:a', (data) => own.push(data))
  const results = []
  const echoes = []
  c.on('message', (d) => echoes.push(d))
  let fired = false
  c.on('state', (s) => {
    if (s !== 'reconnecting' || fired) return
    fired = true
    // Offline now: these wait in the buffer (5 at most).
    for (let i = 1; i <= 4; i++) results.push(c.publish('buf:a', { i }).then(() => 'ok', (e) => e.code))
    results.push(c.send({ echo: 5 }).then(() => 'ok', (e) => e.code))
    results.push(c.publish('buf:a', { i: 6 }).then(() => 'ok', (e) => e.code))
    results.push(c.publish('buf:a', { i: 7 }, { volatile: true }).then(() => 'ok', (e) => e.code))
  })
  const back = next(c, 'state', (s) => s === 'connected')
  await srv.ctl('kick', { user: 'ola' })
  await back
  assert.deepEqual(await Promise.all(results), ['ok', 'ok', 'ok', 'ok', 'ok', 'buffer_full', 'offline'])
  await until(() => seen.length === 4 && own.length === 4 && echoes.length === 1, 2000, 'the buffered messages')
  assert.deepEqual(seen, range(1, 4).map((i) => ({ i })))
  assert.deepEqual(own, seen) // after resubscribing: the client gets its own messages
  assert.deepEqual(echoes, [{ echo: 5 }])

  // The byte bound: one message over it is refused.
  const small = client(srv.url('ola2'), { backoff: PAUSE, offlineBuffer: { messages: 100, bytes: 100 } })
  assert.equal(small.state, 'connecting') // not connected yet: offline
  const ok = small.publish('buf:b', 'x'.repeat(20))
  await assert.rejects(small.publish('buf:b', 'x'.repeat(80)), (e) => e.code === 'buffer_full')
  await ok
})

test('a restarted server (new epoch) makes the client resync, then it goes on', async () => {
  const srv2 = await startServer(['-interval', '200ms', '-timeout', '600ms'])
  try {
    const c = client(srv2.url('tom'), { backoff: { base: 100, max: 200 } })
    const events = []
    c.on('resync', (t) => events.push(['resync', t]))
    await c.subscribe('rst:a', (data, m) => events.push(['msg', data, m.seq]))
    await srv2.publish('rst:a', 'before')
    await until(() => events.length === 1, 2000, 'first message')
    const lost = next(c, 'state', (s) => s === 'reconnecting')
    const back = next(c, 'state', (s) => s === 'connected', 5000)
    await srv2.ctl('restart', { delay: 400 })
    await lost
    await back
    await until(() => events.length === 2, 2000, 'the resync')
    await srv2.publish('rst:a', 'after')
    await until(() => events.length === 3, 2000, 'the next message')
    assert.deepEqual(events, [['msg', 'before', 1], ['resync', 'rst:a'], ['msg', 'after', 1]])
    await c.close()
  } finally {
    await srv2.stop()
  }
})

test('subscriptions and buffer are paced within the limits of the welcome', async () => {
  // 20 messages/s in bursts of 10: the 25 subscriptions and 10 buffered
  // publications need pacing, at the subscribe and again after a reconnect.
  const slow = await startServer(['-interval', '2s', '-timeout', '6s', '-slow'])
  try {
    const c = client(slow.url('pat'), { backoff: PAUSE })
    const errs = errors(c)
    await state(c, 'connected')
    const topics = range(1, 25).map((i) => `pace:${i}`)
    const got = new Map()
    const started = Date.now()
    await Promise.all(topics.map((t) => c.subscribe(t, (data) => got.set(t, [...(got.get(t) ?? []), data]))))
    assert.ok(Date.now() - started >= 500, `25 subscriptions took ${Date.now() - started} ms: not paced`)

    const results = []
    const offline = (s) => {
      if (s !== 'reconnecting') return
      c.off('state', offline)
      for (let i = 0; i < 10; i++) results.push(c.publish('pace:1', i))
    }
    c.on('state', offline)
    const back = next(c, 'state', (s) => s === 'connected', 10000)
    await slow.ctl('kick', { user: 'pat' })
    await back
    await Promise.all(results)
    for (const t of topics) await slow.publish(t, t)
    await until(() => topics.every((t) => got.get(t)?.includes(t)), 3000, 'a message on every topic')
    assert.deepEqual(got.get('pace:1'), [...range(0, 9), 'pace:1'])
    assert.deepEqual(errs, [], 'no request refused by the rate limit')
    assert.equal(c.state, 'connected')
    await c.close()
  } finally {
    await slow.stop()
  }
})

test('publications in flight when the conn drops: each settles, none arrives twice', async () => {
  const watcher = client(srv.url('wit'))
  const seen = []
  await watcher.subscribe('fly:a', (data) => seen.push(data))
  const c = client(srv.url('fly'), { backoff: { base: 50, max: 100 } })
  await state(c, 'connected')
  const n = 100
  const results = []
  for (let i = 0; i < n; i++) results.push(c.publish('fly:a', i).then(() => 'ok', (e) => e.code))
  const back = next(c, 'state', (s) => s === 'connected')
  await srv.ctl('kick', { user: 'fly' })
  const settled = await Promise.all(results)
  for (const r of settled) assert.ok(r === 'ok' || r === 'conn_lost', r)
  await back
  await c.publish('fly:a', 'last')
  await until(() => seen.includes('last'), 2000, 'the last message')
  const values = seen.filter((v) => v !== 'last')
  assert.equal(new Set(values).size, values.length, 'no duplicates')
  assert.deepEqual(values, [...values].sort((a, b) => a - b), 'in order')
  for (let i = 0; i < n; i++) {
    if (settled[i] === 'ok') assert.ok(values.includes(i), `acked ${i} not delivered`)
  }
})

test('subscribe from a position the application kept: what came after it, or a resync', async () => {
  await srv.publish('kept:a', ...range(1, 5).map((i) => ({ i })))
  const first = client(srv.url('kim'))
  const metas = []
  await first.subscribe('kept:a', (data, m) => metas.push(m))
  await srv.publish('kept:a', { i: 6 })
  await until(() => metas.length === 1, 2000, 'a live message')
  const kept = { epoch: metas[0].epoch, seq: 3 }
  await first.close()

  const again = client(srv.url('kim'))
  const got = []
  const resyncs = []
  again.on('resync', (t) => resyncs.push(t))
  await again.subscribe('kept:a', (data, m) => got.push([data.i, m.seq]), { since: kept })
  await until(() => got.length === 3, 2000, 'the messages after the kept position')
  assert.deepEqual(got, [[4, 4], [5, 5], [6, 6]])
  assert.deepEqual(resyncs, [])

  const stale = client(srv.url('kim'))
  const events = []
  stale.on('resync', (t) => events.push(['resync', t]))
  await stale.subscribe('kept:a', (data) => events.push(['msg', data.i]), { since: { epoch: 'gone', seq: 2 } })
  await until(() => events.length === 1, 2000, 'the resync')
  await srv.publish('kept:a', { i: 7 })
  await until(() => events.length === 2, 2000, 'the next live message')
  assert.deepEqual(events, [['resync', 'kept:a'], ['msg', 7]])
  await assert.rejects(stale.subscribe('kept:b', () => {}, { since: { epoch: 1 } }), TypeError)
})
