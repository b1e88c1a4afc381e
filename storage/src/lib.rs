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
//! mutating call takes `&mut self`. Each `Log` starts two background threads, its *sync threads*
//! (`sync.rs`), which is where the log's bytes reach the files and the disk: the writer does the
//! `pwrite`s; the flusher does `fdatasync`, file deletion, directory `fsync` and spare segments,
//! so that a write never waits behind a flush. "The sync thread" below means whichever of the two
//! does the work named. The shard never waits for them:
//! - an append frames the record into an in-memory staging buffer ([`Config::write_buffer_bytes`],
//!   64 KiB): a copy, no system call, no page fault of the segment;
//! - [`Log::commit`] (the owner calls it at the end of each loop turn that appended, and the log
//!   itself when the buffer is full and before a roll) hands the buffer to the sync thread
//!   through a bounded queue ([`Config::write_queue_batches`]) and unparks it (a futex wake only
//!   when it is parked);
//! - the writer writes each batch with one `pwrite` at its place in the preallocated segment
//!   and publishes the written end (waking the owner if it asked: [`Log::notify_when_written`]);
//!   the flusher flushes what was written with `fdatasync` per the
//!   policy (group commit: all batches that arrived while the previous flush ran share the next
//!   one), publishes the durable end and calls [`Config::on_durable`];
//! - the shard reads [`Log::durable_offset`] (one atomic load) and acknowledges the records below it.
//!
//! When the queue is full (the disk is slower than the appends), the owner writes itself: it
//! writes the queued batches and its own, in order, on its thread (a `pwrite` each, never an
//! `fdatasync`), counted in [`LogStats::owner_writes`]. Memory stays bounded and the shard slows
//! to the speed of the page cache rather than stalling on a flush.
//!
//! Reads ([`Log::read`], [`Log::iter_from`]) return every appended record: written ones from a
//! read-only shared mapping of the segment (which shows what `pwrite` put in the page cache),
//! the others from the staging buffer or the batch that holds them, which the log keeps until the
//! sync thread has marked it written.
//!
//! Segment rolls: the next segment is prepared ahead by the sync thread (a preallocated
//! `spare.tmp` with a synced placeholder header), so a roll on the owner's thread is a `rename`
//! and an `mmap`; the real header is the new segment's first batch, written by the sync thread in
//! order after the old segment's last bytes (so a crash never leaves a gap between segments),
//! and made durable, with the name, before any record in the segment is called durable and
//! before any segment is deleted. Only when the spare is missing (the budget had no room for it, or preparing it
//! failed) does a roll create the file on the owner's thread. Recovery ([`Log::open`]) blocks,
//! and is meant to run before the shard's loop.
//!
//! Page faults and fsync: the owner never writes through a mapping, so appends take no page
//! fault (the page-cache allocation, dirty-page throttling and waits on pages under writeback
//! happen inside the sync thread's `pwrite`), and it never calls `fdatasync`. What remains on the
//! owner's thread: the copy into the staging buffer, a roll's `rename` and `mmap` (once per
//! segment), a `pwrite` per batch when the queue is full, and read faults when it reads a written record through the mapping
//! (minor faults on pages still in the page cache). `BENCH.md` measures the stalls.

//! # Crashes and recovery
//! - A process crash (`kill -9`) loses what was not written to the files yet: the staging buffer
//!   and the batches still queued for the sync thread. Nothing durable under any policy is among
//!   them (durable implies written). The page cache keeps what was written, and [`Log::open`]
//!   flushes what it recovers before it reports it durable.
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
//! Records are opaque bytes. Every record's payload starts at an 8-byte aligned file position
//! (and so address of the mapping and of the staging buffer), so a caller that encodes with rkyv can access an archived value in place, without a
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
//! - `segment.rs`: one segment file, its writes and its read-only mapping (all of the crate's
//!   `unsafe`).
//! - `stage.rs`: the staging buffer, committed batches, and reads of records not yet written.
//! - `sync.rs`: the sync thread: writes, flushes, the durable offset and deferred deletion.
//! - `log.rs`: the log: directory, recovery, append, read, iterate, ack, compaction, budget.
//! - `error.rs`: the crate's one error enum.

mod error;
mod format;
mod log;
mod segment;
mod stage;
mod sync;

pub use error::{Error, Result};
pub use format::{FORMAT_VERSION, RECORD_ALIGN_BYTES, SEGMENT_HEADER_LEN_BYTES};
pub use log::{
    Abandoned, CompactStats, Iter, Log, LogStats, Record, RecordLocation, RecoveryReport, TornTail,
};

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
    /// Every commit wakes the sync thread, which writes the batch and then flushes; records are
    /// durable after the flush that follows their write. Batches that arrive during a flush share
    /// the next one (group commit).
    Always,
    /// The sync thread writes each committed batch when it arrives and flushes what was written
    /// every interval. Records are durable (and may be acknowledged) after the first flush that
    /// follows their write, so at most about one interval after their commit.
    Interval(Duration),
    /// Never flush, except on [`Log::sync`], [`Log::close`] and before a segment is deleted.
    /// [`Log::durable_offset`] then reports everything *written* to the segment files: a record
    /// becomes durable once it is committed and the sync thread (or the owner, when the queue is
    /// full) has written it, without any further append. A process crash keeps it (the page
    /// cache survives that); the policy accepts that a power loss loses what the kernel had not
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

/// Called with the new durable end of the log after each flush (under `Never`: each write) that
/// advanced it. It runs on the sync thread (or on the owner's, when the owner flushed in
/// [`Log::sync`] or wrote because the queue was full): it should only wake the owner (e.g. a
/// cross-thread waker).
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
    /// The size of the staging buffer appends are framed into; a full buffer is committed (one
    /// `pwrite`). Default 64 KiB (`BENCH.md`: batched 64 KiB writes beat the mapping); at least
    /// 4 KiB. A record larger than the buffer is staged alone.
    pub write_buffer_bytes: usize,
    /// How many committed buffers may wait for the writer thread; when full, the owner writes them
    /// itself. Default 32 (2 MiB with the default buffer; most batches are far smaller than the
    /// buffer, which is recycled); at least 1. The log holds at most this many plus two buffers
    /// (plus the one being filled). With 8, a 2-core machine shared with the load generator
    /// overflowed it 7-284 times per `perf/persist.sh` run (the writer not scheduled in time);
    /// with 32, 0-6 times.
    pub write_queue_batches: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            segment_size_bytes: 64 * 1024 * 1024,
            disk_budget_bytes: u64::MAX,
            fsync: FsyncPolicy::Interval(Duration::from_millis(5)),
            record_len_max_bytes: 1024 * 1024,
            on_durable: None,
            write_buffer_bytes: 64 * 1024,
            write_queue_batches: 32,
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
            .field("write_buffer_bytes", &self.write_buffer_bytes)
            .field("write_queue_batches", &self.write_queue_batches)
            .finish()
    }
}
