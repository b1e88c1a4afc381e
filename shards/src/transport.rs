//! The layers between a connection's socket and its MQTT bytes: TLS, WebSocket, both (`wss`), or
//! none (`tcp`, which never builds a [`Layers`]).
//!
//! Sans-IO: the connection tasks (`conn.rs`) read bytes from the socket and hand them to
//! [`Layers::inbound`], which appends the MQTT bytes they carry to the connection's read buffer;
//! and they pass the MQTT bytes they want to send through [`Layers::outbound`] before writing.
//! Bytes a layer must send on its own (the TLS handshake, alerts, the WebSocket 101 answer,
//! pongs) collect in an internal buffer that [`Layers::take_output`] drains.
//!
//! Owner: the connection (its `ConnShared`, or the accepting task before the CONNECT); the reader
//! and the writer task borrow it in turn, never across an await. Travels with a handed-off socket.
//!
//! Bounds: rustls buffers at most one TLS record of plaintext and ciphertext beyond what it is
//! handed; the WebSocket layer keeps at most a partial frame header (14 bytes) or a control frame
//! (131 bytes), or an upgrade request up to [`WS_REQUEST_BYTES_MAX`]. The pending output holds at
//! most what one read produced (pongs, alerts), and the writer drains it.

use std::io::{Read, Write};
use std::sync::Arc;

use bytes::BytesMut;

use crate::listener::ListenerInfo;
use crate::tls::ClientCert;
use crate::ws;

/// The largest WebSocket upgrade request accepted (the request line and headers).
pub const WS_REQUEST_BYTES_MAX: usize = 8 * 1024;

/// Why a connection's layers refused its bytes; closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerError {
    /// TLS failed (not TLS at all, a bad certificate, a bad record...).
    Tls(String),
    /// The WebSocket upgrade was refused (wrong path, no `mqtt` subprotocol...).
    Upgrade(&'static str),
    /// A WebSocket frame broke the protocol.
    WebSocket(String),
}

impl LayerError {
    /// The listener counter and log label of this kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            LayerError::Tls(_) => "tls",
            LayerError::Upgrade(_) | LayerError::WebSocket(_) => "websocket",
        }
    }
}

impl std::fmt::Display for LayerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerError::Tls(e) => write!(f, "TLS: {e}"),
            LayerError::Upgrade(reason) => write!(f, "WebSocket upgrade refused: {reason}"),
            LayerError::WebSocket(e) => write!(f, "WebSocket: {e}"),
        }
    }
}

/// What a read delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Open,
    /// The peer closed the layer (TLS close_notify, WebSocket Close): no more MQTT bytes.
    Closed,
}

#[derive(Debug)]
enum WsState {
    /// Waiting for the upgrade request; bytes so far are in `Layers::ws_in`.
    Upgrade {
        path: Arc<str>,
    },
    Open(ws::Deframer),
    Closed,
}

/// One connection's layers. See the module documentation.
#[derive(Debug)]
pub struct Layers {
    tls: Option<rustls::ServerConnection>,
    ws: Option<WsState>,
    /// Bytes for the WebSocket layer not consumed yet (a partial frame header or request).
    ws_in: BytesMut,
    /// Bytes the layers must send on their own, in order, before (or with) the next MQTT bytes.
    output: BytesMut,
    /// The socket read buffer of a layered connection, kept here between reads.
    read_buf: BytesMut,
    /// The listener, whose counters the layers' failures go on.
    pub(crate) listener: Option<Arc<ListenerInfo>>,
}

/// The socket read size of a layered connection: one TLS record and its overhead.
const LAYER_READ_BYTES: usize = 17 * 1024;

impl Layers {
    /// Layers for a new connection: TLS with `tls`, then a WebSocket served at `ws_path`.
    pub fn new(
        tls: Option<Arc<rustls::ServerConfig>>,
        ws_path: Option<Arc<str>>,
    ) -> Result<Layers, LayerError> {
        let tls = match tls {
            Some(config) => {
                Some(rustls::ServerConnection::new(config).map_err(|e| LayerError::Tls(e.to_string()))?)
            }
            None => None,
        };
        Ok(Layers {
            tls,
            ws: ws_path.map(|path| WsState::Upgrade { path }),
            ws_in: BytesMut::new(),
            output: BytesMut::new(),
            read_buf: BytesMut::new(),
            listener: None,
        })
    }

