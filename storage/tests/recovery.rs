//! Recovery of damaged logs (torn tails at every byte, flipped bits, bad headers, missing
//! records), the disk budget, durability signalling, compaction and shared reads.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use shardmq_storage::{Config, Error, FsyncPolicy, Log, Offset, Record, SegmentId};

fn config(segment_bytes: u64, policy: FsyncPolicy) -> Config {
    Config {
        segment_size_bytes: segment_bytes,
        fsync: policy,
        record_len_max_bytes: 1024,
        ..Config::default()
    }
}

/// 4 KiB staging buffers and a one-batch queue: commits, full buffers and a full queue are
/// frequent.
fn small_buffers(segment_bytes: u64, policy: FsyncPolicy) -> Config {
    Config { write_buffer_bytes: 4096, write_queue_batches: 1, ..config(segment_bytes, policy) }
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7) as u8 | 1).collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, at: u64, bit: u8) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at as usize] ^= 1 << bit;
    fs::write(path, bytes).unwrap();
}

#[test]
fn torn_tail_at_every_byte_of_the_last_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(8192, FsyncPolicy::Never);
    let mut log = Log::open(dir, cfg.clone()).unwrap();
    let mut offsets = Vec::new();
    for i in 0..5 {
        offsets.push(log.append(&payload(i, 20 + i * 10)).unwrap());
    }
    let last_len = 61;
    let last = log.append(&payload(99, last_len)).unwrap();
    let loc = log.record_location(last).unwrap();
    log.close().unwrap();
    let original = fs::read(&loc.path).unwrap();
    let complete = loc.position + 8 + last_len as u64;
    for cut in loc.position..=complete + 3 {
        // The previous round's append may have rolled into a new segment: start from one file.
        for f in segment_files(dir).into_iter().filter(|f| *f != loc.path) {
            fs::remove_file(f).unwrap();
        }
        fs::write(&loc.path, &original[..cut as usize]).unwrap();
        let mut log = Log::open(dir, cfg.clone()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        for (i, o) in offsets.iter().enumerate() {
            assert_eq!(log.read(*o).unwrap(), &payload(i, 20 + i * 10)[..], "cut at {cut}");
        }
        let survives = cut >= complete;
        assert_eq!(log.read(last).is_ok(), survives, "cut at {cut}");
        let torn = cut > loc.position && cut < complete;
        assert_eq!(log.recovery().torn_tail.is_some(), torn, "cut at {cut}: {:?}", log.recovery());
        // The log goes on: a new record lands where the torn one was, and survives a reopen.
        let next = log.append(b"after the tear").unwrap();
        // The last record's frame is 8 + 61 bytes, padded to 72.
        assert_eq!(next, if survives { Offset(last.0 + 72) } else { last }, "cut at {cut}");
        log.close().unwrap();
        let log = Log::open(dir, cfg.clone()).unwrap();
        assert!(log.recovery().torn_tail.is_none(), "cut at {cut}: second open is clean");
        assert_eq!(log.read(next).unwrap(), b"after the tear");
        assert_eq!(log.stats().live_records, offsets.len() as u64 + 1 + survives as u64, "cut at {cut}");
        drop(log);
    }
}

/// Builds a log of three segments (4 records in the last), closed; returns the offsets and
/// payload lengths.
fn three_segments(dir: &Path, cfg: &Config) -> Vec<(Offset, usize)> {
    let mut log = Log::open(dir, cfg.clone()).unwrap();
    let mut records = Vec::new();
    let mut in_third = 0;
    for i in 0..10_000 {
        let len = 100 + i % 50;
        let o = log.append(&payload(i, len)).unwrap();
        records.push((o, len));
        if log.record_location(o).unwrap().segment == SegmentId(3) {
            in_third += 1;
            if in_third == 4 {
                break;
            }
        }
    }
    log.close().unwrap();
    records
}

