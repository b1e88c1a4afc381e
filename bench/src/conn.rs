//! Scenario `conn`: a connection storm and hold. Opens `--conns` MQTT connections at `--rate` per
//! second, holds them open with keep-alive PINGREQs, and reports the connect rate achieved, CONNACK
//! latency, failures by cause, and (with `--broker-pid`) the broker's resident memory per
//! connection.
//!
//! Owns: source-address round-robin (`--src-addrs`), splitting the work over `--procs` child
//! processes (the tool re-executes itself with `--child`, a slice of the connection indexes, and a
//! line protocol on stdin/stdout; see [`run`]) and merging their JSON.
//!
//! Bounds: one task per connection and at most `CONNECTS_IN_PROGRESS_MAX` connects in progress per
//! thread; each held connection has empty buffers between keep-alives (see `mqtt.rs`).
//!
//! The child protocol: a child prints `{"event":"connected"}` on stdout once all its connections
//! have been attempted, then holds them until a line (or EOF) arrives on stdin, then prints its
//! result line. The parent measures the broker's RSS between the last child's "connected" and the
//! release, so the figure covers every connection of every process.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use shardmq_protocol::Packet;
use tokio::sync::Semaphore;

use crate::cli::Target;
use crate::engine::{self, wait_phase, Pacer, Phase, PhaseWatch};
use crate::env::Progress;
use crate::mqtt::{connack_cause, failure_cause, Conn, ConnectOptions};
use crate::payload::mono_ns;
use crate::stats::{self, Failures};
use crate::stream::TlsSettings;

/// Connects in progress per worker thread when `--rate` is unlimited.
const CONNECTS_IN_PROGRESS_MAX: usize = 2048;

/// Flags of `shardmq-bench conn`.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    #[command(flatten)]
    pub target: Target,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub conns: u64,
    /// Connects per second across everything (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds to hold all connections open once connected.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
    /// Source addresses to bind, round-robin: `a.b.c.d` or `a.b.c.d-a.b.c.e`, comma-separated.
    #[arg(long)]
    pub src_addrs: Option<String>,
    /// Processes to spread the connections over (the tool re-executes itself).
    #[arg(long, default_value_t = 1)]
    pub procs: u32,
    /// Broker process id: its VmRSS is read before connecting and once all are connected.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Seconds to wait for TCP connect plus CONNACK before counting a timeout.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Internal: run as a child of `--procs`, holding until stdin says release.
    #[arg(long, hide = true)]
    pub child: bool,
    /// Internal: index of this process's first connection.
    #[arg(long, hide = true, default_value_t = 0)]
    pub conn_offset: u64,
}

/// Parses `--src-addrs`.
pub fn parse_src_addrs(text: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut addrs = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let first: Ipv4Addr =
                    first.trim().parse().with_context(|| format!("source address {first:?}"))?;
                let last: Ipv4Addr =
                    last.trim().parse().with_context(|| format!("source address {last:?}"))?;
                let (first, last) = (u32::from(first), u32::from(last));
                if last < first || last - first >= 65_536 {
                    bail!("source address range {part:?} is empty or longer than 65,536");
                }
                addrs.extend((first..=last).map(|a| IpAddr::V4(Ipv4Addr::from(a))));
            }
            None => addrs.push(part.parse().with_context(|| format!("source address {part:?}"))?),
        }
    }
    if addrs.is_empty() {
        bail!("--src-addrs names no address");
    }
    Ok(addrs)
}

/// Reads `VmRSS` of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS line")?;
    let kib: u64 =
        line.split_whitespace().nth(1).context("empty VmRSS line")?.parse().context("VmRSS value")?;
    Ok(kib * 1024)
}

/// Shared by the tasks of one process. Owner: the coordinating thread; workers bump atomics.
#[derive(Debug)]
struct Shared {
    args: ConnArgs,
    addr: SocketAddr,
    /// `Some` with `--tls`: every connection speaks TLS.
    tls: Option<TlsSettings>,
    options: ConnectOptions,
    src_addrs: Vec<IpAddr>,
    threads: usize,
    attempted: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    pings: AtomicU64,
    last_connack_ns: AtomicU64,
}

#[derive(Debug)]
struct WorkerReport {
    latency: Histogram<u64>,
    failures: Failures,
}

/// The figures one process (or the merge of several) measured.
#[derive(Debug)]
struct Outcome {
    attempted: u64,
    connected: u64,
    failed: u64,
    dropped: u64,
    pings: u64,
    connect_secs: f64,
    latency: Histogram<u64>,
    failures: Failures,
}

