//! TLS for the `tls` and `wss` listeners: the server configuration loaded from PEM files (and
//! reloaded on request), and the identity of a verified client certificate (mutual TLS).
//!
//! Owner: one [`TlsAcceptor`] per TLS listener, shared by every shard (`Arc`). Shards read the
//! current configuration at each accept; a reload swaps it under a short write lock, so
//! connections already established keep the configuration they started with.
//!
//! The TLS state of a connection (a rustls `ServerConnection`) lives in the connection's layers
//! (`transport.rs`), driven without I/O of its own by the connection tasks.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Where a TLS listener's certificate, key and (for mutual TLS) client CAs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert_file: PathBuf,
    /// The private key of the leaf certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates that sign client certificates (PEM). Set: clients are asked for a
    /// certificate and a presented one must verify.
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: refuse clients that present no certificate (default). False lets
    /// them in without one (the auth provider then decides on username and password).
    pub require_client_cert: bool,
}

/// Why a TLS configuration could not be loaded; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: {what}")]
    Content { path: PathBuf, what: String },
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// A TLS listener's server configuration, reloadable.
#[derive(Debug)]
pub struct TlsAcceptor {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsAcceptor {
    /// Loads the files; an error names the file at fault.
    pub fn load(files: TlsFiles) -> Result<TlsAcceptor, TlsError> {
        let config = build(&files)?;
        Ok(TlsAcceptor { files, current: RwLock::new(config) })
    }

    /// Reads the files again. On error the previous configuration stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.files)?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = config;
        Ok(())
    }

    /// The configuration for a new connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

fn open(path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path).map(BufReader::new).map_err(|error| TlsError::Read { path: path.to_path_buf(), error })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Read { path: path.to_path_buf(), error })?;
    if certs.is_empty() {
        return Err(TlsError::Content { path: path.to_path_buf(), what: "no PEM certificate in it".into() });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|error| TlsError::Read { path: path.to_path_buf(), error })?
        .ok_or_else(|| TlsError::Content {
            path: path.to_path_buf(),
            what: "no PEM private key in it".into(),
        })
}

fn build(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert_file)?;
    let key = read_key(&files.key_file)?;
    let builder = ServerConfig::builder();
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca_file)? {
                roots.add(cert).map_err(|e| TlsError::Content {
                    path: ca_file.clone(),
                    what: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier =
                if files.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            let verifier = verifier.build().map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mismatch = |what: String| TlsError::Content {
        path: files.key_file.clone(),
        what: format!("does not match the certificate in {}: {what}", files.cert_file.display()),
    };
    check_key_matches(&certs[0], &key).map_err(mismatch)?;
    let mut config = builder.with_single_cert(certs, key).map_err(|e| mismatch(e.to_string()))?;
    // Resumption by stateless tickets (rustls's ring ticketer, keys rotated every 6 hours), one
    // per handshake. rustls's defaults (4 tickets and a 256-entry session cache behind one mutex
    // shared by all shards) cost four ticket derivations and four locked inserts per handshake and
    // forget a client after 64 others.
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    config.send_tls13_tickets = 1;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// Whether `key` is the private key of `cert`: a signature made with the key must verify with the
/// certificate's public key. Without this check a wrong key is found only by failing handshakes.
fn check_key_matches(cert: &CertificateDer<'_>, key: &PrivateKeyDer<'_>) -> Result<(), String> {
    let signing_key = rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| e.to_string())?;
    let mapping = rustls::crypto::ring::default_provider().signature_verification_algorithms.mapping;
    let schemes: Vec<_> = mapping.iter().map(|(scheme, _)| *scheme).collect();
    let signer = signing_key.choose_scheme(&schemes).ok_or("the key's type is not supported")?;
    let message = b"shardmq: does this key belong to this certificate?";
    let signature = signer.sign(message).map_err(|e| e.to_string())?;
    let algorithms =
        mapping.iter().find(|(scheme, _)| *scheme == signer.scheme()).map_or(&[][..], |(_, a)| *a);
    let cert = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("bad certificate: {e}"))?;
    if algorithms.iter().any(|alg| cert.verify_signature(*alg, message, &signature).is_ok()) {
        Ok(())
    } else {
        Err("a signature made with the key does not verify with the certificate".into())
    }
}

/// What a verified client certificate says about its holder, for the auth provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject as an RFC 4514 string (e.g. `CN=alice,O=Example`).
    pub subject: String,
    /// The subject's first common name.
    pub common_name: Option<String>,
    /// Subject alternative names: DNS names, e-mail addresses, URIs and IP addresses, as text.
    pub sans: Vec<String>,
}

impl ClientCert {
    /// Reads the leaf certificate (DER) a TLS handshake verified. `None` if it does not parse
    /// (it verified, so this does not happen in practice).
    pub fn from_der(der: &[u8]) -> Option<ClientCert> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject().to_string();
        let common_name =
            cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                        sans.push((*s).to_owned())
                    }
                    GeneralName::IPAddress(bytes) => match bytes.len() {
                        4 => {
                            sans.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string())
                        }
                        16 => sans
                            .push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string()),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Some(ClientCert { subject, common_name, sans })
    }
}
