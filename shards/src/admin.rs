//! [`AdminHandle`]: how the admin API (another thread) asks the shards about their sessions.
//!
//! Owner: the broker hands out clones of the handle; each shard owns the receiving end of its
//! control queue. A request goes onto the shard's bounded queue, the shard's mesh task is woken
//! (a mesh poke), handles it between mesh batches, and answers on a one-shot channel. The caller
//! blocks (bounded by a timeout), so it must not be a shard thread: the admin thread calls it from
//! a blocking task.
//!
//! Bounds: each shard's queue holds [`CONTROL_QUEUE_CAPACITY`] requests; when it is full the
//! request fails with [`AdminError::Busy`] instead of waiting. Answers are bounded by the page
//! size the caller asks for.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use crate::mesh::{Mesh, ShardId};
use crate::message::{Message, TenantId};
use crate::shard::{home_shard, retain_shard, MeshMsg};

/// Requests one shard's queue holds before callers are refused.
pub const CONTROL_QUEUE_CAPACITY: usize = 256;

/// How long a caller waits for a shard's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A session as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    pub tenant: TenantId,
    pub client_id: String,
    pub shard: u16,
    pub connected: bool,
    pub protocol_level: u8,
    /// Session expiry interval, seconds (`u32::MAX`: never).
    pub expiry_secs: u32,
    pub subscriptions: usize,
    /// Messages waiting to be sent (in memory and in the store's backlog).
    pub queued: usize,
    /// Outgoing QoS 1/2 messages not yet acknowledged.
    pub inflight: usize,
    /// Whether the session is kept in the store (survives a restart).
    pub stored: bool,
    /// The client's address (the PROXY header's source on a PROXY listener).
    pub peer: Option<std::net::SocketAddr>,
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionInfo {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

/// A session inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDetail {
    pub summary: SessionSummary,
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// What the admin thread asks a shard.
#[derive(Debug)]
pub enum AdminRequest {
    /// Publishes a message as if a client of its tenant had (retained if its flag says so).
    Publish {
        msg: Arc<Message>,
        reply: Sender<()>,
    },
    /// This shard's retained messages of `tenant` matching `filter`.
    Retained {
        tenant: TenantId,
        filter: String,
        reply: Sender<Vec<Arc<Message>>>,
    },
    /// Deletes the retained message of a topic (on its partition's shard) without delivering
    /// anything; answers whether there was one.
    RetainDelete {
        tenant: TenantId,
        topic: String,
        reply: Sender<bool>,
    },
    /// Adds a subscription to a session on the server's side (no SUBACK, no retained messages);
    /// answers an error text for an unknown session or a bad filter.
    Subscribe {
        tenant: TenantId,
        client_id: String,
        filter: String,
        qos: u8,
        reply: Sender<Result<(), String>>,
    },
    /// Removes a subscription; answers whether it existed (None: no such session).
    Unsubscribe {
        tenant: TenantId,
        client_id: String,
        filter: String,
        reply: Sender<Option<bool>>,
    },
    /// This shard's sessions of `tenant`, sorted by client id, after `after` (exclusive), at most
    /// `limit`.
    List {
        tenant: TenantId,
        after: Option<String>,
        limit: usize,
        reply: Sender<Vec<SessionSummary>>,
    },
    Inspect {
        tenant: TenantId,
        client_id: String,
        reply: Sender<Option<SessionDetail>>,
    },
    /// Closes the session's connection (v5: DISCONNECT 0x98 administrative action) and ends the
    /// session. Answers whether it existed.
    Disconnect {
        tenant: TenantId,
        client_id: String,
        reply: Sender<bool>,
    },
}

/// Why an admin request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("shard {0} is busy (its control queue is full)")]
    Busy(u16),
    #[error("shard {0} did not answer in time")]
    Timeout(u16),
    #[error("the broker is stopping")]
    Stopped,
}

/// The admin API's way into the shards. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminHandle {
    queues: Arc<Vec<Sender<AdminRequest>>>,
    mesh: Arc<Mesh<MeshMsg>>,
}

