// Shared helpers for the k6 scenarios against the telemetry hub (wire protocol v1,
// docs/protocol.md). Written for k6 1.1: WebSockets come from `k6/experimental/websockets`
// (`k6/websockets` does not exist in 1.1), timers from `k6/timers`.
//
// What lives here:
//   - configuration parsing (env vars, durations, tokens from AGENT_TOKENS / TOKENS_FILE);
//   - the custom metrics every scenario reports;
//   - Tracker: per-channel (epoch, offset) bookkeeping that counts gaps, duplicates and holes,
//     and records publish->deliver latency from data.sent_ms;
//   - Viewer: one viewer connection (connect, subscribe / resume with `since`, drop, close);
//   - Agent: one agent connection publishing paced readings and counting acks / errors.
// Every loop is bounded both by a count and by a deadline.

import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout, clearTimeout, setInterval, clearInterval } from 'k6/timers';
import { Counter, Trend } from 'k6/metrics';
import encoding from 'k6/encoding';

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

export const metrics = {
  // Date.now() at delivery minus data.sent_ms set by the publishing agent (integer ms; both ends
  // run in the same k6 process, so there is no clock skew). Replayed messages are not counted.
  latency: new Trend('publish_to_deliver_ms', true),
  // Every `message` frame accepted in order (replays included, duplicates excluded).
  messagesReceived: new Counter('messages_received'),
  // Offsets missing inside an epoch (the hub skipped offsets without announcing a hole), plus
  // one per message arriving in an epoch no `subscribed` announced.
  gaps: new Counter('gaps'),
  // Messages whose offset is not above the last one seen in the same epoch.
  duplicates: new Counter('duplicates'),
  // Holes announced by the hub: `subscribed` with recovered:false answering a `since`, or an
  // unasked `subscribed` on a live subscription.
  holes: new Counter('holes'),
  // Resumes (subscribe with `since`) answered with recovered:true / recovered:false.
  resumedOk: new Counter('resumed_ok'),
  resumedWithGap: new Counter('resumed_with_gap'),
  // Messages replayed after a resume (offset <= the `subscribed` answer's offset).
  replayed: new Counter('messages_replayed'),
  // Agents: acks for fresh readings, refused / duplicate-acked / never-acked publishes.
  acks: new Counter('acks'),
  publishErrors: new Counter('publish_errors'),
  publishesSent: new Counter('publishes_sent'),
  ackMs: new Trend('publish_ack_ms', true),
  // Socket errors (refused upgrades, resets) and closes we did not ask for.
  wsErrors: new Counter('ws_errors'),
  unexpectedCloses: new Counter('unexpected_closes'),
  // Frames that break the protocol as the client sees it (error frames to viewers, messages for
  // channels not subscribed, unparsable frames, overflowing hold buffers).
  protocolErrors: new Counter('protocol_errors'),
};

