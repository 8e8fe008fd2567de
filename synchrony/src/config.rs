//! All configuration, in one place.
//!
//! Every key has a command-line flag and an environment variable in Synchrony's UPPER_SNAKE form
//! (`synchrony.port` → `SYNCHRONY_PORT`). The library never reads the environment itself: `main`
//! parses a [`ServeConfig`] and hands typed pieces down.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where documents are stored.
#[derive(Debug, Clone, Args)]
pub struct StoreConfig {
    /// Database URL: `postgres://…`, Synchrony's JDBC form `jdbc:postgresql://host:port/db`, or
    /// `sqlite://path`. Unset: SQLite at `<data-dir>/synchrony.db`.
    #[arg(long = "database-url", env = "SYNCHRONY_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Database user, for URLs (JDBC ones especially) that do not carry it.
    #[arg(long = "database-username", env = "SYNCHRONY_DATABASE_USERNAME")]
    pub database_username: Option<String>,

    /// Database password, for URLs that do not carry it.
    #[arg(
        long = "database-password",
        env = "SYNCHRONY_DATABASE_PASSWORD",
        hide_env_values = true
    )]
    pub database_password: Option<String>,

    /// Directory of the embedded SQLite database.
    #[arg(
        long = "data-dir",
        env = "SYNCHRONY_DATA_DIR",
        default_value = "./synchrony-data"
    )]
    pub data_dir: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("synchrony.database.url: {0}")]
    DatabaseUrl(String),
    #[error("synchrony.data.dir: cannot create {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error("synchrony.context.path: {0}")]
    ContextPath(String),
    #[error("jwt.public.key: {0}")]
    PublicKey(String),
    #[error("jwt.private.key: {0}")]
    PrivateKey(String),
    #[error("{0}")]
    Cluster(String),
    #[error("{key}: {reason}")]
    Secret { key: &'static str, reason: String },
    #[error(
        "synchrony.bind is {0}, not a loopback address, and no authentication is configured: set \
         synchrony.service.authtoken (hosts then register apps), synchrony.jwt.secret or jwt.public.key"
    )]
    InsecureBind(std::net::IpAddr),
}

impl StoreConfig {
    /// The sqlx URL to connect to, creating the data directory for the SQLite default.
    pub fn resolve_url(&self) -> Result<String, ConfigError> {
        let Some(raw) = self
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        else {
            std::fs::create_dir_all(&self.data_dir).map_err(|e| ConfigError::DataDir {
                path: self.data_dir.display().to_string(),
                reason: e.to_string(),
            })?;
            return Ok(format!(
                "sqlite://{}/synchrony.db?mode=rwc",
                self.data_dir.display()
            ));
        };
        let raw = raw.trim();
        if raw.starts_with("sqlite:") {
            return Ok(raw.to_owned());
        }
        // JDBC URLs lower-case their scheme (Synchrony does the same) and lose the `jdbc:` prefix.
        let lower = raw.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("jdbc:")
            .map(|_| &raw[5..])
            .unwrap_or(raw);
        let (scheme, tail) = rest
            .split_once("://")
            .ok_or_else(|| ConfigError::DatabaseUrl(format!("{raw:?} is not a URL")))?;
        if !matches!(
            scheme.to_ascii_lowercase().as_str(),
            "postgres" | "postgresql"
        ) {
            return Err(ConfigError::DatabaseUrl(format!(
                "unsupported scheme {scheme:?}; use postgres://, jdbc:postgresql:// or sqlite://"
            )));
        }
        let mut url = url::Url::parse(&format!("postgres://{tail}"))
            .map_err(|e| ConfigError::DatabaseUrl(format!("{raw:?}: {e}")))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(ConfigError::DatabaseUrl(format!("{raw:?} has no host")));
        }
        // JDBC carries credentials as query parameters or separate keys; sqlx wants them in the URL.
        let mut user = self.database_username.clone();
        let mut password = self.database_password.clone();
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter_map(|(k, v)| match k.as_ref() {
                "user" => {
                    user.get_or_insert(v.into_owned());
                    None
                }
                "password" => {
                    password.get_or_insert(v.into_owned());
                    None
                }
                _ => Some((k.into_owned(), v.into_owned())),
            })
            .collect();
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        let bad = |_| ConfigError::DatabaseUrl("cannot carry credentials".into());
        if let Some(user) = user.filter(|_| url.username().is_empty()) {
            url.set_username(&user).map_err(bad)?;
        }
        if let Some(password) = password.filter(|_| url.password().is_none()) {
            url.set_password(Some(&password)).map_err(bad)?;
        }
        Ok(url.to_string())
    }
}

