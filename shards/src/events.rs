//! [`EventCollector`]: what happens to clients and messages, for outside systems. Built-ins:
//! [`NoEvents`], [`LogEvents`] (one tracing line per event) and [`JsonlEvents`] (one JSON object
//! per line in a file).
//!
//! Owner: shared read-only by every shard (`Arc<dyn EventCollector>` in the config); `event` is
//! called on shard threads, so it must not block: `JsonlEvents` hands each line to its own
//! writer thread through a bounded queue and counts (never waits for) what does not fit.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Sender, TrySendError};

use crate::message::TenantId;

/// One event. Borrowed fields: a collector that keeps an event copies what it needs.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    Connected {
        tenant: TenantId,
        client_id: &'a str,
        username: Option<&'a str>,
        protocol_level: u8,
        session_present: bool,
        /// The client's address (a PROXY header's source on a PROXY listener).
        peer: Option<std::net::SocketAddr>,
    },
    /// The connection ended: `reason` is `normal` (DISCONNECT), `abnormal` (network, keep-alive,
    /// protocol error: the will is published), `taken over` or `kicked`.
    Disconnected {
        tenant: TenantId,
        client_id: &'a str,
        reason: &'static str,
    },
    /// A CONNECT was refused by the auth provider.
    AuthFailed {
        client_id: &'a str,
        username: Option<&'a str>,
        reason: &'static str,
        peer: Option<std::net::SocketAddr>,
    },
    Subscribed {
        tenant: TenantId,
        client_id: &'a str,
        filter: &'a str,
        qos: u8,
    },
    Unsubscribed {
        tenant: TenantId,
        client_id: &'a str,
        filter: &'a str,
    },
    /// A subscription or publish was refused (ACL, denied topic, quota).
    Refused {
        tenant: TenantId,
        client_id: &'a str,
        topic: &'a str,
        reason: &'static str,
    },
    /// A message was not delivered to a session: `reason` is `queue full`, `offline`, `expired`
    /// or `too large`.
    Dropped {
        tenant: TenantId,
        client_id: &'a str,
        topic: &'a str,
        reason: &'static str,
    },
    SessionExpired {
        tenant: TenantId,
        client_id: &'a str,
    },
    /// A client was slowed down by a tenant limit (`reason`: `publish rate`).
    Throttled {
        tenant: TenantId,
        client_id: &'a str,
        reason: &'static str,
    },
    /// The session was ended by the admin API.
    Kicked {
        tenant: TenantId,
        client_id: &'a str,
    },
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::Connected { .. } => "connected",
            Event::Disconnected { .. } => "disconnected",
            Event::AuthFailed { .. } => "auth_failed",
            Event::Subscribed { .. } => "subscribed",
            Event::Unsubscribed { .. } => "unsubscribed",
            Event::Refused { .. } => "refused",
            Event::Dropped { .. } => "dropped",
            Event::SessionExpired { .. } => "session_expired",
            Event::Throttled { .. } => "throttled",
            Event::Kicked { .. } => "kicked",
        }
    }

    /// The event as one JSON object (hand-written: the fields are few and fixed).
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(128);
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        out.push_str(&format!("{{\"event\":\"{}\",\"ts_ms\":{ms}", self.name()));
        let mut field = |name: &str, value: &str| {
            out.push_str(&format!(",\"{name}\":"));
            json_string(&mut out, value);
        };
        match *self {
            Event::Connected { tenant, client_id, username, protocol_level, session_present, peer } => {
                field("client_id", client_id);
                if let Some(u) = username {
                    field("username", u);
                }
                if let Some(peer) = peer {
                    field("peer", &peer.to_string());
                }
                out.push_str(&format!(
                    ",\"tenant\":{},\"protocol_level\":{protocol_level},\"session_present\":{session_present}",
                    tenant.0
                ));
            }
            Event::Disconnected { tenant, client_id, reason }
            | Event::Throttled { tenant, client_id, reason } => {
                field("client_id", client_id);
                field("reason", reason);
                out.push_str(&format!(",\"tenant\":{}", tenant.0));
            }
            Event::AuthFailed { client_id, username, reason, peer } => {
                field("client_id", client_id);
                if let Some(u) = username {
                    field("username", u);
                }
                if let Some(peer) = peer {
                    field("peer", &peer.to_string());
                }
                field("reason", reason);
            }
            Event::Subscribed { tenant, client_id, filter, qos } => {
                field("client_id", client_id);
                field("filter", filter);
                out.push_str(&format!(",\"tenant\":{},\"qos\":{qos}", tenant.0));
            }
            Event::Unsubscribed { tenant, client_id, filter } => {
                field("client_id", client_id);
                field("filter", filter);
                out.push_str(&format!(",\"tenant\":{}", tenant.0));
            }
            Event::Refused { tenant, client_id, topic, reason }
            | Event::Dropped { tenant, client_id, topic, reason } => {
                field("client_id", client_id);
                field("topic", topic);
                field("reason", reason);
                out.push_str(&format!(",\"tenant\":{}", tenant.0));
            }
            Event::SessionExpired { tenant, client_id } | Event::Kicked { tenant, client_id } => {
                field("client_id", client_id);
                out.push_str(&format!(",\"tenant\":{}", tenant.0));
            }
        }
        out.push('}');
        out
    }
}

