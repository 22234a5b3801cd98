//! The desired transport policies: `Cluster/TransportSet` and the typed
//! client call for it ([`transport_set`]).
//!
//! An operator (checked by the node's access gate: the operator role, or
//! membership for a forwarding follower) sets or clears the policy of one
//! node, a group (`KEY=VALUE` over the nodes' labels) or all. The request
//! is checked here first (a typed `InvalidArgument` naming the field: the
//! target, the selector, the policy with the config file's validation),
//! then written as [`Command::SetTransportPolicy`] on the leader; a
//! follower forwards the call once, as the metadata register does
//! ([`crate::meta`]). The request id makes it idempotent. The answer is
//! every member's resulting desired policy and its source
//! ([`policies_response`]); each node applies its own when it sees the
//! entry (see `tern-node`'s `policy` module), unless its file pins
//! `[transport]`.

use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::policy::TransportConfig;
use tern_protocol::{Call, CallError, PeerAddr, RequestContext, RpcClient, Status, pb};
use tern_raft_net::Attached;
use tern_state::{
    ClusterState, Command, MAX_REQUEST_ID_LEN, PolicyTarget, Response, Selector, check_policy,
};

use crate::meta::LeaderWrite;

/// Every member's desired policy, labels and the policy's source, as the
/// protobuf answer (what Status shows as `desired`, too).
pub fn policies_response(state: &ClusterState) -> Vec<pb::NodePolicy> {
    tern_services::status::desired_policies(state)
}

/// The target and policy of a request, checked; errors name the field.
pub fn parse_request(
    req: &pb::TransportSetRequest,
) -> Result<(PolicyTarget, Option<TransportConfig>), Status> {
    if req.request_id.is_empty() || req.request_id.len() > MAX_REQUEST_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "field `request_id`: {} bytes; a request id is 1 to {MAX_REQUEST_ID_LEN} bytes, \
             chosen by the client so that retries are safe",
            req.request_id.len()
        )));
    }
    use pb::transport_set_request::Target;
    let target = match &req.target {
        None => {
            return Err(Status::invalid_argument(
                "field `target`: missing; name a node id, a group KEY=VALUE or all",
            ));
        }
        Some(Target::NodeId(0)) => {
            return Err(Status::invalid_argument(
                "field `node_id`: 0 is never a node id",
            ));
        }
        Some(Target::NodeId(id)) => PolicyTarget::Node(*id),
        Some(Target::Group(text)) => PolicyTarget::Group(
            Selector::parse(text)
                .map_err(|e| Status::invalid_argument(format!("field `group`: {e}")))?,
        ),
        Some(Target::All(true)) => PolicyTarget::All,
        Some(Target::All(false)) => {
            return Err(Status::invalid_argument(
                "field `all`: false names no node; set it to true, or name a node or a group",
            ));
        }
    };
    let policy = match &req.policy {
        None => None,
        Some(p) => {
            let config = TransportConfig::from_pb(p)
                .map_err(|e| Status::invalid_argument(format!("field `policy`: {e}")))?;
            check_policy(&config)
                .map_err(|e| Status::invalid_argument(format!("field `policy`: {e}")))?;
            Some(config)
        }
    };
    Ok((target, policy))
}

