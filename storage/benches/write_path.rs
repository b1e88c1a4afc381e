//! Issue 4's open question: which write path is the faster one: a shared mmap of preallocated
//! segments, `pwrite` from a user-space buffer, or io_uring writes? The log now writes with
//! batched `pwrite` from its sync thread (the answer of the first runs); this bench keeps the mmap
//! write path (`mmap_raw_*`) as the baseline of every run. Figures and the command lines are in
//! `storage/BENCH.md` ("mmap against pwrite and io_uring (issue 4)" and the sections after it).
//!
//! Every variant writes the log's own format: 64 MiB preallocated (`posix_fallocate`) segment files
//! named `{id:020}.seg`, each with a valid 64-byte segment header, then records framed as
//! `[len u32 LE][crc32c(len, payload) u32 LE][payload][zeros to a multiple of 8]`. The
//! `verify_formats` check at start-up proves it: `Log::open` recovers what the hand-written
//! appenders wrote, record for record.
//!
//! Benchmarks (`write_path/<size>/<variant>`, one iteration is one append, throughput in
//! records/s; each sample appends to a fresh directory, so segment rolls are included):
//! - `frame_only`: framing and checksum into a reused `Vec`, memory only: the floor.
//! - `log_never`, `log_interval_5ms`: the real [`Log::append`] (64 KiB staging buffer, written by
//!   the log's sync thread) under `Never` and `Interval(5 ms)`; each sample ends with
//!   [`Log::commit`] and waits (polling `durable_offset`) until the last record is durable, which
//!   under `Never` means written to the file.
//! - `log_never_commit_per_16`: `log_never` plus a [`Log::commit`] after every 16 appends, as a
//!   shard commits at the end of a loop turn that appended a few messages.
//! - `mmap_raw_never`, `mmap_raw_interval_5ms`, `mmap_raw_msync_per_1000`: the mmap write path
//!   (the log's own until this change) without the log around it: frames copied into a shared
//!   mapping of a preallocated segment, none of `Log::append`'s bookkeeping; `msync` on an
//!   interval sync thread, or on the appending thread after every 1000 appends.
//! - `log_sync_per_1000`: `Log` under `Never` plus `Log::sync` (commit, write, `fdatasync` on the
//!   caller's thread) after every 1000 appends and at the end: synchronous group commit.
//! - `pwrite_1frame_never`: one `pwrite` per record.
//! - `pwrite_64KiB_never`: records framed into a 64 KiB user-space buffer, one `pwrite` per full
//!   buffer (and at the end of the sample, so every record counted is in the page cache);
//!   `pwrite_4KiB_never` and `pwrite_16KiB_never` the same with smaller buffers (how much
//!   batching it takes to beat the mapping).
//! - `pwrite_1frame_fdatasync_per_1000`, `pwrite_64KiB_fdatasync_per_1000`: the same plus one
//!   `fdatasync` on the caller's thread after every 1000 appends and at the end.
//! - `pwrite_64KiB_interval_5ms`: the 64 KiB buffer plus a sync thread that `fdatasync`s every 5 ms
//!   what was written (as the log's own sync thread does with `msync`); the sample waits until
//!   the last record is durable.
//! - `uring_64KiB_never`: the 64 KiB buffers submitted as io_uring writes, at most 4 in flight (a
//!   pool of 5 buffers); completions are reaped when a buffer is needed and at the end.
//! - `uring_64KiB_fdatasync_per_1000`: the same plus, after every 1000 appends, the partial
//!   buffer and an `IORING_OP_FSYNC` (`DATASYNC`, `IOSQE_IO_DRAIN`) submitted without waiting (at
//!   most 8 operations in flight): asynchronous group commit; the sample waits for the last one.
//!
//! The hand-written appenders create each next segment on the appending thread when the current
//! one is full (open, `posix_fallocate`, header; under the durable variants also `fsync` of the
//! file and the directory), while `Log` has its sync thread prepare a spare ahead: one of each per
//! 64 MiB, a small cost either way.
//!
//! Before each benchmark (and each latency series and each `group_commit` run) the bench calls
//! `sync(2)` and sleeps 0.3 s, so that a variant pays less for the dirty pages and journal commits
//! of the one before it. It is not enough for the durable variants: after the non-durable ones
//! have pushed gigabytes at the virtual disk, its flushes stay slow for a while, so the criterion
//! figures of the durable variants depend on their place in the order (see `group_commit`).
//!
//! Also printed before the criterion groups (only under `cargo bench`):
//! - `append_latency`: the distribution of the time of one append call (p50 / p99 / p99.9 /
//!   p99.99 / max) over a fixed number of appends, for the variants where one call is meaningful.
//! - `group_commit`: the durable variants interleaved round by round (see `group_commit_report`),
//!   because the disk's flush time drifts too much for the criterion groups, which run one
//!   variant after the other, to compare them: this is the figure to compare durable variants by.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use io_uring::{opcode, squeue, types, IoUring};
use shardmq_storage::{Config, FsyncPolicy, Log, SEGMENT_HEADER_LEN_BYTES};

