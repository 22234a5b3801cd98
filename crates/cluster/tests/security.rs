//! Attacks on the Raft services by members, and the write limits, against
//! real nodes (real transports on loopback, sled stores in temporary
//! directories):
//!
//! - a member (a learner, a follower) posing as the leader in an append,
//!   a snapshot chunk or a leadership transfer, or as the candidate in a
//!   vote or pre-vote, is refused with `PermissionDenied`;
//! - `Raft/Propose` commits only a member's own reports and forwarded VM
//!   writes, never membership, metadata or raw record writes, nor a report
//!   naming another node;
//! - writes over a field limit or the request limit are never proposed;
//! - a state filled with the largest allowed records snapshots, and nodes
//!   restart from that snapshot;
//! - a failed log write stops Raft and surfaces as the node's fatal signal.
//!
//! Every wait is bounded ([`support::WAIT`]); nothing asserts on speed.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test

mod support;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, ServerState, Vote};
use prost::Message;
use support::{Cluster, Grpc, Iroh, TOKEN, TestNode, TransportFactory, WAIT, call, loopback};
use tern_cluster::{
    FIRST_NODE_ID, RaftNode, RaftNodeError, RaftOptions, WriteError, write_node_id,
};
use tern_protocol::catalog::methods;
use tern_protocol::{CallError, Code, RpcClient, pb};
use tern_raft_net::wire::ControlRequest;
use tern_raft_net::{codec, wire};
use tern_state::limits::{
    MAX_COMMAND_ARG_LEN, MAX_KERNEL_CMDLINE_LEN, MAX_META_KEY_LEN, MAX_META_VALUE_LEN,
    MAX_PATH_LEN, MAX_REQUEST_BYTES, MAX_REQUEST_ID_LEN, MAX_VM_ID_LEN, MAX_VM_NAME_LEN,
    MAX_VM_REASON_LEN, encoded_len,
};
use tern_state::{Command, NodeId, Response, VmRecord, VmReport, VmSpec, VmState};
use tern_store::{Entry, LogId, LogStore, StoreError, TypeConfig};

/// Asserts `result` is a `PermissionDenied` whose message contains every
/// one of `words`.
fn assert_denied(result: Result<Bytes, CallError>, words: &[&str]) {
    let err = result.expect_err("the call must be refused");
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    for w in words {
        assert!(err.to_string().contains(w), "{w:?} missing from: {err}");
    }
}

fn append_from(term: u64, leader: NodeId) -> Bytes {
    let req = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term, leader),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    wire::wrap(&req).unwrap()
}

fn vote_from(term: u64, candidate: NodeId) -> VoteRequest<TypeConfig> {
    VoteRequest {
        vote: Vote::new(term, candidate),
        last_log_id: None,
        leadership_transfer: false,
    }
}

