//! The catalogue of services and methods.
//!
//! One table names every method a node serves: its numeric ids on the iroh
//! wire, its name in the `.proto` schemas (and so its gRPC path), its default
//! priority class, and whether it is *idempotent*: whether delivering the
//! same request twice has the same effect as delivering it once. The dual
//! router falls back from iroh to gRPC after a transport error only when the
//! request provably did not arrive or the method is idempotent.
//!
//! A stricter mark is *read-only*: the method changes no state at all. Only
//! read-only methods are sent and served in 0-RTT early data on iroh
//! (`tern-transport-iroh`), which an attacker who captured it can replay,
//! at any time later. Idempotent is not enough for that: a replayed
//! `Vm/Create` whose request id the state has long forgotten would create
//! the VM again.
//!
//! A test checks this table against the compiled schemas, so a method added
//! to a `.proto` file without an entry here fails the build's tests.

use crate::frame::Priority;

/// A service, by its wire id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum ServiceId {
    /// Not a service: connection-level frames (ping, pong).
    Connection = 0,
    /// Liveness and readiness.
    Health = 1,
    /// Node and cluster status.
    Status = 2,
    /// MicroVM lifecycle.
    Vm = 3,
    /// Metrics.
    Monitoring = 4,
    /// Membership: join, leave, members.
    Cluster = 5,
    /// Raft RPCs between members.
    Raft = 6,
}

impl ServiceId {
    /// Every real service (not [`ServiceId::Connection`]).
    pub const SERVICES: [ServiceId; 6] = [
        ServiceId::Health,
        ServiceId::Status,
        ServiceId::Vm,
        ServiceId::Monitoring,
        ServiceId::Cluster,
        ServiceId::Raft,
    ];

    /// The service with this wire id, including the connection pseudo-service.
    pub fn from_u16(value: u16) -> Option<ServiceId> {
        if value == 0 {
            return Some(ServiceId::Connection);
        }
        ServiceId::SERVICES.into_iter().find(|s| *s as u16 == value)
    }

    /// The name used in configuration (`prefer_iroh`) and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            ServiceId::Connection => "connection",
            ServiceId::Health => "health",
            ServiceId::Status => "status",
            ServiceId::Vm => "vm",
            ServiceId::Monitoring => "monitoring",
            ServiceId::Cluster => "cluster",
            ServiceId::Raft => "raft",
        }
    }

    /// The service with this configuration name. `vm_ops` is accepted as
    /// the rollout plan's name for `vm`.
    pub fn from_name(name: &str) -> Option<ServiceId> {
        match name {
            "vm_ops" => Some(ServiceId::Vm),
            _ => ServiceId::SERVICES.into_iter().find(|s| s.name() == name),
        }
    }

    /// The service's name in the `.proto` schemas (without package).
    pub fn proto_name(self) -> &'static str {
        match self {
            ServiceId::Connection => "",
            ServiceId::Health => "Health",
            ServiceId::Status => "Status",
            ServiceId::Vm => "Vm",
            ServiceId::Monitoring => "Monitoring",
            ServiceId::Cluster => "Cluster",
            ServiceId::Raft => "Raft",
        }
    }

    /// The methods of this service, unary and streaming.
    pub fn methods(self) -> impl Iterator<Item = &'static Method> {
        all_methods().filter(move |m| m.service == self)
    }

    /// The method with this id in this service, if any.
    pub fn method(self, id: u16) -> Option<&'static Method> {
        self.methods().find(|m| m.id == id)
    }
}

impl std::fmt::Display for ServiceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The protobuf package of every schema.
pub const PROTO_PACKAGE: &str = "tern.v1";

/// How a method's messages flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MethodKind {
    /// One request, one answer ([`crate::RpcClient::call`]).
    Unary,
    /// One request, then a stream of answers
    /// ([`crate::RpcClient::open_stream`]); `returns (stream ...)` in the
    /// schema.
    ServerStreaming,
    /// A stream of requests and a stream of answers, both ways at once
    /// ([`crate::RpcClient::open_stream`]); `stream` on both sides in the
    /// schema.
    Bidirectional,
}

impl MethodKind {
    /// Whether calls of this kind are streams.
    pub fn is_stream(self) -> bool {
        self != MethodKind::Unary
    }

