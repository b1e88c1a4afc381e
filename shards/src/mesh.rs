//! The mesh: one bounded lock-free ring per ordered pair of shards, with a doorbell per receiver.
//!
//! Owner: shared by all shards (`Arc`); ring (i, j) has exactly one producer, shard i, and one
//! consumer, shard j. Lifecycle: built before the shard threads start, dropped after they stop.
//!
//! Bounds and policy: each ring holds `capacity` messages. [`Mesh::try_send`] hands the message
//! back when the ring is full; the caller (a shard's [`crate::shard::Outbox`]) keeps it in a local
//! backlog and applies back-pressure to the connections feeding it. Nothing here allocates per
//! message beyond the message itself.
//!
//! Doorbell: a receiver that finds every ring empty registers its waker and sets `parked`; a sender
//! that pushes while `parked` is set clears it and wakes the receiver (monoio forwards a cross-thread
//! wake to the owner's eventfd). A busy receiver is never woken, so the ~30 us cost of waking a
//! parked core is paid only when the core really sleeps.
//!
//! Invariant: messages from shard i to shard j are received in the order i sent them.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;

/// A shard's index, `0..cores`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

impl ShardId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Debug, Default)]
struct Doorbell {
    parked: AtomicBool,
    /// Set by [`Mesh::poke`]: the receiver has work that is not on a ring (durable storage).
    poked: AtomicBool,
    waker: AtomicWaker,
}

/// The full mesh of rings for `n` shards carrying messages of type `T`.
#[derive(Debug)]
pub struct Mesh<T> {
    shard_count: usize,
    /// Ring from i to j at `i * shard_count + j`. The diagonal is unused (a shard calls itself directly).
    rings: Vec<ArrayQueue<T>>,
    doorbells: Vec<Doorbell>,
    /// Per shard: how many of its sessions are stored and subscribed. A publisher asks a shard
    /// for a durability answer only when this is non-zero (written by the shard, read by all).
    pub stored_subscribers: Vec<AtomicU32>,
}

