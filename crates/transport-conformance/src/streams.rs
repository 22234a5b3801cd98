//! The streaming checks: what [`tern_protocol::RpcClient::open_stream`]
//! and [`tern_protocol::Handler::handle_stream`] promise, run unchanged
//! against each transport.
//!
//! Each starts its own nodes. None asserts on speed: the bounded-memory
//! checks count bytes, and the waits that decide "the sender is blocked"
//! only make a check pass sooner, never fail it.

use crate::wait_until;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::stream::STREAM_WINDOW;
use tern_protocol::{
    Call, CallError, CallStream, Code, Delivery, PeerAddr, Priority, RpcClient, StreamCall,
    TransportErrorKind, pb,
};

use crate::service::{Counters, TestService};
use crate::{Harness, NodeSpec, TestNode, random_key};

/// Bounds for opening and idling on streams expected to work: generous,
/// since the machine is shared; no check asserts on speed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a graceful shutdown may drain.
const DRAIN: Duration = Duration::from_secs(2);

/// Messages [`stream_messages_arrive_in_order`] sends each way.
const ORDERED_MESSAGES: u64 = 2_000;

/// Size of the messages of the stalled-reader checks.
const STALL_MESSAGE: usize = 64 * 1024;

/// The most bytes a stalled reader may let its sender get ahead: the
/// contract's stream window, plus the message being written and one in
/// each end's hand-over slot, plus one more for the transport's own
/// framing buffers.
const STALL_BOUND: u64 = STREAM_WINDOW as u64 + 4 * STALL_MESSAGE as u64;

/// A send that has not completed after this long counts as held back by
/// the window. Only ends the probing loop; a slow machine makes it end
/// later, never wrongly.
const BLOCKED_AFTER: Duration = Duration::from_secs(2);

/// How long a flooding handler's count must stay still before it counts as
/// stopped by back-pressure.
const SETTLED_AFTER: Duration = Duration::from_secs(1);

/// Streams [`many_concurrent_small_streams`] runs at once.
const CONCURRENT_STREAMS: usize = 10_000;

/// Control calls made while a stream saturates the connection.
const CONTROL_CALLS: usize = 20;

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

/// Opens a `Vm/Watch` with a command for the test service.
async fn watch(
    client: &dyn RpcClient,
    peer: &PeerAddr,
    command: &str,
    idle: Duration,
) -> Result<CallStream, CallError> {
    let request = pb::WatchVmsRequest {
        from_revision: 0,
        vm_id: command.into(),
    }
    .encode_to_vec()
    .into();
    let call = StreamCall::new(methods::VM_WATCH, request)
        .with_open_timeout(OPEN_TIMEOUT)
        .with_idle_timeout(idle);
    client.open_stream(peer, call).await
}

/// Opens a `Raft/AppendStream` in a mode of the test service.
async fn append_stream(
    client: &dyn RpcClient,
    peer: &PeerAddr,
    mode: &'static [u8],
) -> Result<CallStream, CallError> {
    let request = raft(Bytes::from_static(mode));
    let call = StreamCall::new(methods::RAFT_APPEND_STREAM, request)
        .with_open_timeout(OPEN_TIMEOUT)
        .with_idle_timeout(IDLE_TIMEOUT);
    client.open_stream(peer, call).await
}

fn raft(data: Bytes) -> Bytes {
    pb::RaftPayload { data }.encode_to_vec().into()
}

fn revision_of(message: Bytes) -> anyhow::Result<u64> {
    Ok(pb::VmEvent::decode(message)
        .context("an undecodable event")?
        .revision)
}

/// Messages arrive in the order they were sent, each once, in both
/// directions, and a finished stream ends cleanly.
pub async fn stream_messages_arrive_in_order<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let server = serve(&*h, &TestService::default()).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let addr = server.addr();
    watch_arrives_in_order(&*client, &addr).await?;
    echo_arrives_in_order(&*client, &addr).await?;
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// A server stream's events arrive in revision order and end cleanly.
async fn watch_arrives_in_order(client: &dyn RpcClient, addr: &PeerAddr) -> anyhow::Result<()> {
    let mut stream = watch(
        client,
        addr,
        &format!("count:{ORDERED_MESSAGES}:16"),
        IDLE_TIMEOUT,
    )
    .await?;
    ensure!(
        stream.sender.is_none(),
        "a server-streaming call has no sender"
    );
    for expected in 1..=ORDERED_MESSAGES {
        let message = stream
            .receiver
            .next()
            .await
            .with_context(|| format!("the watch ended before event {expected}"))??;
        let revision = revision_of(message)?;
        ensure!(
            revision == expected,
            "event {expected} arrived as revision {revision}"
        );
    }
    ensure!(
        stream.receiver.next().await.is_none(),
        "the watch did not end cleanly after its last event"
    );
    Ok(())
}

