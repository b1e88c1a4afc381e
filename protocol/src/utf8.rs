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
        let text = std::str::from_utf8(&bytes).map_err(|_| Utf8Error::IllFormed)?;
        // The all-ASCII fast path of `memchr`-style search is what std's `contains` does for a char.
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
    fn shares_the_input_buffer() {
        let frame = Bytes::from_static(b"xxtopic");
        let s = Utf8::from_bytes(frame.slice(2..)).unwrap();
        assert_eq!(s.as_bytes().as_ptr(), frame[2..].as_ptr());
    }
}
