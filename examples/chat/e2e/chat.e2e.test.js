// Browser end-to-end tests of examples/chat. First, two Chromium pages,
// ann and bob, chat in one room; the server is killed (SIGKILL) and
// started again on the same port a second later; what both typed while it
// was down is kept by the browser client and reaches both pages once they
// have reconnected by themselves. Second, a page at a phone's size (390 x
// 844) logs in and chats with nothing cut off or overflowing, no request
// of its own or of a desktop page gets a 404, and the two pages' footers
// show the same server-wide figures. Third, with -data (the rooms kept in
// a file), the server is killed and started again: the open page resumes
// without a resync, and a page that joins afterwards shows the messages
// from before the kill.
//
//	cd examples/chat/e2e && npm ci && npm test
//
// It needs Go (it builds the example, in its module's directory) and
// Debian's Chromium at /usr/bin/chromium (apt-get install chromium;
// .ci/run installs it), or the browser named by $CHROMIUM. Without one it
// fails: it never skips. It never downloads a browser.
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
const CHAT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const ROOT = path.resolve(CHAT, "..", "..");
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

// build builds the chat, a module of its own, in its directory.
function build(bin) {
  return new Promise((resolve, reject) => {
    execFile("go", ["build", "-o", bin, "."], { cwd: CHAT, timeout: 40_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`go build in examples/chat: ${err.message}\n${stdout}${stderr}`));
      else resolve();
    });
  });
}

// server runs the chat binary on port until stopped; its output is kept
// in log, to show when the test fails.
class Server {
  constructor(bin, port, log, args = []) {
    this.bin = bin;
    this.port = port;
    this.log = log;
    this.args = args;
    this.proc = null;
  }

