//! Checks specific to the iroh transport, beyond the shared conformance
//! suite: persistent identity, raw bytes on a stream of our ALPN
//! (malformed, oversize, unknown service, wrong kind, ping, frames that
//! break a streaming call's rules), lanes, the
//! per-connection in-flight limit and what remote callers see on shutdown.
//!
//! Every node is a real endpoint on loopback; every wait is bounded.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iroh::endpoint::{Connection, ReadError, presets};
use iroh::{Endpoint, EndpointAddr, PublicKey, RelayMode};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::frame::{DEFAULT_MAX_PAYLOAD, HEADER_LEN, Limits};
use tern_protocol::{
    Call, CallError, Code, Delivery, Frame, FrameKind, Header, PeerAddr, Priority, RpcClient,
    ServiceId, Status, TransportErrorKind, pb,
};
use tern_transport_conformance::service::{Counters, TestService};
use tern_transport_iroh::wire::{STREAM_MALFORMED, read_frame};
use tern_transport_iroh::{
    ALPN, IrohConfig, IrohTransport, TransportLimits, load_or_create_secret_key,
};

/// Bound on every test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of calls expected to succeed (generous: the machine is shared).
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Drain given to shutdowns that have nothing to drain.
const DRAIN: Duration = Duration::from_secs(5);

async fn node(service: &TestService) -> IrohTransport {
    node_with(service, IrohConfig::new(rand::random())).await
}

async fn node_with(service: &TestService, config: IrohConfig) -> IrohTransport {
    IrohTransport::bind(config, service.dispatcher())
        .await
        .expect("node binds on loopback")
}

fn vm_get(vm_id: &str, timeout: Duration) -> Call {
    let payload = pb::GetVmRequest {
        vm_id: vm_id.into(),
    }
    .encode_to_vec()
    .into();
    Call::new(methods::VM_GET, payload).with_timeout(timeout)
}

async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    tern_transport_conformance::wait_until(what, CALL_TIMEOUT, cond)
        .await
        .expect("the condition came in time");
}

/// A bare iroh endpoint (no Tern layer) connected to `to` with our ALPN.
async fn raw_connection(to: &PeerAddr) -> (Endpoint, Connection) {
    let endpoint = Endpoint::builder(presets::Minimal)
        .relay_mode(RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")
        .expect("loopback address")
        .bind()
        .await
        .expect("raw endpoint binds");
    let key = PublicKey::from_bytes(to.id.as_bytes()).expect("valid key");
    let mut addr = EndpointAddr::new(key);
    for direct in &to.iroh.as_ref().expect("iroh address").direct {
        addr = addr.with_ip_addr(*direct);
    }
    let conn = endpoint.connect(addr, ALPN).await.expect("raw connect");
    (endpoint, conn)
}

fn request_header(service: ServiceId, method: u16, request_id: u64, payload_len: u32) -> Header {
    Header {
        kind: FrameKind::Request,
        priority: Priority::Normal,
        idempotent: true,
        service,
        method,
        request_id,
        payload_len,
        deadline_ms: 10_000,
    }
}

/// Writes `bytes` on a new stream, finishes it and reads one answer frame.
async fn raw_exchange(
    conn: &Connection,
    bytes: &[u8],
) -> Result<Frame, tern_transport_iroh::wire::ReadFrameError> {
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    // The server may stop our side early (oversize); that is not a failure.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    read_frame(&mut recv, Limits::default()).await
}

/// A valid Status/Get request, answered on the same raw connection.
async fn raw_status_get_works(conn: &Connection, request_id: u64) {
    let payload = pb::StatusRequest {}.encode_to_vec();
    let header = request_header(ServiceId::Status, 1, request_id, payload.len() as u32);
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(&payload);
    let answer = raw_exchange(conn, &bytes).await.expect("answer");
    assert_eq!(answer.header.kind, FrameKind::Response);
    assert_eq!(answer.header.request_id, request_id);
    assert!(
        conn.close_reason().is_none(),
        "connection must survive bad streams"
    );
}

fn run(test: impl std::future::Future<Output = ()>) {
    tern_transport_conformance::run_bounded(TEST_TIMEOUT, test).expect("test finished in time");
}

#[test]
fn persistent_key_gives_the_same_id_after_restart() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let service = TestService::default();
        let key = load_or_create_secret_key(dir.path()).unwrap();
        let first = node_with(&service, IrohConfig::new(key)).await;
        let id = first.id();
        first.shutdown(DRAIN).await;

        let key = load_or_create_secret_key(dir.path()).unwrap();
        let second = node_with(&service, IrohConfig::new(key)).await;
        assert_eq!(second.id(), id, "same identity after a restart");
        let caller = node(&TestService::default()).await;
        let status = caller
            .client()
            .call(
                &second.peer_addr(),
                Call::new(methods::STATUS_GET, Bytes::new()).with_timeout(CALL_TIMEOUT),
            )
            .await;
        assert!(status.is_ok(), "restarted node answers: {status:?}");
        caller.shutdown(DRAIN).await;
        second.shutdown(DRAIN).await;
    });
}

