//! Wire primitives shared by every packet family: a bounds-checked [`Reader`] over one frame, variable
//! byte integers, and the `put_*` helpers of the encoder.
//!
//! Owns: how integers, strings, binary data and variable byte integers look on the wire (MQTT 5
//! section 1.5, MQTT 3.1.1 section 1.5). Does not own: which field comes where (the packet files).
//!
//! Invariants:
//! - No read can panic: every read checks the bytes left first and returns
//!   [`DecodeError::LengthMismatch`] when a field would run past the end of the frame.
//! - Reads never copy: strings and binary fields are `Bytes` slices of the frame.
//! - A variable byte integer is at most 4 bytes and minimally encoded (MQTT-1.5.5-1).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::utf8::{Utf8, Utf8Error};

/// The largest value a variable byte integer can hold (four bytes).
pub(crate) const VARINT_MAX: u32 = 268_435_455;

/// The longest UTF-8 string or binary field: its length prefix is two bytes.
pub(crate) const FIELD_LEN_MAX: usize = u16::MAX as usize;

/// A cursor over the unread part of one frame. Reads split slices off the front of the shared buffer,
/// so the fields it returns keep the frame alive without copying it.
#[derive(Debug)]
pub(crate) struct Reader {
    rest: Bytes,
}

impl Reader {
    pub(crate) fn new(rest: Bytes) -> Reader {
        Reader { rest }
    }

    /// Bytes not yet read.
    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Fails unless every byte was read: the remaining length must match the contents exactly.
    #[inline]
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::LengthMismatch)
        }
    }

    /// Gives back the unread bytes (a PUBLISH payload).
    #[inline]
    pub(crate) fn into_rest(self) -> Bytes {
        self.rest
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        match self.rest.first() {
            Some(&byte) => {
                self.rest.advance(1);
                Ok(byte)
            }
            None => Err(DecodeError::LengthMismatch),
        }
    }

    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.rest.len() < 2 {
            return Err(DecodeError::LengthMismatch);
        }
        Ok(self.rest.get_u16())
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.rest.len() < 4 {
            return Err(DecodeError::LengthMismatch);
        }
        Ok(self.rest.get_u32())
    }

    /// The next `len` bytes, shared with the frame.
    #[inline]
    pub(crate) fn take(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if self.rest.len() < len {
            return Err(DecodeError::LengthMismatch);
        }
        Ok(self.rest.split_to(len))
    }

    /// Two-byte length then that many bytes: MQTT binary data, or a string not yet checked.
    #[inline]
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// An MQTT UTF-8 string, checked.
    #[inline]
    pub(crate) fn utf8(&mut self) -> Result<Utf8, DecodeError> {
        let bytes = self.binary()?;
        utf8(bytes)
    }

    /// A variable byte integer inside a packet: at most 4 bytes, minimally encoded.
    #[inline]
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for index in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7F) << (7 * index);
            if byte & 0x80 == 0 {
                // A final zero byte after a continuation byte adds nothing: not minimal.
                if byte == 0 && index > 0 {
                    return Err(DecodeError::MalformedVarInt);
                }
                return Ok(value);
            }
        }
        Err(DecodeError::MalformedVarInt)
    }
}

/// Checks bytes as an MQTT UTF-8 string without copying them.
#[inline]
pub(crate) fn utf8(bytes: Bytes) -> Result<Utf8, DecodeError> {
    Utf8::from_bytes(bytes).map_err(|error| match error {
        Utf8Error::IllFormed => DecodeError::InvalidUtf8,
        Utf8Error::NullCharacter => DecodeError::NullCharacter,
    })
}

/// True when a topic name contains a wildcard character (`+` or `#`), which only filters may hold.
///
/// Eight bytes at a time: this runs on every PUBLISH. `+` (0x2B) and `#` (0x23) differ only in bit
/// 3, so clearing that bit maps both to 0x23, and a byte equal to 0x23 becomes zero after the XOR.
#[inline]
pub(crate) fn has_wildcard(topic: &[u8]) -> bool {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const CLEAR_BIT3: u64 = !0x0808_0808_0808_0808;
    const HASH: u64 = 0x2323_2323_2323_2323;
    let mut chunks = topic.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let masked = (u64::from_le_bytes(word) & CLEAR_BIT3) ^ HASH;
        // Exact test for "some byte of `masked` is zero".
        if masked.wrapping_sub(LOW) & !masked & HIGH != 0 {
            return true;
        }
    }
    chunks.remainder().iter().any(|&byte| byte & 0xF7 == 0x23)
}

/// Parses the remaining length at `buf[1..]`: `Ok(None)` while incomplete, otherwise the fixed-header
/// length (type byte plus length bytes) and the remaining length.
///
/// A fourth byte with its continuation bit set is an error at once, without waiting for a fifth.
#[inline]
pub(crate) fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut remaining_len: usize = 0;
    for index in 0..4 {
        let Some(&byte) = buf.get(1 + index) else { return Ok(None) };
        remaining_len |= usize::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            if byte == 0 && index > 0 {
                return Err(DecodeError::MalformedRemainingLength);
            }
            return Ok(Some((2 + index, remaining_len)));
        }
    }
    Err(DecodeError::MalformedRemainingLength)
}

/// Bytes a variable byte integer takes. Values above [`VARINT_MAX`] report 5 so that callers see an
/// oversize packet rather than a wrong length.
#[inline]
pub(crate) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        2_097_152..=268_435_455 => 4,
        _ => 5,
    }
}