    /// The kind a schema method with these streaming flags has, if Tern
    /// supports it (client streaming alone is not used).
    pub fn from_schema(client_streaming: bool, server_streaming: bool) -> Option<MethodKind> {
        match (client_streaming, server_streaming) {
            (false, false) => Some(MethodKind::Unary),
            (false, true) => Some(MethodKind::ServerStreaming),
            (true, true) => Some(MethodKind::Bidirectional),
            (true, false) => None,
        }
    }
}

/// One method of one service.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Method {
    /// The service it belongs to.
    pub service: ServiceId,
    /// Its id within the service on the iroh wire.
    pub id: u16,
    /// Its name in the `.proto` schema.
    pub name: &'static str,
    /// Delivering the request twice has the effect of delivering it once.
    pub idempotent: bool,
    /// The method changes no state (so it is idempotent too): serving it
    /// any number of times, at any time, for a caller that may not be
    /// present, changes nothing. Only such methods ride in 0-RTT early
    /// data (see the module docs).
    pub read_only: bool,
    /// The priority class callers use unless they choose another.
    pub priority: Priority,
    /// Unary, or which kind of stream.
    pub kind: MethodKind,
}

impl Method {
    /// The gRPC path, e.g. `/tern.v1.Vm/Create`.
    pub fn grpc_path(&self) -> String {
        format!(
            "/{PROTO_PACKAGE}.{}/{}",
            self.service.proto_name(),
            self.name
        )
    }

    /// `service/method` in lower case, as used in metric labels.
    pub fn label(&self) -> String {
        format!("{}/{}", self.service.name(), self.name.to_ascii_lowercase())
    }

    /// Finds a method by its gRPC path.
    pub fn by_grpc_path(path: &str) -> Option<&'static Method> {
        let rest = path
            .strip_prefix('/')?
            .strip_prefix(PROTO_PACKAGE)?
            .strip_prefix('.')?;
        let (service, method) = rest.split_once('/')?;
        all_methods().find(|m| m.service.proto_name() == service && m.name == method)
    }
}

const fn m(
    service: ServiceId,
    id: u16,
    name: &'static str,
    idempotent: bool,
    priority: Priority,
) -> Method {
    Method {
        service,
        id,
        name,
        idempotent,
        read_only: false,
        priority,
        kind: MethodKind::Unary,
    }
}

/// A read-only unary method: it changes no state, so it is idempotent and
/// may be served from 0-RTT early data.
const fn read(service: ServiceId, id: u16, name: &'static str, priority: Priority) -> Method {
    Method {
        service,
        id,
        name,
        idempotent: true,
        read_only: true,
        priority,
        kind: MethodKind::Unary,
    }
}

const fn stream(
    service: ServiceId,
    id: u16,
    name: &'static str,
    priority: Priority,
    kind: MethodKind,
) -> Method {
    Method {
        service,
        id,
        name,
        // A stream is opened again only when its opening failed (see
        // `RpcClient::open_stream`); both streaming methods resume from a
        // position the caller names, so opening twice applies nothing twice.
        idempotent: true,
        // Never opened in early data: a stream lives long past the
        // handshake, so 0-RTT would save nothing worth the argument.
        read_only: false,
        priority,
        kind,
    }
}

use Priority::{Bulk, Control, Normal, Replication};
use ServiceId::{Cluster, Health, Monitoring, Raft, Status, Vm};

