//! The part file of `tern-bench transport`: its rows (ids in [`ROW_IDS`]),
//! latency distributions and calls/s curve, from every transport's
//! [`Measured`].

use super::measure::Maybe;
use super::*;

const SECTION_CONN: &str = "Connections between two processes";
const SECTION_CALLS: &str = "Calls between two processes";
const SECTION_CONTROL: &str = "Control lane under bulk load, two processes";
const SECTION_RESOURCES: &str = "Resources, two processes";

struct RowSpec<'a> {
    id: &'a str,
    section: &'a str,
    name: String,
    unit: &'a str,
    better: Better,
    percentile: Option<u8>,
    note: String,
}

fn row(spec: RowSpec<'_>, values: BTreeMap<String, Option<f64>>) -> Row {
    Row {
        id: spec.id.to_owned(),
        section: spec.section.to_owned(),
        name: spec.name,
        unit: spec.unit.to_owned(),
        better: spec.better,
        values: Values::from_columns(values),
        percentile: spec.percentile.map(f64::from),
        note: spec.note,
        source: String::new(),
    }
}

fn values<'a>(
    results: &'a [(Kind, Measured)],
    f: impl Fn(&'a Measured) -> Option<f64>,
) -> BTreeMap<String, Option<f64>> {
    results
        .iter()
        .map(|(k, m)| (k.value_key().to_owned(), f(m)))
        .collect()
}

/// Values of a figure that may be missing, and a note naming what is
/// missing and why.
fn maybe_values(
    results: &[(Kind, Measured)],
    f: impl Fn(&Measured) -> Maybe<f64>,
) -> (BTreeMap<String, Option<f64>>, String) {
    let mut missing = Vec::new();
    let values = results
        .iter()
        .map(|(k, m)| {
            let v = match f(m) {
                Ok(v) => Some(v),
                Err(why) => {
                    missing.push(format!("{k}: {why}"));
                    None
                }
            };
            (k.value_key().to_owned(), v)
        })
        .collect();
    (values, missing.join("; "))
}

fn join_notes(a: String, b: String) -> String {
    match (a.is_empty(), b.is_empty()) {
        (_, true) => a,
        (true, false) => b,
        (false, false) => format!("{a}; not measured: {b}"),
    }
}

