//! WebSocket server layer (RFC 6455) for MQTT over WebSocket (MQTT 5.0 §6, MQTT 3.1.1 §6):
//! the HTTP/1.1 upgrade handshake ([`accept`]), client frames to MQTT bytes ([`Deframer`]) and
//! MQTT bytes to server frames ([`encode_binary`], [`encode_close`]).
//!
//! Sans-I/O: bytes in, bytes out. The connection code reads the socket, feeds the bytes here and
//! writes what comes back; this module never touches a socket, a timer or the shard.
//!
//! Owner: none. A [`Deframer`] belongs to one WebSocket connection and lives on that
//! connection's shard for the connection's life; it is a few words of plain state.
//!
//! Does not own: TLS (a `wss` listener decrypts before this layer), the connect timeout, MQTT
//! packet limits (the MQTT decoder sees the payload stream and applies the maximum packet size;
//! close with 1009 then), and the `Host`/`Origin` headers (not checked: the broker serves one
//! site, and MQTT authenticates at CONNECT).
//!
//! Bounds:
//! - [`accept`] looks at most `request_bytes_max` bytes and refuses (431) a request whose header
//!   does not end within them; a caller that retries on each read rescans at most that much.
//! - [`Deframer::feed`] holds nothing itself: payload is unmasked and appended to `out` as it
//!   arrives, so `out` grows by at most the bytes consumed from `raw`, and `reply` by at most
//!   the bytes consumed (a pong is no larger than its ping). When it returns `Ok(Inbound::Open)`,
//!   `raw` keeps at most [`FEED_LEFTOVER_BYTES_MAX`] bytes: a partial frame header, or a control
//!   frame not yet whole.
//!
//! Invariants:
//! - Every client frame is masked, has zero RSV bits and a known opcode; data frames form whole
//!   binary messages (binary, then continuations until FIN); control frames are unfragmented
//!   with at most 125 bytes of payload. Any violation is a [`WsError`] with its close code.
//! - Server frames are unmasked, FIN set, minimal length form.
//! - Message boundaries are not kept: MQTT packets may span frames and a frame may hold several
//!   packets (MQTT-6.0.0-2, MQTT-6.0.0-3), so `out` is one byte stream.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::{Buf, BufMut, BytesMut};
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 §1.3 / §4.2.2 appends to the client's key before hashing (the test of
/// the RFC's own example key pins it).
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The subprotocol MQTT 3.1.1 and 5.0 register (MQTT-6.0.0-3 / §6.0).
pub const SUBPROTOCOL_MQTT: &str = "mqtt";
/// The subprotocol name MQTT 3.1 clients offered before `mqtt` was registered.
pub const SUBPROTOCOL_MQTT_V31: &str = "mqttv3.1";

/// The reason of the refusal the broker counts: the client offered no MQTT subprotocol.
pub const REASON_NO_MQTT_SUBPROTOCOL: &str = "no mqtt subprotocol";

/// Largest payload of a control frame (RFC 6455 §5.5).
const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;
/// Largest frame header: 2 bytes, an 8-byte extended length, a 4-byte mask.
const HEADER_BYTES_MAX: usize = 14;
/// Header of a control frame: 2 bytes and the mask (its length always fits the 7-bit form).
const CONTROL_HEADER_BYTES: usize = 6;

/// The most bytes [`Deframer::feed`] leaves in `raw` when it returns `Ok(Inbound::Open)`: an
/// incomplete control frame (header and up to 124 of its payload bytes); a partial data-frame
/// header is shorter still.
pub const FEED_LEFTOVER_BYTES_MAX: usize = CONTROL_HEADER_BYTES + CONTROL_PAYLOAD_BYTES_MAX - 1;

const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_BINARY: u8 = 0x2;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xA;

/// Close status codes the server sends (RFC 6455 §7.4.1).
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// A successful upgrade: the bytes of the request it consumed and the 101 response to send.
/// Bytes of `buf` after `consumed` (a client pipelining its CONNECT) are WebSocket frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub consumed: usize,
    pub response: Vec<u8>,
    /// The subprotocol chosen and echoed: [`SUBPROTOCOL_MQTT`] or [`SUBPROTOCOL_MQTT_V31`].
    pub subprotocol: &'static str,
}

/// A refused upgrade: why, and the HTTP response to send before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

impl Refusal {
    fn new(status: u16, reason: &'static str) -> Refusal {
        Refusal { status, reason }
    }

    /// The HTTP/1.1 response to write before closing the connection: the status line, the
    /// headers the status calls for (426 names the version this server speaks, 405 the method
    /// it allows) and the reason as a plain-text body.
    pub fn response(&self) -> Vec<u8> {
        let status_text = match self.status {
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            505 => "HTTP Version Not Supported",
            _ => "Error",
        };
        let extra_headers = match self.status {
            405 => "Allow: GET\r\n",
            426 => "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            _ => "",
        };
        format!(
            "HTTP/1.1 {} {}\r\n{}Connection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{}",
            self.status,
            status_text,
            extra_headers,
            self.reason.len(),
            self.reason
        )
        .into_bytes()
    }
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut hasher = Sha1::new();
    hasher.update(key.as_bytes());
    hasher.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(hasher.finalize())
}

/// What the handshake needs from the header fields; the rest are ignored.
#[derive(Debug, Default)]
struct UpgradeFields<'a> {
    upgrade_websocket: bool,
    connection_upgrade: bool,
    /// `None`: no `Sec-WebSocket-Version`; `Some(false)`: one of them is not 13.
    version_13: Option<bool>,
    key: Option<&'a str>,
    key_count: usize,
    offers_mqtt: bool,
    offers_mqtt_v31: bool,
}

/// The comma-separated tokens of a header value, trimmed, empty ones skipped.
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(|token| token.trim_matches([' ', '\t'])).filter(|token| !token.is_empty())
}

