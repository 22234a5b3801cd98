//! `Vm/Watch` over real transports (gRPC and iroh on loopback) in front of
//! a real Raft (openraft on sled, one node), behind the node's access
//! gate: every change arrives once and in order under concurrent writes,
//! a watch resumes from a revision, a compacted or future revision is
//! refused by name, a slow watcher is cut off and resumes, an unknown key
//! and a malformed request are refused.
#![allow(clippy::unwrap_used)] // reason: tests fail loudly on unexpected errors.

#[path = "services_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use support::raft::SingleNode;
use tern_protocol::access::Role;
use tern_protocol::catalog::methods;
use tern_protocol::{CallError, CallStream, Code, Dispatcher, PeerId, ServiceId, StreamCall, pb};
use tern_runtime::RuntimeKind;
use tern_services::access::AccessGate;
use tern_services::consensus::Consensus;
use tern_services::vm::VmService;
use tern_services::watch::WatchLimits;
use tern_state::{Capacity, Command, MAX_VM_EVENT_BYTES, Response, VmRecord, VmSpec, VmState};
use tern_test_transports::{Kind, Node};

/// Bound on any wait of the tests (the machine is shared): never a
/// statement about speed.
const WAIT: Duration = Duration::from_secs(60);

struct Fixture {
    _dir: tempfile::TempDir,
    raft: SingleNode,
    consensus: Arc<dyn Consensus>,
    server: Node,
    /// A client whose key holds the viewer role.
    viewer: Node,
    /// A client whose key holds no role.
    stranger: Node,
    /// Keeps the member's key (the Raft node's address) alive.
    member: Node,
}

async fn grant(consensus: &dyn Consensus, key: PeerId, role: Role, by: PeerId, n: usize) {
    let r = consensus
        .write(Command::ChangeAccess {
            request_id: format!("grant-{n}"),
            grant: true,
            key,
            role,
            by,
            at_unix_ms: 1,
        })
        .await
        .unwrap();
    assert_eq!(r, Response::Done);
}

async fn fixture(kind: Kind, limits: WatchLimits) -> Fixture {
    support_logs();
    let dir = tempfile::tempdir().unwrap();
    let member = Node::start(kind, Arc::new(Dispatcher::new())).await;
    let raft = SingleNode::start(
        &dir.path().join("raft"),
        member.addr(),
        Capacity {
            vcpus: 64,
            memory_mib: 1 << 20,
        },
        member.client(),
    )
    .await;
    let consensus: Arc<dyn Consensus> = raft.consensus.clone();
    let vm = VmService::with_watch_limits(consensus.clone(), RuntimeKind::Process, limits);
    let gate = Arc::new(AccessGate::new(Arc::new(
        Dispatcher::new().register(ServiceId::Vm, vm.handler()),
    )));
    gate.attach(consensus.clone());
    let server = Node::start(kind, gate).await;
    let viewer = Node::start(kind, Arc::new(Dispatcher::new())).await;
    let stranger = Node::start(kind, Arc::new(Dispatcher::new())).await;
    grant(&*consensus, member.id(), Role::Admin, member.id(), 0).await;
    grant(&*consensus, viewer.id(), Role::Viewer, member.id(), 1).await;
    Fixture {
        _dir: dir,
        raft,
        consensus,
        server,
        viewer,
        stranger,
        member,
    }
}

fn support_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Fixture {
    async fn shutdown(self) {
        let Fixture {
            _dir,
            raft,
            consensus,
            server,
            viewer,
            stranger,
            member,
        } = self;
        for n in [server, viewer, stranger, member] {
            n.shutdown().await;
        }
        drop(consensus);
        raft.shutdown().await;
    }

    async fn open(&self, client: &Node, since: u64, vm_id: &str) -> Result<CallStream, CallError> {
        let req = pb::WatchVmsRequest {
            from_revision: since,
            vm_id: vm_id.into(),
        };
        self.open_raw(client, req.encode_to_vec().into()).await
    }

    async fn open_raw(&self, client: &Node, request: Bytes) -> Result<CallStream, CallError> {
        let call = StreamCall::new(methods::VM_WATCH, request).with_idle_timeout(WAIT);
        client.client().open_stream(&self.server.addr(), call).await
    }

    /// The current revision, as `Vm/List` answers it.
    async fn list_revision(&self) -> u64 {
        let list: pb::ListVmsResponse = tern_protocol::rpc::call_typed(
            self.viewer.client().as_ref(),
            &self.server.addr(),
            methods::VM_LIST,
            &pb::ListVmsRequest { node_id: 0 },
            WAIT,
        )
        .await
        .unwrap();
        list.revision
    }

    /// What the state holds after `since`: what a watch must deliver.
    fn held_after(&self, since: u64) -> Vec<(u64, String, bool)> {
        self.consensus
            .query(|s| {
                s.vm_history()
                    .events()
                    .filter(|e| e.revision > since)
                    .map(|e| (e.revision, e.vm.id.clone(), e.deleted))
                    .collect()
            })
            .unwrap()
    }
}

