//! Authentication, tenants and ACL through the `file` auth provider, end to end: wrong passwords
//! (v5 0x86, 3.1.1 return code 4), tenants from the users file kept apart, ACL denials on publish
//! and subscribe on both versions, `%u` / `%c` substitution, and `shardmq passwd` + SIGHUP
//! reloading the real binary.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{
    bounded, connect_packet, connect_with_credentials, publish_packet, Raw, Spawned, TestBroker, CORES,
};
use shardmq_protocol::{Packet, ProtocolVersion, PubResp, QoS, ReasonCode, Utf8};
use shardmq_shards::auth::{hash_password, FileAuth};
use shardmq_shards::message::TenantId;
use shardmq_shards::tenants::Tenants;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

/// alice and carol in tenant 1, bob in tenant 2; ACL: each user owns `home/%u/#`, anyone may
/// subscribe to `public/#`, client `sensor-%c` rules for `dev/%c`; everything else denied.
fn users_file(dir: &Path) -> std::path::PathBuf {
    let hash = hash_password(b"pw").expect("hash");
    let mut text = String::new();
    for (user, tenant) in [("alice", 1), ("carol", 1), ("bob", 2)] {
        text.push_str(&format!(
            "[[users]]\nusername = \"{user}\"\npassword_hash = \"{hash}\"\ntenant = {tenant}\n\n"
        ));
    }
    text.push_str(
        "[[acl]]\naction = \"all\"\ntopic = \"home/%u/#\"\npermission = \"allow\"\n\n\
         [[acl]]\naction = \"publish\"\ntopic = \"public/#\"\npermission = \"allow\"\n\n\
         [[acl]]\naction = \"subscribe\"\ntopic = \"public/#\"\npermission = \"allow\"\n\n\
         [[acl]]\naction = \"all\"\ntopic = \"dev/%c\"\npermission = \"allow\"\n",
    );
    let path = dir.join("users.toml");
    std::fs::write(&path, text).expect("users file");
    path
}

fn start(cores: usize, dir: &Path) -> TestBroker {
    start_with_tenants(cores, dir).0
}

/// [`start`], also returning the tenants' shared state (for the per-tenant counters).
fn start_with_tenants(cores: usize, dir: &Path) -> (TestBroker, Arc<Tenants>) {
    let auth = Arc::new(FileAuth::load(users_file(dir)).expect("auth file loads"));
    let tenants = Arc::new(Tenants::default());
    let shared = tenants.clone();
    let broker = TestBroker::start_with(move |cfg| {
        cfg.cores = cores;
        cfg.auth = auth;
        cfg.tenants = shared;
    });
    (broker, tenants)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_or_unknown_user_is_refused() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let (broker, tenants) = start_with_tenants(2, dir.path());
        let (_, code) = connect_with_credentials(broker.addr, V5, "x1", "alice", b"wrong").await;
        assert_eq!(code, 0x86, "v5: bad user name or password");
        let (_, code) = connect_with_credentials(broker.addr, V311, "x2", "alice", b"wrong").await;
        assert_eq!(code, 4, "3.1.1: return code 4");
        let (_, code) = connect_with_credentials(broker.addr, V5, "x3", "mallory", b"pw").await;
        assert_eq!(code, 0x86);
        // No credentials at all.
        let (_, ack) = Raw::connect_with(broker.addr, connect_packet(V311, "x4", true, 60)).await;
        assert_eq!(ack.reason.to_v3_connack(), Some(4));
        assert_eq!(broker.stat(|s| &s.auth_failures), 4);
        // Per tenant: alice's two failures under her tenant 1; mallory (unknown) and the client
        // without credentials under the listener's default tenant 0.
        let failures =
            |t: u32| tenants.state(TenantId(t)).auth_failures.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!((failures(1), failures(0), failures(2)), (2, 2, 0));
        let (_, code) = connect_with_credentials(broker.addr, V5, "x5", "alice", b"pw").await;
        assert_eq!(code, 0);
    })
    .await;
}

