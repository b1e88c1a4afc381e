//! Helpers shared by the codec's unit tests (compiled only for tests).

use bytes::BytesMut;

use crate::error::DecodeError;
use crate::packet::{Packet, ProtocolVersion};
use crate::{decode, encode, encoded_len};

/// Decodes exactly one complete frame, asserting that nothing is left over.
pub(crate) fn decode_bytes(bytes: &[u8], version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, version, u32::MAX)?.expect("complete frame");
    assert!(buf.is_empty());
    Ok(packet)
}

/// Encodes a packet, asserting that `encoded_len` predicted the bytes written.
pub(crate) fn encode_bytes(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).unwrap();
    assert_eq!(encoded_len(packet, version), Ok(buf.len()));
    buf.to_vec()
}