impl<T> Mesh<T> {
    /// Builds the mesh for `shard_count` shards with rings of `capacity` messages each.
    pub fn new(shard_count: usize, capacity: usize) -> Arc<Mesh<T>> {
        assert!(shard_count > 0 && capacity > 0);
        let rings = (0..shard_count * shard_count).map(|_| ArrayQueue::new(capacity)).collect();
        let doorbells = (0..shard_count).map(|_| Doorbell::default()).collect();
        let stored_subscribers = (0..shard_count).map(|_| AtomicU32::new(0)).collect();
        Arc::new(Mesh { shard_count, rings, doorbells, stored_subscribers })
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    fn ring(&self, from: ShardId, to: ShardId) -> &ArrayQueue<T> {
        &self.rings[from.index() * self.shard_count + to.index()]
    }

    /// Pushes `msg` onto the ring `from -> to`, ringing the doorbell if `to` is parked. Gives the
    /// message back when the ring is full.
    pub fn try_send(&self, from: ShardId, to: ShardId, msg: T) -> Result<(), T> {
        debug_assert_ne!(from, to, "a shard does not send to itself through the mesh");
        self.ring(from, to).push(msg)?;
        let bell = &self.doorbells[to.index()];
        if bell.parked.load(Ordering::SeqCst) && bell.parked.swap(false, Ordering::SeqCst) {
            bell.waker.wake();
        }
        Ok(())
    }

    /// Wakes shard `to`'s mesh task without a message (from any thread): its store has become
    /// durable further. Costs a wake only when the shard is parked.
    pub fn poke(&self, to: ShardId) {
        let bell = &self.doorbells[to.index()];
        bell.poked.store(true, Ordering::SeqCst);
        if bell.parked.load(Ordering::SeqCst) && bell.parked.swap(false, Ordering::SeqCst) {
            bell.waker.wake();
        }
    }

    /// Free slots on the ring `from -> to`.
    pub fn free_slots(&self, from: ShardId, to: ShardId) -> usize {
        let ring = self.ring(from, to);
        ring.capacity() - ring.len()
    }

    /// Takes up to `budget` messages addressed to `to`, round-robin over senders, calling `handle`
    /// for each. Returns how many were taken.
    pub fn drain(&self, to: ShardId, budget: usize, mut handle: impl FnMut(ShardId, T)) -> usize {
        let mut taken = 0;
        loop {
            let mut progressed = false;
            for from in 0..self.shard_count {
                if from == to.index() {
                    continue;
                }
                let from = ShardId(from as u16);
                // Up to 64 per sender per round keeps batches large and senders fair.
                for _ in 0..64 {
                    if taken >= budget {
                        return taken;
                    }
                    match self.ring(from, to).pop() {
                        Some(msg) => {
                            handle(from, msg);
                            taken += 1;
                            progressed = true;
                        }
                        None => break,
                    }
                }
            }
            if !progressed {
                return taken;
            }
        }
    }

    fn has_pending(&self, to: ShardId) -> bool {
        (0..self.shard_count)
            .any(|from| from != to.index() && !self.ring(ShardId(from as u16), to).is_empty())
    }

    /// Waits until some ring addressed to `to` is non-empty. Called by `to`'s mesh task only.
    pub async fn wait(&self, to: ShardId) {
        let bell = &self.doorbells[to.index()];
        poll_fn(|cx| {
            if self.has_pending(to) || bell.poked.swap(false, Ordering::SeqCst) {
                return Poll::Ready(());
            }
            bell.waker.register(cx.waker());
            bell.parked.store(true, Ordering::SeqCst);
            // Re-check after publishing `parked`: a sender that pushed before seeing it is caught here.
            if self.has_pending(to) || bell.poked.swap(false, Ordering::SeqCst) {
                bell.parked.store(false, Ordering::SeqCst);
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_ring_hands_the_message_back_and_order_is_kept() {
        let mesh = Mesh::<u32>::new(2, 4);
        let (a, b) = (ShardId(0), ShardId(1));
        for i in 0..4 {
            mesh.try_send(a, b, i).unwrap();
        }
        assert_eq!(mesh.try_send(a, b, 99), Err(99));
        assert_eq!(mesh.free_slots(a, b), 0);
        let mut got = Vec::new();
        assert_eq!(mesh.drain(b, 100, |from, m| got.push((from, m))), 4);
        assert_eq!(got, vec![(a, 0), (a, 1), (a, 2), (a, 3)]);
    }

    #[test]
    fn drain_respects_budget() {
        let mesh = Mesh::<u32>::new(3, 16);
        for i in 0..10 {
            mesh.try_send(ShardId(0), ShardId(2), i).unwrap();
            mesh.try_send(ShardId(1), ShardId(2), 100 + i).unwrap();
        }
        let mut count = 0;
        assert_eq!(mesh.drain(ShardId(2), 15, |_, _| count += 1), 15);
        assert_eq!(mesh.drain(ShardId(2), 15, |_, _| count += 1), 5);
        assert_eq!(count, 20);
    }

    #[test]
    fn parked_receiver_is_woken_by_another_thread() {
        let mesh = Mesh::<u64>::new(2, 1024);
        let sender_mesh = mesh.clone();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
        let total: u64 = rt.block_on(async move {
            let sender = std::thread::spawn(move || {
                for i in 0..10_000u64 {
                    let mut msg = i;
                    while let Err(back) = sender_mesh.try_send(ShardId(0), ShardId(1), msg) {
                        msg = back;
                        std::thread::yield_now();
                    }
                }
            });
            let mut sum = 0u64;
            let mut seen = 0u64;
            let mut expected_next = 0u64;
            while seen < 10_000 {
                mesh.wait(ShardId(1)).await;
                mesh.drain(ShardId(1), 256, |_, m| {
                    assert_eq!(m, expected_next);
                    expected_next += 1;
                    sum += m;
                    seen += 1;
                });
            }
            sender.join().unwrap();
            sum
        });
        assert_eq!(total, (0..10_000u64).sum::<u64>());
    }
}
