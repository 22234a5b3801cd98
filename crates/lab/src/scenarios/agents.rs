//! `agents`: servers and agents in namespaces; no VM lost or run twice.
//!
//! Three servers (`tern run`, too small to host VMs) and 20 agents
//! (`[node] role = "agent"`, 8 with `--quick`), each in its own namespace
//! on one switch, run one process workload per agent (`sleep`). Then:
//!
//! 1. **Agents killed and restarted.** Three agents holding VMs are
//!    SIGKILLed (their workloads outlive them: a dead agent cannot fence,
//!    the known limit). The leader marks them down and their VMs start on
//!    other agents; the agents are restarted and each stops its old
//!    copies before anything else.
//! 2. **A server killed.** The leader is SIGKILLed: a new leader takes
//!    over, no agent is marked down for it and no VM moves; the server is
//!    restarted.
//! 3. **Agents cut off from the servers.** nftables drops all traffic
//!    between three agents and every server: the agents fence themselves
//!    (stop their VMs), the leader marks them down and their VMs start
//!    elsewhere; the cut is healed and the agents come back ready without
//!    starting a moved VM.
//! 4. **The rollout drill across agents** (`agents/rollout.rs`): `tern rollout`
//!    walks the default plan (soaks compressed) over servers and agents,
//!    the leader's gates reading the agents' metrics, until every agent
//!    runs iroh; `rollback --all`; then UDP dropped on an agent covered by
//!    stage 2 makes the cluster roll the stage back by itself.
//!
//! After every step each VM must be observed running with **exactly one
//! live workload** across all agents (read from the workloads' pidfiles),
//! and no VM may be lost.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tern_runtime::pidfile::{self, ProcessIdentity};

use crate::cluster::{Cluster, ClusterSpec};
use crate::netns::{Dir, peer_block_rule};
use crate::scenarios::Ctx;

mod rollout;

/// Heartbeat interval the servers give agents in the lab.
pub const HEARTBEAT_MS: u64 = 300;
/// Silence after which the leader marks an agent down (agents fence
/// after a third of it).
pub const DOWN_AFTER_MS: u64 = 4_000;
/// Bound on each awaited state.
pub const SETTLE_BOUND: Duration = Duration::from_secs(120);

fn tune(c: &mut tern_node::config::Config) {
    c.cluster.agent_heartbeat_interval_ms = HEARTBEAT_MS;
    c.cluster.agent_down_after_ms = DOWN_AFTER_MS;
    // Servers host no VMs: every VM goes to an agent.
    c.capacity.vcpus = 1;
    c.capacity.memory_mib = 16;
}

/// Every VM: id → (node id, observed state).
async fn vms(c: &Cluster, via: usize) -> anyhow::Result<BTreeMap<String, (u64, String)>> {
    let list = c.cli(via, &["vm", "list"]).await?;
    let mut out = BTreeMap::new();
    for v in list["vms"].as_array().context("vm list printed no vms")? {
        out.insert(
            v["id"].as_str().unwrap_or_default().to_owned(),
            (
                v["node_id"].as_u64().unwrap_or(0),
                v["observed"].as_str().unwrap_or_default().to_owned(),
            ),
        );
    }
    Ok(out)
}

/// The live workloads of `vm_id` under `dir` (its pidfiles).
fn live(dir: &Path, vm_id: &str) -> Vec<ProcessIdentity> {
    fn walk(dir: &Path, vm_id: &str, depth: usize, out: &mut Vec<ProcessIdentity>) {
        if dir.file_name().is_some_and(|n| n == vm_id)
            && let Ok(Some(p)) = pidfile::read(dir)
            && p.is_alive()
        {
            out.push(p);
        }
        if depth == 0 {
            return;
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), vm_id, depth - 1, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, vm_id, 4, &mut out);
    out
}

/// Live copies of each VM across every agent but those in `dead` (killed
/// agents: their workloads outlive them until they return).
fn copies(c: &Cluster, ids: &[String], dead: &[usize]) -> BTreeMap<String, usize> {
    ids.iter()
        .map(|id| {
            let n = c
                .agents
                .iter()
                .filter(|a| !dead.contains(&a.index))
                .map(|a| live(&a.dir, id).len())
                .sum();
            (id.clone(), n)
        })
        .collect()
}

