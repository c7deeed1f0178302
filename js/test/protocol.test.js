// What the Go hub never sends: malformed frames, seq gaps, epoch changes,
// welcome resume entries, refused re-subscriptions, presence as a server
// before count sent it, stale presence. A scripted WebSocket
// server (the ws package) plays the server's side of PROTOCOL.md over
// loopback, one script per test.
import assert from 'node:assert/strict'
import { after, afterEach, before, test } from 'node:test'
import { WebSocketServer } from 'ws'
import { client, closeAll, errors, next, sleep, state, until } from '../testlib/helpers.js'

let wss, url
/** @type {(sock: import('ws').WebSocket, n: number, req: any) => void} */
let script = () => {}
let conns = 0
const sockets = new Set()

before(async () => {
  wss = new WebSocketServer({
    host: '127.0.0.1',
    port: 0,
    // Selects tether.v1 unless the URL says ?raw.
    handleProtocols: (protocols, req) => (req.url.includes('raw') ? false : protocols.has('tether.v1') ? 'tether.v1' : false)
  })
  await new Promise((resolve) => wss.once('listening', resolve))
  url = `ws://127.0.0.1:${wss.address().port}/ws`
  wss.on('connection', (sock, req) => {
    sockets.add(sock)
    sock.on('close', () => sockets.delete(sock))
    script(sock, ++conns, req)
  })
})
afterEach(closeAll) // each test's clients only: the next script is not theirs
after(async () => {
  await closeAll()
  for (const s of sockets) s.terminate()
  await new Promise((resolve) => wss.close(resolve))
})

/** A fresh script: counts conns from 1. */
function serve (fn) {
  conns = 0
  script = fn
}

const welcome = (extra = {}) => JSON.stringify({ op: 'welcome', session: 's1', heartbeat: { interval_ms: 1000, timeout_ms: 3000 }, ...extra })

/** The client's protocol messages on sock, parsed, as they arrive. */
function inbox (sock) {
  const list = []
  sock.on('message', (data) => {
    for (const line of String(data).split('\n')) if (line) list.push(JSON.parse(line))
  })
  return list
}

test('malformed frames: an error event each, the conn kept; unknown ops ignored', async () => {
  let sock
  let got
  serve((s) => {
    sock = s
    got = inbox(s)
    s.send(welcome())
  })
  const c = client(url)
  const errs = errors(c)
  const msgs = []
  c.on('message', (d) => msgs.push(d))
  await state(c, 'connected')
  const bad = [
    'not json',
    '[1,2]',
    '"a string"',
    '{"op":5}',
    '{"no":"op"}',
    '{"op":"msg"}', // data missing
    '{"op":"msg","topic":"t","data":1}', // epoch and seq missing
    '{"op":"msg","topic":"t","epoch":"e","seq":-1,"data":1}',
    '{"op":"ack"}', // id missing
    '{"op":"error","id":"9"}', // code missing
    '{"op":"presence","joins":[]}', // topic missing
    '{"op":"presence","topic":"t","joins":[{"meta":1}]}', // user missing
    '{"op":"presence","topic":"t","count":-1}',
    '{"op":"presence","topic":"t","count":1.5}',
    '{"op":"presence","topic":"t","count":"3"}',
    '{"op":"presence","topic":"t","snapshot":"yes","joins":[]}',
    '{"op":"resync","topic":"t"}', // epoch missing
    '{"op":"ping","ts":"now"}',
    '   ' // only spaces: not JSON
  ]
  for (const f of bad) sock.send(f)
  sock.send('{"op":"frobnicate","x":1}') // a newer server's op: ignored
  sock.send('{"op":"sub","topic":"t"}') // a client's op: ignored
  sock.send('{"op":"msg","len":1}') // len belongs to binary messages
  // Several protocol messages in one frame, as the hub coalesces them;
  // empty lines skipped, \r tolerated, a bad line among good ones.
  sock.send('{"op":"msg","data":"a"}\n\n{bad\n{"op":"msg","data":"b"}\r\n')
  // Binary messages: records whose framing is lost end the message (not
  // JSON, a len past the end); a bad record whose len is known does not.
  sock.send(Buffer.from([1, 2, 3]), { binary: true })
  sock.send(Buffer.from('{"op":"msg","len":99}\nab{"op":"msg","data":"never"}'), { binary: true })
  sock.send(Buffer.from('{"op":"msg","data":1,"len":1}\nx{"op":"msg","data":"c"}\n{"op":"msg","len":3}\n\x00\x01\x02\n{"op":"msg","len":2,"text":true}\nhi'), { binary: true })
  sock.send('{"op":"ping","ts":42}')
  await until(() => msgs.length === 5 && got.some((m) => m.op === 'pong'), 2000, 'the good messages')
  await sleep(50)
  assert.deepEqual(msgs, ['a', 'b', 'c', Uint8Array.from([0, 1, 2]), 'hi'])
  assert.equal(errs.length, bad.length + 5, errs.map((e) => e.message).join('\n'))
  assert.ok(errs.every((e) => e.code === 'bad_frame'))
  assert.ok(errs.some((e) => /"len" in a text message/.test(e.message)))
  assert.ok(errs.some((e) => /"len" is not an integer within the message/.test(e.message)))
  assert.deepEqual(got.filter((m) => m.op === 'pong'), [{ op: 'pong', ts: 42 }])
  assert.equal(c.state, 'connected')
  assert.equal(conns, 1, 'no reconnect')
})

