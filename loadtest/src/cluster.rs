//! `loadtest cluster`: starts N engine nodes as one cluster on one PostgreSQL database, spreads
//! the clients of every document over them (client `i` on node `i mod N`, so most edits cross
//! a peer link), and measures fan-out latency; then the same load against a single node for
//! comparison, and a second cluster run in which one node is killed (`kill -9`) to measure how
//! long until every pair of clients of a document exchanges edits again.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::compare::{psql, read_ready, stop_child};
use crate::report;
use crate::scenario::{self, FanoutOptions, FanoutResult, Kill, Run};
use crate::target::{Kind, Target};

#[derive(clap::Args, Debug)]
pub struct ClusterOptions {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    #[command(flatten)]
    pub fanout: FanoutOptions,
    /// Run the same load against a single node too, for comparison.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub baseline: bool,
    /// Kill one node this many seconds into a second cluster run (0: no failover run).
    #[arg(long, default_value_t = 10.0)]
    pub kill_after_secs: f64,
    /// The engine binary (default: `synchrony` beside this binary).
    #[arg(long)]
    pub engine: Option<PathBuf>,
    /// PostgreSQL server; a fresh database is created on it for each run and dropped after.
    #[arg(
        long,
        env = "SYNCHRONY_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct ClusterResult {
    pub nodes: usize,
    pub single_node: Option<FanoutResult>,
    pub cluster: FanoutResult,
    pub failover: Option<FanoutResult>,
}

