//! End-to-end tests of the MQTT 5 features: topic aliases, message expiry, receive maximum, maximum
//! packet size, subscription options and identifiers, property pass-through, session expiry, will
//! delay, CONNACK properties and reason codes. Each test runs against brokers with 2 and 4 shards,
//! with its clients homed on different shards so messages cross the mesh.
//!
//! Most tests use the raw codec client (`v5_util::Raw`) because they check exact packets; the
//! property pass-through and subscription identifier tests also run through rumqttc's v5 client.
//! Fixed waits appear only where time is the subject (expiry, will delay, keep-alive) or to assert
//! that something does not arrive (`Raw::expect_quiet`, 400 ms).

mod common;
mod v5_util;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::TestBroker;
use shardmq_protocol::{
    Auth, Connect, Disconnect, Packet, Properties, PubResp, Publish, QoS, ReasonCode, RetainHandling,
    Subscribe, Subscription, Unsubscribe, Will,
};
use v5_util::*;

/// Generates one `#[tokio::test]` per core count for each `async fn name(cores: usize)`.
macro_rules! per_core_count {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cores_2() {
                crate::common::bounded(super::$name(2)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cores_4() {
                crate::common::bounded(super::$name(4)).await;
            }
        }
    )*};
}

per_core_count!(
    topic_alias_client_to_server,
    topic_alias_errors,
    topic_alias_server_to_client,
    message_expiry,
    receive_maximum_outgoing,
    receive_maximum_incoming,
    maximum_packet_size,
    subscription_identifiers,
    no_local,
    retain_as_published,
    retain_handling,
    request_response_properties,
    session_expiry_honoured,
    session_expiry_changed_on_disconnect,
    session_expiry_on_disconnect_after_zero_is_protocol_error,
    clean_start_discards_session,
    will_delay_published,
    will_delay_cancelled_by_reconnect,
    will_on_disconnect_reason,
    connack_properties_and_server_keep_alive,
    assigned_client_identifier,
    response_information,
    reason_codes,
    shutdown_sends_server_shutting_down,
    shared_no_local_and_enhanced_auth,
    retained_expiry_and_subscription_id,
    session_expiry_capped_and_will_at_session_end,
    invalid_v5_properties,
);

/// Two client ids homed on different shards: (subscriber on shard 0, publisher on the last).
fn ids(broker: &TestBroker, tag: &str) -> (String, String) {
    (
        broker.id_on_shard(&format!("{tag}-sub"), 0),
        broker.id_on_shard(&format!("{tag}-pub"), broker.cores - 1),
    )
}

fn start(cores: usize, adjust: impl FnOnce(&mut shardmq_shards::BrokerConfig)) -> TestBroker {
    TestBroker::start_with(|cfg| {
        cfg.cores = cores;
        adjust(cfg);
    })
}

fn session_expiry(secs: u32) -> Properties {
    Properties { session_expiry_interval: Some(secs), ..Properties::default() }
}

/// A CONNECT that resumes a session (clean start 0) with a session expiry interval.
fn resume(client_id: &str, expiry_secs: u32) -> Connect {
    let mut connect = connect_packet(client_id);
    connect.clean_start = false;
    connect.properties = session_expiry(expiry_secs);
    connect
}

fn qos1(topic: &str, payload: &[u8]) -> Publish {
    publish_packet(topic, QoS::AtLeastOnce, None, payload)
}

async fn puback(raw: &mut Raw, packet_id: u16) {
    raw.send(&Packet::PubAck(PubResp::new(packet_id))).await;
}

// ----- 1. topic aliases ----------------------------------------------------------------------

/// A client sets aliases with a topic and then uses them with an empty topic; remapping an alias
/// to a new topic takes effect. Subscribers that allow no aliases get full topic names.
async fn topic_alias_client_to_server(cores: usize) {
    let broker = start(cores, |cfg| cfg.topic_alias_max = 4);
    let (sub_id, pub_id) = ids(&broker, "alias-in");
    let mut sub = Raw::connect(broker.addr, &sub_id, Properties::default()).await;
    sub.subscribe_ok(1, "ta/#", QoS::AtLeastOnce, None).await;
    let (mut publisher, connack) = Raw::connect_with(broker.addr, connect_packet(&pub_id)).await;
    assert_eq!(connack.properties.topic_alias_maximum, Some(4), "CONNACK announces topic_alias_max");

    // (topic sent, alias, payload, topic the subscriber must see)
    let steps = [
        ("ta/one", 1, "a", "ta/one"),
        ("", 1, "b", "ta/one"),
        ("ta/two", 1, "c", "ta/two"),
        ("", 1, "d", "ta/two"),
        ("ta/four", 4, "e", "ta/four"),
        ("", 4, "f", "ta/four"),
        ("", 1, "g", "ta/two"),
    ];
    for (index, (topic, alias, payload, _)) in steps.iter().enumerate() {
        let mut publish = qos1(topic, payload.as_bytes());
        publish.properties.topic_alias = Some(*alias);
        assert_eq!(publisher.publish_qos1(publish, index as u16 + 1).await, ReasonCode::Success);
    }
    for (_, _, payload, expected_topic) in steps {
        let got = sub.recv_publish().await;
        assert_eq!((got.topic.as_str(), &got.payload[..]), (expected_topic, payload.as_bytes()));
        assert_eq!(got.properties.topic_alias, None, "the subscriber allowed no aliases");
        puback(&mut sub, got.packet_id.expect("QoS 1")).await;
    }
}

/// Alias 0 and aliases above the broker's maximum are Topic Alias invalid (0x94); an empty topic
/// with an alias the connection never set is a Protocol Error (0x82) (MQTT-3.3.2-8..-10, 3.3.4).
async fn topic_alias_errors(cores: usize) {
    let broker = start(cores, |cfg| cfg.topic_alias_max = 4);
    let (sub_id, pub_id) = ids(&broker, "alias-err");
    let mut sub = Raw::connect(broker.addr, &sub_id, Properties::default()).await;
    sub.subscribe_ok(1, "#", QoS::AtMostOnce, None).await;

    // Alias 0 (hand-built: the encoder refuses it). QoS 0, topic "t", properties {alias 0}, "x".
    let mut raw = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    raw.send_bytes(&[0x30, 8, 0x00, 0x01, b't', 0x03, 0x23, 0x00, 0x00, b'x']).await;
    assert_eq!(raw.expect_disconnect().await, ReasonCode::TopicAliasInvalid, "alias 0");

    let mut raw = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    let mut publish = publish_packet("t", QoS::AtMostOnce, None, b"x");
    publish.properties.topic_alias = Some(5);
    raw.send(&Packet::Publish(publish)).await;
    assert_eq!(raw.expect_disconnect().await, ReasonCode::TopicAliasInvalid, "alias above the maximum");

    let mut raw = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    let mut publish = publish_packet("", QoS::AtMostOnce, None, b"x");
    publish.properties.topic_alias = Some(3);
    raw.send(&Packet::Publish(publish)).await;
    assert_eq!(raw.expect_disconnect().await, ReasonCode::ProtocolError, "unknown alias, empty topic");

    // An alias set on one connection is gone on the next (aliases are per connection).
    let mut raw = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    let mut publish = publish_packet("t/set", QoS::AtMostOnce, None, b"x");
    publish.properties.topic_alias = Some(2);
    raw.send(&Packet::Publish(publish)).await;
    raw.ping().await;
    raw.disconnect(ReasonCode::NormalDisconnection, Properties::default()).await;
    let mut raw = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    let mut publish = publish_packet("", QoS::AtMostOnce, None, b"y");
    publish.properties.topic_alias = Some(2);
    raw.send(&Packet::Publish(publish)).await;
    assert_eq!(raw.expect_disconnect().await, ReasonCode::ProtocolError, "alias from an old connection");

    // None of the refused PUBLISHes was routed; the one valid one was.
    let got = sub.recv_publish().await;
    assert_eq!((got.topic.as_str(), &got.payload[..]), ("t/set", &b"x"[..]));
    sub.expect_quiet().await;
}

