// The chat page. The client, /tether.js, keeps the connection: it
// reconnects with backoff, resumes each room from its position (the
// server replays what was missed), and keeps what you type while it is
// offline and sends it when it is back. This page shows what it reports,
// and reloads a room over HTTP when the client says it cannot resume
// (a "resync": the server restarted, or you were away for too long).
import { TetherClient } from "/tether.js";

const $ = (id) => document.getElementById(id);
const NAME = /^[A-Za-z0-9_.-]{1,32}$/;
const params = new URLSearchParams(location.search);
const user = params.get("user");

let client = null;
let room = "";   // the room shown
let topic = "";  // its topic, "room:" + room

// --- The log of messages -------------------------------------------------

// Messages shown, by id: each message carries an id chosen by the page
// that sent it, so one that arrives twice (live, and in a reloaded
// transcript) is shown once.
const shown = new Map();

function note(text) {
  const li = document.createElement("li");
  li.className = "note";
  li.textContent = text;
  append(li);
}

function append(li, before = null) {
  const log = $("log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 5;
  log.insertBefore(li, before);
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function item(data) {
  const li = document.createElement("li");
  li.className = "msg";
  li.dataset.id = data.id;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = String(data.user ?? "?");
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = String(data.text ?? JSON.stringify(data));
  const at = document.createElement("span");
  at.className = "at";
  at.textContent = typeof data.ts === "number" ? new Date(data.ts).toLocaleTimeString() : "";
  li.append(who, text, at);
  return li;
}

// deliver shows a message of the room, at its place: after the messages
// of its epoch with a lower seq (a reloaded transcript can bring older
// messages after newer ones arrived live), and before the messages still
// being sent.
function deliver(data, epoch, seq) {
  if (!data || typeof data !== "object" || typeof data.id !== "string") return;
  let li = shown.get(data.id);
  if (li && !li.classList.contains("pending")) return; // shown already
  if (li) li.remove(); // one of ours, sent: now at its place
  li = item(data);
  li.dataset.epoch = epoch ?? "";
  li.dataset.seq = String(seq ?? 0);
  let before = null;
  for (const other of $("log").children) {
    if (other.classList.contains("pending") ||
        (other.classList.contains("msg") && epoch && other.dataset.epoch === epoch && Number(other.dataset.seq) > seq)) {
      before = other;
      break;
    }
  }
  shown.set(data.id, li);
  append(li, before);
}

// reload loads the room's latest messages from the server: when joining,
// and when the client cannot resume.
async function reload(t) {
  try {
    const res = await fetch(`/api/rooms/${encodeURIComponent(room)}/messages`);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const { messages } = await res.json();
    if (t !== topic) return; // left the room meanwhile
    for (const m of messages) deliver(m.data, m.epoch, m.seq);
  } catch (err) {
    note(`could not load the room's messages: ${err.message}`);
  }
}

// --- Sending -------------------------------------------------------------

function newID() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2);
}

async function say(text) {
  const data = { id: newID(), user, text, ts: Date.now() };
  const li = item(data);
  li.classList.add("pending");
  li.querySelector(".at").dataset.status = client.state === "connected" ? "sending" : "queued until back online";
  shown.set(data.id, li);
  append(li);
  try {
    // Offline, the client keeps it and sends it once it is back.
    await client.publish(topic, data);
  } catch (err) {
    if (li.isConnected && li.classList.contains("pending")) {
      li.classList.add("failed");
      li.querySelector(".at").dataset.status = `not sent: ${err.message ?? err}`;
    }
  }
}

// --- Who is here ---------------------------------------------------------

// present: user -> meta, from the client's presence events; people: the
// server's answer with last-seen times, refreshed on each change.
const present = new Map();
let people = { present: [], away: [] };
let peopleTimer = 0;

function ago(iso) {
  if (!iso) return "";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 5) return "just now";
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function renderPeople() {
  const seen = new Map(people.present.map((p) => [p.user, p]));
  const ul = $("present");
  ul.textContent = "";
  for (const [who, meta] of [...present].sort((a, b) => a[0].localeCompare(b[0]))) {
    const p = seen.get(who);
    const li = document.createElement("li");
    li.dataset.user = who;
    li.textContent = who + (who === user ? " (you) " : " ");
    const small = document.createElement("small");
    const device = meta?.device ?? p?.meta?.device;
    const parts = [];
    if (device) parts.push(device);
    if (p?.conns > 1) parts.push(`${p.conns} tabs`);
    if (p?.last_seen) parts.push(`active ${ago(p.last_seen)}`);
    small.textContent = parts.join(" · ");
    li.append(small);
    ul.append(li);
  }
  $("here-count").textContent = String(present.size);
  const away = $("away");
  away.textContent = "";
  for (const p of people.away) {
    if (present.has(p.user)) continue;
    const li = document.createElement("li");
    li.dataset.user = p.user;
    li.textContent = p.user + " ";
    const small = document.createElement("small");
    small.textContent = `last seen ${ago(p.last_seen)}`;
    li.append(small);
    away.append(li);
  }
}

// refreshPeople asks the server who is here, with last-seen times. The
// server's list replaces what presence events said, which a reconnect
// may have left stale.
function refreshPeople(delay = 250) {
  clearTimeout(peopleTimer);
  peopleTimer = setTimeout(async () => {
    const t = topic;
    try {
      const res = await fetch(`/api/rooms/${encodeURIComponent(room)}/people`);
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const answer = await res.json();
      if (t !== topic) return;
      people = answer;
      present.clear();
      for (const p of answer.present) present.set(p.user, p.meta ?? null);
      $("people").classList.remove("stale");
      renderPeople();
    } catch {
      // The server is away; the client's state says so.
    }
  }, delay);
}

