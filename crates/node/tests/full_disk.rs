//! A full disk stops a node loudly: a real `tern run` on a small tmpfs
//! (mounted by the test, as root) takes writes, the disk is then filled,
//! and the next write's log sync fails. The node must exit non-zero with
//! a message that names the Raft log and says what to check, and must not
//! acknowledge the write that failed.
//!
//! Needs root (to mount the tmpfs); fails, never skips, without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: test code; failures should be loud

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tern_node::config::{Config, Listen, ListenConfig};
use tern_node::node::NodeFile;
use tern_testkit::TernProcess;

/// Size of the node's disk: room for the node's start and some writes.
const DISK: &str = "size=64m";
/// Bound on the node's start and on its exit after the disk is full.
const BOUND: Duration = Duration::from_secs(120);

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

/// A tmpfs mounted at a path, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", DISK, "tmpfs"])
            .arg(at)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn cli(args: &[&str]) -> Output {
    tern()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the CLI runs")
}

#[test]
fn a_full_disk_stops_the_node_with_a_message_saying_what_to_check() {
    let base = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&base.path().join("disk"));
    let data = disk.0.join("node");
    let config = base.path().join("node.toml");
    let log = base.path().join("node.log");
    // A single node serving gRPC on loopback only, written as the node's
    // typed configuration.
    let node_config = Config {
        data_dir: data.clone(),
        listen: ListenConfig {
            grpc: Listen::On(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            iroh: Listen::Off,
            metrics: Listen::Off,
        },
        ..Config::default()
    };
    tern_testkit::config::write(&config, &node_config).unwrap();
    let mut command = TernProcess::command(Path::new(env!("CARGO_BIN_EXE_tern")), &config);
    command.env("RUST_LOG", "info");
    // Killed on drop, before the tmpfs is unmounted.
    let mut node = TernProcess::spawn(command, &data, &log).unwrap();

    // Up, and taking writes.
    node.wait_node_file_blocking::<NodeFile>(BOUND).unwrap();
    let dir = data.display().to_string();
    let put = |key: &str| {
        cli(&[
            "cluster",
            "meta",
            "set",
            key,
            &"v".repeat(1000),
            "--data-dir",
            &dir,
        ])
    };
    let ok = put("before");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // Fill the disk to the last byte.
    let mut fill = std::fs::File::create(disk.0.join("fill")).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while fill.write_all(&chunk).is_ok() {}
    while fill.write_all(&[0u8; 512]).is_ok() {}
    while fill.write_all(&[0u8]).is_ok() {}
    let _ = fill.sync_all();

    // Writes now fail, none is acknowledged, and the node stops.
    let deadline = Instant::now() + BOUND;
    let mut i = 0;
    let status = loop {
        if let Some(status) = node.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the node still runs with a full disk:\n{}",
            node.log()
        );
        i += 1;
        let r = put(&format!("after-{i}"));
        assert!(
            !r.status.success() || node.is_running(),
            "a write was acknowledged on a full disk"
        );
        if r.status.success() {
            // Room left in a page already written; keep writing.
            continue;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        !status.success(),
        "the node exited cleanly on a full disk:\n{}",
        node.log()
    );
    let text = node.log();
    assert!(
        text.contains("Raft log") && text.contains("check the disk"),
        "the exit names the Raft log and what to check:\n{text}"
    );
}
