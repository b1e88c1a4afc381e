//! One segment file and its read-only shared mapping. All of the crate's `unsafe` lives here.
//!
//! Owner: the [`crate::Log`] that created or opened it; shared (through `Arc`) with the log's sync
//! thread, which writes and flushes it, and with [`crate::Record`] handles, which read it. The
//! mapping stays valid until the last `Arc` is dropped, even after the file is deleted.
//!
//! Writes go through the file (`pwrite`, [`Segment::write_at`]), never through the mapping: the
//! mapping is `PROT_READ`, and shows what was written because a shared mapping and `pwrite` share
//! the page cache.
//!
//! Invariants:
//! - Bytes below `len` (the written end: what has been `pwrite`n to the file) are never written
//!   again while the mapping lives, so any number of threads may read them through the mapping.
//! - Writes are appends at exactly `len`, made by one thread at a time (the holder of the sync
//!   thread's write turn, `sync.rs`); a write is published by storing the new `len` with
//!   `Release` after `pwrite` returned, and readers load it with `Acquire` before they build a
//!   slice, so they never see bytes being written.
//! - The file is preallocated (`posix_fallocate`) to its full size before anything is written, so
//!   a write never needs a block from the file system (no `ENOSPC` after creation).
//! - A segment's file appears under its final name only with a header: either its own, written
//!   and synced before the rename ([`Segment::create`]), or a spare's placeholder (id 0) that the
//!   first batch written to it replaces ([`Segment::from_spare`]); a crash never leaves a
//!   headerless `*.seg`.
//!
//! What it does not protect against: another process truncating or writing the file while it is
//! mapped. The directory is the shard's own; nothing else may write it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::format::{self, SegmentHeader, SEGMENT_HEADER_LEN_BYTES};
use crate::{Offset, SegmentId, FORMAT_VERSION};

/// The file name of segment `id`.
pub(crate) fn file_name(id: SegmentId) -> String {
    format!("{:020}.seg", id.0)
}

/// Parses a segment file name back to its id.
pub(crate) fn parse_file_name(name: &str) -> Option<SegmentId> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(SegmentId)
}

/// The name of the spare segment file that the sync thread prepares ahead of a roll.
pub(crate) const SPARE_FILE_NAME: &str = "spare.tmp";
/// The id in a spare's header: never a real segment's (ids start at 1). A file under a segment's
/// name with this header is a spare whose roll did not become durable (see [`Segment::from_spare`]).
pub(crate) const SPARE_ID: SegmentId = SegmentId(0);

/// Syncs a directory, so that creations, renames and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

/// Opens `path` for reading and writing (created and truncated if `create`) and preallocates it
/// to `size_bytes`. `ENOSPC` is [`Error::DiskFull`] naming `name` (the file's final name).
fn preallocated(path: &Path, name: &Path, size_bytes: usize) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let len = libc::off_t::try_from(size_bytes)
        .map_err(|_| Error::Config(format!("segment size {size_bytes} does not fit off_t")))?;
    // SAFETY: `posix_fallocate` only reads its integer arguments; the descriptor is open and
    // owned by `file` for the duration of the call. Exercised by every test that creates a log.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc == libc::ENOSPC {
        return Err(Error::DiskFull { path: name.to_path_buf() });
    }
    if rc != 0 {
        return Err(Error::io(path, io::Error::from_raw_os_error(rc)));
    }
    Ok(file)
}

/// Maps `capacity` bytes of `file` read-only and shared (`populate`: fault the pages in now).
fn map_read_only(file: &File, path: &Path, capacity: usize, populate: bool) -> Result<MmapRaw> {
    let mut options = MmapOptions::new();
    options.len(capacity);
    if populate {
        options.populate();
    }
    options.map_raw_read_only(file).map_err(|e| Error::io(path, e))
}

/// A segment file and its read-only mapping. See the module documentation for its invariants.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) id: SegmentId,
    pub(crate) base: Offset,
    pub(crate) path: PathBuf,
    /// The file length, which is also the mapping's length.
    capacity: usize,
    /// The written end (a file position): bytes below it are in the file and never change.
    len: AtomicUsize,
    map: MmapRaw,
    /// Written with `pwrite`, synced with `fdatasync`; kept open for the segment's life.
    file: File,
    /// Whether the header and the file's name are known durable. False only for a segment made
    /// from a spare until the sync thread's first flush of it.
    meta_synced: AtomicBool,
}

