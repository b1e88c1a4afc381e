//! One MQTT client connection over a non-blocking [`Stream`] (plain TCP or TLS, see `stream.rs`),
//! encoded and decoded with `shardmq-protocol`.
//!
//! Owns: the stream, its read buffer and its write buffer, the CONNECT/CONNACK and SUBSCRIBE/SUBACK exchanges, and the PUBLISH frame template that
//! lets a publisher emit a message without building a `Packet` per message.
//!
//! Does not own: what a scenario does with the packets (the scenario modules do that), timing, or
//! statistics.
//!
//! Invariants and bounds:
//! - An inbound packet larger than [`PACKET_SIZE_MAX_BYTES`] is a protocol error: the read buffer is
//!   therefore bounded by that plus one read chunk.
//! - Producers stop adding to the write buffer once [`Conn::write_backlogged`] is true (at
//!   [`WRITE_BUFFER_HIGH_WATER_BYTES`]), and [`Conn::ready`] stops reading (so stops queuing
//!   replies) while it is, so the buffer is bounded by that plus one batch or one read's replies.
//! - A connection starts with empty buffers (no allocation until a byte moves), so idle
//!   connections of the `conn` scenario cost only their task and socket.

use std::io;
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::{Bytes, BytesMut};
use shardmq_protocol::{
    decode, encode, ConnAck, Connect, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, Subscribe, Subscription, SubscriptionOptions, Utf8,
};
use tokio::io::{Interest, Ready};

use crate::stream::{is_tls_error, Stream};

/// Largest inbound packet accepted; PUBLISH payloads of a benchmark are far smaller.
pub const PACKET_SIZE_MAX_BYTES: u32 = 16 * 1024 * 1024;

/// Producers stop queuing once this many bytes wait to be written.
pub const WRITE_BUFFER_HIGH_WATER_BYTES: usize = 256 * 1024;

/// Bytes reserved before each read on a busy connection.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Bytes reserved before each read on an idle (connection-storm) connection: a CONNACK or PINGRESP.
const READ_CHUNK_SMALL_BYTES: usize = 64;

/// Parses `3.1`, `3.1.1` or `5` (also `5.0`, `4`, `3`).
pub fn parse_version(text: &str) -> anyhow::Result<ProtocolVersion> {
    Ok(match text {
        "3.1" | "3" => ProtocolVersion::V3_1,
        "3.1.1" | "4" => ProtocolVersion::V3_1_1,
        "5" | "5.0" => ProtocolVersion::V5,
        other => bail!("unknown MQTT version {other:?}: use 3.1, 3.1.1 or 5"),
    })
}

/// What a client puts in its CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub version: ProtocolVersion,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive_secs: u16,
    /// MQTT 5 session expiry interval; ignored for 3.x (where `clean_start == false` persists).
    pub session_expiry_secs: Option<u32>,
    /// User name and password, if the run has them.
    pub credentials: Option<(String, String)>,
}

/// An MQTT client connection: a socket plus bounded read and write buffers.
///
/// Owner: the one task that created it, on one worker thread. Lifecycle: TCP connect, CONNECT /
/// CONNACK ([`Conn::handshake`]), traffic, then DISCONNECT or drop.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
    version: ProtocolVersion,
    read_buf: BytesMut,
    write_buf: BytesMut,
    read_chunk_bytes: usize,
}

impl Conn {
    /// Wraps a connected stream. `busy` picks a large read chunk (data-path clients) or a tiny one
    /// (idle clients held open by the `conn` scenario).
    pub fn new(stream: Stream, version: ProtocolVersion, busy: bool) -> Conn {
        Conn {
            stream,
            version,
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            read_chunk_bytes: if busy { READ_CHUNK_BYTES } else { READ_CHUNK_SMALL_BYTES },
        }
    }

    /// Sends CONNECT and waits for CONNACK. Returns the CONNACK whatever its reason code; the
    /// caller decides whether a refusal is an error.
    pub async fn handshake(&mut self, options: &ConnectOptions) -> anyhow::Result<ConnAck> {
        let mut properties = Properties::default();
        if options.version.is_v5() {
            properties.session_expiry_interval = options.session_expiry_secs;
        }
        let connect = Connect {
            protocol: options.version,
            clean_start: options.clean_start,
            keep_alive: options.keep_alive_secs,
            properties,
            client_id: Utf8::new(&options.client_id).map_err(|e| anyhow!("client id: {e:?}"))?,
            will: None,
            username: match &options.credentials {
                Some((user, _)) => Some(Utf8::new(user).map_err(|e| anyhow!("user name: {e:?}"))?),
                None => None,
            },
            password: options.credentials.as_ref().map(|(_, p)| bytes::Bytes::copy_from_slice(p.as_bytes())),
        };
        self.queue(&Packet::Connect(Box::new(connect)))?;
        self.flush().await?;
        match self.recv().await? {
            Packet::ConnAck(connack) => {
                // Release the CONNECT's buffer: idle connections should hold no heap.
                self.write_buf = BytesMut::new();
                Ok(connack)
            }
            other => bail!("expected CONNACK, got {:?}", other.packet_type()),
        }
    }

