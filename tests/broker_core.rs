//! End-to-end tests of the core broker features over loopback, with rumqttc (MQTT 3.1.1 and 5.0)
//! and a raw codec client, each against brokers with 2 and 4 shards.

mod common;

use common::*;
use shardmq_protocol::{Packet, ProtocolVersion};

/// QoS 0/1/2 between clients homed on different shards, on both protocol versions.
#[tokio::test]
async fn pubsub_qos_across_shards() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                for (sub_shard, pub_shard) in [(0, 1), (1, 0), (cores - 1, 0)] {
                    let tag = format!("{version:?}-{cores}-{sub_shard}-{pub_shard}");
                    let mut sub = Client::connect(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("sub-{tag}"), sub_shard),
                    )
                    .await;
                    let mut publisher = Client::connect(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("pub-{tag}"), pub_shard),
                    )
                    .await;
                    let topic = format!("t/{tag}");
                    for qos in 0..=2u8 {
                        assert_eq!(sub.subscribe(&format!("{topic}/{qos}"), qos).await, qos);
                    }
                    for qos in 0..=2u8 {
                        publisher.publish(&format!("{topic}/{qos}"), qos, false, format!("m{qos}")).await;
                        let msg =
                            sub.expect_msg(&format!("{topic}/{qos}"), format!("m{qos}").as_bytes()).await;
                        assert_eq!(msg.qos, qos);
                        assert!(!msg.retain);
                    }
                    sub.expect_no_publish_within(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
}

fn persistent() -> Opts {
    Opts { clean: false, session_expiry_secs: Some(300), ..Default::default() }
}

/// `+` and `#` match across shards; `$` topics are not matched by `#` or `+/...`.
#[tokio::test]
async fn wildcards_and_dollar_topics() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                let tag = format!("{version:?}{cores}");
                let mut plus =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("plus-{tag}"), 0))
                        .await;
                let mut hash =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("hash-{tag}"), 1))
                        .await;
                let mut all = Client::connect(
                    broker.addr,
                    version,
                    &broker.id_on_shard(&format!("all-{tag}"), cores - 1),
                )
                .await;
                let mut dollar =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("dol-{tag}"), 1))
                        .await;
                let mut publisher =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("pub-{tag}"), 0))
                        .await;
                assert_eq!(plus.subscribe(&format!("w{tag}/+/x"), 1).await, 1);
                assert_eq!(hash.subscribe(&format!("w{tag}/#"), 1).await, 1);
                assert_eq!(all.subscribe_many(&[("#", 1), ("+/x", 1)]).await, vec![1, 1]);
                assert_eq!(dollar.subscribe(&format!("$d{tag}/#"), 1).await, 1);

                publisher.publish(&format!("w{tag}/a/x"), 1, false, "ax").await;
                plus.expect_msg(&format!("w{tag}/a/x"), b"ax").await;
                hash.expect_msg(&format!("w{tag}/a/x"), b"ax").await;
                all.expect_msg(&format!("w{tag}/a/x"), b"ax").await;

                publisher.publish(&format!("w{tag}/a/y"), 1, false, "ay").await;
                hash.expect_msg(&format!("w{tag}/a/y"), b"ay").await;
                all.expect_msg(&format!("w{tag}/a/y"), b"ay").await;

                // `#` also matches the parent level.
                publisher.publish(&format!("w{tag}"), 1, false, "parent").await;
                hash.expect_msg(&format!("w{tag}"), b"parent").await;
                all.expect_msg(&format!("w{tag}"), b"parent").await;

                // MQTT-4.7.2-1: `#` and `+/x` do not match a topic starting with `$`.
                publisher.publish(&format!("$d{tag}/x"), 1, false, "dollar").await;
                dollar.expect_msg(&format!("$d{tag}/x"), b"dollar").await;
                // A marker published after the `$` topic: once it arrives, the `$` message would have too.
                publisher.publish("marker/x", 1, false, "marker").await;
                all.expect_msg("marker/x", b"marker").await;
                all.expect_no_publish().await;
                plus.expect_no_publish_within(std::time::Duration::from_millis(50)).await;
                hash.expect_no_publish_within(std::time::Duration::from_millis(50)).await;
            }
        }
    })
    .await;
}

/// Overlapping subscriptions of one session: one copy, at the highest granted QoS.
#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_max_qos() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                let tag = format!("{version:?}{cores}");
                let mut sub =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("ov-{tag}"), 1)).await;
                let mut publisher =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("ovp-{tag}"), 0))
                        .await;
                let base = format!("ov{tag}");
                let codes = sub
                    .subscribe_many(&[
                        (&format!("{base}/+"), 0),
                        (&format!("{base}/#"), 2),
                        (&format!("{base}/a"), 1),
                    ])
                    .await;
                assert_eq!(codes, vec![0, 2, 1]);
                publisher.publish(&format!("{base}/a"), 2, false, "once").await;
                let msg = sub.expect_msg(&format!("{base}/a"), b"once").await;
                assert_eq!(msg.qos, 2, "delivered at the maximum QoS of the matching subscriptions");
                sub.expect_no_publish().await;
            }
        }
    })
    .await;
}