impl Segment {
    /// Creates segment `id` with records starting at log offset `base`, preallocated to
    /// `size_bytes`, with its header written and synced, under its final name.
    pub(crate) fn create(dir: &Path, id: SegmentId, base: Offset, size_bytes: usize) -> Result<Segment> {
        let path = dir.join(file_name(id));
        let tmp = dir.join(format!("{}.tmp", file_name(id)));
        let result = Self::create_at(&tmp, &path, dir, id, base, size_bytes);
        if result.is_err() {
            // Best effort: a leftover temporary file is also removed by the next open.
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn create_at(
        tmp: &Path,
        path: &Path,
        dir: &Path,
        id: SegmentId,
        base: Offset,
        size_bytes: usize,
    ) -> Result<Segment> {
        let file = preallocated(tmp, path, size_bytes)?;
        let header = format::encode_header(SegmentHeader { id, base });
        file.write_all_at(&header, 0).map_err(|e| Error::io(tmp, e))?;
        file.sync_all().map_err(|e| Error::io(tmp, e))?;
        fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
        sync_dir(dir)?;
        let map = map_read_only(&file, path, size_bytes, false)?;
        Ok(Segment {
            id,
            base,
            path: path.to_path_buf(),
            capacity: size_bytes,
            len: AtomicUsize::new(SEGMENT_HEADER_LEN_BYTES),
            map,
            file,
            meta_synced: AtomicBool::new(true),
        })
    }

    /// Prepares a spare segment file in `dir` (on the sync thread): preallocated to `size_bytes`,
    /// with a spare header (id 0) written and synced. [`Segment::from_spare`] turns it into a
    /// segment without any blocking call.
    pub(crate) fn create_spare(dir: &Path, size_bytes: usize) -> Result<File> {
        let path = dir.join(SPARE_FILE_NAME);
        let result = (|| {
            let file = preallocated(&path, &path, size_bytes)?;
            let header = format::encode_header(SegmentHeader { id: SPARE_ID, base: Offset(0) });
            file.write_all_at(&header, 0).map_err(|e| Error::io(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            Ok(file)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&path);
        }
        result
    }

    /// Makes segment `id` (records from `base`) out of a spare from [`Segment::create_spare`]:
    /// renames the file and maps it. It writes nothing (this runs on the owner's thread): the
    /// real header ([`Segment::header`]) is the first bytes of the first batch written to it, at
    /// file position 0 (so the written end starts at 0), in commit order after every byte of the
    /// segments before it. So a crash of the process can never leave this header on disk while
    /// the end of the previous segment is missing: recovery would find a gap. The header and the
    /// rename become durable when the sync thread first flushes the segment, or before it deletes
    /// any segment ([`Segment::sync_meta`]). A crash before that leaves either `spare.tmp`
    /// (removed on open) or a file under the segment's name with the spare header (holding
    /// nothing durable, discarded on open).
    pub(crate) fn from_spare(file: File, dir: &Path, id: SegmentId, base: Offset) -> Result<Segment> {
        let spare = dir.join(SPARE_FILE_NAME);
        let path = dir.join(file_name(id));
        let capacity = file.metadata().map_err(|e| Error::io(&spare, e))?.len() as usize;
        fs::rename(&spare, &path).map_err(|e| Error::io(&path, e))?;
        let map = map_read_only(&file, &path, capacity, false)?;
        Ok(Segment {
            id,
            base,
            path,
            capacity,
            len: AtomicUsize::new(0),
            map,
            file,
            meta_synced: AtomicBool::new(false),
        })
    }

    /// This segment's header, as it is (or is to be) at file position 0.
    pub(crate) fn header(&self) -> [u8; SEGMENT_HEADER_LEN_BYTES] {
        format::encode_header(SegmentHeader { id: self.id, base: self.base })
    }

    /// Whether the segment's own header is in the file (false only for a segment made from a
    /// spare until its first batch is written).
    pub(crate) fn header_written(&self) -> bool {
        self.len() >= SEGMENT_HEADER_LEN_BYTES
    }

    /// Makes the header and the file's name durable if they may not be yet. Blocking: sync thread.
    pub(crate) fn sync_meta(&self, dir: &Path) -> Result<()> {
        if self.meta_synced.load(Ordering::Acquire) {
            return Ok(());
        }
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        sync_dir(dir)?;
        self.meta_synced.store(true, Ordering::Release);
        Ok(())
    }

    /// Opens and maps an existing segment and checks its header (including that its id matches
    /// `id`, the one in its file name). The records are not scanned: the caller does that with
    /// [`Segment::bytes_for_recovery`] and then calls [`Segment::recovered`].
    ///
    /// A file whose length is not a multiple of the record alignment (only an external truncation
    /// makes one) is extended with zeros to the next multiple, so that every record boundary
    /// within it is aligned.
    ///
    /// Returns `None` for a file with a spare's header: a roll whose first batch was never written
    /// (or never became durable).
    pub(crate) fn open(path: &Path, id: SegmentId) -> Result<Option<Segment>> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(path, e))?;
        let mut len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let corrupt = |reason: String| Error::CorruptHeader { path: path.to_path_buf(), reason };
        if len < SEGMENT_HEADER_LEN_BYTES as u64 {
            return Err(corrupt(format!(
                "file is {len} bytes, shorter than the {SEGMENT_HEADER_LEN_BYTES}-byte header"
            )));
        }
        if len > u32::MAX as u64 {
            return Err(corrupt(format!("file is {len} bytes, larger than a segment can be")));
        }
        let aligned = len.next_multiple_of(format::RECORD_ALIGN_BYTES as u64);
        if aligned != len {
            file.set_len(aligned).map_err(|e| Error::io(path, e))?;
            len = aligned;
        }
        let capacity = len as usize;
        // Pre-fault the whole file in one call: recovery reads all of it, and faulting page by page
        // costs several times more.
        let map = map_read_only(&file, path, capacity, true)?;
        let seg = Segment {
            id,
            base: Offset(0),
            path: path.to_path_buf(),
            capacity,
            len: AtomicUsize::new(SEGMENT_HEADER_LEN_BYTES),
            map,
            file,
            meta_synced: AtomicBool::new(true),
        };
        let header = match format::decode_header(seg.bytes_for_recovery()) {
            Ok(h) => h,
            Err(format::HeaderError::UnsupportedVersion(version)) => {
                return Err(Error::UnsupportedVersion {
                    path: path.to_path_buf(),
                    version,
                    supported: FORMAT_VERSION,
                })
            }
            Err(e) => return Err(corrupt(format!("{e:?}"))),
        };
        if header.id == SPARE_ID {
            return Ok(None);
        }
        if header.id != id {
            return Err(corrupt(format!("header says segment {} but the file name says {}", header.id, id)));
        }
        Ok(Some(Segment { base: header.base, ..seg }))
    }

    /// The whole mapped file, for the recovery scan.
    ///
    /// Only for a segment that is not shared yet (just opened, before any write): the `&mut`-free
    /// signature relies on the caller not writing while the slice lives, which holds because
    /// recovery runs before the segment is handed to anyone.
    pub(crate) fn bytes_for_recovery(&self) -> &[u8] {
        debug_assert_eq!(self.len.load(Ordering::Relaxed), SEGMENT_HEADER_LEN_BYTES);
        // SAFETY: the mapping is `capacity` bytes long and lives as long as `self`. Nothing writes
        // the file while this slice lives: the segment was just opened and has not been shared
        // with the sync thread or any reader, and writes need the owning `Log`, which is still
        // opening. Exercised by `written_bytes_are_read_back_through_a_new_mapping`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.capacity) }
    }

    /// Records the outcome of the recovery scan: `end` is the end of the valid records. Bytes from
    /// `end` up to `dirty_end` (stray bytes of a torn tail) are zeroed and synced, so that a later
    /// append followed by a crash can never make them look like records again.
    ///
    /// # Safety
    /// No slice from [`Segment::bytes_for_recovery`] may be alive (the zeroing changes bytes it
    /// would show), and the segment must not be shared yet (no other thread reads or writes it);
    /// `Log::open` calls it right after the scan.
    pub(crate) unsafe fn recovered(&self, end: usize, dirty_end: usize) -> Result<()> {
        assert!(end >= SEGMENT_HEADER_LEN_BYTES && end <= self.capacity, "recovered end out of bounds");
        let dirty_end = dirty_end.min(self.capacity);
        if dirty_end > end {
            let zeros = vec![0u8; dirty_end - end];
            self.file.write_all_at(&zeros, end as u64).map_err(|e| Error::io(&self.path, e))?;
            self.sync_data()?;
        }
        self.len.store(end, Ordering::Release);
        Ok(())
    }

    /// The file length.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The written end (a file position): what [`Segment::bytes`] may read.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// The log offset at the written end (the base while the header is not written yet).
    pub(crate) fn written_end_offset(&self) -> Offset {
        Offset(self.base.0 + self.len().saturating_sub(SEGMENT_HEADER_LEN_BYTES) as u64)
    }

    /// Reads `len` bytes at file position `at`, which must lie below the written end.
    ///
    /// Panics if the range is not below the written end: that is a broken invariant of the log.
    pub(crate) fn bytes(&self, at: usize, len: usize) -> &[u8] {
        let end = at.checked_add(len).expect("segment range overflows");
        assert!(end <= self.len(), "read of [{at}, {end}) past the written end of {}", self.path.display());
        // SAFETY: [at, end) lies below the written end (asserted above, with the `Acquire` load in
        // `len()` pairing with the `Release` store in `write_at`), so its bytes were in the page
        // cache, which the shared mapping shows, before this load, and are never written again
        // while the mapping lives (module invariant). The mapping is `capacity >= len()` bytes and
        // lives as long as `self`. Exercised by `written_bytes_are_read_back_through_a_new_mapping`
        // and `a_concurrent_writer_never_changes_published_bytes`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at), len) }
    }

    /// Writes `bytes` at file position `at`, which must be the written end, with one `pwrite`
    /// (repeated only if the kernel writes less), then publishes the new written end.
    ///
    /// Called only by the holder of the write turn (`sync.rs`), so writes to a segment never
    /// overlap and are in file order; panics if `at` is not the written end or the bytes do not
    /// fit (a broken invariant of the log). Blocking on the page cache (never on `fsync`).
    pub(crate) fn write_at(&self, at: usize, bytes: &[u8]) -> Result<()> {
        let end = at.checked_add(bytes.len()).expect("segment range overflows");
        assert_eq!(
            at,
            self.len.load(Ordering::Relaxed),
            "write not at the written end of {}",
            self.path.display()
        );
        assert!(end <= self.capacity, "write past the end of {}", self.path.display());
        self.file.write_all_at(bytes, at as u64).map_err(|e| Error::io(&self.path, e))?;
        self.len.store(end, Ordering::Release);
        Ok(())
    }

    /// Flushes the file's written data to stable storage (`fdatasync`; the segment is
    /// preallocated, so its written pages are the only dirty state). Blocking: called by the sync
    /// thread, by recovery, or by an explicit `Log::sync`.
    pub(crate) fn sync_data(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{encode_frame_header, frame_len};

    #[test]
    fn file_names_round_trip() {
        assert_eq!(file_name(SegmentId(42)), "00000000000000000042.seg");
        assert_eq!(parse_file_name("00000000000000000042.seg"), Some(SegmentId(42)));
        assert_eq!(parse_file_name("00000000000000000042.seg.tmp"), None);
        assert_eq!(parse_file_name("42.seg"), None);
        assert_eq!(parse_file_name("0000000000000000004x.seg"), None);
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = encode_frame_header(payload).to_vec();
        f.extend_from_slice(payload);
        f.resize(frame_len(payload.len()), 0);
        f
    }

    /// Exercises every unsafe block but the concurrent read: creation (fallocate), a `pwrite` read
    /// back through the read-only mapping, the recovery slice and the zeroing of a torn tail, then
    /// a reopen that sees the bytes through a fresh mapping.
    #[test]
    fn written_bytes_are_read_back_through_a_new_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), SegmentId(3), Offset(4096), 8192).unwrap();
        assert_eq!(seg.capacity(), 8192);
        let payload = b"hello, segment";
        let at = SEGMENT_HEADER_LEN_BYTES;
        seg.write_at(at, &frame(payload)).unwrap();
        assert_eq!(seg.bytes(at + 8, payload.len()), payload);
        assert_eq!(seg.written_end_offset(), Offset(4096 + frame_len(payload.len()) as u64));
        seg.sync_data().unwrap();
        drop(seg);

        let path = dir.path().join(file_name(SegmentId(3)));
        let seg = Segment::open(&path, SegmentId(3)).unwrap().unwrap();
        assert_eq!(seg.base, Offset(4096));
        let scan = format::scan(seg.bytes_for_recovery(), true, 1 << 20);
        assert_eq!(scan.records, vec![SEGMENT_HEADER_LEN_BYTES as u32]);
        // Pretend bytes up to 1000 were stray: they are zeroed.
        // SAFETY: the scan's slice is gone (`scan` owns its data) and only this test uses `seg`.
        unsafe { seg.recovered(scan.end, 1000) }.unwrap();
        assert_eq!(seg.bytes(at + 8, payload.len()), payload);
        drop(seg);
        let seg = Segment::open(&path, SegmentId(3)).unwrap().unwrap();
        let data = seg.bytes_for_recovery();
        assert!(data[SEGMENT_HEADER_LEN_BYTES + frame_len(payload.len())..].iter().all(|&b| b == 0));
        assert!(matches!(Segment::open(&path, SegmentId(4)), Err(Error::CorruptHeader { .. })));
    }

