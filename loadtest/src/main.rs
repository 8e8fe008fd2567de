//! `loadtest`: load scenarios against the engine, the reference y-websocket server and
//! Hocuspocus, and `loadtest compare`, which runs them all side by side.

mod cluster;
mod compare;
mod http;
mod probe;
mod report;
mod scenario;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::scenario::{
    ColdLoadOptions, FanoutOptions, IdleOptions, JoinStormOptions, Run, TraceOptions,
};
use crate::target::{Kind, Target};

#[derive(Parser)]
#[command(name = "loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct TargetArgs {
    /// Which server speaks at --url.
    #[arg(long, value_enum, default_value = "synchrony")]
    server: Kind,
    /// Its WebSocket base URL (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8091/synchrony")]
    url: String,
    /// A token for the engine.
    #[arg(long, env = "LOADTEST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The server's pid, to read its CPU and memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the result as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write a latency plot (SVG) here, for scenarios with a latency distribution.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// D documents × C clients editing at a total rate; edit-to-delivery latency.
    Fanout {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        options: FanoutOptions,
    },
    /// N idle connections: server memory per connection and CPU.
    Idle {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        options: IdleOptions,
    },
    /// J clients joining one large document at once: time until each is synced.
    JoinStorm {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        options: JoinStormOptions,
    },
    /// A recorded editing trace replayed through the server by K clients.
    Trace {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        options: TraceOptions,
    },
    /// Load of a large stored document until the first client is synced (the engine only).
    ColdLoad {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        options: ColdLoadOptions,
    },
    /// Starts the engine (SQLite, PostgreSQL), @y/websocket-server and Hocuspocus on loopback
    /// one after another, runs every scenario against each, and writes a Markdown table, JSON
    /// and plots into a results folder.
    Compare(compare::CompareOptions),
    /// Starts N engine nodes as one cluster, spreads clients over them and measures fan-out
    /// (against one node too, for comparison) and failover (`kill -9` of a node).
    Cluster(Box<cluster::ClusterOptions>),
}

impl TargetArgs {
    fn run(&self) -> Result<Run> {
        synchrony::raise_open_file_limit();
        Ok(Run::new(
            Target::new(self.server, &self.url, self.token.clone())?,
            self.server_pid,
            self.seed,
        ))
    }
}

fn emit<T: Serialize>(args: &TargetArgs, result: &T, lines: &[String]) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for line in lines {
        // A closed stdout (`| head`) is not the run's failure.
        let _ = writeln!(out, "{line}");
    }
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_vec_pretty(result)?)?;
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Fanout { target, options } => {
            let r = scenario::fanout(&target.run()?, &options).await?;
            if let Some(path) = &target.plot {
                report::plot(
                    path,
                    "fanout: edit → delivery",
                    &[("fanout".into(), &r.latency)],
                )?;
            }
            emit(&target, &r, &report::fanout_lines(&r))?;
            Ok(r.errors == 0 && r.missing_deliveries == 0)
        }
        Command::Idle { target, options } => {
            let r = scenario::idle(&target.run()?, &options).await?;
            emit(&target, &r, &report::idle_lines(&r))?;
            Ok(r.dropped == 0)
        }
        Command::JoinStorm { target, options } => {
            let r = scenario::join_storm(&target.run()?, &options).await?;
            if let Some(path) = &target.plot {
                report::plot(
                    path,
                    "join storm: time to sync",
                    &[("join-storm".into(), &r.time_to_sync)],
                )?;
            }
            emit(&target, &r, &report::join_storm_lines(&r))?;
            Ok(r.errors == 0)
        }
        Command::Trace { target, options } => {
            let r = scenario::trace(&target.run()?, &options).await?;
            emit(&target, &r, &report::trace_lines(&r))?;
            Ok(r.clients_exact && r.storage_exact != Some(false))
        }
        Command::ColdLoad { target, options } => {
            let r = scenario::cold_load(&target.run()?, &options).await?;
            emit(&target, &r, &report::cold_load_lines(&r))?;
            Ok(true)
        }
        Command::Compare(options) => compare::run(options).await,
        Command::Cluster(options) => cluster::run(*options).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("loadtest: the run had errors (see above)");
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!("loadtest: {error:#}");
            ExitCode::from(2)
        }
    }
}
