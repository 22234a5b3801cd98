//! The Prometheus rules (`deploy/prometheus/`) and the Grafana dashboard
//! (`deploy/grafana/tern.json`) against the real tools:
//!
//! - `promtool check rules` and `promtool test rules` pass, and the unit
//!   tests fire and keep quiet every alert the rules define;
//! - a real Prometheus server (Debian's `prometheus`, which `cargo xtask
//!   test` installs) scrapes a live 3-node cluster of `tern` processes
//!   every second while clients call every node over gRPC and over iroh
//!   and writes go through every node, loads the rule files, and answers,
//!   through its HTTP API, **every** rule expression and **every**
//!   dashboard query (variables substituted) with data.
//!
//! "With data" means a non-empty result. Alert expressions are empty on a
//! healthy cluster by design, so an empty alert expression is evaluated
//! again with every comparison turned into its `bool` form (`a > 0.01`
//! becomes `a > bool 0.01`, see [`with_bool`]): the same series,
//! answering 0 or 1 instead of being filtered, so it must be non-empty.
//! That proves each selector, ratio and label match the alert reads
//! exists on a live node. To give the fault-only series (fallbacks,
//! failed dials, refused handshakes and keys) something to show, the test
//! makes each happen once: a stranger's key calls a node, garbage is sent
//! to a gRPC port, and a follower is killed and restarted under traffic.
//! Rule health is checked too: Prometheus must report every rule
//! evaluated without error.
//!
//! Every wait is bounded; Prometheus and the nodes are killed by guards
//! when the test fails.
#![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tern_protocol::catalog::methods;
use tern_protocol::pb;
use tern_testkit::config;
use tern_testkit::local::LocalCluster;
use tern_testkit::traffic::{self, Client, Traffic, TrafficSpec};
use tern_transport_dual::RaftTransport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on Prometheus becoming ready.
const READY_BOUND: Duration = Duration::from_secs(60);
/// Bound on every expression returning data (scrapes of a 1 s interval
/// and rule evaluations need a few rounds; a loaded machine more).
const DATA_BOUND: Duration = Duration::from_secs(120);
/// Bound on one HTTP exchange with Prometheus.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from Prometheus.
const MAX_ANSWER_BYTES: u64 = 16 * 1024 * 1024;
/// Scrape and rule-evaluation interval of the test's Prometheus.
const INTERVAL: &str = "1s";
/// What the dashboard's `$__rate_interval` becomes (Grafana makes it at
/// least four scrape intervals; a minute holds plenty of 1 s scrapes).
const RATE_INTERVAL: &str = "1m";
/// A key no node knows: its calls are refused by the access table.
const STRANGER_KEY: [u8; 32] = [0x5a; 32];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The rule files, sorted.
fn rule_files() -> Vec<PathBuf> {
    files_in(&deploy().join("prometheus"), ".rules.yml")
}

/// The promtool unit-test files, sorted.
fn rule_test_files() -> Vec<PathBuf> {
    files_in(&deploy().join("prometheus/tests"), ".yml")
}

fn files_in(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *{suffix} in {}", dir.display());
    files
}

fn promtool(args: &[&str], files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .args(files)
        .output()
        .expect("promtool is needed for this test: `cargo xtask prereqs` installs it (Debian package `prometheus`)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let (ok, said) = promtool(&["check", "rules"], &rule_files());
    assert!(ok, "promtool check rules failed:\n{said}");
    let (ok, said) = promtool(&["test", "rules"], &rule_test_files());
    assert!(ok, "promtool test rules failed:\n{said}");
}

/// `(kind, name)` of every rule in `text` (`record` or `alert`), read
/// from the `- record:` / `- alert:` lines the rule files are written
/// with.
fn rules_in(text: &str) -> Vec<(&'static str, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start().strip_prefix("- ")?;
            let (kind, name) = l.split_once(':')?;
            let kind = match kind {
                "record" => "record",
                "alert" => "alert",
                _ => return None,
            };
            Some((kind, name.trim().to_owned()))
        })
        .collect()
}

