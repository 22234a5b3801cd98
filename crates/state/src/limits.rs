//! Size limits on every write, checked before it reaches Raft.
//!
//! A command that is in the log is applied by every node, kept in every
//! snapshot and replicated to every new member, so its size is bounded
//! before it is proposed, like etcd's `--max-request-bytes`: per field
//! (each a named constant below) and as a whole ([`MAX_REQUEST_BYTES`],
//! the postcard encoding of the [`Command`]). [`check_command`] does
//! both; every write entry point calls it (the VM service to refuse early,
//! `tern_cluster::RaftNode::client_write` and `Raft/Propose` on the
//! leader as the last word). The state machine's `apply` does not: a
//! limit is a property of the write path, and an entry already in the
//! log must apply alike on nodes of any version.
//!
//! The relations that make an accepted write always replicable and every
//! snapshot decodable are checked at compile time: here (a single field is
//! never larger than a whole request), in `log_store` (an entry of a
//! largest request fits the store's entry bound), in `snapshot` (the
//! decoder's scratch buffer holds the largest field) and in `raft-net`
//! (one such entry fits an append-entries message within the frame limit).

use crate::command::Command;
use crate::member::Member;
use crate::vm::{VmRecord, VmReport, VmSpec};

/// Largest encoded command accepted for proposal: 1.5 MiB, etcd's default
/// `--max-request-bytes`. The cluster state is labels, VM specs and
/// reports; nothing legitimate comes near it, and every byte of an
/// accepted write is kept by every node and in every snapshot.
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// Longest client request id: UUIDs or similar; the bound keeps the
/// deduplication table's memory predictable.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Longest VM name: a DNS label is at most 63 bytes (RFC 1035), and names
/// end up in host names and file names.
pub const MAX_VM_NAME_LEN: usize = 63;

/// Longest VM id: ids name directories in a runtime's state dir and a unix
/// socket path, which is limited to 108 bytes.
pub const MAX_VM_ID_LEN: usize = 64;

/// Longest runtime name (`microvm`, `process`): room for a few more, no
/// room for data.
pub const MAX_RUNTIME_LEN: usize = 32;

/// Longest path in a spec or report (kernel, initrd, image, log): Linux's
/// `PATH_MAX`; a longer path cannot be opened anyway.
pub const MAX_PATH_LEN: usize = 4096;

/// Longest guest kernel command line: Linux's `COMMAND_LINE_SIZE` is 2048
/// bytes on x86 and at most 4096 on any architecture; a guest kernel cuts
/// anything longer.
pub const MAX_KERNEL_CMDLINE_LEN: usize = 4096;

/// Most arguments in a process workload's argv (program included): far
/// more than any command line a person writes, few enough to list.
pub const MAX_COMMAND_ARGS: usize = 256;

/// Longest single argument of a process workload: Linux's
/// `MAX_ARG_STRLEN` (32 pages), past which `execve` fails with `E2BIG`.
pub const MAX_COMMAND_ARG_LEN: usize = 128 * 1024;

/// Longest reason a node reports with a VM's state (an error message):
/// enough for a chain of causes, not for a log. Reconcilers cut longer
/// reasons to this before reporting.
pub const MAX_VM_REASON_LEN: usize = 4096;

/// Most bytes of user data an operator may hand a VM: it reaches a
/// microVM guest on its kernel command line (base64, a third larger),
/// which x86 Linux cuts at 2,048 bytes, beside the guest's own parameters.
pub const MAX_USER_DATA_LEN: usize = 1024;

/// Longest key of the metadata register, in bytes.
pub const MAX_META_KEY_LEN: usize = 256;

/// Longest value of the metadata register, in bytes: labels and small
/// settings, not blobs (every value is in every snapshot and every node's
/// memory).
pub const MAX_META_VALUE_LEN: usize = 4096;

/// Longest URL in a member's address (its gRPC URL, its iroh relay): a
/// scheme, a host name of at most 253 bytes and a port, with ample room
/// for a path.
pub const MAX_URL_LEN: usize = 2048;

/// Most direct iroh addresses a member may list: its interfaces' v4 and
/// v6 addresses, not a scan of the network.
pub const MAX_DIRECT_ADDRS: usize = 32;

