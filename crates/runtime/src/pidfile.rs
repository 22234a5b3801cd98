//! Pidfiles that let a restarted node find the workloads it started, and
//! the `/proc` and signal helpers that go with them.
//!
//! A pidfile holds `"<pid> <starttime>\n"`, where `starttime` is field 22 of
//! `/proc/<pid>/stat` (clock ticks since boot). A pid alone is not an
//! identity — the kernel reuses pids — but a pid together with its start
//! time is, so a pidfile whose process has gone and whose pid was reused is
//! recognised as stale rather than adopted.
//!
//! Every workload runs in its own process group (its pid is the group id),
//! so signals go to the group and reach whatever the workload forked.

use std::io;
use std::path::{Path, PathBuf};

use rustix::process::{Pid, Signal};

/// Name of the pidfile inside a VM's state directory.
pub const PIDFILE_NAME: &str = "workload.pid";

/// A process identified well enough to survive pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// The process id (also its process group id).
    pub pid: u32,
    /// Start time in clock ticks since boot, from `/proc/<pid>/stat`.
    pub start_time: u64,
}

impl ProcessIdentity {
    /// Reads the identity of a running process, `None` if it has gone (or
    /// is a zombie, which counts as gone: it will run no more code).
    pub fn of_pid(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may itself
        // contain spaces and parentheses: fields resume after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace();
        // Field 3 is the state; field 22 (starttime) is 19 fields later.
        let state = fields.next()?;
        if state == "Z" || state == "X" {
            return None;
        }
        let start_time = fields.nth(18)?.parse().ok()?;
        Some(ProcessIdentity { pid, start_time })
    }

    /// Whether this very process (not a later one that reused its pid) is
    /// still alive.
    pub fn is_alive(&self) -> bool {
        ProcessIdentity::of_pid(self.pid).is_some_and(|now| now == *self)
    }

    /// Sends `signal` to the process group this process leads. Errors if
    /// the group has gone.
    pub fn signal_group(&self, signal: Signal) -> io::Result<()> {
        let pid = raw_pid(self.pid)?;
        rustix::process::kill_process_group(pid, signal).map_err(io::Error::from)
    }

    /// Sends `signal` to the process alone.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        let pid = raw_pid(self.pid)?;
        rustix::process::kill_process(pid, signal).map_err(io::Error::from)
    }
}

fn raw_pid(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad pid {pid}")))
}

/// Path of the pidfile in `vm_dir`.
pub fn pidfile_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(PIDFILE_NAME)
}

/// Writes `identity` to the pidfile in `vm_dir`, atomically (write to a
/// temporary file, then rename), so a crash never leaves half a pidfile.
pub fn write(vm_dir: &Path, identity: ProcessIdentity) -> io::Result<()> {
    let tmp = vm_dir.join(format!("{PIDFILE_NAME}.tmp"));
    std::fs::write(&tmp, format!("{} {}\n", identity.pid, identity.start_time))?;
    std::fs::rename(&tmp, pidfile_path(vm_dir))
}

/// Reads the pidfile in `vm_dir`: `Ok(None)` if there is none, an error if
/// it cannot be read or parsed.
pub fn read(vm_dir: &Path) -> io::Result<Option<ProcessIdentity>> {
    let text = match std::fs::read_to_string(pidfile_path(vm_dir)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut parts = text.split_whitespace();
    let parsed = (|| {
        let pid = parts.next()?.parse().ok()?;
        let start_time = parts.next()?.parse().ok()?;
        Some(ProcessIdentity { pid, start_time })
    })();
    parsed.map(Some).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed pidfile {:?}: {text:?}", pidfile_path(vm_dir)),
        )
    })
}

/// Removes the pidfile in `vm_dir`; a missing one is not an error.
pub fn remove(vm_dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(pidfile_path(vm_dir)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The live workloads recorded under a runtime's state dir: `(vm_id,
/// identity)` for every VM directory whose pidfile names a live process.
///
/// For operators and tests that must clean up after a node that is gone
/// (for example a test guard that kills everything a runtime started).
pub fn live_workloads(runtime_dir: &Path) -> Vec<(String, ProcessIdentity)> {
    let Ok(entries) = std::fs::read_dir(runtime_dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(vm_id) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Ok(Some(identity)) = read(&path)
            && identity.is_alive()
        {
            found.push((vm_id.to_owned(), identity));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// Kills, on drop, every live workload recorded under a runtime state
/// directory, so that a test or tool leaves no process behind, whether it
/// ends well or panics. (A runtime itself leaves its workloads running when
/// dropped, as a node crash would.)
#[derive(Debug)]
pub struct KillOnDrop {
    dir: PathBuf,
}

impl KillOnDrop {
    /// Guards the workloads recorded under `dir`.
    pub fn new(dir: &Path) -> KillOnDrop {
        KillOnDrop {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for (vm_id, identity) in live_workloads(&self.dir) {
            tracing::warn!(vm = %vm_id, pid = identity.pid, "killing a leftover workload");
            let _ = identity.signal_group(Signal::KILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_round_trips() {
        let me = ProcessIdentity::of_pid(std::process::id()).expect("own stat");
        assert!(me.is_alive());
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), me).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(me));
        let reused = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !reused.is_alive(),
            "a different start time is another process"
        );
        remove(dir.path()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        remove(dir.path()).unwrap();
    }

    #[test]
    fn malformed_pidfiles_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(pidfile_path(dir.path()), "not a pid\n").unwrap();
        assert!(read(dir.path()).is_err());
    }
}