const SEGMENT_BYTES: u64 = 64 << 20;
const BATCH_BYTES: usize = 64 << 10;
const GROUP_RECORDS: u64 = 1000;
const INTERVAL: Duration = Duration::from_millis(5);
const URING_BUFFERS_IN_FLIGHT: usize = 4;
const URING_OPS_IN_FLIGHT: usize = 8;
/// The `user_data` of an fsync operation (buffers use their index).
const FSYNC_TAG: u64 = u64::MAX;

/// Whether this is `cargo bench` (criterion passes `--bench`) rather than `cargo test
/// --all-targets`, which runs each benchmark once as a smoke test.
fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Before each benchmark and each latency series (under `cargo bench` only): writes back what the
/// previous one left dirty and lets the journal settle, so that no variant pays for the one before
/// it (measured: without it the first 1 KiB series ran at a third of its rate after the 64-byte
/// `fdatasync` series).
fn settle() {
    if measuring() {
        // SAFETY: `sync` takes no arguments and cannot fail.
        unsafe { libc::sync() };
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn log_config(policy: FsyncPolicy) -> Config {
    Config {
        fsync: policy,
        record_len_max_bytes: 4096,
        segment_size_bytes: SEGMENT_BYTES,
        ..Config::default()
    }
}

/// The bytes a record takes in a segment (the log's `format::frame_len`).
fn frame_len(payload_len: usize) -> usize {
    (8 + payload_len).next_multiple_of(8)
}

/// Appends one record's frame, exactly as the log lays it out, to `buf`.
fn encode_frame(buf: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), payload);
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(payload);
    let pad = frame_len(payload.len()) - 8 - payload.len();
    buf.extend_from_slice(&[0u8; 8][..pad]);
}

/// A segment header as the log writes it (`format::encode_header`): magic, format version 1,
/// header length, id, base offset, crc32c of bytes 0..32.
fn segment_header(id: u64, base: u64) -> [u8; SEGMENT_HEADER_LEN_BYTES] {
    let mut b = [0u8; SEGMENT_HEADER_LEN_BYTES];
    b[0..8].copy_from_slice(b"SHMQSEG\0");
    b[8..12].copy_from_slice(&shardmq_storage::FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN_BYTES as u32).to_le_bytes());
    b[16..24].copy_from_slice(&id.to_le_bytes());
    b[24..32].copy_from_slice(&base.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The segment files of a hand-written appender: creates each next one, preallocated.
struct Segments {
    dir: PathBuf,
    segment_bytes: u64,
    next_id: u64,
    /// Whether creation makes the file and its name durable (the durable variants).
    durable: bool,
}

impl Segments {
    fn new(dir: &Path, segment_bytes: u64, durable: bool) -> Segments {
        Segments { dir: dir.to_path_buf(), segment_bytes, next_id: 1, durable }
    }

    /// Creates the next segment, whose first record has log offset `base`.
    fn create(&mut self, base: u64) -> File {
        let id = self.next_id;
        self.next_id += 1;
        let path = self.dir.join(format!("{id:020}.seg"));
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("create segment");
        let len = libc::off_t::try_from(self.segment_bytes).expect("segment size fits off_t");
        // SAFETY: `posix_fallocate` only reads its integer arguments; the descriptor is open and
        // owned by `file` for the duration of the call.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        assert_eq!(rc, 0, "posix_fallocate of {}", path.display());
        file.write_all_at(&segment_header(id, base), 0).expect("write header");
        if self.durable {
            file.sync_all().expect("fsync segment");
            File::open(&self.dir).and_then(|d| d.sync_all()).expect("fsync directory");
        }
        file
    }
}

/// Something an interval sync thread makes durable: a file (`fdatasync`) or a mapping (`msync`).
trait Flush: Send + Sync {
    fn flush_to_disk(&self);
}

impl Flush for File {
    fn flush_to_disk(&self) {
        self.sync_data().expect("fdatasync");
    }
}

impl Flush for memmap2::MmapRaw {
    fn flush_to_disk(&self) {
        self.flush().expect("msync");
    }
}

/// What a hand-written appender shares with its interval sync thread.
struct IntervalShared {
    /// The end (log offset) of what was handed to the kernel.
    written: AtomicU64,
    /// The end of what the sync thread has flushed.
    durable: AtomicU64,
    /// The segments that may hold unflushed bytes, oldest first (the last one is active).
    segments: Mutex<Vec<Arc<dyn Flush>>>,
    stop: AtomicBool,
}

/// A sync thread that flushes, every `INTERVAL`, what its appender published as written (as the
/// log's own sync thread does under `FsyncPolicy::Interval`).
struct IntervalSyncer {
    shared: Arc<IntervalShared>,
    thread: Option<JoinHandle<()>>,
}

impl IntervalSyncer {
    fn start(first: Arc<dyn Flush>) -> IntervalSyncer {
        let shared = Arc::new(IntervalShared {
            written: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            segments: Mutex::new(vec![first]),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        IntervalSyncer { shared, thread: Some(std::thread::spawn(move || Self::run(&s))) }
    }

    fn run(shared: &IntervalShared) {
        let mut next_tick = Instant::now() + INTERVAL;
        while !shared.stop.load(Ordering::Acquire) {
            std::thread::sleep(next_tick.saturating_duration_since(Instant::now()));
            next_tick = Instant::now() + INTERVAL;
            let written = shared.written.load(Ordering::Acquire);
            if written <= shared.durable.load(Ordering::Relaxed) {
                continue;
            }
            let segments = shared.segments.lock().expect("lock").clone();
            for seg in &segments {
                seg.flush_to_disk();
            }
            // Every segment but the last of the snapshot was finished before the snapshot was
            // taken (the appender adds the next one only after its last write to the previous
            // one), so the flush above covered it for good.
            shared.segments.lock().expect("lock").drain(..segments.len() - 1);
            shared.durable.store(written, Ordering::Release);
        }
    }

    /// The appender's records below `end` are in the page cache.
    fn written(&self, end: u64) {
        self.shared.written.store(end, Ordering::Release);
    }

    /// The appender moved on to a new segment (after its last write to the previous one).
    fn add(&self, segment: Arc<dyn Flush>) {
        self.shared.segments.lock().expect("lock").push(segment);
    }

    /// Waits (yielding: on one core the sync thread must run) until `end` is durable.
    fn wait_durable(&self, end: u64) {
        while self.shared.durable.load(Ordering::Acquire) < end {
            std::thread::yield_now();
        }
    }
}

impl Drop for IntervalSyncer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("sync thread");
        }
    }
}

