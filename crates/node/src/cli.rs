//! The commands that talk to a running node: `tern status`, `tern vm ...`,
//! `tern cluster ...`, `tern transport ...`. Each prints a table for
//! humans, or JSON with `--json`. Connection and identity: see
//! [`crate::client`].
//!
//! `tern transport set --config FILE` (no target) is the local emergency
//! override: it rewrites the `[transport]` section of the node's config
//! file (which pins the node's policy), checks the whole file, and sends
//! the node SIGHUP, which applies the new policy atomically; it then reads
//! the policy back through Status. Editing the file by hand and sending
//! SIGHUP does the same. With a target (`--node-id`, `--group`, `--all`)
//! it sets the cluster's desired policy instead ([`crate::policy_cli`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tern_protocol::catalog::methods;
use tern_protocol::pb;

use crate::client::{Conn, request_id};
use crate::config::Config;
use crate::error::CliError;
use crate::node::NodeFile;

/// Hex digits of a key shown in `tern access log` tables (as
/// `PeerId::short` shows ids): enough to tell keys apart.
const SHORT_KEY_HEX: usize = 16;

/// Prints a line to stdout, ignoring a closed pipe (`tern vm list | head`
/// must not panic).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// How long `tern transport set` waits for the node to show the new
/// policy after SIGHUP.
pub const POLICY_APPLY_WAIT: Duration = Duration::from_secs(10);

/// What to print.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// JSON instead of tables.
    pub json: bool,
}

/// A Raft role as `tern status` and the demo print it.
pub(crate) fn role_name(role: i32) -> &'static str {
    match pb::RaftRole::try_from(role) {
        Ok(pb::RaftRole::Leader) => "leader",
        Ok(pb::RaftRole::Follower) => "follower",
        Ok(pb::RaftRole::Candidate) => "candidate",
        Ok(pb::RaftRole::Learner) => "learner",
        Ok(pb::RaftRole::Shutdown) => "shutdown",
        Ok(pb::RaftRole::Agent) => "agent",
        _ => "unknown",
    }
}

