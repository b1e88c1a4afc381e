//! The sync threads: the writes of committed batches, group-commit flushes, the durable offset,
//! deferred segment deletion and spare segments.
//!
//! Owner: one [`Syncer`] per [`crate::Log`], created by it and stopped (joined) when it drops. Two
//! threads per log are where the log's bytes reach the file and the disk:
//! - the writer does the `pwrite` of each batch the owner commits (`stage.rs`), as soon as it is
//!   committed, and wakes the owner when a written end it asked for is reached
//!   ([`Syncer::notify_when_written`]);
//! - the flusher does the `fdatasync` of written segments per policy (one flush covers every
//!   batch written since the last: group commit), file deletion and directory `fsync`, and the
//!   preparation of the next segment (a preallocated spare file, so that a roll on the owner's
//!   thread is a `rename` and an `mmap`).
//!
//! They are apart so that a write never waits for a flush: an owner that holds output until its
//! records are written (a shard's writer) would otherwise wait for every `fdatasync` under
//! `always`. The owner talks to them through a bounded queue, atomics and unparks, and never waits
//! for them, except in the explicitly blocking [`Syncer::sync_now`] and [`Syncer::wait_durable`],
//! and when the queue is full (below).
//!
//! The write turn: batches are written strictly in commit order, by whoever holds `write_turn`
//! (a mutex held for the `pwrite`s of one pass, never across an `fdatasync`). Normally that is
//! the writer thread. Queue bound: `Config::write_queue_batches` batches. Full policy: the owner
//! writes itself ([`Syncer::submit`]): it takes the write turn (waiting at most for the writer
//! thread's current pass of `pwrite`s), writes every queued batch and its own, in order, and goes
//! on. So a stalled disk slows the owner to the speed of `pwrite`, never to that of `fdatasync`,
//! and memory stays bounded.
//!
//! Invariants:
//! - `written` only grows, is the log offset up to which every batch is in the file (a prefix
//!   of the log in commit order), and is stored (`Release`) after the `pwrite` returned and after
//!   the batch is marked written.
//! - `synced` only grows, and every byte of the log below it was flushed after it was written
//!   (a flush reads `written` first, then `fdatasync`s the segments below it, then publishes).
//! - A segment is unlinked only once `synced` has reached the offset its deletion waits for (the
//!   end of the log when the deletion was asked: whatever made the segment dead is durable
//!   first), and deletions are applied in the order they were requested, each batch followed by
//!   a directory `fsync`.
//! - A segment made from a spare gets its header from its first batch, written in commit order
//!   after every byte of the segments before it; header and name are synced before any of its
//!   records is called durable, and no segment is unlinked while a newer one's header is not
//!   written and synced.
//! - After a failed write, flush or deletion, `failed` is set for good: the kernel may have
//!   dropped the dirty pages, so nothing written after can be called durable. The log refuses
//!   appends.
//!
//! Bounds: the queue holds at most `write_queue_batches` batches (each one staging buffer); the
//! list of segments that may hold unsynced bytes holds the active segment plus those rolled since
//! the last flush (normally one or two); the deletion queue holds at most the log's segment count.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::segment::{self, Segment};
use crate::stage::Batch;
use crate::{DurableNotify, FsyncPolicy, Offset};

