//! The CLI's connection to a node: which node, over which transport, as
//! which identity.
//!
//! # Which node
//!
//! - `--node ID@URL` names it: `ID` is the node's 64-hex-digit identity,
//!   `URL` its gRPC URL (`https://127.0.0.1:7400`) or its iroh address
//!   (`127.0.0.1:7401`); both may be given, comma-separated
//!   (`ID@https://127.0.0.1:7400,127.0.0.1:7401`).
//! - `--data-dir DIR` (or `--config FILE`, which names the data dir) reads
//!   the addresses the running node wrote to `DIR/node.json`.
//! - Neither: `./tern-data`, where `tern run` without a config keeps its
//!   data.
//!
//! # Which identity
//!
//! Every call is authenticated on both transports, so the CLI needs a key.
//! With a data directory, the CLI uses **the node's own key** (local
//! admin): it calls as that node, a cluster member, which member-only
//! calls (`cluster leave`) need. Keep the data directory readable only by
//! the node's operator. Without one, the CLI uses a fresh key for the
//! call: an unknown key, which reaches health (and members, which joiners
//! need) and nothing else. Over iroh the CLI never presents a node's own
//! key: iroh cannot dial its own key, and a call to *another* node with it
//! would open a connection that node takes for the key's node (a node may
//! answer a peer over the connection that peer opened, so its Raft traffic
//! to that node would land in the CLI). A call over iroh with a data
//! directory and no `--key` is made with a fresh key instead; use `--key`
//! for what needs a role.
//!
//! `--key FILE` calls with that secret key instead (an operator's key,
//! written by `tern key new --out FILE` and granted a role by an admin);
//! it wins over the data directory's key. What a key may call is the
//! cluster's access table (`tern access list`): the first node's own key
//! is admin, other nodes' keys are members, a throw-away key reaches
//! health only.
//!
//! A member caller's VM write to a follower is answered
//! `FailedPrecondition` (a forward is never forwarded again); the CLI then
//! asks for the leader and repeats the call there, with the same request
//! id, so the retry is safe.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::peer::IrohAddr;
use tern_protocol::{Call, CallError, Code, Dispatcher, Method, PeerAddr, PeerId, RpcClient, pb};
use tern_transport_grpc::{ClientConfig, GrpcClient};
use tern_transport_iroh::config::SECRET_KEY_FILE;
use tern_transport_iroh::{IrohConfig, IrohTransport};

use crate::config::{Config, DEFAULT_DATA_DIR};
use crate::error::CliError;
use crate::node::NodeFile;

/// How long one CLI call waits for its answer: longer than a Raft write's
/// bound (8 s) plus a forward to the leader.
pub const CLI_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the CLI's own iroh endpoint gets to close.
pub const CLI_IROH_DRAIN: Duration = Duration::from_millis(200);

/// How to reach a node, from the command line.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `--node ID@URL[,ADDR]`.
    pub node: Option<String>,
    /// `--data-dir DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--transport grpc|iroh`.
    pub transport: Option<String>,
    /// `--key FILE`: call with this secret key (as `tern key new` writes
    /// it) instead of the node's or a throw-away one.
    pub key: Option<PathBuf>,
}

/// A resolved target: the node's address, the data dir (if known) and the
/// node file (if read).
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The node.
    pub peer: PeerAddr,
    /// Its data directory, when the CLI was pointed at one.
    pub data_dir: Option<PathBuf>,
    /// What the node wrote about itself, when read from its data dir.
    pub file: Option<NodeFile>,
}

