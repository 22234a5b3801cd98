//! The `tern` binary: its command line (clap's definitions and the
//! dispatch of each command to the `tern_node` library, which does the
//! work) and `tern wire`, which shows the wire protocol frame by frame.
//!
//! - `tern run [--config FILE]`: run a node (see `tern_node::run`).
//! - `tern demo [--duration SECS] [--soak SECS] [--plan PLAN.toml]
//!   [--agents N]`: a local cluster of 3 servers and N agents running the
//!   rollout live (see `tern_node::demo`).
//! - `tern status`, `tern vm ...`, `tern cluster ...`, `tern transport ...`:
//!   talk to a running node over gRPC or iroh (see `tern_node::client`).
//! - `tern access grant|revoke|list|log`: the access table; `tern key new
//!   --out FILE`: an operator key (`--key FILE` on any client command).
//! - `tern check-config --config FILE`: check a config file.
//! - `tern wire`: the wire protocol shown frame by frame.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use clap::{Args, Parser, Subcommand};
use prost::Message;
use tern_node::cli::{self, Out, PolicyEdit, VmCmd};
use tern_node::client::{Conn, Target};
use tern_node::error::CliError;
use tern_node::policy_cli;
use tern_protocol::catalog::methods;
use tern_protocol::frame::{self, Decoded, Header, Limits};
use tern_protocol::{FrameKind, Priority, pb};

/// The allocator of the whole binary: jemalloc rather than glibc's
/// malloc. A node's calls allocate and free many small buffers across
/// threads (frames, headers, entries); `perf record` of a leader taking
/// 256 writers over gRPC put glibc's malloc and free (with
/// `malloc_consolidate` and `unlink_chunk`, its fragmentation work) at
/// 21% of the leader's CPU. Measured on 3 `tern` processes (`tern-bench
/// cluster --only grpc --writers 256`): glibc 14,460 commits/s at 0.090
/// ms of CPU per commit, peak RSS 80 to 94 MB per node; jemalloc 17,434
/// at 0.071 ms, 101 to 115 MB; mimalloc 15,609 at 0.082 ms, 158 to 168
/// MB. With 1 or 64 writers jemalloc is level with glibc or ahead.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Tern: microVMs across machines, over gRPC and iroh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which node to talk to, and how.
#[derive(Args, Clone, Debug)]
struct Connect {
    /// The node as ID@URL: its 64-hex-digit id and its gRPC URL
    /// (https://HOST:PORT) and/or iroh address (IP:PORT), comma-separated.
    #[arg(long, global = true)]
    node: Option<String>,
    /// A node's data directory: its addresses come from DIR/node.json and
    /// the CLI calls with the node's own key (local admin).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// A node's config file (for its data directory).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// The transport to call over.
    #[arg(long, global = true, value_parser = ["grpc", "iroh"], default_value = "grpc")]
    transport: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Call with this secret key file (`tern key new --out FILE`) instead
    /// of the data directory's node key or a throw-away key.
    #[arg(long = "key", value_name = "FILE", global = true)]
    key_file: Option<PathBuf>,
}

