//! MQTT 5 enhanced authentication (AUTH packets) end to end, with the `file` provider's
//! SCRAM-SHA-256 and users written by `shardmq passwd --scram`: a successful exchange proves the
//! user to the broker and the broker to the client, and the proven name drives the ACL; wrong
//! passwords, unknown users, users without SCRAM credentials, unknown methods and protocol
//! errors during the exchange are refused with their reason codes; re-authentication succeeds
//! with AUTH 0x00 and a failed one disconnects.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::{bounded, connect_packet, connect_with_credentials, Raw, TestBroker};
use shardmq_protocol::{Auth, Packet, Properties, ProtocolVersion, ReasonCode, Utf8};
use shardmq_shards::auth::FileAuth;
use shardmq_shards::scram::{ClientExchange, METHOD};

const V5: ProtocolVersion = ProtocolVersion::V5;

/// alice (tenant 1) with SCRAM credentials, bob (tenant 1) with a password only; ACL: each user
/// owns `home/%u/#`.
fn users_file(dir: &Path) -> PathBuf {
    let users = dir.join("users.toml");
    common::passwd(&users, "alice", "wonderland", 1, &["--scram"]);
    common::passwd(&users, "bob", "builder", 1, &[]);
    let mut text = std::fs::read_to_string(&users).expect("users file");
    text.push_str("\n[[acl]]\naction = \"all\"\ntopic = \"home/%u/#\"\npermission = \"allow\"\n");
    std::fs::write(&users, text).expect("acl");
    users
}

fn start(dir: &Path) -> TestBroker {
    let auth = Arc::new(FileAuth::load(users_file(dir)).expect("auth file loads"));
    TestBroker::start_with(move |cfg| cfg.auth = auth)
}

fn auth_properties(method: &str, data: Vec<u8>) -> Properties {
    Properties {
        authentication_method: Some(Utf8::new(method).unwrap()),
        authentication_data: Some(Bytes::from(data)),
        ..Default::default()
    }
}

fn auth(reason: ReasonCode, data: Vec<u8>) -> Packet {
    Packet::Auth(Auth { reason, properties: auth_properties(METHOD, data) })
}

/// Sends a CONNECT with `method` and `data`; returns the client and the first answer.
async fn connect_with(broker: &TestBroker, id: &str, method: &str, data: Vec<u8>) -> (Raw, Packet) {
    let mut connect = connect_packet(V5, id, true, 60);
    connect.properties = auth_properties(method, data);
    let mut raw = Raw::open(broker.addr, V5).await;
    raw.send(&Packet::Connect(Box::new(connect))).await;
    let answer = raw.expect().await;
    (raw, answer)
}

