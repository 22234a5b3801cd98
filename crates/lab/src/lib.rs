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