/// The path of a request target (origin form `/p?q` or absolute form `http://h/p?q`), without
/// its query. `None` for the other forms (`*`, authority), which no upgrade uses.
fn target_path(target: &str) -> Option<&str> {
    let origin_form = if target.starts_with('/') {
        target
    } else {
        let (_scheme, rest) = target.split_once("://")?;
        match rest.find('/') {
            Some(slash) => &rest[slash..],
            None => "/",
        }
    };
    Some(origin_form.split(['?', '#']).next().unwrap_or(origin_form))
}

/// Parses the HTTP/1.1 upgrade request at the front of `buf`.
///
/// `Ok(None)`: the header is incomplete; call again with more bytes. `Err`: refuse with
/// [`Refusal::response`] and close. Only the first `request_bytes_max` bytes are looked at.
pub fn accept(buf: &[u8], path: &str, request_bytes_max: usize) -> Result<Option<Accepted>, Refusal> {
    let window = &buf[..buf.len().min(request_bytes_max)];
    let Some(head_len) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
        // Refuse early what cannot become an upgrade (a plain MQTT client on the WebSocket port
        // sends 0x10 first), rather than wait for the connect timeout.
        let prefix_len = buf.len().min(4);
        if buf[..prefix_len] != b"GET "[..prefix_len] {
            return Err(Refusal::new(405, "method is not GET"));
        }
        if buf.len() >= request_bytes_max {
            return Err(Refusal::new(431, "request header too large"));
        }
        return Ok(None);
    };
    let consumed = head_len + 4;
    let head = std::str::from_utf8(&buf[..head_len])
        .map_err(|_| Refusal::new(400, "request header is not UTF-8"))?;
    let mut lines = head.split("\r\n");

    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::new(400, "malformed request line"));
    };
    if method != "GET" {
        return Err(Refusal::new(405, "method is not GET"));
    }
    if version != "HTTP/1.1" {
        return Err(Refusal::new(505, "HTTP/1.1 required"));
    }
    let Some(request_path) = target_path(target) else {
        return Err(Refusal::new(400, "malformed request target"));
    };
    if request_path != path {
        return Err(Refusal::new(404, "no WebSocket endpoint at this path"));
    }

    let mut fields = UpgradeFields::default();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(Refusal::new(400, "malformed header line"));
        };
        // Whitespace before the colon or a folded continuation line (RFC 9112 §5.1, §5.2).
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(Refusal::new(400, "malformed header line"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("upgrade") {
            fields.upgrade_websocket |= tokens(value).any(|token| token.eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            fields.connection_upgrade |= tokens(value).any(|token| token.eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            fields.version_13 = Some(fields.version_13.unwrap_or(true) && value == "13");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            fields.key = Some(value);
            fields.key_count += 1;
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for token in tokens(value) {
                fields.offers_mqtt |= token == SUBPROTOCOL_MQTT;
                fields.offers_mqtt_v31 |= token == SUBPROTOCOL_MQTT_V31;
            }
        }
    }

    if !fields.upgrade_websocket {
        return Err(Refusal::new(400, "missing Upgrade: websocket"));
    }
    if !fields.connection_upgrade {
        return Err(Refusal::new(400, "missing Connection: upgrade"));
    }
    if fields.version_13 != Some(true) {
        return Err(Refusal::new(426, "Sec-WebSocket-Version 13 required"));
    }
    let key = match (fields.key, fields.key_count) {
        (Some(key), 1) => key,
        (_, 0) => return Err(Refusal::new(400, "missing Sec-WebSocket-Key")),
        _ => return Err(Refusal::new(400, "repeated Sec-WebSocket-Key")),
    };
    match BASE64.decode(key) {
        Ok(nonce) if nonce.len() == 16 => {}
        _ => return Err(Refusal::new(400, "Sec-WebSocket-Key is not 16 bytes in base64")),
    }
    let subprotocol = if fields.offers_mqtt {
        SUBPROTOCOL_MQTT
    } else if fields.offers_mqtt_v31 {
        SUBPROTOCOL_MQTT_V31
    } else {
        return Err(Refusal::new(400, REASON_NO_MQTT_SUBPROTOCOL));
    };

    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        accept_key(key),
        subprotocol
    )
    .into_bytes();
    Ok(Some(Accepted { consumed, response, subprotocol }))
}

// ---------------------------------------------------------------------------------------------
// Client frames
// ---------------------------------------------------------------------------------------------

/// A client's breach of RFC 6455 or of MQTT's use of it. The connection sends
/// `encode_close(error.close_code())` and closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("client frame is not masked")]
    Unmasked,
    #[error("reserved bits set in a frame header (no extension was negotiated)")]
    ReservedBits,
    #[error("text frame: MQTT over WebSocket uses binary frames only")]
    TextFrame,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("continuation frame without a message to continue")]
    ContinuationWithoutMessage,
    #[error("new data frame while a fragmented message is still open")]
    DataFrameInsideMessage,
    #[error("fragmented control frame")]
    ControlFrameFragmented,
    #[error("control frame payload of {0} bytes (at most 125)")]
    ControlFrameTooLong(u8),
    #[error("64-bit frame length with the top bit set")]
    LengthTopBitSet,
    #[error("close frame with a 1-byte payload")]
    CloseCodeTruncated,
    #[error("close frame with the invalid status code {0}")]
    CloseCodeInvalid(u16),
    #[error("close frame reason is not UTF-8")]
    CloseReasonNotUtf8,
}

impl WsError {
    /// The status code of the Close frame to send before closing (RFC 6455 §7.4.1).
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::TextFrame => CLOSE_UNSUPPORTED_DATA,
            WsError::CloseReasonNotUtf8 => CLOSE_INVALID_PAYLOAD,
            WsError::Unmasked
            | WsError::ReservedBits
            | WsError::UnknownOpcode(_)
            | WsError::ContinuationWithoutMessage
            | WsError::DataFrameInsideMessage
            | WsError::ControlFrameFragmented
            | WsError::ControlFrameTooLong(_)
            | WsError::LengthTopBitSet
            | WsError::CloseCodeTruncated
            | WsError::CloseCodeInvalid(_) => CLOSE_PROTOCOL_ERROR,
        }
    }
}

