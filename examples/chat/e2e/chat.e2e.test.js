// Browser end-to-end test of examples/chat: two Chromium pages, ann and
// bob, chat in one room; the server is killed (SIGKILL) and started again
// on the same port a second later; what both typed while it was down is
// kept by the browser client and reaches both pages once they have
// reconnected by themselves.
//
//	cd examples/chat/e2e && npm ci && npm test
//
// It needs Go (it builds the example) and Debian's Chromium at
// /usr/bin/chromium (apt-get install chromium; .ci/run installs it), or
// the browser named by $CHROMIUM. Without one it fails: it never skips.
// It never downloads a browser.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// The flags that make Debian's Chromium quiet and reliable in a container
// or CI; playwright adds --headless and a fresh --user-data-dir.
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const TEST_TIMEOUT = 60_000;
const ROOM = "e2e";

// Everything started, so that it is stopped whatever happens.
const cleanups = [];
async function cleanup() {
  while (cleanups.length > 0) {
    const f = cleanups.pop();
    try {
      await f();
    } catch (err) {
      console.error("cleanup:", err);
    }
  }
}
after(cleanup);

function since(t0) {
  return `${((Date.now() - t0) / 1000).toFixed(1)} s`;
}

async function freePort() {
  const srv = net.createServer();
  await new Promise((resolve, reject) => {
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", resolve);
  });
  const { port } = srv.address();
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

function build(bin) {
  return new Promise((resolve, reject) => {
    execFile("go", ["build", "-o", bin, "./examples/chat"], { cwd: ROOT, timeout: 40_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`go build ./examples/chat: ${err.message}\n${stdout}${stderr}`));
      else resolve();
    });
  });
}

// server runs the chat binary on port until stopped; its output is kept
// in log, to show when the test fails.
class Server {
  constructor(bin, port, log) {
    this.bin = bin;
    this.port = port;
    this.log = log;
    this.proc = null;
  }

