//! The on-disk format, as pure functions over byte slices (no I/O here, so tests and fuzzers can
//! drive it directly).
//!
//! A segment file is a 64-byte header followed by records:
//!
//! ```text
//! header:  0..8   magic "SHMQSEG\0"
//!          8..12  format version (u32 LE) = FORMAT_VERSION
//!          12..16 header length (u32 LE) = 64
//!          16..24 segment id (u64 LE), equal to the number in the file name
//!          24..32 base offset (u64 LE): the log offset of the segment's first record
//!          32..36 crc32c of bytes 0..32 (u32 LE)
//!          36..64 zero
//! record:  [payload length u32 LE][crc32c u32 LE][payload][zero padding to a multiple of 8]
//! ```
//!
//! The record checksum covers the length field and the payload, so a flipped bit in either is
//! found. Records start at 8-byte aligned file positions, so payloads are 8-byte aligned in the
//! mapping (rkyv can read them in place) and a scan can look for a valid frame at every aligned
//! position after a bad one. An all-zero frame header marks the end of the records: segments are
//! preallocated with zeros, and recovery re-zeroes whatever it truncates.
//!
//! Invariant: no function here panics on any input bytes; lengths read from disk are checked
//! against the slice before they are used.

use crate::{Offset, SegmentId};

/// The magic at the start of every segment file.
pub(crate) const MAGIC: [u8; 8] = *b"SHMQSEG\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The size of a segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN_BYTES: usize = 64;
/// Records (and so payloads) start at multiples of this in the file and in the mapping.
pub const RECORD_ALIGN_BYTES: usize = 8;
/// The length and checksum fields before each payload.
pub(crate) const FRAME_HEADER_LEN_BYTES: usize = 8;
/// Bounds the work of the search for valid records after a bad one (see [`scan`]).
const RESYNC_CANDIDATES_MAX: usize = 4096;

/// A decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub(crate) id: SegmentId,
    pub(crate) base: Offset,
}

/// Why a header was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HeaderError {
    TooShort { len_bytes: usize },
    BadMagic,
    UnsupportedVersion(u32),
    BadHeaderLen(u32),
    Checksum,
}

pub(crate) fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