test('positions: duplicates dropped, a seq jump or an epoch change is a resync; resubscribes with since', async () => {
  const subs = []
  serve((s, n) => {
    s.send(welcome({ session: `s${n}` }))
    s.on('message', (data) => {
      const m = JSON.parse(String(data))
      if (m.op !== 'sub') return
      subs.push([n, m.since])
      if (n === 1) {
        s.send(JSON.stringify({ op: 'ack', id: m.id, epoch: 'e1', seq: 3 }))
        s.send([
          { op: 'msg', topic: 't', epoch: 'e1', seq: 3, data: 'had it' }, // the ack's position
          { op: 'msg', topic: 't', epoch: 'e1', seq: 4, data: 4 },
          { op: 'msg', topic: 't', epoch: 'e1', seq: 4, data: 'again' },
          { op: 'msg', topic: 't', epoch: 'e1', seq: 6, data: 6 }, // 5 lost
          { op: 'msg', topic: 't', epoch: 'e2', seq: 1, data: 'e2.1' }, // new epoch from 1
          { op: 'msg', topic: 't', epoch: 'e3', seq: 5, data: 'e3.5' }, // new epoch, not from 1
          { op: 'resync', topic: 't', epoch: 'e4' },
          { op: 'msg', topic: 't', epoch: 'e4', seq: 9, data: 'e4.9' }, // unknown position: taken
          { op: 'msg', topic: 'other', epoch: 'x', seq: 1, data: 'not subscribed' }
        ].map((m) => JSON.stringify(m)).join('\n'))
      } else {
        s.send(JSON.stringify({ op: 'ack', id: m.id }))
      }
    })
  })
  const c = client(url)
  const got = []
  const resyncs = []
  c.on('resync', (t) => resyncs.push(t))
  const pos = await c.subscribe('t', (d, m) => got.push([d, m.epoch, m.seq]))
  assert.deepEqual(pos, { topic: 't', epoch: 'e1', seq: 3 })
  await until(() => got.length === 5, 2000, 'messages')
  assert.deepEqual(got, [[4, 'e1', 4], [6, 'e1', 6], ['e2.1', 'e2', 1], ['e3.5', 'e3', 5], ['e4.9', 'e4', 9]])
  assert.deepEqual(resyncs, ['t', 't', 't']) // the jump, e3 not from 1, the resync op

  const back = next(c, 'state', (s) => s === 'connected')
  for (const s of sockets) s.terminate()
  await back
  assert.deepEqual(subs, [[1, undefined], [2, { epoch: 'e4', seq: 9 }]])
})

