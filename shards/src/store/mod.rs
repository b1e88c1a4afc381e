//! [`Store`]: a shard's durable inbox and retained partition, as records on its
//! `shardmq-storage` log.
//!
//! Owner: one shard (the one whose sessions and retained partition the log holds), on that
//! shard's thread. Lifecycle: opened (and replayed) by `recovery.rs` before the shard starts,
//! closed when the shard stops.
//!
//! What is stored: persistent sessions (snapshot records: identity, expiry, subscriptions), the
//! messages queued for them (`Msg` records: one per message per shard, naming every persistent
//! session of the shard it is queued for), their progress (`Sent`, `Released`, `Done`), and the
//! retained messages of the shard's partition. See `records.rs` for the records.
//!
//! Consumption: a record is acked (`Log::ack`) once nothing depends on it. The log forgets acks on
//! a restart: every surviving record is live again and replay re-acks what is dead, so a record
//! that *negates* an earlier one (a tombstone: `SessionGone`, `RetainDel`, the `Done` records of a
//! finished message) must survive as long as the earlier record can. A tombstone is therefore
//! acked only once the log's first stored record lies after its target ("limbo"): every segment
//! that could hold the target, or an older version of it, is then gone. Superseding records (a
//! newer snapshot, a newer retained message) need no such wait: the newest version is live, so it
//! survives, and replay keeps the newest by offset.
//!
//! Bounds: the indexes hold one entry per live session, queued message, retained message and
//! tombstone in limbo; the log holds them on disk within its disk budget. When an append fails
//! (budget exhausted, disk full, a failed flush) the caller refuses the message (0x97) or counts
//! the loss; nothing already stored is touched.

pub mod records;
pub mod recovery;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use shardmq_storage::{DurableNotify, Log, Offset};
use tracing::warn;

use crate::message::{Message, TenantId};
use records::{encode_rec, rec_id, stored_publish, Rec, RecId, SessionRec, StoredMessage, Target};
use records::{KIND_DONE, KIND_RELEASED, KIND_SENT};

pub use shardmq_storage::Error as StorageError;

/// A stored message's place in the log and what still refers to it.
#[derive(Debug)]
struct StoredMsg {
    offset: Offset,
    /// Targets not yet done.
    refs: u32,
}

/// The progress records of one message: (kind, session uid, offset).
type Progress = Vec<(u8, u64, Offset)>;

/// Hashes the store's own u64 ids (message ids, session uids: dense, never chosen by a client)
/// with one multiplication (Fibonacci hashing) instead of SipHash: recovery inserts millions.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // The store's ids are dense and assigned in order, and hashbrown takes a bucket from the
        // low bits and a tag from the top 7. Low bits that follow the id put consecutive ids in
        // neighbouring buckets (recovery inserts millions in id order: scattered, each insert
        // was a cache miss); a multiply still spreads the tags. The ids are the broker's own, so
        // no client can choose colliding keys.
        const TAG: u64 = 0x7F << 57;
        let key = self.0.rotate_left(5) ^ n;
        self.0 = (key & !TAG) | (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) & TAG);
    }
}

/// A map keyed by the store's own ids.
pub type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Counters of one store, for the shard's statistics.
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreCounters {
    pub appends: u64,
    pub append_failures: u64,
    pub compactions: u64,
    /// How long single appends and commits held the shard's thread (segment rolls, a full write
    /// queue): calls that took at least 100 us, at least 1 ms, and the longest, in microseconds.
    pub append_stalls_100us: u64,
    pub append_stalls_1ms: u64,
    pub append_stall_max_us: u64,
    /// The longest compaction pass, in microseconds (it copies live records on the shard's thread).
    pub compaction_max_us: u64,
}

/// Wakes a shard's loop (the log's durable notification: a mesh poke); see [`Store::commit`].
#[derive(Clone)]
pub struct CommitWake(pub DurableNotify);

impl std::fmt::Debug for CommitWake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitWake")
    }
}

