//! The `synchrony` binary: parses configuration, initialises tracing and delegates.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use synchrony::config::{LogFormat, ServeConfig, StoreConfig};
use synchrony::keyspace::{self, Resolved, Source};
use synchrony::store::Store;
use synchrony::{Engine, EngineError};
use tokio::net::TcpListener;

/// Exit codes, documented in the README.
mod exit {
    pub const CONFIG: u8 = 2;
    pub const BIND: u8 = 3;
    pub const STORAGE: u8 = 4;
    pub const DRAIN_TIMEOUT: u8 = 5;
}

#[derive(Parser)]
#[command(
    name = "synchrony",
    version,
    about = "Collaborative-editing engine for Yjs documents"
)]
struct Cli {
    /// Log format. Logs go to stderr, or as JSON to stdout when managed (--watch-pid), or to a
    /// rotating file (--log-to-file); stdout also carries the ready line.
    #[arg(
        long = "log-format",
        env = "SYNCHRONY_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine (the default).
    Serve(Box<ServeConfig>),
    /// Create or upgrade the database schema, then exit.
    Migrate(StoreConfig),
    /// Mint a token for scripts and tests, signed by a registered app or a configured key.
    Token(Box<TokenArgs>),
    /// Print the effective configuration of `serve` with each value's source, secrets redacted.
    Config(Box<ServeConfig>),
    /// Run `synchrony <engine args>` as a child and keep it running (restarts with backoff).
    Supervise(SuperviseArgs),
    /// Inspect a running cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(clap::Subcommand)]
enum ClusterCommand {
    /// Print the members, their state and load as one node sees them.
    Status {
        /// The node to ask: its base URL, context path included.
        #[arg(long, default_value = "http://127.0.0.1:8091/synchrony")]
        url: String,
        /// Print the JSON of `GET {ctx}/v1/cluster` instead of a table.
        #[arg(long)]
        json: bool,
        /// An admin token, for a node that enforces tokens (`synchrony token --admin`).
        #[arg(long, env = "SYNCHRONY_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Wait until the node sees this many live members, every member alive and its links
        /// up (the rolling restart's gate); exit 1 if that does not happen within --wait-secs.
        #[arg(long = "wait-live", value_name = "N")]
        wait_live: Option<usize>,
        /// How long --wait-live waits.
        #[arg(long = "wait-secs", default_value_t = 300, value_name = "SECONDS")]
        wait_secs: u64,
    },
}

#[derive(clap::Args)]
struct SuperviseArgs {
    /// Keep the child's status here as JSON (replaced atomically on every change).
    #[arg(long = "status-file")]
    status_file: Option<PathBuf>,
    /// Longest wait between restarts, seconds.
    #[arg(long = "backoff-max-secs", default_value_t = 60)]
    backoff_max_secs: u64,
    /// SIGKILL the child this long after forwarding SIGTERM, seconds.
    #[arg(long = "stop-timeout-secs", default_value_t = 25)]
    stop_timeout_secs: u64,
    /// The engine's arguments, after `--` (e.g. `-- serve --port 8091`).
    #[arg(last = true, required = true)]
    engine_args: Vec<String>,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// Document the token grants access to (repeatable; a trailing * grants a prefix).
    #[arg(long = "doc")]
    docs: Vec<String>,
    /// Access to those documents.
    #[arg(long, value_enum, default_value = "full")]
    access: TokenAccess,
    /// Grant host operations (`{"admin":"admin"}`) instead of documents.
    #[arg(long)]
    admin: bool,
    /// Lifetime, seconds.
    #[arg(long = "ttl-secs", default_value_t = 3600)]
    ttl_secs: u64,
    /// The user (`sub`).
    #[arg(long)]
    sub: Option<String>,
    /// Display name for presence (`session.name`).
    #[arg(long)]
    name: Option<String>,
    /// Audience; defaults to the first service URL + /v1.
    #[arg(long)]
    aud: Option<String>,
    /// Sign as this registered app (`iss`); its secret comes from --app-secret or the database.
    #[arg(long = "app-id")]
    app_id: Option<String>,
    #[arg(
        long = "app-secret",
        env = "SYNCHRONY_APP_SECRET",
        hide_env_values = true
    )]
    app_secret: Option<String>,
    #[command(flatten)]
    auth: synchrony::config::AuthConfig,
    #[command(flatten)]
    store: StoreConfig,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TokenAccess {
    Full,
    Read,
}