test('welcome resume: a resync entry resets the position and emits resync', async () => {
  const subs = []
  serve((s, n) => {
    s.on('message', (data) => {
      const m = JSON.parse(String(data))
      if (m.op !== 'sub') return
      subs.push(m.since)
      s.send(JSON.stringify(n === 1 ? { op: 'ack', id: m.id, epoch: 'e1', seq: 0 } : { op: 'ack', id: m.id }))
    })
    s.send(n === 1 ? welcome() : welcome({ resume: [{ topic: 'r', epoch: 'e9', seq: 20, status: 'resync' }, { topic: 'q', epoch: 'e', seq: 1, status: 'ok' }] }))
  })
  const c = client(url)
  const resyncs = []
  c.on('resync', (t) => resyncs.push(t))
  await c.subscribe('r', () => {})
  const back = next(c, 'state', (s) => s === 'connected')
  for (const s of sockets) s.terminate()
  await back
  assert.deepEqual(resyncs, ['r'])
  assert.deepEqual(subs, [undefined, { epoch: 'e9', seq: 20 }])
})

test('a re-subscription refused for a while is retried; a refused one for good is dropped', async () => {
  let refusals = 0
  serve((s, n) => {
    s.send(welcome())
    s.on('message', (data) => {
      const m = JSON.parse(String(data))
      if (m.op !== 'sub') return
      if (n > 1 && m.topic === 'busy' && refusals++ < 2) {
        s.send(JSON.stringify({ op: 'error', code: 'rate_limited', reason: 'slow down', id: m.id }))
      } else if (n > 1 && m.topic === 'gone') {
        s.send(JSON.stringify({ op: 'error', code: 'forbidden', reason: 'no more', id: m.id }))
      } else {
        s.send(JSON.stringify({ op: 'ack', id: m.id, epoch: 'e', seq: 0 }))
      }
    })
  })
  const c = client(url, { backoff: { base: 50, max: 100 } })
  const errs = errors(c)
  await c.subscribe('busy', () => {})
  await c.subscribe('gone', () => {})
  const back = next(c, 'state', (s) => s === 'connected')
  for (const s of sockets) s.terminate()
  await back
  await until(() => refusals === 3, 2000, 'the retries') // two refusals, then the ack
  assert.deepEqual(c.topics, ['busy'])
  assert.equal(errs.filter((e) => e.code === 'rate_limited' && /retrying/.test(e.message)).length, 2)
  assert.equal(errs.filter((e) => e.code === 'forbidden' && /gone/.test(e.message)).length, 1)
})

test('a server without tether.v1 is refused for good; a first message that is no welcome is retried', async () => {
  serve((s) => s.send(welcome()))
  const raw = client(url + '?raw')
  const [, err] = await next(raw, 'state', (s) => s === 'closed')
  assert.equal(err.code, 'rejected')

  serve((s, n) => s.send(n === 1 ? '{"op":"msg","data":1}' : welcome()))
  const c = client(url)
  await state(c, 'connected')
  assert.equal(conns, 2)
})

