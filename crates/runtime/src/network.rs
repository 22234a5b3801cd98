//! Guest networking on a node: the VM bridge, a TAP device per microVM and
//! a network namespace with a veth pair per process workload.
//!
//! Every device is made with the `ip` command of iproute2, not netlink
//! from Rust: `ip` is on every host that can run VMs, its commands are the
//! ones an operator types to inspect or repair what the node did, and each
//! step is an idempotent command (`replace`, `set`) whose error text is
//! passed on as is. The cost is a process per step, paid only when a VM
//! starts or is removed.
//!
//! Names are derived from the VM id, so a node that restarts finds the
//! devices of its VMs again and *adopts* them (brings them to the wanted
//! state) instead of making second ones: `{prefix}h{hash}` for a veth's
//! host end, `{prefix}t{hash}` for a TAP (`hash` is eight hex digits of
//! FNV-1a of the VM id; at most 15 bytes, Linux's limit) and
//! `{prefix}-{vm id}` for a workload's namespace. Every device made is
//! labelled with its VM id (the interface alias); a device of the name
//! wanted that carries another label, or is of another kind, is a
//! [`NetError::DeviceClash`], never reused or deleted.
//!
//! All host-side work (the bridge, TAPs, veth host ends) happens in the
//! namespace [`NetworkConfig::host_netns`] names, or in the node's own when
//! it names none; tests name one they made, so nothing here touches the
//! host's interfaces.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tern_state::network::{Ipv4Net, format_mac};

/// The bridge a node's VMs share, unless `[network] bridge` names another.
pub const DEFAULT_BRIDGE: &str = "ternbr0";

/// The first bytes of every device and namespace name a node makes, unless
/// `[network] device_prefix` says otherwise.
pub const DEFAULT_DEVICE_PREFIX: &str = "tn";

/// Longest device prefix: the prefix, a kind letter and eight hex digits
/// must fit Linux's 15-byte interface names.
pub const MAX_DEVICE_PREFIX_LEN: usize = 5;

/// Longest interface name Linux accepts (`IFNAMSIZ` less its NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// How many VM network devices (TAPs and veth host ends) one node holds by
/// default: each is a bridge port, and a Linux bridge has at most 1024.
pub const DEFAULT_MAX_DEVICES: usize = 1024;

const _: () = assert!(MAX_DEVICE_PREFIX_LEN + 1 + 8 <= MAX_IFNAME_LEN);

/// The interface a process workload sees in its namespace.
pub const GUEST_IFNAME: &str = "eth0";

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The file in a VM's state directory that records its attachment.
pub const ATTACHMENT_FILE_NAME: &str = "network";

/// How a node does guest networking (`[network]` in the node config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The bridge for the node's VMs.
    pub bridge: String,
    /// The first bytes of every device and namespace name made.
    pub device_prefix: String,
    /// The namespace the bridge and the host ends live in; `None` for the
    /// node's own.
    pub host_netns: Option<String>,
    /// At most this many VM devices on the node.
    pub max_devices: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: DEFAULT_BRIDGE.to_owned(),
            device_prefix: DEFAULT_DEVICE_PREFIX.to_owned(),
            host_netns: None,
            max_devices: DEFAULT_MAX_DEVICES,
        }
    }
}

/// What a VM is given on the network: its lease and its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    /// The VM's address.
    pub address: Ipv4Addr,
    /// The VM's MAC.
    pub mac: [u8; 6],
    /// The cluster's pool (its prefix length and gateway).
    pub pool: Ipv4Net,
}

