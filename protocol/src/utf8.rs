//! [`Utf8`]: an MQTT UTF-8 string held as a zero-copy slice of the frame it came from.
//!
//! Invariant: the bytes are well-formed UTF-8 (Rust's definition, which excludes surrogates and
//! overlong forms, as MQTT requires: MQTT-1.5.4-1) and contain no U+0000 (MQTT-1.5.4-2). The only
//! constructors check this, which is what makes [`Utf8::as_str`] sound.

use std::fmt;

use bytes::Bytes;

/// A well-formed MQTT UTF-8 string without U+0000, sharing the buffer it was decoded from.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Utf8(Bytes);

/// Why bytes are not an MQTT UTF-8 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Utf8Error {
    /// Not well-formed UTF-8 (MQTT-1.5.4-1).
    IllFormed,
    /// Contains U+0000 (MQTT-1.5.4-2).
    NullCharacter,
}

impl Utf8 {
    /// Checks `bytes` and wraps them without copying.
    pub fn from_bytes(bytes: Bytes) -> Result<Utf8, Utf8Error> {
        // Topics and ids are nearly always ASCII: one pass checks "ASCII and no U+0000" eight bytes
        // at a time, and only other strings pay for full UTF-8 validation plus a NUL search.
        match ascii_scan(&bytes) {
            AsciiScan::Clean => return Ok(Utf8(bytes)),
            AsciiScan::Null => return Err(Utf8Error::NullCharacter),
            AsciiScan::NonAscii => {}
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| Utf8Error::IllFormed)?;
        if text.as_bytes().contains(&0) {
            return Err(Utf8Error::NullCharacter);
        }
        Ok(Utf8(bytes))
    }

    /// Copies a `&'static str`-free string into a new buffer; panics never, fails on U+0000.
    pub fn new(text: &str) -> Result<Utf8, Utf8Error> {
        Utf8::from_bytes(Bytes::copy_from_slice(text.as_bytes()))
    }

