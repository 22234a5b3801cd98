//! Keeping this node's recorded addresses true: [`keep_recorded`].
//!
//! A node's addresses live in the membership, and every peer dials what
//! the membership says (`tern_raft_net::network::AddressBook` for Raft,
//! the membership for forwarded calls). When a node's addresses change
//! while it runs (an interface's address is replaced, as on a DHCP
//! renewal), the others must learn the new ones, or every connection they
//! dial to it stays dead: QUIC migrates only the side that dialled.
//!
//! [`keep_recorded`] follows the node's own addresses (a watch its owner
//! feeds: the iroh endpoint's view of its interfaces, the configured gRPC
//! URL) and the membership, and whenever they differ asks the leader to
//! record the current ones: a `Cluster/Join` under the node's own
//! identity, which the leader accepts only from the member itself (the
//! caller's authenticated key must be the key in the address; see
//! [`crate::membership`]). A node that is the leader records its own
//! addresses directly. Requests are rate-limited
//! ([`ADDRESS_UPDATE_MIN_INTERVAL`]), retried with backoff until the
//! membership shows the addresses, and always carry the newest value of
//! the watch, so a change that comes while a request is under way is
//! never lost: the loop compares again once it returns.

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tern_protocol::PeerAddr;
use tern_raft_net::Attached;
use tern_state::Member;
use tokio::sync::watch;

/// Least time between two address updates this node asks for: a flapping
/// interface costs the leader one membership change a second at most.
pub const ADDRESS_UPDATE_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between attempts after failures (doubling from
/// [`ADDRESS_UPDATE_MIN_INTERVAL`]).
pub const ADDRESS_UPDATE_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The leader records a member's new addresses at most once per this
/// gap: half the interval an honest node keeps between its requests
/// ([`ADDRESS_UPDATE_MIN_INTERVAL`]), so only a member that flaps its
/// addresses faster (each change is a membership change through Raft) is
/// refused, with `ResourceExhausted`, and retries later.
pub const MIN_RECORDED_GAP: Duration = Duration::from_millis(500);

/// How often the loop looks again when nothing wakes it (no leader known,
/// membership not yet showing this node): a safety net, not the trigger.
pub const ADDRESS_RECHECK: Duration = Duration::from_secs(5);

/// `addr`'s addresses as people read them.
pub fn describe(addr: &PeerAddr) -> String {
    let iroh = addr
        .iroh
        .as_ref()
        .map(|i| {
            let list: Vec<String> = i.direct.iter().map(ToString::to_string).collect();
            list.join(" ")
        })
        .unwrap_or_default();
    format!("grpc {} iroh [{iroh}]", addr.grpc.as_deref().unwrap_or("-"))
}

/// Whether two addresses of one node name the same endpoints (the order
/// of direct addresses aside).
pub fn same_addresses(a: &PeerAddr, b: &PeerAddr) -> bool {
    let direct = |p: &PeerAddr| {
        let mut d = p
            .iroh
            .as_ref()
            .map(|i| i.direct.clone())
            .unwrap_or_default();
        d.sort_unstable();
        d.dedup();
        d
    };
    let relay = |p: &PeerAddr| p.iroh.as_ref().and_then(|i| i.relay_url.clone());
    a.id == b.id && a.grpc == b.grpc && direct(a) == direct(b) && relay(a) == relay(b)
}

/// What the loop does next, from what the membership records and what the
/// node's addresses are now: pure, tested without a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The membership records the current addresses (or does not list
    /// this node): wait for a change.
    Wait,
    /// No leader is known: wait for one.
    NoLeader,
    /// This node leads: record the addresses itself.
    RecordHere,
    /// Ask the leader at this address.
    AskLeader(PeerAddr),
}

/// Decides [`Next`] for node `me` whose addresses are `current`.
pub fn next_step(
    me: u64,
    current: &PeerAddr,
    membership: &tern_store::Membership,
    leader: Option<u64>,
) -> Next {
    let Some(recorded) = membership.get_node(&me) else {
        return Next::Wait;
    };
    if same_addresses(&recorded.addr, current) {
        return Next::Wait;
    }
    match leader {
        None => Next::NoLeader,
        Some(l) if l == me => Next::RecordHere,
        Some(l) => match membership.get_node(&l) {
            Some(m) => Next::AskLeader(m.addr.clone()),
            None => Next::NoLeader,
        },
    }
}

/// Asked and answered: the membership will show `current` once this node
/// has the entry; until then, or a recheck, do not ask again.
fn answered(asked: Option<&(PeerAddr, tokio::time::Instant)>, current: &PeerAddr) -> bool {
    asked.is_some_and(|(addr, at)| same_addresses(addr, current) && at.elapsed() < ADDRESS_RECHECK)
}

