//! The integration harness: starts real engine processes, private PostgreSQL databases and real
//! JavaScript clients, and stops everything it started when dropped.
//!
//! # Layout
//!
//! - [`EngineProcess`]: the `synchrony` binary on port 0, its ready line, signals, RSS.
//! - [`PgDatabase`]: a fresh database on the test PostgreSQL (`SYNCHRONY_TEST_POSTGRES_URL`,
//!   default `postgres://postgres@127.0.0.1:5432/postgres`), dropped afterwards.
//! - [`RawClient`]: a WebSocket client that sends whatever bytes a test wants.
//! - [`YClient`]: a minimal yrs-based y-websocket client with persisted-ack support.
//! - [`node`]: runs `tests/js/interop.mjs` scenarios with the real `yjs`/`y-websocket` packages.
#![allow(clippy::unwrap_used)]

pub mod netns;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use synchrony_protocol::ext::{decode_persisted, MSG_PERSISTED};
use synchrony_protocol::frame::decode_frame_any;
use synchrony_protocol::{encode_message, Message, SyncMessage};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, Text, Transact, Update};

/// What a machine may lack that a test needs: the reason a test is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lacking {
    /// The recorded editing traces beside the checkout (`../shared/data/traces/`).
    Traces,
    /// Creating network namespaces and veth pairs (CAP_NET_ADMIN and iproute2's `ip`).
    NetworkNamespaces,
    /// Mounting a filesystem (root).
    Mount,
    /// A PostgreSQL Unix socket that nodes in other namespaces can use.
    PostgresSocket,
    /// The PostgreSQL server binaries (`initdb`, `pg_ctl`).
    PostgresBinaries,
    /// Debian's nginx.
    Nginx,
}

impl Lacking {
    /// The name `tests/ci-allowed-skips` uses.
    pub fn key(self) -> &'static str {
        match self {
            Self::Traces => "traces",
            Self::NetworkNamespaces => "network-namespaces",
            Self::Mount => "mount",
            Self::PostgresSocket => "postgres-socket",
            Self::PostgresBinaries => "postgres-binaries",
            Self::Nginx => "nginx",
        }
    }
}

/// Records that the running test cannot run on this machine, which lacks `what` (`detail`
/// says more); the caller then returns. A skip is never silent: it goes to stderr and to the
/// file named by `SYNCHRONY_TEST_SKIPS`, whose lines `tests/run.sh` prints at the end. Under
/// `CI=true` it fails the test instead, unless `what` is declared in `tests/ci-allowed-skips`
/// (the one list of what CI's machine may genuinely lack).
pub fn skip(what: Lacking, detail: &str) {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| {
            stem.rsplit_once('-')
                .map_or(stem.clone(), |(name, _)| name.to_owned())
        })
        .unwrap_or_default();
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    let line = format!("{binary}::{test}: lacks {} ({detail})", what.key());
    // Straight to the stream, not through `eprintln!`, which `cargo test` captures.
    {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {line}");
    }
    if let Some(path) = std::env::var_os("SYNCHRONY_TEST_SKIPS") {
        use std::io::Write;
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| writeln!(file, "{line}"));
        if let Err(error) = appended {
            panic!(
                "cannot record the skip in {}: {error}",
                Path::new(&path).display()
            );
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") && !ci_allows(what) {
        panic!(
            "SKIPPED under CI=true, which allows only the skips declared in tests/ci-allowed-skips: {line}"
        );
    }
}

/// Whether `tests/ci-allowed-skips` declares `what` (lines `key  # why`).
fn ci_allows(what: Lacking) -> bool {
    let list = std::fs::read_to_string(workspace_root().join("tests/ci-allowed-skips"))
        .unwrap_or_default();
    list.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .any(|key| key == what.key())
}

