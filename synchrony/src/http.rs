//! The HTTP surface under the context path: heartbeat, health, app registration, the public
//! key, the WebSocket endpoint and the document REST API.
//!
//! Tokens travel as `?token=` (browsers cannot set WebSocket headers), `Authorization: Bearer`,
//! or `x-token`. Every error is JSON `{type, message}`; infrastructure failures are logged and
//! shown to clients only as "unavailable" or "internal".

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use synchrony_protocol::{CloseCode, DocId};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::auth::{Access, AuthError, Principal};
use crate::doc::{DocCommand, DocError, JoinError, ResetContent};
use crate::gate::{GateError, RegisterError};
use crate::placement::Owner;
use crate::session::{self, SessionParams};
use crate::upgrade::{Upgrade, UpgradeRejection};
use crate::Engine;

/// What a client sees when a request fails.
#[derive(Debug)]
pub enum ApiError {
    BadRequest {
        kind: &'static str,
        message: String,
    },
    Auth(AuthError),
    NotFound {
        kind: &'static str,
        message: String,
    },
    TooLarge(String),
    Unavailable(&'static str),
    /// The connection limit is reached.
    Overloaded,
    /// A maintenance lock holds the document (423, Synchrony's `hub.error/locked`).
    Locked,
    Status {
        status: StatusCode,
        kind: &'static str,
        message: String,
    },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, message) = match self {
            ApiError::BadRequest { kind, message } => (StatusCode::BAD_REQUEST, kind, message),
            ApiError::Auth(e) if e.is_forbidden() => {
                (StatusCode::FORBIDDEN, e.kind(), e.to_string())
            }
            ApiError::Auth(e) => (StatusCode::UNAUTHORIZED, e.kind(), e.to_string()),
            ApiError::NotFound { kind, message } => (StatusCode::NOT_FOUND, kind, message),
            ApiError::TooLarge(message) => (StatusCode::PAYLOAD_TOO_LARGE, "too-large", message),
            ApiError::Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "connection limit reached (synchrony.max.connections); retry".to_owned(),
            ),
            ApiError::Unavailable(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                message.to_owned(),
            ),
            ApiError::Locked => (
                StatusCode::LOCKED,
                "hub.error/locked",
                DocError::Locked.to_string(),
            ),
            ApiError::Status {
                status,
                kind,
                message,
            } => (status, kind, message),
        };
        (status, Json(json!({ "type": kind, "message": message }))).into_response()
    }
}

impl From<GateError> for ApiError {
    fn from(e: GateError) -> Self {
        match e {
            GateError::Auth(e) => ApiError::Auth(e),
            GateError::Storage(error) => {
                tracing::error!(%error, "token check failed: storage");
                ApiError::Unavailable("storage unavailable")
            }
        }
    }
}

impl From<JoinError> for ApiError {
    fn from(e: JoinError) -> Self {
        match e {
            JoinError::LoadFailed => ApiError::Unavailable("document could not be loaded"),
            JoinError::LoadUnavailable => {
                ApiError::Unavailable("storage unavailable: the document could not be read")
            }
            JoinError::ShuttingDown => ApiError::Unavailable("shutting down"),
            JoinError::Busy => ApiError::Unavailable("document busy; try again"),
            JoinError::StorageUnavailable => {
                ApiError::Unavailable("storage unavailable and the commit queue full; try again")
            }
            JoinError::Timeout => ApiError::Unavailable("the document did not answer in time"),
            JoinError::NotJoined => ApiError::Unavailable("not ready"),
        }
    }
}

impl From<DocError> for ApiError {
    fn from(e: DocError) -> Self {
        match e {
            DocError::InvalidUpdate(message) => ApiError::BadRequest {
                kind: "invalid-update",
                message,
            },
            DocError::TooLarge => ApiError::TooLarge(e.to_string()),
            DocError::Storage => ApiError::Unavailable("storage unavailable"),
            DocError::WrongRoot(message) => ApiError::BadRequest {
                kind: "wrong-root-type",
                message,
            },
            DocError::Locked => ApiError::Locked,
        }
    }
}

/// Largest app registration body (`{appid, secret, auth-token}`), read before the caller is
/// authenticated.
const REGISTRATION_BODY_BYTES: usize = 16 * 1024;

