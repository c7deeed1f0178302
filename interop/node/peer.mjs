// A raw WebSocket peer on the ws package, driven by the Go tests
// (interop/nodews_test.go) through a line protocol:
//
//   node peer.mjs <url> [--auto-pong=false] [--protocol=tether.v1]
//
// stdout: one JSON object per line, {"ev": ...}:
//   ready {ws}            the ws package version, before connecting
//   open {protocol}       the handshake is done
//   ping / pong           a WebSocket control frame arrived
//   message {text|binary} a message arrived (binary as base64)
//   close {code, reason}  the socket closed; the process then exits 0
//   fatal {error}         something failed; the process exits 1
// stdin: one JSON object per line, {"cmd": ...}:
//   send {text}           a text message
//   send {binary}         a binary message (base64)
//   send {repeat, times}  a text message of repeat repeated times
//   close {code, reason}  a close handshake
// When stdin ends, the peer closes with 1000 and exits.
//
// With --auto-pong=false (ws >= 8.16) the peer never answers pings, and,
// as long as it is sent no command, it sends nothing at all.

import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import WebSocket from "ws";

const out = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const fatal = (err) => {
  out({ ev: "fatal", error: String(err?.stack ?? err) });
  process.exit(1);
};
process.on("uncaughtException", fatal);
process.on("unhandledRejection", fatal);

const [url, ...flags] = process.argv.slice(2);
if (!url) fatal("usage: node peer.mjs <url> [--auto-pong=false] [--protocol=p]");
let autoPong = true;
const protocols = [];
for (const f of flags) {
  if (f === "--auto-pong=false") autoPong = false;
  else if (f.startsWith("--protocol=")) protocols.push(f.slice("--protocol=".length));
  else fatal(`unknown flag ${f}`);
}

const wsVersion = createRequire(import.meta.url)("ws/package.json").version;
out({ ev: "ready", ws: wsVersion });

const ws = new WebSocket(url, protocols, { autoPong });
let closed = false;
ws.on("open", () => out({ ev: "open", protocol: ws.protocol }));
ws.on("ping", () => out({ ev: "ping" }));
ws.on("pong", () => out({ ev: "pong" }));
ws.on("message", (data, isBinary) => {
  if (isBinary) out({ ev: "message", binary: Buffer.from(data).toString("base64") });
  else out({ ev: "message", text: data.toString("utf8") });
});
ws.on("error", (err) => out({ ev: "error", error: String(err?.message ?? err) }));
ws.on("close", (code, reason) => {
  closed = true;
  out({ ev: "close", code, reason: reason.toString("utf8") });
  process.exit(0);
});

const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on("line", (line) => {
  if (line === "") return;
  const c = JSON.parse(line);
  switch (c.cmd) {
    case "send":
      if (c.binary !== undefined) ws.send(Buffer.from(c.binary, "base64"), { binary: true });
      else if (c.repeat !== undefined) ws.send(c.repeat.repeat(c.times));
      else ws.send(c.text);
      break;
    case "close":
      ws.close(c.code ?? 1000, c.reason ?? "");
      break;
    default:
      fatal(`unknown command ${line}`);
  }
});
rl.on("close", () => {
  if (closed) process.exit(0);
  if (ws.readyState === WebSocket.CONNECTING) ws.terminate();
  else ws.close(1000, "stdin closed");
  setTimeout(() => process.exit(0), 2000).unref();
});