/// Converts between `Instant` (in memory) and Unix milliseconds (on disk).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: Instant,
    pub unix_ms: u64,
}

impl Clock {
    pub fn now() -> Clock {
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Clock { now: Instant::now(), unix_ms }
    }

    /// Unix ms of `at` (0 stays the "never" marker, so the result is at least 1).
    pub fn to_unix_ms(&self, at: Instant) -> u64 {
        let ms = if at >= self.now {
            self.unix_ms + at.duration_since(self.now).as_millis() as u64
        } else {
            self.unix_ms.saturating_sub(self.now.duration_since(at).as_millis() as u64)
        };
        ms.max(1)
    }

    /// The `Instant` of Unix ms `ms` (in the past, or up to any future).
    pub fn to_instant(&self, ms: u64) -> Instant {
        if ms >= self.unix_ms {
            self.now + std::time::Duration::from_millis(ms - self.unix_ms)
        } else {
            self.now.checked_sub(std::time::Duration::from_millis(self.unix_ms - ms)).unwrap_or(self.now)
        }
    }
}

/// A shard's durable store. See the module docs.
#[derive(Debug)]
pub struct Store {
    log: Log,
    next_uid: u64,
    next_msg_id: u64,
    /// Orders the versions of a retained topic across compaction moves.
    next_retain_seq: u64,
    msgs: IdMap<StoredMsg>,
    /// `Done`, `Sent` and `Released` records per message (only messages that have any: kept apart
    /// so the per-message entry stays 16 bytes).
    progress: IdMap<Progress>,
    /// Session uid -> offset of its newest snapshot.
    sessions: IdMap<Offset>,
    retained: HashMap<(TenantId, Arc<str>), Offset>,
    /// Incoming QoS 2 packet ids awaiting PUBREL, per stored session: (uid, packet id) -> offset.
    inbound: HashMap<(u64, u16), Offset>,
    /// Tombstones waiting for their target's segment to go: tombstone offset -> target offset.
    limbo: HashMap<Offset, Offset>,
    /// The same, ordered by target (lazily: moved tombstones leave stale entries behind).
    limbo_order: BinaryHeap<Reverse<(Offset, Offset)>>,
    buf: Vec<u8>,
    /// Whether records were appended since the last [`Store::commit`].
    uncommitted: bool,
    /// The end of the newest record whose effect a client sees before it is durable (see
    /// [`Store::unwritten_visible`]).
    visible_end: Offset,
    /// Wakes the shard's loop (a mesh poke), so that it commits at the end of the turn in which
    /// the first uncommitted record was appended. Set by `recovery.rs`; `None` in tests.
    pub commit_wake: Option<CommitWake>,
    pub counters: StoreCounters,
}

