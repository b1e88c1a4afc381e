//! Starting and stopping brokers for `compare`: Mosquitto from PATH with a generated config,
//! shardmq from a binary path, or any broker from a command template.
//!
//! Owns: free-port selection, the generated Mosquitto config, waiting until a broker's port accepts
//! (never a fixed sleep), and killing the broker when its [`Broker`] is dropped. Does not own: the
//! load (the scenarios) or result comparison (`compare.rs`).

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a broker may take to accept connections after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The Mosquitto config used for every comparison: loopback only, no connection cap, Nagle off
/// (as our clients), no persistence, and queues deep enough that the broker's defaults
/// (1000 queued messages per client) do not show up as "loss" in QoS 1/2 or `persist` runs.
pub fn mosquitto_config(port: u16) -> String {
    format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         max_connections -1\n\
         max_queued_messages 1000000\n\
         max_inflight_messages 1000\n\
         set_tcp_nodelay true\n\
         persistence false\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n"
    )
}

/// A port that was free a moment ago (bind port 0, read it, release it).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding port 0")?;
    Ok(listener.local_addr()?.port())
}

/// A running broker process. Owner: whoever started it; dropping it kills the process.
#[derive(Debug)]
pub struct Broker {
    pub name: String,
    pub port: u16,
    child: Child,
    pub log_path: PathBuf,
    /// Scratch directory (config, log, data); removed on drop.
    dir: PathBuf,
}

impl Broker {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of the broker's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A scratch directory for one broker's config and log.
fn scratch_dir(name: &str, port: u16) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("shardmq-bench-{}-{name}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Starts Mosquitto from PATH on a free port.
pub fn start_mosquitto() -> anyhow::Result<Broker> {
    let port = free_port()?;
    let dir = scratch_dir("mosquitto", port)?;
    let config = dir.join("mosquitto.conf");
    std::fs::write(&config, mosquitto_config(port))?;
    let mut command = Command::new("mosquitto");
    command.arg("-c").arg(&config);
    spawn_and_wait("mosquitto", command, port, &dir)
}

/// Starts shardmq: `<bin> serve --listen 127.0.0.1:<port> --cores <cores>`.
pub fn start_shardmq(bin: &Path, cores: u32) -> anyhow::Result<Broker> {
    if !bin.exists() {
        bail!("shardmq binary {} does not exist (build it with `cargo build --release`)", bin.display());
    }
    // Absolute, because the broker runs in its scratch directory (where its data dir lands).
    let bin = bin.canonicalize().with_context(|| format!("resolving {}", bin.display()))?;
    let port = free_port()?;
    let dir = scratch_dir("shardmq", port)?;
    let mut command = Command::new(bin);
    command.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--cores", &cores.to_string()]);
    // Its admin API on a free port: several brokers may run at once.
    command.args(["--admin-listen", "127.0.0.1:0"]);
    spawn_and_wait("shardmq", command, port, &dir)
}

/// Starts a broker from a template run by `sh -c "exec <template>"`, with `{port}`, `{cores}` and
/// `{dir}` (a scratch directory) substituted.
pub fn start_template(name: &str, template: &str, cores: u32) -> anyhow::Result<Broker> {
    let port = free_port()?;
    let dir = scratch_dir(name, port)?;
    let command_line = template
        .replace("{port}", &port.to_string())
        .replace("{cores}", &cores.to_string())
        .replace("{dir}", &dir.display().to_string());
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!("exec {command_line}"));
    spawn_and_wait(name, command, port, &dir)
}

fn spawn_and_wait(name: &str, mut command: Command, port: u16, dir: &Path) -> anyhow::Result<Broker> {
    let log_path = dir.join(format!("{name}.log"));
    let log = File::create(&log_path)?;
    // The scratch directory is the working directory, so relative data dirs stay out of the caller's.
    command.current_dir(dir).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let child = command.spawn().with_context(|| format!("starting {name}"))?;
    let mut broker = Broker { name: name.to_string(), port, child, log_path, dir: dir.to_path_buf() };
    wait_for_port(&mut broker)?;
    Ok(broker)
}

/// Waits until the broker's port accepts a TCP connection, failing early if the process exits.
fn wait_for_port(broker: &mut Broker) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], broker.port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if !broker.alive() {
            bail!("{} exited during start-up; its log ends:\n{}", broker.name, broker.log_tail());
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{} did not accept on port {} within {START_TIMEOUT:?}", broker.name, broker.port);
        }
        // Retry pacing while the broker boots, not synchronisation: the loop exits on readiness.
        std::thread::sleep(Duration::from_millis(20));
    }
}
