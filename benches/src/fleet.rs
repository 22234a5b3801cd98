//! `tern-bench fleet`: servers and agents at fleet scale.
//!
//! Three real `tern` server processes on loopback (`tern_testkit::local`,
//! default agent settings: heartbeats every 2 s) and N simulated agents in
//! this process, each with its own key, its own connections and the real
//! agent protocol (`tern_node::agent::AgentLink`: register, heartbeat,
//! assignment stream). `--transport grpc` (servers in gRPC mode, each
//! agent a gRPC client) or `iroh` (servers in dual mode with Raft over
//! iroh, each agent its own iroh endpoint on loopback). The agents run no workloads. For each N
//! (ascending, agents added to the same cluster) it measures:
//!
//! - **server cost**: CPU seconds of the three servers over a steady
//!   window, per agent and second, and their resident memory, per agent
//!   over the N = 0 baseline;
//! - **commit latency**: sequential metadata puts at the leader during the
//!   window (p50, p99), the figure that must not grow with N;
//! - **desired state to agent**: a VM created pinned to a random agent,
//!   from the create's answer until that agent's mirror holds it (p50,
//!   p99);
//! - **leader change**: the leader is killed (SIGKILL); the time until
//!   every agent's status names the new leader (its heartbeats found it),
//!   then the killed server is restarted.
//!
//! Results are printed as a table per transport and written as the
//! `fleet` part of `cargo xtask bench`'s report ([`part`], `--out`): a
//! row per figure and agent count, a column per transport. Nothing asserts
//! on a figure.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tern_node::agent::AgentLink;
use tern_protocol::catalog::methods;
use tern_protocol::{PeerAddr, RpcClient, pb};
use tern_services::consensus::Consensus;
use tern_state::Capacity;
use tern_testkit::local::{JOIN_TOKEN, LocalCluster};

use crate::procfs;
use tern_bench_part::{Better, Part, Row, Values, build_profile};

/// The part file's source name.
pub const SOURCE: &str = "fleet";

/// The report section of every row.
const SECTION: &str = "Servers and agents (fleet)";

/// How many agents register at once.
const REGISTER_CONCURRENCY: usize = 32;
/// Puts per commit-latency sample: enough that the p99 is not one
/// outlier.
const PUTS: usize = 1_000;
/// VMs created per desired-state sample.
const CHANGES: usize = 40;
/// Bound on one wait (an agent seeing a change, all agents registered).
const WAIT_BOUND: Duration = Duration::from_secs(120);
/// Inbound gRPC connections the bench's servers accept, in all and from
/// one address (all simulated agents share 127.0.0.1).
const MAX_BENCH_CONNECTIONS: usize = 16_384;
/// The address simulated agents register (nothing listens there).
const SIMULATED_URL: &str = "https://127.0.0.1:9";
/// Per-call timeout of the bench's own calls.
const CALL: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub struct FleetOpts {
    /// The `tern` binary the servers run.
    pub tern: PathBuf,
    /// Agent counts, ascending.
    pub counts: Vec<usize>,
    /// Length of the steady window per count.
    pub steady: Duration,
    /// Working directory (configs, data, logs).
    pub dir: PathBuf,
    /// What the agents speak: `"grpc"` or `"iroh"`.
    pub transport: String,
    /// Niceness of the simulated agents' threads (0: as the servers).
    /// They stand for other machines; on one machine a positive value
    /// keeps them from taking the servers' and the commit probe's CPU.
    pub agents_nice: i32,
}

