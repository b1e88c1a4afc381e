//! One segment file and its shared, writable mapping. All of the crate's `unsafe` lives here.
//!
//! Owner: the [`crate::Log`] that created or opened it; shared (through `Arc`) with the log's sync
//! thread, which flushes it, and with [`crate::Record`] handles, which read it. The mapping stays
//! valid until the last `Arc` is dropped, even after the file is deleted.
//!
//! Invariants:
//! - Bytes below `len` (the published end of the records) are never written again while the
//!   mapping lives, so any number of threads may read them.
//! - Only one thread writes, and only at or after `len` ([`Segment::append`] is `unsafe` for that
//!   reason); a write is published by storing the new `len` with `Release`, and readers load it with
//!   `Acquire` before they build a slice, so they never see bytes being written.
//! - The file is preallocated (`posix_fallocate`) to its full size before it is mapped, so a write
//!   through the mapping never needs a block from the file system (no SIGBUS on a full disk).
//! - A segment's file appears under its final name only once its header is written and synced
//!   (it is created as `*.seg.tmp` and renamed), so a crash never leaves a headerless `*.seg`.
//!
//! What it does not protect against: another process truncating or writing the file while it is
//! mapped. The directory is the shard's own; nothing else may write it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use memmap2::{Advice, MmapOptions, MmapRaw};

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

