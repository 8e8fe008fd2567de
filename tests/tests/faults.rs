//! Faults of real components while editors work: storage refusing a change, stopping, filling.
#![allow(clippy::unwrap_used)]

use synchrony_tests::{EngineOptions, EngineProcess, PgDatabase, YClient, WAIT};

async fn sql(url: &str, statement: &str) {
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap();
    sqlx::raw_sql(statement).execute(&mut conn).await.unwrap();
}

/// A delete that storage refuses leaves the document and its editors as they were: nobody is
/// told 4404 until the rows are gone.
#[tokio::test]
async fn a_delete_storage_refuses_leaves_editors_connected() {
    sqlx::any::install_default_drivers();
    let db = PgDatabase::create().await;
    let engine = EngineProcess::start(&EngineOptions::postgres(&db.url)).await;
    let doc = "app/undeletable";
    let mut a = YClient::synced(&engine, doc, true).await;
    let mut b = YClient::synced(&engine, doc, false).await;
    a.append("kept;").await;
    a.wait_until("ack", |c| c.acked_edits() == 1).await;
    sql(
        &db.url,
        "CREATE FUNCTION refuse_delete() RETURNS trigger AS $$ \
         BEGIN RAISE EXCEPTION 'deletes refused by the test'; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER refuse BEFORE DELETE ON doc_updates \
         FOR EACH ROW EXECUTE FUNCTION refuse_delete();",
    )
    .await;
    let refused = engine
        .request("DELETE", &format!("/v1/data/{doc}"), None, b"")
        .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    a.append("after;").await;
    b.wait_until("the edit after the refused delete", |c| {
        c.text() == "kept;after;"
    })
    .await;

    sql(&db.url, "DROP TRIGGER refuse ON doc_updates;").await;
    let deleted = engine
        .request("DELETE", &format!("/v1/data/{doc}"), None, b"")
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    for client in [&mut a, &mut b] {
        match client.raw.ended(WAIT).await {
            synchrony_tests::Ended::Closed { code, .. } => assert_eq!(code, 4404),
            other => panic!("{other:?}"),
        }
    }
}

