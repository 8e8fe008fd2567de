//! Network partitions between nodes in network namespaces the test builds: each side keeps
//! serving its clients while the link is cut; once it heals, every document converges on every
//! node and in storage, and nothing acknowledged is lost. Needs `ip` and the right to make
//! namespaces (root); without them the test says so and is skipped.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use synchrony::auth::{mint_hs256, MintClaims};
use synchrony_tests::netns::Network;
use synchrony_tests::{stored_text, EngineOptions, EngineProcess, PgDatabase, YClient, WAIT};

const SECRET: &str = "partition-test-secret-0123456789";
const JWT: &str = "partition-test-jwt-secret-0123456789";

fn token() -> String {
    let now = synchrony::gate::unix_now();
    let claims = MintClaims {
        iss: Some("test".into()),
        aud: None,
        sub: Some("editor".into()),
        iat: now,
        exp: now + 3600,
        access: [("/data/partition/page".to_owned(), "full".to_owned())].into(),
        session: None,
    };
    mint_hs256(&claims, JWT).unwrap()
}

/// An admin token: the nodes enforce tokens, and the test asks them from another namespace, so
/// it is not one of their own machine's callers.
fn admin_token() -> String {
    let now = synchrony::gate::unix_now();
    let claims = MintClaims {
        iss: Some("test".into()),
        aud: None,
        sub: Some("operator".into()),
        iat: now,
        exp: now + 3600,
        access: [("admin".to_owned(), "admin".to_owned())].into(),
        session: None,
    };
    mint_hs256(&claims, JWT).unwrap()
}

async fn cluster_json(node: &EngineProcess) -> serde_json::Value {
    let answer = node
        .request("GET", "/v1/cluster", Some(&admin_token()), b"")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.json()
}

async fn wait_live(nodes: &[&EngineProcess], n: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    for node in nodes {
        loop {
            let view = cluster_json(node).await;
            if view["live"].as_array().map(Vec::len) == Some(n) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: {view}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_keeps_both_sides_serving_and_heals_with_nothing_lost() {
    let net = match Network::build(20 + (std::process::id() % 200) as u8, 3, true) {
        Ok(net) => net,
        Err(why) => {
            synchrony_tests::skip(
                synchrony_tests::Lacking::NetworkNamespaces,
                &why.to_string(),
            );
            return;
        }
    };
    let db = PgDatabase::create().await;
    let Some(url) = db.usable_socket_url().await else {
        return;
    };
    let peers: Vec<String> = (0..3)
        .map(|i| format!("{}:25500", net.address(i)))
        .collect();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut options = EngineOptions::postgres(&url)
            .arg("--jwt-secret", JWT)
            .arg("--cluster-join-type", "tcpip")
            .arg("--cluster-bind", net.address(i))
            .arg("--cluster-join-tcpip-members", peers.join(","))
            .arg("--cluster-authentication-secret", SECRET)
            .arg("--cluster-name", "partition-test");
        options.netns = Some(net.node(i));
        // Clients reach it on the client network, which the partition leaves up.
        options.host = Some(net.client_address(i));
        nodes.push(EngineProcess::start(&options).await);
    }
    let all: Vec<&EngineProcess> = nodes.iter().collect();
    wait_live(&all, 3, "the three nodes to link").await;

    // One page, an editor on each side: node 0 (with node 1) and node 2.
    let doc = format!("partition/page?token={}", token());
    let mut left = YClient::synced(&nodes[0], &doc, true).await;
    let mut right = YClient::synced(&nodes[2], &doc, true).await;
    let mut markers = Vec::new();
    let type_round = |round: usize, _: &mut YClient, _: &mut YClient, markers: &mut Vec<String>| {
        let (l, r) = (format!("<L{round}>"), format!("<R{round}>"));
        markers.push(l.clone());
        markers.push(r.clone());
        (l, r)
    };
    for round in 0..5 {
        let (l, r) = type_round(round, &mut left, &mut right, &mut markers);
        left.append(&l).await;
        right.append(&r).await;
    }

    // Node 2's cluster link goes down: it is cut off from nodes 0 and 1, and the test's editors
    // still reach all three on the client network.
    let cut = tokio::time::Instant::now();
    net.unplug(2).unwrap();
    let mut round = 5;
    let deadline = cut + WAIT;
    loop {
        let (l, r) = type_round(round, &mut left, &mut right, &mut markers);
        left.append(&l).await;
        right.append(&r).await;
        round += 1;
        left.drain(Duration::from_millis(5)).await;
        right.drain(Duration::from_millis(5)).await;
        let split = cluster_json(&nodes[2]).await["live"]
            .as_array()
            .map(Vec::len)
            == Some(1)
            && cluster_json(&nodes[0]).await["live"]
                .as_array()
                .map(Vec::len)
                == Some(2);
        if split {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partition was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let noticed = cut.elapsed();
    // Both sides keep serving: each editor's edits are acknowledged on its side.
    for _ in 0..10 {
        let (l, r) = type_round(round, &mut left, &mut right, &mut markers);
        left.append(&l).await;
        right.append(&r).await;
        round += 1;
    }
    for (name, client) in [("left", &mut left), ("right", &mut right)] {
        let edits = client.edits;
        client
            .wait_until(
                &format!("the {name} editor's edits acknowledged during the partition"),
                |c| c.acked_edits() == edits,
            )
            .await;
    }

    // Heal: the views merge, one owner remains, and both editors and storage hold everything.
    let healed = tokio::time::Instant::now();
    net.plug(2).unwrap();
    wait_live(&all, 3, "the views to merge after the heal").await;
    let merged = healed.elapsed();
    let deadline = healed + WAIT;
    loop {
        left.drain(Duration::from_millis(20)).await;
        right.drain(Duration::from_millis(20)).await;
        let done = markers
            .iter()
            .all(|m| left.text().contains(m.as_str()) && right.text().contains(m.as_str()))
            && left.text() == right.text();
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "editors did not converge after the heal:\nleft:  {}\nright: {}",
            left.text(),
            right.text()
        );
    }
    let converged = healed.elapsed();
    let (stored, _) = stored_text(&db.url, "partition/page").await;
    for marker in &markers {
        assert!(
            stored.contains(marker.as_str()),
            "{marker} missing from storage"
        );
    }
    println!(
        "partition noticed in {noticed:?}; after the heal, views merged in {merged:?} and both editors converged in {converged:?}; {} edits, none lost",
        markers.len()
    );
}
