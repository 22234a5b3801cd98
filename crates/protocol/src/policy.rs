//! The transport policy: which transport each call uses, exactly as the
//! operators write it.
//!
//! ```toml
//! [transport]
//! mode = "dual"                        # "grpc" | "iroh" | "dual"
//! [transport.migration]
//! prefer_iroh = ["health", "status"]   # service names, or ["all_except_raft"]
//! raft_transport = "grpc"              # "grpc" | "iroh" | "adaptive"
//! fallback_to_grpc = true
//! ```
//!
//! [`TransportConfig`] is that section as written (serde); [`Policy`] is
//! the validated form the router runs. It lives here, in the shared
//! vocabulary, because three rooms use the one validation: the node's
//! config file, the replicated desired policies (`tern-state`) and the
//! router (`tern-transport-dual`, which re-exports this module). Every validation error names the key
//! and says why, so a typo in a rollout stage is caught before it runs.

use std::collections::BTreeSet;
use std::fmt;

use crate::{ServiceId, TransportKind};
use serde::{Deserialize, Serialize};

/// The word in `prefer_iroh` that means every service but Raft.
pub const ALL_EXCEPT_RAFT: &str = "all_except_raft";

/// `transport.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every call over gRPC: the fleet before migration, and the rollback.
    #[default]
    Grpc,
    /// Every call over iroh (falling back to gRPC only if allowed).
    Iroh,
    /// Per service, as `transport.migration` says.
    Dual,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 3] = [Mode::Grpc, Mode::Iroh, Mode::Dual];

    /// The mode with this name.
    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Grpc => "grpc",
            Mode::Iroh => "iroh",
            Mode::Dual => "dual",
        }
    }
}

/// `transport.migration.raft_transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RaftTransport {
    /// Raft over gRPC.
    #[default]
    Grpc,
    /// Raft over iroh.
    Iroh,
    /// Per peer, whichever transport measures better (with hysteresis).
    Adaptive,
}

impl RaftTransport {
    /// Every choice.
    pub const ALL: [RaftTransport; 3] = [
        RaftTransport::Grpc,
        RaftTransport::Iroh,
        RaftTransport::Adaptive,
    ];

    /// The choice with this name.
    pub fn from_name(name: &str) -> Option<RaftTransport> {
        RaftTransport::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            RaftTransport::Grpc => "grpc",
            RaftTransport::Iroh => "iroh",
            RaftTransport::Adaptive => "adaptive",
        }
    }
}

/// The `[transport]` section as written in the node's TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// `mode`.
    #[serde(default)]
    pub mode: Mode,
    /// `[transport.migration]`.
    #[serde(default)]
    pub migration: MigrationConfig,
}

/// The `[transport.migration]` section as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// Services whose calls prefer iroh in `dual` mode.
    #[serde(default)]
    pub prefer_iroh: Vec<String>,
    /// How Raft traffic is carried in `dual` mode.
    #[serde(default)]
    pub raft_transport: RaftTransport,
    /// Whether a call that fails at the transport level on iroh may be
    /// retried on gRPC (only when that cannot apply it twice).
    #[serde(default = "default_fallback")]
    pub fallback_to_grpc: bool,
}

fn default_fallback() -> bool {
    true
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            prefer_iroh: Vec::new(),
            raft_transport: RaftTransport::Grpc,
            fallback_to_grpc: true,
        }
    }
}

impl TransportConfig {
    /// The section as `tern.v1.TransportPolicy` (what Status and
    /// `Cluster/TransportSet` carry).
    pub fn to_pb(&self) -> crate::pb::TransportPolicy {
        crate::pb::TransportPolicy {
            mode: self.mode.as_str().to_owned(),
            prefer_iroh: self.migration.prefer_iroh.clone(),
            raft_transport: self.migration.raft_transport.as_str().to_owned(),
            fallback_to_grpc: self.migration.fallback_to_grpc,
        }
    }

