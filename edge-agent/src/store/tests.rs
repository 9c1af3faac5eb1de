use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use super::format::{FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::testing::{after_power_cut, segment_files, synced_lengths};
use super::*;

const SEGMENT: u64 = 4096;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 20,
        segment_bytes: SEGMENT,
        fsync: FsyncPolicy::Always,
    }
}

fn interval(dir: &Path) -> StoreConfig {
    StoreConfig {
        fsync: FsyncPolicy::Interval(Duration::from_secs(1)),
        ..config(dir)
    }
}

fn payload(seq: u64) -> Vec<u8> {
    format!("reading #{seq}").into_bytes()
}

fn append_range(log: &mut Log, seqs: impl IntoIterator<Item = u64>) {
    for seq in seqs {
        log.append(seq, &payload(seq)).unwrap();
    }
}

fn read_all(log: &mut Log) -> Vec<Record> {
    log.read_after(0, usize::MAX, usize::MAX).unwrap()
}

fn seqs(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

fn segment_bytes_on_disk(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

fn assert_records(log: &mut Log, expected: impl IntoIterator<Item = u64>) {
    let expected: Vec<Record> = expected
        .into_iter()
        .map(|seq| Record {
            seq,
            payload: payload(seq),
        })
        .collect();
    assert_eq!(read_all(log), expected);
}

#[test]
fn appended_records_are_read_back_in_order_and_acked_ones_disappear() {
    let dir = TempDir::new().unwrap();
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_eq!(log.last_seq(), 0);
    append_range(&mut log, 1..=10);
    assert_records(&mut log, 1..=10);

    log.ack(4).unwrap();
    assert_eq!(log.acked_seq(), 4);
    assert_records(&mut log, 5..=10);
    let stats = log.stats();
    assert_eq!(stats.pending_records, 6);
    let frame_bytes: u64 = (5..=10)
        .map(|s| FRAME_HEADER_LEN + payload(s).len() as u64)
        .sum();
    assert_eq!(stats.pending_bytes, frame_bytes);
    assert_eq!(stats.last_seq, 10);
    assert_eq!(stats.segments, 1);
}

#[test]
fn reopening_resumes_with_the_same_unacked_records() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=300);
        log.ack(120).unwrap();
    }
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_eq!(log.acked_seq(), 120);
    assert_eq!(log.last_seq(), 300);
    assert_eq!(log.stats().pending_records, 180);
    assert_records(&mut log, 121..=300);
    append_range(&mut log, 301..=310);
    assert_records(&mut log, 121..=310);
}

#[test]
fn sequence_numbers_must_strictly_increase() {
    let dir = TempDir::new().unwrap();
    let mut log = Log::open(config(dir.path())).unwrap();
    assert!(matches!(
        log.append(0, b"x"),
        Err(StoreError::SeqNotIncreasing { seq: 0, last: 0 })
    ));
    log.append(5, b"x").unwrap();
    for seq in [3, 5] {
        assert!(matches!(
            log.append(seq, b"x"),
            Err(StoreError::SeqNotIncreasing { last: 5, .. })
        ));
    }
    log.append(9, b"y").unwrap(); // gaps are fine
    assert_eq!(seqs(&read_all(&mut log)), [5, 9]);
}

#[test]
fn last_seq_survives_acking_everything_and_reopening() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(interval(dir.path())).unwrap();
        append_range(&mut log, 1..=400);
        log.ack(400).unwrap();
        log.sync().unwrap();
        assert_eq!(log.stats().pending_records, 0);
        assert_eq!(log.stats().segments, 1, "only the active segment remains");
    }
    let mut log = Log::open(interval(dir.path())).unwrap();
    assert_eq!(log.last_seq(), 400);
    assert_eq!(log.acked_seq(), 400);
    assert!(read_all(&mut log).is_empty());
    assert!(matches!(
        log.append(400, b"x"),
        Err(StoreError::SeqNotIncreasing { last: 400, .. })
    ));
    log.append(401, b"x").unwrap();
}

#[test]
fn last_seq_survives_even_when_no_segment_file_is_left() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=3);
        log.ack(3).unwrap();
    }
    for path in segment_files(dir.path()) {
        fs::remove_file(path).unwrap();
    }
    let log = Log::open(config(dir.path())).unwrap();
    assert_eq!(log.last_seq(), 3);
}