test('a check held up past its time gives the server one more probe before judging', async () => {
  // The server answers pings 700 ms late, and every client timer fires at
  // least 500 ms late: the check after each probe finds it unanswered,
  // but late, so it probes once more; the answer arrives meanwhile. With
  // timers on time, the same server is found dead.
  serve((s) => {
    s.send(JSON.stringify({ op: 'welcome', session: 'slow', heartbeat: { interval_ms: 50, timeout_ms: 150 } }))
    s.on('message', (data) => {
      const m = JSON.parse(String(data))
      if (m.op === 'ping') setTimeout(() => s.readyState === 1 && s.send(JSON.stringify({ op: 'pong', ts: m.ts })), 700)
    })
  })
  const timers = { setTimeout: (fn, ms) => setTimeout(fn, Math.max(ms, 500)), clearTimeout: (h) => clearTimeout(h) }
  const c = client(url, { timers })
  await state(c, 'connected')
  const states = []
  c.on('state', (s) => states.push(s))
  await sleep(2500)
  assert.deepEqual(states, [])
  assert.equal(conns, 1)
  await c.close()

  const d = client(url) // timers on time
  await state(d, 'connected')
  const [, err] = await next(d, 'state', (s) => s === 'reconnecting', 2000)
  assert.equal(err.code, 'heartbeat_timeout')
})

/**
 * A script that acks every sub and sends, on conn n, the presence
 * messages of topic "room" that the test gives say(n, ...messages), or a
 * line as is with raw(n, line); subbed(n) resolves once conn n has a sub.
 */
function presenceServer () {
  const socks = new Map()
  const subs = new Map()
  const waiters = []
  serve((s, n) => {
    socks.set(n, s)
    s.send(welcome({ session: `s${n}` }))
    s.on('message', (data) => {
      for (const line of String(data).split('\n')) {
        if (!line) continue
        const m = JSON.parse(line)
        if (m.op !== 'sub') continue
        s.send(JSON.stringify({ op: 'ack', id: m.id, epoch: 'e', seq: 0 }))
        subs.set(n, (subs.get(n) ?? 0) + 1)
        for (const w of waiters.splice(0)) w()
      }
    })
  })
  return {
    say (n, ...msgs) { socks.get(n).send(msgs.map((m) => JSON.stringify({ op: 'presence', topic: 'room', ...m })).join('\n')) },
    raw (n, line) { socks.get(n).send(line) },
    subbed: (n) => until(() => subs.get(n) > 0, 3000, `a sub on conn ${n}`)
  }
}

