//! Spec-example tables: for each packet type and protocol version, bytes built by hand from the
//! byte layouts of the MQTT 3.1, 3.1.1 and 5.0 specifications, and the packet they mean.
//!
//! Each canonical row is checked both ways: decoding the bytes gives exactly the packet (and
//! consumes exactly the frame), and encoding the packet gives exactly the bytes. A few rows are
//! decode-only: the specifications allow more than one encoding of them (MQTT 5 lets a sender omit
//! a Success reason code and an empty property length, or not), and the encoder always writes the
//! shortest form.
//!
//! Remaining lengths are written out by hand; `remaining_lengths_match_bodies` checks the table
//! itself so that a miscount in a row is reported as such and not as a codec bug.
//!
//! Canonical property order: the encoder writes properties in increasing identifier order (the
//! field order of `Properties`), repeated properties in the order given. The specifications allow
//! any order, so the decode-only rows include one with properties out of order.

use bytes::{Bytes, BytesMut};
use shardmq_protocol::{
    decode, encode, encoded_len, frame_len, Auth, ConnAck, Connect, Disconnect, Packet, Properties,
    ProtocolVersion, PubResp, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, Subscription,
    SubscriptionOptions, UnsubAck, Unsubscribe, UserProperty, Utf8, Will, PACKET_SIZE_MAX_BYTES,
};

use ProtocolVersion::{V3_1, V3_1_1, V5};

/// Whether a row is the encoder's output too, or only something the decoder must accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// bytes -> packet and packet -> bytes.
    Both,
    /// bytes -> packet only: an equivalent but not shortest encoding.
    DecodeOnly,
}
use Direction::{Both, DecodeOnly};

struct Example {
    name: &'static str,
    version: ProtocolVersion,
    bytes: Vec<u8>,
    packet: Packet,
    direction: Direction,
}

fn s(text: &'static str) -> Utf8 {
    Utf8::from_static(text)
}

fn b(data: &'static [u8]) -> Bytes {
    Bytes::from_static(data)
}

/// Concatenates byte strings: the rows spell out each field separately, as the spec figures do.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn row(name: &'static str, version: ProtocolVersion, bytes: Vec<u8>, packet: Packet) -> Example {
    Example { name, version, bytes, packet, direction: Both }
}

fn decode_only(name: &'static str, version: ProtocolVersion, bytes: Vec<u8>, packet: Packet) -> Example {
    Example { name, version, bytes, packet, direction: DecodeOnly }
}

fn publish(qos: QoS, packet_id: Option<u16>, topic: &'static str, payload: Bytes) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: s(topic),
        packet_id,
        properties: Properties::default(),
        payload,
    }
}

fn sub(filter: &'static str, qos: QoS) -> Subscription {
    Subscription { filter: s(filter), options: SubscriptionOptions { qos, ..Default::default() } }
}

fn user(name: &'static str, value: &'static str) -> UserProperty {
    UserProperty { name: s(name), value: s(value) }
}

/// A QoS 0 PUBLISH to `a/b` whose remaining length is exactly `remaining`, for the remaining
/// length examples of 2.2.3 (3.1.1) / 2.1.4 (5.0).
fn publish_with_remaining(
    version: ProtocolVersion,
    remaining: usize,
    length_bytes: &[u8],
) -> (Vec<u8>, Packet) {
    let header = if version.is_v5() { 6 } else { 5 }; // topic (2 + 3) and, in 5.0, property length 0
    let payload = vec![b'x'; remaining - header];
    let mut bytes = cat(&[&[0x30], length_bytes, &[0x00, 0x03], b"a/b"]);
    if version.is_v5() {
        bytes.push(0x00);
    }
    bytes.extend_from_slice(&payload);
    (bytes, Packet::Publish(publish(QoS::AtMostOnce, None, "a/b", Bytes::from(payload))))
}