#[test]
fn raise_seq_floor_is_durable_and_blocks_lower_sequence_numbers() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(interval(dir.path())).unwrap();
        log.raise_seq_floor(1000).unwrap();
        assert_eq!(log.last_seq(), 1000);
        assert!(matches!(
            log.append(1000, b"x"),
            Err(StoreError::SeqNotIncreasing {
                seq: 1000,
                last: 1000
            })
        ));
        // Lowering is a no-op.
        log.raise_seq_floor(10).unwrap();
        assert_eq!(log.last_seq(), 1000);
    }
    let mut log = Log::open(interval(dir.path())).unwrap();
    assert_eq!(log.last_seq(), 1000, "floor persisted without sync()");
    log.append(1001, b"x").unwrap();
    assert_eq!(log.last_seq(), 1001);
    log.raise_seq_floor(1001).unwrap();
    assert_eq!(log.last_seq(), 1001);
}

#[test]
fn exceeding_max_bytes_drops_the_oldest_segments_and_counts_them() {
    let dir = TempDir::new().unwrap();
    let cfg = StoreConfig {
        max_bytes: 3 * SEGMENT,
        ..config(dir.path())
    };
    let record = vec![7u8; 200];
    let mut log = Log::open(cfg.clone()).unwrap();
    let mut dropped = 0;
    for seq in 1..=200 {
        dropped += log.append(seq, &record).unwrap().dropped;
        assert!(segment_bytes_on_disk(dir.path()) <= cfg.max_bytes);
    }
    let stats = log.stats();
    assert!(dropped > 0);
    assert_eq!(stats.dropped_total, dropped);
    assert_eq!(stats.pending_records + dropped, 200);
    let kept = seqs(&read_all(&mut log));
    assert_eq!(kept, (201 - kept.len() as u64..=200).collect::<Vec<_>>());
    drop(log);

    let mut log = Log::open(cfg).unwrap();
    assert_eq!(log.stats().dropped_total, dropped);
    assert_eq!(seqs(&read_all(&mut log)), kept);
}

#[test]
fn dropping_acked_records_for_space_does_not_count_them() {
    let dir = TempDir::new().unwrap();
    let cfg = StoreConfig {
        max_bytes: 2 * SEGMENT,
        ..config(dir.path())
    };
    let record = vec![1u8; 500];
    let mut log = Log::open(cfg).unwrap();
    append_range_with(&mut log, 1..=7, &record); // fills the first segment
    log.ack(3).unwrap();
    let mut dropped = 0;
    for seq in 8..=30 {
        dropped += log.append(seq, &record).unwrap().dropped;
    }
    let pending = seqs(&read_all(&mut log));
    // Everything unacked that is gone was counted; acked records were not.
    assert_eq!(dropped, pending[0] - 4);
    assert_eq!(log.stats().dropped_total, dropped);
}

fn append_range_with(log: &mut Log, seqs: impl IntoIterator<Item = u64>, record: &[u8]) {
    for seq in seqs {
        log.append(seq, record).unwrap();
    }
}

#[test]
fn a_torn_last_record_is_cut_off_and_the_rest_survives() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=10);
    }
    let file = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&file).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 3)
        .unwrap();

    let mut log = Log::open(config(dir.path())).unwrap();
    assert_records(&mut log, 1..=9);
    assert_eq!(
        log.last_seq(),
        10,
        "the lost record's seq may have been sent: never reused"
    );
    assert_eq!(log.stats().dropped_total, 0);
    log.append(11, &payload(11)).unwrap();
    drop(log);
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_records(&mut log, (1..=9).chain([11]));
}

#[test]
fn garbage_after_the_last_record_is_truncated_away() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=10);
    }
    let file = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&file).unwrap().len();
    let mut f = OpenOptions::new().append(true).open(&file).unwrap();
    f.write_all(&[0xAB; 37]).unwrap();
    drop(f);

    let mut log = Log::open(config(dir.path())).unwrap();
    assert_eq!(fs::metadata(&file).unwrap().len(), len);
    assert_records(&mut log, 1..=10);
    append_range(&mut log, 11..=12);
    drop(log);
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_records(&mut log, 1..=12);
}

/// Byte offset of the payload of the `n`-th (0-based) record written by `append_range`.
fn payload_offset(first_seq: u64, n: u64) -> u64 {
    let before: u64 = (first_seq..first_seq + n)
        .map(|s| FRAME_HEADER_LEN + payload(s).len() as u64)
        .sum();
    SEGMENT_HEADER_LEN + before + FRAME_HEADER_LEN
}

