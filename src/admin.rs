//! The admin HTTP API and `/metrics`, on their own thread (tokio + hyper: not the data path).
//!
//! Owns: the HTTP listener on `--admin-listen`, the bearer-token check, request parsing, JSON
//! answers and errors, the Prometheus text exposition of the shards' counters, and the OpenAPI
//! document (built from the same route table the router serves, so the two cannot drift).
//! Does not own: any broker state; sessions are reached through [`AdminHandle`] (the shards'
//! bounded control queues), counters are read from the shards' atomics without locks.
//!
//! Bounds: request bodies are not read (no endpoint takes one yet); pages are at most
//! [`PAGE_LIMIT_MAX`] sessions; each shard query waits at most a few seconds.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use shardmq_shards::admin::{AdminError, SessionDetail, SessionSummary};
use shardmq_shards::listener::ListenerInfo;
use shardmq_shards::message::TenantId;
use shardmq_shards::shard::{ShardStats, LATENCY_BUCKETS};
use shardmq_shards::tenants::{DropReason, Limit, TenantSettings, TenantTraffic, Tenants};
use shardmq_shards::AdminHandle;
use tracing::{info, warn};

/// Most sessions one page lists.
pub const PAGE_LIMIT_MAX: usize = 1000;

/// What the admin thread serves from.
pub struct AdminState {
    pub handle: AdminHandle,
    /// The auth provider, for `POST /api/v1/auth/reload`.
    pub auth: Arc<dyn shardmq_shards::auth::AuthProvider>,
    pub stats: Vec<Arc<ShardStats>>,
    pub tenants: Arc<Tenants>,
    /// The MQTT listeners, for their connection and refusal counters.
    pub listeners: Vec<Arc<ListenerInfo>>,
    pub token: Option<String>,
}

/// One route: method, path pattern (`{name}` for a path parameter), whether it needs the token,
/// and its OpenAPI description.
struct Route {
    method: Method,
    path: &'static str,
    auth: bool,
    summary: &'static str,
    query: &'static [(&'static str, &'static str)],
    responses: &'static [(u16, &'static str)],
}

