//! The REST document API in a cluster: a request for a document another node owns is carried
//! over the peer link to the owner, which runs it through its own router (checking the token,
//! the origin and everything else itself) and sends the response back.
//!
//! A forwarded request carries a [`Forwarded`] request extension (set only here, never from
//! the wire: a client cannot claim it); the owner serves such a request locally whatever its
//! own view says, so two nodes whose views differ for a moment cannot bounce a request between
//! them. The [`ROUTED_HEADER`] it also carries names the forwarding node, for logs.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{OriginalUri, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use synchrony_protocol::peer::{HttpExchange, PeerMessage};
use tower::ServiceExt;

use super::link::Link;
use super::Cluster;

/// Names the node that forwarded a request (informational; [`Forwarded`] decides).
pub const ROUTED_HEADER: &str = "x-synchrony-routed";

/// Marks a request that came over a peer link from the node named.
#[derive(Debug, Clone)]
pub struct Forwarded(pub String);

/// How long a forwarding node waits for the owner's answer: the owner's own request deadline
/// plus a margin for the link.
const FORWARD_DEADLINE: Duration = Duration::from_secs(15);

/// Headers that describe one hop, not the request.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "host" | "connection" | "content-length" | "transfer-encoding" | "keep-alive" | "upgrade"
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the document's owner is unreachable; try again")]
    Unreachable,
    #[error("the document's owner did not answer in time; try again")]
    Timeout,
    #[error("the request body is over synchrony.max.doc.bytes")]
    TooLarge,
}

/// Sends `request` to `node`, the owner, and returns its response.
pub async fn forward(
    cluster: &Arc<Cluster>,
    node: &str,
    request: Request,
) -> Result<Response, ForwardError> {
    let link = cluster.links.get(node).ok_or(ForwardError::Unreachable)?;
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, cluster.limits.max_doc_bytes)
        .await
        .map_err(|_| ForwardError::TooLarge)?;
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or_else(|| parts.uri.clone(), |o| o.0.clone());
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| !hop_by_hop(name.as_str()))
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    let exchange = HttpExchange {
        head: format!("{} {uri}", parts.method),
        headers,
        body: body.to_vec(),
    };
    let (id, answer) = link.expect_response();
    if !link.send(PeerMessage::HttpRequest { id, exchange }).await {
        link.forget_request(id);
        return Err(ForwardError::Unreachable);
    }
    let exchange = match tokio::time::timeout(FORWARD_DEADLINE, answer).await {
        Ok(Ok(exchange)) => exchange,
        Ok(Err(_)) => return Err(ForwardError::Unreachable),
        Err(_) => {
            link.forget_request(id);
            return Err(ForwardError::Timeout);
        }
    };
    let status = exchange
        .head
        .parse::<u16>()
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = Response::new(Body::from(exchange.body));
    *response.status_mut() = status;
    for (name, value) in exchange.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    Ok(response)
}

/// Sends a copy of a request to every other live member (each runs it as a forwarded request)
/// and waits for their answers: each member's response body, or why it did not succeed.
pub async fn to_every_member(
    cluster: &Arc<Cluster>,
    method: &Method,
    uri: &Uri,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Vec<(String, Result<Vec<u8>, String>)> {
    let view = cluster.view();
    let others = view
        .live
        .iter()
        .filter(|node| node.as_str() != cluster.me());
    let calls = others.map(|node| async move {
        let mut request = Request::new(Body::from(body.to_vec()));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers.clone();
        let outcome = match forward(cluster, node, request).await {
            Ok(response) if response.status().is_success() => {
                axum::body::to_bytes(response.into_body(), max_response(cluster))
                    .await
                    .map(|b| b.to_vec())
                    .map_err(|e| e.to_string())
            }
            Ok(response) => Err(format!("answered {}", response.status())),
            Err(error) => Err(error.to_string()),
        };
        (node.clone(), outcome)
    });
    futures_util::future::join_all(calls).await
}

/// The owner's side: runs a forwarded request through this node's router and answers.
pub(crate) async fn answer(
    cluster: Arc<Cluster>,
    link: Arc<Link>,
    id: u64,
    exchange: HttpExchange,
) {
    let response = match (cluster.router.get(), build(exchange, &link.node)) {
        (Some(router), Some(request)) => match router.clone().oneshot(request).await {
            Ok(response) => collect(response, max_response(&cluster)).await,
            Err(never) => match never {},
        },
        (None, _) => error(StatusCode::SERVICE_UNAVAILABLE, "owner not ready"),
        (_, None) => error(StatusCode::BAD_REQUEST, "malformed forwarded request"),
    };
    link.send(PeerMessage::HttpResponse {
        id,
        exchange: response,
    })
    .await;
}

/// The largest response carried back: what fits in one peer message.
pub(crate) fn max_response(cluster: &Cluster) -> usize {
    super::link::max_message(&cluster.limits) - 64 * 1024
}

fn build(exchange: HttpExchange, from: &str) -> Option<Request> {
    let (method, uri) = exchange.head.split_once(' ')?;
    let mut request = Request::new(Body::from(exchange.body));
    *request.method_mut() = Method::from_bytes(method.as_bytes()).ok()?;
    *request.uri_mut() = uri.parse::<Uri>().ok()?;
    let headers = request.headers_mut();
    for (name, value) in exchange.headers {
        if hop_by_hop(&name) {
            continue;
        }
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_bytes(&value).ok()?,
        );
    }
    headers.insert(ROUTED_HEADER, HeaderValue::from_str(from).ok()?);
    request.extensions_mut().insert(Forwarded(from.to_owned()));
    Some(request)
}

async fn collect(response: Response, limit: usize) -> HttpExchange {
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, limit).await else {
        return error(
            StatusCode::INSUFFICIENT_STORAGE,
            "the response is too large to relay between nodes; ask the owner directly",
        );
    };
    HttpExchange {
        head: parts.status.as_u16().to_string(),
        headers: parts
            .headers
            .iter()
            .filter(|(name, _)| !hop_by_hop(name.as_str()))
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect(),
        body: body.to_vec(),
    }
}

fn error(status: StatusCode, message: &str) -> HttpExchange {
    HttpExchange {
        head: status.as_u16().to_string(),
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: serde_json::json!({ "error": "cluster", "message": message })
            .to_string()
            .into_bytes(),
    }
}
