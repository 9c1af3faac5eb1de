// tracker-selftest.js: checks lib/hub.js's Tracker (gap / duplicate / hole / resume
// accounting) against a scripted frame sequence; no hub needed.
//   k6 run --no-usage-report -q tracker-selftest.js   (exit 0 = the counts are as expected)
import { Tracker } from './lib/hub.js';
export const options = {
  iterations: 1,
  vus: 1,
  thresholds: {
    gaps: ['count==4'], duplicates: ['count==3'], holes: ['count==3'], resumed_ok: ['count==2'],
    resumed_with_gap: ['count==2'], messages_received: ['count==11'], messages_replayed: ['count==3'],
  },
};
const m = (o, e = 'A') => ({ type: 'message', channel: 'fleet', epoch: e, offset: o, data: { sent_ms: Date.now() } });
export default function () {
  const t = new Tracker();
  t.subscribe('fleet');
  t.handle(m(11));                                  // held until the answer
  t.handle({ type: 'subscribed', channel: 'fleet', epoch: 'A', offset: 10, recovered: false }); // fresh
  t.handle(m(12)); t.handle(m(12));                 // dup 1
  t.handle(m(15));                                  // gap 2 (13,14)
  t.subscribe('fleet');                             // resume since 15
  t.handle({ type: 'subscribed', channel: 'fleet', epoch: 'A', offset: 17, recovered: true });
  t.handle(m(16)); t.handle(m(17));                 // replay
  t.handle(m(17));                                  // dup 2
  t.handle({ type: 'subscribed', channel: 'fleet', epoch: 'B', offset: 3, recovered: false }); // unasked hole 1
  t.handle(m(4, 'B'));
  t.handle(m(9, 'C'));                              // unannounced epoch: gap 3
  t.subscribe('fleet');
  t.handle({ type: 'subscribed', channel: 'fleet', epoch: 'C', offset: 50, recovered: false }); // resume hole 2
  t.handle(m(52, 'C'));                             // gap 4 (51)

  // A partitioned channel: one log per partition, each answered by its own `subscribed`.
  const g = (part, e, o) => ({ type: 'message', channel: 'groups.g', part, epoch: e, offset: o, data: {} });
  const sub = (part, e, o, recovered) =>
    ({ type: 'subscribed', channel: 'groups.g', part, parts: 2, epoch: e, offset: o, recovered });
  t.subscribe('groups.g');
  t.handle(sub(0, 'P', 0, false));
  t.handle(g(1, 'Q', 1));                           // held until partition 1 answers
  t.handle(sub(1, 'Q', 0, false));
  t.handle(g(0, 'P', 1)); t.handle(g(0, 'P', 1));   // dup 3 (partition 0's, not 1's)
  const resume = JSON.parse(t.subscribe('groups.g'));
  if (JSON.stringify(resume.since) !== JSON.stringify({ partitions: [{ epoch: 'P', offset: 1 }, { epoch: 'Q', offset: 1 }] })) {
    throw new Error(`since per partition, got ${JSON.stringify(resume.since)}`);
  }
  t.handle(sub(0, 'P', 2, true)); t.handle(g(0, 'P', 2)); // replay 3
  t.handle(sub(1, 'Q', 1, true));                   // resumed ok 2: every partition recovered
  t.subscribe('groups.g');
  t.handle(sub(0, 'P', 2, true));
  t.handle(sub(1, 'R', 5, false));                  // hole 3 in partition 1; resumed with gap 2
}
