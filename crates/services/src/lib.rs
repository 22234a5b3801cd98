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
//!
//! Not built yet: Health, Status and VM (the services issue adds them).

pub mod monitoring;
