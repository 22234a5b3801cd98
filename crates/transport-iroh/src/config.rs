//! Configuration of the iroh transport and the node's persistent identity.
//!
//! Every limit the transport enforces is a field of [`TransportLimits`]
//! whose default is a named constant that says why it has that value.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_protocol::Priority;
use tern_protocol::frame::Limits;

/// Name of the file, in the node's data directory, that holds the node's
/// 32-byte Ed25519 secret key.
pub const SECRET_KEY_FILE: &str = "iroh.secret";

/// Concurrent calls a client keeps in flight to one peer in the control
/// lane (Raft votes, heartbeats): a handful per peer at any time, so 32 is
/// ample while keeping the lane's stream credit small.
pub const DEFAULT_CONTROL_IN_FLIGHT: usize = 32;
/// Concurrent append-entries calls to one peer: Raft pipelines a few
/// batches per follower; 64 leaves room for catch-up bursts.
pub const DEFAULT_REPLICATION_IN_FLIGHT: usize = 64;
/// Concurrent service calls to one peer. Services are many and small;
/// 256 matches the conformance suite's concurrency and a busy node.
pub const DEFAULT_NORMAL_IN_FLIGHT: usize = 256;
/// Concurrent bulk chunks to one peer: bulk wants throughput, which a few
/// streams already saturate; more would only hold more memory.
pub const DEFAULT_BULK_IN_FLIGHT: usize = 16;

/// Calls that may wait for a lane's in-flight slot to one peer before new
/// calls are refused as `Overloaded`: a bounded queue, so a slow peer makes
/// callers fail fast instead of piling up without end.
pub const DEFAULT_LANE_QUEUE: usize = 1024;

/// Bidirectional streams a peer may have open to us at once (QUIC
/// `max_concurrent_bidi_streams`). It is at least the sum of a client's
/// lanes (32 + 64 + 256 + 16 = 368), so a peer running our defaults never
/// has `open_bi` wait for stream credit: a control call never queues
/// behind bulk at the QUIC level. iroh's default (100) would make the 101st
/// `open_bi` wait.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 512;

/// Calls a server runs at once for one connection; streams beyond it are
/// answered `ResourceExhausted` without running. Equal to the stream limit,
/// so it only bites when configured lower.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION: usize = 512;

/// Connections the server serves at once; further incoming connections are
/// refused. A cluster has tens of nodes; 1024 leaves room for clients.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Connections one peer id may hold to a server at once: a client keeps
/// two per peer (control and bulk), plus reconnects racing the old
/// connection's close and a CLI using the node's own key.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 16;

/// Request bytes one peer id may have in flight on a server (read and not
/// yet answered), over all its connections. A request whose payload does
/// not fit is answered `ResourceExhausted` before its payload is read.
/// Holds four maximal frames at once.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES_PER_PEER: usize =
    4 * tern_protocol::frame::DEFAULT_MAX_PAYLOAD as usize;

/// Peers a client keeps state (a pooled connection and its lanes) for.
/// Beyond it, calls to new peers fail as `Overloaded` rather than growing
/// memory without bound.
pub const DEFAULT_MAX_PEERS: usize = 4096;

/// A connection with no traffic for this long is dead. Keep-alives run far
/// more often, so only a lost peer or path reaches it. Short, because
/// iroh connections can look open while dead and callers have deadlines.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval of QUIC keep-alive packets: a third of the idle timeout, so two
/// can be lost without the connection timing out.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_millis(3_333);

/// Longest a server waits for a request frame's bytes after its stream
/// opened. A peer that opens streams and sends nothing cannot hold
/// in-flight slots longer than this. Long enough for a maximal frame
/// (16 MiB by default) on a slow link.
pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest a server waits, after writing a response, for the peer to
/// acknowledge it. Shutdown drains only after this, so answered calls are
/// not lost when the connection closes right after.
pub const DEFAULT_RESPONSE_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Stream openings that may wait for a lane's in-flight slot to one peer
/// before new ones are refused as `Overloaded`. Larger than
/// [`DEFAULT_LANE_QUEUE`]: a waiting opening costs a few hundred bytes,
/// and a node fanning out many short streams (a watch per client, 10,000
/// in the conformance suite) should queue them, not fail them; still
/// bounded.
pub const DEFAULT_STREAM_OPEN_QUEUE: usize = 16 * 1024;

/// QUIC stream receive window: the per-stream window of the stream
/// contract ([`tern_protocol::stream::STREAM_WINDOW`]), applied to every
/// stream (unary calls read their request at once, so it costs them
/// nothing).
pub const DEFAULT_STREAM_WINDOW: u32 = tern_protocol::stream::STREAM_WINDOW;

/// QUIC connection receive window: the most bytes all streams of one
/// connection may have buffered unread at the receiver. quinn's default is
/// unlimited, which lets one peer's stalled streams pin
/// `max_concurrent_streams × stream window` (1 GiB) of our memory. 64 MiB
/// bounds that, and still lets 32 streams stall at a full window before
/// the connection's other streams (control calls share the connection)
/// would wait for credit.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