  async start() {
    const proc = spawn(this.bin, ["-addr", `127.0.0.1:${this.port}`, "-grace", "2s", ...this.args], {
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

// footer reads the server-wide figures a page's footer shows: its text,
// and the numbers the page keeps in data- attributes.
async function footer(page) {
  return page.$eval("#stats", (e) => ({
    text: e.textContent,
    stale: e.classList.contains("stale"),
    conns: Number(e.dataset.conns ?? NaN),
    users: Number(e.dataset.users ?? NaN),
    published: Number(e.dataset.published ?? NaN),
  }));
}

// sameFigures waits until every page's footer shows the same server-wide
// figures, up to timeout, and ok(figures) holds; it fails if they never
// do, saying what each showed last.
async function sameFigures(pages, timeout, ok = () => true) {
  const deadline = Date.now() + timeout;
  let last = [];
  for (;;) {
    last = await Promise.all(pages.map(footer));
    const agree = last.every((f) => f.text === last[0].text && !f.stale && Number.isFinite(f.conns));
    if (agree && ok(last[0])) return last[0];
    if (Date.now() > deadline) {
      assert.fail(`the footers did not agree within ${timeout} ms: ${JSON.stringify(last)}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

// box returns where a selector's element is in the viewport.
async function box(page, selector) {
  const b = await page.$eval(selector, (e) => {
    const r = e.getBoundingClientRect();
    return { left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width };
  });
  return b;
}

// assertInViewport checks that each selector's element is wholly inside
// the page's viewport.
async function assertInViewport(page, selectors) {
  const { width, height } = page.viewportSize();
  for (const sel of selectors) {
    const b = await box(page, sel);
    assert.ok(b.width > 0 && b.left >= 0 && b.top >= 0 && b.right <= width + 0.5 && b.bottom <= height + 0.5,
      `${sel} at ${JSON.stringify(b)}, outside the ${width} x ${height} viewport`);
  }
}

async function assertNoHorizontalOverflow(page, what) {
  const { scroll, inner } = await page.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    inner: window.innerWidth,
  }));
  assert.ok(scroll <= inner, `${what}: the page is ${scroll} px wide in a ${inner} px window`);
}

// launch builds the chat, runs it on a free port (with args, and, when
// data is set, -data in a directory of its own) and starts Chromium, all
// stopped by cleanup.
async function launch(t, t0, log, { data = false } = {}) {
  assert.ok(
    existsSync(CHROMIUM),
    `no Chromium at ${CHROMIUM}: install Debian's (apt-get install -y chromium; .ci/run does), or set $CHROMIUM. ` +
      "This test never downloads a browser and never skips.",
  );
  const work = mkdtempSync(path.join(os.tmpdir(), "tether-chat-e2e-"));
  cleanups.push(() => rmSync(work, { recursive: true, force: true }));
  const bin = path.join(work, "chat");
  await build(bin);
  t.diagnostic(`built the chat in ${since(t0)}`);

  const server = new Server(bin, await freePort(), log, data ? ["-data", path.join(work, "data")] : []);
  cleanups.push(() => server.kill());
  const env = { server, log, base: `http://127.0.0.1:${server.port}`, browser: null };
  cleanups.push(async () => {
    if (!env.browser) return;
    // A browser that does not close in 5 s is killed.
    const proc = env.browser.process?.();
    let timer;
    await Promise.race([env.browser.close(), new Promise((r) => { timer = setTimeout(r, 5000); })]);
    clearTimeout(timer);
    proc?.kill("SIGKILL");
  });
  await server.start();
  t.diagnostic(`chat on ${env.base} after ${since(t0)}`);
  env.browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 20_000 });
  t.diagnostic(`Chromium ${env.browser.version()} up after ${since(t0)}`);
  return env;
}

test("two pages chat through a restart of the server", { timeout: TEST_TIMEOUT }, async (t) => {
  const t0 = Date.now();
  const shots = mkdtempSync(path.join(os.tmpdir(), "tether-chat-screens-"));
  const errors = [];
  const log = [];
  try {
    const { server, base, browser } = await launch(t, t0, log);

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
      assert.ok(Number(await p.$eval("#reconnects", (e) => e.textContent)) >= 1, "the page counts its reconnect");
    }
    // The restarted server's figures, pushed to both.
    await sameFigures(pages, 10_000, (f) => f.conns >= 2);
    t.diagnostic(`both footers agree ${Date.now() - restarted} ms after the restart`);

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

test("a phone-sized page chats; no 404; two pages' footers agree", { timeout: TEST_TIMEOUT }, async (t) => {
  const t0 = Date.now();
  const shots = mkdtempSync(path.join(os.tmpdir(), "tether-chat-screens-"));
  const errors = [];
  const missing = []; // responses with 404
  const log = [];
  try {
    const { base, browser } = await launch(t, t0, log);
    const room = "e2e-phone";

    const open = async (name, options, url) => {
      const context = await browser.newContext(options);
      const page = await context.newPage();
      page.on("pageerror", (err) => errors.push(`${name}: ${err.stack ?? err}`));
      page.on("response", (res) => {
        if (res.status() === 404) missing.push(`${name}: ${res.request().method()} ${res.url()}`);
      });
      await page.goto(url);
      return page;
    };

    // A phone: its viewport, and the page's meta viewport honoured.
    const phone = await open("phone", { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true }, `${base}/`);
    assert.deepEqual(await phone.evaluate(() => window.innerWidth), 390, "the page is laid out at the phone's width");
    // The login form, whole.
    await phone.waitForSelector("#login:not([hidden])", { timeout: 10_000 });
    await assertInViewport(phone, ["#login", "#name", "#roomname", "#login button"]);
    await assertNoHorizontalOverflow(phone, "the login form at 390 px");
    await phone.screenshot({ path: path.join(shots, "phone-login.png") });
    await phone.fill("#name", "ann");
    await phone.fill("#roomname", room);
    await Promise.all([phone.waitForURL(/[?&]user=ann/, { timeout: 10_000 }), phone.click("#login button")]);
    await waitState(phone, "connected", 10_000);
    await phone.waitForSelector("#log li.note", { timeout: 10_000 }); // "you joined ..."
    t.diagnostic(`the phone logged in and joined after ${since(t0)}`);

    // Sends and sees its message.
    const hello = "hello from a phone, with a line long enough to wrap at 390 px: " + "x".repeat(80);
    await say(phone, hello);
    await waitDelivered(phone, [hello], 10_000);
    await assertInViewport(phone, ["#text", "#say button", "#people-toggle"]);
    const logWidth = (await box(phone, "#log")).width;
    assert.ok(logWidth >= 300, `the messages are ${logWidth} px wide at 390 px, want at least 300`);
    await assertNoHorizontalOverflow(phone, "the chat at 390 px");

    // The list of people, a drawer over the messages.
    await phone.click("#people-toggle");
    await phone.waitForSelector('#present li[data-user="ann"]', { state: "visible", timeout: 10_000 });
    await assertInViewport(phone, ["#people"]);
    assert.ok((await box(phone, "#log")).width >= 300, "the open drawer does not squeeze the messages");
    await assertNoHorizontalOverflow(phone, "the drawer open at 390 px");
    await phone.screenshot({ path: path.join(shots, "phone-people.png") });
    await phone.click("#people-toggle");
    await phone.waitForSelector("#people", { state: "hidden", timeout: 10_000 });

    // A desktop page in the same room: the list of people beside the
    // messages, as ever.
    const desk = await open("desk", { viewport: { width: 1280, height: 800 } }, `${base}/?user=bob&room=${room}`);
    await waitState(desk, "connected", 10_000);
    await waitDelivered(desk, [hello], 10_000);
    const [deskLog, deskPeople] = [await box(desk, "#log"), await box(desk, "#people")];
    assert.ok(deskLog.width >= 800 && deskPeople.left >= deskLog.right - 1, `desktop: messages ${JSON.stringify(deskLog)}, people ${JSON.stringify(deskPeople)}`);
    assert.equal(await desk.$eval("#people-toggle", (e) => getComputedStyle(e).display), "none", "no drawer button on a desktop");
    await assertNoHorizontalOverflow(desk, "the chat at 1280 px");
    await say(desk, "hi ann, bob at a desk");
    await waitDelivered(phone, ["hi ann, bob at a desk"], 10_000);

    // The favicon: named inline, and /favicon.ico is no 404 either.
    for (const p of [phone, desk]) {
      assert.ok(await p.$eval('link[rel="icon"]', (e) => e.href.startsWith("data:image/svg+xml")), "an inline icon");
      assert.equal(await p.evaluate(async () => (await fetch("/favicon.ico")).status), 204);
    }

    // Both footers show the same server-wide figures, the ones of both
    // pages and both messages, and label this page's own as such.
    const pages = [phone, desk];
    const figures = await sameFigures(pages, 10_000, (f) => f.conns >= 2 && f.users >= 2 && f.published >= 2);
    t.diagnostic(`both footers show ${JSON.stringify(figures.text)} after ${since(t0)}`);
    for (const p of pages) {
      assert.match(await p.$eval("#mine", (e) => e.textContent), /^this page: rtt (\d+ ms|–) · \d+ reconnects$/);
    }
    // A change reaches both.
    await say(phone, "one more");
    await waitDelivered(desk, ["one more"], 10_000);
    await sameFigures(pages, 10_000, (f) => f.published >= figures.published + 1);
    // The footer fits the phone too.
    await assertInViewport(phone, ["footer"]);
    await assertNoHorizontalOverflow(phone, "the chat at 390 px, at the end");

    for (const [name, p] of [["phone-390x844", phone], ["desk-1280x800", desk]]) {
      const file = path.join(shots, `${name}.png`);
      await p.screenshot({ path: file });
      console.log(`screenshot of the ${name} page: ${file}`);
      t.diagnostic(`screenshot of the ${name} page: ${file}`);
    }
    assert.deepEqual(missing, [], "no response with 404");
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

test("with -data, a room survives a kill of the server: resumed, not reloaded", { timeout: TEST_TIMEOUT }, async (t) => {
  const t0 = Date.now();
  const errors = [];
  const log = [];
  try {
    const { server, base, browser } = await launch(t, t0, log, { data: true });
    const room = "e2e-data";
    const open = async (user) => {
      const context = await browser.newContext({ viewport: { width: 900, height: 560 } });
      const page = await context.newPage();
      page.on("pageerror", (err) => errors.push(`${user}: ${err.stack ?? err}`));
      await page.goto(`${base}/?user=${user}&room=${room}`);
      await waitState(page, "connected", 10_000);
      return page;
    };
    const ann = await open("ann");
    const before = ["ann, before the kill", "ann, again before the kill"];
    for (const text of before) await say(ann, text);
    await waitDelivered(ann, before, 10_000);

    // Killed: what the server acknowledged is in its file.
    await server.kill();
    await waitState(ann, ["reconnecting", "connecting"], 10_000);
    await server.start();
    await waitState(ann, "connected", 35_000);
    t.diagnostic(`ann's page connected again after the restart, ${since(t0)}`);

    // A page that joins now gets the room's messages from the file.
    const bob = await open("bob");
    await waitDelivered(bob, before, 10_000);
    await say(bob, "bob, after the restart");
    await waitDelivered(ann, [...before, "bob, after the restart"], 10_000);
    for (const [name, p] of [["ann", ann], ["bob", bob]]) {
      const shown = await delivered(p);
      assert.deepEqual(shown, [...before, "bob, after the restart"], `${name}'s page shows each message once, in order`);
      const notes = await p.$$eval("#log li.note", (els) => els.map((e) => e.textContent));
      // ann's page resumed from the file: no resync, so no reload.
      assert.deepEqual(notes.filter((n) => /could not|cannot|error/.test(n)), [], `${name}: no resync or failure noted`);
    }
    assert.deepEqual(errors, [], "no script error in the pages");
    t.diagnostic(`done in ${since(t0)}`);
  } catch (err) {
    console.error(`--- chat server log:\n${log.join("\n")}`);
    throw err;
  } finally {
    await cleanup();
  }
});
