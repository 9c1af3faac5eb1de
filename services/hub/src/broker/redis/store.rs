//! Everything the Redis broker stores, and the commands that read and write it, on one Redis or
//! on a Redis Cluster.
//!
//! Keys of one channel share the hash slot `{channel}`, so each channel's keys live on one shard.
//! `ch` is the channel's internal name: the channel itself, or one partition of it such as
//! `fleet#3/16:5` (see [`super::partition`]); messages name the public channel and partition.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `tl:{ch}:meta` | hash | `epoch`, `offset` (the last one given); for snapshots `@<device>`: `<ms> <message JSON>`, the device's latest message, and `scan`, the trimming cursor |
//! | `tl:{ch}:log` | stream | history; entry id `<offset>-0`, fields `t` (ms) and `m` (message JSON) |
//! | `tl:{devices.D}:seq` | hash | field `D`: the last `seq` accepted from device `D`; on a cluster also `#inc`, the device's incarnation |
//! | `tl:{ch}:from` | hash | cluster only: per device, `incarnation:seq` of the last publication this channel stored |
//! | `tl:{ch}:pub` | pub/sub channel (sharded on a cluster) | one payload per script call: the messages it appended (see [`Envelope`]) |
//! | `tl:{presence}:hubs` | sorted set | presence leases: hub instance → expiry, ms by Redis's clock |
//! | `tl:{presence}:on:<instance>` | set | the devices that hub instance holds |
//! | `tl:{presence}:online` | hash | per online device, how many live hub instances hold it |
//! | `tl:{presence}:gone` | list | burials of dead instances whose devices are still being taken off, `<instance>#<n>`, each in `tl:{presence}:gone:<instance>#<n>` (`n` from the counter `tl:{presence}:gone:n`) |
//!
//! Deduplication on one Redis is per device, as on the embedded broker: one value (kept with the
//! device's own channel, forgotten `history.meta_ttl` after the device's last publish) decides
//! for every channel of a publication, and the publication is one script, applied to all its
//! channels or to none.
//!
//! A cluster cannot run one script across slots, so a publication takes three steps: the
//! device's seq record (in its own channel's slot) says whether `seq` is new and names the
//! device's *incarnation* (a numbering that lasts as long as that record); then every other
//! channel at once, each refusing a seq it already stored from the same incarnation; then the
//! device's own channel, with the record's seq, last. A publication cut off half-way (a shard
//! that did not answer) is answered `unavailable`, and the record still names the last
//! publication every channel has, which is what a reconnecting agent is told: the resend
//! completes the channels it missed and duplicates none. A device whose record expired comes
//! back as a new incarnation, new on every channel at once, as on one Redis.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::Pool;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};
use serde_json::value::RawValue;

use super::partition;
use crate::broker::{BrokerError, now_ms};
use crate::config::HistorySettings;
use crate::metrics::Metrics;

