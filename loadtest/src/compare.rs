//! `loadtest compare`: the same scenarios against each server, one server at a time, on loopback.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::report::{self, mib, Latency};
use crate::scenario::{self, *};
use crate::target::{Kind, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Seconds: the test suite's check that the harness works.
    Tiny,
    /// A few minutes: smaller sizes.
    Quick,
    /// The sizes of the performance targets (about 15 minutes).
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerName {
    SynchronySqlite,
    SynchronyPostgres,
    YWebsocket,
    Hocuspocus,
}

#[derive(clap::Args, Debug)]
pub struct CompareOptions {
    #[arg(long, value_enum, default_value = "full")]
    profile: Profile,
    /// Servers to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "synchrony-sqlite,synchrony-postgres,y-websocket,hocuspocus"
    )]
    servers: Vec<ServerName>,
    /// Results folder (default: loadtest/results/<unix time>).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// The engine binary (default: `synchrony` beside this binary).
    #[arg(long)]
    engine: Option<PathBuf>,
    /// PostgreSQL server for the engine; a fresh database is created on it and dropped after.
    #[arg(
        long,
        env = "SYNCHRONY_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// Trace for the trace scenario (default: ../shared/data/traces/automerge-paper.json.gz;
    /// friendsforever in the quick profile). Missing: the trace scenarios are skipped.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Trace whose final state the cold-load scenario stores (default: the automerge paper).
    #[arg(long)]
    cold_trace: Option<PathBuf>,
    /// Where the peers' package.json is (npm ci runs there when node_modules is missing).
    #[arg(long)]
    peers_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

struct Sizes {
    fanout: FanoutOptions,
    sweep_rates: Vec<f64>,
    sweep: FanoutOptions,
    idle: IdleOptions,
    storm: JoinStormOptions,
    trace_clients: usize,
    cold_repeat: usize,
}

fn sizes(profile: Profile) -> Sizes {
    let fanout = |docs, clients, rate, warmup_secs, duration_secs, drain_secs| FanoutOptions {
        docs,
        clients,
        rate,
        warmup_secs,
        duration_secs,
        drain_secs,
        reconnect_home_attempts: 1,
    };
    match profile {
        Profile::Tiny => Sizes {
            fanout: fanout(2, 3, 30.0, 0.5, 1.5, 1.0),
            sweep_rates: vec![20.0, 40.0],
            sweep: fanout(2, 3, 0.0, 0.3, 1.0, 0.5),
            idle: IdleOptions {
                connections: 20,
                per_doc: 5,
                hold_secs: 1.0,
            },
            storm: JoinStormOptions {
                clients: 5,
                doc_bytes: 100_000,
            },
            trace_clients: 2,
            cold_repeat: 2,
        },
        Profile::Quick => Sizes {
            fanout: fanout(100, 10, 1000.0, 3.0, 10.0, 2.0),
            sweep_rates: vec![1000.0, 2000.0, 4000.0, 8000.0, 16000.0],
            sweep: fanout(50, 10, 0.0, 2.0, 6.0, 2.0),
            idle: IdleOptions {
                connections: 2000,
                per_doc: 10,
                hold_secs: 5.0,
            },
            storm: JoinStormOptions {
                clients: 50,
                doc_bytes: 1_000_000,
            },
            trace_clients: 3,
            cold_repeat: 3,
        },
        Profile::Full => Sizes {
            fanout: fanout(1000, 10, 5000.0, 5.0, 20.0, 3.0),
            sweep_rates: vec![
                2000.0, 3000.0, 4500.0, 6750.0, 10000.0, 15000.0, 22500.0, 34000.0,
            ],
            sweep: fanout(100, 10, 0.0, 3.0, 10.0, 2.0),
            idle: IdleOptions {
                connections: 10_000,
                per_doc: 10,
                hold_secs: 10.0,
            },
            storm: JoinStormOptions {
                clients: 200,
                doc_bytes: 5_000_000,
            },
            trace_clients: 3,
            cold_repeat: 5,
        },
    }
}

