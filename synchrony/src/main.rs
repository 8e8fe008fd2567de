//! The `synchrony` binary: parses configuration, initialises tracing and delegates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use synchrony::config::{LogFormat, ServeConfig, StoreConfig};
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
    /// Log format (logs go to stderr; stdout carries the ready line).
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
    /// PEM private key (RSA → RS256, Ed25519 → EdDSA).
    #[arg(
        long = "jwt-private-key",
        env = "JWT_PRIVATE_KEY",
        hide_env_values = true
    )]
    jwt_private_key: Option<String>,
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

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNCHRONY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only for people at a terminal, never in files or a host's captured output.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Some(Command::Migrate(store)) => migrate(store).await,
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
        Some(Command::Serve(config)) => serve(*config).await,
        None => serve(ServeConfig::default()).await,
    }
}

async fn mint(args: TokenArgs) -> Result<String, (u8, String)> {
    use synchrony::auth::{mint_hs256, mint_with_private_key, MintClaims};
    let config_error = |m: String| (exit::CONFIG, m);
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
    if let Some(pem) = &args.jwt_private_key {
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
        tracing::error!(%error, "storage unavailable");
        engine.shutdown().await;
        return ExitCode::from(match error {
            EngineError::Config(_) => exit::CONFIG,
            EngineError::Store(_) => exit::STORAGE,
        });
    }
    let ctx = engine.config.normalized_context_path().unwrap_or_default();
    let url = format!("http://{local}{ctx}");
    // One machine-readable line on stdout: hosts and tests learn the real port here.
    println!(
        "{}",
        serde_json::json!({ "event": "ready", "url": url, "port": local.port(), "pid": std::process::id() })
    );
    tracing::info!(%url, "ready");

    let signals = {
        let engine = engine.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested; draining");
            engine.begin_shutdown();
        })
    };
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "server failed"),
        Err(error) => tracing::error!(%error, "server task failed"),
    }
    signals.abort();
    match tokio::time::timeout(drain_timeout, engine.shutdown()).await {
        Ok(()) => {
            tracing::info!("stopped; every accepted update is committed");
            ExitCode::SUCCESS
        }
        Err(_) => {
            tracing::error!(
                timeout_secs = drain_timeout.as_secs(),
                "drain did not finish in time"
            );
            ExitCode::from(exit::DRAIN_TIMEOUT)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
