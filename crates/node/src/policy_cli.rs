//! The cluster's desired transport policies from the command line:
//! `tern transport set|clear --node-id ID | --group KEY=VALUE | --all`
//! (`Cluster/TransportSet`, operator role, from any machine), and the
//! per-node policy table `tern status` prints.
//!
//! The target flag is `--node-id`, not `--node`: `--node ID@URL` already
//! names the node the CLI talks to. Without a target, `tern transport set`
//! edits the node's own config file and sends it SIGHUP (the emergency
//! override; see [`crate::cli::transport_set`]).

use serde_json::{Value, json};
use tern_protocol::catalog::methods;
use tern_protocol::policy::{Mode, RaftTransport, TransportConfig};
use tern_protocol::{PeerAddr, pb};
use tern_state::{PolicyTarget, Selector, check_policy};

use crate::cli::{Out, PolicyEdit, policy_json, policy_line, print_table};
use crate::client::{Conn, request_id};
use crate::error::CliError;

macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The remote target the flags name: `None` when none is given (the local
/// file path), an error when more than one is.
pub fn target(
    node_id: Option<u64>,
    group: Option<&str>,
    all: bool,
) -> Result<Option<PolicyTarget>, CliError> {
    let given = usize::from(node_id.is_some()) + usize::from(group.is_some()) + usize::from(all);
    if given > 1 {
        return Err(CliError::Argument(
            "give one of --node-id ID, --group KEY=VALUE or --all".into(),
        ));
    }
    if let Some(id) = node_id {
        if id == 0 {
            return Err(CliError::Argument(
                "--node-id 0: 0 is never a node id".into(),
            ));
        }
        return Ok(Some(PolicyTarget::Node(id)));
    }
    if let Some(text) = group {
        let s = Selector::parse(text).map_err(|e| CliError::Argument(format!("--group: {e}")))?;
        return Ok(Some(PolicyTarget::Group(s)));
    }
    Ok(all.then_some(PolicyTarget::All))
}

/// The policy `edit` describes, from the defaults (`--mode` is required),
/// checked as the config file's `[transport]` is.
pub fn policy_of(edit: &PolicyEdit) -> Result<TransportConfig, CliError> {
    let mode = edit.mode.as_deref().ok_or_else(|| {
        CliError::Argument(
            "--mode is required with --node-id, --group or --all (\"grpc\", \"iroh\" or \"dual\")"
                .into(),
        )
    })?;
    let mut c = TransportConfig {
        mode: Mode::from_name(mode).ok_or_else(|| {
            CliError::Argument(format!(
                "--mode {mode:?}: use \"grpc\", \"iroh\" or \"dual\""
            ))
        })?,
        ..TransportConfig::default()
    };
    if let Some(p) = &edit.prefer_iroh {
        c.migration.prefer_iroh = p.clone();
    }
    if let Some(r) = &edit.raft_transport {
        c.migration.raft_transport = RaftTransport::from_name(r).ok_or_else(|| {
            CliError::Argument(format!(
                "--raft {r:?}: use \"grpc\", \"iroh\" or \"adaptive\""
            ))
        })?;
    }
    if let Some(f) = edit.fallback_to_grpc {
        c.migration.fallback_to_grpc = f;
    }
    check_policy(&c).map_err(|e| CliError::Argument(e.to_string()))?;
    Ok(c)
}

/// `tern transport set|clear` with a target: writes the cluster's desired
/// policy (`None` clears it) and prints every node's result.
pub async fn set_remote(
    conn: &Conn,
    target: &PolicyTarget,
    policy: Option<&TransportConfig>,
    out: Out,
) -> Result<(), CliError> {
    let req = tern_cluster::transport_set_request(&request_id(), target, policy);
    let resp: pb::TransportPoliciesResponse =
        conn.call(methods::CLUSTER_TRANSPORT_SET, &req).await?;
    if out.json {
        out!(
            "{}",
            json!({
                "leader_id": resp.leader_id,
                "nodes": resp.nodes.iter().map(node_policy_json).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    match policy {
        Some(p) => out!(
            "desired policy of {target} set: {}",
            policy_line(&p.to_pb())
        ),
        None => out!("desired policy of {target} cleared"),
    }
    out!(
        "(a node whose config file has a [transport] section keeps its file's policy; `tern status` shows what each node runs)\n"
    );
    let rows: Vec<Vec<String>> = resp
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node_id.to_string(),
                labels_text(n),
                n.policy.as_ref().map_or_else(|| "-".into(), policy_line),
                n.source.clone(),
            ]
        })
        .collect();
    print_table(&["node", "labels", "desired policy", "source"], &rows);
    Ok(())
}

fn labels_text(n: &pb::NodePolicy) -> String {
    if n.labels.is_empty() {
        return "-".into();
    }
    let mut l: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.sort();
    l.join(",")
}

/// One node's desired policy as JSON.
pub fn node_policy_json(n: &pb::NodePolicy) -> Value {
    json!({
        "node_id": n.node_id,
        "labels": n.labels,
        "desired": n.policy.as_ref().map(policy_json),
        "source": n.source,
    })
}

/// The per-node policy table of `tern status`: each member's policy in
/// force and its source (asked of the member itself; "unreachable" when
/// it does not answer) beside its desired policy.
pub async fn print_policies(conn: &Conn, status: &pb::NodeStatus) {
    let mut rows = Vec::new();
    for m in &status.members {
        let desired = status.desired.iter().find(|d| d.node_id == m.node_id);
        let in_force = if m.node_id == status.node_id {
            Ok(status.clone())
        } else {
            match m.address.as_ref().map(PeerAddr::try_from) {
                Some(Ok(addr)) => conn
                    .call_at::<_, pb::NodeStatus>(&addr, methods::STATUS_GET, &pb::StatusRequest {})
                    .await
                    .map_err(|e| e.to_string()),
                _ => Err("no address".into()),
            }
        };
        let (policy, source) = match in_force {
            Ok(s) => (
                s.policy.as_ref().map_or_else(|| "-".into(), policy_line),
                s.policy_source,
            ),
            Err(e) => (format!("unreachable ({e})"), "-".into()),
        };
        rows.push(vec![
            m.node_id.to_string(),
            desired.map_or_else(|| "-".into(), labels_text),
            policy,
            source,
            desired.map_or_else(
                || "-".into(),
                |d| match &d.policy {
                    Some(p) => format!("{} ({})", policy_line(p), d.source),
                    None => "-".into(),
                },
            ),
        ]);
    }
    out!("");
    print_table(
        &[
            "node",
            "labels",
            "policy in force",
            "source",
            "desired (source)",
        ],
        &rows,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_target_at_most_and_each_checked() {
        assert!(matches!(target(None, None, false), Ok(None)));
        assert!(matches!(
            target(Some(2), None, false),
            Ok(Some(PolicyTarget::Node(2)))
        ));
        assert!(target(Some(2), None, true).is_err());
        assert!(target(Some(0), None, false).is_err());
        let e = target(None, Some("zone"), false).unwrap_err().to_string();
        assert!(e.starts_with("--group"), "{e}");
        let edit = PolicyEdit {
            mode: Some("dual".into()),
            prefer_iroh: Some(vec!["helth".into()]),
            ..PolicyEdit::default()
        };
        let e = policy_of(&edit).unwrap_err().to_string();
        assert!(e.contains("transport.migration.prefer_iroh[0]"), "{e}");
        assert!(
            policy_of(&PolicyEdit::default()).is_err(),
            "--mode is required"
        );
    }
}