fn flip_bit(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x10;
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_bit_flip_in_the_newest_segment_is_caught_by_the_checksum() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=10);
    }
    let file = segment_files(dir.path()).pop().unwrap();
    flip_bit(&file, payload_offset(1, 4) + 2); // inside record 5
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_records(&mut log, 1..=4);
}

#[test]
fn a_bit_flip_in_an_older_segment_keeps_earlier_records_and_counts_the_rest_as_dropped() {
    let dir = TempDir::new().unwrap();
    let per_segment;
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=600);
        per_segment = log.sealed[0].count;
        assert!(log.stats().segments >= 3);
    }
    let first = segment_files(dir.path()).remove(0);
    flip_bit(&first, payload_offset(1, 10) + 1); // inside record 11

    let mut log = Log::open(config(dir.path())).unwrap();
    let kept = seqs(&read_all(&mut log));
    let lost = per_segment - 10;
    let expected: Vec<u64> = (1..=10).chain(per_segment + 1..=600).collect();
    assert_eq!(kept, expected);
    assert_eq!(log.stats().dropped_total, lost);
    assert_eq!(log.last_seq(), 600);
    drop(log);
    // The damaged tail was cut off, so it is not counted twice.
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_eq!(log.stats().dropped_total, lost);
    assert_eq!(seqs(&read_all(&mut log)), expected);
}

#[test]
fn a_segment_with_an_unknown_version_is_refused_and_left_intact() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=5);
    }
    let file = segment_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&file).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    fs::write(&file, &bytes).unwrap();

    let err = Log::open(config(dir.path())).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::UnsupportedVersion {
                found: 99,
                supported: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("unsupported format version 99"));
    assert_eq!(fs::read(&file).unwrap(), bytes);
}

#[test]
fn a_segment_with_a_corrupt_header_is_refused_and_left_intact() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=5);
    }
    let file = segment_files(dir.path()).pop().unwrap();
    flip_bit(&file, 14); // first_seq field, covered by the header checksum
    let bytes = fs::read(&file).unwrap();
    let err = Log::open(config(dir.path())).unwrap_err();
    assert!(matches!(err, StoreError::CorruptHeader { .. }), "{err:?}");
    assert_eq!(fs::read(&file).unwrap(), bytes);
}

#[test]
fn read_after_honours_record_and_byte_limits_but_returns_at_least_one() {
    let dir = TempDir::new().unwrap();
    let mut log = Log::open(config(dir.path())).unwrap();
    let record = vec![0u8; 100];
    append_range_with(&mut log, 1..=10, &record);

    assert_eq!(seqs(&log.read_after(0, 3, usize::MAX).unwrap()), [1, 2, 3]);
    assert_eq!(seqs(&log.read_after(0, usize::MAX, 250).unwrap()), [1, 2]);
    assert_eq!(seqs(&log.read_after(0, usize::MAX, 10).unwrap()), [1]);
    assert_eq!(seqs(&log.read_after(5, 2, usize::MAX).unwrap()), [6, 7]);
    assert!(log.read_after(0, 0, usize::MAX).unwrap().is_empty());
    assert!(log.read_after(10, 5, usize::MAX).unwrap().is_empty());
    assert!(log.read_after(99, 5, usize::MAX).unwrap().is_empty());

    log.ack(4).unwrap();
    assert_eq!(
        seqs(&log.read_after(0, 2, usize::MAX).unwrap()),
        [5, 6],
        "acked records are never returned"
    );
}

#[test]
fn read_after_finds_the_next_record_from_any_point_in_large_segments() {
    let dir = TempDir::new().unwrap();
    let cfg = StoreConfig {
        segment_bytes: 64 * 1024,
        max_bytes: 1 << 20,
        ..config(dir.path())
    };
    let mut log = Log::open(cfg).unwrap();
    // Odd gaps so that seqs and ordinals differ.
    let all: Vec<u64> = (1..=5000).map(|i| i * 3).collect();
    for &seq in &all {
        log.append(seq, &payload(seq)).unwrap();
    }
    for after in (0..15_010).step_by(7) {
        let got = seqs(&log.read_after(after, 2, usize::MAX).unwrap());
        let want: Vec<u64> = all.iter().copied().filter(|&s| s > after).take(2).collect();
        assert_eq!(got, want, "after {after}");
    }
    for ack in [1, 3, 1000, 7777, 14_998] {
        log.ack(ack).unwrap();
        let left = all.iter().filter(|&&s| s > ack).count() as u64;
        assert_eq!(log.stats().pending_records, left, "after ack {ack}");
    }
}