fn put(n: u64, slot: u64, pad: usize) -> Command {
    Command::PutVm {
        request_id: format!("put-{n}"),
        vm: Box::new(VmRecord {
            id: format!("vm-{slot}"),
            spec: VmSpec {
                name: format!("vm-{slot}"),
                vcpus: 1,
                memory_mib: 64,
                runtime: "process".into(),
                command: if pad == 0 {
                    Vec::new()
                } else {
                    (0..pad.div_ceil(100_000))
                        .map(|_| "x".repeat(100_000.min(pad)))
                        .collect()
                },
                ..VmSpec::default()
            },
            node_id: 1,
            desired: VmState::Running,
            ..VmRecord::default()
        }),
    }
}

/// Reads `n` events (progress events skipped) from `stream`.
async fn read_events(stream: &mut CallStream, n: usize) -> Vec<pb::VmEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(WAIT, stream.receiver.next())
            .await
            .expect("an event within the bound")
            .expect("the stream goes on")
            .expect("an event, not an error");
        let event = pb::VmEvent::decode(next).unwrap();
        if !event.progress {
            out.push(event);
        }
    }
    out
}

fn key(e: &pb::VmEvent) -> (u64, String, bool) {
    (
        e.revision,
        e.vm.as_ref().map(|v| v.id.clone()).unwrap_or_default(),
        e.deleted,
    )
}

/// The first error a stream ends with, skipping the events before it.
async fn first_error(stream: &mut CallStream) -> (Vec<pb::VmEvent>, tern_protocol::Status) {
    let mut events = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, stream.receiver.next())
            .await
            .expect("an answer within the bound")
        {
            Some(Ok(m)) => events.push(pb::VmEvent::decode(m).unwrap()),
            Some(Err(CallError::Application(s))) => return (events, s),
            other => panic!("expected an application error, got {other:?}"),
        }
    }
}

async fn refused(result: Result<CallStream, CallError>) -> tern_protocol::Status {
    match result {
        Err(CallError::Application(s)) => s,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(mut stream) => first_error(&mut stream).await.1,
    }
}

/// Concurrent writers; a watch from the list's revision sees every
/// change once, in order, exactly what the state recorded; a second
/// watch resumes from the middle and sees the rest.
async fn every_change_once_in_order(kind: Kind) {
    let f = fixture(kind, WatchLimits::default()).await;
    let since = f.list_revision().await;
    let mut watch = f.open(&f.viewer, since, "").await.unwrap();
    const WRITERS: u64 = 4;
    const EACH: u64 = 25;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let c = f.consensus.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let n = w * 1000 + i;
                let cmd = if i % 5 == 4 {
                    Command::DeleteVm {
                        request_id: format!("del-{n}"),
                        vm_id: format!("vm-{}", w * 1000 + i - 1),
                    }
                } else {
                    put(n, n, 0)
                };
                c.write(cmd).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = usize::try_from(WRITERS * EACH).unwrap();
    let got = read_events(&mut watch, total).await;
    let got: Vec<_> = got.iter().map(key).collect();
    assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "revisions strictly increase"
    );
    assert_eq!(got, f.held_after(since), "exactly the recorded changes");
    assert_eq!(got.iter().filter(|e| e.2).count(), total / 5);

    // Resume from the middle: the rest, once each, then live changes.
    let middle = got[total / 2].0;
    let mut resumed = f.open(&f.viewer, middle, "").await.unwrap();
    let rest = read_events(&mut resumed, total - total / 2 - 1).await;
    assert_eq!(
        rest.iter().map(key).collect::<Vec<_>>(),
        got[total / 2 + 1..].to_vec()
    );
    f.consensus.write(put(9_999, 9_999, 0)).await.unwrap();
    let live = read_events(&mut resumed, 1).await;
    assert_eq!(live[0].vm.as_ref().unwrap().id, "vm-9999");
    assert!(live[0].revision > got[total - 1].0);
    // A watch of one VM sees that VM's changes only.
    let mut one = f.open(&f.viewer, since, "vm-1").await.unwrap();
    let only = read_events(&mut one, 1).await;
    assert_eq!(only[0].vm.as_ref().unwrap().id, "vm-1");
    drop((watch, resumed, one));
    f.shutdown().await;
}

