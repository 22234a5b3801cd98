//! The checks. Each starts its own nodes, so checks run in parallel.
//!
//! A check returns an error (with context) rather than panicking, so the
//! failure message names the transport and what was expected.

use crate::wait_until;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures::future::join_all;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::frame::DEFAULT_MAX_PAYLOAD;
use tern_protocol::rpc::call_typed;
use tern_protocol::{
    Call, CallError, Code, Delivery, PeerAddr, Priority, RpcClient, TransportErrorKind, pb,
};

use crate::service::{Counters, STATUS_NODE_ID, TestService};
use crate::{Harness, NodeSpec, TestNode, random_key};

/// Timeout for calls expected to succeed: generous, since the machine is
/// shared; a check never asserts on speed.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Time a graceful shutdown may drain.
const DRAIN: Duration = Duration::from_secs(10);

async fn serve<H: Harness>(h: &H, service: &TestService) -> anyhow::Result<H::Node> {
    h.start(NodeSpec {
        secret_key: random_key(),
        handler: service.dispatcher(),
        listen: None,
    })
    .await
    .context("starting a serving node")
}

async fn client_node<H: Harness>(h: &H) -> anyhow::Result<H::Node> {
    h.start(NodeSpec {
        secret_key: random_key(),
        handler: TestService::default().dispatcher(),
        listen: None,
    })
    .await
    .context("starting a calling node")
}

async fn echo(
    client: &dyn RpcClient,
    peer: &PeerAddr,
    data: Bytes,
    priority: Priority,
) -> Result<Bytes, CallError> {
    let payload = pb::RaftPayload { data }.encode_to_vec().into();
    let call = Call::new(methods::RAFT_APPEND_ENTRIES, payload)
        .with_timeout(CALL_TIMEOUT)
        .with_priority(priority);
    let bytes = client.call(peer, call).await?;
    let resp = pb::RaftPayload::decode(bytes).map_err(|e| {
        CallError::Application(tern_protocol::Status::internal(format!("bad echo: {e}")))
    })?;
    Ok(resp.data)
}

fn vm_get(vm_id: &str, timeout: Duration) -> Call {
    let payload = pb::GetVmRequest {
        vm_id: vm_id.into(),
    }
    .encode_to_vec()
    .into();
    Call::new(methods::VM_GET, payload).with_timeout(timeout)
}

/// A call reaches the peer and its answer comes back intact, both as raw
/// bytes and as typed messages.
pub async fn unary_round_trip<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let server = serve(&*h, &TestService::default()).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let data = echo(
        &*client,
        &server.addr(),
        Bytes::from_static(b"hello, tern"),
        Priority::Replication,
    )
    .await?;
    ensure!(
        data == Bytes::from_static(b"hello, tern"),
        "echo returned {data:?}"
    );
    let empty = echo(&*client, &server.addr(), Bytes::new(), Priority::Normal).await?;
    ensure!(
        empty.is_empty(),
        "empty echo returned {} bytes",
        empty.len()
    );
    let status: pb::NodeStatus = call_typed(
        &*client,
        &server.addr(),
        methods::STATUS_GET,
        &pb::StatusRequest {},
        CALL_TIMEOUT,
    )
    .await?;
    ensure!(
        status.node_id == STATUS_NODE_ID,
        "status answered {status:?}"
    );
    ensure!(
        client.transport().as_str() == h.name(),
        "client names transport {}",
        client.transport()
    );
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// The service sees the caller's real identity, the one its key proves.
pub async fn caller_identity_is_authenticated<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let server = serve(&*h, &TestService::default()).await?;
    let caller = client_node(&*h).await?;
    let call = Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(CALL_TIMEOUT);
    let bytes = caller.client().call(&server.addr(), call).await?;
    let seen = pb::RaftPayload::decode(bytes)?.data;
    ensure!(
        seen.as_ref() == caller.id().as_bytes(),
        "service saw caller {} but the caller is {}",
        hex(&seen),
        caller.id()
    );
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A service's error reaches the caller as the same code and message.
pub async fn application_errors_pass_through<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let server = serve(&*h, &TestService::default()).await?;
    let caller = client_node(&*h).await?;
    for code in [
        Code::NotFound,
        Code::InvalidArgument,
        Code::PermissionDenied,
        Code::FailedPrecondition,
    ] {
        let err = caller
            .client()
            .call(
                &server.addr(),
                vm_get(&format!("fail:{}", code as u32), CALL_TIMEOUT),
            )
            .await
            .err()
            .context("a failing call succeeded")?;
        match err {
            CallError::Application(status) => {
                ensure!(status.code == code, "expected {code:?}, got {status}");
                ensure!(
                    status.message == "requested failure",
                    "message changed: {status}"
                );
            }
            other => bail!("expected an application error {code:?}, got {other}"),
        }
    }
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// A service the node does not serve is `Unimplemented`, and the
/// connection stays usable.
pub async fn unknown_service_is_unimplemented<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let server = serve(&*h, &TestService::default()).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let payload = pb::HealthCheckRequest {}.encode_to_vec().into();
    let err = client
        .call(
            &server.addr(),
            Call::new(methods::HEALTH_CHECK, payload).with_timeout(CALL_TIMEOUT),
        )
        .await
        .err()
        .context("a call to an unserved service succeeded")?;
    ensure!(
        err.code() == Some(Code::Unimplemented),
        "expected Unimplemented, got {err}"
    );
    echo(
        &*client,
        &server.addr(),
        Bytes::from_static(b"still fine"),
        Priority::Normal,
    )
    .await?;
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// Number of calls [`many_concurrent_calls`] keeps in flight at once.
const CONCURRENT_CALLS: usize = 256;