    /// The read path's unsafe block under a concurrent writer: a reader thread slices the mapping
    /// below the published written end while this thread appends with `write_at`; every frame it
    /// sees is complete and never changes. Bounded: a fixed number of writes.
    #[test]
    fn a_concurrent_writer_never_changes_published_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let seg = std::sync::Arc::new(Segment::create(dir.path(), SegmentId(1), Offset(0), 1 << 20).unwrap());
        let count = 2000usize;
        let reader = {
            let seg = std::sync::Arc::clone(&seg);
            std::thread::spawn(move || {
                let mut seen = 0;
                while seen < count {
                    let end = seg.len();
                    let scan = format::scan(seg.bytes(0, end), false, 1 << 10);
                    assert!(matches!(scan.tail, format::Tail::Clean), "a published frame was incomplete");
                    assert_eq!(scan.end, end);
                    seen = scan.records.len();
                }
            })
        };
        let mut at = SEGMENT_HEADER_LEN_BYTES;
        for i in 0..count {
            let f = frame(&vec![i as u8 | 1; i % 300]);
            seg.write_at(at, &f).unwrap();
            at += f.len();
        }
        reader.join().unwrap();
    }

    /// A spare becomes a segment without a write or a sync; until its first batch is written it
    /// reads back as a spare.
    #[test]
    fn spares_become_segments() {
        let dir = tempfile::tempdir().unwrap();
        let file = Segment::create_spare(dir.path(), 8192).unwrap();
        let seg = Segment::from_spare(file, dir.path(), SegmentId(5), Offset(100)).unwrap();
        assert!(!dir.path().join(SPARE_FILE_NAME).exists());
        assert!(!seg.meta_synced.load(Ordering::Relaxed));
        assert!(!seg.header_written());
        let path = dir.path().join(file_name(SegmentId(5)));
        assert!(Segment::open(&path, SegmentId(5)).unwrap().is_none(), "header not written yet");
        let mut batch = seg.header().to_vec();
        batch.extend_from_slice(&frame(b"in a former spare"));
        seg.write_at(0, &batch).unwrap();
        assert!(seg.header_written());
        seg.sync_meta(dir.path()).unwrap();
        seg.sync_data().unwrap();
        drop(seg);
        let seg = Segment::open(&path, SegmentId(5)).unwrap().unwrap();
        assert_eq!(seg.base, Offset(100));
        assert_eq!(format::scan(seg.bytes_for_recovery(), true, 1 << 20).records.len(), 1);
        drop(seg);
        // A spare under a segment's name (the rename was durable, the header was not).
        let file = Segment::create_spare(dir.path(), 8192).unwrap();
        drop(file);
        fs::rename(dir.path().join(SPARE_FILE_NAME), &path).unwrap();
        assert!(Segment::open(&path, SegmentId(5)).unwrap().is_none());
    }

    #[test]
    #[should_panic(expected = "past the written end")]
    fn reading_past_the_written_end_panics() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), SegmentId(1), Offset(0), 4096).unwrap();
        let _ = seg.bytes(SEGMENT_HEADER_LEN_BYTES, 1);
    }

    #[test]
    #[should_panic(expected = "not at the written end")]
    fn a_write_elsewhere_than_the_written_end_panics() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), SegmentId(1), Offset(0), 4096).unwrap();
        let _ = seg.write_at(SEGMENT_HEADER_LEN_BYTES + 8, &[0; 8]);
    }
}