    /// Subscribes to one filter and waits for its SUBACK; a refused filter is an error.
    /// Packets other than SUBACK that arrive first are an error too (nothing publishes yet).
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, packet_id: PacketId) -> anyhow::Result<()> {
        let subscribe = Subscribe {
            packet_id,
            properties: Properties::default(),
            subscriptions: vec![Subscription {
                filter: Utf8::new(filter).map_err(|e| anyhow!("topic filter: {e:?}"))?,
                options: SubscriptionOptions { qos, ..SubscriptionOptions::default() },
            }],
        };
        self.queue(&Packet::Subscribe(subscribe))?;
        self.flush().await?;
        match self.recv().await? {
            Packet::SubAck(suback) if suback.packet_id == packet_id => match suback.reasons.first() {
                Some(reason) if !reason.is_error() => Ok(()),
                Some(reason) => bail!("SUBSCRIBE {filter:?} refused: {reason:?}"),
                None => bail!("SUBACK without a reason code"),
            },
            other => bail!("expected SUBACK, got {:?}", other.packet_type()),
        }
    }

    /// Appends the encoding of `packet` to the write buffer.
    pub fn queue(&mut self, packet: &Packet) -> anyhow::Result<()> {
        encode(packet, self.version, &mut self.write_buf).map_err(|e| anyhow!("encode: {e}"))
    }

    /// True when producers should stop queuing until the socket drains.
    pub fn write_backlogged(&self) -> bool {
        self.write_buf.len() >= WRITE_BUFFER_HIGH_WATER_BYTES
    }

    /// True when bytes wait to be written (in the write buffer, or TLS ciphertext in the stream).
    pub fn has_pending_writes(&self) -> bool {
        !self.write_buf.is_empty() || self.stream.wants_write()
    }

    /// Writes the whole write buffer (and any TLS ciphertext the stream holds), waiting as needed.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.has_pending_writes() {
            self.stream.write_all(&self.write_buf).await?;
            self.write_buf.clear();
        }
        Ok(())
    }

    /// Decodes the next complete packet already in the read buffer.
    pub fn next_packet(&mut self) -> anyhow::Result<Option<Packet>> {
        decode(&mut self.read_buf, self.version, PACKET_SIZE_MAX_BYTES).map_err(|e| anyhow!("decode: {e}"))
    }

    /// Waits for and returns the next packet. EOF is an error of kind `UnexpectedEof`.
    pub async fn recv(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some(packet) = self.next_packet()? {
                return Ok(packet);
            }
            let read = self.stream.read_buf(&mut self.read_buf, self.read_chunk_bytes).await?;
            if read == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
    }

    /// Waits until the socket is readable, or writable when bytes wait to be written. While the
    /// write buffer is over its high-water mark only writability is awaited: a peer that does not
    /// read our acknowledgements is not read from either, which is what bounds the write buffer
    /// of a subscriber (each PUBLISH read queues a PUBACK / PUBREC). Cancel-safe, so it can sit in
    /// a `select!` beside timers.
    ///
    /// The interest is taken from the buffer now, not from why the caller stopped: a producer that
    /// stopped on a backlog which [`Conn::try_write`] has since taken must not call this to wait
    /// for "the socket", because with the buffer under its high-water mark only readability is
    /// awaited, and a QoS 0 publisher has nothing to read.
    pub async fn ready(&self) -> io::Result<Ready> {
        let interest = if self.write_backlogged() {
            Interest::WRITABLE
        } else if self.write_buf.is_empty() {
            // `Stream::ready` adds writability while TLS ciphertext waits in the stream.
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        self.stream.ready(interest).await
    }

    /// Reads what is available without waiting, up to `budget_bytes` in this call. Returns
    /// `Ok(false)` on EOF.
    pub fn try_read(&mut self, budget_bytes: usize) -> io::Result<bool> {
        let mut total = 0;
        while total < budget_bytes {
            match self.stream.try_read_buf(&mut self.read_buf, self.read_chunk_bytes) {
                Ok(0) => return Ok(false),
                Ok(read) => total += read,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes what the socket accepts now without waiting.
    pub fn try_write(&mut self) -> io::Result<()> {
        while !self.write_buf.is_empty() {
            match self.stream.try_write(&self.write_buf) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(written) => {
                    let _ = self.write_buf.split_to(written);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.write_buf.is_empty() {
            // TLS ciphertext left over from an earlier write that met a full socket.
            match self.stream.try_flush() {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
        if self.write_buf.is_empty() && self.write_buf.capacity() > 4 * WRITE_BUFFER_HIGH_WATER_BYTES {
            self.write_buf = BytesMut::new();
        }
        Ok(())
    }

    /// Sends DISCONNECT (best effort, bounded by `timeout`) and closes the write side.
    pub async fn disconnect(&mut self, timeout: Duration) {
        let disconnect = shardmq_protocol::Disconnect::new(ReasonCode::NormalDisconnection);
        if self.queue(&Packet::Disconnect(disconnect)).is_ok() {
            let _ = tokio::time::timeout(timeout, async {
                self.flush().await?;
                self.stream.shutdown().await
            })
            .await;
        }
    }
}

/// A PUBLISH frame encoded once by the codec, then patched per message: the packet id bytes and
/// the first [`crate::payload::HEADER_BYTES`] payload bytes are the only ones that change. That keeps
/// the publisher free of a `Packet` build and an allocation per message; the positions are found by
/// encoding twice and comparing, so nothing here assumes the codec's layout.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    frame: Vec<u8>,
    packet_id_offset: Option<usize>,
    payload_offset: usize,
}

impl PublishTemplate {
    /// Encodes a PUBLISH of `payload_bytes` bytes to `topic` for `version`.
    pub fn new(
        version: ProtocolVersion,
        topic: &str,
        qos: QoS,
        payload_bytes: usize,
    ) -> anyhow::Result<Self> {
        let topic = Utf8::new(topic).map_err(|e| anyhow!("topic: {e:?}"))?;
        let encode_with = |packet_id: Option<PacketId>, fill: u8| -> anyhow::Result<Vec<u8>> {
            let publish = Publish {
                dup: false,
                qos,
                retain: false,
                topic: topic.clone(),
                packet_id,
                properties: Properties::default(),
                payload: Bytes::from(vec![fill; payload_bytes]),
            };
            let mut buf = BytesMut::new();
            encode(&Packet::Publish(publish), version, &mut buf)
                .map_err(|e| anyhow!("encode PUBLISH: {e}"))?;
            Ok(buf.to_vec())
        };
        let (first_id, second_id) =
            if qos == QoS::AtMostOnce { (None, None) } else { (Some(0x0102), Some(0xFDFE)) };
        let frame = encode_with(first_id, 0x00)?;
        let other = encode_with(second_id, 0xFF)?;
        if frame.len() != other.len() || frame.len() < payload_bytes {
            bail!("PUBLISH encoding length depends on the packet id or payload bytes");
        }
        let payload_offset = frame.len() - payload_bytes;
        let packet_id_offset = if qos == QoS::AtMostOnce {
            None
        } else {
            let differing: Vec<usize> = (0..payload_offset).filter(|&at| frame[at] != other[at]).collect();
            if differing.len() != 2 || differing[1] != differing[0] + 1 {
                bail!("packet id not found in the encoded PUBLISH");
            }
            let position = differing[0];
            if frame[position..position + 2] != [0x01, 0x02] {
                bail!("packet id of the encoded PUBLISH is not big-endian at {position}");
            }
            Some(position)
        };
        if frame[payload_offset..].iter().any(|&b| b != 0x00)
            || other[payload_offset..].iter().any(|&b| b != 0xFF)
        {
            bail!("PUBLISH payload is not the tail of the frame");
        }
        Ok(PublishTemplate { frame, packet_id_offset, payload_offset })
    }

    /// Appends one PUBLISH with `packet_id` (ignored at QoS 0) and `header` as the start of its
    /// payload to `conn`'s write buffer.
    pub fn queue(&self, conn: &mut Conn, packet_id: PacketId, header: &[u8]) {
        let start = conn.write_buf.len();
        conn.write_buf.extend_from_slice(&self.frame);
        let frame = &mut conn.write_buf[start..];
        if let Some(at) = self.packet_id_offset {
            frame[at..at + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        let header_bytes = header.len().min(frame.len() - self.payload_offset);
        frame[self.payload_offset..self.payload_offset + header_bytes]
            .copy_from_slice(&header[..header_bytes]);
    }
}

/// Why a connection attempt failed, as reported in `failures` maps.
pub fn failure_cause(error: &anyhow::Error) -> String {
    if let Some(io_error) = error.downcast_ref::<io::Error>() {
        return io_cause(io_error).to_string();
    }
    if error.downcast_ref::<tokio::time::error::Elapsed>().is_some() {
        return "timeout".to_string();
    }
    "protocol".to_string()
}

/// The cause name of an I/O error.
pub fn io_cause(error: &io::Error) -> &'static str {
    if is_tls_error(error) {
        return "tls";
    }
    match error.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => return "fd_limit",
        Some(libc::EADDRNOTAVAIL) => return "addr_unavailable",
        Some(libc::ETIMEDOUT) => return "timeout",
        _ => {}
    }
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => "reset",
        io::ErrorKind::TimedOut => "timeout",
        _ => "other",
    }
}

/// The cause name of a refused CONNACK, e.g. `connack_0x87`.
pub fn connack_cause(connack: &ConnAck) -> String {
    format!("connack_{:#04x}", connack.reason.as_u8())
}