/// Resolves the topic of a PUBLISH received by a client that allows aliases, checking that the
/// broker only uses aliases the client allows and has been told about.
fn resolve_alias(
    aliases: &mut std::collections::HashMap<u16, String>,
    publish: &Publish,
    max: u16,
) -> String {
    match publish.properties.topic_alias {
        None => {
            assert!(!publish.topic.is_empty(), "empty topic without an alias");
            publish.topic.as_str().to_string()
        }
        Some(alias) => {
            assert!((1..=max).contains(&alias), "alias {alias} outside 1..={max}");
            if publish.topic.is_empty() {
                aliases.get(&alias).cloned().unwrap_or_else(|| panic!("alias {alias} used before it was set"))
            } else {
                aliases.insert(alias, publish.topic.as_str().to_string());
                publish.topic.as_str().to_string()
            }
        }
    }
}

/// A subscriber with topic alias maximum > 0 gets the topic with an alias first, then the alias
/// with an empty topic; a subscriber with maximum 0 never gets an alias (MQTT-3.3.2-11..-12).
async fn topic_alias_server_to_client(cores: usize) {
    let broker = start(cores, |_| {});
    let (sub_id, pub_id) = ids(&broker, "alias-out");
    let plain_id = broker.id_on_shard("alias-out-plain", 1);
    let props = Properties { topic_alias_maximum: Some(2), ..Properties::default() };
    let mut aliased = Raw::connect(broker.addr, &sub_id, props).await;
    aliased.subscribe_ok(1, "tao/#", QoS::AtLeastOnce, None).await;
    let mut plain = Raw::connect(broker.addr, &plain_id, Properties::default()).await;
    plain.subscribe_ok(1, "tao/#", QoS::AtLeastOnce, None).await;
    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;

    let sent = ["tao/x", "tao/x", "tao/y", "tao/y", "tao/z", "tao/x", "tao/z", "tao/y"];
    for (index, topic) in sent.iter().enumerate() {
        let payload = format!("m{index}");
        assert_eq!(
            publisher.publish_qos1(qos1(topic, payload.as_bytes()), index as u16 + 1).await,
            ReasonCode::Success
        );
    }
    let mut aliases = std::collections::HashMap::new();
    for (index, topic) in sent.iter().enumerate() {
        let got = aliased.recv_publish().await;
        assert_eq!(&got.payload[..], format!("m{index}").as_bytes());
        assert_eq!(resolve_alias(&mut aliases, &got, 2), *topic, "message {index}");
        match index {
            // First use of a topic: topic name and the alias that now stands for it.
            0 | 2 => assert!(!got.topic.is_empty() && got.properties.topic_alias.is_some(), "{got:?}"),
            // Second use: the alias alone.
            1 | 3 => assert!(got.topic.is_empty() && got.properties.topic_alias.is_some(), "{got:?}"),
            _ => {}
        }
        puback(&mut aliased, got.packet_id.expect("QoS 1")).await;

        let got = plain.recv_publish().await;
        assert_eq!((got.topic.as_str(), got.properties.topic_alias), (*topic, None));
        puback(&mut plain, got.packet_id.expect("QoS 1")).await;
    }
}

// ----- 2. message expiry ---------------------------------------------------------------------

/// A message queued for an offline session expires; a delivered one carries the remaining expiry.
async fn message_expiry(cores: usize) {
    let broker = start(cores, |_| {});
    let (sub_id, pub_id) = ids(&broker, "expiry");
    let mut sub = Raw::connect(broker.addr, &sub_id, session_expiry(60)).await;
    sub.subscribe_ok(1, "exp/t", QoS::AtLeastOnce, None).await;
    sub.disconnect(ReasonCode::NormalDisconnection, Properties::default()).await;

    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    let mut short = qos1("exp/t", b"short");
    short.properties.message_expiry_interval = Some(1);
    assert_eq!(publisher.publish_qos1(short, 1).await, ReasonCode::Success);
    let mut long = qos1("exp/t", b"long");
    long.properties.message_expiry_interval = Some(30);
    assert_eq!(publisher.publish_qos1(long, 2).await, ReasonCode::Success);
    assert_eq!(publisher.publish_qos1(qos1("exp/t", b"forever"), 3).await, ReasonCode::Success);
    let published_at = Instant::now();

    // Time is the subject here: let the 1 s expiry pass.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (mut sub, connack) = Raw::connect_with(broker.addr, resume(&sub_id, 60)).await;
    assert!(connack.session_present);
    let got = sub.recv_publish().await;
    assert_eq!(&got.payload[..], b"long", "the expired message was delivered");
    let waited = published_at.elapsed().as_secs() as u32;
    let remaining = got.properties.message_expiry_interval.expect("remaining expiry is sent");
    assert!(
        remaining <= 30 - waited && remaining >= 30 - waited - 2,
        "remaining {remaining} after {waited} s"
    );
    puback(&mut sub, got.packet_id.expect("QoS 1")).await;
    let got = sub.recv_publish().await;
    assert_eq!(&got.payload[..], b"forever");
    assert_eq!(got.properties.message_expiry_interval, None, "no expiry was set");
    puback(&mut sub, got.packet_id.expect("QoS 1")).await;
    sub.expect_quiet().await;

    // Live delivery keeps the interval (at most one second spent).
    let mut live = qos1("exp/t", b"live");
    live.properties.message_expiry_interval = Some(30);
    assert_eq!(publisher.publish_qos1(live, 4).await, ReasonCode::Success);
    let got = sub.recv_publish().await;
    let remaining = got.properties.message_expiry_interval.expect("remaining expiry is sent");
    assert!((29..=30).contains(&remaining), "live remaining {remaining}");
}

// ----- 3. receive maximum ----------------------------------------------------------------------

