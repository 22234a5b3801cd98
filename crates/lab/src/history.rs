//! Client histories of the lab's register workload, and their checks.
//!
//! Every client records its **whole** history: each invocation (a write of a
//! unique value or a read of one key) with the time it was made, and how it
//! ended: acknowledged (with the value read), definitely not applied, or
//! unknown ("may have happened": a timeout or a transport error after the
//! request may have arrived).
//!
//! [`check`] splits the history by key (linearizability is local: a history
//! is linearizable exactly when each object's sub-history is) and feeds each
//! key's events, in real-time order, to `stateright`'s
//! [`LinearizabilityTester`] over a [`Register`]. An unknown operation is
//! invoked and never returned, which the tester treats as may-have-happened
//! (it may be placed anywhere after its invocation, or nowhere). As the
//! tester allows one operation in flight per thread, a client whose call
//! ended unknown continues under a fresh process id, as in Jepsen.
//!
//! [`lost_writes`] is the plainer check the scenarios also report: after
//! the workload, the value every node reads must not be older than an
//! acknowledged write.
//!
//! Everything here is pure (times come in as values), so it is unit-tested
//! without a cluster.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stateright::semantics::register::{Register, RegisterOp, RegisterRet};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester};

/// A value written to a register. Every write in one history writes a
/// distinct value, so a read names the write it saw.
pub type Value = u64;

/// An operation on one key's register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write this value.
    Write(Value),
    /// Read the current value.
    Read,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The write was acknowledged.
    Written,
    /// The read answered this value (`None`: the key was never written).
    Read(Option<Value>),
    /// The operation definitely took no effect (a refused write, or any
    /// failed read); it is left out of the check.
    Failed(String),
    /// The operation may or may not have taken effect (a timeout, a
    /// transport error after the request may have arrived).
    Unknown(String),
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The logical process (the tester's thread): a client gets a fresh
    /// one after each unknown outcome.
    pub process: u64,
    /// The client that made the call (for the report).
    pub client: String,
    /// The register's key.
    pub key: String,
    /// What was invoked.
    pub op: Op,
    /// When it was invoked (since the history began).
    pub invoked: Duration,
    /// When it ended (since the history began).
    pub returned: Duration,
    /// How it ended.
    pub outcome: Outcome,
}

impl Entry {
    /// Whether the write was acknowledged.
    pub fn is_acked_write(&self) -> bool {
        matches!(self.op, Op::Write(_)) && self.outcome == Outcome::Written
    }
}

/// A history shared by every client of a scenario.
#[derive(Debug)]
pub struct History {
    start: Instant,
    next_process: AtomicU64,
    entries: Mutex<Vec<Entry>>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> History {
        History {
            start: Instant::now(),
            next_process: AtomicU64::new(0),
            entries: Mutex::new(Vec::new()),
        }
    }

    /// A recorder for one client.
    pub fn client(self: &Arc<Self>, name: impl Into<String>) -> ClientLog {
        ClientLog {
            history: self.clone(),
            name: name.into(),
            process: self.next_process.fetch_add(1, Ordering::SeqCst),
        }
    }

    /// Time since the history began.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// A copy of every entry recorded so far.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        // A poisoned lock only means a client panicked mid-push; the entries
        // already pushed are whole.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One client's recorder: stamps invocations and outcomes.
#[derive(Debug)]
pub struct ClientLog {
    history: Arc<History>,
    name: String,
    process: u64,
}

/// An invocation that has not ended yet.
#[derive(Debug, Clone)]
#[must_use = "record how the call ended with ClientLog::end"]
pub struct Invocation {
    key: String,
    op: Op,
    invoked: Duration,
}

impl ClientLog {
    /// Stamps the invocation of `op` on `key`; call right before the call.
    pub fn invoke(&self, key: &str, op: Op) -> Invocation {
        Invocation {
            key: key.to_owned(),
            op,
            invoked: self.history.now(),
        }
    }

