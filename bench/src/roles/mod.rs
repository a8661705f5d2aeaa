//! The worker roles: `handoff-bench role NAME ...`, started by the orchestrator, by another role,
//! or by a Node script (`bench/node/*.js`). A parent role starts its child from the command after
//! `--`. The role that measures prints one `BENCH {json}` line on stdout (children inherit the
//! parent's stdout, so the orchestrator reads them all from one pipe).
//!
//! Each scenario has a handoff implementation (tokio; the runtime flavour is
//! `$HANDOFF_BENCH_RT`: `current`, the default, as the README advises and the examples use, or
//! `multi`, as plain `#[tokio::main]`) and a bare one (std + libc, blocking; see [`crate::bare`]).

pub mod children;
pub mod cluster;
pub mod handles;
pub mod loadgen;
pub mod msg;
pub mod rtt;
pub mod scale;
pub mod seed;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};

/// A worker role.
#[derive(Debug, Subcommand)]
pub enum Role {
    /// Streams messages to a child for a while, then disconnects.
    MsgSend(msg::SendArgs),
    /// Counts messages from the parent; reports count and time from first to last.
    MsgRecv(msg::RecvArgs),
    /// Ping-pong with a child; reports p50/p99 round-trip times.
    RttPing(rtt::PingArgs),
    /// Answers each message from the parent with the same message.
    RttEcho(rtt::EchoArgs),
    /// Creates TCP connection pairs, hands one end of each to a child.
    HandlesSend(handles::SendArgs),
    /// Receives and closes handles; reports handles/s.
    HandlesRecv(handles::RecvArgs),
    /// The seed's parent: listens, hands every connection to a child.
    SeedParent(seed::ParentArgs),
    /// The seed's child: answers each handed connection with `Child handled it.`.
    SeedChild(seed::ChildArgs),
    /// A cluster primary with two workers.
    ClusterPrimary(cluster::PrimaryArgs),
    /// A cluster worker answering each connection with `Child handled it.`.
    ClusterWorker(cluster::WorkerArgs),
    /// Connection-per-request load generator.
    Loadgen(loadgen::LoadArgs),
    /// Opens connections to a cluster and keeps them open.
    KeepaliveHold(scale::HoldArgs),
    /// Starts many echo children and keeps messages in flight on every channel at once.
    ChildrenParent(children::ParentArgs),
}

/// Which implementation a role uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Impl {
    /// The handoff library.
    Handoff,
    /// Bare syscalls.
    Bare,
}

/// Runs a role.
pub fn run(role: Role) -> Result<()> {
    crate::procs::die_with_parent();
    // Last line of defence: no role outlives a stuck run by much.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(600));
        eprintln!("handoff-bench role: still running after 600 s; exiting");
        std::process::exit(3);
    });
    match role {
        Role::MsgSend(a) => msg::send(a),
        Role::MsgRecv(a) => msg::recv(a),
        Role::RttPing(a) => rtt::ping(a),
        Role::RttEcho(a) => rtt::echo(a),
        Role::HandlesSend(a) => handles::send(a),
        Role::HandlesRecv(a) => handles::recv(a),
        Role::SeedParent(a) => seed::parent(a),
        Role::SeedChild(a) => seed::child(a),
        Role::ClusterPrimary(a) => cluster::primary(a),
        Role::ClusterWorker(a) => cluster::worker(a),
        Role::Loadgen(a) => loadgen::run(a),
        Role::KeepaliveHold(a) => scale::hold(a),
        Role::ChildrenParent(a) => children::parent(a),
    }
}

/// The tokio runtime for handoff roles (`$HANDOFF_BENCH_RT`).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    let mut builder = match std::env::var("HANDOFF_BENCH_RT").as_deref() {
        Ok("current") | Err(_) => tokio::runtime::Builder::new_current_thread(),
        Ok("multi") => tokio::runtime::Builder::new_multi_thread(),
        Ok(other) => bail!("HANDOFF_BENCH_RT={other:?}: expected multi or current"),
    };
    Ok(builder.enable_all().build()?)
}

/// Runs `main` on [`runtime`] as a spawned task rather than as the `block_on` future itself: a
/// `block_on` future woken by another task (a channel's driver delivering a message) makes the
/// current-thread scheduler poll the reactor once more (`epoll_wait` with timeout 0) before it
/// runs again; a task is simply queued.
pub fn run_spawned<F>(main: F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    runtime()?.block_on(async { tokio::spawn(main).await? })
}

/// Prints a role's result line.
pub fn emit(role: &str, mut value: serde_json::Value) {
    use std::io::Write;
    value["role"] = role.into();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}{}", crate::procs::RESULT_PREFIX, value);
    let _ = out.flush();
}

/// Starts `argv` as a handoff child (killed if this process drops it).
pub fn spawn_handoff_child(
    argv: &[String],
    config: Option<handoff::ChannelConfig>,
) -> Result<handoff::Child> {
    let (program, args) = argv.split_first().context("no child command after --")?;
    let mut command = handoff::Command::new(program);
    command.args(args).kill_on_drop(true);
    if let Some(config) = config {
        command.channel_config(config);
    }
    command.spawn().with_context(|| format!("spawning {}", argv.join(" ")))
}

/// The channel our parent opened (handoff or Node).
pub fn handoff_parent(config: Option<handoff::ChannelConfig>) -> Result<handoff::Channel> {
    let channel = match config {
        Some(config) => handoff::process::parent_channel_with_config(config)?,
        None => handoff::process::parent_channel()?,
    };
    channel.context("started without an IPC channel (NODE_CHANNEL_FD)")
}

/// Waits for the child's `"ready"` message.
pub async fn wait_ready(child: &mut handoff::Child) -> Result<()> {
    wait_for(child, "ready").await
}

/// Waits for the string message `word`, skipping others.
pub async fn wait_for(child: &mut handoff::Child, word: &str) -> Result<()> {
    while let Some(message) = child.recv().await {
        if message?.deserialize::<String>().is_ok_and(|m| m == word) {
            return Ok(());
        }
    }
    bail!("the child closed the channel before saying {word:?}")
}

/// Waits (blocking) for the bare child's `"ready"\n` line.
pub fn bare_wait_ready(fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let n = crate::bare::read(fd, &mut buf)?;
        if n == 0 {
            bail!("the bare child closed the channel before saying ready");
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// Percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
