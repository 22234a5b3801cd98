//! The dual router: per-service transport choice, fallback and adaptive Raft transport.
//!
//! Not built yet: the dual router issue fills this crate. It exports nothing.
