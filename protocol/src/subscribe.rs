//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK: decode and encode.
//!
//! Owns: the layout of these packets in every version and their one-packet rules: packet
//! identifier 0, at least one filter, no empty filter, the subscription options byte (reserved
//! bits, QoS 3, retain handling 3, no-local on a shared subscription), SUBACK/UNSUBACK reason codes
//! and 3.x return codes. Does not own: topic filter syntax (wildcard placement, `$share` group
//! names): the broker checks that per filter with `topic.rs` and answers SUBACK 0x8F / 0x80 for
//! that filter instead of closing the connection.
//!
//! Invariants:
//! - A decoded SUBSCRIBE or UNSUBSCRIBE has at least one filter, none empty.
//! - A 3.x UNSUBACK has no payload: it decodes with `reasons` empty, and encodes without them.

use bytes::{BufMut, BytesMut};

use crate::encode::Plan;
use crate::error::{DecodeError, EncodeError};
use crate::packet::{
    PacketType, Properties, ProtocolVersion, QoS, RetainHandling, SubAck, Subscribe, Subscription,
    SubscriptionOptions, UnsubAck, Unsubscribe,
};
use crate::properties::{self, Context};
use crate::publish::packet_id;
use crate::reason::ReasonCode;
use crate::reasons;
use crate::utf8::Utf8;
use crate::wire::{field_len, put_field, Reader};

const OPTION_NO_LOCAL: u8 = 0x04;
const OPTION_RETAIN_AS_PUBLISHED: u8 = 0x08;
/// Bits 6-7 in MQTT 5 (MQTT-3.8.3-5); bits 2-7 in 3.x (3.1.1 MQTT-3.8.3-4).
const OPTIONS_RESERVED_V5: u8 = 0xC0;
const OPTIONS_RESERVED_V3: u8 = 0xFC;

/// The 3.x SUBACK failure return code.
const V3_SUBACK_FAILURE: u8 = 0x80;

/// A topic filter: any well-formed string but the empty one (MQTT-4.7.3-1). Its syntax is left to
/// the broker, see the module comment.
fn filter(reader: &mut Reader) -> Result<Utf8, DecodeError> {
    let filter = reader.utf8()?;
    if filter.is_empty() {
        return Err(DecodeError::InvalidTopicFilter);
    }
    Ok(filter)
}

fn is_shared(filter: &Utf8) -> bool {
    filter.as_bytes().starts_with(b"$share/")
}

fn options(byte: u8, filter: &Utf8, version: ProtocolVersion) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = if version.is_v5() { OPTIONS_RESERVED_V5 } else { OPTIONS_RESERVED_V3 };
    if byte & reserved != 0 {
        return Err(DecodeError::SubscriptionOptionsReserved);
    }
    let qos = QoS::from_u8(byte & 0b11).ok_or(if version.is_v5() {
        DecodeError::InvalidSubscriptionQoS
    } else {
        DecodeError::InvalidQoS
    })?;
    let retain_handling = match (byte >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::InvalidRetainHandling),
    };
    let no_local = byte & OPTION_NO_LOCAL != 0;
    if no_local && is_shared(filter) {
        return Err(DecodeError::NoLocalOnSharedSubscription);
    }
    Ok(SubscriptionOptions {
        qos,
        no_local,
        retain_as_published: byte & OPTION_RETAIN_AS_PUBLISHED != 0,
        retain_handling,
    })
}

fn options_byte(options: &SubscriptionOptions, version: ProtocolVersion) -> u8 {
    let qos = options.qos as u8;
    if !version.is_v5() {
        return qos;
    }
    qos | if options.no_local { OPTION_NO_LOCAL } else { 0 }
        | if options.retain_as_published { OPTION_RETAIN_AS_PUBLISHED } else { 0 }
        | ((options.retain_handling as u8) << 4)
}

pub(crate) fn decode_subscribe(
    mut reader: Reader,
    version: ProtocolVersion,
) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(&mut reader)?;
    let properties = if version.is_v5() {
        properties::decode(&mut reader, Context::SUBSCRIBE)?
    } else {
        Properties::default()
    };
    let mut subscriptions = Vec::new();
    while !reader.is_empty() {
        let filter = filter(&mut reader)?;
        let options = options(reader.u8()?, &filter, version)?;
        subscriptions.push(Subscription { filter, options });
    }
    if subscriptions.is_empty() {
        return Err(DecodeError::NoTopicFilters);
    }
    Ok(Subscribe { packet_id, properties, subscriptions })
}

