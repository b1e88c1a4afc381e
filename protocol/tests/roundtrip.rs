//! Round-trip property tests of the codec, for MQTT 3.1, 3.1.1 and 5.0.
//!
//! Strategies generate valid packets of every kind for each version, using only the fields that
//! version carries and, in MQTT 5, only the properties allowed on that packet (the tables here are
//! written from the specification, section 2.2.2.2 and the per-packet reason code tables, and are
//! deliberately independent of the codec's own tables). Checked:
//! - `decode(encode(p)) == p`, and `encoded_len(p)` is the number of bytes `encode` appended;
//! - a stream of several packets fed in chunks, cut at every position and at random points,
//!   decodes to the same packets, and `Ok(None)` never consumes bytes;
//! - arbitrary bytes, and random mutations of valid encodings, never make the decoder panic.
//!
//! Case counts are kept modest so the file runs in a few seconds in debug builds; raise them with
//! `PROPTEST_CASES` for a longer run.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use shardmq_protocol::{
    decode, encode, encoded_len, frame_len, Auth, ConnAck, Connect, Disconnect, Packet, Properties,
    ProtocolVersion, PubResp, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, Subscription,
    SubscriptionOptions, UnsubAck, Unsubscribe, UserProperty, Utf8, Will,
};

const VERSIONS: [ProtocolVersion; 3] = [ProtocolVersion::V3_1, ProtocolVersion::V3_1_1, ProtocolVersion::V5];
const MAX_PACKET_SIZE_BYTES: u32 = 1 << 20;

// ---- MQTT 5 tables, from the specification -------------------------------------------------------

const CONNECT_PROPS: &[u8] = &[0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27];
const WILL_PROPS: &[u8] = &[0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26];
const CONNACK_PROPS: &[u8] =
    &[0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A];
const PUBLISH_PROPS: &[u8] = &[0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26];
const ACK_PROPS: &[u8] = &[0x1F, 0x26];
const SUBSCRIBE_PROPS: &[u8] = &[0x0B, 0x26];
const UNSUBSCRIBE_PROPS: &[u8] = &[0x26];
const DISCONNECT_PROPS: &[u8] = &[0x11, 0x1C, 0x1F, 0x26];
const AUTH_PROPS: &[u8] = &[0x15, 0x16, 0x1F, 0x26];

const CONNACK_REASONS: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99,
    0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK_REASONS: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_REASONS: &[u8] = &[0x00, 0x92];
