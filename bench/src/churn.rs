//! Scenario `churn`: a connect/disconnect storm over a fixed pool of client ids, so every
//! reconnect meets (takes over) an existing session on the broker.
//!
//! `--conns` connectors run concurrently; connect number `n` uses client id `n mod --clients`, so
//! with more connectors than ids two connections of one id overlap and the broker must take the
//! older one over. Each connection sends CONNECT (clean start off unless `--clean`, so the session
//! persists between connects), waits for CONNACK, optionally holds for `--hold-ms`, sends
//! DISCONNECT and closes. Reports connects per second, CONNACK latency, how many CONNACKs said the
//! session was present, connections the broker closed while held (taken over), and failures by
//! cause.
//!
//! Bounds: `--conns` tasks, each with at most one connection open at a time.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Map, Value};

use crate::cli::Target;
use crate::engine::{self, Pacer, Phase, PhaseWatch};
use crate::env::Progress;
use crate::mqtt::{connack_cause, failure_cause, Conn, ConnectOptions};
use crate::payload::mono_ns;
use crate::stats::{self, Failures};
use crate::stream::TlsSettings;

/// Flags of `shardmq-bench churn`.
#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub target: Target,
    /// Size of the client-id pool.
    #[arg(long, default_value_t = 100)]
    pub clients: u64,
    /// Concurrent connectors (default: --clients).
    #[arg(long)]
    pub conns: Option<u64>,
    /// Connects per second across everything (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds to churn (default 10 when --count is not given).
    #[arg(long, conflicts_with = "count")]
    pub duration: Option<f64>,
    /// Total connects.
    #[arg(long)]
    pub count: Option<u64>,
    /// Milliseconds to hold each connection before disconnecting.
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// Use clean sessions (default: persistent sessions, taken over by each reconnect).
    #[arg(long)]
    pub clean: bool,
    /// Seconds to wait for TCP connect plus CONNACK.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
}

#[derive(Debug)]
struct Shared {
    args: ChurnArgs,
    addr: std::net::SocketAddr,
    /// `Some` with `--tls`: every connection speaks TLS.
    tls: Option<TlsSettings>,
    options: ConnectOptions,
    threads: usize,
    claimed: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    session_present: AtomicU64,
    taken_over: AtomicU64,
}

#[derive(Debug)]
struct WorkerReport {
    latency: hdrhistogram::Histogram<u64>,
    failures: Failures,
}

/// Runs the scenario and returns `(params, results)`.
pub fn run(args: ChurnArgs) -> anyhow::Result<(Value, Value)> {
    if args.clients == 0 || args.conns == Some(0) {
        anyhow::bail!("--clients and --conns must be at least 1");
    }
    let connectors = args.conns.unwrap_or(args.clients);
    let threads = args.target.threads_for(connectors);
    let shared = Arc::new(Shared {
        addr: args.target.addr()?,
        tls: args.target.tls_settings()?,
        options: ConnectOptions {
            version: args.target.version()?,
            client_id: format!("{}-churn", args.target.client_id_prefix()),
            clean_start: args.clean,
            keep_alive_secs: args.target.keep_alive,
            credentials: args.target.credentials(),
            session_expiry_secs: if args.clean { None } else { Some(300) },
        },
        threads,
        claimed: AtomicU64::new(0),
        connected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        session_present: AtomicU64::new(0),
        taken_over: AtomicU64::new(0),
        args,
    });
    let args = &shared.args;
    let mut params = args.target.to_json();
    let map = params.as_object_mut().expect("target params are an object");
    map.insert("threads".into(), json!(threads));
    map.insert("clients".into(), json!(args.clients));
    map.insert("conns".into(), json!(connectors));
    map.insert("rate_conns_per_sec".into(), json!(args.rate));
    map.insert("duration_secs".into(), json!(args.duration.or(args.count.is_none().then_some(10.0))));
    map.insert("count".into(), json!(args.count));
    map.insert("hold_ms".into(), json!(args.hold_ms));
    map.insert("clean".into(), json!(args.clean));

    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Run);
    let worker_shared = Arc::clone(&shared);
    let handles = engine::spawn_workers(threads, move |thread| {
        worker(Arc::clone(&worker_shared), thread, phase_rx.clone())
    })?;
    let start = Instant::now();
    let mut progress = Progress::new();
    let done = || match args.count {
        Some(count) => {
            shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) >= count
        }
        None => false,
    };
    let limit = match (args.count, args.duration) {
        (Some(_), _) => Duration::MAX / 4,
        (None, duration) => Duration::from_secs_f64(duration.unwrap_or(10.0)),
    };
    engine::wait_until(limit, done, || {
        progress.line(&format!(
            "{:>5.0}s connects {} failed {}",
            start.elapsed().as_secs_f64(),
            shared.connected.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed)
        ))
    });
    let secs = start.elapsed().as_secs_f64();
    let _ = phase_tx.send(Phase::Finish);
    let reports = engine::join_workers(handles)?;
    progress.finish();
    let mut latency = stats::new_histogram();
    let mut failures = Failures::new();
    for report in &reports {
        latency.add(&report.latency).context("merging histograms")?;
        stats::merge_failures(&mut failures, &report.failures);
    }
    let connected = shared.connected.load(Ordering::Relaxed);
    let mut results = Map::new();
    results.insert("connects".into(), json!(connected));
    results.insert("failed".into(), json!(shared.failed.load(Ordering::Relaxed)));
    results.insert("failures".into(), json!(failures));
    results.insert("session_present".into(), json!(shared.session_present.load(Ordering::Relaxed)));
    results.insert("taken_over".into(), json!(shared.taken_over.load(Ordering::Relaxed)));
    results.insert("elapsed_secs".into(), json!((secs * 1000.0).round() / 1000.0));
    results.insert("connect_rate_per_sec".into(), json!(stats::per_sec(connected, secs)));
    stats::insert_latency(&mut results, "connack_latency", &latency);
    Ok((params, Value::Object(results)))
}