/// Parses `ID@URL[,ADDR...]`.
pub fn parse_node(text: &str) -> Result<PeerAddr, CliError> {
    let (id, addrs) = text.split_once('@').ok_or_else(|| {
        CliError::Argument(format!(
            "--node {text:?}: expected ID@URL, e.g. <64 hex digits>@https://127.0.0.1:7400"
        ))
    })?;
    let id: PeerId = id
        .parse()
        .map_err(|e| CliError::Argument(format!("--node: the id: {e}")))?;
    let mut peer = PeerAddr::new(id);
    for a in addrs.split(',').filter(|a| !a.is_empty()) {
        if a.contains("://") {
            tern_transport_grpc::client::check_url(a)
                .map_err(|why| CliError::Argument(format!("--node: {why}")))?;
            peer.grpc = Some(a.to_owned());
        } else {
            let addr = a.parse().map_err(|e| {
                CliError::Argument(format!("--node: {a:?} is neither a gRPC URL (https://host:port) nor an iroh address (ip:port): {e}"))
            })?;
            peer.iroh
                .get_or_insert_with(IrohAddr::default)
                .direct
                .push(addr);
        }
    }
    if peer.grpc.is_none() && peer.iroh.is_none() {
        return Err(CliError::Argument(format!(
            "--node {text:?} names no address after the @"
        )));
    }
    Ok(peer)
}

impl Target {
    /// Finds the node's address.
    pub fn resolve(&self) -> Result<Resolved, CliError> {
        if let Some(node) = &self.node {
            return Ok(Resolved {
                peer: parse_node(node)?,
                data_dir: self.data_dir.clone(),
                file: None,
            });
        }
        let dir = match (&self.data_dir, &self.config) {
            (Some(d), _) => d.clone(),
            (None, Some(c)) => {
                Config::load(c)
                    .map_err(|e| CliError::File(e.to_string()))?
                    .config
                    .data_dir
            }
            (None, None) => PathBuf::from(DEFAULT_DATA_DIR),
        };
        let file = NodeFile::read(&dir).map_err(|e| {
            CliError::File(format!(
                "{e}\n  (or name the node with --node ID@https://HOST:PORT)"
            ))
        })?;
        Ok(Resolved {
            peer: file.peer_addr()?,
            data_dir: Some(dir),
            file: Some(file),
        })
    }
}

/// Random bytes from the kernel (`/dev/urandom`); without it, bytes
/// mixed from the clock and the process id (enough for a request id or a
/// throw-away CLI key, never for a node's identity).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut out = [0u8; N];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut out));
    if read.is_ok() {
        return out;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = t ^ (u128::from(std::process::id()) << 64);
    for (i, b) in out.iter_mut().enumerate() {
        *b = (seed >> ((i % 16) * 8)) as u8;
    }
    out
}

/// A fresh request id for a VM write.
pub fn request_id() -> String {
    format!("cli-{}", hex_of(&random_bytes::<12>()))
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The node key in `data_dir`, if it has one.
fn node_key(data_dir: &Path) -> Result<Option<[u8; 32]>, CliError> {
    read_key(&data_dir.join(SECRET_KEY_FILE))
}

/// Reads a secret key file (32 raw bytes, the node key's format).
pub fn read_key(path: &Path) -> Result<Option<[u8; 32]>, CliError> {
    match std::fs::read(path) {
        Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice())
            .map(Some)
            .map_err(|_| CliError::File(format!("{} is not a 32-byte key", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CliError::File(format!(
            "cannot read the node key {}: {e}; run the CLI as the node's user, or use --node without --data-dir",
            path.display()
        ))),
    }
}

fn public_id(secret: &[u8; 32]) -> PeerId {
    tern_transport_grpc::tls::peer_id_of_secret(secret)
}

/// Writes a fresh secret key to `path` (32 bytes from the kernel's
/// random source, owner-only permissions; an existing file is never
/// overwritten) and answers its public id, the value to grant roles to.
pub fn new_key_file(path: &Path) -> Result<PeerId, CliError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(|e| CliError::Setup(format!("cannot read /dev/urandom for a new key: {e}")))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            CliError::File(format!(
                "cannot create {}: {e} (an existing key file is never overwritten)",
                path.display()
            ))
        })?;
    file.write_all(&secret)
        .and_then(|()| file.sync_all())
        .map_err(|e| CliError::File(format!("cannot write {}: {e}", path.display())))?;
    Ok(public_id(&secret))
}

/// The public id of the secret key in `path`.
pub fn key_file_id(path: &Path) -> Result<PeerId, CliError> {
    let secret = read_key(path)?
        .ok_or_else(|| CliError::File(format!("{}: no such file", path.display())))?;
    Ok(public_id(&secret))
}