const SUBACK_REASONS: &[u8] = &[0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
const UNSUBACK_REASONS: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_REASONS: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96,
    0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_REASONS: &[u8] = &[0x00, 0x18, 0x19];

// ---- leaf strategies -----------------------------------------------------------------------------

fn utf8(text: String) -> Utf8 {
    Utf8::try_from(text).expect("strategies never produce U+0000")
}

/// Any MQTT string: ASCII, multi-byte characters, possibly empty.
fn any_string() -> impl Strategy<Value = Utf8> {
    "[a-zA-Z0-9 /+#$\u{e9}\u{4e2d}\u{1F600}]{0,8}".prop_map(utf8)
}

/// A topic name: non-empty, no wildcards.
fn topic_name() -> impl Strategy<Value = Utf8> {
    "[a-z0-9\u{e9}$]{1,4}(/[a-z0-9\u{1F600}]{0,4}){0,3}".prop_map(utf8)
}

/// A topic filter: any non-empty string (its syntax is the broker's business), sometimes shared.
fn topic_filter() -> impl Strategy<Value = Utf8> {
    prop_oneof![
        "[a-z0-9/+#\u{e9}]{1,10}".prop_map(utf8),
        "[a-z]{1,3}/[a-z/+#]{1,6}".prop_map(|rest| utf8(format!("$share/{rest}"))),
    ]
}

fn binary(len_max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..len_max).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn reason(table: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    proptest::sample::select(table)
        .prop_map(|code| ReasonCode::from_u8(code).expect("table entries are defined"))
}

// ---- properties ----------------------------------------------------------------------------------

/// Raw material for one property: which one (an index into `ids`) and values to draw it from.
type PropertySeed = (usize, u32, Utf8, Utf8, Bytes);

fn property_seed() -> impl Strategy<Value = PropertySeed> {
    (any::<usize>(), any::<u32>(), any_string(), topic_name(), binary(8))
}

/// Sets one property from its seed; a property already set stays as it was (so nothing repeats
/// but user properties, and subscription identifiers where `repeat_sub_id`).
fn apply(props: &mut Properties, id: u8, seed: &PropertySeed, repeat_sub_id: bool) {
    let (_, number, text, topic, data) = seed;
    let number = *number;
    let byte01 = (number % 2) as u8;
    let set_once = |slot: &mut Option<_>, value| {
        if slot.is_none() {
            *slot = Some(value);
        }
    };
    match id {
        0x01 => set_once(&mut props.payload_format_indicator, byte01),
        0x02 => props.message_expiry_interval = props.message_expiry_interval.or(Some(number)),
        0x03 => props.content_type = props.content_type.take().or(Some(text.clone())),
        0x08 => props.response_topic = props.response_topic.take().or(Some(topic.clone())),
        0x09 => props.correlation_data = props.correlation_data.take().or(Some(data.clone())),
        0x0B => {
            if repeat_sub_id || props.subscription_identifiers.is_empty() {
                props.subscription_identifiers.push(number % 268_435_455 + 1);
            }
        }
        0x11 => props.session_expiry_interval = props.session_expiry_interval.or(Some(number)),
        0x12 => {
            props.assigned_client_identifier = props.assigned_client_identifier.take().or(Some(text.clone()))
        }
        0x13 => props.server_keep_alive = props.server_keep_alive.or(Some(number as u16)),
        0x15 => props.authentication_method = props.authentication_method.take().or(Some(text.clone())),
        0x16 => props.authentication_data = props.authentication_data.take().or(Some(data.clone())),
        0x17 => set_once(&mut props.request_problem_information, byte01),
        0x18 => props.will_delay_interval = props.will_delay_interval.or(Some(number)),
        0x19 => set_once(&mut props.request_response_information, byte01),
        0x1A => props.response_information = props.response_information.take().or(Some(text.clone())),
        0x1C => props.server_reference = props.server_reference.take().or(Some(text.clone())),
        0x1F => props.reason_string = props.reason_string.take().or(Some(text.clone())),
        0x21 => props.receive_maximum = props.receive_maximum.or(Some((number % 65_535) as u16 + 1)),
        0x22 => props.topic_alias_maximum = props.topic_alias_maximum.or(Some(number as u16)),
        0x23 => props.topic_alias = props.topic_alias.or(Some((number % 65_535) as u16 + 1)),
        0x24 => set_once(&mut props.maximum_qos, byte01),
        0x25 => set_once(&mut props.retain_available, byte01),
        0x26 => props.user_properties.push(UserProperty { name: text.clone(), value: topic.clone() }),
        0x27 => props.maximum_packet_size = props.maximum_packet_size.or(Some(number.max(1))),
        0x28 => set_once(&mut props.wildcard_subscription_available, byte01),
        0x29 => set_once(&mut props.subscription_identifier_available, byte01),
        0x2A => set_once(&mut props.shared_subscription_available, byte01),
        other => panic!("no property {other:#04x} in the test tables"),
    }
}

/// Properties drawn from `ids` only. Authentication data never comes without a method.
fn properties(ids: &'static [u8]) -> impl Strategy<Value = Properties> {
    let repeat_sub_id = ids == PUBLISH_PROPS;
    vec(property_seed(), 0..5).prop_map(move |seeds| {
        let mut props = Properties::default();
        for seed in &seeds {
            apply(&mut props, ids[seed.0 % ids.len()], seed, repeat_sub_id);
        }
        if props.authentication_data.is_some() && props.authentication_method.is_none() {
            props.authentication_method = Some(Utf8::from_static("method"));
        }
        props
    })
}

/// Properties in MQTT 5, none in 3.x.
fn properties_for(version: ProtocolVersion, ids: &'static [u8]) -> BoxedStrategy<Properties> {
    if version.is_v5() {
        properties(ids).boxed()
    } else {
        Just(Properties::default()).boxed()
    }
}

// ---- packets -------------------------------------------------------------------------------------

fn will(version: ProtocolVersion) -> impl Strategy<Value = Will> {
    (topic_name(), binary(16), qos(), any::<bool>(), properties_for(version, WILL_PROPS)).prop_map(
        |(topic, payload, qos, retain, properties)| Will { topic, payload, qos, retain, properties },
    )
}

fn connect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        any::<bool>(),
        any::<u16>(),
        properties_for(version, CONNECT_PROPS),
        any_string(),
        option::of(will(version)),
        option::of(any_string()),
        option::of(binary(8)),
    )
        .prop_map(move |(clean_start, keep_alive, properties, client_id, will, username, password)| {
            // 3.x has no password without a user name.
            let password = if version.is_v5() || username.is_some() { password } else { None };
            Packet::Connect(Box::new(Connect {
                protocol: version,
                clean_start,
                keep_alive,
                properties,
                client_id,
                will,
                username,
                password,
            }))
        })
}