impl Store {
    fn empty(log: Log) -> Store {
        Store {
            log,
            next_uid: 1,
            next_msg_id: 1,
            next_retain_seq: 1,
            msgs: IdMap::default(),
            progress: IdMap::default(),
            sessions: IdMap::default(),
            retained: HashMap::new(),
            inbound: HashMap::new(),
            limbo: HashMap::new(),
            limbo_order: BinaryHeap::new(),
            buf: Vec::with_capacity(256),
            uncommitted: false,
            visible_end: Offset(0),
            commit_wake: None,
            counters: StoreCounters::default(),
        }
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The end of the log: records appended so far lie below it.
    pub fn end_offset(&self) -> Offset {
        self.log.end_offset()
    }

    /// Records below this offset are durable under the fsync policy.
    pub fn durable_offset(&self) -> Offset {
        self.log.durable_offset()
    }

    /// Hands what was appended since the last commit to the log's sync thread (`Log::commit`), so
    /// that it becomes durable. The shard calls it once per loop turn, before it looks at
    /// [`Store::durable_offset`]; cheap when nothing was appended. Timed like an append: it is a
    /// `pwrite` on the shard's thread when the sync thread's queue is full.
    pub fn commit(&mut self) {
        if !std::mem::take(&mut self.uncommitted) {
            return;
        }
        let started = Instant::now();
        let result = self.log.commit();
        self.count_stall(started);
        if let Err(error) = result {
            // The log has failed for good (a write failed); appends report it from now on and
            // nothing becomes durable, so the waiting publishers are never acknowledged.
            warn!(%error, "store: commit failed");
        }
    }

    /// Records the broker answers without waiting for durability must still survive a crash of
    /// the process before the client sees their effect: a delivery's `Sent` and `Released`
    /// (before the PUBLISH or PUBREL leaves; a crash that lost the record of a delivery the
    /// client received would send the message again without DUP), an `InboundDone` (before the
    /// PUBCOMP), and session snapshots and ends (before the CONNACK or the close). Marks the
    /// record just appended as one of them.
    fn mark_visible(&mut self) {
        self.visible_end = self.log.end_offset();
    }

    /// The end the log must have written to its files before a stored session's output (or any
    /// CONNACK or close) may leave, if it has not yet: `None` when nothing visible is unwritten.
    /// The shard's writer then waits (`Shard::wait_written`) for the sync thread's `pwrite`
    /// instead of writing on the shard's thread. A failed log writes nothing more; holding
    /// output back then would only hang the client, so it is `None` too (the failure is
    /// reported by the appends).
    pub fn unwritten_visible(&self) -> Option<Offset> {
        (self.visible_end > self.written_end()).then_some(self.visible_end)
    }

    /// The end of what the log has written to its files, for those who wait for it: past every
    /// offset once the log has failed, because it writes nothing more and waiting would only
    /// hang the clients whose output is held.
    pub fn written_end(&self) -> Offset {
        if self.log.failed() {
            Offset(u64::MAX)
        } else {
            self.log.written_offset()
        }
    }

    /// Returns true if `end` is written already; otherwise the write that gets it there wakes the
    /// shard (through the log's durable notification), and this returns false.
    pub fn notify_when_written(&self, end: Offset) -> bool {
        self.log.failed() || self.log.notify_when_written(end)
    }

    /// Commits now if the log's writer has nothing queued: a connection's writer waits for the
    /// records, and they go out at once instead of at the end of the turn. With the writer busy,
    /// the turn's commit takes them, so waiting connections never split the turn into many small
    /// batches (which could fill the write queue, whose overflow is a `pwrite` on this thread).
    pub fn commit_for_waiter(&mut self) {
        if self.log.write_queue_len() == 0 {
            self.commit();
        }
    }

    /// Counts a call on the log that held the shard's thread for 100 us or more.
    fn count_stall(&mut self, started: Instant) {
        let held_us = started.elapsed().as_micros() as u64;
        if held_us >= 100 {
            self.counters.append_stalls_100us += 1;
            self.counters.append_stalls_1ms += u64::from(held_us >= 1000);
            self.counters.append_stall_max_us = self.counters.append_stall_max_us.max(held_us);
        }
    }

    /// Flushes and closes the log (shutdown).
    pub fn close(self) -> Result<(), StorageError> {
        self.log.close()
    }

    fn append(&mut self, rec: &Rec) -> Result<Offset, StorageError> {
        let mut buf = std::mem::take(&mut self.buf);
        encode_rec(rec, &mut buf);
        let started = Instant::now();
        let result = self.log.append(&buf);
        self.count_stall(started);
        self.buf = buf;
        match &result {
            Ok(_) => {
                self.counters.appends += 1;
                if !self.uncommitted {
                    self.uncommitted = true;
                    if let Some(CommitWake(wake)) = &self.commit_wake {
                        wake(self.log.durable_offset());
                    }
                }
            }
            Err(_) => self.counters.append_failures += 1,
        }
        result
    }

    fn ack(&mut self, offset: Offset) {
        // An offset the store tracks is always a record of the log; an error here would be a bug
        // in the indexes, and costs at most a record kept too long, so it is logged, not fatal.
        if let Err(error) = self.log.ack(offset) {
            warn!(%error, "store: ack of a tracked record failed");
        }
    }

    fn park_tombstone(&mut self, tomb: Offset, target: Offset) {
        self.limbo.insert(tomb, target);
        self.limbo_order.push(Reverse((target, tomb)));
    }

    /// A new session uid, never used by any record in this log.
    pub fn new_uid(&mut self) -> u64 {
        let uid = self.next_uid;
        self.next_uid += 1;
        uid
    }

    /// Writes a session's snapshot; the previous one is consumed. The caller answers the client
    /// next (CONNACK, or the close after DISCONNECT), and a crash must not undo what it answered:
    /// that answer waits until the snapshot is written ([`Store::unwritten_visible`]).
    pub fn put_session(&mut self, rec: SessionRec) -> Result<(), StorageError> {
        let uid = rec.uid;
        let offset = self.append(&Rec::Session(rec))?;
        // (Inbound ids of a session that ends are released by `session_gone`.)
        if let Some(old) = self.sessions.insert(uid, offset) {
            self.ack(old);
        }
        self.mark_visible();
        Ok(())
    }

    /// Whether session `uid` has a stored snapshot.
    pub fn has_session(&self, uid: u64) -> bool {
        self.sessions.contains_key(&uid)
    }

    /// The session ended: its snapshot dies, and with it its targets in `Msg` records (the caller
    /// releases those with [`Store::release`]).
    pub fn session_gone(&mut self, uid: u64) {
        let Some(snapshot) = self.sessions.remove(&uid) else { return };
        self.ack(snapshot);
        // Its inbound QoS 2 ids die with it (replay ignores ids of sessions that are gone).
        let ids: Vec<(u64, u16)> = self.inbound.keys().filter(|(owner, _)| *owner == uid).copied().collect();
        for key in ids {
            if let Some(offset) = self.inbound.remove(&key) {
                self.ack(offset);
            }
        }
        match self.append(&Rec::SessionGone { uid }) {
            Ok(tomb) => {
                self.park_tombstone(tomb, snapshot);
                // Held like a snapshot: the client is told next.
                self.mark_visible();
            }
            // Without the tombstone the session comes back after a restart (and expires then, or
            // is resumed): logged, not lost data.
            Err(error) => warn!(%error, uid, "store: cannot record the end of a session"),
        }
    }

    /// Stores a message queued for `targets` and returns its id.
    pub fn put_msg(
        &mut self,
        msg: &Message,
        targets: Vec<Target>,
        clock: &Clock,
    ) -> Result<u64, StorageError> {
        let id = self.next_msg_id;
        let refs = targets.len() as u32;
        let rec = Rec::Msg {
            id,
            targets,
            message: StoredMessage {
                tenant: msg.tenant,
                publish: stored_publish(
                    &msg.topic,
                    &msg.payload,
                    msg.qos,
                    msg.retain,
                    msg.properties.as_deref(),
                ),
                expires_at_ms: msg.expires_at.map_or(0, |at| clock.to_unix_ms(at)),
            },
        };
        let offset = self.append(&rec)?;
        self.next_msg_id += 1;
        self.msgs.insert(id, StoredMsg { offset, refs });
        Ok(id)
    }

    fn put_aux(&mut self, kind: u8, rec: Rec, uid: u64, msg: u64) {
        if !self.msgs.contains_key(&msg) {
            return;
        }
        match self.append(&rec) {
            Ok(offset) => self.progress.entry(msg).or_default().push((kind, uid, offset)),
            Err(error) => warn!(%error, uid, msg, "store: cannot record a message's progress"),
        }
    }

    /// Reads stored message `id` back from the log (a recovered session's backlog, as its
    /// connection gets to it). `None` if it is not stored or does not decode (logged).
    pub fn load(&self, id: u64, clock: &Clock) -> Option<Arc<Message>> {
        let stored = self.msgs.get(&id)?;
        match self.log.read(stored.offset).map(records::decode_rec) {
            Ok(Ok(Rec::Msg { message, .. })) => Some(recovery::message_of(message, clock)),
            other => {
                warn!(id, offset = %stored.offset, ?other, "store: a queued message cannot be read back");
                None
            }
        }
    }

    /// Message `msg` went out to session `uid` under `packet_id` (kept across restarts).
    pub fn sent(&mut self, uid: u64, msg: u64, packet_id: u16) {
        self.put_aux(KIND_SENT, Rec::Sent { uid, msg, packet_id }, uid, msg);
        self.mark_visible();
    }

    /// Session `uid` acknowledged QoS 2 message `msg` with PUBREC.
    pub fn released(&mut self, uid: u64, msg: u64) {
        self.put_aux(KIND_RELEASED, Rec::Released { uid, msg }, uid, msg);
        self.mark_visible();
    }

    /// Message `msg` is finished for session `uid`: a `Done` record is written, unless
    /// `session_ending` (its `SessionGone` covers it).
    pub fn release(&mut self, uid: u64, msg: u64, session_ending: bool) {
        if !self.msgs.contains_key(&msg) {
            return;
        }
        let mut superseded = Vec::new();
        if let Some(records) = self.progress.get_mut(&msg) {
            records.retain(|&(kind, owner, offset)| {
                let drop = owner == uid && kind != KIND_DONE;
                if drop {
                    superseded.push(offset);
                }
                !drop
            });
        }
        for offset in superseded {
            self.ack(offset);
        }
        if !session_ending {
            self.put_aux(KIND_DONE, Rec::Done { uid, msg }, uid, msg);
        }
        let stored = self.msgs.get_mut(&msg).expect("checked above");
        stored.refs = stored.refs.saturating_sub(1);
        if stored.refs > 0 {
            return;
        }
        let stored = self.msgs.remove(&msg).expect("checked above");
        self.ack(stored.offset);
        for (kind, _, offset) in self.progress.remove(&msg).unwrap_or_default() {
            if kind == KIND_DONE {
                self.park_tombstone(offset, stored.offset);
            } else {
                self.ack(offset);
            }
        }
    }

    /// Session `uid` routed QoS 2 PUBLISH `packet_id`; until PUBREL a resend is only acknowledged.
    pub fn inbound_add(&mut self, uid: u64, packet_id: u16) -> Result<(), StorageError> {
        let offset = self.append(&Rec::Inbound { seq: self.next_retain_seq, uid, packet_id })?;
        self.next_retain_seq += 1;
        if let Some(old) = self.inbound.insert((uid, packet_id), offset) {
            self.ack(old);
        }
        Ok(())
    }

    /// The PUBREL for session `uid`'s QoS 2 `packet_id` arrived.
    pub fn inbound_done(&mut self, uid: u64, packet_id: u16) {
        let Some(old) = self.inbound.remove(&(uid, packet_id)) else { return };
        self.ack(old);
        match self.append(&Rec::InboundDone { seq: self.next_retain_seq, uid, packet_id }) {
            Ok(tomb) => {
                self.next_retain_seq += 1;
                self.park_tombstone(tomb, old);
                // The PUBCOMP that follows waits until this is written: after a kill -9 that
                // lost it, the id would come back as pending, and the client's next QoS 2
                // PUBLISH reusing it would be acknowledged but never routed.
                self.mark_visible();
            }
            // Without it, a restart keeps the packet id as pending: a later PUBLISH reusing it
            // would be acknowledged without being routed until the client's PUBREL. Logged.
            Err(error) => warn!(%error, uid, packet_id, "store: cannot record a PUBREL"),
        }
    }

    /// Stores the retained message of its topic (the previous one is consumed).
    pub fn retain_set(&mut self, msg: &Message, clock: &Clock) -> Result<(), StorageError> {
        let rec = Rec::Retain {
            seq: self.next_retain_seq,
            message: StoredMessage {
                tenant: msg.tenant,
                publish: stored_publish(&msg.topic, &msg.payload, msg.qos, true, msg.properties.as_deref()),
                expires_at_ms: msg.expires_at.map_or(0, |at| clock.to_unix_ms(at)),
            },
        };
        let offset = self.append(&rec)?;
        self.next_retain_seq += 1;
        if let Some(old) = self.retained.insert((msg.tenant, Arc::from(msg.topic.as_str())), offset) {
            self.ack(old);
        }
        Ok(())
    }

    /// Deletes the stored retained message of a topic, if any.
    pub fn retain_del(&mut self, tenant: TenantId, topic: &str) -> Result<(), StorageError> {
        let key = (tenant, Arc::from(topic));
        let Some(&old) = self.retained.get(&key) else { return Ok(()) };
        let tomb =
            self.append(&Rec::RetainDel { seq: self.next_retain_seq, tenant, topic: topic.to_string() })?;
        self.next_retain_seq += 1;
        self.retained.remove(&key);
        self.ack(old);
        self.park_tombstone(tomb, old);
        Ok(())
    }

    /// Background upkeep, called from the shard's timer: releases tombstones whose targets are
    /// gone, and compacts segments that are mostly dead. Compaction copies live records on the
    /// shard's thread; it runs only when a segment is at most a quarter live, so the copying
    /// costs at most a third of what was written since.
    pub fn maintain(&mut self) {
        let start = self.log.stats().start_offset;
        while let Some(Reverse((target, tomb))) = self.limbo_order.peek().copied() {
            if target >= start {
                break;
            }
            self.limbo_order.pop();
            if self.limbo.get(&tomb) == Some(&target) {
                self.limbo.remove(&tomb);
                self.ack(tomb);
            }
        }
        let stats = self.log.stats();
        if stats.segments < 3 || stats.live_bytes * 2 > stats.used_bytes {
            return;
        }
        let mut moves = Vec::new();
        let started = Instant::now();
        match self.log.compact(0.25, |old, new| moves.push((old, new))) {
            Ok(done) if done.segments_compacted > 0 => self.counters.compactions += 1,
            Ok(_) => {}
            Err(error) => warn!(%error, "store: compaction stopped"),
        }
        let held_us = started.elapsed().as_micros() as u64;
        self.counters.compaction_max_us = self.counters.compaction_max_us.max(held_us);
        for (old, new) in moves {
            self.moved(old, new);
        }
    }

    /// Points whatever index held `old` at `new` (a compaction move).
    fn moved(&mut self, old: Offset, new: Offset) {
        if let Some(target) = self.limbo.remove(&old) {
            self.park_tombstone(new, target);
            return;
        }
        let id = match self.log.read(new).map(rec_id) {
            Ok(Ok(id)) => id,
            _ => return,
        };
        let slot = match id {
            RecId::Session(uid) => self.sessions.get_mut(&uid),
            RecId::Msg(id) => self.msgs.get_mut(&id).map(|m| &mut m.offset),
            RecId::MsgAux { msg, .. } => {
                self.progress.get_mut(&msg).and_then(|p| p.iter_mut().find(|a| a.2 == old).map(|a| &mut a.2))
            }
            RecId::Retain(tenant, topic) => self.retained.get_mut(&(tenant, topic)),
            RecId::Inbound(uid, packet_id) => self.inbound.get_mut(&(uid, packet_id)),
            RecId::SessionGone(_) | RecId::RetainDel(..) | RecId::InboundDone => None,
        };
        if let Some(slot) = slot {
            if *slot == old {
                *slot = new;
            }
        }
    }
}

/// A xorshift generator for the store's seeded tests: deterministic per seed, no dependency.
#[cfg(test)]
pub(crate) mod test_rng {
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }
}