#[test]
fn flipped_bits_in_a_middle_segment_are_reported_with_file_and_position() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(4096, FsyncPolicy::Never);
    let records = three_segments(dir, &cfg);
    let log = Log::open(dir, cfg.clone()).unwrap();
    let middle: Vec<_> = records
        .iter()
        .map(|(o, len)| (log.record_location(*o).unwrap(), *len))
        .filter(|(loc, _)| loc.segment == SegmentId(2))
        .collect();
    drop(log);
    let (loc, len) = middle[middle.len() / 2].clone();
    let original = fs::read(&loc.path).unwrap();
    // A payload bit, a length bit, a checksum bit, and the last payload byte of the record.
    for (at, bit) in [
        (loc.position + 8 + 3, 2),
        (loc.position + 1, 0),
        (loc.position + 5, 7),
        (loc.position + 7 + len as u64, 0),
    ] {
        flip(&loc.path, at, bit);
        match Log::open(dir, cfg.clone()) {
            Err(Error::CorruptRecord { path, position, .. }) => {
                assert_eq!(path, loc.path);
                assert_eq!(position, loc.position, "flip at {at}");
            }
            other => panic!("flip at {at}: expected CorruptRecord, got {other:?}"),
        }
        fs::write(&loc.path, &original).unwrap();
    }
    // Damage to the last record of a middle segment is corruption too (only the log's last
    // segment can have a torn tail).
    let (loc, _) = middle.last().unwrap().clone();
    flip(&loc.path, loc.position + 9, 4);
    assert!(
        matches!(Log::open(dir, cfg.clone()), Err(Error::CorruptRecord { ref path, .. }) if *path == loc.path)
    );
    fs::write(&loc.path, &original).unwrap();
    // A middle segment cut short: its records no longer join the next segment.
    let short = loc.position;
    OpenOptions::new().write(true).open(&loc.path).unwrap().set_len(short).unwrap();
    match Log::open(dir, cfg.clone()) {
        Err(Error::SegmentGap { path, .. }) => assert_eq!(path, segment_files(dir)[2]),
        other => panic!("expected SegmentGap, got {other:?}"),
    }
    fs::write(&loc.path, &original).unwrap();
    assert_eq!(Log::open(dir, cfg).unwrap().stats().live_records, records.len() as u64);
}

#[test]
fn flipped_bits_in_the_last_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(4096, FsyncPolicy::Never);
    let records = three_segments(dir, &cfg);
    let log = Log::open(dir, cfg.clone()).unwrap();
    let locs: Vec<_> = records.iter().map(|(o, len)| (*o, log.record_location(*o).unwrap(), *len)).collect();
    drop(log);
    let (last_off, last_loc, last_len) = locs.last().unwrap().clone();
    let original = fs::read(&last_loc.path).unwrap();
    // In the last record: a torn tail, cut off; every other record is intact.
    for (at, bit) in [(last_loc.position + 8 + (last_len as u64) / 2, 3), (last_loc.position + 2, 1)] {
        flip(&last_loc.path, at, bit);
        let log = Log::open(dir, cfg.clone()).unwrap_or_else(|e| panic!("flip at {at}: {e}"));
        let torn = log.recovery().torn_tail.clone().expect("a torn tail");
        assert_eq!(torn.position, last_loc.position);
        assert_eq!(torn.offset, last_off);
        assert!(matches!(log.read(last_off), Err(Error::NoRecord { .. })));
        assert_eq!(log.stats().live_records, records.len() as u64 - 1);
        drop(log);
        fs::write(&last_loc.path, &original).unwrap();
    }
    // In a record of the last segment that valid records follow: corruption, not a tail.
    let (_, loc, len) = locs.iter().rev().nth(2).unwrap().clone();
    assert_eq!(loc.path, last_loc.path);
    flip(&loc.path, loc.position + 8 + len as u64 - 1, 5);
    assert!(
        matches!(Log::open(dir, cfg.clone()), Err(Error::CorruptRecord { ref path, position, .. }) if *path == loc.path && position == loc.position)
    );
    fs::write(&loc.path, &original).unwrap();
    // Lost pages: a zeroed record followed by valid ones is corruption as well.
    let mut bytes = original.clone();
    bytes[loc.position as usize..loc.position as usize + 8].fill(0);
    fs::write(&loc.path, &bytes).unwrap();
    assert!(matches!(Log::open(dir, cfg.clone()), Err(Error::CorruptRecord { .. })));
    fs::write(&loc.path, &original).unwrap();
    assert_eq!(Log::open(dir, cfg).unwrap().stats().live_records, records.len() as u64);
}

