//! Several listeners: a plain one and a PROXY protocol one (v1 and v2: the client address the
//! admin API and the auth provider see is the header's), per-listener connection limits and
//! default tenants, and bad input (no header, a broken header) refused without disturbing others.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{bounded, connect_packet, publish_packet, Raw, TestBroker};
use shardmq_protocol::{encode, Packet, ProtocolVersion};
use shardmq_shards::events::JsonlEvents;
use shardmq_shards::listener::{proxy_v2_header, ListenerConfig, ListenerKind};
use shardmq_shards::message::TenantId;
use shardmq_shards::tls::TlsFiles;

const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Listener 0: plain, tenant 1, at most 2 connections. Listener 1: PROXY protocol, tenant 2.
/// Listener 2: plain, tenant 1.
fn start() -> TestBroker {
    start_with_events(None)
}

/// [`start`], with events written as JSON lines to `events` when given.
fn start_with_events(events: Option<&std::path::Path>) -> TestBroker {
    let events = events.map(|path| JsonlEvents::open(path).expect("events file"));
    TestBroker::start_with(|cfg| {
        if let Some(events) = events {
            cfg.events = std::sync::Arc::new(events);
        }
        cfg.listeners = vec![
            ListenerConfig {
                max_connections: Some(2),
                default_tenant: TenantId(1),
                ..ListenerConfig::tcp(any_port())
            },
            ListenerConfig {
                proxy_protocol: true,
                default_tenant: TenantId(2),
                ..ListenerConfig::tcp(any_port())
            },
            ListenerConfig { default_tenant: TenantId(1), ..ListenerConfig::tcp(any_port()) },
        ];
    })
}