/// A QoS 2 publish to a QoS 1 (and QoS 0) subscription is delivered at the subscription's QoS.
#[tokio::test]
async fn qos_downgrade() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                let tag = format!("{version:?}{cores}");
                let mut sub =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("dg-{tag}"), 0)).await;
                let mut publisher =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("dgp-{tag}"), 1))
                        .await;
                assert_eq!(sub.subscribe(&format!("dg{tag}/1"), 1).await, 1);
                assert_eq!(sub.subscribe(&format!("dg{tag}/0"), 0).await, 0);
                publisher.publish(&format!("dg{tag}/1"), 2, false, "q2").await;
                assert_eq!(sub.expect_msg(&format!("dg{tag}/1"), b"q2").await.qos, 1);
                publisher.publish(&format!("dg{tag}/0"), 2, false, "q2").await;
                assert_eq!(sub.expect_msg(&format!("dg{tag}/0"), b"q2").await.qos, 0);
                publisher.publish(&format!("dg{tag}/0"), 1, false, "q1").await;
                assert_eq!(sub.expect_msg(&format!("dg{tag}/0"), b"q1").await.qos, 0);
            }
        }
    })
    .await;
}

fn raw_version(version: Version) -> ProtocolVersion {
    match version {
        Version::V4 => ProtocolVersion::V3_1_1,
        Version::V5 => ProtocolVersion::V5,
    }
}

/// A persistent raw CONNECT (clean session 0; v5: clean start 0 with a session expiry).
fn persistent_connect(version: ProtocolVersion, id: &str, keep_alive: u16) -> shardmq_protocol::Connect {
    let mut connect = connect_packet(version, id, false, keep_alive);
    if version.is_v5() {
        connect.properties.session_expiry_interval = Some(300);
    }
    connect
}

/// QoS 2 exactly once when the publisher reconnects between PUBREC and PUBREL and re-sends the
/// PUBLISH with DUP: the subscriber gets one copy.
#[tokio::test]
async fn qos2_exactly_once_across_publisher_reconnect() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                let rv = raw_version(version);
                for shard in 0..cores {
                    let tag = format!("{version:?}{cores}-{shard}");
                    let topic = format!("eo/{tag}");
                    let mut sub = Client::connect(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("eos-{tag}"), shard + 1),
                    )
                    .await;
                    assert_eq!(sub.subscribe(&topic, 2).await, 2);
                    let id = broker.id_on_shard(&format!("eop-{tag}"), shard);
                    let (mut raw, ack) =
                        Raw::connect_with(broker.addr, persistent_connect(rv, &id, 60)).await;
                    assert_eq!(ack.reason.as_u8(), 0);
                    let mut publish = publish_packet(&topic, 2, Some(7), b"exactly-once");
                    raw.send(&Packet::Publish(publish.clone())).await;
                    match raw.expect().await {
                        Packet::PubRec(rec) => assert_eq!(rec.packet_id, 7),
                        other => panic!("expected PUBREC, got {other:?}"),
                    }
                    drop(raw); // abrupt: no DISCONNECT, no PUBREL
                    let (mut raw, ack) =
                        Raw::connect_with(broker.addr, persistent_connect(rv, &id, 60)).await;
                    assert_eq!(ack.reason.as_u8(), 0);
                    assert!(ack.session_present, "{tag}: the publisher's session survives the drop");
                    publish.dup = true;
                    raw.send(&Packet::Publish(publish)).await;
                    match raw.expect().await {
                        Packet::PubRec(rec) => assert_eq!(rec.packet_id, 7),
                        other => panic!("expected PUBREC, got {other:?}"),
                    }
                    raw.send(&Packet::PubRel(shardmq_protocol::PubResp::new(7))).await;
                    match raw.expect().await {
                        Packet::PubComp(comp) => {
                            assert_eq!(comp.packet_id, 7);
                            assert_eq!(comp.reason.as_u8(), 0);
                        }
                        other => panic!("expected PUBCOMP, got {other:?}"),
                    }
                    let msg = sub.expect_msg(&topic, b"exactly-once").await;
                    assert_eq!(msg.qos, 2);
                    sub.expect_no_publish().await;
                }
            }
        }
    })
    .await;
}

