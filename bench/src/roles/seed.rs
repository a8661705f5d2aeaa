//! The seed pipeline: a parent listens on 127.0.0.1:0 and hands every accepted connection to one
//! child, which writes `Child handled it.` and closes it. The parent prints
//! `BENCH {"role":"seed-ready","addr":...,"pids":[parent, child]}` once listening.

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::{emit, run_spawned, Impl};
use crate::bare;
use crate::payload::{ACK, HANDLE_FRAME, REPLY};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SendMode {
    /// `send_handle(...).await` per connection: the accept loop waits for each ACK.
    Await,
    /// `queue_handle` per connection, a task awaiting the deliveries, as `examples/parent.rs`
    /// (Node's `child.send` behaviour: the accept loop never waits).
    Queue,
}

#[derive(Debug, Args)]
pub struct ParentArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
    #[arg(long, value_enum, default_value_t = SendMode::Queue)]
    send: SendMode,
    /// Bare only: Node's discipline, one handle in flight until the child's
    /// `NODE_HANDLE_ACK` line for it arrives (the parent's copy is closed then).
    #[arg(long)]
    ack: bool,
    #[arg(last = true, required = true)]
    child: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ChildArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
    /// Answer through a std socket with one non-blocking write (the reply is tiny), instead of a
    /// tokio socket and a task per connection: no registration, no `FIONBIO`, no task.
    #[arg(long)]
    lean: bool,
    /// Bare only: write Node's `NODE_HANDLE_ACK` line for every handle received.
    #[arg(long)]
    ack: bool,
}

pub fn parent(args: ParentArgs) -> Result<()> {
    match args.imp {
        Impl::Handoff => run_spawned(parent_handoff(args)),
        Impl::Bare if args.ack => parent_bare_ack(args),
        Impl::Bare => parent_bare(args),
    }
}

pub fn child(args: ChildArgs) -> Result<()> {
    match args.imp {
        Impl::Handoff => run_spawned(child_handoff(args.lean)),
        Impl::Bare => child_bare(args.ack),
    }
}

async fn parent_handoff(args: ParentArgs) -> Result<()> {
    // As examples/parent.rs: connections from a handoff Server (counted, keyed as Node's).
    let server = handoff::server::Server::bind("127.0.0.1:0").await?;
    let addr = server.local_addr().context("a TCP server")?;
    let mut child = super::spawn_handoff_child(&args.child, None)?;
    let sender = child.sender().clone();
    let pids = [std::process::id(), child.id().unwrap_or(0)];
    emit("seed-ready", json!({ "addr": addr.to_string(), "pids": pids }));
    // Deliveries resolve in the order the handles were queued: one task awaits them in turn.
    let (deliveries, mut pending) = tokio::sync::mpsc::unbounded_channel::<handoff::channel::Delivery<handoff::server::Connection>>();
    tokio::spawn(async move {
        while let Some(delivery) = pending.recv().await {
            if let Err(e) = delivery.await {
                eprintln!("seed-parent: a connection was not delivered: {e}");
            }
        }
    });
    loop {
        tokio::select! {
            accepted = server.accept() => {
                let socket = match accepted {
                    Ok(socket) => socket,
                    Err(e) => {
                        eprintln!("seed-parent: accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                match args.send {
                    SendMode::Await => {
                        if let Err(e) = sender.send_handle(&"socket", socket).await {
                            eprintln!("seed-parent: could not hand the connection over: {e}");
                        }
                    }
                    SendMode::Queue => match sender.queue_handle(&"socket", socket).await {
                        Ok(delivery) => { let _ = deliveries.send(delivery); }
                        Err(e) => eprintln!("seed-parent: could not hand the connection over: {e}"),
                    },
                }
            }
            status = child.wait() => {
                let status = status?;
                anyhow::bail!("the child exited with {status}");
            }
        }
    }
}

/// `examples/child.rs`, verbatim in spirit. With `lean`, the reply goes through a std socket: one
/// non-blocking `write` of 17 bytes into a fresh connection's empty send buffer, then `close`, as
/// the bare child does (no tokio registration, no `FIONBIO`, no task); whatever
/// that write could not take (never seen) is finished by a tokio socket and a task.
async fn child_handoff(lean: bool) -> Result<()> {
    use std::io::Write;
    let mut parent = super::handoff_parent(None)?;
    let mut answering = tokio::task::JoinSet::new();
    while let Some(received) = parent.recv().await {
        let mut message = match received {
            Ok(message) => message,
            Err(e) => {
                eprintln!("seed-child: {e}");
                continue;
            }
        };
        let is_socket = message.deserialize::<String>().is_ok_and(|m| m == "socket");
        let Some(handle) = message.take_handle().filter(|_| is_socket) else { continue };
        let mut socket: std::net::TcpStream = handle.try_into()?;
        let written = if lean { socket.write(REPLY.as_bytes()).unwrap_or(0) } else { 0 };
        if written == REPLY.len() {
            drop(socket); // as the bare child: the last reference (the parent's went with the ACK) sends the FIN
        } else {
            socket.set_nonblocking(true)?;
            let mut socket = tokio::net::TcpStream::from_std(socket)?;
            answering.spawn(async move {
                let _ = socket.write_all(&REPLY.as_bytes()[written..]).await;
                let _ = socket.shutdown().await;
            });
        }
        // Reap finished answers so the set does not grow over a long run.
        while answering.try_join_next().is_some() {}
    }
    while answering.join_next().await.is_some() {}
    Ok(())
}

fn parent_bare(args: ParentArgs) -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let (ours, theirs) = bare::socketpair()?;
    let child = bare::spawn_with_channel(&args.child, theirs)?;
    emit("seed-ready", json!({ "addr": listener.local_addr()?.to_string(), "pids": [std::process::id(), child.id()] }));
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                bare::send_fd(ours.as_fd(), HANDLE_FRAME, stream.as_fd())
                    .context("sending to the child")?;
                drop(stream); // the in-flight message holds its own reference
            }
            Err(e) => eprintln!("seed-parent: accept: {e}"),
        }
    }
}

