//! Many children on one parent (issue 10, scale): the parent starts `--children` children, each
//! with its own channel, and keeps `--window` 64-byte messages in flight on every channel at
//! once; each child sends every message back (the `rtt-echo` roles, or `bench/node/rtt.js
//! echo`), and each echo the parent receives is answered with the next message on that channel.
//!
//! The parent measures for `--secs` after `--warmup` seconds: echoes received (all channels and
//! per channel), its own CPU time and the children's (`/proc/<pid>/stat`), and memory: its own
//! `VmRSS` before starting any child, once every child said `"ready"`, and at the end of the
//! measured window with all channels busy; each child's `VmRSS` and `Pss` at that moment. Then it
//! stops sending, waits until every channel has nothing in flight, closes the channels and
//! expects every child to exit cleanly.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use super::{emit, runtime, Impl};
use crate::bare;
use crate::payload::{self, Small, SMALL};
use crate::procs::{cpu_seconds, rss_kib};

#[derive(Debug, Args)]
pub struct ParentArgs {
    #[arg(long = "impl", value_enum)]
    imp: Impl,
    /// How many children.
    #[arg(long, default_value_t = 64)]
    children: usize,
    /// Messages in flight per channel.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Seconds of exchange before measuring.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// The child command (an echo role).
    #[arg(last = true, required = true)]
    child: Vec<String>,
}

pub fn parent(args: ParentArgs) -> Result<()> {
    if args.children == 0 || args.window == 0 {
        bail!("--children and --window must be at least 1");
    }
    let report = match args.imp {
        Impl::Handoff => runtime()?.block_on(parent_handoff(&args))?,
        Impl::Bare => parent_bare(&args)?,
    };
    emit("children-parent", report);
    Ok(())
}

/// What the parent takes at the start and at the end of the measured window.
struct Mark {
    at: Instant,
    counts: Vec<u64>,
    parent_cpu: f64,
    children_cpu: f64,
}

/// `counts` were taken just now; the CPU times are read right after.
fn mark(counts: Vec<u64>, pids: &[u32]) -> Result<Mark> {
    let at = Instant::now();
    let parent_cpu = cpu_seconds(std::process::id())?;
    let children_cpu = pids.iter().map(|&p| cpu_seconds(p)).sum::<Result<f64>>().context("a child died")?;
    Ok(Mark { at, counts, parent_cpu, children_cpu })
}

/// Memory of the parent and the children, taken with every channel busy.
struct Memory {
    parent: OwnMemory,
    children_rss_kib: Vec<u64>,
    children_pss_kib: Vec<u64>,
}

fn memory(pids: &[u32]) -> Result<Memory> {
    Ok(Memory {
        parent: own_memory()?,
        children_rss_kib: pids.iter().map(|&p| rss_kib(p)).collect::<Result<_>>().context("a child died")?,
        children_pss_kib: pids.iter().map(|&p| pss_kib(p)).collect::<Result<_>>().context("a child died")?,
    })
}

/// `Pss` of a process in KiB (shared pages divided among their users), from
/// `/proc/<pid>/smaps_rollup`.
fn pss_kib(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let line = text.lines().find(|l| l.starts_with("Pss:")).context("no Pss line")?;
    Ok(line.split_whitespace().nth(1).context("bad Pss line")?.parse()?)
}

fn report(args: &ParentArgs, before: OwnMemory, ready: OwnMemory, m0: &Mark, m1: &Mark, mem: &Memory) -> Value {
    let per_channel: Vec<u64> = m1.counts.iter().zip(&m0.counts).map(|(b, a)| b - a).collect();
    let count: u64 = per_channel.iter().sum();
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    json!({
        "children": args.children,
        "window": args.window,
        "count": count,
        "secs": (m1.at - m0.at).as_secs_f64(),
        "per_channel_min": per_channel.iter().min(),
        "per_channel_max": per_channel.iter().max(),
        "per_channel_mean": mean(&per_channel),
        "parent_cpu_s": m1.parent_cpu - m0.parent_cpu,
        "children_cpu_s": m1.children_cpu - m0.children_cpu,
        "parent_rss_before_kib": before.rss_kib,
        "parent_rss_ready_kib": ready.rss_kib,
        "parent_rss_active_kib": mem.parent.rss_kib,
        "parent_anon_before_kib": before.anon_kib,
        "parent_anon_ready_kib": ready.anon_kib,
        "parent_anon_active_kib": mem.parent.anon_kib,
        "child_rss_kib_mean": mean(&mem.children_rss_kib),
        "child_pss_kib_mean": mean(&mem.children_pss_kib),
        "child_rss_kib": mem.children_rss_kib,
    })
}