/// A bidirectional stream's echoes come back in the order sent, while the
/// caller is still sending, and end after the caller finished.
async fn echo_arrives_in_order(client: &dyn RpcClient, addr: &PeerAddr) -> anyhow::Result<()> {
    let CallStream { sender, receiver } = append_stream(client, addr, b"echo").await?;
    let mut sender = sender.context("a bidirectional call has a sender")?;
    let mut receiver = receiver;
    let send = async move {
        for i in 0..ORDERED_MESSAGES {
            sender
                .send(raft(Bytes::from(format!("message-{i}"))))
                .await
                .with_context(|| format!("sending message {i}"))?;
        }
        sender.finish().await.context("finishing")?;
        Ok::<_, anyhow::Error>(())
    };
    let receive = async move {
        for i in 0..ORDERED_MESSAGES {
            let message = receiver
                .next()
                .await
                .with_context(|| format!("the echo ended before message {i}"))??;
            let data = pb::RaftPayload::decode(message)?.data;
            ensure!(
                data.as_ref() == format!("message-{i}").as_bytes(),
                "echo {i} was {data:?}"
            );
        }
        ensure!(
            receiver.next().await.is_none(),
            "the echo did not end cleanly after the caller finished"
        );
        Ok::<_, anyhow::Error>(())
    };
    let (sent, received) = tokio::join!(send, receive);
    sent?;
    received?;
    Ok(())
}

/// A reader that stops reading stops its sender after a bounded number of
/// bytes, both ways: the caller's sends block when the handler does not
/// read, and a handler's sends block when the caller does not read.
pub async fn stalled_reader_bounds_the_sender<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let addr = server.addr();

    // Caller to server: the handler never reads.
    let stream = append_stream(&*client, &addr, b"stall").await?;
    let mut sender = stream.sender.context("a bidirectional call has a sender")?;
    let message = raft(Bytes::from(vec![0x5a; STALL_MESSAGE]));
    let mut accepted: u64 = 0;
    loop {
        match tokio::time::timeout(BLOCKED_AFTER, sender.send(message.clone())).await {
            Ok(Ok(())) => accepted += message.len() as u64,
            Ok(Err(e)) => bail!("a send to a stalled reader failed instead of waiting: {e}"),
            Err(_) => break,
        }
        ensure!(
            accepted <= STALL_BOUND,
            "the sender got {accepted} bytes ahead of a stalled reader (bound {STALL_BOUND})"
        );
    }
    ensure!(accepted > 0, "not one message was taken");
    drop(sender);
    drop(stream.receiver);

    // Server to caller: the caller never reads.
    let before = Counters::get(&service.counters.stream_sent_bytes);
    let stalled = watch(
        &*client,
        &addr,
        &format!("flood:{STALL_MESSAGE}"),
        IDLE_TIMEOUT,
    )
    .await?;
    let counters = service.counters.clone();
    wait_until("the handler sent something", OPEN_TIMEOUT, || {
        Counters::get(&counters.stream_sent_bytes) > before
    })
    .await?;
    let mut last = Counters::get(&counters.stream_sent_bytes);
    loop {
        tokio::time::sleep(SETTLED_AFTER).await;
        let now = Counters::get(&counters.stream_sent_bytes);
        ensure!(
            now - before <= STALL_BOUND,
            "the handler got {} bytes ahead of a caller that reads nothing (bound {STALL_BOUND})",
            now - before
        );
        if now == last {
            break;
        }
        last = now;
    }
    drop(stalled);
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// Dropping the caller's receiver cancels the handler's work at the peer;
/// a handler that fails ends the caller's stream with its status after the
/// messages it sent; a refused opening is an application error.
pub async fn streams_are_cancelled_both_ways<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let addr = server.addr();
    dropping_the_receiver_stops_the_handler(&*client, &addr, &service.counters).await?;
    a_failing_handler_ends_the_stream(&*client, &addr).await?;
    refusals_reach_the_caller(&*client, &addr).await?;
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// The caller drops a stream the handler is still serving.
async fn dropping_the_receiver_stops_the_handler(
    client: &dyn RpcClient,
    addr: &PeerAddr,
    counters: &Counters,
) -> anyhow::Result<()> {
    // The caller drops a stream the handler is still serving: a quiet
    // handler's future is dropped (cancelled); a flooding one is either
    // dropped or sees its send fail and returns; either way its work ends.
    for command in ["quiet", "flood:1024"] {
        let cancelled = Counters::get(&counters.cancelled);
        let mut stream = watch(client, addr, command, IDLE_TIMEOUT).await?;
        if command != "quiet" {
            stream
                .receiver
                .next()
                .await
                .context("the flood ended at once")??;
        }
        wait_until("the handler runs", OPEN_TIMEOUT, || {
            Counters::get(&counters.in_flight) == 1
        })
        .await?;
        drop(stream);
        wait_until(
            &format!("the handler of {command:?} stopped"),
            OPEN_TIMEOUT,
            || Counters::get(&counters.in_flight) == 0,
        )
        .await?;
        if command == "quiet" {
            ensure!(
                Counters::get(&counters.cancelled) == cancelled + 1,
                "the quiet handler ended without being cancelled"
            );
        }
    }

    Ok(())
}