/// Appends a variable byte integer. The caller has checked `value <= VARINT_MAX`.
#[inline]
pub(crate) fn put_varint(buf: &mut BytesMut, value: usize) {
    debug_assert!(value <= VARINT_MAX as usize);
    let mut value = value;
    loop {
        // Truncation is the point: the low seven bits go out in this byte.
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// The wire size of a string or binary field, checking it fits its two-byte length prefix.
#[inline]
pub(crate) fn field_len(len: usize, name: &'static str) -> Result<usize, EncodeError> {
    if len > FIELD_LEN_MAX {
        return Err(EncodeError::FieldTooLong(name));
    }
    Ok(2 + len)
}

/// Appends a two-byte length and the bytes. The caller has checked the length with [`field_len`].
#[inline]
pub(crate) fn put_field(buf: &mut BytesMut, bytes: &[u8]) {
    debug_assert!(bytes.len() <= FIELD_LEN_MAX);
    // Checked by `field_len` during planning, so this cast does not truncate.
    buf.put_u16(bytes.len() as u16);
    buf.put_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_varint(value: usize) -> Vec<u8> {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, value);
        buf.to_vec()
    }

    #[test]
    fn varint_boundaries_round_trip() {
        for (value, len) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
            (268_435_455, 4),
        ] {
            let bytes = encode_varint(value);
            assert_eq!(bytes.len(), len, "{value}");
            assert_eq!(varint_len(value), len);
            let mut reader = Reader::new(Bytes::from(bytes.clone()));
            assert_eq!(reader.varint(), Ok(value as u32));
            assert!(reader.is_empty());
            let mut header = vec![0x30];
            header.extend_from_slice(&bytes);
            assert_eq!(fixed_header(&header), Ok(Some((1 + len, value))));
        }
        assert_eq!(varint_len(268_435_456), 5);
    }

    #[test]
    fn varint_spec_examples() {
        // MQTT 5 section 1.5.5 table: 128 = 0x80 0x01, 16,383 = 0xFF 0x7F.
        assert_eq!(encode_varint(128), [0x80, 0x01]);
        assert_eq!(encode_varint(16_383), [0xFF, 0x7F]);
        assert_eq!(encode_varint(268_435_455), [0xFF, 0xFF, 0xFF, 0x7F]);
    }

    #[test]
    fn varint_rejects_five_bytes_and_non_minimal() {
        let mut reader = Reader::new(Bytes::from_static(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]));
        assert_eq!(reader.varint(), Err(DecodeError::MalformedVarInt));
        let mut reader = Reader::new(Bytes::from_static(&[0x80, 0x00]));
        assert_eq!(reader.varint(), Err(DecodeError::MalformedVarInt));
        let mut reader = Reader::new(Bytes::from_static(&[0x80]));
        assert_eq!(reader.varint(), Err(DecodeError::LengthMismatch));
        assert_eq!(fixed_header(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF]), Err(DecodeError::MalformedRemainingLength));
        assert_eq!(fixed_header(&[0x30, 0x80, 0x00]), Err(DecodeError::MalformedRemainingLength));
    }

    #[test]
    fn fixed_header_waits_for_length_bytes() {
        assert_eq!(fixed_header(&[]), Ok(None));
        assert_eq!(fixed_header(&[0x30]), Ok(None));
        assert_eq!(fixed_header(&[0x30, 0x80]), Ok(None));
        assert_eq!(fixed_header(&[0x30, 0xFF, 0xFF, 0xFF]), Ok(None));
    }

    #[test]
    fn reader_fields_check_bounds() {
        let mut reader = Reader::new(Bytes::from_static(&[0x00, 0x03, b'a', b'b']));
        assert_eq!(reader.utf8(), Err(DecodeError::LengthMismatch));
        let mut reader = Reader::new(Bytes::from_static(&[0x00, 0x02, b'a', 0]));
        assert_eq!(reader.utf8(), Err(DecodeError::NullCharacter));
        let mut reader = Reader::new(Bytes::from_static(&[0x00, 0x01, 0xFF]));
        assert_eq!(reader.utf8(), Err(DecodeError::InvalidUtf8));
        let mut reader = Reader::new(Bytes::from_static(&[0x01]));
        assert_eq!(reader.u16(), Err(DecodeError::LengthMismatch));
        assert_eq!(reader.u32(), Err(DecodeError::LengthMismatch));
        assert_eq!(reader.u8(), Ok(1));
        assert_eq!(reader.u8(), Err(DecodeError::LengthMismatch));
    }

    #[test]
    fn wildcard_scan_agrees_with_the_naive_one() {
        let naive = |topic: &[u8]| topic.iter().any(|&byte| byte == b'+' || byte == b'#');
        let mut topic = b"abcdefghijklmnopqrstuvwxyz/0123456789".to_vec();
        assert!(!has_wildcard(&topic));
        for at in 0..topic.len() {
            for wildcard in [b'+', b'#', b'\x03', b'\x2B' ^ 0x80, b'\xAB', b'\xA3', b'\x2A', b'\x22'] {
                let original = topic[at];
                topic[at] = wildcard;
                for len in 0..=topic.len() {
                    assert_eq!(
                        has_wildcard(&topic[..len]),
                        naive(&topic[..len]),
                        "{wildcard} at {at} len {len}"
                    );
                }
                topic[at] = original;
            }
        }
        for byte in 0..=255u8 {
            let topic = [b'a', b'b', b'c', b'd', b'e', b'f', b'g', byte, byte];
            assert_eq!(has_wildcard(&topic), naive(&topic), "{byte}");
        }
    }

    #[test]
    fn field_len_limits() {
        assert_eq!(field_len(65_535, "x"), Ok(65_537));
        assert_eq!(field_len(65_536, "x"), Err(EncodeError::FieldTooLong("x")));
    }
}