test('presence: snapshots replace, changes apply, counted topics count; stale and malformed ones ignored', async () => {
  const srv = presenceServer()
  const c = client(url)
  const errs = errors(c)
  const seen = []
  c.on('presence', (t, ch) => seen.push([t, ch]))
  await c.subscribe('room', () => {})
  await srv.subbed(1)
  const view = () => c.presence('room')
  const ann = { user: 'ann', meta: { device: 'phone' } }

  // A change before the subscription's snapshot belongs to an earlier
  // subscription: ignored.
  srv.say(1, { count: 9, joins: [{ user: 'zed' }], leaves: [] })
  srv.say(1, { count: 2, snapshot: true, joins: [{ user: 'bob' }, ann] })
  await until(() => seen.length === 1, 2000, 'the snapshot')
  assert.deepEqual(seen[0], ['room', { joins: [{ user: 'bob' }, ann], leaves: [], count: 2, snapshot: true }])
  assert.deepEqual(view(), { count: 2, members: [ann, { user: 'bob' }] }) // sorted by user

  srv.say(1, { count: 3, joins: [{ user: 'cat', meta: null }], leaves: [] }, { count: 2, joins: [], leaves: [{ user: 'bob' }] })
  await until(() => seen.length === 3, 2000, 'two changes')
  assert.deepEqual(seen[1][1], { joins: [{ user: 'cat', meta: null }], leaves: [], count: 3, snapshot: false })
  assert.deepEqual(view(), { count: 2, members: [ann, { user: 'cat', meta: null }] })

  // Malformed: reported, and ignored.
  const bad = [
    '{"op":"presence","topic":"room","count":-1,"joins":[],"leaves":[{"user":"ann"}]}',
    '{"op":"presence","topic":"room","count":2.5}',
    '{"op":"presence","topic":"room","count":"150","snapshot":true,"joins":[]}',
    '{"op":"presence","topic":"room","count":1e300}',
    '{"op":"presence","topic":"room","count":1,"snapshot":1,"joins":[]}'
  ]
  for (const f of bad) srv.raw(1, f)
  await until(() => errs.length === bad.length, 2000, 'an error each')
  assert.ok(errs.every((e) => e.code === 'bad_frame' && /"(count|snapshot)"/.test(e.message)), errs.map((e) => e.message).join('\n'))
  assert.equal(seen.length, 3)
  assert.deepEqual(view(), { count: 2, members: [ann, { user: 'cat', meta: null }] })

  // Over the list limit: an empty snapshot, then counts alone.
  srv.say(1, { count: 150, snapshot: true, joins: [] }, { count: 151 })
  await until(() => seen.length === 5, 2000, 'counted')
  assert.deepEqual(seen[3][1], { joins: [], leaves: [], count: 150, snapshot: true })
  assert.deepEqual(seen[4][1], { joins: [], leaves: [], count: 151, snapshot: false })
  assert.deepEqual(view(), { count: 151, members: null })

  // Back to half the limit: listed again.
  srv.say(1, { count: 1, snapshot: true, joins: [ann] })
  await until(() => seen.length === 6, 2000, 'listed again')
  assert.deepEqual(view(), { count: 1, members: [ann] })

  // A topic not subscribed to: ignored.
  srv.raw(1, '{"op":"presence","topic":"other","count":1,"snapshot":true,"joins":[{"user":"x"}]}')
  await sleep(50)
  assert.equal(seen.length, 6)
  assert.equal(c.presence('other'), undefined)

  // After a reconnect, the list stays until the new conn's snapshot
  // replaces it.
  const back = next(c, 'state', (s) => s === 'connected')
  for (const s of sockets) s.terminate()
  await back
  await srv.subbed(2)
  assert.deepEqual(view(), { count: 1, members: [ann] })
  srv.say(2, { count: 2, snapshot: true, joins: [{ user: 'bob' }, { user: 'dan' }] })
  await until(() => seen.length === 7, 2000, 'the new snapshot')
  assert.deepEqual(view(), { count: 2, members: [{ user: 'bob' }, { user: 'dan' }] })

  c.unsubscribe('room')
  assert.equal(view(), undefined)
  assert.equal(errs.length, bad.length)
})

test('presence from a server before count: the count is the list, the first of each conn replaces it', async () => {
  const srv = presenceServer()
  const c = client(url)
  const seen = []
  c.on('presence', (t, ch) => seen.push(ch))
  await c.subscribe('room', () => {})
  await srv.subbed(1)
  assert.equal(c.presence('room'), undefined, 'nothing known yet')
  srv.say(1, { joins: [{ user: 'ann' }], leaves: [] }, { joins: [{ user: 'bob' }] }, { leaves: [{ user: 'ann' }] })
  await until(() => seen.length === 3, 2000, 'three changes')
  assert.deepEqual(seen, [
    { joins: [{ user: 'ann' }], leaves: [], count: 1, snapshot: true },
    { joins: [{ user: 'bob' }], leaves: [], count: 2, snapshot: false },
    { joins: [], leaves: [{ user: 'ann' }], count: 1, snapshot: false }
  ])
  assert.deepEqual(c.presence('room'), { count: 1, members: [{ user: 'bob' }] })

  const back = next(c, 'state', (s) => s === 'connected')
  for (const s of sockets) s.terminate()
  await back
  await srv.subbed(2)
  assert.deepEqual(c.presence('room'), { count: 1, members: [{ user: 'bob' }] })
  // bob left while the client was away: the new conn's first presence
  // lists who is there.
  srv.say(2, { joins: [{ user: 'cat' }], leaves: [] })
  await until(() => seen.length === 4, 2000, 'the first presence of the new conn')
  assert.deepEqual(seen[3], { joins: [{ user: 'cat' }], leaves: [], count: 1, snapshot: true })
  assert.deepEqual(c.presence('room'), { count: 1, members: [{ user: 'cat' }] })
})