fn v3_examples(version: ProtocolVersion) -> Vec<Example> {
    let mut rows = vec![
        // CONNACK: acknowledge flags, then return code (3.2.2). 3.1 has no session present flag
        // but the byte is there (reserved).
        row("connack accepted", version, vec![0x20, 0x02, 0x00, 0x00], connack(false, ReasonCode::Success)),
        row(
            "connack refused: identifier rejected (2)",
            version,
            vec![0x20, 0x02, 0x00, 0x02],
            connack(false, ReasonCode::ClientIdentifierNotValid),
        ),
        row(
            "connack refused: bad user name or password (4)",
            version,
            vec![0x20, 0x02, 0x00, 0x04],
            connack(false, ReasonCode::BadUserNameOrPassword),
        ),
        row(
            "connack refused: not authorised (5)",
            version,
            vec![0x20, 0x02, 0x00, 0x05],
            connack(false, ReasonCode::NotAuthorized),
        ),
        // PUBLISH QoS 0: no packet identifier (3.3.2.2).
        row(
            "publish qos 0",
            version,
            cat(&[&[0x30, 0x0A, 0x00, 0x03], b"a/b", b"hello"]),
            Packet::Publish(publish(QoS::AtMostOnce, None, "a/b", b(b"hello"))),
        ),
        // PUBLISH QoS 1 with DUP and RETAIN: 0x3B = type 3, DUP 1, QoS 01, RETAIN 1.
        row(
            "publish qos 1 dup retain",
            version,
            cat(&[&[0x3B, 0x0C, 0x00, 0x03], b"a/b", &[0x00, 0x0A], b"hello"]),
            Packet::Publish(Publish {
                dup: true,
                retain: true,
                ..publish(QoS::AtLeastOnce, Some(10), "a/b", b(b"hello"))
            }),
        ),
        row(
            "publish qos 2",
            version,
            cat(&[&[0x34, 0x0C, 0x00, 0x03], b"a/b", &[0x12, 0x34], b"hello"]),
            Packet::Publish(publish(QoS::ExactlyOnce, Some(0x1234), "a/b", b(b"hello"))),
        ),
        // A zero-length payload is valid (3.3.3), here with RETAIN: the way to clear a retained message.
        row(
            "publish qos 0 retain empty payload",
            version,
            cat(&[&[0x31, 0x05, 0x00, 0x03], b"a/b"]),
            Packet::Publish(Publish { retain: true, ..publish(QoS::AtMostOnce, None, "a/b", Bytes::new()) }),
        ),
        row(
            "publish to a $SYS topic with multi-byte characters",
            version,
            cat(&[&[0x30, 0x0C, 0x00, 0x0A], b"$SYS/caf\xC3\xA9"]),
            Packet::Publish(publish(QoS::AtMostOnce, None, "$SYS/caf\u{e9}", Bytes::new())),
        ),
        // PUBACK / PUBREC / PUBREL / PUBCOMP: packet id only (3.4-3.7); PUBREL flags are 0010.
        row("puback", version, vec![0x40, 0x02, 0x00, 0x0A], Packet::PubAck(PubResp::new(10))),
        row("pubrec", version, vec![0x50, 0x02, 0x00, 0x0A], Packet::PubRec(PubResp::new(10))),
        row("pubrel", version, vec![0x62, 0x02, 0x00, 0x0A], Packet::PubRel(PubResp::new(10))),
        row("pubcomp", version, vec![0x70, 0x02, 0xFF, 0xFF], Packet::PubComp(PubResp::new(0xFFFF))),
        // SUBSCRIBE: the payload example of 3.8.3 ("a/b" QoS 1, "c/d" QoS 2); flags 0010.
        row(
            "subscribe spec payload example",
            version,
            cat(&[&[0x82, 0x0E, 0x00, 0x0A, 0x00, 0x03], b"a/b", &[0x01, 0x00, 0x03], b"c/d", &[0x02]]),
            Packet::Subscribe(Subscribe {
                packet_id: 10,
                properties: Properties::default(),
                subscriptions: vec![sub("a/b", QoS::AtLeastOnce), sub("c/d", QoS::ExactlyOnce)],
            }),
        ),
        row(
            "subscribe wildcards qos 0",
            version,
            cat(&[&[0x82, 0x0C, 0x00, 0x01, 0x00, 0x07], b"sport/#", &[0x00]]),
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                properties: Properties::default(),
                subscriptions: vec![sub("sport/#", QoS::AtMostOnce)],
            }),
        ),
        // SUBACK: the return codes of 3.9.3 (granted 0, 1, 2, failure 0x80).
        row(
            "suback all return codes",
            version,
            vec![0x90, 0x06, 0x00, 0x0A, 0x00, 0x01, 0x02, 0x80],
            Packet::SubAck(SubAck {
                packet_id: 10,
                properties: Properties::default(),
                reasons: vec![
                    ReasonCode::GrantedQoS0,
                    ReasonCode::GrantedQoS1,
                    ReasonCode::GrantedQoS2,
                    ReasonCode::UnspecifiedError,
                ],
            }),
        ),
        // UNSUBSCRIBE: the payload example of 3.10.3; flags 0010.
        row(
            "unsubscribe spec payload example",
            version,
            cat(&[&[0xA2, 0x0C, 0x00, 0x0A, 0x00, 0x03], b"a/b", &[0x00, 0x03], b"c/d"]),
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 10,
                properties: Properties::default(),
                filters: vec![s("a/b"), s("c/d")],
            }),
        ),
        // UNSUBACK: packet id only, no payload in 3.x.
        row(
            "unsuback",
            version,
            vec![0xB0, 0x02, 0x00, 0x0A],
            Packet::UnsubAck(UnsubAck { packet_id: 10, properties: Properties::default(), reasons: vec![] }),
        ),
        row("pingreq", version, vec![0xC0, 0x00], Packet::PingReq),
        row("pingresp", version, vec![0xD0, 0x00], Packet::PingResp),
        row(
            "disconnect",
            version,
            vec![0xE0, 0x00],
            Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
        ),
    ];
    // Remaining length encodings, 2.2.3 (3.1.1): 127 is one byte, 128 two, 16,383 two, 16,384 three.
    for (name, remaining, length_bytes) in [
        ("remaining length 127 (0x7F)", 127, &[0x7F][..]),
        ("remaining length 128 (0x80 0x01)", 128, &[0x80, 0x01][..]),
        ("remaining length 16383 (0xFF 0x7F)", 16_383, &[0xFF, 0x7F][..]),
        ("remaining length 16384 (0x80 0x80 0x01)", 16_384, &[0x80, 0x80, 0x01][..]),
    ] {
        let (bytes, packet) = publish_with_remaining(version, remaining, length_bytes);
        rows.push(row(name, version, bytes, packet));
    }
    rows
}

fn connack(session_present: bool, reason: ReasonCode) -> Packet {
    Packet::ConnAck(ConnAck { session_present, reason, properties: Properties::default() })
}

