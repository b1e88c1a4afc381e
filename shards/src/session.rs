//! [`Session`]: the state of one client session on its home shard, and the encoding of what it
//! owes its connection.
//!
//! Owner: the session's home shard (`hash(tenant, client id) mod cores`). Lifecycle: created by a
//! CONNECT, kept while connected and, for persistent sessions, until its expiry after disconnect;
//! taken over (same key, new connection) by a later CONNECT with the same client id.
//!
//! Bounds and policy: at most `queued_messages_max` undelivered messages (full policy:
//! QoS 0 dropped first, then the configured policy), at most the client's receive maximum (or
//! `inflight_count_max`) unacknowledged outgoing QoS 1/2 messages, at most our receive maximum
//! incoming QoS 2 packet ids awaiting PUBREL, at most `topic_alias_max` incoming aliases and at
//! most the client's topic alias maximum outgoing aliases.
//!
//! Invariant: a packet id is in at most one of `inflight` (outgoing) at a time; a packet id in
//! `incoming_qos2` has been routed exactly once and is not routed again until PUBREL frees it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use shardmq_protocol::{
    encode, encoded_len, Packet, PacketId, Properties, ProtocolVersion, PubResp, Publish, QoS, ReasonCode,
    SubscriptionOptions, Utf8, Will,
};

use crate::conn::ConnShared;
use crate::message::{Delivery, LazyDelivery, Message, TenantId};
use crate::tenants::{TenantSettings, TenantState};

/// A session's slot on its home shard, with a generation so a stale key never reaches a reused slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub index: u32,
    pub generation: u32,
}

/// A connection's id, unique per shard for the process lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// A packet other than PUBLISH queued for a connection. Acks and PINGRESP, the common ones, take
/// 8 bytes instead of a whole `Packet` (472 bytes): a session's control queue keeps its capacity,
/// and idle memory per connection is a headline figure.
#[derive(Debug)]
pub enum Control {
    /// PUBACK, PUBREC, PUBREL or PUBCOMP without properties.
    Ack {
        kind: AckKind,
        packet_id: PacketId,
        reason: ReasonCode,
    },
    PingResp,
    Other(Box<Packet>),
}

/// Which of the four acknowledgement packets a [`Control::Ack`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

impl From<Packet> for Control {
    fn from(packet: Packet) -> Control {
        let ack =
            |kind, resp: &PubResp| Control::Ack { kind, packet_id: resp.packet_id, reason: resp.reason };
        match packet {
            Packet::PubAck(resp) if resp.properties.is_empty() => ack(AckKind::PubAck, &resp),
            Packet::PubRec(resp) if resp.properties.is_empty() => ack(AckKind::PubRec, &resp),
            Packet::PubRel(resp) if resp.properties.is_empty() => ack(AckKind::PubRel, &resp),
            Packet::PubComp(resp) if resp.properties.is_empty() => ack(AckKind::PubComp, &resp),
            Packet::PingResp => Control::PingResp,
            other => Control::Other(Box::new(other)),
        }
    }
}

