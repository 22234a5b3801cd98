//! The exposition a node serves is valid Prometheus text by the reference
//! tool: `promtool check metrics` must pass with no lint complaint, for
//! every metric Tern defines, served over real HTTP and over the RPC.

#![allow(clippy::unwrap_used)] // reason: a test fails loudly on any unexpected error.

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::metric_names::{self as names, MetricKind};
use tern_protocol::{PeerId, Priority, RequestContext, TransportKind, pb};
use tern_services::monitoring::Monitoring;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn record_every_metric() {
    // Process figures are read from /proc at render time, never recorded.
    for def in names::ALL
        .iter()
        .filter(|d| !d.name.starts_with("process_"))
    {
        match def.kind {
            MetricKind::Counter => metrics::counter!(def.name, "transport" => "iroh").increment(3),
            MetricKind::Gauge => metrics::gauge!(def.name, "transport" => "grpc").set(2.0),
            MetricKind::Histogram => {
                metrics::histogram!(def.name, "transport" => "iroh", "service" => "health", "method" => "check")
                    .record(0.0007)
            }
        }
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

fn promtool_check(text: &str) -> (bool, String) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed for this test: `cargo xtask prereqs` installs it (Debian package `prometheus`)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && said.trim().is_empty(), said)
}

#[tokio::test]
async fn exposition_passes_promtool_over_http_and_rpc() {
    let monitoring = Monitoring::install().unwrap();
    record_every_metric();

    let listener = Monitoring::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(monitoring.clone().serve_http(listener, async {
        let _ = stopped.await;
    }));

    let response = tokio::time::timeout(Duration::from_secs(10), http_get(addr, "/metrics"))
        .await
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for def in names::ALL {
        assert!(
            body.contains(&format!("# HELP {} ", def.name)),
            "{} has no HELP",
            def.name
        );
    }
    let (ok, said) = promtool_check(body);
    assert!(
        ok,
        "promtool check metrics complained:\n{said}\n--- exposition ---\n{body}"
    );

    let missing = tokio::time::timeout(Duration::from_secs(10), http_get(addr, "/nope"))
        .await
        .unwrap();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    let ctx = RequestContext {
        peer: PeerId::from_bytes([1; 32]),
        transport: TransportKind::Iroh,
        priority: Priority::Normal,
        deadline: None,
    };
    let handler = monitoring.handler();
    let reply = handler
        .handle(
            ctx.clone(),
            methods::MONITORING_METRICS,
            pb::MetricsRequest {}.encode_to_vec().into(),
        )
        .await
        .unwrap();
    let text = pb::MetricsResponse::decode(reply).unwrap().prometheus_text;
    assert!(text.contains("tern_transport_calls_total"));
    let (ok, said) = promtool_check(&text);
    assert!(ok, "RPC exposition: {said}");

    let bad = handler
        .handle(
            ctx,
            methods::MONITORING_METRICS,
            Bytes::from_static(&[0xff, 0xff, 0xff]),
        )
        .await
        .unwrap_err();
    assert_eq!(bad.code, tern_protocol::Code::InvalidArgument);

    // A slow client (a request head a few bytes at a time, then nothing)
    // holds no place for long: it is closed after the header-read bound,
    // and scrapes go on meanwhile.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /met").await.unwrap();
    let opened = std::time::Instant::now();
    let scrape = tokio::time::timeout(Duration::from_secs(10), http_get(addr, "/metrics"))
        .await
        .unwrap();
    assert!(
        scrape.starts_with("HTTP/1.1 200"),
        "a scrape during the slow client"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        tern_services::monitoring::METRICS_HEADER_READ_TIMEOUT + Duration::from_secs(10),
        slow.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the slow client was never closed");
    assert!(opened.elapsed() >= tern_services::monitoring::METRICS_HEADER_READ_TIMEOUT);

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
}
