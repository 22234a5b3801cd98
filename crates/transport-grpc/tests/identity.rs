//! Caller and callee identity over gRPC, attacked with hand-made metadata
//! on real servers: a forged claim, a stale timestamp, replays to another
//! method, node or the same method, and no proof at all are all refused
//! with `Unauthenticated` before any service runs. Also: the client refuses
//! a different node at a peer's address, and keeps each priority lane on its
//! own connection.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tern_protocol::catalog::methods;
use tern_protocol::{
    Call, CallError, Delivery, PeerAddr, Priority, RpcClient, TransportErrorKind, pb,
};
use tern_transport_conformance::service::{Counters, TestService};
use tern_transport_grpc::auth::{self, Identity, MAX_CLOCK_SKEW, NONCE_LEN, ResponseIdentity};
use tern_transport_grpc::services::raft_client::RaftClient;
use tern_transport_grpc::{GrpcTransport, ServerConfig};
use tonic::transport::Channel;

const DRAIN: Duration = Duration::from_secs(5);
const VOTE: &str = "/tern.v1.Raft/Vote";

async fn node(secret: [u8; 32], service: &TestService) -> GrpcTransport {
    GrpcTransport::bind(
        ServerConfig::new(secret, SocketAddr::from(([127, 0, 0, 1], 0))),
        service.dispatcher(),
    )
    .await
    .unwrap()
}

async fn raw_client(node: &GrpcTransport) -> RaftClient<Channel> {
    RaftClient::connect(node.server().url()).await.unwrap()
}

fn with_proof(proof: &auth::RequestProof) -> tonic::Request<pb::RaftPayload> {
    let mut request = tonic::Request::new(pb::RaftPayload::default());
    proof.write(request.metadata_mut().as_mut());
    request
}

fn fresh_nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

fn expect_unauthenticated<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    what: &str,
) -> tonic::Status {
    match result {
        Err(status) if status.code() == tonic::Code::Unauthenticated => status,
        other => panic!("{what}: expected Unauthenticated, got {other:?}"),
    }
}

