//! Maintenance: document locks (`{ctx}/v1/hub-lock-state`), history eviction and named
//! versions, with real y-websocket editors connected.
#![allow(clippy::unwrap_used)]

use synchrony_tests::{node, EngineOptions, EngineProcess, YClient};

#[tokio::test]
async fn a_locked_page_refuses_edits_keeps_its_editors_and_takes_their_edits_when_unlocked() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let doc = "app/locked-page";
    let result = node("locks", &engine, doc, &[]).await;
    assert_eq!(result["taken"]["documents"][0], doc, "{result}");
    assert_eq!(
        result["listed"]["locks"][0]["documents"][0], doc,
        "{result}"
    );
    assert_eq!(result["released"]["released"], true, "{result}");
    assert_eq!(result["refusal"]["type"], "hub.error/locked");
    let text = result["text"].as_str().unwrap();
    assert_eq!(
        text, "typed under an app-wide lock. before the lock. typed while locked. ",
        "every refused edit came in after its lock"
    );
    // Storage holds them too, and no lock is left.
    let reader = YClient::synced(&engine, doc, false).await;
    assert_eq!(reader.text(), text);
    let (status, body) = engine.get("/v1/hub-lock-state").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["locks"],
        serde_json::json!([])
    );
    println!(
        "edits arrived {} ms after the release and {} ms after the expiring lock refused one",
        result["afterRelease"], result["afterExpiry"]
    );
}

#[tokio::test]
async fn lock_requests_are_checked() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let id = "6f1c1a52-55a4-4f54-9a55-5d0a4d1f1e01";
    let cases: &[(&str, &[u8], &str)] = &[
        (
            "/v1/hub-lock-state",
            b"{\"confluence-all\":true}",
            "invalid-lock-id",
        ),
        (
            "/v1/hub-lock-state?lock-id=nope",
            b"{\"confluence-all\":true}",
            "invalid-lock-id",
        ),
        (
            "/v1/hub-lock-state?lock-id=ID",
            b"{}",
            "invalid-lock-request",
        ),
        (
            "/v1/hub-lock-state?lock-id=ID",
            b"{\"point-list\":[]}",
            "invalid-lock-request",
        ),
        (
            "/v1/hub-lock-state?lock-id=ID",
            b"not json",
            "invalid-lock-request",
        ),
        (
            "/v1/hub-lock-state?lock-id=ID",
            b"{\"point-list\":[\"a\"],\"confluence-all\":true}",
            "invalid-lock-request",
        ),
        (
            "/v1/hub-lock-state?lock-id=ID",
            b"{\"confluence-all\":true,\"timeout-ms\":0}",
            "invalid-lock-request",
        ),
        (
            "/v1/hub-lock-state?lock-id=ID",
            b"{\"confluence-all\":true,\"timeout-ms\":86400001}",
            "invalid-lock-request",
        ),
        (
            "/v1/hub-lock-state?lock-id=ID",
            b"{\"point-list\":[\"../x\"]}",
            "invalid-document-id",
        ),
        (
            "/v1/hub-lock-state?lock-id=ID",
            b"{\"point-list\":[\"a\"],\"extra\":1}",
            "invalid-lock-request",
        ),
    ];
    for (path, body, kind) in cases {
        let path = format!("/synchrony{}", path.replace("ID", id));
        let response = synchrony_tests::http(engine.port, "POST", &path, &[], body).await;
        assert_eq!(response.status, 400, "{path} {}", response.text());
        assert_eq!(response.json()["type"], *kind, "{path} {}", response.text());
    }
    // Nothing was locked by any of them; releasing an unknown lock is not an error.
    let response = synchrony_tests::http(
        engine.port,
        "DELETE",
        &format!("/synchrony/v1/hub-lock-state?lock-id={id}"),
        &[],
        b"",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["released"], false);
}

