//! [`Shard`]: everything one core owns — its sessions, its trie slice, its copy of the interest
//! table, its partition of the retained messages — and the logic that runs on them.
//!
//! Owner: exactly one shard thread (`Rc<RefCell<Shard>>`, never sent). Lifecycle: built when the
//! shard thread starts, dropped when it stops. The I/O tasks in `conn.rs` and `runtime.rs` only
//! feed it: packets in, mesh messages in, timer ticks in; it answers by queueing packets on
//! sessions (whose writers it wakes) and messages on its [`Outbox`].
//!
//! Routing (see ARCHITECTURE.md): a PUBLISH is matched once against the interest table on the shard
//! that read it, sent once to each interested shard, and matched against that shard's trie slice,
//! which queues one [`Delivery`] per subscribed session. The payload is one `Arc<Message>`.
//!
//! Invariants:
//! - The interest table bit for (filter, shard) is set exactly when that shard's trie slice holds
//!   the filter: every slice transition empty <-> non-empty is broadcast to every other shard.
//! - A SUBACK is sent only after every other shard has applied the subscription's interest change,
//!   so a message published anywhere after the SUBACK reaches the new subscriber.
//! - Retained messages for a topic live on shard `hash(topic) mod cores` only.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use shardmq_protocol::topic;
use shardmq_protocol::{
    ConnAck, Connect, Disconnect, Packet, Properties, ProtocolVersion, PubResp, Publish, QoS, ReasonCode,
    RetainHandling, SubAck, Subscribe, UnsubAck, Unsubscribe, Utf8, Will,
};

use crate::admin::{AdminRequest, SessionDetail, SessionSummary, SubscriptionInfo};
use crate::auth::{Action, AuthDecision, EnhancedAuth, Principal};
use crate::config::{BrokerConfig, QueueFullPolicy};
use crate::events::Event;
use crate::mesh::{Mesh, ShardId};
use crate::message::{Delivery, LazyDelivery, Message, Origin, TenantId};
use crate::session::{
    ConnId, Control, FillEvent, FillStats, Inflight, InflightState, PendingAck, Session, SessionKey,
    SessionTable, SubEntry, WillState,
};
use crate::store::records::{stored_publish, SessionRec, StoredWill, Target};
use crate::store::recovery::Recovered;
use crate::store::{Clock, Store};
use crate::tenants::{DropReason, Limit, TenantSettings, TenantState};
use crate::trie::TopicTrie;
use shardmq_storage::Offset;

/// Most shards a broker runs: the interest table keeps one bit per shard.
pub const SHARDS_MAX: usize = 64;

/// A message between shards. Large variants are boxed so a ring slot stays small.
#[derive(Debug)]
pub enum MeshMsg {
    /// Deliver to the receiving shard's direct (non-shared) subscribers. A non-zero token asks
    /// for a [`MeshMsg::Durable`] answer once what the delivery stored is durable.
    Publish(Arc<Message>, u64),
    /// Deliver to one member of a share group on the receiving shard (token as for `Publish`).
    SharedPublish {
        msg: Arc<Message>,
        group: Arc<str>,
        filter: Arc<str>,
        token: u64,
    },
    /// Answers to tokens: (token, stored without failure).
    Durable(Box<Vec<(u64, bool)>>),
    /// A socket whose CONNECT was read by another shard, with the bytes read so far.
    Handoff(Box<Handoff>),
    /// Interest changes that need no answer (unsubscribe, session end).
    Interest(Box<Vec<InterestChange>>),
    /// Interest changes and retained-message queries of a SUBSCRIBE; answered by `SubscribeDone`.
    Subscribe(Box<SubscribeSync>),
    SubscribeDone(Box<SubscribeDone>),
    /// Set (or, with an empty payload, delete) the retained message of the message's topic
    /// (token as for `Publish`).
    RetainSet(Arc<Message>, u64),
}

/// A connection handed to its home shard.
#[derive(Debug)]
pub struct Handoff {
    pub stream: std::net::TcpStream,
    /// The CONNECT the accepting shard decoded.
    pub connect: Box<Connect>,
    /// Bytes read after the CONNECT.
    pub buffered: BytesMut,
    /// The tenant the auth provider placed the client in.
    pub tenant: TenantId,
    /// The client's address (the PROXY header's source when the listener expects one).
    pub peer: Option<std::net::SocketAddr>,
    /// The connection's place on its listener.
    pub slot: Option<crate::listener::ListenerSlot>,
    /// Its TLS and WebSocket state (`None` on plain TCP).
    pub layers: Option<Box<crate::transport::Layers>>,
}

/// The interest of one shard in one filter (or share group on a filter) began or ended.
#[derive(Debug, Clone)]
pub struct InterestChange {
    pub tenant: TenantId,
    pub filter: Arc<str>,
    pub group: Option<Arc<str>>,
    pub add: bool,
}

#[derive(Debug)]
pub struct SubscribeSync {
    pub token: u64,
    pub changes: Vec<InterestChange>,
    /// The subscriber's tenant: its retained-message queries see only that tenant's messages.
    pub tenant: TenantId,
    /// Filters whose retained messages the subscriber wants.
    pub retain_queries: Vec<Arc<str>>,
}

#[derive(Debug)]
pub struct SubscribeDone {
    pub token: u64,
    /// (index into the query list, message)
    pub retained: Vec<(usize, Arc<Message>)>,
}

/// A latency histogram readable from any thread without locks: power-of-two buckets of
/// microseconds (bucket `i` counts values below `2^i` us; the last one is unbounded), a count and
/// a sum, as Prometheus histograms need.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    pub buckets: [AtomicU64; LATENCY_BUCKETS],
    pub count: AtomicU64,
    pub sum_us: AtomicU64,
}

/// Buckets of a [`LatencyHistogram`]: below 1 us, 2 us, ... 2^23 us (8.4 s), and above.
pub const LATENCY_BUCKETS: usize = 25;

impl LatencyHistogram {
    pub fn record(&self, elapsed: Duration) {
        let us = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        let index = (64 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// Counters of one shard, readable from any thread without locks.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub connections: AtomicU64,
    pub connects_total: AtomicU64,
    pub sessions: AtomicU64,
    pub publishes_in: AtomicU64,
    pub publishes_out: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_offline_qos0: AtomicU64,
    pub dropped_expired: AtomicU64,
    pub dropped_too_large: AtomicU64,
    pub dropped_denied: AtomicU64,
    pub malformed_packets: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub mesh_backlog_max: AtomicU64,
    /// Times a reader stopped reading because its client did not read the broker's answers.
    pub reader_backpressure_waits: AtomicU64,
    /// Subscriptions refused because the session had `subscriptions_per_session_max` already.
    pub subscriptions_refused_quota: AtomicU64,
    /// Readers paused by a publish limit, by [`Limit`] (only the rate and bandwidth limits throttle).
    pub throttled: [AtomicU64; Limit::ALL.len()],
    /// From a client's QoS 1/2 PUBLISH to its PUBACK/PUBREC being queued (routing, and waiting
    /// for the message to be durable everywhere it was stored).
    pub ack_latency: LatencyHistogram,
    /// CONNECTs refused by the auth provider (bad credentials or not authorised).
    pub auth_failures: AtomicU64,
    /// PUBLISHes and SUBSCRIBE filters refused by the auth provider's ACL.
    pub acl_denied: AtomicU64,
    /// Records appended to this shard's store, and appends that failed (budget, full disk).
    pub store_appends: AtomicU64,
    pub store_append_failures: AtomicU64,
    /// Client PUBLISHes refused (v5 0x97) or dropped (3.x) because a store could not take them.
    pub publishes_refused_storage: AtomicU64,
    /// Stored sessions and messages recovered at start-up.
    pub recovered_sessions: AtomicU64,
    pub recovered_messages: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A share group's members in one trie-slice entry, with the round-robin cursor.
#[derive(Debug)]
struct SharedMembers {
    group: Arc<str>,
    members: Vec<(SessionKey, SubEntry)>,
    cursor: usize,
}

/// Trie-slice value: the sessions of this shard subscribed to one filter.
#[derive(Debug)]
struct SliceEntry {
    filter: Arc<str>,
    direct: Vec<(SessionKey, SubEntry)>,
    shared: Vec<SharedMembers>,
}

/// Interest-table value: which shards have subscribers to one filter, directly or per share group.
#[derive(Debug)]
struct Interest {
    filter: Arc<str>,
    shards: u64,
    shared: Vec<(Arc<str>, u64, u32)>,
}

/// Messages waiting for a full ring, per destination. Bound: the connection readers stop reading
/// while [`Outbox::backlog_len`] exceeds the configured ring capacity, so the backlog stays within
/// about one ring's worth plus one read buffer of messages.
#[derive(Debug)]
pub struct Outbox {
    me: ShardId,
    mesh: Arc<Mesh<MeshMsg>>,
    backlog: Vec<VecDeque<MeshMsg>>,
    backlog_len: usize,
    waiters: Vec<Waker>,
}

impl Outbox {
    fn new(me: ShardId, mesh: Arc<Mesh<MeshMsg>>) -> Outbox {
        let backlog = (0..mesh.shard_count()).map(|_| VecDeque::new()).collect();
        Outbox { me, mesh, backlog, backlog_len: 0, waiters: Vec::new() }
    }

    /// Sends now if the ring has room and nothing is waiting before it; otherwise queues behind.
    pub fn send(&mut self, to: ShardId, msg: MeshMsg) {
        let queue = &mut self.backlog[to.index()];
        if queue.is_empty() {
            match self.mesh.try_send(self.me, to, msg) {
                Ok(()) => return,
                Err(msg) => queue.push_back(msg),
            }
        } else {
            queue.push_back(msg);
        }
        self.backlog_len += 1;
    }

    /// Moves what fits from the backlog onto the rings; wakes readers waiting for room.
    pub fn flush(&mut self) {
        if self.backlog_len == 0 {
            return;
        }
        for to in 0..self.backlog.len() {
            let queue = &mut self.backlog[to];
            while let Some(msg) = queue.pop_front() {
                match self.mesh.try_send(self.me, ShardId(to as u16), msg) {
                    Ok(()) => self.backlog_len -= 1,
                    Err(msg) => {
                        queue.push_front(msg);
                        break;
                    }
                }
            }
        }
        if self.backlog_len == 0 {
            for waker in self.waiters.drain(..) {
                waker.wake();
            }
        }
    }

    pub fn backlog_len(&self) -> usize {
        self.backlog_len
    }

    /// Registers a reader to be woken when the backlog empties.
    pub fn wait_for_room(&mut self, waker: &Waker) {
        self.waiters.push(waker.clone());
    }
}

/// Connection writers holding output until the shard's log has written up to an offset, in
/// ascending order of that offset, so the nearest is the front and the written ones leave from
/// it. Bound: a writer waits for one end at a time and registers once per wait (`conn.rs`,
/// `wait_written`: other wakes only check again), so there is at most one entry per connection
/// (the listeners' connection limits).
#[derive(Debug, Default)]
struct WrittenWaiters(VecDeque<(Offset, Waker)>);

impl WrittenWaiters {
    /// Adds `waker` for `end`. Ends nearly always arrive in ascending order (they are the log's
    /// end when the writer filled its output); one that does not is put in its place.
    fn register(&mut self, end: Offset, waker: &Waker) {
        if let Some(last) = self.0.back_mut() {
            if last.1.will_wake(waker) {
                last.0 = last.0.max(end);
                return;
            }
        }
        let at = self.0.partition_point(|(e, _)| *e <= end);
        self.0.insert(at, (end, waker.clone()));
    }

    /// The smallest end anyone waits for.
    fn nearest(&self) -> Option<Offset> {
        self.0.front().map(|(end, _)| *end)
    }

    /// Wakes (and forgets) every waiter whose end is at most `written`.
    fn wake_until(&mut self, written: Offset) {
        while self.0.front().is_some_and(|(end, _)| *end <= written) {
            let (_, waker) = self.0.pop_front().expect("front checked");
            waker.wake();
        }
    }
}

/// Who waits for the store to become durable up to an offset.
#[derive(Debug, Clone, Copy)]
enum Waiter {
    /// A pending acknowledgement on this shard.
    Local(u64),
    /// A token of another shard, answered with [`MeshMsg::Durable`].
    Remote(ShardId, u64),
    /// A SUBSCRIBE of this shard whose session snapshot must be durable before its SUBACK.
    Subscribe(u64),
}

/// What a delivery did to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persisted {
    Nothing,
    Appended,
    Failed,
}

/// What the connection task must do after a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Continue,
    /// Close the connection. `Some(reason)`: a v5 DISCONNECT with that reason goes first.
    /// `will`: publish the will (abnormal close).
    Close {
        reason: Option<ReasonCode>,
        will: bool,
    },
}

/// How often a shard refreshes its queue and per-tenant session gauges.
const GAUGE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A connected session's enhanced authentication (see `Shard::enhanced`).
#[derive(Debug)]
struct Enhanced {
    method: Utf8,
    exchange: Option<Box<dyn EnhancedAuth>>,
}

/// The outcome of a CONNECT.
#[derive(Debug)]
pub enum ConnectOutcome {
    Accepted {
        session: SessionKey,
        keepalive_secs: u16,
    },
    /// Refuse with this reason (`conn::refusal_connack`) and close.
    Refused(ReasonCode),
}

/// Timer entries: a session's will or expiry may be due at the instant.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TimerEntry {
    at: Instant,
    session: SessionKey,
}