fn connack(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let reasons: &'static [u8] =
        if version.is_v5() { CONNACK_REASONS } else { &[0x00, 0x84, 0x85, 0x88, 0x86, 0x87] };
    (any::<bool>(), reason(reasons), properties_for(version, CONNACK_PROPS)).prop_map(
        move |(session_present, reason, properties)| {
            // No session on a refusal, and no session-present flag at all in 3.1.
            let session_present =
                session_present && reason == ReasonCode::Success && version != ProtocolVersion::V3_1;
            Packet::ConnAck(ConnAck { session_present, reason, properties })
        },
    )
}

fn publish(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        any::<bool>(),
        packet_id(),
        properties_for(version, PUBLISH_PROPS),
        binary(32),
    )
        .prop_map(|(qos, dup, retain, topic, empty_topic, packet_id, properties, payload)| {
            // An empty topic only with a topic alias (MQTT 5).
            let topic = if empty_topic && properties.topic_alias.is_some() { Utf8::default() } else { topic };
            let qos0 = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !qos0,
                qos,
                retain,
                topic,
                packet_id: if qos0 { None } else { Some(packet_id) },
                properties,
                payload,
            })
        })
}

fn pub_resp(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    (
        0..4usize,
        packet_id(),
        reason(PUBACK_REASONS),
        reason(PUBREL_REASONS),
        properties_for(version, ACK_PROPS),
    )
        .prop_map(move |(kind, packet_id, puback_reason, pubrel_reason, properties)| {
            let reason = match (v5, kind) {
                (false, _) => ReasonCode::Success,
                (true, 0 | 1) => puback_reason,
                (true, _) => pubrel_reason,
            };
            let resp = PubResp { packet_id, reason, properties };
            match kind {
                0 => Packet::PubAck(resp),
                1 => Packet::PubRec(resp),
                2 => Packet::PubRel(resp),
                _ => Packet::PubComp(resp),
            }
        })
}

fn subscription(version: ProtocolVersion) -> impl Strategy<Value = Subscription> {
    let retain_handling = prop_oneof![
        Just(RetainHandling::SendAtSubscribe),
        Just(RetainHandling::SendIfNew),
        Just(RetainHandling::DoNotSend)
    ];
    (topic_filter(), qos(), any::<bool>(), any::<bool>(), retain_handling).prop_map(
        move |(filter, qos, no_local, retain_as_published, retain_handling)| {
            let options = if version.is_v5() {
                // No-local is a Protocol Error on a shared subscription.
                let no_local = no_local && !filter.as_str().starts_with("$share/");
                SubscriptionOptions { qos, no_local, retain_as_published, retain_handling }
            } else {
                SubscriptionOptions { qos, ..SubscriptionOptions::default() }
            };
            Subscription { filter, options }
        },
    )
}

