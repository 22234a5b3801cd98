//! A Tern node's Raft, composed: openraft started over the sled store and
//! `tern-raft-net`'s network, the `Cluster` service (join, leave, members,
//! the metadata register, the access table, the desired transport
//! policies), and the services' view of it
//! ([`RaftConsensus`]).
//!
//! `tern-raft-net` is openraft's network adapter and nothing else; this
//! crate decides how a node uses it.
//!
//! # Layout
//!
//! - [`node`]: [`RaftNode`], the composition a node binary uses (start,
//!   initialise, join, the checked write entry point, the fatal-failure
//!   signal, shutdown with leadership handoff), the openraft settings as
//!   named constants, and the client calls for join, leave and propose.
//! - [`service`]: [`RaftServices`], the Raft and Cluster handlers
//!   registered and attached together, and the Cluster handler.
//! - [`membership`]: join (node id, learner, promotion), leave, members,
//!   and the leader checks the Cluster calls share.
//! - [`meta`]: the metadata register's `Cluster/MetaPut` and linearizable
//!   `Cluster/MetaGet`, and typed client calls ([`meta_put`], [`meta_get`]).
//! - [`admission`]: join tokens (create, revoke, list, check), the bound
//!   on failed join attempts, and the admission settings ([`Admission`]:
//!   `max_voters`, the largest declared capacity).
//! - [`access`]: the access table's Cluster calls (grant, revoke, list
//!   with the audit log), served by the leader.
//! - [`policy`]: `Cluster/TransportSet`, the desired transport policy of a
//!   node, a group or all (operator), forwarded to the leader like a
//!   metadata put, and its typed client call ([`transport_set`]).
//! - [`address`]: [`address::keep_recorded`], which keeps this node's
//!   addresses in the membership true while they change (asks the leader,
//!   rate-limited, retried, newest first).
//! - [`rollout`]: the rollout's calls, `Cluster/Rollout` (operator: start a plan, pause,
//!   resume, advance, abort, roll every node back; forwarded to the leader)
//!   and `Cluster/RolloutGet` (viewer), their typed client calls
//!   ([`rollout_change`], [`rollout_get`]) and the plan's protobuf form.
//! - [`rollout_driver`]: the leader's rollout driver: measures the stage
//!   in force on the covered nodes (`Monitoring/Metrics`), waits the soak,
//!   and proposes advance, hold or roll back from the gates.
//! - [`agents`]: agents as the servers serve them (`Cluster/AgentRegister`,
//!   `AgentHeartbeat`, `AgentReport`, the `AgentSync` stream of an agent's
//!   assignment) and [`agents::watch_agents`], the leader's judgement of
//!   which agents are down.
//! - [`relay`]: a follower takes agents' plain heartbeats and relays
//!   them to the leader in batches (`Cluster/AgentsHeard`), answering each
//!   only once the leader took it.
//! - [`assignments`]: the hub that wakes an agent's assignment stream only
//!   when its assignment may have changed (one look per burst of writes,
//!   not one per stream and write).
//! - [`demotion`]: `Cluster/Demote`, an admin's demotion of a server to
//!   an agent that keeps its node id and its VMs.
//! - [`snapshot_schedule`]: when this node builds a snapshot (every
//!   `RaftOptions::snapshot_logs_since_last` entries, at an offset of its
//!   own so that the members do not build together).
//! - [`consensus`]: [`RaftConsensus`], the services' `Consensus` trait
//!   over a running [`RaftNode`] (writes forwarded to the leader, the
//!   applied state, the Raft status watch).

pub mod access;
pub mod address;
pub mod admission;
pub mod agents;
pub mod assignments;
pub mod consensus;
pub mod demotion;
pub mod membership;
pub mod meta;
pub mod node;
pub mod policy;
pub mod relay;
pub mod rollout;
pub mod rollout_driver;
pub mod service;
pub mod snapshot_schedule;

pub use admission::Admission;
pub use agents::AgentSettings;
pub use consensus::RaftConsensus;
pub use membership::JoinToken;
pub use meta::{MetaError, MetaPut, MetaRead, meta_get, meta_put};
pub use node::{
    FIRST_NODE_ID, JoinAnswer, RaftNode, RaftNodeError, RaftOptions, WriteError, client_write,
    limit_status, propose, read_node_id, request_join, request_leave, write_node_id,
};
pub use policy::{policies_response, transport_set, transport_set_request};
pub use rollout::{rollout_change, rollout_get};
pub use service::RaftServices;