pub(crate) fn encode_header(h: SegmentHeader) -> [u8; SEGMENT_HEADER_LEN_BYTES] {
    let mut b = [0u8; SEGMENT_HEADER_LEN_BYTES];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN_BYTES as u32).to_le_bytes());
    b[16..24].copy_from_slice(&h.id.0.to_le_bytes());
    b[24..32].copy_from_slice(&h.base.0.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a header. Magic and version are checked before the checksum so that a file of a newer
/// format is reported as such, not as corrupt.
pub(crate) fn decode_header(bytes: &[u8]) -> Result<SegmentHeader, HeaderError> {
    if bytes.len() < SEGMENT_HEADER_LEN_BYTES {
        return Err(HeaderError::TooShort { len_bytes: bytes.len() });
    }
    if bytes[0..8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = u32_at(bytes, 8).ok_or(HeaderError::TooShort { len_bytes: bytes.len() })?;
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let header_len = u32_at(bytes, 12).ok_or(HeaderError::TooShort { len_bytes: bytes.len() })?;
    if header_len as usize != SEGMENT_HEADER_LEN_BYTES {
        return Err(HeaderError::BadHeaderLen(header_len));
    }
    let crc = u32_at(bytes, 32).ok_or(HeaderError::TooShort { len_bytes: bytes.len() })?;
    if crc != crc32c::crc32c(&bytes[0..32]) {
        return Err(HeaderError::Checksum);
    }
    let id = u64_at(bytes, 16).ok_or(HeaderError::TooShort { len_bytes: bytes.len() })?;
    let base = u64_at(bytes, 24).ok_or(HeaderError::TooShort { len_bytes: bytes.len() })?;
    Ok(SegmentHeader { id: SegmentId(id), base: Offset(base) })
}

/// The bytes a record with a payload of `payload_len` bytes takes in a segment.
pub(crate) fn frame_len(payload_len: usize) -> usize {
    (FRAME_HEADER_LEN_BYTES + payload_len).next_multiple_of(RECORD_ALIGN_BYTES)
}

/// The checksum stored in a record's frame: crc32c over the length field, then the payload.
pub(crate) fn record_crc(payload: &[u8]) -> u32 {
    let len = (payload.len() as u32).to_le_bytes();
    crc32c::crc32c_append(crc32c::crc32c(&len), payload)
}

pub(crate) fn encode_frame_header(payload: &[u8]) -> [u8; FRAME_HEADER_LEN_BYTES] {
    let mut h = [0u8; FRAME_HEADER_LEN_BYTES];
    h[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[4..8].copy_from_slice(&record_crc(payload).to_le_bytes());
    h
}

/// What is found at one position of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A record whose payload is `data[at + 8 .. at + 8 + len]` and whose checksum matches.
    Valid { payload_len: usize },
    /// An all-zero frame header, or fewer than 8 bytes left: the end of the records.
    End,
    /// Something that is not a record.
    Bad(&'static str),
}

/// Checks the frame at `at` in a segment's bytes `data`.
pub(crate) fn check_frame(data: &[u8], at: usize) -> Frame {
    let (Some(len), Some(crc)) = (u32_at(data, at), u32_at(data, at.saturating_add(4))) else {
        return Frame::End;
    };
    if len == 0 && crc == 0 {
        return Frame::End;
    }
    let start = at + FRAME_HEADER_LEN_BYTES;
    let Some(payload) = start.checked_add(len as usize).and_then(|end| data.get(start..end)) else {
        return Frame::Bad("length runs past the end of the segment");
    };
    if record_crc(payload) != crc {
        return Frame::Bad("checksum mismatch");
    }
    Frame::Valid { payload_len: len as usize }
}

/// How the records of a scanned segment end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Tail {
    /// At an end marker, with only zeros after it.
    Clean,
    /// A bad frame or stray bytes at `at`, with no valid record after them: a write that did not
    /// complete. Only the last segment may end like this; recovery truncates it there.
    Torn { at: usize, reason: &'static str },
    /// A bad frame at `at` with a valid record after it, or (in a sealed segment) stray bytes
    /// after the end: corruption that must be reported.
    Corrupt { at: usize, reason: &'static str },
}

/// The result of scanning one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Scan {
    /// The file position of every valid record, in order.
    pub(crate) records: Vec<u32>,
    /// The file position just after the last valid record.
    pub(crate) end: usize,
    pub(crate) tail: Tail,
}

/// Scans a whole segment (`data` is the whole file, header included). `last` says whether it is
/// the log's last segment, the only one that may have a torn tail.
///
/// After the first bad frame (or stray non-zero bytes after an end marker), the scan looks for a
/// valid record at every later aligned position whose length is at most `record_len_max`
/// (bounded by [`RESYNC_CANDIDATES_MAX`] checksum computations; past that it assumes the worst).
/// A valid record there means the damage is not a torn tail, and it is reported as corruption.
pub(crate) fn scan(data: &[u8], last: bool, record_len_max: usize) -> Scan {
    let mut records = Vec::new();
    let mut at = SEGMENT_HEADER_LEN_BYTES;
    let bad = loop {
        match check_frame(data, at) {
            Frame::Valid { payload_len } => {
                // A segment is at most u32::MAX bytes (Config validation), so `at` fits.
                records.push(at as u32);
                at += frame_len(payload_len);
            }
            Frame::End => break None,
            Frame::Bad(reason) => break Some(reason),
        }
    };
    let end = at.min(data.len());
    let tail = match bad {
        None => {
            // The records end here; everything after must be zero.
            let rest = data.get(end..).unwrap_or(&[]);
            match rest.iter().position(|&b| b != 0) {
                None => Tail::Clean,
                Some(_) if !last => Tail::Corrupt { at: end, reason: "non-zero bytes after the last record" },
                Some(_) if valid_record_after(data, end, record_len_max) => {
                    Tail::Corrupt { at: end, reason: "zeroed frame followed by valid records" }
                }
                Some(_) => Tail::Torn { at: end, reason: "stray bytes after the last record" },
            }
        }
        Some(reason) if last && !valid_record_after(data, end, record_len_max) => {
            Tail::Torn { at: end, reason }
        }
        Some(reason) => Tail::Corrupt { at: end, reason },
    };
    Scan { records, end, tail }
}

/// Whether a valid record starts at any aligned position after `at`.
fn valid_record_after(data: &[u8], at: usize, record_len_max: usize) -> bool {
    let mut candidates = 0usize;
    let mut pos = at + RECORD_ALIGN_BYTES;
    while pos + FRAME_HEADER_LEN_BYTES <= data.len() {
        if let (Some(len), Some(crc)) = (u32_at(data, pos), u32_at(data, pos + 4)) {
            let fits = (len as usize) <= record_len_max
                && pos + FRAME_HEADER_LEN_BYTES + (len as usize) <= data.len();
            if (len != 0 || crc != 0) && fits {
                candidates += 1;
                if candidates > RESYNC_CANDIDATES_MAX {
                    return true;
                }
                if matches!(check_frame(data, pos), Frame::Valid { .. }) {
                    return true;
                }
            }
        }
        pos += RECORD_ALIGN_BYTES;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(payloads: &[&[u8]], size: usize) -> Vec<u8> {
        let mut d = vec![0u8; size];
        d[..SEGMENT_HEADER_LEN_BYTES]
            .copy_from_slice(&encode_header(SegmentHeader { id: SegmentId(1), base: Offset(0) }));
        let mut at = SEGMENT_HEADER_LEN_BYTES;
        for p in payloads {
            d[at..at + 8].copy_from_slice(&encode_frame_header(p));
            d[at + 8..at + 8 + p.len()].copy_from_slice(p);
            at += frame_len(p.len());
        }
        d
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = SegmentHeader { id: SegmentId(7), base: Offset(123_456) };
        let b = encode_header(h);
        assert_eq!(decode_header(&b), Ok(h));
        assert_eq!(decode_header(&b[..10]), Err(HeaderError::TooShort { len_bytes: 10 }));
        for byte in 0..36 {
            for bit in 0..8 {
                let mut d = b;
                d[byte] ^= 1 << bit;
                assert!(decode_header(&d).is_err(), "flip of byte {byte} bit {bit} accepted");
            }
        }
        let mut v = b;
        v[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(decode_header(&v), Err(HeaderError::UnsupportedVersion(2)));
    }

    #[test]
    fn frames_are_aligned_and_empty_payloads_are_records() {
        assert_eq!(frame_len(0), 8);
        assert_eq!(frame_len(1), 16);
        assert_eq!(frame_len(8), 16);
        assert_eq!(frame_len(9), 24);
        let d = segment(&[b"", b"abc", b""], 256);
        let s = scan(&d, true, 1024);
        assert_eq!(s.records, vec![64, 72, 88]);
        assert_eq!(s.end, 96);
        assert_eq!(s.tail, Tail::Clean);
    }

    #[test]
    fn flipped_bit_in_the_middle_is_corrupt_and_at_the_tail_is_torn() {
        let d = segment(&[b"first record", b"second record", b"third"], 512);
        // Payload of the second record, then its length field.
        for pos in [64 + 24 + 8 + 3, 64 + 24] {
            let mut m = d.clone();
            m[pos] ^= 0x10;
            let s = scan(&m, true, 1024);
            assert!(matches!(s.tail, Tail::Corrupt { at: 88, .. }), "{:?}", s.tail);
            let s = scan(&m, false, 1024);
            assert!(matches!(s.tail, Tail::Corrupt { at: 88, .. }), "{:?}", s.tail);
        }
        // The last record's payload and length: torn in the last segment, corrupt in a sealed one.
        let last = 64 + 24 + 24;
        for pos in [last + 8, last + 1] {
            let mut m = d.clone();
            m[pos] ^= 0x01;
            let s = scan(&m, true, 1024);
            assert_eq!(s.records.len(), 2);
            assert!(matches!(s.tail, Tail::Torn { at, .. } if at == last), "{:?}", s.tail);
            let s = scan(&m, false, 1024);
            assert!(matches!(s.tail, Tail::Corrupt { at, .. } if at == last), "{:?}", s.tail);
        }
    }

    #[test]
    fn stray_bytes_after_the_end() {
        let mut d = segment(&[b"one"], 512);
        d[300] = 1;
        assert!(matches!(scan(&d, true, 1024).tail, Tail::Torn { at: 80, .. }));
        assert!(matches!(scan(&d, false, 1024).tail, Tail::Corrupt { at: 80, .. }));
        // A zeroed record followed by a valid one is a hole, not a tail.
        let mut d = segment(&[b"one", b"two", b"three"], 512);
        d[80..96].fill(0);
        assert!(matches!(scan(&d, true, 1024).tail, Tail::Corrupt { at: 80, .. }));
    }

    #[test]
    fn truncation_at_every_byte_is_torn_or_clean() {
        let d = segment(&[b"alpha", b"bravo-bravo", b"charlie charlie charlie"], 160);
        let full = scan(&d, true, 1024);
        assert_eq!(full.records.len(), 3);
        let last = *full.records.last().unwrap() as usize;
        // The last payload is 23 bytes: its frame ends in one byte of padding.
        let complete = last + 8 + 23;
        for cut in last..=full.end {
            let s = scan(&d[..cut], true, 1024);
            let expect = if cut >= complete { 3 } else { 2 };
            assert_eq!(s.records.len(), expect, "cut at {cut}");
            if cut >= complete || cut == last {
                assert_eq!(s.tail, Tail::Clean, "cut at {cut}");
                assert_eq!(s.end, cut.min(full.end), "cut at {cut}");
            } else {
                assert!(matches!(s.tail, Tail::Torn { at, .. } if at == last), "cut at {cut}: {:?}", s.tail);
            }
        }
    }

    #[test]
    fn scan_never_panics_on_garbage() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for len in [0usize, 7, 64, 65, 100, 1000] {
            for _ in 0..50 {
                let mut d = segment(&[], len.max(64));
                d.truncate(len.max(64));
                for b in d.iter_mut().skip(64) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                let _ = scan(&d, true, 1 << 20);
                let _ = scan(&d, false, 1 << 20);
            }
        }
    }
}
