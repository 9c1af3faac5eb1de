// Fleet dashboard: sign-in, fleet overview cards and per-device live charts.
// Socket handlers only append to bounded buffers and set dirty flags; every DOM and canvas
// update happens in the single requestAnimationFrame loop at the bottom.
import { FleetClient } from '/fleet-client.js';

const TOKEN_KEY = 'fleet.token';
const CLIENT_KEY = 'fleet.clientId';
const SPARK_POINTS = 60;
const SERIES_CAP = 2000;
const MARKER_CAP = 200;
const INTERVALS_KEPT = 21;
const STALE_MIN_MS = 5_000;
const OFFLINE_MS = 60_000;
const FLEET_RATE = 2; // fleet updates per device per second (conflated by the hub)
const GAP_BANNER_MS = 15_000;
const CARD_REFRESH_MS = 200; // cards redraw at most 5×/s: readable, and cheap with many devices
const CHART_SLIDE_MS = 250; // redraw idle charts this often so the time axis keeps moving
const PALETTE = ['#58a6ff', '#3fb950', '#d29922', '#bc8cff', '#39c5cf', '#ff7b72', '#e3b341', '#7ee787'];

/** Fixed-size ring of (t, v) pairs. */
class Ring {
  constructor(cap) {
    this.cap = cap;
    this.t = new Float64Array(cap);
    this.v = new Float64Array(cap);
    this.start = 0;
    this.length = 0;
  }
  push(t, v) {
    const i = (this.start + this.length) % this.cap;
    this.t[i] = t;
    this.v[i] = v;
    if (this.length < this.cap) this.length++;
    else this.start = (this.start + 1) % this.cap;
  }
  idx(k) { return (this.start + k) % this.cap; }
  clear() { this.start = 0; this.length = 0; }
}

// ---- state -------------------------------------------------------------------------------------

const state = {
  signedIn: false,
  connection: { state: 'closed', hub: null, retryAt: null, reason: null },
  authError: null,
  gaps: 0,
  recovered: 0,
  lastGapAt: 0,
  /** @type {Map<string, object>} device id → device state (see newDevice) */
  devices: new Map(),
  devicesAdded: false,
  /** @type {null | object} the open device detail (see newDetail) */
  detail: null,
  windowMs: 300_000,
  view: null,
  viewDirty: true,
};
let client = null;

Object.defineProperty(window, '__dashboard', {
  value: Object.freeze({ get client() { return client; }, get state() { return state; } }),
});

// ---- DOM helpers -------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const ui = {};

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

/** Writes only when the value changed: cheap to call every frame. */
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}
function setAttr(node, name, value) {
  const v = String(value);
  if (node.getAttribute(name) !== v) node.setAttribute(name, v);
}

function fmtValue(v) {
  if (!Number.isFinite(v)) return '—';
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  if (Number.isInteger(v)) return String(v);
  return v.toFixed(a >= 100 ? 1 : 2);
}

