//! Decoding: bytes in, packets out.
//!
//! Owns: framing (the fixed header, the maximum packet size, "need more bytes"), the fixed-header
//! flag rules of every packet type, and the dispatch to each packet family's decoder. Does not own:
//! the layout of each packet (the family files) or checks that need connection state (the broker).
//!
//! Invariants:
//! - `Ok(None)` consumes nothing; an error may leave `buf` as it was or not (the connection closes).
//! - A frame larger than the maximum is refused as soon as its fixed header is complete, before
//!   its body arrives, so a peer cannot make us buffer it.
//! - A complete frame is split off the front of `buf` once (`split_to(..).freeze()`), and every
//!   field of the packet is a slice of it: no copy, and no allocation for a PUBLISH without
//!   properties.

use bytes::{Buf, BytesMut};

use crate::connect;
use crate::control;
use crate::error::DecodeError;
use crate::packet::{Packet, PacketType, ProtocolVersion};
use crate::publish;
use crate::subscribe;
use crate::wire::{fixed_header, Reader};

/// Decodes one packet from the front of `buf`.
///
/// - `Ok(None)`: the frame is incomplete; nothing was consumed.
/// - `Ok(Some(p))`: one frame was split off the front of `buf`; `p` borrows it without copying.
/// - `Err(e)`: the bytes can never form a valid packet; the connection must be closed.
///
/// `version` is the version of the connection. A CONNECT is decoded by its own protocol level
/// whatever `version` says, so before CONNECT pass any value. `max_packet_size_bytes` bounds the
/// whole packet (fixed header included); a larger frame is refused as soon as its header is read.
#[inline]
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size_bytes: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some((header_len, frame_len)) = frame_header(buf, max_packet_size_bytes)? else { return Ok(None) };
    let Some(&first_byte) = buf.first() else { return Ok(None) };
    // The header rules are checked before waiting for the body: bad flags fail at once.
    let packet_type = check_first_byte(first_byte, version)?;
    if buf.len() < frame_len {
        return Ok(None);
    }
    let mut frame = buf.split_to(frame_len).freeze();
    frame.advance(header_len);
    let reader = Reader::new(frame);
    // PUBLISH is the hot path: a tail call that builds the packet in place (see `decode_publish`).
    if packet_type == PacketType::Publish {
        return publish::decode_publish(first_byte & 0x0F, reader, version);
    }
    decode_body(packet_type, reader, version).map(Some)
}

/// The fixed-header length and the whole frame length, once the fixed header is complete, after
/// checking the frame against the maximum packet size.
#[inline]
fn frame_header(buf: &[u8], max_packet_size_bytes: u32) -> Result<Option<(usize, usize)>, DecodeError> {
    let Some((header_len, remaining_len)) = fixed_header(buf)? else { return Ok(None) };
    let size_bytes = header_len + remaining_len;
    if size_bytes > max_packet_size_bytes as usize {
        return Err(DecodeError::PacketTooLarge { size_bytes, max_bytes: max_packet_size_bytes });
    }
    Ok(Some((header_len, size_bytes)))
}

/// The length of the whole frame at the front of `buf` (fixed header included), once its fixed
/// header is complete; `Ok(None)` when more bytes are needed to know.
#[inline]
pub fn frame_len(buf: &[u8], max_packet_size_bytes: u32) -> Result<Option<usize>, DecodeError> {
    Ok(frame_header(buf, max_packet_size_bytes)?.map(|(_, frame_len)| frame_len))
}

/// The packet type, after checking the fixed-header flags the specification fixes for it
/// (MQTT 5 section 2.1.3, MQTT 3.1.1 section 2.2.2).
#[inline]
fn check_first_byte(first_byte: u8, version: ProtocolVersion) -> Result<PacketType, DecodeError> {
    let type_bits = first_byte >> 4;
    let flags = first_byte & 0x0F;
    let packet_type = PacketType::from_u8(type_bits).ok_or(DecodeError::InvalidPacketType(type_bits))?;
    let expected_flags = match packet_type {
        PacketType::Publish => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(DecodeError::InvalidQoS);
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(DecodeError::DupOnQoS0);
            }
            return Ok(packet_type);
        }
        PacketType::Auth if !version.is_v5() => return Err(DecodeError::InvalidPacketType(type_bits)),
        PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
        _ => 0,
    };
    if flags != expected_flags {
        return Err(DecodeError::InvalidHeaderFlags { packet_type, flags });
    }
    Ok(packet_type)
}

