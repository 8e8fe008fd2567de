//! Startup failures end with the documented exit code and a message naming the cause.
#![allow(clippy::unwrap_used)]

use synchrony_tests::{run_cli_with_env, run_engine_to_exit, EngineOptions, EngineProcess};

#[tokio::test]
async fn operator_mistakes_get_their_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let cases: [(&[&str], i32, &str); 7] = [
        // Listening beyond loopback with no authentication at all is refused before binding.
        (
            &[
                "serve",
                "--port",
                "0",
                "--data-dir",
                data,
                "--bind",
                "0.0.0.0",
            ],
            2,
            "synchrony.service.authtoken",
        ),
        (
            &[
                "serve",
                "--port",
                "0",
                "--data-dir",
                data,
                "--jwt-public-key",
                "not-a-key",
            ],
            2,
            "jwt.public.key",
        ),
        (
            &[
                "serve",
                "--port",
                "0",
                "--data-dir",
                data,
                "--database-url",
                "mysql://h/db",
            ],
            2,
            "synchrony.database.url",
        ),
        (
            &[
                "serve",
                "--port",
                "0",
                "--data-dir",
                data,
                "--context-path",
                "/a b",
            ],
            2,
            "synchrony.context.path",
        ),
        (&["serve", "--port", "notaport"], 2, "--port"),
        (
            &[
                "serve",
                "--port",
                "0",
                "--database-url",
                "postgres://nobody@127.0.0.1:1/x",
            ],
            4,
            "Connection refused",
        ),
        (
            &[
                "migrate",
                "--database-url",
                "postgres://nobody@127.0.0.1:1/x",
            ],
            4,
            "Connection refused",
        ),
    ];
    for (args, code, needle) in cases {
        let (got, stderr) = run_engine_to_exit(args).await;
        assert_eq!(got, Some(code), "{args:?}: exit {got:?}\n{stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: message lacks {needle:?}:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    }
}

#[tokio::test]
async fn a_port_in_use_exits_with_3() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let port = engine.port.to_string();
    let dir = tempfile::tempdir().unwrap();
    let (got, stderr) = run_engine_to_exit(&[
        "serve",
        "--port",
        &port,
        "--data-dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(got, Some(3), "{stderr}");
    assert!(stderr.contains("synchrony.port"), "{stderr}");
}

#[tokio::test]
async fn migrate_creates_the_schema_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for _ in 0..2 {
        let (got, stderr) = run_engine_to_exit(&["migrate", "--data-dir", data]).await;
        assert_eq!(got, Some(0), "{stderr}");
    }
    let store = synchrony::store::Store::connect(&synchrony_tests::sqlite_url(dir.path()))
        .await
        .unwrap();
    let id = synchrony_protocol::DocId::parse("x").unwrap();
    assert_eq!(store.log_len(&id).await.unwrap(), 0);
}

/// Command-line arguments and environment variables of one case.
type Args<'a> = Vec<&'a str>;
type Env<'a> = Vec<(&'a str, &'a str)>;

/// `synchrony config` shows which form won for each key.
async fn config_output(args: &[&str], env: &[(&str, &str)]) -> String {
    let run = tokio::process::Command::new(synchrony_tests::engine_binary())
        .arg("config")
        .args(args)
        .envs(env.iter().copied())
        .env_remove("SYNCHRONY_DATABASE_URL")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(synchrony_tests::WAIT, run)
        .await
        .expect("config finished")
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn line<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find(|l| l.starts_with(&format!("{key} ")))
        .unwrap_or_else(|| panic!("{key} missing:\n{output}"))
}

#[tokio::test]
async fn precedence_of_every_key_form_in_a_real_process() {
    let dir = tempfile::tempdir().unwrap();
    let props = dir.path().join("synchrony.properties");
    std::fs::write(
        &props,
        "synchrony.port=1005\nsynchrony.flush.window.ms=11\nsynchrony.jvm.arg.0=-XX:+UseG1GC\n",
    )
    .unwrap();
    let props = props.to_str().unwrap();
    // (args, env, expected port value, expected source)
    let cases: Vec<(Args, Env, &str, &str)> = vec![
        (
            vec!["--port", "1000", "-Dsynchrony.port=1001"],
            vec![("synchrony.port", "1002")],
            "1000",
            "command line",
        ),
        (
            vec!["-Dsynchrony.port=1001"],
            vec![("synchrony.port", "1002"), ("SYNCHRONY_PORT", "1003")],
            "1001",
            "-Dsynchrony.port",
        ),
        (
            vec!["-Dreza.port=1001"],
            vec![("SYNCHRONY_PORT", "1003")],
            "1001",
            "-Dreza.port",
        ),
        (
            vec![],
            vec![("synchrony.port", "1002"), ("SYNCHRONY_PORT", "1003")],
            "1002",
            "environment synchrony.port",
        ),
        (
            vec![],
            vec![("SYNCHRONY_PORT", "1003"), ("reza.port", "1004")],
            "1003",
            "environment SYNCHRONY_PORT",
        ),
        (
            vec![],
            vec![("reza.port", "1004"), ("SYNCHRONY_PROPERTIES_FILE", props)],
            "1004",
            "environment reza.port",
        ),
        (
            vec![],
            vec![("REZA_PORT", "1006"), ("SYNCHRONY_PROPERTIES_FILE", props)],
            "1006",
            "environment REZA_PORT",
        ),
        (
            vec!["--properties-file", props],
            vec![],
            "1005",
            "properties file",
        ),
        (vec![], vec![], "8091", "default"),
    ];
    for (args, env, value, source) in cases {
        let out = config_output(&args, &env).await;
        let port = line(&out, "synchrony.port");
        assert!(
            port.contains(value) && port.ends_with(source) || port.contains(&format!(" {source}")),
            "{args:?} {env:?}: {port}"
        );
        assert!(
            port.split_whitespace().nth(1) == Some(value),
            "{args:?} {env:?}: {port}"
        );
    }
    // Secrets are redacted whatever their form.
    let out = config_output(
        &[],
        &[
            ("synchrony.database.password", "hunter2"),
            ("cluster.authentication.secret", "s3"),
        ],
    )
    .await;
    assert!(!out.contains("hunter2") && !out.contains("s3 "), "{out}");
    assert!(line(&out, "synchrony.database.password").contains("***"));
    assert!(line(&out, "synchrony.flush.window.ms").contains("50"));
}

#[tokio::test]
async fn each_malformed_value_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let props = dir.path().join("bad.properties");
    std::fs::write(&props, "cluster.join.multicast.port=99999\n").unwrap();
    let props_env = props.to_str().unwrap();
    let cases: Vec<(Args, Env, &str)> = vec![
        (
            vec![],
            vec![("synchrony.port", "abc")],
            "synchrony.port (from environment synchrony.port)",
        ),
        (
            vec!["-Dsynchrony.bind=nowhere"],
            vec![],
            "synchrony.bind (from -Dsynchrony.bind)",
        ),
        (
            vec![],
            vec![("SYNCHRONY_MEMORY_MAX", "lots")],
            "synchrony.memory.max (from environment SYNCHRONY_MEMORY_MAX)",
        ),
        (
            vec![],
            vec![("cluster.join.type", "carrier-pigeon")],
            "cluster.join.type (from environment cluster.join.type)",
        ),
        (
            vec![],
            vec![("SYNCHRONY_PROPERTIES_FILE", props_env)],
            "cluster.join.multicast.port (from properties file",
        ),
        (
            vec![],
            vec![("cluster.authentication.enabled", "maybe")],
            "cluster.authentication.enabled",
        ),
        (
            vec![],
            vec![("reza.flush.window.ms", "-1")],
            "synchrony.flush.window.ms (from environment reza.flush.window.ms)",
        ),
        (
            vec![],
            vec![("cluster.join.tcpip.members", "a b:1")],
            "cluster.join.tcpip.members",
        ),
        (
            vec![],
            vec![("cluster.join.type", "tcpip")],
            "cluster.join.tcpip.members is empty",
        ),
        (
            vec![],
            vec![("synchrony.watch.pid", "self")],
            "synchrony.watch.pid",
        ),
        (
            vec![],
            vec![("SYNCHRONY_WORKER_THREADS", "many")],
            "synchrony.worker.threads (from environment SYNCHRONY_WORKER_THREADS)",
        ),
    ];
    for (args, env, needle) in cases {
        let mut all = vec!["serve", "--data-dir", dir.path().to_str().unwrap()];
        // A port on the command line would win over the one under test.
        if !env.iter().any(|(k, _)| *k == "synchrony.port") {
            all.extend(["--port", "0"]);
        }
        all.extend(args.iter().copied());
        let run = tokio::process::Command::new(synchrony_tests::engine_binary())
            .args(&all)
            .envs(env.iter().copied())
            .env_remove("SYNCHRONY_DATABASE_URL")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(synchrony_tests::WAIT, run)
            .await
            .unwrap_or_else(|_| panic!("{env:?} {args:?}: the engine started instead of refusing"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{env:?} {args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{env:?} {args:?}: message lacks {needle:?}:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn a_launcher_command_line_starts_the_engine_with_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let mut child = tokio::process::Command::new(synchrony_tests::engine_binary())
        .args([
            "-Xss2048k",
            "-Xmx2g",
            "-XX:+UseG1GC",
            "-classpath",
            "a.jar:b.jar",
            "synchrony.core",
            "sql",
        ])
        .env("synchrony.port", "0")
        .env("synchrony.data.dir", &data)
        .env("synchrony.prot", "1")
        .env_remove("SYNCHRONY_DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let ready = tokio::time::timeout(synchrony_tests::WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(ready.contains("\"event\":\"ready\""), "{ready}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}\n{stderr}", output.status);
    for needle in [
        "-Xss2048k",
        "-Xmx2g",
        "-XX:+UseG1GC",
        "-classpath a.jar:b.jar",
        "\"synchrony.core\"",
        "\"sql\"",
        "did you mean synchrony.port",
    ] {
        assert!(
            stderr.contains(needle),
            "no warning about {needle}:\n{stderr}"
        );
    }
    assert_eq!(
        stderr.matches("ignoring").count(),
        6,
        "one WARN per ignored argument:\n{stderr}"
    );
}

#[tokio::test]
async fn managed_logs_are_json_on_stdout_and_files_rotate_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let logs = dir.path().join("logs");
    // Managed (a watched pid): JSON lines on stdout, beside the ready line.
    let mut child = tokio::process::Command::new(synchrony_tests::engine_binary())
        .args(["serve", "--port", "0", "--data-dir", data.to_str().unwrap()])
        .env("synchrony.watch.pid", std::process::id().to_string())
        .env_remove("SYNCHRONY_DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("\"event\":\"ready\""))
    {
        let line = tokio::time::timeout(synchrony_tests::WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(line);
    }
    let storage_ready = seen
        .iter()
        .find(|l| l.contains("storage ready"))
        .expect("a storage-ready log line on stdout");
    let json: serde_json::Value = serde_json::from_str(storage_ready).unwrap();
    assert_eq!(json["level"], "INFO");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().await.unwrap().success());

    // synchrony.log.to.file=<dir>: the log goes to a daily-rotated file there.
    let mut child = tokio::process::Command::new(synchrony_tests::engine_binary())
        .args(["serve", "--port", "0", "--data-dir", data.to_str().unwrap()])
        .env("synchrony.log.to.file", logs.to_str().unwrap())
        .env_remove("SYNCHRONY_DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let ready = tokio::time::timeout(synchrony_tests::WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        ready.contains("\"event\":\"ready\""),
        "only the ready line goes to stdout: {ready}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().await.unwrap().success());
    let files: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("synchrony.") && name.ends_with(".log"),
        "{name}"
    );
    let content = std::fs::read_to_string(&files[0]).unwrap();
    assert!(
        content.contains("storage ready") && content.contains("every accepted update is committed"),
        "{content}"
    );
}

