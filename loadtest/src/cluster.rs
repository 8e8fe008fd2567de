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
    /// Runtime threads of each cluster node (`--worker-threads`); 0: the machine's cores
    /// shared out among the nodes (at least one each). The single node keeps its default, one
    /// per core.
    #[arg(long, default_value_t = 0)]
    pub node_threads: usize,
    /// How many times to run the single node and the cluster, alternately; the summary gives
    /// the median p99 of each (a shared machine's noise moves single runs a lot). 0: none
    /// (only the failover run and the sweep).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Rates (updates/s, comma-separated, ascending) at which to find each side's sustained
    /// throughput: the highest with p99 ≤ 50 ms, every edit delivered and no error, as in
    /// `compare`. Empty: no sweep.
    #[arg(long, value_delimiter = ',')]
    pub sweep_rates: Vec<f64>,
    /// Documents in the sweep's runs (clients per document as `--clients`).
    #[arg(long, default_value_t = 100)]
    pub sweep_docs: usize,
    /// Measured seconds of each sweep run (after 3 s of warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub sweep_secs: f64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct ClusterResult {
    pub nodes: usize,
    pub node_threads: usize,
    /// The single node and the cluster under the same load, alternately.
    pub rounds: Vec<Round>,
    /// Medians over the rounds of the fan-out p99, ms.
    pub single_node_p99_ms: Option<f64>,
    pub cluster_p99_ms: Option<f64>,
    pub failover: Option<FanoutResult>,
    pub sweep: Vec<SweepStep>,
    pub single_node_sustained_rate: Option<f64>,
    pub cluster_sustained_rate: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Round {
    pub single_node: Option<FanoutResult>,
    pub cluster: FanoutResult,
}

