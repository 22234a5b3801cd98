//! Health, Status, VM and Monitoring service logic, with no transport code.
//!
//! Services implement [`tern_protocol::Handler`]; the node registers them in
//! a [`tern_protocol::Dispatcher`] that both transports serve, so no service
//! knows which transport carried a call.
//!
//! # Layout
//!
//! - [`monitoring`]: the process-wide metrics registry, its Prometheus text
//!   exposition over HTTP (`/metrics`) and the Monitoring RPC, and process
//!   CPU, memory, thread and file-descriptor figures read from `/proc`.
//! - [`runtime`]: the VM runtimes a node's reconciler drives — the
//!   [`runtime::Runtime`] trait, spec validation, the `process` runtime (a
//!   supervised command) and the `microvm` runtime (QEMU's `microvm` machine
//!   controlled over QMP).
//!
//! Not built yet: Health, Status and VM (the services issue adds them; the
//! VM service's reconciler will drive [`runtime`]).

pub mod monitoring;
pub mod runtime;