/// A persistent QoS 1/2 subscriber that drops the connection without acknowledging gets the
/// messages again with DUP=1 after reconnecting (session present); a PUBREC'd QoS 2 message
/// continues with PUBREL.
#[tokio::test]
async fn unacked_outgoing_messages_are_resent_with_dup() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                let rv = raw_version(version);
                let tag = format!("{version:?}{cores}");
                let topic = format!("rd/{tag}");
                let id = broker.id_on_shard(&format!("rds-{tag}"), 1);
                let (mut raw, ack) = Raw::connect_with(broker.addr, persistent_connect(rv, &id, 60)).await;
                assert_eq!(ack.reason.as_u8(), 0);
                assert_eq!(raw.subscribe(1, &format!("{topic}/#"), 2).await, vec![2]);
                let mut publisher =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("rdp-{tag}"), 0))
                        .await;
                publisher.publish(&format!("{topic}/q1"), 1, false, "one").await;
                publisher.publish(&format!("{topic}/q2"), 2, false, "two").await;
                publisher.publish(&format!("{topic}/q2b"), 2, false, "three").await;
                let mut first = Vec::new();
                for _ in 0..3 {
                    match raw.expect().await {
                        Packet::Publish(p) => {
                            assert!(!p.dup, "first delivery has DUP=0");
                            first.push(p);
                        }
                        other => panic!("expected PUBLISH, got {other:?}"),
                    }
                }
                // Acknowledge the third message's first half only: PUBREC, then wait for PUBREL.
                let third = first[2].packet_id.expect("qos 2 has an id");
                raw.send(&Packet::PubRec(shardmq_protocol::PubResp::new(third))).await;
                match raw.expect().await {
                    Packet::PubRel(rel) => assert_eq!(rel.packet_id, third),
                    other => panic!("expected PUBREL, got {other:?}"),
                }
                drop(raw);
                broker.wait_connections(1).await;
                let (mut raw, ack) = Raw::connect_with(broker.addr, persistent_connect(rv, &id, 60)).await;
                assert_eq!(ack.reason.as_u8(), 0);
                assert!(ack.session_present);
                let mut again = Vec::new();
                let mut pubrel = None;
                for _ in 0..3 {
                    match raw.expect().await {
                        Packet::Publish(p) => again.push(p),
                        Packet::PubRel(rel) => pubrel = Some(rel.packet_id),
                        other => panic!("expected PUBLISH or PUBREL, got {other:?}"),
                    }
                }
                assert_eq!(pubrel, Some(third), "a PUBREC'd message continues with PUBREL, not PUBLISH");
                assert_eq!(again.len(), 2);
                for (resent, original) in again.iter().zip(&first) {
                    assert!(resent.dup, "a re-sent PUBLISH has DUP=1");
                    assert_eq!(resent.packet_id, original.packet_id);
                    assert_eq!(resent.payload, original.payload);
                    assert_eq!(resent.qos, original.qos);
                }
                raw.send(&Packet::PubAck(shardmq_protocol::PubResp::new(again[0].packet_id.unwrap()))).await;
                raw.send(&Packet::PubRec(shardmq_protocol::PubResp::new(again[1].packet_id.unwrap()))).await;
                match raw.expect().await {
                    Packet::PubRel(rel) => assert_eq!(rel.packet_id, again[1].packet_id.unwrap()),
                    other => panic!("expected PUBREL, got {other:?}"),
                }
                raw.send(&Packet::PubComp(shardmq_protocol::PubResp::new(again[1].packet_id.unwrap()))).await;
                raw.send(&Packet::PubComp(shardmq_protocol::PubResp::new(third))).await;
                // Everything acknowledged: nothing more is owed.
                raw.send(&Packet::PingReq).await;
                match raw.expect().await {
                    Packet::PingResp => {}
                    other => panic!("expected PINGRESP only, got {other:?}"),
                }
                raw.send(&Packet::Disconnect(shardmq_protocol::Disconnect::new(
                    shardmq_protocol::ReasonCode::Success,
                )))
                .await;
                raw.expect_closed().await;
                drop(publisher);
                broker.wait_connections(0).await;
            }
        }
    })
    .await;
}

/// Clean session 0 keeps subscriptions and queues QoS 1/2 (not QoS 0) while offline; clean
/// session 1 drops the old session.
#[tokio::test]
async fn persistent_sessions() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                for shard in 0..cores {
                    let tag = format!("{version:?}{cores}-{shard}");
                    let topic = format!("ps/{tag}");
                    let id = broker.id_on_shard(&format!("ps-{tag}"), shard);
                    let mut sub = Client::connect_opts(broker.addr, version, &id, persistent()).await;
                    assert!(!sub.session_present);
                    assert_eq!(sub.subscribe(&topic, 2).await, 2);
                    let before = broker.stat(|s| &s.connections);
                    sub.disconnect().await;
                    broker.wait_connections(before - 1).await;

                    let mut publisher = Client::connect(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("psp-{tag}"), shard + 1),
                    )
                    .await;
                    publisher.publish(&topic, 0, false, "q0").await;
                    publisher.publish(&topic, 1, false, "q1").await;
                    publisher.publish(&topic, 2, false, "q2").await;

                    let mut sub = Client::connect_opts(broker.addr, version, &id, persistent()).await;
                    assert!(sub.session_present, "{tag}: session present after reconnect");
                    assert_eq!(sub.expect_msg(&topic, b"q1").await.qos, 1);
                    assert_eq!(sub.expect_msg(&topic, b"q2").await.qos, 2);
                    sub.expect_no_publish().await; // QoS 0 was not queued
                                                   // The subscription is still there for live messages.
                    publisher.publish(&topic, 1, false, "live").await;
                    sub.expect_msg(&topic, b"live").await;
                    sub.disconnect().await;

                    // Clean session 1: the old session is dropped, subscriptions with it.
                    let mut clean = Client::connect(broker.addr, version, &id).await;
                    assert!(!clean.session_present);
                    publisher.publish(&topic, 1, false, "gone").await;
                    clean.expect_no_publish().await;
                    clean.disconnect().await;
                    // And a later persistent connect starts fresh too.
                    let sub = Client::connect_opts(broker.addr, version, &id, persistent()).await;
                    assert!(!sub.session_present, "{tag}: clean session ended the old session");
                    sub.disconnect().await;
                    publisher.disconnect().await;
                }
            }
        }
    })
    .await;
}

