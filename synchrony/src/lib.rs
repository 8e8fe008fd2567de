//! synchrony: a collaborative-editing engine for Yjs documents, a workalike of Atlassian
//! Synchrony.
//!
//! # Layout
//!
//! - [`config`]: every setting, parsed once by `main` and passed down typed.
//! - [`keyspace`]: Synchrony's key forms (dotted environment, `-D`, `reza.*`, properties file)
//!   resolved into flags before parsing.
//! - [`origin`]: which web pages may connect, by their Origin header.
//! - [`auth`]: token verification and access grants (pure; the clock is a parameter).
//! - [`gate`]: tokens of requests → principals, with registered apps' secrets from storage.
//! - [`store`]: the update log and snapshots on SQLite or PostgreSQL (sqlx), and compaction.
//! - [`persist`]: group commit of accepted updates and "durable through" notifications.
//! - [`nesting`]: how deeply a document's shared types nest; deeper updates are refused.
//! - [`doc`]: the registry of loaded documents and the actor that owns each one.
//! - [`session`]: one WebSocket connection, bytes ↔ messages ↔ the document actor.
//! - [`placement`]: which node owns a document (this one, or by rendezvous hashing in a cluster).
//! - [`cluster`]: peer links, membership and the routes that relay sessions to owners.
//! - [`supervisor`]: keeps an engine process running for a host (backoff, crash loops, stop).
//! - [`listen`]: the accept loop and its bounds (header timeout, socket cap).
//! - [`http`]: the router: heartbeat, health, apps, WebSocket endpoint, document REST API.
//!
//! [`Engine`] ties them together. It is handed an already-bound listener, so tests bind port 0.

mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod doc;
pub mod eviction;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod gate;
pub mod http;
pub mod jwe;
pub mod keyspace;
pub mod listen;
pub mod locks;
pub mod metrics;
pub mod nesting;
pub mod origin;
pub mod persist;
pub mod placement;
pub mod roots;
pub mod session;
pub mod store;
pub mod strangers;
pub mod supervisor;
pub mod testing;
pub mod upgrade;
pub mod util;
pub mod versions;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigError, ServeConfig};
use crate::doc::{DocDeps, Docs};
use crate::gate::Gate;
use crate::persist::{Persister, StorageStatus};
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
    pub gate: Gate,
    /// Which web pages may connect.
    pub origins: crate::origin::OriginPolicy,
    pub docs: Arc<Docs>,
    pub placement: std::sync::OnceLock<Arc<dyn Placement>>,
    /// Set once the node has joined its cluster (`cluster.join.type`).
    pub cluster: std::sync::OnceLock<Arc<cluster::Cluster>>,
    /// Which database this is, read as storage comes up (peers compare it at link-up).
    pub store_identity: std::sync::OnceLock<store::StoreIdentity>,
    /// Cancelled when shutdown begins: sessions close with 1012, documents stop.
    pub cancel: CancellationToken,
    /// Sessions, document actors and compactions.
    pub tracker: TaskTracker,
    /// Open WebSocket sessions.
    pub connections: Arc<AtomicU64>,
    /// What `GET {ctx}/metrics` exports.
    pub metrics: metrics::Metrics,
    /// Engines sharing this database but not this cluster (cluster panic).
    pub strangers: strangers::Strangers,
    /// HTTP connections being served (each ends once its request is answered after shutdown).
    pub http_connections: TaskTracker,
    pub started: Instant,
    ready: AtomicBool,
    /// Result of the last storage probe (`SELECT 1`).
    pub probe: Arc<StorageStatus>,
    /// Result of the last group commit (a disk that is full still answers probes).
    pub commits: Arc<StorageStatus>,
    /// The persister outlives the documents so that their last updates are committed.
    persist_stop: CancellationToken,
    persist_tracker: TaskTracker,
}

/// How often storage is probed for the heartbeat, and how long a pooled probe may take before
/// a connection of its own decides between "busy" and "down".
const STORAGE_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long that connection of its own may take.
const STORAGE_CONNECT_PROBE: std::time::Duration = std::time::Duration::from_secs(3);

