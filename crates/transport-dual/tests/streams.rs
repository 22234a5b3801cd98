//! The router's streams over real transports: every node runs a real
//! iroh endpoint and a real TLS gRPC server on loopback with one key, and
//! calls through a [`DualRouter`] that prefers iroh with fallback on.
//!
//! - The conformance suite's streaming checks, unchanged, through the
//!   router.
//! - A stream whose opening fails on iroh (the peer's iroh is down) is
//!   opened over gRPC, and says so in its route.
//! - A stream that breaks after it was opened on iroh is the caller's
//!   error: it is not moved to gRPC behind the caller's back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::{
    BoxFuture, CallError, Handler, PeerAddr, PeerId, RpcClient, StreamCall, TransportKind, pb,
};
use tern_transport_conformance::service::TestService;
use tern_transport_conformance::{Harness, NodeSpec, TestNode, random_key, run_check, streams};
use tern_transport_dual::DualRouter;
use tern_transport_dual::policy::{IrohServices, Mode, Policy, RaftTransport};
use tern_transport_grpc::{GrpcTransport, ServerConfig};
use tern_transport_iroh::{IrohConfig, IrohTransport};

/// How long a restarted node retries binding ports its predecessor just
/// released.
const REBIND_PATIENCE: Duration = Duration::from_secs(10);

/// Time a graceful shutdown may drain.
const DRAIN: Duration = Duration::from_secs(2);

/// Bounds of the streams the fallback checks open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

fn prefer_iroh() -> Policy {
    Policy {
        mode: Mode::Dual,
        prefer_iroh: IrohServices::AllExceptRaft,
        raft_transport: RaftTransport::Iroh,
        fallback_to_grpc: true,
    }
}

/// A node with both transports on the same port number (UDP for iroh, TCP
/// for gRPC), so one address restarts both.
struct DualNode {
    iroh: IrohTransport,
    grpc: GrpcTransport,
    router: Arc<DualRouter>,
}

async fn start_dual(
    key: [u8; 32],
    handler: Arc<dyn Handler>,
    listen: Option<SocketAddr>,
) -> anyhow::Result<DualNode> {
    let deadline = tokio::time::Instant::now() + REBIND_PATIENCE;
    loop {
        let attempt = async {
            let mut config = IrohConfig::new(key);
            config = config.with_bind_addr(listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))));
            let iroh = IrohTransport::bind(config, handler.clone())
                .await
                .context("binding iroh")?;
            let grpc_addr = SocketAddr::from(([127, 0, 0, 1], iroh.local_addr().port()));
            match GrpcTransport::bind(ServerConfig::new(key, grpc_addr), handler.clone()).await {
                Ok(grpc) => Ok((iroh, grpc)),
                Err(e) => {
                    iroh.shutdown(Duration::ZERO).await;
                    Err(anyhow::Error::from(e).context("binding gRPC"))
                }
            }
        };
        match attempt.await {
            Ok((iroh, grpc)) => {
                let router = Arc::new(DualRouter::new(
                    Some(grpc.client() as Arc<dyn RpcClient>),
                    Some(iroh.client() as Arc<dyn RpcClient>),
                    prefer_iroh(),
                ));
                return Ok(DualNode { iroh, grpc, router });
            }
            // The TCP port may be taken, or a predecessor's ports not yet
            // released.
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!("binding a dual node again: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl DualNode {
    fn addr(&self) -> PeerAddr {
        PeerAddr {
            grpc: Some(self.grpc.server().url()),
            ..self.iroh.peer_addr()
        }
    }
}

/// Starts dual nodes whose client is the router.
#[derive(Debug, Default, Clone, Copy)]
struct RouterHarness;

impl Harness for RouterHarness {
    type Node = DualNode;

    fn name(&self) -> &'static str {
        "dual"
    }

    fn start(&self, spec: NodeSpec) -> BoxFuture<'_, anyhow::Result<DualNode>> {
        Box::pin(start_dual(spec.secret_key, spec.handler, spec.listen))
    }
}

impl TestNode for DualNode {
    fn id(&self) -> PeerId {
        self.iroh.id()
    }

    fn addr(&self) -> PeerAddr {
        DualNode::addr(self)
    }

