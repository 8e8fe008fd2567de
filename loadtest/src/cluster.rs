//! `loadtest cluster`: starts N engine nodes as one cluster on one PostgreSQL database, spreads
//! the clients of every document over them (client `i` on node `i mod N`, so most edits cross
//! a peer link), and measures fan-out latency; then the same load against a single node for
//! comparison, a second cluster run in which one node is killed (`kill -9`) to measure how
//! long until every pair of clients of a document exchanges edits again, and a rolling restart:
//! every node stopped (SIGTERM) and started again in turn under the load, counting which
//! clients were disconnected and how often, and reading every edit back from storage after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::compare::{psql, read_ready, stop_child};
use crate::report::{self, Latency};
use crate::scenario::{self, FanoutOptions, FanoutResult, Kill, Run};
use crate::target::{Kind, Target};

#[derive(clap::Args, Debug, Clone)]
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
    /// Restart every node in turn (SIGTERM, then a new process on the same ports) in a run of
    /// its own, the first this many seconds into it (0: no rolling restart).
    #[arg(long, default_value_t = 0.0)]
    pub restart_after_secs: f64,
    /// Seconds from one restarted node being live in every node's view to the next SIGTERM.
    #[arg(long, default_value_t = 5.0)]
    pub restart_gap_secs: f64,
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
    /// The engines' log filter (`SYNCHRONY_LOG`).
    #[arg(long, default_value = "warn")]
    pub node_log: String,
    /// Write each engine process's log to a file of its own here (`node-<n>-port-<port>.log`,
    /// numbered in start order) instead of this process's stderr.
    #[arg(long)]
    pub node_log_dir: Option<PathBuf>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolling_restart: Option<Rolling>,
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
    /// Its cluster arguments, to start it again as the same member.
    args: Vec<String>,
    dir: tempfile::TempDir,
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
        stop_child(&mut self.child).await;
    }

    /// Stops the process (SIGTERM) and starts a new one with the same arguments, ports and data
    /// directory.
    async fn restart(&mut self, options: &ClusterOptions, db: &str) -> Result<RestartTimes> {
        let stopping = Instant::now();
        let clean_exit = stop_child(&mut self.child).await;
        let stop_secs = stopping.elapsed().as_secs_f64();
        let starting = Instant::now();
        let (child, _, pid) = spawn(options, db, &self.args, self.port, self.dir.path())
            .await
            .with_context(|| format!("start the node on port {} again", self.port))?;
        (self.child, self.pid) = (child, pid);
        Ok(RestartTimes {
            clean_exit,
            stop_secs,
            starting,
        })
    }
}

struct RestartTimes {
    clean_exit: bool,
    stop_secs: f64,
    /// When the new process was started.
    starting: Instant,
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
    let (child, port, pid) = spawn(options, db, cluster, 0, dir.path()).await?;
    Ok(Node {
        child,
        pid,
        port,
        args: cluster.to_vec(),
        dir,
    })
}

/// Starts an engine process and waits for its ready line: (process, client port, pid).
async fn spawn(
    options: &ClusterOptions,
    db: &str,
    cluster: &[String],
    port: u16,
    dir: &Path,
) -> Result<(Child, u16, u32)> {
    let mut command = Command::new(engine(options)?);
    command
        .args(["serve", "--port", &port.to_string(), "--data-dir"])
        .arg(dir)
        .args(["--database-url", db])
        .args(cluster)
        .env_remove("SYNCHRONY_DATABASE_URL")
        .env("SYNCHRONY_LOG", &options.node_log)
        .stdout(Stdio::piped())
        .stderr(match &options.node_log_dir {
            None => Stdio::inherit(),
            Some(dir) => {
                static STARTED: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(0);
                let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = dir.join(format!("node-{n:03}-port-{port}.log"));
                Stdio::from(
                    std::fs::File::create(&path)
                        .with_context(|| format!("create {}", path.display()))?,
                )
            }
        })
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().context("start the engine")?;
    let (port, pid) = read_ready(&mut child, "synchrony").await?;
    Ok((child, port, pid))
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
    wait_live(&nodes).await?;
    Ok(nodes)
}

