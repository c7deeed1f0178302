// Connecting, requests and their answers, direct messages and presence,
// against the Go test server.
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import WebSocket from 'ws'
import { TetherClient, TetherError } from '../tether.js'
import { client, closeAll, errors, next, sleep, startServer, state, until } from '../testlib/helpers.js'

let srv
before(async () => { srv = await startServer(['-interval', '200ms', '-timeout', '600ms', '-grace', '100ms']) })
after(async () => {
  await closeAll()
  await srv.stop()
})

test('connects, is welcomed and adopts the heartbeat of the welcome', async () => {
  const c = client(srv.url('ann'))
  assert.equal(c.state, 'connecting')
  assert.deepEqual(c.heartbeat, { interval: 15000, timeout: 30000 }) // the defaults, before the welcome
  const welcome = next(c, 'welcome')
  const [st, err] = await next(c, 'state')
  assert.equal(st, 'connected')
  assert.equal(err, undefined)
  const [w] = await welcome
  assert.equal(w.op, 'welcome')
  assert.equal(typeof w.session, 'string')
  assert.deepEqual(w.heartbeat, { interval_ms: 200, timeout_ms: 600 })
  assert.deepEqual(w.limits, { msgs_per_s: 100, burst: 200 })
  assert.deepEqual(c.heartbeat, { interval: 200, timeout: 600 })
  assert.equal(c.url, srv.url('ann'))
  // The client pings after interval_ms of silence; its pong gives the RTT.
  const [rtt] = await next(c, 'rtt', () => true, 2000)
  assert.ok(rtt >= 0 && rtt < 1000, `rtt ${rtt}`)
  assert.equal(c.rtt, rtt)
  // Silence between pings keeps the conn: no reconnect over several timeouts.
  let changes = 0
  c.on('state', () => changes++)
  await sleep(1500)
  assert.equal(changes, 0)
  assert.equal(await srv.conns('ann'), 1)
  await c.close()
  assert.equal(c.state, 'closed')
  await until(async () => (await srv.conns('ann')) === 0, 2000, 'server sees the close')
})

test('subscribe resolves on the ack with the position; messages carry epoch and seq', async () => {
  await srv.publish('pos:a', { n: 1 }, { n: 2 })
  const c = client(srv.url('bob'))
  const got = []
  const pos = await c.subscribe('pos:a', (data, meta) => got.push([data, meta]))
  assert.equal(pos.topic, 'pos:a')
  assert.equal(typeof pos.epoch, 'string')
  assert.equal(pos.seq, 2) // the topic's position when the sub took effect
  assert.equal(c.state, 'connected')
  await srv.publish('pos:a', { n: 3 })
  await until(() => got.length === 1, 2000, 'message')
  assert.deepEqual(got[0], [{ n: 3 }, { topic: 'pos:a', epoch: pos.epoch, seq: 3 }])
  assert.deepEqual(c.topics, ['pos:a'])

  await assert.rejects(c.subscribe('pos:a', () => {}), (e) => e instanceof TetherError && e.code === 'already_subscribed')
  await assert.rejects(c.subscribe('', () => {}), (e) => e.code === 'bad_request')

  c.unsubscribe('pos:a')
  assert.deepEqual(c.topics, [])
  await sleep(50)
  await srv.publish('pos:a', { n: 4 })
  await sleep(150)
  assert.equal(got.length, 1, 'nothing after unsubscribe')
})

test('subscribe before connecting waits for the conn; a refusal rejects with the code', async () => {
  const c = client(srv.url('cid'))
  const early = c.subscribe('early:a', () => {}) // sent once welcomed
  await assert.rejects(c.subscribe('forbidden:x', () => {}), (e) => e instanceof TetherError && e.code === 'forbidden' && e.topic === 'forbidden:x')
  const pos = await early
  assert.equal(pos.seq, 0)
  assert.deepEqual(c.topics, ['early:a'])
})

test('publish resolves on the ack; the publisher receives its own message; refusals reject', async () => {
  const c = client(srv.url('dan'))
  const got = []
  await c.subscribe('pub:a', (data, { seq }) => got.push([data, seq]))
  await c.publish('pub:a', { text: 'hi', n: [1, 2] })
  await c.publish('pub:a', 'two')
  await c.publish('pub:a', null)
  await until(() => got.length === 3, 2000, 'own messages')
  assert.deepEqual(got, [[{ text: 'hi', n: [1, 2] }, 1], ['two', 2], [null, 3]])
  await assert.rejects(c.publish('readonly:a', 1), (e) => e.code === 'forbidden' && e.topic === 'readonly:a')
  await assert.rejects(c.publish('pub:a', undefined), (e) => e.code === 'not_json')
  await assert.rejects(c.publish('bad\u0001topic', 1), (e) => e.code === 'bad_request')
  assert.equal(c.state, 'connected')
})

test('send goes to the server application, which echoes it back as a direct message', async () => {
  const c = client(srv.url('eve'))
  const msg = next(c, 'message')
  await c.send({ cmd: 'echo', n: 1 })
  const [data] = await msg
  assert.deepEqual(data, { cmd: 'echo', n: 1 })
  // And a direct message from the server application (SendToUser).
  const m2 = next(c, 'message')
  await srv.ctl('send', { user: 'eve', data: JSON.stringify({ hello: 'eve' }) })
  assert.deepEqual((await m2)[0], { hello: 'eve' })
})

test('direct messages sent while offline arrive with the welcome', async () => {
  await srv.ctl('send', { user: 'fay', data: '"kept 1"' })
  await srv.ctl('send', { user: 'fay', data: '"kept 2"' })
  const c = client(srv.url('fay'))
  const got = []
  c.on('message', (d) => got.push(d))
  await state(c, 'connected')
  await until(() => got.length === 2, 2000, 'offline messages')
  assert.deepEqual(got, ['kept 1', 'kept 2'])
})