/// This process's memory, from `/proc/self/status`: `VmRSS`, and `RssAnon`, its anonymous part
/// (heap, stacks, buffers: what the channels allocate, without the program's code and libraries
/// paged in from their files as new code paths run).
#[derive(Debug, Clone, Copy)]
struct OwnMemory {
    rss_kib: u64,
    anon_kib: u64,
}

fn own_memory() -> Result<OwnMemory> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let field = |name: &str| -> Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
        Ok(line.split_whitespace().nth(1).with_context(|| format!("bad {name}"))?.parse()?)
    };
    Ok(OwnMemory { rss_kib: field("VmRSS:")?, anon_kib: field("RssAnon:")? })
}

async fn parent_handoff(args: &ParentArgs) -> Result<Value> {
    let before = own_memory()?;
    let mut kids = Vec::with_capacity(args.children);
    for _ in 0..args.children {
        kids.push(super::spawn_handoff_child(&args.child, None)?);
    }
    let pids: Vec<u32> = kids.iter().filter_map(|k| k.id()).collect();
    if pids.len() != kids.len() {
        bail!("a child exited during start-up");
    }
    for (i, kid) in kids.iter_mut().enumerate() {
        super::wait_ready(kid).await.with_context(|| format!("child {i}"))?;
    }
    let ready = own_memory()?;

    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..args.children).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = tokio::task::JoinSet::new();
    for (i, kid) in kids.iter_mut().enumerate() {
        let sender = kid.sender().clone();
        let mut receiver = kid.take_receiver().context("receiver already taken")?;
        let (stop, counts, window) = (stop.clone(), counts.clone(), args.window as u64);
        tasks.spawn(async move {
            let mut seq = 0u64;
            while seq < window {
                sender.send(&Small::nth(seq)).await?;
                seq += 1;
            }
            let mut in_flight = window;
            while let Some(message) = receiver.recv().await {
                message.with_context(|| format!("channel {i}"))?;
                counts[i].fetch_add(1, Ordering::Relaxed);
                in_flight -= 1;
                if !stop.load(Ordering::Relaxed) {
                    sender.send(&Small::nth(seq)).await?;
                    seq += 1;
                    in_flight += 1;
                } else if in_flight == 0 {
                    sender.disconnect();
                }
            }
            if in_flight != 0 {
                bail!("channel {i} closed with {in_flight} messages in flight");
            }
            anyhow::Ok(())
        });
    }
    let snapshot = || counts.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<u64>>();
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let m0 = mark(snapshot(), &pids)?;
    tokio::time::sleep(Duration::from_secs_f64(args.secs)).await;
    let m1 = mark(snapshot(), &pids)?;
    let mem = memory(&pids)?;
    stop.store(true, Ordering::Relaxed);

    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(joined) = tasks.join_next().await {
            joined.context("a channel task panicked")??;
        }
        anyhow::Ok(())
    });
    drained.await.context("the channels did not drain in 30 s")??;
    for (i, kid) in kids.iter_mut().enumerate() {
        let status = tokio::time::timeout(Duration::from_secs(30), kid.wait())
            .await
            .with_context(|| format!("child {i} did not exit after its channel closed"))??;
        if !status.success() {
            bail!("child {i} exited with {status}");
        }
    }
    Ok(report(args, before, ready, &m0, &m1, &mem))
}

/// One channel of the bare parent.
struct BareChannel {
    fd: OwnedFd,
    in_flight: usize,
    count: u64,
}

