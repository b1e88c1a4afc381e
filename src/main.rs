//! The `shardmq` binary: command line, configuration file, start-up and shutdown.
//!
//! Owns: turning flags and a TOML file into a [`BrokerConfig`] (flags win over the file, the file
//! over the embedded defaults), logging set-up, and the signal handling that stops the shards in
//! reverse start order. Does not own: any broker logic (see `shards/`).

mod admin;
mod webhook;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use shardmq_shards::{BrokerConfig, IoDriver, QueueFullPolicy};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::info;

#[derive(Debug, Parser)]
#[command(name = "shardmq", version, about = "A thread-per-core MQTT 3.1 / 3.1.1 / 5.0 broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(Box<ServeArgs>),
    /// Add a user to (or change one in) a `file` auth provider's users file, with an argon2id
    /// password hash. The password is read from standard input (one line) unless --password.
    Passwd(PasswdArgs),
}

#[derive(Debug, clap::Args)]
struct PasswdArgs {
    /// The users file (TOML; created if missing; its other entries and ACL rules are kept).
    #[arg(long)]
    file: PathBuf,
    #[arg(long)]
    username: String,
    /// The tenant the user's clients belong to.
    #[arg(long, default_value_t = 0)]
    tenant: u32,
    /// The password (visible to other local users in the process list; prefer standard input).
    #[arg(long)]
    password: Option<String>,
    /// Also write SCRAM-SHA-256 credentials, for MQTT 5 enhanced authentication with method
    /// `SCRAM-SHA-256` (salted, 4096 PBKDF2 iterations; the password itself is not stored).
    #[arg(long)]
    scram: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EventsArg {
    None,
    Log,
    Jsonl,
}

#[derive(Debug, Clone, Copy, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum AuthArg {
    AllowAll,
    File,
    Http,
}

#[derive(Debug, Clone, Copy, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DriverArg {
    Uring,
    Epoll,
    Auto,
}

#[derive(Debug, Clone, Copy, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum QueuePolicyArg {
    DropNew,
    DropOldest,
    Disconnect,
}