/// A mapped segment file. See the module documentation for its invariants.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) id: SegmentId,
    pub(crate) base: Offset,
    pub(crate) path: PathBuf,
    /// The file length, which is also the mapping's length.
    capacity: usize,
    /// The published end of the records (a file position).
    len: AtomicUsize,
    map: MmapRaw,
    /// Kept open for the segment's life, to sync its header and size ([`Segment::sync_meta`]).
    file: File,
    /// Whether the header and the file's name are known durable. False only for a segment made
    /// from a spare until the sync thread's first flush of it.
    meta_synced: AtomicBool,
    /// File position up to which pages were write-faulted by [`Segment::prefault`]; `usize::MAX`
    /// once prefaulting is found unsupported (so the owner stops asking).
    prefaulted: AtomicUsize,
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map_err(|e| Error::io(tmp, e))?;
        let len = libc::off_t::try_from(size_bytes)
            .map_err(|_| Error::Config(format!("segment size {size_bytes} does not fit off_t")))?;
        // SAFETY: `posix_fallocate` only reads its integer arguments; the descriptor is open and
        // owned by `file` for the duration of the call.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if rc == libc::ENOSPC {
            return Err(Error::DiskFull { path: path.to_path_buf() });
        }
        if rc != 0 {
            return Err(Error::io(tmp, io::Error::from_raw_os_error(rc)));
        }
        let header = format::encode_header(SegmentHeader { id, base });
        file.write_all_at(&header, 0).map_err(|e| Error::io(tmp, e))?;
        file.sync_all().map_err(|e| Error::io(tmp, e))?;
        fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
        sync_dir(dir)?;
        let map = MmapOptions::new().len(size_bytes).map_raw(&file).map_err(|e| Error::io(path, e))?;
        Ok(Segment {
            id,
            base,
            path: path.to_path_buf(),
            capacity: size_bytes,
            len: AtomicUsize::new(SEGMENT_HEADER_LEN_BYTES),
            map,
            file,
            meta_synced: AtomicBool::new(true),
            prefaulted: AtomicUsize::new(0),
        })
    }

    /// Prepares a spare segment file in `dir` (on the sync thread): preallocated to `size_bytes`,
    /// with a spare header (id 0) written and synced. [`Segment::from_spare`] turns it into a
    /// segment without any blocking call.
    pub(crate) fn create_spare(dir: &Path, size_bytes: usize) -> Result<File> {
        let path = dir.join(SPARE_FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let result = (|| {
            let len = libc::off_t::try_from(size_bytes)
                .map_err(|_| Error::Config(format!("segment size {size_bytes} does not fit off_t")))?;
            // SAFETY: `posix_fallocate` only reads its integer arguments; the descriptor is open and
            // owned by `file` for the duration of the call.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
            if rc == libc::ENOSPC {
                return Err(Error::DiskFull { path: path.clone() });
            }
            if rc != 0 {
                return Err(Error::io(&path, io::Error::from_raw_os_error(rc)));
            }
            let header = format::encode_header(SegmentHeader { id: SPARE_ID, base: Offset(0) });
            file.write_all_at(&header, 0).map_err(|e| Error::io(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(file)
    }

    /// Makes segment `id` (records from `base`) out of a spare from [`Segment::create_spare`]:
    /// writes the real header over the spare's, renames the file and maps it. No `fsync` here
    /// (this runs on the owner's thread): the header and the rename become durable when the sync
    /// thread first flushes the segment ([`Segment::sync_meta`]), before any record in it is
    /// called durable. A crash before that leaves either `spare.tmp` (removed on open) or a file
    /// under the segment's name with the spare header (holding nothing durable, discarded on open).
    pub(crate) fn from_spare(file: File, dir: &Path, id: SegmentId, base: Offset) -> Result<Segment> {
        let spare = dir.join(SPARE_FILE_NAME);
        let path = dir.join(file_name(id));
        let capacity = file.metadata().map_err(|e| Error::io(&spare, e))?.len() as usize;
        let header = format::encode_header(SegmentHeader { id, base });
        file.write_all_at(&header, 0).map_err(|e| Error::io(&spare, e))?;
        fs::rename(&spare, &path).map_err(|e| Error::io(&path, e))?;
        let map = MmapOptions::new().len(capacity).map_raw(&file).map_err(|e| Error::io(&path, e))?;
        Ok(Segment {
            id,
            base,
            path,
            capacity,
            len: AtomicUsize::new(SEGMENT_HEADER_LEN_BYTES),
            map,
            file,
            meta_synced: AtomicBool::new(false),
            prefaulted: AtomicUsize::new(0),
        })
    }

    /// Whether the owner's writes have come within half a window of the prefaulted pages, so the
    /// sync thread should be woken to fault more. One relaxed load: called on every append.
    pub(crate) fn wants_prefault(&self, window_bytes: usize) -> bool {
        let done = self.prefaulted.load(Ordering::Relaxed);
        window_bytes > 0 && done < self.capacity && self.len.load(Ordering::Relaxed) + window_bytes / 2 > done
    }

    /// Write-faults the pages from the records' end to a window ahead (`MADV_POPULATE_WRITE`,
    /// Linux 5.14+), on the sync thread: the page-cache allocation, the dirtying of the page and
    /// any dirty-page throttling the kernel applies then happen here instead of in the owner's
    /// first write to each page. It changes no byte of the file. Best effort: if the kernel
    /// refuses, prefaulting stops for this segment and the owner takes its own faults.
    pub(crate) fn prefault(&self, window_bytes: usize) {
        let done = self.prefaulted.load(Ordering::Relaxed);
        if done == usize::MAX {
            return;
        }
        let from = done.max(self.len());
        let to = (self.len() + window_bytes).min(self.capacity);
        if to <= from {
            return;
        }
        match self.map.advise_range(Advice::PopulateWrite, from, to - from) {
            Ok(()) => self.prefaulted.store(to, Ordering::Relaxed),
            Err(_) => self.prefaulted.store(usize::MAX, Ordering::Relaxed),
        }
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
    /// Returns `None` for a file with a spare's header: a roll that did not become durable.
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
        let map =
            MmapOptions::new().len(capacity).populate().map_raw(&file).map_err(|e| Error::io(path, e))?;
        let seg = Segment {
            id,
            base: Offset(0),
            path: path.to_path_buf(),
            capacity,
            len: AtomicUsize::new(SEGMENT_HEADER_LEN_BYTES),
            map,
            file,
            meta_synced: AtomicBool::new(true),
            prefaulted: AtomicUsize::new(0),
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
    /// Only for a segment that is not shared yet (just opened, before any append): the `&mut`-free
    /// signature relies on the caller not appending while the slice lives, which holds because
    /// recovery runs before the segment is handed to anyone.
    pub(crate) fn bytes_for_recovery(&self) -> &[u8] {
        debug_assert_eq!(self.len.load(Ordering::Relaxed), SEGMENT_HEADER_LEN_BYTES);
        // SAFETY: the mapping is `capacity` bytes long and lives as long as `self`. No thread writes
        // to it while this slice lives: the segment was just opened and has not been shared with
        // the sync thread or any reader, and appends need the owning `Log`, which is still opening.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.capacity) }
    }

    /// Records the outcome of the recovery scan: `end` is the end of the valid records. Bytes from
    /// `end` up to `dirty_end` (stray bytes of a torn tail) are zeroed and flushed, so that a later
    /// append followed by a crash can never make them look like records again.
    ///
    /// # Safety
    /// No slice from [`Segment::bytes_for_recovery`] may be alive, and the segment must not be
    /// shared yet (no other thread reads or writes it); `Log::open` calls it right after the scan.
    pub(crate) unsafe fn recovered(&self, end: usize, dirty_end: usize) -> Result<()> {
        assert!(end >= SEGMENT_HEADER_LEN_BYTES && end <= self.capacity, "recovered end out of bounds");
        let dirty_end = dirty_end.min(self.capacity);
        if dirty_end > end {
            // SAFETY: [end, dirty_end) is inside the mapping (checked above). The caller guarantees
            // that no slice of the mapping is alive and that no other thread uses the segment.
            unsafe { std::ptr::write_bytes(self.map.as_mut_ptr().add(end), 0, dirty_end - end) };
            self.map.flush_range(end, dirty_end - end).map_err(|e| Error::io(&self.path, e))?;
        }
        self.len.store(end, Ordering::Release);
        Ok(())
    }

    /// The file length.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The published end of the records (a file position).
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// The log offset just after the last record.
    pub(crate) fn end_offset(&self) -> Offset {
        Offset(self.base.0 + (self.len() - SEGMENT_HEADER_LEN_BYTES) as u64)
    }

    /// Whether a frame of `frame_bytes` fits after the records.
    pub(crate) fn has_room(&self, frame_bytes: usize) -> bool {
        self.len() + frame_bytes <= self.capacity
    }

    /// Reads `len` bytes at file position `at`, which must lie below the published end.
    ///
    /// Panics if the range is not below the published end: that is a broken invariant of the log.
    pub(crate) fn bytes(&self, at: usize, len: usize) -> &[u8] {
        let end = at.checked_add(len).expect("segment range overflows");
        assert!(end <= self.len(), "read of [{at}, {end}) past the published end of {}", self.path.display());
        // SAFETY: [at, end) lies below the published end (asserted above, with the `Acquire` load in
        // `len()` pairing with the `Release` store in `append`), so its bytes were fully written
        // before this load and are never written again while the mapping lives (module invariant).
        // The mapping is `capacity >= len()` bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at), len) }
    }

    /// Writes a record frame (`frame_header` then `payload`) at the published end and publishes
    /// the new end, `frame_bytes` further (the padding is already zero). Returns the frame's
    /// file position.
    ///
    /// # Safety
    /// Only one thread may call `append` on a segment, never concurrently with
    /// [`Segment::recovered`], and never while a slice from [`Segment::bytes_for_recovery`] is
    /// alive; the caller (the owning `Log`, through `&mut self`, after recovery) guarantees it.
    pub(crate) unsafe fn append(&self, frame_header: &[u8], payload: &[u8], frame_bytes: usize) -> usize {
        let at = self.len.load(Ordering::Relaxed);
        assert!(frame_header.len() + payload.len() <= frame_bytes, "frame larger than its length");
        assert!(at + frame_bytes <= self.capacity, "append past the end of {}", self.path.display());
        let base = self.map.as_mut_ptr();
        // SAFETY: [at, at + frame_bytes) is inside the mapping (asserted above) and at or past the
        // published end, so no reader has a slice of it (readers only slice below `len`); the
        // caller guarantees that no other thread writes. The sources are ordinary slices that cannot
        // overlap the mapping's unpublished bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(frame_header.as_ptr(), base.add(at), frame_header.len());
            std::ptr::copy_nonoverlapping(payload.as_ptr(), base.add(at + frame_header.len()), payload.len());
        }
        self.len.store(at + frame_bytes, Ordering::Release);
        at
    }

    /// Flushes file positions [from, to) to stable storage (`msync(MS_SYNC)`, which on Linux is a
    /// range `fdatasync`). Blocking: called by the sync thread, or by explicit `Log::sync`.
    pub(crate) fn flush(&self, from: usize, to: usize) -> Result<()> {
        let to = to.min(self.capacity);
        if to <= from {
            return Ok(());
        }
        self.map.flush_range(from, to - from).map_err(|e| Error::io(&self.path, e))
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

    /// Exercises every unsafe block: creation (fallocate), append through the mapping, reads of
    /// published bytes, the recovery slice and the zeroing of a torn tail, then a reopen that
    /// sees the bytes through a fresh mapping.
    #[test]
    fn mapped_writes_are_read_back_through_a_new_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), SegmentId(3), Offset(4096), 8192).unwrap();
        assert_eq!(seg.capacity(), 8192);
        let payload = b"hello, segment";
        let frame = frame_len(payload.len());
        // SAFETY: this test is the only writer of the segment.
        let at = unsafe { seg.append(&encode_frame_header(payload), payload, frame) };
        assert_eq!(at, SEGMENT_HEADER_LEN_BYTES);
        assert_eq!(seg.bytes(at + 8, payload.len()), payload);
        assert_eq!(seg.end_offset(), Offset(4096 + frame as u64));
        seg.flush(0, seg.len()).unwrap();
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
        assert!(data[SEGMENT_HEADER_LEN_BYTES + frame..].iter().all(|&b| b == 0));
        assert!(matches!(Segment::open(&path, SegmentId(4)), Err(Error::CorruptHeader { .. })));
    }

    /// A spare becomes a segment without a sync; until its first flush it reads back as a spare.
    #[test]
    fn spares_become_segments() {
        let dir = tempfile::tempdir().unwrap();
        let file = Segment::create_spare(dir.path(), 8192).unwrap();
        let seg = Segment::from_spare(file, dir.path(), SegmentId(5), Offset(100)).unwrap();
        assert!(!dir.path().join(SPARE_FILE_NAME).exists());
        assert!(!seg.meta_synced.load(Ordering::Relaxed));
        let payload = b"in a former spare";
        // SAFETY: this test is the only writer of the segment.
        unsafe { seg.append(&encode_frame_header(payload), payload, frame_len(payload.len())) };
        seg.sync_meta(dir.path()).unwrap();
        seg.flush(0, seg.len()).unwrap();
        drop(seg);
        let path = dir.path().join(file_name(SegmentId(5)));
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
    #[should_panic(expected = "past the published end")]
    fn reading_past_the_published_end_panics() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), SegmentId(1), Offset(0), 4096).unwrap();
        let _ = seg.bytes(SEGMENT_HEADER_LEN_BYTES, 1);
    }
}
