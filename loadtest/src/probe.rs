//! CPU and memory of a process, read from /proc: the server's (by pid) and the harness's own.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    rss_bytes: u64,
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

fn read(pid: u32) -> Result<Reading> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // The command name (field 2) may hold spaces; the fields after it are fixed.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> u64 { fields.get(n).and_then(|v| v.parse().ok()).unwrap_or(0) };
    // After ')': state is index 0, utime is field 14 of stat (index 11), stime index 12.
    let cpu_ticks = field(11) + field(12);
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64);
    Ok(Reading {
        at: Instant::now(),
        cpu_ticks,
        rss_bytes: pages * page,
    })
}

/// What a process used over a measured period.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// Average CPU over the period, in percent of one core.
    pub cpu_percent: f64,
    pub rss_start_bytes: u64,
    pub rss_end_bytes: u64,
    pub rss_peak_bytes: u64,
}

/// Samples a process every 250 ms between [`Probe::start`] and [`Probe::finish`].
pub struct Probe {
    first: Reading,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
    pid: u32,
}

impl Probe {
    pub fn start(pid: u32) -> Result<Self> {
        let first = read(pid)?;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(first.rss_bytes));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    match read(pid) {
                        Ok(r) => {
                            peak.fetch_max(r.rss_bytes, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(_) => return,
                    }
                }
            })
        };
        Ok(Self {
            first,
            peak,
            sampler,
            pid,
        })
    }

    pub fn finish(self) -> Usage {
        self.sampler.abort();
        let Ok(last) = read(self.pid) else {
            return Usage::default();
        };
        let seconds = last
            .at
            .duration_since(self.first.at)
            .as_secs_f64()
            .max(1e-3);
        let cpu = (last.cpu_ticks.saturating_sub(self.first.cpu_ticks)) as f64
            / ticks_per_second()
            / seconds;
        Usage {
            cpu_percent: cpu * 100.0,
            rss_start_bytes: self.first.rss_bytes,
            rss_end_bytes: last.rss_bytes,
            rss_peak_bytes: self
                .peak
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(last.rss_bytes),
        }
    }
}

/// Probes for the server (when its pid is known), the nodes of a cluster, and this process.
pub struct Probes {
    server: Option<Probe>,
    nodes: Vec<Probe>,
    harness: Option<Probe>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Usages {
    pub server: Option<Usage>,
    /// Each node of a cluster, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<Usage>,
    pub harness: Option<Usage>,
}

impl Probes {
    pub fn start(server_pid: Option<u32>, node_pids: &[u32]) -> Self {
        Self {
            server: server_pid.and_then(|p| Probe::start(p).ok()),
            nodes: node_pids
                .iter()
                .filter_map(|&p| Probe::start(p).ok())
                .collect(),
            harness: Probe::start(std::process::id()).ok(),
        }
    }

    pub fn finish(self) -> Usages {
        Usages {
            server: self.server.map(Probe::finish),
            nodes: self.nodes.into_iter().map(Probe::finish).collect(),
            harness: self.harness.map(Probe::finish),
        }
    }
}

/// The server's resident memory now.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    read(pid).ok().map(|r| r.rss_bytes)
}
