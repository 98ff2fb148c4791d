// The live page: draws the snapshots taskgate sends on /_taskgate/events (docs/live-view.md).
// Plain DOM, no framework: the page is served from the binary and fetches nothing else.
// Everything from the runtime (titles, agents, reasons) goes in as text, never as markup.
"use strict";

const state = { snap: null, skew: 0, token: sessionStorage.getItem("taskgate-token") };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== undefined && c !== null) node.append(c);
  }
  return node;
}

// "42 s", "3 min 5 s", "2 h 4 min": how long, in words a glance reads.
function span(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return s + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + (s % 60) + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}

const now = () => Date.now() - state.skew;

function who(s) {
  const bits = [];
  if (s.title) bits.push("“" + s.title + "”");
  if (s.agent) bits.push(s.agent);
  bits.push(s.id);
  return bits.join(" · ");
}

// Holds attached to a tree: made in, or waiting on, one of its sessions.
function holdsOf(tree, holds) {
  const ids = new Set(tree.sessions.map((s) => s.id));
  ids.add(tree.root);
  return holds.filter((h) => ids.has(h.session) || ids.has(h.child));
}

function holdRow(h) {
  const row = el("div", { class: "hold", "data-kind": h.kind, "data-session": h.session,
    "data-child": h.child, "data-blocking": h.blocking ? h.blocking.id : null });
  row.append(el("div", null, el("span", { class: "pill", "data-v": "held" }, "held " + h.kind),
    " for ", el("b", { class: "age" }, span(now() - h.since_ms)), " · session ",
    el("span", { class: "id" }, h.session)));
  row.append(el("div", { class: "why" }, "Waiting: " + h.reason));
  if (h.blocking) {
    row.append(el("div", { class: "blocking" }, "Blocked by " + who(h.blocking) +
      (h.blocking.status ? " (" + h.blocking.status + ")" : "")));
  }
  if (h.rest_deadline_ms) {
    row.append(el("div", { class: "dim" }, "At rest: released by the liveness bound in " +
      span(h.rest_deadline_ms - now())));
  }
  return row;
}

function sessionList(tree, parent, blocking) {
  const kids = tree.sessions.filter((s) =>
    parent === null ? s.id === tree.root : s.parent === parent && s.id !== tree.root);
  if (!kids.length) return null;
  const ul = el("ul", { class: "sessions" });
  for (const s of kids) {
    const busy = s.busy_since_ms ? " for " + span(now() - s.busy_since_ms) : "";
    const li = el("li", null, el("div", { class: "session", "data-id": s.id,
      "data-blocking": s.id === blocking ? "true" : null },
      el("span", { class: "pill", "data-v": s.status }, s.status + busy),
      el("span", { class: "title" }, s.title || "(untitled)"),
      s.agent ? el("span", { class: "dim" }, s.agent) : null,
      el("span", { class: "id dim" }, s.id)));
    const below = sessionList(tree, s.id, blocking);
    if (below) li.append(below);
    ul.append(li);
  }
  return ul;
}

function treeCard(tree, holds) {
  const held = holdsOf(tree, holds);
  const blocking = tree.verdict === "running" ? tree.session : null;
  const root = tree.sessions.find((s) => s.id === tree.root);
  const card = el("article", { class: "tree", "data-root": tree.root,
    "data-verdict": tree.verdict, "data-held": held.length ? "true" : "false" },
    el("div", { class: "head" },
      el("span", { class: "pill", "data-v": tree.verdict }, tree.verdict),
      el("b", null, root && root.title ? root.title : tree.root),
      el("span", { class: "dim" }, "read " + span(now() - tree.read_ms) + " ago")));
  if (tree.verdict === "running" && tree.reason) {
    card.append(el("div", { class: "dim" }, tree.reason.replace(/ \(rule \d\)$/, "")));
  }
  const list = sessionList(tree, null, blocking);
  if (list) card.append(list);
  for (const h of held) card.append(holdRow(h));
  return card;
}

function releaseItem(r) {
  return el("li", { "data-verdict": r.verdict, "data-session": r.session, "data-child": r.child,
    "data-contradiction": r.contradiction ? "true" : "false" },
    el("span", { class: "pill", "data-v": r.verdict }, r.verdict), " ",
    r.kind + " in ", el("span", { class: "id" }, r.session),
    r.child !== r.session ? el("span", null, " for ", el("span", { class: "id" }, r.child)) : null,
    " · held " + span(r.held_ms) + " · " + span(now() - r.at_ms) + " ago",
    el("div", { class: "dim" }, r.reason),
    r.contradiction ? el("div", { class: "rewritten" },
      "The claim said done; the runtime said " + r.verdict + ": rewritten to the truth.") : null);
}

function draw() {
  const snap = state.snap;
  if (!snap) return;
  document.getElementById("held-count").textContent = String(snap.holds.length);
  const trees = document.getElementById("trees");
  trees.replaceChildren(...(snap.trees.length ? snap.trees.map((t) => treeCard(t, snap.holds))
    : [el("p", { class: "dim" }, snap.gate ? "No tree read yet." :
      "The gate is off: taskgate is a plain proxy and holds nothing.")]));
  const shown = new Set();
  for (const t of snap.trees) for (const h of holdsOf(t, snap.holds)) shown.add(h);
  const orphans = snap.holds.filter((h) => !shown.has(h));
  document.getElementById("orphans").replaceChildren(...(orphans.length
    ? orphans.map(holdRow) : snap.holds.length ? [] : [el("p", { class: "dim" }, "Nothing held.")]));
  document.getElementById("releases").replaceChildren(...snap.releases.map(releaseItem));
}

function link(stateName, text) {
  const node = document.getElementById("link");
  node.dataset.state = stateName;
  node.textContent = text;
}

// Server-sent events over fetch, not EventSource: EventSource cannot send the admin token.
async function listen() {
  const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
  const response = await fetch("/_taskgate/events", { headers, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    link("refused", response.status === 401 ? "needs the admin token" :
      "refused: taskgate answers loopback clients only without proxy.admin_token");
    document.getElementById("token").hidden = response.status !== 401;
    return false;
  }
  if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
  link("live", "live");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return true;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      state.snap = JSON.parse(data);
      state.skew = Date.now() - state.snap.now_ms;
      draw();
    }
  }
}

async function run() {
  for (;;) {
    let again = true;
    try {
      again = await listen();
    } catch (e) {
      link("lost", "connection lost; retrying");
    }
    if (!again) return;
    await new Promise((r) => setTimeout(r, 2000));
  }
}

document.getElementById("token").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = e.target.elements.token.value;
  sessionStorage.setItem("taskgate-token", state.token);
  e.target.hidden = true;
  run();
});

// Ages move on between snapshots; the data does not, so nothing is fetched for this.
setInterval(draw, 1000);
run();