    /// Reads a `tern.v1.TransportPolicy` from the network: an unknown
    /// mode or Raft transport is an error naming the key. The names are
    /// only read here; [`Policy::from_config`] validates the rest.
    pub fn from_pb(p: &crate::pb::TransportPolicy) -> Result<TransportConfig, PolicyError> {
        let mode = Mode::from_name(&p.mode).ok_or_else(|| PolicyError {
            key: "transport.mode".into(),
            reason: format!(
                "{:?} is not a mode; use \"grpc\", \"iroh\" or \"dual\"",
                cut(&p.mode)
            ),
        })?;
        let raft_transport =
            RaftTransport::from_name(&p.raft_transport).ok_or_else(|| PolicyError {
                key: "transport.migration.raft_transport".into(),
                reason: format!(
                    "{:?} is not a Raft transport; use \"grpc\", \"iroh\" or \"adaptive\"",
                    cut(&p.raft_transport)
                ),
            })?;
        Ok(TransportConfig {
            mode,
            migration: MigrationConfig {
                prefer_iroh: p.prefer_iroh.clone(),
                raft_transport,
                fallback_to_grpc: p.fallback_to_grpc,
            },
        })
    }
}

/// At most 64 bytes of `text`, for error messages about network input.
fn cut(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A configuration value the router cannot run, with the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The full key, e.g. `transport.migration.prefer_iroh[1]`.
    pub key: String,
    /// Why it is refused and what would be accepted.
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

impl std::error::Error for PolicyError {}

/// Which services prefer iroh.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum IrohServices {
    /// The listed services.
    #[default]
    None,
    /// These services (never Raft: Raft follows `raft_transport`).
    Some(BTreeSet<ServiceId>),
    /// Every service except Raft.
    AllExceptRaft,
}

impl IrohServices {
    /// Whether `service` prefers iroh.
    pub fn contains(&self, service: ServiceId) -> bool {
        match self {
            IrohServices::None => false,
            IrohServices::Some(set) => set.contains(&service),
            IrohServices::AllExceptRaft => service != ServiceId::Raft,
        }
    }
}

/// The validated policy the router runs. Its default is the default
/// `[transport]` section's (gRPC, falling back allowed): a node on the
/// default runs exactly that before and after a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `transport.mode`.
    pub mode: Mode,
    /// `transport.migration.prefer_iroh`.
    pub prefer_iroh: IrohServices,
    /// `transport.migration.raft_transport`.
    pub raft_transport: RaftTransport,
    /// `transport.migration.fallback_to_grpc`.
    pub fallback_to_grpc: bool,
}

/// The transport a call should try first, before peer capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    /// This transport.
    Fixed(TransportKind),
    /// Whichever the adaptive chooser picks for the peer.
    Adaptive,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            mode: Mode::default(),
            prefer_iroh: IrohServices::None,
            raft_transport: RaftTransport::default(),
            fallback_to_grpc: MigrationConfig::default().fallback_to_grpc,
        }
    }
}

impl Policy {
    /// Validates a `[transport]` section.
    pub fn from_config(config: &TransportConfig) -> Result<Policy, PolicyError> {
        let migration = &config.migration;
        let mut services = BTreeSet::new();
        let mut all_except_raft = false;
        for (i, name) in migration.prefer_iroh.iter().enumerate() {
            let key = format!("transport.migration.prefer_iroh[{i}]");
            if name == ALL_EXCEPT_RAFT {
                all_except_raft = true;
                continue;
            }
            match ServiceId::from_name(name) {
                Some(ServiceId::Raft) => {
                    return Err(PolicyError {
                        key,
                        reason: "Raft is not chosen here: set transport.migration.raft_transport \
                                 to \"iroh\" or \"adaptive\" instead"
                            .into(),
                    });
                }
                Some(service) if service != ServiceId::Connection => {
                    services.insert(service);
                }
                _ => {
                    let known: Vec<&str> = ServiceId::SERVICES
                        .iter()
                        .filter(|s| **s != ServiceId::Raft)
                        .map(|s| s.name())
                        .collect();
                    return Err(PolicyError {
                        key,
                        reason: format!(
                            "unknown service {name:?}; known services are {} (\"vm_ops\" means \"vm\"), \
                             or [\"{ALL_EXCEPT_RAFT}\"]",
                            known.join(", ")
                        ),
                    });
                }
            }
        }
        if all_except_raft && migration.prefer_iroh.len() > 1 {
            return Err(PolicyError {
                key: "transport.migration.prefer_iroh".into(),
                reason: format!("\"{ALL_EXCEPT_RAFT}\" already names every service; list it alone"),
            });
        }
        let prefer_iroh = if all_except_raft {
            IrohServices::AllExceptRaft
        } else if services.is_empty() {
            IrohServices::None
        } else {
            IrohServices::Some(services)
        };
        Ok(Policy {
            mode: config.mode,
            prefer_iroh,
            raft_transport: migration.raft_transport,
            fallback_to_grpc: migration.fallback_to_grpc,
        })
    }

