//! Opening the data directory at start-up: the directory layout, the replay of each shard's log
//! into sessions, queued messages and retained messages, and the re-homing of stored state when
//! `--cores` changed since the last run.
//!
//! Owner: the thread that starts the broker, before any shard runs (so blocking is fine here).
//!
//! Layout of `data_dir`:
//! - `LOCK`: held with `flock` while a broker uses the directory (a second broker is refused).
//! - `CURRENT`: `gen=<g> cores=<n>`, replaced atomically (write, fsync, rename, fsync dir).
//! - `gen-<g>/shard-<i>/`: the log of shard `i` of generation `g`, for `i` in `0..n`.
//!
//! Re-homing: when `n` differs from `--cores`, every log of generation `g` is replayed, the state
//! is written into fresh logs of generation `g + 1` partitioned by the new placement (a session's
//! home shard, a retained topic's shard), those are flushed, `CURRENT` is switched, and
//! generation `g` is removed. A crash at any point leaves either the old generation current (the
//! new one is removed at the next start) or the new one complete.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shardmq_protocol::PacketId;
use shardmq_storage::{Config as LogConfig, DurableNotify, Log, Offset};
use tracing::{info, warn};

use super::records::{
    decode_msg_header, decode_rec, Rec, RecError, SessionRec, StoredMessage, KIND_DONE, KIND_MSG,
    KIND_RELEASED, KIND_SENT,
};
use super::{Clock, IdMap, Store, StoredMsg};
use crate::config::BrokerConfig;
use crate::message::{Delivery, LazyDelivery, Message, TenantId};
use crate::shard::{home_shard, retain_shard};

/// A queued message of a recovered session, in queue order.
#[derive(Debug)]
pub struct RecoveredDelivery {
    pub delivery: Delivery,
    /// The packet id it went out with before the restart, if it did.
    pub packet_id: Option<PacketId>,
    /// QoS 2: PUBREC was received, PUBREL is owed.
    pub released: bool,
}

/// A persistent session read back from the log.
#[derive(Debug)]
pub struct RecoveredSession {
    pub rec: SessionRec,
    /// Messages that went out before the restart (with their packet ids), decoded.
    pub deliveries: Vec<RecoveredDelivery>,
    /// Messages not sent yet, in queue order, left in the store until their turn.
    pub backlog: Vec<LazyDelivery>,
    /// Incoming QoS 2 packet ids routed and awaiting PUBREL.
    pub incoming_qos2: Vec<u16>,
}

/// One shard's state read back from its log.
#[derive(Debug)]
pub struct Recovered {
    pub store: Store,
    pub sessions: Vec<RecoveredSession>,
    pub retained: Vec<Arc<Message>>,
}

/// The data directory, locked for this process.
#[derive(Debug)]
pub struct DataDir {
    /// Holds the `flock` for as long as the broker runs.
    _lock: fs::File,
}

fn io_error(path: &Path, what: &str, error: std::io::Error) -> String {
    format!("{what} {}: {error}", path.display())
}

fn log_config(cfg: &BrokerConfig, on_durable: Option<DurableNotify>) -> LogConfig {
    LogConfig {
        segment_size_bytes: cfg.segment_size_bytes,
        disk_budget_bytes: cfg.disk_budget_bytes.map_or(u64::MAX, |total| (total / cfg.cores as u64).max(1)),
        fsync: cfg.fsync,
        // A stored message is one PUBLISH frame plus its targets: the packet limit plus room, as
        // far as a segment holds it (a larger message is refused as if the disk were full).
        record_len_max_bytes: cfg
            .packet_size_bytes_max
            .saturating_add(64 * 1024)
            .min(cfg.segment_size_bytes.saturating_sub(4096).min(u64::from(u32::MAX)) as u32),
        on_durable,
        ..LogConfig::default()
    }
}

/// Opens (recovering) the log in `dir`; the error names the directory.
fn open_log(cfg: &BrokerConfig, dir: &Path, on_durable: Option<DurableNotify>) -> Result<Log, String> {
    Log::open(dir, log_config(cfg, on_durable)).map_err(|e| format!("cannot open {}: {e}", dir.display()))
}

