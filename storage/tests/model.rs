//! Seeded random operations on a real log against a simple in-memory model.
//!
//! Operations: append (sometimes too large), read (including records still staged or in flight
//! to the sync thread), ack, iterate, compact, commit (sometimes waiting for the flush), sync,
//! and crash: stop the log without a sync (`Log::abandon`), then optionally damage the last
//! segment beyond what was flushed (truncate the file, zero its tail as lost pages would, or flip
//! a bit of its last record), then reopen. Staging buffers are small (4 KiB) and the sync
//! thread's queue short (1 to 3 batches), so commits, full buffers, a full queue (the owner
//! writes itself) and crashes with staged and queued bytes all happen.
//!
//! What the model expects after a crash, under every policy:
//! - A crash alone (the process dies; the page cache survives) loses exactly the records at or
//!   after the written end that `abandon` returns (staged, or committed and not yet written), and
//!   nothing the owner could have acknowledged: `durable_offset()` never passed the written end.
//! - Damage is only ever applied at or after the flushed end that `abandon` returns and before
//!   the written end: the bytes a power loss could lose. Under `Always` and `Interval` the
//!   flushed end is at least `durable_offset()`, so nothing the owner could have acknowledged is
//!   damaged; under `Never` `durable_offset()` is everything written and the policy accepts the
//!   loss.
//! - After damage at file position `p` of the last segment, a record of that segment survives if
//!   and only if its frame (length, checksum, payload) lies wholly before `p`; every record of
//!   earlier segments survives. Recovery must report the cut as a torn tail, not an error.
//! - Consumption is not persistent: after reopening, the model re-acks the records it had acked
//!   that are still stored (as the broker does from its own ack records); those whose segment was
//!   deleted are gone.
//!
//! The normal run is 2000 seeds of 200 operations each (25 s in a debug build on the shared
//! 2-core VM; most of it is waiting for `fdatasync`, so a busy disk makes it longer); run one
//! seed with `STORAGE_SEED=<n>`, another count with `STORAGE_SEEDS=<count>`, and another length
//! with `STORAGE_OPS=<operations>`.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shardmq_storage::{Config, Error, FsyncPolicy, Log, Offset, SEGMENT_HEADER_LEN_BYTES};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Debug)]
struct Rec {
    payload: Vec<u8>,
    /// Not live: consumed by the owner, or moved by compaction (then `moved_to` says where).
    acked: bool,
    /// Compaction copied the record to this offset. The old copy stays on disk until the old
    /// segment is deleted; after a crash that lost the new copy it is the live one again.
    moved_to: Option<Offset>,
}

const SEGMENT_BYTES: u64 = 8192;
const RECORD_MAX_BYTES: u32 = 1024;
const BUDGET_SEGMENTS: u64 = 3;

fn config(policy: FsyncPolicy, write_queue_batches: usize) -> Config {
    Config {
        segment_size_bytes: SEGMENT_BYTES,
        disk_budget_bytes: SEGMENT_BYTES * BUDGET_SEGMENTS,
        fsync: policy,
        record_len_max_bytes: RECORD_MAX_BYTES,
        on_durable: None,
        write_buffer_bytes: 4096,
        write_queue_batches,
    }
}

fn payload(rng: &mut Rng, serial: u64) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => rng.below(8) as usize,
        1 => 900 + rng.below(200) as usize, // sometimes over the maximum
        _ => rng.below(300) as usize,
    };
    let mut p = Vec::with_capacity(len);
    let mut x = serial.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.push(x as u8);
    }
    p
}

/// The last segment file that has its own header, and its base. Files after it still have a
/// spare's header (id 0): a roll whose first batch the crash kept from being written, which
/// recovery discards.
fn last_segment(dir: &Path) -> (PathBuf, u64) {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    names.sort();
    while let Some(path) = names.pop() {
        let bytes = fs::read(&path).unwrap();
        if u64::from_le_bytes(bytes[16..24].try_into().unwrap()) != 0 {
            let base = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
            return (path, base);
        }
    }
    panic!("a log has a segment with a header")
}

