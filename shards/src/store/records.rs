//! The records the broker keeps in a shard's log, and their byte encoding: rkyv archives.
//!
//! Owner: pure functions over byte slices; no state.
//!
//! A record is one log payload (the log hands payloads out 8-byte aligned):
//!
//! ```text
//! 0      kind (KIND_*): which struct of `schema` the archive holds; kinds are never reused
//! 1      record encoding = RECORD_ENCODING
//! 2..4   zero
//! 4..8   the archive's length in bytes (u32 LE): the rest of the record
//! 8..    the rkyv archive of the kind's struct, checked by rkyv's validation on every read
//! ```
//!
//! The archive starts 8 bytes into an 8-byte aligned payload, so it is read in place: nothing is
//! deserialised to find a record's identity or a message's targets. A slice that is not aligned
//! (no log hands one out; a test does) is copied into an aligned buffer first, never read
//! misaligned.
//!
//! A message (and a will) is kept inside its archive as the bytes of an MQTT 5 PUBLISH frame made
//! by our own codec: it carries every property a message can have, it is validated again when it
//! is decoded, and it stays the one serialisation of a message's properties this project
//! maintains (see ARCHITECTURE.md, "Storage"). The frame is read in place and decoded only when
//! the message itself is loaded; recovery reads a message's id, expiry and targets straight from
//! the archive (`decode_msg_header`).
//!
//! Every record but `Session`, `Msg` and `Retain` refers to an earlier record by identity (session
//! uid, message id, tenant and topic), never by log offset: compaction moves records.
//!
//! Versioning: a kind this build does not know, an encoding other than [`RECORD_ENCODING`], a
//! length that disagrees with the record or an archive that fails validation is a [`RecError`],
//! which recovery reports naming the file and position (see `recovery.rs`); nothing is skipped.
//! Changing a struct of `schema` changes the bytes on disk and needs a new encoding number.
//! Encoding 2 archived each message target with a vector of its own (never released). Encoding 1
//! was the hand-written little-endian encoding that came before rkyv; it had no
//! encoding byte (its second byte was the low byte of an id or sequence number), so such a record
//! fails the encoding check, the zero bytes, the length or validation, and an old data directory
//! is refused rather than misread.
//!
//! Invariant: no function here panics on any input bytes.

use std::sync::Arc;

use bytes::BytesMut;
use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Portable, Serialize};
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

/// The record encoding this build writes and reads: 3 = an rkyv archive behind the 8-byte prefix,
/// a message's targets 16 bytes each (1 was the hand encoding, which carried no encoding byte;
/// 2 archived each target with a vector of its own, 24 bytes and one more subtree to validate
/// per target, and was never released).
pub const RECORD_ENCODING: u8 = 3;
/// The kind, the encoding, two zero bytes and the archive length before every archive.
const PREFIX_LEN_BYTES: usize = 8;
/// The alignment the archives need (rkyv's archived `u64`) and that the prefix keeps.
const ARCHIVE_ALIGN_BYTES: usize = 8;

