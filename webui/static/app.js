// ukai web view: polls this node's API (GET only) once a second and draws
// the cluster and one image's block map. No framework, no build step.
"use strict";

const MAX_CELLS = 4096; // cells per location row; larger images group blocks
const POLL_MS = 1000;           // an image's page: one record and its maps
const OVERVIEW_MS = 10000;      // the overview lists every image with its maps: a few store reads each
const STATE_NAMES = ["in sync", "syncing", "out of sync"];

let updates = 0;
let last = null;   // {image, base, at, started}: where the rate counts from
let rate = 0;      // bytes per second
let grid = null;   // {key, rows: {node: [cell elements]}}

function $(id) { return document.getElementById(id); }

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function fmtDuration(s) {
  if (!isFinite(s) || s < 0) return "unknown";
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin", headers: { "Accept": "application/json" } });
  if (r.status === 401) {
    window.location.href = "/ui/login";
    throw new Error("not logged in");
  }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function td(text, cls) {
  const e = document.createElement("td");
  e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function imageState(img, alive) {
  let bad = 0, busy = 0;
  for (const l of img.locations || []) {
    if (!alive.has(l.node)) bad++;
    else if (l.out_of_sync + l.syncing > 0) busy++;
  }
  if (bad > 0) return ["copy on a dead node", "state-bad"];
  if (busy > 0) return ["syncing", "state-busy"];
  return ["in sync", "state-ok"];
}

async function overview(g) {
  const [nodes, list] = await Promise.all([api("/v1/nodes"), api("/v1/images")]);
  if (g !== gen) return; // the page moved on meanwhile
  const alive = new Set(nodes.filter(n => n.state === "alive" || n.state === "suspect").map(n => n.name));
  fill($("nodes").tBodies[0], nodes.map(n => {
    const tr = document.createElement("tr");
    tr.dataset.node = n.name;
    let state = n.state;
    if (n.draining) state += ", draining"; else if (n.cordoned) state += ", cordoned";
    tr.append(td(n.name), td(state, n.state === "alive" ? "state-ok" : "state-bad"), td(n.iscsi_addr || ""),
      td(Object.entries(n.labels || {}).map(([k, v]) => k + "=" + v).join(" ")),
      td(fmtBytes(n.free_bytes || 0), "num"), td(String((n.images || []).length), "num"));
    return tr;
  }));
  fill($("images").tBodies[0], (list.images || []).filter(i => !i.snapshot_of).map(img => {
    const tr = document.createElement("tr");
    tr.dataset.image = img.name;
    const a = document.createElement("a");
    a.href = "#image=" + encodeURIComponent(img.name);
    a.textContent = img.name;
    const name = document.createElement("td");
    name.append(a);
    const [st, cls] = imageState(img, alive);
    tr.append(name, td(fmtBytes(img.size), "num"), td(img.owner || "-"), td(img.attached || "-"),
      td((img.locations || []).map(l => l.node).join(", ")), td(st, cls));
    return tr;
  }));
}

// cellsOf turns the runs of an image into per-location cell states: cell
// i covers blocks [i*per, (i+1)*per), as the server grouped them.
function cellsOf(img) {
  const n = img.num_blocks;
  const per = n > MAX_CELLS ? Math.ceil(n / MAX_CELLS) : 1;
  const count = Math.ceil(n / per);
  const out = {};
  for (const l of img.locations) out[l.node] = new Array(count).fill(0);
  for (const r of img.runs || []) {
    const from = Math.floor(r.first / per), to = Math.floor(r.last / per);
    for (const [node, s] of Object.entries(r.states)) {
      const cells = out[node];
      if (!cells) continue;
      for (let c = from; c <= to && c < count; c++) cells[c] = s;
    }
  }
  return { per, count, cells: out };
}

function drawGrid(img, cs) {
  const key = img.id + "/" + cs.count + "/" + img.locations.map(l => l.node).join(",") + "/" + (img.owner || "");
  if (!grid || grid.key !== key) {
    const map = $("blockmap");
    map.replaceChildren();
    grid = { key, rows: {} };
    for (const l of img.locations) {
      const row = document.createElement("div");
      row.className = "row";
      row.dataset.node = l.node;
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = l.node;
      if (l.node === img.owner) {
        const star = document.createElement("span");
        star.className = "owner-mark";
        star.title = "owner";
        star.textContent = " \u2605";
        label.append(star);
        row.dataset.owner = "true";
      }
      const cells = document.createElement("div");
      cells.className = "cells";
      const els = [];
      for (let i = 0; i < cs.count; i++) {
        const c = document.createElement("span");
        c.className = "cell s0";
        c.dataset.block = String(i * cs.per);
        els.push(c);
      }
      cells.append(...els);
      row.append(label, cells);
      map.append(row);
      grid.rows[l.node] = els;
    }
  }
  for (const [node, states] of Object.entries(cs.cells)) {
    const els = grid.rows[node];
    for (let i = 0; i < states.length; i++) {
      const cls = "cell s" + states[i];
      if (els[i].className !== cls) {
        els[i].className = cls;
        els[i].title = node + ": block " + (i * cs.per) + (cs.per > 1 ? "-" + (Math.min((i + 1) * cs.per, img.num_blocks) - 1) : "") + " " + STATE_NAMES[states[i]];
      }
    }
  }
}

async function imageView(name, g) {
  const img = await api("/v1/images/" + encodeURIComponent(name) + "?blocks=runs&cells=" + MAX_CELLS);
  if (g !== gen) return; // the page moved on meanwhile
  $("image-name").textContent = img.name;
  $("image-facts").textContent = fmtBytes(img.size) + " in " + img.num_blocks + " blocks of " + fmtBytes(img.block_size) +
    "; owner " + (img.owner || "none") + (img.attached ? ", attached to " + img.attached : "") +
    (img.sync_paused ? "; sync paused" : "");
  const cs = cellsOf(img);
  drawGrid(img, cs);
  $("cellnote").textContent = cs.per > 1 ? "one cell is " + cs.per + " blocks, drawn in its worst state" : "one cell per block";
  let pending = 0;
  const parts = [];
  for (const l of img.locations) {
    pending += l.out_of_sync + l.syncing;
    if (l.out_of_sync + l.syncing > 0) parts.push(l.node + ": " + l.out_of_sync + " out of sync, " + l.syncing + " syncing");
  }
  $("summary").textContent = parts.length ? parts.join("; ") : "every copy in sync";
  // The rate counts from the first drop of the pending blocks to the
  // latest one: the catalog's maps change in batches, so a rate between
  // two polls (or from before the first batch) spikes.
  const now = performance.now() / 1000;
  if (!last || last.image !== img.id || pending > last.base) {
    last = { image: img.id, base: pending, at: now, started: false };
    rate = 0;
  } else if (pending < last.base && !last.started) {
    last = { image: img.id, base: pending, at: now, started: true };
  } else if (last.started && now > last.at && pending < last.base) {
    rate = (last.base - pending) * img.block_size / (now - last.at);
  }
  $("rate").textContent = pending > 0 && rate > 0 ? "at " + fmtBytes(rate) + "/s" : "";
  $("eta").textContent = pending > 0 ? "ETA " + (rate > 0 ? fmtDuration(pending * img.block_size / rate) : "unknown") : "";
  document.body.dataset.pending = String(pending);
}

function route() {
  const m = /^#image=(.+)$/.exec(window.location.hash);
  return m ? decodeURIComponent(m[1]) : null;
}

let gen = 0; // each navigation starts a new polling chain; older ones stop

async function tick(g) {
  if (g !== gen) return;
  let name = null;
  // A hidden tab does not poll (it would cost the metadata store for
  // nobody); it draws again when shown.
  if (document.hidden) {
    setTimeout(() => tick(g), POLL_MS);
    return;
  }
  try {
    name = route();
    $("overview").hidden = !!name;
    $("image").hidden = !name;
    if (name) await imageView(name, g); else await overview(g);
    if (g !== gen) return;
    $("error").hidden = true;
    updates++;
    document.body.dataset.updates = String(updates);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (g !== gen) return;
    $("error").hidden = false;
    $("error").textContent = String(e.message || e);
  }
  if (g === gen) setTimeout(() => tick(g), name ? POLL_MS : OVERVIEW_MS);
}

window.addEventListener("hashchange", () => { grid = null; last = null; gen++; tick(gen); });
api("/v1/node").then(n => { $("node").textContent = "node " + n.name; }).catch(() => {});
tick(gen);
