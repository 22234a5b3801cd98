//! Node configurations for harnesses, built as the node's typed
//! [`Config`] and written with [`Config::to_toml`], so a harness can
//! never write a key the node would not read, and a renamed key breaks
//! the build instead of a test run.
//!
//! [`node`] is the usual harness node (the process runtime, a fixed
//! capacity, a join token, the pool's keys as admins); [`join`] points a
//! config at a seed's `node.json`; [`grpc`], [`iroh`] and [`dual`] are the
//! `[transport]` sections harnesses switch between; [`write()`] and
//! [`set_transport`] write and rewrite files.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::Context;
use tern_node::config::{
    CapacityConfig, Config, Listen, ListenConfig, RuntimeChoice, RuntimeName, SeedConfig,
};
use tern_node::node::NodeFile;
use tern_transport_dual::TransportConfig;
use tern_transport_dual::policy::{MigrationConfig, Mode, RaftTransport};

/// The vCPUs every harness node offers (placement needs room, not truth).
pub const VCPUS: u32 = 4;
/// The memory every harness node offers, MiB.
pub const MEMORY_MIB: u64 = 4096;

/// The ports a node listens on; 0 lets the kernel pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// gRPC (TCP).
    pub grpc: u16,
    /// iroh (UDP).
    pub iroh: u16,
    /// Prometheus `/metrics` (TCP).
    pub metrics: u16,
}

impl Ports {
    /// Every port picked by the kernel.
    pub const ANY: Ports = Ports {
        grpc: 0,
        iroh: 0,
        metrics: 0,
    };
}

/// Every listener on `ip` with `ports`.
pub fn listen_on(ip: impl Into<IpAddr>, ports: Ports) -> ListenConfig {
    let ip = ip.into();
    ListenConfig {
        grpc: Listen::On(SocketAddr::new(ip, ports.grpc)),
        iroh: Listen::On(SocketAddr::new(ip, ports.iroh)),
        metrics: Listen::On(SocketAddr::new(ip, ports.metrics)),
    }
}

/// Every listener on 127.0.0.1, ports picked by the kernel.
pub fn loopback() -> ListenConfig {
    listen_on(Ipv4Addr::LOCALHOST, Ports::ANY)
}

/// A harness node in `data_dir` listening as `listen`: the process
/// runtime (workloads are host programs), [`VCPUS`] and [`MEMORY_MIB`],
/// `join_token`, and the default (gRPC) transport policy. No `[access]`:
/// a harness whose own clients need a role adds [`crate::keys::admin_ids`].
pub fn node(data_dir: &Path, listen: ListenConfig, join_token: &str) -> Config {
    let mut c = Config {
        data_dir: data_dir.to_owned(),
        listen,
        capacity: CapacityConfig {
            vcpus: VCPUS,
            memory_mib: MEMORY_MIB,
        },
        ..Config::default()
    };
    c.vm.runtimes = Some(vec![RuntimeName::Process]);
    c.vm.runtime = RuntimeChoice::Process;
    c.cluster.join_token = Some(join_token.to_owned());
    c
}

/// Makes `config` join through the node that wrote `seed`.
pub fn join(config: &mut Config, seed: &NodeFile) {
    config.cluster.join = vec![SeedConfig::from_node_file(seed)];
}

/// `[transport] mode = MODE` with the default migration section.
pub fn mode(mode: Mode) -> TransportConfig {
    TransportConfig {
        mode,
        migration: MigrationConfig::default(),
    }
}

/// `mode = "grpc"`: where a fleet starts.
pub fn grpc() -> TransportConfig {
    mode(Mode::Grpc)
}

/// `mode = "iroh"`: the end of the migration.
pub fn iroh() -> TransportConfig {
    mode(Mode::Iroh)
}

/// `mode = "dual"` preferring iroh for `prefer` (`"all_except_raft"` or
/// service names), Raft over `raft`, fallback to gRPC on.
pub fn dual(prefer: &[&str], raft: RaftTransport) -> TransportConfig {
    TransportConfig {
        mode: Mode::Dual,
        migration: MigrationConfig {
            prefer_iroh: prefer.iter().map(|p| (*p).to_owned()).collect(),
            raft_transport: raft,
            fallback_to_grpc: true,
        },
    }
}

/// Writes `config` to `path`.
pub fn write(path: &Path, config: &Config) -> anyhow::Result<()> {
    let text = config.to_toml()?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Reads the config file at `path` as written (not checked: a harness
/// rewrites what it wrote).
pub fn read(path: &Path) -> anyhow::Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Replaces the `[transport]` section of the file at `path` (the node
/// applies it on SIGHUP).
pub fn set_transport(path: &Path, transport: &TransportConfig) -> anyhow::Result<()> {
    let mut config = read(path)?;
    config.transport = Some(transport.clone());
    write(path, &config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joiner_reads_back_as_written() {
        let seed = NodeFile {
            id: "ab".repeat(32),
            grpc: Some("https://10.77.0.11:7400".into()),
            iroh: Some(vec!["10.77.0.11:7401".parse().unwrap()]),
            metrics: None,
            pid: 1,
        };
        let ports = Ports {
            grpc: 7400,
            iroh: 7401,
            metrics: 9400,
        };
        let mut c = node(
            Path::new("/tmp/x/n2"),
            listen_on(Ipv4Addr::new(10, 77, 0, 12), ports),
            "token",
        );
        join(&mut c, &seed);
        c.access.admins = crate::keys::admin_ids();
        c.transport = Some(dual(&["all_except_raft"], RaftTransport::Iroh));
        let text = c.to_toml().unwrap();
        let checked = Config::parse(&text).unwrap();
        assert_eq!(
            checked.config.listen.grpc.addr(),
            Some("10.77.0.12:7400".parse().unwrap())
        );
        assert_eq!(checked.seeds.len(), 1);
        assert_eq!(checked.seeds[0].1.grpc, seed.grpc);
        assert_eq!(checked.admins.len(), crate::keys::CLIENT_KEYS);
        assert_eq!(checked.config.transport, c.transport);
        assert!(checked.policy.uses_iroh());
    }

    #[test]
    fn the_transport_section_is_rewritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.toml");
        let mut c = node(&dir.path().join("n1"), loopback(), "token");
        c.transport = Some(grpc());
        write(&path, &c).unwrap();
        set_transport(&path, &iroh()).unwrap();
        let back = Config::load(&path).unwrap();
        assert_eq!(back.config.transport.map(|t| t.mode), Some(Mode::Iroh));
        assert_eq!(back.config.cluster.join_token.as_deref(), Some("token"));
        assert_eq!(back.config.listen.grpc, c.listen.grpc);
    }
}
