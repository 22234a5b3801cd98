//! `tern demo`: a local 3-node cluster as separate `tern run` processes on
//! loopback, a VM on the process runtime, and a live view of the cluster.
//!
//! 1. Writes three config files in a fresh temporary directory (each node
//!    its own data dir; every port 0, so the kernel picks free ones; the
//!    `dual` policy with `prefer_iroh = ["all_except_raft"]` and adaptive
//!    Raft, so both transports carry traffic).
//! 2. Starts node 1 (a new cluster), reads the addresses it wrote to its
//!    `node.json`, then starts nodes 2 and 3 joining through it. Each child
//!    runs in its own process group, so Ctrl-C reaches the demo alone and
//!    the demo shuts the children down in order.
//! 3. Creates a VM running `sleep` on the process runtime, wherever
//!    placement puts it (a follower reports its state through the leader).
//! 4. Every [`REFRESH`] shows each node's role, term, applied index, and
//!    from its `/metrics`: calls, mean latency and bytes per transport, and
//!    router fallbacks; until Ctrl-C, SIGTERM or `--duration` seconds.
//! 5. Deletes the VM, sends SIGTERM to every node (each hands leadership
//!    over and drains), waits at most [`NODE_STOP_WAIT`], kills what is
//!    left, kills any workload left in the data dirs, and removes the
//!    temporary directory. A guard does the killing on every error path.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_process_kit::process::ProcessError;
use tern_process_kit::{Metrics, TernProcess, scrape};
use tern_protocol::catalog::methods;
use tern_protocol::metric_names as names;
use tern_protocol::pb;
use tern_transport_dual::TransportConfig;
use tern_transport_dual::policy::{MigrationConfig, Mode, RaftTransport};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::state_name;
use crate::client::{Conn, Target, request_id};
use crate::config::{
    CapacityConfig, Config, Listen, ListenConfig, RuntimeChoice, RuntimeName, SeedConfig,
};
use crate::error::CliError;
use crate::node::{NodeFile, runtime_dirs};

/// Nodes the demo starts.
pub const NODES: usize = 3;
/// How often the live view refreshes.
pub const REFRESH: Duration = Duration::from_secs(2);
/// How long a node gets to start (and, for a joiner, to be promoted).
pub const NODE_START_WAIT: Duration = Duration::from_secs(90);
/// How long the nodes get to stop after SIGTERM before they are killed:
/// their own shutdown deadline plus margin.
pub const NODE_STOP_WAIT: Duration = Duration::from_secs(20);
/// How long the VM gets to start or to be removed.
pub const VM_WAIT: Duration = Duration::from_secs(30);
/// The demo cluster's join token (loopback only, thrown away at exit).
const DEMO_TOKEN: &str = "tern-demo-token";

/// Why the demo failed; each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The demo could not find its own binary to start the nodes with.
    #[error(
        "cannot find the tern binary to start the nodes with: {0}; run the demo from an \
         installed or built `tern` binary"
    )]
    Binary(#[source] std::io::Error),
    /// A file or directory of the demo could not be written.
    #[error(
        "cannot write {path}: {source}; check that the temporary directory (TMPDIR) is \
         writable and has space"
    )]
    File {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A node's configuration could not be written as TOML.
    #[error("cannot write node {node}'s configuration: {source}; this is a bug in `tern demo`")]
    Config {
        /// The node (1-based).
        node: usize,
        /// Why.
        source: crate::config::ConfigError,
    },
    /// A node did not start.
    #[error(
        "node {node} did not start: {source}; its log and data directory are under {}; \
         check that loopback ports are free and rerun",
        base.display()
    )]
    Start {
        /// The node (1-based).
        node: usize,
        /// The demo's directory.
        base: PathBuf,
        /// Why.
        source: tern_process_kit::process::ProcessError,
    },
    /// A call to a node failed (the message names the method and what to
    /// do).
    #[error(transparent)]
    Call(#[from] CliError),
    /// The demo could not listen for SIGTERM.
    #[error("cannot listen for SIGTERM: {0}; stop the demo with Ctrl-C or --duration instead")]
    Signal(#[source] std::io::Error),
    /// A node or workload did not stop on its own and was killed.
    #[error(
        "a node or workload had to be killed at exit (see above); look for leftover \
         `tern` or workload processes with `ps`"
    )]
    Unclean,
}

