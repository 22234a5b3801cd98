//! The network lab: real `tern` processes in Linux network namespaces.
//!
//! `cargo xtask lab <scenario>` builds the `tern` and `tern-lab` binaries and
//! runs `tern-lab <scenario>` as root. Each scenario builds its topology
//! (namespaces, veth pairs, bridges, nftables rules), starts real nodes in
//! it, prints one progress line per step and a summary table, exits non-zero
//! when a guarantee breaks, and removes every namespace and process it made,
//! also on Ctrl-C or failure.
//!
//! Traffic stays inside namespaces the lab created: no namespace is linked
//! to the host's own network.
//!
//! # Layout
//!
//! - [`netns`]: the topology. [`netns::Lab`] owns every namespace and
//!   process (cleanup on drop, Ctrl-C, failure; a sweep of stale
//!   namespaces of the same prefix at start); namespaces, switches
//!   (a bridge in its own namespace), veth links, addresses, routes,
//!   sysctls, nftables rules (loss by `numgen random`, UDP blocking,
//!   peer blocking), `exec`/`spawn` inside a namespace, and
//!   [`netns::Netns::spawn_task`] / [`netns::Netns::run_task`], which run
//!   async Rust on a thread that entered a namespace (how the lab's own
//!   clients reach nodes without any host link).
//! - [`cluster`]: real `tern run` processes, one per namespace, on one
//!   switch plus a client namespace: config generation, start and join,
//!   wait until formed, leader, SIGKILL/restart, SIGHUP with a new
//!   `[transport]`, `/metrics` parsed ([`cluster::Metrics`]: sums,
//!   histogram quantiles, deltas), the CLI with `--json`, and steady
//!   client traffic ([`cluster::Traffic`]) recording every call.
//! - [`local`] and [`keys`]: the loopback cluster and the lab's pool of
//!   admin client keys, re-exported from `tern-testkit` (the cluster
//!   bench, `tern-bench cluster`, shares them).
//! - [`history`]: a client history of register puts and gets and its
//!   checks (linearizability per key, lost acknowledged writes);
//!   [`workload`]: the recording register clients; [`criteria`]: the
//!   rollout's criteria from two scrapes of every node (unplanned
//!   fallbacks only, Raft's deadline misses apart).
//! - [`relay`]: the lab's private iroh relay.
//! - [`report`]: a progress line per step, figures, guarantee checks, the
//!   summary table and the verdict (the exit code).
//! - [`scenarios`]: the registry ([`scenarios::ALL`]) and one module per
//!   scenario, each `pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()>`.
//!
//! # Writing a scenario
//!
//! ```ignore
//! pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
//!     ctx.report.step("start 3 nodes");
//!     let spec = ClusterSpec::new(3, &cluster::dual_section(&["all_except_raft"], RaftTransport::Iroh));
//!     let report = &mut ctx.report;
//!     let mut c = Cluster::start(&ctx.lab, &ctx.opts.tern, spec, &mut |m| report.info(m)).await?;
//!     let t = c.traffic(TrafficSpec { transport: "grpc".into(), vm_id: None, pause: Duration::ZERO })?;
//!     c.node(2)?.ns.set_rules(&[], &[netns::udp_block_rule(Dir::Output, &c.node(2)?.iface.name)])?;
//!     let records = t.finish().await?;
//!     ctx.report.check("no failed call", cluster::failures(&records).is_empty(), records.len());
//!     Ok(())
//! }
//! ```
//!
//! Then add it to [`scenarios::ALL`] with [`scenario!`]. Extra topology
//! (routers, NAT) is built with [`netns::Lab::namespace`],
//! [`netns::Lab::link`], [`netns::Netns::route_add`] and
//! [`netns::Netns::nft`]; extra processes with [`netns::Lab::spawn`].

pub mod cluster;
pub mod criteria;
pub mod history;
pub mod netns;
pub mod relay;
pub mod report;
pub mod scenarios;
pub mod workload;

// The client key pool and the loopback cluster live in the test kit, which
// the cluster bench shares; the lab's scenarios name them as before.
pub use tern_testkit::{keys, local};
