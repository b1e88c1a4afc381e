//! Which MQTT 5 reason codes each packet type may carry (MQTT 5 sections 3.2.2.2, 3.4.2.1,
//! 3.5.2.1, 3.6.2.1, 3.7.2.1, 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1).
//!
//! Owns: the per-packet tables and their use by the decoder (a code outside the table is
//! [`DecodeError::InvalidReasonCode`]) and by the encoder (refused as not representable). Does not
//! own: the numeric values (`reason.rs`) or 3.x return codes (the packet files map those).

use crate::error::{DecodeError, EncodeError};
use crate::packet::PacketType;
use crate::reason::ReasonCode;

const CONNACK: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99,
    0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
/// PUBACK and PUBREC.
const PUBACK: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
/// PUBREL and PUBCOMP.
const PUBREL: &[u8] = &[0x00, 0x92];
const SUBACK: &[u8] = &[0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
const UNSUBACK: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96,
    0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH: &[u8] = &[0x00, 0x18, 0x19];

fn table(packet_type: PacketType) -> &'static [u8] {
    match packet_type {
        PacketType::ConnAck => CONNACK,
        PacketType::PubAck | PacketType::PubRec => PUBACK,
        PacketType::PubRel | PacketType::PubComp => PUBREL,
        PacketType::SubAck => SUBACK,
        PacketType::UnsubAck => UNSUBACK,
        PacketType::Disconnect => DISCONNECT,
        PacketType::Auth => AUTH,
        _ => &[],
    }
}

/// Parses an MQTT 5 reason code byte of `packet_type`.
#[inline]
pub(crate) fn decode(packet_type: PacketType, code: u8) -> Result<ReasonCode, DecodeError> {
    let invalid = DecodeError::InvalidReasonCode { packet_type, code };
    if !table(packet_type).contains(&code) {
        return Err(invalid);
    }
    ReasonCode::from_u8(code).ok_or(invalid)
}

/// The byte of an MQTT 5 reason code, if `packet_type` may carry it.
#[inline]
pub(crate) fn encode(packet_type: PacketType, reason: ReasonCode) -> Result<u8, EncodeError> {
    let code = reason.as_u8();
    if table(packet_type).contains(&code) {
        Ok(code)
    } else {
        Err(EncodeError::NotRepresentable("reason code not defined for this packet type"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_entry_is_a_defined_code() {
        for packet_type in [
            PacketType::ConnAck,
            PacketType::PubAck,
            PacketType::PubRel,
            PacketType::SubAck,
            PacketType::UnsubAck,
            PacketType::Disconnect,
            PacketType::Auth,
        ] {
            for &code in table(packet_type) {
                let reason = decode(packet_type, code).unwrap();
                assert_eq!(encode(packet_type, reason), Ok(code));
            }
        }
    }

    #[test]
    fn codes_outside_the_table_are_refused() {
        assert_eq!(
            decode(PacketType::PubRel, 0x10),
            Err(DecodeError::InvalidReasonCode { packet_type: PacketType::PubRel, code: 0x10 })
        );
        assert!(decode(PacketType::Auth, 0x80).is_err());
        assert!(decode(PacketType::ConnAck, 0x8B).is_err());
        assert!(encode(PacketType::SubAck, ReasonCode::NoSubscriptionExisted).is_err());
    }
}