pub(super) fn build_part(results: &[(Kind, Measured)], s: &Settings, quick: bool) -> Part {
    let mut rows = Vec::new();
    let lat_row = |rows: &mut Vec<Row>,
                   id: &str,
                   section: &str,
                   name: &str,
                   p: u8,
                   note: String,
                   pick: &dyn Fn(&Measured) -> &Latencies| {
        rows.push(row(
            RowSpec {
                id,
                section,
                name: format!("{name}, p{p}"),
                unit: "ns",
                better: Better::Lower,
                percentile: Some(p),
                note,
            },
            values(results, |m| pick(m).percentile(f64::from(p))),
        ));
    };

    let conn_note = format!(
        "{} fresh connections, each from a new client identity (iroh, ours and raw: a new \
         endpoint bound outside the timing, so no TLS session to resume; gRPC: a new client, \
         raw gRPC a new channel), timed from dial to the first 64 B call's answer",
        s.conn_samples
    );
    for p in [50, 99] {
        lat_row(
            &mut rows,
            &format!("conn_p{p}_2proc"),
            SECTION_CONN,
            "connection establishment + first call, without 0-RTT",
            p,
            conn_note.clone(),
            &|m| &m.conn,
        );
    }
    let resumed_note = format!(
        "{} new connections from the client that made the other calls (it reached the server \
         before), timed from dial to the first call's answer. Ours: the pooled connections are \
         closed, then a read-only Status/Get; over iroh the endpoint resumes its TLS session and \
         sends the call as 0-RTT early data (only read-only calls go early; see the \
         tern-transport-iroh crate docs), over gRPC a new TLS connection carries it. Raw iroh: \
         the 64 B echo as early data, answered at once by a server with no state to protect. \
         Raw gRPC: a new channel",
        s.conn_samples
    );
    for p in [50, 99] {
        lat_row(
            &mut rows,
            &format!("conn_0rtt_p{p}_2proc"),
            SECTION_CONN,
            "connection establishment + first call, with 0-RTT",
            p,
            resumed_note.clone(),
            &|m| &m.conn_resumed,
        );
    }

    let unary_note = format!(
        "{} sequential calls, 1 caller, each one timed; ours: Raft/AppendEntries echo on the \
         normal lane",
        s.unary_calls
    );
    for p in [50, 99] {
        lat_row(
            &mut rows,
            &format!("unary_p{p}_2proc"),
            SECTION_CALLS,
            "unary call, 64 B payload",
            p,
            unary_note.clone(),
            &|m| &m.unary,
        );
    }
    let curve_failures: String = results
        .iter()
        .flat_map(|(k, m)| m.curve_failures.iter().map(move |f| format!("{k} at {f}")))
        .collect::<Vec<_>>()
        .join("; ");
    for callers in [1usize, 64] {
        rows.push(row(
            RowSpec {
                id: &format!("calls_per_s_c{callers}_2proc"),
                section: SECTION_CALLS,
                name: format!(
                    "unary calls/s, {callers} concurrent caller{}",
                    if callers == 1 { "" } else { "s" }
                ),
                unit: "calls/s",
                better: Better::Higher,
                percentile: None,
                note: join_notes(
                    format!(
                        "64 B echo, callers loop for {:?} on one client",
                        s.curve_duration
                    ),
                    curve_failures.clone(),
                ),
            },
            values(results, |m| {
                m.curve.iter().find(|(c, _)| *c == callers).map(|(_, r)| *r)
            }),
        ));
    }
    for chunk in BULK_CHUNKS {
        let mib = chunk >> 20;
        rows.push(row(
            RowSpec {
                id: &format!("bulk_{mib}mib_2proc"),
                section: SECTION_CALLS,
                name: format!("bulk throughput, {mib} MiB calls"),
                unit: "bytes/s",
                better: Better::Higher,
                percentile: None,
                note: format!(
                    "{} MiB x {} in {mib} MiB calls, {} in flight; ours: Raft/Snapshot on the \
                     bulk lane (protobuf encoding included)",
                    s.bulk_total >> 20,
                    s.bulk_rounds,
                    s.bulk_parallel
                ),
            },
            values(results, |m| {
                m.bulk.iter().find(|(c, _)| *c == chunk).map(|(_, r)| *r)
            }),
        ));
    }

    let idle_note = format!(
        "{} sequential calls, nothing else running; ours: Raft/Vote on the control lane; raw: a \
         small echo (raw iroh) or Vote (raw gRPC) on the one connection",
        s.control_samples
    );
    let rates: Vec<String> = results
        .iter()
        .map(|(k, m)| format!("{k} {:.0} MB/s", m.bulk_during_control / 1e6))
        .collect();
    let bulk_note = format!(
        "{} sequential calls while {} x 1 MiB bulk calls stream without pause to the same \
         server (bulk rate meanwhile, approximate: chunks completed in the window, which is short when the control calls are fast: {}); the raw baselines have no lanes",
        s.control_samples,
        s.bulk_parallel,
        rates.join(", ")
    );
    for p in [50, 99] {
        lat_row(
            &mut rows,
            &format!("control_idle_p{p}_2proc"),
            SECTION_CONTROL,
            "control-lane call, idle",
            p,
            idle_note.clone(),
            &|m| &m.control_idle,
        );
    }
    for p in [50, 99] {
        lat_row(
            &mut rows,
            &format!("control_bulk_p{p}_2proc"),
            SECTION_CONTROL,
            "control-lane call during a bulk transfer",
            p,
            bulk_note.clone(),
            &|m| &m.control_bulk,
        );
    }

    let per = format!(
        "measured over the {} one-caller unary calls, scaled to 100k",
        s.unary_calls
    );
    let cpu_note = format!("user+sys from /proc/<pid>/stat, {per}");
    let rss_note = format!(
        "VmHWM, reset (clear_refs) just before the {} unary calls; the client process also holds \
         the bench itself and what earlier transports left allocated",
        s.unary_calls
    );
    let fd_note = "/proc/<pid>/fd counted after the unary calls, connection up (the client also \
                   holds its pipes to the server child)"
        .to_owned();
    type Pick = fn(&Measured) -> Maybe<f64>;
    let resources: [(&str, &str, &str, &String, Pick); 6] = [
        (
            "cpu_client_per_100k_2proc",
            "CPU seconds per 100k unary calls, client process",
            "s",
            &cpu_note,
            |m| m.cpu_client.clone(),
        ),
        (
            "cpu_server_per_100k_2proc",
            "CPU seconds per 100k unary calls, server process",
            "s",
            &cpu_note,
            |m| m.cpu_server.clone(),
        ),
        (
            "peak_rss_client_2proc",
            "peak memory during the unary calls, client process",
            "bytes",
            &rss_note,
            |m| m.rss_client.clone().map(|b| b as f64),
        ),
        (
            "peak_rss_server_2proc",
            "peak memory during the unary calls, server process",
            "bytes",
            &rss_note,
            |m| m.rss_server.clone().map(|b| b as f64),
        ),
        (
            "fds_client_2proc",
            "open file descriptors, client process",
            "count",
            &fd_note,
            |m| m.fds_client.clone().map(|n| n as f64),
        ),
        (
            "fds_server_2proc",
            "open file descriptors, server process",
            "count",
            &fd_note,
            |m| m.fds_server.clone().map(|n| n as f64),
        ),
    ];
    for (id, name, unit, note, pick) in resources {
        let (vals, missing) = maybe_values(results, pick);
        rows.push(row(
            RowSpec {
                id,
                section: SECTION_RESOURCES,
                name: name.to_owned(),
                unit,
                better: Better::Lower,
                percentile: None,
                note: join_notes(note.clone(), missing),
            },
            vals,
        ));
    }

    let series = |pick: &dyn Fn(&Measured) -> &Latencies| -> Series {
        results
            .iter()
            .map(|(k, m)| {
                let points = pick(m).chart().into_iter().map(|[q, v]| (q, v));
                (k.value_key().to_owned(), points.collect())
            })
            .collect()
    };
    let distributions = vec![
        Distribution {
            id: "unary_latency_2proc".to_owned(),
            title: "Unary call latency, 64 B, 2 processes".to_owned(),
            unit: "ns".to_owned(),
            series: series(&|m| &m.unary),
        },
        Distribution {
            id: "control_during_bulk_latency_2proc".to_owned(),
            title: "Control-lane latency during a bulk transfer, 2 processes".to_owned(),
            unit: "ns".to_owned(),
            series: series(&|m| &m.control_bulk),
        },
    ];
    let curves = vec![Curve {
        id: "calls_vs_concurrency_2proc".to_owned(),
        title: "Calls/s vs concurrent callers, 2 processes".to_owned(),
        x: "concurrent callers".to_owned(),
        y: "calls/s".to_owned(),
        series: results
            .iter()
            .map(|(k, m)| {
                (
                    k.value_key().to_owned(),
                    m.curve.iter().map(|&(c, r)| (c as f64, r)).collect(),
                )
            })
            .collect(),
    }];
    Part {
        source: SOURCE.to_owned(),
        profile: build_profile().to_owned(),
        quick,
        rows,
        distributions,
        curves,
    }
}

/// Every row id the part holds, in order (for tests and the report).
pub const ROW_IDS: [&str; 21] = [
    "conn_p50_2proc",
    "conn_p99_2proc",
    "conn_0rtt_p50_2proc",
    "conn_0rtt_p99_2proc",
    "unary_p50_2proc",
    "unary_p99_2proc",
    "calls_per_s_c1_2proc",
    "calls_per_s_c64_2proc",
    "bulk_1mib_2proc",
    "bulk_4mib_2proc",
    "bulk_8mib_2proc",
    "control_idle_p50_2proc",
    "control_idle_p99_2proc",
    "control_bulk_p50_2proc",
    "control_bulk_p99_2proc",
    "cpu_client_per_100k_2proc",
    "cpu_server_per_100k_2proc",
    "peak_rss_client_2proc",
    "peak_rss_server_2proc",
    "fds_client_2proc",
    "fds_server_2proc",
];