/// What the connection should do after a [`Deframer::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Keep reading.
    Open,
    /// The client sent Close; the reply Close is already in `reply`. Write it and close the
    /// TCP connection (the server closes first, RFC 6455 §7.1.1).
    Closed,
}

/// Client-to-server frames to MQTT bytes, streaming.
///
/// Owner: one WebSocket connection, on its shard; lives as long as the connection. State is the
/// position inside the current data frame and whether a fragmented message is open; it holds
/// no bytes (see the module's bounds).
#[derive(Debug, Default)]
pub struct Deframer {
    /// Payload bytes of the current data frame not yet consumed; 0 between frames.
    payload_remaining_bytes: u64,
    /// The current data frame's mask, rotated so `mask[0]` applies to its next payload byte.
    mask: [u8; 4],
    /// A binary message without FIN was started: the next data frame must be a continuation.
    message_open: bool,
    /// The client's Close was answered; later bytes are discarded.
    closed: bool,
}

/// A complete, validated frame header.
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    fin: bool,
    opcode: u8,
    header_bytes: usize,
    payload_bytes: u64,
    mask: [u8; 4],
}

impl FrameHeader {
    fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Parses and validates the frame header at the front of `raw`; `Ok(None)` if incomplete.
/// Errors are reported as soon as the first two bytes show them.
fn parse_header(raw: &[u8], message_open: bool) -> Result<Option<FrameHeader>, WsError> {
    let [byte0, byte1, ..] = *raw else {
        return Ok(None);
    };
    let fin = byte0 & 0x80 != 0;
    let opcode = byte0 & 0x0F;
    if byte0 & 0x70 != 0 {
        return Err(WsError::ReservedBits);
    }
    let length_7bit = byte1 & 0x7F;
    match opcode {
        OPCODE_CONTINUATION if !message_open => return Err(WsError::ContinuationWithoutMessage),
        OPCODE_CONTINUATION => {}
        OPCODE_BINARY if message_open => return Err(WsError::DataFrameInsideMessage),
        OPCODE_BINARY => {}
        OPCODE_TEXT => return Err(WsError::TextFrame),
        OPCODE_CLOSE | OPCODE_PING | OPCODE_PONG => {
            if !fin {
                return Err(WsError::ControlFrameFragmented);
            }
            if usize::from(length_7bit) > CONTROL_PAYLOAD_BYTES_MAX {
                return Err(WsError::ControlFrameTooLong(length_7bit));
            }
        }
        other => return Err(WsError::UnknownOpcode(other)),
    }
    if byte1 & 0x80 == 0 {
        return Err(WsError::Unmasked);
    }
    let length_field_bytes = match length_7bit {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_bytes = 2 + length_field_bytes + 4;
    if raw.len() < header_bytes {
        return Ok(None);
    }
    let length_field = &raw[2..2 + length_field_bytes];
    let payload_bytes = match length_field_bytes {
        2 => u64::from(u16::from_be_bytes([length_field[0], length_field[1]])),
        8 => {
            let mut be = [0u8; 8];
            be.copy_from_slice(length_field);
            let length = u64::from_be_bytes(be);
            if length >> 63 != 0 {
                return Err(WsError::LengthTopBitSet);
            }
            length
        }
        _ => u64::from(length_7bit),
    };
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&raw[header_bytes - 4..header_bytes]);
    Ok(Some(FrameHeader { fin, opcode, header_bytes, payload_bytes, mask }))
}

/// XORs `bytes` with `mask` (where `mask[0]` applies to `bytes[0]`) and rotates `mask` so that
/// it applies to the byte after `bytes`.
fn unmask(bytes: &mut [u8], mask: &mut [u8; 4]) {
    for chunk in bytes.chunks_mut(4) {
        for (byte, key) in chunk.iter_mut().zip(mask.iter()) {
            *byte ^= key;
        }
    }
    mask.rotate_left(bytes.len() % 4);
}

impl Deframer {
    pub fn new() -> Deframer {
        Deframer::default()
    }

