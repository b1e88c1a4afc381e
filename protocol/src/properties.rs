//! MQTT 5 properties: decoding a property block into [`Properties`], and sizing and writing one.
//!
//! Owns: property identifiers and wire types (MQTT 5 section 2.2.2.2), which properties each packet
//! (and the will) may carry, duplicate detection, and the value checks that need no session state.
//! Does not own: checks that need the connection's state (topic alias maximum, whether the client
//! asked for problem information...), which the broker makes.
//!
//! Invariants:
//! - A decoded [`Properties`] holds only properties allowed on its packet, each at most once except
//!   user properties (and subscription identifiers on PUBLISH), with every value in range.
//! - The encoder writes properties in identifier order, user properties and subscription identifiers
//!   in their `Vec` order, so decoding gives back an equal [`Properties`].
//! - The encoder refuses (rather than drops) a property its packet does not allow.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::{PacketType, Properties, UserProperty};
use crate::utf8::Utf8;
use crate::wire::{field_len, has_wildcard, put_field, put_varint, varint_len, Reader, VARINT_MAX};

pub(crate) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub(crate) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub(crate) const CONTENT_TYPE: u8 = 0x03;
pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
pub(crate) const CORRELATION_DATA: u8 = 0x09;
pub(crate) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub(crate) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub(crate) const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub(crate) const SERVER_KEEP_ALIVE: u8 = 0x13;
pub(crate) const AUTHENTICATION_METHOD: u8 = 0x15;
pub(crate) const AUTHENTICATION_DATA: u8 = 0x16;
pub(crate) const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub(crate) const WILL_DELAY_INTERVAL: u8 = 0x18;
pub(crate) const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub(crate) const RESPONSE_INFORMATION: u8 = 0x1A;
pub(crate) const SERVER_REFERENCE: u8 = 0x1C;
pub(crate) const REASON_STRING: u8 = 0x1F;
pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
pub(crate) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub(crate) const TOPIC_ALIAS: u8 = 0x23;
pub(crate) const MAXIMUM_QOS: u8 = 0x24;
pub(crate) const RETAIN_AVAILABLE: u8 = 0x25;
pub(crate) const USER_PROPERTY: u8 = 0x26;
pub(crate) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub(crate) const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub(crate) const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub(crate) const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// Property identifiers as a set: bit `id` stands for property `id` (every id is below 64).
type IdSet = u64;

const fn set(ids: &[u8]) -> IdSet {
    let mut bits = 0;
    let mut index = 0;
    while index < ids.len() {
        bits |= 1 << ids[index];
        index += 1;
    }
    bits
}

const fn bit(id: u8) -> IdSet {
    1 << id
}

/// Every identifier MQTT 5 defines.
const KNOWN: IdSet = set(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    SUBSCRIPTION_IDENTIFIER,
    SESSION_EXPIRY_INTERVAL,
    ASSIGNED_CLIENT_IDENTIFIER,
    SERVER_KEEP_ALIVE,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REQUEST_PROBLEM_INFORMATION,
    WILL_DELAY_INTERVAL,
    REQUEST_RESPONSE_INFORMATION,
    RESPONSE_INFORMATION,
    SERVER_REFERENCE,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    TOPIC_ALIAS_MAXIMUM,
    TOPIC_ALIAS,
    MAXIMUM_QOS,
    RETAIN_AVAILABLE,
    USER_PROPERTY,
    MAXIMUM_PACKET_SIZE,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    SHARED_SUBSCRIPTION_AVAILABLE,
]);

/// Where a property block sits, and so which properties it may hold (MQTT 5 section 2.2.2.2).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context {
    /// Reported in errors; the will reports CONNECT.
    pub(crate) packet_type: PacketType,
    allowed: IdSet,
}

impl Context {
    pub(crate) const CONNECT: Context = Context {
        packet_type: PacketType::Connect,
        allowed: set(&[
            SESSION_EXPIRY_INTERVAL,
            AUTHENTICATION_METHOD,
            AUTHENTICATION_DATA,
            REQUEST_PROBLEM_INFORMATION,
            REQUEST_RESPONSE_INFORMATION,
            RECEIVE_MAXIMUM,
            TOPIC_ALIAS_MAXIMUM,
            USER_PROPERTY,
            MAXIMUM_PACKET_SIZE,
        ]),
    };