fn v3_1_1_examples() -> Vec<Example> {
    let mut rows = vec![
        // The variable header example of 3.1.2.10: "MQTT", level 4, flags 0xCE (user name,
        // password, will QoS 1, will flag, clean session), keep alive 10; then the payload fields
        // in the order of 3.1.3: client id, will topic, will message, user name, password.
        row(
            "connect spec variable header example",
            V3_1_1,
            cat(&[
                &[0x10, 0x2A],
                &[0x00, 0x04],
                b"MQTT",
                &[0x04, 0xCE, 0x00, 0x0A],
                &[0x00, 0x07],
                b"shardmq",
                &[0x00, 0x06],
                b"will/t",
                &[0x00, 0x03],
                b"bye",
                &[0x00, 0x04],
                b"user",
                &[0x00, 0x02],
                b"pw",
            ]),
            Packet::Connect(Box::new(Connect {
                protocol: V3_1_1,
                clean_start: true,
                keep_alive: 10,
                properties: Properties::default(),
                client_id: s("shardmq"),
                will: Some(Will {
                    topic: s("will/t"),
                    payload: b(b"bye"),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: Properties::default(),
                }),
                username: Some(s("user")),
                password: Some(b(b"pw")),
            })),
        ),
        // The smallest CONNECT: clean session, empty client id (allowed with clean session, 3.1.3.1).
        row(
            "connect minimal, empty client id",
            V3_1_1,
            cat(&[&[0x10, 0x0C, 0x00, 0x04], b"MQTT", &[0x04, 0x02, 0x00, 0x3C, 0x00, 0x00]]),
            Packet::Connect(Box::new(Connect {
                protocol: V3_1_1,
                clean_start: true,
                keep_alive: 60,
                properties: Properties::default(),
                client_id: s(""),
                will: None,
                username: None,
                password: None,
            })),
        ),
        // Will retain + will QoS 2 + will flag (0x34), persistent session, keep alive 0, empty will
        // message.
        row(
            "connect will qos 2 retain, no clean session",
            V3_1_1,
            cat(&[
                &[0x10, 0x12, 0x00, 0x04],
                b"MQTT",
                &[0x04, 0x34, 0x00, 0x00],
                &[0x00, 0x01],
                b"c",
                &[0x00, 0x01],
                b"t",
                &[0x00, 0x00],
            ]),
            Packet::Connect(Box::new(Connect {
                protocol: V3_1_1,
                clean_start: false,
                keep_alive: 0,
                properties: Properties::default(),
                client_id: s("c"),
                will: Some(Will {
                    topic: s("t"),
                    payload: Bytes::new(),
                    qos: QoS::ExactlyOnce,
                    retain: true,
                    properties: Properties::default(),
                }),
                username: None,
                password: None,
            })),
        ),
        // User name without password (0x80) is allowed; binary password bytes are not UTF-8.
        row(
            "connect user name and binary password",
            V3_1_1,
            cat(&[
                &[0x10, 0x14, 0x00, 0x04],
                b"MQTT",
                &[0x04, 0xC2, 0x00, 0x3C],
                &[0x00, 0x01],
                b"c",
                &[0x00, 0x01],
                b"u",
                &[0x00, 0x02, 0xFF, 0x00],
            ]),
            Packet::Connect(Box::new(Connect {
                protocol: V3_1_1,
                clean_start: true,
                keep_alive: 60,
                properties: Properties::default(),
                client_id: s("c"),
                will: None,
                username: Some(s("u")),
                password: Some(b(&[0xFF, 0x00])),
            })),
        ),
        row(
            "connack session present",
            V3_1_1,
            vec![0x20, 0x02, 0x01, 0x00],
            connack(true, ReasonCode::Success),
        ),
        row(
            "connack refused: unacceptable protocol version (1)",
            V3_1_1,
            vec![0x20, 0x02, 0x00, 0x01],
            connack(false, ReasonCode::UnsupportedProtocolVersion),
        ),
        row(
            "connack refused: server unavailable (3)",
            V3_1_1,
            vec![0x20, 0x02, 0x00, 0x03],
            connack(false, ReasonCode::ServerUnavailable),
        ),
    ];
    rows.extend(v3_examples(V3_1_1));
    rows
}

