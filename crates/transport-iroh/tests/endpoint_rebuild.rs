//! The supervised endpoint against the real failure: iroh's rebind after a
//! network change fails with `EADDRINUSE`, the endpoint goes dead, Tern
//! notices and rebuilds it with the same key and port, and calls over iroh
//! work again both ways.
//!
//! The failure is made the way it happens on a node (see
//! `tern_transport_iroh::supervisor`): a second reference to the
//! endpoint's UDP socket (here a duplicate of its descriptor taken with
//! `pidfd_getfd`, where a node has a forked child that has not yet reached
//! `exec`) keeps the port bound while iroh drops its socket and binds
//! again, and a new interface (a veth pair, as a node makes for a workload) is the network change that
//! makes iroh rebind. Holding the duplicate a while also makes the
//! supervisor's first rebuild attempts fail, so its retry is exercised;
//! letting it go lets the rebuild through.
//!
//! Everything runs in a network namespace `tirb-…` the test makes (the
//! interface is added there, never on the host), removed by a guard pass
//! or fail. Needs root and iproute2; without them the test says so and
//! returns. A second test checks the liveness probe against a live
//! endpoint and a silent socket (no namespace needed).
#![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

use std::os::fd::OwnedFd;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use tern_protocol::catalog::methods;
use tern_protocol::{Call, PeerAddr, RpcClient};
use tern_transport_conformance::service::TestService;
use tern_transport_iroh::{IrohConfig, IrohTransport, probe};

/// Bound on the whole test.
const TEST_BOUND: Duration = Duration::from_secs(180);
/// Bound on each condition the test waits for (detection takes under
/// 8 s on an idle machine; a loaded one gets plenty more).
const WAIT: Duration = Duration::from_secs(60);
/// Timeout of each call attempt.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Drain for the final shutdowns.
const DRAIN: Duration = Duration::from_secs(2);

/// The test's namespace; deleted (with its veth pair) on drop.
struct Namespace(String);

