//! `tern vm watch [--since REV] [--vm ID] [--json]`: prints every change of
//! the VM records as it happens, from `Vm/Watch`, and resumes on another
//! node when the one it watches goes away.
//!
//! - **Where it starts**: after `--since REV` (a revision `tern vm list`
//!   printed, or one this command printed); without it, from now: the CLI
//!   first asks the node for its current revision (an empty `Vm/List`), so
//!   that even a watch broken before its first event resumes without a
//!   gap.
//! - **Resuming**: the CLI remembers the last revision it printed (or that
//!   a progress event confirmed). When the stream breaks (the node died,
//!   stopped, or cut this watcher off as too slow), it opens the watch again
//!   from that revision, on the next node of the cluster's membership
//!   (learned from `Cluster/Members` at the start, reduced to the
//!   transport in use), and says so on stderr. Events come from the
//!   replicated history, so the new node sends exactly the ones after that
//!   revision: no gap, no duplicate. It tries every node in turn, waiting
//!   [`RESUME_BACKOFF`] after a round where none answered, for at most
//!   [`RESUME_GIVE_UP`] without any stream open.
//! - **Errors that resuming cannot fix** end the command: the revision was
//!   compacted (`OutOfRange`: re-list and watch from the list's revision),
//!   the key lacks the viewer role, a malformed request.
//! - Output: one line per change for people (no debug formatting), or one
//!   JSON object per line with `--json`. Progress events are not printed.
//!   Ctrl-C ends the command cleanly (the caller drops this future).

use std::time::{Duration, Instant};

use prost::Message;
use serde_json::json;
use tern_protocol::catalog::methods;
use tern_protocol::{CallError, Code, PeerAddr, StreamCall, pb};

use crate::cli::{Out, state_name, vm_json};
use crate::client::{Conn, explain};
use crate::error::CliError;

/// Prints a line to stdout, ignoring a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Prints a note to stderr (what the watch did), ignoring a closed pipe.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// How long the CLI waits after trying every node without opening a
/// stream, before the next round: long enough for an election.
pub const RESUME_BACKOFF: Duration = Duration::from_secs(1);

/// How long the CLI keeps trying to resume without any stream open before
/// it gives up: a minute covers a leader change and a node restart.
pub const RESUME_GIVE_UP: Duration = Duration::from_secs(60);

/// A node id no node ever holds: `Vm/List` filtered on it answers no
/// records, only the revision.
const NO_NODE: u64 = u64::MAX;

/// How one stream ended.
enum Ended {
    /// A refusal resuming cannot fix (the revision compacted, the key
    /// lacks the role, the node does not serve watches).
    Fatal(CallError),
    /// Try again from the last revision, on the next node.
    Elsewhere(String),
    /// Try again from the last revision on the same node (the watcher was
    /// cut off as too slow).
    SameNode(String),
}

/// `tern vm watch`; runs until the stream cannot be resumed, or until the
/// caller drops it (Ctrl-C).
pub async fn watch(
    conn: &Conn,
    since: Option<u64>,
    vm_id: String,
    out: Out,
) -> Result<(), CliError> {
    let mut nodes = vec![conn.peer.clone()];
    nodes.extend(other_members(conn).await);
    let mut last = match since {
        Some(rev) => rev,
        None => {
            let list: pb::ListVmsResponse = conn
                .call(methods::VM_LIST, &pb::ListVmsRequest { node_id: NO_NODE })
                .await?;
            list.revision
        }
    };
    let mut rotation = Rotation::new(nodes.len());
    let mut first = true;
    loop {
        let peer = nodes[rotation.at % nodes.len()].clone();
        let ended = match open(conn, &peer, last, &vm_id).await {
            Ok(stream) => {
                if !first {
                    note!(
                        "resumed the watch on node {} from revision {last}",
                        peer.id.short()
                    );
                }
                first = false;
                rotation.opened();
                follow(stream, &mut last, out).await
            }
            Err(CallError::Application(s)) if first || !resumable(s.code) => {
                return Err(explain(methods::VM_WATCH, &CallError::Application(s)));
            }
            Err(e) => {
                if first {
                    return Err(explain(methods::VM_WATCH, &e));
                }
                Ended::Elsewhere(e.to_string())
            }
        };
        match ended {
            Ended::Fatal(e) => return Err(explain(methods::VM_WATCH, &e)),
            Ended::SameNode(why) => {
                note!("the watch on node {} ended: {why}", peer.id.short());
            }
            Ended::Elsewhere(why) => {
                note!(
                    "the watch on node {} broke: {why}; resuming from revision {last} on another node",
                    peer.id.short()
                );
                rotation.next(last).await?;
            }
        }
    }
}

/// Which node the watch tries next, and since when it has been failing.
struct Rotation {
    /// Index of the node to try (modulo the node count).
    at: usize,
    nodes: usize,
    failing_since: Option<Instant>,
    tried_in_round: usize,
}

impl Rotation {
    fn new(nodes: usize) -> Rotation {
        Rotation {
            at: 0,
            nodes,
            failing_since: None,
            tried_in_round: 0,
        }
    }

    /// A stream opened: the failures so far are forgotten.
    fn opened(&mut self) {
        self.failing_since = None;
        self.tried_in_round = 0;
    }

