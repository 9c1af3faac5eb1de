/**
 * fleet-client.js — reference JavaScript client for the hub's viewer WebSocket (wire protocol v1).
 *
 * Standalone ES module: no DOM access, no dependencies. Works in browsers and in Node 22+
 * (or any runtime with a global `WebSocket`; pass `WebSocket`/`fetch` in the options otherwise).
 *
 * @example
 *   import { FleetClient } from '/fleet-client.js';
 *   const client = new FleetClient({ token, clientId: 'wallboard-1' });
 *   client.on('state', ({ state, hub, retryInMs, reason }) => render(state));
 *   client.on('message', (channel, data, { epoch, offset, from }) => append(data));
 *   client.on('gap', (channel, { epoch, offset, missedFrom }) => markHole(channel));
 *   client.on('recovered', (channel, { replayed }) => {});
 *   client.on('snapshot', (channel, items, { more, truncated }) => items.forEach(show));
 *   client.subscribe('devices.pi-01');                       // exact, resumed with `since`
 *   client.subscribe('fleet', { snapshot: true, maxRate: 2 }); // complete at once, conflated
 *   client.subscribe('presence', { snapshot: true });         // who is online, and why not
 *   // later: client.unsubscribe('fleet'); client.close();
 *
 * Behaviour
 * - Connects to `url` (default: same-origin `/ws`, `wss:` on https pages) with `?token=&client=`.
 * - Before the first connection and after each failed one (socket closed before `hello`, or close
 *   4001) it validates the token with a plain `GET /ws?token=…`: 401/403 means refused (state
 *   `auth_refused`, `reason` = the hub's `message`, no more retries); 426 means the token is fine.
 * - Follows the protocol's reconnect table (`CLOSE_RETRY`, docs/protocol.md "Close codes"):
 *   `soon` (1012, hub restart; also a `draining` refusal) retries within 0-1 s; `backoff`
 *   reconnects with exponential backoff and full jitter (base 500 ms, cap 30 s; the attempt
 *   counter resets after a connection that lived 10 s), as does any code not in the table;
 *   `new_token` (4001, 4004) checks the token and stops unless it is still good; `never` (the hub
 *   closed for something this client sent) stops in state `closed`.
 * - Keeps the last `(epoch, offset)` of every channel from each `subscribed`/`message` frame and
 *   resubscribes every channel with `since` after a reconnect, so the hub replays what was missed.
 *   A channel the hub splits into partitions (`subscribed` frames with `part` and `parts`: `fleet`
 *   and `groups.*` on a Redis Cluster) is tracked per partition, and resumed with
 *   `since: {partitions: [...]}`; its subscription is complete once every partition answered.
 * - Never delivers a message twice or out of order: in one epoch of one partition, offsets <= the
 *   last seen are dropped. Messages arriving before their partition's `subscribed` are held.
 * - Reports holes the hub could not fill as `gap` events: `subscribed` with `recovered: false`
 *   answering a resume or a snapshot subscribe (`{snapshot: true}` in the event: the snapshot is
 *   good, readings between it and the live stream are missing), an unasked `subscribed` on a
 *   live subscription, or an epoch change.
 * - A channel subscribed with `{snapshot: true}` asks for a snapshot on every (re)subscribe
 *   instead of a resume with `since`: each `snapshot` frame is a `snapshot` event, and the live
 *   messages go on from the snapshot's offset. With `{maxRate}` the hub conflates the channel
 *   (each device's latest value at most that many times a second); offsets then skip by
 *   design, which is not a gap.
 *
 * Events (`on(event, fn)` returns a function that removes the listener):
 * - `state`     ({state, hub, retryInMs, retryAt, reason, code}) — state is one of
 *               'connecting' | 'connected' | 'reconnecting' | 'auth_refused' | 'closed'.
 *               `retryAt` is a Date.now() timestamp (reconnecting only), `code` the close code or
 *               the hub's refusal `error` (e.g. 'expired').
 * - `message`   (channel, data, {epoch, offset, from, part})
 * - `gap`       (channel, {epoch, offset, missedFrom, previousEpoch, unsolicited, part}) — messages
 *               from `missedFrom` (in `previousEpoch`) up to `offset` (in `epoch`) of partition
 *               `part` are lost; live messages continue from `offset + 1`. `missedFrom` is null
 *               when unknown. `part` is absent for a channel that is one log.
 * - `refreshed` ({expiresAt}) — the hub took the token of `refresh()` (or of `getToken`, asked
 *   for when 80 % of the time left on the token has passed): the connection now lives to
 *   `expiresAt` (seconds), and later connections use that token.
 * - `recovered` (channel, {replayed, epoch, offset} or {replayed, parts}) — a resume the hub fully
 *               replayed, every partition of it.
 * - `snapshot`  (channel, items, {epoch, offset, part, more, truncated}) — items are
 *               {data, from, epoch, offset}, each device's latest message as of `offset`;
 *               `more` says another frame of the same snapshot follows.
 * - `error`     (frame) — an `error` frame from the hub (frame.channel is set for a refused
 *               subscribe). A subscribe refused as `unavailable` or `rate_limited` is asked for
 *               again 0.5-1.5 s later; one refused for good is dropped from the channel list.
 *
 * Properties: `state`, `hub`, `expiresAt` (token exp, seconds), `channels` (Map snapshot
 * channel → {epoch, offset} | {partitions: [{epoch, offset} | null]} | null), `stats` →
 * {messages, messagesPerSecond, dropped}.
 */