#[tokio::test]
async fn versions_are_marked_read_and_restored_while_editors_watch() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let doc = "app/versioned-page";
    let result = node("versions", &engine, doc, &[]).await;
    let (v1, v2) = (&result["v1"], &result["v2"]);
    assert_eq!(v1["label"], "first");
    assert_eq!(v1["user"], "ada");
    assert_eq!(v2["label"], "second");
    assert!(v2["id"].as_i64() > v1["id"].as_i64());
    let listed: Vec<&str> = result["list"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["label"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["first", "second"]);
    assert_eq!(result["v1Text"], "first draft.");
    assert_eq!(result["v1Json"]["state"]["meta"]["title"], "Draft");
    assert_eq!(result["restored"]["restored"], v1["id"]);
    assert_eq!(result["text"], "first draft. Edited after the restore.");
    let reader = YClient::synced(&engine, doc, false).await;
    assert_eq!(reader.text(), "first draft. Edited after the restore.");

    // Bad requests get clear answers and change nothing.
    let base = format!("/synchrony/v1/data/{doc}/versions");
    let cases: &[(&str, String, &[u8], u16, &str)] = &[
        (
            "POST",
            base.clone(),
            b"{\"label\":\"  \"}",
            400,
            "invalid-request",
        ),
        (
            "POST",
            base.clone(),
            b"{\"name\":\"x\"}",
            400,
            "invalid-request",
        ),
        ("POST", base.clone(), b"nope", 400, "invalid-request"),
        ("GET", format!("{base}/999"), b"", 404, "no-such-version"),
        (
            "POST",
            format!("{base}/999/restore"),
            b"",
            404,
            "no-such-version",
        ),
        ("DELETE", format!("{base}/999"), b"", 404, "no-such-version"),
        ("PUT", base.clone(), b"x", 405, "method-not-allowed"),
        (
            "POST",
            format!("/synchrony/v1/data/{doc}"),
            b"x",
            405,
            "method-not-allowed",
        ),
    ];
    for (method, path, body, status, kind) in cases {
        let response = synchrony_tests::http(engine.port, method, path, &[], body).await;
        assert_eq!(
            response.status,
            *status,
            "{method} {path}: {}",
            response.text()
        );
        assert_eq!(response.json()["type"], *kind, "{method} {path}");
    }
    let id = v2["id"].as_i64().unwrap();
    let response =
        synchrony_tests::http(engine.port, "DELETE", &format!("{base}/{id}"), &[], b"").await;
    assert_eq!(response.status, 200, "{}", response.text());
    let (_, body) = engine.get(&format!("/v1/data/{doc}/versions")).await;
    let left: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(left["versions"].as_array().unwrap().len(), 1, "{left}");
}

#[tokio::test]
async fn eviction_compacts_under_live_editors_and_deletes_when_asked() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let doc = "app/evicted-page";
    let result = node("eviction", &engine, doc, &[]).await;
    assert!(
        result["before"]["updates"].as_u64().unwrap() > 0,
        "{result}"
    );
    assert_eq!(result["hard"]["report"]["compacted"], 1, "{result}");
    assert!(result["hard"]["report"]["rows-removed"].as_u64().unwrap() > 0);
    assert_eq!(result["afterHard"]["updates"], 0, "{result}");
    assert_eq!(result["afterHard"]["snapshots"], 1, "{result}");
    assert_eq!(
        result["soft"]["report"]["documents"], 0,
        "an open page is passed over"
    );
    assert!(result["soft"]["report"]["skipped"].as_u64().unwrap() >= 1);
    assert_eq!(result["deleting"]["report"]["deleted"], 1, "{result}");
    assert_eq!(result["afterDelete"]["updates"], 0);
    assert_eq!(result["afterDelete"]["snapshots"], 0);
    assert_eq!(
        result["afterDelete"]["versions"], 1,
        "named versions survive eviction"
    );
    assert_eq!(result["versions"], 1);
    assert!(result["text"]
        .as_str()
        .unwrap()
        .starts_with("after eviction: "));
}