fn all_rules() -> Vec<(&'static str, String)> {
    rule_files()
        .iter()
        .flat_map(|f| rules_in(&std::fs::read_to_string(f).unwrap()))
        .collect()
}

/// For each alert a unit test names: whether a case expects it to fire
/// (`exp_alerts:` with entries) and whether one expects quiet
/// (`exp_alerts: []`). The test files write `exp_alerts` on the line
/// after `alertname`.
fn unit_cases(text: &str) -> std::collections::BTreeMap<String, (bool, bool)> {
    let mut cases = std::collections::BTreeMap::<String, (bool, bool)>::new();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:") else {
            continue;
        };
        let entry = cases.entry(name.trim().to_owned()).or_default();
        match lines.get(i + 1).copied() {
            Some("exp_alerts: []") => entry.1 = true,
            Some("exp_alerts:") => entry.0 = true,
            other => panic!("alertname {name} is not followed by exp_alerts but {other:?}"),
        }
    }
    cases
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let mut cases = std::collections::BTreeMap::new();
    for f in rule_test_files() {
        for (name, (fires, quiet)) in unit_cases(&std::fs::read_to_string(f).unwrap()) {
            let e: &mut (bool, bool) = cases.entry(name).or_default();
            e.0 |= fires;
            e.1 |= quiet;
        }
    }
    let alerts: Vec<String> = all_rules()
        .into_iter()
        .filter(|(k, _)| *k == "alert")
        .map(|(_, n)| n)
        .collect();
    assert!(alerts.len() >= 10, "too few alerts found: {alerts:?}");
    for alert in &alerts {
        let (fires, quiet) = cases.get(alert).copied().unwrap_or_default();
        assert!(fires, "no unit test fires {alert}");
        assert!(quiet, "no unit test keeps {alert} quiet");
    }
    for name in cases.keys() {
        assert!(
            alerts.contains(name),
            "unit tests name unknown alert {name}"
        );
    }
}

/// `expr` with every comparison operator turned into its `bool` form, so
/// that it answers 0 or 1 for each series instead of filtering: the
/// "inner" form of an alert expression that is empty while healthy.
/// Label matchers (`{a!="b"}`), strings and range selectors are left
/// alone; a comparison already in `bool` form stays as it is.
fn with_bool(expr: &str) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::with_capacity(expr.len() + 32);
    let (mut braces, mut quote) = (0usize, None::<char>);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = quote {
            out.push(c);
            if c == '\\' && q != '`' {
                if let Some(n) = chars.get(i + 1) {
                    out.push(*n);
                    i += 1;
                }
            } else if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            _ => {}
        }
        let next = chars.get(i + 1).copied();
        let op_len = if braces > 0 {
            0
        } else {
            match (c, next) {
                ('=' | '!' | '>' | '<', Some('=')) => 2,
                ('>' | '<', _) => 1,
                _ => 0,
            }
        };
        if op_len == 0 {
            out.push(c);
            i += 1;
            continue;
        }
        out.extend(&chars[i..i + op_len]);
        i += op_len;
        let rest: String = chars[i..].iter().collect();
        if !rest.trim_start().starts_with("bool") {
            out.push_str(" bool");
        }
    }
    out
}

