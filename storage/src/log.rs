//! The log: a directory of segments, with recovery, append, read, iteration, consumption,
//! compaction and a disk budget.
//!
//! Owner: one shard (its home shard's thread); every mutating call takes `&mut self`. The only
//! other thread is the log's sync thread (`sync.rs`), which writes what the owner commits.
//! Nothing here blocks on the disk except [`Log::open`], [`Log::sync`], [`Log::close`],
//! [`Log::wait_durable`], the creation of a new segment when the active one is full and no spare
//! is ready, and a commit that finds the sync thread's queue full (see the crate documentation).
//!
//! Invariants:
//! - `segments` is ordered by base offset, non-empty, and its last element is the active segment,
//!   the only one appended to. Offsets grow strictly with append order across segments.
//! - Each segment's `end_pos` is the end of its records (a file position), staged or not; its
//!   written end (`Segment::len`) is at most that, and bytes between the two are in the staging
//!   buffer or a committed batch (`stage.rs`).
//! - Each segment's `records` lists the file position of every record it holds, in order; the
//!   `consumed` bitset has a bit per record; `live_bytes` is the sum of the frames of unconsumed
//!   records.
//! - A segment other than the active one whose records are all consumed is removed at once from
//!   `segments` and handed to the sync thread for deletion (compaction: only after its copies are
//!   flushed).
//! - `allocated_bytes` is the sum of the file sizes of the segments in `segments`; a new segment is
//!   created only if it stays within `disk_budget_bytes`.
//!
//! Bounds (memory): 4 bytes and 1 bit per stored record for the record index, plus a small
//! fixed cost per segment. The disk is bounded by the budget.

use std::collections::VecDeque;
use std::fs;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::format::{self, frame_len, Frame, Tail, FRAME_HEADER_LEN_BYTES, SEGMENT_HEADER_LEN_BYTES};
use crate::segment::{self, Segment};
use crate::stage::Stage;
use crate::sync::Syncer;
use crate::{Config, Offset, SegmentId};

/// The smallest segment accepted by [`Config`] validation.
const SEGMENT_SIZE_MIN_BYTES: u64 = 4096;

/// What [`Log::open`] found and did.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    /// Segment files opened.
    pub segments: usize,
    /// Valid records found (all of them are live after opening).
    pub records: u64,
    /// Bytes of records scanned and checksummed.
    pub record_bytes: u64,
    /// Time spent opening (listing, mapping, scanning, flushing).
    pub elapsed: Duration,
    /// The torn tail that was cut off the last segment, if any.
    pub torn_tail: Option<TornTail>,
    /// Leftover temporary files (segments whose creation did not finish) that were removed.
    pub removed_temporary_files: usize,
    /// Files under a segment's name that still had a spare's header: a roll whose header never
    /// became durable, so nothing in them was ever durable. They were removed.
    pub discarded_unfinished_segments: usize,
}

/// A torn tail found and truncated by recovery: the last segment's records end at `position`.
#[derive(Clone, Debug)]
pub struct TornTail {
    pub path: PathBuf,
    /// The file position where the valid records end.
    pub position: u64,
    /// The log offset where the valid records end (the next append goes here).
    pub offset: Offset,
    /// How many bytes after it were not zero (and were zeroed).
    pub stray_bytes: u64,
    pub reason: &'static str,
}

/// Counters of a log, for the owner's metrics and its compaction decisions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub segments: usize,
    /// Bytes of segment files, plus the spare segment prepared ahead of the next roll.
    pub allocated_bytes: u64,
    /// Bytes of record frames stored (live or consumed).
    pub used_bytes: u64,
    pub live_bytes: u64,
    pub records: u64,
    pub live_records: u64,
    /// The offset of the first stored record (or the end, if there is none).
    pub start_offset: Offset,
    /// The offset the next append gets.
    pub end_offset: Offset,
    pub durable_offset: Offset,
    /// Batches the owner wrote itself because the sync thread's queue was full (each one a
    /// `pwrite` on the owner's thread).
    pub owner_writes: u64,
}

/// What a crash left, as [`Log::abandon`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abandoned {
    /// Records below this offset are in the segment files.
    pub written: Offset,
    /// Records below this offset were flushed to disk.
    pub synced: Offset,
}

/// Where a record is stored; see [`Log::record_location`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordLocation {
    pub segment: SegmentId,
    pub path: PathBuf,
    /// The file position of the record's frame (its length field).
    pub position: u64,
}

