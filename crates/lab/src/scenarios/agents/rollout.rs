//! The `agents` scenario's last step: the rollout drill across servers
//! and agents.
//!
//! The product's `tern rollout` (the operators' default plan with its
//! soaks compressed and the lab's P99 allowance, the `rollout` scenario's
//! `write_plan`) walks the whole fleet, 3 servers and every agent: a
//! stage's share counts agents, and the leader's gates read each covered
//! agent's metrics (a covered node whose figures are missing makes the
//! stage hold, never advance). The step checks, at every stage, that the
//! covered agents run a policy of that stage and that every VM still runs
//! exactly once where it ran; at the end that every agent runs `mode =
//! "iroh"`; then `tern rollout rollback --all` brings every server and
//! agent back to gRPC.
//!
//! **The fault run**: the plan again; at stage 2 (all but Raft over iroh,
//! so an agent's heartbeats and reports go over iroh) UDP is dropped on a
//! covered agent. Its calls to the servers find the iroh path dead and
//! fall back to gRPC (unplanned), the leader's `fallbacks` gate fails on
//! the agent's figures and the cluster rolls the stage back by itself.
//! Checked: the status becomes `rolled back` to stage 1, the history
//! names the gate and the agent's node id, the agent leaves stage 2's
//! policy, and every VM still runs exactly once (where it ran before, or
//! moved: how many moved is reported).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use super::settled;
use crate::cluster::{Cluster, Who};
use crate::report::Report;
use crate::scenarios::Ctx;
use crate::scenarios::rollout::{
    FAULT_STAGE, Policy, block_udp_until_rolled_back, fault_history, follow, history, pick_canary,
    roll_all_back, to_fault_stage, walk_bound, write_plan,
};

/// Every stage's soak in a quick run (CI).
const QUICK_SOAK: Duration = Duration::from_secs(5);
/// Every stage's soak in a full run.
const FULL_SOAK: Duration = Duration::from_secs(15);

/// What the drill works with.
struct Drill<'a> {
    c: &'a Cluster,
    /// The scenario's VMs.
    ids: &'a [String],
    /// Agent index (1-based) → node id.
    agent_ids: &'a BTreeMap<usize, u64>,
    /// Where every VM runs before the drill.
    placed: &'a BTreeMap<String, u64>,
    plan: String,
    bound: Duration,
}

impl Drill<'_> {
    /// The agents (1-based index, node id) the rollout status covers.
    fn covered_agents(&self, status: &Value) -> Vec<(usize, u64)> {
        let covered: Vec<u64> = status["covered"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        self.agent_ids
            .iter()
            .filter(|(_, id)| covered.contains(id))
            .map(|(k, id)| (*k, *id))
            .collect()
    }

    /// Node ids of agents `1..=n`, in order (`pick_canary`'s list).
    fn id_list(&self) -> Vec<Option<u64>> {
        (1..=self.c.agents.len())
            .map(|k| self.agent_ids.get(&k).copied())
            .collect()
    }
}

/// Runs the step: the clean walk, the rollback, the fault run, the
/// rollback again.
pub(super) async fn across_agents(
    ctx: &mut Ctx,
    c: &Cluster,
    ids: &[String],
    agent_ids: &BTreeMap<usize, u64>,
    placed: &BTreeMap<String, u64>,
) -> anyhow::Result<()> {
    let soak = if ctx.opts.quick {
        QUICK_SOAK
    } else {
        FULL_SOAK
    };
    let plan = write_plan(ctx.lab.dir(), soak)?;
    let d = Drill {
        c,
        ids,
        agent_ids,
        placed,
        plan: plan.display().to_string(),
        bound: walk_bound(soak),
    };
    let report = &mut ctx.report;
    walk(&d, report).await?;
    roll_all_back(c, |_| {}, report).await?;
    unmoved(&d, report, "after rollback --all").await?;
    fault(&d, report).await?;
    roll_all_back(c, |_| {}, report).await?;
    let now = settled(c, 1, ids, &[], &[]).await?;
    report.check(
        "after the fault run's rollback --all: every VM runs once",
        now.len() == ids.len(),
        format!("{} VMs", now.len()),
    );
    Ok(())
}

/// Checks every VM runs exactly once where it ran before the drill.
async fn unmoved(d: &Drill<'_>, report: &mut Report, when: &str) -> anyhow::Result<()> {
    let now = settled(d.c, 1, d.ids, &[], &[]).await?;
    report.check(
        format!("{when}: every VM runs once, none moved"),
        now == *d.placed,
        format!("{} VMs", now.len()),
    );
    Ok(())
}

/// Whether `p` (`tern transport show --json`) is the policy of stage
/// `stage` of the default plan or of a later one (the driver may advance
/// while the lab looks).
fn runs_stage(p: &Value, stage: u64) -> bool {
    (stage..4).any(|s| {
        let want = Policy::of_stage(s).section();
        let mode = want.mode.as_str();
        p["mode"] == mode
            && (mode != "dual" || p["prefer_iroh"] == serde_json::json!(want.migration.prefer_iroh))
    })
}

