//! The benchmark payload header and the clock it is stamped with.
//!
//! Owns: the layout of the first [`HEADER_BYTES`] of every benchmark PUBLISH payload
//! (little-endian: send time in CLOCK_MONOTONIC nanoseconds, publisher id, sequence number) and
//! [`mono_ns`]. CLOCK_MONOTONIC is shared by every process on the host, so a latency measured
//! between two processes of one machine is still meaningful. Does not own: what follows the header
//! (filler bytes, left as the template made them).

/// Bytes of the payload header; `--payload` must be at least this.
pub const HEADER_BYTES: usize = 16;

/// One decoded payload header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// CLOCK_MONOTONIC nanoseconds when the message was sent (or, in open loop, was due).
    pub sent_ns: u64,
    pub publisher_id: u32,
    pub sequence: u32,
}

impl Header {
    /// The header's bytes.
    pub fn to_bytes(self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[0..8].copy_from_slice(&self.sent_ns.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.publisher_id.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.sequence.to_le_bytes());
        bytes
    }

    /// Parses a payload's header; `None` when the payload is too short to be ours.
    pub fn parse(payload: &[u8]) -> Option<Header> {
        let bytes: &[u8; HEADER_BYTES] = payload.get(..HEADER_BYTES)?.try_into().ok()?;
        Some(Header {
            sent_ns: u64::from_le_bytes(bytes[0..8].try_into().ok()?),
            publisher_id: u32::from_le_bytes(bytes[8..12].try_into().ok()?),
            sequence: u32::from_le_bytes(bytes[12..16].try_into().ok()?),
        })
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn mono_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call, and
    // CLOCK_MONOTONIC is always supported on Linux, so the call cannot fail.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now);
    }
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_short_payload_is_refused() {
        let header = Header { sent_ns: 0x0102_0304_0506_0708, publisher_id: 7, sequence: u32::MAX };
        let mut payload = header.to_bytes().to_vec();
        payload.extend_from_slice(b"filler");
        assert_eq!(Header::parse(&payload), Some(header));
        assert_eq!(Header::parse(&payload[..HEADER_BYTES - 1]), None);
    }

    #[test]
    fn monotonic_clock_does_not_go_back() {
        let first = mono_ns();
        assert!(mono_ns() >= first);
    }
}
