// tidegate dashboard: polls the admin API of the gateway that served this page and draws
// what it reads. No framework, no asset from the internet. Rates are derived from the
// counters' change between two polls; history is kept in memory, bounded (HISTORY points).
"use strict";

const POLL_MS = 2000;      // one round of requests at most every 2 s
const HISTORY = 150;       // points kept per chart (5 minutes at 2 s)
const DEVICE_ROWS = 50;    // the device table shows the most recently seen ones
const RECENT = 15;         // recent drops / dead letters kept in the lists
const PAGE = 500;          // drops / dead letters read per poll while catching up

const token = new URLSearchParams(location.hash.slice(1)).get("token");
const history = { t: [], inRate: [], outRate: [], depth: [], age: [] };
let previous = null;       // {t, ingested, forwarded}
let devicePrevious = new Map();  // device id -> {t, messages}
const cursors = { drops: 0, deadLetters: 0 };
const recent = { drops: [], deadLetters: [] };

const $ = (id) => document.getElementById(id);

function text(id, value) { $(id).textContent = value; }

function fmtInt(n) { return n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"); }

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let v = n, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

function fmtAgo(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

async function getJson(path, guarded) {
  const headers = guarded && token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function setDl(id, entries) {
  const dl = $(id);
  dl.replaceChildren();
  for (const [key, value, cls] of entries) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = value;
    if (cls) dd.className = cls;
    dl.append(dt, dd);
  }
}

// A line chart on a canvas: one or more series over the same x (sample index).
function drawChart(id, seriesList) {
  const canvas = $(id);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width, height = canvas.clientHeight || canvas.height;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const left = 52, right = 8, top = 8, bottom = 18;
  const w = width - left - right, h = height - top - bottom;
  let max = 0;
  for (const s of seriesList) for (const v of s.values) if (v !== null && v > max) max = v;
  max = max <= 0 ? 1 : max * 1.1;
  ctx.strokeStyle = "#26323f"; ctx.fillStyle = "#8a9aa8"; ctx.font = "11px sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + h - (h * i) / 4;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + w, y); ctx.stroke();
    const label = (max * i) / 4;
    ctx.fillText(label >= 100 ? label.toFixed(0) : label.toFixed(1), 4, y + 4);
  }
  ctx.fillText(`last ${Math.round((HISTORY * POLL_MS) / 60000)} min`, left, height - 4);
  for (const s of seriesList) {
    // Newest point at the right edge; a gap (null) breaks the line.
    const offset = HISTORY - s.values.length;
    const point = (v, i) => [left + (w * (i + offset)) / (HISTORY - 1), top + h - (h * v) / max];
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2; ctx.beginPath();
    let started = false;
    s.values.forEach((v, i) => {
      if (v === null) { started = false; return; }
      const [x, y] = point(v, i);
      if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
    });
    ctx.stroke();
    const last = s.values.length - 1;
    if (last >= 0 && s.values[last] !== null) {
      const [x, y] = point(s.values[last], last);
      ctx.beginPath(); ctx.arc(x, y, 3, 0, 2 * Math.PI); ctx.fill();
    }
  }
}

function renderStatus(s, now) {
  const buffer = s.buffer, kafka = s.kafka;
  text("gateway-id", s.gateway_id);
  text("uptime", `${Math.round(s.uptime_s)} s`);
  const ingested = buffer.rows_committed, forwarded = kafka.forwarded;
  text("ingested", fmtInt(ingested));
  text("forwarded", fmtInt(forwarded));
  text("buffer-rows", fmtInt(buffer.rows));
  text("buffer-bytes", fmtBytes(buffer.payload_bytes));
  const full = $("buffer-full");
  full.textContent = buffer.full ? "FULL" : "accepting";
  full.className = buffer.full ? "bad" : "ok";
  text("oldest-age", buffer.oldest_age_s === null ? "-" : buffer.oldest_age_s.toFixed(1));

  const kafkaState = $("kafka-state");
  kafkaState.textContent = kafka.connected ? "connected" : "down";
  kafkaState.className = "value " + (kafka.connected ? "ok" : "bad");
  const breaker = kafka.breaker || {};
  const breakerState = $("breaker-state");
  breakerState.textContent = breaker.state || "-";
  breakerState.className = "value " +
    ({ closed: "ok", half_open: "warn" }[breaker.state] || "bad");
  text("breaker-detail", `${breaker.consecutive_failures ?? 0} consecutive failures, ` +
    `${breaker.trips ?? 0} trips` +
    (breaker.next_probe_in_s == null ? "" : `, next probe in ${breaker.next_probe_in_s} s`));

  let inRate = null, outRate = null;
  if (previous !== null && now > previous.t) {
    const dt = (now - previous.t) / 1000;
    inRate = Math.max(0, ingested - previous.ingested) / dt;
    outRate = Math.max(0, forwarded - previous.forwarded) / dt;
  }
  previous = { t: now, ingested, forwarded };
  text("ingest-rate", inRate === null ? "-" : inRate.toFixed(1));
  text("forward-rate", outRate === null ? "-" : outRate.toFixed(1));
  push(history.inRate, inRate); push(history.outRate, outRate);
  push(history.depth, buffer.rows); push(history.age, buffer.oldest_age_s);

  const dropped = Object.entries(buffer.dropped || {});
  setDl("loss-counts", [
    ...dropped.map(([reason, n]) => [`dropped: ${reason}`, fmtInt(n), n ? "warn" : ""]),
    ["dropped (total)", fmtInt(dropped.reduce((a, [, n]) => a + n, 0))],
    ["dead letters held", fmtInt(buffer.dead_letters), buffer.dead_letters ? "warn" : ""],
    ["dead-lettered (Kafka refused)", fmtInt(kafka.dead_lettered)],
    ["unrouted (to dead-letter topic)", fmtInt(s.intake ? s.intake.unrouted : null)],
  ]);

  const c = s.commands;
  setDl("commands", c === null ? [["state", "not enabled"]] : [
    ["consumed", fmtInt(c.consumed)],
    ["delivery attempts", fmtInt(c.delivery_attempts)],
    ["delivered", fmtInt(c.delivered)],
    ["unacknowledged", fmtInt(c.unacknowledged), c.unacknowledged ? "warn" : ""],
    ["results sent", fmtInt(c.results_sent)],
    ["error", c.consumer_error || c.results_error || "none", (c.consumer_error || c.results_error) ? "bad" : ""],
  ]);
  const f = s.firmware;
  setDl("firmware", f === null ? [["state", "not enabled"]] : [
    ["releases cached", fmtInt(f.releases_cached)],
    ["offers", fmtInt(f.offers)],
    ["chunks sent", `${fmtInt(f.chunks_sent)} (${fmtBytes(f.chunk_bytes_sent || 0)})`],
    ["device reports", fmtInt(f.reports)],
    ["requests refused", fmtInt(f.requests_refused)],
    ["error", f.consumer_error || f.status_error || "none", (f.consumer_error || f.status_error) ? "bad" : ""],
  ]);
  const sec = s.security;
  setDl("security", !sec ? [["state", "-"]] : [
    ["anonymous", sec.allow_anonymous ? "allowed" : "refused", sec.allow_anonymous ? "warn" : "ok"],
    ["ACL", sec.acl ? "on" : "off"],
    ["auth failures", fmtInt(sec.auth_failures)],
    ["TLS handshake failures", fmtInt(sec.tls_handshake_failures)],
    ["publishes denied", fmtInt(sec.publishes_denied)],
  ]);
  const lc = s.lifecycle;
  if (lc) text("devices-connected", fmtInt(lc.connected_devices));
}

function renderDevices(d, now) {
  const body = $("devices-table").tBodies[0];
  const rows = [];
  const next = new Map();
  let connected = 0;
  // The server picks the most recently seen; shown by id so rows do not jump between polls.
  const devices = d.devices.slice().sort((a, b) => (a.device_id < b.device_id ? -1 : 1));
  for (const dev of devices) {
    if (dev.connected) connected++;
    const before = devicePrevious.get(dev.device_id);
    let rate = "-";
    if (before && dev.messages != null && now > before.t) {
      rate = (Math.max(0, dev.messages - before.messages) / ((now - before.t) / 1000)).toFixed(1);
    }
    next.set(dev.device_id, { t: now, messages: dev.messages });
    const tr = document.createElement("tr");
    const cells = [dev.device_id, dev.connected ? "yes" : "no", fmtAgo(dev.last_seen_ms),
      fmtInt(dev.messages), rate, dev.device_type || "-", dev.firmware_version || "-"];
    for (const [i, value] of cells.entries()) {
      const td = document.createElement("td");
      td.textContent = value;
      if (i === 1) td.className = dev.connected ? "ok" : "";
      tr.append(td);
    }
    rows.push(tr);
  }
  devicePrevious = next;
  body.replaceChildren(...rows);
  text("devices-total", fmtInt(d.total ?? d.devices.length));
  if (d.connected !== undefined) text("devices-connected", fmtInt(d.connected));
  else if ($("devices-connected").textContent === "-") text("devices-connected", fmtInt(connected));
}

function renderList(id, items, describe) {
  const list = $(id);
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "none"; li.textContent = "none";
    list.replaceChildren(li);
    return;
  }
  list.replaceChildren(...items.slice().reverse().map((item) => {
    const li = document.createElement("li");
    li.textContent = describe(item);
    return li;
  }));
}

