//! The Tern node: configuration, composition of every crate, and the CLI.
//! The `tern` binary (`src/main.rs`) is a thin command line over this
//! library.
//!
//! # Layout
//!
//! - [`config`]: the node's TOML file, defaults, and checks whose errors
//!   name the key at fault.
//! - [`node`]: [`node::Node`], every crate composed into a running node
//!   (transports, router, Raft, services, reconciler, `/metrics`), and its
//!   graceful shutdown.
//! - [`agent`]: the agent role: [`agent::AgentLink`], an agent's
//!   registration, heartbeats, fence and assignment stream, and the
//!   services' `Consensus` over what it follows.
//! - [`run`]: `tern run`: signals (SIGTERM/Ctrl-C shut down, SIGHUP
//!   reloads the transport policy) and logging.
//! - [`client`]: how the CLI reaches a node (address, transport, identity).
//! - [`cli`]: the commands that talk to a node, as tables or JSON.
//! - [`policy_cli`]: `tern transport set|clear --node-id|--group|--all`,
//!   the cluster's desired policies, and the per-node policy table of
//!   `tern status`.
//! - [`rollout_cli`]: `tern rollout start|status|history|pause|resume|
//!   advance|abort|rollback --all`, and the plan file's parsing.
//! - [`watch`]: `tern vm watch`, the resumable stream of VM changes,
//!   which moves to another node when its node goes away.
//! - [`error`]: [`error::CliError`], why a CLI command failed, by kind
//!   (which decides the exit code).
//! - [`demo`]: `tern demo`, a local 3-node cluster of child processes
//!   running the default rollout plan live (compressed soaks) under
//!   steady calls, then rolled back; its steady calls ([`demo::load`]),
//!   the plan and rollback ([`demo::rollout`]) and the frames
//!   ([`demo::view`]).

pub mod agent;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod error;
pub mod node;
pub mod policy_cli;
pub mod rollout_cli;
pub mod run;
pub mod watch;
