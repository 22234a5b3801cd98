//! Steady client traffic that records every call, and the client it
//! calls with: the one traffic recorder of the lab's scenarios and the
//! node's process tests.
//!
//! [`Traffic::start`] runs the calls on a thread of the caller's choosing
//! ([`spawn_thread`], or the lab's thread inside a network namespace), so
//! the client's sockets live where the caller needs them. Per round and
//! node: Status/Get and Health/Check, and with a VM, VM/Get and a VM stop
//! or start (alternating; a follower forwards them to the leader). Every
//! call becomes a [`CallRecord`]: when it started, how long it took, which
//! node, which method, and its error if it failed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use tern_node::node::NodeFile;

/// Bound on a wait for calls to complete ([`Traffic::wait_calls`]).
pub const WAIT_BOUND: Duration = Duration::from_secs(90);

/// The recording loop, as handed to a [`Spawner`].
pub type Task = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = anyhow::Result<()>>>> + Send>;

/// Starts a [`Task`] on a thread with its own runtime and returns the
/// thread's handle.
pub type Spawner<'a> =
    &'a dyn Fn(Task) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>>;

/// The plain [`Spawner`]: a new thread with a current-thread runtime.
pub fn spawn_thread(task: Task) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    Ok(std::thread::Builder::new()
        .name("tern-traffic".to_owned())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(task())
        })?)
}

/// One client call the traffic made.
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// When it started, since the traffic started.
    pub at: Duration,
    /// How long it took.
    pub took: Duration,
    /// Node index called (1-based).
    pub node: usize,
    /// Method label (`status/get`).
    pub method: String,
    /// The error, if it failed.
    pub error: Option<String>,
}

/// What [`Traffic`] sends.
#[derive(Debug, Clone)]
pub struct TrafficSpec {
    /// `"grpc"` or `"iroh"`: the transport the client uses to reach nodes.
    pub transport: String,
    /// A VM to read and stop/start through every node (writes through a
    /// follower are forwarded to the leader over the nodes' router); none:
    /// only status and health calls.
    pub vm_id: Option<String>,
    /// Pause between rounds (zero: back to back).
    pub pause: Duration,
}

/// Steady client traffic from the client namespace to every node: per
/// round and node, Status/Get and Health/Check, and with a VM, VM/Get and
/// a VM stop or start (alternating). Every call is recorded.
#[derive(Debug)]
pub struct Traffic {
    started: Instant,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<CallRecord>>>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Traffic {
    /// Starts traffic to `nodes` (each a 1-based index, which the records
    /// name, and its node file), calling with `key`, on a thread `spawn`
    /// starts.
    pub fn start(
        spawn: Spawner<'_>,
        key: [u8; 32],
        nodes: Vec<(usize, NodeFile)>,
        spec: TrafficSpec,
    ) -> anyhow::Result<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (stop.clone(), records.clone());
        let started = Instant::now();
        let handle = spawn(Box::new(move || {
            Box::pin(traffic_loop(key, nodes, spec, started, s, r))
        }))?;
        Ok(Traffic {
            started,
            stop,
            records,
            handle: Some(handle),
        })
    }

    /// When the traffic started ([`CallRecord::at`] counts from here).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Time since the traffic started (to mark phases in the records).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Calls recorded so far.
    pub fn count(&self) -> usize {
        self.records.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// A copy of the records so far.
    pub fn records(&self) -> Vec<CallRecord> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// One look for [`Traffic::wait_calls`]: whether `target` calls are
    /// done, an error when the traffic stopped or `deadline` passed.
    fn reached(&self, target: usize, deadline: Instant) -> anyhow::Result<bool> {
        if self.count() >= target {
            return Ok(true);
        }
        if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            bail!("the client traffic stopped early");
        }
        if Instant::now() > deadline {
            bail!(
                "client traffic did not reach {target} calls within {WAIT_BOUND:?} (made {})",
                self.count()
            );
        }
        Ok(false)
    }

