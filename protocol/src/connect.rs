//! CONNECT and CONNACK: decode and encode.
//!
//! Owns: the layout of these packets in MQTT 3.1 (`MQIsdp`, level 3), 3.1.1 (`MQTT`, 4) and 5.0
//! (`MQTT`, 5), and their one-packet rules: protocol name and level, the CONNECT flags (reserved
//! bit, will flags without a will, will QoS 3, password without user name in 3.x), the will topic,
//! the CONNACK acknowledge flags and return/reason codes. Does not own: client identifier policy
//! (length, characters, empty ids: the broker's), authentication, or keep-alive.
//!
//! Invariants:
//! - A CONNECT is decoded by its own protocol level and encoded by its own `protocol` field,
//!   whatever version the connection is assumed to have.
//! - A 3.1 CONNACK has no session-present flag: the encoder writes 0 and the decoder ignores the
//!   (reserved, unused) byte.

use bytes::{BufMut, BytesMut};

use crate::encode::Plan;
use crate::error::{DecodeError, EncodeError};
use crate::packet::{ConnAck, Connect, PacketType, Properties, ProtocolVersion, QoS, Will};
use crate::properties::{self, Context};
use crate::reason::ReasonCode;
use crate::reasons;
use crate::wire::{field_len, has_wildcard, put_field, utf8, Reader};

const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN_START: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;

