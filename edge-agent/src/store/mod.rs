//! Durable store-and-forward log for readings awaiting acknowledgement by the hub.
//!
//! The agent [`Log::append`]s readings (opaque payloads tagged with a per-device sequence
//! number that strictly increases over the device's lifetime), the uplink sends them with
//! [`Log::read_after`], and [`Log::ack`] releases everything up to an acknowledged sequence
//! number. Power may be cut at any instant; the rules below make sure that an
//! unacknowledged reading that was synced is never lost, and that a crash at worst causes
//! already-acknowledged readings to be sent again (the hub deduplicates by sequence number).
//!
//! # On-disk format
//!
//! All integers are little-endian. The directory holds:
//!
//! * `NNNNNNNNNNNNNNNNNNNN.seg` — append-only segment files named by the (zero-padded,
//!   20-digit) sequence number they were created for. Each starts with a 24-byte header
//!   `[magic "EDGELOG\0"][format version u32][first seq u64][crc32 of the previous 20 bytes]`
//!   followed by frames `[len u32][crc32 over seq+payload u32][seq u64][payload; len]`.
//!   Sequence numbers strictly increase within and across segments, and no record in a
//!   segment is below its header's first seq. Segments are created under a `.tmp` name,
//!   synced and renamed, so a `.seg` file always starts with a complete header.
//! * `state` — 40 bytes `[magic "EDGESTAT"][version u32][acked u64][seq floor u64]
//!   [dropped total u64][crc32]`, replaced atomically (temp file, fsync, rename, fsync dir).
//!   The seq floor is a reservation: no seq at or below it is ever appended again. An append
//!   beyond it first raises it [`SEQ_RESERVATION`] seqs ahead, durably, so a power cut can never
//!   make the log hand out again a seq it may already have sent (see Durability). Closing the
//!   log (dropping it) lowers the floor back to the last appended seq.
//! * `LOCK` — held with an exclusive advisory lock while a [`Log`] is open.
//!
//! # Durability
//!
//! Appends are a single `write` of the whole frame, so a killed process loses nothing that
//! `append` returned; a power cut loses what was not yet synced: nothing with
//! [`FsyncPolicy::Always`], at most one interval with [`FsyncPolicy::Interval`] (the caller
//! calls [`Log::sync`] on its timer; sealing a segment also syncs it).
//!
//! A seq is never reused, even after a power cut that takes unsynced records with it: the hub
//! may have received and accepted those records, and a new reading under one of their seqs
//! would be answered "duplicate" and deleted unsent. The durable seq floor is always at or above
//! every appended seq (it is raised in steps of [`SEQ_RESERVATION`] before the append that
//! passes it), so after a cut the log continues above anything it could have sent. The cost is
//! a gap of at most [`SEQ_RESERVATION`] seqs after an unclean stop; gaps are part of the protocol.
//!
//! The ack cursor is written eagerly with `Always`, but lazily with `Interval` (on `sync`,
//! or whenever segments are deleted), because an atomic replace costs several fsyncs and
//! acks arrive often. The trade-off: after a power cut the cursor may be older than the
//! last ack and some acknowledged readings are resent, which the hub tolerates. Before any
//! segment is deleted (acked or dropped) the state file is written first, so a crash can
//! never make the cursor, the seq floor or the drop counter go backwards past deleted data.
//!
//! # Recovery rules (on [`Log::open`])
//!
//! * Leftover `*.tmp` files are removed; a `.seg` file shorter than a header (cannot hold
//!   records) is removed with a warning.
//! * A segment with an unknown format version fails with
//!   [`StoreError::UnsupportedVersion`] and a bad magic or header checksum with
//!   [`StoreError::CorruptHeader`]; such files are never modified or deleted.
//! * Every record's length, checksum and sequence order is validated. In the newest segment
//!   the first bad record marks a torn tail (kill -9, power cut): the file is truncated there
//!   with a warning. In an older segment, the records before the bad one are kept and the
//!   rest of that segment is cut off and counted as dropped (best effort: frames are
//!   followed by their length fields), with a warning. Recovery never panics on bad data.
//! * A missing or unreadable state file means "nothing acknowledged" (with a warning unless
//!   the directory is new); at worst everything still on disk is resent. The seq floor went with
//!   it: the records still on disk keep their true seqs, but new ones may get seqs the hub has
//!   seen, so [`Log::numbering_lost`] says up to which seq the log's numbering is its own (the
//!   uplink renumbers what lies above it when the hub knows more).
//! * `last_seq = max(last record seq, seq floor, acked)`: after an unclean stop the
//!   reservation, after a clean one the last appended seq.
//! * Segments that are empty or fully acknowledged are deleted.
//!
//! # Damage found after open
//!
//! A record that fails its checksum when [`Log::read_after`] reads it back (the medium changed
//! under a running log) is handled as recovery handles an older segment: the records before it
//! stay, the rest of that segment is cut off and counted as dropped, and reading goes on. A
//! damaged record never stalls the uplink.
//!
//! # Size bound
//!
//! Before an append would push the total size of all segment files over
//! [`StoreConfig::max_bytes`], whole segments are dropped oldest first (never the active
//! one). Unacknowledged records dropped this way are counted in [`Stats::dropped_total`] and
//! reported in [`Appended::dropped`].

