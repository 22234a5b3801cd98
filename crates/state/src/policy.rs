//! Node labels and the cluster's desired transport policies.
//!
//! # Labels
//!
//! Each node declares labels in its config file (`[node] labels = { zone =
//! "a", rack = "r1" }`) and records them here with
//! [`Command::SetNodeLabels`](crate::Command::SetNodeLabels) (through the
//! leader, when they differ from what the state holds). A label key and
//! value are 1 to [`MAX_LABEL_LEN`] bytes of `a-z A-Z 0-9 . _ -`, and a
//! node has at most [`MAX_LABELS`] of them ([`check_labels`]). Groups of
//! nodes are named by a [`Selector`], `KEY=VALUE`: the nodes whose label
//! `KEY` is `VALUE`. Labels go when their node leaves the membership.
//! The rollout picks canaries across labels with
//! [`ClusterState::node_labels`].
//!
//! # Desired policies
//!
//! An operator sets a desired `[transport]` policy for one node, a group
//! (a selector) or all nodes ([`PolicyTarget`]) with
//! [`Command::SetTransportPolicy`](crate::Command::SetTransportPolicy)
//! (`None` clears it). A policy is checked with the same validation the
//! config file's `[transport]` gets ([`Policy::from_config`]).
//! [`ClusterState::desired_policy`] answers the policy a node should run
//! and where it comes from, by precedence: **node > group > all**. When
//! several groups select a node, the first selector in order (by key, then
//! value) wins, the same on every node. A node whose own config file pins
//! `[transport]` runs its file instead; that is the node's decision
//! (`tern-node`), not the state's.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use tern_protocol::policy::{Policy, PolicyError, TransportConfig};

use crate::command::{Rejection, Response};
use crate::member::NodeId;
use crate::state::ClusterState;

/// Most labels one node may have.
pub const MAX_LABELS: usize = 16;

/// Longest label key or value, in bytes (a DNS label's length).
pub const MAX_LABEL_LEN: usize = 63;

/// Most group policies the state holds: a group is a label value, and a
/// rollout stage names a handful.
pub const MAX_GROUP_POLICIES: usize = 64;

/// Most entries of a policy's `prefer_iroh` (there are fewer services;
/// the bound stops a write padded with repeats).
pub const MAX_PREFER_IROH: usize = 16;

/// A node's labels: key to value.
pub type Labels = BTreeMap<String, String>;

/// A label, selector or labels set that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LabelError {
    /// A key or value that is empty, too long, or has a character outside
    /// the allowed set.
    #[error(
        "label {what} {text:?} is not allowed: 1 to {MAX_LABEL_LEN} bytes of a-z, A-Z, 0-9, '.', '_' or '-'"
    )]
    Invalid {
        /// `key` or `value`.
        what: String,
        /// The text (cut to the first [`MAX_LABEL_LEN`] + 1 bytes).
        text: String,
    },
    /// More than [`MAX_LABELS`] labels.
    #[error("{count} labels; a node has at most {MAX_LABELS}")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// A selector without `=`.
    #[error("group selector {text:?} is not KEY=VALUE (e.g. zone=a)")]
    NotASelector {
        /// The text (cut).
        text: String,
    },
}

fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_LABEL_LEN + 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn check_label_part(what: &str, text: &str) -> Result<(), LabelError> {
    let ok = !text.is_empty()
        && text.len() <= MAX_LABEL_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LabelError::Invalid {
            what: what.to_owned(),
            text: cut(text),
        })
    }
}

/// Checks a node's labels: at most [`MAX_LABELS`], each key and value 1 to
/// [`MAX_LABEL_LEN`] bytes of the allowed characters.
pub fn check_labels(labels: &Labels) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany {
            count: labels.len(),
        });
    }
    for (k, v) in labels {
        check_label_part("key", k)?;
        check_label_part("value", v)?;
    }
    Ok(())
}

/// A group of nodes: those whose label `key` is `value`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Selector {
    /// The label key.
    pub key: String,
    /// The value it must have.
    pub value: String,
}