fn v3_1_examples() -> Vec<Example> {
    let mut rows = vec![
        // MQTT 3.1: protocol name "MQIsdp", version 3; flags 0xC2 (user name, password, clean).
        row(
            "connect MQIsdp user name and password",
            V3_1,
            cat(&[
                &[0x10, 0x16, 0x00, 0x06],
                b"MQIsdp",
                &[0x03, 0xC2, 0x00, 0x3C],
                &[0x00, 0x02],
                b"c1",
                &[0x00, 0x01],
                b"u",
                &[0x00, 0x01],
                b"p",
            ]),
            Packet::Connect(Box::new(Connect {
                protocol: V3_1,
                clean_start: true,
                keep_alive: 60,
                properties: Properties::default(),
                client_id: s("c1"),
                will: None,
                username: Some(s("u")),
                password: Some(b(b"p")),
            })),
        ),
        // Will retain + will QoS 1 + will flag + clean session: 0x2E.
        row(
            "connect MQIsdp with will",
            V3_1,
            cat(&[
                &[0x10, 0x16, 0x00, 0x06],
                b"MQIsdp",
                &[0x03, 0x2E, 0x00, 0x0A],
                &[0x00, 0x02],
                b"c1",
                &[0x00, 0x01],
                b"w",
                &[0x00, 0x01],
                b"x",
            ]),
            Packet::Connect(Box::new(Connect {
                protocol: V3_1,
                clean_start: true,
                keep_alive: 10,
                properties: Properties::default(),
                client_id: s("c1"),
                will: Some(Will {
                    topic: s("w"),
                    payload: b(b"x"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    properties: Properties::default(),
                }),
                username: None,
                password: None,
            })),
        ),
    ];
    rows.extend(v3_examples(V3_1));
    rows
}

fn v5_examples() -> Vec<Example> {
    let (bytes_127, publish_127) = publish_with_remaining(V5, 127, &[0x7F]);
    let (bytes_128, publish_128) = publish_with_remaining(V5, 128, &[0x80, 0x01]);
    vec![
        // The variable header example of 3.1.2.11 (5.0): "MQTT", level 5, flags 0xC2 (user name,
        // password, clean start), keep alive 10, properties length 5, session expiry interval 10.
        row(
            "connect spec variable header example",
            V5,
            cat(&[
                &[0x10, 0x19, 0x00, 0x04],
                b"MQTT",
                &[0x05, 0xC2, 0x00, 0x0A],
                &[0x05, 0x11, 0x00, 0x00, 0x00, 0x0A],
                &[0x00, 0x01],
                b"c",
                &[0x00, 0x01],
                b"u",
                &[0x00, 0x01],
                b"p",
            ]),
            Packet::Connect(Box::new(Connect {
                protocol: V5,
                clean_start: true,
                keep_alive: 10,
                properties: Properties { session_expiry_interval: Some(10), ..Default::default() },
                client_id: s("c"),
                will: None,
                username: Some(s("u")),
                password: Some(b(b"p")),
            })),
        ),
        // Every CONNECT property (3.1.2.11) and every will property (3.1.3.2), in identifier order.
        // Flags 0xEE: user name, password, will retain, will QoS 1, will flag, clean start.
        row(
            "connect all properties and will properties",
            V5,
            cat(&[
                &[0x10, 0x6E, 0x00, 0x04],
                b"MQTT",
                &[0x05, 0xEE, 0x00, 0x3C],
                &[0x24],                         // properties length 36
                &[0x11, 0x00, 0x00, 0x0E, 0x10], // session expiry interval 3600
                &[0x15, 0x00, 0x01],             // authentication method "m"
                b"m",
                &[0x16, 0x00, 0x02, 0x01, 0x02], // authentication data 01 02
                &[0x17, 0x00],                   // request problem information 0
                &[0x19, 0x01],                   // request response information 1
                &[0x21, 0x00, 0x14],             // receive maximum 20
                &[0x22, 0x00, 0x0A],             // topic alias maximum 10
                &[0x26, 0x00, 0x01],             // user property k=v
                b"k",
                &[0x00, 0x01],
                b"v",
                &[0x27, 0x00, 0x00, 0x10, 0x00], // maximum packet size 4096
                &[0x00, 0x02],
                b"c1",
                &[0x25],                         // will properties length 37
                &[0x01, 0x01],                   // payload format indicator 1
                &[0x02, 0x00, 0x00, 0x00, 0x3C], // message expiry interval 60
                &[0x03, 0x00, 0x04],             // content type "text"
                b"text",
                &[0x08, 0x00, 0x03], // response topic "r/t"
                b"r/t",
                &[0x09, 0x00, 0x02, 0xAB, 0xCD], // correlation data AB CD
                &[0x18, 0x00, 0x00, 0x00, 0x05], // will delay interval 5
                &[0x26, 0x00, 0x01],             // user property a=b
                b"a",
                &[0x00, 0x01],
                b"b",
                &[0x00, 0x04],
                b"will",
                &[0x00, 0x03],
                b"bye",
                &[0x00, 0x04],
                b"user",
                &[0x00, 0x02],
                b"pw",
            ]),
            Packet::Connect(Box::new(Connect {
                protocol: V5,
                clean_start: true,
                keep_alive: 60,
                properties: Properties {
                    session_expiry_interval: Some(3600),
                    authentication_method: Some(s("m")),
                    authentication_data: Some(b(&[0x01, 0x02])),
                    request_problem_information: Some(0),
                    request_response_information: Some(1),
                    receive_maximum: Some(20),
                    topic_alias_maximum: Some(10),
                    user_properties: vec![user("k", "v")],
                    maximum_packet_size: Some(4096),
                    ..Default::default()
                },
                client_id: s("c1"),
                will: Some(Will {
                    topic: s("will"),
                    payload: b(b"bye"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    properties: Properties {
                        payload_format_indicator: Some(1),
                        message_expiry_interval: Some(60),
                        content_type: Some(s("text")),
                        response_topic: Some(s("r/t")),
                        correlation_data: Some(b(&[0xAB, 0xCD])),
                        will_delay_interval: Some(5),
                        user_properties: vec![user("a", "b")],
                        ..Default::default()
                    },
                }),
                username: Some(s("user")),
                password: Some(b(b"pw")),
            })),
        ),
        // 5.0 allows a password without a user name (3.1.2.9), unlike 3.1.1.
        row(
            "connect password without user name",
            V5,
            cat(&[
                &[0x10, 0x11, 0x00, 0x04],
                b"MQTT",
                &[0x05, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01],
                b"c",
                &[0x00, 0x01],
                b"p",
            ]),
            Packet::Connect(Box::new(Connect {
                protocol: V5,
                clean_start: false,
                keep_alive: 0,
                properties: Properties::default(),
                client_id: s("c"),
                will: None,
                username: None,
                password: Some(b(b"p")),
            })),
        ),
        row(
            "connack success no properties",
            V5,
            vec![0x20, 0x03, 0x00, 0x00, 0x00],
            connack(false, ReasonCode::Success),
        ),
        row(
            "connack not authorized",
            V5,
            vec![0x20, 0x03, 0x00, 0x87, 0x00],
            connack(false, ReasonCode::NotAuthorized),
        ),
        // CONNACK properties of 3.2.2.3, in identifier order.
        row(
            "connack session present with properties",
            V5,
            cat(&[
                &[0x20, 0x31, 0x01, 0x00, 0x2E],
                &[0x11, 0x00, 0x00, 0x00, 0x78], // session expiry interval 120
                &[0x12, 0x00, 0x04],             // assigned client identifier "auto"
                b"auto",
                &[0x13, 0x00, 0x1E], // server keep alive 30
                &[0x1A, 0x00, 0x02], // response information "ri"
                b"ri",
                &[0x1F, 0x00, 0x02], // reason string "ok"
                b"ok",
                &[0x21, 0x00, 0x0A],             // receive maximum 10
                &[0x22, 0x00, 0x05],             // topic alias maximum 5
                &[0x24, 0x01],                   // maximum QoS 1
                &[0x25, 0x00],                   // retain available 0
                &[0x27, 0x00, 0x01, 0x00, 0x00], // maximum packet size 65536
                &[0x28, 0x01],                   // wildcard subscription available 1
                &[0x29, 0x00],                   // subscription identifiers available 0
                &[0x2A, 0x01],                   // shared subscription available 1
            ]),
            Packet::ConnAck(ConnAck {
                session_present: true,
                reason: ReasonCode::Success,
                properties: Properties {
                    session_expiry_interval: Some(120),
                    assigned_client_identifier: Some(s("auto")),
                    server_keep_alive: Some(30),
                    response_information: Some(s("ri")),
                    reason_string: Some(s("ok")),
                    receive_maximum: Some(10),
                    topic_alias_maximum: Some(5),
                    maximum_qos: Some(1),
                    retain_available: Some(0),
                    maximum_packet_size: Some(65_536),
                    wildcard_subscription_available: Some(1),
                    subscription_identifier_available: Some(0),
                    shared_subscription_available: Some(1),
                    ..Default::default()
                },
            }),
        ),
        row(
            "connack use another server with server reference",
            V5,
            cat(&[&[0x20, 0x10, 0x00, 0x9C, 0x0D, 0x1C, 0x00, 0x0A], b"other:1883"]),
            Packet::ConnAck(ConnAck {
                session_present: false,
                reason: ReasonCode::UseAnotherServer,
                properties: Properties { server_reference: Some(s("other:1883")), ..Default::default() },
            }),
        ),
        // The last step of enhanced authentication (4.12): success with method and data.
        row(
            "connack auth method and data",
            V5,
            cat(&[&[0x20, 0x0D, 0x00, 0x00, 0x0A, 0x15, 0x00, 0x02], b"sc", &[0x16, 0x00, 0x02, 0x01, 0x02]]),
            Packet::ConnAck(ConnAck {
                session_present: false,
                reason: ReasonCode::Success,
                properties: Properties {
                    authentication_method: Some(s("sc")),
                    authentication_data: Some(b(&[0x01, 0x02])),
                    ..Default::default()
                },
            }),
        ),
        // PUBLISH: topic, [packet id], property length, properties, payload (3.3.2).
        row(
            "publish qos 0 no properties",
            V5,
            cat(&[&[0x30, 0x0B, 0x00, 0x03], b"a/b", &[0x00], b"hello"]),
            Packet::Publish(publish(QoS::AtMostOnce, None, "a/b", b(b"hello"))),
        ),
        row(
            "publish qos 1 every publish property",
            V5,
            cat(&[
                &[0x32, 0x35, 0x00, 0x03],
                b"a/b",
                &[0x00, 0x0A],
                &[0x28],                         // properties length 40
                &[0x01, 0x01],                   // payload format indicator 1
                &[0x02, 0x00, 0x00, 0x00, 0x3C], // message expiry interval 60
                &[0x03, 0x00, 0x04],             // content type "json"
                b"json",
                &[0x08, 0x00, 0x03], // response topic "r/t"
                b"r/t",
                &[0x09, 0x00, 0x02, 0x01, 0x02], // correlation data 01 02
                &[0x0B, 0x05],                   // subscription identifier 5
                &[0x0B, 0x80, 0x01],             // subscription identifier 128 (two-byte varint)
                &[0x23, 0x00, 0x07],             // topic alias 7
                &[0x26, 0x00, 0x01],             // user property k=v
                b"k",
                &[0x00, 0x01],
                b"v",
                b"hello",
            ]),
            Packet::Publish(Publish {
                properties: Properties {
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(60),
                    content_type: Some(s("json")),
                    response_topic: Some(s("r/t")),
                    correlation_data: Some(b(&[0x01, 0x02])),
                    subscription_identifiers: vec![5, 128],
                    topic_alias: Some(7),
                    user_properties: vec![user("k", "v")],
                    ..Default::default()
                },
                ..publish(QoS::AtLeastOnce, Some(10), "a/b", b(b"hello"))
            }),
        ),
        // A zero-length topic name is allowed when a topic alias is present (3.3.2.3.4).
        row(
            "publish empty topic with topic alias",
            V5,
            cat(&[&[0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01], b"x"]),
            Packet::Publish(Publish {
                properties: Properties { topic_alias: Some(1), ..Default::default() },
                ..publish(QoS::AtMostOnce, None, "", b(b"x"))
            }),
        ),
        row(
            "publish qos 2 dup, user properties keep order and may repeat",
            V5,
            cat(&[
                &[0x3C, 0x15, 0x00, 0x01],
                b"t",
                &[0x00, 0x02, 0x0E],
                &[0x26, 0x00, 0x01],
                b"k",
                &[0x00, 0x01],
                b"2",
                &[0x26, 0x00, 0x01],
                b"k",
                &[0x00, 0x01],
                b"1",
                b"p",
            ]),
            Packet::Publish(Publish {
                dup: true,
                properties: Properties {
                    user_properties: vec![user("k", "2"), user("k", "1")],
                    ..Default::default()
                },
                ..publish(QoS::ExactlyOnce, Some(2), "t", b(b"p"))
            }),
        ),
        row("remaining length 127 (0x7F)", V5, bytes_127, publish_127),
        row("remaining length 128 (0x80 0x01)", V5, bytes_128, publish_128),
        // PUBACK family (3.4.2): the short form (remaining length 2) means Success, no properties.
        row("puback short form", V5, vec![0x40, 0x02, 0x00, 0x0A], Packet::PubAck(PubResp::new(10))),
        row(
            "puback reason code without properties",
            V5,
            vec![0x40, 0x03, 0x00, 0x0A, 0x10],
            Packet::PubAck(PubResp { reason: ReasonCode::NoMatchingSubscribers, ..PubResp::new(10) }),
        ),
        row(
            "puback not authorized with reason string",
            V5,
            cat(&[&[0x40, 0x0D, 0x00, 0x0A, 0x87, 0x09, 0x1F, 0x00, 0x06], b"denied"]),
            Packet::PubAck(PubResp {
                reason: ReasonCode::NotAuthorized,
                properties: Properties { reason_string: Some(s("denied")), ..Default::default() },
                ..PubResp::new(10)
            }),
        ),
        decode_only(
            "puback success with explicit reason code",
            V5,
            vec![0x40, 0x03, 0x00, 0x0A, 0x00],
            Packet::PubAck(PubResp::new(10)),
        ),
        decode_only(
            "puback success with explicit empty properties",
            V5,
            vec![0x40, 0x04, 0x00, 0x0A, 0x00, 0x00],
            Packet::PubAck(PubResp::new(10)),
        ),
        row(
            "pubrec packet identifier in use",
            V5,
            vec![0x50, 0x03, 0x00, 0x0B, 0x91],
            Packet::PubRec(PubResp { reason: ReasonCode::PacketIdentifierInUse, ..PubResp::new(11) }),
        ),
        row(
            "pubrel packet identifier not found",
            V5,
            vec![0x62, 0x03, 0x00, 0x0C, 0x92],
            Packet::PubRel(PubResp { reason: ReasonCode::PacketIdentifierNotFound, ..PubResp::new(12) }),
        ),
        row("pubcomp short form", V5, vec![0x70, 0x02, 0x00, 0x0D], Packet::PubComp(PubResp::new(13))),
        row(
            "pubcomp with user property",
            V5,
            cat(&[&[0x70, 0x0B, 0x00, 0x0D, 0x00, 0x07, 0x26, 0x00, 0x01], b"k", &[0x00, 0x01], b"v"]),
            Packet::PubComp(PubResp {
                properties: Properties { user_properties: vec![user("k", "v")], ..Default::default() },
                ..PubResp::new(13)
            }),
        ),
        // SUBSCRIBE (3.8.2, 3.8.3.1): subscription identifier 42; options bytes 0x2D (QoS 1,
        // no local, retain as published, retain handling 2), 0x02 (QoS 2) on a shared filter, 0x10
        // (retain handling 1).
        row(
            "subscribe with options and subscription identifier",
            V5,
            cat(&[
                &[0x82, 0x1E, 0x00, 0x0A, 0x02, 0x0B, 0x2A],
                &[0x00, 0x03],
                b"a/b",
                &[0x2D],
                &[0x00, 0x0C],
                b"$share/g/c/#",
                &[0x02],
                &[0x00, 0x01],
                b"d",
                &[0x10],
            ]),
            Packet::Subscribe(Subscribe {
                packet_id: 10,
                properties: Properties { subscription_identifiers: vec![42], ..Default::default() },
                subscriptions: vec![
                    Subscription {
                        filter: s("a/b"),
                        options: SubscriptionOptions {
                            qos: QoS::AtLeastOnce,
                            no_local: true,
                            retain_as_published: true,
                            retain_handling: RetainHandling::DoNotSend,
                        },
                    },
                    sub("$share/g/c/#", QoS::ExactlyOnce),
                    Subscription {
                        filter: s("d"),
                        options: SubscriptionOptions {
                            retain_handling: RetainHandling::SendIfNew,
                            ..Default::default()
                        },
                    },
                ],
            }),
        ),
        // SUBACK reason codes of 3.9.3 with a reason string.
        row(
            "suback reason codes and reason string",
            V5,
            cat(&[
                &[0x90, 0x10, 0x00, 0x0A, 0x05, 0x1F, 0x00, 0x02],
                b"ok",
                &[0x00, 0x01, 0x02, 0x80, 0x8F, 0x9E, 0xA1, 0xA2],
            ]),
            Packet::SubAck(SubAck {
                packet_id: 10,
                properties: Properties { reason_string: Some(s("ok")), ..Default::default() },
                reasons: vec![
                    ReasonCode::GrantedQoS0,
                    ReasonCode::GrantedQoS1,
                    ReasonCode::GrantedQoS2,
                    ReasonCode::UnspecifiedError,
                    ReasonCode::TopicFilterInvalid,
                    ReasonCode::SharedSubscriptionsNotSupported,
                    ReasonCode::SubscriptionIdentifiersNotSupported,
                    ReasonCode::WildcardSubscriptionsNotSupported,
                ],
            }),
        ),
        row(
            "unsubscribe two filters",
            V5,
            cat(&[&[0xA2, 0x0D, 0x00, 0x0A, 0x00, 0x00, 0x03], b"a/b", &[0x00, 0x03], b"c/+"]),
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 10,
                properties: Properties::default(),
                filters: vec![s("a/b"), s("c/+")],
            }),
        ),
        row(
            "unsuback reason codes",
            V5,
            vec![0xB0, 0x05, 0x00, 0x0A, 0x00, 0x11, 0x87],
            Packet::UnsubAck(UnsubAck {
                packet_id: 10,
                properties: Properties::default(),
                reasons: vec![ReasonCode::NoSubscriptionExisted, ReasonCode::NotAuthorized],
            }),
        ),
        // DISCONNECT (3.14.2): remaining length 0 means normal disconnection.
        row(
            "disconnect short form",
            V5,
            vec![0xE0, 0x00],
            Packet::Disconnect(Disconnect::new(ReasonCode::NormalDisconnection)),
        ),
        row(
            "disconnect with will message, no properties",
            V5,
            vec![0xE0, 0x01, 0x04],
            Packet::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWillMessage)),
        ),
        row(
            "disconnect use another server with properties",
            V5,
            cat(&[
                &[0xE0, 0x0B, 0x9C, 0x09],
                &[0x1C, 0x00, 0x01], // server reference "x"
                b"x",
                &[0x1F, 0x00, 0x02], // reason string "go"
                b"go",
            ]),
            Packet::Disconnect(Disconnect {
                reason: ReasonCode::UseAnotherServer,
                properties: Properties {
                    server_reference: Some(s("x")),
                    reason_string: Some(s("go")),
                    ..Default::default()
                },
            }),
        ),
        // A client's DISCONNECT may update the session expiry interval (3.14.2.2.2).
        row(
            "disconnect with will message and session expiry",
            V5,
            vec![0xE0, 0x07, 0x04, 0x05, 0x11, 0x00, 0x00, 0x00, 0x3C],
            Packet::Disconnect(Disconnect {
                reason: ReasonCode::DisconnectWithWillMessage,
                properties: Properties { session_expiry_interval: Some(60), ..Default::default() },
            }),
        ),
        decode_only(
            "disconnect explicit normal reason code",
            V5,
            vec![0xE0, 0x01, 0x00],
            Packet::Disconnect(Disconnect::new(ReasonCode::NormalDisconnection)),
        ),
        decode_only(
            "disconnect explicit normal reason code and empty properties",
            V5,
            vec![0xE0, 0x02, 0x00, 0x00],
            Packet::Disconnect(Disconnect::new(ReasonCode::NormalDisconnection)),
        ),
        decode_only(
            "disconnect properties in non-increasing order",
            V5,
            cat(&[&[0xE0, 0x0B, 0x80, 0x09, 0x1F, 0x00, 0x01], b"r", &[0x11, 0x00, 0x00, 0x00, 0x01]]),
            Packet::Disconnect(Disconnect {
                reason: ReasonCode::UnspecifiedError,
                properties: Properties {
                    session_expiry_interval: Some(1),
                    reason_string: Some(s("r")),
                    ..Default::default()
                },
            }),
        ),
        // AUTH (3.15): remaining length 0 means Success without properties.
        row(
            "auth short form",
            V5,
            vec![0xF0, 0x00],
            Packet::Auth(Auth { reason: ReasonCode::Success, properties: Properties::default() }),
        ),
        row(
            "auth continue authentication",
            V5,
            cat(&[
                &[0xF0, 0x10, 0x18, 0x0E, 0x15, 0x00, 0x05],
                b"SCRAM",
                &[0x16, 0x00, 0x03, 0x01, 0x02, 0x03],
            ]),
            Packet::Auth(Auth {
                reason: ReasonCode::ContinueAuthentication,
                properties: Properties {
                    authentication_method: Some(s("SCRAM")),
                    authentication_data: Some(b(&[0x01, 0x02, 0x03])),
                    ..Default::default()
                },
            }),
        ),
        row(
            "auth re-authenticate",
            V5,
            cat(&[&[0xF0, 0x06, 0x19, 0x04, 0x15, 0x00, 0x01], b"m"]),
            Packet::Auth(Auth {
                reason: ReasonCode::ReAuthenticate,
                properties: Properties { authentication_method: Some(s("m")), ..Default::default() },
            }),
        ),
        row("pingreq", V5, vec![0xC0, 0x00], Packet::PingReq),
        row("pingresp", V5, vec![0xD0, 0x00], Packet::PingResp),
    ]
}

