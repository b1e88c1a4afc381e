//! The byte stream under a client connection: plain TCP, or TLS over TCP (`--tls`).
//!
//! Owns: the TCP connect (with an optional source address), the client TLS configuration loaded
//! from `--cafile`, the TLS handshake, and, for TLS, the rustls `ClientConnection` of each stream.
//!
//! Does not own: MQTT (that is `mqtt.rs`) or any scenario logic.
//!
//! Why the shape: the scenarios drive their sockets by readiness (`ready`, then `try_read` and
//! `try_write` until `WouldBlock`), which an `AsyncRead`/`AsyncWrite` TLS stream cannot offer. So
//! tokio-rustls does the handshake, and then [`TlsStream`] drives the same rustls connection
//! without I/O of its own on that readiness loop: a read pulls ciphertext from the socket with
//! `try_read`, decrypts, and hands over every plaintext byte rustls holds; a write encrypts into
//! rustls and pushes ciphertext with `try_write`. [`Stream`] is an enum, so the plain path costs
//! one predictable branch per system call and no dynamic dispatch.
//!
//! Invariants and bounds:
//! - After [`TlsStream::try_read_buf`] returns, rustls holds no plaintext: everything it decrypted
//!   is in the caller's buffer, so readiness of the socket is the whole truth about readability
//!   (nothing can sit in rustls while the caller waits for the socket).
//! - rustls holds at most its buffer limit (64 KiB by default) of ciphertext not yet written;
//!   while it holds any, [`Stream::wants_write`] is true and the caller awaits writability.
//! - The server certificate is always verified against `--cafile`; there is no way to skip it.
//! - Every handshake is a full one: session resumption is off (see [`TlsSettings::load`]).

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest, Ready};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

/// What every TLS client of a run shares: the configuration (CA roots) and the name the server
/// certificate must carry. Owner: the scenario's shared state, read by every worker thread.
#[derive(Clone)]
pub struct TlsSettings {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// Trusts the CA certificates in `cafile` (PEM) and expects `server_name` (a DNS name or an IP
    /// address) in the server's certificate.
    pub fn load(cafile: &Path, server_name: &str) -> anyhow::Result<TlsSettings> {
        let file = File::open(cafile).with_context(|| format!("opening --cafile {}", cafile.display()))?;
        let mut roots = RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
            let cert = cert.with_context(|| format!("reading {}", cafile.display()))?;
            roots.add(cert).with_context(|| format!("a CA certificate in {}", cafile.display()))?;
        }
        if roots.is_empty() {
            bail!("{} holds no certificate", cafile.display());
        }
        let mut config = ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        // Every connection is a separate device, so every handshake is a full one (certificate
        // verified, no session ticket reused): `conn --tls` measures full handshakes, and no
        // session cache is shared (under a lock) by the worker threads.
        config.resumption = Resumption::disabled();
        let server_name = ServerName::try_from(server_name.to_string())
            .with_context(|| format!("{server_name:?} is not a DNS name or an IP address"))?;
        Ok(TlsSettings { connector: TlsConnector::from(Arc::new(config)), server_name })
    }
}

/// Opens a TCP connection to `target`, bound to `source` when given, and with `tls` runs the TLS
/// handshake on it. A handshake failure is an `io::Error` whose inner error is a `rustls::Error`
/// (see [`is_tls_error`]) or the socket's own error.
///
/// With a source address the socket sets `IP_BIND_ADDRESS_NO_PORT`, so the kernel picks the
/// source port at connect time from the whole 4-tuple space instead of reserving one port per
/// address at bind time: that is what lets several source addresses exceed one address's range.
pub async fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
    tls: Option<&TlsSettings>,
) -> io::Result<Stream> {
    let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(source) = source {
        set_bind_address_no_port(&socket);
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    match tls {
        None => Ok(Stream::Plain(stream)),
        Some(tls) => {
            let handshaken = tls.connector.connect(tls.server_name.clone(), stream).await?;
            let (tcp, tls) = handshaken.into_inner();
            Ok(Stream::Tls(Box::new(TlsStream { tcp, tls })))
        }
    }
}

fn set_bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let enable: libc::c_int = 1;
    // SAFETY: the fd is a live socket owned by `socket` for the duration of the call, and the
    // option value points at a c_int whose size is passed alongside. A failure (old kernel) only
    // means ports are reserved at bind time, which still works for small runs, so it is ignored.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&enable as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// True when `error` came from rustls (a refused certificate, an alert, a protocol error) rather
/// than from the socket.
pub fn is_tls_error(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}

/// A connected client stream. Owner: the one task that connected it.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// Boxed: a rustls connection is about a kilobyte of state, and plain streams should not pay
    /// for it in every `Conn`.
    Tls(Box<TlsStream>),
}

