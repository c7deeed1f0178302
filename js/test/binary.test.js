// Binary data and text that is not JSON, end to end against the Go test
// server: published by the hub and by the client, sent to the server
// application and back, resumed from history and from the offline store.
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { client, closeAll, errors, next, startServer, until } from '../testlib/helpers.js'

// A fixed pause before reconnecting: room for what the tests do meanwhile.
const PAUSE = { base: 300, max: 300, jitter: 'none' }

let srv
before(async () => { srv = await startServer(['-interval', '200ms', '-timeout', '600ms']) })
after(async () => {
  await closeAll()
  await srv.stop()
})

const b64 = (bytes) => Buffer.from(bytes).toString('base64')
const publishBytes = (topic, bytes) => srv.ctl('publish', { topic, b64: b64(bytes) })
const publishText = (topic, text) => srv.ctl('publish', { topic, data: text })

test('bytes and text keep their type both ways, live and resumed', async () => {
  const c = client(srv.url('bea'), { backoff: PAUSE })
  const errs = errors(c)
  const got = []
  const resyncs = []
  c.on('resync', (t) => resyncs.push(t))
  await c.subscribe('bin:a', (data, m) => got.push([data, m.seq]))

  const bytes = Uint8Array.from([0, 10, 255, 123, 10, 1]) // newlines and a brace among them
  await publishBytes('bin:a', bytes)
  await publishText('bin:a', 'plain text\nover two lines')
  await publishText('bin:a', '{"json":true}')
  await until(() => got.length === 3, 2000, 'the hub\'s messages')
  assert.deepEqual(got, [[bytes, 1], ['plain text\nover two lines', 2], [{ json: true }, 3]])
  assert.ok(got[0][0] instanceof Uint8Array)

  // From the client: any view of bytes.
  const big = new Uint8Array(50000) // within the server's 64 KiB read limit.map((_, i) => (i * 7) & 0xff)
  await c.publish('bin:a', big.buffer)
  await c.publish('bin:a', new DataView(bytes.buffer, 1, 2))
  await c.publish('bin:a', new Uint8Array(0))
  await until(() => got.length === 6, 2000, 'the client\'s messages')
  assert.deepEqual(got.slice(3), [[big, 4], [Uint8Array.from([10, 255]), 5], [new Uint8Array(0), 6]])

  // send: the test server echoes the data, with its type, to the user.
  const echo = next(c, 'message')
  await c.send(Uint16Array.from([0x0102]))
  const [back] = await echo
  assert.deepEqual(back, new Uint8Array(Uint16Array.from([0x0102]).buffer))

  // Away: what was published meanwhile comes back from history, typed.
  const lost = next(c, 'state', (s) => s === 'reconnecting')
  const again = next(c, 'state', (s) => s === 'connected')
  await srv.ctl('kick', { user: 'bea' })
  await lost
  await publishBytes('bin:a', [9, 9])
  await publishText('bin:a', 'missed text')
  // Direct messages to an absent user wait in the offline store.
  await srv.ctl('send', { user: 'bea', b64: b64([7]) })
  const offline = next(c, 'message')
  await again
  const [kept] = await offline
  assert.deepEqual(kept, Uint8Array.from([7]))
  await until(() => got.length === 8, 2000, 'the missed messages')
  assert.deepEqual(got.slice(6), [[Uint8Array.from([9, 9]), 7], ['missed text', 8]])
  assert.deepEqual(resyncs, [])
  assert.deepEqual(errs, [])
})