/// What every publish script shares: its arguments and `append`.
///
/// `ARGV[1..7]`: device, time, history size, TTL, a fresh epoch, the number of readings `n`,
/// the devices a channel's latest-value store keeps; then three per reading, in the order the agent sent them: seq, data, traceparent or `''`;
/// then the script's own (from `ARGV[EXTRA]`). `seq`s are compared as decimal strings: Lua
/// numbers are doubles and u64s do not fit.
///
/// `append` adds picked readings to one channel in one go: their offsets, each `message` JSON
/// built once, the stream entries (trimmed once), the TTLs, each device's latest message (see
/// `remember`), and one envelope for all of them published with `PUB` (PUBLISH, or SPUBLISH on
/// a cluster).
const PRELUDE: &str = r#"
local device, now = ARGV[1], ARGV[2]
local size, meta_ttl, new_epoch, n = tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6])
local max_latest = tonumber(ARGV[7])
-- Whether the latest messages stay however old they are (`presence`: a device's state until
-- its next message); the count bound still applies.
local ageless = false
local EXTRA = 8 + 3 * n
local function seq_of(i) return ARGV[5 + 3 * i] end
local function data_of(i) return ARGV[6 + 3 * i] end
local function above(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
-- The readings of 1..n to take, each above the last taken (and above `last`); and per reading
-- 1 when taken, 0 when not.
local function pick(last)
  local picked, taken = {}, {}
  for i = 1, n do
    local s = seq_of(i)
    if last == nil or above(s, last) then
      picked[#picked + 1] = i
      taken[i] = 1
      last = s
    else
      taken[i] = 0
    end
  end
  return picked, taken, last
end
-- `label`: the JSON after `"channel":`, the public name and, for a partition, its number.
-- `from_of` and `trace_of` say whose message `i` is and its trace context; the presence script,
-- whose messages are not one device's readings, replaces them and `data_of`.
local function from_of(i) return device end
local function trace_of(i) return ARGV[7 + 3 * i] end
local function message(label, epoch, offset, i)
  return '{"type":"message","channel":' .. label .. ',"epoch":"' .. epoch ..
    '","offset":' .. offset .. ',"from":"' .. from_of(i) .. '","data":' .. data_of(i) .. '}'
end
-- Each device's latest message on the channel, for snapshots: field `@<device>` of the meta
-- hash, `<ms> <message>` (one HSET per call, and the meta key's TTL already covers it). Every 32
-- offsets 64 fields are looked at (the cursor is field `scan`): devices silent for `meta_ttl`
-- leave, and while the channel holds more than `max_latest` devices the oldest of those looked
-- at leave too.
local function remember(meta, latest, first, count)
  local fields = {}
  for from, msg in pairs(latest) do
    fields[#fields + 1] = '@' .. from
    fields[#fields + 1] = now .. ' ' .. msg
  end
  redis.call('HSET', meta, unpack(fields))
  if math.floor((first + count - 1) / 32) == math.floor((first - 1) / 32) then return end
  local cursor = redis.call('HGET', meta, 'scan') or '0'
  local scan = redis.call('HSCAN', meta, cursor, 'MATCH', '@*', 'COUNT', 64)
  redis.call('HSET', meta, 'scan', scan[1])
  local oldest, seen, gone = now - meta_ttl, {}, {}
  local kv = scan[2]
  for k = 1, #kv, 2 do
    local at = tonumber(string.match(kv[k + 1], '^(%d+) '))
    if at and (ageless or at >= oldest) then
      seen[#seen + 1] = {at, kv[k]}
    else
      gone[#gone + 1] = kv[k]
    end
  end
  -- epoch, offset, scan and one field per device.
  local over = redis.call('HLEN', meta) - 3 - #gone - max_latest
  if over > 0 then
    table.sort(seen, function(a, b) return a[1] < b[1] end)
    for k = 1, math.min(over, #seen) do gone[#gone + 1] = seen[k][2] end
  end
  if #gone > 0 then redis.call('HDEL', meta, unpack(gone)) end
end
local function append(meta, log, channel, label, picked)
  local count = #picked
  if count == 0 then return end
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = new_epoch
    redis.call('HSET', meta, 'epoch', epoch)
  end
  local first = redis.call('HINCRBY', meta, 'offset', count) - count + 1
  local parts, latest = {}, {}
  if count > 1 then parts[1] = '=' .. count .. '\n' end
  for k = 1, count do
    -- The offset as text once: Lua turns a number into text with printf, which is a good part
    -- of a reading's cost when it is done three times.
    local i, offset = picked[k], tostring(first + k - 1)
    local msg = message(label, epoch, offset, i)
    if size > 0 and k > 1 then
      redis.call('XADD', log, offset .. '-0', 't', now, 'm', msg)
    elseif size > 0 then
      local added = redis.pcall('XADD', log, offset .. '-0', 't', now, 'm', msg)
      if type(added) == 'table' and added.err then
        -- The stream is ahead of the offset: Redis lost writes it had acknowledged. The old
        -- history belongs to a lost timeline; start a new epoch with an empty one.
        redis.call('DEL', log)
        epoch, first, offset = new_epoch, 1, '1'
        redis.call('HSET', meta, 'epoch', epoch, 'offset', count)
        msg = message(label, epoch, offset, i)
        redis.call('XADD', log, '1-0', 't', now, 'm', msg)
      end
    end
    local head = offset .. ' ' .. epoch .. ' ' .. now
    if count > 1 then head = head .. ' ' .. #msg end
    local trace = trace_of(i)
    if trace ~= '' then head = head .. ' ' .. trace end
    parts[#parts + 1] = head .. '\n'
    parts[#parts + 1] = msg
    latest[from_of(i)] = msg
  end
  if size > 0 then
    redis.call('XTRIM', log, 'MAXLEN', size)
    redis.call('PEXPIRE', log, meta_ttl)
  end
  redis.call('PEXPIRE', meta, meta_ttl)
  remember(meta, latest, first, count)
  redis.call(PUB, 'tl:{' .. channel .. '}:pub', table.concat(parts))
end
"#;

/// One publication into every target channel, in one round trip on one Redis. `KEYS[1]` is the
/// device's seq hash; then `meta`, `log` per channel, whose names and labels follow from
/// `ARGV[EXTRA]`, two per channel.
/// Each reading whose `seq` is above the last one accepted from the device (and above the
/// readings before it) is appended to every channel; the others are duplicates, which only
/// refresh that memory. Returns per reading 1 (appended) or 0 (a duplicate).
const PUBLISH: &str = r#"
local seqs = KEYS[1]
local picked, taken, last = pick(redis.call('HGET', seqs, device) or '0')
if #picked > 0 then
  for c = 0, (#KEYS - 1) / 2 - 1 do
    append(KEYS[c * 2 + 2], KEYS[c * 2 + 3], ARGV[EXTRA + 2 * c], ARGV[EXTRA + 2 * c + 1], picked)
  end
  redis.call('HSET', seqs, device, last)
end
redis.call('PEXPIRE', seqs, meta_ttl)
return taken
"#;

/// Cluster, first step, in the slot of the device's own channel: the device's seq record
/// (`KEYS[1]`). Returns `{incarnation, last seq}`: the incarnation (field `#inc`, `ARGV[2]` if
/// the record has none) names a numbering of the device's seqs that lasts as long as the record;
/// the last seq is that of the last publication applied to *every* channel.
const SEQ_STATE: &str = r#"
local seqs, device = KEYS[1], ARGV[1]
local rec = redis.call('HMGET', seqs, device, '#inc')
local inc = rec[2]
if not inc then
  inc = ARGV[2]
  redis.call('HSET', seqs, '#inc', inc)
end
redis.call('PEXPIRE', seqs, ARGV[3])
return {inc, rec[1] or '0'}
"#;

/// Cluster, second step, one call per channel other than the device's own, in that channel's
/// slot (`KEYS`: `meta`, `log`, and the guard hash that remembers `incarnation:seq` per device;
/// `ARGV[EXTRA]` the name, `ARGV[EXTRA + 1]` the incarnation, `ARGV[EXTRA + 2]` the label). The
/// readings (new ones only, in
/// increasing seq) are appended unless this channel already has them from the same
/// incarnation: a publication cut off half-way is completed by the resend, without duplicating
/// what it did reach; a device whose numbering started over (a new incarnation) is new
/// everywhere at once.
const PUBLISH_GUARDED: &str = r#"
local guard, inc = KEYS[3], ARGV[EXTRA + 1]
local mark = redis.call('HGET', guard, device)
local had = nil
if mark then
  local sep = string.find(mark, ':', 1, true)
  if sep and string.sub(mark, 1, sep - 1) == inc then had = string.sub(mark, sep + 1) end
end
local picked, _, last = pick(had)
if #picked > 0 then
  append(KEYS[1], KEYS[2], ARGV[EXTRA], ARGV[EXTRA + 2], picked)
  redis.call('HSET', guard, device, inc .. ':' .. last)
end
redis.call('PEXPIRE', guard, meta_ttl)
return #picked
"#;

/// Cluster, last step, once every other channel has the readings: the device's own channel
/// (`KEYS`: the seq record, `meta`, `log`; `ARGV[EXTRA]` its name, `ARGV[EXTRA + 1]` the
/// incarnation, `ARGV[EXTRA + 2]` the label), and the record's seq with it. Committed last, the record's seq (the `last_seq`
/// a `hello` tells) never names a publication that some channel is still missing. Returns per
/// reading 1 (appended) or 0 (not above the record's seq).
const PUBLISH_OWN: &str = r#"
local seqs = KEYS[1]
local picked, taken, last = pick(redis.call('HGET', seqs, device) or '0')
if #picked > 0 then
  append(KEYS[2], KEYS[3], ARGV[EXTRA], ARGV[EXTRA + 2], picked)
  redis.call('HSET', seqs, device, last)
  if not redis.call('HGET', seqs, '#inc') then
    redis.call('HSET', seqs, '#inc', ARGV[EXTRA + 1])
  end
end
redis.call('PEXPIRE', seqs, meta_ttl)
return taken
"#;

/// Presence of the whole pool, in the slot of the `presence` channel (see [`super::presence`]).
/// `KEYS`: the channel's `meta` and `log`, the lease zset, the online hash, this hub's set, the
/// list of dead hubs still being swept. `ARGV[EXTRA..]`: this hub's instance, its lease in ms,
/// `1` when it is leaving, the sweep budget, the channel's label, the number of changes `m`;
/// then four per change: device, `1` online or `0` offline, reason, time in ms.
///
/// A device is online while some live hub's set holds it: `online` counts those hubs. The
/// script moves the sets of hubs whose lease ran out (this one's too) to the sweep list, renews
/// this hub's lease (by Redis's clock, the same for every hub), applies the changes, and takes
/// devices of dead hubs off, `budget` at most per call. A device whose count reaches zero gets its
/// offline message; one whose count leaves it, its online message. Writes are absolute (is the
/// device held here or not), so a write repeated after a lost reply changes nothing. Returns
/// `{1 if the lease was held before, online messages, offline messages, dead hubs left to
/// sweep}`.
const PRESENCE: &str = r#"
local meta, log, hubs, online, mine, gone = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local instance, lease = ARGV[EXTRA], tonumber(ARGV[EXTRA + 1])
local leaving, budget, label = ARGV[EXTRA + 2], tonumber(ARGV[EXTRA + 3]), ARGV[EXTRA + 4]
local m = tonumber(ARGV[EXTRA + 5])
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local on_prefix = string.sub(mine, 1, #mine - #instance)
local function hub_of(inst) return string.match(inst, '^(.*)/') or inst end
local froms, datas, ons = {}, {}, 0
local function announce(dev, on, hub, at, reason)
  if on == 'true' then ons = ons + 1 end
  froms[#froms + 1] = dev
  datas[#datas + 1] = '{"device":"' .. dev .. '","online":' .. on .. ',"hub":' ..
    cjson.encode(hub) .. ',"at":' .. at .. ',"reason":"' .. reason .. '"}'
end

-- Leases that ran out, this hub's own included: whoever notices first, a lease that ran out
-- is a dead hub, and its devices go offline.
local function bury()
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', hubs, '-inf', clock, 'LIMIT', 0, 16)) do
    redis.call('ZREM', hubs, dead)
    local set = on_prefix .. dead
    if redis.call('EXISTS', set) == 1 then
      -- A set of its own per burial: an instance buried again before the last burial's set is
      -- swept keeps both, and a device in both is counted off once for each, as it was counted.
      local burial = dead .. '#' .. redis.call('INCR', gone .. ':n')
      redis.call('RENAME', set, gone .. ':' .. burial)
      redis.call('RPUSH', gone, burial)
    end
  end
end
bury()
local held = redis.call('ZSCORE', hubs, instance) and 1 or 0
redis.call('ZADD', hubs, clock + lease, instance)
local me = hub_of(instance)
for k = 0, m - 1 do
  local at = EXTRA + 6 + 4 * k
  local dev, on, reason, when = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  if on == '1' then
    if redis.call('SADD', mine, dev) == 1 and redis.call('HINCRBY', online, dev, 1) == 1 then
      announce(dev, 'true', me, when, reason)
    end
  elseif redis.call('SREM', mine, dev) == 1 and redis.call('HINCRBY', online, dev, -1) <= 0 then
    redis.call('HDEL', online, dev)
    announce(dev, 'false', me, when, reason)
  end
end

if leaving == '1' then
  redis.call('ZADD', hubs, 0, instance)
  bury()
end
local now_text = string.format('%.0f', clock)
local left = budget
while left > 0 do
  local dead = redis.call('LINDEX', gone, 0)
  if not dead then break end
  local set = gone .. ':' .. dead
  for _, dev in ipairs(redis.call('SPOP', set, left)) do
    left = left - 1
    if redis.call('HINCRBY', online, dev, -1) <= 0 then
      redis.call('HDEL', online, dev)
      announce(dev, 'false', hub_of(dead), now_text, 'hub_gone')
    end
  end
  if redis.call('EXISTS', set) == 0 then redis.call('LPOP', gone) end
end

-- The channel's keys too: every hub's beat keeps presence's store while any hub runs, where
-- another channel's lasts `meta_ttl` after its last message.
for _, key in ipairs({hubs, online, mine, gone, gone .. ':n', meta, log}) do
  redis.call('PEXPIRE', key, meta_ttl)
end
ageless = true
if #froms > 0 then
  from_of = function(i) return froms[i] end
  data_of = function(i) return datas[i] end
  trace_of = function() return '' end
  local picked = {}
  for i = 1, #froms do picked[i] = i end
  append(meta, log, 'presence', label, picked)
end
return {held, ons, #froms - ons, redis.call('LLEN', gone)}
"#;

/// Whether `e` says the connection itself is gone, not that a command was refused.
fn lost_connection(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
}

/// A publish script's whole text: the publish command, the prelude, the body.
fn script(publish_command: &str, body: &str) -> Script {
    Script::new(&format!(
        "local PUB = '{publish_command}'\n{PRELUDE}\n{body}"
    ))
}

/// The channel's `(epoch, offset)`, giving it an epoch if it has none. A channel nobody has
/// published to yet is kept only `ARGV[3]` ms (the relay extends that while it is watched), so a
/// subscribe to a made-up name leaves no key for `meta_ttl`; a published one gets `ARGV[2]` ms.
const POSITION: &str = r#"
return position()
"#;

/// What [`POSITION`] and [`SNAPSHOT`] share: `position()` reads (and creates) the epoch and
/// offset of `KEYS[1]` as `POSITION` describes.
const POSITION_OF: &str = r#"
local function position()
  local created = redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
  local v = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
  local offset = v[2] or '0'
  if created == 1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
  elseif offset == '0' then
    redis.call('PEXPIRE', KEYS[1], ARGV[3], 'GT')
  else
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return {v[1], offset}
end
"#;

/// The channel's position (as [`POSITION`]: `KEYS[1]` meta, `ARGV[1..3]`) and, as of it, the
/// latest message of each device heard since `ARGV[4]` (ms) in the channel's current epoch, as
/// stored: `<ms> <message>`.
/// Returns `{epoch, offset, {value, ...}}`; one call, so no message is newer than the offset.
/// Ordering and cutting to the limits is the hub's work: Redis is held only for reading the
/// hash (under a second for 100,000 devices on a small machine, docs/benchmarks.md).
const SNAPSHOT: &str = r#"
local pos = position()
local since = tonumber(ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
local found = {}
-- Only the current epoch's: after Redis lost writes (a new epoch) the values kept from the lost
-- timeline name offsets the live stream will reuse.
local current = '"epoch":"' .. pos[1] .. '"'
for k = 1, #all, 2 do
  if string.byte(all[k], 1) == 64 then
    local value = all[k + 1]
    local at = tonumber(string.match(value, '^(%d+) '))
    if at and at >= since and string.find(value, current, 1, true) then
      found[#found + 1] = value
    end
  end
end
return {pos[1], pos[2], found}
"#;

/// Gives the channel a new epoch if it still has `ARGV[1]` and its offset is below `ARGV[2]`:
/// Redis lost writes that hubs had already delivered (a crash between fsyncs, a failover to a
/// lagging replica), so the offsets ahead would be reused. Returns the epoch the channel has now.
const REWOUND: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
if epoch == ARGV[1] and offset < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[3])
  redis.call('DEL', KEYS[2])
  return ARGV[3]
end
return epoch
"#;

pub fn meta_key(channel: &str) -> String {
    format!("tl:{{{channel}}}:meta")
}

pub fn log_key(channel: &str) -> String {
    format!("tl:{{{channel}}}:log")
}

/// The hash that remembers `device`'s last accepted `seq` (field `device`), kept in the slot of
/// the device's own channel.
pub fn device_seq_key(device: &str) -> String {
    let channel = hub_protocol::channel::device_channel(device);
    format!("tl:{{{channel}}}:seq")
}

/// The hash of `incarnation:seq` per device that a channel keeps on a cluster.
pub fn guard_key(channel: &str) -> String {
    format!("tl:{{{channel}}}:from")
}

pub fn pubsub_channel(channel: &str) -> String {
    format!("tl:{{{channel}}}:pub")
}

/// The hub channel behind a Redis pub/sub channel name.
pub fn channel_of(pubsub: &str) -> Option<&str> {
    pubsub.strip_prefix("tl:{")?.strip_suffix("}:pub")
}

/// A key of the pool's presence state, in the slot of the `presence` channel.
pub fn presence_key(name: &str) -> String {
    format!("tl:{{{}}}:{name}", hub_protocol::presence::CHANNEL)
}

/// One call of [`Store::presence`].
#[derive(Debug)]
pub struct PresenceWrite<'a> {
    /// This hub process: `<node id>/<random>`, new at every start.
    pub instance: &'a str,
    pub lease: Duration,
    /// The hub is stopping: its lease ends now and its devices go with it.
    pub leaving: bool,
    /// At most this many devices of dead hubs are taken off per call.
    pub sweep_budget: usize,
    pub changes: &'a [PresenceUpdate<'a>],
}

/// Whether a device is held by this hub now, and since when and why.
#[derive(Debug, Clone, Copy)]
pub struct PresenceUpdate<'a> {
    pub device: &'a str,
    pub online: bool,
    pub reason: &'a str,
    pub at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceReply {
    /// The lease existed before this call: false on the first write, and after other hubs took
    /// this one for dead (its devices were then marked offline and must be written again).
    pub held: bool,
    /// Online messages this call published.
    pub online: u64,
    /// Offline messages this call published (this hub's and dead hubs').
    pub offline: u64,
    /// Dead hubs whose devices are still to be taken off.
    pub sweeping: u64,
}

/// One reading for [`Store::publish`].
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    pub seq: u64,
    pub data: &'a RawValue,
    /// The W3C trace context the reading travels with, when it is traced.
    pub traceparent: Option<&'a str>,
}

/// One message of a pub/sub payload: where it sits and the `message` JSON to send.
///
/// A payload holds the messages one script call appended to a channel. One message is
/// `<offset> <epoch> <ms>[ <traceparent>]\n<message JSON>` (the form hubs before batching
/// read); several are `=<count>\n` and then each as `<offset> <epoch> <ms> <length>[
/// <traceparent>]\n<message JSON of length bytes>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub offset: u64,
    pub epoch: &'a str,
    /// Wall-clock time of the publication, ms since the Unix epoch.
    pub published_ms: u64,
    /// The W3C trace context of the publish, when it was traced.
    pub traceparent: Option<&'a str>,
    pub message: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// The messages of one payload, in offset order; `None` if any part is unreadable.
    pub fn parse_all(payload: &'a [u8]) -> Option<Vec<Envelope<'a>>> {
        let Some(rest) = payload.strip_prefix(b"=") else {
            return Some(vec![Envelope::parse(payload)?]);
        };
        let (count, mut rest) = split_line(rest)?;
        let count: usize = count.parse().ok()?;
        // Each message takes more than 8 bytes: a count the payload cannot hold is garbage.
        let mut out = Vec::with_capacity(count.min(rest.len() / 8));
        for _ in 0..count {
            let (head, body) = split_line(rest)?;
            let mut fields = head.split(' ');
            let offset = fields.next()?.parse().ok()?;
            let epoch = fields.next()?;
            let published_ms = fields.next()?.parse().ok()?;
            let len: usize = fields.next()?.parse().ok()?;
            let traceparent = fields.next();
            if body.len() < len {
                return None;
            }
            let (message, next) = body.split_at(len);
            out.push(Envelope {
                offset,
                epoch,
                published_ms,
                traceparent,
                message,
            });
            rest = next;
        }
        rest.is_empty().then_some(out)
    }

    /// A payload of one message.
    pub fn parse(payload: &'a [u8]) -> Option<Envelope<'a>> {
        let (head, message) = split_line(payload)?;
        let mut parts = head.split(' ');
        let offset = parts.next()?.parse().ok()?;
        let epoch = parts.next()?;
        let published_ms = parts.next()?.parse().ok()?;
        Some(Envelope {
            offset,
            epoch,
            published_ms,
            traceparent: parts.next(),
            message,
        })
    }
}

/// The text before the first newline, and the bytes after it.
fn split_line(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let newline = bytes.iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(&bytes[..newline]).ok()?;
    Some((head, &bytes[newline + 1..]))
}

/// One history entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub offset: u64,
    pub at_ms: u64,
    pub message: Vec<u8>,
}

/// Where the store's commands go.
pub enum Commands {
    /// One Redis: a pool of connections.
    Single(Pool),
    /// A Redis Cluster: one client, each command routed to the shard that owns its key's slot.
    Cluster(Box<Cluster>),
}

/// The cluster client, connected on first use, so a hub starts while the cluster is still down.
pub struct Cluster {
    pub client: ClusterClient,
    pub connection: Mutex<Option<ClusterConnection>>,
}

/// A connection for one command, from either kind of [`Commands`].
enum Conn {
    Pooled(deadpool_redis::Connection),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Pooled(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Pooled(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Pooled(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub struct Store {
    commands: Commands,
    publish: Script,
    seq_state: Script,
    publish_guarded: Script,
    publish_own: Script,
    position: Script,
    snapshot: Script,
    rewound: Script,
    presence: Script,
    history: HistorySettings,
    /// How long a channel nobody has published to keeps its epoch unless a hub watching it
    /// extends it.
    idle_ttl: Duration,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {e}"))
}

impl Store {
    /// `idle_ttl` must be well above how often the relay checks positions (it extends it then).
    pub fn new(
        commands: Commands,
        history: HistorySettings,
        idle_ttl: Duration,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let idle_ttl = idle_ttl.min(history.meta_ttl);
        Store {
            publish: script("PUBLISH", PUBLISH),
            seq_state: Script::new(SEQ_STATE),
            publish_guarded: script("SPUBLISH", PUBLISH_GUARDED),
            publish_own: script("SPUBLISH", PUBLISH_OWN),
            position: Script::new(&format!("{POSITION_OF}\n{POSITION}")),
            snapshot: Script::new(&format!("{POSITION_OF}\n{SNAPSHOT}")),
            rewound: Script::new(REWOUND),
            presence: match &commands {
                Commands::Single(_) => script("PUBLISH", PRESENCE),
                Commands::Cluster(_) => script("SPUBLISH", PRESENCE),
            },
            commands,
            history,
            idle_ttl,
            timeout,
            metrics,
        }
    }

    async fn connection(&self) -> Result<Conn, BrokerError> {
        match &self.commands {
            Commands::Single(pool) => Ok(Conn::Pooled(pool.get().await.map_err(unavailable)?)),
            Commands::Cluster(cluster) => {
                let Cluster { client, connection } = &**cluster;
                let existing = connection
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                if let Some(conn) = existing {
                    return Ok(Conn::Cluster(conn));
                }
                let conn = client.get_async_connection().await.map_err(unavailable)?;
                *connection.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
                Ok(Conn::Cluster(conn))
            }
        }
    }

    /// Drops the cached cluster connection, so the next command makes a new one from the seed
    /// nodes. redis-rs's cluster client can lose every node at once (all of them restarted)
    /// and then only ever retries a slot refresh through connections it no longer has
    /// (`ClusterConnectionNotFound`): without this a hub would refuse every publish for good.
    fn forget_connection(&self) {
        if let Commands::Cluster(cluster) = &self.commands {
            *cluster
                .connection
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self.commands, Commands::Cluster(_))
    }

    async fn run<T>(
        &self,
        f: impl AsyncFnOnce(&mut Conn) -> redis::RedisResult<T>,
    ) -> Result<T, BrokerError> {
        let work = async {
            let mut conn = self.connection().await?;
            f(&mut conn).await.map_err(|e| {
                if lost_connection(&e) {
                    self.forget_connection();
                }
                unavailable(e)
            })
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                self.forget_connection();
                Err(unavailable("timed out"))
            });
        self.metrics.redis_commands.observe(started.elapsed());
        if result.is_err() {
            self.metrics.redis_errors.inc();
        }
        result
    }

    /// Appends the readings of one device to `channels`; returns per reading whether it was
    /// appended (`false`: a duplicate). On one Redis it is one script, applied to every channel or
    /// to none. On a cluster: the device's record, then the other channels at once, then the
    /// device's own channel (see the module's description), one call each for all the readings;
    /// an error anywhere fails them all, and their resend completes the channels they missed
    /// without duplicating the others.
    pub async fn publish(
        &self,
        device: &str,
        channels: &[String],
        readings: &[Append<'_>],
    ) -> Result<Vec<bool>, BrokerError> {
        let epoch = crate::broker::new_epoch();
        let now = now_ms();
        let shared = |call: &mut redis::ScriptInvocation<'_>, readings: &[&Append<'_>]| {
            call.arg(device)
                .arg(now)
                .arg(self.history.size)
                .arg(self.history.meta_ttl.as_millis() as u64)
                .arg(&epoch)
                .arg(readings.len())
                .arg(self.history.snapshot_devices);
            for r in readings {
                call.arg(r.seq)
                    .arg(r.data.get())
                    .arg(r.traceparent.unwrap_or(""));
            }
        };
        let taken = |flags: Vec<u8>| flags.into_iter().map(|f| f == 1).collect::<Vec<_>>();
        if !self.is_cluster() {
            let all: Vec<&Append<'_>> = readings.iter().collect();
            let mut call = self.publish.prepare_invoke();
            call.key(device_seq_key(device));
            for channel in channels {
                call.key(meta_key(channel)).key(log_key(channel));
            }
            shared(&mut call, &all);
            for channel in channels {
                call.arg(channel).arg(partition::label(channel));
            }
            let flags = self.run(async |conn| call.invoke_async(conn).await).await?;
            return Ok(taken(flags));
        }
        let own = hub_protocol::channel::device_channel(device);
        let mut state = self.seq_state.prepare_invoke();
        state
            .key(device_seq_key(device))
            .arg(device)
            .arg(crate::broker::new_epoch())
            .arg(self.history.meta_ttl.as_millis() as u64);
        let (incarnation, last): (String, String) = self
            .run(async |conn| state.invoke_async(conn).await)
            .await?;
        // Those at or below the record's seq are on every channel already: the own channel is
        // committed last. The rest go on in increasing seq.
        let mut newest: u64 = last
            .parse()
            .map_err(|_| unavailable(format!("the seq record of `{device}` holds `{last}`")))?;
        let mut fresh = Vec::with_capacity(readings.len());
        let mut is_fresh = Vec::with_capacity(readings.len());
        for r in readings {
            let above = r.seq > newest;
            if above {
                fresh.push(r);
                newest = r.seq;
            }
            is_fresh.push(above);
        }
        if fresh.is_empty() {
            return Ok(vec![false; readings.len()]);
        }
        let others = channels.iter().filter(|c| **c != own).map(|channel| {
            let mut call = self.publish_guarded.prepare_invoke();
            call.key(meta_key(channel))
                .key(log_key(channel))
                .key(guard_key(channel));
            shared(&mut call, &fresh);
            call.arg(channel)
                .arg(&incarnation)
                .arg(partition::label(channel));
            async move {
                self.run(async |conn| call.invoke_async::<u64>(conn).await)
                    .await
            }
        });
        futures_util::future::try_join_all(others).await?;
        let mut call = self.publish_own.prepare_invoke();
        call.key(device_seq_key(device))
            .key(meta_key(&own))
            .key(log_key(&own));
        shared(&mut call, &fresh);
        call.arg(&own).arg(&incarnation).arg(partition::label(&own));
        let flags: Vec<u8> = self.run(async |conn| call.invoke_async(conn).await).await?;
        // Back to one flag per reading, in the order they came.
        let mut appended = taken(flags).into_iter();
        Ok(is_fresh
            .into_iter()
            .map(|fresh| fresh && appended.next().unwrap_or(false))
            .collect())
    }

    /// The channel's current `(epoch, offset)`; creates its epoch if it has none.
    pub async fn position(&self, channel: &str) -> Result<(String, u64), BrokerError> {
        let mut call = self.position.prepare_invoke();
        call.key(meta_key(channel))
            .arg(crate::broker::new_epoch())
            .arg(self.history.meta_ttl.as_millis() as u64)
            .arg(self.idle_ttl.as_millis() as u64);
        let (epoch, offset): (String, u64) =
            self.run(async |conn| call.invoke_async(conn).await).await?;
        Ok((epoch, offset))
    }

    /// The channel's position and, as of it, the latest message of each device heard within
    /// `history.meta_ttl`, oldest first: at most `history.snapshot_devices` of them and about
    /// `budget` bytes, the newest kept. The flag says some were left out.
    pub async fn snapshot(
        &self,
        channel: &str,
        budget: usize,
    ) -> Result<(String, u64, Vec<Vec<u8>>, bool), BrokerError> {
        // As the embedded broker: presence's latest values do not age.
        let since = match channel == hub_protocol::presence::CHANNEL {
            true => 0,
            false => now_ms().saturating_sub(self.history.meta_ttl.as_millis() as u64),
        };
        let mut call = self.snapshot.prepare_invoke();
        call.key(meta_key(channel))
            .arg(crate::broker::new_epoch())
            .arg(self.history.meta_ttl.as_millis() as u64)
            .arg(self.idle_ttl.as_millis() as u64)
            .arg(since);
        let (epoch, offset, values): (String, u64, Vec<Vec<u8>>) =
            self.run(async |conn| call.invoke_async(conn).await).await?;
        let (items, cut) = newest_within(values, self.history.snapshot_devices, budget);
        Ok((epoch, offset, items, cut))
    }

    /// Starts a new epoch for a channel whose offset fell below `delivered` in `epoch`; returns
    /// the channel's epoch afterwards.
    pub async fn renew_rewound_epoch(
        &self,
        channel: &str,
        epoch: &str,
        delivered: u64,
    ) -> Result<String, BrokerError> {
        let mut call = self.rewound.prepare_invoke();
        call.key(meta_key(channel))
            .key(log_key(channel))
            .arg(epoch)
            .arg(delivered)
            .arg(crate::broker::new_epoch());
        let epoch: Option<String> = self.run(async |conn| call.invoke_async(conn).await).await?;
        Ok(epoch.unwrap_or_default())
    }

    /// `(epoch, offset)` of many channels without creating anything; `None` where unknown. On a
    /// cluster each channel is asked on its own, and one whose shard does not answer is unknown
    /// too: the others are still repaired.
    pub async fn positions(
        &self,
        channels: &[String],
    ) -> Result<Vec<Option<(String, u64)>>, BrokerError> {
        if self.is_cluster() {
            let each = channels.iter().map(|channel| async move {
                let row: Result<(Option<String>, Option<u64>), _> = self
                    .run(async |conn| {
                        redis::cmd("HMGET")
                            .arg(meta_key(channel))
                            .arg("epoch")
                            .arg("offset")
                            .query_async(conn)
                            .await
                    })
                    .await;
                row.ok().and_then(|(e, o)| e.map(|e| (e, o.unwrap_or(0))))
            });
            return Ok(futures_util::future::join_all(each).await);
        }
        let mut pipe = redis::pipe();
        for channel in channels {
            pipe.cmd("HMGET")
                .arg(meta_key(channel))
                .arg("epoch")
                .arg("offset");
        }
        let rows: Vec<(Option<String>, Option<u64>)> =
            self.run(async |conn| pipe.query_async(conn).await).await?;
        Ok(rows
            .into_iter()
            .map(|(e, o)| e.map(|e| (e, o.unwrap_or(0))))
            .collect())
    }

    /// Keeps the epochs of watched channels nobody has published to yet from expiring under their
    /// subscribers (`PEXPIRE … GT`: never shortens a key's life).
    pub async fn keep_idle(&self, channels: &[&str]) -> Result<(), BrokerError> {
        if channels.is_empty() {
            return Ok(());
        }
        let ttl = self.idle_ttl.as_millis() as u64;
        if self.is_cluster() {
            // Slot by slot; a shard that does not answer keeps its keys' old TTL until the
            // next check.
            let each = channels.iter().map(|channel| {
                self.run(async |conn| {
                    redis::cmd("PEXPIRE")
                        .arg(meta_key(channel))
                        .arg(ttl)
                        .arg("GT")
                        .query_async::<()>(conn)
                        .await
                })
            });
            futures_util::future::join_all(each).await;
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for channel in channels {
            pipe.cmd("PEXPIRE")
                .arg(meta_key(channel))
                .arg(ttl)
                .arg("GT")
                .ignore();
        }
        self.run(async |conn| pipe.query_async::<()>(conn).await)
            .await
    }

    /// History entries with offsets in `(after, upto]` that are younger than the history TTL.
    pub async fn range(
        &self,
        channel: &str,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Vec<Entry>, BrokerError> {
        Ok(self.range_within(channel, after, upto, usize::MAX).await?.0)
    }

    /// As [`Store::range`], read in chunks and stopped once the messages pass `max_bytes`: then
    /// the second value is true and the entries are only the start of the range. A replay that
    /// could never be queued is not loaded whole to find that out.
    pub async fn range_within(
        &self,
        channel: &str,
        after: u64,
        upto: Option<u64>,
        max_bytes: usize,
    ) -> Result<(Vec<Entry>, bool), BrokerError> {
        const CHUNK: usize = 512;
        let key = log_key(channel);
        let end = upto.map_or("+".to_owned(), |u| format!("{u}-0"));
        let oldest = now_ms().saturating_sub(self.history.ttl.as_millis() as u64);
        let (mut entries, mut bytes, mut from) = (Vec::new(), 0usize, after);
        loop {
            let start = format!("({from}-0");
            let value: Value = self
                .run(async |conn| {
                    redis::cmd("XRANGE")
                        .arg(&key)
                        .arg(&start)
                        .arg(&end)
                        .arg("COUNT")
                        .arg(CHUNK)
                        .query_async(conn)
                        .await
                })
                .await?;
            let full = matches!(&value, Value::Array(items) if items.len() == CHUNK);
            for entry in parse_range(value) {
                from = from.max(entry.offset);
                if entry.at_ms < oldest {
                    continue;
                }
                bytes = bytes.saturating_add(entry.message.len());
                entries.push(entry);
            }
            if bytes > max_bytes {
                return Ok((entries, true));
            }
            if !full {
                return Ok((entries, false));
            }
        }
    }

    /// Renews this hub's presence lease, writes its changes and sweeps dead hubs (the
    /// [`PRESENCE`] script).
    pub async fn presence(&self, write: &PresenceWrite<'_>) -> Result<PresenceReply, BrokerError> {
        let channel = hub_protocol::presence::CHANNEL;
        let mut call = self.presence.prepare_invoke();
        call.key(meta_key(channel))
            .key(log_key(channel))
            .key(presence_key("hubs"))
            .key(presence_key("online"))
            .key(presence_key(&format!("on:{}", write.instance)))
            .key(presence_key("gone"));
        call.arg("")
            .arg(now_ms())
            .arg(self.history.size)
            .arg(self.history.meta_ttl.as_millis() as u64)
            .arg(crate::broker::new_epoch())
            .arg(0)
            .arg(self.history.snapshot_devices);
        call.arg(write.instance)
            .arg(write.lease.as_millis() as u64)
            .arg(u8::from(write.leaving))
            .arg(write.sweep_budget)
            .arg(partition::label(channel))
            .arg(write.changes.len());
        for change in write.changes {
            call.arg(change.device)
                .arg(u8::from(change.online))
                .arg(change.reason)
                .arg(change.at);
        }
        let (held, online, offline, sweeping): (u8, u64, u64, u64) =
            self.run(async |conn| call.invoke_async(conn).await).await?;
        Ok(PresenceReply {
            held: held == 1,
            online,
            offline,
            sweeping,
        })
    }

    /// The last `seq` accepted from `device`.
    pub async fn last_seq(&self, device: &str) -> Result<u64, BrokerError> {
        let key = device_seq_key(device);
        let seq: Option<u64> = self
            .run(async |conn| {
                redis::cmd("HGET")
                    .arg(&key)
                    .arg(device)
                    .query_async(conn)
                    .await
            })
            .await?;
        Ok(seq.unwrap_or(0))
    }
}

/// Stored latest values (`<ms> <message>`) to snapshot items: the newest `max` that fit in
/// about `budget` bytes, oldest first; true when some were left out.
fn newest_within(values: Vec<Vec<u8>>, max: usize, budget: usize) -> (Vec<Vec<u8>>, bool) {
    let mut dated: Vec<(u64, Vec<u8>)> = values
        .into_iter()
        .filter_map(|mut value| {
            let space = value.iter().position(|b| *b == b' ')?;
            let at = std::str::from_utf8(&value[..space]).ok()?.parse().ok()?;
            value.drain(..=space);
            Some((at, value))
        })
        .collect();
    dated.sort_unstable_by_key(|(at, _)| std::cmp::Reverse(*at));
    let over = dated.len() > max;
    dated.truncate(max);
    let mut bytes = 0usize;
    let mut kept = dated.len();
    for (k, (_, message)) in dated.iter().enumerate() {
        bytes = bytes.saturating_add(message.len() + 1);
        if bytes > budget {
            kept = k;
            break;
        }
    }
    let cut = over || kept < dated.len();
    dated.truncate(kept);
    (dated.into_iter().rev().map(|(_, m)| m).collect(), cut)
}

/// Parses an XRANGE reply: `[[id, [field, value, …]], …]`.
fn parse_range(value: Value) -> Vec<Entry> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        let fields = pair.pop();
        let id = pair.pop();
        let Some(Value::BulkString(id)) = id else {
            continue;
        };
        let Some(offset) = std::str::from_utf8(&id)
            .ok()
            .and_then(|s| s.split('-').next()?.parse().ok())
        else {
            continue;
        };
        let Some(Value::Array(fields)) = fields else {
            continue;
        };
        let mut entry = Entry {
            offset,
            at_ms: 0,
            message: Vec::new(),
        };
        let mut it = fields.into_iter();
        while let (Some(Value::BulkString(k)), Some(Value::BulkString(v))) = (it.next(), it.next())
        {
            match &k[..] {
                b"t" => {
                    entry.at_ms = std::str::from_utf8(&v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
                }
                b"m" => entry.message = v,
                _ => {}
            }
        }
        entries.push(entry);
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_parse_and_reject_garbage() {
        let env = Envelope::parse(b"12 ab34 1700000000000\n{\"type\":\"message\"}").unwrap();
        assert_eq!(env.offset, 12);
        assert_eq!(env.epoch, "ab34");
        assert_eq!(env.published_ms, 1_700_000_000_000);
        assert_eq!(env.message, b"{\"type\":\"message\"}");
        assert_eq!(env.traceparent, None);
        let traced =
            Envelope::parse(b"3 ab 1 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n{}");
        assert_eq!(
            traced.unwrap().traceparent,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert!(Envelope::parse(b"no newline").is_none());
        assert!(Envelope::parse(b"x ab 1\n{}").is_none());
    }

    #[test]
    fn a_batch_payload_holds_its_messages_in_order_and_garbage_is_refused() {
        let batch = b"=2\n7 ab 1 5\n{\"a\"}8 ab 1 3 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n{\n}";
        let all = Envelope::parse_all(batch).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].offset, all[0].message), (7, &b"{\"a\"}"[..]));
        assert_eq!(
            (all[1].offset, all[1].message),
            (8, &b"{\n}"[..]),
            "a newline in the data"
        );
        assert!(all[1].traceparent.is_some());
        let one = Envelope::parse_all(b"12 ab34 1700000000000\n{}").unwrap();
        assert_eq!((one.len(), one[0].offset), (1, 12));
        assert!(
            Envelope::parse_all(b"=2\n7 ab 1 5\n{\"a\"}").is_none(),
            "one missing"
        );
        assert!(
            Envelope::parse_all(b"=1\n7 ab 1 9\n{}").is_none(),
            "too short"
        );
        assert!(
            Envelope::parse_all(b"=1\n7 ab 1 2\n{}tail").is_none(),
            "bytes left over"
        );
        assert!(Envelope::parse_all(b"=99999999999\n").is_none());
    }

    #[test]
    fn a_snapshot_keeps_the_newest_within_its_limits_oldest_first() {
        let values: Vec<Vec<u8>> = [(3, "c"), (1, "a"), (2, "b"), (4, "dd")]
            .iter()
            .map(|(at, m)| format!("{at} {m}").into_bytes())
            .collect();
        let all = newest_within(values.clone(), 10, 100);
        assert_eq!(
            all,
            (
                vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"dd".to_vec()],
                false
            )
        );
        assert_eq!(
            newest_within(values.clone(), 2, 100),
            (vec![b"c".to_vec(), b"dd".to_vec()], true),
            "over the count"
        );
        assert_eq!(
            newest_within(values, 10, 5),
            (vec![b"c".to_vec(), b"dd".to_vec()], true)
        );
    }

    #[test]
    fn pubsub_names_map_back_to_channels() {
        assert_eq!(
            channel_of(&pubsub_channel("devices.pi-1")),
            Some("devices.pi-1")
        );
        assert_eq!(channel_of("other"), None);
    }
}
