//! One segment file: its in-memory index, creation, sequential reading and recovery scan.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::Record;
use super::error::{IoContext, StoreError};
use super::format::{
    FRAME_HEADER_LEN, FrameHeader, HeaderError, SEGMENT_HEADER_LEN, decode_segment_header,
    encode_segment_header, record_crc,
};
use super::state::sync_dir;

/// One sparse index entry is kept per this many bytes of segment, bounding both the index
/// memory (~0.6% of the data) and the bytes walked to find a record (~4 KiB).
const INDEX_INTERVAL: u64 = 4096;
const READ_BUFFER: usize = 64 * 1024;

pub(super) fn file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// Parses the first sequence number out of a segment file name, if it is one.
pub(super) fn parse_file_name(name: &str) -> Option<Result<u64, ()>> {
    let stem = name.strip_suffix(".seg")?;
    if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
        Some(stem.parse().map_err(|_| ()))
    } else {
        Some(Err(()))
    }
}

#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    seq: u64,
    offset: u64,
    /// Position of the record within the segment (0-based).
    ordinal: u64,
}

/// What the log knows about a segment without touching the disk.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) path: PathBuf,
    /// From the header: a lower bound for the sequence numbers inside.
    pub(super) base_seq: u64,
    /// Valid bytes, header included. Anything beyond is not part of the log.
    pub(super) len: u64,
    pub(super) count: u64,
    /// Sequence number of the last record; meaningless while `count == 0`.
    pub(super) last_seq: u64,
    /// Sparse; always holds the first record, so `index[0].seq` is the first sequence number.
    index: Vec<IndexEntry>,
}

impl Segment {
    pub(super) fn new(path: PathBuf, base_seq: u64) -> Self {
        Self {
            path,
            base_seq,
            len: SEGMENT_HEADER_LEN,
            count: 0,
            last_seq: 0,
            index: Vec::new(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn first_seq(&self) -> Option<u64> {
        self.index.first().map(|e| e.seq)
    }

    /// Records a frame that was just appended at the end of the segment.
    pub(super) fn push(&mut self, seq: u64, frame_len: u64) {
        let due = self
            .index
            .last()
            .is_none_or(|e| self.len - e.offset >= INDEX_INTERVAL);
        if due {
            self.index.push(IndexEntry {
                seq,
                offset: self.len,
                ordinal: self.count,
            });
        }
        self.count += 1;
        self.len += frame_len;
        self.last_seq = seq;
    }

    /// Number of records and frame bytes with `seq > after`. Touches the disk only when
    /// `after` falls inside this segment.
    pub(super) fn count_after(&self, after: u64) -> Result<(u64, u64), StoreError> {
        match self.first_seq() {
            None => Ok((0, 0)),
            Some(_) if self.last_seq <= after => Ok((0, 0)),
            Some(first) if first > after => Ok((self.count, self.len - SEGMENT_HEADER_LEN)),
            Some(_) => match self.reader_after(after)? {
                Some((ordinal, reader)) => Ok((self.count - ordinal, self.len - reader.offset())),
                None => Ok((0, 0)),
            },
        }
    }

    /// A reader positioned at the first record with `seq > after`, and that record's ordinal.
    pub(super) fn reader_after(
        &self,
        after: u64,
    ) -> Result<Option<(u64, FrameReader<'_>)>, StoreError> {
        if self.is_empty() || self.last_seq <= after {
            return Ok(None);
        }
        let start = match self.index.partition_point(|e| e.seq <= after) {
            0 => IndexEntry {
                seq: 0,
                offset: SEGMENT_HEADER_LEN,
                ordinal: 0,
            },
            i => self.index[i - 1],
        };
        let mut reader = FrameReader::open(&self.path, start.offset, self.len)?;
        let mut ordinal = start.ordinal;
        while let Some(header) = reader.peek()? {
            if header.seq > after {
                return Ok(Some((ordinal, reader)));
            }
            reader.skip()?;
            ordinal += 1;
        }
        // The index promised a record beyond `after`; the file no longer agrees.
        Err(StoreError::CorruptRecord {
            path: self.path.clone(),
            offset: reader.offset(),
        })
    }
}

/// Sequential, buffered reader over the valid frames of a segment.
pub(super) struct FrameReader<'a> {
    path: &'a Path,
    inner: BufReader<File>,
    /// Offset of the next unconsumed frame.
    offset: u64,
    end: u64,
    /// Header of the frame at `offset`, already read from the file.
    peeked: Option<FrameHeader>,
}

impl<'a> FrameReader<'a> {
    pub(super) fn open(path: &'a Path, offset: u64, end: u64) -> Result<Self, StoreError> {
        let file = File::open(path).ctx("opening", path)?;
        let mut inner = BufReader::with_capacity(READ_BUFFER, file);
        inner
            .seek(SeekFrom::Start(offset))
            .ctx("seeking in", path)?;
        Ok(Self {
            path,
            inner,
            offset,
            end,
            peeked: None,
        })
    }

    pub(super) fn offset(&self) -> u64 {
        self.offset
    }

    fn corrupt(&self) -> StoreError {
        StoreError::CorruptRecord {
            path: self.path.to_path_buf(),
            offset: self.offset,
        }
    }

    /// A file that ends before the data the log knows of was cut from outside: damage at the
    /// current record, like a checksum mismatch, not an I/O failure.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), StoreError> {
        match self.inner.read_exact(buf) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.corrupt()),
            other => other.ctx("reading", self.path),
        }
    }

    /// Header of the next frame, or `None` at the end of the valid data.
    pub(super) fn peek(&mut self) -> Result<Option<FrameHeader>, StoreError> {
        if let Some(header) = self.peeked {
            return Ok(Some(header));
        }
        if self.offset >= self.end {
            return Ok(None);
        }
        let mut buf = [0u8; FRAME_HEADER_LEN as usize];
        if self.end - self.offset < FRAME_HEADER_LEN {
            return Err(self.corrupt());
        }
        self.read_exact(&mut buf)?;
        let header = FrameHeader::decode(&buf);
        if header.frame_len() > self.end - self.offset {
            return Err(self.corrupt());
        }
        self.peeked = Some(header);
        Ok(Some(header))
    }

    /// Skips the frame returned by the last `peek`.
    pub(super) fn skip(&mut self) -> Result<(), StoreError> {
        if let Some(header) = self.peeked.take() {
            self.inner
                .seek_relative(i64::from(header.len))
                .ctx("seeking in", self.path)?;
            self.offset += header.frame_len();
        }
        Ok(())
    }

    /// Reads and verifies the next record.
    pub(super) fn read(&mut self) -> Result<Option<Record>, StoreError> {
        let Some(header) = self.peek()? else {
            return Ok(None);
        };
        let mut payload = vec![0u8; header.len as usize];
        self.read_exact(&mut payload)?;
        if record_crc(header.seq, &payload) != header.crc {
            return Err(self.corrupt());
        }
        self.peeked = None;
        self.offset += header.frame_len();
        Ok(Some(Record {
            seq: header.seq,
            payload,
        }))
    }
}

