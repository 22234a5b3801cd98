//! Pipelined replication over `Raft/AppendStream`, on real clusters over
//! iroh, gRPC and the dual router (real endpoints and servers on
//! loopback, real Raft on sled).
//!
//! Every node's handler is wrapped by an observer ([`Observe`]) that
//! counts what the follower side sees of the streaming method: streams
//! opened, messages received, answers given, and the most requests one
//! stream had unanswered at once. It can also delay answers (a slow
//! follower) or refuse streams as a node of an older version does.
//!
//! - replication goes over the stream, with more than one batch in flight
//!   and never more than `MAX_APPEND_IN_FLIGHT`;
//! - a follower that refuses streams is replicated to with unary appends;
//! - a non-member opening the stream is refused; a member naming another
//!   node as leader is refused;
//! - a malformed message or one of the wrong kind ends that stream with a
//!   typed error, and the follower stays healthy;
//! - a follower restarted mid-replication loses nothing: every
//!   acknowledged write ends up on every node.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use tern_protocol::catalog::methods;
use tern_protocol::stream::{MessageSink, MessageSource};
use tern_protocol::{
    BoxFuture, CallError, Code, Handler, Method, RequestContext, RpcClient, Status, StreamCall,
    StreamReceiver, StreamSender,
};
use tern_raft_net::append_stream::MAX_APPEND_IN_FLIGHT;
use tern_raft_net::codec::{self, AppendEntriesRequest};
use tern_raft_net::wire::{self, ControlRequest, VoteRequest};
use tern_store::Vote;
use tern_transport_iroh::{IrohConfig, IrohTransport};

use support::{Cluster, Dual, Grpc, Iroh, TransportFactory, WAIT, init_logs, put_vm};

/// What the followers saw of `Raft/AppendStream`, summed over the nodes.
#[derive(Default)]
struct Observed {
    streams: AtomicU64,
    messages: AtomicU64,
    answers: AtomicU64,
    unary_appends: AtomicU64,
    max_outstanding: AtomicU64,
    /// Each answer waits this long before it is sent (a slow follower).
    answer_delay_ms: AtomicU64,
    /// Answer streams `Unimplemented`, as a node of an older version.
    refuse_streams: AtomicBool,
}

impl Observed {
    fn get(&self, counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// One stream's counters.
#[derive(Default)]
struct PerStream {
    received: AtomicU64,
    answered: AtomicU64,
}

impl PerStream {
    fn note_outstanding(&self, seen: &Observed) {
        let outstanding = self
            .received
            .load(Ordering::SeqCst)
            .saturating_sub(self.answered.load(Ordering::SeqCst));
        seen.max_outstanding
            .fetch_max(outstanding, Ordering::SeqCst);
    }
}

struct Observing {
    inner: Arc<dyn Handler>,
    seen: Arc<Observed>,
}

struct CountIn {
    inner: StreamReceiver,
    stream: Arc<PerStream>,
    seen: Arc<Observed>,
}

impl MessageSource for CountIn {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Bytes, CallError>>> {
        Box::pin(async move {
            let next = self.inner.next().await;
            if let Some(Ok(_)) = &next {
                self.seen.messages.fetch_add(1, Ordering::SeqCst);
                self.stream.received.fetch_add(1, Ordering::SeqCst);
                self.stream.note_outstanding(&self.seen);
            }
            next
        })
    }
}

struct CountOut {
    inner: StreamSender,
    stream: Arc<PerStream>,
    seen: Arc<Observed>,
}

impl MessageSink for CountOut {
    fn send(&mut self, message: Bytes) -> BoxFuture<'_, Result<(), CallError>> {
        Box::pin(async move {
            let delay = self.seen.answer_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            // Counted as answered before it leaves, so that the leader
            // cannot have it (and send another request) before it counts.
            self.stream.answered.fetch_add(1, Ordering::SeqCst);
            self.seen.answers.fetch_add(1, Ordering::SeqCst);
            self.inner.send(message).await
        })
    }

    fn finish(&mut self) -> BoxFuture<'_, Result<(), CallError>> {
        self.inner.finish()
    }
}

