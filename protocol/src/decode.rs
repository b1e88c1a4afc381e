//! Decoding: bytes in, packets out. (Stub: being written.)

use bytes::BytesMut;

use crate::error::DecodeError;
use crate::packet::{Packet, ProtocolVersion};

/// Decodes one packet from the front of `buf`.
///
/// - `Ok(None)`: the frame is incomplete; nothing was consumed.
/// - `Ok(Some(p))`: one frame was split off the front of `buf`; `p` borrows it without copying.
/// - `Err(e)`: the bytes can never form a valid packet; the connection must be closed.
///
/// `version` is the version of the connection. A CONNECT is decoded by its own protocol level
/// whatever `version` says, so before CONNECT pass any value. `max_packet_size_bytes` bounds the
/// whole packet (fixed header included); a larger frame is refused as soon as its header is read.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size_bytes: u32,
) -> Result<Option<Packet>, DecodeError> {
    let _ = (buf, version, max_packet_size_bytes);
    unimplemented!()
}

/// The length of the whole frame at the front of `buf` (fixed header included), once its fixed
/// header is complete; `Ok(None)` when more bytes are needed to know.
pub fn frame_len(buf: &[u8], max_packet_size_bytes: u32) -> Result<Option<usize>, DecodeError> {
    let _ = (buf, max_packet_size_bytes);
    unimplemented!()
}
