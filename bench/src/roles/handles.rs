//! TCP sockets handed to a child. The parent first creates `--count` connected TCP pairs on
//! 127.0.0.1 (outside the measurement), then sends the accepted end of each to the child, which
//! acknowledges it (the protocol's ACK, or one byte in the bare reference) and closes it. The
//! child's clock runs from the first handle to the last.

use std::collections::VecDeque;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use super::{emit, runtime, Impl};
use crate::bare;
use crate::payload::HANDLE_FRAME;

#[derive(Debug, Args)]
pub struct SendArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
    #[arg(long)]
    count: usize,
    /// handoff: `ChannelConfig::handle_window` (1 = Node's rule: wait for each ACK).
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// bare: do not wait for each acknowledgement (a thread reads them).
    #[arg(long)]
    pipelined: bool,
    #[arg(last = true, required = true)]
    child: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RecvArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
    /// How many handles to expect; `"done"` is sent after the last.
    #[arg(long)]
    count: u64,
    #[arg(long, default_value_t = 1)]
    window: usize,
}

pub fn send(args: SendArgs) -> Result<()> {
    let (clients, servers) = pool(args.count)?;
    let result = match args.imp {
        Impl::Handoff => runtime()?.block_on(send_handoff(&args, servers)),
        Impl::Bare => send_bare(&args, servers),
    };
    drop(clients);
    result
}

pub fn recv(args: RecvArgs) -> Result<()> {
    match args.imp {
        Impl::Handoff => runtime()?.block_on(recv_handoff(&args)),
        Impl::Bare => recv_bare(&args),
    }
}

/// `count` connected pairs: (client ends, accepted ends).
fn pool(count: usize) -> Result<(Vec<TcpStream>, Vec<TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut clients = Vec::with_capacity(count);
    let mut servers = Vec::with_capacity(count);
    for _ in 0..count {
        clients.push(TcpStream::connect(addr).context("connecting the pool")?);
        servers.push(listener.accept().context("accepting the pool")?.0);
    }
    Ok((clients, servers))
}

async fn send_handoff(args: &SendArgs, servers: Vec<TcpStream>) -> Result<()> {
    let config = handoff::ChannelConfig::default().handle_window(args.window);
    let mut child = super::spawn_handoff_child(&args.child, Some(config))?;
    super::wait_ready(&mut child).await?;
    let sender = child.sender().clone();
    let t = Instant::now();
    let mut deliveries = VecDeque::new();
    for server in servers {
        deliveries.push_back(sender.queue_handle(&"h", server).await?);
        if deliveries.len() >= 1024 {
            deliveries.pop_front().expect("not empty").await?;
        }
    }
    for delivery in deliveries {
        delivery.await?;
    }
    let secs = t.elapsed().as_secs_f64();
    super::wait_for(&mut child, "done").await?;
    child.disconnect();
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("the child did not exit after the channel closed")??;
    emit("handles-send", json!({ "count": args.count, "secs": secs }));
    Ok(())
}

async fn recv_handoff(args: &RecvArgs) -> Result<()> {
    let config = handoff::ChannelConfig::default().handle_window(args.window);
    let mut channel = super::handoff_parent(Some(config))?;
    channel.send("ready").await?;
    let (mut count, mut errors) = (0u64, 0u64);
    let mut t0 = None;
    let mut last = Instant::now();
    while let Some(message) = channel.recv().await {
        let mut message = match message {
            Ok(m) => m,
            Err(e) => {
                errors += 1;
                eprintln!("handles-recv: {e}");
                continue;
            }
        };
        let Some(handle) = message.take_handle() else { continue };
        // What a user would do: take it as a socket (kind checked), then close it.
        match TcpStream::try_from(handle) {
            Ok(stream) => drop(stream),
            Err(e) => {
                errors += 1;
                eprintln!("handles-recv: {e}");
            }
        }
        count += 1;
        last = Instant::now();
        t0.get_or_insert(last);
        if count == args.count {
            channel.send("done").await?;
        }
    }
    let secs = t0.map_or(0.0, |t0| (last - t0).as_secs_f64());
    emit("handles-recv", json!({ "count": count, "secs": secs, "errors": errors }));
    Ok(())
}

fn send_bare(args: &SendArgs, servers: Vec<TcpStream>) -> Result<()> {
    let (ours, theirs) = bare::socketpair()?;
    let mut child = bare::spawn_with_channel(&args.child, theirs)?;
    super::bare_wait_ready(ours.as_fd())?;
    let count = servers.len();
    let t = Instant::now();
    let mut ack = [0u8; 1];
    if args.pipelined {
        // A second thread reads the acknowledgements so that sending never waits for them.
        let reader = ours.try_clone()?;
        let acks = std::thread::spawn(move || -> Result<()> {
            let mut buf = [0u8; 4096];
            let mut got = 0;
            while got < count {
                let n = bare::read(reader.as_fd(), &mut buf)?;
                if n == 0 {
                    bail!("the child closed the channel after {got} acknowledgements");
                }
                got += n;
            }
            Ok(())
        });
        for server in servers {
            bare::send_fd(ours.as_fd(), HANDLE_FRAME, server.as_fd())?;
            drop(server); // the kernel holds the in-flight reference
        }
        acks.join().expect("ack reader")?;
    } else {
        for server in servers {
            bare::send_fd(ours.as_fd(), HANDLE_FRAME, server.as_fd())?;
            if bare::read(ours.as_fd(), &mut ack)? == 0 {
                bail!("the child closed the channel");
            }
            drop(server); // closed after the acknowledgement, as Node and handoff do
        }
    }
    let secs = t.elapsed().as_secs_f64();
    drop(ours);
    child.wait()?;
    emit("handles-send", json!({ "count": count, "secs": secs }));
    Ok(())
}

fn recv_bare(_args: &RecvArgs) -> Result<()> {
    let fd = bare::inherited_channel()?;
    bare::write_all(fd.as_fd(), b"\"ready\"\n")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds = Vec::new();
    let acks = [b'A'; 64];
    let mut count = 0u64;
    let mut t0 = None;
    let mut last = Instant::now();
    let mut eof = false;
    while !eof {
        // Block for the first descriptor, then take whatever else is already queued (Linux
        // returns at most one descriptor-carrying write per recvmsg) and acknowledge them all
        // with one write: the fewest syscalls a receiver can make.
        let mut batch = 0;
        let mut dont_wait = false;
        while batch < acks.len() {
            match bare::recv_fds(fd.as_fd(), &mut buf, &mut fds, dont_wait) {
                Ok(0) if fds.is_empty() => {
                    eof = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
            for received in fds.drain(..) {
                drop(received);
                batch += 1;
                count += 1;
                last = Instant::now();
                t0.get_or_insert(last);
            }
            dont_wait = true;
        }
        if batch > 0 {
            bare::write_all(fd.as_fd(), &acks[..batch])?;
        }
    }
    let secs = t0.map_or(0.0, |t0| (last - t0).as_secs_f64());
    emit("handles-recv", json!({ "count": count, "secs": secs, "errors": 0 }));
    Ok(())
}
