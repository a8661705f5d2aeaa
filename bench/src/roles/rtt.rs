//! Round trips: the parent sends a 64-byte message and waits for the child to send it back,
//! `--warmup` times unmeasured, then `--count` times measured one by one.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use super::{emit, percentile, runtime, Impl};
use crate::bare;
use crate::payload::{self, Small, SMALL};

#[derive(Debug, Args)]
pub struct PingArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    #[arg(long, default_value_t = 1_000)]
    warmup: usize,
    #[arg(last = true, required = true)]
    child: Vec<String>,
}

#[derive(Debug, Args)]
pub struct EchoArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
}

pub fn ping(args: PingArgs) -> Result<()> {
    let samples = match args.imp {
        Impl::Handoff => runtime()?.block_on(ping_handoff(&args))?,
        Impl::Bare => ping_bare(&args)?,
    };
    report(samples);
    Ok(())
}

pub fn echo(args: EchoArgs) -> Result<()> {
    match args.imp {
        Impl::Handoff => runtime()?.block_on(echo_handoff()),
        Impl::Bare => echo_bare(),
    }
}

fn report(mut samples: Vec<f64>) {
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    emit(
        "rtt-ping",
        json!({
            "count": samples.len(),
            "p50_us": percentile(&samples, 50.0),
            "p99_us": percentile(&samples, 99.0),
            "mean_us": mean,
        }),
    );
}

async fn ping_handoff(args: &PingArgs) -> Result<Vec<f64>> {
    let mut child = super::spawn_handoff_child(&args.child, None)?;
    super::wait_ready(&mut child).await?;
    let mut samples = Vec::with_capacity(args.count);
    for i in 0..(args.warmup + args.count) as u64 {
        let t = Instant::now();
        child.send(&Small::nth(i)).await?;
        match child.recv().await {
            Some(Ok(_)) => {}
            other => bail!("expected the echo, got {other:?}"),
        }
        if i >= args.warmup as u64 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    child.disconnect();
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("the child did not exit after the channel closed")??;
    Ok(samples)
}

async fn echo_handoff() -> Result<()> {
    let mut channel = super::handoff_parent(None)?;
    channel.send("ready").await?;
    while let Some(message) = channel.recv().await {
        // What a user would write: parse into the type, send it back.
        let value: Small<'static> = message?.deserialize()?;
        channel.send(&value).await?;
    }
    Ok(())
}

fn ping_bare(args: &PingArgs) -> Result<Vec<f64>> {
    let (ours, theirs) = bare::socketpair()?;
    let mut child = bare::spawn_with_channel(&args.child, theirs)?;
    super::bare_wait_ready(ours.as_fd())?;
    let frame = payload::frame(SMALL);
    let mut buf = [0u8; 4096];
    let mut samples = Vec::with_capacity(args.count);
    for i in 0..args.warmup + args.count {
        let t = Instant::now();
        bare::write_all(ours.as_fd(), &frame)?;
        let mut got = 0;
        loop {
            let n = bare::read(ours.as_fd(), &mut buf[got..])?;
            if n == 0 {
                bail!("the echo child closed the channel");
            }
            got += n;
            if buf[..got].ends_with(b"\n") {
                break;
            }
        }
        if i >= args.warmup {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(ours);
    child.wait()?;
    Ok(samples)
}

fn echo_bare() -> Result<()> {
    let fd = bare::inherited_channel()?;
    bare::write_all(fd.as_fd(), b"\"ready\"\n")?;
    let mut buf = [0u8; 4096];
    loop {
        let n = bare::read(fd.as_fd(), &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        bare::write_all(fd.as_fd(), &buf[..n])?;
    }
}