const _: () = assert!(
    DEFAULT_CONNECTION_WINDOW >= 32 * DEFAULT_STREAM_WINDOW,
    "a few stalled streams must not stall their connection"
);
const _: () = assert!(DEFAULT_STREAM_OPEN_QUEUE >= DEFAULT_LANE_QUEUE);

const _: () = assert!(
    DEFAULT_CONTROL_IN_FLIGHT
        + DEFAULT_REPLICATION_IN_FLIGHT
        + DEFAULT_NORMAL_IN_FLIGHT
        + DEFAULT_BULK_IN_FLIGHT
        <= DEFAULT_MAX_CONCURRENT_STREAMS as usize,
    "a client's lanes must fit in a server's stream credit, or control waits behind bulk"
);
const _: () = assert!(DEFAULT_KEEP_ALIVE.as_millis() * 3 <= DEFAULT_IDLE_TIMEOUT.as_millis());
const _: () = assert!(
    DEFAULT_MAX_IN_FLIGHT_BYTES_PER_PEER >= tern_protocol::frame::DEFAULT_MAX_PAYLOAD as usize,
    "one maximal request must fit in a peer's byte budget"
);

/// The transport's named limits. [`Default`] gives the constants above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportLimits {
    /// In-flight calls per peer, per priority lane, indexed by
    /// `Priority as usize` (control, replication, normal, bulk).
    pub lane_in_flight: [usize; 4],
    /// Calls that may wait for a lane slot before `Overloaded`.
    pub lane_queue: usize,
    /// QUIC `max_concurrent_bidi_streams` granted to each peer.
    pub max_concurrent_streams: u32,
    /// Calls served at once per connection.
    pub max_in_flight_per_connection: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once per peer id.
    pub max_connections_per_peer: usize,
    /// Request bytes in flight per peer id.
    pub max_in_flight_bytes_per_peer: usize,
    /// Peers a client keeps pooled state for.
    pub max_peers: usize,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// Longest wait for a request's bytes on the server.
    pub request_read_timeout: Duration,
    /// Longest wait for the acknowledgement of a response.
    pub response_ack_timeout: Duration,
    /// Stream openings that may wait for a lane slot before `Overloaded`.
    pub stream_open_queue: usize,
    /// QUIC stream receive window (bytes).
    pub stream_window: u32,
    /// QUIC connection receive window (bytes).
    pub connection_window: u32,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            lane_in_flight: [
                DEFAULT_CONTROL_IN_FLIGHT,
                DEFAULT_REPLICATION_IN_FLIGHT,
                DEFAULT_NORMAL_IN_FLIGHT,
                DEFAULT_BULK_IN_FLIGHT,
            ],
            lane_queue: DEFAULT_LANE_QUEUE,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_in_flight_per_connection: DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_in_flight_bytes_per_peer: DEFAULT_MAX_IN_FLIGHT_BYTES_PER_PEER,
            max_peers: DEFAULT_MAX_PEERS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            request_read_timeout: DEFAULT_REQUEST_READ_TIMEOUT,
            response_ack_timeout: DEFAULT_RESPONSE_ACK_TIMEOUT,
            stream_open_queue: DEFAULT_STREAM_OPEN_QUEUE,
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
        }
    }
}

impl TransportLimits {
    /// In-flight calls per peer in `lane`.
    pub fn lane(&self, lane: Priority) -> usize {
        self.lane_in_flight[lane as usize]
    }

    /// Checks the limits for values that cannot work.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.lane_in_flight.contains(&0) {
            return Err(LimitsError::NoLaneCalls);
        }
        if self.max_concurrent_streams == 0 || self.max_in_flight_per_connection == 0 {
            return Err(LimitsError::NoStreams);
        }
        if self.max_connections == 0 || self.max_peers == 0 {
            return Err(LimitsError::NoConnections);
        }
        if self.stream_window == 0 || self.connection_window < self.stream_window {
            return Err(LimitsError::Windows {
                stream: self.stream_window,
                connection: self.connection_window,
            });
        }
        if self.keep_alive >= self.idle_timeout {
            return Err(LimitsError::KeepAlive {
                keep_alive: self.keep_alive,
                idle_timeout: self.idle_timeout,
            });
        }
        Ok(())
    }
}

/// Why [`TransportLimits`] cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// A lane allows no call in flight.
    #[error("every lane needs at least one in-flight call")]
    NoLaneCalls,
    /// A connection would accept no stream.
    #[error("a server must accept at least one stream per connection")]
    NoStreams,
    /// No connection or no peer allowed.
    #[error("max_connections and max_peers must be at least 1")]
    NoConnections,
    /// The stream window is zero or above the connection window.
    #[error(
        "stream_window ({stream}) must be at least 1 byte and at most connection_window \
         ({connection})"
    )]
    Windows {
        /// `stream_window`.
        stream: u32,
        /// `connection_window`.
        connection: u32,
    },
    /// Keep-alives would come too late to keep the connection open.
    #[error(
        "keep_alive ({} ms) must be shorter than idle_timeout ({} ms)",
        keep_alive.as_millis(),
        idle_timeout.as_millis()
    )]
    KeepAlive {
        /// `keep_alive`.
        keep_alive: Duration,
        /// `idle_timeout`.
        idle_timeout: Duration,
    },
}