/// Where logs go.
enum LogTarget {
    Stderr,
    /// Managed: the host captures stdout.
    Stdout,
    /// A daily-rotated file in this directory.
    File(PathBuf),
}

/// Returns a guard that must live as long as the process (it flushes file logs).
fn init_tracing(
    format: LogFormat,
    target: LogTarget,
) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNCHRONY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard, ansi) = match target {
        LogTarget::Stderr => (
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
            None,
            std::io::stderr().is_terminal(),
        ),
        LogTarget::Stdout => (
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stdout),
            None,
            false,
        ),
        LogTarget::File(dir) => {
            // The appender prunes old files at start; give it a directory to look in.
            let _ = std::fs::create_dir_all(&dir);
            let appender = tracing_appender::rolling::Builder::new()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix("synchrony")
                .filename_suffix("log")
                .max_log_files(7)
                .build(&dir);
            match appender {
                Ok(appender) => {
                    let (writer, guard) = tracing_appender::non_blocking(appender);
                    (
                        tracing_subscriber::fmt::writer::BoxMakeWriter::new(writer),
                        Some(guard),
                        false,
                    )
                }
                Err(error) => {
                    eprintln!(
                        "synchrony.log.to.file: cannot write logs in {}: {error}",
                        dir.display()
                    );
                    std::process::exit(exit::CONFIG.into());
                }
            }
        }
    };
    // Colours only for people at a terminal, never in files or a host's captured output.
    // A host that died closed our stdout: the last log lines are lost quietly instead of each
    // printing a broken-pipe error on stderr.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

/// The subcommands' names, from the clap definition (so a new one is never mistaken for an
/// argument of the implied `serve`).
fn subcommands() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect()
}