/// Generous bound for anything that should happen "soon" on a loaded, shared machine.
pub const WAIT: Duration = Duration::from_secs(30);

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The engine binary built by `cargo build` next to the test executables.
pub fn engine_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("synchrony");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --bins`), as tests/run.sh does",
        bin.display()
    );
    bin
}

/// A `synchrony serve` process.
pub struct EngineProcess {
    child: Child,
    /// The address its HTTP port answers on (127.0.0.1 unless it runs in a namespace).
    pub host: String,
    pub port: u16,
    pub pid: u32,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// How to start an engine.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// `--database-url`; none means SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// SQLite directory; a temporary one if unset.
    pub data_dir: Option<PathBuf>,
    /// Extra `serve` arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// A network namespace to run the engine in (`ip netns exec`); its HTTP port is then
    /// reachable only from inside it, unless it binds `host`.
    pub netns: Option<String>,
    /// The address its HTTP port is reached at (with `--bind` set to it): 127.0.0.1 if unset.
    pub host: Option<String>,
    /// Its HTTP port; 0 (the default): one the system picks.
    pub port: u16,
}

impl EngineOptions {
    pub fn sqlite(dir: &Path) -> Self {
        Self {
            data_dir: Some(dir.to_path_buf()),
            ..Self::default()
        }
    }
    pub fn postgres(url: &str) -> Self {
        Self {
            database_url: Some(url.to_owned()),
            ..Self::default()
        }
    }
    pub fn arg(mut self, flag: &str, value: impl ToString) -> Self {
        self.args.push(flag.to_owned());
        self.args.push(value.to_string());
        self
    }

    pub fn env(mut self, name: &str, value: impl ToString) -> Self {
        self.env.push((name.to_owned(), value.to_string()));
        self
    }
}

/// When a test fails, the engines it ran say what they logged at WARN and above (a panic
/// inside the engine shows up to the test only as a closed connection).
impl Drop for EngineProcess {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let log = read(&self.log_path);
        let serious: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
            .collect();
        let from = serious.len().saturating_sub(40);
        eprintln!(
            "--- engine on port {} logged {} WARN/ERROR lines; the last {}:\n{}",
            self.port,
            serious.len(),
            serious.len() - from,
            serious[from..].join("\n")
        );
    }
}

impl EngineProcess {
    pub async fn start(options: &EngineOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = options
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let log_path = dir.path().join("engine.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = match &options.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(engine_binary());
                c
            }
            None => Command::new(engine_binary()),
        };
        command
            .arg("serve")
            .args([
                "--port",
                &options.port.to_string(),
                "--bind",
                options.host.as_deref().unwrap_or("127.0.0.1"),
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&options.args)
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .env("SYNCHRONY_LOG", "info,synchrony=debug")
            .env_remove("SYNCHRONY_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if let Some(url) = &options.database_url {
            command.args(["--database-url", url]);
        }
        let mut child = command.spawn().expect("engine starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "engine printed no ready line within {WAIT:?}; log:\n{}",
                    read(&log_path)
                )
            })
            .unwrap()
            .unwrap_or_else(|| panic!("engine exited before ready; log:\n{}", read(&log_path)));
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(ready["event"], "ready", "unexpected first line {line}");
        // Keep draining stdout so the engine never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            pid: child.id().unwrap(),
            host: options.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
            port: ready["port"].as_u64().unwrap() as u16,
            child,
            log_path,
            _dir: dir,
        }
    }

    pub fn ws_base(&self) -> String {
        format!("ws://{}:{}/synchrony", self.host, self.port)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}:{}/synchrony{path}", self.host, self.port)
    }

    pub fn ws_url(&self, doc: &str, query: &str) -> String {
        // `doc` may already carry a query (`page?token=…`).
        let sep = match (query.is_empty(), doc.contains('?')) {
            (true, _) => "",
            (false, true) => "&",
            (false, false) => "?",
        };
        format!("{}/v1/ws/{doc}{sep}{query}", self.ws_base())
    }

    /// GET over plain HTTP/1.1; returns (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = http_to(
            &self.host,
            self.port,
            "GET",
            &format!("/synchrony{path}"),
            &[],
            &[],
        )
        .await;
        (response.status, response.text())
    }

    /// A request under the context path, with a bearer token when given.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> HttpResponse {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("Authorization", b.as_str()))
            .collect();
        http_to(
            &self.host,
            self.port,
            method,
            &format!("/synchrony{path}"),
            &headers,
            body,
        )
        .await
    }

    pub async fn health(&self) -> serde_json::Value {
        let (status, body) = self.get("/v1/health").await;
        assert!(status == 200 || status == 503, "health answered {status}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn log(&self) -> String {
        read(&self.log_path)
    }

    /// Resident memory of the engine, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub async fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        tokio::time::timeout(Duration::from_secs(25), self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "engine did not exit within 25 s of SIGTERM; log:\n{}",
                    self.log()
                )
            })
            .unwrap()
    }

    /// Sends `signal` and returns at once (no wait for the exit).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal);
    }
}

/// Sends only the head of a `PUT` announcing `length` bytes (and 64 KiB of them), then reads
/// the answer's status line: an engine that refuses before reading the body answers at once.
pub async fn put_head(
    node: &EngineProcess,
    path: &str,
    token: Option<&str>,
    length: usize,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(("127.0.0.1", node.port)).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "PUT /synchrony{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(&vec![0u8; 64 << 10]).await;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, stream.read(&mut answer))
        .await
        .expect("an answer before the body was sent")
        .unwrap();
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Runs `synchrony <args>` to completion (bounded) and returns its exit code and stderr.
pub async fn run_engine_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let (code, _, stderr) = run_cli(args).await;
    (code, stderr)
}

/// Runs `synchrony <args>` to completion (bounded): exit code, stdout, stderr.
pub async fn run_cli(args: &[&str]) -> (Option<i32>, String, String) {
    run_cli_with_env(args, &[]).await
}

/// Runs `synchrony <args>` with extra environment variables: exit code, stdout, stderr.
pub async fn run_cli_with_env(
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let output = tokio::time::timeout(
        WAIT,
        Command::new(engine_binary())
            .args(args)
            .envs(env.iter().copied())
            .env_remove("SYNCHRONY_DATABASE_URL")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the command exited in time")
    .unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (
        output.status.code(),
        text(output.stdout),
        text(output.stderr),
    )
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// An HTTP response as the harness reads it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over a fresh connection (axum answers with a content length); keeps the
/// harness free of an HTTP client dependency.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    http_to("127.0.0.1", port, method, path, headers, body).await
}

/// [`http`] to another address than 127.0.0.1 (an engine in a test's network namespace).
pub async fn http_to(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect((host, port)).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response head");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: response[split + 4..].to_vec(),
    }
}

/// The admin URL of the test PostgreSQL.
pub fn postgres_admin_url() -> String {
    std::env::var("SYNCHRONY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of its own for one test, dropped when the value is.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

impl PgDatabase {
    /// The Unix-socket URL nodes in other namespaces use, checked by connecting as this test's
    /// user; None (with the skip recorded, saying why) where there is none or it refuses.
    pub async fn usable_socket_url(&self) -> Option<String> {
        let Some(url) = self.socket_url().await else {
            skip(Lacking::PostgresSocket, "PostgreSQL has no Unix socket");
            return None;
        };
        // The socket may ask for another authentication than TCP does (Debian's `peer`).
        if let Err(error) = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await {
            skip(
                Lacking::PostgresSocket,
                &format!("it refuses this test's user: {error}"),
            );
            return None;
        }
        Some(url)
    }

    /// The database URL over PostgreSQL's Unix socket, which a node in another network namespace
    /// reaches as well as the test does; None when the server has no socket.
    pub async fn socket_url(&self) -> Option<String> {
        use sqlx::Row;
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&self.url)
            .await
            .map_err(|e| eprintln!("connecting to {}: {e}", self.url))
            .ok()?;
        let row = sqlx::query(
            "SELECT current_setting('unix_socket_directories') || '|' || current_setting('port') \
             || '|' || current_database()",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(|e| eprintln!("reading the socket directory: {e}"))
        .ok()?;
        let settings: String = row.try_get(0).ok()?;
        let mut parts = settings.split('|');
        let (dirs, port, name) = (parts.next()?, parts.next()?, parts.next()?);
        let dir = dirs
            .split(',')
            .map(str::trim)
            .find(|d| d.starts_with('/'))?;
        let user = self
            .url
            .split("://")
            .nth(1)?
            .split('@')
            .next()?
            .split(':')
            .next()?
            .to_owned();
        Some(format!(
            "postgres://{user}@localhost/{name}?host={dir}&port={port}"
        ))
    }

    pub async fn create() -> Self {
        sqlx::any::install_default_drivers();
        let admin = postgres_admin_url();
        let name = format!(
            "synchrony_test_{}_{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL at {admin} is unreachable ({e}); tests/run.sh starts a private one"
                )
            });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("bad admin url {admin}"),
        };
        Self { url, name }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin = postgres_admin_url();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) =
                    <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await
                {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client that sends arbitrary frames.
pub struct RawClient {
    pub ws: Socket,
    /// The close frame the engine sent, once one came (for failure messages).
    pub closed: Option<String>,
}

/// What [`RawClient::next_event`] saw.
#[derive(Debug)]
pub enum Next {
    Frame(Vec<u8>),
    /// Nothing within the time given.
    Quiet,
    /// Closed (with the close code, if a close frame came) or failed.
    Ended(Option<u16>),
}

/// What a connection ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Closed {
        code: u16,
        reason: String,
    },
    /// The socket ended without a close frame.
    Dropped,
}

impl RawClient {
    pub async fn connect(url: &str) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self { ws, closed: None })
    }

    pub async fn send(&mut self, bytes: Vec<u8>) {
        if let Err(error) = self.ws.send(WsMessage::Binary(bytes.into())).await {
            panic!(
                "sending failed ({error}); the engine had closed the connection with {:?}",
                self.closed
            );
        }
    }

    pub async fn send_message(&mut self, message: &Message) {
        self.send(encode_message(message)).await;
    }

    /// Sends unless the connection is gone; false when it is.
    pub async fn try_send(&mut self, message: &Message) -> bool {
        self.ws
            .send(WsMessage::Binary(encode_message(message).into()))
            .await
            .is_ok()
    }

    /// The next binary frame, or None on close, error or timeout.
    pub async fn next_binary(&mut self, within: Duration) -> Option<Vec<u8>> {
        match self.next_event(within).await {
            Next::Frame(b) => Some(b),
            Next::Quiet | Next::Ended(_) => None,
        }
    }

    pub async fn next_event(&mut self, within: Duration) -> Next {
        loop {
            match tokio::time::timeout(within, self.ws.next()).await {
                Ok(Some(Ok(WsMessage::Binary(b)))) => return Next::Frame(b.to_vec()),
                Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_)))) => {
                    continue
                }
                Ok(Some(Ok(WsMessage::Text(_)))) => continue,
                Err(_) => return Next::Quiet,
                Ok(Some(Ok(WsMessage::Close(frame)))) => {
                    self.closed = Some(format!("{frame:?}"));
                    return Next::Ended(frame.map(|f| u16::from(f.code)));
                }
                Ok(Some(Err(_)) | None) => return Next::Ended(None),
            }
        }
    }

    /// Reads (and discards) until the connection ends; returns how.
    pub async fn ended(&mut self, within: Duration) -> Ended {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("connection still open after {within:?}"),
                Ok(Some(Ok(WsMessage::Close(Some(frame))))) => {
                    return Ended::Closed {
                        code: u16::from(frame.code),
                        reason: frame.reason.to_string(),
                    }
                }
                Ok(Some(Ok(WsMessage::Close(None)))) => {
                    return Ended::Closed {
                        code: u16::from(WsCloseCode::Status),
                        reason: String::new(),
                    }
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return Ended::Dropped,
            }
        }
    }
}

/// A minimal y-websocket client on yrs, for tests that need precise control.
pub struct YClient {
    pub raw: RawClient,
    pub doc: yrs::Doc,
    /// Update-bearing messages sent (updates and step 2 answers), as the engine counts them.
    pub sent: u64,
    /// Edits made with [`YClient::append`].
    pub edits: u64,
    /// For each message sent, how many edits had been sent up to and including it.
    edits_at: Vec<u64>,
    /// Highest "persisted through" received.
    pub acked: u64,
    /// Whether the server's answer to our step 1 arrived.
    pub synced: bool,
}

impl YClient {
    /// Connects to `doc` and sends step 1; `ack` opts into persisted acknowledgements.
    pub async fn connect(engine: &EngineProcess, doc: &str, ack: bool) -> Self {
        let url = engine.ws_url(doc, if ack { "ack=persisted" } else { "" });
        Self::from_raw(RawClient::connect(&url).await.unwrap()).await
    }

    /// Wraps an open connection and sends step 1.
    pub async fn from_raw(raw: RawClient) -> Self {
        let mut client = Self {
            raw,
            doc: yrs::Doc::new(),
            sent: 0,
            edits: 0,
            edits_at: Vec::new(),
            acked: 0,
            synced: false,
        };
        let sv = client.doc.transact().state_vector();
        client
            .raw
            .send_message(&Message::Sync(SyncMessage::SyncStep1(sv)))
            .await;
        client
    }

    /// Connects and waits for the initial sync.
    pub async fn synced(engine: &EngineProcess, doc: &str, ack: bool) -> Self {
        let mut client = Self::connect(engine, doc, ack).await;
        client.wait_until("initial sync", |c| c.synced).await;
        client
    }

    pub fn text(&self) -> String {
        let text = self.doc.get_or_insert_text("content");
        text.get_string(&self.doc.transact())
    }

    /// Appends to the `content` text locally; the update to send.
    fn append_locally(&mut self, s: &str) -> Vec<u8> {
        let text = self.doc.get_or_insert_text("content");
        let update = {
            let mut txn = self.doc.transact_mut();
            let len = text.len(&txn);
            text.insert(&mut txn, len, s);
            txn.encode_update_v1()
        };
        self.edits += 1;
        update
    }

    /// Appends to the `content` text and sends the update.
    pub async fn append(&mut self, s: &str) {
        let update = self.append_locally(s);
        self.send_update(update).await;
    }

    /// Inserts at a random position of the `content` text and sends the update.
    pub async fn insert_at_random(&mut self, rng: &mut impl rand::Rng, s: &str) {
        let text = self.doc.get_or_insert_text("content");
        let update = {
            let mut txn = self.doc.transact_mut();
            let at = rng.random_range(0..=text.len(&txn));
            text.insert(&mut txn, at, s);
            txn.encode_update_v1()
        };
        self.edits += 1;
        self.send_update(update).await;
    }

    /// Like [`YClient::append`], for a connection that may have been closed meanwhile: the edit
    /// is made either way (as in an editor) and sent if it can be; false when it could not
    /// ([`YClient::reconnect`] then brings it).
    pub async fn try_append(&mut self, s: &str) -> bool {
        let update = self.append_locally(s);
        self.try_send_update(update).await
    }

    /// Opens a new connection to `doc` on `engine` keeping this client's document, as an editor
    /// does after its socket closed, and waits for the sync: the server's step 1 is answered with
    /// everything it lacks (edits the old connection never got acknowledged included), so
    /// acknowledgements count anew from that answer.
    pub async fn reconnect(&mut self, engine: &EngineProcess, doc: &str, ack: bool) {
        let url = engine.ws_url(doc, if ack { "ack=persisted" } else { "" });
        self.raw = RawClient::connect(&url).await.unwrap();
        self.sent = 0;
        self.edits_at.clear();
        self.acked = 0;
        self.synced = false;
        let sv = self.doc.transact().state_vector();
        self.raw
            .send_message(&Message::Sync(SyncMessage::SyncStep1(sv)))
            .await;
        self.wait_until("the sync after reconnecting", |c| c.synced)
            .await;
    }

    /// Sends an update unless the connection is gone; false when it is.
    pub async fn try_send_update(&mut self, update: Vec<u8>) -> bool {
        let sent = self
            .raw
            .try_send(&Message::Sync(SyncMessage::Update(update)))
            .await;
        if sent {
            self.record_sent();
        }
        sent
    }

    pub async fn send_update(&mut self, update: Vec<u8>) {
        self.record_sent();
        self.raw
            .send_message(&Message::Sync(SyncMessage::Update(update)))
            .await;
    }

    fn record_sent(&mut self) {
        self.sent += 1;
        self.edits_at.push(self.edits);
    }

    /// Edits covered by the persisted acknowledgements received so far.
    pub fn acked_edits(&self) -> u64 {
        match self.acked {
            0 => 0,
            n => self.edits_at[n as usize - 1],
        }
    }

    /// Handles one incoming frame; returns what happened.
    pub async fn pump_one(&mut self, within: Duration) -> Next {
        let bytes = match self.raw.next_event(within).await {
            Next::Frame(bytes) => bytes,
            other => return other,
        };
        match decode_frame_any(&bytes).unwrap() {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                self.record_sent();
                self.raw
                    .send_message(&Message::Sync(SyncMessage::SyncStep2(diff)))
                    .await;
            }
            Message::Sync(SyncMessage::SyncStep2(u)) => {
                self.apply(&u);
                self.synced = true;
            }
            Message::Sync(SyncMessage::Update(u)) => self.apply(&u),
            Message::Custom(MSG_PERSISTED, body) => {
                self.acked = self.acked.max(decode_persisted(&body).unwrap());
            }
            _ => {}
        }
        Next::Frame(Vec::new())
    }

    fn apply(&self, update: &[u8]) {
        self.doc
            .transact_mut()
            .apply_update(Update::decode_v1(update).unwrap())
            .unwrap();
    }

    /// Pumps frames until `done` holds; panics with `what` after [`WAIT`].
    pub async fn wait_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                panic!("timed out after {WAIT:?} waiting for {what}");
            }
            if let Next::Ended(_) = self.pump_one(left.min(Duration::from_millis(200))).await {
                panic!("connection ended while waiting for {what}");
            }
        }
    }

    /// Pumps whatever arrives until `quiet` passes in silence.
    pub async fn drain(&mut self, quiet: Duration) {
        while let Next::Frame(_) = self.pump_one(quiet).await {}
    }
}

/// Runs a `tests/js/interop.mjs` scenario against `engine` and returns its JSON result.
pub async fn node(
    scenario: &str,
    engine: &EngineProcess,
    doc: &str,
    args: &[&str],
) -> serde_json::Value {
    node_at(scenario, &engine.ws_base(), doc, args, &|| engine.log()).await
}

/// Runs a scenario against the engine at `ws_base` (`ws://host:port/synchrony`); `log` supplies
/// the engine's log for the failure message.
pub async fn node_at(
    scenario: &str,
    ws_base: &str,
    doc: &str,
    args: &[&str],
    log: &(dyn Fn() -> String + Sync),
) -> serde_json::Value {
    let js = workspace_root().join("tests/js");
    assert!(
        js.join("node_modules/y-websocket").exists(),
        "tests/js/node_modules is missing: run `npm ci` in tests/js (tests/run.sh does)"
    );
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("node")
            .arg(js.join("interop.mjs"))
            .arg(scenario)
            .arg(ws_base)
            .arg(doc)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("node scenario finished within 120 s")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "node {scenario} failed: {}\n{}\nengine log:\n{}",
        stdout,
        String::from_utf8_lossy(&output.stderr),
        log()
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

/// The text of a document as storage holds it (snapshot plus log), read without an engine.
pub async fn stored_text(database_url: &str, doc: &str) -> (String, Vec<u8>) {
    let store = synchrony::store::Store::connect(database_url)
        .await
        .unwrap();
    let id = synchrony_protocol::DocId::parse(doc).unwrap();
    let stored = store.load(&id).await.unwrap();
    let merged = synchrony::store::merge(&id, stored.snapshot.as_deref(), &stored.updates).unwrap();
    let ydoc = yrs::Doc::new();
    let text = ydoc.get_or_insert_text("content");
    let mut txn = ydoc.transact_mut();
    txn.apply_update(Update::decode_v1(&merged).unwrap())
        .unwrap();
    (text.get_string(&txn), txn.state_vector().encode_v1_vec())
}

trait EncodeVec {
    fn encode_v1_vec(&self) -> Vec<u8>;
}

impl EncodeVec for yrs::StateVector {
    fn encode_v1_vec(&self) -> Vec<u8> {
        yrs::updates::encoder::Encode::encode_v1(self)
    }
}

/// The SQLite URL of an engine's data directory.
pub fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}/synchrony.db", data_dir.display())
}

