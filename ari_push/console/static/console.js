// ari-push operator's console: plain JS, no build step, no library. Every value shown is put
// in the page as text (textContent / SVG text), never as HTML.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const SVGNS = "http://www.w3.org/2000/svg";
const state = { page: "", callId: "", liveCalls: new Map(), timer: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text != null) node.textContent = String(text);
  return node;
}
function fill(tbody, rows) { tbody.replaceChildren(...rows); }
function when(epoch) {
  if (!epoch) return "–";
  const d = new Date(epoch * 1000);
  return d.toLocaleString(undefined, { hour12: false });
}
function ago(epoch) {
  if (!epoch) return "";
  const s = Math.max(0, Date.now() / 1000 - epoch);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

async function api(path, options) {
  const resp = await fetch(path, Object.assign({ credentials: "same-origin", cache: "no-store" }, options || {}));
  let body = null;
  try { body = await resp.json(); } catch (e) { body = { error: `HTTP ${resp.status}` }; }
  if (!resp.ok) throw new Error(body && body.error ? body.error : `HTTP ${resp.status}`);
  return body;
}
function post(path, data) {
  return api(path, { method: "POST", body: JSON.stringify(data),
    headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF } });
}

// ---------------------------------------------------------------- overview

async function showOverview() {
  const o = await api("/api/overview");
  const win = o.window_seconds >= 3500 ? "hour" : `${Math.max(1, Math.round(o.window_seconds / 60))} min (since start)`;
  document.querySelectorAll(".window").forEach((n) => { n.textContent = win; });
  fill(document.getElementById("links"), o.links.map((l) => el("li", { "data-link": l.name },
    `${l.name}: `, el("span", { class: l.state }, l.state), l.reason ? ` (${l.reason})` : "")));
  document.getElementById("calls-waiting").textContent = o.calls_waiting;
  document.getElementById("calls-in-flight").textContent = o.calls_in_flight == null ? "–" : o.calls_in_flight;
  const statuses = Object.entries(o.calls);
  fill(document.getElementById("calls-by-status"), statuses.length ? statuses.map(([s, n]) =>
    el("li", {}, el("span", { class: `status-${s}` }, s), `: ${n}`)) : [el("li", {}, "none")]);
  fill(document.querySelector("#pushes tbody"), o.pushes.length ? o.pushes.map((p) => el("tr", {},
    el("td", {}, p.provider), el("td", {}, p.kind), el("td", { class: `outcome-${p.outcome}` }, p.outcome),
    el("td", { class: "num" }, p.count))) : [el("tr", {}, el("td", { colspan: 4 }, "no pushes"))]);
  const rates = Object.entries(o.error_rates);
  fill(document.querySelector("#error-rates tbody"), rates.length ? rates.map(([p, r]) => el("tr", {},
    el("td", {}, p), el("td", { class: "num" }, r.sent), el("td", { class: "num" }, r.errors),
    el("td", { class: "num" }, r.dead), el("td", { class: "num" }, `${(100 * r.error_rate).toFixed(1)} %`)))
    : [el("tr", {}, el("td", { colspan: 5 }, "no pushes"))]);
}

// ---------------------------------------------------------------- devices