/// The figures of one agent count.
#[derive(Debug, Clone, Serialize)]
pub struct FleetRow {
    /// What the agents spoke.
    pub transport: String,
    /// Agents registered.
    pub agents: usize,
    /// Seconds to register the agents added for this count.
    pub register_secs: f64,
    /// Servers' CPU (all three) over the N = 0 baseline, per agent, in
    /// milliseconds of CPU per second.
    pub cpu_ms_per_agent_s: Option<f64>,
    /// Servers' CPU (all three), in percent of one core.
    pub cpu_percent: f64,
    /// The leader's CPU alone, in percent of one core: what a fleet must
    /// not grow (followers take the agents' heartbeats and streams).
    pub leader_cpu_percent: f64,
    /// Servers' resident memory (all three), MiB.
    pub rss_mib: f64,
    /// Resident memory over the N = 0 baseline, per agent, KiB.
    pub rss_kib_per_agent: Option<f64>,
    /// Commit latency at the leader, ms.
    pub commit_p50_ms: f64,
    /// Commit latency at the leader, ms.
    pub commit_p99_ms: f64,
    /// Desired-state change to the agent's mirror, ms.
    pub change_p50_ms: Option<f64>,
    /// Desired-state change to the agent's mirror, ms.
    pub change_p99_ms: Option<f64>,
    /// Kill of the leader until every agent names the new one, s.
    pub leader_change_all_secs: Option<f64>,
    /// The load average when the window ended.
    pub load: String,
    /// Niceness the simulated agents ran at.
    pub agents_nice: i32,
}

struct SimAgent {
    link: Arc<AgentLink>,
    stop: tokio::sync::watch::Sender<bool>,
    /// The agent's own endpoint, when it speaks iroh.
    iroh: Option<tern_transport_iroh::IrohTransport>,
}

/// A simulated agent's client and the address it registers.
async fn agent_client(
    transport: &str,
) -> anyhow::Result<(
    Arc<dyn RpcClient>,
    PeerAddr,
    Option<tern_transport_iroh::IrohTransport>,
)> {
    let key: [u8; 32] = rand::random();
    if transport == "iroh" {
        let config = tern_transport_iroh::IrohConfig::new(key)
            .with_bind_addr(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        let t = tern_transport_iroh::IrohTransport::bind(
            config,
            Arc::new(tern_protocol::rpc::Dispatcher::new()),
        )
        .await
        .map_err(|e| anyhow::anyhow!("an agent's iroh endpoint: {e}"))?;
        let me = t.peer_addr();
        return Ok((t.client() as Arc<dyn RpcClient>, me, Some(t)));
    }
    let client = tern_transport_grpc::GrpcClient::new(tern_transport_grpc::ClientConfig::new(key));
    // A simulated agent serves nothing; its recorded address is never
    // dialled by this bench (no rollout runs).
    let mut me = PeerAddr::new(client.id());
    me.grpc = Some(SIMULATED_URL.to_owned());
    Ok((Arc::new(client), me, None))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    crate::cluster::percentile(sorted, q).unwrap_or(f64::NAN)
}

/// Node `i`'s process id, if it runs (a one-element list for [`cpu`]).
fn pid_of(cluster: &LocalCluster, i: usize) -> Vec<u32> {
    cluster.nodes[i]
        .child
        .as_ref()
        .map(tern_testkit::TernProcess::pid)
        .into_iter()
        .collect()
}

/// Every running server's process id.
fn servers(cluster: &LocalCluster) -> Vec<u32> {
    (0..cluster.nodes.len())
        .flat_map(|i| pid_of(cluster, i))
        .collect()
}

fn rss_mib(pids: &[u32]) -> f64 {
    let kib: u64 = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| procfs::parse_status_kib(&s, "VmRSS:"))
        .sum();
    #[allow(clippy::cast_precision_loss)] // reason: memory in KiB, far below 2^52.
    let mib = kib as f64 / 1024.0;
    mib
}

fn cpu(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| procfs::cpu_seconds(*p).ok())
        .sum()
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Sequential puts at the leader, timed. They run on a thread and a
/// runtime of their own, with their own client: on the bench's runtime
/// they would wait behind the simulated agents' tasks, and the figure
/// would grow with N for the bench's sake, not the servers'.
async fn commit_latencies(leader: &PeerAddr, tag: &str) -> anyhow::Result<Vec<f64>> {
    let (leader, tag) = (leader.clone(), tag.to_owned());
    // A thread of its own, not the runtime's blocking pool: it keeps the
    // default niceness whatever the agents run at.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(probe(&leader, &tag));
    });
    rx.await.context("the commit probe's thread")?
}

