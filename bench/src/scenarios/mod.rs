//! The scenario table. Add a row: a struct implementing [`Scenario`] in its own file, and one
//! line in [`registry`].

mod children;
pub mod cluster;
mod handles;
mod memory;
mod msg;
mod rtt;
pub mod scale;
mod seed;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::harness::{Ctx, Scenario};
use crate::procs::Proc;

/// Every scenario, in the order they run and print.
pub fn registry() -> Vec<Box<dyn Scenario>> {
    vec![
        Box::new(msg::Messages { size: 64, label: "64B", min_count: 64 }),
        Box::new(msg::Messages { size: 4096, label: "4KiB", min_count: 64 }),
        Box::new(msg::Messages { size: 65536, label: "64KiB", min_count: 16 }),
        Box::new(msg::Messages { size: 1 << 20, label: "1MiB", min_count: 8 }),
        Box::new(msg::Messages { size: 32 << 20, label: "32MiB", min_count: 2 }),
        Box::new(rtt::RoundTrip),
        Box::new(handles::Handles),
        Box::new(seed::Seed),
        Box::new(cluster::Cluster { schedule: "rr" }),
        Box::new(cluster::Cluster { schedule: "shared" }),
        Box::new(memory::Memory),
        Box::new(scale::Workers),
        Box::new(scale::Keepalive),
        Box::new(scale::Soak),
        Box::new(children::Children { count: 64 }),
    ]
}

/// Starts `argv` (a parent role whose child is in the same command line), waits for the result
/// line of `role` and for the parent to exit successfully.
pub fn run_pair(
    name: &str,
    argv: &[String],
    env: &[(&str, String)],
    pin: Option<usize>,
    role: &str,
    timeout: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    let mut proc = Proc::spawn(name, argv, env, pin)?;
    let value = proc.wait_result(role, deadline)?;
    let status = proc.wait_exit(deadline)?;
    if !status.success() {
        bail!("{name}: exited with {status}{}", proc.stderr_tail());
    }
    Ok(value)
}

/// Starts a server command (`name` for messages) and waits for its
/// `BENCH {"role":"seed-ready","addr":...,"pids":[...]}` line; returns the server, its address
/// and the pids of its processes (0s left out).
pub fn start_server(name: &str, argv: &[String], env: &[(&str, String)]) -> Result<(Proc, String, Vec<u32>)> {
    let mut server = Proc::spawn(name, argv, env, None)?;
    let ready = server.wait_result("seed-ready", Instant::now() + Duration::from_secs(30))?;
    let Some(addr) = ready["addr"].as_str() else { bail!("{name}: no addr in {ready}") };
    let Some(pids) = ready["pids"].as_array() else { bail!("{name}: no pids in {ready}") };
    let pids = pids.iter().filter_map(|p| p.as_u64()).filter(|&p| p > 0).map(|p| p as u32).collect();
    Ok((server, addr.to_owned(), pids))
}

/// `ctx.seed_warmup` connections before measuring; any error fails the run.
pub fn warm_up(ctx: &Ctx, addr: &str, server: &Proc) -> Result<()> {
    let warm = loadgen(ctx, addr, Load::Connections(ctx.seed_warmup), Duration::from_secs(60))
        .map_err(|e| e.context(format!("warm-up{}", server.stderr_tail())))?;
    if num(&warm, "errors")? > 0.0 {
        bail!("warm-up had errors: {warm}{}", server.stderr_tail());
    }
    Ok(())
}

/// Stops the server after a measured load and returns how many connections succeeded; none is
/// an error.
pub fn finish_load(load: &Value, server: &mut Proc) -> Result<f64> {
    server.kill();
    let ok = num(load, "ok")?;
    if ok < 1.0 {
        bail!("no connection succeeded: {load}");
    }
    Ok(ok)
}

/// How long the load generator runs.
pub enum Load {
    Secs(f64),
    Connections(u64),
}

/// Runs the load generator against `addr` and returns its result line.
pub fn loadgen(ctx: &Ctx, addr: &str, load: Load, timeout: Duration) -> Result<Value> {
    let concurrency = ctx.concurrency.to_string();
    let mut args = vec!["loadgen", "--addr", addr, "--concurrency", &concurrency];
    let amount;
    match load {
        Load::Secs(s) => {
            amount = s.to_string();
            args.extend(["--secs", &amount]);
        }
        Load::Connections(n) => {
            amount = n.to_string();
            args.extend(["--connections", &amount]);
        }
    }
    run_pair("loadgen", &ctx.role(&args), &[], None, "loadgen", timeout)
}

/// A number from a role's result.
pub fn num(value: &Value, key: &str) -> Result<f64> {
    match value.get(key).and_then(Value::as_f64) {
        Some(x) => Ok(x),
        None => bail!("result has no number {key:?}: {value}"),
    }
}