/// The least a parent can do with Node's guarantee: `poll` over the listener and the channel,
/// one `sendmsg` with the descriptor per connection, the next one only after the child's
/// `NODE_HANDLE_ACK` line for the last, whose arrival closes the parent's copy.
fn parent_bare_ack(args: ParentArgs) -> Result<()> {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let (ours, theirs) = bare::socketpair()?;
    let child = bare::spawn_with_channel(&args.child, theirs)?;
    emit("seed-ready", json!({ "addr": listener.local_addr()?.to_string(), "pids": [std::process::id(), child.id()] }));
    let mut waiting = std::collections::VecDeque::new();
    let mut in_flight: Option<std::net::TcpStream> = None;
    let mut acks = [0u8; 4096];
    loop {
        let mut polled = [
            libc::pollfd { fd: ours.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `polled` is a valid array of two pollfd.
        if unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if polled[0].revents != 0 {
            let got = bare::read(ours.as_fd(), &mut acks)?;
            if got == 0 {
                anyhow::bail!("the child closed its channel");
            }
            if acks[..got].contains(&b'\n') {
                drop(in_flight.take()); // acknowledged: the child holds it now
            }
        }
        if polled[1].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => waiting.push_back(stream),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        eprintln!("seed-parent: accept: {e}");
                        break;
                    }
                }
            }
        }
        if in_flight.is_none() {
            if let Some(stream) = waiting.pop_front() {
                bare::send_fd(ours.as_fd(), HANDLE_FRAME, stream.as_fd()).context("sending to the child")?;
                in_flight = Some(stream);
            }
        }
    }
}

fn child_bare(ack: bool) -> Result<()> {
    let fd = bare::inherited_channel()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds = Vec::new();
    loop {
        let n = bare::recv_fds(fd.as_fd(), &mut buf, &mut fds, false)?;
        if n == 0 && fds.is_empty() {
            return Ok(());
        }
        if ack {
            // Acknowledged on arrival, before the work, as a Node child does.
            bare::write_all(fd.as_fd(), &ACK.repeat(fds.len()))?;
        }
        for socket in fds.drain(..) {
            let _ = bare::write_all(socket.as_fd(), REPLY.as_bytes());
            drop(socket); // the last reference: FIN
        }
    }
}