/// A PostgreSQL cluster of a test's own (initdb in a temporary directory, a free port), which
/// the test may stop and start: for storage outages. Needs the server binaries
/// (`/usr/lib/postgresql/*/bin`, Debian's `postgresql`, which `tests/run.sh` installs).
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// None when the server binaries are missing.
    pub async fn start() -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()?;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("pgdata");
        std::fs::create_dir(&data).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Self {
            bin,
            data,
            port,
            _dir: dir,
        };
        let owner = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(pg._dir.path())
            .status()
            .await
            .unwrap();
        assert!(owner.success(), "chown of the private cluster failed");
        let initdb = pg.bin.join("initdb");
        pg.as_postgres(&[
            initdb.to_str().unwrap(),
            "-D",
            pg.data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ])
        .await;
        pg.start_server().await;
        Some(pg)
    }

    async fn as_postgres(&self, args: &[&str]) {
        let output = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn start_server(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let log = self._dir.path().join("pg.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
            self.port,
            self._dir.path().display()
        );
        self.as_postgres(&[
            pg_ctl.to_str().unwrap(),
            "-D",
            self.data.to_str().unwrap(),
            "-w",
            "-l",
            log.to_str().unwrap(),
            "-o",
            &options,
            "start",
        ])
        .await;
    }

    /// Stops the server (fast: open connections are cut) and waits until it is down.
    pub async fn stop_server(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        self.as_postgres(&[
            pg_ctl.to_str().unwrap(),
            "-D",
            self.data.to_str().unwrap(),
            "-w",
            "-m",
            "fast",
            "stop",
        ])
        .await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `tests/py/<script>` with the test Python (`SYNCHRONY_TEST_PYTHON`, which `tests/run.sh`
/// points at a virtualenv holding `tests/py/requirements.txt`), `input` on its stdin; its stdout.
/// Panics with the script's stderr when it fails.
pub fn python_tool(script: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let python = std::env::var("SYNCHRONY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let path = workspace_root().join("tests/py").join(script);
    let mut child = std::process::Command::new(&python)
        .arg(&path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python}: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .expect("the script reads its input");
    }
    let output = child.wait_with_output().expect("the script runs");
    assert!(
        output.status.success(),
        "{python} {} {args:?} failed (pip install -r tests/py/requirements.txt, or set \
         SYNCHRONY_TEST_PYTHON):\n{}\ninput:\n{input}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the script prints UTF-8")
}