/// When a hand-written appender makes its records durable.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Durability {
    Never,
    /// `fdatasync` on the appending thread after every `GROUP_RECORDS` appends.
    PerGroup,
    /// A sync thread `fdatasync`s every `INTERVAL`.
    Interval,
}

/// The `pwrite` alternative: frames into a user-space buffer, one `pwrite` per `batch_bytes`
/// (0: one per record).
struct PwriteLog {
    segments: Segments,
    file: Arc<File>,
    /// File position where `buf` goes.
    buf_at: u64,
    buf: Vec<u8>,
    batch_bytes: usize,
    /// Log offset of the active segment's first record.
    base: u64,
    /// The end of the log (records in `buf` included).
    end: u64,
    durability: Durability,
    appended: u64,
    interval: Option<IntervalSyncer>,
}

impl PwriteLog {
    fn open(dir: &Path, segment_bytes: u64, batch_bytes: usize, durability: Durability) -> PwriteLog {
        let mut segments = Segments::new(dir, segment_bytes, durability != Durability::Never);
        let file = Arc::new(segments.create(0));
        let interval = (durability == Durability::Interval).then(|| IntervalSyncer::start(file.clone()));
        PwriteLog {
            segments,
            file,
            buf_at: SEGMENT_HEADER_LEN_BYTES as u64,
            buf: Vec::with_capacity(batch_bytes.max(8192)),
            batch_bytes,
            base: 0,
            end: 0,
            durability,
            appended: 0,
            interval,
        }
    }

    fn append(&mut self, payload: &[u8]) {
        let frame = frame_len(payload.len());
        let at = SEGMENT_HEADER_LEN_BYTES as u64 + (self.end - self.base);
        if at + frame as u64 > self.segments.segment_bytes {
            self.roll();
        } else if self.buf.len() + frame > self.batch_bytes && !self.buf.is_empty() {
            self.write_buf();
        }
        encode_frame(&mut self.buf, payload);
        self.end += frame as u64;
        if self.buf.len() >= self.batch_bytes {
            self.write_buf();
        }
        self.appended += 1;
        if self.durability == Durability::PerGroup && self.appended % GROUP_RECORDS == 0 {
            self.sync();
        }
    }

    /// Hands the buffer to the kernel: one `pwrite`.
    fn write_buf(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        self.file.write_all_at(&self.buf, self.buf_at).expect("pwrite");
        self.buf_at += self.buf.len() as u64;
        self.buf.clear();
        if let Some(syncer) = &self.interval {
            syncer.written(self.end);
        }
    }

    fn roll(&mut self) {
        self.write_buf();
        if self.durability == Durability::PerGroup {
            self.file.sync_data().expect("fdatasync");
        }
        self.base = self.end;
        self.file = Arc::new(self.segments.create(self.base));
        self.buf_at = SEGMENT_HEADER_LEN_BYTES as u64;
        if let Some(syncer) = &self.interval {
            syncer.add(self.file.clone());
        }
    }