mod error;
mod format;
mod segment;
mod state;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;

use error::IoContext;
pub use error::StoreError;
use format::{FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use segment::Segment;
use state::{Loaded, State};

/// Smallest accepted [`StoreConfig::segment_bytes`].
pub const MIN_SEGMENT_BYTES: u64 = 4096;

/// How far ahead of the appended seqs the durable seq floor is raised: one state-file write per
/// this many appends, and at most this large a gap in seqs after an unclean stop.
pub const SEQ_RESERVATION: u64 = 1000;

const LOCK_FILE: &str = "LOCK";

/// When appended data is forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fsync after every append (and persist every ack).
    Always,
    /// The caller calls [`Log::sync`] about this often; the log also syncs a segment when
    /// sealing it.
    Interval(Duration),
}

impl FsyncPolicy {
    /// How often the caller should call [`Log::sync`], if at all.
    pub fn sync_interval(&self) -> Option<Duration> {
        match self {
            Self::Always => None,
            Self::Interval(interval) => Some(*interval),
        }
    }
}

/// Where and how the log keeps its data.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Directory owned by the log; created if missing.
    pub dir: PathBuf,
    /// Upper bound for the total size of all segment files; at least `2 * segment_bytes`.
    pub max_bytes: u64,
    /// Size at which a segment is sealed and a new one started; at least
    /// [`MIN_SEGMENT_BYTES`]. It also bounds the size of a single record.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
}

/// One reading as stored: the device sequence number and the opaque payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// Outcome of a successful [`Log::append`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// Unacknowledged records dropped (oldest first) to make room.
    pub dropped: u64,
}

/// A snapshot of the log's counters, computed without I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records with `seq > acked_seq` still on disk.
    pub pending_records: u64,
    /// On-disk size of those records, frame headers included.
    pub pending_bytes: u64,
    /// Unacknowledged records lost to the size bound or to corruption, ever.
    pub dropped_total: u64,
    pub acked_seq: u64,
    pub last_seq: u64,
    /// Segment files, the active one included.
    pub segments: usize,
}

/// The segment currently appended to.
struct Active {
    segment: Segment,
    file: File,
    /// A failed append could not be rolled back; the file must not be appended to again.
    broken: bool,
}

impl Active {
    fn needs_roll(&self, seq: u64, frame_len: u64, segment_bytes: u64) -> bool {
        if self.segment.is_empty() {
            // An empty segment (left by a failed append) is reused unless its name would
            // claim a sequence number above the record's.
            self.broken || self.segment.base_seq > seq
        } else {
            self.broken || self.segment.len + frame_len > segment_bytes
        }
    }

    /// Appends one encoded frame. On failure the file is cut back so that the next append
    /// does not land behind a partial frame, which recovery would take for a torn tail and
    /// cut off together with everything after it.
    fn write(&mut self, frame: &[u8], seq: u64, sync: bool) -> Result<(), StoreError> {
        let result = self
            .file
            .write_all(frame)
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        if let Err(e) = result {
            if let Err(undo) = self.file.set_len(self.segment.len) {
                warn!(path = %self.segment.path.display(), error = %undo,
                    "cannot roll back a failed append; sealing the segment");
                self.broken = true;
            }
            return Err(e).ctx("appending to", &self.segment.path);
        }
        self.segment.push(seq, frame.len() as u64);
        Ok(())
    }
}