/// Waits until every VM runs, placed on none of `avoid`, with exactly one
/// live copy on the agents not in `dead`; answers the placement.
async fn settled(
    c: &Cluster,
    via: usize,
    ids: &[String],
    avoid: &[u64],
    dead: &[usize],
) -> anyhow::Result<BTreeMap<String, u64>> {
    let deadline = Instant::now() + SETTLE_BOUND;
    let mut last: String;
    loop {
        match vms(c, via).await {
            Ok(now) => {
                let running = ids.iter().all(|id| {
                    now.get(id)
                        .is_some_and(|(node, obs)| obs == "running" && !avoid.contains(node))
                });
                let counts = copies(c, ids, dead);
                let single = counts.values().all(|n| *n == 1);
                if running && single && now.len() == ids.len() {
                    return Ok(now.into_iter().map(|(id, (node, _))| (id, node)).collect());
                }
                last = format!("vms {now:?}; live copies {counts:?}");
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!(
                "the VMs did not settle (each running once, on none of {avoid:?}) within {SETTLE_BOUND:?}: {last}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The agents' ids as the servers know them: agent index → node id.
async fn agent_ids(c: &Cluster, via: usize) -> anyhow::Result<BTreeMap<usize, u64>> {
    let s = c.status(via).await?;
    let mut out = BTreeMap::new();
    for a in s["agents"].as_array().context("status printed no agents")? {
        let id = a["id"].as_str().unwrap_or_default();
        if let Some(k) = c
            .agents
            .iter()
            .position(|slot| slot.file.as_ref().is_some_and(|f| f.id == id))
        {
            out.insert(k + 1, a["node_id"].as_u64().unwrap_or(0));
        }
    }
    Ok(out)
}

/// Waits until the leader's state lists `n` agents, all ready.
async fn all_ready(c: &Cluster, via: usize, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_BOUND;
    loop {
        if let Ok(s) = c.status(via).await {
            let ready = s["agents"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|a| a["status"] == "ready").count());
            if ready == n {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{n} agents not all ready within {SETTLE_BOUND:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Agents (1-based) hosting at least one VM, at most `n`.
fn hosts(placed: &BTreeMap<String, u64>, ids: &BTreeMap<usize, u64>, n: usize) -> Vec<usize> {
    ids.iter()
        .filter(|(_, id)| placed.values().any(|p| p == *id))
        .map(|(k, _)| *k)
        .take(n)
        .collect()
}

/// Kills every workload of the run (they outlive the lab's processes).
fn kill_workloads(c: &Cluster, ids: &[String]) {
    for a in &c.agents {
        for id in ids {
            for p in live(&a.dir, id) {
                let _ = p.signal_group(rustix::process::Signal::KILL);
            }
        }
    }
}

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let n_agents = if ctx.opts.quick { 8 } else { 20 };
    ctx.report.step(format!(
        "start 3 servers and {n_agents} agents in namespaces"
    ));
    let mut spec = ClusterSpec::new(3, &tern_testkit::config::grpc());
    spec.tune = Some(tune);
    // No `[transport]` pin: every node runs the cluster's policy for it,
    // gRPC by default, the rollout's while a stage covers it.
    spec.pin_transport = false;
    let mut c = Cluster::start(&ctx.lab, &ctx.opts.tern, spec, &mut |line| {
        eprintln!("  {line}");
    })
    .await?;
    for _ in 0..n_agents {
        c.add_agent().await?;
    }
    all_ready(&c, 1, n_agents).await?;
    let ids_of = agent_ids(&c, 1).await?;

    ctx.report.step(format!("create {n_agents} VMs"));
    let mut ids = Vec::new();
    for i in 0..n_agents {
        let name = format!("w{i}");
        let vm = c
            .cli(
                1,
                &[
                    "vm",
                    "create",
                    &name,
                    "--runtime",
                    "process",
                    "--memory-mib",
                    "64",
                    "--",
                    "sleep",
                    "3600",
                ],
            )
            .await?;
        ids.push(
            vm["id"]
                .as_str()
                .with_context(|| format!("vm create printed no id: {vm}"))?
                .to_owned(),
        );
    }
    let result = steps(ctx, &mut c, &ids, &ids_of, n_agents).await;
    kill_workloads(&c, &ids);
    result
}

async fn steps(
    ctx: &mut Ctx,
    c: &mut Cluster,
    ids: &[String],
    ids_of: &BTreeMap<usize, u64>,
    n_agents: usize,
) -> anyhow::Result<()> {
    let placed = settled(c, 1, ids, &[], &[]).await?;
    ctx.report
        .check("every VM runs once on an agent", true, placed.len());
    let after = agents_killed(ctx, c, ids, ids_of, n_agents, &placed).await?;
    let still = server_killed(ctx, c, ids, n_agents, &after).await?;
    let healed = agents_cut_off(ctx, c, ids, ids_of, n_agents, &still).await?;
    rollout::across_agents(ctx, c, ids, ids_of, &healed).await
}

/// Step 1: agents hosting VMs are killed and restarted.
async fn agents_killed(
    ctx: &mut Ctx,
    c: &mut Cluster,
    ids: &[String],
    ids_of: &BTreeMap<usize, u64>,
    n_agents: usize,
    placed: &BTreeMap<String, u64>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let victims = hosts(placed, ids_of, 3);
    ctx.report
        .step(format!("SIGKILL agents {victims:?}, which host VMs"));
    for k in &victims {
        c.kill_agent(*k)?;
    }
    let dead: Vec<u64> = victims
        .iter()
        .filter_map(|k| ids_of.get(k).copied())
        .collect();
    let t = Instant::now();
    // Their workloads outlive them (a dead agent cannot fence): only the
    // running agents' copies count until they return.
    let moved = settled(c, 1, ids, &dead, &victims).await?;
    ctx.report.figure(
        "VMs of killed agents running elsewhere after (s)",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    ctx.report.step("restart them: each stops its old copies");
    for k in &victims {
        c.start_agent(*k).await?;
    }
    all_ready(c, 1, n_agents).await?;
    let after = settled(c, 1, ids, &[], &[]).await?;
    ctx.report.check(
        "killed agents back: no VM lost or run twice, none moved back",
        after == moved,
        format!("{} VMs", after.len()),
    );
    Ok(after)
}

/// Step 2: the leader is killed; nothing moves.
async fn server_killed(
    ctx: &mut Ctx,
    c: &mut Cluster,
    ids: &[String],
    n_agents: usize,
    after: &BTreeMap<String, u64>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let leader = c.leader().await?;
    ctx.report.step(format!("SIGKILL the leader n{leader}"));
    c.kill(leader)?;
    let via = if leader == 1 { 2 } else { 1 };
    let t = Instant::now();
    let new = loop {
        if let Ok(l) = c.leader().await
            && l != leader
        {
            break l;
        }
        if t.elapsed() > SETTLE_BOUND {
            bail!("no new leader within {SETTLE_BOUND:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ctx.report.figure(
        "new leader after (s)",
        format!("{:.1} (n{new})", t.elapsed().as_secs_f64()),
    );
    // Several heartbeat periods under the new leader, then nothing moved.
    tokio::time::sleep(Duration::from_millis(DOWN_AFTER_MS * 2)).await;
    all_ready(c, via, n_agents).await?;
    let still = settled(c, via, ids, &[], &[]).await?;
    ctx.report.check(
        "a leader change marks no agent down and moves no VM",
        still == *after,
        format!("{} VMs", still.len()),
    );
    c.start_node(leader).await?;
    c.wait_formed().await?;
    Ok(still)
}

/// Step 3: agents hosting VMs are cut off from every server, then healed.
async fn agents_cut_off(
    ctx: &mut Ctx,
    c: &mut Cluster,
    ids: &[String],
    ids_of: &BTreeMap<usize, u64>,
    n_agents: usize,
    still: &BTreeMap<String, u64>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let cut = hosts(still, ids_of, 3);
    ctx.report.step(format!(
        "cut agents {cut:?} off from every server (nftables)"
    ));
    for k in &cut {
        let a = c.agent(*k)?;
        let mut input = Vec::new();
        let mut output = Vec::new();
        for n in &c.nodes {
            input.push(peer_block_rule(
                Dir::Input,
                &a.iface.name,
                n.iface.addr.addr,
            ));
            output.push(peer_block_rule(
                Dir::Output,
                &a.iface.name,
                n.iface.addr.addr,
            ));
        }
        a.ns.set_rules(&input, &output)?;
    }
    let gone: Vec<u64> = cut.iter().filter_map(|k| ids_of.get(k).copied()).collect();
    let t = Instant::now();
    // A cut-off agent runs: it must have stopped its copies by itself.
    let moved = settled(c, 1, ids, &gone, &[]).await;
    for k in &cut {
        c.agent(*k)?.ns.clear_rules()?;
    }
    let moved = moved?;
    ctx.report.figure(
        "VMs of cut-off agents running elsewhere, once, after (s)",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    ctx.report.step("heal the cut: the agents come back ready");
    all_ready(c, 1, n_agents).await?;
    let healed = settled(c, 1, ids, &[], &[]).await?;
    ctx.report.check(
        "cut-off agents fenced and came back: no VM lost or run twice",
        healed == moved,
        format!("{} VMs", healed.len()),
    );
    Ok(healed)
}
