//! The transport rollout: a replicated plan of stages, the stage in force,
//! the nodes it covers, and the history of every decision.
//!
//! # The plan
//!
//! A [`Plan`] is a list of [`Stage`]s, each a transport policy for a share
//! of the members (`percent`) or for named nodes (`nodes`), with a minimum
//! soak (`soak_secs`), and the plan's [`Gates`]: the operators' success
//! criteria as numbers. [`Plan::check`] validates it; an error names the
//! stage index and the key ([`PlanError`]). The operators' four stages ship
//! as `deploy/rollout/default.toml`.
//!
//! # The rollout layer
//!
//! The nodes a rollout covers run the policy of its stage in force through
//! a layer of their own in the desired-policy precedence,
//! **node > rollout > group > all** ([`ClusterState::desired_policy`]).
//! The layer is
//! separate rather than written into the node-level policies so that:
//! a rollback is clearing the layer (nothing has to be remembered and
//! restored, and a node returns to exactly the policy the operator had set
//! for it, its group or all); an operator's node-level policy still beats
//! the rollout (the manual override of one node keeps working); and the
//! node's file pin beats both, without quorum.
//!
//! Stages are cumulative: stage `k` covers the nodes of stage `k - 1` and
//! more, up to `ceil(percent × members / 100)` (at least one) or the
//! named nodes, and every covered node runs stage `k`'s policy. Canaries
//! are picked deterministically at apply ([`pick`]): round-robin across
//! the values of the `zone` label (nodes without one form their own
//! group), lowest node id first within a zone, and the nodes the proposer
//! names as `last` (the leader, nodes it finds unhealthy) after all others.
//!
//! # Decisions
//!
//! Every change of the rollout is a [`Decision`] in its bounded history
//! (at most [`MAX_HISTORY`], oldest dropped), with the proposer's time,
//! the stage, what was decided, why, and the gate figures behind it. A
//! decision proposed by the leader's driver carries the sequence number
//! it expects ([`RolloutOp`]'s `expected_seq`): a proposal made on a stale
//! view (a second leader's, a retried one) is refused, so a decision is
//! taken once even across a leader failover.
//!
//! Statuses: `running` (soaking the stage in force), `paused` (an operator
//! stopped the clock: nothing advances or rolls back by itself), `holding`
//! (the gates could not be judged, e.g. a covered node's figures were
//! missing: the stage stays, and is judged again), `rolled back` (the
//! gates failed and the rollout went back to its last good stage, or an
//! operator rolled every node back with `rollback --all`), `done` (the
//! last stage passed; its policy stays in force), `aborted` (an operator
//! stopped it at the last good stage).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};
use tern_protocol::policy::TransportConfig;

use crate::command::{Rejection, Response};
use crate::member::NodeId;
use crate::policy::check_policy;
use crate::state::ClusterState;

/// Most stages a plan may have.
pub const MAX_STAGES: usize = 16;

/// Most nodes a stage may name.
pub const MAX_STAGE_NODES: usize = 64;

/// Longest plan or stage name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Longest soak a stage may ask for: a week, in seconds.
pub const MAX_SOAK_SECS: u64 = 7 * 24 * 3600;

/// Most decisions the history keeps (oldest dropped).
pub const MAX_HISTORY: usize = 128;

/// Longest reason a decision records, in bytes (longer ones are cut).
pub const MAX_REASON_LEN: usize = 512;

/// Most gate checks a decision records (there are six gates).
pub const MAX_CHECKS: usize = 16;

/// The label whose values canaries are spread across.
pub const ZONE_LABEL: &str = "zone";

/// A rollout plan, as written in `PLAN.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// A name for people (`default`).
    pub name: String,
    /// The success criteria every stage is judged by.
    #[serde(default)]
    pub gates: Gates,
    /// The stages, in order.
    #[serde(rename = "stage")]
    pub stages: Vec<Stage>,
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// A name for people (`5% dual health+status`).
    pub name: String,
    /// The share of the members the stage covers, 1 to 100 (cumulative:
    /// at least the nodes of the stage before). Exactly one of `percent`
    /// and `nodes`.
    #[serde(default)]
    pub percent: Option<u8>,
    /// The nodes the stage covers (with those of the stages before).
    #[serde(default)]
    pub nodes: Vec<NodeId>,
    /// The minimum time the stage runs before it is judged, seconds.
    pub soak_secs: u64,
    /// The policy the covered nodes run, as the config file's
    /// `[transport]` section.
    pub policy: TransportConfig,
}

/// The success criteria, as integers so the state stays exact and
/// comparable (the figures they judge are integers too, see
/// [`GateFigures`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gates {
    /// How far the iroh error rate may exceed the gRPC one measured on
    /// the same nodes in the same window, in calls per million (1000 =
    /// 0.1 percentage points, the lab's `ERROR_RATE_SLACK`).
    pub error_rate_slack_ppm: u32,
    /// The P99 latency allowance over gRPC's, percent (10: P99 ≤ 1.10×).
    pub p99_allowance_pct: u32,
    /// The least share of direct (not relayed) iroh paths, percent, where
    /// relays are configured.
    pub direct_min_pct: u32,
    /// Most **unplanned** router fallbacks to gRPC in a stage's window:
    /// those where the iroh path failed (connect, handshake, a broken
    /// connection or stream, a path that stopped answering pings as when
    /// UDP is blocked). A call that missed its deadline on a loaded machine
    /// and was sent again over gRPC, one sent while the breaker cooled
    /// down, a local limit, a node shutting down or without iroh are
    /// planned and not counted (`tern_protocol::metric_names::
    /// fallback_is_unplanned` classes the `reason` label; see
    /// docs/operations.md, "What counts as an unplanned rollback or
    /// fallback").
    pub max_fallbacks: u64,
    /// Most Raft leader changes in a stage's window (summed over the
    /// covered nodes; a spike fails the stage).
    pub max_leader_changes: u64,
    /// Fewest calls on each transport before latency and error rates are
    /// compared; below it those two gates are reported as not measured
    /// and do not fail the stage.
    pub min_calls: u64,
}