/// A VM state's name.
pub fn state_name(state: i32) -> &'static str {
    match pb::VmState::try_from(state) {
        Ok(pb::VmState::Pending) => "pending",
        Ok(pb::VmState::Running) => "running",
        Ok(pb::VmState::Stopped) => "stopped",
        Ok(pb::VmState::Failed) => "failed",
        Ok(pb::VmState::Migrating) => "migrating",
        Ok(pb::VmState::Deleted) => "deleted",
        _ => "-",
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A member as JSON.
pub fn member_json(m: &pb::Member) -> Value {
    let a = m.address.clone().unwrap_or_default();
    json!({
        "node_id": m.node_id,
        "id": hex(&a.endpoint_id),
        "voter": m.voter,
        "grpc": a.grpc_url,
        "iroh": a.iroh_direct_addrs,
        "serves_iroh": a.serves_iroh,
        "vcpus": m.capacity.map(|c| c.vcpus),
        "memory_mib": m.capacity.map(|c| c.memory_mib),
    })
}

/// A policy as JSON.
pub fn policy_json(p: &pb::TransportPolicy) -> Value {
    json!({
        "mode": p.mode,
        "prefer_iroh": p.prefer_iroh,
        "raft_transport": p.raft_transport,
        "fallback_to_grpc": p.fallback_to_grpc,
    })
}

/// A policy on one line.
pub fn policy_line(p: &pb::TransportPolicy) -> String {
    format!(
        "mode={} prefer_iroh=[{}] raft={} fallback_to_grpc={}",
        p.mode,
        p.prefer_iroh.join(","),
        p.raft_transport,
        p.fallback_to_grpc
    )
}

/// A node status as JSON.
pub fn status_json(s: &pb::NodeStatus) -> Value {
    let a = s.address.clone().unwrap_or_default();
    json!({
        "node_id": s.node_id,
        "id": hex(&a.endpoint_id),
        "grpc": a.grpc_url,
        "iroh": a.iroh_direct_addrs,
        "role": role_name(s.role),
        "term": s.term,
        "leader_id": s.leader_id,
        "applied_index": s.applied_index,
        "commit_index": s.commit_index,
        "policy": s.policy.as_ref().map(policy_json),
        "policy_source": s.policy_source,
        "desired": s.desired.iter().map(crate::policy_cli::node_policy_json).collect::<Vec<_>>(),
        "version": s.version,
        "uptime_ms": s.uptime_ms,
        "members": s.members.iter().map(member_json).collect::<Vec<_>>(),
        "agents": s.agents.iter().map(agent_json).collect::<Vec<_>>(),
        "heartbeat_age_ms": s.heartbeat_age_ms,
    })
}

fn agent_json(a: &pb::AgentInfo) -> Value {
    let addr = a.address.clone().unwrap_or_default();
    json!({
        "node_id": a.node_id,
        "id": hex(&addr.endpoint_id),
        "status": a.status,
        "since_unix_ms": a.since_unix_ms,
        "heartbeat_age_ms": a.heartbeat_age_ms,
        "vms": a.vms,
        "capacity": a.capacity.map(|c| json!({"vcpus": c.vcpus, "memory_mib": c.memory_mib})),
    })
}

fn agents_rows(agents: &[pb::AgentInfo]) -> Vec<Vec<String>> {
    agents
        .iter()
        .map(|a| {
            let addr = a.address.clone().unwrap_or_default();
            let id = hex(&addr.endpoint_id);
            vec![
                a.node_id.to_string(),
                id.get(..10).unwrap_or(&id).to_owned(),
                a.status.clone(),
                if a.heartbeat_age_ms == 0 {
                    "-".into()
                } else {
                    format!(
                        "{:.1} s",
                        Duration::from_millis(a.heartbeat_age_ms).as_secs_f64()
                    )
                },
                a.vms.to_string(),
                a.capacity
                    .map(|c| format!("{} vcpu / {} MiB", c.vcpus, c.memory_mib))
                    .unwrap_or_default(),
            ]
        })
        .collect()
}

pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            s.push_str(&format!("{c:<w$}  "));
        }
        out!("{}", s.trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn members_rows(members: &[pb::Member], leader: u64) -> Vec<Vec<String>> {
    members
        .iter()
        .map(|m| {
            let a = m.address.clone().unwrap_or_default();
            let id = hex(&a.endpoint_id);
            vec![
                m.node_id.to_string(),
                id.get(..10).unwrap_or(&id).to_owned(),
                if m.node_id == leader {
                    "leader".into()
                } else if m.voter {
                    "voter".into()
                } else {
                    "learner".into()
                },
                if a.grpc_url.is_empty() {
                    "-".into()
                } else {
                    a.grpc_url.clone()
                },
                if a.serves_iroh || !a.iroh_direct_addrs.is_empty() {
                    a.iroh_direct_addrs.join(",")
                } else {
                    "-".into()
                },
                m.capacity
                    .map(|c| format!("{} vcpu / {} MiB", c.vcpus, c.memory_mib))
                    .unwrap_or_default(),
            ]
        })
        .collect()
}

/// `tern status`.
pub async fn status(conn: &Conn, out: Out) -> Result<(), CliError> {
    let s: pb::NodeStatus = conn
        .call(methods::STATUS_GET, &pb::StatusRequest {})
        .await?;
    if out.json {
        out!("{}", status_json(&s));
        return Ok(());
    }
    let a = s.address.clone().unwrap_or_default();
    out!("node       {} ({})", s.node_id, hex(&a.endpoint_id));
    out!(
        "role       {} (term {}, leader {})",
        role_name(s.role),
        s.term,
        if s.leader_id == 0 {
            "unknown".to_owned()
        } else {
            s.leader_id.to_string()
        }
    );
    out!("applied    {} / commit {}", s.applied_index, s.commit_index);
    out!(
        "grpc       {}",
        if a.grpc_url.is_empty() {
            "off".into()
        } else {
            a.grpc_url.clone()
        }
    );
    out!(
        "iroh       {}",
        if a.iroh_direct_addrs.is_empty() {
            "off".into()
        } else {
            a.iroh_direct_addrs.join(", ")
        }
    );
    if let Some(p) = &s.policy {
        out!("policy     {} (from {})", policy_line(p), s.policy_source);
    }
    if s.role == pb::RaftRole::Agent as i32 {
        out!(
            "heartbeat  acknowledged {:.1} s ago by the leader",
            Duration::from_millis(s.heartbeat_age_ms).as_secs_f64()
        );
    }
    out!("version    {} (up {} s)\n", s.version, s.uptime_ms / 1000);
    print_table(
        &["node", "id", "role", "grpc", "iroh", "declared capacity"],
        &members_rows(&s.members, s.leader_id),
    );
    if !s.agents.is_empty() {
        let ready = s.agents.iter().filter(|a| a.status == "ready").count();
        out!("\nagents     {} ({ready} ready)", s.agents.len());
        print_table(
            &[
                "node",
                "id",
                "status",
                "heartbeat",
                "vms",
                "declared capacity",
            ],
            &agents_rows(&s.agents),
        );
    }
    crate::policy_cli::print_policies(conn, &s).await;
    Ok(())
}

/// The user data `tern vm create` sends: `--user-data` as given, or the
/// contents of `--user-data-file` (its size is checked by the node, which
/// names the field).
pub fn user_data_arg(text: Option<String>, file: Option<PathBuf>) -> Result<String, CliError> {
    match (text, file) {
        (Some(text), _) => Ok(text),
        (None, Some(path)) => std::fs::read_to_string(&path).map_err(|e| {
            CliError::File(format!(
                "--user-data-file {}: cannot read it: {e}",
                path.display()
            ))
        }),
        (None, None) => Ok(String::new()),
    }
}

/// A VM record as JSON.
pub fn vm_json(v: &pb::VmRecord) -> Value {
    let spec = v.spec.clone().unwrap_or_default();
    json!({
        "id": v.id,
        "name": spec.name,
        "node_id": v.node_id,
        "desired": state_name(v.desired),
        "observed": state_name(v.observed),
        "runtime": spec.runtime,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "command": spec.command,
        "reason": v.reason,
        "log_path": v.log_path,
        "generation": v.generation,
        "address": v.address,
        "mac": v.mac,
        "gateway": v.gateway,
    })
}

fn vm_rows(vms: &[pb::VmRecord]) -> Vec<Vec<String>> {
    vms.iter()
        .map(|v| {
            let spec = v.spec.clone().unwrap_or_default();
            vec![
                v.id.clone(),
                spec.name,
                v.node_id.to_string(),
                state_name(v.desired).into(),
                state_name(v.observed).into(),
                spec.runtime,
                format!("{} / {} MiB", spec.vcpus, spec.memory_mib),
                or_dash(&v.address),
                or_dash(&v.mac),
                v.reason.clone(),
            ]
        })
        .collect()
}

/// An empty field as `-`, so columns stay readable.
fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

const VM_HEADER: [&str; 10] = [
    "id", "name", "node", "desired", "observed", "runtime", "size", "address", "mac", "reason",
];

/// Prints one VM.
pub fn print_vm(v: &pb::VmRecord, out: Out) {
    if out.json {
        out!("{}", vm_json(v));
    } else {
        print_table(&VM_HEADER, &vm_rows(std::slice::from_ref(v)));
    }
}

/// The VM subcommands.
#[derive(Debug, Clone)]
pub enum VmCmd {
    /// Create.
    Create(pb::VmSpec),
    /// Start.
    Start(String),
    /// Stop.
    Stop(String),
    /// Delete.
    Delete(String),
    /// List (0 = all nodes).
    List(u64),
    /// Status of one VM.
    Status(String),
    /// Migrate to a node.
    Migrate(String, u64),
}

/// `tern vm ...`.
pub async fn vm(conn: &Conn, cmd: VmCmd, out: Out) -> Result<(), CliError> {
    let action = |vm_id: String| pb::VmActionRequest {
        request_id: request_id(),
        vm_id,
    };
    let record: pb::VmRecord = match cmd {
        VmCmd::Create(spec) => {
            conn.call(
                methods::VM_CREATE,
                &pb::CreateVmRequest {
                    request_id: request_id(),
                    spec: Some(spec),
                },
            )
            .await?
        }
        VmCmd::Start(id) => conn.call(methods::VM_START, &action(id)).await?,
        VmCmd::Stop(id) => conn.call(methods::VM_STOP, &action(id)).await?,
        VmCmd::Delete(id) => conn.call(methods::VM_DELETE, &action(id)).await?,
        VmCmd::Status(vm_id) => {
            conn.call(methods::VM_GET, &pb::GetVmRequest { vm_id })
                .await?
        }
        VmCmd::Migrate(vm_id, target_node) => {
            conn.call(
                methods::VM_MIGRATE,
                &pb::MigrateVmRequest {
                    request_id: request_id(),
                    vm_id,
                    target_node,
                },
            )
            .await?
        }
        VmCmd::List(node_id) => {
            let list: pb::ListVmsResponse = conn
                .call(methods::VM_LIST, &pb::ListVmsRequest { node_id })
                .await?;
            if out.json {
                out!(
                    "{}",
                    json!({
                        "revision": list.revision,
                        "vms": list.vms.iter().map(vm_json).collect::<Vec<_>>(),
                    })
                );
            } else {
                if list.vms.is_empty() {
                    out!("no VMs (create one with `tern vm create NAME -- COMMAND...`)");
                } else {
                    print_table(&VM_HEADER, &vm_rows(&list.vms));
                }
                out!(
                    "\nas of revision {0} (follow the changes after it: `tern vm watch --since {0}`)",
                    list.revision
                );
            }
            return Ok(());
        }
    };
    print_vm(&record, out);
    Ok(())
}

/// `tern cluster members`.
pub async fn members(conn: &Conn, out: Out) -> Result<(), CliError> {
    let m: pb::MembersResponse = conn
        .call(methods::CLUSTER_MEMBERS, &pb::MembersRequest {})
        .await?;
    if out.json {
        out!(
            "{}",
            json!({
                "leader_id": m.leader_id,
                "members": m.members.iter().map(member_json).collect::<Vec<_>>(),
            })
        );
    } else {
        print_table(
            &["node", "id", "role", "grpc", "iroh", "declared capacity"],
            &members_rows(&m.members, m.leader_id),
        );
    }
    Ok(())
}

/// `tern cluster leave [NODE_ID]`: removes a node (by default the one the
/// CLI talks to) from the cluster. Needs a member's key (`--data-dir`).
pub async fn leave(conn: &Conn, node_id: Option<u64>, out: Out) -> Result<(), CliError> {
    let node_id = match node_id {
        Some(id) => id,
        None => {
            let s: pb::NodeStatus = conn
                .call(methods::STATUS_GET, &pb::StatusRequest {})
                .await?;
            s.node_id
        }
    };
    let r: pb::LeaveResponse = conn
        .call(methods::CLUSTER_LEAVE, &pb::LeaveRequest { node_id })
        .await?;
    if out.json {
        out!(
            "{}",
            json!({"left": node_id, "members": r.members.iter().map(member_json).collect::<Vec<_>>()})
        );
    } else {
        out!("node {node_id} left the cluster; members now:");
        print_table(
            &["node", "id", "role", "grpc", "iroh", "declared capacity"],
            &members_rows(&r.members, 0),
        );
        out!("\nstop its `tern run` process; its data directory can be removed.");
    }
    Ok(())
}

/// `tern cluster meta set KEY VALUE`: a put to the metadata register
/// (through Raft; a follower forwards it to the leader). Prints the log
/// index it committed at. A retry with the same `--request-id` is applied
/// once.
pub async fn meta_set(
    conn: &Conn,
    key: String,
    value: String,
    request_id: Option<String>,
    out: Out,
) -> Result<(), CliError> {
    let request_id = request_id.unwrap_or_else(crate::client::request_id);
    let r: pb::MetaPutResponse = conn
        .call(
            methods::CLUSTER_META_PUT,
            &pb::MetaPutRequest {
                request_id: request_id.clone(),
                key: key.clone(),
                value,
                forwarded: false,
            },
        )
        .await?;
    if out.json {
        out!(
            "{}",
            json!({"key": key, "index": r.index, "leader_id": r.leader_id, "request_id": request_id})
        );
    } else {
        out!(
            "{key} set at index {} (leader node {})",
            r.index,
            r.leader_id
        );
    }
    Ok(())
}

/// `tern cluster meta get KEY`: a linearizable read of the metadata
/// register (the leader confirms its leadership with a quorum first; a
/// node without a quorum fails instead of answering a stale value).
pub async fn meta_get(conn: &Conn, key: String, out: Out) -> Result<(), CliError> {
    let r: pb::MetaGetResponse = conn
        .call(
            methods::CLUSTER_META_GET,
            &pb::MetaGetRequest {
                key: key.clone(),
                forwarded: false,
            },
        )
        .await?;
    if out.json {
        out!(
            "{}",
            json!({
                "key": key,
                "found": r.found,
                "value": r.found.then_some(&r.value),
                "write_index": r.found.then_some(r.write_index),
                "read_index": r.read_index,
                "leader_id": r.leader_id,
            })
        );
    } else if r.found {
        out!("{}", r.value);
        eprintln!(
            "(written at index {}, read at index {} by leader node {})",
            r.write_index, r.read_index, r.leader_id
        );
    } else {
        out!(
            "{key} is not set (read at index {} by leader node {})",
            r.read_index,
            r.leader_id
        );
    }
    Ok(())
}

fn access_grants_json(r: &pb::AccessListResponse) -> Value {
    Value::Array(
        r.grants
            .iter()
            .map(|g| json!({ "key": hex(&g.key), "roles": g.roles }))
            .collect(),
    )
}

/// `tern access grant|revoke KEY ROLE`: changes the access table (admin
/// only; the leader serves it, the CLI retries there) and prints the table.
pub async fn access_change(
    conn: &Conn,
    key: &str,
    role: &str,
    grant: bool,
    out: Out,
) -> Result<(), CliError> {
    let id: tern_protocol::PeerId = key.parse().map_err(|e| {
        CliError::Argument(format!(
            "KEY {key:?}: {e} (a key is 64 hex digits, as `tern key new` prints)"
        ))
    })?;
    if tern_protocol::access::Role::from_name(role).is_none() {
        return Err(CliError::Argument(format!(
            "ROLE {role:?}: expected viewer, operator or admin"
        )));
    }
    let method = if grant {
        methods::CLUSTER_ACCESS_GRANT
    } else {
        methods::CLUSTER_ACCESS_REVOKE
    };
    let r: pb::AccessListResponse = conn
        .call(
            method,
            &pb::AccessChangeRequest {
                request_id: request_id(),
                key: bytes::Bytes::copy_from_slice(id.as_bytes()),
                role: role.to_owned(),
            },
        )
        .await?;
    print_access(&r, out);
    Ok(())
}

fn print_access(r: &pb::AccessListResponse, out: Out) {
    if out.json {
        out!("{}", access_grants_json(r));
        return;
    }
    out!("{:<64}  ROLES", "KEY");
    for g in &r.grants {
        out!("{:<64}  {}", hex(&g.key), g.roles.join(","));
    }
    out!("(members, the nodes of the cluster, hold the member role by their membership)");
}

/// `tern access list`: keys and their roles.
pub async fn access_list(conn: &Conn, out: Out) -> Result<(), CliError> {
    let r: pb::AccessListResponse = conn
        .call(methods::CLUSTER_ACCESS_LIST, &pb::AccessListRequest {})
        .await?;
    print_access(&r, out);
    Ok(())
}

/// `tern access log`: every recorded access change, oldest first.
pub async fn access_log(conn: &Conn, out: Out) -> Result<(), CliError> {
    let r: pb::AccessListResponse = conn
        .call(methods::CLUSTER_ACCESS_LIST, &pb::AccessListRequest {})
        .await?;
    if out.json {
        let log: Vec<Value> = r
            .log
            .iter()
            .map(|e| {
                json!({
                    "seq": e.seq,
                    "at_unix_ms": e.at_unix_ms,
                    "by": hex(&e.by),
                    "action": e.action,
                    "key": hex(&e.key),
                    "role": e.role,
                    "node_id": e.node_id,
                    "token_id": e.token_id,
                })
            })
            .collect();
        out!("{}", Value::Array(log));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = r
        .log
        .iter()
        .map(|e| {
            let dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
            vec![
                e.seq.to_string(),
                e.at_unix_ms.to_string(),
                hex(&e.by)[..SHORT_KEY_HEX.min(e.by.len() * 2)].to_owned(),
                e.action.clone(),
                dash(hex(&e.key)[..SHORT_KEY_HEX.min(e.key.len() * 2)].to_owned()),
                dash(e.role.clone()),
                if e.node_id == 0 {
                    "-".to_owned()
                } else {
                    e.node_id.to_string()
                },
                dash(e.token_id.clone()),
            ]
        })
        .collect();
    print_table(
        &[
            "seq",
            "at_unix_ms",
            "by",
            "action",
            "key",
            "role",
            "node",
            "token",
        ],
        &rows,
    );
    Ok(())
}

/// Parses a token lifetime: a number with `s`, `m`, `h` or `d`.
pub fn parse_ttl(text: &str) -> Result<u64, CliError> {
    let bad = || {
        CliError::Argument(format!(
            "--ttl {text:?}: expected a number and a unit, e.g. 90s, 30m, 1h, 2d"
        ))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_secs)
        .filter(|secs| *secs > 0)
        .ok_or_else(bad)
}

fn token_rows(tokens: &[pb::JoinTokenInfo]) -> Vec<Vec<String>> {
    tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.expires_at_unix_ms.to_string(),
                if t.unlimited {
                    "unlimited".to_owned()
                } else {
                    t.uses_left.to_string()
                },
                t.used.to_string(),
                hex(&t.created_by)[..SHORT_KEY_HEX.min(t.created_by.len() * 2)].to_owned(),
            ]
        })
        .collect()
}

