//! Per-tenant settings ([`TenantSettings`], from a [`SettingProvider`]) and per-tenant state
//! shared by every shard ([`TenantState`]: connection count and counters, read by `/metrics`).
//!
//! Owner: [`Tenants`] is shared by all shards and the admin thread (`Arc`). Settings are
//! immutable snapshots (`Arc<TenantSettings>`) replaced whole when changed at runtime; a shard
//! reads the current snapshot at each decision (one `RwLock` read of a small map, or the cached
//! `Arc` in its session for per-packet checks). Counters are atomics: no lock on the data path.
//!
//! Bounds: one entry per tenant that connected or has settings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::message::TenantId;

/// What a tenant may do. `None` means "the broker's global setting".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Protocol levels allowed to connect: 3 (3.1), 4 (3.1.1), 5. Others: CONNACK 0x84 / code 1.
    pub allowed_protocol_levels: Option<Vec<u8>>,
    /// Live connections of the tenant across all shards. Beyond: CONNACK 0x97 / code 3.
    pub max_connections: Option<u64>,
    /// Topic levels of a PUBLISH topic or SUBSCRIBE filter. Beyond: 0x90 / 0x8F (3.x: dropped / 0x80).
    pub max_topic_levels: Option<usize>,
    /// Bytes of a topic or filter. Beyond: as for levels.
    pub max_topic_length: Option<usize>,
    /// Subscriptions per session. Beyond: SUBACK 0x97 / 0x80.
    pub max_subscriptions_per_session: Option<usize>,
    /// Largest session expiry granted (seconds); a larger request is cut (v5 says so in CONNACK).
    pub max_session_expiry_secs: Option<u32>,
    /// Receive maximum announced to the tenant's v5 clients.
    pub receive_maximum: Option<u16>,
    /// Whether retained messages are accepted. Off: v5 CONNACK says Retain Available 0 and a
    /// retained PUBLISH is a protocol violation (DISCONNECT 0x9A); 3.x: the retain flag is ignored.
    pub retain_available: Option<bool>,
    /// Messages queued per session (inbox size).
    pub max_queued_messages: Option<usize>,
    /// What happens when a session's inbox is full (`drop-new`, `drop-oldest`, `disconnect`);
    /// the broker's `--queue-full-policy` when absent.
    pub queue_full_policy: Option<crate::config::QueueFullPolicy>,
    /// PUBLISH packets per second per connection; a faster client is throttled (its socket is
    /// not read until its budget refills). 0 or absent: unlimited.
    pub max_publish_rate_per_connection: Option<u32>,
    /// PUBLISH packets per second for the whole tenant (all its connections, across shards),
    /// in one-second windows; a connection that finds the window full is not read until the next.
    pub max_publish_rate_per_tenant: Option<u32>,
    /// Bytes of PUBLISH packets per second per connection; throttled like the message rate.
    pub max_bytes_per_second_per_connection: Option<u32>,
    /// Bytes of PUBLISH packets per second for the whole tenant (across shards), in one-second
    /// windows like the tenant-wide message rate. A single packet larger than a second's worth
    /// waits for an empty window and then passes.
    pub max_bytes_per_second_per_tenant: Option<u64>,
    /// CONNECTs per second for the whole tenant (across shards). Beyond: CONNACK 0x9F / code 3.
    pub max_connect_rate: Option<u32>,
    /// Largest packet the tenant's clients may send (announced in CONNACK). Beyond: v5
    /// DISCONNECT 0x95, 3.x the connection is closed.
    pub max_packet_size: Option<u32>,
    /// Retained messages of the tenant across all shards. Beyond: a new retained topic is not
    /// kept (the message is still delivered; with the store on, a v5 publisher's PUBACK/PUBREC
    /// says 0x97); replacing or deleting an existing one always works. Counted as
    /// `retained_messages`.
    pub max_retained_messages: Option<u64>,
    /// Members of one shared subscription group (`$share/<group>/<filter>`) across all shards.
    /// Beyond: SUBACK 0x97 / 0x80. (Checked before adding: shards subscribing at the same
    /// instant may overshoot by one each.)
    pub max_shared_group_members: Option<u32>,
}