#[derive(Debug, Default)]
struct Inner {
    /// Segments that may hold bytes not yet flushed, in offset order. The last one is the active
    /// segment and is never removed from the list by a flush.
    segments: Vec<Arc<Segment>>,
    /// Segments to unlink, each once `synced` reaches its offset.
    deletes: Vec<(u64, Arc<Segment>)>,
    /// A flush target asked for explicitly (deletion under `Never`, or a waiter).
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
    dir: PathBuf,
    /// Committed batches not yet written, in commit order; at most `queue_max`.
    queue: Mutex<VecDeque<Arc<Batch>>>,
    queue_max: usize,
    /// Held while batches are popped and written, so writes happen in commit order.
    write_turn: Mutex<()>,
    /// The end of what is in the file (see the module invariants).
    written: AtomicU64,
    /// The end of what has been flushed.
    synced: AtomicU64,
    /// The durable end at the failure that stopped the log (`u64::MAX` until then): nothing
    /// written or flushed after a failure is called durable.
    frozen: AtomicU64,
    /// A `written` end the owner waits for (0: none): the write that reaches it calls
    /// `on_durable` under every policy (see [`Syncer::notify_when_written`]).
    written_wanted: AtomicU64,
    /// Batches the owner wrote itself because the queue was full.
    owner_writes: AtomicU64,
    failed: AtomicBool,
    inner: Mutex<Inner>,
    progress: Condvar,
    on_durable: Option<DurableNotify>,
    /// The flusher thread, for the writer to wake (set once, right after it is spawned).
    flusher: std::sync::OnceLock<thread::Thread>,
}

