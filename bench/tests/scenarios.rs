//! End-to-end tests of `shardmq-bench`: every scenario at tiny settings against a real Mosquitto
//! started by the test on a free port, checking the tool's own accounting.
//!
//! Each test owns its broker (so tests run in parallel), waits for the broker's port to accept
//! instead of sleeping, and bounds every run of the tool with a timeout that fails the test.
//! Mosquitto missing from PATH is a failure with instructions, never a silent pass: CI installs it.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest one run of the tool may take in these tests.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A Mosquitto process owned by one test; killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    /// The TLS listener's port, when the test asked for one.
    tls_port: Option<u16>,
    dir: PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_mosquitto() -> Mosquitto {
    start_mosquitto_with(false)
}

/// With `tls`: a second listener speaking TLS with a server certificate for localhost and
/// 127.0.0.1, signed by a CA written to `<dir>/ca.pem`; another CA that signed nothing goes to
/// `<dir>/other-ca.pem`.
fn start_mosquitto_with(tls: bool) -> Mosquitto {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("mosquitto").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "mosquitto is not on PATH: these tests need a real broker (apt-get install mosquitto); \
         CI installs it, so a missing broker is a failure, not a skip"
    );
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("shardmq-bench-test-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mosquitto.conf");
    let mut text = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n\
         max_queued_messages 1000000\nmax_inflight_messages 1000\nset_tcp_nodelay true\n\
         persistence false\n"
    );
    let tls_port = tls.then(|| {
        let tls_port = free_port();
        let (cert_file, key_file) = write_pki(&dir);
        text.push_str(&format!(
            "listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
            cert_file.display(),
            key_file.display()
        ));
        tls_port
    });
    std::fs::write(&config, text).unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mosquitto");
    let mut broker = Mosquitto { child, port, tls_port, dir };
    // Mosquitto opens every listener before it serves any, so the last one accepting is enough.
    let addr = SocketAddr::from(([127, 0, 0, 1], tls_port.unwrap_or(port)));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = broker.child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut pipe) = broker.child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!("mosquitto exited during start-up ({status}): {stderr}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return broker;
        }
        assert!(Instant::now() < deadline, "mosquitto did not accept on port {port} within 10 s");
        // Retry pacing while the broker boots; the loop ends on readiness, not on the sleep.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `ca.pem`, `other-ca.pem` and a server certificate (`server.pem`, `server.key`) for
/// localhost and 127.0.0.1 signed by the first CA into `dir`; returns the server's files.
fn write_pki(dir: &Path) -> (PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, SanType,
    };
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::new());
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = Certificate::from_params(params).expect("CA certificate");
        std::fs::write(dir.join(format!("{name}.pem")), cert.serialize_pem().expect("CA PEM")).unwrap();
        cert
    };
    let signer = ca("ca");
    ca("other-ca");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]);
    params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params.distinguished_name.push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = Certificate::from_params(params).expect("server certificate");
    let (cert_file, key_file) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_file, server.serialize_pem_with_signer(&signer).expect("server PEM")).unwrap();
    std::fs::write(&key_file, server.serialize_private_key_pem()).unwrap();
    (cert_file, key_file)
}

