//! openraft's network traits over Tern's transport-neutral client, and the one Raft codec.
//!
//! Not built yet: the Raft issue fills this crate. It exports nothing.