fn shard_dir(data_dir: &Path, generation: u64, shard: usize) -> PathBuf {
    data_dir.join(format!("gen-{generation}")).join(format!("shard-{shard}"))
}

fn read_current(data_dir: &Path) -> Result<Option<(u64, usize)>, String> {
    let path = data_dir.join("CURRENT");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(&path, "cannot read", e)),
    };
    let mut generation = None;
    let mut cores = None;
    for word in text.split_whitespace() {
        match word.split_once('=') {
            Some(("gen", v)) => generation = v.parse::<u64>().ok(),
            Some(("cores", v)) => cores = v.parse::<usize>().ok(),
            _ => {}
        }
    }
    match (generation, cores) {
        (Some(g), Some(c)) if c > 0 => Ok(Some((g, c))),
        _ => Err(format!("{}: expected `gen=<g> cores=<n>`, found {text:?}", path.display())),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), String> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| io_error(dir, "cannot fsync", e))
}

fn write_current(data_dir: &Path, generation: u64, cores: usize) -> Result<(), String> {
    let tmp = data_dir.join("CURRENT.tmp");
    let mut file = fs::File::create(&tmp).map_err(|e| io_error(&tmp, "cannot create", e))?;
    file.write_all(format!("gen={generation} cores={cores}\n").as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| io_error(&tmp, "cannot write", e))?;
    let path = data_dir.join("CURRENT");
    fs::rename(&tmp, &path).map_err(|e| io_error(&path, "cannot replace", e))?;
    fsync_dir(data_dir)
}

fn lock(data_dir: &Path) -> Result<fs::File, String> {
    let path = data_dir.join("LOCK");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_error(&path, "cannot open", e))?;
    // SAFETY: flock on a descriptor we own for the duration of the call; no memory is passed.
    // Exercised by every test that starts a broker with storage, and by the second-broker test.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(format!(
            "data directory {} is in use by another shardmq (lock {} is held)",
            data_dir.display(),
            path.display()
        ));
    }
    Ok(file)
}

/// Opens the data directory for `cfg.cores` shards: locks it, re-homes stored state if the core
/// count changed, and replays each shard's log. Returns one [`Recovered`] per shard.
/// `notify(shard)` makes the callback that wakes shard `shard` when its log becomes durable further.
pub fn open(
    cfg: &BrokerConfig,
    notify: &dyn Fn(usize) -> DurableNotify,
) -> Result<(DataDir, Vec<Recovered>), String> {
    let data_dir = &cfg.data_dir;
    fs::create_dir_all(data_dir).map_err(|e| io_error(data_dir, "cannot create data directory", e))?;
    let lock = lock(data_dir)?;
    let generation = match read_current(data_dir)? {
        None => {
            for shard in 0..cfg.cores {
                let dir = shard_dir(data_dir, 1, shard);
                fs::create_dir_all(&dir).map_err(|e| io_error(&dir, "cannot create", e))?;
            }
            write_current(data_dir, 1, cfg.cores)?;
            1
        }
        Some((generation, cores)) => {
            remove_other_generations(data_dir, generation);
            if cores == cfg.cores {
                generation
            } else {
                rehome(cfg, generation, cores)?
            }
        }
    };
    let clock = Clock::now();
    // One thread per shard: the shards' logs are independent, and start-up time is recovery time.
    let notifiers: Vec<DurableNotify> = (0..cfg.cores).map(notify).collect();
    let results: Vec<Result<Recovered, String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = notifiers
            .into_iter()
            .enumerate()
            .map(|(shard, notify)| scope.spawn(move || open_shard(cfg, generation, shard, notify, &clock)))
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_else(|_| Err("a recovery thread panicked".to_string())))
            .collect()
    });
    let shards = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok((DataDir { _lock: lock }, shards))
}

