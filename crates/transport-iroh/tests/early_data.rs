//! 0-RTT early data: a caller resuming a session sends a read-only call
//! with its first flight and gets the answer in one round trip; a call
//! that changes state, sent in early data by a caller that does not play
//! by our rules, never runs before the handshake proves the caller, so
//! replayed early data never runs it at all.
//!
//! Real endpoints on loopback. The attacks go through a UDP relay in
//! this test that records the caller's datagrams, or forwards only its
//! first flight (Initial and 0-RTT packets), as an on-path attacker
//! could. A recorder installed for this binary counts
//! `tern_iroh_early_data_calls_total` by outcome; the tests take a lock so
//! that their counts do not mix.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use iroh::endpoint::{Connection, presets};
use iroh::{Endpoint, EndpointAddr, PublicKey, RelayMode, SecretKey};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::frame::Limits;
use tern_protocol::metric_names as names;
use tern_protocol::{Call, Frame, FrameKind, Header, Method, PeerAddr, Priority, RpcClient, pb};
use tern_transport_conformance::service::{Counters, TestService};
use tern_transport_iroh::wire::read_frame;
use tern_transport_iroh::{ALPN, IrohConfig, IrohTransport, TransportLimits};
use tokio::net::UdpSocket;

/// Bound on every test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of calls expected to succeed (generous: the machine is shared).
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Drain given to shutdowns.
const DRAIN: Duration = Duration::from_secs(2);
/// How long a replay is given to do harm before the test looks.
const REPLAY_GRACE: Duration = Duration::from_secs(2);

/// Counts of `tern_iroh_early_data_calls_total` by outcome.
#[derive(Default)]
struct EarlyCounts(Mutex<HashMap<String, Arc<AtomicU64>>>);

static COUNTS: std::sync::LazyLock<EarlyCounts> = std::sync::LazyLock::new(EarlyCounts::default);

/// One test at a time: the counts are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

