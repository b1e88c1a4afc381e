//! Start-up and shutdown of the shards: one thread per core, each pinned and running a monoio
//! runtime (io_uring with COOP_TASKRUN, or epoll), each accepting on the shared port with
//! SO_REUSEPORT.
//!
//! Owner: the thread that calls [`start`] owns the [`Broker`] handle; each shard thread owns its
//! runtime and its [`Shard`]. Shutdown: [`Broker::stop`] stops shards in reverse start order; each
//! stops accepting, asks its connections to close (v5: DISCONNECT 0x8B), waits for them (bounded),
//! and returns.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use shardmq_protocol::ReasonCode;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::admin::{control_queues, AdminHandle, AdminRequest};
use crate::config::{BrokerConfig, IoDriver};
use crate::conn::{serve_accepted, serve_handoff, ShardCell};
use crate::listener::{ListenerConfig, ListenerInfo};
use crate::mesh::{Mesh, ShardId};
use crate::shard::{recovered_interest, InterestChange, MeshMsg, Shard, ShardStats, SHARDS_MAX};
use crate::store::recovery::{self, DataDir, Recovered};
use crossbeam_channel::Receiver;
use shardmq_storage::DurableNotify;

/// Asks one shard to stop. Owner: shared by the broker handle and the shard.
#[derive(Debug, Default)]
struct StopSignal {
    stopped: AtomicBool,
    waker: AtomicWaker,
}

impl StopSignal {
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            if self.stopped.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.stopped.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// A running broker.
#[derive(Debug)]
pub struct Broker {
    threads: Vec<JoinHandle<()>>,
    stops: Vec<Arc<StopSignal>>,
    /// Per-shard counters, readable without locks.
    pub stats: Vec<Arc<ShardStats>>,
    /// The address the (first) MQTT listener is bound to (with the real port when 0 was asked).
    pub local_addr: SocketAddr,
    /// Every listener's bound address, in configuration order, and its run-time state.
    pub listeners: Vec<Arc<ListenerInfo>>,
    /// The io driver each shard ended up with ("io_uring" or "epoll").
    pub drivers: Vec<&'static str>,
    /// The admin API's way into the shards.
    pub admin: AdminHandle,
    /// The locked data directory (None without persistence); released when the broker is dropped.
    _data_dir: Option<DataDir>,
}

impl Broker {
    /// Stops every shard in reverse start order and waits for their threads.
    pub fn stop(mut self) {
        while let Some(stop) = self.stops.pop() {
            stop.stop();
            if let Some(thread) = self.threads.pop() {
                let _ = thread.join();
            }
        }
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // accept() returns a socket only once its first bytes (the CONNECT) have arrived, so the first
    // read succeeds at once instead of costing a readiness round trip per connection. A socket
    // that sends nothing within the kernel's retries is accepted anyway and meets the connect
    // timeout.
    set_tcp_defer_accept(&socket);
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Sets TCP_DEFER_ACCEPT (1 s) where the kernel supports it; a failure only loses the optimisation.
fn set_tcp_defer_accept(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let seconds: libc::c_int = 1;
    // SAFETY: setsockopt on a socket descriptor we own, with a pointer to a live c_int and its
    // exact size; the kernel only reads it. Failure is harmless (the option is an optimisation)
    // and ignored. Exercised by every test that starts a broker.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Starts the shards. Returns once every shard is listening, or the first start-up error.
pub fn start(cfg: BrokerConfig) -> io::Result<Broker> {
    if cfg.cores == 0 || cfg.cores > SHARDS_MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("--cores must be 1..={SHARDS_MAX}")));
    }
    let configured =
        if cfg.listeners.is_empty() { vec![ListenerConfig::tcp(cfg.listen)] } else { cfg.listeners.clone() };
    // Load every listener's files before binding anything: a bad certificate path is an error
    // naming the file, not a half-started broker.
    let configured = configured
        .into_iter()
        .enumerate()
        .map(|(index, config)| ListenerInfo::new(index, config))
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // Per-tenant traffic counters get one block per shard.
    cfg.tenants.set_shards(cfg.cores);
    let cfg = Arc::new(cfg);
    // Per listener: the first bind resolves port 0; each shard joins the same port through
    // SO_REUSEPORT. `per_shard[s]` is shard s's sockets, one per listener.
    let mut per_shard: Vec<Vec<(std::net::TcpListener, Arc<ListenerInfo>)>> =
        (0..cfg.cores).map(|_| Vec::new()).collect();
    let mut infos = Vec::new();
    for mut info in configured {
        let first = bind_listener(info.config.address).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {}: {e}", info.config.address))
        })?;
        let bound = first.local_addr()?;
        info.config.address = bound;
        let info = Arc::new(info);
        per_shard[0].push((first, info.clone()));
        for shard in per_shard.iter_mut().skip(1) {
            shard.push((bind_listener(bound)?, info.clone()));
        }
        infos.push(info);
    }
    let local_addr = infos[0].config.address;
    let mesh: Arc<Mesh<MeshMsg>> = Mesh::new(cfg.cores, cfg.mesh_ring_capacity);
    let (admin, mut control) = control_queues(mesh.clone());
    control.reverse();
    let (data_dir, mut recovered) = if cfg.persistence {
        let notify = |shard: usize| -> DurableNotify {
            let mesh = mesh.clone();
            Arc::new(move |_| mesh.poke(ShardId(shard as u16)))
        };
        let (dir, shards) = recovery::open(&cfg, &notify).map_err(io::Error::other)?;
        (Some(dir), shards.into_iter().map(Some).collect::<Vec<_>>())
    } else {
        (None, (0..cfg.cores).map(|_| None).collect())
    };
    let interest: Arc<Vec<(ShardId, InterestChange)>> = Arc::new(
        recovered
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
            .flat_map(|(i, r)| recovered_interest(r).into_iter().map(move |c| (ShardId(i as u16), c)))
            .collect(),
    );
    let core_ids = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(usize, &'static str), String>>();
    let mut threads = Vec::new();
    let mut stops = Vec::new();
    let mut stats = Vec::new();
    for (index, listeners) in per_shard.into_iter().enumerate() {
        let stop = Arc::new(StopSignal::default());
        let shard_stats = Arc::new(ShardStats::default());
        let context = ShardContext {
            id: ShardId(index as u16),
            cfg: cfg.clone(),
            mesh: mesh.clone(),
            stop: stop.clone(),
            stats: shard_stats.clone(),
            listeners,
            core: if cfg.pin_cores && !core_ids.is_empty() {
                Some(core_ids[index % core_ids.len()])
            } else {
                None
            },
            ready: ready_tx.clone(),
            recovered: recovered[index].take(),
            control: control.pop().expect("one control queue per shard"),
            interest: interest.clone(),
        };
        let thread =
            std::thread::Builder::new().name(format!("shard-{index}")).spawn(move || run_shard(context))?;
        threads.push(thread);
        stops.push(stop);
        stats.push(shard_stats);
    }
    drop(ready_tx);
    let mut drivers = vec![""; cfg.cores];
    let mut failure = None;
    for _ in 0..cfg.cores {
        match ready_rx.recv() {
            Ok(Ok((index, driver))) => drivers[index] = driver,
            Ok(Err(message)) => failure = Some(message),
            Err(_) => failure = Some("a shard thread died during start-up".to_string()),
        }
    }
    let broker =
        Broker { threads, stops, stats, local_addr, listeners: infos, drivers, admin, _data_dir: data_dir };
    if let Some(message) = failure {
        broker.stop();
        return Err(io::Error::other(message));
    }
    Ok(broker)
}