/// Initial read buffer of a WebSocket.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Builds the router; tests reuse it.
pub fn router(engine: Arc<Engine>, context_path: &str) -> Router {
    let body_limit = engine.config.limits.max_doc_bytes;
    let inner = Router::new()
        .route("/heartbeat", get(heartbeat))
        .route("/jwt-key", get(jwt_key))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        // Read before the caller is known: kept small.
        .route(
            "/v1/apps/secret",
            post(register_app).layer(DefaultBodyLimit::max(REGISTRATION_BODY_BYTES)),
        )
        .route(
            "/v1/hub-lock-state",
            get(crate::admin::locks)
                .post(crate::admin::lock)
                .delete(crate::admin::unlock),
        )
        .route("/v1/history/evict/{job}", post(crate::admin::evict))
        .route("/v1/history/count", get(crate::admin::count))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/owner/{*doc}", get(cluster_owner))
        .route("/v1/ws/{*doc}", get(websocket))
        .route("/v1/data", get(list_docs))
        .route(
            "/v1/data/{*doc}",
            get(read_doc)
                .put(write_doc)
                .post(post_doc)
                .delete(delete_doc)
                .route_layer(axum::middleware::from_fn_with_state(
                    engine.clone(),
                    route_to_owner,
                )),
        )
        .layer(DefaultBodyLimit::max(body_limit));
    let inner = if engine.config.demo_enabled {
        inner.merge(crate::demo::routes())
    } else {
        inner
    };
    let inner = inner
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            crate::listen::BODY_READ_TIMEOUT,
        ))
        .layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            check_origin,
        ))
        // Every request gets a span holding its id (the caller's `x-request-id`, or a fresh
        // UUID), so each log line it causes names it; the id is echoed in the response.
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|request: &axum::http::Request<_>| {
                    let id = request
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id = %id,
                    )
                })
                .on_request(())
                .on_response(
                    |response: &Response, latency: std::time::Duration, _: &tracing::Span| {
                        tracing::debug!(status = response.status().as_u16(), ?latency, "answered");
                    },
                )
                .on_failure(()),
        )
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            tower_http::request_id::MakeRequestUuid,
        ))
        .with_state(engine);
    if context_path.is_empty() {
        inner
    } else {
        Router::new().nest(context_path, inner)
    }
}

/// In a cluster, carries a document request to the node that owns the document (see
/// [`crate::cluster::rest`]).
async fn route_to_owner(
    State(engine): State<Arc<Engine>>,
    Path(doc): Path<String>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(cluster) = engine.cluster.get() else {
        // A cluster node that has not joined yet cannot tell who owns the document.
        if engine.clustered() {
            return ApiError::Unavailable("not ready").into_response();
        }
        return match tokens_first(&engine, request, &doc).await {
            Ok(request) => next.run(request).await,
            Err(refusal) => refusal,
        };
    };
    if request
        .extensions()
        .get::<crate::cluster::rest::Forwarded>()
        .is_some()
    {
        return next.run(request).await;
    }
    // A node whose database is not the cluster's serves no page.
    if engine.wrong_store().is_some() {
        return ApiError::Unavailable("not ready").into_response();
    }
    // A bad id is the handler's to refuse; a version belongs to its document's owner.
    let Ok(id) = DocId::parse(crate::versions::split(&doc).0) else {
        return next.run(request).await;
    };
    match cluster.owner_in(&cluster.view(), id.as_str()) {
        Owner::Local => match tokens_first(&engine, request, &doc).await {
            Ok(request) => next.run(request).await,
            Err(refusal) => refusal,
        },
        Owner::Remote { node } => {
            // Tokens first: a request that could not pass the owner's checks is refused here,
            // before its body is read or anything crosses the link (the owner checks again,
            // exactly).
            let (mut parts, body) = request.into_parts();
            if let Err(refusal) = may_reach(&engine, &mut parts, &id).await {
                return refusal.into_response();
            }
            let request = axum::extract::Request::from_parts(parts, body);
            match crate::cluster::rest::forward(cluster, &node, request).await {
                Ok(response) => response,
                Err(crate::cluster::rest::ForwardError::TooLarge) => {
                    ApiError::TooLarge("the request body is over synchrony.max.doc.bytes".into())
                        .into_response()
                }
                Err(error) => {
                    tracing::warn!(%error, owner = %node, "REST request not forwarded");
                    ApiError::Unavailable("the document's owner is unreachable; try again")
                        .into_response()
                }
            }
        }
    }
}