/// A handler's error reaches the caller after the messages sent before it.
async fn a_failing_handler_ends_the_stream(
    client: &dyn RpcClient,
    addr: &PeerAddr,
) -> anyhow::Result<()> {
    // The handler ends the stream with an error after three messages.
    let mut stream = watch(
        client,
        addr,
        &format!("fail:3:{}", Code::FailedPrecondition as u32),
        IDLE_TIMEOUT,
    )
    .await?;
    for expected in 1..=3 {
        let message = stream
            .receiver
            .next()
            .await
            .context("the stream ended early")??;
        ensure!(revision_of(message)? == expected, "out of order");
    }
    match stream.receiver.next().await {
        Some(Err(CallError::Application(status))) => ensure!(
            status.code == Code::FailedPrecondition && status.message == "requested failure",
            "the handler's status changed on the way: {status}"
        ),
        other => bail!("expected the handler's error after its messages, got {other:?}"),
    }
    ensure!(
        stream.receiver.next().await.is_none(),
        "a stream went on after its error"
    );

    Ok(())
}

/// A request the handler refuses, and a unary method asked for as a
/// stream.
async fn refusals_reach_the_caller(client: &dyn RpcClient, addr: &PeerAddr) -> anyhow::Result<()> {
    // A request the handler refuses: its status reaches the caller (at
    // the opening or as the stream's first item), and a unary method is
    // not opened as a stream.
    let request = pb::HealthCheckRequest {}.encode_to_vec().into();
    let unserved = StreamCall::new(methods::VM_WATCH, request);
    match client.open_stream(addr, unserved).await {
        Ok(mut s) => match s.receiver.next().await {
            Some(Err(CallError::Application(status))) => ensure!(
                status.code == Code::InvalidArgument,
                "expected InvalidArgument, got {status}"
            ),
            other => bail!("a bad watch request went through: {other:?}"),
        },
        Err(CallError::Application(status)) => ensure!(
            status.code == Code::InvalidArgument,
            "expected InvalidArgument, got {status}"
        ),
        Err(other) => bail!("a bad watch request failed in transport: {other}"),
    }
    let unary = StreamCall::new(methods::VM_GET, Bytes::new());
    let err = client
        .open_stream(addr, unary)
        .await
        .err()
        .context("a unary method opened as a stream")?;
    ensure!(
        !err.may_have_been_delivered() || err.code() == Some(Code::Unimplemented),
        "a unary method as a stream must be refused before delivery: {err}"
    );
    Ok(())
}

/// A stream with nothing to say fails after its idle bound as `TimedOut`,
/// and the handler's work is cancelled.
pub async fn idle_stream_times_out<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let counters = service.counters.clone();
    let mut stream = watch(
        &*client,
        &server.addr(),
        "quiet",
        Duration::from_millis(500),
    )
    .await?;
    match stream.receiver.next().await {
        Some(Err(CallError::Transport(e))) => {
            ensure!(
                e.kind == TransportErrorKind::TimedOut,
                "expected TimedOut, got {e}"
            );
            ensure!(
                e.delivery == Delivery::MayHaveBeenDelivered,
                "an open stream's request was delivered: {e}"
            );
        }
        other => bail!("a quiet stream past its idle bound gave {other:?}"),
    }
    ensure!(
        stream.receiver.next().await.is_none(),
        "a timed-out stream went on"
    );
    drop(stream);
    wait_until("the quiet handler was cancelled", OPEN_TIMEOUT, || {
        Counters::get(&counters.cancelled) == 1 && Counters::get(&counters.in_flight) == 0
    })
    .await?;
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// While a stream saturates the path to a peer (a flood read as fast as
/// the caller can), control-lane calls still complete. (Their latency is
/// measured by the benches, not asserted here.)
pub async fn control_calls_complete_during_a_saturating_stream<H: Harness>(
    h: Arc<H>,
) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let addr = server.addr();
    let mut flood = watch(&*client, &addr, "flood:262144", IDLE_TIMEOUT).await?;
    let reader = tokio::spawn(async move {
        let mut read = 0u64;
        while let Some(message) = flood.receiver.next().await {
            message?;
            read += 1;
        }
        Ok::<_, CallError>(read)
    });
    let counters = service.counters.clone();
    wait_until("the flood is flowing", OPEN_TIMEOUT, || {
        Counters::get(&counters.stream_sent) > 16
    })
    .await?;
    for i in 0..CONTROL_CALLS {
        let call = Call::new(methods::RAFT_VOTE, Bytes::new())
            .with_timeout(OPEN_TIMEOUT)
            .with_priority(Priority::Control);
        client
            .call(&addr, call)
            .await
            .with_context(|| format!("control call {i} during the stream"))?;
    }
    ensure!(
        !reader.is_finished(),
        "the flood ended while control calls ran"
    );
    reader.abort();
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}