/// Documents left with a log by a killed engine (never unloaded, so never compacted) are what
/// the soft job finds; content is kept unless deletion is asked for. On SQLite and PostgreSQL.
#[tokio::test]
async fn the_soft_job_compacts_what_a_killed_engine_left_and_keeps_versions() {
    let dir = tempfile::tempdir().unwrap();
    let db = synchrony_tests::PgDatabase::create().await;
    for options in [
        EngineOptions::sqlite(dir.path()),
        EngineOptions::postgres(&db.url),
    ] {
        let mut engine = EngineProcess::start(&options).await;
        let mut writer = YClient::synced(&engine, "app/left-behind", true).await;
        for i in 0..20 {
            writer.append(&format!("line {i}\n")).await;
        }
        writer
            .wait_until("every edit acknowledged", |c| c.acked_edits() == 20)
            .await;
        let want = writer.text();
        let marked = synchrony_tests::http(
            engine.port,
            "POST",
            "/synchrony/v1/data/app/left-behind/versions",
            &[],
            br#"{"label":"kept"}"#,
        )
        .await;
        assert_eq!(marked.status, 201, "{}", marked.text());
        drop(writer);
        engine.kill9().await;
        let engine = EngineProcess::start(&options).await;
        let count = |engine: &EngineProcess| {
            let port = engine.port;
            async move {
                let r = synchrony_tests::http(
                    port,
                    "GET",
                    "/synchrony/v1/history/count?doc=app/left-behind",
                    &[],
                    b"",
                )
                .await;
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()
            }
        };
        assert_eq!(
            count(&engine).await["updates"],
            20,
            "the killed engine left its log"
        );
        let evict = |path: &'static str| {
            let port = engine.port;
            async move {
                let r = synchrony_tests::http(port, "POST", path, &[], b"").await;
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()
            }
        };
        // Not idle long enough under the configured 72 hours.
        let untouched = evict("/synchrony/v1/history/evict/soft").await;
        assert_eq!(untouched["report"]["documents"], 0, "{untouched}");
        let soft = evict("/synchrony/v1/history/evict/soft?threshold-hours=0").await;
        assert_eq!(soft["report"]["compacted"], 1, "{soft}");
        assert_eq!(soft["report"]["rows-removed"], 20, "{soft}");
        let counts = count(&engine).await;
        assert_eq!(
            (
                &counts["updates"],
                &counts["snapshots"],
                &counts["versions"]
            ),
            (
                &serde_json::json!(0),
                &serde_json::json!(1),
                &serde_json::json!(1)
            ),
            "{counts}"
        );
        let reader = YClient::synced(&engine, "app/left-behind", false).await;
        assert_eq!(reader.text(), want, "eviction kept the content");
        drop(reader);
        // Open (loaded) documents are passed over by the soft job, even when deleting.
        let skipped = evict("/synchrony/v1/history/evict/soft?threshold-hours=0&delete=true").await;
        assert_eq!(skipped["report"]["deleted"], 0, "{skipped}");
        // A bad request changes nothing.
        for (path, status) in [
            ("/synchrony/v1/history/evict/medium", 404),
            ("/synchrony/v1/history/evict/soft?threshold-hours=-1", 400),
            ("/synchrony/v1/history/evict/soft?limit=0", 400),
            ("/synchrony/v1/history/count", 400),
        ] {
            let method = if path.contains("count") {
                "GET"
            } else {
                "POST"
            };
            let r = synchrony_tests::http(engine.port, method, path, &[], b"").await;
            assert_eq!(r.status, status, "{path}: {}", r.text());
        }
        let version = engine
            .get("/v1/data/app/left-behind/versions/1?format=text&name=content")
            .await;
        assert_eq!(version, (200, want.clone()), "the version survived");
    }
}

