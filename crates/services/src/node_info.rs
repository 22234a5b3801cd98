//! What the node tells the Health and Status services about itself: its
//! addresses, the transport policy in force, each transport's health, its
//! version and when it started.
//!
//! The node implements [`NodeInfo`] over its transports and router; the
//! services read it on every call, so a policy changed on a running node
//! shows at once.

use std::time::Instant;

use tern_protocol::pb;

/// The node's facts, read by Health and Status on every call.
pub trait NodeInfo: Send + Sync + 'static {
    /// How to reach this node over each transport it serves.
    fn address(&self) -> pb::PeerAddress;

    /// The transport policy in force now.
    fn policy(&self) -> pb::TransportPolicy;

    /// Where the policy in force comes from: `file`, `node`, `rollout
    /// stage N`, `group KEY=VALUE`, `all` or `default`
    /// (`tern_state::PolicySource`).
    fn policy_source(&self) -> String;

    /// The health of each transport the node serves (one entry per
    /// transport), as the node sees it.
    fn transports(&self) -> Vec<pb::TransportHealth>;

    /// The node's version string (the `tern` binary's).
    fn version(&self) -> String;

    /// When the node process started, for uptime.
    fn started(&self) -> Instant;

    /// On the leader: how long ago it last heard each agent it has heard
    /// since it took over (a server that does not lead: none).
    fn agent_heartbeat_ages(&self) -> std::collections::BTreeMap<u64, std::time::Duration> {
        std::collections::BTreeMap::new()
    }

    /// On an agent: how long ago the leader last acknowledged its
    /// heartbeat (`None` on a server, or before the first).
    fn heartbeat_age(&self) -> Option<std::time::Duration> {
        None
    }
}

/// A [`NodeInfo`] holding fixed values: for a node whose addresses and
/// policy do not change, and for tests.
#[derive(Debug, Clone)]
pub struct StaticNodeInfo {
    /// See [`NodeInfo::address`].
    pub address: pb::PeerAddress,
    /// See [`NodeInfo::policy`].
    pub policy: pb::TransportPolicy,
    /// See [`NodeInfo::policy_source`].
    pub policy_source: String,
    /// See [`NodeInfo::transports`].
    pub transports: Vec<pb::TransportHealth>,
    /// See [`NodeInfo::version`].
    pub version: String,
    /// See [`NodeInfo::started`].
    pub started: Instant,
}

impl NodeInfo for StaticNodeInfo {
    fn address(&self) -> pb::PeerAddress {
        self.address.clone()
    }

    fn policy(&self) -> pb::TransportPolicy {
        self.policy.clone()
    }

    fn policy_source(&self) -> String {
        self.policy_source.clone()
    }

    fn transports(&self) -> Vec<pb::TransportHealth> {
        self.transports.clone()
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    fn started(&self) -> Instant {
        self.started
    }
}