// The archive is aligned wherever the record is: the prefix keeps the alignment, the log aligns
// every payload at least as much, and no archived struct needs more.
const _: () = {
    assert!(PREFIX_LEN_BYTES.is_multiple_of(ARCHIVE_ALIGN_BYTES));
    assert!(shardmq_storage::RECORD_ALIGN_BYTES.is_multiple_of(ARCHIVE_ALIGN_BYTES));
    assert!(align_of::<schema::ArchivedSession<'static>>() <= ARCHIVE_ALIGN_BYTES);
    assert!(align_of::<schema::ArchivedMsg<'static>>() <= ARCHIVE_ALIGN_BYTES);
    assert!(align_of::<schema::ArchivedRetain<'static>>() <= ARCHIVE_ALIGN_BYTES);
    assert!(align_of::<schema::ArchivedRetainDel<'static>>() <= ARCHIVE_ALIGN_BYTES);
    assert!(align_of::<schema::ArchivedUid>() <= ARCHIVE_ALIGN_BYTES);
    assert!(align_of::<schema::ArchivedProgress>() <= ARCHIVE_ALIGN_BYTES);
    assert!(align_of::<schema::ArchivedSent>() <= ARCHIVE_ALIGN_BYTES);
    assert!(align_of::<schema::ArchivedInbound>() <= ARCHIVE_ALIGN_BYTES);
};

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

/// One session a stored message is queued for. Archived as a 16-byte `schema::MsgTarget`, its
/// subscription identifiers (rare) in one list per message.
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

impl Rec {
    fn kind(&self) -> u8 {
        match self {
            Rec::Session(_) => KIND_SESSION,
            Rec::SessionGone { .. } => KIND_SESSION_GONE,
            Rec::Msg { .. } => KIND_MSG,
            Rec::Done { .. } => KIND_DONE,
            Rec::Sent { .. } => KIND_SENT,
            Rec::Released { .. } => KIND_RELEASED,
            Rec::Retain { .. } => KIND_RETAIN,
            Rec::Inbound { .. } => KIND_INBOUND,
            Rec::InboundDone { .. } => KIND_INBOUND_DONE,
            Rec::RetainDel { .. } => KIND_RETAIN_DEL,
        }
    }
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecError {
    UnknownKind(u8),
    /// A known kind in a record encoding this build does not read.
    UnknownEncoding(u8),
    Truncated,
    Invalid(&'static str),
    /// The archive failed rkyv's validation (the text names what failed).
    Archive(String),
}

impl std::fmt::Display for RecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecError::UnknownKind(kind) => {
                write!(f, "unknown record kind {kind} (written by a newer shardmq?)")
            }
            RecError::UnknownEncoding(encoding) => write!(
                f,
                "record encoding {encoding} is not the one this build reads ({RECORD_ENCODING}, rkyv): \
                 the data directory was written by another version of shardmq (before {RECORD_ENCODING}, \
                 records were hand-encoded and carried no encoding byte)"
            ),
            RecError::Truncated => write!(f, "record shorter than its fields"),
            RecError::Invalid(what) => write!(f, "invalid record: {what}"),
            RecError::Archive(what) => write!(f, "invalid record archive: {what}"),
        }
    }
}

impl From<rancor::Error> for RecError {
    fn from(error: rancor::Error) -> RecError {
        RecError::Archive(error.to_string())
    }
}

/// The archived structs behind the prefix: the bytes on disk. Each is written from borrowed
/// fields (`InlineAsBox` archives a `&str` or `&[T]` in place of a `String` or `Vec`), so
/// encoding copies straight from the record. Changing one needs a new [`RECORD_ENCODING`].
mod schema {
    use rkyv::with::InlineAsBox;
    use rkyv::{Archive, Serialize};

    /// `Session`: a persistent session's snapshot.
    #[derive(Archive, Serialize)]
    pub(super) struct Session<'a> {
        pub(super) uid: u64,
        pub(super) tenant: u32,
        /// The MQTT protocol level (3, 4 or 5).
        pub(super) version: u8,
        pub(super) expiry_secs: u32,
        pub(super) expires_at_ms: u64,
        #[rkyv(with = InlineAsBox)]
        pub(super) client_id: &'a str,
        pub(super) subscriptions: Vec<Subscription<'a>>,
        pub(super) will: Option<Will<'a>>,
    }

    #[derive(Archive, Serialize)]
    pub(super) struct Subscription<'a> {
        #[rkyv(with = InlineAsBox)]
        pub(super) filter: &'a str,
        /// QoS in bits 0-1, no local 2, retain as published 3, retain handling 4-5.
        pub(super) options: u8,
        /// 0 = none (a subscription identifier is at least 1).
        pub(super) subscription_id: u32,
    }

    #[derive(Archive, Serialize)]
    pub(super) struct Will<'a> {
        pub(super) delay_secs: u32,
        pub(super) due_at_ms: u64,
        /// The will message as an MQTT 5 PUBLISH frame.
        #[rkyv(with = InlineAsBox)]
        pub(super) frame: &'a [u8],
    }

    /// `Msg`: a message and the sessions it is queued for.
    #[derive(Archive, Serialize)]
    pub(super) struct Msg<'a> {
        pub(super) id: u64,
        pub(super) expires_at_ms: u64,
        pub(super) tenant: u32,
        pub(super) targets: Vec<MsgTarget>,
        /// Every target's subscription identifiers, in target order (`MsgTarget::ids` each).
        #[rkyv(with = InlineAsBox)]
        pub(super) subscription_ids: &'a [u32],
        /// The message as an MQTT 5 PUBLISH frame.
        #[rkyv(with = InlineAsBox)]
        pub(super) frame: &'a [u8],
    }

    /// One target of a `Msg`: 16 bytes archived, no pointer of its own (a vector of identifiers
    /// per target made a stored 64-byte message 16 bytes longer and its validation slower).
    #[derive(Archive, Serialize)]
    pub(super) struct MsgTarget {
        pub(super) uid: u64,
        /// QoS in bits 0-1, retain in bit 2.
        pub(super) flags: u8,
        /// How many of the message's `subscription_ids` are this target's.
        pub(super) ids: u8,
    }

    /// `Retain`: the retained message of its topic.
    #[derive(Archive, Serialize)]
    pub(super) struct Retain<'a> {
        pub(super) seq: u64,
        pub(super) tenant: u32,
        pub(super) expires_at_ms: u64,
        #[rkyv(with = InlineAsBox)]
        pub(super) frame: &'a [u8],
    }

    /// `RetainDel`.
    #[derive(Archive, Serialize)]
    pub(super) struct RetainDel<'a> {
        pub(super) seq: u64,
        pub(super) tenant: u32,
        #[rkyv(with = InlineAsBox)]
        pub(super) topic: &'a str,
    }

    /// `SessionGone`.
    #[derive(Archive, Serialize)]
    pub(super) struct Uid {
        pub(super) uid: u64,
    }

    /// `Done` and `Released`.
    #[derive(Archive, Serialize)]
    pub(super) struct Progress {
        pub(super) uid: u64,
        pub(super) msg: u64,
    }

    /// `Sent`.
    #[derive(Archive, Serialize)]
    pub(super) struct Sent {
        pub(super) uid: u64,
        pub(super) msg: u64,
        pub(super) packet_id: u16,
    }

    /// `Inbound` and `InboundDone`.
    #[derive(Archive, Serialize)]
    pub(super) struct Inbound {
        pub(super) seq: u64,
        pub(super) uid: u64,
        pub(super) packet_id: u16,
    }
}