/// What one call to [`Log::compact`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactStats {
    pub segments_compacted: usize,
    pub records_moved: u64,
    pub bytes_moved: u64,
    pub bytes_freed: u64,
}

#[derive(Debug)]
struct SegState {
    seg: Arc<Segment>,
    records: Vec<u32>,
    consumed: Vec<u64>,
    consumed_count: usize,
    live_bytes: u64,
    /// The end of the records, staged or written (a file position).
    end_pos: usize,
}

impl SegState {
    fn new(seg: Arc<Segment>, records: Vec<u32>, end_pos: usize) -> SegState {
        let live_bytes = (end_pos - SEGMENT_HEADER_LEN_BYTES) as u64;
        let consumed = vec![0u64; records.len().div_ceil(64)];
        SegState { seg, records, consumed, consumed_count: 0, live_bytes, end_pos }
    }

    /// The log offset just after the last record.
    fn end_offset(&self) -> Offset {
        self.offset_of(self.end_pos)
    }

    /// Whether a frame of `frame_bytes` fits after the records.
    fn has_room(&self, frame_bytes: usize) -> bool {
        self.end_pos + frame_bytes <= self.seg.capacity()
    }

    fn is_consumed(&self, ord: usize) -> bool {
        self.consumed[ord / 64] & (1 << (ord % 64)) != 0
    }

    /// The file position just after record `ord`'s frame.
    fn frame_end(&self, ord: usize) -> usize {
        self.records.get(ord + 1).map_or(self.end_pos, |&p| p as usize)
    }

    fn offset_of(&self, pos: usize) -> Offset {
        Offset(self.seg.base.0 + (pos - SEGMENT_HEADER_LEN_BYTES) as u64)
    }

    /// Marks record `ord` consumed. Returns false if it already was.
    fn consume(&mut self, ord: usize) -> bool {
        if self.is_consumed(ord) {
            return false;
        }
        self.consumed[ord / 64] |= 1 << (ord % 64);
        self.consumed_count += 1;
        self.live_bytes -= (self.frame_end(ord) - self.records[ord] as usize) as u64;
        true
    }

    fn all_consumed(&self) -> bool {
        self.consumed_count == self.records.len()
    }

    fn used_bytes(&self) -> u64 {
        (self.end_pos - SEGMENT_HEADER_LEN_BYTES) as u64
    }

    /// The frame of record `ord`: from the mapping once written, else from the staging buffer or
    /// the batch that holds it.
    fn frame<'a>(&'a self, stage: &'a Stage, ord: usize) -> &'a [u8] {
        let pos = self.records[ord] as usize;
        let len = self.frame_end(ord) - pos;
        if pos + len <= self.seg.len() {
            return self.seg.bytes(pos, len);
        }
        // Not written when `len()` was loaded: still held by the stage, which lets a batch go only
        // after the segment's written end covers it, and only through `&mut Log`.
        stage.bytes(self.seg.id, pos, len).unwrap_or_else(|| {
            panic!("record at {} of {} is neither written nor staged", pos, self.seg.path.display())
        })
    }

    /// The payload of record `ord`, checksum verified.
    fn payload<'a>(&'a self, stage: &'a Stage, ord: usize) -> Result<&'a [u8]> {
        let pos = self.records[ord] as usize;
        let frame = self.frame(stage, ord);
        match format::check_frame(frame, 0) {
            Frame::Valid { payload_len } => {
                Ok(&frame[FRAME_HEADER_LEN_BYTES..FRAME_HEADER_LEN_BYTES + payload_len])
            }
            Frame::End => Err(self.corrupt(pos, "record became an end marker")),
            Frame::Bad(reason) => Err(self.corrupt(pos, reason)),
        }
    }

    /// Like [`SegState::payload`], for a record whose checksum [`Log::open`] verified: only the
    /// length is read again.
    fn payload_verified_at_open<'a>(&'a self, stage: &'a Stage, ord: usize) -> Result<&'a [u8]> {
        let pos = self.records[ord] as usize;
        let frame = self.frame(stage, ord);
        let len =
            format::u32_at(frame, 0).ok_or_else(|| self.corrupt(pos, "frame header past the end"))? as usize;
        frame
            .get(FRAME_HEADER_LEN_BYTES..FRAME_HEADER_LEN_BYTES + len)
            .ok_or_else(|| self.corrupt(pos, "length runs past the end of the record"))
    }

    fn corrupt(&self, pos: usize, reason: &'static str) -> Error {
        Error::CorruptRecord {
            path: self.seg.path.clone(),
            position: pos as u64,
            offset: self.offset_of(pos),
            reason,
        }
    }
}

