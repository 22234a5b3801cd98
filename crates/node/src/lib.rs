//! The Tern node: configuration and composition of every crate. The `tern`
//! binary (`src/main.rs`) is a thin command line over this library.
//!
//! # Layout
//!
//! - [`config`]: the node's TOML file, defaults, and checks whose errors
//!   name the key at fault.
//!
//! Not built yet: the composition of transports, router, Raft and services
//! into a running node, and the CLI that talks to nodes (the node issue).

pub mod config;