async fn with_timeout<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test finished in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_replayed_and_anonymous_calls_are_refused() {
    with_timeout(async {
        let service = TestService::default();
        let server = node([1; 32], &service).await;
        let other = node([2; 32], &TestService::default()).await;
        let a = Identity::from_secret(&[10; 32]);
        let b = Identity::from_secret(&[11; 32]);
        let mut raw = raw_client(&server).await;
        let now = auth::unix_now_ms();

        // A valid request first: the service sees A.
        let proof = a
            .sign_request(server.id(), VOTE, now, fresh_nonce())
            .unwrap();
        let answer = raw.vote(with_proof(&proof)).await.unwrap();
        assert_eq!(answer.get_ref().data.as_ref(), a.id().as_bytes());
        assert_eq!(Counters::get(&service.counters.started), 1);

        // The same request again (a replay to the same node and method).
        expect_unauthenticated(raw.vote(with_proof(&proof)).await, "exact replay");

        // Made by A, claiming to be B.
        let mut forged = a
            .sign_request(server.id(), VOTE, now, fresh_nonce())
            .unwrap();
        forged.caller = b.id();
        let status = expect_unauthenticated(raw.vote(with_proof(&forged)).await, "forged caller");
        assert!(status.message().contains("does not verify"), "{status:?}");

        // Stale and future timestamps.
        let skew = u64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap();
        for ts in [now - 2 * skew, now + 2 * skew] {
            let stale = a
                .sign_request(server.id(), VOTE, ts, fresh_nonce())
                .unwrap();
            let status =
                expect_unauthenticated(raw.vote(with_proof(&stale)).await, "stale timestamp");
            assert!(status.message().contains("timestamp"), "{status:?}");
        }

        // Made for Vote, sent to AppendEntries.
        let vote_proof = a
            .sign_request(server.id(), VOTE, now, fresh_nonce())
            .unwrap();
        let mut request = tonic::Request::new(pb::RaftPayload::default());
        vote_proof.write(request.metadata_mut().as_mut());
        expect_unauthenticated(
            raw.append_entries(request).await,
            "replay to another method",
        );

        // Made for `other`, sent to `server`: refused, and the refusal is
        // proven by `server`, so a client learns it reached another node.
        let nonce = fresh_nonce();
        let misdirected = a.sign_request(other.id(), VOTE, now, nonce).unwrap();
        let status = expect_unauthenticated(
            raw.vote(with_proof(&misdirected)).await,
            "replay to another node",
        );
        assert_eq!(
            a.verify_response(status.metadata().as_ref(), other.id(), &nonce, VOTE),
            ResponseIdentity::OtherNode(server.id())
        );

        // No proof at all.
        expect_unauthenticated(
            raw.vote(tonic::Request::new(pb::RaftPayload::default()))
                .await,
            "anonymous",
        );

        assert_eq!(
            Counters::get(&service.counters.started),
            1,
            "a refused request reached the service"
        );
        server.shutdown(DRAIN).await;
        other.shutdown(DRAIN).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_node_at_the_address_is_a_wrong_peer() {
    with_timeout(async {
        let impostor_service = TestService::default();
        let impostor = node([3; 32], &impostor_service).await;
        let caller = node([4; 32], &TestService::default()).await;
        let expected = Identity::from_secret(&[5; 32]).id();
        let addr = PeerAddr {
            grpc: Some(impostor.server().url()),
            ..PeerAddr::new(expected)
        };
        let call =
            Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(Duration::from_secs(10));
        let err = caller.client().call(&addr, call).await.unwrap_err();
        match err {
            CallError::Transport(e) => {
                assert_eq!(e.kind, TransportErrorKind::WrongPeer, "{e}");
                assert_eq!(e.delivery, Delivery::NotDelivered, "{e}");
            }
            other => panic!("expected WrongPeer, got {other}"),
        }
        assert_eq!(Counters::get(&impostor_service.counters.started), 0);
        caller.shutdown(DRAIN).await;
        impostor.shutdown(DRAIN).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_pooled_per_peer_and_priority_lane() {
    with_timeout(async {
        let server = node([6; 32], &TestService::default()).await;
        let caller = node([7; 32], &TestService::default()).await;
        let client = caller.client();
        let payload: Bytes = prost::Message::encode_to_vec(&pb::RaftPayload {
            data: Bytes::from_static(b"x"),
        })
        .into();
        for _ in 0..10 {
            let call = Call::new(methods::RAFT_APPEND_ENTRIES, payload.clone())
                .with_timeout(Duration::from_secs(10));
            client.call(&server.peer_addr(), call).await.unwrap();
        }
        assert_eq!(
            client.pooled_channels(),
            1,
            "ten replication calls, one connection"
        );
        let bulk = Call::new(methods::RAFT_APPEND_ENTRIES, payload)
            .with_timeout(Duration::from_secs(10))
            .with_priority(Priority::Bulk);
        client.call(&server.peer_addr(), bulk).await.unwrap();
        assert_eq!(client.pooled_channels(), 2, "bulk has its own connection");
        let rtt = client
            .ping(&server.peer_addr(), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(rtt > Duration::ZERO);
        assert_eq!(client.pooled_channels(), 3, "ping uses the control lane");
        let vote =
            Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(Duration::from_secs(10));
        client.call(&server.peer_addr(), vote).await.unwrap();
        assert_eq!(
            client.pooled_channels(),
            3,
            "a vote shares the control lane"
        );
        let addr = server.peer_addr();
        caller.shutdown(DRAIN).await;
        server.shutdown(DRAIN).await;
        let after = Call::new(methods::RAFT_VOTE, Bytes::new());
        let err = client.call(&addr, after).await.unwrap_err();
        assert_eq!(
            err.as_transport().map(|e| e.kind),
            Some(TransportErrorKind::LocalShutdown),
            "{err}"
        );
    })
    .await;
}
