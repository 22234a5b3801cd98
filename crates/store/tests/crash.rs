//! Crash test: a child process appends and acknowledges log entries, purges
//! the log and builds snapshots in a loop, and is killed with SIGKILL at a
//! seeded random point. The store is reopened after every kill: every entry
//! the child acknowledged must be there, unchanged, the last snapshot it
//! acknowledged must load, and the store must take new writes. Twenty
//! rounds share one data directory, so each round also recovers from the
//! previous rounds' crashes.
//!
//! The child is this test binary re-executed with [`CHILD_ENV`] naming the
//! data directory; it runs only the ignored `crash_child` test.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use futures::stream;
use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_state::{Command, VmRecord, VmSpec};
use tern_store::{Entry, TypeConfig};

/// Environment variable that turns the `crash_child` test into the child.
const CHILD_ENV: &str = "TERN_STORE_CRASH_CHILD_DIR";
/// Kill rounds in a normal test run.
const ROUNDS: usize = 20;
/// Seed of the kill points in a normal test run.
const SEED: u64 = 0x7e4e_c4a5;
/// Overrides [`ROUNDS`], for a longer campaign hunting sled recovery bugs.
const ROUNDS_ENV: &str = "TERN_STORE_CRASH_ROUNDS";
/// Overrides [`SEED`], to explore other kill schedules.
const SEED_ENV: &str = "TERN_STORE_CRASH_SEED";
/// A round kills the child after between 1 and this many acknowledgements.
const MAX_ACKS_BEFORE_KILL: u32 = 120;
/// Upper bound of the extra delay before the kill, so it lands at varied
/// points inside the child's next write rather than right after a flush.
const MAX_KILL_DELAY_MICROS: u64 = 3_000;
/// The child purges the log every this many entries...
const PURGE_EVERY: u64 = 64;
/// ...keeping this many entries behind the purge point.
const PURGE_KEEP: u64 = 16;
/// The child builds a snapshot every this many entries.
const SNAPSHOT_EVERY: u64 = 40;
/// Every this many entries is a large one...
const LARGE_EVERY: u64 = 11;
/// ...of this many bytes: over a quarter of sled's 512 KiB segment, so sled
/// stores it as a separate blob file, a second write path to crash in.
const LARGE_ENTRY_BYTES: usize = 160 * 1024;

fn entry(index: u64) -> Entry {
    let mut command = vec!["sleep".to_owned(), index.to_string()];
    if index.is_multiple_of(LARGE_EVERY) {
        command.push("x".repeat(LARGE_ENTRY_BYTES));
    }
    let cmd = Command::PutVm {
        request_id: format!("req-{index}"),
        vm: Box::new(VmRecord {
            id: format!("vm-{}", index % 50),
            spec: VmSpec {
                name: format!("vm-{}", index % 50),
                vcpus: 1,
                memory_mib: 128,
                runtime: "process".into(),
                command,
                ..VmSpec::default()
            },
            node_id: 1,
            ..VmRecord::default()
        }),
    };
    Entry::new_normal(openraft::testing::log_id::<TypeConfig>(1, 1, index), cmd)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Tells the parent one fact, one line. If the parent is gone, so is the
/// point of going on.
fn say(out: &mut impl Write, line: &str) {
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(1);
    }
}

/// The child: writes until killed. Ignored in normal runs; the parent runs
/// it with `--ignored`.
#[test]
#[ignore = "the crash test's child process; run by acknowledged_writes_survive_sigkill"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    runtime().block_on(async move {
        let (mut log, mut sm) = tern_store::open(Path::new(&dir)).expect("open");
        let state = log.get_log_state().await.expect("log state");
        let mut next = state.last_log_id.map_or(1, |id| id.index + 1);
        // The state machine starts from its snapshot; apply what it misses.
        let applied = sm.applied_state().await.expect("applied").0;
        let from = applied
            .map_or(1, |id| id.index + 1)
            .max(state.last_purged_log_id.map_or(1, |id| id.index + 1));
        let missed = log
            .get_log_reader()
            .await
            .try_get_log_entries(from..next)
            .await
            .expect("read");
        sm.apply(stream::iter(missed.into_iter().map(|e| Ok((e, None)))))
            .await
            .expect("apply");
        let mut out = std::io::stdout().lock();
        // libtest has printed "test crash_child ... " without a newline.
        say(&mut out, "");
        loop {
            let e = entry(next);
            log.blocking_append([e.clone()]).await.expect("append");
            say(&mut out, &format!("ACK {next}"));
            sm.apply(stream::iter([Ok((e, None))]))
                .await
                .expect("apply");
            if next.is_multiple_of(PURGE_EVERY) {
                let upto = next - PURGE_KEEP;
                // Snapshot first: a purged entry must be in a snapshot.
                let snap = sm.build_snapshot().await.expect("snapshot");
                let covered = snap.meta.last_log_id.map_or(0, |id| id.index);
                say(&mut out, &format!("SNAP {covered}"));
                log.purge(openraft::testing::log_id::<TypeConfig>(1, 1, upto))
                    .await
                    .expect("purge");
                say(&mut out, &format!("PURGED {upto}"));
            } else if next.is_multiple_of(SNAPSHOT_EVERY) {
                let snap = sm.build_snapshot().await.expect("snapshot");
                let covered = snap.meta.last_log_id.map_or(0, |id| id.index);
                say(&mut out, &format!("SNAP {covered}"));
            }
            next += 1;
        }
    });
}

