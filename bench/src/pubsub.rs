//! Scenario `pubsub`: publishers and subscribers in one of four topologies, measuring throughput,
//! end-to-end latency, loss, duplicates and reordering.
//!
//! Owns: the topologies (`fan-in`: every publisher on its own topic, every subscriber on
//! `prefix/in/#`; `fan-out`: every publisher on one topic, every subscriber on it; `pairs`: publisher
//! i to subscriber i on `prefix/pair/i`; `shared`: subscribers in `$share/g/prefix/shared/#`), the
//! publisher loop (open loop at `--rate`, or closed loop with `--window` messages in flight), the
//! subscriber loop (acknowledging QoS 1 and 2), and the run's accounting.
//!
//! The run: every client connects and every subscriber has its SUBACK before any publisher starts;
//! publishers publish until `--count` or `--duration`; publishers then wait for their outstanding
//! acknowledgements; subscribers drain until everything expected has arrived or nothing arrived for
//! a second (bounded by `--drain-timeout`); then everyone disconnects.
//!
//! Bounds: at most `--window` (closed loop) or 65,535 / the broker's receive maximum (open loop,
//! QoS > 0) messages in flight per publisher; a publisher queues at most `BATCH_MAX` messages per
//! loop turn and none while its write buffer is over its high-water mark; per subscriber one
//! 144-byte [`StreamTracker`] per publisher that reaches it.
//!
//! Accounting: `sent` counts PUBLISH frames queued by publishers, `acked` PUBACKs (QoS 1) or
//! PUBCOMPs (QoS 2), `received` every PUBLISH at a subscriber, `delivered` those that were not
//! duplicates of their (publisher, subscriber) stream. `expected` is `sent * subs` for fan-in and
//! fan-out and `sent` for pairs and shared; `loss = expected - delivered` (never negative).
//! Latency is the time from the payload's send stamp (in open loop, the time the message was due,
//! so a publisher that falls behind shows it instead of hiding it) to receipt.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use shardmq_protocol::{Packet, ProtocolVersion, PubResp, QoS};
use tokio::sync::Notify;

use crate::cli::Target;
use crate::engine::{self, wait_phase, Phase, PhaseWatch};
use crate::env::Progress;
use crate::mqtt::{Conn, ConnectOptions, PublishTemplate};
use crate::payload::{mono_ns, Header, HEADER_BYTES};
use crate::stats::{self, PaddedCounter, StreamTotals, StreamTracker};
use crate::stream::TlsSettings;

/// Messages a publisher queues per loop turn before letting its thread's other tasks run.
const BATCH_MAX: u64 = 256;

/// Bytes read per readiness event before other work gets a turn.
const READ_BUDGET_BYTES: usize = 256 * 1024;

/// QoS 0 closed loop: a window slot that sees no receipt for this long is written off (the message
/// was lost or went elsewhere), so loss cannot stall a publisher forever.
const WINDOW_STALL: Duration = Duration::from_secs(1);

/// The longest the setup (connect + subscribe) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors kept verbatim for the report; the rest are only counted.
const ERRORS_KEPT_MAX: usize = 10;

/// Packet ids a publisher may have in flight at once.
const PACKET_IDS_MAX: u32 = 65_535;

/// Topology of a `pubsub` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    FanIn,
    FanOut,
    Pairs,
    Shared,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::FanIn => "fan-in",
            Mode::FanOut => "fan-out",
            Mode::Pairs => "pairs",
            Mode::Shared => "shared",
        }
    }
}

/// Flags of `shardmq-bench pubsub`.
#[derive(Args, Debug, Clone)]
pub struct PubSubArgs {
    #[command(flatten)]
    pub target: Target,
    /// Topology: fan-in, fan-out, pairs or shared.
    #[arg(long, value_enum, default_value = "fan-in")]
    pub mode: Mode,
    /// Publishers.
    #[arg(long, default_value_t = 1)]
    pub pubs: u32,
    /// Subscribers.
    #[arg(long, default_value_t = 1)]
    pub subs: u32,
    /// QoS of every PUBLISH and subscription: 0, 1 or 2.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload bytes (at least 16: send time, publisher id, sequence number).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Open loop: total messages per second across all publishers.
    #[arg(long, conflicts_with = "window")]
    pub rate: Option<f64>,
    /// Closed loop: messages in flight per publisher (unacknowledged; at QoS 0, not yet received
    /// by the subscribers). Default 16 when neither --rate nor --window is given.
    #[arg(long)]
    pub window: Option<u32>,
    /// Seconds to publish (default 10 when --count is not given).
    #[arg(long, conflicts_with = "count")]
    pub duration: Option<f64>,
    /// Messages per publisher.
    #[arg(long)]
    pub count: Option<u64>,
    /// Seconds to wait for acknowledgements and deliveries after publishing stops.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
}