/// An editor that asked for persisted acknowledgements is never told that an edit refused under
/// a lock is stored: acknowledgements stop short of it until the lock ends and the editor's
/// answer to the engine's step 1 has brought it in.
#[tokio::test]
async fn acknowledgements_never_cover_an_edit_refused_under_a_lock() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let doc = "app/acked-lock";
    let mut editor = YClient::synced(&engine, doc, true).await;
    editor.append("before ").await;
    editor
        .wait_until("the first edit acknowledged", |c| c.acked_edits() == 1)
        .await;
    let lock = "/synchrony/v1/hub-lock-state?lock-id=2b7f5c0e-8a57-4a3e-9d0e-3c9f0f0a1b2c";
    let body = format!("{{\"point-list\":[\"{doc}\"]}}");
    let taken = synchrony_tests::http(engine.port, "POST", lock, &[], body.as_bytes()).await;
    assert_eq!(taken.status, 200, "{}", taken.text());
    editor.append("refused ").await;
    editor.append("twice ").await;
    let deadline = tokio::time::Instant::now() + synchrony_tests::WAIT;
    while engine.log().matches("update refused").count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal:\n{}",
            engine.log()
        );
        editor.drain(std::time::Duration::from_millis(20)).await;
    }
    // Whatever arrives meanwhile, no acknowledgement covers the refused edits.
    editor.drain(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        editor.acked_edits(),
        1,
        "an edit refused under the lock was acknowledged"
    );
    let released = synchrony_tests::http(engine.port, "DELETE", lock, &[], b"").await;
    assert_eq!(released.status, 200);
    editor
        .wait_until("every edit acknowledged after the lock", |c| {
            c.acked_edits() == 3
        })
        .await;
    let reader = YClient::synced(&engine, doc, false).await;
    assert_eq!(reader.text(), "before refused twice ");
}

/// A maintenance lock is a row of `doc_locks`: it outlives the engine. After a restart the page
/// is still locked (listed, and a change refused with 423) until the lock is released.
#[tokio::test]
async fn a_lock_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions::sqlite(dir.path());
    let mut engine = EngineProcess::start(&options).await;
    let doc = "app/locked-across-a-restart";
    let lock = "/synchrony/v1/hub-lock-state?lock-id=3c7d1b8e-2f4a-4e0b-8a51-0d2c9e6f7a10";
    let body = format!(r#"{{"point-list":["{doc}"],"timeout-ms":600000}}"#);
    let taken = synchrony_tests::http(engine.port, "POST", lock, &[], body.as_bytes()).await;
    assert_eq!(taken.status, 200, "{}", taken.text());
    assert!(engine.terminate().await.success());
    let engine = EngineProcess::start(&options).await;
    let (status, listed) = engine.get("/v1/hub-lock-state").await;
    assert_eq!(status, 200);
    assert!(
        listed.contains(doc),
        "the lock is gone after a restart: {listed}"
    );
    let path = format!("/v1/data/{doc}?reset=true&name=content");
    let refused = engine.request("PUT", &path, None, b"changed").await;
    assert_eq!(refused.status, 423, "{}", refused.text());
    assert_eq!(refused.json()["type"], "hub.error/locked");
    let released = synchrony_tests::http(engine.port, "DELETE", lock, &[], b"").await;
    assert_eq!(released.json()["released"], true, "{}", released.text());
    assert_eq!(
        engine.request("PUT", &path, None, b"changed").await.status,
        200
    );
}