/// Opens a `Raft/AppendStream` in echo mode on a raw stream and reads the
/// server's acceptance; returns the stream's halves.
async fn raw_echo_stream(
    conn: &Connection,
    request_id: u64,
) -> (iroh::endpoint::SendStream, iroh::endpoint::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    let first = pb::RaftPayload {
        data: Bytes::from_static(b"echo"),
    }
    .encode_to_vec();
    let header = request_header(ServiceId::Raft, 5, request_id, first.len() as u32);
    let frame =
        Frame::new(header, Bytes::from(first), Limits::default()).expect("raw stream set-up");
    tern_transport_iroh::wire::write_frame(&mut send, &frame)
        .await
        .expect("raw stream set-up");
    let accept = read_frame(&mut recv, Limits::default())
        .await
        .expect("raw stream set-up");
    assert_eq!(accept.header.kind, FrameKind::Response, "accepted");
    (send, recv)
}

fn stream_frame(kind: FrameKind, request_id: u64, payload: Bytes) -> Frame {
    let header = Header {
        kind,
        priority: Priority::Normal,
        idempotent: false,
        service: ServiceId::Raft,
        method: 5,
        request_id,
        payload_len: 0,
        deadline_ms: 0,
    };
    Frame::new(header, payload, Limits::default()).expect("raw stream set-up")
}

#[test]
fn stream_frames_that_break_the_rules_reset_that_stream_only() {
    run(async {
        let service = TestService::default();
        let server = node(&service).await;
        let (_endpoint, conn) = raw_connection(&server.peer_addr()).await;
        let message = || {
            Bytes::from(
                pb::RaftPayload {
                    data: Bytes::from_static(b"m"),
                }
                .encode_to_vec(),
            )
        };
        let bad: [(&str, Vec<Frame>); 3] = [
            (
                "data for an unknown request id",
                vec![stream_frame(FrameKind::StreamData, 999, message())],
            ),
            (
                "data after the stream's end",
                vec![
                    stream_frame(FrameKind::StreamEnd, 10, Bytes::new()),
                    stream_frame(FrameKind::StreamData, 10, message()),
                ],
            ),
            (
                "a request inside an open stream",
                vec![
                    Frame::new(
                        request_header(ServiceId::Raft, 5, 10, 0),
                        Bytes::new(),
                        Limits::default(),
                    )
                    .unwrap(),
                ],
            ),
        ];
        for (what, frames) in bad {
            let (mut send, mut recv) = raw_echo_stream(&conn, 10).await;
            // A good message first: echoed, so the stream was working.
            tern_transport_iroh::wire::write_frame(
                &mut send,
                &stream_frame(FrameKind::StreamData, 10, message()),
            )
            .await
            .unwrap();
            let echo = read_frame(&mut recv, Limits::default()).await.unwrap();
            assert_eq!(echo.header.kind, FrameKind::StreamData, "{what}: echoed");
            for frame in &frames {
                let _ = tern_transport_iroh::wire::write_frame(&mut send, frame).await;
            }
            // After a StreamEnd the handler ends the stream cleanly and
            // reads nothing more: later data is never delivered. Every other
            // break resets the stream as malformed.
            let ended = frames[0].header.kind == FrameKind::StreamEnd;
            let mut saw_end = false;
            let last = loop {
                match read_frame(&mut recv, Limits::default()).await {
                    Ok(frame) => {
                        assert_eq!(
                            frame.header.kind,
                            FrameKind::StreamEnd,
                            "{what}: no more echoes"
                        );
                        saw_end = true;
                    }
                    Err(e) => break e,
                }
            };
            if ended {
                assert!(saw_end, "{what}: the stream ended cleanly");
                assert!(
                    matches!(
                        last,
                        tern_transport_iroh::wire::ReadFrameError::Eof { got: 0 }
                    ),
                    "{what}: nothing after the end: {last:?}"
                );
            } else {
                assert!(
                    matches!(
                        last,
                        tern_transport_iroh::wire::ReadFrameError::Read(ReadError::Reset(code))
                            if code == STREAM_MALFORMED
                    ),
                    "{what}: the stream is reset as malformed: {last:?}"
                );
            }
            raw_status_get_works(&conn, 11).await;
        }

        // An oversized message: the frame limit is checked before anything
        // of it is read; the stream is reset, the connection lives.
        let (mut send, mut recv) = raw_echo_stream(&conn, 20).await;
        let mut huge = stream_frame(FrameKind::StreamData, 20, Bytes::new()).header;
        huge.payload_len = DEFAULT_MAX_PAYLOAD + 1;
        send.write_all(&huge.encode()).await.unwrap();
        let err = read_frame(&mut recv, Limits::default())
            .await
            .expect_err("an oversized message is not echoed");
        assert!(
            matches!(
                err,
                tern_transport_iroh::wire::ReadFrameError::Read(ReadError::Reset(code))
                    if code == STREAM_MALFORMED
            ),
            "oversized message resets the stream: {err:?}"
        );
        raw_status_get_works(&conn, 21).await;
        server.shutdown(DRAIN).await;
    });
}