/// The same client id connects twice: the first connection is closed (v5: DISCONNECT 0x8E) and
/// the session continues for the second.
#[tokio::test]
async fn takeover_closes_old_connection_and_keeps_session() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                for shard in 0..cores {
                    let tag = format!("{version:?}{cores}-{shard}");
                    let topic = format!("tk/{tag}");
                    let id = broker.id_on_shard(&format!("tk-{tag}"), shard);
                    // The first connection is raw so its DISCONNECT can be checked (see common/mod.rs).
                    let rv = raw_version(version);
                    let (mut first, ack) =
                        Raw::connect_with(broker.addr, persistent_connect(rv, &id, 60)).await;
                    assert_eq!(ack.reason.as_u8(), 0);
                    assert_eq!(first.subscribe(1, &topic, 1).await, vec![1]);
                    let mut second = Client::connect_opts(broker.addr, version, &id, persistent()).await;
                    assert!(second.session_present, "{tag}: takeover resumes the session");
                    let seen = first.expect_closed().await;
                    if version == Version::V5 {
                        assert!(
                            matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason.as_u8() == 0x8E),
                            "{tag}: v5 DISCONNECT session taken over, got {seen:?}"
                        );
                    } else {
                        assert!(seen.is_empty(), "{tag}: 3.1.1 connection just closes, got {seen:?}");
                    }
                    let mut publisher = Client::connect(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("tkp-{tag}"), shard + 1),
                    )
                    .await;
                    publisher.publish(&topic, 1, false, "after").await;
                    second.expect_msg(&topic, b"after").await;
                    second.disconnect().await;
                    publisher.disconnect().await;
                }
            }
            // The connection gauge counts the taken-over connections as gone.
            broker.wait_connections(0).await;
        }
    })
    .await;
}

/// Retained messages: set, replace, delete by empty payload; delivered on subscribe with retain=1,
/// for wildcard subscriptions across shards; live delivery carries retain=0.
#[tokio::test]
async fn retained_messages() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                let tag = format!("{version:?}{cores}");
                let mut publisher =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("rp-{tag}"), 0)).await;
                let topic = format!("rt{tag}/one");
                publisher.publish(&topic, 1, true, "first").await;
                publisher.publish(&topic, 1, true, "second").await;
                let mut sub =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("rs-{tag}"), 1)).await;
                assert_eq!(sub.subscribe(&topic, 1).await, 1);
                let msg = sub.expect_msg(&topic, b"second").await;
                assert!(msg.retain, "retained message on subscribe has retain=1");
                sub.expect_no_publish_within(std::time::Duration::from_millis(100)).await;
                // Live delivery: retain=0.
                publisher.publish(&topic, 1, true, "third").await;
                let msg = sub.expect_msg(&topic, b"third").await;
                assert!(!msg.retain, "live delivery has retain=0");
                // Delete with an empty payload.
                publisher.publish(&topic, 1, true, "").await;
                let msg = sub.expect_msg(&topic, b"").await;
                assert!(!msg.retain);
                let mut late = Client::connect(
                    broker.addr,
                    version,
                    &broker.id_on_shard(&format!("rl-{tag}"), cores - 1),
                )
                .await;
                assert_eq!(late.subscribe(&topic, 1).await, 1);
                late.expect_no_publish().await;

                // Retained topics on every shard, found by one wildcard subscription.
                let topics: Vec<String> = (0..cores)
                    .map(|shard| broker.topic_on_retain_shard(&format!("rw{tag}/x/"), shard))
                    .collect();
                for t in &topics {
                    publisher.publish(t, 1, true, t.clone()).await;
                }
                for shard in 0..cores {
                    let mut wild = Client::connect(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("rwild-{tag}"), shard),
                    )
                    .await;
                    assert_eq!(wild.subscribe(&format!("rw{tag}/+/#"), 1).await, 1);
                    let mut got = Vec::new();
                    for _ in 0..topics.len() {
                        let msg = wild.expect_publish().await;
                        assert!(msg.retain);
                        assert_eq!(msg.payload, msg.topic.as_bytes());
                        got.push(msg.topic);
                    }
                    got.sort();
                    let mut want = topics.clone();
                    want.sort();
                    assert_eq!(got, want);
                    wild.expect_no_publish_within(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
}