    /// Records how the invocation ended; call right after the call.
    /// After an unknown outcome the client continues as a new process.
    pub fn end(&mut self, inv: Invocation, outcome: Outcome) {
        let returned = self.history.now();
        let unknown = matches!(outcome, Outcome::Unknown(_));
        self.history.lock().push(Entry {
            process: self.process,
            client: self.name.clone(),
            key: inv.key,
            op: inv.op,
            invoked: inv.invoked,
            returned,
            outcome,
        });
        if unknown {
            self.process = self.history.next_process.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Counts of one key's history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Acknowledged writes.
    pub writes_acked: usize,
    /// Acknowledged reads.
    pub reads_ok: usize,
    /// Operations that ended unknown (kept as may-have-happened).
    pub unknown: usize,
    /// Operations that definitely took no effect (left out).
    pub failed: usize,
}

/// The linearizability verdict for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The tester found a linearization.
    Linearizable,
    /// The tester proved there is none.
    NotLinearizable,
    /// The tester did not finish within the budget (the history is too
    /// long or too concurrent): neither proved nor refuted.
    GaveUp,
    /// The history itself was malformed (a process with two operations in
    /// flight): a bug in the recorder.
    Invalid(String),
}

/// The result of checking one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReport {
    /// The key.
    pub key: String,
    /// What its history holds.
    pub counts: Counts,
    /// The tester's verdict.
    pub verdict: Verdict,
    /// How long the tester ran.
    pub took: Duration,
}

impl KeyReport {
    /// Whether the key's history passed.
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Linearizable
    }
}

type Tester = LinearizabilityTester<u64, Register<Option<Value>>>;

/// Builds the tester for one key's entries (events in real-time order).
fn tester_for(entries: &[&Entry]) -> Result<Tester, String> {
    // (time, 0 = invoke / 1 = return, index): on a tie the invocation goes
    // first, the weaker ordering, so a tie never makes a history fail.
    let mut events: Vec<(Duration, u8, usize)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match e.outcome {
            Outcome::Failed(_) => {}
            Outcome::Unknown(_) => events.push((e.invoked, 0, i)),
            Outcome::Written | Outcome::Read(_) => {
                events.push((e.invoked, 0, i));
                events.push((e.returned, 1, i));
            }
        }
    }
    events.sort_unstable();
    let mut t = Tester::new(Register(None));
    for (_, kind, i) in events {
        let e = entries[i];
        if kind == 0 {
            let op = match e.op {
                Op::Write(v) => RegisterOp::Write(Some(v)),
                Op::Read => RegisterOp::Read,
            };
            t.on_invoke(e.process, op)?;
        } else {
            let ret = match (&e.op, &e.outcome) {
                (Op::Read, Outcome::Read(v)) => RegisterRet::ReadOk(*v),
                (Op::Write(_), Outcome::Written) => RegisterRet::WriteOk,
                (op, outcome) => {
                    return Err(format!(
                        "{op:?} on {:?} by {} ended {outcome:?}, which does not fit the operation",
                        e.key, e.client
                    ));
                }
            };
            t.on_return(e.process, ret)?;
        }
    }
    Ok(t)
}

fn counts(entries: &[&Entry]) -> Counts {
    let mut c = Counts::default();
    for e in entries {
        match (&e.op, &e.outcome) {
            (Op::Write(_), Outcome::Written) => c.writes_acked += 1,
            (_, Outcome::Read(_)) => c.reads_ok += 1,
            (_, Outcome::Unknown(_)) => c.unknown += 1,
            (_, Outcome::Failed(_)) => c.failed += 1,
            (Op::Read, Outcome::Written) => c.failed += 1,
        }
    }
    c
}

/// The stack of a checker thread: the tester recurses once per operation.
const CHECKER_STACK: usize = 256 * 1024 * 1024;

