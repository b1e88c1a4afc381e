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