#[test]
fn bad_headers_and_versions_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(4096, FsyncPolicy::Never);
    three_segments(dir, &cfg);
    let files = segment_files(dir);
    let original = fs::read(&files[1]).unwrap();
    for (at, bit) in [(0u64, 0u8), (20, 3), (27, 1), (33, 6)] {
        flip(&files[1], at, bit);
        match Log::open(dir, cfg.clone()) {
            Err(Error::CorruptHeader { path, .. }) => assert_eq!(path, files[1]),
            other => panic!("flip at {at}: expected CorruptHeader, got {other:?}"),
        }
        fs::write(&files[1], &original).unwrap();
    }
    let mut v2 = original.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    fs::write(&files[1], &v2).unwrap();
    match Log::open(dir, cfg.clone()) {
        Err(e @ Error::UnsupportedVersion { .. }) => {
            let text = e.to_string();
            assert!(text.contains("version 2") && text.contains(&files[1].display().to_string()), "{text}");
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    fs::write(&files[1], &original[..40]).unwrap();
    assert!(
        matches!(Log::open(dir, cfg.clone()), Err(Error::CorruptHeader { ref path, .. }) if *path == files[1])
    );
    // A segment file renamed to another id is caught by the id in its header.
    fs::write(&files[1], &original).unwrap();
    fs::rename(&files[2], dir.join("00000000000000000009.seg")).unwrap();
    assert!(matches!(Log::open(dir, cfg.clone()), Err(Error::CorruptHeader { .. })));
    fs::rename(dir.join("00000000000000000009.seg"), &files[2]).unwrap();
    // A leftover temporary file from an interrupted segment creation is removed.
    fs::write(dir.join("00000000000000000004.seg.tmp"), b"partial").unwrap();
    let log = Log::open(dir, cfg).unwrap();
    assert_eq!(log.recovery().removed_temporary_files, 1);
    assert!(!dir.join("00000000000000000004.seg.tmp").exists());
}

#[test]
fn disk_budget_is_a_typed_error_and_frees_with_consumption() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = Config { disk_budget_bytes: 3 * 4096, ..config(4096, FsyncPolicy::Always) };
    let mut log = Log::open(dir, cfg.clone()).unwrap();
    let mut stored = Vec::new();
    let err = loop {
        let p = payload(stored.len(), 200);
        match log.append(&p) {
            Ok(o) => stored.push((o, p)),
            Err(e) => break e,
        }
        assert!(stored.len() < 1000, "the budget never ran out");
    };
    assert!(matches!(err, Error::DiskBudgetExceeded { budget_bytes: 12288, .. }), "{err:?}");
    assert_eq!(segment_files(dir).len(), 3);
    // Refused again, and nothing stored is damaged, before and after a reopen.
    assert!(matches!(log.append(&payload(0, 200)), Err(Error::DiskBudgetExceeded { .. })));
    for (o, p) in &stored {
        assert_eq!(log.read(*o).unwrap(), &p[..]);
    }
    log.close().unwrap();
    let mut log = Log::open(dir, cfg.clone()).unwrap();
    assert_eq!(log.stats().live_records, stored.len() as u64);
    assert!(matches!(log.append(&payload(0, 200)), Err(Error::DiskBudgetExceeded { .. })));
    // Consuming the first segment frees it; appends work again.
    let first = log.record_location(stored[0].0).unwrap().segment;
    let in_first: Vec<Offset> = stored
        .iter()
        .map(|(o, _)| *o)
        .filter(|o| log.record_location(*o).unwrap().segment == first)
        .collect();
    for o in &in_first {
        assert!(log.ack(*o).unwrap());
    }
    assert_eq!(log.stats().segments, 2);
    let o = log.append(&payload(7, 200)).unwrap();
    assert_eq!(log.read(o).unwrap(), &payload(7, 200)[..]);
    // The deletion happens on the sync thread; close waits for it.
    log.close().unwrap();
    assert_eq!(segment_files(dir).len(), 3);
    assert!(!segment_files(dir).iter().any(|p| p.ends_with(format!("{:020}.seg", first.0))));
}

