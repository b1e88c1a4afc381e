//! The owner's side of the write path: the staging buffer that appends are framed into, the
//! batches committed to the sync thread but not yet known written, and reads of records that are
//! in either (so [`crate::Log::read`] returns every appended record).
//!
//! Owner: the [`crate::Log`]'s owner (one shard's thread); every mutating call comes through
//! `&mut Log`. A committed [`Batch`] is shared (`Arc`) with the sync thread, which writes it and
//! marks it written; the owner keeps its own reference until then, so the bytes of a record stay
//! readable from memory until they are readable from the file, and recycles the buffer after.
//!
//! Invariants:
//! - The staged bytes belong to one segment (the active one) and start at file position `pos`,
//!   which is the end of the bytes committed before them: batches cover each segment's file
//!   contiguously, in commit order.
//! - A record frame never spans two batches (a frame that does not fit the buffer's remaining
//!   room commits the buffer first), so a read finds a whole frame in one place.
//! - `inflight` holds, in commit order, every committed batch not yet seen written; a batch
//!   leaves it only through [`Stage::reap`], which needs `&mut`, so a slice handed out by
//!   [`Stage::bytes`] outlives any change to it.
//!
//! Bounds: the staging buffer holds at most `buffer_bytes`, or one frame larger than that (a
//! record above the buffer size is staged alone); `inflight` holds at most the sync thread's queue
//! bound plus the batch being written plus those written since the last reap; `free` keeps at
//! most `free_max` recycled buffers (so the memory is that of the queue bound plus two, and
//! steady state allocates nothing).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::segment::Segment;
use crate::{Offset, SegmentId};

/// Bytes committed together: written by one `pwrite` at file position `pos` of `seg`.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) seg: Arc<Segment>,
    pub(crate) pos: usize,
    /// The log offset just after the batch's last record.
    pub(crate) end: Offset,
    pub(crate) bytes: Vec<u8>,
    /// Set (`Release`) by the writer once `bytes` are in the file.
    written: AtomicBool,
}

impl Batch {
    /// Marks the batch written (by the writer, after its `pwrite` returned).
    pub(crate) fn mark_written(&self) {
        self.written.store(true, Ordering::Release);
    }

    fn is_written(&self) -> bool {
        self.written.load(Ordering::Acquire)
    }

    fn slice(&self, seg: SegmentId, at: usize, len: usize) -> Option<&[u8]> {
        slice_at((self.seg.id, self.pos, &self.bytes), seg, at, len)
    }
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Stage {
    buffer_bytes: usize,
    /// The segment the staged bytes belong to (`None` while nothing is staged).
    seg: Option<Arc<Segment>>,
    pos: usize,
    bytes: Vec<u8>,
    end: Offset,
    inflight: VecDeque<Arc<Batch>>,
    free: Vec<Vec<u8>>,
    free_max: usize,
}

impl Stage {
    pub(crate) fn new(buffer_bytes: usize, queue_max: usize) -> Stage {
        Stage {
            buffer_bytes,
            seg: None,
            pos: 0,
            bytes: Vec::with_capacity(buffer_bytes),
            end: Offset(0),
            inflight: VecDeque::with_capacity(queue_max + 2),
            free: Vec::with_capacity(queue_max + 2),
            free_max: queue_max + 2,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.seg.is_none()
    }

    /// Whether `frame_bytes` more would overflow the buffer (and something is staged: a frame
    /// larger than the buffer is staged alone).
    pub(crate) fn is_full_for(&self, frame_bytes: usize) -> bool {
        !self.is_empty() && self.bytes.len() + frame_bytes > self.buffer_bytes
    }

    /// Adds `parts` (one frame, or a new segment's header), padded with zeros to `len`, at file
    /// position `at` of `seg`, which must continue the staged bytes (or start them). `end` is the
    /// log offset after it.
    pub(crate) fn push(&mut self, seg: &Arc<Segment>, at: usize, parts: &[&[u8]], len: usize, end: Offset) {
        match &self.seg {
            None => {
                self.seg = Some(Arc::clone(seg));
                self.pos = at;
            }
            Some(s) => {
                assert!(Arc::ptr_eq(s, seg), "staged bytes span two segments");
                assert_eq!(self.pos + self.bytes.len(), at, "staged bytes are not contiguous");
            }
        }
        let start = self.bytes.len();
        for part in parts {
            self.bytes.extend_from_slice(part);
        }
        assert!(self.bytes.len() - start <= len, "frame larger than its length");
        self.bytes.resize(start + len, 0);
        self.end = end;
    }

    /// Turns the staged bytes into a batch for the sync thread (keeping a reference to serve
    /// reads), or `None` if nothing is staged.
    pub(crate) fn take(&mut self) -> Option<Arc<Batch>> {
        let seg = self.seg.take()?;
        let fresh = self.free.pop().unwrap_or_else(|| Vec::with_capacity(self.buffer_bytes));
        let bytes = std::mem::replace(&mut self.bytes, fresh);
        let batch =
            Arc::new(Batch { seg, pos: self.pos, end: self.end, bytes, written: AtomicBool::new(false) });
        self.inflight.push_back(Arc::clone(&batch));
        Some(batch)
    }

    /// Forgets the committed batches that are written (their bytes are readable from the file
    /// now) and recycles their buffers.
    pub(crate) fn reap(&mut self) {
        while self.inflight.front().is_some_and(|b| b.is_written()) {
            let batch = self.inflight.pop_front().expect("front checked");
            // The writer drops its reference after marking the batch written; if it has not yet
            // (or a reader thread holds one), the buffer is simply not recycled.
            if let Ok(batch) = Arc::try_unwrap(batch) {
                let mut bytes = batch.bytes;
                if self.free.len() < self.free_max && bytes.capacity() <= self.buffer_bytes * 2 {
                    bytes.clear();
                    self.free.push(bytes);
                }
            }
        }
    }

    /// The `len` bytes at file position `at` of segment `seg`, if they are staged or in a batch
    /// not yet reaped.
    pub(crate) fn bytes(&self, seg: SegmentId, at: usize, len: usize) -> Option<&[u8]> {
        if let Some(s) = &self.seg {
            if let Some(staged) = slice_at((s.id, self.pos, &self.bytes), seg, at, len) {
                return Some(staged);
            }
        }
        self.inflight.iter().rev().find_map(|b| b.slice(seg, at, len))
    }
}

/// The `len` bytes at file position `at` of segment `seg` within `bytes`, which hold file
/// positions from `pos` of segment `id`.
fn slice_at(
    (id, pos, bytes): (SegmentId, usize, &[u8]),
    seg: SegmentId,
    at: usize,
    len: usize,
) -> Option<&[u8]> {
    if id != seg {
        return None;
    }
    let rel = at.checked_sub(pos)?;
    bytes.get(rel..rel.checked_add(len)?)
}
