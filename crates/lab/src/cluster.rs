//! A cluster of real `tern run` processes, one per namespace, on one
//! switch; a client namespace on the same switch for the lab's own calls.
//!
//! [`Cluster::start`] writes each node's config (listen addresses on the
//! node's own address, the `[transport]` section the scenario asks for,
//! `[cluster] join` pointing at node 1), starts node 1, then the others
//! one by one, and waits until every node is a voter and a leader is
//! known. Then a scenario can find the leader, SIGKILL and restart a node,
//! reload a node's `[transport]` by SIGHUP, scrape `/metrics`
//! ([`Metrics`]), run the CLI against a node ([`Cluster::cli`]) and drive
//! client traffic from the client namespace ([`Traffic`]).
//!
//! Layout: node `i` (1-based) lives in namespace `{prefix}-n{i}` with
//! interface `{prefix}n{i}` at `subnet.host(10 + i)`; the client in
//! `{prefix}-cl` at `subnet.host(2)`; the switch is `{prefix}-sw`. Files
//! go to `LAB_DIR/n{i}.toml`, `LAB_DIR/n{i}/` (data) and `LAB_DIR/n{i}.log`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tern_node::node::NodeFile;

use crate::netns::{Cidr, Iface, Lab, Netns, Proc, Switch};
use crate::report::Latencies;

pub use tern_process_kit::exposition::{Metrics, Sample, by_label, deltas, quantile_of, sum_all};

/// Port of every node's gRPC listener (each node has its own address).
pub const GRPC_PORT: u16 = 7400;
/// Port of every node's iroh (UDP) listener.
pub const IROH_PORT: u16 = 7401;
/// Port of every node's `/metrics`.
pub const METRICS_PORT: u16 = 9400;
/// The join token the lab's clusters share.
pub const JOIN_TOKEN: &str = "tern-lab-token";
/// Bound on a node's start (a joiner included: it waits to be caught up).
pub const START_BOUND: Duration = Duration::from_secs(120);
/// Bound on a state the cluster converges to (voters, leader, policy).
pub const CONVERGE_BOUND: Duration = Duration::from_secs(90);
/// Bound on a node's graceful stop.
pub const STOP_BOUND: Duration = Duration::from_secs(30);
/// Pause between polls of a converging state.
pub const POLL: Duration = Duration::from_millis(250);

/// What cluster to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of nodes.
    pub size: usize,
    /// The `[transport]` section every node starts with (header included).
    pub transport: String,
    /// The switch's address range.
    pub subnet: Cidr,
    /// Bind iroh (UDP) and `/metrics` to `0.0.0.0` instead of the node's
    /// address (gRPC stays on it: a gRPC URL must name a real address).
    /// With it, a node whose address changes can still send from the new
    /// one (QUIC connection migration); iroh then advertises the
    /// interface addresses it finds.
    pub iroh_any: bool,
}

impl ClusterSpec {
    /// `size` nodes on `10.77.0.0/24` with `transport`.
    pub fn new(size: usize, transport: &str) -> ClusterSpec {
        ClusterSpec {
            size,
            transport: transport.to_owned(),
            subnet: Cidr::new(std::net::Ipv4Addr::new(10, 77, 0, 0), 24),
            iroh_any: false,
        }
    }
}

/// The `[transport]` section for dual mode preferring iroh for `prefer`
/// (`"all_except_raft"` or service names) with Raft over `raft`, fallback
/// on.
pub fn dual_section(prefer: &[&str], raft: &str) -> String {
    let list: Vec<String> = prefer.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[transport]\nmode = \"dual\"\n[transport.migration]\nprefer_iroh = [{}]\nraft_transport = \"{raft}\"\nfallback_to_grpc = true\n",
        list.join(", ")
    )
}