// --- The footer ----------------------------------------------------------

// The server's figures are the same for every page: the server pushes
// them to all pages at once (a direct message {"stats": {...}}) when they
// change. This page's figures (its round trip, its reconnects) are its
// own, and labelled so.

const plural = (n, one, many = one + "s") => `${n} ${n === 1 ? one : many}`;

function showStats(s) {
  const el = $("stats");
  const rtt = s.rtt_samples > 0 ? `heartbeat rtt p50 ≤ ${s.rtt_p50_ms} ms` : "no heartbeat ping needed yet";
  el.textContent = `server: ${plural(s.users, "user")} · ${plural(s.conns, "conn")} · ${plural(s.topics, "topic")} · ` +
    `${plural(s.published, "message")} published · ${rtt} · ${plural(s.dead_peers, "dead peer")} dropped`;
  el.dataset.conns = String(s.conns);
  el.dataset.users = String(s.users);
  el.dataset.published = String(s.published);
  el.classList.toggle("stale", client.state !== "connected");
}

let connectedBefore = false;
let reconnects = 0;

// --- The connection ------------------------------------------------------

function showState(state, err) {
  const el = $("state");
  el.dataset.state = state;
  el.textContent = err && state !== "connected" ? `${state} (${err.message ?? err})` : state;
  $("people").classList.toggle("stale", state !== "connected");
  // Until the server pushes them again, the figures are those of before.
  $("stats").classList.toggle("stale", state !== "connected");
  for (const li of document.querySelectorAll("#log .pending:not(.failed) .at")) {
    li.dataset.status = state === "connected" ? "sending" : "queued until back online";
  }
  if (state === "connected") {
    if (connectedBefore) $("reconnects").textContent = String(++reconnects);
    connectedBefore = true;
    refreshPeople(0);
    // The client pings after a silence of the heartbeat interval (15 s):
    // one ping now shows the round trip without waiting for it.
    client.probe();
  }
}

async function join(name) {
  if (topic) client.unsubscribe(topic);
  room = name;
  topic = "room:" + name;
  const t = topic;
  $("room").value = name;
  document.title = `${name} · tether chat`;
  history.replaceState(null, "", `?${new URLSearchParams({ user, room: name })}`);
  $("log").textContent = "";
  shown.clear();
  present.clear();
  people = { present: [], away: [] };
  renderPeople();
  try {
    await client.subscribe(t, (data, m) => {
      if (m?.topic === undefined || m.topic === topic) deliver(data, m?.epoch, m?.seq);
    });
  } catch (err) {
    if (t === topic) note(`cannot join ${name}: ${err.message ?? err}`);
    return;
  }
  if (t !== topic) return;
  note(`you joined ${name}`);
  await reload(t);
  refreshPeople(0);
}

function start() {
  $("me").textContent = user;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  // Demo-only authentication: the server believes the name in the URL.
  client = new TetherClient(`${scheme}://${location.host}/ws?user=${encodeURIComponent(user)}`);
  window.chat = { client }; // for the console
  client.on("state", showState);
  client.on("rtt", (ms) => { $("rtt").textContent = `${Math.round(ms)} ms`; });
  client.on("message", (data) => {
    if (data && typeof data === "object" && data.stats) showStats(data.stats);
  });
  client.on("presence", (t, { joins = [], leaves = [], snapshot = false } = {}) => {
    if (t !== topic) return;
    // A snapshot replaces the list: it opens each subscription, so it
    // also undoes what a reconnect left stale. (A room of more than 100
    // sends counts only; the server's list below still names everyone.)
    if (snapshot) present.clear();
    for (const j of joins) present.set(j.user, j.meta ?? null);
    for (const l of leaves) present.delete(l.user);
    renderPeople();
    refreshPeople();
  });
  client.on("resync", (t) => {
    if (t !== topic) return;
    note("the server could not replay what you missed (did it restart?): reloading the room");
    reload(t);
  });
  client.on("error", (err) => note(`error: ${err?.message ?? err}`));
  showState(client.state ?? "connecting");

  $("say").onsubmit = (e) => {
    e.preventDefault();
    const text = $("text").value.trim();
    if (!text) return;
    $("text").value = "";
    say(text);
  };
  $("rooms").onsubmit = (e) => {
    e.preventDefault();
    const name = $("room").value.trim();
    if (NAME.test(name) && name !== room) join(name);
  };
  // On a narrow screen the list of people is a drawer.
  const drawer = (open) => {
    $("people").classList.toggle("open", open);
    $("people-toggle").setAttribute("aria-expanded", String(open));
  };
  $("people-toggle").onclick = () => drawer(!$("people").classList.contains("open"));
  $("log").addEventListener("click", () => drawer(false));
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") drawer(false); });
  setInterval(renderPeople, 1000); // "x s ago"
  setInterval(() => { if (client.state === "connected") refreshPeople(0); }, 10000);
  join(NAME.test(params.get("room") ?? "") ? params.get("room") : "lobby");
}

if (user && NAME.test(user)) {
  start();
} else {
  // No name yet: ask for one. Anyone may pick any name (demo only).
  $("say").hidden = true;
  $("rooms").hidden = true;
  $("people-toggle").hidden = true;
  document.querySelector("footer").hidden = true;
  $("state").textContent = "pick a name";
  $("login").hidden = false;
  $("name").focus();
  $("login").onsubmit = (e) => {
    e.preventDefault();
    location.search = `?${new URLSearchParams({ user: $("name").value, room: $("roomname").value })}`;
  };
}