fn token_json(t: &pb::JoinTokenInfo) -> Value {
    json!({
        "id": t.id,
        "created_by": hex(&t.created_by),
        "created_at_unix_ms": t.created_at_unix_ms,
        "expires_at_unix_ms": t.expires_at_unix_ms,
        "uses_left": if t.unlimited { Value::Null } else { json!(t.uses_left) },
        "used": t.used,
    })
}

const TOKEN_COLUMNS: [&str; 5] = [
    "id",
    "expires_at_unix_ms",
    "uses_left",
    "used",
    "created_by",
];

/// `tern cluster token create --ttl TTL [--uses N]`: prints the token once.
pub async fn token_create(
    conn: &Conn,
    ttl: &str,
    uses: Option<u32>,
    out: Out,
) -> Result<(), CliError> {
    let ttl_secs = parse_ttl(ttl)?;
    if uses == Some(0) {
        return Err(CliError::Argument(
            "--uses 0: a token admits at least one node (omit --uses for any number until it expires)".into(),
        ));
    }
    let r: pb::TokenCreateResponse = conn
        .call(
            methods::CLUSTER_TOKEN_CREATE,
            &pb::TokenCreateRequest {
                request_id: request_id(),
                ttl_secs,
                uses: uses.unwrap_or(0),
            },
        )
        .await?;
    let info = r.info.unwrap_or_default();
    if out.json {
        out!("{}", json!({"token": r.token, "info": token_json(&info)}));
        return Ok(());
    }
    out!("{}", r.token);
    out!(
        "# token {} admits {} until {} (unix ms); it is shown only now.",
        info.id,
        if info.unlimited {
            "any number of nodes".to_owned()
        } else {
            format!("{} node(s)", info.uses_left)
        },
        info.expires_at_unix_ms
    );
    out!("# On each new node: [cluster] join_token = \"{}\"", r.token);
    Ok(())
}