impl Engine {
    /// Builds the engine without touching storage: the router can answer (heartbeat 503)
    /// while [`Engine::initialize`] migrates.
    pub fn new(mut config: ServeConfig) -> Result<Arc<Self>, EngineError> {
        config.normalized_context_path()?;
        testing::install(&config.test_hooks);
        config.auth = config.auth.normalized()?;
        if !config.auth.configured() && !config.bind.is_loopback() {
            return Err(ConfigError::InsecureBind(config.bind).into());
        }
        config.cluster.validate()?;
        let url = config.store.resolve_url()?;
        if config.cluster.join_type.is_some() && url.starts_with("sqlite:") {
            // Each node would keep its own pages: a node started without the database URL
            // would join and serve them empty.
            return Err(ConfigError::Cluster(
                "cluster.join.type is set but storage is SQLite (synchrony.database.url is unset or \
                 sqlite:): every node of a cluster must use the one shared PostgreSQL database; set \
                 synchrony.database.url (postgres://… or jdbc:postgresql://…) on every node"
                    .into(),
            )
            .into());
        }
        let store = Store::connect_lazy(&url)?;
        let gate = Gate::new(&config.auth, store.clone())?;
        let persist_stop = CancellationToken::new();
        let persist_tracker = TaskTracker::new();
        let persister = Persister::spawn(
            store.clone(),
            config.timing.flush_window(),
            persist_stop.clone(),
            &persist_tracker,
        );
        let commits = persister.status().clone();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let docs = Docs::new(DocDeps {
            handoff: Arc::default(),
            store: store.clone(),
            persister,
            limits: config.limits.clone(),
            timing: config.timing.clone(),
            compaction: config.compaction.clone(),
            memory_max: config.managed.memory_max,
            cancel: cancel.clone(),
            tracker: tracker.clone(),
            locks: Arc::default(),
            metrics: Arc::default(),
        });
        let origins = crate::origin::OriginPolicy::new(&config.auth.allowed_origins);
        let metrics = metrics::Metrics::new(
            gate.refusals.clone(),
            docs.persister().metrics(),
            &docs.deps().metrics,
        );
        Ok(Arc::new(Self {
            config,
            store,
            gate,
            origins,
            docs,
            placement: std::sync::OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
            store_identity: std::sync::OnceLock::new(),
            cancel,
            tracker,
            connections: Arc::new(AtomicU64::new(0)),
            metrics,
            strangers: strangers::Strangers::default(),
            http_connections: TaskTracker::new(),
            started: Instant::now(),
            ready: AtomicBool::new(false),
            probe: Arc::new(StorageStatus::default()),
            commits,
            persist_stop,
            persist_tracker,
        }))
    }