/// An open connection to one node.
pub struct Conn {
    client: Arc<dyn RpcClient>,
    iroh: Option<IrohTransport>,
    /// The node called.
    pub peer: PeerAddr,
    /// The target as resolved.
    pub resolved: Resolved,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.peer.id.short())
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Connects to the target over the chosen transport.
    pub async fn open(target: &Target) -> Result<Conn, CliError> {
        let resolved = target.resolve()?;
        let transport = target.transport.as_deref().unwrap_or("grpc");
        let mut key = match (&target.key, &resolved.data_dir) {
            (Some(file), _) => Some(read_key(file)?.ok_or_else(|| {
                CliError::File(format!(
                    "--key {}: no such file (write one with `tern key new --out FILE`)",
                    file.display()
                ))
            })?),
            (None, Some(d)) => node_key(d)?,
            (None, None) => None,
        }
        .unwrap_or_else(random_bytes::<32>);
        let mut peer = resolved.peer.clone();
        let (client, iroh): (Arc<dyn RpcClient>, Option<IrohTransport>) = match transport {
            "grpc" => {
                if peer.grpc.is_none() {
                    return Err(CliError::Setup(format!(
                        "node {} serves no gRPC (or its URL is unknown); try --transport iroh",
                        peer.id.short()
                    )));
                }
                peer.iroh = None;
                (Arc::new(GrpcClient::new(ClientConfig::new(key))), None)
            }
            "iroh" => {
                if peer.iroh.is_none() {
                    return Err(CliError::Setup(format!(
                        "node {} serves no iroh (or its address is unknown); try --transport grpc",
                        peer.id.short()
                    )));
                }
                peer.grpc = None;
                if target.key.is_none() || public_id(&key) == peer.id {
                    // Never a node's own key over iroh, nor the peer's own
                    // (see the module docs).
                    key = random_bytes::<32>();
                }
                let t = IrohTransport::bind(IrohConfig::new(key), Arc::new(Dispatcher::new()))
                    .await
                    .map_err(|e| {
                        CliError::Setup(format!("starting the CLI's iroh endpoint: {e}"))
                    })?;
                (t.client(), Some(t))
            }
            other => {
                return Err(CliError::Argument(format!(
                    "--transport {other:?}: expected \"grpc\" or \"iroh\""
                )));
            }
        };
        Ok(Conn {
            client,
            iroh,
            peer,
            resolved,
        })
    }

    /// Closes the connection.
    pub async fn close(self) {
        if let Some(t) = self.iroh {
            t.shutdown(CLI_IROH_DRAIN).await;
        }
    }

    /// Calls `method` on `peer`.
    pub async fn call_at<Req: Message, Resp: Message + Default>(
        &self,
        peer: &PeerAddr,
        method: &'static Method,
        req: &Req,
    ) -> Result<Resp, CallError> {
        tern_protocol::rpc::call_typed(self.client.as_ref(), peer, method, req, CLI_CALL_TIMEOUT)
            .await
    }

    /// Calls `method` on the node; a `FailedPrecondition` (not the leader)
    /// is repeated once at the leader the node names.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &'static Method,
        req: &Req,
    ) -> Result<Resp, CliError> {
        match self.call_at(&self.peer, method, req).await {
            Ok(r) => Ok(r),
            Err(CallError::Application(s)) if s.code == Code::FailedPrecondition => {
                let leader = self.leader().await.map_err(|e| {
                    CliError::Node(format!(
                        "{}: {}; and finding the leader failed: {e}",
                        method.label(),
                        s
                    ))
                })?;
                self.call_at(&leader, method, req)
                    .await
                    .map_err(|e| explain(method, &e))
            }
            Err(e) => Err(explain(method, &e)),
        }
    }

    /// The leader's address as the node knows it, reduced to the
    /// transport this connection uses.
    pub async fn leader(&self) -> Result<PeerAddr, CliError> {
        let members: pb::MembersResponse = self
            .call_at(&self.peer, methods::CLUSTER_MEMBERS, &pb::MembersRequest {})
            .await
            .map_err(|e| explain(methods::CLUSTER_MEMBERS, &e))?;
        let m = members
            .members
            .iter()
            .find(|m| m.node_id == members.leader_id && members.leader_id != 0)
            .and_then(|m| m.address.as_ref())
            .ok_or_else(|| CliError::Node("the node knows no leader right now (an election may be running); retry in a few seconds".into()))?;
        let mut addr = PeerAddr::try_from(m).map_err(|e| {
            CliError::Node(format!(
                "the node names its leader with an unusable address: {e}"
            ))
        })?;
        if self.peer.grpc.is_none() {
            addr.grpc = None;
        }
        if self.peer.iroh.is_none() {
            addr.iroh = None;
        }
        Ok(addr)
    }

    /// Opens a streaming call to `peer` (`tern vm watch`).
    pub async fn open_stream(
        &self,
        peer: &PeerAddr,
        call: tern_protocol::StreamCall,
    ) -> Result<tern_protocol::CallStream, CallError> {
        self.client.open_stream(peer, call).await
    }

    /// Sends raw bytes (for tests of the CLI itself).
    pub async fn raw(&self, method: &'static Method, payload: Bytes) -> Result<Bytes, CallError> {
        self.client
            .call(
                &self.peer,
                Call::new(method, payload).with_timeout(CLI_CALL_TIMEOUT),
            )
            .await
    }
}