/// Size limits and queue bounds.
#[derive(Debug, Clone, Args)]
pub struct LimitsConfig {
    /// Largest WebSocket frame (and message) accepted from a client, in bytes. Larger: close 4413.
    #[arg(long = "max-frame-bytes", env = "SYNCHRONY_MAX_FRAME_BYTES", default_value_t = 8 << 20)]
    pub max_frame_bytes: usize,

    /// Largest document, in bytes of encoded Yjs state. An update that would pass it: close 4413.
    #[arg(long = "max-doc-bytes", env = "SYNCHRONY_MAX_DOC_BYTES", default_value_t = 64 << 20)]
    pub max_doc_bytes: usize,

    /// Bytes of named versions one document may keep (with at most 1000 versions); a mark past
    /// it gets 409 `versions-quota`.
    #[arg(
        long = "versions-max-bytes",
        env = "SYNCHRONY_VERSIONS_MAX_BYTES",
        default_value_t = 256 << 20
    )]
    pub versions_max_bytes: u64,

    /// WebSocket sessions open at once, at most; past it new editors are refused (503, or 1013
    /// in band) while the heartbeat, health and REST keep answering.
    #[arg(
        long = "max-connections",
        env = "SYNCHRONY_MAX_CONNECTIONS",
        default_value_t = 20_000
    )]
    pub max_connections: usize,

    /// Deepest nesting of shared types in a document, and of values inside an update or an
    /// awareness state (at most 256). Deeper input is refused (1007 / 400) before yrs, which
    /// recurses on it, sees it.
    #[arg(
        long = "max-nesting-depth",
        env = "SYNCHRONY_MAX_NESTING_DEPTH",
        default_value_t = synchrony_protocol::nesting::DEFAULT_MAX_NESTING,
        value_parser = parse_nesting_depth
    )]
    pub max_nesting_depth: usize,

    /// Messages queued towards one client before it counts as lagging.
    #[arg(
        long = "outbound-queue-messages",
        env = "SYNCHRONY_OUTBOUND_QUEUE_MESSAGES",
        default_value_t = 512
    )]
    pub outbound_queue_messages: usize,

    /// Bytes queued towards one client before it counts as lagging (one message is always allowed).
    #[arg(long = "outbound-queue-bytes", env = "SYNCHRONY_OUTBOUND_QUEUE_BYTES", default_value_t = 4 << 20)]
    pub outbound_queue_bytes: usize,

    /// Resyncs of a lagging client allowed per minute before it is closed with 1013.
    #[arg(
        long = "max-resyncs-per-minute",
        env = "SYNCHRONY_MAX_RESYNCS_PER_MINUTE",
        default_value_t = 3
    )]
    pub max_resyncs_per_minute: usize,
}

fn parse_nesting_depth(text: &str) -> Result<usize, String> {
    let ceiling = synchrony_protocol::nesting::MAX_NESTING_CEILING;
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=ceiling).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a depth from 1 to {ceiling}")),
    }
}

/// Timers.
#[derive(Debug, Clone, Args)]
pub struct TimingConfig {
    /// Group-commit window: accepted updates are committed at most this long after arrival.
    #[arg(
        long = "flush-window-ms",
        env = "SYNCHRONY_FLUSH_WINDOW_MS",
        default_value_t = 50
    )]
    pub flush_window_ms: u64,

    /// WebSocket ping interval, seconds.
    #[arg(
        long = "ping-interval-secs",
        env = "SYNCHRONY_PING_INTERVAL_SECS",
        default_value_t = 30
    )]
    pub ping_interval_secs: u64,

    /// Close a connection (1001) that sent nothing, not even a pong, for this long, seconds.
    #[arg(
        long = "idle-timeout-secs",
        env = "SYNCHRONY_IDLE_TIMEOUT_SECS",
        default_value_t = 90
    )]
    pub idle_timeout_secs: u64,

    /// Give up on a client whose socket accepts no data for this long, seconds.
    #[arg(
        long = "write-timeout-secs",
        env = "SYNCHRONY_WRITE_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub write_timeout_secs: u64,

    /// Unload a document this long after its last client left, seconds.
    #[arg(
        long = "doc-idle-secs",
        env = "SYNCHRONY_DOC_IDLE_SECS",
        default_value_t = 30
    )]
    pub doc_idle_secs: u64,

    /// Bound on a graceful shutdown (SIGTERM), seconds.
    #[arg(
        long = "drain-timeout-secs",
        env = "SYNCHRONY_DRAIN_TIMEOUT_SECS",
        default_value_t = 20
    )]
    pub drain_timeout_secs: u64,
}