impl EarlyCounts {
    fn get(&self, outcome: &str) -> u64 {
        self.0
            .lock()
            .expect("counts lock")
            .get(outcome)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

struct CountingRecorder;

impl Recorder for CountingRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() != names::IROH_EARLY_DATA_CALLS {
            return Counter::noop();
        }
        let outcome = key
            .labels()
            .find(|l| l.key() == "outcome")
            .map(|l| l.value().to_owned())
            .unwrap_or_default();
        let cell = COUNTS
            .0
            .lock()
            .expect("counts lock")
            .entry(outcome)
            .or_default()
            .clone();
        Counter::from_arc(cell)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn run(test: impl std::future::Future<Output = ()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _ = metrics::set_global_recorder(CountingRecorder);
    tern_transport_conformance::run_bounded(TEST_TIMEOUT, test).expect("test finished in time");
}

/// A server on IPv6 loopback, whose QUIC idle timeout is short, so a
/// handshake that never finishes ends within the test.
async fn server(service: &TestService) -> IrohTransport {
    let mut config = IrohConfig::new(rand::random());
    config.bind_addr = "[::1]:0".parse().expect("IPv6 loopback");
    bind_server(service, config).await
}

async fn bind_server(service: &TestService, mut config: IrohConfig) -> IrohTransport {
    config.limits = TransportLimits {
        idle_timeout: Duration::from_secs(2),
        keep_alive: Duration::from_millis(500),
        ..TransportLimits::default()
    };
    IrohTransport::bind(config, service.dispatcher())
        .await
        .expect("server binds on loopback")
}

fn status_get() -> Call {
    Call::new(
        methods::STATUS_GET,
        pb::StatusRequest {}.encode_to_vec().into(),
    )
    .with_timeout(CALL_TIMEOUT)
}

fn append(data: &'static [u8]) -> Call {
    Call::new(
        methods::RAFT_APPEND_ENTRIES,
        pb::RaftPayload {
            data: Bytes::from_static(data),
        }
        .encode_to_vec()
        .into(),
    )
    .with_timeout(CALL_TIMEOUT)
}

/// A request frame for `method` as our client would send it.
fn request_bytes(method: &Method, request_id: u64, payload: Vec<u8>) -> Vec<u8> {
    let header = Header {
        kind: FrameKind::Request,
        priority: Priority::Normal,
        idempotent: method.idempotent,
        service: method.service,
        method: method.id,
        request_id,
        payload_len: u32::try_from(payload.len()).expect("small payload"),
        deadline_ms: 10_000,
    };
    let frame = Frame::new(header, payload.into(), Limits::default()).expect("valid frame");
    let mut bytes = frame.header.encode().to_vec();
    bytes.extend_from_slice(&frame.payload);
    bytes
}

/// A bare iroh endpoint with a new key, on IPv4 alone: it reaches the
/// server (on IPv6, see [`server`]) only through the relay, whatever
/// addresses the server tells it. A caller that does not play by our
/// client's rules: it sends anything in early data.
async fn raw_endpoint() -> Endpoint {
    Endpoint::builder(presets::Minimal)
        .secret_key(SecretKey::from_bytes(&rand::random()))
        .relay_mode(RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")
        .expect("loopback address")
        .bind()
        .await
        .expect("raw endpoint binds")
}

fn endpoint_addr(to: &PeerAddr, at: SocketAddr) -> EndpointAddr {
    let key = PublicKey::from_bytes(to.id.as_bytes()).expect("valid key");
    EndpointAddr::new(key).with_ip_addr(at)
}

/// One call on a new stream of `conn`; the answer frame.
async fn exchange(conn: &Connection, bytes: &[u8]) -> Frame {
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    send.write_all(bytes).await.expect("write request");
    send.finish().expect("finish request");
    read_frame(&mut recv, Limits::default())
        .await
        .expect("answer frame")
}

/// Connects `endpoint` to the server directly once and makes a call, so
/// that the endpoint holds session tickets for it.
async fn take_tickets(endpoint: &Endpoint, to: &PeerAddr, at: SocketAddr) {
    let conn = endpoint
        .connect(endpoint_addr(to, at), ALPN)
        .await
        .expect("first connection");
    let payload = pb::StatusRequest {}.encode_to_vec();
    let answer = exchange(&conn, &request_bytes(methods::STATUS_GET, 1, payload)).await;
    assert_eq!(answer.header.kind, FrameKind::Response);
    conn.close(0u32.into(), b"done");
}

/// Which of the caller's datagrams the relay passes to the server (a
/// [`Relay::pass`] value).
const PASS_ALL: u8 = 0;
/// Only datagrams made of Initial and 0-RTT packets: the caller's first
/// flight reaches the server, its handshake's end never does.
const PASS_FIRST_FLIGHT: u8 = 1;
/// None: the caller went silent.
const PASS_NONE: u8 = 2;

/// A UDP relay between one caller (on IPv4) and the server (on IPv6), as
/// an attacker on the path could run it.
struct Relay {
    addr: SocketAddr,
    recorded: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Which of the caller's datagrams are passed on: `PASS_*`.
    pass: Arc<AtomicU8>,
    /// While true, the server's datagrams are held back (and passed on in
    /// order after): the caller hears nothing yet, so all it sends is its
    /// first flight.
    deaf: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The long-header packet types in a datagram (QUIC v1: 0 Initial, 1 0-RTT,
/// 2 Handshake); `None` if it holds a short-header (1-RTT) packet or
/// cannot be parsed.
fn long_types(mut d: &[u8]) -> Option<Vec<u8>> {
    fn varint(d: &mut &[u8]) -> Option<u64> {
        let first = *d.first()?;
        let len = 1usize << (first >> 6);
        let bytes = d.get(..len)?;
        let mut v = u64::from(first & 0x3f);
        for b in &bytes[1..] {
            v = (v << 8) | u64::from(*b);
        }
        *d = &d[len..];
        Some(v)
    }
    let mut types = Vec::new();
    while !d.is_empty() {
        let first = d[0];
        if first & 0x80 == 0 {
            return None;
        }
        let kind = (first >> 4) & 0x3;
        let mut rest = d.get(5..)?;
        let dcid = usize::from(*rest.first()?);
        rest = rest.get(1 + dcid..)?;
        let scid = usize::from(*rest.first()?);
        rest = rest.get(1 + scid..)?;
        if kind == 0 {
            let token = usize::try_from(varint(&mut rest)?).ok()?;
            rest = rest.get(token..)?;
        }
        let len = usize::try_from(varint(&mut rest)?).ok()?;
        d = rest.get(len..)?;
        types.push(kind);
    }
    Some(types)
}

async fn relay(server: SocketAddr) -> Relay {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay binds"));
    let upstream = Arc::new(UdpSocket::bind("[::1]:0").await.expect("relay binds"));
    let addr = socket.local_addr().expect("relay address");
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let log = recorded.clone();
    let pass = Arc::new(AtomicU8::new(PASS_ALL));
    let mode = pass.clone();
    let deaf = Arc::new(AtomicBool::new(false));
    let muted = deaf.clone();
    let task = tokio::spawn(async move {
        let caller: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let back = {
            let (socket, upstream, caller) = (socket.clone(), upstream.clone(), caller.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                let mut held_back: Vec<Vec<u8>> = Vec::new();
                loop {
                    let received =
                        tokio::time::timeout(Duration::from_millis(5), upstream.recv(&mut buf))
                            .await;
                    match received {
                        Ok(Ok(n)) => held_back.push(buf[..n].to_vec()),
                        Ok(Err(_)) => break,
                        Err(_) => {}
                    }
                    if muted.load(Ordering::SeqCst) {
                        continue;
                    }
                    let to = *caller.lock().expect("caller lock");
                    if let Some(to) = to {
                        for datagram in held_back.drain(..) {
                            let _ = socket.send_to(&datagram, to).await;
                        }
                    }
                }
            })
        };
        upstream
            .connect(server)
            .await
            .expect("relay reaches the server");
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            *caller.lock().expect("caller lock") = Some(from);
            let datagram = &buf[..n];
            let forward = match mode.load(Ordering::SeqCst) {
                PASS_ALL => true,
                PASS_FIRST_FLIGHT => {
                    long_types(datagram).is_some_and(|t| t.iter().all(|k| *k == 0 || *k == 1))
                }
                _ => false,
            };
            if std::env::var("RELAY_DEBUG").is_ok() {
                eprintln!(
                    "relay: {} bytes v={:02x?} types {:?} forward {forward}",
                    n,
                    datagram.get(1..5),
                    long_types(datagram)
                );
            }
            if forward {
                log.lock().expect("log lock").push(datagram.to_vec());
                let _ = upstream.send(datagram).await;
            }
        }
        back.abort();
    });
    Relay {
        addr,
        recorded,
        pass,
        deaf,
        task,
    }
}

/// A server, a relay in front of it, and a bare caller that holds session
/// tickets for it, taken through the relay.
struct Scene {
    service: TestService,
    server: IrohTransport,
    to: PeerAddr,
    relay: Relay,
    caller: Endpoint,
}

async fn scene() -> Scene {
    let service = TestService::default();
    let server = server(&service).await;
    let to = server.peer_addr();
    let relay = relay(server.local_addr()).await;
    let caller = raw_endpoint().await;
    take_tickets(&caller, &to, relay.addr).await;
    Scene {
        service,
        server,
        to,
        relay,
        caller,
    }
}

impl Scene {
    async fn close(self) {
        drop(self.relay);
        self.caller.close().await;
        self.server.shutdown(DRAIN).await;
    }

    /// A new connection through the relay, in 0-RTT.
    async fn connect_early(&self) -> iroh::endpoint::OutgoingZeroRttConnection {
        self.caller
            .connect_with_opts(
                endpoint_addr(&self.to, self.relay.addr),
                ALPN,
                Default::default(),
            )
            .await
            .expect("connect")
            .into_0rtt()
            .unwrap_or_else(|_| panic!("the caller holds a ticket, so 0-RTT is possible"))
    }
}

/// `request` on a new stream of `conn`, finished; the stream's halves.
async fn send_early(
    conn: &iroh::endpoint::OutgoingZeroRttConnection,
    request: &[u8],
) -> (iroh::endpoint::SendStream, iroh::endpoint::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.expect("early stream");
    send.write_all(request).await.expect("early write");
    send.finish().expect("finish");
    (send, recv)
}

/// Waits, bounded by [`CALL_TIMEOUT`], until `cond` holds.
async fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    tern_transport_conformance::wait_until(what, CALL_TIMEOUT, cond)
        .await
        .expect("the condition came in time");
}

/// A `Raft/AppendEntries` request (a call that changes state) of `data`.
fn append_request(request_id: u64, data: &'static [u8]) -> Vec<u8> {
    request_bytes(
        methods::RAFT_APPEND_ENTRIES,
        request_id,
        pb::RaftPayload {
            data: Bytes::from_static(data),
        }
        .encode_to_vec(),
    )
}

/// A caller that resumes its session sends a read-only first call in
/// early data and gets it answered; a call that changes state is never
/// sent early, and still works.
#[test]
fn a_resumed_read_only_call_rides_in_early_data() {
    run(async {
        let service = TestService::default();
        let server = bind_server(&service, IrohConfig::new(rand::random())).await;
        let caller = IrohTransport::bind(
            IrohConfig::new(rand::random()),
            TestService::default().dispatcher(),
        )
        .await
        .expect("caller binds");
        let client = caller.client();
        let to = server.peer_addr();
        let (sent, served) = (COUNTS.get("sent_early"), COUNTS.get("served_early"));
        let (rejected, held) = (COUNTS.get("rejected"), COUNTS.get("held"));

        // No ticket yet: a full handshake, nothing early.
        client.call(&to, status_get()).await.expect("first call");
        assert_eq!(COUNTS.get("sent_early"), sent);

        client.close_pooled_connections();
        let answer = client.call(&to, status_get()).await.expect("resumed call");
        let status = pb::NodeStatus::decode(answer).expect("a status");
        assert_eq!(
            status.node_id,
            tern_transport_conformance::service::STATUS_NODE_ID
        );
        assert_eq!(COUNTS.get("sent_early"), sent + 1, "the read went early");
        // The server serves it early if its accept loop takes the stream
        // before the handshake ends (on loopback, usually), else after it;
        // either way nothing was refused.
        assert!(COUNTS.get("served_early") <= served + 1);
        assert_eq!(COUNTS.get("rejected"), rejected);

        // A call that changes state on a fresh resumed connection waits
        // for the handshake like any other.
        client.close_pooled_connections();
        let echoed = client.call(&to, append(b"after")).await.expect("append");
        assert_eq!(
            pb::RaftPayload::decode(echoed).expect("echo").data,
            &b"after"[..]
        );
        assert_eq!(
            COUNTS.get("sent_early"),
            sent + 1,
            "a mutation never goes early"
        );
        assert_eq!(COUNTS.get("held"), held);

        caller.shutdown(DRAIN).await;
        server.shutdown(DRAIN).await;
    });
}

/// A caller that sends a state-changing call in early data and whose
/// handshake never finishes (the relay passes its first flight only)
/// gets its read-only call answered, and its mutation never runs.
#[test]
fn a_mutation_in_early_data_waits_for_a_handshake_that_never_comes() {
    run(async {
        let scene = scene().await;
        let counters = &scene.service.counters;
        let started = Counters::get(&counters.started);
        let (held, dropped) = (COUNTS.get("held"), COUNTS.get("dropped"));
        let served = COUNTS.get("served_early");
        scene.relay.pass.store(PASS_FIRST_FLIGHT, Ordering::SeqCst);
        scene.relay.deaf.store(true, Ordering::SeqCst);
        let early = scene.connect_early().await;
        let (_write, _write_answer) = send_early(&early, &append_request(2, b"early write")).await;
        let read = request_bytes(methods::STATUS_GET, 3, pb::StatusRequest {}.encode_to_vec());
        let (_read, mut read_answer) = send_early(&early, &read).await;

        // Both calls reach the server in early data: the read is served at
        // once, the mutation is held.
        wait_for("the early calls to reach the server", || {
            COUNTS.get("held") > held && COUNTS.get("served_early") > served
        })
        .await;
        // The caller hears the server again and reads the answer; its
        // handshake's end still never passes the relay.
        scene.relay.deaf.store(false, Ordering::SeqCst);
        let answer = tokio::time::timeout(
            CALL_TIMEOUT,
            read_frame(&mut read_answer, Limits::default()),
        )
        .await
        .expect("the read is answered in time")
        .expect("an answer to the read");
        assert_eq!(answer.header.kind, FrameKind::Response);
        assert_eq!(answer.header.request_id, 3);
        // The caller goes silent, as a replay would: the server gives up
        // on the handshake (its idle timeout, 2 s here) and drops the
        // held mutation, never run.
        scene.relay.pass.store(PASS_NONE, Ordering::SeqCst);
        wait_for("the held call to be dropped", || {
            COUNTS.get("dropped") > dropped
        })
        .await;
        assert_eq!(
            Counters::get(&counters.started),
            started + 1,
            "only the read ran"
        );
        scene.close().await;
    });
}

/// An attacker who recorded a caller's datagrams (its first flight with a
/// state-changing call in early data, and everything after) replays them
/// from another address, several times: the call ran once, for the real
/// caller, and never again.
#[test]
fn replayed_early_data_never_runs_a_mutation_again() {
    run(async {
        let scene = scene().await;
        let counters = &scene.service.counters;
        scene.relay.recorded.lock().expect("log lock").clear();
        let (served, held) = (COUNTS.get("served_early"), COUNTS.get("held"));
        // The caller hears nothing until the server has its early data,
        // so the call is sure to go in 0-RTT packets.
        scene.relay.deaf.store(true, Ordering::SeqCst);
        let conn = scene.connect_early().await;
        let (_send, mut answer) = send_early(&conn, &append_request(2, b"pay once")).await;
        wait_for("the early call to reach the server", || {
            COUNTS.get("held") > held
        })
        .await;
        scene.relay.deaf.store(false, Ordering::SeqCst);
        let accepted = matches!(
            conn.handshake_completed().await.expect("handshake"),
            iroh::endpoint::ZeroRttStatus::Accepted(_)
        );
        assert!(accepted, "the server took the early data");
        let answer = read_frame(&mut answer, Limits::default())
            .await
            .expect("answer");
        assert_eq!(answer.header.kind, FrameKind::Response);
        let after_genuine = Counters::get(&counters.started);
        let datagrams = scene.relay.recorded.lock().expect("log lock").clone();
        assert!(
            datagrams
                .iter()
                .any(|d| long_types(d).is_some_and(|t| t.contains(&1))),
            "the recording holds the 0-RTT packets"
        );

        // Replayed from another address while the real connection is open,
        // then again after it closed, three times each.
        let attacker = UdpSocket::bind("[::1]:0").await.expect("attacker binds");
        let target = scene.server.local_addr();
        let replay = || async {
            for _ in 0..3 {
                for d in &datagrams {
                    let _ = attacker.send_to(d, target).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        replay().await;
        conn.close(0u32.into(), b"done");
        replay().await;
        tokio::time::sleep(REPLAY_GRACE).await;
        assert_eq!(
            Counters::get(&counters.started),
            after_genuine,
            "a replay ran a call"
        );
        assert_eq!(COUNTS.get("served_early"), served, "nothing served early");
        scene.close().await;
    });
}
