//! Shared support for the services' tests: a guard that kills every
//! workload a test's runtimes started (also when the test fails), bounded
//! polling, an in-process Raft and fake consensus (transports: `tern-test-transports`).

#![allow(dead_code)] // reason: each test binary uses a different part of the shared support.

pub(crate) mod consensus;

use std::future::Future;
use std::time::Duration;

/// Polls `check` every 20 ms until it returns `Some`, failing the test with
/// `what` after `bound`.
pub(crate) async fn wait_for<T, F, Fut>(bound: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let poll = async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    match tokio::time::timeout(bound, poll).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {bound:?} waiting for {what}"),
    }
}