#[test]
fn malformed_bytes_reset_the_stream_not_the_connection() {
    run(async {
        let service = TestService::default();
        let server = node(&service).await;
        let (_endpoint, conn) = raw_connection(&server.peer_addr()).await;

        // A header with a bad version byte.
        let mut bad = request_header(ServiceId::Status, 1, 1, 0).encode();
        bad[0] = 99;
        let err = raw_exchange(&conn, &bad).await.expect_err("no answer");
        assert!(
            matches!(
                err,
                tern_transport_iroh::wire::ReadFrameError::Read(ReadError::Reset(code))
                    if code == STREAM_MALFORMED
            ),
            "malformed frame resets the stream: {err:?}"
        );
        raw_status_get_works(&conn, 2).await;

        // Plain garbage, shorter than a header.
        let err = raw_exchange(&conn, b"\xff\x00garbage")
            .await
            .expect_err("no answer");
        assert!(
            matches!(
                err,
                tern_transport_iroh::wire::ReadFrameError::Read(ReadError::Reset(_))
            ),
            "{err:?}"
        );
        raw_status_get_works(&conn, 3).await;

        // A frame kind that cannot open a call.
        let mut response = request_header(ServiceId::Status, 1, 4, 0);
        response.kind = FrameKind::Response;
        response.deadline_ms = 0;
        let err = raw_exchange(&conn, &response.encode())
            .await
            .expect_err("no answer");
        assert!(
            matches!(
                err,
                tern_transport_iroh::wire::ReadFrameError::Read(ReadError::Reset(_))
            ),
            "{err:?}"
        );
        raw_status_get_works(&conn, 5).await;
        assert_eq!(
            Counters::get(&service.counters.started),
            3,
            "only the three good requests reached the service"
        );
        server.shutdown(DRAIN).await;
    });
}

#[test]
fn oversize_frame_is_answered_resource_exhausted_without_reading_it() {
    run(async {
        let service = TestService::default();
        let server = node(&service).await;
        let (_endpoint, conn) = raw_connection(&server.peer_addr()).await;
        // Only the header is sent: the answer must not wait for the payload.
        let header = request_header(ServiceId::Vm, 6, 42, DEFAULT_MAX_PAYLOAD + 1);
        let answer = raw_exchange(&conn, &header.encode()).await.expect("answer");
        assert_eq!(answer.header.kind, FrameKind::Error);
        assert_eq!(answer.header.request_id, 42);
        assert_eq!(
            Status::decode(&answer.payload).code,
            Code::ResourceExhausted
        );
        raw_status_get_works(&conn, 43).await;
        assert_eq!(
            Counters::get(&service.counters.started),
            1,
            "only the good request reached the service"
        );
        server.shutdown(DRAIN).await;
    });
}