fn parent_bare(args: &ParentArgs) -> Result<Value> {
    let before = own_memory()?;
    let mut channels = Vec::with_capacity(args.children);
    let mut kids = Vec::with_capacity(args.children);
    for _ in 0..args.children {
        let (ours, theirs) = bare::socketpair()?;
        kids.push(bare::spawn_with_channel(&args.child, theirs)?);
        channels.push(BareChannel { fd: ours, in_flight: 0, count: 0 });
    }
    // Kill what we started if anything below fails.
    let mut kids = KillOnDrop(kids);
    let pids: Vec<u32> = kids.0.iter().map(|k| k.id()).collect();
    for (i, ch) in channels.iter().enumerate() {
        super::bare_wait_ready(ch.fd.as_fd()).with_context(|| format!("child {i}"))?;
    }
    let ready = own_memory()?;

    // Every frame is the same 64-byte message; `window` of them back to back.
    let frames = payload::frame(SMALL).repeat(args.window);
    let frame_len = frames.len() / args.window;
    let epoll = Epoll::new()?;
    for (i, ch) in channels.iter_mut().enumerate() {
        epoll.add(ch.fd.as_fd(), i as u64)?;
        bare::write_all(ch.fd.as_fd(), &frames)?;
        ch.in_flight = args.window;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; args.children];
    let started = Instant::now();
    let warm_end = started + Duration::from_secs_f64(args.warmup);
    let measure_end = warm_end + Duration::from_secs_f64(args.secs);
    let (mut m0, mut end) = (None, None);
    let drain_deadline = measure_end + Duration::from_secs(30);
    loop {
        let now = Instant::now();
        if m0.is_none() && now >= warm_end {
            m0 = Some(mark(channels.iter().map(|c| c.count).collect(), &pids)?);
        }
        if end.is_none() && now >= measure_end {
            let m1 = mark(channels.iter().map(|c| c.count).collect(), &pids)?;
            end = Some((m1, memory(&pids)?));
        }
        if end.is_some() && channels.iter().all(|c| c.in_flight == 0) {
            break;
        }
        if now >= drain_deadline {
            bail!("the channels did not drain in 30 s");
        }
        let n = epoll.wait(&mut events, 50)?;
        for event in &events[..n] {
            let i = event.u64 as usize;
            let ch = &mut channels[i];
            let got = bare::read(ch.fd.as_fd(), &mut buf)?;
            if got == 0 {
                bail!("child {i} closed its channel");
            }
            // Each frame ends in the only `\n` it holds; the echo may arrive split anywhere.
            let frames_in = buf[..got].iter().filter(|&&b| b == b'\n').count();
            if frames_in > ch.in_flight {
                bail!("child {i} sent more than it was sent");
            }
            ch.count += frames_in as u64;
            ch.in_flight -= frames_in;
            if end.is_none() && frames_in > 0 {
                bare::write_all(ch.fd.as_fd(), &frames[..frames_in * frame_len])?;
                ch.in_flight += frames_in;
            }
        }
    }
    drop(epoll);
    drop(channels); // the children see end-of-file and exit
    for (i, kid) in kids.0.iter_mut().enumerate() {
        let status = kid.wait()?;
        if !status.success() {
            bail!("child {i} exited with {status}");
        }
    }
    kids.0.clear();
    let (Some(m0), Some((m1, mem))) = (m0, end) else { bail!("the run ended before measuring") };
    Ok(report(args, before, ready, &m0, &m1, &mem))
}

/// Kills (and reaps) the children still in the list when dropped.
struct KillOnDrop(Vec<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for kid in &mut self.0 {
            let _ = kid.kill();
            let _ = kid.wait();
        }
    }
}

/// A minimal `epoll` instance (level-triggered, read readiness only).
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> Result<Epoll> {
        // SAFETY: epoll_create1 returns a fresh descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: fd is fresh and ours.
        Ok(Epoll(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    fn add(&self, fd: std::os::fd::BorrowedFd<'_>, token: u64) -> Result<()> {
        let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: both descriptors are open; event is a valid local.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut event) } != 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_ctl");
        }
        Ok(())
    }

    /// Waits up to `timeout_ms`; returns how many of `events` were filled.
    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> Result<usize> {
        loop {
            // SAFETY: events is a valid writable slice of its length.
            let n = unsafe {
                libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, timeout_ms)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("epoll_wait");
            }
        }
    }
}