/// Opens and replays one shard's log.
fn open_shard(
    cfg: &BrokerConfig,
    generation: u64,
    shard: usize,
    notify: DurableNotify,
    clock: &Clock,
) -> Result<Recovered, String> {
    let started = std::time::Instant::now();
    let dir = shard_dir(&cfg.data_dir, generation, shard);
    let log = open_log(cfg, &dir, Some(notify.clone()))?;
    let report = log.recovery().clone();
    if let Some(torn) = &report.torn_tail {
        warn!(path = %torn.path.display(), position = torn.position, reason = torn.reason, "storage: torn tail cut off");
    }
    let mut recovered = replay(log, clock)?;
    // The same wake-up asks the shard's loop to commit at the end of the turn that appended.
    recovered.store.commit_wake = Some(super::CommitWake(notify));
    let queued: usize = recovered.sessions.iter().map(|s| s.deliveries.len() + s.backlog.len()).sum();
    info!(
        shard,
        records = report.records,
        bytes = report.record_bytes,
        log_scan_ms = report.elapsed.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        sessions = recovered.sessions.len(),
        queued,
        retained = recovered.retained.len(),
        "storage: shard recovered"
    );
    Ok(recovered)
}

fn remove_other_generations(data_dir: &Path, current: u64) {
    let Ok(entries) = fs::read_dir(data_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(generation) =
            name.to_str().and_then(|n| n.strip_prefix("gen-")).and_then(|g| g.parse::<u64>().ok())
        else {
            continue;
        };
        if generation != current {
            // A re-homing that did not finish (newer) or did not clean up (older).
            if let Err(error) = fs::remove_dir_all(entry.path()) {
                warn!(path = %entry.path().display(), %error, "storage: cannot remove a stale generation");
            }
        }
    }
}

/// Moves generation `generation` (written by `old_cores` shards) to `cfg.cores` shards.
fn rehome(cfg: &BrokerConfig, generation: u64, old_cores: usize) -> Result<u64, String> {
    let data_dir = &cfg.data_dir;
    info!(from = old_cores, to = cfg.cores, "storage: core count changed, re-homing stored sessions");
    let clock = Clock::now();
    let mut sessions = Vec::new();
    let mut retained = Vec::new();
    for shard in 0..old_cores {
        let dir = shard_dir(data_dir, generation, shard);
        let log = open_log(cfg, &dir, None)?;
        let mut recovered = replay(log, &clock)?;
        // The backlogs are read now: the old generation goes away.
        for session in &mut recovered.sessions {
            for lazy in std::mem::take(&mut session.backlog) {
                let Some(msg) = recovered.store.load(lazy.stored(), &clock) else { continue };
                session.deliveries.push(RecoveredDelivery {
                    delivery: lazy.into_delivery(msg),
                    packet_id: None,
                    released: false,
                });
            }
        }
        sessions.extend(recovered.sessions);
        retained.extend(recovered.retained);
        recovered.store.close().map_err(|e| format!("cannot close {}: {e}", dir.display()))?;
    }
    let next = generation + 1;
    let mut stores = Vec::with_capacity(cfg.cores);
    for shard in 0..cfg.cores {
        let dir = shard_dir(data_dir, next, shard);
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, "cannot create", e))?;
        let log = open_log(cfg, &dir, None)?;
        stores.push(Store::empty(log));
    }
    let moved = (sessions.len(), retained.len());
    for session in sessions {
        let to = home_shard(session.rec.tenant, &session.rec.client_id, cfg.cores).index();
        write_session(&mut stores[to], session, &clock).map_err(|e| format!("re-homing: {e}"))?;
    }
    for msg in retained {
        let to = retain_shard(msg.tenant, &msg.topic, cfg.cores).index();
        stores[to].retain_set(&msg, &clock).map_err(|e| format!("re-homing: {e}"))?;
    }
    for store in stores {
        store.close().map_err(|e| format!("re-homing: cannot flush: {e}"))?;
    }
    fsync_dir(&data_dir.join(format!("gen-{next}")))?;
    write_current(data_dir, next, cfg.cores)?;
    remove_other_generations(data_dir, next);
    info!(sessions = moved.0, retained = moved.1, "storage: re-homing finished");
    Ok(next)
}

/// Writes one recovered session (with a fresh uid) and its queue into `store`.
fn write_session(
    store: &mut Store,
    session: RecoveredSession,
    clock: &Clock,
) -> Result<(), super::StorageError> {
    let uid = store.new_uid();
    store.put_session(SessionRec { uid, ..session.rec })?;
    for queued in session.deliveries {
        let d = &queued.delivery;
        let target = super::records::Target {
            uid,
            qos: d.qos,
            retain: d.retain,
            subscription_ids: d.subscription_ids.clone(),
        };
        let msg = store.put_msg(&d.msg, vec![target], clock)?;
        if let Some(packet_id) = queued.packet_id {
            store.sent(uid, msg, packet_id);
        }
        if queued.released {
            store.released(uid, msg);
        }
    }
    Ok(())
}

