//! The node's configuration file (`tern run --config node.toml`).
//!
//! ```toml
//! data_dir = "./tern-data"             # identity key, Raft log, snapshots, VM state
//!
//! [listen]
//! grpc = "127.0.0.1:7400"              # "off" to serve no gRPC
//! iroh = "127.0.0.1:7401"              # UDP; "off" to serve no iroh
//! metrics = "127.0.0.1:9400"           # Prometheus /metrics; "off" to disable
//!
//! [iroh]
//! relay_url = "https://relay.example:3340"   # optional; none = no relay at all
//! relay_ca_cert = "/etc/tern/relay-ca.pem"   # optional, for a private relay
//!
//! [cluster]
//! join_token = "s3cret"                # required to join, and to let others join
//! # Members to ask to join through; none = start a new cluster.
//! join = [{ id = "<64 hex digits>", grpc = "https://10.0.0.1:7400", iroh = ["10.0.0.1:7401"] }]
//!
//! [capacity]
//! vcpus = 8
//! memory_mib = 16384
//!
//! [vm]
//! runtimes = ["microvm"]               # the runtimes this node serves; "process"
//!                                      # (host programs) only when named here
//! runtime = "auto"                     # default for specs naming none: "auto" (the
//!                                      # first of runtimes) | "process" | "microvm"
//! process_user = "nobody"              # process workloads run as this user (never
//!                                      # root); default "nobody" when the node is root
//! image_dirs = ["/var/lib/tern/images"]  # microvm kernels, initrds and images
//!                                      # only from these (default DATA_DIR/images)
//!
//! [network]                            # guest networking; off unless enabled
//! enabled = true                       # a bridge, and a TAP or veth per VM (needs root)
//! bridge = "ternbr0"                   # the node's VM bridge (holds the gateway address)
//! pool = "10.213.0.0/16"               # the cluster's VM addresses (/16 to /29); the
//!                                      # first node proposes it, the others' must match
//! device_prefix = "tn"                 # first bytes of every device and namespace made
//! max_devices = 1024                   # VM network devices on this node, at most
//! host_netns = "lab0"                  # optional: keep the bridge in this namespace
//!
//! [node]
//! labels = { zone = "a", rack = "r1" } # recorded in the cluster state; groups
//!                                      # (`--group zone=a`) select by them
//!
//! [transport]                          # present: pins this node's policy (the
//! mode = "grpc"                        # emergency override, no quorum needed);
//!                                      # absent: the cluster's desired policy
//!
//! [limits]                             # optional; each key overrides one default
//! connections = 4096                   # gRPC: inbound connections in all
//! connections_per_ip = 256             # gRPC: per remote IP address
//! iroh_connections = 1024              # iroh: inbound connections in all
//! connections_per_peer = 32            # per proven node id (gRPC 32, iroh 16 by default)
//! streams_per_connection = 1024        # gRPC: concurrent calls per connection
//! in_flight_bytes_per_peer = 67108864  # request bytes one peer may have in flight (both)
//! handshake_timeout_secs = 10          # gRPC: bound on a TLS handshake
//! ```
//!
//! Every value is checked when the file is read; an error names the key and
//! says why, and the node does not start.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tern_protocol::PeerId;
use tern_transport_dual::{Policy, TransportConfig};

/// Default gRPC listen address.
pub const DEFAULT_GRPC: &str = "127.0.0.1:7400";
/// Default iroh (UDP) listen address.
pub const DEFAULT_IROH: &str = "127.0.0.1:7401";
/// Default Prometheus listen address.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9400";
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./tern-data";
/// Longest join token accepted; tokens are secrets, not documents.
pub const MAX_JOIN_TOKEN: usize = 1024;

/// A listen address, or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Not served.
    Off,
    /// Served on this address (port 0 picks a free port).
    On(SocketAddr),
}

impl Listen {
    /// The address, when served.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::On(a) => Some(a),
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Listen, D::Error> {
        let text = String::deserialize(d)?;
        if text.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        text.parse().map(Listen::On).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not an address like \"127.0.0.1:7400\" or \"off\": {e}"
            ))
        })
    }
}

/// Written as the file says it: `"off"` or the address.
impl Serialize for Listen {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Listen::Off => s.serialize_str("off"),
            Listen::On(a) => s.collect_str(a),
        }
    }
}

fn default_listen(addr: &str) -> Listen {
    addr.parse().map(Listen::On).unwrap_or(Listen::Off)
}

/// `[listen]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// gRPC (TCP).
    #[serde(default = "listen_grpc")]
    pub grpc: Listen,
    /// iroh (UDP).
    #[serde(default = "listen_iroh")]
    pub iroh: Listen,
    /// Prometheus `/metrics` (TCP).
    #[serde(default = "listen_metrics")]
    pub metrics: Listen,
}

fn listen_grpc() -> Listen {
    default_listen(DEFAULT_GRPC)
}
fn listen_iroh() -> Listen {
    default_listen(DEFAULT_IROH)
}
fn listen_metrics() -> Listen {
    default_listen(DEFAULT_METRICS)
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            grpc: listen_grpc(),
            iroh: listen_iroh(),
            metrics: listen_metrics(),
        }
    }
}

/// `[iroh]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrohConfig {
    /// A relay to use for relaying and hole punching. None: no relay is
    /// contacted at all.
    pub relay_url: Option<String>,
    /// PEM file of the CA that signed a private relay's certificate.
    pub relay_ca_cert: Option<PathBuf>,
}

