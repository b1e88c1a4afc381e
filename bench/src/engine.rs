//! The thread-per-core load engine: N worker threads, each running its own single-threaded tokio
//! runtime (`current_thread` + `LocalSet`) with one task per MQTT connection.
//!
//! Why this shape: a load generator must not be the bottleneck and must not add scheduling noise
//! to latency. One runtime per thread means no work stealing, no cross-thread wake-ups on the data
//! path and `Rc`/`RefCell` state per thread (a thread's histogram is shared by its tasks without a
//! lock). Underneath, tokio's current-thread runtime is an epoll loop, so this is the "many
//! non-blocking sockets on one epoll per core" design, but each connection's protocol (connect,
//! subscribe, publish windows, the QoS 2 handshake, keep-alive) is written as straight-line async
//! code instead of a hand-rolled state machine. monoio was the other candidate (the broker uses
//! it); its io_uring driver pins a read buffer per in-flight read, which costs memory per idle
//! connection in the `conn` scenario, and its epoll driver offers nothing over tokio's here.
//!
//! Owns: worker threads and their runtimes, the run [`Phase`] broadcast, and connect pacing.
//! Does not own: any scenario logic. Bounds: one task per connection (the caller bounds the
//! connection count); a [`Pacer`] only hands out time slots, it queues nothing.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tokio::sync::watch;

/// Where a run is. Phases only move forward; tasks watch them through a [`PhaseWatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Connecting and subscribing.
    Setup,
    /// Publishers publish (or, in `persist`, the fill).
    Run,
    /// Publishers stop producing and wait for their outstanding acknowledgements.
    StopProducing,
    /// A later step of a multi-step scenario (`persist`: reconnect and drain).
    Drain,
    /// Everyone disconnects and returns.
    Finish,
}

/// The sending side of the phase broadcast, held by the coordinating (main) thread.
pub type PhaseSender = watch::Sender<Phase>;

/// A task's view of the phase.
pub type PhaseWatch = watch::Receiver<Phase>;

/// Waits until the phase is at least `wanted`. Returns the phase reached; if the sender is gone
/// the run is over and this returns [`Phase::Finish`].
pub async fn wait_phase(watch: &mut PhaseWatch, wanted: Phase) -> Phase {
    match watch.wait_for(|phase| *phase >= wanted).await {
        Ok(phase) => *phase,
        Err(_) => Phase::Finish,
    }
}

/// Starts `threads` workers. Worker `index` runs `make(index)` to completion on its own
/// current-thread runtime; the future may hold `Rc` state (it never leaves its thread).
pub fn spawn_workers<T, F, Fut>(threads: usize, make: F) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<T>>>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<T>> + 'static,
{
    let make = Arc::new(make);
    let mut handles = Vec::with_capacity(threads);
    for index in 0..threads {
        let make = Arc::clone(&make);
        let handle = std::thread::Builder::new()
            .name(format!("bench-worker-{index}"))
            .spawn(move || -> anyhow::Result<T> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building a worker runtime")?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, make(index))
            })
            .context("spawning a worker thread")?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Joins every worker, returning their results in index order, or the first error.
pub fn join_workers<T>(handles: Vec<JoinHandle<anyhow::Result<T>>>) -> anyhow::Result<Vec<T>> {
    let mut results = Vec::with_capacity(handles.len());
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(value)) => results.push(value),
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow!("a worker thread panicked"));
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(results),
    }
}

/// How far behind its schedule a [`Pacer`] may catch up in a burst.
const CATCH_UP_MAX: Duration = Duration::from_secs(1);

/// Hands out evenly spaced start times on one worker thread (open-loop pacing of connects).
/// `interval == 0` means "no pacing".
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    next: Cell<Instant>,
}

impl Pacer {
    /// A pacer for `per_sec` events per second on this thread (0 or less: unpaced).
    pub fn new(per_sec: f64) -> Pacer {
        let interval = if per_sec > 0.0 { Duration::from_secs_f64(1.0 / per_sec) } else { Duration::ZERO };
        Pacer { interval, next: Cell::new(Instant::now()) }
    }

    /// Waits for the next slot.
    pub async fn wait(&self) {
        if self.interval.is_zero() {
            return;
        }
        // Slots follow the schedule, not the wake-ups: the timer wheel rounds sleeps up to a
        // millisecond, so clamping each slot to "now" would cap a thread at ~1,000 events/s.
        // A thread more than `CATCH_UP_MAX` behind (a stall) restarts from now rather than burst.
        let now = Instant::now();
        let mut slot = self.next.get();
        if slot + CATCH_UP_MAX < now {
            slot = now;
        }
        self.next.set(slot + self.interval);
        if slot > now {
            tokio::time::sleep_until(slot.into()).await;
        }
    }
}

/// Splits `total` items over `parts` as evenly as possible; part `index` gets `(offset, count)`.
pub fn slice(total: u64, parts: u64, index: u64) -> (u64, u64) {
    let base = total / parts;
    let extra = total % parts;
    let count = base + u64::from(index < extra);
    let offset = index * base + index.min(extra);
    (offset, count)
}

/// Polls `done` every few milliseconds on the coordinating thread, calling `tick` once a second,
/// until it returns true or `timeout` passes. Returns whether `done` became true. This is the
/// coordinator's wait for counters that worker threads bump; the workers themselves never poll.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool, mut tick: impl FnMut()) -> bool {
    let deadline = Instant::now() + timeout;
    let mut next_tick = Instant::now() + Duration::from_secs(1);
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        if now >= next_tick {
            tick();
            next_tick += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_everything_once() {
        for (total, parts) in [(10, 3), (3, 5), (0, 2), (1_000_000, 7)] {
            let mut next = 0;
            for index in 0..parts {
                let (offset, count) = slice(total, parts, index);
                assert_eq!(offset, next);
                next += count;
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn workers_run_local_futures_and_report_errors() {
        let handles = spawn_workers(2, |index| async move {
            let local = std::rc::Rc::new(index);
            tokio::task::yield_now().await;
            if *local == 1 {
                anyhow::bail!("worker one fails");
            }
            Ok(*local)
        })
        .unwrap();
        let error = join_workers(handles).unwrap_err();
        assert!(error.to_string().contains("worker one fails"));
    }
}
