// The reference client's subscribe bookkeeping against a scripted hub: no browser, no network.
// A fake WebSocket records what the client sends; fake timers run when the test says.
// Run: node services/hub/tests/browser/fleet-client.test.mjs
import assert from 'node:assert/strict';
import { BACKOFF, FleetClient } from '../../assets/fleet-client.js';

class FakeSocket {
  static last = null;
  constructor(url) { this.url = url; this.sent = []; FakeSocket.last = this; }
  send(text) { this.sent.push(JSON.parse(text)); }
  close() {}
  hub(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
  subscribes() { return this.sent.filter((f) => f.type === 'subscribe').map((f) => f.channel); }
}

function harness(extra = {}) {
  const timers = [];
  const client = new FleetClient({
    token: 'x.y.z',
    url: 'ws://hub.test/ws',
    autoConnect: false,
    WebSocket: FakeSocket,
    fetch: async () => ({ status: 426, json: async () => ({ error: 'upgrade_required' }) }),
    random: () => 0.5,
    setTimeout: (fn, ms) => { timers.push({ fn, ms }); return timers.length; },
    clearTimeout: () => {},
    ...extra,
  });
  const errors = [];
  client.on('error', (frame) => errors.push(frame));
  const states = [];
  client.on('state', (s) => states.push(s));
  const runTimers = (maxMs) => {
    for (const t of timers.splice(0)) if (t.ms <= maxMs) t.fn(); else timers.push(t);
  };
  return { client, errors, states, runTimers, timers };
}

async function connected(client) {
  client.connect();
  await new Promise((r) => setTimeout(r, 10)); // the token check's promise
  const ws = FakeSocket.last;
  ws.hub({ type: 'hello', hub: 'h1', sub: 'v', role: 'viewer', expires_at: 0 });
  return ws;
}

const tests = {
  async 'with getToken the client refreshes at 80 % of its token lifetime and moves its expiry'() {
    const now = 1_700_000_000_000;
    const { client, errors, timers } = harness({ now: () => now, getToken: async () => 'fresh.token.jwt' });
    const refreshed = [];
    client.on('refreshed', (e) => refreshed.push(e));
    client.connect();
    await new Promise((r) => setTimeout(r, 10));
    const ws = FakeSocket.last;
    ws.hub({ type: 'hello', hub: 'h1', sub: 'v', role: 'viewer', expires_at: now / 1000 + 100 });
    const due = timers.find((t) => t.ms === 80_000);
    assert.ok(due, `a refresh 80 s into a 100 s token: ${JSON.stringify(timers.map((t) => t.ms))}`);
    await due.fn();
    assert.deepEqual(ws.sent.at(-1), { type: 'refresh', token: 'fresh.token.jwt', ref: 'refresh' });
    ws.hub({ type: 'refreshed', expires_at: now / 1000 + 3600, ref: 'refresh' });
    assert.equal(client.expiresAt, now / 1000 + 3600);
    assert.deepEqual(refreshed, [{ expiresAt: now / 1000 + 3600 }]);
    assert.ok(timers.some((t) => t.ms === 2_880_000), 'the next refresh, 80 % into the new token');
    // A refused refresh is an error event; the connection keeps its expiry.
    client.refresh('not-a-jwt');
    ws.hub({ type: 'error', code: 'bad_token', message: 'malformed: token is not a well-formed JWT', ref: 'refresh' });
    assert.equal(errors.at(-1).code, 'bad_token');
    assert.equal(client.expiresAt, now / 1000 + 3600);
    // The refused token is not the next connection's; the taken one is.
    ws.onclose({ code: 1012, reason: '' });
    await new Promise((r) => setTimeout(r, 10));
    for (const t of timers.splice(0)) if (t.ms <= 2000) t.fn();
    await new Promise((r) => setTimeout(r, 10));
    assert.match(FakeSocket.last.url, /token=fresh\.token\.jwt/);
  },

  async 'a token with months left is refreshed in timer-sized steps, not in a loop'() {
    const now = 1_700_000_000_000;
    let asked = 0;
    const { client, timers } = harness({ now: () => now, getToken: async () => { asked++; return 't'; } });
    client.connect();
    await new Promise((r) => setTimeout(r, 10));
    FakeSocket.last.hub({ type: 'hello', hub: 'h1', sub: 'v', role: 'viewer', expires_at: now / 1000 + 90 * 86_400 });
    const step = timers.find((t) => t.ms === 2 ** 31 - 1);
    assert.ok(step, JSON.stringify(timers.map((t) => t.ms)));
    assert.ok(!timers.some((t) => t.ms > 2 ** 31 - 1), 'no delay past what timers take');
    await step.fn();
    assert.equal(asked, 0, 'a step only waits');
  },

  async 'a subscribe refused as unavailable or rate_limited is asked for again'() {
    const { client, errors, runTimers } = harness();
    client.subscribe('fleet');
    client.subscribe('devices.pi-1');
    const ws = await connected(client);
    assert.deepEqual(ws.subscribes(), ['fleet', 'devices.pi-1']);
    ws.hub({ type: 'error', code: 'unavailable', message: 'redis down', ref: 'sub:fleet' });
    ws.hub({ type: 'error', code: 'rate_limited', message: 'slow down', ref: 'sub:devices.pi-1' });
    assert.equal(errors.length, 2);
    assert.deepEqual([...client.channels.keys()], ['fleet', 'devices.pi-1'], 'still wanted');
    runTimers(2000);
    assert.deepEqual(ws.subscribes(), ['fleet', 'devices.pi-1', 'fleet', 'devices.pi-1']);
  },

  async 'a subscribe refused for good is dropped and not asked for again'() {
    const { client, runTimers } = harness();
    client.subscribe('devices.secret');
    const ws = await connected(client);
    ws.hub({ type: 'error', code: 'forbidden', message: 'no', ref: 'sub:devices.secret' });
    assert.deepEqual([...client.channels.keys()], []);
    runTimers(60_000);
    assert.deepEqual(ws.subscribes(), ['devices.secret']);
  },

  async 'a retry is not sent on a connection that is gone'() {
    const { client, runTimers } = harness();
    client.subscribe('fleet');
    const ws = await connected(client);
    ws.hub({ type: 'error', code: 'unavailable', message: 'redis down', ref: 'sub:fleet' });
    ws.onclose({ code: 1006, reason: '' });
    runTimers(2000);
    assert.deepEqual(ws.subscribes(), ['fleet'], 'the next connection resubscribes instead');
  },

  async 'a partitioned channel is tracked per partition and resumed with a position for each'() {
    const { client } = harness();
    const events = [];
    client.on('message', (ch, data, meta) => events.push(['message', meta.part, meta.offset]));
    client.on('gap', (ch, g) => events.push(['gap', g.part]));
    client.on('recovered', (ch, r) => events.push(['recovered', r.replayed, r.parts]));
    client.subscribe('fleet');
    const ws = await connected(client);
    const sub = (part, epoch, offset, recovered = false) =>
      ws.hub({ type: 'subscribed', channel: 'fleet', part, parts: 2, epoch, offset, recovered });
    const msg = (part, epoch, offset) =>
      ws.hub({ type: 'message', channel: 'fleet', part, epoch, offset, from: 'd', data: {} });
    sub(0, 'a', 5);
    msg(0, 'a', 6); // partition 0 is live before partition 1 has answered
    sub(1, 'b', 0);
    msg(1, 'b', 1);
    msg(0, 'a', 6); // a duplicate of partition 0, not of 1
    assert.deepEqual(events, [['message', 0, 6], ['message', 1, 1]]);
    assert.deepEqual(client.channels.get('fleet'), {
      partitions: [{ epoch: 'a', offset: 6 }, { epoch: 'b', offset: 1 }],
    });
  },

  async 'a resume of every partition that the hub replays is one recovered event'() {
    const { client, runTimers } = harness();
    const events = [];
    client.on('gap', (ch, g) => events.push(['gap', g.part, g.missedFrom]));
    client.on('recovered', (ch, r) => events.push(['recovered', r.replayed, r.parts]));
    client.subscribe('fleet');
    let ws = await connected(client);
    ws.hub({ type: 'subscribed', channel: 'fleet', part: 0, parts: 2, epoch: 'a', offset: 5, recovered: false });
    ws.hub({ type: 'subscribed', channel: 'fleet', part: 1, parts: 2, epoch: 'b', offset: 2, recovered: false });
    ws.onclose({ code: 1012, reason: '' });
    runTimers(1000);
    ws = FakeSocket.last;
    ws.hub({ type: 'hello', hub: 'h2', sub: 'v', role: 'viewer', expires_at: 0 });
    const resume = ws.sent.find((f) => f.type === 'subscribe');
    assert.deepEqual(resume.since, {
      partitions: [{ epoch: 'a', offset: 5 }, { epoch: 'b', offset: 2 }],
    });
    ws.hub({ type: 'subscribed', channel: 'fleet', part: 0, parts: 2, epoch: 'a', offset: 7, recovered: true });
    ws.hub({ type: 'subscribed', channel: 'fleet', part: 1, parts: 2, epoch: 'b', offset: 3, recovered: true });
    assert.deepEqual(events, [['recovered', 3, 2]]);

    // Next time partition 1 cannot be recovered: a gap there, and no recovered event.
    ws.onclose({ code: 1012, reason: '' });
    runTimers(1000);
    ws = FakeSocket.last;
    ws.hub({ type: 'hello', hub: 'h3', sub: 'v', role: 'viewer', expires_at: 0 });
    ws.hub({ type: 'subscribed', channel: 'fleet', part: 0, parts: 2, epoch: 'a', offset: 5, recovered: true });
    ws.hub({ type: 'subscribed', channel: 'fleet', part: 1, parts: 2, epoch: 'c', offset: 9, recovered: false });
    assert.deepEqual(events.slice(1), [['gap', 1, 3]]);
  },

  async 'a partitioned subscribe refused half-way is asked for again from what it told'() {
    const { client, runTimers } = harness();
    client.subscribe('fleet');
    const ws = await connected(client);
    ws.hub({ type: 'subscribed', channel: 'fleet', part: 0, parts: 2, epoch: 'a', offset: 5, recovered: false });
    ws.hub({ type: 'error', code: 'unavailable', message: 'a shard is down', ref: 'sub:fleet' });
    runTimers(2000);
    const again = ws.sent.filter((f) => f.type === 'subscribe').at(-1);
    assert.deepEqual(again.since, {
      partitions: [{ epoch: 'a', offset: 5 }, { epoch: '', offset: 0 }],
    }, 'partition 0 resumes; partition 1, never seen, is asked for as new');
  },

  async 'messages after already_subscribed are taken as they come'() {
    const { client } = harness();
    const got = [];
    client.on('message', (ch, data, meta) => got.push(meta.offset));
    client.subscribe('fleet');
    const ws = await connected(client);
    ws.hub({ type: 'error', code: 'already_subscribed', message: 'have it', ref: 'sub:fleet' });
    ws.hub({ type: 'message', channel: 'fleet', epoch: 'e', offset: 4, from: 'd', data: {} });
    ws.hub({ type: 'message', channel: 'fleet', epoch: 'e', offset: 5, from: 'd', data: {} });
    assert.deepEqual(got, [4, 5]);
  },

  async 'a hub restart is retried within a second and the backoff does not grow'() {
    const { client, states } = harness();
    const ws = await connected(client);
    ws.onclose({ code: 1012, reason: '' });
    const last = states.at(-1);
    assert.equal(last.state, 'reconnecting');
    assert.equal(last.retryInMs, 0.5 * BACKOFF.restartJitterMs);
  },

  async 'a slow consumer backs off like a lost link'() {
    const { client, states } = harness();
    const ws = await connected(client);
    ws.onclose({ code: 4008, reason: '' });
    await new Promise((r) => setTimeout(r, 10));
    const last = states.at(-1);
    assert.equal(last.state, 'reconnecting');
    assert.equal(last.retryInMs, 0.5 * BACKOFF.baseMs, 'the first backoff step, not the restart jitter');
  },

  async 'a snapshot subscription starts from the snapshot and asks for a new one after a reconnect'() {
    const { client, runTimers } = harness();
    const snapshots = [];
    const messages = [];
    client.on('snapshot', (channel, items, info) => snapshots.push({ channel, items, info }));
    client.on('message', (channel, data, { offset }) => messages.push(offset));
    const gaps = [];
    client.on('gap', (channel, g) => gaps.push(g));
    client.subscribe('fleet', { snapshot: true, maxRate: 2 });
    let ws = await connected(client);
    assert.deepEqual(ws.sent.at(-1), { type: 'subscribe', channel: 'fleet', ref: 'sub:fleet', snapshot: true, max_rate: 2 });
    ws.hub({ type: 'subscribed', channel: 'fleet', epoch: 'e', offset: 12, recovered: true });
    const item = { type: 'message', channel: 'fleet', epoch: 'e', offset: 9, from: 'pi-1', data: { n: 1 } };
    ws.hub({ type: 'snapshot', channel: 'fleet', epoch: 'e', offset: 10, items: [item], more: true });
    ws.hub({ type: 'snapshot', channel: 'fleet', epoch: 'e', offset: 10, items: [] });
    assert.equal(snapshots.length, 2);
    assert.deepEqual(snapshots[0].items, [{ data: { n: 1 }, from: 'pi-1', epoch: 'e', offset: 9 }]);
    assert.deepEqual([snapshots[0].info.more, snapshots[1].info.more], [true, false]);
    // Published between the snapshot and `subscribed`: taken, not dropped as old.
    for (const offset of [11, 12, 15]) ws.hub({ ...item, offset });
    assert.deepEqual(messages, [11, 12, 15], 'conflated offsets skip; that is no gap');
    assert.deepEqual(gaps, []);
    ws.onclose({ code: 1012, reason: '' });
    await new Promise((r) => setTimeout(r, 10));
    runTimers(2000);
    await new Promise((r) => setTimeout(r, 10));
    ws = FakeSocket.last;
    ws.hub({ type: 'hello', hub: 'h2', sub: 'v', role: 'viewer', expires_at: 0 });
    const again = ws.sent.at(-1);
    assert.equal(again.snapshot, true);
    assert.equal(again.since, undefined, 'a new snapshot, not a resume');
    // A snapshot the hub could not join to the live stream is reported as a gap.
    ws.hub({ type: 'subscribed', channel: 'fleet', epoch: 'e', offset: 30, recovered: false });
    assert.equal(gaps.length, 1);
    assert.deepEqual([gaps[0].snapshot, gaps[0].offset, gaps[0].unsolicited], [true, 30, false]);
  },

  async 'a close for something the client sent stops instead of repeating it'() {
    const { client, states, runTimers } = harness();
    const ws = await connected(client);
    ws.onclose({ code: 1009, reason: 'message too big' });
    assert.equal(states.at(-1).state, 'closed');
    assert.equal(states.at(-1).code, 1009);
    runTimers(60_000);
    assert.equal(FakeSocket.last, ws, 'no new connection');
  },
};

let failed = 0;
for (const [name, test] of Object.entries(tests)) {
  try {
    await test();
    console.log(`ok   ${name}`);
  } catch (err) {
    failed++;
    console.log(`FAIL ${name}\n${err.stack}`);
  }
}
console.log(`fleet-client: ${Object.keys(tests).length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