/// State shared by every task of the run, on every thread. Owner: the coordinating thread creates
/// it; workers only bump its atomics.
#[derive(Debug)]
struct Shared {
    args: PubSubArgs,
    version: ProtocolVersion,
    qos: QoS,
    addr: std::net::SocketAddr,
    /// `Some` with `--tls`: every connection speaks TLS.
    tls: Option<TlsSettings>,
    topic_prefix: String,
    client_id_prefix: String,
    threads: usize,
    subs_ready: AtomicU64,
    pubs_ready: AtomicU64,
    setup_failed: AtomicU64,
    pubs_done: AtomicU64,
    sent: Vec<PaddedCounter>,
    acked: Vec<PaddedCounter>,
    received: Vec<PaddedCounter>,
    delivered: Vec<PaddedCounter>,
    receipts: Vec<Receipts>,
    last_send_ns: AtomicU64,
    last_ack_ns: AtomicU64,
    last_receipt_ns: AtomicU64,
    error_count: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// Receipts of one publisher's messages at the subscribers: the QoS 0 closed-loop window.
#[derive(Debug, Default)]
struct Receipts {
    count: AtomicU64,
    notify: Notify,
}

impl Shared {
    fn publish_topic(&self, publisher: u32) -> String {
        let prefix = &self.topic_prefix;
        match self.args.mode {
            Mode::FanIn => format!("{prefix}/in/{publisher}"),
            Mode::FanOut => format!("{prefix}/out"),
            Mode::Pairs => format!("{prefix}/pair/{publisher}"),
            Mode::Shared => format!("{prefix}/shared/{publisher}"),
        }
    }

    fn subscribe_filter(&self, subscriber: u32) -> String {
        let prefix = &self.topic_prefix;
        match self.args.mode {
            Mode::FanIn => format!("{prefix}/in/#"),
            Mode::FanOut => format!("{prefix}/out"),
            Mode::Pairs => format!("{prefix}/pair/{subscriber}"),
            Mode::Shared => format!("$share/g/{prefix}/shared/#"),
        }
    }

    /// How many subscribers receive each message.
    fn copies_per_message(&self) -> u64 {
        match self.args.mode {
            Mode::FanIn | Mode::FanOut => u64::from(self.args.subs),
            Mode::Pairs | Mode::Shared => 1,
        }
    }

    fn record_error(&self, error: String) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < ERRORS_KEPT_MAX {
            errors.push(error);
        }
    }

    fn client_options(&self, client_id: String) -> ConnectOptions {
        ConnectOptions {
            version: self.version,
            client_id,
            clean_start: true,
            keep_alive_secs: self.args.target.keep_alive,
            session_expiry_secs: None,
            credentials: self.args.target.credentials(),
        }
    }

    fn keep_alive_interval(&self) -> Duration {
        match self.args.target.keep_alive {
            0 => Duration::from_secs(3600),
            secs => Duration::from_secs(u64::from(secs)) / 2,
        }
    }
}

/// What one worker thread measured. Owner: the worker's tasks (through `Rc`), then the coordinator.
#[derive(Debug)]
struct WorkerReport {
    latency: Histogram<u64>,
    totals: StreamTotals,
    window_stalls: u64,
    foreign: u64,
}

/// Per-thread accumulators shared by the thread's tasks.
#[derive(Debug)]
struct Local {
    thread: usize,
    latency: RefCell<Histogram<u64>>,
    totals: RefCell<StreamTotals>,
    window_stalls: Cell<u64>,
    foreign: Cell<u64>,
}

