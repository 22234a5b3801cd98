//! The demo's live view: one frame every [`super::REFRESH`] with the
//! rollout (stage, policy, share, soak), its gates judged live on the
//! figures of the covered nodes since the demo saw the stage, each node's
//! role, policy in force and its source, calls and errors per transport
//! from its `/metrics`, the demo's own calls, the VM, and the newest
//! decisions of the rollout's history.

use std::collections::BTreeMap;
use std::time::Instant;

use tern_cluster::rollout::{now_unix_ms, plan_from_pb};
use tern_cluster::rollout_driver::figures;
use tern_process_kit::{Metrics, scrape};
use tern_protocol::catalog::methods;
use tern_protocol::metric_names as names;
use tern_protocol::pb;
use tern_state::NodeId;
use tern_state::rollout::evaluate;

use super::load::{Counts, TRANSPORTS};
use crate::cli::state_name;
use crate::client::Conn;
use crate::node::NodeFile;

/// How many decisions of the history a frame shows.
pub const DECISIONS_SHOWN: usize = 4;

/// One node's counters from `/metrics`, per transport (index into
/// [`TRANSPORTS`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    /// Calls made and served.
    pub calls: [f64; 2],
    /// Of them, transport errors.
    pub errors: [f64; 2],
    /// Router fallbacks to gRPC.
    pub fallbacks: f64,
}

/// Reads [`Traffic`] from a parsed exposition.
pub fn traffic(m: &Metrics) -> Traffic {
    let err = names::Outcome::TransportError.as_str();
    let mut t = Traffic::default();
    for (i, tr) in TRANSPORTS.iter().enumerate() {
        t.calls[i] = m.sum(names::CALLS, &[("transport", tr)]);
        t.errors[i] = m.sum(names::CALLS, &[("transport", tr), ("outcome", err)]);
    }
    t.fallbacks = m.sum(names::ROUTER_FALLBACKS, &[]);
    t
}

/// A non-negative figure as a whole number.
pub fn whole(x: f64) -> u64 {
    if x.is_finite() && x > 0.0 {
        x.round() as u64
    } else {
        0
    }
}

/// A policy in a few words: `grpc`, `iroh`, or
/// `dual iroh for health,status, raft grpc`.
pub fn short_policy(p: &pb::TransportPolicy) -> String {
    if p.mode != "dual" {
        return p.mode.clone();
    }
    let prefer = if p.prefer_iroh.is_empty() {
        "nothing".to_owned()
    } else {
        p.prefer_iroh.join(",")
    };
    format!("dual iroh for {prefer}, raft {}", p.raft_transport)
}

/// A node as a frame shows it.
pub struct NodeView {
    /// The node's id, once it answered.
    pub id: Option<NodeId>,
    /// Its status, when it answered.
    pub status: Option<pb::NodeStatus>,
    /// Its `/metrics`, when scraped.
    pub metrics: Option<Metrics>,
}

/// The window the live gates are judged on: the stage (its decision
/// number) and each node's scrape when the demo first saw it.
struct Window {
    seq: u64,
    at: Instant,
    before: BTreeMap<NodeId, Metrics>,
}

/// The live view's memory between frames.
pub struct View {
    /// Whether stdout is a terminal (frames redraw the screen).
    pub tty: bool,
    last: Vec<Option<(Instant, Traffic)>>,
    window: Option<Window>,
}

impl View {
    /// A view of `nodes` nodes.
    pub fn new(nodes: usize) -> View {
        View {
            tty: std::io::IsTerminal::is_terminal(&std::io::stdout()),
            last: vec![None; nodes],
            window: None,
        }
    }

