//! Who is in the cluster, decided without I/O: the link layer feeds this core what happened
//! (a link came up, a heartbeat arrived, a link broke, a peer said it is leaving, the Redis
//! registry changed) and the time; the core answers with the live members. Every decision is
//! here, so every failure path has a deterministic unit test.
//!
//! # Rules
//!
//! - A member is *alive* while it has an authenticated link to this node and was heard from
//!   (any message) within [`Timeouts::failure`].
//! - A member whose link broke is *suspect*: it stays in the live set for
//!   [`Timeouts::link_grace`] so that a link re-established at once (a reset connection) moves
//!   no document. Past the grace, or past [`Timeouts::failure`] of silence, it is *dead*.
//! - A member that said `Leaving` is dead at once (it has handed its documents over).
//! - With Redis membership, a member must also be in the registry: a node whose entry expired
//!   is dead even if a link somehow lingers.
//! - Dead members are shown for [`FORGET_AFTER`], then forgotten; a member that left cleanly is
//!   forgotten as soon as its link is down. A node keeps its id across restarts
//!   (`synchrony.node.name`), so a restarted node takes its own place again when it links.
//!
//! The live set (this node included) changes only through these rules; each change bumps the
//! view's epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use synchrony_protocol::peer::NodeStats;

/// How long a dead member stays listed in `GET {ctx}/v1/cluster`.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The failure detector's timeouts; they bound failover (see the README's Cluster section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How often each link carries a heartbeat.
    pub heartbeat: Duration,
    /// Silence after which a linked member is dead.
    pub failure: Duration,
    /// How long a member whose link broke stays live, waiting for the link to come back.
    pub link_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            failure: Duration::from_secs(3),
            link_grace: Duration::from_secs(1),
        }
    }
}

/// Where a member is reached.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberInfo {
    pub peer_addr: String,
    pub http_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    Suspect,
    Dead,
}

#[derive(Debug, Clone)]
struct Member {
    info: MemberInfo,
    stats: NodeStats,
    linked: bool,
    last_heard: Instant,
    /// When the link broke (while unlinked).
    unlinked_at: Option<Instant>,
    left: bool,
    /// When it was found dead (for forgetting it).
    dead_since: Option<Instant>,
}

/// A member as `GET {ctx}/v1/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub id: String,
    pub info: MemberInfo,
    pub state: MemberState,
    pub stats: NodeStats,
}

pub struct Membership {
    me: String,
    info: MemberInfo,
    timeouts: Timeouts,
    members: BTreeMap<String, Member>,
    /// Ids in the Redis registry, when membership is by Redis.
    registry: Option<BTreeSet<String>>,
    live: Vec<String>,
    epoch: u64,
}