/// Every flag has a key of the same name (with `_` for `-`) in the TOML file.
#[derive(Debug, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeArgs {
    /// TOML configuration file; flags given on the command line win over its keys.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Shards (threads, one per core). Default: all cores.
    #[arg(long)]
    cores: Option<usize>,
    /// MQTT listener address. Default: 0.0.0.0:1883.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// io driver of the shards: epoll (default, measured faster here), uring, or auto (io_uring
    /// with COOP_TASKRUN when the ring can be built, else epoll).
    #[arg(long, value_enum)]
    io_driver: Option<DriverArg>,
    /// Data directory: persistent sessions, their queued messages, retained messages.
    /// Default: ./shardmq-data.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep nothing on disk: sessions and retained messages are lost on restart, and QoS 1/2
    /// acknowledgements do not wait for the disk.
    #[arg(long)]
    #[serde(default)]
    in_memory: bool,
    /// When stored messages become durable (and QoS 1/2 PUBLISHes are acknowledged): `always`
    /// (fsync before every acknowledgement, with group commit), `interval:<ms>` (at most that
    /// long after), or `never` (a process crash loses nothing; a power loss may). Default: interval:5.
    #[arg(long)]
    fsync: Option<String>,
    /// Size of each log segment file, bytes. Default: 67108864 (64 MiB).
    #[arg(long)]
    segment_size: Option<u64>,
    /// Most bytes of log segments on disk, across all shards; persistent messages beyond it are
    /// refused (v5: 0x97). Default: unlimited.
    #[arg(long)]
    disk_budget: Option<u64>,
    /// Do not pin shard threads to cores.
    #[arg(long)]
    #[serde(default)]
    no_pin: bool,
    /// Seconds a new connection has to send CONNECT. Default: 10.
    #[arg(long)]
    connect_timeout_secs: Option<u64>,
    /// Largest keep-alive granted, seconds. Default: 3600.
    #[arg(long)]
    max_keepalive_secs: Option<u16>,
    /// Largest packet accepted, bytes. Default: 1048576.
    #[arg(long)]
    max_packet_size: Option<u32>,
    /// Receive maximum announced to v5 clients. Default: 1024.
    #[arg(long)]
    receive_maximum: Option<u16>,
    /// Topic aliases a v5 client may use. Default: 64.
    #[arg(long)]
    topic_alias_maximum: Option<u16>,
    /// Largest session expiry granted, seconds. Default: 604800.
    #[arg(long)]
    max_session_expiry_secs: Option<u32>,
    /// Outgoing QoS 1/2 messages in flight per session. Default: 64.
    #[arg(long)]
    max_inflight: Option<u16>,
    /// Undelivered messages queued per session. Default: 10000.
    #[arg(long)]
    max_queued_messages: Option<usize>,
    /// What to do when a session's queue is full (QoS 0 is always dropped first). Default: drop-oldest.
    #[arg(long, value_enum)]
    queue_full_policy: Option<QueuePolicyArg>,
    /// Queue QoS 0 messages for offline persistent sessions.
    #[arg(long)]
    #[serde(default)]
    queue_qos0_offline: bool,
    /// Subscriptions one session may hold. Default: 1000.
    #[arg(long)]
    max_subscriptions_per_session: Option<usize>,
    /// Retained messages kept. Default: 1000000.
    #[arg(long)]
    max_retained_messages: Option<usize>,
    /// Topic filter no client may subscribe to or publish on; repeat for several.
    #[arg(long = "deny-topic")]
    #[serde(default)]
    deny_topics: Vec<String>,
    /// Messages per core-to-core ring. Default: 8192.
    #[arg(long)]
    mesh_ring_capacity: Option<usize>,
    /// Admin HTTP API and /metrics address, or `off`. Default: 127.0.0.1:8091. A non-loopback
    /// address needs --admin-token.
    #[arg(long)]
    admin_listen: Option<String>,
    /// Bearer token the admin API requires (every endpoint but /health and /openapi.json).
    #[arg(long)]
    admin_token: Option<String>,
    /// Authentication and ACL: allow-all (default; every client in tenant 0) or file (users,
    /// tenants and ACL rules from --auth-file; reloaded on SIGHUP).
    #[arg(long, value_enum)]
    auth: Option<AuthArg>,
    /// The users and ACL file of `--auth file` (see `shardmq passwd`).
    #[arg(long)]
    auth_file: Option<PathBuf>,
    /// The webhook of `--auth http`: each CONNECT's credentials are POSTed there as JSON.
    #[arg(long)]
    auth_url: Option<String>,
    /// How long `--auth http` waits for the webhook, milliseconds. Default: 2000.
    #[arg(long)]
    auth_timeout_ms: Option<u64>,
    /// How long `--auth http` remembers a decision, seconds. Default: 60.
    #[arg(long)]
    auth_cache_secs: Option<u64>,
    /// Where events (connect, disconnect with reason, subscribe, unsubscribe, refusals, drops,
    /// session expiry, kicks) go: none (default), log, or jsonl (--events-file).
    #[arg(long, value_enum)]
    events: Option<EventsArg>,
    /// The file `--events jsonl` appends one JSON object per line to.
    #[arg(long)]
    events_file: Option<PathBuf>,
    /// Several listeners (config file only: `[[listeners]]` with `address`, `kind` = tcp, tls, ws
    /// or wss, `proxy_protocol`, `max_connections`, `default_tenant`, and for TLS `cert_file`,
    /// `key_file`, `client_ca_file`, `require_client_cert`, for WebSocket `ws_path`); `--listen` on
    /// the command line replaces them with one plain listener.
    #[arg(skip)]
    #[serde(default)]
    listeners: Vec<ListenerToml>,
    /// Settings for every tenant without its own (config file only: `[tenant_defaults]`).
    #[arg(skip)]
    #[serde(default)]
    tenant_defaults: Option<shardmq_shards::tenants::TenantSettings>,
    /// Per-tenant settings (config file only: `[tenants."<id>"]`); changeable at runtime through
    /// the admin API.
    #[arg(skip)]
    #[serde(default)]
    tenants: std::collections::HashMap<String, shardmq_shards::tenants::TenantSettings>,
    /// Log filter (tracing's EnvFilter syntax). Default: info.
    #[arg(long)]
    log: Option<String>,
}

fn load_file(path: &Path) -> Result<ServeArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("bad config file {}", path.display()))
}

/// Flags over file over defaults.
/// One `[[listeners]]` entry of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerToml {
    address: SocketAddr,
    #[serde(default = "default_kind")]
    kind: String,
    #[serde(default)]
    proxy_protocol: bool,
    max_connections: Option<u64>,
    #[serde(default)]
    default_tenant: u32,
    /// `tls` and `wss`: the certificate chain (PEM, leaf first) and its private key (PEM).
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    /// Mutual TLS: CA certificates (PEM) that client certificates must chain to.
    client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: whether a client without a certificate is refused (default true).
    require_client_cert: Option<bool>,
    /// `ws` and `wss`: the HTTP path of the upgrade (default `/mqtt`).
    ws_path: Option<String>,
}

