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
