//! The admin HTTP API and `/metrics` of the real binary: every endpoint, with good and bad input,
//! without and with the bearer token; `/metrics` read by a Prometheus text parser; the OpenAPI
//! document checked against the routes actually served.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{bounded, connect_packet, publish_packet, Raw, Spawned};
use serde_json::Value;
use shardmq_protocol::{Disconnect, Packet, Properties, ProtocolVersion, ReasonCode};

const TOKEN: &str = "s3cret-token";
const BOUND: Duration = Duration::from_secs(20);

/// Starts the binary with its admin API on a free port (token `TOKEN`).
fn start() -> (Spawned, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut args: Vec<std::ffi::OsString> =
        ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--admin-token", TOKEN]
            .iter()
            .map(Into::into)
            .collect();
    args.extend(["--cores", "2", "--segment-size", "4194304", "--data-dir"].iter().map(Into::into));
    args.push(dir.path().into());
    (Spawned::start(args), dir)
}

/// One HTTP/1.1 exchange (Connection: close): (status, headers, body).
fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    http_with_body(addr, method, path, token, "")
}

fn http_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the admin API");
    stream.set_read_timeout(Some(BOUND)).expect("timeout");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let length = body.len();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {length}\r\nConnection: close\r\n\r\n{body}"
    )
    .expect("request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A v5 persistent client (session expiry one hour).
async fn connect_v5(addr: SocketAddr, id: &str) -> Raw {
    let mut connect = connect_packet(ProtocolVersion::V5, id, true, 60);
    connect.properties = Properties { session_expiry_interval: Some(3600), ..Default::default() };
    let (raw, ack) = Raw::connect_with(addr, connect).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_except_for_health_and_the_document() {
    bounded(async {
        let (broker, _dir) = start();
        let (status, _, body) = http(broker.admin(), "GET", "/health", None);
        assert_eq!(status, 200);
        assert_eq!(json(&body)["status"], "ok");
        for path in ["/metrics", "/api/v1/sessions", "/api/v1/sessions/someone"] {
            let (status, head, body) = http(broker.admin(), "GET", path, None);
            assert_eq!(status, 401, "{path} without a token");
            assert!(head.contains("www-authenticate: bearer"), "{head}");
            assert!(json(&body)["error"].is_string());
            let (status, _, _) = http(broker.admin(), "GET", path, Some("wrong"));
            assert_eq!(status, 401, "{path} with a wrong token");
        }
        let (status, _, _) = http(broker.admin(), "DELETE", "/api/v1/sessions/someone", None);
        assert_eq!(status, 401);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_connections() {
    bounded(async {
        let (broker, _dir) = start();
        let mut a = Raw::connect(broker.addr, ProtocolVersion::V3_1_1, "metrics-a").await;
        let _b = Raw::connect(broker.addr, ProtocolVersion::V3_1_1, "metrics-b").await;
        for id in 1..=3 {
            a.send(&Packet::Publish(publish_packet("m/x", 1, Some(id), b"v"))).await;
            assert!(matches!(a.expect().await, Packet::PubAck(_)));
        }
        let (status, head, body) = http(broker.admin(), "GET", "/metrics", Some(TOKEN));
        assert_eq!(status, 200);
        assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
        let connections: f64 = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "shardmq_connections")
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) => v,
                ref other => panic!("connections is a gauge, got {other:?}"),
            })
            .sum();
        assert_eq!(connections, 2.0);
        let shards: std::collections::BTreeSet<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "shardmq_connects_total")
            .map(|s| s.labels.get("shard").expect("a shard label").to_string())
            .collect();
        assert_eq!(shards.len(), 2, "one sample per shard");
        assert!(scrape.docs.contains_key("shardmq_publishes_received_total"), "HELP lines are there");
        // The acknowledgement latency histogram counted the three QoS 1 PUBLISHes.
        let acks: f64 = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "shardmq_puback_latency_seconds")
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(buckets) => {
                    let inf = buckets.iter().find(|b| b.less_than.is_infinite()).expect("a +Inf bucket");
                    let below_first = buckets.iter().map(|b| b.count).fold(f64::MAX, f64::min);
                    assert!(below_first <= inf.count, "buckets are cumulative");
                    inf.count
                }
                other => panic!("a histogram, got {other:?}"),
            })
            .sum();
        assert_eq!(acks, 3.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_paged_inspected_and_disconnected() {
    bounded(async {
        let (broker, _dir) = start();
        // Three offline persistent sessions with subscriptions, one connected client.
        for n in 0..3 {
            let mut raw = connect_v5(broker.addr, &format!("list-{n}")).await;
            assert_eq!(raw.subscribe(1, &format!("inbox/{n}/#"), 1).await, vec![1]);
            raw.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
            raw.expect_closed().await;
        }
        let mut live = connect_v5(broker.addr, "list-live").await;
        // Two messages queued for the offline list-1.
        let mut publisher = Raw::connect(broker.addr, ProtocolVersion::V3_1_1, "list-pub").await;
        for id in 1..=2 {
            publisher.send(&Packet::Publish(publish_packet("inbox/1/x", 1, Some(id), b"m"))).await;
            assert!(matches!(publisher.expect().await, Packet::PubAck(_)));
        }

        let (status, _, body) = http(broker.admin(), "GET", "/api/v1/sessions?limit=2", Some(TOKEN));
        assert_eq!(status, 200, "{body}");
        let page = json(&body);
        let ids: Vec<&str> = page["sessions"].as_array().unwrap().iter().map(|s| s["client_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["list-0", "list-1"]);
        let next = page["next"].as_str().expect("a next cursor on a full page");
        let (status, _, body) = http(broker.admin(), "GET", &format!("/api/v1/sessions?limit=2&after={next}"), Some(TOKEN));
        assert_eq!(status, 200);
        let ids: Vec<String> = json(&body)["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["client_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, ["list-2", "list-live"]);
        // Another tenant has none.
        let (_, _, body) = http(broker.admin(), "GET", "/api/v1/sessions?tenant=7", Some(TOKEN));
        assert_eq!(json(&body)["sessions"].as_array().unwrap().len(), 0);

        let (status, _, body) = http(broker.admin(), "GET", "/api/v1/sessions/list-1", Some(TOKEN));
        assert_eq!(status, 200);
        let one = json(&body);
        assert_eq!(one["connected"], false);
        assert_eq!(one["queued"], 2);
        assert_eq!(one["stored"], true);
        assert_eq!(one["subscription_list"][0]["filter"], "inbox/1/#");
        assert_eq!(one["subscription_list"][0]["qos"], 1);

        // Disconnect the live one: it gets DISCONNECT 0x98, and the session is gone.
        let (status, _, _) = http(broker.admin(), "DELETE", "/api/v1/sessions/list-live", Some(TOKEN));
        assert_eq!(status, 204);
        let seen = live.expect_closed().await;
        assert!(
            matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::AdministrativeAction),
            "{seen:?}"
        );
        let (status, _, body) = http(broker.admin(), "GET", "/api/v1/sessions/list-live", Some(TOKEN));
        assert_eq!(status, 404);
        assert_eq!(json(&body)["status"], 404);
        let (status, _, _) = http(broker.admin(), "DELETE", "/api/v1/sessions/list-live", Some(TOKEN));
        assert_eq!(status, 404);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_with_a_json_error() {
    bounded(async {
        let (broker, _dir) = start();
        for path in [
            "/api/v1/sessions?limit=abc",
            "/api/v1/sessions?limit=0",
            "/api/v1/sessions?limit=100000",
            "/api/v1/sessions?tenant=-1",
            "/api/v1/sessions/x?tenant=many",
            "/api/v1/sessions?after=%zz",
        ] {
            let (status, head, body) = http(broker.admin(), "GET", path, Some(TOKEN));
            assert_eq!(status, 400, "{path}: {body}");
            assert!(head.contains("content-type: application/json"));
            assert!(json(&body)["error"].as_str().is_some_and(|e| !e.is_empty()), "{path}: {body}");
        }
        let (status, _, body) = http(broker.admin(), "GET", "/api/v2/nothing", Some(TOKEN));
        assert_eq!(status, 404);
        assert!(json(&body)["error"].is_string());
        let (status, _, _) = http(broker.admin(), "POST", "/api/v1/sessions", Some(TOKEN));
        assert_eq!(status, 405);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_describes_exactly_the_served_routes() {
    bounded(async {
        let (broker, _dir) = start();
        let (status, _, body) = http(broker.admin(), "GET", "/openapi.json", None);
        assert_eq!(status, 200);
        let doc = json(&body);
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().expect("paths");
        assert!(paths.len() >= 5);
        let methods = ["get", "put", "post", "delete", "patch"];
        for (path, operations) in paths {
            let concrete = path.replace("{client_id}", "nobody").replace("{tenant}", "0");
            for method in methods {
                let (status, _, _) = http(broker.admin(), &method.to_uppercase(), &concrete, Some(TOKEN));
                if operations.get(method).is_some() {
                    // Served: not 405, and not 404 unless the path names something (a session).
                    let served = status != 405 && (status != 404 || path.contains('{'));
                    assert!(served, "{method} {path}: {status}");
                    let documented: Vec<u16> = operations[method]["responses"]
                        .as_object()
                        .unwrap()
                        .keys()
                        .map(|k| k.parse().unwrap())
                        .collect();
                    assert!(
                        documented.contains(&status),
                        "{method} {path} answered {status}, documents {documented:?}"
                    );
                } else {
                    assert_eq!(status, 405, "{method} {path} is not documented but was served");
                }
            }
        }
        drop(broker);
    })
    .await;
}

#[test]
fn a_non_loopback_admin_address_needs_a_token() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0", "--in-memory"])
        .output()
        .expect("binary runs");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("--admin-token"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_settings_are_read_and_changed_at_runtime() {
    bounded(async {
        let (broker, _dir) = start();
        let (status, _, body) = http(broker.admin(), "GET", "/api/v1/tenants/0/settings", Some(TOKEN));
        assert_eq!(status, 200);
        assert!(json(&body)["max_connections"].is_null());
        let (_first, ack) =
            Raw::connect_with(broker.addr, connect_packet(ProtocolVersion::V5, "t-1", true, 60)).await;
        assert_eq!(ack.reason, ReasonCode::Success);
        let (status, _, body) = http_with_body(
            broker.admin(),
            "PUT",
            "/api/v1/tenants/0/settings",
            Some(TOKEN),
            r#"{"max_connections": 1}"#,
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(json(&body)["max_connections"], 1);
        let (_, ack) =
            Raw::connect_with(broker.addr, connect_packet(ProtocolVersion::V5, "t-2", true, 60)).await;
        assert_eq!(ack.reason, ReasonCode::QuotaExceeded, "the new limit applies to the next CONNECT");
        for (body, why) in [
            ("{not json", "bad JSON"),
            (r#"{"max_connectionz": 1}"#, "unknown field"),
            (r#"{"receive_maximum": 0}"#, "invalid value"),
            (r#"{"allowed_protocol_levels": [9]}"#, "invalid value"),
        ] {
            let (status, _, answer) =
                http_with_body(broker.admin(), "PUT", "/api/v1/tenants/0/settings", Some(TOKEN), body);
            assert_eq!(status, 400, "{why}: {answer}");
            assert!(json(&answer)["error"].is_string());
        }
        let (status, _, _) = http(broker.admin(), "GET", "/api/v1/tenants/x/settings", Some(TOKEN));
        assert_eq!(status, 400);
        // Per-tenant metrics: one live connection in tenant 0, one refusal by the connection limit.
        let (_, _, text) = http(broker.admin(), "GET", "/metrics", Some(TOKEN));
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid");
        assert_eq!(sample(&scrape, "shardmq_tenant_connections", &[("tenant", "0")]), Some(1.0));
        assert_eq!(
            sample(&scrape, "shardmq_tenant_limited_total", &[("tenant", "0"), ("limit", "connections")]),
            Some(1.0)
        );
    })
    .await;
}

/// The value of one sample of a scrape, by metric name and labels.
fn sample(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => v,
            ref other => panic!("{other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_traffic_by_qos_bytes_sessions_and_queues() {
    bounded(async {
        let (broker, _dir) = start();
        let v5 = ProtocolVersion::V5;
        // A persistent subscriber that goes offline, and a live one.
        let mut connect = connect_packet(v5, "m-offline", false, 60);
        connect.properties.session_expiry_interval = Some(600);
        let (mut offline, _) = Raw::connect_with(broker.addr, connect).await;
        assert_eq!(offline.subscribe(1, "m/#", 1).await, vec![1]);
        offline.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
        let _ = offline.expect_closed().await;
        let mut live = Raw::connect(broker.addr, v5, "m-live").await;
        assert_eq!(live.subscribe(1, "m/#", 1).await, vec![1]);
        // Three QoS 0 messages of 10 bytes and two QoS 1 messages of 5 bytes.
        let mut publisher = Raw::connect(broker.addr, v5, "m-pub").await;
        for _ in 0..3 {
            publisher.send(&Packet::Publish(publish_packet("m/a", 0, None, &[0u8; 10]))).await;
        }
        for id in 1..=2 {
            publisher.send(&Packet::Publish(publish_packet("m/b", 1, Some(id), &[0u8; 5]))).await;
            assert!(matches!(publisher.expect().await, Packet::PubAck(_)));
        }
        for _ in 0..5 {
            match live.expect().await {
                Packet::Publish(p) => {
                    if let Some(id) = p.packet_id {
                        live.send(&Packet::PubAck(shardmq_protocol::PubResp::new(id))).await;
                    }
                }
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
        // The gauges are refreshed each second: read until they show the offline session's queue.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (scrape, text) = loop {
            let (_, _, text) = http(broker.admin(), "GET", "/metrics", Some(TOKEN));
            let scrape =
                prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid");
            if sample(&scrape, "shardmq_tenant_queued_messages", &[("tenant", "0")]) >= Some(2.0) {
                break (scrape, text);
            }
            assert!(std::time::Instant::now() < deadline, "queued gauge never reached 2");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let tenant = |metric: &str, extra: &[(&str, &str)]| {
            let mut labels = vec![("tenant", "0")];
            labels.extend_from_slice(extra);
            sample(&scrape, metric, &labels)
        };
        assert_eq!(tenant("shardmq_tenant_publishes_received_total", &[("qos", "0")]), Some(3.0));
        assert_eq!(tenant("shardmq_tenant_publishes_received_total", &[("qos", "1")]), Some(2.0));
        assert_eq!(tenant("shardmq_tenant_received_payload_bytes_total", &[]), Some(40.0));
        // The live subscriber got all five (QoS 0 stays 0, QoS 1 stays 1); the offline one none.
        assert_eq!(tenant("shardmq_tenant_publishes_sent_total", &[("qos", "0")]), Some(3.0));
        assert_eq!(tenant("shardmq_tenant_publishes_sent_total", &[("qos", "1")]), Some(2.0));
        assert_eq!(tenant("shardmq_tenant_sent_payload_bytes_total", &[]), Some(40.0));
        // Sessions: the offline one, the live one, the publisher. Queued: the offline session's
        // two QoS 1 messages (its QoS 0 ones were dropped as offline).
        assert_eq!(tenant("shardmq_tenant_sessions", &[]), Some(3.0));
        assert_eq!(tenant("shardmq_tenant_queued_messages", &[]), Some(2.0));
        assert_eq!(tenant("shardmq_tenant_dropped_total", &[("reason", "offline")]), Some(3.0));
        // Both QoS 1 PUBLISHes are in the tenant's PUBACK latency histogram.
        assert!(
            text.lines().any(|l| l == "shardmq_tenant_puback_latency_seconds_count{tenant=\"0\"} 2"),
            "tenant latency histogram count"
        );
        // The per-shard views add up to the same totals.
        let shards: f64 = (0..2)
            .map(|s| {
                sample(
                    &scrape,
                    "shardmq_shard_publishes_received_total",
                    &[("shard", &s.to_string()), ("qos", "0")],
                )
                .unwrap()
            })
            .sum();
        assert_eq!(shards, 3.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_retained_and_server_side_subscriptions() {
    bounded(async {
        let (broker, _dir) = start();
        let mut client = connect_v5(broker.addr, "srv-sub").await;
        // Server-side subscribe, then a message published through the API reaches the client.
        let (status, _, body) = http_with_body(
            broker.admin(),
            "POST",
            "/api/v1/sessions/srv-sub/subscriptions",
            Some(TOKEN),
            r#"{"filter": "srv/#", "qos": 1}"#,
        );
        assert_eq!(status, 200, "{body}");
        let (status, _, body) = http_with_body(
            broker.admin(),
            "POST",
            "/api/v1/publish",
            Some(TOKEN),
            r#"{"topic": "srv/x", "payload": "hello", "qos": 1, "retain": true}"#,
        );
        assert_eq!(status, 200, "{body}");
        match client.expect().await {
            Packet::Publish(p) => {
                assert_eq!((p.topic.as_str(), &p.payload[..]), ("srv/x", &b"hello"[..]));
                client.send(&Packet::PubAck(shardmq_protocol::PubResp::new(p.packet_id.unwrap()))).await;
            }
            other => panic!("expected the API's message, got {other:?}"),
        }
        // The retained copy is listed, then deleted (twice: the second is a 404).
        let (status, _, body) = http(broker.admin(), "GET", "/api/v1/retained?filter=srv/%23", Some(TOKEN));
        assert_eq!(status, 200);
        let listed = json(&body);
        assert_eq!(listed["messages"][0]["topic"], "srv/x");
        assert_eq!(listed["messages"][0]["payload"], "hello");
        let (status, _, _) = http(broker.admin(), "DELETE", "/api/v1/retained?topic=srv/x", Some(TOKEN));
        assert_eq!(status, 204);
        let (status, _, _) = http(broker.admin(), "DELETE", "/api/v1/retained?topic=srv/x", Some(TOKEN));
        assert_eq!(status, 404);
        let (_, _, body) = http(broker.admin(), "GET", "/api/v1/retained", Some(TOKEN));
        assert_eq!(json(&body)["messages"].as_array().unwrap().len(), 0);
        // Server-side unsubscribe: the next message does not arrive.
        let (status, _, _) = http(
            broker.admin(),
            "DELETE",
            "/api/v1/sessions/srv-sub/subscriptions?filter=srv/%23",
            Some(TOKEN),
        );
        assert_eq!(status, 204);
        let (status, _, _) = http(
            broker.admin(),
            "DELETE",
            "/api/v1/sessions/srv-sub/subscriptions?filter=srv/%23",
            Some(TOKEN),
        );
        assert_eq!(status, 404);
        let (status, _, _) = http_with_body(
            broker.admin(),
            "POST",
            "/api/v1/publish",
            Some(TOKEN),
            r#"{"topic": "srv/y", "payload": "no"}"#,
        );
        assert_eq!(status, 200);
        client.send(&Packet::PingReq).await;
        assert!(matches!(client.expect().await, Packet::PingResp), "unsubscribed on the server's side");
        // Bad input.
        for (method, path, body) in [
            ("POST", "/api/v1/publish", r#"{"topic": "a/#", "payload": "x"}"#),
            ("POST", "/api/v1/publish", r#"{"topic": "a", "qos": 3}"#),
            ("POST", "/api/v1/publish", r#"{"topik": "a"}"#),
            ("POST", "/api/v1/sessions/srv-sub/subscriptions", r#"{"filter": "a/#/b"}"#),
            ("DELETE", "/api/v1/retained", ""),
            ("GET", "/api/v1/retained?filter=a/%23/b", ""),
        ] {
            let (status, _, answer) = http_with_body(broker.admin(), method, path, Some(TOKEN), body);
            assert_eq!(status, 400, "{method} {path} {body}: {answer}");
            assert!(json(&answer)["error"].is_string());
        }
        let (status, _, _) = http_with_body(
            broker.admin(),
            "POST",
            "/api/v1/sessions/nobody/subscriptions",
            Some(TOKEN),
            r#"{"filter": "a"}"#,
        );
        assert_eq!(status, 404);
    })
    .await;
}