    /// Everything appended is in the page cache and, unless `Never`, durable.
    fn finish(&mut self) {
        self.write_buf();
        match self.durability {
            Durability::Never => {}
            Durability::PerGroup => self.sync(),
            Durability::Interval => self.interval.as_ref().expect("interval thread").wait_durable(self.end),
        }
    }

    fn sync(&mut self) {
        self.write_buf();
        self.file.sync_data().expect("fdatasync");
    }
}

/// The io_uring alternative: 64 KiB buffers submitted as writes, a bounded number in flight.
struct UringLog {
    ring: IoUring,
    segments: Segments,
    /// The active segment, then the earlier ones (kept open while writes to them may be in flight).
    file: File,
    old_files: Vec<File>,
    /// Buffers of `BATCH_BYTES` capacity; a buffer is not touched between its submission and the
    /// reaping of its completion (it is on neither `free` nor `cur` then).
    bufs: Vec<Vec<u8>>,
    free: Vec<usize>,
    cur: usize,
    /// File position where `bufs[cur]` goes.
    cur_at: u64,
    base: u64,
    end: u64,
    fsync_per_group: bool,
    appended: u64,
    /// Writes and fsyncs submitted and not yet reaped.
    ops_in_flight: usize,
}

impl UringLog {
    fn open(dir: &Path, segment_bytes: u64, fsync_per_group: bool) -> UringLog {
        let mut segments = Segments::new(dir, segment_bytes, fsync_per_group);
        let file = segments.create(0);
        let bufs: Vec<Vec<u8>> =
            (0..URING_BUFFERS_IN_FLIGHT + 1).map(|_| Vec::with_capacity(BATCH_BYTES)).collect();
        UringLog {
            ring: IoUring::new(2 * URING_OPS_IN_FLIGHT as u32).expect("io_uring_setup"),
            segments,
            file,
            old_files: Vec::new(),
            free: (1..bufs.len()).collect(),
            bufs,
            cur: 0,
            cur_at: SEGMENT_HEADER_LEN_BYTES as u64,
            base: 0,
            end: 0,
            fsync_per_group,
            appended: 0,
            ops_in_flight: 0,
        }
    }

    fn append(&mut self, payload: &[u8]) {
        let frame = frame_len(payload.len());
        let at = SEGMENT_HEADER_LEN_BYTES as u64 + (self.end - self.base);
        if at + frame as u64 > self.segments.segment_bytes {
            self.roll();
        } else if self.bufs[self.cur].len() + frame > BATCH_BYTES {
            self.submit_buf();
        }
        encode_frame(&mut self.bufs[self.cur], payload);
        self.end += frame as u64;
        self.appended += 1;
        if self.fsync_per_group && self.appended % GROUP_RECORDS == 0 {
            self.submit_buf();
            self.submit_fsync();
        }
    }

    /// Pushes one operation and submits it without waiting, first reaping completions until
    /// fewer than `URING_OPS_IN_FLIGHT` operations are in flight.
    ///
    /// # Safety
    /// Whatever `sqe` points at (buffer, descriptor) must stay valid until its completion is reaped.
    unsafe fn push(&mut self, sqe: squeue::Entry) {
        while self.ops_in_flight >= URING_OPS_IN_FLIGHT {
            self.reap(1);
        }
        // SAFETY: the caller guarantees that the operation's buffer and descriptor outlive it.
        unsafe { self.ring.submission().push(&sqe).expect("submission queue has room") };
        self.ring.submit().expect("io_uring_enter");
        self.ops_in_flight += 1;
    }

    /// Submits the current buffer as one write, then takes a free buffer (waiting for one).
    fn submit_buf(&mut self) {
        let len = self.bufs[self.cur].len();
        if len == 0 {
            return;
        }
        let sqe =
            opcode::Write::new(types::Fd(self.file.as_raw_fd()), self.bufs[self.cur].as_ptr(), len as u32)
                .offset(self.cur_at)
                .build()
                .user_data(self.cur as u64);
        // SAFETY: `bufs[cur]` is neither written nor freed until its completion is reaped (it
        // goes back on `free` only in `reap`, and `Drop` reaps everything before the buffers are
        // freed); the file stays open in `file` or `old_files` until the `UringLog` is dropped.
        unsafe { self.push(sqe) };
        self.cur_at += len as u64;
        self.cur = loop {
            match self.free.pop() {
                Some(i) => break i,
                None => self.reap(1),
            }
        };
        self.bufs[self.cur].clear();
    }

    fn submit_fsync(&mut self) {
        let sqe = opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .flags(squeue::Flags::IO_DRAIN)
            .user_data(FSYNC_TAG);
        // SAFETY: no buffer; the file stays open in `file` or `old_files` until the `UringLog` is
        // dropped, which reaps every completion first.
        unsafe { self.push(sqe) };
    }