#[test]
fn comparisons_get_their_bool_form_and_matchers_do_not() {
    assert_eq!(
        with_bool(r#"a{x!="y",z=~"w"} > 0.01 and b{q="a>b"} <= 3"#),
        r#"a{x!="y",z=~"w"} > bool 0.01 and b{q="a>b"} <= bool 3"#
    );
    assert_eq!(with_bool("up == 0"), "up == bool 0");
    assert_eq!(with_bool("x != 1"), "x != bool 1");
    assert_eq!(
        with_bool("sum(up == bool 1) < 2"),
        "sum(up == bool 1) < bool 2"
    );
    assert_eq!(
        with_bool("a > ignoring (t) (b + 0.1)"),
        "a > bool ignoring (t) (b + 0.1)"
    );
    assert_eq!(with_bool("rate(x[5m]) / y"), "rate(x[5m]) / y");
}

/// A dashboard query with its variables substituted as "All" (`.*`) and
/// `$__rate_interval` as [`RATE_INTERVAL`].
fn substitute(query: &str, variables: &[String]) -> String {
    let mut q = query.replace("$__rate_interval", RATE_INTERVAL);
    // Longest names first, so that `$instance` is not cut by a `$in`.
    let mut vars: Vec<&String> = variables.iter().collect();
    vars.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for v in vars {
        q = q
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    q
}

/// Every query of the dashboard: panel targets (rows included) and the
/// variables' `label_values(SELECTOR, label)` selectors, substituted.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let variables: Vec<&Value> = dashboard["templating"]["list"]
        .as_array()
        .expect("the dashboard has templating.list")
        .iter()
        .collect();
    let names: Vec<String> = variables
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let mut queries = Vec::new();
    for v in &variables {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .expect("a query variable has a query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .map(|(selector, _label)| selector.trim())
            .unwrap_or_else(|| panic!("variable query {q} is not label_values(SELECTOR, LABEL)"));
        let name = v["name"].as_str().unwrap_or("?");
        queries.push((format!("variable {name}"), substitute(inner, &names)));
    }
    fn walk(panels: &Value, names: &[String], out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("a target has an expr");
                out.push((format!("panel \"{title}\""), substitute(expr, names)));
            }
            walk(&p["panels"], names, out);
        }
    }
    walk(&dashboard["panels"], &names, &mut queries);
    queries
}

fn dashboard() -> Value {
    let path = deploy().join("grafana/tern.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_dashboard_takes_its_datasource_from_a_variable() {
    let d = dashboard();
    let variables = d["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "no datasource variable"
    );
    fn check(panels: &Value, seen: &mut usize) {
        for p in panels.as_array().into_iter().flatten() {
            if p["type"] != "row" {
                assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
                for t in p["targets"].as_array().into_iter().flatten() {
                    assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
                    *seen += 1;
                }
            }
            check(&p["panels"], seen);
        }
    }
    let mut targets = 0;
    check(&d["panels"], &mut targets);
    assert!(targets >= 20, "only {targets} queries");
    for (what, q) in dashboard_queries(&d) {
        assert!(!q.contains('$'), "{what}: unsubstituted variable in {q}");
    }
}

/// Percent-encodes `s` for a URL query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One HTTP/1.0 GET (Prometheus answers it unchunked and closes);
/// returns the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.take(MAX_ANSWER_BYTES).read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = tokio::time::timeout(HTTP_TIMEOUT, work)
        .await
        .with_context(|| format!("GET {path} timed out"))??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no header end in {text:.200}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {path}: bad status line in {head:.200}"))?;
    Ok((code, body.to_owned()))
}

/// A running Prometheus, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The answer to an instant query.
enum Answer {
    /// Series (or a scalar) came back.
    Data,
    /// The query ran and returned nothing.
    Empty,
}