pub(crate) fn decode_suback(mut reader: Reader, version: ProtocolVersion) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(&mut reader)?;
    let v5 = version.is_v5();
    let properties = if v5 {
        properties::decode(&mut reader, Context::ack(PacketType::SubAck))?
    } else {
        Properties::default()
    };
    let codes = reader.into_rest();
    let mut reasons = Vec::with_capacity(codes.len());
    for &code in codes.iter() {
        let reason = if v5 {
            reasons::decode(PacketType::SubAck, code)?
        } else {
            match code {
                0 => ReasonCode::GrantedQoS0,
                1 => ReasonCode::GrantedQoS1,
                2 => ReasonCode::GrantedQoS2,
                V3_SUBACK_FAILURE => ReasonCode::UnspecifiedError,
                _ => return Err(DecodeError::InvalidReasonCode { packet_type: PacketType::SubAck, code }),
            }
        };
        reasons.push(reason);
    }
    Ok(SubAck { packet_id, properties, reasons })
}

pub(crate) fn decode_unsubscribe(
    mut reader: Reader,
    version: ProtocolVersion,
) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(&mut reader)?;
    let properties = if version.is_v5() {
        properties::decode(&mut reader, Context::UNSUBSCRIBE)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while !reader.is_empty() {
        filters.push(filter(&mut reader)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters);
    }
    Ok(Unsubscribe { packet_id, properties, filters })
}

pub(crate) fn decode_unsuback(mut reader: Reader, version: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
    if !version.is_v5() {
        if reader.remaining() != 2 {
            return Err(DecodeError::LengthMismatch);
        }
        let packet_id = packet_id(&mut reader)?;
        return Ok(UnsubAck { packet_id, properties: Properties::default(), reasons: Vec::new() });
    }
    let packet_id = packet_id(&mut reader)?;
    let properties = properties::decode(&mut reader, Context::ack(PacketType::UnsubAck))?;
    let codes = reader.into_rest();
    let mut reasons = Vec::with_capacity(codes.len());
    for &code in codes.iter() {
        reasons.push(reasons::decode(PacketType::UnsubAck, code)?);
    }
    Ok(UnsubAck { packet_id, properties, reasons })
}

/// Length of the packet identifier and, in MQTT 5, the property section.
fn head_len(
    packet_id: u16,
    props: &Properties,
    context: Context,
    version: ProtocolVersion,
) -> Result<(usize, usize), EncodeError> {
    if packet_id == 0 {
        return Err(EncodeError::NotRepresentable("packet identifier 0"));
    }
    if !version.is_v5() {
        return Ok((2, 0));
    }
    let props_len = properties::block_len(props, context)?;
    Ok((2 + properties::section_len(props_len), props_len))
}

fn put_head(buf: &mut BytesMut, packet_id: u16, props: &Properties, version: ProtocolVersion, plan: &Plan) {
    buf.put_u16(packet_id);
    if version.is_v5() {
        properties::put(buf, props, plan.props_len);
    }
}

pub(crate) fn plan_subscribe(subscribe: &Subscribe, version: ProtocolVersion) -> Result<Plan, EncodeError> {
    if subscribe.subscriptions.is_empty() {
        return Err(EncodeError::NotRepresentable("SUBSCRIBE without filters"));
    }
    let (mut remaining_len, props_len) =
        head_len(subscribe.packet_id, &subscribe.properties, Context::SUBSCRIBE, version)?;
    for subscription in &subscribe.subscriptions {
        if subscription.filter.is_empty() {
            return Err(EncodeError::NotRepresentable("empty topic filter"));
        }
        remaining_len += field_len(subscription.filter.len(), "topic filter")? + 1;
    }
    Ok(Plan { first_byte: 0x82, remaining_len, props_len, will_props_len: 0 })
}

pub(crate) fn put_subscribe(
    buf: &mut BytesMut,
    subscribe: &Subscribe,
    version: ProtocolVersion,
    plan: &Plan,
) {
    put_head(buf, subscribe.packet_id, &subscribe.properties, version, plan);
    for subscription in &subscribe.subscriptions {
        put_field(buf, subscription.filter.as_bytes());
        buf.put_u8(options_byte(&subscription.options, version));
    }
}

fn suback_code(reason: ReasonCode, version: ProtocolVersion) -> Result<u8, EncodeError> {
    if version.is_v5() {
        return reasons::encode(PacketType::SubAck, reason);
    }
    match reason {
        ReasonCode::GrantedQoS0 => Ok(0),
        ReasonCode::GrantedQoS1 => Ok(1),
        ReasonCode::GrantedQoS2 => Ok(2),
        error if error.is_error() => Ok(V3_SUBACK_FAILURE),
        _ => Err(EncodeError::NotRepresentable("SUBACK reason has no 3.x return code")),
    }
}