/// Every unary method of every service (the streaming ones are
/// [`STREAM_METHODS`]; [`all_methods`] walks both).
///
/// Idempotency notes: reads (`read`) change nothing, so they are
/// idempotent and read-only; VM writes carry a client request
/// id that the state machine deduplicates; Raft RPCs are idempotent by
/// Raft's design (a repeated vote or append is answered from the log); a
/// join by the same endpoint id returns the existing membership; a leave of
/// a node already gone is a no-op; a metadata put carries a request id the
/// state deduplicates, and so do a transport policy set and a rollout
/// change.
pub const METHODS: &[Method] = &[
    read(Health, 1, "Check", Normal),
    read(Status, 1, "Get", Normal),
    m(Vm, 1, "Create", true, Normal),
    m(Vm, 2, "Start", true, Normal),
    m(Vm, 3, "Stop", true, Normal),
    m(Vm, 4, "Delete", true, Normal),
    read(Vm, 5, "List", Normal),
    read(Vm, 6, "Get", Normal),
    m(Vm, 7, "Migrate", true, Normal),
    read(Monitoring, 1, "Metrics", Normal),
    m(Cluster, 1, "Join", true, Normal),
    m(Cluster, 2, "Leave", true, Normal),
    read(Cluster, 3, "Members", Normal),
    m(Raft, 1, "Vote", true, Control),
    m(Raft, 2, "AppendEntries", true, Replication),
    m(Raft, 3, "Snapshot", true, Bulk),
    m(Raft, 4, "Propose", true, Normal),
    m(Cluster, 4, "MetaPut", true, Normal),
    read(Cluster, 5, "MetaGet", Normal),
    m(Cluster, 6, "AccessGrant", true, Normal),
    m(Cluster, 7, "AccessRevoke", true, Normal),
    read(Cluster, 8, "AccessList", Normal),
    m(Cluster, 9, "TokenCreate", false, Normal),
    m(Cluster, 10, "TokenRevoke", true, Normal),
    read(Cluster, 11, "TokenList", Normal),
    m(Cluster, 12, "Promote", true, Normal),
    m(Cluster, 13, "TransportSet", true, Normal),
    m(Cluster, 14, "Rollout", true, Normal),
    read(Cluster, 15, "RolloutGet", Normal),
    m(Cluster, 16, "AgentRegister", true, Normal),
    m(Cluster, 17, "AgentHeartbeat", true, Normal),
    m(Cluster, 18, "AgentReport", true, Normal),
    m(Cluster, 20, "Demote", true, Normal),
    // Not retried on a new connection: a relay that arrives late would
    // count heartbeats as heard later than they were.
    m(Cluster, 21, "AgentsHeard", false, Normal),
];

/// Every streaming method of every service.
///
/// - `Raft/AppendStream` (bidirectional, replication lane): a leader's
///   pipelined append-entries to one follower; each answer answers the
///   request at the same position of the stream.
/// - `Vm/Watch` (server streaming): every change of the VMs from a
///   revision on, resumable by revision.
/// - `Cluster/AgentSync` (server streaming): the desired state of the VMs
///   placed on the calling agent, whole, on every change, resumable by
///   revision.
pub const STREAM_METHODS: &[Method] = &[
    stream(
        Raft,
        5,
        "AppendStream",
        Replication,
        MethodKind::Bidirectional,
    ),
    stream(Vm, 8, "Watch", Normal, MethodKind::ServerStreaming),
    stream(
        Cluster,
        19,
        "AgentSync",
        Normal,
        MethodKind::ServerStreaming,
    ),
];

/// Every method, unary then streaming.
pub fn all_methods() -> impl Iterator<Item = &'static Method> {
    METHODS.iter().chain(STREAM_METHODS.iter())
}

/// Well-known methods, for callers that name one directly.
pub mod methods {
    use super::{METHODS, Method, STREAM_METHODS};

