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
/// tens of bytes each in memory, and recovery does not decode them.
#[derive(Debug, Clone)]
pub struct LazyDelivery {
    /// Id of the `Msg` record in the home shard's store.
    pub stored: u64,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub expires_at: Option<Instant>,
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