/// A client announcing receive maximum 2 never has more than 2 unacknowledged QoS 1 PUBLISHes.
async fn receive_maximum_outgoing(cores: usize) {
    let broker = start(cores, |_| {});
    let (sub_id, pub_id) = ids(&broker, "rm-out");
    let props = Properties { receive_maximum: Some(2), ..Properties::default() };
    let mut sub = Raw::connect(broker.addr, &sub_id, props).await;
    sub.subscribe_ok(1, "rmo/t", QoS::AtLeastOnce, None).await;
    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    for index in 0..5u16 {
        let payload = format!("m{index}");
        assert_eq!(
            publisher.publish_qos1(qos1("rmo/t", payload.as_bytes()), index + 1).await,
            ReasonCode::Success
        );
    }
    let mut outstanding = Vec::new();
    for index in 0..2 {
        let got = sub.recv_publish().await;
        assert_eq!(&got.payload[..], format!("m{index}").as_bytes());
        outstanding.push(got.packet_id.expect("QoS 1"));
    }
    sub.expect_quiet().await;
    // Each acknowledgement opens the window by exactly one.
    puback(&mut sub, outstanding.remove(0)).await;
    let got = sub.recv_publish().await;
    assert_eq!(&got.payload[..], b"m2");
    outstanding.push(got.packet_id.expect("QoS 1"));
    sub.expect_quiet().await;
    for id in outstanding.drain(..) {
        puback(&mut sub, id).await;
    }
    for index in 3..5 {
        let got = sub.recv_publish().await;
        assert_eq!(&got.payload[..], format!("m{index}").as_bytes());
        puback(&mut sub, got.packet_id.expect("QoS 1")).await;
    }
    sub.expect_quiet().await;
}

