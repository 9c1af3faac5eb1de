//! Error type of the store and a small helper that attaches paths to I/O errors.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in the store.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    /// An operating-system I/O call failed; `op` says what the store was doing.
    #[error("I/O error {op} {}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Sequence numbers must strictly increase over the lifetime of the device.
    #[error("sequence number {seq} is not greater than the last sequence number {last}")]
    SeqNotIncreasing { seq: u64, last: u64 },

    /// The last sequence number is the protocol's largest: no reading can follow it.
    #[error(
        "no sequence number is left above the last one ({})",
        hub_protocol::MAX_SEQ
    )]
    SeqExhausted,

    /// The payload does not fit in one segment.
    #[error("payload of {len} bytes exceeds the maximum of {max} bytes per record")]
    RecordTooLarge { len: usize, max: usize },

    /// A file was written by a different (newer) format version. It is left untouched.
    #[error(
        "{}: unsupported format version {found} (this build reads version {supported}); the file was left untouched",
        .path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// A segment header is unreadable. Nothing is deleted: the operator decides.
    #[error("{}: corrupt segment header ({reason}); the file was left untouched", .path.display())]
    CorruptHeader { path: PathBuf, reason: &'static str },

    /// A record failed validation while being read back after recovery had accepted it
    /// (the medium changed underneath us). [`Log::read_after`](super::Log::read_after) repairs
    /// the segment itself; other readers may report it.
    #[error("{}: corrupt record at byte offset {offset}", .path.display())]
    CorruptRecord { path: PathBuf, offset: u64 },

    /// The [`StoreConfig`](super::StoreConfig) is unusable.
    #[error("invalid store configuration: {0}")]
    Config(String),

    /// Another [`Log`](super::Log) (in this or another process) has the directory open.
    #[error("store directory {} is already in use by another log", .dir.display())]
    Locked { dir: PathBuf },
}

/// Attaches the operation and path to an `io::Error`.
pub(super) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}
