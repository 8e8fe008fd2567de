//! Keeps an engine process running for a host, as Confluence does for Synchrony, with what
//! Confluence lacks: restarts back off exponentially with jitter (reset after a stable period),
//! a crash loop is detected and reported, and stopping is bounded.
//!
//! The supervisor starts the child with `synchrony.watch.pid` set to its own pid (so the engine
//! dies with it), reads the child's stdout for the `{"event":"ready"}` line to learn its URL,
//! forwards every line to its own stdout, and polls `{url}/heartbeat` every 3 s. A child that
//! does not answer "OK" within the 30 s budget, at start or later, is killed and restarted.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;

/// How to run and watch the child.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Added to the child's environment (Synchrony's dotted keys work here).
    pub env: Vec<(String, String)>,
    pub heartbeat_interval: Duration,
    /// How long the heartbeat may fail, at start or later, before the child is restarted.
    pub heartbeat_budget: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A child that ran this long without trouble resets the backoff.
    pub stable_after: Duration,
    /// This many unexpected exits within `crash_loop_window` is a crash loop.
    pub crash_loop_exits: usize,
    pub crash_loop_window: Duration,
    /// SIGTERM, then SIGKILL after this long.
    pub stop_timeout: Duration,
}

impl SupervisorConfig {
    pub fn new(program: impl Into<PathBuf>, args: Vec<String>) -> Self {
        Self {
            program: program.into(),
            args,
            env: Vec::new(),
            heartbeat_interval: Duration::from_secs(3),
            heartbeat_budget: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(120),
            crash_loop_exits: 5,
            crash_loop_window: Duration::from_secs(300),
            stop_timeout: Duration::from_secs(25),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Starting,
    Running,
    /// Waiting before the next restart.
    Backoff,
    Stopping,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub at_ms: u64,
}

/// What the supervisor reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub state: State,
    pub pid: Option<u32>,
    pub url: Option<String>,
    /// Restarts after unexpected exits or failed heartbeats.
    pub restarts: u64,
    pub last_exit: Option<ExitInfo>,
    /// Too many unexpected exits in the window; restarts go on at the longest backoff.
    pub crash_loop: bool,
    /// Why the last restart happened.
    pub last_problem: Option<String>,
}

/// A running supervisor.
pub struct Supervisor {
    status: watch::Receiver<Status>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ExitInfo {
    fn of(exit: Option<std::process::ExitStatus>) -> Self {
        Self {
            code: exit.and_then(|e| e.code()),
            signal: exit.and_then(|e| std::os::unix::process::ExitStatusExt::signal(&e)),
            at_ms: crate::util::clock::unix_ms().unsigned_abs(),
        }
    }

    /// How the child ended, in words: "exited with code 3", "killed by signal 9 (SIGKILL)".
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => match nix::sys::signal::Signal::try_from(signal) {
                Ok(name) => format!("killed by signal {signal} ({name})"),
                Err(_) => format!("killed by signal {signal}"),
            },
            (None, None) => "ended, status unknown".to_owned(),
        }
    }
}

/// Changes the status, telling subscribers only when something changed.
fn update(status: &watch::Sender<Status>, change: impl FnOnce(&mut Status)) {
    status.send_if_modified(|s| {
        let before = s.clone();
        change(s);
        *s != before
    });
}

impl Supervisor {
    /// Starts the child and keeps it running until [`Supervisor::stop`].
    pub fn start(config: SupervisorConfig) -> Self {
        let initial = Status {
            state: State::Starting,
            pid: None,
            url: None,
            restarts: 0,
            last_exit: None,
            crash_loop: false,
            last_problem: None,
        };
        let (tx, rx) = watch::channel(initial);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(config, tx, stop.clone()));
        Self {
            status: rx,
            stop,
            task,
        }
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Every status change.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Asks the supervisor to stop the child (SIGTERM, then SIGKILL after the stop timeout);
    /// the status goes through `stopping` to `stopped`, and the subscription then ends.
    pub fn request_stop(&self) {
        self.stop.cancel();
    }

    /// Stops the child and returns the last status.
    pub async fn stop(self) -> Status {
        self.stop.cancel();
        let _ = self.task.await;
        self.status.borrow().clone()
    }
}

enum Outcome {
    Stopped,
    Exited(ExitInfo),
    Unhealthy(String),
}

