//! A bounded scrape of `/metrics`, and the one Prometheus text parser
//! ([`Metrics`], re-exported from `tern_protocol::exposition`, where the
//! product's rollout gates use it too).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use tern_protocol::exposition::{Metrics, Sample, by_label, deltas, quantile_of, sum_all};

/// How long one `/metrics` scrape may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest `/metrics` answer read; a node's is a few hundred KiB.
pub const MAX_SCRAPE_BYTES: u64 = 8 * 1024 * 1024;

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// Connecting, writing or reading failed.
    #[error("scraping {addr}: {source}")]
    Io {
        /// The address scraped.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// No answer within [`SCRAPE_TIMEOUT`].
    #[error("scrape of {addr} timed out")]
    TimedOut {
        /// The address scraped.
        addr: SocketAddr,
    },
}

/// Scrapes `/metrics` at `addr` (HTTP/1.0, at most [`MAX_SCRAPE_BYTES`],
/// within [`SCRAPE_TIMEOUT`]); returns the body.
pub async fn scrape(addr: SocketAddr) -> Result<String, ScrapeError> {
    let io = |source| ScrapeError::Io { addr, source };
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: tern\r\n\r\n")
            .await
            .map_err(io)?;
        let mut body = Vec::new();
        s.take(MAX_SCRAPE_BYTES)
            .read_to_end(&mut body)
            .await
            .map_err(io)?;
        let text = String::from_utf8_lossy(&body).into_owned();
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or(text))
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, work)
        .await
        .map_err(|_| ScrapeError::TimedOut { addr })?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

    use super::*;

    #[tokio::test]
    async fn scrapes_a_body_over_http() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 64];
            let _ = s.read(&mut req).await.unwrap();
            s.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nup 1\n")
                .await
                .unwrap();
        });
        let text = scrape(addr).await.unwrap();
        assert_eq!(Metrics::parse(&text).sum("up", &[]), 1.0);
    }
}
