//! PUBLISH and its responses (PUBACK, PUBREC, PUBREL, PUBCOMP): decode and encode.
//!
//! Owns: the layout of these packets in every version, and their one-packet rules: packet
//! identifier 0, wildcards or emptiness in the topic name, reason codes, the exact remaining
//! length of 3.x responses and the short forms of MQTT 5 responses. Does not own: the fixed-header
//! flag checks (`decode.rs`, before the body arrives), topic alias mapping or packet id state (the
//! broker).
//!
//! Invariants:
//! - This is the hot path. A decoded PUBLISH's topic and payload are slices of the frame; a
//!   PUBLISH without properties allocates nothing; encoding computes the length once and writes
//!   with `put_*` only.

use bytes::{BufMut, Bytes, BytesMut};

use crate::encode::Plan;
use crate::error::{DecodeError, EncodeError};
use crate::packet::{Packet, PacketId, PacketType, Properties, ProtocolVersion, PubResp, Publish, QoS};
use crate::properties::{self, Context};
use crate::reason::ReasonCode;
use crate::reasons;
use crate::utf8::{topic_name_from_bytes, TopicBytesError, Utf8, Utf8Error};
use crate::wire::{field_len, put_field, Reader};

/// A packet identifier that must not be 0 (MQTT-2.2.1-3).
#[inline]
pub(crate) fn packet_id(reader: &mut Reader) -> Result<PacketId, DecodeError> {
    match reader.u16()? {
        0 => Err(DecodeError::PacketIdZero),
        id => Ok(id),
    }
}

/// Decodes the body of a PUBLISH into the packet. `flags` are the low four bits of the fixed
/// header, already checked (QoS is not 3, no DUP on QoS 0).
///
/// Returns the decoder's final type so that `decode` can tail-call it: the packet (472 bytes,
/// mostly properties) is then built once in the caller's return slot instead of being moved
/// through several `Result`s, which measured as most of the cost of a small PUBLISH.
#[inline]
pub(crate) fn decode_publish(
    flags: u8,
    mut reader: Reader,
    version: ProtocolVersion,
) -> Result<Option<Packet>, DecodeError> {
    let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQoS)?;
    let topic = reader.binary()?;
    let packet_id = match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce | QoS::ExactlyOnce => Some(packet_id(&mut reader)?),
    };
    let props_len = if version.is_v5() { reader.varint()? } else { 0 };
    let dup = flags & 0b1000 != 0;
    let retain = flags & 0b0001 != 0;
    if props_len == 0 {
        // The common case: the properties are built in place, never moved.
        let topic = topic_name(topic, false)?;
        return Ok(Some(Packet::Publish(Publish {
            dup,
            qos,
            retain,
            topic,
            packet_id,
            properties: Properties::default(),
            payload: reader.into_rest(),
        })));
    }
    // A varint is at most 268,435,455, which fits usize on every supported target.
    let block = reader.take(props_len as usize)?;
    let mut properties = Properties::default();
    properties::decode_block(block, Context::PUBLISH, &mut properties)?;
    let topic = topic_name(topic, properties.topic_alias.is_some())?;
    Ok(Some(Packet::Publish(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload: reader.into_rest(),
    })))
}

/// Checks a PUBLISH topic name. An empty one is only allowed when a topic alias stands for it (MQTT
/// 5 3.3.2.3.4; 3.x MQTT-4.7.3-1); wildcards never (MQTT-3.3.2-2).
#[inline]
fn topic_name(topic: Bytes, has_alias: bool) -> Result<Utf8, DecodeError> {
    if topic.is_empty() && !has_alias {
        return Err(DecodeError::EmptyTopicName);
    }
    topic_name_from_bytes(topic).map_err(|error| match error {
        TopicBytesError::Wildcard => DecodeError::WildcardInTopicName,
        TopicBytesError::Utf8(Utf8Error::IllFormed) => DecodeError::InvalidUtf8,
        TopicBytesError::Utf8(Utf8Error::NullCharacter) => DecodeError::NullCharacter,
    })
}

/// Decodes PUBACK, PUBREC, PUBREL or PUBCOMP.
pub(crate) fn decode_pub_resp(
    packet_type: PacketType,
    mut reader: Reader,
    version: ProtocolVersion,
) -> Result<PubResp, DecodeError> {
    if !version.is_v5() && reader.remaining() != 2 {
        return Err(DecodeError::LengthMismatch);
    }
    let packet_id = packet_id(&mut reader)?;
    // MQTT 5 short forms: remaining length 2 means Success without properties, 3 a reason code
    // without properties (MQTT 5 3.4.2.1, 3.4.2.2.1).
    if reader.is_empty() {
        return Ok(PubResp::new(packet_id));
    }
    let reason = reasons::decode(packet_type, reader.u8()?)?;
    let properties = if reader.is_empty() {
        Properties::default()
    } else {
        properties::decode(&mut reader, Context::ack(packet_type))?
    };
    reader.finish()?;
    Ok(PubResp { packet_id, reason, properties })
}