/// The store-and-forward log. Synchronous; share it behind a `Mutex`.
pub struct Log {
    config: StoreConfig,
    /// Sealed segments, oldest first.
    sealed: VecDeque<Segment>,
    active: Option<Active>,
    /// In-memory truth. `seq_floor` is always the value last written to disk; `acked` may be
    /// ahead of the file while `state_dirty` is set.
    state: State,
    state_dirty: bool,
    last_seq: u64,
    pending_records: u64,
    pending_bytes: u64,
    /// Size of all segment files.
    total_bytes: u64,
    max_payload: usize,
    /// No state file could be read at open (a new directory, or one lost or damaged): the
    /// highest seq on disk then, up to which the numbering is known to be the log's own.
    numbering_lost: Option<u64>,
    /// Seqs passed over at open: the reservation left by an unclean stop (and, after a power
    /// cut, records that had not been synced).
    skipped_at_open: u64,
    /// Reused frame encoding buffer.
    frame_buf: Vec<u8>,
    /// Holds the directory lock for the lifetime of the log.
    _lock: File,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.config.dir)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Opens (creating if needed) the log in `config.dir` and recovers it; see the module
    /// documentation for the recovery rules.
    pub fn open(config: StoreConfig) -> Result<Log, StoreError> {
        let max_payload = validate(&config)?;
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).ctx("creating directory", &dir)?;
        let lock = lock_dir(&dir)?;
        let files = list_dir(&dir)?;
        let (state, state_lost) = load_state(&dir, !files.is_empty())?;
        let recovered = recover_segments(&files, state.acked)?;

        let last_appended = recovered.last_seq.max(state.acked);
        let mut log = Log {
            config,
            sealed: VecDeque::new(),
            active: None,
            state,
            state_dirty: false,
            last_seq: last_appended.max(state.seq_floor),
            pending_records: 0,
            pending_bytes: 0,
            total_bytes: 0,
            max_payload,
            numbering_lost: state_lost.then_some(recovered.last_seq),
            skipped_at_open: state.seq_floor.saturating_sub(last_appended),
            frame_buf: Vec::new(),
            _lock: lock,
        };
        log.repair(recovered.lost, &recovered.repairs)?;
        log.adopt(recovered.segments)?;
        Ok(log)
    }

    /// Counts what the damaged segments lost, then cuts each one where its valid data ends.
    fn repair(&mut self, lost: u64, cuts: &[(PathBuf, u64)]) -> Result<(), StoreError> {
        // Count the loss before cutting it off: a crash in between over-counts rather than
        // forgets.
        if lost > 0 {
            self.persist(State {
                dropped_total: self.state.dropped_total + lost,
                ..self.state
            })?;
        }
        for (path, len) in cuts {
            segment::truncate(path, *len)?;
        }
        Ok(())
    }

    /// Takes the recovered segments, oldest first: the newest is appended to, the acknowledged
    /// ones go.
    fn adopt(&mut self, mut segments: Vec<Segment>) -> Result<(), StoreError> {
        if let Some(newest) = segments.pop() {
            if newest.is_empty() {
                // Its name may exceed the next sequence number; a fresh one is made on demand.
                segment::remove(&newest.path)?;
            } else {
                let file = segment::open_append(&newest.path)?;
                self.active = Some(Active {
                    segment: newest,
                    file,
                    broken: false,
                });
            }
        }
        self.sealed = segments.into();
        self.total_bytes = self.segments().map(|s| s.len).sum();
        self.remove_acked_segments()?;
        self.recompute_pending()
    }

    /// Appends a record. `seq` must exceed [`Log::last_seq`]. May drop the oldest segments to
    /// stay within `max_bytes`; the number of unacknowledged records lost is returned.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> Result<Appended, StoreError> {
        if payload.len() > self.max_payload {
            return Err(StoreError::RecordTooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        if seq <= self.last_seq {
            return Err(StoreError::SeqNotIncreasing {
                seq,
                last: self.last_seq,
            });
        }
        if seq > self.state.seq_floor {
            // Durable before the record exists: no later start may hand out this seq again.
            self.persist(State {
                seq_floor: seq
                    .saturating_add(SEQ_RESERVATION)
                    .min(hub_protocol::MAX_SEQ),
                ..self.state
            })?;
        }
        let frame_len = FRAME_HEADER_LEN + payload.len() as u64;
        let segment_bytes = self.config.segment_bytes;
        let roll = self
            .active
            .as_ref()
            .is_none_or(|a| a.needs_roll(seq, frame_len, segment_bytes));
        let extra = if roll { SEGMENT_HEADER_LEN } else { 0 };
        let dropped = self.make_room(frame_len + extra)?;
        let active = match self.active.as_mut() {
            Some(active) if !roll => active,
            _ => {
                self.seal_active()?;
                let (segment, file) = segment::create(&self.config.dir, seq)?;
                self.total_bytes += segment.len;
                self.active.insert(Active {
                    segment,
                    file,
                    broken: false,
                })
            }
        };
        self.frame_buf.clear();
        format::encode_frame(&mut self.frame_buf, seq, payload);
        let sync = self.config.fsync == FsyncPolicy::Always;
        active.write(&self.frame_buf, seq, sync)?;
        self.total_bytes += frame_len;
        self.pending_records += 1;
        self.pending_bytes += frame_len;
        self.last_seq = seq;
        Ok(Appended { dropped })
    }

    /// Unacknowledged records with `seq > after_seq`, oldest first, at most `max_records` of
    /// them and at most `max_bytes` of payload — except that the first record is returned
    /// even if it alone exceeds `max_bytes`, so a large record cannot stall the uplink.
    ///
    /// A record found damaged on the way is cut off with the rest of its segment and counted as
    /// dropped (see "Damage found after open"); reading then goes on past it.
    pub fn read_after(
        &mut self,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, StoreError> {
        // Each repair removes at least one record, and there are finitely many segments.
        let mut repairs = self.sealed.len() + 2;
        loop {
            match self.read_intact(after_seq, max_records, max_bytes) {
                Err(StoreError::CorruptRecord { path, offset }) if repairs > 0 => {
                    repairs -= 1;
                    self.cut_damaged_segment(&path, offset)?;
                }
                result => return result,
            }
        }
    }

    fn read_intact(
        &self,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let after = after_seq.max(self.state.acked);
        let mut records = Vec::new();
        let mut bytes = 0usize;
        if max_records == 0 {
            return Ok(records);
        }
        for segment in self.segments() {
            let Some((_, mut reader)) = segment.reader_after(after)? else {
                continue;
            };
            while let Some(header) = reader.peek()? {
                let len = header.len as usize;
                if !records.is_empty() && bytes.saturating_add(len) > max_bytes {
                    return Ok(records);
                }
                if let Some(record) = reader.read()? {
                    bytes += len;
                    records.push(record);
                }
                if records.len() >= max_records {
                    return Ok(records);
                }
            }
        }
        Ok(records)
    }

    /// A record at `offset` of the segment at `path` no longer verifies. What follows it in
    /// that segment cannot be trusted either (its length fields may be damaged too), so the
    /// segment ends before it, as recovery would end an older one: what still verifies before
    /// `offset` is kept, the unacknowledged records lost are counted (durably, before the file is
    /// cut), then the file is cut. A damaged active segment is sealed; the next append starts a
    /// new one.
    fn cut_damaged_segment(&mut self, path: &Path, offset: u64) -> Result<(), StoreError> {
        let Some(position) = self.segments().position(|s| s.path == path) else {
            return Ok(());
        };
        let Some((base_seq, len)) = self.segments().nth(position).map(|s| (s.base_seq, s.len))
        else {
            return Ok(());
        };
        let prev_seq = match position.checked_sub(1).and_then(|i| self.sealed.get(i)) {
            Some(previous) => previous.last_seq,
            None => 0,
        };
        let cut = offset.clamp(SEGMENT_HEADER_LEN, len);
        let kept = segment::scan_within(path, base_seq, prev_seq, cut)?
            .map(|scanned| scanned.segment)
            .filter(|segment| !segment.is_empty());
        let kept_len = kept.as_ref().map(|s| s.len);
        let pending_before = self.pending_records;
        if position == self.sealed.len() {
            // The active segment: its file handle goes; what is kept of it is sealed.
            self.active = None;
        } else {
            self.sealed.remove(position);
        }
        if let Some(segment) = kept {
            self.sealed.insert(position, segment);
        }
        self.recompute_pending()?;
        let lost = pending_before.saturating_sub(self.pending_records);
        warn!(path = %path.display(), offset, lost_records = lost,
            "a record in the log no longer verifies; dropping the rest of its segment");
        self.persist(State {
            dropped_total: self.state.dropped_total + lost,
            ..self.state
        })?;
        match kept_len {
            Some(len) => segment::truncate(path, len)?,
            None => segment::remove(path)?,
        }
        self.total_bytes = self.segments().map(|s| s.len).sum();
        Ok(())
    }

    /// Acknowledges every record with `seq` up to and including `seq` (clamped to
    /// [`Log::last_seq`]); acking at or below the current cursor is a no-op. Sealed segments
    /// that become fully acknowledged are deleted.
    pub fn ack(&mut self, seq: u64) -> Result<(), StoreError> {
        let seq = seq.min(self.last_seq);
        if seq <= self.state.acked {
            return Ok(());
        }
        self.state.acked = seq;
        self.state_dirty = true;
        self.recompute_pending()?;
        // Persists the cursor if it deletes anything.
        self.remove_acked_segments()?;
        if self.state_dirty && self.config.fsync == FsyncPolicy::Always {
            self.save_state()?;
        }
        Ok(())
    }

    /// Forces appended records and a lazily kept ack cursor to disk.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if let Some(active) = &self.active
            && !active.broken
        {
            active
                .file
                .sync_data()
                .ctx("syncing", &active.segment.path)?;
        }
        if self.state_dirty {
            self.save_state()?;
        }
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        Stats {
            pending_records: self.pending_records,
            pending_bytes: self.pending_bytes,
            dropped_total: self.state.dropped_total,
            acked_seq: self.state.acked,
            last_seq: self.last_seq,
            segments: self.sealed.len() + usize::from(self.active.is_some()),
        }
    }

    /// Highest sequence number ever appended (or raised to), 0 for a new log. The next
    /// append must use a larger one.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn acked_seq(&self) -> u64 {
        self.state.acked
    }

    /// Durably ensures `last_seq() >= seq`, e.g. after a wiped disk when the hub reports the
    /// last sequence number it has seen from this device.
    pub fn raise_seq_floor(&mut self, seq: u64) -> Result<(), StoreError> {
        if seq > self.state.seq_floor {
            self.persist(State {
                seq_floor: seq,
                ..self.state
            })?;
        }
        // Also when the floor already covers it: the floor may be a reservation ahead of
        // `last_seq`, and the next append must still go above `seq`.
        self.last_seq = self.last_seq.max(seq);
        Ok(())
    }

    /// The seq the next reading gets; none is left past [`hub_protocol::MAX_SEQ`].
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        (self.last_seq < hub_protocol::MAX_SEQ)
            .then(|| self.last_seq + 1)
            .ok_or(StoreError::SeqExhausted)
    }

    /// How many seqs the log passed over when it was opened: those it had reserved before an
    /// unclean stop (kill, power cut), and after a power cut also those of records not yet
    /// synced. 0 after a clean close. The gap is the seqs just below [`Log::last_seq`] at open; a
    /// start stopped uncleanly before it appended anything leaves the same gap, and the next open
    /// reports it again.
    pub fn skipped_at_open(&self) -> u64 {
        self.skipped_at_open
    }

    /// When no state file (and so no seq floor) could be read at open (a new directory, or one
    /// whose state file was lost or damaged): the highest seq then on disk. Records up to it carry
    /// their own seqs; seqs above it may have been handed out before and be known to the hub.
    pub fn numbering_lost(&self) -> Option<u64> {
        self.numbering_lost
    }

    /// Sealed segments then the active one, oldest first.
    fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.sealed
            .iter()
            .chain(self.active.as_ref().map(|a| &a.segment))
    }

    /// Writes `next` (with the seq floor raised to `last_seq`) and adopts it.
    fn persist(&mut self, next: State) -> Result<(), StoreError> {
        let next = State {
            seq_floor: next.seq_floor.max(self.last_seq),
            ..next
        };
        state::save(&self.config.dir, &next)?;
        self.state = next;
        self.state_dirty = false;
        Ok(())
    }

    fn save_state(&mut self) -> Result<(), StoreError> {
        self.persist(self.state)
    }

    /// Syncs the active segment and moves it to the sealed list (or deletes it if empty).
    fn seal_active(&mut self) -> Result<(), StoreError> {
        if let Some(active) = &self.active
            && !active.broken
            && !active.segment.is_empty()
        {
            active
                .file
                .sync_data()
                .ctx("syncing", &active.segment.path)?;
        }
        if let Some(active) = self.active.take() {
            if active.segment.is_empty() {
                self.total_bytes -= active.segment.len;
                segment::remove(&active.segment.path)?;
            } else {
                self.sealed.push_back(active.segment);
            }
        }
        Ok(())
    }

    /// Drops the oldest sealed segments until `incoming` more bytes fit under `max_bytes`.
    /// Returns the number of unacknowledged records dropped.
    fn make_room(&mut self, incoming: u64) -> Result<u64, StoreError> {
        let excess = (self.total_bytes + incoming).saturating_sub(self.config.max_bytes);
        if excess == 0 {
            return Ok(0);
        }
        let (mut victims, mut freed, mut records, mut bytes) = (0, 0, 0, 0);
        for segment in &self.sealed {
            if freed >= excess {
                break;
            }
            let (r, b) = segment.count_after(self.state.acked)?;
            records += r;
            bytes += b;
            freed += segment.len;
            victims += 1;
        }
        if victims == 0 {
            return Ok(0);
        }
        if records > 0 {
            warn!(
                dropped = records,
                "log full; dropping the oldest unacknowledged records"
            );
        }
        // Persist the counter (and the seq floor) before the data disappears.
        self.persist(State {
            dropped_total: self.state.dropped_total + records,
            ..self.state
        })?;
        self.pending_records -= records;
        self.pending_bytes -= bytes;
        for _ in 0..victims {
            if let Some(segment) = self.sealed.pop_front() {
                self.total_bytes -= segment.len;
                segment::remove(&segment.path)?;
            }
        }
        Ok(records)
    }

    /// Deletes the leading sealed segments that hold nothing unacknowledged.
    fn remove_acked_segments(&mut self) -> Result<(), StoreError> {
        let acked = self.state.acked;
        let n = self
            .sealed
            .iter()
            .take_while(|s| s.is_empty() || s.last_seq <= acked)
            .count();
        if n == 0 {
            return Ok(());
        }
        // The cursor must be durable before the records it covers vanish, or the seq floor
        // could regress after a crash.
        self.save_state()?;
        for _ in 0..n {
            if let Some(segment) = self.sealed.pop_front() {
                self.total_bytes -= segment.len;
                segment::remove(&segment.path)?;
            }
        }
        Ok(())
    }

    fn recompute_pending(&mut self) -> Result<(), StoreError> {
        let (mut records, mut bytes) = (0, 0);
        for segment in self.segments() {
            let (r, b) = segment.count_after(self.state.acked)?;
            records += r;
            bytes += b;
        }
        self.pending_records = records;
        self.pending_bytes = bytes;
        Ok(())
    }
}