/// Everything [`crate::IrohTransport::bind`] needs.
#[derive(Clone)]
pub struct IrohConfig {
    /// The node's Ed25519 secret key: its identity ([`load_or_create_secret_key`]).
    pub secret_key: [u8; 32],
    /// Where the endpoint's UDP socket binds; port 0 picks a free port.
    pub bind_addr: SocketAddr,
    /// A relay server to use (enables relaying and hole punching). `None`,
    /// the default, contacts no relay at all. The endpoint also asks the
    /// relay's host for its public address (QUIC address discovery) on
    /// UDP port 7842, iroh's default, so a relay should serve QUIC there.
    /// A peer whose address names no relay is looked for on this one.
    pub relay_url: Option<String>,
    /// DER certificate of a private CA the relay's TLS certificate is
    /// signed by (a lab relay); `None` uses the system's roots.
    pub relay_ca_der: Option<Vec<u8>>,
    /// Frame limits (largest payload) for both directions.
    pub frame_limits: Limits,
    /// The transport's named limits.
    pub limits: TransportLimits,
}

impl std::fmt::Debug for IrohConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrohConfig")
            .field("secret_key", &"<redacted>")
            .field("bind_addr", &self.bind_addr)
            .field("relay_url", &self.relay_url)
            .field("relay_ca_der", &self.relay_ca_der.as_ref().map(Vec::len))
            .field("frame_limits", &self.frame_limits)
            .field("limits", &self.limits)
            .finish()
    }
}

impl IrohConfig {
    /// A configuration with this identity, bound to `127.0.0.1:0`, no relay
    /// and default limits.
    pub fn new(secret_key: [u8; 32]) -> IrohConfig {
        IrohConfig {
            secret_key,
            bind_addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
            relay_url: None,
            relay_ca_der: None,
            frame_limits: Limits::default(),
            limits: TransportLimits::default(),
        }
    }

    /// The same configuration bound to `addr`.
    pub fn with_bind_addr(mut self, addr: SocketAddr) -> IrohConfig {
        self.bind_addr = addr;
        self
    }
}

/// Loads the node's secret key from `data_dir`, or creates one there on
/// first start.
///
/// The key lives in [`SECRET_KEY_FILE`] as 32 raw bytes, created with mode
/// 0600 (written to a temporary file first and renamed, so a crash never
/// leaves half a key). The same key, so the same `EndpointId`, comes back
/// after every restart. A file of the wrong size is an error, never
/// silently replaced: replacing it would change the node's identity.
pub fn load_or_create_secret_key(data_dir: &Path) -> io::Result<[u8; 32]> {
    let path = data_dir.join(SECRET_KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            warn_if_readable_by_others(&path);
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} holds {} bytes, not a 32-byte secret key; refusing to replace \
                         it, since that would change this node's identity",
                        path.display(),
                        bytes.len()
                    ),
                )
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)?;
            let key = iroh::SecretKey::generate().to_bytes();
            write_private(&path, &key)?;
            tracing::info!(path = %path.display(), "created a new node identity");
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the node's secret key is readable by other users; chmod 600 it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_with_mode_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        let first = load_or_create_secret_key(&data).unwrap();
        let second = load_or_create_secret_key(&data).unwrap();
        assert_eq!(first, second, "same key after a restart");
        let id = |k: &[u8; 32]| iroh::SecretKey::from_bytes(k).public();
        assert_eq!(id(&first), id(&second), "same EndpointId after a restart");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(data.join(SECRET_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let other = load_or_create_secret_key(&dir.path().join("other")).unwrap();
        assert_ne!(first, other, "each new node gets its own key");
    }

    #[test]
    fn a_damaged_key_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SECRET_KEY_FILE), b"short").unwrap();
        let err = load_or_create_secret_key(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            std::fs::read(dir.path().join(SECRET_KEY_FILE)).unwrap(),
            b"short"
        );
    }

    #[test]
    fn limits_validate() {
        assert_eq!(TransportLimits::default().validate(), Ok(()));
        let mut bad = TransportLimits::default();
        bad.lane_in_flight[Priority::Control as usize] = 0;
        assert_eq!(bad.validate(), Err(LimitsError::NoLaneCalls));
        let bad = TransportLimits {
            keep_alive: Duration::from_secs(20),
            ..TransportLimits::default()
        };
        assert!(matches!(bad.validate(), Err(LimitsError::KeepAlive { .. })));
    }
}