/**
 * What to do after each close code the hub sends: the protocol's one reconnect table
 * (`CloseCode::retry` in hub-protocol; a Rust test holds this copy to it). Other codes: 'backoff'.
 */
export const CLOSE_RETRY = Object.freeze({
  1000: 'backoff',
  1002: 'never',
  1003: 'never',
  1007: 'never',
  1008: 'never',
  1009: 'never',
  1011: 'backoff',
  1012: 'soon',
  1013: 'backoff',
  4001: 'new_token',
  4002: 'backoff',
  4003: 'never',
  4004: 'new_token',
  4008: 'backoff',
  4029: 'backoff',
});

/** The advice for a close code: one of 'soon' | 'backoff' | 'new_token' | 'never'. */
export function retryAfterClose(code) {
  return CLOSE_RETRY[code] ?? 'backoff';
}

/** Backoff parameters (milliseconds). */
export const BACKOFF = Object.freeze({ baseMs: 500, capMs: 30_000, stableMs: 10_000, restartJitterMs: 1000 });

/** How long to wait for `hello` after starting a connection before giving up on it. */
const HELLO_TIMEOUT_MS = 15_000;
/** The longest delay a timer takes (2^31 - 1 ms, about 24.8 days). */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** Messages held per channel while its `subscribed` answer is outstanding. */
const EARLY_CAP = 10_000;
/** Rate window: 8 buckets of 250 ms. */
const RATE_BUCKETS = 8;
const RATE_BUCKET_MS = 250;

/**
 * Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^attempt)).
 * @param {number} attempt 0 for the first retry
 * @param {() => number} [random]
 * @returns {number} delay in ms
 */
export function backoffDelay(attempt, random = Math.random, { baseMs, capMs } = BACKOFF) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** Same-origin `/ws` URL, `wss:` when the page is served over https. */
function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error('FleetClient: no `url` given and no `location` to derive it from');
  return `${loc.protocol === 'https:' ? 'wss:' : 'ws:'}//${loc.host}/ws`;
}

