//! A single-node Raft: a whole Tern node (Raft on sled, both transports,
//! the services) started in-process as a one-node cluster, a write to its
//! replicated register, and a linearizable read of it.
//!
//! The node's configuration is the same typed `Config` that `tern run`
//! reads from TOML; with no `[cluster] join` the node creates a new
//! cluster and leads it. The example's own key is named in
//! `[access] admins`, which the first node grants when it creates the
//! cluster (a key without a role reaches only health). A `Cluster/MetaPut`
//! is one Raft write, acknowledged once it is committed (flushed by sled)
//! and applied; a `Cluster/MetaGet` reads at a read index the leader
//! confirmed, so it sees every write acknowledged before it.
//!
//! `cargo run -p tern-examples --example single_node_raft`

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tern_node::config::{Config, Listen, ListenConfig};
use tern_node::node::Node;
use tern_protocol::catalog::methods;
use tern_protocol::pb;
use tern_protocol::rpc::call_typed;
use tern_transport_grpc::{ClientConfig, GrpcClient};

/// Bound on one call (a write waits for the commit).
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the node gets to hand over and drain at shutdown.
const SHUTDOWN: Duration = Duration::from_secs(5);

/// Starts the node, writes `greeting = hello`, reads it back; returns the
/// read's value and the indexes of the write and the read.
async fn run() -> anyhow::Result<(String, u64, u64)> {
    let dir = tempfile::tempdir()?;
    let client_key: [u8; 32] = rand::random();
    let client_id = tern_transport_grpc::tls::peer_id_of_secret(&client_key);

    let loopback = Listen::On(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let mut config = Config {
        data_dir: dir.path().join("node"),
        listen: ListenConfig {
            grpc: loopback,
            iroh: loopback,
            metrics: Listen::Off,
        },
        ..Config::default()
    };
    config.access.admins = vec![client_id.to_string()];
    let node = Node::start(config.check()?).await?;

    let client = GrpcClient::new(ClientConfig::new(client_key));
    let peer = node.address().clone();
    let put: pb::MetaPutResponse = call_typed(
        &client,
        &peer,
        methods::CLUSTER_META_PUT,
        &pb::MetaPutRequest {
            request_id: "example-put-1".into(),
            key: "greeting".into(),
            value: "hello".into(),
            ..Default::default()
        },
        CALL_TIMEOUT,
    )
    .await?;
    let got: pb::MetaGetResponse = call_typed(
        &client,
        &peer,
        methods::CLUSTER_META_GET,
        &pb::MetaGetRequest {
            key: "greeting".into(),
            ..Default::default()
        },
        CALL_TIMEOUT,
    )
    .await?;

    client.close();
    node.shutdown(SHUTDOWN).await;
    Ok((got.value, put.index, got.read_index))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (value, written_at, read_at) = run().await?;
    println!("wrote greeting at log index {written_at}; read {value:?} at read index {read_at}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_is_read_back_linearizably() -> anyhow::Result<()> {
        let (value, written_at, read_at) = super::run().await?;
        assert_eq!(value, "hello");
        assert!(
            read_at >= written_at,
            "read {read_at} before write {written_at}"
        );
        Ok(())
    }
}
