//! The records the broker keeps in a shard's log, and their byte encoding.
//!
//! Owner: pure functions over byte slices; no state. Each record is one log record: a kind byte,
//! then fixed-width little-endian fields, strings as a u16 length and UTF-8 bytes. Messages are
//! stored as an MQTT 5 PUBLISH frame encoded by our own codec: it already carries every property a
//! message can have, it is validated on the way back in, and it is the one serialisation of a
//! message this project maintains (see ARCHITECTURE.md, "Storage").
//!
//! Every record but `Session`, `Msg` and `Retain` refers to an earlier record by identity (session
//! uid, message id, tenant and topic), never by log offset: compaction moves records.
//!
//! Versioning: the first byte of every record is its kind; kinds are never reused. A kind this
//! build does not know is an error naming the file (see `recovery.rs`), never skipped.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use shardmq_protocol::{
    decode, encode, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS, RetainHandling,
    SubscriptionOptions, Utf8,
};

use crate::message::TenantId;
use crate::session::SubEntry;

pub const KIND_SESSION: u8 = 1;
pub const KIND_SESSION_GONE: u8 = 2;
pub const KIND_MSG: u8 = 3;
pub const KIND_DONE: u8 = 4;
pub const KIND_SENT: u8 = 5;
pub const KIND_RELEASED: u8 = 6;
pub const KIND_RETAIN: u8 = 7;
pub const KIND_RETAIN_DEL: u8 = 8;
pub const KIND_INBOUND: u8 = 9;
pub const KIND_INBOUND_DONE: u8 = 10;

/// A persistent session as stored: everything but its messages, which are `Msg` records.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRec {
    pub uid: u64,
    pub tenant: TenantId,
    pub version: ProtocolVersion,
    pub expiry_secs: u32,
    /// Unix time (ms) at which the offline session expires; 0 while it is connected (a session
    /// connected at a crash counts as disconnected when the broker starts again).
    pub expires_at_ms: u64,
    pub client_id: String,
    pub subscriptions: Vec<(Box<str>, SubEntry)>,
    /// The session's will, kept until it is published or cleared.
    pub will: Option<StoredWill>,
}

/// A stored will: its message as a PUBLISH frame (the will delay is kept apart: it is not a
/// PUBLISH property), its delay, and when it is due if its connection is already gone.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWill {
    pub delay_secs: u32,
    /// Unix ms at which it is due; 0 while its connection is up (a crash then counts as the
    /// connection's end, at the next start).
    pub due_at_ms: u64,
    pub publish: Publish,
}

/// One session a stored message is queued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub uid: u64,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
}

/// A stored application message (its topic, payload and properties as a PUBLISH frame).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub tenant: TenantId,
    pub publish: Publish,
    /// Unix time (ms) of its message expiry; 0 = never.
    pub expires_at_ms: u64,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq)]
pub enum Rec {
    Session(SessionRec),
    /// The session ended; its snapshot and its message targets are dead.
    SessionGone {
        uid: u64,
    },
    /// A message queued for `targets`, all sessions of this shard.
    Msg {
        id: u64,
        targets: Vec<Target>,
        message: StoredMessage,
    },
    /// Message `msg` is finished for session `uid` (acknowledged, expired or dropped).
    Done {
        uid: u64,
        msg: u64,
    },
    /// Message `msg` went out to session `uid` with this packet id.
    Sent {
        uid: u64,
        msg: u64,
        packet_id: PacketId,
    },
    /// Session `uid` sent PUBREC for QoS 2 message `msg`: PUBREL is owed, not the PUBLISH.
    Released {
        uid: u64,
        msg: u64,
    },
    /// The retained message of its topic in its tenant. `seq` orders the versions of a topic
    /// (compaction moves records, so offsets do not): the highest wins on replay.
    Retain {
        seq: u64,
        message: StoredMessage,
    },
    /// Session `uid` received QoS 2 PUBLISH `packet_id` and routed it: a resend must not be routed
    /// again until PUBREL (ordered by `seq`: clients reuse packet ids).
    Inbound {
        seq: u64,
        uid: u64,
        packet_id: PacketId,
    },
    /// The PUBREL for it arrived.
    InboundDone {
        seq: u64,
        uid: u64,
        packet_id: PacketId,
    },
    /// The retained message of the topic was deleted (ordered by `seq` as above).
    RetainDel {
        seq: u64,
        tenant: TenantId,
        topic: String,
    },
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecError {
    UnknownKind(u8),
    Truncated,
    Invalid(&'static str),
}

impl std::fmt::Display for RecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecError::UnknownKind(kind) => {
                write!(f, "unknown record kind {kind} (written by a newer shardmq?)")
            }
            RecError::Truncated => write!(f, "record shorter than its fields"),
            RecError::Invalid(what) => write!(f, "invalid record: {what}"),
        }
    }
}