/// Wills: published on abnormal close, not on DISCONNECT; the will's retain flag is honoured.
#[tokio::test]
async fn wills() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                for shard in 0..cores {
                    let tag = format!("{version:?}{cores}-{shard}");
                    let topic = format!("will/{tag}");
                    let mut watcher = Client::connect(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("ww-{tag}"), shard + 1),
                    )
                    .await;
                    assert_eq!(watcher.subscribe(&format!("{topic}/#"), 1).await, 1);
                    let with_will = |name: &str, retain: bool| Opts {
                        will: Some((
                            format!("{topic}/{name}"),
                            bytes::Bytes::from(format!("bye-{name}")),
                            1,
                            retain,
                        )),
                        ..Default::default()
                    };
                    // Abnormal close: the will is sent.
                    let dying = Client::connect_opts(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("wd-{tag}"), shard),
                        with_will("drop", false),
                    )
                    .await;
                    dying.drop_connection();
                    let msg = watcher.expect_msg(&format!("{topic}/drop"), b"bye-drop").await;
                    assert_eq!(msg.qos, 1);
                    assert!(!msg.retain);
                    // DISCONNECT: no will.
                    let polite = Client::connect_opts(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("wp-{tag}"), shard),
                        with_will("polite", false),
                    )
                    .await;
                    polite.disconnect().await;
                    // Retained will: a later subscriber gets it with retain=1.
                    let dying = Client::connect_opts(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("wr-{tag}"), shard),
                        with_will("kept", true),
                    )
                    .await;
                    dying.drop_connection();
                    watcher.expect_msg(&format!("{topic}/kept"), b"bye-kept").await;
                    watcher.expect_no_publish().await; // in particular, no "polite" will
                    let mut late = Client::connect(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("wl-{tag}"), shard),
                    )
                    .await;
                    assert_eq!(late.subscribe(&format!("{topic}/kept"), 1).await, 1);
                    let msg = late.expect_msg(&format!("{topic}/kept"), b"bye-kept").await;
                    assert!(msg.retain, "the will was published retained");
                }
            }
        }
    })
    .await;
}

/// Keep-alive: a client that sends nothing for 1.5 x its keep-alive is disconnected (and its will
/// sent); PINGREQ is answered with PINGRESP.
#[tokio::test]
async fn keep_alive() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                let rv = raw_version(version);
                let tag = format!("{version:?}{cores}");
                let mut watcher = Client::connect(broker.addr, version, &format!("kaw-{tag}")).await;
                assert_eq!(watcher.subscribe(&format!("ka/{tag}"), 1).await, 1);
                // PINGREQ -> PINGRESP.
                let (mut raw, ack) =
                    Raw::connect_with(broker.addr, connect_packet(rv, &format!("kap-{tag}"), true, 1)).await;
                assert_eq!(ack.reason.as_u8(), 0);
                raw.send(&Packet::PingReq).await;
                assert_eq!(raw.expect().await, Packet::PingResp);
                drop(raw);

                let mut connect = connect_packet(rv, &format!("kas-{tag}"), true, 1);
                connect.will = Some(shardmq_protocol::Will {
                    topic: shardmq_protocol::Utf8::new(&format!("ka/{tag}")).unwrap(),
                    payload: bytes::Bytes::from_static(b"timed out"),
                    qos: shardmq_protocol::QoS::AtLeastOnce,
                    retain: false,
                    properties: Default::default(),
                });
                let (mut raw, ack) = Raw::connect_with(broker.addr, connect).await;
                assert_eq!(ack.reason.as_u8(), 0);
                let started = std::time::Instant::now();
                let seen = raw.expect_closed_within(std::time::Duration::from_secs(4)).await;
                let elapsed = started.elapsed();
                assert!(
                    elapsed >= std::time::Duration::from_millis(1200),
                    "{tag}: closed too early ({elapsed:?})"
                );
                if version == Version::V5 {
                    assert!(
                        matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason.as_u8() == 0x8D),
                        "{tag}: v5 DISCONNECT keep alive timeout first, got {seen:?}"
                    );
                }
                watcher.expect_msg(&format!("ka/{tag}"), b"timed out").await;
            }
        }
    })
    .await;
}

/// A socket that never sends CONNECT is closed after the connect timeout.
#[tokio::test]
async fn connect_timeout() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start_with(|cfg| {
                cfg.cores = cores;
                cfg.connect_timeout = std::time::Duration::from_millis(500);
            });
            let mut raw = Raw::open(broker.addr, ProtocolVersion::V3_1_1).await;
            let started = std::time::Instant::now();
            let seen = raw.expect_closed_within(std::time::Duration::from_secs(3)).await;
            assert!(seen.is_empty(), "nothing is sent to a socket that never connected: {seen:?}");
            assert!(started.elapsed() >= std::time::Duration::from_millis(400));
            // A slow but complete CONNECT within the timeout is fine.
            let mut raw = Raw::open(broker.addr, ProtocolVersion::V3_1_1).await;
            let mut bytes = bytes::BytesMut::new();
            shardmq_protocol::encode(
                &Packet::Connect(Box::new(connect_packet(ProtocolVersion::V3_1_1, "slow", true, 60))),
                ProtocolVersion::V3_1_1,
                &mut bytes,
            )
            .unwrap();
            raw.send_bytes(&bytes[..3]).await;
            raw.send_bytes(&bytes[3..]).await;
            assert!(matches!(raw.expect().await, Packet::ConnAck(a) if a.reason.as_u8() == 0));
        }
    })
    .await;
}