impl TimingConfig {
    pub fn flush_window(&self) -> Duration {
        Duration::from_millis(self.flush_window_ms)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs.max(1))
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs.max(1))
    }
    pub fn doc_idle(&self) -> Duration {
        Duration::from_secs(self.doc_idle_secs)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

/// When the update log of a document is merged into its snapshot.
#[derive(Debug, Clone, Args)]
pub struct CompactionConfig {
    /// Compact once a loaded document has this many log rows.
    #[arg(
        long = "compact-after-updates",
        env = "SYNCHRONY_COMPACT_AFTER_UPDATES",
        default_value_t = 1000
    )]
    pub compact_after_updates: u64,

    /// Compact once a loaded document's log holds this many bytes.
    #[arg(long = "compact-after-bytes", env = "SYNCHRONY_COMPACT_AFTER_BYTES", default_value_t = 4 << 20)]
    pub compact_after_bytes: u64,
}

/// Who may connect: registered apps, static keys, service URLs.
#[derive(Debug, Clone, Args, Default)]
pub struct AuthConfig {
    /// Public base URL(s) of this service, comma-separated; a token's `aud` must be one of them
    /// (with or without `/v1`). Unset: audiences are not checked.
    #[arg(
        long = "service-url",
        env = "SYNCHRONY_SERVICE_URL",
        value_delimiter = ','
    )]
    pub service_urls: Vec<String>,

    /// Shared token a host must present to register an app (`POST {ctx}/v1/apps/secret`).
    #[arg(
        long = "service-authtoken",
        env = "SYNCHRONY_SERVICE_AUTHTOKEN",
        hide_env_values = true
    )]
    pub service_authtoken: Option<String>,

    /// Static HS256 secret accepted for tokens of no registered app.
    #[arg(
        long = "jwt-secret",
        env = "SYNCHRONY_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// Static public key (PEM, or Synchrony's base64 X.509 form): RS256 or EdDSA tokens.
    #[arg(
        long = "jwt-public-key",
        env = "JWT_PUBLIC_KEY",
        allow_hyphen_values = true
    )]
    pub jwt_public_key: Option<String>,

    /// RSA private key that decrypts encrypted editor tokens (JWE `RSA-OAEP-256` + `A256GCM`,
    /// as Confluence sends them): Confluence's base64 PKCS#8 form, or PEM. `synchrony token`
    /// signs with it instead (a PEM RSA or Ed25519 key: RS256 or EdDSA).
    #[arg(
        long = "jwt-private-key",
        env = "JWT_PRIVATE_KEY",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    pub jwt_private_key: Option<String>,

    /// Web page origins (`https://wiki.example.com`) allowed to connect, comma-separated; `*`
    /// allows any. Unset: loopback pages only while no authentication is configured, any page
    /// once tokens are required. Requests without an Origin header and same-origin ones pass.
    #[arg(
        long = "allowed-origins",
        env = "SYNCHRONY_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Clock skew tolerated on token times, seconds.
    #[arg(
        long = "jwt-leeway-secs",
        env = "SYNCHRONY_JWT_LEEWAY_SECS",
        default_value_t = 30
    )]
    pub jwt_leeway_secs: u64,
}

/// Shortest static HS256 secret accepted: RFC 7518 (3.2) requires a key at least as long as the
/// hash, 256 bits.
pub const MIN_JWT_SECRET_BYTES: usize = 32;
/// Shortest registration token (`synchrony.service.authtoken`) and cluster secret accepted.
pub const MIN_SHARED_TOKEN_BYTES: usize = 16;

/// A secret as configured: empty or blank means unset, whatever form it came in (a flag, an
/// empty environment variable, `-Dkey=`, a `key=` properties line). One that is set must be at
/// least `min` bytes.
fn secret(
    value: Option<String>,
    key: &'static str,
    min: usize,
) -> Result<Option<String>, ConfigError> {
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    if value.len() < min {
        return Err(ConfigError::Secret {
            key,
            reason: format!(
                "is {} bytes; a secret must be at least {min} bytes: generate one, for example \
                 with `openssl rand -hex 32`, and give every node the same (or unset it to leave it off)",
                value.len()
            ),
        });
    }
    Ok(Some(value))
}