impl Drop for Log {
    /// A clean close: everything is synced and the seqs reserved beyond the last appended one
    /// are given back, so the next start continues right after it. An unclean stop (kill,
    /// power cut) skips this, and the next start continues above the reservation.
    fn drop(&mut self) {
        let closed = self.sync().and_then(|()| {
            if self.state.seq_floor == self.last_seq {
                return Ok(());
            }
            self.persist(State {
                seq_floor: self.last_seq,
                ..self.state
            })
        });
        if let Err(e) = closed {
            warn!(error = %e, "closing the log uncleanly; the next start skips reserved seqs");
        }
    }
}

/// Checks the configuration and returns the largest payload a record may carry.
fn validate(config: &StoreConfig) -> Result<usize, StoreError> {
    if config.segment_bytes < MIN_SEGMENT_BYTES {
        return Err(StoreError::Config(format!(
            "segment_bytes must be at least {MIN_SEGMENT_BYTES}, got {}",
            config.segment_bytes
        )));
    }
    if config.max_bytes < config.segment_bytes.saturating_mul(2) {
        return Err(StoreError::Config(format!(
            "max_bytes ({}) must be at least twice segment_bytes ({})",
            config.max_bytes, config.segment_bytes
        )));
    }
    if config.fsync.sync_interval().is_some_and(|i| i.is_zero()) {
        return Err(StoreError::Config("fsync interval must not be zero".into()));
    }
    let max = (config.segment_bytes - SEGMENT_HEADER_LEN - FRAME_HEADER_LEN).min(u32::MAX.into());
    Ok(usize::try_from(max).unwrap_or(usize::MAX))
}