/// A record's payload independent of the `Log`'s borrow (so it can become a `Bytes` with
/// `Bytes::from_owner`), `Send + Sync`: for a written record it holds the segment's mapping alive
/// (zero-copy); for one not yet written it holds a copy.
#[derive(Clone, Debug)]
pub struct Record {
    bytes: RecordBytes,
    offset: Offset,
}

#[derive(Clone, Debug)]
enum RecordBytes {
    Mapped { seg: Arc<Segment>, at: usize, len: usize },
    Copied(Arc<[u8]>),
}

impl Record {
    pub fn offset(&self) -> Offset {
        self.offset
    }
}

impl Deref for Record {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.bytes {
            // The range was below the written end when the record was made, and written bytes
            // never change: `bytes` re-checks that and cannot fail here.
            RecordBytes::Mapped { seg, at, len } => seg.bytes(*at, *len),
            RecordBytes::Copied(bytes) => bytes,
        }
    }
}

impl AsRef<[u8]> for Record {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// A segmented append-only log of opaque records. See the crate and module documentation.
///
/// Owner: one shard. Lifecycle: [`Log::open`] (recovers), appends and acks, [`Log::close`]
/// (flushes). Dropping it without `close` is, for durability, a crash. Bounds: the disk budget
/// and `record_len_max_bytes`; full policy: [`Error::DiskBudgetExceeded`] / [`Error::DiskFull`],
/// data already stored is untouched.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    config: Config,
    segments: VecDeque<SegState>,
    next_id: SegmentId,
    allocated_bytes: u64,
    syncer: Syncer,
    recovery: RecoveryReport,
    /// Whether a spare segment is asked of the sync thread (its size is in `allocated_bytes`).
    spare_reserved: bool,
    /// Appended records not yet written to their segment file.
    stage: Stage,
}

fn validate(config: &Config) -> Result<()> {
    let size = config.segment_size_bytes;
    if !(SEGMENT_SIZE_MIN_BYTES..=u32::MAX as u64).contains(&size) || size % 4096 != 0 {
        return Err(Error::Config(format!(
            "segment_size_bytes {size} must be a multiple of 4096 between {SEGMENT_SIZE_MIN_BYTES} and {}",
            u32::MAX
        )));
    }
    let max_frame = frame_len(config.record_len_max_bytes as usize) as u64;
    if max_frame > size - SEGMENT_HEADER_LEN_BYTES as u64 {
        return Err(Error::Config(format!(
            "record_len_max_bytes {} does not fit a segment of {size} bytes",
            config.record_len_max_bytes
        )));
    }
    if config.disk_budget_bytes < size {
        return Err(Error::Config(format!(
            "disk_budget_bytes {} is less than one segment ({size} bytes)",
            config.disk_budget_bytes
        )));
    }
    if config.write_buffer_bytes < 4096 || config.write_queue_batches == 0 {
        return Err(Error::Config(format!(
            "write_buffer_bytes {} must be at least 4096 and write_queue_batches {} at least 1",
            config.write_buffer_bytes, config.write_queue_batches
        )));
    }
    if let crate::FsyncPolicy::Interval(d) = config.fsync {
        if d.is_zero() {
            return Err(Error::Config("fsync interval must be greater than zero (use Always)".into()));
        }
    }
    Ok(())
}