#[test]
fn oversized_records_and_bad_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = Log::open(tmp.path(), config(4096, FsyncPolicy::Never)).unwrap();
    assert!(matches!(
        log.append(&[0u8; 1025]),
        Err(Error::RecordTooLarge { len_bytes: 1025, max_bytes: 1024 })
    ));
    assert_eq!(log.append(&[]).unwrap(), Offset(0));
    assert_eq!(log.read(Offset(0)).unwrap(), b"");
    drop(log);
    let bad = [
        Config { segment_size_bytes: 1000, ..Config::default() },
        Config { record_len_max_bytes: 8192, ..config(4096, FsyncPolicy::Never) },
        Config { disk_budget_bytes: 100, ..config(4096, FsyncPolicy::Never) },
        config(4096, FsyncPolicy::Interval(Duration::ZERO)),
    ];
    for cfg in bad {
        assert!(matches!(Log::open(tmp.path(), cfg.clone()), Err(Error::Config(_))), "{cfg:?}");
    }
    assert_eq!("always".parse::<FsyncPolicy>().unwrap(), FsyncPolicy::Always);
    assert_eq!("never".parse::<FsyncPolicy>().unwrap(), FsyncPolicy::Never);
    assert_eq!("interval:5".parse::<FsyncPolicy>().unwrap(), FsyncPolicy::Interval(Duration::from_millis(5)));
    assert!("interval:0".parse::<FsyncPolicy>().is_err());
    assert!("sometimes".parse::<FsyncPolicy>().is_err());
}

/// Waits (bounded) for an `on_durable` notification at or past `end`.
fn wait_notified(rx: &mpsc::Receiver<Offset>, end: Offset) {
    loop {
        let o = rx.recv_timeout(Duration::from_secs(10)).expect("the sync thread reports progress");
        if o >= end {
            return;
        }
    }
}

fn notifier() -> (shardmq_storage::DurableNotify, mpsc::Receiver<Offset>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let notify: shardmq_storage::DurableNotify = Arc::new(move |o: Offset| {
        // The receiver outlives the logs; a send after it is gone is harmless.
        let _ = tx.lock().unwrap().send(o);
    });
    (notify, rx)
}

#[test]
fn durable_offset_follows_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let (notify, rx) = notifier();
    for policy in [FsyncPolicy::Always, FsyncPolicy::Interval(Duration::from_millis(2)), FsyncPolicy::Never] {
        let dir = tmp.path().join(format!("{policy:?}"));
        let cfg = Config { on_durable: Some(notify.clone()), ..config(1 << 20, policy) };
        let mut log = Log::open(&dir, cfg).unwrap();
        let start = log.synced_offset();
        let mut last = Offset(0);
        for i in 0..200 {
            last = log.append(&payload(i, 64)).unwrap();
        }
        let end = log.end_offset();
        assert!(last < end);
        // Appended but not committed (200 frames fit the 64 KiB buffer): never durable.
        assert_eq!(log.durable_offset(), start, "{policy:?}");
        assert_eq!(log.written_offset(), start, "{policy:?}");
        // Committed: durable without any further append, and the owner is told (no sleeps: the
        // channel). Under `Never` durable means written, and nothing is flushed.
        log.commit().unwrap();
        wait_notified(&rx, end);
        assert!(log.durable_offset() >= end, "{policy:?}");
        assert!(log.written_offset() >= end, "{policy:?}");
        if policy == FsyncPolicy::Never {
            assert_eq!(log.synced_offset(), start);
            assert!(log.wait_durable(end, Duration::from_secs(10)).unwrap());
        }
        assert!(log.synced_offset() >= end, "{policy:?}");
        log.close().unwrap();
        while rx.try_recv().is_ok() {}
    }
}