/// One member to join through.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedConfig {
    /// The member's identity (64 hex digits).
    pub id: String,
    /// Its gRPC URL.
    pub grpc: Option<String>,
    /// Its iroh direct addresses.
    #[serde(default)]
    pub iroh: Vec<SocketAddr>,
}

impl SeedConfig {
    /// Joining through the node that wrote `file` (its `node.json`).
    pub fn from_node_file(file: &crate::node::NodeFile) -> SeedConfig {
        SeedConfig {
            id: file.id.clone(),
            grpc: file.grpc.clone(),
            iroh: file.iroh.clone().unwrap_or_default(),
        }
    }
}

/// `[cluster]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The token a node presents to join: one from `tern cluster token
    /// create` (`ID.SECRET`, expiring, counted), or a static secret. A
    /// static secret is also accepted from nodes joining through this one,
    /// for ever (prefer created tokens); a created token never is.
    pub join_token: Option<String>,
    /// Members to join through; empty to start a new cluster.
    #[serde(default)]
    pub join: Vec<SeedConfig>,
    /// Joiners are promoted to voter automatically only while the cluster
    /// has fewer voters than this; later ones stay learners until `tern
    /// cluster promote` (read by the leader).
    #[serde(default = "default_max_voters")]
    pub max_voters: usize,
    /// The most vCPUs a joining node may declare; more is cut to this.
    #[serde(default = "default_max_node_vcpus")]
    pub max_node_vcpus: u32,
    /// The most memory (MiB) a joining node may declare; more is cut to
    /// this.
    #[serde(default = "default_max_node_memory_mib")]
    pub max_node_memory_mib: u64,
    /// How often agents heartbeat to the leader, in milliseconds (read by
    /// servers, which tell agents).
    #[serde(default = "default_agent_heartbeat_interval_ms")]
    pub agent_heartbeat_interval_ms: u64,
    /// After how many milliseconds without a heartbeat the leader marks an
    /// agent down and moves its VMs (read by servers). An agent fences
    /// itself (stops its VMs) after a third of it.
    #[serde(default = "default_agent_down_after_ms")]
    pub agent_down_after_ms: u64,
}

fn default_agent_heartbeat_interval_ms() -> u64 {
    u64::try_from(tern_cluster::agents::DEFAULT_AGENT_HEARTBEAT_INTERVAL.as_millis())
        .unwrap_or(u64::MAX)
}

fn default_agent_down_after_ms() -> u64 {
    u64::try_from(tern_cluster::agents::DEFAULT_AGENT_DOWN_AFTER.as_millis()).unwrap_or(u64::MAX)
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            join_token: None,
            join: Vec::new(),
            max_voters: default_max_voters(),
            max_node_vcpus: default_max_node_vcpus(),
            max_node_memory_mib: default_max_node_memory_mib(),
            agent_heartbeat_interval_ms: default_agent_heartbeat_interval_ms(),
            agent_down_after_ms: default_agent_down_after_ms(),
        }
    }
}

/// Most voters `[cluster] max_voters` may name: a Raft group of more
/// makes every commit wait for more acknowledgements with no gain.
pub const MAX_MAX_VOTERS: usize = 9;

fn default_max_voters() -> usize {
    tern_cluster::admission::DEFAULT_MAX_VOTERS
}

fn default_max_node_vcpus() -> u32 {
    tern_cluster::admission::DEFAULT_MAX_NODE_CAPACITY.vcpus
}

fn default_max_node_memory_mib() -> u64 {
    tern_cluster::admission::DEFAULT_MAX_NODE_CAPACITY.memory_mib
}

/// `[access]`: the first node's bootstrap of the access table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Keys (64 hex digits each) granted the admin role when this node
    /// initialises a new cluster, besides its own key. Read only then: later
    /// changes go through `tern access grant`.
    #[serde(default)]
    pub admins: Vec<String>,
}

/// `[capacity]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    /// vCPUs offered to VMs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Memory offered to VMs, MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
}

fn default_vcpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

fn default_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
}

impl Default for CapacityConfig {
    fn default() -> Self {
        CapacityConfig {
            vcpus: default_vcpus(),
            memory_mib: default_memory(),
        }
    }
}

/// `[vm].runtime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    /// microvm where QEMU is installed, process otherwise.
    #[default]
    Auto,
    /// Workloads as supervised processes.
    Process,
    /// QEMU microVMs.
    Microvm,
}

/// A runtime a node may serve (`[vm].runtimes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeName {
    /// QEMU microVMs.
    Microvm,
    /// Supervised host processes.
    Process,
}

/// The runtimes a node serves when its config names none: microVMs only.
/// The process runtime runs host programs and is served only where a
/// config asks for it.
pub const DEFAULT_RUNTIMES: &[RuntimeName] = &[RuntimeName::Microvm];

/// The user process workloads run as when the node runs as root and its
/// config names none.
pub const DEFAULT_PROCESS_USER: &str = "nobody";

/// Sub-directory of the data directory microvm files are allowed from when
/// the config names no `image_dirs`.
pub const DEFAULT_IMAGE_DIR: &str = "images";

