//! The `shardmq` binary as an operator meets it: bad flags and config keys are clear errors naming
//! the culprit, a TOML file configures the broker, and SIGTERM stops it cleanly (v5 clients get
//! DISCONNECT 0x8B "server shutting down", the process exits 0).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shardmq_protocol::{decode, encode, Connect, Packet, Properties, ProtocolVersion, ReasonCode, Utf8};

const BOUND: Duration = Duration::from_secs(20);

fn shardmq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shardmq"))
}

/// Runs the binary to completion (bounded) and returns (success, stderr + stdout).
fn run_to_end(command: &mut Command) -> (bool, String) {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("binary starts");
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut text = String::new();
            child.stderr.take().expect("stderr").read_to_string(&mut text).expect("read stderr");
            child.stdout.take().expect("stdout").read_to_string(&mut text).expect("read stdout");
            return (status.success(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("shardmq did not exit within {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20)); // polling a child's exit, not synchronisation
    }
}

#[test]
fn bad_flag_names_the_flag() {
    let (ok, text) = run_to_end(shardmq().args(["serve", "--cores", "many"]));
    assert!(!ok, "a bad flag must fail");
    assert!(text.contains("--cores"), "error does not name the flag: {text}");
}

#[test]
fn unknown_config_key_names_the_key() {
    let dir = std::env::temp_dir().join(format!("shardmq-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "cores = 1\nmax_conections = 5\n").expect("write config");
    let (ok, text) = run_to_end(shardmq().args(["serve", "--config"]).arg(&path));
    assert!(!ok, "an unknown key must fail");
    assert!(text.contains("max_conections"), "error does not name the key: {text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zero_cores_in_config_is_refused() {
    let dir = std::env::temp_dir().join(format!("shardmq-cli0-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("zero.toml");
    std::fs::write(&path, "cores = 0\n").expect("write config");
    let (ok, text) = run_to_end(shardmq().args(["serve", "--config"]).arg(&path));
    assert!(!ok);
    assert!(text.contains("cores"), "error does not name the key: {text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts the broker from a config file on a free port and returns it with the port it logged.
fn start_from_config(dir: &std::path::Path) -> (Child, u16) {
    let path = dir.join("ok.toml");
    std::fs::write(
        &path,
        "cores = 2\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nno_pin = true\nlog = \"info\"\n",
    )
        .expect("config");
    let mut child = shardmq()
        .args(["serve", "--config"])
        .arg(&path)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("shardmq listening") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(BOUND).expect("broker logs its listener");
    // The line carries `listen=127.0.0.1:PORT`.
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    (child, port)
}

fn read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> Option<Packet> {
    loop {
        if let Some(packet) = decode(buf, ProtocolVersion::V5, 1 << 20).expect("valid packet") {
            return Some(packet);
        }
        let mut chunk = [0u8; 1024];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn sigterm_disconnects_v5_clients_with_0x8b_and_exits_cleanly() {
    let dir = std::env::temp_dir().join(format!("shardmq-cli-term-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (mut child, port) = start_from_config(&dir);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(BOUND)).expect("timeout");
    let connect = Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 30,
        properties: Properties::default(),
        client_id: Utf8::new("cli-term").expect("id"),
        will: None,
        username: None,
        password: None,
    };
    let mut out = BytesMut::new();
    encode(&Packet::Connect(Box::new(connect)), ProtocolVersion::V5, &mut out).expect("encode");
    stream.write_all(&out).expect("send CONNECT");
    let mut buf = BytesMut::new();
    match read_packet(&mut stream, &mut buf) {
        Some(Packet::ConnAck(connack)) => assert_eq!(connack.reason, ReasonCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    match read_packet(&mut stream, &mut buf) {
        Some(Packet::Disconnect(disconnect)) => assert_eq!(disconnect.reason, ReasonCode::ServerShuttingDown),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    assert!(read_packet(&mut stream, &mut buf).is_none(), "the connection closes after DISCONNECT");
    let deadline = Instant::now() + BOUND;
    let exit = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "broker did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20)); // polling a child's exit, not synchronisation
    };
    assert!(exit.success(), "broker exit status {exit:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
