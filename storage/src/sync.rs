//! The sync thread: group-commit flushes, the durable offset, and deferred segment deletion.
//!
//! Owner: one [`Syncer`] per [`crate::Log`], created by it and stopped (joined) when it drops. The
//! thread is the only place where the log waits on the disk for durability: `msync` of written
//! ranges, file deletion and directory `fsync`, and the preparation of the next segment (a
//! preallocated spare file, so that a roll on the owner's thread is a header write and a rename),
//! and the write-faulting of the active segment's pages a window ahead of the owner's writes. The log's owner talks to it through atomics and
//! an unpark, never waits for it (except in the explicitly blocking [`Syncer::sync_now`] and
//! [`Syncer::wait_durable`]).
//!
//! Invariants:
//! - `synced` only grows, and every byte of the log below it was flushed after it was written
//!   (a flush reads `written` first, then flushes the ranges below it, then publishes).
//! - A segment is unlinked only once `synced` has reached the offset its deletion waits for
//!   (compaction: the end of the copies of its live records), and deletions are applied in the
//!   order they were requested, each batch followed by a directory `fsync`.
//! - A segment made from a spare has its header and name synced before any of its bytes are
//!   flushed, so no record in it is called durable before the segment itself is.
//! - After a failed flush or deletion, `failed` is set for good: the kernel may have dropped the
//!   dirty pages, so nothing written after can be called durable. The log refuses appends.
//!
//! Bounds: the list of segments that may hold unsynced bytes holds the active segment plus those
//! rolled since the last flush (normally one or two); the deletion queue holds at most the log's
//! segment count.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::format::SEGMENT_HEADER_LEN_BYTES;
use crate::segment::{self, Segment};
use crate::{DurableNotify, FsyncPolicy, Offset};

#[derive(Debug, Default)]
struct Inner {
    /// Segments that may hold bytes not yet flushed, in offset order. The last one is the active
    /// segment and is never removed from the list by a flush.
    segments: Vec<Arc<Segment>>,
    /// Segments to unlink, each once `synced` reaches its offset.
    deletes: Vec<(u64, Arc<Segment>)>,
    /// A flush target asked for explicitly (deletion under `Never`, or a nudge).
    wanted: u64,
    shutdown: bool,
    error: Option<String>,
    /// The size of the spare segment the log asked for (0: none wanted), the spare once prepared,
    /// or the error that preparing it met (handed to the log, which then creates segments itself).
    spare_size_bytes: usize,
    spare: Option<File>,
    spare_error: Option<Error>,
}

