//! Scenario `nat`: NAT traversal through a private iroh relay.
//!
//! Topology (every name starts with the lab prefix):
//!
//! ```text
//!             pub (the "internet": relay 10.200.0.1, HTTPS :443, QAD :7842)
//!           /          |            \
//!   10.201.1.2    10.201.2.2     10.201.3.2        WAN sides
//!      rha            rhb            rhs           routers
//!   home NAT       home NAT      symmetric NAT
//!  192.168.1.2    192.168.2.2    192.168.3.2       hosts
//!      ha             hb             hs
//! ```
//!
//! A home router maps endpoint-independently (nftables `masquerade`, the
//! source port kept) and drops unsolicited inbound packets on its WAN side
//! (`ct state established,related accept; drop`), as real home routers do;
//! the symmetric router maps each destination to a new random port
//! (`masquerade fully-random`) behind the same filter.
//!
//! Steps: start the relay in `pub` (a fresh CA; its PEM goes to the nodes'
//! `relay_ca_cert`); start a real `tern` node in `hb` (iroh only, the
//! relay in its config); then, over N attempts each from a fresh endpoint
//! (a new socket, so a new NAT mapping) in `ha` (home NAT to home NAT) and
//! in `hs` (symmetric NAT to home NAT), dial that node by its key, relay
//! and advertised (private, unreachable) address with Tern's ALPN, do one
//! ping round trip, and watch the connection's paths for a direct one.
//! Finally `tern` nodes in `ha` and `hs` join the node in `hb` over iroh
//! through the NATs and the three-node cluster's status is checked.
//!
//! Guarantees (exit non-zero otherwise): home NAT connected ≥ 95% and
//! direct ≥ 95% (the seed's NAT-traversal criterion); symmetric NAT
//! connected 100% (through the relay; direct % is reported); the cluster
//! forms with all three members.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use iroh::endpoint::{Connection, PathEvent, PortmapperConfig, presets};
use iroh::{Endpoint, EndpointAddr, PublicKey, RelayMode, RelayUrl};
use tern_protocol::catalog::ServiceId;
use tern_protocol::frame::Limits;
use tern_protocol::{Frame, FrameKind, Header, Priority};

use tern_node::config::{Config, Listen, ListenConfig, SeedConfig};
use tern_process_kit::Metrics;
use tern_testkit::{TernProcess, config};

use crate::netns::{Cidr, Lab, Netns};
use crate::relay;
use crate::scenarios::Ctx;

/// Connection attempts per NAT kind in the `--quick` (CI) run.
pub const ATTEMPTS_QUICK: usize = 20;
/// Connection attempts per NAT kind in the full run.
pub const ATTEMPTS_FULL: usize = 100;
/// Attempts in flight at once per NAT kind (each its own endpoint and
/// socket, so its own NAT mapping): keeps the run short without loading
/// the shared 2-core machine with hundreds of endpoints.
pub const CONCURRENCY: usize = 4;
/// How long a fresh endpoint may take to register with the relay.
pub const ONLINE_WAIT: Duration = Duration::from_secs(15);
/// How long the dial plus one ping may take.
pub const CONNECT_WAIT: Duration = Duration::from_secs(20);
/// How long a connection that starts relayed may take to go direct:
/// the transport's own NAT settle time, so the lab and the nodes' metric
/// agree on what "direct" means.
pub const DIRECT_WAIT: Duration = tern_transport_iroh::client::NAT_SETTLE_TIME;
/// Home NAT: least share of attempts that connect (the seed's criterion).
pub const MIN_HOME_CONNECTED: f64 = 95.0;
/// Home NAT: least share of attempts that end on a direct path.
pub const MIN_HOME_DIRECT: f64 = 95.0;
/// Symmetric NAT: every attempt connects (through the relay).
pub const MIN_SYMMETRIC_CONNECTED: f64 = 100.0;
/// How long the nodes may take to form the three-node cluster.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(90);
/// How long a node may take to bind and write its `node.json`.
pub const NODE_START_WAIT: Duration = Duration::from_secs(60);
/// The cluster's join token.
const JOIN_TOKEN: &str = "tern-lab-nat";
/// The relay's address in the public namespace.
pub const RELAY_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The nodes' iroh port.
const IROH_PORT: u16 = 7401;
/// The nodes' `/metrics` address (inside each host's namespace).
const METRICS: &str = "127.0.0.1:9400";