/// A progress record of a message during replay: (kind, session uid, offset, packet id).
type AuxRecord = (u8, u64, Offset, Option<PacketId>);
/// One inbound QoS 2 record during replay: (seq, offset, routed (true) or released (false)).
type InboundVersion = (u64, Offset, bool);
/// One retained-message record of a topic during replay: (seq, offset, `None` for a deletion).
type RetainVersion = (u64, Offset, Option<StoredMessage>);

pub(crate) fn message_of(stored: StoredMessage, clock: &Clock) -> Arc<Message> {
    let publish = stored.publish;
    Arc::new(Message {
        tenant: stored.tenant,
        topic: publish.topic,
        payload: publish.payload,
        qos: publish.qos,
        retain: publish.retain,
        properties: Message::boxed_properties(publish.properties),
        expires_at: (stored.expires_at_ms != 0).then(|| clock.to_instant(stored.expires_at_ms)),
        origin: None,
    })
}

fn expired(expires_at_ms: u64, clock: &Clock) -> bool {
    expires_at_ms != 0 && expires_at_ms <= clock.unix_ms
}

/// Replays a log: rebuilds the store's indexes, re-acks every dead record, and returns the live
/// sessions (with their queues) and retained messages.
pub fn replay(log: Log, clock: &Clock) -> Result<Recovered, String> {
    let place = |log: &Log, offset: Offset, e: RecError| {
        let place = log
            .record_location(offset)
            .map(|l| format!("{} at file position {}", l.path.display(), l.position))
            .unwrap_or_else(|_| format!("{} at log offset {offset}", log.dir().display()));
        format!("storage: {place}: {e}")
    };
    // Messages are the bulk of a log: only their headers are read here (in place, from the
    // mapping), and their PUBLISH frames are decoded only for messages in flight. Their targets
    // are not kept: the second pass below reads them again from the mapping, where they are
    // already, instead of copying millions of them into fresh memory.
    let mut records = Vec::new();
    let stored = log.stats().records as usize;
    // (id, offset, expiry in Unix ms) of every message record, in log order.
    let mut msgs: Vec<(u64, Offset, u64)> = Vec::with_capacity(stored);
    // Whether message ids ascend in log order (no compaction copies): then no sort is needed.
    let mut ascending = true;
    let mut max_uid = 0u64;
    let mut max_msg = 0u64;
    // Targets per session, to size each live session's backlog once.
    let mut backlog_sizes: IdMap<usize> = IdMap::default();
    let mut last_uid = (0u64, 0usize);
    for item in log.iter_after_open() {
        let (offset, bytes) = item.map_err(|e| format!("storage: {e}"))?;
        if bytes.first() == Some(&KIND_MSG) {
            let (id, expires_at_ms) = decode_msg_header(bytes, |target| {
                // Consecutive messages mostly go to the same sessions: count in runs.
                if target.uid != last_uid.0 {
                    if last_uid.1 > 0 {
                        *backlog_sizes.entry(last_uid.0).or_default() += last_uid.1;
                    }
                    last_uid = (target.uid, 0);
                }
                last_uid.1 += 1;
                max_uid = max_uid.max(target.uid);
            })
            .map_err(|e| place(&log, offset, e))?;
            ascending &= msgs.last().is_none_or(|last| last.0 < id);
            max_msg = max_msg.max(id);
            msgs.push((id, offset, expires_at_ms));
            continue;
        }
        records.push((offset, decode_rec(bytes).map_err(|e| place(&log, offset, e))?));
    }
    if last_uid.1 > 0 {
        *backlog_sizes.entry(last_uid.0).or_default() += last_uid.1;
    }
    let mut store = Store::empty(log);
    let mut max_retain_seq = 0u64;
    let mut snapshots: IdMap<Vec<(Offset, SessionRec)>> = IdMap::default();
    let mut gones: Vec<(Offset, u64)> = Vec::new();
    let mut aux: IdMap<Vec<AuxRecord>> = IdMap::default();
    let mut retains: HashMap<(TenantId, Arc<str>), Vec<RetainVersion>> = HashMap::new();
    // (uid, packet id) -> (seq, offset, routed (true) or released (false)).
    let mut inbound: HashMap<(u64, u16), Vec<InboundVersion>> = HashMap::new();
    for (offset, rec) in records {
        match rec {
            Rec::Session(s) => {
                max_uid = max_uid.max(s.uid);
                snapshots.entry(s.uid).or_default().push((offset, s));
            }
            Rec::SessionGone { uid } => {
                max_uid = max_uid.max(uid);
                gones.push((offset, uid));
            }
            Rec::Msg { .. } => unreachable!("messages are read above"),
            Rec::Done { uid, msg } => {
                max_msg = max_msg.max(msg);
                aux.entry(msg).or_default().push((KIND_DONE, uid, offset, None));
            }
            Rec::Sent { uid, msg, packet_id } => {
                max_msg = max_msg.max(msg);
                aux.entry(msg).or_default().push((KIND_SENT, uid, offset, Some(packet_id)));
            }
            Rec::Released { uid, msg } => {
                max_msg = max_msg.max(msg);
                aux.entry(msg).or_default().push((KIND_RELEASED, uid, offset, None));
            }
            Rec::Retain { seq, message } => {
                max_retain_seq = max_retain_seq.max(seq);
                let key = (message.tenant, Arc::from(message.publish.topic.as_str()));
                retains.entry(key).or_default().push((seq, offset, Some(message)));
            }
            Rec::RetainDel { seq, tenant, topic } => {
                max_retain_seq = max_retain_seq.max(seq);
                retains.entry((tenant, Arc::from(topic.as_str()))).or_default().push((seq, offset, None));
            }
            Rec::Inbound { seq, uid, packet_id } => {
                max_retain_seq = max_retain_seq.max(seq);
                inbound.entry((uid, packet_id)).or_default().push((seq, offset, true));
            }
            Rec::InboundDone { seq, uid, packet_id } => {
                max_retain_seq = max_retain_seq.max(seq);
                inbound.entry((uid, packet_id)).or_default().push((seq, offset, false));
            }
        }
    }
    store.next_uid = max_uid + 1;
    store.next_msg_id = max_msg + 1;
    store.next_retain_seq = max_retain_seq + 1;

    // Sessions: the newest snapshot of each uid wins; a `SessionGone` or a past expiry ends it.
    let gone: IdMap<Offset> = gones.iter().map(|&(offset, uid)| (uid, offset)).collect();
    let mut live: IdMap<RecoveredSession> = IdMap::default();
    for (uid, mut versions) in snapshots {
        let (newest, rec) = versions.pop().expect("at least one snapshot per entry");
        for (older, _) in versions {
            store.ack(older);
        }
        if let Some(&tomb) = gone.get(&uid) {
            store.ack(newest);
            store.park_tombstone(tomb, newest);
        } else if rec.expiry_secs == 0 || expired(rec.expires_at_ms, clock) {
            // Expired while the broker was down (or never persistent): gone. Without a tombstone a
            // copy may survive a later crash; it is expired then too.
            store.ack(newest);
        } else {
            store.sessions.insert(uid, newest);
            live.insert(
                uid,
                RecoveredSession {
                    rec,
                    deliveries: Vec::new(),
                    backlog: Vec::new(),
                    incoming_qos2: Vec::new(),
                },
            );
        }
    }
    for (offset, _) in gones {
        if !store.limbo.contains_key(&offset) {
            store.ack(offset);
        }
    }

    // Messages: targets that are live sessions without a `Done`; the rest is released.
    // Queue order is message id order; the newest copy of each id wins.
    // The indexes into `msgs` to replay, in id order: all of them when ids ascend.
    let newest: Vec<usize> = if ascending {
        Vec::new()
    } else {
        let mut order: Vec<(u64, usize)> = msgs.iter().enumerate().map(|(index, m)| (m.0, index)).collect();
        order.sort_unstable();
        let mut newest = Vec::with_capacity(order.len());
        for (position, &(id, index)) in order.iter().enumerate() {
            match order.get(position + 1) {
                Some(&(next_id, _)) if next_id == id => store.ack(msgs[index].1),
                _ => newest.push(index),
            }
        }
        newest
    };
    store.msgs.reserve(msgs.len());
    // Each live session's backlog at its final size (at most: counted over every copy), so 2 M
    // entries are not copied as it doubles.
    for (uid, session) in live.iter_mut() {
        session.backlog.reserve(backlog_sizes.get(uid).copied().unwrap_or(0));
    }
    drop(backlog_sizes);
    // The message records again, in id order: from a second sequential pass over the mapping
    // when ids ascend (no checksums again, no index lookups), else one by one by offset. The log
    // is only read here; the acknowledgements and tombstones it owes wait until the pass is over.
    let mut acks: Vec<Offset> = Vec::new();
    let mut tombs: Vec<(Offset, Offset)> = Vec::new();
    {
        let log = &store.log;
        let mut sequential = ascending.then(|| log.iter_after_open());
        let mut sorted = newest.into_iter();
        let mut position = 0usize;
        let mut remaining: Vec<super::records::Target> = Vec::new();
        loop {
            let (index, bytes) = match sequential.as_mut() {
                Some(iter) => {
                    let Some(item) = iter.next() else { break };
                    let (at, bytes) = item.map_err(|e| format!("storage: {e}"))?;
                    if bytes.first() != Some(&KIND_MSG) {
                        continue;
                    }
                    let index = position;
                    position += 1;
                    if msgs.get(index).map(|m| m.1) != Some(at) {
                        return Err(format!(
                            "storage: {}: the log changed during recovery",
                            log.dir().display()
                        ));
                    }
                    (index, bytes)
                }
                None => {
                    let Some(index) = sorted.next() else { break };
                    (index, log.read(msgs[index].1).map_err(|e| format!("storage: {e}"))?)
                }
            };
            let (id, offset, expires_at_ms) = msgs[index];
            // Most messages of a backlog have no progress records at all.
            let records = if aux.is_empty() { Vec::new() } else { aux.remove(&id).unwrap_or_default() };
            let done = |uid: u64| records.iter().any(|r| r.0 == KIND_DONE && r.1 == uid);
            remaining.clear();
            if !expired(expires_at_ms, clock) {
                // Validated by the first pass; read again in place.
                decode_msg_header(bytes, |target| {
                    if live.contains_key(&target.uid) && !done(target.uid) {
                        remaining.push(target);
                    }
                })
                .map_err(|e| place(log, offset, e))?;
            }
            if remaining.is_empty() {
                acks.push(offset);
                for (kind, _, aux_offset, _) in records {
                    if kind == KIND_DONE {
                        tombs.push((aux_offset, offset));
                    } else {
                        acks.push(aux_offset);
                    }
                }
                continue;
            }
            let mut kept = Vec::new();
            for (kind, uid, aux_offset, _) in &records {
                let pending = remaining.iter().any(|t| t.uid == *uid);
                if *kind == KIND_DONE || pending {
                    kept.push((*kind, *uid, *aux_offset));
                } else {
                    acks.push(*aux_offset);
                }
            }
            store.msgs.insert(id, StoredMsg { offset, refs: remaining.len() as u32 });
            if !kept.is_empty() {
                store.progress.insert(id, kept);
            }
            // Decoded only if some session had it in flight; the others keep it as a backlog entry.
            let mut msg: Option<Arc<Message>> = None;
            for target in remaining.drain(..) {
                let progress = records.iter().filter(|r| r.1 == target.uid);
                let packet_id = progress.clone().filter(|r| r.0 == KIND_SENT).filter_map(|r| r.3).next_back();
                let released = progress.clone().any(|r| r.0 == KIND_RELEASED);
                let session = live.get_mut(&target.uid).expect("remaining targets are live sessions");
                let Some(packet_id) = packet_id else {
                    session.backlog.push(LazyDelivery::new(
                        id,
                        target.qos,
                        target.retain,
                        target.subscription_ids,
                    ));
                    continue;
                };
                if msg.is_none() {
                    msg = match decode_rec(bytes) {
                        Ok(Rec::Msg { message, .. }) => Some(message_of(message, clock)),
                        Ok(_) => unreachable!("the header said message"),
                        Err(e) => return Err(place(log, offset, e)),
                    };
                }
                session.deliveries.push(RecoveredDelivery {
                    delivery: Delivery {
                        msg: msg.clone().expect("decoded above"),
                        qos: target.qos,
                        retain: target.retain,
                        subscription_ids: target.subscription_ids,
                        stored: id,
                    },
                    packet_id: Some(packet_id),
                    released,
                });
            }
        }
    }
    drop(msgs);
    for offset in acks {
        store.ack(offset);
    }
    for (tomb, target) in tombs {
        store.park_tombstone(tomb, target);
    }
    // Progress records of messages that are gone.
    for (_, records) in aux {
        for (_, _, offset, _) in records {
            store.ack(offset);
        }
    }

    // Retained: the newest version (highest seq; a compaction copy keeps its original's seq) of
    // each topic decides.
    let mut retained = Vec::new();
    for (key, mut versions) in retains {
        versions.sort_by_key(|(seq, offset, _)| (*seq, *offset));
        let (_, newest, last) = versions.pop().expect("at least one record per entry");
        let older_set = versions.iter().filter(|(_, _, m)| m.is_some()).map(|(_, o, _)| *o).max();
        for (_, older, _) in versions {
            store.ack(older);
        }
        match last {
            Some(message) if !expired(message.expires_at_ms, clock) => {
                store.retained.insert(key, newest);
                retained.push(message_of(message, clock));
            }
            Some(_) => store.ack(newest),
            None => match older_set {
                Some(target) => store.park_tombstone(newest, target),
                None => store.ack(newest),
            },
        }
    }
    // Inbound QoS 2 ids: the newest record of each (session, packet id) decides.
    for ((uid, packet_id), mut versions) in inbound {
        versions.sort_by_key(|(seq, offset, _)| (*seq, *offset));
        let (_, newest, routed) = versions.pop().expect("at least one record per entry");
        let older_routed = versions.iter().filter(|v| v.2).map(|v| v.1).max();
        for (_, older, _) in versions {
            store.ack(older);
        }
        match (routed, live.get_mut(&uid)) {
            (true, Some(session)) => {
                store.inbound.insert((uid, packet_id), newest);
                session.incoming_qos2.push(packet_id);
            }
            (true, None) => store.ack(newest),
            (false, _) => match older_routed {
                Some(target) => store.park_tombstone(newest, target),
                None => store.ack(newest),
            },
        }
    }
    let mut sessions: Vec<RecoveredSession> = live.into_values().collect();
    sessions.sort_by_key(|s| s.rec.uid);
    Ok(Recovered { store, sessions, retained })
}

