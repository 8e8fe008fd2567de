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
        Some(Command::Serve(config)) => serve(*config).await,
        None => serve(ServeConfig::default()).await,
    }
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
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, bind = %config.bind, port = config.port, "cannot listen (synchrony.port / synchrony.bind)");
            return ExitCode::from(exit::BIND);
        }
    };
    let drain_timeout = config.timing.drain_timeout();
    let engine = match Engine::new(config) {
        Ok(engine) => engine,
        Err(error) => {
            tracing::error!(%error, "configuration error");
            return ExitCode::from(exit::CONFIG);
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