/// `tern cluster token list`.
pub async fn token_list(conn: &Conn, out: Out) -> Result<(), CliError> {
    let r: pb::TokenListResponse = conn
        .call(methods::CLUSTER_TOKEN_LIST, &pb::TokenListRequest {})
        .await?;
    if out.json {
        out!(
            "{}",
            Value::Array(r.tokens.iter().map(token_json).collect())
        );
    } else {
        print_table(&TOKEN_COLUMNS, &token_rows(&r.tokens));
    }
    Ok(())
}

/// `tern cluster token revoke ID`.
pub async fn token_revoke(conn: &Conn, id: &str, out: Out) -> Result<(), CliError> {
    let r: pb::TokenListResponse = conn
        .call(
            methods::CLUSTER_TOKEN_REVOKE,
            &pb::TokenRevokeRequest {
                request_id: request_id(),
                id: id.to_owned(),
            },
        )
        .await?;
    if out.json {
        out!(
            "{}",
            json!({"revoked": id, "tokens": r.tokens.iter().map(token_json).collect::<Vec<_>>()})
        );
    } else {
        out!("token {id} revoked; live tokens:");
        print_table(&TOKEN_COLUMNS, &token_rows(&r.tokens));
    }
    Ok(())
}

/// `tern cluster promote NODE_ID`: a learner becomes a voter.
pub async fn promote(conn: &Conn, node_id: u64, out: Out) -> Result<(), CliError> {
    let m: pb::MembersResponse = conn
        .call(methods::CLUSTER_PROMOTE, &pb::PromoteRequest { node_id })
        .await?;
    if out.json {
        out!(
            "{}",
            json!({
                "promoted": node_id,
                "leader_id": m.leader_id,
                "members": m.members.iter().map(member_json).collect::<Vec<_>>(),
            })
        );
    } else {
        out!("node {node_id} is a voter; members now:");
        print_table(
            &["node", "id", "role", "grpc", "iroh", "declared capacity"],
            &members_rows(&m.members, m.leader_id),
        );
    }
    Ok(())
}