/// The sweep's bar: the highest rate whose p99 stays within this, with nothing lost.
const SWEEP_P99_MS: f64 = 50.0;

/// Whether a fan-out run at `rate` kept up: p99 within [`SWEEP_P99_MS`], every edit delivered,
/// no error, and at least 90 % of the rate actually sent.
pub fn sustained(r: &FanoutResult, rate: f64) -> bool {
    r.errors == 0
        && r.missing_deliveries == 0
        && r.latency.p99_ms <= SWEEP_P99_MS
        && r.updates_in_per_sec >= 0.9 * rate
}

#[derive(Debug, Serialize, Default)]
struct ServerResults {
    server: String,
    fanout: Option<FanoutResult>,
    sweep: Vec<FanoutResult>,
    /// Highest swept rate with p99 ≤ 50 ms, no errors and no missing deliveries.
    max_rate_p99_50ms: Option<f64>,
    idle: Option<IdleResult>,
    join_storm: Option<JoinStormResult>,
    trace: Option<TraceResult>,
    cold_load: Option<ColdLoadResult>,
    /// Scenarios that failed or were skipped, with why.
    problems: Vec<String>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A server started for the comparison; killed when dropped.
struct Server {
    target: Target,
    pid: u32,
    child: Child,
    _dir: tempfile::TempDir,
    database: Option<(String, String)>,
}

pub(crate) async fn read_ready(child: &mut Child, what: &str) -> Result<(u16, u32)> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["event"] == "ready" {
                    let port = v["port"].as_u64().context("ready line without port")? as u16;
                    let pid = v["pid"].as_u64().context("ready line without pid")? as u32;
                    // Keep draining stdout so the server never blocks on it.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return Ok((port, pid));
                }
            }
        }
        bail!("{what} exited before it was ready")
    })
    .await
    .map_err(|_| anyhow!("{what} not ready within 60 s"))??;
    Ok(ready)
}

/// SIGTERM, then SIGKILL if the process has not exited within 30 s. True when it exited by
/// itself with status 0. A process already reaped is not signalled (its pid may be another's).
pub(crate) async fn stop_child(child: &mut Child) -> bool {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(status) => status.is_ok_and(|s| s.success()),
        Err(_) => {
            let _ = child.kill().await;
            false
        }
    }
}