#[derive(Debug, Default)]
struct Acked {
    last_entry: u64,
    purged: u64,
    snapshot: u64,
}

fn run_child_until_kill(dir: &Path, kill_after: u32, delay: Duration, acked: &mut Acked) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Process::new(exe)
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut acks = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("child output");
        let mut words = line.split_whitespace().rev();
        let (Some(n), Some(what)) = (
            words.next().and_then(|n| n.parse::<u64>().ok()),
            words.next(),
        ) else {
            continue;
        };
        match what {
            "ACK" => {
                assert_eq!(n, acked.last_entry + 1, "the child acknowledges in order");
                acked.last_entry = n;
                acks += 1;
            }
            "PURGED" => acked.purged = n,
            "SNAP" => acked.snapshot = n,
            _ => continue,
        }
        if acks >= kill_after {
            std::thread::sleep(delay);
            child.kill().expect("SIGKILL the child");
            break;
        }
    }
    let status = child.wait().expect("reap child");
    assert!(
        acks >= kill_after,
        "the child stopped on its own after {acks} acknowledgements: {status}"
    );
}

fn check_and_extend(dir: &Path, acked: &mut Acked, round: usize) {
    runtime().block_on(async {
        let (mut log, mut sm) = tern_store::open(dir)
            .unwrap_or_else(|e| panic!("round {round}: reopening after SIGKILL failed: {e}"));
        let state = log.get_log_state().await.expect("log state");
        let last = state.last_log_id.map_or(0, |id| id.index);
        assert!(
            last >= acked.last_entry,
            "round {round}: acknowledged entry {} lost; log ends at {last}",
            acked.last_entry
        );
        let purged = state.last_purged_log_id.map_or(0, |id| id.index);
        assert!(
            purged >= acked.purged,
            "round {round}: purge point went back"
        );
        let entries = log
            .get_log_reader()
            .await
            .try_get_log_entries(purged + 1..=last)
            .await
            .expect("read log");
        assert_eq!(
            entries.len() as u64,
            last - purged,
            "round {round}: hole in the log"
        );
        for (e, want) in entries.iter().zip(purged + 1..) {
            assert_eq!(e, &entry(want), "round {round}: entry {want} changed");
        }
        let applied = sm.applied_state().await.expect("applied").0;
        assert!(
            applied.map_or(0, |id| id.index) >= acked.snapshot,
            "round {round}: acknowledged snapshot at {} lost",
            acked.snapshot
        );
        assert!(
            applied.map_or(0, |id| id.index) >= purged,
            "round {round}: purged entries are in no snapshot"
        );

        // Usable: a new write lands and reads back.
        let next = entry(last + 1);
        log.blocking_append([next.clone()])
            .await
            .expect("append after reopen");
        let back = log
            .get_log_reader()
            .await
            .try_get_log_entries(last + 1..last + 2)
            .await
            .expect("read back");
        assert_eq!(back, vec![next.clone()]);
        assert!(matches!(next.payload, EntryPayload::Normal(_)));
        acked.last_entry = last + 1;
    });
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let rounds = env(ROUNDS_ENV).map_or(ROUNDS, |n| n as usize);
    let seed = env(SEED_ENV).unwrap_or(SEED);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acked = Acked::default();
    for round in 0..rounds {
        let kill_after = rng.random_range(1..=MAX_ACKS_BEFORE_KILL);
        let delay = Duration::from_micros(rng.random_range(0..=MAX_KILL_DELAY_MICROS));
        run_child_until_kill(dir.path(), kill_after, delay, &mut acked);
        check_and_extend(dir.path(), &mut acked, round);
        eprintln!(
            "seed {seed:#x} round {round}: killed after {kill_after} acks (+{delay:?}); {acked:?}"
        );
    }
}
