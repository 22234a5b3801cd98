//! An on-path attacker between two real nodes: a TCP proxy that, in turn,
//! flips a byte (each direction), truncates, replays a captured connection
//! to the server, and splices a captured connection's bytes into another.
//! Every affected call fails as a transport error, no handler runs on
//! altered input (the service counts exactly the calls that succeeded,
//! and every answer is the one sent), and calls succeed again once the
//! proxy behaves.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::{Call, CallError, PeerAddr, RpcClient, pb};
use tern_transport_conformance::service::{Counters, TestService};
use tern_transport_grpc::{ClientConfig, GrpcClient, GrpcTransport, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASS: u8 = 0;
/// Flip one bit of the first chunk after the first `FLIP_AFTER` bytes.
const FLIP_UP: u8 = 1;
const FLIP_DOWN: u8 = 2;
/// Close both sides after `TRUNCATE_AFTER` bytes upstream.
const TRUNCATE: u8 = 3;
/// Insert a chunk captured from an earlier connection into this one.
const SPLICE: u8 = 4;

/// Past the TLS handshake's first flight, so application records are hit.
const FLIP_AFTER: usize = 1500;
const TRUNCATE_AFTER: usize = 700;

#[derive(Default)]
struct Proxy {
    mode: AtomicU8,
    /// Client-to-server chunks of every connection, in order.
    captured: Mutex<Vec<Vec<Vec<u8>>>>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    proxy: Arc<Proxy>,
    upstream: bool,
    conn: usize,
) {
    let mut total = 0usize;
    let mut flipped = false;
    let mut spliced = false;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = buf[..n].to_vec();
        let mode = proxy.mode.load(Ordering::SeqCst);
        if upstream {
            proxy.captured.lock().unwrap()[conn].push(chunk.clone());
        }
        let flip = (mode == FLIP_UP && upstream) || (mode == FLIP_DOWN && !upstream);
        if flip && !flipped && total + n > FLIP_AFTER {
            let at = FLIP_AFTER.saturating_sub(total).min(n - 1);
            chunk[at] ^= 0x20;
            flipped = true;
        }
        if mode == TRUNCATE && upstream && total + n > TRUNCATE_AFTER {
            let keep = TRUNCATE_AFTER.saturating_sub(total);
            let _ = to.write_all(&chunk[..keep]).await;
            break;
        }
        if mode == SPLICE && upstream && !spliced && total > 0 {
            // A later chunk of an earlier connection: records of another
            // TLS session, valid there, foreign here.
            let foreign = {
                let captured = proxy.captured.lock().unwrap();
                captured[..conn]
                    .iter()
                    .rev()
                    .find(|c| c.len() > 2)
                    .map(|c| c[c.len() - 1].clone())
            };
            if let Some(foreign) = foreign {
                let _ = to.write_all(&foreign).await;
                spliced = true;
            }
        }
        total += n;
        if to.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

async fn start_proxy(target: SocketAddr) -> (SocketAddr, Arc<Proxy>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Arc::new(Proxy::default());
    let p = proxy.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            let conn = {
                let mut captured = p.captured.lock().unwrap();
                captured.push(Vec::new());
                captured.len() - 1
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, p.clone(), true, conn));
            tokio::spawn(pump(sr, cw, p.clone(), false, conn));
        }
    });
    (addr, proxy)
}

/// One append through the proxy; `Ok` only if the answer is the echo of
/// what was sent.
async fn append(client: &GrpcClient, peer: &PeerAddr, n: u32) -> Result<(), CallError> {
    let data = Bytes::from(format!("entry {n} {}", "x".repeat(3000)));
    let payload: Bytes = pb::RaftPayload { data: data.clone() }
        .encode_to_vec()
        .into();
    let call =
        Call::new(methods::RAFT_APPEND_ENTRIES, payload).with_timeout(Duration::from_secs(5));
    let answer = client.call(peer, call).await?;
    let echoed = pb::RaftPayload::decode(answer).unwrap().data;
    assert_eq!(echoed, data, "an answer differs from what was sent");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_path_attacker_achieves_nothing() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let service = TestService::default();
        let server = GrpcTransport::bind(
            ServerConfig::new([21; 32], SocketAddr::from(([127, 0, 0, 1], 0))),
            service.dispatcher(),
        )
        .await
        .unwrap();
        let (proxy_addr, proxy) = start_proxy(server.local_addr()).await;
        let peer = PeerAddr {
            grpc: Some(format!("https://{proxy_addr}")),
            ..PeerAddr::new(server.id())
        };
        let mut succeeded = 0u64;
        let mut n = 0u32;

        // Behaving: calls go through.
        let client = GrpcClient::new(ClientConfig::new([22; 32]));
        for _ in 0..3 {
            n += 1;
            append(&client, &peer, n).await.unwrap();
            succeeded += 1;
        }

        for (mode, what) in [
            (FLIP_UP, "a flipped byte towards the server"),
            (FLIP_DOWN, "a flipped byte towards the client"),
            (TRUNCATE, "a truncated connection"),
            (SPLICE, "another connection's records spliced in"),
        ] {
            proxy.mode.store(mode, Ordering::SeqCst);
            // A fresh client per attack, so the attack meets a fresh
            // connection (handshake and first records).
            let victim = GrpcClient::new(ClientConfig::new([22; 32]));
            let mut failed = 0;
            for _ in 0..3 {
                n += 1;
                match append(&victim, &peer, n).await {
                    Ok(()) => succeeded += 1,
                    Err(CallError::Transport(_)) => failed += 1,
                    Err(CallError::Application(status)) => {
                        panic!("{what}: an altered call reached the service: {status}")
                    }
                }
            }
            assert!(
                failed > 0,
                "{what}: no call failed, so nothing was attacked"
            );
            let started = Counters::get(&service.counters.started);
            if mode == FLIP_DOWN {
                // The requests arrived intact and ran; their answers were
                // altered on the way back and refused by the client.
                assert!(
                    started <= succeeded + failed,
                    "{what}: {started} handlers ran"
                );
                succeeded = started;
            } else {
                assert_eq!(
                    started, succeeded,
                    "{what}: a handler ran for a call the client did not see succeed"
                );
            }
            victim.close();
        }

        // A captured connection (handshake and a call) replayed verbatim
        // to the server: the handshake cannot complete (fresh randoms), so
        // nothing runs.
        proxy.mode.store(PASS, Ordering::SeqCst);
        let captured: Vec<Vec<u8>> = proxy.captured.lock().unwrap()[0].clone();
        assert!(!captured.is_empty());
        let mut replay = TcpStream::connect(server.local_addr()).await.unwrap();
        for chunk in &captured {
            if replay.write_all(chunk).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), replay.read_to_end(&mut sink)).await;
        assert_eq!(
            Counters::get(&service.counters.started),
            succeeded,
            "a replayed connection ran a handler"
        );

        // The proxy behaves again: the nodes recover.
        let recovered = GrpcClient::new(ClientConfig::new([22; 32]));
        for _ in 0..3 {
            n += 1;
            append(&recovered, &peer, n).await.unwrap();
            succeeded += 1;
        }
        // And the first client's pooled connection still works too.
        n += 1;
        append(&client, &peer, n).await.unwrap();
        succeeded += 1;
        assert_eq!(Counters::get(&service.counters.started), succeeded);
        server.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("the on-path test finished in time");
}