/// Hundreds of calls in flight at once on one shared client all get their
/// own answers.
pub async fn many_concurrent_calls<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let addr = server.addr();
    let calls = (0..CONCURRENT_CALLS).map(|i| {
        let client = client.clone();
        let addr = addr.clone();
        async move {
            let data = Bytes::from(format!("call-{i}-").repeat(i % 50 + 1));
            let back = echo(&*client, &addr, data.clone(), Priority::Normal).await?;
            ensure!(back == data, "call {i} got another call's answer");
            Ok::<_, anyhow::Error>(())
        }
    });
    for (i, result) in join_all(calls).await.into_iter().enumerate() {
        result.with_context(|| format!("concurrent call {i}"))?;
    }
    let started = Counters::get(&service.counters.started);
    ensure!(
        started == CONCURRENT_CALLS as u64,
        "service saw {started} calls"
    );
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// Callers [`sustained_small_calls`] runs at once.
const SUSTAINED_CALLERS: usize = 512;
/// Calls each of them makes, one after the other.
const SUSTAINED_CALLS_EACH: usize = 8;

/// Many callers each making small calls back to back on one shared client
/// all succeed: a burst of small messages is ordinary traffic, not a flood
/// to be refused (HTTP/2 stacks count small DATA frames as framing overhead
/// and may close a connection that buffers too many of them).
pub async fn sustained_small_calls<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let addr = server.addr();
    let callers = (0..SUSTAINED_CALLERS).map(|i| {
        let client = client.clone();
        let addr = addr.clone();
        async move {
            for n in 0..SUSTAINED_CALLS_EACH {
                let data = Bytes::from(format!("{i:08}-{n:08}-").repeat(4));
                let back = echo(&*client, &addr, data.clone(), Priority::Normal)
                    .await
                    .with_context(|| format!("caller {i}, call {n}"))?;
                ensure!(
                    back == data,
                    "caller {i} call {n} got another call's answer"
                );
            }
            Ok::<_, anyhow::Error>(())
        }
    });
    let failed: Vec<anyhow::Error> = join_all(callers)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if let Some(first) = failed.first() {
        anyhow::bail!(
            "{} of {SUSTAINED_CALLERS} callers failed; the first: {first:#}",
            failed.len()
        );
    }
    let started = Counters::get(&service.counters.started);
    let expected = (SUSTAINED_CALLERS * SUSTAINED_CALLS_EACH) as u64;
    ensure!(
        started == expected,
        "service saw {started} of {expected} calls"
    );
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// A call that outlives its timeout fails as `TimedOut`, "may have been
/// delivered", and the next call on the same client works.
pub async fn deadline_is_enforced<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let server = serve(&*h, &TestService::default()).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    // Warm the connection so the timeout hits the call, not the dial.
    echo(
        &*client,
        &server.addr(),
        Bytes::from_static(b"warm"),
        Priority::Normal,
    )
    .await?;
    let err = client
        .call(
            &server.addr(),
            vm_get("sleep:30000", Duration::from_millis(500)),
        )
        .await
        .err()
        .context("a 30 s call finished within a 500 ms timeout")?;
    let transport = err
        .as_transport()
        .with_context(|| format!("expected a transport error, got {err}"))?;
    ensure!(
        transport.kind == TransportErrorKind::TimedOut,
        "expected TimedOut, got {err}"
    );
    ensure!(
        transport.delivery == Delivery::MayHaveBeenDelivered,
        "a sent request must be 'may have been delivered': {err}"
    );
    echo(
        &*client,
        &server.addr(),
        Bytes::from_static(b"after timeout"),
        Priority::Normal,
    )
    .await?;
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// Calling a node that has stopped fails quickly with a transport error
/// that says the request was not delivered.
pub async fn stopped_peer_is_not_delivered<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let server = serve(&*h, &TestService::default()).await?;
    let addr = server.addr();
    server.shutdown(DRAIN).await;
    let caller = client_node(&*h).await?;
    let call = vm_get("x", Duration::from_secs(5));
    let err = caller
        .client()
        .call(&addr, call)
        .await
        .err()
        .context("a stopped node answered")?;
    let transport = err
        .as_transport()
        .with_context(|| format!("expected a transport error, got {err}"))?;
    ensure!(
        transport.delivery == Delivery::NotDelivered,
        "nothing was listening, yet: {err}"
    );
    caller.shutdown(DRAIN).await;
    Ok(())
}

