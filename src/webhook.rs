//! The `http` auth provider: each CONNECT is decided by POSTing its credentials as JSON to a
//! configured URL, on this provider's own thread (tokio + hyper), with a timeout and a decision
//! cache. A shard never waits on it: `begin` answers from the cache or hands the request over and
//! returns a pending decision the connection's task awaits.
//!
//! Protocol: `POST <url>` with `{"client_id": .., "username": .. | null, "password": .. | null}`
//! (the password as UTF-8, lossy); on a mutual-TLS listener also `"cert_subject"` (RFC 4514),
//! `"cert_common_name"` and `"cert_sans"` (DNS names, e-mail addresses, URIs, IP addresses) of the
//! verified client certificate, whose common name is the username when the client sent none. A
//! `200` answer `{"result": "allow", "tenant": <int, optional>}`
//! allows; `{"result": "deny"}` is a bad user name or password (v5 0x86, 3.1.1 code 4); any other
//! status, a timeout or an unreachable server refuses as not authorised (0x87 / 5).
//! Authorisation of PUBLISH and SUBSCRIBE is not asked per packet (a network round trip on the
//! data path): an `allow` answer may carry `"acl": [{"action": "publish"|"subscribe"|"all",
//! "topic": filter, "permission": "allow"|"deny"}, ...]` (the `file` provider's rule format, with
//! `%u` / `%c`), kept for that client id until its next authentication; without rules, every topic
//! is allowed.
//!
//! Bounds: at most [`QUEUE_CAPACITY`] requests waiting for the thread (more are refused at once);
//! at most [`CACHE_ENTRIES_MAX`] cached decisions, each kept for the configured time.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use shardmq_shards::auth::{
    evaluate_acl, AclRule, Action, AuthDecision, AuthProvider, Credentials, PendingDecision, Principal,
    Verdict,
};
use shardmq_shards::message::TenantId;
use tracing::warn;

/// Requests waiting for the webhook thread before new ones are refused.
const QUEUE_CAPACITY: usize = 4096;
/// Cached decisions kept at most (the cache is cleared when full).
const CACHE_ENTRIES_MAX: usize = 100_000;

/// Client id, username, and a keyed hash of the password and the client certificate's subject.
type CacheKey = (String, Option<String>, u64);

struct Job {
    client_id: String,
    username: Option<String>,
    password: Option<String>,
    /// The verified client certificate of a mutual-TLS listener.
    cert: Option<shardmq_shards::tls::ClientCert>,
    key: CacheKey,
    pending: Arc<PendingDecision>,
}

/// The `http` provider. See the module docs.
pub struct WebhookAuth {
    queue: tokio::sync::mpsc::Sender<Job>,
    /// ACL rules from the last `allow` answer, per client id.
    acls: Arc<Mutex<HashMap<String, Arc<Vec<AclRule>>>>>,
    cache: Arc<Mutex<HashMap<CacheKey, (AuthDecision, Instant)>>>,
    ttl: Duration,
    keys: RandomState,
}