/// Runs the scenario and returns `(params, results)`.
pub fn run(args: PubSubArgs) -> anyhow::Result<(Value, Value)> {
    if args.payload < HEADER_BYTES {
        bail!("--payload must be at least {HEADER_BYTES} bytes");
    }
    if args.pubs == 0 || args.subs == 0 {
        bail!("--pubs and --subs must be at least 1");
    }
    if args.mode == Mode::Pairs && args.pubs != args.subs {
        bail!("--mode pairs needs --pubs == --subs");
    }
    if args.rate.is_some_and(|rate| rate <= 0.0) {
        bail!("--rate must be positive");
    }
    if args.window == Some(0) {
        bail!("--window must be at least 1");
    }
    let threads = args.target.threads_for(u64::from(args.pubs) + u64::from(args.subs));
    let shared = Arc::new(Shared {
        version: args.target.version()?,
        qos: QoS::from_u8(args.qos).context("--qos")?,
        addr: args.target.addr()?,
        tls: args.target.tls_settings()?,
        topic_prefix: args.target.topic_prefix(),
        client_id_prefix: args.target.client_id_prefix(),
        threads,
        subs_ready: AtomicU64::new(0),
        pubs_ready: AtomicU64::new(0),
        setup_failed: AtomicU64::new(0),
        pubs_done: AtomicU64::new(0),
        sent: (0..threads).map(|_| PaddedCounter::default()).collect(),
        acked: (0..threads).map(|_| PaddedCounter::default()).collect(),
        received: (0..threads).map(|_| PaddedCounter::default()).collect(),
        delivered: (0..threads).map(|_| PaddedCounter::default()).collect(),
        receipts: (0..args.pubs).map(|_| Receipts::default()).collect(),
        last_send_ns: AtomicU64::new(0),
        last_ack_ns: AtomicU64::new(0),
        last_receipt_ns: AtomicU64::new(0),
        error_count: AtomicU64::new(0),
        errors: Mutex::new(Vec::new()),
        args,
    });
    let params = params_json(&shared);

    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Setup);
    let worker_shared = Arc::clone(&shared);
    let handles = engine::spawn_workers(threads, move |thread| {
        worker(Arc::clone(&worker_shared), thread, phase_rx.clone())
    })?;

    let args = &shared.args;
    let (pubs, subs) = (u64::from(args.pubs), u64::from(args.subs));
    let mut progress = Progress::new();
    let ready = engine::wait_until(
        SETUP_TIMEOUT,
        || {
            shared.setup_failed.load(Ordering::Relaxed) > 0
                || (shared.subs_ready.load(Ordering::Relaxed) == subs
                    && shared.pubs_ready.load(Ordering::Relaxed) == pubs)
        },
        || {
            progress.line(&format!(
                "setup: {}/{subs} subscribers, {}/{pubs} publishers ready",
                shared.subs_ready.load(Ordering::Relaxed),
                shared.pubs_ready.load(Ordering::Relaxed)
            ))
        },
    );
    if !ready || shared.setup_failed.load(Ordering::Relaxed) > 0 {
        let _ = phase_tx.send(Phase::Finish);
        let _ = engine::join_workers(handles);
        progress.finish();
        let errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner()).join("; ");
        if !ready {
            bail!("setup did not finish within {SETUP_TIMEOUT:?}: {errors}");
        }
        bail!("setup failed: {errors}");
    }

    let start_ns = mono_ns();
    let start = Instant::now();
    let _ = phase_tx.send(Phase::Run);
    let drain_timeout = Duration::from_secs_f64(args.drain_timeout);
    let mut last = (0u64, 0u64, 0u64, Instant::now());
    let mut tick = || {
        let (sent, acked, received) =
            (stats::sum(&shared.sent), stats::sum(&shared.acked), stats::sum(&shared.received));
        let secs = last.3.elapsed().as_secs_f64();
        progress.line(&format!(
            "{:>5.0}s sent {sent} ({:.0}/s) acked {acked} ({:.0}/s) received {received} ({:.0}/s)",
            start.elapsed().as_secs_f64(),
            (sent - last.0) as f64 / secs,
            (acked - last.1) as f64 / secs,
            (received - last.2) as f64 / secs,
        ));
        last = (sent, acked, received, Instant::now());
    };
    let pubs_done = || shared.pubs_done.load(Ordering::Relaxed) == pubs;
    let stalled;
    if let Some(duration) = args.duration.or(if args.count.is_none() { Some(10.0) } else { None }) {
        engine::wait_until(Duration::from_secs_f64(duration), pubs_done, &mut tick);
        let _ = phase_tx.send(Phase::StopProducing);
        stalled = !engine::wait_until(drain_timeout, pubs_done, &mut tick);
    } else {
        // Count mode: wait while the publishers make progress; a stall of --drain-timeout ends it.
        let mut watermark = (0u64, Instant::now());
        let mut progressing = || {
            let moved = stats::sum(&shared.sent) + stats::sum(&shared.acked);
            if moved != watermark.0 {
                watermark = (moved, Instant::now());
            }
            pubs_done() || watermark.1.elapsed() >= drain_timeout
        };
        engine::wait_until(Duration::MAX / 4, &mut progressing, &mut tick);
        stalled = !pubs_done();
        let _ = phase_tx.send(Phase::StopProducing);
    }
    let publish_done = Instant::now();

    // Drain: until everything expected is delivered, or a second without a delivery.
    let expected = stats::sum(&shared.sent) * shared.copies_per_message();
    let mut watermark = (u64::MAX, Instant::now());
    let drain_deadline = publish_done + drain_timeout;
    engine::wait_until(
        drain_timeout,
        || {
            let delivered = stats::sum(&shared.delivered);
            if delivered != watermark.0 {
                watermark = (delivered, Instant::now());
            }
            delivered >= expected
                || watermark.1.elapsed() >= Duration::from_secs(1)
                || Instant::now() >= drain_deadline
        },
        &mut tick,
    );
    let _ = phase_tx.send(Phase::Finish);
    let reports = engine::join_workers(handles)?;
    progress.finish();
    let elapsed_secs = start.elapsed().as_secs_f64();

    let mut latency = stats::new_histogram();
    let mut totals = StreamTotals::default();
    let (mut window_stalls, mut foreign) = (0, 0);
    for report in &reports {
        latency.add(&report.latency).context("merging histograms")?;
        totals.merge(report.totals);
        window_stalls += report.window_stalls;
        foreign += report.foreign;
    }
    let sent = stats::sum(&shared.sent);
    let acked = stats::sum(&shared.acked);
    let received = stats::sum(&shared.received);
    let delivered = stats::sum(&shared.delivered);
    let expected = sent * shared.copies_per_message();
    let secs_since_start = |ns: u64| if ns > start_ns { (ns - start_ns) as f64 / 1e9 } else { 0.0 };
    let send_secs = secs_since_start(shared.last_send_ns.load(Ordering::Relaxed));
    let ack_secs = secs_since_start(shared.last_ack_ns.load(Ordering::Relaxed));
    let receive_secs = secs_since_start(shared.last_receipt_ns.load(Ordering::Relaxed));
    let errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();

    let mut results = Map::new();
    results.insert("sent".into(), json!(sent));
    results.insert("acked".into(), json!(acked));
    results.insert("received".into(), json!(received));
    results.insert("delivered".into(), json!(delivered));
    results.insert("expected".into(), json!(expected));
    results.insert("loss".into(), json!(expected.saturating_sub(delivered)));
    results.insert("excess".into(), json!(delivered.saturating_sub(expected)));
    results.insert("duplicates".into(), json!(totals.duplicates));
    results.insert("out_of_order".into(), json!(totals.out_of_order));
    results.insert("foreign".into(), json!(foreign));
    results.insert("window_stalls".into(), json!(window_stalls));
    results.insert("stalled".into(), json!(stalled));
    results.insert("sent_msgs_per_sec".into(), json!(stats::per_sec(sent, send_secs)));
    results.insert("acked_msgs_per_sec".into(), json!(stats::per_sec(acked, ack_secs)));
    results.insert("received_msgs_per_sec".into(), json!(stats::per_sec(received, receive_secs)));
    results.insert("delivered_msgs_per_sec".into(), json!(stats::per_sec(delivered, receive_secs)));
    stats::insert_latency(&mut results, "latency", &latency);
    results.insert("send_secs".into(), json!(round3(send_secs)));
    results.insert("receive_secs".into(), json!(round3(receive_secs)));
    results.insert("elapsed_secs".into(), json!(round3(elapsed_secs)));
    results.insert("error_count".into(), json!(shared.error_count.load(Ordering::Relaxed)));
    results.insert("errors".into(), json!(errors));
    Ok((params, Value::Object(results)))
}

