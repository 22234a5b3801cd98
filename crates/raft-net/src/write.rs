//! The one checked write entry point ([`client_write`]): every write made
//! on a caller's behalf is checked against the write limits before it is
//! proposed, and a refusal maps to one status wherever it happens.

use std::time::{Duration, Instant};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, ForwardReason, RaftError};
use openraft::raft::ClientWriteResponse;
use tern_protocol::{Code, Status};
use tern_state::Command;
use tern_state::limits::{LimitError, check_command};
use tern_store::TypeConfig;

use crate::service::{RaftInstance, raft_stopped};

/// Why a write through [`client_write`] was not committed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The command is over a size limit; it was not proposed. Do not retry
    /// it as is.
    #[error("refused before proposing: {0}")]
    Limit(#[from] LimitError),
    /// openraft did not commit it (not the leader, no quorum, stopped).
    #[error("{0}")]
    Raft(RaftError<TypeConfig, ClientWriteError<TypeConfig>>),
}

impl WriteError {
    /// The status a handler answers with: `InvalidArgument` for a field
    /// over its limit, `ResourceExhausted` for a request over
    /// [`tern_state::limits::MAX_REQUEST_BYTES`], `FailedPrecondition`
    /// naming the leader on a follower, `Unavailable` when Raft stopped.
    pub fn into_status(self) -> Status {
        match self {
            WriteError::Limit(e) => limit_status(&e),
            WriteError::Raft(e) => write_error(e),
        }
    }
}

/// The status a write refused by a size limit is answered with.
pub fn limit_status(e: &LimitError) -> Status {
    if e.is_whole_request() {
        Status::new(Code::ResourceExhausted, e.to_string())
    } else {
        Status::invalid_argument(e.to_string())
    }
}

/// First pause before a write refused for a lapsed lease is retried; it
/// doubles up to [`LEASE_RETRY_PAUSE_MAX`].
pub const LEASE_RETRY_PAUSE: Duration = Duration::from_millis(5);
/// Longest pause between retries of a write refused for a lapsed lease.
pub const LEASE_RETRY_PAUSE_MAX: Duration = Duration::from_millis(50);

/// The write entry point: checks `command` against the write limits
/// ([`check_command`]), then proposes it. Every write made on a caller's
/// behalf (Propose here; MetaPut, access changes and the node's own writes
/// in `tern-cluster`) goes through it.
///
/// A leader whose quorum lease has lapsed (no majority acknowledged
/// anything it sent within the lease, openraft's `election_timeout_max`:
/// a follower busy flushing a large batch, a loaded machine) refuses the
/// write before appending it (`ForwardReason::LeaseExpired`). That is
/// the leader catching its breath, not a leader change: the next
/// acknowledgement renews the lease. So such a write is retried here, with
/// short pauses, for up to two lease periods; only then is it refused
/// (counted as `lease_expired`), and as every refusal before proposing it
/// was not written and may be retried.
pub async fn client_write(
    raft: &RaftInstance,
    command: Command,
) -> Result<ClientWriteResponse<TypeConfig>, WriteError> {
    check_command(&command)?;
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    let give_up = Instant::now() + lease * 2;
    let mut pause = LEASE_RETRY_PAUSE;
    loop {
        // A follower's write is refused with `ForwardToLeader` before it is
        // proposed (and then forwarded): not a failed proposal. A leader's is.
        let leading = raft.metrics().borrow_watched().state == ServerState::Leader;
        let proposed = Instant::now();
        match raft.client_write(command.clone()).await {
            Ok(written) => {
                crate::metrics::proposal_committed(proposed.elapsed());
                tracing::trace!(target: "tern_commit_path", index = written.log_id.index, "write committed");
                return Ok(written);
            }
            Err(e) if lease_lapsed(&e) && Instant::now() + pause < give_up => {
                tracing::debug!(
                    pause_ms = pause.as_millis(),
                    "the leader's quorum lease has lapsed; retrying the write"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LEASE_RETRY_PAUSE_MAX);
            }
            Err(e) => {
                if let Some(reason) = proposal_failure(&e, leading) {
                    crate::metrics::proposal_failed(reason);
                }
                return Err(WriteError::Raft(e));
            }
        }
    }
}

