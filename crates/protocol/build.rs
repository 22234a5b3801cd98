//! Compiles the `.proto` schemas with `protox` (pure Rust, no `protoc`
//! binary) and generates prost types. The encoded descriptor set is written
//! beside them so that gRPC server reflection can serve the same schemas.

use std::path::PathBuf;

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
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(
        out.join("tern_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