#[test]
fn ack_deletes_fully_acknowledged_segments_from_disk() {
    let dir = TempDir::new().unwrap();
    let mut log = Log::open(config(dir.path())).unwrap();
    append_range_with(&mut log, 1..=100, &[3u8; 200]);
    let before = segment_files(dir.path());
    assert!(before.len() >= 5);
    let first_segment_last = log.sealed[0].last_seq;

    log.ack(first_segment_last - 1).unwrap();
    assert_eq!(segment_files(dir.path()), before, "partially acked stays");

    log.ack(40).unwrap();
    let after = segment_files(dir.path());
    assert!(after.len() < before.len());
    assert_eq!(after.len(), log.stats().segments);
    assert_eq!(after[..], before[before.len() - after.len()..]);
    let remaining = seqs(&read_all(&mut log));
    assert_eq!(remaining, (41..=100).collect::<Vec<_>>());
    // The oldest remaining file still holds a record <= 40 or starts right after it.
    let oldest: u64 = after[0]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(oldest <= 41);

    log.ack(100).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1, "the active one stays");
}

#[test]
fn acking_is_idempotent_and_clamped_to_last_seq() {
    let dir = TempDir::new().unwrap();
    let mut log = Log::open(config(dir.path())).unwrap();
    append_range(&mut log, 1..=5);
    log.ack(3).unwrap();
    log.ack(3).unwrap();
    log.ack(1).unwrap();
    assert_eq!(log.acked_seq(), 3);
    log.ack(1_000).unwrap();
    assert_eq!(log.acked_seq(), 5);
    assert_eq!(log.stats().pending_records, 0);
    log.append(6, b"x").unwrap();
    assert_eq!(seqs(&read_all(&mut log)), [6]);
}

#[test]
fn both_fsync_policies_keep_records_and_acks_across_restarts() {
    for policy in [
        FsyncPolicy::Always,
        FsyncPolicy::Interval(Duration::from_millis(100)),
    ] {
        let dir = TempDir::new().unwrap();
        let cfg = StoreConfig {
            fsync: policy,
            ..config(dir.path())
        };
        {
            let mut log = Log::open(cfg.clone()).unwrap();
            append_range(&mut log, 1..=50);
            log.ack(20).unwrap();
            log.sync().unwrap();
        }
        let mut log = Log::open(cfg.clone()).unwrap();
        assert_eq!(log.acked_seq(), 20, "{policy:?}");
        assert_records(&mut log, 21..=50);

        // Closing writes the lazily kept Interval cursor too.
        log.ack(30).unwrap();
        drop(log);
        let mut log = Log::open(cfg).unwrap();
        assert_eq!(log.acked_seq(), 30, "{policy:?}");
        assert_records(&mut log, 31..=50);
    }
}

#[test]
fn dropping_the_log_without_sync_loses_no_appended_record() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(interval(dir.path())).unwrap();
        append_range(&mut log, 1..=500);
        // "Crash": no sync, no shutdown hook.
    }
    let mut log = Log::open(interval(dir.path())).unwrap();
    assert_records(&mut log, 1..=500);
    assert_eq!(log.last_seq(), 500);
}

#[test]
fn an_unreadable_state_file_means_nothing_is_acknowledged() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=10);
        log.ack(5).unwrap();
    }
    fs::write(dir.path().join(state::STATE_FILE), b"garbage!").unwrap();
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_eq!(log.acked_seq(), 0);
    assert_records(&mut log, 1..=10);
    assert_eq!(log.last_seq(), 10);

    drop(log);
    fs::remove_file(dir.path().join(state::STATE_FILE)).unwrap();
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_records(&mut log, 1..=10);
}

#[test]
fn leftover_temporary_and_headerless_files_are_cleaned_up() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=5);
    }
    fs::write(dir.path().join("state.tmp"), b"half").unwrap();
    fs::write(dir.path().join("00000000000000000009.seg.tmp"), b"half").unwrap();
    fs::write(dir.path().join("00000000000000000009.seg"), b"short").unwrap();
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_records(&mut log, 1..=5);
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(!dir.path().join("state.tmp").exists());
    append_range(&mut log, 6..=9);
    assert_records(&mut log, 1..=9);
}

