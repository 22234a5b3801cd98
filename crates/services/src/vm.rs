//! The VM service: create, start, stop, delete, list, get, migrate and
//! watch, as in `vm.proto`.
//!
//! Every change is a Raft write ([`Command`]) carrying the client's request
//! id, which the state deduplicates: a retried create answers the first
//! VM and never makes a second. Placement, desired-state transitions and
//! migration steps happen in the state's pure `apply`, so every node
//! agrees on them (see `tern_state::state`); each node's
//! [`crate::reconciler`] then makes its runtime match.
//!
//! - **Specs** are validated here with [`tern_runtime::validate`] before
//!   anything is written; errors name the field (`InvalidArgument`).
//!   Every write is then checked against the write limits
//!   (`tern_state::limits::check_command`): a field over its limit is
//!   `InvalidArgument` naming the field and the limit, a request over
//!   `MAX_REQUEST_BYTES` is `ResourceExhausted`; neither is proposed. An
//!   empty `runtime` is filled in with the node's default runtime first,
//!   so the choice is recorded. A `microvm` spec's paths are checked on the
//!   node that receives the call.
//! - **Reads** (List, Get) are served from the state applied on this node,
//!   which may trail the leader by a few entries. List answers the
//!   revision it is as of, from which a watch sees every later change.
//! - **Watch** is a server stream served from the applied state's history
//!   of VM changes ([`crate::watch`]).
//! - **Writes on a follower.** When [`Consensus::write`] answers
//!   [`ConsensusError::NotLeader`], the service forwards the call,
//!   unchanged (same method, same request id, so the forward is as safe to
//!   retry as the call), to the leader through the transport-neutral
//!   client given to [`VmService::set_forward`] (the node's router, which
//!   calls as the node itself). It forwards once: a call whose
//!   caller is itself a cluster member (a forward already) is not forwarded
//!   again but answered `FailedPrecondition` naming the leader, as is any
//!   call when no client was given or no leader is known.
//! - **Migration** shows as `desired = MIGRATING` with the target and the
//!   state wanted after the move in `reason`, until the source reports the
//!   VM stopped and the record moves to the target.
//! - **A node that is down** keeps its VMs' records: a stop, start or
//!   migration is recorded at once and carried out by the node's
//!   reconciler when it returns. A delete of a VM whose node has left the
//!   cluster removes the record at once (no reconciler will report it).

use std::sync::{Arc, LazyLock, OnceLock};

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::{Method, methods};
use tern_protocol::forward::{Leader, forward_to_leader, not_leader};
use tern_protocol::{
    BoxFuture, Code, Handler, PeerAddr, RequestContext, RouteError, Routes, RpcClient, ServiceId,
    Status, StreamReceiver, StreamSender, pb,
};
use tern_state::{
    ClusterState, Command, Ipv4Net, Lease, Rejection, Response, VmRecord, VmSpec, VmState,
};

use crate::consensus::{Consensus, ConsensusError, write_bounded};
use crate::watch::WatchLimits;
use tern_runtime::RuntimeKind;

/// The VM service.
#[derive(Clone)]
pub struct VmService {
    consensus: Arc<dyn Consensus>,
    forward: Arc<OnceLock<Arc<dyn RpcClient>>>,
    default_runtime: RuntimeKind,
    watch_limits: WatchLimits,
}

impl VmService {
    /// The VM service over this node's Raft. `default_runtime` fills in
    /// specs that name none (the node passes [`tern_runtime::default_kind`]).
    /// Until [`VmService::set_forward`] is called, a follower answers
    /// writes with `FailedPrecondition` naming the leader.
    pub fn new(consensus: Arc<dyn Consensus>, default_runtime: RuntimeKind) -> Arc<VmService> {
        Self::with_watch_limits(consensus, default_runtime, WatchLimits::default())
    }