impl Prometheus {
    /// Starts Prometheus in `dir` scraping `targets` every [`INTERVAL`]
    /// as job `tern`, with the rule files loaded; returns once ready.
    async fn start(dir: &Path, targets: &[SocketAddr]) -> anyhow::Result<Prometheus> {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?
        };
        // JSON is YAML: the config is written with serde_json.
        let config = json!({
            "global": {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL},
            "rule_files": rule_files(),
            "scrape_configs": [{
                "job_name": "tern",
                "static_configs": [{"targets": targets.iter().map(ToString::to_string).collect::<Vec<_>>()}],
            }],
        });
        let path = dir.join("prometheus.yml");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .context("starting prometheus: `cargo xtask prereqs` installs it (Debian package `prometheus`)")?;
        let mut p = Prometheus { child, addr, log };
        let deadline = Instant::now() + READY_BOUND;
        loop {
            if let Ok((200, _)) = get(addr, "/-/ready").await {
                return Ok(p);
            }
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited ({status}):\n{}", p.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus not ready within {READY_BOUND:?}:\n{}",
                    p.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GETs an API path and returns its `data`; an API error (a query
    /// that does not parse, say) is an error naming what Prometheus said.
    async fn api(&self, path: &str) -> anyhow::Result<Value> {
        let (code, body) = get(self.addr, path).await?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("{path}: HTTP {code}, not JSON: {body:.300}"))?;
        if v["status"] != "success" {
            bail!(
                "{} ({}): {}",
                v["errorType"].as_str().unwrap_or("error"),
                code,
                v["error"].as_str().unwrap_or("?")
            );
        }
        Ok(v["data"].clone())
    }

    /// Evaluates `query` now.
    async fn query(&self, query: &str) -> anyhow::Result<Answer> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(query)))
            .await?;
        Ok(match data["resultType"].as_str() {
            Some("vector" | "matrix") => match data["result"].as_array().map_or(0, Vec::len) {
                0 => Answer::Empty,
                _ => Answer::Data,
            },
            Some("scalar" | "string") => Answer::Data,
            other => bail!("unexpected result type {other:?}"),
        })
    }

    /// Every loaded rule: (type, name, query, health, last error).
    async fn rules(&self) -> anyhow::Result<Vec<LoadedRule>> {
        let data = self.api("/api/v1/rules").await?;
        let mut rules = Vec::new();
        for g in data["groups"].as_array().context("groups")? {
            for r in g["rules"].as_array().context("rules")? {
                rules.push(LoadedRule {
                    kind: r["type"].as_str().unwrap_or("?").to_owned(),
                    name: r["name"].as_str().unwrap_or("?").to_owned(),
                    query: r["query"]
                        .as_str()
                        .context("a rule has a query")?
                        .to_owned(),
                    health: r["health"].as_str().unwrap_or("?").to_owned(),
                    error: r["lastError"].as_str().unwrap_or("").to_owned(),
                });
            }
        }
        Ok(rules)
    }
}

/// A rule as Prometheus loaded it.
#[derive(Debug, Clone)]
struct LoadedRule {
    kind: String,
    name: String,
    query: String,
    health: String,
    error: String,
}

/// One expression to evaluate: where it comes from, the query, and
/// whether it is an alert's (then an empty answer is retried in
/// [`with_bool`] form).
struct Check {
    what: String,
    query: String,
    alert: bool,
}

/// How an expression answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answered {
    /// With data as written.
    AsWritten,
    /// Empty as written (an alert, healthy), with data in bool form.
    InBoolForm,
}

/// Evaluates `check`: `Ok(Ok(how))` when it returned data, `Ok(Err(why))`
/// when it did not (yet), `Err` when Prometheus refused it (no parse).
async fn evaluate(p: &Prometheus, check: &Check) -> anyhow::Result<Result<Answered, String>> {
    let refused =
        |e: anyhow::Error| anyhow::anyhow!("{}: {e:#}\n  query: {}", check.what, check.query);
    if let Answer::Data = p.query(&check.query).await.map_err(refused)? {
        return Ok(Ok(Answered::AsWritten));
    }
    if !check.alert {
        return Ok(Err(format!(
            "{}: no data\n  query: {}",
            check.what, check.query
        )));
    }
    let inner = with_bool(&check.query);
    let refused = |e: anyhow::Error| anyhow::anyhow!("{}: {e:#}\n  bool form: {inner}", check.what);
    Ok(match p.query(&inner).await.map_err(refused)? {
        Answer::Data => Ok(Answered::InBoolForm),
        Answer::Empty => Err(format!(
            "{}: no data, not even in bool form\n  bool form: {inner}",
            check.what
        )),
    })
}

