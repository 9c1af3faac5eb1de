// tracker-selftest.js: checks lib/hub.js's Tracker (gap / duplicate / hole / resume
// accounting) against a scripted frame sequence; no hub needed.
//   k6 run --no-usage-report -q tracker-selftest.js   (exit 0 = the counts are as expected)
import { Tracker } from './lib/hub.js';
export const options = {
  iterations: 1,
  vus: 1,
  thresholds: {
    gaps: ['count==4'], duplicates: ['count==2'], holes: ['count==2'], resumed_ok: ['count==1'],
    resumed_with_gap: ['count==1'], messages_received: ['count==8'], messages_replayed: ['count==2'],
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
}