impl AuthConfig {
    /// Treats empty or blank secrets as unset and refuses short ones, naming the key.
    pub fn normalized(mut self) -> Result<Self, ConfigError> {
        self.service_authtoken = secret(
            self.service_authtoken,
            "synchrony.service.authtoken",
            MIN_SHARED_TOKEN_BYTES,
        )?;
        self.jwt_secret = secret(
            self.jwt_secret,
            "synchrony.jwt.secret",
            MIN_JWT_SECRET_BYTES,
        )?;
        self.jwt_public_key = self.jwt_public_key.filter(|k| !k.trim().is_empty());
        self.jwt_private_key = self.jwt_private_key.filter(|k| !k.trim().is_empty());
        self.service_urls.retain(|u| !u.trim().is_empty());
        Ok(self)
    }

    /// Whether anything makes tokens required (registered apps also do, found at startup).
    pub fn configured(&self) -> bool {
        self.service_authtoken.is_some()
            || self.jwt_secret.is_some()
            || self.jwt_public_key.is_some()
    }
}

/// `synchrony serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub test_hooks: crate::testing::TestHooks,

    /// Unknown `synchrony.*`, `cluster.*`, `reza.*` and `jwt.*` keys stop the start (exit 2)
    /// instead of a WARN each (the default suits Confluence's launch lines).
    #[arg(long = "config-strict", env = "SYNCHRONY_CONFIG_STRICT", default_value_t = false, action = clap::ArgAction::Set)]
    pub config_strict: bool,

    /// Address to listen on. Loopback by default; set it (e.g. 0.0.0.0) to serve other machines.
    #[arg(long, env = "SYNCHRONY_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// HTTP and WebSocket port (0 picks a free one; the ready line on stdout tells which).
    #[arg(long, env = "SYNCHRONY_PORT", default_value_t = 8091)]
    pub port: u16,

    /// Path prefix of every endpoint.
    #[arg(
        long = "context-path",
        env = "SYNCHRONY_CONTEXT_PATH",
        default_value = "/synchrony"
    )]
    pub context_path: String,

    /// Threads running the engine's tasks (0: one per CPU the process may use). Set it when
    /// several engines share a machine, so that they do not outnumber its cores.
    #[arg(
        long = "worker-threads",
        env = "SYNCHRONY_WORKER_THREADS",
        default_value_t = 0
    )]
    pub worker_threads: usize,

    /// Who may read `GET {ctx}/metrics`: `loopback` (open to this machine, an admin token from
    /// elsewhere), `token` (an admin token always, once tokens are required), `open` (anyone).
    #[arg(
        long = "metrics-access",
        env = "SYNCHRONY_METRICS_ACCESS",
        value_enum,
        default_value = "loopback"
    )]
    pub metrics_access: MetricsAccess,

    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` is believed. A request that
    /// a proxy forwarded never counts as this machine's own (for `synchrony.metrics.access`
    /// `loopback` and the cluster endpoints) unless it came through one of these for a
    /// loopback client.
    #[arg(
        long = "trusted-proxies",
        env = "SYNCHRONY_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_parser = parse_net
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    #[command(flatten)]
    pub statsd: StatsdConfig,

    /// Serve the demo editor page at `{ctx}/demo/`.
    #[arg(long = "demo-enabled", env = "SYNCHRONY_DEMO_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub demo_enabled: bool,

    #[command(flatten)]
    pub store: StoreConfig,

    #[command(flatten)]
    pub auth: AuthConfig,

    #[command(flatten)]
    pub limits: LimitsConfig,

    #[command(flatten)]
    pub timing: TimingConfig,

    #[command(flatten)]
    pub compaction: CompactionConfig,

    #[command(flatten)]
    pub eviction: crate::eviction::EvictionConfig,

    #[command(flatten)]
    pub managed: ManagedConfig,

    #[command(flatten)]
    pub cluster: ClusterConfig,
}

/// Where metrics are pushed, if anywhere.
#[derive(Debug, Clone, Args)]
pub struct StatsdConfig {
    /// statsD server to push the metrics to (unset: no push).
    #[arg(long = "metrics-statsd-host", env = "SYNCHRONY_METRICS_STATSD_HOST")]
    pub statsd_host: Option<String>,

    /// Its UDP port.
    #[arg(
        long = "metrics-statsd-port",
        env = "SYNCHRONY_METRICS_STATSD_PORT",
        default_value_t = 8125
    )]
    pub statsd_port: u16,

    /// Prefix of every key pushed.
    #[arg(
        long = "metrics-statsd-prefix",
        env = "SYNCHRONY_METRICS_STATSD_PREFIX",
        default_value = "synchrony"
    )]
    pub statsd_prefix: String,

    /// Seconds between pushes.
    #[arg(
        long = "metrics-statsd-interval-secs",
        env = "SYNCHRONY_METRICS_STATSD_INTERVAL_SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub statsd_interval_secs: u64,
}

/// Who may read the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsAccess {
    Loopback,
    Token,
    Open,
}

/// A byte size as Java writes it: `2g`, `512m`, `1024k`, or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let (digits, factor) = match t.chars().last() {
        Some('g') => (&t[..t.len() - 1], 1u64 << 30),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('k') => (&t[..t.len() - 1], 1 << 10),
        _ => (t.as_str(), 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a size like 2g, 512m, 1024k or a number of bytes"))
}

/// Settings of the managed deployment: a host starts the engine and watches it.
#[derive(Debug, Clone, Args, Default)]
pub struct ManagedConfig {
    /// Exit (after flushing) when this process dies: the host's pid.
    #[arg(long = "watch-pid", env = "SYNCHRONY_WATCH_PID")]
    pub watch_pid: Option<u32>,

    /// Bound on the documents held in memory (their encoded size), like -Xmx for Synchrony:
    /// past it, documents not yet loaded are refused (1013 / 503) until others unload.
    #[arg(long = "memory-max", env = "SYNCHRONY_MEMORY_MAX", value_parser = parse_size, default_value = "2g")]
    pub memory_max: u64,

    /// Write logs to a daily-rotated file in this directory (`true`: ./logs; `false`: off).
    #[arg(long = "log-to-file", env = "SYNCHRONY_LOG_TO_FILE")]
    pub log_to_file: Option<String>,

    /// Host name the ready line advertises in its URL (default: the bound address).
    #[arg(long = "host", env = "SYNCHRONY_HOST")]
    pub host: Option<String>,

    /// Accepted for Synchrony compatibility (`-Xss`); the engine has no use for it.
    #[arg(long = "stack-space", env = "SYNCHRONY_STACK_SPACE", hide = true)]
    pub stack_space: Option<String>,
}

impl ManagedConfig {
    /// The log directory, if logging to a file.
    pub fn log_dir(&self) -> Option<PathBuf> {
        match self.log_to_file.as_deref().map(str::trim) {
            None | Some("") | Some("false") => None,
            Some("true") => Some(PathBuf::from("logs")),
            Some(dir) => Some(PathBuf::from(dir)),
        }
    }
}

/// How cluster members find each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JoinType {
    Tcpip,
    Redis,
    Multicast,
    Aws,
    Kubernetes,
}

fn parse_member(text: &str) -> Result<String, String> {
    let t = text.trim();
    let (host, port) = match t.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (t, None), // bare IPv6
        Some((h, p)) => (h, Some(p)),
        None => (t, None),
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("{text:?} is not host[:port]"));
    }
    if let Some(p) = port {
        p.parse::<u16>()
            .map_err(|_| format!("{text:?} has a bad port"))?;
    }
    Ok(t.to_owned())
}

/// Cluster keys. Parsed and validated now; acted on by the cluster.
#[derive(Debug, Clone, Args, Default)]
pub struct ClusterConfig {
    /// This node's name in the cluster (logs, metric labels, `GET {ctx}/v1/cluster`): letters,
    /// digits, `.`, `_`, `-`, at most 64. Default: an id made at the first start and kept in
    /// `<data-dir>/node-id`, so that a restarted node takes its own place at once.
    #[arg(long = "node-name", env = "SYNCHRONY_NODE_NAME")]
    pub node_name: Option<String>,
    /// Peer port (Synchrony's Aleph port).
    #[arg(
        long = "cluster-base-port",
        env = "SYNCHRONY_CLUSTER_BASE_PORT",
        default_value_t = 25500
    )]
    pub base_port: u16,
    /// Address the peer port binds to.
    #[arg(long = "cluster-bind", env = "SYNCHRONY_CLUSTER_BIND")]
    pub cluster_bind: Option<IpAddr>,
    /// Accepted for Synchrony compatibility (`hazelcast-btf`).
    #[arg(long = "cluster-impl", env = "SYNCHRONY_CLUSTER_IMPL", hide = true)]
    pub implementation: Option<String>,
    /// Name of the cluster; members of other clusters are refused (default: the group name,
    /// else `synchrony`).
    #[arg(long = "cluster-name", env = "CLUSTER_NAME")]
    pub name: Option<String>,
    /// Synchrony's older name for the same thing (managed DC sets `<name>-Synchrony`).
    #[arg(long = "cluster-group-name", env = "CLUSTER_GROUP_NAME")]
    pub group_name: Option<String>,
    /// Membership port (Synchrony's Hazelcast port).
    #[arg(
        long = "cluster-listen-port",
        env = "CLUSTER_LISTEN_PORT",
        default_value_t = 5701
    )]
    pub listen_port: u16,
    /// Interface the membership protocol uses.
    #[arg(long = "cluster-interfaces", env = "CLUSTER_INTERFACES")]
    pub interfaces: Option<IpAddr>,
    /// Require the shared secret from peers.
    #[arg(long = "cluster-authentication-enabled", env = "CLUSTER_AUTHENTICATION_ENABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub authentication_enabled: bool,
    /// Shared secret of the cluster.
    #[arg(
        long = "cluster-authentication-secret",
        env = "CLUSTER_AUTHENTICATION_SECRET",
        hide_env_values = true
    )]
    pub authentication_secret: Option<String>,
    /// How members are found.
    #[arg(long = "cluster-join-type", env = "CLUSTER_JOIN_TYPE", value_enum)]
    pub join_type: Option<JoinType>,
    /// Members for `tcpip`, comma-separated host[:port].
    #[arg(long = "cluster-join-tcpip-members", env = "CLUSTER_JOIN_TCPIP_MEMBERS", value_delimiter = ',', value_parser = parse_member)]
    pub tcpip_members: Vec<String>,
    /// Multicast group for `multicast` (default 224.2.2.3, Hazelcast's).
    #[arg(
        long = "cluster-join-multicast-group",
        env = "CLUSTER_JOIN_MULTICAST_GROUP"
    )]
    pub multicast_group: Option<IpAddr>,
    /// Time-to-live of the multicast announcements (1: the local network).
    #[arg(
        long = "cluster-join-multicast-ttl",
        env = "CLUSTER_JOIN_MULTICAST_TTL",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=255)
    )]
    pub multicast_ttl: u32,
    /// Multicast port for `multicast` (Synchrony's managed default).
    #[arg(
        long = "cluster-join-multicast-port",
        env = "CLUSTER_JOIN_MULTICAST_PORT",
        default_value_t = 54328
    )]
    pub multicast_port: u16,
    /// The Redis registry for `redis` (`redis://host:6379/0`).
    #[arg(
        long = "cluster-join-redis-url",
        env = "CLUSTER_JOIN_REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
}

