//! TLS and mutual-TLS listeners, end to end with real clients: Debian's `mosquitto_pub` and
//! `mosquitto_sub` (installed by `.ci/run`) over TLS with certificates generated per test; the
//! client certificate's identity handed to the `file` auth provider; a plain-TCP client, a missing
//! and a foreign client certificate refused with a counter while other clients carry on; and the
//! certificate reloaded on SIGHUP by the real binary.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bounded, connect_packet, Raw, Spawned, TestBroker};
use pki::{Ca, Leaf};
use shardmq_protocol::{decode, encode, Packet, ProtocolVersion};
use shardmq_shards::auth::{hash_password, FileAuth};
use shardmq_shards::listener::{ListenerConfig, ListenerKind};
use shardmq_shards::tls::TlsFiles;

const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
const WAIT: Duration = Duration::from_secs(15);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn tls_listener(server: &Leaf, client_ca: Option<&Path>) -> ListenerConfig {
    ListenerConfig {
        kind: ListenerKind::Tls,
        tls: Some(TlsFiles {
            cert_file: server.cert_file.clone(),
            key_file: server.key_file.clone(),
            client_ca_file: client_ca.map(Path::to_path_buf),
            require_client_cert: true,
        }),
        ..ListenerConfig::tcp(any_port())
    }
}

/// TLS options of a mosquitto client: trust `ca`, present `identity`.
fn tls_args(ca: &Path, identity: Option<&Leaf>) -> Vec<String> {
    let mut args = vec!["--cafile".to_string(), ca.display().to_string()];
    if let Some(leaf) = identity {
        args.extend(["--cert".into(), leaf.cert_file.display().to_string()]);
        args.extend(["--key".into(), leaf.key_file.display().to_string()]);
    }
    args
}

/// Runs `mosquitto_pub` to completion (bounded: it gives up connecting after its own timeout, and
/// is killed after [`WAIT`]).
fn mosquitto_pub(port: u16, tls: &[String], topic: &str, message: &str) -> Output {
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port.to_string(), "-V", "mqttv311", "-q", "1"])
        .args(["-i", &format!("pub-{}", std::process::id())])
        .args(tls)
        .args(["-t", topic, "-m", message])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub runs (apt-get install mosquitto-clients)");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mosquitto_pub did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// A running `mosquitto_sub -d` and its output lines.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sub {
    /// Starts `mosquitto_sub` and waits for its SUBACK (printed by `-d`): after that a publish
    /// reaches it.
    fn start(port: u16, tls: &[String], topic: &str) -> Sub {
        // Line-buffered: `-d` lines must arrive as they are printed, not when the pipe's buffer
        // fills.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", "localhost", "-p", &port.to_string(), "-V", "mqttv311", "-d", "-C", "1"])
            .args(["-i", &format!("sub-{}", std::process::id())])
            .args(tls)
            .args(["-t", topic])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub runs (apt-get install mosquitto-clients)");
        let lines = common::stdout_lines(&mut child);
        let mut sub = Sub { child, lines };
        sub.wait_for(|line| line.contains("received SUBACK"));
        sub
    }

    fn wait_for(&mut self, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if want(&line) => return line,
                Ok(_) => {}
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("mosquitto_sub did not print the expected line within {WAIT:?}");
                }
            }
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn mosquitto_clients_publish_and_subscribe_over_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new(dir.path(), "main");
    let server = ca.server(dir.path(), "server");
    let broker = TestBroker::start_with(|cfg| cfg.listeners = vec![tls_listener(&server, None)]);
    let port = broker.listener_addrs()[0].port();
    let tls = tls_args(&ca.cert_file, None);
    let mut sub = Sub::start(port, &tls, "secure/t");
    let out = mosquitto_pub(port, &tls, "secure/t", "over-tls");
    assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
    sub.wait_for(|line| line == "over-tls");
    assert_eq!(broker.listeners()[0].tls_errors.load(Ordering::Relaxed), 0);
}