/// Reads the protocol name and level into a version.
fn protocol(reader: &mut Reader) -> Result<ProtocolVersion, DecodeError> {
    let name = reader.binary()?;
    let level = reader.u8()?;
    let is_mqtt = match &name[..] {
        b"MQTT" => true,
        b"MQIsdp" => false,
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    match (is_mqtt, level) {
        (false, 3) => Ok(ProtocolVersion::V3_1),
        (true, 4) => Ok(ProtocolVersion::V3_1_1),
        (true, 5) => Ok(ProtocolVersion::V5),
        // A known level under the other version's name.
        (_, 3..=5) => Err(DecodeError::InvalidProtocolName),
        (_, level) => Err(DecodeError::UnsupportedProtocolLevel(level)),
    }
}

/// Decodes the body of a CONNECT, by its own protocol level.
pub(crate) fn decode_connect(mut reader: Reader) -> Result<Connect, DecodeError> {
    let protocol = protocol(&mut reader)?;
    let v5 = protocol.is_v5();
    let flags = reader.u8()?;
    if flags & FLAG_RESERVED != 0 {
        return Err(DecodeError::ConnectReservedFlag);
    }
    let has_will = flags & FLAG_WILL != 0;
    let will_qos_bits = (flags >> 3) & 0b11;
    let will_retain = flags & FLAG_WILL_RETAIN != 0;
    if !has_will && (will_qos_bits != 0 || will_retain) {
        return Err(DecodeError::WillFlagsWithoutWill);
    }
    let will_qos = QoS::from_u8(will_qos_bits).ok_or(DecodeError::InvalidQoS)?;
    let has_username = flags & FLAG_USERNAME != 0;
    let has_password = flags & FLAG_PASSWORD != 0;
    // MQTT 5 allows a password without a user name (3.1.2.9); 3.x does not (MQTT-3.1.2-22).
    if !v5 && has_password && !has_username {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = reader.u16()?;
    let properties =
        if v5 { properties::decode(&mut reader, Context::CONNECT)? } else { Properties::default() };
    let client_id = reader.utf8()?;
    let will = if has_will {
        let properties =
            if v5 { properties::decode(&mut reader, Context::WILL)? } else { Properties::default() };
        let topic = utf8(reader.binary()?)?;
        // The will topic is a topic name: not empty, no wildcards (MQTT-4.7.3-1, MQTT-3.3.2-2).
        if topic.is_empty() {
            return Err(DecodeError::EmptyTopicName);
        }
        if has_wildcard(topic.as_bytes()) {
            return Err(DecodeError::WildcardInTopicName);
        }
        let payload = reader.binary()?;
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if has_username { Some(reader.utf8()?) } else { None };
    let password = if has_password { Some(reader.binary()?) } else { None };
    reader.finish()?;
    Ok(Connect {
        protocol,
        clean_start: flags & FLAG_CLEAN_START != 0,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

/// Decodes the body of a CONNACK for the connection's `version`.
pub(crate) fn decode_connack(mut reader: Reader, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    if !version.is_v5() && reader.remaining() != 2 {
        return Err(DecodeError::LengthMismatch);
    }
    let flags = reader.u8()?;
    let code = reader.u8()?;
    let reason = if version.is_v5() {
        reasons::decode(PacketType::ConnAck, code)?
    } else {
        ReasonCode::from_v3_connack(code)
            .ok_or(DecodeError::InvalidReasonCode { packet_type: PacketType::ConnAck, code })?
    };
    let session_present = match version {
        // In 3.1 the byte is reserved and unused.
        ProtocolVersion::V3_1 => false,
        ProtocolVersion::V3_1_1 | ProtocolVersion::V5 => {
            // Bits 7-1 are reserved (MQTT-3.2.2-1); a refusal never has a session (MQTT-3.2.2-6).
            if flags & 0xFE != 0 || (flags & 0x01 != 0 && reason != ReasonCode::Success) {
                return Err(DecodeError::InvalidConnAckFlags(flags));
            }
            flags & 0x01 != 0
        }
    };
    let properties = if version.is_v5() {
        properties::decode(&mut reader, Context::CONNACK)?
    } else {
        Properties::default()
    };
    reader.finish()?;
    Ok(ConnAck { session_present, reason, properties })
}

pub(crate) fn plan_connect(connect: &Connect) -> Result<Plan, EncodeError> {
    let protocol = connect.protocol;
    let v5 = protocol.is_v5();
    if !v5 && connect.password.is_some() && connect.username.is_none() {
        return Err(EncodeError::NotRepresentable("3.x password without a user name"));
    }
    // Protocol name, level, flags, keep alive.
    let mut remaining_len = 2 + protocol.protocol_name().len() + 1 + 1 + 2;
    let mut props_len = 0;
    let mut will_props_len = 0;
    if v5 {
        props_len = properties::block_len(&connect.properties, Context::CONNECT)?;
        remaining_len += properties::section_len(props_len);
    }
    remaining_len += field_len(connect.client_id.len(), "client identifier")?;
    if let Some(will) = &connect.will {
        if v5 {
            will_props_len = properties::block_len(&will.properties, Context::WILL)?;
            remaining_len += properties::section_len(will_props_len);
        }
        if will.topic.is_empty() {
            return Err(EncodeError::NotRepresentable("empty will topic"));
        }
        remaining_len += field_len(will.topic.len(), "will topic")?;
        remaining_len += field_len(will.payload.len(), "will payload")?;
    }
    if let Some(username) = &connect.username {
        remaining_len += field_len(username.len(), "user name")?;
    }
    if let Some(password) = &connect.password {
        remaining_len += field_len(password.len(), "password")?;
    }
    Ok(Plan { first_byte: 0x10, remaining_len, props_len, will_props_len })
}

pub(crate) fn put_connect(buf: &mut BytesMut, connect: &Connect, plan: &Plan) {
    let protocol = connect.protocol;
    put_field(buf, protocol.protocol_name().as_bytes());
    buf.put_u8(protocol.level());
    let mut flags = 0;
    if connect.clean_start {
        flags |= FLAG_CLEAN_START;
    }
    if let Some(will) = &connect.will {
        flags |= FLAG_WILL | ((will.qos as u8) << 3);
        if will.retain {
            flags |= FLAG_WILL_RETAIN;
        }
    }
    if connect.password.is_some() {
        flags |= FLAG_PASSWORD;
    }
    if connect.username.is_some() {
        flags |= FLAG_USERNAME;
    }
    buf.put_u8(flags);
    buf.put_u16(connect.keep_alive);
    if protocol.is_v5() {
        properties::put(buf, &connect.properties, plan.props_len);
    }
    put_field(buf, connect.client_id.as_bytes());
    if let Some(will) = &connect.will {
        if protocol.is_v5() {
            properties::put(buf, &will.properties, plan.will_props_len);
        }
        put_field(buf, will.topic.as_bytes());
        put_field(buf, &will.payload);
    }
    if let Some(username) = &connect.username {
        put_field(buf, username.as_bytes());
    }
    if let Some(password) = &connect.password {
        put_field(buf, password);
    }
}

/// The acknowledge flags and return/reason code byte of a CONNACK for `version`.
fn connack_bytes(connack: &ConnAck, version: ProtocolVersion) -> Result<(u8, u8), EncodeError> {
    let code = if version.is_v5() {
        reasons::encode(PacketType::ConnAck, connack.reason)?
    } else {
        connack
            .reason
            .to_v3_connack()
            .ok_or(EncodeError::NotRepresentable("reason has no 3.x CONNACK return code"))?
    };
    let flags = match version {
        ProtocolVersion::V3_1 => 0,
        ProtocolVersion::V3_1_1 | ProtocolVersion::V5 => {
            if connack.session_present && code != 0 {
                return Err(EncodeError::NotRepresentable("session present on a refused CONNACK"));
            }
            u8::from(connack.session_present)
        }
    };
    Ok((flags, code))
}

pub(crate) fn plan_connack(connack: &ConnAck, version: ProtocolVersion) -> Result<Plan, EncodeError> {
    connack_bytes(connack, version)?;
    if !version.is_v5() {
        return Ok(Plan::bare(0x20, 2));
    }
    let props_len = properties::block_len(&connack.properties, Context::CONNACK)?;
    Ok(Plan {
        first_byte: 0x20,
        remaining_len: 2 + properties::section_len(props_len),
        props_len,
        will_props_len: 0,
    })
}

pub(crate) fn put_connack(buf: &mut BytesMut, connack: &ConnAck, version: ProtocolVersion, plan: &Plan) {
    // The plan succeeded, so the same computation succeeds here.
    let (flags, code) = connack_bytes(connack, version).unwrap_or((0, 0));
    buf.put_u8(flags);
    buf.put_u8(code);
    if version.is_v5() {
        properties::put(buf, &connack.properties, plan.props_len);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::packet::Packet;
    use crate::test_util::{decode_bytes, encode_bytes};
    use crate::utf8::Utf8;
    use crate::{encode, encoded_len};

    use super::*;

    fn round_trip(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
        let bytes = encode_bytes(packet, version);
        assert_eq!(decode_bytes(&bytes, version).as_ref(), Ok(packet));
        bytes
    }

    /// A 3.1.1 CONNECT: client id "c", will "w"/"x" QoS 1 retained, user "u", password "p".
    const CONNECT_V4: &[u8] = &[
        0x10,
        22,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0b1110_1110,
        0,
        60,
        0,
        1,
        b'c',
        0,
        1,
        b'w',
        0,
        1,
        b'x',
        0,
        1,
        b'u',
    ];

    #[test]
    fn v311_connect_decodes_every_field() {
        // Append the password to the constant above (kept short for the table).
        let mut bytes = CONNECT_V4.to_vec();
        bytes.extend_from_slice(&[0, 1, b'p']);
        bytes[1] = (bytes.len() - 2) as u8;
        let Packet::Connect(connect) = decode_bytes(&bytes, ProtocolVersion::V5).unwrap() else { panic!() };
        assert_eq!(connect.protocol, ProtocolVersion::V3_1_1);
        assert!(connect.clean_start);
        assert_eq!(connect.keep_alive, 60);
        assert_eq!(connect.client_id, "c");
        let will = connect.will.as_ref().unwrap();
        assert_eq!(
            (will.topic.as_str(), &will.payload[..], will.qos, will.retain),
            ("w", &b"x"[..], QoS::AtLeastOnce, true)
        );
        assert_eq!(connect.username.as_ref().unwrap(), "u");
        assert_eq!(connect.password.as_deref(), Some(&b"p"[..]));
        let encoded = round_trip(&Packet::Connect(connect), ProtocolVersion::V3_1_1);
        assert_eq!(encoded, bytes);
    }

    fn connect(protocol: ProtocolVersion) -> Connect {
        Connect {
            protocol,
            clean_start: false,
            keep_alive: 0,
            properties: Properties::default(),
            client_id: Utf8::from_static(""),
            will: None,
            username: None,
            password: None,
        }
    }

    #[test]
    fn each_version_round_trips() {
        for protocol in [ProtocolVersion::V3_1, ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let packet = Packet::Connect(Box::new(connect(protocol)));
            // Whatever version the connection is assumed to have.
            for version in [ProtocolVersion::V3_1, ProtocolVersion::V5] {
                round_trip(&packet, version);
            }
        }
        let mut v5 = connect(ProtocolVersion::V5);
        v5.password = Some(Bytes::from_static(b"secret"));
        v5.properties.receive_maximum = Some(5);
        v5.properties.authentication_method = Some(Utf8::from_static("m"));
        v5.will = Some(Will {
            topic: Utf8::from_static("w/t"),
            payload: Bytes::new(),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: Properties { will_delay_interval: Some(10), ..Properties::default() },
        });
        round_trip(&Packet::Connect(Box::new(v5)), ProtocolVersion::V5);
    }

    #[test]
    fn connect_rules() {
        use DecodeError::*;
        let header = |name: &[u8], level: u8, flags: u8| {
            let mut bytes = vec![0x10, 0, 0, name.len() as u8];
            bytes.extend_from_slice(name);
            bytes.extend_from_slice(&[level, flags, 0, 0]);
            bytes
        };
        let finish = |mut bytes: Vec<u8>, tail: &[u8]| {
            bytes.extend_from_slice(tail);
            bytes[1] = (bytes.len() - 2) as u8;
            bytes
        };
        let v4 = ProtocolVersion::V3_1_1;
        assert_eq!(decode_bytes(&finish(header(b"MQTX", 4, 0), &[0, 0]), v4), Err(InvalidProtocolName));
        assert_eq!(decode_bytes(&finish(header(b"MQTT", 3, 0), &[0, 0]), v4), Err(InvalidProtocolName));
        assert_eq!(decode_bytes(&finish(header(b"MQIsdp", 4, 0), &[0, 0]), v4), Err(InvalidProtocolName));
        assert_eq!(
            decode_bytes(&finish(header(b"MQTT", 6, 0), &[0, 0]), v4),
            Err(UnsupportedProtocolLevel(6))
        );
        assert_eq!(decode_bytes(&finish(header(b"MQTT", 4, 1), &[0, 0]), v4), Err(ConnectReservedFlag));
        assert_eq!(decode_bytes(&finish(header(b"MQTT", 4, 0x08), &[0, 0]), v4), Err(WillFlagsWithoutWill));
        assert_eq!(decode_bytes(&finish(header(b"MQTT", 4, 0x20), &[0, 0]), v4), Err(WillFlagsWithoutWill));
        assert_eq!(decode_bytes(&finish(header(b"MQTT", 4, 0x1C), &[0, 0]), v4), Err(InvalidQoS));
        assert_eq!(
            decode_bytes(&finish(header(b"MQTT", 4, 0x40), &[0, 0, 0, 0]), v4),
            Err(PasswordWithoutUsername)
        );
        assert_eq!(
            decode_bytes(&finish(header(b"MQIsdp", 3, 0x40), &[0, 0, 0, 0]), v4),
            Err(PasswordWithoutUsername)
        );
        // MQTT 5 allows a password alone.
        let v5_password =
            decode_bytes(&finish(header(b"MQTT", 5, 0x40), &[0, 0, 0, 0, 1, b'p']), v4).unwrap();
        let Packet::Connect(v5_password) = v5_password else { panic!() };
        assert_eq!(v5_password.password.as_deref(), Some(&b"p"[..]));
        // Trailing bytes, wildcard or empty will topic.
        assert_eq!(decode_bytes(&finish(header(b"MQTT", 4, 0), &[0, 0, 9]), v4), Err(LengthMismatch));
        assert_eq!(
            decode_bytes(&finish(header(b"MQTT", 4, 0x04), &[0, 0, 0, 1, b'#', 0, 0]), v4),
            Err(WildcardInTopicName)
        );
        assert_eq!(
            decode_bytes(&finish(header(b"MQTT", 4, 0x04), &[0, 0, 0, 0, 0, 0]), v4),
            Err(EmptyTopicName)
        );
        assert_eq!(decode_bytes(&finish(header(b"MQTT", 4, 0), &[0, 1, 0]), v4), Err(NullCharacter));
        // A will property on CONNECT itself is not allowed.
        assert_eq!(
            decode_bytes(&finish(header(b"MQTT", 5, 0), &[2, 0x01, 1, 0, 0]), v4),
            Err(PropertyNotAllowed { property: 0x01, packet_type: PacketType::Connect })
        );
    }

    #[test]
    fn connack_versions() {
        use ProtocolVersion::*;
        let accepted =
            ConnAck { session_present: true, reason: ReasonCode::Success, properties: Properties::default() };
        assert_eq!(round_trip(&Packet::ConnAck(accepted.clone()), V3_1_1), [0x20, 2, 1, 0]);
        assert_eq!(round_trip(&Packet::ConnAck(accepted.clone()), V5), [0x20, 3, 1, 0, 0]);
        // 3.1 has no session present: written as 0, the byte ignored on decode.
        let mut bytes = BytesMut::new();
        encode(&Packet::ConnAck(accepted), V3_1, &mut bytes).unwrap();
        assert_eq!(&bytes[..], [0x20, 2, 0, 0]);
        let refused =
            ConnAck { session_present: false, reason: ReasonCode::Banned, properties: Properties::default() };
        assert_eq!(round_trip(&Packet::ConnAck(refused.clone()), V5), [0x20, 3, 0, 0x8A, 0]);
        let mut bytes = BytesMut::new();
        encode(&Packet::ConnAck(refused), V3_1_1, &mut bytes).unwrap();
        assert_eq!(&bytes[..], [0x20, 2, 0, 5]);
        let no_v3_code = ConnAck {
            session_present: false,
            reason: ReasonCode::PacketTooLarge,
            properties: Properties::default(),
        };
        assert!(matches!(
            encoded_len(&Packet::ConnAck(no_v3_code), V3_1_1),
            Err(EncodeError::NotRepresentable(_))
        ));
        assert_eq!(decode_bytes(&[0x20, 2, 2, 0], V3_1_1), Err(DecodeError::InvalidConnAckFlags(2)));
        assert_eq!(decode_bytes(&[0x20, 2, 1, 5], V3_1_1), Err(DecodeError::InvalidConnAckFlags(1)));
        assert_eq!(
            decode_bytes(&[0x20, 2, 0, 6], V3_1_1),
            Err(DecodeError::InvalidReasonCode { packet_type: PacketType::ConnAck, code: 6 })
        );
        assert_eq!(decode_bytes(&[0x20, 3, 0, 0, 0], V3_1_1), Err(DecodeError::LengthMismatch));
        // A v5 CONNACK must carry its property length.
        assert_eq!(decode_bytes(&[0x20, 2, 0, 0], V5), Err(DecodeError::LengthMismatch));
        assert_eq!(
            decode_bytes(&[0x20, 3, 0, 0x8B, 0], V5),
            Err(DecodeError::InvalidReasonCode { packet_type: PacketType::ConnAck, code: 0x8B })
        );
    }
}