#[cfg(test)]
mod tests {
    use shardmq_storage::FsyncPolicy;

    use super::super::records::{KIND_MSG, KIND_SESSION_GONE};
    use super::*;

    fn config() -> LogConfig {
        LogConfig {
            segment_size_bytes: 4096,
            record_len_max_bytes: 1024,
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        }
    }

    /// A log written before records were rkyv archives (record encoding 1: a kind byte, then the
    /// fields little-endian, no encoding byte) is refused, and the error names the segment file and
    /// the record's position in it, both for a message (read by its header) and any other record.
    #[test]
    fn a_log_of_hand_encoded_records_is_refused_naming_the_file() {
        let session_gone = [&[KIND_SESSION_GONE][..], &1u64.to_le_bytes()].concat();
        // id, tenant, expiry, no targets, then (here) a stand-in for the PUBLISH frame.
        let msg = [&[KIND_MSG][..], &1u64.to_le_bytes(), &[0; 4], &[0; 8], &[0; 4], &[0x30, 3, 0, 1, b't']]
            .concat();
        for old in [session_gone, msg] {
            let dir = tempfile::tempdir().unwrap();
            let mut log = Log::open(dir.path(), config()).unwrap();
            log.append(&old).unwrap();
            log.close().unwrap();
            let error = replay(Log::open(dir.path(), config()).unwrap(), &Clock::now()).unwrap_err();
            let segment = fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "seg"))
                .expect("a segment file");
            let name = segment.file_name().unwrap().to_string_lossy().to_string();
            assert!(error.contains(&name), "the error names {name}: {error}");
            assert!(error.contains("at file position 64"), "{error}");
            assert!(error.contains("record encoding 1 is not the one this build reads"), "{error}");
        }
    }
}
