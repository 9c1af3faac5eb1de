// fanout.js: viewers follow `fleet` (every DEVICE_VIEWER_EVERY-th also `devices.<id>`) while
// agents publish at RATE readings/s each. Measures publish->deliver latency and checks that
// every viewer gets every reading exactly once, in order, and that every publish is acked.
//
// Env (defaults in brackets):
//   HUB_URL            hub WebSocket endpoint [ws://127.0.0.1:8080/ws]
//   VIEWER_TOKEN       viewer token shared by all viewers (or TOKENS_FILE)
//   AGENT_TOKENS       comma-separated agent tokens, one per agent VU; each token's sub is the
//                      device id (or TOKENS_FILE: JSON written by tokens.sh, absolute path)
//   VIEWERS [20]  AGENTS [2, at most the number of agent tokens]
//   RATE [10]          readings per second per agent (hub default limit: 100/s, burst 200;
//                      raise HUB_LIMITS__PUBLISH_RATE / HUB_LIMITS__PUBLISH_BURST above that)
//   DURATION [30s]     publishing time; each agent sends READINGS = RATE*DURATION readings
//   READINGS           override the readings per agent
//   DEVICE_VIEWER_EVERY [4]  every Nth viewer also follows devices.<id> (0 = none)
//   WARMUP [2s]        time between the viewers' connects and the first publish
//   CONNECT_SPREAD [0ms] viewers connect spread over this window (avoid connect_rate 429s)
//   DRAIN [5s]         extra time for the last acks and deliveries
//   PAYLOAD_PAD [0]    extra bytes of padding in each reading
//   LATENCY_P99_MS [50]  threshold on p(99) publish_to_deliver_ms
//   CONNECT_P95_MS [1000] threshold on p(95) ws_connecting
import exec from 'k6/execution';
import {
  commonConfig, envInt, envFloat, readingsPerAgent, viewerChannels, expectedMessages,
  followUntil, publishFor, spread,
  viewerAndAgentScenarios, timeline, exactlyOnceThresholds,
} from './lib/hub.js';

const cfg = commonConfig({ viewers: 20, agents: 2, rate: 10, duration: '30s', warmup: '2s', drain: '5s' });
const EVERY = envInt('DEVICE_VIEWER_EVERY', 4);
const PER_AGENT = readingsPerAgent(cfg);
const EXPECTED = expectedMessages(cfg, EVERY, PER_AGENT);
const TIMES = timeline(cfg);

export const options = {
  scenarios: viewerAndAgentScenarios(cfg, TIMES),
  thresholds: {
    ...exactlyOnceThresholds({ acks: cfg.agents * PER_AGENT, messages: EXPECTED }),
    publish_to_deliver_ms: [`p(99)<${envFloat('LATENCY_P99_MS', 50)}`],
    ws_connecting: [`p(95)<${envFloat('CONNECT_P95_MS', 1000)}`],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  console.log(`fanout: ${cfg.viewers} viewers, ${cfg.agents} agents x ${PER_AGENT} readings at ${cfg.rate}/s; expecting ${EXPECTED} deliveries`);
}

export function viewer() {
  const i = exec.scenario.iterationInTest;
  followUntil({
    url: cfg.url, token: cfg.tokens.viewer, channels: viewerChannels(cfg, i, EVERY),
    clientId: `k6-viewer-${i}`,
    expected: viewerChannels(cfg, i, EVERY).length === 2 ? (cfg.agents + 1) * PER_AGENT : cfg.agents * PER_AGENT,
    delayMs: spread(i, cfg.connectSpreadMs),
    deadline: exec.scenario.startTime + TIMES.viewerEndMs,
  });
}

export function agent() {
  publishFor({ cfg, index: exec.scenario.iterationInTest, count: PER_AGENT });
}
