//! Hostile clients against a real server's limits, while a well-behaved
//! peer keeps calling: a flood of TCP connections that never handshake
//! (slowloris, from another loopback address), anonymous TLS clients
//! sending 16 MiB bodies to Tern methods, and one node key opening more
//! connections than its cap. The good peer's calls all succeed; the
//! hostile connections are closed at their limits. Figures (the good
//! peer's p99, the process's peak RSS) are printed, never asserted.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::{Call, RpcClient, pb};
use tern_transport_conformance::service::{Counters, TestService};
use tern_transport_grpc::services::raft_client::RaftClient;
use tern_transport_grpc::tls;
use tern_transport_grpc::{ClientConfig, GrpcClient, GrpcTransport, ServerConfig, ServerLimits};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

const PER_IP: usize = 16;

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn connect_from(source: [u8; 4], target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(target).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_does_not_starve_a_good_peer() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let service = TestService::default();
        let mut config = ServerConfig::new([31; 32], SocketAddr::from(([127, 0, 0, 1], 0)));
        config.limits = ServerLimits {
            max_connections_per_ip: PER_IP,
            max_connections_per_peer: 4,
            handshake_timeout: Duration::from_millis(500),
            ..ServerLimits::default()
        };
        let server = GrpcTransport::bind(config, service.dispatcher())
            .await
            .unwrap();
        let target = server.local_addr();
        let good = GrpcClient::new(ClientConfig::new([32; 32]));
        let peer = server.peer_addr();

        // 1. A thousand TCP connections from 127.0.0.2 that never send a
        //    byte: at most PER_IP are held, each only until its handshake
        //    times out; the rest are closed at once.
        let mut idle = Vec::new();
        for _ in 0..1000 {
            if let Ok(s) = connect_from([127, 0, 0, 2], target).await {
                idle.push(s);
            }
        }
        // 2. Anonymous TLS clients from 127.0.0.3 sending 16 MiB bodies to
        //    a Tern method: refused before the body is read.
        let anonymous = tokio::spawn(async move {
            let config = Arc::new(tls::anonymous_client_config(server_id(target)).unwrap());
            let mut refused = 0;
            for _ in 0..8 {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_| {
                        let connector = connector.clone();
                        async move {
                            let tcp = connect_from([127, 0, 0, 3], target).await?;
                            let name =
                                rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
                            Ok::<_, std::io::Error>(TokioIo::new(
                                connector.connect(name, tcp).await?,
                            ))
                        }
                    }))
                    .await;
                let Ok(channel) = channel else { continue };
                let body = pb::RaftPayload {
                    data: Bytes::from(vec![7u8; 16 << 20]),
                };
                let answer = RaftClient::new(channel)
                    .max_encoding_message_size(32 << 20)
                    .append_entries(body)
                    .await;
                if let Err(status) = answer
                    && status.code() == tonic::Code::Unauthenticated
                {
                    refused += 1;
                }
            }
            refused
        });

        // Meanwhile the good peer calls on.
        let mut latencies = Vec::new();
        for n in 0..200u32 {
            let payload: Bytes = pb::RaftPayload {
                data: Bytes::from(n.to_le_bytes().to_vec()),
            }
            .encode_to_vec()
            .into();
            let call = Call::new(methods::RAFT_APPEND_ENTRIES, payload)
                .with_timeout(Duration::from_secs(10));
            let started = Instant::now();
            good.call(&peer, call).await.unwrap();
            latencies.push(started.elapsed());
        }
        let refused = anonymous.await.unwrap();
        assert_eq!(refused, 8, "every anonymous 16 MiB call is Unauthenticated");

        // The flood: all but PER_IP were closed by the server at once, and
        // the held ones are closed once their handshake time is up.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut closed = 0;
        for mut s in idle {
            let mut byte = [0u8; 1];
            if let Ok(Ok(0)) | Ok(Err(_)) =
                tokio::time::timeout(Duration::from_millis(50), s.read(&mut byte)).await
            {
                closed += 1;
            }
        }
        assert!(
            closed >= 1000 - PER_IP,
            "only {closed} of the flood's connections were closed"
        );

        // 3. One node key opening more connections than its cap: the
        //    extra ones are closed after the handshake; the good peer is
        //    untouched.
        let greedy: Vec<GrpcClient> = (0..8)
            .map(|_| GrpcClient::new(ClientConfig::new([33; 32])))
            .collect();
        let mut greedy_ok = 0;
        for client in &greedy {
            let call =
                Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(Duration::from_secs(5));
            if client.call(&peer, call).await.is_ok() {
                greedy_ok += 1;
            }
        }
        assert!(
            greedy_ok <= 4,
            "{greedy_ok} connections of one key were served, cap 4"
        );
        let call = Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(Duration::from_secs(5));
        good.call(&peer, call).await.unwrap();

        latencies.sort_unstable();
        let p99 = latencies[latencies.len() * 99 / 100 - 1];
        println!(
            "good peer during the flood: p50 {:?}, p99 {:?}; peak RSS {} KiB; handlers run {}",
            latencies[latencies.len() / 2],
            p99,
            peak_rss_kib(),
            Counters::get(&service.counters.started)
        );
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("the limits test finished in time");
}

/// The server's id, known to the test (secret [31; 32]).
fn server_id(_target: SocketAddr) -> tern_protocol::PeerId {
    tls::peer_id_of_secret(&[31; 32])
}
