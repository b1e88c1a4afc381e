//! End-to-end test harness: a real broker on a free loopback port, rumqttc clients (MQTT 3.1.1 and
//! 5.0) behind one small API, and a raw client that speaks exact bytes through `shardmq_protocol`.
//!
//! Rules this harness helps keep: every wait is bounded (`TIMEOUT` unless a test says otherwise);
//! no sleep is used to synchronise, only to assert absence (`expect_no_publish`, kept short);
//! brokers listen on port 0 so tests run in parallel.
//!
//! Each test file includes this module with `mod common;`; not every file uses every helper.
//!
//! Known client limitation: rumqttc 0.24's v5 decoder cannot parse a DISCONNECT whose remaining
//! length is 1 (reason code, no property length), which MQTT 5 section 3.14.2.2.1 allows and the
//! broker sends; it reports a plain close instead. Tests that check a server DISCONNECT reason
//! code use [`Raw`]. It also ends the connection on a SUBACK failure code or a PUBACK error
//! reason (the harness reports the code, then `Ev::Closed`), so tests of refusals use [`Raw`] too.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use shardmq_protocol::{
    decode, encode, ConnAck, Connect, Packet, Properties, ProtocolVersion, Publish, QoS as PQoS, Utf8,
};
use shardmq_shards::message::TenantId;
use shardmq_shards::shard::{home_shard, retain_shard, ShardStats};
use shardmq_shards::{Broker, BrokerConfig, IoDriver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Default bound for waiting on something that should happen.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How long `expect_no_publish` waits by default to assert that nothing arrives.
pub const QUIET: Duration = Duration::from_millis(300);
/// Bound for a whole test body.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Core counts every cross-shard test runs against.
pub const CORES: [usize; 2] = [2, 4];

/// Runs a test body under [`TEST_TIMEOUT`]; panics when it takes longer.
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_TIMEOUT, body).await.expect("test exceeded its time bound");
}

// ----- broker ------------------------------------------------------------------------------------

/// A broker running in this process on a free loopback port; stopped on drop.
#[derive(Debug)]
pub struct TestBroker {
    broker: Option<Broker>,
    pub addr: SocketAddr,
    pub cores: usize,
    /// The broker's data directory (removed on drop, after the broker stops).
    _data: tempfile::TempDir,
}

impl TestBroker {
    /// A broker with `cores` shards and default limits.
    pub fn start(cores: usize) -> TestBroker {
        TestBroker::start_with(|cfg| cfg.cores = cores)
    }

    /// A broker with a configuration adjusted by `adjust` (2 cores unless it says otherwise).
    pub fn start_with(adjust: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
        let data = tempfile::tempdir().expect("temporary data directory");
        let mut cfg = BrokerConfig {
            cores: 2,
            listen: "127.0.0.1:0".parse().expect("static address"),
            pin_cores: false,
            data_dir: data.path().to_path_buf(),
            // Small segments: tests create many brokers, each preallocating a segment per shard.
            segment_size_bytes: 4 * 1024 * 1024,
            ..Default::default()
        };
        // Every test runs at 2 and 4 cores; the io driver follows the core count (epoll at 2,
        // io_uring above), so the whole suite runs under both drivers.
        adjust(&mut cfg);
        cfg.io_driver = if cfg.cores > 2 { IoDriver::Uring } else { IoDriver::Epoll };
        let cores = cfg.cores;
        let broker = shardmq_shards::start(cfg).expect("broker starts");
        let addr = broker.local_addr;
        TestBroker { broker: Some(broker), addr, cores, _data: data }
    }

    /// Every listener's bound address, in configuration order.
    pub fn listener_addrs(&self) -> Vec<SocketAddr> {
        self.broker.as_ref().expect("running").listeners.iter().map(|l| l.config.address).collect()
    }

    /// The run-time state of every listener.
    pub fn listeners(&self) -> Vec<Arc<shardmq_shards::listener::ListenerInfo>> {
        self.broker.as_ref().expect("running").listeners.clone()
    }

    /// The admin handle into the shards.
    pub fn admin(&self) -> shardmq_shards::AdminHandle {
        self.broker.as_ref().expect("running").admin.clone()
    }