impl Handler for Observing {
    fn handle(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        if method == methods::RAFT_APPEND_ENTRIES {
            self.seen.unary_appends.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.handle(ctx, method, payload)
    }

    fn handle_stream(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        request: Bytes,
        inbound: StreamReceiver,
        outbound: StreamSender,
    ) -> BoxFuture<'static, Result<(), Status>> {
        if method != methods::RAFT_APPEND_STREAM {
            return self
                .inner
                .handle_stream(ctx, method, request, inbound, outbound);
        }
        if self.seen.refuse_streams.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(Status::unimplemented(
                "Raft/AppendStream is not served by this node",
            ))));
        }
        let seen = self.seen.clone();
        seen.streams.fetch_add(1, Ordering::SeqCst);
        seen.messages.fetch_add(1, Ordering::SeqCst);
        let stream = Arc::new(PerStream::default());
        stream.received.fetch_add(1, Ordering::SeqCst);
        stream.note_outstanding(&seen);
        let inbound = StreamReceiver::new(CountIn {
            inner: inbound,
            stream: stream.clone(),
            seen: seen.clone(),
        });
        let outbound = StreamSender::new(CountOut {
            inner: outbound,
            stream,
            seen,
        });
        self.inner
            .handle_stream(ctx, method, request, inbound, outbound)
    }
}

/// A transport factory whose nodes serve through an [`Observing`] handler.
struct Observe<F> {
    inner: F,
    seen: Arc<Observed>,
}

impl<F> Observe<F> {
    fn new(inner: F) -> (Observe<F>, Arc<Observed>) {
        let seen = Arc::new(Observed::default());
        (
            Observe {
                inner,
                seen: seen.clone(),
            },
            seen,
        )
    }
}

impl<F: TransportFactory> TransportFactory for Observe<F> {
    type Transport = F::Transport;
    const NAME: &'static str = F::NAME;

