//! The transport rollout's Cluster calls: `Cluster/Rollout` (operator:
//! start a plan, pause, resume, advance, abort, roll every node back) and
//! `Cluster/RolloutGet` (viewer: the rollout and its history), with their
//! typed client calls ([`rollout_change`], [`rollout_get`]) and the
//! conversions between [`Plan`] and its protobuf form.
//!
//! A change is checked here first (a typed `InvalidArgument` naming the
//! field: the action, the plan with the stage index and key), then written
//! as [`Command::Rollout`] on the leader, with the leader's own id as the
//! node to pick as a canary last; a follower forwards the call once, as
//! the metadata register does ([`crate::meta`]). The request id makes it
//! idempotent. The state refuses a change that does not fit the
//! rollout's status (`FailedPrecondition`, saying why).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::policy::TransportConfig;
use tern_protocol::{Call, CallError, PeerAddr, RequestContext, RpcClient, Status, pb};
use tern_raft_net::Attached;
use tern_state::rollout::RolloutOp;
use tern_state::{ClusterState, Command, Gates, MAX_REQUEST_ID_LEN, Plan, Response, Stage};

use crate::meta::LeaderWrite;

/// A plan as its protobuf form.
pub fn plan_to_pb(plan: &Plan) -> pb::RolloutPlan {
    let g = &plan.gates;
    pb::RolloutPlan {
        name: plan.name.clone(),
        gates: Some(pb::RolloutGates {
            error_rate_slack_ppm: g.error_rate_slack_ppm,
            p99_allowance_pct: g.p99_allowance_pct,
            direct_min_pct: g.direct_min_pct,
            max_fallbacks: g.max_fallbacks,
            max_leader_changes: g.max_leader_changes,
            min_calls: g.min_calls,
        }),
        stages: plan
            .stages
            .iter()
            .map(|s| pb::RolloutStage {
                name: s.name.clone(),
                percent: s.percent.map_or(0, u32::from),
                nodes: s.nodes.clone(),
                soak_secs: s.soak_secs,
                policy: Some(s.policy.to_pb()),
            })
            .collect(),
    }
}

/// A plan from its protobuf form, checked ([`Plan::check`]); the error
/// names the field, the stage index and the key.
pub fn plan_from_pb(p: &pb::RolloutPlan) -> Result<Plan, String> {
    let gates = match &p.gates {
        None => Gates::default(),
        Some(g) => Gates {
            error_rate_slack_ppm: g.error_rate_slack_ppm,
            p99_allowance_pct: g.p99_allowance_pct,
            direct_min_pct: g.direct_min_pct,
            max_fallbacks: g.max_fallbacks,
            max_leader_changes: g.max_leader_changes,
            min_calls: g.min_calls,
        },
    };
    if p.stages.len() > tern_state::rollout::MAX_STAGES {
        return Err(format!(
            "{} stages; at most {}",
            p.stages.len(),
            tern_state::rollout::MAX_STAGES
        ));
    }
    let mut stages = Vec::with_capacity(p.stages.len());
    for (i, s) in p.stages.iter().enumerate() {
        let percent = match s.percent {
            0 => None,
            n => Some(u8::try_from(n).map_err(|_| format!("stage {i}: percent: {n}; 1 to 100"))?),
        };
        let policy = match &s.policy {
            None => return Err(format!("stage {i}: policy: missing")),
            Some(p) => TransportConfig::from_pb(p).map_err(|e| format!("stage {i}: policy.{e}"))?,
        };
        stages.push(Stage {
            name: s.name.clone(),
            percent,
            nodes: s.nodes.clone(),
            soak_secs: s.soak_secs,
            policy,
        });
    }
    let plan = Plan {
        name: p.name.clone(),
        gates,
        stages,
    };
    plan.check().map_err(|e| e.to_string())?;
    Ok(plan)
}

