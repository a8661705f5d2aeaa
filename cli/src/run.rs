//! `handoff run`: a cluster primary as a process manager, and its clients `handoff status`,
//! `handoff reload`, `handoff stop`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use handoff::cluster::{Event, ListenAddr, Primary, Schedule, WorkerOutput};
use serde_json::Value;
use tokio::signal::unix::{signal, SignalKind};

/// Arguments of `handoff run`.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Address to serve (`HOST:PORT`, `PORT` on 127.0.0.1, or `unix:/path`); repeat for more.
    /// Workers get `PORT`/`HOST` from the first.
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: Vec<ListenAddr>,
    /// Worker processes (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// `rr`: the primary accepts and hands out each connection; `shared`: every worker accepts on
    /// the listening socket itself (and programs that do not speak the cluster protocol get it
    /// through LISTEN_FDS).
    #[arg(long, value_enum, default_value_t = ScheduleArg::Rr)]
    schedule: ScheduleArg,
    /// Seconds a stopping worker may take to finish its connections before SIGTERM.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    drain_timeout: f64,
    /// Seconds a new worker may take to report it is listening.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    ready_timeout: f64,
    /// Seconds a worker's channel may take to acknowledge a connection it was handed before the
    /// worker counts as wedged (stopped or blocked) and is replaced.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    accept_timeout: f64,
    /// The control socket (`handoff status/reload/stop` talk to it).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The worker command (default: a built-in HTTP server answering 200 with its pid).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ScheduleArg {
    Rr,
    Shared,
}

fn seconds(value: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| anyhow::anyhow!("{what} must be a non-negative number of seconds"))
}