/// Creates an empty segment durably: the header is written and synced under a temporary
/// name and only then renamed into place, so a `.seg` file always starts with a full header.
/// Returns a handle that appends at the end of the file.
pub(super) fn create(dir: &Path, first_seq: u64) -> Result<(Segment, File), StoreError> {
    let path = dir.join(file_name(first_seq));
    let tmp = path.with_extension("seg.tmp");
    let mut file = File::create(&tmp).ctx("creating", &tmp)?;
    file.write_all(&encode_segment_header(first_seq))
        .ctx("writing", &tmp)?;
    file.sync_all().ctx("syncing", &tmp)?;
    drop(file);
    fs::rename(&tmp, &path).ctx("renaming to", &path)?;
    sync_dir(dir)?;
    let file = open_append(&path)?;
    Ok((Segment::new(path, first_seq), file))
}

pub(super) fn open_append(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .ctx("opening for append", path)
}

/// Where and why the valid data of a segment ends before the end of its file.
#[derive(Debug)]
pub(super) struct Damage {
    pub(super) offset: u64,
    pub(super) file_len: u64,
    pub(super) reason: &'static str,
}

pub(super) struct Scanned {
    pub(super) segment: Segment,
    pub(super) damage: Option<Damage>,
}

/// Reads a whole segment, validating every frame's length, checksum and sequence order.
/// Records must have `seq > prev_seq` (the last good record of the previous segment).
/// Returns `None` for a file too short to hold a header: it cannot contain records.
pub(super) fn scan(
    path: &Path,
    name_seq: u64,
    prev_seq: u64,
) -> Result<Option<Scanned>, StoreError> {
    scan_within(path, name_seq, prev_seq, u64::MAX)
}

