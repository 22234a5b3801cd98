//! The Tern protocol over iroh QUIC streams.
//!
//! Not built yet: the iroh transport issue fills this crate. It exports nothing, so nothing can mistake it for a working transport.