/// Resolves Synchrony's key forms into flags, then parses. Exits with the configuration code
/// (naming the key and where its value came from) on a bad value.
fn parse_cli() -> (Cli, Resolved, clap::ArgMatches) {
    let mut argv: Vec<String> = std::env::args().collect();
    let subcommands = subcommands();
    // `serve` is implied, as when a launcher runs `synchrony -Xmx2g synchrony.core sql`.
    if !argv.iter().skip(1).any(|a| {
        subcommands.contains(a)
            || matches!(a.as_str(), "--help" | "-h" | "--version" | "-V" | "help")
    }) {
        argv.insert(1.min(argv.len()), "serve".into());
    }
    let sub = argv
        .iter()
        .skip(1)
        .find(|a| subcommands.contains(a))
        .cloned()
        .unwrap_or_else(|| "serve".into());
    let mut command = Cli::command();
    command.build();
    let target = command
        .find_subcommand(&sub)
        .cloned()
        .unwrap_or_else(|| command.clone());
    let env: HashMap<String, String> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let resolved = match keyspace::resolve(&target, &argv, &env, |p| {
        std::fs::read_to_string(p).map_err(|e| e.to_string())
    }) {
        Ok(resolved) => resolved,
        Err(error) => {
            eprintln!("configuration error: {error}");
            std::process::exit(exit::CONFIG.into());
        }
    };
    let matches = match command.try_get_matches_from(&resolved.args) {
        Ok(matches) => matches,
        Err(error) => {
            if let Some((key, value, source)) = keyspace::blame(&resolved, &error) {
                let reason = error.to_string();
                let reason = reason
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("error: ");
                let shown = if key.secret { "***" } else { value.as_str() };
                eprintln!(
                    "configuration error: {} (from {source}) = {shown:?}: {reason}",
                    key.key
                );
                std::process::exit(exit::CONFIG.into());
            }
            error.exit();
        }
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let strict = match &cli.command {
        Some(Command::Serve(config) | Command::Config(config)) => config.config_strict,
        _ => false,
    };
    if strict && !resolved.unknown.is_empty() {
        for line in &resolved.unknown {
            eprintln!("configuration error: {line} (synchrony.config.strict is true)");
        }
        std::process::exit(exit::CONFIG.into());
    }
    (cli, resolved, matches)
}

/// `synchrony config`: every key of `serve`, its value and where it came from.
fn print_config(resolved: &Resolved, top: &clap::ArgMatches) -> ExitCode {
    let mut command = Cli::command();
    command.build();
    let (Some(serve), Some(matches)) = (
        command.find_subcommand("config").cloned(),
        top.subcommand_matches("config"),
    ) else {
        return ExitCode::FAILURE;
    };
    let mut out = std::io::stdout().lock();
    for key in &resolved.keys {
        let Some(arg) = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(key.long.as_str()))
        else {
            continue;
        };
        let id = arg.get_id().as_str();
        let taken = resolved.taken.iter().find(|(k, _, _)| k.key == key.key);
        let value: Option<String> = matches.get_raw(id).map(|values| {
            values
                .map(|v| v.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(",")
        });
        let source = match (taken, matches.value_source(id)) {
            (Some((_, _, source)), _) => source.to_string(),
            (None, Some(clap::parser::ValueSource::CommandLine)) => Source::CommandLine.to_string(),
            (None, Some(clap::parser::ValueSource::EnvVariable)) => {
                format!("environment {}", key.env.clone().unwrap_or_default())
            }
            _ => Source::Default.to_string(),
        };
        let shown = match (&value, key.secret) {
            (Some(_), true) => "***".to_owned(),
            (Some(v), false) => v.clone(),
            (None, _) => "(unset)".to_owned(),
        };
        // A closed pipe (`synchrony config | head`) ends the listing, it is not an error.
        if writeln!(out, "{:<40} {:<32} {source}", key.key, shown).is_err() {
            return ExitCode::SUCCESS;
        }
    }
    let _ = out.flush();
    ExitCode::SUCCESS
}

/// Stack of each runtime thread. Client input never makes the engine recurse deeply (nesting is
/// bounded by `synchrony.max.nesting.depth` before yrs sees it); this is a margin on top, and
/// costs address space only until a stack is actually used.
const THREAD_STACK_BYTES: usize = 8 << 20;

fn main() -> ExitCode {
    let parsed = parse_cli();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(Command::Serve(config)) = &parsed.0.command {
        if config.worker_threads > 0 {
            builder.worker_threads(config.worker_threads);
        }
    }
    let runtime = builder
        .enable_all()
        .thread_stack_size(THREAD_STACK_BYTES)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run(parsed)),
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run((cli, resolved, matches): (Cli, Resolved, clap::ArgMatches)) -> ExitCode {
    let target = match &cli.command {
        Some(Command::Serve(config)) => {
            match (config.managed.log_dir(), config.managed.watch_pid) {
                (Some(dir), _) => LogTarget::File(dir),
                (None, Some(_)) => LogTarget::Stdout,
                (None, None) => LogTarget::Stderr,
            }
        }
        _ => LogTarget::Stderr,
    };
    // Managed: JSON lines, unless the host asked for text explicitly.
    // Any source counts (flag, -D, environment, properties file), not only the command line.
    let chosen =
        matches.value_source("log_format") != Some(clap::parser::ValueSource::DefaultValue);
    let format = match (&target, chosen) {
        (LogTarget::Stdout, false) => LogFormat::Json,
        _ => cli.log_format,
    };
    let _guard = init_tracing(format, target);
    for warning in &resolved.warnings {
        tracing::warn!("{warning}");
    }
    match cli.command {
        Some(Command::Migrate(store)) => migrate(store).await,
        Some(Command::Serve(config)) => serve(*config).await,
        Some(Command::Config(_)) => print_config(&resolved, &matches),
        Some(Command::Supervise(args)) => supervise(args).await,
        Some(Command::Cluster(ClusterCommand::Status {
            url,
            json,
            token,
            wait_live,
            wait_secs,
        })) => {
            let fetched = match wait_live {
                None => synchrony::cluster::status::fetch(&url, token.as_deref()).await,
                Some(live) => {
                    let within = std::time::Duration::from_secs(wait_secs);
                    synchrony::cluster::status::wait_until_settled(
                        &url,
                        token.as_deref(),
                        live,
                        within,
                    )
                    .await
                }
            };
            match fetched {
                Ok(status) if json => {
                    println!("{status:#}");
                    ExitCode::SUCCESS
                }
                Ok(status) => {
                    print!("{}", synchrony::cluster::status::render(&status));
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    tracing::error!("{message}");
                    ExitCode::from(1)
                }
            }
        }
        Some(Command::Token(args)) => match mint(*args).await {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err((code, message)) => {
                tracing::error!("{message}");
                ExitCode::from(code)
            }
        },
        None => serve(ServeConfig::default()).await,
    }
}

async fn mint(mut args: TokenArgs) -> Result<String, (u8, String)> {
    use synchrony::auth::{mint_hs256, mint_with_private_key, MintClaims};
    let config_error = |m: String| (exit::CONFIG, m);
    args.auth = args
        .auth
        .normalized()
        .map_err(|e| config_error(e.to_string()))?;
    args.app_secret = args.app_secret.filter(|s| !s.trim().is_empty());
    args.auth.jwt_private_key = args.auth.jwt_private_key.filter(|k| !k.trim().is_empty());
    if args.admin != args.docs.is_empty() {
        return Err(config_error(
            "give either --admin or at least one --doc".into(),
        ));
    }
    let mut access = std::collections::HashMap::new();
    if args.admin {
        access.insert("admin".to_owned(), "admin".to_owned());
    }
    let level = match args.access {
        TokenAccess::Full => "full",
        TokenAccess::Read => "read",
    };
    for doc in &args.docs {
        let id = doc.strip_suffix('*').unwrap_or(doc);
        if !(doc.ends_with('*') && id.is_empty()) {
            synchrony_protocol::DocId::parse(id.trim_end_matches('/'))
                .map_err(|e| config_error(format!("--doc {doc:?}: {e}")))?;
        }
        access.insert(format!("/data/{doc}"), level.to_owned());
    }
    let now = synchrony::gate::unix_now();
    let aud = args.aud.clone().or_else(|| {
        args.auth.service_urls.first().map(|u| {
            format!(
                "{}/v1",
                u.trim().trim_end_matches('/').trim_end_matches("/v1")
            )
        })
    });
    let mut claims = MintClaims {
        iss: args.app_id.clone(),
        aud,
        sub: args.sub.clone(),
        iat: now,
        exp: now + args.ttl_secs,
        access,
        session: args.name.as_ref().map(|n| serde_json::json!({ "name": n })),
    };
    if let Some(app) = &args.app_id {
        let secret = match &args.app_secret {
            Some(secret) => secret.clone(),
            None => {
                let url = args
                    .store
                    .resolve_url()
                    .map_err(|e| config_error(e.to_string()))?;
                let store = Store::connect(&url)
                    .await
                    .map_err(|e| (exit::STORAGE, e.to_string()))?;
                store
                    .app_secret(app)
                    .await
                    .map_err(|e| (exit::STORAGE, e.to_string()))?
                    .ok_or_else(|| config_error(format!("--app-id {app:?} is not registered")))?
            }
        };
        return mint_hs256(&claims, &secret).map_err(config_error);
    }
    if let Some(pem) = &args.auth.jwt_private_key {
        return mint_with_private_key(&claims, pem)
            .map_err(|e| config_error(format!("jwt.private.key: {e}")));
    }
    if let Some(secret) = &args.auth.jwt_secret {
        claims.iss = claims.iss.or(Some("synchrony".into()));
        return mint_hs256(&claims, secret).map_err(config_error);
    }
    Err(config_error(
        "no signing key: give --app-id (registered app), --jwt-private-key or --jwt-secret".into(),
    ))
}

async fn migrate(config: StoreConfig) -> ExitCode {
    let url = match config.resolve_url() {
        Ok(url) => url,
        Err(error) => {
            tracing::error!(%error, "configuration error");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let result = async {
        let store = Store::connect(&url).await?;
        store.migrate().await?;
        Ok::<_, synchrony::store::StoreError>(store.backend())
    }
    .await;
    match result {
        Ok(backend) => {
            tracing::info!(backend = backend.name(), "migrations applied");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "migration failed");
            ExitCode::from(exit::STORAGE)
        }
    }
}

async fn serve(config: ServeConfig) -> ExitCode {
    let mut signals = ShutdownSignals::register();
    let addr = (config.bind, config.port);
    let drain_timeout = config.timing.drain_timeout();
    // Configuration is checked before anything listens.
    let engine = match Engine::new(config) {
        Ok(engine) => engine,
        Err(error) => {
            tracing::error!(%error, "configuration error");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let open_files = synchrony::raise_open_file_limit();
    tracing::debug!(open_files, "open-file limit");
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, bind = %addr.0, port = addr.1, "cannot listen (synchrony.port / synchrony.bind)");
            return ExitCode::from(exit::BIND);
        }
    };
    let local = match listener.local_addr() {
        Ok(local) => local,
        Err(error) => {
            tracing::error!(%error, "listener has no address");
            return ExitCode::from(exit::BIND);
        }
    };
    // Serve at once: the heartbeat answers 503 until storage is migrated.
    let server = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.serve(listener).await })
    };
    if let Err(error) = engine.initialize().await {
        tracing::error!(%error, database = %engine.store.target(), "storage unavailable (synchrony.database.url)");
        engine.shutdown().await;
        return ExitCode::from(match error {
            EngineError::Config(_) => exit::CONFIG,
            EngineError::Store(_) => exit::STORAGE,
        });
    }
    if let Err(error) = synchrony::metrics::push_statsd(&engine) {
        tracing::error!(%error, "cannot push metrics to statsD (synchrony.metrics.statsd.*)");
        engine.shutdown().await;
        return ExitCode::from(exit::CONFIG);
    }
    // Join the cluster once storage is ready: peers route clients here from then on.
    if engine.clustered() {
        if let Some(ms) = synchrony::testing::hooks().delay_cluster_join_ms {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let peer = engine.config.cluster.peer_bind(&engine.config);
        let started = match TcpListener::bind(peer).await {
            Ok(listener) => engine.start_cluster(listener, local).map_err(|error| {
                tracing::error!(%error, "configuration error");
                exit::CONFIG
            }),
            Err(error) => {
                tracing::error!(%error, %peer, "cannot listen on the peer port (synchrony.cluster.base.port / synchrony.cluster.bind)");
                Err(exit::BIND)
            }
        };
        if let Err(code) = started {
            engine.shutdown().await;
            return ExitCode::from(code);
        }
    }
    // A stop asked for while starting: admit nobody, only to drain at once.
    let stop_pending = {
        use futures_util::FutureExt;
        signals.recv().now_or_never().is_some()
    };
    if !stop_pending {
        engine.admit_clients();
    }
    let ctx = engine.config.normalized_context_path().unwrap_or_default();
    let url = match &engine.config.managed.host {
        Some(host) => format!("http://{host}:{}{ctx}", local.port()),
        None => format!("http://{local}{ctx}"),
    };
    // One machine-readable line on stdout: hosts and tests learn the real port here. A host that
    // closed our stdout gets no line, and no panic either.
    let demo = engine.config.demo_enabled.then(|| format!("{url}/demo/"));
    let ready = serde_json::json!({ "event": "ready", "url": url, "port": local.port(), "pid": std::process::id(), "demo": demo });
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{ready}").and_then(|()| out.flush());
    }
    let node = match engine.cluster.get() {
        Some(cluster) => cluster.me().to_owned(),
        None => format!("standalone-{}", uuid::Uuid::new_v4()),
    };
    synchrony::strangers::start(&engine, node, url.clone());
    match &demo {
        Some(demo) => tracing::info!(%url, %demo, "ready"),
        None => tracing::info!(%url, "ready"),
    }

    let watched = engine.config.managed.watch_pid;
    let signal_task = {
        let engine = engine.clone();
        tokio::spawn(async move {
            if stop_pending {
                tracing::info!("shutdown requested while starting; draining");
            } else {
                tokio::select! {
                    _ = signals.recv() => tracing::info!("shutdown requested; draining"),
                    pid = watch_pid(watched) => tracing::info!(pid, "the watched process (synchrony.watch.pid) is gone; draining"),
                }
            }
            // New clients go elsewhere from now on: one admitted during the hand-over would be
            // closed again moments later. Peers move this node's documents at once instead of
            // waiting for its links to die, and its documents hand their state over first
            // (within a quarter of the drain).
            engine.stop_admitting();
            if let Some(ms) = synchrony::testing::hooks().delay_leave_ms {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            if let Some(cluster) = engine.cluster.get() {
                cluster.leave(drain_timeout / 4).await;
            }
            engine.begin_shutdown();
        })
    };
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "server failed"),
        Err(error) => tracing::error!(%error, "server task failed"),
    }
    signal_task.abort();
    match tokio::time::timeout(drain_timeout, engine.shutdown()).await {
        Ok(()) => {
            tracing::info!("stopped; every accepted update is committed");
            ExitCode::SUCCESS
        }
        Err(_) => {
            let (updates, bytes) = engine.docs.persister().queued();
            tracing::error!(
                timeout_secs = drain_timeout.as_secs(),
                uncommitted_updates = updates,
                uncommitted_bytes = bytes,
                storage = engine.storage_problem().unwrap_or_default(),
                "drain did not finish in time; uncommitted updates were never acknowledged, and \
                 their editors still hold them and send them again when they reconnect"
            );
            ExitCode::from(exit::DRAIN_TIMEOUT)
        }
    }
}

