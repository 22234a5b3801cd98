//! Topology: network namespaces, veth links, bridge "switches", addresses,
//! routes and nftables rules, and running things inside a namespace.
//!
//! Everything here goes through `ip` (iproute2) and `nft` as root. The
//! host's own (root) network namespace is never linked to: every veth is
//! created inside a lab namespace with its peer moved straight into
//! another lab namespace (`ip -n A link add X type veth peer name Y netns
//! B`), so no interface ever appears in the root namespace.
//!
//! [`Lab`] owns what it creates: every namespace and every process it
//! started is killed and deleted by [`Lab::cleanup`], which also runs when
//! the last handle to the lab is dropped (a failing scenario, a panic, a
//! Ctrl-C that drops the scenario's future). Names are
//! `{prefix}-{name}`; [`Lab::new`] first sweeps namespaces left by an
//! earlier run with the same prefix.
//!
//! The pure parts (names, nftables rule text) are functions tested
//! without root.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tern_testkit::TernProcess;

/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME: usize = 15;
/// Longest lab prefix: leaves room for `-` and a 7-character suffix in an
/// interface name.
pub const MAX_PREFIX: usize = 7;
/// Bound on one `ip`/`nft` command (they are local and quick; a hang is a
/// bug worth reporting).
pub const COMMAND_BOUND: Duration = Duration::from_secs(30);
/// The nftables table every lab rule lives in (one per namespace).
pub const NFT_TABLE: &str = "tern_lab";

/// Checks a lab prefix: 1..=7 characters of `[a-z0-9]`, starting with a
/// letter.
pub fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !ok {
        bail!(
            "--prefix {prefix:?}: use 1 to {MAX_PREFIX} characters a-z/0-9, starting with a letter (it starts every namespace and interface name)"
        );
    }
    Ok(())
}

/// A unique short default prefix for this run: `tl` and the process id in
/// base 36 (at most 7 characters).
pub fn default_prefix() -> String {
    let mut n = std::process::id();
    let mut digits = Vec::new();
    loop {
        let d = n % 36;
        digits.push(char::from_digit(d, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    let s: String = digits.iter().rev().collect();
    format!("tl{s}")
}

/// The namespace name for `name` under `prefix`.
pub fn ns_name(prefix: &str, name: &str) -> String {
    format!("{prefix}-{name}")
}

/// An interface name `{prefix}{suffix}`, checked against [`MAX_IFNAME`].
pub fn if_name(prefix: &str, suffix: &str) -> anyhow::Result<String> {
    let n = format!("{prefix}{suffix}");
    if n.len() > MAX_IFNAME {
        bail!(
            "interface name {n:?} is longer than {MAX_IFNAME} characters; use a shorter --prefix"
        );
    }
    Ok(n)
}

/// An IPv4 address with its prefix length, `10.77.0.11/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// `addr/len`.
    pub fn new(addr: Ipv4Addr, len: u8) -> Cidr {
        Cidr { addr, len }
    }

    /// The network (`10.77.0.0/24`).
    pub fn network(self) -> Cidr {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len.min(32)))
        };
        Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & mask),
            len: self.len,
        }
    }

    /// Host number `n` of this network (`10.77.0.0/24`.host(11) =
    /// `10.77.0.11/24`).
    pub fn host(self, n: u32) -> Cidr {
        Cidr {
            addr: Ipv4Addr::from(u32::from(self.network().addr) + n),
            len: self.len,
        }
    }

    /// Whether the address is a private (RFC 1918) one, the only kind the
    /// lab hands out.
    pub fn is_private(self) -> bool {
        self.addr.is_private()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Cidr> {
        let (a, l) = s
            .split_once('/')
            .with_context(|| format!("{s:?}: expected ADDR/LEN like 10.77.0.11/24"))?;
        let addr: Ipv4Addr = a.parse().with_context(|| format!("{s:?}: address"))?;
        let len: u8 = l.parse().with_context(|| format!("{s:?}: prefix length"))?;
        if len > 32 {
            bail!("{s:?}: prefix length over 32");
        }
        Ok(Cidr { addr, len })
    }
}

