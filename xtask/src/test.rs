//! `cargo xtask test`: every crate tested on its own.
//!
//! Each workspace package gets its own `cargo test -p NAME --all-targets`
//! (and `--doc` for libraries), so a crate that only builds thanks to a
//! sibling's features fails here instead of passing in a workspace-wide
//! build. Bench targets run once in test mode so they never rot, and the
//! examples are built and run as tests of themselves. Then the API docs of
//! every crate are built with warnings denied (`cargo doc`: a broken
//! intra-doc link fails the run). Before all that, the prerequisites are
//! installed (see `prereqs`).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, bail};

/// One crate's outcome.
struct Outcome {
    package: String,
    passed: u64,
    failed: u64,
    ok: bool,
    secs: f64,
}

fn packages() -> anyhow::Result<Vec<(String, bool)>> {
    let out = crate::cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut list = Vec::new();
    for package in meta["packages"]
        .as_array()
        .context("metadata has packages")?
    {
        let name = package["name"].as_str().context("package name")?.to_owned();
        let has_lib = package["targets"]
            .as_array()
            .map(|ts| {
                ts.iter().any(|t| {
                    t["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "lib"))
                })
            })
            .unwrap_or(false);
        list.push((name, has_lib));
    }
    list.sort();
    Ok(list)
}

/// Runs one cargo test invocation, echoing its output and counting results.
fn cargo_test(args: &[&str], python: &std::path::Path) -> anyhow::Result<(u64, u64, bool)> {
    let mut child = crate::cargo()
        .arg("test")
        .args(args)
        .env("TERN_PYTHON", python)
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count(rest, " passed");
            failed += count(rest, " failed");
        }
    }
    let status = child.wait()?;
    Ok((passed, failed, status.success()))
}

/// `cargo doc` of every workspace crate with rustdoc's warnings denied;
/// true when it built cleanly.
fn docs() -> anyhow::Result<bool> {
    let status = crate::cargo()
        .args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", DOC_FLAGS)
        .status()
        .context("running cargo doc")?;
    Ok(status.success())
}

/// rustdoc's flags for [`docs`]: every warning (broken links, bad HTML,
/// unclosed code blocks) fails the build.
const DOC_FLAGS: &str = "-D warnings";

/// Reads "N passed" style counts out of a cargo test summary.
fn count(summary: &str, word: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(word.trim_start())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let install = !args.iter().any(|a| a == "--no-install");
    let python = if install {
        crate::prereqs::install()?.python
    } else {
        std::path::PathBuf::from("python3")
    };
    let packages = packages()?;
    let mut outcomes = Vec::new();
    for (i, (package, has_lib)) in packages.iter().enumerate() {
        println!(
            "\nxtask: [{}/{}] testing {package} on its own",
            i + 1,
            packages.len()
        );
        let start = Instant::now();
        let (mut passed, mut failed, mut ok) =
            cargo_test(&["-p", package, "--all-targets"], &python)?;
        if *has_lib {
            let (p, f, o) = cargo_test(&["-p", package, "--doc"], &python)?;
            passed += p;
            failed += f;
            ok &= o;
        }
        outcomes.push(Outcome {
            package: package.clone(),
            passed,
            failed,
            ok,
            secs: start.elapsed().as_secs_f64(),
        });
    }
    println!("\nxtask: cargo doc --workspace --no-deps, warnings denied");
    let start = Instant::now();
    let docs_ok = docs()?;
    outcomes.push(Outcome {
        package: "(docs: cargo doc)".to_owned(),
        passed: u64::from(docs_ok),
        failed: u64::from(!docs_ok),
        ok: docs_ok,
        secs: start.elapsed().as_secs_f64(),
    });
    println!("\nxtask: per-crate results");
    println!(
        "{:<32} {:>7} {:>7} {:>8}",
        "crate", "passed", "failed", "seconds"
    );
    for o in &outcomes {
        let mark = if o.ok { "" } else { "  <- FAILED" };
        println!(
            "{:<32} {:>7} {:>7} {:>8.1}{mark}",
            o.package, o.passed, o.failed, o.secs
        );
    }
    let passed: u64 = outcomes.iter().map(|o| o.passed).sum();
    let failed: u64 = outcomes.iter().map(|o| o.failed).sum();
    println!("\ntotal: {passed} passed, {failed} failed");
    let broken: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.package.as_str())
        .collect();
    if !broken.is_empty() {
        bail!(
            "tests failed in {}; re-run one with `cargo test -p NAME` to see it alone",
            broken.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn reads_cargo_summaries() {
        let ok =
            "ok. 15 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s";
        assert_eq!((count(ok, " passed"), count(ok, " failed")), (15, 0));
        let bad = "FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!((count(bad, " passed"), count(bad, " failed")), (3, 2));
    }
}