impl Connect {
    fn target(&self) -> Target {
        Target {
            node: self.node.clone(),
            data_dir: self.data_dir.clone(),
            config: self.config.clone(),
            transport: Some(self.transport.clone()),
            key: self.key_file.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (no config: a single-node cluster in ./tern-data on loopback).
    Run {
        /// The node's config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Start a local cluster (3 servers, agents), run a VM, walk the rollout live until Ctrl-C.
    Demo {
        /// After the rollout and its rollback, keep showing the cluster
        /// this many seconds, then stop (for scripts and CI; without it,
        /// until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Each stage's soak in seconds (the shipped plan soaks a day).
        #[arg(long, default_value_t = tern_node::demo::rollout::DEFAULT_SOAK_SECS)]
        soak: u64,
        /// Run this plan file instead of the shipped default (its soaks
        /// are set to --soak too).
        #[arg(long, value_name = "PLAN.toml")]
        plan: Option<std::path::PathBuf>,
        /// Agents to start besides the 3 servers (0 to 16); with agents,
        /// the VM runs on one.
        #[arg(long, default_value_t = tern_node::demo::DEFAULT_AGENTS)]
        agents: usize,
    },
    /// A node's status: role, term, leader, members, transport policy.
    Status {
        #[command(flatten)]
        connect: Connect,
    },
    /// MicroVMs.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
        #[command(flatten)]
        connect: Connect,
    },
    /// Cluster membership.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        connect: Connect,
    },
    /// The transport policy.
    Transport {
        #[command(subcommand)]
        command: TransportCommand,
        #[command(flatten)]
        connect: Connect,
    },
    /// The transport rollout: a replicated plan of stages the leader
    /// walks, judged by gates, with pause, abort and rollback.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
        #[command(flatten)]
        connect: Connect,
    },
    /// Who may do what: the cluster's access table.
    Access {
        #[command(subcommand)]
        command: AccessCommand,
        #[command(flatten)]
        connect: Connect,
    },
    /// Secret keys for operators.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Check a node configuration file and print the policy it sets.
    CheckConfig {
        /// The file to check.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the wire protocol: one request's frame, field by field.
    Wire,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Create a VM: `tern vm create NAME -- COMMAND ARGS...` (process runtime).
    Create {
        /// Its name, unique in the cluster.
        name: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory, MiB.
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        /// "process" or "microvm" (empty: "process" when a command is
        /// given, else the node's default).
        #[arg(long, default_value = "")]
        runtime: String,
        /// microvm: guest kernel path on the node.
        #[arg(long, default_value = "")]
        kernel: String,
        /// microvm: initrd path on the node.
        #[arg(long, default_value = "")]
        initrd: String,
        /// microvm: root image path on the node.
        #[arg(long, default_value = "")]
        image: String,
        /// microvm: kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Pin it to this node id (0: placement chooses).
        #[arg(long, default_value_t = 0)]
        pin_node: u64,
        /// User data handed to the guest (at most 1024 bytes).
        #[arg(long, conflicts_with = "user_data_file")]
        user_data: Option<String>,
        /// User data handed to the guest, read from this file.
        #[arg(long)]
        user_data_file: Option<PathBuf>,
        /// process runtime: the workload's argv.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Start a stopped VM.
    Start { vm_id: String },
    /// Stop a VM.
    Stop { vm_id: String },
    /// Delete a VM.
    Delete { vm_id: String },
    /// List VMs.
    List {
        /// Only VMs on this node id.
        #[arg(long, default_value_t = 0)]
        on_node: u64,
    },
    /// One VM's desired and observed state.
    Status { vm_id: String },
    /// Move a VM to another node.
    Migrate {
        vm_id: String,
        /// The target node id.
        #[arg(long)]
        to: u64,
    },
    /// Print every change of the VMs as it happens (Ctrl-C ends it);
    /// resumes on another node of the cluster if the node goes away.
    Watch {
        /// Changes after this revision (`tern vm list` prints one);
        /// default: from now.
        #[arg(long, value_name = "REV")]
        since: Option<u64>,
        /// Only this VM.
        #[arg(long = "vm", value_name = "ID", default_value = "")]
        vm_id: String,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Print the config lines a new node needs to join through this node.
    Join,
    /// Remove a node from the cluster (default: the node talked to). Needs
    /// a member's key: use --data-dir.
    Leave {
        /// The node id to remove.
        node_id: Option<u64>,
    },
    /// The members and the leader.
    Members,
    /// Join tokens: create one for new nodes, list or revoke them (admin).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Make a learner a voter (admin). Joiners become voters by themselves
    /// only while the cluster has fewer than `[cluster] max_voters` voters.
    Promote {
        /// The learner's node id (tern cluster members).
        node_id: u64,
    },
    /// Make a server an agent (admin): it leaves the Raft membership and
    /// keeps its node id and its VMs; restart it with `role = "agent"`.
    Demote {
        /// The server's node id (tern cluster members).
        node_id: u64,
    },
    /// The metadata register: a small replicated key-value map (labels,
    /// operator metadata), written through Raft and read linearizably.
    Meta {
        #[command(subcommand)]
        command: MetaCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; prints it once (the cluster keeps only its hash).
    /// Give it to new nodes as `[cluster] join_token`.
    Create {
        /// How long it admits nodes: e.g. 30m, 1h, 2d (at most 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many nodes it may admit (default: any number until it
        /// expires).
        #[arg(long)]
        uses: Option<u32>,
    },
    /// The live tokens (ids, expiry, uses; never secrets).
    List,
    /// Revoke a token by its id.
    Revoke {
        /// The token's id (8 hex digits, the part before the dot).
        id: String,
    },
}

#[derive(Subcommand)]
enum MetaCommand {
    /// Set KEY to VALUE; prints the log index the write committed at.
    Set {
        /// 1 to 256 bytes, no control characters.
        key: String,
        /// At most 4096 bytes.
        value: String,
        /// Request id that makes a retry safe (default: a fresh one).
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Read KEY linearizably; prints its value and the index read at.
    Get {
        /// The key.
        key: String,
    },
}

#[derive(Subcommand)]
enum AccessCommand {
    /// Grant ROLE (viewer, operator, admin) to KEY (64 hex digits). Admin only.
    Grant {
        /// The key's public id (64 hex digits).
        #[arg(value_name = "KEY")]
        id: String,
        role: String,
    },
    /// Revoke ROLE from KEY. Admin only; the last admin cannot be revoked.
    Revoke {
        /// The key's public id (64 hex digits).
        #[arg(value_name = "KEY")]
        id: String,
        role: String,
    },
    /// Keys and their roles.
    List,
    /// Every recorded access change: when, by whom, what.
    Log,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new secret key to FILE (never overwrites) and print its
    /// public id, the value to grant a role to.
    New {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public id of the secret key in FILE.
    Show { file: PathBuf },
}

#[derive(Subcommand)]
enum TransportCommand {
    /// The policy in force on the node.
    Show,
    /// Change a policy. With --node-id, --group or --all: the cluster's
    /// desired policy for that node, group or every node (operator role,
    /// from any machine; --mode is required). Without: rewrites
    /// `[transport]` in the node's config file (--config), checks it, and
    /// sends the node SIGHUP: the emergency override, which pins the
    /// node's policy and needs no quorum.
    Set {
        #[command(flatten)]
        target: PolicyTargetArgs,
        /// "grpc" | "iroh" | "dual".
        #[arg(long)]
        mode: Option<String>,
        /// Services preferring iroh, comma-separated, or "all_except_raft"
        /// ("" for none).
        #[arg(long)]
        prefer_iroh: Option<String>,
        /// "grpc" | "iroh" | "adaptive".
        #[arg(long)]
        raft: Option<String>,
        /// Whether a failed iroh call may fall back to gRPC.
        #[arg(long)]
        fallback_to_grpc: Option<bool>,
    },
    /// Clear the cluster's desired policy of a node, a group or all
    /// (operator role); the nodes fall back to the next one that applies
    /// (node > group > all > the default).
    Clear {
        #[command(flatten)]
        target: PolicyTargetArgs,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Start a plan (PLAN.toml; the operators' plan ships as
    /// deploy/rollout/default.toml). Operator role.
    Start {
        /// The plan file.
        plan: PathBuf,
    },
    /// The rollout: status, stage in force, covered nodes, last decision.
    Status,
    /// Every decision with the gate figures behind it.
    History,
    /// Stop the clock: nothing advances or rolls back by itself.
    Pause,
    /// Restart the clock (the stage's soak starts again).
    Resume,
    /// Move to the next stage now (the operator's judgement).
    Advance,
    /// Stop at the last good stage (its nodes keep its policy).
    Abort,
    /// Every node back to its pre-rollout policy.
    Rollback {
        /// Required: the rollback covers every node.
        #[arg(long)]
        all: bool,
    },
}

/// Whose desired policy `tern transport set|clear` changes.
#[derive(Args, Clone, Debug)]
struct PolicyTargetArgs {
    /// One node, by node id (`--node` names the node to talk to).
    #[arg(long)]
    node_id: Option<u64>,
    /// The nodes labelled KEY=VALUE (`[node] labels` in their config).
    #[arg(long)]
    group: Option<String>,
    /// Every node.
    #[arg(long)]
    all: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Setup(format!("cannot start the async runtime: {e}")))
}

async fn with_conn<F, Fut>(connect: &Connect, f: F) -> Result<(), CliError>
where
    F: FnOnce(Conn, Out) -> Fut,
    Fut: std::future::Future<Output = (Conn, Result<(), CliError>)>,
{
    let conn = Conn::open(&connect.target()).await?;
    let (conn, result) = f(conn, Out { json: connect.json }).await;
    conn.close().await;
    result
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

/// A CLI error on stderr, with the exit code of its kind.
fn fail_cli(e: &CliError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(e.exit_code())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Wire => match wire() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("{e:#}")),
        },
        Command::Run { config } => {
            tern_node::run::init_logs();
            // Check the file before starting anything: a config error is
            // reported alone, with its key, and exit code 2.
            if let Err(e) = tern_node::run::load(config.as_deref()) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail_cli(&e),
            };
            match rt.block_on(tern_node::run::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(tern_node::node::StartError::Config(e)) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Demo {
            duration,
            soak,
            plan,
            agents,
        } => {
            if std::env::var_os("RUST_LOG").is_some() {
                tern_node::run::init_logs();
            }
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail_cli(&e),
            };
            let opts = tern_node::demo::DemoOptions {
                duration: duration.map(Duration::from_secs),
                soak_secs: soak,
                plan,
                agents,
            };
            match rt.block_on(tern_node::demo::demo(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Status { connect } => client_cmd(&connect, |conn, out| async move {
            let r = cli::status(&conn, out).await;
            (conn, r)
        }),
        Command::Vm { command, connect } => {
            let cmd = match command {
                VmCommand::Create {
                    name,
                    vcpus,
                    memory_mib,
                    runtime,
                    kernel,
                    initrd,
                    image,
                    cmdline,
                    pin_node,
                    user_data,
                    user_data_file,
                    command,
                } => VmCmd::Create(pb::VmSpec {
                    name,
                    vcpus,
                    memory_mib,
                    // A command and no runtime: the process runtime (the
                    // node's default may be microvm, which needs a kernel).
                    runtime: if runtime.is_empty() && !command.is_empty() {
                        "process".into()
                    } else {
                        runtime
                    },
                    kernel,
                    initrd,
                    image,
                    kernel_cmdline: cmdline,
                    command,
                    pin_node,
                    user_data: match cli::user_data_arg(user_data, user_data_file) {
                        Ok(data) => data,
                        Err(e) => return fail_cli(&e),
                    },
                }),
                VmCommand::Start { vm_id } => VmCmd::Start(vm_id),
                VmCommand::Stop { vm_id } => VmCmd::Stop(vm_id),
                VmCommand::Delete { vm_id } => VmCmd::Delete(vm_id),
                VmCommand::List { on_node } => VmCmd::List(on_node),
                VmCommand::Status { vm_id } => VmCmd::Status(vm_id),
                VmCommand::Migrate { vm_id, to } => VmCmd::Migrate(vm_id, to),
                VmCommand::Watch { since, vm_id } => {
                    return client_cmd(&connect, |conn, out| async move {
                        // Ctrl-C ends the watch cleanly: the stream is
                        // dropped (cancelled at the node) and the
                        // connection closed.
                        let r = tokio::select! {
                            r = tern_node::watch::watch(&conn, since, vm_id, out) => r,
                            _ = tokio::signal::ctrl_c() => Ok(()),
                        };
                        (conn, r)
                    });
                }
            };
            client_cmd(&connect, |conn, out| async move {
                let r = cli::vm(&conn, cmd, out).await;
                (conn, r)
            })
        }
        Command::Cluster { command, connect } => client_cmd(&connect, |conn, out| async move {
            let r = match command {
                ClusterCommand::Join => cli::join_info(&conn, out).await,
                ClusterCommand::Leave { node_id } => cli::leave(&conn, node_id, out).await,
                ClusterCommand::Members => cli::members(&conn, out).await,
                ClusterCommand::Promote { node_id } => cli::promote(&conn, node_id, out).await,
                ClusterCommand::Demote { node_id } => cli::demote(&conn, node_id, out).await,
                ClusterCommand::Token {
                    command: TokenCommand::Create { ttl, uses },
                } => cli::token_create(&conn, &ttl, uses, out).await,
                ClusterCommand::Token {
                    command: TokenCommand::List,
                } => cli::token_list(&conn, out).await,
                ClusterCommand::Token {
                    command: TokenCommand::Revoke { id },
                } => cli::token_revoke(&conn, &id, out).await,
                ClusterCommand::Meta {
                    command:
                        MetaCommand::Set {
                            key,
                            value,
                            request_id,
                        },
                } => cli::meta_set(&conn, key, value, request_id, out).await,
                ClusterCommand::Meta {
                    command: MetaCommand::Get { key },
                } => cli::meta_get(&conn, key, out).await,
            };
            (conn, r)
        }),
        Command::Rollout { command, connect } => rollout_cmd(&connect, command),
        Command::Access { command, connect } => client_cmd(&connect, |conn, out| async move {
            let r = match command {
                AccessCommand::Grant { id, role } => {
                    cli::access_change(&conn, &id, &role, true, out).await
                }
                AccessCommand::Revoke { id, role } => {
                    cli::access_change(&conn, &id, &role, false, out).await
                }
                AccessCommand::List => cli::access_list(&conn, out).await,
                AccessCommand::Log => cli::access_log(&conn, out).await,
            };
            (conn, r)
        }),
        Command::Key { command } => {
            let result = match command {
                KeyCommand::New { out } => tern_node::client::new_key_file(&out),
                KeyCommand::Show { file } => tern_node::client::key_file_id(&file),
            };
            match result {
                Ok(id) => {
                    println!("{id}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail_cli(&e),
            }
        }
        Command::Transport { command, connect } => {
            let config = connect.config.clone();
            client_cmd(&connect, |conn, out| async move {
                let r = match command {
                    TransportCommand::Show => cli::transport_show(&conn, out).await,
                    TransportCommand::Set {
                        target,
                        mode,
                        prefer_iroh,
                        raft,
                        fallback_to_grpc,
                    } => {
                        let edit = PolicyEdit {
                            mode,
                            prefer_iroh: prefer_iroh.map(|p| {
                                p.split(',')
                                    .map(str::trim)
                                    .filter(|s| !s.is_empty())
                                    .map(str::to_owned)
                                    .collect()
                            }),
                            raft_transport: raft,
                            fallback_to_grpc,
                        };
                        transport_set(&conn, config.as_deref(), &target, &edit, out).await
                    }
                    TransportCommand::Clear { target } => {
                        match policy_cli::target(target.node_id, target.group.as_deref(), target.all) {
                            Ok(Some(t)) => policy_cli::set_remote(&conn, &t, None, out).await,
                            Ok(None) => Err(CliError::Argument("`tern transport clear` needs --node-id ID, --group KEY=VALUE or --all (to unpin a node's file, remove its [transport] section and send SIGHUP)".into())),
                            Err(e) => Err(e),
                        }
                    }
                };
                (conn, r)
            })
        }
    }
}

/// `tern rollout ...`.
fn rollout_cmd(connect: &Connect, command: RolloutCommand) -> ExitCode {
    use tern_node::rollout_cli;
    // The plan is read and checked before any connection is made.
    let plan = match &command {
        RolloutCommand::Start { plan } => match rollout_cli::load_plan(plan) {
            Ok(p) => Some(p),
            Err(e) => return fail_cli(&e),
        },
        RolloutCommand::Rollback { all: false } => {
            return fail_cli(&CliError::Argument(
                "`tern rollout rollback` needs --all: it returns every node to its pre-rollout policy (to go back to the last good stage, use `tern rollout abort`)".into(),
            ));
        }
        _ => None,
    };
    client_cmd(connect, |conn, out| async move {
        let r = match command {
            RolloutCommand::Start { .. } => {
                rollout_cli::change(&conn, "start", plan.as_ref(), out).await
            }
            RolloutCommand::Status => rollout_cli::status(&conn, out).await,
            RolloutCommand::History => rollout_cli::history(&conn, out).await,
            RolloutCommand::Pause => rollout_cli::change(&conn, "pause", None, out).await,
            RolloutCommand::Resume => rollout_cli::change(&conn, "resume", None, out).await,
            RolloutCommand::Advance => rollout_cli::change(&conn, "advance", None, out).await,
            RolloutCommand::Abort => rollout_cli::change(&conn, "abort", None, out).await,
            RolloutCommand::Rollback { .. } => {
                rollout_cli::change(&conn, "rollback-all", None, out).await
            }
        };
        (conn, r)
    })
}

/// `tern transport set`: the cluster's desired policy with a target, the
/// node's own file (and SIGHUP) without one.
async fn transport_set(
    conn: &Conn,
    config: Option<&std::path::Path>,
    target: &PolicyTargetArgs,
    edit: &PolicyEdit,
    out: cli::Out,
) -> Result<(), CliError> {
    match policy_cli::target(target.node_id, target.group.as_deref(), target.all)? {
        Some(t) => {
            let policy = policy_cli::policy_of(edit)?;
            policy_cli::set_remote(conn, &t, Some(&policy), out).await
        }
        None => match config {
            None => Err(CliError::Argument("`tern transport set` needs --node-id ID, --group KEY=VALUE or --all to set the cluster's desired policy, or --config FILE to edit (and pin) a node's own file".into())),
            Some(path) => cli::transport_set(conn, path, edit, out).await,
        },
    }
}

fn client_cmd<F, Fut>(connect: &Connect, f: F) -> ExitCode
where
    F: FnOnce(Conn, Out) -> Fut,
    Fut: std::future::Future<Output = (Conn, Result<(), CliError>)>,
{
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail_cli(&e),
    };
    match rt.block_on(with_conn(connect, f)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail_cli(&e),
    }
}

fn check_config(config: &std::path::Path) -> ExitCode {
    match tern_node::config::Config::load(config) {
        Ok(checked) => {
            println!("{}: ok", config.display());
            let c = &checked.config;
            let show = |l: tern_node::config::Listen| {
                l.addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "off".into())
            };
            println!("  data_dir  {}", c.data_dir.display());
            println!("  grpc      {}", show(c.listen.grpc));
            println!("  iroh      {}", show(c.listen.iroh));
            println!("  metrics   {}", show(c.listen.metrics));
            println!("  runtime   {:?}", c.vm.runtime);
            println!("  join via  {} member(s)", checked.seeds.len());
            println!("  policy    {:?}", checked.policy.to_config());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn wire() -> anyhow::Result<()> {
    println!("tern {}: wire protocol demo", env!("CARGO_PKG_VERSION"));
    println!("(the frame format every iroh call uses)\n");

    let request = pb::CreateVmRequest {
        request_id: "demo-1".into(),
        spec: Some(pb::VmSpec {
            name: "web-1".into(),
            vcpus: 2,
            memory_mib: 512,
            runtime: "process".into(),
            command: vec!["sleep".into(), "3600".into()],
            ..Default::default()
        }),
    };
    let method = methods::VM_CREATE;
    let header = Header {
        kind: FrameKind::Request,
        priority: method.priority,
        idempotent: method.idempotent,
        service: method.service,
        method: method.id,
        request_id: 42,
        payload_len: 0,
        deadline_ms: 5_000,
    };
    let limits = Limits::default();
    let frame = frame::Frame::new(header, request.encode_to_vec().into(), limits)?;

    let mut wire = BytesMut::new();
    let mut encoded = frame.encode();
    while encoded.has_remaining() {
        let chunk = encoded.chunk();
        wire.extend_from_slice(chunk);
        let n = chunk.len();
        encoded.advance(n);
    }
    println!(
        "request {} ({}), {} bytes on the wire:",
        method.grpc_path(),
        method.label(),
        wire.len()
    );
    let h = &wire[..frame::HEADER_LEN];
    println!("  version      {:02x}", h[0]);
    println!("  kind         {:02x}             request", h[1]);
    println!(
        "  flags        {:02x} {:02x}          priority {}, idempotent {}",
        h[2],
        h[3],
        method.priority.as_str(),
        method.idempotent
    );
    println!(
        "  service      {:02x} {:02x}          {}",
        h[4], h[5], method.service
    );
    println!(
        "  method       {:02x} {:02x}          {}",
        h[6], h[7], method.name
    );
    println!("  request id   {}", hex(&h[8..16]));
    println!(
        "  payload len  {}    {} bytes",
        hex(&h[16..20]),
        frame.payload.len()
    );
    println!("  deadline ms  {}    5000 ms", hex(&h[20..24]));

    match frame::decode(&mut wire, limits)? {
        Decoded::Frame(back) => {
            let decoded = pb::CreateVmRequest::decode(back.payload.clone())?;
            println!(
                "\ndecoded back: request {} for vm {:?}",
                back.header.request_id,
                decoded.spec.map(|s| s.name)
            );
        }
        Decoded::Incomplete { needed } => {
            anyhow::bail!("demo frame incomplete, {needed} bytes short")
        }
    }

    let mut oversized = header;
    oversized.payload_len = limits.max_payload + 1;
    let mut bad = BytesMut::from(&oversized.encode()[..]);
    println!(
        "an oversized header is refused before its payload is read: {}",
        frame::decode(&mut bad, limits)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    let mut garbage = BytesMut::from(&[9u8; 24][..]);
    println!(
        "garbage is a typed error, not a panic: {}",
        frame::decode(&mut garbage, limits)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    let _ = Priority::Control;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
