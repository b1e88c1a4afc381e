//! Durability end to end: the real `shardmq` binary is killed with SIGKILL and restarted on the
//! same data directory, and every acknowledged message must come back.
//!
//! - 100,000 QoS 1 (and QoS 2) messages queued for an offline persistent session survive a kill;
//!   a second kill in the middle of the drain loses nothing either; duplicates carry DUP; the
//!   order per topic is kept.
//! - Retained messages and their deletions survive a kill.
//! - A session that expired while the broker was down is gone; one that did not is present. A
//!   message that expired while it was down is not delivered; the others keep what is left of
//!   their lifetime.
//! - A changed `--cores` re-homes stored sessions and their queues.
//! - A damaged segment header stops start-up with an error naming the file; a second broker on
//!   the same data directory is refused.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{bounded, connect_packet, publish_packet, Raw, Spawned};
use shardmq_protocol::{encode, Disconnect, Packet, Properties, ProtocolVersion, PubResp, QoS, ReasonCode};

const START_BOUND: Duration = Duration::from_secs(30);
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

/// Starts `shardmq serve` on a free port with `cores` shards on `dir`; returns once it listens.
fn start(dir: &Path, cores: usize, extra: &[&str]) -> Spawned {
    let mut args: Vec<std::ffi::OsString> =
        ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"].iter().map(Into::into).collect();
    for arg in ["--max-queued-messages", "300000", "--segment-size", &(8 << 20).to_string()] {
        args.push(arg.into());
    }
    args.extend(["--cores".into(), cores.to_string().into(), "--data-dir".into(), dir.into()]);
    args.extend(extra.iter().map(Into::into));
    Spawned::start(args)
}

/// Runs the binary expecting it to fail at start-up; returns its stderr and stdout.
fn start_fails(dir: &Path, cores: usize) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--no-pin"])
        .args(["--cores", &cores.to_string()])
        .arg("--data-dir")
        .arg(dir)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let deadline = Instant::now() + START_BOUND;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(!status.success(), "start-up should have failed");
            let mut text = String::new();
            child.stderr.take().expect("stderr").read_to_string(&mut text).expect("stderr");
            child.stdout.take().expect("stdout").read_to_string(&mut text).expect("stdout");
            return text;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("shardmq neither failed nor exited within {START_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20)); // polling a child's exit, not synchronisation
    }
}

/// Connects a persistent (clean session 0) 3.1.1 client; returns it and CONNACK's session present.
async fn connect_persistent(addr: SocketAddr, id: &str) -> (Raw, bool) {
    let (raw, ack) = Raw::connect_with(addr, connect_packet(V311, id, false, 60)).await;
    assert_eq!(ack.reason, ReasonCode::Success, "{id}: {ack:?}");
    (raw, ack.session_present)
}

/// The payload of message `seq`: its number, padded to 64 bytes.
fn payload(seq: u32) -> Vec<u8> {
    let mut bytes = format!("{seq:010}").into_bytes();
    bytes.resize(64, b'.');
    bytes
}

fn seq_of(payload: &[u8]) -> u32 {
    std::str::from_utf8(&payload[..10]).expect("ascii").parse().expect("a sequence number")
}

/// Publishes messages `0..count` at `qos` on topics `{prefix}/{seq % 8}`, up to `window`
/// unacknowledged, and waits until every one is acknowledged (QoS 2: PUBCOMP).
async fn publish_all(raw: &mut Raw, prefix: &str, count: u32, qos: u8, window: u32) {
    let mut next = 0u32;
    let mut outstanding = 0u32;
    let mut completed = 0u32;
    let mut out = BytesMut::new();
    while completed < count {
        while next < count && outstanding < window && out.len() < 64 * 1024 {
            let packet_id = (next % 60_000) as u16 + 1;
            let topic = format!("{prefix}/{}", next % 8);
            let publish = publish_packet(&topic, qos, Some(packet_id), &payload(next));
            encode(&Packet::Publish(publish), V311, &mut out).expect("encodable");
            next += 1;
            outstanding += 1;
        }
        if !out.is_empty() {
            raw.send_bytes(&out).await;
            out.clear();
        }
        match raw.recv().await {
            Some(Packet::PubAck(_)) if qos == 1 => {
                outstanding -= 1;
                completed += 1;
            }
            Some(Packet::PubRec(rec)) if qos == 2 => {
                assert_eq!(rec.reason, ReasonCode::Success);
                encode(&Packet::PubRel(PubResp::new(rec.packet_id)), V311, &mut out).expect("encodable");
            }
            Some(Packet::PubComp(_)) if qos == 2 => {
                outstanding -= 1;
                completed += 1;
            }
            other => panic!("publisher: unexpected {other:?} after {completed} completed"),
        }
    }
}