function fmtAgo(ms) {
  if (ms < 0 || !Number.isFinite(ms)) return '—';
  const s = Math.floor(ms / 1000);
  if (s < 1) return 'just now';
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s ago`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
}

function fmtClock(t, withSeconds) {
  const d = new Date(t);
  const p = (n) => String(n).padStart(2, '0');
  return withSeconds ? `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}` : `${p(d.getHours())}:${p(d.getMinutes())}`;
}

// ---- ingest (called from socket events: no DOM here) -------------------------------------------

function newDevice(id) {
  return {
    id,
    lastSeen: 0,
    intervals: [],
    /** From the `presence` channel: {online, reason, at, hub}, or null before it says. */
    presence: null,
    sensors: new Set(),
    /** name → {unit, value, spark: Ring} */
    metrics: new Map(),
    /** sensor → {text, at} */
    errors: new Map(),
    dirty: true,
    metricsAdded: true,
    view: null,
  };
}

function getDevice(id) {
  let dev = state.devices.get(id);
  if (!dev) {
    dev = newDevice(id);
    state.devices.set(id, dev);
    state.devicesAdded = true;
  }
  return dev;
}

/** Metric entries of a reading as [name, value, unit], tolerating bare numbers. */
function metricsOf(data) {
  const out = [];
  const metrics = data?.metrics;
  if (!metrics || typeof metrics !== 'object') return out;
  for (const [name, m] of Object.entries(metrics)) {
    const value = typeof m === 'object' && m !== null ? m.value : m;
    if (typeof value !== 'number' || !Number.isFinite(value)) continue;
    out.push([name, value, typeof m?.unit === 'string' ? m.unit : '']);
  }
  return out;
}

const isError = (data) => data?.status === 'error';

/** Chart time: the device clock when it is synchronised and plausible, else arrival time. */
function readingTime(data, now) {
  const ts = data?.ts;
  if (data?.clock_synced !== false && Number.isFinite(ts) && Math.abs(ts - now) < 86_400_000) return ts;
  return now;
}

/**
 * A fleet reading: live, or from the snapshot (`old`), which may be minutes old: it is dated by
 * the device's clock where that is plausible and does not count as an interval.
 */
function ingestFleet(data, from, old = false) {
  // Who published is `from`, set by the hub from the agent's verified token. `data` is whatever
  // the agent wrote: a `device` field in it proves nothing, and any agent could name another.
  const id = from;
  if (typeof id !== 'string' || !id) return;
  const arrived = Date.now();
  const now = old ? Math.min(readingTime(data, arrived), arrived) : arrived;
  const dev = getDevice(id);
  if (dev.lastSeen && !old) {
    dev.intervals.push(now - dev.lastSeen);
    if (dev.intervals.length > INTERVALS_KEPT) dev.intervals.shift();
  }
  dev.lastSeen = Math.max(dev.lastSeen, now);
  const sensor = typeof data?.sensor === 'string' ? data.sensor : '?';
  dev.sensors.add(sensor);
  if (isError(data)) {
    dev.errors.set(sensor, { text: String(data.error ?? 'sensor error'), at: now });
  } else {
    dev.errors.delete(sensor);
    for (const [name, value, unit] of metricsOf(data)) {
      let m = dev.metrics.get(name);
      if (!m) {
        m = { unit, value, spark: new Ring(SPARK_POINTS) };
        dev.metrics.set(name, m);
        dev.metricsAdded = true;
      }
      m.unit = unit || m.unit;
      m.value = value;
      m.spark.push(now, value);
    }
  }
  dev.dirty = true;
}

function newDetail(id) {
  return {
    id,
    channel: `devices.${id}`,
    /** name → {unit, value, ring: Ring, color, view} */
    series: new Map(),
    seriesAdded: false,
    markers: [],
    gapCount: 0,
    error: null,
    dirty: true,
    lastDraw: 0,
  };
}

function ingestDetail(detail, data) {
  const now = Date.now();
  if (isError(data)) {
    detail.error = { text: `${data.sensor ?? 'sensor'}: ${data.error ?? 'error'}`, at: now };
  } else {
    const t = readingTime(data, now);
    for (const [name, value, unit] of metricsOf(data)) {
      let s = detail.series.get(name);
      if (!s) {
        s = { unit, value, ring: new Ring(SERIES_CAP), color: PALETTE[detail.series.size % PALETTE.length], view: null };
        detail.series.set(name, s);
        detail.seriesAdded = true;
      }
      s.unit = unit || s.unit;
      s.value = value;
      s.ring.push(t, value);
    }
  }
  detail.dirty = true;
}

/** A `presence` message: the device's connection state, whether it publishes or not. */
function ingestPresence(data, from) {
  if (typeof from !== 'string' || !from || typeof data?.online !== 'boolean') return;
  const dev = getDevice(from);
  dev.presence = {
    online: data.online,
    reason: typeof data.reason === 'string' ? data.reason : '',
    at: Number.isFinite(data.at) ? data.at : Date.now(),
    hub: typeof data.hub === 'string' ? data.hub : '',
  };
  dev.dirty = true;
}

function onMessage(channel, data, meta) {
  if (channel === 'fleet') ingestFleet(data, meta?.from);
  else if (channel === 'presence') ingestPresence(data, meta?.from);
  else if (state.detail && channel === state.detail.channel) ingestDetail(state.detail, data);
}

/** The fleet and presence come with a snapshot: the view is complete the moment it opens. */
function onSnapshot(channel, items) {
  for (const item of items) {
    if (channel === 'fleet') ingestFleet(item.data, item.from, true);
    else if (channel === 'presence') ingestPresence(item.data, item.from);
  }
}

function onGap(channel) {
  state.gaps++;
  state.lastGapAt = Date.now();
  const d = state.detail;
  if (d && channel === d.channel) {
    d.gapCount++;
    d.markers.push(Date.now());
    if (d.markers.length > MARKER_CAP) d.markers.shift();
    d.dirty = true;
  }
}

function onState(s) {
  state.connection = { state: s.state, hub: s.hub, retryAt: s.retryAt, reason: s.reason };
  if (s.state === 'auth_refused') {
    // A refused token is useless: forget it and ask for another.
    sessionStorage.removeItem(TOKEN_KEY);
    state.authError = s.reason || 'the hub refused this token';
    state.signedIn = false;
    state.viewDirty = true;
  }
}

// ---- session -----------------------------------------------------------------------------------

function clientId() {
  let id = sessionStorage.getItem(CLIENT_KEY);
  if (!id) {
    id = `dash-${crypto.randomUUID?.() ?? Math.random().toString(36).slice(2)}`;
    sessionStorage.setItem(CLIENT_KEY, id);
  }
  return id;
}

function signIn(token) {
  stopClient();
  sessionStorage.setItem(TOKEN_KEY, token);
  state.signedIn = true;
  state.authError = null;
  client = new FleetClient({ token, clientId: clientId() });
  client.on('state', onState);
  client.on('message', onMessage);
  client.on('gap', onGap);
  client.on('recovered', () => { state.recovered++; });
  client.on('snapshot', onSnapshot);
  // The fleet at two updates a second per device, however fast they publish: a slow link sees
  // fewer values, never a cut-off. The device view keeps the exact stream.
  client.subscribe('fleet', { snapshot: true, maxRate: FLEET_RATE });
  client.subscribe('presence', { snapshot: true });
  route();
}

function stopClient() {
  if (client) client.close();
  client = null;
  state.devices.clear();
  state.devicesAdded = true;
  state.detail = null;
  state.gaps = 0;
  state.recovered = 0;
  state.lastGapAt = 0;
  state.connection = { state: 'closed', hub: null, retryAt: null, reason: null };
  ui.cards.replaceChildren();
}

function signOut() {
  stopClient();
  sessionStorage.removeItem(TOKEN_KEY);
  state.signedIn = false;
  state.authError = null;
  ui.tokenInput.value = '';
}

/** Token from `?token=` (then removed from the address bar), else from this tab's session. */
function initialToken() {
  const url = new URL(location.href);
  const fromUrl = url.searchParams.get('token');
  if (fromUrl) {
    url.searchParams.delete('token');
    history.replaceState(null, '', url.pathname + url.search + url.hash);
    return fromUrl.trim();
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

// ---- routing -----------------------------------------------------------------------------------

function routeDeviceId() {
  const m = /^#\/devices\/(.+)$/.exec(location.hash);
  if (!m) return null;
  try { return decodeURIComponent(m[1]); } catch { return null; }
}

function route() {
  const id = state.signedIn ? routeDeviceId() : null;
  const current = state.detail;
  if (current && current.id !== id) {
    client?.unsubscribe(current.channel);
    state.detail = null;
  }
  if (id && (!current || current.id !== id)) {
    // Fresh view on each visit: what happened while unsubscribed is not known.
    state.detail = newDetail(id);
    client?.subscribe(state.detail.channel);
    buildDetail(state.detail);
  }
  for (const dev of state.devices.values()) dev.dirty = true;
  state.viewDirty = true;
}

// ---- rendering: header -------------------------------------------------------------------------

function connectionLabel(now) {
  const c = state.connection;
  switch (c.state) {
    case 'connected':
      return now - state.lastGapAt < GAP_BANNER_MS && state.lastGapAt ? 'Connected · recovered with gap' : 'Connected';
    case 'reconnecting': {
      const s = Math.max(0, Math.ceil(((c.retryAt ?? now) - now) / 1000));
      return `Reconnecting in ${s}s`;
    }
    case 'connecting': return 'Connecting…';
    case 'auth_refused': return 'Auth refused';
    default: return state.signedIn ? 'Closed' : 'Signed out';
  }
}

let lastRateAt = 0;
function renderHeader(now) {
  const c = state.connection;
  setAttr(ui.conn, 'data-state', c.state);
  const gapShown = c.state === 'connected' && state.lastGapAt && now - state.lastGapAt < GAP_BANNER_MS;
  setAttr(ui.conn, 'data-gap', gapShown ? 'true' : 'false');
  setText(ui.connLabel, connectionLabel(now));
  setAttr(ui.conn, 'title', c.reason ? `Last: ${c.reason}` : '');
  setText(ui.hub, c.hub ?? '—');
  if (now - lastRateAt > 250) {
    lastRateAt = now;
    setText(ui.rate, String(client ? client.stats.messagesPerSecond : 0));
  }
  setText(ui.gapCount, String(state.gaps));
  setText(ui.recoveredCount, String(state.recovered));
  ui.signout.hidden = !state.signedIn;
}

function renderView() {
  const view = !state.signedIn ? 'signin' : state.detail ? 'detail' : 'fleet';
  if (view === state.view && !state.viewDirty) return;
  state.view = view;
  state.viewDirty = false;
  ui.signin.hidden = view !== 'signin';
  ui.fleet.hidden = view !== 'fleet';
  ui.detail.hidden = view !== 'detail';
  ui.authError.hidden = !(view === 'signin' && state.authError);
  ui.authError.textContent = state.authError ? `Sign-in refused: ${state.authError}` : '';
  if (view === 'signin') ui.tokenInput.focus();
}

// ---- rendering: fleet --------------------------------------------------------------------------

function median(values) {
  if (values.length === 0) return 0;
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/**
 * offline when `presence` says so (no agent connection to any hub); otherwise online, or stale
 * when no reading came for 3× the median interval (at least 5 s; a connected device whose
 * interval is not known yet is online). Without presence (a token
 * not granted it) a device is also offline after 60 s without a reading.
 */
function deviceStatus(dev, now) {
  if (dev.presence && !dev.presence.online) return 'offline';
  if (!dev.lastSeen) return dev.presence ? 'online' : 'offline';
  const silent = now - dev.lastSeen;
  if (!dev.presence && silent > OFFLINE_MS) return 'offline';
  // Its usual interval is unknown until two readings came live: connected is online till then.
  if (dev.presence && dev.intervals.length === 0) return 'online';
  const staleAfter = Math.max(STALE_MIN_MS, 3 * median(dev.intervals));
  return silent > staleAfter ? 'stale' : 'online';
}

function buildCard(dev) {
  const card = h('article', { class: 'card', 'data-testid': 'device-card', 'data-device': dev.id, tabindex: '0', role: 'link' });
  const status = h('span', { class: 'badge' });
  const lastSeen = h('span', { 'data-testid': 'last-seen' });
  const presence = h('p', { class: 'presence', 'data-testid': 'presence' });
  const sensors = h('span', { class: 'sensors' });
  const warn = h('p', { class: 'warn', hidden: '' });
  const metrics = h('ul', { class: 'metrics' });
  card.append(
    h('div', { class: 'card-head' }, h('span', { class: 'dot', 'aria-hidden': 'true' }), h('h2', { text: dev.id, title: dev.id }), status),
    h('div', { class: 'card-meta' }, lastSeen, sensors),
    presence,
    warn,
    metrics,
  );
  const open = () => { location.hash = `#/devices/${encodeURIComponent(dev.id)}`; };
  card.addEventListener('click', open);
  card.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); open(); } });
  return { card, status, lastSeen, presence, sensors, warn, metrics, rows: new Map() };
}

