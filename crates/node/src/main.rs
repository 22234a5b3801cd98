//! The `tern` binary.
//!
//! Until the node itself exists (the dual router and node issue), `tern demo`
//! walks through the wire protocol: it builds a request, shows its 24-byte
//! header field by field, decodes it back and shows how malformed input is
//! refused. It starts no cluster and says so.

use std::process::ExitCode;

use bytes::{Buf, BytesMut};
use clap::{Parser, Subcommand};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::frame::{self, Decoded, Header, Limits};
use tern_protocol::{FrameKind, Priority, pb};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Tern: microVMs across machines, over gRPC and iroh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the wire protocol at work (the local cluster demo comes with the node).
    Demo,
    /// Check a node configuration file and print the policy it sets.
    CheckConfig {
        /// The file to check.
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig { config } => match tern_node::config::Config::load(&config) {
            Ok(checked) => {
                println!("{}: ok", config.display());
                let c = &checked.config;
                let show = |l: tern_node::config::Listen| {
                    l.addr()
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "off".into())
                };
                println!("  data_dir  {}", c.data_dir.display());
                println!("  grpc      {}", show(c.listen.grpc));
                println!("  iroh      {}", show(c.listen.iroh));
                println!("  metrics   {}", show(c.listen.metrics));
                println!("  runtime   {:?}", c.vm.runtime);
                println!("  join via  {} member(s)", checked.seeds.len());
                println!("  policy    {:?}", checked.policy.to_config());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Demo => match demo() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn demo() -> anyhow::Result<()> {
    println!("tern {}: wire protocol demo", env!("CARGO_PKG_VERSION"));
    println!("(the node is not built yet: this shows the frame format every iroh call uses)\n");

    let request = pb::CreateVmRequest {
        request_id: "demo-1".into(),
        spec: Some(pb::VmSpec {
            name: "web-1".into(),
            vcpus: 2,
            memory_mib: 512,
            runtime: "process".into(),
            command: vec!["sleep".into(), "3600".into()],
            ..Default::default()
        }),
    };
    let method = methods::VM_CREATE;
    let header = Header {
        kind: FrameKind::Request,
        priority: method.priority,
        idempotent: method.idempotent,
        service: method.service,
        method: method.id,
        request_id: 42,
        payload_len: 0,
        deadline_ms: 5_000,
    };
    let limits = Limits::default();
    let frame = frame::Frame::new(header, request.encode_to_vec().into(), limits)?;

    let mut wire = BytesMut::new();
    let mut encoded = frame.encode();
    while encoded.has_remaining() {
        let chunk = encoded.chunk();
        wire.extend_from_slice(chunk);
        let n = chunk.len();
        encoded.advance(n);
    }
    println!(
        "request {} ({}), {} bytes on the wire:",
        method.grpc_path(),
        method.label(),
        wire.len()
    );
    let h = &wire[..frame::HEADER_LEN];
    println!("  version      {:02x}", h[0]);
    println!("  kind         {:02x}             request", h[1]);
    println!(
        "  flags        {:02x} {:02x}          priority {}, idempotent {}",
        h[2],
        h[3],
        method.priority.as_str(),
        method.idempotent
    );
    println!(
        "  service      {:02x} {:02x}          {}",
        h[4], h[5], method.service
    );
    println!(
        "  method       {:02x} {:02x}          {}",
        h[6], h[7], method.name
    );
    println!("  request id   {}", hex(&h[8..16]));
    println!(
        "  payload len  {}    {} bytes",
        hex(&h[16..20]),
        frame.payload.len()
    );
    println!("  deadline ms  {}    5000 ms", hex(&h[20..24]));

    match frame::decode(&mut wire, limits)? {
        Decoded::Frame(back) => {
            let decoded = pb::CreateVmRequest::decode(back.payload.clone())?;
            println!(
                "\ndecoded back: request {} for vm {:?}",
                back.header.request_id,
                decoded.spec.map(|s| s.name)
            );
        }
        Decoded::Incomplete { needed } => {
            anyhow::bail!("demo frame incomplete, {needed} bytes short")
        }
    }

    let mut oversized = header;
    oversized.payload_len = limits.max_payload + 1;
    let mut bad = BytesMut::from(&oversized.encode()[..]);
    println!(
        "an oversized header is refused before its payload is read: {}",
        frame::decode(&mut bad, limits)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    let mut garbage = BytesMut::from(&[9u8; 24][..]);
    println!(
        "garbage is a typed error, not a panic: {}",
        frame::decode(&mut garbage, limits)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    let _ = Priority::Control;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
