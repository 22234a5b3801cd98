//! `tern demo`: a local cluster of 3 servers and `--agents` agents (3 by
//! default) as separate `tern run` processes on loopback, a VM on the
//! process runtime, and the migration from gRPC to iroh run live by the
//! cluster (`tern rollout`) across servers and agents, then rolled back.
//!
//! 1. Writes a config file per node in a fresh temporary directory (each
//!    node its own data dir; every port 0, so the kernel picks free ones;
//!    no `[transport]` pin, so each node runs the cluster's desired policy
//!    for it: gRPC by default, then the rollout's). Agents have `[node]
//!    role = "agent"`; with agents, the servers have too little capacity
//!    for a VM, so VMs run on agents.
//! 2. Starts node 1 (a new cluster), reads the addresses it wrote to its
//!    `node.json`, then starts servers 2 and 3 joining through it and the
//!    agents registering through it. Each child runs in its own process
//!    group, so Ctrl-C reaches the demo alone and the demo shuts the
//!    children down in order.
//! 3. Waits until the leader lists every agent ready, creates a VM running
//!    `sleep` on the process runtime, prints once the commands to poke
//!    this cluster from another terminal, and starts steady calls to every
//!    node over both transports ([`load`]).
//! 4. Starts the shipped default plan (`deploy/rollout/default.toml`, or
//!    `--plan FILE`) with each stage's soak set to `--soak` seconds
//!    ([`rollout::demo_plan`]: parsed, soaks replaced, checked again)
//!    through the call `tern rollout start` makes; the leader drives it.
//!    Every [`REFRESH`] a frame ([`view`]) shows the stage, its policy and
//!    share, the gates with their figures and bounds, each node's policy
//!    and where it comes from, calls per transport, and the newest
//!    decisions. When the plan is over (done, or rolled back by its gates:
//!    the decision says why) or stops moving, the demo calls
//!    `rollback --all` and waits until every node runs its pre-rollout
//!    policy again.
//! 5. Keeps the live view for `--duration` seconds more (without it: until
//!    Ctrl-C or SIGTERM), then stops the calls and counts them: any failed
//!    call is reported and the demo exits non-zero.
//! 6. Deletes the VMs (its own and any a poke created), sends SIGTERM to
//!    every node (each hands leadership over and drains), waits at most
//!    [`NODE_STOP_WAIT`], kills what is left, kills any workload left in
//!    the data dirs, and removes the temporary directory. A guard does the
//!    killing on every error path.
//!
//! # Layout
//!
//! - this file: the nodes, the VM, the order of the demo.
//! - [`load`]: the steady calls and their counts.
//! - [`rollout`]: the plan with compressed soaks, following it, the
//!   rollback.
//! - [`view`]: the frames.

pub mod load;
pub mod rollout;
pub mod view;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_process_kit::TernProcess;
use tern_process_kit::process::ProcessError;
use tern_protocol::catalog::methods;
use tern_protocol::pb;
use tokio::signal::unix::{Signal, SignalKind, signal};

use self::load::{Counts, Load};
use self::view::View;
use crate::client::{Conn, Target, request_id};
use crate::config::{
    CapacityConfig, Config, Listen, ListenConfig, Role, RuntimeChoice, RuntimeName, SeedConfig,
};
use crate::error::CliError;
use crate::node::{NodeFile, runtime_dirs};

/// Servers (Raft members) the demo starts.
pub const NODES: usize = 3;
/// Agents the demo starts unless `--agents` says otherwise.
pub const DEFAULT_AGENTS: usize = 3;
/// The most agents `--agents` takes (each is a process on this machine).
pub const MAX_AGENTS: usize = 16;
/// How often the live view refreshes.
pub const REFRESH: Duration = Duration::from_secs(2);
/// How long a node gets to start (and, for a joiner, to be promoted).
pub const NODE_START_WAIT: Duration = Duration::from_secs(90);
/// How long the nodes get to stop after SIGTERM before they are killed:
/// their own shutdown deadline plus margin.
pub const NODE_STOP_WAIT: Duration = Duration::from_secs(20);
/// How long the VM gets to start or to be removed.
pub const VM_WAIT: Duration = Duration::from_secs(30);
/// Calls the steady load makes before the rollout starts (a baseline).
pub const BASELINE_CALLS: u64 = 40;
/// The file in the demo's directory holding its operator key.
pub const OPERATOR_KEY: &str = "operator.key";
/// The demo cluster's join token (loopback only, thrown away at exit).
const DEMO_TOKEN: &str = "tern-demo-token";

