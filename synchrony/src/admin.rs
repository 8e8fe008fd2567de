//! Maintenance endpoints for hosts and operators, all behind an admin token: document locks
//! (`{ctx}/v1/hub-lock-state`, see [`crate::locks`]) and history eviction
//! (`{ctx}/v1/history/…`, see [`crate::eviction`]).
//!
//! In a cluster, a lock taken or released through one node is recorded in storage and then sent
//! to every other live member, which applies it to the documents it owns; the caller is answered
//! once they all have (or told which did not).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{OriginalUri, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use synchrony_protocol::DocId;

use crate::auth::AuthError;
use crate::http::{ApiError, Caller};
use crate::locks::{Held, Scope};
use crate::Engine;

#[derive(Deserialize)]
pub struct LockQuery {
    #[serde(rename = "lock-id")]
    lock_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockBody {
    #[serde(rename = "point-list")]
    point_list: Option<Vec<String>>,
    #[serde(rename = "confluence-all", alias = "app-wide")]
    all: Option<bool>,
    #[serde(rename = "timeout-ms")]
    timeout_ms: Option<u64>,
}

fn bad(kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        kind,
        message: message.into(),
    }
}

fn lock_id(query: &LockQuery) -> Result<String, ApiError> {
    let id = query
        .lock_id
        .as_deref()
        .ok_or_else(|| bad("invalid-lock-id", "lock-id is required (a UUID)"))?;
    uuid::Uuid::parse_str(id)
        .map(|u| u.hyphenated().to_string())
        .map_err(|e| bad("invalid-lock-id", format!("lock-id must be a UUID: {e}")))
}

fn parse_lock(body: &[u8]) -> Result<(Scope, u64), ApiError> {
    let body: LockBody = serde_json::from_slice(body).map_err(|e| {
        bad(
            "invalid-lock-request",
            format!("expected {{\"point-list\":[ids]}} or {{\"confluence-all\":true}} with an optional \"timeout-ms\": {e}"),
        )
    })?;
    let timeout = body.timeout_ms.unwrap_or(crate::locks::DEFAULT_TIMEOUT_MS);
    if timeout == 0 || timeout > crate::locks::MAX_TIMEOUT_MS {
        return Err(bad(
            "invalid-lock-request",
            format!(
                "timeout-ms must be between 1 and {} (24 hours)",
                crate::locks::MAX_TIMEOUT_MS
            ),
        ));
    }
    let scope = match (body.point_list, body.all.unwrap_or(false)) {
        (Some(_), true) => {
            return Err(bad(
                "invalid-lock-request",
                "give point-list or confluence-all, not both",
            ))
        }
        (None, true) => Scope::All,
        (Some(points), false) if !points.is_empty() => {
            if points.len() > crate::locks::MAX_POINTS {
                return Err(bad(
                    "invalid-lock-request",
                    format!("at most {} documents per lock", crate::locks::MAX_POINTS),
                ));
            }
            let mut docs = BTreeSet::new();
            for point in points {
                let doc = DocId::parse(&point).map_err(|e| {
                    bad(
                        "invalid-document-id",
                        format!("point-list entry {point:?}: {e}"),
                    )
                })?;
                docs.insert(doc.as_str().to_owned());
            }
            Scope::Docs(docs)
        }
        _ => {
            return Err(bad(
                "invalid-lock-request",
                "name the documents in a non-empty point-list, or set confluence-all to true",
            ))
        }
    };
    Ok((scope, timeout))
}

fn describe(id: &str, held: &Held) -> serde_json::Value {
    match &held.scope {
        Scope::All => json!({ "lock-id": id, "expires-at": held.expires_at, "app-wide": true }),
        Scope::Docs(docs) => {
            json!({ "lock-id": id, "expires-at": held.expires_at, "documents": docs })
        }
    }
}

