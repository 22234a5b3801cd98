//! The etcd baseline of `tern-bench cluster`: 3 etcd members (the Debian
//! `etcd-server` package, 3.4, default settings, so fsync on) on
//! loopback, driven through etcd's own gRPC API with the same writers,
//! value size, run length and failover procedure as Tern's rows.
//!
//! The client speaks etcd's v3 API directly with tonic: the two calls the
//! bench needs (`etcdserverpb.KV/Put` and `etcdserverpb.Maintenance/Status`)
//! are declared below as prost messages with the field numbers of etcd's
//! `rpc.proto`, so no `protoc` and no second gRPC stack are needed.
//! Puts go to the leader, as Tern's do; during a failover, probes go to
//! the survivors (an etcd follower forwards a put to its leader).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

/// The etcd binary the bench runs (Debian's `etcd-server` installs it).
pub const ETCD: &str = "etcd";
/// How long a member may take to answer its first status call.
pub const START_BOUND: Duration = Duration::from_secs(30);
/// Timeout of one status call.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    /// The cluster's id.
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    /// The member that answered.
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    /// The store's revision after the request.
    #[prost(int64, tag = "3")]
    pub revision: i64,
    /// The Raft term the member was in.
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// `etcdserverpb.PutRequest` (the fields the bench sets).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `etcdserverpb.PutResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    /// Who answered, at which revision.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// `etcdserverpb.StatusRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

/// `etcdserverpb.StatusResponse` (the fields the bench reads).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    /// Who answered.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// The etcd version.
    #[prost(string, tag = "2")]
    pub version: String,
    /// The member id of the leader this member knows (0: none).
    #[prost(uint64, tag = "4")]
    pub leader: u64,
}

async fn unary<Req, Resp>(
    channel: &Channel,
    path: &'static str,
    req: Req,
    timeout: Duration,
) -> Result<Resp, String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let call = async {
        grpc.ready()
            .await
            .map_err(|e| format!("etcd not ready: {e}"))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        grpc.unary(
            tonic::Request::new(req),
            PathAndQuery::from_static(path),
            codec,
        )
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("etcd {path}: {}: {}", s.code(), s.message()))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("etcd {path}: no answer within {timeout:?}"))?
}

/// One acknowledged put (committed by etcd's Raft and fsynced).
pub async fn put(
    channel: &Channel,
    key: &str,
    value: &str,
    timeout: Duration,
) -> Result<PutResponse, String> {
    let req = PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    };
    unary(channel, "/etcdserverpb.KV/Put", req, timeout).await
}

/// A member's status.
pub async fn status(channel: &Channel) -> Result<StatusResponse, String> {
    unary(
        channel,
        "/etcdserverpb.Maintenance/Status",
        StatusRequest {},
        STATUS_TIMEOUT,
    )
    .await
}

/// One etcd member.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    channel: Channel,
    child: Option<tokio::process::Child>,
}

/// Three (or more) etcd members on loopback, each with its own data
/// directory and log under `dir`; killed when dropped.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl EtcdCluster {
    /// Whether the etcd binary can be run here.
    pub fn available() -> bool {
        std::process::Command::new(ETCD)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Starts `size` members and waits until they agree on a leader.
    pub async fn start(dir: &Path, size: usize) -> anyhow::Result<EtcdCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut members = Vec::new();
        for i in 0..size {
            let client_port = free_port()?;
            let peer_port = free_port()?;
            let channel = Endpoint::from_shared(format!("http://127.0.0.1:{client_port}"))?
                .tcp_nodelay(true)
                .connect_lazy();
            members.push(Member {
                name: format!("etcd{}", i + 1),
                client_port,
                peer_port,
                channel,
                child: None,
            });
        }
        let mut cluster = EtcdCluster {
            dir: dir.to_owned(),
            members,
        };
        for i in 0..size {
            cluster.start_member(i)?;
        }
        cluster.wait_leader().await?;
        Ok(cluster)
    }

    /// Starts (or restarts, on its data) member `i`.
    pub fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &mut self.members[i];
        let data = self.dir.join(&m.name);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name)))
            .context("creating an etcd log")?;
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = tokio::process::Command::new(ETCD)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tern-bench"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting `{ETCD}` (install Debian's etcd-server package)"))?;
        m.child = Some(child);
        Ok(())
    }

    /// SIGKILLs member `i` and reaps it.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.members[i].child.take() {
            child.kill().await.context("killing an etcd member")?;
        }
        Ok(())
    }

    /// The client channel of member `i`.
    pub fn channel(&self, i: usize) -> Channel {
        self.members[i].channel.clone()
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The leader's index once every running member answers and names
    /// the same leader.
    pub async fn wait_leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + START_BOUND;
        loop {
            let last = match self.leader_now().await {
                Ok(Some(i)) => return Ok(i),
                Ok(None) => "no agreed leader yet".to_owned(),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                bail!(
                    "etcd did not elect a leader within {START_BOUND:?} (last: {last}; logs in {})",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn leader_now(&self) -> Result<Option<usize>, String> {
        let mut leader = None;
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let s = status(&m.channel).await?;
            if s.leader == 0 || leader.is_some_and(|l| l != s.leader) {
                return Ok(None);
            }
            leader = Some(s.leader);
        }
        let Some(leader) = leader else {
            return Ok(None);
        };
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let s = status(&m.channel).await?;
            if s.header.is_some_and(|h| h.member_id == leader) {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}
