// voicegate console: plain JS, no build step. All text from the server goes through
// textContent (never innerHTML), so a transcript cannot inject markup.
"use strict";
const $ = (id) => document.getElementById(id);
let csrf = null;
let source = null;
const calls = new Map(); // id -> {row, lines, turns, ended}
let selected = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") opts.headers["X-CSRF-Token"] = csrf || "";
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  if (r.status === 401) showLogin();
  return r;
}

function showLogin() {
  if (source) { source.close(); source = null; }
  $("nav").hidden = true;
  document.querySelectorAll(".panel").forEach((p) => (p.hidden = true));
  $("login").hidden = false;
  $("password").focus();
}

async function start() {
  const r = await fetch("/console/api/session", { credentials: "same-origin" });
  if (r.status !== 200) return showLogin();
  const s = await r.json();
  csrf = s.csrf;
  $("login").hidden = true;
  $("nav").hidden = false;
  tab("live");
  connect();
}

function connect() {
  if (source) source.close();
  source = new EventSource("/console/api/events");
  source.onmessage = (m) => feed(JSON.parse(m.data));
  // A stream that ends is reopened by the browser; one refused (401: the login expired)
  // closes for good: back to the login form.
  source.onerror = () => { if (source && source.readyState === EventSource.CLOSED) start(); };
}

function feed(ev) {
  switch (ev.type) {
    case "snapshot": {
      const live = new Set(ev.calls.map((c) => c.id));
      for (const [id, c] of calls) if (!live.has(id) && !c.ended) calls.delete(id);
      for (const c of ev.calls) calls.set(c.id, { row: c, lines: c.lines || [], turns: c.turns || [] });
      $("maintenance").checked = !!ev.maintenance;
      break;
    }
    case "call": calls.set(ev.call.id, { row: ev.call, lines: [], turns: [] }); break;
    case "state": { const c = calls.get(ev.id); if (c) c.row.state = ev.state; break; }
    case "line": { const c = calls.get(ev.id); if (c) c.lines.push(ev.line); break; }
    case "turn": {
      // A turn may come twice: from the agent, then from the call with its first frame.
      const c = calls.get(ev.id);
      if (c) { const i = c.turns.findIndex(t => t.reply === ev.turn.reply); if (i >= 0) c.turns[i] = ev.turn; else c.turns.push(ev.turn); }
      break;
    }
    case "ended": {
      const c = calls.get(ev.id);
      if (c) { c.ended = ev.outcome; c.endedAt = Date.now(); c.row.state = "ended"; }
      break;
    }
    case "handover": case "summary": if (!$("handovers").hidden) loadHandovers(); break;
  }
  render();
}

function outcomeText(o) {
  if (!o) return "";
  return o.detail ? `${o.outcome} (${o.detail})` : o.outcome;
}

function render() {
  const body = $("calls").tBodies[0];
  body.replaceChildren();
  const now = Date.now();
  // An ended call stays a minute (longer while it is open), then leaves the list.
  for (const [id, c] of calls) if (c.endedAt && now - c.endedAt > 60000 && id !== selected) calls.delete(id);
  for (const [id, c] of calls) {
    const tr = el("tr", undefined, "call" + (id === selected ? " sel" : ""));
    tr.dataset.id = id;
    tr.append(
      el("td", new Date(c.row.started_unix_ms).toLocaleTimeString()),
      el("td", c.row.caller || "unknown"),
      el("td", c.row.mode),
      el("td", c.row.agent),
      el("td", Math.round((now - c.row.started_unix_ms) / 1000) + " s"),
      el("td", c.ended ? "ended: " + outcomeText(c.ended) : c.row.state, "st-" + c.row.state),
      el("td", id.slice(0, 8)),
    );
    tr.onclick = () => { selected = id; render(); };
    body.append(tr);
  }
  $("no-calls").hidden = calls.size > 0;
  const c = selected && calls.get(selected);
  $("detail").hidden = !c;
  if (!c) return;
  $("detail-id").textContent = selected;
  $("detail-outcome").textContent = c.ended ? "Ended: " + outcomeText(c.ended) : "";
  $("takeover").disabled = $("hangup").disabled = !!c.ended;
  const list = $("transcript");
  list.replaceChildren();
  for (const l of c.lines) {
    let li;
    if (l.kind === "say") {
      li = el("li", undefined, l.speaker);
      li.append(el("span", l.speaker === "caller" ? "Caller:" : "Agent:", "who"), document.createTextNode(" " + l.text));
    }
    else if (l.kind === "tool") li = el("li", `tool ${l.name}(${l.arguments})`, "tool");
    else if (l.kind === "tool_result") li = el("li", `→ ${l.output}`, "tool");
    else if (l.kind === "barge_in") li = el("li", "(the caller interrupted)", "barge_in");
    else li = el("li", `${l.kind}: ${l.text || ""}`, l.kind);
    list.append(li);
  }
  const turns = $("turns").tBodies[0];
  turns.replaceChildren();
  for (const t of c.turns) {
    const tr = el("tr");
    const bars = el("td");
    let last = 0;
    for (const [v, cls] of [[t.stt_final_ms, "stt"], [t.llm_first_token_ms, "llm"], [t.tts_first_audio_ms, "tts"], [t.first_frame_ms, "wire"]]) {
      if (v === null || v === undefined) continue;
      const b = el("span", undefined, "bar " + cls);
      b.style.width = Math.max(1, Math.round((v - last) / 5)) + "px";
      b.title = `${cls} ${v} ms`;
      bars.append(b);
      last = v;
    }
    tr.append(el("td", t.reply), el("td", t.stt_final_ms ?? "–"), el("td", t.llm_first_token_ms ?? "–"),
      el("td", t.tts_first_audio_ms ?? "–"), el("td", t.first_frame_ms ?? "–"), bars);
    turns.append(tr);
  }
}