fn routes() -> Vec<Route> {
    const TENANT: (&str, &str) = ("tenant", "Tenant id (integer, default 0)");
    vec![
        Route {
            method: Method::GET,
            path: "/health",
            auth: false,
            summary: "Liveness: the broker and its shards answer.",
            query: &[],
            responses: &[(200, "Healthy")],
        },
        Route {
            method: Method::GET,
            path: "/metrics",
            auth: true,
            summary: "Counters and gauges in the Prometheus text format, per shard.",
            query: &[],
            responses: &[(200, "Prometheus text exposition"), (401, "Missing or wrong bearer token")],
        },
        Route {
            method: Method::GET,
            path: "/openapi.json",
            auth: false,
            summary: "This document.",
            query: &[],
            responses: &[(200, "OpenAPI 3 document")],
        },
        Route {
            method: Method::GET,
            path: "/api/v1/sessions",
            auth: true,
            summary: "Sessions of a tenant, sorted by client id, one page at a time.",
            query: &[
                TENANT,
                ("after", "List client ids after this one (the previous page's `next`)"),
                ("limit", "Page size, 1..=1000 (default 100)"),
            ],
            responses: &[
                (200, "A page of sessions"),
                (400, "Bad query parameter"),
                (401, "Missing or wrong bearer token"),
            ],
        },
        Route {
            method: Method::GET,
            path: "/api/v1/sessions/{client_id}",
            auth: true,
            summary: "One session: its subscriptions, queue depth and inflight messages.",
            query: &[TENANT],
            responses: &[
                (200, "The session"),
                (400, "Bad query parameter"),
                (401, "Missing or wrong bearer token"),
                (404, "No such session"),
            ],
        },
        Route {
            method: Method::DELETE,
            path: "/api/v1/sessions/{client_id}",
            auth: true,
            summary: "Disconnects the session's client (v5: DISCONNECT 0x98) and ends the session.",
            query: &[TENANT],
            responses: &[
                (204, "Disconnected and ended"),
                (400, "Bad query parameter"),
                (401, "Missing or wrong bearer token"),
                (404, "No such session"),
            ],
        },
        Route {
            method: Method::POST,
            path: "/api/v1/sessions/{client_id}/subscriptions",
            auth: true,
            summary: "Subscribes the session on the server's side. Body: {\"filter\": string, \"qos\": 0|1|2}. No SUBACK is sent and no retained messages are delivered.",
            query: &[TENANT],
            responses: &[(200, "Subscribed"), (400, "Bad body, filter or QoS"), (401, "Missing or wrong bearer token"), (404, "No such session")],
        },
        Route {
            method: Method::DELETE,
            path: "/api/v1/sessions/{client_id}/subscriptions",
            auth: true,
            summary: "Unsubscribes the session from `filter` on the server's side.",
            query: &[TENANT, ("filter", "The subscription's filter (required)")],
            responses: &[(204, "Unsubscribed"), (400, "Missing filter"), (401, "Missing or wrong bearer token"), (404, "No such session or subscription")],
        },
        Route {
            method: Method::POST,
            path: "/api/v1/auth/reload",
            auth: true,
            summary: "Re-reads the auth provider's configuration (the `file` provider's users and ACL), as SIGHUP does. The previous one stays on error.",
            query: &[],
            responses: &[(200, "Reloaded"), (400, "The new configuration is invalid (the old one stays)"), (401, "Missing or wrong bearer token")],
        },
        Route {
            method: Method::POST,
            path: "/api/v1/publish",
            auth: true,
            summary: "Publishes a message into a tenant. Body: {\"tenant\": int, \"topic\": string, \"payload\": string (UTF-8), \"qos\": 0|1|2, \"retain\": bool}.",
            query: &[],
            responses: &[(200, "Published"), (400, "Bad body or topic"), (401, "Missing or wrong bearer token")],
        },
        Route {
            method: Method::GET,
            path: "/api/v1/retained",
            auth: true,
            summary: "Retained messages of a tenant matching `filter` (default `#`), sorted by topic.",
            query: &[TENANT, ("filter", "A topic filter (default #)")],
            responses: &[(200, "The messages"), (400, "Bad query parameter"), (401, "Missing or wrong bearer token")],
        },
        Route {
            method: Method::DELETE,
            path: "/api/v1/retained",
            auth: true,
            summary: "Deletes the retained message of `topic` (nothing is delivered).",
            query: &[TENANT, ("topic", "The topic (required)")],
            responses: &[(204, "Deleted"), (400, "Missing or bad topic"), (401, "Missing or wrong bearer token"), (404, "No retained message there")],
        },
        Route {
            method: Method::GET,
            path: "/api/v1/tenants/{tenant}/settings",
            auth: true,
            summary: "A tenant's settings (absent fields: the broker's global setting).",
            query: &[],
            responses: &[(200, "The settings"), (400, "Bad tenant id"), (401, "Missing or wrong bearer token")],
        },
        Route {
            method: Method::PUT,
            path: "/api/v1/tenants/{tenant}/settings",
            auth: true,
            summary: "Replaces a tenant's settings at runtime (JSON body, same fields as GET); new connections and packets see them at once.",
            query: &[],
            responses: &[(200, "The settings now in force"), (400, "Bad tenant id, body or value"), (401, "Missing or wrong bearer token")],
        },
    ]
}

/// Matches `path` against a route pattern; returns the path parameter, if the pattern has one.
fn match_path(pattern: &str, path: &str) -> Option<Option<String>> {
    match pattern.split_once('{') {
        None => (pattern == path).then_some(None),
        Some((prefix, rest)) => {
            let suffix = rest.split_once('}').map(|(_, s)| s).unwrap_or("");
            let value = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
            if value.is_empty() || value.contains('/') {
                return None;
            }
            Some(Some(percent_decode(value)?))
        }
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn query_params(query: Option<&str>) -> Option<Vec<(String, String)>> {
    let Some(query) = query else { return Some(Vec::new()) };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k)?, percent_decode(&v.replace('+', " "))?))
        })
        .collect()
}

type Answer = Response<Full<Bytes>>;

fn json_response(status: StatusCode, value: &Value) -> Answer {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("static response parts")
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    json_response(status, &json!({ "error": message.into(), "status": status.as_u16() }))
}

fn summary_json(s: &SessionSummary) -> Value {
    json!({
        "tenant": s.tenant.0,
        "client_id": s.client_id,
        "shard": s.shard,
        "connected": s.connected,
        "protocol_level": s.protocol_level,
        "expiry_secs": s.expiry_secs,
        "subscriptions": s.subscriptions,
        "queued": s.queued,
        "inflight": s.inflight,
        "stored": s.stored,
        "peer": s.peer.map(|p| p.to_string()),
    })
}

