//! One-way messages: the parent streams messages for a while, the child counts them.
//!
//! Handshake, the same in every implementation: the child says `"ready"`, the parent sends the
//! marker `"start"`, then messages until `--secs` have passed (and at least `--min-count`), then
//! closes the channel. The child's clock runs from the marker to the last message, so start-up
//! and the closing handshake are outside the measurement.

use std::io::IoSlice;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use super::{emit, runtime, Impl};
use crate::bare;
use crate::payload::{self, Small, SMALL};

#[derive(Debug, Args)]
pub struct SendArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
    /// Bare only: gather many frames per writev instead of one write per frame.
    #[arg(long)]
    batched: bool,
    /// Message size in bytes (JSON text, newline excluded).
    #[arg(long)]
    size: usize,
    /// How long to send.
    #[arg(long, default_value_t = 0.5)]
    secs: f64,
    /// Send at least this many messages.
    #[arg(long, default_value_t = 1)]
    min_count: u64,
    /// The child command.
    #[arg(last = true, required = true)]
    child: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RecvArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
}

pub fn send(args: SendArgs) -> Result<()> {
    match args.imp {
        Impl::Handoff => runtime()?.block_on(send_handoff(args)),
        Impl::Bare => send_bare(args),
    }
}

pub fn recv(args: RecvArgs) -> Result<()> {
    match args.imp {
        Impl::Handoff => runtime()?.block_on(recv_handoff()),
        Impl::Bare => recv_bare(),
    }
}

fn should_stop(sent: u64, size: usize, min_count: u64, deadline: Instant) -> bool {
    (sent % 64 == 0 || size > 4096) && sent >= min_count && Instant::now() >= deadline
}

async fn send_handoff(args: SendArgs) -> Result<()> {
    let mut child = super::spawn_handoff_child(&args.child, None)?;
    super::wait_ready(&mut child).await?;
    let sender = child.sender().clone();
    sender.send("start").await?;
    let body = payload::string_body(args.size);
    let deadline = Instant::now() + Duration::from_secs_f64(args.secs);
    let mut sent = 0u64;
    loop {
        if args.size == SMALL {
            sender.send(&Small::nth(sent)).await?;
        } else {
            sender.send(body.as_str()).await?;
        }
        sent += 1;
        if should_stop(sent, args.size, args.min_count, deadline) {
            break;
        }
    }
    sender.disconnect();
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .context("the child did not exit after the channel closed")??;
    emit("msg-send", json!({ "sent": sent }));
    if !status.success() {
        bail!("the receiving child exited with {status}");
    }
    Ok(())
}

async fn recv_handoff() -> Result<()> {
    let mut channel = super::handoff_parent(None)?;
    channel.send("ready").await?;
    match channel.recv().await {
        Some(Ok(m)) if m.json() == "\"start\"" => {}
        other => bail!("expected the start marker, got {other:?}"),
    }
    let t0 = Instant::now();
    let (mut count, mut bytes, mut errors, mut last) = (0u64, 0u64, 0u64, t0);
    while let Some(message) = channel.recv().await {
        match message {
            Ok(m) => {
                count += 1;
                bytes += m.json().len() as u64;
                last = Instant::now();
            }
            Err(e) => {
                errors += 1;
                if errors <= 3 {
                    eprintln!("msg-recv: {e}");
                }
            }
        }
    }
    let secs = (last - t0).as_secs_f64();
    emit("msg-recv", json!({ "count": count, "bytes": bytes, "secs": secs, "errors": errors }));
    Ok(())
}

fn send_bare(args: SendArgs) -> Result<()> {
    let (ours, theirs) = bare::socketpair()?;
    let mut child = bare::spawn_with_channel(&args.child, theirs)?;
    super::bare_wait_ready(ours.as_fd())?;
    bare::write_all(ours.as_fd(), b"\"start\"\n")?;
    let frame = payload::frame(args.size);
    // Batched: up to 1024 frames (IOV_MAX) or 1 MiB per writev.
    let per_batch = if args.batched { (1 << 20) / frame.len() } else { 1 }.clamp(1, 1024);
    let batch: Vec<IoSlice<'_>> = vec![IoSlice::new(&frame); per_batch];
    let deadline = Instant::now() + Duration::from_secs_f64(args.secs);
    let mut sent = 0u64;
    loop {
        if args.batched {
            let mut slices = batch.clone();
            bare::writev_all(ours.as_fd(), &mut slices)?;
            sent += per_batch as u64;
        } else {
            bare::write_all(ours.as_fd(), &frame)?;
            sent += 1;
        }
        if (args.batched || sent % 64 == 0 || args.size > 4096)
            && sent >= args.min_count
            && Instant::now() >= deadline
        {
            break;
        }
    }
    drop(ours);
    let status = child.wait()?;
    emit("msg-send", json!({ "sent": sent }));
    if !status.success() {
        bail!("the receiving child exited with {status}");
    }
    Ok(())
}

fn recv_bare() -> Result<()> {
    let fd = bare::inherited_channel()?;
    bare::write_all(fd.as_fd(), b"\"ready\"\n")?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut lines, mut bytes) = (0u64, 0u64);
    let mut t0 = None;
    let mut last = Instant::now();
    loop {
        let n = bare::read(fd.as_fd(), &mut buf)?;
        if n == 0 {
            break;
        }
        last = Instant::now();
        t0.get_or_insert(last);
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        bytes += n as u64;
    }
    let t0 = t0.context("no data received")?;
    let count = lines.saturating_sub(1); // the start marker
    let secs = (last - t0).as_secs_f64();
    emit("msg-recv", json!({ "count": count, "bytes": bytes, "secs": secs, "errors": 0 }));
    Ok(())
}