function tab(name) {
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("on", b.dataset.tab === name));
  document.querySelectorAll(".panel").forEach((p) => (p.hidden = p.id !== name));
  if (name === "handovers") loadHandovers();
  if (name === "history") loadHistory();
  if (name === "state") loadState();
}

async function loadHandovers() {
  const r = await api("GET", "/console/api/handovers");
  if (r.status !== 200) return;
  const box = $("cards");
  box.replaceChildren();
  const cards = await r.json();
  if (cards.length === 0) box.append(el("p", "No call went to the operators yet."));
  for (const c of cards) {
    const card = el("div", undefined, "card");
    card.append(el("h3", `${c.caller || "unknown caller"} — ${c.reason || c.outcome.outcome}`));
    if (c.summary) card.append(el("pre", c.summary, "summary"));
    card.append(el("p", `${new Date(c.started_unix_ms).toLocaleString()}, ${Math.round(c.duration_ms / 1000)} s with ${c.agent}` + (c.by ? `; taken over by ${c.by}` : "")));
    const ol = el("ol");
    for (const l of c.transcript) {
      const li = el("li", undefined, l.speaker);
      li.append(el("span", l.speaker === "caller" ? "Caller:" : "Agent:", "who"), document.createTextNode(" " + l.text));
      ol.append(li);
    }
    card.append(ol);
    for (const t of c.tools) {
      card.append(el("p", t.kind === "tool" ? `tool ${t.name}(${t.arguments})` : `→ ${t.output}`, "tool"));
    }
    box.append(card);
  }
}

function searchQuery(format) {
  const q = new URLSearchParams();
  const ms = (v) => (v ? String(new Date(v).getTime()) : "");
  q.set("from", ms($("from").value));
  q.set("to", ms($("to").value));
  q.set("number", $("number").value);
  q.set("outcome", $("outcome").value);
  q.set("format", format);
  return "/console/api/history?" + q.toString();
}

async function loadHistory() {
  $("csv").href = searchQuery("csv");
  $("jsonl").href = searchQuery("json");
  const r = await api("GET", searchQuery("json"));
  const body = $("records").tBodies[0];
  body.replaceChildren();
  if (r.status !== 200) { body.append(el("tr", (await r.json()).error)); return; }
  for (const rec of await r.json()) {
    const tr = el("tr");
    tr.append(
      el("td", new Date(rec.started_unix_ms).toLocaleString()),
      el("td", rec.caller_number || ""),
      el("td", Math.round(rec.duration_ms / 1000) + " s"),
      el("td", (rec.duration_ms / 60000).toFixed(2)),
      el("td", rec.detail ? `${rec.outcome} (${rec.detail})` : rec.outcome),
      el("td", rec.turn_latencies_ms.join(" ")),
      el("td", rec.tool_calls.map((t) => t.name).join(", ")),
      el("td", rec.transcript.map((l) => `${l.speaker}: ${l.text}`).join(" | ")),
    );
    body.append(tr);
  }
}

async function loadState() {
  const r = await api("GET", "/console/api/state");
  if (r.status === 200) $("state-json").textContent = JSON.stringify(await r.json(), null, 2);
}

async function act(what) {
  if (!selected) return;
  const r = await api("POST", `/console/api/calls/${selected}/${what}`);
  if (r.status !== 204) $("detail-outcome").textContent = `${what} failed (${r.status})`;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await fetch("/console/login", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ password: $("password").value }),
    });
    $("password").value = "";
    if (r.status === 204) { $("login-error").textContent = ""; return start(); }
    $("login-error").textContent = r.status === 429 ? "Too many attempts; wait a little." : "Wrong password.";
  });
  document.querySelectorAll(".tab").forEach((b) => (b.onclick = () => tab(b.dataset.tab)));
  $("takeover").onclick = () => act("takeover");
  $("hangup").onclick = () => act("hangup");
  $("maintenance").onchange = async (e) => {
    const r = await api("POST", "/console/api/maintenance", { on: e.target.checked });
    if (r.status !== 204) e.target.checked = !e.target.checked;
  };
  $("search").addEventListener("submit", (e) => { e.preventDefault(); loadHistory(); });
  $("logout").onclick = async () => { await api("POST", "/console/logout"); csrf = null; showLogin(); };
  setInterval(() => { if (!$("live").hidden) render(); }, 1000);
  start();
});
