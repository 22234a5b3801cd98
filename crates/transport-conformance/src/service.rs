//! The handler every conformance check serves.
//!
//! It answers with real protobuf messages of the schemas (the gRPC transport
//! is typed and would refuse anything else):
//!
//! | method              | behaviour                                            |
//! |---------------------|------------------------------------------------------|
//! | `Raft/AppendEntries`| echoes `RaftPayload.data`                            |
//! | `Raft/Vote`         | answers the caller's authenticated id as `data`      |
//! | `Raft/Snapshot`     | answers the chunk's length (u64 LE) as `data`        |
//! | `Vm/Get`            | `vm_id` `"sleep:MS"` sleeps, `"fail:CODE"` fails     |
//! | `Status/Get`        | a fixed `NodeStatus`                                 |
//! | `Vm/Watch` (stream) | `vm_id` says what to stream (below)                  |
//! | `Raft/AppendStream` | first `data` `"echo"` echoes every message back,     |
//! | (bidirectional)     | `"stall"` never reads (and never ends)               |
//! | anything else       | no route: `Unimplemented` (the dispatcher's, or the  |
//! |                     | route table's for the three services above)          |
//!
//! `Vm/Watch` commands (`vm_id`): `"count:N:S"` sends N events of S bytes
//! each (in `VmRecord.reason`) with revisions `from_revision + 1..=N`, then
//! ends; `"flood:S"` sends events of S bytes until cancelled; `"quiet"`
//! sends nothing and never ends; `"fail:N:CODE"` sends N events, then
//! fails with CODE.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::{Method, methods};
use tern_protocol::{
    BoxFuture, Code, Dispatcher, Handler, RequestContext, RouteError, Routes, ServiceId, Status,
    StreamReceiver, StreamSender, pb,
};

/// Node id the fixed `Status/Get` answer carries.
pub const STATUS_NODE_ID: u64 = 4242;

/// Counters a check reads to see what reached the service.
#[derive(Debug, Default)]
pub struct Counters {
    /// Calls whose handler started.
    pub started: AtomicU64,
    /// Calls whose handler is running now.
    pub in_flight: AtomicU64,
    /// Calls whose handler ran to the end.
    pub completed: AtomicU64,
    /// Handler futures dropped before the end (cancelled).
    pub cancelled: AtomicU64,
    /// Bulk bytes received through `Raft/Snapshot`.
    pub bulk_bytes: AtomicU64,
    /// Stream messages a handler's `send` accepted.
    pub stream_sent: AtomicU64,
    /// Bytes of them (encoded messages).
    pub stream_sent_bytes: AtomicU64,
    /// Stream messages a handler read from its caller.
    pub stream_received: AtomicU64,
}

impl Counters {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// The conformance handler; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct TestService {
    /// What it has seen so far.
    pub counters: Arc<Counters>,
}

impl TestService {
    /// A dispatcher serving this handler for the Raft, Vm and Status
    /// services (and nothing else, so Health is `Unimplemented`).
    pub fn dispatcher(&self) -> Arc<dyn Handler> {
        let me: Arc<dyn Handler> = Arc::new(self.clone());
        Arc::new(
            Dispatcher::new()
                .register(ServiceId::Raft, me.clone())
                .register(ServiceId::Vm, me.clone())
                .register(ServiceId::Status, me),
        )
    }
}