/// More QoS 2 PUBLISHes awaiting PUBREL than the broker's receive maximum: DISCONNECT 0x93.
async fn receive_maximum_incoming(cores: usize) {
    let broker = start(cores, |cfg| cfg.receive_maximum = 2);
    let (_, pub_id) = ids(&broker, "rm-in");
    let (mut raw, connack) = Raw::connect_with(broker.addr, connect_packet(&pub_id)).await;
    assert_eq!(connack.properties.receive_maximum, Some(2));
    let qos2 = |id: u16| Packet::Publish(publish_packet("rmi/t", QoS::ExactlyOnce, Some(id), b"x"));
    for id in [1, 2] {
        raw.send(&qos2(id)).await;
        match raw.recv().await {
            Packet::PubRec(rec) => assert_eq!((rec.packet_id, rec.reason), (id, ReasonCode::Success)),
            other => panic!("expected PUBREC, got {other:?}"),
        }
    }
    // Completing one frees one slot.
    raw.send(&Packet::PubRel(PubResp::new(1))).await;
    match raw.recv().await {
        Packet::PubComp(comp) => assert_eq!((comp.packet_id, comp.reason), (1, ReasonCode::Success)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    raw.send(&qos2(3)).await;
    match raw.recv().await {
        Packet::PubRec(rec) => assert_eq!(rec.packet_id, 3),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    raw.send(&qos2(4)).await;
    assert_eq!(raw.expect_disconnect().await, ReasonCode::ReceiveMaximumExceeded);
}

// ----- 4. maximum packet size ------------------------------------------------------------------

/// The broker announces its maximum packet size and disconnects a client that exceeds it (0x95);
/// a message larger than a client's maximum packet size is not sent to that client, and the
/// topic alias the broker would have used for it is not left half-assigned.
async fn maximum_packet_size(cores: usize) {
    let broker = start(cores, |cfg| cfg.packet_size_bytes_max = 1024);
    let (sub_id, pub_id) = ids(&broker, "mps");
    let small_props =
        Properties { maximum_packet_size: Some(256), topic_alias_maximum: Some(4), ..Properties::default() };
    let (mut small, connack) = Raw::connect_with(broker.addr, {
        let mut connect = connect_packet(&sub_id);
        connect.properties = small_props;
        connect
    })
    .await;
    assert_eq!(connack.properties.maximum_packet_size, Some(1024));
    small.subscribe_ok(1, "mps/#", QoS::AtLeastOnce, None).await;
    let big_id = broker.id_on_shard("mps-big", 1);
    let mut big = Raw::connect(broker.addr, &big_id, Properties::default()).await;
    big.subscribe_ok(1, "mps/#", QoS::AtLeastOnce, None).await;

    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    let large = vec![b'L'; 600];
    assert_eq!(publisher.publish_qos1(qos1("mps/a", &large), 1).await, ReasonCode::Success);
    assert_eq!(publisher.publish_qos1(qos1("mps/a", b"tiny"), 2).await, ReasonCode::Success);

    let got = big.recv_publish().await;
    assert_eq!(got.payload.len(), 600);
    let got = big.recv_publish().await;
    assert_eq!(&got.payload[..], b"tiny");
    // The small client's first message is the tiny one, and it names its topic (the large one
    // was dropped before the client could learn an alias from it).
    let got = small.recv_publish().await;
    assert_eq!(&got.payload[..], b"tiny");
    assert_eq!(got.topic.as_str(), "mps/a", "first message on a topic must carry the topic name: {got:?}");

    // 1024 is the broker's limit: a 2000-byte PUBLISH is Packet too large.
    publisher.send(&Packet::Publish(qos1_with_id("mps/a", &[b'X'; 2000], 3))).await;
    assert_eq!(publisher.expect_disconnect().await, ReasonCode::PacketTooLarge);
    big.expect_quiet().await;
}

fn qos1_with_id(topic: &str, payload: &[u8], id: u16) -> Publish {
    publish_packet(topic, QoS::AtLeastOnce, Some(id), payload)
}

// ----- 5. subscription options and identifiers ----------------------------------------------------

/// Subscription identifiers come with matching messages; one PUBLISH carries the ids of all the
/// overlapping subscriptions (MQTT-3.3.4-3/-4/-5). Checked with the raw client and with rumqttc.
async fn subscription_identifiers(cores: usize) {
    let broker = start(cores, |_| {});
    let (sub_id, pub_id) = ids(&broker, "subid");
    let mut sub = Raw::connect(broker.addr, &sub_id, Properties::default()).await;
    sub.subscribe_ok(1, "sid/+", QoS::AtLeastOnce, Some(7)).await;
    sub.subscribe_ok(2, "sid/#", QoS::AtLeastOnce, Some(300_000)).await;
    sub.subscribe_ok(3, "other/t", QoS::AtLeastOnce, None).await;
    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    for (index, topic) in ["sid/x", "sid/x/y", "other/t"].iter().enumerate() {
        assert_eq!(publisher.publish_qos1(qos1(topic, b"m"), index as u16 + 1).await, ReasonCode::Success);
    }
    let expected: [(&str, Vec<u32>); 3] =
        [("sid/x", vec![7, 300_000]), ("sid/x/y", vec![300_000]), ("other/t", vec![])];
    for (topic, ids) in expected {
        // One PUBLISH per message, whatever the number of matching subscriptions.
        let got = sub.recv_publish().await;
        let mut got_ids = got.properties.subscription_identifiers.clone();
        got_ids.sort_unstable();
        assert_eq!((got.topic.as_str(), got_ids), (topic, ids));
        puback(&mut sub, got.packet_id.expect("QoS 1")).await;
    }
    sub.expect_quiet().await;

    // The same through rumqttc's v5 client.
    let mut r_sub = R5::connect(broker.addr, &broker.id_on_shard("subid-r5", 1)).await;
    r_sub.subscribe("rsid/+", Some(11)).await;
    r_sub.subscribe("rsid/#", Some(12)).await;
    publisher.publish_qos1(qos1("rsid/a", b"r"), 9).await;
    let got = r_sub.next_publish().await;
    let mut got_ids = got.properties.expect("properties").subscription_identifiers;
    got_ids.sort_unstable();
    assert_eq!((&got.topic[..], got_ids), (&b"rsid/a"[..], vec![11, 12]));
}

/// No-local: a client does not receive its own messages on a no-local subscription
/// (MQTT-3.8.3-3), while other subscribers do.
async fn no_local(cores: usize) {
    let broker = start(cores, |_| {});
    let (other_id, self_id) = ids(&broker, "nolocal");
    let mut other = Raw::connect(broker.addr, &other_id, Properties::default()).await;
    other.subscribe_ok(1, "nl/t", QoS::AtLeastOnce, None).await;
    let mut me = Raw::connect(broker.addr, &self_id, Properties::default()).await;
    let mut opts = options(QoS::AtLeastOnce);
    opts.no_local = true;
    assert_eq!(me.subscribe(1, "nl/t", opts, None).await.reasons, vec![ReasonCode::GrantedQoS1]);
    me.subscribe_ok(2, "nlm/marker", QoS::AtLeastOnce, None).await;

    me.send(&Packet::Publish(qos1_with_id("nl/t", b"own", 10))).await;
    me.send(&Packet::Publish(qos1_with_id("nlm/marker", b"marker", 11))).await;
    // Both PUBACKs and the marker arrive; the own message on the no-local subscription must not
    // (it would arrive before the marker: same publisher, same session).
    let (mut acks, mut marker) = (0, false);
    while acks < 2 || !marker {
        match me.recv().await {
            Packet::PubAck(_) => acks += 1,
            Packet::Publish(publish) if publish.topic.as_str() == "nlm/marker" => {
                marker = true;
                puback(&mut me, publish.packet_id.expect("QoS 1")).await;
            }
            other => panic!("no-local subscriber got {other:?}"),
        }
    }
    let got = other.recv_publish().await;
    assert_eq!((got.topic.as_str(), &got.payload[..]), ("nl/t", &b"own"[..]));
}

/// Retain-as-published keeps the retain flag on live delivery; without it the flag is cleared.
async fn retain_as_published(cores: usize) {
    let broker = start(cores, |_| {});
    let (sub_id, pub_id) = ids(&broker, "rap");
    let mut sub = Raw::connect(broker.addr, &sub_id, Properties::default()).await;
    let mut keep = options(QoS::AtLeastOnce);
    keep.retain_as_published = true;
    assert_eq!(sub.subscribe(1, "rap/keep", keep, None).await.reasons, vec![ReasonCode::GrantedQoS1]);
    sub.subscribe_ok(2, "rap/clear", QoS::AtLeastOnce, None).await;
    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    for (index, (topic, retain)) in
        [("rap/keep", true), ("rap/clear", true), ("rap/keep", false)].iter().enumerate()
    {
        let mut publish = qos1(topic, b"m");
        publish.retain = *retain;
        assert_eq!(publisher.publish_qos1(publish, index as u16 + 1).await, ReasonCode::Success);
    }
    for (topic, retain) in [("rap/keep", true), ("rap/clear", false), ("rap/keep", false)] {
        let got = sub.recv_publish().await;
        assert_eq!((got.topic.as_str(), got.retain), (topic, retain));
        puback(&mut sub, got.packet_id.expect("QoS 1")).await;
    }
}

/// Publishes a retained message and waits until the broker stores it: the publisher subscribes
/// to the topic itself and receives it back as retained (its SUBSCRIBE follows its PUBLISH to the
/// retained message's shard on the same ring).
async fn publish_retained_confirmed(publisher: &mut Raw, topic: &str, payload: &[u8]) {
    let mut publish = qos1(topic, payload);
    publish.retain = true;
    assert_eq!(publisher.publish_qos1(publish, 100).await, ReasonCode::Success);
    publisher.subscribe_ok(101, topic, QoS::AtLeastOnce, None).await;
    let got = publisher.recv_publish().await;
    assert!(got.retain && &got.payload[..] == payload, "{got:?}");
    puback(publisher, got.packet_id.expect("QoS 1")).await;
}

fn with_retain_handling(retain_handling: RetainHandling) -> shardmq_protocol::SubscriptionOptions {
    shardmq_protocol::SubscriptionOptions { retain_handling, ..options(QoS::AtLeastOnce) }
}

async fn expect_retained(sub: &mut Raw, topic: &str, payload: &[u8]) {
    let got = sub.recv_publish().await;
    assert_eq!((got.topic.as_str(), &got.payload[..], got.retain), (topic, payload, true));
    puback(sub, got.packet_id.expect("QoS 1")).await;
}

/// Retain handling 0 sends retained messages on every subscribe, 1 only for a new subscription,
/// 2 never (MQTT-3.3.1-9..-11).
async fn retain_handling(cores: usize) {
    let broker = start(cores, |_| {});
    let (sub_id, pub_id) = ids(&broker, "rh");
    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    publish_retained_confirmed(&mut publisher, "rh/t", b"kept").await;
    let mut sub = Raw::connect(broker.addr, &sub_id, Properties::default()).await;

    for packet_id in [1, 2] {
        let suback =
            sub.subscribe(packet_id, "rh/t", with_retain_handling(RetainHandling::SendAtSubscribe), None);
        assert_eq!(suback.await.reasons, vec![ReasonCode::GrantedQoS1]);
        expect_retained(&mut sub, "rh/t", b"kept").await;
    }
    let suback = sub.subscribe(3, "rh/+", with_retain_handling(RetainHandling::SendIfNew), None).await;
    assert_eq!(suback.reasons, vec![ReasonCode::GrantedQoS1]);
    expect_retained(&mut sub, "rh/t", b"kept").await;
    let suback = sub.subscribe(4, "rh/+", with_retain_handling(RetainHandling::SendIfNew), None).await;
    assert_eq!(suback.reasons, vec![ReasonCode::GrantedQoS1]);
    sub.expect_quiet().await;
    let suback = sub.subscribe(5, "rh/#", with_retain_handling(RetainHandling::DoNotSend), None).await;
    assert_eq!(suback.reasons, vec![ReasonCode::GrantedQoS1]);
    sub.expect_quiet().await;
}

// ----- 6. property pass-through ------------------------------------------------------------------

/// User properties, payload format indicator, content type, response topic and correlation data
/// reach the subscriber unchanged; a request/response round trip through rumqttc's v5 client.
async fn request_response_properties(cores: usize) {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS as RQoS;
    let broker = start(cores, |_| {});
    let (responder_id, requester_id) = ids(&broker, "reqresp");
    let mut responder = R5::connect(broker.addr, &responder_id).await;
    responder.subscribe("svc/req", None).await;
    let mut requester = R5::connect(broker.addr, &requester_id).await;
    let response_topic = format!("svc/resp/{requester_id}");
    requester.subscribe(&response_topic, None).await;

    let user_properties = vec![
        ("trace".to_string(), "abc".to_string()),
        ("dup".to_string(), "1".to_string()),
        ("dup".to_string(), "2".to_string()),
    ];
    let correlation = Bytes::from_static(b"\x00\x01corr\xff");
    let request_properties = PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some(response_topic.clone()),
        correlation_data: Some(correlation.clone()),
        user_properties: user_properties.clone(),
        content_type: Some("application/json".to_string()),
        ..PublishProperties::default()
    };
    requester
        .client
        .publish_with_properties("svc/req", RQoS::AtLeastOnce, false, "{\"q\":1}", request_properties.clone())
        .await
        .expect("request queued");

    let request = responder.next_publish().await;
    assert_eq!(&request.payload[..], b"{\"q\":1}");
    let got = request.properties.expect("request properties");
    assert_eq!(got, request_properties, "request properties pass through unchanged");

    let response_properties = PublishProperties {
        correlation_data: got.correlation_data.clone(),
        user_properties: vec![("status".to_string(), "ok".to_string())],
        ..PublishProperties::default()
    };
    responder
        .client
        .publish_with_properties(
            got.response_topic.clone().expect("response topic"),
            RQoS::AtLeastOnce,
            false,
            "{\"a\":2}",
            response_properties.clone(),
        )
        .await
        .expect("response queued");
    let response = requester.next_publish().await;
    assert_eq!((&response.topic[..], &response.payload[..]), (response_topic.as_bytes(), &b"{\"a\":2}"[..]));
    assert_eq!(response.properties.expect("response properties"), response_properties);

    // And through the raw codec, with every pass-through property on one message.
    let mut raw_sub =
        Raw::connect(broker.addr, &broker.id_on_shard("reqresp-raw", 1), Properties::default()).await;
    raw_sub.subscribe_ok(1, "pt/t", QoS::AtMostOnce, None).await;
    let mut raw_pub =
        Raw::connect(broker.addr, &broker.id_on_shard("reqresp-rawpub", 0), Properties::default()).await;
    let mut publish = qos1("pt/t", b"\xff\x00binary");
    publish.properties.payload_format_indicator = Some(0);
    publish.properties.content_type = Some(utf8("application/octet-stream"));
    publish.properties.response_topic = Some(utf8("pt/reply"));
    publish.properties.correlation_data = Some(Bytes::from_static(b"id-1"));
    publish.properties.user_properties = vec![user_property("b", "2"), user_property("a", "1")];
    let sent_properties = publish.properties.clone();
    assert_eq!(raw_pub.publish_qos1(publish, 1).await, ReasonCode::Success);
    let got = raw_sub.recv_publish().await;
    assert_eq!(got.properties, sent_properties);
    assert_eq!(&got.payload[..], b"\xff\x00binary");
}

// ----- 7. session expiry ------------------------------------------------------------------------

/// A session is kept for a reconnect within its expiry (session present, queued messages
/// delivered) and gone after it.
async fn session_expiry_honoured(cores: usize) {
    let broker = start(cores, |_| {});
    let (sub_id, pub_id) = ids(&broker, "sexp");
    let mut sub = Raw::connect(broker.addr, &sub_id, session_expiry(1)).await;
    sub.subscribe_ok(1, "se/t", QoS::AtLeastOnce, None).await;
    sub.disconnect(ReasonCode::NormalDisconnection, Properties::default()).await;
    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    assert_eq!(publisher.publish_qos1(qos1("se/t", b"queued"), 1).await, ReasonCode::Success);

    let (mut sub, connack) = Raw::connect_with(broker.addr, resume(&sub_id, 1)).await;
    assert!(connack.session_present, "reconnect within the expiry finds the session");
    let got = sub.recv_publish().await;
    assert_eq!(&got.payload[..], b"queued");
    puback(&mut sub, got.packet_id.expect("QoS 1")).await;
    sub.disconnect(ReasonCode::NormalDisconnection, Properties::default()).await;

    // Time is the subject: wait past the 1 s expiry (plus the broker's 100 ms timer tick).
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (mut sub, connack) = Raw::connect_with(broker.addr, resume(&sub_id, 0)).await;
    assert!(!connack.session_present, "the session expired");
    assert_eq!(publisher.publish_qos1(qos1("se/t", b"after"), 2).await, ReasonCode::Success);
    sub.expect_quiet().await;
}

/// The session expiry set on DISCONNECT replaces the one from CONNECT, both ways.
async fn session_expiry_changed_on_disconnect(cores: usize) {
    let broker = start(cores, |_| {});
    let (id_a, id_b) = ids(&broker, "sexp-disc");
    // 60 s on CONNECT, 0 on DISCONNECT: the session ends with the connection.
    let sub = Raw::connect(broker.addr, &id_a, session_expiry(60)).await;
    sub.disconnect(ReasonCode::NormalDisconnection, session_expiry(0)).await;
    let (_, connack) = Raw::connect_with(broker.addr, resume(&id_a, 0)).await;
    assert!(!connack.session_present, "DISCONNECT set the expiry to 0");

    // 1 s on CONNECT, 60 s on DISCONNECT: the session outlives the original second.
    let mut sub = Raw::connect(broker.addr, &id_b, session_expiry(1)).await;
    sub.subscribe_ok(1, "sed/t", QoS::AtLeastOnce, None).await;
    sub.disconnect(ReasonCode::NormalDisconnection, session_expiry(60)).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (_, connack) = Raw::connect_with(broker.addr, resume(&id_b, 60)).await;
    assert!(connack.session_present, "DISCONNECT extended the expiry to 60 s");
}

/// Setting a non-zero expiry on DISCONNECT when CONNECT had 0 is a Protocol Error (MQTT-3.14.2-2).
async fn session_expiry_on_disconnect_after_zero_is_protocol_error(cores: usize) {
    let broker = start(cores, |_| {});
    let (id, _) = ids(&broker, "sexp-zero");
    let mut raw = Raw::connect(broker.addr, &id, Properties::default()).await;
    let disconnect = Disconnect { reason: ReasonCode::NormalDisconnection, properties: session_expiry(30) };
    raw.send(&Packet::Disconnect(disconnect)).await;
    assert_eq!(raw.expect_disconnect().await, ReasonCode::ProtocolError);
    let (_, connack) = Raw::connect_with(broker.addr, resume(&id, 0)).await;
    assert!(!connack.session_present, "the session was not extended");
}

/// Clean start 1 discards the stored session: no session present, no queued messages, no
/// subscriptions.
async fn clean_start_discards_session(cores: usize) {
    let broker = start(cores, |_| {});
    let (sub_id, pub_id) = ids(&broker, "clean");
    let mut sub = Raw::connect(broker.addr, &sub_id, session_expiry(60)).await;
    sub.subscribe_ok(1, "cs/t", QoS::AtLeastOnce, None).await;
    sub.disconnect(ReasonCode::NormalDisconnection, Properties::default()).await;
    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    assert_eq!(publisher.publish_qos1(qos1("cs/t", b"queued"), 1).await, ReasonCode::Success);

    let mut connect = connect_packet(&sub_id);
    connect.properties = session_expiry(60);
    let (mut sub, connack) = Raw::connect_with(broker.addr, connect).await;
    assert!(!connack.session_present, "clean start discards the session");
    sub.subscribe_ok(2, "cs/marker", QoS::AtLeastOnce, None).await;
    assert_eq!(publisher.publish_qos1(qos1("cs/t", b"live"), 2).await, ReasonCode::Success);
    assert_eq!(publisher.publish_qos1(qos1("cs/marker", b"marker"), 3).await, ReasonCode::Success);
    // Neither the queued message nor the old subscription survived: the marker comes first.
    let got = sub.recv_publish().await;
    assert_eq!((got.topic.as_str(), &got.payload[..]), ("cs/marker", &b"marker"[..]));
}

// ----- 8. will ----------------------------------------------------------------------------------

fn connect_with_will(client_id: &str, topic: &str, payload: &[u8], delay_secs: Option<u32>) -> Connect {
    let mut connect = connect_packet(client_id);
    connect.properties = session_expiry(30);
    connect.will = Some(Will {
        topic: utf8(topic),
        payload: Bytes::copy_from_slice(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties {
            will_delay_interval: delay_secs,
            content_type: Some(utf8("text/plain")),
            user_properties: vec![user_property("why", "test")],
            ..Properties::default()
        },
    });
    connect
}

/// A will with a 2 s delay is published about 2 s after an abnormal disconnect, with its
/// properties (and without the will delay).
async fn will_delay_published(cores: usize) {
    let broker = start(cores, |_| {});
    let (watcher_id, client_id) = ids(&broker, "will-delay");
    let mut watcher = Raw::connect(broker.addr, &watcher_id, Properties::default()).await;
    watcher.subscribe_ok(1, "will/delayed", QoS::AtLeastOnce, None).await;
    let (client, connack) =
        Raw::connect_with(broker.addr, connect_with_will(&client_id, "will/delayed", b"gone", Some(2))).await;
    assert_eq!(connack.reason, ReasonCode::Success);
    client.drop_connection();
    let dropped_at = Instant::now();

    // Time is the subject: nothing for the first second, then the will.
    match watcher.try_recv(Duration::from_millis(1000)).await {
        Err(RecvError::TimedOut) => {}
        other => panic!("will arrived before its delay: {other:?}"),
    }
    let will = watcher.recv_publish().await;
    let after = dropped_at.elapsed();
    assert!(
        after >= Duration::from_millis(1800) && after <= Duration::from_millis(4000),
        "will after {after:?}"
    );
    assert_eq!((will.topic.as_str(), &will.payload[..]), ("will/delayed", &b"gone"[..]));
    assert_eq!(will.properties.content_type, Some(utf8("text/plain")));
    assert_eq!(will.properties.user_properties, vec![user_property("why", "test")]);
    assert_eq!(will.properties.will_delay_interval, None);
}

/// A client that reconnects within the will delay cancels its will.
async fn will_delay_cancelled_by_reconnect(cores: usize) {
    let broker = start(cores, |_| {});
    let (watcher_id, client_id) = ids(&broker, "will-cancel");
    let mut watcher = Raw::connect(broker.addr, &watcher_id, Properties::default()).await;
    watcher.subscribe_ok(1, "will/cancelled", QoS::AtLeastOnce, None).await;
    let (client, _) =
        Raw::connect_with(broker.addr, connect_with_will(&client_id, "will/cancelled", b"gone", Some(2)))
            .await;
    client.drop_connection();
    let (_client, connack) = Raw::connect_with(broker.addr, resume(&client_id, 30)).await;
    assert!(connack.session_present);
    // Time is the subject: past the delay, still no will.
    match watcher.try_recv(Duration::from_millis(2600)).await {
        Err(RecvError::TimedOut) => {}
        other => panic!("will published although the client came back: {other:?}"),
    }
}

/// DISCONNECT with reason 0x04 publishes the will; a normal DISCONNECT does not; an abnormal
/// close without a delay publishes it at once.
async fn will_on_disconnect_reason(cores: usize) {
    let broker = start(cores, |_| {});
    let (watcher_id, client_id) = ids(&broker, "will-reason");
    let mut watcher = Raw::connect(broker.addr, &watcher_id, Properties::default()).await;
    watcher.subscribe_ok(1, "will/+", QoS::AtLeastOnce, None).await;

    let (client, _) =
        Raw::connect_with(broker.addr, connect_with_will(&client_id, "will/w04", b"04", None)).await;
    client.disconnect(ReasonCode::DisconnectWithWillMessage, Properties::default()).await;
    let will = watcher.recv_publish().await;
    assert_eq!((will.topic.as_str(), &will.payload[..]), ("will/w04", &b"04"[..]));
    assert_eq!(will.properties.user_properties, vec![user_property("why", "test")]);
    puback(&mut watcher, will.packet_id.expect("QoS 1")).await;

    let (client, _) =
        Raw::connect_with(broker.addr, connect_with_will(&client_id, "will/normal", b"no", None)).await;
    client.disconnect(ReasonCode::NormalDisconnection, Properties::default()).await;
    let (client, _) =
        Raw::connect_with(broker.addr, connect_with_will(&client_id, "will/dropped", b"yes", None)).await;
    client.drop_connection();
    // The abnormal close's will arrives, and the normal DISCONNECT's never did (it would have
    // come first: same client, same home shard).
    let will = watcher.recv_publish().await;
    assert_eq!((will.topic.as_str(), &will.payload[..]), ("will/dropped", &b"yes"[..]));
}

// ----- 9. CONNACK -----------------------------------------------------------------------------

/// CONNACK announces the broker's limits and features; a keep-alive above the maximum is
/// replaced by Server Keep Alive, which the broker then enforces (0x8D).
async fn connack_properties_and_server_keep_alive(cores: usize) {
    let broker = start(cores, |cfg| {
        cfg.keepalive_secs_max = 1;
        cfg.receive_maximum = 10;
        cfg.packet_size_bytes_max = 4096;
        cfg.topic_alias_max = 7;
    });
    let (id, other_id) = ids(&broker, "connack");
    let mut connect = connect_packet(&id);
    connect.keep_alive = 60;
    let (mut raw, connack) = Raw::connect_with(broker.addr, connect).await;
    let props = &connack.properties;
    assert_eq!(connack.reason, ReasonCode::Success);
    assert!(!connack.session_present);
    assert_eq!(props.server_keep_alive, Some(1));
    assert_eq!(props.receive_maximum, Some(10));
    assert_eq!(props.maximum_packet_size, Some(4096));
    assert_eq!(props.topic_alias_maximum, Some(7));
    assert_eq!(props.maximum_qos, None, "QoS 2 is supported");
    // Absent means available; 0 would mean not available.
    assert_ne!(props.retain_available, Some(0));
    assert_ne!(props.wildcard_subscription_available, Some(0));
    assert_ne!(props.subscription_identifier_available, Some(0));
    assert_ne!(props.shared_subscription_available, Some(0));
    assert_eq!(props.assigned_client_identifier, None, "the client chose its id");
    assert_eq!(props.response_information, None, "not requested");

    // A keep-alive within the maximum is accepted as is.
    let mut connect = connect_packet(&other_id);
    connect.keep_alive = 1;
    let (_other, connack) = Raw::connect_with(broker.addr, connect).await;
    assert_eq!(connack.properties.server_keep_alive, None);

    // Time is the subject: silent for 1.5 x 1 s, the first client is disconnected.
    let started = Instant::now();
    assert_eq!(raw.expect_disconnect().await, ReasonCode::KeepAliveTimeout);
    assert!(started.elapsed() >= Duration::from_millis(1200), "closed after {:?}", started.elapsed());
}

/// An empty client id gets an assigned identifier, which then names the session: a reconnect with
/// it resumes the session (whatever shard the broker put it on).
async fn assigned_client_identifier(cores: usize) {
    let broker = start(cores, |_| {});
    let (_, pub_id) = ids(&broker, "assigned");
    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    for round in 0..4u16 {
        let mut connect = connect_packet("");
        connect.properties = session_expiry(60);
        let (mut sub, connack) = Raw::connect_with(broker.addr, connect).await;
        assert_eq!(connack.reason, ReasonCode::Success);
        let assigned = connack.properties.assigned_client_identifier.expect("an id is assigned");
        assert!(!assigned.is_empty());
        let topic = format!("aci/{round}");
        sub.subscribe_ok(1, &topic, QoS::AtLeastOnce, None).await;
        sub.disconnect(ReasonCode::NormalDisconnection, Properties::default()).await;
        assert_eq!(publisher.publish_qos1(qos1(&topic, b"queued"), round + 1).await, ReasonCode::Success);

        let (mut sub, connack) = Raw::connect_with(broker.addr, resume(assigned.as_str(), 60)).await;
        assert!(connack.session_present, "round {round}: the assigned id {assigned:?} names the session");
        let got = sub.recv_publish().await;
        assert_eq!((got.topic.as_str(), &got.payload[..]), (topic.as_str(), &b"queued"[..]));
        puback(&mut sub, got.packet_id.expect("QoS 1")).await;
        sub.disconnect(ReasonCode::NormalDisconnection, session_expiry(0)).await;
    }
}

/// Response information is returned when requested, and only then.
async fn response_information(cores: usize) {
    let broker = start(cores, |_| {});
    let (id, other_id) = ids(&broker, "respinfo");
    let props = Properties { request_response_information: Some(1), ..Properties::default() };
    let mut connect = connect_packet(&id);
    connect.properties = props;
    let (_raw, connack) = Raw::connect_with(broker.addr, connect).await;
    let info = connack.properties.response_information.expect("response information requested");
    assert!(!info.is_empty());
    let mut connect = connect_packet(&other_id);
    connect.properties.request_response_information = Some(0);
    let (_raw, connack) = Raw::connect_with(broker.addr, connect).await;
    assert_eq!(connack.properties.response_information, None);
}

// ----- 10. reason codes --------------------------------------------------------------------------

/// SUBACK 0x8F/0x87, UNSUBACK 0x11, PUBACK/PUBREC 0x87, PUBCOMP 0x92.
async fn reason_codes(cores: usize) {
    let broker = start(cores, |cfg| cfg.denied_topic_filters = vec!["deny/#".to_string()]);
    let (sub_id, pub_id) = ids(&broker, "reasons");
    let mut sub = Raw::connect(broker.addr, &sub_id, Properties::default()).await;
    sub.subscribe_ok(9, "#", QoS::AtLeastOnce, None).await;
    let mut raw = Raw::connect(broker.addr, &pub_id, Properties::default()).await;

    let subscribe = Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        subscriptions: ["ok/+", "bad/#/x", "deny/x", "ok/#"]
            .iter()
            .map(|filter| Subscription { filter: utf8(filter), options: options(QoS::AtLeastOnce) })
            .collect(),
    };
    raw.send(&Packet::Subscribe(subscribe)).await;
    match raw.recv().await {
        Packet::SubAck(suback) => assert_eq!(
            suback.reasons,
            vec![
                ReasonCode::GrantedQoS1,
                ReasonCode::TopicFilterInvalid,
                ReasonCode::NotAuthorized,
                ReasonCode::GrantedQoS1
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let unsubscribe = Unsubscribe {
        packet_id: 2,
        properties: Properties::default(),
        filters: vec![utf8("ok/+"), utf8("never/t")],
    };
    raw.send(&Packet::Unsubscribe(unsubscribe)).await;
    match raw.recv().await {
        Packet::UnsubAck(unsuback) => {
            assert_eq!(unsuback.packet_id, 2);
            assert_eq!(unsuback.reasons, vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted]);
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }

    assert_eq!(raw.publish_qos1(qos1("deny/x", b"no"), 3).await, ReasonCode::NotAuthorized);
    raw.send(&Packet::Publish(publish_packet("deny/y", QoS::ExactlyOnce, Some(4), b"no"))).await;
    match raw.recv().await {
        Packet::PubRec(rec) => assert_eq!((rec.packet_id, rec.reason), (4, ReasonCode::NotAuthorized)),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    raw.send(&Packet::PubRel(PubResp::new(77))).await;
    match raw.recv().await {
        Packet::PubComp(comp) => {
            assert_eq!((comp.packet_id, comp.reason), (77, ReasonCode::PacketIdentifierNotFound))
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    // The denied messages reached no one: the next message the "#" subscriber sees is this one.
    // `raw` matches it too, and its copy may arrive before the PUBACK (which waits for every shard
    // the message went to): the spec does not order the two.
    raw.send(&Packet::Publish(publish_packet("ok/after", QoS::AtLeastOnce, Some(5), b"yes"))).await;
    loop {
        match raw.recv().await {
            Packet::PubAck(ack) => {
                assert_eq!((ack.packet_id, ack.reason), (5, ReasonCode::Success));
                break;
            }
            Packet::Publish(own) => assert_eq!(own.topic.as_str(), "ok/after"),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    let got = sub.recv_publish().await;
    assert_eq!(got.topic.as_str(), "ok/after");
}

/// Stopping the broker sends DISCONNECT 0x8B to every v5 client, on every shard.
async fn shutdown_sends_server_shutting_down(cores: usize) {
    let broker = start(cores, |_| {});
    let mut clients = Vec::new();
    for shard in 0..cores {
        let id = broker.id_on_shard("shutdown", shard);
        clients.push(Raw::connect(broker.addr, &id, Properties::default()).await);
    }
    // `Broker::stop` blocks until the shards end: run it off the async threads.
    let stopping = tokio::task::spawn_blocking(move || drop(broker));
    for client in &mut clients {
        assert_eq!(client.expect_disconnect().await, ReasonCode::ServerShuttingDown);
    }
    tokio::time::timeout(WAIT, stopping).await.expect("broker stopped in time").expect("stop did not panic");
}

// ----- 11. shared no-local, enhanced authentication ------------------------------------------------

/// No-local on a shared subscription is a Protocol Error (MQTT-3.8.3-4); enhanced authentication
/// is not supported: an authentication method on CONNECT gets CONNACK 0x8C, and an AUTH packet on
/// a connection without one is a Protocol Error.
async fn shared_no_local_and_enhanced_auth(cores: usize) {
    let broker = start(cores, |_| {});
    let (id, other_id) = ids(&broker, "auth");

    // SUBSCRIBE packet id 1, no properties, "$share/g/t" with QoS 1 + no-local (hand-built: the
    // encoder refuses it).
    let mut raw = Raw::connect(broker.addr, &id, Properties::default()).await;
    let mut bytes = vec![0x82, 16, 0x00, 0x01, 0x00, 0x00, 10];
    bytes.extend_from_slice(b"$share/g/t");
    bytes.push(0x01 | 0x04);
    raw.send_bytes(&bytes).await;
    assert_eq!(raw.expect_disconnect().await, ReasonCode::ProtocolError);

    let mut connect = connect_packet(&other_id);
    connect.properties.authentication_method = Some(utf8("SCRAM-SHA-256"));
    connect.properties.authentication_data = Some(Bytes::from_static(b"client-first"));
    let (mut raw, connack) = Raw::connect_with(broker.addr, connect).await;
    assert_eq!(connack.reason, ReasonCode::BadAuthenticationMethod);
    assert!(!connack.session_present);
    match raw.try_recv(WAIT).await {
        Err(RecvError::Closed) => {}
        other => panic!("expected the broker to close after CONNACK 0x8C, got {other:?}"),
    }

    let mut raw = Raw::connect(broker.addr, &other_id, Properties::default()).await;
    let auth = Auth {
        reason: ReasonCode::ContinueAuthentication,
        properties: Properties {
            authentication_method: Some(utf8("SCRAM-SHA-256")),
            ..Properties::default()
        },
    };
    raw.send(&Packet::Auth(auth)).await;
    assert_eq!(raw.expect_disconnect().await, ReasonCode::ProtocolError);
}

// ----- extras --------------------------------------------------------------------------------

/// A retained message expires like any other (MQTT-3.3.2-5); one still alive is sent to a new
/// subscriber with its remaining expiry and the subscription's identifier.
async fn retained_expiry_and_subscription_id(cores: usize) {
    let broker = start(cores, |_| {});
    let (sub_id, pub_id) = ids(&broker, "retexp");
    let mut publisher = Raw::connect(broker.addr, &pub_id, Properties::default()).await;
    let mut short = qos1("rx/short", b"short");
    short.retain = true;
    short.properties.message_expiry_interval = Some(1);
    assert_eq!(publisher.publish_qos1(short, 1).await, ReasonCode::Success);
    let mut long = qos1("rx/long", b"long");
    long.retain = true;
    long.properties.message_expiry_interval = Some(60);
    assert_eq!(publisher.publish_qos1(long, 2).await, ReasonCode::Success);
    // Confirm both are stored (the publisher's own subscribe follows its publishes on the ring).
    publisher.subscribe_ok(3, "rx/+", QoS::AtLeastOnce, None).await;
    for _ in 0..2 {
        let got = publisher.recv_publish().await;
        assert!(got.retain);
        puback(&mut publisher, got.packet_id.expect("QoS 1")).await;
    }

    // Time is the subject: let the 1 s expiry pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sub = Raw::connect(broker.addr, &sub_id, Properties::default()).await;
    sub.subscribe_ok(1, "rx/+", QoS::AtLeastOnce, Some(42)).await;
    let got = sub.recv_publish().await;
    assert_eq!((got.topic.as_str(), got.retain), ("rx/long", true));
    assert_eq!(got.properties.subscription_identifiers, vec![42]);
    let remaining = got.properties.message_expiry_interval.expect("remaining expiry");
    assert!((57..=59).contains(&remaining), "remaining {remaining}");
    puback(&mut sub, got.packet_id.expect("QoS 1")).await;
    sub.expect_quiet().await;
}

/// A session expiry above the broker's maximum is capped and the cap announced in CONNACK; a
/// will whose delay outlasts the session is published when the session ends (MQTT-3.1.3-9).
async fn session_expiry_capped_and_will_at_session_end(cores: usize) {
    let broker = start(cores, |cfg| cfg.session_expiry_secs_max = 1);
    let (watcher_id, client_id) = ids(&broker, "cap");
    let mut watcher = Raw::connect(broker.addr, &watcher_id, Properties::default()).await;
    watcher.subscribe_ok(1, "will/cap", QoS::AtLeastOnce, None).await;
    let mut connect = connect_with_will(&client_id, "will/cap", b"ended", Some(60));
    connect.properties = session_expiry(3600);
    let (client, connack) = Raw::connect_with(broker.addr, connect).await;
    assert_eq!(connack.properties.session_expiry_interval, Some(1), "the cap is announced");
    client.drop_connection();
    let dropped_at = Instant::now();
    // Time is the subject: the session ends after 1 s, long before the 60 s will delay.
    let will = watcher.recv_publish().await;
    let after = dropped_at.elapsed();
    assert!(after >= Duration::from_millis(800), "will after {after:?}, before the session ended");
    assert_eq!((will.topic.as_str(), &will.payload[..]), ("will/cap", &b"ended"[..]));
    let (_, connack) = Raw::connect_with(broker.addr, resume(&client_id, 0)).await;
    assert!(!connack.session_present, "the capped session expired");
}

/// Property values MQTT 5 forbids: receive maximum 0 on CONNECT (CONNACK 0x82), subscription
/// identifier 0 on SUBSCRIBE (DISCONNECT 0x82).
async fn invalid_v5_properties(cores: usize) {
    let broker = start(cores, |_| {});
    let (_, other_id) = ids(&broker, "badprops");
    // CONNECT v5, clean start, keep-alive 0, properties {receive maximum 0}, client id "x"
    // (hand-built: the encoder refuses it).
    let mut raw = Raw::open(broker.addr).await;
    raw.send_bytes(&[0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 0, 3, 0x21, 0, 0, 0, 1, b'x']).await;
    match raw.recv().await {
        Packet::ConnAck(connack) => assert_eq!(connack.reason, ReasonCode::ProtocolError),
        other => panic!("expected CONNACK, got {other:?}"),
    }

    // SUBSCRIBE packet id 1, properties {subscription identifier 0}, "t" QoS 0.
    let mut raw = Raw::connect(broker.addr, &other_id, Properties::default()).await;
    raw.send_bytes(&[0x82, 9, 0, 1, 2, 0x0B, 0, 0, 1, b't', 0]).await;
    assert_eq!(raw.expect_disconnect().await, ReasonCode::ProtocolError);
}