/// A router's NAT behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping, established/related-only inbound.
    Home,
    /// A new random port per destination, established/related-only inbound.
    Symmetric,
}

impl NatKind {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            NatKind::Home => "home NAT",
            NatKind::Symmetric => "symmetric NAT",
        }
    }
}

/// The nftables rules of a NAT router whose WAN interface is `wan`: source
/// NAT on the way out, and a WAN side that admits only replies.
///
/// The drop covers the `input` hook too, not only `forward`: a peer's
/// hole-punching probe that arrives before our own first packet to it is
/// addressed to the router itself. Accepted there, it would leave a
/// conntrack entry holding the very tuple our later outgoing packet needs,
/// so masquerade would pick another source port and the punched hole
/// would point nowhere. Dropped before conntrack confirms it, it leaves
/// nothing behind, as a real home router's stateful firewall does.
pub fn nat_rules(kind: NatKind, wan: &str) -> String {
    let masquerade = match kind {
        // No `random`/`fully-random`: the source port is kept, so one
        // socket has one public mapping whatever the destination.
        NatKind::Home => "masquerade",
        NatKind::Symmetric => "masquerade fully-random",
    };
    format!(
        "add table ip tern_nat\n\
         delete table ip tern_nat\n\
         table ip tern_nat {{\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   oifname \"{wan}\" {masquerade}\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy accept;\n\
         \x20   iifname \"{wan}\" ct state established,related accept\n\
         \x20   iifname \"{wan}\" counter drop\n\
         \x20 }}\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter; policy accept;\n\
         \x20   iifname \"{wan}\" ct state established,related accept\n\
         \x20   iifname \"{wan}\" counter drop\n\
         \x20 }}\n\
         }}\n"
    )
}

/// One connection attempt's outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attempt {
    /// The dial and a ping round trip succeeded.
    pub connected: bool,
    /// A direct path was selected within [`DIRECT_WAIT`].
    pub direct: bool,
    /// From the dial's start to the ping's answer.
    pub connect_time: Option<Duration>,
    /// From the dial's start to the direct path's selection.
    pub time_to_direct: Option<Duration>,
    /// Why it did not connect.
    pub error: Option<String>,
}

/// Figures over a set of attempts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PathStats {
    /// Attempts made.
    pub attempts: usize,
    /// Attempts that connected.
    pub connected: usize,
    /// Attempts that went direct.
    pub direct: usize,
    /// Median connect time.
    pub connect_p50: Option<Duration>,
    /// Median time to direct (over direct attempts).
    pub direct_p50: Option<Duration>,
    /// 99th percentile time to direct.
    pub direct_p99: Option<Duration>,
}

impl PathStats {
    /// Share of attempts that connected, in percent.
    pub fn connected_pct(&self) -> f64 {
        pct(self.connected, self.attempts)
    }

    /// Share of attempts that went direct, in percent.
    pub fn direct_pct(&self) -> f64 {
        pct(self.direct, self.attempts)
    }
}

fn pct(n: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

/// The `p`-quantile (0..=1) of `values` by nearest rank; `None` when empty.
pub fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort();
    let rank = (p * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()) - 1).copied()
}

/// Tabulates `attempts`.
pub fn stats(attempts: &[Attempt]) -> PathStats {
    let connect: Vec<Duration> = attempts.iter().filter_map(|a| a.connect_time).collect();
    let direct: Vec<Duration> = attempts
        .iter()
        .filter(|a| a.direct)
        .filter_map(|a| a.time_to_direct)
        .collect();
    PathStats {
        attempts: attempts.len(),
        connected: attempts.iter().filter(|a| a.connected).count(),
        direct: attempts.iter().filter(|a| a.direct).count(),
        connect_p50: percentile(&connect, 0.5),
        direct_p50: percentile(&direct, 0.5),
        direct_p99: percentile(&direct, 0.99),
    }
}