/// Runs the tool with `args`, fails the test if it takes longer than [`RUN_TIMEOUT`], and returns
/// its final JSON line.
fn run_bench(args: &[&str]) -> Value {
    let child = Command::new(env!("CARGO_BIN_EXE_shardmq-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting shardmq-bench");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(output) => output.expect("waiting for shardmq-bench"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet (the
            // waiting thread is still blocked in wait), so the pid cannot have been reused.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            panic!("shardmq-bench {args:?} did not finish within {RUN_TIMEOUT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stdout.lines().last().unwrap_or_default();
    let value: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {stdout:?}; stderr: {stderr}"));
    value
}

/// Runs a scenario against `broker` and returns its `results`, failing on an error line.
fn run_scenario(broker: &Mosquitto, args: &[&str]) -> Value {
    let port = broker.port.to_string();
    let mut all = args.to_vec();
    all.extend(["--port", &port, "--threads", "2"]);
    let value = run_bench(&all);
    assert!(value.get("error").is_none(), "{args:?} failed: {}", value["error"]);
    for key in ["git_commit", "nproc", "kernel", "date_utc"] {
        assert!(value["run"].get(key).is_some(), "run facts lack {key}: {value}");
    }
    value["results"].clone()
}

fn n(results: &Value, key: &str) -> u64 {
    results[key].as_u64().unwrap_or_else(|| panic!("{key} missing or not a count in {results}"))
}

#[test]
fn pubsub_pairs_qos1_sends_acks_and_receives_everything() {
    let broker = start_mosquitto();
    let results = run_scenario(
        &broker,
        &["pubsub", "--mode", "pairs", "--pubs", "2", "--subs", "2", "--qos", "1", "--count", "300"],
    );
    assert_eq!(n(&results, "sent"), 600, "{results}");
    assert_eq!(n(&results, "acked"), 600, "{results}");
    assert_eq!(n(&results, "received"), 600, "{results}");
    assert_eq!(n(&results, "loss"), 0, "{results}");
    assert_eq!(n(&results, "duplicates"), 0, "{results}");
    assert_eq!(n(&results, "out_of_order"), 0, "{results}");
    assert_eq!(n(&results, "latency_count"), 600, "{results}");
    assert!(n(&results, "latency_us_p99") >= n(&results, "latency_us_p50"), "{results}");
}

#[test]
fn pubsub_fan_out_qos0_delivers_each_message_to_every_subscriber() {
    let broker = start_mosquitto();
    let results = run_scenario(
        &broker,
        &["pubsub", "--mode", "fan-out", "--pubs", "2", "--subs", "3", "--count", "200"],
    );
    assert_eq!(n(&results, "sent"), 400, "{results}");
    assert_eq!(n(&results, "received"), 2 * 200 * 3, "{results}");
    assert_eq!(n(&results, "expected"), 1200, "{results}");
    assert_eq!(n(&results, "loss"), 0, "{results}");
}

#[test]
fn pubsub_fan_in_qos2_mqtt5_completes_every_handshake() {
    let broker = start_mosquitto();
    let results = run_scenario(
        &broker,
        &[
            "pubsub", "--mode", "fan-in", "--pubs", "3", "--subs", "2", "--qos", "2", "--count", "100",
            "--mqtt", "5",
        ],
    );
    assert_eq!(n(&results, "sent"), 300, "{results}");
    assert_eq!(n(&results, "acked"), 300, "{results}");
    assert_eq!(n(&results, "delivered"), 600, "{results}");
    assert_eq!(n(&results, "duplicates"), 0, "{results}");
    assert_eq!(n(&results, "loss"), 0, "{results}");
}

#[test]
fn pubsub_shared_delivers_each_message_once_across_the_group() {
    let broker = start_mosquitto();
    let results = run_scenario(
        &broker,
        &["pubsub", "--mode", "shared", "--pubs", "2", "--subs", "3", "--qos", "1", "--count", "200"],
    );
    assert_eq!(n(&results, "sent"), 400, "{results}");
    assert_eq!(n(&results, "delivered"), 400, "{results}");
    assert_eq!(n(&results, "received"), 400, "{results}");
    assert_eq!(n(&results, "loss"), 0, "{results}");
}

#[test]
fn pubsub_open_loop_holds_the_rate() {
    let broker = start_mosquitto();
    let results = run_scenario(
        &broker,
        &["pubsub", "--mode", "pairs", "--pubs", "2", "--subs", "2", "--rate", "400", "--duration", "1"],
    );
    let sent = n(&results, "sent");
    assert!((300..=500).contains(&sent), "sent {sent} at 400/s for 1 s: {results}");
    assert_eq!(n(&results, "loss"), 0, "{results}");
}

/// Closed-loop window of the large-payload runs below: a stalled publisher sends exactly this.
const LARGE_PAYLOAD_WINDOW: u64 = 16;

/// Runs a closed-loop `pubsub` for one second and checks that the publishers kept sending until
/// the end (not one window and then silence) and that every copy arrived exactly once.
fn check_closed_loop_keeps_sending(broker: &Mosquitto, mode: &str, pubs: u64, qos: &str, payload: &str) {
    let subs: u64 = 2;
    let line = format!(
        "pubsub --mode {mode} --pubs {pubs} --subs {subs} --qos {qos} --payload {payload} \
         --window {LARGE_PAYLOAD_WINDOW} --duration 1"
    );
    let results = run_scenario(broker, &line.split_whitespace().collect::<Vec<_>>());
    let context = format!("{mode} qos {qos} payload {payload}: {results}");
    let sent = n(&results, "sent");
    // A publisher that stops after its first window sends `pubs * window`; loopback carries
    // thousands of 16 KiB messages a second even from a debug build, so ten windows per
    // publisher is far below a working run and far above a stalled one.
    assert!(sent >= 10 * LARGE_PAYLOAD_WINDOW * pubs, "only {sent} sent: {context}");
    // The last send is at the end of the second, not at its start.
    let send_secs = results["send_secs"].as_f64().expect("send_secs");
    assert!(send_secs >= 0.5, "last send at {send_secs} s of 1 s: {context}");
    let copies = if mode == "fan-out" { subs } else { 1 };
    assert_eq!(n(&results, "expected"), sent * copies, "{context}");
    assert_eq!(n(&results, "delivered"), sent * copies, "{context}");
    assert_eq!(n(&results, "loss"), 0, "{context}");
    assert_eq!(n(&results, "duplicates"), 0, "{context}");
    assert_eq!(n(&results, "window_stalls"), 0, "{context}");
    if qos != "0" {
        assert_eq!(n(&results, "acked"), sent, "{context}");
    }
}

/// Regression: with 16 KiB payloads one window filled the write buffer to its high-water mark, the
/// socket took it all at once, and the QoS 0 publisher then waited for readability (nothing
/// comes back at QoS 0) until the run ended: exactly one window sent.
#[test]
fn pubsub_qos0_large_payloads_keep_the_closed_loop_going() {
    let broker = start_mosquitto();
    for payload in ["1024", "16384"] {
        check_closed_loop_keeps_sending(&broker, "fan-out", 1, "0", payload);
        check_closed_loop_keeps_sending(&broker, "pairs", 2, "0", payload);
    }
}

#[test]
fn pubsub_qos1_and_qos2_large_payloads_keep_the_closed_loop_going() {
    let broker = start_mosquitto();
    for qos in ["1", "2"] {
        check_closed_loop_keeps_sending(&broker, "fan-out", 1, qos, "16384");
        check_closed_loop_keeps_sending(&broker, "pairs", 2, qos, "16384");
    }
}

#[test]
fn conn_connects_all_and_reports_broker_memory() {
    let broker = start_mosquitto();
    let pid = broker.child.id().to_string();
    let results = run_scenario(
        &broker,
        &["conn", "--conns", "40", "--rate", "400", "--hold", "0.2", "--broker-pid", &pid],
    );
    assert_eq!(n(&results, "connected"), 40, "{results}");
    assert_eq!(n(&results, "failed"), 0, "{results}");
    assert_eq!(n(&results, "connack_latency_count"), 40, "{results}");
    assert!(n(&results, "broker_rss_bytes_after") > 0, "{results}");
    assert!(results.get("broker_rss_bytes_per_conn").is_some(), "{results}");
}

#[test]
fn conn_across_processes_and_source_addresses_merges_results() {
    let broker = start_mosquitto();
    let results = run_scenario(
        &broker,
        &["conn", "--conns", "30", "--procs", "2", "--src-addrs", "127.0.0.1-127.0.0.2", "--mqtt", "5"],
    );
    assert_eq!(n(&results, "connected"), 30, "{results}");
    assert_eq!(n(&results, "failed"), 0, "{results}");
    assert_eq!(n(&results, "connack_latency_count"), 30, "{results}");
}

#[test]
fn conn_counts_refusals_by_cause() {
    // Nothing listens on a port we just released.
    let port = free_port().to_string();
    let value = run_bench(&["conn", "--conns", "5", "--port", &port, "--threads", "1"]);
    let results = &value["results"];
    assert_eq!(n(results, "connected"), 0, "{value}");
    assert_eq!(n(results, "failed"), 5, "{value}");
    assert_eq!(results["failures"]["refused"], 5, "{value}");
}

#[test]
fn pubsub_and_conn_speak_tls_verified_against_the_ca() {
    let broker = start_mosquitto_with(true);
    let tls_port = broker.tls_port.expect("a TLS listener").to_string();
    let ca = broker.dir.join("ca.pem").display().to_string();
    // A window wider than one TLS record's worth of PUBLISHes, so writes meet a full socket.
    let value = run_bench(&[
        "pubsub",
        "--mode",
        "pairs",
        "--pubs",
        "2",
        "--subs",
        "2",
        "--qos",
        "1",
        "--count",
        "3000",
        "--window",
        "256",
        "--payload",
        "512",
        "--port",
        &tls_port,
        "--threads",
        "2",
        "--tls",
        "--cafile",
        &ca,
    ]);
    assert!(value.get("error").is_none(), "{value}");
    let results = &value["results"];
    assert_eq!(value["params"]["tls"], true, "{value}");
    assert_eq!(n(results, "acked"), 6000, "{results}");
    assert_eq!(n(results, "received"), 6000, "{results}");
    assert_eq!(n(results, "loss"), 0, "{results}");
    assert_eq!(n(results, "duplicates"), 0, "{results}");
    // The server name defaults to --host (an IP address SAN here); --server-name picks the DNS
    // SAN; --procs children inherit the TLS flags.
    for extra in [&[][..], &["--server-name", "localhost", "--procs", "2"][..]] {
        let mut all =
            vec!["conn", "--conns", "20", "--port", &tls_port, "--threads", "2", "--tls", "--cafile", &ca];
        all.extend_from_slice(extra);
        let value = run_bench(&all);
        let results = &value["results"];
        assert_eq!(n(results, "connected"), 20, "{value}");
        assert_eq!(n(results, "failed"), 0, "{value}");
    }
}

#[test]
fn tls_refuses_a_broker_certificate_the_ca_did_not_sign() {
    let broker = start_mosquitto_with(true);
    let tls_port = broker.tls_port.expect("a TLS listener").to_string();
    let cases = [
        (broker.dir.join("other-ca.pem").display().to_string(), "127.0.0.1"),
        (broker.dir.join("ca.pem").display().to_string(), "not-the-broker.example"),
    ];
    for (ca, server_name) in &cases {
        let value = run_bench(&[
            "conn",
            "--conns",
            "3",
            "--port",
            &tls_port,
            "--threads",
            "1",
            "--tls",
            "--cafile",
            ca,
            "--server-name",
            server_name,
        ]);
        let results = &value["results"];
        assert_eq!(n(results, "connected"), 0, "{value}");
        assert_eq!(results["failures"]["tls"], 3, "{value}");
    }
    // --tls without --cafile is refused on the command line: verification cannot be skipped.
    let output = Command::new(env!("CARGO_BIN_EXE_shardmq-bench"))
        .args(["conn", "--conns", "1", "--port", &tls_port, "--tls"])
        .output()
        .expect("running shardmq-bench");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--cafile"), "{output:?}");
}

#[test]
fn persist_drains_everything_queued_while_offline() {
    for mqtt in ["3.1.1", "5"] {
        let broker = start_mosquitto();
        let results =
            run_scenario(&broker, &["persist", "--sessions", "3", "--count", "200", "--mqtt", mqtt]);
        assert_eq!(n(&results, "acked"), 200, "{mqtt}: {results}");
        assert_eq!(n(&results, "delivered"), 600, "{mqtt}: {results}");
        assert_eq!(n(&results, "loss"), 0, "{mqtt}: {results}");
        assert_eq!(n(&results, "session_present"), 3, "{mqtt}: {results}");
    }
}

#[test]
fn churn_reconnects_over_a_client_id_pool() {
    let broker = start_mosquitto();
    let results = run_scenario(&broker, &["churn", "--clients", "3", "--conns", "6", "--count", "60"]);
    assert_eq!(n(&results, "connects"), 60, "{results}");
    assert_eq!(n(&results, "failed"), 0, "{results}");
    // Only the first connect of each id can find no session.
    assert!(n(&results, "session_present") >= 60 - 6, "{results}");
}

#[test]
fn compare_reports_a_missing_shardmq_and_still_shows_mosquitto() {
    let value = run_compare(&[
        "compare",
        "--scenario",
        "pubsub --mode pairs --count 50 --threads 1",
        "--shardmq-bin",
        "/nonexistent/shardmq",
    ]);
    let (table, line) = value;
    assert!(table.contains("| metric | shardmq | mosquitto |"), "{table}");
    assert!(table.contains("**shardmq**: not started"), "{table}");
    assert_eq!(line["brokers"]["mosquitto"]["status"], "ok", "{line}");
    assert_eq!(line["brokers"]["mosquitto"]["median"]["delivered"], 50.0, "{line}");
}

/// Runs `compare` and returns its table (every stdout line but the last) and its JSON line.
fn run_compare(args: &[&str]) -> (String, Value) {
    // `compare` starts Mosquitto itself; check PATH here so a missing broker reads clearly.
    drop(start_mosquitto());
    let child = Command::new(env!("CARGO_BIN_EXE_shardmq-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting shardmq-bench compare");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(output) => output.expect("waiting for compare"),
        Err(_) => {
            // SAFETY: as in `run_bench`: our own unreaped child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            panic!("compare did not finish within {RUN_TIMEOUT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "compare failed: {stdout} {}", String::from_utf8_lossy(&output.stderr));
    let (table, last) = stdout.trim_end().rsplit_once('\n').expect("a table and a JSON line");
    (table.to_string(), serde_json::from_str(last).expect("compare's last line is JSON"))
}