/// Shared subscriptions: members on several shards (one a 3.1.1 client) get every message exactly
/// once between them, each gets some; a non-shared subscriber gets all.
#[tokio::test]
async fn shared_subscriptions_balance_across_shards() {
    bounded(async {
        const COUNT: usize = 30;
        for cores in CORES {
            let broker = TestBroker::start(cores);
            let filter = format!("$share/g/sh{cores}/+");
            let mut members = vec![
                Client::connect(broker.addr, Version::V5, &broker.id_on_shard(&format!("sh5a-{cores}"), 0))
                    .await,
                Client::connect(broker.addr, Version::V4, &broker.id_on_shard(&format!("sh4-{cores}"), 1))
                    .await,
                Client::connect(
                    broker.addr,
                    Version::V5,
                    &broker.id_on_shard(&format!("sh5b-{cores}"), cores - 1),
                )
                .await,
            ];
            for member in &mut members {
                assert_eq!(member.subscribe(&filter, 1).await, 1);
            }
            let mut plain =
                Client::connect(broker.addr, Version::V4, &broker.id_on_shard(&format!("shp-{cores}"), 1))
                    .await;
            assert_eq!(plain.subscribe(&format!("sh{cores}/+"), 1).await, 1);
            let mut publisher =
                Client::connect(broker.addr, Version::V5, &broker.id_on_shard(&format!("shpub-{cores}"), 0))
                    .await;
            for n in 0..COUNT {
                publisher.publish(&format!("sh{cores}/{}", n % 3), 1, false, format!("{n}")).await;
            }
            for n in 0..COUNT {
                plain.expect_msg(&format!("sh{cores}/{}", n % 3), format!("{n}").as_bytes()).await;
            }
            let mut got: Vec<Vec<usize>> = vec![Vec::new(); members.len()];
            let deadline = std::time::Instant::now() + TIMEOUT;
            while got.iter().map(Vec::len).sum::<usize>() < COUNT {
                assert!(std::time::Instant::now() < deadline, "cores={cores}: members got {got:?}");
                for (index, member) in members.iter_mut().enumerate() {
                    while let Some(msg) =
                        member.try_publish_within(std::time::Duration::from_millis(20)).await
                    {
                        got[index].push(std::str::from_utf8(&msg.payload).unwrap().parse().unwrap());
                    }
                }
            }
            for member in &mut members {
                member.expect_no_publish_within(std::time::Duration::from_millis(100)).await;
            }
            let mut all: Vec<usize> = got.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(
                all,
                (0..COUNT).collect::<Vec<_>>(),
                "cores={cores}: each message to exactly one member"
            );
            for (index, received) in got.iter().enumerate() {
                assert!(!received.is_empty(), "cores={cores}: member {index} got nothing: {got:?}");
            }
        }
    })
    .await;
}