impl Selector {
    /// Parses `KEY=VALUE`, both parts checked as labels are.
    pub fn parse(text: &str) -> Result<Selector, LabelError> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| LabelError::NotASelector { text: cut(text) })?;
        let selector = Selector {
            key: key.to_owned(),
            value: value.to_owned(),
        };
        selector.check()?;
        Ok(selector)
    }

    /// Checks both parts as labels are checked.
    pub fn check(&self) -> Result<(), LabelError> {
        check_label_part("key", &self.key)?;
        check_label_part("value", &self.value)
    }

    /// Whether a node with `labels` is in the group.
    pub fn selects(&self, labels: &Labels) -> bool {
        labels.get(&self.key) == Some(&self.value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// Whom a desired policy is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyTarget {
    /// One node.
    Node(NodeId),
    /// The nodes a selector names.
    Group(Selector),
    /// Every node.
    All,
}

impl fmt::Display for PolicyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyTarget::Node(id) => write!(f, "node {id}"),
            PolicyTarget::Group(s) => write!(f, "group {s}"),
            PolicyTarget::All => f.write_str("all"),
        }
    }
}

/// Where the policy a node runs comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicySource {
    /// The node's own config file pins `[transport]` (decided by the node).
    File,
    /// The desired policy set for this node.
    Node,
    /// The stage in force of the transport rollout ([`crate::rollout`]),
    /// by its index.
    Rollout(usize),
    /// The desired policy of a group that selects the node.
    Group(Selector),
    /// The cluster-wide desired policy.
    All,
    /// Nothing set anywhere: the built-in default (`mode = "grpc"`).
    Default,
}

impl PolicySource {
    /// The metric label value: `file`, `node`, `group`, `all`, `default`.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicySource::File => "file",
            PolicySource::Node => "node",
            PolicySource::Rollout(_) => "rollout",
            PolicySource::Group(_) => "group",
            PolicySource::All => "all",
            PolicySource::Default => "default",
        }
    }
}

impl fmt::Display for PolicySource {
    /// `file`, `node`, `group zone=a`, `all`, `default`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySource::Group(s) => write!(f, "group {s}"),
            PolicySource::Rollout(i) => write!(f, "rollout stage {i}"),
            other => f.write_str(other.kind()),
        }
    }
}

/// The desired policies: per node, per group, and for all.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DesiredPolicies {
    /// By node id.
    pub nodes: BTreeMap<NodeId, TransportConfig>,
    /// By selector.
    pub groups: BTreeMap<Selector, TransportConfig>,
    /// For every node.
    pub all: Option<TransportConfig>,
}

/// Checks a policy as the config file's `[transport]` is checked, plus the
/// length bound of its list; the error names the key.
pub fn check_policy(policy: &TransportConfig) -> Result<Policy, PolicyError> {
    if policy.migration.prefer_iroh.len() > MAX_PREFER_IROH {
        return Err(PolicyError {
            key: "transport.migration.prefer_iroh".into(),
            reason: format!(
                "{} entries; at most {MAX_PREFER_IROH}",
                policy.migration.prefer_iroh.len()
            ),
        });
    }
    Policy::from_config(policy)
}

impl ClusterState {
    /// Every member's labels (members that recorded none are absent).
    pub fn node_labels(&self) -> &BTreeMap<NodeId, Labels> {
        &self.node_labels
    }

    /// The desired policies as set.
    pub fn desired_policies(&self) -> &DesiredPolicies {
        &self.policies
    }

    /// The desired policy of `node` and where it comes from (node >
    /// rollout > group > all), or `None` when nothing applies to it.
    pub fn desired_policy(&self, node: NodeId) -> Option<(&TransportConfig, PolicySource)> {
        if let Some(p) = self.policies.nodes.get(&node) {
            return Some((p, PolicySource::Node));
        }
        if let Some((p, stage)) = self.rollout_policy(node) {
            return Some((p, PolicySource::Rollout(stage)));
        }
        if let Some(labels) = self.node_labels.get(&node)
            && let Some((s, p)) = self.policies.groups.iter().find(|(s, _)| s.selects(labels))
        {
            return Some((p, PolicySource::Group(s.clone())));
        }
        self.policies.all.as_ref().map(|p| (p, PolicySource::All))
    }

    pub(crate) fn set_node_labels(&mut self, node: NodeId, labels: Labels) -> Response {
        if let Err(e) = check_labels(&labels) {
            return Response::Rejected(Rejection::InvalidLabels { why: e.to_string() });
        }
        if !self.is_node(node) {
            return Response::Rejected(Rejection::UnknownNode { node_id: node });
        }
        if labels.is_empty() {
            self.node_labels.remove(&node);
        } else {
            self.node_labels.insert(node, labels);
        }
        Response::Done
    }

