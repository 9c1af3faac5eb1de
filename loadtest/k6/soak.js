// soak.js: a low, steady load for a long DURATION. Viewers follow `fleet` (every
// DEVICE_VIEWER_EVERY-th also devices.<id>) and stay connected the whole time, so the hub's
// pings, history trimming and memory behaviour over hours are exercised. Checks: no gap, no
// duplicate, no hole, no unexpected close (a 4002 ping timeout would show here), every publish
// acked, every reading delivered, and no latency drift: each viewer compares the p95 latency of
// the last DRIFT_WINDOW of the run with the first; the difference is `latency_drift_p95_ms`.
//
// Tokens must outlive the run: mint them with --ttl above DURATION + WARMUP + DRAIN (the hub
// closes connections with 4001 at `exp`).
//
// Env (defaults in brackets):
//   HUB_URL [ws://127.0.0.1:8080/ws]  VIEWER_TOKEN  AGENT_TOKENS | TOKENS_FILE  (see fanout.js)
//   VIEWERS [20]  AGENTS [2]  RATE [1]  DURATION [30m]  WARMUP [2s]  DRAIN [10s]
//   CONNECT_SPREAD [0ms]  DEVICE_VIEWER_EVERY [4]  PAYLOAD_PAD [0]
//   DRIFT_WINDOW [10% of DURATION]  length of the early and late windows compared
//   LATENCY_P99_MS [100]   threshold on p(99) publish_to_deliver_ms over the whole run
//   DRIFT_P95_MS [20]      threshold on max latency_drift_p95_ms over all viewers
//   CONNECT_P95_MS [1000]  threshold on p(95) ws_connecting
import exec from 'k6/execution';
import { Trend } from 'k6/metrics';
import {
  commonConfig, envInt, envFloat, envDurationMs, readingsPerAgent, viewerChannels,
  expectedMessages, followUntil, publishFor, spread,
  viewerAndAgentScenarios, timeline, exactlyOnceThresholds,
} from './lib/hub.js';

const cfg = commonConfig({ viewers: 20, agents: 2, rate: 1, duration: '30m', warmup: '2s', drain: '10s' });
const EVERY = envInt('DEVICE_VIEWER_EVERY', 4);
const PER_AGENT = readingsPerAgent(cfg);
const EXPECTED = expectedMessages(cfg, EVERY, PER_AGENT);
const TIMES = timeline(cfg);
const WINDOW_MS = envDurationMs('DRIFT_WINDOW', `${Math.round(cfg.durationMs / 10)}ms`);
const MAX_SAMPLES = 50000;

const drift = new Trend('latency_drift_p95_ms'); // ms, may be negative
const early = new Trend('latency_early_ms', true);
const late = new Trend('latency_late_ms', true);

export const options = {
  scenarios: viewerAndAgentScenarios(cfg, TIMES),
  thresholds: {
    ...exactlyOnceThresholds({ acks: cfg.agents * PER_AGENT, messages: EXPECTED }),
    publish_to_deliver_ms: [`p(99)<${envFloat('LATENCY_P99_MS', 100)}`],
    latency_drift_p95_ms: [`max<${envFloat('DRIFT_P95_MS', 20)}`],
    ws_connecting: [`p(95)<${envFloat('CONNECT_P95_MS', 1000)}`],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

function p95(xs) {
  if (xs.length === 0) return NaN;
  const s = xs.slice().sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(0.95 * s.length) - 1)];
}

export function setup() {
  console.log(`soak: ${cfg.viewers} viewers, ${cfg.agents} agents x ${PER_AGENT} readings at ${cfg.rate}/s ` +
    `over ${cfg.durationMs} ms; drift windows ${WINDOW_MS} ms; expecting ${EXPECTED} deliveries`);
}

export function viewer() {
  const i = exec.scenario.iterationInTest;
  const chans = viewerChannels(cfg, i, EVERY);
  // Windows by the readings' send time, relative to the agents' start.
  const firstSend = exec.scenario.startTime + TIMES.agentStartMs;
  const earlyEnd = firstSend + WINDOW_MS;
  const lateStart = firstSend + cfg.durationMs - WINDOW_MS;
  const e = [];
  const l = [];
  followUntil({
    url: cfg.url, token: cfg.tokens.viewer, channels: chans, clientId: `k6-soak-${i}`,
    expected: chans.length === 2 ? (cfg.agents + 1) * PER_AGENT : cfg.agents * PER_AGENT,
    delayMs: spread(i, cfg.connectSpreadMs),
    deadline: exec.scenario.startTime + TIMES.viewerEndMs,
    onDeliver: (channel, f, live) => {
      if (!live || !f.data || typeof f.data.sent_ms !== 'number') return;
      const ms = Date.now() - f.data.sent_ms;
      if (f.data.sent_ms < earlyEnd) {
        if (e.length < MAX_SAMPLES) e.push(ms);
        early.add(ms);
      } else if (f.data.sent_ms >= lateStart) {
        if (l.length < MAX_SAMPLES) l.push(ms);
        late.add(ms);
      }
    },
    onEnd: () => {
      if (e.length > 0 && l.length > 0) drift.add(p95(l) - p95(e));
      else console.warn(`viewer k6-soak-${i}: no samples to compare (early ${e.length}, late ${l.length})`);
    },
  });
}

export function agent() {
  publishFor({ cfg, index: exec.scenario.iterationInTest, count: PER_AGENT });
}
