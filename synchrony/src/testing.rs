//! Hooks only tests use: hidden `serve` flags, read once at start into a process-wide value.
//! Nothing on a production path reads the environment for them, and `synchrony config` and the
//! key forms (`synchrony.*`, `SYNCHRONY_*`) do not know them.

use std::sync::OnceLock;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct TestHooks {
    /// Waits this long between storage being ready and joining the cluster (the test that no
    /// client is admitted in that moment widens it).
    #[arg(long = "test-delay-cluster-join-ms", hide = true)]
    pub delay_cluster_join_ms: Option<u64>,
    /// Announces this peer protocol version instead of the build's (nodes one and two versions
    /// apart, in one build).
    #[arg(long = "test-peer-protocol-version", hide = true)]
    pub peer_protocol_version: Option<u32>,
}

static HOOKS: OnceLock<TestHooks> = OnceLock::new();

/// Sets the hooks (the first call wins; the engine calls it once as it starts).
pub fn install(hooks: &TestHooks) {
    let _ = HOOKS.set(hooks.clone());
}

/// The hooks in force: none unless a test set them.
pub fn hooks() -> &'static TestHooks {
    HOOKS.get_or_init(TestHooks::default)
}