/// Writes through every node in turn (followers forward to the leader)
/// until `stop`: Raft proposals, log syncs and forwarded calls.
async fn writer(
    files: Vec<tern_node::node::NodeFile>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    let client = Client::new("grpc", tern_testkit::keys::client_key()).await?;
    let peers: Vec<_> = files
        .iter()
        .map(|f| client.peer(f))
        .collect::<Result<_, _>>()?;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        for peer in &peers {
            n += 1;
            let req = pb::MetaPutRequest {
                request_id: format!("prometheus-test-{n}"),
                key: "prometheus-test".to_owned(),
                value: n.to_string(),
                forwarded: false,
            };
            // A write through a killed node fails; that is the fault phase.
            let _ = client
                .call::<_, pb::MetaPutResponse>(peer, methods::CLUSTER_META_PUT, &req)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.close().await;
    Ok(n)
}

/// Refusals on node `file`: a stranger's key calls Status (refused by the
/// access table), and garbage is sent to its gRPC port (a failed TLS
/// handshake).
async fn refusals(file: &tern_node::node::NodeFile) -> anyhow::Result<()> {
    let stranger = Client::new("grpc", STRANGER_KEY).await?;
    let peer = stranger.peer(file)?;
    for _ in 0..3 {
        let r = stranger
            .call::<_, pb::NodeStatus>(&peer, methods::STATUS_GET, &pb::StatusRequest {})
            .await;
        if r.is_ok() {
            bail!("a stranger's key read the status of node {}", file.id);
        }
    }
    stranger.close().await;
    let grpc = file.grpc.as_deref().context("node serves no gRPC")?;
    let addr: SocketAddr = grpc
        .trim_start_matches("https://")
        .parse()
        .with_context(|| format!("gRPC address {grpc}"))?;
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: not-tls\r\n\r\n")
            .await?;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    }
    Ok(())
}

