//! Project chores, run as `cargo xtask <command>` (an alias in
//! `.cargo/config.toml`).
//!
//! # Layout
//!
//! - `test`: installs what the tests need, then tests every crate on its
//!   own (examples and benches in test mode included), then builds the API
//!   docs with warnings denied.
//! - `bench`: builds once, runs the bench producers (`tern-bench
//!   transport`, `tern-bench cluster`) and the criterion benches, and writes one
//!   report (Markdown, JSON, SVG charts) to `target/bench-report/`.
//! - `prereqs`: finds and installs system packages and the Python
//!   environment the tests use.
//! - `lab`: builds `tern` and `tern-lab` and runs a network-lab scenario
//!   as root (`crates/lab`).
//! - `tidy` (tests only): keeps module docs, Layout lists and the
//!   architecture's dependency diagram true, and ratchets long functions.
//!
//! xtask has few dependencies on purpose: it must build fast on a fresh
//! machine before anything else.

#![allow(missing_docs)] // reason: a binary; its items are private plumbing.

use std::path::PathBuf;
use std::process::ExitCode;

mod bench;
mod lab;
mod prereqs;
mod test;
#[cfg(test)]
mod tidy;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  test [--no-install]    install test prerequisites, then `cargo test -p NAME`
                         for every workspace crate, each on its own, then
                         `cargo doc` with warnings denied
  bench [--quick] [--profile NAME] [--only criterion|transport|cluster]
                         build once (profile `bench` by default), run the
                         two-process transport bench, the 3-node cluster
                         bench and every criterion bench, then write one
                         report to target/bench-report/ (report.md,
                         report.json, *.svg); --quick takes a few minutes
  bench --report-only    render the report again from the last run's files
  prereqs                only install the test prerequisites
  lab list               the network lab's scenarios (needs root; see crates/lab)
  lab <scenario> [--quick] [--keep-logs DIR]
                         build tern and tern-lab, run one scenario in network
                         namespaces: progress, summary table, non-zero on failure
  lab ci                 the --quick variant of every scenario registered for CI
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("lab") => lab::run(&args[1..]),
        Some("prereqs") => prereqs::install().map(|_| ()),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `cargo` as cargo invoked us (respects rustup's choice).
fn cargo() -> std::process::Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(root());
    cmd
}

/// The target directory in use.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}
