//! Multicast membership (`cluster.join.type=multicast`) between nodes in network namespaces the
//! test creates: each node in its own namespace, joined by veth pairs to a bridge in another
//! (loopback does not carry multicast between namespaces). Needs `ip` and the right to create
//! namespaces (root); without them the test says so and is skipped.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use synchrony_tests::netns::Network;
use synchrony_tests::{EngineOptions, EngineProcess, PgDatabase, WAIT};

const SECRET: &str = "multicast-test-secret-0123456789";

fn node(net: &Network, db: &str, i: usize, secret: &str) -> EngineOptions {
    let address = net.address(i);
    let mut options = EngineOptions::postgres(db)
        .arg("--cluster-join-type", "multicast")
        .arg("--cluster-bind", &address)
        .arg("--cluster-interfaces", &address)
        .arg("--cluster-authentication-secret", secret)
        .arg("--cluster-name", "multicast-test");
    options.netns = Some(net.node(i));
    options
}

/// How many members the node's last view held, from its log.
fn live_members(engine: &EngineProcess) -> usize {
    engine
        .log()
        .lines()
        .rfind(|l| l.contains("cluster view changed"))
        .and_then(|l| l.split("live=[").nth(1))
        .map_or(0, |live| live.split(',').count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_by_multicast_and_strangers_are_not_let_in() {
    let net = match Network::build(7, 4, false) {
        Ok(net) => net,
        Err(why) => {
            synchrony_tests::skip(
                synchrony_tests::Lacking::NetworkNamespaces,
                &why.to_string(),
            );
            return;
        }
    };
    // A cluster needs its one PostgreSQL database, which nodes in other namespaces reach over
    // its Unix socket.
    let db = PgDatabase::create().await;
    let Some(url) = db.usable_socket_url().await else {
        return;
    };
    let started = tokio::time::Instant::now();
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(EngineProcess::start(&node(&net, &url, i, SECRET)).await);
    }
    // A node with another secret announces too: nobody dials it, and it dials nobody.
    let outsider =
        EngineProcess::start(&node(&net, &url, 3, "another-secret-of-enough-length")).await;
    let deadline = started + WAIT;
    while nodes.iter().any(|n| live_members(n) != 3) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the nodes did not find each other by multicast within {WAIT:?}:\n{}",
            nodes
                .iter()
                .map(EngineProcess::log)
                .collect::<Vec<_>>()
                .join("\n-----\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "three nodes in separate namespaces found each other by multicast in {:?}",
        started.elapsed()
    );
    for n in &nodes {
        assert!(n.log().contains("announcing on multicast"), "{}", n.log());
    }
    // It has heard the members' announcements and ignored them, and nobody linked to it.
    while !outsider
        .log()
        .contains("is not a member's announcement ignored")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outsider heard no announcement:\n{}",
            outsider.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !outsider.log().contains("peer link up"),
        "a node with another secret linked:\n{}",
        outsider.log()
    );
    assert!(nodes.iter().all(|n| live_members(n) == 3));
}
