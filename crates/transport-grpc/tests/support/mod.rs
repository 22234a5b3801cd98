//! Test support shared by the gRPC integration tests.

pub(crate) mod python;
