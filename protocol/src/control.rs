//! DISCONNECT and AUTH: decode and encode (PINGREQ/PINGRESP have no body and live in the
//! dispatchers).
//!
//! Owns: the layout of these packets, their MQTT 5 short forms (remaining length 0 for Normal /
//! Success without properties; DISCONNECT with a reason code but no property length), their reason
//! codes, and the authentication method an AUTH must carry. Does not own: the authentication
//! exchange itself or session expiry rules (the broker).
//!
//! Invariants:
//! - A 3.x DISCONNECT is exactly two bytes; its reason and properties stay at their defaults.
//! - AUTH never decodes on a 3.x connection (refused from its fixed header, in `decode.rs`) and
//!   never encodes for 3.x.

use bytes::{BufMut, BytesMut};

use crate::encode::Plan;
use crate::error::{DecodeError, EncodeError};
use crate::packet::{Auth, Disconnect, PacketType, Properties, ProtocolVersion};
use crate::properties::{self, Context, AUTHENTICATION_METHOD};
use crate::reason::ReasonCode;
use crate::reasons;
use crate::wire::Reader;

pub(crate) fn decode_disconnect(
    mut reader: Reader,
    version: ProtocolVersion,
) -> Result<Disconnect, DecodeError> {
    if !version.is_v5() {
        reader.finish()?;
        return Ok(Disconnect::new(ReasonCode::NormalDisconnection));
    }
    // "If the Remaining Length is less than 1 the value of 0x00 (Normal disconnection) is used";
    // with 1, the property length is absent and 0 (MQTT 5 3.14.2.1, 3.14.2.2.1).
    if reader.is_empty() {
        return Ok(Disconnect::new(ReasonCode::NormalDisconnection));
    }
    let reason = reasons::decode(PacketType::Disconnect, reader.u8()?)?;
    let properties = if reader.is_empty() {
        Properties::default()
    } else {
        properties::decode(&mut reader, Context::DISCONNECT)?
    };
    reader.finish()?;
    Ok(Disconnect { reason, properties })
}

pub(crate) fn decode_auth(mut reader: Reader) -> Result<Auth, DecodeError> {
    // Only Success without properties may omit the whole variable header (MQTT 5 3.15.2.1).
    if reader.is_empty() {
        return Ok(Auth { reason: ReasonCode::Success, properties: Properties::default() });
    }
    let reason = reasons::decode(PacketType::Auth, reader.u8()?)?;
    let properties = properties::decode(&mut reader, Context::AUTH)?;
    reader.finish()?;
    // "It is a Protocol Error to omit the Authentication Method" (MQTT 5 3.15.2.2.2).
    if properties.authentication_method.is_none() {
        return Err(DecodeError::MissingProperty(AUTHENTICATION_METHOD));
    }
    Ok(Auth { reason, properties })
}

pub(crate) fn plan_disconnect(
    disconnect: &Disconnect,
    version: ProtocolVersion,
) -> Result<Plan, EncodeError> {
    if !version.is_v5() {
        return Ok(Plan::bare(0xE0, 0));
    }
    reasons::encode(PacketType::Disconnect, disconnect.reason)?;
    let props_len = properties::block_len(&disconnect.properties, Context::DISCONNECT)?;
    let remaining_len = match (disconnect.reason, props_len) {
        (ReasonCode::Success, 0) => 0,
        (_, 0) => 1,
        (_, len) => 1 + properties::section_len(len),
    };
    Ok(Plan { first_byte: 0xE0, remaining_len, props_len, will_props_len: 0 })
}

pub(crate) fn put_disconnect(buf: &mut BytesMut, disconnect: &Disconnect, plan: &Plan) {
    if plan.remaining_len > 0 {
        buf.put_u8(disconnect.reason.as_u8());
    }
    if plan.props_len > 0 {
        properties::put(buf, &disconnect.properties, plan.props_len);
    }
}

pub(crate) fn plan_auth(auth: &Auth, version: ProtocolVersion) -> Result<Plan, EncodeError> {
    if !version.is_v5() {
        return Err(EncodeError::NotRepresentable("AUTH in MQTT 3.x"));
    }
    reasons::encode(PacketType::Auth, auth.reason)?;
    let props_len = properties::block_len(&auth.properties, Context::AUTH)?;
    if auth.reason == ReasonCode::Success && props_len == 0 {
        return Ok(Plan::bare(0xF0, 0));
    }
    if auth.properties.authentication_method.is_none() {
        return Err(EncodeError::NotRepresentable("AUTH without an authentication method"));
    }
    Ok(Plan {
        first_byte: 0xF0,
        remaining_len: 1 + properties::section_len(props_len),
        props_len,
        will_props_len: 0,
    })
}

pub(crate) fn put_auth(buf: &mut BytesMut, auth: &Auth, plan: &Plan) {
    if plan.remaining_len > 0 {
        buf.put_u8(auth.reason.as_u8());
        properties::put(buf, &auth.properties, plan.props_len);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::encoded_len;
    use crate::packet::Packet;
    use crate::test_util::{decode_bytes, encode_bytes};
    use crate::utf8::Utf8;

    use super::*;

    const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
    const V5: ProtocolVersion = ProtocolVersion::V5;

    #[test]
    fn disconnect_forms() {
        let normal = Packet::Disconnect(Disconnect::new(ReasonCode::NormalDisconnection));
        assert_eq!(decode_bytes(&[0xE0, 0], V3), Ok(normal.clone()));
        assert_eq!(decode_bytes(&[0xE0, 0], V5), Ok(normal.clone()));
        assert_eq!(encode_bytes(&normal, V5), [0xE0, 0]);
        assert_eq!(decode_bytes(&[0xE0, 1, 0], V3), Err(DecodeError::LengthMismatch));
        let with_will = Packet::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWillMessage));
        assert_eq!(decode_bytes(&[0xE0, 1, 4], V5), Ok(with_will.clone()));
        assert_eq!(decode_bytes(&[0xE0, 2, 4, 0], V5), Ok(with_will.clone()));
        assert_eq!(encode_bytes(&with_will, V5), [0xE0, 1, 4]);
        assert_eq!(encode_bytes(&with_will, V3), [0xE0, 0]);
        assert_eq!(
            decode_bytes(&[0xE0, 1, 0x01], V5),
            Err(DecodeError::InvalidReasonCode { packet_type: PacketType::Disconnect, code: 0x01 })
        );
        assert_eq!(decode_bytes(&[0xE0, 3, 0, 0, 0], V5), Err(DecodeError::LengthMismatch));
    }

    #[test]
    fn auth_forms() {
        assert_eq!(decode_bytes(&[0xF0, 1, 0x18], V5), Err(DecodeError::LengthMismatch));
        assert_eq!(decode_bytes(&[0xF0, 2, 0x18, 0], V5), Err(DecodeError::MissingProperty(0x15)));
        let auth = Packet::Auth(Auth {
            reason: ReasonCode::ContinueAuthentication,
            properties: Properties {
                authentication_method: Some(Utf8::from_static("m")),
                authentication_data: Some(Bytes::from_static(b"d")),
                ..Properties::default()
            },
        });
        let bytes = encode_bytes(&auth, V5);
        assert_eq!(bytes, [0xF0, 10, 0x18, 8, 0x15, 0, 1, b'm', 0x16, 0, 1, b'd']);
        assert_eq!(decode_bytes(&bytes, V5), Ok(auth.clone()));
        assert!(matches!(encoded_len(&auth, V3), Err(EncodeError::NotRepresentable(_))));
    }
}