/// A page keeps at most 1,000 named versions: the next mark gets 409 `too-many-versions` and
/// stores nothing; deleting one makes room again.
#[tokio::test]
async fn the_thousand_and_first_version_is_refused() {
    let engine = EngineProcess::start(&EngineOptions::default()).await;
    let doc = "app/many-versions";
    let put = engine
        .request(
            "PUT",
            &format!("/v1/data/{doc}?reset=true&name=content"),
            None,
            b"x",
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let base = format!("/synchrony/v1/data/{doc}/versions");
    let mark = |n: usize| {
        let base = base.clone();
        let port = engine.port;
        async move {
            let body = format!(r#"{{"label":"v{n}"}}"#);
            synchrony_tests::http(port, "POST", &base, &[], body.as_bytes()).await
        }
    };
    for batch in 0..125 {
        let answers = futures_util::future::join_all((0..8).map(|k| mark(batch * 8 + k))).await;
        for answer in answers {
            assert_eq!(answer.status, 201, "{}", answer.text());
        }
    }
    let refused = mark(1000).await;
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(refused.json()["type"], "too-many-versions");
    let (_, count) = engine.get(&format!("/v1/history/count?doc={doc}")).await;
    let count: serde_json::Value = serde_json::from_str(&count).unwrap();
    assert_eq!(count["versions"], 1000, "{count}");
    let first = synchrony_tests::http(engine.port, "DELETE", &format!("{base}/1"), &[], b"").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(mark(1001).await.status, 201);
}

/// A restore while two editors type: what was typed after the version and before the restore
/// is gone, the version's content is back, what is typed after the restore stays, and both
/// editors and storage end with the same text.
#[tokio::test]
async fn a_restore_while_editors_type_converges_on_the_version_and_later_edits() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(&EngineOptions::sqlite(dir.path())).await;
    let doc = "app/restored-under-typing";
    let mut a = YClient::synced(&engine, doc, true).await;
    let mut b = YClient::synced(&engine, doc, true).await;
    let type_round = async |a: &mut YClient, b: &mut YClient, tag: &str, i: usize| {
        a.append(&format!("<a{tag}{i}>")).await;
        b.append(&format!("<b{tag}{i}>")).await;
        let _ = a.pump_one(std::time::Duration::from_millis(5)).await;
        let _ = b.pump_one(std::time::Duration::from_millis(5)).await;
    };
    for i in 0..10 {
        type_round(&mut a, &mut b, "kept", i).await;
    }
    for c in [&mut a, &mut b] {
        let edits = c.edits;
        c.wait_until("acks before the mark", |c| c.acked_edits() == edits)
            .await;
    }
    let marked = engine
        .request(
            "POST",
            &format!("/v1/data/{doc}/versions"),
            None,
            br#"{"label":"v"}"#,
        )
        .await;
    assert_eq!(marked.status, 201, "{}", marked.text());
    let version = marked.json()["version"]["id"].as_i64().unwrap();
    for i in 0..10 {
        type_round(&mut a, &mut b, "gone", i).await;
    }
    for c in [&mut a, &mut b] {
        let edits = c.edits;
        c.wait_until("acks before the restore", |c| c.acked_edits() == edits)
            .await;
    }
    // The restore goes out while both keep typing.
    let restore_path = format!("/v1/data/{doc}/versions/{version}/restore");
    let restore = engine.request("POST", &restore_path, None, b"");
    let typing = async {
        for i in 0..10 {
            type_round(&mut a, &mut b, "during", i).await;
        }
    };
    let (restored, ()) = tokio::join!(restore, typing);
    assert_eq!(restored.status, 200, "{}", restored.text());
    for i in 0..10 {
        type_round(&mut a, &mut b, "after", i).await;
    }
    a.wait_until("the last edit of b", |c| c.text().contains("<bafter9>"))
        .await;
    b.wait_until("the last edit of a", |c| c.text().contains("<aafter9>"))
        .await;
    for c in [&mut a, &mut b] {
        let edits = c.edits;
        c.wait_until("every edit acknowledged", |c| c.acked_edits() == edits)
            .await;
    }
    a.drain(std::time::Duration::from_millis(200)).await;
    b.drain(std::time::Duration::from_millis(200)).await;
    let text = a.text();
    assert_eq!(b.text(), text);
    let (stored, _) =
        synchrony_tests::stored_text(&synchrony_tests::sqlite_url(dir.path()), doc).await;
    assert_eq!(stored, text);
    for i in 0..10 {
        for who in ["a", "b"] {
            assert!(
                text.contains(&format!("<{who}kept{i}>")),
                "{who}kept{i} lost: {text}"
            );
            assert!(
                !text.contains(&format!("<{who}gone{i}>")),
                "{who}gone{i} survived: {text}"
            );
            assert!(
                text.contains(&format!("<{who}after{i}>")),
                "{who}after{i} lost: {text}"
            );
        }
    }
}