    /// Waits for at least `want` completions (0: only those already there) and reaps them all.
    fn reap(&mut self, want: usize) {
        if want > 0 {
            self.ring.submit_and_wait(want).expect("io_uring_enter");
        }
        let UringLog { ring, bufs, free, ops_in_flight, .. } = self;
        for cqe in ring.completion() {
            *ops_in_flight -= 1;
            if cqe.user_data() == FSYNC_TAG {
                assert!(cqe.result() >= 0, "fsync: {}", std::io::Error::from_raw_os_error(-cqe.result()));
            } else {
                let i = cqe.user_data() as usize;
                assert_eq!(cqe.result(), bufs[i].len() as i32, "write of {} bytes", bufs[i].len());
                free.push(i);
            }
        }
    }

    fn roll(&mut self) {
        self.submit_buf();
        if self.fsync_per_group {
            self.submit_fsync();
        }
        self.base = self.end;
        let next = self.segments.create(self.base);
        self.old_files.push(std::mem::replace(&mut self.file, next));
        self.cur_at = SEGMENT_HEADER_LEN_BYTES as u64;
    }

    /// Everything appended is written (and, with fsyncs, durable).
    fn finish(&mut self) {
        self.submit_buf();
        if self.fsync_per_group {
            self.submit_fsync();
        }
        while self.ops_in_flight > 0 {
            self.reap(1);
        }
    }
}

impl Drop for UringLog {
    fn drop(&mut self) {
        while self.ops_in_flight > 0 {
            self.reap(1);
        }
    }
}

/// The mmap write path without the log around it: frames copied into a shared mapping of each
/// preallocated segment, as `Segment::append` does, but none of `Log::append`'s bookkeeping (the
/// record index, the consumed bitmap), so that the write paths can be compared like for like.
/// Flushes with `msync` (on the appending thread per group, or on an interval sync thread).
struct MmapRawLog {
    segments: Segments,
    map: Arc<memmap2::MmapRaw>,
    /// File position of the next record.
    at: usize,
    /// File position up to which the active segment was flushed (per-group durability).
    synced_at: usize,
    /// Log offset of the active segment's first record.
    base: u64,
    durability: Durability,
    appended: u64,
    interval: Option<IntervalSyncer>,
}

impl MmapRawLog {
    fn open(dir: &Path, segment_bytes: u64, durability: Durability) -> MmapRawLog {
        let mut segments = Segments::new(dir, segment_bytes, durability != Durability::Never);
        let map = Self::map(&mut segments, 0);
        let interval = (durability == Durability::Interval).then(|| IntervalSyncer::start(map.clone()));
        let at = SEGMENT_HEADER_LEN_BYTES;
        MmapRawLog { segments, map, at, synced_at: at, base: 0, durability, appended: 0, interval }
    }

    /// Creates the next segment and maps it (the file may be closed: the mapping stays valid).
    fn map(segments: &mut Segments, base: u64) -> Arc<memmap2::MmapRaw> {
        let file = segments.create(base);
        let map = memmap2::MmapOptions::new().len(segments.segment_bytes as usize).map_raw(&file);
        Arc::new(map.expect("mmap segment"))
    }

    fn end(&self) -> u64 {
        self.base + (self.at - SEGMENT_HEADER_LEN_BYTES) as u64
    }

    #[inline]
    fn append(&mut self, payload: &[u8]) {
        let frame = frame_len(payload.len());
        if self.at + frame > self.map.len() {
            self.roll();
        }
        let len = (payload.len() as u32).to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len), payload).to_le_bytes();
        let dst = self.map.as_mut_ptr();
        // SAFETY: [at, at + frame) is inside the mapping (checked above); this appender is the
        // only writer of the mapping and nothing reads these bytes while it writes them (the sync
        // thread only msyncs). The padding is already zero: the file was preallocated with zeros,
        // as the log relies on.
        unsafe {
            std::ptr::copy_nonoverlapping(len.as_ptr(), dst.add(self.at), 4);
            std::ptr::copy_nonoverlapping(crc.as_ptr(), dst.add(self.at + 4), 4);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), dst.add(self.at + 8), payload.len());
        }
        self.at += frame;
        self.appended += 1;
        match self.durability {
            Durability::Never => {}
            Durability::PerGroup => {
                if self.appended % GROUP_RECORDS == 0 {
                    self.sync();
                }
            }
            Durability::Interval => self.interval.as_ref().expect("interval thread").written(self.end()),
        }
    }

    /// `msync` of what was written since the last one, on this thread (as `Log::sync` does).
    fn sync(&mut self) {
        self.map.flush_range(self.synced_at, self.at - self.synced_at).expect("msync");
        self.synced_at = self.at;
    }

    fn roll(&mut self) {
        if self.durability == Durability::PerGroup {
            self.sync();
        }
        self.base = self.end();
        self.map = Self::map(&mut self.segments, self.base);
        self.at = SEGMENT_HEADER_LEN_BYTES;
        self.synced_at = self.at;
        if let Some(syncer) = &self.interval {
            syncer.add(self.map.clone());
        }
    }

    fn finish(&mut self) {
        match self.durability {
            Durability::Never => {}
            Durability::PerGroup => self.sync(),
            Durability::Interval => self.interval.as_ref().expect("interval thread").wait_durable(self.end()),
        }
    }
}

