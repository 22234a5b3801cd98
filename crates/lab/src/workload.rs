//! The lab's recorded client workload: puts and gets of the metadata
//! register (`Cluster/MetaPut`, `Cluster/MetaGet`), made in-process with
//! the typed calls of `tern_raft_net::meta` so the recorded timings are
//! the calls' own. Run it inside a lab namespace with
//! [`crate::netns::Netns::spawn_task`]; every call and how it ended goes
//! to a [`crate::history::History`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tern_cluster::{MetaError, meta_get, meta_put};
use tern_protocol::{PeerAddr, RpcClient};
use tern_transport_grpc::{ClientConfig, GrpcClient};

use crate::history::{ClientLog, Op, Outcome, Value};

/// A client of one node's register.
#[derive(Clone)]
pub struct RegisterClient {
    client: Arc<dyn RpcClient>,
    /// The node called.
    pub peer: PeerAddr,
    /// Bound on one call.
    pub timeout: Duration,
}

impl std::fmt::Debug for RegisterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterClient")
            .field("peer", &self.peer.id.short())
            .finish_non_exhaustive()
    }
}

/// Why a register call did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    /// Refused before anything was applied (invalid argument): the call
    /// definitely took no effect.
    Refused(String),
    /// Anything else (no quorum, deadline, transport): a put may or may
    /// not have been applied.
    Unknown(String),
}

fn classify(e: MetaError) -> CallFailure {
    match e {
        MetaError::Invalid(m) => CallFailure::Refused(m),
        other => CallFailure::Unknown(other.to_string()),
    }
}

impl RegisterClient {
    /// A gRPC client of `peer` with a key of the lab's pool (an operator's:
    /// a follower forwards its calls to the leader). Must be created on the
    /// thread (namespace) that will call.
    pub fn grpc(peer: PeerAddr, timeout: Duration) -> RegisterClient {
        let key = crate::keys::client_key();
        let mut peer = peer;
        peer.iroh = None;
        RegisterClient {
            client: Arc::new(GrpcClient::new(ClientConfig::new(key))),
            peer,
            timeout,
        }
    }

    /// Sets `key` to `value`; answers the log index it was applied at.
    pub async fn put(&self, request_id: &str, key: &str, value: &str) -> Result<u64, CallFailure> {
        meta_put(
            self.client.as_ref(),
            &self.peer,
            request_id,
            key,
            value,
            self.timeout,
        )
        .await
        .map(|p| p.index)
        .map_err(classify)
    }

    /// Reads `key` linearizably: `None` when it is not set.
    pub async fn get(&self, key: &str) -> Result<Option<String>, CallFailure> {
        meta_get(self.client.as_ref(), &self.peer, key, self.timeout)
            .await
            .map(|r| r.value.map(|(v, _)| v))
            .map_err(classify)
    }

    /// One recorded operation: invokes `op` on `key`, records how it ended.
    pub async fn recorded(&self, log: &mut ClientLog, key: &str, op: Op) -> Outcome {
        let inv = log.invoke(key, op);
        let outcome = match op {
            Op::Write(v) => {
                match self
                    .put(&tern_node::client::request_id(), key, &v.to_string())
                    .await
                {
                    Ok(_) => Outcome::Written,
                    Err(CallFailure::Refused(e)) => Outcome::Failed(e),
                    Err(CallFailure::Unknown(e)) => Outcome::Unknown(e),
                }
            }
            Op::Read => match self.get(key).await {
                Ok(None) => Outcome::Read(None),
                Ok(Some(text)) => match text.parse::<Value>() {
                    Ok(v) => Outcome::Read(Some(v)),
                    // Not a value of this workload: recorded as a read of
                    // a value nobody wrote, which the checks reject.
                    Err(_) => Outcome::Read(Some(Value::MAX)),
                },
                // A read changes nothing: a failed one is left out.
                Err(CallFailure::Refused(e) | CallFailure::Unknown(e)) => Outcome::Failed(e),
            },
        };
        log.end(inv, outcome.clone());
        outcome
    }
}

/// Shared state of a recorded workload: the value counter (every write
/// writes a distinct value) and the stop flag.
#[derive(Debug, Default)]
pub struct Workload {
    next_value: AtomicU64,
    stop: AtomicBool,
    /// Operations completed so far, by every client.
    pub ops: AtomicU64,
}

impl Workload {
    /// A fresh workload.
    pub fn new() -> Arc<Workload> {
        Arc::new(Workload {
            next_value: AtomicU64::new(1),
            ..Workload::default()
        })
    }

    /// Asks every client to stop after its current call.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether the clients were asked to stop.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// A value no other write of this workload writes.
    pub fn fresh_value(&self) -> Value {
        self.next_value.fetch_add(1, Ordering::SeqCst)
    }
}

/// One client's loop: alternates writes of fresh values and reads over
/// `keys` (one register per key), pausing `pause` between calls, until
/// the workload stops or the client made `max_ops` calls.
pub async fn client_loop(
    client: RegisterClient,
    mut log: ClientLog,
    workload: Arc<Workload>,
    keys: Vec<String>,
    max_ops: u64,
    pause: Duration,
    seed: u64,
) -> anyhow::Result<u64> {
    let mut n = 0u64;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while !workload.stopped() && n < max_ops {
        // xorshift: which key and which operation.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = &keys[(x % keys.len() as u64) as usize];
        let op = if (x >> 8).is_multiple_of(2) {
            Op::Write(workload.fresh_value())
        } else {
            Op::Read
        };
        client.recorded(&mut log, key, op).await;
        n += 1;
        workload.ops.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(pause).await;
    }
    Ok(n)
}