/// One node's config file text. `seed` is the node to join through (none
/// for the first node).
pub fn node_config(
    data_dir: &Path,
    listen: std::net::Ipv4Addr,
    seed: Option<&NodeFile>,
    transport: &str,
) -> String {
    let ports = Ports {
        grpc: GRPC_PORT,
        iroh: IROH_PORT,
        metrics: METRICS_PORT,
    };
    config_text(data_dir, listen, ports, JOIN_TOKEN, seed, transport)
}

/// The ports a node listens on, each on the node's one address.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// gRPC (TCP).
    pub grpc: u16,
    /// iroh (UDP).
    pub iroh: u16,
    /// Prometheus `/metrics` (TCP).
    pub metrics: u16,
}

/// One node's config file text on `listen` with these ports and join
/// token; `seed` is the node to join through (none for the first node).
/// The one config generator of the lab, in namespaces and on loopback.
pub fn config_text(
    data_dir: &Path,
    listen: std::net::Ipv4Addr,
    ports: Ports,
    join_token: &str,
    seed: Option<&NodeFile>,
    transport: &str,
) -> String {
    let Ports {
        grpc,
        iroh,
        metrics,
    } = ports;
    let mut s = format!(
        "data_dir = {:?}\n\n[listen]\ngrpc = \"{listen}:{grpc}\"\niroh = \"{listen}:{iroh}\"\nmetrics = \"{listen}:{metrics}\"\n\n[vm]\nruntimes = [\"process\"]\nruntime = \"process\"\n\n[capacity]\nvcpus = 4\nmemory_mib = 4096\n\n[cluster]\njoin_token = \"{join_token}\"\n",
        data_dir.display().to_string()
    );
    if let Some(seed) = seed {
        let iroh: Vec<String> = seed
            .iroh
            .iter()
            .flatten()
            .map(|a| format!("\"{a}\""))
            .collect();
        let grpc = seed
            .grpc
            .as_ref()
            .map(|g| format!(", grpc = \"{g}\""))
            .unwrap_or_default();
        s.push_str(&format!(
            "join = [{{ id = \"{}\"{grpc}, iroh = [{}] }}]\n",
            seed.id,
            iroh.join(", ")
        ));
    }
    s.push('\n');
    s.push_str(&crate::keys::access_section());
    s.push('\n');
    s.push_str(transport);
    s
}

/// A config text with iroh and `/metrics` listening on `0.0.0.0` instead
/// of `addr` (see [`ClusterSpec::iroh_any`]).
pub fn listen_any(config: &str, addr: std::net::Ipv4Addr) -> String {
    config
        .replace(
            &format!("iroh = \"{addr}:{IROH_PORT}\""),
            &format!("iroh = \"0.0.0.0:{IROH_PORT}\""),
        )
        .replace(
            &format!("metrics = \"{addr}:{METRICS_PORT}\""),
            &format!("metrics = \"0.0.0.0:{METRICS_PORT}\""),
        )
}

/// Replaces the `[transport]` section (and everything after it) of a
/// config text.
pub fn replace_transport(config: &str, transport: &str) -> String {
    let head = config.split("[transport]").next().unwrap_or(config);
    format!("{head}{transport}")
}

/// One node of the cluster.
#[derive(Debug)]
pub struct NodeSlot {
    /// 1-based index.
    pub index: usize,
    /// Its namespace.
    pub ns: Netns,
    /// Its interface on the switch.
    pub iface: Iface,
    /// Data directory.
    pub dir: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// The running process, if any.
    pub proc: Option<Proc>,
    /// What the node wrote about itself when it last started.
    pub file: Option<NodeFile>,
    /// Its Raft node id, once known.
    pub raft_id: Option<u64>,
}

impl NodeSlot {
    /// The node file, or an error naming the node.
    pub fn node_file(&self) -> anyhow::Result<&NodeFile> {
        self.file
            .as_ref()
            .with_context(|| format!("node n{} has not started", self.index))
    }

    /// The last lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    lab: Lab,
    tern: PathBuf,
    /// The switch every node is plugged into.
    pub switch: Switch,
    /// The client namespace.
    pub client: Netns,
    /// The client's interface.
    pub client_iface: Iface,
    /// The nodes, index 0 = node 1.
    pub nodes: Vec<NodeSlot>,
    spec: ClusterSpec,
}

