//! The guest network: the cluster's address pool and the address and MAC
//! leased to each VM.
//!
//! Design: **one cluster subnet, one address per VM.** The pool is an IPv4
//! CIDR ([`Ipv4Net`]) set once for the cluster with
//! [`Command::SetNetworkPool`](crate::Command::SetNetworkPool) (the first
//! node proposes its `[network] pool`). Its first host address is the
//! gateway, which every node's VM bridge holds; the VMs get the other host
//! addresses, one each, leased when the VM is created and released when its
//! record is removed. A VM keeps its address when it migrates, because the
//! subnet is the same on every node. The MAC is derived from the address
//! (`02:74:6e` and the address's last three bytes), so it is unique
//! whenever the address is: a pool is at most a `/16`
//! ([`MIN_POOL_PREFIX`]), whose host bits fit in three bytes.
//!
//! Leasing happens in `apply`, so every node leases the same address to the
//! same VM, whoever leads and however often nodes restart: no two VMs ever
//! share an address. Allocation walks forward from a cursor (wrapping), so
//! an address just released is not handed out again at once (a guest's
//! neighbours may still cache its MAC).
//!
//! Until a pool is set no VM gets an address: that keeps a log written
//! before this module existed applying exactly as it did. Setting the pool
//! leases an address to every VM that has none, in VM id order.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::command::{Rejection, Response};
use crate::state::ClusterState;

/// The smallest prefix length a pool may have: a `/16` holds 65 534 hosts,
/// far more VMs than a cluster runs, and its host bits fit the three bytes
/// of a VM's MAC that come from its address.
pub const MIN_POOL_PREFIX: u8 = 16;

/// The largest prefix length a pool may have: a `/29` has six host
/// addresses, the gateway and five VMs; smaller pools are no use.
pub const MAX_POOL_PREFIX: u8 = 29;

/// The pool a node proposes when its config names none.
pub const DEFAULT_POOL: &str = "10.213.0.0/16";

/// The first three bytes of every VM's MAC: locally administered, unicast
/// (`0x02`), then `t` `n`.
pub const MAC_PREFIX: [u8; 3] = [0x02, 0x74, 0x6e];

/// An IPv4 network: an address whose host bits are zero and a prefix
/// length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ipv4Net {
    network: Ipv4Addr,
    prefix: u8,
}

/// Why a CIDR string is not a usable pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// No `/` between the address and the prefix length.
    #[error("{input:?} is not a CIDR: write it as ADDRESS/PREFIX, e.g. {DEFAULT_POOL}")]
    NoSlash {
        /// What was given.
        input: String,
    },
    /// The part before the `/` is not an IPv4 address.
    #[error("{input:?}: {address:?} is not an IPv4 address")]
    BadAddress {
        /// What was given.
        input: String,
        /// The address part.
        address: String,
    },
    /// The prefix length is not a number from 0 to 32.
    #[error("{input:?}: the prefix length {prefix:?} is not a number from 0 to 32")]
    BadPrefix {
        /// What was given.
        input: String,
        /// The prefix part.
        prefix: String,
    },
    /// The address has bits set past the prefix.
    #[error("{input:?}: the address has host bits set; the network is {network}")]
    HostBits {
        /// What was given.
        input: String,
        /// The network the prefix gives.
        network: String,
    },
    /// The prefix is outside [`MIN_POOL_PREFIX`]..=[`MAX_POOL_PREFIX`].
    #[error(
        "{input:?}: a pool's prefix length must be from {MIN_POOL_PREFIX} to {MAX_POOL_PREFIX}"
    )]
    PoolSize {
        /// What was given.
        input: String,
    },
}

impl Ipv4Net {
    /// The network of `address` with `prefix` bits, if the address has no
    /// host bits set and the prefix is at most 32.
    pub fn new(address: Ipv4Addr, prefix: u8) -> Option<Ipv4Net> {
        let net = Ipv4Net {
            network: address,
            prefix,
        };
        (prefix <= 32 && u32::from(address) & !net.mask() == 0).then_some(net)
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// Whether `address` lies in this network.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask() == u32::from(self.network)
    }