/// Checks every key's history for linearizability, each key on its own
/// thread, waiting at most `budget` for each. A key whose check does not
/// finish in time is reported [`Verdict::GaveUp`] (its thread is left to
/// finish on its own; it holds no resources but CPU).
pub fn check(entries: &[Entry], budget: Duration) -> Vec<KeyReport> {
    let mut by_key: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        by_key.entry(e.key.as_str()).or_default().push(e);
    }
    let mut pending = Vec::new();
    for (key, es) in by_key {
        let c = counts(&es);
        let built = tester_for(&es);
        let (tx, rx) = std::sync::mpsc::channel();
        let started = Instant::now();
        match built {
            Err(e) => {
                let _ = tx.send(Verdict::Invalid(e));
            }
            Ok(t) => {
                let spawned = std::thread::Builder::new()
                    .name(format!("lin-{key}"))
                    .stack_size(CHECKER_STACK)
                    .spawn(move || {
                        let v = if t.is_consistent() {
                            Verdict::Linearizable
                        } else {
                            Verdict::NotLinearizable
                        };
                        let _ = tx.send(v);
                    });
                if let Err(e) = spawned {
                    let (tx, r) = std::sync::mpsc::channel();
                    let _ = tx.send(Verdict::Invalid(format!(
                        "cannot start a checker thread: {e}"
                    )));
                    pending.push((key.to_owned(), c, r, started));
                    continue;
                }
            }
        }
        pending.push((key.to_owned(), c, rx, started));
    }
    let deadline = Instant::now() + budget;
    pending
        .into_iter()
        .map(|(key, counts, rx, started)| {
            let left = deadline.saturating_duration_since(Instant::now());
            let verdict = rx.recv_timeout(left).unwrap_or(Verdict::GaveUp);
            KeyReport {
                key,
                counts,
                verdict,
                took: started.elapsed(),
            }
        })
        .collect()
}

/// An acknowledged write that a final read shows lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// The key.
    pub key: String,
    /// What the final read saw.
    pub seen: Option<Value>,
    /// The acknowledged write it should not be older than.
    pub acked: Value,
    /// Why.
    pub why: String,
}

/// Checks a final read of `key` (made after every client stopped) against
/// the acknowledged writes in `entries`: the value seen must come from a
/// write of this key, and no acknowledged write may have begun after that
/// write had ended (it would have overwritten it); `None` is allowed only
/// when no write was acknowledged.
pub fn lost_writes(entries: &[Entry], key: &str, seen: Option<Value>) -> Vec<Lost> {
    let writes: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.key == key && matches!(e.op, Op::Write(_)))
        .collect();
    let acked: Vec<&Entry> = writes
        .iter()
        .copied()
        .filter(|e| e.is_acked_write())
        .collect();
    let value = |e: &Entry| match e.op {
        Op::Write(v) => v,
        Op::Read => 0,
    };
    let mut lost = Vec::new();
    let Some(v) = seen else {
        for w in acked {
            lost.push(Lost {
                key: key.to_owned(),
                seen,
                acked: value(w),
                why: "the key reads empty after an acknowledged write".to_owned(),
            });
        }
        return lost;
    };
    let Some(source) = writes.iter().find(|e| e.op == Op::Write(v)) else {
        lost.push(Lost {
            key: key.to_owned(),
            seen,
            acked: 0,
            why: format!("{v} was never written to {key:?}"),
        });
        return lost;
    };
    // A write that never ended (or definitely failed) has no end in time:
    // nothing began strictly after it.
    let source_end = match source.outcome {
        Outcome::Written => Some(source.returned),
        _ => None,
    };
    if matches!(source.outcome, Outcome::Failed(_)) {
        lost.push(Lost {
            key: key.to_owned(),
            seen,
            acked: 0,
            why: format!("{v} was written by a write recorded as refused"),
        });
    }
    if let Some(end) = source_end {
        for w in acked {
            if w.invoked > end {
                lost.push(Lost {
                    key: key.to_owned(),
                    seen,
                    acked: value(w),
                    why: format!(
                        "the write of {} began at {:?}, after the write of {v} had ended at {end:?}, and was acknowledged",
                        value(w),
                        w.invoked
                    ),
                });
            }
        }
    }
    lost
}