    /// As [`VmService::new`], with other bounds for its watches (tests
    /// reach them with few writes).
    pub fn with_watch_limits(
        consensus: Arc<dyn Consensus>,
        default_runtime: RuntimeKind,
        watch_limits: WatchLimits,
    ) -> Arc<VmService> {
        Arc::new(VmService {
            consensus,
            forward: Arc::new(OnceLock::new()),
            default_runtime,
            watch_limits,
        })
    }

    /// Gives the service the client it forwards writes to the leader with
    /// (the node's router, built once the transports that serve this
    /// handler exist). Returns false, changing nothing, if one was set.
    pub fn set_forward(&self, client: Arc<dyn RpcClient>) -> bool {
        self.forward.set(client).is_ok()
    }

    /// The `Vm` service handler.
    pub fn handler(self: &Arc<Self>) -> Arc<dyn Handler> {
        self.clone()
    }

    async fn serve(
        self: Arc<Self>,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> Result<Bytes, Status> {
        let command = match (ROUTES.route(method)?)(&self, &payload)? {
            Served::Answer(answer) => return Ok(answer),
            Served::Write(command) => command,
        };
        // Limits before work: refused here, never proposed.
        tern_state::limits::check_command(&command).map_err(|e| limit_status(&e))?;
        tracing::debug!(%command, caller = %ctx.peer.short(), "VM write");
        match write_bounded(&*self.consensus, command).await {
            Ok(response) => self.answer(response),
            Err(ConsensusError::TooLarge(e)) => Err(limit_status(&e)),
            Err(ConsensusError::NotLeader { leader }) => {
                self.forward(&ctx, method, payload, leader).await
            }
            Err(e @ ConsensusError::Unavailable { .. }) => Err(Status::unavailable(e.to_string())),
        }
    }

    /// Passes a write this node cannot apply to the leader (see the module
    /// docs for when it does).
    async fn forward(
        &self,
        ctx: &RequestContext,
        method: &'static Method,
        payload: Bytes,
        leader: Option<u64>,
    ) -> Result<Bytes, Status> {
        let (Some(client), Some(leader)) = (self.forward.get(), leader) else {
            return Err(not_leader(leader, ""));
        };
        let (leader_addr, caller_is_member): (Option<PeerAddr>, bool) = self
            .consensus
            .query(|state| {
                (
                    state.members().get(&leader).map(|m| m.addr.clone()),
                    state
                        .node_id_of(&ctx.peer)
                        .is_some_and(|id| state.members().contains_key(&id)),
                )
            })
            .map_err(unavailable)?;
        if caller_is_member {
            return Err(not_leader(
                Some(leader),
                " (a call forwarded by a member is not forwarded again)",
            ));
        }
        let Some(addr) = leader_addr else {
            return Err(not_leader(
                Some(leader),
                " (its address is not in the applied membership yet)",
            ));
        };
        tracing::debug!(method = %method.label(), leader, "forwarding a VM write to the leader");
        forward_to_leader(
            client.as_ref(),
            &Leader { id: leader, addr },
            ctx.deadline,
            method,
            payload,
        )
        .await
    }
}

impl Handler for VmService {
    fn handle(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        // The future must own what it uses: two `Arc`s and a kind.
        Box::pin(Arc::new(self.clone()).serve(ctx, method, payload))
    }

    /// `Vm/Watch` (see [`crate::watch`]); no other method of the service
    /// is a stream.
    fn handle_stream(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        request: Bytes,
        inbound: StreamReceiver,
        outbound: StreamSender,
    ) -> BoxFuture<'static, Result<(), Status>> {
        drop(inbound);
        match ROUTES.stream_route(method) {
            Ok(route) => route(self, ctx, request, outbound),
            Err(status) => Box::pin(std::future::ready(Err(status))),
        }
    }
}

/// What a unary VM route made of a request: a read's answer, or the write
/// to propose.
enum Served {
    /// The answer (reads).
    Answer(Bytes),
    /// The command to write (and forward, on a follower).
    Write(Command),
}

