//! `scale-soak`: a long run through a 2-worker round-robin cluster while workers are killed and
//! the cluster reloads, with the primary's descriptors and RSS sampled as it goes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::super::{num, start_server, warm_up};
use super::{fd_count, settle};
use crate::harness::{rust, with_child, Ctx, MetricSpec, Sample, Scenario, VariantSpec};
use crate::procs::{rss_kib, Proc, RESULT_PREFIX};
use crate::roles::scale::unix_secs;

pub struct Soak;

/// Allowed drift between the idle readings before and after the soak: descriptors either way,
/// RSS growth.
pub const FLAT_FDS: f64 = 8.0;
pub const FLAT_RSS_KIB: f64 = 10.0 * 1024.0;

/// Points of the time series, one per `1 / SAMPLES` of the run (plus the idle readings before
/// and after).
const SAMPLES: u64 = 20;
/// Events: a worker killed every `1 / EVENTS` of the run, and a reload half-way between kills.
const EVENTS: u64 = 5;

/// The primary of a `cluster-primary --control` and its result lines: `cluster-status` answers
/// `SIGUSR1`, `cluster-reloaded` ends a reload started by `SIGUSR2` (see `roles::scale`).
struct Control<'a> {
    server: &'a mut Proc,
    pid: u32,
    /// Lines read while waiting for another.
    stash: VecDeque<Value>,
}