#[derive(Debug, Serialize)]
pub struct SweepStep {
    pub rate: f64,
    pub single_node: Option<FanoutResult>,
    pub cluster: Option<FanoutResult>,
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

/// Each cluster node's runtime threads.
fn node_threads(options: &ClusterOptions) -> usize {
    if options.node_threads > 0 {
        return options.node_threads;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / options.nodes).max(1)
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
            "--worker-threads",
            &node_threads(options).to_string(),
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
    run.node_pids = nodes.iter().map(|n| n.pid).collect();
    Ok(run)
}

/// The fan-out load against one node on a database of its own.
async fn single_node(options: &ClusterOptions, fanout: &FanoutOptions) -> Result<FanoutResult> {
    let db = Database::create(&options.postgres_url, "single", options.seed).await?;
    let node = start_node(options, &db.url, &[]).await?;
    let run = Run::new(node.target()?, Some(node.pid), options.seed);
    let result = scenario::fanout(&run, fanout).await;
    node.stop().await;
    db.drop_now().await;
    result
}

/// The fan-out load spread over a fresh cluster, one node killed `kill` seconds in if given.
async fn cluster(
    options: &ClusterOptions,
    fanout: &FanoutOptions,
    kill_after_secs: Option<f64>,
) -> Result<FanoutResult> {
    let what = if kill_after_secs.is_some() {
        "failover"
    } else {
        "cluster"
    };
    let db = Database::create(&options.postgres_url, what, options.seed).await?;
    let nodes = start_cluster(options, &db.url).await?;
    let result = match kill_after_secs {
        None => scenario::fanout(&run_over(&nodes, options.seed)?, fanout).await,
        Some(after_secs) => {
            let kill = Kill {
                after_secs,
                pid: nodes[nodes.len() - 1].pid,
            };
            let run = run_over(&nodes, options.seed + 1)?;
            scenario::fanout_with_kill(&run, fanout, Some(kill)).await
        }
    };
    for node in nodes {
        node.stop().await;
    }
    db.drop_now().await;
    result
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

pub async fn run(options: ClusterOptions) -> Result<bool> {
    if options.nodes < 2 {
        bail!("a cluster needs at least 2 nodes");
    }
    if options.rounds == 0 && options.sweep_rates.is_empty() && options.kill_after_secs <= 0.0 {
        bail!("nothing to run: --rounds 0 without --sweep-rates or --kill-after-secs");
    }
    synchrony::raise_open_file_limit();
    let threads = node_threads(&options);
    let mut lines = vec![format!(
        "{} nodes with {threads} runtime thread(s) each; the single node with its default",
        options.nodes
    )];
    let mut rounds = Vec::new();
    for round in 1..=options.rounds {
        let single = if options.baseline {
            let result = single_node(&options, &options.fanout).await?;
            lines.push(format!("round {round}, single node:"));
            lines.extend(report::fanout_lines(&result));
            Some(result)
        } else {
            None
        };
        let result = cluster(&options, &options.fanout, None).await?;
        lines.push(format!(
            "round {round}, {} nodes, clients spread over them:",
            options.nodes
        ));
        lines.extend(report::fanout_lines(&result));
        rounds.push(Round {
            single_node: single,
            cluster: result,
        });
    }
    let single_node_p99_ms = median(
        rounds
            .iter()
            .filter_map(|r| r.single_node.as_ref().map(|s| s.latency.p99_ms))
            .collect(),
    );
    let cluster_p99_ms = median(rounds.iter().map(|r| r.cluster.latency.p99_ms).collect());
    match (single_node_p99_ms, cluster_p99_ms) {
        (Some(single), Some(cluster)) => lines.push(format!(
            "median p99 over {} round(s): single node {single:.2} ms, {} nodes {cluster:.2} ms ({:.2}×)",
            options.rounds,
            options.nodes,
            cluster / single.max(1e-9)
        )),
        (None, Some(cluster)) => lines.push(format!(
            "median p99 over {} round(s): {} nodes {cluster:.2} ms",
            options.rounds, options.nodes
        )),
        _ => {}
    }

    let failover = if options.kill_after_secs > 0.0 {
        let result = cluster(&options, &options.fanout, Some(options.kill_after_secs)).await?;
        lines.push(format!(
            "{} nodes, node {} killed {:.1} s in:",
            options.nodes, options.nodes, options.kill_after_secs
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

    let (sweep, single_node_sustained_rate, cluster_sustained_rate) = sweep(&options).await?;
    for step in &sweep {
        let side = |r: &Option<FanoutResult>| match r {
            Some(r) => format!(
                "{} sustained={}",
                r.latency.line(),
                crate::compare::sustained(r, step.rate)
            ),
            None => "not run".to_owned(),
        };
        lines.push(format!("sweep {:.0}/s:", step.rate));
        if options.baseline {
            lines.push(format!("  single node: {}", side(&step.single_node)));
        }
        lines.push(format!(
            "  {} nodes: {}",
            options.nodes,
            side(&step.cluster)
        ));
    }
    if !sweep.is_empty() {
        let rate = |r: Option<f64>| r.map_or("none".to_owned(), |r| format!("{r:.0}/s"));
        lines.push(format!(
            "sustained (p99 ≤ 50 ms): single node {}, {} nodes {}",
            rate(single_node_sustained_rate),
            options.nodes,
            rate(cluster_sustained_rate)
        ));
    }

    for line in &lines {
        println!("{line}");
    }
    let ok = rounds
        .iter()
        .all(|r| r.cluster.errors == 0 && r.cluster.missing_deliveries == 0)
        && failover
            .as_ref()
            .and_then(|f| f.failover.as_ref())
            .is_none_or(|f| f.recovered == f.pairs);
    let result = ClusterResult {
        nodes: options.nodes,
        node_threads: threads,
        rounds,
        single_node_p99_ms,
        cluster_p99_ms,
        failover,
        sweep,
        single_node_sustained_rate,
        cluster_sustained_rate,
    };
    if let Some(path) = &options.out {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
    }
    Ok(ok)
}

/// Runs each side at rising rates until it is no longer sustained; returns the steps and each
/// side's highest sustained rate.
async fn sweep(options: &ClusterOptions) -> Result<(Vec<SweepStep>, Option<f64>, Option<f64>)> {
    let mut steps = Vec::new();
    let (mut single_on, mut cluster_on) = (options.baseline, true);
    let (mut single_best, mut cluster_best) = (None, None);
    for &rate in &options.sweep_rates {
        if !single_on && !cluster_on {
            break;
        }
        let fanout = FanoutOptions {
            docs: options.sweep_docs,
            clients: options.fanout.clients,
            rate,
            warmup_secs: 3.0,
            duration_secs: options.sweep_secs,
            drain_secs: 2.0,
        };
        let mut step = SweepStep {
            rate,
            single_node: None,
            cluster: None,
        };
        if single_on {
            let r = single_node(options, &fanout).await?;
            eprintln!("  sweep {rate:.0}/s, single node: {}", r.latency.line());
            single_on = crate::compare::sustained(&r, rate);
            if single_on {
                single_best = Some(rate);
            }
            step.single_node = Some(r);
        }
        if cluster_on {
            let r = cluster(options, &fanout, None).await?;
            eprintln!(
                "  sweep {rate:.0}/s, {} nodes: {}",
                options.nodes,
                r.latency.line()
            );
            cluster_on = crate::compare::sustained(&r, rate);
            if cluster_on {
                cluster_best = Some(rate);
            }
            step.cluster = Some(r);
        }
        steps.push(step);
    }
    let single_best = if options.baseline { single_best } else { None };
    Ok((steps, single_best, cluster_best))
}