impl Stream {
    /// Waits for the socket to be ready for `interest`. For TLS, ciphertext rustls still holds
    /// adds writability to the interest (see [`Stream::wants_write`]). Cancel-safe.
    pub async fn ready(&self, interest: Interest) -> io::Result<Ready> {
        match self {
            Stream::Plain(tcp) => tcp.ready(interest).await,
            Stream::Tls(tls) => {
                let interest = if tls.tls.wants_write() { interest | Interest::WRITABLE } else { interest };
                tls.tcp.ready(interest).await
            }
        }
    }

    /// Appends what can be read now to `buf` (reserving `chunk_bytes` first); `Ok(0)` is EOF,
    /// `WouldBlock` means nothing is available.
    pub fn try_read_buf(&mut self, buf: &mut BytesMut, chunk_bytes: usize) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => {
                buf.reserve(chunk_bytes);
                tcp.try_read_buf(buf)
            }
            Stream::Tls(tls) => tls.try_read_buf(buf),
        }
    }

    /// Takes what it can of `data` now; `WouldBlock` when it can take nothing.
    pub fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.try_write(data),
            Stream::Tls(tls) => tls.try_write(data),
        }
    }

    /// True when bytes already taken by [`Stream::try_write`] still wait to reach the socket
    /// (TLS ciphertext inside rustls); always false for plain TCP.
    pub fn wants_write(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(tls) => tls.tls.wants_write(),
        }
    }

    /// Pushes bytes held by [`Stream::wants_write`] to the socket without waiting.
    pub fn try_flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(tls) => tls.try_flush(),
        }
    }

    /// Waits for and appends at least one byte to `buf`; `Ok(0)` is EOF.
    pub async fn read_buf(&mut self, buf: &mut BytesMut, chunk_bytes: usize) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => {
                buf.reserve(chunk_bytes);
                tcp.read_buf(buf).await
            }
            Stream::Tls(tls) => loop {
                match tls.try_read_buf(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tls.tcp.readable().await?;
                    }
                    other => return other,
                }
            },
        }
    }

    /// Writes all of `data` (and, for TLS, every byte of ciphertext), waiting as needed.
    pub async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.write_all(data).await,
            Stream::Tls(tls) => {
                while !data.is_empty() {
                    match tls.try_write(data) {
                        Ok(written) => data = &data[written..],
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            tls.tcp.writable().await?;
                        }
                        Err(e) => return Err(e),
                    }
                }
                tls.flush().await
            }
        }
    }

    /// Closes the write side (for TLS, after a close_notify alert).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.shutdown().await,
            Stream::Tls(tls) => {
                tls.tls.send_close_notify();
                tls.flush().await?;
                tls.tcp.shutdown().await
            }
        }
    }
}

/// A TLS client connection driven by readiness: the socket and its rustls state, after the
/// handshake. Owner: the [`Stream`] that holds it. Bounds: see the file's invariants.
#[derive(Debug)]
pub struct TlsStream {
    tcp: TcpStream,
    tls: ClientConnection,
}

/// The socket as `std::io` traits for rustls, without waiting: `WouldBlock` clears tokio's
/// readiness as it should.
struct TryIo<'a>(&'a TcpStream);

impl Read for TryIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for TryIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsStream {
    /// Reads ciphertext until some plaintext comes out (TLS 1.3 session tickets and other
    /// records carry none), then moves all of it to `buf`. `Ok(0)` is EOF, clean or not.
    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            let read = self.tls.read_tls(&mut TryIo(&self.tcp))?;
            let state =
                self.tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let plaintext_bytes = state.plaintext_bytes_to_read();
            if plaintext_bytes > 0 {
                buf.reserve(plaintext_bytes);
                let start = buf.len();
                buf.put_bytes(0, plaintext_bytes);
                let taken = self.tls.reader().read(&mut buf[start..])?;
                assert_eq!(taken, plaintext_bytes, "rustls hands over all the plaintext it announced");
                return Ok(taken);
            }
            if read == 0 || state.peer_has_closed() {
                return Ok(0);
            }
        }
    }

    /// Encrypts what rustls accepts of `data` once the ciphertext it already holds is on the
    /// socket, then pushes what the socket takes.
    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.try_flush()?;
        let taken = self.tls.writer().write(data)?;
        match self.try_flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(taken),
        }
    }

    /// Writes held ciphertext until it is all out; `WouldBlock` when the socket is full.
    fn try_flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut TryIo(&self.tcp))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        loop {
            match self.try_flush() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tcp.writable().await?,
                other => return other,
            }
        }
    }
}