/// alice is a user of the file provider (tenant 3); her ACL comes from `home/%u/#` with the
/// certificate's common name as the username. bob's certificate is valid but bob is no user.
#[test]
fn mutual_tls_hands_the_certificate_identity_to_the_auth_provider() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new(dir.path(), "main");
    let server = ca.server(dir.path(), "server");
    let alice = ca.client(dir.path(), "alice");
    let bob = ca.client(dir.path(), "bob");
    let rogue = Ca::new(dir.path(), "rogue").client(dir.path(), "mallory");
    let users = dir.path().join("users.toml");
    let hash = hash_password(b"unused").expect("hash");
    std::fs::write(
        &users,
        format!(
            "[[users]]\nusername = \"alice\"\npassword_hash = \"{hash}\"\ntenant = 3\n\n\
             [[acl]]\naction = \"all\"\ntopic = \"home/%u/#\"\npermission = \"allow\"\n"
        ),
    )
    .expect("users file");
    let auth = Arc::new(FileAuth::load(&users).expect("auth file"));
    let broker = TestBroker::start_with(|cfg| {
        cfg.auth = auth;
        cfg.listeners = vec![tls_listener(&server, Some(&ca.cert_file))];
    });
    let port = broker.listener_addrs()[0].port();
    let listener = broker.listeners()[0].clone();

    // alice, by certificate alone: her own topics work.
    let as_alice = tls_args(&ca.cert_file, Some(&alice));
    let mut sub = Sub::start(port, &as_alice, "home/alice/#");
    let out = mosquitto_pub(port, &as_alice, "home/alice/door", "open");
    assert!(out.status.success(), "alice publishes: {}", String::from_utf8_lossy(&out.stderr));
    sub.wait_for(|line| line == "open");
    assert_eq!(listener.tls_errors.load(Ordering::Relaxed), 0);

    // bob's certificate verifies, but the provider does not know bob: CONNACK code 4.
    let out = mosquitto_pub(port, &tls_args(&ca.cert_file, Some(&bob)), "home/bob/door", "x");
    assert!(!out.status.success(), "bob must be refused");
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(stderr.contains("bad user name or password"), "bob refused by the provider: {stderr}");
    assert_eq!(listener.tls_errors.load(Ordering::Relaxed), 0, "bob's handshake succeeded");

    // No certificate, and a certificate of another CA: the handshake fails, counted.
    let out = mosquitto_pub(port, &tls_args(&ca.cert_file, None), "home/alice/door", "x");
    assert!(!out.status.success(), "a client without a certificate must be refused");
    wait_counter(&listener.tls_errors, 1);
    let out = mosquitto_pub(port, &tls_args(&ca.cert_file, Some(&rogue)), "home/alice/door", "x");
    assert!(!out.status.success(), "a foreign certificate must be refused");
    wait_counter(&listener.tls_errors, 2);

    // alice still gets through afterwards.
    let mut sub = Sub::start(port, &as_alice, "home/alice/#");
    let out = mosquitto_pub(port, &as_alice, "home/alice/window", "shut");
    assert!(out.status.success(), "alice publishes again: {}", String::from_utf8_lossy(&out.stderr));
    sub.wait_for(|line| line == "shut");
}

fn wait_counter(counter: &std::sync::atomic::AtomicU64, at_least: u64) {
    let deadline = Instant::now() + WAIT;
    while counter.load(Ordering::Relaxed) < at_least {
        assert!(Instant::now() < deadline, "counter stayed below {at_least}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A blocking TLS client speaking MQTT 3.1.1 with the project's codec.
fn tls_mqtt_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>, id: &str) -> u8 {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(config, name).expect("client");
    let tcp = std::net::TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let mut out = bytes::BytesMut::new();
    encode(&Packet::Connect(Box::new(connect_packet(V311, id, true, 60))), V311, &mut out).expect("encode");
    stream.write_all(&out).expect("send CONNECT");
    let mut buf = bytes::BytesMut::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(packet) = decode(&mut buf, V311, 1 << 20).expect("decode") {
            match packet {
                Packet::ConnAck(ack) => return ack.reason.as_u8(),
                other => panic!("expected CONNACK, got {other:?}"),
            }
        }
        let n = stream.read(&mut chunk).expect("read CONNACK");
        assert!(n > 0, "closed before CONNACK");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_client_on_a_tls_port_is_refused_and_others_carry_on() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Ca::new(dir.path(), "main");
        let server = ca.server(dir.path(), "server");
        let broker = TestBroker::start_with(|cfg| {
            cfg.listeners = vec![ListenerConfig::tcp(any_port()), tls_listener(&server, None)];
        });
        let addrs = broker.listener_addrs();
        let listener = broker.listeners()[1].clone();
        // A plain client already connected on the TCP listener.
        let mut watcher = Raw::connect(addrs[0], V311, "watcher").await;
        assert_eq!(watcher.subscribe(1, "mixed/#", 0).await, vec![0]);

        // MQTT in clear text to the TLS port: the broker answers with a TLS alert record at most
        // (never a CONNACK), closes the connection, and counts it.
        let mut plain = tokio::net::TcpStream::connect(addrs[1]).await.expect("connect");
        let mut out = bytes::BytesMut::new();
        encode(&Packet::Connect(Box::new(connect_packet(V311, "plain", true, 60))), V311, &mut out).unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut plain, &out).await.expect("send");
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut answer))
            .await
            .expect("the broker closes the connection")
            .expect("read until closed");
        assert!(answer.is_empty() || answer[0] == 0x15, "only a TLS alert may come back: {answer:02x?}");
        assert_eq!(listener.tls_errors.load(Ordering::Relaxed), 1);

        // A TLS client connects and publishes; the plain watcher receives it.
        let config = pki::client_config(&ca.cert_file, None);
        let addr = addrs[1];
        let code =
            tokio::task::spawn_blocking(move || tls_mqtt_connect(addr, config, "tls-ok")).await.unwrap();
        assert_eq!(code, 0, "a TLS client is accepted");
        let tls = tls_args(&ca.cert_file, None);
        let port = addrs[1].port();
        let out = tokio::task::spawn_blocking(move || mosquitto_pub(port, &tls, "mixed/a", "across"))
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        match watcher.expect().await {
            Packet::Publish(p) => assert_eq!(&p.payload[..], b"across"),
            other => panic!("expected the PUBLISH, got {other:?}"),
        }
    })
    .await;
}

