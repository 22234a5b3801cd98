//! `cargo xtask lab list|ci|<scenario> [--quick] [--keep-logs DIR] [--prefix P]`:
//! installs what the lab needs (iproute2, nftables), builds `tern` and
//! `tern-lab` in the dev profile (the build the tests use), and runs
//! `tern-lab <scenario> --tern PATH` as root (through sudo when needed).
//!
//! `ci` runs the `--quick` variant of every scenario registered for CI
//! (`tern-lab ci-list`), one after the other, and fails when any failed.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

const USAGE: &str =
    "usage: cargo xtask lab list | ci | <scenario> [--quick] [--keep-logs DIR] [--prefix P]";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let Some(what) = args.first().map(String::as_str) else {
        bail!("{USAGE}");
    };
    let rest = &args[1..];
    crate::prereqs::install_lab()?;
    let (tern, lab) = build()?;
    match what {
        "list" => {
            let status = Command::new(&lab).arg("list").status()?;
            if !status.success() {
                bail!("tern-lab list failed ({status})");
            }
            Ok(())
        }
        "ci" => {
            let out = Command::new(&lab)
                .arg("ci-list")
                .output()
                .context("running tern-lab ci-list")?;
            if !out.status.success() {
                bail!(
                    "tern-lab ci-list failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            if names.is_empty() {
                bail!("no scenario is registered for CI");
            }
            let mut failed = Vec::new();
            for name in &names {
                println!("\nxtask lab ci: {name} --quick");
                let mut argv = vec!["--quick".to_owned()];
                argv.extend_from_slice(rest);
                if !scenario(&lab, &tern, name, &argv)? {
                    failed.push(name.clone());
                }
            }
            println!(
                "\nxtask lab ci: {} of {} scenarios passed ({})",
                names.len() - failed.len(),
                names.len(),
                names.join(", ")
            );
            if !failed.is_empty() {
                bail!("lab scenarios failed: {}", failed.join(", "));
            }
            Ok(())
        }
        name => {
            if scenario(&lab, &tern, name, rest)? {
                Ok(())
            } else {
                bail!("lab scenario {name} failed (its summary is above)")
            }
        }
    }
}

/// Builds both binaries, each package on its own (as `cargo test -p`
/// does, so `tern` is the build the tests use, not one with features
/// unified with the lab's); returns their paths.
fn build() -> anyhow::Result<(PathBuf, PathBuf)> {
    for package in ["tern-node", "tern-lab"] {
        println!("xtask lab: cargo build -p {package}");
        let status = crate::cargo()
            .args(["build", "-p", package, "--bins"])
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build -p {package} failed ({status})");
        }
    }
    let dir = crate::target_dir().join("debug");
    Ok((dir.join("tern"), dir.join("tern-lab")))
}

/// Runs one scenario as root; true when it passed.
fn scenario(lab: &PathBuf, tern: &PathBuf, name: &str, extra: &[String]) -> anyhow::Result<bool> {
    let root = crate::prereqs::is_root();
    let mut cmd = if root {
        Command::new(lab)
    } else {
        let mut c = Command::new("sudo");
        c.arg(lab);
        c
    };
    cmd.arg(name).arg("--tern").arg(tern).args(extra);
    let status = cmd
        .status()
        .with_context(|| format!("running tern-lab {name}"))?;
    Ok(status.success())
}