  async start() {
    const proc = spawn(this.bin, ["-addr", `127.0.0.1:${this.port}`, "-grace", "2s"], {
      cwd: ROOT,
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.proc = proc;
    proc.exited = new Promise((resolve) => proc.once("exit", resolve));
    const ready = `chat on http://127.0.0.1:${this.port}/`;
    let out = "";
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the chat did not start in 10 s:\n${out}`)), 10_000);
      const onData = (chunk) => {
        out += chunk;
        this.log.push(String(chunk).trimEnd());
        if (out.includes(ready)) {
          clearTimeout(timer);
          resolve();
        }
      };
      proc.stdout.on("data", onData);
      proc.stderr.on("data", onData);
      proc.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`the chat exited (${code ?? signal}) before listening:\n${out}`));
      });
    });
  }

  async kill() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill("SIGKILL");
    await proc.exited;
  }
}

// The page's view, read in the page.
async function delivered(page) {
  return page.$$eval("#log li.msg:not(.pending) .text", (els) => els.map((e) => e.textContent));
}

async function waitDelivered(page, texts, timeout) {
  try {
    await page.waitForFunction(
      (texts) => {
        const shown = [...document.querySelectorAll("#log li.msg:not(.pending) .text")].map((e) => e.textContent);
        return texts.every((t) => shown.includes(t));
      },
      texts,
      { timeout, polling: 50 },
    );
  } catch (err) {
    throw new Error(`${await page.evaluate(() => document.querySelector("#me").textContent)}'s page shows ` +
      `${JSON.stringify(await delivered(page))} (state ${await state(page)}), want ${JSON.stringify(texts)}: ${err.message}`);
  }
}

async function state(page) {
  return page.$eval("#state", (e) => e.dataset.state);
}

async function waitState(page, want, timeout) {
  await page.waitForFunction(
    (want) => want.includes(document.querySelector("#state").dataset.state),
    Array.isArray(want) ? want : [want],
    { timeout, polling: 50 },
  );
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

test("two pages chat through a restart of the server", { timeout: TEST_TIMEOUT }, async (t) => {
  const t0 = Date.now();
  assert.ok(
    existsSync(CHROMIUM),
    `no Chromium at ${CHROMIUM}: install Debian's (apt-get install -y chromium; .ci/run does), or set $CHROMIUM. ` +
      "This test never downloads a browser and never skips.",
  );

  const work = mkdtempSync(path.join(os.tmpdir(), "tether-chat-e2e-"));
  const shots = mkdtempSync(path.join(os.tmpdir(), "tether-chat-screens-"));
  cleanups.push(() => rmSync(work, { recursive: true, force: true }));
  const bin = path.join(work, "chat");
  await build(bin);
  t.diagnostic(`built the chat in ${since(t0)}`);

  const log = [];
  const server = new Server(bin, await freePort(), log);
  cleanups.push(() => server.kill());
  const errors = [];
  let browser = null;
  cleanups.push(async () => {
    if (!browser) return;
    // A browser that does not close in 5 s is killed.
    const proc = browser.process?.();
    let timer;
    await Promise.race([browser.close(), new Promise((r) => { timer = setTimeout(r, 5000); })]);
    clearTimeout(timer);
    proc?.kill("SIGKILL");
  });
  try {
    await server.start();
    const base = `http://127.0.0.1:${server.port}`;
    t.diagnostic(`chat on ${base} after ${since(t0)}`);

    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 20_000 });
    t.diagnostic(`Chromium ${browser.version()} up after ${since(t0)}`);

    const open = async (user) => {
      const context = await browser.newContext({ viewport: { width: 900, height: 560 } });
      const page = await context.newPage();
      page.on("pageerror", (err) => errors.push(`${user}: ${err.stack ?? err}`));
      await page.goto(`${base}/?user=${user}&room=${ROOM}`);
      return page;
    };
    const ann = await open("ann");
    const bob = await open("bob");
    const pages = [ann, bob];
    await Promise.all(pages.map((p) => waitState(p, "connected", 10_000)));
    t.diagnostic(`both pages connected after ${since(t0)}`);
    // Each sees the other here.
    await ann.waitForSelector('#present li[data-user="bob"]', { timeout: 10_000 });
    await bob.waitForSelector('#present li[data-user="ann"]', { timeout: 10_000 });
    t.diagnostic(`both pages connected and present after ${since(t0)}`);

    // Bytes through Chromium's WebSocket both ways: a client of its own in
    // each page, every byte value, published by ann, received by bob as a
    // Uint8Array (in a binary message, PROTOCOL.md section 2.1).
    await bob.evaluate(async () => {
      const { TetherClient } = await import("/tether.js");
      const c = new TetherClient(`ws://${location.host}/ws?user=bob`);
      window.bytesGot = [];
      window.bytesClient = c;
      await c.subscribe("room:e2e-bytes", (data) => window.bytesGot.push(data));
    });
    await ann.evaluate(async () => {
      const { TetherClient } = await import("/tether.js");
      const c = new TetherClient(`ws://${location.host}/ws?user=ann`);
      const bytes = new Uint8Array(256).map((_, i) => i);
      await c.publish("room:e2e-bytes", bytes.buffer);
      await c.close();
    });
    await bob.waitForFunction(() => window.bytesGot.length === 1, null, { timeout: 10_000 });
    const got = await bob.evaluate(async () => {
      const d = window.bytesGot[0];
      await window.bytesClient.close();
      return { isBytes: d instanceof Uint8Array, values: Array.from(d ?? []) };
    });
    assert.deepEqual(got, { isBytes: true, values: Array.from({ length: 256 }, (_, i) => i) });
    t.diagnostic(`bytes from ann reached bob's page after ${since(t0)}`);

    // Before the outage.
    await say(ann, "hello bob, ann here");
    await waitDelivered(bob, ["hello bob, ann here"], 10_000);
    await say(bob, "hi ann, bob here");
    const before = ["hello bob, ann here", "hi ann, bob here"];
    await Promise.all(pages.map((p) => waitDelivered(p, before, 10_000)));
    t.diagnostic(`messages exchanged after ${since(t0)}`);

    // The server dies without a word, and stays away a second.
    await server.kill();
    const killed = Date.now();
    await Promise.all(pages.map((p) => waitState(p, ["reconnecting", "connecting"], 10_000)));
    t.diagnostic(`server killed; both pages saw it after ${Date.now() - killed} ms`);

    // Typed while it is down: the client keeps them.
    const during = ["ann, typed while the server was down", "bob, typed while the server was down"];
    await say(ann, during[0]);
    await say(bob, during[1]);
    for (const [p, text] of [[ann, during[0]], [bob, during[1]]]) {
      const pending = await p.$$eval("#log li.msg.pending .text", (els) => els.map((e) => e.textContent));
      assert.deepEqual(pending, [text], "a message typed offline is shown as pending");
      assert.notEqual(await state(p), "connected", "the page must still be offline when it types");
    }
    await new Promise((r) => setTimeout(r, Math.max(0, 1000 - (Date.now() - killed))));
    await server.start();
    const restarted = Date.now();
    t.diagnostic(`server restarted on the same port ${restarted - killed} ms after the kill`);

    // Both come back by themselves and show everything, once each. The
    // client's backoff (full jitter, ceiling 0.5 s doubling per failed
    // attempt, capped at 30 s) usually brings them back within a few
    // seconds; the attempts that failed during the outage bound the wait.
    await Promise.all(pages.map((p) => waitState(p, "connected", 35_000)));
    t.diagnostic(`both pages connected again ${Date.now() - restarted} ms after the restart`);
    const all = [...before, ...during];
    await Promise.all(pages.map((p) => waitDelivered(p, all, 10_000)));
    t.diagnostic(`both pages show the messages of the outage ${Date.now() - restarted} ms after the restart`);
    // Both listed here on both pages, with the server's last-seen time.
    await Promise.all(pages.map((p) => p.waitForFunction(
      () => ["ann", "bob"].every((u) => document.querySelector(`#present li[data-user="${u}"]`)?.textContent.includes("active")),
      null,
      { timeout: 10_000, polling: 50 },
    )));
    for (const p of pages) {
      const shown = await delivered(p);
      for (const text of all) {
        assert.equal(shown.filter((s) => s === text).length, 1, `${JSON.stringify(text)} shown once in ${JSON.stringify(shown)}`);
      }
      assert.equal(await p.$$eval("#log li.pending", (els) => els.length), 0, "nothing is left pending");
      assert.match(await p.$eval("#rtt", (e) => e.textContent), /^\d+ ms$/, "the page shows the round-trip time");
    }

    for (const [name, p] of [["ann", ann], ["bob", bob]]) {
      const file = path.join(shots, `${name}.png`);
      await p.screenshot({ path: file });
      console.log(`screenshot of ${name}'s page: ${file}`);
      t.diagnostic(`screenshot of ${name}'s page: ${file}`);
    }
    for (const p of pages) {
      const notes = await p.$$eval("#log li.note", (els) => els.map((e) => e.textContent));
      assert.deepEqual(notes.filter((n) => /could not load|cannot|error/.test(n)), [], "no failure noted in the page");
    }
    assert.deepEqual(errors, [], "no script error in the pages");
    t.diagnostic(`done in ${since(t0)}`);
  } catch (err) {
    console.error(`--- chat server log:\n${log.join("\n")}`);
    throw err;
  } finally {
    const c0 = Date.now();
    await cleanup();
    t.diagnostic(`browser and server stopped in ${Date.now() - c0} ms`);
  }
});