/// A learner (joined, never promoted) and a voter each pose as another
/// node: as the leader in an append, a snapshot chunk and a leadership
/// transfer, as the candidate in a vote and a pre-vote. Every node refuses
/// every one with `PermissionDenied` naming both ids, and the cluster
/// keeps its leader and term.
async fn raft_messages_name_their_sender<F: TransportFactory>(factory: F) {
    support::init_logs();
    let mut c = Cluster::start(factory, 2, RaftOptions::default()).await;
    let leader = c.leader().await;
    let follower = 1 - leader;
    let leader_id = c.nodes[leader].raft().id();
    let follower_id = c.nodes[follower].raft().id();
    let term = c.nodes[leader]
        .raft()
        .raft()
        .metrics()
        .borrow_watched()
        .current_term;

    // A learner: joined with the token (so it is in the membership) but
    // never started, so never promoted.
    let dir = tempfile::tempdir().unwrap();
    let mut learner = TestNode::boot(&c.factory, &dir.path().join("learner"), loopback()).await;
    let answer = tern_cluster::request_join(
        learner.client().as_ref(),
        &c.nodes[leader].addr,
        TOKEN,
        &learner.member(),
    )
    .await
    .unwrap();
    let learner_id = answer.node_id;
    for n in &c.nodes {
        n.raft()
            .raft()
            .wait(Some(WAIT))
            .metrics(
                |m| {
                    m.membership_config
                        .membership()
                        .get_node(&learner_id)
                        .is_some()
                },
                "the learner is in the membership",
            )
            .await
            .unwrap();
    }

    let learner_client = learner.client();
    let follower_client = c.nodes[follower].client();
    let attackers: [(&dyn RpcClient, NodeId); 2] = [
        (learner_client.as_ref(), learner_id),
        (follower_client.as_ref(), follower_id),
    ];
    for (client, own_id) in attackers {
        for target in &c.nodes {
            if target.addr.id == c.nodes[follower].addr.id && own_id == follower_id {
                continue; // not calling itself
            }
            let own = own_id.to_string();
            let leader_text = leader_id.to_string();
            // Posing as the leader in an append, at a term that would
            // otherwise depose the real one.
            assert_denied(
                call(
                    client,
                    &target.addr,
                    methods::RAFT_APPEND_ENTRIES,
                    append_from(term + 100, leader_id),
                )
                .await,
                &["append-entries", "leader", &leader_text, &own],
            );
            // A forged candidate id in a vote and a pre-vote.
            for (req, what) in [
                (
                    ControlRequest::Vote(vote_from(term + 100, leader_id)),
                    "vote",
                ),
                (
                    ControlRequest::PreVote(vote_from(term + 100, leader_id)),
                    "pre-vote",
                ),
            ] {
                assert_denied(
                    call(
                        client,
                        &target.addr,
                        methods::RAFT_VOTE,
                        wire::wrap(&req).unwrap(),
                    )
                    .await,
                    &[what, "candidate", &leader_text, &own],
                );
            }
            // A leadership transfer in the leader's name.
            let transfer = ControlRequest::TransferLeader(TransferLeaderRequest::new(
                Vote::new_committed(term, leader_id),
                own_id,
                None,
            ));
            assert_denied(
                call(
                    client,
                    &target.addr,
                    methods::RAFT_VOTE,
                    wire::wrap(&transfer).unwrap(),
                )
                .await,
                &["leadership transfer", &leader_text],
            );
            // A snapshot chunk in the leader's name.
            let chunk = pb::SnapshotChunk {
                vote: codec::encode(&tern_store::Vote::new_committed(term + 100, leader_id))
                    .unwrap(),
                meta: Bytes::new(),
                snapshot_id: "forged".into(),
                offset: 0,
                data: Bytes::from_static(b"not a snapshot"),
                done: false,
            };
            assert_denied(
                call(
                    client,
                    &target.addr,
                    methods::RAFT_SNAPSHOT,
                    chunk.encode_to_vec().into(),
                )
                .await,
                &["snapshot chunk", &leader_text],
            );
        }
    }
    // A message naming its real sender passes the check (openraft then
    // rejects the stale term on its own): the check binds, it does not
    // block members.
    let resp = call(
        follower_client.as_ref(),
        &c.nodes[leader].addr,
        methods::RAFT_APPEND_ENTRIES,
        append_from(0, follower_id),
    )
    .await;
    assert!(resp.is_ok(), "{resp:?}");

    // Nothing moved: same leader, same term, writes still commit.
    let m = c.nodes[leader]
        .raft()
        .raft()
        .metrics()
        .borrow_watched()
        .clone();
    assert_eq!(m.state, ServerState::Leader);
    assert_eq!(m.current_term, term);
    c.write_vms(0, 3).await;
    c.stop_all().await;
    learner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iroh_raft_messages_name_their_sender() {
    raft_messages_name_their_sender(Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_raft_messages_name_their_sender() {
    raft_messages_name_their_sender(Grpc).await;
}

fn create_vm(request_id: &str, name: &str, pin: NodeId) -> Command {
    Command::CreateVm {
        request_id: request_id.into(),
        spec: Box::new(VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            runtime: "process".into(),
            command: vec!["sleep".into(), "1000".into()],
            pin_node: pin,
            ..VmSpec::default()
        }),
    }
}

fn report(vm_id: &str, reporter: NodeId, request_id: &str) -> Command {
    Command::ReportVm {
        request_id: request_id.into(),
        report: VmReport {
            vm_id: vm_id.into(),
            node_id: reporter,
            observed: VmState::Running,
            reason: String::new(),
            log_path: String::new(),
        },
    }
}

/// A follower may propose its own reports and forwarded VM writes; it may
/// not propose a node id allocation, a metadata put, raw record writes, or
/// a report in another node's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn propose_carries_only_a_members_own_writes() {
    support::init_logs();
    let mut c = Cluster::start(Grpc, 3, RaftOptions::default()).await;
    let leader = c.leader().await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let other = (0..3).find(|i| *i != leader && *i != follower).unwrap();
    let leader_addr = c.nodes[leader].addr.clone();
    let follower_id = c.nodes[follower].raft().id();
    let other_id = c.nodes[other].raft().id();
    let client = c.nodes[follower].client();
    let propose = |command: Command| {
        let client = client.clone();
        let addr = leader_addr.clone();
        async move {
            call(
                client.as_ref(),
                &addr,
                methods::RAFT_PROPOSE,
                wire::wrap(&command).unwrap(),
            )
            .await
        }
    };

    // Allowed: a VM write its VM service forwards, and reports about a VM
    // placed on the follower itself.
    let mine = propose(create_vm("c-1", "mine", follower_id))
        .await
        .unwrap();
    let Response::Vm(mine) = wire::unwrap::<Response>(mine).unwrap() else {
        panic!("create answered something else");
    };
    let theirs = propose(create_vm("c-2", "theirs", other_id)).await.unwrap();
    let Response::Vm(theirs) = wire::unwrap::<Response>(theirs).unwrap() else {
        panic!("create answered something else");
    };
    let reported = propose(report(&mine.id, follower_id, "r-1")).await.unwrap();
    let reported = wire::unwrap::<Response>(reported).unwrap();
    assert!(
        matches!(&reported, Response::Vm(vm) if vm.observed == VmState::Running),
        "{reported:?}"
    );

    // Refused: a report in another node's name (about a VM placed there,
    // which the state alone would have accepted), naming both nodes.
    assert_denied(
        propose(report(&theirs.id, other_id, "r-2")).await,
        &["report-vm", &other_id.to_string(), &follower_id.to_string()],
    );
    // Refused: membership, metadata and raw record writes, by name.
    let outsider = tern_protocol::PeerId::from_bytes([9; 32]);
    let refused: [(Command, &str); 4] = [
        (
            Command::AllocateNodeId {
                request_id: "a-1".into(),
                peer: outsider,
            },
            "allocate-node-id",
        ),
        (
            Command::PutMeta {
                request_id: "m-1".into(),
                key: "k".into(),
                value: "v".into(),
            },
            "put-meta",
        ),
        (support::put_vm(50), "put-vm"),
        (
            Command::DeleteVm {
                request_id: "d-1".into(),
                vm_id: mine.id.clone(),
            },
            "delete-vm",
        ),
    ];
    for (command, name) in refused {
        assert_denied(propose(command).await, &[name]);
    }
    // None of them was applied.
    let state = c.nodes[leader].raft().state();
    assert!(state.read(|s| s.node_id_of(&outsider)).unwrap().is_none());
    assert!(state.read(|s| s.vm(&mine.id).is_some()).unwrap());
    assert!(state.read(|s| s.vm("vm-50").is_none()).unwrap());
    // A joiner's record is limited too: it is in every membership entry
    // and snapshot.
    let dir = tempfile::tempdir().unwrap();
    let mut joiner = TestNode::boot(&c.factory, &dir.path().join("joiner"), loopback()).await;
    let mut address = pb::PeerAddress::from(&joiner.addr);
    address.grpc_url = format!("http://{}", "h".repeat(tern_state::limits::MAX_URL_LEN));
    let join = pb::JoinRequest {
        token: TOKEN.into(),
        address: Some(address),
        capacity: None,
    };
    let err = call(
        joiner.client().as_ref(),
        &leader_addr,
        methods::CLUSTER_JOIN,
        join.encode_to_vec().into(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("address.grpc_url"), "{err}");
    joiner.stop().await;
    let theirs_now = state.read(|s| s.vm(&theirs.id).cloned()).unwrap().unwrap();
    assert_eq!(
        theirs_now.observed,
        VmState::Pending,
        "the forged report left no trace"
    );
    c.stop_all().await;
}

/// The largest spec the field limits allow, padded by `fill` bytes of
/// arguments so that the command is just under the request limit.
fn largest_record(i: u64) -> VmRecord {
    let name = format!("vm-{i}-{}", "n".repeat(MAX_VM_NAME_LEN));
    let mut spec = VmSpec {
        name: name[..MAX_VM_NAME_LEN].to_owned(),
        vcpus: 1,
        memory_mib: 64,
        runtime: "process".into(),
        kernel: "/".repeat(MAX_PATH_LEN),
        initrd: "/".repeat(MAX_PATH_LEN),
        image: "/".repeat(MAX_PATH_LEN),
        kernel_cmdline: "c".repeat(MAX_KERNEL_CMDLINE_LEN),
        command: Vec::new(),
        pin_node: 0,
    };
    let id = format!("vm-{i}-{}", "i".repeat(MAX_VM_ID_LEN));
    let mut record = VmRecord {
        id: id[..MAX_VM_ID_LEN].to_owned(),
        spec: spec.clone(),
        node_id: FIRST_NODE_ID,
        desired: VmState::Running,
        observed: VmState::Failed,
        reason: "r".repeat(MAX_VM_REASON_LEN),
        log_path: "/".repeat(MAX_PATH_LEN),
        ..VmRecord::default()
    };
    // As many largest arguments as fit, then one to fill the rest.
    loop {
        spec.command.push("a".repeat(MAX_COMMAND_ARG_LEN));
        record.spec = spec.clone();
        if encoded_len(&put(&record, i)) > MAX_REQUEST_BYTES {
            spec.command.pop();
            break;
        }
    }
    record.spec = spec.clone();
    let room = MAX_REQUEST_BYTES.saturating_sub(encoded_len(&put(&record, i)) + 16);
    spec.command.push("b".repeat(room.min(MAX_COMMAND_ARG_LEN)));
    record.spec = spec;
    record
}

fn put(record: &VmRecord, i: u64) -> Command {
    let id = format!("put-{i}-{}", "q".repeat(MAX_REQUEST_ID_LEN));
    Command::PutVm {
        request_id: id[..MAX_REQUEST_ID_LEN].to_owned(),
        vm: Box::new(record.clone()),
    }
}

/// Fills the state with the largest records the limits allow (replicated
/// to a follower: an accepted entry always fits an append), builds a
/// snapshot, and restarts both nodes from it on their sled stores. Then
/// shows that a write over the limits is refused before it is proposed,
/// at the write entry point and at `Raft/Propose`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn largest_allowed_state_snapshots_restarts_and_over_limit_writes_are_refused() {
    support::init_logs();
    // gRPC: a restart rebinds the same port, which a parallel test's iroh
    // endpoint (UDP, port 0) could take meanwhile.
    let mut c = Cluster::start(Grpc, 2, RaftOptions::default()).await;
    const RECORDS: u64 = 4;
    let mut written = Vec::new();
    for i in 0..RECORDS {
        let record = largest_record(i);
        let command = put(&record, i);
        let len = encoded_len(&command);
        assert!(
            len <= MAX_REQUEST_BYTES && len > MAX_REQUEST_BYTES - 64,
            "{len} bytes: just under the limit"
        );
        let leader = c.leader().await;
        let answer = c.nodes[leader].raft().client_write(command).await.unwrap();
        assert!(matches!(answer.data, Response::Vm(_)), "{:?}", answer.data);
        written.push(record);
    }
    let mut keys = Vec::new();
    for k in 0..8u64 {
        let leader = c.leader().await;
        let key = format!("{k}{}", "k".repeat(MAX_META_KEY_LEN))[..MAX_META_KEY_LEN].to_owned();
        keys.push(key.clone());
        let command = Command::PutMeta {
            request_id: format!("meta-{k}"),
            key,
            value: "v".repeat(MAX_META_VALUE_LEN),
        };
        c.nodes[leader].raft().client_write(command).await.unwrap();
    }
    for n in &c.nodes {
        n.wait_vms(RECORDS as usize).await;
    }

    // A snapshot of that state on every node, then a restart of each from
    // its sled log and snapshot file.
    for n in &c.nodes {
        let raft = n.raft().raft();
        let applied = raft.metrics().borrow_watched().last_applied;
        raft.trigger().snapshot().await.unwrap();
        raft.wait(Some(WAIT))
            .metrics(
                |m| m.snapshot >= applied,
                "a snapshot covering the largest records",
            )
            .await
            .unwrap();
    }
    let (factory, options) = (&c.factory, c.options.clone());
    for i in 0..2 {
        c.nodes[i].restart(factory, &options).await;
    }
    for n in &c.nodes {
        n.wait_vms(RECORDS as usize).await;
        for record in &written {
            let stored = n
                .raft()
                .state()
                .read(|s| s.vm(&record.id).cloned())
                .unwrap()
                .unwrap();
            assert_eq!(stored.spec, record.spec, "restored intact");
        }
        for key in &keys {
            let len = n
                .raft()
                .state()
                .read(|s| s.meta(key).map(|e| e.value.len()))
                .unwrap();
            assert_eq!(len, Some(MAX_META_VALUE_LEN));
        }
    }

    // Over the limits: refused at the write entry point, never proposed.
    let leader = c.leader().await;
    let last = c.nodes[leader]
        .raft()
        .raft()
        .metrics()
        .borrow_watched()
        .last_log_index;
    let mut too_big = largest_record(99);
    too_big.spec.command.push("z".repeat(MAX_COMMAND_ARG_LEN));
    let err = c.nodes[leader]
        .raft()
        .client_write(put(&too_big, 99))
        .await
        .unwrap_err();
    match &err {
        WriteError::Limit(e) => {
            assert!(e.is_whole_request(), "{e}");
            assert!(
                e.to_string().contains(&MAX_REQUEST_BYTES.to_string()),
                "{e}"
            );
        }
        other => panic!("expected a limit refusal, got {other}"),
    }
    let mut long_arg = largest_record(98);
    long_arg.spec.command = vec!["x".repeat(MAX_COMMAND_ARG_LEN + 1)];
    let err = c.nodes[leader]
        .raft()
        .client_write(put(&long_arg, 98))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WriteError::Limit(e) if !e.is_whole_request()
            && e.to_string().contains("vm.spec.command[0]")),
        "{err}"
    );
    // And at Raft/Propose, sent raw so that only the leader can refuse.
    let follower = 1 - leader;
    let oversized = create_vm("big", "big", 0);
    let Command::CreateVm {
        request_id,
        mut spec,
    } = oversized
    else {
        unreachable!()
    };
    spec.command =
        vec!["y".repeat(MAX_COMMAND_ARG_LEN); MAX_REQUEST_BYTES / MAX_COMMAND_ARG_LEN + 1];
    let oversized = Command::CreateVm { request_id, spec };
    let err = call(
        c.nodes[follower].client().as_ref(),
        &c.nodes[leader].addr,
        methods::RAFT_PROPOSE,
        wire::wrap(&oversized).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    let mut long_name = create_vm("long", "x", 0);
    if let Command::CreateVm { spec, .. } = &mut long_name {
        spec.name = "n".repeat(MAX_VM_NAME_LEN + 1);
    }
    let err = call(
        c.nodes[follower].client().as_ref(),
        &c.nodes[leader].addr,
        methods::RAFT_PROPOSE,
        wire::wrap(&long_name).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("spec.name"), "{err}");
    // The client side refuses before sending, too.
    let err = tern_cluster::propose(
        c.nodes[follower].client().as_ref(),
        &c.nodes[leader].addr,
        &oversized,
        WAIT,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RaftNodeError::Limit(_)), "{err}");
    let after = c.nodes[leader]
        .raft()
        .raft()
        .metrics()
        .borrow_watched()
        .last_log_index;
    assert_eq!(after, last, "nothing over the limits reached the log");
    c.stop_all().await;
}

