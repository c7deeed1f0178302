// Publications and sends take effect once across a lost conn, against the
// Go test server, which drops repeated ids (its welcome has dedupe_ms).
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { client, closeAll, next, startServer, until } from '../testlib/helpers.js'

let srv
before(async () => { srv = await startServer(['-interval', '200ms', '-timeout', '600ms']) })
after(async () => {
  await closeAll()
  await srv.stop()
})

test('what the server got but never answered is sent again, and counted once', async () => {
  const reader = client(srv.url('rita'))
  const got = []
  await reader.subscribe('once:a', (data) => got.push(data.n))
  const c = client(srv.url('pete'))
  await next(c, 'state', (s) => s === 'connected')
  // From now on pete's messages reach the server, its answers do not.
  await srv.ctl('mute', { user: 'pete' })
  const results = []
  for (let n = 1; n <= 20; n++) results.push(c.publish('once:a', { n }))
  // The server published them all; pete hears nothing, finds the server
  // silent, reconnects, and sends the 20 again with the same ids.
  await until(() => got.length >= 20, 5000, 'the first publications')
  await Promise.all(results) // each resolves, on the repeat's ack
  const { duplicates } = await srv.ctl('duplicates')
  assert.ok(duplicates >= 20, `${duplicates} repeats dropped by the server, want the 20`)
  await new Promise((resolve) => setTimeout(resolve, 200)) // room for a second copy to show
  assert.deepEqual(got, Array.from({ length: 20 }, (_, i) => i + 1))
})