/// Waits until every node's view shows every node live.
async fn wait_live(nodes: &[Node]) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for node in nodes {
        loop {
            let url = format!("http://127.0.0.1:{}/synchrony/v1/cluster", node.port);
            let view = match crate::http::request("GET", &url, None, b"").await {
                Ok((200, body)) => serde_json::from_slice(&body)?,
                Ok((status, _)) => serde_json::json!({ "status": status }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            if view["live"].as_array().map(Vec::len) == Some(nodes.len()) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the nodes did not form a cluster of {} within 60 s: {view}",
                    nodes.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
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

/// A rolling restart under the fan-out load: what happened at each restart, and whether every
/// edit typed is in storage afterwards.
#[derive(Debug, Serialize)]
pub struct Rolling {
    pub fanout: FanoutResult,
    pub restarts: Vec<Restart>,
    /// Disconnections before the first SIGTERM (none expected).
    pub disconnects_before_first_restart: u64,
    /// Clients that could not connect again within their ~10 s of retries.
    pub clients_gave_up: u64,
    /// The most disconnections one client saw over the whole run (a client whose node stopped
    /// may have reconnected to a node restarted later).
    pub most_disconnects_of_one_client: u64,
    /// Whether the last node was live again before the load stopped typing.
    pub roll_within_load: bool,
    pub storage: StorageCheck,
    /// Edits a client never saw (at most 100), to tell a delivery still in flight at the end
    /// from one lost.
    pub unseen: Vec<Unseen>,
}

/// An edit one client of its document never saw.
#[derive(Debug, Serialize)]
pub struct Unseen {
    pub receiver: usize,
    pub sender: usize,
    pub seq: u64,
    /// When it was typed (from its mark in storage), seconds into the load.
    pub typed_at_secs: Option<f64>,
    /// The receiver's connections: (seconds, node, "up" or the close code).
    pub receiver_events: Vec<(f64, usize, String)>,
}

/// One node's restart, with what its clients and everyone else's saw (filled in by
/// [`account`]).
#[derive(Debug, Default, Serialize)]
pub struct Restart {
    /// 1-based, as printed.
    pub node: usize,
    /// Seconds into the load when SIGTERM was sent.
    pub sigterm_at_secs: f64,
    /// SIGTERM to the process's exit (it hands its documents over first).
    pub stop_secs: f64,
    /// Exited by itself with status 0.
    pub clean_exit: bool,
    /// New process started → ready to serve.
    pub ready_secs: f64,
    /// New process started → every node's view shows every node live.
    pub live_secs: f64,
    /// Clients connected to the node at the SIGTERM.
    pub clients: u64,
    /// Of those, disconnected exactly once before the next restart.
    pub disconnected_once: u64,
    pub disconnected_more_than_once: u64,
    pub not_disconnected: u64,
    /// Of its clients, those recorded as connecting to it only after the SIGTERM (a
    /// reconnection it accepted as the stop began, or one the busy harness noted late).
    pub joined_during_stop: u64,
    /// Disconnections of clients of other nodes in the same window (none expected).
    pub others_disconnected: u64,
    /// The close codes its clients saw ("none": no close frame came).
    pub close_codes: BTreeMap<String, u64>,
    /// Of its clients, how many reconnected to the restarted node itself (the rest went to
    /// another node, as a load balancer would send them while it was down).
    pub back_on_same_node: u64,
    /// Disconnection → synced again.
    pub time_to_reconnect: Latency,
}

/// Every document read back through a fresh node after the cluster stopped.
#[derive(Debug, Default, Serialize)]
pub struct StorageCheck {
    pub docs: usize,
    pub edits_typed: u64,
    pub edits_stored: u64,
    pub edits_missing: u64,
    pub docs_unreadable: u64,
    /// When each unseen edit was typed, µs into the load, by (sender, seq).
    #[serde(skip)]
    typed_at: std::collections::HashMap<(usize, u64), u64>,
}

impl Rolling {
    pub fn ok(&self) -> bool {
        self.roll_within_load
            && self.disconnects_before_first_restart == 0
            && self.clients_gave_up == 0
            && self.fanout.missing_deliveries == 0
            && self.fanout.unseen.is_empty()
            && self.storage.edits_missing == 0
            && self.storage.docs_unreadable == 0
            && self.restarts.iter().all(|r| {
                r.clean_exit
                    && r.disconnected_more_than_once == 0
                    && r.not_disconnected == 0
                    && r.others_disconnected == 0
            })
    }

    fn lines(&self) -> Vec<String> {
        let mut lines = report::fanout_lines(&self.fanout);
        for r in &self.restarts {
            let codes: Vec<String> = r
                .close_codes
                .iter()
                .map(|(code, n)| format!("{code} ×{n}"))
                .collect();
            lines.push(format!(
                "  node {}: SIGTERM at {:.1} s, exited in {:.2} s{}; new process ready in {:.2} s, live in every view in {:.2} s",
                r.node,
                r.sigterm_at_secs,
                r.stop_secs,
                if r.clean_exit { "" } else { " (NOT CLEANLY)" },
                r.ready_secs,
                r.live_secs
            ));
            lines.push(format!(
                "    its {} clients ({} of them recorded as joining after the SIGTERM): {} disconnected once ({}), {} more than once, {} not at all; {} back on it; reconnected in {}",
                r.clients,
                r.joined_during_stop,
                r.disconnected_once,
                codes.join(", "),
                r.disconnected_more_than_once,
                r.not_disconnected,
                r.back_on_same_node,
                r.time_to_reconnect.line()
            ));
            lines.push(format!(
                "    clients of other nodes disconnected meanwhile: {}",
                r.others_disconnected
            ));
        }
        lines.push(format!(
            "  disconnections before the first restart: {}; clients that gave up: {}; most disconnections of one client: {}{}",
            self.disconnects_before_first_restart,
            self.clients_gave_up,
            self.most_disconnects_of_one_client,
            if self.roll_within_load {
                ""
            } else {
                "; THE ROLL OUTLASTED THE LOAD (raise --duration-secs)"
            }
        ));
        for u in self.unseen.iter().take(10) {
            lines.push(format!(
                "  NOT SEEN: client {} never saw edit {} of client {} (typed at {}); its connections: {:?}",
                u.receiver,
                u.seq,
                u.sender,
                u.typed_at_secs.map_or("?".to_owned(), |t| format!("{t:.3} s")),
                u.receiver_events
            ));
        }
        let s = &self.storage;
        lines.push(format!(
            "  storage, read through a fresh node after the roll: {}/{} edits typed are stored (missing {}) in {} documents ({} unreadable)",
            s.edits_stored, s.edits_typed, s.edits_missing, s.docs, s.docs_unreadable
        ));
        lines
    }
}

/// The fan-out load over a fresh cluster while every node is restarted in turn.
async fn rolling(options: &ClusterOptions) -> Result<Rolling> {
    let db = Database::create(&options.postgres_url, "rolling", options.seed).await?;
    let result = rolling_on(options, &db.url).await;
    db.drop_now().await;
    result
}

async fn rolling_on(options: &ClusterOptions, db: &str) -> Result<Rolling> {
    let nodes = start_cluster(options, db).await?;
    let mut run = run_over(&nodes, options.seed + 2)?;
    // Restarted processes would drop out of the usage probes: no usage figures for this run.
    run.node_pids.clear();
    let (fanout, (nodes, log)) = scenario::fanout_during(&run, &options.fanout, None, {
        let (options, db) = (options.clone(), db.to_owned());
        move |epoch| roll(options, db, nodes, epoch)
    })
    .await?;
    for node in nodes {
        node.stop().await;
    }
    let log = log?;
    let storage = read_back(options, db, &run, &fanout).await?;
    let load_end = options.fanout.warmup_secs + options.fanout.duration_secs;
    let roll_within_load = log.len() == options.nodes
        && log
            .last()
            .is_some_and(|l| l.sigterm_at_secs + l.stop_secs + l.live_secs < load_end);
    Ok(account(fanout, log, roll_within_load, storage))
}

/// Restarts every node in turn, the first `restart_after_secs` after `epoch`; hands the nodes
/// back with what happened (an error once a node could not be started again).
async fn roll(
    options: ClusterOptions,
    db: String,
    mut nodes: Vec<Node>,
    epoch: Instant,
) -> (Vec<Node>, Result<Vec<Restart>>) {
    let mut log = Vec::new();
    let first = epoch + Duration::from_secs_f64(options.restart_after_secs);
    tokio::time::sleep_until(first.into()).await;
    for k in 0..nodes.len() {
        let sigterm_at_secs = epoch.elapsed().as_secs_f64();
        let times = match nodes[k].restart(&options, &db).await {
            Ok(t) => t,
            Err(e) => return (nodes, Err(e)),
        };
        let ready_secs = times.starting.elapsed().as_secs_f64();
        if let Err(e) = wait_live(&nodes).await {
            return (nodes, Err(e));
        }
        log.push(Restart {
            node: k + 1,
            sigterm_at_secs,
            stop_secs: times.stop_secs,
            clean_exit: times.clean_exit,
            ready_secs,
            live_secs: times.starting.elapsed().as_secs_f64(),
            ..Restart::default()
        });
        if k + 1 < nodes.len() {
            tokio::time::sleep(Duration::from_secs_f64(options.restart_gap_secs)).await;
        }
    }
    (nodes, Ok(log))
}

/// Splits the clients' connection events into one window per restart (from its SIGTERM to the
/// next) and counts who was disconnected in each.
fn account(
    fanout: FanoutResult,
    mut restarts: Vec<Restart>,
    roll_within_load: bool,
    storage: StorageCheck,
) -> Rolling {
    let clients = fanout.typed.len();
    let us = |secs: f64| (secs * 1e6) as u64;
    let first_sigterm = restarts.first().map_or(u64::MAX, |r| us(r.sigterm_at_secs));
    let mut node_of: Vec<Option<usize>> = vec![None; clients];
    let mut total_downs = vec![0u64; clients];
    let mut disconnects_before_first_restart = 0;
    let mut events = fanout.events.iter().peekable();
    // Applies one event to the clients' state.
    let mut apply = |e: &scenario::ConnEvent, node_of: &mut Vec<Option<usize>>| {
        if e.down.is_some() {
            node_of[e.client] = None;
            total_downs[e.client] += 1;
        } else {
            node_of[e.client] = Some(e.node);
        }
    };
    while let Some(e) = events.next_if(|e| e.at_us < first_sigterm) {
        disconnects_before_first_restart += u64::from(e.down.is_some());
        apply(e, &mut node_of);
    }
    let ends: Vec<u64> = restarts
        .iter()
        .skip(1)
        .map(|n| us(n.sigterm_at_secs))
        .chain([u64::MAX])
        .collect();
    for (r, end) in restarts.iter_mut().zip(ends) {
        // `node` counts from 1; events from 0.
        let k = r.node - 1;
        let mut on_it: Vec<bool> = node_of.iter().map(|n| *n == Some(k)).collect();
        let mut joined_during_stop = 0;
        let mut downs = vec![0u64; clients];
        let mut down_at: Vec<Option<u64>> = vec![None; clients];
        let mut back_on_same_node = 0;
        let mut others_disconnected = 0;
        let mut close_codes = BTreeMap::new();
        let mut reconnect = report::histogram();
        while let Some(e) = events.next_if(|e| e.at_us < end) {
            // A disconnection counts against the node whose connection dropped: a client whose
            // reconnection was accepted just before the SIGTERM may be recorded as up just
            // after it (the harness is busy), and is that node's client all the same.
            match e.down {
                Some(code) if e.node == k => {
                    if !on_it[e.client] {
                        on_it[e.client] = true;
                        joined_during_stop += 1;
                    }
                    downs[e.client] += 1;
                    down_at[e.client] = Some(e.at_us);
                    let code = code.map_or("none".to_owned(), |c| c.to_string());
                    *close_codes.entry(code).or_insert(0) += 1;
                }
                Some(_) => others_disconnected += 1,
                None => {
                    if let Some(at) = down_at[e.client].take() {
                        let _ = reconnect.record(e.at_us.saturating_sub(at).max(1));
                        back_on_same_node += u64::from(e.node == k);
                    }
                }
            }
            apply(e, &mut node_of);
        }
        let mine = |f: &dyn Fn(u64) -> bool| {
            (0..clients).filter(|&c| on_it[c] && f(downs[c])).count() as u64
        };
        r.clients = mine(&|_| true);
        r.disconnected_once = mine(&|d| d == 1);
        r.disconnected_more_than_once = mine(&|d| d > 1);
        r.not_disconnected = mine(&|d| d == 0);
        r.joined_during_stop = joined_during_stop;
        r.others_disconnected = others_disconnected;
        r.close_codes = close_codes;
        r.back_on_same_node = back_on_same_node;
        r.time_to_reconnect = Latency::of(&reconnect);
    }
    let unseen = fanout
        .unseen
        .iter()
        .take(100)
        .map(|&(receiver, sender, seq)| Unseen {
            receiver,
            sender,
            seq,
            typed_at_secs: storage
                .typed_at
                .get(&(sender, seq))
                .map(|&us| us as f64 / 1e6),
            receiver_events: fanout
                .events
                .iter()
                .filter(|e| e.client == receiver)
                .map(|e| {
                    let what = match e.down {
                        None => "up".to_owned(),
                        Some(None) => "down".to_owned(),
                        Some(Some(code)) => format!("closed {code}"),
                    };
                    (e.at_us as f64 / 1e6, e.node + 1, what)
                })
                .collect(),
        })
        .collect();
    Rolling {
        unseen,
        clients_gave_up: node_of.iter().filter(|n| n.is_none()).count() as u64,
        most_disconnects_of_one_client: total_downs.iter().copied().max().unwrap_or(0),
        disconnects_before_first_restart,
        roll_within_load,
        restarts,
        fanout,
        storage,
    }
}

/// Starts one node alone on the cluster's database and reads every document back: each
/// client's edits 1..=n must all be there.
async fn read_back(
    options: &ClusterOptions,
    db: &str,
    run: &Run,
    fanout: &FanoutResult,
) -> Result<StorageCheck> {
    use futures_util::StreamExt;
    let unseen: std::collections::HashSet<(usize, u64)> =
        fanout.unseen.iter().map(|&(_, s, q)| (s, q)).collect();
    let node = start_node(options, db, &[]).await?;
    let base = node.target()?.http_base().context("no HTTP base")?;
    let per_doc = options.fanout.clients;
    let docs = options.fanout.docs;
    let reads = futures_util::stream::iter(0..docs)
        .map(|d| {
            let url = format!(
                "{base}/v1/data/{}?format=text&name=content",
                scenario::fanout_doc(run, d)
            );
            async move { (d, crate::http::request("GET", &url, None, b"").await) }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    node.stop().await;
    let mut check = StorageCheck {
        docs,
        ..StorageCheck::default()
    };
    for (d, read) in reads {
        let typed = &fanout.typed[d * per_doc..(d + 1) * per_doc];
        check.edits_typed += typed.iter().sum::<u64>();
        let text = match read {
            Ok((200, body)) => body,
            _ => {
                check.docs_unreadable += 1;
                continue;
            }
        };
        let mut found = vec![std::collections::BTreeSet::new(); per_doc];
        for (at, sender, seq) in scenario::marks(&text) {
            if sender < per_doc && (1..=typed[sender]).contains(&seq) {
                found[sender].insert(seq);
                let global = d * per_doc + sender;
                if unseen.contains(&(global, seq)) {
                    check.typed_at.insert((global, seq), at);
                }
            }
        }
        check.edits_stored += found.iter().map(|f| f.len() as u64).sum::<u64>();
    }
    check.edits_missing = check.edits_typed - check.edits_stored;
    Ok(check)
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
    if options.rounds == 0
        && options.sweep_rates.is_empty()
        && options.kill_after_secs <= 0.0
        && options.restart_after_secs <= 0.0
    {
        bail!("nothing to run: --rounds 0 without --sweep-rates, --kill-after-secs or --restart-after-secs");
    }
    for (name, secs) in [
        ("--kill-after-secs", options.kill_after_secs),
        ("--restart-after-secs", options.restart_after_secs),
        ("--restart-gap-secs", options.restart_gap_secs),
    ] {
        if !(secs.is_finite() && secs >= 0.0) {
            bail!("{name} must be a number of seconds, 0 or more (got {secs})");
        }
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

    let rolling_restart = if options.restart_after_secs > 0.0 {
        let result = rolling(&options).await?;
        lines.push(format!(
            "{} nodes restarted in turn from {:.1} s in, {:.1} s apart:",
            options.nodes, options.restart_after_secs, options.restart_gap_secs
        ));
        lines.extend(result.lines());
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
            .is_none_or(|f| f.recovered == f.pairs)
        && rolling_restart.as_ref().is_none_or(Rolling::ok);
    let result = ClusterResult {
        nodes: options.nodes,
        node_threads: threads,
        rounds,
        single_node_p99_ms,
        cluster_p99_ms,
        failover,
        rolling_restart,
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
            reconnect_home_attempts: options.fanout.reconnect_home_attempts,
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