    pub(crate) fn set_transport_policy(
        &mut self,
        target: PolicyTarget,
        policy: Option<TransportConfig>,
    ) -> Response {
        if let Some(p) = &policy
            && let Err(e) = check_policy(p)
        {
            return Response::Rejected(Rejection::InvalidPolicy {
                key: e.key,
                reason: e.reason,
            });
        }
        match (target, policy) {
            (PolicyTarget::Node(id), Some(p)) => {
                if !self.is_node(id) {
                    return Response::Rejected(Rejection::UnknownNode { node_id: id });
                }
                self.policies.nodes.insert(id, p);
            }
            (PolicyTarget::Node(id), None) => {
                self.policies.nodes.remove(&id);
            }
            (PolicyTarget::Group(s), Some(p)) => {
                if let Err(e) = s.check() {
                    return Response::Rejected(Rejection::InvalidLabels { why: e.to_string() });
                }
                if !self.node_labels.values().any(|l| s.selects(l)) {
                    return Response::Rejected(Rejection::EmptyGroup {
                        selector: s.to_string(),
                    });
                }
                if !self.policies.groups.contains_key(&s)
                    && self.policies.groups.len() >= MAX_GROUP_POLICIES
                {
                    return Response::Rejected(Rejection::TooManyGroupPolicies);
                }
                self.policies.groups.insert(s, p);
            }
            (PolicyTarget::Group(s), None) => {
                self.policies.groups.remove(&s);
            }
            (PolicyTarget::All, p) => self.policies.all = p,
        }
        Response::Done
    }