test('presence: joins with meta, then leaves after the grace', async () => {
  const a = client(srv.url('gus', { device: 'phone' }))
  const seen = []
  a.on('presence', (topic, change) => seen.push([topic, change]))
  await a.subscribe('room:p', () => {})
  await until(() => seen.some(([, ch]) => ch.joins.some((j) => j.user === 'gus')), 2000, 'own join')
  // The subscription opens with a snapshot of the room, empty until the
  // client's own join is announced after it.
  assert.deepEqual(seen[0], ['room:p', { joins: [], leaves: [], count: 0, snapshot: true }])
  const own = seen.find(([, ch]) => ch.joins.length > 0)
  assert.deepEqual(own, ['room:p', { joins: [{ user: 'gus', meta: { device: 'phone' } }], leaves: [], count: 1, snapshot: false }])
  assert.deepEqual(a.presence('room:p'), { count: 1, members: [{ user: 'gus', meta: { device: 'phone' } }] })

  const b = client(srv.url('hal', { device: 'laptop' }))
  await b.subscribe('room:p', () => {})
  await until(() => seen.some(([t, ch]) => t === 'room:p' && ch.joins.some((j) => j.user === 'hal')), 2000, 'join of hal')
  assert.deepEqual(seen.at(-1)[1], { joins: [{ user: 'hal', meta: { device: 'laptop' } }], leaves: [], count: 2, snapshot: false })

  const started = Date.now()
  await b.close()
  await until(() => seen.some(([, ch]) => ch.leaves.some((l) => l.user === 'hal')), 3000, 'leave of hal')
  assert.ok(Date.now() - started >= 80, 'a leave waits out the grace')
  assert.deepEqual(seen.at(-1)[1], { joins: [], leaves: [{ user: 'hal' }], count: 1, snapshot: false })
  assert.deepEqual(a.presence('room:p'), { count: 1, members: [{ user: 'gus', meta: { device: 'phone' } }] })
  assert.equal(a.presence('room:elsewhere'), undefined, 'not subscribed')
  a.unsubscribe('room:p')
  assert.equal(a.presence('room:p'), undefined, 'forgotten on unsubscribe')
})

test('token: fetched for every attempt and sent as ?token=', async () => {
  let calls = 0
  const c = client(srv.url(), { token: async () => { calls++; return 'ivy' } })
  await state(c, 'connected')
  assert.equal(calls, 1)
  assert.equal(await srv.conns('ivy'), 1)
  const echoed = next(c, 'message')
  await c.send('for ivy')
  assert.equal((await echoed)[0], 'for ivy')
  const back = next(c, 'state', (s) => s === 'connected')
  await srv.ctl('kick', { user: 'ivy' })
  await back
  assert.equal(calls, 2)

  // A token that fails makes the attempt fail; the client retries.
  let n = 0
  const d = client(srv.url(), { token: async () => { if (n++ < 2) throw new Error('not yet'); return 'jay' } })
  await state(d, 'connected')
  assert.equal(n, 3)
})

test('close is final: pending promises reject with closed, nothing reconnects', async () => {
  const c = client(srv.url('kim'))
  const pending = c.subscribe('close:a', () => {})
  const buffered = c.publish('close:a', 1) // offline: buffered
  await c.close()
  await assert.rejects(pending, (e) => e.code === 'closed')
  await assert.rejects(buffered, (e) => e.code === 'closed')
  await assert.rejects(c.publish('close:a', 2), (e) => e.code === 'closed')
  await assert.rejects(c.subscribe('close:b', () => {}), (e) => e.code === 'closed')
  assert.equal(c.state, 'closed')
  await sleep(200)
  assert.equal(await srv.conns('kim'), 0)
  await c.close() // again: nothing
})

test('the module exports what tether.d.ts declares', async () => {
  const mod = await import('../tether.js')
  assert.deepEqual(Object.keys(mod).sort(), ['SUBPROTOCOL', 'TetherClient', 'TetherError', 'backoffDelay'])
  assert.equal(mod.SUBPROTOCOL, 'tether.v1')
})

test('options are checked', () => {
  assert.throws(() => new TetherClient('ws://x/', {}), /WebSocket/)
  assert.throws(() => new TetherClient('ftp://x/', { WebSocket }), /URL/)
  assert.throws(() => new TetherClient([], { WebSocket }), /no URL/)
  assert.throws(() => new TetherClient('ws://x/', { WebSocket, backoff: { base: 100, max: 50 } }), /base/)
  assert.throws(() => new TetherClient('ws://x/', { WebSocket, backoff: { jitter: 'some' } }), /jitter/)
  assert.throws(() => new TetherClient('ws://x/', { WebSocket, heartbeat: { interval: 100, timeout: 100 } }), /heartbeat/)
  const c = new TetherClient('http://127.0.0.1:1/ws', { WebSocket })
  c.close()
  assert.equal(c.state, 'closed')
})

test('errors of listeners and handlers are reported, not thrown', async () => {
  const c = client(srv.url('lea'))
  const errs = errors(c)
  c.on('state', () => { throw new Error('listener boom') })
  await c.subscribe('boom:a', () => { throw new Error('handler boom') })
  await srv.publish('boom:a', 1)
  await until(() => errs.some((e) => e.code === 'handler' && /handler boom/.test(e.message)), 2000, 'handler error')
  assert.ok(errs.some((e) => /listener boom/.test(e.message)))
  assert.equal(c.state, 'connected')
})