fn round3(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

fn params_json(shared: &Shared) -> Value {
    let args = &shared.args;
    let mut params = args.target.to_json();
    let map = params.as_object_mut().expect("target params are an object");
    map.insert("threads".into(), json!(shared.threads));
    map.insert("mode".into(), json!(args.mode.name()));
    map.insert("pubs".into(), json!(args.pubs));
    map.insert("subs".into(), json!(args.subs));
    map.insert("qos".into(), json!(args.qos));
    map.insert("payload_bytes".into(), json!(args.payload));
    map.insert("rate_msgs_per_sec".into(), json!(args.rate));
    map.insert("window".into(), json!(effective_window(args)));
    map.insert("loop".into(), json!(if args.rate.is_some() { "open" } else { "closed" }));
    map.insert("duration_secs".into(), json!(args.duration.or(args.count.is_none().then_some(10.0))));
    map.insert("count".into(), json!(args.count));
    map.insert("drain_timeout_secs".into(), json!(args.drain_timeout));
    params
}

/// Closed-loop window, or `None` in open loop.
fn effective_window(args: &PubSubArgs) -> Option<u32> {
    match (args.rate, args.window) {
        (Some(_), _) => None,
        (None, Some(window)) => Some(window),
        (None, None) => Some(16),
    }
}

async fn worker(shared: Arc<Shared>, thread: usize, phase: PhaseWatch) -> anyhow::Result<WorkerReport> {
    let local = Rc::new(Local {
        thread,
        latency: RefCell::new(stats::new_histogram()),
        totals: RefCell::new(StreamTotals::default()),
        window_stalls: Cell::new(0),
        foreign: Cell::new(0),
    });
    let mut tasks = Vec::new();
    for subscriber in (0..shared.args.subs).filter(|s| *s as usize % shared.threads == thread) {
        let (shared, local, phase) = (Arc::clone(&shared), Rc::clone(&local), phase.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let mut ready = false;
            if let Err(error) = run_subscriber(&shared, &local, subscriber, phase, &mut ready).await {
                shared.record_error(format!("subscriber {subscriber}: {error:#}"));
                if !ready {
                    shared.setup_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for publisher in (0..shared.args.pubs).filter(|p| *p as usize % shared.threads == thread) {
        let (shared, local, phase) = (Arc::clone(&shared), Rc::clone(&local), phase.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let mut ready = false;
            if let Err(error) = run_publisher(&shared, &local, publisher, phase, &mut ready).await {
                shared.record_error(format!("publisher {publisher}: {error:#}"));
                if !ready {
                    shared.setup_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            shared.pubs_done.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for task in tasks {
        task.await.context("a client task panicked")?;
    }
    let latency = local.latency.replace(stats::new_histogram());
    let totals = *local.totals.borrow();
    Ok(WorkerReport {
        latency,
        totals,
        window_stalls: local.window_stalls.get(),
        foreign: local.foreign.get(),
    })
}

/// The packet ids a publisher has in flight: a 65,536-bit set, so an id is never reused while its
/// handshake is open, whatever order acknowledgements come back in.
#[derive(Debug)]
struct InflightIds {
    used: Vec<u64>,
    count: u32,
    next: u16,
}

impl InflightIds {
    fn new() -> InflightIds {
        InflightIds { used: vec![0; 1024], count: 0, next: 1 }
    }

    fn acquire(&mut self) -> Option<u16> {
        if self.count >= PACKET_IDS_MAX {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if self.next == u16::MAX { 1 } else { self.next + 1 };
            let (word, bit) = (usize::from(id) / 64, id % 64);
            if self.used[word] & (1 << bit) == 0 {
                self.used[word] |= 1 << bit;
                self.count += 1;
                return Some(id);
            }
        }
    }

    /// Frees `id`; false when it was not in flight (a protocol error of the broker).
    fn release(&mut self, id: u16) -> bool {
        let (word, bit) = (usize::from(id) / 64, id % 64);
        if self.used[word] & (1 << bit) == 0 {
            return false;
        }
        self.used[word] &= !(1 << bit);
        self.count -= 1;
        true
    }
}

/// Why a publisher stopped queuing in this loop turn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Blocked {
    Nothing,
    /// Nothing to wait for, but this turn is over (the batch is full, or the socket took the
    /// backlog that stopped it): yield so the thread's other tasks run, then continue.
    Yield,
    /// The write buffer is over its high-water mark: wait for the socket to take more.
    Socket,
    /// The window is full: wait for acknowledgements or receipts.
    Window,
    /// Open loop: the next message is due at this CLOCK_MONOTONIC instant.
    Until(u64),
}

async fn run_publisher(
    shared: &Shared,
    local: &Local,
    publisher: u32,
    mut phase: PhaseWatch,
    ready: &mut bool,
) -> anyhow::Result<()> {
    let args = &shared.args;
    let qos = shared.qos;
    let stream = crate::stream::connect(shared.addr, None, shared.tls.as_ref()).await.context("connect")?;
    let mut conn = Conn::new(stream, shared.version, true);
    let client_id = format!("{}-p{publisher}", shared.client_id_prefix);
    let connack = conn.handshake(&shared.client_options(client_id)).await?;
    if connack.reason.is_error() {
        bail!("CONNACK refused: {:?}", connack.reason);
    }
    let receive_maximum = u32::from(connack.properties.receive_maximum.unwrap_or(u16::MAX));
    let template = PublishTemplate::new(shared.version, &shared.publish_topic(publisher), qos, args.payload)?;
    *ready = true;
    shared.pubs_ready.fetch_add(1, Ordering::Relaxed);
    if wait_phase(&mut phase, Phase::Run).await >= Phase::StopProducing {
        conn.disconnect(Duration::from_secs(1)).await;
        return Ok(());
    }

    let window: u64 = match (qos, effective_window(args)) {
        (QoS::AtMostOnce, None) => u64::MAX,
        (QoS::AtMostOnce, Some(window)) => u64::from(window),
        (_, None) => u64::from(PACKET_IDS_MAX.min(receive_maximum)),
        (_, Some(window)) => u64::from(window.min(PACKET_IDS_MAX).min(receive_maximum)),
    };
    let receipt_window = qos == QoS::AtMostOnce && window != u64::MAX;
    let interval_ns = args.rate.map(|rate| (f64::from(args.pubs) * 1e9 / rate).max(1.0) as u64);
    let count = args.count.unwrap_or(u64::from(u32::MAX) + 1).min(u64::from(u32::MAX) + 1);
    let receipts = &shared.receipts[publisher as usize];
    let copies = shared.copies_per_message();
    let start_ns = mono_ns();
    let mut inflight = InflightIds::new();
    let (mut sequence, mut written_off) = (0u64, 0u64);
    let mut producing = *phase.borrow() < Phase::StopProducing;
    let mut keep_alive = tokio::time::interval(shared.keep_alive_interval());
    keep_alive.tick().await;

    loop {
        let mut acked = 0;
        while let Some(packet) = conn.next_packet()? {
            match packet {
                Packet::PubAck(ack) if qos == QoS::AtLeastOnce => {
                    if !inflight.release(ack.packet_id) {
                        bail!("PUBACK for packet id {} not in flight", ack.packet_id);
                    }
                    acked += 1;
                }
                Packet::PubRec(rec) if qos == QoS::ExactlyOnce => {
                    if rec.reason.is_error() {
                        inflight.release(rec.packet_id);
                        shared.record_error(format!("PUBREC refused: {:?}", rec.reason));
                    } else {
                        conn.queue(&Packet::PubRel(PubResp::new(rec.packet_id)))?;
                    }
                }
                Packet::PubComp(comp) if qos == QoS::ExactlyOnce => {
                    if !inflight.release(comp.packet_id) {
                        bail!("PUBCOMP for packet id {} not in flight", comp.packet_id);
                    }
                    acked += 1;
                }
                Packet::PingResp => {}
                Packet::Disconnect(disconnect) => bail!("broker sent DISCONNECT {:?}", disconnect.reason),
                other => bail!("unexpected {:?} at a publisher", other.packet_type()),
            }
        }
        if acked > 0 {
            shared.acked[local.thread].add(acked);
            shared.last_ack_ns.fetch_max(mono_ns(), Ordering::Relaxed);
        }

        let mut blocked = Blocked::Nothing;
        if producing {
            let mut batch = 0;
            loop {
                if sequence >= count {
                    producing = false;
                    break;
                }
                if batch == BATCH_MAX {
                    blocked = Blocked::Yield;
                    break;
                }
                if conn.write_backlogged() {
                    blocked = Blocked::Socket;
                    break;
                }
                let in_flight = if receipt_window {
                    sequence.saturating_sub(receipts.count.load(Ordering::Relaxed) / copies + written_off)
                } else if qos == QoS::AtMostOnce {
                    0
                } else {
                    u64::from(inflight.count)
                };
                if in_flight >= window {
                    blocked = Blocked::Window;
                    break;
                }
                let now_ns = mono_ns();
                let sent_ns = match interval_ns {
                    Some(interval) => {
                        let due_ns = start_ns + sequence * interval;
                        if due_ns > now_ns {
                            blocked = Blocked::Until(due_ns);
                            break;
                        }
                        due_ns
                    }
                    None => now_ns,
                };
                let packet_id = if qos == QoS::AtMostOnce {
                    0
                } else {
                    inflight.acquire().context("no free packet id although the window has room")?
                };
                let header = Header { sent_ns, publisher_id: publisher, sequence: sequence as u32 };
                template.queue(&mut conn, packet_id, &header.to_bytes());
                sequence += 1;
                batch += 1;
            }
            if batch > 0 {
                shared.sent[local.thread].add(batch);
                shared.last_send_ns.fetch_max(mono_ns(), Ordering::Relaxed);
            }
        }
        conn.try_write()?;
        if blocked == Blocked::Socket && !conn.write_backlogged() {
            // The write above took the backlog. Waiting now would wait for nothing: with the
            // buffer under its high-water mark `ready` awaits readability only, and a QoS 0
            // publisher reads nothing, so it would sleep until the run ends.
            blocked = Blocked::Yield;
        }
        if !producing && !conn.has_pending_writes() && inflight.count == 0 {
            break;
        }

        let until = match blocked {
            Blocked::Until(due_ns) => Instant::now() + Duration::from_nanos(due_ns.saturating_sub(mono_ns())),
            _ => Instant::now(),
        };
        let waiting_for_receipts = receipt_window && blocked == Blocked::Window;
        // Every wait below has something that ends it: a socket wait needs a backlog (so `ready`
        // awaits writability), a window wait needs an acknowledgement or a receipt to come.
        debug_assert!(blocked != Blocked::Socket || conn.write_backlogged(), "socket wait without a backlog");
        debug_assert!(
            blocked != Blocked::Window || waiting_for_receipts || inflight.count > 0,
            "window wait with nothing in flight"
        );
        tokio::select! {
            biased;
            changed = phase.changed() => {
                let now = if changed.is_ok() { *phase.borrow() } else { Phase::Finish };
                if now >= Phase::StopProducing {
                    producing = false;
                }
                if now >= Phase::Finish {
                    break;
                }
            }
            readiness = conn.ready() => {
                if readiness?.is_readable() && !conn.try_read(READ_BUDGET_BYTES)? {
                    bail!("broker closed the connection");
                }
            }
            _ = tokio::time::sleep_until(until.into()), if matches!(blocked, Blocked::Until(_)) => {}
            _ = receipts.notify.notified(), if waiting_for_receipts => {}
            _ = tokio::time::sleep(WINDOW_STALL), if waiting_for_receipts => {
                written_off += 1;
                local.window_stalls.set(local.window_stalls.get() + 1);
            }
            _ = tokio::task::yield_now(), if blocked == Blocked::Yield => {}
            _ = keep_alive.tick() => conn.queue(&Packet::PingReq)?,
        }
    }
    conn.disconnect(Duration::from_secs(1)).await;
    Ok(())
}

async fn run_subscriber(
    shared: &Shared,
    local: &Local,
    subscriber: u32,
    mut phase: PhaseWatch,
    ready: &mut bool,
) -> anyhow::Result<()> {
    let stream = crate::stream::connect(shared.addr, None, shared.tls.as_ref()).await.context("connect")?;
    let mut conn = Conn::new(stream, shared.version, true);
    let client_id = format!("{}-s{subscriber}", shared.client_id_prefix);
    let connack = conn.handshake(&shared.client_options(client_id)).await?;
    if connack.reason.is_error() {
        bail!("CONNACK refused: {:?}", connack.reason);
    }
    conn.subscribe(&shared.subscribe_filter(subscriber), shared.qos, 1).await?;
    *ready = true;
    shared.subs_ready.fetch_add(1, Ordering::Relaxed);

    let publishers = shared.args.pubs as usize;
    let notify_publishers = shared.qos == QoS::AtMostOnce && effective_window(&shared.args).is_some();
    let mut streams: Vec<Option<Box<StreamTracker>>> = vec![None; publishers];
    let mut keep_alive = tokio::time::interval(shared.keep_alive_interval());
    keep_alive.tick().await;
    let result = async {
        loop {
            let (mut received, mut delivered) = (0u64, 0u64);
            while let Some(packet) = conn.next_packet()? {
                match packet {
                    Packet::Publish(publish) => {
                        received += 1;
                        let now_ns = mono_ns();
                        match Header::parse(&publish.payload)
                            .filter(|h| (h.publisher_id as usize) < publishers)
                        {
                            Some(header) => {
                                let latency_us = now_ns.saturating_sub(header.sent_ns) / 1000;
                                local.latency.borrow_mut().saturating_record(latency_us.max(1));
                                let tracker =
                                    streams[header.publisher_id as usize].get_or_insert_with(Box::default);
                                if tracker.record(header.sequence) != stats::Arrival::Duplicate {
                                    delivered += 1;
                                    let receipts = &shared.receipts[header.publisher_id as usize];
                                    receipts.count.fetch_add(1, Ordering::Relaxed);
                                    if notify_publishers {
                                        receipts.notify.notify_one();
                                    }
                                }
                            }
                            None => local.foreign.set(local.foreign.get() + 1),
                        }
                        match (publish.qos, publish.packet_id) {
                            (QoS::AtLeastOnce, Some(id)) => conn.queue(&Packet::PubAck(PubResp::new(id)))?,
                            (QoS::ExactlyOnce, Some(id)) => conn.queue(&Packet::PubRec(PubResp::new(id)))?,
                            _ => {}
                        }
                    }
                    Packet::PubRel(rel) => conn.queue(&Packet::PubComp(PubResp::new(rel.packet_id)))?,
                    Packet::PingResp => {}
                    Packet::Disconnect(disconnect) => bail!("broker sent DISCONNECT {:?}", disconnect.reason),
                    other => bail!("unexpected {:?} at a subscriber", other.packet_type()),
                }
            }
            if received > 0 {
                shared.received[local.thread].add(received);
                shared.delivered[local.thread].add(delivered);
                shared.last_receipt_ns.fetch_max(mono_ns(), Ordering::Relaxed);
            }
            conn.try_write()?;
            tokio::select! {
                biased;
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow() >= Phase::Finish {
                        return Ok(());
                    }
                }
                readiness = conn.ready() => {
                    if readiness?.is_readable() && !conn.try_read(READ_BUDGET_BYTES)? {
                        bail!("broker closed the connection");
                    }
                }
                _ = keep_alive.tick() => conn.queue(&Packet::PingReq)?,
            }
        }
    }
    .await;
    {
        let mut totals = local.totals.borrow_mut();
        for tracker in streams.iter().flatten() {
            totals.add(tracker);
        }
    }
    if result.is_ok() {
        conn.disconnect(Duration::from_secs(1)).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_ids_are_unique_until_released() {
        let mut ids = InflightIds::new();
        let first = ids.acquire().unwrap();
        let second = ids.acquire().unwrap();
        assert_ne!(first, second);
        assert!(ids.release(first));
        assert!(!ids.release(first));
        for _ in 0..PACKET_IDS_MAX - 1 {
            assert_ne!(ids.acquire(), Some(second));
        }
        assert_eq!(ids.acquire(), None, "all 65,535 ids are in flight");
        assert!(ids.release(second));
        assert_eq!(ids.acquire(), Some(second));
    }
}