/// What `tern demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keep the live view this long after the rollback, then stop
    /// (`None`: until Ctrl-C or SIGTERM).
    pub duration: Option<Duration>,
    /// Each stage's soak, seconds ([`rollout::DEFAULT_SOAK_SECS`]).
    pub soak_secs: u64,
    /// The plan to run instead of the shipped default.
    pub plan: Option<PathBuf>,
    /// Agents to start besides the servers (0 to [`MAX_AGENTS`]).
    pub agents: usize,
}

impl Default for DemoOptions {
    /// Until Ctrl-C, [`rollout::DEFAULT_SOAK_SECS`], the shipped plan,
    /// [`DEFAULT_AGENTS`].
    fn default() -> DemoOptions {
        DemoOptions {
            duration: None,
            soak_secs: rollout::DEFAULT_SOAK_SECS,
            plan: None,
            agents: DEFAULT_AGENTS,
        }
    }
}

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
    /// `--soak` out of range.
    #[error("--soak {0}: 1 to {max} seconds", max = rollout::MAX_DEMO_SOAK_SECS)]
    Soak(u64),
    /// `--agents` out of range.
    #[error("--agents {0}: 0 to {MAX_AGENTS}")]
    Agents(usize),
    /// Not every agent was ready in time.
    #[error(
        "{ready} of {want} agents ready after {} s; see the agents' logs (agent*.log) \
         in the demo directory",
        NODE_START_WAIT.as_secs()
    )]
    AgentsNotReady {
        /// Agents started.
        want: usize,
        /// Of them, ready.
        ready: usize,
    },
    /// The plan with compressed soaks is not valid.
    #[error("the demo's plan: {0}")]
    Plan(String),
    /// A node did not return to its pre-rollout policy after
    /// `rollback --all`.
    #[error(
        "after rollback --all the nodes run {now}, not their pre-rollout {before}; \
         see each node's log in the demo directory"
    )]
    Rollback {
        /// The policies before the rollout.
        before: String,
        /// The policies at the end of the wait.
        now: String,
    },
    /// Some of the demo's own calls failed.
    #[error(
        "{failed} of {total} demo calls failed during the demo (the newest: {last}); \
         the migration was not seamless: see the node logs"
    )]
    FailedCalls {
        /// Failed calls.
        failed: u64,
        /// Every call.
        total: u64,
        /// The newest failure.
        last: String,
    },
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
        // Looked at once: a second stop (the guard's) must not report the
        // same workloads again.
        self.dirs.clear();
        clean
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// What a node of the demo is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A server, hosting VMs as well (a demo without agents).
    Server,
    /// A server too small for any VM (the agents host them).
    ServerOnly,
    /// An agent.
    Agent,
}

/// One node's configuration: every port 0 on loopback, the process
/// runtime, no `[transport]` pin (the node runs the cluster's desired
/// policy for it, the rollout's while one covers it); `join` is the node
/// to join (or, for an agent, register) through.
fn node_config(data_dir: &Path, join: Option<&NodeFile>, kind: Kind) -> Config {
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
        transport: None,
        ..Config::default()
    };
    // The demo runs its workloads as host processes (as `nobody` when root).
    c.vm.runtimes = Some(vec![RuntimeName::Process]);
    c.vm.runtime = RuntimeChoice::Process;
    c.cluster.join_token = Some(DEMO_TOKEN.into());
    c.cluster.join.extend(join.map(SeedConfig::from_node_file));
    match kind {
        Kind::Server => {}
        Kind::ServerOnly => {
            c.capacity = CapacityConfig {
                vcpus: 1,
                memory_mib: 16,
            };
        }
        Kind::Agent => c.node.role = Role::Agent,
    }
    c
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

async fn conn_to(dir: &Path, transport: &str, key: Option<PathBuf>) -> Result<Conn, CliError> {
    Conn::open(&Target {
        data_dir: Some(dir.to_owned()),
        transport: Some(transport.to_owned()),
        key,
        ..Target::default()
    })
    .await
}

/// Ctrl-C and SIGTERM.
pub struct Stop {
    term: Signal,
    stopped: bool,
}

impl Stop {
    fn new() -> Result<Stop, DemoError> {
        Ok(Stop {
            term: signal(SignalKind::terminate()).map_err(DemoError::Signal)?,
            stopped: false,
        })
    }