impl Outcome {
    fn to_json(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("attempted".into(), json!(self.attempted));
        map.insert("connected".into(), json!(self.connected));
        map.insert("failed".into(), json!(self.failed));
        map.insert("failures".into(), json!(self.failures));
        map.insert("dropped_while_held".into(), json!(self.dropped));
        map.insert("pings".into(), json!(self.pings));
        map.insert("connect_secs".into(), json!((self.connect_secs * 1000.0).round() / 1000.0));
        map.insert("connect_rate_per_sec".into(), json!(stats::per_sec(self.connected, self.connect_secs)));
        stats::insert_latency(&mut map, "connack_latency", &self.latency);
        map
    }
}

/// Runs the scenario and returns `(params, results)`. In `--child` mode it also speaks the child
/// protocol on stdin/stdout.
pub fn run(args: ConnArgs) -> anyhow::Result<(Value, Value)> {
    let params = params_json(&args);
    let rss_before = args.broker_pid.map(rss_bytes).transpose()?;
    let (outcome, rss_after) =
        if args.procs > 1 && !args.child { run_parent(&args)? } else { run_local(&args)? };
    let mut results = outcome.to_json();
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        results.insert("broker_rss_bytes_before".into(), json!(before));
        results.insert("broker_rss_bytes_after".into(), json!(after));
        let per_conn = after.saturating_sub(before).checked_div(outcome.connected).unwrap_or(0);
        results.insert("broker_rss_bytes_per_conn".into(), json!(per_conn));
    }
    if args.child {
        results.insert("connack_latency_hist".into(), stats::histogram_buckets_json(&outcome.latency));
    }
    Ok((params, Value::Object(results)))
}

fn params_json(args: &ConnArgs) -> Value {
    let mut params = args.target.to_json();
    let map = params.as_object_mut().expect("target params are an object");
    map.insert("conns".into(), json!(args.conns));
    map.insert("rate_conns_per_sec".into(), json!(args.rate));
    map.insert("hold_secs".into(), json!(args.hold));
    map.insert("src_addrs".into(), json!(args.src_addrs));
    map.insert("procs".into(), json!(args.procs));
    map.insert("broker_pid".into(), json!(args.broker_pid));
    map.insert("connect_timeout_secs".into(), json!(args.connect_timeout));
    params
}

/// Runs this process's share; returns its outcome and the broker RSS once all were connected.
fn run_local(args: &ConnArgs) -> anyhow::Result<(Outcome, Option<u64>)> {
    let threads = args.target.threads_for(args.conns);
    let src_addrs = args.src_addrs.as_deref().map(parse_src_addrs).transpose()?.unwrap_or_default();
    let shared = Arc::new(Shared {
        addr: args.target.addr()?,
        tls: args.target.tls_settings()?,
        options: ConnectOptions {
            version: args.target.version()?,
            client_id: args.target.client_id_prefix(),
            clean_start: true,
            keep_alive_secs: args.target.keep_alive,
            credentials: args.target.credentials(),
            session_expiry_secs: None,
        },
        src_addrs,
        threads,
        attempted: AtomicU64::new(0),
        connected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        pings: AtomicU64::new(0),
        last_connack_ns: AtomicU64::new(0),
        args: args.clone(),
    });
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Setup);
    let start_ns = mono_ns();
    let worker_shared = Arc::clone(&shared);
    let handles = engine::spawn_workers(threads, move |thread| {
        worker(Arc::clone(&worker_shared), thread, phase_rx.clone())
    })?;

    let mut progress = Progress::new();
    let start = Instant::now();
    // Every attempt ends within the connect timeout after its slot; the slots span conns / rate.
    let schedule_secs = if args.rate > 0.0 { args.conns as f64 / args.rate } else { 0.0 };
    let limit = Duration::from_secs_f64(schedule_secs + args.connect_timeout * 2.0 + 60.0);
    let all_done = engine::wait_until(
        limit,
        || shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) >= args.conns,
        || {
            progress.line(&format!(
                "{:>5.0}s connected {} failed {} of {}",
                start.elapsed().as_secs_f64(),
                shared.connected.load(Ordering::Relaxed),
                shared.failed.load(Ordering::Relaxed),
                args.conns
            ))
        },
    );
    progress.finish();
    if !all_done {
        let _ = phase_tx.send(Phase::Finish);
        let _ = engine::join_workers(handles);
        bail!("connections neither completed nor failed within {limit:?}");
    }
    let rss_after = args.broker_pid.map(rss_bytes).transpose()?;
    let _ = phase_tx.send(Phase::Run);
    if args.child {
        println!("{}", json!({ "event": "connected" }));
        std::io::stdout().flush()?;
        // Hold until the parent releases us (a line or EOF on stdin).
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    } else if args.hold > 0.0 {
        let hold = Duration::from_secs_f64(args.hold);
        let held_from = Instant::now();
        engine::wait_until(
            hold,
            || false,
            || progress.line(&format!("holding {:.0}/{:.0}s", held_from.elapsed().as_secs_f64(), args.hold)),
        );
        progress.finish();
    }
    let _ = phase_tx.send(Phase::Finish);
    let reports = engine::join_workers(handles)?;
    let mut latency = stats::new_histogram();
    let mut failures = Failures::new();
    for report in &reports {
        latency.add(&report.latency).context("merging histograms")?;
        stats::merge_failures(&mut failures, &report.failures);
    }
    let last_ns = shared.last_connack_ns.load(Ordering::Relaxed);
    let outcome = Outcome {
        attempted: shared.attempted.load(Ordering::Relaxed),
        connected: shared.connected.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        dropped: shared.dropped.load(Ordering::Relaxed),
        pings: shared.pings.load(Ordering::Relaxed),
        connect_secs: last_ns.saturating_sub(start_ns) as f64 / 1e9,
        latency,
        failures,
    };
    Ok((outcome, rss_after))
}