/// Runs the primary until it is stopped; returns the exit code.
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let (program, rest) = match args.command.split_first() {
        Some((program, rest)) => (program.clone(), rest.to_vec()),
        None => (std::env::current_exe()?.into_os_string(), vec![OsString::from("worker-http")]),
    };
    let mut builder = Primary::builder(&program)
        .args(rest)
        .schedule(match args.schedule {
            ScheduleArg::Rr => Schedule::RoundRobin,
            ScheduleArg::Shared => Schedule::Shared,
        })
        .drain_timeout(seconds(args.drain_timeout, "--drain-timeout")?)
        .ready_timeout(seconds(args.ready_timeout, "--ready-timeout")?)
        .accept_timeout(seconds(args.accept_timeout, "--accept-timeout")?)
        .output(WorkerOutput::Prefixed);
    if let Some(workers) = args.workers {
        builder = builder.workers(workers);
    }
    for addr in args.listen {
        builder = builder.listen(addr);
    }
    let control_path = args.control.unwrap_or_else(crate::control::default_path);
    // Bound before the workers start, so that a second primary fails before doing anything.
    let control = crate::control::bind(&control_path).await?;
    let primary = match builder.start().await {
        Ok(primary) => Arc::new(primary),
        Err(e) => {
            let _ = std::fs::remove_file(&control_path);
            return Err(e.into());
        }
    };
    let addrs: Vec<String> = primary.local_addrs().iter().map(ToString::to_string).collect();
    tracing::info!(listen = %addrs.join(", "), control = %control_path.display(), "handoff primary started");
    tokio::spawn(crate::control::serve(control, primary.clone()));
    tokio::spawn(log_events(primary.events()));

    let never_ready = {
        let primary = primary.clone();
        tokio::spawn(async move {
            match primary.wait_ready().await {
                Ok(()) => {
                    tracing::info!("all workers ready");
                    None
                }
                Err(handoff::cluster::PrimaryError::Stopping) => None,
                Err(e) => Some(e.to_string()),
            }
        })
    };
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut stopping = false;
    let mut failure = None;
    let mut never_ready = Some(never_ready);
    loop {
        tokio::select! {
            _ = primary.stopped() => break,
            outcome = async { never_ready.as_mut().expect("guarded").await }, if never_ready.is_some() => {
                never_ready = None;
                if let Ok(Some(reason)) = outcome {
                    tracing::error!("{reason}");
                    failure = Some(reason);
                    stopping = true;
                    let primary = primary.clone();
                    tokio::spawn(async move { primary.kill().await });
                }
            }
            _ = first(&mut interrupt, &mut terminate) => {
                if stopping {
                    tracing::warn!("second signal: killing the workers");
                    let primary = primary.clone();
                    tokio::spawn(async move { primary.kill().await });
                } else {
                    stopping = true;
                    tracing::info!("stopping: draining the workers (signal again to stop at once)");
                    let primary = primary.clone();
                    tokio::spawn(async move { primary.stop().await });
                }
            }
            _ = hangup.recv() => {
                let primary = primary.clone();
                tokio::spawn(async move {
                    match primary.reload().await {
                        Ok(report) => tracing::info!(generation = report.generation, took = ?report.took, "reload finished"),
                        Err(e) => tracing::error!("reload: {e}"),
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(&control_path);
    match failure {
        Some(reason) => {
            eprintln!("handoff: {reason}");
            Ok(1)
        }
        None => Ok(0),
    }
}

async fn first(a: &mut tokio::signal::unix::Signal, b: &mut tokio::signal::unix::Signal) {
    tokio::select! {
        _ = a.recv() => {}
        _ = b.recv() => {}
    }
}

/// Lifecycle events as log lines.
async fn log_events(mut events: tokio::sync::broadcast::Receiver<Event>) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("{n} lifecycle events not logged (the log fell behind)");
                continue;
            }
            Err(_) => return,
        };
        match event {
            Event::Spawned { worker, pid, generation } => tracing::info!(worker, pid, generation, "worker started"),
            Event::Ready { worker } => tracing::info!(worker, "worker ready"),
            Event::Exited { worker, code, signal, expected } => {
                let how = match (code, signal) {
                    (_, Some(signal)) => format!("signal {signal}"),
                    (Some(code), None) => format!("code {code}"),
                    (None, None) => "unknown status".to_owned(),
                };
                if expected {
                    tracing::info!(worker, exit = %how, "worker exited")
                } else {
                    tracing::warn!(worker, exit = %how, "worker exited unexpectedly")
                }
            }
            Event::Restarting { worker, delay } => {
                tracing::info!(worker, delay_ms = delay.as_millis() as u64, "restarting a worker")
            }
            Event::CrashLoop { worker, failures } => tracing::error!(worker, failures, "workers keep failing at start (crash loop)"),
            Event::Wedged { worker } => tracing::warn!(worker, "worker wedged: it did not answer a connection in time; replacing it"),
            Event::Redispatched { worker, connections, reason } => tracing::info!(worker, connections, reason, "connections given to other workers"),
            Event::ReloadStarted { generation } => tracing::info!(generation, "reload started"),
            Event::ReloadFinished { generation, took } => {
                tracing::info!(generation, took_ms = took.as_millis() as u64, "reload finished")
            }
            Event::ReloadAborted { reason } => tracing::error!("reload aborted, the previous workers keep serving: {reason}"),
            Event::Stopping => tracing::info!("stopping"),
            Event::Stopped => tracing::info!("stopped"),
            _ => tracing::debug!(?event, "cluster"),
        }
    }
}

/// Arguments of `handoff status` / `reload` / `stop`.
#[derive(clap::Args)]
pub(crate) struct ControlArgs {
    /// The primary's control socket (default: this user's).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Print JSON (status only).
    #[arg(long)]
    json: bool,
}

/// `handoff status`: prints the workers (a table, or `--json`).
pub(crate) async fn status(args: ControlArgs) -> anyhow::Result<i32> {
    let path = args.control.unwrap_or_else(crate::control::default_path);
    let reply = crate::control::request(&path, "status").await?;
    let status = reply.get("status").context("the primary did not send its status")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(0);
    }
    let workers = status["workers"].as_array().cloned().unwrap_or_default();
    let ready = workers.iter().filter(|w| w["state"] == "ready").count();
    println!(
        "generation {}, {}, listening on {}; {}/{} workers ready; connections dispatched {}, redispatched {}, dropped {}{}{}",
        status["generation"],
        status["schedule"].as_str().unwrap_or("?"),
        status["listeners"].as_array().map(|l| l.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
        ready,
        status["desired_workers"],
        status["connections_dispatched"],
        status["connections_redispatched"],
        status["connections_dropped"],
        if status["reloading"] == true { "; reloading" } else { "" },
        if status["stopping"] == true { "; stopping" } else { "" },
    );
    println!("{:>4} {:>8} {:>4} {:<9} {:>6} {:>8} {:>8} {:<10} {:>9}", "ID", "PID", "GEN", "STATE", "OPEN", "HANDLED", "RESTARTS", "LAST EXIT", "UPTIME");
    for w in workers {
        let open = w["connections_open"].as_u64().map_or("-".to_owned(), |n| n.to_string());
        let uptime = Duration::from_millis(w["uptime_ms"].as_u64().unwrap_or(0));
        println!(
            "{:>4} {:>8} {:>4} {:<9} {:>6} {:>8} {:>8} {:<10} {:>9}",
            w["id"].to_string(),
            w["pid"].to_string(),
            w["generation"].to_string(),
            w["state"].as_str().unwrap_or("?"),
            open,
            w["connections_handled"].to_string(),
            w["restarts"].to_string(),
            w["last_exit"].as_str().unwrap_or("-"),
            format_uptime(uptime)
        );
    }
    Ok(0)
}

fn format_uptime(time: Duration) -> String {
    let secs = time.as_secs();
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// `handoff reload`: a rolling reload; non-zero with the reason if it was aborted.
pub(crate) async fn reload(args: ControlArgs) -> anyhow::Result<i32> {
    let path = args.control.unwrap_or_else(crate::control::default_path);
    let reply = crate::control::request(&path, "reload").await?;
    if reply["ok"] == true {
        println!("reloaded: generation {} serving (took {} ms)", reply["generation"], reply["took_ms"]);
        Ok(0)
    } else {
        eprintln!("handoff reload: {}", reply["error"].as_str().unwrap_or("failed"));
        Ok(1)
    }
}

/// `handoff stop`: a graceful stop (returns once the primary acknowledged it).
pub(crate) async fn stop(args: ControlArgs) -> anyhow::Result<i32> {
    let path = args.control.unwrap_or_else(crate::control::default_path);
    let reply = crate::control::request(&path, "stop").await?;
    if reply["ok"] == true {
        println!("stopping");
        Ok(0)
    } else {
        eprintln!("handoff stop: {}", reply["error"].as_str().unwrap_or("failed"));
        Ok(1)
    }
}