    /// How many addresses the network spans, network and broadcast
    /// included.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The gateway: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(1))
    }

    /// How many VMs the pool holds: the host addresses but the gateway.
    pub fn vm_capacity(&self) -> u64 {
        self.size().saturating_sub(3)
    }

    /// The `n`th VM address (0-based), if the pool has one.
    fn vm_address(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.vm_capacity()).then(|| {
            let offset = u32::try_from(n + 2).unwrap_or(u32::MAX);
            Ipv4Addr::from(u32::from(self.network).wrapping_add(offset))
        })
    }

    /// Parses `ADDRESS/PREFIX` as a pool: a network with no host bits set
    /// and a prefix from [`MIN_POOL_PREFIX`] to [`MAX_POOL_PREFIX`].
    pub fn parse_pool(input: &str) -> Result<Ipv4Net, CidrError> {
        let net: Ipv4Net = input.parse()?;
        if !(MIN_POOL_PREFIX..=MAX_POOL_PREFIX).contains(&net.prefix) {
            return Err(CidrError::PoolSize {
                input: input.to_owned(),
            });
        }
        Ok(net)
    }
}

impl FromStr for Ipv4Net {
    type Err = CidrError;

    fn from_str(input: &str) -> Result<Ipv4Net, CidrError> {
        let (address, prefix) = input.split_once('/').ok_or_else(|| CidrError::NoSlash {
            input: input.to_owned(),
        })?;
        let address: Ipv4Addr = address.parse().map_err(|_| CidrError::BadAddress {
            input: input.to_owned(),
            address: address.to_owned(),
        })?;
        let bad_prefix = || CidrError::BadPrefix {
            input: input.to_owned(),
            prefix: prefix.to_owned(),
        };
        // Digits only: `u8::from_str` would take a leading `+`.
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad_prefix());
        }
        let prefix: u8 = prefix.parse().map_err(|_| bad_prefix())?;
        if prefix > 32 {
            return Err(bad_prefix());
        }
        Ipv4Net::new(address, prefix).ok_or_else(|| {
            let masked = Ipv4Net {
                network: address,
                prefix,
            };
            let network = Ipv4Addr::from(u32::from(address) & masked.mask());
            CidrError::HostBits {
                input: input.to_owned(),
                network: format!("{network}/{prefix}"),
            }
        })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The address and MAC leased to one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// The VM's IPv4 address in the pool.
    pub address: Ipv4Addr,
    /// The VM's MAC ([`mac_of`] its address).
    pub mac: [u8; 6],
}

impl Lease {
    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

/// A MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// The MAC of the VM with `address`: [`MAC_PREFIX`] and the address's last
/// three bytes.
pub fn mac_of(address: Ipv4Addr) -> [u8; 6] {
    let [_, b, c, d] = address.octets();
    [MAC_PREFIX[0], MAC_PREFIX[1], MAC_PREFIX[2], b, c, d]
}

/// The replicated network state: the pool and the leases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkState {
    /// The cluster's pool; `None` until a pool is set.
    pool: Option<Ipv4Net>,
    /// The lease of each VM that has one, by VM id.
    leases: BTreeMap<String, Lease>,
    /// Where the next search for a free address starts (an index into the
    /// pool's VM addresses).
    cursor: u64,
    /// The VM holding each leased address: derived from `leases`, rebuilt
    /// on decoding.
    #[serde(skip)]
    by_address: BTreeMap<Ipv4Addr, String>,
}

impl NetworkState {
    /// The pool, once set.
    pub fn pool(&self) -> Option<Ipv4Net> {
        self.pool
    }

    /// The lease of `vm_id`, if it has one.
    pub fn lease(&self, vm_id: &str) -> Option<&Lease> {
        self.leases.get(vm_id)
    }

    /// Every lease, by VM id.
    pub fn leases(&self) -> &BTreeMap<String, Lease> {
        &self.leases
    }

    /// The VM holding `address`, if any.
    pub fn holder(&self, address: Ipv4Addr) -> Option<&str> {
        self.by_address.get(&address).map(String::as_str)
    }

    /// Rebuilds the derived index after decoding.
    /// Sets the pool of a mirror (an agent's partial copy of the state,
    /// see `ClusterState::agent_mirror`), never of the replicated state.
    pub(crate) fn mirror_pool(&mut self, pool: Option<Ipv4Net>) {
        self.pool = pool;
    }

    /// Records a lease in a mirror, as the replicated state holds it.
    pub(crate) fn mirror_lease(&mut self, vm_id: String, lease: Lease) {
        self.leases.insert(vm_id, lease);
    }