/// `notify_when_written`: under a policy that flushes once an hour, a write alone (no flush) wakes
/// the owner that asked, and no wish is lost when the write races the asking (200 rounds, each
/// asking right after its commit; a lost wake-up fails the bounded wait).
#[test]
fn the_owner_is_told_when_its_records_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (notify, rx) = notifier();
    let cfg = Config {
        on_durable: Some(notify),
        ..config(1 << 20, FsyncPolicy::Interval(Duration::from_secs(3600)))
    };
    let mut log = Log::open(tmp.path(), cfg).unwrap();
    let mut asked_before_written = 0;
    for round in 0..200 {
        log.append(&payload(round, 64)).unwrap();
        let end = log.end_offset();
        if round == 0 {
            // Not committed: never written, so the wish stands.
            assert!(!log.notify_when_written(end));
        }
        log.commit().unwrap();
        if !log.notify_when_written(end) {
            asked_before_written += 1;
            wait_notified(&rx, end);
        }
        assert!(log.written_offset() >= end, "round {round}");
        assert!(log.notify_when_written(end), "written ends are reported at once");
        while rx.try_recv().is_ok() {}
    }
    assert!(asked_before_written >= 1, "the first round waited for the write");
    // Written is not durable under this policy: nothing was flushed after the opening round.
    assert!(log.durable_offset() < log.end_offset());
    log.close().unwrap();
}

/// Records are readable from the moment they are appended: from the staging buffer, from a
/// committed batch the sync thread has not written, and from the mapping after; `read_shared`
/// copies an unwritten record and maps a written one.
#[test]
fn staged_and_committed_records_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_buffers(1 << 14, FsyncPolicy::Never);
    let mut log = Log::open(tmp.path(), cfg.clone()).unwrap();
    let mut stored = Vec::new();
    let mut shared = Vec::new();
    for i in 0..400 {
        let p = payload(i, 1 + i % 200);
        let o = log.append(&p).unwrap();
        assert_eq!(log.read(o).unwrap(), &p[..], "just appended");
        if i % 7 == 0 {
            shared.push((log.read_shared(o).unwrap(), p.clone()));
        }
        if i % 50 == 0 {
            log.commit().unwrap();
        }
        stored.push((o, p));
        // Every earlier record, wherever it is now (buffer, batch, file, next segment).
        let (o, p) = &stored[i * 31 % stored.len()];
        assert_eq!(log.read(*o).unwrap(), &p[..]);
    }
    let got: Vec<(Offset, Vec<u8>)> =
        log.iter_from(Offset(0)).map(|r| r.map(|(o, p)| (o, p.to_vec())).unwrap()).collect();
    assert_eq!(got, stored);
    assert!(log.stats().segments > 1, "the records span rolls");
    let end = log.end_offset();
    assert!(log.wait_durable(end, Duration::from_secs(10)).unwrap());
    for (o, p) in &stored {
        assert_eq!(log.read(*o).unwrap(), &p[..], "written");
    }
    for (record, p) in &shared {
        assert_eq!(&record[..], &p[..]);
    }
    log.close().unwrap();
    let log = Log::open(tmp.path(), cfg).unwrap();
    for (o, p) in &stored {
        assert_eq!(log.read(*o).unwrap(), &p[..], "after reopening");
    }
}

