//! Connection I/O: the tasks that move bytes between one socket and the shard's state machine.
//!
//! Owner: the shard the connection lives on (its home shard after the hand-off). Lifecycle: the
//! accepting shard reads the CONNECT; if the session's home is another shard it hands the socket
//! over through the mesh and forgets it; the home shard runs one reader task (this function) and
//! one writer task per connection until either side closes.
//!
//! Bounds: the read buffer starts at `read_buffer_bytes_min` and grows only as large frames
//! require (at most the maximum packet size), so an idle connection pins a few hundred bytes; the
//! writer encodes at most `write_buffer_bytes_max` per write. Reading pauses while the shard's mesh
//! backlog is over its bound (back-pressure onto TCP).
//!
//! Invariant: no `RefCell` borrow of the shard is held across an await.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use shardmq_protocol::{
    decode, encode, frame_len, Connect, DecodeError, Disconnect, Packet, ProtocolVersion, ReasonCode,
    V3Action,
};
use tracing::{debug, warn};

use crate::auth::{AuthDecision, AuthStep, Credentials, EnhancedAuth, Verdict};
use crate::listener::{parse_proxy, ListenerInfo, ListenerSlot, ProxyHeader, PROXY_V2_LEN_MAX};
use crate::message::TenantId;
use crate::session::{ConnId, SessionKey};
use crate::shard::{home_shard, After, ConnectOutcome, Handoff, MeshMsg, Shard};
use crate::transport::{Flow, LayerError, Layers};

/// The shard state as its tasks share it.
pub type ShardCell = Rc<RefCell<Shard>>;

/// What the session side and the connection tasks share about one connection.
/// Owner: the connection's shard. One per connection: its size is part of the idle-memory figure.
pub struct ConnShared {
    pub id: ConnId,
    pub fd: RawFd,
    version: ProtocolVersion,
    /// `Some(reason)` once closing was asked: `Some(Some(code))` sends a v5 DISCONNECT first.
    closing: Cell<Option<Option<shardmq_protocol::ReasonCode>>>,
    /// When bytes last arrived; the keep-alive queue compares it with `idle_max`.
    last_read: Cell<Instant>,
    /// 1.5 times the keep-alive (MQTT-3.1.2-24); `None` when keep-alive is off.
    idle_max_ms: Cell<Option<std::num::NonZeroU32>>,
    /// Work arrived for the writer since it last looked.
    pending: Cell<bool>,
    /// The write half while no writer task runs. A writer task exists only while there is
    /// something to write: an idle connection holds no writer future (~400 bytes saved each).
    idle_writer: RefCell<Option<OwnedWriteHalf<TcpStream>>>,
    /// The session this connection serves, once CONNECT is accepted.
    session: Cell<Option<SessionKey>>,
    this: std::rc::Weak<ConnShared>,
    shard: std::rc::Weak<RefCell<Shard>>,
    /// The reader, when it waits for the writer to drain the session's control queue.
    reader_waker: Cell<Option<std::task::Waker>>,
    /// The connection's place on its listener, released when the connection's state goes.
    slot: RefCell<Option<ListenerSlot>>,
    /// TLS and WebSocket between the socket and MQTT; `None` on plain TCP.
    layers: RefCell<Option<Box<Layers>>>,
}

impl std::fmt::Debug for ConnShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnShared")
            .field("id", &self.id)
            .field("fd", &self.fd)
            .field("version", &self.version)
            .field("session", &self.session.get())
            .field("closing", &self.closing.get())
            .finish_non_exhaustive()
    }
}

impl ConnShared {
    pub(crate) fn new(id: ConnId, fd: RawFd, version: ProtocolVersion, shard: &ShardCell) -> Rc<ConnShared> {
        let shard = Rc::downgrade(shard);
        Rc::new_cyclic(|this| ConnShared {
            id,
            fd,
            version,
            closing: Cell::new(None),
            last_read: Cell::new(Instant::now()),
            idle_max_ms: Cell::new(None),
            pending: Cell::new(false),
            idle_writer: RefCell::new(None),
            session: Cell::new(None),
            this: this.clone(),
            shard,
            reader_waker: Cell::new(None),
            slot: RefCell::new(None),
            layers: RefCell::new(None),
        })
    }

    /// Hands socket bytes to the connection's layers (see [`through_layers`]; here the writer
    /// task sends what they answer). False when the connection must end.
    fn layers_inbound(&self, raw: BytesMut, mqtt: &mut BytesMut) -> bool {
        let mut layers = self.layers.borrow_mut();
        let Some(layers) = layers.as_mut() else { return false };
        let flow = layers.inbound(raw, mqtt);
        let answer = layers.has_output();
        match flow {
            Ok(Flow::Open) => {
                if answer {
                    self.wake();
                }
                true
            }
            Ok(Flow::Closed) => false,
            Err(error) => {
                layers.count_error(&error);
                false
            }
        }
    }

    /// Passes the MQTT bytes in `out` through the layers, leaving in `out` what goes on the wire
    /// (with anything the layers owed the peer). `goodbye` adds the layers' closing words.
    fn layers_outbound(&self, out: &mut BytesMut, goodbye: bool) -> Result<(), LayerError> {
        match self.layers.borrow_mut().as_mut() {
            Some(layers) => layers.wrap(out, goodbye),
            None => Ok(()),
        }
    }

    /// 1.5 times the keep-alive, as the keep-alive queue compares it.
    fn idle_max(&self) -> Option<Duration> {
        self.idle_max_ms.get().map(|ms| Duration::from_millis(u64::from(ms.get())))
    }

    /// Wakes the reader if it waits for the writer to make progress.
    fn wake_reader(&self) {
        if let Some(waker) = self.reader_waker.take() {
            waker.wake();
        }
    }

