//! The transports `tern-bench` measures.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One transport under measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Kind {
    /// Our iroh transport (`tern_transport_iroh::IrohTransport`).
    Iroh,
    /// Our gRPC transport (`tern_transport_grpc::GrpcTransport`).
    Grpc,
    /// A bare iroh endpoint echoing on bi-streams: no framing, no lanes.
    RawIroh,
    /// A bare tonic service: no caller proofs, no handler, no pool.
    RawGrpc,
}

impl Kind {
    /// Every transport, in measurement order.
    pub const ALL: [Kind; 4] = [Kind::Iroh, Kind::Grpc, Kind::RawIroh, Kind::RawGrpc];

    /// The name on the command line (`raw-iroh`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Kind::Iroh => "iroh",
            Kind::Grpc => "grpc",
            Kind::RawIroh => "raw-iroh",
            Kind::RawGrpc => "raw-grpc",
        }
    }

    /// The key of its values in the part file (`raw_iroh`).
    pub fn value_key(self) -> &'static str {
        match self {
            Kind::Iroh => "iroh",
            Kind::Grpc => "grpc",
            Kind::RawIroh => "raw_iroh",
            Kind::RawGrpc => "raw_grpc",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}