/// Every packet but PUBLISH.
fn decode_body(
    packet_type: PacketType,
    reader: Reader,
    version: ProtocolVersion,
) -> Result<Packet, DecodeError> {
    Ok(match packet_type {
        PacketType::Publish => {
            // Handled by `decode` before calling here.
            return Err(DecodeError::InvalidPacketType(PacketType::Publish as u8));
        }
        PacketType::PubAck => Packet::PubAck(publish::decode_pub_resp(packet_type, reader, version)?),
        PacketType::PubRec => Packet::PubRec(publish::decode_pub_resp(packet_type, reader, version)?),
        PacketType::PubRel => Packet::PubRel(publish::decode_pub_resp(packet_type, reader, version)?),
        PacketType::PubComp => Packet::PubComp(publish::decode_pub_resp(packet_type, reader, version)?),
        PacketType::Connect => Packet::Connect(Box::new(connect::decode_connect(reader)?)),
        PacketType::ConnAck => Packet::ConnAck(connect::decode_connack(reader, version)?),
        PacketType::Subscribe => Packet::Subscribe(subscribe::decode_subscribe(reader, version)?),
        PacketType::SubAck => Packet::SubAck(subscribe::decode_suback(reader, version)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(subscribe::decode_unsubscribe(reader, version)?),
        PacketType::UnsubAck => Packet::UnsubAck(subscribe::decode_unsuback(reader, version)?),
        PacketType::PingReq => {
            reader.finish()?;
            Packet::PingReq
        }
        PacketType::PingResp => {
            reader.finish()?;
            Packet::PingResp
        }
        PacketType::Disconnect => Packet::Disconnect(control::decode_disconnect(reader, version)?),
        PacketType::Auth => Packet::Auth(control::decode_auth(reader)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 1 << 20;

    fn decode_all(bytes: &[u8], version: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        let result = decode(&mut buf, version, MAX);
        if let Ok(Some(_)) = result {
            assert!(buf.is_empty(), "trailing bytes left in the buffer");
        }
        result
    }

    #[test]
    fn incomplete_consumes_nothing() {
        let frame = [0x30, 0x05, 0x00, 0x01, b't', b'h', b'i'];
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert_eq!(decode(&mut buf, ProtocolVersion::V3_1_1, MAX), Ok(None));
            assert_eq!(buf.len(), cut);
        }
        assert!(decode_all(&frame, ProtocolVersion::V3_1_1).unwrap().is_some());
    }

    #[test]
    fn too_large_is_refused_before_the_body() {
        // 0x30, remaining length 200 (0xC8 0x01): 203 bytes in all; only the header is here.
        let mut buf = BytesMut::from(&[0x30, 0xC8, 0x01][..]);
        assert_eq!(
            decode(&mut buf, ProtocolVersion::V5, 202),
            Err(DecodeError::PacketTooLarge { size_bytes: 203, max_bytes: 202 })
        );
        assert_eq!(frame_len(&buf, 203), Ok(Some(203)));
        assert_eq!(decode(&mut buf, ProtocolVersion::V5, 203), Ok(None));
    }

    #[test]
    fn malformed_remaining_length_is_seen_early() {
        assert_eq!(
            decode_all(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], ProtocolVersion::V5),
            Err(DecodeError::MalformedRemainingLength)
        );
    }

    #[test]
    fn header_flag_rules() {
        use DecodeError::*;
        let v4 = ProtocolVersion::V3_1_1;
        assert_eq!(decode_all(&[0x00, 0x00], v4), Err(InvalidPacketType(0)));
        assert_eq!(decode_all(&[0xF0, 0x00], v4), Err(InvalidPacketType(15)));
        assert_eq!(decode_all(&[0x36, 0x00], v4), Err(InvalidQoS));
        assert_eq!(decode_all(&[0x38, 0x00], v4), Err(DupOnQoS0));
        assert_eq!(
            decode_all(&[0x60, 0x02, 0, 1], v4),
            Err(InvalidHeaderFlags { packet_type: PacketType::PubRel, flags: 0 })
        );
        assert_eq!(
            decode_all(&[0x80, 0x00], v4),
            Err(InvalidHeaderFlags { packet_type: PacketType::Subscribe, flags: 0 })
        );
        assert_eq!(
            decode_all(&[0xC1, 0x00], v4),
            Err(InvalidHeaderFlags { packet_type: PacketType::PingReq, flags: 1 })
        );
        assert_eq!(
            decode_all(&[0x42, 0x02, 0, 1], v4),
            Err(InvalidHeaderFlags { packet_type: PacketType::PubAck, flags: 2 })
        );
        assert_eq!(
            decode_all(&[0xF0, 0x00], ProtocolVersion::V5).unwrap(),
            Some(Packet::Auth(auth_success()))
        );
    }

    fn auth_success() -> crate::packet::Auth {
        crate::packet::Auth { reason: crate::ReasonCode::Success, properties: Default::default() }
    }

    #[test]
    fn pings_must_be_empty() {
        assert_eq!(decode_all(&[0xC0, 0x00], ProtocolVersion::V3_1), Ok(Some(Packet::PingReq)));
        assert_eq!(decode_all(&[0xD0, 0x00], ProtocolVersion::V5), Ok(Some(Packet::PingResp)));
        assert_eq!(decode_all(&[0xC0, 0x01, 0x00], ProtocolVersion::V5), Err(DecodeError::LengthMismatch));
    }

    #[test]
    fn decodes_back_to_back_frames() {
        let mut buf = BytesMut::from(&[0xC0, 0x00, 0xD0, 0x00, 0xC0][..]);
        assert_eq!(decode(&mut buf, ProtocolVersion::V5, MAX), Ok(Some(Packet::PingReq)));
        assert_eq!(decode(&mut buf, ProtocolVersion::V5, MAX), Ok(Some(Packet::PingResp)));
        assert_eq!(decode(&mut buf, ProtocolVersion::V5, MAX), Ok(None));
        assert_eq!(&buf[..], &[0xC0]);
    }
}