    /// Asks the connection to close; the first request's reason wins.
    pub fn close(&self, reason: Option<shardmq_protocol::ReasonCode>) {
        if self.closing.get().is_none() {
            self.closing.set(Some(reason));
        }
        self.wake();
    }

    fn closing(&self) -> Option<Option<shardmq_protocol::ReasonCode>> {
        self.closing.get()
    }

    /// Tells the writer there is work; starts a writer task if none runs.
    pub fn wake(&self) {
        self.pending.set(true);
        let Some(key) = self.session.get() else { return };
        let writer = self.idle_writer.borrow_mut().take();
        if let (Some(writer), Some(this), Some(shard)) = (writer, self.this.upgrade(), self.shard.upgrade()) {
            monoio::spawn(write_task(shard, this, key, writer));
        }
    }
}

/// The keep-alive deadlines of a shard's connections, soonest first.
///
/// Owner: one shard. One entry per connection with keep-alive; an entry whose connection read
/// something since it was queued is re-queued at its new deadline when it comes up, so each
/// connection costs O(log n) once per keep-alive period, and no connection holds a timer of its own
/// (a monoio timer future is 640 bytes, too much for an idle connection).
#[derive(Debug, Default)]
pub struct KeepaliveQueue {
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    conns: std::collections::HashMap<u64, std::rc::Weak<ConnShared>>,
}

impl KeepaliveQueue {
    fn watch(&mut self, conn: &Rc<ConnShared>) {
        if let Some(idle) = conn.idle_max() {
            self.heap.push(std::cmp::Reverse((conn.last_read.get() + idle, conn.id.0)));
            self.conns.insert(conn.id.0, Rc::downgrade(conn));
        }
    }

    /// Closes connections silent for longer than their keep-alive allows (v5: DISCONNECT 0x8D).
    pub fn expire(&mut self, now: Instant) {
        while let Some(std::cmp::Reverse((deadline, id))) = self.heap.peek().copied() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            let Some(conn) = self.conns.get(&id).and_then(|weak| weak.upgrade()) else {
                self.conns.remove(&id);
                continue;
            };
            let Some(idle) = conn.idle_max() else { continue };
            let due = conn.last_read.get() + idle;
            if conn.closing().is_some() {
                self.conns.remove(&id);
            } else if due <= now {
                self.conns.remove(&id);
                let reason = conn.version.is_v5().then_some(shardmq_protocol::ReasonCode::KeepAliveTimeout);
                conn.close(reason);
            } else {
                self.heap.push(std::cmp::Reverse((due, id)));
            }
        }
    }
}