fn json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Receives events. Called on shard threads: must not block.
pub trait EventCollector: fmt::Debug + Send + Sync {
    fn event(&self, event: &Event<'_>);
}

/// Discards events (the default).
#[derive(Debug, Default)]
pub struct NoEvents;

impl EventCollector for NoEvents {
    fn event(&self, _: &Event<'_>) {}
}

/// One `tracing` line per event (target `shardmq::events`, level info).
#[derive(Debug, Default)]
pub struct LogEvents;

impl EventCollector for LogEvents {
    fn event(&self, event: &Event<'_>) {
        tracing::info!(target: "shardmq::events", "{}", event.to_json());
    }
}

/// Events a `JsonlEvents` queue holds before it drops (and counts) new ones.
pub const JSONL_QUEUE_CAPACITY: usize = 65_536;

/// One JSON object per line, appended to a file by a writer thread.
#[derive(Debug)]
pub struct JsonlEvents {
    queue: Sender<String>,
    /// Events dropped because the writer fell behind.
    pub dropped: Arc<AtomicU64>,
}

impl JsonlEvents {
    /// Opens (appends to) `path` and starts the writer thread.
    pub fn open(path: &Path) -> Result<JsonlEvents, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open events file {}: {e}", path.display()))?;
        let (queue, lines) = bounded::<String>(JSONL_QUEUE_CAPACITY);
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                while let Ok(line) = lines.recv() {
                    let mut result = writeln!(out, "{line}");
                    // Write what is queued, then flush once: a burst costs one write.
                    while let Ok(line) = lines.try_recv() {
                        result = result.and_then(|_| writeln!(out, "{line}"));
                    }
                    if let Err(e) = result.and_then(|_| out.flush()) {
                        tracing::warn!(path = %path.display(), error = %e, "events file: write failed");
                    }
                }
            })
            .map_err(|e| format!("cannot start the events writer: {e}"))?;
        Ok(JsonlEvents { queue, dropped: Arc::new(AtomicU64::new(0)) })
    }
}

impl EventCollector for JsonlEvents {
    fn event(&self, event: &Event<'_>) {
        match self.queue.try_send(event.to_json()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_what_it_must() {
        let line = Event::Subscribed { tenant: TenantId(2), client_id: "a\"b\\c\n", filter: "x/#", qos: 1 }
            .to_json();
        assert!(line.starts_with("{\"event\":\"subscribed\",\"ts_ms\":"), "{line}");
        assert!(line.contains("\"client_id\":\"a\\\"b\\\\c\\u000a\""), "{line}");
        assert!(line.ends_with(",\"tenant\":2,\"qos\":1}"), "{line}");
    }
}