/// A unary VM method: decodes and checks the request.
type Route = fn(&VmService, &Bytes) -> Result<Served, Status>;

/// A streaming VM method.
type StreamRoute =
    fn(&VmService, RequestContext, Bytes, StreamSender) -> BoxFuture<'static, Result<(), Status>>;

static ROUTES: LazyLock<Routes<Route, StreamRoute>> = LazyLock::new(|| {
    routes().expect("the VM routes are valid (the `routes_cover_the_catalogue` test builds them)")
});

fn routes() -> Result<Routes<Route, StreamRoute>, RouteError> {
    Routes::<Route, StreamRoute>::new(ServiceId::Vm)
        .unary(methods::VM_LIST, serve_list)?
        .unary(methods::VM_GET, serve_get)?
        .unary(methods::VM_CREATE, serve_create)?
        .unary(methods::VM_START, |_, payload| {
            set_desired(payload, VmState::Running)
        })?
        .unary(methods::VM_STOP, |_, payload| {
            set_desired(payload, VmState::Stopped)
        })?
        .unary(methods::VM_DELETE, |_, payload| {
            set_desired(payload, VmState::Deleted)
        })?
        .unary(methods::VM_MIGRATE, serve_migrate)?
        .stream(methods::VM_WATCH, serve_watch)
}

/// `Vm/List`, from the applied state.
fn serve_list(service: &VmService, payload: &Bytes) -> Result<Served, Status> {
    let req: pb::ListVmsRequest = decode(payload)?;
    let (vms, revision) = service
        .consensus
        .query(|state| {
            let vms = state
                .vms()
                .values()
                .filter(|vm| req.node_id == 0 || vm.node_id == req.node_id)
                .map(|vm| to_pb(vm, network_of(state, &vm.id)))
                .collect::<Vec<_>>();
            (vms, state.vm_history().revision())
        })
        .map_err(unavailable)?;
    Ok(Served::Answer(
        pb::ListVmsResponse { vms, revision }.encode_to_vec().into(),
    ))
}

/// `Vm/Get`, from the applied state.
fn serve_get(service: &VmService, payload: &Bytes) -> Result<Served, Status> {
    let req: pb::GetVmRequest = decode(payload)?;
    let vm = service
        .consensus
        .query(|state| {
            state
                .vm(&req.vm_id)
                .map(|vm| to_pb(vm, network_of(state, &vm.id)))
        })
        .map_err(unavailable)?
        .ok_or_else(|| Status::not_found(format!("no VM with id {:?}", req.vm_id)))?;
    Ok(Served::Answer(vm.encode_to_vec().into()))
}

/// `Vm/Create`: the spec validated, its runtime filled in.
fn serve_create(service: &VmService, payload: &Bytes) -> Result<Served, Status> {
    let req: pb::CreateVmRequest = decode(payload)?;
    check_request_id(&req.request_id)?;
    let mut spec = req
        .spec
        .ok_or_else(|| Status::invalid_argument("invalid VM spec: field `spec`: missing"))?;
    if spec.runtime.is_empty() {
        spec.runtime = service.default_runtime.as_str().to_owned();
    }
    tern_runtime::validate(&spec).map_err(|e| Status::invalid_argument(e.to_string()))?;
    // User data is kept beside the record, not in the spec; a create
    // without any stays the command it always was.
    let user_data = std::mem::take(&mut spec.user_data);
    let spec = Box::new(from_pb_spec(spec));
    Ok(Served::Write(if user_data.is_empty() {
        Command::CreateVm {
            request_id: req.request_id,
            spec,
        }
    } else {
        Command::CreateVmWithData {
            request_id: req.request_id,
            spec,
            user_data,
        }
    }))
}