    /// The stream broke: moves to the next node, pausing
    /// [`RESUME_BACKOFF`] after every node was tried once, and gives up
    /// after [`RESUME_GIVE_UP`] without a stream.
    async fn next(&mut self, last: u64) -> Result<(), CliError> {
        let started = *self.failing_since.get_or_insert_with(Instant::now);
        if started.elapsed() > RESUME_GIVE_UP {
            return Err(CliError::Node(format!(
                "no node of the cluster resumed the watch within {RESUME_GIVE_UP:?}; \
                 run `tern vm watch --since {last}` again once a node is reachable"
            )));
        }
        self.at += 1;
        self.tried_in_round += 1;
        if self.tried_in_round >= self.nodes {
            self.tried_in_round = 0;
            tokio::time::sleep(RESUME_BACKOFF).await;
        }
        Ok(())
    }
}

/// Whether a refusal while resuming is worth trying elsewhere: a node
/// that is starting, behind (the revision ahead of it), or overloaded.
fn resumable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
    )
}

/// The other members' addresses, over the transport `conn` uses; empty if
/// the node cannot say (the watch then resumes on that node alone).
async fn other_members(conn: &Conn) -> Vec<PeerAddr> {
    let members: pb::MembersResponse = match conn
        .call_at(&conn.peer, methods::CLUSTER_MEMBERS, &pb::MembersRequest {})
        .await
    {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "no membership: the watch resumes on this node only");
            return Vec::new();
        }
    };
    members
        .members
        .iter()
        .filter_map(|m| m.address.as_ref())
        .filter_map(|a| PeerAddr::try_from(a).ok())
        .filter(|a| a.id != conn.peer.id)
        .filter_map(|mut a| {
            if conn.peer.grpc.is_none() {
                a.grpc = None;
            }
            if conn.peer.iroh.is_none() {
                a.iroh = None;
            }
            (a.grpc.is_some() || a.iroh.is_some()).then_some(a)
        })
        .collect()
}

async fn open(
    conn: &Conn,
    peer: &PeerAddr,
    since: u64,
    vm_id: &str,
) -> Result<tern_protocol::CallStream, CallError> {
    let req = pb::WatchVmsRequest {
        from_revision: since,
        vm_id: vm_id.to_owned(),
    };
    let call = StreamCall::new(methods::VM_WATCH, req.encode_to_vec().into());
    conn.open_stream(peer, call).await
}

/// Prints the stream's events until it ends, keeping `last` at the last
/// revision printed or confirmed.
async fn follow(mut stream: tern_protocol::CallStream, last: &mut u64, out: Out) -> Ended {
    loop {
        let message = match stream.receiver.next().await {
            None => return Ended::Elsewhere("the node ended the stream".into()),
            Some(Err(CallError::Application(s))) if s.code == Code::ResourceExhausted => {
                return Ended::SameNode(s.to_string());
            }
            Some(Err(CallError::Application(s))) if !resumable(s.code) => {
                return Ended::Fatal(CallError::Application(s));
            }
            Some(Err(e)) => return Ended::Elsewhere(e.to_string()),
            Some(Ok(m)) => m,
        };
        let event = match pb::VmEvent::decode(message) {
            Ok(e) => e,
            Err(e) => return Ended::Elsewhere(format!("an undecodable event: {e}")),
        };
        if event.revision <= *last && !event.progress {
            // Already printed (cannot happen with a correct node); never
            // print a change twice.
            continue;
        }
        if !event.progress {
            print_event(&event, out);
        }
        *last = (*last).max(event.revision);
    }
}

/// What kind of change an event is, in a word.
pub fn change_name(event: &pb::VmEvent) -> &'static str {
    if event.deleted {
        "deleted"
    } else if event.vm.as_ref().is_some_and(|v| v.generation == 1) {
        "created"
    } else {
        "updated"
    }
}

/// An event as JSON (one object per line).
pub fn event_json(event: &pb::VmEvent) -> serde_json::Value {
    json!({
        "revision": event.revision,
        "change": change_name(event),
        "vm": event.vm.as_ref().map(vm_json),
    })
}

fn print_event(event: &pb::VmEvent, out: Out) {
    if out.json {
        out!("{}", event_json(event));
        return;
    }
    let vm = event.vm.clone().unwrap_or_default();
    let spec = vm.spec.clone().unwrap_or_default();
    let reason = if vm.reason.is_empty() {
        String::new()
    } else {
        format!("  ({})", vm.reason)
    };
    out!(
        "rev {}  {:<7}  {} {}  node {}  desired {}  observed {}{reason}",
        event.revision,
        change_name(event),
        vm.id,
        spec.name,
        vm.node_id,
        state_name(vm.desired),
        state_name(vm.observed),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_named_by_what_changed() {
        let mut e = pb::VmEvent {
            revision: 7,
            vm: Some(pb::VmRecord {
                id: "vm-1".into(),
                generation: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(change_name(&e), "created");
        let j = event_json(&e);
        assert_eq!(j["revision"], 7);
        assert_eq!(j["vm"]["id"], "vm-1");
        e.vm.as_mut().unwrap().generation = 2;
        assert_eq!(change_name(&e), "updated");
        e.deleted = true;
        assert_eq!(change_name(&e), "deleted");
        assert!(resumable(Code::Unavailable));
        assert!(!resumable(Code::OutOfRange));
        assert!(!resumable(Code::PermissionDenied));
    }
}
