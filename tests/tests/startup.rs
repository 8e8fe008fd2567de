//! Startup failures end with the documented exit code and a message naming the cause.
#![allow(clippy::unwrap_used)]

use synchrony_tests::{run_engine_to_exit, EngineOptions, EngineProcess};

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
