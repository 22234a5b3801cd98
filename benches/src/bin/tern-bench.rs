//! `tern-bench`: transport figures measured between two processes.
//!
//! ```text
//! tern-bench transport [--quick] --out target/bench-report/parts/transport-2proc.json
//! tern-bench serve --transport iroh|grpc|raw-iroh|raw-grpc [--key-file F]
//! tern-bench load --transport KIND --what unary|bulk|control-under-bulk [--secs N]
//! tern-bench fleet --tern PATH [--quick] [--agents 10,100,1000] [--steady-secs N] [--transport grpc,iroh] [--out FILE]
//! tern-bench cluster --tern PATH [--quick] [--steady-secs N] [--keep-logs DIR]
//!     [--only grpc,iroh,dual,etcd] [--writers 1,16] [--run-secs N] [--throughput-only]
//!     --out target/bench-report/parts/cluster.json
//! ```
//!
//! `transport` is the client: it starts `serve` as a child process once per
//! transport, measures, and writes the part file that `cargo xtask bench`
//! merges into its report (see the `tern_benches` crate docs). `cluster`
//! runs 3-node clusters of the `tern` binary at PATH on loopback (no root)
//! and writes the cluster part file. Progress goes to stderr; the figures
//! only to `--out`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tern_benches::kind::Kind;
use tern_benches::twoproc::{self, Settings};
use tern_benches::{procfs, serve};

