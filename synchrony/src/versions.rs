//! Named versions: a host marks a document's current state as a version, lists the versions,
//! reads one in the formats of `GET {ctx}/v1/data/{doc}`, and restores one as an ordinary change
//! that every connected editor sees.
//!
//! - `POST {ctx}/v1/data/{doc}/versions` with `{"label": "…", "user": "…"}` (full access;
//!   `user` defaults to the token's subject) → 201 with the version's id;
//! - `GET {ctx}/v1/data/{doc}/versions` (read access) → the versions, oldest first;
//! - `GET {ctx}/v1/data/{doc}/versions/{id}?format=json|update|text|xml&name=` (read access);
//! - `POST {ctx}/v1/data/{doc}/versions/{id}/restore` (full access) → the document holds the
//!   version's content again, in one transaction broadcast like any edit;
//! - `DELETE {ctx}/v1/data/{doc}/versions/{id}` (admin).
//!
//! A version is a row of `doc_versions` holding the document's whole state as a Yjs update, as
//! compacted as the live document (deleted content is not kept): it costs about one copy of the
//! document per version, and compaction and eviction, which touch only `doc_updates` and
//! `doc_snapshots`, never remove it. Deleting the document removes its versions. Because a
//! document id may contain `/`, a REST path whose last segments are `versions`, `versions/{n}`
//! or `versions/{n}/restore` always means a version of the document before them.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use synchrony_protocol::DocId;

use crate::auth::{Access, AuthError, Principal};
use crate::doc::DocCommand;
use crate::http::{parse_doc, require, ApiError, ReadQuery};
use crate::Engine;

/// How long a version read waits for a decoding slot.
const DECODE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Version reads decoding at once: one per core.
fn decode_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    })
}

/// Versions one document may have.
pub const MAX_VERSIONS: usize = 1000;
/// Longest label and user name, in characters.
const MAX_LABEL_CHARS: usize = 200;

/// What a REST path names under a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// `…/versions`
    List,
    /// `…/versions/{id}`
    One(i64),
    /// `…/versions/{id}/restore`
    Restore(i64),
}

/// Splits a REST path into the document and the version part, if any.
pub fn split(path: &str) -> (&str, Option<At>) {
    if let Some(doc) = path.strip_suffix("/versions") {
        return (doc, Some(At::List));
    }
    let (rest, restore) = match path.strip_suffix("/restore") {
        Some(rest) => (rest, true),
        None => (path, false),
    };
    if let Some((before, id)) = rest.rsplit_once('/') {
        if let (Some(doc), Ok(id)) = (before.strip_suffix("/versions"), id.parse::<i64>()) {
            if id > 0 {
                return (
                    doc,
                    Some(if restore {
                        At::Restore(id)
                    } else {
                        At::One(id)
                    }),
                );
            }
        }
    }
    (path, None)
}

fn storage(error: crate::store::StoreError) -> ApiError {
    tracing::error!(%error, "a version operation failed in storage");
    ApiError::Unavailable("storage unavailable")
}

fn no_such(doc: &DocId, id: i64) -> ApiError {
    ApiError::NotFound {
        kind: "no-such-version",
        message: format!("document {doc} has no version {id}"),
    }
}

async fn stored(engine: &Engine, doc: &DocId, id: i64) -> Result<Vec<u8>, ApiError> {
    engine
        .store
        .version(doc, id)
        .await
        .map_err(storage)?
        .ok_or_else(|| no_such(doc, id))
}