/// The largest single string any command may carry: the bound the
/// snapshot decoder's scratch buffer must hold.
pub const MAX_STRING_FIELD_LEN: usize = max(
    max(
        max(MAX_REQUEST_ID_LEN, MAX_VM_NAME_LEN),
        max(MAX_VM_ID_LEN, MAX_RUNTIME_LEN),
    ),
    max(
        max(MAX_PATH_LEN, MAX_KERNEL_CMDLINE_LEN),
        max(
            MAX_COMMAND_ARG_LEN,
            max(
                max(MAX_VM_REASON_LEN, MAX_URL_LEN),
                max(max(MAX_META_KEY_LEN, MAX_META_VALUE_LEN), MAX_USER_DATA_LEN),
            ),
        ),
    ),
);

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

// Every field limit leaves room for the rest of a request.
const _: () = assert!(MAX_STRING_FIELD_LEN < MAX_REQUEST_BYTES / 4);
// A spec whose every argument is as long as allowed is still refused as a
// whole: the argument count is a bound of its own, the request size the
// one that matters.
const _: () = assert!(MAX_COMMAND_ARGS * MAX_COMMAND_ARG_LEN > MAX_REQUEST_BYTES);

/// A write refused for its size, before it was proposed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// One field is over its limit (answer `InvalidArgument`).
    #[error("field `{field}` is {len} {unit}; at most {max} {unit} are allowed")]
    Field {
        /// The field, as the request names it (`spec.command[3]`).
        field: String,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
        /// What `len` and `max` count: `bytes`, `arguments`, `addresses`.
        unit: &'static str,
    },
    /// The request as a whole is too large (answer `ResourceExhausted`).
    #[error(
        "the request encodes to {len} bytes; at most {max} bytes may be written to the cluster state at once"
    )]
    Request {
        /// Its encoded size.
        len: usize,
        /// The limit, [`MAX_REQUEST_BYTES`].
        max: usize,
    },
}

impl LimitError {
    /// Whether the whole request, rather than one field, is too large.
    pub fn is_whole_request(&self) -> bool {
        matches!(self, LimitError::Request { .. })
    }
}

fn bytes(field: impl Into<String>, value: &str, max: usize) -> Result<(), LimitError> {
    if value.len() > max {
        return Err(LimitError::Field {
            field: field.into(),
            len: value.len(),
            max,
            unit: "bytes",
        });
    }
    Ok(())
}

/// Checks the fields of a VM spec; `prefix` names the spec in errors.
pub fn check_spec(prefix: &str, spec: &VmSpec) -> Result<(), LimitError> {
    bytes(format!("{prefix}.name"), &spec.name, MAX_VM_NAME_LEN)?;
    bytes(format!("{prefix}.runtime"), &spec.runtime, MAX_RUNTIME_LEN)?;
    bytes(format!("{prefix}.kernel"), &spec.kernel, MAX_PATH_LEN)?;
    bytes(format!("{prefix}.initrd"), &spec.initrd, MAX_PATH_LEN)?;
    bytes(format!("{prefix}.image"), &spec.image, MAX_PATH_LEN)?;
    bytes(
        format!("{prefix}.kernel_cmdline"),
        &spec.kernel_cmdline,
        MAX_KERNEL_CMDLINE_LEN,
    )?;
    if spec.command.len() > MAX_COMMAND_ARGS {
        return Err(LimitError::Field {
            field: format!("{prefix}.command"),
            len: spec.command.len(),
            max: MAX_COMMAND_ARGS,
            unit: "arguments",
        });
    }
    for (i, arg) in spec.command.iter().enumerate() {
        bytes(format!("{prefix}.command[{i}]"), arg, MAX_COMMAND_ARG_LEN)?;
    }
    Ok(())
}

fn check_record(vm: &VmRecord) -> Result<(), LimitError> {
    bytes("vm.id", &vm.id, MAX_VM_ID_LEN)?;
    check_spec("vm.spec", &vm.spec)?;
    bytes("vm.reason", &vm.reason, MAX_VM_REASON_LEN)?;
    bytes("vm.log_path", &vm.log_path, MAX_PATH_LEN)
}

fn check_report(report: &VmReport) -> Result<(), LimitError> {
    bytes("report.vm_id", &report.vm_id, MAX_VM_ID_LEN)?;
    bytes("report.reason", &report.reason, MAX_VM_REASON_LEN)?;
    bytes("report.log_path", &report.log_path, MAX_PATH_LEN)
}

