//! openraft log storage and state machine on sled.
//!
//! Not built yet: the Raft issue fills this crate. It exports nothing.