fn version_byte(version: ProtocolVersion) -> u8 {
    version.level()
}

fn version_from(byte: u8) -> Result<ProtocolVersion, RecError> {
    match byte {
        3 => Ok(ProtocolVersion::V3_1),
        4 => Ok(ProtocolVersion::V3_1_1),
        5 => Ok(ProtocolVersion::V5),
        _ => Err(RecError::Invalid("protocol version")),
    }
}

fn options_byte(options: &SubscriptionOptions) -> u8 {
    options.qos as u8
        | u8::from(options.no_local) << 2
        | u8::from(options.retain_as_published) << 3
        | (options.retain_handling as u8) << 4
}

fn options_from(byte: u8) -> Result<SubscriptionOptions, RecError> {
    Ok(SubscriptionOptions {
        qos: QoS::from_u8(byte & 3).ok_or(RecError::Invalid("subscription QoS"))?,
        no_local: byte & 4 != 0,
        retain_as_published: byte & 8 != 0,
        retain_handling: match (byte >> 4) & 3 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(RecError::Invalid("retain handling")),
        },
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len]);
}

/// Appends the PUBLISH frame of a message. Topics and properties came through our decoder, so
/// encoding cannot fail; a failure would be a bug and is reported as such by the caller's decode.
fn put_publish(out: &mut Vec<u8>, publish: &Publish) {
    let mut buf = BytesMut::new();
    let _ = encode(&Packet::Publish(publish.clone()), ProtocolVersion::V5, &mut buf);
    out.put_slice(&buf);
}

/// Builds the PUBLISH a message is stored as.
pub fn stored_publish(
    topic: &Utf8,
    payload: &bytes::Bytes,
    qos: QoS,
    retain: bool,
    properties: Option<&Properties>,
) -> Publish {
    Publish {
        dup: false,
        qos,
        retain,
        topic: topic.clone(),
        // The codec requires a packet id exactly when QoS > 0; the stored one means nothing.
        packet_id: (qos != QoS::AtMostOnce).then_some(1),
        properties: properties.cloned().unwrap_or_default(),
        payload: payload.clone(),
    }
}

