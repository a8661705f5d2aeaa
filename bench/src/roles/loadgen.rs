//! The load generator: connection per request against 127.0.0.1, a fixed number of workers
//! (`--concurrency`), for a fixed time (`--secs`) or a fixed number of connections
//! (`--connections`). Each request connects, reads until the server closes, and checks the reply.
//! One thread (a current-thread tokio runtime), so that it takes at most one of the cores.
//!
//! Prints `BENCH {"role":"loadgen","ok":..,"errors":..,"secs":..,"conn_per_s":..,"p50_us":..,..}`;
//! with `--progress N`, also `BENCH {"role":"loadgen-progress","done":..,"errors":..,"secs":..}`
//! every N finished connections.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use tokio::io::AsyncReadExt;

use super::{emit, percentile};
use crate::payload::REPLY;

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Where the server listens (must be a loopback address).
    #[arg(long)]
    addr: SocketAddr,
    /// Run for this long (ignored when --connections is given).
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Make exactly this many connections instead of running for --secs.
    #[arg(long)]
    connections: Option<u64>,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The reply every connection must get.
    #[arg(long, default_value = REPLY)]
    expect: String,
    /// Per-connection timeout.
    #[arg(long, default_value_t = 5.0)]
    timeout_secs: f64,
    /// Print a progress line every this many finished connections (0: none).
    #[arg(long, default_value_t = 0)]
    progress: u64,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<f64>,
    errors: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
}

pub fn run(args: LoadArgs) -> Result<()> {
    if !args.addr.ip().is_loopback() {
        bail!("the load generator only targets loopback addresses, not {}", args.addr);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let tally = Rc::new(RefCell::new(Tally::default()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.secs);
    let budget = Rc::new(Cell::new(args.connections.unwrap_or(u64::MAX)));
    let timed = args.connections.is_none();
    let expect: Rc<[u8]> = args.expect.as_bytes().into();
    let timeout = Duration::from_secs_f64(args.timeout_secs);
    let progress = args.progress;
    local.block_on(&rt, async {
        let mut workers = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let (tally, budget, expect) = (tally.clone(), budget.clone(), expect.clone());
            let addr = args.addr;
            workers.push(tokio::task::spawn_local(async move {
                loop {
                    if timed && Instant::now() >= deadline {
                        break;
                    }
                    let left = budget.get();
                    if left == 0 {
                        break;
                    }
                    budget.set(left - 1);
                    let t = Instant::now();
                    let outcome = tokio::time::timeout(timeout, request(addr, &expect)).await;
                    let mut tally = tally.borrow_mut();
                    match outcome {
                        Ok(Ok(())) => tally.latencies_us.push(t.elapsed().as_secs_f64() * 1e6),
                        Ok(Err((kind, e))) => {
                            *tally.errors.entry(kind).or_default() += 1;
                            tally.first_error.get_or_insert(e);
                        }
                        Err(_) => {
                            *tally.errors.entry("timeout").or_default() += 1;
                        }
                    }
                    if progress > 0 {
                        let errors: u64 = tally.errors.values().sum();
                        let done = tally.latencies_us.len() as u64 + errors;
                        if done % progress == 0 {
                            let secs = start.elapsed().as_secs_f64();
                            emit("loadgen-progress", json!({ "done": done, "errors": errors, "secs": secs }));
                        }
                    }
                }
            }));
        }
        for worker in workers {
            let _ = worker.await;
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let mut tally = tally.take();
    tally.latencies_us.sort_by(f64::total_cmp);
    let ok = tally.latencies_us.len() as u64;
    let errors: u64 = tally.errors.values().sum();
    emit(
        "loadgen",
        json!({
            "ok": ok,
            "errors": errors,
            "error_kinds": tally.errors,
            "first_error": tally.first_error,
            "secs": secs,
            "conn_per_s": ok as f64 / secs,
            "p50_us": percentile(&tally.latencies_us, 50.0),
            "p99_us": percentile(&tally.latencies_us, 99.0),
            "max_us": tally.latencies_us.last().copied().unwrap_or(f64::NAN),
            "cpu_s": own_cpu_seconds(),
        }),
    );
    Ok(())
}

/// One connection: connect, read to the end, compare.
async fn request(addr: SocketAddr, expect: &[u8]) -> Result<(), (&'static str, String)> {
    let mut stream =
        tokio::net::TcpStream::connect(addr).await.map_err(|e| ("connect", e.to_string()))?;
    let mut reply = Vec::with_capacity(64);
    stream.read_to_end(&mut reply).await.map_err(|e| ("read", e.to_string()))?;
    if reply.is_empty() {
        // The server closed it without a byte: the process serving it died, say.
        return Err(("closed", "closed without a reply".to_owned()));
    }
    if reply != expect {
        return Err(("reply", format!("unexpected reply {:?}", String::from_utf8_lossy(&reply))));
    }
    Ok(())
}

/// CPU time this process used (user + system), to tell when the load generator itself is the
/// bottleneck (close to 1 s per second: one core).
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
