//! The process kit: running `tern` processes from Rust, and reading what
//! they expose.
//!
//! Every harness that starts real `tern run` processes (`tern demo`, the
//! node's process tests, the network lab, the cluster bench) starts,
//! waits for and stops them through [`TernProcess`], and reads their
//! `/metrics` through [`exposition`]. Before this crate there were four
//! copies of the start-and-wait loop and two exposition parsers.
//!
//! # Why a normal crate, apart from `tern-testkit`
//!
//! `tern demo` is product code in `tern-node`, and it starts `tern`
//! processes too. This crate therefore depends on nothing of ours but
//! `tern-protocol` (for the exposition parser; no `tern-node`, no
//! transport), so `tern-node` can depend on it without a
//! cycle and without compiling `tern-node` twice. What does need the node
//! (configs written from its typed `Config`, the recording client, the
//! loopback cluster) lives in the dev/test-only `tern-testkit`, which
//! re-exports this crate.
//!
//! # Layout
//!
//! - [`process`]: [`TernProcess`], one `tern` child: spawned from a
//!   command the caller prepared (so the lab can wrap it in
//!   `ip netns exec`), waited for until it wrote its `node.json`, its log,
//!   signals, a bounded graceful stop, and SIGKILL on drop.
//! - [`exposition`]: a bounded `/metrics` scrape, and the one Prometheus
//!   text-format parser ([`Metrics`]: sums by labels, histogram buckets
//!   and quantiles, differences between two scrapes), re-exported from
//!   `tern_protocol::exposition`, where the rollout's gates use it.

pub mod exposition;
pub mod process;

pub use exposition::{Metrics, Sample, scrape};
pub use process::{ProcessError, TernProcess};