/// One appender of any kind, so that every variant runs through the same loop.
enum Appender {
    /// The log; `sync_per_group`: `Log::sync` every `GROUP_RECORDS`; `commit_every`: `Log::commit`
    /// every so many appends (0: only when the buffer fills and at the end).
    Log {
        log: Log,
        sync_per_group: bool,
        commit_every: u64,
        appended: u64,
    },
    MmapRaw(MmapRawLog),
    Pwrite(PwriteLog),
    Uring(UringLog),
}

#[derive(Clone, Copy, Debug)]
enum Variant {
    LogNever,
    LogNeverCommitPer16,
    MmapRawNever,
    LogInterval,
    MmapRawInterval,
    LogSyncPerGroup,
    MmapRawSyncPerGroup,
    Pwrite1FrameNever,
    Pwrite4KiBNever,
    Pwrite16KiBNever,
    Pwrite64KiBNever,
    Pwrite1FramePerGroup,
    Pwrite64KiBPerGroup,
    Pwrite64KiBInterval,
    Uring64KiBNever,
    Uring64KiBPerGroup,
}

impl Variant {
    const ALL: [Variant; 16] = [
        Variant::LogNever,
        Variant::LogNeverCommitPer16,
        Variant::MmapRawNever,
        Variant::LogInterval,
        Variant::MmapRawInterval,
        Variant::LogSyncPerGroup,
        Variant::MmapRawSyncPerGroup,
        Variant::Pwrite1FrameNever,
        Variant::Pwrite4KiBNever,
        Variant::Pwrite16KiBNever,
        Variant::Pwrite64KiBNever,
        Variant::Pwrite1FramePerGroup,
        Variant::Pwrite64KiBPerGroup,
        Variant::Pwrite64KiBInterval,
        Variant::Uring64KiBNever,
        Variant::Uring64KiBPerGroup,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::LogNever => "log_never",
            Variant::LogNeverCommitPer16 => "log_never_commit_per_16",
            Variant::MmapRawNever => "mmap_raw_never",
            Variant::LogInterval => "log_interval_5ms",
            Variant::MmapRawInterval => "mmap_raw_interval_5ms",
            Variant::LogSyncPerGroup => "log_sync_per_1000",
            Variant::MmapRawSyncPerGroup => "mmap_raw_msync_per_1000",
            Variant::Pwrite1FrameNever => "pwrite_1frame_never",
            Variant::Pwrite4KiBNever => "pwrite_4KiB_never",
            Variant::Pwrite16KiBNever => "pwrite_16KiB_never",
            Variant::Pwrite64KiBNever => "pwrite_64KiB_never",
            Variant::Pwrite1FramePerGroup => "pwrite_1frame_fdatasync_per_1000",
            Variant::Pwrite64KiBPerGroup => "pwrite_64KiB_fdatasync_per_1000",
            Variant::Pwrite64KiBInterval => "pwrite_64KiB_interval_5ms",
            Variant::Uring64KiBNever => "uring_64KiB_never",
            Variant::Uring64KiBPerGroup => "uring_64KiB_fdatasync_per_1000",
        }
    }

    fn open(self, dir: &Path, segment_bytes: u64) -> Appender {
        let log_committing = |policy: FsyncPolicy, sync_per_group: bool, commit_every: u64| {
            let config = Config { segment_size_bytes: segment_bytes, ..log_config(policy) };
            let log = Log::open(dir, config).expect("open log");
            Appender::Log { log, sync_per_group, commit_every, appended: 0 }
        };
        let log = |policy: FsyncPolicy, sync_per_group: bool| log_committing(policy, sync_per_group, 0);
        let pwrite =
            |batch: usize, d: Durability| Appender::Pwrite(PwriteLog::open(dir, segment_bytes, batch, d));
        match self {
            Variant::LogNever => log(FsyncPolicy::Never, false),
            Variant::LogNeverCommitPer16 => log_committing(FsyncPolicy::Never, false, 16),
            Variant::MmapRawNever => {
                Appender::MmapRaw(MmapRawLog::open(dir, segment_bytes, Durability::Never))
            }
            Variant::MmapRawInterval => {
                Appender::MmapRaw(MmapRawLog::open(dir, segment_bytes, Durability::Interval))
            }
            Variant::MmapRawSyncPerGroup => {
                Appender::MmapRaw(MmapRawLog::open(dir, segment_bytes, Durability::PerGroup))
            }
            Variant::LogInterval => log(FsyncPolicy::Interval(INTERVAL), false),
            Variant::LogSyncPerGroup => log(FsyncPolicy::Never, true),
            Variant::Pwrite1FrameNever => pwrite(0, Durability::Never),
            Variant::Pwrite4KiBNever => pwrite(4 << 10, Durability::Never),
            Variant::Pwrite16KiBNever => pwrite(16 << 10, Durability::Never),
            Variant::Pwrite64KiBNever => pwrite(BATCH_BYTES, Durability::Never),
            Variant::Pwrite1FramePerGroup => pwrite(0, Durability::PerGroup),
            Variant::Pwrite64KiBPerGroup => pwrite(BATCH_BYTES, Durability::PerGroup),
            Variant::Pwrite64KiBInterval => pwrite(BATCH_BYTES, Durability::Interval),
            Variant::Uring64KiBNever => Appender::Uring(UringLog::open(dir, segment_bytes, false)),
            Variant::Uring64KiBPerGroup => Appender::Uring(UringLog::open(dir, segment_bytes, true)),
        }
    }

    /// Whether the latency report includes this variant: not the interval ones, whose append calls
    /// are those of their `never` twins (the flushes run on another thread).
    fn single_append_latency(self) -> bool {
        !matches!(self, Variant::LogInterval | Variant::MmapRawInterval | Variant::Pwrite64KiBInterval)
    }
}