/// A revision older than the history: `OutOfRange`, telling the client to
/// re-list; a revision ahead of the node: `InvalidArgument` naming it; an
/// unknown key: `PermissionDenied`; a malformed request: the field named.
async fn bad_revisions_keys_and_requests_are_refused(kind: Kind) {
    let limits = WatchLimits {
        future_wait: Duration::from_millis(300),
        ..WatchLimits::default()
    };
    let f = fixture(kind, limits).await;
    let start = f.list_revision().await;
    // Records of 1 MB: the history's byte bound drops the oldest soon.
    let big = 1_000_000;
    let writes = MAX_VM_EVENT_BYTES / big + 2;
    for i in 0..writes as u64 {
        f.consensus.write(put(i, i, big)).await.unwrap();
    }
    let complete_after = f
        .consensus
        .query(|s| s.vm_history().complete_after())
        .unwrap();
    assert!(complete_after > start, "the history was compacted");
    let s = refused(f.open(&f.viewer, start, "").await).await;
    assert_eq!(s.code, Code::OutOfRange, "{s}");
    assert!(
        s.message.contains("tern vm list") && s.message.contains(&format!("revision {start}")),
        "{s}"
    );
    // From the compaction point on, the watch is served.
    let mut ok = f.open(&f.viewer, complete_after, "").await.unwrap();
    let first = read_events(&mut ok, 1).await;
    assert!(first[0].revision > complete_after);
    drop(ok);

    let now = f.list_revision().await;
    let s = refused(f.open(&f.viewer, now + 1000, "").await).await;
    assert_eq!(s.code, Code::InvalidArgument, "{s}");
    assert!(
        s.message.contains("from_revision") && s.message.contains(&format!("{}", now + 1000)),
        "{s}"
    );

    let s = refused(f.open(&f.stranger, 0, "").await).await;
    assert_eq!(s.code, Code::PermissionDenied, "{s}");
    assert!(s.message.contains("vm/watch"), "{s}");

    let s = refused(f.open(&f.viewer, 0, "../etc").await).await;
    assert_eq!(s.code, Code::InvalidArgument, "{s}");
    assert!(s.message.contains("vm_id"), "{s}");
    // Bytes that are no WatchVmsRequest (a field 1 of wire type 2 cut short).
    let s = refused(
        f.open_raw(&f.viewer, Bytes::from_static(&[0x0a, 0xff]))
            .await,
    )
    .await;
    assert_eq!(s.code, Code::InvalidArgument, "{s}");
    assert!(s.message.contains("WatchVmsRequest"), "{s}");
    f.shutdown().await;
}

/// A watcher that does not read falls behind; once it is more than the
/// lag limit behind it is cut off with `ResourceExhausted` naming the
/// limit and its last revision, after a gap-free prefix, and resumes from
/// there with nothing missing. The history stays within its bounds.
async fn a_slow_watcher_is_cut_off_and_resumes(kind: Kind) {
    let limits = WatchLimits {
        max_lag: 8,
        ..WatchLimits::default()
    };
    let f = fixture(kind, limits).await;
    let since = f.list_revision().await;
    let mut slow = f.open(&f.viewer, since, "").await.unwrap();
    // Events of 100 kB: the stream window (2 MiB) fills after about 20,
    // and the watcher then falls behind the history.
    let writes = 48u64;
    for i in 0..writes {
        f.consensus.write(put(i, i % 4, 100_000)).await.unwrap();
    }
    let (prefix, status) = first_error(&mut slow).await;
    assert_eq!(status.code, Code::ResourceExhausted, "{status}");
    assert!(status.message.contains("MAX_WATCH_LAG"), "{status}");
    let held = f.held_after(since);
    let prefix: Vec<_> = prefix.iter().map(key).collect();
    assert!(prefix.len() < held.len(), "cut off before the end");
    assert_eq!(prefix, held[..prefix.len()].to_vec(), "a gap-free prefix");
    let last = prefix.last().map_or(since, |e| e.0);
    assert!(
        status
            .message
            .contains(&format!("resume from revision {last}")),
        "{status}"
    );
    // Resumed and read promptly: the rest, nothing missing.
    let mut resumed = f.open(&f.viewer, last, "").await.unwrap();
    let rest = read_events(&mut resumed, held.len() - prefix.len()).await;
    assert_eq!(
        rest.iter().map(key).collect::<Vec<_>>(),
        held[prefix.len()..].to_vec()
    );
    let (len, within) = f
        .consensus
        .query(|s| {
            let h = s.vm_history();
            (
                h.events().len(),
                h.events()
                    .map(|e| tern_state::events::weight(&e.vm))
                    .sum::<usize>()
                    <= MAX_VM_EVENT_BYTES,
            )
        })
        .unwrap();
    assert!(len <= tern_state::MAX_VM_EVENTS && within);
    drop((slow, resumed));
    f.shutdown().await;
}