    /// Migrates storage and starts probing it so that the heartbeat fails while the database is
    /// unreachable. Clients are admitted only once [`Engine::admit_clients`] is called.
    pub async fn initialize(self: &Arc<Self>) -> Result<(), EngineError> {
        self.store.probe().await?;
        self.store.migrate().await?;
        let _ = self.store_identity.set(self.store.identity().await?);
        self.gate.load().await?;
        if !self.gate.enforced() {
            tracing::warn!(
                "no authentication configured and no app registered: anyone who can reach {} may read \
                 and write every document. Set synchrony.service.authtoken (hosts then register \
                 apps), synchrony.jwt.secret or jwt.public.key",
                self.config.bind
            );
        }
        self.probe.set(Ok(()));
        self.refresh_locks().await;
        eviction::schedule(self);
        tracing::info!(backend = self.store.backend().name(), "storage ready");
        let (store, flag, cancel) = (self.store.clone(), self.probe.clone(), self.cancel.clone());
        self.tracker.spawn(async move {
            let mut every = tokio::time::interval(STORAGE_PROBE_INTERVAL);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = cancel.cancelled() => return,
                }
                let outcome = match tokio::time::timeout(STORAGE_PROBE_INTERVAL, store.ping()).await
                {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(error.to_string()),
                    // The pool may be busy (a loaded SQLite) or waiting to reconnect (a stopped
                    // server): a fresh connection tells which, fast when the server is down.
                    Err(_) => {
                        match tokio::time::timeout(STORAGE_CONNECT_PROBE, store.probe()).await {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(error)) => Err(error.to_string()),
                            Err(_) => Err(format!("no answer within {STORAGE_CONNECT_PROBE:?}")),
                        }
                    }
                };
                let ok = outcome.is_ok();
                if flag.set(outcome) {
                    if ok {
                        tracing::info!("storage reachable again");
                    } else {
                        tracing::error!("storage unreachable; heartbeat failing");
                    }
                }
            }
        });
        Ok(())
    }

    /// Reads the maintenance locks from storage now, then every [`locks::REFRESH`] (see
    /// [`crate::locks`]).
    async fn refresh_locks(self: &Arc<Self>) {
        async fn once(engine: &Engine) {
            let locks = &engine.docs.deps().locks;
            let generation = locks.generation();
            match engine.store.live_locks().await {
                Ok(rows) => locks.replace(generation, rows),
                Err(error) => {
                    tracing::debug!(%error, "reading the locks failed; keeping those known");
                    locks.expire();
                }
            }
        }
        once(self).await;
        let (engine, cancel) = (Arc::downgrade(self), self.cancel.clone());
        self.tracker.spawn(async move {
            let mut every = tokio::time::interval(locks::REFRESH);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = cancel.cancelled() => return,
                }
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                once(&engine).await;
            }
        });
    }

    /// Which node owns documents, as seen from here.
    pub fn placement(&self) -> &dyn Placement {
        match self.placement.get() {
            Some(placement) => placement.as_ref(),
            None => &SingleNode,
        }
    }

    /// Joins a client to `doc`: the local actor, or in a cluster a route to the owner.
    pub async fn join(
        &self,
        doc: &synchrony_protocol::DocId,
        request: crate::doc::JoinRequest,
    ) -> Result<crate::doc::DocLink, crate::doc::JoinError> {
        match self.cluster.get() {
            Some(cluster) => cluster::relay::join(cluster, doc, request).await,
            // A clustered node serves clients only through routes: a session joined straight to
            // a local document would never move to the document's owner.
            None if self.clustered() => Err(crate::doc::JoinError::NotJoined),
            None => self.docs.join(doc, request).await,
        }
    }

    /// Whether the configuration asks for a cluster.
    pub fn clustered(&self) -> bool {
        self.config.cluster.join_type.is_some()
    }

    /// Joins the cluster: accepts peer links on `listener` and dials the configured members.
    /// `http` is the address clients reach this node at (for `GET {ctx}/v1/cluster`).
    pub fn start_cluster(
        self: &Arc<Self>,
        listener: TcpListener,
        http: std::net::SocketAddr,
    ) -> Result<(), EngineError> {
        let mut settings = self
            .config
            .cluster
            .settings(&listener, http, &self.config)?;
        settings.store = self.store_identity.get().cloned().unwrap_or_default();
        tracing::info!(node = %settings.node_id, peer = %settings.peer_addr, cluster = %settings.name, "joining the cluster");
        let cluster = cluster::Cluster::new(
            settings,
            self.docs.clone(),
            self.config.limits.clone(),
            self.connections.clone(),
            self.cancel.clone(),
            self.tracker.clone(),
            self.metrics.links.clone(),
        );
        let ctx = self.config.normalized_context_path()?;
        let _ = cluster.router.set(http::router(self.clone(), &ctx));
        let _ = self
            .docs
            .deps()
            .handoff
            .set(Arc::new(cluster::ClusterHandoff(Arc::downgrade(&cluster))));
        cluster.start(listener);
        let _ = self
            .placement
            .set(Arc::new(cluster::ClusterPlacement(cluster.clone())));
        let _ = self.cluster.set(cluster);
        Ok(())
    }

    /// Storage migrated and the node not shutting down: it accepts clients.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.cancel.is_cancelled()
            && self.wrong_store().is_none()
    }

    /// Why this node must not serve: its peers showed it uses another database than the
    /// cluster's (see [`cluster::Cluster::store_problem`]).
    pub fn wrong_store(&self) -> Option<String> {
        self.cluster.get().and_then(|c| c.store_problem())
    }

    /// What the heartbeat answers: ready, storage answered its last probe and took the last
    /// group commit.
    pub fn can_serve(&self) -> bool {
        self.is_ready() && self.storage_problem().is_none()
    }

    /// Why storage cannot be relied on now, if it cannot.
    pub fn storage_problem(&self) -> Option<String> {
        if !self.commits.is_ok() {
            return Some(format!(
                "group commits failing: {}",
                self.commits.problem().unwrap_or_default()
            ));
        }
        if !self.probe.is_ok() {
            return Some(format!(
                "storage probe failing: {}",
                self.probe.problem().unwrap_or_default()
            ));
        }
        None
    }

    /// Serves HTTP and WebSockets on `listener` until shutdown begins; HTTP connections still
    /// finishing a request are tracked by [`Engine::http_connections`].
    pub async fn serve(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let ctx = self.config.normalized_context_path().unwrap_or_default();
        let app = http::router(self.clone(), &ctx);
        let max_sockets = self
            .config
            .limits
            .max_connections
            .saturating_add(listen::HTTP_HEADROOM);
        listen::serve(
            listener,
            app,
            max_sockets,
            self.cancel.clone(),
            self.http_connections.clone(),
        )
        .await;
        Ok(())
    }

    /// Declares the node ready: storage is migrated and, in a cluster, the node has joined it.
    /// A cluster node that admitted a client before then would serve it from a local document
    /// that never moves to the document's owner: that client and the others would stop seeing
    /// each other's edits.
    pub fn admit_clients(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Stops admitting clients (new WebSocket sessions get 503, the heartbeat fails, so a load
    /// balancer sends them elsewhere) while the sessions already open go on: the first step
    /// of a clean stop, before a cluster node hands its documents over.
    pub fn stop_admitting(&self) {
        self.ready.store(false, Ordering::Release);
    }

    /// Begins shutdown: the heartbeat fails, sessions close with 1012.
    pub fn begin_shutdown(&self) {
        self.stop_admitting();
        self.cancel.cancel();
    }

    /// Shuts down and waits until every accepted update is committed.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        self.tracker.close();
        self.http_connections.close();
        // Requests in flight (a REST write waiting for durability) finish within their own
        // deadline; sessions close with 1012 and documents commit what they accepted.
        tokio::join!(self.tracker.wait(), self.http_connections.wait());
        self.persist_stop.cancel();
        self.persist_tracker.close();
        self.persist_tracker.wait().await;
    }
}

/// The open-file limit in force.
pub fn open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Raises this process's open-file limit to its hard limit, since every connection is a socket;
/// returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}