impl Membership {
    pub fn new(me: String, info: MemberInfo, timeouts: Timeouts) -> Self {
        Self {
            live: vec![me.clone()],
            me,
            info,
            timeouts,
            members: BTreeMap::new(),
            registry: None,
            epoch: 1,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The live members, this node included, sorted by id.
    pub fn live(&self) -> &[String] {
        &self.live
    }

    /// Bumped at every change of the live set.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// An authenticated link to `node` came up. Returns whether the live set changed.
    pub fn linked(&mut self, node: &str, info: MemberInfo, now: Instant) -> bool {
        if node == self.me {
            return false;
        }
        let member = self.members.entry(node.to_owned()).or_insert(Member {
            info: info.clone(),
            stats: NodeStats::default(),
            linked: true,
            last_heard: now,
            unlinked_at: None,
            left: false,
            dead_since: None,
        });
        member.info = info;
        member.linked = true;
        member.last_heard = now;
        member.unlinked_at = None;
        // A node that left (or died) and started again under its own name is back.
        member.left = false;
        member.dead_since = None;
        self.recompute(now)
    }

    /// Any message from `node`; a heartbeat brings its figures.
    pub fn heard(&mut self, node: &str, stats: Option<NodeStats>, now: Instant) -> bool {
        if let Some(member) = self.members.get_mut(node) {
            member.last_heard = now;
            if let Some(stats) = stats {
                member.stats = stats;
            }
        }
        self.recompute(now)
    }

    /// The link to `node` broke.
    pub fn unlinked(&mut self, node: &str, now: Instant) -> bool {
        if let Some(member) = self.members.get_mut(node) {
            if member.linked {
                member.linked = false;
                member.unlinked_at = Some(now);
            }
        }
        self.recompute(now)
    }

    /// `node` said it is leaving.
    pub fn leaving(&mut self, node: &str, now: Instant) -> bool {
        if let Some(member) = self.members.get_mut(node) {
            member.left = true;
        }
        self.recompute(now)
    }

    /// The ids the Redis registry holds now (this node's own included or not).
    pub fn registry(&mut self, ids: impl IntoIterator<Item = String>, now: Instant) -> bool {
        self.registry = Some(ids.into_iter().collect());
        self.recompute(now)
    }

    /// Time passed.
    pub fn tick(&mut self, now: Instant) -> bool {
        self.recompute(now)
    }

    fn state_of(&self, id: &str, member: &Member, now: Instant) -> MemberState {
        let registered = self.registry.as_ref().is_none_or(|r| r.contains(id));
        let silent = now.saturating_duration_since(member.last_heard) > self.timeouts.failure;
        if member.left || silent || (!registered && !member.linked) {
            return MemberState::Dead;
        }
        match member.unlinked_at {
            None => MemberState::Alive,
            Some(at) if now.saturating_duration_since(at) <= self.timeouts.link_grace => {
                MemberState::Suspect
            }
            Some(_) => MemberState::Dead,
        }
    }

    fn recompute(&mut self, now: Instant) -> bool {
        let states: Vec<(String, MemberState)> = self
            .members
            .iter()
            .map(|(id, m)| (id.clone(), self.state_of(id, m, now)))
            .collect();
        let mut live = vec![self.me.clone()];
        for (id, state) in &states {
            let member = self.members.get_mut(id).expect("listed above");
            if *state == MemberState::Dead {
                member.dead_since.get_or_insert(now);
            } else {
                member.dead_since = None;
                live.push(id.clone());
            }
        }
        self.members.retain(|_, m| {
            m.linked
                || (!m.left
                    && m.dead_since
                        .is_none_or(|since| now.saturating_duration_since(since) < FORGET_AFTER))
        });
        live.sort();
        if live != self.live {
            self.live = live;
            self.epoch += 1;
            true
        } else {
            false
        }
    }

    /// Every member known, this node first.
    pub fn members(&self, now: Instant, my_stats: NodeStats) -> Vec<MemberView> {
        let mut out = vec![MemberView {
            id: self.me.clone(),
            info: self.info.clone(),
            state: MemberState::Alive,
            stats: my_stats,
        }];
        out.extend(self.members.iter().map(|(id, m)| MemberView {
            id: id.clone(),
            info: m.info.clone(),
            state: self.state_of(id, m, now),
            stats: m.stats,
        }));
        out
    }

    /// Whether `node` currently has a link (the relay can reach it).
    pub fn is_linked(&self, node: &str) -> bool {
        self.members.get(node).is_some_and(|m| m.linked)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn info(n: u8) -> MemberInfo {
        MemberInfo {
            peer_addr: format!("127.0.0.{n}:25500"),
            http_url: format!("http://127.0.0.{n}:8091/synchrony"),
        }
    }

    fn core() -> (Membership, Instant) {
        (
            Membership::new("b".into(), info(2), Timeouts::default()),
            Instant::now(),
        )
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn alone_at_first_then_members_join_as_links_come_up() {
        let (mut m, t0) = core();
        assert_eq!(m.live(), ["b"]);
        assert_eq!(m.epoch(), 1);
        assert!(m.linked("a", info(1), t0));
        assert!(m.linked("c", info(3), t0));
        assert_eq!(m.live(), ["a", "b", "c"]);
        assert_eq!(m.epoch(), 3);
        // A second link event for a known member changes nothing.
        assert!(!m.linked("a", info(1), t0 + MS));
        // Itself never counts twice.
        assert!(!m.linked("b", info(2), t0));
    }

    #[test]
    fn a_broken_link_is_suspect_for_the_grace_then_dead() {
        let (mut m, t0) = core();
        m.linked("a", info(1), t0);
        assert!(!m.unlinked("a", t0 + 100 * MS), "suspect stays live");
        assert_eq!(m.live(), ["a", "b"]);
        let states = m.members(t0 + 100 * MS, NodeStats::default());
        assert_eq!(states[1].state, MemberState::Suspect);
        assert!(!m.tick(t0 + 1100 * MS), "exactly at the grace: still live");
        assert!(m.tick(t0 + 1101 * MS));
        assert_eq!(m.live(), ["b"]);
    }

    #[test]
    fn a_link_back_within_the_grace_moves_nothing() {
        let (mut m, t0) = core();
        m.linked("a", info(1), t0);
        let epoch = m.epoch();
        m.unlinked("a", t0 + 10 * MS);
        assert!(!m.linked("a", info(1), t0 + 500 * MS));
        assert!(!m.tick(t0 + 2000 * MS));
        assert_eq!(m.epoch(), epoch);
        assert_eq!(m.live(), ["a", "b"]);
    }

    #[test]
    fn silence_past_the_failure_timeout_is_death_even_when_linked() {
        let (mut m, t0) = core();
        m.linked("a", info(1), t0);
        m.heard("a", None, t0 + 2000 * MS);
        assert!(!m.tick(t0 + 5000 * MS));
        assert!(
            m.tick(t0 + 5001 * MS),
            "a half-open link that carries nothing"
        );
        assert_eq!(m.live(), ["b"]);
        // Heard again (the link was only stalled): alive again, a new epoch.
        assert!(m.heard("a", None, t0 + 6000 * MS));
        assert_eq!(m.live(), ["a", "b"]);
    }

    #[test]
    fn leaving_is_dead_at_once_and_dead_members_are_forgotten() {
        let (mut m, t0) = core();
        m.linked("a", info(1), t0);
        assert!(m.leaving("a", t0 + MS));
        assert_eq!(m.live(), ["b"]);
        assert_eq!(m.members(t0 + MS, NodeStats::default()).len(), 2);
        // Once its link is down, a member that left is gone from the list at once...
        m.unlinked("a", t0 + 2 * MS);
        assert_eq!(m.members(t0 + 2 * MS, NodeStats::default()).len(), 1);
        // ...and comes back alive when it starts again under its name.
        m.linked("a", info(1), t0 + 3 * MS);
        assert_eq!(m.live(), ["a", "b"]);
        // A member that died is listed dead for a while, then forgotten.
        m.unlinked("a", t0 + 4 * MS);
        m.tick(t0 + 4 * MS + Duration::from_secs(10));
        assert_eq!(
            m.members(t0 + 4 * MS + Duration::from_secs(10), NodeStats::default())
                .len(),
            2
        );
        m.tick(t0 + FORGET_AFTER + Duration::from_secs(11));
        assert_eq!(
            m.members(
                t0 + FORGET_AFTER + Duration::from_secs(11),
                NodeStats::default()
            )
            .len(),
            1
        );
    }

    #[test]
    fn a_registry_finds_members_but_cannot_kill_a_linked_one() {
        let (mut m, t0) = core();
        m.linked("a", info(1), t0);
        m.linked("c", info(3), t0);
        // An entry gone from the registry does not kill a member whose link is up...
        m.registry(["a".to_string(), "b".to_string()], t0 + MS);
        assert_eq!(m.live(), ["a", "b", "c"], "the link proves c alive");
        assert!(
            !m.registry(Vec::<String>::new(), t0 + 2 * MS),
            "an emptied registry changes nothing"
        );
        // ...but once its link breaks, no grace: it is dead at once.
        assert!(m.unlinked("c", t0 + 3 * MS));
        assert_eq!(m.live(), ["a", "b"]);
        m.registry(["a", "b", "c"].map(String::from), t0 + 4 * MS);
        m.linked("c", info(3), t0 + 4 * MS);
        assert_eq!(m.live(), ["a", "b", "c"]);
    }

    #[test]
    fn heartbeats_carry_figures() {
        let (mut m, t0) = core();
        m.linked("a", info(1), t0);
        let stats = NodeStats {
            uptime_ms: 5,
            documents: 2,
            connections: 9,
        };
        m.heard("a", Some(stats), t0 + MS);
        let views = m.members(t0 + MS, NodeStats::default());
        assert_eq!(views[0].id, "b", "this node first");
        assert_eq!(views[1].stats, stats);
        assert_eq!(views[1].info, info(1));
    }
}
