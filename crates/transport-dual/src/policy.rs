//! The transport policy, re-exported from [`tern_protocol::policy`]: the
//! `[transport]` section as written, its validation with key-naming
//! errors, and the validated [`Policy`] the router runs. It is defined in
//! the protocol crate so that the config file, the replicated desired
//! policies and the router share one validation.

pub use tern_protocol::policy::*;
