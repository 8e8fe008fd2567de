//! Managed mode with real processes: a host simulator (`host_sim`) starts the engine the way
//! Confluence does (dotted keys in the environment, JVM arguments, a JDBC URL, a JWT public key,
//! `synchrony.watch.pid`) and keeps it running with the supervisor library.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use synchrony::auth::{mint_with_private_key, MintClaims};
use synchrony::gate::unix_now;
use synchrony_tests::{engine_binary, node_at, stored_text, PgDatabase, RawClient, YClient, WAIT};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// An RSA key pair made for these tests only; the public half in Synchrony's base64 X.509 form.
const PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCvqbrzWtqplWBB\nN8S+S3LfbQCgvJouHY3sxn04Yx/Hdh2+/dfEjSo5NtiGtqI6zuNJ+RYwYRD+PW/g\nR05qyV4rKogfobSbp2qBqwk0+e1HoYCihQ76xrGzzf+cjh2+vxUd9mbIw6YbJgJT\nnIjCz/oSQiMo+tSwby7plAugEvHzZ2iNIgFEnHsw7G35LANruH6fuwY9bJezU87Y\nKXxwECUIRRk/SphmqiSHhnS3X4na99O4iB/cdxfWcTqOhQ7NYPL4sIByGCfhMhgO\nQ4thoghafI8j61VqRYZXsdz+97XeEoHvAEPwQljv+x4Hxi3jnjV2GyQalK4zbxrE\noZu9udRDAgMBAAECggEAGSe8Luc+0vQiMZSz5vBVBevNIDeB+MKgtVyDSBTh0yV2\nAwjE4k+40TKqdTgoKTXBVLGH3Ou5jD7uC3cKor4tbw8LKUR14ahq1yDQE7cKpKxb\nCGr3hy/2+KGyThAH8G3ar0y+0Vc7LT4XLTQIXaV80SqJcG/jD1UMqcRamdS8szdJ\n0gYksOO9dSZPF7mzCIdJHAkFp7cZfA6efsm5k6PlJwm1GFelqjPT3COnYe7AmT8T\ntl1K3O5tELIZBB4AK8bFXMTtk7cFQForBQ59MWgQ84+VWG9BrQ8mSsSxwkfDK8fQ\niPPhJzsnvzd0fxYmBQRgeZWdf1UvoO9tmmW2b2xgUQKBgQDlzLOoQgfq7D1d1mrH\nyxgVvUtcMBjwi1bFJ4Lv245g4BNhWDfbjpEYLsH7G+5igsv9exAIT/AaJOmbdU5B\nF1cPZ9wZCayNMMwQ6Wh9Wmzr/445TwLW9XwAwLZJYysutsbWy+RTqGxiA7lDo4oG\nqG+e71vPQpidpwSi0j4KDv6qKwKBgQDDsOk9rVN/QAaXE7QJgyh65/9KA9BHWmUB\nQAryq4snxsoyRLlgS6HX8otebDiJygli7QAJhaw5l3mpyRJ2Q+kt6N+v+dkY62N0\nI5ZH/u9vICIcVH8JLmpzLf3hfJtAmVDzpbPtJAMOEkbTT9dOH93HRb4TDTY4sqFW\nGaH8FrDqSQKBgQDMnr3KsSFDuh/akrZ6OQm1Md0MtXc/mZMl8szQr3vUHzKil18F\njaj9E4V/B5v48+aYSyA3hpaRcRTibE3F//ZxrVV6pfaTskPDO1Lja8VZTzFhLk2l\nAunr8a1fI4KsEex0DxG8vFfl3tL0u4aH7yuVJiVmJDKpDrM+GF9NrZRuCQKBgDLM\n2S+msBdHkq5jcghKIRcO5MndBZOQVsolSvJGMACqbVDxYEIsQB5kG2Puqhqy9Q7W\nQX03U0c8GFxIE1/aL004t+Dh9kauzImYt2mHN7bcW56JHNVQVFgEJ3UCuPbjFg26\nBWRZReXAPtyaTGU+hn81jqs5ccr0LEfCrbdYWKLpAoGBAN2OKsi1/WdKNx5vnxMF\nvGoDvms+84Ep9n1K5eHF3UYZvt96ogS0XYlrXULxm5KToZW9XraKZqHk+UNLTSRw\nv7y+c31g5DdVsz3tVAsFj55hso2LotvOLypltePlZj+2K/67BovtVk4Id39e9RBy\nuCB1aZdZi8B2UrodgDHxQupU\n-----END PRIVATE KEY-----\n";
const PUBLIC_KEY_X509: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAr6m681raqZVgQTfEvkty320AoLyaLh2N7MZ9OGMfx3Ydvv3XxI0qOTbYhraiOs7jSfkWMGEQ/j1v4EdOasleKyqIH6G0m6dqgasJNPntR6GAooUO+saxs83/nI4dvr8VHfZmyMOmGyYCU5yIws/6EkIjKPrUsG8u6ZQLoBLx82dojSIBRJx7MOxt+SwDa7h+n7sGPWyXs1PO2Cl8cBAlCEUZP0qYZqokh4Z0t1+J2vfTuIgf3HcX1nE6joUOzWDy+LCAchgn4TIYDkOLYaIIWnyPI+tVakWGV7Hc/ve13hKB7wBD8EJY7/seB8Yt4541dhskGpSuM28axKGbvbnUQwIDAQAB";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The host process and the status lines it prints.
struct Host {
    child: Child,
    statuses: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    last: Option<serde_json::Value>,
    /// What the host and the engine wrote on stderr, complete once both have exited.
    stderr: tokio::task::JoinHandle<String>,
}

