//! Scenario `persist`: offline queuing for persistent sessions.
//!
//! Steps: (1) `--sessions` clients connect with a persistent session (3.x: clean session 0 after a
//! clean connect that wipes any leftover; 5: clean start with a session expiry), subscribe at QoS 1
//! to one topic, and disconnect; (2) one publisher publishes `--count` QoS 1 messages there with
//! `--window` in flight ("fill": the broker queues `sessions * count` copies); (3) every session
//! reconnects without clean start and drains its queue, acknowledging each message; (4) each
//! session reconnects clean once more so nothing is left on the broker.
//!
//! Reports fill rate (queued copies per second, and publishes per second), drain rate, loss,
//! duplicates and how many reconnects found their session. Owns only this scenario's flow; the
//! connection, payload and tracking machinery comes from `mqtt.rs`, `payload.rs` and `stats.rs`.
//!
//! Bounds: `--window` (at most 65,535) messages in flight at the publisher; one stream tracker per
//! session.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use shardmq_protocol::{Packet, PubResp, QoS};

use crate::cli::Target;
use crate::engine::{self, wait_phase, Phase, PhaseWatch};
use crate::env::Progress;
use crate::mqtt::{Conn, ConnectOptions, PublishTemplate};
use crate::payload::{mono_ns, Header, HEADER_BYTES};
use crate::stats::{self, PaddedCounter, StreamTotals, StreamTracker};
use crate::stream::TlsSettings;

/// Session expiry asked for by MQTT 5 sessions, seconds.
const SESSION_EXPIRY_SECS: u32 = 3600;

/// Flags of `shardmq-bench persist`.
#[derive(Args, Debug, Clone)]
pub struct PersistArgs {
    #[command(flatten)]
    pub target: Target,
    /// Persistent sessions.
    #[arg(long, default_value_t = 10)]
    pub sessions: u32,
    /// QoS 1 messages published while the sessions are offline.
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Publisher messages in flight (unacknowledged).
    #[arg(long, default_value_t = 64)]
    pub window: u16,
    /// Payload bytes (at least 16).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Seconds without progress after which a step is cut short.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
}

#[derive(Debug)]
struct Shared {
    args: PersistArgs,
    addr: std::net::SocketAddr,
    /// `Some` with `--tls`: every connection speaks TLS.
    tls: Option<TlsSettings>,
    topic: String,
    client_id_prefix: String,
    threads: usize,
    version: shardmq_protocol::ProtocolVersion,
    sessions_ready: AtomicU64,
    sessions_back: AtomicU64,
    sessions_done: AtomicU64,
    session_present: AtomicU64,
    failed: AtomicU64,
    published: AtomicU64,
    acked: AtomicU64,
    publisher_done: AtomicU64,
    received: Vec<PaddedCounter>,
    delivered: Vec<PaddedCounter>,
    last_receipt_ns: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn options(&self, session: u32, clean_start: bool) -> ConnectOptions {
        ConnectOptions {
            version: self.version,
            client_id: format!("{}-persist-{session}", self.client_id_prefix),
            clean_start,
            keep_alive_secs: self.args.target.keep_alive,
            credentials: self.args.target.credentials(),
            session_expiry_secs: Some(SESSION_EXPIRY_SECS),
        }
    }

    fn record_error(&self, error: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 10 {
            errors.push(error);
        }
    }
}