impl Default for Gates {
    fn default() -> Gates {
        Gates {
            error_rate_slack_ppm: 1000,
            p99_allowance_pct: 10,
            direct_min_pct: 95,
            max_fallbacks: 0,
            max_leader_changes: 1,
            min_calls: 100,
        }
    }
}

/// A plan that is not valid: the stage (if any) and key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{key}: {reason}", stage.map(|i| format!("stage {i}: ")).unwrap_or_default())]
pub struct PlanError {
    /// The index of the stage at fault (0-based), `None` for the plan.
    pub stage: Option<usize>,
    /// The key (`percent`, `policy.transport.mode`, ...).
    pub key: String,
    /// Why.
    pub reason: String,
}

fn plan_error(stage: Option<usize>, key: &str, reason: impl Into<String>) -> PlanError {
    PlanError {
        stage,
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn check_name(stage: Option<usize>, name: &str) -> Result<(), PlanError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(plan_error(
            stage,
            "name",
            format!("1 to {MAX_NAME_LEN} bytes without control characters"),
        ));
    }
    Ok(())
}

impl Plan {
    /// The plan with every stage's soak set to `soak`, whole seconds
    /// (rounded down, at most [`MAX_SOAK_SECS`]; at least one second).
    ///
    /// For rehearsals: the demo and the lab run the operators' default
    /// plan (`deploy/rollout/default.toml`, a day per stage) with soaks of
    /// seconds. Everything else (stages, policies, gates) is kept, and the
    /// result is still to be [`Plan::check`]ed like any plan.
    pub fn with_soak(mut self, soak: std::time::Duration) -> Plan {
        let secs = soak.as_secs().clamp(1, MAX_SOAK_SECS);
        for s in &mut self.stages {
            s.soak_secs = secs;
        }
        self
    }

    /// Checks the plan: 1 to [`MAX_STAGES`] stages, each with a name,
    /// exactly one of `percent` (1 to 100, not below the stage before) and
    /// `nodes` (1 to [`MAX_STAGE_NODES`], no repeats), a soak of at most
    /// [`MAX_SOAK_SECS`], and a policy the config file would accept.
    /// Whether named nodes are members is checked at apply.
    pub fn check(&self) -> Result<(), PlanError> {
        check_name(None, &self.name)?;
        if self.stages.is_empty() || self.stages.len() > MAX_STAGES {
            return Err(plan_error(
                None,
                "stage",
                format!("{} stages; 1 to {MAX_STAGES}", self.stages.len()),
            ));
        }
        if self.gates.p99_allowance_pct > 1000 || self.gates.direct_min_pct > 100 {
            return Err(plan_error(
                None,
                "gates",
                "p99_allowance_pct is at most 1000 and direct_min_pct at most 100",
            ));
        }
        let mut last_percent = 0;
        for (i, s) in self.stages.iter().enumerate() {
            let at = Some(i);
            check_name(at, &s.name)?;
            match (s.percent, s.nodes.is_empty()) {
                (Some(_), false) | (None, true) => {
                    return Err(plan_error(
                        at,
                        "percent",
                        "give exactly one of percent and nodes",
                    ));
                }
                (Some(p), true) => {
                    if !(1..=100).contains(&p) {
                        return Err(plan_error(at, "percent", format!("{p}; 1 to 100")));
                    }
                    if p < last_percent {
                        return Err(plan_error(
                            at,
                            "percent",
                            format!(
                                "{p} is below the stage before's {last_percent}: stages only grow"
                            ),
                        ));
                    }
                    last_percent = p;
                }
                (None, false) => {
                    let distinct: BTreeSet<_> = s.nodes.iter().collect();
                    if s.nodes.len() > MAX_STAGE_NODES || distinct.len() != s.nodes.len() {
                        return Err(plan_error(
                            at,
                            "nodes",
                            format!("1 to {MAX_STAGE_NODES} distinct node ids"),
                        ));
                    }
                }
            }
            if s.soak_secs > MAX_SOAK_SECS {
                return Err(plan_error(
                    at,
                    "soak_secs",
                    format!("{}; at most {MAX_SOAK_SECS}", s.soak_secs),
                ));
            }
            if let Err(e) = check_policy(&s.policy) {
                return Err(plan_error(at, &format!("policy.{}", e.key), e.reason));
            }
        }
        Ok(())
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutStatus {
    /// Soaking the stage in force.
    Running,
    /// Stopped by an operator: nothing moves by itself.
    Paused,
    /// The gates could not be judged; the stage stays and is judged again.
    Holding,
    /// Went back to its last good stage (gates failed), or every node went
    /// back (`rollback --all`).
    RolledBack,
    /// The last stage passed.
    Done,
    /// Stopped by an operator at its last good stage.
    Aborted,
}

impl RolloutStatus {
    /// The word for people and `--json`.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Running => "running",
            RolloutStatus::Paused => "paused",
            RolloutStatus::Holding => "holding",
            RolloutStatus::RolledBack => "rolled back",
            RolloutStatus::Done => "done",
            RolloutStatus::Aborted => "aborted",
        }
    }

    /// Whether the rollout has ended (a new one may start).
    pub fn is_over(self) -> bool {
        matches!(
            self,
            RolloutStatus::RolledBack | RolloutStatus::Done | RolloutStatus::Aborted
        )
    }
}

