//! The scale scenarios' pieces on the role side (see `scenarios/scale`):
//!
//! - [`control`]: a handoff cluster primary (`cluster-primary --control`) driven by signals, so
//!   that the orchestrator can act on it while a load runs: `SIGUSR1` prints
//!   `BENCH {"role":"cluster-status",...}` (pids, generation, counters), `SIGUSR2` starts a
//!   rolling reload and prints `BENCH {"role":"cluster-reloaded",...}` when it ends (with
//!   `"failed"` when it did not); every lifecycle event is printed as
//!   `BENCH {"role":"cluster-event","kind":...,"unix_secs":...}`.
//! - [`hold_until_hangup`]: a worker's `--hold` mode.
//! - `keepalive-hold` ([`hold`]): opens many connections, checks each one's answer, and keeps
//!   them all open until killed.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use handoff::cluster::Event;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::broadcast::error::RecvError;

use super::emit;
use crate::payload::REPLY;

/// The control signals, installed before the primary says it is ready (their default action
/// would end the process).
pub struct Signals {
    status: Signal,
    reload: Signal,
}

impl Signals {
    /// Must be called inside the runtime.
    pub fn new() -> Result<Signals> {
        Ok(Signals { status: signal(SignalKind::user_defined1())?, reload: signal(SignalKind::user_defined2())? })
    }
}

type Reload<'a> =
    Pin<Box<dyn Future<Output = Result<handoff::cluster::ReloadReport, handoff::cluster::PrimaryError>> + 'a>>;