    /// The will properties of CONNECT are a set of their own.
    pub(crate) const WILL: Context = Context {
        packet_type: PacketType::Connect,
        allowed: set(&[
            PAYLOAD_FORMAT_INDICATOR,
            MESSAGE_EXPIRY_INTERVAL,
            CONTENT_TYPE,
            RESPONSE_TOPIC,
            CORRELATION_DATA,
            WILL_DELAY_INTERVAL,
            USER_PROPERTY,
        ]),
    };

    pub(crate) const CONNACK: Context = Context {
        packet_type: PacketType::ConnAck,
        allowed: set(&[
            SESSION_EXPIRY_INTERVAL,
            ASSIGNED_CLIENT_IDENTIFIER,
            SERVER_KEEP_ALIVE,
            AUTHENTICATION_METHOD,
            AUTHENTICATION_DATA,
            RESPONSE_INFORMATION,
            SERVER_REFERENCE,
            REASON_STRING,
            RECEIVE_MAXIMUM,
            TOPIC_ALIAS_MAXIMUM,
            MAXIMUM_QOS,
            RETAIN_AVAILABLE,
            USER_PROPERTY,
            MAXIMUM_PACKET_SIZE,
            WILDCARD_SUBSCRIPTION_AVAILABLE,
            SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            SHARED_SUBSCRIPTION_AVAILABLE,
        ]),
    };

    pub(crate) const PUBLISH: Context = Context {
        packet_type: PacketType::Publish,
        allowed: set(&[
            PAYLOAD_FORMAT_INDICATOR,
            MESSAGE_EXPIRY_INTERVAL,
            CONTENT_TYPE,
            RESPONSE_TOPIC,
            CORRELATION_DATA,
            SUBSCRIPTION_IDENTIFIER,
            TOPIC_ALIAS,
            USER_PROPERTY,
        ]),
    };

    pub(crate) const SUBSCRIBE: Context = Context {
        packet_type: PacketType::Subscribe,
        allowed: set(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY]),
    };

    pub(crate) const UNSUBSCRIBE: Context =
        Context { packet_type: PacketType::Unsubscribe, allowed: set(&[USER_PROPERTY]) };

    pub(crate) const DISCONNECT: Context = Context {
        packet_type: PacketType::Disconnect,
        allowed: set(&[SESSION_EXPIRY_INTERVAL, SERVER_REFERENCE, REASON_STRING, USER_PROPERTY]),
    };

    pub(crate) const AUTH: Context = Context {
        packet_type: PacketType::Auth,
        allowed: set(&[AUTHENTICATION_METHOD, AUTHENTICATION_DATA, REASON_STRING, USER_PROPERTY]),
    };

    /// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK: reason string and user properties.
    pub(crate) const fn ack(packet_type: PacketType) -> Context {
        Context { packet_type, allowed: set(&[REASON_STRING, USER_PROPERTY]) }
    }

    /// Subscription identifiers may repeat on PUBLISH only (one per matching subscription).
    fn repeatable(self) -> IdSet {
        match self.packet_type {
            PacketType::Publish => bit(USER_PROPERTY) | bit(SUBSCRIPTION_IDENTIFIER),
            _ => bit(USER_PROPERTY),
        }
    }
}

/// Reads a property length and the block it announces. A zero length (the common case) returns
/// defaults without allocating.
pub(crate) fn decode(reader: &mut Reader, context: Context) -> Result<Properties, DecodeError> {
    let mut props = Properties::default();
    decode_into(reader, context, &mut props)?;
    Ok(props)
}

/// Like [`decode`], into properties the caller has set to their defaults. The hot path (PUBLISH)
/// uses this form so that the 400-byte struct is not moved through a `Result`.
#[inline]
pub(crate) fn decode_into(
    reader: &mut Reader,
    context: Context,
    props: &mut Properties,
) -> Result<(), DecodeError> {
    let len = reader.varint()?;
    if len == 0 {
        return Ok(());
    }
    // A varint is at most 268,435,455, which fits usize on every supported target.
    let block = reader.take(len as usize)?;
    decode_block(block, context, props)
}