fn subscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (packet_id(), properties_for(version, SUBSCRIBE_PROPS), vec(subscription(version), 1..4)).prop_map(
        |(packet_id, properties, subscriptions)| {
            Packet::Subscribe(Subscribe { packet_id, properties, subscriptions })
        },
    )
}

fn suback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let reasons: &'static [u8] = if version.is_v5() { SUBACK_REASONS } else { &[0x00, 0x01, 0x02, 0x80] };
    (packet_id(), properties_for(version, ACK_PROPS), vec(reason(reasons), 1..4)).prop_map(
        |(packet_id, properties, reasons)| Packet::SubAck(SubAck { packet_id, properties, reasons }),
    )
}

fn unsubscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (packet_id(), properties_for(version, UNSUBSCRIBE_PROPS), vec(topic_filter(), 1..4)).prop_map(
        |(packet_id, properties, filters)| {
            Packet::Unsubscribe(Unsubscribe { packet_id, properties, filters })
        },
    )
}

fn unsuback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    (packet_id(), properties_for(version, ACK_PROPS), vec(reason(UNSUBACK_REASONS), 1..4)).prop_map(
        move |(packet_id, properties, reasons)| {
            // A 3.x UNSUBACK has no payload.
            let reasons = if v5 { reasons } else { Vec::new() };
            Packet::UnsubAck(UnsubAck { packet_id, properties, reasons })
        },
    )
}

fn disconnect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    (reason(DISCONNECT_REASONS), properties_for(version, DISCONNECT_PROPS)).prop_map(
        move |(reason, properties)| {
            let reason = if v5 { reason } else { ReasonCode::NormalDisconnection };
            Packet::Disconnect(Disconnect { reason, properties })
        },
    )
}

fn auth() -> impl Strategy<Value = Packet> {
    (reason(AUTH_REASONS), properties(AUTH_PROPS), any_string()).prop_map(
        |(reason, mut properties, method)| {
            // Only the empty Success form may leave out the authentication method.
            let empty_success = reason == ReasonCode::Success && properties.is_empty();
            if !empty_success && properties.authentication_method.is_none() {
                properties.authentication_method = Some(method);
            }
            Packet::Auth(Auth { reason, properties })
        },
    )
}

/// Any valid packet for `version`.
fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let common = prop_oneof![
        connect(version),
        connack(version),
        publish(version),
        publish(version),
        pub_resp(version),
        subscribe(version),
        suback(version),
        unsubscribe(version),
        unsuback(version),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(version),
    ];
    if version.is_v5() {
        prop_oneof![10 => common, 1 => auth()].boxed()
    } else {
        common.boxed()
    }
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    proptest::sample::select(&VERSIONS[..])
}

fn version_and_packets(
    count: std::ops::Range<usize>,
) -> impl Strategy<Value = (ProtocolVersion, Vec<Packet>)> {
    version().prop_flat_map(move |version| (Just(version), vec(packet(version), count.clone())))
}

// ---- helpers -------------------------------------------------------------------------------------

fn encode_all(packets: &[Packet], version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for packet in packets {
        let before = buf.len();
        encode(packet, version, &mut buf).expect("valid packets encode");
        assert_eq!(encoded_len(packet, version), Ok(buf.len() - before), "encoded_len of {packet:?}");
    }
    buf.to_vec()
}

/// Feeds `bytes` to the decoder in the chunks that `cuts` (sorted positions) delimit, decoding all
/// it can after each chunk. `Ok(None)` must leave the buffer untouched.
fn decode_in_chunks(bytes: &[u8], cuts: &[usize], version: ProtocolVersion) -> Vec<Packet> {
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        buf.extend_from_slice(&bytes[start..end]);
        start = end;
        loop {
            let before = buf.clone();
            match decode(&mut buf, version, MAX_PACKET_SIZE_BYTES) {
                Ok(Some(packet)) => decoded.push(packet),
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) consumed bytes");
                    break;
                }
                Err(error) => panic!("valid stream failed to decode: {error:?}"),
            }
        }
    }
    assert!(buf.is_empty(), "bytes left over after the last packet");
    decoded
}