impl ClusterConfig {
    /// The multicast settings from `cluster.join.multicast.*` and `cluster.interfaces`.
    pub fn multicast(&self) -> Result<crate::cluster::multicast::MulticastSettings, ConfigError> {
        let group = match self.multicast_group {
            None => std::net::Ipv4Addr::new(224, 2, 2, 3),
            Some(IpAddr::V4(group)) if group.is_multicast() => group,
            Some(other) => {
                return Err(ConfigError::Cluster(format!(
                    "cluster.join.multicast.group {other} is not an IPv4 multicast address (224.0.0.0/4)"
                )))
            }
        };
        let interface = match self.interfaces {
            None => std::net::Ipv4Addr::UNSPECIFIED,
            Some(IpAddr::V4(address)) => address,
            Some(other) => {
                return Err(ConfigError::Cluster(format!(
                "cluster.interfaces {other} is not an IPv4 address (multicast membership is IPv4)"
            )))
            }
        };
        Ok(crate::cluster::multicast::MulticastSettings {
            group,
            port: self.multicast_port,
            ttl: self.multicast_ttl,
            interface,
        })
    }

    /// Cross-key checks: a join type needs its own keys, a secret when authentication is on.
    /// A blank secret counts as unset; a set one must be long enough.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        self.authentication_secret = secret(
            self.authentication_secret.take(),
            "cluster.authentication.secret",
            MIN_SHARED_TOKEN_BYTES,
        )?;
        if self.authentication_enabled && self.authentication_secret.is_none() {
            return Err(ConfigError::Cluster(
                "cluster.authentication.enabled is true but cluster.authentication.secret is empty"
                    .into(),
            ));
        }
        match self.join_type {
            None | Some(JoinType::Tcpip) => {}
            Some(JoinType::Redis) => {
                let url = self.redis_url.as_deref().map(str::trim).unwrap_or_default();
                if url.is_empty() {
                    return Err(ConfigError::Cluster(
                        "cluster.join.type is redis but cluster.join.redis.url is empty".into(),
                    ));
                }
                if let Err(e) = redis::Client::open(url) {
                    return Err(ConfigError::Cluster(format!(
                        "cluster.join.redis.url is not a Redis URL: {e}"
                    )));
                }
            }
            Some(JoinType::Multicast) => {
                self.multicast()?;
            }
            Some(other) => {
                return Err(ConfigError::Cluster(format!(
                    "cluster.join.type {} is not supported yet; use tcpip, redis or multicast",
                    format!("{other:?}").to_lowercase()
                )))
            }
        }
        if self.join_type == Some(JoinType::Tcpip) && self.tcpip_members.is_empty() {
            return Err(ConfigError::Cluster(
                "cluster.join.type is tcpip but cluster.join.tcpip.members is empty".into(),
            ));
        }
        if self.join_type.is_some() && self.authentication_secret.is_none() {
            return Err(ConfigError::Cluster(
                "cluster.join.type is set but cluster.authentication.secret is not: peers must \
                 prove they belong to the cluster"
                    .into(),
            ));
        }
        if let Some(group) = self.multicast_group {
            if !group.is_multicast() {
                return Err(ConfigError::Cluster(format!(
                    "cluster.join.multicast.group {group} is not a multicast address"
                )));
            }
        }
        Ok(())
    }
}

