//! The transport records under the shared metric names with
//! `transport="grpc"`: calls, latency, connections, bytes, failures and
//! refused proofs, as a Prometheus exporter renders them.
//!
//! Its own test binary: it installs the process-wide recorder.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::metric_names as names;
use tern_protocol::{Call, PeerAddr, PeerId, RpcClient, pb};
use tern_transport_conformance::service::TestService;
use tern_transport_grpc::{GrpcTransport, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_connections_and_failures_are_recorded_under_the_shared_names() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let server = GrpcTransport::bind(
            ServerConfig::new([1; 32], any),
            TestService::default().dispatcher(),
        )
        .await
        .unwrap();
        let caller = GrpcTransport::bind(
            ServerConfig::new([2; 32], any),
            TestService::default().dispatcher(),
        )
        .await
        .unwrap();
        let client = caller.client();
        let payload: Bytes = pb::RaftPayload {
            data: Bytes::from_static(b"hello"),
        }
        .encode_to_vec()
        .into();
        for _ in 0..3 {
            let call = Call::new(methods::RAFT_APPEND_ENTRIES, payload.clone())
                .with_timeout(Duration::from_secs(10));
            client.call(&server.peer_addr(), call).await.unwrap();
        }
        // A refused dial and a refused proof (another node's address).
        let stopped = GrpcTransport::bind(
            ServerConfig::new([3; 32], any),
            TestService::default().dispatcher(),
        )
        .await
        .unwrap();
        let stopped_addr = stopped.peer_addr();
        stopped.shutdown(Duration::from_secs(5)).await;
        let call = Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(Duration::from_secs(5));
        client.call(&stopped_addr, call).await.unwrap_err();
        let impostor_target = PeerAddr {
            grpc: Some(server.server().url()),
            ..PeerAddr::new(PeerId::from_bytes(stopped_addr.id.as_bytes().to_owned()))
        };
        let call = Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(Duration::from_secs(5));
        client.call(&impostor_target, call).await.unwrap_err();

        let text = handle.render();
        for name in [
            names::CALLS,
            names::CALL_SECONDS,
            names::CONNECT_SECONDS,
            names::CONNECTIONS_ACTIVE,
            names::CONNECT_FAILURES,
            names::CALL_FAILURES,
            names::MESSAGES,
            names::BYTES,
            names::AUTH_FAILURES,
            names::IN_FLIGHT,
            names::QUEUE_DEPTH,
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(name) && l.contains("transport=\"grpc\""))
                .unwrap_or_else(|| panic!("no {name} series with transport=\"grpc\" in:\n{text}"));
            assert!(!line.is_empty());
        }
        assert!(
            text.lines().any(|l| l.starts_with(names::CALLS)
                && l.contains("service=\"raft\"")
                && l.contains("method=\"AppendEntries\"")
                && l.contains("side=\"client\"")
                && l.contains("outcome=\"ok\"")
                && l.ends_with(" 3")),
            "three successful client calls in:\n{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with(names::CALL_FAILURES) && l.contains("kind=\"wrong_peer\"")),
            "a wrong-peer failure in:\n{text}"
        );
        caller.shutdown(Duration::from_secs(5)).await;
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .unwrap();
}
