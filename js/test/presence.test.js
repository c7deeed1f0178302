// Presence against the Go test server: listed topics, whose snapshot and
// changes name every member, and counted ones, too big to list, whose
// messages carry the count alone; the client's list, its count and
// presence(topic) as every subscriber converges.
import assert from 'node:assert/strict'
import { after, afterEach, before, test } from 'node:test'
import { client, closeAll, next, startServer, state, until } from '../testlib/helpers.js'

// Heartbeats slow enough that a busy machine drops no conn: these tests
// are about presence, and a reconnect would change who is present.
const flags = ['-interval', '500ms', '-timeout', '3s', '-grace', '100ms']
let listed, small
before(async () => {
  listed = await startServer(flags) // the hub's default list limit, 100
  small = await startServer([...flags, '-presence-list', '4']) // listed again at 2 or fewer
})
afterEach(closeAll)
after(async () => {
  await closeAll()
  await Promise.all([listed?.stop(), small?.stop()])
})

/** Clients of users on srv, each subscribed to topic, with their presence events. */
async function join (srv, topic, users) {
  const out = []
  for (const user of users) {
    const c = client(srv.url(user, { device: `d-${user}` }))
    const events = []
    c.on('presence', (t, ch) => { if (t === topic) events.push(ch) })
    await c.subscribe(topic, () => {})
    out.push({ user, c, events })
  }
  return out
}

const member = (user) => ({ user, meta: { device: `d-${user}` } })

/** Waits until every client's presence(topic) is want. */
function converge (clients, topic, want, what) {
  return until(() => clients.every(({ c }) => {
    try {
      assert.deepEqual(c.presence(topic), want)
      return true
    } catch {
      return false
    }
  }), 10000, what)
}

test('a listed topic: the snapshot names every member, changes name who came and went', async () => {
  const topic = 'room:listed'
  const first = await join(listed, topic, ['cat', 'ann', 'bob'])
  await converge(first, topic, { count: 3, members: ['ann', 'bob', 'cat'].map(member) }, 'three members listed')
  for (const { events } of first) {
    assert.equal(events[0].snapshot, true, 'a subscription opens with a snapshot')
    assert.ok(events.slice(1).every((ch) => !ch.snapshot), 'one snapshot only')
    for (const ch of events) {
      assert.ok(Array.isArray(ch.joins) && Array.isArray(ch.leaves))
      assert.equal(typeof ch.count, 'number')
    }
  }

  // A late subscriber's snapshot lists everyone already announced.
  const [dan] = await join(listed, topic, ['dan'])
  await until(() => dan.events.length > 0, 5000, 'the snapshot of dan')
  assert.deepEqual(dan.events[0], { joins: ['ann', 'bob', 'cat'].map(member), leaves: [], count: 3, snapshot: true })
  const all = [...first, dan]
  await converge(all, topic, { count: 4, members: ['ann', 'bob', 'cat', 'dan'].map(member) }, 'dan listed everywhere')

  // A leave, after the grace: every other subscriber lists it.
  await first[0].c.close() // cat
  const rest = all.slice(1)
  await converge(rest, topic, { count: 3, members: ['ann', 'bob', 'dan'].map(member) }, 'cat gone everywhere')
  const last = rest[0].events.at(-1)
  assert.deepEqual(last, { joins: [], leaves: [{ user: 'cat' }], count: 3, snapshot: false })

  // After a reconnect, the new conn's snapshot replaces the list.
  const ann = rest[0]
  const mark = ann.events.length
  const back = next(ann.c, 'state', (s) => s === 'connected', 5000)
  await listed.ctl('kick', { user: 'ann' })
  await back
  await until(() => ann.events.slice(mark).some((ch) => ch.snapshot), 5000, 'a snapshot after the reconnect')
  // Users only: a user back within the grace has no conn at the moment
  // of its own snapshot, which shows it without meta.
  await until(() => rest.every(({ c }) => {
    const p = c.presence(topic)
    return p?.count === 3 && p.members?.map((m) => m.user).join() === 'ann,bob,dan'
  }), 10000, 'the list after the reconnect')
})

test('a topic over the list limit only counts, and lists again at half of it', async () => {
  const topic = 'room:big'
  const users = ['u1', 'u2', 'u3', 'u4', 'u5']
  const all = await join(small, topic, users)
  await converge(all, topic, { count: 5, members: null }, 'five counted')
  for (const { user, events } of all) {
    // Over the limit: an empty snapshot with the count, then counts alone.
    const i = events.findLastIndex((ch) => ch.snapshot)
    assert.deepEqual(events[i], { joins: [], leaves: [], count: events[i].count, snapshot: true }, user)
    assert.ok(events[i].count > 4, `${user}: counted from ${events[i].count}`)
    for (const ch of events.slice(i + 1)) assert.deepEqual(ch, { joins: [], leaves: [], count: ch.count, snapshot: false }, user)
  }

  // A late subscriber gets the counted snapshot.
  const [u6] = await join(small, topic, ['u6'])
  await until(() => u6.events.length > 0, 5000, 'the snapshot of u6')
  assert.equal(u6.events[0].snapshot, true)
  assert.deepEqual(u6.events[0].joins, [])
  assert.ok(u6.events[0].count >= 5)
  const six = [...all, u6]
  await converge(six, topic, { count: 6, members: null }, 'six counted')

  // Down to half the limit: every subscriber gets the full list again.
  const marks = six.map(({ events }) => events.length)
  await Promise.all(six.slice(2).map(({ c }) => c.close()))
  const rest = six.slice(0, 2)
  await converge(rest, topic, { count: 2, members: [member('u1'), member('u2')] }, 'listed again')
  for (const [k, { user, events }] of rest.entries()) {
    const snap = events.slice(marks[k]).find((ch) => ch.snapshot)
    assert.deepEqual(snap, { joins: [member('u1'), member('u2')], leaves: [], count: 2, snapshot: true }, user)
  }

  // Listed again: a join names its user.
  const [u7] = await join(small, topic, ['u7'])
  await converge([...rest, u7], topic, { count: 3, members: ['u1', 'u2', 'u7'].map(member) }, 'u7 listed')
})

test('presence(topic): undefined unless subscribed; forgotten on unsubscribe', async () => {
  const c = client(listed.url('eve'))
  await state(c, 'connected')
  assert.equal(c.presence('room:eve'), undefined)
  await c.subscribe('room:eve', () => {})
  await until(() => c.presence('room:eve')?.count === 1, 5000, 'own join')
  assert.deepEqual(c.presence('room:eve'), { count: 1, members: [{ user: 'eve' }] })
  c.unsubscribe('room:eve')
  assert.equal(c.presence('room:eve'), undefined)
})
