//! The accept loop: HTTP/1.1 with upgrades on every accepted socket, bounded before anyone is
//! authenticated.
//!
//! - A client must send a request's headers within [`HEADER_READ_TIMEOUT`], and an idle
//!   keep-alive connection is closed after it too (slowloris).
//! - Open sockets (HTTP connections and WebSockets alike) are counted; past
//!   `synchrony.max.connections` plus [`HTTP_HEADROOM`] a new socket is answered `503` at once and
//!   closed, by at most [`MAX_REFUSALS`] small tasks at a time (beyond that it is just closed).
//!   WebSocket sessions alone are capped at `synchrony.max.connections` by the WebSocket handler
//!   (503, or 1013 in band), so the headroom keeps the heartbeat and health answering for hosts
//!   and load balancers while editors are refused.
//! - On shutdown the loop stops accepting and asks every HTTP connection to finish its request
//!   and close.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Time a client has to send a request's headers, and that an idle keep-alive connection lives.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Sockets allowed beyond `synchrony.max.connections` for plain HTTP (heartbeat, health, REST).
pub const HTTP_HEADROOM: usize = 256;
/// Sockets being refused at once; more are closed without an answer.
pub const MAX_REFUSALS: usize = 64;
/// Time a client has to send a request's body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// On shutdown, how long an HTTP connection may take to finish its request before it is cut.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Descriptors kept for everything that is not a client socket (database, log files).
const RESERVED_FDS: usize = 128;

const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\nConnection: close\r\nContent-Length: 92\r\n\r\n{\"type\":\"overloaded\",\"message\":\"connection limit reached (synchrony.max.connections); retry\"}";

/// A socket that holds one of the open-socket permits until it is dropped, wherever it ends up
/// (hyper hands it to the WebSocket on upgrade).
struct Counted {
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Serves `app` on `listener` until `stop` is cancelled; connections are tracked by `tracker`.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    max_sockets: usize,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    // Past the open-file limit accept fails before the cap could answer anyone.
    let fd_limit = crate::open_file_limit().saturating_sub(RESERVED_FDS as u64) as usize;
    if fd_limit < max_sockets {
        tracing::warn!(
            max_sockets,
            fd_limit,
            "the open-file limit is below synchrony.max.connections plus headroom; sockets are capped at it"
        );
    }
    let max_sockets = max_sockets.min(fd_limit.max(1));
    let sockets = Arc::new(Semaphore::new(max_sockets));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut last_warning: Option<Instant> = None;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // Out of file descriptors, most likely: let connections close, then go on.
                tracing::warn!(%error, "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Without TCP_NODELAY a small update written while the previous one is unacknowledged
        // waits for the peer's delayed ACK: milliseconds per hop for editors taking turns.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
        let Ok(permit) = sockets.clone().try_acquire_owned() else {
            if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                last_warning = Some(Instant::now());
                tracing::warn!(
                    limit = max_sockets,
                    "open-socket limit reached (synchrony.max.connections plus HTTP headroom); refusing new sockets with 503"
                );
            }
            if let Ok(slot) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut tcp = tcp;
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        // Read (some of) the request first: closing with it unread resets the
                        // connection, and the client may never see the 503.
                        let mut head = [0u8; 4096];
                        let _ = tcp.read(&mut head).await;
                        tcp.write_all(OVERLOADED).await?;
                        tcp.shutdown().await
                    })
                    .await;
                    drop(slot);
                });
            }
            continue;
        };
        // Who is asking, for handlers that care (`GET {ctx}/metrics` is open to loopback only).
        let peer = tcp.peer_addr().ok();
        let io = TokioIo::new(Counted {
            tcp,
            _permit: permit,
        });
        let with_peer = tower::ServiceBuilder::new()
            .map_request(
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    if let Some(peer) = peer {
                        request
                            .extensions_mut()
                            .insert(axum::extract::ConnectInfo(peer));
                    }
                    request
                },
            )
            .service(app.clone());
        let service = TowerToHyperService::new(with_peer);
        let connection = builder.serve_connection(io, service).with_upgrades();
        let stop = stop.clone();
        tracker.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "HTTP connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    // A client that never reads its answer must not hold the shutdown.
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
                }
            }
        });
    }
}