/// Keeps node `node`'s recorded addresses equal to `me` (see the module
/// docs) until Raft stops (a dropped sender leaves `me` fixed). `token` is the
/// join token the node was configured with (a member needs none; kept for
/// a leader that does not list it yet).
pub async fn keep_recorded(node: Arc<Attached>, mut me: watch::Receiver<Member>, token: String) {
    // The membership and the leader: openraft's server metrics, which do
    // not change with every entry (as `metrics()` does).
    let mut metrics = node.raft.server_metrics();
    let mut backoff = ADDRESS_UPDATE_MIN_INTERVAL;
    let mut last_sent: Option<tokio::time::Instant> = None;
    let mut me_open = true;
    // The addresses the leader last said it recorded, and when.
    let mut recorded_ask: Option<(PeerAddr, tokio::time::Instant)> = None;
    loop {
        let current = me.borrow_and_update().clone();
        let (step, recorded) = {
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            let recorded = membership.get_node(&node.id).map(|r| r.addr.clone());
            (
                next_step(node.id, &current.addr, membership, m.current_leader),
                recorded,
            )
        };
        if answered(recorded_ask.as_ref(), &current.addr)
            || matches!(step, Next::Wait | Next::NoLeader)
        {
            backoff = ADDRESS_UPDATE_MIN_INTERVAL;
            tokio::select! {
                // A sender gone means the addresses no longer change.
                r = me.changed(), if me_open => me_open = r.is_ok(),
                r = metrics.changed() => if r.is_err() { return },
                () = tokio::time::sleep(ADDRESS_RECHECK) => {}
            }
            continue;
        }
        if let Some(at) = last_sent {
            tokio::time::sleep_until(at + backoff).await;
        }
        // The newest addresses, whatever changed while waiting.
        let current = me.borrow_and_update().clone();
        last_sent = Some(tokio::time::Instant::now());
        let old = recorded.as_ref().map(describe).unwrap_or_default();
        let new = describe(&current.addr);
        tracing::info!(%old, %new, "this node's addresses changed; asking the leader to record the new ones");
        let outcome = match step {
            Next::RecordHere => crate::membership::record_own_address(&node, &current)
                .await
                .map_err(|s| s.message),
            Next::AskLeader(leader) => {
                crate::node::request_join(node.client.as_ref(), &leader, &token, &current)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Next::Wait | Next::NoLeader => Ok(()),
        };
        match outcome {
            Ok(()) => {
                tracing::info!(%new, "the leader recorded this node's new addresses");
                backoff = ADDRESS_UPDATE_MIN_INTERVAL;
                recorded_ask = Some((current.addr.clone(), tokio::time::Instant::now()));
            }
            Err(error) => {
                tracing::warn!(%error, %new, retry_in = ?backoff, "recording this node's new addresses failed; will retry");
                backoff = (backoff * 2).min(ADDRESS_UPDATE_BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use tern_protocol::PeerId;
    use tern_protocol::peer::IrohAddr;
    use tern_state::Capacity;

    fn addr(key: u8, ip: &str) -> PeerAddr {
        PeerAddr {
            id: PeerId::from_bytes([key; 32]),
            iroh: Some(IrohAddr {
                direct: vec![format!("{ip}:7401").parse().unwrap()],
                relay_url: None,
            }),
            grpc: Some(format!("https://{ip}:7400")),
        }
    }

    fn membership(members: &[(u64, PeerAddr)]) -> tern_store::Membership {
        let voters: BTreeSet<u64> = members.iter().map(|(id, _)| *id).collect();
        let nodes: BTreeMap<u64, Member> = members
            .iter()
            .map(|(id, a)| (*id, Member::new(a.clone(), Capacity::default())))
            .collect();
        tern_store::Membership::new(vec![voters], nodes).unwrap()
    }

    #[test]
    fn a_node_asks_the_leader_only_when_its_addresses_differ() {
        let m = membership(&[(1, addr(1, "10.0.0.1")), (3, addr(3, "10.0.0.3"))]);
        assert_eq!(next_step(3, &addr(3, "10.0.0.3"), &m, Some(1)), Next::Wait);
        assert_eq!(
            next_step(3, &addr(3, "10.0.0.103"), &m, Some(1)),
            Next::AskLeader(addr(1, "10.0.0.1"))
        );
        assert_eq!(
            next_step(3, &addr(3, "10.0.0.103"), &m, None),
            Next::NoLeader
        );
        assert_eq!(
            next_step(1, &addr(1, "10.0.0.101"), &m, Some(1)),
            Next::RecordHere
        );
        // Not (yet) a member: nothing to keep.
        assert_eq!(next_step(4, &addr(4, "10.0.0.4"), &m, Some(1)), Next::Wait);
    }

    #[test]
    fn the_order_of_direct_addresses_does_not_count_as_a_change() {
        let mut a = addr(3, "10.0.0.3");
        let mut b = a.clone();
        let extra = "10.0.1.3:7401".parse().unwrap();
        if let Some(i) = a.iroh.as_mut() {
            i.direct.push(extra);
        }
        if let Some(i) = b.iroh.as_mut() {
            i.direct.insert(0, extra);
        }
        assert!(same_addresses(&a, &b));
        assert!(!same_addresses(&a, &addr(3, "10.0.0.4")));
        assert_eq!(
            describe(&addr(3, "10.0.0.3")),
            "grpc https://10.0.0.3:7400 iroh [10.0.0.3:7401]"
        );
    }
}
