//! `tern-lab <scenario> --tern PATH [--quick] [--prefix P] [--keep-logs DIR]`
//! and `tern-lab list`: see the crate docs of `tern_lab`. Usually run by
//! `cargo xtask lab`, which builds the binaries and installs iproute2 and
//! nftables first.
//!
//! Exit codes: 0 every guarantee held; 1 a guarantee broke or the scenario
//! stopped early; 2 bad usage; 130 interrupted (after cleaning up).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tern_lab::netns::{Lab, check_prefix, default_prefix};
use tern_lab::report::Report;
use tern_lab::scenarios::{self, Ctx, Opts};

#[derive(Parser)]
#[command(
    name = "tern-lab",
    about = "Real tern processes in Linux network namespaces: NAT, partitions, loss, crashes, address change, rollout",
    after_help = "`tern-lab list` names the scenarios. Needs root."
)]
struct Args {
    /// A scenario name, `list`, or `ci-list` (the CI scenarios' names).
    scenario: String,
    /// The `tern` binary to run in the namespaces.
    #[arg(long)]
    tern: Option<PathBuf>,
    /// The short variant (what CI runs).
    #[arg(long)]
    quick: bool,
    /// Prefix of every namespace and interface name (1-7 of a-z0-9;
    /// default: unique per run).
    #[arg(long)]
    prefix: Option<String>,
    /// Keep configs, data dirs and node logs under DIR/PREFIX-SCENARIO
    /// (default: a temporary directory, removed at the end).
    #[arg(long)]
    keep_logs: Option<PathBuf>,
}

fn list() {
    println!("{:<16} {:<4} about", "scenario", "ci");
    for s in scenarios::ALL {
        println!(
            "{:<16} {:<4} {}",
            s.name,
            if s.ci { "yes" } else { "" },
            s.about
        );
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("tern-lab: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if args.scenario == "list" {
        list();
        return ExitCode::SUCCESS;
    }
    if args.scenario == "ci-list" {
        // For `cargo xtask lab ci`: the CI scenarios, one a line.
        for s in scenarios::ALL.iter().filter(|s| s.ci) {
            println!("{}", s.name);
        }
        return ExitCode::SUCCESS;
    }
    let Some(scenario) = scenarios::find(&args.scenario) else {
        list();
        return usage_error(&format!(
            "no scenario {:?}; pick one from the list above",
            args.scenario
        ));
    };
    let Some(tern) = args.tern else {
        return usage_error(
            "--tern PATH is required (the tern binary; `cargo xtask lab` passes it)",
        );
    };
    if !tern.is_file() {
        return usage_error(&format!(
            "--tern {}: no such file; build it with `cargo build -p tern-node`",
            tern.display()
        ));
    }
    let tern = std::fs::canonicalize(&tern).unwrap_or(tern);
    let prefix = args.prefix.unwrap_or_else(default_prefix);
    if let Err(e) = check_prefix(&prefix) {
        return usage_error(&e.to_string());
    }
    let (dir, keep) = match &args.keep_logs {
        Some(d) => (d.join(format!("{prefix}-{}", scenario.name)), true),
        None => (
            std::env::temp_dir().join(format!("tern-lab-{prefix}")),
            false,
        ),
    };
    if keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let lab = match Lab::new(&prefix, dir.clone(), keep) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tern-lab: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern-lab: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ctx = Ctx {
        lab: lab.clone(),
        report: Report::new(scenario.name),
        opts: Opts {
            tern,
            quick: args.quick,
            prefix: prefix.clone(),
        },
    };
    println!(
        "tern-lab: {}{} (prefix {prefix}, files in {})",
        scenario.name,
        if args.quick { " --quick" } else { "" },
        dir.display()
    );
    enum End {
        Done(anyhow::Result<()>),
        Interrupted(&'static str),
    }
    let end = rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = (scenario.run)(&mut ctx) => End::Done(r),
            _ = tokio::signal::ctrl_c() => End::Interrupted("Ctrl-C"),
            _ = terminated => End::Interrupted("SIGTERM"),
        }
    });
    // Whatever happened: no namespace or process outlives the run.
    lab.cleanup();
    let code = match end {
        End::Done(Ok(())) => {
            print!("{}", ctx.report.table(None));
            if ctx.report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        End::Done(Err(e)) => {
            print!("{}", ctx.report.table(Some(&format!("{e:#}"))));
            ExitCode::FAILURE
        }
        End::Interrupted(how) => {
            print!(
                "{}",
                ctx.report
                    .table(Some(&format!("interrupted by {how}; everything removed")))
            );
            ExitCode::from(130)
        }
    };
    if keep {
        println!("tern-lab: logs kept in {}", dir.display());
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}
