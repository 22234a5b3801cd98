//! `tern rollout`: the transport rollout from the command line.
//!
//! `start PLAN.toml` reads and checks a plan file ([`load_plan`]: a typed
//! error naming the file and, for a bad plan, the stage index and key),
//! then asks `Cluster/Rollout` (operator role, any member: a follower
//! forwards to the leader). `pause`, `resume`, `advance`, `abort` and
//! `rollback --all` are the same call with another action. `status` and
//! `history` read `Cluster/RolloutGet` (viewer role). Output is a few
//! lines and tables for people, or `--json`.

use std::path::Path;

use serde_json::{Value, json};
use tern_protocol::catalog::methods;
use tern_protocol::pb;
use tern_state::Plan;

use crate::cli::{Out, policy_line, print_table};
use crate::client::{Conn, request_id};
use crate::error::CliError;

macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Parses and checks a plan from TOML text; `origin` names it in errors.
pub fn parse_plan(text: &str, origin: &str) -> Result<Plan, CliError> {
    let plan: Plan = toml::from_str(text).map_err(|e| {
        CliError::Argument(format!(
            "{origin}: not a rollout plan: {}",
            e.message().trim()
        ))
    })?;
    plan.check()
        .map_err(|e| CliError::Argument(format!("{origin}: {e}")))?;
    Ok(plan)
}

/// Reads and checks the plan file at `path`.
pub fn load_plan(path: &Path) -> Result<Plan, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::File(format!("reading {}: {e}", path.display())))?;
    parse_plan(&text, &path.display().to_string())
}

/// `tern rollout start|pause|resume|advance|abort|rollback --all`: asks
/// for the change and prints the rollout after it.
pub async fn change(
    conn: &Conn,
    action: &str,
    plan: Option<&Plan>,
    out: Out,
) -> Result<(), CliError> {
    let resp = request(conn, action, plan).await?;
    print_status(&resp, out);
    Ok(())
}

/// The `Cluster/Rollout` call behind `tern rollout start|pause|...`
/// (`action` is one of [`tern_cluster::rollout::ACTIONS`]): answers the
/// rollout after the change. `tern demo` drives its rollout with it too.
pub async fn request(
    conn: &Conn,
    action: &str,
    plan: Option<&Plan>,
) -> Result<pb::RolloutResponse, CliError> {
    let req = pb::RolloutRequest {
        request_id: request_id(),
        action: action.to_owned(),
        plan: plan.map(tern_cluster::rollout::plan_to_pb),
        forwarded: false,
    };
    conn.call(methods::CLUSTER_ROLLOUT, &req).await
}

/// The `Cluster/RolloutGet` call behind `tern rollout status|history`.
pub async fn get(conn: &Conn) -> Result<pb::RolloutResponse, CliError> {
    conn.call(methods::CLUSTER_ROLLOUT_GET, &pb::RolloutGetRequest {})
        .await
}

/// `tern rollout status`.
pub async fn status(conn: &Conn, out: Out) -> Result<(), CliError> {
    let resp = get(conn).await?;
    print_status(&resp, out);
    Ok(())
}

