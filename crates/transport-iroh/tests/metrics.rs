//! The transport records its metrics under the shared names, labelled
//! `transport="iroh"`. A recorder installed for this test binary notes
//! every series registered while real nodes call each other.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::metric_names as names;
use tern_protocol::{Call, RpcClient, pb};
use tern_transport_conformance::service::TestService;
use tern_transport_iroh::{IrohConfig, IrohTransport};

/// Every series seen: name and sorted `key=value` labels.
struct Seen(Mutex<BTreeSet<(String, Vec<String>)>>);

static SEEN: Seen = Seen(Mutex::new(BTreeSet::new()));

/// The short key of the server the test dials.
static SERVER_PEER: Mutex<String> = Mutex::new(String::new());

impl Seen {
    fn note(&self, key: &Key) {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        self.0
            .lock()
            .expect("recorder lock")
            .insert((key.name().to_owned(), labels));
    }

    fn has(&self, name: &str, labels: &[&str]) -> bool {
        self.0.lock().expect("recorder lock").iter().any(|(n, l)| {
            n == name
                && l.iter().any(|x| x == "transport=iroh")
                && labels.iter().all(|want| l.iter().any(|x| x == want))
        })
    }
}

impl Recorder for Seen {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.note(key);
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.note(key);
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.note(key);
        Histogram::noop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_connections_are_measured() {
    metrics::set_global_recorder(&SEEN).expect("first recorder of this binary");
    tokio::time::timeout(Duration::from_secs(60), async {
        let server = IrohTransport::bind(
            IrohConfig::new(rand::random()),
            TestService::default().dispatcher(),
        )
        .await
        .unwrap();
        let caller = IrohTransport::bind(
            IrohConfig::new(rand::random()),
            TestService::default().dispatcher(),
        )
        .await
        .unwrap();
        let client = caller.client();
        let addr = server.peer_addr();
        *SERVER_PEER.lock().unwrap() = addr.id.short();
        let payload = pb::RaftPayload {
            data: Bytes::from_static(b"m"),
        }
        .encode_to_vec()
        .into();
        client
            .call(
                &addr,
                Call::new(methods::RAFT_APPEND_ENTRIES, payload)
                    .with_timeout(Duration::from_secs(20)),
            )
            .await
            .unwrap();
        // A failed dial: the server is gone.
        server.shutdown(Duration::from_secs(5)).await;
        let _ = client
            .call(
                &addr,
                Call::new(methods::STATUS_GET, Bytes::new()).with_timeout(Duration::from_secs(3)),
            )
            .await;
        caller.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("bounded");

    // The path series names the peer dialled, by its short key.
    let server_peer = format!("peer={}", SERVER_PEER.lock().unwrap().clone());
    assert!(
        SEEN.has(names::CONNECTION_PATHS, &["path=direct", &server_peer]),
        "no path series for {server_peer}; seen: {:#?}",
        SEEN.0.lock().unwrap()
    );
    for (name, labels) in [
        (names::CONNECT_SECONDS, &[][..]),
        (names::CONNECTIONS_ACTIVE, &[]),
        (names::CONNECTION_PATHS, &["path=direct"]),
        (
            names::CALL_SECONDS,
            &["service=raft", "method=AppendEntries", "side=client"],
        ),
        (
            names::CALL_SECONDS,
            &["service=raft", "method=AppendEntries", "side=server"],
        ),
        (names::CALLS, &["outcome=ok", "side=client"]),
        (names::CALLS, &["outcome=transport_error", "side=client"]),
        (names::CALL_FAILURES, &[]),
        (names::MESSAGES, &["direction=sent"]),
        (names::MESSAGES, &["direction=received"]),
        (names::BYTES, &["direction=sent"]),
        (names::IN_FLIGHT, &["side=client"]),
        (names::IN_FLIGHT, &["side=server"]),
    ] {
        assert!(
            SEEN.has(name, labels),
            "{name} {labels:?} not recorded; seen: {:#?}",
            SEEN.0.lock().unwrap()
        );
    }
}