/// MQTT 3.x rules: invalid filter, empty client id, MQTT 3.1, unsupported protocol level.
#[tokio::test]
async fn v3_rules() {
    use shardmq_protocol::PubResp;
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            // SUBACK failure for an invalid filter, success for the valid one beside it (3.1.1: 0x80,
            // 5.0: 0x8F topic filter invalid).
            for (version, code) in [(ProtocolVersion::V3_1_1, 0x80), (ProtocolVersion::V5, 0x8F)] {
                let mut raw =
                    Raw::connect(broker.addr, version, &format!("inv-{cores}-{}", version.level())).await;
                assert_eq!(raw.subscribe(1, "a/#/b", 0).await, vec![code]);
                assert_eq!(raw.subscribe(2, "a/+/b", 1).await, vec![1]);
            }
            // Empty client id with clean session 0: CONNACK 2 (identifier rejected), then close.
            let (mut raw, ack) =
                Raw::connect_with(broker.addr, connect_packet(ProtocolVersion::V3_1_1, "", false, 60)).await;
            assert_eq!(ack.reason.to_v3_connack(), Some(2), "{ack:?}");
            raw.expect_closed().await;
            // Empty client id with clean session 1 is accepted.
            let (_raw, ack) =
                Raw::connect_with(broker.addr, connect_packet(ProtocolVersion::V3_1_1, "", true, 60)).await;
            assert_eq!(ack.reason.as_u8(), 0);

            // MQTT 3.1 (MQIsdp, level 3) connects and publishes/subscribes across shards.
            let mut sub31 =
                Raw::connect(broker.addr, ProtocolVersion::V3_1, &broker.id_on_shard("s31", 0)).await;
            assert_eq!(sub31.subscribe(1, "v31/+", 1).await, vec![1]);
            let mut pub31 =
                Raw::connect(broker.addr, ProtocolVersion::V3_1, &broker.id_on_shard("p31", 1)).await;
            pub31.send(&Packet::Publish(publish_packet("v31/x", 1, Some(5), b"hello 3.1"))).await;
            assert!(matches!(pub31.expect().await, Packet::PubAck(a) if a.packet_id == 5));
            match sub31.expect().await {
                Packet::Publish(p) => {
                    assert_eq!((p.topic.as_str(), &p.payload[..]), ("v31/x", &b"hello 3.1"[..]));
                    sub31.send(&Packet::PubAck(PubResp::new(p.packet_id.unwrap()))).await;
                }
                other => panic!("expected PUBLISH, got {other:?}"),
            }
            // A 3.1 client id longer than 23 characters: CONNACK 2.
            let long = "abcdefghijklmnopqrstuvwx";
            assert_eq!(long.len(), 24);
            let (mut raw, ack) =
                Raw::connect_with(broker.addr, connect_packet(ProtocolVersion::V3_1, long, true, 60)).await;
            assert_eq!(ack.reason.to_v3_connack(), Some(2), "{ack:?}");
            raw.expect_closed().await;
            // 23 is fine.
            let (_raw, ack) =
                Raw::connect_with(broker.addr, connect_packet(ProtocolVersion::V3_1, &long[..23], true, 60))
                    .await;
            assert_eq!(ack.reason.as_u8(), 0);

            // Unsupported protocol level: CONNACK 1 (unacceptable protocol version), then close.
            let mut raw = Raw::open(broker.addr, ProtocolVersion::V3_1_1).await;
            raw.send_bytes(&[0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 60, 0, 1, b'z']).await;
            let seen = raw.expect_closed().await;
            assert!(
                matches!(seen.as_slice(), [Packet::ConnAck(a)] if a.reason.to_v3_connack() == Some(1)),
                "expected CONNACK 1 then close, got {seen:?}"
            );
        }
    })
    .await;
}

/// Denied topic filters: subscribing fails (0x80 / v5 0x87), publishing is dropped (v5 PUBACK 0x87).
#[tokio::test]
async fn denied_topic_filters() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start_with(|cfg| {
                cfg.cores = cores;
                cfg.denied_topic_filters = vec!["secret/#".to_string()];
            });
            let mut watcher = Client::connect(broker.addr, Version::V4, &broker.id_on_shard("dw", 1)).await;
            assert_eq!(watcher.subscribe("#", 1).await, 1);
            // Raw clients: rumqttc v5 ends the connection on a refusal (see common/mod.rs).
            for (version, code) in [(ProtocolVersion::V3_1_1, 0x80), (ProtocolVersion::V5, 0x87)] {
                let tag = format!("{}-{cores}", version.level());
                let mut client =
                    Raw::connect(broker.addr, version, &broker.id_on_shard(&format!("dc-{tag}"), 0)).await;
                assert_eq!(client.subscribe(1, "secret/x", 1).await, vec![code]);
                assert_eq!(client.subscribe(2, "secret/#", 0).await, vec![code]);
                assert_eq!(client.subscribe(3, "open/x", 1).await, vec![1]);
                client.send(&Packet::Publish(publish_packet("secret/a", 1, Some(10), b"hidden"))).await;
                match client.expect().await {
                    Packet::PubAck(ack) => {
                        assert_eq!(ack.packet_id, 10);
                        let want = if version.is_v5() { 0x87 } else { 0 };
                        assert_eq!(ack.reason.as_u8(), want, "PUBACK reason");
                    }
                    other => panic!("expected PUBACK, got {other:?}"),
                }
                client.send(&Packet::Publish(publish_packet("secret/b", 0, None, b"hidden"))).await;
                let marker = format!("visible-{tag}");
                client.send(&Packet::Publish(publish_packet("open/x", 0, None, marker.as_bytes()))).await;
                // The marker arrives after anything the denied publishes could have produced.
                let msg = watcher.expect_publish().await;
                assert_eq!((msg.topic.as_str(), &msg.payload[..]), ("open/x", marker.as_bytes()));
                match client.expect().await {
                    Packet::Publish(p) => assert_eq!(p.topic.as_str(), "open/x"),
                    other => panic!("expected PUBLISH, got {other:?}"),
                }
            }
            watcher.expect_no_publish().await;
            assert!(broker.stat(|s| &s.dropped_denied) >= 4);
        }
    })
    .await;
}