/// `tern rollout history`.
pub async fn history(conn: &Conn, out: Out) -> Result<(), CliError> {
    let resp = get(conn).await?;
    if out.json {
        let h: Vec<Value> = resp.history.iter().map(decision_json).collect();
        out!("{}", json!({ "present": resp.present, "history": h }));
        return Ok(());
    }
    if !resp.present {
        out!("no rollout has been started");
        return Ok(());
    }
    for d in &resp.history {
        out!("{}", decision_line(d));
        for c in &d.checks {
            out!(
                "    {} {}: {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.gate,
                c.detail
            );
        }
    }
    Ok(())
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn time_text(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn decision_json(d: &pb::RolloutDecision) -> Value {
    json!({
        "seq": d.seq,
        "at_unix_ms": d.at_unix_ms,
        "stage": d.stage,
        "decision": d.kind,
        "reason": d.reason,
        "checks": d.checks.iter().map(|c| json!({
            "gate": c.gate, "ok": c.ok, "detail": c.detail,
        })).collect::<Vec<_>>(),
    })
}

/// The rollout as JSON.
pub fn status_json(r: &pb::RolloutResponse) -> Value {
    let plan = r.plan.as_ref();
    json!({
        "present": r.present,
        "plan": plan.map(|p| p.name.clone()),
        "status": r.status,
        "stage": r.stage,
        "stage_name": r.stage.and_then(|s| plan?.stages.get(s as usize)).map(|s| s.name.clone()),
        "stages": plan.map_or(0, |p| p.stages.len()),
        "last_good": r.last_good,
        "covered": r.covered,
        "stage_started_unix_ms": r.stage_started_unix_ms,
        "decisions": r.seq,
        "last_decision": r.history.last().map(decision_json),
        "node_id": r.node_id,
    })
}

/// A stage's named nodes, as `nodes 2, 5`.
fn nodes_text(nodes: &[u64]) -> String {
    let ids: Vec<String> = nodes.iter().map(ToString::to_string).collect();
    format!("nodes {}", ids.join(", "))
}

fn print_status(r: &pb::RolloutResponse, out: Out) {
    if out.json {
        out!("{}", status_json(r));
        return;
    }
    let Some(plan) = r.plan.as_ref().filter(|_| r.present) else {
        out!("no rollout has been started");
        return;
    };
    out!("plan {}: {}", plan.name, r.status);
    match r
        .stage
        .and_then(|s| plan.stages.get(s as usize).map(|st| (s, st)))
    {
        Some((s, st)) => out!(
            "stage {s} of {} in force since {}: {} (soak {} s)",
            plan.stages.len(),
            time_text(r.stage_started_unix_ms),
            st.name,
            st.soak_secs
        ),
        None => out!("no stage in force: every node runs its pre-rollout policy"),
    }
    let covered: Vec<String> = r.covered.iter().map(ToString::to_string).collect();
    out!(
        "covered nodes: {}",
        if covered.is_empty() {
            "none".into()
        } else {
            covered.join(", ")
        }
    );
    if let Some(g) = r.last_good {
        out!("last good stage: {g}");
    }
    let rows: Vec<Vec<String>> = plan
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            vec![
                if Some(i as u64) == r.stage {
                    "->".into()
                } else {
                    String::new()
                },
                i.to_string(),
                s.name.clone(),
                if s.percent > 0 {
                    format!("{}%", s.percent)
                } else {
                    nodes_text(&s.nodes)
                },
                format!("{} s", s.soak_secs),
                s.policy.as_ref().map_or_else(|| "-".into(), policy_line),
            ]
        })
        .collect();
    print_table(&["", "stage", "name", "share", "soak", "policy"], &rows);
    if let Some(d) = r.history.last() {
        out!(
            "last decision #{} at {}: {} - {}",
            d.seq,
            time_text(d.at_unix_ms),
            d.kind,
            d.reason
        );
    }
}

/// One decision on a line, as `tern rollout history` prints it.
pub(crate) fn decision_line(d: &pb::RolloutDecision) -> String {
    format!(
        "#{} {} stage {}: {} - {}",
        d.seq,
        time_text(d.at_unix_ms),
        d.stage.map_or_else(|| "none".into(), |s| s.to_string()),
        d.kind,
        d.reason
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_default_plan_parses_and_has_the_operators_four_stages() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/rollout/default.toml");
        let plan = load_plan(&path).expect("the default plan is valid");
        let shares: Vec<Option<u8>> = plan.stages.iter().map(|s| s.percent).collect();
        assert_eq!(shares, [Some(5), Some(25), Some(50), Some(100)]);
        assert_eq!(plan.gates, tern_state::Gates::default());
        let modes: Vec<&str> = plan.stages.iter().map(|s| s.policy.mode.as_str()).collect();
        assert_eq!(modes, ["dual", "dual", "dual", "iroh"]);
        assert_eq!(
            plan.stages[2].policy.migration.prefer_iroh,
            ["all_except_raft"]
        );
    }

    #[test]
    fn a_bad_plan_is_named_by_file_stage_and_key() {
        let e = parse_plan("name = \"x\"\n[[stage]]\nname = \"a\"\nsoak_secs = 1\n[stage.policy]\nmode = \"dual\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "p.toml: stage 0: percent: give exactly one of percent and nodes"
        );
        let e = parse_plan("name = \"x\"\nstages = 3\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("p.toml: not a rollout plan: unknown field `stages`"),
            "{e}"
        );
        let e = parse_plan(
            "name = \"x\"\n[[stage]]\nname = \"a\"\npercent = 5\nsoak_secs = 1\n[stage.policy]\nmode = \"fast\"\n",
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("p.toml: not a rollout plan:"), "{e}");
    }

    #[test]
    fn named_nodes_are_listed_without_debug_formatting() {
        assert_eq!(nodes_text(&[2, 5]), "nodes 2, 5");
    }

    #[test]
    fn times_are_printed_in_utc() {
        assert_eq!(time_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time_text(1_796_515_200_000), "2026-12-06 00:00:00 UTC");
    }
}