fn detail_json(d: &SessionDetail) -> Value {
    let mut value = summary_json(&d.summary);
    value["subscription_list"] = d
        .subscriptions
        .iter()
        .map(|s| {
            json!({
                "filter": s.filter,
                "qos": s.qos,
                "no_local": s.no_local,
                "retain_as_published": s.retain_as_published,
                "retain_handling": s.retain_handling,
                "subscription_id": s.subscription_id,
            })
        })
        .collect();
    value
}

/// The tenant query parameter (default 0); Err is the 400 answer (boxed: a response is large).
fn tenant_of(params: &[(String, String)]) -> Result<TenantId, Box<Answer>> {
    match params.iter().find(|(k, _)| k == "tenant") {
        None => Ok(TenantId(0)),
        Some((_, v)) => v.parse::<u32>().map(TenantId).map_err(|_| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                format!("tenant must be a non-negative integer, not {v:?}"),
            ))
        }),
    }
}

fn admin_error(e: AdminError) -> Answer {
    let status = match e {
        AdminError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        AdminError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        AdminError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}

/// Runs a blocking shard query off the async thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("admin query task")
}

async fn handle(state: Arc<AdminState>, request: Request<Incoming>) -> Result<Answer, Infallible> {
    let path = request.uri().path().to_string();
    let routes = routes();
    let mut allowed = false;
    let mut found = None;
    for (index, route) in routes.iter().enumerate() {
        if let Some(param) = match_path(route.path, &path) {
            allowed = true;
            if route.method == request.method() {
                found = Some((index, param));
                break;
            }
        }
    }
    let Some((index, param)) = found else {
        return Ok(if allowed {
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not served on {path}", request.method()))
        } else {
            error(StatusCode::NOT_FOUND, format!("no endpoint {path}"))
        });
    };
    let route = &routes[index];
    if route.auth {
        if let Some(token) = &state.token {
            let given = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
            let ok =
                given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|t| constant_time_eq(t, token));
            if !ok {
                let mut answer = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                answer.headers_mut().insert("www-authenticate", "Bearer".parse().expect("static header"));
                return Ok(answer);
            }
        }
    }
    let Some(params) = query_params(request.uri().query()) else {
        return Ok(error(StatusCode::BAD_REQUEST, "the query string is not valid percent-encoded UTF-8"));
    };
    let (route_path, method) = (route.path, route.method.clone());
    Ok(serve(&state, request, route_path, method, param, params, &path)
        .await
        .unwrap_or_else(|answer| *answer))
}