/// Serves `Cluster/TransportSet`.
pub(crate) async fn serve_set(
    node: &Attached,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let req = pb::TransportSetRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/transportset: {e}")))?;
    let (target, policy) = parse_request(&req)?;
    let command = Command::SetTransportPolicy {
        request_id: req.request_id.clone(),
        target,
        policy,
    };
    tracing::info!(%command, caller = %ctx.peer.short(), "transport policy change");
    let forwarded = || {
        pb::TransportSetRequest {
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
        methods::CLUSTER_TRANSPORT_SET,
        forwarded,
        req.forwarded,
    )
    .await?
    {
        LeaderWrite::Written(data) => data,
        LeaderWrite::Forwarded(answer) => return Ok(answer),
    };
    match written {
        Response::Done => {
            let nodes = node
                .sm
                .read(policies_response)
                .map_err(|e| Status::unavailable(format!("reading the state: {e}")))?;
            Ok(pb::TransportPoliciesResponse {
                nodes,
                leader_id: node.id,
            }
            .encode_to_vec()
            .into())
        }
        Response::Rejected(why) => Err(tern_services::vm::rejection_status(&why)),
        other => Err(Status::internal(format!(
            "the state answered a transport policy change with {other:?}"
        ))),
    }
}

/// The `Cluster/TransportSet` request setting (`policy` given) or clearing
/// the desired policy of `target`, as a client sends it.
pub fn transport_set_request(
    request_id: &str,
    target: &PolicyTarget,
    policy: Option<&TransportConfig>,
) -> pb::TransportSetRequest {
    use pb::transport_set_request::Target;
    pb::TransportSetRequest {
        request_id: request_id.to_owned(),
        target: Some(match target {
            PolicyTarget::Node(id) => Target::NodeId(*id),
            PolicyTarget::Group(s) => Target::Group(s.to_string()),
            PolicyTarget::All => Target::All(true),
        }),
        policy: policy.map(TransportConfig::to_pb),
        forwarded: false,
    }
}

/// Sets (`policy` given) or clears the desired policy of `target` through
/// the node at `addr` (any member; a follower forwards to the leader).
/// `request_id` makes retries safe. Answers every member's desired policy.
pub async fn transport_set(
    client: &dyn RpcClient,
    addr: &PeerAddr,
    request_id: &str,
    target: &PolicyTarget,
    policy: Option<&TransportConfig>,
    timeout: Duration,
) -> Result<pb::TransportPoliciesResponse, CallError> {
    let req = transport_set_request(request_id, target, policy);
    let call =
        Call::new(methods::CLUSTER_TRANSPORT_SET, req.encode_to_vec().into()).with_timeout(timeout);
    let bytes = client.call(addr, call).await?;
    pb::TransportPoliciesResponse::decode(bytes).map_err(|e| {
        CallError::Application(Status::internal(format!(
            "undecodable TransportPoliciesResponse: {e}"
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::transport_set_request::Target;

    fn req(target: Option<Target>, policy: Option<pb::TransportPolicy>) -> pb::TransportSetRequest {
        pb::TransportSetRequest {
            request_id: "r".into(),
            target,
            policy,
            forwarded: false,
        }
    }

    #[test]
    fn malformed_requests_are_refused_naming_the_field() {
        let msg = |r: pb::TransportSetRequest| parse_request(&r).unwrap_err().message;
        assert!(msg(req(None, None)).contains("`target`"));
        assert!(msg(req(Some(Target::NodeId(0)), None)).contains("`node_id`"));
        assert!(msg(req(Some(Target::Group("zone".into())), None)).contains("`group`"));
        assert!(msg(req(Some(Target::All(false)), None)).contains("`all`"));
        let mut bad = TransportConfig::default().to_pb();
        bad.prefer_iroh = vec!["raft".into()];
        bad.mode = "dual".into();
        let m = msg(req(Some(Target::All(true)), Some(bad)));
        assert!(m.contains("transport.migration.prefer_iroh[0]"), "{m}");
        let ok = parse_request(&req(
            Some(Target::Group("zone=a".into())),
            Some(TransportConfig::default().to_pb()),
        ))
        .unwrap();
        assert_eq!(
            ok.0,
            PolicyTarget::Group(Selector::parse("zone=a").unwrap())
        );
    }

    proptest::proptest! {
        /// Arbitrary request bytes decode and parse to a typed answer,
        /// never a panic.
        #[test]
        fn arbitrary_requests_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            if let Ok(r) = pb::TransportSetRequest::decode(bytes.as_slice()) {
                let _ = parse_request(&r);
            }
        }
    }
}
