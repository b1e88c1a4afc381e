//! The malformed-input table: for every normative "MUST close the Network Connection", "Malformed
//! Packet" and "Protocol Error" statement of MQTT 3.1.1 and MQTT 5.0 that one packet in isolation
//! can violate, a row with the bytes that violate it and what the decoder must answer: the
//! `DecodeError`, the MQTT 5 reason code of the DISCONNECT (or CONNACK) that follows, and what a
//! 3.x server does.
//!
//! The table was built by going through sections 1.5, 2.1, 2.2, 3.1 to 3.15 and 4.7 (and 4.8.2) of
//! both specifications. Statements that need state from other packets are listed at the end of
//! this file as broker-level, so the table is honest about what it covers.
//!
//! Statement ids: 3.1.1 and 5.0 number their statements independently; each row says which
//! specification its id comes from. Where a rule has no id of its own, the row names the section.
//! MQTT 3.1 has no numbered statements; its rows cite the 3.1.1 statement that carried the rule
//! forward.

use bytes::BytesMut;
use shardmq_protocol::{
    decode, frame_len, DecodeError, PacketType, ProtocolVersion, ReasonCode, V3Action, PACKET_SIZE_MAX_BYTES,
};

use DecodeError::*;
use PacketType as T;
use ProtocolVersion::{V3_1, V3_1_1, V5};
use ReasonCode as R;
use V3Action::{Close, ConnAck};

struct Row {
    /// The statement id (or section) and the specification it is from.
    statement: &'static str,
    what: &'static str,
    version: ProtocolVersion,
    bytes: Vec<u8>,
    max_packet_size_bytes: u32,
    error: DecodeError,
    reason: ReasonCode,
    v3: V3Action,
}

fn row(
    statement: &'static str,
    what: &'static str,
    version: ProtocolVersion,
    bytes: Vec<u8>,
    error: DecodeError,
    reason: ReasonCode,
    v3: V3Action,
) -> Row {
    Row { statement, what, version, bytes, max_packet_size_bytes: PACKET_SIZE_MAX_BYTES, error, reason, v3 }
}

/// A frame: the first byte, the remaining length (computed, minimal), the body parts in order.
/// Rows whose point is a wrong remaining length spell their bytes out instead.
fn frame(first_byte: u8, parts: &[&[u8]]) -> Vec<u8> {
    let body = parts.concat();
    let mut bytes = vec![first_byte];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        bytes.push(byte);
        if len == 0 {
            break;
        }
    }
    bytes.extend_from_slice(&body);
    bytes
}

/// A property block: the minimal varint length, then the properties.
fn props(parts: &[&[u8]]) -> Vec<u8> {
    let mut bytes = frame(0, parts);
    bytes.remove(0);
    bytes
}

/// A 3.1.1 CONNECT with these flags and payload (keep alive 60).
fn connect4(flags: u8, payload: &[&[u8]]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> =
        vec![&[0x00, 0x04], b"MQTT", &[0x04], std::slice::from_ref(&flags), &[0x00, 0x3C]];
    parts.extend_from_slice(payload);
    frame(0x10, &parts)
}

/// A 5.0 CONNECT with these flags, properties and payload (keep alive 60).
fn connect5(flags: u8, properties: &[&[u8]], payload: &[&[u8]]) -> Vec<u8> {
    let properties = props(properties);
    let mut parts: Vec<&[u8]> =
        vec![&[0x00, 0x04], b"MQTT", &[0x05], std::slice::from_ref(&flags), &[0x00, 0x3C], &properties];
    parts.extend_from_slice(payload);
    frame(0x10, &parts)
}

/// A 5.0 CONNECT, clean start, client id "c", with these properties.
fn connect5_props(properties: &[&[u8]]) -> Vec<u8> {
    connect5(0x02, properties, &[&[0x00, 0x01], b"c"])
}

/// A 5.0 CONNECT with a will (QoS 0) carrying these will properties.
fn connect5_will_props(will_properties: &[&[u8]]) -> Vec<u8> {
    let will_properties = props(will_properties);
    connect5(0x06, &[], &[&[0x00, 0x01], b"c", &will_properties, &[0x00, 0x01], b"w", &[0x00, 0x01], b"x"])
}

/// A 5.0 QoS 0 PUBLISH to `a/b` with these properties and payload "x".
fn publish5(properties: &[&[u8]]) -> Vec<u8> {
    frame(0x30, &[&[0x00, 0x03], b"a/b", &props(properties), b"x"])
}

/// A 5.0 CONNACK (success) with these properties.
fn connack5(properties: &[&[u8]]) -> Vec<u8> {
    frame(0x20, &[&[0x00, 0x00], &props(properties)])
}

/// A 5.0 SUBSCRIBE (packet id 1) with these properties and one `filter`/`options` entry.
fn subscribe5(properties: &[&[u8]], filter: &[u8], options: u8) -> Vec<u8> {
    let len = (filter.len() as u16).to_be_bytes();
    frame(0x82, &[&[0x00, 0x01], &props(properties), &len, filter, &[options]])
}

/// A 3.1.1 SUBSCRIBE (packet id 1) with one `filter`/`options` entry.
fn subscribe4(filter: &[u8], options: u8) -> Vec<u8> {
    let len = (filter.len() as u16).to_be_bytes();
    frame(0x82, &[&[0x00, 0x01], &len, filter, &[options]])
}

