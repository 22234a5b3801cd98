//! Acknowledged means on stable storage, proven from the system calls: a
//! child process appends log entries through the real [`LogStore`] under
//! `strace`, printing `sub N` to stdout when an append has been submitted
//! (the entry is written into a segment file, not yet durable) and `ack N`
//! when its openraft callback fired. In the trace, between `sub N` and
//! `ack N` there must be a successful `fdatasync` (or `fsync`) of a segment
//! file, after the entry's write to it. Appends are submitted in bursts,
//! so one sync may cover several (how many depends on timing, so it is not
//! asserted). A vote and a purge are checked the same way against sled's
//! data file, which holds them (sled writes only when the store flushes:
//! its periodic flush is off, and the store flushes right before it
//! syncs).
//!
//! The child is this test binary re-executed with [`CHILD_ENV`] naming the
//! data directory; it runs only the ignored `sync_child` test. The test
//! fails (never skips) when `strace` is missing: `cargo xtask test`
//! installs it.

use std::io::Write;
use std::path::Path;
use std::process::Command as Process;

use openraft::entry::RaftEntry;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::type_config::TypeConfigExt;
use tern_state::Command;
use tern_store::{Entry, LogStore, TypeConfig};

/// Environment variable that turns the `sync_child` test into the child.
const CHILD_ENV: &str = "TERN_STORE_SYNC_CHILD_DIR";
/// Appends the child makes, each acknowledged before the next.
const APPENDS: u64 = 40;
/// Appends submitted together (openraft pipelines them): one group commit
/// may cover several, and each must still be synced before its ack.
const BURST: u64 = 8;

fn entry(index: u64) -> Entry {
    let cmd = Command::PutMeta {
        request_id: format!("req-{index}"),
        key: format!("k{}", index % 7),
        value: "v".repeat(100),
    };
    Entry::new_normal(openraft::testing::log_id::<TypeConfig>(1, 1, index), cmd)
}

/// The child: appends, acknowledges each on stdout, saves a vote, purges.
#[test]
#[ignore = "the durability test's child process; run by acknowledgements_follow_their_sync"]
fn sync_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut log = LogStore::open(Path::new(&dir)).expect("open");
        let mut out = std::io::stdout();
        let mut index = 1;
        while index <= APPENDS {
            // A burst submitted without waiting, then each acknowledged.
            let mut waits = Vec::new();
            for i in index..index + BURST {
                let (tx, rx) = TypeConfig::oneshot();
                let callback = openraft::storage::IOFlushed::<TypeConfig>::signal(tx);
                log.append([entry(i)], callback).await.expect("append");
                writeln!(out, "sub {i}")
                    .and_then(|()| out.flush())
                    .expect("stdout");
                waits.push((i, rx));
            }
            for (i, rx) in waits {
                rx.await.expect("callback").expect("synced");
                writeln!(out, "ack {i}")
                    .and_then(|()| out.flush())
                    .expect("stdout");
            }
            index += BURST;
        }
        writeln!(out, "sub vote")
            .and_then(|()| out.flush())
            .expect("stdout");
        log.save_vote(&openraft::Vote::new_committed(2, 1))
            .await
            .expect("vote");
        writeln!(out, "ack vote")
            .and_then(|()| out.flush())
            .expect("stdout");
        writeln!(out, "sub purge")
            .and_then(|()| out.flush())
            .expect("stdout");
        log.purge(openraft::testing::log_id::<TypeConfig>(1, 1, 10))
            .await
            .expect("purge");
        writeln!(out, "ack purge")
            .and_then(|()| out.flush())
            .expect("stdout");
        writeln!(out, "sub last")
            .and_then(|()| out.flush())
            .expect("stdout");
        log.blocking_append([entry(APPENDS + 1)])
            .await
            .expect("append");
        writeln!(out, "ack last")
            .and_then(|()| out.flush())
            .expect("stdout");
    });
}

/// Which file a traced write or sync was of.
#[derive(Debug, PartialEq, Eq, Hash, Clone, Copy)]
enum File {
    /// A log segment: entries.
    Segment,
    /// sled's data file: the vote and the purge point.
    Meta,
}

/// One traced system call.
#[derive(Debug, PartialEq)]
enum Event {
    /// A successful write to a data file.
    DataWrite(File),
    /// `fdatasync`/`fsync` of a data file, returned successfully.
    DataSync(File),
    /// A submission line on stdout.
    Sub(String),
    /// An acknowledgement line on stdout.
    Ack(String),
}