    /// The sum of one counter over all shards.
    pub fn stat(&self, counter: impl Fn(&ShardStats) -> &AtomicU64) -> u64 {
        self.stats().iter().map(|s| counter(s).load(Ordering::Relaxed)).sum()
    }

    /// Per-shard stats.
    pub fn stats(&self) -> &[Arc<ShardStats>] {
        &self.broker.as_ref().expect("running").stats
    }

    /// Waits until `counter` summed over shards reaches at least `at_least`.
    pub async fn wait_stat(&self, counter: impl Fn(&ShardStats) -> &AtomicU64, at_least: u64) -> u64 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let value = self.stat(&counter);
            if value >= at_least {
                return value;
            }
            assert!(Instant::now() < deadline, "stat stayed at {value}, wanted >= {at_least}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the live-connection gauge summed over shards equals `count`.
    pub async fn wait_connections(&self, count: u64) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let value = self.stat(|s| &s.connections);
            if value == count {
                return;
            }
            assert!(Instant::now() < deadline, "connections stayed at {value}, wanted {count}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A client id (prefix + number) whose session lives on `shard`.
    pub fn id_on_shard(&self, prefix: &str, shard: usize) -> String {
        id_on_shard(prefix, shard, self.cores)
    }

    /// A topic (prefix + number) whose retained message lives on `shard`.
    pub fn topic_on_retain_shard(&self, prefix: &str, shard: usize) -> String {
        (0..10_000)
            .map(|n| format!("{prefix}{n}"))
            .find(|t| retain_shard(TenantId::default(), t, self.cores).index() == shard % self.cores)
            .expect("some topic lands on every shard")
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.stop();
        }
    }
}

/// A client id (prefix + number) whose session's home is `shard` (mod `cores`).
pub fn id_on_shard(prefix: &str, shard: usize, cores: usize) -> String {
    (0..10_000)
        .map(|n| format!("{prefix}-{n}"))
        .find(|id| home_shard(TenantId::default(), id, cores).index() == shard % cores)
        .expect("some id lands on every shard")
}

// ----- rumqttc clients ---------------------------------------------------------------------------

/// Which MQTT version a rumqttc-backed [`Client`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

pub const VERSIONS: [Version; 2] = [Version::V4, Version::V5];

/// A received PUBLISH, version-independent.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    /// MQTT 5 properties (None for 3.1.1 or when absent).
    pub properties: Option<rumqttc::v5::mqttbytes::v5::PublishProperties>,
}

/// Events from the client's event loop, version-independent.
#[derive(Debug, Clone)]
pub enum Ev {
    ConnAck {
        session_present: bool,
        code: u8,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
    },
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    Publish(Msg),
    /// v5 DISCONNECT from the server, with its reason code.
    Disconnect {
        reason: u8,
    },
    PingResp,
    /// The event loop ended (error text); no more events follow.
    Closed(String),
}

fn qos_u8_v4(qos: rumqttc::QoS) -> u8 {
    qos as u8
}

fn qos_u8_v5(qos: rumqttc::v5::mqttbytes::QoS) -> u8 {
    qos as u8
}

fn v5_suback_code(code: &rumqttc::v5::mqttbytes::v5::SubscribeReasonCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as C;
    match code {
        C::Success(qos) => qos_u8_v5(*qos),
        C::Failure | C::Unspecified => 0x80,
        C::ImplementationSpecific => 0x83,
        C::NotAuthorized => 0x87,
        C::TopicFilterInvalid => 0x8F,
        C::PkidInUse => 0x91,
        C::QuotaExceeded => 0x97,
        C::SharedSubscriptionsNotSupported => 0x9E,
        C::SubscriptionIdNotSupported => 0xA1,
        C::WildcardSubscriptionsNotSupported => 0xA2,
    }
}