/// The rollout of `state` as the protobuf answer (`present` false when
/// none was ever started).
pub fn rollout_response(state: &ClusterState, node_id: u64) -> pb::RolloutResponse {
    let Some(r) = state.rollout() else {
        return pb::RolloutResponse {
            node_id,
            ..Default::default()
        };
    };
    pb::RolloutResponse {
        present: true,
        plan: Some(plan_to_pb(&r.plan)),
        status: r.status.as_str().to_owned(),
        stage: r.stage.map(|s| s as u64),
        last_good: r.last_good.map(|s| s as u64),
        covered: r
            .covered()
            .map(|c| c.iter().copied().collect())
            .unwrap_or_default(),
        stage_started_unix_ms: r.stage_started_unix_ms,
        seq: r.seq,
        history: r
            .history
            .iter()
            .map(|d| pb::RolloutDecision {
                seq: d.seq,
                at_unix_ms: d.at_unix_ms,
                stage: d.stage.map(|s| s as u64),
                kind: d.kind.as_str().to_owned(),
                reason: d.reason.clone(),
                checks: d
                    .checks
                    .iter()
                    .map(|c| pb::RolloutGateCheck {
                        gate: c.gate.clone(),
                        ok: c.ok,
                        detail: c.detail.clone(),
                    })
                    .collect(),
            })
            .collect(),
        node_id,
    }
}

/// The names `action` takes.
pub const ACTIONS: [&str; 6] = [
    "start",
    "pause",
    "resume",
    "advance",
    "abort",
    "rollback-all",
];

/// The change a request asks for, checked; errors name the field.
pub fn parse_request(req: &pb::RolloutRequest) -> Result<RolloutOp, Status> {
    if req.request_id.is_empty() || req.request_id.len() > MAX_REQUEST_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "field `request_id`: {} bytes; a request id is 1 to {MAX_REQUEST_ID_LEN} bytes",
            req.request_id.len()
        )));
    }
    if req.action != "start" && req.plan.is_some() {
        return Err(Status::invalid_argument(format!(
            "field `plan`: only a start carries a plan, not {:?}",
            req.action
        )));
    }
    Ok(match req.action.as_str() {
        "start" => {
            let plan = req
                .plan
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("field `plan`: a start needs a plan"))?;
            RolloutOp::Start {
                plan: plan_from_pb(plan)
                    .map_err(|e| Status::invalid_argument(format!("field `plan`: {e}")))?,
            }
        }
        "pause" => RolloutOp::Pause,
        "resume" => RolloutOp::Resume,
        "advance" => RolloutOp::Advance {
            expected_seq: None,
            checks: vec![],
            figures: None,
        },
        "abort" => RolloutOp::Abort,
        "rollback-all" => RolloutOp::RollbackAll,
        other => {
            let mut shown: String = other.chars().take(32).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            return Err(Status::invalid_argument(format!(
                "field `action`: {shown:?} is not one of {}",
                ACTIONS.join(", ")
            )));
        }
    })
}

/// Milliseconds since the Unix epoch by this node's clock (0 before it).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Serves `Cluster/Rollout`.
pub(crate) async fn serve_change(
    node: &Attached,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let req = pb::RolloutRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/rollout: {e}")))?;
    let op = parse_request(&req)?;
    let command = Command::Rollout {
        request_id: req.request_id.clone(),
        op,
        last: vec![node.id],
        at_unix_ms: now_unix_ms(),
    };
    tracing::info!(%command, caller = %ctx.peer.short(), "rollout change");
    let forwarded = || {
        pb::RolloutRequest {
            forwarded: true,
            ..req.clone()
        }
        .encode_to_vec()
        .into()
    };
    let written = match crate::meta::write_at_leader(
        node,
        ctx,
        command,
        "change",
        methods::CLUSTER_ROLLOUT,
        forwarded,
        req.forwarded,
    )
    .await?
    {
        LeaderWrite::Written(data) => data,
        LeaderWrite::Forwarded(answer) => return Ok(answer),
    };
    match written {
        Response::Done => serve_get(node),
        Response::Rejected(why) => Err(tern_services::vm::rejection_status(&why)),
        other => Err(Status::internal(format!(
            "the state answered a rollout change with {other:?}"
        ))),
    }
}

