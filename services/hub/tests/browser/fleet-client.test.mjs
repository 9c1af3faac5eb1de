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

function harness() {
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
  });
  const errors = [];
  client.on('error', (frame) => errors.push(frame));
  const states = [];
  client.on('state', (s) => states.push(s));
  const runTimers = (maxMs) => {
    for (const t of timers.splice(0)) if (t.ms <= maxMs) t.fn(); else timers.push(t);
  };
  return { client, errors, states, runTimers };
}

async function connected(client) {
  client.connect();
  await new Promise((r) => setTimeout(r, 10)); // the token check's promise
  const ws = FakeSocket.last;
  ws.hub({ type: 'hello', hub: 'h1', sub: 'v', role: 'viewer', expires_at: 0 });
  return ws;
}

const tests = {
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
