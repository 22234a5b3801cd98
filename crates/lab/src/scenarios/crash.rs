//! `crash`: no acknowledged write is lost when the leader is SIGKILLed,
//! again and again.
//!
//! A 3-node dual cluster (every service over iroh, Raft over iroh) runs in
//! namespaces. A writer in the client namespace puts to the metadata
//! register (`Cluster/MetaPut`, one Raft write each, a fresh key per
//! write) through every node in turn, retrying a failed put with the same
//! request id (so a retry is applied once) at the next node, and records
//! every acknowledged put with its log index and the leader that
//! committed it. The scenario repeatedly SIGKILLs the leader, measures the
//! failover as the client sees it (the kill to the first put acknowledged
//! by another leader), restarts the killed node and lets it catch up.
//!
//! At the end every acknowledged key is read back from every node with a
//! linearizable read (`Cluster/MetaGet`); each must hold the acknowledged
//! value written at the acknowledged index. A lost or changed write fails
//! the run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tern_cluster::{meta_get, meta_put};
use tern_protocol::{PeerAddr, RpcClient};

use tern_transport_dual::RaftTransport;

use crate::cluster::{self, Cluster, ClusterSpec};
use crate::report::{Latencies, ms};
use crate::scenarios::Ctx;

/// Timeout of one put; a put to a dead node fails faster (refused), one
/// stuck behind an election waits this long, then goes to the next node.
pub const PUT_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of one verification read.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of one verification read (an `Unavailable` is retried).
pub const READ_ATTEMPTS: usize = 10;
/// Pause between puts: keeps the key count well under the register's
/// bound over a full run (at most 50 puts/s).
pub const WRITE_PAUSE: Duration = Duration::from_millis(20);
/// The writer stops after this many acknowledged puts (the register holds
/// at most `MAX_META_KEYS`; every put uses a fresh key).
pub const MAX_WRITES: usize = 9_000;
/// Bound on one failover (the kill to a put acknowledged by a new leader).
pub const FAILOVER_BOUND: Duration = Duration::from_secs(60);
/// Acknowledged puts to wait for after a restart before the next kill.
pub const PUTS_BETWEEN_KILLS: usize = 20;

/// One acknowledged put.
#[derive(Debug, Clone)]
pub struct Acked {
    /// The key (`crash/<n>`).
    pub key: String,
    /// The value written.
    pub value: String,
    /// The log index it was applied at.
    pub index: u64,
    /// The leader that committed it.
    pub leader_id: u64,
    /// When the acknowledgement arrived.
    pub at: Instant,
}

/// What the writer shares with the scenario.
#[derive(Debug, Default)]
struct Writes {
    acked: Vec<Acked>,
    failed_attempts: u64,
    last_error: String,
}

