//! Malformed and out-of-order input, end to end: each bad frame closes only its own connection
//! (MQTT 5: after a DISCONNECT with the expected reason code), is counted in the shard stats, and
//! leaves other clients on the same broker working. Runs against 2- and 4-shard brokers, with the
//! offending client homed on each shard in turn so the local and hand-off paths both see bad input.

mod common;

use common::*;
use shardmq_protocol::{Packet, ProtocolVersion};

/// Largest packet the brokers in this file accept, so the oversized case stays small.
const PACKET_SIZE_MAX: u32 = 1024;

/// A frame: first byte, a one-byte remaining length, body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut out = vec![first, body.len() as u8];
    out.extend_from_slice(body);
    out
}

/// A PUBLISH body: topic bytes, optional packet id, (v5) empty properties, payload.
fn publish_body(v5: bool, topic: &[u8], packet_id: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0, topic.len() as u8];
    body.extend_from_slice(topic);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    body
}

/// One bad input sent after a successful CONNECT; `reason` is the v5 DISCONNECT reason expected.
struct Case {
    name: &'static str,
    bytes: fn(bool) -> Vec<u8>,
    reason: u8,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "SUBSCRIBE with reserved flags 0000",
            bytes: |v5| frame(0x80, if v5 { &[0, 1, 0, 0, 1, b'a', 0] } else { &[0, 1, 0, 1, b'a', 0] }),
            reason: 0x81,
        },
        Case { name: "PUBREL with reserved flags 0000", bytes: |_| frame(0x60, &[0, 1]), reason: 0x81 },
        Case {
            name: "remaining length longer than 4 bytes",
            bytes: |_| vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            reason: 0x81,
        },
        Case {
            name: "ill-formed UTF-8 in PUBLISH topic",
            bytes: |v5| frame(0x30, &publish_body(v5, &[b'a', 0xC3, 0x28], None, b"x")),
            reason: 0x81,
        },
        Case {
            name: "U+0000 in PUBLISH topic",
            bytes: |v5| frame(0x30, &publish_body(v5, &[b'a', 0, b'b'], None, b"x")),
            reason: 0x81,
        },
        Case {
            name: "wildcard in PUBLISH topic",
            bytes: |v5| frame(0x30, &publish_body(v5, b"a/#", None, b"x")),
            reason: 0x90,
        },
        Case {
            name: "PUBLISH QoS 1 with packet id 0",
            bytes: |v5| frame(0x32, &publish_body(v5, b"a", Some(0), b"x")),
            reason: 0x82,
        },
        Case {
            name: "PUBLISH QoS 3",
            bytes: |v5| frame(0x36, &publish_body(v5, b"a", Some(1), b"x")),
            reason: 0x81,
        },
        Case {
            name: "DUP on a QoS 0 PUBLISH",
            bytes: |v5| frame(0x38, &publish_body(v5, b"a", None, b"x")),
            reason: 0x81,
        },
        Case {
            name: "SUBSCRIBE without a topic filter",
            bytes: |v5| frame(0x82, if v5 { &[0, 1, 0] } else { &[0, 1] }),
            reason: 0x82,
        },
        Case {
            name: "frame over packet_size_bytes_max",
            // Remaining length 2000: refused as soon as the header is read.
            bytes: |_| vec![0x30, 0xD0, 0x0F, 0, 1, b'a'],
            reason: 0x95,
        },
        Case {
            name: "second CONNECT",
            bytes: |v5| {
                if v5 {
                    frame(0x10, &[0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b'q'])
                } else {
                    frame(0x10, &[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'q'])
                }
            },
            reason: 0x82,
        },
        Case { name: "reserved packet type 0", bytes: |_| vec![0x00, 0x00], reason: 0x81 },
        Case { name: "garbage bytes", bytes: |_| b"GET / HTTP/1.1\r\n\r\n".to_vec(), reason: 0x81 },
    ]
}

/// Sends a message through two healthy clients and asserts it arrives: the broker still works.
async fn assert_healthy(watcher: &mut Client, publisher: &mut Client, n: usize) {
    let payload = format!("still fine {n}");
    publisher.publish("mf/ok", 1, false, payload.clone()).await;
    watcher.expect_msg("mf/ok", payload.as_bytes()).await;
}

fn bad_input_count(broker: &TestBroker) -> u64 {
    broker.stat(|s| &s.malformed_packets) + broker.stat(|s| &s.protocol_errors)
}