    /// Reads every node, the rollout and the VM, and prints one frame
    /// headed `phase`; answers the rollout it read.
    pub async fn frame(
        &mut self,
        conns: &[Conn],
        files: &[NodeFile],
        vm_id: &str,
        counts: &Counts,
        phase: &str,
    ) -> Option<pb::RolloutResponse> {
        let mut nodes = Vec::new();
        for (conn, file) in conns.iter().zip(files) {
            nodes.push(read_node(conn, file).await);
        }
        let rollout = rollout_of(conns).await;
        let vm = vm_line(conns, vm_id).await;
        let mut out = String::new();
        out.push_str(if self.tty {
            "\x1b[2J\x1b[H"
        } else {
            "\n----\n"
        });
        out.push_str(&format!("tern demo: {phase} (Ctrl-C to stop)\n\n"));
        if let Some(r) = rollout.as_ref().filter(|r| r.present) {
            out.push_str(&self.rollout_lines(r, &nodes));
        }
        out.push_str(&self.node_table(&nodes));
        out.push_str(&calls_line(counts));
        out.push_str(&vm);
        if let Some(r) = rollout.as_ref().filter(|r| r.present) {
            out.push_str(&decision_lines(r));
        }
        print!("{out}");
        rollout
    }

    fn node_table(&mut self, nodes: &[NodeView]) -> String {
        let policies: Vec<String> = nodes
            .iter()
            .map(|n| match &n.status {
                Some(s) => s.policy.as_ref().map_or_else(
                    || "-".to_owned(),
                    |p| format!("{} ({})", short_policy(p), s.policy_source),
                ),
                None => "-".to_owned(),
            })
            .collect();
        let w = policies
            .iter()
            .map(|p| p.chars().count())
            .max()
            .unwrap_or(0)
            .max(13);
        let mut out = format!(
            "{:<5} {:<9} {:<5} {:<8} {:<w$} {:>7} {:>7} {:>8} {:>8} {:>9}\n",
            "NODE",
            "ROLE",
            "TERM",
            "APPLIED",
            "POLICY (FROM)",
            "GRPC/s",
            "IROH/s",
            "GRPC ERR",
            "IROH ERR",
            "FALLBACKS"
        );
        let now = Instant::now();
        for (i, (n, policy)) in nodes.iter().zip(&policies).enumerate() {
            let t = n.metrics.as_ref().map(traffic).unwrap_or_default();
            let rate = |k: usize| match &self.last[i] {
                Some((at, prev)) => {
                    let dt = now.saturating_duration_since(*at).as_secs_f64().max(0.001);
                    (t.calls[k] - prev.calls[k]) / dt
                }
                None => 0.0,
            };
            let (role, term, applied) = match &n.status {
                Some(s) => (
                    crate::cli::role_name(s.role).to_owned(),
                    s.term.to_string(),
                    s.applied_index.to_string(),
                ),
                None => ("unreachable".into(), "-".into(), "-".into()),
            };
            out.push_str(&format!(
                "{:<5} {:<9} {:<5} {:<8} {:<w$} {:>7.1} {:>7.1} {:>8} {:>8} {:>9}\n",
                n.id.map_or_else(|| format!("#{}", i + 1), |id| id.to_string()),
                role,
                term,
                applied,
                policy,
                rate(0),
                rate(1),
                whole(t.errors[0]),
                whole(t.errors[1]),
                whole(t.fallbacks)
            ));
            if n.metrics.is_some() {
                self.last[i] = Some((now, t));
            }
        }
        out.push('\n');
        out
    }

    /// The stage in force and its gates, judged on the figures since the
    /// demo first saw the stage (the leader judges its own window once
    /// the soak is over: these are what it will see).
    fn rollout_lines(&mut self, r: &pb::RolloutResponse, nodes: &[NodeView]) -> String {
        let Some(plan) = r.plan.as_ref() else {
            return String::new();
        };
        let mut out = format!(
            "rollout \"{}\": {}, {} decisions\n",
            plan.name, r.status, r.seq
        );
        let stage = r
            .stage
            .and_then(|s| plan.stages.get(s as usize).map(|st| (s, st)));
        let Some((s, st)) = stage else {
            out.push_str("  no stage in force: every node runs its pre-rollout policy\n\n");
            return out;
        };
        let soaked_ms = now_unix_ms().saturating_sub(r.stage_started_unix_ms);
        let covered: Vec<String> = r.covered.iter().map(ToString::to_string).collect();
        let share = if st.percent > 0 {
            format!("share {}%", st.percent)
        } else {
            "named nodes".to_owned()
        };
        out.push_str(&format!(
            "  stage {s} ({} of {}): {}\n  policy {}, {share} = node {}; soaked {} of {} s\n",
            s + 1,
            plan.stages.len(),
            st.name,
            st.policy.as_ref().map_or_else(|| "-".into(), short_policy),
            covered.join(", "),
            (soaked_ms / 1000).min(st.soak_secs),
            st.soak_secs
        ));
        out.push_str(&self.gate_lines(r, nodes, soaked_ms >= st.soak_secs * 1000));
        out
    }