async fn worker(shared: Arc<Shared>, thread: usize, phase: PhaseWatch) -> anyhow::Result<WorkerReport> {
    let connectors = shared.args.conns.unwrap_or(shared.args.clients);
    let pacer = Rc::new(Pacer::new(shared.args.rate / shared.threads as f64));
    let latency = Rc::new(std::cell::RefCell::new(stats::new_histogram()));
    let failures = Rc::new(std::cell::RefCell::new(Failures::new()));
    let mut tasks = Vec::new();
    for _ in (0..connectors).filter(|c| *c as usize % shared.threads == thread) {
        let (shared, pacer, latency, failures, phase) = (
            Arc::clone(&shared),
            Rc::clone(&pacer),
            Rc::clone(&latency),
            Rc::clone(&failures),
            phase.clone(),
        );
        tasks.push(tokio::task::spawn_local(async move {
            while *phase.borrow() < Phase::Finish {
                let claim = shared.claimed.fetch_add(1, Ordering::Relaxed);
                if shared.args.count.is_some_and(|count| claim >= count) {
                    break;
                }
                pacer.wait().await;
                let timeout = Duration::from_secs_f64(shared.args.connect_timeout);
                match tokio::time::timeout(timeout, churn_one(&shared, claim % shared.args.clients)).await {
                    Ok(Ok(latency_us)) => {
                        latency.borrow_mut().saturating_record(latency_us);
                        shared.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(cause)) => {
                        *failures.borrow_mut().entry(cause).or_default() += 1;
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        *failures.borrow_mut().entry("timeout".into()).or_default() += 1;
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.context("a connector task panicked")?;
    }
    let latency = latency.replace(stats::new_histogram());
    let failures = failures.replace(Failures::new());
    Ok(WorkerReport { latency, failures })
}

/// One connect / CONNACK / (hold) / DISCONNECT of client id number `id`. Returns the time from the
/// start of the TCP connect to CONNACK, in microseconds.
async fn churn_one(shared: &Shared, id: u64) -> Result<u64, String> {
    let started_ns = mono_ns();
    let stream = crate::stream::connect(shared.addr, None, shared.tls.as_ref())
        .await
        .map_err(|e| crate::mqtt::io_cause(&e).to_string())?;
    let mut conn = Conn::new(stream, shared.options.version, false);
    let mut options = shared.options.clone();
    options.client_id = format!("{}-{id}", options.client_id);
    let connack = conn.handshake(&options).await.map_err(|e| failure_cause(&e))?;
    if connack.reason.is_error() {
        return Err(connack_cause(&connack));
    }
    let latency_us = (mono_ns().saturating_sub(started_ns) / 1000).max(1);
    if connack.session_present {
        shared.session_present.fetch_add(1, Ordering::Relaxed);
    }
    if shared.args.hold_ms > 0 {
        let hold = Duration::from_millis(shared.args.hold_ms);
        if let Ok(packet) = tokio::time::timeout(hold, conn.recv()).await {
            // Anything but silence while held means the broker closed us: a takeover.
            let _ = packet;
            shared.taken_over.fetch_add(1, Ordering::Relaxed);
            return Ok(latency_us);
        }
    }
    conn.disconnect(Duration::from_secs(1)).await;
    Ok(latency_us)
}