fn all_examples() -> Vec<Example> {
    let mut rows = v3_1_examples();
    rows.extend(v3_1_1_examples());
    rows.extend(v5_examples());
    rows
}

/// Reads the remaining length varint of a row (the table's own arithmetic, not the codec's).
fn declared_frame_len(bytes: &[u8]) -> usize {
    let mut value = 0usize;
    for (i, byte) in bytes[1..].iter().enumerate().take(4) {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return 1 + (i + 1) + value;
        }
    }
    panic!("row has a malformed remaining length");
}

#[test]
fn remaining_lengths_match_bodies() {
    for example in all_examples() {
        assert_eq!(
            declared_frame_len(&example.bytes),
            example.bytes.len(),
            "{:?} {}: the row's remaining length disagrees with its body",
            example.version,
            example.name
        );
    }
}

#[test]
fn bytes_decode_to_the_packet() {
    for example in all_examples() {
        let mut buf = BytesMut::from(&example.bytes[..]);
        let decoded = decode(&mut buf, example.version, PACKET_SIZE_MAX_BYTES);
        assert_eq!(decoded, Ok(Some(example.packet.clone())), "{:?} {}", example.version, example.name);
        assert!(buf.is_empty(), "{:?} {}: {} bytes left over", example.version, example.name, buf.len());
    }
}