/// Serves a freshly accepted socket: reads its CONNECT, then either hands it to its home shard or
/// runs it here.
pub async fn serve_accepted(
    cell: ShardCell,
    stream: TcpStream,
    listener: Arc<ListenerInfo>,
    slot: ListenerSlot,
) {
    let (cfg, me, shard_count) = {
        let shard = cell.borrow();
        (shard.cfg.clone(), shard.id, shard.shard_count())
    };
    let mut stream = stream;
    let mut buf = BytesMut::with_capacity(cfg.read_buffer_bytes_min);
    let deadline = Instant::now() + cfg.connect_timeout;
    let mut peer = stream.peer_addr().ok();
    if listener.config.proxy_protocol {
        // Boxed: only PROXY listeners read a header (see CONNECT_PHASE_BYTES_MAX in the tests).
        match Box::pin(read_proxy_header(&mut stream, &mut buf, &listener, peer, deadline)).await {
            Some(source) => peer = source.or(peer),
            None => return,
        }
    }
    let mut layers = match listener.new_layers() {
        None => None,
        Some(Ok(mut layers)) => {
            layers.listener = Some(listener.clone());
            Some(layers)
        }
        Some(Err(error)) => {
            listener.count_layer_error(&error);
            warn!(listener = %listener.config.address, peer = ?peer, %error, "connection refused");
            return;
        }
    };
    if let Some(layers) = layers.as_mut() {
        // What followed the PROXY header is the start of the TLS or WebSocket stream.
        let raw = buf.split();
        if !Box::pin(through_layers(&mut stream, layers, raw, &mut buf)).await {
            return;
        }
    }
    let connect = loop {
        // Read before decoding: a failed decode has already split the frame off `buf`.
        let level = peek_connect_level(&buf);
        match decode(&mut buf, ProtocolVersion::V5, cfg.packet_size_bytes_max) {
            Ok(Some(Packet::Connect(connect))) => break connect,
            Ok(Some(other)) => {
                // MQTT-3.1.0-1: the first packet must be CONNECT.
                debug!(packet = ?other.packet_type(), "first packet is not CONNECT");
                bump_protocol_error(&cell);
                return;
            }
            Ok(None) => {}
            Err(error) => {
                Box::pin(refuse_bad_connect(&cell, &mut stream, layers, level, &error)).await;
                return;
            }
        }
        let limit = cfg.packet_size_bytes_max as usize;
        if layers.is_some() {
            if !Box::pin(read_early(&mut stream, &mut layers, &mut buf, limit, deadline)).await {
                return; // closed, failed, refused by a layer or timed out before CONNECT
            }
            continue;
        }
        // Plain TCP, inline: the smallest state for the future every connecting client holds.
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, read_more(&mut stream, buf, limit)).await {
            Ok((Ok(n), back)) if n > 0 => buf = back,
            _ => return, // closed, failed or timed out before CONNECT
        }
    };
    // Boxed, like the rest of the rare paths: this future's size is every connecting client's.
    let client_cert = layers.as_ref().and_then(|layers| layers.client_cert()).map(Box::new);
    let mut connect = connect;
    if connect.username.is_none() {
        // Mutual TLS without a username: the certificate's common name is the username (what
        // Mosquitto's `use_identity_as_username` does), so ACL rules with %u apply to it.
        let name = client_cert.as_ref().and_then(|cert| cert.common_name.as_deref());
        connect.username = name.and_then(|name| shardmq_protocol::Utf8::try_from(name).ok());
    }
    let mut enhanced_outcome = None;
    let credentials = Credentials {
        client_id: connect.client_id.as_str(),
        username: connect.username.as_ref().map(|u| u.as_str()),
        password: connect.password.as_deref(),
        peer,
        default_tenant: listener.config.default_tenant,
        client_cert: client_cert.as_deref(),
    };
    let decision = match connect.properties.authentication_method.as_ref() {
        // MQTT 5 enhanced authentication: AUTH packets until the provider decides.
        Some(method) => match cfg.auth.start_enhanced(method.as_str(), &credentials) {
            None => AuthDecision::BadAuthenticationMethod,
            Some(mut exchange) => {
                let first = connect.properties.authentication_data.clone();
                let limit = cfg.packet_size_bytes_max;
                let io = EarlyIo { stream: &mut stream, layers: &mut layers, buf: &mut buf, limit, deadline };
                let Some((decision, data, username)) =
                    Box::pin(run_exchange(&mut *exchange, method, first, io)).await
                else {
                    return;
                };
                enhanced_outcome = Some(Box::new((data, username)));
                decision
            }
        },
        None => match cfg.auth.begin(&credentials) {
            Verdict::Now(decision) => decision,
            Verdict::Later(pending) => {
                // Bounded by the connect timeout; a provider that never answers refuses the client.
                let left = deadline.saturating_duration_since(Instant::now());
                match Box::pin(monoio::time::timeout(left, pending.wait())).await {
                    Ok(decision) => decision,
                    Err(_) => AuthDecision::NotAuthorized,
                }
            }
        },
    };
    let tenant = match decision {
        AuthDecision::Allow { tenant } => tenant,
        refusal => {
            cell.borrow().stats.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tenant = cfg.auth.tenant_of(&credentials).unwrap_or(listener.config.default_tenant);
            cfg.tenants.state(tenant).auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let reason = refusal.reason_code();
            debug!(client_id = %connect.client_id.as_str(), ?reason, "CONNECT refused by the auth provider");
            cfg.events.event(&crate::events::Event::AuthFailed {
                client_id: connect.client_id.as_str(),
                username: connect.username.as_ref().map(|u| u.as_str()),
                reason: refusal.name(),
                peer,
            });
            let mut properties = shardmq_protocol::Properties::default();
            if let (Some(outcome), true) = (&enhanced_outcome, connect.protocol.is_v5()) {
                properties.authentication_method = connect.properties.authentication_method.clone();
                properties.authentication_data = outcome.0.clone();
            }
            let out = refusal_connack(connect.protocol, reason, properties);
            Box::pin(send_and_close(&mut stream, layers, out)).await;
            return;
        }
    };
    if let Some((data, username)) = enhanced_outcome.map(|outcome| *outcome) {
        // The CONNACK carries the exchange's last data; the name it proved is the username.
        connect.properties.authentication_data = data;
        if let Some(name) = username.and_then(|name| shardmq_protocol::Utf8::try_from(name).ok()) {
            connect.username = Some(name);
        }
    }
    let home = home_shard(tenant, &connect.client_id, shard_count);
    if home != me {
        let fd = stream.into_raw_fd();
        // SAFETY: `into_raw_fd` gave us sole ownership of this open socket descriptor; wrapping it
        // in a std stream transfers that ownership (it is closed exactly once, by whoever holds it
        // last). Exercised by every cross-shard test (tests/ with --cores 2 and 4).
        let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        let handoff =
            Handoff { stream: std_stream, connect, buffered: buf, tenant, peer, slot: Some(slot), layers };
        cell.borrow_mut().outbox.send(home, MeshMsg::Handoff(Box::new(handoff)));
        return;
    }
    // New tasks for the connection's life, so the CONNECT phase's state is freed instead of
    // staying inside a long-lived future (idle memory per connection is a headline figure).
    start(cell, stream, connect, buf, tenant, peer, Some(slot), layers);
}

/// Serves a socket another shard accepted and handed over.
pub async fn serve_handoff(cell: ShardCell, handoff: Handoff) {
    let Handoff { stream, connect, buffered, tenant, peer, slot, layers } = handoff;
    match TcpStream::from_std(stream) {
        Ok(stream) => start(cell, stream, connect, buffered, tenant, peer, slot, layers),
        Err(error) => debug!(%error, "could not adopt handed-off socket"),
    }
}