    pub(crate) fn reindexed(mut self) -> NetworkState {
        self.by_address = self
            .leases
            .iter()
            .map(|(vm, lease)| (lease.address, vm.clone()))
            .collect();
        self
    }

    /// Leases a free address to `vm_id`: `Ok(None)` when no pool is set,
    /// its existing lease when it has one, [`Rejection::AddressPoolExhausted`]
    /// when every address is taken.
    pub(crate) fn lease_to(&mut self, vm_id: &str) -> Result<Option<Lease>, Rejection> {
        let Some(pool) = self.pool else {
            return Ok(None);
        };
        if let Some(lease) = self.leases.get(vm_id) {
            return Ok(Some(*lease));
        }
        let capacity = pool.vm_capacity();
        if self.leases.len() as u64 >= capacity {
            return Err(Rejection::AddressPoolExhausted {
                pool: pool.to_string(),
                leased: self.leases.len() as u64,
            });
        }
        // A free address exists, so this ends within `capacity` steps.
        for step in 0..capacity {
            let n = (self.cursor + step) % capacity;
            let Some(address) = pool.vm_address(n) else {
                break;
            };
            if self.by_address.contains_key(&address) {
                continue;
            }
            self.cursor = (n + 1) % capacity;
            let lease = Lease {
                address,
                mac: mac_of(address),
            };
            self.leases.insert(vm_id.to_owned(), lease);
            self.by_address.insert(address, vm_id.to_owned());
            return Ok(Some(lease));
        }
        Err(Rejection::AddressPoolExhausted {
            pool: pool.to_string(),
            leased: self.leases.len() as u64,
        })
    }

    /// Releases the lease of `vm_id`, if it has one.
    pub(crate) fn release(&mut self, vm_id: &str) {
        if let Some(lease) = self.leases.remove(vm_id) {
            self.by_address.remove(&lease.address);
        }
    }
}

impl ClusterState {
    /// The guest network: pool and leases.
    pub fn network(&self) -> &NetworkState {
        &self.network
    }