fn frame_end(offset: u64, base: u64, len: usize) -> u64 {
    SEGMENT_HEADER_LEN_BYTES as u64 + (offset - base) + 8 + len as u64
}

/// Checks that the log's live records are exactly the model's unacked ones.
fn check_all(log: &Log, model: &BTreeMap<Offset, Rec>, ctx: &str) {
    let live: Vec<(Offset, Vec<u8>)> =
        log.iter_from(Offset(0)).map(|r| r.map(|(o, p)| (o, p.to_vec())).expect(ctx)).collect();
    let expected: Vec<(Offset, Vec<u8>)> =
        model.iter().filter(|(_, r)| !r.acked).map(|(o, r)| (*o, r.payload.clone())).collect();
    if live.len() != expected.len() {
        let got: std::collections::BTreeSet<Offset> = live.iter().map(|(o, _)| *o).collect();
        let want: std::collections::BTreeSet<Offset> = expected.iter().map(|(o, _)| *o).collect();
        panic!(
            "{ctx}: live record count {} != {}: only in the log {:?}, only in the model {:?}",
            live.len(),
            expected.len(),
            got.difference(&want).collect::<Vec<_>>(),
            want.difference(&got).collect::<Vec<_>>()
        );
    }
    for (a, b) in live.iter().zip(&expected) {
        assert_eq!(a.0, b.0, "{ctx}: live offsets differ");
        assert_eq!(a.1, b.1, "{ctx}: payload at {:?} differs", a.0);
    }
    let stats = log.stats();
    assert_eq!(stats.live_records, expected.len() as u64, "{ctx}: stats.live_records");
    assert!(stats.allocated_bytes <= SEGMENT_BYTES * BUDGET_SEGMENTS, "{ctx}: over budget");
}

/// How often each interesting event happened, summed over seeds, so the test can show (and
/// assert) that the random operations reached every path.
#[derive(Debug, Default)]
struct Coverage {
    appends: u64,
    acks: u64,
    crashes: u64,
    damaged_crashes: u64,
    torn_tails_reported: u64,
    records_lost_to_damage: u64,
    records_moved: u64,
    budget_refusals: u64,
    too_large: u64,
    commits: u64,
    waited_durable: u64,
    staged_records_lost: u64,
    staged_reads: u64,
    owner_writes: u64,
    acked_records_back_after_crash: u64,
    moved_records_restored_after_crash: u64,
}

