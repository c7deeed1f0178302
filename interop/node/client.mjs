// Drives tether's JavaScript client (js/tether.js, imported by path) over
// the ws package, for the Go tests (interop/jsclient_test.go), through a
// line protocol:
//
//   node client.mjs <url> [--backoff-ms=<base>]
//
// stdout: one JSON object per line, {"ev": ...}:
//   ready {ws}                         before the client is made
//   state {state, error}               the client's 'state' event
//   welcome {session, heartbeat, ...}  the 'welcome' event: the welcome as sent
//   rtt {rtt}                          the 'rtt' event
//   message {data}                     the 'message' event (a direct message)
//   presence {topic, joins, leaves, count, snapshot}  the 'presence' event
//   resync {topic}                     the 'resync' event
//   error {error}                      the 'error' event
//   msg {topic, epoch, seq, data}      a subscription handler's call
//   result {step, ok, value | error}   the outcome of a command
//   fatal {error}                      the script failed; it exits 1
// stdin: one JSON object per line, {"cmd": ..., "step": <name>}:
//   subscribe {topic}       await client.subscribe(topic, handler)
//   unsubscribe {topic}     client.unsubscribe(topic)
//   presence {topic}        client.presence(topic): {count, members} (null if unknown)
//   publish {topic, data}   await client.publish(topic, data)
//   send {data}             await client.send(data)
//   inspect                 client.state, client.rtt, client.heartbeat, client.topics
//   close                   await client.close()
// Errors are reported as {name, code, message}. When stdin ends, the
// client is closed and the script exits.

import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

const out = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const errorOf = (err) =>
  err === undefined || err === null
    ? undefined
    : { name: err.name, code: err.code, message: String(err.message ?? err), topic: err.topic, closeCode: err.closeCode };
const fatal = (err) => {
  out({ ev: "fatal", error: String(err?.stack ?? err) });
  process.exit(1);
};
process.on("uncaughtException", fatal);
process.on("unhandledRejection", fatal);

const [url, ...flags] = process.argv.slice(2);
if (!url) fatal("usage: node client.mjs <url> [--backoff-ms=<base>]");
let backoffBase = 20;
for (const f of flags) {
  if (f.startsWith("--backoff-ms=")) backoffBase = Number(f.slice("--backoff-ms=".length));
  else fatal(`unknown flag ${f}`);
}

const lib = new URL("../../js/tether.js", import.meta.url);
if (!existsSync(fileURLToPath(lib))) fatal(`the JavaScript client is missing: ${fileURLToPath(lib)}`);
const { TetherClient } = await import(lib.href);

out({ ev: "ready", ws: createRequire(import.meta.url)("ws/package.json").version });

const client = new TetherClient(url, {
  WebSocket,
  // Reconnect fast: the tests restart servers and drop conns.
  backoff: { base: backoffBase, max: 5 * backoffBase },
});
client.on("state", (state, err) => out({ ev: "state", state, error: errorOf(err) }));
client.on("welcome", (w) => out({ ev: "welcome", ...w }));
client.on("rtt", (rtt) => out({ ev: "rtt", rtt }));
client.on("message", (data) => out({ ev: "message", data }));
client.on("presence", (topic, { joins, leaves, count, snapshot }) =>
  out({ ev: "presence", topic, joins, leaves, count, snapshot }),
);
client.on("resync", (topic) => out({ ev: "resync", topic }));
client.on("error", (err) => out({ ev: "error", error: errorOf(err) }));

const handler = (data, { topic, epoch, seq }) => out({ ev: "msg", topic, epoch, seq, data });

async function run(c) {
  switch (c.cmd) {
    case "subscribe":
      return await client.subscribe(c.topic, handler);
    case "unsubscribe":
      return client.unsubscribe(c.topic);
    case "presence":
      return client.presence(c.topic);
    case "publish":
      return await client.publish(c.topic, c.data);
    case "send":
      return await client.send(c.data);
    case "inspect":
      return { state: client.state, rtt: client.rtt, heartbeat: client.heartbeat, topics: client.topics };
    case "close":
      return await client.close();
    default:
      throw new Error(`unknown command ${JSON.stringify(c)}`);
  }
}

const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on("line", (line) => {
  if (line === "") return;
  const c = JSON.parse(line);
  // Commands run concurrently, as an application's calls would; each
  // reports its own result.
  run(c).then(
    (value) => out({ ev: "result", step: c.step, ok: true, value: value ?? null }),
    (err) => out({ ev: "result", step: c.step, ok: false, error: errorOf(err) }),
  );
});
rl.on("close", async () => {
  const timer = setTimeout(() => fatal("client.close() did not resolve within 2 s"), 2000);
  await client.close();
  clearTimeout(timer);
  process.exit(0);
});
