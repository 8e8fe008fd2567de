//! Every input the fuzzers found worth keeping (`tests/fuzz/regressions/<target>/`), replayed
//! through the same checks the fuzz targets run, on stable, in the normal suite.
#![allow(clippy::unwrap_used)]

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = synchrony_tests::workspace_root()
        .join("tests/fuzz/regressions")
        .join(target);
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} fails its check", path.display());
        replayed += 1;
    }
    replayed
}

#[test]
fn frames() {
    assert!(replay("frame", synchrony::fuzzing::frame) > 0);
}

#[test]
fn updates() {
    assert!(replay("update", synchrony::fuzzing::update) > 0);
}

#[test]
fn awareness_states() {
    assert!(replay("awareness", synchrony::fuzzing::awareness_json) > 0);
}

#[test]
fn sessions() {
    assert!(replay("session", synchrony::fuzzing::session) > 0);
}