/** "connected 4m 2s ago via hub-a" / "offline since 12:03:04 · ping_timeout". */
function presenceText(p, now) {
  if (!p) return '';
  const via = p.hub ? ` via ${p.hub}` : '';
  if (p.online) return `connected ${fmtAgo(now - p.at)}${via}`;
  return `offline since ${fmtClock(p.at, true)} · ${p.reason.replaceAll('_', ' ')}`;
}

function buildMetricRow(name) {
  const value = h('span', { class: 'metric-value' });
  const canvas = h('canvas', { class: 'spark', 'aria-hidden': 'true' });
  const li = h('li', { class: 'metric', 'data-metric': name }, h('span', { class: 'metric-name', text: name, title: name }), value, canvas);
  return { li, value, canvas };
}

function syncCardOrder() {
  // Re-append in id order only when a device appeared; stable otherwise.
  const ids = [...state.devices.keys()].sort(); // plain code-unit order, as Array#sort
  const nodes = ids.map((id) => {
    const dev = state.devices.get(id);
    if (!dev.view) {
      dev.view = buildCard(dev);
      onScreen.observe(dev.view.card);
    }
    return dev.view.card;
  });
  ui.cards.replaceChildren(...nodes);
}

function renderValue(node, value, unit) {
  const text = fmtValue(value);
  if (node.dataset.v === `${text}|${unit}`) return;
  node.dataset.v = `${text}|${unit}`;
  node.replaceChildren(text, ...(unit ? [h('small', { text: unit })] : []));
}