/// How long the outage lasts (`SYNCHRONY_TEST_OUTAGE_SECS`, default 60).
fn outage() -> std::time::Duration {
    let secs = std::env::var("SYNCHRONY_TEST_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    std::time::Duration::from_secs(secs)
}

/// Polls `check` until it holds, with a deadline and a message.
async fn eventually(what: &str, within: std::time::Duration, check: impl AsyncFn() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// PostgreSQL stopped under two typing editors: they keep seeing each other, nothing is
/// acknowledged while it is down, the heartbeat and health say so at once, REST writes answer
/// 503 within their deadline; once it is back every edit commits and the acknowledgements
/// flow, and storage holds exactly what the editors hold.
#[tokio::test]
async fn postgres_stopped_under_typing_editors() {
    let Some(pg) = synchrony_tests::PrivatePostgres::start().await else {
        synchrony_tests::skip(
            synchrony_tests::Lacking::PostgresBinaries,
            "Debian's postgresql is not installed",
        );
        return;
    };
    let engine = EngineProcess::start(&EngineOptions::postgres(&pg.url())).await;
    // A second engine on the same database, stopped with SIGTERM while storage is down.
    let mut doomed =
        EngineProcess::start(&EngineOptions::postgres(&pg.url()).arg("--drain-timeout-secs", 3))
            .await;
    let mut doomed_editor = YClient::synced(&doomed, "app/doomed", true).await;
    let mut doomed_watcher = YClient::synced(&doomed, "app/doomed", false).await;
    // A loaded page to delete while storage is down (its editor stays), and two to fill the
    // commit queue (loaded now: nothing loads while storage is down).
    let _elsewhere = YClient::synced(&engine, "app/elsewhere", false).await;
    let mut fillers = [
        YClient::synced(&engine, "app/filler-1", false).await,
        YClient::synced(&engine, "app/filler-2", false).await,
    ];
    let doc = "app/outage";
    let mut a = YClient::synced(&engine, doc, true).await;
    let mut b = YClient::synced(&engine, doc, true).await;
    for i in 0..5 {
        a.append(&format!("a{i};")).await;
        b.append(&format!("b{i};")).await;
    }
    a.wait_until("acks before the outage", |c| c.acked_edits() == 5)
        .await;
    b.wait_until("acks before the outage", |c| c.acked_edits() == 5)
        .await;

    pg.stop_server().await;
    let stopped = tokio::time::Instant::now();
    // The first edit after the stop makes a commit fail: the heartbeat follows at once.
    a.append("first-in-outage;").await;
    eventually("heartbeat failing", WAIT, async || {
        engine.get("/heartbeat").await.0 == 503
    })
    .await;
    let noticed = stopped.elapsed();
    // Documented: about 2 s (a probe every second and the first failed commit).
    assert!(
        noticed < std::time::Duration::from_secs(5),
        "the heartbeat failed only {noticed:?} after the database stopped"
    );
    let health = engine.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["storage"]["status"], "unavailable", "{health}");
    // The first edit after the stop is what failed: one uncommitted, with its bytes.
    assert!(
        health["storage"]["uncommitted_updates"].as_u64() >= Some(1),
        "{health}"
    );
    assert!(
        health["storage"]["uncommitted_bytes"].as_u64() > Some(0),
        "{health}"
    );
    let reason = health["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("group commits failing") || reason.contains("storage probe failing"),
        "{health}"
    );

    let started = tokio::time::Instant::now();
    let put = engine
        .request(
            "PUT",
            &format!("/v1/data/{doc}?reset=true&name=other"),
            None,
            b"x",
        )
        .await;
    assert_eq!(put.status, 503, "{}", put.text());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the REST write took {:?}",
        started.elapsed()
    );

    // Meanwhile, against deadlines the README gives: a delete gives up after 5 s (503); a
    // join to a page that is not loaded ends within its 15 s deadline with 1013 (try again); a
    // SIGTERM with edits not committed ends the drain at its timeout with exit 5 and an ERROR
    // naming them.
    let deadlines = async {
        let started = tokio::time::Instant::now();
        let delete = engine
            .request("DELETE", "/v1/data/app/elsewhere", None, b"")
            .await;
        let took = started.elapsed();
        assert_eq!(delete.status, 503, "{}", delete.text());
        assert!(
            took >= std::time::Duration::from_secs(4) && took < std::time::Duration::from_secs(10),
            "the delete gave up after {took:?}, not at 5 s"
        );
        let started = tokio::time::Instant::now();
        let mut joiner = synchrony_tests::RawClient::connect(&engine.ws_url("app/not-loaded", ""))
            .await
            .unwrap();
        let ended = joiner.ended(WAIT).await;
        let took = started.elapsed();
        assert!(
            matches!(&ended, synchrony_tests::Ended::Closed { code: 1013, .. }),
            "a join during the outage ended with {ended:?}"
        );
        assert!(
            took < std::time::Duration::from_secs(20),
            "the join gave up after {took:?}, past its 15 s deadline"
        );
        println!("a join during the outage ended with 1013 after {took:?}");
        // The edit is in the engine (its broadcast reached the watcher) before the SIGTERM.
        doomed_editor.append("never committed;").await;
        doomed_watcher
            .wait_until("the doomed edit broadcast", |c| {
                c.text() == "never committed;"
            })
            .await;
        let status = doomed.terminate().await;
        assert_eq!(
            status.code(),
            Some(5),
            "SIGTERM with storage down: {status:?}"
        );
        let log = doomed.log();
        assert!(
            log.contains("drain did not finish in time")
                && log.contains("uncommitted_updates=")
                && !log.contains("uncommitted_updates=0"),
            "{log}"
        );
        assert_eq!(doomed_editor.acked_edits(), 0);
    };
    // Both keep typing through the outage and see each other; nothing new is acknowledged.
    let mut i = 0;
    let typing = async {
        while stopped.elapsed() < outage() {
            a.append(&format!("A{i};")).await;
            b.append(&format!("B{i};")).await;
            let (want_a, want_b) = (format!("A{i};"), format!("B{i};"));
            a.wait_until("b's edit during the outage", |c| c.text().contains(&want_b))
                .await;
            b.wait_until("a's edit during the outage", |c| c.text().contains(&want_a))
                .await;
            i += 1;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    };
    tokio::join!(deadlines, typing);
    // The commit queue holds 64 MiB: writers of 1 MiB edits (on two pages, each well under
    // the 64 MiB page limit) fill it and are refused with 1013 (their clients keep what they
    // typed), and so is a join while the queue is full.
    let mib = "f".repeat(1 << 20);
    let mut sent = 0;
    let refused = 'filling: loop {
        for filler in &mut fillers {
            assert!(sent < 200, "the queue never filled after {sent} MiB");
            if !filler.try_append(&mib).await {
                break 'filling filler.raw.ended(WAIT).await;
            }
            sent += 1;
            if let synchrony_tests::Next::Ended(code) =
                filler.pump_one(std::time::Duration::from_millis(1)).await
            {
                break 'filling synchrony_tests::Ended::Closed {
                    code: code.unwrap_or(0),
                    reason: filler.raw.closed.clone().unwrap_or_default(),
                };
            }
        }
    };
    assert!(
        matches!(&refused, synchrony_tests::Ended::Closed { code: 1013, .. }),
        "a writer filling the queue ended with {refused:?} after {sent} MiB"
    );
    assert!(
        (58..=72).contains(&sent),
        "the 64 MiB queue took {sent} MiB"
    );
    let mut late = synchrony_tests::RawClient::connect(&engine.ws_url("app/late", ""))
        .await
        .unwrap();
    let ended = late.ended(WAIT).await;
    assert!(
        matches!(&ended, synchrony_tests::Ended::Closed { code: 1013, .. }),
        "a join while the queue is full ended with {ended:?}"
    );
    assert_eq!(
        a.acked_edits(),
        5,
        "an edit was acknowledged while storage was down"
    );
    assert_eq!(
        b.acked_edits(),
        5,
        "an edit was acknowledged while storage was down"
    );

    pg.start_server().await;
    let (ea, eb) = (a.edits, b.edits);
    a.wait_until("acks after the outage", |c| c.acked_edits() == ea)
        .await;
    b.wait_until("acks after the outage", |c| c.acked_edits() == eb)
        .await;
    eventually("heartbeat back", WAIT, async || {
        engine.get("/heartbeat").await.0 == 200
    })
    .await;
    a.drain(std::time::Duration::from_millis(300)).await;
    b.drain(std::time::Duration::from_millis(300)).await;
    assert_eq!(a.text(), b.text());
    let (stored, _) = synchrony_tests::stored_text(&pg.url(), doc).await;
    assert_eq!(stored, a.text(), "storage differs from the editors");
    eprintln!(
        "outage of {:?}: heartbeat failed {noticed:?} after the stop, {i} rounds of edits",
        outage()
    );
    // One ERROR when commits started failing, one INFO when they succeeded again.
    let log = engine.log();
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        count("group commit failed: storage unavailable"),
        1,
        "{log}"
    );
    assert_eq!(
        count("group commit succeeded: storage available again"),
        1,
        "{log}"
    );
}