#[test]
fn packets_encode_to_the_bytes() {
    for example in all_examples().into_iter().filter(|e| e.direction == Both) {
        let mut buf = BytesMut::new();
        let result = encode(&example.packet, example.version, &mut buf);
        assert_eq!(result, Ok(()), "{:?} {}", example.version, example.name);
        assert_eq!(&buf[..], &example.bytes[..], "{:?} {}", example.version, example.name);
        assert_eq!(
            encoded_len(&example.packet, example.version),
            Ok(example.bytes.len()),
            "{:?} {}: encoded_len",
            example.version,
            example.name
        );
    }
}

/// Encoding appends: it must not clear or overwrite what is already in the buffer.
#[test]
fn encode_appends_to_the_buffer() {
    let examples = all_examples();
    let mut buf = BytesMut::from(&b"prefix"[..]);
    let mut expected = b"prefix".to_vec();
    for example in examples.iter().filter(|e| e.direction == Both) {
        encode(&example.packet, example.version, &mut buf).unwrap();
        expected.extend_from_slice(&example.bytes);
    }
    assert_eq!(&buf[..], &expected[..]);
}

/// Every strict prefix of a valid frame is "need more bytes": `Ok(None)`, nothing consumed
/// (the rows are fed one byte at a time into one buffer, as a socket might deliver them).
#[test]
fn every_prefix_is_incomplete() {
    for example in all_examples() {
        let mut buf = BytesMut::new();
        for (i, byte) in example.bytes.iter().enumerate() {
            assert_eq!(
                decode(&mut buf, example.version, PACKET_SIZE_MAX_BYTES),
                Ok(None),
                "{:?} {}: prefix of {i} bytes",
                example.version,
                example.name
            );
            assert_eq!(buf.len(), i, "{:?} {}: a prefix was consumed", example.version, example.name);
            buf.extend_from_slice(&[*byte]);
        }
        assert_eq!(decode(&mut buf, example.version, PACKET_SIZE_MAX_BYTES), Ok(Some(example.packet)));
    }
}