/**
 * Sparklines to draw once every card's text is written: their sizes are then read in one pass
 * (one layout) instead of a layout per canvas after each card's changes, which made 2,000 cards
 * take seconds.
 */
const sparks = [];

/**
 * Which cards are on screen: only theirs get sparklines drawn (a canvas each costs its backing
 * store; 8,000 of them for 2,000 devices would take seconds). A card scrolled into view is drawn
 * then.
 */
const visible = new WeakSet();
const onScreen = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (e.isIntersecting) {
      visible.add(e.target);
      const dev = state.devices.get(e.target.dataset.device);
      if (dev) dev.dirty = true;
    } else {
      visible.delete(e.target);
    }
  }
}, { rootMargin: '200px' });

function drawSparks() {
  const sizes = sparks.map(({ canvas }) => [canvas.clientWidth, canvas.clientHeight]);
  sparks.forEach(({ canvas, ring, color }, k) => drawSpark(canvas, ring, color, sizes[k]));
  sparks.length = 0;
}

function renderCard(dev, now, full) {
  const v = dev.view;
  const status = deviceStatus(dev, now);
  setAttr(v.card, 'data-status', status);
  setAttr(v.status, 'data-status', status);
  setText(v.status, status);
  setText(v.lastSeen, dev.lastSeen ? `seen ${fmtAgo(now - dev.lastSeen)}` : 'no reading yet');
  setText(v.presence, presenceText(dev.presence, now));
  if (!full) return;
  setText(v.sensors, [...dev.sensors].join(', '));
  const errs = [...dev.errors].map(([sensor, e]) => `⚠ ${sensor}: ${e.text}`);
  v.warn.hidden = errs.length === 0;
  setText(v.warn, errs.join(' · '));
  if (dev.metricsAdded) {
    dev.metricsAdded = false;
    const names = [...dev.metrics.keys()].sort();
    for (const name of names) if (!v.rows.has(name)) v.rows.set(name, buildMetricRow(name));
    v.metrics.replaceChildren(...names.map((n) => v.rows.get(n).li));
  }
  for (const [name, m] of dev.metrics) {
    const row = v.rows.get(name);
    renderValue(row.value, m.value, m.unit);
    if (visible.has(v.card)) {
      sparks.push({ canvas: row.canvas, ring: m.spark, color: status === 'online' ? '#58a6ff' : '#8b98a8' });
    }
  }
}