/// What a subscriber saw: for each sequence number, how often, and whether repeats had DUP.
#[derive(Default)]
struct Seen {
    count: HashMap<u32, u32>,
    /// Per topic, the last first-time sequence number (order check).
    last_per_topic: HashMap<String, u32>,
}

impl Seen {
    fn distinct(&self) -> usize {
        self.count.len()
    }

    /// Deliveries beyond the first.
    fn repeats(&self) -> u32 {
        self.count.values().map(|n| n - 1).sum()
    }
}

/// Receives (and acknowledges) messages until `seen` holds `until` distinct ones, or, with
/// `stop_after`, until that many more distinct ones arrived. Checks: a repeat carries DUP; first
/// deliveries on a topic come in publish order.
async fn drain(raw: &mut Raw, seen: &mut Seen, until: usize, stop_after: Option<usize>) {
    let start = seen.distinct();
    let mut out = BytesMut::new();
    while seen.distinct() < until && stop_after.is_none_or(|n| seen.distinct() < start + n) {
        match raw.recv().await {
            Some(Packet::Publish(publish)) => {
                let seq = seq_of(&publish.payload);
                let times = seen.count.entry(seq).or_default();
                *times += 1;
                if *times > 1 {
                    assert!(publish.dup, "message {seq} delivered again without DUP");
                } else {
                    let topic = publish.topic.as_str().to_string();
                    if let Some(&last) = seen.last_per_topic.get(&topic) {
                        assert!(seq > last, "topic {topic}: message {seq} after {last}");
                    }
                    seen.last_per_topic.insert(topic, seq);
                }
                let id = publish.packet_id.expect("QoS > 0");
                let ack = match publish.qos {
                    QoS::AtLeastOnce => Packet::PubAck(PubResp::new(id)),
                    _ => Packet::PubRec(PubResp::new(id)),
                };
                encode(&ack, V311, &mut out).expect("encodable");
            }
            Some(Packet::PubRel(rel)) => {
                encode(&Packet::PubComp(PubResp::new(rel.packet_id)), V311, &mut out).expect("encodable")
            }
            other => panic!("subscriber: unexpected {other:?} after {} messages", seen.distinct()),
        }
        if out.len() > 16 * 1024 || raw_is_idle_soon(seen, until) {
            raw.send_bytes(&out).await;
            out.clear();
        }
    }
    raw.send_bytes(&out).await;
}

/// Flush acks eagerly near the end, so the broker's window never starves the last messages.
fn raw_is_idle_soon(seen: &Seen, until: usize) -> bool {
    seen.distinct() + 64 >= until || seen.distinct().is_multiple_of(32)
}