impl Namespace {
    fn new() -> Option<Namespace> {
        let name = format!("tirb-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(out) if out.status.success() => {
                let ns = Namespace(name);
                ns.ip(&["link", "set", "lo", "up"]).unwrap();
                Some(ns)
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

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip -n {} {}: {}",
                self.0,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A duplicate of this process's descriptor of the UDP socket bound to
/// `127.0.0.1:port` in the calling thread's namespace.
fn duplicate_udp_socket(port: u16) -> anyhow::Result<OwnedFd> {
    let wanted = format!("0100007F:{port:04X}");
    let table = std::fs::read_to_string("/proc/thread-self/net/udp")?;
    let inode = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.get(1) == Some(&wanted.as_str()))
        .and_then(|cols| cols.get(9).map(|s| s.to_string()))
        .with_context(|| format!("no UDP socket on 127.0.0.1:{port}"))?;
    let link = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() == link {
            let fd: i32 = entry.file_name().to_string_lossy().parse()?;
            let me = rustix::process::pidfd_open(
                rustix::process::getpid(),
                rustix::process::PidfdFlags::empty(),
            )?;
            return Ok(rustix::process::pidfd_getfd(
                &me,
                fd,
                rustix::process::PidfdGetfdFlags::empty(),
            )?);
        }
    }
    bail!("no descriptor of socket inode {inode}")
}

/// Waits until `cond` holds, failing after [`WAIT`] with `what`.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Calls `to` until a call gets through (an answer of the service, even
/// an application error, proves the transport), bounded by [`WAIT`].
async fn call_until_through(client: &dyn RpcClient, to: &PeerAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let call = Call::new(methods::STATUS_GET, Bytes::new()).with_timeout(CALL_TIMEOUT);
        match client.call(to, call).await {
            Ok(_) | Err(tern_protocol::CallError::Application(_)) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => {
                bail!("calls to {} still fail: {e}", to.id.short())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn scenario(ns: &Namespace) -> anyhow::Result<()> {
    let local = "127.0.0.1:0".parse().unwrap();
    let a = IrohTransport::bind(
        IrohConfig::new(rand::random()).with_bind_addr(local),
        TestService::default().dispatcher(),
    )
    .await?;
    let b = IrohTransport::bind(
        IrohConfig::new(rand::random()).with_bind_addr(local),
        TestService::default().dispatcher(),
    )
    .await?;
    let (a_id, a_addr) = (a.id(), a.local_addr());
    call_until_through(b.client().as_ref(), &a.peer_addr()).await?;
    call_until_through(a.client().as_ref(), &b.peer_addr()).await?;
    wait_for("a's endpoint answered its liveness probe", || {
        a.health().probes_answered > 0
    })
    .await?;
    assert_eq!(a.health().rebuilds, 0);

    // The fork window, held open: a second reference to a's socket.
    let held = duplicate_udp_socket(a_addr.port())?;
    // The network change that makes iroh rebind every socket.
    ns.ip(&[
        "link", "add", "tirbv0", "type", "veth", "peer", "name", "tirbv1",
    ])?;
    // netwatch follows addresses and routes, not bare links.
    ns.ip(&["addr", "add", "10.213.0.1/24", "dev", "tirbv0"])?;
    ns.ip(&["link", "set", "tirbv0", "up"])?;
    ns.ip(&["link", "set", "tirbv1", "up"])?;

    wait_for("a's endpoint is found dead", || !a.health().healthy).await?;
    wait_for("a rebuild attempt finds the port still held", || {
        a.health().bind_failures > 0
    })
    .await?;
    assert_eq!(a.health().rebuilds, 0, "no rebuild while the port is held");
    drop(held);
    wait_for("a's endpoint is rebuilt", || a.health().rebuilds == 1).await?;
    wait_for("the rebuilt endpoint answers its probe", || {
        a.health().healthy
    })
    .await?;

    assert_eq!(a.id(), a_id, "same key");
    assert_eq!(a.local_addr(), a_addr, "same address");
    assert_eq!(
        a.endpoint().bound_sockets().first().map(|s| s.port()),
        Some(a_addr.port()),
        "the new endpoint is bound to the same port"
    );
    // b still holds its connection to a's dead endpoint. One idempotent
    // call with room in its deadline: it waits out that connection (the
    // QUIC idle timeout) and is sent again on a new one, so it succeeds
    // without the caller retrying.
    let status = Call::new(methods::STATUS_GET, Bytes::new()).with_timeout(WAIT);
    b.client()
        .call(&a.peer_addr(), status)
        .await
        .context("b's first call to the rebuilt endpoint")?;
    // And a dials b from its new endpoint.
    call_until_through(a.client().as_ref(), &b.peer_addr()).await?;
    assert_eq!(a.health().rebuilds, 1, "exactly one rebuild");

    b.shutdown(DRAIN).await;
    a.shutdown(DRAIN).await;
    Ok(())
}

#[test]
fn a_dead_endpoint_is_found_and_rebuilt_with_the_same_key_and_port() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let Some(ns) = Namespace::new() else {
        return;
    };
    let path = format!("/var/run/netns/{}", ns.0);
    let result = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<()> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .context("entering the namespace")?;
            // Built on this thread, so every worker and blocking thread
            // (started from here) and every socket is in the namespace.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async {
                tokio::time::timeout(TEST_BOUND, scenario(&ns))
                    .await
                    .context("test bound passed")?
            })
        })
        .join()
    });
    match result {
        Ok(r) => r.unwrap(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The probe against real sockets: a live endpoint answers it; a port
/// held by a socket that reads nothing (an endpoint whose driver is
/// gone) does not.
#[test]
fn the_probe_tells_a_live_endpoint_from_a_silent_socket() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = IrohTransport::bind(
            IrohConfig::new(rand::random()),
            TestService::default().dispatcher(),
        )
        .await
        .unwrap();
        let target = probe::probe_target(a.local_addr());
        probe::probe(target, WAIT).await.unwrap();

        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let err = probe::probe(silent.local_addr().unwrap(), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            matches!(err, probe::ProbeError::NoAnswer { .. }),
            "a silent socket gives no answer: {err}"
        );
        a.shutdown(DRAIN).await;
    });
}
