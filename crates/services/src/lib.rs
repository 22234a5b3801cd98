//! Health, Status, VM and Monitoring service logic, with no transport code.
//!
//! Services implement [`tern_protocol::Handler`]; the node registers them in
//! a [`tern_protocol::Dispatcher`] that both transports serve, so no service
//! knows which transport carried a call.
//!
//! # Layout
//!
//! - [`monitoring`]: the process-wide metrics registry, its Prometheus text
//!   exposition over HTTP (`/metrics`) and the Monitoring RPC, and process
//!   CPU, memory, thread and file-descriptor figures read from `/proc`.
//! - [`access`]: [`access::AccessGate`], the one access check in front of
//!   every service (deny by default, the table in `tern_protocol::access`).
//! - [`consensus`]: the [`consensus::Consensus`] trait the node implements
//!   over Raft (writes, the applied state, a watch of the Raft status), so
//!   that no service names openraft.
//! - [`node_info`]: [`node_info::NodeInfo`], the node's addresses, transport
//!   policy, transport health, version and start time.
//! - [`policy`]: which transport policy the node runs (its file's pin,
//!   else the cluster's desired policy, else the default), following the
//!   applied state; and the node's labels recorded in the state.
//! - [`health`]: the Health service (liveness, readiness, transports) and
//!   the reports the node copies into `grpc.health.v1`.
//! - [`status`]: the Status service.
//! - [`vm`]: the VM service: validation, Raft writes deduplicated by
//!   request id, forwarding to the leader, conversions to `tern.v1` types.
//! - [`watch`]: `Vm/Watch`, the resumable stream of VM changes served from
//!   the applied state's history, with its limits for slow watchers.
//! - [`reconciler`]: each node's loop that makes its runtimes match the
//!   desired state of the VMs placed on it and reports what it observes
//!   (the runtimes themselves are `tern-runtime`'s).
//! - [`agent`]: an agent's assignment (the VMs placed on it) on the wire,
//!   both ways, decoded strictly.
//!
//! # Wiring (what the node does)
//!
//! 1. Implement [`consensus::Consensus`] over the Raft instance and
//!    [`node_info::NodeInfo`] over the transports and router.
//! 2. Build [`health::HealthService`], [`status::StatusService`],
//!    [`vm::VmService`] and register their `handler()`s, with Monitoring's,
//!    in the `Dispatcher` both transports serve.
//! 3. Once the router exists, [`vm::VmService::set_forward`] it, so that a
//!    follower forwards VM writes to the leader.
//! 4. Spawn [`reconciler::Reconciler::run`] with the node's runtimes, and
//!    copy [`health::HealthService::publish`]'s reports into the gRPC
//!    transport's `grpc.health.v1` service.

pub mod access;
pub mod agent;
pub mod consensus;
pub mod health;
pub mod monitoring;
pub mod node_info;
pub mod policy;
pub mod reconciler;
pub mod status;
pub mod vm;
pub mod watch;