/// Attempts of `tern cluster demote` while leadership moves away from the
/// node being demoted.
const DEMOTE_ATTEMPTS: usize = 5;

/// Pause between those attempts: an election's worth.
const DEMOTE_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// `tern cluster demote NODE_ID`: a server becomes an agent, keeping its
/// node id and its VMs. Demoting the leader moves leadership first; the
/// call is then repeated at the new leader.
pub async fn demote(conn: &Conn, node_id: u64, out: Out) -> Result<(), CliError> {
    let mut attempt = 0;
    let m: pb::MembersResponse = loop {
        attempt += 1;
        match conn
            .call(methods::CLUSTER_DEMOTE, &pb::DemoteRequest { node_id })
            .await
        {
            Err(e)
                if attempt < DEMOTE_ATTEMPTS && e.to_string().contains("leadership is moving") =>
            {
                tokio::time::sleep(DEMOTE_RETRY_PAUSE).await;
            }
            other => break other?,
        }
    };
    if out.json {
        out!(
            "{}",
            json!({
                "demoted": node_id,
                "leader_id": m.leader_id,
                "members": m.members.iter().map(member_json).collect::<Vec<_>>(),
            })
        );
    } else {
        out!("node {node_id} is an agent now; servers:");
        print_table(
            &["node", "id", "role", "grpc", "iroh", "declared capacity"],
            &members_rows(&m.members, m.leader_id),
        );
        out!(
            "\nits `tern run` stops by itself; set role = \"agent\" under [node] in its config and \
             start it again (same data directory, no join token): it keeps its node id and its VMs."
        );
    }
    Ok(())
}