/// Runs the SCRAM exchange as `user`; returns the client and the CONNACK.
async fn scram_connect(
    broker: &TestBroker,
    id: &str,
    user: &str,
    password: &str,
) -> (Raw, ClientExchange, Packet) {
    let mut client = ClientExchange::new(user, password.as_bytes());
    let (mut raw, answer) = connect_with(broker, id, METHOD, client.client_first()).await;
    let server_first = match answer {
        Packet::Auth(a) => {
            assert_eq!(a.reason, ReasonCode::ContinueAuthentication);
            assert_eq!(a.properties.authentication_method.as_deref(), Some(METHOD));
            a.properties.authentication_data.expect("server-first-message").to_vec()
        }
        other => panic!("expected AUTH, got {other:?}"),
    };
    let client_final = client.client_final(&server_first).expect("client-final-message");
    raw.send(&auth(ReasonCode::ContinueAuthentication, client_final)).await;
    let connack = raw.expect().await;
    (raw, client, connack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_proves_both_sides_and_the_name_drives_the_acl() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = start(dir.path());
        let (mut raw, client, connack) = scram_connect(&broker, "a1", "alice", "wonderland").await;
        let Packet::ConnAck(ack) = connack else { panic!("expected CONNACK, got {connack:?}") };
        assert_eq!(ack.reason, ReasonCode::Success);
        assert_eq!(ack.properties.authentication_method.as_deref(), Some(METHOD));
        let server_final = ack.properties.authentication_data.expect("server-final-message");
        client.verify_server_final(&server_final).expect("the broker knows alice's credentials");
        // No username was sent: the proven name is the username for `home/%u/#`.
        assert_eq!(raw.subscribe(1, "home/alice/#", 1).await, vec![1]);
        assert_eq!(raw.subscribe(2, "home/bob/#", 1).await, vec![0x87]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_exchanges_are_refused_with_their_reason_codes() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = start(dir.path());
        let refused = |connack: Packet| match connack {
            Packet::ConnAck(ack) => ack.reason,
            other => panic!("expected CONNACK, got {other:?}"),
        };
        let (_, _, connack) = scram_connect(&broker, "w", "alice", "wrong").await;
        assert_eq!(refused(connack), ReasonCode::BadUserNameOrPassword, "wrong password");
        let (_, _, connack) = scram_connect(&broker, "u", "nobody", "x").await;
        assert_eq!(refused(connack), ReasonCode::BadUserNameOrPassword, "unknown user");
        let (_, _, connack) = scram_connect(&broker, "b", "bob", "builder").await;
        assert_eq!(refused(connack), ReasonCode::BadUserNameOrPassword, "bob has no SCRAM credentials");
        let (_, answer) = connect_with(&broker, "k", "KERBEROS", b"ticket".to_vec()).await;
        assert_eq!(refused(answer), ReasonCode::BadAuthenticationMethod);
        let (_, answer) = connect_with(&broker, "m", METHOD, b"not a client-first-message".to_vec()).await;
        assert_eq!(refused(answer), ReasonCode::BadAuthenticationMethod, "malformed SCRAM data");

        // Anything but AUTH with the same method during the exchange: CONNACK 0x82.
        let client = ClientExchange::new("alice", b"wonderland");
        let (mut raw, answer) = connect_with(&broker, "p", METHOD, client.client_first()).await;
        assert!(matches!(answer, Packet::Auth(_)));
        raw.send(&Packet::PingReq).await;
        let got = raw.expect_closed().await;
        assert!(
            matches!(got.first(), Some(Packet::ConnAck(a)) if a.reason == ReasonCode::ProtocolError),
            "{got:?}"
        );
        assert_eq!(broker.stat(|s| &s.auth_failures), 5);
    })
    .await;
}

/// Sends AUTH 0x19 as alice with `password`, answers the challenge; returns the client's side.
async fn reauth(raw: &mut Raw, password: &str) -> ClientExchange {
    let mut client = ClientExchange::new("alice", password.as_bytes());
    raw.send(&auth(ReasonCode::ReAuthenticate, client.client_first())).await;
    let server_first = match raw.expect().await {
        Packet::Auth(a) if a.reason == ReasonCode::ContinueAuthentication => {
            a.properties.authentication_data.expect("data").to_vec()
        }
        other => panic!("expected AUTH 0x18, got {other:?}"),
    };
    let proof = client.client_final(&server_first).expect("client-final-message");
    raw.send(&auth(ReasonCode::ContinueAuthentication, proof)).await;
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_authentication_succeeds_or_disconnects() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = start(dir.path());
        let (mut raw, _, connack) = scram_connect(&broker, "r1", "alice", "wonderland").await;
        assert!(matches!(connack, Packet::ConnAck(a) if a.reason == ReasonCode::Success));

        // Re-authenticate: AUTH 0x19, challenge, proof, AUTH 0x00 with the server's signature.
        let client = reauth(&mut raw, "wonderland").await;
        match raw.expect().await {
            Packet::Auth(a) => {
                assert_eq!(a.reason, ReasonCode::Success);
                client
                    .verify_server_final(&a.properties.authentication_data.expect("data"))
                    .expect("signature");
            }
            other => panic!("expected AUTH 0x00, got {other:?}"),
        }
        assert_eq!(raw.subscribe(1, "home/alice/#", 0).await, vec![0], "still connected and alice");

        // A failed re-authentication disconnects: 0x87 (DISCONNECT has no 0x86).
        let _ = reauth(&mut raw, "wrong").await;
        let got = raw.expect_closed().await;
        assert!(
            matches!(got.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::NotAuthorized),
            "{got:?}"
        );

        // AUTH from a client that connected without a method is a protocol error.
        let (mut plain, code) = connect_with_credentials(broker.addr, V5, "plain", "bob", b"builder").await;
        assert_eq!(code, 0, "bob connects with his password");
        plain.send(&auth(ReasonCode::ReAuthenticate, b"n,,n=alice,r=abc".to_vec())).await;
        let got = plain.expect_closed().await;
        assert!(
            matches!(got.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::ProtocolError),
            "{got:?}"
        );
    })
    .await;
}
