//! Which transport policy a node runs, and its labels in the cluster state.
//!
//! The policy in force is decided by [`decide`], in this order:
//!
//! 1. **The node's file pins `[transport]`** (the section is present):
//!    the file's policy, source `file`. The emergency override: it needs
//!    no quorum, only the file and SIGHUP (`mode = "grpc"` plus SIGHUP
//!    always wins).
//! 2. **The cluster's desired policy for the node** (node > group > all,
//!    `tern_state::ClusterState::desired_policy`), source `node`,
//!    `group KEY=VALUE` or `all`.
//! 3. **Neither**: the built-in default (`mode = "grpc"`), source
//!    `default`.
//!
//! [`PolicyControl`] holds the pin and the last desired policy seen,
//! follows the applied state ([`PolicyControl::run`]) and applies each
//! change through a [`PolicySink`] (the node's router, the same path a
//! SIGHUP takes). Every change is logged and counted
//! (`tern_transport_policy_changes_total{source}`); the gauge
//! `tern_transport_policy_source{source}` is 1 for the source in force.
//! A desired policy this node cannot run (it sends traffic over iroh and
//! the node serves no iroh) is refused, logged and counted
//! (`tern_transport_policy_refused_total`); the node keeps what it runs.
//!
//! [`announce_labels`] records the node's configured labels in the state
//! (through the leader) when they differ from what the state holds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_protocol::metric_names as names;
use tern_protocol::policy::{Policy, TransportConfig};
use tern_state::{ClusterState, Command, Labels, NodeId, PolicySource, Response};

use crate::consensus::Consensus;

/// Where a node's policy is applied: the node's router.
pub trait PolicySink: Send + Sync + 'static {
    /// The policy in force.
    fn current(&self) -> Policy;
    /// Replaces the policy atomically.
    fn apply(&self, policy: Policy);
    /// Whether the node serves iroh (a policy that uses iroh cannot run
    /// without it).
    fn serves_iroh(&self) -> bool;
}

/// The policy a node runs and its source: the pin, else the desired
/// policy, else the default.
pub fn decide(
    pin: Option<&Policy>,
    desired: Option<(&Policy, &PolicySource)>,
) -> (Policy, PolicySource) {
    match (pin, desired) {
        (Some(p), _) => (p.clone(), PolicySource::File),
        (None, Some((p, source))) => (p.clone(), source.clone()),
        (None, None) => (Policy::default(), PolicySource::Default),
    }
}

struct Inner {
    pin: Option<Policy>,
    desired: Option<(Policy, PolicySource)>,
    source: PolicySource,
}

