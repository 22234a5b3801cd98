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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_protocol::catalog::methods;
use tern_protocol::metric_names as names;
use tern_protocol::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::state_name;
use crate::client::{Conn, Target, request_id};
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
/// How long one `/metrics` scrape may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest `/metrics` answer read.
pub const MAX_SCRAPE_BYTES: u64 = 8 * 1024 * 1024;
/// The demo cluster's join token (loopback only, thrown away at exit).
const DEMO_TOKEN: &str = "tern-demo-token";

/// Child processes, killed on drop unless already reaped.
struct Children {
    procs: Vec<Child>,
    dirs: Vec<PathBuf>,
    base: PathBuf,
}

impl Children {
    fn signal_all(&mut self, sig: rustix::process::Signal) {
        for c in &mut self.procs {
            if matches!(c.try_wait(), Ok(None))
                && let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32)
            {
                let _ = rustix::process::kill_process(pid, sig);
            }
        }
    }

    /// SIGTERM, wait (bounded), SIGKILL the rest. True when every node
    /// exited successfully on its own.
    fn stop(&mut self) -> bool {
        let mut clean = true;
        self.signal_all(rustix::process::Signal::TERM);
        let deadline = Instant::now() + NODE_STOP_WAIT;
        while Instant::now() < deadline
            && self
                .procs
                .iter_mut()
                .any(|c| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        for c in &mut self.procs {
            match c.try_wait() {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    eprintln!("demo: node pid {} exited with {status}", c.id());
                    clean = false;
                }
                _ => {
                    eprintln!("demo: node pid {} did not stop in time; killing it", c.id());
                    let _ = c.kill();
                    let _ = c.wait();
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

fn config_text(data_dir: &Path, join: Option<&NodeFile>) -> String {
    let mut text = format!(
        r#"data_dir = {dir:?}

[listen]
grpc = "127.0.0.1:0"
iroh = "127.0.0.1:0"
metrics = "127.0.0.1:0"

[capacity]
vcpus = 4
memory_mib = 4096

[vm]
# The demo runs its workloads as host processes (as `nobody` when root).
runtimes = ["process"]
runtime = "process"

[transport]
mode = "dual"

[transport.migration]
prefer_iroh = ["all_except_raft"]
raft_transport = "adaptive"
fallback_to_grpc = true

[cluster]
join_token = "{DEMO_TOKEN}"
"#,
        dir = data_dir.display().to_string()
    );
    if let Some(seed) = join {
        let iroh = seed
            .iroh
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        text.push_str(&format!(
            "join = [{{ id = \"{}\", grpc = \"{}\", iroh = [{iroh}] }}]\n",
            seed.id,
            seed.grpc.clone().unwrap_or_default()
        ));
    }
    text
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

async fn wait_node_file(child: &mut Child, dir: &Path, log: &Path) -> Result<NodeFile, String> {
    let deadline = Instant::now() + NODE_START_WAIT;
    loop {
        if let Ok(file) = NodeFile::read(dir)
            && file.pid == child.id()
        {
            return Ok(file);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "node in {} exited ({status}) while starting; its log ends:\n{}",
                dir.display(),
                log_tail(log)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node in {} did not start within {NODE_START_WAIT:?}; its log ends:\n{}",
                dir.display(),
                log_tail(log)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scrapes `/metrics` at `addr` (HTTP/1.0, bounded).
pub async fn scrape(addr: std::net::SocketAddr) -> Result<String, String> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: tern\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        s.take(MAX_SCRAPE_BYTES)
            .read_to_end(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&body).into_owned();
        Ok::<String, String>(
            text.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or(text),
        )
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, work)
        .await
        .map_err(|_| format!("scrape of {addr} timed out"))?
}

/// Sums the samples of `name` whose labels include every `(key, value)`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match head.split_once('{') {
                Some((m, r)) => (m, r),
                None => (head, ""),
            };
            if metric != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
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
    let mut t = Traffic::default();
    for tr in ["grpc", "iroh"] {
        t.calls.insert(
            tr,
            sum(text, names::CALLS, &[("transport", tr), ("side", "client")]),
        );
        let s = sum(
            text,
            &format!("{}_sum", names::CALL_SECONDS),
            &[("transport", tr), ("side", "client")],
        );
        let n = sum(
            text,
            &format!("{}_count", names::CALL_SECONDS),
            &[("transport", tr), ("side", "client")],
        );
        t.mean_ms
            .insert(tr, if n > 0.0 { s / n * 1000.0 } else { 0.0 });
        t.bytes
            .insert(tr, sum(text, names::BYTES, &[("transport", tr)]));
    }
    t.fallbacks = sum(text, names::ROUTER_FALLBACKS, &[]);
    t.raft_iroh_peers = sum(text, names::ROUTER_ADAPTIVE_IROH, &[]);
    t
}

fn spawn_node(exe: &Path, config: &Path, log: &Path) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Own process group: Ctrl-C in the terminal reaches the demo only.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))
}

async fn conn_to(dir: &Path) -> Result<Conn, String> {
    Ok(Conn::open(&Target {
        data_dir: Some(dir.to_owned()),
        ..Target::default()
    })
    .await?)
}

/// Runs the demo; `duration` ends it without Ctrl-C.
pub async fn demo(duration: Option<Duration>) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the tern binary: {e}"))?;
    let base = std::env::temp_dir().join(format!(
        "tern-demo-{}-{}",
        std::process::id(),
        &request_id()[4..12]
    ));
    std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
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
        std::fs::write(&config, config_text(&dir, files.first()))
            .map_err(|e| format!("{}: {e}", config.display()))?;
        let mut child = spawn_node(&exe, &config, &log)?;
        children.dirs.push(dir.clone());
        let file = match wait_node_file(&mut child, &dir, &log).await {
            Ok(f) => f,
            Err(e) => {
                children.procs.push(child);
                return Err(e);
            }
        };
        println!(
            "  node {i} up: pid {}, grpc {}, iroh {:?}, metrics {:?}",
            file.pid,
            file.grpc.clone().unwrap_or_default(),
            file.iroh.clone().unwrap_or_default(),
            file.metrics
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
        Ok(()) => Err("a node or workload had to be killed at exit (see above)".into()),
        Err(e) => Err(e),
    }
}

async fn live(
    dirs: &[PathBuf],
    files: &[NodeFile],
    duration: Option<Duration>,
) -> Result<(), String> {
    let mut conns = Vec::new();
    for d in dirs {
        conns.push(conn_to(d).await?);
    }
    let first = conns.first().ok_or("no nodes")?;
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

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
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
}
