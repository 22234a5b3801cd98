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

/// Environment variable through which `cargo xtask test` passes the Python
/// of the virtualenv it prepared.
pub(crate) const PYTHON_ENV: &str = "TERN_PYTHON";

/// The modules the stock-client script imports.
const IMPORT_CHECK: &str = "import grpc, grpc_health.v1, grpc_reflection.v1alpha";

/// A Python interpreter with the stock gRPC packages: the one in
/// `$TERN_PYTHON` if it has them, else one of a virtualenv created (once)
/// under `root` with [`REQUIREMENTS`].
pub(crate) fn python(root: &Path) -> Result<PathBuf, String> {
    if let Some(given) = std::env::var_os(PYTHON_ENV) {
        let given = PathBuf::from(given);
        if run(
            Command::new(&given).args(["-c", IMPORT_CHECK]),
            "import check",
        )
        .is_ok()
        {
            return Ok(given);
        }
    }
    venv(root)
}

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