/// `tern cluster join`: a node joins by configuration, at start. This
/// prints the `[cluster]` lines that make a new node join through the
/// node the CLI talks to.
pub async fn join_info(conn: &Conn, out: Out) -> Result<(), CliError> {
    let s: pb::NodeStatus = conn
        .call(methods::STATUS_GET, &pb::StatusRequest {})
        .await?;
    let a = s.address.clone().unwrap_or_default();
    let id = hex(&a.endpoint_id);
    let iroh = a
        .iroh_direct_addrs
        .iter()
        .map(|x| format!("{x:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if out.json {
        out!(
            "{}",
            json!({"id": id, "grpc": a.grpc_url, "iroh": a.iroh_direct_addrs})
        );
        return Ok(());
    }
    out!("# A node joins when it starts. In the new node's config file:");
    out!("[cluster]");
    out!("join_token = \"<a token from: tern cluster token create --ttl 1h>\"");
    let mut seed = format!("join = [{{ id = \"{id}\"");
    if !a.grpc_url.is_empty() {
        seed.push_str(&format!(", grpc = \"{}\"", a.grpc_url));
    }
    if !iroh.is_empty() {
        seed.push_str(&format!(", iroh = [{iroh}]"));
    }
    seed.push_str(" }]");
    out!("{seed}");
    out!("# then: tern run --config NEW_NODE.toml");
    Ok(())
}

/// `tern transport show`.
pub async fn transport_show(conn: &Conn, out: Out) -> Result<(), CliError> {
    let s: pb::NodeStatus = conn
        .call(methods::STATUS_GET, &pb::StatusRequest {})
        .await?;
    let p = s.policy.unwrap_or_default();
    if out.json {
        out!("{}", policy_json(&p));
    } else {
        out!("# in force from: {}", s.policy_source);
        out!("[transport]");
        out!("mode = {:?}", p.mode);
        out!("[transport.migration]");
        out!("prefer_iroh = {:?}", p.prefer_iroh);
        out!("raft_transport = {:?}", p.raft_transport);
        out!("fallback_to_grpc = {}", p.fallback_to_grpc);
    }
    Ok(())
}

/// The changes `tern transport set` makes.
#[derive(Debug, Clone, Default)]
pub struct PolicyEdit {
    /// `transport.mode`.
    pub mode: Option<String>,
    /// `transport.migration.prefer_iroh`.
    pub prefer_iroh: Option<Vec<String>>,
    /// `transport.migration.raft_transport`.
    pub raft_transport: Option<String>,
    /// `transport.migration.fallback_to_grpc`.
    pub fallback_to_grpc: Option<bool>,
}

/// Rewrites the `[transport]` section of the config file at `path` with
/// `edit` and returns the new text, checked. Other sections are kept
/// (comments are not).
pub fn edit_config(path: &Path, edit: &PolicyEdit) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::File(format!("cannot read {}: {e}", path.display())))?;
    let mut doc: toml::Table =
        toml::from_str(&text).map_err(|e| CliError::File(format!("{}: {e}", path.display())))?;
    let transport = doc
        .entry("transport")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let transport = transport
        .as_table_mut()
        .ok_or_else(|| CliError::File(format!("{}: transport: is not a table", path.display())))?;
    if let Some(m) = &edit.mode {
        transport.insert("mode".into(), toml::Value::String(m.clone()));
    }
    let migration = transport
        .entry("migration")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| {
            CliError::File(format!(
                "{}: transport.migration: is not a table",
                path.display()
            ))
        })?;
    if let Some(p) = &edit.prefer_iroh {
        migration.insert(
            "prefer_iroh".into(),
            toml::Value::Array(p.iter().cloned().map(toml::Value::String).collect()),
        );
    }
    if let Some(r) = &edit.raft_transport {
        migration.insert("raft_transport".into(), toml::Value::String(r.clone()));
    }
    if let Some(f) = edit.fallback_to_grpc {
        migration.insert("fallback_to_grpc".into(), toml::Value::Boolean(f));
    }
    let new =
        toml::to_string(&doc).map_err(|e| CliError::File(format!("writing the config: {e}")))?;
    Config::parse(&new).map_err(|e| {
        CliError::Argument(format!("{}: {e}; the file was not changed", path.display()))
    })?;
    Ok(new)
}

