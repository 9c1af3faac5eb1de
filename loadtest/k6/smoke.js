// smoke.js: tiny and fast (a few seconds), for CI. 2 viewers (one on `fleet`, one on `fleet`
// and `devices.<agent id>`), 1 agent publishing READINGS (50) readings at RATE (50/s).
// Every reading must reach every subscription exactly once, in order, and be acked.
//
// Env (defaults in brackets):
//   HUB_URL [ws://127.0.0.1:8080/ws]  VIEWER_TOKEN  AGENT_TOKENS | TOKENS_FILE  (see fanout.js)
//   READINGS [50]  RATE [50]  WARMUP [1s]  DRAIN [3s]
//   LATENCY_P99_MS [250]   threshold on p(99) publish_to_deliver_ms (generous: CI boxes are
//                          shared; set 0 to see a threshold fail with exit 99)
//   CONNECT_P95_MS [1000]  threshold on p(95) ws_connecting
import exec from 'k6/execution';
import { env, envInt, envFloat, envDurationMs, loadTokens, msToK6, followUntil, publishFor } from './lib/hub.js';

const tokens = loadTokens();
if (!tokens.viewer) throw new Error('set VIEWER_TOKEN or TOKENS_FILE');
if (tokens.agents.length < 1) throw new Error('set AGENT_TOKENS or TOKENS_FILE (one agent token)');
const READINGS = envInt('READINGS', 50);
const RATE = envFloat('RATE', 50);
const cfg = {
  url: env('HUB_URL', 'ws://127.0.0.1:8080/ws'),
  viewers: 2,
  agents: 1,
  rate: RATE,
  durationMs: Math.ceil((READINGS / RATE) * 1000),
  warmupMs: envDurationMs('WARMUP', '1s'),
  drainMs: envDurationMs('DRAIN', '3s'),
  payloadPad: 0,
  tokens,
};
const AGENT_ID = tokens.agents[0].id;
const CHANNELS = [['fleet'], ['fleet', `devices.${AGENT_ID}`]];
const EXPECTED = READINGS * 3;
const SEND_WINDOW_MS = Math.round(cfg.durationMs * 1.1 + 1000);
const VIEWER_END_MS = cfg.warmupMs + SEND_WINDOW_MS + cfg.drainMs;

export const options = {
  scenarios: {
    viewers: {
      executor: 'per-vu-iterations', exec: 'viewer', vus: 2, iterations: 1,
      maxDuration: msToK6(VIEWER_END_MS + 2000),
    },
    agent: {
      executor: 'per-vu-iterations', exec: 'agent', vus: 1, iterations: 1,
      startTime: msToK6(cfg.warmupMs), maxDuration: msToK6(SEND_WINDOW_MS + cfg.drainMs + 2000),
    },
  },
  thresholds: {
    gaps: ['count==0'],
    duplicates: ['count==0'],
    holes: ['count==0'],
    messages_received: [`count>=${EXPECTED}`],
    acks: [`count>=${READINGS}`],
    publish_errors: ['count==0'],
    ws_errors: ['count==0'],
    unexpected_closes: ['count==0'],
    protocol_errors: ['count==0'],
    publish_to_deliver_ms: [`p(99)<${envFloat('LATENCY_P99_MS', 250)}`],
    ws_connecting: [`p(95)<${envFloat('CONNECT_P95_MS', 1000)}`],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(95)', 'p(99)', 'max'],
};

export function viewer() {
  const i = exec.scenario.iterationInTest;
  followUntil({
    url: cfg.url, token: tokens.viewer, channels: CHANNELS[i % 2], clientId: `k6-smoke-${i}`,
    expected: CHANNELS[i % 2].length * READINGS,
    delayMs: 0,
    deadline: exec.scenario.startTime + VIEWER_END_MS,
  });
}

export function agent() {
  publishFor({ cfg, index: 0, count: READINGS });
}
