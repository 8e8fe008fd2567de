//! Network namespaces a test builds for itself: a bridge in a namespace of its own, and a
//! namespace per node joined to it by a veth pair, node i at `10.213.<subnet>.(i+1)/24`.
//! Optionally a veth pair into the test's own namespace (`.254`), so that the test reaches the
//! nodes (and nothing else changes: the host side routes only that /24). Everything is removed
//! when the value drops. Needs `ip` and the right to make namespaces (root).

use std::process::Command;

/// Runs `ip` with `args`; the error names the command and what it said.
pub fn ip(args: &[&str]) -> Result<(), String> {
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

pub struct Network {
    tag: String,
    subnet: u8,
    namespaces: Vec<String>,
}

impl Network {
    pub fn build(subnet: u8, nodes: usize, host_link: bool) -> Result<Self, String> {
        sweep();
        // The test process's id, so that a later run can tell (and remove) what a killed one
        // left behind; a random letter, so that two networks of one process differ.
        let tag = format!(
            "{:x}{}",
            std::process::id(),
            (b'a' + rand::random::<u8>() % 26) as char
        );
        let mut net = Network {
            tag: tag.clone(),
            subnet,
            namespaces: Vec::new(),
        };
        let bridge = net.bridge();
        ip(&["netns", "add", &bridge])?;
        net.namespaces.push(bridge.clone());
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        for i in 0..nodes {
            let ns = net.node(i);
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            let (inner, outer) = (format!("ni{i}{tag}"), format!("no{i}{tag}"));
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "netns", &bridge])?;
            ip(&["-n", &bridge, "link", "set", &outer, "master", "br0", "up"])?;
            let address = format!("{}/24", net.address(i));
            ip(&["-n", &ns, "addr", "add", &address, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", &inner])?;
        }
        if host_link {
            let (host, outer) = (format!("nh{tag}"), format!("nb{tag}"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &outer])?;
            ip(&["link", "set", &outer, "netns", &bridge])?;
            ip(&["-n", &bridge, "link", "set", &outer, "master", "br0", "up"])?;
            ip(&[
                "addr",
                "add",
                &format!("10.213.{subnet}.254/24"),
                "dev",
                &host,
            ])?;
            ip(&["link", "set", &host, "up"])?;
        }
        Ok(net)
    }

    pub fn bridge(&self) -> String {
        format!("snt-br-{}", self.tag)
    }

    /// The namespace of node `i`.
    pub fn node(&self, i: usize) -> String {
        format!("snt-n{i}-{}", self.tag)
    }

    /// The address of node `i`.
    pub fn address(&self, i: usize) -> String {
        format!("10.213.{}.{}", self.subnet, i + 1)
    }

    /// Cuts node `a` and node `b` apart (each drops what is meant for the other), leaving
    /// both reachable from everywhere else.
    pub fn cut(&self, a: usize, b: usize) -> Result<(), String> {
        ip(&[
            "-n",
            &self.node(a),
            "route",
            "add",
            "blackhole",
            &self.address(b),
        ])?;
        ip(&[
            "-n",
            &self.node(b),
            "route",
            "add",
            "blackhole",
            &self.address(a),
        ])
    }

    /// Undoes [`Network::cut`].
    pub fn heal(&self, a: usize, b: usize) -> Result<(), String> {
        ip(&[
            "-n",
            &self.node(a),
            "route",
            "del",
            "blackhole",
            &self.address(b),
        ])?;
        ip(&[
            "-n",
            &self.node(b),
            "route",
            "del",
            "blackhole",
            &self.address(a),
        ])
    }
}

/// Removes namespaces a test process that no longer runs left behind (it was killed before its
/// [`Network`] dropped).
fn sweep() {
    let Ok(output) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("snt-") else {
            continue;
        };
        let tag = rest.rsplit('-').next().unwrap_or_default();
        let pid = u32::from_str_radix(tag.get(..tag.len().saturating_sub(1)).unwrap_or(""), 16);
        if pid.is_ok_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth pair, and so the other end.
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
