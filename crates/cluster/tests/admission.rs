//! Admission you can hand out safely, against real nodes (real transports
//! on loopback, sled stores) over both transports:
//!
//! - a join token created by an admin admits as many nodes as it allows,
//!   then is refused as used up; an expired token, a mistyped secret, a
//!   revoked token and a non-admin's attempt to create one are refused;
//! - failed joins are bounded per key (`ResourceExhausted` beyond);
//! - joiners become voters only while the cluster has fewer than
//!   `max_voters`; later ones stay learners until an admin promotes them;
//! - a declared capacity above the cap is cut to it;
//! - a demotion of an unknown id, of the only voter, or by a non-admin is
//!   refused with the reason;
//! - every token and membership change is in the audit log.
//!
//! Every wait is bounded ([`support::WAIT`]); nothing asserts on speed.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::async_runtime::WatchReceiver;
use prost::Message;
use support::{Grpc, Iroh, TestNode, TransportFactory, WAIT, call, loopback};
use tern_cluster::admission::FAILED_JOINS_PER_KEY;
use tern_cluster::{Admission, RaftNodeError, RaftOptions, RaftServices};
use tern_protocol::access::Role;
use tern_protocol::catalog::methods;
use tern_protocol::{CallError, Code, PeerAddr, RpcClient, pb};
use tern_state::{Capacity, Command, Response};

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

async fn create_token(
    admin: &dyn RpcClient,
    at: &PeerAddr,
    ttl_secs: u64,
    uses: u32,
) -> Result<pb::TokenCreateResponse, CallError> {
    let req = pb::TokenCreateRequest {
        request_id: format!("tok-{}", rand_id()),
        ttl_secs,
        uses,
    };
    let bytes = call(
        admin,
        at,
        methods::CLUSTER_TOKEN_CREATE,
        req.encode_to_vec().into(),
    )
    .await?;
    Ok(pb::TokenCreateResponse::decode(bytes).unwrap())
}

fn rand_id() -> u64 {
    rand::random()
}

async fn audit_actions(client: &dyn RpcClient, at: &PeerAddr) -> Vec<String> {
    let bytes = call(
        client,
        at,
        methods::CLUSTER_ACCESS_LIST,
        pb::AccessListRequest {}.encode_to_vec().into(),
    )
    .await
    .unwrap();
    pb::AccessListResponse::decode(bytes)
        .unwrap()
        .log
        .into_iter()
        .map(|e| e.action)
        .collect()
}

fn denied_with(err: RaftNodeError, words: &[&str]) {
    let text = err.to_string();
    match &err {
        RaftNodeError::Call {
            error: CallError::Application(s),
            ..
        } => assert_eq!(s.code, Code::PermissionDenied, "{text}"),
        other => panic!("expected a refusal, got {other}"),
    }
    for w in words {
        assert!(text.contains(w), "{w:?} missing from: {text}");
    }
}