/// Runs the scenario and returns `(params, results)`.
pub fn run(args: PersistArgs) -> anyhow::Result<(Value, Value)> {
    if args.payload < HEADER_BYTES {
        bail!("--payload must be at least {HEADER_BYTES} bytes");
    }
    if args.sessions == 0 || args.window == 0 || args.count > u64::from(u32::MAX) {
        bail!("--sessions and --window must be at least 1, --count at most 2^32 - 1");
    }
    let threads = args.target.threads_for(u64::from(args.sessions) + 1);
    let shared = Arc::new(Shared {
        addr: args.target.addr()?,
        tls: args.target.tls_settings()?,
        topic: format!("{}/persist", args.target.topic_prefix()),
        client_id_prefix: args.target.client_id_prefix(),
        threads,
        version: args.target.version()?,
        sessions_ready: AtomicU64::new(0),
        sessions_back: AtomicU64::new(0),
        sessions_done: AtomicU64::new(0),
        session_present: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        published: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        publisher_done: AtomicU64::new(0),
        received: (0..threads).map(|_| PaddedCounter::default()).collect(),
        delivered: (0..threads).map(|_| PaddedCounter::default()).collect(),
        last_receipt_ns: AtomicU64::new(0),
        errors: Mutex::new(Vec::new()),
        args,
    });
    let args = &shared.args;
    let mut params = args.target.to_json();
    let map = params.as_object_mut().expect("target params are an object");
    map.insert("threads".into(), json!(threads));
    map.insert("sessions".into(), json!(args.sessions));
    map.insert("count".into(), json!(args.count));
    map.insert("window".into(), json!(args.window));
    map.insert("payload_bytes".into(), json!(args.payload));
    map.insert("drain_timeout_secs".into(), json!(args.drain_timeout));

    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Setup);
    let worker_shared = Arc::clone(&shared);
    let handles = engine::spawn_workers(threads, move |thread| {
        worker(Arc::clone(&worker_shared), thread, phase_rx.clone())
    })?;
    let sessions = u64::from(args.sessions);
    let stall = Duration::from_secs_f64(args.drain_timeout);
    let mut progress = Progress::new();
    let fail = |phase_tx: &engine::PhaseSender, handles, what: &str| -> anyhow::Error {
        let _ = phase_tx.send(Phase::Finish);
        let _ = engine::join_workers(handles);
        let errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner()).join("; ");
        anyhow::anyhow!("{what}: {errors}")
    };

    // Step 1: sessions set up and offline.
    let ok = engine::wait_until(
        Duration::from_secs(60),
        || {
            shared.sessions_ready.load(Ordering::Relaxed) == sessions
                || shared.failed.load(Ordering::Relaxed) > 0
        },
        || {
            progress.line(&format!(
                "setup: {}/{sessions} sessions",
                shared.sessions_ready.load(Ordering::Relaxed)
            ))
        },
    );
    if !ok || shared.failed.load(Ordering::Relaxed) > 0 {
        progress.finish();
        return Err(fail(&phase_tx, handles, "session setup failed"));
    }

    // Step 2: fill.
    let fill_start = Instant::now();
    let _ = phase_tx.send(Phase::Run);
    let mut watermark = (0, Instant::now());
    engine::wait_until(
        Duration::MAX / 4,
        || {
            let acked = shared.acked.load(Ordering::Relaxed);
            if acked != watermark.0 {
                watermark = (acked, Instant::now());
            }
            shared.publisher_done.load(Ordering::Relaxed) == 1 || watermark.1.elapsed() >= stall
        },
        || progress.line(&format!("fill: {} of {} acked", shared.acked.load(Ordering::Relaxed), args.count)),
    );
    let fill_secs = fill_start.elapsed().as_secs_f64();
    let acked = shared.acked.load(Ordering::Relaxed);
    if shared.publisher_done.load(Ordering::Relaxed) == 0 {
        progress.finish();
        return Err(fail(&phase_tx, handles, "the publisher stalled"));
    }

    // Step 3: reconnect and drain.
    let drain_start_ns = mono_ns();
    let drain_start = Instant::now();
    let _ = phase_tx.send(Phase::Drain);
    let expected = acked * sessions;
    let mut watermark = (u64::MAX, Instant::now());
    engine::wait_until(
        Duration::MAX / 4,
        || {
            let delivered = stats::sum(&shared.delivered);
            if delivered != watermark.0 {
                watermark = (delivered, Instant::now());
            }
            let done = shared.sessions_done.load(Ordering::Relaxed) == sessions;
            done || (delivered >= expected && shared.sessions_back.load(Ordering::Relaxed) == sessions)
                || watermark.1.elapsed() >= stall
        },
        || {
            progress.line(&format!(
                "drain: {} of {expected} delivered, {}/{sessions} sessions back",
                stats::sum(&shared.delivered),
                shared.sessions_back.load(Ordering::Relaxed)
            ))
        },
    );
    let _ = phase_tx.send(Phase::Finish);
    let totals = engine::join_workers(handles)?;
    progress.finish();
    let mut streams = StreamTotals::default();
    for total in totals {
        streams.merge(total);
    }
    let last_receipt_ns = shared.last_receipt_ns.load(Ordering::Relaxed);
    let drain_secs = if last_receipt_ns > drain_start_ns {
        (last_receipt_ns - drain_start_ns) as f64 / 1e9
    } else {
        drain_start.elapsed().as_secs_f64()
    };
    let delivered = stats::sum(&shared.delivered);
    let results = json!({
        "published": shared.published.load(Ordering::Relaxed),
        "acked": acked,
        "expected": expected,
        "received": stats::sum(&shared.received),
        "delivered": delivered,
        "loss": expected.saturating_sub(delivered),
        "duplicates": streams.duplicates,
        "out_of_order": streams.out_of_order,
        "session_present": shared.session_present.load(Ordering::Relaxed),
        "fill_secs": (fill_secs * 1000.0).round() / 1000.0,
        "fill_msgs_per_sec": stats::per_sec(acked, fill_secs),
        "fill_queued_msgs_per_sec": stats::per_sec(expected, fill_secs),
        "drain_secs": (drain_secs * 1000.0).round() / 1000.0,
        "drain_msgs_per_sec": stats::per_sec(delivered, drain_secs),
        "errors": shared.errors.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    });
    Ok((params, results))
}

