//! Decode and encode errors, each mapped to exactly one MQTT 5 reason code and one MQTT 3.x action.
//!
//! Invariant: an incomplete frame is never an error (decoders return `Ok(None)`); every variant here
//! describes bytes that can never become a valid packet, or a packet that cannot be encoded.

use thiserror::Error;

use crate::packet::PacketType;
use crate::reason::ReasonCode;

/// What a 3.x server does about a decode error: answer CONNACK with a return code then close, or
/// just close the network connection (3.x has no DISCONNECT from the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V3Action {
    /// Send CONNACK with this return code, then close.
    ConnAck(u8),
    /// Close the network connection.
    Close,
}

/// Why bytes are not a valid MQTT packet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The remaining-length varint runs past 4 bytes (MQTT-1.5.5 / 2.1.4).
    #[error("remaining length is longer than 4 bytes")]
    MalformedRemainingLength,
    /// A variable byte integer inside the packet is longer than 4 bytes or not minimally encoded.
    #[error("malformed variable byte integer")]
    MalformedVarInt,
    /// The whole packet is larger than the maximum packet size in force.
    #[error("packet of {size_bytes} bytes exceeds the maximum of {max_bytes}")]
    PacketTooLarge { size_bytes: usize, max_bytes: u32 },
    /// Packet type 0 is reserved, or AUTH (15) arrived on a 3.x connection.
    #[error("reserved or unsupported packet type {0}")]
    InvalidPacketType(u8),
    /// Fixed header flag bits differ from the values the specification fixes for this type.
    #[error("invalid fixed header flags {flags:#06b} for {packet_type:?}")]
    InvalidHeaderFlags { packet_type: PacketType, flags: u8 },
    /// QoS bits are 3 (PUBLISH, will QoS, or subscription options).
    #[error("QoS 3 is not a valid QoS")]
    InvalidQoS,
    /// DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2).
    #[error("DUP flag set on a QoS 0 PUBLISH")]
    DupOnQoS0,
    /// A field runs past the end of the packet, or the packet has bytes left over after its last
    /// field: the remaining length disagrees with the contents.
    #[error("remaining length does not match the packet contents")]
    LengthMismatch,
    /// The protocol name is neither `MQTT` nor `MQIsdp`, or does not match the level.
    #[error("unknown protocol name")]
    InvalidProtocolName,
    /// The protocol level is not 3, 4 or 5.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// The CONNECT flags reserved bit is set (MQTT-3.1.2-3).
    #[error("CONNECT reserved flag is set")]
    ConnectReservedFlag,
    /// Will QoS or will retain set without the will flag (MQTT-3.1.2-11, -13, -15).
    #[error("will QoS or retain set without a will")]
    WillFlagsWithoutWill,
    /// Password flag set without the user name flag in 3.x (MQTT-3.1.2-22).
    #[error("password without user name")]
    PasswordWithoutUsername,
    /// A UTF-8 string field is ill-formed (MQTT-1.5.4-1 / MQTT-1.5.3-1).
    #[error("ill-formed UTF-8 string")]
    InvalidUtf8,
    /// A UTF-8 string field contains U+0000 (MQTT-1.5.4-2 / MQTT-1.5.3-2).
    #[error("UTF-8 string contains U+0000")]
    NullCharacter,
    /// A topic name contains `+` or `#` (MQTT-3.3.2-2).
    #[error("topic name contains a wildcard")]
    WildcardInTopicName,
    /// A topic name is empty without a topic alias (3.x: always; MQTT-4.7.3-1).
    #[error("empty topic name")]
    EmptyTopicName,
    /// A topic filter is empty or misuses wildcards (MQTT-4.7.1-*, MQTT-4.7.3-1).
    #[error("invalid topic filter")]
    InvalidTopicFilter,
    /// Topic alias 0 (MQTT-3.3.2-8).
    #[error("topic alias 0")]
    TopicAliasZero,
    /// A packet that needs a packet identifier has 0 (MQTT-2.2.1-3).
    #[error("packet identifier 0")]
    PacketIdZero,
    /// A property identifier that MQTT 5 does not define.
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u8),
    /// A defined property on a packet that does not allow it.
    #[error("property {property:#04x} is not allowed on {packet_type:?}")]
    PropertyNotAllowed { property: u8, packet_type: PacketType },
    /// A property that may appear once appears twice.
    #[error("property {0:#04x} appears more than once")]
    DuplicateProperty(u8),
    /// A property value outside its allowed range (e.g. receive maximum 0, a 0/1 byte set to 2).
    #[error("property {0:#04x} has an invalid value")]
    InvalidPropertyValue(u8),
    /// A property the packet requires is absent: authentication data without an authentication
    /// method (MQTT 5 3.1.2.11.10, 3.2.2.3.18), or an AUTH without an authentication method
    /// (MQTT 5 3.15.2.2.2). Both are Protocol Errors.
    #[error("property {0:#04x} is required here")]
    MissingProperty(u8),
    /// CONNACK acknowledge flags with a reserved bit set (MQTT-3.2.2-1), or session present with a
    /// non-zero reason code (MQTT-3.2.2-6; 3.1.1 MQTT-3.2.2-4).
    #[error("invalid CONNACK acknowledge flags {0:#04x}")]
    InvalidConnAckFlags(u8),
    /// A reason code not allowed on this packet type.
    #[error("reason code {code:#04x} is not valid on {packet_type:?}")]
    InvalidReasonCode { packet_type: PacketType, code: u8 },
    /// SUBSCRIBE or UNSUBSCRIBE without any topic filter (MQTT-3.8.3-3, MQTT-3.10.3-2).
    #[error("no topic filter")]
    NoTopicFilters,
    /// Reserved bits of the subscription options byte set (MQTT-3.8.3-5; 3.1.1 MQTT-3.8.3-4).
    #[error("reserved subscription option bits set")]
    SubscriptionOptionsReserved,
    /// Maximum QoS 3 in the options of an MQTT 5 SUBSCRIBE: a Protocol Error (MQTT 5 3.8.3.1),
    /// unlike QoS 3 in a PUBLISH or a will, which is a Malformed Packet ([`DecodeError::InvalidQoS`],
    /// also used for a 3.x SUBSCRIBE, where MQTT-3.8.3-4 calls it malformed).
    #[error("subscription maximum QoS 3")]
    InvalidSubscriptionQoS,
    /// Retain handling 3 (MQTT 5 3.8.3.1).
    #[error("retain handling 3")]
    InvalidRetainHandling,
    /// No Local on a shared subscription (MQTT-3.8.3-4).
    #[error("no-local on a shared subscription")]
    NoLocalOnSharedSubscription,
    /// The first packet on a connection is not CONNECT, or a second CONNECT arrived (MQTT-3.1.0-1/2).
    #[error("expected CONNECT first, got {0:?}")]
    UnexpectedPacket(PacketType),
}

