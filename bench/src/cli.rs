//! Command-line arguments shared by every scenario: where the broker is, whether to speak TLS to
//! it, which MQTT version, how many worker threads, and the topic / client-id namespace of the run.
//!
//! Owns: parsing and resolving those, and their JSON echo in the result line. Does not own the
//! scenario-specific flags (each scenario module declares its own).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use shardmq_protocol::ProtocolVersion;

use crate::mqtt::parse_version;
use crate::stream::TlsSettings;

/// The broker and client settings every scenario takes.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Broker host name or address.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker MQTT port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Speak MQTT over TLS. The server certificate is verified against --cafile (there is no
    /// option to skip verification).
    #[arg(long, requires = "cafile")]
    pub tls: bool,
    /// CA certificates (PEM) that the broker's certificate must chain to; with --tls.
    #[arg(long, requires = "tls")]
    pub cafile: Option<PathBuf>,
    /// Name the broker's certificate must carry, a DNS name or an IP address (default: --host).
    #[arg(long, requires = "tls")]
    pub server_name: Option<String>,
    /// MQTT version of every client: 3.1, 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1")]
    pub mqtt: String,
    /// Worker threads (default: the number of online CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Topic namespace of the run (default: shardmq-bench/<pid>, so concurrent runs do not meet).
    #[arg(long)]
    pub topic_prefix: Option<String>,
    /// Keep-alive in the CONNECT, seconds; clients send PINGREQ when idle (0 disables).
    #[arg(long, default_value_t = 30)]
    pub keep_alive: u16,
    /// User name every client sends (a broker with authentication places it in a tenant).
    #[arg(long)]
    pub username: Option<String>,
    /// Password every client sends with --username.
    #[arg(long)]
    pub password: Option<String>,
}

impl Target {
    /// The credentials every client sends, if any.
    pub fn credentials(&self) -> Option<(String, String)> {
        self.username.clone().map(|user| (user, self.password.clone().unwrap_or_default()))
    }

    /// The TLS settings every client uses, or `None` for plain TCP. Loads `--cafile`.
    pub fn tls_settings(&self) -> anyhow::Result<Option<TlsSettings>> {
        if !self.tls {
            return Ok(None);
        }
        let cafile = self.cafile.as_deref().context("--tls needs --cafile")?;
        let server_name = self.server_name.as_deref().unwrap_or(&self.host);
        TlsSettings::load(cafile, server_name).map(Some)
    }

    /// The TLS flags, to pass on to a child process of the same run.
    pub fn tls_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.tls {
            args.push("--tls".to_string());
        }
        if let Some(cafile) = &self.cafile {
            args.extend(["--cafile".to_string(), cafile.display().to_string()]);
        }
        if let Some(server_name) = &self.server_name {
            args.extend(["--server-name".to_string(), server_name.clone()]);
        }
        args
    }

    /// The broker's socket address (the first one the host resolves to).
    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}:{}", self.host, self.port))?
            .next()
            .with_context(|| format!("{} resolves to no address", self.host))
    }

    pub fn version(&self) -> anyhow::Result<ProtocolVersion> {
        parse_version(&self.mqtt)
    }

    /// Worker threads to use for `clients` connections: never more threads than connections.
    pub fn threads_for(&self, clients: u64) -> usize {
        let wanted = self.threads.unwrap_or_else(crate::env::nproc).max(1);
        wanted.min(clients.max(1) as usize)
    }

    pub fn topic_prefix(&self) -> String {
        self.topic_prefix.clone().unwrap_or_else(|| format!("shardmq-bench/{}", std::process::id()))
    }

    /// A client-id prefix unique to this process, so runs and `--procs` children do not take over
    /// each other's sessions.
    pub fn client_id_prefix(&self) -> String {
        format!("sb{}", std::process::id())
    }

    /// The parameters echoed in the result line.
    pub fn to_json(&self) -> Value {
        json!({
            "host": self.host,
            "port": self.port,
            "tls": self.tls,
            "cafile": self.cafile,
            "server_name": self.tls.then(|| self.server_name.clone().unwrap_or_else(|| self.host.clone())),
            "mqtt": self.mqtt,
            "threads": self.threads.unwrap_or_else(crate::env::nproc),
            "topic_prefix": self.topic_prefix(),
            "keep_alive_secs": self.keep_alive,
        })
    }
}