pub(crate) fn plan_suback(suback: &SubAck, version: ProtocolVersion) -> Result<Plan, EncodeError> {
    let (head, props_len) =
        head_len(suback.packet_id, &suback.properties, Context::ack(PacketType::SubAck), version)?;
    for &reason in &suback.reasons {
        suback_code(reason, version)?;
    }
    Ok(Plan { first_byte: 0x90, remaining_len: head + suback.reasons.len(), props_len, will_props_len: 0 })
}

pub(crate) fn put_suback(buf: &mut BytesMut, suback: &SubAck, version: ProtocolVersion, plan: &Plan) {
    put_head(buf, suback.packet_id, &suback.properties, version, plan);
    for &reason in &suback.reasons {
        // Checked by `plan_suback`.
        buf.put_u8(suback_code(reason, version).unwrap_or(V3_SUBACK_FAILURE));
    }
}

pub(crate) fn plan_unsubscribe(
    unsubscribe: &Unsubscribe,
    version: ProtocolVersion,
) -> Result<Plan, EncodeError> {
    if unsubscribe.filters.is_empty() {
        return Err(EncodeError::NotRepresentable("UNSUBSCRIBE without filters"));
    }
    let (mut remaining_len, props_len) =
        head_len(unsubscribe.packet_id, &unsubscribe.properties, Context::UNSUBSCRIBE, version)?;
    for filter in &unsubscribe.filters {
        if filter.is_empty() {
            return Err(EncodeError::NotRepresentable("empty topic filter"));
        }
        remaining_len += field_len(filter.len(), "topic filter")?;
    }
    Ok(Plan { first_byte: 0xA2, remaining_len, props_len, will_props_len: 0 })
}

pub(crate) fn put_unsubscribe(
    buf: &mut BytesMut,
    unsubscribe: &Unsubscribe,
    version: ProtocolVersion,
    plan: &Plan,
) {
    put_head(buf, unsubscribe.packet_id, &unsubscribe.properties, version, plan);
    for filter in &unsubscribe.filters {
        put_field(buf, filter.as_bytes());
    }
}

pub(crate) fn plan_unsuback(unsuback: &UnsubAck, version: ProtocolVersion) -> Result<Plan, EncodeError> {
    let (head, props_len) =
        head_len(unsuback.packet_id, &unsuback.properties, Context::ack(PacketType::UnsubAck), version)?;
    if !version.is_v5() {
        return Ok(Plan::bare(0xB0, head));
    }
    for &reason in &unsuback.reasons {
        reasons::encode(PacketType::UnsubAck, reason)?;
    }
    Ok(Plan { first_byte: 0xB0, remaining_len: head + unsuback.reasons.len(), props_len, will_props_len: 0 })
}