impl ClusterConfig {
    /// This node's id: `synchrony.node.name`, else the id kept in `<data_dir>/node-id` (made
    /// at the first start).
    pub fn node_id(&self, data_dir: &std::path::Path) -> Result<String, ConfigError> {
        let valid = |name: &str| {
            (1..=64).contains(&name.len())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if let Some(name) = self
            .node_name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            if !valid(name) {
                return Err(ConfigError::Cluster(format!(
                    "synchrony.node.name {name:?} is not a node name: use 1 to 64 letters, digits, \
                     '.', '_' or '-'"
                )));
            }
            return Ok(name.to_owned());
        }
        let path = data_dir.join("node-id");
        if let Ok(kept) = std::fs::read_to_string(&path) {
            let kept = kept.trim();
            if valid(kept) {
                return Ok(kept.to_owned());
            }
        }
        let fresh = uuid::Uuid::new_v4().to_string();
        let written = std::fs::create_dir_all(data_dir)
            .and_then(|()| std::fs::write(&path, format!("{fresh}\n")));
        match written {
            Ok(()) => Ok(fresh),
            Err(e) => Err(ConfigError::Cluster(format!(
                "cannot keep this node's id in {}: {e}; make synchrony.data.dir writable or set \
                 synchrony.node.name",
                path.display()
            ))),
        }
    }