let lastCardsAt = 0;
let lastSecond = 0;
function renderFleet(now) {
  if (state.devicesAdded) {
    state.devicesAdded = false;
    syncCardOrder();
  }
  const second = Math.floor(now / 1000);
  const tick = second !== lastSecond; // relative times and stale state move once a second
  const due = now - lastCardsAt >= CARD_REFRESH_MS;
  if (!tick && !due) return;
  lastSecond = second;
  if (due) lastCardsAt = now;
  const counts = { online: 0, stale: 0, offline: 0 };
  for (const dev of state.devices.values()) {
    const full = due && dev.dirty;
    if (full) dev.dirty = false;
    if (tick || full) renderCard(dev, now, full);
    counts[deviceStatus(dev, now)]++;
  }
  drawSparks();
  const n = state.devices.size;
  setText(ui.summary, n === 0 ? 'Waiting for readings…'
    : `${n} device${n === 1 ? '' : 's'} · ${counts.online} online · ${counts.stale} stale · ${counts.offline} offline`);
}

// ---- canvas ------------------------------------------------------------------------------------

/** Sizes the backing store to the CSS box × devicePixelRatio; returns a context in CSS pixels. */
/** Sizes the canvas to its CSS box (`size`: [width, height] when already read). */
function prepare(canvas, size) {
  const dpr = window.devicePixelRatio || 1;
  const [w, hgt] = size ?? [canvas.clientWidth, canvas.clientHeight];
  if (w === 0 || hgt === 0) return null;
  const bw = Math.round(w * dpr);
  const bh = Math.round(hgt * dpr);
  if (canvas.width !== bw || canvas.height !== bh) {
    canvas.width = bw;
    canvas.height = bh;
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, hgt);
  return { ctx, w, h: hgt };
}