/// `[vm]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The default runtime for specs that name none.
    #[serde(default)]
    pub runtime: RuntimeChoice,
    /// The runtimes this node serves ([`DEFAULT_RUNTIMES`] when absent).
    pub runtimes: Option<Vec<RuntimeName>>,
    /// The user process workloads run as.
    pub process_user: Option<String>,
    /// Directories microvm kernels, initrds and images must lie in.
    pub image_dirs: Option<Vec<PathBuf>>,
}

impl VmConfig {
    /// The runtimes served.
    pub fn enabled(&self) -> Vec<RuntimeName> {
        self.runtimes
            .clone()
            .unwrap_or_else(|| DEFAULT_RUNTIMES.to_vec())
    }

    /// Whether `name` is served.
    pub fn serves(&self, name: RuntimeName) -> bool {
        self.enabled().contains(&name)
    }

    /// The allowed microvm directories, given the data directory.
    pub fn image_dirs(&self, data_dir: &Path) -> Vec<PathBuf> {
        self.image_dirs
            .clone()
            .unwrap_or_else(|| vec![data_dir.join(DEFAULT_IMAGE_DIR)])
    }

    fn check(&self) -> Result<(), ConfigError> {
        let enabled = self.enabled();
        if enabled.is_empty() {
            return Err(err(
                "vm.runtimes",
                "is empty: the node would run no VM placed on it; name \"microvm\" and/or \"process\", or leave the key out for the default",
            ));
        }
        for (i, name) in enabled.iter().enumerate() {
            if enabled[..i].contains(name) {
                return Err(err(
                    format!("vm.runtimes[{i}]"),
                    format!("{name:?} is listed twice"),
                ));
            }
        }
        let named = match self.runtime {
            RuntimeChoice::Auto => None,
            RuntimeChoice::Process => Some(RuntimeName::Process),
            RuntimeChoice::Microvm => Some(RuntimeName::Microvm),
        };
        if let Some(name) = named
            && !enabled.contains(&name)
        {
            let word = if name == RuntimeName::Process {
                "process"
            } else {
                "microvm"
            };
            return Err(err(
                "vm.runtime",
                format!(
                    "{word:?} is not among vm.runtimes ({enabled:?}); add it there to serve it{}",
                    if name == RuntimeName::Process {
                        " (the process runtime runs host programs: enable it only where that is intended)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if let Some(user) = &self.process_user {
            if user.is_empty() || user.contains([':', '/', '\n']) {
                return Err(err(
                    "vm.process_user",
                    format!("{user:?} is not a user name"),
                ));
            }
            if user == "root" {
                return Err(err(
                    "vm.process_user",
                    "workloads never run as root: name an unprivileged user (default \"nobody\")",
                ));
            }
        }
        if let Some(dirs) = &self.image_dirs {
            for (i, dir) in dirs.iter().enumerate() {
                if !dir.is_absolute() {
                    return Err(err(
                        format!("vm.image_dirs[{i}]"),
                        format!("{} is not an absolute path", dir.display()),
                    ));
                }
                if dir == Path::new("/") {
                    return Err(err(
                        format!("vm.image_dirs[{i}]"),
                        "\"/\" would let a VM boot from or write to any host file; name a directory of images",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `[network]`: guest networking. Off unless `enabled`: a node then makes
/// a bridge and a device per VM, which needs root.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// Whether the node gives its VMs a network.
    #[serde(default)]
    pub enabled: bool,
    /// The VM bridge ([`tern_runtime::network::DEFAULT_BRIDGE`]).
    pub bridge: Option<String>,
    /// The cluster's address pool
    /// ([`tern_state::network::DEFAULT_POOL`]).
    pub pool: Option<String>,
    /// The device and namespace name prefix
    /// ([`tern_runtime::network::DEFAULT_DEVICE_PREFIX`]).
    pub device_prefix: Option<String>,
    /// The most VM devices on the node
    /// ([`tern_runtime::network::DEFAULT_MAX_DEVICES`]).
    pub max_devices: Option<usize>,
    /// The namespace for the bridge and host ends (the node's own when
    /// absent).
    pub host_netns: Option<String>,
}

impl NetworkSection {
    /// The pool, parsed.
    pub fn pool(&self) -> Result<tern_state::Ipv4Net, ConfigError> {
        let text = self
            .pool
            .as_deref()
            .unwrap_or(tern_state::network::DEFAULT_POOL);
        tern_state::Ipv4Net::parse_pool(text).map_err(|e| err("network.pool", e.to_string()))
    }

    /// The runtime's network config, checked; `None` when networking is
    /// off.
    pub fn runtime_config(
        &self,
    ) -> Result<Option<tern_runtime::network::NetworkConfig>, ConfigError> {
        use tern_runtime::network as rn;
        let config = rn::NetworkConfig {
            bridge: self
                .bridge
                .clone()
                .unwrap_or_else(|| rn::DEFAULT_BRIDGE.to_owned()),
            device_prefix: self
                .device_prefix
                .clone()
                .unwrap_or_else(|| rn::DEFAULT_DEVICE_PREFIX.to_owned()),
            host_netns: self.host_netns.clone(),
            max_devices: self.max_devices.unwrap_or(rn::DEFAULT_MAX_DEVICES),
        };
        // The checks name `network.KEY`.
        rn::NodeNetwork::new(config.clone()).map_err(|e| match e {
            rn::NetError::InvalidConfig { key, reason, .. } => {
                err(format!("network.{key}"), reason)
            }
            other => err("network", other.to_string()),
        })?;
        Ok(self.enabled.then_some(config))
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.pool()?;
        self.runtime_config()?;
        Ok(())
    }
}

/// Longest TLS handshake bound `limits.handshake_timeout_secs` may set:
/// beyond it, slow clients could hold connection places for minutes.
pub const MAX_HANDSHAKE_TIMEOUT_SECS: u64 = 300;

/// `[limits]`: overrides of the transports' named limits; a key left out
/// keeps the transport's default constant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// gRPC: inbound connections in all.
    pub connections: Option<usize>,
    /// gRPC: inbound connections per remote IP.
    pub connections_per_ip: Option<usize>,
    /// iroh: inbound connections in all (a server of a large fleet holds
    /// one or two per agent).
    pub iroh_connections: Option<usize>,
    /// Both transports: inbound connections per proven node id.
    pub connections_per_peer: Option<usize>,
    /// gRPC: concurrent streams per connection.
    pub streams_per_connection: Option<u32>,
    /// Both transports: request bytes one peer may have in flight.
    pub in_flight_bytes_per_peer: Option<usize>,
    /// gRPC: seconds a TLS handshake may take.
    pub handshake_timeout_secs: Option<u64>,
}

impl LimitsConfig {
    fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            ("limits.connections", self.connections),
            ("limits.connections_per_ip", self.connections_per_ip),
            ("limits.iroh_connections", self.iroh_connections),
            ("limits.connections_per_peer", self.connections_per_peer),
            (
                "limits.streams_per_connection",
                self.streams_per_connection.map(|n| n as usize),
            ),
            (
                "limits.handshake_timeout_secs",
                self.handshake_timeout_secs.map(|n| n as usize),
            ),
        ];
        for (key, value) in positive {
            if value == Some(0) {
                return Err(err(key, "must be at least 1 (0 would refuse every peer)"));
            }
        }
        let frame = tern_protocol::frame::DEFAULT_MAX_PAYLOAD as usize;
        if let Some(bytes) = self.in_flight_bytes_per_peer
            && bytes < frame
        {
            return Err(err(
                "limits.in_flight_bytes_per_peer",
                format!(
                    "{bytes} is below one maximal request ({frame} bytes); such requests could never run"
                ),
            ));
        }
        if let Some(secs) = self.handshake_timeout_secs
            && secs > MAX_HANDSHAKE_TIMEOUT_SECS
        {
            return Err(err(
                "limits.handshake_timeout_secs",
                format!(
                    "{secs} s would let slow clients hold connections for minutes; at most {MAX_HANDSHAKE_TIMEOUT_SECS}"
                ),
            ));
        }
        Ok(())
    }

    /// The gRPC server's limits: the defaults with these overrides.
    pub fn grpc(&self) -> tern_transport_grpc::ServerLimits {
        let mut l = tern_transport_grpc::ServerLimits::default();
        if let Some(n) = self.connections {
            l.max_connections = n;
        }
        if let Some(n) = self.connections_per_ip {
            l.max_connections_per_ip = n;
        }
        if let Some(n) = self.connections_per_peer {
            l.max_connections_per_peer = n;
        }
        if let Some(n) = self.streams_per_connection {
            l.max_concurrent_streams = n;
        }
        if let Some(secs) = self.handshake_timeout_secs {
            l.handshake_timeout = std::time::Duration::from_secs(secs);
        }
        if let Some(n) = self.in_flight_bytes_per_peer {
            l.max_in_flight_bytes_per_peer = n;
        }
        l
    }

    /// Applies these overrides to the iroh transport's limits.
    pub fn apply_iroh(&self, l: &mut tern_transport_iroh::TransportLimits) {
        if let Some(n) = self.iroh_connections {
            l.max_connections = n;
        }
        if let Some(n) = self.connections_per_peer {
            l.max_connections_per_peer = n;
        }
        if let Some(n) = self.in_flight_bytes_per_peer {
            l.max_in_flight_bytes_per_peer = n;
        }
    }
}

/// The whole file as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the node keeps its identity, Raft state and VM state.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// `[listen]`.
    #[serde(default)]
    pub listen: ListenConfig,
    /// `[iroh]`.
    #[serde(default)]
    pub iroh: IrohConfig,
    /// `[cluster]`.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// `[capacity]`.
    #[serde(default)]
    pub capacity: CapacityConfig,
    /// `[vm]`.
    #[serde(default)]
    pub vm: VmConfig,
    /// `[transport]`: present, it pins the node's policy (the emergency
    /// override, see `tern_services::policy`); absent, the node runs the
    /// cluster's desired policy for it, or the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<TransportConfig>,
    /// `[node]`.
    #[serde(default)]
    pub node: NodeSection,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[access]`.
    #[serde(default)]
    pub access: AccessConfig,
    /// `[network]`.
    #[serde(default)]
    pub network: NetworkSection,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: default_data_dir(),
            listen: ListenConfig::default(),
            iroh: IrohConfig::default(),
            cluster: ClusterConfig::default(),
            capacity: CapacityConfig::default(),
            vm: VmConfig::default(),
            transport: None,
            node: NodeSection::default(),
            limits: LimitsConfig::default(),
            access: AccessConfig::default(),
            network: NetworkSection::default(),
        }
    }
}

/// `[node]`: facts about this node the cluster records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// `"server"` (the default: a Raft member holding the cluster state)
    /// or `"agent"` (runs VMs, holds no state, follows the servers it
    /// registers with through `[cluster] join` and `join_token`).
    #[serde(default, skip_serializing_if = "Role::is_server")]
    pub role: Role,
    /// Labels (`{ zone = "a", rack = "r1" }`): at most
    /// [`tern_state::MAX_LABELS`], keys and values 1 to
    /// [`tern_state::MAX_LABEL_LEN`] bytes of `a-z A-Z 0-9 . _ -`.
    /// Recorded in the cluster state when the node starts; groups of
    /// nodes (`tern transport set --group zone=a`) select by them.
    #[serde(default, skip_serializing_if = "tern_state::Labels::is_empty")]
    pub labels: tern_state::Labels,
}

/// A node's role, `[node] role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A Raft member: holds and replicates the cluster state.
    #[default]
    Server,
    /// Runs VMs; registers with the servers and follows them.
    Agent,
}

impl Role {
    /// Whether this is the server role (the default, left out of files).
    pub fn is_server(&self) -> bool {
        *self == Role::Server
    }
}

impl NodeSection {
    fn check(&self) -> Result<(), ConfigError> {
        tern_state::check_labels(&self.labels).map_err(|e| err("node.labels", e.to_string()))
    }
}

/// A configuration the node refuses, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when read from one.
    pub file: Option<PathBuf>,
    /// The key, e.g. `transport.mode` (empty when the file as a whole is
    /// at fault).
    pub key: String,
    /// Why, and what would be accepted.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if self.key.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        file: None,
        key: key.into(),
        reason: reason.into(),
    }
}

/// A checked configuration: the file plus the values derived from it.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The file as written.
    pub config: Config,
    /// The validated transport policy of the file's `[transport]`, or the
    /// default when it has none.
    pub policy: Policy,
    /// The join seeds, parsed.
    pub seeds: Vec<(PeerId, SeedConfig)>,
    /// `access.admins`, parsed.
    pub admins: Vec<PeerId>,
}

impl Checked {
    /// The policy the file pins: its `[transport]`, when it has one.
    pub fn pin(&self) -> Option<Policy> {
        self.config.transport.as_ref().map(|_| self.policy.clone())
    }
}

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Checked, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            key: String::new(),
            reason: format!("cannot read the config file: {e}"),
        })?;
        Config::parse(&text).map_err(|mut e| {
            e.file = Some(path.to_owned());
            e
        })
    }

    /// Parses and checks a file's text.
    pub fn parse(text: &str) -> Result<Checked, ConfigError> {
        // toml's message names the line and shows the key in context.
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            file: None,
            key: String::new(),
            reason: e.to_string().trim_end().to_owned(),
        })?;
        config.check()
    }

    /// The file's text for this configuration: what [`Config::parse`]
    /// reads back as the same configuration (keys left at `None` are left
    /// out, so the node's defaults apply). Harnesses write node configs
    /// with it instead of formatting TOML by hand.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| err("", format!("cannot write the configuration: {e}")))
    }

    /// Checks values that the file's syntax cannot.
    pub fn check(self) -> Result<Checked, ConfigError> {
        let policy = Policy::from_config(&self.transport.clone().unwrap_or_default())
            .map_err(|e| err(e.key, e.reason))?;
        self.node.check()?;
        if self.listen.grpc == Listen::Off && self.listen.iroh == Listen::Off {
            return Err(err(
                "listen",
                "both listen.grpc and listen.iroh are \"off\": a node must serve at least one transport",
            ));
        }
        if policy.uses_iroh() && self.listen.iroh == Listen::Off {
            return Err(err(
                "transport.mode",
                format!(
                    "the policy sends traffic over iroh (mode = {:?}) but listen.iroh is \"off\"; set listen.iroh to an address",
                    policy.mode.as_str()
                ),
            ));
        }
        if self.capacity.vcpus == 0 {
            return Err(err("capacity.vcpus", "must be at least 1"));
        }
        self.limits.check()?;
        self.vm.check()?;
        self.network.check()?;
        if self.capacity.memory_mib < 16 {
            return Err(err("capacity.memory_mib", "must be at least 16 (MiB)"));
        }
        if let Some(token) = &self.cluster.join_token
            && (token.is_empty() || token.len() > MAX_JOIN_TOKEN)
        {
            return Err(err(
                "cluster.join_token",
                format!("must be 1 to {MAX_JOIN_TOKEN} characters"),
            ));
        }
        let min_down = tern_cluster::agents::MIN_AGENT_DOWN_AFTER;
        if self.cluster.agent_heartbeat_interval_ms == 0
            || self.cluster.agent_down_after_ms < 3 * self.cluster.agent_heartbeat_interval_ms
            || u128::from(self.cluster.agent_down_after_ms) < min_down.as_millis()
        {
            return Err(err(
                "cluster.agent_down_after_ms",
                format!(
                    "{} ms with heartbeats every {} ms: must be at least {} ms and three heartbeat intervals (an agent fences itself after a third of it)",
                    self.cluster.agent_down_after_ms,
                    self.cluster.agent_heartbeat_interval_ms,
                    min_down.as_millis()
                ),
            ));
        }
        if self.node.role == Role::Agent && self.cluster.join.is_empty() {
            return Err(err(
                "cluster.join",
                "an agent ([node] role = \"agent\") registers with servers: name at least one in [[cluster.join]]",
            ));
        }
        if !(1..=MAX_MAX_VOTERS).contains(&self.cluster.max_voters) {
            return Err(err(
                "cluster.max_voters",
                format!(
                    "{} voters; must be 1 to {MAX_MAX_VOTERS} (5 survives two failures)",
                    self.cluster.max_voters
                ),
            ));
        }
        if self.cluster.max_node_vcpus == 0 {
            return Err(err(
                "cluster.max_node_vcpus",
                "must be above 0 (the most vCPUs a joining node may declare)",
            ));
        }
        if self.cluster.max_node_memory_mib == 0 {
            return Err(err(
                "cluster.max_node_memory_mib",
                "must be above 0 (the most memory a joining node may declare)",
            ));
        }
        // An agent's key may be registered already (a restart, a demoted
        // server): the servers refuse an unknown one without a token, and
        // the agent stops naming this key.
        if !self.cluster.join.is_empty()
            && self.cluster.join_token.is_none()
            && self.node.role != Role::Agent
        {
            return Err(err(
                "cluster.join_token",
                "joining through cluster.join needs the cluster's join token",
            ));
        }
        let mut admins = Vec::new();
        for (i, admin) in self.access.admins.iter().enumerate() {
            let id: PeerId = admin.parse().map_err(|e| {
                err(
                    format!("access.admins[{i}]"),
                    format!("{e} (a key is 64 hex digits, as `tern key new` prints)"),
                )
            })?;
            admins.push(id);
        }
        let mut seeds = Vec::new();
        for (i, seed) in self.cluster.join.iter().enumerate() {
            let key = format!("cluster.join[{i}]");
            let id: PeerId = seed
                .id
                .parse()
                .map_err(|e| err(format!("{key}.id"), format!("{e}")))?;
            if seed.grpc.is_none() && seed.iroh.is_empty() {
                return Err(err(
                    key,
                    "give the member's grpc URL, its iroh addresses, or both",
                ));
            }
            if let Some(url) = &seed.grpc
                && let Err(why) = tern_transport_grpc::client::check_url(url)
            {
                return Err(err(format!("{key}.grpc"), why.to_string()));
            }
            seeds.push((id, seed.clone()));
        }
        if let Some(url) = &self.iroh.relay_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(err(
                "iroh.relay_url",
                format!("{url:?} is not an http(s):// URL"),
            ));
        }
        if let Some(ca) = &self.iroh.relay_ca_cert
            && !ca.is_file()
        {
            return Err(err(
                "iroh.relay_ca_cert",
                format!("{} is not a readable file", ca.display()),
            ));
        }
        Ok(Checked {
            config: self,
            policy,
            seeds,
            admins,
        })
    }
}