impl Attachment {
    /// The gateway: the bridge's address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.pool.gateway()
    }

    /// One line: `ADDRESS/PREFIX MAC POOL`.
    pub fn encode(&self) -> String {
        format!(
            "{}/{} {} {}\n",
            self.address,
            self.pool.prefix(),
            format_mac(&self.mac),
            self.pool
        )
    }

    /// Reads what [`Attachment::encode`] wrote.
    pub fn decode(text: &str) -> Result<Attachment, String> {
        let mut parts = text.split_whitespace();
        let (Some(address), Some(mac), Some(pool), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("expected ADDRESS/PREFIX MAC POOL".into());
        };
        let pool: Ipv4Net = pool.parse().map_err(|e| format!("pool: {e}"))?;
        let (address, prefix) = address
            .split_once('/')
            .ok_or_else(|| format!("address {address:?} has no prefix"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IPv4 address"))?;
        if prefix != pool.prefix().to_string() || !pool.contains(address) {
            return Err(format!("{address}/{prefix} is not in pool {pool}"));
        }
        Ok(Attachment {
            address,
            mac: parse_mac(mac)?,
            pool,
        })
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{text:?} is not a MAC (aa:bb:cc:dd:ee:ff)");
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Writes `attachment` (or its absence) into a VM directory.
pub(crate) fn record_attachment(
    dir: &Path,
    attachment: Option<&Attachment>,
) -> std::io::Result<()> {
    let path = dir.join(ATTACHMENT_FILE_NAME);
    match attachment {
        Some(a) => std::fs::write(path, a.encode()),
        None => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// The attachment recorded in a VM directory, if any.
pub(crate) fn recorded_attachment(dir: &Path) -> Result<Option<Attachment>, String> {
    match std::fs::read_to_string(dir.join(ATTACHMENT_FILE_NAME)) {
        Ok(text) => Attachment::decode(&text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Why network work failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// A configured name or value is unusable.
    #[error("network.{key} = {value:?}: {reason}")]
    InvalidConfig {
        /// The config key (under `[network]`).
        key: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
    /// A device (or namespace) of the name wanted exists and is not this
    /// VM's: another kind, or labelled with another owner.
    #[error(
        "device {device} already exists and is not VM {vm_id}'s ({found}); remove or rename it"
    )]
    DeviceClash {
        /// The device name.
        device: String,
        /// The VM that wanted it.
        vm_id: String,
        /// What is there instead.
        found: String,
    },
    /// The node holds its limit of VM devices.
    #[error("node holds {count} VM network devices, its limit (network.max_devices = {limit})")]
    TooManyDevices {
        /// Devices held.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// An `ip` command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it said.
        stderr: String,
    },
}

/// FNV-1a, 32 bits: stable across builds and platforms (unlike std's
/// hasher), which device names need.
fn fnv1a(text: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// What `ip -d link show` says of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkInfo {
    kind: String,
    alias: String,
    master: String,
}

/// The node's guest network: its bridge and the VMs' devices.
#[derive(Debug)]
pub struct NodeNetwork {
    config: NetworkConfig,
    /// Serializes device work, so two starts never race to make one
    /// device or both pass the device limit.
    lock: tokio::sync::Mutex<()>,
}

/// Checks an interface name from config: 1 to 15 bytes of letters,
/// digits, `-`, `_` and `.`.
pub fn check_ifname(key: &'static str, name: &str, max: usize) -> Result<(), NetError> {
    let bad = |reason: String| NetError::InvalidConfig {
        key,
        value: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > max {
        return Err(bad(format!("must be 1 to {max} bytes")));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(bad(
            "only letters, digits, '-', '_' and '.' are allowed".into()
        ));
    }
    Ok(())
}

impl NodeNetwork {
    /// A node network with `config`, whose names are checked.
    pub fn new(config: NetworkConfig) -> Result<NodeNetwork, NetError> {
        check_ifname("bridge", &config.bridge, MAX_IFNAME_LEN)?;
        check_ifname(
            "device_prefix",
            &config.device_prefix,
            MAX_DEVICE_PREFIX_LEN,
        )?;
        if let Some(ns) = &config.host_netns {
            check_ifname("host_netns", ns, 64)?;
        }
        if config.max_devices == 0 || config.max_devices > DEFAULT_MAX_DEVICES {
            return Err(NetError::InvalidConfig {
                key: "max_devices",
                value: config.max_devices.to_string(),
                reason: format!("must be 1 to {DEFAULT_MAX_DEVICES} (a bridge's port limit)"),
            });
        }
        Ok(NodeNetwork {
            config,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The namespace a process workload of `vm_id` runs in.
    pub fn workload_netns(&self, vm_id: &str) -> String {
        format!("{}-{vm_id}", self.config.device_prefix)
    }

    /// The path of a named namespace.
    pub fn netns_path(name: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(name)
    }

    /// The host end of `vm_id`'s veth pair.
    pub fn veth_name(&self, vm_id: &str) -> String {
        format!("{}h{:08x}", self.config.device_prefix, fnv1a(vm_id))
    }

    /// `vm_id`'s TAP device.
    pub fn tap_name(&self, vm_id: &str) -> String {
        format!("{}t{:08x}", self.config.device_prefix, fnv1a(vm_id))
    }

    /// `ip` with `-n HOST_NETNS` when one is configured.
    fn host_ip(&self) -> Vec<String> {
        match &self.config.host_netns {
            Some(ns) => vec!["-n".into(), ns.clone()],
            None => Vec::new(),
        }
    }

    async fn ip(&self, ns: Option<&str>, args: &[&str]) -> Result<String, NetError> {
        let mut full: Vec<String> = match ns {
            Some(ns) => vec!["-n".into(), ns.to_owned()],
            None => self.host_ip(),
        };
        full.extend(args.iter().map(|a| (*a).to_owned()));
        run_ip(&full).await
    }

    /// Every link in the host namespace, by name.
    async fn links(&self) -> Result<Vec<(String, LinkInfo)>, NetError> {
        let out = self.ip(None, &["-j", "-d", "link", "show"]).await?;
        let parsed: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| NetError::Command {
                command: "ip -j -d link show".into(),
                stderr: format!("unreadable output: {e}"),
            })?;
        let text = |v: &serde_json::Value, key: &str| {
            v.get(key)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Ok(parsed
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|l| {
                        let kind = l
                            .get("linkinfo")
                            .map(|i| text(i, "info_kind"))
                            .unwrap_or_default();
                        let info = LinkInfo {
                            kind,
                            alias: text(l, "ifalias"),
                            master: text(l, "master"),
                        };
                        (text(l, "ifname"), info)
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn link(&self, name: &str) -> Result<Option<LinkInfo>, NetError> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, info)| info))
    }

    /// The VM devices this node holds: `(device, VM id)`.
    pub async fn devices(&self) -> Result<Vec<(String, String)>, NetError> {
        let prefix = &self.config.device_prefix;
        Ok(self
            .links()
            .await?
            .into_iter()
            .filter(|(name, info)| {
                name.starts_with(prefix.as_str())
                    && !info.alias.is_empty()
                    && matches!(info.kind.as_str(), "veth" | "tun")
            })
            .map(|(name, info)| (name, info.alias))
            .collect())
    }

    /// Makes the bridge (or adopts it) with the gateway address of `pool`,
    /// up.
    pub async fn ensure_bridge(&self, pool: Ipv4Net) -> Result<(), NetError> {
        let _guard = self.lock.lock().await;
        self.bridge_up(pool).await
    }

    async fn bridge_up(&self, pool: Ipv4Net) -> Result<(), NetError> {
        let bridge = self.config.bridge.as_str();
        match self.link(bridge).await? {
            Some(info) if info.kind != "bridge" => {
                return Err(NetError::DeviceClash {
                    device: bridge.to_owned(),
                    vm_id: "(the node's bridge)".into(),
                    found: format!("a {} device", or_unknown(&info.kind)),
                });
            }
            Some(_) => {}
            None => {
                self.ip(None, &["link", "add", bridge, "type", "bridge"])
                    .await?;
            }
        }
        let gateway = format!("{}/{}", pool.gateway(), pool.prefix());
        self.ip(None, &["addr", "replace", &gateway, "dev", bridge])
            .await?;
        self.ip(None, &["link", "set", bridge, "up"]).await?;
        Ok(())
    }

    /// Checks that `device`, if it exists, is `vm_id`'s `kind` device;
    /// whether it exists. A new device must also fit under the limit.
    async fn owned(&self, device: &str, kind: &str, vm_id: &str) -> Result<bool, NetError> {
        match self.link(device).await? {
            Some(info) if info.kind == kind && info.alias == vm_id => Ok(true),
            Some(info) => Err(NetError::DeviceClash {
                device: device.to_owned(),
                vm_id: vm_id.to_owned(),
                found: format!(
                    "a {} device labelled {:?}",
                    or_unknown(&info.kind),
                    info.alias
                ),
            }),
            None => {
                let count = self.devices().await?.len();
                if count >= self.config.max_devices {
                    return Err(NetError::TooManyDevices {
                        count,
                        limit: self.config.max_devices,
                    });
                }
                Ok(false)
            }
        }
    }

    /// Gives a process workload of `vm_id` its namespace and a veth pair
    /// on the bridge, configured with `attachment` (or adopts and repairs
    /// them); returns the namespace's path.
    pub async fn attach_veth(
        &self,
        vm_id: &str,
        attachment: &Attachment,
    ) -> Result<PathBuf, NetError> {
        let _guard = self.lock.lock().await;
        self.bridge_up(attachment.pool).await?;
        let host = self.veth_name(vm_id);
        let ns = self.workload_netns(vm_id);
        let ns_path = Self::netns_path(&ns);
        let mut exists = self.owned(&host, "veth", vm_id).await?;
        if exists && !ns_path.exists() {
            // Its namespace went (deleted by hand): start over.
            self.ip(None, &["link", "del", &host]).await?;
            exists = false;
        }
        if !ns_path.exists() {
            self.ip_global(&["netns", "add", &ns]).await?;
        }
        if !exists {
            self.ip(
                None,
                &[
                    "link",
                    "add",
                    &host,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    GUEST_IFNAME,
                    "netns",
                    &ns,
                ],
            )
            .await?;
            self.ip(None, &["link", "set", &host, "alias", vm_id])
                .await?;
        }
        let bridge = self.config.bridge.as_str();
        self.ip(None, &["link", "set", &host, "master", bridge, "up"])
            .await?;
        let cidr = format!("{}/{}", attachment.address, attachment.pool.prefix());
        let mac = format_mac(&attachment.mac);
        let gateway = attachment.gateway().to_string();
        let inside = Some(ns.as_str());
        self.ip(inside, &["link", "set", GUEST_IFNAME, "address", &mac])
            .await?;
        self.ip(inside, &["addr", "replace", &cidr, "dev", GUEST_IFNAME])
            .await?;
        self.ip(inside, &["link", "set", "lo", "up"]).await?;
        self.ip(inside, &["link", "set", GUEST_IFNAME, "up"])
            .await?;
        self.ip(
            inside,
            &[
                "route",
                "replace",
                "default",
                "via",
                &gateway,
                "dev",
                GUEST_IFNAME,
            ],
        )
        .await?;
        Ok(ns_path)
    }

    /// Gives a microVM of `vm_id` a TAP device on the bridge (or adopts
    /// it); returns its name.
    pub async fn attach_tap(
        &self,
        vm_id: &str,
        attachment: &Attachment,
    ) -> Result<String, NetError> {
        let _guard = self.lock.lock().await;
        self.bridge_up(attachment.pool).await?;
        let tap = self.tap_name(vm_id);
        if !self.owned(&tap, "tun", vm_id).await? {
            self.ip(None, &["tuntap", "add", "dev", &tap, "mode", "tap"])
                .await?;
            self.ip(None, &["link", "set", &tap, "alias", vm_id])
                .await?;
        }
        let bridge = self.config.bridge.as_str();
        self.ip(None, &["link", "set", &tap, "master", bridge, "up"])
            .await?;
        Ok(tap)
    }

    /// Removes `vm_id`'s devices and namespace, whichever exist. Devices
    /// of those names that are not the VM's are left alone.
    pub async fn detach(&self, vm_id: &str) -> Result<(), NetError> {
        let _guard = self.lock.lock().await;
        for device in [self.veth_name(vm_id), self.tap_name(vm_id)] {
            match self.link(&device).await? {
                Some(info) if info.alias == vm_id => {
                    self.ip(None, &["link", "del", &device]).await?;
                }
                Some(_) => {
                    tracing::warn!(device, vm_id, "not removing a device that is not this VM's");
                }
                None => {}
            }
        }
        let ns = self.workload_netns(vm_id);
        if Self::netns_path(&ns).exists() {
            self.ip_global(&["netns", "del", &ns]).await?;
        }
        Ok(())
    }

    /// `ip` without `-n` (for `ip netns`, which names namespaces itself).
    async fn ip_global(&self, args: &[&str]) -> Result<String, NetError> {
        run_ip(args).await
    }
}

fn or_unknown(kind: &str) -> &str {
    if kind.is_empty() { "plain" } else { kind }
}

/// Runs `ip ARGS`; its stdout, or its stderr in a [`NetError::Command`]
/// naming the command line.
async fn run_ip<S: AsRef<std::ffi::OsStr> + AsRef<str>>(args: &[S]) -> Result<String, NetError> {
    let shown: Vec<&str> = args.iter().map(|a| AsRef::<str>::as_ref(a)).collect();
    let command = format!("ip {}", shown.join(" "));
    let out = tokio::process::Command::new("ip")
        .args(args.iter().map(|a| AsRef::<std::ffi::OsStr>::as_ref(a)))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| NetError::Command {
            command: command.clone(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_fit_and_configs_are_checked() {
        let net = NodeNetwork::new(NetworkConfig {
            device_prefix: "tvnzz".into(),
            ..NetworkConfig::default()
        })
        .unwrap();
        let long = "vm-18446744073709551615";
        assert!(net.veth_name(long).len() <= MAX_IFNAME_LEN);
        assert_ne!(net.veth_name("vm-1"), net.tap_name("vm-1"));
        assert_ne!(net.veth_name("vm-1"), net.veth_name("vm-2"));
        let err = NodeNetwork::new(NetworkConfig {
            device_prefix: "toolong".into(),
            ..NetworkConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("network.device_prefix"), "{err}");
        let err = NodeNetwork::new(NetworkConfig {
            bridge: "br 0".into(),
            ..NetworkConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("network.bridge"), "{err}");
        let err = NodeNetwork::new(NetworkConfig {
            max_devices: 0,
            ..NetworkConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("network.max_devices"), "{err}");
    }

    #[test]
    fn attachments_round_trip_and_bad_ones_are_named() {
        let a = Attachment {
            address: Ipv4Addr::new(10, 9, 0, 7),
            mac: [2, 0x74, 0x6e, 9, 0, 7],
            pool: "10.9.0.0/24".parse().unwrap(),
        };
        assert_eq!(Attachment::decode(&a.encode()).unwrap(), a);
        assert!(Attachment::decode("10.8.0.7/24 02:74:6e:09:00:07 10.9.0.0/24").is_err());
        assert!(Attachment::decode("10.9.0.7/24 02:74:6e:09:00 10.9.0.0/24").is_err());
        assert!(parse_mac("02:74:6e:09:00:+7").is_err());
    }

    proptest! {
        /// Any text decodes to an attachment that encodes back to itself,
        /// or to an error; never a panic.
        #[test]
        fn attachment_decoding_never_panics(s in "\\PC{0,64}") {
            if let Ok(a) = Attachment::decode(&s) {
                prop_assert_eq!(Attachment::decode(&a.encode()).unwrap(), a);
            }
        }

        /// Every attachment round-trips.
        #[test]
        fn attachments_round_trip(host in 2u32..250, mac in any::<[u8; 6]>()) {
            let pool: Ipv4Net = "172.30.4.0/24".parse().unwrap();
            let a = Attachment {
                address: Ipv4Addr::from(u32::from(pool.network()) + host),
                mac,
                pool,
            };
            prop_assert_eq!(Attachment::decode(&a.encode()).unwrap(), a);
        }

        /// MAC parsing takes exactly six two-digit hex bytes.
        #[test]
        fn macs_parse_or_err(s in "[0-9a-fA-F:+]{0,20}") {
            if let Ok(mac) = parse_mac(&s) {
                prop_assert_eq!(format_mac(&mac), s.to_ascii_lowercase());
            }
        }
    }
}