/// Encodes a record into `out` (cleared first).
pub fn encode_rec(rec: &Rec, out: &mut Vec<u8>) {
    out.clear();
    match rec {
        Rec::Session(s) => {
            out.push(KIND_SESSION);
            out.extend_from_slice(&s.uid.to_le_bytes());
            out.extend_from_slice(&s.tenant.0.to_le_bytes());
            out.push(version_byte(s.version));
            out.extend_from_slice(&s.expiry_secs.to_le_bytes());
            out.extend_from_slice(&s.expires_at_ms.to_le_bytes());
            put_str(out, &s.client_id);
            out.extend_from_slice(&(s.subscriptions.len() as u32).to_le_bytes());
            for (filter, entry) in &s.subscriptions {
                put_str(out, filter);
                out.push(options_byte(&entry.options));
                out.extend_from_slice(&entry.subscription_id.unwrap_or(0).to_le_bytes());
            }
            match &s.will {
                None => out.push(0),
                Some(will) => {
                    out.push(1);
                    out.extend_from_slice(&will.delay_secs.to_le_bytes());
                    out.extend_from_slice(&will.due_at_ms.to_le_bytes());
                    put_publish(out, &will.publish);
                }
            }
        }
        Rec::SessionGone { uid } => {
            out.push(KIND_SESSION_GONE);
            out.extend_from_slice(&uid.to_le_bytes());
        }
        Rec::Msg { id, targets, message } => {
            out.push(KIND_MSG);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&message.tenant.0.to_le_bytes());
            out.extend_from_slice(&message.expires_at_ms.to_le_bytes());
            out.extend_from_slice(&(targets.len() as u32).to_le_bytes());
            for target in targets {
                out.extend_from_slice(&target.uid.to_le_bytes());
                out.push(target.qos as u8 | u8::from(target.retain) << 2);
                let ids = target.subscription_ids.len().min(255);
                out.push(ids as u8);
                for id in &target.subscription_ids[..ids] {
                    out.extend_from_slice(&id.to_le_bytes());
                }
            }
            put_publish(out, &message.publish);
        }
        Rec::Done { uid, msg } | Rec::Released { uid, msg } => {
            out.push(if matches!(rec, Rec::Done { .. }) { KIND_DONE } else { KIND_RELEASED });
            out.extend_from_slice(&uid.to_le_bytes());
            out.extend_from_slice(&msg.to_le_bytes());
        }
        Rec::Sent { uid, msg, packet_id } => {
            out.push(KIND_SENT);
            out.extend_from_slice(&uid.to_le_bytes());
            out.extend_from_slice(&msg.to_le_bytes());
            out.extend_from_slice(&packet_id.to_le_bytes());
        }
        Rec::Retain { seq, message } => {
            out.push(KIND_RETAIN);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&message.tenant.0.to_le_bytes());
            out.extend_from_slice(&message.expires_at_ms.to_le_bytes());
            put_publish(out, &message.publish);
        }
        Rec::Inbound { seq, uid, packet_id } | Rec::InboundDone { seq, uid, packet_id } => {
            out.push(if matches!(rec, Rec::Inbound { .. }) { KIND_INBOUND } else { KIND_INBOUND_DONE });
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&uid.to_le_bytes());
            out.extend_from_slice(&packet_id.to_le_bytes());
        }
        Rec::RetainDel { seq, tenant, topic } => {
            out.push(KIND_RETAIN_DEL);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&tenant.0.to_le_bytes());
            put_str(out, topic);
        }
    }
}

/// A cursor over a record's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecError> {
        if self.bytes.len() < n {
            return Err(RecError::Truncated);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, RecError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, RecError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, RecError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, RecError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn str(&mut self) -> Result<&'a str, RecError> {
        let len = self.u16()? as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| RecError::Invalid("string is not UTF-8"))
    }

    /// The target list of a `Msg` record (count, then per target: uid, flags, subscription ids).
    fn targets(&mut self) -> Result<Vec<Target>, RecError> {
        let mut targets = Vec::new();
        self.targets_into(&mut targets)?;
        Ok(targets)
    }

    /// Appends the record's targets to `targets` (recovery keeps every message's targets in one
    /// vector instead of one allocation per message).
    fn targets_into(&mut self, targets: &mut Vec<Target>) -> Result<(), RecError> {
        let count = self.u32()? as usize;
        targets.reserve(count.min(4096));
        for _ in 0..count {
            let uid = self.u64()?;
            let flags = self.u8()?;
            let qos = QoS::from_u8(flags & 3).ok_or(RecError::Invalid("target QoS"))?;
            let ids = self.u8()? as usize;
            let mut subscription_ids = Vec::with_capacity(ids);
            for _ in 0..ids {
                subscription_ids.push(self.u32()?);
            }
            targets.push(Target { uid, qos, retain: flags & 4 != 0, subscription_ids });
        }
        Ok(())
    }

    fn publish(&mut self) -> Result<Publish, RecError> {
        let mut buf = BytesMut::from(std::mem::take(&mut self.bytes));
        match decode(&mut buf, ProtocolVersion::V5, u32::MAX) {
            Ok(Some(Packet::Publish(publish))) if buf.is_empty() => Ok(publish),
            _ => Err(RecError::Invalid("stored PUBLISH frame")),
        }
    }
}