#[test]
fn frame_len_reads_the_fixed_header_only() {
    for example in all_examples() {
        let len = example.bytes.len();
        assert_eq!(
            frame_len(&example.bytes, PACKET_SIZE_MAX_BYTES),
            Ok(Some(len)),
            "{:?} {}",
            example.version,
            example.name
        );
        // The length is known as soon as the remaining length varint is complete.
        let varint_len = example.bytes[1..].iter().position(|b| b & 0x80 == 0).unwrap() + 1;
        assert_eq!(frame_len(&example.bytes[..1 + varint_len], PACKET_SIZE_MAX_BYTES), Ok(Some(len)));
        assert_eq!(
            frame_len(&example.bytes[..varint_len], PACKET_SIZE_MAX_BYTES),
            Ok(None),
            "{}",
            example.name
        );
    }
}

/// Back-to-back frames in one buffer come out one at a time, in order.
#[test]
fn consecutive_frames_decode_in_order() {
    for version in [V3_1, V3_1_1, V5] {
        let examples: Vec<Example> = all_examples().into_iter().filter(|e| e.version == version).collect();
        let mut buf = BytesMut::new();
        for example in &examples {
            buf.extend_from_slice(&example.bytes);
        }
        for example in &examples {
            assert_eq!(decode(&mut buf, version, PACKET_SIZE_MAX_BYTES), Ok(Some(example.packet.clone())));
        }
        assert!(buf.is_empty());
        assert_eq!(decode(&mut buf, version, PACKET_SIZE_MAX_BYTES), Ok(None));
    }
}

