//! Transport factories: one trait, [`TransportFactory`], and a factory
//! for each way a node can run its transports on loopback ([`Iroh`],
//! [`Grpc`], and both behind the router, [`Dual`]), so one test body runs
//! over each.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tern_protocol::{Handler, PeerAddr, RpcClient};
use tern_transport_dual::DualRouter;
use tern_transport_dual::policy::{IrohServices, Mode, Policy, RaftTransport};
use tern_transport_grpc::{GrpcTransport, ServerConfig};
use tern_transport_iroh::{IrohConfig, IrohTransport};

/// How long a transport drains at shutdown in tests.
pub const DRAIN: Duration = Duration::from_secs(2);

/// Starts one transport serving a handler.
pub trait TransportFactory: Send + Sync + 'static {
    /// A running transport.
    type Transport: Send + Sync + 'static;
    /// Name for logs and bench ids.
    const NAME: &'static str;
    /// Binds on `bind` (port 0 picks one) with identity `secret`.
    fn start(
        &self,
        secret: [u8; 32],
        bind: SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> impl Future<Output = Self::Transport> + Send;
    /// The transport's client.
    fn client(t: &Self::Transport) -> Arc<dyn RpcClient>;
    /// How others reach it.
    fn addr(t: &Self::Transport) -> PeerAddr;
    /// The socket it is bound to (to restart on the same port).
    fn bound(t: &Self::Transport) -> SocketAddr;
    /// Graceful shutdown.
    fn stop(t: Self::Transport) -> impl Future<Output = ()> + Send;
}

/// iroh QUIC on loopback, no relay.
pub struct Iroh;

impl TransportFactory for Iroh {
    type Transport = IrohTransport;
    const NAME: &'static str = "iroh";

    async fn start(
        &self,
        secret: [u8; 32],
        bind: SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> IrohTransport {
        // A restart binds the port its predecessor just released; the
        // socket may take a moment to be free.
        let deadline = tokio::time::Instant::now() + REBIND_PATIENCE;
        loop {
            match IrohTransport::bind(
                IrohConfig::new(secret).with_bind_addr(bind),
                handler.clone(),
            )
            .await
            {
                Ok(t) => return t,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!("binding iroh again: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("iroh binds on loopback: {e}"),
            }
        }
    }
    fn client(t: &IrohTransport) -> Arc<dyn RpcClient> {
        t.client()
    }
    fn addr(t: &IrohTransport) -> PeerAddr {
        t.peer_addr()
    }
    fn bound(t: &IrohTransport) -> SocketAddr {
        t.local_addr()
    }
    async fn stop(t: IrohTransport) {
        t.shutdown(DRAIN).await;
    }
}

/// gRPC (tonic) on loopback.
pub struct Grpc;

impl TransportFactory for Grpc {
    type Transport = GrpcTransport;
    const NAME: &'static str = "grpc";

    async fn start(
        &self,
        secret: [u8; 32],
        bind: SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> GrpcTransport {
        GrpcTransport::bind(ServerConfig::new(secret, bind), handler)
            .await
            .expect("gRPC binds on loopback")
    }
    fn client(t: &GrpcTransport) -> Arc<dyn RpcClient> {
        t.client()
    }
    fn addr(t: &GrpcTransport) -> PeerAddr {
        t.peer_addr()
    }
    fn bound(t: &GrpcTransport) -> SocketAddr {
        t.local_addr()
    }
    async fn stop(t: GrpcTransport) {
        t.shutdown(DRAIN).await;
    }
}

/// Both transports behind the dual router, as a node in `mode = "dual"`
/// runs them: Raft prefers iroh, with fallback to gRPC on. gRPC listens on
/// the TCP port of iroh's UDP port, so one address restarts both.
pub struct Dual;

/// A running [`Dual`] node's transports.
pub struct DualTransport {
    /// The iroh transport (UDP port P).
    pub iroh: IrohTransport,
    /// The gRPC transport (TCP port P).
    pub grpc: GrpcTransport,
    /// The router over both, as the node's client.
    pub router: Arc<DualRouter>,
}

/// How long a restarted dual node retries binding the ports its
/// predecessor just released (or a TCP port another test holds).
const REBIND_PATIENCE: Duration = Duration::from_secs(10);

impl TransportFactory for Dual {
    type Transport = DualTransport;
    const NAME: &'static str = "dual";

    async fn start(
        &self,
        secret: [u8; 32],
        bind: SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> DualTransport {
        let deadline = tokio::time::Instant::now() + REBIND_PATIENCE;
        loop {
            let iroh = IrohTransport::bind(
                IrohConfig::new(secret).with_bind_addr(bind),
                handler.clone(),
            )
            .await;
            let iroh = match iroh {
                Ok(iroh) => iroh,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!("binding iroh again: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => panic!("iroh binds on loopback: {e}"),
            };
            let tcp = SocketAddr::new(bind.ip(), iroh.local_addr().port());
            match GrpcTransport::bind(ServerConfig::new(secret, tcp), handler.clone()).await {
                Ok(grpc) => {
                    let router = Arc::new(DualRouter::new(
                        Some(grpc.client() as Arc<dyn RpcClient>),
                        Some(iroh.client() as Arc<dyn RpcClient>),
                        Policy {
                            mode: Mode::Dual,
                            prefer_iroh: IrohServices::AllExceptRaft,
                            raft_transport: RaftTransport::Iroh,
                            fallback_to_grpc: true,
                        },
                    ));
                    return DualTransport { iroh, grpc, router };
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!("binding gRPC again: {e}");
                    iroh.shutdown(Duration::ZERO).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("gRPC binds on loopback: {e}"),
            }
        }
    }
    fn client(t: &DualTransport) -> Arc<dyn RpcClient> {
        t.router.clone()
    }
    fn addr(t: &DualTransport) -> PeerAddr {
        PeerAddr {
            grpc: Some(t.grpc.server().url()),
            ..t.iroh.peer_addr()
        }
    }
    fn bound(t: &DualTransport) -> SocketAddr {
        t.iroh.local_addr()
    }
    async fn stop(t: DualTransport) {
        t.iroh.shutdown(DRAIN).await;
        t.grpc.shutdown(DRAIN).await;
    }
}
