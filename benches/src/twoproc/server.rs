//! The server child: `tern-bench serve` started per transport, its ready
//! line, the tail of its stderr for error messages, and its stop.

use super::*;

/// A running `tern-bench serve` child.
#[derive(Debug)]
pub struct ServerChild {
    kind: Kind,
    child: Child,
    stdin: Option<ChildStdin>,
    _stdout: ChildStdout,
    tail: Arc<Mutex<VecDeque<String>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// What the server announced.
    pub ready: Ready,
}

impl ServerChild {
    /// Starts `exe serve --transport KIND` and waits for its ready line.
    pub async fn spawn(exe: &Path, kind: Kind) -> anyhow::Result<ServerChild> {
        let mut child = Command::new(exe)
            .args(["serve", "--transport", kind.cli_name()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("{kind}: starting the server {}", exe.display()))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let reader = child.stderr.take().map(|stderr| {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == STDERR_TAIL {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            })
        });
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .context("the server child has no stdout pipe")?;
        let mut partial = ServerStart {
            kind,
            child,
            tail,
            reader,
        };
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        let read = tokio::time::timeout(READY_TIMEOUT, lines.read_line(&mut line)).await;
        let ready = match read {
            Err(_) => {
                return Err(partial
                    .explain(anyhow!(
                        "the server printed no ready line within {READY_TIMEOUT:?}"
                    ))
                    .await);
            }
            Ok(Err(e)) => return Err(partial.explain(anyhow!("reading its stdout: {e}")).await),
            Ok(Ok(0)) => {
                return Err(partial
                    .explain(anyhow!("the server closed stdout before it was ready"))
                    .await);
            }
            Ok(Ok(_)) => match serde_json::from_str::<Ready>(line.trim()) {
                Ok(r) => r,
                Err(e) => {
                    return Err(partial
                        .explain(anyhow!(
                            "its ready line {:?} is not valid: {e}",
                            line.trim()
                        ))
                        .await);
                }
            },
        };
        if ready.transport != kind {
            return Err(partial
                .explain(anyhow!("it serves {} instead", ready.transport))
                .await);
        }
        let ServerStart {
            child,
            tail,
            reader,
            ..
        } = partial;
        Ok(ServerChild {
            kind,
            child,
            stdin,
            _stdout: lines.into_inner(),
            tail,
            reader,
            ready,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.ready.pid
    }

    /// Adds to `err` the transport, whether the server is still running,
    /// and the tail of its stderr.
    pub async fn explain(&mut self, err: anyhow::Error) -> anyhow::Error {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("the server exited ({status})"),
            Ok(None) => "the server is still running".to_owned(),
            Err(e) => format!("the server's state is unknown ({e})"),
        };
        let tail = tail_text(&self.tail);
        anyhow!(
            "{}: {err:#}\n{status}; its stderr ends with:\n{tail}",
            self.kind
        )
    }

    /// Stops the server: closes its stdin, waits for it to exit, kills it
    /// if it does not within `STOP_TIMEOUT`. Fails if it exited with an
    /// error.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(self
                .explain(anyhow!("the server stopped with {status}"))
                .await),
            Ok(Err(e)) => Err(self.explain(anyhow!("waiting for the server: {e}")).await),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(self
                    .explain(anyhow!(
                        "the server did not stop within {STOP_TIMEOUT:?} of its stdin closing; killed"
                    ))
                    .await)
            }
        }
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

/// A child that has not announced itself yet.
struct ServerStart {
    kind: Kind,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl ServerStart {
    /// Kills the child, lets its stderr drain, and names both in `err`.
    async fn explain(&mut self, err: anyhow::Error) -> anyhow::Error {
        let status = match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => format!("the server exited ({status})"),
            _ => {
                let _ = self.child.kill().await;
                "the server was killed".to_owned()
            }
        };
        if let Some(r) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
        anyhow!(
            "{}: {err:#}\n{status}; its stderr ends with:\n{}",
            self.kind,
            tail_text(&self.tail)
        )
    }
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let lines: Vec<String> = tail
        .lock()
        .map(|t| t.iter().cloned().collect())
        .unwrap_or_default();
    if lines.is_empty() {
        "  (nothing)".to_owned()
    } else {
        lines
            .iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
