//! Listeners: several MQTT ports, each with its kind, connection limit, default tenant and PROXY
//! protocol switch; and the PROXY protocol v1/v2 header parser (pure functions over bytes).
//!
//! Owner: the listener settings are part of the broker config (read-only); each listener's live
//! connection count is an atomic shared by all shards, held by a [`ListenerSlot`] for the life of
//! each connection (the slot travels with a handed-off socket and is released when the
//! connection's state is dropped).
//!
//! Bounds: a PROXY header is at most 107 bytes (v1) or 16 + 65,535 bytes (v2, refused above
//! [`PROXY_V2_LEN_MAX`]); a connection that has not completed it within the connect timeout is
//! closed like one that sends no CONNECT.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::message::TenantId;
use crate::tls::{TlsAcceptor, TlsFiles};
use crate::transport::{LayerError, Layers};

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }
}

/// One listener's settings.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub kind: ListenerKind,
    /// Expect a PROXY protocol v1 or v2 header before MQTT; its source address is the client's.
    pub proxy_protocol: bool,
    /// Live connections on this listener across all shards; more are closed at accept.
    pub max_connections: Option<u64>,
    /// The tenant of its clients when the auth provider does not name one (allow-all).
    pub default_tenant: TenantId,
    /// Certificate, key and client CAs: required by `tls` and `wss`, refused by the others.
    pub tls: Option<TlsFiles>,
    /// The HTTP path of the WebSocket upgrade (`ws` and `wss`; default [`WS_PATH_DEFAULT`]).
    pub ws_path: Option<String>,
}

/// Where MQTT over WebSocket is served unless a listener says otherwise (the usual `/mqtt`).
pub const WS_PATH_DEFAULT: &str = "/mqtt";

impl ListenerConfig {
    pub fn tcp(address: SocketAddr) -> ListenerConfig {
        ListenerConfig {
            address,
            kind: ListenerKind::Tcp,
            proxy_protocol: false,
            max_connections: None,
            default_tenant: TenantId::default(),
            tls: None,
            ws_path: None,
        }
    }

    /// Checks that the kind and its settings agree.
    pub fn validate(&self) -> Result<(), String> {
        let wants_tls = matches!(self.kind, ListenerKind::Tls | ListenerKind::Wss);
        let wants_ws = matches!(self.kind, ListenerKind::Ws | ListenerKind::Wss);
        match (wants_tls, self.tls.is_some()) {
            (true, false) => {
                return Err(format!(
                    "listener {} of kind {} needs cert_file and key_file",
                    self.address,
                    self.kind.name()
                ))
            }
            (false, true) => {
                return Err(format!(
                    "listener {} of kind {} takes no certificate (use kind tls or wss)",
                    self.address,
                    self.kind.name()
                ))
            }
            _ => {}
        }
        if let Some(path) = &self.ws_path {
            if !wants_ws {
                return Err(format!("listener {}: ws_path is only for kinds ws and wss", self.address));
            }
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return Err(format!(
                    "listener {}: ws_path {path:?} must start with / and hold no spaces",
                    self.address
                ));
            }
        }
        Ok(())
    }
}

/// A listener at run time: its settings and its live connection count.
#[derive(Debug)]
pub struct ListenerInfo {
    pub index: usize,
    pub config: ListenerConfig,
    pub live: Arc<AtomicU64>,
    /// Connections refused by `max_connections`, and PROXY headers refused.
    pub refused_full: AtomicU64,
    pub proxy_errors: AtomicU64,
    /// Connections closed for failed TLS (handshake, certificate, records) and for failed
    /// WebSocket upgrades or frames.
    pub tls_errors: AtomicU64,
    pub ws_errors: AtomicU64,
    /// The TLS configuration of a `tls` or `wss` listener.
    pub tls: Option<Arc<TlsAcceptor>>,
    /// The WebSocket path of a `ws` or `wss` listener.
    pub ws_path: Option<Arc<str>>,
}