/// Reads strace's output (`-f -yy -s 64`): the events above, in order. A
/// call another thread interrupts is printed in two parts (`... <unfinished
/// ...>`, later `<... NAME resumed> ...`): a stdout line counts when its
/// write starts (the earliest moment anyone could see it), a sync when it
/// returns.
fn events(trace: &str, segment_dir: &str, meta_file: &str) -> Vec<Event> {
    let mut out = Vec::new();
    let mut pending: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    for line in trace.lines() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        if let Some(started) = call.strip_suffix("<unfinished ...>") {
            stdout_event(started, &mut out);
            pending.insert(pid, started.to_owned());
            continue;
        }
        let (whole, resumed) = if call.starts_with("<... ") {
            let Some(start) = pending.remove(pid) else {
                continue;
            };
            let rest = call.split_once("resumed>").map_or("", |(_, r)| r);
            (format!("{start}{rest}"), true)
        } else {
            (call.to_owned(), false)
        };
        let on = if whole.contains(&format!("<{segment_dir}/")) {
            Some(File::Segment)
        } else if whole.contains(&format!("<{meta_file}>")) {
            Some(File::Meta)
        } else {
            None
        };
        let ok = !whole.contains("= -1");
        let is_write = whole.starts_with("pwrite") || whole.starts_with("write(");
        let is_sync = whole.starts_with("fdatasync") || whole.starts_with("fsync");
        if let (Some(file), true, true) = (on, is_write, ok) {
            out.push(Event::DataWrite(file));
        } else if let (Some(file), true, true) = (on, is_sync, ok) {
            out.push(Event::DataSync(file));
        } else if !resumed {
            stdout_event(&whole, &mut out);
        }
    }
    out
}

/// A `sub`/`ack` line written to stdout, if `call` is one.
fn stdout_event(call: &str, out: &mut Vec<Event>) {
    if !call.starts_with("write(1") {
        return;
    }
    for (tag, make) in [
        ("\"ack ", Event::Ack as fn(String) -> Event),
        ("\"sub ", Event::Sub as fn(String) -> Event),
    ] {
        if let Some((_, rest)) = call.split_once(tag) {
            let what = rest.split_once('\\').map_or("?", |(w, _)| w);
            out.push(make(what.to_owned()));
        }
    }
}

#[test]
fn acknowledgements_follow_their_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("log");
    std::fs::create_dir_all(&data).expect("mkdir");
    let trace_file = dir.path().join("trace");
    let exe = std::env::current_exe().expect("test binary");
    let status = Process::new("strace")
        .args(["-f", "-qq", "-yy", "-s", "64", "-o"])
        .arg(&trace_file)
        .args([
            "-e",
            "trace=write,pwrite64,pwritev,pwritev2,fdatasync,fsync",
        ])
        .arg(&exe)
        .args([
            "--ignored",
            "--exact",
            "sync_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &data)
        .stdout(std::process::Stdio::piped())
        .output()
        .expect("strace runs (cargo xtask test installs it)");
    assert!(status.status.success(), "child failed: {status:?}");
    let acks = String::from_utf8_lossy(&status.stdout);
    assert!(acks.contains("ack last"), "the child finished: {acks}");

    let meta_file = data.join("db");
    let meta_file = meta_file.to_str().expect("utf-8 path");
    let segment_dir = data.join("segments");
    let segment_dir = segment_dir.to_str().expect("utf-8 path");
    let trace = std::fs::read_to_string(&trace_file).expect("trace");
    let events = events(&trace, segment_dir, meta_file);
    let acks_seen = check_acks(&events);
    let syncs_of = |file: File| {
        events
            .iter()
            .filter(|e| **e == Event::DataSync(file))
            .count()
    };
    let expected_acks = usize::try_from(APPENDS).expect("small") + 3;
    assert_eq!(acks_seen, expected_acks, "every ack is in the trace");
    for file in [File::Segment, File::Meta] {
        assert!(
            events.contains(&Event::DataWrite(file)),
            "the trace shows writes of {file:?}"
        );
        assert!(syncs_of(file) > 0, "the trace shows syncs of {file:?}");
    }
}

/// Checks that every ack in `events` follows a sync of its file after its
/// submission; returns how many acks there were.
fn check_acks(events: &[Event]) -> usize {
    // For each write: the number of syncs of its file seen when it was
    // submitted (after its `pwrite`, so a later sync covers it).
    let mut at_submit = std::collections::HashMap::new();
    let mut acks_seen = 0;
    let mut syncs = std::collections::HashMap::from([(File::Segment, 0), (File::Meta, 0)]);
    for e in events {
        match e {
            Event::DataWrite(_) => {}
            Event::DataSync(file) => *syncs.entry(*file).or_default() += 1,
            Event::Sub(what) => {
                let file = file_of(what);
                at_submit.insert(what.clone(), syncs[&file]);
            }
            Event::Ack(what) => {
                let file = file_of(what);
                let submitted = at_submit
                    .get(what)
                    .unwrap_or_else(|| panic!("ack {what} before its submission"));
                assert!(
                    syncs[&file] > *submitted,
                    "ack {what} was written with no fdatasync of its file ({file:?}) since it was submitted"
                );
                acks_seen += 1;
            }
        }
    }
    acks_seen
}

/// The file that makes `what` durable: the vote and the purge point live in
/// sled's meta tree, entries in segments.
fn file_of(what: &str) -> File {
    match what {
        "vote" | "purge" => File::Meta,
        _ => File::Segment,
    }
}