impl fmt::Display for RolloutStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The figures a stage is judged by, over its window, summed over the
/// nodes it covers. Integers: latencies in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateFigures {
    /// Calls over gRPC (made and served), Raft's apart: a Raft call that
    /// missed its deadline on a loaded machine is sent again by Raft, not
    /// an error of the stage (the leader-change and fallback gates judge
    /// Raft). So are the other three call and error counts.
    pub grpc_calls: u64,
    /// Of them, transport errors.
    pub grpc_errors: u64,
    /// Calls over iroh.
    pub iroh_calls: u64,
    /// Of them, transport errors.
    pub iroh_errors: u64,
    /// P99 of the calls served over gRPC, µs (`None`: none served).
    pub grpc_p99_us: Option<u64>,
    /// P99 of the calls served over iroh, µs.
    pub iroh_p99_us: Option<u64>,
    /// Direct and total iroh paths, where relays are configured (`None`:
    /// no relay configured, the gate does not apply).
    pub paths: Option<(u64, u64)>,
    /// Unplanned router fallbacks to gRPC (see [`Gates::max_fallbacks`]).
    pub fallbacks: u64,
    /// Raft leader changes.
    pub leader_changes: u64,
    /// The covered nodes whose figures were missing or stale.
    pub missing: Vec<NodeId>,
}

/// One gate's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateCheck {
    /// `error rate`, `p99`, `direct paths`, `fallbacks`, `leader changes`,
    /// `figures`.
    pub gate: String,
    /// Whether it held (a gate not measured holds).
    pub ok: bool,
    /// The figures behind it, in words.
    pub detail: String,
}

/// What the gates say about a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Every gate held with every covered node's figures: advance.
    Pass,
    /// Some covered node's figures are missing: hold (never advance on a
    /// partial view; a partition never advances a stage).
    Hold,
    /// A gate failed: roll back.
    Fail,
}

fn ppm(errors: u64, calls: u64) -> u64 {
    if calls == 0 {
        0
    } else {
        (u128::from(errors) * 1_000_000 / u128::from(calls)) as u64
    }
}

/// The error-rate and P99 checks: iroh against gRPC on the same nodes in
/// the same window, once each carried `min_calls`.
fn rate_checks(gates: &Gates, f: &GateFigures) -> Vec<GateCheck> {
    let measured = f.grpc_calls >= gates.min_calls && f.iroh_calls >= gates.min_calls;
    let (g, i) = (
        ppm(f.grpc_errors, f.grpc_calls),
        ppm(f.iroh_errors, f.iroh_calls),
    );
    let slack = u64::from(gates.error_rate_slack_ppm);
    let error_rate = GateCheck {
        gate: "error rate".to_owned(),
        ok: !measured || i <= g.saturating_add(slack),
        detail: if measured {
            format!(
                "iroh {} of {} calls ({i} ppm) vs grpc {} of {} ({g} ppm), allowed +{slack} ppm",
                f.iroh_errors, f.iroh_calls, f.grpc_errors, f.grpc_calls
            )
        } else {
            format!(
                "not measured: {} grpc and {} iroh calls, {} needed on each",
                f.grpc_calls, f.iroh_calls, gates.min_calls
            )
        },
    };
    let allowance = u128::from(gates.p99_allowance_pct);
    let (ok, detail) = match (measured, f.grpc_p99_us, f.iroh_p99_us) {
        (true, Some(b), Some(s)) => (
            u128::from(s) * 100 <= u128::from(b) * (100 + allowance),
            format!("iroh {s} us vs grpc {b} us, allowed +{allowance}%"),
        ),
        _ => (true, "not measured".to_owned()),
    };
    let p99 = GateCheck {
        gate: "p99".to_owned(),
        ok,
        detail,
    };
    vec![error_rate, p99]
}

/// Judges a stage's figures by the gates. Pure: the same figures give the
/// same verdict on every node, and the checks are recorded with the
/// decision.
pub fn evaluate(gates: &Gates, f: &GateFigures) -> (Verdict, Vec<GateCheck>) {
    let mut checks = rate_checks(gates, f);
    let mut check = |gate: &str, ok: bool, detail: String| {
        checks.push(GateCheck {
            gate: gate.to_owned(),
            ok,
            detail,
        })
    };
    match f.paths {
        Some((direct, total)) if total > 0 => check(
            "direct paths",
            direct * 100 >= total * u64::from(gates.direct_min_pct),
            format!(
                "{direct} of {total} direct, at least {}% needed",
                gates.direct_min_pct
            ),
        ),
        _ => check("direct paths", true, "no relay configured".to_owned()),
    }
    check(
        "fallbacks",
        f.fallbacks <= gates.max_fallbacks,
        format!("{} (at most {})", f.fallbacks, gates.max_fallbacks),
    );
    check(
        "leader changes",
        f.leader_changes <= gates.max_leader_changes,
        format!(
            "{} (at most {})",
            f.leader_changes, gates.max_leader_changes
        ),
    );
    let verdict = if checks.iter().any(|c| !c.ok) {
        Verdict::Fail
    } else if !f.missing.is_empty() {
        Verdict::Hold
    } else {
        Verdict::Pass
    };
    if !f.missing.is_empty() {
        let ids: Vec<String> = f.missing.iter().map(ToString::to_string).collect();
        checks.push(GateCheck {
            gate: "figures".to_owned(),
            ok: false,
            detail: format!("missing from node {}", ids.join(", ")),
        });
    }
    (verdict, checks)
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DecisionKind {
    /// Started the rollout at its first stage.
    Start,
    /// Moved to the next stage (or finished).
    Advance,
    /// Kept the stage: the gates could not be judged.
    Hold,
    /// Went back to the last good stage: a gate failed.
    RollBack,
    /// An operator paused it.
    Pause,
    /// An operator resumed it.
    Resume,
    /// An operator aborted it at the last good stage.
    Abort,
    /// An operator rolled every node back.
    RollbackAll,
}

impl DecisionKind {
    /// The word for people and `--json`.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Start => "start",
            DecisionKind::Advance => "advance",
            DecisionKind::Hold => "hold",
            DecisionKind::RollBack => "roll back",
            DecisionKind::Pause => "pause",
            DecisionKind::Resume => "resume",
            DecisionKind::Abort => "abort",
            DecisionKind::RollbackAll => "rollback all",
        }
    }
}