    /// `Health/Check`.
    pub const HEALTH_CHECK: &Method = &METHODS[0];
    /// `Status/Get`.
    pub const STATUS_GET: &Method = &METHODS[1];
    /// `Vm/Create`.
    pub const VM_CREATE: &Method = &METHODS[2];
    /// `Vm/Start`.
    pub const VM_START: &Method = &METHODS[3];
    /// `Vm/Stop`.
    pub const VM_STOP: &Method = &METHODS[4];
    /// `Vm/Delete`.
    pub const VM_DELETE: &Method = &METHODS[5];
    /// `Vm/List`.
    pub const VM_LIST: &Method = &METHODS[6];
    /// `Vm/Get`.
    pub const VM_GET: &Method = &METHODS[7];
    /// `Vm/Migrate`.
    pub const VM_MIGRATE: &Method = &METHODS[8];
    /// `Monitoring/Metrics`.
    pub const MONITORING_METRICS: &Method = &METHODS[9];
    /// `Cluster/Join`.
    pub const CLUSTER_JOIN: &Method = &METHODS[10];
    /// `Cluster/Leave`.
    pub const CLUSTER_LEAVE: &Method = &METHODS[11];
    /// `Cluster/Members`.
    pub const CLUSTER_MEMBERS: &Method = &METHODS[12];
    /// `Raft/Vote`.
    pub const RAFT_VOTE: &Method = &METHODS[13];
    /// `Raft/AppendEntries`.
    pub const RAFT_APPEND_ENTRIES: &Method = &METHODS[14];
    /// `Raft/Snapshot`.
    pub const RAFT_SNAPSHOT: &Method = &METHODS[15];
    /// `Raft/Propose`.
    pub const RAFT_PROPOSE: &Method = &METHODS[16];
    /// `Cluster/MetaPut`.
    pub const CLUSTER_META_PUT: &Method = &METHODS[17];
    /// `Cluster/MetaGet`.
    pub const CLUSTER_META_GET: &Method = &METHODS[18];
    /// `Cluster/AccessGrant`.
    pub const CLUSTER_ACCESS_GRANT: &Method = &METHODS[19];
    /// `Cluster/AccessRevoke`.
    pub const CLUSTER_ACCESS_REVOKE: &Method = &METHODS[20];
    /// `Cluster/AccessList`.
    pub const CLUSTER_ACCESS_LIST: &Method = &METHODS[21];
    /// `Cluster/TokenCreate`.
    pub const CLUSTER_TOKEN_CREATE: &Method = &METHODS[22];
    /// `Cluster/TokenRevoke`.
    pub const CLUSTER_TOKEN_REVOKE: &Method = &METHODS[23];
    /// `Cluster/TokenList`.
    pub const CLUSTER_TOKEN_LIST: &Method = &METHODS[24];
    /// `Cluster/Promote`.
    pub const CLUSTER_PROMOTE: &Method = &METHODS[25];
    /// `Cluster/TransportSet`.
    pub const CLUSTER_TRANSPORT_SET: &Method = &METHODS[26];
    /// `Cluster/Rollout`.
    pub const CLUSTER_ROLLOUT: &Method = &METHODS[27];
    /// `Cluster/RolloutGet`.
    pub const CLUSTER_ROLLOUT_GET: &Method = &METHODS[28];
    /// `Cluster/AgentRegister`.
    pub const CLUSTER_AGENT_REGISTER: &Method = &METHODS[29];
    /// `Cluster/AgentHeartbeat`.
    pub const CLUSTER_AGENT_HEARTBEAT: &Method = &METHODS[30];
    /// `Cluster/AgentReport`.
    pub const CLUSTER_AGENT_REPORT: &Method = &METHODS[31];
    /// `Cluster/Demote`.
    pub const CLUSTER_DEMOTE: &Method = &METHODS[32];
    /// `Cluster/AgentsHeard`.
    pub const CLUSTER_AGENTS_HEARD: &Method = &METHODS[33];
    /// `Cluster/AgentSync` (server stream).
    pub const CLUSTER_AGENT_SYNC: &Method = &STREAM_METHODS[2];
    /// `Raft/AppendStream` (bidirectional stream).
    pub const RAFT_APPEND_STREAM: &Method = &STREAM_METHODS[0];
    /// `Vm/Watch` (server stream).
    pub const VM_WATCH: &Method = &STREAM_METHODS[1];
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::collections::BTreeSet;

    #[test]
    fn catalogue_matches_the_compiled_schemas() {
        let fds = prost_types_lite::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let mut from_schema = BTreeSet::new();
        for file in fds.file {
            for service in file.service {
                for method in service.method {
                    let kind = MethodKind::from_schema(
                        method.client_streaming.unwrap_or(false),
                        method.server_streaming.unwrap_or(false),
                    );
                    from_schema.insert((
                        format!(
                            "/{}.{}/{}",
                            file.package.clone().unwrap_or_default(),
                            service.name.clone().unwrap_or_default(),
                            method.name.unwrap_or_default()
                        ),
                        kind,
                    ));
                }
            }
        }
        let from_catalogue: BTreeSet<(String, Option<MethodKind>)> = all_methods()
            .map(|m| (m.grpc_path(), Some(m.kind)))
            .collect();
        assert_eq!(from_schema, from_catalogue);
        assert!(METHODS.iter().all(|m| m.kind == MethodKind::Unary));
        assert!(STREAM_METHODS.iter().all(|m| m.kind.is_stream()));
    }

