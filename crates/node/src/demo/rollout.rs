//! The demo's rollout: the shipped default plan (or `--plan FILE`) with
//! every stage's soak set to `--soak` seconds, started and followed
//! through the calls `tern rollout` makes, then every node rolled back
//! with `rollback --all` and checked back on its pre-rollout policy.

use std::path::Path;
use std::time::{Duration, Instant};

use tern_protocol::catalog::methods;
use tern_protocol::pb;
use tern_state::Plan;

use super::{DemoError, Live, REFRESH};
use crate::cli::policy_line;
use crate::rollout_cli::{parse_plan, request};

/// The plan the operators ship, `deploy/rollout/default.toml`, built in.
pub const DEFAULT_PLAN: &str = include_str!("../../../../deploy/rollout/default.toml");

/// The default soak of each stage in the demo, seconds.
pub const DEFAULT_SOAK_SECS: u64 = 8;

/// The longest soak `--soak` takes, seconds.
pub const MAX_DEMO_SOAK_SECS: u64 = 600;

/// How long past its soaks a stage may take before the demo stops
/// waiting (the leader's judgement, a hold and a new window).
pub const STAGE_SLACK: Duration = Duration::from_secs(45);

/// How long the nodes get to return to their pre-rollout policies.
pub const ROLLBACK_WAIT: Duration = Duration::from_secs(60);

/// The plan the demo runs: `path`'s or the default, every soak set to
/// `soak_secs`, checked again after.
pub fn demo_plan(path: Option<&Path>, soak_secs: u64) -> Result<Plan, DemoError> {
    if !(1..=MAX_DEMO_SOAK_SECS).contains(&soak_secs) {
        return Err(DemoError::Soak(soak_secs));
    }
    let plan = match path {
        Some(p) => crate::rollout_cli::load_plan(p)?,
        None => parse_plan(DEFAULT_PLAN, "deploy/rollout/default.toml")?,
    }
    .with_soak(Duration::from_secs(soak_secs));
    plan.check()
        .map_err(|e| DemoError::Plan(format!("with --soak {soak_secs}: {e}")))?;
    Ok(plan)
}

/// How a rollout ended, for the demo's summary.
pub enum Ended {
    /// `done`, `rolled back` or `aborted`: the rollout as last read.
    Over(Box<pb::RolloutResponse>),
    /// The demo stopped waiting; why.
    TimedOut(String),
    /// Ctrl-C or SIGTERM.
    Interrupted,
}

/// A node's policy in force and its source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InForce {
    /// What must match after the rollback: the node, the mode, the
    /// services preferred over iroh, Raft's transport and the source
    /// (`fallback_to_grpc` is left out: it means nothing under `grpc`,
    /// and the default policy's value differs between a node's start and
    /// its return from the rollout layer).
    key: (u64, String, Vec<String>, String, String),
    /// For people.
    line: String,
}

/// Each node's policy in force and its source.
async fn policies(live: &Live) -> Vec<Option<InForce>> {
    let mut out = Vec::new();
    for c in &live.conns {
        let s = c
            .call::<_, pb::NodeStatus>(methods::STATUS_GET, &pb::StatusRequest {})
            .await;
        out.push(s.ok().map(|s| {
            let p = s.policy.clone().unwrap_or_default();
            InForce {
                line: format!(
                    "node {}: {} (from {})",
                    s.node_id,
                    policy_line(&p),
                    s.policy_source
                ),
                key: (
                    s.node_id,
                    p.mode,
                    p.prefer_iroh,
                    p.raft_transport,
                    s.policy_source,
                ),
            }
        }));
    }
    out
}

fn lines(p: &[Option<InForce>]) -> String {
    p.iter()
        .map(|x| {
            x.as_ref()
                .map_or("a node did not answer", |x| x.line.as_str())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Starts `plan`, shows it until it is over, then rolls every node back
/// and waits until each runs its pre-rollout policy again.
pub async fn run(live: &mut Live, plan: &Plan) -> Result<bool, DemoError> {
    let before = policies(live).await;
    let first = &live.conns[0];
    request(first, "start", Some(plan)).await?;
    println!(
        "\nstarted rollout \"{}\": {} stages, each soaked {} s, judged by the gates",
        plan.name,
        plan.stages.len(),
        plan.stages.first().map_or(0, |s| s.soak_secs)
    );
    let soaks: u64 = plan.stages.iter().map(|s| s.soak_secs).sum();
    let wait = Duration::from_secs(soaks) + STAGE_SLACK * plan.stages.len() as u32;
    let ended = follow(live, wait).await?;
    let interrupted = matches!(ended, Ended::Interrupted);
    summary(&ended);
    if interrupted {
        return Ok(false);
    }
    let in_force = match &ended {
        Ended::Over(r) => r.stage.is_some(),
        _ => true,
    };
    if in_force {
        let r = request(&live.conns[0], "rollback-all", None).await?;
        println!(
            "\nrollback --all: status {}; waiting for every node's pre-rollout policy",
            r.status
        );
    } else {
        println!(
            "\nno stage is in force (the gates rolled the first stage back): nothing to roll back"
        );
    }
    back(live, &before).await
}

/// Frames until the rollout is over (or `wait` passed, or a signal).
async fn follow(live: &mut Live, wait: Duration) -> Result<Ended, DemoError> {
    let deadline = Instant::now() + wait;
    loop {
        let r = live.frame("the default plan, live").await;
        if let Some(r) = r.filter(|r| {
            r.present && matches!(r.status.as_str(), "done" | "rolled back" | "aborted")
        }) {
            return Ok(Ended::Over(Box::new(r)));
        }
        if Instant::now() >= deadline {
            return Ok(Ended::TimedOut(format!(
                "the rollout did not end within {} s (see the gates and decisions above)",
                wait.as_secs()
            )));
        }
        if live.stop.wait(REFRESH).await {
            return Ok(Ended::Interrupted);
        }
    }
}

fn summary(ended: &Ended) {
    match ended {
        Ended::Over(r) if r.status == "done" => {
            println!(
                "\nrollout: done: every stage passed its gates; the last stage's policy is in force"
            );
        }
        Ended::Over(r) => {
            let why = r
                .history
                .last()
                .map_or_else(String::new, crate::rollout_cli::decision_line);
            println!("\nrollout: {}: {why}", r.status);
        }
        Ended::TimedOut(why) => println!("\nrollout: stopped waiting: {why}"),
        Ended::Interrupted => println!("\nrollout: interrupted"),
    }
}

/// Frames until every node runs `before` again; true when it does.
async fn back(live: &mut Live, before: &[Option<InForce>]) -> Result<bool, DemoError> {
    let deadline = Instant::now() + ROLLBACK_WAIT;
    loop {
        live.frame("rolling every node back").await;
        let now = policies(live).await;
        let same = now.len() == before.len()
            && now.iter().zip(before).all(|(n, b)| match (n, b) {
                (Some(n), Some(b)) => n.key == b.key,
                _ => false,
            });
        if same {
            println!("\nrollback --all: every node is back on its pre-rollout policy:");
            for p in now.iter().flatten() {
                println!("  {}", p.line);
            }
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Err(DemoError::Rollback {
                before: lines(before),
                now: lines(&now),
            });
        }
        if live.stop.wait(REFRESH).await {
            return Ok(false);
        }
    }
}
