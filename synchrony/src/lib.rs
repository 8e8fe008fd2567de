//! synchrony: a collaborative-editing engine for Yjs documents, a workalike of Atlassian
//! Synchrony.
//!
//! # Layout
//!
//! - [`config`]: every setting, parsed once by `main` and passed down typed.
//! - [`store`]: the update log and snapshots on SQLite or PostgreSQL (sqlx), and compaction.
//! - [`persist`]: group commit of accepted updates and "durable through" notifications.
//! - [`doc`]: the registry of loaded documents and the actor that owns each one.
//! - [`session`]: one WebSocket connection, bytes ↔ messages ↔ the document actor.
//! - [`placement`]: which node owns a document (always this one until the cluster lands).
//! - [`http`]: the router: heartbeat, health, WebSocket endpoint.
//!
//! [`Engine`] ties them together. It is handed an already-bound listener, so tests bind port 0.

pub mod config;
pub mod doc;
pub mod http;
pub mod persist;
pub mod placement;
pub mod session;
pub mod store;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigError, ServeConfig};
use crate::doc::{DocDeps, Docs};
use crate::persist::Persister;
use crate::placement::{Placement, SingleNode};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
}

/// A running engine node.
pub struct Engine {
    pub config: ServeConfig,
    pub store: Store,
    pub docs: Arc<Docs>,
    pub placement: Arc<dyn Placement>,
    /// Cancelled when shutdown begins: sessions close with 1012, documents stop.
    pub cancel: CancellationToken,
    /// Sessions, document actors and compactions.
    pub tracker: TaskTracker,
    /// Open WebSocket sessions.
    pub connections: Arc<AtomicU64>,
    pub started: Instant,
    ready: AtomicBool,
    /// The persister outlives the documents so that their last updates are committed.
    persist_stop: CancellationToken,
    persist_tracker: TaskTracker,
}

impl Engine {
    /// Connects to storage, runs migrations and starts the persister.
    pub async fn start(config: ServeConfig) -> Result<Arc<Self>, EngineError> {
        config.normalized_context_path()?;
        let url = config.store.resolve_url()?;
        let store = Store::connect(&url).await?;
        store.migrate().await?;
        let persist_stop = CancellationToken::new();
        let persist_tracker = TaskTracker::new();
        let persister = Persister::spawn(
            store.clone(),
            config.timing.flush_window(),
            persist_stop.clone(),
            &persist_tracker,
        );
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let docs = Docs::new(DocDeps {
            store: store.clone(),
            persister,
            limits: config.limits.clone(),
            timing: config.timing.clone(),
            compaction: config.compaction.clone(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        });
        tracing::info!(backend = store.backend().name(), "storage ready");
        Ok(Arc::new(Self {
            config,
            store,
            docs,
            placement: Arc::new(SingleNode),
            cancel,
            tracker,
            connections: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
            ready: AtomicBool::new(true),
            persist_stop,
            persist_tracker,
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.cancel.is_cancelled()
    }

    /// Serves HTTP and WebSockets on `listener` until shutdown begins.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let ctx = self.config.normalized_context_path().unwrap_or_default();
        let app = http::router(self.clone(), &ctx);
        axum::serve(listener, app)
            .with_graceful_shutdown(self.cancel.clone().cancelled_owned())
            .await
    }

    /// Begins shutdown: the heartbeat fails, sessions close with 1012.
    pub fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::Release);
        self.cancel.cancel();
    }

    /// Shuts down and waits until every accepted update is committed.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        self.tracker.close();
        self.tracker.wait().await;
        self.persist_stop.cancel();
        self.persist_tracker.close();
        self.persist_tracker.wait().await;
    }
}