struct Shared {
    policy: FsyncPolicy,
    prefault_window_bytes: usize,
    dir: PathBuf,
    /// The end of what the log has written (published by the owner after each append).
    written: AtomicU64,
    /// The end of what has been flushed.
    synced: AtomicU64,
    failed: AtomicBool,
    inner: Mutex<Inner>,
    progress: Condvar,
    on_durable: Option<DurableNotify>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock can only come from a broken invariant; the data it
        // guards stays consistent (lists of Arcs and integers), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, message: String) {
        let mut inner = self.lock();
        inner.error.get_or_insert(message);
        self.failed.store(true, Ordering::Release);
        self.progress.notify_all();
    }

    /// Flushes everything below `target` that is not flushed yet, then publishes it.
    fn flush_to(&self, target: u64) -> Result<()> {
        let from = self.synced.load(Ordering::Acquire);
        if target <= from {
            return Ok(());
        }
        let segments = self.lock().segments.clone();
        for seg in &segments {
            let lo = from.max(seg.base.0);
            let hi = target.min(seg.end_offset().0);
            if lo < hi {
                // A segment made from a spare: its header and name first, then its records.
                seg.sync_meta(&self.dir)?;
                let at = |o: u64| SEGMENT_HEADER_LEN_BYTES + (o - seg.base.0) as usize;
                seg.flush(at(lo), at(hi))?;
            }
        }
        let previous = self.synced.fetch_max(target, Ordering::AcqRel);
        {
            let mut inner = self.lock();
            let synced = previous.max(target);
            let keep_from = inner.segments.len().saturating_sub(1);
            let mut i = 0;
            inner.segments.retain(|s| {
                i += 1;
                i > keep_from || s.end_offset().0 > synced
            });
            self.progress.notify_all();
        }
        if target > previous {
            if let Some(notify) = &self.on_durable {
                notify(Offset(target));
            }
        }
        Ok(())
    }

    /// Unlinks the segments whose deletion may go ahead, then syncs the directory.
    fn apply_deletes(&self) -> Result<()> {
        let synced = self.synced.load(Ordering::Acquire);
        let ready: Vec<Arc<Segment>> = {
            let mut inner = self.lock();
            let count = inner.deletes.iter().take_while(|(at, _)| *at <= synced).count();
            let ready: Vec<Arc<Segment>> = inner.deletes.drain(..count).map(|(_, s)| s).collect();
            inner.segments.retain(|s| !ready.iter().any(|r| Arc::ptr_eq(r, s)));
            ready
        };
        if ready.is_empty() {
            return Ok(());
        }
        for seg in &ready {
            std::fs::remove_file(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
        }
        segment::sync_dir(&self.dir)
    }

    /// One round of the thread's work. Returns whether it should stop.
    fn round(&self, next_tick: &mut Instant) -> Result<bool> {
        let (shutdown, wanted, delete_at) = {
            let inner = self.lock();
            (inner.shutdown, inner.wanted, inner.deletes.iter().map(|(at, _)| *at).max().unwrap_or(0))
        };
        if shutdown {
            // Stopping is a crash as far as durability goes: flush nothing more, apply only the
            // deletions whose flush already happened.
            self.apply_deletes()?;
            return Ok(true);
        }
        let written = self.written.load(Ordering::Acquire);
        let mut target = wanted.max(delete_at).min(written);
        match self.policy {
            FsyncPolicy::Always => target = written,
            FsyncPolicy::Interval(interval) => {
                let now = Instant::now();
                if now >= *next_tick {
                    target = written;
                    *next_tick = now + interval;
                }
            }
            FsyncPolicy::Never => {}
        }
        self.flush_to(target)?;
        self.apply_deletes()?;
        self.prepare_spare();
        let active = self.lock().segments.last().cloned();
        if let (Some(seg), true) = (active, self.prefault_window_bytes > 0) {
            seg.prefault(self.prefault_window_bytes);
        }
        Ok(shutdown)
    }

    /// Prepares the spare segment the log asked for, if there is none yet.
    fn prepare_spare(&self) {
        let size = {
            let inner = self.lock();
            let wanted = inner.spare_size_bytes > 0 && inner.spare.is_none() && inner.spare_error.is_none();
            if !wanted || inner.shutdown {
                return;
            }
            inner.spare_size_bytes
        };
        let result = Segment::create_spare(&self.dir, size);
        let mut inner = self.lock();
        match result {
            Ok(file) => inner.spare = Some(file),
            Err(e) => inner.spare_error = Some(e),
        }
        self.progress.notify_all();
    }
}

fn run(shared: Arc<Shared>) {
    let mut next_tick = Instant::now();
    loop {
        match shared.round(&mut next_tick) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                shared.fail(e.to_string());
                // Keep serving shutdown, but flush nothing more.
                while !shared.lock().shutdown {
                    thread::park();
                }
                return;
            }
        }
        // Every request (append under `Always`, deletion, explicit wait, shutdown) unparks after
        // publishing itself, and an unpark before the park makes the park return at once, so no
        // request is missed between the round above and the park below.
        match shared.policy {
            FsyncPolicy::Always => {
                if shared.written.load(Ordering::Acquire) == shared.synced.load(Ordering::Acquire) {
                    thread::park();
                }
            }
            FsyncPolicy::Interval(_) => {
                thread::park_timeout(next_tick.saturating_duration_since(Instant::now()));
            }
            FsyncPolicy::Never => thread::park(),
        }
    }
}

/// The log's handle on its sync thread.
pub(crate) struct Syncer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer")
            .field("policy", &self.shared.policy)
            .field("written", &self.shared.written.load(Ordering::Relaxed))
            .field("synced", &self.shared.synced.load(Ordering::Relaxed))
            .finish()
    }
}

impl Syncer {
    /// Starts the sync thread for a log whose records end at `end`, all of it on disk already
    /// (it was just recovered or created), with `segments` (in order) possibly receiving appends.
    pub(crate) fn start(
        policy: FsyncPolicy,
        prefault_window_bytes: usize,
        dir: PathBuf,
        end: Offset,
        active: Arc<Segment>,
        on_durable: Option<DurableNotify>,
    ) -> Result<Syncer> {
        let shared = Arc::new(Shared {
            policy,
            prefault_window_bytes,
            dir: dir.clone(),
            written: AtomicU64::new(end.0),
            synced: AtomicU64::new(end.0),
            failed: AtomicBool::new(false),
            inner: Mutex::new(Inner { segments: vec![active], ..Inner::default() }),
            progress: Condvar::new(),
            on_durable,
        });
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("shardmq-log-sync".into())
            .spawn(move || run(thread_shared))
            .map_err(|e| Error::io(dir, e))?;
        Ok(Syncer { shared, thread: Some(thread) })
    }

