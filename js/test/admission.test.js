// A hub that admits handshakes at a rate refuses the others with 503 and
// a Retry-After: in Node, where a refused handshake's response can be read,
// the client waits as long as it is told instead of retrying on its
// backoff, against the Go test server.
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { client, closeAll, startServer, state } from '../testlib/helpers.js'

let srv
before(async () => { srv = await startServer(['-admission', '0.5']) }) // one every 2 s, bursts of 1
after(async () => {
  await closeAll()
  await srv.stop()
})

test('a refused handshake waits for its Retry-After', async () => {
  const first = client(srv.url('ada'))
  await state(first, 'connected')
  const start = Date.now()
  // A backoff of 50 ms would retry about 40 times in 2 s.
  const second = client(srv.url('bob'), { backoff: { base: 50, max: 50, jitter: 'none' } })
  await state(second, 'connected', 10000)
  const waited = Date.now() - start
  const { refused } = await srv.ctl('refused')
  assert.ok(refused >= 1 && refused <= 2, `${refused} handshakes refused: the client did not wait for its Retry-After`)
  assert.ok(waited >= 900, `connected after ${waited} ms, before the Retry-After of at least 1 s`)
})
