//! A small client for QEMU's Machine Protocol (QMP) over a unix socket.
//!
//! QMP is newline-delimited JSON. On connect the server sends a greeting
//! (`{"QMP": {...}}`); the client must send `qmp_capabilities` before any
//! other command. Each command (`{"execute": ..., "arguments": ...,
//! "id": ...}`) gets one reply, `{"return": ...}` or `{"error": {"class",
//! "desc"}}`, carrying the same `id`; asynchronous events (`{"event": ...}`)
//! may arrive in between and are skipped.
//!
//! Every read is bounded by [`QMP_TIMEOUT`] and every line by
//! [`MAX_QMP_LINE`], so a wedged or hostile QEMU cannot hang or exhaust the
//! node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Bound on connecting and on each command's reply. QEMU answers QMP from
/// its main loop within milliseconds, even under TCG; seconds mean it is
/// wedged.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest QMP line accepted. Replies to the commands used here are well
/// under a kilobyte; the bound keeps a misbehaving peer from growing an
/// unbounded buffer.
pub const MAX_QMP_LINE: usize = 1024 * 1024;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("cannot connect to QMP socket {path:?}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU did not answer within [`QMP_TIMEOUT`].
    #[error("QMP {what} timed out after {QMP_TIMEOUT:?}")]
    Timeout {
        /// What was awaited.
        what: String,
    },
    /// QEMU sent something that is not QMP, or closed the connection.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU rejected a command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command sent.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// The answer to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStatus {
    /// Whether the guest's vCPUs are running.
    pub running: bool,
    /// QEMU's run state: `running`, `paused`, `shutdown`, `prelaunch`, ...
    pub status: String,
}

/// A QMP session, capabilities negotiated.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    greeting: Value,
    next_id: u64,
}

impl QmpClient {
    /// Connects to the socket at `path`, reads the greeting and negotiates
    /// capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(QMP_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                what: "connect".into(),
            })?
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        let mut client = QmpClient {
            reader: BufReader::new(read),
            writer,
            greeting: Value::Null,
            next_id: 1,
        };
        let greeting = client.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        client.greeting = greeting;
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The greeting QEMU sent (its version and capabilities).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs `command` with optional `arguments` and returns its `return`
    /// value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let reply = self.read_message(command).await?;
            if reply.get("event").is_some() {
                tracing::debug!(%reply, "QMP event");
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(QmpError::Protocol(format!(
                    "reply to {command} (id {id}) has another id: {reply}"
                )));
            }
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                let field = |name: &str| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply: {reply}")));
        }
    }

    /// `query-status`: whether the guest runs.
    pub async fn query_status(&mut self) -> Result<RunStatus, QmpError> {
        let value = self.execute("query-status", None).await?;
        let running = value.get("running").and_then(Value::as_bool);
        let status = value.get("status").and_then(Value::as_str);
        match (running, status) {
            (Some(running), Some(status)) => Ok(RunStatus {
                running,
                status: status.to_owned(),
            }),
            _ => Err(QmpError::Protocol(format!(
                "malformed query-status reply: {value}"
            ))),
        }
    }

    /// `system_powerdown`: presses the guest's (ACPI) power button. The
    /// guest decides whether and when to power off.
    pub async fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `quit`: QEMU exits at once. QEMU may close the socket before its
    /// reply arrives; that counts as success.
    pub async fn quit(mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) => Ok(()),
            Err(QmpError::Protocol(msg)) if msg.contains("closed") => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads one JSON message, skipping blank lines.
    async fn read_message(&mut self, what: &str) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let mut limited = (&mut self.reader).take(MAX_QMP_LINE as u64);
            let n = tokio::time::timeout(QMP_TIMEOUT, limited.read_until(b'\n', &mut line))
                .await
                .map_err(|_| QmpError::Timeout {
                    what: what.to_owned(),
                })??;
            if n == 0 {
                return Err(QmpError::Protocol(format!(
                    "connection closed while awaiting {what}"
                )));
            }
            if !line.ends_with(b"\n") && n >= MAX_QMP_LINE {
                return Err(QmpError::Protocol(format!(
                    "line longer than {MAX_QMP_LINE} bytes"
                )));
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line).map_err(|e| {
                QmpError::Protocol(format!(
                    "not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&line)
                ))
            });
        }
    }
}