    /// The buffer to read socket bytes into (taken; give it back to [`Layers::inbound`]).
    pub fn take_read_buf(&mut self) -> BytesMut {
        let mut buf = std::mem::take(&mut self.read_buf);
        buf.clear();
        if buf.capacity() < LAYER_READ_BYTES {
            buf.reserve(LAYER_READ_BYTES);
        }
        buf
    }

    /// Handles `bytes` read from the socket: appends the MQTT bytes they carry to `mqtt` and
    /// collects what the layers must answer. Keeps `bytes` (cleared) for the next read.
    pub fn inbound(&mut self, mut bytes: BytesMut, mqtt: &mut BytesMut) -> Result<Flow, LayerError> {
        let result = self.inbound_inner(&bytes, mqtt);
        bytes.clear();
        self.read_buf = bytes;
        result
    }

    fn inbound_inner(&mut self, mut bytes: &[u8], mqtt: &mut BytesMut) -> Result<Flow, LayerError> {
        let Some(tls) = self.tls.as_mut() else {
            self.ws_in.extend_from_slice(bytes);
            return self.ws_inbound(mqtt);
        };
        let mut closed = false;
        while !bytes.is_empty() {
            tls.read_tls(&mut bytes).map_err(|e| LayerError::Tls(e.to_string()))?;
            let state = match tls.process_new_packets() {
                Ok(state) => state,
                Err(error) => {
                    // Send the alert rustls queued for this error, then give up.
                    let _ = drain_tls(tls, &mut self.output);
                    return Err(LayerError::Tls(error.to_string()));
                }
            };
            let plaintext = state.plaintext_bytes_to_read();
            if plaintext > 0 {
                let target = if self.ws.is_some() { &mut self.ws_in } else { &mut *mqtt };
                let at = target.len();
                target.resize(at + plaintext, 0);
                tls.reader().read_exact(&mut target[at..]).map_err(|e| LayerError::Tls(e.to_string()))?;
            }
            closed |= state.peer_has_closed();
        }
        drain_tls(tls, &mut self.output)?;
        let flow = if self.ws.is_some() { self.ws_inbound(mqtt)? } else { Flow::Open };
        Ok(if closed { Flow::Closed } else { flow })
    }

    /// Runs the WebSocket layer over `ws_in`; without one, `ws_in` is the MQTT stream itself.
    fn ws_inbound(&mut self, mqtt: &mut BytesMut) -> Result<Flow, LayerError> {
        let Some(state) = self.ws.as_mut() else {
            mqtt.extend_from_slice(&self.ws_in);
            self.ws_in.clear();
            return Ok(Flow::Open);
        };
        let mut reply = BytesMut::new();
        if let WsState::Upgrade { path } = state {
            match ws::accept(&self.ws_in, path, WS_REQUEST_BYTES_MAX) {
                Ok(None) => return Ok(Flow::Open),
                Ok(Some(accepted)) => {
                    let _ = self.ws_in.split_to(accepted.consumed);
                    reply.extend_from_slice(&accepted.response);
                    *state = WsState::Open(ws::Deframer::new());
                }
                Err(refusal) => {
                    reply.extend_from_slice(&refusal.response());
                    self.send(&reply)?;
                    return Err(LayerError::Upgrade(refusal.reason));
                }
            }
        }
        let flow = match state {
            WsState::Open(deframer) => match deframer.feed(&mut self.ws_in, mqtt, &mut reply) {
                Ok(ws::Inbound::Open) => Flow::Open,
                Ok(ws::Inbound::Closed) => {
                    *state = WsState::Closed;
                    Flow::Closed
                }
                Err(error) => {
                    ws::encode_close(error.close_code(), &mut reply);
                    *state = WsState::Closed;
                    self.send(&reply)?;
                    return Err(LayerError::WebSocket(error.to_string()));
                }
            },
            WsState::Closed => Flow::Closed,
            WsState::Upgrade { .. } => unreachable!("the upgrade was handled above"),
        };
        self.send(&reply)?;
        Ok(flow)
    }

