//! Guest networking against the real kernel, inside network namespaces the
//! tests make: process workloads in their own namespaces on a bridge reach
//! each other (TCP) and the bridge's address (ping); a restarted runtime
//! adopts the devices instead of making second ones; removing a VM
//! removes its devices and namespace; a device name clash and the device
//! limit are refused by name.
//!
//! Each test's "host" is a namespace `tvn-…` it makes, so the bridge, the
//! veth host ends and the TAPs never touch the machine's own interfaces;
//! workload namespaces are `tvn?-vm-…`. A guard removes every namespace a
//! test made (and so every device in them), pass or fail, and kills its
//! workloads. Needs root and iproute2; without them the tests say so and
//! return.

mod support;

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::wait_for;
use tern_runtime::network::{Attachment, NETNS_DIR, NetError, NetworkConfig, NodeNetwork};
use tern_runtime::pidfile::KillOnDrop;
use tern_runtime::{ProcessRuntime, Recovered, RestartPolicy, Runtime, RuntimeError, VmSpec};
use tern_state::network::{Ipv4Net, mac_of};

/// Upper bound on any one test.
const TEST_BOUND: Duration = Duration::from_secs(120);
/// Bound on waiting for a workload or the network to be ready.
const WAIT: Duration = Duration::from_secs(30);
/// Stop grace.
const GRACE: Duration = Duration::from_secs(5);

/// A test's namespaces: its "host" and every `{prefix}-…` workload
/// namespace; all deleted on drop.
struct Lab {
    host: String,
    prefix: String,
}

impl Lab {
    /// Makes the host namespace for a test using device `prefix`; `None`
    /// (after saying why) where namespaces cannot be made.
    fn new(prefix: &str) -> Option<Lab> {
        let host = format!("tvn-{prefix}-{}", std::process::id());
        let lab = Lab {
            host,
            prefix: prefix.to_owned(),
        };
        lab.clean();
        match Command::new("ip")
            .args(["netns", "add", &lab.host])
            .output()
        {
            Ok(out) if out.status.success() => {
                ip(&["-n", &lab.host, "link", "set", "lo", "up"]);
                Some(lab)
            }
            Ok(out) => {
                eprintln!(
                    "skipped: cannot make a network namespace (root and iproute2 needed): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: no `ip` command: {e}");
                None
            }
        }
    }

    fn network(&self, max_devices: usize) -> Arc<NodeNetwork> {
        Arc::new(
            NodeNetwork::new(NetworkConfig {
                bridge: "tvnbr0".into(),
                device_prefix: self.prefix.clone(),
                host_netns: Some(self.host.clone()),
                max_devices,
            })
            .expect("a valid network config"),
        )
    }

    fn clean(&self) {
        let workload_prefix = format!("{}-", self.prefix);
        if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name == self.host || name.starts_with(&workload_prefix) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).output();
                }
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.clean();
    }
}

/// Runs `ip`, failing the test if it fails; returns its output.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `argv` inside namespace `ns`; its success and output.
fn in_netns(ns: &str, argv: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .expect("run ip netns exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn pool() -> Ipv4Net {
    Ipv4Net::parse_pool("10.213.5.0/29").expect("a pool")
}

fn attachment(host: u8) -> Attachment {
    let address = Ipv4Addr::new(10, 213, 5, host);
    Attachment {
        address,
        mac: mac_of(address),
        pool: pool(),
    }
}

fn spec(name: &str, argv: &[&str]) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 64,
        runtime: "process".into(),
        command: argv.iter().map(|a| (*a).to_owned()).collect(),
        ..VmSpec::default()
    }
}

/// Waits until the process `pid` runs in the namespace mounted at
/// `ns_path` (it enters it right after it is spawned).
async fn runs_in(pid: u32, ns_path: &Path) -> bool {
    wait_for(WAIT, "the workload to enter its namespace", || async {
        let mine = std::fs::metadata(format!("/proc/{pid}/ns/net"));
        let theirs = std::fs::metadata(ns_path);
        match (mine, theirs) {
            (Ok(a), Ok(b)) => (a.ino() == b.ino() && a.dev() == b.dev()).then_some(true),
            _ => None,
        }
    })
    .await
}

