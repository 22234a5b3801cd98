//! The names of every metric Tern exports, with their kind and help text.
//!
//! One list, shared by the transports, the router, Raft and the Monitoring
//! service, so that gRPC and iroh report under the same names (told apart by
//! the `transport` label) and the Prometheus exposition describes each
//! metric once. Names follow Prometheus conventions: `_total` for counters,
//! base units (`_seconds`, `_bytes`).

/// A metric's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

/// One metric: name, kind, help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// Prometheus name.
    pub name: &'static str,
    /// Its kind.
    pub kind: MetricKind,
    /// The HELP line.
    pub help: &'static str,
}

macro_rules! metrics {
    ($( $(#[$doc:meta])* $const:ident = $name:literal, $kind:ident, $help:literal; )*) => {
        $( $(#[$doc])* pub const $const: &str = $name; )*
        /// Every metric, for describing them all at start-up.
        pub const ALL: &[MetricDef] = &[
            $( MetricDef { name: $name, kind: MetricKind::$kind, help: $help }, )*
        ];
    };
}

metrics! {
    /// Connection establishment time; labels `transport`.
    CONNECT_SECONDS = "tern_transport_connect_seconds", Histogram,
        "Time to establish a connection to a peer, by transport.";
    /// Open connections; labels `transport`.
    CONNECTIONS_ACTIVE = "tern_transport_connections_active", Gauge,
        "Connections currently open to or from peers, by transport.";
    /// Failed connection attempts; labels `transport`.
    CONNECT_FAILURES = "tern_transport_connect_failures_total", Counter,
        "Connection attempts that failed, by transport.";
    /// Re-dials after a lost connection; labels `transport`.
    CONNECT_RETRIES = "tern_transport_connect_retries_total", Counter,
        "Re-dials after a lost or failed connection, by transport.";
    /// NAT traversal outcome of outbound connections; labels `transport`,
    /// `path` (`direct`|`relayed`), `peer` (the peer's short key).
    CONNECTION_PATHS = "tern_transport_connection_paths_total", Counter,
        "Connections by the path they settled on (direct or relayed).";
    /// Call latency; labels `transport`, `service`, `method`, `side`.
    CALL_SECONDS = "tern_transport_call_seconds", Histogram,
        "Latency of calls by transport, service and method, seen by the client or the server.";
    /// Calls; labels `transport`, `service`, `method`, `side`, `outcome`.
    CALLS = "tern_transport_calls_total", Counter,
        "Calls by transport, service, method and outcome (ok, app_error, transport_error).";
    /// Transport-level call failures; labels `transport`, `kind`.
    CALL_FAILURES = "tern_transport_call_failures_total", Counter,
        "Calls that failed at the transport level, by transport and error kind.";
    /// Messages; labels `transport`, `direction` (`sent`|`received`).
    MESSAGES = "tern_transport_messages_total", Counter,
        "Messages sent and received, by transport.";
    /// Bytes; labels `transport`, `direction`.
    BYTES = "tern_transport_bytes_total", Counter,
        "Payload bytes sent and received, by transport.";
    /// Stream openings; labels `transport`, `service`, `method`, `side`,
    /// `outcome` (`ok` = accepted, `app_error` = refused by the service,
    /// `transport_error`).
    STREAMS = "tern_transport_streams_total", Counter,
        "Streaming calls opened, by transport, service, method, side and outcome of the opening.";
    /// Open streams; labels `transport`, `side`.
    STREAMS_ACTIVE = "tern_transport_streams_active", Gauge,
        "Streaming calls open now, by transport and side.";
    /// Queue depth; labels `transport`, `lane`.
    QUEUE_DEPTH = "tern_transport_queue_depth", Gauge,
        "Calls waiting for a slot, by transport and priority lane.";
    /// In-flight calls; labels `transport`, `side`.
    IN_FLIGHT = "tern_transport_in_flight", Gauge,
        "Calls in flight, by transport and side.";
    /// Authentication failures and refusals at a connection limit; labels
    /// `transport`, `reason`.
    AUTH_FAILURES = "tern_transport_auth_failures_total", Counter,
        "Connections and calls refused before any work: identity not proven (TLS handshake, wrong peer, anonymous caller) or a connection limit, by reason.";
    /// Calls sent by the router; labels `service`, `transport`.
    ROUTER_CALLS = "tern_router_calls_total", Counter,
        "Call attempts the dual router made, by service and transport.";
    /// Fallbacks to gRPC; labels `service`, `method`, `reason` (a
    /// transport error kind, `breaker_open` or `path_dead`; which are
    /// unplanned: [`fallback_is_unplanned`]).
    ROUTER_FALLBACKS = "tern_router_fallbacks_total", Counter,
        "Calls the dual router sent over gRPC after iroh failed or was cooling down, by reason (unplanned: unreachable, connection_lost, wrong_peer, protocol, path_dead; planned: timed_out, breaker_open, overloaded, peer_shutting_down, local_shutdown, not_served).";
    /// Checks of a slow iroh call's path; labels `outcome` (`alive`,
    /// `dead`).
    ROUTER_PATH_CHECKS = "tern_router_path_checks_total", Counter,
        "Pings the dual router sent on the iroh path of a call that was slow to answer, by outcome; a dead path sends the call over gRPC at once.";
    /// iroh endpoint rebuilds; labels `reason` (`probe`: it stopped
    /// answering its own liveness probe; `closed`: it closed by itself).
    IROH_ENDPOINT_REBUILDS = "tern_iroh_endpoint_rebuilds_total", Counter,
        "Times the iroh endpoint was found dead and rebuilt with the same key and port, by reason (probe: stopped answering its liveness probe; closed: closed by itself).";
    /// 1 while the iroh endpoint answers its liveness probe.
    IROH_ENDPOINT_HEALTHY = "tern_iroh_endpoint_healthy", Gauge,
        "1 while the iroh endpoint answers its own liveness probe, 0 from the first unanswered probe until it answers again (rebuilt or recovered).";
    /// Unanswered liveness probes of the iroh endpoint.
    IROH_ENDPOINT_PROBE_FAILURES = "tern_iroh_endpoint_probe_failures_total", Counter,
        "Liveness probes of the iroh endpoint that got no answer in time; several in a row rebuild the endpoint.";
    /// Calls that met 0-RTT early data on iroh; label `outcome`: on the
    /// server `served_early` (a read-only call answered before the
    /// handshake finished), `held` (any other call that arrived in early
    /// data, run only once the handshake proved the caller), `dropped` (a
    /// held call whose handshake never finished, e.g. a replay: never
    /// run); on the client `sent_early` (a read-only call sent in early
    /// data) and `rejected` (the peer refused the early data; the call was
    /// sent again after the handshake).
    IROH_EARLY_DATA_CALLS = "tern_iroh_early_data_calls_total", Counter,
        "iroh calls that met 0-RTT early data, by outcome (server: served_early, held, dropped; client: sent_early, rejected). dropped counts calls in early data whose handshake never finished, such as replays: never run.";
    /// Reroutes for capability; labels `service`, `reason`.
    ROUTER_REROUTES = "tern_router_reroutes_total", Counter,
        "Calls sent over the non-preferred transport because the peer or this node lacks the preferred one.";
    /// Adaptive switches; labels `from`, `to`.
    ROUTER_ADAPTIVE_SWITCHES = "tern_router_adaptive_switches_total", Counter,
        "Adaptive Raft transport switches, by direction.";
    /// Adaptive choice per peer; labels `peer`.
    ROUTER_ADAPTIVE_IROH = "tern_router_adaptive_iroh", Gauge,
        "1 when adaptive Raft traffic to the peer uses iroh, 0 for gRPC.";
    /// Policy changes.
    ROUTER_POLICY_CHANGES = "tern_router_policy_changes_total", Counter,
        "Transport policy changes applied on this node.";
    /// Changes of the policy in force or its source, by the new source.
    TRANSPORT_POLICY_CHANGES = "tern_transport_policy_changes_total", Counter,
        "Changes of the transport policy in force or of where it comes from, by the new source (file, node, group, all, default).";
    /// 1 for the source of the policy in force, 0 for the others.
    TRANSPORT_POLICY_SOURCE = "tern_transport_policy_source", Gauge,
        "1 for where the transport policy in force comes from (file, node, group, all, default), 0 for the others.";
    /// Desired policies this node could not run.
    TRANSPORT_POLICY_REFUSED = "tern_transport_policy_refused_total", Counter,
        "Desired transport policies from the cluster this node refused (it cannot run them, e.g. iroh without listen.iroh).";
    /// Elections started.
    RAFT_ELECTIONS = "tern_raft_elections_total", Counter,
        "Raft elections this node started or took part in as candidate.";
    /// Member address updates the leader recorded.
    MEMBERSHIP_ADDRESS_UPDATES = "tern_membership_address_updates_total", Counter,
        "Members' address changes this node recorded in the membership as leader (asked by the member itself, or its own).";
    /// Leader changes.
    RAFT_LEADER_CHANGES = "tern_raft_leader_changes_total", Counter,
        "Times this node saw the Raft leader change.";
    /// Heartbeat latency; labels `transport`, `peer` (the follower's node
    /// id): the leader's round trip to each peer.
    RAFT_HEARTBEAT_SECONDS = "tern_raft_heartbeat_seconds", Histogram,
        "Round trip of Raft heartbeats from the leader, by transport and follower.";
    /// Replication lag; labels `peer`.
    RAFT_REPLICATION_LAG = "tern_raft_replication_lag_entries", Gauge,
        "Log entries a follower is behind the leader (on the leader).";
    /// Append batches in flight on a replication stream; labels `peer`
    /// (the follower's node id).
    RAFT_APPEND_IN_FLIGHT = "tern_raft_append_batches_in_flight", Gauge,
        "Append-entries batches the leader sent a follower on its replication stream and has no answer for yet.";
    /// Replication stream openings; labels `outcome` (`opened`, `failed`,
    /// `unary`: the follower serves no streams, appends go one by one).
    RAFT_APPEND_STREAMS = "tern_raft_append_streams_total", Counter,
        "Replication streams (Raft/AppendStream) the leader opened to followers, by outcome.";
    /// Append batches carried by replication streams; labels `side`
    /// (`client`: sent by a leader, `server`: served by a follower).
    RAFT_APPEND_STREAM_BATCHES = "tern_raft_append_stream_batches_total", Counter,
        "Append-entries batches carried on replication streams, sent (client) or served (server).";
    /// This node's role; labels `role` (`server`: a Raft member, `agent`:
    /// runs VMs, follows the servers).
    NODE_ROLE = "tern_node_role", Gauge,
        "1 for this node's role (server or agent).";
    /// Agents in this server's applied state; labels `status`
    /// (`ready`|`down`).
    AGENTS = "tern_agents", Gauge,
        "Agents registered with the cluster, by status, as this server's applied state has them.";
    /// The longest time since an agent's last heartbeat (the leader only,
    /// over ready agents).
    AGENT_HEARTBEAT_AGE_MAX = "tern_agent_heartbeat_age_max_seconds", Gauge,
        "On the leader: the longest time since a ready agent's last heartbeat.";
    /// Agents the leader marked down or ready again; labels `status`.
    AGENT_STATUS_CHANGES = "tern_agent_status_changes_total", Counter,
        "Agents the leader marked down (heartbeats stopped) or ready again, by new status.";
    /// Agents' heartbeats a server acknowledged; labels `via` (`direct`:
    /// the leader took it, `relay`: a follower took it and the leader took
    /// the follower's relay).
    AGENT_HEARTBEATS = "tern_agent_heartbeats_total", Counter,
        "Agents' heartbeats this server acknowledged, by path (direct to the leader, or relayed by a follower).";
    /// On a follower: relays of agents' heartbeats the leader did not
    /// take (the agents are told to heartbeat to the leader directly).
    AGENT_RELAY_FAILURES = "tern_agent_relay_failures_total", Counter,
        "On a follower: relays of agents' heartbeats the leader did not take (those agents turn to the leader).";
    /// On an agent: the time since the last heartbeat the leader
    /// acknowledged was sent (what the agent's fence counts).
    AGENT_HEARTBEAT_AGE = "tern_agent_heartbeat_age_seconds", Gauge,
        "On an agent: time since the last heartbeat the leader acknowledged was sent (what the fence counts).";
    /// On an agent: 1 while it is fenced (no acknowledged heartbeat for
    /// its fence bound: it stops its VMs and starts none).
    AGENT_FENCED = "tern_agent_fenced", Gauge,
        "On an agent: 1 while fenced (its heartbeats go unacknowledged; its VMs are stopped).";
    /// Current term.
    RAFT_TERM = "tern_raft_term", Gauge,
        "Current Raft term.";
    /// Applied index.
    RAFT_APPLIED_INDEX = "tern_raft_applied_index", Gauge,
        "Last log index applied to the state machine.";
    /// Whether this node leads.
    RAFT_IS_LEADER = "tern_raft_is_leader", Gauge,
        "1 when this node is the Raft leader.";
    /// Whether this node knows a leader (itself included).
    RAFT_HAS_LEADER = "tern_raft_has_leader", Gauge,
        "1 when this node knows a Raft leader (itself or another member), 0 when it knows none.";
    /// Committed proposals' latency: a write proposed on this node (it
    /// leads) until it is committed and applied.
    RAFT_PROPOSAL_SECONDS = "tern_raft_proposal_seconds", Histogram,
        "Time from proposing a write to Raft until it was committed and applied, for writes that committed.";
    /// Proposals Raft did not commit; labels `reason` (`not_leader`:
    /// leadership moved or was lost, `raft_api`: refused by Raft, `stopped`:
    /// Raft stopped). Writes refused by a size limit are not proposals.
    RAFT_PROPOSALS_FAILED = "tern_raft_proposals_failed_total", Counter,
        "Writes proposed to Raft that were not committed, by reason.";
    /// Log syncs (`fdatasync` of the segment files written), one per group
    /// commit.
    STORE_SYNC_SECONDS = "tern_store_sync_seconds", Histogram,
        "Time of one Raft log sync (fdatasync of the log files written), which every acknowledged write waits for.";
    /// Snapshot builds of the state that wrote a new snapshot file: the
    /// copy under the apply lock, the encoding and the sync.
    STORE_SNAPSHOT_BUILD_SECONDS = "tern_store_snapshot_build_seconds", Histogram,
        "Time to build one snapshot of the state (copy, encode, write and sync the file), off the apply path.";
    /// When the last snapshot build finished, so a client's latencies can
    /// be set beside it.
    STORE_SNAPSHOT_LAST_BUILT = "tern_store_snapshot_last_built_timestamp_seconds", Gauge,
        "Unix time at which this node last finished building a snapshot (0 before the first).";
    /// Calls refused by the access table; labels `service`, `method`,
    /// `reason` (`unknown_key`, `needs_role`, `members_only`, `no_rule`).
    ACCESS_DENIED = "tern_access_denied_total", Counter,
        "Calls refused by the access table before dispatch, by service, method and reason.";
    /// Join attempts refused; labels `reason` (`bad_token`, `expired`,
    /// `used_up`, `rate_limited`, `not_itself`).
    JOIN_REFUSED = "tern_cluster_join_refused_total", Counter,
        "Cluster/Join calls refused by the leader, by reason.";
    /// Process CPU time.
    PROCESS_CPU_SECONDS = "process_cpu_seconds_total", Counter,
        "User and system CPU time spent by the process.";
    /// Resident memory.
    PROCESS_RESIDENT_MEMORY = "process_resident_memory_bytes", Gauge,
        "Resident memory of the process.";
    /// Virtual memory.
    PROCESS_VIRTUAL_MEMORY = "process_virtual_memory_bytes", Gauge,
        "Virtual memory of the process.";
    /// Open file descriptors.
    PROCESS_OPEN_FDS = "process_open_fds", Gauge,
        "Open file descriptors of the process.";
    /// File descriptor limit.
    PROCESS_MAX_FDS = "process_max_fds", Gauge,
        "Limit on open file descriptors of the process.";
    /// Threads.
    PROCESS_THREADS = "process_threads", Gauge,
        "Threads of the process.";
}

/// Label values shared by both transports, so their series compare on one
/// dashboard. Defined once here, like the names.
macro_rules! label_values {
    ($( $(#[$doc:meta])* $name:ident { $( $(#[$vdoc:meta])* $variant:ident = $value:literal, )* } )*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
            pub enum $name {
                $( $(#[$vdoc])* $variant, )*
            }

            impl $name {
                /// The label value (`const`, so a transport can build its
                /// label sets in statics and record without allocating).
                pub const fn as_str(self) -> &'static str {
                    match self {
                        $( $name::$variant => $value, )*
                    }
                }
            }
        )*
    };
}

label_values! {
    /// The `side` label: which end of a call or connection records.
    Side {
        /// We dialled / we called.
        Client = "client",
        /// We accepted / we served.
        Server = "server",
    }
    /// The `outcome` label of [`CALLS`].
    Outcome {
        /// Answered with a response.
        Ok = "ok",
        /// Answered with an application error.
        AppError = "app_error",
        /// Failed below the application (or was cancelled).
        TransportError = "transport_error",
    }
    /// The `direction` label of [`MESSAGES`] and [`BYTES`].
    Direction {
        /// Sent by this node.
        Sent = "sent",
        /// Received by this node.
        Received = "received",
    }
}

/// The `reason` of a [`ROUTER_FALLBACKS`] sample when a slow iroh call
/// was abandoned because its path did not answer a ping (or a short call
/// timed out on a path the last such ping found dead): the path is broken,
/// not the peer slow.
pub const FALLBACK_PATH_DEAD: &str = "path_dead";

/// The `reason` of a [`ROUTER_FALLBACKS`] sample for a call sent straight
/// to gRPC while the peer's iroh breaker was open.
pub const FALLBACK_BREAKER_OPEN: &str = "breaker_open";

/// Fallback reasons that are planned or benign: the iroh path itself did
/// not fail.
///
/// - `timed_out`: the call's iroh budget passed with no answer and no ping
///   found the path dead — a missed deadline, as a Raft heartbeat on a
///   loaded machine misses it, then sent again over gRPC;
/// - `breaker_open`: sent over gRPC while the breaker cooled down; the
///   failures that opened it were counted (and classed) when they happened;
/// - `overloaded`: a local limit (calls in flight, queue) refused it;
/// - `peer_shutting_down`, `local_shutdown`: a node stopping or restarting
///   (an upgrade, an operator's restart);
/// - `not_served`: a node without iroh (a policy or capability matter).
pub const PLANNED_FALLBACK_REASONS: &[&str] = &[
    "timed_out",
    FALLBACK_BREAKER_OPEN,
    "overloaded",
    "peer_shutting_down",
    "local_shutdown",
    "not_served",
];

/// Whether a fallback with this `reason` is **unplanned**: the iroh path
/// failed (`unreachable`: no connection or handshake; `connection_lost`:
/// the connection or stream broke; `wrong_peer`: the peer's identity did
/// not match; `protocol`: broken frames; [`FALLBACK_PATH_DEAD`]: the path
/// stopped answering pings, as when UDP is blocked). Any reason not in
/// [`PLANNED_FALLBACK_REASONS`] counts as unplanned, so a reason added
/// later is judged strictly until it is classed. The rollout's
/// `fallbacks` gate and the lab's criteria count only these.
pub fn fallback_is_unplanned(reason: &str) -> bool {
    !PLANNED_FALLBACK_REASONS.contains(&reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallbacks_are_unplanned_only_when_the_iroh_path_failed() {
        for planned in [
            "timed_out",
            "breaker_open",
            "overloaded",
            "peer_shutting_down",
            "local_shutdown",
            "not_served",
        ] {
            assert!(!fallback_is_unplanned(planned), "{planned}");
        }
        for unplanned in [
            "unreachable",
            "connection_lost",
            "wrong_peer",
            "protocol",
            FALLBACK_PATH_DEAD,
            "a_reason_added_later",
        ] {
            assert!(fallback_is_unplanned(unplanned), "{unplanned}");
        }
    }

    #[test]
    fn names_are_unique_and_conventional() {
        let mut names: Vec<&str> = ALL.iter().map(|m| m.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "duplicate metric name");
        for m in ALL {
            assert!(
                m.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == MetricKind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
            assert!(!m.help.is_empty());
        }
    }
}
