//! Guest networking through a real `tern` node: `[network]` enabled with
//! its bridge in a network namespace the test makes (`host_netns`), process
//! VMs created with the CLI. Proves that VM records show the address and
//! MAC the replicated state leased, that two workloads on the node reach
//! each other over TCP and the bridge's address by ping, that a full pool
//! refuses a create with `ResourceExhausted` naming the pool, that a
//! restarted node adopts its VMs' devices instead of making second ones,
//! and that deleting a VM releases its device, namespace and address.
//!
//! Every namespace is named `tvnn…`/`tvn-…`; a guard deletes them (and so
//! every device in them) and kills the node and its workloads, pass or
//! fail. Needs root and iproute2; without them the test says so and
//! returns.
#![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_testkit::{TernProcess, config};

const START_BOUND: Duration = Duration::from_secs(120);
const STOP_BOUND: Duration = Duration::from_secs(30);
const CONVERGE_BOUND: Duration = Duration::from_secs(90);
const CLI_BOUND: Duration = Duration::from_secs(60);
/// The device and workload namespace prefix of this test.
const PREFIX: &str = "tvnn";
/// Five VM addresses: .2 to .6; .1 is the bridge.
const POOL: &str = "10.213.9.0/29";

/// The test's host namespace and every `tvnn-…` workload namespace,
/// deleted on drop.
struct Namespaces {
    host: String,
}

impl Namespaces {
    fn new() -> Option<Namespaces> {
        let ns = Namespaces {
            host: format!("tvn-node-{}", std::process::id()),
        };
        ns.clean();
        let out = Command::new("ip")
            .args(["netns", "add", &ns.host])
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: cannot make a network namespace (root and iproute2 needed): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(ns)
    }

    fn clean(&self) {
        let Ok(entries) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == self.host || name.starts_with(&format!("{PREFIX}-")) {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
            }
        }
    }

    /// The VM devices (veth host ends) in the host namespace.
    fn devices(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.host, "-o", "link", "show"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
            .filter(|name| name.starts_with(&format!("{PREFIX}h")))
            .collect()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.clean();
    }
}

/// A running `tern run`, killed with its workloads on drop.
struct NodeProc {
    proc: TernProcess,
    dir: PathBuf,
}

impl NodeProc {
    fn start(base: &Path, config_path: &Path) -> NodeProc {
        let dir = base.join("n1");
        let mut cmd = TernProcess::command(Path::new(env!("CARGO_BIN_EXE_tern")), config_path);
        cmd.env("RUST_LOG", "info");
        let mut proc = TernProcess::spawn(cmd, &dir, base.join("n1.log")).unwrap();
        let up: Result<Value, _> = proc.wait_node_file_blocking(START_BOUND);
        if let Err(e) = up {
            panic!("{e}\nfull log:\n{}", proc.log());
        }
        NodeProc { proc, dir }
    }