/// A SUBSCRIBE waiting for the other shards.
#[derive(Debug)]
struct PendingSubscribe {
    session: SessionKey,
    conn: ConnId,
    suback: SubAck,
    waiting: usize,
    /// Per retain query: the subscription it serves.
    queries: Vec<(Arc<str>, SubEntry)>,
    retained: Vec<(usize, Arc<Message>)>,
}

/// One core's broker state. See the module docs.
#[derive(Debug)]
pub struct Shard {
    pub id: ShardId,
    pub cfg: Arc<BrokerConfig>,
    pub stats: Arc<ShardStats>,
    pub sessions: SessionTable,
    /// Per tenant: a topic in one tenant never meets a filter of another (isolation by construction).
    slice: HashMap<TenantId, TopicTrie<SliceEntry>>,
    interest: HashMap<TenantId, TopicTrie<Interest>>,
    retained: HashMap<TenantId, HashMap<Box<str>, Arc<Message>>>,
    retained_count: usize,
    pub outbox: Outbox,
    timers: BinaryHeap<Reverse<TimerEntry>>,
    pending_subscribes: HashMap<u64, PendingSubscribe>,
    next_token: u64,
    next_conn_id: u64,
    /// Reused between publishes: (session, delivery) pairs of one message.
    scratch: Vec<(SessionKey, QoS, bool, Option<u32>)>,
    /// Sockets handed to this shard, waiting for the runtime to spawn their tasks.
    pub handoffs: Vec<Handoff>,
    /// When the per-tenant session and queue gauges are next refreshed, and the tenants the last
    /// refresh saw (to zero the gauges of those that have no sessions here any more).
    sweep_at: Instant,
    swept: HashMap<TenantId, Arc<TenantState>>,
    /// Connected sessions that authenticated with an enhanced method (MQTT 5 AUTH), for
    /// re-authentication: the method, and the exchange of a re-authentication in progress.
    /// Bounded by the live connections; an entry goes when its connection does.
    enhanced: HashMap<SessionKey, Enhanced>,
    /// Keep-alive deadlines of this shard's connections.
    pub keepalive: crate::conn::KeepaliveQueue,
    /// The durable inbox and retained partition of this shard (None without persistence).
    store: Option<Store>,
    /// Tokens of client PUBLISHes waiting for durability -> their session.
    ack_tokens: HashMap<u64, SessionKey>,
    /// Waiting for the store's durable offset to pass an offset, in append order.
    durable_waiters: VecDeque<(Offset, Waiter)>,
    /// Answers to other shards' tokens, sent in one mesh message per shard per batch.
    durable_replies: Vec<Vec<(u64, bool)>>,
    /// Writers holding output back until the log has written up to an offset (see
    /// [`Shard::wait_written`]).
    written_waiters: WrittenWaiters,
    fill_events: Vec<FillEvent>,
    /// Reused between publishes: the deliveries of one message on this shard.
    deliveries: Vec<(SessionKey, Delivery, bool)>,
}