/// A call error in words, with what to do next.
pub fn explain(method: &Method, e: &CallError) -> CliError {
    match e {
        CallError::Application(s) => {
            let hint = match s.code {
                Code::NotFound => " (check the id with `tern vm list`)",
                Code::InvalidArgument => " (fix the named field and retry)",
                Code::PermissionDenied => {
                    " (the key this CLI calls with lacks the role: `tern access list` shows who holds what; an admin grants a role with `tern access grant KEY ROLE`; call with --key FILE, or --data-dir of the cluster's first node, whose key is admin)"
                }
                Code::Unavailable => " (the node is starting or has no quorum; retry shortly)",
                Code::FailedPrecondition => " (retry at the leader: see `tern cluster members`)",
                Code::ResourceExhausted if method == methods::VM_WATCH => {
                    " (resume with `tern vm watch --since REV`, the last revision printed)"
                }
                Code::ResourceExhausted => " (no node has room: free capacity or add a node)",
                Code::OutOfRange => {
                    " (list the VMs with `tern vm list`, then watch with --since the revision it prints)"
                }
                _ => "",
            };
            CliError::Call {
                method: method.label(),
                detail: s.to_string(),
                hint,
            }
        }
        CallError::Transport(t) => CliError::Call {
            method: method.label(),
            detail: t.to_string(),
            hint: " (is the node running and reachable at this address? `tern run` writes its addresses to DATA_DIR/node.json)",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_parse_with_either_or_both_transports() {
        let id = "ab".repeat(32);
        let p = parse_node(&format!("{id}@https://127.0.0.1:7400")).unwrap();
        assert_eq!(p.grpc.as_deref(), Some("https://127.0.0.1:7400"));
        // Cleartext is refused, saying why and what to write instead.
        let e = parse_node(&format!("{id}@http://127.0.0.1:7400"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("TLS only") && e.contains("https://127.0.0.1:7400"),
            "{e}"
        );
        assert!(p.iroh.is_none());
        let p = parse_node(&format!("{id}@https://127.0.0.1:7400,127.0.0.1:7401")).unwrap();
        assert_eq!(
            p.iroh.unwrap().direct,
            vec!["127.0.0.1:7401".parse::<std::net::SocketAddr>().unwrap()]
        );
        assert!(
            parse_node("no-at-sign")
                .unwrap_err()
                .to_string()
                .contains("ID@URL")
        );
        assert!(
            parse_node("abc@https://x:1")
                .unwrap_err()
                .to_string()
                .contains("id")
        );
        assert!(
            parse_node(&format!("{id}@"))
                .unwrap_err()
                .to_string()
                .contains("no address")
        );
        assert!(
            parse_node(&format!("{id}@localhost"))
                .unwrap_err()
                .to_string()
                .contains("neither")
        );
    }

    #[test]
    fn request_ids_differ() {
        assert_ne!(request_id(), request_id());
        assert!(request_id().starts_with("cli-"));
    }
}