    /// The cluster's name as peers compare it.
    pub fn cluster_name(&self) -> String {
        [&self.name, &self.group_name]
            .into_iter()
            .flatten()
            .map(|n| n.trim())
            .find(|n| !n.is_empty())
            .unwrap_or("synchrony")
            .to_owned()
    }

    /// Where the peer port listens.
    pub fn peer_bind(&self, serve: &ServeConfig) -> std::net::SocketAddr {
        (self.cluster_bind.unwrap_or(serve.bind), self.base_port).into()
    }

    /// What the cluster layer needs, once the peer port is bound.
    pub fn settings(
        &self,
        listener: &tokio::net::TcpListener,
        http: std::net::SocketAddr,
        serve: &ServeConfig,
    ) -> Result<crate::cluster::ClusterSettings, ConfigError> {
        let bound = listener
            .local_addr()
            .map_err(|e| ConfigError::Cluster(format!("peer port has no address: {e}")))?;
        let advertised_ip = if bound.ip().is_unspecified() {
            self.interfaces.ok_or_else(|| {
                ConfigError::Cluster(
                    "synchrony.cluster.bind is a wildcard address: set cluster.interfaces to the \
                     address other nodes reach this one at"
                        .into(),
                )
            })?
        } else {
            bound.ip()
        };
        if self.join_type == Some(JoinType::Multicast) && advertised_ip.is_loopback() {
            return Err(ConfigError::Cluster(format!(
                "cluster.join.type is multicast but this node would announce the loopback address \
                 {advertised_ip}: set synchrony.cluster.bind (or cluster.interfaces) to the address \
                 other nodes reach this one at"
            )));
        }
        let peer_addr = std::net::SocketAddr::new(advertised_ip, bound.port()).to_string();
        let host = match &serve.managed.host {
            Some(host) => format!("{host}:{}", http.port()),
            None => http.to_string(),
        };
        let ctx = serve.normalized_context_path()?;
        let seeds = self
            .tcpip_members
            .iter()
            .map(|m| with_default_port(m, self.base_port))
            .collect();
        Ok(crate::cluster::ClusterSettings {
            node_id: self.node_id(&serve.store.data_dir)?,
            name: self.cluster_name(),
            secret: self
                .authentication_secret
                .clone()
                .unwrap_or_default()
                .into_bytes(),
            seeds,
            peer_addr,
            http_url: format!("http://{host}{ctx}"),
            timeouts: crate::cluster::membership::Timeouts::default(),
            redis_url: match self.join_type {
                Some(JoinType::Redis) => self.redis_url.clone(),
                _ => None,
            },
            multicast: match self.join_type {
                Some(JoinType::Multicast) => Some(self.multicast()?),
                _ => None,
            },
            store: crate::store::StoreIdentity::default(),
        })
    }
}