/// A CONNECT is decoded by its own protocol level whatever version the caller passes.
#[test]
fn connect_is_decoded_by_its_own_level() {
    for example in all_examples().into_iter().filter(|e| matches!(e.packet, Packet::Connect(_))) {
        for assumed in [V3_1, V3_1_1, V5] {
            let mut buf = BytesMut::from(&example.bytes[..]);
            assert_eq!(
                decode(&mut buf, assumed, PACKET_SIZE_MAX_BYTES),
                Ok(Some(example.packet.clone())),
                "{} decoded as {assumed:?}",
                example.name
            );
        }
    }
}

/// A decoded PUBLISH's topic and payload point into the frame: no copy.
#[test]
fn publish_topic_and_payload_are_not_copied() {
    for example in all_examples().into_iter().filter(|e| matches!(e.packet, Packet::Publish(_))) {
        let mut buf = BytesMut::from(&example.bytes[..]);
        let frame = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let Ok(Some(Packet::Publish(publish))) = decode(&mut buf, example.version, PACKET_SIZE_MAX_BYTES)
        else {
            panic!("{}: not a PUBLISH", example.name);
        };
        for (what, field) in [("topic", publish.topic.as_bytes().clone()), ("payload", publish.payload)] {
            if !field.is_empty() {
                let start = field.as_ptr() as usize;
                assert!(frame.contains(&start), "{}: {what} was copied", example.name);
            }
        }
    }
}
