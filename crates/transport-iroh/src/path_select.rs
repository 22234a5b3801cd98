//! Which of a connection's paths to a peer carries its traffic:
//! [`LivePathSelector`], iroh's rule (lowest round trip, IP before relay,
//! sticky) plus one thing it lacks: **a path that has gone silent is let
//! go.**
//!
//! Why: QUIC migrates only the side that dialled. When a node that
//! *accepted* a connection changes its address (an interface address is
//! replaced), the dialler's path to the old address is dead, but its
//! round-trip estimate stays as good as it was, because nothing updates it
//! without acknowledgements. iroh's own selector (1.4) keeps such a path
//! selected and closes, as redundant, the new path its hole punching opens
//! to the peer's new address (which the peer announced over the
//! connection), so calls hang until the whole connection times out.
//! Measured in `cargo xtask lab address-change`, part B: the new path was
//! opened and closed again at once, every hole-punch round (5 s apart),
//! until the connection's idle timeout.
//!
//! The rule: iroh asks for a selection on every path event (opened,
//! abandoned) and new connection. Between two such asks the selector
//! remembers each path's datagram counters; a path that **sent** in
//! between and **received nothing** is silent, and is not kept while
//! another path is not silent. A live path always receives in between:
//! acknowledgements of its data, answers to keep-alives (every few seconds,
//! [`crate::config::DEFAULT_KEEP_ALIVE`]). So the first path event after a
//! move marks the old path, and the next hole-punch round's new path is
//! selected; the connection, and the calls on it, go on there.
//!
//! Pure apart from the counters it keeps, which are bounded
//! ([`MAX_TRACKED_PATHS`]); the decision itself is [`choose`], tested with
//! plain values.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use iroh::endpoint::transports::{FourTuple, PathSelection, PathSelectionContext, PathSelector};

/// A same-tier path replaces the current one only if its round trip is at
/// least this much shorter (iroh's own stickiness, so paths do not flap).
pub const RTT_SWITCHING_MIN: Duration = Duration::from_millis(5);

/// Paths whose counters are remembered, over all peers; beyond it the
/// memory starts again (every path then counts as new once: never silent).
pub const MAX_TRACKED_PATHS: usize = 4096;

/// Preference class of a path: lower wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// A direct IP path.
    Ip,
    /// A custom transport.
    Custom,
    /// Through a relay: a backup.
    Relay,
}

/// One candidate path as [`choose`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its tier.
    pub tier: Tier,
    /// Its round-trip estimate.
    pub rtt: Duration,
    /// Sent since the last selection and received nothing.
    pub silent: bool,
    /// It is the path selected now.
    pub current: bool,
}

/// The index of the path to select among `paths`, if any: the current
/// path unless it is silent while another is not, or a better tier or a
/// clearly shorter round trip is available; else the best non-silent path
/// (or the best of all when every path is silent).
pub fn choose(paths: &[Candidate]) -> Option<usize> {
    let any_live = paths.iter().any(|p| !p.silent);
    let usable = |p: &Candidate| !p.silent || !any_live;
    let best = paths
        .iter()
        .enumerate()
        .filter(|(_, p)| usable(p))
        .min_by_key(|(_, p)| (p.tier, p.rtt))
        .map(|(i, _)| i)?;
    let Some(current) = paths.iter().position(|p| p.current && usable(p)) else {
        return Some(best);
    };
    let (c, b) = (paths[current], paths[best]);
    if b.tier < c.tier || (b.tier == c.tier && b.rtt + RTT_SWITCHING_MIN <= c.rtt) {
        Some(best)
    } else {
        Some(current)
    }
}

/// iroh's path selection with silent paths let go (see the module docs).
#[derive(Debug, Default)]
pub struct LivePathSelector {
    /// Per path: datagrams received and sent at the last selection.
    counters: Mutex<HashMap<FourTuple, (u64, u64)>>,
}

fn tier(path: &FourTuple) -> Tier {
    match path {
        FourTuple::Ip { .. } => Tier::Ip,
        FourTuple::Relay { .. } => Tier::Relay,
        FourTuple::Custom { .. } => Tier::Custom,
    }
}

impl PathSelector for LivePathSelector {
    fn select(&self, ctx: &PathSelectionContext<'_>) -> PathSelection {
        let mut counters = match self.counters.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if counters.len() > MAX_TRACKED_PATHS {
            counters.clear();
        }
        let current = ctx.current().cloned();
        let mut data = Vec::new();
        let mut candidates = Vec::new();
        for psd in ctx.paths() {
            let Some(stats) = psd.stats() else {
                continue;
            };
            let path = psd.network_path().clone();
            let (rx, tx) = (stats.udp_rx.datagrams, stats.udp_tx.datagrams);
            let silent = counters
                .insert(path.clone(), (rx, tx))
                .is_some_and(|(old_rx, old_tx)| tx > old_tx && rx == old_rx);
            if silent {
                tracing::debug!(%path, "iroh path sent but heard nothing since the last selection; not keeping it");
            }
            candidates.push(Candidate {
                tier: tier(&path),
                rtt: stats.rtt,
                silent,
                current: current.as_ref() == Some(&path),
            });
            data.push(psd);
        }
        let mut selection = PathSelection::none();
        if let Some(i) = choose(&candidates)
            && let Some(psd) = data.get(i)
        {
            selection.set(psd);
        }
        selection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(tier: Tier, rtt_ms: u64, silent: bool, current: bool) -> Candidate {
        Candidate {
            tier,
            rtt: Duration::from_millis(rtt_ms),
            silent,
            current,
        }
    }

    #[test]
    fn a_silent_current_path_gives_way_to_a_live_one() {
        // The old path still shows its good round trip.
        let paths = [c(Tier::Ip, 1, true, true), c(Tier::Ip, 3, false, false)];
        assert_eq!(choose(&paths), Some(1));
    }

    #[test]
    fn a_live_current_path_is_sticky() {
        let paths = [c(Tier::Ip, 4, false, true), c(Tier::Ip, 1, false, false)];
        assert_eq!(choose(&paths), Some(0));
        let paths = [c(Tier::Ip, 10, false, true), c(Tier::Ip, 1, false, false)];
        assert_eq!(choose(&paths), Some(1));
    }

    #[test]
    fn ip_beats_relay_and_everything_silent_keeps_the_best() {
        let paths = [c(Tier::Relay, 1, false, true), c(Tier::Ip, 30, false, false)];
        assert_eq!(choose(&paths), Some(1));
        let paths = [c(Tier::Ip, 2, true, true), c(Tier::Ip, 1, true, false)];
        assert_eq!(choose(&paths), Some(0));
        assert_eq!(choose(&[]), None);
        let paths = [c(Tier::Ip, 2, false, false)];
        assert_eq!(choose(&paths), Some(0));
    }
}