    /// Waits (at most [`WAIT_BOUND`]) until `n` more calls have completed.
    pub async fn wait_calls(&self, n: usize) -> anyhow::Result<()> {
        let (target, deadline) = (self.count() + n, Instant::now() + WAIT_BOUND);
        while !self.reached(target, deadline)? {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// [`Traffic::wait_calls`] for callers without a runtime.
    pub fn wait_calls_blocking(&self, n: usize) -> anyhow::Result<()> {
        let (target, deadline) = (self.count() + n, Instant::now() + WAIT_BOUND);
        while !self.reached(target, deadline)? {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// [`Traffic::finish`] for callers without a runtime.
    pub fn finish_blocking(mut self) -> anyhow::Result<Vec<CallRecord>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join()
                .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))??;
        }
        Ok(self.records())
    }

    /// Stops the traffic and returns every record.
    pub async fn finish(mut self) -> anyhow::Result<Vec<CallRecord>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            tokio::task::spawn_blocking(move || {
                h.join()
                    .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))?
            })
            .await??;
        }
        Ok(self.records())
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Failed calls among `records`.
pub fn failures(records: &[CallRecord]) -> Vec<&CallRecord> {
    records.iter().filter(|r| r.error.is_some()).collect()
}

/// The longest time between the completions of two successive successful
/// calls to `node` within `[from, to]` (the service gap a client saw).
pub fn longest_gap(records: &[CallRecord], node: usize, from: Duration, to: Duration) -> Duration {
    let mut ends: Vec<Duration> = records
        .iter()
        .filter(|r| r.node == node && r.error.is_none())
        .map(|r| r.at + r.took)
        .filter(|e| *e >= from && *e <= to)
        .collect();
    ends.sort_unstable();
    let mut gap = Duration::ZERO;
    let mut prev = from;
    for e in ends {
        gap = gap.max(e.saturating_sub(prev));
        prev = e;
    }
    gap.max(to.saturating_sub(prev))
}

async fn traffic_loop(
    key: [u8; 32],
    files: Vec<(usize, NodeFile)>,
    spec: TrafficSpec,
    started: Instant,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<CallRecord>>>,
) -> anyhow::Result<()> {
    use tern_protocol::catalog::methods;
    use tern_protocol::pb;
    let client = Client::new(&spec.transport, key).await?;
    let mut conns = Vec::new();
    for (i, f) in &files {
        conns.push((*i, client.peer(f)?));
    }
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        for (i, conn) in &conns {
            let mut calls: Vec<&'static tern_protocol::Method> =
                vec![methods::STATUS_GET, methods::HEALTH_CHECK];
            if spec.vm_id.is_some() {
                calls.push(methods::VM_GET);
                calls.push(if round.is_multiple_of(2) {
                    methods::VM_STOP
                } else {
                    methods::VM_START
                });
            }
            for m in calls {
                let at = started.elapsed();
                let t0 = Instant::now();
                let vm_id = spec.vm_id.clone().unwrap_or_default();
                let result = if m == methods::STATUS_GET {
                    client
                        .call::<_, pb::NodeStatus>(conn, m, &pb::StatusRequest {})
                        .await
                        .map(|_| ())
                } else if m == methods::HEALTH_CHECK {
                    client
                        .call::<_, pb::HealthCheckResponse>(conn, m, &pb::HealthCheckRequest {})
                        .await
                        .map(|_| ())
                } else if m == methods::VM_GET {
                    client
                        .call::<_, pb::VmRecord>(conn, m, &pb::GetVmRequest { vm_id })
                        .await
                        .map(|_| ())
                } else {
                    client
                        .call::<_, pb::VmRecord>(
                            conn,
                            m,
                            &pb::VmActionRequest {
                                request_id: tern_node::client::request_id(),
                                vm_id,
                            },
                        )
                        .await
                        .map(|_| ())
                };
                let rec = CallRecord {
                    at,
                    took: t0.elapsed(),
                    node: *i,
                    method: m.label(),
                    error: result.err(),
                };
                if let Some(e) = &rec.error {
                    tracing::warn!(node = i, method = %rec.method, error = %e, "client call failed");
                }
                if let Ok(mut r) = records.lock() {
                    r.push(rec);
                }
            }
        }
        round += 1;
        if !spec.pause.is_zero() {
            tokio::time::sleep(spec.pause).await;
        }
    }
    client.close().await;
    Ok(())
}