    fn unpark(&self) {
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// Publishes a new end of the written log (after the bytes are in the mapping). Under
    /// `Always` this wakes the sync thread. Never blocks.
    pub(crate) fn written(&self, end: Offset) {
        self.shared.written.store(end.0, Ordering::Release);
        if self.shared.policy == FsyncPolicy::Always {
            self.unpark();
        }
    }

    /// Registers a new active segment (before anything is written to it), and wakes the thread
    /// to prefault its first pages.
    pub(crate) fn add_segment(&self, seg: Arc<Segment>) {
        self.shared.lock().segments.push(seg);
        self.unpark();
    }

    /// Wakes the thread to prefault more of the active segment. Never blocks.
    pub(crate) fn nudge(&self) {
        self.unpark();
    }

    /// Asks for `seg` to be unlinked once everything below `after` is flushed. Never blocks.
    pub(crate) fn delete_after(&self, seg: Arc<Segment>, after: Offset) {
        {
            let mut inner = self.shared.lock();
            inner.deletes.push((after.0, seg));
        }
        self.unpark();
    }

    /// Asks the sync thread to prepare a spare segment of `size_bytes` for the next roll. Never
    /// blocks.
    pub(crate) fn request_spare(&self, size_bytes: usize) {
        self.shared.lock().spare_size_bytes = size_bytes;
        self.unpark();
    }

    /// Takes the spare asked for with [`Syncer::request_spare`]. Blocks only if the sync thread has
    /// not finished preparing it (it had a whole segment's worth of appends to do so).
    pub(crate) fn take_spare(&self) -> Result<File> {
        let mut inner = self.shared.lock();
        loop {
            if let Some(file) = inner.spare.take() {
                inner.spare_size_bytes = 0;
                return Ok(file);
            }
            if let Some(e) = inner.spare_error.take() {
                inner.spare_size_bytes = 0;
                return Err(e);
            }
            if self.shared.failed.load(Ordering::Acquire) || inner.spare_size_bytes == 0 {
                drop(inner);
                self.check()?;
                return Err(Error::SyncFailed("no spare segment was requested".into()));
            }
            inner = self.shared.progress.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The end of what the policy treats as durable: what was flushed, or under `Never`
    /// everything written.
    pub(crate) fn durable(&self) -> Offset {
        match self.shared.policy {
            FsyncPolicy::Never => Offset(self.shared.written.load(Ordering::Acquire)),
            _ => Offset(self.shared.synced.load(Ordering::Acquire)),
        }
    }

    /// The end of what was actually flushed (under every policy).
    pub(crate) fn synced(&self) -> Offset {
        Offset(self.shared.synced.load(Ordering::Acquire))
    }

    /// The error that stopped the log, if a flush or a deletion failed.
    pub(crate) fn check(&self) -> Result<()> {
        if self.shared.failed.load(Ordering::Acquire) {
            let message = self.shared.lock().error.clone().unwrap_or_default();
            return Err(Error::SyncFailed(message));
        }
        Ok(())
    }

    /// Flushes everything written so far on the calling thread. Blocking.
    pub(crate) fn sync_now(&self) -> Result<Offset> {
        self.check()?;
        let target = self.shared.written.load(Ordering::Acquire);
        if let Err(e) = self.shared.flush_to(target) {
            self.shared.fail(e.to_string());
            return Err(e);
        }
        Ok(Offset(target))
    }

    /// Blocks until everything below `offset` is flushed, or `timeout` passes. Returns whether it
    /// was flushed. For callers that may block (tests, tools); a shard polls instead.
    pub(crate) fn wait_durable(&self, offset: Offset, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        {
            let mut inner = self.shared.lock();
            inner.wanted = inner.wanted.max(offset.0);
        }
        self.unpark();
        let mut inner = self.shared.lock();
        loop {
            if self.shared.failed.load(Ordering::Acquire) {
                drop(inner);
                return self.check().map(|()| false);
            }
            if self.shared.synced.load(Ordering::Acquire) >= offset.0 {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            inner =
                self.shared.progress.wait_timeout(inner, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Syncer {
    /// Stops the thread after it has applied the deletions whose flush already happened. Flushes
    /// nothing: stopping without a prior `sync_now` is a crash as far as durability goes (the
    /// tests use it as one). Idempotent.
    pub(crate) fn stop(&mut self) {
        self.shared.lock().shutdown = true;
        self.unpark();
        if let Some(t) = self.thread.take() {
            // A panic on the sync thread is a broken invariant; it was already reported there.
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}