#[inline]
pub(crate) fn plan_publish(publish: &Publish, version: ProtocolVersion) -> Result<Plan, EncodeError> {
    let qos_bits = publish.qos as u8;
    if publish.dup && publish.qos == QoS::AtMostOnce {
        return Err(EncodeError::NotRepresentable("DUP on a QoS 0 PUBLISH"));
    }
    let v5 = version.is_v5();
    if publish.topic.is_empty() && !(v5 && publish.properties.topic_alias.is_some()) {
        return Err(EncodeError::NotRepresentable("empty topic without a topic alias"));
    }
    let mut remaining_len = field_len(publish.topic.len(), "topic")?;
    if publish.qos != QoS::AtMostOnce {
        match publish.packet_id {
            Some(0) | None => {
                return Err(EncodeError::NotRepresentable("QoS > 0 PUBLISH without a packet id"))
            }
            Some(_) => remaining_len += 2,
        }
    }
    let props_len = if v5 {
        let len = properties::block_len(&publish.properties, Context::PUBLISH)?;
        remaining_len += properties::section_len(len);
        len
    } else {
        0
    };
    remaining_len += publish.payload.len();
    let first_byte = 0x30 | (u8::from(publish.dup) << 3) | (qos_bits << 1) | u8::from(publish.retain);
    Ok(Plan { first_byte, remaining_len, props_len, will_props_len: 0 })
}

#[inline]
pub(crate) fn put_publish(buf: &mut BytesMut, publish: &Publish, version: ProtocolVersion, plan: &Plan) {
    put_field(buf, publish.topic.as_bytes());
    if publish.qos != QoS::AtMostOnce {
        buf.put_u16(publish.packet_id.unwrap_or(0));
    }
    if version.is_v5() {
        properties::put(buf, &publish.properties, plan.props_len);
    }
    buf.put_slice(&publish.payload);
}

fn resp_first_byte(packet_type: PacketType) -> u8 {
    match packet_type {
        PacketType::PubRel => 0x62,
        other => (other as u8) << 4,
    }
}

pub(crate) fn plan_pub_resp(
    packet_type: PacketType,
    resp: &PubResp,
    version: ProtocolVersion,
) -> Result<Plan, EncodeError> {
    if resp.packet_id == 0 {
        return Err(EncodeError::NotRepresentable("packet identifier 0"));
    }
    let first_byte = resp_first_byte(packet_type);
    if !version.is_v5() {
        return Ok(Plan::bare(first_byte, 2));
    }
    reasons::encode(packet_type, resp.reason)?;
    let props_len = properties::block_len(&resp.properties, Context::ack(packet_type))?;
    let remaining_len = match (resp.reason, props_len) {
        (ReasonCode::Success, 0) => 2,
        (_, 0) => 3,
        (_, len) => 3 + properties::section_len(len),
    };
    Ok(Plan { first_byte, remaining_len, props_len, will_props_len: 0 })
}