/// The whole scenario for one QoS: fill an offline persistent session, kill, restart, drain half,
/// kill again, restart, drain the rest.
async fn offline_queue_survives_kills(qos: u8) {
    const COUNT: u32 = 100_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = start(dir.path(), 2, &[]);
    let (mut sub, _) = connect_persistent(broker.addr, "durable-sub").await;
    assert_eq!(sub.subscribe(1, "d/#", qos).await, vec![qos]);
    sub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
    sub.expect_closed().await;

    let (mut publisher, _) =
        Raw::connect_with(broker.addr, connect_packet(V311, "durable-pub", true, 60)).await;
    publish_all(&mut publisher, "d", COUNT, qos, 1000).await;
    broker.kill();

    let broker = start(dir.path(), 2, &[]);
    let (mut sub, present) = connect_persistent(broker.addr, "durable-sub").await;
    assert!(present, "the persistent session survived the kill");
    let mut seen = Seen::default();
    drain(&mut sub, &mut seen, COUNT as usize, Some(COUNT as usize / 2)).await;
    // Let the broker read the last acks before the kill? No: acks in flight at a kill are the
    // point. Whatever it had not recorded comes again, with DUP.
    broker.kill();

    let broker = start(dir.path(), 2, &[]);
    let (mut sub, present) = connect_persistent(broker.addr, "durable-sub").await;
    assert!(present);
    drain(&mut sub, &mut seen, COUNT as usize, None).await;
    assert_eq!(seen.distinct(), COUNT as usize);
    assert!((0..COUNT).all(|seq| seen.count.contains_key(&seq)));
    // Only what was in flight at the kill (the broker's window plus acks not yet read) may come
    // again: acknowledged messages are recorded as done.
    assert!(seen.repeats() <= 500, "{} messages delivered twice", seen.repeats());
    // Nothing more is queued: a ping comes back before any further PUBLISH.
    sub.send(&Packet::PingReq).await;
    loop {
        match sub.expect().await {
            Packet::PingResp => break,
            Packet::Publish(p) => assert!(p.dup, "a fresh message after all {COUNT}: {p:?}"),
            Packet::PubRel(rel) => sub.send(&Packet::PubComp(PubResp::new(rel.packet_id))).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_offline_queue_survives_sigkill() {
    bounded(offline_queue_survives_kills(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_offline_queue_survives_sigkill() {
    bounded(offline_queue_survives_kills(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_and_deletions_survive_sigkill() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = start(dir.path(), 2, &[]);
        let (mut publisher, _) =
            Raw::connect_with(broker.addr, connect_packet(V311, "ret-pub", true, 60)).await;
        for n in 0..200u16 {
            let mut publish = publish_packet(&format!("r/{n}"), 1, Some(n + 1), format!("v{n}").as_bytes());
            publish.retain = true;
            publisher.send(&Packet::Publish(publish)).await;
            assert!(matches!(publisher.expect().await, Packet::PubAck(_)));
        }
        // Replace the even ones, delete every third.
        for n in (0..200u16).step_by(2) {
            let mut publish =
                publish_packet(&format!("r/{n}"), 1, Some(1000 + n), format!("w{n}").as_bytes());
            publish.retain = true;
            publisher.send(&Packet::Publish(publish)).await;
            assert!(matches!(publisher.expect().await, Packet::PubAck(_)));
        }
        for n in (0..200u16).step_by(3) {
            let mut publish = publish_packet(&format!("r/{n}"), 1, Some(2000 + n), b"");
            publish.retain = true;
            publisher.send(&Packet::Publish(publish)).await;
            assert!(matches!(publisher.expect().await, Packet::PubAck(_)));
        }
        broker.kill();

        let broker = start(dir.path(), 2, &[]);
        let mut sub = Raw::connect(broker.addr, V311, "ret-sub").await;
        assert_eq!(sub.subscribe(1, "r/#", 1).await, vec![1]);
        let expected: HashMap<String, String> = (0..200u16)
            .filter(|n| n % 3 != 0)
            .map(|n| (format!("r/{n}"), if n % 2 == 0 { format!("w{n}") } else { format!("v{n}") }))
            .collect();
        let mut got = HashMap::new();
        while got.len() < expected.len() {
            match sub.expect().await {
                Packet::Publish(p) => {
                    assert!(p.retain);
                    let value = String::from_utf8(p.payload.to_vec()).expect("utf8");
                    assert!(got.insert(p.topic.as_str().to_string(), value).is_none(), "twice: {}", p.topic);
                    if let Some(id) = p.packet_id {
                        sub.send(&Packet::PubAck(PubResp::new(id))).await;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, expected);
        sub.send(&Packet::PingReq).await;
        assert!(matches!(sub.expect().await, Packet::PingResp), "no deleted topic came back");
        drop(broker);
    })
    .await;
}

/// A v5 persistent client with a session expiry interval.
async fn connect_v5_expiring(addr: SocketAddr, id: &str, expiry_secs: u32, clean: bool) -> (Raw, bool) {
    let mut connect = connect_packet(ProtocolVersion::V5, id, clean, 60);
    connect.properties = Properties { session_expiry_interval: Some(expiry_secs), ..Default::default() };
    let (raw, ack) = Raw::connect_with(addr, connect).await;
    assert_eq!(ack.reason, ReasonCode::Success, "{id}: {ack:?}");
    (raw, ack.session_present)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_counts_while_the_broker_is_down() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = start(dir.path(), 2, &[]);
        for (id, expiry) in [("short-lived", 1u32), ("long-lived", 3600)] {
            let (mut raw, _) = connect_v5_expiring(broker.addr, id, expiry, true).await;
            raw.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
            raw.expect_closed().await;
        }
        let disconnected = Instant::now();
        broker.kill();
        // The short session's expiry must pass while the broker is down: this wait is the
        // condition under test, not a synchronisation.
        let left = Duration::from_millis(1500).saturating_sub(disconnected.elapsed());
        tokio::time::sleep(left).await;
        let broker = start(dir.path(), 2, &[]);
        let (_short, present) = connect_v5_expiring(broker.addr, "short-lived", 60, false).await;
        assert!(!present, "a session that expired while the broker was down is gone");
        let (_long, present) = connect_v5_expiring(broker.addr, "long-lived", 60, false).await;
        assert!(present, "an unexpired session survives");
        drop(broker);
    })
    .await;
}

/// Message expiry counts across a restart: of four stored messages for an offline v5 session, the
/// one whose expiry passed while the broker was down is dropped by recovery, the one whose expiry
/// passes after the restart (while it waits in the recovered queue, still in the log) is dropped
/// when its turn comes, and the others arrive with what is left of their lifetime (MQTT 5 section
/// 3.3.2.3.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_counts_across_a_restart() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = start(dir.path(), 2, &[]);
        let (mut sub, _) = connect_v5_expiring(broker.addr, "expiry-sub", 3600, true).await;
        assert_eq!(sub.subscribe(1, "expiry/#", 1).await, vec![1]);
        sub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
        sub.expect_closed().await;
        let (mut publisher, _) =
            Raw::connect_with(broker.addr, connect_packet(ProtocolVersion::V5, "expiry-pub", true, 60)).await;
        for (packet_id, (topic, expiry)) in
            [("expiry/short", 1u32), ("expiry/mid", 2), ("expiry/long", 3600), ("expiry/none", 0)]
                .into_iter()
                .enumerate()
        {
            let mut publish = publish_packet(topic, 1, Some(packet_id as u16 + 1), topic.as_bytes());
            publish.properties.message_expiry_interval = (expiry > 0).then_some(expiry);
            publisher.send(&Packet::Publish(publish)).await;
            assert!(
                matches!(publisher.expect().await, Packet::PubAck(ack) if ack.reason == ReasonCode::Success)
            );
        }
        let published = Instant::now();
        broker.kill();
        // The short message's expiry must pass while the broker is down: this wait is the
        // condition under test, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(1500).saturating_sub(published.elapsed())).await;
        let broker = start(dir.path(), 2, &[]);
        // The middle message's expiry passes after the restart, before its session is back.
        tokio::time::sleep(Duration::from_millis(2300).saturating_sub(published.elapsed())).await;
        let (mut sub, present) = connect_v5_expiring(broker.addr, "expiry-sub", 3600, false).await;
        assert!(present);
        let mut got = HashMap::new();
        for _ in 0..2 {
            match sub.expect().await {
                Packet::Publish(p) => {
                    got.insert(p.topic.as_str().to_string(), p.properties.message_expiry_interval);
                    sub.send(&Packet::PubAck(PubResp::new(p.packet_id.expect("QoS 1")))).await;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let left = got.get("expiry/long").copied().flatten().expect("the long message and its expiry");
        assert!((3590..3600).contains(&left), "what is left of 3600 s after about 2.3 s: {left}");
        assert_eq!(got.get("expiry/none"), Some(&None), "no expiry stays none: {got:?}");
        sub.send(&Packet::PingReq).await;
        assert!(matches!(sub.expect().await, Packet::PingResp), "the expired messages are not delivered");
        drop(broker);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_cores_rehomes_sessions_and_queues() {
    bounded(async {
        const PER_CLIENT: u32 = 500;
        let dir = tempfile::tempdir().expect("temp dir");
        let ids: Vec<String> = (0..6).map(|n| format!("rehome-{n}")).collect();
        let broker = start(dir.path(), 2, &[]);
        for id in &ids {
            let (mut sub, _) = connect_persistent(broker.addr, id).await;
            assert_eq!(sub.subscribe(1, &format!("{id}/#"), 1).await, vec![1]);
            sub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
            sub.expect_closed().await;
        }
        let (mut publisher, _) =
            Raw::connect_with(broker.addr, connect_packet(V311, "rehome-pub", true, 60)).await;
        for id in &ids {
            publish_all(&mut publisher, id, PER_CLIENT, 1, 200).await;
        }
        broker.kill();

        let mut seen: HashMap<String, Seen> = HashMap::new();
        for cores in [3usize, 1] {
            // Re-home (2 -> 3), then again (3 -> 1), draining half of each queue in between.
            let broker = start(dir.path(), cores, &[]);
            for id in &ids {
                let (mut sub, present) = connect_persistent(broker.addr, id).await;
                assert!(present, "{id}: session survives the move to {cores} cores");
                let want = if cores == 3 { PER_CLIENT as usize / 2 } else { PER_CLIENT as usize };
                drain(&mut sub, seen.entry(id.clone()).or_default(), want, None).await;
                sub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
                sub.expect_closed().await;
            }
            broker.kill();
        }
        for id in &ids {
            assert_eq!(seen[id].distinct(), PER_CLIENT as usize, "{id}: every message arrived");
            assert!(seen[id].repeats() <= 100, "{id}: {} messages delivered twice", seen[id].repeats());
        }
        let current = std::fs::read_to_string(dir.path().join("CURRENT")).expect("CURRENT");
        assert!(current.contains("cores=1"), "{current}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_segment_header_is_an_error_naming_the_file() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = start(dir.path(), 1, &[]);
        let (mut sub, _) = connect_persistent(broker.addr, "damaged").await;
        assert_eq!(sub.subscribe(1, "x/#", 1).await, vec![1]);
        drop(sub);
        broker.kill();
        let shard_dir = dir.path().join("gen-1").join("shard-0");
        let segment = std::fs::read_dir(&shard_dir)
            .expect("shard dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .expect("a segment file");
        let mut bytes = std::fs::read(&segment).expect("read segment");
        bytes[0] ^= 0xFF;
        std::fs::write(&segment, bytes).expect("damage segment");
        let text = start_fails(dir.path(), 1);
        let name = segment.file_name().expect("name").to_string_lossy().to_string();
        assert!(text.contains(&name), "the error names {name}: {text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_the_same_data_directory_is_refused() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let _broker = start(dir.path(), 1, &[]);
        let text = start_fails(dir.path(), 1);
        assert!(text.contains("in use"), "{text}");
    })
    .await;
}

/// Publishes one v5 QoS 1 message and returns the PUBACK's reason.
async fn publish_v5(raw: &mut Raw, topic: &str, packet_id: u16, payload: &[u8]) -> ReasonCode {
    raw.send(&Packet::Publish(publish_packet(topic, 1, Some(packet_id), payload))).await;
    match raw.expect().await {
        Packet::PubAck(ack) => {
            assert_eq!(ack.packet_id, packet_id);
            ack.reason
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_disk_budget_refuses_persistent_messages_and_recovers() {
    bounded(async {
        const SEGMENT: u64 = 64 * 1024;
        let broker = common::TestBroker::start_with(|cfg| {
            cfg.cores = 1;
            cfg.segment_size_bytes = SEGMENT;
            cfg.disk_budget_bytes = Some(4 * SEGMENT);
            cfg.packet_size_bytes_max = 16 * 1024;
        });
        let (mut sub, _) = connect_v5_expiring(broker.addr, "budget-sub", 3600, true).await;
        assert_eq!(sub.subscribe(1, "full/#", 1).await, vec![1]);
        sub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
        sub.expect_closed().await;

        let (mut v5, _) = connect_v5_expiring(broker.addr, "budget-pub", 0, true).await;
        let big = vec![b'x'; 1024];
        let mut accepted = 0u32;
        let refused = loop {
            let reason = publish_v5(&mut v5, "full/a", (accepted % 60_000) as u16 + 1, &big).await;
            if reason != ReasonCode::Success {
                break reason;
            }
            accepted += 1;
            assert!(accepted < 10_000, "a 256 KiB budget took {accepted} KiB of messages");
        };
        assert_eq!(refused, ReasonCode::QuotaExceeded, "v5 publisher is told the quota is exceeded");
        assert!(accepted > 0);

        // 3.1.1 has no negative PUBACK: the message is acknowledged, dropped and counted.
        let mut v3 = Raw::connect(broker.addr, V311, "budget-pub-v3").await;
        let before = broker.stat(|s| &s.publishes_refused_storage);
        v3.send(&Packet::Publish(publish_packet("full/b", 1, Some(9), &big))).await;
        assert!(matches!(v3.expect().await, Packet::PubAck(ack) if ack.packet_id == 9));
        assert!(broker.stat(|s| &s.publishes_refused_storage) > before);

        // Everyone else is served: a clean subscriber gets a message that needs no storage.
        let mut other = Raw::connect(broker.addr, V311, "budget-other").await;
        assert_eq!(other.subscribe(1, "free/#", 1).await, vec![1]);
        assert_eq!(publish_v5(&mut v5, "free/x", 60_001, b"hello").await, ReasonCode::Success);
        match other.expect().await {
            Packet::Publish(p) => assert_eq!(&p.payload[..], b"hello"),
            p => panic!("expected the message, got {p:?}"),
        }

        // The subscriber drains what was accepted (nothing stored was damaged), which frees the log.
        let (mut sub, present) = connect_v5_expiring(broker.addr, "budget-sub", 3600, false).await;
        assert!(present);
        let mut drained = 0u32;
        while drained < accepted {
            match sub.expect().await {
                Packet::Publish(p) => {
                    assert_eq!(p.payload.len(), 1024);
                    sub.send(&Packet::PubAck(PubResp::new(p.packet_id.expect("QoS 1")))).await;
                    drained += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        sub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
        sub.expect_closed().await;
        // Space comes back once the store's upkeep (every 100 ms) has freed the drained segments:
        // poll the observable outcome, bounded.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut packet_id = 100u16;
        loop {
            packet_id += 1;
            if publish_v5(&mut v5, "full/again", packet_id, &big).await == ReasonCode::Success {
                break;
            }
            assert!(Instant::now() < deadline, "the budget never freed after the drain");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_qos0_is_stored_when_configured_and_delivered_once() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let flags = ["--queue-qos0-offline"];
        let broker = start(dir.path(), 2, &flags);
        let (mut sub, _) = connect_persistent(broker.addr, "qos0-sub").await;
        assert_eq!(sub.subscribe(1, "z/#", 0).await, vec![0]);
        sub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
        sub.expect_closed().await;
        let mut publisher = Raw::connect(broker.addr, V311, "qos0-pub").await;
        for n in 0..100u32 {
            publisher.send(&Packet::Publish(publish_packet("z/a", 0, None, &payload(n)))).await;
        }
        // A QoS 1 message after them: its PUBACK means it, and everything the shard stored before
        // it, is durable (the same session's log, in order).
        publisher.send(&Packet::Publish(publish_packet("z/a", 1, Some(1), &payload(100)))).await;
        assert!(matches!(publisher.expect().await, Packet::PubAck(_)));
        broker.kill();

        let broker = start(dir.path(), 2, &flags);
        let (mut sub, present) = connect_persistent(broker.addr, "qos0-sub").await;
        assert!(present);
        for n in 0..=100u32 {
            match sub.expect().await {
                Packet::Publish(p) => {
                    assert_eq!(p.qos, QoS::AtMostOnce);
                    assert_eq!(seq_of(&p.payload), n);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        sub.send(&Packet::PingReq).await;
        assert!(matches!(sub.expect().await, Packet::PingResp));
        sub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
        sub.expect_closed().await;
        broker.kill();

        // Sent QoS 0 messages are finished: a further restart does not bring them back.
        let broker = start(dir.path(), 2, &flags);
        let (mut sub, present) = connect_persistent(broker.addr, "qos0-sub").await;
        assert!(present);
        sub.send(&Packet::PingReq).await;
        match sub.expect().await {
            Packet::PingResp => {}
            other => panic!("a delivered message came back after a restart: {other:?}"),
        }
        drop(broker);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_of_a_stored_session_is_published_after_a_kill() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = start(dir.path(), 2, &[]);
        // A persistent watcher of the will topic, offline during the kill.
        let (mut watcher, _) = connect_v5_expiring(broker.addr, "will-watcher", 3600, true).await;
        assert_eq!(watcher.subscribe(1, "will/#", 1).await, vec![1]);
        watcher.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
        watcher.expect_closed().await;
        // A persistent client with a delayed will, connected when the broker dies.
        let mut connect = connect_packet(ProtocolVersion::V5, "will-owner", true, 60);
        connect.properties = Properties { session_expiry_interval: Some(3600), ..Default::default() };
        let mut will_properties = Properties { will_delay_interval: Some(1), ..Default::default() };
        will_properties.content_type = Some(shardmq_protocol::Utf8::new("text/plain").expect("utf8"));
        connect.will = Some(shardmq_protocol::Will {
            topic: shardmq_protocol::Utf8::new("will/owner").expect("utf8"),
            payload: bytes::Bytes::from_static(b"owner is gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: will_properties,
        });
        let (_owner, ack) = Raw::connect_with(broker.addr, connect).await;
        assert_eq!(ack.reason, ReasonCode::Success);
        // The CONNACK came after the session (and its will) was written; the kill follows.
        broker.kill();

        let broker = start(dir.path(), 2, &[]);
        let (mut watcher, present) = connect_v5_expiring(broker.addr, "will-watcher", 3600, false).await;
        assert!(present);
        match watcher.expect().await {
            Packet::Publish(p) => {
                assert_eq!(p.topic.as_str(), "will/owner");
                assert_eq!(&p.payload[..], b"owner is gone");
                assert_eq!(p.properties.content_type.as_ref().map(|c| c.as_str()), Some("text/plain"));
            }
            other => panic!("expected the will, got {other:?}"),
        }
        // The owner's session itself survived (its will is spent).
        let (_owner, present) = connect_v5_expiring(broker.addr, "will-owner", 3600, false).await;
        assert!(present);
        drop(broker);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publish_resent_after_a_kill_is_not_routed_twice() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = start(dir.path(), 2, &[]);
        let (mut sub, _) = connect_persistent(broker.addr, "q2-sub").await;
        assert_eq!(sub.subscribe(1, "q2/#", 2).await, vec![2]);
        sub.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
        sub.expect_closed().await;
        // A persistent publisher gets PUBREC for packet id 7, then the broker dies before PUBREL.
        let (mut publisher, _) = connect_persistent(broker.addr, "q2-pub").await;
        publisher.send(&Packet::Publish(publish_packet("q2/a", 2, Some(7), &payload(1)))).await;
        assert!(matches!(publisher.expect().await, Packet::PubRec(rec) if rec.packet_id == 7));
        broker.kill();

        let broker = start(dir.path(), 2, &[]);
        let (mut publisher, present) = connect_persistent(broker.addr, "q2-pub").await;
        assert!(present);
        // It may resend the PUBLISH (with DUP) rather than PUBREL: that must not route it again.
        let mut resend = publish_packet("q2/a", 2, Some(7), &payload(1));
        resend.dup = true;
        publisher.send(&Packet::Publish(resend)).await;
        assert!(matches!(publisher.expect().await, Packet::PubRec(rec) if rec.packet_id == 7));
        publisher.send(&Packet::PubRel(PubResp::new(7))).await;
        match publisher.expect().await {
            Packet::PubComp(comp) => assert_eq!((comp.packet_id, comp.reason), (7, ReasonCode::Success)),
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
        // A second message marks the end: the subscriber must see message 1 once, then message 2.
        publisher.send(&Packet::Publish(publish_packet("q2/a", 2, Some(8), &payload(2)))).await;
        assert!(matches!(publisher.expect().await, Packet::PubRec(_)));
        let (mut sub, present) = connect_persistent(broker.addr, "q2-sub").await;
        assert!(present);
        let mut seqs = Vec::new();
        while seqs.last() != Some(&2) {
            match sub.expect().await {
                Packet::Publish(p) => {
                    seqs.push(seq_of(&p.payload));
                    sub.send(&Packet::PubRec(PubResp::new(p.packet_id.expect("QoS 2")))).await;
                }
                Packet::PubRel(rel) => sub.send(&Packet::PubComp(PubResp::new(rel.packet_id))).await,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seqs, vec![1, 2], "the resent QoS 2 message was routed again");
        drop(broker);
    })
    .await;
}
