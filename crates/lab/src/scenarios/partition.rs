//! `partition`: cut the leader off; the majority elects a new leader and
//! keeps committing; heal; the old leader catches up; and the whole client
//! history is linearizable.
//!
//! A cluster (3 nodes with `--quick`, else 5) runs in namespaces on one
//! switch, every service and Raft over iroh (dual mode, fallback on). One
//! client per node, in the client namespace, calls its own node with puts
//! of fresh values and linearizable gets over a few keys (one register
//! each; a follower forwards to the leader), and records its whole history
//! (`crate::history`): invocation, acknowledgement with the value, and
//! every timeout or transport error as "may have happened".
//!
//! The cut is nftables in the leader's namespace dropping every packet to
//! and from the other nodes (the client namespace still reaches it, so the
//! old leader's client is on the minority side of the cut and keeps
//! calling it). The scenario checks that the majority elects another
//! leader and acknowledges writes while the cut lasts, heals, checks that
//! the old leader's applied index reaches a write committed after the
//! heal, then stops the clients and reads every key through every node
//! (recorded too). Every final read must be at least as new as every
//! acknowledged write ([`history::lost_writes`]), and the history must be
//! linearizable by `stateright`'s `LinearizabilityTester`
//! ([`history::check`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tern_protocol::PeerAddr;
use tern_protocol::metric_names as names;

use tern_transport_dual::RaftTransport;

use crate::cluster::{self, Cluster, ClusterSpec};
use crate::history::{self, History, Op, Outcome, Verdict};
use crate::netns::{Dir, peer_block_rule};
use crate::report::{Latencies, ms};
use crate::scenarios::Ctx;
use crate::workload::{RegisterClient, Workload, client_loop};

/// Bound on one client call. Shorter than a follower's forward to a
/// leader that is cut off (10 s), so a client whose call is stuck there
/// records it as unknown and goes on (as a new process) instead of
/// sitting out the cut.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on the election after the cut.
pub const ELECTION_BOUND: Duration = Duration::from_secs(60);
/// Bound on the old leader's catch-up after the heal.
pub const CATCH_UP_BOUND: Duration = Duration::from_secs(90);
/// How long the checker may take per key before the run counts as
/// inconclusive (a failure).
pub const CHECK_BUDGET: Duration = Duration::from_secs(300);
/// How long the checker's self-test (this history with one read made
/// stale) may take.
pub const SELF_TEST_BUDGET: Duration = Duration::from_secs(60);
/// Attempts of one final read (a read refused while the cluster settles
/// is retried).
pub const FINAL_READ_ATTEMPTS: usize = 10;

/// The scenario's knobs for one variant.
#[derive(Debug, Clone)]
struct Plan {
    nodes: usize,
    keys: usize,
    pause: Duration,
    max_ops: u64,
    warm_up_ops: u64,
    hold: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                nodes: 3,
                keys: 2,
                pause: Duration::from_millis(100),
                max_ops: 150,
                warm_up_ops: 30,
                hold: Duration::from_secs(8),
            }
        } else {
            Plan {
                nodes: 5,
                keys: 3,
                pause: Duration::from_millis(120),
                max_ops: 300,
                warm_up_ops: 60,
                hold: Duration::from_secs(15),
            }
        }
    }
}

fn peer(c: &Cluster, i: usize) -> anyhow::Result<PeerAddr> {
    c.node(i)?
        .node_file()?
        .peer_addr()
        .map_err(|e| anyhow::anyhow!("node n{i}'s node file: {e}"))
}