/// Polls the supervisor's status file until `want` holds.
async fn wait_status(
    path: &std::path::Path,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + synchrony_tests::WAIT;
    loop {
        let status = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        if let Some(s) = status.filter(|s| want(s)) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never matched"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn synchrony_supervise_restarts_a_killed_engine_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let status_file = dir.path().join("status.json");
    let data = dir.path().join("data");
    let mut supervisor = tokio::process::Command::new(synchrony_tests::engine_binary())
        .args([
            "supervise",
            "--status-file",
            status_file.to_str().unwrap(),
            "--",
            "serve",
            "--port",
            "0",
        ])
        .args(["--data-dir", data.to_str().unwrap()])
        .env_remove("SYNCHRONY_DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Every status line the supervisor prints (the engine's own lines are forwarded too).
    let stdout = supervisor.stdout.take().unwrap();
    let lines = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut statuses = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["event"] == "status" {
                    statuses.push(v);
                }
            }
        }
        statuses
    });
    let first = wait_status(&status_file, |s| s["state"] == "running").await;
    let pid = first["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let second = wait_status(&status_file, |s| {
        s["state"] == "running" && s["restarts"] == 1
    })
    .await;
    assert_ne!(second["pid"], first["pid"]);
    assert_eq!(second["last_exit"]["signal"], 9);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = tokio::time::timeout(std::time::Duration::from_secs(30), supervisor.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    let last = wait_status(&status_file, |s| s["state"] == "stopped").await;
    assert_eq!(
        last["last_exit"]["code"], 0,
        "the engine drained and exited 0: {last}"
    );
    assert_eq!(
        second["last_problem"], "engine killed by signal 9 (SIGKILL)",
        "{second}"
    );
    let statuses = lines.await.unwrap();
    let shown: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
    let states: Vec<&str> = statuses
        .iter()
        .map(|s| s["state"].as_str().unwrap_or("?"))
        .collect();
    assert!(
        states.ends_with(&["stopping", "stopped"]),
        "every change is reported, stopping included: {states:?}"
    );
    for pair in shown.windows(2) {
        assert_ne!(pair[0], pair[1], "a status line repeated");
    }
    for status in &statuses {
        assert!(
            !(status["state"] == "running"
                && status["pid"] == first["pid"]
                && status["last_exit"]["signal"] == 9),
            "the dead engine's pid shown as running: {status}"
        );
    }
    assert!(
        statuses.len() < 30,
        "{} status lines: {shown:#?}",
        statuses.len()
    );
}