impl Control {
    /// The packet to encode.
    pub fn into_packet(self) -> Packet {
        match self {
            Control::Ack { kind, packet_id, reason } => {
                let resp = PubResp { packet_id, reason, properties: Properties::default() };
                match kind {
                    AckKind::PubAck => Packet::PubAck(resp),
                    AckKind::PubRec => Packet::PubRec(resp),
                    AckKind::PubRel => Packet::PubRel(resp),
                    AckKind::PubComp => Packet::PubComp(resp),
                }
            }
            Control::PingResp => Packet::PingResp,
            Control::Other(packet) => *packet,
        }
    }
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubEntry {
    pub options: SubscriptionOptions,
    pub subscription_id: Option<u32>,
}

/// Where an outgoing QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// PUBLISH sent (or to be re-sent), waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitAck,
    /// PUBREC received, PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

#[derive(Debug)]
pub struct Inflight {
    pub delivery: Delivery,
    pub state: InflightState,
    /// The PUBLISH went out on the current connection (false after a reconnect until re-sent).
    pub sent: bool,
}

/// The will of a connected session, kept until a normal disconnect clears it.
#[derive(Debug, Clone)]
pub struct WillState {
    pub will: Will,
    pub delay_secs: u32,
}

/// A QoS 1/2 PUBLISH from the client whose PUBACK/PUBREC waits for its message to be durable
/// (stored for every persistent session it was queued for). Acks leave in arrival order.
#[derive(Debug)]
pub struct PendingAck {
    /// The shard's token for the answers it waits on; unique and ascending within a session's
    /// queue (entries nobody waits on get one too).
    pub token: u64,
    pub packet_id: PacketId,
    pub qos: QoS,
    /// Answers still to come: one per shard the message was sent to, one for the local store.
    pub waiting: u32,
    /// Some store could not take the message (disk budget, full disk): v5 gets 0x97.
    pub failed: bool,
    /// The reason when nothing failed (0x87 for a denied topic).
    pub reason: ReasonCode,
    /// When the PUBLISH was handled, for the acknowledgement latency histogram.
    pub received_at: Instant,
}

/// What happened to stored deliveries while encoding, for the shard to record in its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillEvent {
    /// The stored message went out with this packet id.
    Sent { stored: u64, packet_id: PacketId },
    /// The stored message is finished without an acknowledgement: dropped (expired, too large for
    /// the client) or sent at QoS 0.
    Dropped { stored: u64 },
}

/// The settings a new session holds until its CONNECT gives it its tenant's: one shared value, so a
/// connect storm does not allocate (and free) a placeholder per session.
fn placeholder_settings() -> Arc<TenantSettings> {
    static PLACEHOLDER: std::sync::OnceLock<Arc<TenantSettings>> = std::sync::OnceLock::new();
    PLACEHOLDER.get_or_init(Arc::default).clone()
}

/// The tenant state a new session holds until its CONNECT gives it its tenant's (as above; the
/// state is also an aligned allocation, which fragments the heap when made and freed per session).
fn placeholder_tenant_state() -> Arc<TenantState> {
    static PLACEHOLDER: std::sync::OnceLock<Arc<TenantState>> = std::sync::OnceLock::new();
    PLACEHOLDER.get_or_init(Arc::default).clone()
}

/// Counters a session's encoder reports back to the shard.
#[derive(Debug, Default, Clone, Copy)]
pub struct FillStats {
    /// PUBLISH packets sent, by QoS, and their payload bytes.
    pub sent_by_qos: [u64; 3],
    pub payload_bytes_sent: u64,
    pub dropped_expired: u64,
    pub dropped_too_large: u64,
}

/// A connection's MQTT 5 topic aliases: incoming (alias -> topic) and outgoing (topic -> alias).
/// Both are bounded by the Topic Alias Maximum each side announced.
#[derive(Debug, Default)]
pub struct TopicAliases {
    pub inbound: HashMap<u16, Utf8>,
    pub outbound: HashMap<Utf8, u16>,
}

