//! The machine and the build the figures come from, for the report header.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What the report says about the machine and the tree.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Machine {
    /// `std::thread::available_parallelism` (what nproc prints).
    pub(crate) cores: usize,
    /// Logical CPUs listed in /proc/cpuinfo.
    pub(crate) cpus_listed: usize,
    /// CPU model name from /proc/cpuinfo.
    pub(crate) cpu: String,
    /// /proc/sys/kernel/osrelease (uname -r).
    pub(crate) kernel: String,
    /// MemTotal, KiB.
    pub(crate) mem_total_kib: u64,
    /// MemAvailable when the run started, KiB.
    pub(crate) mem_available_kib: u64,
    /// `rustc --version`.
    pub(crate) rustc: String,
    /// `git rev-parse HEAD`.
    pub(crate) commit: String,
    /// Whether tracked files differ from the commit.
    pub(crate) dirty: bool,
    /// /proc/loadavg's 1, 5 and 15 minute figures at the start of the run.
    pub(crate) load_start: String,
    /// The same at the end of the run.
    pub(crate) load_end: String,
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(crate::root())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// /proc/loadavg's first three fields, or "unknown".
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn meminfo_kib(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Machine {
    /// Looks at the machine now (the start of a run).
    pub(crate) fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpus_listed: cpuinfo
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count(),
            cpu,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
            mem_total_kib: meminfo_kib(&meminfo, "MemTotal:"),
            mem_available_kib: meminfo_kib(&meminfo, "MemAvailable:"),
            rustc: command_output(&rustc, &["--version"]).unwrap_or_else(|| "unknown".to_owned()),
            commit: command_output("git", &["rev-parse", "HEAD"])
                .unwrap_or_else(|| "unknown".to_owned()),
            dirty: command_output("git", &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()),
            load_start: load_average(),
            load_end: String::new(),
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since the Unix epoch.
pub(crate) fn utc(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap_or(0);
    let secs = unix % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_522_933), "2026-11-24 12:22:13 UTC");
    }
}