#[test]
fn unknown_service_and_method_are_unimplemented() {
    run(async {
        let server = node(&TestService::default()).await;
        let (_endpoint, conn) = raw_connection(&server.peer_addr()).await;

        // An unknown method of a known service decodes; the answer does too.
        let answer = raw_exchange(&conn, &request_header(ServiceId::Vm, 999, 7, 0).encode())
            .await
            .expect("answer");
        assert_eq!(answer.header.kind, FrameKind::Error);
        assert_eq!(answer.header.request_id, 7);
        assert_eq!(Status::decode(&answer.payload).code, Code::Unimplemented);

        // An unknown service id: the error frame echoes it, so only its raw
        // bytes are read here (our decoder does not know that service).
        let mut raw = request_header(ServiceId::Vm, 1, 8, 0).encode();
        raw[4] = 0xee;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&raw).await.unwrap();
        send.finish().unwrap();
        let bytes = recv.read_to_end(1024).await.unwrap();
        assert!(bytes.len() > HEADER_LEN);
        assert_eq!(bytes[1], FrameKind::Error as u8);
        assert_eq!(bytes[4], 0xee, "service echoed");
        assert_eq!(&bytes[8..16], &8u64.to_le_bytes(), "request id echoed");
        assert_eq!(
            Status::decode(&bytes[HEADER_LEN..]).code,
            Code::Unimplemented
        );
        raw_status_get_works(&conn, 9).await;
        server.shutdown(DRAIN).await;
    });
}

#[test]
fn raw_ping_is_answered_with_a_pong() {
    run(async {
        let server = node(&TestService::default()).await;
        let (_endpoint, conn) = raw_connection(&server.peer_addr()).await;
        let ping = Header {
            kind: FrameKind::Ping,
            priority: Priority::Control,
            idempotent: false,
            service: ServiceId::Connection,
            method: 0,
            request_id: 11,
            payload_len: 4,
            deadline_ms: 0,
        };
        let mut bytes = ping.encode().to_vec();
        bytes.extend_from_slice(b"abcd");
        let pong = raw_exchange(&conn, &bytes).await.expect("pong");
        assert_eq!(pong.header.kind, FrameKind::Pong);
        assert_eq!(pong.header.request_id, 11);
        assert_eq!(pong.payload, Bytes::from_static(b"abcd"));
        server.shutdown(DRAIN).await;
    });
}

#[test]
fn a_full_bulk_lane_does_not_hold_up_control_calls() {
    run(async {
        let service = TestService::default();
        let server = node(&service).await;
        let mut limits = TransportLimits::default();
        limits.lane_in_flight[Priority::Bulk as usize] = 1;
        limits.lane_queue = 1;
        let mut config = IrohConfig::new(rand::random());
        config.limits = limits;
        let caller = node_with(&TestService::default(), config).await;
        let client = caller.client();
        let addr = server.peer_addr();

        // The only bulk slot is taken by a call the service holds.
        let held = {
            let (client, addr) = (client.clone(), addr.clone());
            tokio::spawn(async move {
                client
                    .call(
                        &addr,
                        vm_get("sleep:3000", CALL_TIMEOUT).with_priority(Priority::Bulk),
                    )
                    .await
            })
        };
        let counters = service.counters.clone();
        wait_until("the bulk call runs", || {
            Counters::get(&counters.in_flight) == 1
        })
        .await;

        // Control calls still go straight through.
        for _ in 0..5 {
            let call = Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(CALL_TIMEOUT);
            client.call(&addr, call).await.expect("control call");
        }
        assert!(!held.is_finished(), "the bulk call is still being served");
        held.await.unwrap().expect("the bulk call completes");
        caller.shutdown(DRAIN).await;
        server.shutdown(DRAIN).await;
    });
}

#[test]
fn per_connection_in_flight_limit_answers_resource_exhausted() {
    run(async {
        let service = TestService::default();
        let mut config = IrohConfig::new(rand::random());
        config.limits.max_in_flight_per_connection = 1;
        let server = node_with(&service, config).await;
        let caller = node(&TestService::default()).await;
        let client = caller.client();
        let addr = server.peer_addr();
        let held = {
            let (client, addr) = (client.clone(), addr.clone());
            tokio::spawn(
                async move { client.call(&addr, vm_get("sleep:2000", CALL_TIMEOUT)).await },
            )
        };
        let counters = service.counters.clone();
        wait_until("the first call runs", || {
            Counters::get(&counters.in_flight) == 1
        })
        .await;
        let err = client
            .call(&addr, vm_get("x", CALL_TIMEOUT))
            .await
            .expect_err("over the limit");
        assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
        held.await.unwrap().expect("the first call completes");
        client
            .call(&addr, vm_get("x", CALL_TIMEOUT))
            .await
            .expect("a slot is free again");
        caller.shutdown(DRAIN).await;
        server.shutdown(DRAIN).await;
    });
}

