//! Real transports on loopback in one process, for tests and benches
//! (dev/test only: no product crate depends on it).
//!
//! The crates above the transports (`services`, `cluster`) test their
//! handlers over a real tonic server and a real iroh endpoint, and the
//! cluster's tests and bench also over both behind the dual router. This
//! crate is the one copy of how those are started. It depends only on the
//! protocol and the transport crates, so every crate above them can take
//! it as a dev-dependency without a cycle (`tern-testkit`, the process
//! kit, depends on `tern-node` and so cannot serve `services` or
//! `cluster`; the transports' own tests cannot use this crate either, as
//! it depends on them).
//!
//! # Layout
//!
//! - [`factory`]: [`TransportFactory`] and its three factories ([`Iroh`],
//!   [`Grpc`], [`Dual`]), binding a chosen address and retrying a port a
//!   restarted node's predecessor just released.
//! - [`node`]: [`Node`], one node of either transport chosen at run time
//!   ([`Kind`]), with a fresh identity, for tests that run one body over
//!   each.

#![allow(clippy::unwrap_used)] // reason: test support; a failure should fail the test loudly.

pub mod factory;
pub mod node;

pub use factory::{DRAIN, Dual, DualTransport, Grpc, Iroh, TransportFactory};
pub use node::{Kind, Node};