impl Cluster {
    /// Builds the topology and starts the cluster (see the module docs);
    /// `progress` is told about each node as it comes up.
    pub async fn start(
        lab: &Lab,
        tern: &Path,
        spec: ClusterSpec,
        progress: &mut dyn FnMut(String),
    ) -> anyhow::Result<Cluster> {
        if spec.size == 0 {
            bail!("a cluster needs at least one node");
        }
        let switch = lab.switch("sw", spec.subnet)?;
        let client = lab.namespace("cl")?;
        let client_iface = lab.plug(&client, &switch, "cl", spec.subnet.host(2))?;
        let mut nodes = Vec::new();
        for i in 1..=spec.size {
            let ns = lab.namespace(&format!("n{i}"))?;
            let addr = spec
                .subnet
                .host(10 + u32::try_from(i).unwrap_or(u32::MAX - 10));
            let iface = lab.plug(&ns, &switch, &format!("n{i}"), addr)?;
            nodes.push(NodeSlot {
                index: i,
                ns,
                iface,
                dir: lab.dir().join(format!("n{i}")),
                config: lab.dir().join(format!("n{i}.toml")),
                log: lab.dir().join(format!("n{i}.log")),
                proc: None,
                file: None,
                raft_id: None,
            });
        }
        let mut cluster = Cluster {
            lab: lab.clone(),
            tern: tern.to_owned(),
            switch,
            client,
            client_iface,
            nodes,
            spec,
        };
        for i in 1..=cluster.nodes.len() {
            let seed = if i == 1 {
                None
            } else {
                Some(cluster.node(1)?.node_file()?.clone())
            };
            let slot = cluster.node(i)?;
            let mut text = node_config(
                &slot.dir,
                slot.iface.addr.addr,
                seed.as_ref(),
                &cluster.spec.transport,
            );
            if cluster.spec.iroh_any {
                text = listen_any(&text, slot.iface.addr.addr);
            }
            std::fs::write(&slot.config, text)
                .with_context(|| format!("writing {}", slot.config.display()))?;
            cluster.start_node(i).await?;
            progress(format!(
                "n{i} up at {} (pid {})",
                cluster.node(i)?.iface.addr.addr,
                cluster.node(i)?.proc.as_ref().map_or(0, Proc::pid)
            ));
        }
        cluster.wait_formed().await?;
        Ok(cluster)
    }