/// Locks `mutex`. A panic while holding one of these locks can only come from a broken
/// invariant; the data they guard stays consistent (queues of Arcs and integers), so poisoning
/// is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The state of a log whose records end at `end`, all of it on disk already, with `active`
    /// receiving the next batches.
    fn new(
        policy: FsyncPolicy,
        queue_max: usize,
        dir: PathBuf,
        end: Offset,
        active: Arc<Segment>,
        on_durable: Option<DurableNotify>,
    ) -> Shared {
        Shared {
            policy,
            dir,
            queue: Mutex::new(VecDeque::with_capacity(queue_max)),
            queue_max,
            write_turn: Mutex::new(()),
            written: AtomicU64::new(end.0),
            synced: AtomicU64::new(end.0),
            written_wanted: AtomicU64::new(0),
            frozen: AtomicU64::new(u64::MAX),
            owner_writes: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            inner: Mutex::new(Inner { segments: vec![active], ..Inner::default() }),
            progress: Condvar::new(),
            on_durable,
            flusher: std::sync::OnceLock::new(),
        }
    }

    /// What the policy treats as durable, before a failure freezes it: what was flushed, or
    /// under `Never` everything written to the file.
    fn policy_durable(&self) -> u64 {
        match self.policy {
            FsyncPolicy::Never => self.written.load(Ordering::Acquire),
            _ => self.synced.load(Ordering::Acquire),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Stops the log for good: both threads stop at their next round, the durable end stops where
    /// it is, and the owner is woken (what it holds back for a write is released, and its appends
    /// report the error).
    fn fail(&self, message: String) {
        {
            let mut inner = self.lock();
            inner.error.get_or_insert(message);
            self.frozen.fetch_min(self.policy_durable(), Ordering::AcqRel);
            self.failed.store(true, Ordering::Release);
            self.progress.notify_all();
        }
        if let Some(notify) = &self.on_durable {
            notify(Offset(self.frozen.load(Ordering::Acquire)));
        }
    }

    /// Writes `batch` (the caller holds the write turn, and every batch committed before it is
    /// written), then publishes it. A failed write fails the log, whichever thread wrote.
    fn write(&self, batch: &Batch) -> Result<()> {
        if let Err(e) = batch.seg.write_at(batch.pos, &batch.bytes) {
            self.fail(e.to_string());
            return Err(e);
        }
        batch.mark_written();
        // SeqCst, paired with `notify_when_written`: either the owner sees this end, or this
        // thread sees the owner's wish (no lost wake-up).
        self.written.fetch_max(batch.end.0, Ordering::SeqCst);
        Ok(())
    }

    /// Writes every queued batch (and then `own`, if given) in order, taking the write turn.
    /// Returns whether anything was written. Under `Never` a write is what makes records durable,
    /// so it reports the progress to `on_durable`.
    fn write_queued(&self, own: Option<&Batch>) -> Result<bool> {
        let mut wrote = false;
        {
            let _turn = lock(&self.write_turn);
            loop {
                // Popped one at a time: the owner can commit while this thread writes.
                let Some(batch) = lock(&self.queue).pop_front() else { break };
                self.write(&batch)?;
                wrote = true;
            }
            if let Some(batch) = own {
                self.write(batch)?;
                wrote = true;
            }
        }
        if wrote && self.policy == FsyncPolicy::Never {
            self.progress.notify_all();
            if let Some(notify) = &self.on_durable {
                notify(Offset(self.written.load(Ordering::Acquire)));
            }
        } else if wrote {
            let written = self.written.load(Ordering::SeqCst);
            let wanted = self.written_wanted.load(Ordering::SeqCst);
            let reached = wanted != 0
                && written >= wanted
                && self
                    .written_wanted
                    .compare_exchange(wanted, 0, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok();
            if let (true, Some(notify)) = (reached, &self.on_durable) {
                notify(Offset(written));
            }
        }
        Ok(wrote)
    }

    /// Flushes everything below `target` (at most `written`) that is not flushed yet, then
    /// publishes it.
    fn flush_to(&self, target: u64) -> Result<()> {
        let from = self.synced.load(Ordering::Acquire);
        let target = target.min(self.written.load(Ordering::Acquire));
        if target <= from {
            return Ok(());
        }
        let segments = self.lock().segments.clone();
        for seg in &segments {
            let lo = from.max(seg.base.0);
            let hi = target.min(seg.written_end_offset().0);
            if lo < hi {
                // A segment made from a spare: its header and name first, then its records.
                seg.sync_meta(&self.dir)?;
                seg.sync_data()?;
            }
        }
        let previous = self.synced.fetch_max(target, Ordering::AcqRel);
        {
            let mut inner = self.lock();
            let synced = previous.max(target);
            // A segment leaves the list once it is complete (written up to the next segment's
            // base: its last batch may still be queued for the writer after a roll) and flushed
            // to its end. The active segment never leaves.
            let done: Vec<bool> = inner
                .segments
                .windows(2)
                .map(|pair| {
                    let end = pair[0].written_end_offset();
                    end >= pair[1].base && end.0 <= synced
                })
                .collect();
            let mut done = done.into_iter();
            inner.segments.retain(|_| !done.next().unwrap_or(false));
            self.progress.notify_all();
        }
        if target > previous && self.policy != FsyncPolicy::Never {
            if let Some(notify) = &self.on_durable {
                notify(Offset(target));
            }
        }
        Ok(())
    }

    /// Unlinks the segments whose deletion may go ahead, then syncs the directory.
    ///
    /// Deletions wait until every segment that may not be flushed yet has its own header written,
    /// and then have the headers and names made durable first: otherwise a crash (or power loss)
    /// after the unlink could leave the newest segment with a spare's header (discarded on open)
    /// and no other segment that knows where the log ended, so offsets would be used again. The
    /// header is a committed batch, so a later round writes it.
    fn apply_deletes(&self) -> Result<()> {
        let synced = self.synced.load(Ordering::Acquire);
        let (ready, pending): (Vec<Arc<Segment>>, Vec<Arc<Segment>>) = {
            let mut inner = self.lock();
            if !inner.segments.iter().all(|s| s.header_written()) {
                return Ok(());
            }
            let count = inner.deletes.iter().take_while(|(at, _)| *at <= synced).count();
            let ready: Vec<Arc<Segment>> = inner.deletes.drain(..count).map(|(_, s)| s).collect();
            inner.segments.retain(|s| !ready.iter().any(|r| Arc::ptr_eq(r, s)));
            (ready, inner.segments.clone())
        };
        if ready.is_empty() {
            return Ok(());
        }
        for seg in &pending {
            seg.sync_meta(&self.dir)?;
        }
        for seg in &ready {
            std::fs::remove_file(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
        }
        segment::sync_dir(&self.dir)
    }

    /// One round of the writer thread: writes the queued batches. Returns whether it should stop.
    fn write_round(&self) -> Result<bool> {
        if self.lock().shutdown || self.failed.load(Ordering::Acquire) {
            // Stopping is a crash as far as durability goes: write nothing more. After a failure
            // of either thread, nothing more either (the kernel may have dropped pages).
            return Ok(true);
        }
        if self.write_queued(None)? && self.flusher_wanted() {
            self.unpark_flusher();
        }
        Ok(false)
    }

    /// Whether a write gives the flusher work it would not wake for by itself: every write under
    /// `Always`; otherwise a flush someone waits for or a deletion (whose segment headers and
    /// flush target depend on what is written).
    fn flusher_wanted(&self) -> bool {
        match self.policy {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => {
                let inner = self.lock();
                inner.wanted > self.synced.load(Ordering::Acquire) || !inner.deletes.is_empty()
            }
        }
    }

    fn unpark_flusher(&self) {
        if let Some(t) = self.flusher.get() {
            t.unpark();
        }
    }

    /// One round of the flusher thread: flushes per policy, deletes, prepares the spare. Returns
    /// whether it should stop.
    fn flush_round(&self, next_tick: &mut Instant) -> Result<bool> {
        if self.failed.load(Ordering::Acquire) {
            // The writer failed: flush and delete nothing more.
            return Ok(true);
        }
        if self.lock().shutdown {
            // Flush nothing more; apply only the deletions whose flush already happened.
            self.apply_deletes()?;
            return Ok(true);
        }
        let (wanted, delete_at) = {
            let inner = self.lock();
            (inner.wanted, inner.deletes.iter().map(|(at, _)| *at).max().unwrap_or(0))
        };
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
        Ok(false)
    }

    /// Whether the flusher has nothing to do until it is woken (under `Always`: everything
    /// written is flushed).
    fn flusher_idle(&self) -> bool {
        self.policy != FsyncPolicy::Always
            || self.written.load(Ordering::Acquire) == self.synced.load(Ordering::Acquire)
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

/// Runs `round` until it asks to stop; on an error, fails the log and waits for shutdown.
/// `park` is called after each round; every request (a committed batch, a deletion, an explicit
/// wait, shutdown) unparks the thread it is for after publishing itself, and an unpark before the
/// park makes the park return at once, so no request is missed between a round and the park.
fn run(shared: &Shared, mut round: impl FnMut() -> Result<bool>, mut park: impl FnMut()) {
    loop {
        match round() {
            Ok(true) => return,
            Ok(false) => park(),
            Err(e) => {
                shared.fail(e.to_string());
                // Keep serving shutdown, but write and flush nothing more.
                while !shared.lock().shutdown {
                    thread::park();
                }
                return;
            }
        }
    }
}

/// The writer thread: `pwrite`s committed batches as they come, so that a write never waits for
/// a flush (an owner may hold output until its records are written: `notify_when_written`).
fn run_writer(shared: Arc<Shared>) {
    run(
        &shared,
        || shared.write_round(),
        || {
            if lock(&shared.queue).is_empty() {
                thread::park();
            }
        },
    );
}

/// The flusher thread: `fdatasync` per policy (group commit: one flush covers every batch
/// written since the last), deletions, spare segments.
fn run_flusher(shared: Arc<Shared>) {
    let next_tick = std::cell::Cell::new(Instant::now());
    run(
        &shared,
        || {
            let mut tick = next_tick.get();
            let stop = shared.flush_round(&mut tick);
            next_tick.set(tick);
            stop
        },
        || {
            if shared.flusher_idle() {
                match shared.policy {
                    FsyncPolicy::Interval(_) => {
                        thread::park_timeout(next_tick.get().saturating_duration_since(Instant::now()));
                    }
                    FsyncPolicy::Always | FsyncPolicy::Never => thread::park(),
                }
            }
        },
    );
}

/// The log's handle on its sync threads (the writer and the flusher).
pub(crate) struct Syncer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
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
    /// (it was just recovered or created), with `active` receiving the next batches.
    pub(crate) fn start(
        policy: FsyncPolicy,
        queue_max: usize,
        dir: PathBuf,
        end: Offset,
        active: Arc<Segment>,
        on_durable: Option<DurableNotify>,
    ) -> Result<Syncer> {
        let shared = Arc::new(Shared::new(policy, queue_max, dir.clone(), end, active, on_durable));
        let mut syncer = Syncer { shared: Arc::clone(&shared), threads: Vec::with_capacity(2) };
        let writer_shared = Arc::clone(&shared);
        let writer = thread::Builder::new()
            .name("shardmq-log-write".into())
            .spawn(move || run_writer(writer_shared))
            .map_err(|e| Error::io(&dir, e))?;
        syncer.threads.push(writer);
        let flusher_shared = Arc::clone(&shared);
        // Set right after the spawn, possibly after the flusher's first round: harmless, because
        // nothing can ask for the flusher (a commit, a deletion, a wait) before `start` returns.
        let flusher = thread::Builder::new()
            .name("shardmq-log-sync".into())
            .spawn(move || run_flusher(flusher_shared))
            .map_err(|e| Error::io(&dir, e))?;
        let _ = shared.flusher.set(flusher.thread().clone());
        syncer.threads.push(flusher);
        Ok(syncer)
    }

    fn unpark_writer(&self) {
        if let Some(t) = self.threads.first() {
            t.thread().unpark();
        }
    }

    fn unpark_flusher(&self) {
        self.shared.unpark_flusher();
    }

    /// Hands a committed batch to the sync thread, which writes it (and, per policy, flushes it).
    /// Never blocks while the queue has room. When it is full, the owner writes itself: every
    /// queued batch and then `batch`, in order (see the module documentation); an error then is
    /// the write's, and fails the log.
    pub(crate) fn submit(&self, batch: Arc<Batch>) -> Result<()> {
        {
            let mut queue = lock(&self.shared.queue);
            if queue.len() < self.shared.queue_max {
                queue.push_back(batch);
                drop(queue);
                self.unpark_writer();
                return Ok(());
            }
        }
        self.shared.owner_writes.fetch_add(1, Ordering::Relaxed);
        self.shared.write_queued(Some(&batch))?;
        // The flusher may have work (a flush under `Always`) that this write created.
        self.unpark_flusher();
        Ok(())
    }

    /// Writes every committed batch on the calling thread. Blocking.
    pub(crate) fn write_committed(&self) -> Result<()> {
        self.check()?;
        self.shared.write_queued(None).map(|_| ())
    }

    /// Registers a new active segment (before anything is written to it).
    pub(crate) fn add_segment(&self, seg: Arc<Segment>) {
        self.shared.lock().segments.push(seg);
    }

    /// Asks for `seg` to be unlinked once everything below `after` is flushed. Never blocks.
    pub(crate) fn delete_after(&self, seg: Arc<Segment>, after: Offset) {
        {
            let mut inner = self.shared.lock();
            inner.deletes.push((after.0, seg));
        }
        self.unpark_flusher();
    }

    /// Asks the sync thread to prepare a spare segment of `size_bytes` for the next roll. Never
    /// blocks.
    pub(crate) fn request_spare(&self, size_bytes: usize) {
        self.shared.lock().spare_size_bytes = size_bytes;
        self.unpark_flusher();
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
    /// everything written to the file.
    pub(crate) fn durable(&self) -> Offset {
        Offset(self.shared.policy_durable().min(self.shared.frozen.load(Ordering::Acquire)))
    }

    /// The end of what is in the file (survives a crash of the process).
    pub(crate) fn written(&self) -> Offset {
        Offset(self.shared.written.load(Ordering::Acquire))
    }

    /// Returns true if everything below `offset` is in the file. Otherwise arranges for the
    /// write that gets it there to call `on_durable` (also under the policies where that write
    /// makes nothing durable), and returns false. Never blocks. One wish at a time: a later call
    /// replaces it, so the owner asks for the smallest end it waits for.
    pub(crate) fn notify_when_written(&self, offset: Offset) -> bool {
        if self.shared.written.load(Ordering::SeqCst) >= offset.0 {
            return true;
        }
        self.shared.written_wanted.store(offset.0, Ordering::SeqCst);
        // A write that finished between the load above and the store did not see the wish.
        self.shared.written.load(Ordering::SeqCst) >= offset.0
    }

    /// The end of what was actually flushed (under every policy).
    pub(crate) fn synced(&self) -> Offset {
        Offset(self.shared.synced.load(Ordering::Acquire))
    }

    /// Batches the owner wrote itself because the queue was full.
    pub(crate) fn owner_writes(&self) -> u64 {
        self.shared.owner_writes.load(Ordering::Relaxed)
    }

    /// Committed batches not yet taken by the writer.
    pub(crate) fn queue_len(&self) -> usize {
        lock(&self.shared.queue).len()
    }

    /// Whether a write, flush or deletion failed (the log accepts nothing more). One atomic load.
    pub(crate) fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// The error that stopped the log, if a write, flush or deletion failed.
    pub(crate) fn check(&self) -> Result<()> {
        if self.shared.failed.load(Ordering::Acquire) {
            let message = self.shared.lock().error.clone().unwrap_or_default();
            return Err(Error::SyncFailed(message));
        }
        Ok(())
    }

    /// Writes every committed batch and flushes everything written, on the calling thread.
    /// Blocking.
    pub(crate) fn sync_now(&self) -> Result<Offset> {
        self.check()?;
        let result = self.shared.write_queued(None).and_then(|_| {
            let target = self.shared.written.load(Ordering::Acquire);
            self.shared.flush_to(target).map(|()| Offset(target))
        });
        if let Err(e) = &result {
            self.shared.fail(e.to_string());
        }
        result
    }

    /// Blocks until everything below `offset` (committed already) is flushed, or `timeout`
    /// passes. Returns whether it was flushed. For callers that may block (tests, tools); a shard
    /// polls instead.
    pub(crate) fn wait_durable(&self, offset: Offset, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        {
            let mut inner = self.shared.lock();
            inner.wanted = inner.wanted.max(offset.0);
        }
        self.unpark_flusher();
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

    /// Stops the thread after it has applied the deletions whose flush already happened. Writes
    /// and flushes nothing more: stopping without a prior `sync_now` is a crash of the process as
    /// far as durability goes (batches still queued are lost; the tests use it as one).
    /// Idempotent.
    pub(crate) fn stop(&mut self) {
        self.shared.lock().shutdown = true;
        self.unpark_writer();
        self.unpark_flusher();
        for t in self.threads.drain(..) {
            // A panic on a sync thread is a broken invariant; it was already reported there.
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::SEGMENT_HEADER_LEN_BYTES;
    use crate::SegmentId;

    /// A segment whose last batch is still queued for the writer after a roll (written up to 100
    /// of its 200 bytes of records, the next segment starting at 200) stays in the flush list when
    /// a flush reaches its written end, so that its tail is flushed once written; it leaves once
    /// complete and flushed. The list used to drop it at the first flush of its written end (this
    /// test fails with that rule).
    #[test]
    fn a_segment_stays_in_the_flush_list_until_its_tail_is_written_and_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(Segment::create(dir.path(), SegmentId(1), Offset(0), 4096).unwrap());
        let b = Arc::new(Segment::create(dir.path(), SegmentId(2), Offset(200), 4096).unwrap());
        let header = SEGMENT_HEADER_LEN_BYTES;
        a.write_at(header, &[1u8; 100]).unwrap();
        let shared =
            Shared::new(FsyncPolicy::Always, 8, dir.path().to_path_buf(), Offset(0), a.clone(), None);
        shared.lock().segments.push(b);
        shared.written.store(100, Ordering::SeqCst);
        shared.flush_to(100).unwrap();
        assert_eq!(shared.synced.load(Ordering::SeqCst), 100);
        assert!(shared.lock().segments.iter().any(|s| Arc::ptr_eq(s, &a)), "its tail is not written yet");
        // The writer writes the tail; the next flush covers it, and then the segment leaves.
        a.write_at(header + 100, &[2u8; 100]).unwrap();
        shared.written.store(200, Ordering::SeqCst);
        shared.flush_to(200).unwrap();
        assert_eq!(shared.lock().segments.len(), 1, "complete and flushed: only the active segment is left");
    }
}
