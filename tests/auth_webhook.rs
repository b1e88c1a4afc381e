//! The `http` auth provider against a real HTTP server this test runs: allow with a tenant, deny
//! (v5 0x86, 3.1.1 code 4), server errors and timeouts refused (0x87), the decision cache, and a
//! slow webhook that never holds up other clients' CONNECTs.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{bounded, connect_with_credentials, publish_packet, Spawned};
use serde_json::Value;
use shardmq_protocol::{Packet, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The webhook: user `u1`/`u1b` -> tenant 1, `u2` -> tenant 2 (password `pw`); `slow` answers after
/// 3 s (the broker waits 2 s); `broken` gets a 500; anyone else is denied. Counts the requests it answers.
async fn webhook(requests: Arc<AtomicU64>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: headers, then Content-Length bytes of body (keep-alive).
                    let head_end = loop {
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Value =
                        serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
                    buf.drain(..head_end + length);
                    requests.fetch_add(1, Ordering::SeqCst);
                    let user = body["username"].as_str().unwrap_or("");
                    let good = body["password"] == "pw";
                    let (status, answer) = match user {
                        "slow" => {
                            // The scenario: a webhook that takes longer than the broker waits.
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            ("200 OK", r#"{"result":"allow"}"#.to_string())
                        }
                        "broken" => ("500 Internal Server Error", "{}".to_string()),
                        "u1" | "u1b" if good => ("200 OK", r#"{"result":"allow","tenant":1}"#.to_string()),
                        "u2" if good => ("200 OK", r#"{"result":"allow","tenant":2}"#.to_string()),
                        "u3" if good => (
                            "200 OK",
                            r#"{"result":"allow","acl":[{"action":"publish","topic":"ok/%c/#","permission":"allow"}]}"#
                                .to_string(),
                        ),
                        _ => ("200 OK", r#"{"result":"deny"}"#.to_string()),
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn start_broker(hook: SocketAddr) -> Spawned {
    let url = format!("http://{hook}/mqtt/auth");
    Spawned::start([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--in-memory",
        "--cores",
        "2",
        "--auth",
        "http",
        "--auth-timeout-ms",
        "2000",
        "--auth-url",
        url.as_str(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_decides_connects_with_tenants_a_cache_and_a_timeout() {
    bounded(async {
        let requests = Arc::new(AtomicU64::new(0));
        let hook = webhook(requests.clone()).await;
        let broker = start_broker(hook);
        let addr = broker.addr;
        const V5: ProtocolVersion = ProtocolVersion::V5;
        const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

        // Allowed, and cached: the same credentials again cost no request.
        let (_u1, code) = connect_with_credentials(addr, V5, "c-u1", "u1", b"pw").await;
        assert_eq!(code, 0);
        let before = requests.load(Ordering::SeqCst);
        let (_u1_again, code) = connect_with_credentials(addr, V5, "c-u1", "u1", b"pw").await;
        assert_eq!(code, 0);
        assert_eq!(requests.load(Ordering::SeqCst), before, "the second CONNECT was answered from the cache");

        // Denied: bad credentials on both versions; a server error refuses as not authorised.
        assert_eq!(connect_with_credentials(addr, V5, "c-x", "u1", b"nope").await.1, 0x86);
        assert_eq!(connect_with_credentials(addr, V311, "c-y", "u1", b"nope").await.1, 4);
        assert_eq!(connect_with_credentials(addr, V5, "c-b", "broken", b"pw").await.1, 0x87);

        // A slow webhook: its client is refused at the timeout, while another client connects
        // in the meantime on the same broker.
        let slow =
            tokio::spawn(async move { connect_with_credentials(addr, V5, "c-slow", "slow", b"pw").await.1 });
        let (_u1b, code) = connect_with_credentials(addr, V5, "c-u1b", "u1b", b"pw").await;
        assert_eq!(code, 0, "a CONNECT while the webhook is slow for another client");
        assert!(!slow.is_finished(), "the other client did not wait for the slow one");
        assert_eq!(slow.await.unwrap(), 0x87, "refused when the webhook does not answer in time");

        // ACL rules from the webhook's answer: u3 may publish under ok/<client id>/ only.
        let (mut u3, code) = connect_with_credentials(addr, V5, "c-u3", "u3", b"pw").await;
        assert_eq!(code, 0);
        u3.send(&Packet::Publish(publish_packet("ok/c-u3/x", 1, Some(1), b"fine"))).await;
        assert!(matches!(u3.expect().await, Packet::PubAck(a) if a.reason.as_u8() == 0));
        u3.send(&Packet::Publish(publish_packet("no/x", 1, Some(2), b"denied"))).await;
        assert!(matches!(u3.expect().await, Packet::PubAck(a) if a.reason.as_u8() == 0x87));
        assert_eq!(u3.subscribe(3, "ok/#", 1).await, vec![0x87], "no subscribe rule: denied");

        // Tenants from the webhook's answer: u2 (tenant 2) does not reach u1 (tenant 1); u1b does.
        let (mut u1_live, _) = connect_with_credentials(addr, V5, "c-u1-sub", "u1", b"pw").await;
        assert_eq!(u1_live.subscribe(1, "shared/topic", 0).await, vec![0]);
        let (mut u2, _) = connect_with_credentials(addr, V311, "c-u2", "u2", b"pw").await;
        u2.send(&Packet::Publish(publish_packet("shared/topic", 1, Some(1), b"from tenant 2"))).await;
        assert!(matches!(u2.expect().await, Packet::PubAck(_)));
        let (mut u1b, _) = connect_with_credentials(addr, V311, "c-u1b-pub", "u1b", b"pw").await;
        u1b.send(&Packet::Publish(publish_packet("shared/topic", 1, Some(1), b"from tenant 1"))).await;
        assert!(matches!(u1b.expect().await, Packet::PubAck(_)));
        match u1_live.expect().await {
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], b"from tenant 1", "tenant 2's message never arrives")
            }
            other => panic!("unexpected {other:?}"),
        }
    })
    .await;
}
