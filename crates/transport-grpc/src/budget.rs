//! Request bytes in flight per peer: a budget each proven node id draws on
//! as its request bodies are read, and gives back when the call is done.
//!
//! The body of every authenticated Tern request is wrapped in a
//! `BudgetBody`: each DATA frame takes its size from the peer's budget
//! before it is handed on to the decoder; a frame that does not fit ends
//! the request with `ResourceExhausted` (nothing more of it is read). The
//! bytes stay taken until the handler has answered (`HeldBytes` travels
//! with the request and is dropped after dispatch), since the decoded
//! message lives as long as the call.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tern_protocol::PeerId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Request bytes one peer id may have in flight on a server (read and not
/// yet answered), over all its connections: four maximal messages.
pub const MAX_IN_FLIGHT_BYTES_PER_PEER: usize =
    4 * tern_protocol::frame::DEFAULT_MAX_PAYLOAD as usize;

/// Most peers whose budgets are remembered; entries of peers with nothing
/// in flight are dropped when it is reached.
const BUDGET_REGISTRY_PRUNE_AT: usize = 4096;

/// Each peer's budget.
#[derive(Debug)]
pub(crate) struct Budgets {
    per_peer: usize,
    budgets: Mutex<HashMap<PeerId, Weak<Semaphore>>>,
}

impl Budgets {
    pub(crate) fn new(per_peer: usize) -> Budgets {
        Budgets {
            per_peer,
            budgets: Mutex::new(HashMap::new()),
        }
    }

    /// The budget of `peer` (shared by all its requests).
    pub(crate) fn of(&self, peer: PeerId) -> Arc<Semaphore> {
        let Ok(mut budgets) = self.budgets.lock() else {
            return Arc::new(Semaphore::new(self.per_peer));
        };
        if let Some(budget) = budgets.get(&peer).and_then(Weak::upgrade) {
            return budget;
        }
        if budgets.len() >= BUDGET_REGISTRY_PRUNE_AT {
            budgets.retain(|_, b| b.strong_count() > 0);
        }
        let budget = Arc::new(Semaphore::new(self.per_peer));
        budgets.insert(peer, Arc::downgrade(&budget));
        budget
    }
}

/// The bytes one request holds; dropped when its call is done.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeldBytes(Arc<Mutex<Vec<OwnedSemaphorePermit>>>);

/// A request body that draws on its peer's budget.
pub(crate) struct BudgetBody<B> {
    inner: B,
    budget: Arc<Semaphore>,
    held: HeldBytes,
    limit: usize,
}

impl<B> BudgetBody<B> {
    pub(crate) fn new(
        inner: B,
        budget: Arc<Semaphore>,
        limit: usize,
    ) -> (BudgetBody<B>, HeldBytes) {
        let held = HeldBytes::default();
        (
            BudgetBody {
                inner,
                budget,
                held: held.clone(),
                limit,
            },
            held,
        )
    }
}

impl<B> Body for BudgetBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
            match self.budget.clone().try_acquire_many_owned(n) {
                Ok(permit) => {
                    if let Ok(mut held) = self.held.0.lock() {
                        held.push(permit);
                    }
                }
                Err(_) => {
                    let status = tonic::Status::resource_exhausted(format!(
                        "this peer has too many request bytes in flight on this node (limit {} bytes); retry when earlier calls are answered",
                        self.limit
                    ));
                    return Poll::Ready(Some(Err(Box::new(status))));
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn bytes_are_held_until_the_call_is_done_and_refused_past_the_budget() {
        let budgets = Budgets::new(10);
        let peer = PeerId::from_bytes([1; 32]);
        let budget = budgets.of(peer);
        let (body, held) = BudgetBody::new(
            http_body_util::Full::new(Bytes::from_static(b"0123456")),
            budget.clone(),
            10,
        );
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 7);
        assert_eq!(budget.available_permits(), 3, "held while the call runs");
        // A second request of the same peer does not fit.
        let (second, _held2) = BudgetBody::new(
            http_body_util::Full::new(Bytes::from_static(b"01234")),
            budgets.of(peer),
            10,
        );
        let e = second.collect().await.unwrap_err();
        let status = e.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        drop(held);
        assert_eq!(budget.available_permits(), 10, "given back when done");
        // Another peer has its own budget.
        assert_eq!(
            budgets.of(PeerId::from_bytes([2; 32])).available_permits(),
            10
        );
    }
}