/// Transport failures a caller may meet right after a peer restarts (its
/// pooled connection to the old process is dead) before it must recover.
const RESTART_FAILURES_ALLOWED: usize = 3;
/// Pause between those attempts.
const RESTART_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A peer that restarts with the same key at the same address is reached
/// again by the same client without any step from the caller.
pub async fn peer_restart_with_same_key_recovers<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let key = random_key();
    let service = TestService::default();
    let spec = |listen| NodeSpec {
        secret_key: key,
        handler: service.dispatcher(),
        listen,
    };
    let server = h.start(spec(None)).await?;
    let (addr, listen) = (server.addr(), server.listen_addr());
    let caller = client_node(&*h).await?;
    let client = caller.client();
    echo(
        &*client,
        &addr,
        Bytes::from_static(b"before"),
        Priority::Normal,
    )
    .await?;
    server.shutdown(DRAIN).await;
    let restarted = h
        .start(spec(Some(listen)))
        .await
        .context("restarting on the same address")?;
    ensure!(restarted.id() == addr.id, "same key, different id");
    // The first call may meet the old, now closed connection; the client
    // must notice and re-dial by itself. Allow a few transport failures
    // (each one safe to retry), never an application error.
    let mut failures = Vec::new();
    loop {
        match echo(
            &*client,
            &restarted.addr(),
            Bytes::from_static(b"after"),
            Priority::Normal,
        )
        .await
        {
            Ok(data) => {
                ensure!(
                    data == Bytes::from_static(b"after"),
                    "wrong echo after restart"
                );
                break;
            }
            Err(CallError::Transport(e)) if failures.len() < RESTART_FAILURES_ALLOWED => {
                failures.push(e);
                tokio::time::sleep(RESTART_RETRY_PAUSE).await;
            }
            Err(e) => bail!("no recovery after restart: {e}; earlier failures: {failures:?}"),
        }
    }
    caller.shutdown(DRAIN).await;
    restarted.shutdown(DRAIN).await;
    Ok(())
}