    /// Consumes as much of `raw` as possible, appending binary-message payload to `out` (as
    /// it arrives, without waiting for a frame's end) and frames the server must send (pong,
    /// Close reply) to `reply`.
    ///
    /// On `Ok(Inbound::Open)`, what is left in `raw` is an incomplete frame header or an
    /// incomplete control frame (at most [`FEED_LEFTOVER_BYTES_MAX`] bytes): append the next
    /// read to it and feed again. On `Ok(Inbound::Closed)`, `raw` is emptied (the RFC discards
    /// data after Close) and later feeds return `Closed` again. Payload appended to `out` before
    /// a Close or an error stays there: the MQTT packets the client sent before it are valid.
    /// On `Err`, `raw` is left at the offending frame; send `encode_close(err.close_code())`
    /// and close.
    pub fn feed(
        &mut self,
        raw: &mut BytesMut,
        out: &mut BytesMut,
        reply: &mut BytesMut,
    ) -> Result<Inbound, WsError> {
        if self.closed {
            raw.clear();
            return Ok(Inbound::Closed);
        }
        // Each turn consumes at least one byte of `raw` or returns, so the loop is bounded by
        // `raw.len()` turns.
        loop {
            let raw_len_before = raw.len();
            if self.payload_remaining_bytes > 0 {
                if raw.is_empty() {
                    return Ok(Inbound::Open);
                }
                let chunk_bytes = usize::try_from(self.payload_remaining_bytes)
                    .map_or(raw.len(), |remaining| remaining.min(raw.len()));
                let start = out.len();
                out.extend_from_slice(&raw[..chunk_bytes]);
                unmask(&mut out[start..], &mut self.mask);
                raw.advance(chunk_bytes);
                self.payload_remaining_bytes -= chunk_bytes as u64;
                continue;
            }

            let Some(header) = parse_header(raw, self.message_open)? else {
                debug_assert!(raw.len() < HEADER_BYTES_MAX);
                return Ok(Inbound::Open);
            };
            if !header.is_control() {
                self.message_open = !header.fin;
                self.payload_remaining_bytes = header.payload_bytes;
                self.mask = header.mask;
                raw.advance(header.header_bytes);
                continue;
            }

            // A control frame is handled whole; its payload is at most 125 bytes.
            let payload_bytes = header.payload_bytes as usize;
            let frame_bytes = header.header_bytes + payload_bytes;
            if raw.len() < frame_bytes {
                debug_assert!(raw.len() <= FEED_LEFTOVER_BYTES_MAX);
                return Ok(Inbound::Open);
            }
            let mut payload_buf = [0u8; CONTROL_PAYLOAD_BYTES_MAX];
            let payload = &mut payload_buf[..payload_bytes];
            payload.copy_from_slice(&raw[header.header_bytes..frame_bytes]);
            let mut mask = header.mask;
            unmask(payload, &mut mask);
            raw.advance(frame_bytes);
            match header.opcode {
                OPCODE_PING => encode_control(OPCODE_PONG, payload, reply),
                OPCODE_PONG => {}
                OPCODE_CLOSE => {
                    let code = close_code_of(payload)?;
                    encode_close(code, reply);
                    self.closed = true;
                    raw.clear();
                    return Ok(Inbound::Closed);
                }
                _ => unreachable!("parse_header admits only close, ping and pong as control"),
            }
            debug_assert!(raw.len() < raw_len_before);
        }
    }
}

/// The status code of a client's Close payload, to echo; 1000 if it carries none.
fn close_code_of(payload: &[u8]) -> Result<u16, WsError> {
    match payload {
        [] => Ok(CLOSE_NORMAL),
        [_] => Err(WsError::CloseCodeTruncated),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            // Codes a peer may send: the defined 1000-1003 and 1007-1014, and the registered
            // and private ranges 3000-4999 (RFC 6455 §7.4; 1004-1006 and 1015 must not be sent).
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(WsError::CloseCodeInvalid(code));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(WsError::CloseReasonNotUtf8);
            }
            Ok(code)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server frames
// ---------------------------------------------------------------------------------------------

/// Appends an unmasked, final frame header for `opcode` and a payload of `payload_bytes`, in
/// the shortest length form.
fn encode_header(opcode: u8, payload_bytes: usize, out: &mut BytesMut) {
    out.put_u8(0x80 | opcode);
    if payload_bytes <= 125 {
        out.put_u8(payload_bytes as u8);
    } else if let Ok(length) = u16::try_from(payload_bytes) {
        out.put_u8(126);
        out.put_u16(length);
    } else {
        out.put_u8(127);
        out.put_u64(payload_bytes as u64);
    }
}

/// Appends the header of one unmasked server binary frame whose payload is `payload_bytes`
/// long, so the caller can write the payload from its own buffer without copying it here.
pub fn encode_binary_header(payload_bytes: usize, out: &mut BytesMut) {
    encode_header(OPCODE_BINARY, payload_bytes, out);
}

/// Appends one unmasked server binary frame carrying `payload` to `out` (header then payload).
pub fn encode_binary(payload: &[u8], out: &mut BytesMut) {
    out.reserve(HEADER_BYTES_MAX + payload.len());
    encode_binary_header(payload.len(), out);
    out.extend_from_slice(payload);
}

fn encode_control(opcode: u8, payload: &[u8], out: &mut BytesMut) {
    debug_assert!(payload.len() <= CONTROL_PAYLOAD_BYTES_MAX);
    encode_header(opcode, payload.len(), out);
    out.extend_from_slice(payload);
}

/// Appends a Close frame with `code` (1000 normal, 1002 protocol error, 1003 unsupported data,
/// 1009 too big; or an echoed client code) and no reason.
pub fn encode_close(code: u16, out: &mut BytesMut) {
    encode_control(OPCODE_CLOSE, &code.to_be_bytes(), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const MAX: usize = 4096;

    fn request(path: &str, headers: &[&str]) -> Vec<u8> {
        let mut text = format!("GET {path} HTTP/1.1\r\nHost: example.com\r\n");
        for header in headers {
            text.push_str(header);
            text.push_str("\r\n");
        }
        text.push_str("\r\n");
        text.into_bytes()
    }

    fn good_headers() -> Vec<&'static str> {
        vec![
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: mqtt",
        ]
    }

    fn header_value<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        response.split("\r\n").find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn refusal_of(buf: &[u8]) -> Refusal {
        accept(buf, "/mqtt", MAX).expect_err("the request must be refused")
    }

    fn with_replaced(name: &str, replacement: Option<&'static str>) -> Vec<u8> {
        let mut headers: Vec<&str> = good_headers().into_iter().filter(|h| !h.starts_with(name)).collect();
        headers.extend(replacement);
        request("/mqtt", &headers)
    }

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accepts_a_valid_upgrade() {
        let buf = request("/mqtt?client=1", &good_headers());
        let accepted = accept(&buf, "/mqtt", MAX).unwrap().unwrap();
        assert_eq!(accepted.consumed, buf.len());
        assert_eq!(accepted.subprotocol, "mqtt");
        let response = String::from_utf8(accepted.response).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(response.ends_with("\r\n\r\n"));
        assert_eq!(header_value(&response, "upgrade"), Some("websocket"));
        assert_eq!(header_value(&response, "connection"), Some("Upgrade"));
        assert_eq!(header_value(&response, "sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert_eq!(header_value(&response, "sec-websocket-protocol"), Some("mqtt"));
    }

    #[test]
    fn header_names_and_tokens_are_case_insensitive_and_extra_headers_tolerated() {
        let buf = request(
            "http://broker.example:8080/mqtt",
            &[
                "upgrade: WebSocket",
                "CONNECTION: keep-alive, Upgrade",
                "Origin: http://example.com",
                "sec-websocket-key:dGhlIHNhbXBsZSBub25jZQ==",
                "SEC-WEBSOCKET-VERSION:   13",
                "Sec-WebSocket-Protocol: foo",
                "Sec-WebSocket-Protocol: mqttv3.1, mqtt",
                "Sec-WebSocket-Extensions: permessage-deflate",
            ],
        );
        let accepted = accept(&buf, "/mqtt", MAX).unwrap().unwrap();
        assert_eq!(accepted.subprotocol, "mqtt", "mqtt is preferred");
    }

    #[test]
    fn old_clients_get_mqttv31_echoed() {
        let buf = with_replaced("Sec-WebSocket-Protocol", Some("Sec-WebSocket-Protocol: mqttv3.1"));
        let accepted = accept(&buf, "/mqtt", MAX).unwrap().unwrap();
        assert_eq!(accepted.subprotocol, "mqttv3.1");
        let response = String::from_utf8(accepted.response).unwrap();
        assert_eq!(header_value(&response, "sec-websocket-protocol"), Some("mqttv3.1"));
    }

    #[test]
    fn pipelined_bytes_stay_after_consumed() {
        let mut buf = request("/mqtt", &good_headers());
        let request_len = buf.len();
        buf.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]);
        let accepted = accept(&buf, "/mqtt", MAX).unwrap().unwrap();
        assert_eq!(accepted.consumed, request_len);
        assert_eq!(&buf[accepted.consumed..], &[0x82, 0x80, 1, 2, 3, 4]);
    }

    #[test]
    fn incomplete_requests_need_more_bytes() {
        let buf = request("/mqtt", &good_headers());
        for end in 0..buf.len() {
            assert_eq!(accept(&buf[..end], "/mqtt", MAX), Ok(None), "prefix {end}");
        }
    }

    #[test]
    fn refusals_carry_their_status() {
        let cases: Vec<(Vec<u8>, u16, &str)> = vec![
            (b"POST /mqtt HTTP/1.1\r\n\r\n".to_vec(), 405, "method is not GET"),
            (vec![0x10, 0x0c, 0x00, 0x04], 405, "method is not GET"),
            (b"GET /mqtt HTTP/1.0\r\n\r\n".to_vec(), 505, "HTTP/1.1 required"),
            (b"GET /mqtt\r\n\r\n".to_vec(), 400, "malformed request line"),
            (request("*", &good_headers()), 400, "malformed request target"),
            (request("/other", &good_headers()), 404, "no WebSocket endpoint at this path"),
            (request("/mqtt/", &good_headers()), 404, "no WebSocket endpoint at this path"),
            (with_replaced("Upgrade", None), 400, "missing Upgrade: websocket"),
            (with_replaced("Upgrade", Some("Upgrade: h2c")), 400, "missing Upgrade: websocket"),
            (with_replaced("Connection", Some("Connection: keep-alive")), 400, "missing Connection: upgrade"),
            (with_replaced("Sec-WebSocket-Version", None), 426, "Sec-WebSocket-Version 13 required"),
            (
                with_replaced("Sec-WebSocket-Version", Some("Sec-WebSocket-Version: 8")),
                426,
                "Sec-WebSocket-Version 13 required",
            ),
            (with_replaced("Sec-WebSocket-Key", None), 400, "missing Sec-WebSocket-Key"),
            (
                with_replaced("Sec-WebSocket-Key", Some("Sec-WebSocket-Key: c2hvcnQ=")),
                400,
                "Sec-WebSocket-Key is not 16 bytes in base64",
            ),
            (
                with_replaced("Sec-WebSocket-Key", Some("Sec-WebSocket-Key: !!!notbase64!!!!!!!!!==")),
                400,
                "Sec-WebSocket-Key is not 16 bytes in base64",
            ),
            (
                with_replaced(
                    "Sec-WebSocket-Version",
                    Some("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="),
                ),
                400,
                "repeated Sec-WebSocket-Key",
            ),
            (with_replaced("Sec-WebSocket-Protocol", None), 400, REASON_NO_MQTT_SUBPROTOCOL),
            (
                with_replaced("Sec-WebSocket-Protocol", Some("Sec-WebSocket-Protocol: MQTT, wamp")),
                400,
                REASON_NO_MQTT_SUBPROTOCOL,
            ),
            (with_replaced("Upgrade", Some("Upgrade : websocket")), 400, "malformed header line"),
            (with_replaced("Upgrade", Some("no colon here")), 400, "malformed header line"),
            (b"GET /mqtt HTTP/1.1\r\nX: \xff\r\n\r\n".to_vec(), 400, "request header is not UTF-8"),
        ];
        for (buf, status, reason) in cases {
            let refusal = refusal_of(&buf);
            assert_eq!(
                (refusal.status, refusal.reason),
                (status, reason),
                "request {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
    }

    #[test]
    fn oversized_request_is_431() {
        let mut buf = b"GET /mqtt HTTP/1.1\r\n".to_vec();
        buf.resize(100, b'x');
        assert_eq!(accept(&buf, "/mqtt", 100).unwrap_err().status, 431);
        assert_eq!(accept(&buf[..99], "/mqtt", 100), Ok(None));
        // A complete request longer than the bound is refused too.
        let buf = request("/mqtt", &good_headers());
        let refusal = accept(&buf, "/mqtt", buf.len() - 1).unwrap_err();
        assert_eq!(refusal.status, 431);
        assert!(accept(&buf, "/mqtt", buf.len()).unwrap().is_some());
    }

    #[test]
    fn refusal_responses_are_complete_http() {
        let refusal = Refusal::new(426, "Sec-WebSocket-Version 13 required");
        let response = String::from_utf8(refusal.response()).unwrap();
        assert!(response.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert_eq!(header_value(&response, "sec-websocket-version"), Some("13"));
        assert_eq!(header_value(&response, "connection"), Some("close"));
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "Sec-WebSocket-Version 13 required");
        assert_eq!(header_value(head, "content-length"), Some(body.len().to_string().as_str()));
        let response = String::from_utf8(Refusal::new(400, "x").response()).unwrap();
        assert!(response.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(!response.contains("Sec-WebSocket-Version"));
    }

    // ---- frames -----------------------------------------------------------------------------

    /// Builds one client frame: masked with `mask` (when given), in the length form `form`
    /// (7, 16 or 64) regardless of the payload's size, with `rsv` in bits 4-6 of byte 0.
    fn client_frame_with(
        fin: bool,
        rsv: u8,
        opcode: u8,
        mask: Option<[u8; 4]>,
        form: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut frame = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match form {
            7 => frame.push(mask_bit | payload.len() as u8),
            16 => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            _ => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
        }
        match mask {
            Some(mask) => {
                frame.extend_from_slice(&mask);
                frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
            None => frame.extend_from_slice(payload),
        }
        frame
    }

    fn shortest_form(len: usize) -> u8 {
        match len {
            0..=125 => 7,
            126..=65535 => 16,
            _ => 64,
        }
    }

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        client_frame_with(fin, 0, opcode, Some(mask), shortest_form(payload.len()), payload)
    }

    /// One server frame parsed back: (fin, opcode, payload, bytes used). Asserts it is unmasked
    /// and in the shortest length form.
    fn parse_server_frame(buf: &[u8]) -> (bool, u8, Vec<u8>, usize) {
        let fin = buf[0] & 0x80 != 0;
        assert_eq!(buf[0] & 0x70, 0, "server RSV bits");
        let opcode = buf[0] & 0x0F;
        assert_eq!(buf[1] & 0x80, 0, "server frames are unmasked");
        let (len, header) = match buf[1] & 0x7F {
            126 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
            len => (len as usize, 2),
        };
        let expected_header = match shortest_form(len) {
            7 => 2,
            16 => 4,
            _ => 10,
        };
        assert_eq!(header, expected_header, "shortest length form for {len}");
        (fin, opcode, buf[header..header + len].to_vec(), header + len)
    }

    fn feed_all(frames: &[u8]) -> (Result<Inbound, WsError>, BytesMut, BytesMut, BytesMut) {
        let mut deframer = Deframer::new();
        let mut raw = BytesMut::from(frames);
        let (mut out, mut reply) = (BytesMut::new(), BytesMut::new());
        let result = deframer.feed(&mut raw, &mut out, &mut reply);
        (result, raw, out, reply)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn deframer_stays_small() {
        assert!(std::mem::size_of::<Deframer>() <= 24);
    }

    #[test]
    fn every_length_form_decodes() {
        let lengths = [0, 1, 125, 126, 127, 1000, 65535, 65536, 70000];
        for len in lengths {
            for form in [7u8, 16, 64] {
                if (form == 7 && len > 125) || (form == 16 && len > 65535) {
                    continue;
                }
                let payload = pattern(len);
                let frame = client_frame_with(true, 0, OPCODE_BINARY, Some([9, 8, 7, 6]), form, &payload);
                let (result, raw, out, reply) = feed_all(&frame);
                assert_eq!(result, Ok(Inbound::Open), "len {len} form {form}");
                assert!(raw.is_empty());
                assert_eq!(&out[..], &payload[..], "len {len} form {form}");
                assert!(reply.is_empty());
            }
        }
    }

    #[test]
    fn masking_is_undone() {
        let payload = b"\x10\x0c\x00\x04MQTT\x05\x02\x00\x3c";
        let frame = client_frame_with(true, 0, OPCODE_BINARY, Some([0xff; 4]), 7, payload);
        assert_ne!(&frame[6..], &payload[..], "the wire bytes are masked");
        let (_, _, out, _) = feed_all(&frame);
        assert_eq!(&out[..], &payload[..]);
        // A zero mask leaves the bytes as they are.
        let frame = client_frame_with(true, 0, OPCODE_BINARY, Some([0; 4]), 7, payload);
        assert_eq!(&frame[6..], &payload[..]);
        assert_eq!(&feed_all(&frame).2[..], &payload[..]);
    }

    #[test]
    fn fragmented_message_with_ping_in_the_middle() {
        let mut stream = client_frame(false, OPCODE_BINARY, b"hello ");
        stream.extend(client_frame(true, OPCODE_PING, b"are you there"));
        stream.extend(client_frame(false, OPCODE_CONTINUATION, b""));
        stream.extend(client_frame(true, OPCODE_PONG, b"unsolicited"));
        stream.extend(client_frame(true, OPCODE_CONTINUATION, b"world"));
        stream.extend(client_frame(true, OPCODE_BINARY, b"!"));
        let (result, raw, out, reply) = feed_all(&stream);
        assert_eq!(result, Ok(Inbound::Open));
        assert!(raw.is_empty());
        assert_eq!(&out[..], b"hello world!");
        let (fin, opcode, payload, used) = parse_server_frame(&reply);
        assert_eq!((fin, opcode, &payload[..]), (true, OPCODE_PONG, &b"are you there"[..]));
        assert_eq!(used, reply.len(), "the pong is the only reply");
    }

    #[test]
    fn close_is_echoed_and_later_bytes_discarded() {
        let mut stream = client_frame(true, OPCODE_BINARY, b"\xe0\x00");
        let mut close_payload = 4001u16.to_be_bytes().to_vec();
        close_payload.extend_from_slice("bye ✓".as_bytes());
        stream.extend(client_frame(true, OPCODE_CLOSE, &close_payload));
        stream.extend(client_frame(true, OPCODE_BINARY, b"after close"));
        let mut deframer = Deframer::new();
        let mut raw = BytesMut::from(&stream[..]);
        let (mut out, mut reply) = (BytesMut::new(), BytesMut::new());
        assert_eq!(deframer.feed(&mut raw, &mut out, &mut reply), Ok(Inbound::Closed));
        assert!(raw.is_empty());
        assert_eq!(&out[..], b"\xe0\x00", "payload before the Close is kept");
        let (_, opcode, payload, _) = parse_server_frame(&reply);
        assert_eq!((opcode, &payload[..]), (OPCODE_CLOSE, &4001u16.to_be_bytes()[..]));
        raw.extend_from_slice(&client_frame(true, OPCODE_BINARY, b"more"));
        assert_eq!(deframer.feed(&mut raw, &mut out, &mut reply), Ok(Inbound::Closed));
        assert!(raw.is_empty());
        assert_eq!(&out[..], b"\xe0\x00");

        // An empty Close is answered with 1000.
        let (result, _, _, reply) = feed_all(&client_frame(true, OPCODE_CLOSE, b""));
        assert_eq!(result, Ok(Inbound::Closed));
        assert_eq!(parse_server_frame(&reply).2, CLOSE_NORMAL.to_be_bytes());
    }

    #[test]
    fn partial_headers_stay_in_raw_and_payload_streams() {
        let payload = pattern(300);
        let frame = client_frame(true, OPCODE_BINARY, &payload);
        assert_eq!(frame.len(), 2 + 2 + 4 + 300);
        let mut deframer = Deframer::new();
        let (mut out, mut reply) = (BytesMut::new(), BytesMut::new());
        // 7 of the 8 header bytes: nothing consumed.
        let mut raw = BytesMut::from(&frame[..7]);
        assert_eq!(deframer.feed(&mut raw, &mut out, &mut reply), Ok(Inbound::Open));
        assert_eq!(raw.len(), 7);
        assert!(out.is_empty());
        // The rest of the header and 100 payload bytes: those 100 come out now.
        raw.extend_from_slice(&frame[7..108]);
        assert_eq!(deframer.feed(&mut raw, &mut out, &mut reply), Ok(Inbound::Open));
        assert!(raw.is_empty());
        assert_eq!(&out[..], &payload[..100]);
        raw.extend_from_slice(&frame[108..]);
        assert_eq!(deframer.feed(&mut raw, &mut out, &mut reply), Ok(Inbound::Open));
        assert_eq!(&out[..], &payload[..]);

        // A control frame waits until it is whole.
        let ping = client_frame(true, OPCODE_PING, &pattern(125));
        let mut raw = BytesMut::from(&ping[..ping.len() - 1]);
        assert_eq!(deframer.feed(&mut raw, &mut out, &mut reply), Ok(Inbound::Open));
        assert_eq!(raw.len(), FEED_LEFTOVER_BYTES_MAX);
        assert!(reply.is_empty());
        raw.extend_from_slice(&ping[ping.len() - 1..]);
        assert_eq!(deframer.feed(&mut raw, &mut out, &mut reply), Ok(Inbound::Open));
        assert!(raw.is_empty());
        assert_eq!(parse_server_frame(&reply).2, pattern(125));
    }

    #[test]
    fn errors_and_their_close_codes() {
        let mask = Some([1, 2, 3, 4]);
        let open_message = client_frame(false, OPCODE_BINARY, b"a");
        let cases: Vec<(Vec<u8>, WsError, u16)> = vec![
            (client_frame_with(true, 0, OPCODE_BINARY, None, 7, b"x"), WsError::Unmasked, 1002),
            (client_frame_with(true, 0b100, OPCODE_BINARY, mask, 7, b"x"), WsError::ReservedBits, 1002),
            (client_frame_with(true, 0b001, OPCODE_PING, mask, 7, b""), WsError::ReservedBits, 1002),
            (client_frame(true, OPCODE_TEXT, b"hi"), WsError::TextFrame, 1003),
            (client_frame(true, 0x3, b""), WsError::UnknownOpcode(0x3), 1002),
            (client_frame(true, 0xB, b""), WsError::UnknownOpcode(0xB), 1002),
            (client_frame(true, OPCODE_CONTINUATION, b"x"), WsError::ContinuationWithoutMessage, 1002),
            (
                [open_message.clone(), client_frame(true, OPCODE_BINARY, b"b")].concat(),
                WsError::DataFrameInsideMessage,
                1002,
            ),
            ([open_message, client_frame(true, OPCODE_TEXT, b"b")].concat(), WsError::TextFrame, 1003),
            (client_frame(false, OPCODE_PING, b""), WsError::ControlFrameFragmented, 1002),
            (
                client_frame_with(true, 0, OPCODE_PING, mask, 16, &pattern(126)),
                WsError::ControlFrameTooLong(126),
                1002,
            ),
            (
                {
                    let mut frame = vec![0x82, 0x80 | 127];
                    frame.extend_from_slice(&(1u64 << 63).to_be_bytes());
                    frame.extend_from_slice(&[1, 2, 3, 4]);
                    frame
                },
                WsError::LengthTopBitSet,
                1002,
            ),
            (client_frame(true, OPCODE_CLOSE, b"\x03"), WsError::CloseCodeTruncated, 1002),
            (client_frame(true, OPCODE_CLOSE, &1005u16.to_be_bytes()), WsError::CloseCodeInvalid(1005), 1002),
            (client_frame(true, OPCODE_CLOSE, &999u16.to_be_bytes()), WsError::CloseCodeInvalid(999), 1002),
            (client_frame(true, OPCODE_CLOSE, b"\x03\xe8\xff\xfe"), WsError::CloseReasonNotUtf8, 1007),
        ];
        for (stream, error, code) in cases {
            let (result, _, _, _) = feed_all(&stream);
            assert_eq!(result, Err(error.clone()), "stream {stream:02x?}");
            assert_eq!(error.close_code(), code, "{error}");
            assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn errors_show_as_soon_as_the_first_two_bytes_arrive() {
        let frame = client_frame_with(true, 0, OPCODE_BINARY, None, 64, &pattern(200));
        let (result, _, _, _) = feed_all(&frame[..2]);
        assert_eq!(result, Err(WsError::Unmasked));
    }

    // ---- seeded splits ------------------------------------------------------------------------

    /// xorshift64*: a tiny deterministic generator, so a failing seed can be replayed.
    struct TestRng(u64);

    impl TestRng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, bound: u64) -> u64 {
            self.next() % bound
        }
    }

    /// A random valid client stream: fragmented binary messages in every length form with
    /// pings and pongs between fragments, then a Close. Returns the stream, the payload the
    /// server must read (the naive model) and the pings' payloads in order.
    fn random_stream(rng: &mut TestRng) -> (Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
        let (mut stream, mut expected_out, mut pings) = (Vec::new(), Vec::new(), Vec::new());
        for _message in 0..rng.below(6) + 1 {
            let fragment_count = rng.below(4) + 1;
            for fragment in 0..fragment_count {
                let len = match rng.below(10) {
                    0 => 0,
                    1..=5 => rng.below(126) as usize,
                    6..=8 => 126 + rng.below(2000) as usize,
                    _ => 65536 + rng.below(300) as usize,
                };
                let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let opcode = if fragment == 0 { OPCODE_BINARY } else { OPCODE_CONTINUATION };
                let mask = (rng.next() as u32).to_be_bytes();
                let fin = fragment + 1 == fragment_count;
                stream.extend(client_frame_with(fin, 0, opcode, Some(mask), shortest_form(len), &payload));
                expected_out.extend_from_slice(&payload);
                if rng.below(3) == 0 {
                    let control_payload: Vec<u8> = (0..rng.below(126)).map(|_| rng.next() as u8).collect();
                    let opcode = if rng.below(2) == 0 { OPCODE_PING } else { OPCODE_PONG };
                    if opcode == OPCODE_PING {
                        pings.push(control_payload.clone());
                    }
                    let mask = (rng.next() as u32).to_be_bytes();
                    stream.extend(client_frame_with(true, 0, opcode, Some(mask), 7, &control_payload));
                }
            }
        }
        stream.extend(client_frame(true, OPCODE_CLOSE, &CLOSE_NORMAL.to_be_bytes()));
        (stream, expected_out, pings)
    }

    /// Feeds `stream` in chunks whose sizes `chunk_len` picks; returns out, reply and the result
    /// of the last feed. Checks the leftover bound after every feed.
    fn feed_in_chunks(
        stream: &[u8],
        mut chunk_len: impl FnMut() -> usize,
    ) -> (BytesMut, BytesMut, Result<Inbound, WsError>) {
        let mut deframer = Deframer::new();
        let (mut raw, mut out, mut reply) = (BytesMut::new(), BytesMut::new(), BytesMut::new());
        let mut result = Ok(Inbound::Open);
        let mut position = 0;
        while position < stream.len() {
            let end = (position + chunk_len().max(1)).min(stream.len());
            raw.extend_from_slice(&stream[position..end]);
            position = end;
            result = deframer.feed(&mut raw, &mut out, &mut reply);
            match result {
                Ok(Inbound::Open) => assert!(raw.len() <= FEED_LEFTOVER_BYTES_MAX),
                _ => break,
            }
        }
        (out, reply, result)
    }

    fn pongs_of(mut reply: &[u8]) -> (Vec<Vec<u8>>, Option<Vec<u8>>) {
        let (mut pongs, mut close) = (Vec::new(), None);
        while !reply.is_empty() {
            let (fin, opcode, payload, used) = parse_server_frame(reply);
            assert!(fin);
            match opcode {
                OPCODE_PONG => pongs.push(payload),
                OPCODE_CLOSE => close = Some(payload),
                other => panic!("unexpected server opcode {other:#x}"),
            }
            reply = &reply[used..];
        }
        (pongs, close)
    }

    #[test]
    fn random_splits_give_the_same_output_as_one_feed() {
        for seed in 1..=40u64 {
            let mut rng = TestRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let (stream, expected_out, pings) = random_stream(&mut rng);

            let (whole_out, whole_reply, whole_result) = feed_in_chunks(&stream, || stream.len());
            assert_eq!(whole_result, Ok(Inbound::Closed), "seed {seed}");
            assert!(whole_out[..] == expected_out[..], "seed {seed}: output differs from the model");
            let (pongs, close) = pongs_of(&whole_reply);
            assert_eq!(pongs, pings, "seed {seed}");
            assert_eq!(close, Some(CLOSE_NORMAL.to_be_bytes().to_vec()), "seed {seed}");

            let (out, reply, result) = feed_in_chunks(&stream, || rng.below(300) as usize + 1);
            assert_eq!(result, Ok(Inbound::Closed), "seed {seed}");
            assert!(out == whole_out, "seed {seed}: random splits change the output");
            assert_eq!(reply, whole_reply, "seed {seed}");

            if seed <= 4 {
                let (out, reply, result) = feed_in_chunks(&stream, || 1);
                assert_eq!(result, Ok(Inbound::Closed), "seed {seed}");
                assert!(out == whole_out, "seed {seed}: byte-at-a-time changes the output");
                assert_eq!(reply, whole_reply, "seed {seed}");
            }
        }
    }

    // ---- server frames ----------------------------------------------------------------------

    #[test]
    fn server_frames_round_trip_in_every_length_form() {
        for len in [0, 1, 125, 126, 65535, 65536, 100_000] {
            let payload = pattern(len);
            let mut wire = BytesMut::new();
            encode_binary(&payload, &mut wire);
            let (fin, opcode, parsed, used) = parse_server_frame(&wire);
            assert_eq!((fin, opcode, used), (true, OPCODE_BINARY, wire.len()), "len {len}");
            assert!(parsed == payload, "len {len}");

            // The same bytes as a client would send them come out of the deframer unchanged.
            let (result, _, out, _) = feed_all(&client_frame(true, OPCODE_BINARY, &parsed));
            assert_eq!(result, Ok(Inbound::Open));
            assert!(out[..] == payload[..], "len {len}");
        }
    }

    #[test]
    fn close_frames_encode_their_code() {
        for code in [1000u16, 1002, 1003, 1009] {
            let mut wire = BytesMut::new();
            encode_close(code, &mut wire);
            assert_eq!(&wire[..], &[0x88, 0x02, (code >> 8) as u8, code as u8]);
        }
    }
}
