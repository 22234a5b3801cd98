//! Empty: cargo only honours this crate's `[build-dependencies]` (the
//! feature set shared with build scripts and proc-macros) when the crate
//! has a build script.
fn main() {}
