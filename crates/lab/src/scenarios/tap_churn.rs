//! `tap-churn`: VM devices come and go on every node while the cluster
//! talks over iroh. Guarantee: no client call fails, the leader does not
//! change, and every node's iroh endpoint keeps serving and making calls
//! in every interval of the churn.
//!
//! Why: iroh watches the host's interfaces (it advertises their
//! addresses), and a node with `[network] enabled = true` adds and removes
//! a device per VM start and delete. A flood of link changes must not
//! stall or break the endpoint that carries Raft.
//!
//! The cluster: 3 nodes in dual mode, every node-to-node call (Raft
//! included) preferring iroh, fallback on, `[network] enabled = true` with
//! no `host_netns` (each node runs in its own lab namespace, so its VM
//! bridge and device host ends live there; the VMs' own namespaces are
//! named `v` + the last four bytes of the lab prefix + `-VMID`). The client
//! calls every node over iroh (status, health, a VM read and a VM
//! stop/start, which a follower forwards to the leader). Meanwhile on
//! every node: (a) process-runtime VMs pinned to it are created and
//! deleted in a loop through the CLI, each checked to get its veth on the
//! bridge and to lose it again, and (b) a device churner adds a TAP and a
//! veth pair in the node's namespace, sets them up and deletes them, every
//! 200-300 ms. Every [`SAMPLE`] the lab scrapes every node and records its
//! iroh calls (server and client side) in that interval. The report also
//! says what iroh did and what Tern had to do: the endpoint rebuilds per
//! node and by reason, and the unanswered liveness probes (see
//! `tern_transport_iroh::supervisor`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tern_node::config::NetworkSection;
use tern_protocol::metric_names as names;
use tern_transport_dual::RaftTransport;

use crate::cluster::{self, Cluster, ClusterSpec, Metrics, TrafficSpec};
use crate::netns::{Netns, destroy_namespace, list_namespaces};
use crate::scenarios::Ctx;
use crate::scenarios::udp_blocked::create_vm;

/// Interval between metric samples during the churn.
pub const SAMPLE: Duration = Duration::from_secs(10);
/// Bound on a VM's device appearing after create, or going after delete.
const DEVICE_BOUND: Duration = Duration::from_secs(30);

/// The VM device prefix for a lab prefix: `v` and its last four bytes
/// (the runtime allows at most five; a lab prefix is `[a-z0-9]`).
pub fn device_prefix(lab_prefix: &str) -> String {
    let tail = &lab_prefix[lab_prefix.len().saturating_sub(4)..];
    format!("v{tail}")
}

/// The `[network]` section of every node.
fn network_section(device_prefix: &str) -> NetworkSection {
    NetworkSection {
        enabled: true,
        device_prefix: Some(device_prefix.to_owned()),
        ..NetworkSection::default()
    }
}

/// Deletes every namespace named `{prefix}-…` when dropped: the VMs'
/// namespaces, should a VM outlive the scenario.
struct VmNamespaces(String);

impl Drop for VmNamespaces {
    fn drop(&mut self) {
        let want = format!("{}-", self.0);
        for n in list_namespaces().unwrap_or_default() {
            if n.starts_with(&want) {
                destroy_namespace(&n);
            }
        }
    }
}

/// Kills, when dropped, every workload the nodes' runtimes left in their
/// data directories: workloads outlive their nodes by design, so the
/// traffic VM (`ttc-traffic`, `sleep 3600`) and any churned VM a failed
/// round left would run on after the scenario.
struct Workloads(Vec<PathBuf>);

impl Drop for Workloads {
    fn drop(&mut self) {
        for dir in &self.0 {
            for rt in tern_node::node::runtime_dirs(dir) {
                for (_, w) in tern_runtime::pidfile::live_workloads(&rt) {
                    let _ = w.signal_group(rustix::process::Signal::KILL);
                }
            }
        }
    }
}