/// nftables rule text: the lab's table with an input and an output chain
/// holding `input` and `output` rules. Applied with [`Netns::nft`], it
/// replaces whatever lab rules the namespace had (the table is deleted
/// first, so the text is idempotent).
pub fn nft_ruleset(input: &[String], output: &[String]) -> String {
    let mut s = String::new();
    // `add` then `delete`: deleting a table that does not exist is an error.
    s.push_str(&format!("add table inet {NFT_TABLE}\n"));
    s.push_str(&format!("delete table inet {NFT_TABLE}\n"));
    s.push_str(&format!("table inet {NFT_TABLE} {{\n"));
    s.push_str("  chain input {\n    type filter hook input priority 0; policy accept;\n");
    for r in input {
        s.push_str(&format!("    {r}\n"));
    }
    s.push_str("  }\n");
    s.push_str("  chain output {\n    type filter hook output priority 0; policy accept;\n");
    for r in output {
        s.push_str(&format!("    {r}\n"));
    }
    s.push_str("  }\n}\n");
    s
}

/// Removes the lab's rules from a namespace.
pub fn nft_flush() -> String {
    format!("add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
}

/// A rule dropping `percent`% of the packets on interface `ifname` in one
/// direction (`iifname` for input, `oifname` for output), chosen by
/// nftables' random number generator (this kernel has no netem).
pub fn loss_rule(dir: Dir, ifname: &str, percent: u8) -> String {
    format!(
        "{} \"{ifname}\" numgen random mod 100 < {} counter drop",
        dir.key(),
        percent.min(100)
    )
}

/// A rule dropping every UDP packet on interface `ifname` in one
/// direction.
pub fn udp_block_rule(dir: Dir, ifname: &str) -> String {
    format!("{} \"{ifname}\" meta l4proto udp counter drop", dir.key())
}

/// A rule dropping everything on interface `ifname` to or from `peer`.
pub fn peer_block_rule(dir: Dir, ifname: &str, peer: Ipv4Addr) -> String {
    let addr = match dir {
        Dir::Input => "saddr",
        Dir::Output => "daddr",
    };
    format!("{} \"{ifname}\" ip {addr} {peer} counter drop", dir.key())
}

/// A packet direction as nftables sees it in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Arriving (`input` chain, `iifname`).
    Input,
    /// Leaving (`output` chain, `oifname`).
    Output,
}

impl Dir {
    fn key(self) -> &'static str {
        match self {
            Dir::Input => "iifname",
            Dir::Output => "oifname",
        }
    }
}