async fn worker(shared: Arc<Shared>, thread: usize, phase: PhaseWatch) -> anyhow::Result<StreamTotals> {
    let totals = Rc::new(std::cell::RefCell::new(StreamTotals::default()));
    let mut tasks = Vec::new();
    for session in (0..shared.args.sessions).filter(|s| *s as usize % shared.threads == thread) {
        let (shared, totals, phase) = (Arc::clone(&shared), Rc::clone(&totals), phase.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let mut tracker = StreamTracker::default();
            let mut ready = false;
            let result = run_session(&shared, thread, session, phase, &mut tracker, &mut ready).await;
            if let Err(error) = result {
                shared.record_error(format!("session {session}: {error:#}"));
                if !ready {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            totals.borrow_mut().add(&tracker);
            shared.sessions_done.fetch_add(1, Ordering::Relaxed);
        }));
    }
    if thread == 0 {
        let (shared, phase) = (Arc::clone(&shared), phase.clone());
        tasks.push(tokio::task::spawn_local(async move {
            if let Err(error) = run_publisher(&shared, phase).await {
                shared.record_error(format!("publisher: {error:#}"));
            }
        }));
    }
    for task in tasks {
        task.await.context("a client task panicked")?;
    }
    let totals = *totals.borrow();
    Ok(totals)
}

async fn connect(shared: &Shared, options: &ConnectOptions) -> anyhow::Result<(Conn, bool)> {
    let stream = crate::stream::connect(shared.addr, None, shared.tls.as_ref()).await.context("connect")?;
    let mut conn = Conn::new(stream, shared.version, true);
    let connack = conn.handshake(options).await?;
    if connack.reason.is_error() {
        bail!("CONNACK refused: {:?}", connack.reason);
    }
    Ok((conn, connack.session_present))
}

