//! Graceful shutdown of a gRPC node: calls in flight are drained, new
//! calls are refused as not delivered, and calls that outlive the drain
//! deadline are cut off (their handlers cancelled) so shutdown ends.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::{Call, Delivery, RpcClient, TransportErrorKind, pb};
use tern_transport_conformance::service::{Counters, TestService};
use tern_transport_grpc::{GrpcTransport, ServerConfig};

const DRAIN: Duration = Duration::from_secs(5);

async fn node(secret: [u8; 32], service: &TestService) -> GrpcTransport {
    GrpcTransport::bind(
        ServerConfig::new(secret, SocketAddr::from(([127, 0, 0, 1], 0))),
        service.dispatcher(),
    )
    .await
    .unwrap()
}

async fn with_timeout<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test finished in time")
}

fn vm_get(vm_id: &str, timeout: Duration) -> Call {
    let payload = pb::GetVmRequest {
        vm_id: vm_id.into(),
    }
    .encode_to_vec()
    .into();
    Call::new(methods::VM_GET, payload).with_timeout(timeout)
}

async fn wait_in_flight(counters: &Counters, n: u64) {
    while Counters::get(&counters.in_flight) != n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_drain_deadline_are_cut_off() {
    with_timeout(async {
        let service = TestService::default();
        let server = node([21; 32], &service).await;
        let caller = node([22; 32], &TestService::default()).await;
        let client: Arc<dyn RpcClient> = caller.client();
        let addr = server.peer_addr();
        let stuck = {
            let (client, addr) = (client.clone(), addr.clone());
            tokio::spawn(async move {
                client
                    .call(&addr, vm_get("sleep:60000", Duration::from_secs(50)))
                    .await
            })
        };
        wait_in_flight(&service.counters, 1).await;
        // Resolves although the call would run for a minute.
        server.shutdown(Duration::from_millis(300)).await;
        let err = stuck.await.unwrap().unwrap_err();
        let transport = err
            .as_transport()
            .unwrap_or_else(|| panic!("expected a transport error, got {err}"));
        assert_eq!(transport.kind, TransportErrorKind::ConnectionLost, "{err}");
        assert_eq!(transport.delivery, Delivery::MayHaveBeenDelivered, "{err}");
        while Counters::get(&service.counters.cancelled) != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        caller.shutdown(DRAIN).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_refuses_new_calls_as_shutting_down() {
    with_timeout(async {
        let service = TestService::default();
        let server = node([8; 32], &service).await;
        let caller = node([9; 32], &TestService::default()).await;
        let client: Arc<dyn RpcClient> = caller.client();
        let addr = server.peer_addr();
        // A long call holds the drain open while a new call arrives.
        let slow = {
            let (client, addr) = (client.clone(), addr.clone());
            tokio::spawn(async move {
                client
                    .call(&addr, vm_get("sleep:1500", Duration::from_secs(20)))
                    .await
            })
        };
        wait_in_flight(&service.counters, 1).await;
        let shutdown = tokio::spawn(server.shutdown(Duration::from_secs(10)));
        // Until the shutdown has begun, calls may still be served.
        let mut refused = None;
        for _ in 0..200 {
            match client
                .call(
                    &addr,
                    Call::new(methods::RAFT_VOTE, Bytes::new())
                        .with_timeout(Duration::from_secs(5)),
                )
                .await
            {
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let err = refused.expect("a draining node kept accepting calls");
        let transport = err
            .as_transport()
            .unwrap_or_else(|| panic!("expected a transport error, got {err}"));
        assert_eq!(transport.delivery, Delivery::NotDelivered, "{err}");
        assert!(
            matches!(
                transport.kind,
                TransportErrorKind::PeerShuttingDown
                    | TransportErrorKind::Unreachable
                    | TransportErrorKind::ConnectionLost
            ),
            "{err}"
        );
        slow.await.unwrap().expect("the in-flight call was drained");
        shutdown.await.unwrap();
        caller.shutdown(DRAIN).await;
    })
    .await;
}