/// A client session. See the module docs for ownership and bounds.
#[derive(Debug)]
pub struct Session {
    pub key: SessionKey,
    pub tenant: TenantId,
    pub client_id: Utf8,
    pub version: ProtocolVersion,
    /// Full filter text (including `$share/{group}/`) -> subscription.
    pub subscriptions: HashMap<Box<str>, SubEntry>,
    pub conn: Option<Rc<ConnShared>>,
    /// Session expiry interval in seconds; `u32::MAX` never expires, 0 ends with the connection.
    pub expiry_secs: u32,
    /// When an offline session expires.
    pub expires_at: Option<Instant>,
    /// Boxed: most sessions have none, and a will with its properties is ~450 bytes.
    pub will: Option<Box<WillState>>,
    /// When a delayed will is due (session offline, will kept).
    pub will_due_at: Option<Instant>,
    /// Stored messages waiting to be sent, still in the store (recovered at start-up); they go
    /// before `queue`, which holds everything that arrived since.
    pub backlog: VecDeque<LazyDelivery>,
    /// Messages waiting to be sent.
    pub queue: VecDeque<Delivery>,
    /// Outgoing QoS 1/2 messages not yet completed, by packet id.
    pub inflight: BTreeMap<PacketId, Inflight>,
    next_packet_id: PacketId,
    /// Packets other than PUBLISH waiting to be written (acks, SUBACK, PINGRESP, ...).
    pub control: VecDeque<Control>,
    /// Incoming QoS 2 packet ids received and routed, awaiting PUBREL.
    pub incoming_qos2: HashSet<PacketId>,
    /// Per connection: the client's receive maximum (outgoing window), maximum packet size, topic
    /// alias maximum, and whether it wants reason strings and user properties on errors.
    pub client_receive_maximum: u16,
    pub client_packet_size_max: u32,
    pub client_topic_alias_max: u16,
    pub request_problem_information: bool,
    /// Per connection: its topic aliases, absent until the first is used (most clients use none,
    /// and two empty maps would add 96 bytes to every idle connection).
    pub aliases: Option<Box<TopicAliases>>,
    /// The tenant's settings as of the current connection's CONNECT, and the tenant's shared state.
    pub settings: Arc<TenantSettings>,
    pub tenant_state: Arc<TenantState>,
    /// The address of the current (or last) connection's client (boxed: the session's size is a
    /// per-connection cost, and this is read only by the admin API).
    pub peer: Option<Box<std::net::SocketAddr>>,
    /// The user name of the current (or last) connection, for the auth provider's ACL.
    pub username: Option<Box<str>>,
    /// The session's uid in the home shard's store; 0 when it is not stored.
    pub store_uid: u64,
    /// Counted in the mesh's `stored_subscribers` of its shard (stored and subscribed).
    pub counted_stored: bool,
    /// Acknowledgements of client PUBLISHes waiting for durability, in arrival order.
    pub pending_acks: VecDeque<PendingAck>,
}

impl Session {
    pub fn new(key: SessionKey, tenant: TenantId, client_id: Utf8, version: ProtocolVersion) -> Session {
        Session {
            key,
            tenant,
            client_id,
            version,
            subscriptions: HashMap::new(),
            conn: None,
            expiry_secs: 0,
            expires_at: None,
            will: None,
            will_due_at: None,
            backlog: VecDeque::new(),
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            next_packet_id: 1,
            control: VecDeque::new(),
            incoming_qos2: HashSet::new(),
            client_receive_maximum: u16::MAX,
            client_packet_size_max: u32::MAX,
            client_topic_alias_max: 0,
            request_problem_information: true,
            aliases: None,
            settings: placeholder_settings(),
            tenant_state: placeholder_tenant_state(),
            username: None,
            peer: None,
            store_uid: 0,
            counted_stored: false,
            pending_acks: VecDeque::new(),
        }
    }

    /// True when the session outlives its connection.
    pub fn is_persistent(&self) -> bool {
        self.expiry_secs > 0
    }

    /// Wakes the writer of the attached connection, if any.
    pub fn wake_writer(&self) {
        if let Some(conn) = &self.conn {
            conn.wake();
        }
    }

    /// Queues a control packet for the connection and wakes its writer.
    pub fn push_control(&mut self, packet: Packet) {
        if self.conn.is_some() {
            self.control.push_back(Control::from(packet));
            self.wake_writer();
        }
    }