/// The node's policy: its file pin, the cluster's desired policy, and the
/// one in force.
pub struct PolicyControl {
    node_id: NodeId,
    sink: Arc<dyn PolicySink>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for PolicyControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyControl")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// How often at most [`PolicyControl::run`] reads the applied state for
/// a new desired policy. The state changes with every applied batch of
/// entries, on every node; reading it (under the state machine's lock)
/// each time put a task wake-up and a lock on every commit, for a policy
/// that changes a few times a rollout. A new policy takes effect this much
/// later at most.
pub const POLICY_CHECK_EVERY: Duration = Duration::from_millis(50);

const SOURCES: [&str; 6] = ["file", "node", "rollout", "group", "all", "default"];

impl PolicyControl {
    /// Control of node `node_id`'s policy; `pin` is its file's
    /// `[transport]` when the file has one. The sink already runs the
    /// start policy (the pin, or the default).
    pub fn new(
        node_id: NodeId,
        sink: Arc<dyn PolicySink>,
        pin: Option<Policy>,
    ) -> Arc<PolicyControl> {
        let source = if pin.is_some() {
            PolicySource::File
        } else {
            PolicySource::Default
        };
        set_source_gauge(&source);
        Arc::new(PolicyControl {
            node_id,
            sink,
            inner: Mutex::new(Inner {
                pin,
                desired: None,
                source,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Where the policy in force comes from.
    pub fn source(&self) -> PolicySource {
        self.lock().source.clone()
    }

    /// Sets or removes the file's pin (a SIGHUP read the file) and applies
    /// what follows. Needs no quorum: the pin wins over any desired policy.
    /// Refused (`Err`, nothing changes) when the policy uses iroh and the
    /// node serves none.
    pub fn set_pin(&self, pin: Option<Policy>) -> Result<(), String> {
        if let Some(p) = &pin {
            self.runnable(p)?;
        }
        let mut inner = self.lock();
        inner.pin = pin;
        self.settle(&mut inner);
        Ok(())
    }

    /// Follows the applied state's desired policy for this node.
    pub fn refresh(&self, state: &ClusterState) {
        let desired = state
            .desired_policy(self.node_id)
            .map(|(config, source)| (config.clone(), source));
        self.set_desired(desired);
    }

    fn set_desired(&self, desired: Option<(TransportConfig, PolicySource)>) {
        let desired = match desired {
            None => None,
            Some((config, source)) => match Policy::from_config(&config) {
                Ok(p) => match self.runnable(&p) {
                    Ok(()) => Some((p, source)),
                    Err(why) => {
                        self.refused(&source, &why);
                        return;
                    }
                },
                // The state validated it; a newer validation may not.
                Err(e) => {
                    self.refused(&source, &e.to_string());
                    return;
                }
            },
        };
        let mut inner = self.lock();
        if inner.desired == desired {
            return;
        }
        inner.desired = desired;
        self.settle(&mut inner);
    }

    fn refused(&self, source: &PolicySource, why: &str) {
        metrics::counter!(names::TRANSPORT_POLICY_REFUSED).increment(1);
        tracing::error!(
            node = self.node_id,
            source = %source,
            why,
            "the cluster's desired transport policy for this node cannot run here; the node keeps its policy"
        );
    }

    fn runnable(&self, policy: &Policy) -> Result<(), String> {
        if policy.uses_iroh() && !self.sink.serves_iroh() {
            return Err(format!(
                "the policy sends traffic over iroh (mode = {}) but this node serves no iroh (listen.iroh is \"off\")",
                policy.mode.as_str()
            ));
        }
        Ok(())
    }

    /// Applies the decided policy if it or its source changed.
    fn settle(&self, inner: &mut Inner) {
        let (policy, source) = decide(
            inner.pin.as_ref(),
            inner.desired.as_ref().map(|(p, s)| (p, s)),
        );
        let current = self.sink.current();
        if current == policy && inner.source == source {
            return;
        }
        if current != policy {
            self.sink.apply(policy.clone());
        }
        metrics::counter!(names::TRANSPORT_POLICY_CHANGES, "source" => source.kind()).increment(1);
        set_source_gauge(&source);
        tracing::info!(
            node = self.node_id,
            from = %inner.source,
            source = %source,
            mode = policy.mode.as_str(),
            "transport policy in force changed"
        );
        inner.source = source;
    }

    /// Follows the applied state until `stop`: the state is checked for
    /// a new desired policy after it changes, at most every
    /// [`POLICY_CHECK_EVERY`].
    pub async fn run(
        self: Arc<Self>,
        consensus: Arc<dyn Consensus>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut changes = consensus.changes();
        tokio::pin!(stop);
        loop {
            let _ = consensus.read(&mut |state| self.refresh(state));
            tokio::select! {
                _ = &mut stop => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            // Changes meanwhile are seen at once after the pause.
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep(POLICY_CHECK_EVERY) => {}
            }
        }
    }
}

fn set_source_gauge(source: &PolicySource) {
    for s in SOURCES {
        let v = if s == source.kind() { 1.0 } else { 0.0 };
        metrics::gauge!(names::TRANSPORT_POLICY_SOURCE, "source" => s).set(v);
    }
}

/// How long [`announce_labels`] waits between attempts.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(2);

/// Records `labels` as node `node_id`'s in the cluster state, through the
/// leader, unless the state already holds them; retries (with the same
/// request id) until it is written, refused, or `stop`.
pub async fn announce_labels(
    consensus: Arc<dyn Consensus>,
    node_id: NodeId,
    labels: Labels,
    request_id: String,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let mut same = false;
        let _ = consensus.read(&mut |s| {
            same = s.node_labels().get(&node_id).cloned().unwrap_or_default() == labels
        });
        if same {
            return;
        }
        let command = Command::SetNodeLabels {
            request_id: request_id.clone(),
            node_id,
            labels: labels.clone(),
        };
        match consensus.write(command).await {
            Ok(Response::Done) => {
                tracing::info!(
                    node = node_id,
                    labels = labels.len(),
                    "node labels recorded"
                );
                return;
            }
            Ok(Response::Rejected(why)) => {
                tracing::error!(node = node_id, why = %why, "node labels refused");
                return;
            }
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(node = node_id, error = %e, "recording node labels; retrying")
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(ANNOUNCE_RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::policy::Mode;
    use tern_state::{Capacity, Member, PolicyTarget, Selector};

    /// A router stand-in: holds the policy applied to it.
    struct Held {
        policy: Mutex<Policy>,
        iroh: bool,
    }

    impl PolicySink for Held {
        fn current(&self) -> Policy {
            self.policy.lock().unwrap().clone()
        }
        fn apply(&self, policy: Policy) {
            *self.policy.lock().unwrap() = policy;
        }
        fn serves_iroh(&self) -> bool {
            self.iroh
        }
    }

    fn state_with_all(m: Mode) -> ClusterState {
        let mut s = ClusterState::default();
        let member = Member::new(
            tern_protocol::PeerAddr::new(tern_protocol::PeerId::from_bytes([1; 32])),
            Capacity::default(),
        );
        s.apply_membership([(&1u64, &member)]);
        s.apply(Command::SetTransportPolicy {
            request_id: format!("all-{}", m.as_str()),
            target: PolicyTarget::All,
            policy: Some(TransportConfig {
                mode: m,
                ..TransportConfig::default()
            }),
        });
        s
    }

    #[test]
    fn the_control_follows_the_state_unless_pinned_and_refuses_what_cannot_run() {
        let sink = Arc::new(Held {
            policy: Mutex::new(Policy::default()),
            iroh: true,
        });
        let control = PolicyControl::new(1, sink.clone(), None);
        assert_eq!(control.source(), PolicySource::Default);
        control.refresh(&state_with_all(Mode::Dual));
        assert_eq!(
            (sink.current().mode, control.source()),
            (Mode::Dual, PolicySource::All)
        );
        // The file pin wins over the state, and unpinning goes back to it.
        control.set_pin(Some(mode(Mode::Grpc))).unwrap();
        assert_eq!(
            (sink.current().mode, control.source()),
            (Mode::Grpc, PolicySource::File)
        );
        control.refresh(&state_with_all(Mode::Iroh));
        assert_eq!(
            (sink.current().mode, control.source()),
            (Mode::Grpc, PolicySource::File)
        );
        control.set_pin(None).unwrap();
        assert_eq!(
            (sink.current().mode, control.source()),
            (Mode::Iroh, PolicySource::All)
        );
        control.refresh(&ClusterState::default());
        assert_eq!(
            (sink.current().mode, control.source()),
            (Mode::Grpc, PolicySource::Default)
        );

        // A node without iroh keeps its policy when asked to use iroh.
        let sink = Arc::new(Held {
            policy: Mutex::new(Policy::default()),
            iroh: false,
        });
        let control = PolicyControl::new(1, sink.clone(), None);
        control.refresh(&state_with_all(Mode::Iroh));
        assert_eq!(
            (sink.current().mode, control.source()),
            (Mode::Grpc, PolicySource::Default)
        );
        assert!(control.set_pin(Some(mode(Mode::Iroh))).is_err());
        assert_eq!(control.source(), PolicySource::Default);
    }

    fn mode(m: Mode) -> Policy {
        Policy {
            mode: m,
            ..Policy::default()
        }
    }

    #[test]
    fn the_file_pin_wins_then_the_desired_policy_then_the_default() {
        let group = PolicySource::Group(Selector::parse("zone=a").unwrap());
        let iroh = mode(Mode::Iroh);
        let grpc = mode(Mode::Grpc);
        assert_eq!(
            decide(Some(&grpc), Some((&iroh, &group))),
            (grpc.clone(), PolicySource::File)
        );
        assert_eq!(decide(None, Some((&iroh, &group))), (iroh, group));
        assert_eq!(
            decide(None, None),
            (Policy::default(), PolicySource::Default)
        );
        assert_eq!(PolicySource::Default.to_string(), "default");
        assert_eq!(
            PolicySource::Group(Selector::parse("zone=a").unwrap()).to_string(),
            "group zone=a"
        );
    }
}