    /// Drops the labels and the node policy of nodes no longer members.
    pub(crate) fn forget_departed(&mut self) {
        let (members, agents) = (&self.members, &self.agents);
        let is_node = |id: &NodeId| members.contains_key(id) || agents.contains_key(id);
        self.node_labels.retain(|id, _| is_node(id));
        self.policies.nodes.retain(|id, _| is_node(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Capacity, Command, Member};
    use tern_protocol::policy::Mode;
    use tern_protocol::{PeerAddr, PeerId};

    fn state_of(n: u8) -> ClusterState {
        let mut s = ClusterState::default();
        let members: Vec<(NodeId, Member)> = (1..=n)
            .map(|i| {
                (
                    NodeId::from(i),
                    Member::new(
                        PeerAddr::new(PeerId::from_bytes([i; 32])),
                        Capacity::default(),
                    ),
                )
            })
            .collect();
        s.apply_membership(members.iter().map(|(id, m)| (id, m)));
        s
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn mode(m: Mode) -> TransportConfig {
        TransportConfig {
            mode: m,
            ..TransportConfig::default()
        }
    }

    fn set(req: &str, target: PolicyTarget, p: Option<TransportConfig>) -> Command {
        Command::SetTransportPolicy {
            request_id: req.into(),
            target,
            policy: p,
        }
    }

    fn label_cmd(req: &str, node: NodeId, l: Labels) -> Command {
        Command::SetNodeLabels {
            request_id: req.into(),
            node_id: node,
            labels: l,
        }
    }

    #[test]
    fn precedence_is_node_then_group_then_all() {
        let mut s = state_of(3);
        assert_eq!(
            s.apply(label_cmd("l1", 1, labels(&[("zone", "a")]))),
            Response::Done
        );
        s.apply(label_cmd("l2", 2, labels(&[("zone", "a")])));
        s.apply(label_cmd("l3", 3, labels(&[("zone", "b")])));
        assert_eq!(s.desired_policy(1), None);
        s.apply(set("all", PolicyTarget::All, Some(mode(Mode::Dual))));
        let zone_a = Selector::parse("zone=a").unwrap();
        s.apply(set(
            "g",
            PolicyTarget::Group(zone_a.clone()),
            Some(mode(Mode::Iroh)),
        ));
        s.apply(set("n", PolicyTarget::Node(1), Some(mode(Mode::Grpc))));
        assert_eq!(
            s.desired_policy(1).map(|(p, src)| (p.mode, src)),
            Some((Mode::Grpc, PolicySource::Node))
        );
        assert_eq!(
            s.desired_policy(2).map(|(p, src)| (p.mode, src)),
            Some((Mode::Iroh, PolicySource::Group(zone_a.clone())))
        );
        assert_eq!(
            s.desired_policy(3).map(|(p, src)| (p.mode, src)),
            Some((Mode::Dual, PolicySource::All))
        );
        // Clearing the node policy falls back to the group.
        s.apply(set("n-clear", PolicyTarget::Node(1), None));
        assert_eq!(
            s.desired_policy(1).map(|(_, src)| src),
            Some(PolicySource::Group(zone_a))
        );
        // A retried set is answered from the dedup table.
        assert_eq!(
            s.apply(set("n", PolicyTarget::Node(1), Some(mode(Mode::Grpc)))),
            Response::Done
        );
        assert_eq!(
            s.desired_policy(1).map(|(_, src)| src.kind()),
            Some("group")
        );
    }

    #[test]
    fn bad_targets_and_policies_are_refused_by_name() {
        let mut s = state_of(2);
        assert_eq!(
            s.apply(set("a", PolicyTarget::Node(9), Some(mode(Mode::Iroh)))),
            Response::Rejected(Rejection::UnknownNode { node_id: 9 })
        );
        assert_eq!(
            s.apply(set(
                "b",
                PolicyTarget::Group(Selector::parse("zone=nowhere").unwrap()),
                Some(mode(Mode::Iroh))
            )),
            Response::Rejected(Rejection::EmptyGroup {
                selector: "zone=nowhere".into()
            })
        );
        let mut bad = mode(Mode::Dual);
        bad.migration.prefer_iroh = vec!["helth".into()];
        match s.apply(set("c", PolicyTarget::All, Some(bad))) {
            Response::Rejected(Rejection::InvalidPolicy { key, .. }) => {
                assert_eq!(key, "transport.migration.prefer_iroh[0]")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.apply(label_cmd("d", 1, labels(&[("zone", "a b")]))),
            Response::Rejected(Rejection::InvalidLabels { .. })
        ));
        assert_eq!(
            s.apply(label_cmd("e", 7, labels(&[("zone", "a")]))),
            Response::Rejected(Rejection::UnknownNode { node_id: 7 })
        );
    }

    #[test]
    fn a_departed_node_loses_its_labels_and_policy() {
        let mut s = state_of(2);
        s.apply(label_cmd("l", 2, labels(&[("zone", "a")])));
        s.apply(set("n", PolicyTarget::Node(2), Some(mode(Mode::Iroh))));
        let one = state_of(1);
        s.apply_membership(one.members().iter());
        assert!(s.node_labels().is_empty());
        assert!(s.desired_policies().nodes.is_empty());
    }

    #[test]
    fn selectors_and_labels_are_checked() {
        assert_eq!(Selector::parse("zone=a").unwrap().to_string(), "zone=a");
        assert!(matches!(
            Selector::parse("zone"),
            Err(LabelError::NotASelector { .. })
        ));
        assert!(Selector::parse("=a").is_err());
        assert!(Selector::parse("zone=").is_err());
        assert!(Selector::parse("zone=a=b").is_err());
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        assert_eq!(
            check_labels(&many),
            Err(LabelError::TooMany {
                count: MAX_LABELS + 1
            })
        );
        assert!(check_labels(&labels(&[("k", &"v".repeat(MAX_LABEL_LEN + 1))])).is_err());
        assert!(check_labels(&labels(&[("rack", "r-1.b_2")])).is_ok());
    }

    proptest::proptest! {
        /// The selector decoder never panics, and what it accepts prints
        /// back to the same text.
        #[test]
        fn selector_parse_never_panics_and_round_trips(text in ".{0,80}") {
            if let Ok(s) = Selector::parse(&text) {
                proptest::prop_assert_eq!(s.to_string(), text);
            }
        }

        /// Labels decoded from arbitrary bytes (postcard, as a command
        /// carries them) are either refused or pass the check, and a
        /// state applies them without panicking.
        #[test]
        fn arbitrary_labels_are_checked_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            if let Ok(l) = postcard::from_bytes::<Labels>(&bytes) {
                let mut s = state_of(1);
                let ok = check_labels(&l).is_ok();
                let r = s.apply(label_cmd("p", 1, l));
                proptest::prop_assert_eq!(r == Response::Done, ok);
            }
        }
    }
}