/// Rich-text resets parsed at once; each holds a blocking thread for up to a few seconds.
const XML_PARSES_AT_ONCE: usize = 2;
/// How long a reset waits for its turn to be parsed before 503.
const XML_PARSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
static XML_PARSES: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();

/// Tokens first for a change that carries a body (`PUT`, `POST`): the caller must hold a valid
/// token allowed to change the page before a byte of the body is read. (A handler extracts
/// its body before it runs, so its own access check would come after reading it all; the
/// handler still checks exactly what its route needs.)
async fn tokens_first(
    engine: &Arc<Engine>,
    request: axum::extract::Request,
    doc: &str,
) -> Result<axum::extract::Request, Response> {
    use axum::http::Method;
    if !matches!(*request.method(), Method::PUT | Method::POST) {
        return Ok(request);
    }
    let Ok(id) = DocId::parse(crate::versions::split(doc).0) else {
        return Ok(request);
    };
    let (mut parts, body) = request.into_parts();
    may_reach(engine, &mut parts, &id)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok(axum::extract::Request::from_parts(parts, body))
}

/// Whether a document request may be carried to the document's owner: a valid token with at
/// least read access to the document (full access for a change). What exactly each route
/// needs (admin for a delete, say) the owner decides.
async fn may_reach(
    engine: &Arc<Engine>,
    parts: &mut axum::http::request::Parts,
    doc: &DocId,
) -> Result<(), ApiError> {
    let Caller(principal) =
        <Caller as axum::extract::FromRequestParts<_>>::from_request_parts(parts, engine).await?;
    match principal.access_to(doc) {
        None => Err(ApiError::Auth(AuthError::Forbidden)),
        Some(Access::Read) if parts.method != axum::http::Method::GET => {
            Err(ApiError::Auth(AuthError::Forbidden))
        }
        Some(_) => Ok(()),
    }
}

/// Refuses requests from web pages whose origin is not allowed (see [`crate::origin`]).
async fn check_origin(
    State(engine): State<Arc<Engine>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if engine
        .origins
        .admits(request.headers(), !engine.gate.enforced())
    {
        return next.run(request).await;
    }
    let origin = request
        .headers()
        .get("origin")
        .and_then(|o| o.to_str().ok())
        .unwrap_or("?");
    tracing::debug!(origin, path = %request.uri().path(), "request from a page whose origin is not allowed");
    (
        StatusCode::FORBIDDEN,
        Json(json!({
            "type": "origin-not-allowed",
            "message": format!("pages from {origin} may not use this engine (synchrony.allowed.origins)"),
        })),
    )
        .into_response()
}

/// The token of a request: `?token=`, then `Authorization: Bearer`, then `x-token`.
fn token<'a>(query: Option<&'a str>, headers: &'a HeaderMap) -> Option<&'a str> {
    query
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
        })
        .or_else(|| headers.get("x-token").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// The verified principal of a request, from its token (see [`token`]).
pub(crate) struct Caller(pub(crate) Principal);

impl axum::extract::FromRequestParts<Arc<Engine>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        engine: &Arc<Engine>,
    ) -> Result<Self, ApiError> {
        let query = Query::<TokenQuery>::try_from_uri(&parts.uri)
            .map(|q| q.0)
            .unwrap_or_default();
        let principal = engine
            .gate
            .authenticate(token(query.token.as_deref(), &parts.headers))
            .await?;
        Ok(Caller(principal))
    }
}

pub(crate) fn parse_doc(doc: &str) -> Result<DocId, ApiError> {
    DocId::parse(doc).map_err(|e| ApiError::BadRequest {
        kind: "invalid-document-id",
        message: e.to_string(),
    })
}

pub(crate) fn require(principal: &Principal, doc: &DocId, need: Access) -> Result<(), ApiError> {
    match principal.access_to(doc) {
        Some(access) if access >= need => Ok(()),
        _ => Err(ApiError::Auth(AuthError::Forbidden)),
    }
}

async fn heartbeat(State(engine): State<Arc<Engine>>) -> Response {
    if engine.can_serve() {
        (StatusCode::OK, "OK").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

async fn jwt_key(State(engine): State<Arc<Engine>>) -> Result<Response, ApiError> {
    let key = engine.gate.public_key().ok_or(ApiError::NotFound {
        kind: "not-configured",
        message: "no public key is configured (jwt.public.key)".into(),
    })?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain")],
        key.x509_base64.clone(),
    )
        .into_response())
}