#[derive(Debug, Parser)]
#[command(
    name = "tern-bench",
    about = "Tern transport figures between two processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve one transport on 127.0.0.1 until stdin closes or SIGTERM;
    /// prints one JSON ready line on stdout.
    Serve {
        /// Which transport to serve.
        #[arg(long)]
        transport: Kind,
        /// The server's secret key (32 raw bytes), created if missing;
        /// a random key when absent.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Measure every transport against a server child process and write
    /// the part file.
    Transport {
        /// Smaller samples: about a minute or two in a release build.
        #[arg(long)]
        quick: bool,
        /// Tiny samples to check the pipeline (tests); figures mean little.
        #[arg(long, hide = true)]
        smoke: bool,
        /// Only these transports (default: all four).
        #[arg(long, value_delimiter = ',')]
        only: Vec<Kind>,
        /// Where to write the JSON part file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Servers and agents at fleet scale: N simulated agents (each its
    /// own key and connections, the real agent protocol) against 3 real
    /// `tern` servers on loopback, per transport.
    Fleet(FleetArgs),
    /// One load alone against a server child, for a profiler (`perf
    /// record -g -- tern-bench load ...` sees both processes) or a quick
    /// before/after of one figure; prints what it measured.
    #[command(hide = true)]
    Load {
        /// Which transport to serve and call.
        #[arg(long)]
        transport: Kind,
        /// What to run.
        #[arg(long, value_enum)]
        what: twoproc::Load,
        /// How long, in seconds.
        #[arg(long, default_value_t = 5)]
        secs: u64,
    },
    /// Measure Raft on 3-node clusters of real `tern` processes on
    /// loopback, once per transport mode, and write the part file.
    Cluster {
        /// The `tern` binary the nodes run.
        #[arg(long)]
        tern: PathBuf,
        /// Shorter runs and fewer failover repeats.
        #[arg(long)]
        quick: bool,
        /// Length of each steadiness window (idle, then 64 writers),
        /// in seconds: default 5 with --quick, else 60; the Raft issue's
        /// figure is 600.
        #[arg(long)]
        steady_secs: Option<u64>,
        /// Keep configs, data dirs and node logs under DIR/bench-cluster
        /// (default: a temporary directory, removed at the end).
        #[arg(long)]
        keep_logs: Option<PathBuf>,
        /// A partial run (profiling, before/after a change): only these
        /// columns, of grpc, iroh, dual and etcd. The part file then has
        /// the other columns null.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Writer counts instead of the default (1,64 with --quick, else
        /// 1,16,64,256).
        #[arg(long, value_delimiter = ',')]
        writers: Vec<usize>,
        /// Seconds of each throughput run instead of the default (4 with
        /// --quick, else 15).
        #[arg(long)]
        run_secs: Option<u64>,
        /// Only the throughput runs: no steadiness window, no failovers.
        #[arg(long)]
        throughput_only: bool,
        /// Where to write the JSON part file.
        #[arg(long)]
        out: PathBuf,
    },
}

/// What `tern-bench fleet` was asked for.
#[derive(Debug, clap::Args)]
struct FleetArgs {
    /// The `tern` binary the servers run.
    #[arg(long)]
    tern: PathBuf,
    /// Agent counts, measured in ascending order on one cluster
    /// (default 10,100 with --quick, else 10,100,1000).
    #[arg(long, value_delimiter = ',')]
    agents: Vec<usize>,
    /// Length of each count's steady window, in seconds (default 3
    /// with --quick, else 20).
    #[arg(long)]
    steady_secs: Option<u64>,
    /// What the simulated agents speak, each on a cluster of its own
    /// (`grpc-direct`, `iroh-direct`: every heartbeat to the leader, none
    /// relayed by a follower, for a side-by-side run).
    #[arg(long, value_delimiter = ',', default_value = "grpc,iroh")]
    transport: Vec<String>,
    /// Niceness of the simulated agents' threads (0 to 19): they stand
    /// for other machines, and on one machine a positive value keeps them
    /// from taking the servers' and the commit probe's CPU.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    agents_nice: i32,
    /// Fewer agents and a shorter window (what CI runs).
    #[arg(long)]
    quick: bool,
    /// Also write the `fleet` part file (`cargo xtask bench`'s format).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn fleet_main(args: FleetArgs) -> anyhow::Result<()> {
    let FleetArgs {
        tern,
        agents,
        steady_secs,
        transport: transports,
        agents_nice,
        quick,
        out,
    } = args;
    anyhow::ensure!(tern.is_file(), "--tern {}: no such file", tern.display());
    let mut counts = if agents.is_empty() {
        if quick {
            vec![10, 100]
        } else {
            vec![10, 100, 1000]
        }
    } else {
        agents
    };
    counts.sort_unstable();
    counts.dedup();
    let steady = std::time::Duration::from_secs(steady_secs.unwrap_or(if quick { 3 } else { 20 }));
    let tern = std::fs::canonicalize(&tern).unwrap_or(tern);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut runs = Vec::new();
    for transport in transports {
        let dir = std::env::temp_dir().join(format!(
            "tern-bench-fleet-{}-{transport}",
            std::process::id()
        ));
        let opts = tern_benches::fleet::FleetOpts {
            tern: tern.clone(),
            counts: counts.clone(),
            steady,
            dir: dir.clone(),
            transport: transport.clone(),
            agents_nice,
        };
        eprintln!("fleet: {transport}: agents {counts:?} (simulated agents at nice {agents_nice})");
        let result = rt.block_on(async {
            tokio::select! {
                r = tern_benches::fleet::run(&opts) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted by Ctrl-C")),
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
        let rows = result.with_context(|| format!("the {transport} fleet"))?;
        println!("{}", tern_benches::fleet::table(&rows));
        runs.push((transport, rows));
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if let Some(out) = out {
        tern_benches::fleet::part(quick, steady, &runs)
            .write(&out)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve {
            transport,
            key_file,
        } => serve_main(transport, key_file),
        Cmd::Transport {
            quick,
            smoke,
            only,
            out,
        } => transport_main(quick, smoke, only, out),
        Cmd::Load {
            transport,
            what,
            secs,
        } => load_main(transport, what, secs),
        Cmd::Cluster {
            tern,
            quick,
            steady_secs,
            keep_logs,
            only,
            writers,
            run_secs,
            throughput_only,
            out,
        } => {
            let opts = tern_benches::cluster::BenchOpts {
                tern,
                quick,
                out,
                dir: PathBuf::new(),
                steady_secs,
                only_modes: only,
                writers,
                run_secs,
                throughput_only,
            };
            cluster_main(opts, keep_logs)
        }
        Cmd::Fleet(args) => fleet_main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve_main(kind: Kind, key_file: Option<PathBuf>) -> anyhow::Result<()> {
    let key = serve::load_key(key_file.as_deref())?;
    let rt = runtime()?;
    let result = rt.block_on(serve::serve(kind, key));
    // The stdin reader may still block in a runtime thread (after SIGTERM):
    // do not wait for it.
    rt.shutdown_background();
    result
}

fn transport_main(quick: bool, smoke: bool, only: Vec<Kind>, out: PathBuf) -> anyhow::Result<()> {
    let settings = if smoke {
        Settings::smoke()
    } else if quick {
        Settings::quick()
    } else {
        Settings::full()
    };
    let kinds = if only.is_empty() {
        Kind::ALL.to_vec()
    } else {
        only
    };
    let exe = std::env::current_exe().context("finding this program to start its servers")?;
    eprintln!(
        "tern-bench transport: {} mode, {} build, {} transports; load average {}",
        if smoke {
            "smoke"
        } else if quick {
            "quick"
        } else {
            "full"
        },
        tern_benches::part::build_profile(),
        kinds.len(),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".to_owned())
    );
    let _ = procfs::clock_ticks();
    let rt = runtime()?;
    let part = rt.block_on(twoproc::run(&exe, &kinds, &settings, quick || smoke))?;
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    part.write(&out)?;
    eprintln!("tern-bench transport: wrote {}", out.display());
    Ok(())
}

fn load_main(kind: Kind, what: twoproc::Load, secs: u64) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this program to start its server")?;
    let rt = runtime()?;
    let line = rt.block_on(twoproc::load(
        &exe,
        kind,
        what,
        std::time::Duration::from_secs(secs),
    ))?;
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    println!("{line}");
    Ok(())
}

fn cluster_main(
    mut opts: tern_benches::cluster::BenchOpts,
    keep_logs: Option<PathBuf>,
) -> anyhow::Result<()> {
    if !opts.tern.is_file() {
        anyhow::bail!("--tern {}: no such file", opts.tern.display());
    }
    for mode in &opts.only_modes {
        if !["grpc", "iroh", "dual", "etcd"].contains(&mode.as_str()) {
            anyhow::bail!("--only {mode}: expected grpc, iroh, dual or etcd");
        }
    }
    if opts.writers.contains(&0) || opts.run_secs == Some(0) {
        anyhow::bail!("--writers and --run-secs must be at least 1");
    }
    opts.tern = std::fs::canonicalize(&opts.tern).unwrap_or(opts.tern);
    let (dir, keep) = match &keep_logs {
        Some(d) => (d.join("bench-cluster"), true),
        None => (
            std::env::temp_dir().join(format!("tern-bench-cluster-{}", std::process::id())),
            false,
        ),
    };
    opts.dir = dir.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The clusters' children are killed when dropped: on an error, on
    // Ctrl-C (the future is dropped) and at the end.
    let result = rt.block_on(async {
        tokio::select! {
            r = tern_benches::cluster::run(&opts) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted by Ctrl-C")),
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