impl Host {
    fn start(env: &[(String, String)]) -> Self {
        let host_sim = engine_binary().with_file_name("host_sim");
        let mut child = Command::new(host_sim)
            .arg(engine_binary())
            .envs(env.iter().cloned())
            .env_remove("SYNCHRONY_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut text = String::new();
            let _ = err.read_to_string(&mut text).await;
            // Shown when a test fails, as the inherited stream would have been.
            eprint!("{text}");
            text
        });
        let (tx, statuses) = tokio::sync::mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["event"] == "host-status" {
                        let _ = tx.send(v);
                    }
                }
            }
        });
        Self {
            child,
            statuses,
            last: None,
            stderr,
        }
    }

    /// Waits for a status that satisfies `want`.
    async fn wait_for(
        &mut self,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(last) = &self.last {
                if want(last) {
                    return last.clone();
                }
            }
            match tokio::time::timeout_at(deadline, self.statuses.recv()).await {
                Ok(Some(status)) => self.last = Some(status),
                _ => panic!("host never reported {what}; last status {:?}", self.last),
            }
        }
    }

    fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Confluence's environment for its Synchrony child, pointing at `db` and `port`.
fn confluence_env(db: &PgDatabase, port: u16) -> Vec<(String, String)> {
    // postgres://postgres@127.0.0.1:5432/name → jdbc:postgresql://127.0.0.1:5432/name + user.
    let url = url::Url::parse(&db.url).unwrap();
    let jdbc = format!(
        "jdbc:postgresql://{}:{}{}",
        url.host_str().unwrap(),
        url.port().unwrap_or(5432),
        url.path()
    );
    [
        ("synchrony.port", port.to_string()),
        ("synchrony.bind", "127.0.0.1".to_owned()),
        (
            "synchrony.service.url",
            format!("http://127.0.0.1:{port}/synchrony"),
        ),
        ("synchrony.database.url", jdbc),
        ("synchrony.database.username", url.username().to_owned()),
        (
            "synchrony.database.password",
            url.password().unwrap_or("").to_owned(),
        ),
        ("jwt.public.key", PUBLIC_KEY_X509.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn editor_token(port: u16, doc: &str) -> String {
    let now = unix_now();
    let claims = MintClaims {
        iss: Some("confluence".into()),
        aud: Some(format!("http://127.0.0.1:{port}/synchrony/v1")),
        sub: Some("editor".into()),
        iat: now,
        exp: now + 3600,
        access: [(format!("/data/{doc}"), "full".to_owned())]
            .into_iter()
            .collect(),
        session: None,
    };
    mint_with_private_key(&claims, PRIVATE_KEY).unwrap()
}

async fn connect_retrying(port: u16, doc: &str, token: &str) -> YClient {
    let url = format!("ws://127.0.0.1:{port}/synchrony/v1/ws/{doc}?token={token}&ack=persisted");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(raw) = RawClient::connect(&url).await {
            let mut client = YClient::from_raw(raw).await;
            client.wait_until("sync", |c| c.synced).await;
            return client;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "engine never came back on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_host_restarts_a_killed_engine_and_stops_it_cleanly() {
    let db = PgDatabase::create().await;
    let port = free_port();
    let doc = "confluence/page-7";
    let token = editor_token(port, doc);
    let mut host = Host::start(&confluence_env(&db, port));
    let first = host.wait_for("running", |s| s["state"] == "running").await;
    let engine_pid = first["pid"].as_i64().unwrap() as i32;

    // JavaScript editors type for 6 s; meanwhile an acknowledging client writes on a page of its
    // own (so that nobody holds its edits to send them again), and the engine is killed under all
    // of them while that client is still typing.
    let ws_base = format!("ws://127.0.0.1:{port}/synchrony");
    let editor_args = [token.as_str(), "6000"];
    let editors = node_at("editing", &ws_base, doc, &editor_args, &String::new);
    let own = "confluence/page-8";
    let own_token = editor_token(port, own);
    let killer = async {
        // Both editors are typing (their edits reach a watcher).
        let mut watcher = connect_retrying(port, doc, &token).await;
        watcher
            .wait_until("both editors typing", |c| {
                c.text().contains("[ed1:") && c.text().contains("[ed2:")
            })
            .await;
        let mut writer = connect_retrying(port, own, &own_token).await;
        for i in 0..40 {
            writer.append(&format!("<{i}>")).await;
            let _ = writer.pump_one(Duration::from_millis(20)).await;
        }
        writer
            .wait_until("acks of the first 40", |c| c.acked_edits() == 40)
            .await;
        // Forty more sent back to back, and the kill right behind them: some are in flight.
        for i in 40..80 {
            writer.append(&format!("<{i}>")).await;
        }
        signal(engine_pid, nix::sys::signal::Signal::SIGKILL);
        // Every acknowledgement the engine sent before it died, then storage read directly.
        while !matches!(
            writer.pump_one(Duration::from_millis(500)).await,
            synchrony_tests::Next::Ended(_)
        ) {}
        let acked = writer.acked_edits();
        let (stored, _) = stored_text(&db.url, own).await;
        println!("{acked} of 80 edits acknowledged at the kill");
        for i in 0..acked {
            assert!(
                stored.contains(&format!("<{i}>")),
                "acknowledged edit <{i}> is not in storage after the kill"
            );
        }
        let restarted = host
            .wait_for("a restart", |s| {
                s["state"] == "running" && s["restarts"] == 1
            })
            .await;
        assert_ne!(restarted["pid"], first["pid"]);
        assert_eq!(restarted["last_exit"]["signal"], 9);
        // The restarted engine serves every acknowledged edit.
        let reader = connect_retrying(port, own, &own_token).await;
        for i in 0..acked {
            assert!(
                reader.text().contains(&format!("<{i}>")),
                "acknowledged edit <{i}> lost"
            );
        }
    };
    let (result, ()) = tokio::join!(editors, killer);
    assert!(result["edits"].as_u64().unwrap() > 50, "{result}");
    let converged = result["text"].as_str().unwrap().to_owned();

    // SIGTERM to the host: it stops the engine, which drains and exits 0.
    let started = Instant::now();
    signal(host.pid(), nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(25), host.child.wait())
        .await
        .expect("host exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let last = host.wait_for("stopped", |s| s["state"] == "stopped").await;
    assert_eq!(last["last_exit"]["code"], 0, "{last}");
    println!("clean stop took {:?}", started.elapsed());
    let (stored, _) = stored_text(&db.url, doc).await;
    for marker in ["[ed1:0]", "[ed2:0]"] {
        assert!(stored.contains(marker) && converged.contains(marker));
    }
    let missing: Vec<&str> = converged
        .split(['[', ']', '<', '>'])
        .filter(|m| m.starts_with("ed"))
        .filter(|m| !stored.contains(&format!("[{m}]")))
        .collect();
    assert!(
        missing.is_empty(),
        "editors' edits not stored: {missing:?}\nstored: {stored}\nconverged: {converged}"
    );
}

#[tokio::test]
async fn the_engine_dies_with_its_host() {
    let db = PgDatabase::create().await;
    let port = free_port();
    let mut host = Host::start(&confluence_env(&db, port));
    let running = host.wait_for("running", |s| s["state"] == "running").await;
    let engine_pid = running["pid"].as_i64().unwrap() as i32;
    signal(host.pid(), nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    while !gone(engine_pid) {
        // The contract is 2 s; twice that leaves room for a loaded machine.
        assert!(
            killed.elapsed() < Duration::from_secs(4),
            "engine still running after its host died"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "engine exited {:?} after its host was killed",
        killed.elapsed()
    );
    let _ = host.child.wait().await;
    // The engine's stdout went to its dead host: its last log lines are lost quietly.
    let stderr = tokio::time::timeout(synchrony_tests::WAIT, host.stderr)
        .await
        .expect("stderr closed once both processes exited")
        .unwrap();
    assert!(
        !stderr.contains("Broken pipe") && !stderr.contains("Unable to write"),
        "the engine complained about its closed stdout:\n{stderr}"
    );
}
