// reconnect-storm.js: viewers follow `fleet` while agents publish; at STORM_AT every viewer
// drops its connection at the same moment, stays away OFFLINE, and reconnects (optionally with
// RECONNECT_JITTER), resubscribing with `since` = the last (epoch, offset) it saw. Checks that
// every resume is answered recovered:true, that the replay + live stream has no gap or
// duplicate, and that every viewer ends with every reading. Repeats STORMS times.
//
// Env (defaults in brackets):
//   HUB_URL [ws://127.0.0.1:8080/ws]  VIEWER_TOKEN  AGENT_TOKENS | TOKENS_FILE  (see fanout.js)
//   VIEWERS [50]  AGENTS [2]  RATE [10]  DURATION [20s]  WARMUP [2s]  DRAIN [5s]
//   CONNECT_SPREAD [0ms]   initial connects spread over this window
//   STORM_AT [DURATION/3]  time after the first publish of the first storm
//   STORMS [1]             number of storms, STORM_EVERY apart
//   STORM_EVERY [DURATION/3]
//   OFFLINE [1s]           time between the drop and the reconnect. Readings published while
//                          offline (AGENTS*RATE*OFFLINE per channel) must fit the hub's history
//                          (history.size, default 1000 per channel) or resumes report holes.
//   RECONNECT_JITTER [0ms] each viewer reconnects OFFLINE + [0, jitter) after the drop
//   LATENCY_P99_MS [250]   threshold on p(99) publish_to_deliver_ms of live messages (the
//                          reconnect wave itself loads the hub; replayed messages not counted)
//   CONNECT_P95_MS [1000]  threshold on p(95) ws_connecting (initial connects and reconnects)
import exec from 'k6/execution';
import {
  commonConfig, envInt, envFloat, envDurationMs, readingsPerAgent, spread,
  publishFor, touchMetrics, Tracker, Viewer, setTimeout, clearTimeout,
  viewerAndAgentScenarios, timeline,
} from './lib/hub.js';

const cfg = commonConfig({ viewers: 50, agents: 2, rate: 10, duration: '20s', warmup: '2s', drain: '5s' });
const PER_AGENT = readingsPerAgent(cfg);
const EXPECTED_PER_VIEWER = cfg.agents * PER_AGENT;
const TIMES = timeline(cfg);
const STORM_AT_MS = envDurationMs('STORM_AT', `${Math.round(cfg.durationMs / 3)}ms`);
const STORMS = envInt('STORMS', 1);
const STORM_EVERY_MS = envDurationMs('STORM_EVERY', `${Math.round(cfg.durationMs / 3)}ms`);
const OFFLINE_MS = envDurationMs('OFFLINE', '1s');
const JITTER_MS = envDurationMs('RECONNECT_JITTER', '0ms');

export const options = {
  scenarios: viewerAndAgentScenarios(cfg, TIMES),
  thresholds: {
    resumed_with_gap: ['count==0'],
    resumed_ok: [`count>=${cfg.viewers * STORMS}`],
    gaps: ['count==0'],
    duplicates: ['count==0'],
    holes: ['count==0'],
    messages_received: [`count>=${cfg.viewers * EXPECTED_PER_VIEWER}`],
    publish_errors: ['count==0'],
    publish_to_deliver_ms: [`p(99)<${envFloat('LATENCY_P99_MS', 250)}`],
    ws_connecting: [`p(95)<${envFloat('CONNECT_P95_MS', 1000)}`],
    ws_errors: ['count==0'],
    unexpected_closes: ['count==0'],
    protocol_errors: ['count==0'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  console.log(`reconnect-storm: ${cfg.viewers} viewers, ${cfg.agents} agents x ${PER_AGENT} readings at ${cfg.rate}/s; ` +
    `${STORMS} storm(s) at +${STORM_AT_MS} ms every ${STORM_EVERY_MS} ms, offline ${OFFLINE_MS} ms`);
}

export function viewer() {
  touchMetrics();
  const i = exec.scenario.iterationInTest;
  const t0 = exec.scenario.startTime;
  const clientId = `k6-storm-${i}`;
  let viewer = null;
  let finished = false;
  const timers = [];
  const end = () => {
    if (finished) return;
    finished = true;
    for (const t of timers) clearTimeout(t);
    if (tracker.delivered < EXPECTED_PER_VIEWER) {
      console.warn(`viewer ${clientId}: ${tracker.delivered}/${EXPECTED_PER_VIEWER} messages at the end`);
    }
    if (viewer) viewer.close();
  };
  let stormsDone = 0;
  const tracker = new Tracker({
    onDeliver: () => {
      // Close early only once every storm has happened and every reading arrived.
      if (stormsDone >= STORMS && tracker.delivered >= EXPECTED_PER_VIEWER) end();
    },
  });
  const at = (offsetMs, fn) => timers.push(setTimeout(fn, Math.max(0, t0 + offsetMs - Date.now())));

  at(spread(i, cfg.connectSpreadMs), () => {
    viewer = new Viewer({ url: cfg.url, token: cfg.tokens.viewer, channels: ['fleet'], clientId, tracker });
    viewer.connect();
  });
  for (let s = 0; s < STORMS; s++) {
    const dropAt = TIMES.agentStartMs + STORM_AT_MS + s * STORM_EVERY_MS;
    at(dropAt, () => { if (viewer && !finished) viewer.drop(); });
    at(dropAt + OFFLINE_MS + spread(i, JITTER_MS), () => {
      if (finished) return;
      stormsDone++;
      viewer.connect();
    });
  }
  at(TIMES.viewerEndMs, end);
}

export function agent() {
  publishFor({ cfg, index: exec.scenario.iterationInTest, count: PER_AGENT });
}