/// The subscription identifiers of a target that a record keeps: at most 255 (a subscription has
/// at most one; a target gathers those of its matching subscriptions).
fn kept(target: &Target) -> &[u32] {
    &target.subscription_ids[..target.subscription_ids.len().min(u8::MAX as usize)]
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

/// The PUBLISH frame of a message. Topics and properties came through our decoder, so encoding
/// cannot fail; a failure would be a bug and is reported as such by the decode of the record.
fn frame_of(publish: &Publish) -> BytesMut {
    let mut frame = BytesMut::new();
    let _ = encode(&Packet::Publish(publish.clone()), ProtocolVersion::V5, &mut frame);
    frame
}

/// Decodes a stored PUBLISH frame (it must be exactly one frame).
fn publish_from(frame: &[u8]) -> Result<Publish, RecError> {
    let mut buf = BytesMut::from(frame);
    match decode(&mut buf, ProtocolVersion::V5, u32::MAX) {
        Ok(Some(Packet::Publish(publish))) if buf.is_empty() => Ok(publish),
        _ => Err(RecError::Invalid("stored PUBLISH frame")),
    }
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

/// Appends the archive of `value` to `out`.
fn put_archive<T>(out: &mut Vec<u8>, value: &T)
where
    T: for<'a> Serialize<HighSerializer<Vec<u8>, ArenaHandle<'a>, rancor::Error>>,
{
    // Serialising into a `Vec` fails only for an archive beyond rkyv's 32-bit relative pointers
    // (2 GiB); a record holds at most one MQTT packet (256 MiB) and a session's subscriptions.
    *out = rkyv::api::high::to_bytes_in(value, std::mem::take(out))
        .expect("a record's archive fits rkyv's 32-bit offsets");
}

/// Encodes a record into `out` (cleared first).
pub fn encode_rec(rec: &Rec, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[rec.kind(), RECORD_ENCODING, 0, 0, 0, 0, 0, 0]);
    match rec {
        Rec::Session(s) => {
            let will = s.will.as_ref().map(|will| (will, frame_of(&will.publish)));
            let archive = schema::Session {
                uid: s.uid,
                tenant: s.tenant.0,
                version: s.version.level(),
                expiry_secs: s.expiry_secs,
                expires_at_ms: s.expires_at_ms,
                client_id: &s.client_id,
                subscriptions: s
                    .subscriptions
                    .iter()
                    .map(|(filter, entry)| schema::Subscription {
                        filter,
                        options: options_byte(&entry.options),
                        subscription_id: entry.subscription_id.unwrap_or(0),
                    })
                    .collect(),
                will: will.as_ref().map(|(will, frame)| schema::Will {
                    delay_secs: will.delay_secs,
                    due_at_ms: will.due_at_ms,
                    frame,
                }),
            };
            put_archive(out, &archive);
        }
        Rec::SessionGone { uid } => put_archive(out, &schema::Uid { uid: *uid }),
        Rec::Msg { id, targets, message } => {
            let frame = frame_of(&message.publish);
            let subscription_ids: Vec<u32> = targets.iter().flat_map(|t| kept(t).iter().copied()).collect();
            let archive = schema::Msg {
                id: *id,
                expires_at_ms: message.expires_at_ms,
                tenant: message.tenant.0,
                targets: targets
                    .iter()
                    .map(|t| schema::MsgTarget {
                        uid: t.uid,
                        flags: t.qos as u8 | u8::from(t.retain) << 2,
                        ids: kept(t).len() as u8,
                    })
                    .collect(),
                subscription_ids: &subscription_ids,
                frame: &frame,
            };
            put_archive(out, &archive);
        }
        Rec::Done { uid, msg } | Rec::Released { uid, msg } => {
            put_archive(out, &schema::Progress { uid: *uid, msg: *msg })
        }
        Rec::Sent { uid, msg, packet_id } => {
            put_archive(out, &schema::Sent { uid: *uid, msg: *msg, packet_id: *packet_id })
        }
        Rec::Retain { seq, message } => {
            let frame = frame_of(&message.publish);
            let archive = schema::Retain {
                seq: *seq,
                tenant: message.tenant.0,
                expires_at_ms: message.expires_at_ms,
                frame: &frame,
            };
            put_archive(out, &archive);
        }
        Rec::Inbound { seq, uid, packet_id } | Rec::InboundDone { seq, uid, packet_id } => {
            put_archive(out, &schema::Inbound { seq: *seq, uid: *uid, packet_id: *packet_id })
        }
        Rec::RetainDel { seq, tenant, topic } => {
            put_archive(out, &schema::RetainDel { seq: *seq, tenant: tenant.0, topic })
        }
    }
    let archive_len =
        u32::try_from(out.len() - PREFIX_LEN_BYTES).expect("put_archive refuses archives past 2 GiB");
    out[4..PREFIX_LEN_BYTES].copy_from_slice(&archive_len.to_le_bytes());
}

/// The kind of a record, without decoding the rest.
pub fn peek_kind(bytes: &[u8]) -> Result<u8, RecError> {
    match bytes.first() {
        Some(&kind) if (KIND_SESSION..=KIND_INBOUND_DONE).contains(&kind) => Ok(kind),
        Some(&kind) => Err(RecError::UnknownKind(kind)),
        None => Err(RecError::Truncated),
    }
}

/// Checks a record's prefix: returns its kind and its archive's bytes.
fn split(bytes: &[u8]) -> Result<(u8, &[u8]), RecError> {
    let kind = peek_kind(bytes)?;
    let encoding = *bytes.get(1).ok_or(RecError::Truncated)?;
    if encoding != RECORD_ENCODING {
        return Err(RecError::UnknownEncoding(encoding));
    }
    let Some((prefix, archive)) = bytes.split_first_chunk::<PREFIX_LEN_BYTES>() else {
        return Err(RecError::Truncated);
    };
    if prefix[2..4] != [0, 0] {
        return Err(RecError::Invalid("reserved prefix bytes are not zero"));
    }
    let archive_len = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]) as usize;
    match archive.len().cmp(&archive_len) {
        std::cmp::Ordering::Less => Err(RecError::Truncated),
        std::cmp::Ordering::Greater => Err(RecError::Invalid("bytes after the record's archive")),
        std::cmp::Ordering::Equal => Ok((kind, archive)),
    }
}