    async fn start(
        &self,
        secret: [u8; 32],
        bind: SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> F::Transport {
        let observing = Arc::new(Observing {
            inner: handler,
            seen: self.seen.clone(),
        });
        self.inner.start(secret, bind, observing).await
    }
    fn client(t: &F::Transport) -> Arc<dyn RpcClient> {
        F::client(t)
    }
    fn addr(t: &F::Transport) -> tern_protocol::PeerAddr {
        F::addr(t)
    }
    fn bound(t: &F::Transport) -> SocketAddr {
        F::bound(t)
    }
    async fn stop(t: F::Transport) {
        F::stop(t).await;
    }
}

/// Pipelined replication on: what these tests are about.
fn options() -> tern_cluster::RaftOptions {
    tern_cluster::RaftOptions {
        pipelined_replication: true,
        ..tern_cluster::RaftOptions::default()
    }
}

/// Writes `from..to` through the leader, `concurrency` at a time; every
/// write must be acknowledged.
async fn write_concurrently<F: TransportFactory>(
    c: &Cluster<F>,
    from: u64,
    to: u64,
    concurrency: u64,
) {
    let leader = c.leader().await;
    let raft = c.nodes[leader].raft().raft().clone();
    let next = Arc::new(AtomicU64::new(from));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let raft = raft.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= to {
                    return;
                }
                tern_cluster::client_write(&raft, put_vm(i))
                    .await
                    .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// (a) and (b): replication rides the stream, pipelined and bounded.
async fn replication_is_pipelined_over_the_stream<F: TransportFactory>(factory: F) {
    init_logs();
    let (factory, seen) = Observe::new(factory);
    let mut c = Cluster::start(factory, 3, options()).await;
    // A slow follower: each answer waits, so the leader has reason to send
    // more before the oldest is answered.
    seen.answer_delay_ms.store(20, Ordering::SeqCst);
    write_concurrently(&c, 0, 300, 32).await;
    seen.answer_delay_ms.store(0, Ordering::SeqCst);
    for n in &c.nodes {
        n.wait_vms(300).await;
    }
    let streams = seen.get(&seen.streams);
    let messages = seen.get(&seen.messages);
    let max = seen.get(&seen.max_outstanding);
    assert!(streams >= 2, "each follower has a stream: {streams} opened");
    assert!(
        messages > streams,
        "replication messages ride the streams: {messages} messages on {streams} streams"
    );
    assert!(
        max > 1,
        "several batches in flight to a slow follower: at most {max} were"
    );
    assert!(
        max <= MAX_APPEND_IN_FLIGHT as u64,
        "in flight bounded by MAX_APPEND_IN_FLIGHT ({MAX_APPEND_IN_FLIGHT}): {max} were"
    );
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iroh_replication_is_pipelined_over_the_stream() {
    replication_is_pipelined_over_the_stream(Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_replication_is_pipelined_over_the_stream() {
    replication_is_pipelined_over_the_stream(Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dual_replication_is_pipelined_over_the_stream() {
    replication_is_pipelined_over_the_stream(Dual).await;
}

/// A follower that serves no streams (an older node) still gets every
/// write, by unary appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_without_streams_is_replicated_to_with_unary_appends() {
    init_logs();
    let (factory, seen) = Observe::new(Iroh);
    seen.refuse_streams.store(true, Ordering::SeqCst);
    let mut c = Cluster::start(factory, 3, options()).await;
    let unary_before = seen.get(&seen.unary_appends);
    write_concurrently(&c, 0, 100, 8).await;
    for n in &c.nodes {
        n.wait_vms(100).await;
    }
    assert_eq!(seen.get(&seen.streams), 0, "every stream was refused");
    assert!(
        seen.get(&seen.unary_appends) > unary_before,
        "the writes went as unary appends"
    );
    c.stop_all().await;
}

/// An append-entries request from node `leader` in `term`, without entries.
fn append_from(leader: u64, term: u64) -> Bytes {
    let req = AppendEntriesRequest {
        vote: Vote::new_committed(term, leader),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    wire::wrap_with(|buf| codec::encode_append_entries_into(&req, buf)).unwrap()
}

/// Opens `Raft/AppendStream` with `first` and optionally sends `then`;
/// returns how the stream ended for the caller: the refusal (at the opening
/// or as the first thing received), or what it received.
async fn stream_outcome(
    client: &dyn RpcClient,
    peer: &tern_protocol::PeerAddr,
    first: Bytes,
    then: Option<Bytes>,
) -> Result<Vec<Bytes>, CallError> {
    let call = StreamCall::new(methods::RAFT_APPEND_STREAM, first)
        .with_open_timeout(Duration::from_secs(20))
        .with_idle_timeout(Duration::from_secs(20));
    let mut stream = client.open_stream(peer, call).await?;
    let mut sender = stream.sender.take().expect("a bidirectional stream");
    if let Some(then) = then {
        // The peer may have ended the stream already; what it answered is
        // what this test reads.
        let _ = sender.send(then).await;
    }
    let _ = sender.finish().await;
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, stream.receiver.next()).await {
            Ok(Some(Ok(bytes))) => got.push(bytes),
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Ok(got),
            Err(_) => panic!("the stream neither answered nor ended"),
        }
    }
}

fn code_of(r: &Result<Vec<Bytes>, CallError>) -> Option<Code> {
    match r {
        Err(e) => e.code(),
        Ok(_) => None,
    }
}

/// (c) and (d): who may open the stream, and what a bad message does.
async fn the_stream_refuses_strangers_and_bad_messages<F: TransportFactory>(factory: F) {
    init_logs();
    let mut c = Cluster::start(factory, 3, options()).await;
    let leader = c.leader().await;
    let leader_id = c.nodes[leader].raft().id();
    let term = c.nodes[leader]
        .raft()
        .raft()
        .metrics()
        .borrow_watched()
        .current_term;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let other = (0..3).find(|i| *i != leader && *i != follower).unwrap();
    let follower_addr = c.nodes[follower].addr.clone();

    // (c) A stranger with its own key and a real endpoint.
    let dir = tempfile::tempdir().unwrap();
    let stranger_key = tern_transport_iroh::load_or_create_secret_key(dir.path()).unwrap();
    let stranger = IrohTransport::bind(
        IrohConfig::new(stranger_key).with_bind_addr(support::loopback()),
        Arc::new(tern_protocol::Dispatcher::new()),
    )
    .await
    .unwrap();
    if follower_addr.iroh.is_some() {
        let refused = stream_outcome(
            stranger.client().as_ref(),
            &follower_addr,
            append_from(leader_id, term),
            None,
        )
        .await;
        assert_eq!(
            code_of(&refused),
            Some(Code::PermissionDenied),
            "a non-member is refused"
        );
    }
    stranger.shutdown(support::DRAIN).await;
    let grpc_stranger_refused = {
        let dir = tempfile::tempdir().unwrap();
        let key = tern_transport_iroh::load_or_create_secret_key(dir.path()).unwrap();
        let grpc = tern_transport_grpc::GrpcTransport::bind(
            tern_transport_grpc::ServerConfig::new(key, support::loopback()),
            Arc::new(tern_protocol::Dispatcher::new()),
        )
        .await
        .unwrap();
        let outcome = if follower_addr.grpc.is_some() {
            let client: Arc<dyn RpcClient> = grpc.client();
            let peer = tern_protocol::PeerAddr {
                iroh: None,
                ..follower_addr.clone()
            };
            Some(stream_outcome(client.as_ref(), &peer, append_from(leader_id, term), None).await)
        } else {
            None
        };
        grpc.shutdown(support::DRAIN).await;
        outcome
    };
    if let Some(refused) = grpc_stranger_refused {
        assert_eq!(
            code_of(&refused),
            Some(Code::PermissionDenied),
            "a non-member is refused over gRPC"
        );
    }

    // A member that names another node as the leader is refused, and
    // the message never reaches Raft.
    let member = c.nodes[other].client();
    let posing = stream_outcome(
        member.as_ref(),
        &follower_addr,
        append_from(leader_id, term),
        None,
    )
    .await;
    assert_eq!(
        code_of(&posing),
        Some(Code::PermissionDenied),
        "a member cannot pose as the leader"
    );

    // (d) Malformed bytes, and a message of the wrong kind, end the stream
    // with a typed error.
    let garbage = stream_outcome(
        member.as_ref(),
        &follower_addr,
        Bytes::from_static(b"\xff\xff\xff\xff"),
        None,
    )
    .await;
    assert_eq!(
        code_of(&garbage),
        Some(Code::InvalidArgument),
        "malformed bytes"
    );
    let vote = wire::wrap(&ControlRequest::Vote(VoteRequest::new(
        Vote::new(term, c.nodes[other].raft().id()),
        None,
    )))
    .unwrap();
    let wrong_kind = stream_outcome(member.as_ref(), &follower_addr, vote, None).await;
    assert_eq!(
        code_of(&wrong_kind),
        Some(Code::InvalidArgument),
        "a vote on the append stream"
    );
    // A bad message after a good one: the leader's own (empty) append is
    // answered, then the truncated one ends the stream.
    let truncated = append_from(leader_id, term).slice(..3);
    let leader_client = c.nodes[leader].client();
    let later = stream_outcome(
        leader_client.as_ref(),
        &follower_addr,
        append_from(leader_id, term),
        Some(truncated),
    )
    .await;
    assert_eq!(
        code_of(&later),
        Some(Code::InvalidArgument),
        "a bad second message ends the stream with a typed error"
    );

    // The follower is healthy: it still follows the same leader and takes
    // every write.
    c.write_vms(0, 20).await;
    for n in &c.nodes {
        n.wait_vms(20).await;
    }
    let m = c.nodes[follower]
        .raft()
        .raft()
        .metrics()
        .borrow_watched()
        .clone();
    assert_eq!(m.current_leader, Some(leader_id));
    assert_eq!(m.current_term, term, "no election was caused");
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iroh_the_stream_refuses_strangers_and_bad_messages() {
    the_stream_refuses_strangers_and_bad_messages(Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_the_stream_refuses_strangers_and_bad_messages() {
    the_stream_refuses_strangers_and_bad_messages(Grpc).await;
}

/// (e) A follower restarted mid-replication (its streams break, batches in
/// flight) loses nothing: every acknowledged write is on every node.
async fn a_broken_stream_loses_nothing<F: TransportFactory>(factory: F) {
    init_logs();
    let (factory, seen) = Observe::new(factory);
    let c = Cluster::start(factory, 3, options()).await;
    let c = Arc::new(tokio::sync::Mutex::new(c));
    let leader = c.lock().await.leader().await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    seen.answer_delay_ms.store(5, Ordering::SeqCst);
    let streams_before = seen.get(&seen.streams);
    let raft = c.lock().await.nodes[leader].raft().raft().clone();
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let acknowledged = acknowledged.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for w in 0..8u64 {
                let raft = raft.clone();
                let acknowledged = acknowledged.clone();
                tasks.push(tokio::spawn(async move {
                    for k in 0..50u64 {
                        let i = w * 1000 + k;
                        tern_cluster::client_write(&raft, put_vm(i))
                            .await
                            .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
                        acknowledged.lock().unwrap().push(i);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    };
    // Restart the follower once writes are flowing.
    let deadline = tokio::time::Instant::now() + WAIT;
    while acknowledged.lock().unwrap().len() < 40 {
        assert!(tokio::time::Instant::now() < deadline, "writes do not flow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    {
        let mut c = c.lock().await;
        let c = &mut *c;
        let options = c.options.clone();
        c.nodes[follower].restart(&c.factory, &options).await;
    }
    writer.await.unwrap();
    seen.answer_delay_ms.store(0, Ordering::SeqCst);
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), 400);
    let mut c = c.lock().await;
    for n in &c.nodes {
        n.wait_vms(400).await;
        let ids: Vec<String> = n
            .raft()
            .state()
            .read(|s| s.vms().keys().cloned().collect())
            .unwrap();
        for i in &acknowledged {
            assert!(
                ids.contains(&format!("vm-{i}")),
                "write {i} is on node {}",
                n.raft().id()
            );
        }
    }
    assert!(
        seen.get(&seen.streams) > streams_before,
        "the leader opened a new stream to the restarted follower"
    );
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iroh_a_broken_stream_loses_nothing() {
    a_broken_stream_loses_nothing(Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_a_broken_stream_loses_nothing() {
    a_broken_stream_loses_nothing(Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dual_a_broken_stream_loses_nothing() {
    a_broken_stream_loses_nothing(Dual).await;
}