function drawSpark(canvas, ring, color, size) {
  const c = prepare(canvas, size);
  if (!c || ring.length < 1) return;
  const { ctx, w, h: hgt } = c;
  let min = Infinity;
  let max = -Infinity;
  for (let k = 0; k < ring.length; k++) {
    const v = ring.v[ring.idx(k)];
    if (v < min) min = v;
    if (v > max) max = v;
  }
  const span = max - min || 1;
  const step = w / Math.max(1, SPARK_POINTS - 1);
  const x0 = w - (ring.length - 1) * step;
  ctx.beginPath();
  for (let k = 0; k < ring.length; k++) {
    const v = ring.v[ring.idx(k)];
    const x = x0 + k * step;
    const y = max === min ? hgt / 2 : 2 + (hgt - 4) * (1 - (v - min) / span);
    if (k === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  }
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.stroke();
}

const TICK_STEPS = [5e3, 10e3, 15e3, 30e3, 60e3, 120e3, 180e3, 300e3, 600e3];

/** Line chart of one series over [now - windowMs, now], with gap markers. */
function drawChart(canvas, series, markers, now, windowMs) {
  const c = prepare(canvas);
  if (!c) return { min: NaN, max: NaN, visible: 0 };
  const { ctx, w, h: hgt } = c;
  const pad = { l: 60, r: 14, t: 12, b: 24 };
  const pw = w - pad.l - pad.r;
  const ph = hgt - pad.t - pad.b;
  const { ring } = series;
  const tMax = now;
  const tMin = tMax - windowMs;

  let min = Infinity;
  let max = -Infinity;
  let visible = 0;
  for (let k = 0; k < ring.length; k++) {
    const i = ring.idx(k);
    if (ring.t[i] < tMin) continue;
    visible++;
    if (ring.v[i] < min) min = ring.v[i];
    if (ring.v[i] > max) max = ring.v[i];
  }
  const lo = visible ? (min === max ? min - 1 : min) : 0;
  const hi = visible ? (min === max ? max + 1 : max) : 1;
  const xOf = (t) => pad.l + ((t - tMin) / windowMs) * pw;
  const yOf = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * ph;

  // Grid and axes.
  ctx.font = '11px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace';
  ctx.lineWidth = 1;
  ctx.strokeStyle = '#2a3340';
  ctx.fillStyle = '#8b98a8';
  ctx.textBaseline = 'middle';
  ctx.textAlign = 'right';
  for (let g = 0; g <= 4; g++) {
    const y = Math.round(pad.t + (g / 4) * ph) + 0.5;
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(pad.l + pw, y); ctx.stroke();
  }
  if (visible) {
    ctx.fillText(fmtValue(max), pad.l - 6, yOf(max));
    if (max !== min) ctx.fillText(fmtValue(min), pad.l - 6, yOf(min));
  }
  const step = TICK_STEPS.find((s) => windowMs / s <= 6) ?? 600e3;
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  for (let t = Math.ceil(tMin / step) * step; t <= tMax; t += step) {
    const x = Math.round(xOf(t)) + 0.5;
    ctx.beginPath(); ctx.moveTo(x, pad.t); ctx.lineTo(x, pad.t + ph + 4); ctx.stroke();
    ctx.fillText(fmtClock(t, step < 60e3), x, pad.t + ph + 7);
  }

  // The series.
  if (visible) {
    ctx.save();
    ctx.beginPath(); ctx.rect(pad.l, pad.t - 2, pw, ph + 4); ctx.clip();
    ctx.beginPath();
    let first = true;
    for (let k = 0; k < ring.length; k++) {
      const i = ring.idx(k);
      if (ring.t[i] < tMin) continue;
      const x = xOf(ring.t[i]);
      const y = yOf(ring.v[i]);
      if (first) { ctx.moveTo(x, y); first = false; } else ctx.lineTo(x, y);
    }
    ctx.strokeStyle = series.color;
    ctx.lineWidth = 1.75;
    ctx.lineJoin = 'round';
    ctx.stroke();
    if (visible === 1) {
      const i = ring.idx(ring.length - 1);
      ctx.fillStyle = series.color;
      ctx.beginPath(); ctx.arc(xOf(ring.t[i]), yOf(ring.v[i]), 3, 0, Math.PI * 2); ctx.fill();
    }
    ctx.restore();
  } else {
    ctx.fillStyle = '#8b98a8';
    ctx.textAlign = 'center';
    ctx.textBaseline = 'middle';
    ctx.fillText('no data in this window', pad.l + pw / 2, pad.t + ph / 2);
  }

  // Gap markers: red dashed line labelled "gap".
  ctx.save();
  ctx.strokeStyle = '#f85149';
  ctx.fillStyle = '#f85149';
  ctx.lineWidth = 2;
  ctx.setLineDash([6, 4]);
  ctx.font = 'bold 11px system-ui, sans-serif';
  ctx.textBaseline = 'top';
  for (const t of markers) {
    if (t < tMin || t > tMax) continue;
    const x = Math.round(xOf(t)) + 0.5;
    ctx.beginPath(); ctx.moveTo(x, pad.t); ctx.lineTo(x, pad.t + ph); ctx.stroke();
    const nearRight = x > pad.l + pw - 30; // keep the label inside the plot, off the line
    ctx.textAlign = nearRight ? 'right' : 'left';
    ctx.fillText('gap', nearRight ? x - 5 : x + 5, pad.t + 2);
  }
  ctx.restore();
  return { min, max, visible };
}

// ---- rendering: detail -------------------------------------------------------------------------

function buildDetail(detail) {
  setAttr(ui.detail, 'data-device', detail.id);
  setText(ui.detailTitle, detail.id);
  ui.charts.replaceChildren();
  document.title = `${detail.id} · Fleet telemetry`;
}

function buildChart(name, series) {
  const value = h('span', { class: 'chart-value' });
  const range = h('span', { class: 'chart-range' });
  const canvas = h('canvas', {
    'data-testid': 'chart', 'data-metric': name, 'data-points': '0', 'data-gaps': '0',
    role: 'img', 'aria-label': `${name} over time`,
  });
  const fig = h('figure', { class: 'chart' },
    h('figcaption', {}, h('span', { class: 'chart-name', text: name }), value, range), canvas);
  return { fig, value, range, canvas };
}

function renderDetail(detail, now) {
  if (detail.seriesAdded) {
    detail.seriesAdded = false;
    const names = [...detail.series.keys()].sort();
    for (const n of names) {
      const s = detail.series.get(n);
      s.view ??= buildChart(n, s);
    }
    ui.charts.replaceChildren(...names.map((n) => detail.series.get(n).view.fig));
    detail.dirty = true;
  }
  ui.detailEmpty.hidden = detail.series.size > 0;
  const dev = state.devices.get(detail.id);
  const status = dev ? deviceStatus(dev, now) : 'offline';
  setText(ui.detailStatus, dev ? status : 'no data');
  setAttr(ui.detailStatus, 'data-status', status);
  setText(ui.detailSeen, dev?.lastSeen ? `last reading ${fmtAgo(now - dev.lastSeen)}` : '');
  ui.detailWarn.hidden = !detail.error;
  if (detail.error) setText(ui.detailWarn, `⚠ ${detail.error.text} (${fmtAgo(now - detail.error.at)})`);
  for (const btn of ui.windowButtons) setAttr(btn, 'aria-pressed', Number(btn.dataset.window) === state.windowMs);

  const redraw = detail.dirty || now - detail.lastDraw >= CHART_SLIDE_MS;
  for (const [, s] of detail.series) {
    const v = s.view;
    setAttr(v.canvas, 'data-points', s.ring.length);
    setAttr(v.canvas, 'data-gaps', detail.gapCount);
    if (!redraw) continue;
    const { min, max, visible } = drawChart(v.canvas, s, detail.markers, now, state.windowMs);
    renderValue(v.value, s.value, s.unit);
    setText(v.range, visible ? `min ${fmtValue(min)} · max ${fmtValue(max)}${s.unit ? ` ${s.unit}` : ''}` : '');
  }
  if (redraw) {
    detail.dirty = false;
    detail.lastDraw = now;
  }
}

// ---- frame loop --------------------------------------------------------------------------------

function frame() {
  const now = Date.now();
  renderView();
  renderHeader(now);
  if (state.view === 'fleet') renderFleet(now);
  else if (state.view === 'detail' && state.detail) renderDetail(state.detail, now);
  if (state.view !== 'detail' && document.title !== 'Fleet telemetry') document.title = 'Fleet telemetry';
  requestAnimationFrame(frame);
}

// ---- wiring ------------------------------------------------------------------------------------

function bindUi() {
  Object.assign(ui, {
    conn: document.querySelector('[data-testid="connection"]'),
    connLabel: document.querySelector('[data-testid="connection"] .conn-label'),
    hub: document.querySelector('[data-testid="hub-node"]'),
    rate: document.querySelector('[data-testid="rate"]'),
    gapCount: document.querySelector('[data-testid="gap-count"]'),
    recoveredCount: document.querySelector('[data-testid="recovered-count"]'),
    signout: $('signout'),
    signin: $('signin'),
    tokenInput: $('token-input'),
    authError: $('auth-error'),
    fleet: $('fleet'),
    summary: $('fleet-summary'),
    cards: $('cards'),
    detail: $('detail'),
    detailTitle: $('detail-title'),
    detailStatus: $('detail-status'),
    detailSeen: $('detail-seen'),
    detailWarn: $('detail-warn'),
    detailEmpty: $('detail-empty'),
    charts: $('charts'),
    windowButtons: [...document.querySelectorAll('[data-window]')],
  });
  ui.signin.addEventListener('submit', (e) => {
    e.preventDefault();
    const token = ui.tokenInput.value.trim();
    if (token) signIn(token);
  });
  ui.tokenInput.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); ui.signin.requestSubmit(); }
  });
  ui.signout.addEventListener('click', signOut);
  for (const btn of ui.windowButtons) {
    btn.addEventListener('click', () => {
      state.windowMs = Number(btn.dataset.window);
      if (state.detail) state.detail.dirty = true;
    });
  }
  window.addEventListener('hashchange', route);
}

function main() {
  bindUi();
  const token = initialToken();
  if (token) signIn(token);
  else route();
  requestAnimationFrame(frame);
}

main();
