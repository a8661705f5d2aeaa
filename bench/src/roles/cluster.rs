//! The cluster: a primary listens on 127.0.0.1:0 and its workers (two unless `--workers`) answer
//! each connection with `Child handled it.` and close it, round-robin (the primary accepts and hands each connection
//! over) or shared (the workers accept on the primary's listener). The primary prints
//! `BENCH {"role":"seed-ready","addr":...,"pids":[primary, worker, ...]}` once every worker
//! serves. With `--control` (handoff only) it also takes signals: see [`super::scale::control`].
//! A worker with `--hold` keeps each connection after its answer until the client hangs up.
//!
//! - `handoff`: [`handoff::cluster::Primary`]; its workers are any command (this binary's
//!   `cluster-worker --impl handoff`, or an unchanged Node app).
//! - `bare`: the least a cluster can do with the same guarantee — round-robin: `poll` over the
//!   listener and the two channels, `accept`, one `sendmsg` with the descriptor per connection,
//!   the primary's copy closed when the worker's one-byte ack for it arrives; shared: the workers
//!   block in `accept` on the inherited listener and the primary only waits.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::{emit, runtime, Impl};
use crate::bare;
use crate::payload::REPLY;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Schedule {
    /// The primary accepts and hands connections over.
    Rr,
    /// The workers accept on the shared listener.
    Shared,
}

#[derive(Debug, Args)]
pub struct PrimaryArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
    #[arg(long, value_enum)]
    schedule: Schedule,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Connections handed to one worker and not yet answered, at most (handoff only; default:
    /// the library's).
    #[arg(long)]
    window: Option<usize>,
    /// Take control signals (handoff only): SIGUSR1 prints the status, SIGUSR2 reloads.
    #[arg(long)]
    control: bool,
    /// The worker command.
    #[arg(last = true, required = true)]
    worker: Vec<String>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
    /// After answering, keep each connection until the client hangs up (handoff only), as a Node
    /// app's `socket.end(reply)` does.
    #[arg(long)]
    hold: bool,
    /// Ignored (Node's primary passes its `exec` setting first).
    #[arg(hide = true)]
    rest: Vec<String>,
}

pub fn primary(args: PrimaryArgs) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    match args.imp {
        Impl::Handoff => runtime()?.block_on(primary_handoff(args)),
        Impl::Bare => primary_bare(args),
    }
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    match args.imp {
        Impl::Handoff => runtime()?.block_on(worker_handoff(args.hold)),
        Impl::Bare if args.hold => bail!("--hold needs --impl handoff"),
        Impl::Bare => worker_bare(),
    }
}

async fn primary_handoff(args: PrimaryArgs) -> Result<()> {
    use handoff::cluster::{BoundAddr, Primary, Schedule as Mode};
    let (program, rest) = args.worker.split_first().context("no worker command")?;
    // Before the ready line: from then on the orchestrator may signal.
    let signals = if args.control { Some(super::scale::Signals::new()?) } else { None };
    let mut builder = Primary::builder(program);
    if let Some(window) = args.window {
        builder = builder.window(window);
    }
    let primary = builder
        .args(rest)
        .workers(args.workers)
        .listen("127.0.0.1:0".parse()?)
        .schedule(match args.schedule {
            Schedule::Rr => Mode::RoundRobin,
            Schedule::Shared => Mode::Shared,
        })
        .start()
        .await?;
    primary.wait_ready().await?;
    let status = primary.status().await?;
    let BoundAddr::Tcp(addr) = primary.local_addrs()[0].clone() else { bail!("not TCP") };
    let mut pids = vec![std::process::id()];
    pids.extend(status.workers.iter().map(|w| w.pid));
    emit("seed-ready", json!({ "addr": addr.to_string(), "pids": pids }));
    // Serve until killed; the workers (their own process groups) die with their channel.
    match signals {
        Some(signals) => super::scale::control(&primary, signals).await,
        None => {
            primary.stopped().await;
            Ok(())
        }
    }
}

async fn worker_handoff(hold: bool) -> Result<()> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "0".into());
    let mut listener = handoff::cluster::listen(format!("127.0.0.1:{port}")).await?;
    while let Ok((mut socket, _)) = listener.accept().await {
        let _ = socket.write_all(REPLY.as_bytes()).await;
        let _ = socket.shutdown().await;
        if hold {
            tokio::spawn(super::scale::hold_until_hangup(socket));
        }
    }
    Ok(())
}

fn primary_bare(args: PrimaryArgs) -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut pids = vec![std::process::id()];
    let mut channels = Vec::new();
    let mut children = Vec::new();
    for _ in 0..args.workers {
        let child = match args.schedule {
            Schedule::Rr => {
                let (ours, theirs) = bare::socketpair()?;
                channels.push(ours);
                bare::spawn_with_channel(&args.worker, theirs)?
            }
            Schedule::Shared => {
                let fd = OwnedFd::from(listener.try_clone()?);
                bare::spawn_with_channel(&args.worker, fd)?
            }
        };
        pids.push(child.id());
        children.push(child);
    }
    emit("seed-ready", json!({ "addr": addr.to_string(), "pids": pids }));
    if args.control {
        bail!("--control needs --impl handoff");
    }
    if args.schedule == Schedule::Shared {
        for mut child in children {
            child.wait()?;
        }
        bail!("the workers exited");
    }
    listener.set_nonblocking(true)?;
    // Per worker: the connections it was sent and has not acked, oldest first.
    let mut unacked: Vec<VecDeque<std::net::TcpStream>> = (0..args.workers).map(|_| VecDeque::new()).collect();
    let mut next = 0;
    let mut acks = [0u8; 4096];
    loop {
        let mut polled: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(channels.iter().map(|c| c.as_raw_fd()))
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: `polled` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for (worker, channel) in channels.iter().enumerate() {
            if polled[1 + worker].revents == 0 {
                continue;
            }
            let got = bare::read(channel.as_fd(), &mut acks)?;
            if got == 0 {
                bail!("worker {worker} closed its channel");
            }
            for _ in 0..got {
                drop(unacked[worker].pop_front()); // acked: the worker holds it now
            }
        }
        if polled[0].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        bare::send_fd(channels[next].as_fd(), b"c", stream.as_fd()).context("sending to a worker")?;
                        unacked[next].push_back(stream);
                        next = (next + 1) % args.workers;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        eprintln!("cluster-primary: accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                        break;
                    }
                }
            }
        }
    }
}

fn worker_bare() -> Result<()> {
    let fd = bare::inherited_channel()?;
    if rustix::net::sockopt::socket_acceptconn(&fd).unwrap_or(false) {
        // Shared: accept on the listener itself.
        let listener = std::net::TcpListener::from(fd);
        loop {
            let (stream, _) = listener.accept()?;
            let _ = bare::write_all(stream.as_fd(), REPLY.as_bytes());
        }
    }
    let mut buf = vec![0u8; 4096];
    let mut fds = Vec::new();
    loop {
        let n = bare::recv_fds(fd.as_fd(), &mut buf, &mut fds, false)?;
        if n == 0 && fds.is_empty() {
            return Ok(());
        }
        // One ack per connection (the primary then closes its copy), then the answers.
        bare::write_all(fd.as_fd(), &vec![b'a'; fds.len()])?;
        for socket in fds.drain(..) {
            let _ = bare::write_all(socket.as_fd(), REPLY.as_bytes());
            let _ = rustix::net::shutdown(&socket, rustix::net::Shutdown::Write);
        }
    }
}