/// `GET …/versions` and `GET …/versions/{id}`.
pub(crate) async fn get(
    engine: &Arc<Engine>,
    doc: &str,
    at: At,
    query: &ReadQuery,
    principal: &Principal,
) -> Result<Response, ApiError> {
    let doc = parse_doc(doc)?;
    require(principal, &doc, Access::Read)?;
    match at {
        At::List => {
            let versions = engine.store.versions(&doc).await.map_err(storage)?;
            Ok(Json(json!({ "id": doc.as_str(), "versions": versions })).into_response())
        }
        At::One(id) => {
            let (format, text_root) = crate::http::read_format(query)?;
            let state = stored(engine, &doc, id).await?;
            if format == "update" {
                // The stored bytes are the answer: nothing to decode.
                let mut response = (
                    [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                    state,
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert("x-synchrony-version", HeaderValue::from(id));
                return Ok(response);
            }
            // Decoding holds a copy of the document in memory: a few at a time.
            let _slot = tokio::time::timeout(DECODE_WAIT, decode_slots().acquire())
                .await
                .map_err(|_| ApiError::Unavailable("too many versions being read; try again"))?
                .map_err(|_| ApiError::Unavailable("shutting down"))?;
            let xml = format == "xml";
            // Decoding a large state is CPU work: off the connection threads.
            let read = tokio::task::spawn_blocking(move || {
                let ydoc = yrs::Doc::new();
                let update = <yrs::Update as yrs::updates::decoder::Decode>::decode_v1(&state)
                    .map_err(|e| e.to_string())?;
                yrs::Transact::transact_mut(&ydoc)
                    .apply_update(update)
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(crate::doc::read_state(&ydoc, text_root.as_deref(), xml))
            })
            .await
            .map_err(|_| ApiError::Unavailable("reading the version failed"))?
            .map_err(|error| {
                tracing::error!(%error, %doc, id, "a stored version is unreadable");
                ApiError::Unavailable("the stored version is unreadable")
            })?;
            let mut response = crate::http::render(&doc, format, read, 0)?;
            response
                .headers_mut()
                .insert("x-synchrony-version", HeaderValue::from(id));
            Ok(response)
        }
        At::Restore(_) => Err(ApiError::Status {
            status: StatusCode::METHOD_NOT_ALLOWED,
            kind: "method-not-allowed",
            message: "restore a version with POST".into(),
        }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVersion {
    label: String,
    user: Option<String>,
}

/// `POST …/versions` (mark) and `POST …/versions/{id}/restore`.
pub(crate) async fn post(
    engine: &Arc<Engine>,
    doc: &str,
    at: At,
    principal: &Principal,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let doc = parse_doc(doc)?;
    require(principal, &doc, Access::Full)?;
    match at {
        At::List => {
            let new: NewVersion =
                serde_json::from_slice(body).map_err(|e| ApiError::BadRequest {
                    kind: "invalid-request",
                    message: format!("expected {{\"label\": \"…\", \"user\": \"…\"}}: {e}"),
                })?;
            let label = new.label.trim();
            let user = new
                .user
                .or_else(|| principal.subject.clone())
                .unwrap_or_default();
            if label.is_empty()
                || label.chars().count() > MAX_LABEL_CHARS
                || user.chars().count() > MAX_LABEL_CHARS
            {
                return Err(ApiError::BadRequest {
                    kind: "invalid-request",
                    message: format!(
                        "a label of 1 to {MAX_LABEL_CHARS} characters is required, and a user of at most {MAX_LABEL_CHARS}"
                    ),
                });
            }
            let read = engine
                .docs
                .request(&doc, |reply| DocCommand::Read {
                    text_root: None,
                    xml: false,
                    reply,
                })
                .await?;
            let quota = engine.config.limits.versions_max_bytes;
            let added = engine
                .store
                .add_version(&doc, label, &user, &read.update, MAX_VERSIONS as u64, quota)
                .await
                .map_err(storage)?;
            let Some(info) = added else {
                let kept = engine.store.versions(&doc).await.map_err(storage)?;
                let bytes: i64 = kept.iter().map(|v| v.bytes).sum();
                return Err(if kept.len() >= MAX_VERSIONS {
                    ApiError::Status {
                        status: StatusCode::CONFLICT,
                        kind: "too-many-versions",
                        message: format!(
                            "document {doc} has {MAX_VERSIONS} versions already; delete some first"
                        ),
                    }
                } else {
                    ApiError::Status {
                        status: StatusCode::CONFLICT,
                        kind: "versions-quota",
                        message: format!(
                            "document {doc} keeps {bytes} bytes of versions; this one ({} bytes) would pass \
                             synchrony.versions.max.bytes ({quota}); delete some first",
                            read.update.len()
                        ),
                    }
                });
            };
            tracing::info!(%doc, version = info.id, label, "version marked");
            Ok((
                StatusCode::CREATED,
                Json(json!({ "id": doc.as_str(), "version": info })),
            )
                .into_response())
        }
        At::Restore(id) => {
            let state = stored(engine, &doc, id).await?;
            let bytes = state.len();
            let version = crate::doc::decode_version(state).await?;
            engine
                .docs
                .request(&doc, |reply| DocCommand::Restore {
                    version: version.clone(),
                    bytes,
                    reply,
                })
                .await??;
            tracing::info!(%doc, version = id, "version restored");
            let head = crate::http::head(engine, &doc).await?;
            Ok(Json(json!({ "id": doc.as_str(), "head": head, "restored": id })).into_response())
        }
        At::One(_) => Err(ApiError::Status {
            status: StatusCode::METHOD_NOT_ALLOWED,
            kind: "method-not-allowed",
            message: "POST …/versions to mark one, or …/versions/{id}/restore to restore one"
                .into(),
        }),
    }
}

/// `DELETE …/versions/{id}` (admin).
pub(crate) async fn delete(
    engine: &Arc<Engine>,
    doc: &str,
    at: At,
    principal: &Principal,
) -> Result<Response, ApiError> {
    let doc = parse_doc(doc)?;
    if !principal.is_admin() {
        return Err(ApiError::Auth(AuthError::Forbidden));
    }
    let At::One(id) = at else {
        return Err(ApiError::Status {
            status: StatusCode::METHOD_NOT_ALLOWED,
            kind: "method-not-allowed",
            message: "DELETE …/versions/{id} removes one version".into(),
        });
    };
    if !engine
        .store
        .delete_version(&doc, id)
        .await
        .map_err(storage)?
    {
        return Err(no_such(&doc, id));
    }
    Ok(Json(json!({ "id": doc.as_str(), "version": id, "deleted": true })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_paths_are_told_from_document_ids() {
        assert_eq!(split("app/page/versions"), ("app/page", Some(At::List)));
        assert_eq!(
            split("app/page/versions/12"),
            ("app/page", Some(At::One(12)))
        );
        assert_eq!(
            split("app/page/versions/12/restore"),
            ("app/page", Some(At::Restore(12)))
        );
        assert_eq!(split("app/page"), ("app/page", None));
        assert_eq!(split("app/page/versions/x"), ("app/page/versions/x", None));
        assert_eq!(split("app/page/versions/0"), ("app/page/versions/0", None));
        assert_eq!(split("app/page/restore"), ("app/page/restore", None));
    }
}