pub(crate) fn put_pub_resp(buf: &mut BytesMut, resp: &PubResp, version: ProtocolVersion, plan: &Plan) {
    buf.put_u16(resp.packet_id);
    if version.is_v5() && plan.remaining_len > 2 {
        buf.put_u8(resp.reason.as_u8());
        if plan.props_len > 0 {
            properties::put(buf, &resp.properties, plan.props_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::{decode_bytes, encode_bytes};
    use crate::{decode, encoded_len};

    use super::*;

    const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
    const V5: ProtocolVersion = ProtocolVersion::V5;

    #[test]
    fn qos0_publish_shares_the_frame() {
        let mut buf = BytesMut::from(&[0x31, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'][..]);
        let base = buf.as_ptr() as usize;
        let Some(Packet::Publish(publish)) = decode(&mut buf, V3, 1024).unwrap() else { panic!() };
        assert!(publish.retain && !publish.dup && publish.qos == QoS::AtMostOnce);
        assert_eq!(publish.topic, "a/b");
        assert_eq!(&publish.payload[..], b"hi");
        assert_eq!(publish.topic.as_bytes().as_ptr() as usize, base + 4);
        assert_eq!(publish.payload.as_ptr() as usize, base + 7);
    }

    #[test]
    fn v5_publish_round_trips_with_properties() {
        let publish = Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: Utf8::from_static(""),
            packet_id: Some(7),
            properties: Properties {
                topic_alias: Some(2),
                subscription_identifiers: vec![5, 300],
                ..Properties::default()
            },
            payload: Bytes::from_static(b"payload"),
        });
        let bytes = encode_bytes(&publish, V5);
        assert_eq!(decode_bytes(&bytes, V5), Ok(publish));
    }

    #[test]
    fn publish_rules() {
        use DecodeError::*;
        // Empty topic: always in 3.x, without a topic alias in 5.0.
        assert_eq!(decode_bytes(&[0x30, 0x02, 0, 0], V3), Err(EmptyTopicName));
        assert_eq!(decode_bytes(&[0x30, 0x03, 0, 0, 0], V5), Err(EmptyTopicName));
        assert!(decode_bytes(&[0x30, 0x06, 0, 0, 3, 0x23, 0, 1], V5).is_ok());
        assert_eq!(decode_bytes(&[0x30, 0x06, 0, 0, 3, 0x23, 0, 0], V5), Err(TopicAliasZero));
        assert_eq!(decode_bytes(&[0x30, 0x03, 0, 1, b'+'], V3), Err(WildcardInTopicName));
        assert_eq!(decode_bytes(&[0x30, 0x05, 0, 3, b'a', b'/', b'#'], V3), Err(WildcardInTopicName));
        assert_eq!(decode_bytes(&[0x30, 0x03, 0, 1, 0], V3), Err(NullCharacter));
        assert_eq!(decode_bytes(&[0x30, 0x04, 0, 2, 0xC0, 0xAF], V3), Err(InvalidUtf8));
        assert_eq!(decode_bytes(&[0x32, 0x05, 0, 1, b'a', 0, 0], V3), Err(PacketIdZero));
        assert_eq!(decode_bytes(&[0x32, 0x04, 0, 1, b'a', 0], V3), Err(LengthMismatch));
        assert_eq!(decode_bytes(&[0x30, 0x03, 0, 2, b'a'], V3), Err(LengthMismatch));
        // A v5 PUBLISH must carry a property length.
        assert_eq!(decode_bytes(&[0x30, 0x03, 0, 1, b'a'], V5), Err(LengthMismatch));
    }

    #[test]
    fn pub_resp_forms() {
        let v5_short = decode_bytes(&[0x40, 0x02, 0, 9], V5).unwrap();
        assert_eq!(v5_short, Packet::PubAck(PubResp::new(9)));
        assert_eq!(encode_bytes(&v5_short, V5), [0x40, 0x02, 0, 9]);
        let with_reason = decode_bytes(&[0x50, 0x03, 0, 9, 0x10], V5).unwrap();
        let expected = PubResp { packet_id: 9, reason: ReasonCode::NoMatchingSubscribers, ..PubResp::new(9) };
        assert_eq!(with_reason, Packet::PubRec(expected.clone()));
        assert_eq!(encode_bytes(&with_reason, V5), [0x50, 0x03, 0, 9, 0x10]);
        assert_eq!(decode_bytes(&[0x50, 0x04, 0, 9, 0x10, 0], V5), Ok(Packet::PubRec(expected)));
        assert_eq!(decode_bytes(&[0x62, 0x02, 0, 1], V3), Ok(Packet::PubRel(PubResp::new(1))));
        assert_eq!(encode_bytes(&Packet::PubRel(PubResp::new(1)), V3), [0x62, 0x02, 0, 1]);
        assert_eq!(decode_bytes(&[0x70, 0x03, 0, 1, 0], V3), Err(DecodeError::LengthMismatch));
        assert_eq!(decode_bytes(&[0x70, 0x02, 0, 0], V5), Err(DecodeError::PacketIdZero));
        assert_eq!(
            decode_bytes(&[0x70, 0x03, 0, 1, 0x10], V5),
            Err(DecodeError::InvalidReasonCode { packet_type: PacketType::PubComp, code: 0x10 })
        );
        assert_eq!(decode_bytes(&[0x40, 0x05, 0, 1, 0, 0, 0], V5), Err(DecodeError::LengthMismatch));
        assert_eq!(decode_bytes(&[0x40, 0x01, 0], V5), Err(DecodeError::LengthMismatch));
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would() {
        let mut publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Utf8::from_static("t"),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::new(),
        };
        assert!(encoded_len(&Packet::Publish(publish.clone()), V3).is_err());
        publish.qos = QoS::AtMostOnce;
        publish.dup = true;
        assert!(encoded_len(&Packet::Publish(publish.clone()), V3).is_err());
        publish.dup = false;
        publish.topic = Utf8::from_static("");
        assert!(encoded_len(&Packet::Publish(publish.clone()), V5).is_err());
        publish.topic = Utf8::new(&"t".repeat(65_536)).unwrap();
        assert_eq!(encoded_len(&Packet::Publish(publish), V3), Err(EncodeError::FieldTooLong("topic")));
        assert!(encoded_len(&Packet::PubAck(PubResp::new(0)), V3).is_err());
    }
}