/// The real sled log store, with a switch that makes appends fail the way
/// a failed write or sync does (the error the store returns then).
struct FailingLog {
    inner: LogStore,
    dir: std::path::PathBuf,
    fail: Arc<AtomicBool>,
}

impl RaftLogStorage<TypeConfig> for FailingLog {
    type LogReader = tern_store::LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        self.inner.get_log_state().await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.inner.get_log_reader().await
    }

    async fn save_vote(&mut self, vote: &tern_store::Vote) -> Result<(), io::Error> {
        self.inner.save_vote(vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.inner.save_committed(committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.inner.read_committed().await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        if !self.fail.load(Ordering::SeqCst) {
            return self.inner.append(entries, callback).await;
        }
        let e: io::Error = StoreError::LogWrite {
            op: "append",
            dir: self.dir.clone(),
            source: Box::new(StoreError::Io {
                op: "sync",
                path: self.dir.clone(),
                source: io::Error::from_raw_os_error(5), // EIO
            }),
        }
        .into();
        callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
        Err(e)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.inner.truncate_after(last_log_id).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.inner.purge(log_id).await
    }
}

/// A failed log write stops Raft: the write is not acknowledged, the
/// node's fatal signal fires with what failed and what to check, and Raft
/// answers nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_log_write_stops_raft_and_is_reported() {
    support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut node = TestNode::boot(&Grpc, &dir.path().join("node"), loopback()).await;
    let (log, sm) = tern_store::open(&node.dir).unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let log = FailingLog {
        inner: log,
        dir: node.dir.join(tern_store::LOG_DIR),
        fail: fail.clone(),
    };
    write_node_id(&node.dir, FIRST_NODE_ID).unwrap();
    let raft = RaftNode::start(
        &node.services,
        FIRST_NODE_ID,
        log,
        sm,
        node.client(),
        &RaftOptions::default(),
    )
    .await
    .unwrap();
    raft.initialize(node.member()).await.unwrap();
    node.raft = Some(raft);
    support::wait_leader_among(std::slice::from_ref(&node)).await;
    let raft = node.raft.as_ref().unwrap();
    raft.client_write(support::put_vm(1)).await.unwrap();
    let no_failure = tokio::time::timeout(Duration::from_millis(200), raft.failure()).await;
    assert!(no_failure.is_err(), "no failure while the disk works");

    fail.store(true, Ordering::SeqCst);
    let write = tokio::time::timeout(WAIT, raft.client_write(support::put_vm(2)))
        .await
        .unwrap();
    assert!(
        write.is_err(),
        "a write whose append failed is never acknowledged"
    );
    let why = tokio::time::timeout(WAIT, raft.failure()).await.unwrap();
    assert!(why.contains("storage error"), "{why}");
    assert!(why.contains("append"), "{why}");
    assert!(why.contains(tern_store::LOG_DIR), "{why}");
    assert!(why.contains("check the disk"), "{why}");
    assert_eq!(
        raft.raft().metrics().borrow_watched().state,
        ServerState::Shutdown
    );
    assert!(raft.client_write(support::put_vm(3)).await.is_err());
    assert!(raft.state().read(|s| s.vm("vm-2").is_none()).unwrap());
    if let Some(r) = node.raft.take() {
        let _ = r.shutdown().await;
    }
    node.stop().await;
}
