//! Who may call what: roles and the one access table.
//!
//! Deny by default. Every method of the catalogue has exactly one [`Rule`]
//! in [`rule`], and a method without one is refused (and fails the test
//! that walks the catalogue). Both transports serve the same
//! [`crate::Dispatcher`] behind one check (the node installs it in front of
//! every service), so a rule holds alike over gRPC and iroh.
//!
//! Roles are bound to keys in the replicated cluster state; *member* is not
//! granted but follows from Raft membership (voters and learners). Roles
//! are ordered: admin implies operator implies viewer.

use serde::{Deserialize, Serialize};

use crate::catalog::{Method, ServiceId};

/// A role an admin grants to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Reads: status, VM list and get, members, metadata reads, monitoring.
    Viewer,
    /// The viewer's reads plus VM lifecycle, metadata writes, transport
    /// policy.
    Operator,
    /// The operator's rights plus membership, join tokens and access
    /// changes.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The role's name on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role with this name.
    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Whether holding `self` gives what `needed` gives.
    pub fn covers(self, needed: Role) -> bool {
        self >= needed
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a caller holds, as the access check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grants {
    /// The strongest role granted to the caller's key, if any.
    pub role: Option<Role>,
    /// The caller's key is a member of the Raft membership (voter or
    /// learner) this node has applied.
    pub member: bool,
    /// The caller's key is a registered agent's (a node that runs VMs
    /// without being a Raft member) in the state this node has applied.
    pub agent: bool,
}

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Every caller, known or not (liveness).
    Anyone,
    /// Every authenticated key; the service itself decides further. Used
    /// where a key that is neither member nor role holder must get through:
    /// `Cluster/Join` (the join token is checked by the Cluster service)
    /// and `Cluster/Members` (a joiner finds the leader with it before it
    /// is a member).
    AnyKey,
    /// Members only. The Raft service checks again against its effective
    /// membership (which, for a joining node, trusts the members its join
    /// answer named) and binds the caller to its own node id.
    Members,
    /// Registered agents only (their own heartbeats, reports and
    /// assignments); the Cluster service binds the caller to its own
    /// node id.
    Agents,
    /// Keys holding this role or a stronger one.
    Role(Role),
    /// Keys holding this role or a stronger one, and members. Reads
    /// (every member holds the whole replicated state anyway, so refusing
    /// it a read protects nothing) and the calls nodes make of each other:
    /// a follower forwarding a metadata put to the leader with its own
    /// key, a node leaving by itself.
    RoleOrMember(Role),
}

/// Why a call was refused; also the `reason` label of
/// [`crate::metric_names::ACCESS_DENIED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    /// The key holds no role and is not a member.
    UnknownKey,
    /// The key holds a role too weak for the method.
    NeedsRole,
    /// The method is for members only.
    MembersOnly,
    /// The method is for registered agents only.
    AgentsOnly,
    /// The method has no rule (deny by default).
    NoRule,
}

impl Denial {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::UnknownKey => "unknown_key",
            Denial::NeedsRole => "needs_role",
            Denial::MembersOnly => "members_only",
            Denial::AgentsOnly => "agents_only",
            Denial::NoRule => "no_rule",
        }
    }
}

impl Rule {
    /// Whether a caller holding `grants` may call a method with this rule.
    pub fn check(self, grants: Grants) -> Result<(), Denial> {
        let refused = || {
            if grants.role.is_none() && !grants.member {
                Denial::UnknownKey
            } else {
                Denial::NeedsRole
            }
        };
        match self {
            Rule::Anyone | Rule::AnyKey => Ok(()),
            Rule::Members if grants.member => Ok(()),
            Rule::Members => Err(Denial::MembersOnly),
            Rule::Agents if grants.agent => Ok(()),
            Rule::Agents => Err(Denial::AgentsOnly),
            Rule::Role(needed) => match grants.role {
                Some(r) if r.covers(needed) => Ok(()),
                _ => Err(refused()),
            },
            Rule::RoleOrMember(needed) => match grants.role {
                _ if grants.member => Ok(()),
                Some(r) if r.covers(needed) => Ok(()),
                _ => Err(refused()),
            },
        }
    }

    /// What the rule asks for, for refusal messages ("the operator role",
    /// "membership").
    pub fn needs(self) -> String {
        match self {
            Rule::Anyone => "nothing".into(),
            Rule::AnyKey => "an authenticated key".into(),
            Rule::Members => "cluster membership (a node key)".into(),
            Rule::Agents => "a registered agent's key".into(),
            Rule::Role(r) => format!("the {r} role"),
            Rule::RoleOrMember(r) => format!("the {r} role (or cluster membership)"),
        }
    }
}