    /// Back to the configuration form (for `tern transport show` and the
    /// Status service).
    pub fn to_config(&self) -> TransportConfig {
        let prefer_iroh = match &self.prefer_iroh {
            IrohServices::None => Vec::new(),
            IrohServices::Some(set) => set.iter().map(|s| s.name().to_owned()).collect(),
            IrohServices::AllExceptRaft => vec![ALL_EXCEPT_RAFT.to_owned()],
        };
        TransportConfig {
            mode: self.mode,
            migration: MigrationConfig {
                prefer_iroh,
                raft_transport: self.raft_transport,
                fallback_to_grpc: self.fallback_to_grpc,
            },
        }
    }

    /// Which transport a call to `service` tries first.
    pub fn preference(&self, service: ServiceId) -> Preference {
        match self.mode {
            Mode::Grpc => Preference::Fixed(TransportKind::Grpc),
            Mode::Iroh => Preference::Fixed(TransportKind::Iroh),
            Mode::Dual if service == ServiceId::Raft => match self.raft_transport {
                RaftTransport::Grpc => Preference::Fixed(TransportKind::Grpc),
                RaftTransport::Iroh => Preference::Fixed(TransportKind::Iroh),
                RaftTransport::Adaptive => Preference::Adaptive,
            },
            Mode::Dual if self.prefer_iroh.contains(service) => {
                Preference::Fixed(TransportKind::Iroh)
            }
            Mode::Dual => Preference::Fixed(TransportKind::Grpc),
        }
    }