pub(crate) fn put_unsuback(buf: &mut BytesMut, unsuback: &UnsubAck, version: ProtocolVersion, plan: &Plan) {
    put_head(buf, unsuback.packet_id, &unsuback.properties, version, plan);
    if version.is_v5() {
        for &reason in &unsuback.reasons {
            buf.put_u8(reason.as_u8());
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::packet::Packet;
    use crate::test_util::{decode_bytes, encode_bytes};

    use super::*;

    const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
    const V5: ProtocolVersion = ProtocolVersion::V5;

    #[test]
    fn subscribe_v5_options_round_trip() {
        let bytes = [0x82, 10, 0, 1, 0, 0, 3, b'a', b'/', b'+', 0b0010_1110, /* unused */ 0][..11].to_vec();
        let mut bytes = bytes;
        bytes[1] = (bytes.len() - 2) as u8;
        let packet = decode_bytes(&bytes, V5).unwrap();
        let Packet::Subscribe(subscribe) = &packet else { panic!() };
        assert_eq!(subscribe.subscriptions.len(), 1);
        let options = subscribe.subscriptions[0].options;
        assert_eq!(options.qos, QoS::ExactlyOnce);
        assert!(options.no_local && options.retain_as_published);
        assert_eq!(options.retain_handling, RetainHandling::DoNotSend);
        assert_eq!(encode_bytes(&packet, V5), bytes);
    }

    #[test]
    fn subscribe_rules() {
        use DecodeError::*;
        assert_eq!(decode_bytes(&[0x82, 2, 0, 1], V3), Err(NoTopicFilters));
        assert_eq!(decode_bytes(&[0x82, 3, 0, 1, 0], V5), Err(NoTopicFilters));
        assert_eq!(decode_bytes(&[0x82, 5, 0, 0, 0, 1, b'a'], V3), Err(PacketIdZero));
        assert_eq!(decode_bytes(&[0x82, 5, 0, 1, 0, 0, 0], V3), Err(InvalidTopicFilter));
        assert_eq!(decode_bytes(&[0x82, 6, 0, 1, 0, 1, b'a', 3], V3), Err(InvalidQoS));
        assert_eq!(decode_bytes(&[0x82, 6, 0, 1, 0, 1, b'a', 4], V3), Err(SubscriptionOptionsReserved));
        assert_eq!(decode_bytes(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x40], V5), Err(SubscriptionOptionsReserved));
        assert_eq!(decode_bytes(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x30], V5), Err(InvalidRetainHandling));
        assert_eq!(decode_bytes(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x03], V5), Err(InvalidSubscriptionQoS));
        assert_eq!(decode_bytes(&[0x82, 5, 0, 1, 0, 1, b'a'], V3), Err(LengthMismatch));
        let mut shared = vec![0x82, 0, 0, 1, 0, 0, 9];
        shared.extend_from_slice(b"$share/g/");
        shared.push(0x04);
        shared[1] = (shared.len() - 2) as u8;
        assert_eq!(decode_bytes(&shared, V5), Err(NoLocalOnSharedSubscription));
        // Filter syntax is the broker's business.
        assert!(decode_bytes(&[0x82, 7, 0, 1, 0, 0, 1, b'#', 0], V5).is_ok());
        assert!(decode_bytes(&[0x82, 8, 0, 1, 0, 0, 2, b'a', b'#', 0], V5).is_ok());
    }

    #[test]
    fn suback_v3_return_codes() {
        let suback = SubAck {
            packet_id: 3,
            properties: Properties::default(),
            reasons: vec![ReasonCode::GrantedQoS0, ReasonCode::GrantedQoS2, ReasonCode::NotAuthorized],
        };
        assert_eq!(encode_bytes(&Packet::SubAck(suback), V3), [0x90, 5, 0, 3, 0, 2, 0x80]);
        let decoded = decode_bytes(&[0x90, 5, 0, 3, 0, 2, 0x80], V3).unwrap();
        let Packet::SubAck(decoded) = decoded else { panic!() };
        assert_eq!(
            decoded.reasons,
            [ReasonCode::GrantedQoS0, ReasonCode::GrantedQoS2, ReasonCode::UnspecifiedError]
        );
        assert_eq!(
            decode_bytes(&[0x90, 3, 0, 3, 3], V3),
            Err(DecodeError::InvalidReasonCode { packet_type: PacketType::SubAck, code: 3 })
        );
        assert_eq!(
            decode_bytes(&[0x90, 4, 0, 3, 0, 0x11], V5),
            Err(DecodeError::InvalidReasonCode { packet_type: PacketType::SubAck, code: 0x11 })
        );
    }

    #[test]
    fn unsubscribe_and_unsuback() {
        assert_eq!(decode_bytes(&[0xA2, 2, 0, 1], V3), Err(DecodeError::NoTopicFilters));
        assert_eq!(decode_bytes(&[0xA2, 4, 0, 1, 0, 0], V3), Err(DecodeError::InvalidTopicFilter));
        let unsubscribe = decode_bytes(&[0xA2, 6, 0, 1, 0, 0, 1, b'a'], V5).unwrap();
        assert_eq!(encode_bytes(&unsubscribe, V5), [0xA2, 6, 0, 1, 0, 0, 1, b'a']);
        let v3 = decode_bytes(&[0xB0, 2, 0, 1], V3).unwrap();
        assert_eq!(
            v3,
            Packet::UnsubAck(UnsubAck { packet_id: 1, properties: Properties::default(), reasons: vec![] })
        );
        assert_eq!(decode_bytes(&[0xB0, 3, 0, 1, 0], V3), Err(DecodeError::LengthMismatch));
        let v5 = decode_bytes(&[0xB0, 5, 0, 1, 0, 0x00, 0x11], V5).unwrap();
        assert_eq!(encode_bytes(&v5, V5), [0xB0, 5, 0, 1, 0, 0x00, 0x11]);
        // The 3.x encoding drops the reasons.
        assert_eq!(encode_bytes(&v5, V3), [0xB0, 2, 0, 1]);
    }
}