/// A crash of the process loses the staging buffer (and batches not yet written), never what
/// was durable; the log reopens at the written end and goes on from there.
#[test]
fn a_crash_loses_staged_records_only() {
    for policy in [FsyncPolicy::Always, FsyncPolicy::Interval(Duration::from_millis(2)), FsyncPolicy::Never] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(1 << 16, policy);
        let mut log = Log::open(tmp.path(), cfg.clone()).unwrap();
        let kept: Vec<(Offset, Vec<u8>)> =
            (0..50).map(|i| (log.append(&payload(i, 40)).unwrap(), payload(i, 40))).collect();
        let durable_end = log.end_offset();
        assert!(log.wait_durable(durable_end, Duration::from_secs(10)).unwrap());
        assert!(log.durable_offset() >= durable_end);
        let staged: Vec<Offset> = (50..80).map(|i| log.append(&payload(i, 40)).unwrap()).collect();
        assert_eq!(log.read(staged[0]).unwrap(), &payload(50, 40)[..]);
        let crash = log.abandon();
        assert_eq!(crash.written, durable_end, "{policy:?}: nothing staged was written");
        let mut log = Log::open(tmp.path(), cfg).unwrap();
        assert_eq!(log.end_offset(), durable_end, "{policy:?}");
        assert!(log.recovery().torn_tail.is_none());
        for (o, p) in &kept {
            assert_eq!(log.read(*o).unwrap(), &p[..]);
        }
        assert!(matches!(log.read(staged[0]), Err(Error::NoRecord { .. })));
        // The next append takes the first lost offset: it was never durable, nobody was told.
        assert_eq!(log.append(b"after the crash").unwrap(), staged[0]);
        log.close().unwrap();
    }
}

/// With a one-batch queue and small buffers the owner often finds the queue full and writes
/// itself; the order of the file is kept either way.
#[test]
fn a_full_queue_makes_the_owner_write_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_buffers(1 << 20, FsyncPolicy::Always);
    let mut log = Log::open(tmp.path(), cfg.clone()).unwrap();
    let stored: Vec<(Offset, Vec<u8>)> =
        (0..3000).map(|i| (log.append(&payload(i, 300)).unwrap(), payload(i, 300))).collect();
    log.commit().unwrap();
    eprintln!("owner wrote {} of about {} batches itself", log.stats().owner_writes, 3000 * 312 / 4096);
    let end = log.end_offset();
    assert!(log.wait_durable(end, Duration::from_secs(30)).unwrap());
    let crash = log.abandon();
    assert_eq!(crash.written, end);
    let log = Log::open(tmp.path(), cfg).unwrap();
    let got: Vec<(Offset, Vec<u8>)> =
        log.iter_from(Offset(0)).map(|r| r.map(|(o, p)| (o, p.to_vec())).unwrap()).collect();
    assert_eq!(got, stored);
}