/// Bound on one call of the client: longer than a Raft write's bound
/// plus a forward to the leader and a fallback (as the CLI's).
pub const CALL_TIMEOUT: Duration = tern_node::client::CLI_CALL_TIMEOUT;

/// A harness's own client, over one transport, with a key the harness
/// chose (the lab: one of its pool, an admin; see [`crate::keys`]).
///
/// Unlike the CLI's (`tern --transport iroh`), whose iroh endpoint binds
/// to 127.0.0.1 and so reaches only nodes on the same host, this one binds
/// iroh to `0.0.0.0:0` (in the lab, inside its namespace).
pub struct Client {
    client: std::sync::Arc<dyn tern_protocol::RpcClient>,
    iroh: Option<tern_transport_iroh::IrohTransport>,
    transport: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.transport)
    }
}

impl Client {
    /// A client over `"grpc"` or `"iroh"` calling with `key`. In the lab,
    /// call it from a thread inside a namespace (its `Netns::spawn_task`).
    pub async fn new(transport: &str, key: [u8; 32]) -> anyhow::Result<Client> {
        let (client, iroh): (std::sync::Arc<dyn tern_protocol::RpcClient>, _) = match transport {
            "grpc" => (
                std::sync::Arc::new(tern_transport_grpc::GrpcClient::new(
                    tern_transport_grpc::ClientConfig::new(key),
                )),
                None,
            ),
            "iroh" => {
                let config = tern_transport_iroh::IrohConfig::new(key).with_bind_addr(
                    std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
                );
                let t = tern_transport_iroh::IrohTransport::bind(
                    config,
                    std::sync::Arc::new(tern_protocol::rpc::Dispatcher::new()),
                )
                .await
                .map_err(|e| anyhow::anyhow!("starting the client's iroh endpoint: {e}"))?;
                (
                    t.client() as std::sync::Arc<dyn tern_protocol::RpcClient>,
                    Some(t),
                )
            }
            other => bail!("transport {other:?}: expected \"grpc\" or \"iroh\""),
        };
        Ok(Client {
            client,
            iroh,
            transport: transport.to_owned(),
        })
    }

    /// The address of the node described by `file`, reduced to this
    /// client's transport.
    pub fn peer(&self, file: &NodeFile) -> anyhow::Result<tern_protocol::PeerAddr> {
        let mut p = file.peer_addr().map_err(|e| anyhow::anyhow!(e))?;
        if self.transport == "iroh" {
            p.grpc = None;
            if p.iroh.is_none() {
                bail!("node {} serves no iroh", file.id);
            }
        } else {
            p.iroh = None;
            if p.grpc.is_none() {
                bail!("node {} serves no gRPC", file.id);
            }
        }
        Ok(p)
    }

    /// Calls `method` on `peer` (bounded by [`CALL_TIMEOUT`]); an error is
    /// explained as the CLI would.
    pub async fn call<Req, Resp>(
        &self,
        peer: &tern_protocol::PeerAddr,
        method: &'static tern_protocol::Method,
        req: &Req,
    ) -> Result<Resp, String>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        tern_protocol::rpc::call_typed(self.client.as_ref(), peer, method, req, CALL_TIMEOUT)
            .await
            .map_err(|e| tern_node::client::explain(method, &e).to_string())
    }

    /// Closes the iroh endpoint, if any.
    pub async fn close(self) {
        if let Some(t) = self.iroh {
            t.shutdown(tern_node::client::CLI_IROH_DRAIN).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps() {
        let rec = |at: u64, node| CallRecord {
            at: Duration::from_millis(at),
            took: Duration::from_millis(10),
            node,
            method: "status/get".into(),
            error: None,
        };
        let rs = vec![rec(0, 1), rec(100, 1), rec(600, 1), rec(50, 2)];
        let g = longest_gap(&rs, 1, Duration::ZERO, Duration::from_millis(700));
        assert_eq!(g, Duration::from_millis(500));
    }
}
