// The user's inbox (PROTOCOL.md, section 10.1) against the Go test server
// with -inbox: direct messages reach the 'message' listeners once each, in
// order, with their place in the inbox, across dead conns, lost
// acknowledgements and reconnects, and are acknowledged a WebSocket
// message at a time.
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { client, closeAll, errors, next, startServer, state, until } from '../testlib/helpers.js'

// A fixed pause before reconnecting: room for what a test sends meanwhile.
const PAUSE = { base: 1000, max: 1000, jitter: 'none' }

let srv
before(async () => { srv = await startServer(['-inbox', '5000', '-interval', '200ms', '-timeout', '600ms']) })
after(async () => {
  await closeAll()
  await srv.stop()
})

/** Records the 'message' events of c: [data, meta], in order. */
function inbox (c) {
  const got = []
  c.on('message', (data, meta) => got.push([data, meta]))
  return got
}

const pending = async (user) => (await srv.ctl('pending', { user })).seqs
const received = async () => (await srv.ctl('received')).received
const send = (user, ...values) => srv.ctl('send', { user }, values.map((v) => JSON.stringify(v)).join('\n'))
const acked = (user) => until(async () => (await pending(user)).length === 0, 5000, `${user}'s inbox acknowledged`)

/**
 * Checks that got's metas are inbox positions in order: seq one more than
 * the one before's in its epoch, or 1 in a new epoch (a memory inbox
 * forgets a user's emptied inbox).
 */
function checkPositions (got) {
  let last = { epoch: '', seq: 0 }
  for (const [data, meta] of got) {
    assert.ok(meta && typeof meta.epoch === 'string' && meta.epoch !== '', `message ${JSON.stringify(data)} without a position`)
    const next = meta.epoch === last.epoch ? last.seq + 1 : 1
    assert.equal(meta.seq, next, `message ${JSON.stringify(data)} at ${JSON.stringify(meta)} after ${JSON.stringify(last)}`)
    assert.deepEqual(Object.keys(meta).sort(), ['epoch', 'seq'])
    last = meta
  }
}

test('inbox messages arrive once, in order, with their position, and are acknowledged', async () => {
  const c = client(srv.url('ann'))
  const errs = errors(c)
  const got = inbox(c)
  await state(c, 'connected')
  for (let n = 1; n <= 20; n++) await srv.ctl('send', { user: 'ann', data: JSON.stringify({ n }) })
  await until(() => got.length >= 20, 5000, '20 messages')
  assert.deepEqual(got.map(([d]) => d.n), Array.from({ length: 20 }, (_, i) => i + 1))
  checkPositions(got)
  await acked('ann')

  // A second client of ann gets no replay: its first message is the next
  // one sent, which starts a new epoch (the inbox emptied), from 1: new to
  // the first client too, although 1 is not above 20.
  const other = client(srv.url('ann'))
  const otherGot = inbox(other)
  await state(other, 'connected')
  const last = got[19][1]
  await send('ann', { n: 21 })
  await until(() => otherGot.length >= 1 && got.length >= 21, 5000, 'message 21')
  assert.deepEqual(otherGot[0][0], { n: 21 })
  assert.deepEqual(got[20][0], { n: 21 })
  assert.equal(got[20][1].seq, 1)
  assert.notEqual(got[20][1].epoch, last.epoch)
  assert.deepEqual(otherGot[0][1], got[20][1])
  await acked('ann')
  assert.deepEqual(errs, [])
})

test('a message sent into a dead conn arrives once, on the next conn', async () => {
  const c = client(srv.url('zed'), { backoff: { base: 50, max: 50, jitter: 'none' } })
  const got = inbox(c)
  await state(c, 'connected')
  await send('zed', { n: 1 })
  await until(() => got.length === 1, 5000, 'message 1')
  await acked('zed')

  // The conn goes silent both ways: the hub still thinks it alive and
  // writes message 2 into it; the client finds it dead (600 ms of silence)
  // and reconnects, and the inbox's replay brings message 2.
  const states = []
  c.on('state', (s) => states.push(s))
  assert.equal((await srv.ctl('freeze', { user: 'zed' })).frozen, 1)
  await send('zed', { n: 2 })
  assert.deepEqual(states, [], 'the client left the frozen conn before the message was sent into it')
  assert.equal((await pending('zed')).length, 1)
  await until(() => got.length === 2, 5000, 'message 2')
  assert.deepEqual(states.slice(0, 2), ['reconnecting', 'connected'])
  await acked('zed')
  await send('zed', { n: 3 })
  await until(() => got.length === 3, 5000, 'message 3')
  assert.deepEqual(got.map(([d]) => d.n), [1, 2, 3])
  checkPositions(got)
})