fn run(seed: u64, ops: usize, cov: &mut Coverage) {
    let mut rng = Rng(seed);
    let policy = match seed % 3 {
        0 => FsyncPolicy::Always,
        1 => FsyncPolicy::Interval(Duration::from_millis(1 + rng.below(3))),
        _ => FsyncPolicy::Never,
    };
    let queue = 1 + rng.below(3) as usize;
    let config = |policy| config(policy, queue);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let mut log = Log::open(&dir, config(policy)).unwrap();
    let mut model: BTreeMap<Offset, Rec> = BTreeMap::new();
    let mut serial = 0u64;
    for step in 0..ops {
        let ctx = format!("seed {seed} step {step} ({policy:?})");
        let trace = std::env::var("STORAGE_TRACE").is_ok();
        let op = rng.below(100);
        if trace {
            eprintln!("step {step} op {op} end {:?} model {}", log.end_offset(), model.len());
        }
        match op {
            0..=39 => {
                serial += 1;
                let p = payload(&mut rng, serial);
                match log.append(&p) {
                    Ok(o) => {
                        assert!(p.len() <= RECORD_MAX_BYTES as usize, "{ctx}: oversized record accepted");
                        assert!(
                            model.keys().next_back().is_none_or(|last| *last < o),
                            "{ctx}: offset not increasing"
                        );
                        if rng.chance(25) {
                            // Still in the staging buffer (or just committed by a full buffer).
                            assert_eq!(log.read(o).expect(&ctx), &p[..], "{ctx}: read of a staged record");
                            cov.staged_reads += u64::from(log.written_offset() <= o);
                        }
                        model.insert(o, Rec { payload: p, acked: false, moved_to: None });
                        cov.appends += 1;
                    }
                    Err(Error::RecordTooLarge { .. }) => {
                        assert!(p.len() > RECORD_MAX_BYTES as usize, "{ctx}");
                        cov.too_large += 1;
                    }
                    Err(Error::DiskBudgetExceeded { .. }) => {
                        let s = log.stats();
                        assert!(s.allocated_bytes + SEGMENT_BYTES > SEGMENT_BYTES * BUDGET_SEGMENTS, "{ctx}");
                        cov.budget_refusals += 1;
                    }
                    Err(e) => panic!("{ctx}: append failed: {e}"),
                }
            }
            40..=54 => {
                let live: Vec<Offset> = model.iter().filter(|(_, r)| !r.acked).map(|(o, _)| *o).collect();
                if let Some(&o) = live.get(rng.below(live.len() as u64) as usize) {
                    assert_eq!(log.read(o).expect(&ctx), &model[&o].payload[..], "{ctx}: read {o:?}");
                    let shared = log.read_shared(o).expect(&ctx);
                    assert_eq!(&shared[..], &model[&o].payload[..], "{ctx}: read_shared {o:?}");
                }
                // An offset that is not a record boundary.
                if let Some((&o, r)) = model.iter().next_back() {
                    if !r.acked {
                        assert!(matches!(log.read(Offset(o.0 + 1)), Err(Error::NoRecord { .. })), "{ctx}");
                    }
                }
            }
            // Odd seeds consume slowly, so their logs fill the disk budget.
            55..=76 if seed % 2 == 0 || rng.chance(30) => {
                let live: Vec<Offset> = model.iter().filter(|(_, r)| !r.acked).map(|(o, _)| *o).collect();
                // Ack mostly in order (like a queue), sometimes anywhere.
                let pick = if rng.chance(70) {
                    rng.below(3.min(live.len() as u64))
                } else {
                    rng.below(live.len() as u64)
                };
                if let Some(&o) = live.get(pick as usize) {
                    assert!(log.ack(o).expect(&ctx), "{ctx}: ack {o:?}");
                    model.get_mut(&o).unwrap().acked = true;
                    cov.acks += 1;
                    if rng.chance(10) {
                        // A second ack is harmless, unless the segment is gone.
                        match log.ack(o) {
                            Ok(false) | Err(Error::NoRecord { .. }) => {}
                            other => panic!("{ctx}: second ack {other:?}"),
                        }
                    }
                }
            }
            77..=81 => {
                let from = match model.keys().nth(rng.below(model.len() as u64 + 1) as usize) {
                    Some(o) => *o,
                    None => log.end_offset(),
                };
                let got: Vec<Offset> = log.iter_from(from).map(|r| r.expect(&ctx).0).collect();
                let want: Vec<Offset> =
                    model.range(from..).filter(|(_, r)| !r.acked).map(|(o, _)| *o).collect();
                assert_eq!(got, want, "{ctx}: iter_from {from:?}");
            }
            82..=86 => {
                let ratio = [0.25, 0.5, 0.75][rng.below(3) as usize];
                let mut moves = Vec::new();
                let result = log.compact(ratio, |old, new| moves.push((old, new)));
                cov.records_moved += moves.len() as u64;
                if trace {
                    eprintln!("compact {ratio}: {result:?} moves {moves:?}");
                }
                for (old, new) in moves {
                    let rec = model.get_mut(&old).unwrap_or_else(|| panic!("{ctx}: moved unknown {old:?}"));
                    assert!(!rec.acked, "{ctx}: moved a consumed record {old:?}");
                    rec.acked = true;
                    rec.moved_to = Some(new);
                    let copy = Rec { payload: rec.payload.clone(), acked: false, moved_to: None };
                    assert!(model.insert(new, copy).is_none(), "{ctx}: moved onto {new:?}");
                }
                match result {
                    Ok(_) | Err(Error::DiskBudgetExceeded { .. }) => {}
                    Err(e) => panic!("{ctx}: compact failed: {e}"),
                }
                // Acked records that compaction's segment deletion removed are forgotten lazily.
                check_all(&log, &model, &ctx);
            }
            87..=89 => {
                let end = log.sync().expect(&ctx);
                assert_eq!(end, log.end_offset(), "{ctx}");
                assert!(log.durable_offset() >= end, "{ctx}: durable after sync");
                assert!(log.synced_offset() >= end, "{ctx}: synced after sync");
            }
            90..=93 => {
                log.commit().expect(&ctx);
                cov.commits += 1;
                let end = log.end_offset();
                assert!(log.written_offset() <= end && log.synced_offset() <= log.written_offset(), "{ctx}");
                if rng.chance(20) {
                    // Committed records become durable with no further append, under every policy.
                    assert!(
                        log.wait_durable(end, Duration::from_secs(30)).expect(&ctx),
                        "{ctx}: not flushed"
                    );
                    assert!(log.durable_offset() >= end && log.written_offset() >= end, "{ctx}");
                    cov.waited_durable += 1;
                }
            }
            55..=76 | 94..=96 => check_all(&log, &model, &ctx),
            _ => {
                let end = log.end_offset();
                let durable = log.durable_offset();
                cov.owner_writes += log.stats().owner_writes;
                let crash = log.abandon();
                let (synced, written) = (crash.synced, crash.written);
                assert!(
                    durable <= written && synced <= written && written <= end,
                    "{ctx}: {crash:?} {durable:?}"
                );
                // What the process crash lost: everything not in the files.
                let mut lost: std::collections::BTreeSet<Offset> =
                    model.range(written..).map(|(o, _)| *o).collect();
                model.retain(|o, _| *o < written);
                cov.staged_records_lost += lost.len() as u64;
                let (path, base) = last_segment(&dir);
                let floor = SEGMENT_HEADER_LEN_BYTES as u64 + synced.0.max(base) - base;
                let data_end = SEGMENT_HEADER_LEN_BYTES as u64 + written.0.max(base) - base;
                let mut cut: Option<u64> = None;
                if floor < data_end {
                    match rng.below(4) {
                        0 => {}
                        1 => {
                            let p = floor + rng.below(data_end - floor + 1);
                            OpenOptions::new().write(true).open(&path).unwrap().set_len(p).unwrap();
                            cut = Some(p);
                        }
                        2 => {
                            let p = floor + rng.below(data_end - floor + 1);
                            let mut bytes = fs::read(&path).unwrap();
                            let stop = (data_end as usize + 64).min(bytes.len());
                            bytes[p as usize..stop].fill(0);
                            fs::write(&path, &bytes).unwrap();
                            cut = Some(p);
                        }
                        _ => {
                            if let Some((&o, r)) = model.iter().next_back() {
                                let start = SEGMENT_HEADER_LEN_BYTES as u64 + o.0.saturating_sub(base);
                                if o.0 >= base && start >= floor {
                                    let fe = frame_end(o.0, base, r.payload.len());
                                    let at = start + rng.below(fe - start);
                                    let mut bytes = fs::read(&path).unwrap();
                                    bytes[at as usize] ^= 1 << rng.below(8);
                                    fs::write(&path, &bytes).unwrap();
                                    cut = Some(start);
                                }
                            }
                        }
                    }
                }
                log = Log::open(&dir, config(policy)).unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
                cov.crashes += 1;
                if trace {
                    eprintln!(
                        "crash: synced {synced:?} written {written:?} end {end:?} cut {cut:?} base {base} {:?}",
                        log.recovery()
                    );
                }
                if let Some(p) = cut {
                    cov.damaged_crashes += 1;
                    let kept = |o: &Offset, r: &Rec| o.0 < base || frame_end(o.0, base, r.payload.len()) <= p;
                    let damaged: Vec<Offset> =
                        model.iter().filter(|(o, r)| !kept(o, r)).map(|(o, _)| *o).collect();
                    model.retain(|o, r| kept(o, r));
                    cov.records_lost_to_damage += damaged.len() as u64;
                    lost.extend(damaged);
                    cov.torn_tails_reported += log.recovery().torn_tail.is_some() as u64;
                    let torn = log.recovery().torn_tail.is_some();
                    let expected_end = model.iter().next_back().map_or(Offset(0), |(o, r)| {
                        Offset(o.0 + (8 + r.payload.len()).next_multiple_of(8) as u64)
                    });
                    if torn {
                        assert!(log.end_offset() <= written, "{ctx}");
                    }
                    assert!(log.end_offset() >= expected_end.min(written), "{ctx}: end after cut");
                } else {
                    assert_eq!(
                        log.end_offset(),
                        written,
                        "{ctx}: a crash alone loses only what was not written"
                    );
                    assert!(log.recovery().torn_tail.is_none(), "{ctx}: no damage, no torn tail");
                }
                assert!(log.durable_offset() >= log.end_offset(), "{ctx}: recovered data is flushed");
                // Re-ack what the model had acked and is still stored.
                let acked: Vec<Offset> = model.iter().filter(|(_, r)| r.acked).map(|(o, _)| *o).collect();
                for o in acked {
                    match log.read(o) {
                        Ok(_) if model[&o].moved_to.is_some_and(|n| lost.contains(&n)) => {
                            // Compaction's copy was lost with the tail: the old copy, still
                            // stored, is the record again.
                            let r = model.get_mut(&o).unwrap();
                            r.acked = false;
                            r.moved_to = None;
                            cov.moved_records_restored_after_crash += 1;
                        }
                        Ok(p) => {
                            assert_eq!(
                                p,
                                &model[&o].payload[..],
                                "{ctx}: acked record {o:?} came back changed"
                            );
                            assert!(log.ack(o).expect(&ctx), "{ctx}");
                            cov.acked_records_back_after_crash += 1;
                        }
                        Err(Error::NoRecord { .. }) => {
                            model.remove(&o);
                        }
                        Err(e) => panic!("{ctx}: {e}"),
                    }
                }
                check_all(&log, &model, &ctx);
            }
        }
        // Acked records are kept in the model even when their segment is gone from the log:
        // until the sync thread has unlinked the file (and synced the directory), a crash can
        // bring them back. They are forgotten only when a reopen does not find them.
    }
    check_all(&log, &model, &format!("seed {seed} end"));
    cov.owner_writes += log.stats().owner_writes;
    log.close().unwrap();
    let log = Log::open(&dir, config(policy)).unwrap();
    // After a clean close and reopen every stored record is live again; the unacked ones are there.
    for (o, r) in model.iter().filter(|(_, r)| !r.acked) {
        assert_eq!(log.read(*o).unwrap(), &r.payload[..], "seed {seed}: after close {o:?}");
    }
}