/// What one node's churners did.
#[derive(Debug, Default)]
struct Tally {
    devices_created: AtomicU64,
    devices_deleted: AtomicU64,
    device_errors: AtomicU64,
    vms_created: AtomicU64,
    vms_deleted: AtomicU64,
    vm_devices_seen: AtomicU64,
    vm_devices_gone: AtomicU64,
    vm_errors: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn error(&self, counter: &AtomicU64, e: &anyhow::Error) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some(format!("{e:#}"));
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// One round of the bare device churner: a TAP and a veth pair added, set
/// up, and deleted; answers the devices made (a pair counts as two).
fn device_round(ns: &Netns, k: u64, tally: &Tally) -> anyhow::Result<()> {
    let slot = k % 4;
    let tap = format!("ttct{slot}");
    let veth = format!("ttcv{slot}");
    let peer = format!("ttcp{slot}");
    ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
    ns.ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
    tally.devices_created.fetch_add(3, Ordering::Relaxed);
    for d in [&tap, &veth, &peer] {
        ns.ip(&["link", "set", d, "up"])?;
    }
    std::thread::sleep(Duration::from_millis(100));
    ns.ip(&["link", "del", &tap])?;
    ns.ip(&["link", "del", &veth])?;
    tally.devices_deleted.fetch_add(3, Ordering::Relaxed);
    Ok(())
}

/// Starts the bare device churner of `ns` on its own thread; it stops
/// when `stop` is set.
fn churn_devices(
    ns: Netns,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut k = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = device_round(&ns, k, &tally) {
                tally.error(&tally.device_errors, &e);
                // Leave no half-made device for the next round.
                let slot = k % 4;
                let _ = ns.ip(&["link", "del", &format!("ttct{slot}")]);
                let _ = ns.ip(&["link", "del", &format!("ttcv{slot}")]);
            }
            // 100 ms up, then 100-199 ms down: a round every 200-300 ms
            // plus the `ip` calls' own time.
            std::thread::sleep(Duration::from_millis(100 + (k * 37) % 100));
            k += 1;
        }
    })
}

/// Whether a device labelled `vm_id` (a VM's host end) is in `ns`.
async fn has_vm_device(ns: &Netns, vm_id: &str) -> anyhow::Result<bool> {
    let ns = ns.clone();
    let out = tokio::task::spawn_blocking(move || ns.ip(&["-j", "link", "show"])).await??;
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("`ip -j link show` printed no JSON")?;
    Ok(links
        .as_array()
        .is_some_and(|l| l.iter().any(|d| d["ifalias"].as_str() == Some(vm_id))))
}

/// Waits (bounded) until `vm_id`'s device is in `ns` (`present`) or gone.
async fn wait_vm_device(ns: &Netns, vm_id: &str, present: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEVICE_BOUND;
    while has_vm_device(ns, vm_id).await? != present {
        if Instant::now() > deadline {
            anyhow::bail!(
                "{vm_id}'s device {} within {DEVICE_BOUND:?}",
                if present {
                    "did not appear"
                } else {
                    "was not removed"
                }
            );
        }
        tokio::time::sleep(cluster::POLL).await;
    }
    Ok(())
}

