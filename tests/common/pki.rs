//! Certificates for the TLS tests, generated per test (rcgen) and written as PEM files: a CA, a
//! server certificate for `localhost` and 127.0.0.1, and client certificates signed by it.

#![allow(dead_code)] // each test binary uses part of it

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, SanType,
};

/// A certificate authority and where its certificate was written.
pub struct Ca {
    cert: Certificate,
    pub cert_file: PathBuf,
}

/// A leaf certificate's files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::new());
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = Certificate::from_params(params).expect("CA certificate");
        let cert_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert_file, cert.serialize_pem().expect("CA PEM")).expect("write CA");
        Ca { cert, cert_file }
    }

    /// A server certificate for `localhost` and 127.0.0.1, written as `dir/<name>.pem` and
    /// `dir/<name>.key`.
    pub fn server(&self, dir: &Path, name: &str) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]);
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.leaf(dir, name, params)
    }

    /// A client certificate with common name `cn` and an e-mail SAN `<cn>@example.test`.
    pub fn client(&self, dir: &Path, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::new());
        params.distinguished_name.push(DnType::CommonName, cn);
        params.distinguished_name.push(DnType::OrganizationName, "shardmq tests");
        params.subject_alt_names.push(SanType::Rfc822Name(format!("{cn}@example.test")));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.leaf(dir, cn, params)
    }

    fn leaf(&self, dir: &Path, name: &str, params: CertificateParams) -> Leaf {
        let cert = Certificate::from_params(params).expect("leaf certificate");
        let cert_file = dir.join(format!("{name}.pem"));
        let key_file = dir.join(format!("{name}.key"));
        std::fs::write(&cert_file, cert.serialize_pem_with_signer(&self.cert).expect("leaf PEM"))
            .expect("write cert");
        std::fs::write(&key_file, cert.serialize_private_key_pem()).expect("write key");
        Leaf { cert_file, key_file }
    }
}

/// A rustls client configuration trusting `ca_file`, presenting `identity` when given.
pub fn client_config(ca_file: &Path, identity: Option<&Leaf>) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_file) {
        roots.add(cert).expect("CA certificate");
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => {
            let key = std::fs::read(&leaf.key_file).expect("read key");
            let key = rustls_pemfile::private_key(&mut key.as_slice()).expect("PEM").expect("a key");
            builder.with_client_auth_cert(read_certs(&leaf.cert_file), key).expect("client identity")
        }
    };
    std::sync::Arc::new(config)
}

fn read_certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let pem = std::fs::read(path).expect("read certificate");
    rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<_, _>>().expect("PEM certificates")
}