/// Creates the control queues: the handle, and one receiver per shard.
pub(crate) fn control_queues(mesh: Arc<Mesh<MeshMsg>>) -> (AdminHandle, Vec<Receiver<AdminRequest>>) {
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..mesh.shard_count()).map(|_| bounded(CONTROL_QUEUE_CAPACITY)).unzip();
    (AdminHandle { queues: Arc::new(senders), mesh }, receivers)
}

impl AdminHandle {
    pub fn shard_count(&self) -> usize {
        self.queues.len()
    }

    fn ask<T>(&self, shard: usize, make: impl FnOnce(Sender<T>) -> AdminRequest) -> Result<T, AdminError> {
        let (reply, answer) = bounded(1);
        match self.queues[shard].try_send(make(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(AdminError::Busy(shard as u16)),
            Err(TrySendError::Disconnected(_)) => return Err(AdminError::Stopped),
        }
        self.mesh.poke(ShardId(shard as u16));
        answer.recv_timeout(ANSWER_TIMEOUT).map_err(|_| AdminError::Timeout(shard as u16))
    }

    /// Sessions of `tenant` across all shards, sorted by client id, after `after`, at most `limit`.
    pub fn list(
        &self,
        tenant: TenantId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SessionSummary>, AdminError> {
        let mut all = Vec::new();
        for shard in 0..self.shard_count() {
            let after = after.map(str::to_string);
            all.extend(self.ask(shard, |reply| AdminRequest::List { tenant, after, limit, reply })?);
        }
        all.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        all.truncate(limit);
        Ok(all)
    }

    /// One session, from its home shard.
    pub fn inspect(&self, tenant: TenantId, client_id: &str) -> Result<Option<SessionDetail>, AdminError> {
        let shard = home_shard(tenant, client_id, self.shard_count()).index();
        let client_id = client_id.to_string();
        self.ask(shard, |reply| AdminRequest::Inspect { tenant, client_id, reply })
    }

    /// Publishes a message (from shard 0; it is routed like a client's).
    pub fn publish(&self, msg: Arc<Message>) -> Result<(), AdminError> {
        self.ask(0, |reply| AdminRequest::Publish { msg, reply })
    }

    /// Retained messages of `tenant` matching `filter`, sorted by topic.
    pub fn retained(&self, tenant: TenantId, filter: &str) -> Result<Vec<Arc<Message>>, AdminError> {
        let mut all = Vec::new();
        for shard in 0..self.shard_count() {
            let filter = filter.to_string();
            all.extend(self.ask(shard, |reply| AdminRequest::Retained { tenant, filter, reply })?);
        }
        all.sort_by(|a, b| a.topic.as_str().cmp(b.topic.as_str()));
        Ok(all)
    }

    /// Deletes a retained message; false if there was none.
    pub fn retain_delete(&self, tenant: TenantId, topic: &str) -> Result<bool, AdminError> {
        let shard = retain_shard(tenant, topic, self.shard_count()).index();
        let topic = topic.to_string();
        self.ask(shard, |reply| AdminRequest::RetainDelete { tenant, topic, reply })
    }

    /// Subscribes a session on the server's side.
    pub fn subscribe(
        &self,
        tenant: TenantId,
        client_id: &str,
        filter: &str,
        qos: u8,
    ) -> Result<Result<(), String>, AdminError> {
        let shard = home_shard(tenant, client_id, self.shard_count()).index();
        let (client_id, filter) = (client_id.to_string(), filter.to_string());
        self.ask(shard, |reply| AdminRequest::Subscribe { tenant, client_id, filter, qos, reply })
    }

    /// Unsubscribes a session on the server's side.
    pub fn unsubscribe(
        &self,
        tenant: TenantId,
        client_id: &str,
        filter: &str,
    ) -> Result<Option<bool>, AdminError> {
        let shard = home_shard(tenant, client_id, self.shard_count()).index();
        let (client_id, filter) = (client_id.to_string(), filter.to_string());
        self.ask(shard, |reply| AdminRequest::Unsubscribe { tenant, client_id, filter, reply })
    }

    /// Disconnects a session and ends it; false if there was none.
    pub fn disconnect(&self, tenant: TenantId, client_id: &str) -> Result<bool, AdminError> {
        let shard = home_shard(tenant, client_id, self.shard_count()).index();
        let client_id = client_id.to_string();
        self.ask(shard, |reply| AdminRequest::Disconnect { tenant, client_id, reply })
    }
}