/// The real binary with a TLS listener from its config file: SIGHUP swaps in a certificate from
/// another CA; clients trusting only the old CA are then refused, the new one accepted.
#[test]
fn sighup_reloads_the_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let old_ca = Ca::new(dir.path(), "old");
    let new_ca = Ca::new(dir.path(), "new");
    let live = old_ca.server(dir.path(), "live");
    let replacement = new_ca.server(dir.path(), "replacement");
    let config = dir.path().join("shardmq.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\nkind = \"tls\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            live.cert_file.display(),
            live.key_file.display()
        ),
    )
    .expect("config");
    let data = dir.path().join("data");
    let broker = Spawned::start([
        "--config".as_ref(),
        config.as_os_str(),
        "--admin-listen".as_ref(),
        "off".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ]);
    let port = broker.addr.port();
    let out = mosquitto_pub(port, &tls_args(&old_ca.cert_file, None), "t", "before");
    assert!(out.status.success(), "old CA before the reload: {}", String::from_utf8_lossy(&out.stderr));

    std::fs::copy(&replacement.cert_file, &live.cert_file).expect("swap cert");
    std::fs::copy(&replacement.key_file, &live.key_file).expect("swap key");
    broker.sighup();
    broker.wait_line(|line| line.contains("certificate and key reloaded"));

    let out = mosquitto_pub(port, &tls_args(&old_ca.cert_file, None), "t", "after");
    assert!(!out.status.success(), "the old CA no longer verifies the server");
    let out = mosquitto_pub(port, &tls_args(&new_ca.cert_file, None), "t", "after");
    assert!(out.status.success(), "new CA after the reload: {}", String::from_utf8_lossy(&out.stderr));
    broker.kill();
}

/// A webhook for the mutual-TLS test, on a std thread: allows (tenant 3) a client whose
/// certificate names alice (subject, common name and e-mail SAN, as the broker forwards them),
/// denies any other. Returns its address and every request body it saw.
fn cert_webhook() -> (SocketAddr, Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
    let bodies = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let bodies = bodies.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(WAIT));
                let mut buf = Vec::new();
                loop {
                    // One request: headers, then Content-Length bytes of body (keep-alive).
                    let mut chunk = [0u8; 4096];
                    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4)
                    else {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok()))
                        .unwrap_or(0);
                    if buf.len() < head_end + length {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    }
                    let body: serde_json::Value =
                        serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or_default();
                    buf.drain(..head_end + length);
                    let alice = body["cert_common_name"] == "alice"
                        && body["cert_subject"].as_str().is_some_and(|s| s.contains("CN=alice"))
                        && body["cert_sans"] == serde_json::json!(["alice@example.test"]);
                    bodies.lock().unwrap().push(body);
                    let answer =
                        if alice { r#"{"result":"allow","tenant":3}"# } else { r#"{"result":"deny"}"# };
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if stream.write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// The real binary, `--auth http`, a mutual-TLS listener: the webhook receives the client
/// certificate's subject, common name and SANs, and decides on them.
#[test]
fn the_webhook_gets_the_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new(dir.path(), "main");
    let server = ca.server(dir.path(), "server");
    let alice = ca.client(dir.path(), "alice");
    let bob = ca.client(dir.path(), "bob");
    let (hook, bodies) = cert_webhook();
    let config = dir.path().join("shardmq.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\nkind = \"tls\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             client_ca_file = \"{}\"\n",
            server.cert_file.display(),
            server.key_file.display(),
            ca.cert_file.display()
        ),
    )
    .expect("config");
    let url = format!("http://{hook}/auth");
    let broker = Spawned::start([
        "--config",
        config.to_str().expect("utf-8 path"),
        "--admin-listen",
        "off",
        "--in-memory",
        "--auth",
        "http",
        "--auth-url",
        &url,
    ]);
    let port = broker.addr.port();
    let out = mosquitto_pub(port, &tls_args(&ca.cert_file, Some(&alice)), "t", "hi");
    assert!(
        out.status.success(),
        "alice is allowed by her certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mosquitto_pub(port, &tls_args(&ca.cert_file, Some(&bob)), "t", "hi");
    assert!(!out.status.success(), "bob's certificate is denied by the webhook");
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(bodies[0]["username"], "alice", "no username: the common name stands in");
    assert_eq!(bodies[1]["cert_common_name"], "bob");
    assert_eq!(bodies[1]["cert_sans"], serde_json::json!(["bob@example.test"]));
    broker.kill();
}