fn v5_puback_code(reason: rumqttc::v5::mqttbytes::v5::PubAckReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
    match reason {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn v5_connack_code(code: rumqttc::v5::mqttbytes::v5::ConnectReturnCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    match code {
        C::Success => 0x00,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::UnsupportedProtocolVersion | C::RefusedProtocolVersion => 0x84,
        C::ClientIdentifierNotValid | C::BadClientId => 0x85,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerUnavailable | C::ServiceUnavailable => 0x88,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

fn v4_event(event: rumqttc::Event) -> Option<Ev> {
    use rumqttc::{Event, Packet};
    let Event::Incoming(packet) = event else { return None };
    Some(match packet {
        Packet::ConnAck(ack) => Ev::ConnAck { session_present: ack.session_present, code: ack.code as u8 },
        Packet::SubAck(ack) => Ev::SubAck {
            pkid: ack.pkid,
            codes: ack
                .return_codes
                .iter()
                .map(|c| match c {
                    rumqttc::SubscribeReasonCode::Success(q) => qos_u8_v4(*q),
                    rumqttc::SubscribeReasonCode::Failure => 0x80,
                })
                .collect(),
        },
        Packet::UnsubAck(ack) => Ev::UnsubAck { pkid: ack.pkid },
        Packet::PubAck(ack) => Ev::PubAck { pkid: ack.pkid, reason: 0 },
        Packet::PubRec(rec) => Ev::PubRec { pkid: rec.pkid },
        Packet::PubComp(comp) => Ev::PubComp { pkid: comp.pkid },
        Packet::Publish(p) => Ev::Publish(Msg {
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            qos: qos_u8_v4(p.qos),
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            properties: None,
        }),
        Packet::PingResp => Ev::PingResp,
        _ => return None,
    })
}

fn v5_event(event: rumqttc::v5::Event) -> Option<Ev> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::Event;
    let Event::Incoming(packet) = event else { return None };
    Some(match packet {
        Packet::ConnAck(ack) => {
            Ev::ConnAck { session_present: ack.session_present, code: v5_connack_code(ack.code) }
        }
        Packet::SubAck(ack) => {
            Ev::SubAck { pkid: ack.pkid, codes: ack.return_codes.iter().map(v5_suback_code).collect() }
        }
        Packet::UnsubAck(ack) => Ev::UnsubAck { pkid: ack.pkid },
        Packet::PubAck(ack) => Ev::PubAck { pkid: ack.pkid, reason: v5_puback_code(ack.reason) },
        Packet::PubRec(rec) => Ev::PubRec { pkid: rec.pkid },
        Packet::PubComp(comp) => Ev::PubComp { pkid: comp.pkid },
        Packet::Publish(p) => Ev::Publish(Msg {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload.clone(),
            qos: qos_u8_v5(p.qos),
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            properties: p.properties.clone(),
        }),
        Packet::Disconnect(d) => Ev::Disconnect { reason: d.reason_code as u8 },
        Packet::PingResp(_) => Ev::PingResp,
        _ => return None,
    })
}

fn v4_qos(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn v5_qos(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// The rumqttc client of either version.
#[derive(Clone)]
pub enum Handle {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Handle::V4(_) => "Handle::V4",
            Handle::V5(_) => "Handle::V5",
        })
    }
}

/// Connection options common to both versions; adjust with the `with_*` helpers.
#[derive(Debug, Clone)]
pub struct Opts {
    pub clean: bool,
    pub keep_alive_secs: u64,
    /// (topic, payload, qos, retain)
    pub will: Option<(String, Bytes, u8, bool)>,
    pub manual_acks: bool,
    /// v5 session expiry interval (CONNECT property), seconds.
    pub session_expiry_secs: Option<u32>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { clean: true, keep_alive_secs: 30, will: None, manual_acks: false, session_expiry_secs: None }
    }
}

/// A connected rumqttc client whose event loop runs in a task and reports into a channel.
#[derive(Debug)]
pub struct Client {
    pub id: String,
    pub version: Version,
    pub handle: Handle,
    events: mpsc::UnboundedReceiver<Ev>,
    /// PUBLISHes that arrived while waiting for something else, in arrival order.
    stash: VecDeque<Msg>,
    /// Other events that arrived while waiting for a PUBLISH.
    stash_other: VecDeque<Ev>,
    pub session_present: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects with clean session/start and default options; panics unless CONNACK is success.
    pub async fn connect(addr: SocketAddr, version: Version, id: &str) -> Client {
        Client::connect_opts(addr, version, id, Opts::default()).await
    }

    /// Connects with the given options; panics unless CONNACK is success.
    pub async fn connect_opts(addr: SocketAddr, version: Version, id: &str, opts: Opts) -> Client {
        match Client::try_connect(addr, version, id, opts).await {
            Ok(client) => client,
            Err(error) => panic!("{id} ({version:?}) could not connect: {error}"),
        }
    }

    /// Connects; `Err` carries the refusal or transport error text.
    pub async fn try_connect(
        addr: SocketAddr,
        version: Version,
        id: &str,
        opts: Opts,
    ) -> Result<Client, String> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (handle, task) = match version {
            Version::V4 => {
                let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
                o.set_clean_session(opts.clean);
                o.set_keep_alive(Duration::from_secs(opts.keep_alive_secs));
                o.set_manual_acks(opts.manual_acks);
                o.set_max_packet_size(1 << 20, 1 << 20);
                if let Some((topic, payload, qos, retain)) = &opts.will {
                    o.set_last_will(rumqttc::LastWill::new(topic, payload.clone(), v4_qos(*qos), *retain));
                }
                let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 1000);
                let task = tokio::spawn(async move {
                    loop {
                        match eventloop.poll().await {
                            Ok(event) => {
                                if let Some(ev) = v4_event(event) {
                                    let _ = tx.send(ev);
                                }
                            }
                            Err(error) => {
                                let _ = tx.send(Ev::Closed(error.to_string()));
                                break;
                            }
                        }
                    }
                });
                (Handle::V4(client), task)
            }
            Version::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
                o.set_clean_start(opts.clean);
                o.set_keep_alive(Duration::from_secs(opts.keep_alive_secs.max(5)));
                o.set_manual_acks(opts.manual_acks);
                o.set_max_packet_size(Some(1 << 20));
                if let Some(expiry) = opts.session_expiry_secs {
                    let mut props = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
                    props.session_expiry_interval = Some(expiry);
                    props.max_packet_size = Some(1 << 20);
                    o.set_connect_properties(props);
                }
                if let Some((topic, payload, qos, retain)) = &opts.will {
                    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                        topic.as_str(),
                        payload.clone(),
                        v5_qos(*qos),
                        *retain,
                        None,
                    ));
                }
                let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 1000);
                let task = tokio::spawn(async move {
                    loop {
                        match eventloop.poll().await {
                            Ok(event) => {
                                if let Some(ev) = v5_event(event) {
                                    let _ = tx.send(ev);
                                }
                            }
                            Err(error) => {
                                // A server DISCONNECT surfaces as an error: report its reason too.
                                if let rumqttc::v5::ConnectionError::MqttState(
                                    rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                                ) = &error
                                {
                                    let _ = tx.send(Ev::Disconnect { reason: *reason_code as u8 });
                                }
                                // rumqttc ends the connection on a failed SUBACK or PUBACK: report the
                                // code, then the close.
                                if let rumqttc::v5::ConnectionError::MqttState(
                                    rumqttc::v5::StateError::SubFail { reason },
                                ) = &error
                                {
                                    let _ =
                                        tx.send(Ev::SubAck { pkid: 0, codes: vec![v5_suback_code(reason)] });
                                }
                                if let rumqttc::v5::ConnectionError::MqttState(
                                    rumqttc::v5::StateError::PubAckFail { reason },
                                ) = &error
                                {
                                    let _ = tx.send(Ev::PubAck { pkid: 0, reason: v5_puback_code(*reason) });
                                }
                                let _ = tx.send(Ev::Closed(error.to_string()));
                                break;
                            }
                        }
                    }
                });
                (Handle::V5(client), task)
            }
        };
        let first = tokio::time::timeout(TIMEOUT, rx.recv()).await;
        let session_present = match first {
            Ok(Some(Ev::ConnAck { session_present, code: 0 })) => session_present,
            Ok(Some(other)) => {
                task.abort();
                return Err(format!("{other:?}"));
            }
            Ok(None) => return Err("event loop ended".into()),
            Err(_) => {
                task.abort();
                return Err("no CONNACK in time".into());
            }
        };
        Ok(Client {
            id: id.to_string(),
            version,
            handle,
            events: rx,
            stash: VecDeque::new(),
            stash_other: VecDeque::new(),
            session_present,
            task,
        })
    }

    /// The next event (stashed ones first), bounded by `timeout`.
    async fn next_event(&mut self, timeout: Duration) -> Option<Ev> {
        if let Some(ev) = self.stash_other.pop_front() {
            return Some(ev);
        }
        tokio::time::timeout(timeout, self.events.recv()).await.ok().flatten()
    }

    /// Waits for the first event `pick` accepts; stashes PUBLISHes; panics on timeout or close.
    async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&Ev) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut skipped = Vec::new();
        let found = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(ev) = self.next_event(left).await else {
                panic!("{}: no {what} within {TIMEOUT:?} (skipped {skipped:?})", self.id)
            };
            if let Some(found) = pick(&ev) {
                break found;
            }
            match ev {
                Ev::Publish(msg) => self.stash.push_back(msg),
                Ev::Closed(reason) => panic!("{}: closed ({reason}) while waiting for {what}", self.id),
                other => skipped.push(other),
            }
        };
        // Keep what we skipped for later waits, in order.
        for ev in skipped.into_iter().rev() {
            self.stash_other.push_front(ev);
        }
        found
    }

    /// Subscribes to one filter and returns the SUBACK code (granted QoS or failure reason).
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        self.subscribe_many(&[(filter, qos)]).await[0]
    }

    /// Subscribes to several filters in one SUBSCRIBE; returns the SUBACK codes.
    pub async fn subscribe_many(&mut self, filters: &[(&str, u8)]) -> Vec<u8> {
        match &self.handle {
            Handle::V4(c) => c
                .subscribe_many(
                    filters.iter().map(|(f, q)| rumqttc::SubscribeFilter::new(f.to_string(), v4_qos(*q))),
                )
                .await
                .expect("request queued"),
            Handle::V5(c) => c
                .subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| rumqttc::v5::mqttbytes::v5::Filter::new(f.to_string(), v5_qos(*q))),
                )
                .await
                .expect("request queued"),
        }
        let codes = self
            .wait_for("SUBACK", |ev| match ev {
                Ev::SubAck { codes, .. } => Some(codes.clone()),
                _ => None,
            })
            .await;
        assert_eq!(codes.len(), filters.len(), "{}: one SUBACK code per filter", self.id);
        codes
    }

    /// Unsubscribes and waits for UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) {
        match &self.handle {
            Handle::V4(c) => c.unsubscribe(filter).await.expect("request queued"),
            Handle::V5(c) => c.unsubscribe(filter).await.expect("request queued"),
        }
        self.wait_for("UNSUBACK", |ev| matches!(ev, Ev::UnsubAck { .. }).then_some(())).await;
    }

    /// Queues a PUBLISH without waiting for its acknowledgement.
    pub async fn publish_nowait(&self, topic: &str, qos: u8, retain: bool, payload: impl Into<Bytes>) {
        let payload: Bytes = payload.into();
        match &self.handle {
            Handle::V4(c) => c.publish(topic, v4_qos(qos), retain, payload).await.expect("request queued"),
            Handle::V5(c) => c.publish(topic, v5_qos(qos), retain, payload).await.expect("request queued"),
        }
    }

    /// Publishes; for QoS 1/2 waits for PUBACK/PUBCOMP and returns the v5 PUBACK reason (0 otherwise).
    pub async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: impl Into<Bytes>) -> u8 {
        self.publish_nowait(topic, qos, retain, payload).await;
        match qos {
            0 => 0,
            1 => {
                self.wait_for("PUBACK", |ev| match ev {
                    Ev::PubAck { reason, .. } => Some(*reason),
                    _ => None,
                })
                .await
            }
            _ => self.wait_for("PUBCOMP", |ev| matches!(ev, Ev::PubComp { .. }).then_some(0)).await,
        }
    }

    /// The next PUBLISH received, within `timeout`.
    pub async fn expect_publish_within(&mut self, timeout: Duration) -> Msg {
        if let Some(msg) = self.stash.pop_front() {
            return msg;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await.ok().flatten() {
                Some(Ev::Publish(msg)) => return msg,
                Some(Ev::Closed(reason)) => {
                    panic!("{}: closed ({reason}) while waiting for PUBLISH", self.id)
                }
                Some(other) => self.stash_other.push_back(other),
                None => panic!("{}: no PUBLISH within {timeout:?}", self.id),
            }
        }
    }

    /// The next PUBLISH if one arrives within `timeout`, else None (for draining several clients).
    pub async fn try_publish_within(&mut self, timeout: Duration) -> Option<Msg> {
        if let Some(msg) = self.stash.pop_front() {
            return Some(msg);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await.ok().flatten() {
                Some(Ev::Publish(msg)) => return Some(msg),
                Some(Ev::Closed(reason)) => {
                    panic!("{}: closed ({reason}) while waiting for PUBLISH", self.id)
                }
                Some(other) => self.stash_other.push_back(other),
                None => return None,
            }
        }
    }

    /// The next PUBLISH received, within [`TIMEOUT`].
    pub async fn expect_publish(&mut self) -> Msg {
        self.expect_publish_within(TIMEOUT).await
    }

    /// The next PUBLISH, asserting its topic and payload.
    pub async fn expect_msg(&mut self, topic: &str, payload: &[u8]) -> Msg {
        let msg = self.expect_publish().await;
        assert_eq!(
            (msg.topic.as_str(), &msg.payload[..]),
            (topic, payload),
            "{}: unexpected message",
            self.id
        );
        msg
    }

    /// Asserts that no PUBLISH arrives within `quiet` (the only fixed wait the suite allows).
    pub async fn expect_no_publish_within(&mut self, quiet: Duration) {
        if let Some(msg) = self.stash.pop_front() {
            panic!("{}: unexpected PUBLISH {msg:?}", self.id);
        }
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Err(_) | Ok(None) => return,
                Ok(Some(Ev::Publish(msg))) => panic!("{}: unexpected PUBLISH {msg:?}", self.id),
                Ok(Some(other)) => self.stash_other.push_back(other),
            }
        }
    }

    /// Asserts that no PUBLISH arrives within [`QUIET`].
    pub async fn expect_no_publish(&mut self) {
        self.expect_no_publish_within(QUIET).await
    }

    /// Acknowledges a message received with manual acks.
    pub async fn ack(&self, msg: &Msg) {
        match &self.handle {
            Handle::V4(c) => {
                let mut p = rumqttc::Publish::new(msg.topic.clone(), v4_qos(msg.qos), msg.payload.clone());
                p.pkid = msg.pkid;
                c.ack(&p).await.expect("request queued")
            }
            Handle::V5(c) => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
                    msg.topic.clone(),
                    v5_qos(msg.qos),
                    msg.payload.clone(),
                    None,
                );
                p.pkid = msg.pkid;
                c.ack(&p).await.expect("request queued")
            }
        }
    }

    /// Waits until the connection ends; returns the v5 DISCONNECT reason if one came first.
    pub async fn expect_closed_within(&mut self, timeout: Duration) -> Option<u8> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut reason = None;
        for ev in std::mem::take(&mut self.stash_other) {
            if let Ev::Disconnect { reason: r } = ev {
                reason = Some(r);
            }
            if let Ev::Closed(_) = ev {
                return reason;
            }
        }
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Err(_) => panic!("{}: still open after {timeout:?}", self.id),
                Ok(None) | Ok(Some(Ev::Closed(_))) => return reason,
                Ok(Some(Ev::Disconnect { reason: r })) => reason = Some(r),
                Ok(Some(Ev::Publish(msg))) => self.stash.push_back(msg),
                Ok(Some(_)) => {}
            }
        }
    }

    /// Waits until the connection ends, within [`TIMEOUT`].
    pub async fn expect_closed(&mut self) -> Option<u8> {
        self.expect_closed_within(TIMEOUT).await
    }

    /// Sends DISCONNECT and waits for the connection to end.
    pub async fn disconnect(mut self) {
        match &self.handle {
            Handle::V4(c) => c.disconnect().await.expect("request queued"),
            Handle::V5(c) => c.disconnect().await.expect("request queued"),
        }
        self.expect_closed().await;
    }

    /// Drops the TCP connection without DISCONNECT (abnormal close: the will is due).
    pub fn drop_connection(self) {
        self.task.abort();
    }
}