#[test]
fn an_empty_newest_segment_left_by_a_crash_is_discarded() {
    let dir = TempDir::new().unwrap();
    {
        let mut log = Log::open(config(dir.path())).unwrap();
        append_range(&mut log, 1..=5);
    }
    // Created for seq 50, then power was cut before the record reached the disk.
    let header = super::format::encode_segment_header(50);
    fs::write(dir.path().join(segment::file_name(50)), header).unwrap();

    let mut log = Log::open(config(dir.path())).unwrap();
    assert_eq!(log.last_seq(), 5);
    assert_eq!(segment_files(dir.path()).len(), 1);
    append_range(&mut log, 6..=7);
    drop(log);
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_records(&mut log, 1..=7);
}

#[test]
fn invalid_configurations_and_oversized_records_are_rejected() {
    let dir = TempDir::new().unwrap();
    let small = StoreConfig {
        segment_bytes: 1024,
        ..config(dir.path())
    };
    assert!(matches!(Log::open(small), Err(StoreError::Config(_))));
    let tight = StoreConfig {
        max_bytes: SEGMENT * 2 - 1,
        ..config(dir.path())
    };
    assert!(matches!(Log::open(tight), Err(StoreError::Config(_))));
    let zero = StoreConfig {
        fsync: FsyncPolicy::Interval(Duration::ZERO),
        ..config(dir.path())
    };
    assert!(matches!(Log::open(zero), Err(StoreError::Config(_))));

    let mut log = Log::open(config(dir.path())).unwrap();
    let max = (SEGMENT - SEGMENT_HEADER_LEN - FRAME_HEADER_LEN) as usize;
    assert!(matches!(
        log.append(1, &vec![0; max + 1]),
        Err(StoreError::RecordTooLarge { len, max: m }) if len == max + 1 && m == max
    ));
    log.append(1, &vec![0; max]).unwrap();
    log.append(2, &vec![1; max]).unwrap();
    assert_eq!(log.stats().segments, 2);
    assert_eq!(read_all(&mut log)[1].payload, vec![1; max]);
}

#[test]
fn a_directory_can_only_be_opened_by_one_log_at_a_time() {
    let dir = TempDir::new().unwrap();
    let log = Log::open(config(dir.path())).unwrap();
    assert!(matches!(
        Log::open(config(dir.path())),
        Err(StoreError::Locked { .. })
    ));
    drop(log);
    Log::open(config(dir.path())).unwrap();
}

#[test]
fn the_log_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Log>();
}