/// Takes an exclusive lock so that two logs never write the same directory.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ctx("opening", &path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(TryLockError::Error(e)) => Err(e).ctx("locking", &path),
    }
}

/// The state file, or a fresh state when it is missing or unreadable; `true` then: what was
/// acknowledged, and the numbering, are unknown.
fn load_state(dir: &Path, has_segments: bool) -> Result<(State, bool), StoreError> {
    Ok(match state::load(dir)? {
        Loaded::Valid(state) => (state, false),
        Loaded::Missing => {
            if has_segments {
                warn!(dir = %dir.display(),
                    "state file missing; treating nothing as acknowledged");
            }
            (State::default(), true)
        }
        Loaded::Invalid(reason) => {
            warn!(dir = %dir.display(), reason,
                "state file unreadable; treating nothing as acknowledged");
            (State::default(), true)
        }
    })
}

/// What the segment files hold after a crash, and what must be done to them.
struct Recovered {
    /// Oldest first.
    segments: Vec<Segment>,
    /// Where each damaged file's valid data ends.
    repairs: Vec<(PathBuf, u64)>,
    /// Unacknowledged records lost to damage in older segments.
    lost: u64,
    /// The last good record's seq, 0 if none.
    last_seq: u64,
}

/// Scans every segment, oldest first. A torn tail of the newest is a write the power cut
/// interrupted; damage in an older one loses the rest of that segment, counted. Files too short
/// to hold records are removed.
fn recover_segments(files: &[(u64, PathBuf)], acked: u64) -> Result<Recovered, StoreError> {
    let mut recovered = Recovered {
        segments: Vec::with_capacity(files.len()),
        repairs: Vec::new(),
        lost: 0,
        last_seq: 0,
    };
    for (i, (name_seq, path)) in files.iter().enumerate() {
        let newest = i + 1 == files.len();
        let Some(scanned) = segment::scan(path, *name_seq, recovered.last_seq)? else {
            warn!(path = %path.display(), "removing a segment too short to hold records");
            segment::remove(path)?;
            continue;
        };
        if let Some(damage) = scanned.damage {
            if newest {
                warn!(path = %path.display(), offset = damage.offset, reason = damage.reason,
                    cut_bytes = damage.file_len - damage.offset,
                    "truncating the torn tail of the newest segment");
            } else {
                let n = segment::count_lost_frames(path, damage.offset, damage.file_len, acked)?;
                warn!(path = %path.display(), offset = damage.offset, reason = damage.reason,
                    lost_records = n,
                    "corrupt record in an older segment; dropping the rest of that segment");
                recovered.lost += n;
            }
            recovered.repairs.push((path.clone(), damage.offset));
        }
        if !scanned.segment.is_empty() {
            recovered.last_seq = scanned.segment.last_seq;
        }
        recovered.segments.push(scanned.segment);
    }
    Ok(recovered)
}

/// Removes leftover temporary files and returns the segment files sorted by first seq.
fn list_dir(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).ctx("listing", dir)? {
        let path = entry.ctx("listing", dir)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".tmp") {
            // An interrupted atomic write; the original (if any) is intact.
            segment::remove(&path)?;
            continue;
        }
        match segment::parse_file_name(name) {
            Some(Ok(seq)) => segments.push((seq, path)),
            Some(Err(())) => warn!(path = %path.display(), "ignoring oddly named segment file"),
            None => {}
        }
    }
    segments.sort_unstable_by_key(|&(seq, _)| seq);
    Ok(segments)
}
