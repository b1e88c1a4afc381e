//! `shardmq-storage`: a per-shard segmented append-only log, and nothing else.
//!
//! This crate knows nothing of MQTT. It stores opaque byte records in segment files, tells its
//! owner which records are durable under the fsync policy in force, frees segments whose every
//! record is consumed, compacts mostly-dead segments, keeps the directory within a disk budget and
//! recovers after a crash. The broker's inbox and retained store are meant to be built on top of it:
//! they encode their records (rkyv, per DESIGN.md), keep their own in-memory indexes keyed by
//! [`Offset`], and rebuild those indexes on start-up by iterating the log.
//!
//! # Owner and threads
//! A [`Log`] is owned by one shard (its home shard) and used only from that shard's thread: every
//! mutating call takes `&mut self`. Each `Log` starts one background thread, its *sync thread*,
//! which is the only place where `msync`, file deletion and directory `fsync` happen. The shard
//! never waits for it:
//! - an append writes into the mapped segment and publishes the new end of the log through an
//!   atomic (`written`); under [`FsyncPolicy::Always`] it also unparks the sync thread (a futex
//!   wake only when that thread is parked);
//! - the sync thread flushes everything written since its last flush in one `msync` per segment
//!   (group commit: all appends that arrived while the previous flush ran share the next one), then
//!   publishes the durable end through another atomic and calls [`Config::on_durable`];
//! - the shard reads [`Log::durable_offset`] (one atomic load) and acknowledges the records below it.
//!
//! Segment rolls: the next segment is prepared ahead by the sync thread (a preallocated
//! `spare.tmp` with a synced placeholder header), so a roll on the owner's thread is a 64-byte
//! `pwrite`, a `rename` and an `mmap`, with no `fsync`; the sync thread makes the new header and
//! name durable before it calls any record in the segment durable. Only when the spare is missing
//! (the budget had no room for it, or preparing it failed) does a roll create the file on the
//! owner's thread. Recovery ([`Log::open`]) blocks, and is meant to run before the shard's loop.
//!
//! Page faults: segments are preallocated with `posix_fallocate` and written through a shared
//! mapping, so a write touches page cache only (never a read from disk, never a SIGBUS on a full
//! disk). What is *not* off the owner's thread: the first write to each page faults (page-cache
//! allocation), and the kernel may make that fault wait (dirty-page throttling, a page under
//! writeback). `BENCH.md` measures the resulting stalls (p99.99 tens of µs, worst case several
//! ms). [`Config::prefault_window_bytes`] lets the sync thread write-fault pages ahead of the
//! owner (`MADV_POPULATE_WRITE`); it is off by default because it made the worst case worse.
//!
//! # Crashes and recovery
//! - A process crash (`kill -9`) loses nothing appended: the page cache keeps it, and
//!   [`Log::open`] flushes what it recovers before it reports it durable.
//! - A power loss keeps every record below the durable offset under `Always` and `Interval`.
//!   Under `Never` the policy accepts losing what the kernel had not written back.
//! - On open every record's crc32c is checked. Only the last segment may end in a torn write (a
//!   bad record, or stray bytes, with no valid record after them): it is cut there, zeroed, and
//!   reported in [`RecoveryReport::torn_tail`]. Anything else (a bad record followed by valid
//!   ones, damage in an earlier segment, a bad header, an unknown format version, two consecutive
//!   segments that do not join) is an [`Error`] naming the file, and the log does not open.
//! - Limits: a whole segment file removed by hand between two surviving ones is not detected
//!   (there is no manifest; ids are allowed to skip because consumed segments are deleted). After
//!   a power loss under `Never`, an earlier segment with lost pages makes open fail rather than
//!   lose records silently. A crash inside compaction can leave a record at both its old and new
//!   offset (see [`Log::compact`]).

//! # Record encoding
//! Records are opaque bytes. Every record's payload starts at an 8-byte aligned address of the
//! mapping, so a caller that encodes with rkyv can access an archived value in place, without a
//! copy. The typed layer is left to the callers (the inbox and retain stores): this crate takes
//! no dependency on their schema.
//!
//! # Consumption across restarts
//! Consumption ([`Log::ack`]) is kept in memory only. After a restart every surviving record is
//! live again, and the owner re-acks what it knows to be consumed while it rebuilds its index
//! (DESIGN.md: acknowledgements are records of the owner's own log). A segment is deleted only
//! when every record in it is acked, so an owner must not ack an acknowledgement record before
//! the records it refers to are gone, or those could come back after a crash.
//!
//! # Files
//! - `format.rs`: the on-disk format (segment header, record frame, checksums) and the scan of one
//!   segment's bytes. Pure functions over byte slices.
//! - `segment.rs`: one segment file and its mapping (all of the crate's `unsafe`).
//! - `sync.rs`: the sync thread, the durable offset and deferred deletion.
//! - `log.rs`: the log: directory, recovery, append, read, iterate, ack, compaction, budget.
//! - `error.rs`: the crate's one error enum.

mod error;
mod format;
mod log;
mod segment;
mod sync;

pub use error::{Error, Result};
pub use format::{FORMAT_VERSION, RECORD_ALIGN_BYTES, SEGMENT_HEADER_LEN_BYTES};
pub use log::{CompactStats, Iter, Log, LogStats, Record, RecordLocation, RecoveryReport, TornTail};