/// Connects through a PROXY listener, sending `header` first; returns the client and whether a
/// CONNACK came back.
async fn connect_proxied(addr: SocketAddr, header: &[u8], id: &str) -> (Raw, bool) {
    let mut raw = Raw::open(addr, V311).await;
    let mut bytes = header.to_vec();
    let mut connect = bytes::BytesMut::new();
    encode(&Packet::Connect(Box::new(connect_packet(V311, id, true, 60))), V311, &mut connect).unwrap();
    bytes.extend_from_slice(&connect);
    raw.send_bytes(&bytes).await;
    let ok = matches!(raw.recv_within(Duration::from_secs(5)).await, Ok(Some(Packet::ConnAck(a))) if a.reason.as_u8() == 0);
    (raw, ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_give_the_client_address() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let events_path = dir.path().join("events.jsonl");
        let broker = start_with_events(Some(&events_path));
        let addrs = broker.listener_addrs();
        assert_eq!(addrs.len(), 3);
        let (_v1, ok) =
            connect_proxied(addrs[1], b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 1883\r\n", "via-v1").await;
        assert!(ok, "v1 header accepted");
        let source: SocketAddr = "[2001:db8::9]:4242".parse().unwrap();
        let (_v2, ok) = connect_proxied(addrs[1], &proxy_v2_header(source, addrs[1]), "via-v2").await;
        assert!(ok, "v2 header accepted");
        let admin = broker.admin();
        let peer = |id: &'static str| {
            let admin = admin.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    admin.inspect(TenantId(2), id).unwrap().unwrap().summary.peer
                })
                .await
                .unwrap()
            }
        };
        assert_eq!(peer("via-v1").await, Some("203.0.113.7:5555".parse().unwrap()));
        assert_eq!(peer("via-v2").await, Some(source));
        // The events name the same address (the writer thread appends asynchronously: poll).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&events_path).unwrap_or_default();
            let connected: Vec<serde_json::Value> = text
                .lines()
                .map(|line| serde_json::from_str(line).expect("a JSON line"))
                .filter(|e: &serde_json::Value| e["event"] == "connected")
                .collect();
            let peer_of =
                |id: &str| connected.iter().find(|e| e["client_id"] == id).map(|e| e["peer"].clone());
            if let (Some(v1), Some(v2)) = (peer_of("via-v1"), peer_of("via-v2")) {
                assert_eq!(v1, "203.0.113.7:5555");
                assert_eq!(v2, source.to_string().as_str());
                break;
            }
            assert!(std::time::Instant::now() < deadline, "connected events: {connected:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The plain listener's clients keep their socket address.
        let _plain = Raw::connect(addrs[2], V311, "plain").await;
        let local = tokio::task::spawn_blocking(move || {
            admin.inspect(TenantId(1), "plain").unwrap().unwrap().summary.peer
        })
        .await
        .unwrap();
        assert!(local.is_some_and(|p| p.ip().is_loopback()), "{local:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_broken_proxy_headers_are_refused_and_others_served() {
    bounded(async {
        let broker = start();
        let addrs = broker.listener_addrs();
        // A plain MQTT client on the PROXY listener, a broken v1 line, a broken v2 header.
        let (mut plain, ok) = connect_proxied(addrs[1], b"", "no-header").await;
        assert!(!ok, "a CONNECT without a PROXY header is refused");
        assert!(plain.expect_closed().await.is_empty(), "closed without a CONNACK");
        let (_, ok) = connect_proxied(addrs[1], b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n", "bad-v1").await;
        assert!(!ok);
        let mut bad_v2 = proxy_v2_header("1.2.3.4:5".parse().unwrap(), addrs[1]);
        bad_v2[12] = 0x31;
        let (_, ok) = connect_proxied(addrs[1], &bad_v2, "bad-v2").await;
        assert!(!ok);
        assert_eq!(broker.listeners()[1].proxy_errors.load(Ordering::Relaxed), 3);
        // Others are unaffected: a good proxied client and a plain one work.
        let (_good, ok) =
            connect_proxied(addrs[1], b"PROXY TCP4 192.0.2.1 10.0.0.1 1000 1883\r\n", "good").await;
        assert!(ok);
        let _fine = Raw::connect(addrs[2], V311, "fine").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_limits_and_default_tenants() {
    bounded(async {
        let broker = start();
        let addrs = broker.listener_addrs();
        // Listener 0 holds two connections; a third is closed at once; a freed place is reused.
        let first = Raw::connect(addrs[0], V311, "l0-a").await;
        let _second = Raw::connect(addrs[0], V311, "l0-b").await;
        let mut third = Raw::open(addrs[0], V311).await;
        let mut connect = bytes::BytesMut::new();
        encode(&Packet::Connect(Box::new(connect_packet(V311, "l0-c", true, 60))), V311, &mut connect)
            .unwrap();
        third.send_bytes(&connect).await;
        assert!(third.expect_closed().await.is_empty(), "the third connection is closed before CONNACK");
        assert_eq!(broker.listeners()[0].refused_full.load(Ordering::Relaxed), 1);
        drop(first);
        broker.wait_connections(1).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while broker.listeners()[0].live.load(Ordering::SeqCst) > 1 {
            assert!(std::time::Instant::now() < deadline, "the closed connection's place was not released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _again = Raw::connect(addrs[0], V311, "l0-d").await;
        // Default tenants: listener 0 and 2 are tenant 1, the PROXY listener tenant 2.
        let mut sub = Raw::connect(addrs[2], V311, "t1-sub").await;
        assert_eq!(sub.subscribe(1, "news", 0).await, vec![0]);
        let (mut other, ok) =
            connect_proxied(addrs[1], b"PROXY TCP4 192.0.2.2 10.0.0.1 1 1883\r\n", "t2-pub").await;
        assert!(ok);
        other.send(&Packet::Publish(publish_packet("news", 0, None, b"tenant 2"))).await;
        let mut same = Raw::connect(addrs[2], V311, "t1-pub").await;
        same.send(&Packet::Publish(publish_packet("news", 0, None, b"tenant 1"))).await;
        match sub.expect().await {
            Packet::Publish(p) => assert_eq!(&p.payload[..], b"tenant 1", "tenant 2's message never crosses"),
            other => panic!("unexpected {other:?}"),
        }
    })
    .await;
}

#[test]
fn bad_listener_settings_are_refused_at_start_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = pki::Ca::new(dir.path(), "main");
    let server = ca.server(dir.path(), "server");
    let other = ca.server(dir.path(), "other");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let missing = dir.path().join("missing.pem");
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        Some(TlsFiles {
            cert_file: cert.to_path_buf(),
            key_file: key.to_path_buf(),
            client_ca_file: None,
            require_client_cert: true,
        })
    };
    let cases: Vec<(ListenerConfig, String)> = vec![
        (
            ListenerConfig { kind: ListenerKind::Tls, ..ListenerConfig::tcp(any_port()) },
            "needs cert_file".into(),
        ),
        (
            ListenerConfig {
                tls: tls(&server.cert_file, &server.key_file),
                ..ListenerConfig::tcp(any_port())
            },
            "takes no certificate".into(),
        ),
        (
            ListenerConfig { ws_path: Some("/mqtt".into()), ..ListenerConfig::tcp(any_port()) },
            "only for kinds ws and wss".into(),
        ),
        (
            ListenerConfig {
                kind: ListenerKind::Ws,
                ws_path: Some("mqtt".into()),
                ..ListenerConfig::tcp(any_port())
            },
            "must start with /".into(),
        ),
        (
            ListenerConfig {
                kind: ListenerKind::Tls,
                tls: tls(&missing, &server.key_file),
                ..ListenerConfig::tcp(any_port())
            },
            missing.display().to_string(),
        ),
        (
            ListenerConfig {
                kind: ListenerKind::Wss,
                tls: tls(&garbage, &server.key_file),
                ..ListenerConfig::tcp(any_port())
            },
            format!("{}: no PEM certificate", garbage.display()),
        ),
        (
            ListenerConfig {
                kind: ListenerKind::Tls,
                tls: tls(&server.cert_file, &other.key_file),
                ..ListenerConfig::tcp(any_port())
            },
            format!("{}: does not match", other.key_file.display()),
        ),
    ];
    for (listener, want) in cases {
        let cfg = shardmq_shards::BrokerConfig {
            cores: 1,
            pin_cores: false,
            persistence: false,
            listeners: vec![listener],
            ..Default::default()
        };
        let error = shardmq_shards::start(cfg).expect_err("a bad listener is refused").to_string();
        assert!(error.contains(&want), "{error:?} should contain {want:?}");
    }
}