/// The access rule of `method`; `None` for a method the table does not
/// know, which is refused (a test requires a rule for every method of the
/// catalogue).
pub fn rule(method: &Method) -> Option<Rule> {
    use Role::{Admin, Operator, Viewer};
    let rule = match (method.service, method.name) {
        (ServiceId::Health, "Check") => Rule::Anyone,
        (ServiceId::Status, "Get") => Rule::RoleOrMember(Viewer),
        (ServiceId::Vm, "Create" | "Start" | "Stop" | "Delete" | "Migrate") => Rule::Role(Operator),
        (ServiceId::Vm, "List" | "Get" | "Watch") => Rule::RoleOrMember(Viewer),
        (ServiceId::Monitoring, "Metrics") => Rule::RoleOrMember(Viewer),
        (ServiceId::Cluster, "Join") => Rule::AnyKey,
        (ServiceId::Cluster, "Members") => Rule::AnyKey,
        (ServiceId::Cluster, "Leave") => Rule::RoleOrMember(Admin),
        (ServiceId::Cluster, "MetaPut") => Rule::RoleOrMember(Operator),
        // Members forward it to the leader, with their own key.
        (ServiceId::Cluster, "TransportSet" | "Rollout") => Rule::RoleOrMember(Operator),
        (ServiceId::Cluster, "RolloutGet") => Rule::RoleOrMember(Viewer),
        (ServiceId::Cluster, "MetaGet") => Rule::RoleOrMember(Viewer),
        (ServiceId::Cluster, "AccessGrant" | "AccessRevoke") => Rule::Role(Admin),
        (
            ServiceId::Cluster,
            "TokenCreate" | "TokenRevoke" | "TokenList" | "Promote" | "Demote",
        ) => Rule::Role(Admin),
        (ServiceId::Cluster, "AccessList") => Rule::RoleOrMember(Viewer),
        // The token (or an existing registration) is checked by the
        // Cluster service, as for Join.
        (ServiceId::Cluster, "AgentRegister") => Rule::AnyKey,
        (ServiceId::Cluster, "AgentHeartbeat" | "AgentReport" | "AgentSync") => Rule::Agents,
        // A follower relaying the heartbeats it took to the leader.
        (ServiceId::Cluster, "AgentsHeard") => Rule::Members,
        (ServiceId::Raft, "Vote" | "AppendEntries" | "AppendStream" | "Snapshot" | "Propose") => {
            Rule::Members
        }
        _ => return None,
    };
    Some(rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{all_methods, methods};

    #[test]
    fn every_method_has_a_rule() {
        for method in all_methods() {
            assert!(
                rule(method).is_some(),
                "{} has no access rule: add one to access::rule",
                method.label()
            );
        }
    }

    #[test]
    fn roles_are_ordered_and_named() {
        assert!(Role::Admin.covers(Role::Operator));
        assert!(Role::Operator.covers(Role::Viewer));
        assert!(!Role::Viewer.covers(Role::Operator));
        for r in Role::ALL {
            assert_eq!(Role::from_name(r.name()), Some(r));
        }
        assert_eq!(Role::from_name("root"), None);
    }

    #[test]
    fn rules_check_grants() {
        let none = Grants::default();
        let viewer = Grants {
            role: Some(Role::Viewer),
            ..Grants::default()
        };
        let member = Grants {
            member: true,
            ..Grants::default()
        };
        let agent = Grants {
            agent: true,
            ..Grants::default()
        };
        let create = rule(methods::VM_CREATE).expect("rule");
        assert_eq!(create.check(none), Err(Denial::UnknownKey));
        assert_eq!(create.check(viewer), Err(Denial::NeedsRole));
        assert_eq!(create.check(member), Err(Denial::NeedsRole));
        let vote = rule(methods::RAFT_VOTE).expect("rule");
        assert_eq!(vote.check(viewer), Err(Denial::MembersOnly));
        assert_eq!(vote.check(member), Ok(()));
        assert_eq!(
            vote.check(agent),
            Err(Denial::MembersOnly),
            "an agent is no member"
        );
        let heartbeat = rule(methods::CLUSTER_AGENT_HEARTBEAT).expect("rule");
        assert_eq!(heartbeat.check(agent), Ok(()));
        assert_eq!(heartbeat.check(member), Err(Denial::AgentsOnly));
        assert_eq!(heartbeat.check(viewer), Err(Denial::AgentsOnly));
        let sync = rule(methods::CLUSTER_AGENT_SYNC).expect("rule");
        assert_eq!(sync.check(none), Err(Denial::AgentsOnly));
        assert_eq!(
            create.check(agent),
            Err(Denial::UnknownKey),
            "an agent holds no role"
        );
        let set = rule(methods::CLUSTER_TRANSPORT_SET).expect("rule");
        assert_eq!(set.check(viewer), Err(Denial::NeedsRole));
        let rollout = rule(methods::CLUSTER_ROLLOUT).expect("rule");
        assert_eq!(rollout.check(viewer), Err(Denial::NeedsRole));
        let rollout_get = rule(methods::CLUSTER_ROLLOUT_GET).expect("rule");
        assert_eq!(rollout_get.check(viewer), Ok(()));
        assert_eq!(
            set.needs(),
            "the operator role (or cluster membership)",
            "a refused viewer is told which role it needs"
        );
        assert_eq!(
            set.check(Grants {
                role: Some(Role::Operator),
                ..Grants::default()
            }),
            Ok(())
        );
        assert_eq!(
            rule(methods::HEALTH_CHECK).expect("rule").check(none),
            Ok(())
        );
    }
}