impl DecodeError {
    /// The MQTT 5 reason code for a DISCONNECT (or CONNACK, while connecting) caused by this error.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            UnsupportedProtocolLevel(_) | InvalidProtocolName => ReasonCode::UnsupportedProtocolVersion,
            WildcardInTopicName => ReasonCode::TopicNameInvalid,
            InvalidTopicFilter => ReasonCode::TopicFilterInvalid,
            TopicAliasZero => ReasonCode::TopicAliasInvalid,
            PacketIdZero
            | DuplicateProperty(_)
            | InvalidPropertyValue(_)
            | MissingProperty(_)
            | NoTopicFilters
            | InvalidSubscriptionQoS
            | InvalidRetainHandling
            | NoLocalOnSharedSubscription
            | UnexpectedPacket(_)
            | EmptyTopicName => ReasonCode::ProtocolError,
            MalformedRemainingLength
            | MalformedVarInt
            | InvalidPacketType(_)
            | InvalidHeaderFlags { .. }
            | InvalidQoS
            | DupOnQoS0
            | LengthMismatch
            | ConnectReservedFlag
            | WillFlagsWithoutWill
            | PasswordWithoutUsername
            | InvalidUtf8
            | NullCharacter
            | UnknownProperty(_)
            | PropertyNotAllowed { .. }
            | InvalidReasonCode { .. }
            | InvalidConnAckFlags(_)
            | SubscriptionOptionsReserved => ReasonCode::MalformedPacket,
        }
    }

    /// What a 3.x server does: only an unsupported protocol level earns a CONNACK (return code 1,
    /// MQTT-3.1.2-2); everything else closes the connection.
    pub fn v3_action(&self) -> V3Action {
        match self {
            DecodeError::UnsupportedProtocolLevel(_) => V3Action::ConnAck(1),
            _ => V3Action::Close,
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The encoded packet would exceed the limit given (the peer's maximum packet size, or the
    /// 268,435,455-byte remaining-length ceiling).
    #[error("encoded packet of {size_bytes} bytes exceeds the maximum of {max_bytes}")]
    PacketTooLarge { size_bytes: usize, max_bytes: u32 },
    /// A field does not fit its wire type (a string over 65,535 bytes, a value out of range).
    #[error("field {0} does not fit its wire type")]
    FieldTooLong(&'static str),
    /// The packet cannot be expressed in this protocol version (AUTH in 3.x, a 3.x CONNACK with a
    /// reason that has no return code, a QoS > 0 PUBLISH without a packet id).
    #[error("packet cannot be encoded for this protocol version: {0}")]
    NotRepresentable(&'static str),
}
