//! A private relay: an `iroh-relay` server in this process, serving HTTPS
//! with a certificate signed by a throw-away CA that the nodes trust through
//! [`IrohConfig::relay_ca_der`] (what the node's `[iroh] relay_url` and
//! `relay_ca_cert` set).
//!
//! Checked: a call reaches a peer known only by its key and relay (no
//! direct address), through the relay; a peer address naming no relay is
//! looked for on the caller's own relay; an endpoint that does not trust
//! the relay's CA cannot use it.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iroh_relay::server::{CertConfig, RelayConfig, Server, ServerConfig, TlsConfig};
use tern_protocol::catalog::methods;
use tern_protocol::peer::IrohAddr;
use tern_protocol::{Call, PeerAddr, RpcClient};
use tern_transport_conformance::service::TestService;
use tern_transport_iroh::{IrohConfig, IrohTransport};

/// Bound on every test.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Timeout of calls expected to succeed (generous: the machine is shared).
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an endpoint may take to register with the relay.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(20);
/// Timeout of the call expected to fail (nothing can carry it).
const FAILING_CALL_TIMEOUT: Duration = Duration::from_secs(5);
const DRAIN: Duration = Duration::from_secs(5);

/// A CA certificate (DER) and a rustls server configuration whose
/// certificate, for `127.0.0.1` and `localhost`, that CA signed.
fn private_ca() -> (Vec<u8>, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tern test relay CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der());
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key.into())
    .unwrap();
    (ca.der().to_vec(), server)
}

/// A relay on loopback serving HTTPS with `tls`; returns it and its URL.
async fn relay(tls: rustls::ServerConfig) -> (Server, String) {
    let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut relay = RelayConfig::new(loopback(0));
    relay.tls = Some(TlsConfig::new(
        loopback(0),
        CertConfig::Manual { server_config: tls },
    ));
    let mut config = ServerConfig::default();
    config.relay = Some(relay);
    let server = Server::spawn(config).await.unwrap();
    let url = format!("https://{}", server.https_addr().unwrap());
    (server, url)
}

async fn node(relay_url: &str, ca: Option<&[u8]>) -> IrohTransport {
    let mut config = IrohConfig::new(rand::random());
    config.relay_url = Some(relay_url.to_owned());
    config.relay_ca_der = ca.map(<[u8]>::to_vec);
    IrohTransport::bind(config, TestService::default().dispatcher())
        .await
        .unwrap()
}

async fn online(node: &IrohTransport) {
    tokio::time::timeout(ONLINE_TIMEOUT, node.endpoint().online())
        .await
        .expect("the endpoint registers with the relay");
}

/// The address of `node` with no direct address: only its key and `relay`.
fn relay_only(node: &IrohTransport, relay: Option<&str>) -> PeerAddr {
    PeerAddr {
        id: node.id(),
        iroh: Some(IrohAddr {
            direct: Vec::new(),
            relay_url: relay.map(str::to_owned),
        }),
        grpc: None,
    }
}

fn status_get(timeout: Duration) -> Call {
    Call::new(methods::STATUS_GET, Bytes::new()).with_timeout(timeout)
}

fn run(test: impl std::future::Future<Output = ()>) {
    tern_transport_conformance::run_bounded(TEST_TIMEOUT, test).expect("test finished in time");
}

#[test]
fn a_peer_known_only_by_key_and_relay_is_reached_through_a_private_relay() {
    run(async {
        let (ca, tls) = private_ca();
        let (server, url) = relay(tls).await;
        let callee = node(&url, Some(&ca)).await;
        let caller = node(&url, Some(&ca)).await;
        online(&callee).await;
        online(&caller).await;
        let before = server.metrics().server.send_packets_recv.get();

        let answer = caller
            .client()
            .call(&relay_only(&callee, Some(&url)), status_get(CALL_TIMEOUT))
            .await;
        assert!(answer.is_ok(), "call by key and relay: {answer:?}");
        let relayed = server.metrics().server.send_packets_recv.get() - before;
        assert!(
            relayed > 0,
            "with no direct address the first packets go through the relay"
        );

        // An address naming no relay (a join seed, a CLI target) is looked
        // for on the caller's own relay.
        let second = node(&url, Some(&ca)).await;
        online(&second).await;
        let answer = second
            .client()
            .call(&relay_only(&callee, None), status_get(CALL_TIMEOUT))
            .await;
        assert!(answer.is_ok(), "call by key alone, own relay: {answer:?}");

        second.shutdown(DRAIN).await;
        caller.shutdown(DRAIN).await;
        callee.shutdown(DRAIN).await;
        server.shutdown().await.unwrap();
    });
}

#[test]
fn a_relay_whose_ca_is_not_trusted_is_not_used() {
    run(async {
        let (ca, tls) = private_ca();
        let (server, url) = relay(tls).await;
        let callee = node(&url, Some(&ca)).await;
        online(&callee).await;
        // The system roots do not know the lab CA.
        let caller = node(&url, None).await;
        let answer = caller
            .client()
            .call(
                &relay_only(&callee, Some(&url)),
                status_get(FAILING_CALL_TIMEOUT),
            )
            .await;
        assert!(answer.is_err(), "no trusted relay, no path: {answer:?}");
        assert_eq!(
            server.metrics().server.unique_client_keys.get(),
            1,
            "only the endpoint that trusts the CA got through to the relay"
        );
        caller.shutdown(DRAIN).await;
        callee.shutdown(DRAIN).await;
        server.shutdown().await.unwrap();
    });
}