/// Decodes until the decoder stops; the point is that nothing panics.
fn decode_until_stuck(bytes: &[u8], version: ProtocolVersion) {
    let _ = frame_len(bytes, MAX_PACKET_SIZE_BYTES);
    let mut buf = BytesMut::from(bytes);
    // Every packet consumes at least two bytes, so this loop ends.
    while let Ok(Some(_)) = decode(&mut buf, version, MAX_PACKET_SIZE_BYTES) {}
}

/// One random edit of an encoding: overwrite, insert, delete or truncate.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set(at, byte)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        1 => any::<usize>().prop_map(Mutation::Delete),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len();
    match *mutation {
        Mutation::Set(at, byte) if len > 0 => bytes[at % len] = byte,
        Mutation::Insert(at, byte) => bytes.insert(at % (len + 1), byte),
        Mutation::Delete(at) if len > 0 => {
            bytes.remove(at % len);
        }
        Mutation::Truncate(at) => bytes.truncate(at % (len + 1)),
        _ => {}
    }
}

// ---- properties ----------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn each_packet_round_trips((version, packets) in version_and_packets(1..2)) {
        for packet in packets {
            let bytes = encode_all(std::slice::from_ref(&packet), version);
            let mut buf = BytesMut::from(&bytes[..]);
            let decoded = decode(&mut buf, version, MAX_PACKET_SIZE_BYTES);
            prop_assert_eq!(decoded, Ok(Some(packet)));
            prop_assert!(buf.is_empty());
        }
    }

    #[test]
    fn random_cuts_decode_the_same_stream(
        (version, packets) in version_and_packets(1..8),
        cut_seeds in vec(any::<usize>(), 0..12),
    ) {
        let bytes = encode_all(&packets, version);
        let mut cuts: Vec<usize> = cut_seeds.iter().map(|seed| seed % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_in_chunks(&bytes, &cuts, version), packets);
    }

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..96), version in version()) {
        decode_until_stuck(&bytes, version);
    }

    #[test]
    fn plausible_headers_never_panic(
        first in any::<u8>(),
        body in vec(any::<u8>(), 0..64),
        version in version(),
    ) {
        // A fixed header whose remaining length matches the body, so the body decoders run.
        let mut bytes = vec![first, body.len() as u8];
        bytes.extend_from_slice(&body);
        decode_until_stuck(&bytes, version);
    }

    #[test]
    fn mutated_encodings_never_panic(
        (version, packets) in version_and_packets(1..3),
        mutations in vec(mutation(), 1..4),
    ) {
        let mut bytes = encode_all(&packets, version);
        for mutation in &mutations {
            mutate(&mut bytes, mutation);
        }
        for version in VERSIONS {
            decode_until_stuck(&bytes, version);
        }
    }
}

proptest! {
    // Cutting at every position is quadratic in the stream length: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_single_cut_decodes_the_same_stream((version, packets) in version_and_packets(1..5)) {
        let bytes = encode_all(&packets, version);
        for cut in 0..=bytes.len() {
            prop_assert_eq!(&decode_in_chunks(&bytes, &[cut], version), &packets);
        }
    }

    #[test]
    fn byte_by_byte_decodes_the_same_stream((version, packets) in version_and_packets(1..5)) {
        let bytes = encode_all(&packets, version);
        let cuts: Vec<usize> = (0..bytes.len()).collect();
        prop_assert_eq!(decode_in_chunks(&bytes, &cuts, version), packets);
    }
}

#[test]
fn short_forms_stream_in_every_version() {
    // The shortest encodings (two bytes, four bytes) cut right after their first byte.
    for version in VERSIONS {
        let packets = vec![
            Packet::PingReq,
            Packet::Disconnect(Disconnect::new(ReasonCode::NormalDisconnection)),
            Packet::PubAck(PubResp::new(1)),
        ];
        let bytes = encode_all(&packets, version);
        assert_eq!(decode_in_chunks(&bytes, &[1], version), packets);
    }
}