impl ListenerInfo {
    /// The run-time state of listener `index`: loads its TLS files (an error names the file).
    pub fn new(index: usize, config: ListenerConfig) -> Result<ListenerInfo, String> {
        config.validate()?;
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(
                TlsAcceptor::load(files.clone()).map_err(|e| format!("listener {}: {e}", config.address))?,
            )),
            None => None,
        };
        let ws_path = matches!(config.kind, ListenerKind::Ws | ListenerKind::Wss)
            .then(|| Arc::from(config.ws_path.as_deref().unwrap_or(WS_PATH_DEFAULT)));
        Ok(ListenerInfo {
            index,
            config,
            live: Default::default(),
            refused_full: Default::default(),
            proxy_errors: Default::default(),
            tls_errors: Default::default(),
            ws_errors: Default::default(),
            tls,
            ws_path,
        })
    }

    /// The layers of a new connection; `None` for plain TCP.
    pub fn new_layers(&self) -> Option<Result<Box<Layers>, LayerError>> {
        if self.tls.is_none() && self.ws_path.is_none() {
            return None;
        }
        let tls = self.tls.as_ref().map(|acceptor| acceptor.config());
        Some(Layers::new(tls, self.ws_path.clone()).map(Box::new))
    }

    /// Counts a layer failure on its counter.
    pub fn count_layer_error(&self, error: &LayerError) {
        match error {
            LayerError::Tls(_) => &self.tls_errors,
            LayerError::Upgrade(_) | LayerError::WebSocket(_) => &self.ws_errors,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a place for a new connection; `None` when the listener is full.
    pub fn take_slot(&self) -> Option<ListenerSlot> {
        let now = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        if self.config.max_connections.is_some_and(|max| now > max) {
            self.live.fetch_sub(1, Ordering::SeqCst);
            self.refused_full.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(ListenerSlot(self.live.clone()))
    }
}

/// One connection's place on its listener; released on drop.
#[derive(Debug)]
pub struct ListenerSlot(Arc<AtomicU64>);

impl Drop for ListenerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The v2 signature.
const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v2 header accepted (addresses plus TLVs).
pub const PROXY_V2_LEN_MAX: usize = 4096;

/// What a PROXY header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The client's address (the source of the proxied connection).
    Proxied(SocketAddr),
    /// A health check or an unknown protocol: keep the socket's own peer address.
    Local,
}

/// Why a PROXY header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    NotProxy,
    Malformed(&'static str),
    TooLong,
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyError::NotProxy => write!(f, "no PROXY protocol header"),
            ProxyError::Malformed(what) => write!(f, "malformed PROXY header: {what}"),
            ProxyError::TooLong => write!(f, "PROXY header too long"),
        }
    }
}

