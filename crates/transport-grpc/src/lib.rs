//! The same Tern services over tonic gRPC, with standard health and reflection.
//!
//! Not built yet: the gRPC transport issue fills this crate. It exports nothing, so nothing can mistake it for a working transport.
