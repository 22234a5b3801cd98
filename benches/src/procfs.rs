//! Process figures from `/proc`: CPU time, peak memory, descriptors.
//!
//! Linux only; on other systems every reading is an error, which the bench
//! reports as an unmeasured (`null`) value.

use std::io;
use std::process::Command;
use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`), the unit of the CPU times in
/// `/proc/<pid>/stat`. Read once; 100 (Linux's `USER_HZ` on every common
/// architecture) if `getconf` is missing.
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t: &u64| t > 0)
            .unwrap_or(100)
    })
}

/// User plus system CPU seconds `pid` has used so far (all its threads).
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (utime, stime) = parse_stat_times(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat has no utime/stime fields"),
        )
    })?;
    Ok((utime + stime) as f64 / clock_ticks() as f64)
}

/// `utime` and `stime` (fields 14 and 15) of a `/proc/<pid>/stat` line.
/// The command name (field 2) may contain spaces and parentheses, so the
/// fields are counted from the last `)`.
pub fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state): utime is field 14, the 12th here.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// Peak resident memory of `pid` in bytes (`VmHWM`).
pub fn peak_rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_kib(&status, "VmHWM:")
        .map(|kib| kib * 1024)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/status has no VmHWM line"),
            )
        })
}

/// A `kB` figure of a `/proc/<pid>/status` line such as `VmHWM:  1234 kB`.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resets the peak resident memory of `pid` to its current resident memory
/// (writes `5` to `/proc/<pid>/clear_refs`), so that a later
/// [`peak_rss_bytes`] covers only what ran in between.
pub fn reset_peak_rss(pid: u32) -> io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_skip_a_command_name_with_spaces() {
        let stat = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 100";
        assert_eq!(parse_stat_times(stat), Some((17, 5)));
        assert_eq!(parse_stat_times("42 (x"), None);
    }

    #[test]
    fn status_figures_are_read_in_kib() {
        let status = "Name:\tx\nVmHWM:\t   2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(2048));
        assert_eq!(parse_status_kib(status, "VmPeak:"), None);
    }

    #[test]
    fn own_process_figures_are_readable() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_ok());
        assert!(peak_rss_bytes(me).is_ok_and(|b| b > 0));
        assert!(fd_count(me).is_ok_and(|n| n > 0));
    }
}