async fn writer(
    addrs: Vec<PeerAddr>,
    stop: Arc<AtomicBool>,
    writes: Arc<Mutex<Writes>>,
) -> anyhow::Result<()> {
    let client: Arc<dyn RpcClient> = Arc::new(tern_transport_grpc::GrpcClient::new(
        tern_transport_grpc::ClientConfig::new(crate::keys::client_key()),
    ));
    let mut target = 0usize;
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) && n < MAX_WRITES {
        n += 1;
        let (key, value, request_id) = (
            format!("crash/{n}"),
            format!("value-{n}"),
            format!("crash-{n}"),
        );
        // The same put until it is acknowledged (or the scenario stops).
        loop {
            let addr = &addrs[target % addrs.len()];
            match meta_put(
                client.as_ref(),
                addr,
                &request_id,
                &key,
                &value,
                PUT_TIMEOUT,
            )
            .await
            {
                Ok(put) => {
                    let mut w = writes
                        .lock()
                        .map_err(|_| anyhow::anyhow!("writes lock poisoned"))?;
                    w.acked.push(Acked {
                        key: key.clone(),
                        value: value.clone(),
                        index: put.index,
                        leader_id: put.leader_id,
                        at: Instant::now(),
                    });
                    break;
                }
                Err(e) => {
                    if let Ok(mut w) = writes.lock() {
                        w.failed_attempts += 1;
                        w.last_error = e.to_string();
                    }
                    target += 1;
                    if stop.load(Ordering::SeqCst) {
                        // Not acknowledged: not counted, whatever happened.
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        target += 1;
        tokio::time::sleep(WRITE_PAUSE).await;
    }
    Ok(())
}

fn acked(writes: &Mutex<Writes>) -> Vec<Acked> {
    writes.lock().map(|w| w.acked.clone()).unwrap_or_default()
}

/// Waits until `n` more puts are acknowledged after `since`; returns the
/// first acknowledged by a leader other than `not_by` (if given).
async fn wait_acks(
    writes: &Mutex<Writes>,
    since: Instant,
    not_by: Option<u64>,
    n: usize,
    bound: Duration,
    writer_done: &dyn Fn() -> bool,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + bound;
    loop {
        let list = acked(writes);
        let after: Vec<&Acked> = list
            .iter()
            .filter(|a| a.at > since && not_by.is_none_or(|l| a.leader_id != l))
            .collect();
        if after.len() >= n
            && let Some(first) = after.first()
        {
            return Ok(first.at);
        }
        if writer_done() {
            bail!("the writer stopped");
        }
        if Instant::now() > deadline {
            let last = writes
                .lock()
                .map(|w| w.last_error.clone())
                .unwrap_or_default();
            bail!(
                "{} of {n} puts acknowledged within {bound:?} (last error: {last})",
                after.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads every acknowledged key from the node at `addr`; returns the
/// mismatches (lost or changed writes) and reads that kept failing.
async fn verify_node(
    addr: PeerAddr,
    acked: Vec<Acked>,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let client: Arc<dyn RpcClient> = Arc::new(tern_transport_grpc::GrpcClient::new(
        tern_transport_grpc::ClientConfig::new(crate::keys::client_key()),
    ));
    let mut lost = Vec::new();
    let mut unreadable = Vec::new();
    for a in &acked {
        let mut last = String::new();
        let mut read = None;
        for _ in 0..READ_ATTEMPTS {
            match meta_get(client.as_ref(), &addr, &a.key, READ_TIMEOUT).await {
                Ok(r) => {
                    read = Some(r);
                    break;
                }
                Err(e) if e.is_retryable() => {
                    last = e.to_string();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    last = e.to_string();
                    break;
                }
            }
        }
        match read {
            None => unreadable.push(format!("{}: {last}", a.key)),
            Some(r) => match &r.value {
                Some((value, index)) if *value == a.value && *index == a.index => {}
                Some((value, index)) => lost.push(format!(
                    "{}: acknowledged {:?} at index {}, read {value:?} written at {index} (read index {})",
                    a.key, a.value, a.index, r.read_index
                )),
                None => lost.push(format!(
                    "{}: acknowledged at index {} by node {}, missing at read index {}",
                    a.key, a.index, a.leader_id, r.read_index
                )),
            },
        }
    }
    Ok((lost, unreadable))
}

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let kills = if ctx.opts.quick { 3 } else { 12 };
    ctx.report
        .step("start a 3-node dual cluster (all_except_raft, Raft over iroh)");
    let spec = ClusterSpec::new(
        3,
        &cluster::dual_section(&["all_except_raft"], RaftTransport::Iroh),
    );
    let report = &mut ctx.report;
    let mut c = Cluster::start(&ctx.lab, &ctx.opts.tern, spec, &mut |m| report.info(m)).await?;

    ctx.report
        .step("start the writer in the client namespace (register puts through every node)");
    let addrs: Vec<PeerAddr> = c
        .nodes
        .iter()
        .map(|n| -> anyhow::Result<PeerAddr> {
            let mut a = n
                .node_file()?
                .peer_addr()
                .map_err(|e| anyhow::anyhow!("node n{}: {e}", n.index))?;
            a.iroh = None;
            Ok(a)
        })
        .collect::<anyhow::Result<_>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Writes::default()));
    let started = Instant::now();
    let (s, w) = (stop.clone(), writes.clone());
    let handle = c.client.spawn_task(move || writer(addrs, s, w))?;
    let handle = Arc::new(Mutex::new(Some(handle)));
    let done = {
        let h = handle.clone();
        move || {
            h.lock()
                .map(|h| h.as_ref().is_none_or(|h| h.is_finished()))
                .unwrap_or(true)
        }
    };
    wait_acks(
        &writes,
        started,
        None,
        PUTS_BETWEEN_KILLS,
        cluster::CONVERGE_BOUND,
        &done,
    )
    .await
    .context("the writer's first puts")?;

    let mut failovers = Latencies::default();
    let mut failed_kills = 0usize;
    for k in 1..=kills {
        let leader = c.leader().await?;
        let leader_id = c
            .node(leader)?
            .raft_id
            .with_context(|| format!("n{leader} has no known Raft id"))?;
        ctx.report
            .step(format!("kill {k}/{kills}: SIGKILL the leader n{leader}"));
        let killed_at = Instant::now();
        c.kill(leader)?;
        match wait_acks(
            &writes,
            killed_at,
            Some(leader_id),
            1,
            FAILOVER_BOUND,
            &done,
        )
        .await
        {
            Ok(at) => {
                let took = at.saturating_duration_since(killed_at);
                ctx.report.info(format!(
                    "a new leader acknowledged a put after {}",
                    ms(took)
                ));
                failovers.push(took);
            }
            Err(e) => {
                failed_kills += 1;
                ctx.report.info(format!("no failover: {e:#}"));
            }
        }
        ctx.report.info(format!("restart n{leader}"));
        c.start_node(leader).await?;
        c.wait_formed().await?;
        wait_acks(
            &writes,
            Instant::now(),
            None,
            PUTS_BETWEEN_KILLS,
            cluster::CONVERGE_BOUND,
            &done,
        )
        .await
        .with_context(|| format!("puts after restarting n{leader}"))?;
    }

    ctx.report.step("stop the writer");
    stop.store(true, Ordering::SeqCst);
    let h = handle.lock().ok().and_then(|mut h| h.take());
    if let Some(h) = h {
        tokio::task::spawn_blocking(move || {
            h.join()
                .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?
        })
        .await??;
    }
    let all = acked(&writes);
    let failed_attempts = writes.lock().map(|w| w.failed_attempts).unwrap_or(0);
    ctx.report.figure("acknowledged puts", all.len());
    ctx.report
        .figure("failed put attempts (retried)", failed_attempts);
    ctx.report
        .figure("failover (kill to new leader's ack)", failovers.summary());
    if let (Some(p50), Some(p99)) = (failovers.quantile(0.5), failovers.quantile(0.99)) {
        ctx.report.figure("failover p50", ms(p50));
        ctx.report.figure("failover p99", ms(p99));
    }
    ctx.report.check(
        "a new leader took writes after every kill",
        failed_kills == 0,
        format!("{} of {kills}", kills - failed_kills),
    );
    // The same index twice would mean two writes were acknowledged for one
    // log entry.
    let mut indexes: Vec<u64> = all.iter().map(|a| a.index).collect();
    indexes.sort_unstable();
    let before = indexes.len();
    indexes.dedup();
    ctx.report.check(
        "every acknowledged put has its own log index",
        before == indexes.len(),
        format!("{} distinct of {before}", indexes.len()),
    );

    for slot in &c.nodes {
        let i = slot.index;
        ctx.report.step(format!(
            "read all {} acknowledged keys from n{i} (linearizable)",
            all.len()
        ));
        let mut addr = slot
            .node_file()?
            .peer_addr()
            .map_err(|e| anyhow::anyhow!("node n{i}: {e}"))?;
        addr.iroh = None;
        let list = all.clone();
        let (lost, unreadable) = c.client.run_task(move || verify_node(addr, list)).await?;
        for l in lost.iter().take(5) {
            ctx.report.info(format!("LOST: {l}"));
        }
        for u in unreadable.iter().take(3) {
            ctx.report.info(format!("unreadable: {u}"));
        }
        ctx.report.check(
            format!("no acknowledged write lost (read from n{i})"),
            lost.is_empty(),
            format!("{} lost of {}", lost.len(), all.len()),
        );
        ctx.report.check(
            format!("every acknowledged key readable from n{i}"),
            unreadable.is_empty(),
            format!("{} unreadable", unreadable.len()),
        );
    }

    ctx.report.step("stop every node");
    let unclean = c.shutdown().await;
    ctx.report.stopped_cleanly(&unclean);
    Ok(())
}