/// Entry points for the fuzz target in `storage/fuzz`, over the log reader's pure functions. Not
/// part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::format;

    /// What a scan of one segment's bytes found.
    #[derive(Debug)]
    pub struct ScanOutcome {
        /// File positions of the valid records, in order.
        pub records: Vec<u32>,
        /// Where the valid records end.
        pub end: usize,
        /// Whether the tail would be truncated (torn) or refused (corrupt).
        pub torn: bool,
        pub corrupt: bool,
    }

    /// Scans `data` as a whole segment file (header included), as recovery does.
    pub fn scan_segment(data: &[u8], last: bool, record_len_max: usize) -> ScanOutcome {
        let scan = format::scan(data, last, record_len_max);
        ScanOutcome {
            torn: matches!(scan.tail, format::Tail::Torn { .. }),
            corrupt: matches!(scan.tail, format::Tail::Corrupt { .. }),
            records: scan.records,
            end: scan.end,
        }
    }

    /// Whether the record frame at `at` is valid, and its payload length.
    pub fn valid_frame(data: &[u8], at: usize) -> Option<usize> {
        match format::check_frame(data, at) {
            format::Frame::Valid { payload_len } => Some(payload_len),
            _ => None,
        }
    }

    /// Decodes a segment header: `Some((id, base))` if valid.
    pub fn decode_header(data: &[u8]) -> Option<(u64, u64)> {
        format::decode_header(data).ok().map(|h| (h.id.0, h.base.0))
    }
}

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A position in one log: the byte distance of a record's frame from the start of the log's first
/// ever segment, counting only frames (segment headers are not counted).
///
/// Offsets are dense and strictly increasing in append order, never reused, and survive a restart
/// unchanged. Compaction moves records to new offsets (see [`Log::compact`]). `Offset(n)` is
/// meaningful only for the log that returned it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);

impl fmt::Debug for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Offset({})", self.0)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The number of a segment file within one log: assigned in creation order from 1, never reused.
/// The file of segment `n` is `{n:020}.seg` in the log's directory.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SegmentId(pub u64);

impl fmt::Debug for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SegmentId({})", self.0)
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// When appended records become durable, and so when the owner may acknowledge them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every append wakes the sync thread; records are durable after the flush that follows them.
    /// Appends that arrive during a flush share the next one (group commit).
    Always,
    /// The sync thread flushes what was written every interval. Records are durable (and may be
    /// acknowledged) after the first flush that follows them, so at most one interval later.
    Interval(Duration),
    /// Never flush, except on [`Log::sync`], [`Log::close`] and before a segment is deleted.
    /// [`Log::durable_offset`] then reports everything appended: the policy accepts that a power
    /// loss (not a process crash: the page cache survives that) loses what the kernel had not
    /// written back.
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = Error;

    /// Parses the broker's flag syntax: `always`, `never` or `interval:<ms>` (ms > 0).
    fn from_str(s: &str) -> Result<FsyncPolicy> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => match s.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(FsyncPolicy::Interval(Duration::from_millis(ms))),
                _ => Err(Error::Config(format!("fsync policy {s:?} is not always, never or interval:<ms>"))),
            },
        }
    }
}

/// Called by the sync thread, with the new durable end of the log, after each flush that advanced
/// it. It runs on the sync thread: it should only wake the owner (e.g. a cross-thread waker).
pub type DurableNotify = Arc<dyn Fn(Offset) + Send + Sync>;

/// A log's configuration. Fields are public; [`Config::default`] gives the documented defaults.
#[derive(Clone)]
pub struct Config {
    /// The size of each new segment file (preallocated). Default 64 MiB; at least 4 KiB and at
    /// most 4 GiB - 1. Changing it between runs is allowed: existing segments keep their size.
    pub segment_size_bytes: u64,
    /// The most bytes of segment files the log may hold (counted as whole preallocated files).
    /// An append that would need a new segment beyond it fails with [`Error::DiskBudgetExceeded`].
    /// Default: unlimited. Must allow at least one segment.
    pub disk_budget_bytes: u64,
    /// The durability policy. Default `Interval(5 ms)`.
    pub fsync: FsyncPolicy,
    /// The largest payload accepted by [`Log::append`]. Default 1 MiB; at most what fits in one
    /// segment. Recovery also uses it to tell a torn tail from corruption followed by valid
    /// records, so lowering it across restarts weakens that check (it never loses data).
    pub record_len_max_bytes: u32,
    /// Optional wake-up for the owner when the durable offset advances.
    pub on_durable: Option<DurableNotify>,
    /// How far ahead of the owner's writes the sync thread write-faults the active segment's
    /// pages (`MADV_POPULATE_WRITE`); 0 turns it off. Default 0 (off): measured, it halves the
    /// 99.9th and 99.99th percentile append under `Never` but made the longest append worse
    /// (`BENCH.md`), so it stays off until that is understood.
    pub prefault_window_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            segment_size_bytes: 64 * 1024 * 1024,
            disk_budget_bytes: u64::MAX,
            fsync: FsyncPolicy::Interval(Duration::from_millis(5)),
            record_len_max_bytes: 1024 * 1024,
            on_durable: None,
            prefault_window_bytes: 0,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("segment_size_bytes", &self.segment_size_bytes)
            .field("disk_budget_bytes", &self.disk_budget_bytes)
            .field("fsync", &self.fsync)
            .field("record_len_max_bytes", &self.record_len_max_bytes)
            .field("on_durable", &self.on_durable.as_ref().map(|_| "Fn(Offset)"))
            .field("prefault_window_bytes", &self.prefault_window_bytes)
            .finish()
    }
}