/// A quiet watch gets progress events carrying the current revision.
async fn a_quiet_watch_sends_progress(kind: Kind) {
    let limits = WatchLimits {
        progress_interval: Duration::from_millis(200),
        ..WatchLimits::default()
    };
    let f = fixture(kind, limits).await;
    let now = f.list_revision().await;
    let mut watch = f.open(&f.viewer, 0, "").await.unwrap();
    let m = tokio::time::timeout(WAIT, watch.receiver.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let e = pb::VmEvent::decode(m).unwrap();
    assert!(e.progress && e.vm.is_none());
    assert_eq!(e.revision, now);
    drop(watch);
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_once_in_order_over_grpc() {
    every_change_once_in_order(Kind::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_once_in_order_over_iroh() {
    every_change_once_in_order(Kind::Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_revisions_keys_and_requests_are_refused_over_grpc() {
    bad_revisions_keys_and_requests_are_refused(Kind::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_revisions_keys_and_requests_are_refused_over_iroh() {
    bad_revisions_keys_and_requests_are_refused(Kind::Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_is_cut_off_and_resumes_over_grpc() {
    a_slow_watcher_is_cut_off_and_resumes(Kind::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_is_cut_off_and_resumes_over_iroh() {
    a_slow_watcher_is_cut_off_and_resumes(Kind::Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_watch_sends_progress_over_grpc() {
    a_quiet_watch_sends_progress(Kind::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_watch_sends_progress_over_iroh() {
    a_quiet_watch_sends_progress(Kind::Iroh).await;
}

/// A watch event shows the VM's address and MAC (a VM keeps its lease for
/// life); the event of its removal shows none (the lease went with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_the_vm_address_over_grpc() {
    let f = fixture(Kind::Grpc, WatchLimits::default()).await;
    let pool = Command::SetNetworkPool {
        request_id: "pool".into(),
        pool: "10.213.8.0/24".parse().unwrap(),
    };
    assert_eq!(f.consensus.write(pool).await.unwrap(), Response::Done);
    let since = f.list_revision().await;
    let mut watch = f.open(&f.viewer, since, "").await.unwrap();
    let create = Command::CreateVm {
        request_id: "create".into(),
        spec: Box::new(VmSpec {
            name: "web".into(),
            vcpus: 1,
            memory_mib: 64,
            runtime: "process".into(),
            command: vec!["sleep".into(), "600".into()],
            ..VmSpec::default()
        }),
    };
    let Response::Vm(vm) = f.consensus.write(create).await.unwrap() else {
        panic!("created");
    };
    let created = read_events(&mut watch, 1).await;
    let record = created[0].vm.as_ref().unwrap();
    assert_eq!(record.id, vm.id);
    assert_eq!(
        (
            record.address.as_str(),
            record.mac.as_str(),
            record.gateway.as_str()
        ),
        ("10.213.8.2/24", "02:74:6e:d5:08:02", "10.213.8.1")
    );
    let delete = Command::DeleteVm {
        request_id: "delete".into(),
        vm_id: vm.id.clone(),
    };
    f.consensus.write(delete).await.unwrap();
    let gone = read_events(&mut watch, 1).await;
    assert!(gone[0].deleted);
    assert_eq!(gone[0].vm.as_ref().unwrap().address, "");
    drop(watch);
    f.shutdown().await;
}