/// Whether the request came over a peer link (then it is applied here only).
fn forwarded(headers: &axum::http::Extensions) -> bool {
    headers.get::<crate::cluster::rest::Forwarded>().is_some()
}

/// After a change recorded here: tells the other members, and fails if some did not confirm.
async fn tell_members(
    engine: &Arc<Engine>,
    method: Method,
    uri: &OriginalUri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), ApiError> {
    let Some(cluster) = engine.cluster.get() else {
        return Ok(());
    };
    let missing: Vec<(String, String)> =
        crate::cluster::rest::to_every_member(cluster, &method, &uri.0, headers, body)
            .await
            .into_iter()
            .filter_map(|(node, answer)| answer.err().map(|why| (node, why)))
            .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let nodes: Vec<String> = missing
        .iter()
        .map(|(node, why)| format!("{node} ({why})"))
        .collect();
    tracing::warn!(?nodes, "a lock change was not confirmed by every member");
    Err(ApiError::Status {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "lock-not-confirmed",
        message: format!(
            "recorded, but not confirmed by {}; they apply it within {:?} of reading storage",
            nodes.join(", "),
            crate::locks::REFRESH
        ),
    })
}

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller.0.is_admin() {
        true => Ok(()),
        false => Err(ApiError::Auth(AuthError::Forbidden)),
    }
}

fn storage(error: crate::store::StoreError) -> ApiError {
    tracing::error!(%error, "recording a lock failed");
    ApiError::Unavailable("storage unavailable")
}

/// `POST {ctx}/v1/hub-lock-state?lock-id=`: takes or renews a lock.
pub(crate) async fn lock(
    State(engine): State<Arc<Engine>>,
    Query(query): Query<LockQuery>,
    caller: Caller,
    uri: OriginalUri,
    request: axum::http::request::Parts,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let id = lock_id(&query)?;
    let (scope, timeout) = parse_lock(&body)?;
    let expires_at = crate::store::now_millis().saturating_add(timeout as i64);
    let held = Held { scope, expires_at };
    if !forwarded(&request.extensions) {
        let rows: Vec<String> = match &held.scope {
            Scope::All => vec![crate::locks::ALL.to_owned()],
            Scope::Docs(docs) => docs.iter().cloned().collect(),
        };
        engine
            .store
            .put_lock(&id, &rows, expires_at)
            .await
            .map_err(storage)?;
    }
    engine.docs.deps().locks.insert(&id, held.clone());
    tracing::info!(lock_id = %id, timeout_ms = timeout, "lock taken");
    if !forwarded(&request.extensions) {
        tell_members(&engine, Method::POST, &uri, &request.headers, &body).await?;
    }
    Ok(Json(describe(&id, &held)).into_response())
}

/// `DELETE {ctx}/v1/hub-lock-state?lock-id=`: releases a lock (answered the same whether it
/// was held or had already ended, so that a retried release succeeds).
pub(crate) async fn unlock(
    State(engine): State<Arc<Engine>>,
    Query(query): Query<LockQuery>,
    caller: Caller,
    uri: OriginalUri,
    request: axum::http::request::Parts,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let id = lock_id(&query)?;
    let mut released = false;
    if !forwarded(&request.extensions) {
        released = engine.store.delete_lock(&id).await.map_err(storage)?;
    }
    released |= engine.docs.deps().locks.remove(&id);
    tracing::info!(lock_id = %id, released, "lock released");
    if !forwarded(&request.extensions) {
        tell_members(&engine, Method::DELETE, &uri, &request.headers, &[]).await?;
    }
    Ok(Json(json!({ "lock-id": id, "released": released })).into_response())
}

/// `GET {ctx}/v1/hub-lock-state`: the locks this node enforces.
pub(crate) async fn locks(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let locks: Vec<_> = engine
        .docs
        .deps()
        .locks
        .snapshot()
        .iter()
        .map(|(id, held)| describe(id, held))
        .collect();
    Ok(Json(json!({ "locks": locks })).into_response())
}

