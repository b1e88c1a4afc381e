//! Broker limits and switches shared by every shard (read-only after start-up).
//!
//! Owns: the numbers that bound every per-connection and per-session structure, with their
//! defaults. Does not own: parsing flags or TOML (the binary does that and fills this struct).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{AllowAll, AuthProvider};
use crate::events::{EventCollector, NoEvents};
use crate::listener::ListenerConfig;
use crate::tenants::Tenants;

pub use shardmq_storage::FsyncPolicy;

/// Which io driver a shard's monoio runtime uses. The default is epoll: on this project's 2-core VMs
/// (kernel 6.18) monoio's io_uring driver, even with COOP_TASKRUN or DEFER_TASKRUN, delivered about
/// half the QoS 1 request/ack throughput of epoll and ~15% less QoS 0 fan-in (perf/RESULTS.md),
/// while connect rate and idle memory were on par. io_uring stays one flag away for hosts where it
/// measures better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring with COOP_TASKRUN; fails if the ring cannot be built.
    Uring,
    /// epoll (monoio's legacy driver).
    Epoll,
    /// io_uring when the ring can be built, epoll otherwise.
    Auto,
}

/// What happens when a session's queue of undelivered messages is full. In the config file and
/// the admin API: `"drop-new"`, `"drop-oldest"`, `"disconnect"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueFullPolicy {
    /// Drop the new message (QoS 0 messages are dropped first in every policy).
    DropNew,
    /// Drop the oldest queued message to make room.
    DropOldest,
    /// Disconnect the session's client (v5: reason 0x97 quota exceeded).
    Disconnect,
}

/// Everything a shard needs to know about limits and behaviour. Owner: none (shared read-only).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Number of shards (one thread per core).
    pub cores: usize,
    /// Pin shard threads to cores.
    pub pin_cores: bool,
    /// MQTT listener address; every shard binds it with SO_REUSEPORT. Used when `listeners` is
    /// empty (a single plain TCP listener).
    pub listen: SocketAddr,
    /// The listeners, each with its kind, limits, default tenant and PROXY protocol switch.
    pub listeners: Vec<ListenerConfig>,
    pub io_driver: IoDriver,
    /// Where stored data lives: persistent sessions, their queued messages, retained messages.
    pub data_dir: PathBuf,
    /// Keep persistent sessions and retained messages on disk (`data_dir`). Off: everything is
    /// in memory and lost on restart, and acknowledgements do not wait for the disk.
    pub persistence: bool,
    /// When stored records become durable; QoS 1/2 PUBLISHes are acknowledged only then.
    pub fsync: FsyncPolicy,
    /// Size of each log segment file.
    pub segment_size_bytes: u64,
    /// Most bytes of log segments on disk, across all shards (each shard gets an equal share).
    pub disk_budget_bytes: Option<u64>,
    /// Time a new socket has to send CONNECT.
    pub connect_timeout: Duration,
    /// Largest keep-alive granted; a client asking for more (or for 0) gets this as Server Keep Alive (v5).
    pub keepalive_secs_max: u16,
    /// Largest packet the broker accepts (whole packet, bytes).
    pub packet_size_bytes_max: u32,
    /// Receive maximum announced to v5 clients: QoS 1/2 PUBLISHes they may have unacknowledged.
    pub receive_maximum: u16,
    /// Topic aliases a v5 client may use towards us.
    pub topic_alias_max: u16,
    /// Largest session expiry granted, seconds.
    pub session_expiry_secs_max: u32,
    /// Outgoing QoS 1/2 messages in flight per session when the client sets no receive maximum (3.x).
    pub inflight_count_max: u16,
    /// Queued (not yet sent) messages per session.
    pub queued_messages_max: usize,
    pub queue_full_policy: QueueFullPolicy,
    /// Queue QoS 0 messages for offline persistent sessions (like Mosquitto's queue_qos0_messages).
    pub queue_qos0_offline: bool,
    /// Subscriptions one session may hold; more are refused (v5 SUBACK 0x97, 3.x 0x80).
    pub subscriptions_per_session_max: usize,
    /// Who may connect (and as which tenant), publish and subscribe.
    pub auth: Arc<dyn AuthProvider>,
    /// Per-tenant settings and the tenants' shared state.
    pub tenants: Arc<Tenants>,
    /// Where connection, subscription and drop events go.
    pub events: Arc<dyn EventCollector>,
    /// Topic filters no client may subscribe to or publish on (matched with MQTT wildcards).
    pub denied_topic_filters: Vec<String>,
    /// Retained messages kept, across all shards' partitions (per shard: this / cores).
    pub retained_messages_max: usize,
    /// Bytes the per-connection read buffer starts at; it grows on demand up to the packet size.
    pub read_buffer_bytes_min: usize,
    /// Bytes queued for writing on one connection before the writer stops taking messages.
    pub write_buffer_bytes_max: usize,
    /// Messages one core-to-core ring holds before the sender waits.
    pub mesh_ring_capacity: usize,
    /// Response information prefix returned on request (v5); the client id is appended.
    pub response_information_prefix: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            pin_cores: true,
            listen: "0.0.0.0:1883".parse().expect("static address"),
            listeners: Vec::new(),
            io_driver: IoDriver::Epoll,
            data_dir: PathBuf::from("./shardmq-data"),
            persistence: true,
            fsync: FsyncPolicy::Interval(Duration::from_millis(5)),
            segment_size_bytes: 64 * 1024 * 1024,
            disk_budget_bytes: None,
            connect_timeout: Duration::from_secs(10),
            keepalive_secs_max: 3600,
            packet_size_bytes_max: 1024 * 1024,
            receive_maximum: 1024,
            topic_alias_max: 64,
            session_expiry_secs_max: 7 * 24 * 3600,
            inflight_count_max: 64,
            queued_messages_max: 10_000,
            queue_full_policy: QueueFullPolicy::DropOldest,
            queue_qos0_offline: false,
            subscriptions_per_session_max: 1000,
            auth: Arc::new(AllowAll),
            events: Arc::new(NoEvents),
            tenants: Arc::new(Tenants::default()),
            denied_topic_filters: Vec::new(),
            retained_messages_max: 1_000_000,
            read_buffer_bytes_min: 128,
            write_buffer_bytes_max: 256 * 1024,
            mesh_ring_capacity: 8192,
            response_information_prefix: "reply/".to_string(),
        }
    }
}