    /// Queues `bytes` (already WebSocket-framed, when there is a WebSocket) through TLS.
    fn send(&mut self, bytes: &[u8]) -> Result<(), LayerError> {
        if bytes.is_empty() {
            return Ok(());
        }
        match self.tls.as_mut() {
            None => self.output.extend_from_slice(bytes),
            Some(tls) => {
                // rustls takes at most its buffer limit (64 KiB) of plaintext at a time: encrypt,
                // move the records out, and go on until all is taken.
                let mut rest = bytes;
                while !rest.is_empty() {
                    let taken = tls.writer().write(rest).map_err(|e| LayerError::Tls(e.to_string()))?;
                    rest = &rest[taken..];
                    let moved = drain_tls(tls, &mut self.output)?;
                    if taken == 0 && moved == 0 {
                        return Err(LayerError::Tls("TLS session takes no more data".into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Wraps MQTT bytes for the socket: appends them, framed and encrypted, to the pending
    /// output. A connection whose WebSocket is not open yet (or closed) sends nothing.
    pub fn outbound(&mut self, mqtt: &[u8]) -> Result<(), LayerError> {
        if mqtt.is_empty() {
            return Ok(());
        }
        match &self.ws {
            None => self.send(mqtt),
            Some(WsState::Open(_)) => {
                let mut framed = BytesMut::with_capacity(mqtt.len() + 10);
                ws::encode_binary(mqtt, &mut framed);
                self.send(&framed)
            }
            Some(_) => Ok(()),
        }
    }

    /// Queues the layers' own goodbye: a WebSocket Close (1000) and a TLS close_notify.
    pub fn close(&mut self) {
        if let Some(WsState::Open(_)) = self.ws {
            let mut frame = BytesMut::new();
            ws::encode_close(1000, &mut frame);
            let _ = self.send(&frame);
            self.ws = Some(WsState::Closed);
        }
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = drain_tls(tls, &mut self.output);
        }
    }

    /// Whether bytes wait to be sent.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Passes the MQTT bytes in `out` through the layers and leaves in `out` what goes on the wire,
    /// with anything the layers owed the peer before it; `goodbye` adds their closing words
    /// ([`Layers::close`]). On error `out` still holds what the layers produced.
    pub fn wrap(&mut self, out: &mut BytesMut, goodbye: bool) -> Result<(), LayerError> {
        let result = self.outbound(out);
        if goodbye {
            self.close();
        }
        out.clear();
        self.take_output(out);
        result
    }

    /// Takes the bytes waiting to be sent, appended to `out`.
    pub fn take_output(&mut self, out: &mut BytesMut) {
        if out.is_empty() {
            std::mem::swap(out, &mut self.output);
        } else {
            out.extend_from_slice(&self.output);
            self.output.clear();
        }
    }

    /// Counts a failure on the listener and logs it (with the peer, when known).
    pub(crate) fn count_error(&self, error: &LayerError) {
        if let Some(listener) = &self.listener {
            listener.count_layer_error(error);
            tracing::warn!(listener = %listener.config.address, kind = error.kind(), %error, "connection refused");
        } else {
            tracing::warn!(kind = error.kind(), %error, "connection refused");
        }
    }

    /// The verified client certificate, once the TLS handshake is done (mutual TLS).
    pub fn client_cert(&self) -> Option<ClientCert> {
        let tls = self.tls.as_ref()?;
        let leaf = tls.peer_certificates()?.first()?;
        ClientCert::from_der(leaf.as_ref())
    }
}

/// Moves every TLS record rustls has ready into `output`; returns how many bytes moved.
fn drain_tls(tls: &mut rustls::ServerConnection, output: &mut BytesMut) -> Result<usize, LayerError> {
    let mut moved = 0;
    while tls.wants_write() {
        moved += tls.write_tls(&mut output.writer()).map_err(|e| LayerError::Tls(e.to_string()))?;
    }
    Ok(moved)
}

use bytes::BufMut as _;
