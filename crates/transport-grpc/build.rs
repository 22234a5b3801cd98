//! Generates the typed tonic services from the protocol crate's `.proto`
//! schemas with `protox` (pure Rust, no `protoc` binary). Message types are
//! not generated again: `extern_path` points every `tern.v1` message at
//! `tern_protocol::pb`, so both transports share one set of types.

use std::path::PathBuf;

/// Where the schemas live, relative to this crate.
const PROTO_ROOT: &str = "../protocol/proto";

/// The schema files, the same list the protocol crate compiles.
const PROTOS: &[&str] = &[
    "tern/v1/common.proto",
    "tern/v1/health.proto",
    "tern/v1/status.proto",
    "tern/v1/vm.proto",
    "tern/v1/monitoring.proto",
    "tern/v1/cluster.proto",
    "tern/v1/raft.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, [PROTO_ROOT])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".tern.v1", "::tern_protocol::pb")
        .out_dir(&out)
        .compile_fds(fds)?;
    Ok(())
}
