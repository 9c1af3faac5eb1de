//! Byte layouts of segment headers and record frames (all integers little-endian).

/// Identifies a segment file of this store.
pub(super) const SEGMENT_MAGIC: [u8; 8] = *b"EDGELOG\0";
/// Version of the segment and state file layouts this build reads and writes.
pub(super) const FORMAT_VERSION: u32 = 1;
/// `[magic 8][version u32][first_seq u64][crc32 of the previous 20 bytes u32]`.
pub(super) const SEGMENT_HEADER_LEN: u64 = 24;
/// `[len u32][crc32 over seq+payload u32][seq u64]`, followed by `len` payload bytes.
pub(super) const FRAME_HEADER_LEN: u64 = 16;

/// Why a segment header was rejected.
pub(super) enum HeaderError {
    BadMagic,
    UnsupportedVersion(u32),
    BadChecksum,
}

pub(super) fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Returns the header's first sequence number.
pub(super) fn decode_segment_header(
    h: &[u8; SEGMENT_HEADER_LEN as usize],
) -> Result<u64, HeaderError> {
    if h[0..8] != SEGMENT_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    // The version is checked before the checksum: a future version may lay the header out
    // differently, and "unsupported version" is the more useful message in that case.
    let version = le_u32(h, 8);
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    if crc32fast::hash(&h[..20]) != le_u32(h, 20) {
        return Err(HeaderError::BadChecksum);
    }
    Ok(le_u64(h, 12))
}

#[derive(Debug, Clone, Copy)]
pub(super) struct FrameHeader {
    pub(super) len: u32,
    pub(super) crc: u32,
    pub(super) seq: u64,
}

impl FrameHeader {
    pub(super) fn decode(b: &[u8; FRAME_HEADER_LEN as usize]) -> Self {
        Self {
            len: le_u32(b, 0),
            crc: le_u32(b, 4),
            seq: le_u64(b, 8),
        }
    }

    /// Bytes the whole frame occupies on disk.
    pub(super) fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN + u64::from(self.len)
    }
}

pub(super) fn record_crc(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one frame to `buf`. The caller guarantees `payload.len() <= u32::MAX`.
pub(super) fn encode_frame(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&record_crc(seq, payload).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(payload);
}

pub(super) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(super) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
