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
/// 32 bytes each in memory, and recovery does not decode them.
#[derive(Debug, Clone)]
pub struct LazyDelivery {
    /// Id of the `Msg` record in the home shard's store.
    pub stored: u64,
    /// Subscription identifiers: almost always none, and then no allocation. Boxed on purpose:
    /// a thin pointer is 8 bytes where a `Vec` (or a boxed slice) is 24 (16).
    #[allow(clippy::box_collection)]
    subscription_ids: Option<Box<Vec<u32>>>,
    /// When the message expires, as signed nanoseconds from [`deadline_base`]; `i64::MIN`: never.
    expires_at: i64,
    pub qos: QoS,
    pub retain: bool,
}

/// The instant [`LazyDelivery`] deadlines count from (the first use in this process).
fn deadline_base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl LazyDelivery {
    pub fn new(
        stored: u64,
        qos: QoS,
        retain: bool,
        subscription_ids: Vec<u32>,
        expires_at: Option<Instant>,
    ) -> LazyDelivery {
        let base = deadline_base();
        let clamp = |nanos: u128| i64::try_from(nanos).unwrap_or(i64::MAX);
        let expires_at = expires_at.map_or(i64::MIN, |at| match at.checked_duration_since(base) {
            Some(after) => clamp(after.as_nanos()),
            // Before the base (292 years at most): negative, and never the "never" sentinel.
            None => (-clamp(base.duration_since(at).as_nanos())).max(i64::MIN + 1),
        });
        let subscription_ids = (!subscription_ids.is_empty()).then(|| Box::new(subscription_ids));
        LazyDelivery { stored, subscription_ids, expires_at, qos, retain }
    }

    /// A queued delivery put back into the store's keeping (its message stays in the store).
    pub fn from_delivery(delivery: Delivery) -> LazyDelivery {
        let expires_at = delivery.msg.expires_at;
        LazyDelivery::new(
            delivery.stored,
            delivery.qos,
            delivery.retain,
            delivery.subscription_ids,
            expires_at,
        )
    }

    pub fn expires_at(&self) -> Option<Instant> {
        let nanos = std::time::Duration::from_nanos(self.expires_at.unsigned_abs());
        match self.expires_at {
            i64::MIN => None,
            0.. => Some(deadline_base() + nanos),
            _ => Some(deadline_base().checked_sub(nanos).unwrap_or_else(deadline_base)),
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at().is_some_and(|at| at <= now)
    }

    /// The delivery of `msg`, the message this entry stands for, once read from the store.
    pub fn into_delivery(self, msg: Arc<Message>) -> Delivery {
        Delivery {
            msg,
            qos: self.qos,
            retain: self.retain,
            subscription_ids: self.subscription_ids.map(|ids| *ids).unwrap_or_default(),
            stored: self.stored,
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
        assert!(std::mem::size_of::<LazyDelivery>() <= 32, "{}", std::mem::size_of::<LazyDelivery>());
        let now = Instant::now();
        let later = now + Duration::from_secs(90);
        let lazy = LazyDelivery::new(7, QoS::ExactlyOnce, true, vec![3, 9], Some(later));
        assert_eq!(lazy.expires_at(), Some(later));
        assert!(!lazy.is_expired(now));
        assert!(lazy.is_expired(later));
        let never = LazyDelivery::new(8, QoS::AtLeastOnce, false, Vec::new(), None);
        assert_eq!(never.expires_at(), None);
        assert!(!never.is_expired(now + Duration::from_secs(1_000_000)));
        // A deadline before the process's base instant is already past.
        let past = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
        assert!(LazyDelivery::new(9, QoS::AtLeastOnce, false, Vec::new(), Some(past)).is_expired(now));
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
        assert_eq!((back.stored, back.expires_at()), (7, Some(later)));
    }
}
