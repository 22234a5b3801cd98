//! Runs `tern-bench transport --smoke` (two real processes per transport,
//! tiny samples) and checks the part file's shape: every row present, a
//! finite positive value for ours over iroh and gRPC wherever one applies.
//! No timing is asserted: the figures of a smoke run mean nothing.

#![allow(clippy::unwrap_used)] // reason: a test; a failure is the message.

use std::process::Command;

use tern_benches::part::Part;
use tern_benches::twoproc::{ROW_IDS, SOURCE};

#[test]
fn smoke_run_writes_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("parts").join("transport-2proc.json");
    let run = Command::new(env!("CARGO_BIN_EXE_tern-bench"))
        .args(["transport", "--smoke", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "tern-bench failed:\n{stderr}");
    assert!(
        stderr.contains("[transport 1/"),
        "no progress lines:\n{stderr}"
    );
    assert!(run.stdout.is_empty(), "the figures belong in --out only");

    let part: Part = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(part.source, SOURCE);
    assert!(part.quick);
    let ids: Vec<&str> = part.rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ROW_IDS, "row ids or their order changed");
    for row in &part.rows {
        for key in ["iroh", "grpc", "raw_iroh", "raw_grpc"] {
            let value = &row
                .values
                .column(key)
                .unwrap_or_else(|| panic!("{}: no {key}", row.id));
            if key == "iroh" || key == "grpc" {
                let v = value.unwrap_or_else(|| panic!("{}: {key} missing ({})", row.id, row.note));
                assert!(v.is_finite() && v > 0.0, "{}: {key} = {v}", row.id);
            }
        }
        assert!(["ns", "bytes/s", "calls/s", "s", "bytes", "count"].contains(&row.unit.as_str()));
    }
    let dist_ids: Vec<&str> = part.distributions.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        dist_ids,
        ["unary_latency_2proc", "control_during_bulk_latency_2proc"]
    );
    for d in &part.distributions {
        for key in ["iroh", "grpc"] {
            let points = &d.series[key];
            assert_eq!(points.len(), 11, "{}: {key}", d.id);
            assert!(
                points.windows(2).all(|w| w[0].1 <= w[1].1),
                "{}: not monotonic",
                d.id
            );
        }
    }
    let curve = &part.curves[0];
    assert_eq!(curve.id, "calls_vs_concurrency_2proc");
    for key in ["iroh", "grpc"] {
        // A level where calls failed has no point (its failure is in the
        // rows' note); 1 and 64 callers are rows, checked above.
        let xs: Vec<f64> = curve.series[key].iter().map(|p| p.0).collect();
        assert!(xs.contains(&1.0) && xs.contains(&64.0), "{key}: {xs:?}");
        assert!(xs.iter().all(|x| [1.0, 4.0, 16.0, 64.0, 256.0].contains(x)));
    }
}

#[test]
fn a_server_that_cannot_start_is_named_with_its_stderr() {
    // An unreadable key file makes `serve` fail before it is ready.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("bad.key");
    std::fs::write(&key, b"short").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_tern-bench"))
        .args(["serve", "--transport", "grpc", "--key-file"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("32-byte secret key"), "{stderr}");
}

#[test]
fn a_fleet_niceness_out_of_range_is_refused_by_name() {
    for nice in ["20", "-1", "x"] {
        let run = Command::new(env!("CARGO_BIN_EXE_tern-bench"))
            .args(["fleet", "--tern", "/bin/true"])
            .arg(format!("--agents-nice={nice}"))
            .output()
            .unwrap();
        assert!(!run.status.success(), "--agents-nice {nice} was taken");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains("--agents-nice"), "{nice}: {stderr}");
    }
}

#[test]
fn a_child_that_dies_before_ready_is_reported_with_its_stderr() {
    // `sh serve --transport grpc` tries to run a script named `serve`,
    // complains on stderr and exits: a server that dies before it is ready.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt
        .block_on(tern_benches::twoproc::ServerChild::spawn(
            std::path::Path::new("/bin/sh"),
            tern_benches::kind::Kind::Grpc,
        ))
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.starts_with("grpc: "), "{msg}");
    assert!(msg.contains("exited"), "{msg}");
    assert!(
        msg.contains("serve"),
        "the child's stderr is missing: {msg}"
    );
}