#[derive(Deserialize)]
pub(crate) struct EvictQuery {
    #[serde(rename = "threshold-hours")]
    threshold_hours: Option<f64>,
    delete: Option<bool>,
    limit: Option<u32>,
}

/// `POST {ctx}/v1/history/evict/{soft|hard}`: runs an eviction job now, on every node (each
/// evicts what it owns); the answer sums what they did.
pub(crate) async fn evict(
    State(engine): State<Arc<Engine>>,
    axum::extract::Path(job): axum::extract::Path<String>,
    Query(query): Query<EvictQuery>,
    caller: Caller,
    uri: OriginalUri,
    request: axum::http::request::Parts,
) -> Result<Response, ApiError> {
    use crate::eviction::{Job, Report, Run};
    require_admin(&caller)?;
    let job = match job.as_str() {
        "soft" => Job::Soft,
        "hard" => Job::Hard,
        other => {
            return Err(ApiError::NotFound {
                kind: "no-such-job",
                message: format!("{other:?} is not an eviction job: soft or hard"),
            })
        }
    };
    let mut run = Run::configured(&engine.config.eviction, job);
    if let Some(hours) = query.threshold_hours {
        if !hours.is_finite() || !(0.0..=1e6).contains(&hours) {
            return Err(bad(
                "invalid-request",
                "threshold-hours must be a number of hours from 0 to 1000000",
            ));
        }
        run.threshold = std::time::Duration::from_secs_f64(hours * 3600.0);
    }
    if let Some(delete) = query.delete {
        run.delete = delete;
    }
    if let Some(limit) = query.limit {
        if limit == 0 {
            return Err(bad("invalid-request", "limit must be at least 1"));
        }
        run.limit = limit;
    }
    let mut report = crate::eviction::run(&engine, run).await.map_err(|error| {
        tracing::error!(%error, "eviction failed");
        ApiError::Unavailable("storage unavailable")
    })?;
    let mut nodes = 1;
    let mut missing = Vec::new();
    if let (Some(cluster), false) = (engine.cluster.get(), forwarded(&request.extensions)) {
        for (node, answer) in crate::cluster::rest::to_every_member(
            cluster,
            &Method::POST,
            &uri.0,
            &request.headers,
            &[],
        )
        .await
        {
            match answer.map(|body| serde_json::from_slice::<Report>(&body)) {
                Ok(Ok(theirs)) => {
                    report.add(&theirs);
                    nodes += 1;
                }
                Ok(Err(error)) => missing.push(format!("{node} ({error})")),
                Err(why) => missing.push(format!("{node} ({why})")),
            }
        }
    }
    if forwarded(&request.extensions) {
        return Ok(Json(report).into_response());
    }
    Ok(
        Json(json!({ "job": job, "nodes": nodes, "unreached": missing, "report": report }))
            .into_response(),
    )
}

#[derive(Deserialize)]
pub(crate) struct CountQuery {
    doc: Option<String>,
}

/// `GET {ctx}/v1/history/count?doc=`: a document's stored rows.
pub(crate) async fn count(
    State(engine): State<Arc<Engine>>,
    Query(query): Query<CountQuery>,
    caller: Caller,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let doc = query
        .doc
        .as_deref()
        .ok_or_else(|| bad("invalid-request", "doc=<document id> is required"))?;
    let doc = DocId::parse(doc).map_err(|e| bad("invalid-document-id", e.to_string()))?;
    let counts = engine.store.history_counts(&doc).await.map_err(|error| {
        tracing::error!(%error, "counting a document's rows failed");
        ApiError::Unavailable("storage unavailable")
    })?;
    Ok(Json(json!({
        "id": doc.as_str(),
        "updates": counts.0,
        "snapshots": counts.1,
        "versions": counts.2,
        "version_bytes": counts.3,
        "version_bytes_max": engine.config.limits.versions_max_bytes,
    }))
    .into_response())
}