impl Control<'_> {
    fn signal(&self, signal: libc::c_int) -> Result<()> {
        signal_pid(self.pid, signal).context("signalling the primary")
    }

    /// The next result line of `role`.
    fn next(&mut self, role: &str, timeout: Duration) -> Result<Value> {
        if let Some(i) = self.stash.iter().position(|v| v["role"] == role) {
            return Ok(self.stash.remove(i).unwrap_or_default());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.server.wait_line(RESULT_PREFIX, deadline)?;
            let value: Value = serde_json::from_str(&text).with_context(|| format!("bad result line {text:?}"))?;
            if value["role"] == role {
                return Ok(value);
            }
            self.stash.push_back(value);
        }
    }

    /// The primary's lifecycle events (`cluster-event` lines) read so far and until it has been
    /// quiet for a moment, each with `secs` since `t0_unix`.
    fn drain(&mut self, t0_unix: f64) -> Vec<Value> {
        while let Ok(text) = self.server.wait_line(RESULT_PREFIX, Instant::now() + Duration::from_millis(200)) {
            if let Ok(value) = serde_json::from_str::<Value>(&text) {
                self.stash.push_back(value);
            }
        }
        let mut events = Vec::new();
        self.stash.retain(|v| {
            if v["role"] != "cluster-event" {
                return true;
            }
            let mut v = v.clone();
            v["secs"] = (v["unix_secs"].as_f64().unwrap_or(f64::NAN) - t0_unix).into();
            events.push(v);
            false
        });
        events
    }

    /// SIGKILLs one of the ready workers (the `turn`th, cyclically: each slot in turn) and
    /// returns its pid. A worker of a finished reload's old generation may still be listed,
    /// draining; it is not a candidate, and one that exits just before its signal is retried.
    fn kill_a_worker(&mut self, turn: usize) -> Result<u32> {
        for _ in 0..50 {
            let status = self.status()?;
            let workers = pids(&status)?;
            let empty = Vec::new();
            let states = status["states"].as_array().unwrap_or(&empty);
            let ready: Vec<u32> =
                workers.iter().skip(1).zip(states).filter(|(_, state)| *state == "ready").map(|(&pid, _)| pid).collect();
            if let Some(&victim) = ready.get(turn % ready.len().max(1)) {
                match signal_pid(victim, libc::SIGKILL) {
                    Ok(()) => return Ok(victim),
                    Err(e) if e.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error()) == Some(libc::ESRCH) => {}
                    Err(e) => return Err(e.context(format!("killing worker {victim}"))),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("found no ready worker to kill in 1 s")
    }

    fn status(&mut self) -> Result<Value> {
        self.signal(libc::SIGUSR1)?;
        let status = self.next("cluster-status", Duration::from_secs(10))?;
        if let Some(failed) = status.get("failed") {
            bail!("status: {failed}");
        }
        Ok(status)
    }

    /// Waits until `workers` workers serve, all ready, none of them `gone`.
    fn wait_serving(&mut self, workers: usize, gone: u32, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            let pids = pids(&status)?;
            let ready = status["states"].as_array().is_some_and(|s| s.iter().all(|s| s == "ready"));
            if ready && pids.len() == workers + 1 && !pids.contains(&gone) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("the cluster did not get back to {workers} ready workers: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn pids(status: &Value) -> Result<Vec<u32>> {
    let Some(pids) = status["pids"].as_array() else { bail!("no pids in {status}") };
    Ok(pids.iter().filter_map(Value::as_u64).map(|p| p as u32).collect())
}

fn signal_pid(pid: u32, signal: libc::c_int) -> Result<()> {
    // SAFETY: kill() with a positive pid and a valid signal number.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// One point of the series.
fn point(pid: u32, done: u64, secs: f64, what: &str) -> Result<Value> {
    Ok(json!({
        "connections": done,
        "secs": secs,
        "fds": fd_count(pid).context("the primary died")?,
        "rss_kib": rss_kib(pid).context("the primary died")?,
        "what": what,
    }))
}

/// After each kill in `events`: when a worker was ready again (the first `Ready` after it) and
/// how many connections the primary gave to the other worker meanwhile, as a `worker back` event.
fn add_recoveries(events: &mut Vec<Value>, lifecycle: &[Value]) {
    let secs = |v: &Value| v["secs"].as_f64().unwrap_or(f64::NAN);
    let kills: Vec<f64> = events.iter().filter(|e| e["kind"] == "kill").map(secs).collect();
    for killed in kills {
        let Some(ready) = lifecycle.iter().find(|e| e["kind"] == "Ready" && secs(e) > killed) else { continue };
        let back = secs(ready);
        let redispatched: u64 = lifecycle
            .iter()
            .filter(|e| e["kind"] == "Redispatched" && (killed..=back).contains(&secs(e)))
            .filter_map(|e| e["connections"].as_u64())
            .sum();
        events.push(json!({
            "kind": "worker back", "secs": back, "after_kill_secs": back - killed, "redispatched": redispatched,
        }));
    }
}

impl Scenario for Soak {
    fn name(&self) -> String {
        "scale-soak".into()
    }
    fn about(&self) -> String {
        "soak: --soak-connections (100,000) connections from the seed's load generator through \
         handoff's round-robin primary with 2 Rust workers; every fifth of the run one worker is \
         SIGKILLed, and half-way between kills a rolling reload runs (each event waits for the \
         previous one to be over); every connection must be answered; the primary's descriptors \
         (/proc/PID/fd) and RSS sampled every twentieth; flat = idle after vs idle before within \
         ±8 descriptors and +10 MiB"
            .into()
    }
    fn variants(&self) -> Vec<VariantSpec> {
        vec![rust("handoff")]
    }
    fn metrics(&self) -> Vec<MetricSpec> {
        vec![
            MetricSpec::new("ok", "soak answered (connections)"),
            MetricSpec::new("errors", "soak errors (count)").lower_is_better(),
            MetricSpec::new("closed", "soak of which closed unanswered (count)").lower_is_better(),
            MetricSpec::new("conn_per_s", "soak (conn/s)"),
            MetricSpec::new("kills", "soak workers killed (count)"),
            MetricSpec::new("reloads", "soak reloads done (count)"),
            MetricSpec::new("redispatched", "soak redispatched (connections)"),
            MetricSpec::new("fds_start", "soak primary fds before (count)"),
            MetricSpec::new("fds_max", "soak primary fds max (count)"),
            MetricSpec::new("fds_end", "soak primary fds after (count)"),
            MetricSpec::new("rss_start_kib", "soak primary RSS before (KiB)"),
            MetricSpec::new("rss_max_kib", "soak primary RSS max (KiB)"),
            MetricSpec::new("rss_end_kib", "soak primary RSS after (KiB)"),
            MetricSpec::new("rss_second_half_kib", "soak primary RSS 2nd half (+KiB)").lower_is_better(),
            MetricSpec::new("flat", "soak fds and RSS flat (1=yes)"),
        ]
    }
    fn runs(&self, _ctx: &Ctx) -> usize {
        1
    }
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample> {
        if variant != "handoff" {
            bail!("unknown variant {variant}");
        }
        let n = ctx.soak_connections.max(EVENTS * 2);
        let every = n / EVENTS;
        let sample_every = (n / SAMPLES).max(1);
        let step = (n / 100).max(1);
        let argv = with_child(
            ctx.role(&["cluster-primary", "--impl", "handoff", "--schedule", "rr", "--workers", "2", "--control"]),
            ctx.role(&["cluster-worker", "--impl", "handoff"]),
        );
        let (mut server, addr, pids0) = start_server("scale-soak/handoff", &argv, &[])?;
        if pids0.len() != 3 {
            bail!("expected a primary and two workers, got pids {pids0:?}");
        }
        let primary = pids0[0];
        warm_up(ctx, &addr, &server)?;
        settle();
        let t0 = Instant::now();
        let t0_unix = unix_secs();
        let mut series = vec![point(primary, 0, 0.0, "idle before")?];
        let mut events: Vec<Value> = Vec::new();

        let (concurrency, total, progress) = (ctx.concurrency.to_string(), n.to_string(), step.to_string());
        let mut load = Proc::spawn(
            "scale-soak/loadgen",
            &ctx.role(&[
                "loadgen", "--addr", &addr, "--concurrency", &concurrency, "--connections", &total, "--progress", &progress,
            ]),
            &[],
            None,
        )?;
        let deadline = t0 + Duration::from_secs_f64(n as f64 / 1000.0 + 120.0);
        let mut control = Control { server: &mut server, pid: primary, stash: VecDeque::new() };
        let (mut next_sample, mut next_kill, mut next_reload) = (sample_every, every, every + every / 2);
        let (mut kills, mut reloads, mut reload_failures) = (0u64, 0u64, Vec::new());
        let mut reload_pending: Option<f64> = None;
        let mut killed: Option<u32> = None;
        // The end of the reload started at `started` (seconds into the run).
        let mut finish_reload = |control: &mut Control, events: &mut Vec<Value>, started: f64| -> Result<()> {
            let reloaded = control.next("cluster-reloaded", Duration::from_secs(60))?;
            let took = reloaded["secs"].as_f64().unwrap_or(f64::NAN);
            match reloaded.get("failed") {
                Some(why) => reload_failures.push(why.to_string()),
                None => reloads += 1,
            }
            events.push(json!({ "kind": "reload done", "secs": started + took, "took_secs": took, "result": reloaded }));
            Ok(())
        };
        let result = loop {
            let text = load.wait_line(RESULT_PREFIX, deadline)?;
            let value: Value = serde_json::from_str(&text).with_context(|| format!("bad loadgen line {text:?}"))?;
            match value["role"].as_str() {
                Some("loadgen") => break value,
                Some("loadgen-progress") => {}
                _ => continue,
            }
            let done = num(&value, "done")? as u64;
            let secs = t0.elapsed().as_secs_f64();
            if done >= next_sample {
                series.push(point(primary, done, secs, "under load")?);
                next_sample += sample_every;
            }
            if done >= next_kill && next_kill < n {
                if let Some(started) = reload_pending.take() {
                    finish_reload(&mut control, &mut events, started)?;
                }
                let victim = control.kill_a_worker(kills as usize)?;
                kills += 1;
                killed = Some(victim);
                events.push(json!({ "kind": "kill", "connections": done, "secs": secs, "pid": victim }));
                next_kill += every;
            }
            if done >= next_reload && next_reload < n {
                if let Some(victim) = killed.take() {
                    control.wait_serving(2, victim, Duration::from_secs(30))?;
                }
                control.signal(libc::SIGUSR2)?;
                let started = t0.elapsed().as_secs_f64();
                reload_pending = Some(started);
                events.push(json!({ "kind": "reload", "connections": done, "secs": started }));
                next_reload += every;
            }
        };
        load.wait_exit(deadline)?;
        if let Some(started) = reload_pending.take() {
            finish_reload(&mut control, &mut events, started)?;
        }
        if let Some(victim) = killed.take() {
            control.wait_serving(2, victim, Duration::from_secs(30))?;
        }
        settle();
        let status = control.status()?;
        let lifecycle = control.drain(t0_unix);
        add_recoveries(&mut events, &lifecycle);
        let end = point(primary, n, t0.elapsed().as_secs_f64(), "idle after")?;
        series.push(end.clone());
        server.kill();

        events.sort_by(|a, b| a["secs"].as_f64().unwrap_or(0.0).total_cmp(&b["secs"].as_f64().unwrap_or(0.0)));
        let start = &series[0];
        let (fds_start, fds_end) = (num(start, "fds")?, num(&end, "fds")?);
        let (rss_start, rss_end) = (num(start, "rss_kib")?, num(&end, "rss_kib")?);
        let max = |key: &str| series.iter().filter_map(|p| p[key].as_f64()).fold(f64::NAN, f64::max);
        let flat = (fds_end - fds_start).abs() <= FLAT_FDS && rss_end <= rss_start + FLAT_RSS_KIB;
        // The reading half-way: what the second half added, once the allocator's high-water
        // marks are reached.
        let rss_mid = series
            .iter()
            .find(|p| p["connections"].as_u64().is_some_and(|c| c >= n / 2))
            .and_then(|p| p["rss_kib"].as_f64())
            .unwrap_or(f64::NAN);
        // A connection the killed worker had taken and not yet answered dies with it (no process
        // is left that could answer it); the loadgen counts it as `closed`.
        let closed = result["error_kinds"]["closed"].as_f64().unwrap_or(0.0);
        let mut sample = Sample::default();
        sample
            .set("connections", n as f64)
            .set("ok", num(&result, "ok")?)
            .set("errors", num(&result, "errors")?)
            .set("closed", closed)
            .set("conn_per_s", num(&result, "conn_per_s")?)
            .set("p99_us", num(&result, "p99_us")?)
            .set("max_us", num(&result, "max_us")?)
            .set("kills", kills as f64)
            .set("reloads", reloads as f64)
            .set("reload_failures", reload_failures.len() as f64)
            .set("redispatched", num(&status, "redispatched")?)
            .set("dropped", num(&status, "dropped")?)
            .set("fds_start", fds_start)
            .set("fds_max", max("fds"))
            .set("fds_end", fds_end)
            .set("rss_start_kib", rss_start)
            .set("rss_max_kib", max("rss_kib"))
            .set("rss_end_kib", rss_end)
            .set("rss_second_half_kib", rss_end - rss_mid)
            .set("flat", if flat { 1.0 } else { 0.0 });
        sample.raw = json!({
            "loadgen": result,
            "status_end": status,
            "series": series,
            "events": events,
            "lifecycle": lifecycle,
            "reload_failures": reload_failures,
            "every": every,
        });
        Ok(sample)
    }
}