#[test]
fn compaction_moves_live_records_and_frees_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(4096, FsyncPolicy::Interval(Duration::from_millis(1)));
    let mut log = Log::open(dir, cfg.clone()).unwrap();
    let mut live = std::collections::BTreeMap::new();
    for i in 0..120 {
        let p = payload(i, 150);
        let o = log.append(&p).unwrap();
        if i % 5 == 0 {
            live.insert(o, p);
        } else {
            log.ack(o).unwrap();
        }
    }
    let before = log.stats();
    assert!(before.segments > 3);
    let mut moves = Vec::new();
    let stats = log.compact(0.5, |old, new| moves.push((old, new))).unwrap();
    assert!(stats.segments_compacted >= before.segments - 2, "{stats:?} {before:?}");
    assert_eq!(stats.records_moved as usize, moves.len());
    for (old, new) in &moves {
        assert!(new > old);
        let p = live.remove(old).expect("only live records move");
        live.insert(*new, p);
    }
    assert!(log.stats().segments < before.segments);
    let got: Vec<(Offset, Vec<u8>)> =
        log.iter_from(Offset(0)).map(|r| r.map(|(o, p)| (o, p.to_vec())).unwrap()).collect();
    let want: Vec<(Offset, Vec<u8>)> = live.iter().map(|(o, p)| (*o, p.clone())).collect();
    assert_eq!(got, want);
    log.close().unwrap();
    // After reopening, the live records are there once: the compacted segments are gone. (The
    // consumed records of the segment that was active during compaction come back as live, as
    // consumption is not persistent.)
    let log = Log::open(dir, cfg).unwrap();
    let got: Vec<Offset> = log.iter_from(Offset(0)).map(|r| r.unwrap().0).collect();
    for (old, _) in &moves {
        assert!(matches!(log.read(*old), Err(Error::NoRecord { .. })), "old copy {old:?} still stored");
    }
    for (o, p) in &live {
        assert!(got.contains(o));
        assert_eq!(log.read(*o).unwrap(), &p[..]);
    }
}

#[test]
fn shared_records_outlive_the_deletion_of_their_segment() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Record>();
    let tmp = tempfile::tempdir().unwrap();
    let mut log = Log::open(tmp.path(), config(4096, FsyncPolicy::Never)).unwrap();
    let first = log.append(b"kept alive by its Record").unwrap();
    let record = log.read_shared(first).unwrap();
    assert_eq!(record.offset(), first);
    assert_eq!(log.read(first).unwrap().as_ptr() as usize % 8, 0, "payloads are 8-byte aligned");
    log.ack(first).unwrap();
    for _ in 0..100 {
        if log.read(first).is_err() {
            break;
        }
        let o = log.append(&[7u8; 500]).unwrap();
        log.ack(o).unwrap();
    }
    // The first segment was consumed and deleted; the record still reads from its mapping, also
    // from another thread.
    assert!(matches!(log.read(first), Err(Error::NoRecord { .. })));
    log.close().unwrap();
    let text = std::thread::spawn(move || record.to_vec()).join().unwrap();
    assert_eq!(text, b"kept alive by its Record");
}

#[test]
fn a_roll_that_never_became_durable_is_discarded_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(4096, FsyncPolicy::Always);
    let records = three_segments(dir, &cfg);
    // What a crash can leave after a roll whose header never reached the disk but whose rename
    // did: a file under the next segment's name with the spare's placeholder header (id 0).
    let mut header = [0u8; 64];
    header[0..8].copy_from_slice(b"SHMQSEG\0");
    header[8..12].copy_from_slice(&1u32.to_le_bytes());
    header[12..16].copy_from_slice(&64u32.to_le_bytes());
    let crc = crc32c::crc32c(&header[0..32]);
    header[32..36].copy_from_slice(&crc.to_le_bytes());
    let mut file = header.to_vec();
    file.resize(4096, 0);
    let unfinished = dir.join("00000000000000000004.seg");
    fs::write(&unfinished, &file).unwrap();
    let mut log = Log::open(dir, cfg.clone()).unwrap();
    assert_eq!(log.recovery().discarded_unfinished_segments, 1);
    assert!(!unfinished.exists());
    for (i, (o, len)) in records.iter().enumerate() {
        assert_eq!(log.read(*o).unwrap(), &payload(i, *len)[..]);
    }
    // The log goes on; ids are never reused, so its next segment is 5.
    while log.stats().segments == 3 {
        log.append(&payload(0, 300)).unwrap();
    }
    log.close().unwrap();
    assert!(!unfinished.exists() && dir.join("00000000000000000005.seg").exists());
    assert_eq!(Log::open(dir, cfg).unwrap().recovery().discarded_unfinished_segments, 0);
}