    fn gate_lines(&mut self, r: &pb::RolloutResponse, nodes: &[NodeView], soaked: bool) -> String {
        let Some(gates) = r.plan.as_ref().and_then(|p| plan_from_pb(p).ok()) else {
            return String::new();
        };
        let now: BTreeMap<NodeId, Metrics> = nodes
            .iter()
            .filter_map(|n| Some((n.id?, n.metrics.clone()?)))
            .collect();
        let w = match self.window.take() {
            Some(w) if w.seq == r.seq => w,
            _ => Window {
                seq: r.seq,
                at: Instant::now(),
                before: now.clone(),
            },
        };
        let f = figures(&r.covered, &w.before, &now);
        let (_, checks) = evaluate(&gates.gates, &f);
        let mut out = format!(
            "  gates on the covered nodes' last {} s (the leader judges after the soak):\n",
            w.at.elapsed().as_secs()
        );
        for c in &checks {
            let state = match (soaked, c.ok) {
                (true, true) => "pass",
                (true, false) => "FAIL",
                (false, true) => "waiting, ok so far",
                (false, false) => "waiting, failing",
            };
            out.push_str(&format!("    {:<15} {:<19} {}\n", c.gate, state, c.detail));
        }
        out.push('\n');
        self.window = Some(w);
        out
    }
}

async fn read_node(conn: &Conn, file: &NodeFile) -> NodeView {
    let status = conn
        .call::<_, pb::NodeStatus>(methods::STATUS_GET, &pb::StatusRequest {})
        .await
        .ok();
    let metrics = match file.metrics {
        Some(addr) => scrape(addr).await.ok().map(|t| Metrics::parse(&t)),
        None => None,
    };
    NodeView {
        id: status.as_ref().map(|s| s.node_id),
        status,
        metrics,
    }
}

/// The rollout as the first node that answers reads it.
pub async fn rollout_of(conns: &[Conn]) -> Option<pb::RolloutResponse> {
    for c in conns {
        if let Ok(r) = crate::rollout_cli::get(c).await {
            return Some(r);
        }
    }
    None
}

fn calls_line(counts: &Counts) -> String {
    format!(
        "demo calls: grpc {} ok, {} failed; iroh {} ok, {} failed; failed calls so far: {}\n",
        counts.ok(0),
        counts.failed(0),
        counts.ok(1),
        counts.failed(1),
        counts.failed_total()
    )
}

async fn vm_line(conns: &[Conn], vm_id: &str) -> String {
    for c in conns {
        let got = c
            .call::<_, pb::VmRecord>(
                methods::VM_GET,
                &pb::GetVmRequest {
                    vm_id: vm_id.into(),
                },
            )
            .await;
        if let Ok(v) = got {
            return format!(
                "VM {} on node {}: desired {}, observed {}{}\n",
                v.id,
                v.node_id,
                state_name(v.desired),
                state_name(v.observed),
                if v.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", v.reason)
                }
            );
        }
    }
    String::new()
}

/// The newest decisions, the newest's gate checks under it.
pub fn decision_lines(r: &pb::RolloutResponse) -> String {
    let mut out = String::from("\ndecisions (newest last):\n");
    let skip = r.history.len().saturating_sub(DECISIONS_SHOWN);
    for d in &r.history[skip..] {
        out.push_str(&format!("  {}\n", crate::rollout_cli::decision_line(d)));
    }
    if let Some(d) = r.history.last() {
        for c in &d.checks {
            out.push_str(&format!(
                "      {} {}: {}\n",
                if c.ok { "ok  " } else { "FAIL" },
                c.gate,
                c.detail
            ));
        }
    }
    out
}