impl std::fmt::Debug for WebhookAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookAuth").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl WebhookAuth {
    /// Starts the provider's thread. `url` must be `http://host:port/path`.
    pub fn start(url: &str, timeout: Duration, ttl: Duration) -> Result<WebhookAuth> {
        let uri: hyper::Uri = url.parse().with_context(|| format!("--auth-url {url:?} is not a URL"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            anyhow::bail!("--auth-url {url:?}: an http://host[:port]/path URL is needed");
        }
        let (queue, mut jobs) = tokio::sync::mpsc::channel::<Job>(QUEUE_CAPACITY);
        let cache: Arc<Mutex<HashMap<CacheKey, (AuthDecision, Instant)>>> = Arc::default();
        let thread_cache = cache.clone();
        let acls: Arc<Mutex<HashMap<String, Arc<Vec<AclRule>>>>> = Arc::default();
        let thread_acls = acls.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("auth-http".into()).spawn(move || {
            runtime.block_on(async move {
                let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Full<Bytes>>();
                while let Some(job) = jobs.recv().await {
                    let (client, uri, cache) = (client.clone(), uri.clone(), thread_cache.clone());
                    let acls = thread_acls.clone();
                    tokio::spawn(async move {
                        let mut body = json!({ "client_id": job.client_id, "username": job.username, "password": job.password });
                        if let Some(cert) = &job.cert {
                            body["cert_subject"] = json!(cert.subject);
                            body["cert_common_name"] = json!(cert.common_name);
                            body["cert_sans"] = json!(cert.sans);
                        }
                        let request = hyper::Request::post(uri)
                            .header(hyper::header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from(body.to_string())))
                            .expect("static request parts");
                        let decision = match tokio::time::timeout(timeout, ask(&client, request)).await {
                            Ok(Ok((decision, rules))) => {
                                let mut acls = acls.lock().unwrap_or_else(|e| e.into_inner());
                                if acls.len() >= CACHE_ENTRIES_MAX {
                                    acls.clear();
                                }
                                match rules {
                                    Some(rules) => acls.insert(job.client_id.clone(), Arc::new(rules)),
                                    None => acls.remove(&job.client_id),
                                };
                                decision
                            }
                            Ok(Err(e)) => {
                                warn!(error = %e, "auth webhook: request failed; refusing");
                                AuthDecision::NotAuthorized
                            }
                            Err(_) => {
                                warn!(?timeout, "auth webhook: no answer in time; refusing");
                                AuthDecision::NotAuthorized
                            }
                        };
                        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                        if cache.len() >= CACHE_ENTRIES_MAX {
                            cache.clear();
                        }
                        cache.insert(job.key, (decision.clone(), Instant::now()));
                        drop(cache);
                        job.pending.complete(decision);
                    });
                }
            });
        })?;
        Ok(WebhookAuth { queue, acls, cache, ttl, keys: RandomState::new() })
    }

    fn key(&self, credentials: &Credentials<'_>) -> CacheKey {
        (
            credentials.client_id.to_string(),
            credentials.username.map(str::to_string),
            self.keys
                .hash_one((credentials.password.unwrap_or(&[]), credentials.client_cert.map(|c| &c.subject))),
        )
    }

    fn cached(&self, key: &CacheKey) -> Option<AuthDecision> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).filter(|(_, at)| at.elapsed() < self.ttl).map(|(d, _)| d.clone())
    }
}

/// One webhook call: the decision, and the ACL rules of an `allow` answer that has them.
async fn ask(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    request: hyper::Request<Full<Bytes>>,
) -> Result<(AuthDecision, Option<Vec<AclRule>>)> {
    let response = client.request(request).await?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
        .to_bytes();
    if status != hyper::StatusCode::OK {
        return Ok((AuthDecision::NotAuthorized, None));
    }
    let answer: Value = serde_json::from_slice(&body).context("the answer is not JSON")?;
    Ok(match answer["result"].as_str() {
        Some("allow") => {
            let tenant = answer["tenant"].as_u64().and_then(|t| u32::try_from(t).ok()).unwrap_or(0);
            let rules = match answer.get("acl") {
                None | Some(Value::Null) => None,
                Some(rules) => match serde_json::from_value::<Vec<AclRule>>(rules.clone()) {
                    Ok(rules) => Some(rules),
                    // Rules that do not parse refuse the client rather than allow everything.
                    Err(e) => {
                        warn!(error = %e, "auth webhook: bad acl in the answer; refusing");
                        return Ok((AuthDecision::NotAuthorized, None));
                    }
                },
            };
            (AuthDecision::Allow { tenant: TenantId(tenant) }, rules)
        }
        Some("deny") => (AuthDecision::BadCredentials, None),
        _ => (AuthDecision::NotAuthorized, None),
    })
}

impl AuthProvider for WebhookAuth {
    /// Only what the cache knows: the shards call [`AuthProvider::begin`].
    fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision {
        self.cached(&self.key(credentials)).unwrap_or(AuthDecision::NotAuthorized)
    }

    fn begin(&self, credentials: &Credentials<'_>) -> Verdict {
        let key = self.key(credentials);
        if let Some(decision) = self.cached(&key) {
            return Verdict::Now(decision);
        }
        let pending = Arc::new(PendingDecision::default());
        let job = Job {
            client_id: credentials.client_id.to_string(),
            username: credentials.username.map(str::to_string),
            password: credentials.password.map(|p| String::from_utf8_lossy(p).into_owned()),
            cert: credentials.client_cert.cloned(),
            key,
            pending: pending.clone(),
        };
        match self.queue.try_send(job) {
            Ok(()) => Verdict::Later(pending),
            Err(_) => Verdict::Now(AuthDecision::NotAuthorized),
        }
    }

    fn authorize(&self, who: &Principal<'_>, action: Action, topic_or_filter: &str) -> bool {
        let rules = self.acls.lock().unwrap_or_else(|e| e.into_inner()).get(who.client_id).cloned();
        match rules {
            Some(rules) => evaluate_acl(&rules, who, action, topic_or_filter),
            None => true,
        }
    }
}