/// A copy of `entries` with one read made stale, for checking the
/// checker on real data: a read `R` of a key for which two acknowledged
/// writes `W1`, `W2` exist with `W1` ended before `W2` began and `W2`
/// ended before `R` began now answers `W1`'s value, which no
/// linearization allows (values are unique, so nothing else wrote it).
/// Returns the key and the copy, or `None` when the history has no such
/// read. The entries must be in recording order (as [`History::entries`]
/// returns them).
pub fn stale_copy(entries: &[Entry]) -> Option<(String, Vec<Entry>)> {
    let acked: Vec<&Entry> = entries.iter().filter(|e| e.is_acked_write()).collect();
    // The earliest such read: the tester refutes by trying every
    // interleaving before the violation, so an early one is refuted fast.
    let (r, w1) = entries.iter().enumerate().find_map(|(i, r)| {
        if !matches!(r.outcome, Outcome::Read(_)) {
            return None;
        }
        acked.iter().find_map(|w2| {
            if w2.key != r.key || w2.returned >= r.invoked {
                return None;
            }
            acked
                .iter()
                .find(|w1| w1.key == r.key && w1.returned < w2.invoked)
                .and_then(|w1| match w1.op {
                    Op::Write(v) => Some((i, v)),
                    Op::Read => None,
                })
        })
    })?;
    let mut copy = entries.to_vec();
    copy[r].outcome = Outcome::Read(Some(w1));
    Some((copy[r].key.clone(), copy))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn e(process: u64, key: &str, op: Op, t: (u64, u64), outcome: Outcome) -> Entry {
        Entry {
            process,
            client: format!("c{process}"),
            key: key.to_owned(),
            op,
            invoked: ms(t.0),
            returned: ms(t.1),
            outcome,
        }
    }

    fn verdicts(h: &[Entry]) -> Vec<Verdict> {
        check(h, Duration::from_secs(30))
            .into_iter()
            .map(|r| r.verdict)
            .collect()
    }

    #[test]
    fn a_linearizable_history_passes() {
        let h = vec![
            e(0, "a", Op::Read, (0, 1), Outcome::Read(None)),
            e(0, "a", Op::Write(1), (2, 10), Outcome::Written),
            // Concurrent with the write: may see either value.
            e(1, "a", Op::Read, (3, 4), Outcome::Read(None)),
            e(1, "a", Op::Read, (5, 12), Outcome::Read(Some(1))),
            e(1, "a", Op::Write(2), (13, 20), Outcome::Written),
            e(0, "a", Op::Read, (21, 22), Outcome::Read(Some(2))),
            // Another key, independent.
            e(2, "b", Op::Write(3), (0, 5), Outcome::Written),
            e(2, "b", Op::Read, (6, 7), Outcome::Read(Some(3))),
        ];
        assert_eq!(
            verdicts(&h),
            vec![Verdict::Linearizable, Verdict::Linearizable]
        );
    }

    #[test]
    fn a_stale_read_fails() {
        // The write of 2 ended before the read began, yet the read saw 1.
        let h = vec![
            e(0, "a", Op::Write(1), (0, 1), Outcome::Written),
            e(0, "a", Op::Write(2), (2, 3), Outcome::Written),
            e(1, "a", Op::Read, (4, 5), Outcome::Read(Some(1))),
        ];
        assert_eq!(verdicts(&h), vec![Verdict::NotLinearizable]);
    }

    #[test]
    fn reads_going_back_in_time_fail() {
        let h = vec![
            e(0, "a", Op::Write(1), (0, 1), Outcome::Written),
            e(0, "a", Op::Write(2), (2, 30), Outcome::Written),
            e(1, "a", Op::Read, (3, 4), Outcome::Read(Some(2))),
            e(2, "a", Op::Read, (5, 6), Outcome::Read(Some(1))),
        ];
        assert_eq!(verdicts(&h), vec![Verdict::NotLinearizable]);
    }

    #[test]
    fn a_timed_out_write_may_have_happened_or_not() {
        let timeout = || Outcome::Unknown("deadline exceeded".to_owned());
        let base = vec![
            e(0, "a", Op::Write(1), (0, 1), Outcome::Written),
            e(1, "a", Op::Write(2), (2, 100), timeout()),
        ];
        // Seen later...
        let mut seen = base.clone();
        seen.push(e(2, "a", Op::Read, (200, 201), Outcome::Read(Some(2))));
        assert_eq!(verdicts(&seen), vec![Verdict::Linearizable]);
        // ...or never.
        let mut unseen = base.clone();
        unseen.push(e(2, "a", Op::Read, (200, 201), Outcome::Read(Some(1))));
        assert_eq!(verdicts(&unseen), vec![Verdict::Linearizable]);
        // But not seen and then un-seen.
        let mut flicker = seen.clone();
        flicker.push(e(2, "a", Op::Read, (202, 203), Outcome::Read(Some(1))));
        assert_eq!(verdicts(&flicker), vec![Verdict::NotLinearizable]);
        // And never before it was invoked.
        let early = vec![
            e(0, "a", Op::Read, (0, 1), Outcome::Read(Some(2))),
            e(1, "a", Op::Write(2), (2, 100), timeout()),
        ];
        assert_eq!(verdicts(&early), vec![Verdict::NotLinearizable]);
    }

    #[test]
    fn failed_operations_are_left_out() {
        let h = vec![
            e(0, "a", Op::Write(1), (0, 1), Outcome::Written),
            e(
                1,
                "a",
                Op::Read,
                (2, 3),
                Outcome::Failed("no leader".into()),
            ),
            e(1, "a", Op::Read, (4, 5), Outcome::Read(Some(1))),
        ];
        let r = check(&h, Duration::from_secs(30));
        assert_eq!(r[0].verdict, Verdict::Linearizable);
        assert_eq!(
            r[0].counts,
            Counts {
                writes_acked: 1,
                reads_ok: 1,
                unknown: 0,
                failed: 1
            }
        );
    }

    #[test]
    fn the_recorder_gives_a_client_a_new_process_after_an_unknown_outcome() {
        let h = Arc::new(History::new());
        let mut c = h.client("c0");
        let other = h.client("c1");
        let i = c.invoke("a", Op::Write(1));
        c.end(i, Outcome::Unknown("timeout".into()));
        let i = c.invoke("a", Op::Read);
        c.end(i, Outcome::Read(Some(1)));
        let i = other.invoke("a", Op::Read);
        let mut other = other;
        other.end(i, Outcome::Read(Some(1)));
        let es = h.entries();
        assert_eq!(es.len(), 3);
        assert_ne!(es[0].process, es[1].process);
        assert_ne!(es[1].process, es[2].process);
        assert!(es.iter().all(|e| e.invoked <= e.returned));
        // Two operations in flight on one process would be rejected; the
        // recorder's history is accepted.
        assert_eq!(verdicts(&es), vec![Verdict::Linearizable]);
    }

    #[test]
    fn a_long_sequential_history_checks_quickly() {
        let mut h = Vec::new();
        let mut t = 0;
        for v in 1..=400u64 {
            let p = v % 4;
            h.push(e(p, "a", Op::Write(v), (t, t + 1), Outcome::Written));
            h.push(e(p, "a", Op::Read, (t + 2, t + 3), Outcome::Read(Some(v))));
            t += 4;
        }
        assert_eq!(verdicts(&h), vec![Verdict::Linearizable]);
    }

    #[test]
    fn a_stale_copy_of_a_good_history_fails() {
        let h = vec![
            e(0, "a", Op::Write(1), (0, 1), Outcome::Written),
            e(0, "a", Op::Write(2), (2, 3), Outcome::Written),
            e(1, "a", Op::Read, (4, 5), Outcome::Read(Some(2))),
            e(1, "b", Op::Read, (6, 7), Outcome::Read(None)),
        ];
        assert_eq!(verdicts(&h), vec![Verdict::Linearizable; 2]);
        let (key, copy) = stale_copy(&h).unwrap();
        assert_eq!(key, "a");
        assert_eq!(copy[2].outcome, Outcome::Read(Some(1)));
        assert_eq!(
            verdicts(&copy),
            vec![Verdict::NotLinearizable, Verdict::Linearizable]
        );
        // Nothing to make stale.
        assert!(stale_copy(&h[..2]).is_none());
    }

    #[test]
    fn lost_writes_are_found() {
        let h = vec![
            e(0, "a", Op::Write(1), (0, 1), Outcome::Written),
            e(0, "a", Op::Write(2), (2, 3), Outcome::Written),
            e(1, "a", Op::Write(3), (4, 50), Outcome::Unknown("t".into())),
        ];
        assert!(lost_writes(&h, "a", Some(2)).is_empty());
        assert!(
            lost_writes(&h, "a", Some(3)).is_empty(),
            "may have happened"
        );
        let lost = lost_writes(&h, "a", Some(1));
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].acked, 2);
        assert_eq!(lost_writes(&h, "a", None).len(), 2);
        assert_eq!(lost_writes(&h, "a", Some(9)).len(), 1);
        assert!(lost_writes(&h, "b", None).is_empty());
    }
}
