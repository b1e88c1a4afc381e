//! [`Message`]: one application message, shared by reference count from the socket it arrived on
//! to every subscriber on every shard, and the per-subscriber [`Delivery`] that points at it.
//!
//! Owner: none (immutable, `Arc`-shared across shards). Invariant: a `Message` is never mutated
//! after routing starts; per-subscriber differences (QoS, retain flag, subscription ids, remaining
//! expiry) live in the `Delivery`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use shardmq_protocol::{Properties, QoS, Utf8};

use crate::mesh::ShardId;
use crate::session::SessionKey;

/// A tenant's id. Tenant 0 is the default tenant used when authentication is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TenantId(pub u32);

/// Which session published a message, for no-local (MQTT-3.8.3-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub shard: ShardId,
    pub session: SessionKey,
}

/// An application message as published. Topic and payload are slices of the publisher's frame.
#[derive(Debug)]
pub struct Message {
    pub tenant: TenantId,
    pub topic: Utf8,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Properties forwarded to subscribers: payload format, content type, response topic,
    /// correlation data, user properties. Message expiry is kept as `expires_at` instead, and
    /// topic alias and subscription identifiers are per delivery. Boxed, and `None` when empty:
    /// `Properties` is ~400 bytes and most messages have none, and queued messages are counted in
    /// millions.
    pub properties: Option<Box<Properties>>,
    /// When the message expires (MQTT 5 message expiry interval), if ever.
    pub expires_at: Option<Instant>,
    pub origin: Option<Origin>,
}

impl Message {
    /// The boxed form of a message's properties: `None` when there are none.
    pub fn boxed_properties(properties: Properties) -> Option<Box<Properties>> {
        (!properties.is_empty()).then(|| Box::new(properties))
    }

    /// True when the message has expired at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Remaining expiry in whole seconds, rounded up, for the property on delivery.
    pub fn expiry_remaining_secs(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX)
        })
    }
}

/// A stored message queued for a session whose bytes stay in the store until the session's
/// connection is ready for it (messages recovered at start-up): a queue of millions of them costs
/// 16 bytes each in memory, and recovery does not decode them. Its expiry is the message's own,
/// checked when the message is read back (recovery drops what expired while the broker was down).
#[derive(Debug, Clone)]
pub struct LazyDelivery {
    /// The id of the `Msg` record in the home shard's store (bits 0-60: ids count up from 1 per
    /// log and never come near 2^61), the delivery's QoS (bits 61-62) and retain flag (bit 63).
    packed: u64,
    /// Subscription identifiers: almost always none, and then no allocation. Boxed on purpose:
    /// a thin pointer is 8 bytes where a `Vec` (or a boxed slice) is 24 (16).
    #[allow(clippy::box_collection)]
    subscription_ids: Option<Box<Vec<u32>>>,
}

const LAZY_ID_BITS: u32 = 61;
const LAZY_ID_MASK: u64 = (1 << LAZY_ID_BITS) - 1;

impl LazyDelivery {
    pub fn new(stored: u64, qos: QoS, retain: bool, subscription_ids: Vec<u32>) -> LazyDelivery {
        debug_assert!(stored <= LAZY_ID_MASK, "message id {stored} does not fit a lazy delivery");
        let packed = (stored & LAZY_ID_MASK) | (qos as u64) << LAZY_ID_BITS | u64::from(retain) << 63;
        let subscription_ids = (!subscription_ids.is_empty()).then(|| Box::new(subscription_ids));
        LazyDelivery { packed, subscription_ids }
    }

    /// A queued delivery put back into the store's keeping (its message stays in the store).
    pub fn from_delivery(delivery: Delivery) -> LazyDelivery {
        LazyDelivery::new(delivery.stored, delivery.qos, delivery.retain, delivery.subscription_ids)
    }

    /// The id of the message's `Msg` record in the home shard's store.
    pub fn stored(&self) -> u64 {
        self.packed & LAZY_ID_MASK
    }

    pub fn qos(&self) -> QoS {
        // Two bits written from a `QoS`: 0, 1 or 2.
        QoS::from_u8((self.packed >> LAZY_ID_BITS) as u8 & 3).unwrap_or(QoS::AtMostOnce)
    }

    pub fn retain(&self) -> bool {
        self.packed >> 63 != 0
    }

    /// The delivery of `msg`, the message this entry stands for, once read from the store.
    pub fn into_delivery(self, msg: Arc<Message>) -> Delivery {
        let (qos, retain, stored) = (self.qos(), self.retain(), self.stored());
        Delivery {
            msg,
            qos,
            retain,
            subscription_ids: self.subscription_ids.map(|ids| *ids).unwrap_or_default(),
            stored,
        }
    }
}

/// One message on its way to one session: the QoS it is delivered at, the retain flag it carries,
/// and the subscription identifiers of the matching subscriptions.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// Id of the message's `Msg` record in the home shard's store when this delivery is stored
    /// (QoS 1/2, or offline QoS 0 when configured, for a persistent session); 0 otherwise.
    pub stored: u64,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_lazy_delivery_is_small_and_keeps_what_it_was_given() {
        // Recovery holds one per queued message of every offline session: millions.
        assert_eq!(std::mem::size_of::<LazyDelivery>(), 16);
        let later = Instant::now() + Duration::from_secs(90);
        let lazy = LazyDelivery::new(7, QoS::ExactlyOnce, true, vec![3, 9]);
        assert_eq!((lazy.stored(), lazy.qos(), lazy.retain()), (7, QoS::ExactlyOnce, true));
        for (id, qos, retain) in [(1, QoS::AtMostOnce, false), (LAZY_ID_MASK, QoS::AtLeastOnce, true)] {
            let l = LazyDelivery::new(id, qos, retain, Vec::new());
            assert_eq!((l.stored(), l.qos(), l.retain()), (id, qos, retain));
        }
        let msg = Arc::new(Message {
            tenant: TenantId::default(),
            topic: shardmq_protocol::Utf8::new("t").unwrap(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: None,
            expires_at: Some(later),
            origin: None,
        });
        let delivery = lazy.into_delivery(msg);
        assert_eq!((delivery.stored, delivery.qos, delivery.retain), (7, QoS::ExactlyOnce, true));
        assert_eq!(delivery.subscription_ids, vec![3, 9]);
        let back = LazyDelivery::from_delivery(delivery);
        assert_eq!((back.stored(), back.qos(), back.retain()), (7, QoS::ExactlyOnce, true));
    }
}