async function showDevices(aor) {
  document.getElementById("device-aor").value = aor || "";
  const note = document.getElementById("devices-note");
  const d = await api(`/api/devices?aor=${encodeURIComponent(aor || "")}`);
  const tbody = document.querySelector("#devices tbody");
  if (!aor) {
    note.replaceChildren(`${d.total_aors} AOR(s) with push devices: `,
      ...d.aors.map((a) => el("a", { href: `#/devices?aor=${encodeURIComponent(a)}`, class: "aor-link" }, a, " ")));
    fill(tbody, []);
    return;
  }
  note.textContent = `${d.devices.length} device(s) for ${d.aor}`;
  fill(tbody, d.devices.map((dev) => {
    const last = dev.last_push;
    const lastCell = last ? el("td", {}, el("a", { href: `#/call/${encodeURIComponent(last.call_id)}` }, last.kind || "push"),
      " ", el("span", { class: `outcome-${last.outcome}` }, last.outcome || ""), ` ${ago(last.at)}`) : el("td", {}, "–");
    return el("tr", { "data-device": dev.device_id },
      el("td", { class: "mono" }, dev.device_id), el("td", {}, dev.provider), el("td", { class: "mono token" }, dev.token),
      el("td", {}, dev.dialect), el("td", {}, dev.user_agent), el("td", {}, when(dev.first_seen)),
      el("td", {}, when(dev.last_seen)), lastCell,
      el("td", {}, d.test_push ? el("button", { class: "test-push", onclick: () => testPush(aor, dev.device_id) }, "test push") : "",
        " ", el("button", { class: "forget danger", onclick: () => forget(aor, dev.device_id) }, "forget")));
  }));
}
function report(text) {
  const out = document.getElementById("action-result");
  out.hidden = false;
  out.textContent = text;
}
function detailText(detail) {
  if (!detail || typeof detail !== "object") return detail ? ` (${detail})` : "";
  const parts = Object.entries(detail).filter(([, v]) => v !== null && v !== "").map(([k, v]) => `${k} ${v}`);
  return parts.length ? ` (${parts.join(", ")})` : "";
}
async function testPush(aor, device) {
  report(`test push to ${device} …`);
  try {
    const r = await post("/api/test-push", { aor, device });
    report(r.results.map((x) => `${x.device_id || device}: ${x.provider} ${x.kind || ""} → ${x.outcome}` +
      (x.latency_ms != null ? ` in ${Number(x.latency_ms).toFixed(0)} ms` : "") +
      detailText(x.detail)).join("\n") || "no device pushed");
  } catch (e) { report(`test push refused: ${e.message}`); }
}
async function forget(aor, device) {
  if (!window.confirm(`Forget device ${device} of ${aor}? It comes back at its next REGISTER.`)) return;
  try {
    const r = await post("/api/devices/forget", { aor, device });
    report(`forgot ${r.forgotten} device(s)`);
    await showDevices(aor);
  } catch (e) { report(`forget refused: ${e.message}`); }
}

// ---------------------------------------------------------------- calls

function filterQuery() {
  const q = new URLSearchParams();
  for (const id of ["aor", "caller", "status", "provider", "limit"]) {
    const v = document.getElementById(`f-${id}`).value.trim();
    if (v) q.set(id, v);
  }
  return q;
}
function callRow(c, live) {
  const link = el("a", { href: `#/call/${encodeURIComponent(c.call_id)}` }, c.call_id);
  const cells = [el("td", {}, when(c.started_at)), el("td", { class: "mono" }, link), el("td", {}, c.aor),
    el("td", {}, c.caller), el("td", {}, (c.providers || []).join(", "))];
  if (live) cells.push(el("td", { class: "num" }, `${Math.max(0, Date.now() / 1000 - c.started_at).toFixed(0)} s`));
  else cells.push(el("td", { class: `status-${c.status || "in_flight"}` }, c.status || "in flight"),
    el("td", { class: "num" }, c.duration_ms == null ? "–" : `${(c.duration_ms / 1000).toFixed(1)} s`));
  return el("tr", { "data-call": c.call_id }, ...cells);
}
function drawLive() {
  const rows = [...state.liveCalls.values()].sort((a, b) => b.started_at - a.started_at).map((c) => callRow(c, true));
  fill(document.querySelector("#calls-live tbody"), rows.length ? rows : [el("tr", {}, el("td", { colspan: 6 }, "none"))]);
}
async function showCalls() {
  const [live, last] = await Promise.all([api("/api/calls?status=in_flight&limit=500"), api(`/api/calls?${filterQuery()}`)]);
  state.liveCalls = new Map(live.calls.map((c) => [c.call_id, c]));
  drawLive();
  fill(document.querySelector("#calls tbody"), last.calls.length ? last.calls.map((c) => callRow(c, false))
    : [el("tr", {}, el("td", { colspan: 7 }, "no calls"))]);
}

// ---------------------------------------------------------------- one call: the timeline