/// Checks a member record a node asks to join with (it is replicated in
/// every membership entry and snapshot).
pub fn check_member(member: &Member) -> Result<(), LimitError> {
    if let Some(url) = &member.addr.grpc {
        bytes("address.grpc_url", url, MAX_URL_LEN)?;
    }
    if let Some(iroh) = &member.addr.iroh {
        if let Some(relay) = &iroh.relay_url {
            bytes("address.iroh_relay_url", relay, MAX_URL_LEN)?;
        }
        if iroh.direct.len() > MAX_DIRECT_ADDRS {
            return Err(LimitError::Field {
                field: "address.iroh_direct_addrs".into(),
                len: iroh.direct.len(),
                max: MAX_DIRECT_ADDRS,
                unit: "addresses",
            });
        }
    }
    Ok(())
}

fn count(field: &str, len: usize, max: usize) -> Result<(), LimitError> {
    if len > max {
        return Err(LimitError::Field {
            field: field.into(),
            len,
            max,
            unit: "entries",
        });
    }
    Ok(())
}

/// Checks every field of `command` against its limit, then its encoded
/// size against [`MAX_REQUEST_BYTES`]. Call it before proposing.
pub fn check_command(command: &Command) -> Result<(), LimitError> {
    if let Some(id) = command.request_id() {
        bytes("request_id", id, MAX_REQUEST_ID_LEN)?;
    }
    match command {
        Command::AllocateNodeId { .. }
        | Command::ChangeAccess { .. }
        | Command::RecordMembership { .. }
        | Command::SetAgentStatus { .. }
        | Command::RemoveAgent { .. }
        | Command::DemoteServer { .. }
        | Command::SetNetworkPool { .. } => {}
        Command::RegisterAgent { addr, capacity, .. } => {
            check_member(&Member::new(addr.clone(), *capacity))?
        }
        Command::CreateJoinToken { token, .. } => {
            bytes("token.id", &token.id, crate::admission::TOKEN_ID_LEN)?
        }
        Command::RevokeJoinToken { id, .. } => bytes("id", id, crate::admission::TOKEN_ID_LEN)?,
        Command::AdmitNode { token_id, .. } => {
            bytes("token_id", token_id, crate::admission::TOKEN_ID_LEN)?
        }
        Command::PutVm { vm, .. } => check_record(vm)?,
        Command::DeleteVm { vm_id, .. }
        | Command::SetVmDesired { vm_id, .. }
        | Command::MigrateVm { vm_id, .. } => bytes("vm_id", vm_id, MAX_VM_ID_LEN)?,
        Command::CreateVm { spec, .. } => check_spec("spec", spec)?,
        Command::CreateVmWithData {
            spec, user_data, ..
        } => {
            check_spec("spec", spec)?;
            bytes("spec.user_data", user_data, MAX_USER_DATA_LEN)?;
        }
        Command::ReportVm { report, .. } => check_report(report)?,
        Command::PutMeta { key, value, .. } => {
            bytes("key", key, MAX_META_KEY_LEN)?;
            bytes("value", value, MAX_META_VALUE_LEN)?;
        }
        // Their contents are checked at apply (a refusal names the field);
        // here only their counts, so no write is padded past them.
        Command::SetNodeLabels { labels, .. } => {
            count("labels", labels.len(), crate::policy::MAX_LABELS)?
        }
        Command::SetTransportPolicy { policy, .. } => {
            if let Some(p) = policy {
                count(
                    "policy.prefer_iroh",
                    p.migration.prefer_iroh.len(),
                    crate::policy::MAX_PREFER_IROH,
                )?;
            }
        }
        Command::Rollout { op, last, .. } => {
            count("last", last.len(), crate::rollout::MAX_STAGE_NODES)?;
            use crate::rollout::RolloutOp;
            match op {
                RolloutOp::Start { plan } => {
                    count("plan.stage", plan.stages.len(), crate::rollout::MAX_STAGES)?
                }
                RolloutOp::Advance { checks, .. }
                | RolloutOp::Hold { checks, .. }
                | RolloutOp::RollBack { checks, .. } => {
                    count("checks", checks.len(), crate::rollout::MAX_CHECKS)?
                }
                _ => {}
            }
        }
    }
    let len = encoded_len(command);
    if len > MAX_REQUEST_BYTES {
        return Err(LimitError::Request {
            len,
            max: MAX_REQUEST_BYTES,
        });
    }
    Ok(())
}