/// Whether a request comes from this machine itself: its socket peer is loopback and no proxy
/// forwarded it (a proxy on the same host makes everyone loopback), or a proxy named in
/// `synchrony.trusted.proxies` forwarded it for a loopback client.
pub(crate) fn local_caller(engine: &Engine, parts: &axum::http::request::Parts) -> bool {
    let Some(peer) = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|p| p.0.ip())
    else {
        return false;
    };
    let headers = &parts.headers;
    let forwarded = ["x-forwarded-for", "forwarded", "x-real-ip"]
        .iter()
        .any(|h| headers.contains_key(*h));
    if !forwarded {
        return peer.is_loopback();
    }
    let trusted = |ip: &std::net::IpAddr| {
        engine
            .config
            .trusted_proxies
            .iter()
            .any(|net| net.contains(ip))
    };
    if !trusted(&peer) || headers.contains_key("forwarded") || headers.contains_key("x-real-ip") {
        return false;
    }
    // The client is the rightmost address that is not a trusted proxy (or the leftmost, when
    // every hop is one).
    let chain: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|a| a.trim().to_owned())
        .collect();
    let mut client = None;
    for hop in chain.iter().rev() {
        match hop.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                client = Some(ip);
                if !trusted(&ip) {
                    break;
                }
            }
            Err(_) => return false,
        }
    }
    client.is_some_and(|ip| ip.is_loopback())
}

/// The operator endpoints (`/v1/cluster`, its owner lookup): open on an engine without
/// authentication (loopback only) and to this machine's own unproxied callers; otherwise an
/// admin token.
async fn operator_access(
    engine: &Arc<Engine>,
    parts: &mut axum::http::request::Parts,
) -> Result<(), ApiError> {
    if !engine.gate.enforced() || local_caller(engine, parts) {
        return Ok(());
    }
    let Caller(principal) =
        <Caller as axum::extract::FromRequestParts<_>>::from_request_parts(parts, engine).await?;
    if principal.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Auth(AuthError::Forbidden))
    }
}

/// The metrics in the Prometheus text format, to `synchrony.metrics.access`'s callers.
async fn metrics(
    State(engine): State<Arc<Engine>>,
    mut parts: axum::http::request::Parts,
) -> Result<Response, ApiError> {
    use crate::config::MetricsAccess;
    let open = match engine.config.metrics_access {
        MetricsAccess::Open => true,
        MetricsAccess::Loopback => local_caller(&engine, &parts),
        MetricsAccess::Token => false,
    };
    if !open {
        let Caller(principal) =
            <Caller as axum::extract::FromRequestParts<_>>::from_request_parts(&mut parts, &engine)
                .await?;
        if !principal.is_admin() {
            return Err(ApiError::Auth(AuthError::Forbidden));
        }
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        engine.metrics.render(&engine),
    )
        .into_response())
}

/// Health as JSON. It never touches the database itself: it reports what the storage probe
/// (every 2 s) and the last group commit found, so a flood of health requests costs nothing.
///
/// Strangers (cluster panic) are reported in detail but leave the status `ok`: every node keeps
/// serving and loses nothing, and a 503 on every healthy node would only make load balancers
/// and monitors act on the wrong nodes. With tokens enforced, a caller that is neither this
/// machine nor an admin learns only up or down.
async fn health(
    State(engine): State<Arc<Engine>>,
    mut parts: axum::http::request::Parts,
) -> Response {
    let problem = engine.storage_problem();
    let panic = engine.strangers.problem();
    let healthy = problem.is_none() && engine.is_ready();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let insider = !engine.gate.enforced()
        || local_caller(&engine, &parts)
        || <Caller as axum::extract::FromRequestParts<_>>::from_request_parts(&mut parts, &engine)
            .await
            .is_ok_and(|Caller(p)| p.is_admin());
    if !insider {
        let body = json!({ "status": if healthy { "ok" } else { "degraded" } });
        return (status, Json(body)).into_response();
    }
    let (queued_updates, queued_bytes) = engine.docs.persister().queued();
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "reason": match engine.wrong_store() {
            Some(wrong) => Some(wrong),
            None if !engine.is_ready() => Some("not ready".to_owned()),
            None => problem.clone(),
        },
        "cluster_panic": panic,
        "strangers": engine.strangers.list().len(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": engine.started.elapsed().as_secs(),
        "ready": engine.is_ready(),
        "auth": if engine.gate.enforced() { "tokens" } else { "open" },
        "storage": {
            "backend": engine.store.backend().name(),
            "status": if problem.is_none() { "ok" } else { "unavailable" },
            "problem": problem,
            "uncommitted_updates": queued_updates,
            "uncommitted_bytes": queued_bytes,
            "queue_bytes_max": crate::persist::QUEUE_BYTES,
        },
        "documents_loaded": engine.docs.loaded_count(),
        "document_loads_total": engine.docs.load_count(),
        "resident_bytes": engine.docs.resident_bytes(),
        "memory_max_bytes": engine.config.managed.memory_max,
        "connections": engine.connections.load(Ordering::Relaxed),
        "cluster": match engine.cluster.get() {
            None => json!({ "state": "standalone" }),
            Some(cluster) => {
                let view = cluster.view();
                json!({
                    "state": "member",
                    "node": cluster.me(),
                    "epoch": view.epoch,
                    "live_members": view.live.len(),
                })
            }
        },
    });
    (status, Json(body)).into_response()
}