    fn allocate_packet_id(&mut self) -> Option<PacketId> {
        // Bounded: at most 65,535 probes, and `inflight` is far smaller than that in practice
        // because the window bounds it.
        for _ in 0..u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// The outgoing window: QoS 1/2 messages that may be unacknowledged at once.
    pub fn window(&self, inflight_count_max: u16) -> usize {
        usize::from(self.client_receive_maximum.min(inflight_count_max).max(1))
    }

    /// Marks every inflight message as needing a resend (after a reconnect).
    pub fn mark_inflight_unsent(&mut self) {
        for inflight in self.inflight.values_mut() {
            inflight.sent = false;
        }
    }

    /// Encodes what the session owes its connection into `out`: control packets first, then
    /// inflight messages that still need (re)sending, then queued messages while the window allows.
    /// Stops once `out` holds `budget_bytes`. Returns counters for the shard's statistics.
    pub fn fill(
        &mut self,
        out: &mut BytesMut,
        budget_bytes: usize,
        inflight_count_max: u16,
        now: Instant,
        events: &mut Vec<FillEvent>,
        load: &mut dyn FnMut(u64) -> Option<Arc<Message>>,
    ) -> FillStats {
        let mut stats = FillStats::default();
        let version = self.version;
        while out.len() < budget_bytes {
            let Some(control) = self.control.pop_front() else { break };
            let packet = control.into_packet();
            if let Ok(len) = encoded_len(&packet, version) {
                if len as u64 <= u64::from(self.client_packet_size_max) {
                    // Encoding a packet the broker built cannot fail once its length is known.
                    let _ = encode(&packet, version, out);
                }
            }
        }
        // Resend inflight messages after a reconnect, in packet-id order (MQTT-4.4.0-1).
        let unsent: Vec<PacketId> =
            self.inflight.iter().filter(|(_, inflight)| !inflight.sent).map(|(id, _)| *id).collect();
        for id in unsent {
            if out.len() >= budget_bytes {
                return stats;
            }
            let Some(inflight) = self.inflight.get_mut(&id) else { continue };
            inflight.sent = true;
            match inflight.state {
                InflightState::AwaitComp => {
                    let _ = encode(&Packet::PubRel(PubResp::new(id)), version, out);
                }
                InflightState::AwaitAck => {
                    let delivery = inflight.delivery.clone();
                    if self.encode_publish(&delivery, Some(id), true, out, now).is_err() {
                        self.inflight.remove(&id);
                        stats.dropped_too_large += 1;
                        if delivery.stored != 0 {
                            events.push(FillEvent::Dropped { stored: delivery.stored });
                        }
                    }
                }
            }
        }
        let window = self.window(inflight_count_max);
        while out.len() < budget_bytes {
            let Some(front_qos) = self.backlog.front().map(|l| l.qos()).or(self.queue.front().map(|d| d.qos))
            else {
                break;
            };
            if front_qos != QoS::AtMostOnce && self.inflight.len() >= window {
                break;
            }
            let delivery = match self.backlog.pop_front() {
                Some(lazy) => {
                    // Its expiry is checked below, on the message read back.
                    match load(lazy.stored()) {
                        Some(msg) => lazy.into_delivery(msg),
                        None => {
                            // Unreadable (counted and logged by the store).
                            stats.dropped_expired += 1;
                            events.push(FillEvent::Dropped { stored: lazy.stored() });
                            continue;
                        }
                    }
                }
                None => match self.queue.pop_front() {
                    Some(delivery) => delivery,
                    None => break,
                },
            };
            if delivery.msg.is_expired(now) {
                stats.dropped_expired += 1;
                if delivery.stored != 0 {
                    events.push(FillEvent::Dropped { stored: delivery.stored });
                }
                continue;
            }
            let packet_id = if delivery.qos == QoS::AtMostOnce { None } else { self.allocate_packet_id() };
            if delivery.qos != QoS::AtMostOnce && packet_id.is_none() {
                if self.backlog.is_empty() {
                    self.queue.push_front(delivery);
                } else {
                    self.backlog.push_front(LazyDelivery::from_delivery(delivery));
                }
                break;
            }
            match self.encode_publish(&delivery, packet_id, false, out, now) {
                Ok(()) => {
                    stats.sent_by_qos[delivery.qos as usize] += 1;
                    stats.payload_bytes_sent += delivery.msg.payload.len() as u64;
                    if packet_id.is_none() && delivery.stored != 0 {
                        // A stored QoS 0 message (offline queueing) is finished once written.
                        events.push(FillEvent::Dropped { stored: delivery.stored });
                    }
                    if let Some(id) = packet_id {
                        if delivery.stored != 0 {
                            events.push(FillEvent::Sent { stored: delivery.stored, packet_id: id });
                        }
                        self.inflight
                            .insert(id, Inflight { delivery, state: InflightState::AwaitAck, sent: true });
                    }
                }
                // Larger than the client accepts: discarded as if delivered (MQTT-3.1.2-25).
                Err(()) => {
                    stats.dropped_too_large += 1;
                    if delivery.stored != 0 {
                        events.push(FillEvent::Dropped { stored: delivery.stored });
                    }
                }
            }
        }
        stats
    }

    /// Encodes one PUBLISH for this session; `Err` when it exceeds the client's maximum packet size.
    fn encode_publish(
        &mut self,
        delivery: &Delivery,
        packet_id: Option<PacketId>,
        dup: bool,
        out: &mut BytesMut,
        now: Instant,
    ) -> Result<(), ()> {
        let msg = &delivery.msg;
        let mut publish = Publish {
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: msg.topic.clone(),
            packet_id,
            properties: Properties::default(),
            payload: msg.payload.clone(),
        };
        // An alias this PUBLISH would establish; recorded only once the PUBLISH is actually sent,
        // or a later message would use an alias the client never learnt (MQTT-3.3.2-12 ff.).
        let mut new_alias = None;
        if self.version.is_v5() {
            let mut properties = msg.properties.as_deref().cloned().unwrap_or_default();
            properties.message_expiry_interval = msg.expiry_remaining_secs(now);
            properties.subscription_identifiers = delivery.subscription_ids.clone();
            publish.properties = properties;
            if self.client_topic_alias_max > 0 {
                match self.aliases.as_ref().and_then(|a| a.outbound.get(&msg.topic)) {
                    Some(alias) => {
                        publish.properties.topic_alias = Some(*alias);
                        publish.topic = Utf8::default();
                    }
                    None => {
                        let next = self.aliases.as_ref().map_or(0, |a| a.outbound.len()) + 1;
                        if next <= usize::from(self.client_topic_alias_max) {
                            let alias = next as u16;
                            new_alias = Some(alias);
                            publish.properties.topic_alias = Some(alias);
                        }
                    }
                }
            }
        }
        let packet = Packet::Publish(publish);
        let len = encoded_len(&packet, self.version).map_err(|_| ())?;
        if len as u64 > u64::from(self.client_packet_size_max) {
            return Err(());
        }
        encode(&packet, self.version, out).map_err(|_| ())?;
        if let Some(alias) = new_alias {
            self.aliases.get_or_insert_with(Default::default).outbound.insert(msg.topic.clone(), alias);
        }
        Ok(())
    }
}

/// The home-shard table of sessions: a slab with generations plus the client-id index.
#[derive(Debug, Default)]
pub struct SessionTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_client: HashMap<(TenantId, Utf8), SessionKey>,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    /// Boxed: the slot vector grows by doubling, and doubling ~400-byte sessions would waste up to
    /// half of that per session; doubling 8-byte pointers wastes almost nothing.
    session: Option<Box<Session>>,
}

