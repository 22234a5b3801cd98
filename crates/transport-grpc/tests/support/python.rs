//! A Python virtualenv with the stock gRPC packages, for tests that talk to
//! a node with a non-Rust client.
//!
//! Self-contained (std only) so that it can move into `cargo xtask test`
//! unchanged. A missing `python3` or `venv` module is an error, never a
//! skip: the stock-client test proves interoperability and must run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The packages installed, pinned so that runs are reproducible.
pub(crate) const REQUIREMENTS: &[&str] = &[
    "grpcio==1.85.1",
    "grpcio-health-checking==1.85.1",
    "grpcio-reflection==1.85.1",
];

/// Creates (once) a virtualenv under `root` with [`REQUIREMENTS`] and
/// returns the path of its Python interpreter.
pub(crate) fn venv(root: &Path) -> Result<PathBuf, String> {
    let dir = root.join("grpc-python-venv");
    let python = dir.join("bin").join("python");
    let marker = dir.join(".tern-requirements");
    let wanted = REQUIREMENTS.join("\n");
    if python.exists() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&wanted) {
        return Ok(python);
    }
    run(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&dir),
        "python3 -m venv (install python3 and python3-venv)",
    )?;
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(REQUIREMENTS),
        "pip install of the stock gRPC packages",
    )?;
    std::fs::write(&marker, wanted).map_err(|e| format!("writing {}: {e}", marker.display()))?;
    Ok(python)
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("{what}: could not start: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