/// `Vm/Start`, `Vm/Stop`, `Vm/Delete`: the desired state each asks for.
fn set_desired(payload: &Bytes, desired: VmState) -> Result<Served, Status> {
    let req: pb::VmActionRequest = decode(payload)?;
    check_request_id(&req.request_id)?;
    check_vm_id(&req.vm_id)?;
    Ok(Served::Write(Command::SetVmDesired {
        request_id: req.request_id,
        vm_id: req.vm_id,
        desired,
    }))
}

/// `Vm/Migrate`.
fn serve_migrate(_: &VmService, payload: &Bytes) -> Result<Served, Status> {
    let req: pb::MigrateVmRequest = decode(payload)?;
    check_request_id(&req.request_id)?;
    check_vm_id(&req.vm_id)?;
    if req.target_node == 0 {
        return Err(Status::invalid_argument(
            "field `target_node`: 0 names no node; give the node id to move the VM to",
        ));
    }
    Ok(Served::Write(Command::MigrateVm {
        request_id: req.request_id,
        vm_id: req.vm_id,
        target: req.target_node,
    }))
}

/// `Vm/Watch` (see [`crate::watch`]).
fn serve_watch(
    service: &VmService,
    ctx: RequestContext,
    request: Bytes,
    outbound: StreamSender,
) -> BoxFuture<'static, Result<(), Status>> {
    tracing::debug!(caller = %ctx.peer.short(), "VM watch");
    Box::pin(crate::watch::serve(
        service.consensus.clone(),
        service.watch_limits,
        request,
        outbound,
    ))
}

fn decode<M: Message + Default>(payload: &Bytes) -> Result<M, Status> {
    M::decode(payload.as_ref()).map_err(|e| {
        Status::invalid_argument(format!(
            "undecodable {}: {e}",
            std::any::type_name::<M>()
                .rsplit("::")
                .next()
                .unwrap_or("request")
        ))
    })
}

fn check_request_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > tern_state::MAX_REQUEST_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "field `request_id`: {} bytes; a request id is 1 to {} bytes, chosen by the client so that retries are safe",
            id.len(),
            tern_state::MAX_REQUEST_ID_LEN
        )));
    }
    Ok(())
}

fn check_vm_id(id: &str) -> Result<(), Status> {
    tern_runtime::spec::check_vm_id(id)
        .map_err(|why| Status::invalid_argument(format!("field `vm_id`: {id:?} {why}")))
}

/// The status of a write over a size limit: `InvalidArgument` naming the
/// field, or `ResourceExhausted` for the request as a whole.
pub fn limit_status(e: &tern_state::limits::LimitError) -> Status {
    let code = if e.is_whole_request() {
        Code::ResourceExhausted
    } else {
        Code::InvalidArgument
    };
    Status::new(code, e.to_string())
}

fn unavailable(e: ConsensusError) -> Status {
    Status::unavailable(e.to_string())
}

impl VmService {
    /// The state's answer as the RPC's. This node applied the write (it
    /// leads), so its state has the VM's lease, unless the VM has gone
    /// since.
    fn answer(&self, response: Response) -> Result<Bytes, Status> {
        match response {
            Response::Vm(vm) => {
                let network = self
                    .consensus
                    .query(|state| network_of(state, &vm.id))
                    .unwrap_or_default();
                Ok(to_pb(&vm, network).encode_to_vec().into())
            }
            Response::Rejected(why) => Err(rejection_status(&why)),
            other => Err(Status::internal(format!(
                "the state answered a VM write with {other:?}"
            ))),
        }
    }
}

/// A VM's lease and the pool it is from, as the state holds them.
pub fn network_of(state: &ClusterState, vm_id: &str) -> Option<(Lease, Ipv4Net)> {
    let network = state.network();
    Some((*network.lease(vm_id)?, network.pool()?))
}