/// Serves one matched, authorised route. `Err` is an early answer (a 4xx), boxed as it is large.
async fn serve(
    state: &Arc<AdminState>,
    request: Request<Incoming>,
    route_path: &'static str,
    method: Method,
    param: Option<String>,
    params: Vec<(String, String)>,
    path: &str,
) -> Result<Answer, Box<Answer>> {
    let answer = match (route_path, method) {
        ("/health", _) => {
            json_response(StatusCode::OK, &json!({ "status": "ok", "shards": state.stats.len() }))
        }
        ("/metrics", _) => Response::builder()
            .header(CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(metrics_text(&state.stats, &state.tenants, &state.listeners))))
            .expect("static response parts"),
        ("/openapi.json", _) => json_response(StatusCode::OK, &openapi()),
        ("/api/v1/sessions", _) => {
            let tenant = tenant_of(&params)?;
            let limit = match params.iter().find(|(k, _)| k == "limit").map(|(_, v)| v.parse::<usize>()) {
                None => 100,
                Some(Ok(n)) if (1..=PAGE_LIMIT_MAX).contains(&n) => n,
                Some(_) => {
                    return Ok(error(
                        StatusCode::BAD_REQUEST,
                        format!("limit must be an integer in 1..={PAGE_LIMIT_MAX}"),
                    ))
                }
            };
            let after = params.iter().find(|(k, _)| k == "after").map(|(_, v)| v.clone());
            let handle = state.handle.clone();
            match blocking(move || handle.list(tenant, after.as_deref(), limit)).await {
                Ok(page) => {
                    let next =
                        (page.len() == limit).then(|| page.last().map(|s| s.client_id.clone())).flatten();
                    let sessions: Vec<Value> = page.iter().map(summary_json).collect();
                    json_response(StatusCode::OK, &json!({ "sessions": sessions, "next": next }))
                }
                Err(e) => admin_error(e),
            }
        }
        ("/api/v1/sessions/{client_id}/subscriptions", method) => {
            let tenant = tenant_of(&params)?;
            let client_id = param.unwrap_or_default();
            let handle = state.handle.clone();
            if method == Method::POST {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    filter: String,
                    #[serde(default)]
                    qos: u8,
                }
                let body: Body = read_json(request, "bad body").await?;
                match blocking(move || handle.subscribe(tenant, &client_id, &body.filter, body.qos)).await {
                    Ok(Ok(())) => json_response(StatusCode::OK, &json!({ "subscribed": true })),
                    Ok(Err(e)) if e == "no such session" => error(StatusCode::NOT_FOUND, e),
                    Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e),
                    Err(e) => admin_error(e),
                }
            } else {
                let Some(filter) = params.iter().find(|(k, _)| k == "filter").map(|(_, v)| v.clone()) else {
                    return Ok(error(StatusCode::BAD_REQUEST, "the filter query parameter is required"));
                };
                match blocking(move || handle.unsubscribe(tenant, &client_id, &filter)).await {
                    Ok(Some(true)) => no_content(),
                    Ok(Some(false)) => error(StatusCode::NOT_FOUND, "no such subscription"),
                    Ok(None) => error(StatusCode::NOT_FOUND, "no such session"),
                    Err(e) => admin_error(e),
                }
            }
        }
        ("/api/v1/auth/reload", _) => match state.auth.reload() {
            Ok(()) => json_response(StatusCode::OK, &json!({ "reloaded": true })),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        ("/api/v1/publish", _) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                #[serde(default)]
                tenant: u32,
                topic: String,
                #[serde(default)]
                payload: String,
                #[serde(default)]
                qos: u8,
                #[serde(default)]
                retain: bool,
            }
            let body: Body = read_json(request, "bad body").await?;
            let Some(qos) = shardmq_protocol::QoS::from_u8(body.qos) else {
                return Ok(error(StatusCode::BAD_REQUEST, "qos must be 0, 1 or 2"));
            };
            if let Err(e) = shardmq_protocol::topic::validate_topic_name(&body.topic) {
                return Ok(error(StatusCode::BAD_REQUEST, format!("bad topic {:?}: {e}", body.topic)));
            }
            let Ok(topic) = shardmq_protocol::Utf8::new(&body.topic) else {
                return Ok(error(StatusCode::BAD_REQUEST, "the topic is not a valid MQTT string"));
            };
            let msg = Arc::new(shardmq_shards::message::Message {
                tenant: TenantId(body.tenant),
                topic,
                payload: Bytes::from(body.payload.into_bytes()),
                qos,
                retain: body.retain,
                properties: None,
                expires_at: None,
                origin: None,
            });
            let handle = state.handle.clone();
            match blocking(move || handle.publish(msg)).await {
                Ok(()) => json_response(StatusCode::OK, &json!({ "published": true })),
                Err(e) => admin_error(e),
            }
        }
        ("/api/v1/retained", method) => {
            let tenant = tenant_of(&params)?;
            let handle = state.handle.clone();
            if method == Method::DELETE {
                let Some(topic) = params.iter().find(|(k, _)| k == "topic").map(|(_, v)| v.clone()) else {
                    return Ok(error(StatusCode::BAD_REQUEST, "the topic query parameter is required"));
                };
                if let Err(e) = shardmq_protocol::topic::validate_topic_name(&topic) {
                    return Ok(error(StatusCode::BAD_REQUEST, format!("bad topic {topic:?}: {e}")));
                }
                match blocking(move || handle.retain_delete(tenant, &topic)).await {
                    Ok(true) => no_content(),
                    Ok(false) => error(StatusCode::NOT_FOUND, "no retained message on that topic"),
                    Err(e) => admin_error(e),
                }
            } else {
                let filter =
                    params.iter().find(|(k, _)| k == "filter").map_or("#".to_string(), |(_, v)| v.clone());
                if let Err(e) = shardmq_protocol::topic::validate_topic_filter(&filter) {
                    return Ok(error(StatusCode::BAD_REQUEST, format!("bad filter {filter:?}: {e}")));
                }
                match blocking(move || handle.retained(tenant, &filter)).await {
                    Ok(messages) => {
                        let list: Vec<Value> = messages
                            .iter()
                            .map(|m| {
                                json!({
                                    "topic": m.topic.as_str(),
                                    "payload": std::str::from_utf8(&m.payload).ok(),
                                    "payload_bytes": m.payload.len(),
                                    "qos": m.qos as u8,
                                })
                            })
                            .collect();
                        json_response(StatusCode::OK, &json!({ "messages": list }))
                    }
                    Err(e) => admin_error(e),
                }
            }
        }
        ("/api/v1/tenants/{tenant}/settings", method) => {
            let Some(tenant) = param.as_deref().and_then(|t| t.parse::<u32>().ok()).map(TenantId) else {
                return Ok(error(StatusCode::BAD_REQUEST, "the tenant id must be a non-negative integer"));
            };
            if method == Method::PUT {
                let settings: TenantSettings = read_json(request, "bad settings").await?;
                if let Err(e) = state.tenants.provider.set(tenant, settings) {
                    return Ok(error(StatusCode::BAD_REQUEST, e));
                }
            }
            let settings = state.tenants.settings(tenant);
            json_response(StatusCode::OK, &serde_json::to_value(&*settings).expect("settings serialise"))
        }
        ("/api/v1/sessions/{client_id}", method) => {
            let tenant = tenant_of(&params)?;
            let client_id = param.unwrap_or_default();
            let handle = state.handle.clone();
            if method == Method::DELETE {
                match blocking(move || handle.disconnect(tenant, &client_id)).await {
                    Ok(true) => Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .body(Full::new(Bytes::new()))
                        .expect("static response parts"),
                    Ok(false) => error(StatusCode::NOT_FOUND, "no such session"),
                    Err(e) => admin_error(e),
                }
            } else {
                match blocking(move || handle.inspect(tenant, &client_id)).await {
                    Ok(Some(detail)) => json_response(StatusCode::OK, &detail_json(&detail)),
                    Ok(None) => error(StatusCode::NOT_FOUND, "no such session"),
                    Err(e) => admin_error(e),
                }
            }
        }
        _ => error(StatusCode::NOT_FOUND, format!("no endpoint {path}")),
    };
    Ok(answer)
}