/// An address (`10.0.0.5`) or a CIDR range (`10.0.0.0/24`).
fn parse_net(value: &str) -> Result<ipnet::IpNet, String> {
    let value = value.trim();
    value
        .parse::<ipnet::IpNet>()
        .or_else(|_| value.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{value:?} is neither an IP address nor a CIDR range"))
}

/// `host` or `host:port` → `host:port`.
fn with_default_port(member: &str, port: u16) -> String {
    let m = member.trim();
    let has_port = match m.rsplit_once(':') {
        Some((h, _)) if h.starts_with('[') => h.ends_with(']'),
        Some((h, _)) => !h.contains(':'),
        None => false,
    };
    if has_port {
        m.to_owned()
    } else if m.contains(':') && !m.starts_with('[') {
        format!("[{m}]:{port}")
    } else {
        format!("{m}:{port}")
    }
}

impl ServeConfig {
    /// The context path with one leading slash and no trailing one ("" for the root).
    pub fn normalized_context_path(&self) -> Result<String, ConfigError> {
        let trimmed = self.context_path.trim().trim_matches('/');
        if trimmed
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || "-_./".contains(c)))
        {
            return Err(ConfigError::ContextPath(format!(
                "{:?} may hold only letters, digits and -_./",
                self.context_path
            )));
        }
        Ok(if trimmed.is_empty() {
            String::new()
        } else {
            format!("/{trimmed}")
        })
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            serve: ServeConfig,
        }
        <Wrapper as clap::Parser>::parse_from(["synchrony"]).serve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(url: &str, user: Option<&str>, password: Option<&str>) -> StoreConfig {
        StoreConfig {
            database_url: Some(url.into()),
            database_username: user.map(Into::into),
            database_password: password.map(Into::into),
            data_dir: "/nonexistent".into(),
        }
    }

    #[test]
    fn jdbc_and_postgres_urls() {
        let cases = [
            (
                store(
                    "jdbc:postgresql://db:5432/confluence",
                    Some("conf"),
                    Some("p@ss"),
                ),
                "postgres://conf:p%40ss@db:5432/confluence",
            ),
            (
                store(
                    "JDBC:PostgreSQL://db/c?user=u&password=pw&sslmode=disable",
                    None,
                    None,
                ),
                "postgres://u:pw@db/c?sslmode=disable",
            ),
            (
                store("postgres://a:b@h:1/d", Some("ignored"), None),
                "postgres://a:b@h:1/d",
            ),
            (
                store("postgresql://h/d", Some("u"), None),
                "postgres://u@h/d",
            ),
            (
                store("sqlite:///tmp/x.db", None, None),
                "sqlite:///tmp/x.db",
            ),
        ];
        for (cfg, want) in cases {
            assert_eq!(
                cfg.resolve_url().as_deref(),
                Ok(want),
                "{:?}",
                cfg.database_url
            );
        }
        for bad in [
            "mysql://h/d",
            "jdbc:oracle:thin:@h:1521:x",
            "nonsense",
            "postgres:///d",
        ] {
            assert!(
                matches!(
                    store(bad, None, None).resolve_url(),
                    Err(ConfigError::DatabaseUrl(_))
                ),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn default_is_sqlite_in_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = StoreConfig {
            database_url: None,
            database_username: None,
            database_password: None,
            data_dir: dir.path().join("nested"),
        };
        let url = cfg.resolve_url().expect("url");
        assert!(url.starts_with("sqlite://") && url.contains("nested/synchrony.db"));
        assert!(dir.path().join("nested").is_dir());
    }

    #[test]
    fn context_path_normalization() {
        let mut cfg = ServeConfig::default();
        assert_eq!(cfg.port, 8091);
        assert_eq!(cfg.normalized_context_path().as_deref(), Ok("/synchrony"));
        cfg.context_path = "synchrony/".into();
        assert_eq!(cfg.normalized_context_path().as_deref(), Ok("/synchrony"));
        cfg.context_path = "/".into();
        assert_eq!(cfg.normalized_context_path().as_deref(), Ok(""));
        cfg.context_path = "/a b".into();
        assert!(cfg.normalized_context_path().is_err());
    }
}