async fn running_pid(rt: &ProcessRuntime, vm: &str) -> u32 {
    wait_for(WAIT, "the workload to run", || async {
        rt.status(vm).await.ok().and_then(|o| o.pid)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_reach_each_other_and_the_gateway() {
    let Some(lab) = Lab::new("tvna") else { return };
    let dir = tempfile::tempdir().unwrap();
    let _kill = KillOnDrop::new(dir.path());
    tokio::time::timeout(TEST_BOUND, async {
        let net = lab.network(8);
        let rt = ProcessRuntime::with_network(
            dir.path(),
            RestartPolicy::default(),
            None,
            Some(net.clone()),
        );
        let (a, b) = (attachment(2), attachment(3));
        let server = spec(
            "a",
            &[
                "busybox",
                "nc",
                "-ll",
                "-p",
                "7000",
                "-e",
                "/bin/echo",
                "hello-from-a",
            ],
        );
        rt.start_attached("vm-a", &server, Some(&a)).await.unwrap();
        // B prints what it learns about itself (environment and file).
        let b_says = spec(
            "b",
            &[
                "/bin/sh",
                "-c",
                "echo \"env $TERN_VM_ID $TERN_VM_NAME $TERN_VM_ADDRESS $TERN_VM_GATEWAY $TERN_VM_MAC\"; \
                 echo \"user data: $TERN_VM_USER_DATA\"; cat \"$TERN_USER_DATA_FILE\"; \
                 cat \"$TERN_METADATA_FILE\"; exec sleep 600",
            ],
        );
        let b_says = VmSpec {
            user_data: "role=client".into(),
            ..b_says
        };
        rt.start_attached("vm-b", &b_says, Some(&b)).await.unwrap();
        let (ns_a, ns_b) = (net.workload_netns("vm-a"), net.workload_netns("vm-b"));
        // Each workload runs in its own namespace.
        let pid_a = running_pid(&rt, "vm-a").await;
        let pid_b = running_pid(&rt, "vm-b").await;
        assert!(runs_in(pid_a, &NodeNetwork::netns_path(&ns_a)).await);
        assert!(runs_in(pid_b, &NodeNetwork::netns_path(&ns_b)).await);
        // Its interface has its address and MAC.
        let (_, shown) = in_netns(&ns_b, &["ip", "addr", "show", "eth0"]);
        assert!(shown.contains("10.213.5.3/29"), "{shown}");
        assert!(shown.contains("02:74:6e:d5:05:03"), "{shown}");
        let log = rt.status("vm-b").await.unwrap().log_path;
        let said = wait_for(WAIT, "workload B's metadata", || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("gateway=").then_some(text)
        })
        .await;
        assert!(
            said.contains("env vm-b b 10.213.5.3/29 10.213.5.1 02:74:6e:d5:05:03"),
            "{said}"
        );
        assert!(
            said.contains("id=vm-b\nname=b\naddress=10.213.5.3/29\ngateway=10.213.5.1\n"),
            "{said}"
        );
        assert!(said.contains("user data: role=client\nrole=client"), "{said}");
        // B reaches the gateway (the bridge, in the host namespace).
        let (ok, out) = in_netns(
            &ns_b,
            &["busybox", "ping", "-c", "1", "-W", "5", "10.213.5.1"],
        );
        assert!(ok, "ping from B to the gateway: {out}");
        // B reaches A over TCP (A's listener may take a moment to bind).
        let said = wait_for(WAIT, "a TCP answer from workload A", || async {
            let (ok, out) = in_netns(&ns_b, &["busybox", "nc", "-w", "3", "10.213.5.2", "7000"]);
            (ok && out.contains("hello-from-a")).then_some(out)
        })
        .await;
        assert!(said.contains("hello-from-a"));
        // And the host (the bridge's namespace) reaches A.
        let (ok, out) = in_netns(
            &lab.host,
            &["busybox", "ping", "-c", "1", "-W", "5", "10.213.5.2"],
        );
        assert!(ok, "ping from the host to A: {out}");
        rt.remove("vm-a", GRACE).await.unwrap();
        rt.remove("vm-b", GRACE).await.unwrap();
    })
    .await
    .expect("test bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_adopts_devices_and_a_removed_vm_releases_them() {
    let Some(lab) = Lab::new("tvnb") else { return };
    let dir = tempfile::tempdir().unwrap();
    let _kill = KillOnDrop::new(dir.path());
    tokio::time::timeout(TEST_BOUND, async {
        let net = lab.network(8);
        let a = attachment(4);
        let sleeper = spec("a", &["sleep", "600"]);
        let rt = ProcessRuntime::with_network(
            dir.path(),
            RestartPolicy::default(),
            None,
            Some(net.clone()),
        );
        rt.start_attached("vm-a", &sleeper, Some(&a)).await.unwrap();
        let pid = running_pid(&rt, "vm-a").await;
        let before = net.devices().await.unwrap();
        assert_eq!(before, vec![(net.veth_name("vm-a"), "vm-a".to_owned())]);
        // The node goes away; its workload and devices stay.
        drop(rt);
        let net = lab.network(8);
        let rt = ProcessRuntime::with_network(
            dir.path(),
            RestartPolicy::default(),
            None,
            Some(net.clone()),
        );
        let found = rt.recover().await.unwrap();
        assert_eq!(
            found,
            vec![Recovered::Adopted {
                vm_id: "vm-a".into(),
                pid
            }]
        );
        assert_eq!(net.devices().await.unwrap(), before, "no second device");
        // The workload ends; the next start spawns it again in the same
        // namespace on the same device, repaired rather than duplicated.
        rt.stop("vm-a", GRACE).await.unwrap();
        ip(&[
            "-n",
            &lab.host,
            "link",
            "set",
            &net.veth_name("vm-a"),
            "nomaster",
        ]);
        rt.start_attached("vm-a", &sleeper, Some(&a)).await.unwrap();
        let pid = running_pid(&rt, "vm-a").await;
        let ns_path = NodeNetwork::netns_path(&net.workload_netns("vm-a"));
        assert!(runs_in(pid, &ns_path).await);
        assert_eq!(net.devices().await.unwrap(), before, "still one device");
        let (ok, out) = in_netns(
            &net.workload_netns("vm-a"),
            &["busybox", "ping", "-c", "1", "-W", "5", "10.213.5.1"],
        );
        assert!(ok, "the repaired device is back on the bridge: {out}");
        // Removing the VM removes its device and namespace.
        rt.remove("vm-a", GRACE).await.unwrap();
        assert!(net.devices().await.unwrap().is_empty());
        assert!(!ns_path.exists());
        let links = ip(&["-n", &lab.host, "-o", "link", "show"]);
        assert!(!links.contains(&net.veth_name("vm-a")), "{links}");
    })
    .await
    .expect("test bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clashing_names_and_the_device_limit_are_refused_by_name() {
    let Some(lab) = Lab::new("tvnc") else { return };
    let dir = tempfile::tempdir().unwrap();
    let _kill = KillOnDrop::new(dir.path());
    tokio::time::timeout(TEST_BOUND, async {
        let net = lab.network(2);
        let rt = ProcessRuntime::with_network(
            dir.path(),
            RestartPolicy::default(),
            None,
            Some(net.clone()),
        );
        let sleeper = spec("a", &["sleep", "600"]);
        // Someone else's device holds the name vm-x's veth would get.
        let taken = net.veth_name("vm-x");
        ip(&["-n", &lab.host, "link", "add", &taken, "type", "bridge"]);
        let err = rt
            .start_attached("vm-x", &sleeper, Some(&attachment(2)))
            .await
            .unwrap_err();
        match &err {
            RuntimeError::Network(NetError::DeviceClash { device, vm_id, .. }) => {
                assert_eq!((device.as_str(), vm_id.as_str()), (taken.as_str(), "vm-x"));
            }
            other => panic!("expected a device clash, got {other}"),
        }
        assert!(err.to_string().contains(&taken), "{err}");
        // The stranger's device is left alone, also by a remove.
        rt.remove("vm-x", GRACE).await.unwrap();
        assert!(ip(&["-n", &lab.host, "-o", "link", "show"]).contains(&taken));
        // The bridge name taken by a device of another kind is refused too.
        let other = lab.network(2);
        ip(&["-n", &lab.host, "link", "del", "tvnbr0"]);
        ip(&[
            "-n",
            &lab.host,
            "link",
            "add",
            "tvnbr0",
            "type",
            "veth",
            "peer",
            "name",
            "tvncpeer0",
        ]);
        let err = other.ensure_bridge(pool()).await.unwrap_err();
        assert!(
            matches!(&err, NetError::DeviceClash { device, .. } if device == "tvnbr0"),
            "{err}"
        );
        ip(&["-n", &lab.host, "link", "del", "tvnbr0"]);
        // Two devices is this node's limit; the third VM is refused.
        for (vm, host) in [("vm-1", 3), ("vm-2", 4)] {
            rt.start_attached(vm, &sleeper, Some(&attachment(host)))
                .await
                .unwrap();
        }
        let err = rt
            .start_attached("vm-3", &sleeper, Some(&attachment(5)))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                RuntimeError::Network(NetError::TooManyDevices { count: 2, limit: 2 })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("network.max_devices"), "{err}");
        for vm in ["vm-1", "vm-2", "vm-3"] {
            rt.remove(vm, GRACE).await.unwrap();
        }
        assert!(net.devices().await.unwrap().is_empty());
    })
    .await
    .expect("test bound");
}