async fn tenants_never_see_each_other(cores: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = start(cores, dir.path());
    // alice (tenant 1) and bob (tenant 2) use the same client id and the same topic.
    let (mut alice, code) = connect_with_credentials(broker.addr, V5, "same-id", "alice", b"pw").await;
    assert_eq!(code, 0);
    let (mut bob, code) = connect_with_credentials(broker.addr, V5, "same-id", "bob", b"pw").await;
    assert_eq!(code, 0);
    assert_eq!(alice.subscribe(1, "public/news", 1).await, vec![1]);
    assert_eq!(bob.subscribe(1, "public/news", 1).await, vec![1]);
    // carol shares alice's tenant.
    let (mut carol, _) = connect_with_credentials(broker.addr, V311, "carol-1", "carol", b"pw").await;
    carol.send(&Packet::Publish(publish_packet("public/news", 1, Some(1), b"for tenant 1"))).await;
    assert!(matches!(carol.expect().await, Packet::PubAck(_)));
    match alice.expect().await {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"for tenant 1"),
        other => panic!("alice expected the message, got {other:?}"),
    }
    // bob's first packet is a PINGRESP: the message never crossed tenants.
    bob.send(&Packet::PingReq).await;
    assert!(matches!(bob.expect().await, Packet::PingResp), "tenant 2 received tenant 1's message");
    // Both same-id sessions are alive (no takeover across tenants).
    alice.send(&Packet::PingReq).await;
    assert!(matches!(alice.expect().await, Packet::PingResp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_from_the_users_file_never_see_each_other() {
    bounded(async {
        for cores in CORES {
            tenants_never_see_each_other(cores).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_denies_publish_and_subscribe_on_both_versions() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = start(2, dir.path());
        let (mut v5, _) = connect_with_credentials(broker.addr, V5, "acl-5", "alice", b"pw").await;
        let (mut v3, _) = connect_with_credentials(broker.addr, V311, "acl-3", "alice", b"pw").await;
        // Subscribe: own home and public allowed; someone else's home, and a filter wider than
        // the rule, denied.
        assert_eq!(v5.subscribe(1, "home/alice/#", 1).await, vec![1]);
        assert_eq!(v5.subscribe(2, "home/bob/#", 1).await, vec![0x87]);
        assert_eq!(v5.subscribe(3, "home/#", 1).await, vec![0x87]);
        assert_eq!(v3.subscribe(1, "home/bob/+", 1).await, vec![0x80]);
        assert_eq!(v3.subscribe(2, "public/#", 0).await, vec![0]);
        // %c: client id `acl-5` may use dev/acl-5 only.
        assert_eq!(v5.subscribe(4, "dev/acl-5", 1).await, vec![1]);
        assert_eq!(v5.subscribe(5, "dev/acl-3", 1).await, vec![0x87]);
        // Publish: v5 gets 0x87 and nobody receives it; 3.1.1 gets a PUBACK, and it is dropped.
        v5.send(&Packet::Publish(publish_packet("home/bob/x", 1, Some(10), b"no"))).await;
        match v5.expect().await {
            Packet::PubAck(ack) => assert_eq!((ack.packet_id, ack.reason), (10, ReasonCode::NotAuthorized)),
            other => panic!("expected PUBACK, got {other:?}"),
        }
        v3.send(&Packet::Publish(publish_packet("private/x", 1, Some(11), b"no"))).await;
        assert!(matches!(v3.expect().await, Packet::PubAck(ack) if ack.packet_id == 11));
        v3.send(&Packet::Publish(publish_packet("home/bob/x", 1, Some(12), b"no"))).await;
        assert!(matches!(v3.expect().await, Packet::PubAck(ack) if ack.packet_id == 12));
        assert!(broker.stat(|s| &s.acl_denied) >= 5);
        // An allowed publish reaches the allowed subscription (and nothing denied came first).
        v3.send(&Packet::Publish(publish_packet("home/alice/lamp", 1, Some(13), b"on"))).await;
        assert!(matches!(v3.expect().await, Packet::PubAck(_)));
        match v5.expect().await {
            Packet::Publish(p) => {
                assert_eq!(p.topic.as_str(), "home/alice/lamp");
                v5.send(&Packet::PubAck(PubResp::new(p.packet_id.expect("QoS 1")))).await;
            }
            other => panic!("expected the allowed message, got {other:?}"),
        }
        // A will on a denied topic refuses the CONNECT.
        let mut connect = connect_packet(V5, "acl-will", true, 60);
        connect.username = Some(Utf8::new("alice").unwrap());
        connect.password = Some(Bytes::from_static(b"pw"));
        connect.will = Some(shardmq_protocol::Will {
            topic: Utf8::new("home/bob/will").unwrap(),
            payload: Bytes::from_static(b"w"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        });
        let (_, ack) = Raw::connect_with(broker.addr, connect).await;
        assert_eq!(ack.reason, ReasonCode::NotAuthorized);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwd_writes_users_and_sighup_reloads_them() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let users = dir.path().join("users.toml");
        let passwd =
            |user: &str, password: &str, tenant: u32| common::passwd(&users, user, password, tenant, &[]);
        passwd("dave", "first", 4);
        let broker = Spawned::start(
            [
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "off",
                "--in-memory",
                "--cores",
                "2",
                "--auth",
                "file",
            ]
            .iter()
            .map(std::ffi::OsString::from)
            .chain([std::ffi::OsString::from("--auth-file"), users.clone().into()]),
        );
        let addr = broker.addr;
        assert_eq!(connect_with_credentials(addr, V5, "d1", "dave", b"first").await.1, 0);
        assert_eq!(connect_with_credentials(addr, V5, "e1", "erin", b"second").await.1, 0x86);
        // Change dave's password and add erin, then SIGHUP.
        passwd("dave", "changed", 4);
        passwd("erin", "second", 5);
        broker.sighup();
        broker.wait_line(|line| line.contains("auth configuration reloaded"));
        assert_eq!(
            connect_with_credentials(addr, V5, "e2", "erin", b"second").await.1,
            0,
            "erin added by the reload"
        );
        assert_eq!(
            connect_with_credentials(addr, V5, "d2", "dave", b"first").await.1,
            0x86,
            "dave's old password is gone"
        );
        assert_eq!(connect_with_credentials(addr, V311, "d3", "dave", b"changed").await.1, 0);
    })
    .await;
}

/// One HTTP/1.1 POST without a body (Connection: close): the status.
fn post(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).expect("admin API");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
    (status, raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_reloads_the_users_file() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let users = users_file(dir.path());
        let broker = Spawned::start(
            ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--admin-token", "t", "--in-memory"]
                .iter()
                .chain(&["--cores", "2", "--auth", "file", "--auth-file"])
                .map(std::ffi::OsString::from)
                .chain([users.clone().into()]),
        );
        let (mqtt, admin) = (broker.addr, broker.admin());
        assert_eq!(connect_with_credentials(mqtt, V5, "f1", "frank", b"pw2").await.1, 0x86, "not a user yet");
        // Add frank to the file and reload through the API.
        let hash = hash_password(b"pw2").unwrap();
        let mut text = std::fs::read_to_string(&users).unwrap();
        text = format!("[[users]]\nusername = \"frank\"\npassword_hash = \"{hash}\"\ntenant = 1\n\n{text}");
        std::fs::write(&users, &text).unwrap();
        let (status, body) =
            tokio::task::spawn_blocking(move || post(admin, "/api/v1/auth/reload", "t")).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(connect_with_credentials(mqtt, V5, "f2", "frank", b"pw2").await.1, 0);
        // A broken file is refused with a 400; the users already loaded still connect.
        std::fs::write(&users, "[[users]]\nusername = 3\n").unwrap();
        let (status, body) =
            tokio::task::spawn_blocking(move || post(admin, "/api/v1/auth/reload", "t")).await.unwrap();
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("bad auth file"), "{body}");
        assert_eq!(
            connect_with_credentials(mqtt, V5, "f3", "frank", b"pw2").await.1,
            0,
            "the previous users stay"
        );
    })
    .await;
}