/// The size of `command`'s postcard encoding (the form it takes in a log
/// entry). A value postcard cannot size counts as too large.
pub fn encoded_len(command: &Command) -> usize {
    postcard::experimental::serialized_size(command).unwrap_or(usize::MAX)
}

/// Cuts `text` to at most `max` bytes at a character boundary, marking the
/// cut with `…` (for reports whose reason comes from an error message).
pub fn truncate(text: &mut String, max: usize) {
    const MARK: &str = "…";
    if text.len() <= max {
        return;
    }
    let mut end = max.saturating_sub(MARK.len());
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    if text.len() + MARK.len() <= max {
        text.push_str(MARK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VmState;

    fn create(spec: VmSpec) -> Command {
        Command::CreateVm {
            request_id: "r".into(),
            spec: Box::new(spec),
        }
    }

    #[test]
    fn each_field_is_refused_by_name_and_limit() {
        let cases: Vec<(VmSpec, &str, usize)> = vec![
            (
                VmSpec {
                    name: "n".repeat(MAX_VM_NAME_LEN + 1),
                    ..VmSpec::default()
                },
                "spec.name",
                MAX_VM_NAME_LEN,
            ),
            (
                VmSpec {
                    kernel_cmdline: "c".repeat(MAX_KERNEL_CMDLINE_LEN + 1),
                    ..VmSpec::default()
                },
                "spec.kernel_cmdline",
                MAX_KERNEL_CMDLINE_LEN,
            ),
            (
                VmSpec {
                    image: "/".repeat(MAX_PATH_LEN + 1),
                    ..VmSpec::default()
                },
                "spec.image",
                MAX_PATH_LEN,
            ),
            (
                VmSpec {
                    command: vec!["ok".into(), "a".repeat(MAX_COMMAND_ARG_LEN + 1)],
                    ..VmSpec::default()
                },
                "spec.command[1]",
                MAX_COMMAND_ARG_LEN,
            ),
            (
                VmSpec {
                    command: vec![String::new(); MAX_COMMAND_ARGS + 1],
                    ..VmSpec::default()
                },
                "spec.command",
                MAX_COMMAND_ARGS,
            ),
        ];
        for (spec, field, max) in cases {
            let err = check_command(&create(spec)).unwrap_err();
            assert!(!err.is_whole_request(), "{err}");
            let text = err.to_string();
            assert!(text.contains(&format!("`{field}`")), "{text}");
            assert!(text.contains(&format!("at most {max}")), "{text}");
        }
        let meta = Command::PutMeta {
            request_id: "r".into(),
            key: "k".into(),
            value: "v".repeat(MAX_META_VALUE_LEN + 1),
        };
        assert!(
            check_command(&meta)
                .unwrap_err()
                .to_string()
                .contains("`value`")
        );
        let report = Command::ReportVm {
            request_id: "r".into(),
            report: VmReport {
                vm_id: "vm-1".into(),
                node_id: 1,
                observed: VmState::Failed,
                reason: "r".repeat(MAX_VM_REASON_LEN + 1),
                log_path: String::new(),
            },
        };
        let err = check_command(&report).unwrap_err();
        assert!(err.to_string().contains("`report.reason`"), "{err}");
    }

    #[test]
    fn a_request_of_allowed_fields_can_still_be_too_large() {
        // Exactly the limit in argument bytes: the encoding's overhead
        // takes it over.
        let args = MAX_REQUEST_BYTES / MAX_COMMAND_ARG_LEN;
        let spec = VmSpec {
            command: vec!["a".repeat(MAX_COMMAND_ARG_LEN); args],
            ..VmSpec::default()
        };
        let err = check_command(&create(spec)).unwrap_err();
        assert!(err.is_whole_request(), "{err}");
        assert!(
            err.to_string().contains(&MAX_REQUEST_BYTES.to_string()),
            "{err}"
        );
        // One argument fewer fits.
        let spec = VmSpec {
            command: vec!["a".repeat(MAX_COMMAND_ARG_LEN); args - 1],
            ..VmSpec::default()
        };
        check_command(&create(spec)).unwrap();
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        let mut s = "é".repeat(10);
        truncate(&mut s, 9);
        assert!(s.len() <= 9, "{s}");
        assert!(s.ends_with('…'), "{s}");
        let mut short = "fine".to_owned();
        truncate(&mut short, 9);
        assert_eq!(short, "fine");
    }
}