test('a message whose received was lost comes again and is dropped', async () => {
  const c = client(srv.url('lou'), { backoff: { base: 50, max: 50, jitter: 'none' } })
  const got = inbox(c)
  await state(c, 'connected')
  await send('lou', { n: 1 })
  await until(() => got.length === 1, 5000, 'message 1')
  await acked('lou')

  // From now on the hub hears nothing of this conn, the received of
  // message 2 among it; it drops the conn after its heartbeat timeout.
  assert.equal((await srv.ctl('deafen', { user: 'lou' })).deafened, 1)
  const lost = next(c, 'state', (s) => s === 'reconnecting')
  await send('lou', { n: 2 })
  await until(() => got.length === 2, 5000, 'message 2')
  assert.deepEqual(await pending('lou'), [got[1][1].seq], 'message 2 acknowledged through a deaf conn')
  await lost
  // The next conn gets message 2 again: dropped, and acknowledged.
  await state(c, 'connected')
  await acked('lou')
  await send('lou', { n: 3 })
  await until(() => got.length === 3, 5000, 'message 3')
  assert.deepEqual(got.map(([d]) => d.n), [1, 2, 3])
  checkPositions(got)
})

test('a replay of 1,000 messages comes in order, with few received, and the conn stays', async () => {
  const c = client(srv.url('rex'), { backoff: PAUSE })
  const errs = errors(c)
  const got = inbox(c)
  await state(c, 'connected')
  await send('rex', { n: 0 })
  await until(() => got.length === 1, 5000, 'message 0')
  await acked('rex')

  const lost = next(c, 'state', (s) => s === 'reconnecting')
  await srv.ctl('kick', { user: 'rex' })
  await lost
  // Within the pause before the client comes back.
  await send('rex', ...Array.from({ length: 1000 }, (_, i) => ({ n: i + 1 })))
  assert.equal((await pending('rex')).length, 1000)
  const before = await received()
  const states = []
  c.on('state', (s) => states.push(s))
  await until(() => got.length === 1001, 10000, 'the replay')
  assert.deepEqual(got.map(([d]) => d.n), Array.from({ length: 1001 }, (_, i) => i))
  checkPositions(got)
  assert.equal(got[1][1].seq, 1)
  await acked('rex')
  const n = (await received()) - before
  // The hub joins the replay into a few WebSocket messages, and the
  // client acknowledges each once; one received per message would have
  // the hub close the conn (its burst is 200).
  assert.ok(n >= 1 && n < 100, `${n} received for a replay of 1000`)

  // The conn that took the replay stays: the next message comes on it.
  await send('rex', { n: 1001 })
  await until(() => got.length === 1002, 5000, 'message 1001')
  assert.deepEqual(states, ['connected'])
  assert.deepEqual(errs, [])
})

test('bytes and text that is not JSON go through the inbox, live and replayed', async () => {
  const c = client(srv.url('bin'), { backoff: PAUSE })
  const errs = errors(c)
  const got = inbox(c)
  await state(c, 'connected')
  const bytes = Uint8Array.from([0, 10, 255, 123, 10, 1])
  const sendAll = async () => {
    await srv.ctl('send', { user: 'bin', b64: Buffer.from(bytes).toString('base64') })
    await srv.ctl('send', { user: 'bin', data: 'plain text\nover two lines' })
    await srv.ctl('send', { user: 'bin', data: '{"json": true}' })
  }
  const want = [bytes, 'plain text\nover two lines', { json: true }]

  await sendAll()
  await until(() => got.length === 3, 5000, 'the live messages')
  assert.deepEqual(got.map(([d]) => d), want)
  assert.ok(got[0][0] instanceof Uint8Array)
  checkPositions(got)
  await acked('bin')

  // Away: kept, then replayed (a binary message of records) in order.
  const lost = next(c, 'state', (s) => s === 'reconnecting')
  await srv.ctl('kick', { user: 'bin' })
  await lost
  await sendAll()
  await until(() => got.length === 6, 5000, 'the replayed messages')
  assert.deepEqual(got.slice(3).map(([d]) => d), want)
  checkPositions(got.slice(3))
  assert.deepEqual(got.slice(3).map(([, m]) => m.seq), [1, 2, 3])
  await acked('bin')
  assert.deepEqual(errs, [])
})