/// A small tmpfs the test mounts (and unmounts when dropped); None without the right to mount.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills what is left with a file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let small = [0u8; 512];
        while file.write_all(&small).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// SQLite on a disk that fills up under two typing editors: commits fail with a clear error,
/// the heartbeat and health say so, editors keep seeing each other, nothing is acknowledged
/// until it is durable; when space returns everything held commits and the acknowledgements
/// flow.
#[tokio::test]
async fn sqlite_on_a_full_disk() {
    let Some(disk) = SmallDisk::mount(16 << 20) else {
        synchrony_tests::skip(
            synchrony_tests::Lacking::Mount,
            "cannot mount a tmpfs here (needs root)",
        );
        return;
    };
    let data = disk.path().join("data");
    let engine = EngineProcess::start(&EngineOptions::sqlite(&data)).await;
    let doc = "app/full-disk";
    let mut a = YClient::synced(&engine, doc, true).await;
    let mut b = YClient::synced(&engine, doc, true).await;
    a.append("before;").await;
    a.wait_until("ack before the disk fills", |c| c.acked_edits() == 1)
        .await;

    let filler = disk.fill();
    // Edits go on; commits fail once SQLite needs a page it cannot get (its WAL may still have
    // room for a few), and the heartbeat follows.
    let mut i = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut filling = 0;
    while engine.get("/heartbeat").await.0 == 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "heartbeat still OK after {filling} edits on a full disk"
        );
        a.append(&format!("fill{filling};{}", "x".repeat(2000)))
            .await;
        filling += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        a.append(&format!("A{i};")).await;
        b.append(&format!("B{i};")).await;
        let (want_a, want_b) = (format!("A{i};"), format!("B{i};"));
        a.wait_until("b's edit on a full disk", |c| c.text().contains(&want_b))
            .await;
        b.wait_until("a's edit on a full disk", |c| c.text().contains(&want_a))
            .await;
        i += 1;
    }
    let health = engine.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    let problem = health["storage"]["problem"].as_str().unwrap_or_default();
    assert!(problem.contains("database or disk is full"), "{health}");
    assert!(
        a.acked_edits() < a.edits && b.acked_edits() < b.edits,
        "edits were acknowledged on a full disk"
    );

    std::fs::remove_file(filler).unwrap();
    let (ea, eb) = (a.edits, b.edits);
    a.wait_until("acks once space returns", |c| c.acked_edits() == ea)
        .await;
    b.wait_until("acks once space returns", |c| c.acked_edits() == eb)
        .await;
    eventually("heartbeat back", WAIT, async || {
        engine.get("/heartbeat").await.0 == 200
    })
    .await;
    a.drain(std::time::Duration::from_millis(300)).await;
    b.drain(std::time::Duration::from_millis(300)).await;
    assert!(engine.log().contains("full"), "the log names the cause");
    assert_eq!(a.text(), b.text());
    // Everything was acknowledged: killed now (no drain, no last commit), the engine leaves
    // all of it in the database.
    let mut engine = engine;
    engine.kill9().await;
    let (stored, _) = synchrony_tests::stored_text(&synchrony_tests::sqlite_url(&data), doc).await;
    assert_eq!(stored, a.text(), "engine log:\n{}", engine.log());
}
