//! Benchmarks that span crates. They run with `cargo xtask bench`, which
//! gathers every producer's figures into one report.
//!
//! - `benches/heartbeat.rs`: a criterion bench of a Raft heartbeat frame.
//! - The `tern-bench` binary (`src/bin/tern-bench.rs`): transport figures
//!   measured **between two separate processes**. `tern-bench transport`
//!   starts `tern-bench serve` as a child process once per transport (our
//!   iroh transport, our gRPC transport, and the raw baselines: a bare
//!   iroh endpoint echoing on bi-streams and a bare tonic service) and
//!   measures from its own process: connection establishment, unary call
//!   latency (every call recorded in an HDR histogram), calls/s against
//!   concurrent callers, bulk throughput, control-lane latency while a
//!   bulk transfer runs, and the CPU, peak memory and file descriptors both
//!   processes use. It writes one JSON part file ([`part`]) that
//!   `cargo xtask bench` merges into the report.
//!
//! # Layout
//!
//! - [`part`]: the part-file format shared by every bench producer and
//!   `cargo xtask bench` (the `tern-bench-part` crate, re-exported).
//! - [`kind`]: the four transports measured and their names.
//! - [`raw`]: the raw baselines (bare iroh echo, bare tonic service).
//! - [`serve`]: the server process (`tern-bench serve`).
//! - [`client`]: how the client process calls each transport.
//! - [`cluster`]: `tern-bench cluster`, Raft on 3-node clusters of real
//!   `tern` processes on loopback (`tern_testkit::local`), per transport
//!   mode: commits/s, commit latency, leader failover, beside etcd.
//! - [`fleet`]: `tern-bench fleet`, servers and agents at fleet scale:
//!   N simulated agents (each its own key and connection, the real agent
//!   protocol) against 3 real server processes: server CPU and memory per
//!   agent, commit latency, desired state to agent, leader change.
//! - [`etcd`]: the etcd baseline of `cluster`: 3 members of Debian's
//!   etcd 3.4 on loopback and the two calls of its v3 API the bench needs.
//! - [`twoproc`]: the measurements (`tern-bench transport`) and the child
//!   process handling.
//! - [`procfs`]: CPU time, peak memory and descriptors from `/proc`.
//! - [`stats`]: latency histograms and their percentiles.
//!
//! # What the figures are
//!
//! Both processes run on the same machine over loopback, so the figures
//! show the CPU cost and the software latency of each stack, not a
//! network's. Nothing here asserts on a timing; the machine is shared and
//! noisy, so the report states the load average it ran under.

pub mod client;
pub mod cluster;
pub mod etcd;
pub mod fleet;
pub mod kind;
pub mod procfs;
pub mod raw;
pub mod serve;
pub mod stats;
pub mod twoproc;

pub use tern_bench_part as part;
