//! The WebSocket upgrade, on tokio-tungstenite directly instead of through axum's wrapper.
//!
//! The session needs tungstenite's raw frames: a large message (a big document's state, sent to
//! every joiner) goes out as fragments that are slices of one shared buffer. Written whole,
//! tungstenite copies each message into the connection's write buffer and keeps that capacity
//! for the connection's life: 200 editors joining a 5 MB page held a gigabyte.

use std::future::Future;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// An accepted WebSocket.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// A valid HTTP/1.1 WebSocket upgrade request, ready to be accepted.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Why a request is not a WebSocket upgrade we can accept.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeRejection {
    #[error("a WebSocket upgrade must be a GET request")]
    MethodNotGet,
    #[error("the Connection header does not contain 'upgrade'")]
    ConnectionHeader,
    #[error("the Upgrade header is not 'websocket'")]
    UpgradeHeader,
    #[error("the Sec-WebSocket-Key header is missing")]
    KeyMissing,
    #[error("only WebSocket version 13 is supported")]
    Version,
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl IntoResponse for UpgradeRejection {
    fn into_response(self) -> Response {
        let status = match self {
            // RFC 6455 4.4: answer an unsupported version with 426 and the versions we speak.
            UpgradeRejection::Version | UpgradeRejection::NotUpgradable => {
                StatusCode::UPGRADE_REQUIRED
            }
            UpgradeRejection::MethodNotGet => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        };
        let body = Json(serde_json::json!({
            "type": "websocket-upgrade",
            "message": self.to_string(),
        }));
        let mut response = (status, body).into_response();
        if status == StatusCode::UPGRADE_REQUIRED {
            let headers = response.headers_mut();
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        response
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(UpgradeRejection::MethodNotGet);
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(UpgradeRejection::ConnectionHeader);
        }
        if !header_has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(UpgradeRejection::UpgradeHeader);
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(UpgradeRejection::Version);
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(UpgradeRejection::KeyMissing)?
            .clone();
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeRejection::NotUpgradable)?;
        Ok(Self { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers `101 Switching Protocols` and runs `session` on the socket once hyper hands the
    /// connection over.
    pub fn accept<F, Fut>(self, config: WebSocketConfig, session: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let io = TokioIo::new(upgraded);
                    let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config));
                    session(socket.await).await;
                }
                Err(error) => tracing::debug!(%error, "the WebSocket upgrade did not complete"),
            }
        });
        let accept = derive_accept_key(self.key.as_bytes());
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(value) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens_are_matched_case_insensitively_in_lists() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(header_has_token(&headers, header::CONNECTION, "upgrade"));
        assert!(!header_has_token(&headers, header::CONNECTION, "close"));
        assert!(!header_has_token(&headers, header::UPGRADE, "websocket"));
    }
}
