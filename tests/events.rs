//! The `jsonl` event sink: a client's life (auth failure, connect, subscribe, unsubscribe,
//! refusal, takeover, normal and abnormal disconnect, drop) shows up as JSON lines in order.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{bounded, connect_packet, publish_packet, Raw, TestBroker};
use serde_json::Value;
use shardmq_protocol::{Disconnect, Packet, ProtocolVersion, ReasonCode, Utf8};
use shardmq_shards::auth::{hash_password, FileAuth};
use shardmq_shards::events::JsonlEvents;

/// Reads the events file until `done` holds for its events (bounded: the writer thread flushes
/// asynchronously, so this polls the observable file, not a clock).
async fn events_until(path: &std::path::Path, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let events: Vec<Value> =
            text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        if done(&events) {
            return events;
        }
        assert!(Instant::now() < deadline, "events so far: {events:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn names(events: &[Value], client: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["client_id"] == client)
        .map(|e| {
            let reason = e["reason"].as_str().map(|r| format!(":{r}")).unwrap_or_default();
            format!("{}{reason}", e["event"].as_str().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_life_is_written_as_json_lines() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let users = dir.path().join("users.toml");
        let hash = hash_password(b"pw").unwrap();
        std::fs::write(
            &users,
            format!(
                "[[users]]\nusername = \"ann\"\npassword_hash = \"{hash}\"\n\n\
                 [[acl]]\naction = \"all\"\ntopic = \"ev/#\"\npermission = \"allow\"\n"
            ),
        )
        .unwrap();
        let path = dir.path().join("events.jsonl");
        let events = Arc::new(JsonlEvents::open(&path).expect("events file"));
        let auth = Arc::new(FileAuth::load(&users).expect("users"));
        let broker = TestBroker::start_with(move |cfg| {
            cfg.events = events;
            cfg.auth = auth;
            cfg.queued_messages_max = 1;
        });
        let connect = |id: &str, password: &'static [u8], clean: bool| {
            let mut c = connect_packet(ProtocolVersion::V3_1_1, id, clean, 60);
            c.username = Some(Utf8::new("ann").unwrap());
            c.password = Some(Bytes::from_static(password));
            c
        };
        let (_, ack) = Raw::connect_with(broker.addr, connect("ev-1", b"wrong", true)).await;
        assert_eq!(ack.reason.to_v3_connack(), Some(4));
        let (mut one, _) = Raw::connect_with(broker.addr, connect("ev-1", b"pw", false)).await;
        assert_eq!(one.subscribe(1, "ev/#", 1).await, vec![1]);
        assert_eq!(one.subscribe(2, "other/#", 1).await, vec![0x80]);
        one.send(&Packet::Unsubscribe(shardmq_protocol::Unsubscribe {
            packet_id: 3,
            properties: Default::default(),
            filters: vec![Utf8::new("ev/#").unwrap()],
        }))
        .await;
        assert!(matches!(one.expect().await, Packet::UnsubAck(_)));
        assert_eq!(one.subscribe(4, "ev/q", 1).await, vec![1]);
        // Taken over by a second connection, which then disconnects normally.
        let (mut two, ack) = Raw::connect_with(broker.addr, connect("ev-1", b"pw", false)).await;
        assert!(ack.session_present);
        one.expect_closed().await;
        two.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
        two.expect_closed().await;
        // Offline with a one-message queue: the second message is dropped.
        let (mut publisher, _) = Raw::connect_with(broker.addr, connect("ev-pub", b"pw", true)).await;
        for id in 1..=2 {
            publisher.send(&Packet::Publish(publish_packet("ev/q", 1, Some(id), b"m"))).await;
            assert!(matches!(publisher.expect().await, Packet::PubAck(_)));
        }
        // An abnormal end: the connection just drops.
        drop(publisher);

        let events = events_until(&path, |events| {
            names(events, "ev-pub").iter().any(|n| n == "disconnected:abnormal")
                && names(events, "ev-1").iter().any(|n| n.starts_with("dropped"))
        })
        .await;
        let life = names(&events, "ev-1");
        let expected = [
            "auth_failed:bad credentials",
            "connected",
            "subscribed",
            "refused:not authorized",
            "unsubscribed",
            "subscribed",
            "disconnected:taken over",
            "connected",
            "disconnected:normal",
            "dropped:queue full (oldest evicted)",
        ];
        assert_eq!(life, expected, "{events:#?}");
        let connected = events.iter().find(|e| e["event"] == "connected").unwrap();
        assert_eq!(connected["username"], "ann");
        assert_eq!(connected["tenant"], 0);
        assert!(connected["ts_ms"].as_u64().unwrap() > 1_600_000_000_000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_an_event() {
    bounded(async {
        use shardmq_shards::tenants::{ConfigSettings, TenantSettings, Tenants};
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("events.jsonl");
        let events = Arc::new(JsonlEvents::open(&path).expect("events file"));
        let settings = TenantSettings { max_publish_rate_per_connection: Some(5), ..Default::default() };
        let tenants = Arc::new(Tenants::new(Arc::new(ConfigSettings::new(settings, Default::default()))));
        let broker = TestBroker::start_with(move |cfg| {
            cfg.events = events;
            cfg.tenants = tenants;
        });
        let mut publisher = Raw::connect(broker.addr, ProtocolVersion::V3_1_1, "fast").await;
        let mut burst = bytes::BytesMut::new();
        for _ in 0..8 {
            shardmq_protocol::encode(
                &Packet::Publish(publish_packet("t", 0, None, b"x")),
                ProtocolVersion::V3_1_1,
                &mut burst,
            )
            .unwrap();
        }
        publisher.send_bytes(&burst).await;
        let events =
            events_until(&path, |events| names(events, "fast").iter().any(|n| n == "throttled:publish rate"))
                .await;
        assert!(names(&events, "fast").starts_with(&["connected".to_string()]));
    })
    .await;
}
