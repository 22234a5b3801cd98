//! `address-change`: an IP address changes while connected (the new
//! address is added, the old one deleted: the prefix route moves with the
//! primary address, as on a DHCP renewal). Two parts:
//!
//! - **A, the client moves**: the client namespace, calling every node
//!   over iroh and over gRPC, changes its address. QUIC connection
//!   migration is the client's to make: guarantee, iroh calls go on (the
//!   gap is reported); gRPC's TCP connections from the old address die.
//! - **B, a node moves**: a follower changes its address while the client
//!   calls it over iroh (status, health, a VM read, and a VM write it
//!   forwards to the leader over iroh) and over gRPC, and calls the other
//!   two nodes over gRPC. For connections the moved node *accepted*, QUIC
//!   has no server migration. What Tern does: the moved node sees its new
//!   address (iroh follows the interfaces) and announces it over each
//!   connection, the dialler's hole punching opens a path there, and the
//!   dialler's path selector moves to it once the old path has gone
//!   silent (`tern_transport_iroh::path_select`): the client's calls go
//!   on. The moved node also asks the leader to record its new addresses
//!   (`tern_cluster::address`), and its peers dial them anew, so Raft
//!   catches up (the applied-index lag is reported). Checked: no iroh call
//!   to the moved node fails. Then what Tern does about gRPC, which cannot
//!   follow: the moved node's gRPC listener is bound to the deleted
//!   address and peers dial the URL in the cluster membership. Tern's
//!   answer is a restart with the new address in the config; the
//!   scenario restarts the node and checks that the membership names the
//!   new address and gRPC reaches it there.
//!
//! Set-up: 3 nodes in dual mode, `prefer_iroh = ["all_except_raft"]`,
//! Raft over iroh, fallback on. Every node binds iroh to `0.0.0.0` (a
//! socket bound to the old address could not send from the new one);
//! gRPC is bound to the node's address, as a gRPC URL must name one.

use std::time::Duration;

use anyhow::Context;

use tern_transport_dual::RaftTransport;

