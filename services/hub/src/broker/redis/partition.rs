//! Partitions of the channels every device writes to, so that no Redis Cluster shard takes the
//! whole fleet's publications.
//!
//! `fleet` and `groups.<g>` take a publication from every device of the pool (or group): on a
//! cluster, one slot, one shard, would do that work for all of them. With `broker.partitions`
//! P > 1 such a channel is P logs instead, each with its own epoch and offsets; a device always
//! writes to the same one (`part_of`), so its readings stay in order, and a subscriber gets all
//! P. A device's own channel is never split: it has one writer.
//!
//! Partition k's internal name is `<channel>#<k>/<P>:<n>`, where `n` is the first number that puts
//! the name's hash slot into the k-th P-th of the slot space: the partitions spread over the
//! slot ranges, and so over the masters of a cluster whose slots are spread evenly. `#` never
//! appears in a channel name, so the internal name says which channel and partition it is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use hub_protocol::channel::FLEET;

/// Redis Cluster's number of hash slots.
const SLOTS: u32 = 16384;
/// Channels whose internal names are kept per hub (each P names); a cache filled by input is
/// bounded all the same. Past it the cache starts over, which costs recomputing names.
const MAX_CACHED: usize = 16_384;

/// Whether `channel` is written by many devices and so split when partitions are on.
pub fn is_partitioned(channel: &str) -> bool {
    channel == FLEET || channel.starts_with("groups.")
}

/// The partition of `parts` that `device` writes to: FNV-1a of its id, the same on every hub.
pub fn part_of(device: &str, parts: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in device.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(parts.max(1))) as u32
}

/// The Redis Cluster hash slot of `key` as a whole (CRC16/XMODEM mod 16384, no hashtag rule: the
/// store puts the name between braces itself).
pub fn slot(key: &str) -> u32 {
    let mut crc: u16 = 0;
    for byte in key.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    u32::from(crc) % SLOTS
}

/// The internal name of partition `part` of `parts` of `channel`.
pub fn internal(channel: &str, part: u32, parts: u32) -> String {
    let parts = parts.max(1);
    let low = part * SLOTS / parts;
    let high = (part + 1) * SLOTS / parts;
    // CRC16 is uniform enough that about `parts` tries find the range; the bound only guards
    // against a range no name reaches, which then takes the last name tried.
    let mut name = String::new();
    for n in 0..(64 * parts).max(1024) {
        name = format!("{channel}#{part}/{parts}:{n}");
        if (low..high).contains(&slot(&name)) {
            break;
        }
    }
    name
}

/// `(channel, Some((part, parts)))` of an internal name, `(name, None)` for a channel that is not
/// split.
pub fn parse(name: &str) -> (&str, Option<(u32, u32)>) {
    let Some((channel, rest)) = name.split_once('#') else {
        return (name, None);
    };
    let partition = rest.split_once(':').and_then(|(position, _)| {
        let (part, parts) = position.split_once('/')?;
        Some((part.parse().ok()?, parts.parse().ok()?))
    });
    match partition {
        Some(partition) => (channel, Some(partition)),
        None => (name, None),
    }
}

/// The JSON text that follows `"channel":` in a message of the channel with this internal
/// name: the public name and, for a partition, its number. Channel names need no escaping.
pub fn label(name: &str) -> String {
    match parse(name) {
        (channel, Some((part, _))) => format!(r#""{channel}","part":{part}"#),
        (channel, None) => format!(r#""{channel}""#),
    }
}

/// The pool's partitioning: how many partitions a split channel has, and their internal names.
pub struct Partitions {
    parts: u32,
    names: Mutex<HashMap<String, Arc<[String]>>>,
}

impl Partitions {
    pub fn new(parts: u32) -> Self {
        Partitions {
            parts: parts.max(1),
            names: Mutex::new(HashMap::new()),
        }
    }

    /// Partitions per split channel; 1 means nothing is split.
    pub fn parts(&self) -> u32 {
        self.parts
    }

    /// The internal names behind `channel`: itself when it is not split, else one per partition
    /// in partition order.
    pub fn names(&self, channel: &str) -> Arc<[String]> {
        if self.parts == 1 || !is_partitioned(channel) {
            return Arc::from([channel.to_owned()]);
        }
        let cached = self
            .names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(channel)
            .cloned();
        if let Some(names) = cached {
            return names;
        }
        // Computed outside the lock (about P hashes per name): publishes of other channels go on.
        let names: Arc<[String]> = (0..self.parts)
            .map(|k| internal(channel, k, self.parts))
            .collect();
        let mut cache = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(channel.to_owned(), names.clone());
        names
    }

    /// The internal name `device` writes to for `channel`.
    pub fn target(&self, channel: &str, device: &str) -> String {
        if self.parts == 1 || !is_partitioned(channel) {
            return channel.to_owned();
        }
        let part = part_of(device, self.parts) as usize;
        self.names(channel)
            .get(part)
            .cloned()
            .unwrap_or_else(|| internal(channel, part as u32, self.parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_redis_computes() {
        // `CLUSTER KEYSLOT foo` and the CRC16/XMODEM check value.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("123456789"), 0x31c3 % SLOTS);
    }

    #[test]
    fn each_partition_lands_in_its_own_share_of_the_slots() {
        for parts in [2, 3, 6, 16, 64] {
            for k in 0..parts {
                let name = internal("fleet", k, parts);
                let s = slot(&name);
                assert!(
                    (k * SLOTS / parts..(k + 1) * SLOTS / parts).contains(&s),
                    "{name} is in slot {s}"
                );
            }
        }
    }

    #[test]
    fn internal_names_say_their_channel_and_partition() {
        let name = internal("groups.north", 3, 16);
        assert_eq!(parse(&name), ("groups.north", Some((3, 16))));
        assert_eq!(label(&name), r#""groups.north","part":3"#);
        assert_eq!(parse("devices.pi-1"), ("devices.pi-1", None));
        assert_eq!(label("fleet"), r#""fleet""#);
    }

    #[test]
    fn devices_spread_over_the_partitions_and_always_pick_the_same_one() {
        let mut counts = [0u32; 16];
        for d in 0..16_000 {
            counts[part_of(&format!("pi-{d}"), 16) as usize] += 1;
        }
        for count in counts {
            assert!((850..1150).contains(&count), "{counts:?}");
        }
        assert_eq!(part_of("pi-7", 16), part_of("pi-7", 16));
    }

    #[test]
    fn only_channels_with_many_writers_are_split() {
        let p = Partitions::new(4);
        assert_eq!(p.names("devices.pi-1")[..], ["devices.pi-1"]);
        assert_eq!(p.names("fleet").len(), 4);
        assert_eq!(p.names("groups.lab").len(), 4);
        let target = p.target("fleet", "pi-1");
        assert_eq!(parse(&target).1, Some((part_of("pi-1", 4), 4)));
        assert_eq!(Partitions::new(1).names("fleet")[..], ["fleet"]);
    }
}