// Counters that never get a sample are not evaluated by thresholds in every k6 version, so a
// `count>=N` threshold could pass vacuously. Every VU adds 0 to each counter when it starts.
export function touchMetrics() {
  for (const k of Object.keys(metrics)) {
    if (metrics[k] instanceof Counter) metrics[k].add(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

export function env(name, def) {
  const v = __ENV[name];
  return v === undefined || v === '' ? def : v;
}

export function envInt(name, def) {
  const v = env(name, undefined);
  if (v === undefined) return def;
  const n = parseInt(v, 10);
  if (!Number.isFinite(n)) throw new Error(`${name}=${v} is not an integer`);
  return n;
}

export function envFloat(name, def) {
  const v = env(name, undefined);
  if (v === undefined) return def;
  const n = parseFloat(v);
  if (!Number.isFinite(n)) throw new Error(`${name}=${v} is not a number`);
  return n;
}

// "250ms", "10s", "5m", "2h", "1m30s" or a bare number of seconds -> milliseconds.
export function parseDuration(s) {
  if (typeof s === 'number') return s * 1000;
  const str = String(s).trim();
  if (/^\d+(\.\d+)?$/.test(str)) return parseFloat(str) * 1000;
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  let total = 0;
  let consumed = 0;
  let m;
  while ((m = re.exec(str)) !== null) {
    const n = parseFloat(m[1]);
    total += m[2] === 'ms' ? n : m[2] === 's' ? n * 1000 : m[2] === 'm' ? n * 60000 : n * 3600000;
    consumed += m[0].length;
  }
  if (consumed !== str.length || consumed === 0) throw new Error(`bad duration: ${s}`);
  return total;
}

export function envDurationMs(name, def) {
  return parseDuration(env(name, def));
}

// k6 duration string for options (k6 accepts "1500ms").
export function msToK6(ms) {
  return `${Math.ceil(ms)}ms`;
}

// The JWT's `sub` claim (the device id for agent tokens). No signature check: the hub does it.
export function tokenSub(token) {
  const parts = String(token).split('.');
  if (parts.length !== 3) throw new Error('token is not a JWT');
  const claims = JSON.parse(encoding.b64decode(parts[1], 'rawurl', 's'));
  if (typeof claims.sub !== 'string') throw new Error('token has no sub');
  return claims.sub;
}

// Tokens from env. Must be called in the init context (TOKENS_FILE is read with open()).
//   VIEWER_TOKEN             one viewer token shared by all viewer VUs
//   AGENT_TOKENS             comma-separated agent tokens, one per agent VU
//   TOKENS_FILE              JSON {"viewer": "<jwt>", "agents": [{"id": "..", "token": "<jwt>"} | "<jwt>", ...]}
//                            (written by tokens.sh; use an absolute path). VIEWER_TOKEN /
//                            AGENT_TOKENS override its entries.
export function loadTokens() {
  let viewer = env('VIEWER_TOKEN', '');
  let agents = [];
  const file = env('TOKENS_FILE', '');
  if (file) {
    const doc = JSON.parse(open(file));
    if (!viewer && doc.viewer) viewer = doc.viewer;
    agents = (doc.agents || []).map((a) => (typeof a === 'string' ? { token: a } : a));
  }
  const list = env('AGENT_TOKENS', '');
  if (list) {
    agents = list
      .split(',')
      .map((t) => t.trim())
      .filter((t) => t)
      .map((t) => ({ token: t }));
  }
  agents = agents.map((a) => ({ id: a.id || tokenSub(a.token), token: a.token }));
  return { viewer, agents };
}

// The common knobs, with the scenario's defaults. Call in the init context.
export function commonConfig(defaults) {
  const tokens = loadTokens();
  const cfg = {
    url: env('HUB_URL', 'ws://127.0.0.1:8080/ws'),
    viewers: envInt('VIEWERS', defaults.viewers),
    agents: envInt('AGENTS', tokens.agents.length > 0 ? Math.min(tokens.agents.length, defaults.agents) : defaults.agents),
    rate: envFloat('RATE', defaults.rate),
    durationMs: envDurationMs('DURATION', defaults.duration),
    warmupMs: envDurationMs('WARMUP', defaults.warmup || '2s'),
    drainMs: envDurationMs('DRAIN', defaults.drain || '5s'),
    connectSpreadMs: envDurationMs('CONNECT_SPREAD', defaults.connectSpread || '0ms'),
    payloadPad: envInt('PAYLOAD_PAD', 0),
    tokens,
  };
  if (!cfg.tokens.viewer && cfg.viewers > 0) throw new Error('set VIEWER_TOKEN or TOKENS_FILE');
  if (cfg.agents > cfg.tokens.agents.length) {
    throw new Error(`AGENTS=${cfg.agents} but only ${cfg.tokens.agents.length} agent tokens (AGENT_TOKENS / TOKENS_FILE)`);
  }
  if (!(cfg.rate > 0)) throw new Error('RATE must be > 0');
  return cfg;
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

export function wsUrl(base, token, clientId) {
  const sep = base.indexOf('?') >= 0 ? '&' : '?';
  let u = `${base}${sep}token=${encodeURIComponent(token)}`;
  if (clientId) u += `&client=${encodeURIComponent(clientId)}`;
  return u;
}

export function parseFrame(data) {
  if (typeof data !== 'string') {
    metrics.protocolErrors.add(1, { reason: 'binary' });
    return null;
  }
  try {
    const f = JSON.parse(data);
    if (f === null || typeof f !== 'object' || typeof f.type !== 'string') throw new Error('no type');
    return f;
  } catch (e) {
    metrics.protocolErrors.add(1, { reason: 'unparsable' });
    return null;
  }
}

// `since` is one position ({epoch, offset}) or, for a partitioned channel, {partitions: [...]}.
export function subscribeFrame(channel, since) {
  const f = { type: 'subscribe', channel };
  if (since) f.since = since;
  return JSON.stringify(f);
}

export function publishFrame(seq, data) {
  return JSON.stringify({ type: 'publish', seq, data });
}

// ---------------------------------------------------------------------------------------------
// Tracker: per-channel position, gaps, duplicates, holes, latency
// ---------------------------------------------------------------------------------------------

const MAX_HELD = 10000;

// A channel the hub splits into partitions (`subscribed` frames with `part` and `parts`) is
// tracked per partition: each is a log with its own epoch and offsets, answered by its own
// `subscribed` frame. A one-log channel is partition 0 of 1.
export class Tracker {
  // opts.onDeliver(channel, frame, live) is called for every message accepted in order.
  // opts.latency: false to skip the publish_to_deliver_ms samples (e.g. soak records its own).
  constructor(opts) {
    this.opts = opts || {};
    this.ch = {};
    this.delivered = 0;
  }

  // The subscribe frame for `channel`: with `since` when a position is known (resume).
  subscribe(channel) {
    let c = this.ch[channel];
    if (!c) {
      c = { parts: null, logs: {}, pending: null };
      this.ch[channel] = c;
    }
    for (const k in c.logs) {
      c.logs[k].held = [];
      c.logs[k].replayUntil = -1;
    }
    const since = this.position(channel);
    c.pending = { resumed: since !== null, answered: {}, count: 0, recovered: true };
    return subscribeFrame(channel, since);
  }

  // What a resume of `channel` sends as `since`, null when nothing was seen.
  position(channel) {
    const c = this.ch[channel];
    if (!c || c.parts === null) return null;
    const at = (k) => {
      const st = c.logs[k];
      return st && st.epoch !== null ? { epoch: st.epoch, offset: st.offset } : null;
    };
    if (c.parts === 1) return at(0);
    const partitions = [];
    let known = false;
    for (let k = 0; k < c.parts; k++) {
      // A partition never seen gets a position no epoch matches: answered as new.
      partitions.push(at(k) || { epoch: '', offset: 0 });
      known = known || at(k) !== null;
    }
    return known ? { partitions } : null;
  }

  log(c, part) {
    let st = c.logs[part];
    if (!st) {
      st = { epoch: null, offset: 0, replayUntil: -1, held: [] };
      c.logs[part] = st;
    }
    return st;
  }

  handle(f) {
    switch (f.type) {
      case 'subscribed':
        this.onSubscribed(f);
        return;
      case 'message':
        this.onMessage(f);
        return;
      default:
        return;
    }
  }

  onSubscribed(f) {
    const c = this.ch[f.channel];
    if (!c) {
      metrics.protocolErrors.add(1, { reason: 'subscribed_unknown_channel' });
      return;
    }
    const parts = typeof f.parts === 'number' ? f.parts : 1;
    const part = typeof f.part === 'number' ? f.part : 0;
    if (c.parts !== parts) {
      // The pool splits the channel another way now: old positions mean nothing. (On the first
      // answer the logs hold only messages that came early.)
      if (c.parts !== null) c.logs = {};
      c.parts = parts;
    }
    const st = this.log(c, part);
    const p = c.pending;
    if (p && !p.answered[part]) {
      p.answered[part] = true;
      p.count++;
      const known = st.epoch !== null;
      if (p.resumed && known && f.recovered === true) {
        // Keep the `since` position: the replay starts right after it and ends at f.offset.
        st.replayUntil = f.epoch === st.epoch ? f.offset : -1;
      } else {
        if (p.resumed && known) {
          metrics.holes.add(1);
          p.recovered = false;
        } else if (p.resumed) {
          p.recovered = false; // a partition this client never had: new, not a hole
        }
        st.epoch = f.epoch;
        st.offset = f.offset;
      }
      if (p.count === parts) {
        c.pending = null;
        if (p.resumed) (p.recovered ? metrics.resumedOk : metrics.resumedWithGap).add(1);
      }
      const held = st.held;
      st.held = [];
      for (let i = 0; i < held.length; i++) this.judge(st, held[i]);
    } else {
      // Unasked `subscribed`: always recovered:false, a hole; continue from its offset.
      metrics.holes.add(1);
      st.epoch = f.epoch;
      st.offset = f.offset;
      st.replayUntil = -1;
    }
  }

  onMessage(f) {
    const c = this.ch[f.channel];
    if (!c) {
      metrics.protocolErrors.add(1, { reason: 'message_unknown_channel' });
      return;
    }
    const part = typeof f.part === 'number' ? f.part : 0;
    const st = this.log(c, part);
    if (c.pending && !c.pending.answered[part]) {
      if (st.held.length < MAX_HELD) st.held.push(f);
      else metrics.protocolErrors.add(1, { reason: 'held_overflow' });
      return;
    }
    this.judge(st, f);
  }

  judge(st, f) {
    if (f.epoch !== st.epoch) {
      // An epoch no `subscribed` announced: the hub lost history silently.
      metrics.gaps.add(1);
      st.epoch = f.epoch;
      st.replayUntil = -1;
    } else if (f.offset <= st.offset) {
      metrics.duplicates.add(1);
      return;
    } else if (f.offset > st.offset + 1) {
      metrics.gaps.add(f.offset - st.offset - 1);
    }
    st.offset = f.offset;
    this.delivered++;
    metrics.messagesReceived.add(1);
    const live = !(st.replayUntil >= 0 && f.offset <= st.replayUntil);
    if (!live) metrics.replayed.add(1);
    if (st.replayUntil >= 0 && f.offset >= st.replayUntil) st.replayUntil = -1;
    if (live && this.opts.latency !== false && f.data && typeof f.data.sent_ms === 'number') {
      metrics.latency.add(Date.now() - f.data.sent_ms);
    }
    if (this.opts.onDeliver) this.opts.onDeliver(f.channel, f, live);
  }
}

// ---------------------------------------------------------------------------------------------
// Viewer
// ---------------------------------------------------------------------------------------------

// One viewer. connect() opens the socket and (re)subscribes every channel once `hello` arrives,
// resuming with `since` where the tracker knows a position. drop() closes on purpose (the
// tracker keeps its positions for the next connect()); close() ends it for good.
export class Viewer {
  constructor(opts) {
    this.url = opts.url;
    this.token = opts.token;
    this.channels = opts.channels;
    this.clientId = opts.clientId;
    this.tracker = opts.tracker || new Tracker(opts.trackerOpts);
    this.onHello = opts.onHello;
    this.onClose = opts.onClose;
    this.ws = null;
    this.closing = false;
    this.connects = 0;
  }

  connect() {
    this.closing = false;
    this.connects++;
    const ws = new WebSocket(wsUrl(this.url, this.token, this.clientId));
    this.ws = ws;
    ws.onmessage = (e) => {
      const f = parseFrame(e.data);
      if (!f) return;
      if (f.type === 'hello') {
        for (const c of this.channels) ws.send(this.tracker.subscribe(c));
        if (this.onHello) this.onHello(f);
      } else if (f.type === 'message' || f.type === 'subscribed') {
        this.tracker.handle(f);
      } else if (f.type === 'error') {
        metrics.protocolErrors.add(1, { reason: `error_${f.code}` });
        console.warn(`viewer ${this.clientId}: error frame ${e.data}`);
      }
    };
    ws.onerror = (e) => {
      metrics.wsErrors.add(1);
      console.warn(`viewer ${this.clientId}: ws error: ${e && e.error}`);
    };
    ws.onclose = () => {
      if (this.ws === ws && !this.closing) {
        metrics.unexpectedCloses.add(1);
        console.warn(`viewer ${this.clientId}: connection closed unexpectedly`);
      }
      if (this.onClose) this.onClose(ws);
    };
  }

  drop() {
    this.closing = true;
    if (this.ws) this.ws.close();
  }

  close() {
    this.drop();
  }
}

// ---------------------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------------------

// One agent. start() connects, waits for `hello`, continues its seq at last_seq + 1 (so reruns
// with the same token never publish duplicates), then publishes `count` readings paced at `rate`
// per second (tick of at most 100 ms, burst-free catch-up). It closes once every reading is
// acked or refused, or at the deadline (sendWindowMs + drainMs after start), counting what is
// still unacked as publish_errors.
export class Agent {
  constructor(opts) {
    this.url = opts.url;
    this.token = opts.token;
    this.id = opts.id;
    this.rate = opts.rate;
    this.count = opts.count;
    this.sendWindowMs = opts.sendWindowMs;
    this.drainMs = opts.drainMs;
    this.pad = opts.payloadPad > 0 ? 'x'.repeat(opts.payloadPad) : null;
    this.onDone = opts.onDone;
    this.sent = 0;
    this.acked = 0;
    this.failed = 0;
    this.inflight = new Map(); // seq -> sent_ms
    this.timers = [];
    this.done = false;
  }

  start() {
    const startedAt = Date.now();
    const ws = new WebSocket(wsUrl(this.url, this.token, `k6-agent-${this.id}`));
    this.ws = ws;
    this.timers.push(setTimeout(() => this.finish('deadline'), this.sendWindowMs + this.drainMs));
    ws.onmessage = (e) => {
      const f = parseFrame(e.data);
      if (!f) return;
      if (f.type === 'hello') {
        this.nextSeq = (typeof f.last_seq === 'number' ? f.last_seq : 0) + 1;
        this.pace(startedAt);
      } else if (f.type === 'ack') {
        this.onAck(f);
      } else if (f.type === 'error') {
        if (typeof f.seq === 'number' && this.inflight.has(f.seq)) {
          this.inflight.delete(f.seq);
          this.failed++;
          metrics.publishErrors.add(1, { code: String(f.code) });
        } else {
          metrics.protocolErrors.add(1, { reason: `error_${f.code}` });
        }
        console.warn(`agent ${this.id}: error frame ${e.data}`);
        this.maybeFinish();
      }
    };
    ws.onerror = (e) => {
      metrics.wsErrors.add(1);
      console.warn(`agent ${this.id}: ws error: ${e && e.error}`);
    };
    ws.onclose = () => {
      if (!this.done) {
        metrics.unexpectedCloses.add(1);
        console.warn(`agent ${this.id}: connection closed unexpectedly`);
        this.finish('closed');
      }
    };
  }

  pace(startedAt) {
    const t0 = Date.now();
    const sendUntil = startedAt + this.sendWindowMs;
    const tickMs = Math.max(1, Math.min(100, Math.floor(1000 / this.rate)));
    const tick = () => {
      if (this.done) return;
      const now = Date.now();
      const due = Math.min(this.count, Math.floor(((now - t0) * this.rate) / 1000) + 1);
      while (this.sent < due) this.publishOne();
      if (this.sent >= this.count || now >= sendUntil) {
        clearInterval(this.interval);
        this.interval = null;
        this.maybeFinish();
      }
    };
    this.interval = setInterval(tick, tickMs);
    tick();
  }

  publishOne() {
    const seq = this.nextSeq++;
    this.sent++;
    const sentMs = Date.now();
    const data = { temp_c: 20 + (this.sent % 100) / 10, n: this.sent, sent_ms: sentMs };
    if (this.pad) data.pad = this.pad;
    this.inflight.set(seq, sentMs);
    this.ws.send(publishFrame(seq, data));
    metrics.publishesSent.add(1);
  }

  onAck(f) {
    const sentMs = this.inflight.get(f.seq);
    if (sentMs === undefined) {
      metrics.protocolErrors.add(1, { reason: 'unexpected_ack' });
      return;
    }
    this.inflight.delete(f.seq);
    if (f.duplicate === true) {
      // Not published again: a seq reuse, which this generator never does on purpose.
      this.failed++;
      metrics.publishErrors.add(1, { code: 'duplicate_ack' });
    } else {
      this.acked++;
      metrics.acks.add(1);
      metrics.ackMs.add(Date.now() - sentMs);
    }
    this.maybeFinish();
  }

  maybeFinish() {
    if (this.interval === null && this.inflight.size === 0) this.finish('complete');
  }

  finish(reason) {
    if (this.done) return;
    this.done = true;
    if (this.interval) clearInterval(this.interval);
    for (const t of this.timers) clearTimeout(t);
    if (this.inflight.size > 0) {
      metrics.publishErrors.add(this.inflight.size, { code: 'unacked' });
      console.warn(`agent ${this.id}: ${this.inflight.size} publishes unacked (${reason})`);
    }
    if (this.sent < this.count) {
      console.warn(`agent ${this.id}: sent ${this.sent}/${this.count} readings (${reason})`);
    }
    if (this.ws) this.ws.close();
    if (this.onDone) this.onDone(this);
  }
}

// ---------------------------------------------------------------------------------------------
// Scenario plumbing
// ---------------------------------------------------------------------------------------------

// Readings each agent publishes: RATE * DURATION (at least 1), or an explicit READINGS.
export function readingsPerAgent(cfg) {
  return envInt('READINGS', Math.max(1, Math.round((cfg.rate * cfg.durationMs) / 1000)));
}

// Channels for viewer `i`: everyone follows `fleet`; every DEVICE_VIEWER_EVERY-th viewer
// (default 4th; 0 = none) also follows `devices.<id>` of agent i % AGENTS.
export function viewerChannels(cfg, i, every) {
  const chans = ['fleet'];
  if (every > 0 && cfg.agents > 0 && i % every === every - 1) {
    chans.push(`devices.${cfg.tokens.agents[i % cfg.agents].id}`);
  }
  return chans;
}

export function expectedMessages(cfg, every, perAgent) {
  let total = 0;
  for (let i = 0; i < cfg.viewers; i++) {
    total += viewerChannels(cfg, i, every).length === 2 ? cfg.agents * perAgent + perAgent : cfg.agents * perAgent;
  }
  return total;
}

/** When each side of a viewers-and-agents run starts and stops, in ms from the test's start:
 * agents start once every viewer has connected and warmed up, send for the duration (plus 10 %
 * and a second of slack), and viewers stay until the drain after that. */
export function timeline(cfg) {
  const sendWindowMs = Math.round(cfg.durationMs * 1.1 + 1000);
  const agentStartMs = cfg.connectSpreadMs + cfg.warmupMs;
  return { sendWindowMs, agentStartMs, viewerEndMs: agentStartMs + sendWindowMs + cfg.drainMs };
}

/** The viewers and agents scenarios every multi-VU script runs: one iteration per VU; agents
 * start at `agentStartMs`, viewers stay until `viewerEndMs`. */
export function viewerAndAgentScenarios(cfg, { viewerEndMs, agentStartMs, sendWindowMs }) {
  return {
    viewers: {
      executor: 'per-vu-iterations', exec: 'viewer', vus: cfg.viewers, iterations: 1,
      maxDuration: msToK6(viewerEndMs + 10000),
    },
    agents: {
      executor: 'per-vu-iterations', exec: 'agent', vus: cfg.agents, iterations: 1,
      startTime: msToK6(agentStartMs), maxDuration: msToK6(sendWindowMs + cfg.drainMs + 10000),
    },
  };
}

/** Thresholds of exactly-once delivery: no gap, duplicate, hole, refused publish or broken
 * socket, every publish acked and every expected message received. */
export function exactlyOnceThresholds({ acks, messages }) {
  return {
    gaps: ['count==0'],
    duplicates: ['count==0'],
    holes: ['count==0'],
    publish_errors: ['count==0'],
    acks: [`count>=${acks}`],
    messages_received: [`count>=${messages}`],
    ws_errors: ['count==0'],
    unexpected_closes: ['count==0'],
    protocol_errors: ['count==0'],
  };
}

// Deterministic jitter in [0, maxMs) per VU (a k6 VU has no seeded RNG).
export function spread(i, maxMs) {
  if (!(maxMs > 0)) return 0;
  return Math.floor(((i * 2654435761) % 4294967296) / 4294967296 * maxMs);
}

export { setTimeout, clearTimeout, setInterval, clearInterval };

// Runs one viewer VU: waits `delayMs`, connects, follows `channels`, and closes once it has
// `expected` messages or at `deadline` (epoch ms), whichever comes first.
export function followUntil({ url, token, channels, clientId, expected, delayMs, deadline, trackerOpts, onDeliver, onEnd }) {
  touchMetrics();
  let viewer = null;
  let deadlineTimer = null;
  let ended = false;
  const end = () => {
    if (ended) return;
    ended = true;
    clearTimeout(deadlineTimer);
    if (tracker.delivered < expected) {
      console.warn(`viewer ${clientId}: ${tracker.delivered}/${expected} messages by the deadline`);
    }
    if (onEnd) onEnd(tracker);
    if (viewer) viewer.close();
  };
  const tracker = new Tracker(
    Object.assign({}, trackerOpts, {
      onDeliver: (channel, f, live) => {
        if (onDeliver) onDeliver(channel, f, live);
        if (tracker.delivered >= expected) end();
      },
    }),
  );
  const start = () => {
    if (ended) return;
    viewer = new Viewer({ url, token, channels, clientId, tracker });
    viewer.connect();
  };
  deadlineTimer = setTimeout(end, Math.max(0, deadline - Date.now()));
  if (delayMs > 0) setTimeout(start, delayMs);
  else start();
}

// Runs one agent VU and returns its Agent.
export function publishFor({ cfg, index, count }) {
  touchMetrics();
  const a = cfg.tokens.agents[index];
  const agent = new Agent({
    url: cfg.url,
    token: a.token,
    id: a.id,
    rate: cfg.rate,
    count,
    sendWindowMs: Math.round(cfg.durationMs * 1.1 + 1000),
    drainMs: cfg.drainMs,
    payloadPad: cfg.payloadPad,
  });
  agent.start();
  return agent;
}