async fn supervise(args: SuperviseArgs) -> ExitCode {
    let mut signals = ShutdownSignals::register();
    use synchrony::supervisor::{Supervisor, SupervisorConfig};
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(error) => {
            tracing::error!(%error, "cannot find the synchrony binary");
            return ExitCode::FAILURE;
        }
    };
    let mut config = SupervisorConfig::new(program, args.engine_args);
    config.backoff_max = std::time::Duration::from_secs(args.backoff_max_secs.max(1));
    config.stop_timeout = std::time::Duration::from_secs(args.stop_timeout_secs.max(1));
    let supervisor = Supervisor::start(config);
    let mut changes = supervisor.subscribe();
    let report = |status: &synchrony::supervisor::Status| {
        let mut event = serde_json::to_value(status).unwrap_or_default();
        event["event"] = "status".into();
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{event}").and_then(|()| out.flush());
        }
        if let Some(path) = &args.status_file {
            let tmp = path.with_extension("tmp");
            let written =
                std::fs::write(&tmp, event.to_string()).and_then(|()| std::fs::rename(&tmp, path));
            if let Err(error) = written {
                tracing::warn!(%error, path = %path.display(), "cannot write the status file");
            }
        }
    };
    report(&supervisor.status());
    let mut stopping = false;
    // Every change is reported, through `stopping` to `stopped`; the stream ends with the task.
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                let status = changes.borrow_and_update().clone();
                report(&status);
            }
            _ = signals.recv(), if !stopping => {
                tracing::info!("stopping the engine");
                stopping = true;
                supervisor.request_stop();
            }
        }
    }
    let last = supervisor.stop().await;
    if last.state != synchrony::supervisor::State::Stopped {
        report(&last);
    }
    ExitCode::SUCCESS
}

/// Resolves when process `pid` has died (never, without a pid). A zombie counts as dead, and so
/// does our parent once we have been re-parented: a killed host may not be reaped at once.
async fn watch_pid(pid: Option<u32>) -> u32 {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    let parent = nix::unistd::getppid().as_raw() as u32;
    let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        every.tick().await;
        if pid == parent && nix::unistd::getppid().as_raw() as u32 != parent {
            return pid;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name: `pid (comm) S ...`.
            Ok(stat) => {
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next());
                if matches!(state, Some('Z' | 'X')) {
                    return pid;
                }
            }
            Err(_) => {
                let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None);
                if matches!(alive, Err(nix::errno::Errno::ESRCH)) {
                    return pid;
                }
            }
        }
    }
}

/// SIGTERM and SIGINT, registered when created: create it before announcing readiness, so that
/// a host's SIGTERM right after the ready line still drains instead of killing the process.
struct ShutdownSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn register() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let watch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::error!(%error, "cannot watch {name}");
                None
            }
        };
        Self {
            term: watch(SignalKind::terminate(), "SIGTERM"),
            int: watch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    async fn recv(&mut self) {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.term) => {}
            _ = next(&mut self.int) => {}
        }
    }
}