/// The status a refusal by the state is answered with.
pub fn rejection_status(why: &Rejection) -> Status {
    let code = match why {
        Rejection::UnknownVm { .. }
        | Rejection::UnknownToken { .. }
        | Rejection::NotAServer { .. } => Code::NotFound,
        Rejection::NameTaken { .. } => Code::AlreadyExists,
        Rejection::InvalidRequestId { .. }
        | Rejection::UnknownNode { .. }
        | Rejection::InvalidMetaKey { .. }
        | Rejection::MetaValueTooLarge { .. }
        | Rejection::InvalidToken { .. }
        | Rejection::InvalidPool { .. }
        | Rejection::InvalidLabels { .. }
        | Rejection::InvalidPolicy { .. }
        | Rejection::EmptyGroup { .. }
        | Rejection::InvalidPlan { .. } => Code::InvalidArgument,
        Rejection::NoCapacity { .. }
        | Rejection::NodeFull { .. }
        | Rejection::NodeIdsExhausted
        | Rejection::VmIdsExhausted
        | Rejection::MetaFull
        | Rejection::AccessFull
        | Rejection::TokensFull
        | Rejection::TooManyGroupPolicies
        | Rejection::AddressPoolExhausted { .. } => Code::ResourceExhausted,
        Rejection::NotAdmin { .. }
        | Rejection::TokenExpired { .. }
        | Rejection::TokenUsedUp { .. } => Code::PermissionDenied,
        Rejection::VmDeleting { .. }
        | Rejection::LastAdmin { .. }
        | Rejection::MigrationInProgress { .. }
        | Rejection::AlreadyOnNode { .. }
        | Rejection::PoolInUse { .. }
        | Rejection::NodeDown { .. }
        | Rejection::AgentIsServer { .. }
        | Rejection::AlreadyAgent { .. }
        | Rejection::Rollout { .. } => Code::FailedPrecondition,
        Rejection::AgentIdMismatch { .. } => Code::PermissionDenied,
        Rejection::InvalidDesiredState { .. }
        | Rejection::NotPlacedHere { .. }
        | Rejection::InvalidReport { .. } => Code::Internal,
    };
    Status::new(code, why.to_string())
}

/// A state as `tern.v1.VmState`.
pub fn pb_state(state: VmState) -> pb::VmState {
    match state {
        VmState::Unspecified => pb::VmState::Unspecified,
        VmState::Pending => pb::VmState::Pending,
        VmState::Running => pb::VmState::Running,
        VmState::Stopped => pb::VmState::Stopped,
        VmState::Failed => pb::VmState::Failed,
        VmState::Migrating => pb::VmState::Migrating,
        VmState::Deleted => pb::VmState::Deleted,
    }
}

/// A record as `tern.v1.VmRecord`, with its lease and pool when it has
/// an address.
pub fn to_pb(vm: &VmRecord, network: Option<(Lease, Ipv4Net)>) -> pb::VmRecord {
    let (desired, reason) = if vm.is_migrating() {
        (
            pb::VmState::Migrating,
            format!(
                "migrating from node {} to node {} (then {:?}); {}",
                vm.node_id, vm.migrate_to, vm.desired, vm.reason
            )
            .trim_end_matches("; ")
            .to_owned(),
        )
    } else {
        (pb_state(vm.desired), vm.reason.clone())
    };
    pb::VmRecord {
        id: vm.id.clone(),
        spec: Some(to_pb_spec(&vm.spec)),
        node_id: vm.node_id,
        desired: desired as i32,
        observed: pb_state(vm.observed) as i32,
        reason,
        log_path: vm.log_path.clone(),
        generation: vm.generation,
        address: network.map_or_else(String::new, |(l, pool)| {
            format!("{}/{}", l.address, pool.prefix())
        }),
        mac: network.map_or_else(String::new, |(l, _)| l.mac_string()),
        gateway: network.map_or_else(String::new, |(_, pool)| pool.gateway().to_string()),
    }
}