// ----- raw client --------------------------------------------------------------------------------

/// A client that speaks exact bytes: packets through `shardmq_protocol`, or any bytes at all.
#[derive(Debug)]
pub struct Raw {
    pub stream: TcpStream,
    pub version: ProtocolVersion,
    buf: BytesMut,
}

/// A CONNECT with the usual defaults.
pub fn connect_packet(version: ProtocolVersion, id: &str, clean: bool, keep_alive: u16) -> Connect {
    Connect {
        protocol: version,
        clean_start: clean,
        keep_alive,
        properties: Properties::default(),
        client_id: Utf8::new(id).expect("valid id"),
        will: None,
        username: None,
        password: None,
    }
}

/// A PUBLISH packet.
pub fn publish_packet(topic: &str, qos: u8, packet_id: Option<u16>, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos: PQoS::from_u8(qos).expect("valid qos"),
        retain: false,
        topic: Utf8::new(topic).expect("valid topic"),
        packet_id,
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

impl Raw {
    /// Opens a TCP connection; sends nothing.
    pub async fn open(addr: SocketAddr, version: ProtocolVersion) -> Raw {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("tcp connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw { stream, version, buf: BytesMut::new() }
    }

    /// Opens a TCP connection whose receive buffer is about `rcvbuf_bytes` (a slow reader).
    pub async fn open_with_rcvbuf(addr: SocketAddr, version: ProtocolVersion, rcvbuf_bytes: u32) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf_bytes).expect("SO_RCVBUF");
        let stream = tokio::time::timeout(TIMEOUT, socket.connect(addr))
            .await
            .expect("connect in time")
            .expect("tcp connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw { stream, version, buf: BytesMut::new() }
    }

    /// Opens a connection, sends `connect` and returns the CONNACK.
    pub async fn connect_with(addr: SocketAddr, connect: Connect) -> (Raw, ConnAck) {
        let mut raw = Raw::open(addr, connect.protocol).await;
        raw.send(&Packet::Connect(Box::new(connect))).await;
        match raw.recv().await {
            Some(Packet::ConnAck(ack)) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects with clean session/start; panics unless CONNACK is success.
    pub async fn connect(addr: SocketAddr, version: ProtocolVersion, id: &str) -> Raw {
        let (raw, ack) = Raw::connect_with(addr, connect_packet(version, id, true, 60)).await;
        assert_eq!(ack.reason.as_u8(), 0, "{id}: CONNACK {ack:?}");
        raw
    }

    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        encode(packet, self.version, &mut out).expect("encodable");
        self.send_bytes(&out).await;
    }

    /// Writes bytes; a write error (peer already closed) is ignored: the next read reports it.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next packet, within [`TIMEOUT`]; None when the connection closed. Panics on timeout or
    /// on bytes that do not decode.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(TIMEOUT).await.expect("a packet or close in time")
    }

    /// The next packet; `Err(())` on timeout, `Ok(None)` on close.
    pub async fn recv_within(&mut self, timeout: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match decode(&mut self.buf, self.version, shardmq_protocol::PACKET_SIZE_MAX_BYTES) {
                Ok(Some(packet)) => return Ok(Some(packet)),
                Ok(None) => {}
                Err(error) => panic!("server sent undecodable bytes: {error}"),
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next packet that is not a PINGRESP... panics on close or timeout.
    pub async fn expect(&mut self) -> Packet {
        match self.recv().await {
            Some(packet) => packet,
            None => panic!("connection closed while a packet was expected"),
        }
    }

    /// Reads until the server closes the connection, within `timeout`; returns the packets read
    /// on the way (a v5 DISCONNECT, typically). Panics if still open at the deadline.
    pub async fn expect_closed_within(&mut self, timeout: Duration) -> Vec<Packet> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Ok(None) => return seen,
                Ok(Some(packet)) => seen.push(packet),
                Err(()) => panic!("connection still open after {timeout:?}; read {seen:?}"),
            }
        }
    }

    pub async fn expect_closed(&mut self) -> Vec<Packet> {
        self.expect_closed_within(TIMEOUT).await
    }

    /// Subscribes to one filter with packet id `pid` and returns the SUBACK reason codes.
    pub async fn subscribe(&mut self, pid: u16, filter: &str, qos: u8) -> Vec<u8> {
        let subscribe = shardmq_protocol::Subscribe {
            packet_id: pid,
            properties: Properties::default(),
            subscriptions: vec![shardmq_protocol::Subscription {
                filter: Utf8::new(filter).expect("valid filter"),
                options: shardmq_protocol::SubscriptionOptions {
                    qos: PQoS::from_u8(qos).expect("valid qos"),
                    ..Default::default()
                },
            }],
        };
        self.send(&Packet::Subscribe(subscribe)).await;
        loop {
            match self.expect().await {
                Packet::SubAck(ack) => {
                    assert_eq!(ack.packet_id, pid);
                    return ack.reasons.iter().map(|r| r.as_u8()).collect();
                }
                Packet::PingResp => {}
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }
}

// ----- the real binary ----------------------------------------------------------------------------

/// A `shardmq serve` process started by a test; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Spawned {
    pub child: std::process::Child,
    /// The MQTT listener.
    pub addr: SocketAddr,
    /// The admin API, when the process logged one.
    pub admin: Option<SocketAddr>,
    /// The process's log lines after the listener line (stdout), for tests that wait on one.
    pub lines: std::sync::mpsc::Receiver<String>,
}

/// Runs `shardmq passwd` (the real binary) to write `user` with `password` (on standard input, as an
/// operator would type it) into the users file `file`, in `tenant`, with `extra` flags.
pub fn passwd(file: &std::path::Path, user: &str, password: &str, tenant: u32, extra: &[&str]) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["passwd", "--username", user, "--tenant", &tenant.to_string(), "--file"])
        .arg(file)
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("passwd runs");
    writeln!(child.stdin.take().expect("stdin"), "{password}").expect("password on stdin");
    assert!(child.wait().expect("passwd exits").success(), "shardmq passwd failed for {user}");
}