/// Sums the `counter packets N` of an `nft list` output (to report how
/// many packets lab rules dropped).
pub fn nft_dropped_packets(listing: &str) -> u64 {
    listing
        .split("counter packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Runs a command (bounded by [`COMMAND_BOUND`]), failing with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    run_input(cmd, None)
}

/// Like [`run`], with `input` on stdin.
pub fn run_input(cmd: &mut Command, input: Option<&str>) -> anyhow::Result<Output> {
    use std::io::Write as _;
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {shown} (is iproute2/nftables installed? `cargo xtask lab` installs them)"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("writing to {shown}"))?;
    }
    let deadline = Instant::now() + COMMAND_BOUND;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {COMMAND_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip() -> Command {
    Command::new("ip")
}

/// Names of the network namespaces that exist now.
pub fn list_namespaces() -> anyhow::Result<Vec<String>> {
    let out = run(ip().args(["netns", "list"]))?;
    Ok(parse_netns_list(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `ip netns list` (`name (id: 3)` per line).
pub fn parse_netns_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Kills every process in namespace `name` and deletes it (best effort,
/// logged; used by cleanup and the start-up sweep).
pub fn destroy_namespace(name: &str) {
    for _ in 0..3 {
        let pids = ip()
            .args(["netns", "pids", name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            kill(pid, rustix::process::Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match ip().args(["netns", "del", name]).output() {
        Ok(o) if o.status.success() => tracing::debug!(namespace = name, "deleted"),
        Ok(o) => tracing::warn!(
            namespace = name,
            error = %String::from_utf8_lossy(&o.stderr).trim(),
            "could not delete namespace; remove it with `ip netns del {name}`"
        ),
        Err(e) => tracing::warn!(namespace = name, error = %e, "could not run ip netns del"),
    }
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn kill(pid: i32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

struct State {
    /// Namespaces created, in creation order.
    namespaces: Vec<String>,
    /// Process ids started (killed at cleanup even if their handle leaked).
    pids: Vec<i32>,
    cleaned: bool,
}

struct Inner {
    prefix: String,
    dir: PathBuf,
    keep_dir: bool,
    state: Mutex<State>,
}

impl Inner {
    fn cleanup(&self) {
        let (namespaces, pids) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.cleaned {
                return;
            }
            st.cleaned = true;
            (
                std::mem::take(&mut st.namespaces),
                std::mem::take(&mut st.pids),
            )
        };
        for pid in pids {
            kill(pid, rustix::process::Signal::KILL);
        }
        for ns in namespaces.iter().rev() {
            destroy_namespace(ns);
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        tracing::info!(
            prefix = %self.prefix,
            namespaces = namespaces.len(),
            "lab cleaned up"
        );
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The lab: owner of every namespace and process a scenario creates.
/// Cheap to clone (all clones share the state); cleanup runs on
/// [`Lab::cleanup`] or when the last clone is dropped.
#[derive(Clone)]
pub struct Lab {
    inner: Arc<Inner>,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.inner.prefix)
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// A lab whose names start with `prefix` and whose files (configs,
    /// data dirs, logs) go under `dir` (removed at cleanup unless
    /// `keep_dir`). Sweeps namespaces of the same prefix left by an earlier
    /// run.
    pub fn new(prefix: &str, dir: PathBuf, keep_dir: bool) -> anyhow::Result<Lab> {
        check_prefix(prefix)?;
        if !rustix::process::geteuid().is_root() {
            bail!(
                "the lab needs root (network namespaces, nftables); run it through `cargo xtask lab`, or with sudo"
            );
        }
        let stale: Vec<String> = list_namespaces()?
            .into_iter()
            .filter(|n| n.starts_with(&format!("{prefix}-")))
            .collect();
        for n in &stale {
            tracing::warn!(namespace = %n, "removing a namespace left by an earlier run");
            destroy_namespace(n);
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the lab directory {}", dir.display()))?;
        Ok(Lab {
            inner: Arc::new(Inner {
                prefix: prefix.to_owned(),
                dir,
                keep_dir,
                state: Mutex::new(State {
                    namespaces: Vec::new(),
                    pids: Vec::new(),
                    cleaned: false,
                }),
            }),
        })
    }

    /// The name prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The directory for configs, data and logs.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Kills every process and deletes every namespace the lab made
    /// (idempotent).
    pub fn cleanup(&self) {
        self.inner.cleanup();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates namespace `{prefix}-{name}` with its loopback up.
    pub fn namespace(&self, name: &str) -> anyhow::Result<Netns> {
        let full = ns_name(self.prefix(), name);
        {
            let st = self.state();
            if st.cleaned {
                bail!("the lab was cleaned up (interrupted?); not creating {full}");
            }
        }
        run(ip().args(["netns", "add", &full]))?;
        self.state().namespaces.push(full.clone());
        let ns = Netns {
            name: full,
            lab: self.clone(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates a switch: a namespace holding one bridge, to which
    /// [`Lab::plug`] attaches namespaces; `subnet` is the address range
    /// handed out on it (say `10.77.0.0/24`).
    pub fn switch(&self, name: &str, subnet: Cidr) -> anyhow::Result<Switch> {
        if !subnet.is_private() {
            bail!("switch {name}: {subnet} is not a private address range");
        }
        let ns = self.namespace(name)?;
        let bridge = if_name(self.prefix(), "br")?;
        ns.ip(&["link", "add", &bridge, "type", "bridge"])?;
        ns.ip(&["link", "set", &bridge, "up"])?;
        Ok(Switch {
            ns,
            bridge,
            subnet: subnet.network(),
            ports: Arc::new(Mutex::new(0)),
        })
    }

    /// Plugs `ns` into `switch` with address `addr`: a veth whose end in
    /// `ns` is named `{prefix}{ifsuffix}` and whose other end is a port of
    /// the bridge. Returns the interface in `ns`.
    pub fn plug(
        &self,
        ns: &Netns,
        switch: &Switch,
        ifsuffix: &str,
        addr: Cidr,
    ) -> anyhow::Result<Iface> {
        let port_no = {
            let mut p = switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            *p += 1;
            *p
        };
        let ifname = if_name(self.prefix(), ifsuffix)?;
        let port = if_name(self.prefix(), &format!("p{port_no}"))?;
        ns.ip(&[
            "link",
            "add",
            &ifname,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &switch.ns.name,
        ])?;
        switch
            .ns
            .ip(&["link", "set", &port, "master", &switch.bridge])?;
        switch.ns.ip(&["link", "set", &port, "up"])?;
        // Deleting the primary address must keep the others (address change).
        ns.sysctl(&format!("net.ipv4.conf.{ifname}.promote_secondaries"), "1")?;
        ns.ip(&["addr", "add", &addr.to_string(), "dev", &ifname])?;
        ns.ip(&["link", "set", &ifname, "up"])?;
        Ok(Iface {
            ns: ns.clone(),
            name: ifname,
            addr,
        })
    }

    /// A veth between two namespaces (for routers), with an address on
    /// each end. Returns both interfaces.
    pub fn link(
        &self,
        a: &Netns,
        a_suffix: &str,
        a_addr: Cidr,
        b: &Netns,
        b_suffix: &str,
        b_addr: Cidr,
    ) -> anyhow::Result<(Iface, Iface)> {
        let an = if_name(self.prefix(), a_suffix)?;
        let bn = if_name(self.prefix(), b_suffix)?;
        a.ip(&[
            "link", "add", &an, "type", "veth", "peer", "name", &bn, "netns", &b.name,
        ])?;
        for (ns, n, addr) in [(a, &an, a_addr), (b, &bn, b_addr)] {
            ns.sysctl(&format!("net.ipv4.conf.{n}.promote_secondaries"), "1")?;
            ns.ip(&["addr", "add", &addr.to_string(), "dev", n])?;
            ns.ip(&["link", "set", n, "up"])?;
        }
        Ok((
            Iface {
                ns: a.clone(),
                name: an,
                addr: a_addr,
            },
            Iface {
                ns: b.clone(),
                name: bn,
                addr: b_addr,
            },
        ))
    }

    /// Starts `argv` inside `ns` (via `ip netns exec`) in its own process
    /// group, stdout and stderr appended to `log`. The process is killed at
    /// cleanup whatever happens to the handle.
    pub fn spawn(&self, ns: &Netns, argv: &[&str], log: &Path) -> anyhow::Result<Proc> {
        self.spawn_env(ns, argv, &[], log)
    }

    /// [`Lab::spawn`] with extra environment variables.
    pub fn spawn_env(
        &self,
        ns: &Netns,
        argv: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> anyhow::Result<Proc> {
        use std::os::unix::process::CommandExt;
        if self.state().cleaned {
            bail!("the lab was cleaned up (interrupted?); not starting {argv:?}");
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = ip();
        cmd.args(["netns", "exec", &ns.name])
            .args(argv)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own process group: a terminal's Ctrl-C reaches the lab only,
            // which then cleans up in order.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {argv:?} in {}", ns.name))?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        self.state().pids.push(pid);
        Ok(Proc {
            child,
            pid,
            log: log.to_owned(),
        })
    }

    /// Starts a `tern` process (the kit's [`TernProcess`]) inside `ns`:
    /// `cmd` (from [`TernProcess::command`], with its environment) runs
    /// through `ip netns exec` in its own process group, output appended
    /// to `log`; `data_dir` is where it writes its node file. Killed at
    /// cleanup whatever happens to the handle, like [`Lab::spawn`]'s.
    pub fn spawn_tern(
        &self,
        ns: &Netns,
        cmd: Command,
        data_dir: &Path,
        log: &Path,
    ) -> anyhow::Result<TernProcess> {
        use std::os::unix::process::CommandExt;
        if self.state().cleaned {
            bail!("the lab was cleaned up (interrupted?); not starting {cmd:?}");
        }
        let mut wrapped = ip();
        wrapped
            .args(["netns", "exec", &ns.name])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            // Own process group: a terminal's Ctrl-C reaches the lab only,
            // which then cleans up in order.
            .process_group(0);
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => wrapped.env(key, v),
                None => wrapped.env_remove(key),
            };
        }
        let proc = TernProcess::spawn(wrapped, data_dir, log)
            .with_context(|| format!("starting tern in {}", ns.name))?;
        self.state()
            .pids
            .push(i32::try_from(proc.pid()).unwrap_or(i32::MAX));
        Ok(proc)
    }
}

/// A started process (`ip netns exec` execs, so this is the program
/// itself). Killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pid: i32,
    log: PathBuf,
}

impl Proc {
    /// Process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log (for error messages).
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Sends a signal.
    pub fn signal(&self, sig: rustix::process::Signal) {
        kill(self.pid, sig);
    }

    /// Exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `bound` for the exit; SIGKILL after.
    /// Returns the exit status when it exited by itself.
    pub async fn stop(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        self.signal(rustix::process::Signal::TERM);
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.kill();
        }
    }
}

/// A network namespace the lab created.
#[derive(Clone)]
pub struct Netns {
    name: String,
    lab: Lab,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Netns({})", self.name)
    }
}

impl Netns {
    /// The full namespace name (`{prefix}-{name}`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lab it belongs to.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// `ip -n NAME args...`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        run(ip().args(["-n", &self.name]).args(args))
    }

    /// Runs `argv` inside the namespace to completion (bounded).
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<Output> {
        run(ip().args(["netns", "exec", &self.name]).args(argv))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Turns IPv4 forwarding on (a router).
    pub fn forwarding(&self) -> anyhow::Result<()> {
        self.sysctl("net.ipv4.ip_forward", "1")
    }

    /// Adds a route: `ip route add DEST via VIA` (`dest` may be
    /// `default`).
    pub fn route_add(&self, dest: &str, via: Ipv4Addr) -> anyhow::Result<()> {
        self.ip(&["route", "add", dest, "via", &via.to_string()])
            .map(|_| ())
    }

    /// Applies nftables text (`nft -f -`) inside the namespace.
    pub fn nft(&self, text: &str) -> anyhow::Result<()> {
        run_input(
            ip().args(["netns", "exec", &self.name, "nft", "-f", "-"]),
            Some(text),
        )
        .with_context(|| format!("applying nftables rules in {}:\n{text}", self.name))
        .map(|_| ())
    }

    /// Packets the lab's rules dropped so far in this namespace.
    pub fn nft_dropped(&self) -> u64 {
        self.exec(&["nft", "list", "table", "inet", NFT_TABLE])
            .map(|o| nft_dropped_packets(&String::from_utf8_lossy(&o.stdout)))
            .unwrap_or(0)
    }

    /// Replaces the lab's rules with `input`/`output` ([`nft_ruleset`]).
    pub fn set_rules(&self, input: &[String], output: &[String]) -> anyhow::Result<()> {
        self.nft(&nft_ruleset(input, output))
    }

    /// Removes the lab's rules.
    pub fn clear_rules(&self) -> anyhow::Result<()> {
        self.nft(&nft_flush())
    }

    /// Runs `f` on a new thread that has entered this namespace, in a
    /// current-thread tokio runtime: every socket it opens (and every
    /// thread it starts) lives in the namespace. This is how the lab's
    /// own clients reach nodes without any link to the host.
    pub fn spawn_task<F, Fut, T>(
        &self,
        f: F,
    ) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
        T: Send + 'static,
    {
        let path = PathBuf::from("/var/run/netns").join(&self.name);
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("ns-{}", self.name))
            .spawn(move || {
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .with_context(|| format!("entering namespace {name}"))?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(f())
            })
            .context("starting a thread")
    }

    /// Runs `f` inside the namespace (see [`Netns::spawn_task`]) and
    /// waits for it without blocking the caller's runtime.
    pub async fn run_task<F, Fut, T>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
        T: Send + 'static,
    {
        let handle = self.spawn_task(f)?;
        tokio::task::spawn_blocking(move || {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a task in a namespace panicked"))?
        })
        .await?
    }
}

/// A bridge in its own namespace.
#[derive(Debug, Clone)]
pub struct Switch {
    /// The namespace holding the bridge.
    pub ns: Netns,
    /// The bridge's name.
    pub bridge: String,
    /// The address range handed out on it.
    pub subnet: Cidr,
    ports: Arc<Mutex<u32>>,
}

/// An interface in a namespace, with its (first) address.
#[derive(Debug, Clone)]
pub struct Iface {
    /// Its namespace.
    pub ns: Netns,
    /// Interface name.
    pub name: String,
    /// The address it was given.
    pub addr: Cidr,
}

impl Iface {
    /// Adds another address.
    pub fn addr_add(&self, addr: Cidr) -> anyhow::Result<()> {
        self.ns
            .ip(&["addr", "add", &addr.to_string(), "dev", &self.name])
            .map(|_| ())
    }

    /// Removes an address.
    pub fn addr_del(&self, addr: Cidr) -> anyhow::Result<()> {
        self.ns
            .ip(&["addr", "del", &addr.to_string(), "dev", &self.name])
            .map(|_| ())
    }

    /// Rules dropping `percent`% of packets both ways on this interface.
    pub fn loss_rules(&self, percent: u8) -> (Vec<String>, Vec<String>) {
        (
            vec![loss_rule(Dir::Input, &self.name, percent)],
            vec![loss_rule(Dir::Output, &self.name, percent)],
        )
    }

    /// Rules dropping all UDP both ways on this interface.
    pub fn udp_block_rules(&self) -> (Vec<String>, Vec<String>) {
        (
            vec![udp_block_rule(Dir::Input, &self.name)],
            vec![udp_block_rule(Dir::Output, &self.name)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("tc3").is_ok());
        assert!(check_prefix("t1234567").is_err());
        assert!(check_prefix("3tc").is_err());
        assert!(check_prefix("tc-3").is_err());
        assert!(check_prefix("").is_err());
        let d = default_prefix();
        assert!(check_prefix(&d).is_ok(), "{d}");
    }

    #[test]
    fn interface_names_fit() {
        assert_eq!(if_name("tc3", "n1").unwrap(), "tc3n1");
        assert!(if_name("abcdefg", "12345678").is_ok());
        assert!(if_name("abcdefg", "123456789").is_err());
    }

    #[test]
    fn cidr_arithmetic() {
        let c: Cidr = "10.77.0.11/24".parse().unwrap();
        assert_eq!(c.network().to_string(), "10.77.0.0/24");
        assert_eq!(c.host(5).to_string(), "10.77.0.5/24");
        assert!(c.is_private());
        assert!(!"8.8.8.8/32".parse::<Cidr>().unwrap().is_private());
        assert!("10.0.0.1".parse::<Cidr>().is_err());
        assert!("10.0.0.1/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn rule_text() {
        assert_eq!(
            loss_rule(Dir::Input, "tc3n1", 5),
            "iifname \"tc3n1\" numgen random mod 100 < 5 counter drop"
        );
        assert_eq!(
            udp_block_rule(Dir::Output, "tc3n1"),
            "oifname \"tc3n1\" meta l4proto udp counter drop"
        );
        assert_eq!(
            peer_block_rule(Dir::Input, "e", Ipv4Addr::new(10, 0, 0, 1)),
            "iifname \"e\" ip saddr 10.0.0.1 counter drop"
        );
        let r = nft_ruleset(&["a".into()], &["b".into()]);
        assert!(r.starts_with("add table inet tern_lab\ndelete table inet tern_lab\n"));
        assert!(r.contains("hook input priority 0; policy accept;\n    a\n"));
        assert!(r.contains("hook output priority 0; policy accept;\n    b\n"));
    }

    #[test]
    fn counters_and_netns_list_parse() {
        let listing = "table inet tern_lab {\n chain input {\n  iifname \"x\" meta l4proto udp counter packets 12 bytes 900 drop\n }\n chain output {\n  oifname \"x\" meta l4proto udp counter packets 3 bytes 10 drop\n }\n}\n";
        assert_eq!(nft_dropped_packets(listing), 15);
        assert_eq!(
            parse_netns_list("tc3-a (id: 1)\ntc3-b\n"),
            vec!["tc3-a".to_owned(), "tc3-b".to_owned()]
        );
    }
}