fn bump_protocol_error(cell: &ShardCell) {
    cell.borrow().stats.protocol_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn bump_malformed(cell: &ShardCell) {
    cell.borrow().stats.malformed_packets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The protocol level of a CONNECT frame at the front of `buf`, read leniently (for choosing the
/// CONNACK format of a CONNECT that failed to decode).
fn peek_connect_level(buf: &[u8]) -> Option<u8> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let mut index = 1;
    while *buf.get(index)? & 0x80 != 0 {
        index += 1;
        if index > 4 {
            return None;
        }
    }
    index += 1;
    let name_len = usize::from(*buf.get(index)?) << 8 | usize::from(*buf.get(index + 1)?);
    buf.get(index + 2 + name_len).copied()
}

/// Answers a CONNECT that failed to decode: a CONNACK where the version allows one, then close.
/// `level` is the protocol level peeked from the frame before it was decoded.
async fn refuse_bad_connect(
    cell: &ShardCell,
    stream: &mut TcpStream,
    layers: Option<Box<Layers>>,
    level: Option<u8>,
    error: &DecodeError,
) {
    bump_malformed(cell);
    debug!(%error, "bad CONNECT");
    let bytes: Option<BytesMut> = match (level, error.v3_action()) {
        (Some(5), _) => Some(refusal_connack(ProtocolVersion::V5, error.reason_code(), Default::default())),
        (_, V3Action::ConnAck(code)) => Some(BytesMut::from(&[0x20, 0x02, 0x00, code][..])),
        (_, V3Action::Close) => None,
    };
    send_and_close(stream, layers, bytes.unwrap_or_default()).await;
}

/// Reads the PROXY header that starts a connection on a PROXY listener, leaving what follows it in
/// `buf`. `Some(source)`: the header's client address (`None` for a LOCAL header); `None`: no valid
/// header in time (refused, counted and logged), close the connection.
async fn read_proxy_header(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    listener: &ListenerInfo,
    peer: Option<std::net::SocketAddr>,
    deadline: Instant,
) -> Option<Option<std::net::SocketAddr>> {
    // The PROXY header comes first; anything else (a plain MQTT client, garbage) is refused.
    loop {
        match parse_proxy(buf) {
            Ok(Some((header, len))) => {
                let _ = buf.split_to(len);
                return Some(match header {
                    ProxyHeader::Proxied(source) => Some(source),
                    ProxyHeader::Local => None,
                });
            }
            Ok(None) => {}
            Err(error) => {
                listener.proxy_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(listener = %listener.config.address, peer = ?peer, %error, "PROXY header refused");
                return None;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, read_more(stream, std::mem::take(buf), PROXY_V2_LEN_MAX + 16)).await
        {
            Ok((Ok(n), back)) if n > 0 => *buf = back,
            _ => return None,
        }
    }
}

/// Reads more MQTT bytes into `buf` before the connection is split (the CONNECT phase), through
/// the layers if any, by `deadline`. False: closed, failed, timed out, or a layer refused.
async fn read_early(
    stream: &mut TcpStream,
    layers: &mut Option<Box<Layers>>,
    buf: &mut BytesMut,
    limit: usize,
    deadline: Instant,
) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let Some(layer) = layers.as_mut() else {
        return match monoio::time::timeout(left, read_more(stream, std::mem::take(buf), limit)).await {
            Ok((Ok(n), back)) if n > 0 => {
                *buf = back;
                true
            }
            _ => false,
        };
    };
    let raw = layer.take_read_buf();
    match monoio::time::timeout(left, read_more(stream, raw, limit)).await {
        Ok((Ok(n), raw)) if n > 0 => through_layers(stream, layer, raw, buf).await,
        _ => false,
    }
}

/// The socket and buffers of a connection before it is split (the CONNECT phase).
struct EarlyIo<'a> {
    stream: &'a mut TcpStream,
    layers: &'a mut Option<Box<Layers>>,
    buf: &'a mut BytesMut,
    limit: u32,
    deadline: Instant,
}

/// AUTH round trips one enhanced authentication may take before the client is refused.
const AUTH_ROUNDS_MAX: usize = 8;

/// Runs an enhanced-authentication exchange before the CONNACK: sends the provider's challenges
/// as AUTH (0x18) and feeds it the client's AUTH answers. Returns the decision, the data for the
/// CONNACK and the name the client proved; `None` when the connection ended, timed out or broke
/// the protocol (answered with CONNACK 0x82 or 0x81): close it.
async fn run_exchange(
    exchange: &mut dyn EnhancedAuth,
    method: &shardmq_protocol::Utf8,
    first: Option<bytes::Bytes>,
    io: EarlyIo<'_>,
) -> Option<(AuthDecision, Option<bytes::Bytes>, Option<String>)> {
    const V5: ProtocolVersion = ProtocolVersion::V5;
    let EarlyIo { stream, layers, buf, limit, deadline } = io;
    let mut data = first;
    for _ in 0..AUTH_ROUNDS_MAX {
        let challenge = match exchange.step(data.as_deref()) {
            AuthStep::Done { decision, data, username } => return Some((decision, data, username)),
            AuthStep::Continue(challenge) => challenge,
        };
        let properties = shardmq_protocol::Properties {
            authentication_method: Some(method.clone()),
            authentication_data: Some(challenge),
            ..Default::default()
        };
        let auth = shardmq_protocol::Auth { reason: ReasonCode::ContinueAuthentication, properties };
        if !send_early(stream, layers, &Packet::Auth(auth), V5).await {
            return None;
        }
        let answer = loop {
            match decode(buf, V5, limit) {
                Ok(Some(packet)) => break packet,
                Ok(None) => {
                    if !read_early(stream, layers, buf, limit as usize, deadline).await {
                        return None;
                    }
                }
                Err(error) => {
                    debug!(%error, "malformed packet during enhanced authentication");
                    refuse_early(stream, layers, error.reason_code()).await;
                    return None;
                }
            }
        };
        match answer {
            Packet::Auth(auth)
                if auth.reason == ReasonCode::ContinueAuthentication
                    && auth.properties.authentication_method.as_ref() == Some(method) =>
            {
                data = auth.properties.authentication_data;
            }
            Packet::Disconnect(_) => return None,
            other => {
                // MQTT-4.12.0-4 / 3.15.2-1: only AUTH with the same method continues the exchange.
                debug!(packet = ?other.packet_type(), "not an AUTH continuing the exchange");
                refuse_early(stream, layers, ReasonCode::ProtocolError).await;
                return None;
            }
        }
    }
    Some((AuthDecision::NotAuthorized, None, None))
}

/// Answers CONNECT-phase misbehaviour with a v5 CONNACK carrying `reason`, then the layers' goodbye.
async fn refuse_early(stream: &mut TcpStream, layers: &mut Option<Box<Layers>>, reason: ReasonCode) {
    let out = refusal_connack(ProtocolVersion::V5, reason, Default::default());
    send_and_close(stream, layers.take(), out).await;
}

/// The CONNACK that refuses a connection with `reason`, encoded for `version`. Empty when a 3.x
/// client cannot be told: a reason without a 3.x return code just closes the connection.
fn refusal_connack(
    version: ProtocolVersion,
    reason: ReasonCode,
    properties: shardmq_protocol::Properties,
) -> BytesMut {
    let mut out = BytesMut::new();
    if version.is_v5() || reason.to_v3_connack().is_some() {
        let connack = shardmq_protocol::ConnAck { session_present: false, reason, properties };
        let _ = encode(&Packet::ConnAck(connack), version, &mut out);
    }
    out
}

/// Writes one packet before the connection is split (the CONNECT phase), through the layers.
async fn send_early(
    stream: &mut TcpStream,
    layers: &mut Option<Box<Layers>>,
    packet: &Packet,
    version: ProtocolVersion,
) -> bool {
    let mut out = BytesMut::new();
    if encode(packet, version, &mut out).is_err() {
        return false;
    }
    if let Some(layers) = layers.as_mut() {
        if layers.wrap(&mut out, false).is_err() {
            return false;
        }
    }
    stream.write_all(out).await.0.is_ok()
}

/// Hands bytes read from the socket (`raw`) to the layers, appending the MQTT bytes they carry to
/// `mqtt`, and writes what the layers answer at once (the socket is not split yet: the CONNECT
/// phase). False when the connection must end: the peer closed the layer, or a layer failed (the
/// failure is counted on the listener and logged).
async fn through_layers(
    stream: &mut TcpStream,
    layers: &mut Layers,
    raw: BytesMut,
    mqtt: &mut BytesMut,
) -> bool {
    let flow = layers.inbound(raw, mqtt);
    if layers.has_output() {
        let mut out = BytesMut::new();
        layers.take_output(&mut out);
        if stream.write_all(out).await.0.is_err() {
            return false;
        }
    }
    match flow {
        Ok(Flow::Open) => true,
        Ok(Flow::Closed) => false,
        Err(error) => {
            layers.count_error(&error);
            false
        }
    }
}

/// Sends `mqtt` bytes (a refusal) on a socket that is not split yet, through its layers, and the
/// layers' goodbye; the caller then drops the socket.
async fn send_and_close(stream: &mut TcpStream, layers: Option<Box<Layers>>, mut out: BytesMut) {
    if let Some(mut layers) = layers {
        let _ = layers.wrap(&mut out, true);
    }
    if !out.is_empty() {
        let _ = stream.write_all(out).await;
    }
}

/// Reads more bytes into the spare capacity of `buf`, growing it first when it is full.
async fn read_more<R: AsyncReadRent>(
    reader: &mut R,
    mut buf: BytesMut,
    limit: usize,
) -> (std::io::Result<usize>, BytesMut) {
    if buf.capacity() == buf.len() {
        // Double, from 256 bytes up to 64 KiB a step: a frame larger than that still completes
        // over several reads, and a fast publisher does not leave a megabyte buffer behind.
        let grow = buf.capacity().clamp(256, limit.clamp(256, READ_GROW_BYTES_MAX));
        buf.reserve(grow);
    }
    let len = buf.len();
    let cap = buf.capacity();
    let (result, slice) = reader.read(buf.slice_mut(len..cap)).await;
    (result, slice.into_inner())
}

/// The most a read buffer grows in one step.
const READ_GROW_BYTES_MAX: usize = 64 * 1024;

/// Starts an accepted connection on its home shard: runs the CONNECT through the shard, then
/// spawns the writer and reader tasks (or a task that sends the refusal). Synchronous, so that no
/// long-lived future carries the CONNECT phase's state.
#[allow(clippy::too_many_arguments)]
fn start(
    cell: ShardCell,
    stream: TcpStream,
    connect: Box<Connect>,
    buf: BytesMut,
    tenant: TenantId,
    peer: Option<std::net::SocketAddr>,
    slot: Option<ListenerSlot>,
    layers: Option<Box<Layers>>,
) {
    let version = connect.protocol;
    let fd = stream.as_raw_fd();
    let _ = stream.set_nodelay(true);
    let (conn_id, packet_size_max) = {
        let mut shard = cell.borrow_mut();
        (shard.new_conn_id(), shard.cfg.packet_size_bytes_max)
    };
    let shared = ConnShared::new(conn_id, fd, version, &cell);
    *shared.slot.borrow_mut() = slot;
    *shared.layers.borrow_mut() = layers;
    let outcome = cell.borrow_mut().connect_as(tenant, *connect, shared.clone(), peer, Instant::now());
    let mut packet_size_max = packet_size_max;
    let (key, keepalive_secs) = match outcome {
        ConnectOutcome::Accepted { session, keepalive_secs } => {
            if let Some(session) = cell.borrow().sessions.get(session) {
                if let Some(tenant_max) = session.settings.max_packet_size {
                    packet_size_max = packet_size_max.min(tenant_max);
                }
            }
            (session, keepalive_secs)
        }
        ConnectOutcome::Refused(reason) => {
            let out = refusal_connack(version, reason, Default::default());
            let layers = shared.layers.borrow_mut().take();
            if !out.is_empty() || layers.is_some() {
                let mut stream = stream;
                monoio::spawn(async move { send_and_close(&mut stream, layers, out).await });
            }
            return;
        }
    };
    if keepalive_secs > 0 {
        // MQTT-3.1.2-24: one and a half times the keep-alive without a packet closes the connection.
        shared.idle_max_ms.set(std::num::NonZeroU32::new(u32::from(keepalive_secs) * 1500));
        cell.borrow_mut().keepalive.watch(&shared);
    }
    let (reader, writer) = stream.into_split();
    *shared.idle_writer.borrow_mut() = Some(writer);
    shared.session.set(Some(key));
    if shared.pending.get() {
        shared.wake(); // CONNACK (and any resends) are waiting
    }
    monoio::spawn(async move {
        let will = read_loop(&cell, &shared, key, reader, buf, packet_size_max).await;
        cell.borrow_mut().disconnected(key, shared.id, will, Instant::now());
        shared.close(None);
    });
}

/// Reads and handles packets until the connection ends. Returns whether the will is due.
async fn read_loop(
    cell: &ShardCell,
    shared: &Rc<ConnShared>,
    key: SessionKey,
    mut reader: OwnedReadHalf<TcpStream>,
    mut buf: BytesMut,
    packet_size_max: u32,
) -> bool {
    let version = shared.version;
    // The tenant's publish limits as of CONNECT: a client over one is not read until its budget
    // refills (TCP pushes back on it; nothing is dropped). Boxed, and absent without limits.
    let (mut throttle, tenant_state) = {
        let shard = cell.borrow();
        let session = shard.sessions.get(key);
        (
            session.and_then(|s| Throttle::new(&s.settings, s.tenant_state.clone(), Instant::now())),
            session.map(|s| s.tenant_state.clone()),
        )
    };
    loop {
        // Handle every complete packet in the buffer, letting other tasks (the writers of the
        // sessions these packets feed) run every `PACKETS_PER_TURN_MAX` packets: one large read
        // must not queue more for a subscriber than its writer had a chance to send.
        let mut handled = 0;
        loop {
            if shared.closing().is_some() {
                return true;
            }
            if handled == PACKETS_PER_TURN_MAX {
                handled = 0;
                yield_now().await;
            }
            handled += 1;
            // Throttle before decoding, so no decoded packet is held across the wait (it would sit
            // in every idle connection's reader future): a complete PUBLISH frame at the front.
            if let Some(throttle) = throttle.as_mut() {
                let publish_len = match frame_len(&buf, packet_size_max) {
                    Ok(Some(len)) if len <= buf.len() && buf.first().is_some_and(|b| b >> 4 == 3) => {
                        Some(len)
                    }
                    _ => None,
                };
                if let Some(len) = publish_len {
                    while let Some((wait, limit, reason)) = throttle.wait(len, Instant::now()) {
                        throttle.state.count(limit);
                        {
                            let shard = cell.borrow();
                            shard.stats.throttled[limit.index()]
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if let Some(session) = shard.sessions.get(key) {
                                shard.cfg.events.event(&crate::events::Event::Throttled {
                                    tenant: session.tenant,
                                    client_id: session.client_id.as_str(),
                                    reason,
                                });
                            }
                        }
                        // Boxed: the sleep is rare, and an unboxed one would sit in every idle
                        // connection's reader future.
                        Box::pin(monoio::time::sleep(wait)).await;
                    }
                }
            }
            match decode(&mut buf, version, packet_size_max) {
                Ok(Some(packet)) => {
                    let after = cell.borrow_mut().handle_packet(key, shared.id, packet, Instant::now());
                    if let After::Close { reason, will } = after {
                        shared.close(reason.filter(|_| version.is_v5()));
                        return will;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    bump_malformed(cell);
                    if let (DecodeError::PacketTooLarge { .. }, Some(state)) = (&error, &tenant_state) {
                        state.count(crate::tenants::Limit::PacketSize);
                    }
                    debug!(%error, "malformed packet");
                    shared.close(version.is_v5().then(|| error.reason_code()));
                    return true;
                }
            }
        }
        wait_for_mesh_room(cell).await;
        wait_for_writer(cell, shared, key).await;
        if shared.layers.borrow().is_some() {
            // Boxed: its state would otherwise sit in every idle plain connection's reader.
            if !Box::pin(read_layered(&mut reader, shared, &mut buf, packet_size_max as usize)).await {
                return true;
            }
            continue;
        }
        let (result, back) = read_more(&mut reader, buf, packet_size_max as usize).await;
        buf = back;
        match result {
            Ok(0) | Err(_) => return true,
            Ok(_) => shared.last_read.set(Instant::now()),
        }
    }
}

/// One read of a TLS or WebSocket connection: socket bytes through its layers into `mqtt`.
/// False when the connection ends.
async fn read_layered(
    reader: &mut OwnedReadHalf<TcpStream>,
    shared: &ConnShared,
    mqtt: &mut BytesMut,
    limit: usize,
) -> bool {
    let Some(raw) = shared.layers.borrow_mut().as_mut().map(|layers| layers.take_read_buf()) else {
        return false;
    };
    let (result, raw) = read_more(reader, raw, limit).await;
    if !matches!(result, Ok(n) if n > 0) {
        return false;
    }
    shared.last_read.set(Instant::now());
    shared.layers_inbound(raw, mqtt)
}

/// A connection's publish limits: messages and bytes per second (token buckets) and the
/// tenant-wide message and byte rates (one-second windows shared by every shard).
#[derive(Debug)]
struct Throttle {
    messages: Option<RateBucket>,
    bytes: Option<RateBucket>,
    tenant_rate: Option<u32>,
    tenant_bytes: Option<u64>,
    state: Arc<crate::tenants::TenantState>,
}

impl Throttle {
    /// `None` (nothing to keep per connection) when the tenant has no publish limit. Boxed: the
    /// reader future of every idle connection carries only the pointer.
    fn new(
        settings: &crate::tenants::TenantSettings,
        state: Arc<crate::tenants::TenantState>,
        now: Instant,
    ) -> Option<Box<Throttle>> {
        let messages =
            settings.max_publish_rate_per_connection.filter(|r| *r > 0).map(|r| RateBucket::new(r, now));
        let bytes =
            settings.max_bytes_per_second_per_connection.filter(|r| *r > 0).map(|r| RateBucket::new(r, now));
        let tenant_rate = settings.max_publish_rate_per_tenant.filter(|r| *r > 0);
        let tenant_bytes = settings.max_bytes_per_second_per_tenant.filter(|r| *r > 0);
        (messages.is_some() || bytes.is_some() || tenant_rate.is_some() || tenant_bytes.is_some())
            .then(|| Box::new(Throttle { messages, bytes, tenant_rate, tenant_bytes, state }))
    }

    /// How long to wait before a PUBLISH of `len` bytes, and which limit says so; `None`: go.
    fn wait(&mut self, len: usize, now: Instant) -> Option<(Duration, crate::tenants::Limit, &'static str)> {
        use crate::tenants::Limit;
        if let Some(wait) = self.messages.as_mut().and_then(|b| b.peek(1.0, now)) {
            return Some((wait, Limit::PublishRate, "publish rate"));
        }
        if let Some(wait) = self.bytes.as_mut().and_then(|b| b.peek(len as f64, now)) {
            return Some((wait, Limit::Bandwidth, "bandwidth"));
        }
        if self.tenant_rate.is_some() || self.tenant_bytes.is_some() {
            let since_epoch =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let second = since_epoch.as_secs();
            let to_next_second =
                Duration::from_secs(1) - Duration::from_nanos(u64::from(since_epoch.subsec_nanos()));
            if let Some(rate) = self.tenant_rate {
                if !self.state.admit_publish(rate, second) {
                    return Some((to_next_second, Limit::TenantPublishRate, "tenant publish rate"));
                }
            }
            if let Some(rate) = self.tenant_bytes {
                if !self.state.admit_bytes(rate, len as u64, second) {
                    if self.tenant_rate.is_some() {
                        self.state.unadmit_publish(second);
                    }
                    return Some((to_next_second, Limit::TenantBandwidth, "tenant bandwidth"));
                }
            }
        }
        // Admitted: spend the per-connection budgets.
        if let Some(b) = self.messages.as_mut() {
            b.spend(1.0);
        }
        if let Some(b) = self.bytes.as_mut() {
            b.spend(len as f64);
        }
        None
    }
}

/// A token bucket: `rate` tokens a second, holding at most one second's worth.
#[derive(Debug)]
struct RateBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl RateBucket {
    fn new(rate: u32, now: Instant) -> RateBucket {
        RateBucket { rate: f64::from(rate), tokens: f64::from(rate), at: now }
    }

    /// Refills, then `Some(wait)` if `cost` tokens (at most a full bucket: a cost larger than one
    /// second's worth waits for a full bucket and then overdraws it) are not there yet.
    fn peek(&mut self, cost: f64, now: Instant) -> Option<Duration> {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        let needed = cost.min(self.rate);
        (self.tokens < needed).then(|| Duration::from_secs_f64((needed - self.tokens) / self.rate))
    }

    fn spend(&mut self, cost: f64) {
        self.tokens -= cost;
    }
}

/// Packets one reader handles before it lets the shard's other tasks run.
const PACKETS_PER_TURN_MAX: usize = 16;

/// Lets every other ready task of this shard run once before continuing.
pub(crate) async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Control packets (acks, PINGRESP, SUBACK...) a session may have waiting for its writer before the
/// reader stops reading: a client that sends without reading its answers gets TCP back-pressure
/// instead of an ever-growing queue in the broker.
const CONTROL_BACKLOG_MAX: usize = 4096;

/// Waits while the session's control queue is over its bound (the writer wakes the reader).
async fn wait_for_writer(cell: &ShardCell, shared: &ConnShared, key: SessionKey) {
    let mut counted = false;
    poll_fn(|cx| {
        let shard = cell.borrow();
        let backlog = shard.sessions.get(key).map_or(0, |session| session.control.len());
        if backlog <= CONTROL_BACKLOG_MAX || shared.closing().is_some() {
            return Poll::Ready(());
        }
        if !counted {
            counted = true;
            shard.stats.reader_backpressure_waits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        shared.reader_waker.set(Some(cx.waker().clone()));
        Poll::Pending
    })
    .await
}

/// Waits while the shard's mesh backlog is over its bound.
async fn wait_for_mesh_room(cell: &ShardCell) {
    poll_fn(|cx| {
        let mut shard = cell.borrow_mut();
        if shard.outbox.backlog_len() <= shard.cfg.mesh_ring_capacity {
            Poll::Ready(())
        } else {
            shard.outbox.wait_for_room(cx.waker());
            Poll::Pending
        }
    })
    .await
}

/// Waits until the shard's log has written everything below `end` (see
/// [`Shard::unwritten_visible`]); woken by the shard's loop when the sync thread reports the write.
async fn wait_written(cell: &ShardCell, end: shardmq_storage::Offset) {
    // Registered once: the entry stays queued until the write (or a failure) wakes it, so a
    // wake for another reason (a delivery, a close) only checks again, and the shard's queue
    // keeps one entry per waiting writer however often it is woken.
    let mut registered = false;
    poll_fn(|cx| {
        let mut shard = cell.borrow_mut();
        let done = if registered { shard.is_written(end) } else { shard.wait_written(end, cx.waker()) };
        registered = true;
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Writes what the session owes the connection, then ends: parking the write half back in
/// [`ConnShared`] when idle, or sending DISCONNECT (v5) and shutting the socket down after a close
/// request.
async fn write_task(
    cell: ShardCell,
    shared: Rc<ConnShared>,
    key: SessionKey,
    mut writer: OwnedWriteHalf<TcpStream>,
) {
    let mut out = BytesMut::new();
    loop {
        shared.pending.set(false);
        loop {
            out.clear();
            let (owns, hold) = {
                let mut shard = cell.borrow_mut();
                let held = shard.output_held(key);
                let owns = shard.fill_output(key, shared.id, &mut out, Instant::now());
                (owns, if held { shard.unwritten_visible() } else { None })
            };
            if let Some(end) = hold {
                wait_written(&cell, end).await;
            }
            if let Err(error) = shared.layers_outbound(&mut out, false) {
                debug!(%error, "cannot send through the connection's layers");
                if shared.closing.get().is_none() {
                    shared.closing.set(Some(None));
                }
                break;
            }
            if out.is_empty() {
                break;
            }
            let (result, back) = writer.write_all(out).await;
            out = back;
            shared.wake_reader();
            if result.is_err() {
                if shared.closing.get().is_none() {
                    shared.closing.set(Some(None));
                }
                break;
            }
            if !owns {
                break;
            }
        }
        if let Some(reason) = shared.closing() {
            // A session that ended (or was saved) at this close is written before the client
            // sees the close.
            let hold = cell.borrow().unwritten_visible();
            if let Some(end) = hold {
                wait_written(&cell, end).await;
            }
            out.clear();
            if let (Some(reason), true) = (reason, shared.version.is_v5()) {
                let _ = encode(&Packet::Disconnect(Disconnect::new(reason)), ProtocolVersion::V5, &mut out);
            }
            let _ = shared.layers_outbound(&mut out, true);
            if !out.is_empty() {
                let _ = writer.write_all(out).await;
            }
            // SAFETY: `shutdown` on a descriptor this connection still owns (the read half keeps it
            // open until the reader task ends); it only ends the TCP streams and does not close the
            // descriptor, so no other file is affected. Exercised by every test that disconnects.
            unsafe {
                libc::shutdown(shared.fd, libc::SHUT_RDWR);
            }
            shared.wake_reader();
            return;
        }
        if !shared.pending.get() {
            // Nothing more to do: park the write half; the next wake starts a new task.
            *shared.idle_writer.borrow_mut() = Some(writer);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Idle memory per connection is a headline figure (issue 3: at most 2 KiB of broker RSS per
    //! idle connection). What an idle connection holds is its reader task (the `read_loop` future),
    //! its session and its `ConnShared`; these budgets keep a change from silently growing them.
    //! The whole-process figure is measured by `shardmq-bench conn` (perf/RESULTS.md).

    use std::sync::Arc;

    use monoio::io::Splitable;

    use super::*;

    #[test]
    fn rate_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = RateBucket::new(10, start);
        // Takes one token the way the reader does: wait if told to, else spend.
        let take = |bucket: &mut RateBucket, now: Instant| {
            let wait = bucket.peek(1.0, now);
            if wait.is_none() {
                bucket.spend(1.0);
            }
            wait
        };
        for _ in 0..10 {
            assert_eq!(take(&mut bucket, start), None, "a second's burst is free");
        }
        let wait = take(&mut bucket, start).expect("the eleventh must wait");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // After waiting, the token is there; a second later the bucket is full again.
        assert_eq!(take(&mut bucket, start + wait), None);
        let later = start + wait + Duration::from_secs(5);
        for _ in 0..10 {
            assert_eq!(take(&mut bucket, later), None);
        }
        assert!(take(&mut bucket, later).is_some(), "never more than one second's worth");
        // A cost above one second's worth waits for a full bucket, then overdraws it.
        let mut bytes = RateBucket::new(100, start);
        assert_eq!(bytes.peek(250.0, start), None);
        bytes.spend(250.0);
        assert!(bytes.peek(1.0, start + Duration::from_secs(1)).is_some(), "the overdraft is repaid first");
    }
    use crate::config::BrokerConfig;
    use crate::mesh::{Mesh, ShardId};

    const READ_LOOP_BYTES_MAX: usize = 512;
    const WRITE_TASK_BYTES_MAX: usize = 512;
    const SESSION_BYTES_MAX: usize = 416;
    const CONNECT_PHASE_BYTES_MAX: usize = 1408;
    const CONN_SHARED_BYTES_MAX: usize = 136;

    #[test]
    fn per_connection_state_stays_within_budget() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
        rt.block_on(async {
            let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let shard = Shard::new(
                ShardId(0),
                Arc::new(BrokerConfig::default()),
                Mesh::new(1, 4),
                Default::default(),
            );
            let cell: ShardCell = Rc::new(RefCell::new(shard));
            let shared = ConnShared::new(ConnId(1), 0, ProtocolVersion::V5, &cell);
            let key = SessionKey { index: 0, generation: 0 };
            let info = Arc::new(
                crate::listener::ListenerInfo::new(
                    0,
                    crate::listener::ListenerConfig::tcp("127.0.0.1:0".parse().unwrap()),
                )
                .unwrap(),
            );
            let other = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            let slot = info.take_slot().unwrap();
            let connect_phase = serve_accepted(cell.clone(), accepted, info.clone(), slot);
            // The CONNECT phase's future is transient, but a connect storm holds thousands at once
            // and the allocator keeps the peak: at 2,816 bytes it added 1.2 KB to the RSS of each
            // of 19,000 idle connections.
            let connect_bytes = std::mem::size_of_val(&connect_phase);
            assert!(
                connect_bytes <= CONNECT_PHASE_BYTES_MAX,
                "serve_accepted future is {connect_bytes} bytes"
            );
            drop((connect_phase, other));
            let (reader, writer) = stream.into_split();
            let read = read_loop(&cell, &shared, key, reader, BytesMut::new(), 1024);
            let read_bytes = std::mem::size_of_val(&read);
            let write = write_task(cell.clone(), shared.clone(), key, writer);
            let write_bytes = std::mem::size_of_val(&write);
            let session_bytes = std::mem::size_of::<crate::session::Session>();
            let shared_bytes = std::mem::size_of::<ConnShared>();
            // 136 bytes is a 144-byte allocation in glibc; one more word moves it to 160.
            assert!(shared_bytes <= CONN_SHARED_BYTES_MAX, "ConnShared is {shared_bytes} bytes");
            assert!(read_bytes <= READ_LOOP_BYTES_MAX, "read_loop future is {read_bytes} bytes");
            assert!(write_bytes <= WRITE_TASK_BYTES_MAX, "write_task future is {write_bytes} bytes");
            assert!(session_bytes <= SESSION_BYTES_MAX, "Session is {session_bytes} bytes");
        });
    }
}