/// Most bytes of a request body.
const BODY_BYTES_MAX: usize = 64 * 1024;

/// Reads a request body of at most [`BODY_BYTES_MAX`]; Err is the 400/413 answer.
async fn read_body(request: Request<Incoming>) -> Result<Bytes, Box<Answer>> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(request.into_body(), BODY_BYTES_MAX);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body exceeds {BODY_BYTES_MAX} bytes"),
        ))),
        Err(e) => Err(Box::new(error(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}")))),
    }
}

fn no_content() -> Answer {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Full::new(Bytes::new()))
        .expect("static response parts")
}

/// Reads a JSON request body; Err is the 400 answer naming `what` was wrong.
async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
    what: &str,
) -> Result<T, Box<Answer>> {
    let body = read_body(request).await?;
    serde_json::from_slice(&body)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, format!("{what}: {e}"))))
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The OpenAPI 3 document of [`routes`].
pub fn openapi() -> Value {
    let mut paths = serde_json::Map::new();
    for route in routes() {
        let entry = paths.entry(route.path.to_string()).or_insert_with(|| json!({}));
        let mut parameters: Vec<Value> = route
            .query
            .iter()
            .map(|(name, description)| {
                json!({ "name": name, "in": "query", "required": false, "description": description, "schema": { "type": "string" } })
            })
            .collect();
        if route.path.contains("{client_id}") {
            parameters.push(json!({ "name": "client_id", "in": "path", "required": true, "schema": { "type": "string" } }));
        }
        if route.path.contains("{tenant}") {
            parameters.push(json!({ "name": "tenant", "in": "path", "required": true, "schema": { "type": "integer", "minimum": 0 } }));
        }
        let responses: serde_json::Map<String, Value> =
            route.responses.iter().map(|(code, d)| (code.to_string(), json!({ "description": d }))).collect();
        let mut operation =
            json!({ "summary": route.summary, "parameters": parameters, "responses": responses });
        if route.auth {
            operation["security"] = json!([{ "bearer": [] }]);
        }
        entry[route.method.as_str().to_lowercase()] = operation;
    }
    json!({
        "openapi": "3.0.3",
        "info": { "title": "shardmq admin API", "version": env!("CARGO_PKG_VERSION") },
        "paths": paths,
        "components": { "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } } },
    })
}

/// The counters of every shard in the Prometheus text format (read with relaxed atomic loads).
pub fn metrics_text(stats: &[Arc<ShardStats>], tenants: &Tenants, listeners: &[Arc<ListenerInfo>]) -> String {
    type Field = fn(&ShardStats) -> &AtomicU64;
    let metrics: &[(&str, &str, &str, Field)] = &[
        ("shardmq_connections", "gauge", "Live client connections.", |s| &s.connections),
        ("shardmq_sessions", "gauge", "Sessions (connected and offline persistent).", |s| &s.sessions),
        ("shardmq_connects_total", "counter", "CONNECTs accepted.", |s| &s.connects_total),
        ("shardmq_publishes_received_total", "counter", "PUBLISH packets received from clients.", |s| {
            &s.publishes_in
        }),
        ("shardmq_publishes_sent_total", "counter", "PUBLISH packets sent to clients.", |s| &s.publishes_out),
        (
            "shardmq_dropped_queue_full_total",
            "counter",
            "Messages dropped because a session queue was full.",
            |s| &s.dropped_queue_full,
        ),
        (
            "shardmq_dropped_offline_total",
            "counter",
            "Messages not queued for an offline session (QoS 0 or not persistent).",
            |s| &s.dropped_offline_qos0,
        ),
        ("shardmq_dropped_expired_total", "counter", "Messages dropped because their expiry passed.", |s| {
            &s.dropped_expired
        }),
        (
            "shardmq_dropped_too_large_total",
            "counter",
            "Messages larger than a client's maximum packet size.",
            |s| &s.dropped_too_large,
        ),
        (
            "shardmq_denied_total",
            "counter",
            "Publishes and subscriptions refused by a denied topic filter.",
            |s| &s.dropped_denied,
        ),
        ("shardmq_malformed_packets_total", "counter", "Connections closed for a malformed packet.", |s| {
            &s.malformed_packets
        }),
        ("shardmq_protocol_errors_total", "counter", "Connections closed for a protocol error.", |s| {
            &s.protocol_errors
        }),
        (
            "shardmq_reader_backpressure_waits_total",
            "counter",
            "Times a reader paused because its client did not read.",
            |s| &s.reader_backpressure_waits,
        ),
        (
            "shardmq_subscriptions_refused_quota_total",
            "counter",
            "Subscriptions refused by the per-session limit.",
            |s| &s.subscriptions_refused_quota,
        ),
        ("shardmq_auth_failures_total", "counter", "CONNECTs refused by the auth provider.", |s| {
            &s.auth_failures
        }),
        ("shardmq_acl_denied_total", "counter", "PUBLISHes and SUBSCRIBE filters refused by the ACL.", |s| {
            &s.acl_denied
        }),
        ("shardmq_store_appends_total", "counter", "Records appended to the shard's store.", |s| {
            &s.store_appends
        }),
        (
            "shardmq_store_append_failures_total",
            "counter",
            "Store appends that failed (disk budget, full disk).",
            |s| &s.store_append_failures,
        ),
        (
            "shardmq_publishes_refused_storage_total",
            "counter",
            "Publishes refused (v5 0x97) or dropped (3.x) because a store could not take them.",
            |s| &s.publishes_refused_storage,
        ),
        ("shardmq_recovered_sessions", "gauge", "Sessions recovered from the store at start-up.", |s| {
            &s.recovered_sessions
        }),
        (
            "shardmq_recovered_messages",
            "gauge",
            "Queued messages recovered from the store at start-up.",
            |s| &s.recovered_messages,
        ),
    ];
    let mut out = String::with_capacity(4096);
    for (name, kind, help, field) in metrics {
        family(&mut out, name, kind, help);
        for (shard, s) in stats.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", field(s).load(Ordering::Relaxed));
        }
    }
    let name = "shardmq_throttled_total";
    family(&mut out, name, "counter", "Times a reader paused for a publish limit, by limit.");
    let throttles = [Limit::PublishRate, Limit::Bandwidth, Limit::TenantPublishRate, Limit::TenantBandwidth];
    for (shard, s) in stats.iter().enumerate() {
        for limit in throttles {
            let value = s.throttled[limit.index()].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{shard=\"{shard}\",limit=\"{}\"}} {value}", limit.name());
        }
    }
    let name = "shardmq_puback_latency_seconds";
    let help =
        "From a client's QoS 1/2 PUBLISH to its PUBACK/PUBREC (routing, and durability of stored copies).";
    family(&mut out, name, "histogram", help);
    for (shard, s) in stats.iter().enumerate() {
        let h = &s.ack_latency;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let bucket = |i: usize| load(&h.buckets[i]);
        histogram_lines(
            &mut out,
            name,
            &format!("shard=\"{shard}\""),
            bucket,
            load(&h.sum_us),
            load(&h.count),
        );
    }
    let all = tenants.all();
    let name = "shardmq_tenant_puback_latency_seconds";
    family(&mut out, name, "histogram", help);
    for (tenant, state) in &all {
        let bucket = |i: usize| state.sum(|t| &t.ack_latency.buckets[i]);
        let (sum_us, count) = (state.sum(|t| &t.ack_latency.sum_us), state.sum(|t| &t.ack_latency.count));
        histogram_lines(&mut out, name, &format!("tenant=\"{}\"", tenant.0), bucket, sum_us, count);
    }
    type TenantField = fn(&shardmq_shards::tenants::TenantState) -> &AtomicU64;
    let per_tenant: [(&str, &str, &str, TenantField); 3] = [
        ("shardmq_tenant_connections", "gauge", "Live connections per tenant.", |t| &t.connections),
        ("shardmq_tenant_connects_total", "counter", "CONNECTs accepted per tenant.", |t| &t.connects_total),
        (
            "shardmq_tenant_auth_failures_total",
            "counter",
            "CONNECTs refused by the auth provider, under the user's tenant when known, else the listener's.",
            |t| &t.auth_failures,
        ),
    ];
    for (name, kind, help, field) in per_tenant {
        family(&mut out, name, kind, help);
        for (tenant, state) in &all {
            let _ =
                writeln!(out, "{name}{{tenant=\"{}\"}} {}", tenant.0, field(state).load(Ordering::Relaxed));
        }
    }
    // Traffic: each shard keeps its own block per tenant; a tenant's series is their sum, and a
    // shard's by-QoS series is the sum over tenants of its block.
    type TrafficField = fn(&TenantTraffic) -> &AtomicU64;
    type QosField = fn(&TenantTraffic, usize) -> &AtomicU64;
    let by_qos: [(&str, &str, QosField); 2] = [
        ("publishes_received_total", "PUBLISH packets received from clients, by QoS.", |t, q| {
            &t.publishes_in[q]
        }),
        ("publishes_sent_total", "PUBLISH packets sent to clients, by QoS.", |t, q| &t.publishes_out[q]),
    ];
    for (suffix, help, field) in by_qos {
        let name = format!("shardmq_tenant_{suffix}");
        family(&mut out, &name, "counter", help);
        for (tenant, state) in &all {
            for qos in 0..3 {
                let value = state.sum(|t| field(t, qos));
                let _ = writeln!(out, "{name}{{tenant=\"{}\",qos=\"{qos}\"}} {value}", tenant.0);
            }
        }
        let name = format!("shardmq_shard_{suffix}");
        family(&mut out, &name, "counter", help);
        for shard in 0..stats.len() {
            for qos in 0..3 {
                let value: u64 =
                    all.iter().map(|(_, s)| field(s.traffic(shard), qos).load(Ordering::Relaxed)).sum();
                let _ = writeln!(out, "{name}{{shard=\"{shard}\",qos=\"{qos}\"}} {value}");
            }
        }
    }
    let traffic: [(&str, &str, &str, TrafficField); 4] = [
        ("received_payload_bytes_total", "counter", "Payload bytes of PUBLISH packets received.", |t| {
            &t.payload_bytes_in
        }),
        ("sent_payload_bytes_total", "counter", "Payload bytes of PUBLISH packets sent.", |t| {
            &t.payload_bytes_out
        }),
        ("sessions", "gauge", "Sessions (connected and offline), refreshed each second.", |t| &t.sessions),
        ("queued_messages", "gauge", "Messages queued or in flight, refreshed each second.", |t| {
            &t.queued_messages
        }),
    ];
    for (suffix, kind, help, field) in traffic {
        let name = format!("shardmq_tenant_{suffix}");
        family(&mut out, &name, kind, help);
        for (tenant, state) in &all {
            let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {}", tenant.0, state.sum(field));
        }
        if suffix == "sessions" {
            continue; // shardmq_sessions{shard} already says it
        }
        let name = format!("shardmq_shard_{suffix}");
        family(&mut out, &name, kind, help);
        for shard in 0..stats.len() {
            let value: u64 = all.iter().map(|(_, s)| field(s.traffic(shard)).load(Ordering::Relaxed)).sum();
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {value}");
        }
    }
    let name = "shardmq_tenant_dropped_total";
    family(&mut out, name, "counter", "Messages not delivered to a tenant's subscribers, by reason.");
    for (tenant, state) in &all {
        for reason in DropReason::ALL {
            let value = state.sum(|t| &t.dropped[reason as usize]);
            let _ = writeln!(out, "{name}{{tenant=\"{}\",reason=\"{}\"}} {value}", tenant.0, reason.name());
        }
    }
    let name = "shardmq_tenant_limited_total";
    family(&mut out, name, "counter", "Refusals and throttles per tenant, by the limit that caused them.");
    for (tenant, state) in &all {
        for limit in Limit::ALL {
            let value = state.limited[limit.index()].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{tenant=\"{}\",limit=\"{}\"}} {value}", tenant.0, limit.name());
        }
    }
    let name = "shardmq_listener_connections";
    family(&mut out, name, "gauge", "Live connections per listener.");
    for l in listeners {
        let labels = format!("listener=\"{}\",kind=\"{}\"", l.config.address, l.config.kind.name());
        let _ = writeln!(out, "{name}{{{labels}}} {}", l.live.load(Ordering::Relaxed));
    }
    let name = "shardmq_listener_refused_total";
    family(
        &mut out,
        name,
        "counter",
        "Connections a listener refused, by reason (full, proxy, tls, websocket).",
    );
    for l in listeners {
        let labels = format!("listener=\"{}\",kind=\"{}\"", l.config.address, l.config.kind.name());
        let counters = [
            ("full", &l.refused_full),
            ("proxy", &l.proxy_errors),
            ("tls", &l.tls_errors),
            ("websocket", &l.ws_errors),
        ];
        for (reason, counter) in counters {
            let _ =
                writeln!(out, "{name}{{{labels},reason=\"{reason}\"}} {}", counter.load(Ordering::Relaxed));
        }
    }
    out
}

