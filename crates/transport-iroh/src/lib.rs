//! The Tern protocol over iroh QUIC streams.
//!
//! One iroh [`Endpoint`](iroh::Endpoint) per node, dialled by its Ed25519
//! public key. Every call is one bidirectional QUIC stream carrying one
//! request frame ([`tern_protocol::frame`]) and answered by one response or
//! error frame; pings are answered by pongs the same way. A streaming call
//! is one QUIC stream too, carrying its messages as stream frames. The endpoint is
//! offline by default: no public relay, no DNS or pkarr address lookup, no
//! port mapping. Peers are reached by id plus the direct addresses (and
//! optionally the relay) their [`PeerAddr`](tern_protocol::PeerAddr) names.
//!
//! # Layout
//!
//! - [`config`]: [`IrohConfig`], the named [`TransportLimits`] and the
//!   persistent identity helper [`load_or_create_secret_key`].
//! - [`transport`]: [`IrohTransport`], which binds the endpoint, serves a
//!   [`Handler`](tern_protocol::Handler) and owns graceful shutdown.
//! - [`supervisor`]: the supervised endpoint: why iroh's endpoint can die
//!   on a network change (a rebind that hits `EADDRINUSE`), how Tern finds
//!   out (a liveness probe, the endpoint closing) and the rebuild with the
//!   same key and port; [`EndpointHealth`].
//! - [`probe`]: the liveness probe, a QUIC version negotiation round trip
//!   to the endpoint's own socket; its packet and answer decoder, pure.
//! - [`server`]: the [`ProtocolHandler`](iroh::protocol::ProtocolHandler)
//!   for [`ALPN`]: per-stream dispatch, limits, malformed input, draining.
//! - [`client`]: [`IrohClient`], the [`RpcClient`](tern_protocol::RpcClient)
//!   with two pooled connections per peer (bulk apart from the rest), re-dial
//!   with backoff, priority
//!   lanes, deadlines and cancellation.
//! - [`stream`]: streaming calls: one QUIC stream per call, the frames of
//!   [`tern_protocol::stream`] on it, checked by its rules, flow control as
//!   back-pressure, idle bounds and cancellation by drop.
//! - [`path_select`]: [`path_select::LivePathSelector`], iroh's path
//!   selection with silent paths let go, so a connection this node dialled
//!   follows a peer whose address changed.
//! - [`backoff`]: the re-dial schedule, pure (time and randomness passed in).
//! - [`wire`]: reading and writing frames on QUIC streams, stream and
//!   connection error codes.
//! - [`metrics`]: metric names and the helpers that record them through the
//!   `metrics` facade.
//!
//! # Invariants
//!
//! - The caller a service sees is the connection's authenticated
//!   `remote_id()`, never a value from a frame.
//! - Nothing a peer sends can panic this crate or close a connection:
//!   a bad stream is answered with an error frame or reset, alone.
//! - Every limit is a named constant in [`config`] or [`wire`] saying why.
//!
//! # Deliberately absent
//!
//! - **0-RTT.** Connections are pooled, so a handshake is paid once per
//!   peer and (re)connection, not per call. And 0-RTT data arrives before
//!   the caller's key is proven (the client's TLS Finished comes one round
//!   trip later): serving it early would break the invariant above, and
//!   waiting for the proof gives the answer no sooner than a 1-RTT
//!   handshake does. So every call waits for the full handshake. Measured
//!   (`iroh/handshake` bench, loopback): a fresh connection adds ~1.2 ms to
//!   its first call, almost all of it handshake CPU that 0-RTT would not
//!   save; the round trip it could save is tens of microseconds there.
//! - **Dead-connection probing.** A pooled connection whose peer vanished
//!   silently is noticed by the QUIC idle timeout
//!   ([`config::DEFAULT_IDLE_TIMEOUT`], with keep-alives at a third of it);
//!   until then calls on it end at their own deadline, as
//!   `TimedOut`/`MayHaveBeenDelivered`. The one exception is a ping a
//!   caller sends (the dual router's path check on a slow call): if it goes
//!   unanswered, the connection it rode on is closed so the next call
//!   dials again (see [`client`]).

pub mod backoff;
pub mod client;
pub mod config;
pub mod metrics;
pub mod path_select;
pub mod probe;
pub mod server;
pub mod stream;
pub mod supervisor;
pub mod transport;
pub mod wire;

pub use client::IrohClient;
pub use config::{IrohConfig, LimitsError, TransportLimits, load_or_create_secret_key};
pub use supervisor::EndpointHealth;
pub use transport::{BindError, IrohTransport};

/// The one ALPN of the Tern RPC protocol over iroh. The trailing number is
/// the protocol version: an incompatible change gets a new ALPN, served
/// side by side with the old one during a rollout.
pub const ALPN: &[u8] = b"tern/rpc/1";