/// The commit probe's puts, on the calling thread; sorted latencies, ms.
fn probe(leader: &PeerAddr, tag: &str) -> anyhow::Result<Vec<f64>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the commit probe's runtime")?;
    rt.block_on(async {
        let client = tern_transport_grpc::GrpcClient::new(tern_transport_grpc::ClientConfig::new(
            tern_testkit::keys::client_key(),
        ));
        let mut ms = Vec::with_capacity(PUTS);
        for i in 0..PUTS {
            let t = Instant::now();
            tern_cluster::meta_put(
                &client,
                leader,
                &format!("fleet-put-{tag}-{i}"),
                "fleet/probe",
                "v",
                CALL,
            )
            .await
            .map_err(|e| anyhow::anyhow!("a probe put failed: {e}"))?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms)
    })
}

/// Adds simulated agents until there are `to`, each created, registered
/// and run on `on` (the agents' runtime: their connections and timers
/// live there).
async fn add_agents(
    agents: &mut Vec<SimAgent>,
    to: usize,
    seeds: &[PeerAddr],
    transport: &str,
    on: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    while agents.len() < to {
        let batch = (to - agents.len()).min(REGISTER_CONCURRENCY);
        let mut joins = Vec::new();
        for _ in 0..batch {
            let (seeds, transport) = (seeds.to_vec(), transport.to_owned());
            joins.push(on.spawn(async move {
                let (client, me, iroh) = agent_client(base_transport(&transport)).await?;
                let link = AgentLink::new(
                    client,
                    me,
                    Capacity {
                        vcpus: 64,
                        memory_mib: 65_536,
                    },
                    JOIN_TOKEN.to_owned(),
                    seeds,
                );
                if transport.ends_with(DIRECT) {
                    link.heartbeat_to_the_leader_only();
                }
                link.register().await?;
                anyhow::Ok((link, iroh))
            }));
        }
        for j in joins {
            let (link, iroh) = j.await.context("a registration task")??;
            let (stop, rx) = tokio::sync::watch::channel(false);
            let run = link.clone().run(async move {
                let mut rx = rx;
                let _ = rx.wait_for(|s| *s).await;
            });
            on.spawn(run);
            agents.push(SimAgent { link, stop, iroh });
        }
    }
    Ok(())
}

/// The simulated agents' own runtime, its threads at `nice`; shut down
/// in the background when dropped (also on an error path inside the
/// bench's runtime, where a blocking shutdown would panic).
struct AgentsRuntime(Option<tokio::runtime::Runtime>);

impl AgentsRuntime {
    fn new(nice: i32) -> anyhow::Result<AgentsRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sim-agent")
            .enable_all()
            .on_thread_start(move || {
                if nice != 0 {
                    // Linux: the calling thread's own niceness. Children
                    // are never started from these threads.
                    let _ = rustix::process::setpriority_process(None, nice);
                }
            })
            .build()
            .context("the simulated agents' runtime")?;
        Ok(AgentsRuntime(Some(rt)))
    }

    fn handle(&self) -> anyhow::Result<tokio::runtime::Handle> {
        self.0
            .as_ref()
            .map(|rt| rt.handle().clone())
            .context("the simulated agents' runtime is gone")
    }
}

impl Drop for AgentsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

async fn leader_of(cluster: &LocalCluster) -> anyhow::Result<(usize, PeerAddr)> {
    let (i, _) = cluster.leader().await?;
    Ok((i, cluster.nodes[i].addr()?))
}