    fn listen_addr(&self) -> SocketAddr {
        self.iroh.local_addr()
    }

    fn client(&self) -> Arc<dyn RpcClient> {
        self.router.clone()
    }

    fn shutdown(self, drain: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            tokio::join!(self.iroh.shutdown(drain), self.grpc.shutdown(drain));
        })
    }
}

macro_rules! through_the_router {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_check(RouterHarness, streams::$name);
            }
        )*
    };
}

through_the_router!(
    stream_messages_arrive_in_order,
    stalled_reader_bounds_the_sender,
    streams_are_cancelled_both_ways,
    idle_stream_times_out,
    control_calls_complete_during_a_saturating_stream,
    peer_restart_mid_stream,
    many_concurrent_small_streams,
);

fn watch(command: &str) -> StreamCall {
    let request = pb::WatchVmsRequest {
        from_revision: 0,
        vm_id: command.into(),
    }
    .encode_to_vec()
    .into();
    StreamCall::new(methods::VM_WATCH, request)
        .with_open_timeout(OPEN_TIMEOUT)
        .with_idle_timeout(OPEN_TIMEOUT)
}

/// The peer's iroh is down, its gRPC up: the opening fails on iroh (not
/// delivered) and the stream is opened over gRPC.
async fn opening_falls_back_to_grpc(_: Arc<RouterHarness>) -> anyhow::Result<()> {
    let key = random_key();
    let server = start_dual(key, TestService::default().dispatcher(), None).await?;
    let addr = server.addr();
    let DualNode { iroh, grpc, .. } = server;
    iroh.shutdown(DRAIN).await;
    let caller = start_dual(random_key(), TestService::default().dispatcher(), None).await?;
    let (result, route) = caller
        .router
        .open_stream_routed(&addr, watch("count:3:8"))
        .await;
    let mut stream = result.context("the stream did not open over gRPC")?;
    let route = route.context("no route")?;
    ensure!(
        route.first == TransportKind::Iroh && route.fell_back,
        "expected iroh first, then gRPC: {route:?}"
    );
    for _ in 0..3 {
        stream
            .receiver
            .next()
            .await
            .context("the stream ended early")??;
    }
    ensure!(stream.receiver.next().await.is_none(), "no clean end");
    tokio::join!(caller.iroh.shutdown(DRAIN), caller.grpc.shutdown(DRAIN));
    grpc.shutdown(DRAIN).await;
    Ok(())
}

/// A stream opened on iroh that breaks (the peer's iroh stops) reaches
/// the caller as a transport error after the messages that arrived; the
/// router moves nothing to gRPC once a stream was handed over.
async fn a_broken_stream_is_the_callers_error(_: Arc<RouterHarness>) -> anyhow::Result<()> {
    let server = start_dual(random_key(), TestService::default().dispatcher(), None).await?;
    let addr = server.addr();
    let caller = start_dual(random_key(), TestService::default().dispatcher(), None).await?;
    let (result, route) = caller
        .router
        .open_stream_routed(&addr, watch("flood:64"))
        .await;
    let mut stream = result?;
    ensure!(
        route
            == Some(tern_transport_dual::router::Route {
                first: TransportKind::Iroh,
                fell_back: false
            }),
        "expected the stream on iroh: {route:?}"
    );
    stream.receiver.next().await.context("no first event")??;
    let DualNode { iroh, grpc, .. } = server;
    iroh.shutdown(DRAIN).await;
    loop {
        match stream.receiver.next().await {
            Some(Ok(_)) => {}
            Some(Err(CallError::Transport(e))) => {
                ensure!(e.transport == TransportKind::Iroh, "error from {e}");
                break;
            }
            Some(Err(other)) => bail!("the stream broke with {other}"),
            None => bail!("a stream whose peer stopped ended cleanly"),
        }
    }
    tokio::join!(caller.iroh.shutdown(DRAIN), caller.grpc.shutdown(DRAIN));
    grpc.shutdown(DRAIN).await;
    Ok(())
}

#[test]
fn a_failed_opening_falls_back_to_grpc() {
    run_check(RouterHarness, opening_falls_back_to_grpc);
}

#[test]
fn a_stream_broken_after_opening_is_not_retried() {
    run_check(RouterHarness, a_broken_stream_is_the_callers_error);
}