/// Another node listening at a known peer's old address is not that peer:
/// the call fails and nothing reaches the impostor's service.
pub async fn different_key_at_old_address_is_not_trusted<H: Harness>(
    h: Arc<H>,
) -> anyhow::Result<()> {
    let original = serve(&*h, &TestService::default()).await?;
    let (addr, listen) = (original.addr(), original.listen_addr());
    original.shutdown(DRAIN).await;
    let impostor_service = TestService::default();
    let impostor = h
        .start(NodeSpec {
            secret_key: random_key(),
            handler: impostor_service.dispatcher(),
            listen: Some(listen),
        })
        .await
        .context("starting the impostor on the old address")?;
    ensure!(impostor.id() != addr.id, "impostor has the original's key");
    let caller = client_node(&*h).await?;
    let result = caller
        .client()
        .call(&addr, vm_get("x", Duration::from_secs(5)))
        .await;
    ensure!(
        result.is_err(),
        "a call to the original's id was answered by the impostor"
    );
    let reached = Counters::get(&impostor_service.counters.started);
    ensure!(
        reached == 0,
        "{reached} calls meant for the original reached the impostor's service"
    );
    caller.shutdown(DRAIN).await;
    impostor.shutdown(DRAIN).await;
    Ok(())
}

/// Calls [`shutdown_drains_in_flight_calls`] keeps in flight during shutdown.
const DRAINED_CALLS: usize = 5;

/// Shutdown lets calls in flight finish, then refuses new ones as "not
/// delivered".
pub async fn shutdown_drains_in_flight_calls<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let addr = server.addr();
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let in_flight: Vec<_> = (0..DRAINED_CALLS)
        .map(|_| {
            let client = client.clone();
            let addr = addr.clone();
            tokio::spawn(
                async move { client.call(&addr, vm_get("sleep:1000", CALL_TIMEOUT)).await },
            )
        })
        .collect();
    let counters = service.counters.clone();
    wait_until("every call reached the service", CALL_TIMEOUT, || {
        Counters::get(&counters.in_flight) == DRAINED_CALLS as u64
    })
    .await?;
    server.shutdown(DRAIN).await;
    for (i, call) in in_flight.into_iter().enumerate() {
        call.await?
            .with_context(|| format!("in-flight call {i} was not drained"))?;
    }
    let err = client
        .call(&addr, vm_get("x", Duration::from_secs(5)))
        .await
        .err()
        .context("a node that shut down answered")?;
    let transport = err
        .as_transport()
        .with_context(|| format!("expected a transport error, got {err}"))?;
    ensure!(
        transport.delivery == Delivery::NotDelivered,
        "after shutdown: {err}"
    );
    caller.shutdown(DRAIN).await;
    Ok(())
}

/// Size of one bulk chunk in [`control_calls_complete_during_bulk_transfer`].
const BULK_CHUNK: usize = 1 << 20;
/// Chunks in the bulk transfer: 64 MiB in all.
const BULK_CHUNKS: usize = 64;
/// Bulk chunks in flight at once.
const BULK_PARALLEL: usize = 4;
/// Control calls made while the bulk transfer runs.
const CONTROL_CALLS: usize = 20;