pub(crate) fn decode_block(
    block: Bytes,
    context: Context,
    props: &mut Properties,
) -> Result<(), DecodeError> {
    let mut reader = Reader::new(block);
    let mut seen: IdSet = 0;
    let repeatable = context.repeatable();
    while !reader.is_empty() {
        // The identifier is a variable byte integer, but every defined one fits in one byte; a
        // first byte with the continuation bit set is therefore unknown as well.
        let id = reader.u8()?;
        if id >= 64 || KNOWN & bit(id) == 0 {
            return Err(DecodeError::UnknownProperty(id));
        }
        if context.allowed & bit(id) == 0 {
            return Err(DecodeError::PropertyNotAllowed { property: id, packet_type: context.packet_type });
        }
        if seen & bit(id) & !repeatable != 0 {
            return Err(DecodeError::DuplicateProperty(id));
        }
        seen |= bit(id);
        decode_one(&mut reader, id, props)?;
    }
    // "It is a Protocol Error to include Authentication Data if there is no Authentication Method"
    // (MQTT 5 3.1.2.11.10, 3.2.2.3.18).
    if seen & bit(AUTHENTICATION_DATA) != 0 && seen & bit(AUTHENTICATION_METHOD) == 0 {
        return Err(DecodeError::MissingProperty(AUTHENTICATION_METHOD));
    }
    Ok(())
}

fn zero_or_one(reader: &mut Reader, id: u8) -> Result<Option<u8>, DecodeError> {
    match reader.u8()? {
        value @ (0 | 1) => Ok(Some(value)),
        _ => Err(DecodeError::InvalidPropertyValue(id)),
    }
}

fn decode_one(reader: &mut Reader, id: u8, props: &mut Properties) -> Result<(), DecodeError> {
    match id {
        PAYLOAD_FORMAT_INDICATOR => props.payload_format_indicator = zero_or_one(reader, id)?,
        MESSAGE_EXPIRY_INTERVAL => props.message_expiry_interval = Some(reader.u32()?),
        CONTENT_TYPE => props.content_type = Some(reader.utf8()?),
        RESPONSE_TOPIC => {
            // A topic name: non-empty and without wildcards (MQTT-3.3.2-14, MQTT-4.7.3-1).
            let topic = reader.utf8()?;
            if topic.is_empty() || has_wildcard(topic.as_bytes()) {
                return Err(DecodeError::InvalidPropertyValue(id));
            }
            props.response_topic = Some(topic);
        }
        CORRELATION_DATA => props.correlation_data = Some(reader.binary()?),
        SUBSCRIPTION_IDENTIFIER => {
            // 0 is a Protocol Error (MQTT 5 3.3.2.3.8); four varint bytes cap it at the maximum.
            let value = reader.varint()?;
            if value == 0 {
                return Err(DecodeError::InvalidPropertyValue(id));
            }
            props.subscription_identifiers.push(value);
        }
        SESSION_EXPIRY_INTERVAL => props.session_expiry_interval = Some(reader.u32()?),
        ASSIGNED_CLIENT_IDENTIFIER => props.assigned_client_identifier = Some(reader.utf8()?),
        SERVER_KEEP_ALIVE => props.server_keep_alive = Some(reader.u16()?),
        AUTHENTICATION_METHOD => props.authentication_method = Some(reader.utf8()?),
        AUTHENTICATION_DATA => props.authentication_data = Some(reader.binary()?),
        REQUEST_PROBLEM_INFORMATION => props.request_problem_information = zero_or_one(reader, id)?,
        WILL_DELAY_INTERVAL => props.will_delay_interval = Some(reader.u32()?),
        REQUEST_RESPONSE_INFORMATION => props.request_response_information = zero_or_one(reader, id)?,
        RESPONSE_INFORMATION => props.response_information = Some(reader.utf8()?),
        SERVER_REFERENCE => props.server_reference = Some(reader.utf8()?),
        REASON_STRING => props.reason_string = Some(reader.utf8()?),
        RECEIVE_MAXIMUM => props.receive_maximum = Some(nonzero_u16(reader, id)?),
        TOPIC_ALIAS_MAXIMUM => props.topic_alias_maximum = Some(reader.u16()?),
        TOPIC_ALIAS => {
            let alias = reader.u16()?;
            if alias == 0 {
                return Err(DecodeError::TopicAliasZero);
            }
            props.topic_alias = Some(alias);
        }
        MAXIMUM_QOS => props.maximum_qos = zero_or_one(reader, id)?,
        RETAIN_AVAILABLE => props.retain_available = zero_or_one(reader, id)?,
        USER_PROPERTY => {
            let name = reader.utf8()?;
            let value = reader.utf8()?;
            props.user_properties.push(UserProperty { name, value });
        }
        MAXIMUM_PACKET_SIZE => {
            let size = reader.u32()?;
            if size == 0 {
                return Err(DecodeError::InvalidPropertyValue(id));
            }
            props.maximum_packet_size = Some(size);
        }
        WILDCARD_SUBSCRIPTION_AVAILABLE => props.wildcard_subscription_available = zero_or_one(reader, id)?,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
            props.subscription_identifier_available = zero_or_one(reader, id)?
        }
        SHARED_SUBSCRIPTION_AVAILABLE => props.shared_subscription_available = zero_or_one(reader, id)?,
        // `decode_block` only calls this for identifiers in KNOWN, all handled above.
        _ => return Err(DecodeError::UnknownProperty(id)),
    }
    Ok(())
}