/// The README's configuration table names every key the engine knows, with its default.
#[tokio::test]
async fn the_readme_lists_every_key() {
    let readme =
        std::fs::read_to_string(synchrony_tests::workspace_root().join("README.md")).unwrap();
    let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `--")).collect();
    let output = config_output(&[], &[]).await;
    let mut keys = 0;
    for entry in output.lines() {
        let Some(key) = entry.split_whitespace().next() else {
            continue;
        };
        keys += 1;
        assert!(
            rows.iter().any(|row| row.contains(&format!("| `{key}` |"))),
            "README's configuration table has no row for {key}"
        );
    }
    assert!(
        keys > 30,
        "synchrony config listed only {keys} keys:\n{output}"
    );
}

/// Empty or blank secrets, in every form a key can take, count as unset: beyond loopback the
/// engine refuses to start without real authentication; short secrets are refused by name.
#[tokio::test]
async fn empty_and_short_secrets_never_count_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let props = dir.path().join("empty.properties");
    std::fs::write(
        &props,
        "synchrony.service.authtoken=\nsynchrony.jwt.secret=   \n",
    )
    .unwrap();
    let props = props.to_str().unwrap().to_owned();
    let with = |extra: &[&str]| -> Vec<String> {
        [
            "serve",
            "--port",
            "0",
            "--data-dir",
            &data,
            "--bind",
            "0.0.0.0",
        ]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect()
    };
    let insecure = "not a loopback address, and no authentication is configured";
    // (arguments, environment, what the refusal says)
    type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            with(&[]),
            vec![("SYNCHRONY_SERVICE_AUTHTOKEN", "")],
            insecure,
        ),
        (
            with(&[]),
            vec![("synchrony.service.authtoken", "")],
            insecure,
        ),
        (with(&[]), vec![("SYNCHRONY_JWT_SECRET", " ")], insecure),
        (with(&["--jwt-secret", ""]), vec![], insecure),
        (with(&["--service-authtoken", "  "]), vec![], insecure),
        (with(&["-Dsynchrony.service.authtoken="]), vec![], insecure),
        (with(&["--properties-file", &props]), vec![], insecure),
        (
            with(&["--jwt-secret", "too-short"]),
            vec![],
            "synchrony.jwt.secret: is 9 bytes; a secret must be at least 32 bytes",
        ),
        (
            with(&[]),
            vec![("SYNCHRONY_SERVICE_AUTHTOKEN", "short")],
            "synchrony.service.authtoken: is 5 bytes; a secret must be at least 16 bytes",
        ),
        (
            with(&["--jwt-secret", "a-static-secret-of-32-bytes-or-more"]),
            vec![
                ("CLUSTER_AUTHENTICATION_ENABLED", "true"),
                ("CLUSTER_AUTHENTICATION_SECRET", " "),
            ],
            "cluster.authentication.secret is empty",
        ),
        (
            with(&[
                "--jwt-secret",
                "a-static-secret-of-32-bytes-or-more",
                "--cluster-join-type",
                "tcpip",
                "--cluster-join-tcpip-members",
                "127.0.0.1",
                "--cluster-authentication-secret",
                "too-short",
            ]),
            vec![],
            "cluster.authentication.secret: is 9 bytes; a secret must be at least 16 bytes: generate one, for example with `openssl rand -hex 32`",
        ),
    ];
    for (args, env, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, stderr) = run_cli_with_env(&args, &env).await;
        assert_eq!(code, Some(2), "{args:?} {env:?}: exit {code:?}\n{stderr}");
        assert!(stderr.contains(needle), "{args:?} {env:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    // On loopback an empty authtoken leaves the engine open, and it says so.
    let engine = EngineProcess::start(
        &EngineOptions::default()
            .arg("--service-authtoken", "")
            .arg("--jwt-secret", " "),
    )
    .await;
    let health = engine.health().await;
    assert_eq!(health["auth"], "open", "{health}");
}

/// `synchrony.config.strict=true` turns an unknown key into a refusal to start; without it the
/// key gets a WARN and the engine starts (Confluence's launch lines carry keys of its own).
/// `synchrony config | head` ends quietly when the pipe closes.
#[tokio::test]
async fn strict_configuration_refuses_unknown_keys_and_config_survives_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let (code, _, stderr) = synchrony_tests::run_cli_with_env(
        &["serve", "--port", "0", "--data-dir", &data],
        &[("synchrony.prot", "1"), ("synchrony.config.strict", "true")],
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("unknown configuration key synchrony.prot")
            && stderr.contains("did you mean synchrony.port?")
            && stderr.contains("synchrony.config.strict is true"),
        "{stderr}"
    );
    // Not strict: a WARN, and `config` lists the keys.
    let output = config_output(&[], &[("synchrony.prot", "1")]).await;
    assert!(line(&output, "synchrony.config.strict").contains("false"));
    // A reader that is gone before the listing starts (as `| head` is after its lines): the
    // writes fail with a broken pipe, and that ends the listing without a panic.
    let mut child = std::process::Command::new(synchrony_tests::engine_binary())
        .arg("config")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A database that cannot be reached at start: exit 4, and the message names the key and where
/// it pointed (never the password).
#[tokio::test]
async fn an_unreachable_database_names_the_key_and_the_address() {
    let (code, stderr) = run_engine_to_exit(&[
        "serve",
        "--port",
        "0",
        "--database-url",
        "postgres://someone:hunter2@127.0.0.1:1/pages",
    ])
    .await;
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains("synchrony.database.url") && stderr.contains("127.0.0.1:1/pages"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "the password was logged: {stderr}"
    );
}