/// Validates `archive` as a `T` (rkyv's checked access: bounds, alignment, UTF-8, bools, nested
/// pointers) and hands it to `read`.
fn read_archive<T, R>(archive: &[u8], read: impl FnOnce(&T) -> Result<R, RecError>) -> Result<R, RecError>
where
    T: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
{
    if archive.as_ptr().align_offset(ARCHIVE_ALIGN_BYTES) == 0 {
        return read(rkyv::access::<T, rancor::Error>(archive)?);
    }
    // The log's payloads are 8-byte aligned in its files and mapping, and in its staging buffers
    // as far as the allocator aligns a `Vec<u8>` (glibc: 16 bytes; Rust does not promise it);
    // tests hand in any slice. Whatever the cause, read a copy rather than misaligned bytes.
    let mut aligned = AlignedVec::<ARCHIVE_ALIGN_BYTES>::with_capacity(archive.len());
    aligned.extend_from_slice(archive);
    read(rkyv::access::<T, rancor::Error>(&aligned)?)
}

/// Hands each target of an archived message to `each`, with its subscription identifiers.
fn targets_from(m: &schema::ArchivedMsg<'_>, mut each: impl FnMut(Target)) -> Result<(), RecError> {
    let ids = m.subscription_ids.get();
    let mut next = 0usize;
    for target in m.targets.iter() {
        let count = usize::from(target.ids);
        let own = ids.get(next..next + count).ok_or(RecError::Invalid("target subscription identifiers"))?;
        next += count;
        if target.flags & !7 != 0 {
            return Err(RecError::Invalid("target flags"));
        }
        each(Target {
            uid: target.uid.to_native(),
            qos: QoS::from_u8(target.flags & 3).ok_or(RecError::Invalid("target QoS"))?,
            retain: target.flags & 4 != 0,
            subscription_ids: own.iter().map(|id| id.to_native()).collect(),
        });
    }
    if next != ids.len() {
        return Err(RecError::Invalid("target subscription identifiers"));
    }
    Ok(())
}