async fn run(config: SupervisorConfig, status: watch::Sender<Status>, stop: CancellationToken) {
    let mut failures: Vec<Instant> = Vec::new();
    let mut streak: u32 = 0;
    loop {
        update(&status, |s| {
            s.state = State::Starting;
            s.pid = None;
            s.url = None;
        });
        let started = Instant::now();
        let outcome = match spawn(&config) {
            Ok(child) => supervise_one(&config, child, &status, &stop).await,
            Err(error) => Outcome::Unhealthy(format!(
                "cannot start {}: {error}",
                config.program.display()
            )),
        };
        let (problem, exit) = match outcome {
            Outcome::Stopped => {
                update(&status, |s| {
                    s.state = State::Stopped;
                    s.pid = None;
                });
                return;
            }
            Outcome::Exited(exit) => (format!("engine {}", exit.describe()), Some(exit)),
            Outcome::Unhealthy(reason) => (reason, None),
        };
        tracing::warn!(problem = %problem, "engine needs a restart");
        let now = Instant::now();
        streak = if now.duration_since(started) >= config.stable_after {
            0
        } else {
            streak + 1
        };
        failures.retain(|t| now.duration_since(*t) < config.crash_loop_window);
        failures.push(now);
        let crash_loop = failures.len() >= config.crash_loop_exits;
        if crash_loop {
            tracing::error!(
                exits = failures.len(),
                window_secs = config.crash_loop_window.as_secs(),
                "engine is crash-looping"
            );
        }
        let base = config
            .backoff_initial
            .saturating_mul(1u32 << streak.min(16))
            .min(config.backoff_max);
        let base = if crash_loop { config.backoff_max } else { base };
        // Jitter in [0.5, 1.5) so that many hosts do not restart in lock step.
        let delay = base.mul_f64(0.5 + rand_unit());
        // One change: a subscriber never sees the dead child's pid as running.
        update(&status, |s| {
            s.state = State::Backoff;
            s.pid = None;
            if exit.is_some() {
                s.last_exit = exit;
            }
            s.restarts += 1;
            s.crash_loop = crash_loop;
            s.last_problem = Some(problem);
        });
        tokio::select! {
            _ = sleep(delay) => {}
            _ = stop.cancelled() => {
                update(&status, |s| s.state = State::Stopped);
                return;
            }
        }
    }
}

/// A uniform number in [0, 1) from the clock and a counter: jitter needs no better randomness.
fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::util::clock::unix_ms().unsigned_abs());
    (h.finish() % 10_000) as f64 / 10_000.0
}

fn spawn(config: &SupervisorConfig) -> std::io::Result<Child> {
    let mut command = Command::new(&config.program);
    command
        .args(&config.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if !config
        .env
        .iter()
        .any(|(k, _)| k == "synchrony.watch.pid" || k == "SYNCHRONY_WATCH_PID")
    {
        command.env("synchrony.watch.pid", std::process::id().to_string());
    }
    for (k, v) in &config.env {
        command.env(k, v);
    }
    command.spawn()
}

async fn supervise_one(
    config: &SupervisorConfig,
    mut child: Child,
    status: &watch::Sender<Status>,
    stop: &CancellationToken,
) -> Outcome {
    let pid = child.id();
    update(status, |s| s.pid = pid);
    let (url_tx, mut url_rx) = watch::channel(None::<String>);
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(forward_stdout(stdout, url_tx));
    }
    let mut last_ok = Instant::now();
    let mut every = tokio::time::interval(config.heartbeat_interval);
    let mut running = false;
    // Ends when the child's stdout closes; the exit is reaped by `wait` below.
    let mut url_open = true;
    loop {
        tokio::select! {
            exit = child.wait() => return Outcome::Exited(ExitInfo::of(exit.ok())),
            _ = stop.cancelled() => {
                update(status, |s| s.state = State::Stopping);
                let exit = terminate(&mut child, config.stop_timeout).await;
                update(status, |s| s.last_exit = Some(exit));
                return Outcome::Stopped;
            }
            changed = url_rx.changed(), if url_open => {
                if changed.is_err() {
                    url_open = false;
                    continue;
                }
                let url = url_rx.borrow().clone();
                update(status, |s| s.url = url);
            }
            _ = every.tick() => {
                let url = url_rx.borrow().clone();
                let healthy = match &url {
                    Some(url) => heartbeat(url).await,
                    None => false,
                };
                if healthy {
                    last_ok = Instant::now();
                    if !running {
                        running = true;
                        update(status, |s| s.state = State::Running);
                    }
                } else if last_ok.elapsed() > config.heartbeat_budget {
                    let _ = child.kill().await;
                    let _ = child.wait().await;
                    return Outcome::Unhealthy(format!(
                        "no heartbeat for {} s",
                        config.heartbeat_budget.as_secs()
                    ));
                }
            }
        }
    }
}