/// The kind and the first identity field of a record, without decoding the rest (for compaction
/// moves, which only need to know whose record moved).
pub fn peek_kind(bytes: &[u8]) -> Result<u8, RecError> {
    match bytes.first() {
        Some(&kind) if (KIND_SESSION..=KIND_INBOUND_DONE).contains(&kind) => Ok(kind),
        Some(&kind) => Err(RecError::UnknownKind(kind)),
        None => Err(RecError::Truncated),
    }
}

/// Decodes one record.
pub fn decode_rec(bytes: &[u8]) -> Result<Rec, RecError> {
    let kind = peek_kind(bytes)?;
    let mut c = Cursor { bytes: &bytes[1..] };
    let rec = match kind {
        KIND_SESSION => {
            let uid = c.u64()?;
            let tenant = TenantId(c.u32()?);
            let version = version_from(c.u8()?)?;
            let expiry_secs = c.u32()?;
            let expires_at_ms = c.u64()?;
            let client_id = c.str()?.to_string();
            let count = c.u32()? as usize;
            let mut subscriptions = Vec::with_capacity(count.min(4096));
            for _ in 0..count {
                let filter: Box<str> = c.str()?.into();
                let options = options_from(c.u8()?)?;
                let id = c.u32()?;
                subscriptions.push((filter, SubEntry { options, subscription_id: (id != 0).then_some(id) }));
            }
            let will = match c.u8()? {
                0 => None,
                1 => {
                    let delay_secs = c.u32()?;
                    let due_at_ms = c.u64()?;
                    Some(StoredWill { delay_secs, due_at_ms, publish: c.publish()? })
                }
                _ => return Err(RecError::Invalid("will flag")),
            };
            Rec::Session(SessionRec {
                uid,
                tenant,
                version,
                expiry_secs,
                expires_at_ms,
                client_id,
                subscriptions,
                will,
            })
        }
        KIND_SESSION_GONE => Rec::SessionGone { uid: c.u64()? },
        KIND_MSG => {
            let id = c.u64()?;
            let tenant = TenantId(c.u32()?);
            let expires_at_ms = c.u64()?;
            let targets = c.targets()?;
            let publish = c.publish()?;
            Rec::Msg { id, targets, message: StoredMessage { tenant, publish, expires_at_ms } }
        }
        KIND_DONE => Rec::Done { uid: c.u64()?, msg: c.u64()? },
        KIND_RELEASED => Rec::Released { uid: c.u64()?, msg: c.u64()? },
        KIND_SENT => Rec::Sent { uid: c.u64()?, msg: c.u64()?, packet_id: c.u16()? },
        KIND_RETAIN => {
            let seq = c.u64()?;
            let tenant = TenantId(c.u32()?);
            let expires_at_ms = c.u64()?;
            let publish = c.publish()?;
            Rec::Retain { seq, message: StoredMessage { tenant, publish, expires_at_ms } }
        }
        KIND_RETAIN_DEL => {
            let seq = c.u64()?;
            let tenant = TenantId(c.u32()?);
            Rec::RetainDel { seq, tenant, topic: c.str()?.to_string() }
        }
        KIND_INBOUND => Rec::Inbound { seq: c.u64()?, uid: c.u64()?, packet_id: c.u16()? },
        KIND_INBOUND_DONE => Rec::InboundDone { seq: c.u64()?, uid: c.u64()?, packet_id: c.u16()? },
        other => return Err(RecError::UnknownKind(other)),
    };
    if !c.bytes.is_empty() {
        return Err(RecError::Invalid("bytes after the record's fields"));
    }
    Ok(rec)
}