/// `GET {ctx}/v1/cluster`: this node's view of the cluster (see [`operator_access`]: it names
/// nodes and their peer addresses).
async fn cluster_status(
    State(engine): State<Arc<Engine>>,
    mut parts: axum::http::request::Parts,
) -> Result<Response, ApiError> {
    operator_access(&engine, &mut parts).await?;
    Ok(cluster_view(&engine))
}

fn cluster_view(engine: &Engine) -> Response {
    let strangers = engine.strangers.list();
    let Some(cluster) = engine.cluster.get() else {
        return Json(json!({ "clustered": false, "self": null, "epoch": 0, "members": [], "strangers": strangers }))
            .into_response();
    };
    let view = cluster.view();
    let linked = cluster.linked_peers();
    let members: Vec<_> = cluster
        .members()
        .into_iter()
        .map(|m| {
            json!({
                // Whether this node has a link up to it (null for this node itself).
                "link": (m.id != cluster.me()).then(|| linked.contains(&m.id)),
                "id": m.id,
                "peer_address": m.info.peer_addr,
                "http_url": m.info.http_url,
                "state": m.state,
                "uptime_seconds": m.stats.uptime_ms / 1000,
                "documents": m.stats.documents,
                "connections": m.stats.connections,
            })
        })
        .collect();
    Json(json!({
        "clustered": true,
        "self": cluster.me(),
        "name": cluster.settings.name,
        "epoch": view.epoch,
        "live": *view.live,
        "members": members,
        "strangers": strangers,
    }))
    .into_response()
}