/// The sample lines of one latency histogram (microsecond buckets: bucket `i` holds values below
/// 2^i us, the last is unbounded) with `labels`, in seconds.
fn histogram_lines(
    out: &mut String,
    name: &str,
    labels: &str,
    bucket: impl Fn(usize) -> u64,
    sum_us: u64,
    count: u64,
) {
    let mut cumulative = 0u64;
    for index in 0..LATENCY_BUCKETS {
        cumulative += bucket(index);
        if index + 1 < LATENCY_BUCKETS {
            let le = (1u64 << index) as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

/// The `# HELP` and `# TYPE` lines of one metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Refuses a configuration that would expose the API without a token.
pub fn check_config(listen: SocketAddr, token: Option<&str>) -> Result<()> {
    if !listen.ip().is_loopback() && token.is_none_or(str::is_empty) {
        bail!("--admin-listen {listen} is not a loopback address: set --admin-token (or admin_token in the config file)");
    }
    Ok(())
}

/// Binds the admin listener and serves it on a new thread. Returns the bound address.
pub fn spawn(listen: SocketAddr, state: AdminState) -> Result<SocketAddr> {
    check_config(listen, state.token.as_deref())?;
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on --admin-listen {listen}"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let state = Arc::new(state);
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                warn!(error = %e, "admin API: cannot build its runtime");
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "admin API: cannot adopt its listener");
                    return;
                }
            };
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| handle(state.clone(), request));
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if let Err(e) =
                        hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
                    {
                        tracing::debug!(error = %e, "admin API: connection ended with an error");
                    }
                });
            }
        });
    })?;
    info!(listen = %local, "admin API listening");
    Ok(local)
}