impl Log {
    /// Opens the log in `dir` (created if missing), recovering it: every segment is scanned in
    /// id order and every record's checksum verified; a torn tail of the last segment is cut
    /// off (and reported in [`Log::recovery`]); anything else that is wrong is an error naming
    /// the file (and position): a corrupt or foreign header, an unknown format version, a bad
    /// record before the tail, a gap between consecutive segments. Recovered data is flushed
    /// before `open` returns, so the durable offset starts at the end of the log.
    pub fn open(dir: impl AsRef<Path>, config: Config) -> Result<Log> {
        let started = Instant::now();
        validate(&config)?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut report = RecoveryReport::default();
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == segment::SPARE_FILE_NAME {
                fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            } else if name.ends_with(".seg.tmp") {
                fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
                report.removed_temporary_files += 1;
            } else if let Some(id) = segment::parse_file_name(name) {
                ids.push(id);
            }
        }
        ids.sort();
        let record_len_max = config.record_len_max_bytes as usize;
        let mut segments: VecDeque<SegState> = VecDeque::with_capacity(ids.len() + 1);
        let mut allocated_bytes = 0u64;
        let mut opened = Vec::with_capacity(ids.len());
        for &id in &ids {
            let path = dir.join(segment::file_name(id));
            match Segment::open(&path, id)? {
                Some(seg) => opened.push((path, seg)),
                None => {
                    fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                    report.discarded_unfinished_segments += 1;
                }
            }
        }
        let count = opened.len();
        for (i, (path, seg)) in opened.into_iter().enumerate() {
            let last = i + 1 == count;
            let id = seg.id;
            let (scan, dirty_end) = {
                let data = seg.bytes_for_recovery();
                let scan = format::scan(data, last, record_len_max);
                let dirty_end = match scan.tail {
                    Tail::Clean => scan.end,
                    Tail::Torn { .. } => data.iter().rposition(|&b| b != 0).map_or(scan.end, |p| p + 1),
                    Tail::Corrupt { at, reason } => {
                        return Err(Error::CorruptRecord {
                            path,
                            position: at as u64,
                            offset: Offset(seg.base.0 + (at - SEGMENT_HEADER_LEN_BYTES) as u64),
                            reason,
                        })
                    }
                };
                (scan, dirty_end)
            };
            if let Some(prev) = segments.back() {
                let expected = prev.end_offset();
                let adjacent = prev.seg.id.0 + 1 == id.0;
                if seg.base < expected || (adjacent && seg.base != expected) {
                    return Err(Error::SegmentGap { path, expected, found: seg.base });
                }
            }
            if let Tail::Torn { at, reason } = scan.tail {
                report.torn_tail = Some(TornTail {
                    path: path.clone(),
                    position: at as u64,
                    offset: Offset(seg.base.0 + (at - SEGMENT_HEADER_LEN_BYTES) as u64),
                    stray_bytes: dirty_end.saturating_sub(at) as u64,
                    reason,
                });
            }
            // SAFETY: the recovery slice's scope ended above, and the segment is not shared yet.
            unsafe { seg.recovered(scan.end, dirty_end) }?;
            // What a crashed process left in the page cache is not on disk yet: flush it, so that
            // the durable offset the log starts with is true. Cheap when nothing is dirty.
            seg.sync_data()?;
            report.records += scan.records.len() as u64;
            report.record_bytes += (scan.end - SEGMENT_HEADER_LEN_BYTES) as u64;
            allocated_bytes += seg.capacity() as u64;
            segments.push_back(SegState::new(Arc::new(seg), scan.records, scan.end));
        }
        report.segments = segments.len();
        let mut next_id = SegmentId(ids.last().map_or(1, |id| id.0 + 1));
        if segments.is_empty() {
            let seg = Segment::create(&dir, next_id, Offset(0), config.segment_size_bytes as usize)?;
            allocated_bytes += seg.capacity() as u64;
            segments.push_back(SegState::new(Arc::new(seg), Vec::new(), SEGMENT_HEADER_LEN_BYTES));
            next_id = SegmentId(next_id.0 + 1);
        }
        let active = segments.back().map(|s| Arc::clone(&s.seg)).expect("a log has an active segment");
        let syncer = Syncer::start(
            config.fsync,
            config.write_queue_batches,
            dir.clone(),
            active.written_end_offset(),
            active,
            config.on_durable.clone(),
        )?;
        report.elapsed = started.elapsed();
        let stage = Stage::new(config.write_buffer_bytes, config.write_queue_batches);
        let mut log = Log {
            dir,
            config,
            segments,
            next_id,
            allocated_bytes,
            syncer,
            recovery: report,
            spare_reserved: false,
            stage,
        };
        // Segments other than the last with no records (left by a crash just after a roll, or
        // empty from the start) are deleted like any fully consumed segment.
        let mut i = 0;
        while i + 1 < log.segments.len() {
            if log.segments[i].records.is_empty() {
                log.delete_segment(i, Offset(0));
            } else {
                i += 1;
            }
        }
        log.reserve_spare();
        Ok(log)
    }

    /// Asks the sync thread to prepare the next segment, if the budget has room for it. Its bytes
    /// count in `allocated_bytes` from now on.
    fn reserve_spare(&mut self) {
        let size = self.config.segment_size_bytes;
        if !self.spare_reserved && self.allocated_bytes + size <= self.config.disk_budget_bytes {
            self.allocated_bytes += size;
            self.spare_reserved = true;
            self.syncer.request_spare(size as usize);
        }
    }

    /// What recovery found when this log was opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn active(&self) -> &SegState {
        self.segments.back().expect("a log has an active segment")
    }

    /// Appends a record and returns its offset. The record is framed into the staging buffer:
    /// no system call, except when the buffer is full (then it is committed, see
    /// [`Log::commit`]) or the active segment is (a roll). It is readable at once, and durable
    /// once [`Log::durable_offset`] is greater than the returned offset, which needs a commit.
    ///
    /// Errors: [`Error::RecordTooLarge`], [`Error::DiskBudgetExceeded`] and [`Error::DiskFull`]
    /// (nothing appended), [`Error::SyncFailed`] (the log refuses writes after a failed write or
    /// flush).
    pub fn append(&mut self, payload: &[u8]) -> Result<Offset> {
        self.syncer.check()?;
        if payload.len() > self.config.record_len_max_bytes as usize {
            return Err(Error::RecordTooLarge {
                len_bytes: payload.len(),
                max_bytes: self.config.record_len_max_bytes as usize,
            });
        }
        let frame = frame_len(payload.len());
        if !self.active().has_room(frame) {
            self.roll()?;
        }
        if self.stage.is_full_for(frame) {
            self.commit()?;
        }
        let header = format::encode_frame_header(payload);
        let state = self.segments.back_mut().expect("a log has an active segment");
        let at = state.end_pos;
        state.end_pos += frame;
        let end = state.end_offset();
        self.stage.push(&state.seg, at, &[&header, payload], frame, end);
        state.records.push(at as u32);
        if state.records.len() > state.consumed.len() * 64 {
            state.consumed.push(0);
        }
        state.live_bytes += frame as u64;
        Ok(state.offset_of(at))
    }

    /// Makes everything appended so far visible to the sync thread: hands the staging buffer over
    /// as one batch, which the sync thread writes with one `pwrite` and then flushes per the
    /// policy. Called by the owner at the end of each turn of its loop that appended something;
    /// without it, appended records are readable but never become durable. Cheap when nothing is
    /// staged. Never blocks on the disk unless the sync thread's queue is full: then the owner
    /// writes the queued batches and this one itself (the full policy, see `sync.rs`).
    pub fn commit(&mut self) -> Result<()> {
        self.stage.reap();
        match self.stage.take() {
            Some(batch) => self.syncer.submit(batch),
            None => Ok(()),
        }
    }

    /// Starts a new active segment.
    fn roll(&mut self) -> Result<()> {
        // The staged bytes belong to the old segment.
        self.commit()?;
        let size = self.config.segment_size_bytes;
        let base = self.active().end_offset();
        let (seg, spare) = if self.spare_reserved {
            // The usual case: the sync thread prepared the file; no blocking call here.
            self.spare_reserved = false;
            match self.syncer.take_spare().and_then(|f| Segment::from_spare(f, &self.dir, self.next_id, base))
            {
                Ok(seg) => (seg, true),
                Err(e) => {
                    self.allocated_bytes -= size;
                    return Err(e);
                }
            }
        } else {
            if self.allocated_bytes + size > self.config.disk_budget_bytes {
                return Err(Error::DiskBudgetExceeded {
                    budget_bytes: self.config.disk_budget_bytes,
                    allocated_bytes: self.allocated_bytes,
                    needed_bytes: size,
                });
            }
            // The new file's header is on disk at once: first write every committed batch, so
            // that a crash cannot leave it after a previous segment with a missing end (a gap).
            // This path blocks anyway (it creates and syncs a file).
            self.syncer.write_committed()?;
            let seg = Segment::create(&self.dir, self.next_id, base, size as usize)?;
            self.allocated_bytes += size;
            (seg, false)
        };
        let seg = Arc::new(seg);
        if spare {
            // A former spare still has the spare's header: the real one is the first batch,
            // committed now so the sync thread writes it in order right after the old segment's
            // last bytes (deletions wait for it, see `sync.rs`).
            self.stage.push(&seg, 0, &[&seg.header()], SEGMENT_HEADER_LEN_BYTES, base);
            self.commit()?;
        }
        self.next_id = SegmentId(self.next_id.0 + 1);
        self.syncer.add_segment(Arc::clone(&seg));
        self.segments.push_back(SegState::new(seg, Vec::new(), SEGMENT_HEADER_LEN_BYTES));
        let old = self.segments.len() - 2;
        if self.segments[old].all_consumed() {
            self.delete_segment(old, base);
        }
        self.reserve_spare();
        Ok(())
    }

    /// Removes segment `i` (not the active one) and hands it to the sync thread, which unlinks it
    /// once everything below `after` is flushed. Callers pass the end of the log: the records
    /// that made the segment dead (a newer version, a tombstone, the copies of compaction) may
    /// still be staged, and a crash must not keep the deletion and lose them.
    fn delete_segment(&mut self, i: usize, after: Offset) {
        assert!(i + 1 < self.segments.len(), "the active segment is never deleted");
        let state = self.segments.remove(i).expect("segment index in range");
        self.allocated_bytes -= state.seg.capacity() as u64;
        self.syncer.delete_after(state.seg, after);
        self.reserve_spare();
    }

    /// Finds the segment and record index of the record at `offset`.
    fn locate(&self, offset: Offset) -> Result<(usize, usize)> {
        let Some(i) = self.segments.partition_point(|s| s.seg.base <= offset).checked_sub(1) else {
            return Err(Error::NoRecord { offset });
        };
        let state = &self.segments[i];
        let rel = offset.0 - state.seg.base.0;
        if rel >= state.used_bytes() {
            return Err(Error::NoRecord { offset });
        }
        let pos =
            u32::try_from(SEGMENT_HEADER_LEN_BYTES as u64 + rel).map_err(|_| Error::NoRecord { offset })?;
        let ord = state.records.binary_search(&pos).map_err(|_| Error::NoRecord { offset })?;
        Ok((i, ord))
    }

    /// The payload of the record at `offset`, checksum verified, as a slice of the mapping once
    /// written, or of the staging buffer or batch that holds it before (no copy either way).
    /// Consumed records stay readable until their segment is deleted.
    pub fn read(&self, offset: Offset) -> Result<&[u8]> {
        let (i, ord) = self.locate(offset)?;
        self.segments[i].payload(&self.stage, ord)
    }

    /// Like [`Log::read`], but the result holds the segment's mapping alive on its own, so it
    /// outlives the borrow of the log (and a deletion of the segment).
    pub fn read_shared(&self, offset: Offset) -> Result<Record> {
        let (i, ord) = self.locate(offset)?;
        let state = &self.segments[i];
        let payload = state.payload(&self.stage, ord)?;
        let at = state.records[ord] as usize + FRAME_HEADER_LEN_BYTES;
        let bytes = if at + payload.len() <= state.seg.len() {
            RecordBytes::Mapped { seg: Arc::clone(&state.seg), at, len: payload.len() }
        } else {
            RecordBytes::Copied(Arc::from(payload))
        };
        Ok(Record { bytes, offset })
    }

    /// Where the record at `offset` is stored: its segment, file and file position. For operators'
    /// tools and for tests that damage files on purpose.
    pub fn record_location(&self, offset: Offset) -> Result<RecordLocation> {
        let (i, ord) = self.locate(offset)?;
        let state = &self.segments[i];
        Ok(RecordLocation {
            segment: state.seg.id,
            path: state.seg.path.clone(),
            position: state.records[ord] as u64,
        })
    }

    /// Whether the record at `offset` is consumed.
    pub fn is_consumed(&self, offset: Offset) -> Result<bool> {
        let (i, ord) = self.locate(offset)?;
        Ok(self.segments[i].is_consumed(ord))
    }

    /// Iterates over the live (unconsumed) records at or after `from`, in offset order, each
    /// checksum verified. An error (a checksum that no longer matches) is yielded in place.
    pub fn iter_from(&self, from: Offset) -> Iter<'_> {
        let seg = self.segments.partition_point(|s| s.end_offset() <= from);
        let ord = self.segments.get(seg).map_or(0, |s| {
            let pos = SEGMENT_HEADER_LEN_BYTES as u64 + from.0.saturating_sub(s.seg.base.0);
            s.records.partition_point(|&p| (p as u64) < pos)
        });
        Iter { log: self, seg, ord, verify: true }
    }

    /// Every live record, in offset order, without computing checksums again: for the owner's
    /// replay right after [`Log::open`], which has just verified every record it indexed (a
    /// second pass of crc32c over the whole log was an eighth of a large recovery).
    pub fn iter_after_open(&self) -> Iter<'_> {
        Iter { verify: false, ..self.iter_from(Offset(0)) }
    }

    /// Marks the record at `offset` consumed. Returns false if it already was. When every record
    /// of a segment other than the active one is consumed, the segment is deleted (by the sync
    /// thread, off the caller's thread, once everything appended so far is committed and flushed)
    /// and its bytes leave the budget at once.
    pub fn ack(&mut self, offset: Offset) -> Result<bool> {
        let (i, ord) = self.locate(offset)?;
        let state = &mut self.segments[i];
        if !state.consume(ord) {
            return Ok(false);
        }
        if state.all_consumed() && i + 1 < self.segments.len() {
            let end = self.end_offset();
            self.delete_segment(i, end);
        }
        Ok(true)
    }

    /// Compacts every segment other than the active one whose live bytes are at most
    /// `live_ratio_max` of its used bytes: its live records are appended again (at the end of the
    /// log), `on_move(old, new)` is called for each so the owner can update its index, and the
    /// segment is deleted once the copies are flushed (by the sync thread, which flushes them
    /// first under every policy).
    ///
    /// The disk budget must hold the copies before the old segment is freed; if it cannot,
    /// compaction stops with [`Error::DiskBudgetExceeded`] before copying anything of that
    /// segment. If an append fails halfway, the records already copied have been reported to
    /// `on_move` and are consumed at their old offset: every record is live exactly once.
    ///
    /// A crash after the copies are flushed but before the old file is unlinked leaves both
    /// copies on disk: after recovery the record appears at both offsets. Owners whose records
    /// carry an identity (a message id, a topic) keep the later one.
    pub fn compact(
        &mut self,
        live_ratio_max: f64,
        mut on_move: impl FnMut(Offset, Offset),
    ) -> Result<CompactStats> {
        let mut stats = CompactStats::default();
        let mut scratch = Vec::new();
        let last = self.segments.len() - 1;
        let candidates: Vec<SegmentId> = self
            .segments
            .iter()
            .take(last)
            .filter(|s| {
                s.consumed_count > 0 && (s.live_bytes as f64) <= live_ratio_max * s.used_bytes() as f64
            })
            .map(|s| s.seg.id)
            .collect();
        for id in candidates {
            let Some(i) = self.segments.iter().position(|s| s.seg.id == id) else { continue };
            let live: Vec<usize> = (0..self.segments[i].records.len())
                .filter(|&ord| !self.segments[i].is_consumed(ord))
                .collect();
            let frames: Vec<usize> = live
                .iter()
                .map(|&ord| self.segments[i].frame_end(ord) - self.segments[i].records[ord] as usize)
                .collect();
            // The spare, if reserved, is already counted in `allocated_bytes`.
            let needed_segments = self.segments_needed(&frames).saturating_sub(self.spare_reserved as u64);
            let needed_bytes = needed_segments * self.config.segment_size_bytes;
            if self.allocated_bytes + needed_bytes > self.config.disk_budget_bytes {
                return Err(Error::DiskBudgetExceeded {
                    budget_bytes: self.config.disk_budget_bytes,
                    allocated_bytes: self.allocated_bytes,
                    needed_bytes,
                });
            }
            let capacity = self.segments[i].seg.capacity() as u64;
            for ord in live {
                let (old, len) = {
                    let state = &self.segments[self.index_of(id)];
                    let payload = state.payload(&self.stage, ord)?;
                    // Copied, so the log can be borrowed mutably (and the source may still be in
                    // a batch that the append below would reap).
                    scratch.clear();
                    scratch.extend_from_slice(payload);
                    (state.offset_of(state.records[ord] as usize), payload.len())
                };
                let new = self.append(&scratch)?;
                // An append that rolls may delete the old active segment: find the source again.
                let i = self.index_of(id);
                self.segments[i].consume(ord);
                on_move(old, new);
                stats.records_moved += 1;
                stats.bytes_moved += frame_len(len) as u64;
            }
            let i = self.index_of(id);
            let end = self.active().end_offset();
            self.delete_segment(i, end);
            stats.segments_compacted += 1;
            stats.bytes_freed += capacity;
        }
        // The old segments go only once the copies are flushed: let the sync thread have them.
        self.commit()?;
        Ok(stats)
    }

    /// The index in `segments` of a segment that is known to be there.
    fn index_of(&self, id: SegmentId) -> usize {
        self.segments.iter().position(|s| s.seg.id == id).expect("segment being compacted exists")
    }

    /// How many new segments appending frames of these sizes would create.
    fn segments_needed(&self, frames: &[usize]) -> u64 {
        let active = self.active();
        let mut room = active.seg.capacity() - active.end_pos;
        let mut count = 0;
        for &f in frames {
            if f > room {
                count += 1;
                room = self.config.segment_size_bytes as usize - SEGMENT_HEADER_LEN_BYTES;
            }
            room -= f;
        }
        count
    }

    /// The offset the next append gets: the end of the log.
    pub fn end_offset(&self) -> Offset {
        self.active().end_offset()
    }

    /// Records below this offset are durable under the fsync policy, and may be acknowledged.
    /// One atomic load: the shard polls it (or is woken by [`Config::on_durable`]). Only
    /// committed records ([`Log::commit`]) ever become durable.
    pub fn durable_offset(&self) -> Offset {
        self.syncer.durable()
    }

    /// Records below this offset are in the segment files (a crash of the process keeps them),
    /// under every policy.
    pub fn written_offset(&self) -> Offset {
        self.syncer.written()
    }

    /// Returns true if every record below `offset` is in the segment files. Otherwise the
    /// write that puts it there calls [`Config::on_durable`], under every policy, and this
    /// returns false. Never blocks: for an owner that holds back what a client would see of a
    /// record until a crash of the process can no longer lose it (a shard's write loop), without
    /// writing on its own thread. One wish at a time: a later call replaces the previous one.
    pub fn notify_when_written(&self, offset: Offset) -> bool {
        self.syncer.notify_when_written(offset)
    }

    /// Committed batches waiting for the writer thread (not counting one it is writing).
    pub fn write_queue_len(&self) -> usize {
        self.syncer.queue_len()
    }

    /// Whether the log has failed for good (a write, flush or deletion failed): appends are
    /// refused and nothing more becomes written or durable.
    pub fn failed(&self) -> bool {
        self.syncer.failed()
    }

    /// Records below this offset have been flushed to disk, under every policy (under `Never`
    /// it lags behind [`Log::durable_offset`]).
    pub fn synced_offset(&self) -> Offset {
        self.syncer.synced()
    }

    /// Commits, writes and flushes everything appended so far, on the calling thread, and returns
    /// the new durable end. Blocking: for tools, tests and shutdown, not for a shard's loop.
    pub fn sync(&mut self) -> Result<Offset> {
        self.commit()?;
        self.syncer.sync_now()
    }

    /// Commits, then asks the sync thread to flush everything below `offset` and waits for it, at
    /// most `timeout`. Returns whether it was flushed. Blocking: not for a shard's loop.
    pub fn wait_durable(&mut self, offset: Offset, timeout: Duration) -> Result<bool> {
        self.commit()?;
        self.syncer.wait_durable(offset, timeout)
    }

    /// Writes and flushes everything and stops the sync thread (after it has applied pending
    /// deletions).
    pub fn close(mut self) -> Result<()> {
        self.sync()?;
        Ok(())
    }

    /// Stops the log as a crash of the process would: the staging buffer and the batches the
    /// sync thread has not written are lost, nothing more is flushed (deletions already flushed
    /// for are applied). Returns what was in the files and what was flushed at that moment: after
    /// reopening, records below `written` are there (a process crash keeps the page cache), and
    /// after a power loss records below `synced` are. For crash tests; a shard stops with `close`.
    pub fn abandon(mut self) -> Abandoned {
        self.syncer.stop();
        Abandoned { written: self.syncer.written(), synced: self.syncer.synced() }
    }

    /// The log's counters. Walks the segments (not the records): cheap, but not per message.
    pub fn stats(&self) -> LogStats {
        let mut s = LogStats {
            segments: self.segments.len(),
            allocated_bytes: self.allocated_bytes,
            end_offset: self.end_offset(),
            durable_offset: self.durable_offset(),
            owner_writes: self.syncer.owner_writes(),
            ..LogStats::default()
        };
        s.start_offset = s.end_offset;
        for st in &self.segments {
            if let (Some(&first), true) = (st.records.first(), s.records == 0) {
                s.start_offset = st.offset_of(first as usize);
            }
            s.used_bytes += st.used_bytes();
            s.live_bytes += st.live_bytes;
            s.records += st.records.len() as u64;
            s.live_records += (st.records.len() - st.consumed_count) as u64;
        }
        s
    }
}

/// Iterator over a log's live records from an offset; see [`Log::iter_from`].
#[derive(Debug)]
pub struct Iter<'a> {
    log: &'a Log,
    seg: usize,
    ord: usize,
    /// Whether each record's checksum is verified as it is read.
    verify: bool,
}

impl<'a> Iterator for Iter<'a> {
    type Item = Result<(Offset, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let state = self.log.segments.get(self.seg)?;
            let Some(&pos) = state.records.get(self.ord) else {
                self.seg += 1;
                self.ord = 0;
                continue;
            };
            let ord = self.ord;
            self.ord += 1;
            if state.is_consumed(ord) {
                continue;
            }
            let payload = if self.verify {
                state.payload(&self.log.stage, ord)
            } else {
                state.payload_verified_at_open(&self.log.stage, ord)
            };
            return Some(payload.map(|p| (state.offset_of(pos as usize), p)));
        }
    }
}