    /// Wraps a static string without copying. Panics if it contains U+0000 (a programming error).
    pub fn from_static(text: &'static str) -> Utf8 {
        assert!(!text.as_bytes().contains(&0), "static MQTT string contains U+0000");
        Utf8(Bytes::from_static(text.as_bytes()))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checked that `self.0` is well-formed UTF-8 and the bytes are
        // immutable (`Bytes` is a read-only view), so they are still UTF-8 here. Exercised by the
        // unit tests below and by every decode test.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying bytes (no copy).
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Gives back the underlying bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why bytes are not a topic name, from [`topic_name_from_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TopicBytesError {
    Utf8(Utf8Error),
    /// `+` or `#` (MQTT-3.3.2-2).
    Wildcard,
}

/// A PUBLISH topic name: MQTT UTF-8 without `+` or `#`, checked in one pass for ASCII names (the
/// hot path of every PUBLISH decode). A NUL is reported before a wildcard, as the two-step check
/// (string, then wildcard) would.
#[inline]
pub(crate) fn topic_name_from_bytes(bytes: Bytes) -> Result<Utf8, TopicBytesError> {
    // `+` (0x2B) and `#` (0x23) differ only in bit 3: clearing it and XOR-ing with 0x23 maps both,
    // and only them, to a zero byte.
    const CLEAR_BIT3: u64 = !0x0808_0808_0808_0808;
    const HASH: u64 = 0x2323_2323_2323_2323;
    let mut null = false;
    let mut wildcard = false;
    let mut ascii = true;
    let (words, tail) = words(&bytes);
    for word in words {
        if word & HIGH != 0 {
            ascii = false;
            break;
        }
        null |= has_zero_byte(word);
        wildcard |= has_zero_byte((word & CLEAR_BIT3) ^ HASH);
    }
    if ascii {
        for &byte in tail {
            if byte >= 0x80 {
                ascii = false;
                break;
            }
            null |= byte == 0;
            wildcard |= byte == b'+' || byte == b'#';
        }
    }
    if !ascii {
        let checked = Utf8::from_bytes(bytes).map_err(TopicBytesError::Utf8)?;
        if checked.as_bytes().iter().any(|&byte| byte == b'+' || byte == b'#') {
            return Err(TopicBytesError::Wildcard);
        }
        return Ok(checked);
    }
    if null {
        Err(TopicBytesError::Utf8(Utf8Error::NullCharacter))
    } else if wildcard {
        Err(TopicBytesError::Wildcard)
    } else {
        Ok(Utf8(bytes))
    }
}

const LOW: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The little-endian 8-byte words of `bytes`, and the tail shorter than a word.
#[inline]
fn words(bytes: &[u8]) -> (impl Iterator<Item = u64> + '_, &[u8]) {
    let chunks = bytes.chunks_exact(8);
    let tail = chunks.remainder();
    let words = chunks.map(|chunk| {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        u64::from_le_bytes(word)
    });
    (words, tail)
}

/// "Some byte of `word` is zero", exact when no byte has its high bit set.
#[inline]
fn has_zero_byte(word: u64) -> bool {
    word.wrapping_sub(LOW) & !word & HIGH != 0
}

/// The outcome of [`ascii_scan`].
#[derive(Debug, PartialEq, Eq)]
enum AsciiScan {
    /// Every byte is ASCII and none is NUL: valid MQTT UTF-8.
    Clean,
    /// All bytes before the first non-ASCII byte were ASCII, and some byte so far is NUL.
    Null,
    /// A byte is 0x80 or above: full validation needed.
    NonAscii,
}

/// Checks eight bytes at a time whether `bytes` are ASCII without NUL.
#[inline]
fn ascii_scan(bytes: &[u8]) -> AsciiScan {
    let (words, tail) = words(bytes);
    for word in words {
        if word & HIGH != 0 {
            return AsciiScan::NonAscii;
        }
        if has_zero_byte(word) {
            return AsciiScan::Null;
        }
    }
    let mut null = false;
    for &byte in tail {
        if byte >= 0x80 {
            return AsciiScan::NonAscii;
        }
        null |= byte == 0;
    }
    if null {
        AsciiScan::Null
    } else {
        AsciiScan::Clean
    }
}

impl std::ops::Deref for Utf8 {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Utf8 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Utf8 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for Utf8 {
    type Error = Utf8Error;
    fn try_from(text: &str) -> Result<Utf8, Utf8Error> {
        Utf8::new(text)
    }
}

impl TryFrom<String> for Utf8 {
    type Error = Utf8Error;
    fn try_from(text: String) -> Result<Utf8, Utf8Error> {
        Utf8::from_bytes(Bytes::from(text.into_bytes()))
    }
}

impl PartialEq<str> for Utf8 {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Utf8 {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_and_reads_back() {
        let s = Utf8::from_bytes(Bytes::from_static("a/b/\u{00e9}/\u{1F600}".as_bytes())).unwrap();
        assert_eq!(s.as_str(), "a/b/\u{00e9}/\u{1F600}");
        assert_eq!(s.len(), 4 + 2 + 1 + 4);
    }

    #[test]
    fn rejects_ill_formed_and_null() {
        // A lone surrogate (U+D800) encoded as UTF-8 is ill-formed in MQTT and in Rust.
        assert_eq!(Utf8::from_bytes(Bytes::from_static(b"\xED\xA0\x80")), Err(Utf8Error::IllFormed));
        // Overlong encoding of '/'.
        assert_eq!(Utf8::from_bytes(Bytes::from_static(b"\xC0\xAF")), Err(Utf8Error::IllFormed));
        assert_eq!(Utf8::from_bytes(Bytes::from_static(b"a\0b")), Err(Utf8Error::NullCharacter));
        assert!(Utf8::new("a\u{0}").is_err());
    }

    #[test]
    fn ascii_scan_agrees_with_full_validation() {
        // Every position of a NUL and of a non-ASCII byte, in strings around the 8-byte word size.
        for len in 0..20 {
            let clean = vec![b'a'; len];
            assert_eq!(ascii_scan(&clean), AsciiScan::Clean);
            for at in 0..len {
                let mut with_null = clean.clone();
                with_null[at] = 0;
                assert_eq!(ascii_scan(&with_null), AsciiScan::Null, "len {len} at {at}");
                assert_eq!(Utf8::from_bytes(Bytes::from(with_null)), Err(Utf8Error::NullCharacter));
                let mut with_high = clean.clone();
                with_high[at] = 0xC3;
                assert_eq!(ascii_scan(&with_high), AsciiScan::NonAscii, "len {len} at {at}");
                // A lone lead byte is ill-formed; the slow path must say so.
                assert_eq!(Utf8::from_bytes(Bytes::from(with_high)), Err(Utf8Error::IllFormed));
            }
        }
    }

    #[test]
    fn topic_scan_agrees_with_the_two_step_check() {
        let alphabet: &[u8] = &[b'a', b'/', b'+', b'#', 0, 0xC3, 0xA9, 0xFF];
        // Every string of length 0..=3 over the alphabet, padded to cross word boundaries.
        let mut cases = vec![Vec::new()];
        for _ in 0..3 {
            let mut next = Vec::new();
            for case in &cases {
                for &byte in alphabet {
                    let mut longer: Vec<u8> = case.clone();
                    longer.push(byte);
                    next.push(longer);
                }
            }
            cases.extend(next.clone());
            cases = cases.into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        }
        for case in cases {
            for pad in [0usize, 5, 9] {
                let mut bytes = vec![b'x'; pad];
                bytes.extend_from_slice(&case);
                let expected = match Utf8::from_bytes(Bytes::from(bytes.clone())) {
                    Err(error) => Err(TopicBytesError::Utf8(error)),
                    Ok(text) if text.contains(['+', '#']) => Err(TopicBytesError::Wildcard),
                    Ok(text) => Ok(text),
                };
                assert_eq!(topic_name_from_bytes(Bytes::from(bytes.clone())), expected, "{bytes:?}");
            }
        }
    }

    #[test]
    fn shares_the_input_buffer() {
        let frame = Bytes::from_static(b"xxtopic");
        let s = Utf8::from_bytes(frame.slice(2..)).unwrap();
        assert_eq!(s.as_bytes().as_ptr(), frame[2..].as_ptr());
    }
}
