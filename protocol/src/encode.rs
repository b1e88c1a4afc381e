//! Encoding: packets in, bytes out.
//!
//! Owns: the fixed header, the dispatch to each packet family, and the two-pass scheme: a plan
//! (every length, computed without temporary buffers and checked against the wire limits), then
//! one `reserve` and straight `put_*` calls. Does not own: the layout of each packet (the family
//! files) or policy (which packets to send).
//!
//! Invariants:
//! - [`encoded_len`] equals the number of bytes [`encode`] appends (both follow the same plan).
//! - [`encode`] appends nothing when it returns an error.
//! - For every packet that encodes without error, decoding the bytes with the same version gives
//!   back an equal packet, except for fields the version cannot carry (v5-only fields in 3.x), which
//!   are ignored, and 3.x reason codes, which are mapped as documented on [`encode`].

use bytes::{BufMut, BytesMut};

use crate::connect;
use crate::control;
use crate::error::EncodeError;
use crate::packet::{Packet, ProtocolVersion};
use crate::publish;
use crate::subscribe;
use crate::wire::{put_varint, varint_len, VARINT_MAX};
use crate::PACKET_SIZE_MAX_BYTES;

/// The lengths of one packet's encoding, computed before writing anything.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Packet type and flags.
    pub(crate) first_byte: u8,
    /// Everything after the fixed header.
    pub(crate) remaining_len: usize,
    /// The packet's property block, without its length prefix (MQTT 5 only).
    pub(crate) props_len: usize,
    /// The will's property block (CONNECT with a will, MQTT 5 only).
    pub(crate) will_props_len: usize,
}

impl Plan {
    /// A plan without property blocks.
    pub(crate) fn bare(first_byte: u8, remaining_len: usize) -> Plan {
        Plan { first_byte, remaining_len, props_len: 0, will_props_len: 0 }
    }

    /// The whole packet, fixed header included.
    pub(crate) fn total_len(&self) -> usize {
        1 + varint_len(self.remaining_len) + self.remaining_len
    }

    /// Refuses a remaining length the fixed header cannot express.
    fn checked(self) -> Result<Plan, EncodeError> {
        if self.remaining_len > VARINT_MAX as usize {
            return Err(EncodeError::PacketTooLarge {
                size_bytes: self.total_len(),
                max_bytes: PACKET_SIZE_MAX_BYTES,
            });
        }
        Ok(self)
    }
}

fn plan(packet: &Packet, version: ProtocolVersion) -> Result<Plan, EncodeError> {
    let plan = match packet {
        Packet::Publish(publish) => publish::plan_publish(publish, version)?,
        Packet::PubAck(resp) | Packet::PubRec(resp) | Packet::PubRel(resp) | Packet::PubComp(resp) => {
            publish::plan_pub_resp(packet.packet_type(), resp, version)?
        }
        Packet::Connect(connect) => connect::plan_connect(connect)?,
        Packet::ConnAck(connack) => connect::plan_connack(connack, version)?,
        Packet::Subscribe(subscribe) => subscribe::plan_subscribe(subscribe, version)?,
        Packet::SubAck(suback) => subscribe::plan_suback(suback, version)?,
        Packet::Unsubscribe(unsubscribe) => subscribe::plan_unsubscribe(unsubscribe, version)?,
        Packet::UnsubAck(unsuback) => subscribe::plan_unsuback(unsuback, version)?,
        Packet::PingReq => Plan::bare(0xC0, 0),
        Packet::PingResp => Plan::bare(0xD0, 0),
        Packet::Disconnect(disconnect) => control::plan_disconnect(disconnect, version)?,
        Packet::Auth(auth) => control::plan_auth(auth, version)?,
    };
    plan.checked()
}

/// Appends the encoding of `packet` for `version` to `buf`.
///
/// A CONNECT is encoded for its own `protocol` field, whatever `version` says (as the decoder
/// reads it by its own level). Fields that `version` cannot carry are ignored: properties and
/// reason codes in 3.x, except that a 3.x CONNACK maps its reason with
/// [`ReasonCode::to_v3_connack`](crate::ReasonCode::to_v3_connack), a 3.x SUBACK maps granted QoS
/// 0/1/2 to 0/1/2 and any error to 0x80, and a 3.x UNSUBACK has no payload. A packet the decoder
/// would refuse (a property not allowed on its packet, a reason code not defined for it, DUP on
/// QoS 0, packet identifier 0, no filters...) is refused with [`EncodeError::NotRepresentable`].
/// The topic of a PUBLISH is trusted to be a valid topic name (the broker validated it on input);
/// it is not scanned for wildcards here, to keep the outgoing path lean.
pub fn encode(packet: &Packet, version: ProtocolVersion, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let plan = plan(packet, version)?;
    buf.reserve(plan.total_len());
    let start = buf.len();
    buf.put_u8(plan.first_byte);
    put_varint(buf, plan.remaining_len);
    match packet {
        Packet::Publish(publish) => publish::put_publish(buf, publish, version, &plan),
        Packet::PubAck(resp) | Packet::PubRec(resp) | Packet::PubRel(resp) | Packet::PubComp(resp) => {
            publish::put_pub_resp(buf, resp, version, &plan)
        }
        Packet::Connect(connect) => connect::put_connect(buf, connect, &plan),
        Packet::ConnAck(connack) => connect::put_connack(buf, connack, version, &plan),
        Packet::Subscribe(subscribe) => subscribe::put_subscribe(buf, subscribe, version, &plan),
        Packet::SubAck(suback) => subscribe::put_suback(buf, suback, version, &plan),
        Packet::Unsubscribe(unsubscribe) => subscribe::put_unsubscribe(buf, unsubscribe, version, &plan),
        Packet::UnsubAck(unsuback) => subscribe::put_unsuback(buf, unsuback, version, &plan),
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(disconnect) => control::put_disconnect(buf, disconnect, &plan),
        Packet::Auth(auth) => control::put_auth(buf, auth, &plan),
    }
    debug_assert_eq!(buf.len() - start, plan.total_len(), "plan disagrees with put for {packet:?}");
    Ok(())
}

/// The size in bytes `encode` would append, fixed header included.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    Ok(plan(packet, version)?.total_len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Publish, QoS};
    use crate::utf8::Utf8;
    use bytes::Bytes;

    #[test]
    fn oversize_remaining_length_is_refused() {
        // A payload just past the remaining-length ceiling, shared so the test stays cheap.
        let payload = Bytes::from(vec![0u8; VARINT_MAX as usize]);
        let publish = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: Utf8::from_static("t"),
            packet_id: None,
            properties: Default::default(),
            payload,
        });
        assert!(matches!(
            encoded_len(&publish, ProtocolVersion::V3_1_1),
            Err(EncodeError::PacketTooLarge { .. })
        ));
        let mut buf = BytesMut::new();
        assert!(encode(&publish, ProtocolVersion::V3_1_1, &mut buf).is_err());
        assert!(buf.is_empty());
    }

    #[test]
    fn pings_are_two_bytes() {
        let mut buf = BytesMut::new();
        encode(&Packet::PingReq, ProtocolVersion::V5, &mut buf).unwrap();
        encode(&Packet::PingResp, ProtocolVersion::V3_1, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0xC0, 0, 0xD0, 0]);
    }
}
