//! `smoke`: the lab's own check. A 3-node dual cluster forms in
//! namespaces on one switch; the client namespace calls every node over
//! gRPC and over iroh; every node stops cleanly. It exercises every part
//! of the core (topology, configs, join, status, metrics, traffic,
//! cleanup) in well under a minute.

use std::time::Duration;

use tern_transport_dual::RaftTransport;

use crate::cluster::{self, Cluster, ClusterSpec, TrafficSpec};
use crate::scenarios::Ctx;

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let calls = if ctx.opts.quick { 20 } else { 100 };
    ctx.report
        .step("start a 3-node dual cluster (all_except_raft, Raft over iroh)");
    let spec = ClusterSpec::new(
        3,
        &cluster::dual_section(&["all_except_raft"], RaftTransport::Iroh),
    );
    let report = &mut ctx.report;
    let mut c = Cluster::start(&ctx.lab, &ctx.opts.tern, spec, &mut |m| report.info(m)).await?;
    let leader = c.leader().await?;
    ctx.report.figure("leader", format!("n{leader}"));

    for transport in ["grpc", "iroh"] {
        ctx.report.step(format!(
            "{calls} client calls over {transport} to every node"
        ));
        let t = c.traffic(TrafficSpec {
            transport: transport.into(),
            vm_id: None,
            pause: Duration::ZERO,
        })?;
        t.wait_calls(calls).await?;
        let records = t.finish().await?;
        let failed = cluster::failures(&records);
        ctx.report.figure(
            format!("latency over {transport}"),
            cluster::latencies(&records, |_| true).summary(),
        );
        ctx.report.check(
            format!("no failed call over {transport}"),
            failed.is_empty(),
            format!("{} of {}", failed.len(), records.len()),
        );
    }

    ctx.report.step("read /metrics of every node");
    let mut served = 0.0;
    for i in c.indices() {
        let m = c.metrics(i).await?;
        served += m.sum(
            tern_protocol::metric_names::CALLS,
            &[("side", "server"), ("transport", "iroh")],
        );
    }
    ctx.report
        .check("nodes served calls over iroh", served > 0.0, served);

    ctx.report.step("stop every node");
    let unclean = c.shutdown().await;
    ctx.report.stopped_cleanly(&unclean);
    Ok(())
}