use crate::cluster::{self, Cluster, ClusterSpec, TrafficSpec};
use crate::netns::Cidr;
use crate::scenarios::Ctx;
use crate::scenarios::udp_blocked::create_vm;

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let observe = if ctx.opts.quick {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(45)
    };
    ctx.report.step(
        "start 3 nodes (iroh bound to 0.0.0.0), dual: all_except_raft and Raft over iroh, fallback on",
    );
    let mut spec = ClusterSpec::new(
        3,
        &cluster::dual_section(&["all_except_raft"], RaftTransport::Iroh),
    );
    spec.iroh_any = true;
    let report = &mut ctx.report;
    let mut c = Cluster::start(&ctx.lab, &ctx.opts.tern, spec, &mut |m| report.info(m)).await?;
    let leader = c.leader().await?;
    let moved = c
        .indices()
        .into_iter()
        .rev()
        .find(|i| *i != leader)
        .context("no follower")?;
    let others: Vec<usize> = c.indices().into_iter().filter(|i| *i != moved).collect();
    let old = c.node(moved)?.iface.addr;
    let new = Cidr::new(
        c.switch.subnet.host(100 + u32::try_from(moved)?).addr,
        old.len,
    );
    ctx.report.info(format!(
        "leader n{leader}; n{moved} will move from {} to {}",
        old.addr, new.addr
    ));

    let vm = create_vm(&c, leader, leader, "address-change").await?;
    let spec = |transport: &str, vm: Option<String>| TrafficSpec {
        transport: transport.into(),
        vm_id: vm,
        pause: Duration::from_millis(20),
    };

    // Part A: the QUIC client moves (classic connection migration).
    ctx.report.step(format!(
        "part A: the client's address changes under iroh and gRPC traffic to every node; watch {}s",
        observe.as_secs()
    ));
    let a_iroh = c.traffic(spec("iroh", Some(vm.clone())))?;
    let a_grpc = c.traffic(spec("grpc", None))?;
    a_iroh.wait_calls(40).await?;
    a_grpc.wait_calls(20).await?;
    let client_old = c.client_iface.addr;
    let client_new = Cidr::new(c.switch.subnet.host(3).addr, client_old.len);
    let (ai, ag) = (a_iroh.now(), a_grpc.now());
    c.client_iface.addr_add(client_new)?;
    c.client_iface.addr_del(client_old)?;
    c.client_iface.addr = client_new;
    ctx.report.info(format!(
        "client moved from {} to {}",
        client_old.addr, client_new.addr
    ));
    tokio::time::sleep(observe).await;
    let (ai_end, ag_end) = (a_iroh.now(), a_grpc.now());
    let a_iroh = a_iroh.finish().await?;
    let a_grpc = a_grpc.finish().await?;
    let after = |records: &[cluster::CallRecord], from, to| -> Vec<cluster::CallRecord> {
        records
            .iter()
            .filter(|r| r.at >= from && r.at < to)
            .cloned()
            .collect()
    };
    let ai_after = after(&a_iroh, ai, ai_end);
    let ai_failed = cluster::failures(&ai_after);
    for f in ai_failed.iter().take(3) {
        ctx.report.info(format!(
            "iroh failure: n{} {}: {}",
            f.node,
            f.method,
            f.error.as_deref().unwrap_or("")
        ));
    }
    let gap = c
        .indices()
        .into_iter()
        .map(|i| cluster::longest_gap(&a_iroh, i, ai, ai_end))
        .max()
        .unwrap_or_default();
    ctx.report.figure(
        "A: longest gap between iroh answers (any node)",
        crate::report::ms(gap),
    );
    ctx.report.figure(
        "A: iroh latency after the client moved",
        cluster::latencies(&ai_after, |_| true).summary(),
    );
    let ag_after = after(&a_grpc, ag, ag_end);
    let ag_failed = cluster::failures(&ag_after).len();
    ctx.report.figure(
        "A: gRPC calls after the client moved (ok / failed)",
        format!("{} / {ag_failed}", ag_after.len() - ag_failed),
    );
    ctx.report.check(
        "A: iroh calls went on when the client's address changed (QUIC migration)",
        ai_failed.is_empty() && ai_after.len() > ai_failed.len(),
        format!(
            "{} ok, {} failed after the change",
            ai_after.len() - ai_failed.len(),
            ai_failed.len()
        ),
    );

    // Part B: a node moves.
    ctx.report.step(format!(
        "part B: client traffic: iroh and gRPC to n{moved} (to move), gRPC to the others"
    ));
    let before = c.snapshot().await;
    let iroh = c.traffic_to(spec("iroh", Some(vm.clone())), &[moved])?;
    let grpc = c.traffic_to(spec("grpc", None), &[moved])?;
    let rest = c.traffic_to(spec("grpc", Some(vm.clone())), &others)?;
    iroh.wait_calls(40).await?;
    grpc.wait_calls(20).await?;

    ctx.report.step(format!(
        "part B: n{moved}: add {new}, delete {old} (the route moves with it); watch {}s",
        observe.as_secs()
    ));
    let iface = c.node(moved)?.iface.clone();
    let (iroh_at, grpc_at) = (iroh.now(), grpc.now());
    iface.addr_add(new)?;
    iface.addr_del(old)?;
    if let Some(n) = c.nodes.get_mut(moved - 1) {
        n.iface.addr = new;
    }
    let routes = c.node(moved)?.ns.ip(&["-4", "route", "show"])?;
    ctx.report.info(format!(
        "n{moved} routes now: {}",
        String::from_utf8_lossy(&routes.stdout)
            .trim()
            .replace('\n', "; ")
    ));
    tokio::time::sleep(observe).await;
    let (iroh_end, grpc_end) = (iroh.now(), grpc.now());
    let lag = {
        let l = c.metrics(leader).await?;
        let m = c.metrics(moved).await?;
        let name = tern_protocol::metric_names::RAFT_APPLIED_INDEX;
        l.sum(name, &[]) - m.sum(name, &[])
    };

    let iroh_records = iroh.finish().await?;
    let after: Vec<_> = iroh_records
        .iter()
        .filter(|r| r.at >= iroh_at)
        .cloned()
        .collect();
    let iroh_failed = cluster::failures(&after);
    let iroh_ok = after.len() - iroh_failed.len();
    let gap = cluster::longest_gap(&iroh_records, moved, iroh_at, iroh_end);
    for f in iroh_failed.iter().take(3) {
        ctx.report.info(format!(
            "iroh call failed at +{:.1}s: {} {}",
            (f.at - iroh_at).as_secs_f64(),
            f.method,
            f.error.as_deref().unwrap_or("")
        ));
    }
    ctx.report.figure(
        "B: longest gap between iroh answers from the moved node",
        crate::report::ms(gap),
    );
    ctx.report.figure(
        "B: iroh latency to the moved node after the change",
        cluster::latencies(&after, |_| true).summary(),
    );
    ctx.report.figure(
        "B: VM writes the moved node forwarded after the change",
        after
            .iter()
            .filter(|r| r.method.starts_with("vm/st") && r.error.is_none())
            .count(),
    );
    ctx.report
        .figure("B: moved node's applied index behind the leader's", lag);
    ctx.report.check(
        "B: iroh calls to the moved node went on (no failure)",
        iroh_failed.is_empty() && iroh_ok > 0,
        format!(
            "{iroh_ok} ok, {} failed after the change",
            iroh_failed.len()
        ),
    );

    ctx.report
        .step("part B: what gRPC did; then restart the moved node with its new address");
    let grpc_records = grpc.finish().await?;
    let g_after: Vec<_> = grpc_records
        .iter()
        .filter(|r| r.at >= grpc_at && r.at < grpc_end)
        .cloned()
        .collect();
    let g_failed = cluster::failures(&g_after).len();
    ctx.report.figure(
        "B: gRPC calls to the moved node after the change (ok / failed)",
        format!("{} / {g_failed}", g_after.len() - g_failed),
    );
    if let Some(e) = cluster::failures(&g_after).first() {
        ctx.report.info(format!(
            "gRPC failure: {}",
            e.error.as_deref().unwrap_or("")
        ));
    }
    ctx.report.note(format!(
        "gRPC after the change: {} of {} calls to the moved node failed; its listener is bound to the deleted address and peers dial the URL in the membership. Tern's answer: restart the node with the new address; it re-joins under its identity and the leader records the new addresses, which peers look up per call.",
        g_failed,
        g_after.len()
    ));

    let clean = c.stop(moved).await?;
    {
        let slot = c.node(moved)?;
        let text = std::fs::read_to_string(&slot.config)?;
        std::fs::write(
            &slot.config,
            text.replace(&format!("{}:", old.addr), &format!("{}:", new.addr)),
        )?;
    }
    c.start_node(moved).await?;
    let want = format!("https://{}:{}", new.addr, cluster::GRPC_PORT);
    let deadline = std::time::Instant::now() + cluster::CONVERGE_BOUND;
    let mut recorded = false;
    while std::time::Instant::now() < deadline {
        if let Ok(s) = c.status(leader).await
            && s["members"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["grpc"] == want.as_str()))
        {
            recorded = true;
            break;
        }
        tokio::time::sleep(cluster::POLL).await;
    }
    ctx.report.check(
        "B: after a restart the membership records the new gRPC address",
        recorded,
        format!("{want} (stopped cleanly: {clean})"),
    );
    let again = c.traffic_to(spec("grpc", Some(vm.clone())), &[moved])?;
    again.wait_calls(20).await?;
    let again = again.finish().await?;
    let again_failed = cluster::failures(&again).len();
    ctx.report.check(
        "B: gRPC reaches the restarted node at its new address",
        again_failed == 0 && !again.is_empty(),
        format!("{} ok, {again_failed} failed", again.len() - again_failed),
    );

    ctx.report.step("stop the traffic and the nodes");
    let rest = rest.finish().await?;
    let rest_failed = cluster::failures(&rest);
    for f in rest_failed.iter().take(3) {
        ctx.report.info(format!(
            "other node's call failed: n{} {}: {}",
            f.node,
            f.method,
            f.error.as_deref().unwrap_or("")
        ));
    }
    let d = cluster::deltas(&c.snapshot().await, &before);
    ctx.report.figure(
        "B: elections started / leader changes seen (sum over nodes)",
        format!(
            "{} / {}",
            cluster::sum_all(&d, tern_protocol::metric_names::RAFT_ELECTIONS, &[]),
            cluster::sum_all(&d, tern_protocol::metric_names::RAFT_LEADER_CHANGES, &[])
        ),
    );
    ctx.report.check(
        "B: the other nodes served every call",
        rest_failed.is_empty(),
        format!("{} of {}", rest_failed.len(), rest.len()),
    );
    let unclean = c.shutdown().await;
    ctx.report.stopped_cleanly(&unclean);
    Ok(())
}