/// Stable hash used for placement (home shard, retained partition): SipHash with fixed keys.
fn placement_hash(value: impl Hash) -> u64 {
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Every subscription of the sessions recovered for one shard, as interest changes (for every
/// shard's interest table at start-up).
pub fn recovered_interest(recovered: &Recovered) -> Vec<InterestChange> {
    let mut changes = Vec::new();
    for session in &recovered.sessions {
        for (filter, _) in &session.rec.subscriptions {
            let shared = topic::parse_shared(filter).ok().flatten();
            changes.push(InterestChange {
                tenant: session.rec.tenant,
                filter: Arc::from(shared.map(|s| s.filter).unwrap_or(filter)),
                group: shared.map(|s| Arc::from(s.group)),
                add: true,
            });
        }
    }
    changes
}

/// The tenant limit a topic or filter breaks (levels, length), if any.
fn topic_limit(settings: &TenantSettings, topic_or_filter: &str) -> Option<Limit> {
    if settings.max_topic_length.is_some_and(|max| topic_or_filter.len() > max) {
        return Some(Limit::TopicLength);
    }
    if settings.max_topic_levels.is_some_and(|max| topic_or_filter.split('/').count() > max) {
        return Some(Limit::TopicLevels);
    }
    None
}

/// The home shard of a session.
pub fn home_shard(tenant: TenantId, client_id: &str, shard_count: usize) -> ShardId {
    ShardId((placement_hash((tenant.0, client_id)) % shard_count as u64) as u16)
}

/// The shard that keeps the retained message of a topic.
pub fn retain_shard(tenant: TenantId, topic: &str, shard_count: usize) -> ShardId {
    ShardId((placement_hash((tenant.0, topic, 0x5245_5441u32)) % shard_count as u64) as u16)
}

impl Shard {
    pub fn new(
        id: ShardId,
        cfg: Arc<BrokerConfig>,
        mesh: Arc<Mesh<MeshMsg>>,
        stats: Arc<ShardStats>,
    ) -> Shard {
        Shard::with_store(id, cfg, mesh, stats, None, &[])
    }

    /// A shard with its store and the state recovered from it. `interest` is every shard's
    /// recovered subscriptions (this shard applies the others'; its own come with its sessions).
    pub fn with_store(
        id: ShardId,
        cfg: Arc<BrokerConfig>,
        mesh: Arc<Mesh<MeshMsg>>,
        stats: Arc<ShardStats>,
        recovered: Option<Recovered>,
        interest: &[(ShardId, InterestChange)],
    ) -> Shard {
        assert!(mesh.shard_count() <= SHARDS_MAX, "at most {SHARDS_MAX} shards");
        let shard_count = mesh.shard_count();
        let mut shard = Shard {
            id,
            cfg,
            stats,
            sessions: SessionTable::default(),
            slice: HashMap::new(),
            interest: HashMap::new(),
            retained: HashMap::new(),
            retained_count: 0,
            outbox: Outbox::new(id, mesh),
            timers: BinaryHeap::new(),
            pending_subscribes: HashMap::new(),
            next_token: 1,
            next_conn_id: 1,
            scratch: Vec::new(),
            handoffs: Vec::new(),
            enhanced: HashMap::new(),
            sweep_at: Instant::now(),
            swept: HashMap::new(),
            keepalive: Default::default(),
            store: None,
            ack_tokens: HashMap::new(),
            durable_waiters: VecDeque::new(),
            durable_replies: vec![Vec::new(); shard_count],
            written_waiters: WrittenWaiters::default(),
            fill_events: Vec::new(),
            deliveries: Vec::new(),
        };
        for (from, change) in interest {
            if *from != id {
                shard.apply_interest(*from, change);
            }
        }
        if let Some(recovered) = recovered {
            shard.install(recovered, Instant::now());
        }
        shard
    }

    /// Installs the sessions, queues and retained messages read back from the store.
    fn install(&mut self, recovered: Recovered, now: Instant) {
        let Recovered { store, sessions, retained } = recovered;
        let clock = Clock::now();
        let mut messages = 0u64;
        for stored in sessions {
            let rec = stored.rec;
            let Ok(client_id) = Utf8::new(&rec.client_id) else { continue };
            let key = self.sessions.insert(rec.tenant, client_id, rec.version);
            bump(&self.stats.sessions, 1);
            let mut changes = Vec::new();
            for (filter, entry) in &rec.subscriptions {
                self.slice_add(rec.tenant, key, filter, entry.clone(), &mut changes);
            }
            let session = self.sessions.get_mut(key).expect("just inserted");
            session.store_uid = rec.uid;
            session.expiry_secs = rec.expiry_secs;
            session.incoming_qos2.extend(stored.incoming_qos2);
            if let Some(stored_will) = rec.will {
                let publish = stored_will.publish;
                let mut properties = publish.properties;
                properties.will_delay_interval =
                    (stored_will.delay_secs > 0).then_some(stored_will.delay_secs);
                let will = Will {
                    topic: publish.topic,
                    payload: publish.payload,
                    qos: publish.qos,
                    retain: publish.retain,
                    properties,
                };
                // A will whose connection was up at the crash: that connection ended at the crash,
                // which this start-up stands for.
                let due = match stored_will.due_at_ms {
                    0 => now + Duration::from_secs(u64::from(stored_will.delay_secs.min(rec.expiry_secs))),
                    ms => clock.to_instant(ms),
                };
                session.will = Some(Box::new(WillState { will, delay_secs: stored_will.delay_secs }));
                session.will_due_at = Some(due);
                self.timers.push(Reverse(TimerEntry { at: due, session: key }));
            }
            session.subscriptions = rec.subscriptions.into_iter().collect();
            // A session connected at the crash counts as disconnected now.
            session.expires_at = match rec.expires_at_ms {
                u64::MAX => None,
                0 if rec.expiry_secs == u32::MAX => None,
                0 => Some(now + Duration::from_secs(u64::from(rec.expiry_secs))),
                ms => Some(clock.to_instant(ms)),
            };
            messages += (stored.deliveries.len() + stored.backlog.len()) as u64;
            session.backlog = stored.backlog.into();
            for queued in stored.deliveries {
                let Some(packet_id) = queued.packet_id else {
                    // Not sent before the restart: back to the store until its turn.
                    session.backlog.push_back(LazyDelivery::from_delivery(queued.delivery));
                    continue;
                };
                let state = if queued.released { InflightState::AwaitComp } else { InflightState::AwaitAck };
                session
                    .inflight
                    .insert(packet_id, Inflight { delivery: queued.delivery, state, sent: false });
            }
            if let Some(at) = session.expires_at {
                self.timers.push(Reverse(TimerEntry { at, session: key }));
            }
            self.recount_stored(key);
        }
        for msg in retained {
            // What was stored is kept, whatever the tenant's quota says now.
            self.retain_memory(msg, false);
        }
        bump(&self.stats.recovered_sessions, self.sessions.len() as u64);
        bump(&self.stats.recovered_messages, messages);
        self.store = Some(store);
    }

    /// Answers a request of the admin API (see `admin.rs`).
    pub fn on_admin(&mut self, request: AdminRequest, now: Instant) {
        match request {
            AdminRequest::Publish { msg, reply } => {
                if msg.retain {
                    self.retain(msg.clone(), 0);
                }
                self.route(msg, 0);
                let _ = reply.send(());
            }
            AdminRequest::Retained { tenant, filter, reply } => {
                let mut found = Vec::new();
                self.collect_retained(tenant, &filter, now, |msg| found.push(msg));
                let _ = reply.send(found);
            }
            AdminRequest::RetainDelete { tenant, topic, reply } => {
                let existed = self.retained.get(&tenant).is_some_and(|t| t.contains_key(topic.as_str()));
                if existed {
                    if let Ok(topic) = Utf8::new(&topic) {
                        let tombstone = Message {
                            tenant,
                            topic,
                            payload: Default::default(),
                            qos: QoS::AtMostOnce,
                            retain: true,
                            properties: None,
                            expires_at: None,
                            origin: None,
                        };
                        self.retain_set(Arc::new(tombstone));
                    }
                }
                let _ = reply.send(existed);
            }
            AdminRequest::Subscribe { tenant, client_id, filter, qos, reply } => {
                let answer = self.admin_subscribe(tenant, &client_id, &filter, qos);
                let _ = reply.send(answer);
            }
            AdminRequest::Unsubscribe { tenant, client_id, filter, reply } => {
                let key = Utf8::new(&client_id).ok().and_then(|id| self.sessions.find(tenant, &id));
                let answer = key.map(|key| {
                    let session = self.sessions.get_mut(key).expect("found above");
                    let existed = session.subscriptions.remove(filter.as_str()).is_some();
                    if existed {
                        let mut changes = Vec::new();
                        self.slice_remove(tenant, key, &filter, &mut changes);
                        self.broadcast_interest(changes);
                        self.persist_session(key);
                    }
                    existed
                });
                let _ = reply.send(answer);
            }
            AdminRequest::List { tenant, after, limit, reply } => {
                let mut found: Vec<SessionSummary> = self
                    .sessions
                    .keys()
                    .into_iter()
                    .filter_map(|key| self.sessions.get(key))
                    .filter(|s| {
                        s.tenant == tenant && after.as_deref().is_none_or(|a| s.client_id.as_str() > a)
                    })
                    .map(|s| self.summary(s))
                    .collect();
                found.sort_by(|a, b| a.client_id.cmp(&b.client_id));
                found.truncate(limit);
                let _ = reply.send(found);
            }
            AdminRequest::Inspect { tenant, client_id, reply } => {
                let detail = Utf8::new(&client_id)
                    .ok()
                    .and_then(|id| self.sessions.find(tenant, &id))
                    .and_then(|key| self.sessions.get(key))
                    .map(|s| {
                        let mut subscriptions: Vec<SubscriptionInfo> = s
                            .subscriptions
                            .iter()
                            .map(|(filter, entry)| SubscriptionInfo {
                                filter: filter.to_string(),
                                qos: entry.options.qos as u8,
                                no_local: entry.options.no_local,
                                retain_as_published: entry.options.retain_as_published,
                                retain_handling: entry.options.retain_handling as u8,
                                subscription_id: entry.subscription_id,
                            })
                            .collect();
                        subscriptions.sort_by(|a, b| a.filter.cmp(&b.filter));
                        SessionDetail { summary: self.summary(s), subscriptions }
                    });
                let _ = reply.send(detail);
            }
            AdminRequest::Disconnect { tenant, client_id, reply } => {
                let key = Utf8::new(&client_id).ok().and_then(|id| self.sessions.find(tenant, &id));
                if let Some(key) = key {
                    let session = self.sessions.get_mut(key).expect("found above");
                    self.cfg.events.event(&Event::Kicked { tenant, client_id: &client_id });
                    if let Some(conn) = session.conn.take() {
                        conn.close(Some(ReasonCode::AdministrativeAction));
                        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
                        session.tenant_state.connections.fetch_sub(1, Ordering::SeqCst);
                    }
                    self.end_session(key, now);
                }
                let _ = reply.send(key.is_some());
            }
        }
    }

    /// A subscription added by the admin API.
    fn admin_subscribe(
        &mut self,
        tenant: TenantId,
        client_id: &str,
        filter: &str,
        qos: u8,
    ) -> Result<(), String> {
        let key = Utf8::new(client_id)
            .ok()
            .and_then(|id| self.sessions.find(tenant, &id))
            .ok_or_else(|| "no such session".to_string())?;
        let qos = QoS::from_u8(qos).ok_or_else(|| format!("qos {qos} is not 0, 1 or 2"))?;
        topic::parse_shared(filter).map_err(|e| format!("bad filter {filter:?}: {e}"))?;
        topic::validate_topic_filter(filter).map_err(|e| format!("bad filter {filter:?}: {e}"))?;
        let entry = SubEntry {
            options: shardmq_protocol::SubscriptionOptions { qos, ..Default::default() },
            subscription_id: None,
        };
        let session = self.sessions.get_mut(key).expect("found above");
        session.subscriptions.insert(filter.into(), entry.clone());
        let mut changes = Vec::new();
        self.slice_add(tenant, key, filter, entry, &mut changes);
        self.broadcast_interest(changes);
        self.persist_session(key);
        Ok(())
    }

    fn summary(&self, s: &Session) -> SessionSummary {
        SessionSummary {
            tenant: s.tenant,
            client_id: s.client_id.as_str().to_string(),
            shard: self.id.0,
            connected: s.conn.is_some(),
            protocol_level: s.version.level(),
            expiry_secs: s.expiry_secs,
            subscriptions: s.subscriptions.len(),
            queued: s.queue.len() + s.backlog.len(),
            inflight: s.inflight.len(),
            stored: s.store_uid != 0,
            peer: s.peer.as_deref().copied(),
        }
    }

    /// Flushes and closes the store (shutdown), logging how long its appends held the thread.
    pub fn close_store(&mut self) {
        if let Some(store) = self.store.take() {
            let c = store.counters;
            tracing::info!(
                shard = self.id.0,
                appends = c.appends,
                owner_writes = store.log().stats().owner_writes,
                append_failures = c.append_failures,
                stalls_over_100us = c.append_stalls_100us,
                stalls_over_1ms = c.append_stalls_1ms,
                longest_append_us = c.append_stall_max_us,
                compactions = c.compactions,
                longest_compaction_us = c.compaction_max_us,
                "store: closed"
            );
            if let Err(error) = store.close() {
                tracing::warn!(shard = self.id.0, %error, "store: flush at shutdown failed");
            }
        }
    }

    pub fn shard_count(&self) -> usize {
        self.outbox.mesh.shard_count()
    }

    pub fn new_conn_id(&mut self) -> ConnId {
        let id = ConnId(self.next_conn_id);
        self.next_conn_id += 1;
        id
    }

    fn is_denied(&self, topic_or_filter: &str) -> bool {
        self.cfg
            .denied_topic_filters
            .iter()
            .any(|denied| denied == topic_or_filter || topic::matches(denied, topic_or_filter))
    }

    fn event_refused(&self, key: SessionKey, topic: &str, reason: &'static str) {
        if let Some(session) = self.sessions.get(key) {
            self.cfg.events.event(&Event::Refused {
                tenant: session.tenant,
                client_id: session.client_id.as_str(),
                topic,
                reason,
            });
        }
    }

    /// Whether session `key`'s client may publish to / subscribe to `topic_or_filter` (the auth
    /// provider's ACL); a refusal is counted.
    fn acl_allows(&self, key: SessionKey, action: Action, topic_or_filter: &str) -> bool {
        let Some(session) = self.sessions.get(key) else { return false };
        let who = Principal {
            tenant: session.tenant,
            client_id: session.client_id.as_str(),
            username: session.username.as_deref(),
        };
        let allowed = self.cfg.auth.authorize(&who, action, topic_or_filter);
        if !allowed {
            bump(&self.stats.acl_denied, 1);
        }
        allowed
    }

    // ----- connect / disconnect -------------------------------------------------------------

    /// Handles a CONNECT on the session's home shard. `conn` is the new connection's link.
    pub fn connect(
        &mut self,
        connect: Connect,
        conn: Rc<crate::conn::ConnShared>,
        now: Instant,
    ) -> ConnectOutcome {
        self.connect_as(TenantId::default(), connect, conn, None, now)
    }

    /// Handles a CONNECT for a client of `tenant` (the auth provider's answer; the default tenant
    /// until authentication arrives). Everything the session does stays inside its tenant.
    /// `peer` is the client's address, for the admin API and the events.
    pub fn connect_as(
        &mut self,
        tenant: TenantId,
        connect: Connect,
        conn: Rc<crate::conn::ConnShared>,
        peer: Option<std::net::SocketAddr>,
        now: Instant,
    ) -> ConnectOutcome {
        let version = connect.protocol;
        let refuse = ConnectOutcome::Refused;
        // A copy, not a slice: a slice would keep the connection's first read buffer alive for the
        // life of the session.
        let mut client_id = Utf8::new(connect.client_id.as_str()).unwrap_or_default();
        let mut assigned = None;
        if client_id.is_empty() {
            let allowed = match version {
                ProtocolVersion::V3_1 => false,
                ProtocolVersion::V3_1_1 => connect.clean_start,
                ProtocolVersion::V5 => true,
            };
            if !allowed {
                return refuse(ReasonCode::ClientIdentifierNotValid);
            }
            // The session lives on this shard, so the id must hash to this shard: a reconnect with
            // the assigned id is routed by its hash and must meet the session here. About one
            // candidate in `cores` fits; the bound makes a miss astronomically unlikely.
            let shard_count = self.shard_count();
            let fits = |id: &String| {
                home_shard(tenant, id, shard_count) == self.id
                    && self.sessions.find(tenant, &Utf8::new(id).expect("ASCII id")).is_none()
            };
            let candidates_max = 64 * SHARDS_MAX as u32;
            let Some(generated) =
                (0..candidates_max).map(|n| format!("shardmq-{}-{}-{n}", self.id.0, conn.id.0)).find(fits)
            else {
                return refuse(ReasonCode::ServerUnavailable);
            };
            client_id = Utf8::new(&generated).expect("generated id is valid UTF-8");
            assigned = Some(client_id.clone());
        } else if version == ProtocolVersion::V3_1 && client_id.len() > 23 {
            return refuse(ReasonCode::ClientIdentifierNotValid);
        }
        if let Some(will) = &connect.will {
            if topic::validate_topic_name(&will.topic).is_err() {
                return refuse(ReasonCode::TopicNameInvalid);
            }
            let who = Principal {
                tenant,
                client_id: client_id.as_str(),
                username: connect.username.as_ref().map(|u| u.as_str()),
            };
            if self.is_denied(&will.topic) || !self.cfg.auth.authorize(&who, Action::Publish, &will.topic) {
                return refuse(ReasonCode::NotAuthorized);
            }
        }
        let cfg = self.cfg.clone();
        let settings = cfg.tenants.settings(tenant);
        let tenant_state = cfg.tenants.state(tenant);
        if settings.allowed_protocol_levels.as_ref().is_some_and(|levels| !levels.contains(&version.level()))
        {
            tenant_state.count(Limit::ProtocolVersion);
            return refuse(ReasonCode::UnsupportedProtocolVersion);
        }
        if let Some(rate) = settings.max_connect_rate.filter(|r| *r > 0) {
            let now_secs =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            if !tenant_state.admit_connect(rate, now_secs) {
                tenant_state.count(Limit::ConnectRate);
                return refuse(ReasonCode::ConnectionRateExceeded);
            }
        }
        // A takeover keeps the tenant's connection count; a new connection must fit.
        let replaces = self
            .sessions
            .find(tenant, &client_id)
            .and_then(|k| self.sessions.get(k))
            .is_some_and(|s| s.conn.is_some());
        if !replaces {
            let now_connected = tenant_state.connections.fetch_add(1, Ordering::SeqCst) + 1;
            if settings.max_connections.is_some_and(|max| now_connected > max) {
                tenant_state.connections.fetch_sub(1, Ordering::SeqCst);
                tenant_state.count(Limit::Connections);
                return refuse(ReasonCode::QuotaExceeded);
            }
        }
        let session_expiry_max = settings.max_session_expiry_secs.unwrap_or(cfg.session_expiry_secs_max);
        let requested_expiry = if version.is_v5() {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry_secs = if requested_expiry == u32::MAX && !version.is_v5() {
            u32::MAX
        } else {
            requested_expiry.min(session_expiry_max)
        };

        // Takeover or resume.
        let mut session_present = false;
        let existing = self.sessions.find(tenant, &client_id);
        if let Some(key) = existing {
            let session = self.sessions.get_mut(key).expect("index and slab agree");
            if let Some(old) = session.conn.take() {
                old.close(Some(ReasonCode::SessionTakenOver));
                self.cfg.events.event(&Event::Disconnected {
                    tenant,
                    client_id: client_id.as_str(),
                    reason: "taken over",
                });
                // The old connection's `disconnected` will find the session owned by the new one and
                // return early, so it is counted as gone here (the tenant's count stays: the new
                // connection takes its place).
                self.stats.connections.fetch_sub(1, Ordering::Relaxed);
            }
            // The old connection's will: sent now if it has no delay or the session ends, else dropped
            // (the session continues, MQTT 5 section 3.1.3.2.2).
            let old_will = session.will.take();
            session.will_due_at = None;
            if let Some(will) = old_will {
                if will.delay_secs == 0 || connect.clean_start {
                    self.publish_will(key, will.will, now);
                }
            }
            if connect.clean_start {
                self.end_session(key, now);
            } else {
                session_present = true;
            }
        }
        let key = if session_present {
            existing.expect("present session has a key")
        } else {
            bump(&self.stats.sessions, 1);
            self.sessions.insert(tenant, client_id.clone(), version)
        };
        let session = self.sessions.get_mut(key).expect("just inserted or found");
        session.version = version;
        session.username = connect.username.as_ref().map(|u| Box::from(u.as_str()));
        session.expiry_secs = expiry_secs;
        session.expires_at = None;
        session.conn = Some(conn);
        session.control.clear();
        session.aliases = None;
        session.client_receive_maximum = connect.properties.receive_maximum.unwrap_or(u16::MAX);
        session.client_packet_size_max = connect.properties.maximum_packet_size.unwrap_or(u32::MAX);
        session.client_topic_alias_max = connect.properties.topic_alias_maximum.unwrap_or(0);
        session.request_problem_information = connect.properties.request_problem_information != Some(0);
        session.settings = settings.clone();
        session.tenant_state = tenant_state.clone();
        session.will = connect.will.map(|will| {
            let delay_secs = will.properties.will_delay_interval.unwrap_or(0);
            Box::new(WillState { will, delay_secs })
        });
        session.mark_inflight_unsent();

        let mut keepalive_secs = connect.keep_alive;
        let mut properties = Properties::default();
        if version.is_v5() {
            if keepalive_secs > cfg.keepalive_secs_max || keepalive_secs == 0 {
                keepalive_secs = cfg.keepalive_secs_max;
                properties.server_keep_alive = Some(keepalive_secs);
            }
            if requested_expiry != expiry_secs {
                properties.session_expiry_interval = Some(expiry_secs);
            }
            properties.receive_maximum = Some(settings.receive_maximum.unwrap_or(cfg.receive_maximum));
            properties.maximum_packet_size = Some(
                settings
                    .max_packet_size
                    .map_or(cfg.packet_size_bytes_max, |m| m.min(cfg.packet_size_bytes_max)),
            );
            properties.topic_alias_maximum = Some(cfg.topic_alias_max);
            properties.retain_available = Some(u8::from(settings.retain_available != Some(false)));
            properties.wildcard_subscription_available = Some(1);
            properties.subscription_identifier_available = Some(1);
            properties.shared_subscription_available = Some(1);
            properties.assigned_client_identifier = assigned;
            // Enhanced authentication (done by the connection before this CONNECT arrived): the
            // CONNACK names the method and carries the exchange's last data.
            properties.authentication_method = connect.properties.authentication_method.clone();
            properties.authentication_data = connect.properties.authentication_data.clone();
            if connect.properties.request_response_information == Some(1) {
                let info = format!("{}{}", cfg.response_information_prefix, client_id.as_str());
                properties.response_information = Utf8::new(&info).ok();
            }
        } else if keepalive_secs > cfg.keepalive_secs_max {
            keepalive_secs = cfg.keepalive_secs_max;
        }
        let connack = ConnAck { session_present, reason: ReasonCode::Success, properties };
        // CONNACK goes first; queued and inflight messages follow it (MQTT-4.4.0-1).
        session.control.push_front(Control::from(Packet::ConnAck(connack)));
        session.wake_writer();
        self.persist_session(key);
        bump(&self.stats.connects_total, 1);
        bump(&self.stats.connections, 1);
        tenant_state.connects_total.fetch_add(1, Ordering::Relaxed);
        if let Some(session) = self.sessions.get_mut(key) {
            session.peer = peer.map(Box::new);
            self.cfg.events.event(&Event::Connected {
                tenant,
                client_id: session.client_id.as_str(),
                username: session.username.as_deref(),
                protocol_level: version.level(),
                session_present,
                peer,
            });
        }
        match &connect.properties.authentication_method {
            Some(method) => self.enhanced.insert(key, Enhanced { method: method.clone(), exchange: None }),
            None => self.enhanced.remove(&key),
        };
        ConnectOutcome::Accepted { session: key, keepalive_secs }
    }

    /// The connection `conn` of session `key` has closed. `will`: publish the will (abnormal close).
    pub fn disconnected(&mut self, key: SessionKey, conn: ConnId, will: bool, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else { return };
        if session.conn.as_ref().map(|c| c.id) != Some(conn) {
            return; // Taken over: the new connection owns the session now.
        }
        session.conn = None;
        self.enhanced.remove(&key);
        session.control.clear();
        session.aliases = None;
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        session.tenant_state.connections.fetch_sub(1, Ordering::SeqCst);
        self.cfg.events.event(&Event::Disconnected {
            tenant: session.tenant,
            client_id: session.client_id.as_str(),
            reason: if will { "abnormal" } else { "normal" },
        });
        let expiry_secs = session.expiry_secs;
        let will_state = if will { session.will.take() } else { None };
        session.will = None;
        if let Some(will_state) = will_state {
            if will_state.delay_secs == 0 || expiry_secs == 0 {
                self.publish_will(key, will_state.will, now);
            } else {
                let session = self.sessions.get_mut(key).expect("checked above");
                let due = now + Duration::from_secs(u64::from(will_state.delay_secs.min(expiry_secs)));
                session.will = Some(will_state);
                session.will_due_at = Some(due);
                self.timers.push(Reverse(TimerEntry { at: due, session: key }));
            }
        }
        let session = self.sessions.get_mut(key).expect("checked above");
        session.pending_acks.clear();
        if expiry_secs == 0 {
            self.end_session(key, now);
            return;
        } else if expiry_secs != u32::MAX {
            let at = now + Duration::from_secs(u64::from(expiry_secs));
            session.expires_at = Some(at);
            self.timers.push(Reverse(TimerEntry { at, session: key }));
        }
        self.persist_session(key);
    }

    /// Writes session `key`'s snapshot if it is persistent (and storage is on); a stored session
    /// that is no longer persistent leaves the store.
    fn persist_session(&mut self, key: SessionKey) {
        if self.store.is_none() {
            return;
        }
        let Some(session) = self.sessions.get(key) else { return };
        if !session.is_persistent() {
            if session.store_uid != 0 {
                self.unstore_session(key);
            }
            return;
        }
        let Some(store) = self.store.as_mut() else { return };
        let Some(session) = self.sessions.get_mut(key) else { return };
        if session.store_uid == 0 {
            session.store_uid = store.new_uid();
        }
        let clock = Clock::now();
        let expires_at_ms = match (&session.conn, session.expires_at) {
            (Some(_), _) => 0,
            (None, None) => u64::MAX,
            (None, Some(at)) => clock.to_unix_ms(at),
        };
        let rec = SessionRec {
            uid: session.store_uid,
            tenant: session.tenant,
            version: session.version,
            expiry_secs: session.expiry_secs,
            expires_at_ms,
            client_id: session.client_id.as_str().to_string(),
            subscriptions: session.subscriptions.iter().map(|(f, e)| (f.clone(), e.clone())).collect(),
            will: session.will.as_ref().map(|w| {
                let mut properties = w.will.properties.clone();
                properties.will_delay_interval = None;
                StoredWill {
                    delay_secs: w.delay_secs,
                    due_at_ms: session.will_due_at.map_or(0, |at| clock.to_unix_ms(at)),
                    publish: stored_publish(
                        &w.will.topic,
                        &w.will.payload,
                        w.will.qos,
                        w.will.retain,
                        Some(&properties),
                    ),
                }
            }),
        };
        if let Err(error) = store.put_session(rec) {
            tracing::warn!(shard = self.id.0, %error, client_id = %session.client_id.as_str(), "store: session not saved");
        }
        self.recount_stored(key);
    }

    /// Takes session `key` out of the store: its snapshot and every message stored for it.
    fn unstore_session(&mut self, key: SessionKey) {
        let Some(store) = self.store.as_mut() else { return };
        let Some(session) = self.sessions.get_mut(key) else { return };
        let uid = std::mem::take(&mut session.store_uid);
        if uid == 0 {
            return;
        }
        let queued = session.queue.iter_mut().map(|d| &mut d.stored);
        let inflight = session.inflight.values_mut().map(|i| &mut i.delivery.stored);
        // A backlog is stored by definition: without its store entry it is nothing.
        let backlog = session.backlog.drain(..).map(|l| l.stored()).collect::<Vec<_>>();
        for id in backlog {
            store.release(uid, id, true);
        }
        for stored in queued.chain(inflight) {
            if *stored != 0 {
                store.release(uid, *stored, true);
                *stored = 0;
            }
        }
        store.session_gone(uid);
        self.recount_stored(key);
    }

    /// Removes a session and its subscriptions; publishes a pending delayed will.
    fn end_session(&mut self, key: SessionKey, now: Instant) {
        self.unstore_session(key);
        let Some(mut session) = self.sessions.remove(key) else { return };
        self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
        if let Some(conn) = session.conn.take() {
            conn.close(None);
        }
        if let Some(will) = session.will.take() {
            if session.will_due_at.is_some() {
                self.publish_will(key, will.will, now);
            }
        }
        let mut changes = Vec::new();
        for filter in session.subscriptions.keys() {
            self.slice_remove(session.tenant, key, filter, &mut changes);
        }
        self.broadcast_interest(changes);
    }

    /// Runs due timers: delayed wills and session expiry.
    pub fn tick(&mut self, now: Instant) {
        self.keepalive.expire(now);
        self.sweep_gauges(now);
        if let Some(store) = self.store.as_mut() {
            store.maintain();
            let counters = store.counters;
            self.stats.store_appends.store(counters.appends, Ordering::Relaxed);
            self.stats.store_append_failures.store(counters.append_failures, Ordering::Relaxed);
        }
        self.poll_durable();
        // Bounded by the number of due entries; stale entries (session gone or rescheduled) are skipped.
        while let Some(Reverse(entry)) = self.timers.peek() {
            if entry.at > now {
                break;
            }
            let key = entry.session;
            self.timers.pop();
            let Some(session) = self.sessions.get_mut(key) else { continue };
            if session.conn.is_some() {
                continue;
            }
            if session.will_due_at.is_some_and(|at| at <= now) {
                session.will_due_at = None;
                if let Some(will) = session.will.take() {
                    self.publish_will(key, will.will, now);
                    self.persist_session(key);
                }
            }
            let session = self.sessions.get_mut(key).expect("checked above");
            if session.expires_at.is_some_and(|at| at <= now) {
                self.cfg.events.event(&Event::SessionExpired {
                    tenant: session.tenant,
                    client_id: session.client_id.as_str(),
                });
                self.end_session(key, now);
            }
        }
    }

    fn publish_will(&mut self, key: SessionKey, will: Will, now: Instant) {
        let tenant = self.sessions.get(key).map(|s| s.tenant).unwrap_or_default();
        let Will { topic, payload, qos, retain, mut properties } = will;
        let expires_at = properties.message_expiry_interval.map(|s| now + Duration::from_secs(u64::from(s)));
        properties.will_delay_interval = None;
        properties.message_expiry_interval = None;
        let msg = Arc::new(Message {
            tenant,
            topic,
            payload,
            qos,
            retain,
            properties: Message::boxed_properties(properties),
            expires_at,
            origin: Some(Origin { shard: self.id, session: key }),
        });
        if retain {
            self.retain(msg.clone(), 0);
        }
        self.route(msg, 0);
    }

    // ----- packets from clients -------------------------------------------------------------

    /// Handles one packet from the connection `conn` of session `key`.
    pub fn handle_packet(&mut self, key: SessionKey, conn: ConnId, packet: Packet, now: Instant) -> After {
        let Some(session) = self.sessions.get_mut(key) else {
            return After::Close { reason: None, will: false };
        };
        if session.conn.as_ref().map(|c| c.id) != Some(conn) {
            return After::Close { reason: None, will: false };
        }
        let v5 = session.version.is_v5();
        match packet {
            Packet::Publish(publish) => self.on_publish(key, publish, now),
            Packet::PubAck(ack) => {
                let session = self.sessions.get_mut(key).expect("checked above");
                if let Some(inflight) = session.inflight.get(&ack.packet_id) {
                    if inflight.delivery.qos == QoS::AtLeastOnce && inflight.state == InflightState::AwaitAck
                    {
                        let stored = inflight.delivery.stored;
                        session.inflight.remove(&ack.packet_id);
                        session.wake_writer();
                        self.store_release(key, stored);
                    }
                }
                After::Continue
            }
            Packet::PubRec(rec) => {
                let session = self.sessions.get_mut(key).expect("checked above");
                match session.inflight.get_mut(&rec.packet_id) {
                    Some(inflight) if inflight.delivery.qos == QoS::ExactlyOnce => {
                        let stored = inflight.delivery.stored;
                        let uid = session.store_uid;
                        if rec.reason.is_error() {
                            session.inflight.remove(&rec.packet_id);
                            session.wake_writer();
                            self.store_release(key, stored);
                        } else if inflight.state == InflightState::AwaitAck {
                            inflight.state = InflightState::AwaitComp;
                            session.push_control(Packet::PubRel(PubResp::new(rec.packet_id)));
                            if let (Some(store), true) = (self.store.as_mut(), stored != 0 && uid != 0) {
                                store.released(uid, stored);
                            }
                        } else {
                            session.push_control(Packet::PubRel(PubResp::new(rec.packet_id)));
                        }
                    }
                    _ => {
                        let mut rel = PubResp::new(rec.packet_id);
                        rel.reason = ReasonCode::PacketIdentifierNotFound;
                        session.push_control(Packet::PubRel(rel));
                    }
                }
                After::Continue
            }
            Packet::PubComp(comp) => {
                let session = self.sessions.get_mut(key).expect("checked above");
                if session.inflight.get(&comp.packet_id).is_some_and(|i| i.state == InflightState::AwaitComp)
                {
                    let stored = session.inflight.remove(&comp.packet_id).map_or(0, |i| i.delivery.stored);
                    session.wake_writer();
                    self.store_release(key, stored);
                }
                After::Continue
            }
            Packet::PubRel(rel) => {
                let session = self.sessions.get_mut(key).expect("checked above");
                let mut comp = PubResp::new(rel.packet_id);
                let known = session.incoming_qos2.remove(&rel.packet_id);
                if !known && v5 {
                    comp.reason = ReasonCode::PacketIdentifierNotFound;
                }
                session.push_control(Packet::PubComp(comp));
                let uid = session.store_uid;
                if let (Some(store), true) = (self.store.as_mut(), known && uid != 0) {
                    store.inbound_done(uid, rel.packet_id);
                }
                After::Continue
            }
            Packet::Subscribe(subscribe) => {
                self.on_subscribe(key, conn, subscribe, now);
                After::Continue
            }
            Packet::Unsubscribe(unsubscribe) => {
                self.on_unsubscribe(key, unsubscribe);
                After::Continue
            }
            Packet::PingReq => {
                let session = self.sessions.get_mut(key).expect("checked above");
                session.push_control(Packet::PingResp);
                After::Continue
            }
            Packet::Disconnect(disconnect) => self.on_disconnect(key, disconnect),
            Packet::Connect(_) => self.protocol_error(v5),
            Packet::Auth(auth) => self.on_auth(key, auth),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.protocol_error(v5)
            }
        }
    }

    fn on_disconnect(&mut self, key: SessionKey, disconnect: Disconnect) -> After {
        let session = self.sessions.get_mut(key).expect("caller checked");
        if let Some(expiry) = disconnect.properties.session_expiry_interval {
            if session.expiry_secs == 0 && expiry != 0 {
                // MQTT-3.14.2-2: a session that was to end with the connection cannot be extended.
                bump(&self.stats.protocol_errors, 1);
                return After::Close { reason: Some(ReasonCode::ProtocolError), will: true };
            }
            session.expiry_secs = expiry.min(self.cfg.session_expiry_secs_max);
        }
        let will = disconnect.reason == ReasonCode::DisconnectWithWillMessage;
        After::Close { reason: None, will }
    }

    fn on_publish(&mut self, key: SessionKey, mut publish: Publish, now: Instant) -> After {
        bump(&self.stats.publishes_in, 1);
        let cfg = self.cfg.clone();
        let session = self.sessions.get_mut(key).expect("caller checked");
        if let Some(alias) = publish.properties.topic_alias.take() {
            if alias == 0 || alias > cfg.topic_alias_max {
                bump(&self.stats.protocol_errors, 1);
                return After::Close { reason: Some(ReasonCode::TopicAliasInvalid), will: true };
            }
            if publish.topic.is_empty() {
                match session.aliases.as_ref().and_then(|a| a.inbound.get(&alias)) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => {
                        bump(&self.stats.protocol_errors, 1);
                        return After::Close { reason: Some(ReasonCode::ProtocolError), will: true };
                    }
                }
            } else {
                session
                    .aliases
                    .get_or_insert_with(Default::default)
                    .inbound
                    .insert(alias, publish.topic.clone());
            }
        }
        let packet_id = publish.packet_id.unwrap_or(0);
        if publish.qos == QoS::ExactlyOnce {
            if session.incoming_qos2.contains(&packet_id) {
                // A re-sent PUBLISH of a message already routed: acknowledge only (exactly once),
                // or, while its first PUBREC still waits for the disk, leave it to that one.
                if !session.pending_acks.iter().any(|p| p.packet_id == packet_id && p.qos == QoS::ExactlyOnce)
                {
                    session.push_control(Packet::PubRec(PubResp::new(packet_id)));
                }
                return After::Continue;
            }
            if session.incoming_qos2.len()
                >= usize::from(session.settings.receive_maximum.unwrap_or(cfg.receive_maximum))
            {
                bump(&self.stats.protocol_errors, 1);
                return After::Close { reason: Some(ReasonCode::ReceiveMaximumExceeded), will: true };
            }
        }
        let session = self.sessions.get(key).expect("caller checked");
        let tenant = session.tenant;
        let traffic = session.tenant_state.traffic(self.id.index());
        traffic.publishes_in[publish.qos as usize].fetch_add(1, Ordering::Relaxed);
        traffic.payload_bytes_in.fetch_add(publish.payload.len() as u64, Ordering::Relaxed);
        if publish.retain && session.settings.retain_available == Some(false) {
            session.tenant_state.count(Limit::Retain);
            if session.version.is_v5() {
                // MQTT-3.3.1-13: a retained PUBLISH when Retain Available was 0.
                return After::Close { reason: Some(ReasonCode::RetainNotSupported), will: true };
            }
            publish.retain = false;
        }
        let topic_limit = topic_limit(&session.settings, &publish.topic);
        if let Some(limit) = topic_limit {
            session.tenant_state.count(limit);
        }
        let denied = topic_limit.is_some()
            || cfg.denied_topic_filters.iter().any(|d| topic::matches(d, &publish.topic))
            || !self.acl_allows(key, Action::Publish, &publish.topic);
        let ack_reason = match (denied, topic_limit) {
            (false, _) => ReasonCode::Success,
            (true, Some(_)) => ReasonCode::TopicNameInvalid,
            (true, None) => ReasonCode::NotAuthorized,
        };
        let qos = publish.qos;
        let mut waiting = 0u32;
        let mut failed = false;
        let mut token = 0u64;
        if denied {
            bump(&self.stats.dropped_denied, 1);
            if let Some(session) = self.sessions.get(key) {
                session.tenant_state.traffic(self.id.index()).drop_one(DropReason::Denied);
            }
            self.event_refused(key, &publish.topic, "not authorized");
        } else {
            let mut properties = std::mem::take(&mut publish.properties);
            let expires_at =
                properties.message_expiry_interval.map(|s| now + Duration::from_secs(u64::from(s)));
            properties.message_expiry_interval = None;
            properties.subscription_identifiers.clear();
            let msg = Arc::new(Message {
                tenant,
                topic: publish.topic,
                payload: publish.payload,
                qos,
                retain: publish.retain,
                properties: Message::boxed_properties(properties),
                expires_at,
                origin: Some(Origin { shard: self.id, session: key }),
            });
            if qos != QoS::AtMostOnce && self.store.is_some() {
                token = self.new_token();
            }
            if msg.retain {
                let (w, f) = self.retain(msg.clone(), token);
                waiting += w;
                failed |= f;
            }
            let (w, f) = self.route(msg, token);
            waiting += w;
            failed |= f;
            // A stored session's routed QoS 2 id is durable before its PUBREC, so a resend after
            // a restart is recognised and not routed twice.
            let uid = self.sessions.get(key).map_or(0, |s| s.store_uid);
            if let (Some(store), true) = (self.store.as_mut(), qos == QoS::ExactlyOnce && uid != 0) {
                let persisted = match store.inbound_add(uid, packet_id) {
                    Ok(()) => Persisted::Appended,
                    Err(error) => {
                        // The message is routed; only its deduplication across a restart is lost.
                        tracing::warn!(shard = self.id.0, %error, "store: QoS 2 packet id not saved");
                        Persisted::Nothing
                    }
                };
                let (w, f) = self.settle(self.id, token, persisted);
                waiting += w;
                failed |= f;
            }
        }
        if qos == QoS::AtMostOnce {
            return After::Continue;
        }
        // Every entry gets a token, also one nobody waits on, so a session's tokens ascend and
        // `answer` finds its entry by binary search (the window can hold thousands).
        let token = if token != 0 { token } else { self.new_token() };
        let session = self.sessions.get_mut(key).expect("caller checked");
        if qos == QoS::ExactlyOnce && !ack_reason.is_error() {
            session.incoming_qos2.insert(packet_id);
        }
        session.pending_acks.push_back(PendingAck {
            token,
            packet_id,
            qos,
            waiting,
            failed,
            reason: ack_reason,
            received_at: now,
        });
        if waiting > 0 {
            self.ack_tokens.insert(token, key);
        } else {
            self.flush_acks(key);
        }
        After::Continue
    }

    /// Refreshes this shard's per-tenant session and queued-message gauges, at most once per
    /// [`GAUGE_SWEEP_INTERVAL`]: one pass over the sessions (a few
    /// nanoseconds each) instead of a counter on every enqueue and send.
    fn sweep_gauges(&mut self, now: Instant) {
        if now < self.sweep_at {
            return;
        }
        self.sweep_at = now + GAUGE_SWEEP_INTERVAL;
        let shard = self.id.index();
        let mut seen: HashMap<TenantId, (Arc<TenantState>, u64, u64)> = HashMap::new();
        for session in self.sessions.iter() {
            let queued = (session.queue.len() + session.backlog.len() + session.inflight.len()) as u64;
            let entry = seen.entry(session.tenant).or_insert_with(|| (session.tenant_state.clone(), 0, 0));
            entry.1 += 1;
            entry.2 += queued;
        }
        for (tenant, state) in self.swept.drain() {
            if !seen.contains_key(&tenant) {
                state.traffic(shard).sessions.store(0, Ordering::Relaxed);
                state.traffic(shard).queued_messages.store(0, Ordering::Relaxed);
            }
        }
        for (tenant, (state, sessions, queued)) in seen {
            state.traffic(shard).sessions.store(sessions, Ordering::Relaxed);
            state.traffic(shard).queued_messages.store(queued, Ordering::Relaxed);
            self.swept.insert(tenant, state);
        }
    }

    /// A token for answers from the store and other shards: unique on this shard, ascending.
    fn new_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token - 1
    }

    /// Counts a protocol error and closes the connection, telling a v5 client why (0x82).
    fn protocol_error(&self, v5: bool) -> After {
        bump(&self.stats.protocol_errors, 1);
        After::Close { reason: v5.then_some(ReasonCode::ProtocolError), will: true }
    }

    /// An AUTH from a connected client: a re-authentication (MQTT 5 section 4.12.1) with the
    /// method of its CONNECT, run by the auth provider's exchange. Success answers AUTH 0x00 and
    /// may change the username; a failure, or a tenant other than the session's, disconnects
    /// (0x87).
    fn on_auth(&mut self, key: SessionKey, auth: shardmq_protocol::Auth) -> After {
        let Some(session) = self.sessions.get_mut(key) else {
            return After::Close { reason: None, will: false };
        };
        let Some(entry) = self.enhanced.get_mut(&key) else {
            return self.protocol_error(true); // MQTT-4.12.0-7: no method in CONNECT, no AUTH after
        };
        if auth.properties.authentication_method.as_ref() != Some(&entry.method) {
            return self.protocol_error(true); // MQTT-4.12.1-1: the method of the CONNECT
        }
        match (auth.reason, entry.exchange.is_some()) {
            (ReasonCode::ReAuthenticate, false) => {
                let credentials = crate::auth::Credentials {
                    client_id: session.client_id.as_str(),
                    username: session.username.as_deref(),
                    password: None,
                    peer: session.peer.as_deref().copied(),
                    default_tenant: session.tenant,
                    client_cert: None,
                };
                match self.cfg.auth.start_enhanced(entry.method.as_str(), &credentials) {
                    Some(exchange) => entry.exchange = Some(exchange),
                    None => {
                        // DISCONNECT has no 0x8C (MQTT 5 section 3.14.2.1): not authorized.
                        return After::Close { reason: Some(ReasonCode::NotAuthorized), will: true };
                    }
                }
            }
            (ReasonCode::ContinueAuthentication, true) => {}
            _ => return self.protocol_error(true),
        }
        let exchange = entry.exchange.as_mut().expect("set above");
        let step = exchange.step(auth.properties.authentication_data.as_deref());
        let method = entry.method.clone();
        let reply = |reason: ReasonCode, data: Option<Bytes>| {
            let properties = Properties {
                authentication_method: Some(method.clone()),
                authentication_data: data,
                ..Default::default()
            };
            Packet::Auth(shardmq_protocol::Auth { reason, properties })
        };
        match step {
            crate::auth::AuthStep::Continue(data) => {
                session.push_control(reply(ReasonCode::ContinueAuthentication, Some(data)));
                After::Continue
            }
            crate::auth::AuthStep::Done { decision: AuthDecision::Allow { tenant }, data, username }
                if tenant == session.tenant =>
            {
                entry.exchange = None;
                if let Some(username) = username {
                    session.username = Some(username.into_boxed_str());
                }
                session.push_control(reply(ReasonCode::Success, data));
                After::Continue
            }
            crate::auth::AuthStep::Done { .. } => {
                // Refused, or allowed into another tenant. DISCONNECT cannot carry 0x86 or 0x8C
                // (MQTT 5 section 3.14.2.1), so every failure is 0x87.
                entry.exchange = None;
                bump(&self.stats.auth_failures, 1);
                session.tenant_state.auth_failures.fetch_add(1, Ordering::Relaxed);
                let reason = ReasonCode::NotAuthorized;
                self.cfg.events.event(&Event::AuthFailed {
                    client_id: session.client_id.as_str(),
                    username: session.username.as_deref(),
                    reason: "re-authentication failed",
                    peer: session.peer.as_deref().copied(),
                });
                After::Close { reason: Some(reason), will: true }
            }
        }
    }

    /// Sends the acknowledgements at the front of session `key`'s queue whose messages are durable
    /// (in arrival order, MQTT-4.6.0-2).
    fn flush_acks(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(key) else { return };
        let v5 = session.version.is_v5();
        while session.pending_acks.front().is_some_and(|p| p.waiting == 0) {
            let ack = session.pending_acks.pop_front().expect("front checked");
            let elapsed = ack.received_at.elapsed();
            self.stats.ack_latency.record(elapsed);
            session.tenant_state.traffic(self.id.index()).ack_latency.record(elapsed);
            let reason = match (ack.failed, v5) {
                (true, true) => ReasonCode::QuotaExceeded,
                (false, true) => ack.reason,
                (_, false) => ReasonCode::Success,
            };
            if ack.failed {
                bump(&self.stats.publishes_refused_storage, 1);
            }
            let resp = PubResp { packet_id: ack.packet_id, reason, properties: Properties::default() };
            if ack.qos == QoS::ExactlyOnce {
                if reason.is_error() {
                    session.incoming_qos2.remove(&ack.packet_id);
                }
                session.push_control(Packet::PubRec(resp));
            } else {
                session.push_control(Packet::PubAck(resp));
            }
        }
    }

    /// One answer for `token` arrived (`ok`: stored without failure).
    fn answer(&mut self, token: u64, ok: bool) {
        let Some(&key) = self.ack_tokens.get(&token) else { return };
        let Some(session) = self.sessions.get_mut(key) else {
            self.ack_tokens.remove(&token);
            return;
        };
        let found = session.pending_acks.binary_search_by_key(&token, |p| p.token);
        let Some(pending) = found.ok().and_then(|index| session.pending_acks.get_mut(index)) else {
            self.ack_tokens.remove(&token);
            return;
        };
        pending.waiting = pending.waiting.saturating_sub(1);
        pending.failed |= !ok;
        if pending.waiting == 0 {
            self.ack_tokens.remove(&token);
            self.flush_acks(key);
        }
    }

    /// Records what a delivery did to the store for `token` (0: nobody waits). Returns
    /// (answers to wait for, failed) for a local token.
    fn settle(&mut self, from: ShardId, token: u64, persisted: Persisted) -> (u32, bool) {
        if token == 0 {
            return (0, false);
        }
        let local = from == self.id;
        match persisted {
            Persisted::Appended => {
                let (end, durable) = self
                    .store
                    .as_ref()
                    .map_or((Offset(0), Offset(0)), |s| (s.end_offset(), s.durable_offset()));
                if end <= durable {
                    // Already durable (`--fsync never`): answer now rather than at the next wake.
                    if !local {
                        self.durable_replies[from.index()].push((token, true));
                    }
                    return (0, false);
                }
                let waiter = if local { Waiter::Local(token) } else { Waiter::Remote(from, token) };
                self.durable_waiters.push_back((end, waiter));
                (u32::from(local), false)
            }
            Persisted::Nothing | Persisted::Failed => {
                let ok = persisted == Persisted::Nothing;
                if !local {
                    self.durable_replies[from.index()].push((token, ok));
                }
                (0, !ok)
            }
        }
    }

    /// Whether output to session `key` waits for the log (see [`Shard::unwritten_visible`]): a
    /// stored session's deliveries, PUBRELs and CONNACK, and any CONNACK, show the client records
    /// the broker does not wait to make durable (`Sent`, `Released`, snapshots). Asked before the
    /// output is filled (the CONNACK leaves the queue then). Output of other sessions never waits.
    pub fn output_held(&self, key: SessionKey) -> bool {
        self.store.is_some()
            && self.sessions.get(key).is_some_and(|session| {
                session.store_uid != 0
                    || matches!(session.control.front(), Some(Control::Other(p)) if matches!(**p, Packet::ConnAck(_)))
            })
    }

    /// The log end that held output (and every close) waits for before it leaves, if the log has
    /// not written it yet: the output waits only until the sync thread has written the records,
    /// never for a flush, and nothing is written on the shard's thread for it.
    pub fn unwritten_visible(&self) -> Option<Offset> {
        self.store.as_ref()?.unwritten_visible()
    }

    /// Whether the log has written everything below `end` (or will write nothing more: it failed,
    /// or there is no store).
    pub fn is_written(&self, end: Offset) -> bool {
        self.store.as_ref().is_none_or(|store| store.written_end() >= end)
    }

    /// Registers `waker` to be woken once the log has written everything below `end`. Returns
    /// true (registering nothing) if it has already.
    pub fn wait_written(&mut self, end: Offset, waker: &Waker) -> bool {
        let Some(store) = self.store.as_mut() else { return true };
        // A writer waits for these records: hand them to the log's writer now if it is idle.
        store.commit_for_waiter();
        if store.notify_when_written(end) {
            return true;
        }
        self.written_waiters.register(end, waker);
        // The log keeps one wish: the nearest end anyone waits for.
        match self.written_waiters.nearest() {
            Some(nearest) if nearest < end && store.notify_when_written(nearest) => self.poll_written(),
            _ => {}
        }
        false
    }

    /// Wakes the writers whose output the log has now written (all of them if the log failed:
    /// it writes nothing more), and asks the log to wake the shard for the nearest of the others.
    fn poll_written(&mut self) {
        let Some(store) = self.store.as_ref() else { return };
        loop {
            self.written_waiters.wake_until(store.written_end());
            let Some(nearest) = self.written_waiters.nearest() else { return };
            if !store.notify_when_written(nearest) {
                return;
            }
        }
    }

    /// Answers every waiter whose records are now durable, and sends the batched answers to other
    /// shards. Called after each mesh batch and on each tick.
    pub fn poll_durable(&mut self) {
        if let Some(store) = &mut self.store {
            // The end of a loop turn: what this turn appended goes to the log's sync thread.
            store.commit();
            let durable = store.durable_offset();
            while self.durable_waiters.front().is_some_and(|(end, _)| *end <= durable) {
                let (_, waiter) = self.durable_waiters.pop_front().expect("front checked");
                match waiter {
                    Waiter::Local(token) => self.answer(token, true),
                    Waiter::Remote(shard, token) => self.durable_replies[shard.index()].push((token, true)),
                    Waiter::Subscribe(token) => self.subscribe_answered(token, Vec::new(), Instant::now()),
                }
            }
        }
        self.poll_written();
        for to in 0..self.durable_replies.len() {
            if !self.durable_replies[to].is_empty() {
                let replies = std::mem::take(&mut self.durable_replies[to]);
                self.outbox.send(ShardId(to as u16), MeshMsg::Durable(Box::new(replies)));
            }
        }
    }

    /// Message `stored` is finished for session `key` (acknowledged or dropped).
    fn store_release(&mut self, key: SessionKey, stored: u64) {
        if stored == 0 {
            return;
        }
        let Some(uid) = self.sessions.get(key).map(|s| s.store_uid) else { return };
        if let (Some(store), true) = (self.store.as_mut(), uid != 0) {
            store.release(uid, stored, false);
        }
    }

    fn on_subscribe(&mut self, key: SessionKey, conn: ConnId, subscribe: Subscribe, now: Instant) {
        let session = self.sessions.get_mut(key).expect("caller checked");
        let v5 = session.version.is_v5();
        let tenant = session.tenant;
        let subscription_id = subscribe.properties.subscription_identifiers.first().copied();
        let mut reasons = Vec::with_capacity(subscribe.subscriptions.len());
        let mut changes = Vec::new();
        let mut queries: Vec<(Arc<str>, SubEntry)> = Vec::new();
        for subscription in subscribe.subscriptions {
            let filter = subscription.filter.as_str();
            let shared = match topic::parse_shared(filter) {
                Ok(shared) => shared,
                Err(_) => {
                    reasons.push(if v5 {
                        ReasonCode::TopicFilterInvalid
                    } else {
                        ReasonCode::UnspecifiedError
                    });
                    continue;
                }
            };
            if topic::validate_topic_filter(filter).is_err() {
                reasons.push(if v5 { ReasonCode::TopicFilterInvalid } else { ReasonCode::UnspecifiedError });
                continue;
            }
            let inner = shared.map(|s| s.filter).unwrap_or(filter);
            let session = self.sessions.get(key).expect("caller checked");
            if let Some(limit) = topic_limit(&session.settings, inner) {
                session.tenant_state.count(limit);
                self.event_refused(key, filter, limit.name());
                reasons.push(if v5 { ReasonCode::TopicFilterInvalid } else { ReasonCode::UnspecifiedError });
                continue;
            }
            if self.is_denied(inner) || !self.acl_allows(key, Action::Subscribe, inner) {
                bump(&self.stats.dropped_denied, 1);
                self.event_refused(key, filter, "not authorized");
                reasons.push(if v5 { ReasonCode::NotAuthorized } else { ReasonCode::UnspecifiedError });
                continue;
            }
            let entry = SubEntry { options: subscription.options, subscription_id };
            if let Some(shared) = shared {
                let session = self.sessions.get(key).expect("caller checked");
                if let Some(max) = session.settings.max_shared_group_members {
                    let members = session
                        .tenant_state
                        .shared_members
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&(Arc::from(shared.group), Arc::from(shared.filter)))
                        .copied()
                        .unwrap_or(0);
                    if members >= max && !session.subscriptions.contains_key(filter) {
                        session.tenant_state.count(Limit::SharedGroupMembers);
                        self.event_refused(key, filter, "shared group members");
                        reasons.push(if v5 {
                            ReasonCode::QuotaExceeded
                        } else {
                            ReasonCode::UnspecifiedError
                        });
                        continue;
                    }
                }
            }
            let session = self.sessions.get_mut(key).expect("caller checked");
            let subscriptions_max = session
                .settings
                .max_subscriptions_per_session
                .unwrap_or(self.cfg.subscriptions_per_session_max);
            if session.subscriptions.len() >= subscriptions_max && !session.subscriptions.contains_key(filter)
            {
                session.tenant_state.count(Limit::Subscriptions);
                bump(&self.stats.subscriptions_refused_quota, 1);
                self.event_refused(key, filter, "subscription quota");
                reasons.push(if v5 { ReasonCode::QuotaExceeded } else { ReasonCode::UnspecifiedError });
                continue;
            }
            let existed = session.subscriptions.insert(filter.into(), entry.clone()).is_some();
            self.slice_add(tenant, key, filter, entry.clone(), &mut changes);
            let wants_retained = shared.is_none()
                && match entry.options.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendIfNew => !existed,
                    RetainHandling::DoNotSend => false,
                };
            if wants_retained {
                queries.push((Arc::from(inner), entry.clone()));
            }
            if let Some(session) = self.sessions.get(key) {
                self.cfg.events.event(&Event::Subscribed {
                    tenant,
                    client_id: session.client_id.as_str(),
                    filter,
                    qos: entry.options.qos as u8,
                });
            }
            reasons.push(match entry.options.qos {
                QoS::AtMostOnce => ReasonCode::GrantedQoS0,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
        }
        let suback = SubAck { packet_id: subscribe.packet_id, properties: Properties::default(), reasons };
        self.persist_session(key);
        let mut retained = Vec::new();
        for (index, (filter, _)) in queries.iter().enumerate() {
            self.collect_retained(tenant, filter, now, |msg| retained.push((index, msg)));
        }
        let others = self.shard_count() - 1;
        // A stored session's new subscriptions are durable before the SUBACK says so.
        let unsynced = self.store.as_ref().map(|s| s.end_offset()).filter(|end| {
            self.sessions.get(key).is_some_and(|s| s.store_uid != 0)
                && self.store.as_ref().is_some_and(|s| s.durable_offset() < *end)
        });
        let waiting = others + usize::from(unsynced.is_some());
        let mut pending = PendingSubscribe { session: key, conn, suback, waiting, queries, retained };
        if waiting == 0 {
            self.finish_subscribe(&mut pending, now);
            return;
        }
        let token = self.new_token();
        if let Some(end) = unsynced {
            self.durable_waiters.push_back((end, Waiter::Subscribe(token)));
        }
        let retain_queries: Vec<Arc<str>> = pending.queries.iter().map(|(f, _)| f.clone()).collect();
        for to in 0..self.shard_count() {
            if to == self.id.index() {
                continue;
            }
            let sync = SubscribeSync {
                token,
                changes: changes.clone(),
                tenant,
                retain_queries: retain_queries.clone(),
            };
            self.outbox.send(ShardId(to as u16), MeshMsg::Subscribe(Box::new(sync)));
        }
        self.pending_subscribes.insert(token, pending);
    }

    /// One answer for a pending SUBSCRIBE (a shard's retained messages, or local durability).
    fn subscribe_answered(&mut self, token: u64, retained: Vec<(usize, Arc<Message>)>, now: Instant) {
        let Some(pending) = self.pending_subscribes.get_mut(&token) else { return };
        pending.retained.extend(retained);
        pending.waiting -= 1;
        if pending.waiting == 0 {
            let mut pending = self.pending_subscribes.remove(&token).expect("present above");
            self.finish_subscribe(&mut pending, now);
        }
    }

    fn finish_subscribe(&mut self, pending: &mut PendingSubscribe, now: Instant) {
        let Some(session) = self.sessions.get_mut(pending.session) else { return };
        if session.conn.as_ref().map(|c| c.id) == Some(pending.conn) {
            let suback = std::mem::replace(
                &mut pending.suback,
                SubAck { packet_id: 0, properties: Properties::default(), reasons: Vec::new() },
            );
            session.push_control(Packet::SubAck(suback));
        }
        let retained = std::mem::take(&mut pending.retained);
        for (index, msg) in retained {
            let Some((_, entry)) = pending.queries.get(index) else { continue };
            if msg.is_expired(now) {
                continue;
            }
            let delivery = Delivery {
                qos: msg.qos.min(entry.options.qos),
                retain: true,
                subscription_ids: entry.subscription_id.into_iter().collect(),
                msg: msg.clone(),
                stored: 0,
            };
            self.deliveries.push((pending.session, delivery, false));
            self.deliver_batch(&msg);
        }
    }

    fn on_unsubscribe(&mut self, key: SessionKey, unsubscribe: Unsubscribe) {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        let mut changes = Vec::new();
        for filter in &unsubscribe.filters {
            let session = self.sessions.get_mut(key).expect("caller checked");
            let tenant = session.tenant;
            if session.subscriptions.remove(filter.as_str()).is_some() {
                self.cfg.events.event(&Event::Unsubscribed {
                    tenant,
                    client_id: session.client_id.as_str(),
                    filter: filter.as_str(),
                });
                self.slice_remove(tenant, key, filter, &mut changes);
                reasons.push(ReasonCode::Success);
            } else {
                reasons.push(ReasonCode::NoSubscriptionExisted);
            }
        }
        self.broadcast_interest(changes);
        self.persist_session(key);
        let session = self.sessions.get_mut(key).expect("caller checked");
        let unsuback =
            UnsubAck { packet_id: unsubscribe.packet_id, properties: Properties::default(), reasons };
        session.push_control(Packet::UnsubAck(unsuback));
    }

    // ----- trie slice and interest table ----------------------------------------------------

    /// Adds (or replaces) session `key`'s subscription to `filter` in the trie slice, recording an
    /// interest change if the slice entry (or share group) was empty on this shard.
    fn slice_add(
        &mut self,
        tenant: TenantId,
        key: SessionKey,
        filter: &str,
        entry: SubEntry,
        changes: &mut Vec<InterestChange>,
    ) {
        let shared = topic::parse_shared(filter).ok().flatten();
        let inner = shared.map(|s| s.filter).unwrap_or(filter);
        let slot = self.slice.entry(tenant).or_default().get_or_insert_with(inner, || SliceEntry {
            filter: Arc::from(inner),
            direct: Vec::new(),
            shared: Vec::new(),
        });
        let filter_arc = slot.filter.clone();
        let change = match shared {
            None => {
                let was_empty = slot.direct.is_empty();
                match slot.direct.iter_mut().find(|(k, _)| *k == key) {
                    Some(existing) => existing.1 = entry,
                    None => slot.direct.push((key, entry)),
                }
                was_empty.then_some(InterestChange { tenant, filter: filter_arc, group: None, add: true })
            }
            Some(shared) => {
                let group = match slot.shared.iter_mut().position(|g| &*g.group == shared.group) {
                    Some(index) => &mut slot.shared[index],
                    None => {
                        slot.shared.push(SharedMembers {
                            group: Arc::from(shared.group),
                            members: Vec::new(),
                            cursor: 0,
                        });
                        slot.shared.last_mut().expect("just pushed")
                    }
                };
                let was_empty = group.members.is_empty();
                match group.members.iter_mut().find(|(k, _)| *k == key) {
                    Some(existing) => existing.1 = entry,
                    None => {
                        group.members.push((key, entry));
                        let state = self.cfg.tenants.state(tenant);
                        let mut counts = state.shared_members.lock().unwrap_or_else(|e| e.into_inner());
                        *counts.entry((group.group.clone(), filter_arc.clone())).or_default() += 1;
                    }
                }
                was_empty.then(|| InterestChange {
                    tenant,
                    filter: filter_arc,
                    group: Some(group.group.clone()),
                    add: true,
                })
            }
        };
        if let Some(change) = change {
            self.apply_interest(self.id, &change);
            changes.push(change);
        }
    }

    /// Removes session `key`'s subscription to `filter` from the slice; records an interest change
    /// when the entry (or group) becomes empty on this shard.
    fn slice_remove(
        &mut self,
        tenant: TenantId,
        key: SessionKey,
        filter: &str,
        changes: &mut Vec<InterestChange>,
    ) {
        let shared = topic::parse_shared(filter).ok().flatten();
        let inner = shared.map(|s| s.filter).unwrap_or(filter);
        let mut change = None;
        let Some(trie) = self.slice.get_mut(&tenant) else { return };
        trie.remove_if(inner, |slot| {
            match shared {
                None => {
                    let before = slot.direct.len();
                    slot.direct.retain(|(k, _)| *k != key);
                    if before > 0 && slot.direct.is_empty() {
                        change = Some(InterestChange {
                            tenant,
                            filter: slot.filter.clone(),
                            group: None,
                            add: false,
                        });
                    }
                }
                Some(shared) => {
                    if let Some(index) = slot.shared.iter().position(|g| &*g.group == shared.group) {
                        let group = &mut slot.shared[index];
                        let before = group.members.len();
                        group.members.retain(|(k, _)| *k != key);
                        if group.members.len() < before {
                            let state = self.cfg.tenants.state(tenant);
                            let mut counts = state.shared_members.lock().unwrap_or_else(|e| e.into_inner());
                            let key = (group.group.clone(), slot.filter.clone());
                            if let Some(count) = counts.get_mut(&key) {
                                *count -= 1;
                                if *count == 0 {
                                    counts.remove(&key);
                                }
                            }
                        }
                        if group.members.is_empty() {
                            let group = slot.shared.swap_remove(index);
                            change = Some(InterestChange {
                                tenant,
                                filter: slot.filter.clone(),
                                group: Some(group.group),
                                add: false,
                            });
                        }
                    }
                }
            }
            slot.direct.is_empty() && slot.shared.is_empty()
        });
        if trie.filter_count() == 0 {
            self.slice.remove(&tenant);
        }
        if let Some(change) = change {
            self.apply_interest(self.id, &change);
            changes.push(change);
        }
    }

    fn broadcast_interest(&mut self, changes: Vec<InterestChange>) {
        if changes.is_empty() || self.shard_count() == 1 {
            return;
        }
        for to in 0..self.shard_count() {
            if to != self.id.index() {
                self.outbox.send(ShardId(to as u16), MeshMsg::Interest(Box::new(changes.clone())));
            }
        }
    }

    /// Applies shard `from`'s interest change to this shard's copy of the interest table.
    fn apply_interest(&mut self, from: ShardId, change: &InterestChange) {
        let bit = 1u64 << from.index();
        if change.add {
            let trie = self.interest.entry(change.tenant).or_default();
            let entry = trie.get_or_insert_with(&change.filter, || Interest {
                filter: change.filter.clone(),
                shards: 0,
                shared: Vec::new(),
            });
            match &change.group {
                None => entry.shards |= bit,
                Some(group) => match entry.shared.iter_mut().find(|(g, _, _)| g == group) {
                    Some(existing) => existing.1 |= bit,
                    None => entry.shared.push((group.clone(), bit, 0)),
                },
            }
        } else {
            let Some(trie) = self.interest.get_mut(&change.tenant) else { return };
            trie.remove_if(&change.filter, |entry| {
                match &change.group {
                    None => entry.shards &= !bit,
                    Some(group) => {
                        if let Some(existing) = entry.shared.iter_mut().find(|(g, _, _)| g == group) {
                            existing.1 &= !bit;
                        }
                        entry.shared.retain(|(_, mask, _)| *mask != 0);
                    }
                }
                entry.shards == 0 && entry.shared.is_empty()
            });
            if trie.filter_count() == 0 {
                self.interest.remove(&change.tenant);
            }
        }
    }

    // ----- routing ---------------------------------------------------------------------------

    /// Routes a message published on this shard to every interested shard (itself included).
    /// With a token, returns how many durability answers to wait for, and whether the local store
    /// failed to take the message.
    pub fn route(&mut self, msg: Arc<Message>, token: u64) -> (u32, bool) {
        let mut shards = 0u64;
        let mut shared_targets: Vec<(ShardId, Arc<str>, Arc<str>)> = Vec::new();
        let Some(interest) = self.interest.get_mut(&msg.tenant) else { return (0, false) };
        interest.for_each_match_mut(&msg.topic, |entry| {
            shards |= entry.shards;
            for (group, mask, cursor) in entry.shared.iter_mut() {
                // Round-robin over the shards that have members of this group.
                let count = mask.count_ones();
                let nth = *cursor % count;
                *cursor = cursor.wrapping_add(1);
                let mut remaining = *mask;
                for _ in 0..nth {
                    remaining &= remaining - 1;
                }
                let shard = ShardId(remaining.trailing_zeros() as u16);
                shared_targets.push((shard, group.clone(), entry.filter.clone()));
            }
        });
        let mut waiting = 0u32;
        let mut failed = false;
        let mut rest = shards;
        while rest != 0 {
            let index = rest.trailing_zeros() as u16;
            rest &= rest - 1;
            if index == self.id.0 {
                let persisted = self.deliver_local(&msg);
                let (w, f) = self.settle(self.id, token, persisted);
                waiting += w;
                failed |= f;
            } else {
                // A shard with no stored, subscribed session stores nothing: no answer to wait for.
                // (The count rises before the SUBACK that makes such a session receive anything.)
                let token = self.token_for(ShardId(index), token);
                self.outbox.send(ShardId(index), MeshMsg::Publish(msg.clone(), token));
                waiting += u32::from(token != 0);
            }
        }
        for (shard, group, filter) in shared_targets {
            if shard == self.id {
                let persisted = self.deliver_shared(&msg, &group, &filter);
                let (w, f) = self.settle(self.id, token, persisted);
                waiting += w;
                failed |= f;
            } else {
                let token = self.token_for(shard, token);
                self.outbox.send(shard, MeshMsg::SharedPublish { msg: msg.clone(), group, filter, token });
                waiting += u32::from(token != 0);
            }
        }
        (waiting, failed)
    }

    /// The token to send to shard `to`: 0 (no answer) when it has no stored, subscribed session.
    fn token_for(&self, to: ShardId, token: u64) -> u64 {
        if token != 0 && self.outbox.mesh.stored_subscribers[to.index()].load(Ordering::SeqCst) > 0 {
            token
        } else {
            0
        }
    }

    /// Keeps session `key`'s place in this shard's count of stored, subscribed sessions.
    fn recount_stored(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(key) else { return };
        let want = session.store_uid != 0 && !session.subscriptions.is_empty();
        if want != session.counted_stored {
            session.counted_stored = want;
            let counter = &self.outbox.mesh.stored_subscribers[self.id.index()];
            if want {
                counter.fetch_add(1, Ordering::SeqCst);
            } else {
                counter.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Delivers a message to this shard's direct subscribers: one delivery per session at the
    /// highest QoS of its matching subscriptions, with all their subscription identifiers.
    fn deliver_local(&mut self, msg: &Arc<Message>) -> Persisted {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let me = self.id;
        let Some(slice) = self.slice.get(&msg.tenant) else {
            self.scratch = scratch;
            return Persisted::Nothing;
        };
        slice.for_each_match(&msg.topic, |entry| {
            for (key, sub) in &entry.direct {
                if sub.options.no_local && msg.origin == Some(Origin { shard: me, session: *key }) {
                    continue;
                }
                scratch.push((*key, sub.options.qos, sub.options.retain_as_published, sub.subscription_id));
            }
        });
        if scratch.len() > 1 {
            scratch.sort_unstable_by_key(|(key, ..)| *key);
        }
        let mut index = 0;
        while index < scratch.len() {
            let (key, mut qos, mut rap, first_id) = scratch[index];
            let mut ids: Vec<u32> = first_id.into_iter().collect();
            let mut next = index + 1;
            while next < scratch.len() && scratch[next].0 == key {
                qos = qos.max(scratch[next].1);
                rap |= scratch[next].2;
                ids.extend(scratch[next].3);
                next += 1;
            }
            index = next;
            let Some(session) = self.sessions.get(key) else { continue };
            let delivery = Delivery {
                msg: msg.clone(),
                qos: msg.qos.min(qos),
                // MQTT-3.3.1-9 / -12: retain is cleared on ordinary delivery unless retain-as-published.
                retain: msg.retain && rap && session.version.is_v5(),
                subscription_ids: ids,
                stored: 0,
            };
            let store = self.wants_store(session, &delivery);
            self.deliveries.push((key, delivery, store));
        }
        self.scratch = scratch;
        self.deliver_batch(msg)
    }

    /// Whether a delivery to `session` is kept in the store: QoS 1/2 (or offline QoS 0 when
    /// configured) for a persistent session.
    fn wants_store(&self, session: &Session, delivery: &Delivery) -> bool {
        self.store.is_some()
            && session.is_persistent()
            && (delivery.qos != QoS::AtMostOnce || (session.conn.is_none() && self.cfg.queue_qos0_offline))
    }

    /// Stores (one `Msg` record for all the persistent sessions among them) and queues the
    /// deliveries of one message gathered in `self.deliveries`.
    fn deliver_batch(&mut self, msg: &Arc<Message>) -> Persisted {
        let mut deliveries = std::mem::take(&mut self.deliveries);
        let mut persisted = Persisted::Nothing;
        let targets: Vec<Target> = deliveries
            .iter()
            .filter(|(_, _, store)| *store)
            .filter_map(|(key, d, _)| {
                let uid = self.sessions.get(*key).map(|s| s.store_uid).filter(|&uid| uid != 0)?;
                Some(Target {
                    uid,
                    qos: d.qos,
                    retain: d.retain,
                    subscription_ids: d.subscription_ids.clone(),
                })
            })
            .collect();
        if !targets.is_empty() {
            let store = self.store.as_mut().expect("wants_store checked the store");
            match store.put_msg(msg, targets, &Clock::now()) {
                Ok(id) => {
                    persisted = Persisted::Appended;
                    for (key, delivery, store) in deliveries.iter_mut() {
                        if *store && self.sessions.get(*key).is_some_and(|s| s.store_uid != 0) {
                            delivery.stored = id;
                        }
                    }
                }
                Err(error) => {
                    persisted = Persisted::Failed;
                    tracing::debug!(shard = self.id.0, %error, "store: message not stored");
                }
            }
        }
        for (key, delivery, _) in deliveries.drain(..) {
            let Some(session) = self.sessions.get_mut(key) else { continue };
            let uid = session.store_uid;
            if let Some(dropped) = Self::enqueue(&self.cfg, &self.stats, self.id.index(), session, delivery) {
                if let (Some(store), true) = (self.store.as_mut(), dropped != 0 && uid != 0) {
                    store.release(uid, dropped, false);
                }
            }
        }
        self.deliveries = deliveries;
        persisted
    }

    /// Delivers a message to one member (round-robin) of a share group on this shard.
    fn deliver_shared(&mut self, msg: &Arc<Message>, group: &str, filter: &str) -> Persisted {
        let Some(slot) = self.slice.get_mut(&msg.tenant).and_then(|trie| trie.get_mut(filter)) else {
            return Persisted::Nothing;
        };
        let Some(members) = slot.shared.iter_mut().find(|g| &*g.group == group) else {
            return Persisted::Nothing;
        };
        if members.members.is_empty() {
            return Persisted::Nothing;
        }
        // Prefer a connected member; fall back to any (its session queues the message).
        let count = members.members.len();
        let start = members.cursor % count;
        members.cursor = members.cursor.wrapping_add(1);
        let mut chosen = members.members[start].clone();
        for step in 0..count {
            let candidate = &members.members[(start + step) % count];
            if self.sessions.get(candidate.0).is_some_and(|s| s.conn.is_some()) {
                chosen = candidate.clone();
                break;
            }
        }
        let (key, sub) = chosen;
        let Some(session) = self.sessions.get(key) else { return Persisted::Nothing };
        let delivery = Delivery {
            msg: msg.clone(),
            qos: msg.qos.min(sub.options.qos),
            retain: msg.retain && sub.options.retain_as_published && session.version.is_v5(),
            subscription_ids: sub.subscription_id.into_iter().collect(),
            stored: 0,
        };
        let store = self.wants_store(session, &delivery);
        self.deliveries.push((key, delivery, store));
        self.deliver_batch(msg)
    }

    /// Queues a delivery on a session, applying the queue bound and the offline rules. Returns the
    /// store id of a stored delivery it dropped (the new one or an evicted one), for the caller to
    /// release; 0 if none.
    fn enqueue(
        cfg: &BrokerConfig,
        stats: &ShardStats,
        shard: usize,
        session: &mut Session,
        delivery: Delivery,
    ) -> Option<u64> {
        // Counts a drop on the shard and the tenant (by `why`) and emits the event (with `reason`).
        let dropped = |session: &Session, delivery: &Delivery, why: DropReason, reason: &'static str| {
            let counter = match why {
                DropReason::Offline => &stats.dropped_offline_qos0,
                _ => &stats.dropped_queue_full,
            };
            bump(counter, 1);
            session.tenant_state.traffic(shard).drop_one(why);
            cfg.events.event(&Event::Dropped {
                tenant: session.tenant,
                client_id: session.client_id.as_str(),
                topic: delivery.msg.topic.as_str(),
                reason,
            });
        };
        if session.conn.is_none()
            && (!session.is_persistent() || (delivery.qos == QoS::AtMostOnce && !cfg.queue_qos0_offline))
        {
            dropped(session, &delivery, DropReason::Offline, "offline");
            return Some(delivery.stored);
        }
        let mut evicted = None;
        let queued_max = session.settings.max_queued_messages.unwrap_or(cfg.queued_messages_max);
        if session.queue.len() + session.backlog.len() >= queued_max {
            if delivery.qos == QoS::AtMostOnce {
                dropped(session, &delivery, DropReason::QueueFull, "queue full");
                return Some(delivery.stored);
            }
            // QoS 0 messages go first, whatever the policy.
            if let Some(index) = session.queue.iter().position(|d| d.qos == QoS::AtMostOnce) {
                evicted = session.queue.remove(index).map(|d| d.stored);
            } else {
                match session.settings.queue_full_policy.unwrap_or(cfg.queue_full_policy) {
                    QueueFullPolicy::DropNew => {
                        dropped(session, &delivery, DropReason::QueueFull, "queue full");
                        return Some(delivery.stored);
                    }
                    QueueFullPolicy::DropOldest => {
                        evicted = match session.backlog.pop_front() {
                            Some(lazy) => Some(lazy.stored()),
                            None => session.queue.pop_front().map(|d| d.stored),
                        };
                    }
                    QueueFullPolicy::Disconnect => {
                        dropped(session, &delivery, DropReason::QueueFull, "queue full");
                        if let Some(conn) = &session.conn {
                            conn.close(Some(ReasonCode::QuotaExceeded));
                        }
                        return Some(delivery.stored);
                    }
                }
            }
            // The evicted message is the one dropped; it is named by the one that evicted it.
            dropped(session, &delivery, DropReason::QueueFull, "queue full (oldest evicted)");
        }
        session.queue.push_back(delivery);
        session.wake_writer();
        evicted
    }

    // ----- retained messages -----------------------------------------------------------------

    /// Sets (or deletes) the retained message of `msg`'s topic on its partition's shard. With a
    /// token, returns (answers to wait for, failed) as [`Shard::route`] does.
    fn retain(&mut self, msg: Arc<Message>, token: u64) -> (u32, bool) {
        let owner = retain_shard(msg.tenant, &msg.topic, self.shard_count());
        if owner == self.id {
            let persisted = self.retain_set(msg);
            self.settle(self.id, token, persisted)
        } else {
            self.outbox.send(owner, MeshMsg::RetainSet(msg, token));
            (u32::from(token != 0), false)
        }
    }

    /// Applies a retained message (or its deletion) to this shard's partition and its store.
    fn retain_set(&mut self, msg: Arc<Message>) -> Persisted {
        let kept = self.retain_memory(msg.clone(), true);
        let Some(store) = self.store.as_mut() else { return Persisted::Nothing };
        let result = if msg.payload.is_empty() {
            store.retain_del(msg.tenant, &msg.topic)
        } else if kept {
            store.retain_set(&msg, &Clock::now())
        } else {
            return Persisted::Failed;
        };
        match result {
            Ok(()) => Persisted::Appended,
            Err(error) => {
                tracing::debug!(shard = self.id.0, %error, "store: retained message not stored");
                Persisted::Failed
            }
        }
    }

    /// Applies a retained message (or its deletion) to the in-memory partition. Returns false when
    /// the partition is full, or (with `quota`) the tenant has its most retained messages, and the
    /// message was not kept.
    fn retain_memory(&mut self, msg: Arc<Message>, quota: bool) -> bool {
        let tenant = msg.tenant;
        if msg.payload.is_empty() {
            if let Some(topics) = self.retained.get_mut(&tenant) {
                if topics.remove(msg.topic.as_str()).is_some() {
                    self.retained_count -= 1;
                    self.cfg.tenants.state(tenant).retained.fetch_sub(1, Ordering::Relaxed);
                }
                if topics.is_empty() {
                    self.retained.remove(&tenant);
                }
            }
            return true;
        }
        let per_shard_max = self.cfg.retained_messages_max.div_ceil(self.shard_count());
        let topics = self.retained.entry(tenant).or_default();
        let replaces = topics.contains_key(msg.topic.as_str());
        let state = (!replaces).then(|| self.cfg.tenants.state(tenant));
        let over_quota = quota
            && state.as_ref().is_some_and(|state| {
                let max = self.cfg.tenants.settings(tenant).max_retained_messages;
                max.is_some_and(|max| state.retained.load(Ordering::Relaxed) >= max)
            });
        if !replaces && (self.retained_count >= per_shard_max || over_quota) {
            bump(&self.stats.dropped_queue_full, 1);
            if topics.is_empty() {
                self.retained.remove(&tenant);
            }
            if let (true, Some(state)) = (over_quota, &state) {
                state.count(Limit::RetainedMessages);
                self.cfg.events.event(&Event::Dropped {
                    tenant,
                    client_id: "",
                    topic: msg.topic.as_str(),
                    reason: "retained message quota",
                });
            }
            return false;
        }
        topics.insert(msg.topic.as_str().into(), msg);
        if let Some(state) = state {
            self.retained_count += 1;
            state.retained.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    fn collect_retained(
        &mut self,
        tenant: TenantId,
        filter: &str,
        now: Instant,
        mut found: impl FnMut(Arc<Message>),
    ) {
        let Some(topics) = self.retained.get_mut(&tenant) else { return };
        if !topic::is_wildcard(filter) {
            if let Some(msg) = topics.get(filter) {
                if !msg.is_expired(now) {
                    found(msg.clone());
                }
            }
            return;
        }
        let before = topics.len();
        topics.retain(|_, msg| !msg.is_expired(now));
        let expired = before - topics.len();
        if expired > 0 {
            self.retained_count -= expired;
            self.cfg.tenants.state(tenant).retained.fetch_sub(expired as u64, Ordering::Relaxed);
        }
        for (topic_name, msg) in topics.iter() {
            if topic::matches(filter, topic_name) {
                found(msg.clone());
            }
        }
    }

    pub fn retained_count(&self) -> usize {
        self.retained_count
    }

    // ----- mesh ------------------------------------------------------------------------------

    /// Handles one message from another shard.
    pub fn on_mesh(&mut self, from: ShardId, msg: MeshMsg, now: Instant) {
        match msg {
            MeshMsg::Publish(msg, token) => {
                let persisted = self.deliver_local(&msg);
                self.settle(from, token, persisted);
            }
            MeshMsg::SharedPublish { msg, group, filter, token } => {
                let persisted = self.deliver_shared(&msg, &group, &filter);
                self.settle(from, token, persisted);
            }
            MeshMsg::Durable(answers) => {
                for (token, ok) in answers.iter() {
                    self.answer(*token, *ok);
                }
            }
            MeshMsg::Handoff(handoff) => self.handoffs.push(*handoff),
            MeshMsg::Interest(changes) => {
                for change in changes.iter() {
                    self.apply_interest(from, change);
                }
            }
            MeshMsg::Subscribe(sync) => {
                for change in &sync.changes {
                    self.apply_interest(from, change);
                }
                let mut retained = Vec::new();
                for (index, filter) in sync.retain_queries.iter().enumerate() {
                    self.collect_retained(sync.tenant, filter, now, |msg| retained.push((index, msg)));
                }
                self.outbox.send(
                    from,
                    MeshMsg::SubscribeDone(Box::new(SubscribeDone { token: sync.token, retained })),
                );
            }
            MeshMsg::SubscribeDone(done) => {
                let SubscribeDone { token, retained } = *done;
                self.subscribe_answered(token, retained, now);
            }
            MeshMsg::RetainSet(msg, token) => {
                let persisted = self.retain_set(msg);
                self.settle(from, token, persisted);
            }
        }
    }

    /// Encodes what session `key` owes connection `conn` into `out`. Returns false when the
    /// connection no longer owns the session. The writer sends `out` once
    /// [`Shard::output_held`] and [`Shard::unwritten_visible`] let it.
    pub fn fill_output(&mut self, key: SessionKey, conn: ConnId, out: &mut BytesMut, now: Instant) -> bool {
        let budget = self.cfg.write_buffer_bytes_max;
        let inflight_max = self.cfg.inflight_count_max;
        let Some(session) = self.sessions.get_mut(key) else { return false };
        if session.conn.as_ref().map(|c| c.id) != Some(conn) {
            return false;
        }
        let mut events = std::mem::take(&mut self.fill_events);
        let store = self.store.as_ref();
        let mut clock = None;
        let mut load = |id: u64| {
            let clock = *clock.get_or_insert_with(Clock::now);
            store.and_then(|s| s.load(id, &clock))
        };
        let FillStats { sent_by_qos, payload_bytes_sent, dropped_expired, dropped_too_large } =
            session.fill(out, budget, inflight_max, now, &mut events, &mut load);
        let publishes_sent: u64 = sent_by_qos.iter().sum();
        if publishes_sent + dropped_expired + dropped_too_large > 0 {
            let traffic = session.tenant_state.traffic(self.id.index());
            for (qos, sent) in sent_by_qos.into_iter().enumerate() {
                if sent > 0 {
                    traffic.publishes_out[qos].fetch_add(sent, Ordering::Relaxed);
                }
            }
            traffic.payload_bytes_out.fetch_add(payload_bytes_sent, Ordering::Relaxed);
            traffic.dropped[DropReason::Expired as usize].fetch_add(dropped_expired, Ordering::Relaxed);
            traffic.dropped[DropReason::TooLarge as usize].fetch_add(dropped_too_large, Ordering::Relaxed);
        }
        let uid = session.store_uid;
        if let (Some(store), true) = (self.store.as_mut(), uid != 0) {
            for event in events.drain(..) {
                match event {
                    FillEvent::Sent { stored, packet_id } => store.sent(uid, stored, packet_id),
                    FillEvent::Dropped { stored } => store.release(uid, stored, false),
                }
            }
        }
        events.clear();
        self.fill_events = events;
        bump(&self.stats.publishes_out, publishes_sent);
        bump(&self.stats.dropped_expired, dropped_expired);
        bump(&self.stats.dropped_too_large, dropped_too_large);
        true
    }

    /// Asks every connection to close with `reason` (server shutdown).
    pub fn close_all(&mut self, reason: ReasonCode) {
        for key in self.sessions.keys() {
            if let Some(conn) = self.sessions.get(key).and_then(|s| s.conn.as_ref()) {
                conn.close(Some(reason));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    /// A waker that counts its wakes.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counter() -> (Arc<Counter>, Waker) {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        (counter.clone(), Waker::from(counter))
    }

    fn wakes(counter: &Counter) -> usize {
        counter.0.load(Ordering::Relaxed)
    }

    /// Writers are woken exactly when the log has written their end, in any order they registered
    /// in; the nearest end is the one the log is asked to report; a writer registering again
    /// raises its entry instead of adding one.
    #[test]
    fn written_waiters_wake_each_writer_once_its_end_is_written() {
        let mut waiters = WrittenWaiters::default();
        let (a, wa) = counter();
        let (b, wb) = counter();
        let (c, wc) = counter();
        waiters.register(Offset(100), &wa);
        waiters.register(Offset(300), &wb);
        // Out of order: put in its place.
        waiters.register(Offset(200), &wc);
        assert_eq!(waiters.nearest(), Some(Offset(100)));
        waiters.wake_until(Offset(99));
        assert_eq!((wakes(&a), wakes(&b), wakes(&c)), (0, 0, 0), "nothing written far enough");
        waiters.wake_until(Offset(200));
        assert_eq!((wakes(&a), wakes(&b), wakes(&c)), (1, 0, 1), "100 and 200 are written");
        assert_eq!(waiters.nearest(), Some(Offset(300)));
        // The newest writer again (it was woken for another reason and waits further): one entry.
        waiters.register(Offset(400), &wb);
        assert_eq!(waiters.0.len(), 1);
        waiters.wake_until(Offset(399));
        assert_eq!(wakes(&b), 0, "its end is now 400");
        waiters.wake_until(Offset(u64::MAX));
        assert_eq!((wakes(&a), wakes(&b), wakes(&c)), (1, 1, 1), "each woken once");
        assert_eq!(waiters.nearest(), None);
    }
}
