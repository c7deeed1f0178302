// Test helpers: the Go test server (js/testserver), built once per test
// process, started per test file with its own flags, driven over its
// control routes; and small waiting utilities. Every test talks to a real
// server over loopback.
import { execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import http from 'node:http'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import WebSocket from 'ws'
import { TetherClient } from '../tether.js'

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')
let binary = null

/** Builds js/testserver once for this process (go's cache makes it quick). */
function build () {
  if (binary) return binary
  const dir = mkdtempSync(path.join(tmpdir(), 'tether-js-test-'))
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
  const out = path.join(dir, 'testserver')
  execFileSync('go', ['build', '-o', out, './js/testserver'], { cwd: repo, stdio: ['ignore', 'inherit', 'inherit'] })
  binary = out
  return out
}

/**
 * Starts a test server with flags; resolves once it listens.
 * @param {string[]} [flags]
 */
export async function startServer (flags = []) {
  const child = spawn(build(), flags, { stdio: ['pipe', 'pipe', 'inherit'] })
  const exited = new Promise((resolve) => child.once('exit', resolve))
  const addr = await new Promise((resolve, reject) => {
    let buf = ''
    const onData = (chunk) => {
      buf += chunk
      const nl = buf.indexOf('\n')
      if (nl >= 0) {
        child.stdout.off('data', onData)
        resolve(buf.slice(0, nl).trim())
      }
    }
    child.stdout.setEncoding('utf8')
    child.stdout.on('data', onData)
    child.once('exit', (code) => reject(new Error(`testserver exited with ${code} before listening`)))
  })
  child.stdout.resume()
  const server = {
    addr,
    /** The hub's URL for a user, with more query parameters. */
    url (user, extra = {}) {
      const q = new URLSearchParams(user === undefined ? extra : { user, ...extra })
      const s = q.toString()
      return `ws://${addr}/ws${s ? '?' + s : ''}`
    },
    /** Calls a control route and returns its JSON answer. */
    ctl (route, params = {}, body) {
      return request(addr, `/${route}?${new URLSearchParams(params)}`, body)
    },
    /** Publishes values (JS values, JSON-encoded) to topic, in order. */
    publish (topic, ...values) {
      return request(addr, `/publish?${new URLSearchParams({ topic })}`, values.map((v) => JSON.stringify(v)).join('\n'))
    },
    async conns (user) {
      return (await server.ctl('conns', { user })).conns
    },
    /** Stops the server: its stdin closes, or it is killed after 2 s. */
    async stop () {
      child.stdin.end()
      const t = setTimeout(() => child.kill('SIGKILL'), 2000)
      await exited
      clearTimeout(t)
    }
  }
  return server
}

function request (addr, pathAndQuery, body) {
  const [host, port] = [addr.slice(0, addr.lastIndexOf(':')), Number(addr.slice(addr.lastIndexOf(':') + 1))]
  return new Promise((resolve, reject) => {
    const req = http.request({ host, port, path: pathAndQuery, method: body === undefined ? 'GET' : 'POST', agent: false, headers: { Connection: 'close' } }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (c) => { text += c })
      res.on('end', () => {
        if (res.statusCode !== 200) reject(new Error(`${pathAndQuery}: HTTP ${res.statusCode}: ${text}`))
        else resolve(JSON.parse(text))
      })
      // A conn closed before the answer ended fails the call, never hangs it.
      res.on('close', () => { if (!res.complete) reject(new Error(`${pathAndQuery}: the conn closed before the answer ended`)) })
    })
    req.on('error', reject)
    req.end(body)
  })
}

/** Clients made by client(), closed by closeAll(). */
const clients = new Set()

/**
 * A TetherClient on ws, with fast defaults for tests.
 * @param {string | string[]} url
 * @param {object} [options]
 */
export function client (url, options = {}) {
  const c = new TetherClient(url, { WebSocket, backoff: { base: 50, max: 500 }, ...options })
  clients.add(c)
  return c
}

export async function closeAll () {
  const all = [...clients]
  clients.clear()
  await Promise.all(all.map((c) => c.close()))
}

/** Resolves with the arguments of the next event that passes test. */
export function next (client, event, test = () => true, ms = 5000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      client.off(event, fn)
      reject(new Error(`no ${event} event within ${ms} ms`))
    }, ms)
    const fn = (...args) => {
      if (!test(...args)) return
      clearTimeout(t)
      client.off(event, fn)
      resolve(args)
    }
    client.on(event, fn)
  })
}

/** Resolves once the client is in state (at once if it is). */
export function state (client, s, ms = 5000) {
  if (client.state === s) return Promise.resolve([s])
  return next(client, 'state', (st) => st === s, ms)
}

/** Polls cond until it holds, or rejects after ms. */
export async function until (cond, ms = 5000, what = 'condition') {
  const end = Date.now() + ms
  for (;;) {
    if (await cond()) return
    if (Date.now() > end) throw new Error(`${what} not met within ${ms} ms`)
    await sleep(10)
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Collects the 'error' events of a client. */
export function errors (client) {
  const list = []
  client.on('error', (e) => list.push(e))
  return list
}

/** A WebSocket constructor that records the URL of each attempt. */
export function recordingWebSocket () {
  const urls = []
  const times = []
  class Recording extends WebSocket {
    constructor (url, ...rest) {
      urls.push(String(url))
      times.push(Date.now())
      super(url, ...rest)
    }
  }
  return { WebSocket: Recording, urls, times }
}