    /// Whether this policy ever sends anything over iroh.
    pub fn uses_iroh(&self) -> bool {
        ServiceId::SERVICES
            .iter()
            .any(|s| self.preference(*s) != Preference::Fixed(TransportKind::Grpc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_is_the_default_section() {
        let from_section = Policy::from_config(&TransportConfig::default()).unwrap();
        assert_eq!(Policy::default(), from_section);
        assert!(Policy::default().fallback_to_grpc);
    }

    proptest::proptest! {
        /// A policy decoded from arbitrary bytes (as `Cluster/TransportSet`
        /// receives it) is read and validated without panicking, and what
        /// validates writes back to the same message.
        #[test]
        fn arbitrary_policy_messages_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            use prost::Message;
            if let Ok(p) = crate::pb::TransportPolicy::decode(bytes.as_slice())
                && let Ok(c) = TransportConfig::from_pb(&p)
                && Policy::from_config(&c).is_ok()
            {
                proptest::prop_assert_eq!(c.to_pb(), p);
            }
        }
    }

    #[test]
    fn unknown_names_from_the_network_are_refused_by_key() {
        let mut p = TransportConfig::default().to_pb();
        p.mode = "quic".into();
        assert_eq!(
            TransportConfig::from_pb(&p).unwrap_err().key,
            "transport.mode"
        );
        let mut p = TransportConfig::default().to_pb();
        p.raft_transport = "tcp".into();
        assert_eq!(
            TransportConfig::from_pb(&p).unwrap_err().key,
            "transport.migration.raft_transport"
        );
        assert_eq!(
            TransportConfig::from_pb(&TransportConfig::default().to_pb()).unwrap(),
            TransportConfig::default()
        );
    }

    fn parse(text: &str) -> Result<Policy, String> {
        #[derive(Deserialize)]
        struct File {
            transport: TransportConfig,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        Policy::from_config(&file.transport).map_err(|e| e.to_string())
    }

    #[test]
    fn the_operators_stages_parse() {
        let stage1 = parse(
            r#"
            [transport]
            mode = "dual"
            [transport.migration]
            prefer_iroh = ["health", "status"]
            raft_transport = "grpc"
            fallback_to_grpc = true
            "#,
        )
        .unwrap();
        assert_eq!(
            stage1.preference(ServiceId::Health),
            Preference::Fixed(TransportKind::Iroh)
        );
        assert_eq!(
            stage1.preference(ServiceId::Vm),
            Preference::Fixed(TransportKind::Grpc)
        );
        assert_eq!(
            stage1.preference(ServiceId::Raft),
            Preference::Fixed(TransportKind::Grpc)
        );

        let stage2 = parse(
            r#"
            [transport]
            mode = "dual"
            [transport.migration]
            prefer_iroh = ["health", "status", "monitoring", "vm_ops"]
            "#,
        )
        .unwrap();
        assert_eq!(
            stage2.preference(ServiceId::Vm),
            Preference::Fixed(TransportKind::Iroh)
        );
        assert!(stage2.fallback_to_grpc, "fallback defaults to on");

        let stage3 = parse(
            r#"
            [transport]
            mode = "dual"
            [transport.migration]
            prefer_iroh = ["all_except_raft"]
            raft_transport = "adaptive"
            "#,
        )
        .unwrap();
        assert_eq!(
            stage3.preference(ServiceId::Cluster),
            Preference::Fixed(TransportKind::Iroh)
        );
        assert_eq!(stage3.preference(ServiceId::Raft), Preference::Adaptive);

        let stage4 = parse("[transport]\nmode = \"iroh\"\n").unwrap();
        assert_eq!(
            stage4.preference(ServiceId::Raft),
            Preference::Fixed(TransportKind::Iroh)
        );
        let rollback = parse("[transport]\nmode = \"grpc\"\n").unwrap();
        assert!(!rollback.uses_iroh());
        assert!(stage3.uses_iroh());
    }

    #[test]
    fn bad_values_name_the_key_and_the_reason() {
        let err = parse("[transport]\nmode = \"quic\"\n").unwrap_err();
        assert!(err.contains("mode") && err.contains("quic"), "{err}");

        let err =
            parse("[transport]\n[transport.migration]\nprefer_iroh = [\"health\", \"vmops\"]\n")
                .unwrap_err();
        assert!(
            err.contains("transport.migration.prefer_iroh[1]") && err.contains("vmops"),
            "{err}"
        );

        let err =
            parse("[transport]\n[transport.migration]\nprefer_iroh = [\"raft\"]\n").unwrap_err();
        assert!(err.contains("raft_transport"), "{err}");

        let err = parse(
            "[transport]\n[transport.migration]\nprefer_iroh = [\"all_except_raft\", \"vm\"]\n",
        )
        .unwrap_err();
        assert!(err.contains("alone"), "{err}");

        let err = parse("[transport]\n[transport.migration]\nraft_transport = \"fastest\"\n")
            .unwrap_err();
        assert!(err.contains("raft_transport"), "{err}");

        let err = parse("[transport]\nmod = \"dual\"\n").unwrap_err();
        assert!(err.contains("mod"), "{err}");
    }

    #[test]
    fn config_round_trips() {
        for text in [
            "[transport]\nmode = \"dual\"\n[transport.migration]\nprefer_iroh = [\"health\", \"status\"]\n",
            "[transport]\nmode = \"dual\"\n[transport.migration]\nprefer_iroh = [\"all_except_raft\"]\nraft_transport = \"adaptive\"\n",
        ] {
            let policy = parse(text).unwrap();
            assert_eq!(Policy::from_config(&policy.to_config()).unwrap(), policy);
        }
    }
}