/// One entry of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Its sequence number (1 for the start).
    pub seq: u64,
    /// When, by the proposer's clock, ms since the Unix epoch.
    pub at_unix_ms: u64,
    /// The stage in force when it was taken (`None`: none).
    pub stage: Option<usize>,
    /// What was decided.
    pub kind: DecisionKind,
    /// Why, in words.
    pub reason: String,
    /// The gates' checks behind it (empty for an operator's decision).
    pub checks: Vec<GateCheck>,
    /// The figures behind it.
    pub figures: Option<GateFigures>,
}

/// A rollout as the state holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The plan.
    pub plan: Plan,
    /// Where it stands.
    pub status: RolloutStatus,
    /// The stage in force (`None`: none, every node on its pre-rollout
    /// policy).
    pub stage: Option<usize>,
    /// The last stage whose gates passed (or an operator advanced past).
    pub last_good: Option<usize>,
    /// The nodes each stage covers (cumulative), for stages applied so far.
    pub assigned: Vec<BTreeSet<NodeId>>,
    /// When the stage in force began, ms since the Unix epoch (the soak
    /// counts from here; a resume restarts it).
    pub stage_started_unix_ms: u64,
    /// The sequence number of the last decision.
    pub seq: u64,
    /// The most recent decisions, oldest first.
    pub history: VecDeque<Decision>,
}

impl Rollout {
    /// The nodes the stage in force covers.
    pub fn covered(&self) -> Option<&BTreeSet<NodeId>> {
        self.stage.and_then(|i| self.assigned.get(i))
    }

    /// The policy the stage in force gives its nodes.
    pub fn policy(&self) -> Option<&TransportConfig> {
        self.stage.map(|i| &self.plan.stages[i].policy)
    }

    /// Whether the soak of the stage in force is over at `now_unix_ms`.
    pub fn soaked(&self, now_unix_ms: u64) -> bool {
        self.stage.is_some_and(|i| {
            now_unix_ms.saturating_sub(self.stage_started_unix_ms)
                >= self.plan.stages[i].soak_secs.saturating_mul(1000)
        })
    }
}

/// A change to the rollout ([`crate::Command::Rollout`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutOp {
    /// Start `plan` at its first stage (refused while another rollout is
    /// not over).
    Start {
        /// The plan (checked at apply).
        plan: Plan,
    },
    /// Stop the clock.
    Pause,
    /// Restart it (the stage's soak starts again).
    Resume,
    /// Move to the next stage. `expected_seq` (the driver's) refuses a
    /// decision taken on a stale view; an operator's advance gives `None`.
    Advance {
        /// The decision number the proposer saw last.
        expected_seq: Option<u64>,
        /// The gates' checks (empty for an operator).
        checks: Vec<GateCheck>,
        /// The figures behind them.
        figures: Option<GateFigures>,
    },
    /// Record that the gates could not be judged (the driver's).
    Hold {
        /// The decision number the proposer saw last.
        expected_seq: u64,
        /// The checks.
        checks: Vec<GateCheck>,
        /// The figures.
        figures: GateFigures,
    },
    /// Go back to the last good stage: a gate failed (the driver's).
    RollBack {
        /// The decision number the proposer saw last.
        expected_seq: u64,
        /// The checks.
        checks: Vec<GateCheck>,
        /// The figures.
        figures: GateFigures,
    },
    /// Stop at the last good stage (an operator's).
    Abort,
    /// Every node back to its pre-rollout policy (an operator's).
    RollbackAll,
}

impl RolloutOp {
    /// The decision number a driver's decision was taken on (`None`: an
    /// operator's change).
    pub fn expected_seq(&self) -> Option<u64> {
        match self {
            RolloutOp::Advance { expected_seq, .. } => *expected_seq,
            RolloutOp::Hold { expected_seq, .. } | RolloutOp::RollBack { expected_seq, .. } => {
                Some(*expected_seq)
            }
            _ => None,
        }
    }

    /// Its name in logs: `start`, `pause`, ...
    pub fn name(&self) -> &'static str {
        match self {
            RolloutOp::Start { .. } => "start",
            RolloutOp::Pause => "pause",
            RolloutOp::Resume => "resume",
            RolloutOp::Advance { .. } => "advance",
            RolloutOp::Hold { .. } => "hold",
            RolloutOp::RollBack { .. } => "roll-back",
            RolloutOp::Abort => "abort",
            RolloutOp::RollbackAll => "rollback-all",
        }
    }
}

/// Picks `count` nodes of `members`, keeping `keep` (already covered):
/// round-robin across [`ZONE_LABEL`] values, lowest id first in a zone,
/// the nodes in `last` after every other.
pub fn pick(
    members: &BTreeSet<NodeId>,
    labels: &BTreeMap<NodeId, crate::policy::Labels>,
    keep: &BTreeSet<NodeId>,
    last: &BTreeSet<NodeId>,
    count: usize,
) -> BTreeSet<NodeId> {
    let mut chosen: BTreeSet<NodeId> = keep.intersection(members).copied().collect();
    for pass_last in [false, true] {
        let mut zones: BTreeMap<&str, VecDeque<NodeId>> = BTreeMap::new();
        for id in members {
            if chosen.contains(id) || last.contains(id) != pass_last {
                continue;
            }
            let zone = labels
                .get(id)
                .and_then(|l| l.get(ZONE_LABEL))
                .map_or("", String::as_str);
            zones.entry(zone).or_default().push_back(*id);
        }
        // Start with the zones the chosen nodes cover least.
        let mut order: Vec<&str> = zones.keys().copied().collect();
        order.sort_by_key(|z| {
            chosen
                .iter()
                .filter(|id| {
                    labels
                        .get(id)
                        .and_then(|l| l.get(ZONE_LABEL))
                        .map_or("", String::as_str)
                        == *z
                })
                .count()
        });
        while chosen.len() < count && zones.values().any(|q| !q.is_empty()) {
            for z in &order {
                if chosen.len() >= count {
                    break;
                }
                if let Some(id) = zones.get_mut(z).and_then(VecDeque::pop_front) {
                    chosen.insert(id);
                }
            }
        }
    }
    chosen
}