/// Re-evaluates the checks still failing until none is, or
/// [`DATA_BOUND`] passes; fails listing those without data. Returns how
/// many answered only in bool form.
async fn wait_for_data(p: &Prometheus, checks: Vec<Check>) -> anyhow::Result<usize> {
    let deadline = Instant::now() + DATA_BOUND;
    let mut pending = checks;
    let mut in_bool_form = 0;
    loop {
        let mut still = Vec::new();
        let mut why = Vec::new();
        for c in pending {
            match evaluate(p, &c).await? {
                Ok(Answered::AsWritten) => {}
                Ok(Answered::InBoolForm) => in_bool_form += 1,
                Err(w) => {
                    why.push(w);
                    still.push(c);
                }
            }
        }
        if still.is_empty() {
            return Ok(in_bool_form);
        }
        if Instant::now() > deadline {
            bail!(
                "{} expressions returned no data within {DATA_BOUND:?}:\n{}",
                still.len(),
                why.join("\n")
            );
        }
        pending = still;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until Prometheus has loaded every rule of the files and each
/// has been evaluated without error; returns them.
async fn wait_for_rules(p: &Prometheus) -> anyhow::Result<Vec<LoadedRule>> {
    let expected = all_rules();
    let deadline = Instant::now() + DATA_BOUND;
    loop {
        let rules = p.rules().await?;
        let bad: Vec<&LoadedRule> = rules.iter().filter(|r| r.health != "ok").collect();
        if rules.len() == expected.len() && bad.is_empty() {
            let mut names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
            let mut want: Vec<&str> = expected.iter().map(|(_, n)| n.as_str()).collect();
            names.sort_unstable();
            want.sort_unstable();
            assert_eq!(
                names, want,
                "the rules Prometheus loaded are not the files'"
            );
            return Ok(rules);
        }
        if Instant::now() > deadline {
            let bad: Vec<String> = bad
                .iter()
                .map(|r| format!("{} {} ({}): {}", r.kind, r.name, r.health, r.error))
                .collect();
            bail!(
                "Prometheus loaded {} rules of {} in the files; not healthy:\n{}\nlog:\n{}",
                rules.len(),
                expected.len(),
                bad.join("\n"),
                p.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The faults whose series exist only once they happened: refusals on
/// the first node, and a follower killed (fallbacks and failed dials
/// toward it) until Prometheus has seen both, then restarted.
async fn faults(
    cluster: &mut LocalCluster,
    prometheus: &Prometheus,
    files: &[tern_node::node::NodeFile],
) -> anyhow::Result<()> {
    refusals(&files[0]).await?;
    let (leader, _) = cluster.leader().await?;
    let victim = (leader + 1) % files.len();
    cluster.kill(victim).await?;
    let seen = [
        (
            "fallbacks while a follower is down",
            "tern_router_fallbacks_total",
        ),
        (
            "failed dials while a follower is down",
            "tern_transport_connect_failures_total",
        ),
    ]
    .map(|(what, query)| Check {
        what: what.into(),
        query: query.into(),
        alert: false,
    });
    wait_for_data(prometheus, seen.into()).await?;
    cluster.start_node(victim).await?;
    cluster.wait_formed().await?;
    Ok(())
}

/// The checks: every loaded rule's expression (alerts may answer in bool
/// form) and every dashboard query.
fn checks_of(rules: &[LoadedRule], queries: &[(String, String)]) -> Vec<Check> {
    let rules = rules.iter().map(|r| Check {
        what: format!("{} rule {}", r.kind, r.name),
        query: r.query.clone(),
        alert: r.kind == "alerting",
    });
    let panels = queries.iter().map(|(what, query)| Check {
        what: what.clone(),
        query: query.clone(),
        alert: false,
    });
    rules.chain(panels).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_answers_every_rule_and_dashboard_query_from_a_live_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    // Dual mode: every service but Raft prefers iroh, Raft over iroh, with
    // fallback to gRPC: both transports carry node-to-node calls.
    let transport = config::dual(&["all_except_raft"], RaftTransport::Iroh);
    let mut cluster = LocalCluster::start(tern, &dir.path().join("cluster"), 3, &transport)
        .await
        .unwrap();
    let files: Vec<_> = cluster
        .nodes
        .iter()
        .map(|n| n.file.clone().unwrap())
        .collect();
    let targets: Vec<SocketAddr> = files
        .iter()
        .map(|f| f.metrics.expect("the harness node serves /metrics"))
        .collect();
    let prometheus = Prometheus::start(dir.path(), &targets).await.unwrap();

    // Client calls over both transports to every node, and writes.
    let nodes: Vec<_> = files
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, f)| (i + 1, f))
        .collect();
    let spec = |t: &str| TrafficSpec {
        transport: t.to_owned(),
        vm_id: None,
        pause: Duration::from_millis(20),
    };
    let key = tern_testkit::keys::client_key;
    let grpc = Traffic::start(&traffic::spawn_thread, key(), nodes.clone(), spec("grpc")).unwrap();
    let iroh = Traffic::start(&traffic::spawn_thread, key(), nodes, spec("iroh")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = tokio::spawn(writer(files.clone(), stop.clone()));
    grpc.wait_calls(30).await.unwrap();
    iroh.wait_calls(30).await.unwrap();

    faults(&mut cluster, &prometheus, &files).await.unwrap();
    grpc.wait_calls(30).await.unwrap();
    iroh.wait_calls(30).await.unwrap();

    // Every rule loaded and healthy; every rule expression and dashboard
    // query answers with data.
    let rules = wait_for_rules(&prometheus).await.unwrap();
    let queries = dashboard_queries(&dashboard());
    let checks = checks_of(&rules, &queries);
    let total = checks.len();
    let result = wait_for_data(&prometheus, checks).await;
    // The Raft gauges say what a healthy cluster is: one leader, known to
    // every node (a condition, waited for: a scrape may predate it).
    let healthy = [
        "sum(tern_raft_is_leader) == 1",
        "min(tern_raft_has_leader) == 1",
    ]
    .map(|q| Check {
        what: "a healthy cluster".into(),
        query: q.into(),
        alert: false,
    });
    let leadership = wait_for_data(&prometheus, healthy.into()).await;

    stop.store(true, Ordering::SeqCst);
    let written = writes.await.unwrap().unwrap();
    let g = grpc.finish().await.unwrap();
    let i = iroh.finish().await.unwrap();
    cluster.shutdown().await;
    let in_bool_form = result.unwrap();
    leadership.unwrap();
    assert!(written > 0 && !g.is_empty() && !i.is_empty());
    println!(
        "{total} expressions answered ({} rules, {} dashboard queries; {in_bool_form} alerts in bool form); {} gRPC and {} iroh client calls, {written} writes",
        rules.len(),
        queries.len(),
        g.len(),
        i.len()
    );
}
