//! One test suite for every transport.
//!
//! Both transports implement [`tern_protocol::RpcClient`] and serve a
//! [`tern_protocol::Handler`]. This crate states what that means as
//! executable checks, run unchanged against each implementation: a
//! transport crate implements [`Harness`] (how to start a node of its kind)
//! in its `tests/`, then expands [`conformance_tests!`] there, which makes
//! one `#[test]` per check.
//!
//! # Layout
//!
//! - [`Harness`], [`TestNode`], [`NodeSpec`]: what a transport provides.
//! - [`service`]: the [`service::TestService`] handler every check serves,
//!   which echoes, sleeps, fails on request and counts what it saw.
//! - [`suite`]: the checks of unary calls, one `async fn` each.
//! - [`streams`]: the checks of streaming calls (order, back-pressure with
//!   a stalled reader, cancellation both ways, idle bound, control during a
//!   saturating stream, peer restart mid-stream, 10,000 streams at once).
//!
//! Every node runs for real (real endpoints and servers on loopback), every
//! check is bounded by [`TEST_TIMEOUT`], and no check asserts on speed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tern_protocol::{BoxFuture, Handler, PeerAddr, PeerId, RpcClient};

pub mod service;
pub mod streams;
pub mod suite;

/// Longest any one check may run before it fails as hung.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What a node under test is made of.
pub struct NodeSpec {
    /// The node's Ed25519 secret key: its identity on every transport.
    pub secret_key: [u8; 32],
    /// What the node serves.
    pub handler: Arc<dyn Handler>,
    /// Where to listen: `None` for any free loopback port, `Some` to rebind
    /// an address a stopped node used (restart tests).
    pub listen: Option<SocketAddr>,
}

/// Starts nodes of one transport.
pub trait Harness: Send + Sync + 'static {
    /// A running node.
    type Node: TestNode;

    /// The transport's name, for messages.
    fn name(&self) -> &'static str;

    /// Starts a node serving `spec.handler` with identity `spec.secret_key`.
    fn start(&self, spec: NodeSpec) -> BoxFuture<'_, anyhow::Result<Self::Node>>;
}

/// A running node of the transport under test.
pub trait TestNode: Send + Sync + 'static {
    /// Its identity (the public key of its secret key).
    fn id(&self) -> PeerId;
    /// How to reach it over this transport.
    fn addr(&self) -> PeerAddr;
    /// The socket address it listens on (to restart it there).
    fn listen_addr(&self) -> SocketAddr;
    /// Its client, which calls other nodes as this node.
    fn client(&self) -> Arc<dyn RpcClient>;
    /// Graceful shutdown: stop accepting, let in-flight calls finish within
    /// `drain`, close connections. Resolves when the node has stopped.
    fn shutdown(self, drain: Duration) -> BoxFuture<'static, ()>;
}

/// A fresh random secret key.
pub fn random_key() -> [u8; 32] {
    rand::random()
}

/// Polls `cond` every 10 ms until it holds, or fails after `limit`.
pub async fn wait_until(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Runs `test` on a fresh multi-threaded runtime (two workers, the
/// machine's cores), with tracing to the test's output as `RUST_LOG`
/// says; `None` if it did not finish within `timeout`. The runtime is
/// given 5 s to shut down. For transport tests outside the suite too.
pub fn run_bounded<T>(timeout: Duration, test: impl Future<Output = T>) -> Option<T> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime starts");
    let outcome = runtime.block_on(async { tokio::time::timeout(timeout, test).await });
    runtime.shutdown_timeout(Duration::from_secs(5));
    outcome.ok()
}

/// Runs one check on a fresh multi-threaded runtime, bounded by
/// [`TEST_TIMEOUT`]. Used by [`conformance_tests!`].
pub fn run_check<H, F, Fut>(harness: H, check: F)
where
    H: Harness,
    F: FnOnce(Arc<H>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let name = harness.name();
    match run_bounded(TEST_TIMEOUT, check(Arc::new(harness))) {
        Some(Ok(())) => {}
        Some(Err(e)) => panic!("{name}: {e:#}"),
        None => panic!("{name}: check did not finish within {TEST_TIMEOUT:?}"),
    }
}

/// Expands to one `#[test]` per conformance check, each starting nodes with
/// the given harness expression (evaluated once per test).
///
/// ```ignore
/// tern_transport_conformance::conformance_tests!(MyHarness::default());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@each $harness; streams;
            stream_messages_arrive_in_order,
            stalled_reader_bounds_the_sender,
            streams_are_cancelled_both_ways,
            idle_stream_times_out,
            control_calls_complete_during_a_saturating_stream,
            peer_restart_mid_stream,
            many_concurrent_small_streams
        );
        $crate::conformance_tests!(@each $harness; suite;
            unary_round_trip,
            caller_identity_is_authenticated,
            application_errors_pass_through,
            unknown_service_is_unimplemented,
            many_concurrent_calls,
            sustained_small_calls,
            deadline_is_enforced,
            stopped_peer_is_not_delivered,
            peer_restart_with_same_key_recovers,
            different_key_at_old_address_is_not_trusted,
            shutdown_drains_in_flight_calls,
            control_calls_complete_during_bulk_transfer,
            oversize_payload_is_refused,
            dropped_call_is_cancelled_at_the_peer,
            ping_measures_a_round_trip
        );
    };
    (@each $harness:expr; $module:ident; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::run_check($harness, $crate::$module::$name);
            }
        )*
    };
}