async fn tokens_and_learners<F: TransportFactory>(factory: F) {
    support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let options = RaftOptions::default();
    let admission = Admission {
        static_token: None,
        max_voters: 2,
        max_capacity: Capacity {
            vcpus: 16,
            memory_mib: 65_536,
        },
    };
    let boot = |name: &str| {
        let path = dir.path().join(name);
        let services = RaftServices::with_admission(admission.clone());
        let factory = &factory;
        async move { TestNode::boot_with(factory, &path, loopback(), services).await }
    };
    let mut first = boot("first").await;
    first.initialize(&options).await;
    support::wait_leader_among(std::slice::from_ref(&first)).await;
    let leader = first.addr.clone();

    // The admin: a key bootstrapped into the access table.
    let admin = boot("admin").await;
    let bootstrap = Command::ChangeAccess {
        request_id: "boot-admin".into(),
        grant: true,
        key: admin.addr.id,
        role: Role::Admin,
        by: admin.addr.id,
        at_unix_ms: now_ms(),
    };
    let r = first.raft().client_write(bootstrap).await.unwrap();
    assert_eq!(r.data, Response::Done);

    // A joiner without a token, and with a static secret nobody accepts.
    let mut second = boot("second").await;
    let mut me = second.member();
    me.capacity = Capacity {
        vcpus: 4096,
        memory_mib: 1 << 40,
    };
    let err = tern_cluster::request_join(second.client().as_ref(), &leader, "guess", &me)
        .await
        .unwrap_err();
    denied_with(err, &["not valid for this cluster"]);

    // Malformed admission calls are refused, naming the field.
    let refused = |method, payload: Vec<u8>, code: Code, field: &'static str| {
        let admin = admin.client();
        let leader = leader.clone();
        async move {
            let err = call(admin.as_ref(), &leader, method, payload.into())
                .await
                .unwrap_err();
            assert_eq!(err.code(), Some(code), "{err}");
            assert!(err.to_string().contains(field), "{field} missing: {err}");
        }
    };
    let create = |request_id: &str, ttl_secs, uses| {
        pb::TokenCreateRequest {
            request_id: request_id.into(),
            ttl_secs,
            uses,
        }
        .encode_to_vec()
    };
    let tc = methods::CLUSTER_TOKEN_CREATE;
    refused(tc, create("a", 0, 1), Code::InvalidArgument, "ttl_secs").await;
    refused(
        tc,
        create("b", 8 * 86_400, 1),
        Code::InvalidArgument,
        "ttl_secs",
    )
    .await;
    refused(tc, create("c", 60, 10_001), Code::InvalidArgument, "uses").await;
    refused(tc, create("", 60, 1), Code::InvalidArgument, "request_id").await;
    let revoke = |id: &str| {
        pb::TokenRevokeRequest {
            request_id: format!("rv-{id}"),
            id: id.into(),
        }
        .encode_to_vec()
    };
    let tr = methods::CLUSTER_TOKEN_REVOKE;
    refused(tr, revoke("not-hex!"), Code::InvalidArgument, "id").await;
    refused(tr, revoke("0badcafe"), Code::NotFound, "0badcafe").await;
    let promote = pb::PromoteRequest { node_id: 999 }.encode_to_vec();
    refused(methods::CLUSTER_PROMOTE, promote, Code::NotFound, "999").await;
    // Demotion: an unknown id; the only voter (fewer than three left).
    let demote = |node_id| pb::DemoteRequest { node_id }.encode_to_vec();
    let cd = methods::CLUSTER_DEMOTE;
    refused(cd, demote(999), Code::NotFound, "999").await;
    let only = first.raft().id();
    refused(
        cd,
        demote(only),
        Code::FailedPrecondition,
        "would leave 0 voters",
    )
    .await;
    // Only an admin demotes (the handler checks, behind the access gate).
    let err = call(second.client().as_ref(), &leader, cd, demote(only).into())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("admin"), "{err}");

    // A token for one node: the first join works, a reuse is refused.
    let token = create_token(admin.client().as_ref(), &leader, 600, 1)
        .await
        .unwrap();
    assert!(token.token.contains('.'), "{}", token.token);
    let answer = tern_cluster::request_join(second.client().as_ref(), &leader, &token.token, &me)
        .await
        .unwrap();
    assert!(answer.voter_pending, "the second voter is below max_voters");
    let second_id = answer.node_id;
    // Its declared capacity was cut to the cap.
    let recorded = first
        .raft()
        .raft()
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .get_node(&second_id)
        .unwrap()
        .capacity;
    assert_eq!(
        recorded,
        Capacity {
            vcpus: 16,
            memory_mib: 65_536
        }
    );
    {
        let (log, sm) = tern_store::open(&second.dir).unwrap();
        tern_cluster::write_node_id(&second.dir, second_id).unwrap();
        second
            .services
            .trust_until_first_membership(answer.members.iter().map(|(id, a)| (*id, a.id)));
        let node = tern_cluster::RaftNode::start(
            &second.services,
            second_id,
            log,
            sm,
            second.client(),
            &options,
        )
        .await
        .unwrap();
        node.wait_until_joined(true, WAIT).await.unwrap();
        second.raft = Some(node);
    }

    let mut third = boot("third").await;
    let err = tern_cluster::request_join(
        third.client().as_ref(),
        &leader,
        &token.token,
        &third.member(),
    )
    .await
    .unwrap_err();
    denied_with(err, &["used up"]);

    // A mistyped secret of a live token.
    let many = create_token(admin.client().as_ref(), &leader, 600, 0)
        .await
        .unwrap();
    let (id, secret) = many.token.split_once('.').unwrap();
    let mistyped = format!("{id}.{}", secret.chars().rev().collect::<String>());
    let err =
        tern_cluster::request_join(third.client().as_ref(), &leader, &mistyped, &third.member())
            .await
            .unwrap_err();
    denied_with(err, &["not valid for this cluster"]);

    // An expired token.
    let short = create_token(admin.client().as_ref(), &leader, 1, 0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let err = tern_cluster::request_join(
        third.client().as_ref(),
        &leader,
        &short.token,
        &third.member(),
    )
    .await
    .unwrap_err();
    denied_with(err, &["expired"]);

    // A member (not an admin) may not mint tokens.
    let err = create_token(second.client().as_ref(), &leader, 600, 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    // The third node joins with the unlimited token: the cluster has its
    // max_voters (2), so it stays a learner.
    third.join_with(&options, &leader, &many.token).await;
    let third_id = third.raft().id();
    let is_voter = |id| {
        first
            .raft()
            .raft()
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id)
    };
    assert!(is_voter(second_id));
    assert!(!is_voter(third_id), "the third stays a learner");

    // Only an admin promotes it.
    let req = pb::PromoteRequest { node_id: third_id }.encode_to_vec();
    let err = call(
        second.client().as_ref(),
        &leader,
        methods::CLUSTER_PROMOTE,
        req.clone().into(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    call(
        admin.client().as_ref(),
        &leader,
        methods::CLUSTER_PROMOTE,
        req.into(),
    )
    .await
    .unwrap();
    assert!(is_voter(third_id), "promoted by the admin");

    // A revoked token admits nobody.
    let revoke = pb::TokenRevokeRequest {
        request_id: "revoke-many".into(),
        id: id.to_owned(),
    };
    call(
        admin.client().as_ref(),
        &leader,
        methods::CLUSTER_TOKEN_REVOKE,
        revoke.encode_to_vec().into(),
    )
    .await
    .unwrap();
    let fourth = boot("fourth").await;
    let err = tern_cluster::request_join(
        fourth.client().as_ref(),
        &leader,
        &many.token,
        &fourth.member(),
    )
    .await
    .unwrap_err();
    denied_with(err, &["not valid for this cluster"]);

    // Failed joins are bounded per key: the fourth has failed once.
    for _ in 1..FAILED_JOINS_PER_KEY {
        let _ = tern_cluster::request_join(
            fourth.client().as_ref(),
            &leader,
            "guess",
            &fourth.member(),
        )
        .await;
    }
    let err = tern_cluster::request_join(
        fourth.client().as_ref(),
        &leader,
        &token.token,
        &fourth.member(),
    )
    .await
    .unwrap_err();
    match err {
        RaftNodeError::Call {
            error: CallError::Application(s),
            ..
        } => assert_eq!(s.code, Code::ResourceExhausted, "{s}"),
        other => panic!("expected ResourceExhausted, got {other}"),
    }

    // The audit log holds every token and membership change.
    let actions = audit_actions(admin.client().as_ref(), &leader).await;
    for want in [
        "grant",
        "token-create",
        "admit",
        "add-learner",
        "promote",
        "token-revoke",
    ] {
        assert!(
            actions.iter().any(|a| a == want),
            "{want} missing: {actions:?}"
        );
    }

    for mut n in [third, second, first] {
        n.stop().await;
    }
    for mut n in [admin, fourth] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iroh_tokens_and_learners() {
    tokens_and_learners(Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_tokens_and_learners() {
    tokens_and_learners(Grpc).await;
}