/// Whether `e` is a leader's refusal for a lapsed quorum lease (this node
/// leads; forwarding the write elsewhere would be wrong).
pub fn lease_lapsed(e: &RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> bool {
    matches!(
        e,
        RaftError::APIError(ClientWriteError::ForwardToLeader(f))
            if f.reason == ForwardReason::LeaseExpired
    )
}

/// The `reason` label a failed proposal is counted under, if it was a
/// proposal: `None` for a write a follower refused to forward it
/// (`leading` says whether this node led when the write was made).
fn proposal_failure(
    e: &RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
    leading: bool,
) -> Option<crate::metrics::ProposalFailure> {
    use crate::metrics::ProposalFailure;
    match e {
        e if lease_lapsed(e) => Some(ProposalFailure::LeaseExpired),
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            leading.then_some(ProposalFailure::NotLeader)
        }
        RaftError::APIError(_) => Some(ProposalFailure::RaftApi),
        RaftError::Fatal(_) => Some(ProposalFailure::Stopped),
    }
}

/// The status a failed Raft write is answered with: `FailedPrecondition`
/// naming the leader on a follower, `Unavailable` when Raft stopped or
/// the leader's lease stayed lapsed.
pub fn write_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Status {
    match e {
        // Said as every follower says it (`forward::not_leader`); with no
        // leader known it stays `FailedPrecondition`: the write was refused
        // here, not lost.
        // A leader no majority has acknowledged for two lease periods.
        e if lease_lapsed(&e) => Status::new(
            Code::Unavailable,
            "this node leads but no majority of the cluster has acknowledged it recently \
             (slow or unreachable followers); the write was not made, retry shortly",
        ),
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => match f.leader_id {
            Some(_) => tern_protocol::forward::not_leader(f.leader_id, ""),
            None => Status::new(
                Code::FailedPrecondition,
                "this node is not the Raft leader and no leader is known; retry shortly",
            ),
        },
        RaftError::APIError(e) => Status::new(Code::FailedPrecondition, e.to_string()),
        RaftError::Fatal(e) => raft_stopped(e),
    }
}

#[cfg(test)]
mod tests {
    use openraft::errors::{Fatal, ForwardToLeader};

    use super::*;
    use crate::metrics::ProposalFailure;

    #[test]
    fn only_proposals_count_as_failed_proposals() {
        let forward = || {
            RaftError::<TypeConfig, ClientWriteError<TypeConfig>>::APIError(
                ClientWriteError::ForwardToLeader(ForwardToLeader::empty()),
            )
        };
        // A follower refuses before proposing (and forwards): not counted.
        assert_eq!(proposal_failure(&forward(), false), None);
        // A leader that lost leadership while the write was in flight.
        assert_eq!(
            proposal_failure(&forward(), true),
            Some(ProposalFailure::NotLeader)
        );
        // A leader whose lease lapsed: its own failure reason, and a
        // refusal the caller may retry.
        let mut lapsed = ForwardToLeader::empty();
        lapsed.reason = ForwardReason::LeaseExpired;
        let lapsed = RaftError::<TypeConfig, ClientWriteError<TypeConfig>>::APIError(
            ClientWriteError::ForwardToLeader(lapsed),
        );
        assert!(lease_lapsed(&lapsed));
        assert!(!lease_lapsed(&forward()));
        assert_eq!(
            proposal_failure(&lapsed, true),
            Some(ProposalFailure::LeaseExpired)
        );
        assert_eq!(write_error(lapsed).code, Code::Unavailable);
        assert_eq!(write_error(forward()).code, Code::FailedPrecondition);
        let stopped = RaftError::<TypeConfig, ClientWriteError<TypeConfig>>::Fatal(Fatal::Stopped);
        assert_eq!(
            proposal_failure(&stopped, false),
            Some(ProposalFailure::Stopped)
        );
    }
}
