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
//!   for [`ALPN`]: per-stream dispatch, limits, malformed input, draining,
//!   early data (below).
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
//! # Where the time goes
//!
//! Profiled with `perf record --call-graph dwarf` on both processes of
//! `tern-bench load --transport iroh|raw-iroh --what unary|bulk` (a
//! `bench`-profile build; one load alone against a `tern-bench serve`
//! child), December 2026, on the shared 2-core development machine at a
//! load average of 5 to 7. Shares are of each process's CPU samples; the
//! machine's load makes latencies noisy (±20 % between back-to-back runs
//! of the same binary), so the figures below are shares and counts, which
//! the load moves far less.
//!
//! **Unary calls (64 B echo, one caller).** Neither stack's own code is
//! where the time goes. On the server, ours: kernel 40 % (`sendmsg`,
//! `recvmmsg`, epoll and futex wake-ups: every call is a cross-thread
//! wake-up on both sides), tokio 15 % (scheduling, the timer wheel of the
//! read, deadline and acknowledgement timeouts), `noq_proto` 12 %,
//! malloc/free/memcpy 12 %, `clock_gettime` 5 %, `noq` 2 %, this crate
//! 2.3 %, crypto (`ring`) 1.3 %. Raw iroh's server: kernel 52 %,
//! `noq_proto` 9 %, tokio 7 %, malloc/memcpy 3 %. The clients are 78 %
//! kernel either way (waiting and waking). So our per-call overhead over
//! raw is task hops and timers (a spawned task per stream, as raw; three
//! timeouts per call where raw has none) and allocations, not framing.
//! Allocations per call, both ends (`benches/allocs.rs`, a counting
//! allocator): 42.1 before this measurement, 16.3 for raw iroh. A malloc
//! uprobe (`perf probe -x libc.so.6 malloc`) named the sites: 6 per side
//! were `metrics` macros building a `Vec` of labels for frames, bytes and
//! calls in flight (now static keys, see [`metrics`]); 2 per side the
//! header's own `Bytes` and the send buffer's regrow for the payload
//! (`noq` copies writes under a packet anyway; small frames are now one
//! write, see [`wire`]); 1 a clone of iroh's `Connection`, which copies
//! its ALPN `Vec` (the pool now shares an `Arc`); 1 the sorted address
//! list the pool checked each call. Now **23.1 per call, raw iroh's plus
//! 6.8**: the goal is raw plus a small constant, and that constant is the
//! boxed call future, the per-method call metrics (`Vec` labels, 2 per
//! side, kept: method names are not literals) and the bench driver's
//! protobuf encode/decode, which our gRPC transport pays as well (gRPC:
//! 115 per call, raw tonic 76).
//!
//! **Bulk (1 MiB chunks, 4 in flight).** Ours and raw iroh move the same
//! (255 and 249 MB/s in the profiled runs) and spend alike: server
//! kernel 32 % (raw 40 %), `noq_proto` 20 % (23 %), `ring` AES-GCM 11 %
//! (17 %), memcpy/malloc 20 % (4 %), tokio 4 % (5 %). A third of our
//! server's memcpy (about 4 % of its CPU) is [`wire`] gathering a
//! payload that arrived as one chunk per QUIC packet into one `Bytes`
//! (raw iroh's `read_to_end` copies the same bytes); the rest is `noq`
//! moving datagrams from the socket to the connection task. On the
//! client, 60 % of memcpy is `noq` copying stream data into packets and
//! 28 % is the bench driver's protobuf encoding of the chunk (gRPC's too).
//! **Why raw QUIC bulk is about half of TLS over TCP here:** the work is
//! per packet, and a QUIC packet carries at most 1452 bytes (iroh
//! advertises a 1472-byte `max_udp_payload_size` and gives no way to raise
//! it, so MTU discovery cannot use loopback's 64 KiB), where TCP hands the
//! kernel 64 KiB segments and TLS seals 16 KiB records. Per 1452 bytes,
//! `noq` builds a packet, seals it (one AES-GCM call with its setup, 11x
//! more calls than TLS's records), protects its header, tracks it for
//! loss recovery and processes an ACK for it every other packet; the
//! receiver decrypts, parses frames and reassembles the stream in user
//! space, and each received batch hops from the endpoint's socket task to
//! the connection's task through a channel. GSO and GRO are on (one
//! `sendmsg`/`recvmmsg` per batch, and the kernel's UDP receive buffer
//! never overflowed: `RcvbufErrors` stayed 0), so syscalls are not the
//! cost; the CPU per byte is. Both processes are CPU-bound, so flow control
//! is not the limit: the stream window (2 MiB) exceeds a chunk, four
//! chunks in flight fit the 64 MiB connection window many times over, and
//! raw iroh with `noq`'s defaults (1.25 MB stream windows) moves no more.
//! Congestion control and pacing never bind on loopback (no loss, round
//! trips of tens of microseconds). What would move bulk is fewer, larger
//! packets (jumbo frames on a LAN, an endpoint option iroh does not
//! expose) or cheaper per-packet processing in `noq`, neither in this
//! crate.
//!
//! **Control calls during bulk.** Bulk has its own connection (see
//! [`client`]), so a control call never queues behind bulk data in a
//! congestion window: its p50 during bulk (58-166 µs in six runs) is
//! its idle p50 or better (the workers are awake). Its p99 (4-8 ms; gRPC
//! 4-9 ms in the same runs; raw iroh, on one shared connection, 37-71 ms)
//! is most likely the operating system's: with both cores busy moving
//! bulk bytes and the machine at a load of 6, a woken thread can wait
//! milliseconds for a core (not proven here: a scheduler trace on an idle
//! machine would). No queue in this crate holds control calls behind bulk
//! (the unchanged p50 says so too); the goal of a p99 within 1.1x of idle
//! can only be judged on an idle machine.
//!
//! # 0-RTT early data
//!
//! After every handshake the server's TLS stack gives the caller session
//! tickets (rustls keeps the server's half in memory: 256 sessions, each
//! ticket good once; iroh's endpoint keeps up to 8 per peer, 256 in all).
//! A caller that dials a peer it has reached before resumes the session,
//! and a **read-only** unary call that finds no pooled connection rides in
//! the first flight as 0-RTT early data; the server answers it at once
//! (0.5-RTT). Connection and call then cost one round trip and no
//! certificate signatures. Everything else waits for the handshake, as
//! before. A ticket lives as long as both endpoints: a restart on either
//! side (or an endpoint rebuild, see [`supervisor`]) loses it, and the
//! first call after that is a full handshake. So early data helps a
//! re-dial to a peer that is still running: after a path failure, a
//! partition, an idle close, or a connection the server refused at its
//! cap. Pooled connections themselves never close for idleness (a
//! keep-alive every [`config::DEFAULT_KEEP_ALIVE`]), so a member's
//! connection stays warm for as long as both ends run.
//!
//! **Why a replayed early-data call can never change state.** Early data
//! is not protected against replay: anyone on the path can record a first
//! flight and send it again, to this node, as often and as late as they
//! like. rustls's single-use tickets stop a replay to the same process
//! while its ticket is remembered (`tests/early_data.rs` sees that), but
//! nothing here depends on it. The rule is the server's:
//!
//! 1. A stream taken while the handshake still runs came in early data
//!    (iroh marks it, `RecvStream::is_0rtt`). Its method is looked up in
//!    this node's own catalogue from the frame's service and method ids;
//!    the caller's idea of the method counts for nothing.
//! 2. It runs at once only if the catalogue marks the method
//!    [`read_only`](tern_protocol::Method::read_only): `Health/Check`,
//!    `Status/Get`, `Vm/List`, `Vm/Get`, `Monitoring/Metrics`,
//!    `Cluster/Members`, `Cluster/MetaGet`, `Cluster/AccessList`,
//!    `Cluster/TokenList`, `Cluster/RolloutGet`. They change no state, so
//!    serving one once or a thousand times is the same; their answers are
//!    sealed with keys from the resumption secret, which a replayer does
//!    not hold, so it learns nothing either. Idempotent is not enough: a
//!    replayed `Vm/Create`, days later, would create the VM again.
//! 3. Every other call (writes, Raft, streams) waits until the handshake
//!    has finished **and** the connection is still open. Finishing needs
//!    the caller's `Finished` message, keyed by the resumption secret and
//!    the server's fresh key share: only the real caller, present now,
//!    can send it. A replayed first flight never finishes; its held calls
//!    are dropped unrun when the connection times out.
//! 4. The caller a service sees on an early call is the identity the
//!    session ticket carries: the key the caller proved in the full
//!    handshake the ticket came from (the ticket is sealed by this
//!    server). Roles are checked against it as for any call.
//!
//! The client keeps the same line: only a read-only unary call is sent
//! early; pings, streams and every other method wait for the handshake.
//! If the peer refuses the early data (it lost the ticket), nothing of it
//! was served, and the call is sent again on the finished connection.
//! Counted in `tern_iroh_early_data_calls_total{outcome}` (see
//! [`metrics`]). `tests/early_data.rs` attacks it: a caller that sends a
//! write in early data and never finishes its handshake (a relay passes
//! only its first flight) gets its read answered and its write dropped
//! unrun; recorded datagrams of a caller that wrote in early data,
//! replayed from another address while its connection is open and after,
//! run nothing again.
//!
//! # Deliberately absent
//!
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