async fn run_session(
    shared: &Shared,
    thread: usize,
    session: u32,
    mut phase: PhaseWatch,
    tracker: &mut StreamTracker,
    ready: &mut bool,
) -> anyhow::Result<()> {
    let linger = Duration::from_secs(1);
    if !shared.version.is_v5() {
        // A clean connect first, so a leftover session of the same id cannot pre-fill the queue.
        let (mut conn, _) = connect(shared, &shared.options(session, true)).await?;
        conn.disconnect(linger).await;
    }
    // 3.x: clean session 0 makes the session persistent. 5: clean start wipes any leftover and
    // the session expiry keeps the new session after the disconnect.
    let (mut conn, _) = connect(shared, &shared.options(session, shared.version.is_v5())).await?;
    conn.subscribe(&shared.topic, QoS::AtLeastOnce, 1).await?;
    conn.disconnect(linger).await;
    drop(conn);
    *ready = true;
    shared.sessions_ready.fetch_add(1, Ordering::Relaxed);

    if wait_phase(&mut phase, Phase::Drain).await >= Phase::Finish {
        return Ok(());
    }
    let (mut conn, present) = connect(shared, &shared.options(session, false)).await?;
    if present {
        shared.session_present.fetch_add(1, Ordering::Relaxed);
    }
    shared.sessions_back.fetch_add(1, Ordering::Relaxed);
    let expected = shared.acked.load(Ordering::Relaxed);
    let drained: anyhow::Result<()> = async {
        loop {
            let (mut received, mut delivered) = (0, 0);
            while let Some(packet) = conn.next_packet()? {
                match packet {
                    Packet::Publish(publish) => {
                        received += 1;
                        if let Some(header) = Header::parse(&publish.payload) {
                            if tracker.record(header.sequence) != stats::Arrival::Duplicate {
                                delivered += 1;
                            }
                        }
                        if let Some(id) = publish.packet_id {
                            conn.queue(&Packet::PubAck(PubResp::new(id)))?;
                        }
                    }
                    Packet::PingResp => {}
                    other => bail!("unexpected {:?} while draining", other.packet_type()),
                }
            }
            if received > 0 {
                shared.received[thread].add(received);
                shared.delivered[thread].add(delivered);
                shared.last_receipt_ns.fetch_max(mono_ns(), Ordering::Relaxed);
            }
            conn.flush().await?;
            if tracker.unique >= expected {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = wait_phase(&mut phase, Phase::Finish) => return Ok(()),
                readiness = conn.ready() => {
                    if readiness?.is_readable() && !conn.try_read(256 * 1024)? {
                        bail!("broker closed the connection");
                    }
                }
            }
        }
    }
    .await;
    conn.disconnect(linger).await;
    drop(conn);
    // Leave nothing behind: a clean connect (v5: with no expiry) ends the session.
    let mut cleanup = shared.options(session, true);
    cleanup.session_expiry_secs = None;
    if let Ok((mut conn, _)) = connect(shared, &cleanup).await {
        conn.disconnect(linger).await;
    }
    drained
}

async fn run_publisher(shared: &Shared, mut phase: PhaseWatch) -> anyhow::Result<()> {
    let options = ConnectOptions {
        version: shared.version,
        client_id: format!("{}-persist-pub", shared.client_id_prefix),
        clean_start: true,
        keep_alive_secs: shared.args.target.keep_alive,
        credentials: shared.args.target.credentials(),
        session_expiry_secs: None,
    };
    let (mut conn, _) = connect(shared, &options).await?;
    let template =
        PublishTemplate::new(shared.version, &shared.topic, QoS::AtLeastOnce, shared.args.payload)?;
    if wait_phase(&mut phase, Phase::Run).await >= Phase::Finish {
        return Ok(());
    }
    let window = u64::from(shared.args.window);
    let (mut next_id, mut sequence, mut in_flight) = (1u16, 0u64, 0u64);
    while sequence < shared.args.count || in_flight > 0 {
        while sequence < shared.args.count && in_flight < window {
            let header = Header { sent_ns: mono_ns(), publisher_id: 0, sequence: sequence as u32 };
            template.queue(&mut conn, next_id, &header.to_bytes());
            // Acks of a window come back in order from one broker connection, and the window is
            // at most 65,535, so cycling ids never reuses one still in flight.
            next_id = if next_id == u16::MAX { 1 } else { next_id + 1 };
            sequence += 1;
            in_flight += 1;
        }
        shared.published.store(sequence, Ordering::Relaxed);
        conn.flush().await?;
        tokio::select! {
            biased;
            _ = wait_phase(&mut phase, Phase::Finish) => return Ok(()),
            packet = conn.recv() => match packet? {
                Packet::PubAck(_) => {
                    in_flight = in_flight.saturating_sub(1);
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                }
                Packet::PingResp => {}
                other => bail!("unexpected {:?} at the publisher", other.packet_type()),
            },
        }
    }
    shared.publisher_done.store(1, Ordering::Relaxed);
    conn.disconnect(Duration::from_secs(1)).await;
    Ok(())
}
