//! `tern-bench transport`: the measurements between two processes, and the
//! server child processes they run against.
//!
//! For each transport ([`Kind::ALL`]) the client starts `tern-bench serve`
//! as a child ([`ServerChild`]), connects ([`Driver`]) and measures, in
//! this order:
//!
//! 1. unary calls, 64 B, one caller, every latency recorded; around them
//!    the CPU time of both processes, their peak memory (reset just
//!    before) and, after, their open file descriptors;
//! 2. connection establishment: a fresh connection and its first call;
//! 3. calls/s at 1, 4, 16, 64 and 256 concurrent callers;
//! 4. bulk throughput: 64 MiB in 1, 4 and 8 MiB chunks (8 MiB is the
//!    largest power of two that fits the protocol's default 16 MiB frame
//!    with its header), a few in flight;
//! 5. control-lane latency, idle and while a bulk transfer runs on the
//!    same pair of processes.
//!
//! Every call has a deadline and every phase a bound, so a hung server
//! fails the run with the transport named and the tail of the server's
//! stderr, instead of hanging it. Children are killed when the client
//! exits, on success or error (`kill_on_drop`, and they stop on their own
//! when their stdin closes).
//!
//! # Layout
//!
//! - this module: what a run does ([`Settings`]) and its progress lines;
//! - `server`: the server child ([`ServerChild`]): start, ready line,
//!   stderr tail, stop;
//! - `measure`: the measurements ([`Measured`]) and the run ([`run`]);
//! - `part`: the part file's rows, distributions and curves ([`ROW_IDS`]).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::client::Driver;
use crate::kind::Kind;
use crate::procfs;
use crate::serve::Ready;
use crate::stats::Latencies;
use tern_bench_part::{Better, Curve, Distribution, Part, Row, Series, Values, build_profile};

mod measure;
mod part;
mod server;

pub use measure::{Measured, load, run};
pub use part::ROW_IDS;
pub use server::ServerChild;

/// The `source` of the part file.
pub const SOURCE: &str = "transport-2proc";
/// Payload of the unary and connection probes.
pub const UNARY_PAYLOAD: usize = 64;
/// Bytes of one bulk transfer.
pub const BULK_TOTAL: usize = 64 << 20;
/// Chunk sizes of the bulk rows.
pub const BULK_CHUNKS: [usize; 3] = [1 << 20, 4 << 20, 8 << 20];
/// Concurrent callers of the calls/s curve.
pub const CURVE_LEVELS: [usize; 5] = [1, 4, 16, 64, 256];
/// Lines of a child's stderr kept for error messages.
const STDERR_TAIL: usize = 40;
/// Longest a server may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a server may take to stop once its stdin closed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on any one measurement phase.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

/// How much each measurement does.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Fresh connections timed.
    pub conn_samples: usize,
    /// Unary calls timed (one caller); also the CPU/memory sample.
    pub unary_calls: usize,
    /// How long each level of the calls/s curve runs.
    pub curve_duration: Duration,
    /// Bytes per bulk transfer.
    pub bulk_total: usize,
    /// Transfers per chunk size.
    pub bulk_rounds: usize,
    /// Bulk chunks in flight at once.
    pub bulk_parallel: usize,
    /// Control calls timed, idle and again during bulk.
    pub control_samples: usize,
}

impl Settings {
    /// The full run (several minutes).
    pub fn full() -> Settings {
        Settings {
            conn_samples: 200,
            unary_calls: 100_000,
            curve_duration: Duration::from_secs(3),
            bulk_total: BULK_TOTAL,
            bulk_rounds: 3,
            bulk_parallel: 4,
            control_samples: 2_000,
        }
    }

    /// `--quick`: every figure, smaller samples (a minute or two).
    pub fn quick() -> Settings {
        Settings {
            conn_samples: 30,
            unary_calls: 10_000,
            curve_duration: Duration::from_millis(700),
            bulk_total: BULK_TOTAL,
            bulk_rounds: 1,
            bulk_parallel: 4,
            control_samples: 300,
        }
    }

    /// `--smoke` (tests): every figure from tiny samples; the numbers mean
    /// little, the pipeline is what is checked.
    pub fn smoke() -> Settings {
        Settings {
            conn_samples: 3,
            unary_calls: 200,
            curve_duration: Duration::from_millis(150),
            bulk_total: 8 << 20,
            bulk_rounds: 1,
            bulk_parallel: 4,
            control_samples: 20,
        }
    }
}

/// What `tern-bench load` runs alone (see [`load`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Load {
    /// Unary calls of [`UNARY_PAYLOAD`] bytes, one caller, back to back.
    Unary,
    /// 1 MiB bulk chunks, [`Settings::full`]'s number in flight.
    Bulk,
    /// Control calls one after another while 1 MiB bulk chunks stream.
    ControlUnderBulk,
}

/// Progress lines on stderr: `[transport 3/28] grpc unary 64 B: ...`.
#[derive(Debug)]
struct Progress {
    step: usize,
    total: usize,
}

impl Progress {
    fn step(&mut self, kind: Kind, what: &str) {
        self.step += 1;
        self.say(kind, what);
    }

    fn say(&self, kind: Kind, what: &str) {
        eprintln!("[transport {}/{}] {kind} {what}", self.step, self.total);
    }
}

/// Steps [`Progress`] counts per transport.
const STEPS_PER_TRANSPORT: usize = 8;