/// Marks a handler as finished or cancelled when dropped.
struct InFlight {
    counters: Arc<Counters>,
    done: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.done {
            self.counters.completed.fetch_add(1, Ordering::SeqCst);
        } else {
            self.counters.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn bad_request(e: prost::DecodeError) -> Status {
    Status::invalid_argument(format!("undecodable request: {e}"))
}

impl Handler for TestService {
    fn handle(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        let counters = self.counters.clone();
        Box::pin(async move {
            counters.started.fetch_add(1, Ordering::SeqCst);
            counters.in_flight.fetch_add(1, Ordering::SeqCst);
            let mut guard = InFlight {
                counters: counters.clone(),
                done: false,
            };
            let result = serve(&counters, ctx, method, payload).await;
            guard.done = true;
            result
        })
    }

    fn handle_stream(
        &self,
        _ctx: RequestContext,
        method: &'static Method,
        request: Bytes,
        inbound: StreamReceiver,
        outbound: StreamSender,
    ) -> BoxFuture<'static, Result<(), Status>> {
        let counters = self.counters.clone();
        Box::pin(async move {
            counters.started.fetch_add(1, Ordering::SeqCst);
            counters.in_flight.fetch_add(1, Ordering::SeqCst);
            let mut guard = InFlight {
                counters: counters.clone(),
                done: false,
            };
            let result = serve_stream(&counters, method, request, inbound, outbound).await;
            guard.done = true;
            result
        })
    }
}

/// Sends one message, counting it; a failed send (the caller is gone)
/// ends the handler with the transport's reason.
async fn send_counted(
    counters: &Counters,
    outbound: &mut StreamSender,
    message: Bytes,
) -> Result<(), Status> {
    let len = message.len() as u64;
    outbound
        .send(message)
        .await
        .map_err(|e| Status::unavailable(format!("send failed: {e}")))?;
    counters.stream_sent.fetch_add(1, Ordering::SeqCst);
    counters.stream_sent_bytes.fetch_add(len, Ordering::SeqCst);
    Ok(())
}

fn event(revision: u64, size: usize) -> Bytes {
    pb::VmEvent {
        revision,
        vm: Some(pb::VmRecord {
            id: "vm".into(),
            reason: "x".repeat(size),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

fn number(text: Option<&str>, what: &str) -> Result<u64, Status> {
    text.and_then(|t| t.parse().ok())
        .ok_or_else(|| Status::invalid_argument(format!("expected {what}")))
}

/// `Vm/Watch`: what `vm_id` commands (see the module docs).
async fn serve_watch(
    counters: &Counters,
    request: Bytes,
    mut outbound: StreamSender,
) -> Result<(), Status> {
    let req = pb::WatchVmsRequest::decode(request).map_err(bad_request)?;
    let mut parts = req.vm_id.split(':');
    let from = req.from_revision;
    match parts.next() {
        Some("count") => {
            let n = number(parts.next(), "count:N:S")?;
            let size = number(parts.next(), "count:N:S")? as usize;
            for i in 1..=n {
                send_counted(counters, &mut outbound, event(from + i, size)).await?;
            }
            Ok(())
        }
        Some("flood") => {
            let size = number(parts.next(), "flood:S")? as usize;
            let mut revision = from;
            loop {
                revision += 1;
                send_counted(counters, &mut outbound, event(revision, size)).await?;
            }
        }
        Some("fail") => {
            let n = number(parts.next(), "fail:N:CODE")?;
            let code = number(parts.next(), "fail:N:CODE")?;
            for i in 1..=n {
                send_counted(counters, &mut outbound, event(from + i, 8)).await?;
            }
            Err(Status::new(
                Code::from_u32(u32::try_from(code).unwrap_or(2)),
                "requested failure",
            ))
        }
        Some("quiet") => std::future::pending().await,
        _ => Err(Status::invalid_argument(format!(
            "unknown watch command {:?}",
            req.vm_id
        ))),
    }
}

/// `Raft/AppendStream`: echo, or stall.
async fn serve_append_stream(
    counters: &Counters,
    request: Bytes,
    mut inbound: StreamReceiver,
    mut outbound: StreamSender,
) -> Result<(), Status> {
    let first = pb::RaftPayload::decode(request).map_err(bad_request)?;
    match first.data.as_ref() {
        b"echo" => {
            while let Some(message) = inbound.next().await {
                let message =
                    message.map_err(|e| Status::unavailable(format!("inbound broke: {e}")))?;
                counters.stream_received.fetch_add(1, Ordering::SeqCst);
                send_counted(counters, &mut outbound, message).await?;
            }
            Ok(())
        }
        b"stall" => std::future::pending().await,
        other => Err(Status::invalid_argument(format!(
            "unknown stream mode {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// What the test service serves, one route table per service it is
/// registered for.
struct Tables {
    raft: Routes<Route, StreamRoute>,
    vm: Routes<Route, StreamRoute>,
    status: Routes<Route, StreamRoute>,
}

impl Tables {
    fn of(&self, method: &Method) -> Result<&Routes<Route, StreamRoute>, Status> {
        match method.service {
            ServiceId::Raft => Ok(&self.raft),
            ServiceId::Vm => Ok(&self.vm),
            ServiceId::Status => Ok(&self.status),
            other => Err(Status::unimplemented(format!(
                "the test service does not serve the {other} service"
            ))),
        }
    }
}

/// A unary method of the test service.
type Route =
    for<'a> fn(&'a Counters, RequestContext, Bytes) -> BoxFuture<'a, Result<Bytes, Status>>;

/// A streaming method of the test service.
type StreamRoute = for<'a> fn(
    &'a Counters,
    Bytes,
    StreamReceiver,
    StreamSender,
) -> BoxFuture<'a, Result<(), Status>>;

static TABLES: LazyLock<Tables> = LazyLock::new(|| {
    tables().expect("the test service's routes are valid (its `routes_are_valid` test builds them)")
});

fn tables() -> Result<Tables, RouteError> {
    let raft = Routes::<Route, StreamRoute>::new(ServiceId::Raft)
        .unary(methods::RAFT_APPEND_ENTRIES, |_, _, payload| {
            Box::pin(async move {
                let req = pb::RaftPayload::decode(payload).map_err(bad_request)?;
                answer(req.data)
            })
        })?
        .unary(methods::RAFT_VOTE, |_, ctx, _| {
            Box::pin(std::future::ready(answer(Bytes::copy_from_slice(
                ctx.peer.as_bytes(),
            ))))
        })?
        .unary(methods::RAFT_SNAPSHOT, |counters, _, payload| {
            Box::pin(async move {
                let chunk = pb::SnapshotChunk::decode(payload).map_err(bad_request)?;
                let len = chunk.data.len() as u64;
                counters.bulk_bytes.fetch_add(len, Ordering::SeqCst);
                answer(Bytes::copy_from_slice(&len.to_le_bytes()))
            })
        })?
        .stream(
            methods::RAFT_APPEND_STREAM,
            |counters, request, inbound, outbound| {
                Box::pin(serve_append_stream(counters, request, inbound, outbound))
            },
        )?;
    let vm = Routes::<Route, StreamRoute>::new(ServiceId::Vm)
        .unary(methods::VM_GET, |_, _, payload| {
            Box::pin(serve_vm_get(payload))
        })?
        .stream(methods::VM_WATCH, |counters, request, _, outbound| {
            Box::pin(serve_watch(counters, request, outbound))
        })?;
    let status = Routes::<Route, StreamRoute>::new(ServiceId::Status).unary(
        methods::STATUS_GET,
        |_, _, _| {
            let status = pb::NodeStatus {
                node_id: STATUS_NODE_ID,
                version: "conformance".into(),
                ..Default::default()
            };
            Box::pin(std::future::ready(Ok(status.encode_to_vec().into())))
        },
    )?;
    Ok(Tables { raft, vm, status })
}

fn answer(data: Bytes) -> Result<Bytes, Status> {
    Ok(Bytes::from(pb::RaftPayload { data }.encode_to_vec()))
}

async fn serve(
    counters: &Counters,
    ctx: RequestContext,
    method: &'static Method,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let route = TABLES.of(method)?.route(method)?;
    route(counters, ctx, payload).await
}

async fn serve_stream(
    counters: &Counters,
    method: &'static Method,
    request: Bytes,
    inbound: StreamReceiver,
    outbound: StreamSender,
) -> Result<(), Status> {
    let route = TABLES.of(method)?.stream_route(method)?;
    route(counters, request, inbound, outbound).await
}

/// `Vm/Get`: `"sleep:MS"` sleeps, `"fail:CODE"` fails.
async fn serve_vm_get(payload: Bytes) -> Result<Bytes, Status> {
    let req = pb::GetVmRequest::decode(payload).map_err(bad_request)?;
    if let Some(ms) = req.vm_id.strip_prefix("sleep:") {
        let ms: u64 = ms
            .parse()
            .map_err(|_| Status::invalid_argument("sleep:MS"))?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
    } else if let Some(code) = req.vm_id.strip_prefix("fail:") {
        let code: u32 = code
            .parse()
            .map_err(|_| Status::invalid_argument("fail:CODE"))?;
        return Err(Status::new(Code::from_u32(code), "requested failure"));
    }
    Ok(pb::VmRecord {
        id: req.vm_id,
        ..Default::default()
    }
    .encode_to_vec()
    .into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn routes_are_valid() {
        let tables = super::tables().expect("the routes are valid");
        // The test service serves the methods of its module docs' table on
        // purpose; the rest of each service answers `Unimplemented`.
        let names = |routes: &tern_protocol::Routes<super::Route, super::StreamRoute>| {
            routes.missing().iter().map(|m| m.name).collect::<Vec<_>>()
        };
        assert_eq!(names(&tables.raft), ["Propose"]);
        assert_eq!(
            names(&tables.vm),
            ["Create", "Start", "Stop", "Delete", "List", "Migrate"]
        );
        assert!(names(&tables.status).is_empty());
    }
}
