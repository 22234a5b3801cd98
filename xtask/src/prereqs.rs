//! Test prerequisites: system packages (through apt-get, when missing) and a
//! Python virtualenv with the stock gRPC tools the interoperability tests
//! drive. Nothing is skipped when a tool is missing: it is installed, or the
//! run fails saying what could not be installed.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// A command the tests run, and the Debian package that provides it.
struct Tool {
    command: &'static str,
    package: &'static str,
    why: &'static str,
}

/// What the test suites need from the system.
const TOOLS: &[Tool] = &[
    Tool {
        command: "python3",
        package: "python3-venv",
        why: "the gRPC interop test drives a node with Python's stock grpcio client",
    },
    Tool {
        command: "promtool",
        package: "prometheus",
        why: "the monitoring test validates the exposition with `promtool check metrics`, and the rules test runs `promtool check rules` / `promtool test rules` on deploy/prometheus",
    },
    Tool {
        command: "prometheus",
        package: "prometheus",
        why: "the rules test has a real Prometheus scrape a live cluster and answer every rule and dashboard query (deploy/)",
    },
    Tool {
        command: "qemu-system-x86_64",
        package: "qemu-system-x86",
        why: "the microvm runtime test boots a real guest under QEMU",
    },
    Tool {
        command: "busybox",
        package: "busybox-static",
        why: "the microvm runtime test builds its guest's initramfs from busybox",
    },
    Tool {
        command: "strace",
        package: "strace",
        why: "the store's durability test traces that no write is acknowledged before its fdatasync",
    },
];

/// What the network lab (`cargo xtask lab`) needs from the system.
const LAB_TOOLS: &[Tool] = &[
    Tool {
        command: "ip",
        package: "iproute2",
        why: "the lab builds namespaces, veth links and bridges with `ip`",
    },
    Tool {
        command: "nft",
        package: "nftables",
        why: "the lab emulates loss and blocks UDP with nftables rules",
    },
    Tool {
        command: "sysctl",
        package: "procps",
        why: "the lab sets forwarding and address sysctls inside namespaces",
    },
];

/// What `cargo xtask bench` needs from the system.
const BENCH_TOOLS: &[Tool] = &[Tool {
    command: "etcd",
    package: "etcd-server",
    why: "the cluster rows measure etcd 3.4 beside Tern as their baseline",
}];

/// Installs what the lab needs that is missing.
pub(crate) fn install_lab() -> anyhow::Result<()> {
    install_tools(LAB_TOOLS)
}

/// Installs what the benchmarks need that is missing.
pub(crate) fn install_bench() -> anyhow::Result<()> {
    install_tools(BENCH_TOOLS)
}

fn install_tools(tools: &[Tool]) -> anyhow::Result<()> {
    let missing: Vec<&Tool> = tools.iter().filter(|t| !have(t.command)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for tool in &missing {
        println!("xtask: `{}` is missing ({})", tool.command, tool.why);
    }
    let packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    apt_install(&packages)
}

/// Python packages for the gRPC interoperability test.
const PY_PACKAGES: &[&str] = &["grpcio", "grpcio-health-checking", "grpcio-reflection"];

/// What [`install`] prepared, passed to tests through the environment.
pub(crate) struct Prepared {
    /// Python interpreter of the virtualenv (exported as `TERN_PYTHON`).
    pub(crate) python: PathBuf,
}

fn have(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    println!("xtask: installing {} with apt-get", packages.join(" "));
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let mut argv: Vec<&str> = sudo.to_vec();
        argv.extend_from_slice(args);
        let status = Command::new(argv[0])
            .args(&argv[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("running {}", argv.join(" ")))?;
        if !status.success() {
            bail!(
                "`{}` failed ({status}); install the packages by hand and re-run",
                argv.join(" ")
            );
        }
        Ok(())
    };
    run(&["apt-get", "update", "-q"])?;
    let mut args = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    run(&args)
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Installs what is missing and returns what the tests should be told.
pub(crate) fn install() -> anyhow::Result<Prepared> {
    let missing: Vec<&Tool> = TOOLS.iter().filter(|t| !have(t.command)).collect();
    if !missing.is_empty() {
        for tool in &missing {
            println!("xtask: `{}` is missing ({})", tool.command, tool.why);
        }
        let packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
        apt_install(&packages)?;
    }
    let python = python_env()?;
    Ok(Prepared { python })
}

/// Creates (once) a virtualenv under the target directory with the Python
/// packages the tests use, and returns its interpreter.
fn python_env() -> anyhow::Result<PathBuf> {
    let venv = crate::target_dir().join("py-venv");
    let python = venv.join("bin").join("python");
    let stamp = venv.join(".tern-packages");
    let wanted = PY_PACKAGES.join(" ");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) && python.exists() {
        return Ok(python);
    }
    println!(
        "xtask: creating Python virtualenv {} ({wanted})",
        venv.display()
    );
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        // Debian splits venv out of python3.
        apt_install(&["python3-venv"])?;
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?;
        if !status.success() {
            bail!("python3 -m venv {} failed ({status})", venv.display());
        }
    }
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PY_PACKAGES)
        .status()
        .context("running pip in the virtualenv")?;
    if !status.success() {
        bail!("pip install {wanted} failed ({status}); check access to PyPI and re-run");
    }
    std::fs::write(&stamp, &wanted)?;
    Ok(python)
}