    /// Waits `d`; true (then always) once Ctrl-C or SIGTERM came.
    pub async fn wait(&mut self, d: Duration) -> bool {
        if !self.stopped {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => self.stopped = true,
                _ = self.term.recv() => self.stopped = true,
                _ = tokio::time::sleep(d) => {}
            }
        }
        self.stopped
    }
}

/// The running demo: a connection to each node (node 1's key over gRPC),
/// the VM, the calls' counts, the view and the signals.
pub struct Live {
    /// One connection per node.
    pub conns: Vec<Conn>,
    /// What each node wrote about itself.
    pub files: Vec<NodeFile>,
    /// The demo's VM.
    pub vm_id: String,
    /// The steady calls' counts.
    pub counts: Arc<Counts>,
    /// The frames' memory.
    pub view: View,
    /// Ctrl-C and SIGTERM.
    pub stop: Stop,
}

impl Live {
    /// Prints one frame headed `phase`; answers the rollout read.
    pub async fn frame(&mut self, phase: &str) -> Option<pb::RolloutResponse> {
        self.view
            .frame(&self.conns, &self.files, &self.vm_id, &self.counts, phase)
            .await
    }
}

/// Runs the demo.
pub async fn demo(opts: DemoOptions) -> Result<(), DemoError> {
    let plan = rollout::demo_plan(opts.plan.as_deref(), opts.soak_secs)?;
    if opts.agents > MAX_AGENTS {
        return Err(DemoError::Agents(opts.agents));
    }
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
    println!(
        "tern demo: {NODES} servers and {} agents in {}",
        opts.agents,
        base.display()
    );
    let started = start_nodes(&exe, &base, opts.agents, &mut children).await;
    let result = match started {
        Ok(files) => live(&exe, &children.dirs, files, &plan, opts.duration).await,
        Err(e) => Err(e),
    };
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

/// Starts the servers, then the agents, one after another (each joiner
/// through node 1); nodes `1..=NODES` are the servers, the rest agents.
async fn start_nodes(
    exe: &Path,
    base: &Path,
    agents: usize,
    children: &mut Children,
) -> Result<Vec<NodeFile>, DemoError> {
    let mut files: Vec<NodeFile> = Vec::new();
    for i in 1..=NODES + agents {
        let (name, label, kind) = match i {
            i if i > NODES => (
                format!("agent{}", i - NODES),
                format!("agent {}", i - NODES),
                Kind::Agent,
            ),
            _ if agents > 0 => (format!("node{i}"), format!("node {i}"), Kind::ServerOnly),
            _ => (format!("node{i}"), format!("node {i}"), Kind::Server),
        };
        let dir = base.join(&name);
        let config = base.join(format!("{name}.toml"));
        let log = base.join(format!("{name}.log"));
        let text = node_config(&dir, files.first(), kind)
            .to_toml()
            .map_err(|source| DemoError::Config { node: i, source })?;
        std::fs::write(&config, text).map_err(|source| DemoError::File {
            path: config.clone(),
            source,
        })?;
        let not_started = |source| DemoError::Start {
            node: i,
            base: base.to_owned(),
            source,
        };
        let mut child = spawn_node(exe, &config, &dir, &log).map_err(not_started)?;
        children.dirs.push(dir.clone());
        let file = child.wait_node_file::<NodeFile>(NODE_START_WAIT).await;
        children.procs.push(child);
        let file = file.map_err(not_started)?;
        println!("  {label} up: {}", node_line(&file));
        files.push(file);
    }
    Ok(files)
}

/// A node's pid and addresses, for people.
fn node_line(file: &NodeFile) -> String {
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
    format!(
        "pid {}, grpc {}, iroh {}, metrics {metrics}",
        file.pid,
        file.grpc.as_deref().unwrap_or("off"),
        if iroh.is_empty() { "off" } else { &iroh },
    )
}

/// The commands to poke the cluster with, printed once.
fn poke_lines(exe: &Path, dirs: &[PathBuf], op_key: &Path) -> String {
    let tern = exe.display();
    let d1 = dirs
        .first()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let d2 = dirs
        .get(1)
        .map_or_else(|| d1.clone(), |d| d.display().to_string());
    format!(
        "\npoke this cluster from another terminal while the demo runs (node 1's data dir \
         holds its admin key):\n  \
         {tern} status --data-dir {d1}\n  \
         {tern} vm create hello --runtime process --memory-mib 64 --data-dir {d1} -- sleep 600\n  \
         {tern} rollout status --data-dir {d1}\n  \
         {tern} rollout history --data-dir {d1}\n  \
         {tern} transport show --data-dir {d2}\n  \
         {tern} rollout pause --key {op} --data-dir {d2}    (an operator's key)\n",
        op = op_key.display()
    )
}

/// Connections, the VM, the calls, the rollout and its rollback, the
/// view until the end, and the count of failed calls.
async fn live(
    exe: &Path,
    dirs: &[PathBuf],
    files: Vec<NodeFile>,
    plan: &tern_state::Plan,
    duration: Option<Duration>,
) -> Result<(), DemoError> {
    let servers = &dirs[..NODES.min(dirs.len())];
    let mut conns = Vec::new();
    for d in servers {
        conns.push(conn_to(d, "grpc", None).await?);
    }
    let status: pb::NodeStatus = conns[0]
        .call(methods::STATUS_GET, &pb::StatusRequest {})
        .await?;
    println!(
        "cluster formed: {} members, leader node {}",
        status.members.len(),
        status.leader_id
    );
    agents_ready(&conns[0], dirs.len() - servers.len()).await?;
    let vm_id = create_vm(&conns[0]).await?;
    let base = dirs
        .first()
        .and_then(|d| d.parent())
        .unwrap_or(Path::new("."));
    let op_key = base.join(OPERATOR_KEY);
    operator(&conns[0], &op_key).await?;
    // Agents are read with the operator's key, a grant every agent mirrors.
    for d in &dirs[servers.len()..] {
        conns.push(conn_to(d, "grpc", Some(op_key.clone())).await?);
    }
    print!("{}", poke_lines(exe, dirs, &op_key));
    let load = Load::start(
        load_conns(dirs, &op_key).await?,
        servers.len(),
        vm_id.clone(),
    );
    let mut live = Live {
        conns,
        files,
        vm_id,
        counts: load.counts.clone(),
        view: View::new(dirs.len()),
        stop: Stop::new()?,
    };
    let deadline = Instant::now() + NODE_START_WAIT;
    while live.counts.total() < BASELINE_CALLS && Instant::now() < deadline {
        if live.stop.wait(Duration::from_millis(100)).await {
            break;
        }
    }
    let shown = show(&mut live, plan, duration).await;
    load.finish().await;
    let counts = live.counts.clone();
    delete_vms(&live.conns[0], &live.vm_id).await;
    for c in live.conns {
        c.close().await;
    }
    shown?;
    report(&counts)
}

/// Waits until the leader (through `conn`) lists `want` agents, all
/// ready.
async fn agents_ready(conn: &Conn, want: usize) -> Result<(), DemoError> {
    if want == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + NODE_START_WAIT;
    loop {
        let ready = conn
            .call::<_, pb::NodeStatus>(methods::STATUS_GET, &pb::StatusRequest {})
            .await
            .map_or(0, |s| {
                s.agents.iter().filter(|a| a.status == "ready").count()
            });
        if ready >= want {
            println!("agents: {want} registered, all ready");
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(DemoError::AgentsNotReady { want, ready });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The rollout, its rollback, then frames for `duration` (or until a
/// signal).
async fn show(
    live: &mut Live,
    plan: &tern_state::Plan,
    duration: Option<Duration>,
) -> Result<(), DemoError> {
    if !rollout::run(live, plan).await? {
        return Ok(()); // interrupted
    }
    let started = Instant::now();
    loop {
        if let Some(d) = duration
            && started.elapsed() >= d
        {
            return Ok(());
        }
        if live.stop.wait(REFRESH).await {
            return Ok(());
        }
        live.frame("after the rollback").await;
    }
}

/// The demo's calls, counted: 0 failed or an error saying how many.
fn report(counts: &Counts) -> Result<(), DemoError> {
    let (failed, total) = (counts.failed_total(), counts.total());
    println!(
        "\ndemo calls: {total} made (grpc {} ok, iroh {} ok), failed calls: {failed}",
        counts.ok(0),
        counts.ok(1)
    );
    if failed > 0 {
        return Err(DemoError::FailedCalls {
            failed,
            total,
            last: counts.last_error().unwrap_or_default(),
        });
    }
    Ok(())
}

/// The steady calls' connections: to each node over gRPC and over iroh,
/// with the demo's operator key. Not with a node's key: an iroh endpoint
/// of the demo holding a node's key would take that node's place in its
/// peers' view (iroh reaches a key where it last heard from it), and the
/// peers' calls to the node would land in the demo.
async fn load_conns(dirs: &[PathBuf], key: &Path) -> Result<[Vec<Conn>; 2], DemoError> {
    let (mut grpc, mut iroh) = (Vec::new(), Vec::new());
    for d in dirs {
        grpc.push(conn_to(d, "grpc", Some(key.to_owned())).await?);
        iroh.push(conn_to(d, "iroh", Some(key.to_owned())).await?);
    }
    Ok([grpc, iroh])
}

/// Writes a new key to `path` and grants it the operator role (node 1's
/// key is the cluster's admin), as `tern key new` and
/// `tern access grant KEY operator` do.
async fn operator(admin: &Conn, path: &Path) -> Result<(), DemoError> {
    let id = crate::client::new_key_file(path)?;
    let _: pb::AccessListResponse = admin
        .call(
            methods::CLUSTER_ACCESS_GRANT,
            &pb::AccessChangeRequest {
                request_id: request_id(),
                key: bytes::Bytes::copy_from_slice(id.as_bytes()),
                role: "operator".to_owned(),
            },
        )
        .await?;
    Ok(())
}

async fn create_vm(conn: &Conn) -> Result<String, DemoError> {
    let spec = pb::VmSpec {
        name: "demo-sleeper".into(),
        vcpus: 1,
        memory_mib: 64,
        runtime: "process".into(),
        command: vec!["sleep".into(), "3600".into()],
        ..Default::default()
    };
    let vm: pb::VmRecord = conn
        .call(
            methods::VM_CREATE,
            &pb::CreateVmRequest {
                request_id: request_id(),
                spec: Some(spec),
            },
        )
        .await?;
    println!(
        "created VM {} (demo-sleeper) on node {}: `sleep 3600` on the process runtime",
        vm.id, vm.node_id
    );
    Ok(vm.id)
}

/// Deletes the demo's VM and any other a poke created (listed through
/// `Vm/List`), so none is left to kill at exit.
async fn delete_vms(conn: &Conn, vm_id: &str) {
    let mut ids = vec![vm_id.to_owned()];
    if let Ok(list) = conn
        .call::<_, pb::ListVmsResponse>(methods::VM_LIST, &pb::ListVmsRequest { node_id: 0 })
        .await
    {
        ids.extend(list.vms.into_iter().map(|v| v.id).filter(|id| id != vm_id));
    }
    for id in ids {
        delete_vm(conn, &id).await;
    }
}

async fn delete_vm(conn: &Conn, vm_id: &str) {
    println!("\ndeleting VM {vm_id}");
    let delete = conn
        .call::<_, pb::VmRecord>(
            methods::VM_DELETE,
            &pb::VmActionRequest {
                request_id: request_id(),
                vm_id: vm_id.to_owned(),
            },
        )
        .await;
    if let Err(e) = delete {
        eprintln!("demo: delete failed ({e}); its workload is killed at exit");
        return;
    }
    let deadline = Instant::now() + VM_WAIT;
    while Instant::now() < deadline {
        let got = conn
            .call::<_, pb::VmRecord>(
                methods::VM_GET,
                &pb::GetVmRequest {
                    vm_id: vm_id.to_owned(),
                },
            )
            .await;
        if got.is_err() {
            println!("VM {vm_id} removed");
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::view::{short_policy, traffic, whole};

    #[test]
    fn traffic_is_read_per_transport_from_the_exposition() {
        let text = r#"# TYPE tern_transport_calls_total counter
tern_transport_calls_total{transport="grpc",service="raft",method="Vote",side="client",outcome="ok"} 5
tern_transport_calls_total{transport="grpc",service="vm",method="Get",side="client",outcome="ok"} 2
tern_transport_calls_total{transport="grpc",service="vm",method="Get",side="server",outcome="ok"} 9
tern_transport_calls_total{transport="iroh",service="status",method="Get",side="client",outcome="ok"} 3
tern_transport_calls_total{transport="iroh",service="status",method="Get",side="server",outcome="transport_error"} 1
tern_router_fallbacks_total{service="vm",method="Get",reason="timed_out"} 1
"#;
        let t = traffic(&tern_process_kit::Metrics::parse(text));
        assert_eq!(t.calls, [16.0, 4.0]);
        assert_eq!(t.errors, [0.0, 1.0]);
        assert_eq!(t.fallbacks, 1.0);
        assert_eq!(whole(-0.0), 0);
        assert_eq!(whole(2.6), 3);
    }

    #[test]
    fn policies_are_shown_in_a_few_words() {
        let dual = pb::TransportPolicy {
            mode: "dual".into(),
            prefer_iroh: vec!["health".into(), "status".into()],
            raft_transport: "grpc".into(),
            fallback_to_grpc: true,
        };
        assert_eq!(
            short_policy(&dual),
            "dual iroh for health,status, raft grpc"
        );
        let grpc = pb::TransportPolicy {
            mode: "grpc".into(),
            ..dual
        };
        assert_eq!(short_policy(&grpc), "grpc");
    }

    #[test]
    fn the_demo_runs_the_shipped_plan_with_its_soaks_compressed() {
        let plan = rollout::demo_plan(None, 5).unwrap();
        let shipped = crate::rollout_cli::parse_plan(rollout::DEFAULT_PLAN, "default").unwrap();
        assert_eq!(plan.stages.len(), shipped.stages.len());
        assert_eq!(plan.gates, shipped.gates);
        for (s, d) in plan.stages.iter().zip(&shipped.stages) {
            assert_eq!(
                (s.soak_secs, &s.policy, s.percent),
                (5, &d.policy, d.percent)
            );
        }
        assert_eq!(
            rollout::demo_plan(None, 0).unwrap_err().to_string(),
            "--soak 0: 1 to 600 seconds"
        );
        assert!(rollout::demo_plan(None, 601).is_err());
        let missing = rollout::demo_plan(Some(Path::new("/nonexistent/plan.toml")), 5)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/plan.toml"), "{missing}");
    }

    #[test]
    fn the_poke_commands_name_this_runs_data_dirs_without_debug_formatting() {
        let dirs = [
            PathBuf::from("/tmp/tern-demo-1/node1"),
            PathBuf::from("/tmp/tern-demo-1/node2"),
        ];
        let text = poke_lines(
            Path::new("/usr/bin/tern"),
            &dirs,
            Path::new("/tmp/tern-demo-1/operator.key"),
        );
        assert!(
            text.contains("/usr/bin/tern status --data-dir /tmp/tern-demo-1/node1\n"),
            "{text}"
        );
        assert!(
            text.contains("/usr/bin/tern rollout status --data-dir /tmp/tern-demo-1/node1\n"),
            "{text}"
        );
        assert!(text.contains("/usr/bin/tern vm create hello "), "{text}");
        assert!(!text.contains("Some(") && !text.contains('"'), "{text}");
        let file = NodeFile {
            id: "ab".repeat(32),
            grpc: Some("https://127.0.0.1:7400".into()),
            iroh: None,
            metrics: Some("127.0.0.1:9100".parse().unwrap()),
            pid: 7,
        };
        assert_eq!(
            node_line(&file),
            "pid 7, grpc https://127.0.0.1:7400, iroh off, metrics http://127.0.0.1:9100/metrics"
        );
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
        let text = node_config(Path::new("/tmp/d/node2"), Some(&seed), Kind::Server)
            .to_toml()
            .unwrap();
        let checked = Config::parse(&text).unwrap();
        assert_eq!(checked.seeds.len(), 1);
        assert_eq!(
            checked.config.cluster.join[0].iroh,
            seed.iroh.clone().unwrap()
        );
        assert_eq!(checked.config.vm.runtimes, Some(vec![RuntimeName::Process]));
        // No pin: the node follows the cluster's desired policy (the
        // rollout's), and listens on iroh so a stage can use it.
        assert!(checked.config.transport.is_none(), "{text}");
        assert_eq!(checked.config.listen.iroh.addr().unwrap().port(), 0);
        assert_eq!(checked.config.listen.grpc.addr().unwrap().port(), 0);
        assert_eq!(checked.config.node.role, Role::Server);
        // An agent registers through the seed; a server beside agents
        // has no room for a VM (64 MiB), so VMs go to the agents.
        for (kind, role, memory) in [
            (Kind::Agent, Role::Agent, 4096),
            (Kind::ServerOnly, Role::Server, 16),
        ] {
            let text = node_config(Path::new("/tmp/d/agent1"), Some(&seed), kind)
                .to_toml()
                .unwrap();
            let checked = Config::parse(&text).unwrap();
            assert_eq!(checked.config.node.role, role, "{text}");
            assert_eq!(checked.config.capacity.memory_mib, memory, "{text}");
            assert_eq!(checked.seeds.len(), 1);
        }
    }
}