/// A `tern.v1.VmSpec` as the state's spec.
pub fn from_pb_spec(s: pb::VmSpec) -> VmSpec {
    VmSpec {
        name: s.name,
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        runtime: s.runtime,
        kernel: s.kernel,
        initrd: s.initrd,
        image: s.image,
        kernel_cmdline: s.kernel_cmdline,
        command: s.command,
        pin_node: s.pin_node,
    }
}

/// The state's spec as `tern.v1.VmSpec` (what runtimes take).
pub fn to_pb_spec(s: &VmSpec) -> pb::VmSpec {
    pb::VmSpec {
        name: s.name.clone(),
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        runtime: s.runtime.clone(),
        kernel: s.kernel.clone(),
        initrd: s.initrd.clone(),
        image: s.image.clone(),
        kernel_cmdline: s.kernel_cmdline.clone(),
        command: s.command.clone(),
        pin_node: s.pin_node,
        // Kept beside the record (`ClusterState::user_data`), not echoed.
        user_data: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_cover_the_catalogue() {
        let routes = routes().expect("the routes are valid");
        let missing: Vec<String> = routes.missing().iter().map(|m| m.label()).collect();
        assert!(missing.is_empty(), "methods without a route: {missing:?}");
    }

    #[test]
    fn refusals_map_to_codes_a_client_can_act_on() {
        let code = |r: Rejection| rejection_status(&r).code;
        assert_eq!(
            code(Rejection::UnknownVm { vm_id: "x".into() }),
            Code::NotFound
        );
        assert_eq!(
            code(Rejection::NameTaken {
                name: "a".into(),
                existing: "vm-1".into()
            }),
            Code::AlreadyExists
        );
        assert_eq!(
            code(Rejection::NoCapacity {
                vcpus: 1,
                memory_mib: 1,
                members: 0
            }),
            Code::ResourceExhausted
        );
        let full = Rejection::AddressPoolExhausted {
            pool: "10.9.0.0/29".into(),
            leased: 5,
        };
        assert_eq!(code(full.clone()), Code::ResourceExhausted);
        assert!(
            rejection_status(&full).message.contains("10.9.0.0/29"),
            "the refusal names the pool"
        );
        assert_eq!(
            code(Rejection::UnknownNode { node_id: 3 }),
            Code::InvalidArgument
        );
        assert_eq!(
            code(Rejection::MigrationInProgress {
                vm_id: "x".into(),
                target: 2
            }),
            Code::FailedPrecondition
        );
        let status = rejection_status(&Rejection::UnknownNode { node_id: 3 });
        assert!(status.message.contains("node 3"), "{status}");
    }

    #[test]
    fn a_migrating_record_shows_where_it_goes_and_what_then() {
        let vm = VmRecord {
            id: "vm-1".into(),
            node_id: 1,
            migrate_to: 2,
            desired: VmState::Running,
            observed: VmState::Running,
            ..VmRecord::default()
        };
        let pb = to_pb(&vm, None);
        assert_eq!(pb.desired, pb::VmState::Migrating as i32);
        assert_eq!(pb.observed, pb::VmState::Running as i32);
        assert_eq!(pb.reason, "migrating from node 1 to node 2 (then Running)");
        let settled = to_pb(
            &VmRecord {
                migrate_to: 0,
                reason: "why".into(),
                ..vm
            },
            None,
        );
        assert_eq!(settled.desired, pb::VmState::Running as i32);
        assert_eq!(settled.reason, "why");
    }

    #[test]
    fn specs_round_trip_between_schema_and_state() {
        let spec = pb::VmSpec {
            name: "web".into(),
            vcpus: 2,
            memory_mib: 128,
            runtime: "microvm".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            image: "/img".into(),
            kernel_cmdline: "console=ttyS0".into(),
            command: vec!["a".into()],
            pin_node: 3,
            // Kept beside the record, not in the state's spec.
            user_data: String::new(),
        };
        assert_eq!(to_pb_spec(&from_pb_spec(spec.clone())), spec);
    }
}