struct ShardContext {
    id: ShardId,
    cfg: Arc<BrokerConfig>,
    mesh: Arc<Mesh<MeshMsg>>,
    stop: Arc<StopSignal>,
    stats: Arc<ShardStats>,
    listeners: Vec<(std::net::TcpListener, Arc<ListenerInfo>)>,
    core: Option<core_affinity::CoreId>,
    ready: mpsc::Sender<Result<(usize, &'static str), String>>,
    recovered: Option<Recovered>,
    interest: Arc<Vec<(ShardId, InterestChange)>>,
    control: Receiver<AdminRequest>,
}

fn run_shard(context: ShardContext) {
    if let Some(core) = context.core {
        core_affinity::set_for_current(core);
    }
    let driver = context.cfg.io_driver;
    if matches!(driver, IoDriver::Uring | IoDriver::Auto) {
        let mut uring = io_uring::IoUring::builder();
        // Without COOP_TASKRUN the kernel interrupts the shard for every completion; measured
        // ~40% slower than epoll on this kind of VM, and on par or faster with it.
        uring.setup_coop_taskrun();
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(4096)
            .uring_builder(uring)
            .enable_timer()
            .build();
        match built {
            Ok(mut runtime) => {
                runtime.block_on(shard_main(context, "io_uring"));
                return;
            }
            Err(error) if driver == IoDriver::Auto => {
                warn!(shard = context.id.0, %error, "io_uring unavailable, falling back to epoll");
            }
            Err(error) => {
                let _ = context
                    .ready
                    .send(Err(format!("shard {}: cannot build io_uring: {error}", context.id.0)));
                return;
            }
        }
    }
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build() {
        Ok(mut runtime) => runtime.block_on(shard_main(context, "epoll")),
        Err(error) => {
            let _ = context
                .ready
                .send(Err(format!("shard {}: cannot build epoll runtime: {error}", context.id.0)));
        }
    }
}

async fn shard_main(context: ShardContext, driver: &'static str) {
    let ShardContext { id, cfg, mesh, stop, stats, listeners, ready, recovered, interest, control, .. } =
        context;
    let mut adopted = Vec::with_capacity(listeners.len());
    for (listener, info) in listeners {
        match monoio::net::TcpListener::from_std(listener) {
            Ok(listener) => adopted.push((listener, info)),
            Err(error) => {
                let _ = ready.send(Err(format!("shard {}: cannot adopt listener: {error}", id.0)));
                return;
            }
        }
    }
    let shard = Shard::with_store(id, cfg.clone(), mesh.clone(), stats.clone(), recovered, &interest);
    drop(interest);
    let cell: ShardCell = Rc::new(RefCell::new(shard));
    let addresses: Vec<String> = adopted.iter().map(|(_, info)| info.config.address.to_string()).collect();
    info!(shard = id.0, driver, listen = %addresses.join(","), "shard started");
    let _ = ready.send(Ok((id.index(), driver)));
    monoio::spawn(mesh_loop(cell.clone(), mesh.clone(), id, control));
    monoio::spawn(tick_loop(cell.clone()));
    let accepting = Rc::new(std::cell::Cell::new(true));
    for (listener, info) in adopted {
        monoio::spawn(accept_loop(cell.clone(), listener, info, accepting.clone(), id));
    }
    stop.wait().await;
    // The listening sockets close with the runtime; until then, new sockets are closed at once.
    accepting.set(false);
    cell.borrow_mut().close_all(ReasonCode::ServerShuttingDown);
    // Give writers a bounded time to send their DISCONNECT and close.
    let deadline = Instant::now() + Duration::from_secs(2);
    while stats.connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    cell.borrow_mut().close_store();
    info!(shard = id.0, "shard stopped");
}

/// Accepts on one listener until the shard stops.
async fn accept_loop(
    cell: ShardCell,
    listener: monoio::net::TcpListener,
    info: Arc<ListenerInfo>,
    accepting: Rc<std::cell::Cell<bool>>,
    id: ShardId,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                if !accepting.get() {
                    return;
                }
                // A full listener closes the socket at once (before reading anything).
                if let Some(slot) = info.take_slot() {
                    monoio::spawn(serve_accepted(cell.clone(), stream, info.clone(), slot));
                }
            }
            Err(error) => {
                // EMFILE and friends: pause briefly instead of spinning on the error.
                warn!(shard = id.0, %error, "accept failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Drains the mesh rings addressed to this shard, in batches, and flushes this shard's backlog.
async fn mesh_loop(cell: ShardCell, mesh: Arc<Mesh<MeshMsg>>, id: ShardId, control: Receiver<AdminRequest>) {
    const BATCH_MAX: usize = 1024;
    loop {
        let backlog = cell.borrow().outbox.backlog_len();
        if backlog > 0 {
            // A full ring frees only when its receiver drains it: poll for room at a short interval.
            monoio::select! {
                _ = mesh.wait(id) => {},
                _ = monoio::time::sleep(Duration::from_micros(200)) => {},
            }
        } else {
            mesh.wait(id).await;
        }
        let handoffs = {
            let mut shard = cell.borrow_mut();
            let now = Instant::now();
            mesh.drain(id, BATCH_MAX, |from, msg| shard.on_mesh(from, msg, now));
            // Admin requests arrive with a poke; the queue is bounded, so this loop is too.
            while let Ok(request) = control.try_recv() {
                shard.on_admin(request, now);
            }
            shard.poll_durable();
            shard.outbox.flush();
            std::mem::take(&mut shard.handoffs)
        };
        for handoff in handoffs {
            monoio::spawn(serve_handoff(cell.clone(), handoff));
        }
        // Let connection tasks run between batches.
        crate::conn::yield_now().await;
    }
}

/// Runs timers (delayed wills, session expiry) every 100 ms, and flushes the mesh backlog.
async fn tick_loop(cell: ShardCell) {
    loop {
        monoio::time::sleep(Duration::from_millis(100)).await;
        let mut shard = cell.borrow_mut();
        shard.tick(Instant::now());
        shard.outbox.flush();
    }
}