/// [`scan`] of the first `limit` bytes only, as if the file ended there.
pub(super) fn scan_within(
    path: &Path,
    name_seq: u64,
    prev_seq: u64,
    limit: u64,
) -> Result<Option<Scanned>, StoreError> {
    let file = File::open(path).ctx("opening", path)?;
    let file_len = file
        .metadata()
        .ctx("reading metadata of", path)?
        .len()
        .min(limit);
    if file_len < SEGMENT_HEADER_LEN {
        return Ok(None);
    }
    let mut reader = BufReader::with_capacity(READ_BUFFER, file);
    let mut raw = [0u8; SEGMENT_HEADER_LEN as usize];
    reader.read_exact(&mut raw).ctx("reading", path)?;
    let corrupt_header = |reason| StoreError::CorruptHeader {
        path: path.to_path_buf(),
        reason,
    };
    let base_seq = match decode_segment_header(&raw) {
        Ok(seq) => seq,
        Err(HeaderError::UnsupportedVersion(found)) => {
            return Err(StoreError::UnsupportedVersion {
                path: path.to_path_buf(),
                found,
                supported: super::format::FORMAT_VERSION,
            });
        }
        Err(HeaderError::BadMagic) => return Err(corrupt_header("bad magic")),
        Err(HeaderError::BadChecksum) => return Err(corrupt_header("checksum mismatch")),
    };
    if base_seq != name_seq {
        return Err(corrupt_header(
            "first sequence number differs from the file name",
        ));
    }

    let mut segment = Segment::new(path.to_path_buf(), base_seq);
    let mut prev = prev_seq;
    let mut payload = Vec::new();
    let damage = loop {
        let offset = segment.len;
        let remaining = file_len - offset;
        if remaining == 0 {
            break None;
        }
        let damage = |reason| {
            Some(Damage {
                offset,
                file_len,
                reason,
            })
        };
        if remaining < FRAME_HEADER_LEN {
            break damage("truncated frame header");
        }
        let mut raw = [0u8; FRAME_HEADER_LEN as usize];
        reader.read_exact(&mut raw).ctx("reading", path)?;
        let header = FrameHeader::decode(&raw);
        if header.frame_len() > remaining {
            break damage("frame extends past the end of the file");
        }
        payload.resize(header.len as usize, 0);
        reader.read_exact(&mut payload).ctx("reading", path)?;
        if record_crc(header.seq, &payload) != header.crc {
            break damage("checksum mismatch");
        }
        if header.seq <= prev || header.seq < base_seq {
            break damage("sequence number out of order");
        }
        segment.push(header.seq, header.frame_len());
        prev = header.seq;
    };
    Ok(Some(Scanned { segment, damage }))
}

/// Best-effort count of the unacknowledged records lost in a damaged region: follows the
/// length fields from `from` as long as they stay inside the file and counts frames whose
/// (unverified) sequence number is above `acked`. Exact for a flipped payload bit; a
/// guess when the length field itself is damaged.
pub(super) fn count_lost_frames(
    path: &Path,
    from: u64,
    file_len: u64,
    acked: u64,
) -> Result<u64, StoreError> {
    let file = File::open(path).ctx("opening", path)?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, file);
    reader.seek(SeekFrom::Start(from)).ctx("seeking in", path)?;
    let mut offset = from;
    let mut lost = 0;
    while file_len - offset >= FRAME_HEADER_LEN {
        let mut raw = [0u8; FRAME_HEADER_LEN as usize];
        reader.read_exact(&mut raw).ctx("reading", path)?;
        let header = FrameHeader::decode(&raw);
        if header.seq > acked {
            lost += 1;
        }
        if header.frame_len() > file_len - offset {
            break;
        }
        reader
            .seek_relative(i64::from(header.len))
            .ctx("seeking in", path)?;
        offset += header.frame_len();
    }
    Ok(lost)
}

/// Cuts a file back to `len` bytes and makes that durable.
pub(super) fn truncate(path: &Path, len: u64) -> Result<(), StoreError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .ctx("opening", path)?;
    file.set_len(len).ctx("truncating", path)?;
    file.sync_all().ctx("syncing", path)
}

/// Removes a file; one that is already gone counts as removed.
pub(super) fn remove(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).ctx("removing", path),
        _ => Ok(()),
    }
}