/// Serves `Cluster/RolloutGet` from this node's applied state.
pub(crate) fn serve_get(node: &Attached) -> Result<Bytes, Status> {
    let answer = node
        .sm
        .read(|state| rollout_response(state, node.id))
        .map_err(|e| Status::unavailable(format!("reading the state: {e}")))?;
    Ok(answer.encode_to_vec().into())
}

fn decode(bytes: Bytes) -> Result<pb::RolloutResponse, CallError> {
    pb::RolloutResponse::decode(bytes).map_err(|e| {
        CallError::Application(Status::internal(format!(
            "undecodable RolloutResponse: {e}"
        )))
    })
}

/// Asks the node at `addr` (any member; a follower forwards to the
/// leader) for a rollout change: `action` one of [`ACTIONS`], `plan` for
/// a start. Answers the rollout after it.
pub async fn rollout_change(
    client: &dyn RpcClient,
    addr: &PeerAddr,
    request_id: &str,
    action: &str,
    plan: Option<&Plan>,
    timeout: Duration,
) -> Result<pb::RolloutResponse, CallError> {
    let req = pb::RolloutRequest {
        request_id: request_id.to_owned(),
        action: action.to_owned(),
        plan: plan.map(plan_to_pb),
        forwarded: false,
    };
    let call =
        Call::new(methods::CLUSTER_ROLLOUT, req.encode_to_vec().into()).with_timeout(timeout);
    decode(client.call(addr, call).await?)
}

/// The rollout as the node at `addr` has applied it.
pub async fn rollout_get(
    client: &dyn RpcClient,
    addr: &PeerAddr,
    timeout: Duration,
) -> Result<pb::RolloutResponse, CallError> {
    let req = pb::RolloutGetRequest {};
    let call =
        Call::new(methods::CLUSTER_ROLLOUT_GET, req.encode_to_vec().into()).with_timeout(timeout);
    decode(client.call(addr, call).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tern_protocol::policy::Mode;

    fn plan() -> Plan {
        Plan {
            name: "p".into(),
            gates: Gates::default(),
            stages: vec![Stage {
                name: "s".into(),
                percent: Some(5),
                nodes: vec![],
                soak_secs: 3,
                policy: TransportConfig {
                    mode: Mode::Dual,
                    ..TransportConfig::default()
                },
            }],
        }
    }

    #[test]
    fn a_plan_round_trips_and_a_bad_one_is_named() {
        let p = plan();
        assert_eq!(plan_from_pb(&plan_to_pb(&p)).unwrap(), p);
        let mut bad = plan_to_pb(&p);
        bad.stages[0].percent = 300;
        assert_eq!(
            plan_from_pb(&bad).unwrap_err(),
            "stage 0: percent: 300; 1 to 100"
        );
        bad.stages[0].percent = 5;
        bad.stages[0].policy = None;
        assert_eq!(plan_from_pb(&bad).unwrap_err(), "stage 0: policy: missing");
    }

    #[test]
    fn requests_are_checked_by_field() {
        let req = |action: &str, plan: Option<pb::RolloutPlan>| pb::RolloutRequest {
            request_id: "r".into(),
            action: action.into(),
            plan,
            forwarded: false,
        };
        let msg = |r| parse_request(&r).unwrap_err().message;
        assert!(msg(req("start", None)).contains("field `plan`"));
        assert!(msg(req("pause", Some(plan_to_pb(&plan())))).contains("only a start"));
        assert!(msg(req("explode", None)).contains("field `action`"));
        assert_eq!(
            parse_request(&req("abort", None)).unwrap(),
            RolloutOp::Abort
        );
        assert!(matches!(
            parse_request(&req("start", Some(plan_to_pb(&plan())))).unwrap(),
            RolloutOp::Start { .. }
        ));
    }

    proptest! {
        /// Any bytes decode to a typed error or a checked change, never a
        /// panic.
        #[test]
        fn arbitrary_requests_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(req) = pb::RolloutRequest::decode(bytes.as_slice()) {
                let _ = parse_request(&req);
            }
        }
    }
}
