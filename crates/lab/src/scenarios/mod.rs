//! The scenarios and their registry.
//!
//! A scenario is a module here with
//!
//! ```ignore
//! pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()>
//! ```
//!
//! that builds its topology through `ctx.lab`, reports through
//! `ctx.report` (a step line per step, figures, and a [`Report::check`] per
//! guarantee) and honours `ctx.opts.quick` (the CI variant: short, but it
//! still exercises and checks the guarantee). An `Err` ends the scenario
//! early and fails the run; a failed check fails the run at the end. The
//! caller cleans up the lab afterwards whatever happened, so a scenario
//! only needs to stop what it wants to see stop cleanly.
//!
//! Register a scenario in [`ALL`] with the [`scenario!`](crate::scenario)
//! macro; `ci: true` puts its `--quick` variant into `cargo xtask lab ci`.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use crate::netns::Lab;
use crate::report::Report;

pub mod address_change;
pub mod agents;
pub mod crash;
pub mod loss;
pub mod nat;
pub mod partition;
pub mod rollout;
pub mod smoke;
pub mod tap_churn;
pub mod udp_blocked;

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The `tern` binary.
    pub tern: PathBuf,
    /// The short (CI) variant.
    pub quick: bool,
    /// Name prefix of every namespace and interface.
    pub prefix: String,
}

/// What a scenario works with.
#[derive(Debug)]
pub struct Ctx {
    /// The topology and process owner (cleaned up by the caller).
    pub lab: Lab,
    /// Progress, figures and checks.
    pub report: Report,
    /// Options.
    pub opts: Opts,
}

/// The future a scenario's `run` returns, boxed for the registry.
pub type ScenarioFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// A registered scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name on the command line.
    pub name: &'static str,
    /// One line about what it checks.
    pub about: &'static str,
    /// Whether `cargo xtask lab ci` runs its `--quick` variant.
    pub ci: bool,
    /// Runs it.
    pub run: for<'a> fn(&'a mut Ctx) -> ScenarioFuture<'a>,
}

/// A [`Scenario`] for module `$module` of [`crate::scenarios`]:
/// `scenario!("name", module, ci, "about")`.
#[macro_export]
macro_rules! scenario {
    ($name:literal, $module:ident, $ci:expr, $about:literal) => {{
        fn run(ctx: &mut $crate::scenarios::Ctx) -> $crate::scenarios::ScenarioFuture<'_> {
            Box::pin($crate::scenarios::$module::run(ctx))
        }
        $crate::scenarios::Scenario {
            name: $name,
            about: $about,
            ci: $ci,
            run,
        }
    }};
}

/// Every scenario, in the order `tern-lab list` shows them.
pub const ALL: &[Scenario] = &[
    scenario!(
        "agents",
        agents,
        // About 66 s (8 agents) on the shared 2-core machine, 43 s of
        // them the rollout drill.
        true,
        "3 servers and 20 agents (8 with --quick) run process VMs: agents SIGKILLed and restarted, the leader SIGKILLed, agents cut off from the servers by nftables, then tern rollout across servers and agents to iroh and back, and UDP blocked on an agent rolls a stage back; every VM runs exactly once after each"
    ),
    scenario!(
        "crash",
        crash,
        true,
        "the leader SIGKILLed again and again under register writes: failover p50/p99; every acknowledged write read back from every node"
    ),
    scenario!(
        "nat",
        nat,
        true,
        "home-router and symmetric NAT behind a private iroh relay: connected %, direct %, time to direct; tern nodes cluster through the NATs"
    ),
    scenario!(
        "partition",
        partition,
        false,
        "the leader cut off by nftables: the majority elects and commits, the old leader catches up; every client call recorded and the history checked with stateright's LinearizabilityTester"
    ),
    scenario!(
        "rollout",
        rollout,
        // The quick variant (12 s soaks, both runs): about 2 min 10 s on
        // the shared 2-core machine with other builds running.
        true,
        "8 nodes run `tern rollout` (the default plan, soaks compressed) under load, the leader's gates and the lab's criteria at each stage, rollback --all; then UDP blocked on a canary of stage 2: the cluster rolls the stage back by itself, naming the gate and the node"
    ),
    scenario!(
        "smoke",
        smoke,
        false,
        "a 3-node dual cluster forms in namespaces and answers over gRPC and iroh"
    ),
    scenario!(
        "udp-blocked",
        udp_blocked,
        true,
        "UDP dropped between dual-mode nodes: zero failed calls, fallbacks counted, iroh resumes"
    ),
    scenario!(
        "tap-churn",
        tap_churn,
        // iroh's rebind after a device change still fails now and then
        // (EADDRINUSE while a forked child holds the socket); Tern now
        // rebuilds the dead endpoint within milliseconds of it closing
        // (transport-iroh's supervisor), and the report counts the
        // rebuilds. About 1.5 min of CI's lab set.
        true,
        "VMs created/deleted and TAP/veth devices churned on every node under iroh traffic: zero failed calls, no leader change, every iroh endpoint keeps serving"
    ),
    scenario!(
        "loss",
        loss,
        false,
        "5% loss on every link: p50/p99 over iroh vs gRPC, no failed call, the cluster keeps committing"
    ),
    scenario!(
        "address-change",
        address_change,
        true,
        "a client's and a node's IP address change while connected: iroh calls go on both ways (migration; a moved node is recorded anew and its peers follow it); gRPC needs a restart"
    ),
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    ALL.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_lower_case() {
        let mut names: Vec<&str> = ALL.iter().map(|s| s.name).collect();
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        );
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "duplicate scenario name");
        assert!(find("smoke").is_some());
        assert!(find("nope").is_none());
    }
}