/// The guarantees for one NAT kind: (what, held, value) per guarantee.
pub fn checks(kind: NatKind, s: &PathStats) -> Vec<(String, bool, String)> {
    let connected = format!(
        "{:.1}% ({} of {})",
        s.connected_pct(),
        s.connected,
        s.attempts
    );
    match kind {
        NatKind::Home => vec![
            (
                format!("home NAT connected >= {MIN_HOME_CONNECTED}%"),
                s.attempts > 0 && s.connected_pct() >= MIN_HOME_CONNECTED,
                connected,
            ),
            (
                format!("home NAT direct >= {MIN_HOME_DIRECT}%"),
                s.attempts > 0 && s.direct_pct() >= MIN_HOME_DIRECT,
                format!("{:.1}% ({} of {})", s.direct_pct(), s.direct, s.attempts),
            ),
        ],
        NatKind::Symmetric => vec![(
            "symmetric NAT connected 100% (relay carries what hole punching cannot)".to_owned(),
            s.attempts > 0 && s.connected_pct() >= MIN_SYMMETRIC_CONNECTED,
            connected,
        )],
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{} ms", d.as_millis()))
}

/// One site: a host behind its router.
struct Site {
    host: Netns,
    ip: Ipv4Addr,
}

/// Builds the topology: `pub` with the relay address, and per site a
/// router (`r{name}`) with its NAT rules and a host (`{name}`).
fn topology(lab: &Lab) -> anyhow::Result<(Netns, Vec<Site>)> {
    let public = lab.namespace("pub")?;
    public.forwarding()?;
    public.ip(&["addr", "add", &format!("{RELAY_IP}/32"), "dev", "lo"])?;
    let mut sites = Vec::new();
    for (i, name, kind) in [
        (1u8, "ha", NatKind::Home),
        (2, "hb", NatKind::Home),
        (3, "hs", NatKind::Symmetric),
    ] {
        let router = lab.namespace(&format!("r{name}"))?;
        router.forwarding()?;
        let (_, wan) = lab.link(
            &public,
            &format!("p{i}"),
            Cidr::new(Ipv4Addr::new(10, 201, i, 1), 24),
            &router,
            &format!("w{i}"),
            Cidr::new(Ipv4Addr::new(10, 201, i, 2), 24),
        )?;
        let host = lab.namespace(name)?;
        let ip = Ipv4Addr::new(192, 168, i, 2);
        lab.link(
            &router,
            &format!("l{i}"),
            Cidr::new(Ipv4Addr::new(192, 168, i, 1), 24),
            &host,
            &format!("h{i}"),
            Cidr::new(ip, 24),
        )?;
        router.route_add("default", Ipv4Addr::new(10, 201, i, 1))?;
        host.route_add("default", Ipv4Addr::new(192, 168, i, 1))?;
        router.nft(&nat_rules(kind, &wan.name))?;
        sites.push(Site { host, ip });
    }
    Ok((public, sites))
}

/// A node's config: iroh only on the site's address, `/metrics` on the
/// namespace's loopback, the lab's private relay, the process runtime,
/// the lab's keys as admins (the CLI's status below needs a role), and
/// `seed` (an id and an iroh address) to join through.
fn node_config(
    dir: &Path,
    ip: Ipv4Addr,
    relay: &relay::RelayHandle,
    seed: Option<(&str, SocketAddr)>,
) -> anyhow::Result<Config> {
    let listen = ListenConfig {
        grpc: Listen::Off,
        iroh: Listen::On(SocketAddr::new(IpAddr::V4(ip), IROH_PORT)),
        metrics: Listen::On(METRICS.parse().context("the lab's metrics address")?),
    };
    let mut c = config::node(&dir.join("data"), listen, JOIN_TOKEN);
    c.iroh.relay_url = Some(relay.url.clone());
    c.iroh.relay_ca_cert = Some(relay.ca_file.clone());
    c.access.admins = crate::keys::admin_ids();
    c.transport = Some(config::iroh());
    if let Some((id, addr)) = seed {
        c.cluster.join = vec![SeedConfig {
            id: id.to_owned(),
            grpc: None,
            iroh: vec![addr],
        }];
    }
    Ok(c)
}

/// A `tern run` node started in a site.
struct TernNode {
    name: String,
    dir: PathBuf,
    proc: TernProcess,
    ns: Netns,
}

fn start_node(
    lab: &Lab,
    tern: &Path,
    name: &str,
    site: &Site,
    relay: &relay::RelayHandle,
    seed: Option<(&str, SocketAddr)>,
) -> anyhow::Result<TernNode> {
    let dir = lab.dir().join(name);
    std::fs::create_dir_all(&dir)?;
    let config_file = dir.join("node.toml");
    config::write(&config_file, &node_config(&dir, site.ip, relay, seed)?)?;
    // TERN_LAB_NODE_LOG: the nodes' RUST_LOG, to debug traversal.
    let log = std::env::var("TERN_LAB_NODE_LOG").unwrap_or_else(|_| "info".to_owned());
    let mut cmd = TernProcess::command(tern, &config_file);
    cmd.env("RUST_LOG", &log);
    let proc = lab.spawn_tern(&site.host, cmd, &dir.join("data"), &dir.join("node.log"))?;
    Ok(TernNode {
        name: name.to_owned(),
        dir,
        proc,
        ns: site.host.clone(),
    })
}

/// Waits until the node wrote its `node.json` (it bound its transports).
async fn node_file(
    node: &mut TernNode,
    bound: Duration,
) -> anyhow::Result<tern_node::node::NodeFile> {
    node.proc
        .wait_node_file(bound)
        .await
        .with_context(|| format!("tern node {}", node.name))
}

/// `tern status --json` of `node`, asked over iroh from inside its
/// namespace (with the lab's CLI key, an admin; the node's direct address).
fn status(tern: &Path, node: &TernNode) -> anyhow::Result<serde_json::Value> {
    let tern = tern.display().to_string();
    let key = node.dir.join("cli.key");
    crate::keys::write_cli_key(&key).context("writing the lab's CLI key")?;
    let key = key.display().to_string();
    let file = tern_node::node::NodeFile::read(&node.dir.join("data"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let addrs: Vec<String> = file
        .iroh
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    let target = format!("{}@{}", file.id, addrs.join(","));
    let out = node.ns.exec(&[
        &tern,
        "status",
        "--json",
        "--transport",
        "iroh",
        "--key",
        &key,
        "--node",
        &target,
    ])?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "tern status of {}: {}",
            node.name,
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Scrapes the node's `/metrics` for its iroh connection paths (direct,
/// relayed).
async fn node_paths(node: &TernNode) -> anyhow::Result<(f64, f64)> {
    let addr: SocketAddr = METRICS.parse().context("the lab's metrics address")?;
    let text = node
        .ns
        .run_task(move || async move { Ok(tern_process_kit::scrape(addr).await?) })
        .await?;
    Ok(parse_paths(&text))
}

/// The `direct` and `relayed` values of the iroh connection-path counter
/// in Prometheus text.
pub fn parse_paths(text: &str) -> (f64, f64) {
    let name = tern_protocol::metric_names::CONNECTION_PATHS;
    let m = Metrics::parse(text);
    let paths = |path| m.sum(name, &[("transport", "iroh"), ("path", path)]);
    (paths("direct"), paths("relayed"))
}

/// One attempt: a fresh endpoint dials `target` with Tern's ALPN, pings
/// it over Tern's wire protocol and watches for a direct path.
async fn attempt(target: EndpointAddr, relay: RelayUrl, ca: Vec<u8>) -> Attempt {
    let endpoint = match fresh_endpoint(relay, ca).await {
        Ok(e) => e,
        Err(e) => {
            return Attempt {
                error: Some(format!("endpoint: {e:#}")),
                ..Attempt::default()
            };
        }
    };
    if tokio::time::timeout(ONLINE_WAIT, endpoint.online())
        .await
        .is_err()
    {
        endpoint.close().await;
        return Attempt {
            error: Some(format!(
                "not registered with the relay within {ONLINE_WAIT:?}"
            )),
            ..Attempt::default()
        };
    }
    let started = Instant::now();
    let dial = async {
        let conn = endpoint
            .connect(target, tern_transport_iroh::ALPN)
            .await
            .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
        let events = conn.path_events();
        ping(&conn).await?;
        anyhow::Ok((conn, events))
    };
    let mut result = match tokio::time::timeout(CONNECT_WAIT, dial).await {
        Err(_) => Attempt {
            error: Some(format!("no connection and ping within {CONNECT_WAIT:?}")),
            ..Attempt::default()
        },
        Ok(Err(e)) => Attempt {
            error: Some(format!("{e:#}")),
            ..Attempt::default()
        },
        Ok(Ok((conn, mut events))) => {
            let connect_time = started.elapsed();
            let direct_now = conn
                .paths()
                .iter()
                .find(|p| p.is_selected())
                .is_some_and(|p| !p.is_relay());
            let time_to_direct = if direct_now {
                Some(connect_time)
            } else {
                let went_direct = async {
                    while let Some(event) = events.next().await {
                        if let PathEvent::Selected { remote_addr, .. } = event
                            && remote_addr.is_ip()
                        {
                            return Some(started.elapsed());
                        }
                    }
                    None
                };
                tokio::time::timeout(DIRECT_WAIT, went_direct)
                    .await
                    .ok()
                    .flatten()
            };
            conn.close(iroh::endpoint::VarInt::from_u32(0), b"attempt done");
            Attempt {
                connected: true,
                direct: time_to_direct.is_some(),
                connect_time: Some(connect_time),
                time_to_direct,
                error: None,
            }
        }
    };
    if result.error.is_some() {
        result.connected = false;
    }
    endpoint.close().await;
    result
}

/// An endpoint configured as the transport configures a node's (see
/// `IrohTransport::bind`): no address lookup, no port mapping, the lab's
/// relay trusted through its CA; a new key and a new socket.
async fn fresh_endpoint(relay: RelayUrl, ca: Vec<u8>) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::builder(presets::Minimal)
        .secret_key(iroh::SecretKey::generate())
        .clear_address_lookup()
        .portmapper_config(PortmapperConfig::Disabled)
        .clear_ip_transports()
        .bind_addr("0.0.0.0:0")
        .map_err(|e| anyhow::anyhow!("bind address: {e}"))?
        .relay_mode(RelayMode::Custom(relay.into()))
        .ca_tls_config(iroh::tls::CaTlsConfig::custom_roots([ca.into()]))
        .bind()
        .await
        .map_err(|e| anyhow::anyhow!("binding an endpoint: {e}"))?;
    Ok(endpoint)
}

/// One ping frame on a new stream, answered by the node's transport.
async fn ping(conn: &Connection) -> anyhow::Result<()> {
    let nonce: u64 = rand::random();
    let header = Header {
        kind: FrameKind::Ping,
        priority: Priority::Control,
        idempotent: true,
        service: ServiceId::Connection,
        method: 0,
        request_id: 1,
        payload_len: 0,
        deadline_ms: 0,
    };
    let payload = Bytes::copy_from_slice(&nonce.to_le_bytes());
    let frame = Frame::new(header, payload.clone(), Limits::default())
        .map_err(|e| anyhow::anyhow!("ping frame: {} bytes over {}", e.len, e.max))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| anyhow::anyhow!("open stream: {e}"))?;
    tern_transport_iroh::wire::write_frame(&mut send, &frame)
        .await
        .map_err(|e| anyhow::anyhow!("write ping: {e}"))?;
    let _ = send.finish();
    let answer = tern_transport_iroh::wire::read_frame(&mut recv, Limits::default())
        .await
        .map_err(|e| anyhow::anyhow!("read pong: {e:?}"))?;
    if answer.header.kind != FrameKind::Pong || answer.payload != payload {
        bail!("ping answered by a {:?} frame", answer.header.kind);
    }
    Ok(())
}

/// `n` attempts, [`CONCURRENCY`] at a time, inside `ns`.
async fn attempts(
    ns: &Netns,
    n: usize,
    target: EndpointAddr,
    relay: RelayUrl,
    ca: Vec<u8>,
) -> anyhow::Result<Vec<Attempt>> {
    ns.run_task(move || async move {
        let mut out = Vec::with_capacity(n);
        let mut pending = futures::stream::iter(0..n)
            .map(|_| attempt(target.clone(), relay.clone(), ca.clone()))
            .buffer_unordered(CONCURRENCY);
        while let Some(a) = pending.next().await {
            if let Some(e) = &a.error {
                tracing::info!("attempt failed: {e}");
            }
            out.push(a);
        }
        Ok(out)
    })
    .await
}

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let n = if ctx.opts.quick {
        ATTEMPTS_QUICK
    } else {
        ATTEMPTS_FULL
    };
    let lab = ctx.lab.clone();
    let tern = ctx.opts.tern.clone();
    let report = &mut ctx.report;

    report.step("topology: a public namespace for the relay, two home NATs, one symmetric NAT");
    let (public, sites) = topology(&lab)?;
    let [ha, hb, hs] = &sites[..] else {
        bail!("topology built {} sites, expected 3", sites.len());
    };

    report.step(format!(
        "relay at {} (self-signed CA, QUIC address discovery on :{})",
        relay::relay_url(IpAddr::V4(RELAY_IP)),
        relay::QUIC_PORT
    ));
    let relay = relay::start(&public, IpAddr::V4(RELAY_IP), lab.dir()).await?;
    let relay_url: RelayUrl = relay
        .url
        .parse()
        .map_err(|e| anyhow::anyhow!("relay url {}: {e}", relay.url))?;

    report.step("tern node b behind home NAT b (iroh only, the relay in its config)");
    let mut b = start_node(&lab, &tern, "b", hb, &relay, None)?;
    let b_file = node_file(&mut b, NODE_START_WAIT).await?;
    let b_key: PublicKey = b_file
        .id
        .parse()
        .map_err(|e| anyhow::anyhow!("node b's id {}: {e}", b_file.id))?;
    let b_iroh: Vec<SocketAddr> = b_file.iroh.clone().unwrap_or_default();
    report.info(format!(
        "node b {} advertises {b_iroh:?} (private, unreachable from the other sites)",
        &b_file.id[..8]
    ));
    let mut target = EndpointAddr::new(b_key).with_relay_url(relay_url.clone());
    for a in &b_iroh {
        target = target.with_ip_addr(*a);
    }

    for (kind, site) in [(NatKind::Home, ha), (NatKind::Symmetric, hs)] {
        report.step(format!(
            "{n} connection attempts from behind {} to node b (a fresh endpoint each, {CONCURRENCY} at a time)",
            kind.name()
        ));
        let started = Instant::now();
        let list = attempts(
            &site.host,
            n,
            target.clone(),
            relay_url.clone(),
            relay.ca_der.clone(),
        )
        .await?;
        let s = stats(&list);
        report.info(format!(
            "{} attempts in {:.1?}",
            list.len(),
            started.elapsed()
        ));
        for e in list.iter().filter_map(|a| a.error.as_deref()).take(3) {
            report.info(format!("failed attempt: {e}"));
        }
        let name = kind.name();
        report.figure(format!("{name}: connect time p50"), ms(s.connect_p50));
        report.figure(
            format!("{name}: direct"),
            format!("{:.1}% ({} of {})", s.direct_pct(), s.direct, s.attempts),
        );
        report.figure(
            format!("{name}: time to direct"),
            format!("p50 {} / p99 {}", ms(s.direct_p50), ms(s.direct_p99)),
        );
        for (what, ok, value) in checks(kind, &s) {
            report.check(what, ok, value);
        }
    }

    report.step("tern nodes a (home NAT) and s (symmetric NAT) join node b's cluster over iroh");
    let seed = b_iroh
        .first()
        .copied()
        .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(hb.ip), IROH_PORT));
    let started = Instant::now();
    let mut a = start_node(&lab, &tern, "a", ha, &relay, Some((&b_file.id, seed)))?;
    node_file(&mut a, NODE_START_WAIT).await?;
    let mut s = start_node(&lab, &tern, "s", hs, &relay, Some((&b_file.id, seed)))?;
    node_file(&mut s, NODE_START_WAIT).await?;
    let deadline = Instant::now() + CLUSTER_WAIT;
    let seen = loop {
        let mut seen = Vec::new();
        for node in [&b, &a, &s] {
            let (members, applied) = match status(&tern, node) {
                Ok(v) => (
                    v["members"].as_array().map_or(0, Vec::len),
                    v["applied_index"].as_u64().unwrap_or(0),
                ),
                Err(_) => (0, 0),
            };
            seen.push((node.name.clone(), members, applied));
        }
        if seen.iter().all(|(_, m, _)| *m == 3) || Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let formed = seen.iter().all(|(_, m, _)| *m == 3);
    report.check(
        "3 tern nodes behind NATs form a cluster over iroh",
        formed,
        seen.iter()
            .map(|(n, m, i)| format!("{n}: {m} members, applied {i}"))
            .collect::<Vec<_>>()
            .join("; "),
    );
    report.figure(
        "cluster formed (both joins included) after",
        format!("{:.1?}", started.elapsed()),
    );
    // A node counts a connection's path once it settled (direct at once,
    // or relayed after the settle time): wait that long before reading.
    report.info(format!(
        "waiting {DIRECT_WAIT:?} for the nodes' connections to settle"
    ));
    tokio::time::sleep(DIRECT_WAIT + Duration::from_secs(1)).await;
    for node in [&b, &a, &s] {
        match node_paths(node).await {
            Ok((direct, relayed)) => report.figure(
                format!("node {} iroh connections (its /metrics)", node.name),
                format!("direct {direct}, relayed {relayed}"),
            ),
            Err(e) => report.info(format!("node {} /metrics: {e:#}", node.name)),
        }
    }

    report.step("stop the nodes and the relay");
    for node in [&mut s, &mut a, &mut b] {
        node.proc.stop(Duration::from_secs(10)).await;
    }
    let stats = relay.stop().await?;
    report.figure(
        "relay",
        format!(
            "{} client connections, {} packets relayed, {} QUIC address discovery connections",
            stats.accepts, stats.packets_relayed, stats.qad_connections
        ),
    );
    report.check(
        "nodes and lab endpoints used QUIC address discovery",
        stats.qad_connections > 0,
        stats.qad_connections,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_rule_text() {
        let home = nat_rules(NatKind::Home, "tn4w1");
        assert!(home.contains("oifname \"tn4w1\" masquerade\n"), "{home}");
        assert!(!home.contains("random"));
        assert!(home.contains("iifname \"tn4w1\" ct state established,related accept"));
        assert!(home.contains("iifname \"tn4w1\" counter drop"));
        assert!(home.contains("type filter hook input"), "{home}");
        assert!(home.contains("type filter hook forward"), "{home}");
        let sym = nat_rules(NatKind::Symmetric, "tn4w3");
        assert!(
            sym.contains("oifname \"tn4w3\" masquerade fully-random\n"),
            "{sym}"
        );
        assert!(home.starts_with("add table ip tern_nat\ndelete table ip tern_nat\n"));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&v, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(
            percentile(&[Duration::from_millis(7)], 0.99),
            Some(Duration::from_millis(7))
        );
    }

    #[test]
    fn stats_and_verdicts() {
        let ok = Attempt {
            connected: true,
            direct: true,
            connect_time: Some(Duration::from_millis(30)),
            time_to_direct: Some(Duration::from_millis(300)),
            error: None,
        };
        let relayed = Attempt {
            direct: false,
            time_to_direct: None,
            ..ok.clone()
        };
        let failed = Attempt {
            error: Some("x".into()),
            ..Attempt::default()
        };
        let mut list = vec![ok.clone(); 19];
        list.push(relayed.clone());
        let s = stats(&list);
        assert_eq!((s.attempts, s.connected, s.direct), (20, 20, 19));
        let failures = |kind, s: &PathStats| checks(kind, s).iter().filter(|c| !c.1).count();
        assert_eq!(failures(NatKind::Home, &s), 0, "95% direct passes");
        list.push(failed.clone());
        let s = stats(&list);
        assert_eq!(failures(NatKind::Home, &s), 1, "{s:?}");
        assert_eq!(failures(NatKind::Symmetric, &s), 1);
        let s = stats(&[relayed.clone(), relayed]);
        assert_eq!(failures(NatKind::Symmetric, &s), 0);
        assert_eq!(
            failures(NatKind::Home, &PathStats::default()),
            2,
            "no attempt, no pass"
        );
        assert_eq!(s.direct_p50, None);
    }

    #[test]
    fn connection_paths_from_metrics_text() {
        let text = "# TYPE tern_transport_connection_paths_total counter\n\
            tern_transport_connection_paths_total{transport=\"iroh\",path=\"direct\"} 3\n\
            tern_transport_connection_paths_total{transport=\"iroh\",path=\"relayed\"} 1\n";
        assert_eq!(parse_paths(text), (3.0, 1.0));
    }
}
