//! [`CliError`]: why a CLI command failed, by kind, with a message that
//! says what to do next. The kind decides the exit code (a wrong command
//! line is 2, everything else 1), so scripts can tell a typo from an
//! outage.

/// Why a CLI command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is wrong (an argument, an option's value).
    #[error("{0}")]
    Argument(String),
    /// A local file (key, config, node file) could not be read, written
    /// or used.
    #[error("{0}")]
    File(String),
    /// The CLI could not start (its runtime, its iroh endpoint) or reach
    /// the transport asked for.
    #[error("{0}")]
    Setup(String),
    /// A call to the node failed; the message names the method, what the
    /// node said and what to do.
    #[error("{method}: {detail}{hint}")]
    Call {
        /// The method, as `service/method`.
        method: String,
        /// The node's answer or the transport's error.
        detail: String,
        /// What to do next (may be empty).
        hint: &'static str,
    },
    /// The node is not in the state the command needs (no leader, a
    /// policy not applied, a process to signal).
    #[error("{0}")]
    Node(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Argument(_) => 2,
            _ => 1,
        }
    }
}