#[tokio::test]
async fn malformed_after_connect_closes_only_that_connection() {
    bounded(async {
        let mut checks = 0;
        for cores in CORES {
            let broker = TestBroker::start_with(|cfg| {
                cfg.cores = cores;
                cfg.packet_size_bytes_max = PACKET_SIZE_MAX;
            });
            let mut watcher = Client::connect(broker.addr, Version::V4, &broker.id_on_shard("mfw", 0)).await;
            assert_eq!(watcher.subscribe("mf/ok", 1).await, 1);
            let mut publisher = Client::connect(broker.addr, Version::V5, &broker.id_on_shard("mfp", 1)).await;
            for (index, case) in cases().into_iter().enumerate() {
                for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
                    let what = format!("{} (v{}, cores={cores})", case.name, version.level());
                    let before = bad_input_count(&broker);
                    let id = broker.id_on_shard(&format!("mf{index}-{}", version.level()), index);
                    let mut bad = Raw::connect(broker.addr, version, &id).await;
                    bad.send_bytes(&(case.bytes)(version.is_v5())).await;
                    let seen = bad.expect_closed().await;
                    if version.is_v5() {
                        assert!(
                            matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason.as_u8() == case.reason),
                            "{what}: expected DISCONNECT {:#04x} then close, got {seen:?}",
                            case.reason
                        );
                    } else {
                        assert!(seen.is_empty(), "{what}: 3.1.1 closes without a packet, got {seen:?}");
                    }
                    assert!(bad_input_count(&broker) > before, "{what}: counted in malformed/protocol stats");
                    assert_healthy(&mut watcher, &mut publisher, checks).await;
                    checks += 1;
                }
            }
        }
    })
    .await;
}

#[tokio::test]
async fn bad_first_packet_closes_only_that_connection() {
    bounded(async {
        let mut checks = 0;
        for cores in CORES {
            let broker = TestBroker::start_with(|cfg| {
                cfg.cores = cores;
                cfg.packet_size_bytes_max = PACKET_SIZE_MAX;
            });
            let mut watcher = Client::connect(broker.addr, Version::V5, &broker.id_on_shard("bfw", 1)).await;
            assert_eq!(watcher.subscribe("mf/ok", 1).await, 1);
            let mut publisher =
                Client::connect(broker.addr, Version::V4, &broker.id_on_shard("bfp", 0)).await;
            // (name, bytes, the CONNACK reason expected before the close, if any)
            let first_packets: Vec<(&str, Vec<u8>, Option<u8>)> = vec![
                ("PUBLISH before CONNECT", frame(0x30, &publish_body(false, b"a", None, b"x")), None),
                ("PINGREQ before CONNECT", vec![0xC0, 0x00], None),
                ("garbage before CONNECT", b"\x00\x01\x02\x03\x04\x05".to_vec(), None),
                ("remaining length too long before CONNECT", vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], None),
                ("oversized CONNECT", vec![0x10, 0xD0, 0x0F, 0, 4, b'M', b'Q'], None),
                (
                    "3.1.1 CONNECT with the reserved flag set",
                    frame(0x10, &[0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 1, b'r']),
                    None,
                ),
                (
                    "3.1.1 CONNECT with an unknown protocol name",
                    frame(0x10, &[0, 4, b'M', b'Q', b'X', b'X', 4, 0x02, 0, 60, 0, 1, b'n']),
                    None,
                ),
                (
                    "5.0 CONNECT with ill-formed UTF-8 client id",
                    frame(0x10, &[0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 2, 0xC3, 0x28]),
                    Some(0x81),
                ),
                (
                    "5.0 CONNECT with the reserved flag set",
                    frame(0x10, &[0, 4, b'M', b'Q', b'T', b'T', 5, 0x03, 0, 60, 0, 0, 1, b'r']),
                    Some(0x81),
                ),
            ];
            for (name, bytes, connack) in first_packets {
                let what = format!("{name} (cores={cores})");
                let before = bad_input_count(&broker);
                let version = if connack.is_some() { ProtocolVersion::V5 } else { ProtocolVersion::V3_1_1 };
                let mut bad = Raw::open(broker.addr, version).await;
                bad.send_bytes(&bytes).await;
                let seen = bad.expect_closed().await;
                match connack {
                    Some(code) => assert!(
                        matches!(seen.as_slice(), [Packet::ConnAck(a)] if a.reason.as_u8() == code),
                        "{what}: expected CONNACK {code:#04x} then close, got {seen:?}"
                    ),
                    None => assert!(seen.is_empty(), "{what}: closed without a packet, got {seen:?}"),
                }
                assert!(bad_input_count(&broker) > before, "{what}: counted in malformed/protocol stats");
                assert_healthy(&mut watcher, &mut publisher, checks).await;
                checks += 1;
            }
        }
    })
    .await;
}