/// Serves control signals until the primary stops. A reload runs in the background (status
/// requests are answered meanwhile); a second `SIGUSR2` during one is reported as failed.
pub async fn control(primary: &handoff::cluster::Primary, mut signals: Signals) -> Result<()> {
    let mut reloading: Option<(Reload<'_>, Instant)> = None;
    let mut events = Some(primary.events());
    loop {
        tokio::select! {
            () = primary.stopped() => return Ok(()),
            event = async {
                match events.as_mut() {
                    Some(events) => events.recv().await,
                    None => std::future::pending().await,
                }
            } => match event {
                Ok(event) => emit("cluster-event", event_json(&event)),
                Err(RecvError::Lagged(missed)) => emit("cluster-event", json!({ "kind": "Lagged", "missed": missed, "unix_secs": unix_secs() })),
                Err(RecvError::Closed) => events = None,
            },
            Some(()) = signals.status.recv() => match primary.status().await {
                Ok(status) => {
                    let mut pids = vec![std::process::id()];
                    pids.extend(status.workers.iter().map(|w| w.pid));
                    emit(
                        "cluster-status",
                        json!({
                            "pids": pids,
                            "generation": status.generation,
                            "states": status.workers.iter().map(|w| w.state).collect::<Vec<_>>(),
                            "restarts": status.workers.iter().map(|w| w.restarts).sum::<u64>(),
                            "desired_workers": status.desired_workers,
                            "pending": status.pending_connections,
                            "reloading": status.reloading,
                            "dispatched": status.connections_dispatched,
                            "redispatched": status.connections_redispatched,
                            "dropped": status.connections_dropped,
                        }),
                    );
                }
                Err(e) => emit("cluster-status", json!({ "failed": e.to_string() })),
            },
            Some(()) = signals.reload.recv() => {
                if reloading.is_some() {
                    emit("cluster-reloaded", json!({ "failed": "a reload was already running" }));
                } else {
                    reloading = Some((Box::pin(primary.reload()), Instant::now()));
                }
            }
            result = async {
                match reloading.as_mut() {
                    Some((reload, _)) => reload.await,
                    None => std::future::pending().await,
                }
            } => {
                let started = reloading.take().map(|(_, t)| t);
                let secs = started.map(|t| t.elapsed().as_secs_f64());
                match result {
                    Ok(report) => emit("cluster-reloaded", json!({ "generation": report.generation, "secs": secs })),
                    Err(e) => emit("cluster-reloaded", json!({ "failed": e.to_string(), "secs": secs })),
                }
            }
        }
    }
}

/// Seconds since the Unix epoch: a clock the orchestrator shares.
pub fn unix_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A lifecycle event as a result line: `kind` (the variant's name), its fields, and when.
fn event_json(event: &Event) -> serde_json::Value {
    let mut value = match event {
        Event::Spawned { worker, pid, generation } => json!({ "worker": worker, "pid": pid, "generation": generation }),
        Event::Online { worker } | Event::Ready { worker } | Event::Disconnected { worker } | Event::Wedged { worker } => {
            json!({ "worker": worker })
        }
        Event::Exited { worker, code, signal, expected } => {
            json!({ "worker": worker, "code": code, "signal": signal, "expected": expected })
        }
        Event::Restarting { worker, delay } => json!({ "worker": worker, "delay_secs": delay.as_secs_f64() }),
        Event::CrashLoop { worker, failures } => json!({ "worker": worker, "failures": failures }),
        Event::Redispatched { worker, connections, reason } => {
            json!({ "worker": worker, "connections": connections, "reason": reason })
        }
        Event::ReloadStarted { generation } => json!({ "generation": generation }),
        Event::ReloadFinished { generation, took } => json!({ "generation": generation, "took_secs": took.as_secs_f64() }),
        Event::ReloadAborted { reason } => json!({ "reason": reason }),
        _ => json!({}),
    };
    let debug = format!("{event:?}");
    let kind = debug.split([' ', '{', '(']).next().unwrap_or("?").to_owned();
    value["kind"] = kind.into();
    value["unix_secs"] = unix_secs().into();
    value
}

/// A `--hold` worker's connection after its answer (written and the write side shut down): kept
/// until the client hangs up, as a Node app's `socket.end(reply)` keeps it.
pub async fn hold_until_hangup(mut socket: TcpStream) {
    let mut buf = [0u8; 256];
    while let Ok(1..) = socket.read(&mut buf).await {}
}

#[derive(Debug, Args)]
pub struct HoldArgs {
    /// Where the cluster listens (must be a loopback address).
    #[arg(long)]
    addr: SocketAddr,
    /// Connections to open and keep.
    #[arg(long)]
    connections: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Per-connection timeout for the answer.
    #[arg(long, default_value_t = 10.0)]
    timeout_secs: f64,
}

/// Opens `--connections` connections (`--concurrency` at a time), reads each one's answer (the
/// reply, then the end of the worker's writes: the worker took it), keeps every one open and
/// prints `BENCH {"role":"keepalive-held","held":..,"errors":..,"secs":..}`; then holds them until
/// killed.
pub fn hold(args: HoldArgs) -> Result<()> {
    if !args.addr.ip().is_loopback() {
        bail!("the holder only targets loopback addresses, not {}", args.addr);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let held = Rc::new(RefCell::new(Vec::with_capacity(args.connections)));
    let errors = Rc::new(RefCell::new((0u64, None::<String>)));
    let next = Rc::new(std::cell::Cell::new(0usize));
    let started = Instant::now();
    let timeout = Duration::from_secs_f64(args.timeout_secs);
    local.block_on(&rt, async {
        let mut openers = Vec::new();
        for _ in 0..args.concurrency.clamp(1, args.connections.max(1)) {
            let (held, errors, next) = (held.clone(), errors.clone(), next.clone());
            openers.push(tokio::task::spawn_local(async move {
                while next.get() < args.connections {
                    next.set(next.get() + 1);
                    match tokio::time::timeout(timeout, open(args.addr)).await {
                        Ok(Ok(stream)) => held.borrow_mut().push(stream),
                        outcome => {
                            let mut errors = errors.borrow_mut();
                            errors.0 += 1;
                            let text = match outcome {
                                Ok(Err(e)) => e.to_string(),
                                _ => "timed out".to_owned(),
                            };
                            errors.1.get_or_insert(text);
                        }
                    }
                }
            }));
        }
        for opener in openers {
            let _ = opener.await;
        }
    });
    let (errors, first_error) = errors.take();
    emit(
        "keepalive-held",
        json!({
            "held": held.borrow().len(),
            "errors": errors,
            "first_error": first_error,
            "secs": started.elapsed().as_secs_f64(),
        }),
    );
    // Hold until killed (the role's watchdog ends a forgotten holder).
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// One held connection: connect, read the answer to the worker's end of writes, check it.
async fn open(addr: SocketAddr) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut reply = Vec::with_capacity(64);
    stream.read_to_end(&mut reply).await?;
    if reply != REPLY.as_bytes() {
        bail!("unexpected reply {:?}", String::from_utf8_lossy(&reply));
    }
    Ok(stream)
}