/// One VM round on node `i`: create a VM pinned to it through its CLI,
/// wait for its veth on the bridge, delete it, wait for the veth to go.
async fn vm_round(c: &Cluster, i: usize, k: u64, tally: &Tally) -> anyhow::Result<()> {
    let ns = c.node(i)?.ns.clone();
    let vm = create_vm(c, i, i, &format!("ttc-n{i}-{k}")).await?;
    tally.vms_created.fetch_add(1, Ordering::Relaxed);
    wait_vm_device(&ns, &vm, true).await?;
    tally.vm_devices_seen.fetch_add(1, Ordering::Relaxed);
    c.cli(i, &["vm", "delete", &vm]).await?;
    tally.vms_deleted.fetch_add(1, Ordering::Relaxed);
    wait_vm_device(&ns, &vm, false).await?;
    tally.vm_devices_gone.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Node `i`'s VM churner, until `until`.
async fn churn_vms(c: &Cluster, i: usize, until: Instant, tally: &Tally) {
    let mut k = 0;
    while Instant::now() < until {
        if let Err(e) = vm_round(c, i, k, tally).await {
            tally.error(&tally.vm_errors, &e);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        k += 1;
    }
}

/// Iroh calls per node in one sample interval: (server side, client side).
type Interval = Vec<(f64, f64)>;

fn iroh_side(m: &Metrics, side: &str) -> f64 {
    m.sum(names::CALLS, &[("transport", "iroh"), ("side", side)])
}

/// Scrapes every node each [`SAMPLE`] until `until`; answers the iroh
/// calls per node in each interval.
async fn sample_iroh(c: &Cluster, until: Instant) -> Vec<Interval> {
    let mut last = c.snapshot().await;
    let mut intervals = Vec::new();
    while Instant::now() + SAMPLE / 2 < until {
        tokio::time::sleep(SAMPLE.min(until.saturating_duration_since(Instant::now()))).await;
        let now = c.snapshot().await;
        intervals.push(
            now.iter()
                .zip(&last)
                .map(|(n, l)| {
                    (
                        iroh_side(n, "server") - iroh_side(l, "server"),
                        iroh_side(n, "client") - iroh_side(l, "client"),
                    )
                })
                .collect(),
        );
        last = now;
    }
    intervals
}

/// Runs every node's churners for `churn` and samples meanwhile.
async fn churn(c: &Cluster, churn: Duration, tallies: &[Arc<Tally>]) -> Vec<Interval> {
    let until = Instant::now() + churn;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (n, t) in c.nodes.iter().zip(tallies) {
        threads.push(churn_devices(n.ns.clone(), stop.clone(), t.clone()));
    }
    let vms = futures::future::join_all(
        c.nodes
            .iter()
            .zip(tallies)
            .map(|(n, t)| churn_vms(c, n.index, until, t)),
    );
    let (_, intervals) = tokio::join!(vms, sample_iroh(c, until));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    intervals
}

/// Reports what the churners did, per node, and checks the VMs' devices
/// came and went.
fn report_churn(ctx: &mut Ctx, tallies: &[Arc<Tally>]) {
    for (i, t) in tallies.iter().enumerate() {
        let n = i + 1;
        ctx.report.figure(
            format!("n{n} bare devices created/deleted (errors)"),
            format!(
                "{}/{} ({})",
                Tally::get(&t.devices_created),
                Tally::get(&t.devices_deleted),
                Tally::get(&t.device_errors)
            ),
        );
        ctx.report.figure(
            format!("n{n} VMs created/deleted, their veth seen/gone (errors)"),
            format!(
                "{}/{}, {}/{} ({})",
                Tally::get(&t.vms_created),
                Tally::get(&t.vms_deleted),
                Tally::get(&t.vm_devices_seen),
                Tally::get(&t.vm_devices_gone),
                Tally::get(&t.vm_errors)
            ),
        );
        let last = t.last_error.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = last.as_ref() {
            ctx.report.info(format!("n{n} last churn error: {e}"));
        }
        let ok = Tally::get(&t.device_errors) == 0
            && Tally::get(&t.vm_errors) == 0
            && Tally::get(&t.devices_created) > 0
            && Tally::get(&t.vm_devices_gone) > 0;
        ctx.report.check(
            format!("n{n}: devices and VMs churned without an error"),
            ok,
            format!(
                "{} devices, {} VMs",
                Tally::get(&t.devices_created),
                Tally::get(&t.vms_created)
            ),
        );
    }
}

/// Checks every node served and made iroh calls in every interval.
fn report_iroh(ctx: &mut Ctx, intervals: &[Interval]) {
    let mut quiet = Vec::new();
    for (k, iv) in intervals.iter().enumerate() {
        let line: Vec<String> = iv
            .iter()
            .enumerate()
            .map(|(i, (s, cl))| format!("n{} {s}/{cl}", i + 1))
            .collect();
        ctx.report.info(format!(
            "interval {}: iroh calls served/made {}",
            k + 1,
            line.join(", ")
        ));
        for (i, (s, cl)) in iv.iter().enumerate() {
            if *s <= 0.0 || *cl <= 0.0 {
                quiet.push(format!("n{} in interval {}", i + 1, k + 1));
            }
        }
    }
    ctx.report.check(
        "every node's iroh endpoint served and made calls in every interval",
        !intervals.is_empty() && quiet.is_empty(),
        if quiet.is_empty() {
            format!("{} intervals of {}s", intervals.len(), SAMPLE.as_secs())
        } else {
            format!("no iroh calls: {}", quiet.join(", "))
        },
    );
}

/// Starts the cluster with VM networking on every node.
async fn start(ctx: &mut Ctx, device_prefix: &str) -> anyhow::Result<Cluster> {
    ctx.report.step(
        "start 3 nodes in dual mode (all_except_raft prefers iroh, Raft over iroh) with [network] enabled",
    );
    let mut spec = ClusterSpec::new(
        3,
        &cluster::dual_section(&["all_except_raft"], RaftTransport::Iroh),
    );
    spec.network = network_section(device_prefix);
    let report = &mut ctx.report;
    Cluster::start(&ctx.lab, &ctx.opts.tern, spec, &mut |m| report.info(m)).await
}

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let (warm, span) = if ctx.opts.quick {
        (40, Duration::from_secs(40))
    } else {
        (200, Duration::from_secs(240))
    };
    let prefix = device_prefix(ctx.lab.prefix());
    let _sweep = VmNamespaces(prefix.clone());
    let mut c = start(ctx, &prefix).await?;
    let _workloads = Workloads(c.nodes.iter().map(|n| n.dir.clone()).collect());
    let leader = c.leader().await?;
    ctx.report.info(format!("leader n{leader}"));
    ctx.report
        .step("create a VM on the leader; start client traffic over iroh to every node");
    let vm = create_vm(&c, 1, leader, "ttc-traffic").await?;
    let traffic = c.traffic(TrafficSpec {
        transport: "iroh".into(),
        vm_id: Some(vm),
        pause: Duration::from_millis(20),
    })?;
    traffic.wait_calls(warm).await?;
    let before = c.snapshot().await;
    ctx.report.step(format!(
        "churn for {}s on every node: process VMs created and deleted through the CLI; TAP and veth devices added and deleted every 200-300 ms",
        span.as_secs()
    ));
    let tallies: Vec<Arc<Tally>> = c.nodes.iter().map(|_| Arc::default()).collect();
    let calls_at = traffic.count();
    let intervals = churn(&c, span, &tallies).await;
    let during = cluster::deltas(&c.snapshot().await, &before);
    ctx.report
        .figure("client calls during the churn", traffic.count() - calls_at);
    report_churn(ctx, &tallies);
    report_iroh(ctx, &intervals);
    finish(ctx, c, traffic, &during).await
}

/// Stops the traffic and the nodes; the figures and checks over the run.
async fn finish(
    ctx: &mut Ctx,
    mut c: Cluster,
    traffic: cluster::Traffic,
    during: &[Metrics],
) -> anyhow::Result<()> {
    ctx.report.step("stop the traffic and the nodes");
    let records = traffic.finish().await?;
    let failed = cluster::failures(&records);
    for f in failed.iter().take(5) {
        ctx.report.info(format!(
            "failed: n{} {} at {:.1}s: {}",
            f.node,
            f.method,
            f.at.as_secs_f64(),
            f.error.as_deref().unwrap_or("")
        ));
    }
    let leader_changes = cluster::sum_all(during, names::RAFT_LEADER_CHANGES, &[]);
    ctx.report.figure("client calls", records.len());
    ctx.report.figure(
        "client latency",
        cluster::latencies(&records, |_| true).summary(),
    );
    ctx.report.figure(
        "transport calls during the churn, by transport",
        cluster::by_label(during, names::CALLS, "transport"),
    );
    ctx.report.figure(
        "node-to-node calls during the churn, by transport",
        cluster::by_label(during, names::ROUTER_CALLS, "transport"),
    );
    ctx.report.figure(
        "fallbacks during the churn, by reason",
        cluster::by_label(during, names::ROUTER_FALLBACKS, "reason"),
    );
    // What iroh did and what Tern had to do about it.
    let per_node = |name: &str| -> String {
        during
            .iter()
            .enumerate()
            .map(|(i, m)| format!("n{} {}", i + 1, m.sum(name, &[])))
            .collect::<Vec<_>>()
            .join(", ")
    };
    ctx.report.figure(
        "iroh endpoint rebuilds during the churn, by node",
        per_node(names::IROH_ENDPOINT_REBUILDS),
    );
    ctx.report.figure(
        "iroh endpoint rebuilds during the churn, by reason",
        cluster::by_label(during, names::IROH_ENDPOINT_REBUILDS, "reason"),
    );
    ctx.report.figure(
        "unanswered iroh liveness probes during the churn, by node",
        per_node(names::IROH_ENDPOINT_PROBE_FAILURES),
    );
    ctx.report.check(
        "no leader change during the churn",
        leader_changes == 0.0,
        format!("{leader_changes} (sum over nodes)"),
    );
    ctx.report.check(
        "zero failed client calls",
        failed.is_empty(),
        format!("{} of {}", failed.len(), records.len()),
    );
    let unclean = c.shutdown().await;
    ctx.report.stopped_cleanly(&unclean);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_prefix_fits_the_runtime() {
        assert_eq!(device_prefix("tl1abcd"), "vabcd");
        assert_eq!(device_prefix("ab"), "vab");
        let n = network_section(&device_prefix("tl1abcd"));
        assert!(n.runtime_config().unwrap().is_some());
    }
}