/// Child processes, killed on drop unless already reaped.
struct Children {
    procs: Vec<TernProcess>,
    dirs: Vec<PathBuf>,
    base: PathBuf,
}

impl Children {
    fn signal_all(&mut self, sig: rustix::process::Signal) {
        for c in &mut self.procs {
            if c.is_running() {
                c.signal(sig);
            }
        }
    }

    /// SIGTERM, wait (bounded), SIGKILL the rest. True when every node
    /// exited successfully on its own.
    fn stop(&mut self) -> bool {
        let mut clean = true;
        self.signal_all(rustix::process::Signal::TERM);
        let deadline = Instant::now() + NODE_STOP_WAIT;
        while Instant::now() < deadline && self.procs.iter_mut().any(TernProcess::is_running) {
            std::thread::sleep(Duration::from_millis(100));
        }
        for c in &mut self.procs {
            match c.try_wait() {
                Some(status) if status.success() => {}
                Some(status) => {
                    eprintln!("demo: node pid {} exited with {status}", c.pid());
                    clean = false;
                }
                None => {
                    eprintln!(
                        "demo: node pid {} did not stop in time; killing it",
                        c.pid()
                    );
                    c.kill();
                    clean = false;
                }
            }
        }
        for d in &self.dirs {
            for rt in runtime_dirs(d) {
                for (vm, identity) in tern_runtime::pidfile::live_workloads(&rt) {
                    eprintln!(
                        "demo: killing leftover workload {vm} (pid {})",
                        identity.pid
                    );
                    let _ = identity.signal_group(rustix::process::Signal::KILL);
                    clean = false;
                }
            }
        }
        self.procs.clear();
        clean
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// One node's configuration: every port 0 on loopback, the process
/// runtime, the dual policy with iroh preferred for everything but Raft
/// and adaptive Raft; `join` is the node to join through.
fn node_config(data_dir: &Path, join: Option<&NodeFile>) -> Config {
    let loopback = Listen::On(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let mut c = Config {
        data_dir: data_dir.to_owned(),
        listen: ListenConfig {
            grpc: loopback,
            iroh: loopback,
            metrics: loopback,
        },
        capacity: CapacityConfig {
            vcpus: 4,
            memory_mib: 4096,
        },
        transport: Some(TransportConfig {
            mode: Mode::Dual,
            migration: MigrationConfig {
                prefer_iroh: vec!["all_except_raft".into()],
                raft_transport: RaftTransport::Adaptive,
                fallback_to_grpc: true,
            },
        }),
        ..Config::default()
    };
    // The demo runs its workloads as host processes (as `nobody` when root).
    c.vm.runtimes = Some(vec![RuntimeName::Process]);
    c.vm.runtime = RuntimeChoice::Process;
    c.cluster.join_token = Some(DEMO_TOKEN.into());
    c.cluster.join.extend(join.map(SeedConfig::from_node_file));
    c
}

/// One node's figures from `/metrics`, per transport.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    /// Calls made as a client, by transport.
    pub calls: BTreeMap<&'static str, f64>,
    /// Mean client-side latency in ms, by transport.
    pub mean_ms: BTreeMap<&'static str, f64>,
    /// Payload bytes sent and received, by transport.
    pub bytes: BTreeMap<&'static str, f64>,
    /// Router fallbacks to gRPC.
    pub fallbacks: f64,
    /// Whether Raft to some peer runs over iroh (adaptive).
    pub raft_iroh_peers: f64,
}

/// Reads [`Traffic`] from an exposition.
pub fn traffic(text: &str) -> Traffic {
    let m = Metrics::parse(text);
    let mut t = Traffic::default();
    for tr in ["grpc", "iroh"] {
        let client = [("transport", tr), ("side", "client")];
        t.calls.insert(tr, m.sum(names::CALLS, &client));
        let s = m.sum(&format!("{}_sum", names::CALL_SECONDS), &client);
        let n = m.sum(&format!("{}_count", names::CALL_SECONDS), &client);
        t.mean_ms
            .insert(tr, if n > 0.0 { s / n * 1000.0 } else { 0.0 });
        t.bytes
            .insert(tr, m.sum(names::BYTES, &[("transport", tr)]));
    }
    t.fallbacks = m.sum(names::ROUTER_FALLBACKS, &[]);
    t.raft_iroh_peers = m.sum(names::ROUTER_ADAPTIVE_IROH, &[]);
    t
}

/// Starts `tern run --config CONFIG` in its own process group (so Ctrl-C
/// in the terminal reaches the demo only), its output in `log`.
fn spawn_node(
    exe: &Path,
    config: &Path,
    dir: &Path,
    log: &Path,
) -> Result<TernProcess, ProcessError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = TernProcess::command(exe, config);
    cmd.process_group(0);
    TernProcess::spawn(cmd, dir, log)
}

async fn conn_to(dir: &Path) -> Result<Conn, CliError> {
    Conn::open(&Target {
        data_dir: Some(dir.to_owned()),
        ..Target::default()
    })
    .await
}

/// Runs the demo; `duration` ends it without Ctrl-C.
pub async fn demo(duration: Option<Duration>) -> Result<(), DemoError> {
    let exe = std::env::current_exe().map_err(DemoError::Binary)?;
    let base = std::env::temp_dir().join(format!(
        "tern-demo-{}-{}",
        std::process::id(),
        &request_id()[4..12]
    ));
    std::fs::create_dir_all(&base).map_err(|source| DemoError::File {
        path: base.clone(),
        source,
    })?;
    let mut children = Children {
        procs: Vec::new(),
        dirs: Vec::new(),
        base: base.clone(),
    };
    println!("tern demo: {NODES} nodes in {}", base.display());
    let mut files = Vec::new();
    for i in 1..=NODES {
        let dir = base.join(format!("node{i}"));
        let config = base.join(format!("node{i}.toml"));
        let log = base.join(format!("node{i}.log"));
        let text = node_config(&dir, files.first())
            .to_toml()
            .map_err(|source| DemoError::Config { node: i, source })?;
        std::fs::write(&config, text).map_err(|source| DemoError::File {
            path: config.clone(),
            source,
        })?;
        let not_started = |source| DemoError::Start {
            node: i,
            base: base.clone(),
            source,
        };
        let mut child = spawn_node(&exe, &config, &dir, &log).map_err(not_started)?;
        children.dirs.push(dir.clone());
        let file = match child.wait_node_file::<NodeFile>(NODE_START_WAIT).await {
            Ok(f) => f,
            Err(e) => {
                children.procs.push(child);
                return Err(not_started(e));
            }
        };
        let iroh = file
            .iroh
            .iter()
            .flatten()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let metrics = file
            .metrics
            .map_or_else(|| "off".to_owned(), |m| format!("http://{m}/metrics"));
        println!(
            "  node {i} up: pid {}, grpc {}, iroh {}, metrics {metrics}",
            file.pid,
            file.grpc.clone().unwrap_or_default(),
            if iroh.is_empty() { "off" } else { &iroh },
        );
        children.procs.push(child);
        files.push(file);
    }
    let result = live(&children.dirs, &files, duration).await;
    println!("\nshutting down: SIGTERM to every node (a leader hands over first)");
    let clean = children.stop();
    drop(children);
    match result {
        Ok(()) if clean => {
            println!("all nodes stopped cleanly");
            Ok(())
        }
        Ok(()) => Err(DemoError::Unclean),
        Err(e) => Err(e),
    }
}

async fn live(
    dirs: &[PathBuf],
    files: &[NodeFile],
    duration: Option<Duration>,
) -> Result<(), DemoError> {
    let mut conns = Vec::new();
    for d in dirs {
        conns.push(conn_to(d).await?);
    }
    let Some(first) = conns.first() else {
        return Ok(()); // no nodes: nothing to show
    };
    let status: pb::NodeStatus = first
        .call(methods::STATUS_GET, &pb::StatusRequest {})
        .await?;
    println!(
        "cluster formed: {} members, leader node {}",
        status.members.len(),
        status.leader_id
    );
    let spec = pb::VmSpec {
        name: "demo-sleeper".into(),
        vcpus: 1,
        memory_mib: 64,
        runtime: "process".into(),
        command: vec!["sleep".into(), "3600".into()],
        ..Default::default()
    };
    let vm: pb::VmRecord = first
        .call(
            methods::VM_CREATE,
            &pb::CreateVmRequest {
                request_id: request_id(),
                spec: Some(spec),
            },
        )
        .await?;
    println!(
        "created VM {} ({}) on node {}: `sleep 3600` on the process runtime",
        vm.id,
        vm.spec.as_ref().map(|s| s.name.as_str()).unwrap_or(""),
        vm.node_id
    );

    let mut term = signal(SignalKind::terminate()).map_err(DemoError::Signal)?;
    let started = Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last: Vec<Option<(Instant, Traffic)>> = vec![None; files.len()];
    loop {
        frame(&conns, files, &vm.id, tty, &mut last).await;
        if let Some(d) = duration
            && started.elapsed() >= d
        {
            break;
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }

    println!("\ndeleting VM {}", vm.id);
    let delete = first
        .call::<_, pb::VmRecord>(
            methods::VM_DELETE,
            &pb::VmActionRequest {
                request_id: request_id(),
                vm_id: vm.id.clone(),
            },
        )
        .await;
    if let Err(e) = delete {
        eprintln!("demo: delete failed ({e}); its workload is killed at exit");
    } else {
        let deadline = Instant::now() + VM_WAIT;
        while Instant::now() < deadline {
            let got = first
                .call::<_, pb::VmRecord>(
                    methods::VM_GET,
                    &pb::GetVmRequest {
                        vm_id: vm.id.clone(),
                    },
                )
                .await;
            if got.is_err() {
                println!("VM {} removed", vm.id);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    for c in conns {
        c.close().await;
    }
    Ok(())
}

/// A non-negative figure as a whole number.
fn whole(x: f64) -> u64 {
    if x.is_finite() && x > 0.0 {
        x.round() as u64
    } else {
        0
    }
}

async fn frame(
    conns: &[Conn],
    files: &[NodeFile],
    vm_id: &str,
    tty: bool,
    last: &mut [Option<(Instant, Traffic)>],
) {
    let mut out = String::new();
    if tty {
        out.push_str("\x1b[2J\x1b[H");
    } else {
        out.push_str("\n----\n");
    }
    out.push_str("tern demo — Ctrl-C to stop\n\n");
    out.push_str(&format!(
        "{:<5} {:<10} {:<5} {:<8} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10} {:>9}\n",
        "NODE",
        "ROLE",
        "TERM",
        "APPLIED",
        "GRPC CALLS",
        "IROH CALLS",
        "GRPC ms",
        "IROH ms",
        "GRPC B/s",
        "IROH B/s",
        "FALLBACKS"
    ));
    let mut vm_line = String::new();
    for (i, (conn, file)) in conns.iter().zip(files).enumerate() {
        let s = conn
            .call::<_, pb::NodeStatus>(methods::STATUS_GET, &pb::StatusRequest {})
            .await;
        let (id, role, term, applied) = match &s {
            Ok(s) => (
                s.node_id.to_string(),
                match pb::RaftRole::try_from(s.role) {
                    Ok(pb::RaftRole::Leader) => "leader",
                    Ok(pb::RaftRole::Follower) => "follower",
                    Ok(pb::RaftRole::Candidate) => "candidate",
                    Ok(pb::RaftRole::Learner) => "learner",
                    _ => "?",
                }
                .to_owned(),
                s.term.to_string(),
                s.applied_index.to_string(),
            ),
            Err(_) => (
                format!("#{}", i + 1),
                "unreachable".into(),
                "-".into(),
                "-".into(),
            ),
        };
        let now = Instant::now();
        let t = match file.metrics {
            Some(addr) => scrape(addr).await.map(|x| traffic(&x)).unwrap_or_default(),
            None => Traffic::default(),
        };
        let rate = |tr: &str| match &last[i] {
            Some((at, prev)) => {
                let dt = now.saturating_duration_since(*at).as_secs_f64().max(0.001);
                (t.bytes.get(tr).copied().unwrap_or(0.0)
                    - prev.bytes.get(tr).copied().unwrap_or(0.0))
                    / dt
            }
            None => 0.0,
        };
        let g = |m: &BTreeMap<&'static str, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
        out.push_str(&format!(
            "{:<5} {:<10} {:<5} {:<8} {:>10} {:>10} {:>9.2} {:>9.2} {:>10} {:>10} {:>9}\n",
            id,
            role,
            term,
            applied,
            whole(g(&t.calls, "grpc")),
            whole(g(&t.calls, "iroh")),
            g(&t.mean_ms, "grpc"),
            g(&t.mean_ms, "iroh"),
            whole(rate("grpc")),
            whole(rate("iroh")),
            whole(t.fallbacks)
        ));
        last[i] = Some((now, t));
        if vm_line.is_empty()
            && let Ok(v) = conn
                .call::<_, pb::VmRecord>(
                    methods::VM_GET,
                    &pb::GetVmRequest {
                        vm_id: vm_id.into(),
                    },
                )
                .await
        {
            vm_line = format!(
                "VM {} on node {}: desired {}, observed {}{}",
                v.id,
                v.node_id,
                state_name(v.desired),
                state_name(v.observed),
                if v.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", v.reason)
                }
            );
        }
    }
    out.push('\n');
    out.push_str(&vm_line);
    out.push('\n');
    print!("{out}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_is_read_per_transport_from_the_exposition() {
        let text = r#"# TYPE tern_transport_calls_total counter
tern_transport_calls_total{transport="grpc",service="raft",method="Vote",side="client",outcome="ok"} 5
tern_transport_calls_total{transport="grpc",service="vm",method="Get",side="client",outcome="ok"} 2
tern_transport_calls_total{transport="grpc",service="vm",method="Get",side="server",outcome="ok"} 9
tern_transport_calls_total{transport="iroh",service="status",method="Get",side="client",outcome="ok"} 3
tern_transport_call_seconds_sum{transport="iroh",service="status",method="Get",side="client"} 0.006
tern_transport_call_seconds_count{transport="iroh",service="status",method="Get",side="client"} 3
tern_router_fallbacks_total{service="vm",method="Get",reason="timed_out"} 1
"#;
        let t = traffic(text);
        assert_eq!(t.calls["grpc"], 7.0);
        assert_eq!(t.calls["iroh"], 3.0);
        assert!((t.mean_ms["iroh"] - 2.0).abs() < 1e-9);
        assert_eq!(t.mean_ms["grpc"], 0.0);
        assert_eq!(t.fallbacks, 1.0);
        assert_eq!(whole(-0.0), 0);
        assert_eq!(whole(2.6), 3);
    }

    #[test]
    fn node_configs_are_what_the_node_reads() {
        let seed = NodeFile {
            id: "ab".repeat(32),
            grpc: Some("https://127.0.0.1:7400".into()),
            iroh: Some(vec!["127.0.0.1:7401".parse().unwrap()]),
            metrics: None,
            pid: 1,
        };
        let text = node_config(Path::new("/tmp/d/node2"), Some(&seed))
            .to_toml()
            .unwrap();
        let checked = Config::parse(&text).unwrap();
        assert_eq!(checked.seeds.len(), 1);
        assert_eq!(checked.config.cluster.join[0].iroh, seed.iroh.unwrap());
        assert_eq!(checked.config.vm.runtimes, Some(vec![RuntimeName::Process]));
        assert!(checked.policy.uses_iroh(), "{text}");
        assert_eq!(checked.config.listen.grpc.addr().unwrap().port(), 0);
    }
}