/// Transport failures a caller may meet right after a peer restarts before
/// a new stream must open.
const RESTART_FAILURES_ALLOWED: usize = 3;
/// Pause between those attempts.
const RESTART_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A peer that restarts mid-stream breaks the stream with a transport
/// error after the messages that arrived (never a clean end), and a new
/// stream to the restarted peer opens.
pub async fn peer_restart_mid_stream<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
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
    let mut stream = watch(&*client, &addr, "flood:64", IDLE_TIMEOUT).await?;
    let mut expected = 1;
    for _ in 0..10 {
        let message = stream.receiver.next().await.context("the flood ended")??;
        ensure!(revision_of(message)? == expected, "out of order");
        expected += 1;
    }
    let stopping = tokio::spawn(server.shutdown(DRAIN));
    loop {
        match stream.receiver.next().await {
            Some(Ok(message)) => {
                ensure!(
                    revision_of(message)? == expected,
                    "out of order during the restart"
                );
                expected += 1;
            }
            Some(Err(CallError::Transport(_))) => break,
            Some(Err(other)) => bail!("a restart broke the stream with {other}"),
            None => bail!("a stream to a stopped peer ended cleanly"),
        }
    }
    ensure!(
        stream.receiver.next().await.is_none(),
        "a broken stream went on"
    );
    stopping.await?;
    let restarted = h
        .start(spec(Some(listen)))
        .await
        .context("restarting on the same address")?;
    let mut failures = Vec::new();
    let mut stream = loop {
        match watch(&*client, &restarted.addr(), "count:3:8", IDLE_TIMEOUT).await {
            Ok(stream) => break stream,
            Err(CallError::Transport(e)) if failures.len() < RESTART_FAILURES_ALLOWED => {
                failures.push(e);
                tokio::time::sleep(RESTART_RETRY_PAUSE).await;
            }
            Err(e) => bail!("no stream after restart: {e}; earlier failures: {failures:?}"),
        }
    };
    for expected in 1..=3 {
        let message = stream
            .receiver
            .next()
            .await
            .context("the new stream ended early")??;
        ensure!(revision_of(message)? == expected, "out of order");
    }
    ensure!(stream.receiver.next().await.is_none(), "no clean end");
    caller.shutdown(DRAIN).await;
    restarted.shutdown(DRAIN).await;
    Ok(())
}

/// Ten thousand small streams opened at once on one shared client all
/// deliver their message and end; the transport queues what its limits do
/// not let run at once.
pub async fn many_concurrent_small_streams<H: Harness>(h: Arc<H>) -> anyhow::Result<()> {
    let service = TestService::default();
    let server = serve(&*h, &service).await?;
    let caller = client_node(&*h).await?;
    let client = caller.client();
    let addr = server.addr();
    let tasks: Vec<_> = (0..CONCURRENT_STREAMS)
        .map(|i| {
            let (client, addr) = (client.clone(), addr.clone());
            tokio::spawn(async move {
                let mut stream = watch(&*client, &addr, "count:1:16", IDLE_TIMEOUT)
                    .await
                    .with_context(|| format!("opening stream {i}"))?;
                let message = stream
                    .receiver
                    .next()
                    .await
                    .with_context(|| format!("stream {i} ended empty"))??;
                ensure!(revision_of(message)? == 1, "stream {i}: wrong event");
                ensure!(
                    stream.receiver.next().await.is_none(),
                    "stream {i}: no clean end"
                );
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    let mut failed = Vec::new();
    for task in tasks {
        if let Err(e) = task.await? {
            failed.push(e);
        }
    }
    if let Some(first) = failed.first() {
        bail!(
            "{} of {CONCURRENT_STREAMS} streams failed; the first: {first:#}",
            failed.len()
        );
    }
    let sent = Counters::get(&service.counters.stream_sent);
    ensure!(
        sent == CONCURRENT_STREAMS as u64,
        "handlers sent {sent} messages"
    );
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(())
}
