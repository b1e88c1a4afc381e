//! Per-tenant settings, each limit with its reason code on MQTT 5 and its 3.1.1 equivalent, and
//! counted per tenant; settings changed at runtime apply to the next connection.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{bounded, connect_packet, publish_packet, Raw, TestBroker};
use shardmq_protocol::{ConnAck, Disconnect, Packet, Properties, ProtocolVersion, PubResp, ReasonCode};
use shardmq_shards::tenants::{ConfigSettings, DropReason, Limit, TenantSettings, Tenants};
use shardmq_shards::QueueFullPolicy;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

/// A broker whose default tenant (every client, with auth off) has `settings`.
fn start(settings: TenantSettings) -> (TestBroker, Arc<Tenants>) {
    let tenants = Arc::new(Tenants::new(Arc::new(ConfigSettings::new(settings, Default::default()))));
    let shared = tenants.clone();
    let broker = TestBroker::start_with(move |cfg| cfg.tenants = shared);
    (broker, tenants)
}

fn limited(tenants: &Tenants, limit: Limit) -> u64 {
    let state = tenants.state(Default::default());
    state.limited[limit.index()].load(std::sync::atomic::Ordering::Relaxed)
}

async fn connect(addr: SocketAddr, version: ProtocolVersion, id: &str) -> (Raw, ConnAck) {
    Raw::connect_with(addr, connect_packet(version, id, true, 60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_versions_and_connection_count() {
    bounded(async {
        let (broker, tenants) = start(TenantSettings {
            allowed_protocol_levels: Some(vec![5]),
            max_connections: Some(2),
            ..Default::default()
        });
        let (_, ack) = connect(broker.addr, V311, "old").await;
        assert_eq!(ack.reason.to_v3_connack(), Some(1), "3.1.1: unacceptable protocol version");
        assert_eq!(limited(&tenants, Limit::ProtocolVersion), 1);
        let (mut a, ack) = connect(broker.addr, V5, "a").await;
        assert_eq!(ack.reason, ReasonCode::Success);
        let (_b, ack) = connect(broker.addr, V5, "b").await;
        assert_eq!(ack.reason, ReasonCode::Success);
        let (_, ack) = connect(broker.addr, V5, "c").await;
        assert_eq!(ack.reason, ReasonCode::QuotaExceeded, "v5: a third connection is over quota");
        // A takeover replaces a connection: it fits.
        let (_a2, ack) = connect(broker.addr, V5, "b").await;
        assert_eq!(ack.reason, ReasonCode::Success);
        // Freed places are reusable.
        a.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
        a.expect_closed().await;
        broker.wait_connections(1).await;
        let (_d, ack) = connect(broker.addr, V5, "d").await;
        assert_eq!(ack.reason, ReasonCode::Success);
        assert_eq!(limited(&tenants, Limit::Connections), 1);
        // Runtime change: 3.1.1 allowed, and three connections; the 3.x refusal is code 3.
        tenants
            .provider
            .set(Default::default(), TenantSettings { max_connections: Some(2), ..Default::default() })
            .unwrap();
        let (_, ack) = connect(broker.addr, V311, "e").await;
        assert_eq!(ack.reason.to_v3_connack(), Some(3), "3.1.1: server unavailable when over quota");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_levels_length_and_subscription_count() {
    bounded(async {
        let (broker, tenants) = start(TenantSettings {
            max_topic_levels: Some(3),
            max_topic_length: Some(24),
            max_subscriptions_per_session: Some(2),
            ..Default::default()
        });
        let (mut v5, _) = connect(broker.addr, V5, "t5").await;
        let (mut v3, _) = connect(broker.addr, V311, "t3").await;
        assert_eq!(v5.subscribe(1, "a/b/c/d", 1).await, vec![0x8F], "v5: too many levels");
        assert_eq!(v3.subscribe(1, "a/b/c/d", 1).await, vec![0x80]);
        assert_eq!(v5.subscribe(2, "a/very-long-topic-name-indeed", 1).await, vec![0x8F], "v5: too long");
        assert_eq!(v5.subscribe(3, "a/#", 1).await, vec![1]);
        assert_eq!(v5.subscribe(4, "b/+", 1).await, vec![1]);
        assert_eq!(v5.subscribe(5, "c/#", 1).await, vec![0x97], "v5: a third subscription is over quota");
        assert_eq!(v3.subscribe(2, "x", 0).await, vec![0]);
        assert_eq!(v3.subscribe(3, "y", 0).await, vec![0]);
        assert_eq!(v3.subscribe(4, "z", 0).await, vec![0x80]);
        // Publishing: v5 gets 0x90 for a topic over the limits; 3.1.1 is acknowledged, and the
        // message is dropped (the a/# subscriber never sees it).
        v5.send(&Packet::Publish(publish_packet("a/b/c/d", 1, Some(7), b"deep"))).await;
        assert!(matches!(v5.expect().await, Packet::PubAck(a) if a.reason == ReasonCode::TopicNameInvalid));
        v3.send(&Packet::Publish(publish_packet("a/b/c/d", 1, Some(8), b"deep"))).await;
        assert!(matches!(v3.expect().await, Packet::PubAck(a) if a.packet_id == 8));
        v3.send(&Packet::Publish(publish_packet("a/ok", 1, Some(9), b"fine"))).await;
        assert!(matches!(v3.expect().await, Packet::PubAck(a) if a.packet_id == 9));
        match v5.expect().await {
            Packet::Publish(p) => {
                assert_eq!(p.topic.as_str(), "a/ok", "the over-limit message was not routed")
            }
            other => panic!("expected a/ok, got {other:?}"),
        }
        assert_eq!(limited(&tenants, Limit::TopicLevels), 4);
        assert_eq!(limited(&tenants, Limit::TopicLength), 1);
        assert_eq!(limited(&tenants, Limit::Subscriptions), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_quota() {
    bounded(async {
        let (broker, tenants) =
            start(TenantSettings { max_retained_messages: Some(2), ..Default::default() });
        let (mut publisher, _) = connect(broker.addr, V5, "retainer").await;
        let mut next_id = 0u16;
        let mut retain = |topic: &str, payload: &'static [u8]| {
            next_id += 1;
            let mut publish = publish_packet(topic, 1, Some(next_id), payload);
            publish.retain = true;
            Packet::Publish(publish)
        };
        async fn acked(publisher: &mut Raw, packet: Packet) -> ReasonCode {
            publisher.send(&packet).await;
            match publisher.expect().await {
                Packet::PubAck(a) => a.reason,
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
        // Topics spread over both shards; the quota is the tenant's across them.
        assert_eq!(acked(&mut publisher, retain("r/1", b"one")).await, ReasonCode::Success);
        assert_eq!(acked(&mut publisher, retain("r/2", b"two")).await, ReasonCode::Success);
        assert_eq!(acked(&mut publisher, retain("r/3", b"three")).await, ReasonCode::QuotaExceeded);
        // Replacing and deleting existing retained messages always works; a deletion frees a place.
        assert_eq!(acked(&mut publisher, retain("r/1", b"one again")).await, ReasonCode::Success);
        assert_eq!(acked(&mut publisher, retain("r/2", b"")).await, ReasonCode::Success);
        assert_eq!(acked(&mut publisher, retain("r/3", b"three")).await, ReasonCode::Success);
        assert_eq!(limited(&tenants, Limit::RetainedMessages), 1);
        // What a new subscriber finds: r/1's new value and r/3.
        let (mut late, _) = connect(broker.addr, V5, "late").await;
        assert_eq!(late.subscribe(1, "r/#", 0).await, vec![0]);
        let mut got = Vec::new();
        for _ in 0..2 {
            match late.expect().await {
                Packet::Publish(p) => got.push((p.topic.to_string(), p.payload.to_vec())),
                other => panic!("expected a retained PUBLISH, got {other:?}"),
            }
        }
        got.sort();
        assert_eq!(
            got,
            vec![("r/1".to_string(), b"one again".to_vec()), ("r/3".to_string(), b"three".to_vec())]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_cap_receive_maximum_and_retain_off() {
    bounded(async {
        let (broker, tenants) = start(TenantSettings {
            max_session_expiry_secs: Some(10),
            receive_maximum: Some(5),
            retain_available: Some(false),
            ..Default::default()
        });
        let mut connect5 = connect_packet(V5, "caps", true, 60);
        connect5.properties = Properties { session_expiry_interval: Some(100), ..Default::default() };
        let (mut v5, ack) = Raw::connect_with(broker.addr, connect5).await;
        assert_eq!(ack.properties.session_expiry_interval, Some(10));
        assert_eq!(ack.properties.receive_maximum, Some(5));
        assert_eq!(ack.properties.retain_available, Some(0));
        // 3.1.1: the retain flag is ignored (no retained message is kept).
        let (mut v3, _) = connect(broker.addr, V311, "caps3").await;
        let mut retained = publish_packet("r/x", 1, Some(1), b"kept?");
        retained.retain = true;
        v3.send(&Packet::Publish(retained.clone())).await;
        assert!(matches!(v3.expect().await, Packet::PubAck(_)));
        let (mut late, _) = connect(broker.addr, V311, "late").await;
        assert_eq!(late.subscribe(1, "r/#", 1).await, vec![1]);
        late.send(&Packet::PingReq).await;
        assert!(matches!(late.expect().await, Packet::PingResp), "no retained message was kept");
        // v5: a retained PUBLISH after Retain Available 0 is a protocol violation (0x9A).
        v5.send(&Packet::Publish(retained)).await;
        let seen = v5.expect_closed().await;
        assert!(
            matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::RetainNotSupported),
            "{seen:?}"
        );
        assert_eq!(limited(&tenants, Limit::Retain), 2);
    })
    .await;
}

/// A tenant inbox of two messages and `policy`: three QoS 1 messages reach an offline session;
/// returns the payloads it receives when it comes back.
async fn inbox_keeps(policy: Option<QueueFullPolicy>) -> Vec<u8> {
    let settings =
        TenantSettings { max_queued_messages: Some(2), queue_full_policy: policy, ..Default::default() };
    let (broker, tenants) = start(settings);
    let (mut sub, _) = Raw::connect_with(broker.addr, connect_packet(V311, "inbox", false, 60)).await;
    assert_eq!(sub.subscribe(1, "q", 1).await, vec![1]);
    sub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
    sub.expect_closed().await;
    let (mut publisher, _) = connect(broker.addr, V311, "inbox-pub").await;
    for n in 1..=3u16 {
        publisher.send(&Packet::Publish(publish_packet("q", 1, Some(n), &[b'0' + n as u8]))).await;
        assert!(matches!(publisher.expect().await, Packet::PubAck(_)));
    }
    let (mut sub, ack) = Raw::connect_with(broker.addr, connect_packet(V311, "inbox", false, 60)).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    for _ in 0..2 {
        match sub.expect().await {
            Packet::Publish(p) => {
                got.push(p.payload[0]);
                sub.send(&Packet::PubAck(PubResp::new(p.packet_id.unwrap()))).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    sub.send(&Packet::PingReq).await;
    assert!(matches!(sub.expect().await, Packet::PingResp), "nothing more was kept");
    assert!(broker.stat(|s| &s.dropped_queue_full) >= 1);
    let dropped = tenants.state(Default::default()).sum(|t| &t.dropped[DropReason::QueueFull as usize]);
    assert_eq!(dropped, 1, "one drop, counted for the tenant");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_size_and_full_policy_per_tenant() {
    bounded(async {
        assert_eq!(inbox_keeps(None).await, vec![b'2', b'3'], "the broker's policy: drop-oldest");
        assert_eq!(
            inbox_keeps(Some(QueueFullPolicy::DropNew)).await,
            vec![b'1', b'2'],
            "the tenant's: drop-new"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_per_connection_throttles_the_sender() {
    bounded(async {
        const RATE: u32 = 50;
        const COUNT: u16 = 150;
        let (broker, tenants) =
            start(TenantSettings { max_publish_rate_per_connection: Some(RATE), ..Default::default() });
        let (mut sub, _) = connect(broker.addr, V311, "rate-sub").await;
        assert_eq!(sub.subscribe(1, "rate", 0).await, vec![0]);
        let (mut publisher, _) = connect(broker.addr, V311, "rate-pub").await;
        let started = std::time::Instant::now();
        let mut burst = bytes::BytesMut::new();
        for n in 0..COUNT {
            let packet = Packet::Publish(publish_packet("rate", 0, None, &n.to_be_bytes()));
            shardmq_protocol::encode(&packet, V311, &mut burst).unwrap();
        }
        publisher.send_bytes(&burst).await;
        for n in 0..COUNT {
            match sub.expect().await {
                Packet::Publish(p) => assert_eq!(&p.payload[..], &n.to_be_bytes(), "nothing lost, in order"),
                other => panic!("unexpected {other:?}"),
            }
        }
        // One second's burst is free; the other 100 messages take at least 2 s at 50/s. A lower
        // bound only: throttling cannot make delivery faster, whatever the machine's load.
        let elapsed = started.elapsed();
        assert!(elapsed >= std::time::Duration::from_millis(1800), "{COUNT} messages in {elapsed:?}");
        assert!(limited(&tenants, Limit::PublishRate) > 0);
        assert_eq!(
            broker.stat(|s| &s.throttled[Limit::PublishRate.index()]),
            limited(&tenants, Limit::PublishRate),
            "the shards count the same throttles as the tenant"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rate_and_packet_size() {
    bounded(async {
        let (broker, tenants) = start(TenantSettings {
            max_connect_rate: Some(3),
            max_packet_size: Some(256),
            ..Default::default()
        });
        // Ten CONNECTs in quick succession span at most two one-second windows: at most six fit.
        let mut accepted = Vec::new();
        let mut refused = 0;
        let started = std::time::Instant::now();
        for n in 0..10 {
            let version = if n % 2 == 0 { V5 } else { V311 };
            let (raw, ack) = connect(broker.addr, version, &format!("rate-{n}")).await;
            match (version.is_v5(), ack.reason) {
                (_, ReasonCode::Success) => accepted.push(raw),
                (true, reason) => {
                    assert_eq!(reason, ReasonCode::ConnectionRateExceeded);
                    refused += 1;
                }
                (false, reason) => {
                    assert_eq!(reason.to_v3_connack(), Some(3), "3.1.1: server unavailable");
                    refused += 1;
                }
            }
        }
        // At most 3 per one-second window touched (a loaded machine may stretch the loop).
        let elapsed = started.elapsed();
        let windows = elapsed.as_secs() + 2;
        assert!(accepted.len() as u64 <= 3 * windows, "{} accepted in {elapsed:?}", accepted.len());
        if elapsed < std::time::Duration::from_millis(900) {
            assert!(refused >= 4, "{refused} of 10 refused in {elapsed:?}");
        }
        assert_eq!(limited(&tenants, Limit::ConnectRate), refused);
        // Packet size: announced in CONNACK; a larger PUBLISH ends the connection (v5: 0x95).
        tenants
            .provider
            .set(Default::default(), TenantSettings { max_packet_size: Some(256), ..Default::default() })
            .unwrap();
        let (mut v5, ack) = connect(broker.addr, V5, "big-5").await;
        assert_eq!(ack.properties.maximum_packet_size, Some(256));
        v5.send(&Packet::Publish(publish_packet("big", 0, None, &[0u8; 300]))).await;
        let seen = v5.expect_closed().await;
        assert!(
            matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::PacketTooLarge),
            "{seen:?}"
        );
        let (mut v3, _) = connect(broker.addr, V311, "big-3").await;
        v3.send(&Packet::Publish(publish_packet("big", 0, None, &[0u8; 300]))).await;
        assert!(v3.expect_closed().await.is_empty());
        // A packet within the limit is fine.
        let (mut ok, _) = connect(broker.addr, V311, "small").await;
        ok.send(&Packet::Publish(publish_packet("small", 1, Some(1), &[0u8; 100]))).await;
        assert!(matches!(ok.expect().await, Packet::PubAck(_)));
        assert_eq!(limited(&tenants, Limit::PacketSize), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_group_member_count() {
    bounded(async {
        let (broker, tenants) =
            start(TenantSettings { max_shared_group_members: Some(2), ..Default::default() });
        // Members on whichever shards their client ids land on: the count is across shards.
        let (mut a, _) = connect(broker.addr, V5, &broker.id_on_shard("grp-a", 0)).await;
        let (mut b, _) = connect(broker.addr, V5, &broker.id_on_shard("grp-b", 1)).await;
        let (mut c, _) = connect(broker.addr, V5, "grp-c").await;
        let (mut d, _) = connect(broker.addr, V311, "grp-d").await;
        assert_eq!(a.subscribe(1, "$share/g/t", 1).await, vec![1]);
        assert_eq!(b.subscribe(1, "$share/g/t", 1).await, vec![1]);
        assert_eq!(c.subscribe(1, "$share/g/t", 1).await, vec![0x97], "v5: a third member is over quota");
        assert_eq!(d.subscribe(1, "$share/g/t", 1).await, vec![0x80], "3.1.1: failure");
        // Another group, or the same group on another filter, has its own count.
        assert_eq!(c.subscribe(2, "$share/h/t", 1).await, vec![1]);
        assert_eq!(c.subscribe(3, "$share/g/u", 1).await, vec![1]);
        // Re-subscribing an existing member is not a new member.
        assert_eq!(a.subscribe(2, "$share/g/t", 0).await, vec![0]);
        // A member leaving frees a place.
        a.send(&Packet::Unsubscribe(shardmq_protocol::Unsubscribe {
            packet_id: 3,
            properties: Properties::default(),
            filters: vec![shardmq_protocol::Utf8::new("$share/g/t").unwrap()],
        }))
        .await;
        assert!(matches!(a.expect().await, Packet::UnsubAck(_)));
        assert_eq!(d.subscribe(2, "$share/g/t", 1).await, vec![1]);
        assert_eq!(limited(&tenants, Limit::SharedGroupMembers), 2);
    })
    .await;
}

/// Sends `count` pipelined QoS 0 PUBLISHes of `size` bytes from a new connection.
async fn blast(addr: SocketAddr, id: &str, count: u16, size: usize) -> Raw {
    let (mut publisher, _) = connect(addr, V311, id).await;
    let mut burst = bytes::BytesMut::new();
    for n in 0..count {
        let mut payload = vec![0u8; size.max(2)];
        payload[..2].copy_from_slice(&n.to_be_bytes());
        shardmq_protocol::encode(
            &Packet::Publish(publish_packet("blast", 0, None, &payload)),
            V311,
            &mut burst,
        )
        .unwrap();
    }
    publisher.send_bytes(&burst).await;
    publisher
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_wide_publish_rate_and_bandwidth_throttle() {
    bounded(async {
        // Tenant-wide: 40 messages a second across two connections; 120 messages need three
        // one-second windows, so at least one full second passes.
        let (broker, tenants) =
            start(TenantSettings { max_publish_rate_per_tenant: Some(40), ..Default::default() });
        let (mut sub, _) = connect(broker.addr, V311, "blast-sub").await;
        assert_eq!(sub.subscribe(1, "blast", 0).await, vec![0]);
        let started = std::time::Instant::now();
        let _one = blast(broker.addr, "blast-1", 60, 8).await;
        let _two = blast(broker.addr, "blast-2", 60, 8).await;
        for _ in 0..120 {
            assert!(matches!(sub.expect().await, Packet::Publish(_)));
        }
        assert!(started.elapsed() >= std::time::Duration::from_millis(1000), "{:?}", started.elapsed());
        assert!(limited(&tenants, Limit::TenantPublishRate) > 0);
        drop(broker);

        // Bandwidth: 2,000 bytes a second per connection; ~6,300 bytes of frames take over 2 s.
        let (broker, tenants) =
            start(TenantSettings { max_bytes_per_second_per_connection: Some(2000), ..Default::default() });
        let (mut sub, _) = connect(broker.addr, V311, "bw-sub").await;
        assert_eq!(sub.subscribe(1, "blast", 0).await, vec![0]);
        let started = std::time::Instant::now();
        let _fat = blast(broker.addr, "bw-pub", 30, 200).await;
        for n in 0..30u16 {
            match sub.expect().await {
                Packet::Publish(p) => assert_eq!(&p.payload[..2], &n.to_be_bytes(), "in order, nothing lost"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(started.elapsed() >= std::time::Duration::from_millis(1500), "{:?}", started.elapsed());
        assert!(limited(&tenants, Limit::Bandwidth) > 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_wide_bandwidth_throttles_all_connections_together() {
    bounded(async {
        // 3,000 bytes a second for the whole tenant; two connections send ~4,300 bytes of frames
        // each. Alone, each would fit in two windows; together they need at least three, so more
        // than one full second passes. Nothing is lost and each publisher's order is kept.
        let (broker, tenants) =
            start(TenantSettings { max_bytes_per_second_per_tenant: Some(3000), ..Default::default() });
        let (mut sub, _) = connect(broker.addr, V311, "tbw-sub").await;
        assert_eq!(sub.subscribe(1, "blast", 0).await, vec![0]);
        let started = std::time::Instant::now();
        let _one = blast(broker.addr, "tbw-1", 20, 200).await;
        let _two = blast(broker.addr, "tbw-2", 20, 200).await;
        let mut next = [0u16; 2];
        let mut seen = 0;
        while seen < 40 {
            match sub.expect().await {
                Packet::Publish(p) => {
                    let n = u16::from_be_bytes([p.payload[0], p.payload[1]]);
                    // Both publishers number from 0; each stream must be in order.
                    let stream = if next[0] == n { 0 } else { 1 };
                    assert_eq!(next[stream], n, "in order per publisher: {next:?}, got {n}");
                    next[stream] += 1;
                    seen += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(next, [20, 20]);
        assert!(started.elapsed() > std::time::Duration::from_millis(1000), "{:?}", started.elapsed());
        assert!(limited(&tenants, Limit::TenantBandwidth) > 0);
        assert_eq!(limited(&tenants, Limit::Bandwidth), 0, "no per-connection limit was set");
    })
    .await;
}