    /// The lab.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> anyhow::Result<&NodeSlot> {
        i.checked_sub(1)
            .and_then(|k| self.nodes.get(k))
            .with_context(|| {
                format!(
                    "there is no node n{i} (the cluster has {})",
                    self.nodes.len()
                )
            })
    }

    fn node_mut(&mut self, i: usize) -> anyhow::Result<&mut NodeSlot> {
        let n = self.nodes.len();
        i.checked_sub(1)
            .and_then(|k| self.nodes.get_mut(k))
            .with_context(|| format!("there is no node n{i} (the cluster has {n})"))
    }

    /// Indices of every node.
    pub fn indices(&self) -> Vec<usize> {
        (1..=self.nodes.len()).collect()
    }

    /// Starts (or restarts) node `i` with its config and waits until it has
    /// written its node file.
    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let tern = self.tern.display().to_string();
        let lab = self.lab.clone();
        let slot = self.node_mut(i)?;
        let config = slot.config.display().to_string();
        let proc = lab.spawn_env(
            &slot.ns,
            &[&tern, "run", "--config", &config],
            &[("RUST_LOG", "info")],
            &slot.log,
        )?;
        let pid = proc.pid();
        slot.proc = Some(proc);
        let deadline = Instant::now() + START_BOUND;
        loop {
            if let Ok(f) = NodeFile::read(&slot.dir)
                && i32::try_from(f.pid).ok() == Some(pid)
            {
                slot.file = Some(f);
                return Ok(());
            }
            if let Some(status) = slot.proc.as_mut().and_then(Proc::try_wait) {
                bail!(
                    "node n{i} exited while starting ({status}); its log ends:\n{}",
                    slot.log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "node n{i} did not start within {START_BOUND:?}; its log ends:\n{}",
                    slot.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let slot = self.node_mut(i)?;
        if let Some(mut p) = slot.proc.take() {
            p.kill();
        }
        Ok(())
    }

    /// Stops node `i` with SIGTERM (bounded); true when it exited cleanly.
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<bool> {
        let slot = self.node_mut(i)?;
        Ok(match slot.proc.take() {
            Some(mut p) => p.stop(STOP_BOUND).await.is_some_and(|s| s.success()),
            None => true,
        })
    }

    /// Whether node `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.node_mut(i)
            .ok()
            .and_then(|s| s.proc.as_mut())
            .is_some_and(|p| p.try_wait().is_none())
    }

    /// Rewrites node `i`'s `[transport]` section and sends SIGHUP.
    pub fn set_transport(&mut self, i: usize, section: &str) -> anyhow::Result<()> {
        let slot = self.node(i)?;
        let text = std::fs::read_to_string(&slot.config)?;
        std::fs::write(&slot.config, replace_transport(&text, section))?;
        let proc = slot
            .proc
            .as_ref()
            .with_context(|| format!("node n{i} is not running"))?;
        proc.signal(rustix::process::Signal::HUP);
        Ok(())
    }

    /// Runs `tern ARGS... --json --data-dir DIR --key LAB_KEY` in node
    /// `i`'s namespace (with a key of the lab's pool, an admin) and parses
    /// its JSON output.
    pub async fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<Value> {
        let slot = self.node(i)?;
        let dir = slot.dir.display().to_string();
        let tern = self.tern.display().to_string();
        // The global flags go after the subcommand and before any `--`
        // (what follows `--` is a workload's argv).
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let mut argv: Vec<String> = vec![tern];
        argv.extend(args[..split].iter().map(|a| (*a).to_owned()));
        // The lab's key: the node's own is an admin on the first node only
        // (members of other nodes may read, not write).
        let key = slot.dir.with_file_name(format!(
            "{}.lab-cli.key",
            slot.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        crate::keys::write_cli_key(&key)
            .with_context(|| format!("writing the CLI key {}", key.display()))?;
        argv.extend([
            "--json".to_owned(),
            "--data-dir".to_owned(),
            dir,
            "--key".to_owned(),
            key.display().to_string(),
        ]);
        argv.extend(args[split..].iter().map(|a| (*a).to_owned()));
        let ns = slot.ns.clone();
        let out = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            ns.exec(&refs)
        })
        .await??;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`tern {}` on n{i} printed no JSON: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Node `i`'s status (`tern status --json`).
    pub async fn status(&self, i: usize) -> anyhow::Result<Value> {
        self.cli(i, &["status"]).await
    }

    /// Waits until every node is a voter and a leader is known; records
    /// every node's Raft id.
    pub async fn wait_formed(&mut self) -> anyhow::Result<()> {
        let want = self.nodes.len();
        let deadline = Instant::now() + CONVERGE_BOUND;
        loop {
            let last = match self.status(1).await {
                Ok(s) => {
                    let voters = s["members"]
                        .as_array()
                        .map(|m| m.iter().filter(|m| m["voter"] == Value::Bool(true)).count())
                        .unwrap_or(0);
                    if voters == want && s["leader_id"].as_u64().unwrap_or(0) != 0 {
                        break;
                    }
                    format!("{voters} of {want} voters, leader {}", s["leader_id"])
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("the cluster did not form within {CONVERGE_BOUND:?} ({last})");
            }
            tokio::time::sleep(POLL).await;
        }
        for i in self.indices() {
            let s = self.status(i).await?;
            self.node_mut(i)?.raft_id = s["node_id"].as_u64();
        }
        Ok(())
    }

    /// The index of the leader as the running nodes agree (the first
    /// running node that names one), waiting (bounded) for one.
    pub async fn leader(&mut self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + CONVERGE_BOUND;
        loop {
            for i in self.indices() {
                if !self.is_running(i) {
                    continue;
                }
                if let Ok(s) = self.status(i).await
                    && let Some(id) = s["leader_id"].as_u64().filter(|id| *id != 0)
                    && let Some(index) = self
                        .nodes
                        .iter()
                        .find(|n| n.raft_id == Some(id))
                        .map(|n| n.index)
                    && self.is_running(index)
                {
                    return Ok(index);
                }
            }
            if Instant::now() > deadline {
                bail!("no leader among the running nodes within {CONVERGE_BOUND:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until node `i` reports a policy for which `pred` holds
    /// (`tern transport show --json`).
    pub async fn wait_policy(
        &self,
        i: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + CONVERGE_BOUND;
        loop {
            if let Ok(p) = self.cli(i, &["transport", "show"]).await
                && pred(&p)
            {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("node n{i} did not apply the new policy within {CONVERGE_BOUND:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Scrapes node `i`'s `/metrics` (from its own namespace).
    pub async fn metrics(&self, i: usize) -> anyhow::Result<Metrics> {
        let slot = self.node(i)?;
        let addr = slot
            .node_file()?
            .metrics
            .with_context(|| format!("node n{i} serves no /metrics"))?;
        let addr = if addr.ip().is_unspecified() {
            std::net::SocketAddr::new(slot.iface.addr.addr.into(), addr.port())
        } else {
            addr
        };
        let text = slot
            .ns
            .run_task(move || async move {
                tern_process_kit::scrape(addr)
                    .await
                    .map_err(anyhow::Error::from)
            })
            .await?;
        Ok(Metrics::parse(&text))
    }

    /// Every node's metrics summed: `sum` of `name` with `labels` over the
    /// nodes that answer.
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for i in self.indices() {
            if let Ok(m) = self.metrics(i).await {
                total += m.sum(name, labels);
            }
        }
        total
    }

    /// Every node's metrics now, in node order (a node that does not
    /// answer gives an empty set).
    pub async fn snapshot(&self) -> Vec<Metrics> {
        let mut v = Vec::new();
        for i in self.indices() {
            v.push(self.metrics(i).await.unwrap_or_default());
        }
        v
    }

    /// The node files of every node that has started (for [`Traffic`]).
    pub fn node_files(&self) -> Vec<NodeFile> {
        self.nodes.iter().filter_map(|n| n.file.clone()).collect()
    }

    /// Stops every node (SIGTERM, bounded); returns the indices of nodes
    /// that did not exit cleanly.
    pub async fn shutdown(&mut self) -> Vec<usize> {
        let mut unclean = Vec::new();
        for i in self.indices().into_iter().rev() {
            if !self.stop(i).await.unwrap_or(false) {
                unclean.push(i);
            }
        }
        unclean
    }
}

/// One client call the lab made.
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
    /// Starts traffic from `cluster`'s client namespace to every node.
    pub fn start(cluster: &Cluster, spec: TrafficSpec) -> anyhow::Result<Traffic> {
        Traffic::start_to(cluster, spec, &cluster.indices())
    }

    /// Starts traffic from `cluster`'s client namespace to the nodes
    /// `nodes` only (1-based indices).
    pub fn start_to(
        cluster: &Cluster,
        spec: TrafficSpec,
        nodes: &[usize],
    ) -> anyhow::Result<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let files: Vec<(usize, NodeFile)> = cluster
            .nodes
            .iter()
            .filter(|n| nodes.contains(&n.index))
            .filter_map(|n| n.file.clone().map(|f| (n.index, f)))
            .collect();
        let (s, r) = (stop.clone(), records.clone());
        let started = Instant::now();
        let handle = cluster
            .client
            .spawn_task(move || traffic_loop(files, spec, started, s, r))?;
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

    /// Waits (bounded) until `n` more calls have completed.
    pub async fn wait_calls(&self, n: usize) -> anyhow::Result<()> {
        let target = self.count() + n;
        let deadline = Instant::now() + CONVERGE_BOUND;
        while self.count() < target {
            if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                bail!("the client traffic stopped early");
            }
            if Instant::now() > deadline {
                bail!(
                    "client traffic did not make {n} calls within {CONVERGE_BOUND:?} (made {})",
                    self.count()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
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

/// Latencies of the successful calls among `records` for which `pred`
/// holds.
pub fn latencies(records: &[CallRecord], pred: impl Fn(&CallRecord) -> bool) -> Latencies {
    let mut l = Latencies::default();
    for r in records.iter().filter(|r| r.error.is_none() && pred(r)) {
        l.push(r.took);
    }
    l
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
    files: Vec<(usize, NodeFile)>,
    spec: TrafficSpec,
    started: Instant,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<CallRecord>>>,
) -> anyhow::Result<()> {
    use tern_protocol::catalog::methods;
    use tern_protocol::pb;
    let client = LabClient::new(&spec.transport).await?;
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

/// Bound on one call of the lab's client: longer than a Raft write's bound
/// plus a forward to the leader and a fallback (as the CLI's).
pub const CALL_TIMEOUT: Duration = tern_node::client::CLI_CALL_TIMEOUT;

/// The lab's own client, over one transport, with a key of the lab's pool
/// (an admin: see [`crate::keys`]).
///
/// Unlike the CLI's (`tern --transport iroh`), whose iroh endpoint binds
/// to 127.0.0.1 and so reaches only nodes on the same host, this one binds
/// iroh to `0.0.0.0:0` in its namespace.
pub struct LabClient {
    client: std::sync::Arc<dyn tern_protocol::RpcClient>,
    iroh: Option<tern_transport_iroh::IrohTransport>,
    transport: String,
}

impl std::fmt::Debug for LabClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LabClient({})", self.transport)
    }
}

impl LabClient {
    /// A client over `"grpc"` or `"iroh"`. Call it from a thread inside a
    /// namespace ([`crate::netns::Netns::spawn_task`]).
    pub async fn new(transport: &str) -> anyhow::Result<LabClient> {
        let key = crate::keys::client_key();
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
                .map_err(|e| anyhow::anyhow!("starting the lab client's iroh endpoint: {e}"))?;
                (
                    t.client() as std::sync::Arc<dyn tern_protocol::RpcClient>,
                    Some(t),
                )
            }
            other => bail!("transport {other:?}: expected \"grpc\" or \"iroh\""),
        };
        Ok(LabClient {
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
            .map_err(|e| tern_node::client::explain(method, &e))
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
    fn configs_are_generated() {
        let seed = NodeFile {
            id: "ab".repeat(32),
            grpc: Some("https://10.77.0.11:7400".into()),
            iroh: Some(vec!["10.77.0.11:7401".parse().unwrap()]),
            metrics: None,
            pid: 1,
        };
        let t = dual_section(&["all_except_raft"], "iroh");
        let c = node_config(
            Path::new("/tmp/x/n2"),
            "10.77.0.12".parse().unwrap(),
            Some(&seed),
            &t,
        );
        assert!(c.contains("grpc = \"10.77.0.12:7400\""), "{c}");
        assert!(
            c.contains("grpc = \"https://10.77.0.11:7400\", iroh = [\"10.77.0.11:7401\"]"),
            "{c}"
        );
        assert!(c.ends_with(&t));
        let parsed: toml::Value = toml::from_str(&c).unwrap();
        assert_eq!(parsed["transport"]["mode"].as_str(), Some("dual"));
        let r = replace_transport(&c, "[transport]\nmode = \"grpc\"\n");
        assert!(r.ends_with("[transport]\nmode = \"grpc\"\n"));
        assert!(!r.contains("dual"));
    }

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