/// Waits until agent `k` runs a policy of stage `stage` or a later one.
async fn agent_on(c: &Cluster, k: usize, stage: u64) -> anyhow::Result<Value> {
    c.wait_policy_of(Who::Agent(k), |p| runs_stage(p, stage))
        .await
}

/// The clean walk: every stage reached, its covered agents on its policy,
/// no VM moved; `done` with a start and four advances; every agent on
/// iroh.
async fn walk(d: &Drill<'_>, report: &mut Report) -> anyhow::Result<()> {
    let n = d.c.agents.len();
    report.step(format!(
        "tern rollout start across {} servers and {n} agents (the default plan, soaks compressed)",
        d.c.nodes.len()
    ));
    d.c.cli(1, &["rollout", "start", &d.plan]).await?;
    for stage in 0..4u64 {
        let s = follow(
            d.c,
            |_| {},
            1,
            d.bound,
            "reach the next stage",
            |s| s["stage"].as_u64() == Some(stage) || s["status"] != "running",
        )
        .await?;
        if s["status"] != "running" {
            bail!("the rollout left running at stage {stage}: {s}");
        }
        let covered = s["covered"].as_array().map_or(0, Vec::len);
        let agents = d.covered_agents(&s);
        for (k, _) in &agents {
            agent_on(d.c, *k, stage).await?;
        }
        report.info(format!(
            "stage {stage}: {} on {covered} nodes, {} of them agents, each on the stage's policy",
            s["stage_name"].as_str().unwrap_or("?"),
            agents.len()
        ));
        unmoved(d, report, &format!("stage {stage}")).await?;
    }
    let s = follow(
        d.c,
        |_| {},
        1,
        d.bound,
        "finish",
        |s| s["status"] != "running",
    )
    .await?;
    report.check(
        "the rollout across agents ends done",
        s["status"] == "done",
        &s["status"],
    );
    let h = history(d.c, 2).await?;
    let kinds: Vec<&str> = h.iter().filter_map(|d| d["decision"].as_str()).collect();
    report.check(
        "its history: a start and four advances (the gates read every covered agent)",
        kinds == ["start", "advance", "advance", "advance", "advance"],
        kinds.join(", "),
    );
    let mut on_iroh = 0;
    for k in 1..=n {
        if agent_on(d.c, k, 3).await.is_ok() {
            on_iroh += 1;
        }
    }
    report.check(
        "every agent runs mode = \"iroh\" (its transport show)",
        on_iroh == n,
        format!("{on_iroh} of {n}"),
    );
    Ok(())
}

/// The fault run: UDP dropped on an agent covered by [`FAULT_STAGE`]; the
/// cluster rolls the stage back by itself.
async fn fault(d: &Drill<'_>, report: &mut Report) -> anyhow::Result<()> {
    report.step(format!(
        "fault run: the plan again; UDP blocked on an agent covered by stage {FAULT_STAGE}"
    ));
    let s = to_fault_stage(d.c, &d.plan, |_| {}, d.bound).await?;
    let (canary, k) =
        pick_canary(&s, None, &d.id_list()).context("no agent covered by the fault stage")?;
    // Blocked once it runs the stage's policy, so its calls use iroh.
    agent_on(d.c, k, FAULT_STAGE).await?;
    report.info(format!("agent a{k} is node id {canary}"));
    block_udp_until_rolled_back(d.c, Who::Agent(k), |_| {}, d.bound, report).await?;
    fault_history(d.c, report, canary).await?;
    let left =
        d.c.wait_policy_of(Who::Agent(k), |p| !runs_stage(p, FAULT_STAGE))
            .await;
    report.check(
        "fault: the agent left stage 2's policy",
        left.is_ok(),
        left.map_or_else(|e| format!("{e:#}"), |p| p.to_string()),
    );
    let now = settled(d.c, 1, d.ids, &[], &[]).await?;
    let moved = now
        .iter()
        .filter(|(id, n)| d.placed.get(*id) != Some(n))
        .count();
    report.check(
        "fault: every VM runs once",
        now.len() == d.ids.len(),
        format!("{} VMs, {moved} moved", now.len()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_is_of_a_stage_or_a_later_one() {
        let shown = |s: u64| {
            let p = Policy::of_stage(s).section();
            serde_json::json!({
                "mode": p.mode.as_str(),
                "prefer_iroh": p.migration.prefer_iroh,
                "raft_transport": "grpc",
                "fallback_to_grpc": true,
            })
        };
        for s in 0..4 {
            assert!(runs_stage(&shown(s), s), "stage {s}");
            assert!(runs_stage(&shown(3), s), "iroh is past stage {s}");
        }
        assert!(!runs_stage(&shown(1), 2));
        assert!(!runs_stage(&shown(0), 1));
        let grpc = serde_json::json!({"mode": "grpc", "prefer_iroh": []});
        assert!((0..4).all(|s| !runs_stage(&grpc, s)));
    }
}
