//! Network namespaces a test builds for itself: a namespace holding the bridges, and a
//! namespace per node joined to the cluster bridge by a veth pair, node i at
//! `10.213.<subnet>.(i+1)/24`. Optionally a second network for clients: each node gets a second
//! veth pair into a client bridge (`10.214.<subnet>.(i+1)/24`), which the test's own namespace
//! joins too (`.254`; the host side routes only that /24, so nothing else changes). With it,
//! the cluster link of a node can be unplugged (`ip link set … down`) while the test's clients
//! still reach every node. Everything is removed when the value drops. Needs `ip` and the right
//! to make namespaces (root).

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
    pub fn build(subnet: u8, nodes: usize, client_network: bool) -> Result<Self, String> {
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
        if client_network {
            ip(&["-n", &bridge, "link", "add", "br1", "type", "bridge"])?;
            ip(&["-n", &bridge, "link", "set", "br1", "up"])?;
        }
        for i in 0..nodes {
            let ns = net.node(i);
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            net.plug_in(i, "br0", &net.link(i), &net.address(i))?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "224.0.0.0/4",
                "dev",
                &net.link(i),
            ])?;
            if client_network {
                net.plug_in(i, "br1", &format!("nc{i}{tag}"), &net.client_address(i))?;
            }
        }
        if client_network {
            let (host, outer) = (format!("nh{tag}"), format!("nb{tag}"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &outer])?;
            ip(&["link", "set", &outer, "netns", &bridge])?;
            ip(&["-n", &bridge, "link", "set", &outer, "master", "br1", "up"])?;
            ip(&[
                "addr",
                "add",
                &format!("10.214.{subnet}.254/24"),
                "dev",
                &host,
            ])?;
            ip(&["link", "set", &host, "up"])?;
        }
        Ok(net)
    }

    /// Joins node `i`'s namespace to bridge `bridge` by a veth pair whose inner end is `inner`,
    /// at `address`/24.
    fn plug_in(&self, i: usize, bridge: &str, inner: &str, address: &str) -> Result<(), String> {
        let (ns, outer) = (self.node(i), format!("{inner}o"));
        ip(&["link", "add", inner, "type", "veth", "peer", "name", &outer])?;
        ip(&["link", "set", inner, "netns", &ns])?;
        ip(&["link", "set", &outer, "netns", &self.bridge()])?;
        ip(&[
            "-n",
            &self.bridge(),
            "link",
            "set",
            &outer,
            "master",
            bridge,
            "up",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            inner,
        ])?;
        ip(&["-n", &ns, "link", "set", inner, "up"])
    }

    /// The name of node `i`'s cluster interface (inside its namespace).
    fn link(&self, i: usize) -> String {
        format!("ni{i}{}", self.tag)
    }

    pub fn bridge(&self) -> String {
        format!("snt-br-{}", self.tag)
    }

    /// The namespace of node `i`.
    pub fn node(&self, i: usize) -> String {
        format!("snt-n{i}-{}", self.tag)
    }

    /// The address of node `i` on the cluster network.
    pub fn address(&self, i: usize) -> String {
        format!("10.213.{}.{}", self.subnet, i + 1)
    }

    /// The address of node `i` on the client network.
    pub fn client_address(&self, i: usize) -> String {
        format!("10.214.{}.{}", self.subnet, i + 1)
    }

    /// Takes node `i`'s cluster link down (`ip link set … down`): it no longer reaches any other
    /// node, nor they it; its client network stays up.
    pub fn unplug(&self, i: usize) -> Result<(), String> {
        ip(&["-n", &self.node(i), "link", "set", &self.link(i), "down"])
    }

    /// Undoes [`Network::unplug`] (the kernel dropped the link's multicast route with it).
    pub fn plug(&self, i: usize) -> Result<(), String> {
        ip(&["-n", &self.node(i), "link", "set", &self.link(i), "up"])?;
        let _ = ip(&[
            "-n",
            &self.node(i),
            "route",
            "replace",
            "224.0.0.0/4",
            "dev",
            &self.link(i),
        ]);
        Ok(())
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