/// Waits (bounded) until a node other than `old` leads, as every node in
/// `majority` sees it; returns its index.
async fn new_leader(c: &Cluster, majority: &[usize], old: u64) -> anyhow::Result<usize> {
    let deadline = Instant::now() + ELECTION_BOUND;
    loop {
        let mut seen = Vec::new();
        for &i in majority {
            let id = c
                .status(i)
                .await
                .ok()
                .and_then(|s| s["leader_id"].as_u64())
                .unwrap_or(0);
            seen.push(id);
        }
        if let Some(&id) = seen.first()
            && id != 0
            && id != old
            && seen.iter().all(|s| *s == id)
            && let Some(slot) = c.nodes.iter().find(|n| n.raft_id == Some(id))
        {
            return Ok(slot.index);
        }
        if Instant::now() > deadline {
            bail!(
                "the majority elected no new leader within {ELECTION_BOUND:?} (leaders seen: {seen:?})"
            );
        }
        tokio::time::sleep(cluster::POLL).await;
    }
}

async fn applied(c: &Cluster, i: usize) -> anyhow::Result<f64> {
    Ok(c.metrics(i).await?.sum(names::RAFT_APPLIED_INDEX, &[]))
}

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let plan = Plan::new(ctx.opts.quick);
    ctx.report.step(format!(
        "start {} nodes in namespaces (dual, everything over iroh)",
        plan.nodes
    ));
    let spec = ClusterSpec::new(
        plan.nodes,
        &cluster::dual_section(&["all_except_raft"], RaftTransport::Iroh),
    );
    let report = &mut ctx.report;
    let mut c = Cluster::start(&ctx.lab, &ctx.opts.tern, spec, &mut |m| report.info(m)).await?;
    let old = c.leader().await?;
    let old_id = c
        .node(old)?
        .raft_id
        .context("the leader's Raft id is unknown")?;
    ctx.report
        .info(format!("leader: n{old} (raft id {old_id})"));

    ctx.report.step(format!(
        "start {} recording clients (one per node, {} keys, puts and linearizable gets)",
        plan.nodes, plan.keys
    ));
    let history = Arc::new(History::new());
    let workload = Workload::new();
    let keys: Vec<String> = (0..plan.keys).map(|k| format!("partition/k{k}")).collect();
    let mut peers = Vec::new();
    for i in c.indices() {
        peers.push((i, peer(&c, i)?));
    }
    let clients = {
        let history = history.clone();
        let workload = workload.clone();
        let keys = keys.clone();
        let plan = plan.clone();
        c.client.spawn_task(move || async move {
            let loops = peers.into_iter().map(|(i, p)| {
                let client = RegisterClient::grpc(p, CALL_TIMEOUT);
                let log = history.client(format!("c{i}"));
                client_loop(
                    client,
                    log,
                    workload.clone(),
                    keys.clone(),
                    plan.max_ops,
                    plan.pause,
                    i as u64,
                )
            });
            let done = futures::future::join_all(loops).await;
            done.into_iter().collect::<anyhow::Result<Vec<u64>>>()
        })?
    };
    let warm = Instant::now() + cluster::CONVERGE_BOUND;
    while workload.ops.load(std::sync::atomic::Ordering::SeqCst) < plan.warm_up_ops {
        if Instant::now() > warm {
            workload.stop();
            bail!("the clients made no progress before the cut");
        }
        tokio::time::sleep(cluster::POLL).await;
    }

    ctx.report.step(format!(
        "cut the leader n{old} off from the other nodes (nftables drops in its namespace)"
    ));
    let others: Vec<usize> = c.indices().into_iter().filter(|i| *i != old).collect();
    let (mut input, mut output) = (Vec::new(), Vec::new());
    let iface = c.node(old)?.iface.name.clone();
    for &i in &others {
        let a = c.node(i)?.iface.addr.addr;
        input.push(peer_block_rule(Dir::Input, &iface, a));
        output.push(peer_block_rule(Dir::Output, &iface, a));
    }
    c.node(old)?.ns.set_rules(&input, &output)?;
    let cut_at = history.now();
    let elected = new_leader(&c, &others, old_id).await;
    let new = match elected {
        Ok(n) => n,
        Err(e) => {
            workload.stop();
            let _ = c.node(old)?.ns.clear_rules();
            return Err(e);
        }
    };
    let elected_at = history.now();
    ctx.report.check(
        "majority elects a new leader",
        true,
        format!("n{new} after {}", ms(elected_at.saturating_sub(cut_at))),
    );
    tokio::time::sleep(plan.hold).await;
    let heal_at = history.now();
    let dropped = c.node(old)?.ns.nft_dropped();

    ctx.report.step("heal the cut");
    c.node(old)?.ns.clear_rules()?;
    let during: Vec<history::Entry> = history
        .entries()
        .into_iter()
        .filter(|e| e.invoked >= elected_at && e.returned <= heal_at)
        .collect();
    let majority_clients: Vec<String> = others.iter().map(|i| format!("c{i}")).collect();
    let majority_acks = during
        .iter()
        .filter(|e| e.is_acked_write() && majority_clients.contains(&e.client))
        .count();
    ctx.report.check(
        "majority keeps committing during the cut",
        majority_acks > 0,
        format!("{majority_acks} writes acknowledged in {}", ms(plan.hold)),
    );
    let minority = format!("c{old}");
    let minority_ops: Vec<&history::Entry> =
        during.iter().filter(|e| e.client == minority).collect();
    let minority_acked = minority_ops
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Written | Outcome::Read(_)))
        .count();
    ctx.report.figure(
        format!("old leader's client during the cut (n{old})"),
        format!(
            "{} calls, {minority_acked} answered, {} unknown",
            minority_ops.len(),
            minority_ops
                .iter()
                .filter(|e| matches!(e.outcome, Outcome::Unknown(_)))
                .count()
        ),
    );
    ctx.report.figure("packets dropped by the cut", dropped);

    ctx.report.step(format!("the old leader n{old} catches up"));
    let marker = {
        let p = peer(&c, new)?;
        c.client
            .run_task(move || async move {
                let client = RegisterClient::grpc(p, CALL_TIMEOUT);
                let mut last = String::new();
                for _ in 0..FINAL_READ_ATTEMPTS {
                    match client
                        .put(
                            &tern_node::client::request_id(),
                            "partition/marker",
                            "healed",
                        )
                        .await
                    {
                        Ok(index) => return Ok(index),
                        Err(e) => last = format!("{e:?}"),
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                bail!("no marker write was acknowledged after the heal: {last}")
            })
            .await?
    };
    let started = Instant::now();
    let caught_up = loop {
        let a = applied(&c, old).await.unwrap_or(0.0);
        if a >= marker as f64 {
            break Some(started.elapsed());
        }
        if started.elapsed() > CATCH_UP_BOUND {
            break None;
        }
        tokio::time::sleep(cluster::POLL).await;
    };
    let mut indexes = Vec::new();
    for i in c.indices() {
        indexes.push(format!("n{i}={}", applied(&c, i).await.unwrap_or(0.0)));
    }
    ctx.report.check(
        "old leader's applied index reaches the others'",
        caught_up.is_some(),
        match caught_up {
            Some(t) => format!("index {marker} in {} ({})", ms(t), indexes.join(" ")),
            None => format!("not within {CATCH_UP_BOUND:?} ({})", indexes.join(" ")),
        },
    );

    ctx.report
        .step("stop the clients; read every key through every node");
    // Let the clients run on the healed cluster a little.
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload.stop();
    let per_client = tokio::task::spawn_blocking(move || {
        clients
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
    })
    .await??;
    ctx.report.info(format!("ops per client: {per_client:?}"));
    let final_peers: Vec<(usize, PeerAddr)> = c
        .indices()
        .into_iter()
        .map(|i| peer(&c, i).map(|p| (i, p)))
        .collect::<anyhow::Result<_>>()?;
    let finals = {
        let history = history.clone();
        let keys = keys.clone();
        c.client
            .run_task(move || async move {
                let mut log = history.client("verify");
                let mut out = Vec::new();
                for (i, p) in final_peers {
                    let client = RegisterClient::grpc(p, CALL_TIMEOUT);
                    for key in &keys {
                        let mut seen = None;
                        for _ in 0..FINAL_READ_ATTEMPTS {
                            if let Outcome::Read(v) = client.recorded(&mut log, key, Op::Read).await
                            {
                                seen = Some(v);
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        out.push((i, key.clone(), seen));
                    }
                }
                Ok(out)
            })
            .await?
    };
    let entries = history.entries();
    let mut lost = Vec::new();
    let mut unanswered = Vec::new();
    for (i, key, seen) in &finals {
        match seen {
            Some(v) => lost.extend(history::lost_writes(&entries, key, *v)),
            None => unanswered.push(format!("n{i} {key}")),
        }
    }
    ctx.report.check(
        "every node answers the final reads",
        unanswered.is_empty(),
        if unanswered.is_empty() {
            format!("{} reads", finals.len())
        } else {
            format!("unanswered: {}", unanswered.join(", "))
        },
    );
    let acked = entries.iter().filter(|e| e.is_acked_write()).count();
    ctx.report.check(
        "every acknowledged write is present",
        lost.is_empty(),
        if lost.is_empty() {
            format!("{acked} acknowledged writes, none overwritten by an older value")
        } else {
            format!("{} lost: {:?}", lost.len(), lost.first())
        },
    );

    ctx.report
        .step("check the history with stateright's LinearizabilityTester");
    let mut lat_w = Latencies::default();
    let mut lat_r = Latencies::default();
    for e in &entries {
        let took = e.returned.saturating_sub(e.invoked);
        match (&e.op, &e.outcome) {
            (Op::Write(_), Outcome::Written) => lat_w.push(took),
            (Op::Read, Outcome::Read(_)) => lat_r.push(took),
            _ => {}
        }
    }
    ctx.report.figure("acknowledged puts", lat_w.summary());
    ctx.report.figure("answered gets", lat_r.summary());
    let stale = history::stale_copy(&entries);
    let checked =
        tokio::task::spawn_blocking(move || history::check(&entries, CHECK_BUDGET)).await?;
    for k in &checked {
        let value = format!(
            "{:?}: {} puts acked, {} gets, {} unknown, {} failed; checked in {}",
            k.verdict,
            k.counts.writes_acked,
            k.counts.reads_ok,
            k.counts.unknown,
            k.counts.failed,
            ms(k.took)
        );
        ctx.report.check(
            format!("linearizable history of {}", k.key),
            k.passed(),
            value,
        );
        if k.verdict == Verdict::GaveUp {
            ctx.report.note(format!(
                "the checker gave up on {} after {CHECK_BUDGET:?}: the history is neither proved nor refuted; run with fewer operations",
                k.key
            ));
        }
    }
    // The checker on this very history, with one read made stale: it
    // must refuse it, or its passes above mean nothing.
    match stale {
        Some((key, copy)) => {
            let verdict = tokio::task::spawn_blocking(move || {
                history::check(&copy, SELF_TEST_BUDGET)
                    .into_iter()
                    .find(|k| k.key == key)
                    .map(|k| (k.key, k.verdict))
            })
            .await?;
            let ok = matches!(&verdict, Some((_, Verdict::NotLinearizable)));
            ctx.report.check(
                "checker refuses this history with one read made stale",
                ok,
                format!("{verdict:?}"),
            );
        }
        None => ctx.report.note(
            "no read in the history could be made stale (too short for the checker's self-test)",
        ),
    }
    ctx.report.note(
        "the tester searches interleavings depth-first: it proves a linearizable history fast, but refuting a violation can take exponential time; a check that runs out of time counts as a failure (GaveUp), never a pass",
    );
    ctx.report.note(
        "an unknown outcome (timeout, no quorum, transport error) is checked as may-have-happened: invoked, never returned",
    );

    ctx.report.step("stop the cluster");
    let unclean = c.shutdown().await;
    if !unclean.is_empty() {
        ctx.report
            .info(format!("nodes that did not stop cleanly: {unclean:?}"));
    }
    Ok(())
}
