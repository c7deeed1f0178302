// subscribe(topic, handler, {latest: true}) against the Go test server: the
// topic's last message first, then live ones; nothing when there is none;
// since winning over latest; a reconnect resuming with since, never asking
// for the latest again.
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import WebSocket from 'ws'
import { client, closeAll, errors, next, sleep, startServer, until } from '../testlib/helpers.js'

// A fixed pause before reconnecting: room for what the tests do meanwhile.
const PAUSE = { base: 300, max: 300, jitter: 'none' }

let srv, none
before(async () => {
  ;[srv, none] = await Promise.all([
    startServer(['-interval', '200ms', '-timeout', '600ms']),
    startServer(['-interval', '200ms', '-timeout', '600ms', '-history', '0'])
  ])
})
after(async () => {
  await closeAll()
  await Promise.all([srv.stop(), none.stop()])
})

const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i)
const b64 = (bytes) => Buffer.from(bytes).toString('base64')

/** A WebSocket that records the sub lines the client sends, parsed. */
function recordingSubs () {
  const subs = []
  class Recording extends WebSocket {
    send (data, ...rest) {
      if (typeof data === 'string') {
        for (const line of data.split('\n')) {
          if (line === '') continue
          const m = JSON.parse(line)
          if (m.op === 'sub') subs.push(m)
        }
      }
      return super.send(data, ...rest)
    }
  }
  return { WebSocket: Recording, subs }
}

test('latest: the last message first, then live ones; a reconnect resumes with since', async () => {
  await srv.publish('lt:a', ...range(1, 3).map((i) => ({ i })))
  const rec = recordingSubs()
  const c = client(srv.url('lia'), { backoff: PAUSE, WebSocket: rec.WebSocket })
  const errs = errors(c)
  const resyncs = []
  c.on('resync', (t) => resyncs.push(t))
  const got = []
  const pos = await c.subscribe('lt:a', (data, m) => got.push([data.i, m.seq, m.epoch]), { latest: true })
  assert.equal(pos.topic, 'lt:a')
  assert.equal(pos.seq, 2) // the position before the latest, which follows
  await until(() => got.length === 1, 2000, 'the latest')
  assert.deepEqual(got, [[3, 3, pos.epoch]])
  await srv.publish('lt:a', { i: 4 })
  await until(() => got.length === 2, 2000, 'a live message')

  const lost = next(c, 'state', (s) => s === 'reconnecting')
  const back = next(c, 'state', (s) => s === 'connected')
  await srv.ctl('kick', { user: 'lia' })
  await lost
  await srv.publish('lt:a', { i: 5 }) // while the client is away, most likely
  await back
  await srv.publish('lt:a', { i: 6 })
  await until(() => got.length >= 4, 3000, 'the missed and the live message')
  await sleep(100) // nothing more comes
  assert.deepEqual(got.map(([i]) => i), range(3, 6))
  assert.deepEqual(got.map(([, seq]) => seq), range(3, 6))
  assert.deepEqual(resyncs, [])
  assert.deepEqual(errs, [])

  const mine = rec.subs.filter((m) => m.topic === 'lt:a')
  assert.equal(mine.length, 2)
  assert.equal(mine[0].latest, true)
  assert.equal(mine[0].since, undefined)
  assert.equal(mine[1].latest, undefined) // the resume: since, no latest
  assert.deepEqual(mine[1].since, { epoch: pos.epoch, seq: 4 })
})

test('latest on a topic without a message: nothing, no error, then live ones', async () => {
  const c = client(srv.url('lib'))
  const errs = errors(c)
  const got = []
  const pos = await c.subscribe('lt:empty', (data, m) => got.push([data, m.seq]), { latest: true })
  assert.equal(pos.seq, 0)
  await sleep(150)
  assert.deepEqual(got, [])
  await srv.publish('lt:empty', 'first')
  await until(() => got.length === 1, 2000, 'the live message')
  assert.deepEqual(got, [['first', 1]])
  assert.deepEqual(errs, [])
})

test('latest with a history that keeps no messages: nothing, then live ones', async () => {
  await none.publish('lt:none', 1, 2)
  const c = client(none.url('lic'))
  const errs = errors(c)
  const got = []
  const pos = await c.subscribe('lt:none', (data, m) => got.push([data, m.seq]), { latest: true })
  assert.equal(pos.seq, 2)
  await sleep(150)
  assert.deepEqual(got, [])
  await none.publish('lt:none', 3)
  await until(() => got.length === 1, 2000, 'the live message')
  assert.deepEqual(got, [[3, 3]])
  assert.deepEqual(errs, [])
})

test('since wins over latest: everything after it, not the latest alone', async () => {
  await srv.publish('lt:s', ...range(1, 5))
  const first = client(srv.url('lid'))
  const seen = []
  const pos = await first.subscribe('lt:s', (data, m) => seen.push(m), { latest: true })
  await until(() => seen.length === 1, 2000, 'the latest')
  const c = client(srv.url('lie'))
  const got = []
  await c.subscribe('lt:s', (data, m) => got.push([data, m.seq]), { since: { epoch: pos.epoch, seq: 2 }, latest: true })
  await until(() => got.length === 3, 2000, 'the replay')
  await sleep(100)
  assert.deepEqual(got, [[3, 3], [4, 4], [5, 5]])
})

test('a binary latest is a Uint8Array', async () => {
  const bytes = Uint8Array.from([0, 10, 255])
  await srv.ctl('publish', { topic: 'lt:bin', b64: b64(bytes) })
  await srv.ctl('publish', { topic: 'lt:bin', data: 'caption, not JSON' })
  const c = client(srv.url('lif'))
  const got = []
  await c.subscribe('lt:bin', (data, m) => got.push([data, m.seq]), { latest: true })
  await until(() => got.length === 1, 2000, 'the latest')
  assert.deepEqual(got, [['caption, not JSON', 2]])
  await srv.ctl('publish', { topic: 'lt:bin', b64: b64(bytes) })
  await until(() => got.length === 2, 2000, 'the live bytes')
  assert.ok(got[1][0] instanceof Uint8Array)
  assert.deepEqual(got[1], [bytes, 3])

  const d = client(srv.url('lig'))
  const again = []
  await d.subscribe('lt:bin', (data, m) => again.push([data, m.seq]), { latest: true })
  await until(() => again.length === 1, 2000, 'the binary latest')
  assert.ok(again[0][0] instanceof Uint8Array)
  assert.deepEqual(again, [[bytes, 3]])
})

test('latest must be a boolean', async () => {
  const c = client(srv.url('lih'))
  await assert.rejects(c.subscribe('lt:x', () => {}, { latest: 'yes' }), TypeError)
  assert.deepEqual(c.topics, [])
})