/// With a 64 MiB bulk transfer in flight, control-lane calls still
/// complete. (Their latency is measured by the benches, not asserted here.)
pub async fn control_calls_complete_during_bulk_transfer<H: Harness>(
    h: Arc<H>,
) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let addr = server.addr();
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let chunk = Bytes::from(vec![0x42u8; BULK_CHUNK]);
    let bulk = {
        let (client, addr) = (client.clone(), addr.clone());
        tokio::spawn(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(BULK_PARALLEL));
            let sends = (0..BULK_CHUNKS).map(|i| {
                let (client, addr, chunk, sem) =
                    (client.clone(), addr.clone(), chunk.clone(), sem.clone());
                async move {
                    let _permit = sem.acquire().await?;
                    let payload = pb::SnapshotChunk {
                        snapshot_id: "conformance".into(),
                        offset: (i * BULK_CHUNK) as u64,
                        data: chunk,
                        ..Default::default()
                    }
                    .encode_to_vec()
                    .into();
                    let call = Call::new(methods::RAFT_SNAPSHOT, payload)
                        .with_timeout(Duration::from_secs(60));
                    client.call(&addr, call).await?;
                    Ok::<_, anyhow::Error>(())
                }
            });
            for r in join_all(sends).await {
                r?;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let counters = service.counters.clone();
    wait_until("bulk bytes reach the service", CALL_TIMEOUT, || {
        Counters::get(&counters.bulk_bytes) > 0
    })
    .await?;
    for i in 0..CONTROL_CALLS {
        let call = Call::new(methods::RAFT_VOTE, Bytes::new())
            .with_timeout(CALL_TIMEOUT)
            .with_priority(Priority::Control);
        client
            .call(&addr, call)
            .await
            .with_context(|| format!("control call {i} during the bulk transfer"))?;
    }
    bulk.await?.context("the bulk transfer")?;
    let bytes = Counters::get(&service.counters.bulk_bytes);
    ensure!(
        bytes == (BULK_CHUNK * BULK_CHUNKS) as u64,
        "bulk delivered {bytes} bytes"
    );
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// A payload over the frame limit is refused, with `ResourceExhausted` if
/// the peer answers, and the connection stays usable.
pub async fn oversize_payload_is_refused<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let huge = Bytes::from(vec![7u8; DEFAULT_MAX_PAYLOAD as usize + 1]);
    let err = echo(&*client, &server.addr(), huge, Priority::Bulk)
        .await
        .err()
        .context("a payload over the limit was accepted")?;
    match &err {
        CallError::Application(s) => {
            ensure!(
                s.code == Code::ResourceExhausted,
                "expected ResourceExhausted, got {s}"
            )
        }
        CallError::Transport(t) => {
            ensure!(
                t.delivery == Delivery::NotDelivered,
                "refused locally must be not delivered: {t}"
            )
        }
    }
    ensure!(
        Counters::get(&service.counters.started) == 0,
        "the oversized call reached the service"
    );
    echo(
        &*client,
        &server.addr(),
        Bytes::from_static(b"small"),
        Priority::Normal,
    )
    .await
    .context("after an oversized call")?;
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// Dropping a call's future abandons it at the peer too: the service's
/// work is cancelled, not left running.
pub async fn dropped_call_is_cancelled_at_the_peer<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let addr = server.addr();
    let call = {
        let (client, addr) = (client.clone(), addr.clone());
        tokio::spawn(async move {
            client
                .call(&addr, vm_get("sleep:60000", Duration::from_secs(90)))
                .await
        })
    };
    let counters = service.counters.clone();
    wait_until("the call reached the service", CALL_TIMEOUT, || {
        Counters::get(&counters.in_flight) == 1
    })
    .await?;
    call.abort();
    let _ = call.await;
    wait_until("the service's work was cancelled", CALL_TIMEOUT, || {
        Counters::get(&counters.cancelled) == 1 && Counters::get(&counters.in_flight) == 0
    })
    .await?;
    echo(
        &*client,
        &addr,
        Bytes::from_static(b"next"),
        Priority::Normal,
    )
    .await?;
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// `ping` reaches the peer and measures a round trip; a stopped peer's ping
/// fails as a transport error.
pub async fn ping_measures_a_round_trip<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let server = serve(&*h, &TestService::default()).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let rtt = client.ping(&server.addr(), CALL_TIMEOUT).await?;
    ensure!(
        rtt > Duration::ZERO && rtt < CALL_TIMEOUT,
        "implausible round trip {rtt:?}"
    );
    let addr = server.addr();
    server.shutdown(DRAIN).await;
    let err = client
        .ping(&addr, Duration::from_secs(5))
        .await
        .err()
        .context("a stopped node answered a ping")?;
    ensure!(
        err.as_transport().is_some(),
        "expected a transport error, got {err}"
    );
    caller.shutdown(DRAIN).await;
    Ok(())
}
