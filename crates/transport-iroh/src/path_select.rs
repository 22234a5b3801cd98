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
//! The rule: the client samples the paths of every connection it dialled
//! ([`LIVENESS_TICK`]) and notes when each last received a datagram
//! ([`Liveness`]). iroh asks for a selection on every path event (a path
//! opened or abandoned) and new connection; the path in use is **silent**
//! if it has heard nothing for [`SILENT_AFTER`], and it is not kept while
//! another path exists (one iroh has just validated, or a relay path). A
//! path with calls on it hears acknowledgements all the time. So when the
//! peer moved and iroh's hole punching opens a path to its new address (the
//! peer announced it over the connection), that path is selected; the
//! connection, and the calls on it, go on there.
//!
//! The decision itself is [`choose`], pure and tested with plain values;
//! the liveness memory is bounded ([`MAX_TRACKED_PATHS`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::endpoint::transports::{FourTuple, PathSelection, PathSelectionContext, PathSelector};

/// A same-tier path replaces the current one only if its round trip is at
/// least this much shorter (iroh's own stickiness, so paths do not flap).
pub const RTT_SWITCHING_MIN: Duration = Duration::from_millis(5);

/// The path in use is silent when it has heard nothing for this long.
/// Shorter than the keep-alive ([`crate::config::DEFAULT_KEEP_ALIVE`]),
/// so an idle live path may count as silent: it is then let go only for
/// another path, one iroh has just validated, which costs nothing.
pub const SILENT_AFTER: Duration = Duration::from_secs(2);

/// How often the client samples its connections' paths for [`Liveness`].
pub const LIVENESS_TICK: Duration = Duration::from_millis(500);

/// Paths whose liveness is remembered, over all peers; beyond it new
/// paths are not sampled (and so never count as silent).
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

/// When each path of the connections this node dialled last heard from
/// its peer: sampled by the client ([`crate::client`]) every
/// [`LIVENESS_TICK`], read by [`LivePathSelector`]. Keyed by the path's
/// remote address; entries leave with their connection.
#[derive(Debug, Default)]
pub struct Liveness {
    paths: Mutex<HashMap<SocketAddr, (u64, Instant)>>,
}

impl Liveness {
    /// Records that the path to `remote` has received `rx` datagrams so
    /// far, seen at `now`.
    pub fn observe(&self, remote: SocketAddr, rx: u64, now: Instant) {
        let mut paths = match self.paths.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        if paths.len() >= MAX_TRACKED_PATHS && !paths.contains_key(&remote) {
            return;
        }
        let entry = paths.entry(remote).or_insert((rx, now));
        if entry.0 != rx {
            *entry = (rx, now);
        }
    }

    /// Forgets the paths to `remotes` (their connection closed).
    pub fn forget(&self, remotes: &[SocketAddr]) {
        if let Ok(mut paths) = self.paths.lock() {
            for r in remotes {
                paths.remove(r);
            }
        }
    }

    /// How long the path to `remote` has heard nothing, if it is sampled.
    pub fn silent_for(&self, remote: &SocketAddr, now: Instant) -> Option<Duration> {
        let paths = self.paths.lock().ok()?;
        paths
            .get(remote)
            .map(|(_, at)| now.saturating_duration_since(*at))
    }
}

/// iroh's path selection with silent paths let go (see the module docs).
#[derive(Debug)]
pub struct LivePathSelector {
    liveness: Arc<Liveness>,
}

impl LivePathSelector {
    /// A selector reading `liveness`.
    pub fn new(liveness: Arc<Liveness>) -> Self {
        LivePathSelector { liveness }
    }
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
        let now = Instant::now();
        let current = ctx.current().cloned();
        let mut data = Vec::new();
        let mut candidates = Vec::new();
        for psd in ctx.paths() {
            let Some(stats) = psd.stats() else {
                continue;
            };
            let path = psd.network_path().clone();
            let is_current = current.as_ref() == Some(&path);
            // Only the current path is let go for silence: another is new
            // (iroh validated it just now) or about to be closed.
            let silent = is_current
                && match &path {
                    FourTuple::Ip { remote, .. } => self
                        .liveness
                        .silent_for(remote, now)
                        .is_some_and(|d| d >= SILENT_AFTER),
                    _ => false,
                };
            if silent {
                tracing::info!(%path, "the iroh path in use has heard nothing for a while; moving to another");
            }
            candidates.push(Candidate {
                tier: tier(&path),
                rtt: stats.rtt,
                silent,
                current: is_current,
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
        let paths = [
            c(Tier::Relay, 1, false, true),
            c(Tier::Ip, 30, false, false),
        ];
        assert_eq!(choose(&paths), Some(1));
        let paths = [c(Tier::Ip, 2, true, true), c(Tier::Ip, 1, true, false)];
        assert_eq!(choose(&paths), Some(0));
        assert_eq!(choose(&[]), None);
        let paths = [c(Tier::Ip, 2, false, false)];
        assert_eq!(choose(&paths), Some(0));
    }
}

#[cfg(test)]
mod liveness_tests {
    use super::*;

    #[test]
    fn liveness_notes_when_a_path_last_heard() {
        let l = Liveness::default();
        let a: SocketAddr = "10.0.0.1:7401".parse().unwrap();
        let t0 = Instant::now();
        l.observe(a, 5, t0);
        l.observe(a, 5, t0 + Duration::from_secs(1));
        assert_eq!(
            l.silent_for(&a, t0 + Duration::from_secs(3)),
            Some(Duration::from_secs(3))
        );
        l.observe(a, 6, t0 + Duration::from_secs(3));
        assert_eq!(
            l.silent_for(&a, t0 + Duration::from_secs(3)),
            Some(Duration::ZERO)
        );
        l.forget(&[a]);
        assert_eq!(l.silent_for(&a, t0), None);
    }
}
