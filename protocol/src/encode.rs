//! Encoding: packets in, bytes out. (Stub: being written.)

use bytes::BytesMut;

use crate::error::EncodeError;
use crate::packet::{Packet, ProtocolVersion};

/// Appends the encoding of `packet` for `version` to `buf`.
pub fn encode(packet: &Packet, version: ProtocolVersion, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let _ = (packet, version, buf);
    unimplemented!()
}

/// The size in bytes `encode` would append, fixed header included.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let _ = (packet, version);
    unimplemented!()
}