impl SessionTable {
    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    pub fn find(&self, tenant: TenantId, client_id: &Utf8) -> Option<SessionKey> {
        self.by_client.get(&(tenant, client_id.clone())).copied()
    }

    pub fn get(&self, key: SessionKey) -> Option<&Session> {
        let slot = self.slots.get(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.session.as_deref()
    }

    pub fn get_mut(&mut self, key: SessionKey) -> Option<&mut Session> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.session.as_deref_mut()
    }

    /// Creates a session for a client id that has none.
    pub fn insert(&mut self, tenant: TenantId, client_id: Utf8, version: ProtocolVersion) -> SessionKey {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot { generation: 0, session: None });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        let key = SessionKey { index, generation: slot.generation };
        slot.session = Some(Box::new(Session::new(key, tenant, client_id.clone(), version)));
        let previous = self.by_client.insert((tenant, client_id), key);
        assert!(previous.is_none(), "session table: client id already had a session");
        key
    }

    /// Removes a session, returning it.
    pub fn remove(&mut self, key: SessionKey) -> Option<Session> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let session = slot.session.take()?;
        self.free.push(key.index);
        self.by_client.remove(&(session.tenant, session.client_id.clone()));
        Some(*session)
    }

    /// Every live session, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &Session> {
        self.slots.iter().filter_map(|slot| slot.session.as_deref())
    }

    /// Every live session key.
    pub fn keys(&self) -> Vec<SessionKey> {
        self.by_client.values().copied().collect()
    }
}