/// The rows of 1.5 (data representation) and 2.x (fixed header, packet id, properties).
fn encoding_rows() -> Vec<Row> {
    vec![
        // 1.5.3 / 1.5.4 UTF-8 strings.
        row(
            "3.1.1 MQTT-1.5.3-1",
            "overlong UTF-8 in the client id",
            V3_1_1,
            connect4(0x02, &[&[0x00, 0x02, 0xC0, 0xAF]]),
            InvalidUtf8,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-1.5.3-1",
            "UTF-8 surrogate in a PUBLISH topic",
            V3_1_1,
            frame(0x30, &[&[0x00, 0x03, 0xED, 0xA0, 0x80]]),
            InvalidUtf8,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-1.5.3-2",
            "U+0000 in a PUBLISH topic",
            V3_1_1,
            frame(0x30, &[&[0x00, 0x03], b"a\0b"]),
            NullCharacter,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-1.5.3-2",
            "U+0000 in a PUBLISH topic (MQTT 3.1)",
            V3_1,
            frame(0x30, &[&[0x00, 0x03], b"a\0b"]),
            NullCharacter,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-1.5.4-1",
            "UTF-8 surrogate in a PUBLISH topic",
            V5,
            frame(0x30, &[&[0x00, 0x03, 0xED, 0xA0, 0x80, 0x00]]),
            InvalidUtf8,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-1.5.4-2",
            "U+0000 in a SUBSCRIBE topic filter",
            V5,
            subscribe5(&[], b"a/\0", 0x00),
            NullCharacter,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-1.5.7-1",
            "ill-formed UTF-8 in a user property value",
            V5,
            publish5(&[&[0x26, 0x00, 0x01], b"k", &[0x00, 0x01, 0xFF]]),
            InvalidUtf8,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.3.2-19",
            "ill-formed UTF-8 in the content type",
            V5,
            publish5(&[&[0x03, 0x00, 0x01, 0x80]]),
            InvalidUtf8,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 1.5.4",
            "a string length that runs past the packet",
            V5,
            frame(0x30, &[&[0x00, 0x10], b"a/b"]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 1.5.3",
            "a string length that runs past the packet",
            V3_1_1,
            frame(0x30, &[&[0x00, 0x10], b"a/b"]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 1.5.6",
            "binary data (password) that runs past the packet",
            V5,
            connect5(0x42, &[], &[&[0x00, 0x01], b"c", &[0x00, 0x05], b"p"]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 1.5.3",
            "a four-byte integer property cut short",
            V5,
            publish5(&[&[0x02, 0x00, 0x00]]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        // 1.5.5 variable byte integers inside the packet.
        row(
            "5.0 MQTT-1.5.5-1",
            "property length not minimally encoded (0x80 0x00)",
            V5,
            frame(0x30, &[&[0x00, 0x03], b"a/b", &[0x80, 0x00], b"x"]),
            MalformedVarInt,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-1.5.5-1",
            "subscription identifier not minimally encoded (0x85 0x00)",
            V5,
            subscribe5(&[&[0x0B, 0x85, 0x00]], b"a", 0x00),
            MalformedVarInt,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 1.5.5",
            "subscription identifier of five bytes",
            V5,
            subscribe5(&[&[0x0B, 0x80, 0x80, 0x80, 0x80, 0x01]], b"a", 0x00),
            MalformedVarInt,
            R::MalformedPacket,
            Close,
        ),
        // 2.1 fixed header: packet types.
        row(
            "3.1.1 2.2.1",
            "reserved packet type 0",
            V3_1_1,
            vec![0x00, 0x00],
            InvalidPacketType(0),
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 2.1.2",
            "reserved packet type 0",
            V5,
            vec![0x00, 0x00],
            InvalidPacketType(0),
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 2.2.1",
            "packet type 15 is reserved before MQTT 5 (AUTH)",
            V3_1_1,
            vec![0xF0, 0x00],
            InvalidPacketType(15),
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 2.2.1",
            "packet type 15 is reserved in MQTT 3.1",
            V3_1,
            vec![0xF0, 0x00],
            InvalidPacketType(15),
            R::MalformedPacket,
            Close,
        ),
        // 2.1.4 / 2.2.3 remaining length.
        row(
            "5.0 2.1.4",
            "remaining length of five bytes",
            V5,
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            MalformedRemainingLength,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 2.2.3",
            "remaining length whose fourth byte continues: an error before any more bytes arrive",
            V3_1_1,
            vec![0x30, 0x80, 0x80, 0x80, 0x80],
            MalformedRemainingLength,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-1.5.5-1",
            "remaining length not minimally encoded (0x80 0x00)",
            V5,
            vec![0x30, 0x80, 0x00],
            MalformedRemainingLength,
            R::MalformedPacket,
            Close,
        ),
        // Maximum packet size (5.0 3.1.2.11.4 / 3.2.2.3.6; an implementation limit in 3.x): refused
        // from the fixed header alone, before the body arrives.
        Row {
            max_packet_size_bytes: 100,
            ..row(
                "5.0 MQTT-3.2.2-15",
                "frame of 1003 bytes over a maximum of 100, only the header received",
                V5,
                vec![0x30, 0xE8, 0x07],
                PacketTooLarge { size_bytes: 1003, max_bytes: 100 },
                R::PacketTooLarge,
                Close,
            )
        },
        Row {
            max_packet_size_bytes: 100,
            ..row(
                "3.1.1 (limit)",
                "frame of 1003 bytes over a maximum of 100, only the header received",
                V3_1_1,
                vec![0x30, 0xE8, 0x07],
                PacketTooLarge { size_bytes: 1003, max_bytes: 100 },
                R::PacketTooLarge,
                Close,
            )
        },
        Row {
            max_packet_size_bytes: 10,
            ..row(
                "5.0 MQTT-3.2.2-15",
                "frame one byte over the maximum (the maximum counts the fixed header)",
                V5,
                frame(0x30, &[&[0x00, 0x03], b"a/b", &[0x00], b"xyz"]),
                PacketTooLarge { size_bytes: 11, max_bytes: 10 },
                R::PacketTooLarge,
                Close,
            )
        },
        // 2.2.2 / 2.3.1 (3.1.1) packet identifiers.
        row(
            "3.1.1 MQTT-2.3.1-1",
            "QoS 1 PUBLISH with packet identifier 0",
            V3_1_1,
            frame(0x32, &[&[0x00, 0x03], b"a/b", &[0x00, 0x00], b"x"]),
            PacketIdZero,
            R::ProtocolError,
            Close,
        ),
        row(
            "3.1.1 MQTT-2.3.1-1",
            "SUBSCRIBE with packet identifier 0",
            V3_1_1,
            frame(0x82, &[&[0x00, 0x00, 0x00, 0x01], b"a", &[0x00]]),
            PacketIdZero,
            R::ProtocolError,
            Close,
        ),
        row(
            "3.1.1 MQTT-2.3.1-1",
            "UNSUBSCRIBE with packet identifier 0",
            V3_1_1,
            frame(0xA2, &[&[0x00, 0x00, 0x00, 0x01], b"a"]),
            PacketIdZero,
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 MQTT-2.2.1-3",
            "QoS 2 PUBLISH with packet identifier 0",
            V5,
            frame(0x34, &[&[0x00, 0x03], b"a/b", &[0x00, 0x00, 0x00], b"x"]),
            PacketIdZero,
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 MQTT-2.2.1-3",
            "SUBSCRIBE with packet identifier 0",
            V5,
            frame(0x82, &[&[0x00, 0x00, 0x00, 0x00, 0x01], b"a", &[0x00]]),
            PacketIdZero,
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 MQTT-2.2.1-3",
            "UNSUBSCRIBE with packet identifier 0",
            V5,
            frame(0xA2, &[&[0x00, 0x00, 0x00, 0x00, 0x01], b"a"]),
            PacketIdZero,
            R::ProtocolError,
            Close,
        ),
        row(
            "3.1.1 MQTT-2.3.1-1",
            "QoS 1 PUBLISH too short to hold its packet identifier",
            V3_1_1,
            frame(0x32, &[&[0x00, 0x03], b"a/b", &[0x00]]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        // 2.2.2 properties (5.0).
        row(
            "5.0 MQTT-2.2.2-1",
            "PUBLISH without its property length",
            V5,
            frame(0x30, &[&[0x00, 0x03], b"a/b"]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 2.2.2.1",
            "property length runs past the packet",
            V5,
            frame(0x30, &[&[0x00, 0x03], b"a/b", &[0x0A, 0x01, 0x01]]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 2.2.2.2",
            "property identifier 0x7F is not defined",
            V5,
            publish5(&[&[0x7F, 0x00]]),
            UnknownProperty(0x7F),
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 2.2.2.2",
            "session expiry interval is not a PUBLISH property",
            V5,
            publish5(&[&[0x11, 0x00, 0x00, 0x00, 0x01]]),
            PropertyNotAllowed { property: 0x11, packet_type: T::Publish },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 2.2.2.2",
            "topic alias is not a CONNECT property",
            V5,
            connect5_props(&[&[0x23, 0x00, 0x01]]),
            PropertyNotAllowed { property: 0x23, packet_type: T::Connect },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 2.2.2.2",
            "message expiry interval is not a PUBACK property",
            V5,
            frame(0x40, &[&[0x00, 0x01, 0x00], &props(&[&[0x02, 0x00, 0x00, 0x00, 0x01]])]),
            PropertyNotAllowed { property: 0x02, packet_type: T::PubAck },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 2.2.2.2",
            "payload format indicator is not a SUBSCRIBE property",
            V5,
            subscribe5(&[&[0x01, 0x01]], b"a", 0x00),
            PropertyNotAllowed { property: 0x01, packet_type: T::Subscribe },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 2.2.2.2",
            "maximum QoS is not a DISCONNECT property",
            V5,
            frame(0xE0, &[&[0x00], &props(&[&[0x24, 0x01]])]),
            PropertyNotAllowed { property: 0x24, packet_type: T::Disconnect },
            R::MalformedPacket,
            Close,
        ),
    ]
}

/// Fixed-header flags: 3.1.1 MQTT-2.2.2-2 ("If invalid flags are received, the receiver MUST close
/// the Network Connection"), 5.0 MQTT-2.1.3-1 and the per-packet repetitions.
fn flag_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    // (statement, first byte, body that is otherwise valid, packet type, flags)
    let cases: Vec<(&'static str, &'static str, u8, Vec<u8>, PacketType)> = vec![
        ("MQTT-2.1.3-1", "CONNECT flags 0001", 0x11, vec![], T::Connect),
        ("MQTT-2.1.3-1", "CONNACK flags 0010", 0x22, vec![0x00, 0x00], T::ConnAck),
        ("MQTT-2.1.3-1", "PUBACK flags 0001", 0x41, vec![0x00, 0x01], T::PubAck),
        ("MQTT-2.1.3-1", "PUBREC flags 1000", 0x58, vec![0x00, 0x01], T::PubRec),
        ("MQTT-3.6.1-1", "PUBREL flags 0000", 0x60, vec![0x00, 0x01], T::PubRel),
        ("MQTT-3.6.1-1", "PUBREL flags 0011", 0x63, vec![0x00, 0x01], T::PubRel),
        ("MQTT-2.1.3-1", "PUBCOMP flags 0100", 0x74, vec![0x00, 0x01], T::PubComp),
        ("MQTT-3.8.1-1", "SUBSCRIBE flags 0000", 0x80, vec![], T::Subscribe),
        ("MQTT-2.1.3-1", "SUBACK flags 0010", 0x92, vec![0x00, 0x01, 0x00], T::SubAck),
        ("MQTT-3.10.1-1", "UNSUBSCRIBE flags 1010", 0xAA, vec![], T::Unsubscribe),
        ("MQTT-2.1.3-1", "UNSUBACK flags 0001", 0xB1, vec![0x00, 0x01], T::UnsubAck),
        ("MQTT-2.1.3-1", "PINGREQ flags 0001", 0xC1, vec![], T::PingReq),
        ("MQTT-2.1.3-1", "PINGRESP flags 1000", 0xD8, vec![], T::PingResp),
        ("MQTT-3.14.1-1", "DISCONNECT flags 0001", 0xE1, vec![], T::Disconnect),
    ];
    for (statement, what, first_byte, body, packet_type) in cases {
        for version in [V3_1, V3_1_1, V5] {
            // The statement ids are 5.0's; 3.1.1 states the same rule as MQTT-2.2.2-2.
            let statement = if version.is_v5() { statement } else { "3.1.1 MQTT-2.2.2-2" };
            rows.push(row(
                statement,
                what,
                version,
                frame(first_byte, &[&body]),
                InvalidHeaderFlags { packet_type, flags: first_byte & 0x0F },
                R::MalformedPacket,
                Close,
            ));
        }
    }
    rows.push(row(
        "5.0 MQTT-3.15.1-1",
        "AUTH flags 0001",
        V5,
        vec![0xF1, 0x00],
        InvalidHeaderFlags { packet_type: T::Auth, flags: 1 },
        R::MalformedPacket,
        Close,
    ));
    // PUBLISH flags: QoS 3 and DUP at QoS 0.
    for version in [V3_1, V3_1_1, V5] {
        let body: &[u8] = if version.is_v5() { b"\x00\x01t\x00\x00\x01\x00" } else { b"\x00\x01t\x00\x01" };
        rows.push(row(
            "3.1.1 / 5.0 MQTT-3.3.1-4",
            "PUBLISH with both QoS bits set",
            version,
            frame(0x36, &[body]),
            InvalidQoS,
            R::MalformedPacket,
            Close,
        ));
        rows.push(row(
            "3.1.1 / 5.0 MQTT-3.3.1-2",
            "DUP set on a QoS 0 PUBLISH",
            version,
            frame(0x38, &[&body[..body.len() - 2]]),
            DupOnQoS0,
            R::MalformedPacket,
            Close,
        ));
    }
    rows
}

/// 3.1 CONNECT and 3.2 CONNACK.
fn connect_rows() -> Vec<Row> {
    let client_c: &[&[u8]] = &[&[0x00, 0x01], b"c"];
    vec![
        row(
            "3.1.1 MQTT-3.1.2-1",
            "protocol name MQTX",
            V3_1_1,
            frame(0x10, &[&[0x00, 0x04], b"MQTX", &[0x04, 0x02, 0x00, 0x3C, 0x00, 0x01], b"c"]),
            InvalidProtocolName,
            R::UnsupportedProtocolVersion,
            Close,
        ),
        row(
            "5.0 MQTT-3.1.2-1",
            "protocol name mqtt (case matters)",
            V5,
            frame(0x10, &[&[0x00, 0x04], b"mqtt", &[0x05, 0x02, 0x00, 0x3C, 0x00, 0x00, 0x01], b"c"]),
            InvalidProtocolName,
            R::UnsupportedProtocolVersion,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.2-1",
            "protocol name MQIsdp with level 4",
            V3_1_1,
            frame(0x10, &[&[0x00, 0x06], b"MQIsdp", &[0x04, 0x02, 0x00, 0x3C, 0x00, 0x01], b"c"]),
            InvalidProtocolName,
            R::UnsupportedProtocolVersion,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.2-1",
            "protocol name MQTT with level 3 (3.1 is MQIsdp)",
            V3_1,
            frame(0x10, &[&[0x00, 0x04], b"MQTT", &[0x03, 0x02, 0x00, 0x3C, 0x00, 0x01], b"c"]),
            InvalidProtocolName,
            R::UnsupportedProtocolVersion,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.2-2",
            "protocol level 6: CONNACK return code 1, then close",
            V3_1_1,
            frame(0x10, &[&[0x00, 0x04], b"MQTT", &[0x06, 0x02, 0x00, 0x3C, 0x00, 0x01], b"c"]),
            UnsupportedProtocolLevel(6),
            R::UnsupportedProtocolVersion,
            ConnAck(1),
        ),
        row(
            "5.0 MQTT-3.1.2-2",
            "protocol level 0",
            V5,
            frame(0x10, &[&[0x00, 0x04], b"MQTT", &[0x00, 0x02, 0x00, 0x3C, 0x00, 0x01], b"c"]),
            UnsupportedProtocolLevel(0),
            R::UnsupportedProtocolVersion,
            ConnAck(1),
        ),
        row(
            "3.1.1 MQTT-3.1.2-3",
            "CONNECT reserved flag set",
            V3_1_1,
            connect4(0x03, client_c),
            ConnectReservedFlag,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.1.2-3",
            "CONNECT reserved flag set",
            V5,
            connect5(0x03, &[], client_c),
            ConnectReservedFlag,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.2-13",
            "will QoS 1 without the will flag",
            V3_1_1,
            connect4(0x0A, client_c),
            WillFlagsWithoutWill,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.2-15",
            "will retain without the will flag",
            V3_1_1,
            connect4(0x22, client_c),
            WillFlagsWithoutWill,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.1.2-11",
            "will QoS 2 without the will flag",
            V5,
            connect5(0x12, &[], client_c),
            WillFlagsWithoutWill,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.1.2-13",
            "will retain without the will flag",
            V5,
            connect5(0x22, &[], client_c),
            WillFlagsWithoutWill,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.2-14",
            "will QoS 3",
            V3_1_1,
            connect4(0x1E, &[&[0x00, 0x01], b"c", &[0x00, 0x01], b"w", &[0x00, 0x00]]),
            InvalidQoS,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.1.2-12",
            "will QoS 3",
            V5,
            connect5(0x1E, &[], &[&[0x00, 0x01], b"c", &[0x00], &[0x00, 0x01], b"w", &[0x00, 0x00]]),
            InvalidQoS,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.2-22",
            "password flag without user name flag",
            V3_1_1,
            connect4(0x42, &[&[0x00, 0x01], b"c", &[0x00, 0x01], b"p"]),
            PasswordWithoutUsername,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.2-19",
            "user name flag set, no user name in the payload",
            V3_1_1,
            connect4(0x82, client_c),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.2-21",
            "password flag set, no password in the payload",
            V3_1_1,
            connect4(0xC2, &[&[0x00, 0x01], b"c", &[0x00, 0x01], b"u"]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.1.2-19",
            "user name flag set, no user name in the payload",
            V5,
            connect5(0x82, &[], client_c),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.2-18",
            "user name flag clear but a user name follows the client id",
            V3_1_1,
            connect4(0x02, &[&[0x00, 0x01], b"c", &[0x00, 0x01], b"u"]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.1.2-9",
            "will flag set, will payload missing",
            V5,
            connect5(0x06, &[], &[&[0x00, 0x01], b"c", &[0x00], &[0x00, 0x01], b"w"]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.3-3",
            "no client id",
            V3_1_1,
            connect4(0x02, &[]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.3-10",
            "will topic not UTF-8",
            V3_1_1,
            connect4(0x06, &[&[0x00, 0x01], b"c", &[0x00, 0x01, 0xFE], &[0x00, 0x00]]),
            InvalidUtf8,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.1.3-11",
            "user name not UTF-8",
            V3_1_1,
            connect4(0x82, &[&[0x00, 0x01], b"c", &[0x00, 0x02, 0xC3, 0x28]]),
            InvalidUtf8,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.1.3-4",
            "client id not UTF-8",
            V5,
            connect5(0x02, &[], &[&[0x00, 0x01, 0xFF]]),
            InvalidUtf8,
            R::MalformedPacket,
            Close,
        ),
        // 3.1.2.11 CONNECT properties: each "It is a Protocol Error to include X more than once"
        // and each value rule.
        row(
            "5.0 3.1.2.11.2",
            "session expiry interval twice",
            V5,
            connect5_props(&[&[0x11, 0, 0, 0, 1], &[0x11, 0, 0, 0, 2]]),
            DuplicateProperty(0x11),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.2.11.3",
            "receive maximum twice",
            V5,
            connect5_props(&[&[0x21, 0, 1], &[0x21, 0, 1]]),
            DuplicateProperty(0x21),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.2.11.3",
            "receive maximum 0",
            V5,
            connect5_props(&[&[0x21, 0, 0]]),
            InvalidPropertyValue(0x21),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.2.11.4",
            "maximum packet size 0",
            V5,
            connect5_props(&[&[0x27, 0, 0, 0, 0]]),
            InvalidPropertyValue(0x27),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.2.11.4",
            "maximum packet size twice",
            V5,
            connect5_props(&[&[0x27, 0, 0, 1, 0], &[0x27, 0, 0, 1, 0]]),
            DuplicateProperty(0x27),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.2.11.5",
            "topic alias maximum twice",
            V5,
            connect5_props(&[&[0x22, 0, 1], &[0x22, 0, 2]]),
            DuplicateProperty(0x22),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.2.11.6",
            "request response information 2",
            V5,
            connect5_props(&[&[0x19, 0x02]]),
            InvalidPropertyValue(0x19),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.2.11.7",
            "request problem information 2",
            V5,
            connect5_props(&[&[0x17, 0x02]]),
            InvalidPropertyValue(0x17),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.2.11.7",
            "request problem information twice",
            V5,
            connect5_props(&[&[0x17, 0x01], &[0x17, 0x01]]),
            DuplicateProperty(0x17),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.2.11.9",
            "authentication method twice",
            V5,
            connect5_props(&[&[0x15, 0x00, 0x01], b"m", &[0x15, 0x00, 0x01], b"n"]),
            DuplicateProperty(0x15),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.2.11.10",
            "authentication data without an authentication method",
            V5,
            connect5_props(&[&[0x16, 0x00, 0x01, 0x01]]),
            MissingProperty(0x15),
            R::ProtocolError,
            Close,
        ),
        // 3.1.3.2 will properties.
        row(
            "5.0 3.1.3.2.2",
            "will delay interval twice",
            V5,
            connect5_will_props(&[&[0x18, 0, 0, 0, 1], &[0x18, 0, 0, 0, 1]]),
            DuplicateProperty(0x18),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.3.2.3",
            "will payload format indicator twice",
            V5,
            connect5_will_props(&[&[0x01, 0x00], &[0x01, 0x01]]),
            DuplicateProperty(0x01),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.1.3.2",
            "session expiry interval is not a will property",
            V5,
            connect5_will_props(&[&[0x11, 0, 0, 0, 1]]),
            PropertyNotAllowed { property: 0x11, packet_type: T::Connect },
            R::MalformedPacket,
            Close,
        ),
        // 3.2 CONNACK (what a client-side decoder, and our bridge, must refuse).
        row(
            "3.1.1 3.2.2.1",
            "CONNACK acknowledge flags reserved bit set",
            V3_1_1,
            vec![0x20, 0x02, 0x02, 0x00],
            InvalidConnAckFlags(0x02),
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.2.2-1",
            "CONNACK acknowledge flags reserved bit set",
            V5,
            vec![0x20, 0x03, 0x80, 0x00, 0x00],
            InvalidConnAckFlags(0x80),
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.2.2-4",
            "session present with a non-zero return code",
            V3_1_1,
            vec![0x20, 0x02, 0x01, 0x05],
            InvalidConnAckFlags(0x01),
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.2.2-6",
            "session present with a non-zero reason code",
            V5,
            vec![0x20, 0x03, 0x01, 0x87, 0x00],
            InvalidConnAckFlags(0x01),
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 3.2.2.3",
            "CONNACK return code 6 is reserved",
            V3_1_1,
            vec![0x20, 0x02, 0x00, 0x06],
            InvalidReasonCode { packet_type: T::ConnAck, code: 0x06 },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.2.2-8",
            "CONNACK reason code 0x04 is not a Connect Reason Code",
            V5,
            vec![0x20, 0x03, 0x00, 0x04, 0x00],
            InvalidReasonCode { packet_type: T::ConnAck, code: 0x04 },
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 3.2.1",
            "CONNACK remaining length 3",
            V3_1_1,
            vec![0x20, 0x03, 0x00, 0x00, 0x00],
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 3.2.2.3.4",
            "CONNACK maximum QoS 2",
            V5,
            connack5(&[&[0x24, 0x02]]),
            InvalidPropertyValue(0x24),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.2.2.3.5",
            "CONNACK retain available 2",
            V5,
            connack5(&[&[0x25, 0x02]]),
            InvalidPropertyValue(0x25),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.2.2.3.3",
            "CONNACK receive maximum 0",
            V5,
            connack5(&[&[0x21, 0x00, 0x00]]),
            InvalidPropertyValue(0x21),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.2.2.3.6",
            "CONNACK maximum packet size 0",
            V5,
            connack5(&[&[0x27, 0, 0, 0, 0]]),
            InvalidPropertyValue(0x27),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.2.2.3.11",
            "CONNACK wildcard subscription available 2",
            V5,
            connack5(&[&[0x28, 0x02]]),
            InvalidPropertyValue(0x28),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.2.2.3.12",
            "CONNACK subscription identifiers available 2",
            V5,
            connack5(&[&[0x29, 0x02]]),
            InvalidPropertyValue(0x29),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.2.2.3.13",
            "CONNACK shared subscription available 2",
            V5,
            connack5(&[&[0x2A, 0x02]]),
            InvalidPropertyValue(0x2A),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.2.2.3.7",
            "CONNACK assigned client identifier twice",
            V5,
            connack5(&[&[0x12, 0x00, 0x01], b"a", &[0x12, 0x00, 0x01], b"b"]),
            DuplicateProperty(0x12),
            R::ProtocolError,
            Close,
        ),
    ]
}

/// 3.3 PUBLISH to 3.7 PUBCOMP.
fn publish_rows() -> Vec<Row> {
    vec![
        row(
            "3.1.1 MQTT-3.3.2-1",
            "PUBLISH without a topic name",
            V3_1_1,
            vec![0x30, 0x00],
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.3.2-2",
            "'+' in a PUBLISH topic",
            V3_1_1,
            frame(0x30, &[&[0x00, 0x03], b"a/+"]),
            WildcardInTopicName,
            R::TopicNameInvalid,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.3.2-2",
            "'#' in a PUBLISH topic (MQTT 3.1)",
            V3_1,
            frame(0x30, &[&[0x00, 0x01], b"#"]),
            WildcardInTopicName,
            R::TopicNameInvalid,
            Close,
        ),
        row(
            "5.0 MQTT-3.3.2-2",
            "'#' in a PUBLISH topic",
            V5,
            frame(0x30, &[&[0x00, 0x03], b"a/#", &[0x00]]),
            WildcardInTopicName,
            R::TopicNameInvalid,
            Close,
        ),
        row(
            "3.1.1 MQTT-4.7.3-1",
            "empty PUBLISH topic",
            V3_1_1,
            frame(0x30, &[&[0x00, 0x00], b"x"]),
            EmptyTopicName,
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.3.2.1",
            "empty PUBLISH topic without a topic alias",
            V5,
            frame(0x30, &[&[0x00, 0x00, 0x00], b"x"]),
            EmptyTopicName,
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 MQTT-3.3.2-8",
            "topic alias 0",
            V5,
            publish5(&[&[0x23, 0x00, 0x00]]),
            TopicAliasZero,
            R::TopicAliasInvalid,
            Close,
        ),
        row(
            "5.0 3.3.2.3.2",
            "payload format indicator twice",
            V5,
            publish5(&[&[0x01, 0x00], &[0x01, 0x00]]),
            DuplicateProperty(0x01),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.3.2.3.3",
            "message expiry interval twice",
            V5,
            publish5(&[&[0x02, 0, 0, 0, 1], &[0x02, 0, 0, 0, 1]]),
            DuplicateProperty(0x02),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.3.2.3.4",
            "topic alias twice",
            V5,
            publish5(&[&[0x23, 0x00, 0x01], &[0x23, 0x00, 0x01]]),
            DuplicateProperty(0x23),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.3.2.3.5",
            "response topic twice",
            V5,
            publish5(&[&[0x08, 0x00, 0x01], b"r", &[0x08, 0x00, 0x01], b"r"]),
            DuplicateProperty(0x08),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.3.2.3.6",
            "correlation data twice",
            V5,
            publish5(&[&[0x09, 0x00, 0x00], &[0x09, 0x00, 0x00]]),
            DuplicateProperty(0x09),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.3.2.3.9",
            "content type twice",
            V5,
            publish5(&[&[0x03, 0x00, 0x01], b"t", &[0x03, 0x00, 0x01], b"t"]),
            DuplicateProperty(0x03),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.3.2.3.8",
            "subscription identifier 0",
            V5,
            publish5(&[&[0x0B, 0x00]]),
            InvalidPropertyValue(0x0B),
            R::ProtocolError,
            Close,
        ),
        // PUBACK, PUBREC, PUBREL, PUBCOMP.
        row(
            "3.1.1 3.4.1",
            "PUBACK remaining length 1",
            V3_1_1,
            vec![0x40, 0x01, 0x01],
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 3.4.1",
            "PUBACK remaining length 3 (no reason code before MQTT 5)",
            V3_1_1,
            vec![0x40, 0x03, 0x00, 0x01, 0x00],
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 3.7.1",
            "PUBCOMP remaining length 3 (MQTT 3.1)",
            V3_1,
            vec![0x70, 0x03, 0x00, 0x01, 0x00],
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 3.4.2",
            "PUBACK remaining length 1",
            V5,
            vec![0x40, 0x01, 0x01],
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.4.2-1",
            "PUBACK reason code 0x8F is not a PUBACK reason code",
            V5,
            vec![0x40, 0x03, 0x00, 0x01, 0x8F],
            InvalidReasonCode { packet_type: T::PubAck, code: 0x8F },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.5.2-1",
            "PUBREC reason code 0x92 is not a PUBREC reason code",
            V5,
            vec![0x50, 0x03, 0x00, 0x01, 0x92],
            InvalidReasonCode { packet_type: T::PubRec, code: 0x92 },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.6.2-1",
            "PUBREL reason code 0x10 is not a PUBREL reason code",
            V5,
            vec![0x62, 0x03, 0x00, 0x01, 0x10],
            InvalidReasonCode { packet_type: T::PubRel, code: 0x10 },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.7.2-1",
            "PUBCOMP reason code 0x91 is not a PUBCOMP reason code",
            V5,
            vec![0x70, 0x03, 0x00, 0x01, 0x91],
            InvalidReasonCode { packet_type: T::PubComp, code: 0x91 },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 3.4.2.2.2",
            "PUBACK reason string twice",
            V5,
            frame(0x40, &[&[0x00, 0x01, 0x00], &props(&[&[0x1F, 0x00, 0x00], &[0x1F, 0x00, 0x00]])]),
            DuplicateProperty(0x1F),
            R::ProtocolError,
            Close,
        ),
    ]
}

/// 3.8 SUBSCRIBE to 3.15 AUTH, and the topic filter rules of 4.7 and 4.8.2.
fn subscribe_and_control_rows() -> Vec<Row> {
    vec![
        row(
            "3.1.1 MQTT-3.8.3-1",
            "SUBSCRIBE topic filter not UTF-8",
            V3_1_1,
            subscribe4(&[0xC0, 0x80], 0x00),
            InvalidUtf8,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.8.3-3",
            "SUBSCRIBE without a topic filter",
            V3_1_1,
            vec![0x82, 0x02, 0x00, 0x01],
            NoTopicFilters,
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 MQTT-3.8.3-2",
            "SUBSCRIBE without a topic filter",
            V5,
            vec![0x82, 0x03, 0x00, 0x01, 0x00],
            NoTopicFilters,
            R::ProtocolError,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.8.3-4",
            "SUBSCRIBE requested QoS byte with a reserved bit set",
            V3_1_1,
            subscribe4(b"a", 0x04),
            SubscriptionOptionsReserved,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.8.3-4",
            "SUBSCRIBE requested QoS 3",
            V3_1_1,
            subscribe4(b"a", 0x03),
            InvalidQoS,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.8.3-4",
            "SUBSCRIBE requested QoS byte with a reserved bit set (MQTT 3.1)",
            V3_1,
            subscribe4(b"a", 0x80),
            SubscriptionOptionsReserved,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 3.8.3",
            "SUBSCRIBE topic filter without its QoS byte",
            V3_1_1,
            frame(0x82, &[&[0x00, 0x01, 0x00, 0x01], b"a"]),
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.8.3-5",
            "SUBSCRIBE options with reserved bits 7-6 set",
            V5,
            subscribe5(&[], b"a", 0xC0),
            SubscriptionOptionsReserved,
            R::MalformedPacket,
            Close,
        ),
        // 5.0 3.8.3.1: "It is a Protocol Error if the Maximum QoS field has the value 3" (unlike a
        // PUBLISH or will QoS 3, which is a Malformed Packet).
        row(
            "5.0 3.8.3.1",
            "SUBSCRIBE maximum QoS 3",
            V5,
            subscribe5(&[], b"a", 0x03),
            InvalidSubscriptionQoS,
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.8.3.1",
            "SUBSCRIBE retain handling 3",
            V5,
            subscribe5(&[], b"a", 0x30),
            InvalidRetainHandling,
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 MQTT-3.8.3-4",
            "No Local on a shared subscription",
            V5,
            subscribe5(&[], b"$share/g/a", 0x04),
            NoLocalOnSharedSubscription,
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.8.2.1.2",
            "subscription identifier 0",
            V5,
            subscribe5(&[&[0x0B, 0x00]], b"a", 0x00),
            InvalidPropertyValue(0x0B),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.8.2.1.2",
            "subscription identifier twice",
            V5,
            subscribe5(&[&[0x0B, 0x01], &[0x0B, 0x02]], b"a", 0x00),
            DuplicateProperty(0x0B),
            R::ProtocolError,
            Close,
        ),
        // 4.7 topic filters. The decoder refuses only the empty filter (MQTT-4.7.3-1); the syntax of
        // a filter (wildcard placement, `$share` names, MQTT-4.7.1-2/-3, MQTT-4.8.2-1/-2) is checked
        // by the broker per filter with `topic::validate_topic_filter`, which answers SUBACK 0x8F
        // (5.0) or 0x80 (3.1.1) for that filter instead of closing: see the list at the end.
        row(
            "3.1.1 MQTT-4.7.3-1",
            "empty SUBSCRIBE filter",
            V3_1_1,
            subscribe4(b"", 0x00),
            InvalidTopicFilter,
            R::TopicFilterInvalid,
            Close,
        ),
        row(
            "5.0 MQTT-4.7.3-1",
            "empty SUBSCRIBE filter",
            V5,
            subscribe5(&[], b"", 0x01),
            InvalidTopicFilter,
            R::TopicFilterInvalid,
            Close,
        ),
        row(
            "5.0 MQTT-4.7.3-1",
            "empty UNSUBSCRIBE filter",
            V5,
            frame(0xA2, &[&[0x00, 0x01, 0x00, 0x00, 0x00]]),
            InvalidTopicFilter,
            R::TopicFilterInvalid,
            Close,
        ),
        // 3.9 SUBACK.
        row(
            "3.1.1 MQTT-3.9.3-2",
            "SUBACK return code 0x03 is reserved",
            V3_1_1,
            vec![0x90, 0x03, 0x00, 0x01, 0x03],
            InvalidReasonCode { packet_type: T::SubAck, code: 0x03 },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.9.3-2",
            "SUBACK reason code 0x10 is not a Subscribe Reason Code",
            V5,
            vec![0x90, 0x04, 0x00, 0x01, 0x00, 0x10],
            InvalidReasonCode { packet_type: T::SubAck, code: 0x10 },
            R::MalformedPacket,
            Close,
        ),
        // 3.10 UNSUBSCRIBE, 3.11 UNSUBACK.
        row(
            "3.1.1 MQTT-3.10.3-1",
            "UNSUBSCRIBE topic filter not UTF-8",
            V3_1_1,
            frame(0xA2, &[&[0x00, 0x01, 0x00, 0x01, 0xFF]]),
            InvalidUtf8,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 MQTT-3.10.3-2",
            "UNSUBSCRIBE without a topic filter",
            V3_1_1,
            vec![0xA2, 0x02, 0x00, 0x01],
            NoTopicFilters,
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 MQTT-3.10.3-2",
            "UNSUBSCRIBE without a topic filter",
            V5,
            vec![0xA2, 0x03, 0x00, 0x01, 0x00],
            NoTopicFilters,
            R::ProtocolError,
            Close,
        ),
        row(
            "3.1.1 3.11.1",
            "UNSUBACK remaining length 3",
            V3_1_1,
            vec![0xB0, 0x03, 0x00, 0x01, 0x00],
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.11.3-2",
            "UNSUBACK reason code 0x02 is not an Unsubscribe Reason Code",
            V5,
            vec![0xB0, 0x04, 0x00, 0x01, 0x00, 0x02],
            InvalidReasonCode { packet_type: T::UnsubAck, code: 0x02 },
            R::MalformedPacket,
            Close,
        ),
        // 3.12 PINGREQ, 3.13 PINGRESP, 3.14 DISCONNECT: no payload in 3.x.
        row(
            "3.1.1 3.12.1",
            "PINGREQ with a body",
            V3_1_1,
            vec![0xC0, 0x01, 0x00],
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 3.13.1",
            "PINGRESP with a body",
            V5,
            vec![0xD0, 0x01, 0x00],
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "3.1.1 3.14.1",
            "DISCONNECT with a body (no reason code before MQTT 5)",
            V3_1_1,
            vec![0xE0, 0x01, 0x00],
            LengthMismatch,
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 MQTT-3.14.2-1",
            "DISCONNECT reason code 0x01 is not a Disconnect Reason Code",
            V5,
            vec![0xE0, 0x01, 0x01],
            InvalidReasonCode { packet_type: T::Disconnect, code: 0x01 },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 3.14.2.2.2",
            "DISCONNECT session expiry interval twice",
            V5,
            frame(0xE0, &[&[0x00], &props(&[&[0x11, 0, 0, 0, 1], &[0x11, 0, 0, 0, 1]])]),
            DuplicateProperty(0x11),
            R::ProtocolError,
            Close,
        ),
        // 3.15 AUTH.
        row(
            "5.0 MQTT-3.15.2-1",
            "AUTH reason code 0x87 is not an Authenticate Reason Code",
            V5,
            frame(0xF0, &[&[0x87], &props(&[&[0x15, 0x00, 0x01], b"m"])]),
            InvalidReasonCode { packet_type: T::Auth, code: 0x87 },
            R::MalformedPacket,
            Close,
        ),
        row(
            "5.0 3.15.2.2.2",
            "AUTH continue without an authentication method",
            V5,
            vec![0xF0, 0x02, 0x18, 0x00],
            MissingProperty(0x15),
            R::ProtocolError,
            Close,
        ),
        row(
            "5.0 3.15.2.2.2",
            "AUTH authentication method twice",
            V5,
            frame(0xF0, &[&[0x18], &props(&[&[0x15, 0x00, 0x01], b"m", &[0x15, 0x00, 0x01], b"m"])]),
            DuplicateProperty(0x15),
            R::ProtocolError,
            Close,
        ),
    ]
}

fn all_rows() -> Vec<Row> {
    let mut rows = encoding_rows();
    rows.extend(flag_rows());
    rows.extend(connect_rows());
    rows.extend(publish_rows());
    rows.extend(subscribe_and_control_rows());
    rows
}

#[test]
fn malformed_inputs_are_refused_with_the_right_answer() {
    let mut failures = Vec::new();
    let rows = all_rows();
    for row in &rows {
        let mut buf = BytesMut::from(&row.bytes[..]);
        let label = format!("{} ({:?}) {}: {:02X?}", row.statement, row.version, row.what, row.bytes);
        match decode(&mut buf, row.version, row.max_packet_size_bytes) {
            Err(error) => {
                if error != row.error {
                    failures.push(format!("{label}\n    error {error:?}, expected {:?}", row.error));
                }
                if error.reason_code() != row.reason {
                    failures.push(format!(
                        "{label}\n    reason code {:?}, expected {:?}",
                        error.reason_code(),
                        row.reason
                    ));
                }
                if error.v3_action() != row.v3 {
                    failures.push(format!(
                        "{label}\n    3.x action {:?}, expected {:?}",
                        error.v3_action(),
                        row.v3
                    ));
                }
            }
            Ok(other) => {
                failures.push(format!("{label}\n    decoded as {other:?}, expected {:?}", row.error))
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// Appending more bytes never turns a refused frame into a valid one: the error is a property
/// of the frame, not of where the buffer happens to end.
#[test]
fn errors_do_not_depend_on_trailing_bytes() {
    for row in all_rows() {
        let mut bytes = row.bytes.clone();
        bytes.extend_from_slice(&[0xC0, 0x00, 0xE0, 0x00]);
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode(&mut buf, row.version, row.max_packet_size_bytes),
            Err(row.error.clone()),
            "{} ({:?}) {}",
            row.statement,
            row.version,
            row.what
        );
    }
}

/// "Need more bytes" is never an error, and consumes nothing.
#[test]
fn incomplete_frames_are_ok_none() {
    let rows: &[(&str, ProtocolVersion, &[u8])] = &[
        ("empty buffer", V5, b""),
        ("first byte only", V3_1_1, b"\x30"),
        ("remaining length continues", V5, b"\x30\x80"),
        ("remaining length: three bytes continue, the fourth is missing", V5, b"\x30\xFF\xFF\xFF"),
        ("largest remaining length, body missing", V5, b"\x30\xFF\xFF\xFF\x7F"),
        ("PUBLISH body partly received", V3_1_1, b"\x30\x0A\x00\x03a"),
        ("CONNECT header only", V5, b"\x10\x19"),
        ("CONNECT with its protocol name only", V3_1, b"\x10\x16\x00\x06MQIsdp"),
        // Errors inside the body are found only once the body is complete.
        ("PUBLISH whose topic will contain '#', incomplete", V5, b"\x30\x06\x00\x03a/#"),
        ("CONNECT with an unknown protocol level, incomplete", V3_1_1, b"\x10\x0D\x00\x04MQTT\x06"),
    ];
    for (what, version, bytes) in rows {
        let mut buf = BytesMut::from(*bytes);
        assert_eq!(decode(&mut buf, *version, PACKET_SIZE_MAX_BYTES), Ok(None), "{what}");
        assert_eq!(&buf[..], *bytes, "{what}: bytes were consumed");
    }
    // frame_len agrees: unknown until the remaining length is complete.
    assert_eq!(frame_len(b"\x30\xFF\xFF\xFF", PACKET_SIZE_MAX_BYTES), Ok(None));
    assert_eq!(frame_len(b"\x30\xFF\xFF\xFF\x7F", PACKET_SIZE_MAX_BYTES), Ok(Some(268_435_460)));
}

/// The maximum packet size counts the whole frame, fixed header included: a frame of exactly the
/// maximum is accepted, one byte more is refused (the row above), before the body arrives.
#[test]
fn maximum_packet_size_is_inclusive() {
    let bytes = frame(0x30, &[&[0x00, 0x03], b"a/b", &[0x00], b"xy"]);
    assert_eq!(bytes.len(), 10);
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(matches!(decode(&mut buf, V5, 10), Ok(Some(_))));
    assert_eq!(frame_len(&bytes[..2], 9), Err(PacketTooLarge { size_bytes: 10, max_bytes: 9 }));
    let mut header_only = BytesMut::from(&bytes[..2]);
    assert_eq!(decode(&mut header_only, V5, 9), Err(PacketTooLarge { size_bytes: 10, max_bytes: 9 }));
}

/// The table helpers build what they claim (so a row's bytes are what its comment says).
#[test]
fn frame_helper_encodes_remaining_length_minimally() {
    assert_eq!(frame(0x30, &[&[0u8; 127]])[..2], [0x30, 0x7F]);
    assert_eq!(frame(0x30, &[&[0u8; 128]])[..3], [0x30, 0x80, 0x01]);
    assert_eq!(frame(0x30, &[&[0u8; 16_384]])[..4], [0x30, 0x80, 0x80, 0x01]);
    assert_eq!(props(&[&[0x01, 0x01]]), [0x02, 0x01, 0x01]);
}

// Broker-level: statements that need state from other packets (or the direction of the packet,
// which `decode` is not told). The decoder cannot see these; they are tested in tests/ of the
// broker, against the session and connection state machines.
//
// - MQTT-3.1.0-1 (both): the first packet must be CONNECT.
// - MQTT-3.1.0-2 (both): a second CONNECT is a Protocol Error.
// - 3.1.1 MQTT-3.1.3-8 / 5.0 MQTT-3.1.3-8, and MQTT 3.1's 23-character limit: rejecting a client
//   id (CONNACK 0x02 / 0x85) is a policy decision.
// - 5.0 MQTT-3.1.2-33 / MQTT-3.1.4-6: packets other than AUTH or DISCONNECT before CONNACK when an
//   authentication method was set.
// - 5.0 3.1.2.11.2 / 3.14.2.2.2: a non-zero session expiry in DISCONNECT after a CONNECT with
//   session expiry 0 is a Protocol Error.
// - 5.0 MQTT-3.14.2-2: session expiry in a DISCONNECT sent by the server (direction).
// - 5.0 MQTT-3.3.4-6: subscription identifier in a PUBLISH from a client (direction).
// - 5.0 MQTT-3.3.2-9 / -10 / 3.3.2.3.4: topic alias greater than the topic alias maximum, or an
//   empty topic with an alias that has no mapping yet.
// - 5.0 MQTT-3.3.4-7 / 4.9: more QoS > 0 PUBLISH in flight than the receive maximum (0x93).
// - 5.0 MQTT-3.2.2-11 / -14: PUBLISH above the maximum QoS or with RETAIN when not available
//   (0x9B, 0x9A).
// - 3.1.1 MQTT-2.3.1-2..4 / 5.0 MQTT-2.2.1-3..6: packet identifier in use (0x91) or not found
//   (0x92); a PUBACK/PUBREC/PUBREL/PUBCOMP/SUBACK/UNSUBACK whose id matches nothing.
// - 5.0 MQTT-3.2.2-15 / MQTT-3.1.2-24: maximum packet size negotiated in CONNECT/CONNACK is passed
//   to `decode` by the broker; the decoder enforces whatever it is given (rows above).
// - 5.0 3.15 / 4.12: an AUTH whose method differs from the CONNECT's, or an AUTH when no
//   authentication method was set, or re-authentication before CONNACK.
// - 5.0 3.3.2.3.2 / MQTT-3.3.2-4: payload format indicator 1 with a payload that is not UTF-8 (the
//   receiver MAY check; 0x99): a policy of the broker.
// - 5.0 MQTT-3.3.2-14: wildcards in a response topic; MQTT-4.7.3-x on `$` topics published by
//   clients: a policy of the broker (the codec only checks UTF-8).
// - 5.0 MQTT-3.2.2-4: session present 1 received by a client without session state.
// - 5.0 4.8.2: shared subscriptions when not supported (SUBACK 0x9E), wildcards when not supported
//   (0xA2), subscription identifiers when not supported (0xA1).
// - 3.1.1 MQTT-3.1.2-24 / 5.0 MQTT-3.1.2-24: keep alive expiry (a timer).
// - Topic filter syntax, 3.1.1 and 5.0 MQTT-4.7.1-2 ('#' alone and last), MQTT-4.7.1-3 ('+' alone
//   in its level), 5.0 MQTT-4.8.2-1/-2 (share name non-empty, no wildcard) and a `$share/{name}`
//   without a filter: by design (protocol/src/subscribe.rs) the decoder passes these filters
//   through and the broker checks each one with `topic::validate_topic_filter`, answering SUBACK
//   0x8F (5.0) or 0x80 (3.1.1) for that filter. The table of cases lives beside that function
//   (protocol/src/topic.rs tests); the broker's SUBACK answer is tested in its tests/. Note that
//   3.1.1 section 4.8 reads "a protocol violation MUST close the Network Connection", so a strict
//   3.1.1 reading would close instead: a policy choice recorded here, not an oversight.