// The ledgers are read forward from a cursor, one page per poll, newest RECENT kept.
async function pollLedgers() {
  if (!token) { $("token-hint").hidden = false; return; }
  const drops = (await getJson(`/drops?after=${cursors.drops}&limit=${PAGE}`, true)).drops;
  if (drops.length) cursors.drops = drops[drops.length - 1].id;
  recent.drops = recent.drops.concat(drops).slice(-RECENT);
  renderList("drops-list", recent.drops, (x) =>
    `#${x.id} ${new Date(x.dropped_ms).toLocaleTimeString()} ${x.device_id} ${x.class}: ${x.reason}`);
  const dead = (await getJson(`/dead-letters?after=${cursors.deadLetters}&limit=${PAGE}`, true))
    .dead_letters;
  if (dead.length) cursors.deadLetters = dead[dead.length - 1].row_id;
  recent.deadLetters = recent.deadLetters.concat(dead.map((x) => ({
    id: x.row_id, device_id: x.device_id, class_name: x.class_name, reason: x.reason,
    bytes: x.payload_bytes, message_id: x.message_id,
  }))).slice(-RECENT);
  renderList("dead-letters-list", recent.deadLetters, (x) =>
    `#${x.id} ${x.device_id ?? "-"} ${x.class_name ?? ""}: ${x.reason ?? ""} (${x.bytes} B)`);
}

async function poll() {
  const now = Date.now();
  try {
    const [status, devices] = await Promise.all([
      getJson("/status"), getJson(`/devices?limit=${DEVICE_ROWS}`),
    ]);
    renderStatus(status, now);
    renderDevices(devices, now);
    drawChart("chart-rates", [
      { values: history.inRate, color: "#4aa3ff" }, { values: history.outRate, color: "#3ec27a" },
    ]);
    drawChart("chart-depth", [{ values: history.depth, color: "#e5b33b" }]);
    drawChart("chart-age", [{ values: history.age, color: "#ec5b56" }]);
    await pollLedgers();
    text("updated", new Date(now).toLocaleTimeString());
    const state = $("conn-state");
    state.textContent = "live"; state.className = "ok";
    $("error").hidden = true;
  } catch (err) {
    const state = $("conn-state");
    state.textContent = "gateway unreachable"; state.className = "bad";
    $("error").textContent = String(err);
    $("error").hidden = false;
  } finally {
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    setTimeout(poll, Math.max(0, POLL_MS - (Date.now() - now)));
  }
}

poll();
