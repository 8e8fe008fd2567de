//! The HTTP surface: heartbeat, health, and the WebSocket endpoint, under the context path.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use synchrony_protocol::DocId;

use crate::placement::Owner;
use crate::session::{self, SessionParams};
use crate::Engine;

/// Errors a client sees: a status and a `{type, message}` body. Details of infrastructure
/// failures go to the log, never to the client.
#[derive(Debug)]
pub enum ApiError {
    BadRequest { kind: &'static str, message: String },
    Unavailable(&'static str),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, message) = match self {
            ApiError::BadRequest { kind, message } => (StatusCode::BAD_REQUEST, kind, message),
            ApiError::Unavailable(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                message.to_owned(),
            ),
        };
        (status, Json(json!({ "type": kind, "message": message }))).into_response()
    }
}

/// Builds the router; tests reuse it.
pub fn router(engine: Arc<Engine>, context_path: &str) -> Router {
    let inner = Router::new()
        .route("/heartbeat", get(heartbeat))
        .route("/v1/health", get(health))
        .route("/v1/ws/{*doc}", get(websocket))
        .with_state(engine);
    if context_path.is_empty() {
        inner
    } else {
        Router::new().nest(context_path, inner)
    }
}

async fn heartbeat(State(engine): State<Arc<Engine>>) -> Response {
    if engine.can_serve() {
        (StatusCode::OK, "OK").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

async fn health(State(engine): State<Arc<Engine>>) -> Response {
    let storage =
        tokio::time::timeout(std::time::Duration::from_secs(2), engine.store.ping()).await;
    let storage_ok = matches!(storage, Ok(Ok(())));
    if let Ok(Err(error)) = &storage {
        tracing::warn!(%error, "health check: storage unreachable");
    }
    let healthy = storage_ok && engine.is_ready();
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": engine.started.elapsed().as_secs(),
        "ready": engine.is_ready(),
        "storage": {
            "backend": engine.store.backend().name(),
            "status": if storage_ok { "ok" } else { "unreachable" },
        },
        "documents_loaded": engine.docs.loaded_count(),
        "document_loads_total": engine.docs.load_count(),
        "connections": engine.connections.load(Ordering::Relaxed),
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn websocket(
    State(engine): State<Arc<Engine>>,
    Path(doc): Path<String>,
    Query(params): Query<SessionParams>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // The id is checked first, so a bad one gets the same answer with or without an upgrade.
    let doc = DocId::parse(&doc).map_err(|e| ApiError::BadRequest {
        kind: "invalid-document-id",
        message: e.to_string(),
    })?;
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    if !engine.is_ready() {
        return Err(ApiError::Unavailable("not ready"));
    }
    match engine.placement.owner(&doc) {
        Owner::Local => {}
        Owner::Remote { .. } => {
            return Err(ApiError::Unavailable("document is owned by another node"))
        }
    }
    let limit = engine.config.limits.max_frame_bytes;
    let tracker = engine.tracker.clone();
    Ok(ws
        .max_frame_size(limit)
        .max_message_size(limit)
        .on_upgrade(move |socket| tracker.track_future(session::run(engine, socket, doc, params)))
        .into_response())
}