    fn stop(&mut self) {
        if self.proc.stop_blocking(STOP_BOUND).is_none() {
            panic!(
                "node did not stop within {STOP_BOUND:?}:\n{}",
                self.proc.log()
            );
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.proc.kill();
        for rt in tern_node::node::runtime_dirs(&self.dir) {
            for (_, identity) in tern_runtime::pidfile::live_workloads(&rt) {
                let _ = identity.signal_group(rustix::process::Signal::KILL);
            }
        }
    }
}

fn cli(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + CLI_BOUND;
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "`tern {}` did not finish",
            args.join(" ")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn cli_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.insert(1, "--json");
    let out = cli(&all);
    assert!(
        out.status.success(),
        "`tern {}` failed: {}",
        all.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn converge<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + CONVERGE_BOUND;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `argv` in namespace `ns`: success and output.
fn in_netns(ns: &str, argv: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn create(dir: &str, name: &str, argv: &[&str]) -> Output {
    create_with(dir, name, &[], argv)
}

fn create_with(dir: &str, name: &str, extra: &[&str], argv: &[&str]) -> Output {
    let mut args = vec![
        "vm",
        "create",
        name,
        "--runtime",
        "process",
        "--memory-mib",
        "64",
        "--data-dir",
        dir,
    ];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(argv);
    let mut all = args.clone();
    all.insert(1, "--json");
    cli(&all)
}

fn created(out: Output) -> Value {
    assert!(
        out.status.success(),
        "create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn running(dir: &str, vm_id: &str) -> Value {
    converge(&format!("VM {vm_id} running"), || {
        let v = cli_json(&["vm", "status", vm_id, "--data-dir", dir]);
        (v["observed"] == "running").then_some(v)
    })
}

#[test]
fn process_vms_get_a_network_that_survives_a_node_restart() {
    let Some(ns) = Namespaces::new() else { return };
    let base = tempfile::tempdir().unwrap();
    let mut c = config::node(&base.path().join("n1"), config::loopback(), "test-token");
    // Room for more VMs than the pool has addresses.
    c.capacity.vcpus = 16;
    c.capacity.memory_mib = 4096;
    c.network.enabled = true;
    c.network.pool = Some(POOL.into());
    c.network.bridge = Some("tvnbr0".into());
    c.network.device_prefix = Some(PREFIX.into());
    c.network.host_netns = Some(ns.host.clone());
    let config_path = base.path().join("n1.toml");
    config::write(&config_path, &c).unwrap();
    let mut node = NodeProc::start(base.path(), &config_path);
    let d1 = node.dir.display().to_string();

    // The record carries the address, MAC and gateway the state leased.
    let srv = created(create(
        &d1,
        "srv",
        &[
            "busybox",
            "nc",
            "-ll",
            "-p",
            "7000",
            "-e",
            "/bin/echo",
            "hello-from-srv",
        ],
    ));
    let srv_id = srv["id"].as_str().unwrap().to_owned();
    assert_eq!(srv["address"], "10.213.9.2/29", "{srv}");
    assert_eq!(srv["mac"], "02:74:6e:d5:09:02", "{srv}");
    assert_eq!(srv["gateway"], "10.213.9.1", "{srv}");
    // User data over its limit is refused, naming the field.
    let big = base.path().join("big-user-data");
    std::fs::write(&big, "x".repeat(1025)).unwrap();
    let refused = create_with(
        &d1,
        "client",
        &["--user-data-file", big.to_str().unwrap()],
        &["sleep", "600"],
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("InvalidArgument") && said.contains("user_data"),
        "{said}"
    );
    // The client prints what it learns about itself, user data included.
    let client = created(create_with(
        &d1,
        "client",
        &["--user-data", "role=client"],
        &[
            "/bin/sh",
            "-c",
            "echo \"I am $TERN_VM_NAME at $TERN_VM_ADDRESS via $TERN_VM_GATEWAY: $TERN_VM_USER_DATA\"; exec sleep 600",
        ],
    ));
    let client_id = client["id"].as_str().unwrap().to_owned();
    assert_eq!(client["address"], "10.213.9.3/29", "{client}");
    running(&d1, &srv_id);
    let status = running(&d1, &client_id);
    let log = status["log_path"].as_str().unwrap().to_owned();
    converge("the client's metadata in its log", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("I am client at 10.213.9.3/29 via 10.213.9.1: role=client")
            .then_some(())
    });
    let human = cli(&["vm", "list", "--data-dir", &d1]);
    let table = String::from_utf8_lossy(&human.stdout);
    assert!(
        table.contains("ADDRESS") && table.contains("10.213.9.3/29"),
        "{table}"
    );

    // The client's workload reaches the server over TCP and the gateway.
    let client_ns = format!("{PREFIX}-{client_id}");
    let talk = || {
        converge("a TCP answer from the server VM", || {
            let (ok, out) = in_netns(
                &client_ns,
                &["busybox", "nc", "-w", "3", "10.213.9.2", "7000"],
            );
            (ok && out.contains("hello-from-srv")).then_some(())
        });
        let (ok, out) = in_netns(
            &client_ns,
            &["busybox", "ping", "-c", "1", "-W", "5", "10.213.9.1"],
        );
        assert!(ok, "ping to the gateway: {out}");
    };
    talk();

    // Three more fill the pool; the sixth is refused, naming the pool.
    let mut ids = vec![srv_id.clone(), client_id.clone()];
    for name in ["s3", "s4", "s5"] {
        let v = created(create(&d1, name, &["sleep", "600"]));
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let full = create(&d1, "s6", &["sleep", "600"]);
    let said = String::from_utf8_lossy(&full.stderr);
    assert!(!full.status.success());
    assert!(
        said.contains("ResourceExhausted") && said.contains("10.213.9.0/29"),
        "{said}"
    );
    for id in &ids {
        running(&d1, id);
    }
    let devices = converge("five devices", || {
        let d = ns.devices();
        (d.len() == 5).then_some(d)
    });

    // A restarted node adopts the devices: the same five, no more.
    node.stop();
    drop(node);
    let node = NodeProc::start(base.path(), &config_path);
    for id in &ids {
        running(&d1, id);
    }
    let mut after = ns.devices();
    let mut before = devices.clone();
    after.sort();
    before.sort();
    assert_eq!(after, before, "no device made twice");
    talk();

    // Deleting a VM releases its device, namespace and address.
    let gone = &ids[2];
    cli_json(&["vm", "delete", gone, "--data-dir", &d1]);
    converge("the deleted VM's record gone", || {
        let list = cli_json(&["vm", "list", "--data-dir", &d1]);
        (!list["vms"]
            .as_array()?
            .iter()
            .any(|v| v["id"] == gone.as_str()))
        .then_some(())
    });
    assert_eq!(ns.devices().len(), 4);
    assert!(!Path::new(&format!("/run/netns/{PREFIX}-{gone}")).exists());
    let again = created(create(&d1, "s6", &["sleep", "600"]));
    assert_eq!(
        again["address"], "10.213.9.4/29",
        "the freed address: {again}"
    );
    running(&d1, again["id"].as_str().unwrap());
    drop(node);
}