/// `tern transport set`: edit the config file, check it, SIGHUP the node,
/// and wait until Status shows the new policy.
pub async fn transport_set(
    conn: &Conn,
    config_path: &Path,
    edit: &PolicyEdit,
    out: Out,
) -> Result<(), CliError> {
    let new_text = edit_config(config_path, edit)?;
    let checked = Config::parse(&new_text).map_err(|e| CliError::Argument(e.to_string()))?;
    let file = NodeFile::read(&checked.config.data_dir)?;
    let tmp = config_path.with_extension("toml.tmp");
    std::fs::write(&tmp, &new_text)
        .map_err(|e| CliError::File(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, config_path)
        .map_err(|e| CliError::File(format!("cannot replace {}: {e}", config_path.display())))?;
    let pid = rustix::process::Pid::from_raw(i32::try_from(file.pid).unwrap_or(0))
        .ok_or_else(|| CliError::File("the node file names no process".into()))?;
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).map_err(|e| {
        CliError::Node(format!(
            "the config file was updated, but signalling the node (pid {}) failed: {e}; send it SIGHUP yourself",
            file.pid
        ))
    })?;
    let want = crate::node::policy_to_pb(&checked.policy);
    let deadline = tokio::time::Instant::now() + POLICY_APPLY_WAIT;
    loop {
        let s: pb::NodeStatus = conn
            .call(methods::STATUS_GET, &pb::StatusRequest {})
            .await?;
        if s.policy.as_ref() == Some(&want) {
            if out.json {
                out!("{}", policy_json(&want));
            } else {
                out!("applied: {}", policy_line(&want));
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Node(format!(
                "the node still runs {} after {POLICY_APPLY_WAIT:?}; see its log for the reload error",
                s.policy.as_ref().map(policy_line).unwrap_or_default()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lifetimes_parse_with_a_unit_and_nothing_else() {
        assert_eq!(parse_ttl("90s").unwrap(), 90);
        assert_eq!(parse_ttl("30m").unwrap(), 1800);
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("2d").unwrap(), 172_800);
        for bad in [
            "",
            "1",
            "h",
            "0h",
            "1w",
            "-1h",
            "1.5h",
            "99999999999999999999d",
        ] {
            let e = parse_ttl(bad).unwrap_err();
            assert!(matches!(e, CliError::Argument(_)), "{bad:?}: {e:?}");
            assert!(e.to_string().contains("--ttl"), "{e}");
        }
    }

    #[test]
    fn transport_set_rewrites_only_the_policy_and_checks_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "data_dir = \"/var/lib/tern\"\n[listen]\ngrpc = \"127.0.0.1:7400\"\n[transport]\nmode = \"grpc\"\n",
        )
        .unwrap();
        let edit = PolicyEdit {
            mode: Some("dual".into()),
            prefer_iroh: Some(vec!["health".into(), "status".into()]),
            raft_transport: Some("adaptive".into()),
            fallback_to_grpc: None,
        };
        let text = edit_config(&path, &edit).unwrap();
        let checked = Config::parse(&text).unwrap();
        assert_eq!(
            checked.config.data_dir,
            std::path::PathBuf::from("/var/lib/tern")
        );
        let p = checked.policy.to_config();
        assert_eq!(p.mode.as_str(), "dual");
        assert_eq!(p.migration.prefer_iroh, vec!["health", "status"]);
        assert_eq!(p.migration.raft_transport.as_str(), "adaptive");
        assert!(p.migration.fallback_to_grpc);

        let bad = PolicyEdit {
            prefer_iroh: Some(vec!["helth".into()]),
            ..PolicyEdit::default()
        };
        let e = edit_config(&path, &bad).unwrap_err();
        assert!(matches!(e, CliError::Argument(_)), "{e:?}");
        assert_eq!(e.exit_code(), 2);
        let e = e.to_string();
        assert!(
            e.contains("prefer_iroh[0]") && e.contains("not changed"),
            "{e}"
        );
    }
}