impl Appender {
    #[inline]
    fn append(&mut self, payload: &[u8]) {
        match self {
            Appender::Log { log, sync_per_group, commit_every, appended } => {
                log.append(payload).expect("append");
                *appended += 1;
                if *sync_per_group && *appended % GROUP_RECORDS == 0 {
                    log.sync().expect("sync");
                }
                if *commit_every > 0 && *appended % *commit_every == 0 {
                    log.commit().expect("commit");
                }
            }
            Appender::MmapRaw(m) => m.append(payload),
            Appender::Pwrite(p) => p.append(payload),
            Appender::Uring(u) => u.append(payload),
        }
    }

    /// Ends a sample: every record appended is in the page cache (and durable, for the durable
    /// variants), as the variant's policy promises.
    fn finish(&mut self) {
        match self {
            Appender::Log { log, sync_per_group, .. } => {
                if *sync_per_group {
                    log.sync().expect("sync");
                } else {
                    log.commit().expect("commit");
                    let end = log.end_offset();
                    while log.durable_offset() < end {
                        std::thread::yield_now();
                    }
                }
            }
            Appender::MmapRaw(m) => m.finish(),
            Appender::Pwrite(p) => p.finish(),
            Appender::Uring(u) => u.finish(),
        }
    }

    /// The time of `count` appends plus the finish.
    fn run(&mut self, payload: &[u8], count: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..count {
            self.append(payload);
        }
        self.finish();
        start.elapsed()
    }
}

/// Checks that every hand-written appender writes the log's format: `Log::open` recovers all the
/// records, over several segment rolls (small segments), with no torn tail.
fn verify_formats() {
    for size in [61usize, 64, 1024] {
        let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
        for variant in Variant::ALL {
            let tmp = tempfile::tempdir().expect("temporary directory");
            let count = 1500u64;
            {
                let mut a = variant.open(tmp.path(), 16 << 10);
                a.run(&payload, count);
            }
            let log = Log::open(tmp.path(), log_config(FsyncPolicy::Never)).expect("open what was written");
            let r = log.recovery();
            assert_eq!(r.records, count, "{} {size} B: records recovered", variant.name());
            assert!(r.torn_tail.is_none(), "{} {size} B: torn tail {:?}", variant.name(), r.torn_tail);
            assert!(r.segments > 4, "{} {size} B: {} segments", variant.name(), r.segments);
            let mut n = 0;
            for record in log.iter_from(shardmq_storage::Offset(0)) {
                assert_eq!(record.expect("record").1, &payload[..]);
                n += 1;
            }
            assert_eq!(n, count);
        }
    }
}