async fn worker(shared: Arc<Shared>, thread: usize, phase: PhaseWatch) -> anyhow::Result<WorkerReport> {
    let latency = Rc::new(std::cell::RefCell::new(stats::new_histogram()));
    let failures = Rc::new(std::cell::RefCell::new(Failures::new()));
    let pacer = Pacer::new(shared.args.rate / shared.threads as f64);
    let in_progress = Arc::new(Semaphore::new(CONNECTS_IN_PROGRESS_MAX));
    let mut tasks = Vec::new();
    let first = shared.args.conn_offset;
    for index in
        (first..first + shared.args.conns).filter(|i| (i - first) as usize % shared.threads == thread)
    {
        pacer.wait().await;
        let permit = Arc::clone(&in_progress).acquire_owned().await.context("semaphore closed")?;
        if *phase.borrow() >= Phase::Finish {
            break;
        }
        let (shared, latency, failures, phase) =
            (Arc::clone(&shared), Rc::clone(&latency), Rc::clone(&failures), phase.clone());
        tasks.push(tokio::task::spawn_local(async move {
            shared.attempted.fetch_add(1, Ordering::Relaxed);
            let started_ns = mono_ns();
            let timeout = Duration::from_secs_f64(shared.args.connect_timeout);
            let connected = tokio::time::timeout(timeout, connect_one(&shared, index)).await;
            drop(permit);
            let conn = match connected {
                Ok(Ok(Ok(conn))) => conn,
                Ok(Ok(Err(cause))) | Ok(Err(cause)) => {
                    *failures.borrow_mut().entry(cause).or_default() += 1;
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    *failures.borrow_mut().entry("timeout".to_string()).or_default() += 1;
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let now_ns = mono_ns();
            latency.borrow_mut().saturating_record((now_ns.saturating_sub(started_ns) / 1000).max(1));
            shared.last_connack_ns.fetch_max(now_ns, Ordering::Relaxed);
            shared.connected.fetch_add(1, Ordering::Relaxed);
            hold(&shared, conn, phase).await;
        }));
    }
    for task in tasks {
        task.await.context("a connection task panicked")?;
    }
    let latency = latency.replace(stats::new_histogram());
    let failures = failures.replace(BTreeMap::new());
    Ok(WorkerReport { latency, failures })
}

/// Connects connection `index`. The outer error is an I/O or protocol failure already named by
/// cause; the inner `Err` carries a cause name for a refused CONNACK.
async fn connect_one(shared: &Shared, index: u64) -> Result<Result<Conn, String>, String> {
    let source =
        (!shared.src_addrs.is_empty()).then(|| shared.src_addrs[index as usize % shared.src_addrs.len()]);
    let stream = crate::stream::connect(shared.addr, source, shared.tls.as_ref())
        .await
        .map_err(|e| crate::mqtt::io_cause(&e).to_string())?;
    let mut conn = Conn::new(stream, shared.options.version, false);
    let mut options = shared.options.clone();
    options.client_id = format!("{}-c{index}", options.client_id);
    let connack = conn.handshake(&options).await.map_err(|e| failure_cause(&e))?;
    if connack.reason.is_error() {
        return Ok(Err(connack_cause(&connack)));
    }
    Ok(Ok(conn))
}

/// Holds one connection until the run finishes: PINGREQ every keep-alive / 2, count drops.
async fn hold(shared: &Shared, mut conn: Conn, mut phase: PhaseWatch) {
    let keep_alive = match shared.args.target.keep_alive {
        0 => Duration::from_secs(3600),
        secs => Duration::from_secs(u64::from(secs)) / 2,
    };
    let mut next_ping = tokio::time::Instant::now() + keep_alive;
    let outcome: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                biased;
                _ = wait_phase(&mut phase, Phase::Finish) => return Ok(()),
                packet = conn.recv() => match packet? {
                    Packet::PingResp => {}
                    other => bail!("unexpected {:?} on an idle connection", other.packet_type()),
                },
                _ = tokio::time::sleep_until(next_ping) => {
                    conn.queue(&Packet::PingReq)?;
                    conn.flush().await?;
                    shared.pings.fetch_add(1, Ordering::Relaxed);
                    next_ping += keep_alive;
                }
            }
        }
    }
    .await;
    match outcome {
        Ok(()) => conn.disconnect(Duration::from_secs(1)).await,
        Err(_) => {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs `--procs` children, each with a slice of the connections, and merges their results.
fn run_parent(args: &ConnArgs) -> anyhow::Result<(Outcome, Option<u64>)> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let procs = u64::from(args.procs);
    let mut children = Vec::new();
    let (line_tx, line_rx) = std::sync::mpsc::sync_channel::<(usize, String)>(64);
    for index in 0..procs {
        let (offset, count) = engine::slice(args.conns, procs, index);
        let mut command = Command::new(&exe);
        command
            .arg("conn")
            .args(["--host", &args.target.host])
            .args(["--port", &args.target.port.to_string()])
            .args(["--mqtt", &args.target.mqtt])
            .args(["--keep-alive", &args.target.keep_alive.to_string()])
            .args(args.target.tls_args())
            .args(["--conns", &count.to_string()])
            .args(["--conn-offset", &(args.conn_offset + offset).to_string()])
            .args(["--rate", &(args.rate / procs as f64).to_string()])
            .args(["--connect-timeout", &args.connect_timeout.to_string()])
            .arg("--child");
        if let Some(threads) = args.target.threads {
            command.args(["--threads", &threads.to_string()]);
        }
        if let Some(src_addrs) = &args.src_addrs {
            command.args(["--src-addrs", src_addrs]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting child {index}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let line_tx = line_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line_tx.send((index as usize, line)).is_err() {
                    break;
                }
            }
        });
        children.push(child);
    }
    drop(line_tx);

    let mut connected_children = 0;
    let mut results: Vec<Option<Value>> = vec![None; children.len()];
    let mut rss_after = None;
    let mut released = false;
    let deadline = Instant::now()
        + Duration::from_secs_f64(
            if args.rate > 0.0 { args.conns as f64 / args.rate } else { 0.0 }
                + args.connect_timeout * 2.0
                + args.hold
                + 120.0,
        );
    while results.iter().any(Option::is_none) {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let (index, line) = match line_rx.recv_timeout(timeout) {
            Ok(message) => message,
            Err(_) => break,
        };
        let value: Value = match serde_json::from_str(&line) {
            Ok(value) => value,
            Err(_) => continue,
        };
        if value.get("event").and_then(Value::as_str) == Some("connected") {
            connected_children += 1;
            if connected_children == children.len() && !released {
                rss_after = args.broker_pid.map(rss_bytes).transpose()?;
                if args.hold > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(args.hold));
                }
                for child in &mut children {
                    if let Some(mut stdin) = child.stdin.take() {
                        let _ = writeln!(stdin, "release");
                    }
                }
                released = true;
            }
        } else if value.get("results").is_some() {
            results[index] = Some(value);
        }
    }
    for child in &mut children {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    let mut merged = Outcome {
        attempted: 0,
        connected: 0,
        failed: 0,
        dropped: 0,
        pings: 0,
        connect_secs: 0.0,
        latency: stats::new_histogram(),
        failures: Failures::new(),
    };
    for (index, result) in results.iter().enumerate() {
        let Some(result) = result else {
            bail!("child {index} produced no result (see its stderr above)");
        };
        let r = &result["results"];
        let count = |key: &str| r[key].as_u64().unwrap_or(0);
        merged.attempted += count("attempted");
        merged.connected += count("connected");
        merged.failed += count("failed");
        merged.dropped += count("dropped_while_held");
        merged.pings += count("pings");
        merged.connect_secs = merged.connect_secs.max(r["connect_secs"].as_f64().unwrap_or(0.0));
        stats::merge_histogram_buckets(&mut merged.latency, &r["connack_latency_hist"]);
        if let Some(failures) = r["failures"].as_object() {
            for (cause, n) in failures {
                *merged.failures.entry(cause.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
    }
    Ok((merged, rss_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_address_ranges_expand() {
        let addrs = parse_src_addrs("127.0.0.1-127.0.0.3, 10.0.0.9").unwrap();
        let text: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["127.0.0.1", "127.0.0.2", "127.0.0.3", "10.0.0.9"]);
        assert!(parse_src_addrs("127.0.0.3-127.0.0.1").is_err());
        assert!(parse_src_addrs("").is_err());
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}