pub(crate) async fn psql(admin_url: &str, sql: &str) -> Result<()> {
    let out = Command::new("psql")
        .args([admin_url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .await
        .context("psql (PostgreSQL's client) is needed for the PostgreSQL run")?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Server {
    fn kind(name: ServerName) -> Kind {
        match name {
            ServerName::SynchronySqlite | ServerName::SynchronyPostgres => Kind::Synchrony,
            ServerName::YWebsocket => Kind::YWebsocket,
            ServerName::Hocuspocus => Kind::Hocuspocus,
        }
    }

    async fn start(
        name: ServerName,
        options: &CompareOptions,
        peers: &Path,
        doc_idle_secs: Option<u32>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut database = None;
        let mut command = match name {
            ServerName::SynchronySqlite | ServerName::SynchronyPostgres => {
                let engine = match &options.engine {
                    Some(p) => p.clone(),
                    None => std::env::current_exe()?
                        .parent()
                        .context("no binary directory")?
                        .join("synchrony"),
                };
                let mut c = Command::new(engine);
                c.args(["serve", "--port", "0", "--data-dir"])
                    .arg(dir.path())
                    .env_remove("SYNCHRONY_DATABASE_URL")
                    .env("SYNCHRONY_LOG", "warn");
                if let Some(secs) = doc_idle_secs {
                    c.args(["--doc-idle-secs", &secs.to_string()]);
                }
                if name == ServerName::SynchronyPostgres {
                    let db = format!("loadtest_{}_{}", std::process::id(), options.seed);
                    psql(
                        &options.postgres_url,
                        &format!("DROP DATABASE IF EXISTS {db}"),
                    )
                    .await?;
                    psql(&options.postgres_url, &format!("CREATE DATABASE {db}")).await?;
                    let (base, _) = options
                        .postgres_url
                        .rsplit_once('/')
                        .context("PostgreSQL URL without a database")?;
                    c.args(["--database-url", &format!("{base}/{db}")]);
                    database = Some((options.postgres_url.clone(), db));
                }
                c
            }
            ServerName::YWebsocket | ServerName::Hocuspocus => {
                let script = if name == ServerName::YWebsocket {
                    "y-websocket.mjs"
                } else {
                    "hocuspocus.mjs"
                };
                let mut c = Command::new("node");
                c.arg(peers.join(script));
                c
            }
        };
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {name:?}"))?;
        let (port, pid) = read_ready(&mut child, &format!("{name:?}")).await?;
        let kind = Self::kind(name);
        let base = match kind {
            Kind::Synchrony => format!("ws://127.0.0.1:{port}/synchrony"),
            Kind::YWebsocket | Kind::Hocuspocus => format!("ws://127.0.0.1:{port}"),
        };
        Ok(Self {
            target: Target::new(kind, &base, None)?,
            pid,
            child,
            _dir: dir,
            database,
        })
    }

    async fn stop(mut self) {
        stop_child(&mut self.child).await;
        if let Some((admin, db)) = &self.database {
            let _ = psql(admin, &format!("DROP DATABASE IF EXISTS {db}")).await;
        }
    }
}

fn label(name: ServerName) -> &'static str {
    match name {
        ServerName::SynchronySqlite => "synchrony (SQLite)",
        ServerName::SynchronyPostgres => "synchrony (PostgreSQL)",
        ServerName::YWebsocket => "@y/websocket-server 0.1.1",
        ServerName::Hocuspocus => "@hocuspocus/server 4.7.0",
    }
}

async fn ensure_peers(dir: &Path) -> Result<()> {
    if dir.join("node_modules").exists() {
        return Ok(());
    }
    eprintln!("loadtest: npm ci in {}", dir.display());
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .status()
        .await
        .context("npm (Node.js 20) is needed to start the peers")?;
    if !status.success() {
        bail!("npm ci failed in {}", dir.display());
    }
    Ok(())
}

pub async fn run(options: CompareOptions) -> Result<bool> {
    synchrony::raise_open_file_limit();
    let root = workspace_root();
    let peers = options
        .peers_dir
        .clone()
        .unwrap_or_else(|| root.join("loadtest/peers"));
    if options
        .servers
        .iter()
        .any(|s| matches!(s, ServerName::YWebsocket | ServerName::Hocuspocus))
    {
        ensure_peers(&peers).await?;
    }
    let traces = root.join("../shared/data/traces");
    let trace = options.trace.clone().unwrap_or_else(|| {
        traces.join(if options.profile == Profile::Quick {
            "friendsforever_flat.json.gz"
        } else {
            "automerge-paper.json.gz"
        })
    });
    let cold_trace = options
        .cold_trace
        .clone()
        .unwrap_or_else(|| traces.join("automerge-paper.json.gz"));
    let out = options.out_dir.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        root.join("loadtest/results").join(now.to_string())
    });
    std::fs::create_dir_all(&out)?;
    let sizes = sizes(options.profile);
    let mut all = Vec::new();
    let mut seed = options.seed;
    let mut next_seed = || {
        seed += 1;
        seed
    };
    for &name in &options.servers {
        eprintln!("loadtest: {}", label(name));
        let kind = Server::kind(name);
        let mut results = ServerResults {
            server: label(name).into(),
            ..Default::default()
        };
        // Every scenario (and every rate of the sweep) gets a freshly started server, so none
        // measures what the one before it left behind (memory, unloads, compactions).
        let fresh = |doc_idle_secs: Option<u32>, seed: u64| {
            let (options, peers) = (&options, &peers);
            async move {
                let server = Server::start(name, options, peers, doc_idle_secs).await?;
                let run = scenario::Run::new(server.target.clone(), Some(server.pid), seed);
                Ok::<_, anyhow::Error>((server, run))
            }
        };
        // Runs one scenario on a fresh server; failures become problems. With `$lines`, the
        // result's summary lines are printed.
        macro_rules! scenario {
            ($what:expr, $doc_idle:expr, $call:expr, $lines:expr) => {{
                let outcome = scenario!($what, $doc_idle, $call);
                if let Some(r) = &outcome {
                    $lines(r).iter().for_each(|l: &String| eprintln!("{l}"));
                }
                outcome
            }};
            ($what:expr, $doc_idle:expr, $call:expr) => {{
                let outcome = match fresh($doc_idle, next_seed()).await {
                    Ok((server, run)) => {
                        let outcome = $call(run).await;
                        server.stop().await;
                        outcome
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = &outcome {
                    eprintln!("loadtest: {} {}: {e:#}", label(name), $what);
                    results.problems.push(format!("{}: {e:#}", $what));
                }
                outcome.ok()
            }};
        }

        let opts = sizes.fanout.clone();
        results.fanout = scenario!(
            "fanout",
            None,
            |run: scenario::Run| async move { scenario::fanout(&run, &opts).await },
            report::fanout_lines
        );
        for rate in sizes.sweep_rates.clone() {
            let opts = FanoutOptions {
                rate,
                ..sizes.sweep.clone()
            };
            let what = format!("sweep at {rate}/s");
            let Some(r) = scenario!(what, None, |run: scenario::Run| async move {
                scenario::fanout(&run, &opts).await
            }) else {
                break;
            };
            let sustained = sustained(&r, rate);
            eprintln!(
                "  sweep {rate:.0}/s: {} sustained={sustained}",
                r.latency.line()
            );
            results.sweep.push(r);
            if !sustained {
                break;
            }
            results.max_rate_p99_50ms = Some(rate);
        }
        let opts = sizes.idle.clone();
        results.idle = scenario!(
            "idle",
            None,
            |run: scenario::Run| async move { scenario::idle(&run, &opts).await },
            report::idle_lines
        );
        let opts = sizes.storm.clone();
        results.join_storm = scenario!(
            "join-storm",
            None,
            |run: scenario::Run| async move { scenario::join_storm(&run, &opts).await },
            report::join_storm_lines
        );
        if trace.exists() {
            let opts = TraceOptions {
                trace: trace.clone(),
                clients: sizes.trace_clients,
            };
            results.trace = scenario!(
                "trace",
                None,
                |run: scenario::Run| async move { scenario::trace(&run, &opts).await },
                report::trace_lines
            );
            if let Some(r) = &results.trace {
                if !r.clients_exact || r.storage_exact == Some(false) {
                    results.problems.push("trace: final content differs".into());
                }
            }
        } else {
            results
                .problems
                .push(format!("trace: skipped, {} is absent", trace.display()));
        }
        if kind == Kind::Synchrony {
            if cold_trace.exists() {
                let opts = ColdLoadOptions {
                    trace: cold_trace.clone(),
                    repeat: sizes.cold_repeat,
                };
                // Documents unload a second after their last client leaves, so every join
                // after the first loads from storage again.
                results.cold_load = scenario!(
                    "cold-load",
                    Some(1),
                    |run: scenario::Run| async move { scenario::cold_load(&run, &opts).await },
                    report::cold_load_lines
                );
            } else {
                results.problems.push(format!(
                    "cold-load: skipped, {} is absent",
                    cold_trace.display()
                ));
            }
        }
        all.push(results);
    }
    write_results(&out, options.profile, &all)?;
    println!("{}", std::fs::read_to_string(out.join("summary.md"))?);
    eprintln!("loadtest: results in {}", out.display());
    Ok(all
        .iter()
        .all(|r| r.problems.iter().all(|p| p.contains("skipped"))))
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    format!("{cores} cores ({cpu}), {mem} RAM")
}

fn write_results(out: &Path, profile: Profile, all: &[ServerResults]) -> Result<()> {
    let json = serde_json::json!({ "profile": profile, "machine": machine(), "servers": all });
    std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(&json)?)?;
    let fanout: Vec<(String, &Latency)> = all
        .iter()
        .filter_map(|r| r.fanout.as_ref().map(|f| (r.server.clone(), &f.latency)))
        .collect();
    report::plot(
        &out.join("fanout-latency.svg"),
        "fanout: edit → delivery latency",
        &fanout,
    )?;
    let storm: Vec<(String, &Latency)> = all
        .iter()
        .filter_map(|r| {
            r.join_storm
                .as_ref()
                .map(|j| (r.server.clone(), &j.time_to_sync))
        })
        .collect();
    report::plot(
        &out.join("join-storm.svg"),
        "join storm: time until synced",
        &storm,
    )?;
    std::fs::write(out.join("summary.md"), summary(profile, all))?;
    Ok(())
}

fn summary(profile: Profile, all: &[ServerResults]) -> String {
    let na = || "–".to_string();
    let mut s = String::new();
    let f = all
        .iter()
        .find_map(|r| r.fanout.as_ref().map(|f| f.options.clone()));
    s.push_str(&format!("Profile `{profile:?}` on {}.\n", machine()));
    if let Some(f) = f {
        s.push_str(&format!(
            "Fanout: {} documents × {} clients, {:.0} updates/s in total, {:.0} s measured after {:.0} s of warm-up. ",
            f.docs, f.clients, f.rate, f.duration_secs, f.warmup_secs
        ));
    }
    s.push_str("The load generator runs on the same cores as the server; its own CPU is in the last column.\n\n");
    s.push_str("| server | fanout p50 / p99 / p99.9 ms | lost / errors | max rate at p99 ≤ 50 ms | idle RSS per conn | idle CPU | join storm: all synced | trace | cold load | server CPU (fanout) | harness CPU (fanout) |\n");
    s.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for r in all {
        let fanout = r.fanout.as_ref();
        let cpu =
            |u: Option<crate::probe::Usage>| u.map_or(na(), |u| format!("{:.0}%", u.cpu_percent));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.server,
            fanout.map_or(na(), |f| format!(
                "{:.1} / {:.1} / {:.1}",
                f.latency.p50_ms, f.latency.p99_ms, f.latency.p999_ms
            )),
            fanout.map_or(na(), |f| format!("{} / {}", f.missing_deliveries, f.errors)),
            r.max_rate_p99_50ms.map_or(na(), |x| format!("{x:.0}/s")),
            r.idle
                .as_ref()
                .and_then(|i| i.server_bytes_per_connection)
                .map_or(na(), |b| format!("{:.1} KiB", b / 1024.0)),
            r.idle.as_ref().map_or(na(), |i| cpu(i.usage.server)),
            r.join_storm
                .as_ref()
                .map_or(na(), |j| format!("{:.2} s", j.all_synced_secs)),
            r.trace.as_ref().map_or(na(), |t| format!(
                "{:.0} upd/s{}",
                t.updates_per_sec,
                if t.clients_exact && t.storage_exact != Some(false) {
                    ", exact"
                } else {
                    ", WRONG"
                }
            )),
            r.cold_load
                .as_ref()
                .map_or(na(), |c| format!("{:.1} ms", c.median_ms)),
            fanout.map_or(na(), |f| cpu(f.usage.server)),
            fanout.map_or(na(), |f| cpu(f.usage.harness)),
        ));
    }
    let problems: Vec<String> = all
        .iter()
        .flat_map(|r| {
            r.problems
                .iter()
                .map(move |p| format!("- {}: {p}", r.server))
        })
        .collect();
    if !problems.is_empty() {
        s.push_str("\nNotes:\n");
        s.push_str(&problems.join("\n"));
        s.push('\n');
    }
    let peak: Vec<String> = all
        .iter()
        .filter_map(|r| {
            r.idle.as_ref().and_then(|i| {
                i.server_rss_after_bytes
                    .map(|b| format!("{} {:.0} MiB", r.server, mib(b)))
            })
        })
        .collect();
    if !peak.is_empty() {
        s.push_str(&format!(
            "\nServer RSS with the idle connections: {}.\n",
            peak.join(", ")
        ));
    }
    s
}