/// Prints the distribution of the time of one append call, per variant where it means something.
fn latency_report() {
    for (size, count) in [(64usize, 2_000_000u64), (1024, 500_000)] {
        let payload = vec![0xA5u8; size];
        for variant in Variant::ALL.into_iter().filter(|v| v.single_append_latency()) {
            settle();
            let tmp = tempfile::tempdir().expect("temporary directory");
            let mut a = variant.open(tmp.path(), SEGMENT_BYTES);
            let mut lat_ns: Vec<u32> = Vec::with_capacity(count as usize);
            let start = Instant::now();
            for _ in 0..count {
                let t = Instant::now();
                a.append(&payload);
                lat_ns.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            }
            a.finish();
            let total = start.elapsed();
            lat_ns.sort_unstable();
            let at = |q: f64| lat_ns[((lat_ns.len() - 1) as f64 * q) as usize];
            println!(
                "append_latency/{size}B/{}: {count} appends in {:.1} ms ({:.2} M/s): p50 {} ns, p99 {} ns, \
                 p99.9 {} ns, p99.99 {} ns, max {} ns",
                variant.name(),
                total.as_secs_f64() * 1e3,
                count as f64 / total.as_secs_f64() / 1e6,
                at(0.5),
                at(0.99),
                at(0.999),
                at(0.9999),
                lat_ns[lat_ns.len() - 1]
            );
        }
    }
}

/// The durable variants, interleaved: a flush's cost on this virtual disk drifts by several times
/// within minutes, more than between the variants, so each round runs every durable variant once
/// (in an order rotated per round) and the report gives each one's median over the rounds and the
/// median, over the rounds, of its ratio to the log's and the raw mmap variant of the same kind
/// in the same round.
fn group_commit_report() {
    const ROUNDS: usize = 9;
    // Each kind starts with the log's variant, then the raw mmap one: the ratios printed are to
    // these two, round by round.
    let per_group = [
        Variant::LogSyncPerGroup,
        Variant::MmapRawSyncPerGroup,
        Variant::Pwrite64KiBPerGroup,
        Variant::Pwrite1FramePerGroup,
        Variant::Uring64KiBPerGroup,
    ];
    let interval = [Variant::LogInterval, Variant::MmapRawInterval, Variant::Pwrite64KiBInterval];
    for (size, count) in [(64usize, 200_000u64), (1024, 50_000)] {
        let payload = vec![0xA5u8; size];
        let variants: Vec<Variant> = per_group.iter().chain(interval.iter()).copied().collect();
        // rates[v][round], records/s
        let mut rates = vec![Vec::with_capacity(ROUNDS); variants.len()];
        for round in 0..ROUNDS {
            for k in 0..variants.len() {
                let v = (k + round) % variants.len();
                settle();
                let tmp = tempfile::tempdir().expect("temporary directory");
                let mut a = variants[v].open(tmp.path(), SEGMENT_BYTES);
                let elapsed = a.run(&payload, count);
                rates[v].push(count as f64 / elapsed.as_secs_f64());
            }
        }
        let median = |mut x: Vec<f64>| {
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        for (v, variant) in variants.iter().enumerate() {
            let base = if v < per_group.len() { 0 } else { per_group.len() };
            let ratio_to = |b: usize| {
                let ratios: Vec<f64> = rates[v].iter().zip(&rates[b]).map(|(r, b)| r / b).collect();
                let lo = ratios.iter().copied().fold(f64::MAX, f64::min);
                let hi = ratios.iter().copied().fold(0f64, f64::max);
                format!("{} {:.2} ({:.2}-{:.2})", variants[b].name(), median(ratios), lo, hi)
            };
            let (lo, hi) = rates[v].iter().fold((f64::MAX, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
            println!(
                "group_commit/{size}B/{}: {count} appends x {ROUNDS} rounds: median {:.3} M/s ({:.3}-{:.3}); \
                 median ratio (min-max) in the same round to {}, to {}",
                variant.name(),
                median(rates[v].clone()) / 1e6,
                lo / 1e6,
                hi / 1e6,
                ratio_to(base),
                ratio_to(base + 1),
            );
        }
    }
}

fn write_path(c: &mut Criterion) {
    verify_formats();
    if measuring() {
        latency_report();
        group_commit_report();
    }
    let mut group = c.benchmark_group("write_path");
    group.throughput(Throughput::Elements(1));
    for size in [64usize, 1024] {
        let payload = vec![0xA5u8; size];
        group.bench_function(BenchmarkId::new(format!("{size}B"), "frame_only"), |b| {
            b.iter_custom(|iters| {
                let mut buf: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
                let start = Instant::now();
                for _ in 0..iters {
                    if buf.len() + frame_len(size) > BATCH_BYTES {
                        std::hint::black_box(&buf);
                        buf.clear();
                    }
                    encode_frame(&mut buf, &payload);
                }
                std::hint::black_box(&buf);
                start.elapsed()
            })
        });
        for variant in Variant::ALL {
            settle();
            group.bench_function(BenchmarkId::new(format!("{size}B"), variant.name()), |b| {
                b.iter_custom(|iters| {
                    let tmp = tempfile::tempdir().expect("temporary directory");
                    let mut a = variant.open(tmp.path(), SEGMENT_BYTES);
                    let elapsed = a.run(&payload, iters);
                    drop(a);
                    elapsed
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = write_path
}
criterion_main!(benches);
