//! The kit every harness of real `tern` processes shares (dev and test
//! only: the lab, the benches and `tern-node`'s process tests use it;
//! nothing in the product does).
//!
//! Starting, waiting for and stopping processes and reading `/metrics`
//! live in `tern-process-kit`, re-exported here as [`process`] and
//! [`exposition`]: `tern demo`, which is product code in `tern-node`,
//! needs them too, and this crate depends on `tern-node` (for its typed
//! `Config` and `NodeFile`), so they cannot live here without a
//! dependency cycle that would compile `tern-node` twice. `tern-node`'s
//! own tests use this crate as a dev-dependency, which cargo builds
//! against the one `tern-node` library.
//!
//! # Layout
//!
//! - [`config`]: node configs built as the node's typed `Config` and
//!   written by serialising it; the `[transport]` sections harnesses use.
//! - [`keys`]: the pool of client keys a harness names as admins.
//! - [`local`]: a cluster of `tern run` processes on loopback addresses
//!   (no namespaces, no root), which the cluster bench runs on.
//! - [`traffic`]: steady client traffic recording every call, on a thread
//!   the caller chooses (the lab's: inside a namespace), and its client.
//! - [`process`], [`exposition`]: re-exported from `tern-process-kit`.
//! - [`transports`]: in-process transports on loopback (iroh, gRPC, both
//!   behind the router), re-exported from `tern-test-transports`, which
//!   `services` and `cluster` use directly: this crate depends on
//!   `tern-node`, which depends on them.

pub mod config;
pub mod keys;
pub mod local;
pub mod traffic;

pub use tern_process_kit::{Metrics, Sample, TernProcess, exposition, process, scrape};
pub use tern_test_transports as transports;

#[cfg(test)]
mod tests {
    #[test]
    fn the_kit_and_the_node_agree_on_the_node_file() {
        assert_eq!(
            tern_process_kit::process::NODE_FILE,
            tern_node::node::NODE_INFO_FILE
        );
    }
}