/// Waits until the leader's state lists `n` ready agents.
async fn all_ready(cluster: &LocalCluster, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT_BOUND;
    loop {
        let (_, leader) = leader_of(cluster).await?;
        let s: Result<pb::NodeStatus, _> = tern_protocol::rpc::call_typed(
            cluster.client.as_ref(),
            &leader,
            methods::STATUS_GET,
            &pb::StatusRequest {},
            CALL,
        )
        .await;
        if let Ok(s) = s
            && s.agents.iter().filter(|a| a.status == "ready").count() >= n
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{n} agents not all ready within {WAIT_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Creates VMs pinned to random agents; the time until each is in its
/// agent's mirror.
async fn change_latencies(
    cluster: &LocalCluster,
    agents: &[SimAgent],
    tag: &str,
) -> anyhow::Result<Vec<f64>> {
    let (_, leader) = leader_of(cluster).await?;
    let mut ms = Vec::new();
    for i in 0..CHANGES {
        let pick = usize::try_from(rand::random::<u64>()).unwrap_or(0);
        let agent = &agents[pick % agents.len()];
        let mut changes = agent.link.changes();
        let created: pb::VmRecord = tern_protocol::rpc::call_typed(
            cluster.client.as_ref(),
            &leader,
            methods::VM_CREATE,
            &pb::CreateVmRequest {
                request_id: format!("fleet-vm-{tag}-{i}"),
                spec: Some(pb::VmSpec {
                    name: format!("f{tag}-{i}"),
                    vcpus: 1,
                    memory_mib: 16,
                    runtime: "process".into(),
                    command: vec!["/bin/true".into()],
                    pin_node: agent.link.node_id(),
                    ..pb::VmSpec::default()
                }),
            },
            CALL,
        )
        .await
        .context("creating a probe VM")?;
        let t = Instant::now();
        let holds = |link: &AgentLink| {
            let mut found = false;
            let _ = link.read(&mut |s| found = s.vms().contains_key(&created.id));
            found
        };
        while !holds(&agent.link) {
            tokio::time::timeout(WAIT_BOUND, changes.changed())
                .await
                .context("an agent never saw its VM")?
                .context("the agent stopped")?;
        }
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// Kills the leader; the time until every agent names another leader.
async fn leader_change(cluster: &mut LocalCluster, agents: &[SimAgent]) -> anyhow::Result<f64> {
    let (old, _) = cluster.leader().await?;
    let old_id = cluster.members(old).await?.leader_id;
    let t = Instant::now();
    cluster.kill(old).await?;
    loop {
        let behind = agents
            .iter()
            .filter(|a| {
                let s = a.link.status().borrow().clone();
                s.leader_id.is_none_or(|l| l == old_id || l == 0)
            })
            .count();
        if behind == 0 {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < WAIT_BOUND,
            "{behind} agents still name the old leader after {WAIT_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    cluster.start_node(old).await?;
    cluster.wait_formed().await?;
    Ok(secs)
}

/// Desired state to agent (p50, p99) and the leader change, with agents.
async fn agent_figures(
    cluster: &mut LocalCluster,
    agents: &[SimAgent],
    round: usize,
) -> anyhow::Result<(Option<f64>, Option<f64>, Option<f64>)> {
    if agents.is_empty() {
        return Ok((None, None, None));
    }
    let c = change_latencies(cluster, agents, &format!("{round}")).await?;
    let lc = leader_change(cluster, agents).await?;
    Ok((
        Some(percentile(&c, 50.0)),
        Some(percentile(&c, 99.0)),
        Some(lc),
    ))
}

/// The servers' config in the bench: no VMs on servers, and connection
/// bounds raised (see the comment inside).
fn server_tune(c: &mut tern_node::config::Config) {
    // Servers host no VMs: every VM goes to an agent.
    c.capacity.vcpus = 1;
    c.capacity.memory_mib = 16;
    // Every simulated agent dials from 127.0.0.1, and each holds
    // a connection to the leader and one to its assignment's
    // server: the per-address bound (256, against one host's
    // abuse) and the total (4,096) are raised here; a real fleet
    // has one address per agent, but the total is a real bound
    // (see the projection in docs/ARCHITECTURE.md).
    c.limits.connections = Some(MAX_BENCH_CONNECTIONS);
    c.limits.connections_per_ip = Some(MAX_BENCH_CONNECTIONS);
    // Over iroh each simulated agent is its own endpoint: the iroh
    // server's total (1,024 by default) is raised alike.
    c.limits.iroh_connections = Some(MAX_BENCH_CONNECTIONS);
}

/// The suffix of a transport whose agents send every heartbeat to the
/// leader (`grpc-direct`, `iroh-direct`): the protocol before followers
/// relayed them, measured beside it in the same run.
const DIRECT: &str = "-direct";

/// `grpc` of `grpc-direct`.
fn base_transport(transport: &str) -> &str {
    transport.strip_suffix(DIRECT).unwrap_or(transport)
}

/// The servers' transport for agents speaking `transport`.
fn servers_transport(transport: &str) -> anyhow::Result<tern_transport_dual::TransportConfig> {
    match base_transport(transport) {
        "grpc" => Ok(tern_testkit::config::grpc()),
        // Dual: the bench's own calls stay on gRPC; agents and Raft speak
        // iroh.
        "iroh" => Ok(tern_testkit::config::dual(
            &["all_except_raft"],
            tern_protocol::policy::RaftTransport::Iroh,
        )),
        other => anyhow::bail!(
            "--transport {other:?}: expected grpc or iroh (or grpc-direct, iroh-direct: heartbeats to the leader only)"
        ),
    }
}

/// The servers as the agents reach them.
fn seeds(cluster: &LocalCluster, transport: &str) -> Vec<PeerAddr> {
    let transport = base_transport(transport);
    cluster
        .nodes
        .iter()
        .filter_map(|n| {
            let mut a = n.file.as_ref()?.peer_addr().ok()?;
            if transport == "iroh" {
                a.grpc = None;
            } else {
                a.iroh = None;
            }
            Some(a)
        })
        .collect()
}

/// Runs the fleet bench; see the module docs.
pub async fn run(opts: &FleetOpts) -> anyhow::Result<Vec<FleetRow>> {
    let mut cluster = LocalCluster::start_tuned(
        &opts.tern,
        &opts.dir,
        3,
        &servers_transport(&opts.transport)?,
        server_tune,
    )
    .await?;
    cluster.wait_formed().await?;
    let seeds = seeds(&cluster, &opts.transport);
    let agents_rt = AgentsRuntime::new(opts.agents_nice)?;
    let on = agents_rt.handle()?;
    let mut agents: Vec<SimAgent> = Vec::new();
    let mut rows = Vec::new();
    let mut base_rss = None;
    let mut base_cpu = None;
    for (round, &n) in opts.counts.iter().enumerate() {
        let t = Instant::now();
        add_agents(&mut agents, n, &seeds, &opts.transport, &on).await?;
        if n > 0 {
            all_ready(&cluster, n).await?;
        }
        let register_secs = t.elapsed().as_secs_f64();
        eprintln!("fleet: {n} agents registered in {register_secs:.1} s; measuring");
        let pids = servers(&cluster);
        let cpu0 = cpu(&pids);
        let w0 = Instant::now();
        let (leader_index, leader) = leader_of(&cluster).await?;
        let leader_pid = pid_of(&cluster, leader_index);
        let leader_cpu0 = cpu(&leader_pid);
        let commits = commit_latencies(&leader, &format!("{round}")).await?;
        let left = opts.steady.saturating_sub(w0.elapsed());
        tokio::time::sleep(left).await;
        let secs = w0.elapsed().as_secs_f64();
        let cpu_s = cpu(&pids) - cpu0;
        let leader_cpu_s = cpu(&leader_pid) - leader_cpu0;
        let rss = rss_mib(&pids);
        let base = *base_rss.get_or_insert(rss);
        let cpu_ms_s = cpu_s * 1000.0 / secs;
        let cpu_base = *base_cpu.get_or_insert(cpu_ms_s);
        #[allow(clippy::cast_precision_loss)] // reason: agent counts, far below 2^52.
        let per = |x: f64| (n > 0).then(|| x / n as f64);
        let (change_p50_ms, change_p99_ms, leader_change_all_secs) =
            agent_figures(&mut cluster, &agents, round).await?;
        let row = FleetRow {
            transport: opts.transport.clone(),
            agents: n,
            register_secs,
            cpu_ms_per_agent_s: per((cpu_ms_s - cpu_base).max(0.0)),
            cpu_percent: cpu_s * 100.0 / secs,
            leader_cpu_percent: leader_cpu_s * 100.0 / secs,
            rss_mib: rss,
            rss_kib_per_agent: per((rss - base) * 1024.0),
            commit_p50_ms: percentile(&commits, 50.0),
            commit_p99_ms: percentile(&commits, 99.0),
            change_p50_ms,
            change_p99_ms,
            leader_change_all_secs,
            load: load(),
            agents_nice: opts.agents_nice,
        };
        eprintln!("fleet: {}", serde_json::to_string(&row).unwrap_or_default());
        rows.push(row);
    }
    stop_agents(agents, &on).await;
    cluster.shutdown().await;
    drop(agents_rt);
    Ok(rows)
}

/// Stops the simulated agents and closes their endpoints (on their own
/// runtime).
async fn stop_agents(agents: Vec<SimAgent>, on: &tokio::runtime::Handle) {
    let mut closing = Vec::new();
    for a in agents {
        let _ = a.stop.send(true);
        if let Some(t) = a.iroh {
            closing.push(on.spawn(t.shutdown(Duration::ZERO)));
        }
    }
    for c in closing {
        let _ = c.await;
    }
}

/// The rows as a Markdown table.
pub fn table(rows: &[FleetRow]) -> String {
    let f = |v: Option<f64>, d: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.d$}"));
    let mut out = String::from(
        "| transport | agents | servers' CPU (% of a core) | leader's CPU (%) | CPU per agent (ms/s) | servers' RSS (MiB) | RSS per agent (KiB) | commit p50 / p99 (ms) | change to agent p50 / p99 (ms) | all agents follow a new leader (s) | load |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {} | {:.0} | {} | {:.2} / {:.2} | {} / {} | {} | {} |\n",
            r.transport,
            r.agents,
            r.cpu_percent,
            r.leader_cpu_percent,
            f(r.cpu_ms_per_agent_s, 3),
            r.rss_mib,
            f(r.rss_kib_per_agent, 1),
            r.commit_p50_ms,
            r.commit_p99_ms,
            f(r.change_p50_ms, 1),
            f(r.change_p99_ms, 1),
            f(r.leader_change_all_secs, 2),
            r.load
        ));
    }
    out
}

/// One figure of a row, in the part's unit, or `None`.
type Figure = fn(&FleetRow) -> Option<f64>;

/// One figure the part reports per agent count: id, name, unit, which
/// way is better, its percentile, and its value.
type FigureSpec = (
    &'static str,
    &'static str,
    &'static str,
    Better,
    Option<f64>,
    Figure,
);

/// The figures the part reports per agent count.
const FIGURES: &[FigureSpec] = &[
    (
        "commit_p50",
        "Commit latency p50",
        "ns",
        Better::Lower,
        Some(50.0),
        |r| Some(r.commit_p50_ms * 1e6),
    ),
    (
        "commit_p99",
        "Commit latency p99",
        "ns",
        Better::Lower,
        Some(99.0),
        |r| Some(r.commit_p99_ms * 1e6),
    ),
    (
        "change_p50",
        "Desired state to agent p50",
        "ns",
        Better::Lower,
        Some(50.0),
        |r| r.change_p50_ms.map(|v| v * 1e6),
    ),
    (
        "change_p99",
        "Desired state to agent p99",
        "ns",
        Better::Lower,
        Some(99.0),
        |r| r.change_p99_ms.map(|v| v * 1e6),
    ),
    (
        "leader_change",
        "All agents follow a new leader",
        "s",
        Better::Lower,
        None,
        |r| r.leader_change_all_secs,
    ),
    (
        "servers_cpu",
        "Servers' CPU, % of one core",
        "%",
        Better::Lower,
        None,
        |r| Some(r.cpu_percent),
    ),
    (
        "leader_cpu",
        "The leader's CPU, % of one core",
        "%",
        Better::Lower,
        None,
        |r| Some(r.leader_cpu_percent),
    ),
    (
        "servers_rss",
        "Servers' resident memory",
        "bytes",
        Better::Lower,
        None,
        |r| Some(r.rss_mib * 1024.0 * 1024.0),
    ),
];

/// The `fleet` part: for every agent count measured and every figure, a
/// row with a column per transport (`grpc`, `iroh`).
pub fn part(quick: bool, steady: Duration, runs: &[(String, Vec<FleetRow>)]) -> Part {
    let mut counts: Vec<usize> = runs
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|r| r.agents))
        .collect();
    counts.sort_unstable();
    counts.dedup();
    let mut rows = Vec::new();
    for n in counts {
        let loads: Vec<String> = runs
            .iter()
            .filter_map(|(t, rows)| {
                let r = rows.iter().find(|r| r.agents == n)?;
                Some(if r.agents_nice == 0 {
                    format!("{t} load {}", r.load)
                } else {
                    format!(
                        "{t} load {}, simulated agents at nice {}",
                        r.load, r.agents_nice
                    )
                })
            })
            .collect();
        for (id, name, unit, better, percentile, value) in FIGURES {
            let values = Values::from_columns(runs.iter().map(|(t, rows)| {
                (
                    t.as_str(),
                    rows.iter().find(|r| r.agents == n).and_then(value),
                )
            }));
            rows.push(Row {
                id: format!("fleet_{id}_{n}_agents"),
                section: SECTION.to_owned(),
                name: format!("{name}, {n} agents"),
                unit: (*unit).to_owned(),
                better: *better,
                values,
                percentile: *percentile,
                note: format!(
                    "3 tern servers on loopback, {n} simulated agents in one process (real agent protocol, heartbeats every 2 s), {PUTS} sequential puts at the leader per commit sample, {}s steady window; {}",
                    steady.as_secs(),
                    loads.join(", ")
                ),
                source: String::new(),
            });
        }
    }
    Part {
        source: SOURCE.to_owned(),
        profile: build_profile().to_owned(),
        quick,
        rows,
        distributions: Vec::new(),
        curves: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(transport: &str, agents: usize, commit_p99_ms: f64) -> FleetRow {
        FleetRow {
            transport: transport.to_owned(),
            agents,
            register_secs: 0.0,
            cpu_ms_per_agent_s: None,
            cpu_percent: 10.0,
            leader_cpu_percent: 4.0,
            rss_mib: 200.0,
            rss_kib_per_agent: None,
            commit_p50_ms: 1.0,
            commit_p99_ms,
            change_p50_ms: None,
            change_p99_ms: Some(22.0),
            leader_change_all_secs: Some(2.5),
            load: "1.00 1.00 1.00".to_owned(),
            agents_nice: 0,
        }
    }

    #[test]
    fn a_transport_other_than_grpc_or_iroh_is_refused_by_name() {
        assert!(servers_transport("grpc").is_ok());
        assert!(servers_transport("iroh").is_ok());
        assert!(servers_transport("grpc-direct").is_ok());
        assert_eq!(base_transport("iroh-direct"), "iroh");
        let Err(refused) = servers_transport("quic") else {
            panic!("an unknown transport was taken");
        };
        assert!(refused.to_string().contains("\"quic\""), "{refused}");
    }

    #[test]
    fn the_part_has_a_row_per_figure_and_count_with_a_column_per_transport() {
        let runs = vec![
            (
                "grpc".to_owned(),
                vec![row("grpc", 10, 2.0), row("grpc", 1000, 3.0)],
            ),
            ("iroh".to_owned(), vec![row("iroh", 10, 4.0)]),
        ];
        let part = part(true, Duration::from_secs(3), &runs);
        assert_eq!(part.source, SOURCE);
        assert_eq!(part.rows.len(), 2 * FIGURES.len());
        let p99 = |id: &str| {
            part.rows
                .iter()
                .find(|r| r.id == id)
                .map(|r| (r.values.grpc, r.values.iroh))
        };
        assert_eq!(
            p99("fleet_commit_p99_10_agents"),
            Some((Some(2.0e6), Some(4.0e6)))
        );
        assert_eq!(
            p99("fleet_commit_p99_1000_agents"),
            Some((Some(3.0e6), None)),
            "a count one transport did not measure is absent, not invented"
        );
        // Not measured stays absent.
        let change = part
            .rows
            .iter()
            .find(|r| r.id == "fleet_change_p50_10_agents")
            .map(|r| r.values.grpc);
        assert_eq!(change, Some(None));
        // The part survives its own format.
        let text = serde_json::to_string(&part).unwrap();
        assert_eq!(Part::parse(&text).unwrap().rows.len(), part.rows.len());
    }
}