fn session_from(s: &schema::ArchivedSession<'_>) -> Result<SessionRec, RecError> {
    let subscriptions = s
        .subscriptions
        .iter()
        .map(|sub| {
            let id = sub.subscription_id.to_native();
            let entry =
                SubEntry { options: options_from(sub.options)?, subscription_id: (id != 0).then_some(id) };
            Ok((Box::from(sub.filter.get()), entry))
        })
        .collect::<Result<_, RecError>>()?;
    let will = match s.will.as_ref() {
        None => None,
        Some(will) => Some(StoredWill {
            delay_secs: will.delay_secs.to_native(),
            due_at_ms: will.due_at_ms.to_native(),
            publish: publish_from(will.frame.get())?,
        }),
    };
    Ok(SessionRec {
        uid: s.uid.to_native(),
        tenant: TenantId(s.tenant.to_native()),
        version: version_from(s.version)?,
        expiry_secs: s.expiry_secs.to_native(),
        expires_at_ms: s.expires_at_ms.to_native(),
        client_id: s.client_id.get().to_string(),
        subscriptions,
        will,
    })
}

/// Decodes one record.
pub fn decode_rec(bytes: &[u8]) -> Result<Rec, RecError> {
    let (kind, archive) = split(bytes)?;
    match kind {
        KIND_SESSION => {
            read_archive(archive, |s: &schema::ArchivedSession<'_>| Ok(Rec::Session(session_from(s)?)))
        }
        KIND_SESSION_GONE => {
            read_archive(archive, |r: &schema::ArchivedUid| Ok(Rec::SessionGone { uid: r.uid.to_native() }))
        }
        KIND_MSG => read_archive(archive, |m: &schema::ArchivedMsg<'_>| {
            let mut targets = Vec::with_capacity(m.targets.len());
            targets_from(m, |t| targets.push(t))?;
            let message = StoredMessage {
                tenant: TenantId(m.tenant.to_native()),
                publish: publish_from(m.frame.get())?,
                expires_at_ms: m.expires_at_ms.to_native(),
            };
            Ok(Rec::Msg { id: m.id.to_native(), targets, message })
        }),
        KIND_DONE | KIND_RELEASED => read_archive(archive, |r: &schema::ArchivedProgress| {
            let (uid, msg) = (r.uid.to_native(), r.msg.to_native());
            Ok(if kind == KIND_DONE { Rec::Done { uid, msg } } else { Rec::Released { uid, msg } })
        }),
        KIND_SENT => read_archive(archive, |r: &schema::ArchivedSent| {
            Ok(Rec::Sent {
                uid: r.uid.to_native(),
                msg: r.msg.to_native(),
                packet_id: r.packet_id.to_native(),
            })
        }),
        KIND_RETAIN => read_archive(archive, |r: &schema::ArchivedRetain<'_>| {
            let message = StoredMessage {
                tenant: TenantId(r.tenant.to_native()),
                publish: publish_from(r.frame.get())?,
                expires_at_ms: r.expires_at_ms.to_native(),
            };
            Ok(Rec::Retain { seq: r.seq.to_native(), message })
        }),
        KIND_RETAIN_DEL => read_archive(archive, |r: &schema::ArchivedRetainDel<'_>| {
            Ok(Rec::RetainDel {
                seq: r.seq.to_native(),
                tenant: TenantId(r.tenant.to_native()),
                topic: r.topic.get().to_string(),
            })
        }),
        KIND_INBOUND | KIND_INBOUND_DONE => read_archive(archive, |r: &schema::ArchivedInbound| {
            let (seq, uid, packet_id) = (r.seq.to_native(), r.uid.to_native(), r.packet_id.to_native());
            Ok(if kind == KIND_INBOUND {
                Rec::Inbound { seq, uid, packet_id }
            } else {
                Rec::InboundDone { seq, uid, packet_id }
            })
        }),
        other => Err(RecError::UnknownKind(other)),
    }
}