/// Where tenant settings come from.
pub trait SettingProvider: std::fmt::Debug + Send + Sync {
    /// The current settings of `tenant`.
    fn settings(&self, tenant: TenantId) -> Arc<TenantSettings>;
    /// Replaces `tenant`'s settings at runtime (the admin API). Providers that cannot say so.
    fn set(&self, tenant: TenantId, settings: TenantSettings) -> Result<(), String>;
}

/// Settings from the config file, changeable at runtime (kept in memory).
#[derive(Debug, Default)]
pub struct ConfigSettings {
    by_tenant: RwLock<HashMap<TenantId, Arc<TenantSettings>>>,
    default: Arc<TenantSettings>,
}

impl ConfigSettings {
    pub fn new(default: TenantSettings, tenants: HashMap<TenantId, TenantSettings>) -> ConfigSettings {
        ConfigSettings {
            by_tenant: RwLock::new(tenants.into_iter().map(|(t, s)| (t, Arc::new(s))).collect()),
            default: Arc::new(default),
        }
    }
}

/// Checks settings for values that cannot work.
pub fn validate(settings: &TenantSettings) -> Result<(), String> {
    if let Some(levels) = &settings.allowed_protocol_levels {
        if let Some(bad) = levels.iter().find(|l| !(3..=5).contains(*l)) {
            return Err(format!("allowed_protocol_levels: {bad} is not 3, 4 or 5"));
        }
    }
    if settings.receive_maximum == Some(0) {
        return Err("receive_maximum must be at least 1".into());
    }
    if settings.max_queued_messages == Some(0) {
        return Err("max_queued_messages must be at least 1".into());
    }
    if settings.max_packet_size.is_some_and(|size| size < 64) {
        return Err("max_packet_size must be at least 64 bytes".into());
    }
    if settings.max_topic_levels == Some(0) || settings.max_topic_length == Some(0) {
        return Err("max_topic_levels and max_topic_length must be at least 1".into());
    }
    Ok(())
}

impl SettingProvider for ConfigSettings {
    fn settings(&self, tenant: TenantId) -> Arc<TenantSettings> {
        let map = self.by_tenant.read().unwrap_or_else(|e| e.into_inner());
        map.get(&tenant).cloned().unwrap_or_else(|| self.default.clone())
    }

    fn set(&self, tenant: TenantId, settings: TenantSettings) -> Result<(), String> {
        validate(&settings)?;
        self.by_tenant.write().unwrap_or_else(|e| e.into_inner()).insert(tenant, Arc::new(settings));
        Ok(())
    }
}

/// Why something of a tenant was refused or slowed, for the per-tenant counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    ProtocolVersion,
    Connections,
    TopicLevels,
    TopicLength,
    Subscriptions,
    Retain,
    PublishRate,
    ConnectRate,
    PacketSize,
    SharedGroupMembers,
    TenantPublishRate,
    Bandwidth,
    TenantBandwidth,
    RetainedMessages,
}

impl Limit {
    pub const ALL: [Limit; 14] = [
        Limit::ProtocolVersion,
        Limit::Connections,
        Limit::TopicLevels,
        Limit::TopicLength,
        Limit::Subscriptions,
        Limit::Retain,
        Limit::PublishRate,
        Limit::ConnectRate,
        Limit::PacketSize,
        Limit::SharedGroupMembers,
        Limit::TenantPublishRate,
        Limit::Bandwidth,
        Limit::TenantBandwidth,
        Limit::RetainedMessages,
    ];