/// The fields of a `Msg` record before its PUBLISH frame: (id, expiry in Unix ms, targets).
/// Recovery reads these for every message and decodes the frame only of messages still queued.
/// Decodes a message record's header: its id and expiry, its targets appended to `targets`.
pub fn decode_msg_header(bytes: &[u8], targets: &mut Vec<Target>) -> Result<(u64, u64), RecError> {
    if peek_kind(bytes)? != KIND_MSG {
        return Err(RecError::Invalid("not a message record"));
    }
    let mut c = Cursor { bytes: &bytes[1..] };
    let id = c.u64()?;
    let _tenant = c.u32()?;
    let expires_at_ms = c.u64()?;
    c.targets_into(targets)?;
    Ok((id, expires_at_ms))
}

/// The identity of a record whose position the store's indexes track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecId {
    Session(u64),
    SessionGone(u64),
    Msg(u64),
    /// Done, Sent or Released of (session, message).
    MsgAux {
        kind: u8,
        uid: u64,
        msg: u64,
    },
    Retain(TenantId, Arc<str>),
    RetainDel(TenantId, Arc<str>),
    Inbound(u64, PacketId),
    InboundDone,
}

/// The identity of an encoded record (for compaction moves).
pub fn rec_id(bytes: &[u8]) -> Result<RecId, RecError> {
    let kind = peek_kind(bytes)?;
    let mut c = Cursor { bytes: &bytes[1..] };
    Ok(match kind {
        KIND_SESSION => RecId::Session(c.u64()?),
        KIND_SESSION_GONE => RecId::SessionGone(c.u64()?),
        KIND_MSG => RecId::Msg(c.u64()?),
        KIND_DONE | KIND_SENT | KIND_RELEASED => RecId::MsgAux { kind, uid: c.u64()?, msg: c.u64()? },
        KIND_RETAIN => match decode_rec(bytes)? {
            Rec::Retain { message, .. } => {
                RecId::Retain(message.tenant, Arc::from(message.publish.topic.as_str()))
            }
            _ => return Err(RecError::Invalid("retain record")),
        },
        KIND_RETAIN_DEL => {
            let _seq = c.u64()?;
            let tenant = TenantId(c.u32()?);
            RecId::RetainDel(tenant, Arc::from(c.str()?))
        }
        KIND_INBOUND => {
            let _seq = c.u64()?;
            RecId::Inbound(c.u64()?, c.u16()?)
        }
        KIND_INBOUND_DONE => RecId::InboundDone,
        other => return Err(RecError::UnknownKind(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmq_protocol::UserProperty;

    fn message(qos: QoS) -> StoredMessage {
        let mut properties = Properties::default();
        properties
            .user_properties
            .push(UserProperty { name: Utf8::new("k").unwrap(), value: Utf8::new("v").unwrap() });
        properties.content_type = Some(Utf8::new("text/plain").unwrap());
        StoredMessage {
            tenant: TenantId(7),
            publish: stored_publish(
                &Utf8::new("a/b").unwrap(),
                &bytes::Bytes::from_static(b"payload"),
                qos,
                true,
                Some(&properties),
            ),
            expires_at_ms: 1_234,
        }
    }

    fn all_kinds() -> Vec<Rec> {
        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::SendIfNew,
        };
        vec![
            Rec::Session(SessionRec {
                uid: 9,
                tenant: TenantId(3),
                version: ProtocolVersion::V5,
                expiry_secs: 60,
                expires_at_ms: 1_000,
                client_id: "client-é".into(),
                subscriptions: vec![
                    ("a/#".into(), SubEntry { options, subscription_id: Some(5) }),
                    (
                        "$share/g/b".into(),
                        SubEntry { options: SubscriptionOptions::default(), subscription_id: None },
                    ),
                ],
                will: Some(StoredWill {
                    delay_secs: 30,
                    due_at_ms: 99,
                    publish: message(QoS::AtLeastOnce).publish,
                }),
            }),
            Rec::Session(SessionRec {
                uid: 10,
                tenant: TenantId(0),
                version: ProtocolVersion::V3_1_1,
                expiry_secs: u32::MAX,
                expires_at_ms: 0,
                client_id: String::new(),
                subscriptions: vec![],
                will: None,
            }),
            Rec::SessionGone { uid: 9 },
            Rec::Msg {
                id: 44,
                targets: vec![
                    Target { uid: 1, qos: QoS::AtLeastOnce, retain: false, subscription_ids: vec![] },
                    Target { uid: 2, qos: QoS::ExactlyOnce, retain: true, subscription_ids: vec![1, 70_000] },
                ],
                message: message(QoS::ExactlyOnce),
            },
            Rec::Msg { id: 45, targets: vec![], message: message(QoS::AtMostOnce) },
            Rec::Done { uid: 1, msg: 44 },
            Rec::Sent { uid: 1, msg: 44, packet_id: 65_535 },
            Rec::Released { uid: 2, msg: 44 },
            Rec::Retain { seq: 3, message: message(QoS::AtLeastOnce) },
            Rec::RetainDel { seq: 4, tenant: TenantId(2), topic: "x/y".into() },
            Rec::Inbound { seq: 5, uid: 9, packet_id: 77 },
            Rec::InboundDone { seq: 6, uid: 9, packet_id: 77 },
        ]
    }

    #[test]
    fn every_kind_round_trips_and_names_its_identity() {
        let mut buf = Vec::new();
        for rec in all_kinds() {
            encode_rec(&rec, &mut buf);
            assert_eq!(decode_rec(&buf).unwrap(), rec);
            let id = rec_id(&buf).unwrap();
            match (&rec, id) {
                (Rec::Session(s), RecId::Session(uid)) => assert_eq!(s.uid, uid),
                (Rec::SessionGone { uid }, RecId::SessionGone(got)) => assert_eq!(*uid, got),
                (Rec::Msg { id, .. }, RecId::Msg(got)) => assert_eq!(*id, got),
                (Rec::Done { uid, msg }, RecId::MsgAux { kind: KIND_DONE, uid: u, msg: m })
                | (Rec::Released { uid, msg }, RecId::MsgAux { kind: KIND_RELEASED, uid: u, msg: m })
                | (Rec::Sent { uid, msg, .. }, RecId::MsgAux { kind: KIND_SENT, uid: u, msg: m }) => {
                    assert_eq!((*uid, *msg), (u, m))
                }
                (Rec::Retain { message: m, .. }, RecId::Retain(tenant, topic)) => {
                    assert_eq!((m.tenant, m.publish.topic.as_str()), (tenant, &*topic))
                }
                (Rec::RetainDel { tenant, topic, .. }, RecId::RetainDel(t, got)) => {
                    assert_eq!((*tenant, topic.as_str()), (t, &*got))
                }
                (Rec::Inbound { uid, packet_id, .. }, RecId::Inbound(u, p)) => {
                    assert_eq!((*uid, *packet_id), (u, p))
                }
                (Rec::InboundDone { .. }, RecId::InboundDone) => {}
                (rec, id) => panic!("{rec:?} has identity {id:?}"),
            }
        }
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let mut buf = Vec::new();
        for rec in all_kinds() {
            encode_rec(&rec, &mut buf);
            for cut in 0..buf.len() {
                assert!(decode_rec(&buf[..cut]).is_err(), "{rec:?} cut at {cut} decoded");
            }
            let mut longer = buf.clone();
            longer.push(0);
            assert!(decode_rec(&longer).is_err(), "{rec:?} with a trailing byte decoded");
        }
        assert_eq!(decode_rec(&[200]), Err(RecError::UnknownKind(200)));
        assert_eq!(decode_rec(&[]), Err(RecError::Truncated));
    }
}