impl ListenerToml {
    /// The TLS files of this entry; an error when they are incomplete.
    fn tls_files(&self) -> Result<Option<shardmq_shards::tls::TlsFiles>> {
        let files = match (&self.cert_file, &self.key_file) {
            (Some(cert_file), Some(key_file)) => shardmq_shards::tls::TlsFiles {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
                client_ca_file: self.client_ca_file.clone(),
                require_client_cert: self.require_client_cert.unwrap_or(true),
            },
            (None, None) if self.client_ca_file.is_none() && self.require_client_cert.is_none() => {
                return Ok(None)
            }
            _ => bail!(
                "listener {}: cert_file and key_file go together (client_ca_file needs both)",
                self.address
            ),
        };
        Ok(Some(files))
    }
}

fn default_kind() -> String {
    "tcp".to_string()
}

/// The admin API's settings: address (None: off) and token.
struct AdminArgs {
    listen: Option<SocketAddr>,
    token: Option<String>,
}

fn merge(flags: ServeArgs, file: ServeArgs) -> Result<(BrokerConfig, String, AdminArgs)> {
    let mut cfg = BrokerConfig::default();
    macro_rules! pick {
        ($field:ident) => {
            flags.$field.or(file.$field)
        };
    }
    if let Some(cores) = pick!(cores) {
        if cores == 0 {
            bail!("--cores must be at least 1");
        }
        cfg.cores = cores;
    }
    if flags.listen.is_none() && file.listen.is_some() && !file.listeners.is_empty() {
        bail!("the config file sets both `listen` and `[[listeners]]`: use one");
    }
    if let Some(listen) = pick!(listen) {
        cfg.listen = listen;
    } else {
        for entry in &file.listeners {
            use shardmq_shards::listener::{ListenerConfig, ListenerKind};
            let kind = match entry.kind.as_str() {
                "tcp" => ListenerKind::Tcp,
                "tls" => ListenerKind::Tls,
                "ws" => ListenerKind::Ws,
                "wss" => ListenerKind::Wss,
                other => bail!("listener {}: kind {other:?} is not tcp, tls, ws or wss", entry.address),
            };
            cfg.listeners.push(ListenerConfig {
                address: entry.address,
                kind,
                proxy_protocol: entry.proxy_protocol,
                max_connections: entry.max_connections,
                default_tenant: shardmq_shards::message::TenantId(entry.default_tenant),
                tls: entry.tls_files()?,
                ws_path: entry.ws_path.clone(),
            });
        }
    }
    if let Some(driver) = pick!(io_driver) {
        cfg.io_driver = match driver {
            DriverArg::Uring => IoDriver::Uring,
            DriverArg::Epoll => IoDriver::Epoll,
            DriverArg::Auto => IoDriver::Auto,
        };
    }
    if let Some(dir) = pick!(data_dir) {
        cfg.data_dir = dir;
    }
    cfg.persistence = !(flags.in_memory || file.in_memory);
    if let Some(policy) = pick!(fsync) {
        cfg.fsync = policy.parse().map_err(|e| anyhow::anyhow!("--fsync: {e}"))?;
    }
    if let Some(bytes) = pick!(segment_size) {
        if !(4096..=u32::MAX as u64).contains(&bytes) {
            bail!("--segment-size must be between 4096 and {} bytes", u32::MAX);
        }
        cfg.segment_size_bytes = bytes;
    }
    if let Some(bytes) = pick!(disk_budget) {
        let per_shard = bytes / cfg.cores as u64;
        if per_shard < 2 * cfg.segment_size_bytes {
            bail!(
                "--disk-budget of {bytes} bytes leaves {per_shard} per shard, less than two segments of {} bytes",
                cfg.segment_size_bytes
            );
        }
        cfg.disk_budget_bytes = Some(bytes);
    }
    cfg.pin_cores = !(flags.no_pin || file.no_pin);
    if let Some(secs) = pick!(connect_timeout_secs) {
        cfg.connect_timeout = Duration::from_secs(secs);
    }
    if let Some(secs) = pick!(max_keepalive_secs) {
        cfg.keepalive_secs_max = secs;
    }
    if let Some(bytes) = pick!(max_packet_size) {
        if bytes < 64 {
            bail!("--max-packet-size must be at least 64 bytes");
        }
        cfg.packet_size_bytes_max = bytes;
    }
    if let Some(count) = pick!(receive_maximum) {
        if count == 0 {
            bail!("--receive-maximum must be at least 1");
        }
        cfg.receive_maximum = count;
    }
    if let Some(count) = pick!(topic_alias_maximum) {
        cfg.topic_alias_max = count;
    }
    if let Some(secs) = pick!(max_session_expiry_secs) {
        cfg.session_expiry_secs_max = secs;
    }
    if let Some(count) = pick!(max_inflight) {
        if count == 0 {
            bail!("--max-inflight must be at least 1");
        }
        cfg.inflight_count_max = count;
    }
    if let Some(count) = pick!(max_queued_messages) {
        if count == 0 {
            bail!("--max-queued-messages must be at least 1");
        }
        cfg.queued_messages_max = count;
    }
    if let Some(policy) = pick!(queue_full_policy) {
        cfg.queue_full_policy = match policy {
            QueuePolicyArg::DropNew => QueueFullPolicy::DropNew,
            QueuePolicyArg::DropOldest => QueueFullPolicy::DropOldest,
            QueuePolicyArg::Disconnect => QueueFullPolicy::Disconnect,
        };
    }
    cfg.queue_qos0_offline = flags.queue_qos0_offline || file.queue_qos0_offline;
    if let Some(count) = pick!(max_subscriptions_per_session) {
        if count == 0 {
            bail!("--max-subscriptions-per-session must be at least 1");
        }
        cfg.subscriptions_per_session_max = count;
    }
    if let Some(count) = pick!(max_retained_messages) {
        cfg.retained_messages_max = count;
    }
    let mut denied = file.deny_topics;
    denied.extend(flags.deny_topics);
    for filter in &denied {
        shardmq_protocol::topic::validate_topic_filter(filter)
            .map_err(|e| anyhow::anyhow!("deny topic filter {filter:?} is invalid: {e}"))?;
    }
    cfg.denied_topic_filters = denied;
    if let Some(count) = pick!(mesh_ring_capacity) {
        if count == 0 {
            bail!("--mesh-ring-capacity must be at least 1");
        }
        cfg.mesh_ring_capacity = count;
    }
    let auth_url = pick!(auth_url);
    let auth_timeout = Duration::from_millis(pick!(auth_timeout_ms).unwrap_or(2000));
    let auth_cache = Duration::from_secs(pick!(auth_cache_secs).unwrap_or(60));
    match (pick!(auth), pick!(auth_file), auth_url) {
        (None | Some(AuthArg::AllowAll), None, None) => {}
        (Some(AuthArg::File), Some(path), None) => {
            cfg.auth =
                std::sync::Arc::new(shardmq_shards::auth::FileAuth::load(path).map_err(anyhow::Error::msg)?);
        }
        (Some(AuthArg::Http), None, Some(url)) => {
            cfg.auth = std::sync::Arc::new(webhook::WebhookAuth::start(&url, auth_timeout, auth_cache)?);
        }
        (Some(AuthArg::File), None, _) => bail!("--auth file needs --auth-file PATH"),
        (Some(AuthArg::Http), _, None) => bail!("--auth http needs --auth-url URL"),
        _ => bail!("--auth-file goes with --auth file, --auth-url with --auth http"),
    }
    match (pick!(events), pick!(events_file)) {
        (None | Some(EventsArg::None), None) => {}
        (Some(EventsArg::Log), None) => cfg.events = std::sync::Arc::new(shardmq_shards::events::LogEvents),
        (Some(EventsArg::Jsonl), Some(path)) => {
            cfg.events = std::sync::Arc::new(
                shardmq_shards::events::JsonlEvents::open(&path).map_err(anyhow::Error::msg)?,
            );
        }
        (Some(EventsArg::Jsonl), None) => bail!("--events jsonl needs --events-file PATH"),
        (_, Some(_)) => bail!("--events-file needs --events jsonl"),
    }
    let defaults = file.tenant_defaults.unwrap_or_default();
    shardmq_shards::tenants::validate(&defaults).map_err(|e| anyhow::anyhow!("tenant_defaults: {e}"))?;
    let mut tenants = std::collections::HashMap::new();
    for (id, settings) in file.tenants {
        let tenant =
            id.parse::<u32>().map_err(|_| anyhow::anyhow!("tenants.{id:?}: a tenant id is an integer"))?;
        shardmq_shards::tenants::validate(&settings).map_err(|e| anyhow::anyhow!("tenants.{id}: {e}"))?;
        tenants.insert(shardmq_shards::message::TenantId(tenant), settings);
    }
    cfg.tenants = std::sync::Arc::new(shardmq_shards::tenants::Tenants::new(std::sync::Arc::new(
        shardmq_shards::tenants::ConfigSettings::new(defaults, tenants),
    )));
    let log = pick!(log).unwrap_or_else(|| "info".to_string());
    let token = pick!(admin_token).filter(|t| !t.is_empty());
    let listen = match pick!(admin_listen).as_deref() {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 8091))),
        Some("off") => None,
        Some(text) => Some(
            text.parse()
                .map_err(|_| anyhow::anyhow!("--admin-listen {text:?} is not an address or `off`"))?,
        ),
    };
    if let Some(listen) = listen {
        admin::check_config(listen, token.as_deref())?;
    }
    Ok((cfg, log, AdminArgs { listen, token }))
}

