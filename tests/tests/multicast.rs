//! Multicast membership (`cluster.join.type=multicast`) between nodes in network namespaces the
//! test creates: each node in its own namespace, joined by veth pairs to a bridge in another
//! (loopback does not carry multicast between namespaces). Needs `ip` and the right to create
//! namespaces (root); without them the test says so and is skipped.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use synchrony_tests::{EngineOptions, EngineProcess, WAIT};

const SECRET: &str = "multicast-test-secret-0123456789";

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Namespaces (and the links in them) made for one test, removed when it ends.
struct Network {
    tag: String,
    namespaces: Vec<String>,
}

impl Network {
    /// A bridge namespace and `nodes` node namespaces, node i at 10.213.7.(i+1)/24.
    fn build(nodes: usize) -> Result<Self, String> {
        let tag = format!("{:05x}", rand::random::<u32>() & 0xfffff);
        let mut net = Network {
            tag: tag.clone(),
            namespaces: Vec::new(),
        };
        let bridge = format!("smc-br-{tag}");
        ip(&["netns", "add", &bridge])?;
        net.namespaces.push(bridge.clone());
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        for i in 0..nodes {
            let ns = net.node(i);
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            let (inner, outer) = (format!("mi{i}{tag}"), format!("mo{i}{tag}"));
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "netns", &bridge])?;
            ip(&["-n", &bridge, "link", "set", &outer, "master", "br0", "up"])?;
            let address = format!("{}/24", Self::address(i));
            ip(&["-n", &ns, "addr", "add", &address, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", &inner])?;
        }
        Ok(net)
    }

    fn node(&self, i: usize) -> String {
        format!("smc-n{i}-{}", self.tag)
    }

    fn address(i: usize) -> String {
        format!("10.213.7.{}", i + 1)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn node(net: &Network, i: usize, secret: &str) -> EngineOptions {
    let address = Network::address(i);
    let mut options = EngineOptions::default()
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
        .filter(|l| l.contains("cluster view changed"))
        .last()
        .and_then(|l| l.split("live=[").nth(1))
        .map_or(0, |live| live.split(',').count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_by_multicast_and_strangers_are_not_let_in() {
    let net = match Network::build(4) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("SKIPPED: cannot build network namespaces here ({why})");
            return;
        }
    };
    let started = tokio::time::Instant::now();
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(EngineProcess::start(&node(&net, i, SECRET)).await);
    }
    // A node with another secret announces too: nobody dials it, and it dials nobody.
    let outsider =
        EngineProcess::start(&node(&net, 3, "another-secret-of-enough-length")).await;
    let deadline = started + WAIT;
    while nodes.iter().any(|n| live_members(n) != 3) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the nodes did not find each other by multicast within {WAIT:?}:\n{}",
            nodes.iter().map(EngineProcess::log).collect::<Vec<_>>().join("\n-----\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("three nodes in separate namespaces found each other by multicast in {:?}", started.elapsed());
    for n in &nodes {
        assert!(n.log().contains("announcing on multicast"), "{}", n.log());
    }
    assert!(
        !outsider.log().contains("peer link up"),
        "a node with another secret linked:\n{}",
        outsider.log()
    );
    assert!(nodes.iter().all(|n| live_members(n) == 3));
}