const LABELS = {
  call_start: () => "call starts (INVITE)", ringback: () => "ringback",
  push: (d) => `push ${d.provider || ""} ${d.kind || ""} ${d.outcome || ""}` +
    (d.latency_ms != null ? ` (${Number(d.latency_ms).toFixed(0)} ms` + (d.retries ? `, ${d.retries} retries)` : ")") : ""),
  register: (d) => `re-REGISTER (${d.uri_change === "same" ? "same URI" : "new URI"})`,
  leg: (d) => `leg ${d.fate || ""}${d.cause ? ` (${d.cause})` : ""}`, bridge: () => "bridged",
  hangup: (d) => `hang-up ${d.side || ""}${d.cause ? ` (${d.cause})` : ""}`, status: (d) => `status ${d.status || ""}`,
  note: (d) => d.text || d.note || "note",
};
function drawTimeline(trace) {
  const events = trace.events || [];
  const end = Math.max(1, ...events.map((e) => e.t_ms),
    trace.ended_at ? 1000 * (trace.ended_at - trace.started_at) : 0);
  const lanes = ["call"];
  for (const e of events) if (e.device && !lanes.includes(e.device)) lanes.push(e.device);
  const box = document.getElementById("timeline");
  const left = 150, right = 30, top = 44, width = Math.max(900, box.clientWidth - 2);
  const x = (t) => left + (width - left - right) * (t / end);
  const laneOf = (e) => (e.device && lanes.includes(e.device) ? lanes.indexOf(e.device) : 0);
  // place each label: one line ("re-REGISTER (new URI) +413 ms"), to the right of its mark or,
  // near the right edge, to its left; on the first free row, rows alternating above and below
  const rows = lanes.map(() => []);
  const placed = events.map((e) => {
    const label = (LABELS[e.kind] || (() => e.kind))(e.detail || {});
    const text = `${label} +${Number(e.t_ms).toFixed(0)} ms`;
    const w = 6.4 * text.length + 10, cx = x(e.t_ms);
    const toLeft = cx + 8 + w > width - 4;
    const x0 = toLeft ? cx - 8 - w : cx + 8, x1 = x0 + w;
    const lane = laneOf(e);
    let row = 0;
    while ((rows[lane][row] || []).some(([a, b]) => x0 < b + 4 && a < x1 + 4)) row += 1;
    (rows[lane][row] = rows[lane][row] || []).push([x0, x1]);
    return { e, label, text, cx, toLeft, lane, row };
  });
  const rowH = 15;
  const half = lanes.map((_, i) => Math.max(1, Math.ceil(rows[i].length / 2)) * rowH + 12);
  const laneY = [];
  let y0 = top;
  lanes.forEach((_, i) => { laneY.push(y0 + half[i]); y0 += 2 * half[i] + 8; });
  const height = y0 + 10;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `timeline of call ${trace.call_id}` });
  // the axis: ticks at round milliseconds
  const step = [1, 2, 5].flatMap((m) => [1, 10, 100, 1000, 10000, 100000].map((p) => m * p))
    .sort((a, b) => a - b).find((st) => end / st <= 10) || 100000;
  const axis = svg("g", { class: "axis" });
  axis.append(svg("line", { x1: left, x2: width - right, y1: top - 14, y2: top - 14 }));
  for (let t = 0; t <= end + 1e-9; t += step) {
    axis.append(svg("line", { class: "grid", x1: x(t), x2: x(t), y1: top - 14, y2: height - 6 }));
    axis.append(svg("text", { x: x(t), y: top - 20, "text-anchor": "middle", class: "t" },
      t >= 1000 ? `${(t / 1000).toFixed(step >= 1000 ? 0 : 1)} s` : `${t} ms`));
  }
  root.append(axis);
  lanes.forEach((lane, i) => {
    root.append(svg("line", { x1: left, x2: width - right, y1: laneY[i], y2: laneY[i], class: "grid" }));
    root.append(svg("text", { x: 8, y: laneY[i] + 4, class: "lane-label" },
      lane === "call" ? "call" : `device ${lane.slice(0, 10)}`));
  });
  // the caller's wait: from the first push to the bridge (or the end), shaded on the call lane
  const firstPush = events.find((e) => e.kind === "push"), bridge = events.find((e) => e.kind === "bridge");
  if (firstPush) {
    const x2 = x(bridge ? bridge.t_ms : end);
    root.append(svg("rect", { class: "span", x: x(firstPush.t_ms), y: laneY[0] - 5,
      width: Math.max(2, x2 - x(firstPush.t_ms)), height: 10 }));
  }
  for (const p of placed) {
    const { e, cx, lane, row } = p;
    const y = laneY[lane];
    const g = svg("g", { class: `ev ev-${e.kind}`, "data-kind": e.kind, "data-t-ms": e.t_ms });
    if (e.kind === "register" || e.kind === "hangup" || e.kind === "status") {
      g.append(svg("rect", { x: cx - 6, y: y - 6, width: 12, height: 12, "data-x": cx }));
    } else if (e.kind === "leg") {
      g.append(svg("path", { d: `M ${cx} ${y - 7} L ${cx + 7} ${y} L ${cx} ${y + 7} L ${cx - 7} ${y} Z`, "data-x": cx }));
    } else {
      g.append(svg("circle", { cx, cy: y, r: 6, "data-x": cx }));
    }
    const up = row % 2 === 0, level = Math.floor(row / 2);
    const ly = up ? y - 10 - level * rowH : y + 20 + level * rowH;
    g.prepend(svg("line", { x1: cx, x2: cx, y1: y, y2: up ? ly + 3 : ly - 11, class: "tick" }));
    g.append(svg("text", { x: p.toLeft ? cx - 8 : cx + 8, y: ly, class: "label",
      "text-anchor": p.toLeft ? "end" : "start" }, p.label + " "));
    const tspan = svg("tspan", { class: "t" }, `+${Number(e.t_ms).toFixed(0)} ms`);
    g.lastChild.append(tspan);
    g.append(svg("title", {}, `${p.label} at +${Number(e.t_ms).toFixed(1)} ms`));
    root.append(g);
  }
  box.replaceChildren(root);
}
async function showCall(id) {
  document.getElementById("call-id").textContent = id;
  const t = await api(`/api/calls/${encodeURIComponent(id)}`);
  state.callId = id;
  const s = t.summary;
  document.getElementById("call-meta").replaceChildren(`${s.caller} → ${s.aor}, started ${when(s.started_at)} on ${s.node}; `,
    el("span", { class: `status-${s.status || "in_flight"}`, id: "call-status" }, s.status || "in flight"),
    s.duration_ms == null ? "" : `, ${(s.duration_ms / 1000).toFixed(2)} s`);
  drawTimeline(t);
}

