//! Caller and callee identity over gRPC's TLS, attacked on real servers:
//! an anonymous caller, a certificate carrying another node's identity
//! extension, a certificate with none, and a different node at a peer's
//! address. Every refused caller reaches no service. Also: the caller a
//! service sees is the key its certificate proved, and the client keeps
//! each priority lane on its own connection.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tern_protocol::catalog::methods;
use tern_protocol::{
    Call, CallError, Delivery, PeerAddr, PeerId, Priority, RpcClient, TransportErrorKind, pb,
};
use tern_transport_conformance::service::{Counters, TestService};
use tern_transport_grpc::services::raft_client::RaftClient;
use tern_transport_grpc::tls;
use tern_transport_grpc::{ClientConfig, GrpcClient, GrpcTransport, ServerConfig};
use tonic::transport::{Channel, Endpoint};

const DRAIN: Duration = Duration::from_secs(5);

async fn node(secret: [u8; 32], service: &TestService) -> GrpcTransport {
    GrpcTransport::bind(
        ServerConfig::new(secret, SocketAddr::from(([127, 0, 0, 1], 0))),
        service.dispatcher(),
    )
    .await
    .unwrap()
}

/// A raw tonic channel to `node` over TLS with the given client config.
async fn raw_channel(node: &GrpcTransport, config: rustls::ClientConfig) -> Channel {
    let addr = node.local_addr();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

fn vote() -> tonic::Request<pb::RaftPayload> {
    tonic::Request::new(pb::RaftPayload::default())
}

async fn with_timeout<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test finished in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_is_the_key_its_certificate_proves() {
    with_timeout(async {
        let service = TestService::default();
        let server = node([1; 32], &service).await;
        assert!(server.server().url().starts_with("https://"));
        let client = GrpcClient::new(ClientConfig::new([10; 32]));
        let call =
            Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(Duration::from_secs(10));
        let answer = client.call(&server.peer_addr(), call).await.unwrap();
        let seen = <pb::RaftPayload as prost::Message>::decode(answer)
            .unwrap()
            .data;
        assert_eq!(seen.as_ref(), tls::peer_id_of_secret(&[10; 32]).as_bytes());
        assert_eq!(Counters::get(&service.counters.started), 1);
        server.shutdown(DRAIN).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_and_forged_callers_reach_no_service() {
    with_timeout(async {
        let service = TestService::default();
        let server = node([1; 32], &service).await;

        // No client certificate (a stock tool): health answers, a Tern
        // method is Unauthenticated.
        let anonymous =
            raw_channel(&server, tls::anonymous_client_config(server.id()).unwrap()).await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(anonymous.clone());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(status.get_ref().status, 1, "SERVING");
        let mut raft = RaftClient::new(anonymous);
        let refused = raft.vote(vote()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        // A large body from an anonymous caller is refused the same way,
        // unread.
        let big = tonic::Request::new(pb::RaftPayload {
            data: Bytes::from(vec![0u8; 4 << 20]),
        });
        let refused = raft.append_entries(big).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

        // A certificate for the attacker's own TLS key carrying node 2's
        // identity extension (copied from node 2's real certificate): the
        // node key's signature covers node 2's TLS key, not this one.
        let victim = tls::TlsIdentity::new(&[2; 32]).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(victim.certificate()).unwrap();
        let oid = x509_parser::oid_registry::Oid::from(tls::IDENTITY_EXTENSION_OID).unwrap();
        let stolen = parsed
            .extensions()
            .iter()
            .find(|e| e.oid == oid)
            .unwrap()
            .value
            .to_vec();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec![tls::SERVER_NAME.to_owned()]).unwrap();
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                tls::IDENTITY_EXTENSION_OID,
                stolen,
            ));
        let forged = params.self_signed(&key).unwrap();
        let plain = rcgen::CertificateParams::new(vec![tls::SERVER_NAME.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        for (what, cert) in [("stolen identity", forged), ("no identity", plain)] {
            let config = tls::client_config_with_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                server.id(),
            )
            .unwrap();
            let addr = server.local_addr();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            // The handshake itself, or the first request after it (TLS 1.3
            // clients finish before the server judges their certificate),
            // fails; either way no service runs.
            let result = Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_uri| {
                    let connector = connector.clone();
                    async move {
                        let tcp = tokio::net::TcpStream::connect(addr).await?;
                        let name =
                            rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
                        let tls = connector.connect(name, tcp).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(tls))
                    }
                }))
                .await;
            if let Ok(channel) = result {
                let answer = RaftClient::new(channel).vote(vote()).await;
                assert!(answer.is_err(), "{what}: a call succeeded: {answer:?}");
            }
        }
        assert_eq!(
            Counters::get(&service.counters.started),
            0,
            "a refused caller reached the service"
        );
        server.shutdown(DRAIN).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_node_at_the_address_is_a_wrong_peer() {
    with_timeout(async {
        let impostor_service = TestService::default();
        let impostor = node([3; 32], &impostor_service).await;
        let caller = node([4; 32], &TestService::default()).await;
        let expected = tls::peer_id_of_secret(&[5; 32]);
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
                assert!(e.to_string().contains(&impostor.id().short()), "{e}");
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
async fn cleartext_urls_are_refused_before_dialling() {
    with_timeout(async {
        let server = node([8; 32], &TestService::default()).await;
        let client = GrpcClient::new(ClientConfig::new([9; 32]));
        let addr = PeerAddr {
            grpc: Some(format!("http://{}", server.local_addr())),
            ..PeerAddr::new(server.id())
        };
        let call =
            Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(Duration::from_secs(10));
        let err = client.call(&addr, call).await.unwrap_err();
        let e = err.as_transport().unwrap();
        assert_eq!(e.kind, TransportErrorKind::NotServed, "{e}");
        assert_eq!(e.delivery, Delivery::NotDelivered, "{e}");
        assert!(e.to_string().contains("TLS only"), "{e}");
        let id: PeerId = server.id();
        assert!(!id.short().is_empty());
        server.shutdown(DRAIN).await;
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