/// A child process's standard output (which must be piped), line by line, read on a thread.
pub fn stdout_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    lines
}

/// The port after `127.0.0.1:` in a log line.
pub fn logged_port(line: &str) -> u16 {
    line.split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

impl Spawned {
    /// Runs `shardmq serve <args>` (plus `--no-pin`) and returns once it logs its MQTT listener
    /// (the admin API, when on, is logged before it). Pass `--listen 127.0.0.1:0` and an
    /// `--admin-listen` of port 0 or `off` so tests run in parallel.
    pub fn start<I, S>(args: I) -> Spawned
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
            .arg("serve")
            .arg("--no-pin")
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("shardmq starts");
        let lines = stdout_lines(&mut child);
        let mut admin = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines.recv_timeout(left).expect("shardmq logs its listener");
            if line.contains("admin API listening") {
                admin = Some(SocketAddr::from(([127, 0, 0, 1], logged_port(&line))));
            } else if line.contains("shardmq listening") {
                break SocketAddr::from(([127, 0, 0, 1], logged_port(&line)));
            }
        };
        Spawned { child, addr, admin, lines }
    }

    /// The admin API's address (panics if the process has none).
    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("the admin API is on")
    }

    /// Sends SIGHUP (reload), as an operator would with `kill -HUP`.
    pub fn sighup(&self) {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill -HUP runs");
        assert!(status.success(), "kill -HUP failed");
    }

    /// Waits (bounded) for a log line that `want` accepts, and returns it.
    pub fn wait_line(&self, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).expect("the expected line is logged in time");
            if want(&line) {
                return line;
            }
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects with a user name and password; returns the client and the CONNACK code (v5 reason
/// code, 3.x return code).
pub async fn connect_with_credentials(
    addr: SocketAddr,
    version: ProtocolVersion,
    id: &str,
    user: &str,
    password: &[u8],
) -> (Raw, u8) {
    let mut connect = connect_packet(version, id, true, 60);
    connect.username = Some(Utf8::new(user).expect("user name"));
    connect.password = Some(Bytes::copy_from_slice(password));
    let (raw, ack) = Raw::connect_with(addr, connect).await;
    let code = if version.is_v5() { ack.reason.as_u8() } else { ack.reason.to_v3_connack().unwrap_or(0) };
    (raw, code)
}
