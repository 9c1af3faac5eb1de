//! The small state file: acknowledged cursor, sequence floor and drop counter.
//!
//! Layout (40 bytes, little-endian): `[magic "EDGESTAT"][version u32][acked u64]
//! [seq_floor u64][dropped_total u64][crc32 of the previous 36 bytes u32]`.
//! It is replaced atomically (temp file, fsync, rename, fsync directory), so a reader sees
//! either the old or the new contents, never a mix.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::error::{IoContext, StoreError};
use super::format::{FORMAT_VERSION, le_u32, le_u64};

pub(super) const STATE_FILE: &str = "state";
const STATE_TMP: &str = "state.tmp";
const STATE_MAGIC: [u8; 8] = *b"EDGESTAT";
const STATE_LEN: usize = 40;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct State {
    /// Every record with `seq <= acked` has been acknowledged by the hub.
    pub(super) acked: u64,
    /// No sequence number `<= seq_floor` may ever be appended again.
    pub(super) seq_floor: u64,
    /// Unacknowledged records lost to the size bound or to corruption.
    pub(super) dropped_total: u64,
}

pub(super) enum Loaded {
    Missing,
    Valid(State),
    /// Unreadable contents; the reason is for the log message.
    Invalid(&'static str),
}

pub(super) fn load(dir: &Path) -> Result<Loaded, StoreError> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(e).ctx("reading", &path),
    };
    if bytes.len() < 12 || bytes[0..8] != STATE_MAGIC {
        return Ok(Loaded::Invalid("bad magic"));
    }
    let version = le_u32(&bytes, 8);
    if version != FORMAT_VERSION {
        return Err(StoreError::UnsupportedVersion {
            path,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if bytes.len() != STATE_LEN {
        return Ok(Loaded::Invalid("wrong length"));
    }
    if crc32fast::hash(&bytes[..36]) != le_u32(&bytes, 36) {
        return Ok(Loaded::Invalid("checksum mismatch"));
    }
    Ok(Loaded::Valid(State {
        acked: le_u64(&bytes, 12),
        seq_floor: le_u64(&bytes, 20),
        dropped_total: le_u64(&bytes, 28),
    }))
}

pub(super) fn save(dir: &Path, state: &State) -> Result<(), StoreError> {
    let mut buf = Vec::with_capacity(STATE_LEN);
    buf.extend_from_slice(&STATE_MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&state.acked.to_le_bytes());
    buf.extend_from_slice(&state.seq_floor.to_le_bytes());
    buf.extend_from_slice(&state.dropped_total.to_le_bytes());
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());

    let tmp = dir.join(STATE_TMP);
    let mut file = File::create(&tmp).ctx("creating", &tmp)?;
    file.write_all(&buf).ctx("writing", &tmp)?;
    file.sync_all().ctx("syncing", &tmp)?;
    drop(file);
    let path = dir.join(STATE_FILE);
    fs::rename(&tmp, &path).ctx("renaming to", &path)?;
    sync_dir(dir)
}

/// Makes renames and file creations in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("syncing directory", dir)
}