#[test]
fn remote_callers_see_peer_shutting_down() {
    run(async {
        let service = TestService::default();
        let server = node(&service).await;
        let caller = node(&TestService::default()).await;
        let client = caller.client();
        let addr = server.peer_addr();
        client
            .call(&addr, vm_get("warm", CALL_TIMEOUT))
            .await
            .expect("warm-up call");

        // A call the drain deadline will cut.
        let long = {
            let (client, addr) = (client.clone(), addr.clone());
            tokio::spawn(async move {
                client
                    .call(&addr, vm_get("sleep:60000", CALL_TIMEOUT))
                    .await
            })
        };
        let counters = service.counters.clone();
        wait_until("the long call runs", || {
            Counters::get(&counters.in_flight) == 1
        })
        .await;
        let shutdown = tokio::spawn(server.shutdown(Duration::from_secs(3)));

        // While the server drains, new calls on the pooled connection are
        // refused as "shutting down, not delivered".
        let mut refused = None;
        for _ in 0..500 {
            match client.call(&addr, vm_get("x", CALL_TIMEOUT)).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let refused = refused.expect("a call during the drain was refused");
        let t = refused.as_transport().expect("a transport error");
        assert_eq!(t.kind, TransportErrorKind::PeerShuttingDown, "{refused}");
        assert_eq!(t.delivery, Delivery::NotDelivered, "{refused}");

        // The call cut by the close is "peer shutting down, may have been
        // delivered".
        let cut = long.await.unwrap().expect_err("cut by the shutdown");
        match &cut {
            CallError::Transport(t) => {
                assert_eq!(t.kind, TransportErrorKind::PeerShuttingDown, "{cut}");
                assert_eq!(t.delivery, Delivery::MayHaveBeenDelivered, "{cut}");
            }
            other => panic!("expected a transport error, got {other}"),
        }
        shutdown.await.unwrap();
        caller.shutdown(DRAIN).await;
    });
}

#[test]
fn local_shutdown_refuses_new_calls() {
    run(async {
        let server = node(&TestService::default()).await;
        let caller = node(&TestService::default()).await;
        let client: Arc<dyn RpcClient> = caller.client();
        let addr = server.peer_addr();
        caller.shutdown(DRAIN).await;
        let err = client
            .call(&addr, vm_get("x", CALL_TIMEOUT))
            .await
            .expect_err("client is shut down");
        let t = err.as_transport().expect("transport error");
        assert_eq!(t.kind, TransportErrorKind::LocalShutdown);
        assert_eq!(t.delivery, Delivery::NotDelivered);
        server.shutdown(DRAIN).await;
    });
}

#[test]
fn another_key_at_the_address_is_wrong_peer_and_not_delivered() {
    run(async {
        let impostor_service = TestService::default();
        let impostor = node(&impostor_service).await;
        let caller = node(&TestService::default()).await;
        // The impostor's address under another node's id.
        let mut addr = impostor.peer_addr();
        addr.id = tern_protocol::PeerId::from_bytes(
            *iroh::SecretKey::from_bytes(&rand::random())
                .public()
                .as_bytes(),
        );
        let err = caller
            .client()
            .call(&addr, vm_get("x", Duration::from_secs(5)))
            .await
            .expect_err("an impostor must not answer");
        let t = err.as_transport().expect("a transport error");
        assert!(
            matches!(
                t.kind,
                TransportErrorKind::WrongPeer
                    | TransportErrorKind::Unreachable
                    | TransportErrorKind::TimedOut
            ),
            "{err}"
        );
        assert_eq!(t.delivery, Delivery::NotDelivered, "{err}");
        assert_eq!(Counters::get(&impostor_service.counters.started), 0);
        caller.shutdown(DRAIN).await;
        impostor.shutdown(DRAIN).await;
    });
}

#[test]
fn a_node_bound_to_all_interfaces_is_reachable_at_its_advertised_address() {
    run(async {
        let config = IrohConfig::new(rand::random()).with_bind_addr("0.0.0.0:0".parse().unwrap());
        let server = node_with(&TestService::default(), config).await;
        let addr = server.peer_addr();
        let direct = &addr.iroh.as_ref().unwrap().direct;
        assert!(!direct.is_empty(), "advertises at least one address");
        assert!(
            direct
                .iter()
                .all(|a| !a.ip().is_unspecified() && a.port() == server.local_addr().port()),
            "{direct:?}"
        );
        let caller = node(&TestService::default()).await;
        caller
            .client()
            .call(&addr, vm_get("x", CALL_TIMEOUT))
            .await
            .expect("reachable at the advertised address");
        caller.shutdown(DRAIN).await;
        server.shutdown(DRAIN).await;
    });
}