// ---------------------------------------------------------------- routing, live updates

function route() {
  const hash = location.hash || "#/overview";
  const [path, query] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  const page = parts[0] === "call" ? "call" : (["overview", "devices", "calls"].includes(parts[0]) ? parts[0] : "overview");
  state.page = page;
  state.callId = "";
  document.querySelectorAll(".page").forEach((p) => { p.hidden = p.id !== `page-${page}`; });
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.id === `nav-${page}`));
  const params = new URLSearchParams(query || "");
  const shown = page === "overview" ? showOverview() : page === "devices" ? showDevices(params.get("aor"))
    : page === "calls" ? showCalls() : showCall(decodeURIComponent(parts.slice(1).join("/")));
  shown.then(() => {  // data-loaded-ms: since the navigation started (bench/console_load.py reads it)
    document.body.setAttribute("data-loaded-ms", performance.now().toFixed(1));
    document.body.setAttribute("data-loaded", page);
  })
    .catch((e) => { document.body.setAttribute("data-error", e.message); report(`error: ${e.message}`); });
}

function live() {
  const badge = document.getElementById("live");
  const source = new EventSource("/api/events");
  source.onopen = () => { badge.className = "live on"; };
  source.onerror = () => { badge.className = "live off"; };
  source.addEventListener("call", (msg) => {
    const c = JSON.parse(msg.data);
    if (state.page === "calls") {
      if (c.in_flight) state.liveCalls.set(c.call_id, c); else state.liveCalls.delete(c.call_id);
      drawLive();
      if (!c.in_flight) showCalls().catch(() => {});
    } else if (state.page === "call" && state.callId === c.call_id) {
      showCall(c.call_id).catch(() => {});
    }
  });
}

document.getElementById("device-search").addEventListener("submit", (ev) => {
  ev.preventDefault();
  location.hash = `#/devices?aor=${encodeURIComponent(document.getElementById("device-aor").value.trim())}`;
});
document.getElementById("call-filters").addEventListener("submit", (ev) => {
  ev.preventDefault();
  showCalls().catch((e) => report(e.message));
});
window.addEventListener("hashchange", route);
setInterval(() => { if (state.page === "overview") showOverview().catch(() => {}); }, 5000);
setInterval(() => { if (state.page === "calls") drawLive(); }, 1000);
route();
live();