    /// The read-only set is what 0-RTT early data may carry, which an
    /// attacker can replay: a method joins it only by a reviewed change of
    /// this list, and nothing that writes, proposes or streams is in it.
    #[test]
    fn only_reads_are_read_only() {
        let read_only: BTreeSet<String> = all_methods()
            .filter(|m| m.read_only)
            .map(Method::label)
            .collect();
        let expected: BTreeSet<String> = [
            "health/check",
            "status/get",
            "vm/list",
            "vm/get",
            "monitoring/metrics",
            "cluster/members",
            "cluster/metaget",
            "cluster/accesslist",
            "cluster/tokenlist",
            "cluster/rolloutget",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(read_only, expected);
        for m in all_methods().filter(|m| m.read_only) {
            assert!(m.idempotent, "{} is read-only, so idempotent", m.label());
            assert_eq!(m.kind, MethodKind::Unary, "{} streams", m.label());
            assert_ne!(m.service, ServiceId::Raft, "{} is Raft's", m.label());
        }
    }

    #[test]
    fn ids_are_unique_and_lookups_agree() {
        let mut seen = BTreeSet::new();
        for method in all_methods() {
            assert!(method.id != 0, "method id 0 is reserved");
            assert!(
                seen.insert((method.service, method.id)),
                "duplicate {method:?}"
            );
            assert_eq!(method.service.method(method.id), Some(method));
            assert_eq!(Method::by_grpc_path(&method.grpc_path()), Some(method));
        }
        for service in ServiceId::SERVICES {
            assert_eq!(ServiceId::from_u16(service as u16), Some(service));
            assert_eq!(ServiceId::from_name(service.name()), Some(service));
            assert!(service.methods().next().is_some(), "{service} has methods");
        }
        assert_eq!(ServiceId::from_u16(7), None);
        assert_eq!(ServiceId::from_name("vm_ops"), Some(ServiceId::Vm));
        assert_eq!(ServiceId::from_name("nope"), None);
        assert_eq!(Method::by_grpc_path("/tern.v1.Vm/Nope"), None);
        assert_eq!(Method::by_grpc_path("garbage"), None);
        assert_eq!(methods::RAFT_SNAPSHOT.name, "Snapshot");
        assert_eq!(methods::VM_MIGRATE.name, "Migrate");
        assert_eq!(methods::RAFT_PROPOSE.name, "Propose");
        assert_eq!(methods::CLUSTER_META_PUT.name, "MetaPut");
        assert_eq!(methods::CLUSTER_META_GET.name, "MetaGet");
        assert_eq!(methods::CLUSTER_ACCESS_GRANT.name, "AccessGrant");
        assert_eq!(methods::CLUSTER_ACCESS_REVOKE.name, "AccessRevoke");
        assert_eq!(methods::CLUSTER_ACCESS_LIST.name, "AccessList");
        assert_eq!(methods::CLUSTER_TOKEN_CREATE.name, "TokenCreate");
        assert_eq!(methods::CLUSTER_TOKEN_REVOKE.name, "TokenRevoke");
        assert_eq!(methods::CLUSTER_TOKEN_LIST.name, "TokenList");
        assert_eq!(methods::CLUSTER_PROMOTE.name, "Promote");
        assert_eq!(methods::CLUSTER_TRANSPORT_SET.name, "TransportSet");
        assert_eq!(methods::CLUSTER_ROLLOUT.name, "Rollout");
        assert_eq!(methods::CLUSTER_ROLLOUT_GET.name, "RolloutGet");
        assert_eq!(methods::CLUSTER_AGENTS_HEARD.name, "AgentsHeard");
        assert_eq!(methods::RAFT_APPEND_STREAM.name, "AppendStream");
        assert_eq!(methods::VM_WATCH.name, "Watch");
        assert_eq!(
            Method::by_grpc_path("/tern.v1.Vm/Watch"),
            Some(methods::VM_WATCH)
        );
        assert_eq!(ServiceId::Raft.method(5), Some(methods::RAFT_APPEND_STREAM));
    }

    /// The few descriptor messages the test needs, declared by hand so the
    /// crate does not depend on `prost-types` only for a test.
    mod prost_types_lite {
        #[derive(Clone, PartialEq, prost::Message)]
        pub(super) struct FileDescriptorSet {
            #[prost(message, repeated, tag = "1")]
            pub(super) file: Vec<FileDescriptorProto>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub(super) struct FileDescriptorProto {
            #[prost(string, optional, tag = "2")]
            pub(super) package: Option<String>,
            #[prost(message, repeated, tag = "6")]
            pub(super) service: Vec<ServiceDescriptorProto>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub(super) struct ServiceDescriptorProto {
            #[prost(string, optional, tag = "1")]
            pub(super) name: Option<String>,
            #[prost(message, repeated, tag = "2")]
            pub(super) method: Vec<MethodDescriptorProto>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub(super) struct MethodDescriptorProto {
            #[prost(string, optional, tag = "1")]
            pub(super) name: Option<String>,
            #[prost(bool, optional, tag = "5")]
            pub(super) client_streaming: Option<bool>,
            #[prost(bool, optional, tag = "6")]
            pub(super) server_streaming: Option<bool>,
        }
    }
}