/// xorshift64*: deterministic, dependency-free randomness for the model test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_appends_acks_and_restarts_return_every_unacked_record_exactly_once() {
    let mut total_dropped = 0;
    for seed in 1..=12u64 {
        let mut dir = TempDir::new().unwrap();
        let mut cfg = StoreConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: 3 * SEGMENT,
            segment_bytes: SEGMENT,
            fsync: if seed % 2 == 0 {
                FsyncPolicy::Always
            } else {
                FsyncPolicy::Interval(Duration::from_secs(1))
            },
        };
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut log = Log::open(cfg.clone()).unwrap();
        // Model: the unacked, undropped records in order.
        let mut model: VecDeque<Record> = VecDeque::new();
        let (mut last, mut acked, mut dropped) = (0u64, 0u64, 0u64);

        for step in 0..400 {
            match rng.below(100) {
                0..60 => {
                    let seq = last + 1 + rng.below(3);
                    let len = rng.below(600) as usize;
                    let payload: Vec<u8> = (0..len).map(|i| (seq as usize + i) as u8).collect();
                    let appended = log.append(seq, &payload).unwrap();
                    for _ in 0..appended.dropped {
                        model.pop_front();
                    }
                    dropped += appended.dropped;
                    model.push_back(Record { seq, payload });
                    last = seq;
                }
                60..80 => {
                    let seq = acked + rng.below(last - acked + 3);
                    log.ack(seq).unwrap();
                    acked = acked.max(seq.min(last));
                    while model.front().is_some_and(|r| r.seq <= acked) {
                        model.pop_front();
                    }
                }
                80..90 => {
                    if rng.below(2) == 0 {
                        log.sync().unwrap();
                    }
                    if rng.below(2) == 0 {
                        drop(log);
                    } else {
                        // Killed: the files as they are, and no close. Appends continue above
                        // the reservation.
                        let killed = after_power_cut(dir.path(), &[]);
                        drop(log);
                        dir = killed;
                        cfg.dir = dir.path().to_path_buf();
                    }
                    log = Log::open(cfg.clone()).unwrap();
                    assert!(log.last_seq() >= last, "seed {seed} step {step}");
                    last = log.last_seq();
                    // An unsynced cursor may lag; never beyond, and records never go missing.
                    assert!(log.acked_seq() <= acked, "seed {seed} step {step}");
                    let replay = read_all(&mut log);
                    let extra = replay.len() - model.len();
                    assert!(replay[..extra].iter().all(|r| r.seq <= acked));
                    assert_eq!(replay[extra..], *model.make_contiguous());
                    // The hub acks again what it already has.
                    log.ack(acked).unwrap();
                }
                _ => {
                    let after = acked + rng.below(last - acked + 2);
                    let max_records = 1 + rng.below(20) as usize;
                    let max_bytes = rng.below(3000) as usize;
                    let got = log.read_after(after, max_records, max_bytes).unwrap();
                    let mut want: Vec<&Record> = Vec::new();
                    let mut bytes = 0;
                    for r in model.iter().filter(|r| r.seq > after).take(max_records) {
                        if !want.is_empty() && bytes + r.payload.len() > max_bytes {
                            break;
                        }
                        bytes += r.payload.len();
                        want.push(r);
                    }
                    assert_eq!(
                        got.iter().collect::<Vec<_>>(),
                        want,
                        "seed {seed} step {step}"
                    );
                }
            }
            let stats = log.stats();
            assert_eq!(stats.last_seq, last, "seed {seed} step {step}");
            assert_eq!(stats.acked_seq, acked, "seed {seed} step {step}");
            assert_eq!(stats.dropped_total, dropped, "seed {seed} step {step}");
            assert_eq!(stats.pending_records, model.len() as u64);
            let model_bytes: u64 = model
                .iter()
                .map(|r| FRAME_HEADER_LEN + r.payload.len() as u64)
                .sum();
            assert_eq!(stats.pending_bytes, model_bytes);
            assert_eq!(stats.segments, segment_files(dir.path()).len());
            assert!(segment_bytes_on_disk(dir.path()) <= cfg.max_bytes);
        }
        assert_eq!(read_all(&mut log), Vec::from(model));
        total_dropped += dropped;
    }
    assert!(total_dropped > 0, "the size bound was exercised");
}

#[test]
fn after_a_power_cut_new_readings_get_seqs_above_every_one_appended_before_it() {
    let dir = TempDir::new().unwrap();
    let mut log = Log::open(interval(dir.path())).unwrap();
    append_range(&mut log, 1..=10);
    log.sync().unwrap();
    let synced = synced_lengths(dir.path());
    append_range(&mut log, 11..=12); // sent and acknowledged, then the power goes
    log.ack(12).unwrap();
    let cut = after_power_cut(dir.path(), &synced);
    drop(log);

    let mut log = Log::open(interval(cut.path())).unwrap();
    assert_records(&mut log, 1..=10);
    assert!(log.last_seq() >= 12, "last_seq {}", log.last_seq());
    assert_eq!(log.skipped_at_open(), log.last_seq() - 10);
    let next = log.next_seq().unwrap();
    log.append(next, b"after the cut").unwrap();
    assert!(next > 12);
    assert!(
        next <= 12 + SEQ_RESERVATION + 1,
        "the gap is bounded: {next}"
    );
}

#[test]
fn a_start_killed_before_it_appends_reports_the_same_gap_again_not_a_new_one() {
    let dir = TempDir::new().unwrap();
    let mut log = Log::open(interval(dir.path())).unwrap();
    append_range(&mut log, 1..=10);
    // Killed: the files as they are, no clean close.
    let killed = after_power_cut(dir.path(), &synced_lengths(dir.path()));
    drop(log);

    let log = Log::open(interval(killed.path())).unwrap();
    let (opened_at, gap) = (log.last_seq(), log.skipped_at_open());
    // Seq 1 reserved up to 1 + SEQ_RESERVATION; 2..=10 used some of it.
    assert_eq!((opened_at, gap), (1 + SEQ_RESERVATION, SEQ_RESERVATION - 9));
    let killed_again = after_power_cut(killed.path(), &synced_lengths(killed.path()));
    drop(log);

    // The same seqs, passed over once: whoever sums the gaps must count them as ranges.
    let mut log = Log::open(interval(killed_again.path())).unwrap();
    assert_eq!((log.last_seq(), log.skipped_at_open()), (opened_at, gap));
    assert_eq!(log.next_seq().unwrap(), opened_at + 1);
    append_range(&mut log, opened_at + 1..=opened_at + 1);
}