function randomId() {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID();
  return `c-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

export class FleetClient {
  /** @type {Map<string, Set<Function>>} */
  #listeners = new Map();
  #opts;
  #ws = null;
  #state = 'closed';
  #hub = null;
  #expiresAt = null;
  #attempt = 0;
  #gen = 0; // bumps on every connection / close, so late async results are ignored
  #retryTimer = null;
  #helloTimer = null;
  #refreshTimer = null;
  #offeredToken = null;
  #openedAt = 0;
  #gotHello = false;
  #stopped = true;
  #userClosed = false;
  /**
   * channel → {parts: number | null, logs: Map<part, {pos, early}>, waiting: null | {...}}: one
   * log (part 0) for a one-log channel, one per partition otherwise; `waiting` while a subscribe
   * is answered partition by partition (see #sendSubscribe).
   */
  #channels = new Map();
  #messages = 0;
  #dropped = 0;
  #rateIds = new Float64Array(RATE_BUCKETS).fill(-1);
  #rateCounts = new Uint32Array(RATE_BUCKETS);

  /**
   * @param {object} opts
   * @param {string} opts.token viewer JWT
   * @param {string} [opts.url] WebSocket URL; default same-origin `/ws`
   * @param {string} [opts.clientId] sent as `client` query parameter; default a random id
   * @param {boolean} [opts.autoConnect=true] connect on the next microtask (listeners attached
   *   right after construction see every state change); otherwise call `connect()`
   * @param {() => Promise<string>} [opts.getToken] a fresh token for the same viewer, asked for
   *   when 80 % of the time its token had left at `hello` has passed and sent in a `refresh`: the
   *   connection lives on instead of closing at expiry (4001) and reconnecting
   * @param {typeof WebSocket} [opts.WebSocket] WebSocket implementation (tests, old runtimes)
   * @param {typeof fetch} [opts.fetch] fetch implementation, for the token check
   * @param {() => number} [opts.random] jitter source in [0, 1)
   * @param {() => number} [opts.now] clock in ms
   * @param {Function} [opts.setTimeout] timer functions (tests)
   * @param {Function} [opts.clearTimeout]
   */
  constructor({ token, url, clientId, autoConnect = true, ...hooks } = {}) {
    this.#opts = {
      token: token ?? '',
      getToken: hooks.getToken ?? null,
      url: url ?? defaultUrl(),
      clientId: clientId ?? randomId(),
      WebSocket: hooks.WebSocket ?? globalThis.WebSocket,
      fetch: hooks.fetch ?? globalThis.fetch?.bind(globalThis),
      random: hooks.random ?? Math.random,
      now: hooks.now ?? Date.now,
      setTimeout: hooks.setTimeout ?? globalThis.setTimeout.bind(globalThis),
      clearTimeout: hooks.clearTimeout ?? globalThis.clearTimeout.bind(globalThis),
    };
    if (autoConnect) queueMicrotask(() => !this.#userClosed && this.connect());
  }

  // ---- public API ---------------------------------------------------------------------------

  /**
   * Adds a listener; returns a function that removes it.
   * @param {'state'|'message'|'gap'|'recovered'|'snapshot'|'refreshed'|'error'} event
   * @param {Function} fn
   */
  on(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.#listeners.get(event)?.delete(fn);
  }

  /** Starts (or restarts after `close()`) connecting. Idempotent while running. */
  connect() {
    if (!this.#stopped) return;
    this.#stopped = false;
    this.#userClosed = false;
    this.#attempt = 0;
    this.#start(true);
  }

  /**
   * Subscribes a channel (idempotent). Sent now if connected, else on the next connection.
   * @param {string} channel e.g. 'fleet' or 'devices.pi-01'
   * @param {object} [opts]
   * @param {boolean} [opts.snapshot] start (and restart after each reconnect) with a snapshot
   * @param {number} [opts.maxRate] conflate: each device's latest message at most this many
   *   times a second (1/60 to 100)
   */
  subscribe(channel, { snapshot = false, maxRate } = {}) {
    if (this.#channels.has(channel)) return;
    const mode = { snapshot: Boolean(snapshot), maxRate: maxRate ?? null };
    this.#channels.set(channel, { parts: null, logs: new Map(), waiting: null, mode });
    if (this.#gotHello) this.#sendSubscribe(channel);
  }

  /** Unsubscribes and forgets the channel's position (a later subscribe starts live). */
  unsubscribe(channel) {
    if (!this.#channels.delete(channel)) return;
    if (this.#gotHello) this.#send({ type: 'unsubscribe', channel });
  }

  /**
   * Gives the open connection a new token of the same viewer (`refresh`), and uses it for every
   * later connection. The hub answers with a `refreshed` event ({expiresAt}) or an `error`
   * event (`bad_token`, `forbidden`), and then the connection keeps its old token's expiry.
   * @param {string} token
   */
  refresh(token) {
    if (!this.#gotHello) {
      this.#opts.token = token; // the next connection's
      return;
    }
    // Taken as this client's token once the hub says so: one it refuses (another identity)
    // must not become the token of every later connection.
    this.#offeredToken = token;
    this.#send({ type: 'refresh', token, ref: 'refresh' });
  }

  /** Closes for good (until `connect()`); state becomes 'closed'. */
  close() {
    this.#stopped = true;
    this.#userClosed = true;
    this.#gen++;
    this.#clearTimers();
    const ws = this.#ws;
    this.#ws = null;
    this.#gotHello = false;
    if (ws) {
      try { ws.close(1000, 'client closed'); } catch { /* already closing */ }
    }
    this.#setState('closed');
  }

  get state() { return this.#state; }
  get hub() { return this.#hub; }
  get expiresAt() { return this.#expiresAt; }

  /**
   * Snapshot: channel → last {epoch, offset} seen, or {partitions: [...]} (each {epoch, offset}
   * or null) for a partitioned channel, or null before the first answer.
   */
  get channels() {
    const snapshot = (ch) => {
      if (ch.parts === null) return null;
      const pos = (k) => { const p = ch.logs.get(k)?.pos; return p ? { ...p } : null; };
      if (ch.parts === 1) return pos(0);
      return { partitions: Array.from({ length: ch.parts }, (_, k) => pos(k)) };
    };
    return new Map([...this.#channels].map(([name, ch]) => [name, snapshot(ch)]));
  }

  /** Delivered messages, messages per second over the last ~2 s, duplicates dropped. */
  get stats() {
    return { messages: this.#messages, messagesPerSecond: this.#rate(), dropped: this.#dropped };
  }

  // ---- connection lifecycle ----------------------------------------------------------------

  /** Validates the token first when asked to, then opens a socket. */
  async #start(checkFirst) {
    const gen = ++this.#gen;
    this.#setState('connecting');
    if (!this.#opts.token) return this.#refuse({ reason: 'no token', code: 'missing' });
    if (checkFirst) {
      const verdict = await this.#checkToken();
      if (gen !== this.#gen) return;
      if (verdict.refused) return this.#refuse(verdict);
    }
    this.#open();
  }

  #open() {
    const gen = ++this.#gen;
    const { url, token, clientId, WebSocket: WS } = this.#opts;
    const full = new URL(url);
    full.searchParams.set('token', token);
    full.searchParams.set('client', clientId);
    this.#gotHello = false;
    this.#openedAt = this.#opts.now();
    if (this.#state !== 'connecting') this.#setState('connecting');
    let ws;
    try {
      ws = new WS(full.toString());
    } catch (err) {
      return this.#scheduleRetry({ code: null, reason: String(err?.message ?? err) });
    }
    this.#ws = ws;
    ws.onmessage = (ev) => gen === this.#gen && this.#onFrame(ev.data);
    ws.onclose = (ev) => gen === this.#gen && this.#onClose(ev);
    ws.onerror = () => {}; // a close event always follows
    this.#helloTimer = this.#opts.setTimeout(() => {
      if (gen !== this.#gen) return;
      try { ws.close(4000, 'hello timeout'); } catch { /* ignore */ }
      this.#onClose({ code: 4000, reason: 'no hello from hub' });
    }, HELLO_TIMEOUT_MS);
  }

  async #onClose({ code, reason }) {
    const gen = ++this.#gen; // ignore anything else from the dead socket
    this.#clearTimers();
    const hadHello = this.#gotHello;
    this.#gotHello = false;
    this.#ws = null;
    if (this.#stopped) return;
    if (hadHello && this.#opts.now() - this.#openedAt >= BACKOFF.stableMs) this.#attempt = 0;
    // Subscriptions die with the socket; positions stay for the resume.
    for (const ch of this.#channels.values()) forget(ch);

    const why = { code, reason: reason || closeReason(code) };
    const retry = retryAfterClose(code);
    if (retry === 'soon') return this.#scheduleRetry(why, true);
    if (retry === 'never') return this.#stop(why);
    if (!hadHello || retry === 'new_token') {
      this.#setState('connecting', why);
      const verdict = await this.#checkToken();
      if (gen !== this.#gen || this.#stopped) return;
      if (verdict.refused) return this.#refuse(verdict);
      if (retry === 'new_token' && verdict.status !== 426) {
        return this.#refuse({ reason: 'token has expired', code: 'expired' });
      }
      if (verdict.error === 'draining') return this.#scheduleRetry({ code, reason: 'hub draining' }, true);
      if (verdict.reason && !hadHello) why.reason = verdict.reason;
    }
    this.#scheduleRetry(why);
  }

  #scheduleRetry(why, fast = false) {
    const { random, now } = this.#opts;
    const delay = fast
      ? Math.floor(random() * BACKOFF.restartJitterMs)
      : backoffDelay(this.#attempt++, random);
    const gen = this.#gen;
    this.#setState('reconnecting', { ...why, retryInMs: delay, retryAt: now() + delay });
    this.#retryTimer = this.#opts.setTimeout(() => {
      this.#retryTimer = null;
      if (gen === this.#gen && !this.#stopped) this.#open();
    }, delay);
  }

  #refuse({ reason, code, status }) {
    this.#stopped = true;
    this.#gen++;
    this.#clearTimers();
    this.#setState('auth_refused', { reason, code, status });
  }

  /** Stops after a close that reconnecting would only repeat; `connect()` starts again. */
  #stop(why) {
    this.#stopped = true;
    this.#gen++;
    this.#clearTimers();
    this.#setState('closed', why);
  }

  /**
   * Plain GET on the WebSocket URL: the hub answers 401/403 with JSON for a refused token and
   * 426 for a good one. Network failures and other statuses are "not refused".
   * @returns {Promise<{refused: boolean, status?: number, error?: string, reason?: string}>}
   */
  async #checkToken() {
    const { fetch: doFetch, url, token } = this.#opts;
    if (!doFetch) return { refused: false };
    const http = new URL(url);
    http.protocol = http.protocol === 'wss:' ? 'https:' : 'http:';
    http.searchParams.set('token', token);
    try {
      const res = await doFetch(http.toString(), { cache: 'no-store', credentials: 'omit' });
      let body = null;
      try { body = await res.json(); } catch { /* not JSON */ }
      const error = body?.error;
      const reason = body?.message ?? error ?? `HTTP ${res.status}`;
      return { refused: res.status === 401 || res.status === 403, status: res.status, error, reason, code: error };
    } catch {
      return { refused: false, reason: 'hub unreachable' };
    }
  }

  #clearTimers() {
    if (this.#retryTimer) this.#opts.clearTimeout(this.#retryTimer);
    if (this.#helloTimer) this.#opts.clearTimeout(this.#helloTimer);
    if (this.#refreshTimer) this.#opts.clearTimeout(this.#refreshTimer);
    this.#retryTimer = this.#helloTimer = this.#refreshTimer = null;
  }

  /** With `getToken`: asks for a new token at 80 % of what is left of this one, and refreshes. */
  #scheduleRefresh() {
    if (this.#refreshTimer) this.#opts.clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    const { getToken } = this.#opts;
    if (!getToken || !this.#expiresAt) return;
    const left = this.#expiresAt * 1000 - this.#opts.now();
    const gen = this.#gen;
    const delay = Math.max(1000, Math.floor(left * 0.8));
    if (delay > MAX_TIMER_MS) {
      // Timers take 32-bit delays (longer ones fire at once): wait in steps.
      this.#refreshTimer = this.#opts.setTimeout(() => {
        this.#refreshTimer = null;
        if (gen === this.#gen) this.#scheduleRefresh();
      }, MAX_TIMER_MS);
      return;
    }
    this.#refreshTimer = this.#opts.setTimeout(async () => {
      this.#refreshTimer = null;
      let token;
      try { token = await getToken(); } catch { return; } // the 4001 path takes over
      if (gen === this.#gen && typeof token === 'string' && token) this.refresh(token);
    }, delay);
  }

  // ---- frames -------------------------------------------------------------------------------

  #onFrame(text) {
    let frame;
    try { frame = JSON.parse(text); } catch { return; }
    if (!frame || typeof frame !== 'object') return;
    switch (frame.type) {
      case 'hello': return this.#onHello(frame);
      case 'subscribed': return this.#onSubscribed(frame);
      case 'message': return this.#onMessage(frame);
      case 'snapshot': return this.#onSnapshot(frame);
      case 'error': return this.#onError(frame);
      case 'refreshed': return this.#onRefreshed(frame);
      default: return undefined; // 'unsubscribed' and future frame types need nothing
    }
  }

  #onHello(frame) {
    if (this.#helloTimer) this.#opts.clearTimeout(this.#helloTimer);
    this.#helloTimer = null;
    this.#gotHello = true;
    this.#openedAt = this.#opts.now(); // "lived 10 s" counts from a working connection
    this.#hub = frame.hub ?? null;
    this.#expiresAt = frame.expires_at ?? null;
    this.#setState('connected');
    for (const name of this.#channels.keys()) this.#sendSubscribe(name);
    this.#scheduleRefresh();
  }

  #onRefreshed(frame) {
    if (this.#offeredToken) this.#opts.token = this.#offeredToken;
    this.#offeredToken = null;
    this.#expiresAt = frame.expires_at ?? this.#expiresAt;
    this.#emit('refreshed', { expiresAt: this.#expiresAt });
    this.#scheduleRefresh();
  }

  /**
   * Asks for the channel with `since` from what was seen. `waiting` notes, per partition, what
   * each answer resumes: `since.get(part)` a position, null for a log never seen (fresh).
   */
  #sendSubscribe(name) {
    const ch = this.#channels.get(name);
    const frame = { type: 'subscribe', channel: name, ref: `sub:${name}` };
    if (ch.mode.snapshot) frame.snapshot = true;
    if (ch.mode.maxRate !== null) frame.max_rate = ch.mode.maxRate;
    // A snapshot (or a conflated stream) starts over instead of resuming: no `since`.
    const resumes = !ch.mode.snapshot && ch.mode.maxRate === null;
    const since = resumes
      ? new Map([...ch.logs].map(([part, log]) => [part, log.pos && { ...log.pos }]))
      : new Map();
    if (!resumes) ch.logs = new Map();
    if (ch.parts === 1 && since.get(0)) {
      frame.since = since.get(0);
    } else if (ch.parts > 1 && [...since.values()].some(Boolean)) {
      // A partition never seen gets a position no epoch matches: answered as new.
      const at = (k) => since.get(k) ?? { epoch: '', offset: 0 };
      frame.since = { partitions: Array.from({ length: ch.parts }, (_, k) => at(k)) };
    }
    ch.waiting = { answered: new Set(), since, resumed: Boolean(frame.since), replayed: 0, recovered: true };
    for (const log of ch.logs.values()) log.early = [];
    this.#send(frame);
  }

  #onSubscribed(frame) {
    const name = frame.channel;
    const ch = this.#channels.get(name);
    if (!ch) return; // unsubscribed meanwhile
    const parts = Number(frame.parts ?? 1);
    const part = Number(frame.part ?? 0);
    const w = ch.waiting;
    if (ch.parts !== parts) {
      // The first answer, or the pool now splits the channel another way: the old logs' positions
      // mean nothing here, and what they had not delivered yet is a hole.
      // (On the first answer the logs hold only messages that came early: keep them.)
      if (ch.parts !== null) {
        if (w) w.resized = true;
        ch.logs = new Map();
      }
      ch.parts = parts;
    }
    let log = ch.logs.get(part);
    if (!log) ch.logs.set(part, (log = { pos: null, early: [] }));
    const pos = { epoch: String(frame.epoch), offset: Number(frame.offset) };
    const answering = Boolean(w) && !w.answered.has(part);
    if (answering) w.answered.add(part);
    const where = parts > 1 ? { part } : {};
    // undefined: unasked; null: a fresh log; a position: a resume.
    const since = answering ? (w.resized ? { lost: true } : (w.since.get(part) ?? null)) : undefined;

    if (since === null) {
      log.pos = pos; // fresh: live from offset + 1
      if (frame.recovered !== true && w.resumed) w.recovered = false;
      // A snapshot the hub could not join to the live stream: what came between is missing.
      if (frame.recovered !== true && ch.mode.snapshot) {
        this.#emit('gap', name, { ...pos, missedFrom: null, previousEpoch: null, unsolicited: false, snapshot: true, ...where });
      }
    } else if (since && !since.lost && frame.recovered === true) {
      // The replay follows: keep the position at `since` so replayed offsets are accepted.
      w.replayed += Math.max(0, pos.offset - since.offset);
    } else {
      const prev = since === undefined ? log.pos : since.lost ? null : since;
      const sameEpoch = prev && prev.epoch === pos.epoch;
      log.pos = sameEpoch ? { epoch: pos.epoch, offset: Math.max(prev.offset, pos.offset) } : pos;
      if (answering) w.recovered = false;
      this.#emit('gap', name, {
        ...pos,
        missedFrom: prev ? prev.offset + 1 : null,
        previousEpoch: prev?.epoch ?? null,
        unsolicited: !answering,
        ...where,
      });
    }
    if (answering && w.answered.size === parts) {
      ch.waiting = null;
      if (w.resumed && w.recovered) {
        this.#emit('recovered', name, parts > 1 ? { replayed: w.replayed, parts } : { replayed: w.replayed, ...pos });
      }
    }
    const early = log.early;
    log.early = [];
    for (const f of early) this.#onMessage(f);
  }

  /**
   * A snapshot comes right after its partition's `subscribed`, before any of its messages: the
   * partition's position becomes the snapshot's, so the messages between it and `subscribed`'s
   * offset (sent next) are taken.
   */
  #onSnapshot(frame) {
    const name = frame.channel;
    const ch = this.#channels.get(name);
    if (!ch) return;
    const part = Number(frame.part ?? 0);
    const log = ch.logs.get(part);
    const epoch = String(frame.epoch);
    const offset = Number(frame.offset);
    if (log) log.pos = { epoch, offset };
    const items = (Array.isArray(frame.items) ? frame.items : []).map((m) => ({
      data: m.data, from: m.from, epoch: String(m.epoch), offset: Number(m.offset),
    }));
    const where = ch.parts > 1 ? { part } : {};
    this.#emit('snapshot', name, items, {
      epoch, offset, more: frame.more === true, truncated: frame.truncated === true, ...where,
    });
  }

  #onMessage(frame) {
    const name = frame.channel;
    const ch = this.#channels.get(name);
    if (!ch) return; // not (or no longer) subscribed
    const part = Number(frame.part ?? 0);
    let log = ch.logs.get(part);
    if (ch.waiting && !ch.waiting.answered.has(part)) {
      // Position unknown until its partition's answer; hold it (bounded) and judge it then.
      if (!log) ch.logs.set(part, (log = { pos: null, early: [] }));
      if (log.early.length < EARLY_CAP) log.early.push(frame);
      return;
    }
    if (!log) {
      // Messages flowing with no answer to place them (`already_subscribed`): take them as
      // they come, as for a one-log channel; a partition the channel does not have is dropped.
      if (ch.parts !== null && part >= ch.parts) return;
      ch.logs.set(part, (log = { pos: null, early: [] }));
    }
    const epoch = String(frame.epoch);
    const offset = Number(frame.offset);
    const prev = log.pos;
    const where = ch.parts > 1 ? { part } : {};
    if (prev && prev.epoch === epoch && offset <= prev.offset) {
      this.#dropped++;
      return;
    }
    if (prev && prev.epoch !== epoch) {
      // The hub announces epoch changes with `subscribed`; if one slipped by, it is still a hole.
      this.#emit('gap', name, { epoch, offset, missedFrom: prev.offset + 1, previousEpoch: prev.epoch, unsolicited: true, ...where });
    }
    log.pos = { epoch, offset };
    this.#count();
    this.#emit('message', name, frame.data, { epoch, offset, from: frame.from, ...where });
  }

  #onError(frame) {
    if (frame.ref === 'refresh') this.#offeredToken = null;
    const ref = typeof frame.ref === 'string' && frame.ref.startsWith('sub:') ? frame.ref.slice(4) : null;
    const ch = ref !== null ? this.#channels.get(ref) : undefined;
    if (ch?.waiting) {
      if (frame.code === 'already_subscribed') {
        // The hub has it already: messages flow; take them as they come.
        ch.waiting = null;
        for (const log of ch.logs.values()) {
          const early = log.early;
          log.early = [];
          for (const f of early) this.#onMessage(f);
        }
      } else if (frame.code === 'unavailable' || frame.code === 'rate_limited') {
        // The hub cannot take it now (its broker, its channel table, the subscribe rate): the
        // channel stays wanted and is asked for again shortly, on this connection or the next.
        // A partitioned subscribe refused after some partitions answered holds none of them
        // (the hub undid them); what those answers told stays as the positions to resume from.
        forget(ch);
        const ws = this.#ws;
        this.#opts.setTimeout(() => {
          if (this.#ws === ws && this.#gotHello && this.#channels.get(ref) === ch && !ch.waiting) {
            this.#sendSubscribe(ref);
          }
        }, 500 + Math.floor(this.#opts.random() * 1000));
      } else {
        // forbidden / invalid_channel / too_many_subscriptions: retrying will not help.
        this.#channels.delete(ref);
      }
    }
    this.#emit('error', ref !== null ? { ...frame, channel: ref } : frame);
  }

  #send(frame) {
    try { this.#ws?.send(JSON.stringify(frame)); } catch { /* socket closing; resent on reconnect */ }
  }

  // ---- events and stats ---------------------------------------------------------------------

  #setState(state, extra = {}) {
    this.#state = state;
    if (state !== 'connected') this.#hub = null;
    this.#emit('state', { state, hub: this.#hub, retryInMs: null, retryAt: null, reason: null, code: null, ...extra });
  }

  #emit(event, ...args) {
    const set = this.#listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try { fn(...args); } catch (err) {
        // A listener's bug must not break the protocol bookkeeping.
        queueMicrotask(() => { throw err; });
      }
    }
  }

  #count() {
    this.#messages++;
    const id = Math.floor(this.#opts.now() / RATE_BUCKET_MS);
    const i = id % RATE_BUCKETS;
    if (this.#rateIds[i] !== id) { this.#rateIds[i] = id; this.#rateCounts[i] = 0; }
    this.#rateCounts[i]++;
  }

  #rate() {
    const now = this.#opts.now();
    const id = Math.floor(now / RATE_BUCKET_MS);
    let sum = 0;
    for (let i = 0; i < RATE_BUCKETS; i++) {
      const age = id - this.#rateIds[i];
      if (age >= 0 && age < RATE_BUCKETS) sum += this.#rateCounts[i];
    }
    const spanMs = (RATE_BUCKETS - 1) * RATE_BUCKET_MS + (now % RATE_BUCKET_MS || RATE_BUCKET_MS);
    return Math.round((sum * 1000) / spanMs);
  }
}

/** Ends a channel's subscription on this socket (closed, or refused): positions stay. */
function forget(ch) {
  ch.waiting = null;
  for (const log of ch.logs.values()) log.early = [];
}

/** Human text for the protocol's close codes. */
export function closeReason(code) {
  return ({
    1000: 'closed normally',
    1006: 'connection lost',
    1009: 'message too big',
    1012: 'hub restarting',
    1013: 'hub cannot serve this now',
    4000: 'no hello from hub',
    4001: 'token expired',
    4002: 'ping timeout',
    4003: 'token revoked',
    4004: 'signing key removed',
    4008: 'too slow to keep up (slow consumer)',
    4029: 'rate limited',
  })[code] ?? (code ? `closed (${code})` : 'connection failed');
}