fn nonzero_u16(reader: &mut Reader, id: u8) -> Result<u16, DecodeError> {
    match reader.u16()? {
        0 => Err(DecodeError::InvalidPropertyValue(id)),
        value => Ok(value),
    }
}

/// Size of a property block's contents (without its length prefix), checking that every set
/// property is allowed in `context` and fits its wire type.
pub(crate) fn block_len(props: &Properties, context: Context) -> Result<usize, EncodeError> {
    let mut len = 0;
    let mut present: IdSet = 0;
    let mut fixed = |id: u8, is_set: bool, size: usize| {
        if is_set {
            present |= bit(id);
            len += 1 + size;
        }
    };
    fixed(PAYLOAD_FORMAT_INDICATOR, props.payload_format_indicator.is_some(), 1);
    fixed(MESSAGE_EXPIRY_INTERVAL, props.message_expiry_interval.is_some(), 4);
    fixed(SESSION_EXPIRY_INTERVAL, props.session_expiry_interval.is_some(), 4);
    fixed(SERVER_KEEP_ALIVE, props.server_keep_alive.is_some(), 2);
    fixed(REQUEST_PROBLEM_INFORMATION, props.request_problem_information.is_some(), 1);
    fixed(WILL_DELAY_INTERVAL, props.will_delay_interval.is_some(), 4);
    fixed(REQUEST_RESPONSE_INFORMATION, props.request_response_information.is_some(), 1);
    fixed(RECEIVE_MAXIMUM, props.receive_maximum.is_some(), 2);
    fixed(TOPIC_ALIAS_MAXIMUM, props.topic_alias_maximum.is_some(), 2);
    fixed(TOPIC_ALIAS, props.topic_alias.is_some(), 2);
    fixed(MAXIMUM_QOS, props.maximum_qos.is_some(), 1);
    fixed(RETAIN_AVAILABLE, props.retain_available.is_some(), 1);
    fixed(MAXIMUM_PACKET_SIZE, props.maximum_packet_size.is_some(), 4);
    fixed(WILDCARD_SUBSCRIPTION_AVAILABLE, props.wildcard_subscription_available.is_some(), 1);
    fixed(SUBSCRIPTION_IDENTIFIER_AVAILABLE, props.subscription_identifier_available.is_some(), 1);
    fixed(SHARED_SUBSCRIPTION_AVAILABLE, props.shared_subscription_available.is_some(), 1);

    let strings: [(u8, Option<&[u8]>, &'static str); 9] = [
        (CONTENT_TYPE, props.content_type.as_ref().map(|s| s.as_bytes().as_ref()), "content type"),
        (RESPONSE_TOPIC, props.response_topic.as_ref().map(|s| s.as_bytes().as_ref()), "response topic"),
        (CORRELATION_DATA, props.correlation_data.as_deref(), "correlation data"),
        (
            ASSIGNED_CLIENT_IDENTIFIER,
            props.assigned_client_identifier.as_ref().map(|s| s.as_bytes().as_ref()),
            "assigned client identifier",
        ),
        (
            AUTHENTICATION_METHOD,
            props.authentication_method.as_ref().map(|s| s.as_bytes().as_ref()),
            "authentication method",
        ),
        (AUTHENTICATION_DATA, props.authentication_data.as_deref(), "authentication data"),
        (
            RESPONSE_INFORMATION,
            props.response_information.as_ref().map(|s| s.as_bytes().as_ref()),
            "response information",
        ),
        (
            SERVER_REFERENCE,
            props.server_reference.as_ref().map(|s| s.as_bytes().as_ref()),
            "server reference",
        ),
        (REASON_STRING, props.reason_string.as_ref().map(|s| s.as_bytes().as_ref()), "reason string"),
    ];
    for (id, value, name) in strings {
        if let Some(value) = value {
            present |= bit(id);
            len += 1 + field_len(value.len(), name)?;
        }
    }
    if !props.user_properties.is_empty() {
        present |= bit(USER_PROPERTY);
        for pair in &props.user_properties {
            len += 1
                + field_len(pair.name.len(), "user property name")?
                + field_len(pair.value.len(), "user property value")?;
        }
    }
    if !props.subscription_identifiers.is_empty() {
        present |= bit(SUBSCRIPTION_IDENTIFIER);
        if props.subscription_identifiers.len() > 1
            && context.repeatable() & bit(SUBSCRIPTION_IDENTIFIER) == 0
        {
            return Err(EncodeError::NotRepresentable("subscription identifier repeated outside PUBLISH"));
        }
        for &id in &props.subscription_identifiers {
            if id == 0 || id > VARINT_MAX {
                return Err(EncodeError::FieldTooLong("subscription identifier"));
            }
            len += 1 + varint_len(id as usize);
        }
    }
    if present & !context.allowed != 0 {
        return Err(EncodeError::NotRepresentable("property not allowed on this packet"));
    }
    Ok(len)
}

/// Size of a whole property section: the length varint and the block.
#[inline]
pub(crate) fn section_len(block_len: usize) -> usize {
    varint_len(block_len) + block_len
}

fn put_string(buf: &mut BytesMut, id: u8, value: &Option<Utf8>) {
    if let Some(value) = value {
        buf.put_u8(id);
        put_field(buf, value.as_bytes());
    }
}

fn put_binary(buf: &mut BytesMut, id: u8, value: &Option<Bytes>) {
    if let Some(value) = value {
        buf.put_u8(id);
        put_field(buf, value);
    }
}

fn put_byte(buf: &mut BytesMut, id: u8, value: Option<u8>) {
    if let Some(value) = value {
        buf.put_u8(id);
        buf.put_u8(value);
    }
}

fn put_two(buf: &mut BytesMut, id: u8, value: Option<u16>) {
    if let Some(value) = value {
        buf.put_u8(id);
        buf.put_u16(value);
    }
}

fn put_four(buf: &mut BytesMut, id: u8, value: Option<u32>) {
    if let Some(value) = value {
        buf.put_u8(id);
        buf.put_u32(value);
    }
}

/// Writes the property length and the properties, in identifier order. `block_len` comes from
/// [`block_len`] on the same properties.
pub(crate) fn put(buf: &mut BytesMut, props: &Properties, block_len: usize) {
    put_varint(buf, block_len);
    if block_len == 0 {
        return;
    }
    let start = buf.len();
    put_byte(buf, PAYLOAD_FORMAT_INDICATOR, props.payload_format_indicator);
    put_four(buf, MESSAGE_EXPIRY_INTERVAL, props.message_expiry_interval);
    put_string(buf, CONTENT_TYPE, &props.content_type);
    put_string(buf, RESPONSE_TOPIC, &props.response_topic);
    put_binary(buf, CORRELATION_DATA, &props.correlation_data);
    for &id in &props.subscription_identifiers {
        buf.put_u8(SUBSCRIPTION_IDENTIFIER);
        put_varint(buf, id as usize);
    }
    put_four(buf, SESSION_EXPIRY_INTERVAL, props.session_expiry_interval);
    put_string(buf, ASSIGNED_CLIENT_IDENTIFIER, &props.assigned_client_identifier);
    put_two(buf, SERVER_KEEP_ALIVE, props.server_keep_alive);
    put_string(buf, AUTHENTICATION_METHOD, &props.authentication_method);
    put_binary(buf, AUTHENTICATION_DATA, &props.authentication_data);
    put_byte(buf, REQUEST_PROBLEM_INFORMATION, props.request_problem_information);
    put_four(buf, WILL_DELAY_INTERVAL, props.will_delay_interval);
    put_byte(buf, REQUEST_RESPONSE_INFORMATION, props.request_response_information);
    put_string(buf, RESPONSE_INFORMATION, &props.response_information);
    put_string(buf, SERVER_REFERENCE, &props.server_reference);
    put_string(buf, REASON_STRING, &props.reason_string);
    put_two(buf, RECEIVE_MAXIMUM, props.receive_maximum);
    put_two(buf, TOPIC_ALIAS_MAXIMUM, props.topic_alias_maximum);
    put_two(buf, TOPIC_ALIAS, props.topic_alias);
    put_byte(buf, MAXIMUM_QOS, props.maximum_qos);
    put_byte(buf, RETAIN_AVAILABLE, props.retain_available);
    for pair in &props.user_properties {
        buf.put_u8(USER_PROPERTY);
        put_field(buf, pair.name.as_bytes());
        put_field(buf, pair.value.as_bytes());
    }
    put_four(buf, MAXIMUM_PACKET_SIZE, props.maximum_packet_size);
    put_byte(buf, WILDCARD_SUBSCRIPTION_AVAILABLE, props.wildcard_subscription_available);
    put_byte(buf, SUBSCRIPTION_IDENTIFIER_AVAILABLE, props.subscription_identifier_available);
    put_byte(buf, SHARED_SUBSCRIPTION_AVAILABLE, props.shared_subscription_available);
    debug_assert_eq!(buf.len() - start, block_len, "block_len disagrees with put");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_bytes(bytes: &'static [u8], context: Context) -> Result<Properties, DecodeError> {
        let mut reader = Reader::new(Bytes::from_static(bytes));
        let props = decode(&mut reader, context)?;
        reader.finish()?;
        Ok(props)
    }

    fn round_trip(props: &Properties, context: Context) -> Properties {
        let len = block_len(props, context).unwrap();
        let mut buf = BytesMut::new();
        put(&mut buf, props, len);
        assert_eq!(buf.len(), section_len(len));
        decode_bytes(Box::leak(buf.to_vec().into_boxed_slice()), context).unwrap()
    }

    #[test]
    fn empty_block() {
        assert_eq!(decode_bytes(&[0], Context::PUBLISH), Ok(Properties::default()));
    }

    #[test]
    fn every_connack_property_round_trips() {
        let props = Properties {
            session_expiry_interval: Some(30),
            assigned_client_identifier: Some(Utf8::from_static("id")),
            server_keep_alive: Some(60),
            authentication_method: Some(Utf8::from_static("SCRAM")),
            authentication_data: Some(Bytes::from_static(b"\x00\x01")),
            response_information: Some(Utf8::from_static("resp")),
            server_reference: Some(Utf8::from_static("other")),
            reason_string: Some(Utf8::from_static("why")),
            receive_maximum: Some(10),
            topic_alias_maximum: Some(0),
            maximum_qos: Some(1),
            retain_available: Some(0),
            user_properties: vec![
                UserProperty { name: Utf8::from_static("a"), value: Utf8::from_static("1") },
                UserProperty { name: Utf8::from_static("a"), value: Utf8::from_static("2") },
            ],
            maximum_packet_size: Some(1024),
            wildcard_subscription_available: Some(1),
            subscription_identifier_available: Some(0),
            shared_subscription_available: Some(1),
            ..Properties::default()
        };
        assert_eq!(round_trip(&props, Context::CONNACK), props);
    }

    #[test]
    fn publish_and_will_properties_round_trip() {
        let props = Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(5),
            content_type: Some(Utf8::from_static("text/plain")),
            response_topic: Some(Utf8::from_static("r/t")),
            correlation_data: Some(Bytes::from_static(b"corr")),
            subscription_identifiers: vec![1, 268_435_455],
            topic_alias: Some(3),
            ..Properties::default()
        };
        assert_eq!(round_trip(&props, Context::PUBLISH), props);
        let will = Properties { will_delay_interval: Some(9), subscription_identifiers: vec![], ..props };
        let will = Properties { topic_alias: None, ..will };
        assert_eq!(round_trip(&will, Context::WILL), will);
    }

    #[test]
    fn rejects_unknown_disallowed_duplicate() {
        assert_eq!(decode_bytes(&[2, 0x04, 0], Context::PUBLISH), Err(DecodeError::UnknownProperty(0x04)));
        assert_eq!(decode_bytes(&[2, 0x80, 0], Context::PUBLISH), Err(DecodeError::UnknownProperty(0x80)));
        assert_eq!(
            decode_bytes(&[3, 0x21, 0, 1], Context::PUBLISH),
            Err(DecodeError::PropertyNotAllowed { property: 0x21, packet_type: PacketType::Publish })
        );
        assert_eq!(
            decode_bytes(&[5, 0x18, 0, 0, 0, 1], Context::CONNECT),
            Err(DecodeError::PropertyNotAllowed { property: 0x18, packet_type: PacketType::Connect })
        );
        assert_eq!(
            decode_bytes(&[4, 0x01, 0, 0x01, 1], Context::PUBLISH),
            Err(DecodeError::DuplicateProperty(0x01))
        );
        // Subscription identifier repeats on PUBLISH, not on SUBSCRIBE.
        assert!(decode_bytes(&[4, 0x0B, 1, 0x0B, 2], Context::PUBLISH).is_ok());
        assert_eq!(
            decode_bytes(&[4, 0x0B, 1, 0x0B, 2], Context::SUBSCRIBE),
            Err(DecodeError::DuplicateProperty(0x0B))
        );
    }

    #[test]
    fn rejects_out_of_range_values() {
        assert_eq!(
            decode_bytes(&[3, 0x21, 0, 0], Context::CONNECT),
            Err(DecodeError::InvalidPropertyValue(0x21))
        );
        assert_eq!(
            decode_bytes(&[5, 0x27, 0, 0, 0, 0], Context::CONNECT),
            Err(DecodeError::InvalidPropertyValue(0x27))
        );
        assert_eq!(decode_bytes(&[3, 0x23, 0, 0], Context::PUBLISH), Err(DecodeError::TopicAliasZero));
        assert_eq!(
            decode_bytes(&[2, 0x0B, 0], Context::SUBSCRIBE),
            Err(DecodeError::InvalidPropertyValue(0x0B))
        );
        assert_eq!(
            decode_bytes(&[6, 0x0B, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], Context::SUBSCRIBE),
            Err(DecodeError::MalformedVarInt)
        );
        assert_eq!(
            decode_bytes(&[2, 0x24, 2], Context::CONNACK),
            Err(DecodeError::InvalidPropertyValue(0x24))
        );
        assert_eq!(
            decode_bytes(&[2, 0x01, 2], Context::PUBLISH),
            Err(DecodeError::InvalidPropertyValue(0x01))
        );
        assert_eq!(
            decode_bytes(&[2, 0x17, 2], Context::CONNECT),
            Err(DecodeError::InvalidPropertyValue(0x17))
        );
        assert_eq!(
            decode_bytes(&[5, 0x08, 0, 2, b'a', b'#'], Context::PUBLISH),
            Err(DecodeError::InvalidPropertyValue(0x08))
        );
        assert_eq!(
            decode_bytes(&[4, 0x16, 0, 1, 7], Context::CONNECT),
            Err(DecodeError::MissingProperty(0x15))
        );
    }

    #[test]
    fn length_overruns() {
        assert_eq!(decode_bytes(&[5, 0x01, 0], Context::PUBLISH), Err(DecodeError::LengthMismatch));
        assert_eq!(decode_bytes(&[2, 0x02, 0], Context::PUBLISH), Err(DecodeError::LengthMismatch));
        assert_eq!(decode_bytes(&[1, 0x26], Context::PUBLISH), Err(DecodeError::LengthMismatch));
    }

    #[test]
    fn encoder_refuses_disallowed_and_oversize() {
        let props = Properties { receive_maximum: Some(1), ..Properties::default() };
        assert!(matches!(block_len(&props, Context::PUBLISH), Err(EncodeError::NotRepresentable(_))));
        let props = Properties { subscription_identifiers: vec![1, 2], ..Properties::default() };
        assert!(matches!(block_len(&props, Context::SUBSCRIBE), Err(EncodeError::NotRepresentable(_))));
        let props = Properties { subscription_identifiers: vec![268_435_456], ..Properties::default() };
        assert!(matches!(block_len(&props, Context::PUBLISH), Err(EncodeError::FieldTooLong(_))));
        let long = Utf8::new(&"x".repeat(65_536)).unwrap();
        let props = Properties { reason_string: Some(long), ..Properties::default() };
        assert_eq!(block_len(&props, Context::DISCONNECT), Err(EncodeError::FieldTooLong("reason string")));
    }
}