    /// Its place in [`Limit::ALL`] and in [`TenantState::limited`] (the declaration order).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Limit::ProtocolVersion => "protocol_version",
            Limit::Connections => "connections",
            Limit::TopicLevels => "topic_levels",
            Limit::TopicLength => "topic_length",
            Limit::Subscriptions => "subscriptions",
            Limit::Retain => "retain",
            Limit::PublishRate => "publish_rate",
            Limit::ConnectRate => "connect_rate",
            Limit::PacketSize => "packet_size",
            Limit::SharedGroupMembers => "shared_group_members",
            Limit::TenantPublishRate => "tenant_publish_rate",
            Limit::Bandwidth => "bandwidth",
            Limit::TenantBandwidth => "tenant_bandwidth",
            Limit::RetainedMessages => "retained_messages",
        }
    }
}

/// Members per shared subscription: (group, filter) -> members across shards.
pub type SharedMemberCounts = HashMap<(Arc<str>, Arc<str>), u32>;

/// Why a message was not delivered to a subscriber, for the per-tenant drop counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    QueueFull,
    /// The subscriber is offline and its session keeps nothing (clean, or QoS 0 not queued).
    Offline,
    Expired,
    TooLarge,
    /// The ACL denied the publish.
    Denied,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::QueueFull,
        DropReason::Offline,
        DropReason::Expired,
        DropReason::TooLarge,
        DropReason::Denied,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Offline => "offline",
            DropReason::Expired => "expired",
            DropReason::TooLarge => "too_large",
            DropReason::Denied => "denied",
        }
    }
}

/// One shard's traffic counters of one tenant. Only that shard writes them (so no cache line is
/// shared between cores on the data path); `/metrics` sums the shards' blocks. Aligned to keep
/// neighbouring shards' blocks off each other's cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct TenantTraffic {
    /// PUBLISH packets received from the tenant's clients, by QoS, and their payload bytes.
    pub publishes_in: [AtomicU64; 3],
    pub payload_bytes_in: AtomicU64,
    /// PUBLISH packets sent to the tenant's clients, by QoS, and their payload bytes.
    pub publishes_out: [AtomicU64; 3],
    pub payload_bytes_out: AtomicU64,
    /// Messages not delivered to the tenant's subscribers, by [`DropReason`].
    pub dropped: [AtomicU64; DropReason::ALL.len()],
    /// Gauges refreshed by the shard's sweep (about once a second): the tenant's sessions on the
    /// shard and the messages queued for them.
    pub sessions: AtomicU64,
    pub queued_messages: AtomicU64,
    /// From a QoS 1/2 PUBLISH of the tenant's clients to its PUBACK/PUBREC.
    pub ack_latency: crate::shard::LatencyHistogram,
}

impl TenantTraffic {
    pub fn drop_one(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// A tenant's live state, shared by every shard.
#[derive(Debug)]
pub struct TenantState {
    pub connections: AtomicU64,
    pub connects_total: AtomicU64,
    /// Per-shard traffic counters (see [`TenantTraffic`]), indexed by shard.
    traffic: Box<[TenantTraffic]>,
    /// Retained messages of the tenant, across shards (each shard adds and removes its own).
    pub retained: AtomicU64,
    /// CONNECTs refused by the auth provider. A failure counts under the tenant the provider
    /// names for the client (`AuthProvider::tenant_of`), else under the listener's default tenant.
    pub auth_failures: AtomicU64,
    /// Refusals and throttles by [`Limit`] (indexed as `Limit::ALL`).
    pub limited: [AtomicU64; Limit::ALL.len()],
    /// The tenant-wide publish-rate window (packed as `connect_window`).
    publish_window: AtomicU64,
    /// The tenant-wide bandwidth window: the second (mod 2^24) in the high 24 bits, bytes in the
    /// low 40.
    bytes_window: AtomicU64,
    /// Members per shared subscription (group, filter), across shards (subscribe path only).
    pub shared_members: std::sync::Mutex<SharedMemberCounts>,
    /// The connect-rate window: the second (since the Unix epoch) it counts, and CONNECTs in it.
    connect_window: AtomicU64,
}

impl TenantState {
    /// Counts a CONNECT against a rate of `per_second` in fixed one-second windows shared by all
    /// shards (one atomic: window second in the high 40 bits, count in the low 24). Returns
    /// whether it fits.
    pub fn admit_connect(&self, per_second: u32, now_secs: u64) -> bool {
        admit::<COUNT_BITS>(&self.connect_window, u64::from(per_second), 1, now_secs, false)
    }

    /// Counts a PUBLISH against the tenant-wide publish rate (as [`TenantState::admit_connect`]).
    pub fn admit_publish(&self, per_second: u32, now_secs: u64) -> bool {
        admit::<COUNT_BITS>(&self.publish_window, u64::from(per_second), 1, now_secs, false)
    }

    /// Counts `bytes` of PUBLISH against the tenant-wide bandwidth (one-second windows shared by
    /// all shards). Returns whether they fit; a window with nothing in it admits any amount.
    pub fn admit_bytes(&self, per_second: u64, bytes: u64, now_secs: u64) -> bool {
        admit::<BYTES_BITS>(&self.bytes_window, per_second, bytes, now_secs, true)
    }

    /// Gives back a PUBLISH admitted by [`TenantState::admit_publish`] in second `now_secs` that
    /// another limit then held back (it will be counted again when it goes).
    pub fn unadmit_publish(&self, now_secs: u64) {
        let _ = self.publish_window.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
            let (second, count) = (current >> COUNT_BITS, current & ((1 << COUNT_BITS) - 1));
            (second == now_secs & (u64::MAX >> COUNT_BITS) && count > 0).then(|| current - 1)
        });
    }