/// A subscriber that stops reading, with a small queue bound, does not hold up others, and the
/// drops are counted.
#[tokio::test]
async fn bounded_queue_for_a_stuck_subscriber() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start_with(|cfg| {
                cfg.cores = cores;
                cfg.queued_messages_max = 10;
                cfg.inflight_count_max = 4;
            });
            // QoS 1: the stuck subscriber never acknowledges, so its window fills, then its queue.
            let mut stuck = Raw::open_with_rcvbuf(broker.addr, ProtocolVersion::V3_1_1, 4096).await;
            stuck
                .send(&Packet::Connect(Box::new(connect_packet(
                    ProtocolVersion::V3_1_1,
                    &broker.id_on_shard("stuck", 0),
                    true,
                    0,
                ))))
                .await;
            assert!(matches!(stuck.expect().await, Packet::ConnAck(_)));
            assert_eq!(stuck.subscribe(1, "bq/#", 1).await, vec![1]);
            let mut good = Client::connect(broker.addr, Version::V4, &broker.id_on_shard("good", 1)).await;
            assert_eq!(good.subscribe("bq/#", 1).await, 1);
            let mut publisher =
                Client::connect(broker.addr, Version::V5, &broker.id_on_shard("bqp", 1)).await;
            const QOS1_COUNT: usize = 100;
            for n in 0..QOS1_COUNT {
                publisher.publish("bq/1", 1, false, format!("{n}")).await;
            }
            for n in 0..QOS1_COUNT {
                good.expect_msg("bq/1", format!("{n}").as_bytes()).await;
            }
            let dropped = broker.wait_stat(|s| &s.dropped_queue_full, (QOS1_COUNT - 4 - 10) as u64).await;
            assert!(dropped <= QOS1_COUNT as u64, "dropped {dropped}");

            // QoS 0 with large payloads: the stuck socket fills, the queue bound drops the rest.
            let mut stuck0 = Raw::open_with_rcvbuf(broker.addr, ProtocolVersion::V3_1_1, 4096).await;
            stuck0
                .send(&Packet::Connect(Box::new(connect_packet(
                    ProtocolVersion::V3_1_1,
                    &broker.id_on_shard("stuck0", 1),
                    true,
                    0,
                ))))
                .await;
            assert!(matches!(stuck0.expect().await, Packet::ConnAck(_)));
            assert_eq!(stuck0.subscribe(1, "bq0/#", 0).await, vec![0]);
            assert_eq!(good.subscribe("bq0/#", 0).await, 0);
            let before = broker.stat(|s| &s.dropped_queue_full);
            const QOS0_COUNT: usize = 480;
            // Paced by the good subscriber's receipts, in batches smaller than the queue bound, so
            // the good subscriber never has a reason to drop; the stuck one overflows.
            const BATCH: usize = 8;
            let payload = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
            let mut received = 0;
            for n in 0..QOS0_COUNT {
                publisher.publish_nowait("bq0/x", 0, false, payload.clone()).await;
                if n % BATCH == BATCH - 1 || n == QOS0_COUNT - 1 {
                    while received <= n {
                        let msg = good.expect_publish().await;
                        if msg.topic == "bq0/x" {
                            assert_eq!(msg.payload.len(), payload.len());
                            received += 1;
                        }
                    }
                }
            }
            assert_eq!(received, QOS0_COUNT);
            assert!(broker.wait_stat(|s| &s.dropped_queue_full, before + 1).await > before);
            drop(stuck);
            drop(stuck0);
        }
    })
    .await;
}

/// A retained message acknowledged to its publisher is seen by a SUBSCRIBE that follows the
/// acknowledgement, whichever shards the publisher, the subscriber and the topic's owner are on.
#[tokio::test]
async fn retained_message_visible_after_puback() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                let tag = format!("{version:?}{cores}");
                let mut publisher =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("rvp-{tag}"), 0))
                        .await;
                let mut sub =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("rvs-{tag}"), 1))
                        .await;
                for n in 0..20 {
                    let topic = broker.topic_on_retain_shard(&format!("rv{tag}/{n}/"), n);
                    publisher.publish(&topic, 1, true, format!("r{n}")).await;
                    assert_eq!(sub.subscribe(&topic, 1).await, 1);
                    let msg = sub.expect_msg(&topic, format!("r{n}").as_bytes()).await;
                    assert!(msg.retain);
                }
            }
        }
    })
    .await;
}

/// UNSUBSCRIBE stops delivery from every shard; the session's other subscriptions stay.
#[tokio::test]
async fn unsubscribe_stops_delivery() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                let tag = format!("{version:?}{cores}");
                let mut sub =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("us-{tag}"), 0)).await;
                let mut publisher =
                    Client::connect(broker.addr, version, &broker.id_on_shard(&format!("up-{tag}"), 1)).await;
                assert_eq!(
                    sub.subscribe_many(&[(&format!("un{tag}/a"), 1), (&format!("un{tag}/b"), 1)]).await,
                    vec![1, 1]
                );
                sub.unsubscribe(&format!("un{tag}/a")).await;
                publisher.publish(&format!("un{tag}/a"), 1, false, "gone").await;
                publisher.publish(&format!("un{tag}/b"), 1, false, "kept").await;
                sub.expect_msg(&format!("un{tag}/b"), b"kept").await;
                sub.expect_no_publish().await;
            }
        }
    })
    .await;
}