/// SIGTERM, wait, then SIGKILL.
async fn terminate(child: &mut Child, grace: Duration) -> ExitInfo {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let exit = match timeout(grace, child.wait()).await {
        Ok(exit) => exit.ok(),
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "engine did not stop in time; killing it"
            );
            let _ = child.kill().await;
            child.wait().await.ok()
        }
    };
    ExitInfo::of(exit)
}

/// Copies the child's stdout to ours and picks the URL out of its ready line.
async fn forward_stdout(stdout: tokio::process::ChildStdout, url: watch::Sender<Option<String>>) {
    let mut lines = BufReader::new(stdout).lines();
    let mut out = tokio::io::stdout();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
            if event["event"] == "ready" {
                if let Some(u) = event["url"].as_str() {
                    let _ = url.send(Some(u.to_owned()));
                }
            }
        }
        // One write per line, so that lines from other writers never land inside it.
        let _ = out.write_all(format!("{line}\n").as_bytes()).await;
        let _ = out.flush().await;
    }
}

/// `GET {url}/heartbeat` answers 200 "OK" within 2 s. Plain HTTP/1.1: the engine is local.
pub async fn heartbeat(base: &str) -> bool {
    let Ok(url) = url::Url::parse(&format!("{}/heartbeat", base.trim_end_matches('/'))) else {
        return false;
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return false;
    };
    let request = async {
        let mut stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .ok()?;
        let head = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
            url.path()
        );
        stream.write_all(head.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response);
        Some(text.starts_with("HTTP/1.1 200") && text.ends_with("OK"))
    };
    matches!(
        timeout(Duration::from_secs(2), request).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn quick(program: &str, args: &[&str]) -> SupervisorConfig {
        let mut c = SupervisorConfig::new(program, args.iter().map(|a| a.to_string()).collect());
        c.heartbeat_interval = Duration::from_millis(50);
        c.heartbeat_budget = Duration::from_millis(300);
        c.backoff_initial = Duration::from_millis(10);
        c.backoff_max = Duration::from_millis(40);
        c.crash_loop_exits = 3;
        c.stop_timeout = Duration::from_secs(2);
        c
    }

    #[tokio::test]
    async fn a_child_that_keeps_dying_is_restarted_and_reported_as_crash_looping() {
        let supervisor = Supervisor::start(quick("/bin/sh", &["-c", "exit 3"]));
        let mut status = supervisor.subscribe();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !status.borrow().crash_loop {
            assert!(Instant::now() < deadline, "no crash loop reported");
            let _ = timeout(Duration::from_millis(200), status.changed()).await;
        }
        let s = supervisor.stop().await;
        assert!(s.restarts >= 3);
        assert_eq!(s.last_exit.unwrap().code, Some(3));
        assert_eq!(s.state, State::Stopped);
    }

    #[tokio::test]
    async fn a_child_without_a_heartbeat_is_restarted_and_stop_is_bounded() {
        // Prints no ready line and ignores SIGTERM: restarted for lack of heartbeat, killed on stop.
        let supervisor = Supervisor::start(quick("/bin/sh", &["-c", "trap '' TERM; sleep 60"]));
        let mut status = supervisor.subscribe();
        let deadline = Instant::now() + Duration::from_secs(20);
        while status.borrow().restarts == 0 {
            assert!(Instant::now() < deadline, "never restarted");
            let _ = timeout(Duration::from_millis(200), status.changed()).await;
        }
        assert!(supervisor
            .status()
            .last_problem
            .unwrap()
            .contains("no heartbeat"));
        let started = Instant::now();
        let s = supervisor.stop().await;
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(s.state, State::Stopped);
    }
}