    pub fn count(&self, limit: Limit) {
        self.limited[limit.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// A state with a traffic block for each of `shards` shards (at least one).
    fn with_shards(shards: usize) -> TenantState {
        TenantState {
            connections: AtomicU64::new(0),
            connects_total: AtomicU64::new(0),
            traffic: (0..shards.max(1)).map(|_| TenantTraffic::default()).collect(),
            retained: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            limited: Default::default(),
            publish_window: AtomicU64::new(0),
            bytes_window: AtomicU64::new(0),
            shared_members: Default::default(),
            connect_window: AtomicU64::new(0),
        }
    }

    /// Shard `shard`'s traffic block (the last one for a shard beyond the count it was made with).
    pub fn traffic(&self, shard: usize) -> &TenantTraffic {
        &self.traffic[shard.min(self.traffic.len() - 1)]
    }

    /// Every shard's block, for `/metrics`.
    pub fn traffic_blocks(&self) -> &[TenantTraffic] {
        &self.traffic
    }

    /// A sum over the shards' blocks.
    pub fn sum(&self, field: impl Fn(&TenantTraffic) -> &AtomicU64) -> u64 {
        self.traffic.iter().map(|t| field(t).load(Ordering::Relaxed)).sum()
    }
}

impl Default for TenantState {
    /// One traffic block (a single shard).
    fn default() -> TenantState {
        TenantState::with_shards(1)
    }
}

/// Bits of a count window's count (connects, publishes); the second takes the other 40.
const COUNT_BITS: u32 = 24;
/// Bits of a byte window's count; the second (mod 2^24: only equality matters) takes the other 24.
const BYTES_BITS: u32 = 40;

/// One-second window admission on a packed atomic: the window's second (its low `64 - BITS` bits)
/// in the high bits, the amount counted in it in the low `BITS`. Counts `amount` and returns true
/// if it fits `per_second`; with `lone_overdraw`, an empty window admits any amount (a packet
/// larger than a second's worth passes alone).
fn admit<const BITS: u32>(
    window: &AtomicU64,
    per_second: u64,
    amount: u64,
    now_secs: u64,
    lone_overdraw: bool,
) -> bool {
    let mask = (1u64 << BITS) - 1;
    let second = now_secs & (u64::MAX >> BITS);
    let amount = amount.min(mask);
    let mut current = window.load(Ordering::SeqCst);
    loop {
        let used = if current >> BITS == second { current & mask } else { 0 };
        if used + amount > per_second && !(lone_overdraw && used == 0) {
            return false;
        }
        let next = (second << BITS) | (used + amount).min(mask);
        match window.compare_exchange(current, next, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return true,
            Err(seen) => current = seen,
        }
    }
}

/// Settings and state of every tenant.
#[derive(Debug)]
pub struct Tenants {
    pub provider: Arc<dyn SettingProvider>,
    state: RwLock<HashMap<TenantId, Arc<TenantState>>>,
    /// Shards, for the per-shard traffic blocks of each tenant (set at start-up).
    shards: std::sync::atomic::AtomicUsize,
}

impl Tenants {
    pub fn new(provider: Arc<dyn SettingProvider>) -> Tenants {
        Tenants {
            provider,
            state: RwLock::new(HashMap::new()),
            shards: std::sync::atomic::AtomicUsize::new(1),
        }
    }

    /// Sets the shard count before the shards start (states made later get a block per shard).
    pub fn set_shards(&self, shards: usize) {
        self.shards.store(shards, Ordering::Relaxed);
    }

    pub fn settings(&self, tenant: TenantId) -> Arc<TenantSettings> {
        self.provider.settings(tenant)
    }

    /// The tenant's shared state (created on first use).
    pub fn state(&self, tenant: TenantId) -> Arc<TenantState> {
        if let Some(state) = self.state.read().unwrap_or_else(|e| e.into_inner()).get(&tenant) {
            return state.clone();
        }
        let shards = self.shards.load(Ordering::Relaxed);
        let mut map = self.state.write().unwrap_or_else(|e| e.into_inner());
        map.entry(tenant).or_insert_with(|| Arc::new(TenantState::with_shards(shards))).clone()
    }

    /// Every tenant seen so far, with its state (for `/metrics`).
    pub fn all(&self) -> Vec<(TenantId, Arc<TenantState>)> {
        let map = self.state.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = map.iter().map(|(t, s)| (*t, s.clone())).collect();
        all.sort_by_key(|(t, _)| *t);
        all
    }
}

impl Default for Tenants {
    fn default() -> Tenants {
        Tenants::new(Arc::new(ConfigSettings::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_indexed_in_declaration_order() {
        for (position, limit) in Limit::ALL.iter().enumerate() {
            assert_eq!(limit.index(), position, "{limit:?}");
        }
    }

    #[test]
    fn connect_rate_windows() {
        let state = TenantState::default();
        assert!((0..3).all(|_| state.admit_connect(3, 100)));
        assert!(!state.admit_connect(3, 100), "the fourth in the same second");
        assert!(state.admit_connect(3, 101), "a new second starts a new window");
        assert!(state.admit_connect(3, 101));
        assert!(state.admit_connect(3, 101));
        assert!(!state.admit_connect(3, 101));
        assert!(!state.admit_connect(0, 500), "a zero rate admits nothing");
    }

    #[test]
    fn byte_windows_admit_a_lone_oversized_packet() {
        let state = TenantState::default();
        assert!(state.admit_bytes(1000, 600, 7));
        assert!(!state.admit_bytes(1000, 600, 7), "600 more would make 1,200");
        assert!(state.admit_bytes(1000, 400, 7), "exactly the rate");
        assert!(state.admit_bytes(1000, 5000, 8), "an empty window takes any one packet");
        assert!(!state.admit_bytes(1000, 1, 8), "and then nothing more that second");
        // A publish given back is counted again later in the same window.
        assert!(state.admit_publish(1, 9));
        assert!(!state.admit_publish(1, 9));
        state.unadmit_publish(9);
        assert!(state.admit_publish(1, 9));
    }

    #[test]
    fn validation_refuses_settings_that_cannot_work() {
        assert!(validate(&TenantSettings::default()).is_ok());
        for bad in [
            TenantSettings { allowed_protocol_levels: Some(vec![6]), ..Default::default() },
            TenantSettings { receive_maximum: Some(0), ..Default::default() },
            TenantSettings { max_queued_messages: Some(0), ..Default::default() },
            TenantSettings { max_topic_levels: Some(0), ..Default::default() },
            TenantSettings { max_packet_size: Some(10), ..Default::default() },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }
}