fn serve(mut args: ServeArgs) -> Result<()> {
    let file = match args.config.take() {
        Some(path) => load_file(&path)?,
        None => ServeArgs::default(),
    };
    let (cfg, log, admin_args) = merge(args, file)?;
    let filter =
        tracing_subscriber::EnvFilter::try_new(&log).with_context(|| format!("bad --log filter {log:?}"))?;
    // Colour only on a terminal: log files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).init();
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot install signal handlers")?;
    let auth = cfg.auth.clone();
    let tenants = cfg.tenants.clone();
    let cores = cfg.cores;
    let data_dir =
        if cfg.persistence { cfg.data_dir.display().to_string() } else { "(in memory)".to_string() };
    let broker = shardmq_shards::start(cfg).context("cannot start the broker")?;
    if let Some(listen) = admin_args.listen {
        let state = admin::AdminState {
            handle: broker.admin.clone(),
            stats: broker.stats.clone(),
            tenants: tenants.clone(),
            listeners: broker.listeners.clone(),
            auth: auth.clone(),
            token: admin_args.token,
        };
        if let Err(e) = admin::spawn(listen, state) {
            broker.stop();
            return Err(e);
        }
    }
    for listener in &broker.listeners {
        info!(listener = %listener.config.address, kind = listener.config.kind.name(), path = ?listener.ws_path, "listener ready");
    }
    info!(listen = %broker.local_addr, cores, drivers = ?broker.drivers, data_dir = %data_dir, "shardmq listening");
    for signal in signals.forever() {
        if signal == SIGHUP {
            match auth.reload() {
                Ok(()) => info!("SIGHUP: auth configuration reloaded"),
                Err(e) => {
                    tracing::warn!(error = %e, "SIGHUP: auth configuration not reloaded, the previous one stays")
                }
            }
            for listener in &broker.listeners {
                let Some(tls) = &listener.tls else { continue };
                match tls.reload() {
                    Ok(()) => {
                        info!(listener = %listener.config.address, "SIGHUP: certificate and key reloaded")
                    }
                    Err(e) => tracing::warn!(
                        listener = %listener.config.address,
                        error = %e,
                        "SIGHUP: certificate not reloaded, the previous one stays"
                    ),
                }
            }
            continue;
        }
        info!(signal, "stopping");
        break;
    }
    broker.stop();
    info!("stopped");
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Passwd(args) => passwd(args),
    }
}

