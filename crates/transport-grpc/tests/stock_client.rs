//! A stock, non-Rust gRPC client (Python `grpcio` with
//! `grpcio-health-checking` and `grpcio-reflection`, installed into a
//! virtualenv by the test) talks to a real node over TLS without a client
//! certificate: health Check and Watch, and the service list by reflection
//! in both v1alpha and v1, work; a Tern method is `Unauthenticated`; a
//! cleartext client gets nothing.
//!
//! Fails, never skips, when `python3` or its `venv` module is missing.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tern_protocol::Dispatcher;
use tern_transport_grpc::{GrpcTransport, ServerConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Bound on the whole test, venv creation and pip install included.
const TEST_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn stock_python_client_checks_health_and_lists_services() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let python = support::python::python(root).unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        tokio::time::timeout(TEST_TIMEOUT, run(&python))
            .await
            .expect("the stock client test finished in time");
    });
}

async fn run(python: &Path) {
    let node = GrpcTransport::bind(
        ServerConfig::new([7; 32], SocketAddr::from(([127, 0, 0, 1], 0))),
        std::sync::Arc::new(Dispatcher::new()),
    )
    .await
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stock_client.py");
    let cert = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cert.path(), node.server().certificate_pem()).unwrap();
    let mut child = Command::new(python)
        .arg(&script)
        .arg(node.server().local_addr().to_string())
        .arg(cert.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        println!("python: {line}");
        if line == "WATCH SERVING" {
            node.server().health().set_node(false).await;
        }
        seen.push(line);
    }
    let status = child.wait().await.unwrap();
    assert!(status.success(), "the Python client failed: {seen:?}");
    for expected in [
        "CHECK OK",
        "WATCH SERVING",
        "WATCH NOT_SERVING",
        "ANONYMOUS REFUSED",
        "CLEARTEXT REFUSED",
        "OK",
    ] {
        assert!(
            seen.iter().any(|l| l == expected),
            "missing {expected:?} in {seen:?}"
        );
    }
    for version in ["REFLECTION V1ALPHA ", "REFLECTION V1 "] {
        let line = seen
            .iter()
            .find(|l| l.starts_with(version))
            .unwrap_or_else(|| panic!("no {version:?} line in {seen:?}"));
        assert!(line.contains("tern.v1.Raft") && line.contains("grpc.health.v1.Health"));
    }
    node.shutdown(Duration::from_secs(5)).await;
}