    /// Sets the cluster's pool. Setting the pool it already has changes
    /// nothing; another pool is refused while any VM holds an address
    /// ([`Rejection::PoolInUse`]). Setting a pool leases addresses to the
    /// VMs without one, in id order, all or none
    /// ([`Rejection::AddressPoolExhausted`]).
    pub(crate) fn set_network_pool(&mut self, pool: Ipv4Net) -> Response {
        if !(MIN_POOL_PREFIX..=MAX_POOL_PREFIX).contains(&pool.prefix) {
            return Response::Rejected(Rejection::InvalidPool {
                pool: pool.to_string(),
            });
        }
        if self.network.pool == Some(pool) {
            return Response::Done;
        }
        if let (Some(current), false) = (self.network.pool, self.network.leases.is_empty()) {
            return Response::Rejected(Rejection::PoolInUse {
                pool: current.to_string(),
                leased: self.network.leases.len() as u64,
            });
        }
        let mut next = NetworkState {
            pool: Some(pool),
            ..NetworkState::default()
        };
        for id in self.vms.keys() {
            if let Err(why) = next.lease_to(id) {
                return Response::Rejected(why);
            }
        }
        self.network = next;
        Response::Done
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pools_parse_or_say_what_is_wrong() {
        let p = Ipv4Net::parse_pool("10.213.0.0/16").unwrap();
        assert_eq!(p.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(p.vm_capacity(), 65_533);
        assert_eq!(p.to_string(), "10.213.0.0/16");
        assert!(matches!(
            Ipv4Net::parse_pool("10.0.0.0"),
            Err(CidrError::NoSlash { .. })
        ));
        assert!(matches!(
            Ipv4Net::parse_pool("10.0.0/24"),
            Err(CidrError::BadAddress { .. })
        ));
        assert!(matches!(
            Ipv4Net::parse_pool("10.0.0.0/+24"),
            Err(CidrError::BadPrefix { .. })
        ));
        assert!(matches!(
            Ipv4Net::parse_pool("10.0.0.0/33"),
            Err(CidrError::BadPrefix { .. })
        ));
        let e = Ipv4Net::parse_pool("10.0.0.5/24").unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/24"), "{e}");
        assert!(matches!(
            Ipv4Net::parse_pool("10.0.0.0/8"),
            Err(CidrError::PoolSize { .. })
        ));
        assert!(matches!(
            Ipv4Net::parse_pool("10.0.0.0/30"),
            Err(CidrError::PoolSize { .. })
        ));
    }

    #[test]
    fn leases_are_unique_released_and_exhausted_with_a_reason() {
        let mut n = NetworkState {
            pool: Some(Ipv4Net::parse_pool("192.168.7.0/29").unwrap()),
            ..NetworkState::default()
        };
        let a = n.lease_to("a").unwrap().unwrap();
        assert_eq!(a.address, Ipv4Addr::new(192, 168, 7, 2));
        assert_eq!(a.mac_string(), "02:74:6e:a8:07:02");
        assert_eq!(n.lease_to("a").unwrap(), Some(a), "one lease per VM");
        for vm in ["b", "c", "d", "e"] {
            n.lease_to(vm).unwrap();
        }
        let err = n.lease_to("f").unwrap_err();
        assert!(
            matches!(err, Rejection::AddressPoolExhausted { leased: 5, .. }),
            "{err}"
        );
        n.release("b");
        assert_eq!(n.holder(Ipv4Addr::new(192, 168, 7, 3)), None);
        let f = n.lease_to("f").unwrap().unwrap();
        assert_eq!(f.address, Ipv4Addr::new(192, 168, 7, 3));
        // The broadcast address is never leased.
        assert!(n.leases().values().all(|l| l.address.octets()[3] < 7));
    }

    fn cluster() -> ClusterState {
        use crate::{Capacity, Member};
        let mut state = ClusterState::default();
        let peer = tern_protocol::PeerId::from_bytes([1; 32]);
        let member = Member::new(
            tern_protocol::PeerAddr::new(peer),
            Capacity {
                vcpus: 64,
                memory_mib: 65_536,
            },
        );
        state.apply_membership([(&1, &member)]);
        state
    }

    fn create(state: &mut ClusterState, name: &str) -> Response {
        state.apply(crate::Command::CreateVm {
            request_id: format!("c-{name}"),
            spec: Box::new(crate::VmSpec {
                name: name.into(),
                vcpus: 1,
                memory_mib: 64,
                runtime: "process".into(),
                ..crate::VmSpec::default()
            }),
        })
    }

    fn set_pool(state: &mut ClusterState, req: &str, pool: &str) -> Response {
        state.apply(crate::Command::SetNetworkPool {
            request_id: req.into(),
            pool: pool.parse().unwrap(),
        })
    }

    /// Creating a VM leases it an address in the same apply; removing its
    /// record releases it; a full pool refuses the create and changes
    /// nothing; the pool only changes while nothing is leased.
    #[test]
    fn vms_lease_addresses_in_apply() {
        let mut state = cluster();
        // No pool yet: VMs get no address (as a log of an older version).
        let Response::Vm(old) = create(&mut state, "old") else {
            panic!("created")
        };
        assert!(state.network().lease(&old.id).is_none());
        // Setting the pool leases the VMs already there.
        assert_eq!(set_pool(&mut state, "p1", "10.9.0.0/29"), Response::Done);
        let old_lease = *state.network().lease(&old.id).unwrap();
        assert_eq!(old_lease.address, Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(set_pool(&mut state, "p2", "10.9.0.0/29"), Response::Done);
        assert!(matches!(
            set_pool(&mut state, "p3", "10.8.0.0/24"),
            Response::Rejected(Rejection::PoolInUse { leased: 1, .. })
        ));
        assert!(matches!(
            set_pool(&mut state, "p4", "10.8.0.0/30"),
            Response::Rejected(Rejection::InvalidPool { .. })
        ));
        let mut ids = vec![old.id.clone()];
        for name in ["a", "b", "c", "d"] {
            let Response::Vm(vm) = create(&mut state, name) else {
                panic!("created {name}")
            };
            ids.push(vm.id);
        }
        let next_before = state.next_vm_number;
        let full = create(&mut state, "e");
        assert!(
            matches!(
                full,
                Response::Rejected(Rejection::AddressPoolExhausted { leased: 5, .. })
            ),
            "{full:?}"
        );
        assert_eq!(
            state.next_vm_number, next_before,
            "a refusal changes nothing"
        );
        assert!(!state.vms().values().any(|vm| vm.spec.name == "e"));
        // Removing a record frees its address for the next VM.
        state.apply(crate::Command::DeleteVm {
            request_id: "del".into(),
            vm_id: ids[1].clone(),
        });
        assert_eq!(state.network().leases().len(), 4);
        let Response::Vm(e) = create(&mut state, "e2") else {
            panic!("created after a release")
        };
        let addresses: std::collections::BTreeSet<_> = state
            .network()
            .leases()
            .values()
            .map(|l| l.address)
            .collect();
        assert_eq!(addresses.len(), 5);
        assert!(state.network().lease(&e.id).is_some());
        // The decoded state is the same, derived index included.
        let bytes = postcard::to_stdvec(&state).unwrap();
        let back: ClusterState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);
    }

    /// User data is kept beside the record from its create, answered by
    /// `user_data`, refused over its limit before proposal, and goes with
    /// the record.
    #[test]
    fn user_data_lives_and_dies_with_the_record() {
        let mut state = cluster();
        let spec = Box::new(crate::VmSpec {
            name: "ud".into(),
            vcpus: 1,
            memory_mib: 64,
            runtime: "process".into(),
            ..crate::VmSpec::default()
        });
        let cmd = crate::Command::CreateVmWithData {
            request_id: "u1".into(),
            spec: spec.clone(),
            user_data: "role=web\nport=80\n".into(),
        };
        crate::limits::check_command(&cmd).unwrap();
        let Response::Vm(vm) = state.apply(cmd) else {
            panic!("created")
        };
        assert_eq!(state.user_data(&vm.id), "role=web\nport=80\n");
        let bytes = postcard::to_stdvec(&state).unwrap();
        let back: ClusterState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);
        state.apply(crate::Command::DeleteVm {
            request_id: "d".into(),
            vm_id: vm.id.clone(),
        });
        assert_eq!(state.user_data(&vm.id), "");
        let over = crate::Command::CreateVmWithData {
            request_id: "u2".into(),
            spec,
            user_data: "x".repeat(crate::limits::MAX_USER_DATA_LEN + 1),
        };
        let err = crate::limits::check_command(&over).unwrap_err();
        assert!(err.to_string().contains("spec.user_data"), "{err}");
    }

    proptest! {
        /// Any string parses to a network that prints back as itself, or
        /// to a typed error; never a panic.
        #[test]
        fn cidr_parsing_round_trips_or_errs(s in "\\PC{0,24}") {
            if let Ok(net) = s.parse::<Ipv4Net>() {
                prop_assert_eq!(net.to_string().parse::<Ipv4Net>().unwrap(), net);
            }
        }

        /// Every valid network prints and parses back, and contains its
        /// gateway but not the next network's address.
        #[test]
        fn networks_round_trip(addr in any::<u32>(), prefix in 0u8..=32) {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            let net = Ipv4Net::new(Ipv4Addr::from(addr & mask), prefix).unwrap();
            prop_assert_eq!(net.to_string().parse::<Ipv4Net>().unwrap(), net);
            prop_assert!(net.contains(net.network()));
            if prefix > 0 {
                let past = u32::from(net.network()).wrapping_add(!mask).wrapping_add(1);
                prop_assert!(!net.contains(Ipv4Addr::from(past)) || past == u32::from(net.network()));
            }
        }

        /// Whatever the order of leases and releases, no two VMs hold one
        /// address, every address is in the pool and neither the network,
        /// the gateway nor the broadcast address, and MACs are unique.
        #[test]
        fn leases_never_collide(ops in proptest::collection::vec((any::<bool>(), 0u8..12), 0..200)) {
            let pool = Ipv4Net::parse_pool("10.1.2.0/28").unwrap();
            let mut n = NetworkState { pool: Some(pool), ..NetworkState::default() };
            for (lease, vm) in ops {
                let vm = format!("vm-{vm}");
                if lease { let _ = n.lease_to(&vm); } else { n.release(&vm); }
                let addrs: std::collections::BTreeSet<_> = n.leases().values().map(|l| l.address).collect();
                let macs: std::collections::BTreeSet<_> = n.leases().values().map(|l| l.mac).collect();
                prop_assert_eq!(addrs.len(), n.leases().len());
                prop_assert_eq!(macs.len(), n.leases().len());
                for a in addrs {
                    prop_assert!(pool.contains(a));
                    prop_assert!(a != pool.network() && a != pool.gateway());
                    prop_assert!(a != Ipv4Addr::new(10, 1, 2, 15));
                }
                prop_assert_eq!(n.clone().reindexed(), n.clone());
            }
        }
    }
}