struct Node {
    child: Child,
    pid: u32,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Node {
    fn target(&self) -> Result<Target> {
        Target::new(
            Kind::Synchrony,
            &format!("ws://127.0.0.1:{}/synchrony", self.port),
            None,
        )
    }

    async fn stop(mut self) {
        stop_child(&mut self.child, self.pid).await;
    }
}

/// A database of its own for one run, dropped by [`Database::drop_now`].
struct Database {
    admin: String,
    name: String,
    url: String,
}

impl Database {
    async fn create(admin: &str, what: &str, seed: u64) -> Result<Self> {
        let name = format!("loadtest_{what}_{}_{seed}", std::process::id());
        psql(admin, &format!("DROP DATABASE IF EXISTS {name}")).await?;
        psql(admin, &format!("CREATE DATABASE {name}")).await?;
        let (base, _) = admin
            .rsplit_once('/')
            .context("PostgreSQL URL without a database")?;
        Ok(Self {
            admin: admin.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    async fn drop_now(self) {
        let _ = psql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {}", self.name),
        )
        .await;
    }
}

fn engine(options: &ClusterOptions) -> Result<PathBuf> {
    match &options.engine {
        Some(p) => Ok(p.clone()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("no binary directory")?
            .join("synchrony")),
    }
}

async fn start_node(options: &ClusterOptions, db: &str, cluster: &[String]) -> Result<Node> {
    let dir = tempfile::tempdir()?;
    let mut command = Command::new(engine(options)?);
    command
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(dir.path())
        .args(["--database-url", db])
        .args(cluster)
        .env_remove("SYNCHRONY_DATABASE_URL")
        .env("SYNCHRONY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().context("start the engine")?;
    let (port, pid) = read_ready(&mut child, "synchrony").await?;
    Ok(Node {
        child,
        pid,
        port,
        _dir: dir,
    })
}

/// Starts `n` nodes as one cluster, each with its peer port on its own loopback address.
async fn start_cluster(options: &ClusterOptions, db: &str) -> Result<Vec<Node>> {
    let secret = format!("{:032x}", rand::random::<u128>());
    let name = format!("loadtest-{:08x}", rand::random::<u32>());
    let (x, y) = (
        (std::process::id() % 200) as u8 + 30,
        rand::random::<u8>() % 250,
    );
    let addrs: Vec<String> = (1..=options.nodes)
        .map(|i| format!("127.{x}.{y}.{i}:25500"))
        .collect();
    let mut nodes = Vec::new();
    for addr in &addrs {
        let (ip, _) = addr.rsplit_once(':').context("address")?;
        let args: Vec<String> = [
            "--cluster-join-type",
            "tcpip",
            "--cluster-bind",
            ip,
            "--cluster-join-tcpip-members",
            &addrs.join(","),
            "--cluster-authentication-secret",
            &secret,
            "--cluster-name",
            &name,
        ]
        .into_iter()
        .map(String::from)
        .collect();
        nodes.push(start_node(options, db, &args).await?);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for node in &nodes {
        loop {
            let url = format!("http://127.0.0.1:{}/synchrony/v1/cluster", node.port);
            let (_, body) = crate::http::request("GET", &url, None, b"").await?;
            let view: serde_json::Value = serde_json::from_slice(&body)?;
            if view["live"].as_array().map(Vec::len) == Some(options.nodes) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the nodes did not form a cluster of {} within 60 s: {view}",
                    options.nodes
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(nodes)
}

fn run_over(nodes: &[Node], seed: u64) -> Result<Run> {
    let targets = nodes.iter().map(Node::target).collect::<Result<Vec<_>>>()?;
    let mut run = Run::new(targets[0].clone(), None, seed);
    run.spread = targets;
    Ok(run)
}

pub async fn run(options: ClusterOptions) -> Result<bool> {
    if options.nodes < 2 {
        bail!("a cluster needs at least 2 nodes");
    }
    synchrony::raise_open_file_limit();
    let mut lines = Vec::new();
    let single_node = if options.baseline {
        let db = Database::create(&options.postgres_url, "single", options.seed).await?;
        let node = start_node(&options, &db.url, &[]).await?;
        let run = Run::new(node.target()?, Some(node.pid), options.seed);
        let result = scenario::fanout(&run, &options.fanout).await;
        node.stop().await;
        db.drop_now().await;
        let result = result?;
        lines.push("single node:".to_owned());
        lines.extend(report::fanout_lines(&result));
        Some(result)
    } else {
        None
    };

    let db = Database::create(&options.postgres_url, "cluster", options.seed).await?;
    let nodes = start_cluster(&options, &db.url).await?;
    let cluster = scenario::fanout(&run_over(&nodes, options.seed)?, &options.fanout).await;
    for node in nodes {
        node.stop().await;
    }
    db.drop_now().await;
    let cluster = cluster?;
    lines.push(format!(
        "{} nodes, clients spread over them:",
        options.nodes
    ));
    lines.extend(report::fanout_lines(&cluster));

    let failover = if options.kill_after_secs > 0.0 {
        let db = Database::create(&options.postgres_url, "failover", options.seed).await?;
        let nodes = start_cluster(&options, &db.url).await?;
        let victim = nodes.len() - 1;
        let kill = Kill {
            after_secs: options.kill_after_secs,
            pid: nodes[victim].pid,
        };
        let result = scenario::fanout_with_kill(
            &run_over(&nodes, options.seed + 1)?,
            &options.fanout,
            Some(kill),
        )
        .await;
        for node in nodes {
            node.stop().await;
        }
        db.drop_now().await;
        let result = result?;
        lines.push(format!(
            "{} nodes, node {} killed {:.1} s in:",
            options.nodes,
            victim + 1,
            options.kill_after_secs
        ));
        lines.extend(report::fanout_lines(&result));
        if let Some(f) = &result.failover {
            lines.push(format!(
                "  failover: {}/{} client pairs exchanging edits again; time from the kill: {}",
                f.recovered,
                f.pairs,
                f.time_to_recover.line()
            ));
        }
        Some(result)
    } else {
        None
    };
    for line in &lines {
        println!("{line}");
    }
    let ok = cluster.errors == 0
        && cluster.missing_deliveries == 0
        && failover
            .as_ref()
            .and_then(|f| f.failover.as_ref())
            .is_none_or(|f| f.recovered == f.pairs);
    let result = ClusterResult {
        nodes: options.nodes,
        single_node,
        cluster,
        failover,
    };
    if let Some(path) = &options.out {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
    }
    Ok(ok)
}