/// Reads a `Msg` record's header: returns its id and expiry (Unix ms) and hands each of its
/// targets to `each`. Straight from the archive: the PUBLISH frame is not decoded (recovery
/// decodes it only for messages still queued, when they are loaded). On an error, `each` may
/// have seen some of the targets.
pub fn decode_msg_header(bytes: &[u8], mut each: impl FnMut(Target)) -> Result<(u64, u64), RecError> {
    let (kind, archive) = split(bytes)?;
    if kind != KIND_MSG {
        return Err(RecError::Invalid("not a message record"));
    }
    read_archive(archive, |m: &schema::ArchivedMsg<'_>| {
        targets_from(m, &mut each)?;
        Ok((m.id.to_native(), m.expires_at_ms.to_native()))
    })
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

/// The identity of an encoded record (for compaction moves, which only need to know whose record
/// moved), read from the archive without decoding the rest (but a retained message's frame, which
/// holds its topic).
pub fn rec_id(bytes: &[u8]) -> Result<RecId, RecError> {
    let (kind, archive) = split(bytes)?;
    match kind {
        KIND_SESSION => {
            read_archive(archive, |s: &schema::ArchivedSession<'_>| Ok(RecId::Session(s.uid.to_native())))
        }
        KIND_SESSION_GONE => {
            read_archive(archive, |r: &schema::ArchivedUid| Ok(RecId::SessionGone(r.uid.to_native())))
        }
        KIND_MSG => read_archive(archive, |m: &schema::ArchivedMsg<'_>| Ok(RecId::Msg(m.id.to_native()))),
        KIND_DONE | KIND_RELEASED => read_archive(archive, |r: &schema::ArchivedProgress| {
            Ok(RecId::MsgAux { kind, uid: r.uid.to_native(), msg: r.msg.to_native() })
        }),
        KIND_SENT => read_archive(archive, |r: &schema::ArchivedSent| {
            Ok(RecId::MsgAux { kind, uid: r.uid.to_native(), msg: r.msg.to_native() })
        }),
        KIND_RETAIN => read_archive(archive, |r: &schema::ArchivedRetain<'_>| {
            let publish = publish_from(r.frame.get())?;
            Ok(RecId::Retain(TenantId(r.tenant.to_native()), Arc::from(publish.topic.as_str())))
        }),
        KIND_RETAIN_DEL => read_archive(archive, |r: &schema::ArchivedRetainDel<'_>| {
            Ok(RecId::RetainDel(TenantId(r.tenant.to_native()), Arc::from(r.topic.get())))
        }),
        KIND_INBOUND => read_archive(archive, |r: &schema::ArchivedInbound| {
            Ok(RecId::Inbound(r.uid.to_native(), r.packet_id.to_native()))
        }),
        KIND_INBOUND_DONE => read_archive(archive, |_: &schema::ArchivedInbound| Ok(RecId::InboundDone)),
        other => Err(RecError::UnknownKind(other)),
    }
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
                    Target { uid: 3, qos: QoS::AtMostOnce, retain: false, subscription_ids: vec![5] },
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

    /// `bytes` at an address `shift` bytes past an 8-byte boundary (the log's payloads are at 0).
    fn placed(bytes: &[u8], shift: usize) -> (AlignedVec<8>, std::ops::Range<usize>) {
        let mut buf = AlignedVec::<8>::with_capacity(bytes.len() + shift);
        buf.extend_from_slice(&[0u8; 8][..shift]);
        buf.extend_from_slice(bytes);
        (buf, shift..shift + bytes.len())
    }

    /// What a stored message costs on disk: a 64-byte payload on an 11-byte topic at QoS 1 for two
    /// sessions is 184 bytes of log (the log's 8-byte frame, the 8-byte prefix, the archive:
    /// 32 bytes of targets, the 82-byte PUBLISH frame, a 48-byte root), 8 fewer than encoding 2 and
    /// 40 more than the hand encoding before rkyv. A change of the schema shows here.
    #[test]
    fn a_small_message_record_keeps_its_size() {
        let publish = stored_publish(
            &Utf8::new("bench/00001").unwrap(),
            &bytes::Bytes::from(vec![7u8; 64]),
            QoS::AtLeastOnce,
            false,
            None,
        );
        let target = |uid| Target { uid, qos: QoS::AtLeastOnce, retain: false, subscription_ids: vec![] };
        let rec = Rec::Msg {
            id: 1 << 40,
            targets: vec![target(1), target(2)],
            message: StoredMessage { tenant: TenantId(1), publish, expires_at_ms: 0 },
        };
        let mut buf = Vec::new();
        encode_rec(&rec, &mut buf);
        let in_log = (buf.len() + 8).next_multiple_of(8);
        assert_eq!(in_log, 184, "record payload {} bytes", buf.len());
    }

    #[test]
    fn every_kind_round_trips_and_names_its_identity() {
        let mut buf = Vec::new();
        for rec in all_kinds() {
            encode_rec(&rec, &mut buf);
            assert_eq!(buf[..2], [rec.kind(), RECORD_ENCODING]);
            // In place (as the log hands records out) and from a misaligned copy.
            for shift in [0, 1, 4] {
                let (placed, range) = placed(&buf, shift);
                assert_eq!(decode_rec(&placed[range]).unwrap(), rec, "shifted by {shift}");
            }
            assert_eq!(decode_rec(&buf).unwrap(), rec);
            if let Rec::Msg { id, targets, message } = &rec {
                let mut got =
                    vec![Target { uid: 99, qos: QoS::AtMostOnce, retain: false, subscription_ids: vec![] }];
                assert_eq!(decode_msg_header(&buf, |t| got.push(t)), Ok((*id, message.expires_at_ms)));
                assert_eq!(got[1..], targets[..], "appended after what was there");
            } else {
                assert_eq!(decode_msg_header(&buf, |_| {}), Err(RecError::Invalid("not a message record")));
            }
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
                assert!(rec_id(&buf[..cut]).is_err(), "{rec:?} cut at {cut} has an identity");
                assert!(decode_msg_header(&buf[..cut], |_| {}).is_err(), "{rec:?} cut at {cut}");
            }
            let mut longer = buf.clone();
            longer.push(0);
            assert!(decode_rec(&longer).is_err(), "{rec:?} with a trailing byte decoded");
        }
        assert_eq!(decode_rec(&[200]), Err(RecError::UnknownKind(200)));
        assert_eq!(decode_rec(&[0, RECORD_ENCODING]), Err(RecError::UnknownKind(0)));
        assert_eq!(decode_rec(&[]), Err(RecError::Truncated));
        assert_eq!(decode_rec(&[KIND_DONE]), Err(RecError::Truncated));
        assert_eq!(
            decode_rec(&[KIND_DONE, RECORD_ENCODING + 1]),
            Err(RecError::UnknownEncoding(RECORD_ENCODING + 1))
        );
    }

    use super::super::test_rng::Rng;

    /// Thousands of garbled encodings of every kind (flipped bits, overwritten bytes, runs of
    /// zeros or 0xFF, cut or grown, prefix fixed up so the damage reaches the archive) never
    /// panic, and whatever still decodes is a record that round-trips.
    #[test]
    fn garbled_records_never_panic() {
        let seed = 0x5EED_0000_0000_0001u64;
        let mut rng = Rng(seed);
        let mut buf = Vec::new();
        let mut again = Vec::new();
        let mut decoded = 0usize;
        let mut mutations = 0usize;
        for rec in all_kinds() {
            encode_rec(&rec, &mut buf);
            for round in 0..2_000 {
                let mut bytes = buf.clone();
                for _ in 0..=rng.below(3) {
                    let at = rng.below(bytes.len() as u64) as usize;
                    match rng.below(6) {
                        0 => bytes[at] ^= 1 << rng.below(8),
                        1 => bytes[at] = rng.below(256) as u8,
                        2 => {
                            let end = (at + 1 + rng.below(8) as usize).min(bytes.len());
                            bytes[at..end].fill(0);
                        }
                        3 => {
                            let end = (at + 1 + rng.below(8) as usize).min(bytes.len());
                            bytes[at..end].fill(0xFF);
                        }
                        4 => bytes.truncate(at.max(1)),
                        _ => bytes.extend((0..rng.below(16)).map(|_| rng.below(256) as u8)),
                    }
                }
                // Half the time, keep the prefix valid so the archive itself is what is garbled.
                if round % 2 == 0 && bytes.len() >= PREFIX_LEN_BYTES {
                    bytes[..4].copy_from_slice(&buf[..4]);
                    let archive_len = (bytes.len() - PREFIX_LEN_BYTES) as u32;
                    bytes[4..8].copy_from_slice(&archive_len.to_le_bytes());
                }
                mutations += 1;
                let (placed, range) = placed(&bytes, 0);
                let bytes = &placed[range];
                let _ = peek_kind(bytes);
                let _ = rec_id(bytes);
                let _ = decode_msg_header(bytes, |_| {});
                if let Ok(got) = decode_rec(bytes) {
                    decoded += 1;
                    encode_rec(&got, &mut again);
                    assert_eq!(decode_rec(&again).as_ref(), Ok(&got), "seed {seed:#x}: {bytes:?}");
                }
            }
        }
        assert_eq!(mutations, all_kinds().len() * 2_000);
        // Most damage is caught; some (a flipped bit in a payload byte or an id) is not a
        // format error at all, and the log's checksums are what catch it on disk.
        assert!(decoded < mutations / 2, "seed {seed:#x}: {decoded} of {mutations} garbled records decoded");
    }

    /// Records of the hand encoding that came before rkyv (encoding 1: a kind byte, then the
    /// fields little-endian, no encoding byte) are refused, whatever their ids: an old data
    /// directory fails to open (naming the file, see `recovery.rs`) instead of being misread.
    #[test]
    fn hand_encoded_records_of_encoding_1_are_refused() {
        let mut frame = Vec::new();
        frame.extend_from_slice(&frame_of(&message(QoS::AtLeastOnce).publish));
        for id in (0..=300u64).chain([1 << 16, 1 << 24, 1 << 32, u64::MAX]) {
            let mut old: Vec<Vec<u8>> = Vec::new();
            // SessionGone, Done, Sent: the kind, then u64s (and a u16).
            old.push([&[KIND_SESSION_GONE][..], &id.to_le_bytes()].concat());
            old.push([&[KIND_DONE][..], &id.to_le_bytes(), &7u64.to_le_bytes()].concat());
            old.push(
                [&[KIND_SENT][..], &id.to_le_bytes(), &7u64.to_le_bytes(), &9u16.to_le_bytes()].concat(),
            );
            // Msg: id, tenant, expiry, one target (uid, flags, no subscription ids), the frame.
            old.push(
                [
                    &[KIND_MSG][..],
                    &id.to_le_bytes(),
                    &0u32.to_le_bytes(),
                    &0u64.to_le_bytes(),
                    &1u32.to_le_bytes(),
                    &id.to_le_bytes(),
                    &[1, 0],
                    &frame,
                ]
                .concat(),
            );
            for bytes in old {
                let (placed, range) = placed(&bytes, 0);
                let bytes = &placed[range];
                assert!(decode_rec(bytes).is_err(), "id {id}: {bytes:?}");
                assert!(rec_id(bytes).is_err(), "id {id}: {bytes:?}");
                assert!(decode_msg_header(bytes, |_| {}).is_err(), "id {id}: {bytes:?}");
            }
        }
    }
}