/// `shardmq passwd`: writes one user's entry into a users file.
fn passwd(args: PasswdArgs) -> Result<()> {
    let password = match args.password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("cannot read the password from standard input")?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    if args.username.is_empty() {
        bail!("--username is empty");
    }
    let hash = shardmq_shards::auth::hash_password(password.as_bytes()).map_err(anyhow::Error::msg)?;
    let mut doc: toml::Table = match std::fs::read_to_string(&args.file) {
        Ok(text) => {
            toml::from_str(&text).with_context(|| format!("bad users file {}", args.file.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", args.file.display())),
    };
    let users = doc.entry("users").or_insert_with(|| toml::Value::Array(Vec::new()));
    let Some(users) = users.as_array_mut() else { bail!("{}: `users` is not an array", args.file.display()) };
    users.retain(|u| u.get("username").and_then(|n| n.as_str()) != Some(args.username.as_str()));
    let mut entry = toml::Table::new();
    entry.insert("username".into(), args.username.clone().into());
    entry.insert("password_hash".into(), hash.into());
    entry.insert("tenant".into(), i64::from(args.tenant).into());
    if args.scram {
        let credentials = shardmq_shards::scram::ScramCredentials::derive(
            password.as_bytes(),
            shardmq_shards::scram::ITERATIONS_DEFAULT,
        );
        entry.insert("scram_sha256".into(), credentials.to_string().into());
    }
    users.push(toml::Value::Table(entry));
    let text = toml::to_string(&doc).context("cannot write TOML")?;
    let tmp = args.file.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.file).with_context(|| format!("cannot replace {}", args.file.display()))?;
    println!("{}: user {:?} (tenant {}) written", args.file.display(), args.username, args.tenant);
    Ok(())
}