#[cfg(test)]
mod tests {
    //! Seeded random operations on a store against a plain model, with crashes (the log abandoned
    //! after the end of a shard's turn: committed and written, not flushed; the page cache keeps
    //! what was written, as after `kill -9`; records still staged are the storage crate's tests'
    //! business) and reopenings
    //! in between, on tiny segments so rolls, segment deletion, tombstones and compaction all
    //! happen. The failing seed is printed.

    use std::collections::{BTreeMap, BTreeSet};

    use bytes::Bytes;
    use shardmq_protocol::{ProtocolVersion, QoS, Utf8};
    use shardmq_storage::{Config, FsyncPolicy};

    use super::records::{SessionRec, Target};
    use super::recovery::replay;
    use super::*;

    fn config() -> Config {
        Config {
            segment_size_bytes: 4096,
            record_len_max_bytes: 1024,
            fsync: FsyncPolicy::Never,
            ..Config::default()
        }
    }

    fn message(topic: &str, payload: &str) -> Message {
        Message {
            tenant: TenantId(1),
            topic: Utf8::new(topic).unwrap(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
            expires_at: None,
            origin: None,
        }
    }

    fn session(uid: u64) -> SessionRec {
        SessionRec {
            uid,
            tenant: TenantId(1),
            version: ProtocolVersion::V3_1_1,
            expiry_secs: u32::MAX,
            expires_at_ms: u64::MAX,
            client_id: format!("c{uid}"),
            subscriptions: Vec::new(),
            will: None,
        }
    }

    use super::test_rng::Rng;

    /// The model: live sessions with their queued payloads (by message id), and retained topics.
    #[derive(Default, Debug, PartialEq)]
    struct Model {
        sessions: BTreeMap<String, BTreeSet<String>>,
        retained: BTreeMap<String, String>,
        /// Per live session: incoming QoS 2 packet ids awaiting PUBREL.
        inbound: BTreeMap<String, BTreeSet<u16>>,
    }

    fn run(seed: u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let clock = Clock::now();
        let mut model = Model::default();
        // Store-side handles: client id -> uid; (client id, payload) -> message id.
        let mut uids: BTreeMap<String, u64> = BTreeMap::new();
        let mut queued: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut store = Store::empty(Log::open(dir.path(), config()).unwrap());
        let mut counter = 0u32;
        for step in 0..400 {
            match rng.below(10) {
                0 | 1 => {
                    let client = format!("c{}", rng.below(4));
                    if !uids.contains_key(&client) {
                        let uid = store.new_uid();
                        store.put_session(SessionRec { client_id: client.clone(), ..session(uid) }).unwrap();
                        uids.insert(client.clone(), uid);
                        model.sessions.insert(client, BTreeSet::new());
                    }
                }
                2 => {
                    let client = format!("c{}", rng.below(4));
                    if let Some(uid) = uids.remove(&client) {
                        let ids: Vec<_> = queued
                            .iter()
                            .filter(|((c, _), _)| *c == client)
                            .map(|(k, id)| (k.clone(), *id))
                            .collect();
                        for (key, id) in ids {
                            store.release(uid, id, true);
                            queued.remove(&key);
                        }
                        store.session_gone(uid);
                        model.sessions.remove(&client);
                        model.inbound.remove(&client);
                    }
                }
                3..=5 => {
                    let targets: Vec<String> = uids.keys().filter(|_| rng.below(2) == 0).cloned().collect();
                    if targets.is_empty() {
                        continue;
                    }
                    counter += 1;
                    let payload = format!("m{counter}");
                    let list = targets
                        .iter()
                        .map(|c| Target {
                            uid: uids[c],
                            qos: QoS::AtLeastOnce,
                            retain: false,
                            subscription_ids: vec![],
                        })
                        .collect();
                    let id = store.put_msg(&message("t", &payload), list, &clock).unwrap();
                    for client in targets {
                        model.sessions.get_mut(&client).unwrap().insert(payload.clone());
                        queued.insert((client, payload.clone()), id);
                    }
                }
                6 | 7 => {
                    let Some(key) =
                        queued.keys().nth(rng.below(queued.len().max(1) as u64) as usize).cloned()
                    else {
                        continue;
                    };
                    let id = queued.remove(&key).unwrap();
                    if rng.below(2) == 0 {
                        store.sent(uids[&key.0], id, 7);
                    }
                    store.release(uids[&key.0], id, false);
                    model.sessions.get_mut(&key.0).unwrap().remove(&key.1);
                }
                8 => {
                    let topic = format!("r{}", rng.below(5));
                    if rng.below(3) == 0 {
                        store.retain_del(TenantId(1), &topic).unwrap();
                        model.retained.remove(&topic);
                    } else {
                        counter += 1;
                        let value = format!("v{counter}");
                        store.retain_set(&message(&topic, &value), &clock).unwrap();
                        model.retained.insert(topic, value);
                    }
                }
                9 if rng.below(2) == 0 => {
                    let client = format!("c{}", rng.below(4));
                    let packet_id = rng.below(3) as u16 + 1;
                    let Some(&uid) = uids.get(&client) else { continue };
                    let ids = model.inbound.entry(client.clone()).or_default();
                    if ids.contains(&packet_id) {
                        store.inbound_done(uid, packet_id);
                        ids.remove(&packet_id);
                    } else {
                        store.inbound_add(uid, packet_id).unwrap();
                        ids.insert(packet_id);
                    }
                    if ids.is_empty() {
                        model.inbound.remove(&client);
                    }
                }
                _ => store.maintain(),
            }
            if rng.below(40) == 0 || step == 399 {
                // End the turn (as `poll_durable` does), wait until the log has written it (the
                // bound is generous: a stuck sync thread fails the test, not hangs it), then crash
                // and recover: what replay rebuilds must be the model.
                store.commit();
                let end = store.end_offset();
                let written = store.log.wait_durable(end, std::time::Duration::from_secs(30));
                assert!(written.unwrap(), "seed {seed} step {step}: the log wrote the turn");
                store.log.abandon();
                let recovered = replay(Log::open(dir.path(), config()).unwrap(), &clock)
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                let mut got = Model::default();
                uids.clear();
                queued.clear();
                for s in &recovered.sessions {
                    uids.insert(s.rec.client_id.clone(), s.rec.uid);
                    let mut payloads = BTreeSet::new();
                    let eager = s.deliveries.iter().map(|d| (d.delivery.stored, d.delivery.msg.clone()));
                    let lazy = s.backlog.iter().map(|l| {
                        let msg =
                            recovered.store.load(l.stored(), &clock).expect("a backlog entry reads back");
                        (l.stored(), msg)
                    });
                    // Each queue in message id order (the order the messages were queued in),
                    // and no message twice: compaction copies must not come back as extra
                    // entries or out of place.
                    for ids in [
                        s.deliveries.iter().map(|d| d.delivery.stored).collect::<Vec<_>>(),
                        s.backlog.iter().map(|l| l.stored()).collect(),
                    ] {
                        assert!(
                            ids.windows(2).all(|w| w[0] < w[1]),
                            "seed {seed} step {step}: a recovered queue is out of order: {ids:?}"
                        );
                    }
                    let mut entries = 0;
                    for (id, msg) in eager.chain(lazy) {
                        let payload = String::from_utf8(msg.payload.to_vec()).unwrap();
                        queued.insert((s.rec.client_id.clone(), payload.clone()), id);
                        payloads.insert(payload);
                        entries += 1;
                    }
                    assert_eq!(entries, payloads.len(), "seed {seed} step {step}: a message queued twice");
                    got.sessions.insert(s.rec.client_id.clone(), payloads);
                    if !s.incoming_qos2.is_empty() {
                        got.inbound
                            .insert(s.rec.client_id.clone(), s.incoming_qos2.iter().copied().collect());
                    }
                }
                for m in &recovered.retained {
                    got.retained
                        .insert(m.topic.as_str().to_string(), String::from_utf8(m.payload.to_vec()).unwrap());
                }
                assert_eq!(got, model, "seed {seed} step {step}: recovered state differs from the model");
                store = recovered.store;
            }
        }
    }

    #[test]
    fn seeded_operations_with_crashes_match_the_model() {
        for seed in 0..200 {
            run(seed);
        }
    }
}