/// `GET {ctx}/v1/cluster/owner/{docId}`: which node owns a document in this node's view.
async fn cluster_owner(
    State(engine): State<Arc<Engine>>,
    Path(doc): Path<String>,
    mut parts: axum::http::request::Parts,
) -> Result<Response, ApiError> {
    operator_access(&engine, &mut parts).await?;
    let doc = DocId::parse(&doc).map_err(|e| ApiError::BadRequest {
        kind: "invalid-document-id",
        message: e.to_string(),
    })?;
    let Some(cluster) = engine.cluster.get() else {
        return Ok(
            Json(json!({ "doc": doc.as_str(), "owner": null, "local": true })).into_response(),
        );
    };
    let view = cluster.view();
    let owner = match cluster.owner_in(&view, doc.as_str()) {
        Owner::Local => cluster.me().to_owned(),
        Owner::Remote { node } => node,
    };
    let http_url = cluster
        .members()
        .into_iter()
        .find(|m| m.id == owner)
        .map(|m| m.info.http_url);
    Ok(Json(json!({
        "doc": doc.as_str(),
        "owner": owner,
        "local": owner == cluster.me(),
        "http_url": http_url,
        "epoch": view.epoch,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct Registration {
    appid: String,
    secret: String,
    #[serde(rename = "auth-token")]
    auth_token: Option<String>,
}

async fn register_app(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Result<Json<Registration>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(registration) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(format!(
            "a registration body holds at most {REGISTRATION_BODY_BYTES} bytes"
        )),
        _ => ApiError::BadRequest {
            kind: "invalid-request",
            message: format!(
                "expected JSON {{appid, secret, auth-token}}: {}",
                e.body_text()
            ),
        },
    })?;
    let caller = token(None, &headers);
    match engine
        .gate
        .register(
            &registration.appid,
            &registration.secret,
            registration.auth_token.as_deref(),
            caller,
        )
        .await
    {
        Ok(()) => Ok(Json(json!({ "appid": registration.appid })).into_response()),
        Err(RegisterError::Invalid(message)) => Err(ApiError::BadRequest {
            kind: "invalid-request",
            message: message.into(),
        }),
        Err(RegisterError::Unauthorized) => {
            let message = RegisterError::Unauthorized.to_string();
            Ok((
                StatusCode::UNAUTHORIZED,
                Json(json!({ "type": "auth-token/invalid", "message": message })),
            )
                .into_response())
        }
        Err(RegisterError::Storage(error)) => {
            tracing::error!(%error, "app registration failed: storage");
            Err(ApiError::Unavailable("storage unavailable"))
        }
    }
}

#[derive(Deserialize, Default)]
struct TokenQuery {
    token: Option<String>,
}

async fn websocket(
    State(engine): State<Arc<Engine>>,
    Path(doc): Path<String>,
    Query(params): Query<SessionParams>,
    caller: Result<Caller, ApiError>,
    ws: Result<Upgrade, UpgradeRejection>,
) -> Result<Response, ApiError> {
    // The id is checked first, so a bad one gets the same answer with or without an upgrade.
    let doc = parse_doc(&doc)?;
    if !engine.is_ready() {
        return Err(ApiError::Unavailable("not ready"));
    }
    let admitted = match caller {
        Ok(Caller(principal)) => match principal.access_to(&doc) {
            Some(access) => Ok((principal, access)),
            None => Err(AuthError::Forbidden),
        },
        Err(ApiError::Auth(refusal)) => Err(refusal),
        Err(other) => return Err(other),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return match admitted {
                Ok(_) => Ok(rejection.into_response()),
                Err(refusal) => Err(ApiError::Auth(refusal)),
            }
        }
    };
    let (principal, access) = match admitted {
        Ok(admitted) => admitted,
        // Browsers see a refused upgrade only as a failed connection (1006), so clients that
        // speak our extensions are refused in band: accepted, then closed with 4401/4403 and
        // the refusal's type as the reason. Others get the HTTP status and a JSON body.
        Err(refusal) if params.wants_persisted_ack() => {
            let code = if refusal.is_forbidden() {
                CloseCode::FORBIDDEN
            } else {
                CloseCode::UNAUTHENTICATED
            };
            tracing::debug!(%refusal, "refusing a WebSocket in band");
            return Ok(
                ws.accept(WebSocketConfig::default(), move |socket| async move {
                    session::refuse(engine, socket, code, refusal.kind()).await
                }),
            );
        }
        Err(refusal) => return Err(ApiError::Auth(refusal)),
    };
    let max = engine.config.limits.max_connections;
    let Some(guard) = session::SessionGuard::try_new(engine.connections.clone(), max) else {
        tracing::warn!(
            limit = max,
            "connection limit (synchrony.max.connections) reached; refusing an editor"
        );
        if params.wants_persisted_ack() {
            return Ok(
                ws.accept(WebSocketConfig::default(), move |socket| async move {
                    session::refuse(engine, socket, CloseCode::TRY_AGAIN_LATER, "overloaded").await
                }),
            );
        }
        return Err(ApiError::Overloaded);
    };
    let limit = engine.config.limits.max_frame_bytes;
    let tracker = engine.tracker.clone();
    let config = WebSocketConfig::default()
        .max_frame_size(Some(limit))
        .max_message_size(Some(limit))
        // tungstenite's defaults reserve 128 KiB for reading per socket: 1.25 GiB for 10,000
        // idle editors. The read buffer grows for large frames; the write buffer holds a batch
        // of queued frames until the session flushes it (see `session::WRITE_BATCH_BYTES`).
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(session::WRITE_BATCH_BYTES);
    Ok(ws.accept(config, move |socket| {
        tracker.track_future(session::run(
            engine, socket, doc, params, principal, access, guard,
        ))
    }))
}

#[derive(Deserialize)]
pub(crate) struct ReadQuery {
    format: Option<String>,
    name: Option<String>,
}

async fn read_doc(
    State(engine): State<Arc<Engine>>,
    Path(doc): Path<String>,
    Query(query): Query<ReadQuery>,
    Caller(principal): Caller,
) -> Result<Response, ApiError> {
    if let (base, Some(at)) = crate::versions::split(&doc) {
        return crate::versions::get(&engine, base, at, &query, &principal).await;
    }
    let doc = parse_doc(&doc)?;
    require(&principal, &doc, Access::Read)?;
    let (format, text_root) = read_format(&query)?;
    let read = engine
        .docs
        .request(&doc, |reply| DocCommand::Read {
            text_root: text_root.clone(),
            xml: format == "xml",
            reply,
        })
        .await?;
    let head = head(&engine, &doc).await?;
    render(&doc, format, read, head)
}

/// The format a read asks for (`json` by default) and the root it names, if the format needs one.
pub(crate) fn read_format(query: &ReadQuery) -> Result<(&str, Option<String>), ApiError> {
    let format = query.format.as_deref().unwrap_or("json");
    let text_root = match format {
        "json" | "update" => None,
        "text" | "xml" => Some(query.name.clone().ok_or_else(|| ApiError::BadRequest {
            kind: "invalid-request",
            message: format!("format={format} needs name=<root>"),
        })?),
        other => {
            return Err(ApiError::BadRequest {
                kind: "invalid-request",
                message: format!("format {other:?} is not json, update, text or xml"),
            })
        }
    };
    Ok((format, text_root))
}

/// A read's answer in `format`.
pub(crate) fn render(
    doc: &DocId,
    format: &str,
    read: crate::doc::DocRead,
    head: u64,
) -> Result<Response, ApiError> {
    let head_header = [("x-synchrony-head", HeaderValue::from(head))];
    Ok(match (format, read.text) {
        ("update", _) => (
            head_header,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            read.update,
        )
            .into_response(),
        (_, Some(Err(message))) => {
            return Err(ApiError::BadRequest {
                kind: "wrong-root-type",
                message,
            })
        }
        ("text", Some(Ok(text))) => (
            head_header,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            text,
        )
            .into_response(),
        ("xml", Some(Ok(xml))) => (
            head_header,
            [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
            xml,
        )
            .into_response(),
        _ => Json(json!({
            "id": doc.as_str(),
            "head": head,
            "state": read.json,
            "sessions": read.sessions,
        }))
        .into_response(),
    })
}

pub(crate) async fn head(engine: &Engine, doc: &DocId) -> Result<u64, ApiError> {
    let read = tokio::time::timeout(crate::doc::STORAGE_DEADLINE, engine.store.head(doc));
    match read.await {
        Ok(Ok(head)) => Ok(head),
        Ok(Err(error)) => {
            tracing::error!(%error, "reading the head failed");
            Err(ApiError::Unavailable("storage unavailable"))
        }
        Err(_) => Err(ApiError::Unavailable("storage unavailable")),
    }
}

#[derive(Deserialize)]
struct WriteQuery {
    #[serde(default)]
    reset: bool,
    name: Option<String>,
    /// `text` (default) or `xml`, for a reset.
    format: Option<String>,
    /// With format=xml: element names that are marks around text, comma-separated.
    marks: Option<String>,
}

async fn write_doc(
    State(engine): State<Arc<Engine>>,
    Path(doc): Path<String>,
    Query(query): Query<WriteQuery>,
    Caller(principal): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if crate::versions::split(&doc).1.is_some() {
        return Err(ApiError::Status {
            status: StatusCode::METHOD_NOT_ALLOWED,
            kind: "method-not-allowed",
            message: "versions are marked and restored with POST".into(),
        });
    }
    let doc = parse_doc(&doc)?;
    require(&principal, &doc, Access::Full)?;
    // A change that cannot be made durable now is refused at once, not applied and left
    // waiting (editors' own edits are still held in memory up to the commit queue's bound).
    if let Some(problem) = engine.storage_problem() {
        tracing::warn!(%problem, "REST write refused: storage unavailable");
        return Err(ApiError::Unavailable("storage unavailable"));
    }
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(e.body_text()),
        _ => ApiError::BadRequest {
            kind: "invalid-request",
            message: e.body_text(),
        },
    })?;
    let result = if query.reset {
        let root = query.name.clone().ok_or(ApiError::BadRequest {
            kind: "invalid-request",
            message: "reset=true needs name=<root>".into(),
        })?;
        let text = String::from_utf8(body.to_vec()).map_err(|_| ApiError::BadRequest {
            kind: "invalid-request",
            message: "a reset body must be UTF-8 text".into(),
        })?;
        let content = match query.format.as_deref().unwrap_or("text") {
            "text" => ResetContent::Text(text),
            "xml" => {
                let marks = query
                    .marks
                    .as_deref()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect();
                let depth = engine.config.limits.max_nesting_depth;
                let bytes = text.len();
                // Up to max-doc-bytes of XML: parsed off the threads that serve connections, a
                // few at a time (the rest wait their turn, for a while, then get 503).
                let parses =
                    XML_PARSES.get_or_init(|| tokio::sync::Semaphore::new(XML_PARSES_AT_ONCE));
                let Ok(Ok(permit)) = tokio::time::timeout(XML_PARSE_WAIT, parses.acquire()).await
                else {
                    return Err(ApiError::Unavailable(
                        "too many rich-text resets at once; try again",
                    ));
                };
                let parsed = tokio::task::spawn_blocking(move || {
                    crate::roots::parse_xml(&text, &marks, depth)
                })
                .await
                .unwrap_or_else(|_| Err("the XML could not be parsed".into()));
                drop(permit);
                let nodes = parsed.map_err(|message| ApiError::BadRequest {
                    kind: "invalid-xml",
                    message,
                })?;
                ResetContent::Xml { nodes, bytes }
            }
            other => {
                return Err(ApiError::BadRequest {
                    kind: "invalid-request",
                    message: format!("a reset's format {other:?} is not text or xml"),
                })
            }
        };
        engine
            .docs
            .request(&doc, |reply| DocCommand::ResetText {
                root: root.clone(),
                content: content.clone(),
                reply,
            })
            .await?
    } else {
        if body.is_empty() {
            return Err(ApiError::BadRequest {
                kind: "invalid-update",
                message: "the body must be a Yjs update (v1 encoding)".into(),
            });
        }
        engine
            .docs
            .request(&doc, |reply| DocCommand::Apply {
                update: body.to_vec(),
                reply,
            })
            .await?
    };
    result?;
    let head = head(&engine, &doc).await?;
    Ok(Json(json!({ "id": doc.as_str(), "head": head })).into_response())
}

/// `POST {ctx}/v1/data/{doc}/versions[/{id}/restore]` (see [`crate::versions`]).
async fn post_doc(
    State(engine): State<Arc<Engine>>,
    Path(doc): Path<String>,
    Caller(principal): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (base, Some(at)) = crate::versions::split(&doc) else {
        return Err(ApiError::Status {
            status: StatusCode::METHOD_NOT_ALLOWED,
            kind: "method-not-allowed",
            message: "a document is written with PUT; POST marks (…/versions) or restores (…/versions/{id}/restore) a version".into(),
        });
    };
    let body = body.map_err(|e| ApiError::TooLarge(e.body_text()))?;
    crate::versions::post(&engine, base, at, &principal, &body).await
}

async fn delete_doc(
    State(engine): State<Arc<Engine>>,
    Path(doc): Path<String>,
    Caller(principal): Caller,
) -> Result<Response, ApiError> {
    if let (base, Some(at)) = crate::versions::split(&doc) {
        return crate::versions::delete(&engine, base, at, &principal).await;
    }
    let doc = parse_doc(&doc)?;
    if !principal.is_admin() {
        return Err(ApiError::Auth(AuthError::Forbidden));
    }
    engine
        .docs
        .request(&doc, |reply| DocCommand::Delete {
            versions: true,
            reason: "document deleted",
            reply,
        })
        .await??;
    Ok(Json(json!({ "id": doc.as_str(), "deleted": true })).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    after: String,
    limit: Option<u32>,
}

async fn list_docs(
    State(engine): State<Arc<Engine>>,
    Query(query): Query<ListQuery>,
    Caller(principal): Caller,
) -> Result<Response, ApiError> {
    if !principal.is_admin() {
        return Err(ApiError::Auth(AuthError::Forbidden));
    }
    if query.prefix.len() > DocId::MAX_LEN
        || !query
            .prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~:@+=/".contains(&b))
    {
        return Err(ApiError::BadRequest {
            kind: "invalid-request",
            message: "prefix may hold only document-id characters".into(),
        });
    }
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let documents = engine
        .store
        .list_docs(&query.prefix, &query.after, limit)
        .await
        .map_err(|error| {
            tracing::error!(%error, "listing documents failed");
            ApiError::Unavailable("storage unavailable")
        })?;
    let next = (documents.len() == limit as usize)
        .then(|| documents.last().map(|d| d.id.clone()))
        .flatten();
    Ok(Json(json!({ "documents": documents, "next": next })).into_response())
}