/// Parses a PROXY header at the front of `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some((header, length)))` when complete.
pub fn parse_proxy(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == b'P' {
        return parse_v1(buf);
    }
    if buf[0] == b'\r' {
        return parse_v2(buf);
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    const MAX: usize = 107;
    let prefix = b"PROXY ";
    let n = buf.len().min(prefix.len());
    if buf[..n] != prefix[..n] {
        return Err(ProxyError::NotProxy);
    }
    let Some(end) = buf.windows(2).take(MAX).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX { Err(ProxyError::TooLong) } else { Ok(None) };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::Malformed("not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let header = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => ProxyHeader::Local,
        ["PROXY", family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| ProxyError::Malformed("source address"))?;
            if (*family == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError::Malformed("address family"));
            }
            let port: u16 = sport.parse().map_err(|_| ProxyError::Malformed("source port"))?;
            ProxyHeader::Proxied(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::Malformed("v1 fields")),
    };
    Ok(Some((header, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let n = buf.len().min(12);
    if buf[..n] != PROXY_V2_SIGNATURE[..n] {
        return Err(ProxyError::NotProxy);
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > PROXY_V2_LEN_MAX {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let total = 16 + len;
    match version_command & 0x0F {
        0 => return Ok(Some((ProxyHeader::Local, total))),
        1 => {}
        _ => return Err(ProxyError::Malformed("v2 command")),
    }
    let header = match buf[13] >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            ProxyHeader::Proxied(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([body[8], body[9]])))
        }
        2 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let ip = Ipv6Addr::from(octets);
            ProxyHeader::Proxied(SocketAddr::new(IpAddr::V6(ip), u16::from_be_bytes([body[32], body[33]])))
        }
        1 | 2 => return Err(ProxyError::Malformed("v2 address length")),
        // AF_UNSPEC or AF_UNIX: no usable address.
        _ => ProxyHeader::Local,
    };
    Ok(Some((header, total)))
}

/// A v2 header for `source` -> `destination` (TCP), for tests and tools.
pub fn proxy_v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = PROXY_V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_headers() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 1883\r\nrest";
        let (header, len) = parse_proxy(line).unwrap().unwrap();
        assert_eq!(header, ProxyHeader::Proxied("203.0.113.7:5555".parse().unwrap()));
        assert_eq!(&line[len..], b"rest");
        let v6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 1883\r\n";
        assert_eq!(
            parse_proxy(v6).unwrap().unwrap().0,
            ProxyHeader::Proxied("[2001:db8::1]:4000".parse().unwrap())
        );
        assert_eq!(parse_proxy(b"PROXY UNKNOWN\r\n").unwrap().unwrap().0, ProxyHeader::Local);
        // Incomplete, at every cut.
        for cut in 1..line.len() - 6 {
            assert_eq!(parse_proxy(&line[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            parse_proxy(b"PROXY TCP4 300.0.0.1 1.1.1.1 1 2\r\n"),
            Err(ProxyError::Malformed("source address"))
        );
        assert_eq!(
            parse_proxy(b"PROXY TCP6 1.2.3.4 1.1.1.1 1 2\r\n"),
            Err(ProxyError::Malformed("address family"))
        );
        assert_eq!(
            parse_proxy(b"PROXY TCP4 1.2.3.4 1.1.1.1 x 2\r\n"),
            Err(ProxyError::Malformed("source port"))
        );
        assert_eq!(parse_proxy(&[b'P'; 200]), Err(ProxyError::NotProxy));
        let long = [b"PROXY ".as_slice(), &[b'x'; 150]].concat();
        assert_eq!(parse_proxy(&long), Err(ProxyError::TooLong));
        // An MQTT CONNECT is not a PROXY header.
        assert_eq!(parse_proxy(&[0x10, 0x0C, 0, 4]), Err(ProxyError::NotProxy));
    }

    #[test]
    fn v2_headers() {
        let source: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let header = proxy_v2_header(source, "10.0.0.1:1883".parse().unwrap());
        assert_eq!(parse_proxy(&header), Ok(Some((ProxyHeader::Proxied(source), header.len()))));
        for cut in 1..header.len() {
            assert_eq!(parse_proxy(&header[..cut]), Ok(None), "cut at {cut}");
        }
        let v6: SocketAddr = "[2001:db8::7]:4242".parse().unwrap();
        let header = proxy_v2_header(v6, "[2001:db8::1]:1883".parse().unwrap());
        assert_eq!(parse_proxy(&header).unwrap().unwrap().0, ProxyHeader::Proxied(v6));
        let mut local = PROXY_V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse_proxy(&local), Ok(Some((ProxyHeader::Local, 16))));
        let mut bad = proxy_v2_header(source, source);
        bad[12] = 0x31;
        assert_eq!(parse_proxy(&bad), Err(ProxyError::Malformed("v2 version")));
        let mut short = PROXY_V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(parse_proxy(&short), Err(ProxyError::Malformed("v2 address length")));
        let mut huge = PROXY_V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(parse_proxy(&huge), Err(ProxyError::TooLong));
    }

    #[test]
    fn slots_bound_a_listener() {
        let config = ListenerConfig {
            max_connections: Some(2),
            ..ListenerConfig::tcp("127.0.0.1:0".parse().unwrap())
        };
        let info = ListenerInfo::new(0, config).unwrap();
        let a = info.take_slot().unwrap();
        let _b = info.take_slot().unwrap();
        assert!(info.take_slot().is_none());
        drop(a);
        assert!(info.take_slot().is_some());
        assert_eq!(info.refused_full.load(Ordering::Relaxed), 1);
    }
}