#[test]
fn a_clean_close_gives_back_the_reserved_seqs() {
    let dir = TempDir::new().unwrap();
    let mut log = Log::open(interval(dir.path())).unwrap();
    append_range(&mut log, 1..=3);
    drop(log);
    let mut log = Log::open(interval(dir.path())).unwrap();
    assert_eq!(log.last_seq(), 3);
    assert_eq!(log.skipped_at_open(), 0);
    assert_eq!(log.next_seq().unwrap(), 4);
    assert_eq!(log.numbering_lost(), None);
    append_range(&mut log, 4..=5);
}

#[test]
fn a_log_without_its_state_file_says_up_to_which_seq_its_numbering_is_its_own() {
    let dir = TempDir::new().unwrap();
    assert_eq!(
        Log::open(config(dir.path())).unwrap().numbering_lost(),
        Some(0),
        "new"
    );
    append_range(&mut Log::open(config(dir.path())).unwrap(), 1..=3);
    assert_eq!(
        Log::open(config(dir.path())).unwrap().numbering_lost(),
        None
    );
    fs::remove_file(dir.path().join("state")).unwrap();
    assert_eq!(
        Log::open(config(dir.path())).unwrap().numbering_lost(),
        Some(3)
    );
}

#[test]
fn a_record_that_rots_after_open_is_cut_with_the_rest_of_its_segment_counted_and_reading_goes_on() {
    let dir = TempDir::new().unwrap();
    let mut log = Log::open(config(dir.path())).unwrap();
    append_range(&mut log, 1..=600); // several segments
    assert!(log.stats().segments >= 3);
    let first = segment_files(dir.path())[0].clone();
    let first_count = log.sealed[0].count;
    // The medium changes under the running log: a bit of the third record of the oldest
    // segment, and then one in the active segment.
    flip_bit(&first, payload_offset(1, 2));
    let records = log.read_after(0, usize::MAX, usize::MAX).unwrap();
    let lost = first_count - 2;
    assert_eq!(records.len() as u64, 600 - lost);
    assert_eq!(seqs(&records[..2]), [1, 2]);
    assert_eq!(records[2].seq, first_count + 1);
    assert_eq!(log.stats().dropped_total, lost);
    assert_eq!(log.stats().pending_records, 600 - lost);

    let active = segment_files(dir.path()).pop().unwrap();
    let active_first = log.active.as_ref().unwrap().segment.base_seq;
    flip_bit(&active, payload_offset(active_first, 0));
    let records = log.read_after(0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(records.last().unwrap().seq, active_first - 1);
    assert!(log.active.is_none(), "the damaged active segment is sealed");
    log.append(601, &payload(601)).unwrap();
    assert_eq!(
        log.read_after(active_first - 1, 10, usize::MAX).unwrap()[0].seq,
        601
    );

    // A sealed segment cut short from outside: what it still holds is read, the rest counted.
    let dropped = log.stats().dropped_total;
    let second = log.sealed[1].path.clone();
    let (second_first, second_count) = (log.sealed[1].base_seq, log.sealed[1].count);
    let half = fs::metadata(&second).unwrap().len() / 2;
    OpenOptions::new()
        .write(true)
        .open(&second)
        .unwrap()
        .set_len(half)
        .unwrap();
    let records = log.read_after(0, usize::MAX, usize::MAX).unwrap();
    let kept = records
        .iter()
        .filter(|r| (second_first..second_first + second_count).contains(&r.seq))
        .count() as u64;
    assert!(kept > 0 && kept < second_count, "{kept} of {second_count}");
    assert_eq!(log.stats().dropped_total, dropped + second_count - kept);
    drop(log);
    let mut log = Log::open(config(dir.path())).unwrap();
    assert_eq!(read_all(&mut log).last().unwrap().seq, 601);
    assert_eq!(
        log.stats().dropped_total,
        dropped + second_count - kept,
        "counted once"
    );
}