fn cut_reason(text: &str) -> String {
    let mut end = text.len().min(MAX_REASON_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn refuse(why: impl Into<String>) -> Response {
    Response::Rejected(Rejection::Rollout { why: why.into() })
}

impl ClusterState {
    /// The rollout, if one was ever started (the last one, over or not).
    pub fn rollout(&self) -> Option<&Rollout> {
        self.rollout.as_ref()
    }

    /// The policy the rollout layer gives `node`, with the stage index.
    pub fn rollout_policy(&self, node: NodeId) -> Option<(&TransportConfig, usize)> {
        let r = self.rollout.as_ref()?;
        let stage = r.stage?;
        r.covered()?
            .contains(&node)
            .then(|| (&r.plan.stages[stage].policy, stage))
    }

    /// The nodes stage `index` of `plan` covers, given the nodes covered
    /// so far.
    fn stage_nodes(
        &self,
        plan: &Plan,
        index: usize,
        keep: &BTreeSet<NodeId>,
        last: &BTreeSet<NodeId>,
    ) -> Result<BTreeSet<NodeId>, Response> {
        let stage = &plan.stages[index];
        // Servers and agents alike: agents are most of the fleet.
        let members: BTreeSet<NodeId> = self.node_ids_all();
        if let Some(p) = stage.percent {
            let count = (members.len() * usize::from(p)).div_ceil(100).max(1);
            return Ok(pick(&members, &self.node_labels, keep, last, count));
        }
        if let Some(id) = stage.nodes.iter().find(|id| !members.contains(id)) {
            return Err(refuse(format!(
                "stage {index}: nodes: node {id} is neither a server nor an agent"
            )));
        }
        Ok(keep
            .intersection(&members)
            .chain(stage.nodes.iter())
            .copied()
            .collect())
    }

    fn record(
        &mut self,
        at_unix_ms: u64,
        kind: DecisionKind,
        reason: String,
        checks: Vec<GateCheck>,
        figures: Option<GateFigures>,
    ) -> Response {
        let Some(r) = self.rollout.as_mut() else {
            return refuse("no rollout");
        };
        r.seq += 1;
        r.history.push_back(Decision {
            seq: r.seq,
            at_unix_ms,
            stage: r.stage,
            kind,
            reason: cut_reason(&reason),
            checks,
            figures,
        });
        while r.history.len() > MAX_HISTORY {
            r.history.pop_front();
        }
        Response::Done
    }

    pub(crate) fn apply_rollout(&mut self, op: RolloutOp, last: Vec<NodeId>, at: u64) -> Response {
        let last: BTreeSet<NodeId> = last.into_iter().collect();
        if let RolloutOp::Start { plan } = op {
            return self.start_rollout(plan, &last, at);
        }
        let Some(r) = self.rollout.as_ref() else {
            return refuse("no rollout has been started");
        };
        let (status, seq) = (r.status, r.seq);
        // Rolling every node back works whenever a stage is in force (after
        // done or abort too); everything else needs a rollout not over.
        if status.is_over() && !(op == RolloutOp::RollbackAll && r.stage.is_some()) {
            return refuse(format!("the rollout is {status}; start a new one"));
        }
        // The driver's decisions: taken on the view they name, never while
        // paused.
        if let Some(expected) = op.expected_seq() {
            if expected != seq {
                return refuse(format!(
                    "decided on a stale view: expected decision {expected}, the rollout is at {seq}"
                ));
            }
            if status == RolloutStatus::Paused {
                return refuse("the rollout is paused");
            }
        }
        match op {
            // Handled before the status check; kept total for the compiler.
            RolloutOp::Start { plan } => self.start_rollout(plan, &last, at),
            RolloutOp::Pause | RolloutOp::Resume => self.pause_resume(op, at),
            RolloutOp::Advance {
                checks, figures, ..
            } => self.advance(&last, at, checks, figures),
            RolloutOp::Hold {
                checks, figures, ..
            } => self.judged(at, DecisionKind::Hold, checks, figures),
            RolloutOp::RollBack {
                checks, figures, ..
            } => self.judged(at, DecisionKind::RollBack, checks, figures),
            RolloutOp::Abort => {
                self.go_back(at, RolloutStatus::Aborted, false);
                self.record(at, DecisionKind::Abort, "operator".into(), vec![], None)
            }
            RolloutOp::RollbackAll => {
                self.go_back(at, RolloutStatus::RolledBack, true);
                self.record(
                    at,
                    DecisionKind::RollbackAll,
                    "operator: every node back to its pre-rollout policy".into(),
                    vec![],
                    None,
                )
            }
        }
    }

    /// Records the driver's hold or roll back, the failed checks as the
    /// reason.
    fn judged(
        &mut self,
        at: u64,
        kind: DecisionKind,
        checks: Vec<GateCheck>,
        figures: GateFigures,
    ) -> Response {
        let failed = if kind == DecisionKind::RollBack {
            " failed"
        } else {
            ""
        };
        let reason = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}{failed}: {}", c.gate, c.detail))
            .collect::<Vec<_>>()
            .join("; ");
        if kind == DecisionKind::RollBack {
            self.go_back(at, RolloutStatus::RolledBack, false);
        } else {
            self.set_status(RolloutStatus::Holding);
        }
        self.record(at, kind, reason, checks, Some(figures))
    }

    fn set_status(&mut self, status: RolloutStatus) {
        if let Some(r) = self.rollout.as_mut() {
            r.status = status;
        }
    }

    fn start_rollout(&mut self, plan: Plan, last: &BTreeSet<NodeId>, at: u64) -> Response {
        if let Err(e) = plan.check() {
            return Response::Rejected(Rejection::InvalidPlan { why: e.to_string() });
        }
        if let Some(r) = &self.rollout
            && !r.status.is_over()
        {
            return refuse(format!(
                "a rollout is {} at stage {}; abort it or roll it back first",
                r.status,
                r.stage.map_or("none".into(), |s| s.to_string())
            ));
        }
        let nodes = match self.stage_nodes(&plan, 0, &BTreeSet::new(), last) {
            Ok(n) => n,
            Err(r) => return r,
        };
        let reason = format!("plan {}: stage 0 on {} node(s)", plan.name, nodes.len());
        self.rollout = Some(Rollout {
            plan,
            status: RolloutStatus::Running,
            stage: Some(0),
            last_good: None,
            assigned: vec![nodes],
            stage_started_unix_ms: at,
            seq: 0,
            history: VecDeque::new(),
        });
        self.record(at, DecisionKind::Start, reason, vec![], None)
    }

    fn pause_resume(&mut self, op: RolloutOp, at: u64) -> Response {
        let Some(r) = self.rollout.as_mut() else {
            return refuse("no rollout has been started");
        };
        let kind = if op == RolloutOp::Pause {
            if r.status == RolloutStatus::Paused {
                return refuse("the rollout is already paused");
            }
            r.status = RolloutStatus::Paused;
            DecisionKind::Pause
        } else {
            if r.status != RolloutStatus::Paused {
                return refuse(format!("the rollout is {}, not paused", r.status));
            }
            r.status = RolloutStatus::Running;
            r.stage_started_unix_ms = at;
            DecisionKind::Resume
        };
        self.record(at, kind, "operator".into(), vec![], None)
    }

    fn advance(
        &mut self,
        last: &BTreeSet<NodeId>,
        at: u64,
        checks: Vec<GateCheck>,
        figures: Option<GateFigures>,
    ) -> Response {
        let Some(r) = self.rollout.as_ref() else {
            return refuse("no rollout has been started");
        };
        let by = if figures.is_some() {
            "gates passed"
        } else {
            "operator"
        };
        let current = r.stage.unwrap_or(0);
        let next = current + 1;
        if next >= r.plan.stages.len() {
            let r = self.rollout.as_mut().expect("checked above");
            r.last_good = Some(current);
            r.status = RolloutStatus::Done;
            let reason = format!("{by}: stage {current} was the last");
            return self.record(at, DecisionKind::Advance, reason, checks, figures);
        }
        let keep = r.assigned.get(current).cloned().unwrap_or_default();
        let plan = r.plan.clone();
        let nodes = match self.stage_nodes(&plan, next, &keep, last) {
            Ok(n) => n,
            Err(r) => return r,
        };
        let reason = format!("{by}: stage {next} on {} node(s)", nodes.len());
        let r = self.rollout.as_mut().expect("checked above");
        r.last_good = Some(current);
        r.assigned.truncate(next);
        r.assigned.push(nodes);
        r.stage = Some(next);
        r.status = RolloutStatus::Running;
        r.stage_started_unix_ms = at;
        self.record(at, DecisionKind::Advance, reason, checks, figures)
    }

    /// Back to the last good stage (or none with `all`), with `status`.
    fn go_back(&mut self, at: u64, status: RolloutStatus, all: bool) {
        if let Some(r) = self.rollout.as_mut() {
            r.stage = if all { None } else { r.last_good };
            r.status = status;
            r.stage_started_unix_ms = at;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command;
    use crate::{Capacity, Member};
    use proptest::prelude::*;
    use tern_protocol::policy::Mode;
    use tern_protocol::{PeerAddr, PeerId};

    fn policy(mode: Mode) -> TransportConfig {
        TransportConfig {
            mode,
            ..TransportConfig::default()
        }
    }

    fn plan() -> Plan {
        Plan {
            name: "test".into(),
            gates: Gates::default(),
            stages: vec![
                Stage {
                    name: "a".into(),
                    percent: Some(25),
                    nodes: vec![],
                    soak_secs: 5,
                    policy: policy(Mode::Dual),
                },
                Stage {
                    name: "b".into(),
                    percent: Some(50),
                    nodes: vec![],
                    soak_secs: 5,
                    policy: policy(Mode::Dual),
                },
                Stage {
                    name: "c".into(),
                    percent: Some(100),
                    nodes: vec![],
                    soak_secs: 5,
                    policy: policy(Mode::Iroh),
                },
            ],
        }
    }

    #[test]
    fn a_soak_override_compresses_every_stage_and_keeps_the_rest() {
        let p = plan().with_soak(std::time::Duration::from_millis(2500));
        assert!(p.stages.iter().all(|s| s.soak_secs == 2));
        assert_eq!(p.stages.len(), 3);
        assert_eq!(p.stages[2].policy, policy(Mode::Iroh));
        assert_eq!(p.check(), Ok(()));
        // Never zero, never beyond what a plan may ask for.
        let p = plan().with_soak(std::time::Duration::ZERO);
        assert!(p.stages.iter().all(|s| s.soak_secs == 1));
        let p = plan().with_soak(std::time::Duration::from_secs(u64::MAX));
        assert!(p.stages.iter().all(|s| s.soak_secs == MAX_SOAK_SECS));
        assert_eq!(p.check(), Ok(()));
    }

    fn state(n: u64) -> ClusterState {
        let mut s = ClusterState::default();
        let members: Vec<(NodeId, Member)> = (1..=n)
            .map(|i| {
                let m = Member::new(
                    PeerAddr::new(PeerId::from_bytes([i as u8; 32])),
                    Capacity::default(),
                );
                (i, m)
            })
            .collect();
        s.apply_membership(members.iter().map(|(id, m)| (id, m)));
        for id in 1..=n {
            let zone = if id % 2 == 0 { "a" } else { "b" };
            s.node_labels
                .insert(id, [(ZONE_LABEL.to_owned(), zone.to_owned())].into());
        }
        s
    }

    fn op(s: &mut ClusterState, op: RolloutOp, last: Vec<NodeId>, at: u64) -> Response {
        s.apply(Command::Rollout {
            request_id: format!("r{at}"),
            op,
            last,
            at_unix_ms: at,
        })
    }

    #[test]
    fn a_plan_error_names_the_stage_and_key() {
        let mut p = plan();
        p.stages[1].percent = Some(10);
        let e = p.check().unwrap_err();
        assert_eq!((e.stage, e.key.as_str()), (Some(1), "percent"));
        assert!(e.to_string().starts_with("stage 1: percent: 10"), "{e}");
        let mut p = plan();
        p.stages[2].policy.migration.prefer_iroh = vec!["nope".into()];
        p.stages[2].policy.mode = Mode::Dual;
        let e = p.check().unwrap_err();
        assert_eq!(e.stage, Some(2));
        assert!(e.key.starts_with("policy."), "{e}");
        let mut p = plan();
        p.stages[0].nodes = vec![1];
        assert_eq!(p.check().unwrap_err().key, "percent");
        let mut p = plan();
        p.stages.clear();
        assert_eq!(p.check().unwrap_err().stage, None);
    }

    #[test]
    fn canaries_spread_across_zones_and_the_leader_goes_last() {
        let s = state(8);
        let members: BTreeSet<NodeId> = s.members.keys().copied().collect();
        let two = pick(&members, &s.node_labels, &BTreeSet::new(), &[1].into(), 2);
        assert_eq!(two, [2, 3].into(), "one per zone, leader 1 skipped");
        let all = pick(&members, &s.node_labels, &two, &[1].into(), 8);
        assert_eq!(
            all, members,
            "the leader is picked when nothing else is left"
        );
        let four = pick(&members, &s.node_labels, &two, &BTreeSet::new(), 4);
        assert!(four.is_superset(&two));
        assert_eq!(four.len(), 4);
    }

    #[test]
    fn stages_advance_roll_back_to_the_last_good_one_and_rollback_all_clears() {
        let mut s = state(4);
        s.policies.all = Some(policy(Mode::Grpc));
        assert_eq!(
            op(&mut s, RolloutOp::Start { plan: plan() }, vec![1], 10),
            Response::Done
        );
        let r = s.rollout().unwrap();
        assert_eq!(
            (r.stage, r.status, r.seq),
            (Some(0), RolloutStatus::Running, 1)
        );
        assert_eq!(r.covered().unwrap().len(), 1);
        assert!(!r.covered().unwrap().contains(&1), "not the leader first");
        let canary = *r.covered().unwrap().first().unwrap();
        assert_eq!(s.desired_policy(canary).unwrap().0.mode, Mode::Dual);
        assert_eq!(s.desired_policy(1).unwrap().0.mode, Mode::Grpc);
        // A second start is refused while this one runs.
        assert!(matches!(
            op(&mut s, RolloutOp::Start { plan: plan() }, vec![], 11),
            Response::Rejected(Rejection::Rollout { .. })
        ));
        // The driver advances on passing gates, conditioned on seq.
        let adv = |seq| RolloutOp::Advance {
            expected_seq: Some(seq),
            checks: vec![],
            figures: Some(GateFigures::default()),
        };
        assert_eq!(op(&mut s, adv(1), vec![], 20), Response::Done);
        // The same decision again (a retry by a new leader) is refused.
        assert!(matches!(
            op(&mut s, adv(1), vec![], 21),
            Response::Rejected(_)
        ));
        let r = s.rollout().unwrap();
        assert_eq!((r.stage, r.last_good), (Some(1), Some(0)));
        assert_eq!(r.covered().unwrap().len(), 2);
        assert!(r.covered().unwrap().contains(&canary));
        // A gate fails: back to stage 0, its nodes keep stage 0's policy.
        let failed = RolloutOp::RollBack {
            expected_seq: 2,
            checks: vec![GateCheck {
                gate: "error rate".into(),
                ok: false,
                detail: "iroh 50 of 100".into(),
            }],
            figures: GateFigures::default(),
        };
        assert_eq!(op(&mut s, failed, vec![], 30), Response::Done);
        let r = s.rollout().unwrap();
        assert_eq!((r.stage, r.status), (Some(0), RolloutStatus::RolledBack));
        let d = r.history.back().unwrap();
        assert_eq!(d.kind, DecisionKind::RollBack);
        assert!(
            d.reason.contains("error rate failed: iroh 50 of 100"),
            "{}",
            d.reason
        );
        // Over: nothing but a new start.
        assert!(matches!(
            op(&mut s, RolloutOp::Pause, vec![], 31),
            Response::Rejected(_)
        ));
        assert_eq!(
            op(&mut s, RolloutOp::Start { plan: plan() }, vec![], 40),
            Response::Done
        );
        assert_eq!(
            op(&mut s, RolloutOp::RollbackAll, vec![], 41),
            Response::Done
        );
        for id in 1..=4 {
            assert_eq!(
                s.desired_policy(id).unwrap().0.mode,
                Mode::Grpc,
                "node {id}"
            );
            assert_eq!(s.rollout_policy(id), None);
        }
    }

    #[test]
    fn pause_stops_the_driver_and_operator_advance_finishes() {
        let mut s = state(3);
        op(&mut s, RolloutOp::Start { plan: plan() }, vec![], 1);
        assert_eq!(op(&mut s, RolloutOp::Pause, vec![], 2), Response::Done);
        let hold = RolloutOp::Hold {
            expected_seq: 2,
            checks: vec![],
            figures: GateFigures::default(),
        };
        assert!(matches!(op(&mut s, hold, vec![], 3), Response::Rejected(_)));
        assert_eq!(op(&mut s, RolloutOp::Resume, vec![], 4), Response::Done);
        assert!(!s.rollout().unwrap().soaked(4 + 4999));
        assert!(s.rollout().unwrap().soaked(4 + 5000));
        let manual = || RolloutOp::Advance {
            expected_seq: None,
            checks: vec![],
            figures: None,
        };
        op(&mut s, manual(), vec![], 5);
        op(&mut s, manual(), vec![], 6);
        assert_eq!(s.rollout().unwrap().covered().unwrap().len(), 3);
        assert_eq!(op(&mut s, manual(), vec![], 7), Response::Done);
        let r = s.rollout().unwrap();
        assert_eq!((r.status, r.stage), (RolloutStatus::Done, Some(2)));
        assert_eq!(s.desired_policy(2).unwrap().0.mode, Mode::Iroh);
        // Done, the last stage stays in force until every node is rolled
        // back; then there is nothing left to roll back.
        assert_eq!(
            op(&mut s, RolloutOp::RollbackAll, vec![], 8),
            Response::Done
        );
        assert_eq!(s.rollout_policy(2), None);
        assert!(matches!(
            op(&mut s, RolloutOp::RollbackAll, vec![], 9),
            Response::Rejected(_)
        ));
        // Abort at stage 0 with nothing good: no stage in force.
        let mut s = state(3);
        op(&mut s, RolloutOp::Start { plan: plan() }, vec![], 1);
        assert_eq!(op(&mut s, RolloutOp::Abort, vec![], 2), Response::Done);
        assert_eq!(s.rollout().unwrap().stage, None);
    }

    #[test]
    fn an_operator_node_policy_beats_the_rollout() {
        let mut s = state(1);
        op(&mut s, RolloutOp::Start { plan: plan() }, vec![], 1);
        assert_eq!(s.desired_policy(1).unwrap().1.kind(), "rollout");
        s.policies.nodes.insert(1, policy(Mode::Grpc));
        assert_eq!(s.desired_policy(1).unwrap().0.mode, Mode::Grpc);
    }

    fn figures() -> impl Strategy<Value = GateFigures> {
        (
            0..10_000u64,
            0..10_000u64,
            0..10_000u64,
            0..10_000u64,
            proptest::option::of(1..1_000_000u64),
            proptest::option::of(1..1_000_000u64),
            0..5u64,
            0..5u64,
            proptest::collection::vec(1..10u64, 0..2),
        )
            .prop_map(|(gc, ge, ic, ie, gp, ip, fb, lc, missing)| GateFigures {
                grpc_calls: gc,
                grpc_errors: ge.min(gc),
                iroh_calls: ic,
                iroh_errors: ie.min(ic),
                grpc_p99_us: gp,
                iroh_p99_us: ip,
                paths: None,
                fallbacks: fb,
                leader_changes: lc,
                missing,
            })
    }

    #[test]
    fn the_gates_judge_the_operators_criteria() {
        let g = Gates::default();
        let ok = GateFigures {
            grpc_calls: 10_000,
            grpc_errors: 1,
            iroh_calls: 1_000,
            iroh_errors: 1,
            grpc_p99_us: Some(1000),
            iroh_p99_us: Some(1100),
            paths: Some((95, 100)),
            ..GateFigures::default()
        };
        assert_eq!(evaluate(&g, &ok).0, Verdict::Pass);
        let slow = GateFigures {
            iroh_p99_us: Some(1101),
            ..ok.clone()
        };
        assert_eq!(evaluate(&g, &slow).0, Verdict::Fail);
        let errors = GateFigures {
            iroh_errors: 2 + 1,
            ..ok.clone()
        };
        // 3000 ppm vs 100 ppm + 1000 allowed.
        assert_eq!(evaluate(&g, &errors).0, Verdict::Fail);
        let relayed = GateFigures {
            paths: Some((94, 100)),
            ..ok.clone()
        };
        assert_eq!(evaluate(&g, &relayed).0, Verdict::Fail);
        let missing = GateFigures {
            missing: vec![3],
            ..ok.clone()
        };
        let (v, checks) = evaluate(&g, &missing);
        assert_eq!(v, Verdict::Hold);
        assert!(checks.iter().any(|c| c.detail == "missing from node 3"));
        let spike = GateFigures {
            leader_changes: 2,
            ..ok
        };
        assert_eq!(evaluate(&g, &spike).0, Verdict::Fail);
    }

    proptest! {
        #[test]
        fn a_partial_view_never_passes(f in figures()) {
            let (v, checks) = evaluate(&Gates::default(), &f);
            if !f.missing.is_empty() {
                prop_assert_ne!(v, Verdict::Pass);
            }
            prop_assert_eq!(v == Verdict::Pass, checks.iter().all(|c| c.ok));
        }

        #[test]
        fn more_iroh_errors_never_turn_a_fail_into_a_pass(f in figures(), more in 0..1000u64) {
            let g = Gates::default();
            let worse = GateFigures {
                iroh_errors: (f.iroh_errors + more).min(f.iroh_calls),
                ..f.clone()
            };
            if evaluate(&g, &f).0 == Verdict::Fail {
                prop_assert_eq!(evaluate(&g, &worse).0, Verdict::Fail);
            }
        }
    }
}