/// Makes sure the data directory exists and is writable, saying which key
/// to change when it is not.
pub fn prepare_data_dir(dir: &Path) -> Result<(), ConfigError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        err(
            "data_dir",
            format!(
                "cannot create {}: {e}; choose a directory this user may write",
                dir.display()
            ),
        )
    })?;
    let probe = dir.join(".tern-write-probe");
    std::fs::write(&probe, b"ok").map_err(|e| {
        err(
            "data_dir",
            format!(
                "cannot write in {}: {e}; fix its permissions or choose another directory",
                dir.display()
            ),
        )
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_means_a_single_loopback_node() {
        let checked = Config::parse("").unwrap();
        let c = &checked.config;
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.listen.grpc.addr().unwrap().to_string(), DEFAULT_GRPC);
        assert_eq!(c.listen.iroh.addr().unwrap().to_string(), DEFAULT_IROH);
        assert!(c.cluster.join.is_empty());
        assert!(!checked.policy.uses_iroh(), "the fleet starts on gRPC");
        assert!(c.capacity.vcpus >= 1);
    }

    #[test]
    fn a_full_file_parses() {
        let id = "ab".repeat(32);
        let checked = Config::parse(&format!(
            r#"
            data_dir = "/var/lib/tern"
            [listen]
            grpc = "0.0.0.0:7400"
            iroh = "0.0.0.0:7401"
            metrics = "off"
            [cluster]
            join_token = "t0ken"
            join = [{{ id = "{id}", grpc = "https://10.0.0.1:7400", iroh = ["10.0.0.1:7401"] }}]
            [capacity]
            vcpus = 8
            memory_mib = 16384
            [vm]
            runtimes = ["process"]
            runtime = "process"
            [transport]
            mode = "dual"
            [transport.migration]
            prefer_iroh = ["health", "status"]
            raft_transport = "adaptive"
            "#
        ))
        .unwrap();
        assert_eq!(checked.config.listen.metrics, Listen::Off);
        assert_eq!(checked.seeds.len(), 1);
        assert_eq!(checked.seeds[0].0.to_string(), id);
        assert_eq!(checked.config.vm.runtime, RuntimeChoice::Process);
    }

    #[test]
    fn a_written_config_reads_back_the_same() {
        let id = "cd".repeat(32);
        let mut c = Config::parse("").unwrap().config;
        c.data_dir = PathBuf::from("/var/lib/tern");
        c.listen.metrics = Listen::Off;
        c.cluster.join_token = Some("t0ken".into());
        c.cluster.join.push(SeedConfig {
            id: id.clone(),
            grpc: Some("https://10.0.0.1:7400".into()),
            iroh: vec!["10.0.0.1:7401".parse().unwrap()],
        });
        c.vm.runtimes = Some(vec![RuntimeName::Process]);
        c.vm.runtime = RuntimeChoice::Process;
        c.limits.connections = Some(64);
        c.limits.iroh_connections = Some(8192);
        c.access.admins.push(id.clone());
        c.transport = Some(
            toml::from_str(
                "mode = \"dual\"\n[migration]\nprefer_iroh = [\"health\"]\nraft_transport = \"adaptive\"\n",
            )
            .unwrap(),
        );
        c.node.labels = [("zone".to_owned(), "a".to_owned())].into();
        let text = c.to_toml().unwrap();
        let back = Config::parse(&text).unwrap();
        assert_eq!(back.config.to_toml().unwrap(), text, "{text}");
        assert_eq!(back.config.listen.metrics, Listen::Off);
        assert_eq!(back.seeds[0].0.to_string(), id);
        assert_eq!(back.config.transport, c.transport);
        assert_eq!(back.config.limits, c.limits);
        assert!(text.contains("metrics = \"off\""), "{text}");
        assert!(!text.contains("relay_url"), "None is left out: {text}");
        assert_eq!(back.config.node.labels, c.node.labels);
        assert!(
            back.pin().is_some(),
            "a [transport] section pins the policy"
        );
        c.transport = None;
        let back = Config::parse(&c.to_toml().unwrap()).unwrap();
        assert!(back.pin().is_none(), "no [transport] section, no pin");
    }

    #[test]
    fn limits_reach_the_transport_they_name() {
        let c = Config::parse(
            "[limits]\niroh_connections = 8192\nconnections = 100\nconnections_per_peer = 4\n",
        )
        .unwrap();
        let mut iroh = tern_transport_iroh::TransportLimits::default();
        c.config.limits.apply_iroh(&mut iroh);
        assert_eq!(iroh.max_connections, 8192);
        assert_eq!(iroh.max_connections_per_peer, 4);
        let grpc = c.config.limits.grpc();
        assert_eq!(grpc.max_connections, 100, "gRPC's own key, not iroh's");
        assert_eq!(grpc.max_connections_per_peer, 4);
    }

    #[test]
    fn labels_are_checked_by_name() {
        let e = error_of("[node]\nlabels = { zone = \"a b\" }\n");
        assert!(e.starts_with("node.labels") && e.contains("a b"), "{e}");
        let e = error_of("[node]\nlabels = { \"\" = \"a\" }\n");
        assert!(e.starts_with("node.labels"), "{e}");
        let ok = Config::parse("[node]\nlabels = { zone = \"a\", rack = \"r-1\" }\n").unwrap();
        assert_eq!(ok.config.node.labels.len(), 2);
    }

    fn error_of(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn network_keys_are_checked_by_name() {
        let c = Config::parse("[network]\nenabled = true\npool = \"10.5.0.0/24\"\n").unwrap();
        let rc = c.config.network.runtime_config().unwrap().unwrap();
        assert_eq!(rc.bridge, tern_runtime::network::DEFAULT_BRIDGE);
        assert_eq!(c.config.network.pool().unwrap().to_string(), "10.5.0.0/24");
        assert!(
            Config::parse("")
                .unwrap()
                .config
                .network
                .runtime_config()
                .unwrap()
                .is_none(),
            "off unless enabled"
        );
        for (text, key) in [
            ("pool = \"10.5.0.1/24\"", "network.pool"),
            ("pool = \"10.5.0.0/8\"", "network.pool"),
            ("pool = \"nonsense\"", "network.pool"),
            ("bridge = \"a-bridge-name-too-long\"", "network.bridge"),
            ("bridge = \"br 0\"", "network.bridge"),
            ("device_prefix = \"sixsix\"", "network.device_prefix"),
            ("max_devices = 0", "network.max_devices"),
            ("max_devices = 5000", "network.max_devices"),
            ("host_netns = \"../etc\"", "network.host_netns"),
        ] {
            let e = error_of(&format!("[network]\nenabled = true\n{text}\n"));
            assert!(e.starts_with(key), "{text}: {e}");
        }
        assert!(error_of("[network]\nbogus = 1\n").contains("bogus"));
    }

    #[test]
    fn agent_keys_are_refused_by_name() {
        let e = error_of("[cluster]\nagent_down_after_ms = 1000\n");
        assert!(e.contains("cluster.agent_down_after_ms"), "{e}");
        let e = error_of("[cluster]\nagent_heartbeat_interval_ms = 0\n");
        assert!(e.contains("cluster.agent_down_after_ms"), "{e}");
        let e =
            error_of("[cluster]\nagent_heartbeat_interval_ms = 2000\nagent_down_after_ms = 5000\n");
        assert!(e.contains("three heartbeat intervals"), "{e}");
        let e = error_of("[node]\nrole = \"agent\"\n");
        assert!(e.contains("cluster.join"), "an agent without servers: {e}");
        let e = error_of("[node]\nrole = \"worker\"\n");
        assert!(e.contains("role") && e.contains("worker"), "{e}");
    }

    #[test]
    fn admission_keys_out_of_range_are_refused_by_name() {
        let e = error_of("[cluster]\nmax_voters = 0\n");
        assert!(e.contains("cluster.max_voters"), "{e}");
        let e = error_of("[cluster]\nmax_voters = 10\n");
        assert!(
            e.contains("cluster.max_voters") && e.contains("1 to 9"),
            "{e}"
        );
        let e = error_of("[cluster]\nmax_node_vcpus = 0\n");
        assert!(e.contains("cluster.max_node_vcpus"), "{e}");
        let e = error_of("[cluster]\nmax_node_memory_mib = 0\n");
        assert!(e.contains("cluster.max_node_memory_mib"), "{e}");
    }

    #[test]
    fn errors_name_the_key_and_say_why() {
        let e = error_of("[transport]\nmode = \"quic\"\n");
        assert!(e.contains("mode") && e.contains("quic"), "{e}");
        let e = error_of(
            "[transport]\nmode = \"dual\"\n[transport.migration]\nprefer_iroh = [\"helth\"]\n",
        );
        assert!(
            e.contains("transport.migration.prefer_iroh[0]") && e.contains("helth"),
            "{e}"
        );
        let e = error_of("[listen]\ngrpc = \"localhost\"\n");
        assert!(e.contains("grpc") && e.contains("localhost"), "{e}");
        let e = error_of("[listen]\ngrpc = \"off\"\niroh = \"off\"\n");
        assert!(e.contains("at least one transport"), "{e}");
        let e = error_of("[access]\nadmins = [\"nope\"]\n");
        assert!(e.starts_with("access.admins[0]"), "{e}");
        let key = "ab".repeat(32);
        let checked = Config::parse(&format!("[access]\nadmins = [\"{key}\"]\n")).unwrap();
        assert_eq!(checked.admins.len(), 1);
        assert_eq!(checked.admins[0].to_string(), key);
        let e = error_of("[listen]\niroh = \"off\"\n[transport]\nmode = \"iroh\"\n");
        assert!(e.starts_with("transport.mode"), "{e}");
        let e = error_of(
            "[cluster]\njoin = [{ id = \"abc\", grpc = \"https://x:1\" }]\njoin_token = \"t\"\n",
        );
        assert!(e.contains("cluster.join[0].id"), "{e}");
        let e = error_of(&format!(
            "[cluster]\njoin = [{{ id = \"{}\", grpc = \"https://x:1\" }}]\n",
            "00".repeat(32)
        ));
        assert!(e.contains("cluster.join_token"), "{e}");
        // A cleartext seed is refused, naming the key and saying why.
        let e = error_of(&format!(
            "[cluster]\njoin = [{{ id = \"{}\", grpc = \"http://10.0.0.1:7400\" }}]\njoin_token = \"t\"\n",
            "00".repeat(32)
        ));
        assert!(
            e.starts_with("cluster.join[0].grpc") && e.contains("TLS only"),
            "{e}"
        );
        let e = error_of("[vm]\nruntime = \"process\"\n");
        assert!(e.starts_with("vm.runtime") && e.contains("runtimes"), "{e}");
        let e = error_of("[vm]\nruntimes = [\"process\"]\nprocess_user = \"root\"\n");
        assert!(e.starts_with("vm.process_user"), "{e}");
        let e = error_of("[vm]\nimage_dirs = [\"/\"]\n");
        assert!(e.starts_with("vm.image_dirs[0]"), "{e}");
        let e = error_of("[vm]\nimage_dirs = [\"images\"]\n");
        assert!(e.starts_with("vm.image_dirs[0]"), "{e}");
        let e = error_of("[vm]\nruntimes = []\n");
        assert!(e.starts_with("vm.runtimes"), "{e}");
        let e = error_of("[vm]\nruntimes = [\"process\", \"process\"]\n");
        assert!(e.starts_with("vm.runtimes[1]"), "{e}");
        for user in ["", "a:b", "a/b"] {
            let e = error_of(&format!("[vm]\nprocess_user = {user:?}\n"));
            assert!(e.starts_with("vm.process_user"), "{e}");
        }
        for text in [
            "[limits]\nhandshake_timeout_secs = 301\n",
            "[limits]\nhandshake_timeout_secs = 0\n",
            "[limits]\nstreams_per_connection = 0\n",
            "[limits]\nconnections = 0\n",
        ] {
            let e = error_of(text);
            assert!(e.starts_with("limits."), "{text}: {e}");
        }
        let e = error_of("[limits]\niroh_connections = 0\n");
        assert!(e.starts_with("limits.iroh_connections"), "{e}");
        let e = error_of("[limits]\nconnections_per_ip = 0\n");
        assert!(e.starts_with("limits.connections_per_ip"), "{e}");
        let e = error_of("[limits]\nin_flight_bytes_per_peer = 1000\n");
        assert!(e.starts_with("limits.in_flight_bytes_per_peer"), "{e}");
        let e = error_of("[limits]\nconections = 5\n");
        assert!(e.contains("conections"), "{e}");
        let e = error_of("[capacity]\nvcpus = 0\n");
        assert!(e.contains("capacity.vcpus"), "{e}");
        let e = error_of("datadir = \"/x\"\n");
        assert!(e.contains("datadir"), "{e}");
        let e = error_of("[vm]\nruntime = \"docker\"\n");
        assert!(e.contains("runtime") && e.contains("docker"), "{e}");
    }

    #[test]
    fn an_unwritable_data_dir_is_refused_with_the_key() {
        let dir = std::env::temp_dir().join(format!("tern-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let e = prepare_data_dir(&file.join("sub")).unwrap_err();
        assert_eq!(e.key, "data_dir");
        assert!(e.reason.contains("cannot create"), "{e}");
        prepare_data_dir(&dir.join("ok")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
