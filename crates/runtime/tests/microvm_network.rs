//! A real microVM on the guest network: QEMU's `microvm` machine with a
//! virtio-net device on a TAP on the node's bridge, the bridge in a network
//! namespace the test makes. The guest (the busybox initramfs of
//! `support/microvm_assets.rs`) prints its id, name, address and user
//! data read from its kernel command line, and again read from its config
//! drive, configures `eth0` and pings its gateway (the
//! bridge); the host side pings the guest back. Removing the VM removes
//! its TAP.
//!
//! Like the boot test, it fails rather than skips when the assets cannot
//! be prepared; it needs root for the namespace and the TAP.

mod support;

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::microvm_assets::{
    self, CONFIG_DRIVE_MARKER, GATEWAY_MARKER, IDENTITY_MARKER, NO_GATEWAY_MARKER, USER_DATA_MARKER,
};
use tern_runtime::network::{Attachment, NetworkConfig, NodeNetwork};
use tern_runtime::pidfile::KillOnDrop;
use tern_runtime::{MicrovmConfig, MicrovmRuntime, RunState, Runtime, VmSpec};
use tern_state::network::{Ipv4Net, mac_of};

const SETUP_BOUND: Duration = Duration::from_secs(900);
/// Bound on the guest booting and pinging its gateway (TCG included).
const BOOT_BOUND: Duration = Duration::from_secs(180);
const GRACE: Duration = Duration::from_secs(30);

/// The test's host namespace, deleted (with the bridge and TAP in it) on
/// drop.
struct HostNs(String);

impl Drop for HostNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn ip(args: &[&str]) -> (bool, String) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_learns_its_address_and_pings_its_gateway() {
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("microvm-assets");
    let setup = tokio::task::spawn_blocking(move || microvm_assets::prepare(&cache));
    let assets = match tokio::time::timeout(SETUP_BOUND, setup).await {
        Ok(Ok(Ok(assets))) => assets,
        Ok(Ok(Err(why))) => panic!("microVM test setup failed: {why}"),
        Ok(Err(join)) => panic!("microVM test setup panicked: {join}"),
        Err(_) => panic!("microVM test setup took longer than {SETUP_BOUND:?}"),
    };
    let host = HostNs(format!("tvn-mvm-{}", std::process::id()));
    let _ = ip(&["netns", "del", &host.0]);
    let (made, why) = ip(&["netns", "add", &host.0]);
    assert!(made, "cannot make a network namespace (root needed): {why}");

    let dir = tempfile::Builder::new()
        .prefix("tern-mvn")
        .tempdir_in("/tmp")
        .unwrap();
    let _guard = KillOnDrop::new(dir.path());
    let net = Arc::new(
        NodeNetwork::new(NetworkConfig {
            bridge: "tvnbr0".into(),
            device_prefix: "tvnm".into(),
            host_netns: Some(host.0.clone()),
            max_devices: 4,
        })
        .unwrap(),
    );
    let rt = MicrovmRuntime::with_config(
        dir.path(),
        MicrovmConfig {
            network: Some(net.clone()),
            ..MicrovmConfig::default()
        },
    );
    let pool = Ipv4Net::parse_pool("10.213.6.0/29").unwrap();
    let address = Ipv4Addr::new(10, 213, 6, 2);
    let attachment = Attachment {
        address,
        mac: mac_of(address),
        pool,
    };
    let spec = VmSpec {
        name: "netguest".into(),
        vcpus: 1,
        memory_mib: 256,
        runtime: "microvm".into(),
        kernel: assets.kernel.display().to_string(),
        initrd: assets.initrd.display().to_string(),
        kernel_cmdline: "panic=-1".into(),
        user_data: "greeting=hello from the operator".into(),
        ..VmSpec::default()
    };
    tokio::time::timeout(
        BOOT_BOUND,
        rt.start_attached("mvm-n", &spec, Some(&attachment)),
    )
    .await
    .expect("start exceeded the boot bound")
    .unwrap();
    assert_eq!(
        net.devices().await.unwrap(),
        vec![(net.tap_name("mvm-n"), "mvm-n".to_owned())]
    );
    let serial = rt.status("mvm-n").await.unwrap().log_path;
    let qemu_log = dir.path().join("mvm-n/qemu.log");
    let text = tokio::time::timeout(BOOT_BOUND, async {
        loop {
            let text = tokio::fs::read_to_string(&serial).await.unwrap_or_default();
            if text.contains(GATEWAY_MARKER) || text.contains(NO_GATEWAY_MARKER) {
                return text;
            }
            let observed = rt.status("mvm-n").await.unwrap();
            assert!(
                observed.state == RunState::Running,
                "QEMU is no longer running; serial log:\n{text}\nqemu.log:\n{}",
                std::fs::read_to_string(&qemu_log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the guest did not report its gateway within {BOOT_BOUND:?}; serial log:\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        )
    });
    let identity = format!("{IDENTITY_MARKER}mvm-n name=netguest address=10.213.6.2/29");
    assert!(text.contains(&identity), "serial log:\n{text}");
    assert!(
        text.contains(&format!(
            "{USER_DATA_MARKER} greeting=hello from the operator"
        )),
        "serial log:\n{text}"
    );
    // The same, read from the config drive.
    assert!(
        text.contains(&format!(
            "{CONFIG_DRIVE_MARKER} name=netguest address=10.213.6.2/29 \
             user_data=greeting=hello from the operator"
        )),
        "serial log:\n{text}"
    );
    assert!(
        text.contains(&format!("{GATEWAY_MARKER} 10.213.6.1")),
        "serial log:\n{text}"
    );
    // And back: the host side (the bridge's namespace) reaches the guest.
    let (ok, out) = ip(&[
        "netns",
        "exec",
        &host.0,
        "busybox",
        "ping",
        "-c",
        "1",
        "-W",
        "5",
        "10.213.6.2",
    ]);
    assert!(ok, "ping from the bridge to the guest: {out}");

    rt.remove("mvm-n", GRACE).await.unwrap();
    assert!(
        net.devices().await.unwrap().is_empty(),
        "the TAP is removed"
    );
}