/// Operations per seed: many short runs find more than few long ones (every run starts empty,
/// and a log this small fills its budget within a few hundred appends).
const OPS_DEFAULT: usize = 200;
const SEEDS_DEFAULT: u64 = 2000;

#[test]
fn random_operations_against_a_model() {
    let ops: usize = std::env::var("STORAGE_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(OPS_DEFAULT);
    if let Ok(seed) = std::env::var("STORAGE_SEED") {
        run(seed.parse().expect("STORAGE_SEED is a number"), ops, &mut Coverage::default());
        return;
    }
    let seeds: u64 =
        std::env::var("STORAGE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS_DEFAULT);
    let started = std::time::Instant::now();
    let mut cov = Coverage::default();
    for seed in 0..seeds {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed, ops, &mut cov)));
        if let Err(panic) = result {
            eprintln!("model test failed with seed {seed}; rerun with STORAGE_SEED={seed} STORAGE_OPS={ops}");
            std::panic::resume_unwind(panic);
        }
    }
    eprintln!("{seeds} seeds x {ops} operations in {:?}: {cov:?}", started.elapsed());
    if seeds >= 48 {
        assert!(
            cov.damaged_crashes > 20 && cov.records_lost_to_damage > 0 && cov.torn_tails_reported > 0,
            "{cov:?}"
        );
        assert!(cov.records_moved > 0 && cov.budget_refusals > 0 && cov.too_large > 0, "{cov:?}");
        assert!(cov.acked_records_back_after_crash > 0, "{cov:?}");
        assert!(cov.staged_records_lost > 0 && cov.staged_reads > 0 && cov.waited_durable > 0, "{cov:?}");
        assert!(cov.owner_writes > 0 && cov.commits > 0, "{cov:?}");
    }
}
