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
    /// Makes yrs "fail" half-way through applying any update whose bytes contain this text:
    /// applied inside the transaction, then a panic (the rebuild from storage that follows is
    /// otherwise reachable only through a yrs bug).
    #[arg(long = "test-panic-on-update-with", hide = true)]
    pub panic_on_update_with: Option<String>,
    /// Holds a stopping node this long after it stops admitting clients and before it leaves
    /// its cluster (the moment in which it must refuse editors but still carry REST, widened).
    #[arg(long = "test-delay-leave-ms", hide = true)]
    pub delay_leave_ms: Option<u64>,
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
