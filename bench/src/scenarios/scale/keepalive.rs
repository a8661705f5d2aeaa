//! `scale-keepalive`: many connections held open across a 2-worker round-robin cluster while
//! fresh connections keep arriving.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::super::{finish_load, loadgen, num, start_server, warm_up, Load};
use super::{fd_count, settle};
use crate::harness::{rust, with_child, Ctx, MetricSpec, Sample, Scenario, VariantSpec};
use crate::procs::{rss_kib, Proc};

pub struct Keepalive;

/// (primary, workers) of one reading: RSS in KiB and descriptors.
#[derive(Debug, Clone, Copy)]
struct Reading {
    primary_rss_kib: u64,
    primary_fds: u64,
    workers_rss_kib: u64,
    workers_fds: u64,
}

fn read(pids: &[u32]) -> Result<Reading> {
    let (primary, workers) = pids.split_first().context("no pids")?;
    let mut reading =
        Reading { primary_rss_kib: rss_kib(*primary)?, primary_fds: fd_count(*primary)?, workers_rss_kib: 0, workers_fds: 0 };
    for &w in workers {
        reading.workers_rss_kib += rss_kib(w).context("a worker died")?;
        reading.workers_fds += fd_count(w)?;
    }
    Ok(reading)
}

impl Scenario for Keepalive {
    fn name(&self) -> String {
        "scale-keepalive".into()
    }
    fn about(&self) -> String {
        "keep-alive: handoff's round-robin primary with 2 Rust workers that answer each connection, \
         end their writes and keep it until the client hangs up (as a Node app's \
         `socket.end(reply)` does); a holder opens and keeps --keepalive-connections of them \
         (10,000) while the seed's load generator makes fresh ones for --seed-secs; RSS per held \
         connection = (RSS holding − RSS before, both idle after a fresh load) / held; fresh \
         latency with and without the held connections, same run"
            .into()
    }
    fn variants(&self) -> Vec<VariantSpec> {
        vec![rust("handoff")]
    }
    fn metrics(&self) -> Vec<MetricSpec> {
        vec![
            MetricSpec::new("held", "keepalive held (connections)"),
            MetricSpec::new("primary_rss_per_held_b", "keepalive primary RSS (B/held conn)").lower_is_better(),
            MetricSpec::new("primary_fds_added", "keepalive primary fds added (count)").lower_is_better(),
            MetricSpec::new("workers_rss_per_held_b", "keepalive workers RSS (B/held conn)").lower_is_better(),
            MetricSpec::new("conn_per_s", "keepalive fresh, held (conn/s)"),
            MetricSpec::new("conn_per_s_none", "keepalive fresh, none held (conn/s)"),
            MetricSpec::new("p50_us", "keepalive fresh p50, held (µs)").lower_is_better(),
            MetricSpec::new("p99_us", "keepalive fresh p99, held (µs)").lower_is_better(),
            MetricSpec::new("p99_us_none", "keepalive fresh p99, none held (µs)").lower_is_better(),
            MetricSpec::new("errors", "keepalive errors (count)").lower_is_better(),
        ]
    }
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample> {
        if variant != "handoff" {
            bail!("unknown variant {variant}");
        }
        let n = ctx.keepalive_connections;
        let argv = with_child(
            ctx.role(&["cluster-primary", "--impl", "handoff", "--schedule", "rr", "--workers", "2"]),
            ctx.role(&["cluster-worker", "--impl", "handoff", "--hold"]),
        );
        let (mut server, addr, pids) = start_server(&format!("scale-keepalive/{variant}"), &argv, &[])?;
        if pids.len() != 3 {
            bail!("expected a primary and two workers, got pids {pids:?}");
        }
        warm_up(ctx, &addr, &server)?;
        let timeout = Duration::from_secs_f64(ctx.seed_secs + 60.0);

        // Fresh connections alone; then the baseline, idle, with the fresh load's buffers in place.
        let none = loadgen(ctx, &addr, Load::Secs(ctx.seed_secs), timeout)
            .with_context(|| format!("load without held connections{}", server.stderr_tail()))?;
        settle();
        let before = read(&pids)?;

        // Open and keep n connections.
        let started = Instant::now();
        let count = n.to_string();
        let mut holder = Proc::spawn(
            "keepalive-hold",
            &ctx.role(&["keepalive-hold", "--addr", &addr, "--connections", &count]),
            &[],
            None,
        )?;
        let held = holder
            .wait_result("keepalive-held", Instant::now() + Duration::from_secs(120))
            .with_context(|| format!("holding {n} connections{}", server.stderr_tail()))?;
        let held_count = num(&held, "held")?;
        if num(&held, "errors")? > 0.0 || held_count < n as f64 {
            bail!("the holder kept {held_count} of {n} connections: {held}");
        }
        let hold_secs = started.elapsed().as_secs_f64();
        settle();
        let holding = read(&pids)?;

        // Fresh connections while they are held.
        let load = loadgen(ctx, &addr, Load::Secs(ctx.seed_secs), timeout)
            .with_context(|| format!("load with held connections{}", server.stderr_tail()))?;
        settle();
        let after = read(&pids)?;
        // The workers still hold them (one descriptor each), so the load ran against them all.
        let still_held = after.workers_fds.saturating_sub(before.workers_fds);
        drop(holder);
        let ok = finish_load(&load, &mut server)?;

        let per_held = |kib0: u64, kib1: u64| (kib1 as f64 - kib0 as f64) * 1024.0 / held_count;
        let mut sample = Sample::default();
        sample
            .set("held", held_count)
            .set("hold_secs", hold_secs)
            .set("primary_rss_per_held_b", per_held(before.primary_rss_kib, holding.primary_rss_kib))
            .set("primary_rss_per_held_after_load_b", per_held(before.primary_rss_kib, after.primary_rss_kib))
            .set("primary_fds_added", holding.primary_fds as f64 - before.primary_fds as f64)
            .set("workers_rss_per_held_b", per_held(before.workers_rss_kib, holding.workers_rss_kib))
            .set("workers_fds_held_after_load", still_held as f64)
            .set("conn_per_s", num(&load, "conn_per_s")?)
            .set("conn_per_s_none", num(&none, "conn_per_s")?)
            .set("p50_us", num(&load, "p50_us")?)
            .set("p99_us", num(&load, "p99_us")?)
            .set("p50_us_none", num(&none, "p50_us")?)
            .set("p99_us_none", num(&none, "p99_us")?)
            .set("ok", ok)
            .set("errors", num(&load, "errors")? + num(&none, "errors")?);
        let reading = |r: Reading| {
            json!({
                "primary_rss_kib": r.primary_rss_kib, "primary_fds": r.primary_fds,
                "workers_rss_kib": r.workers_rss_kib, "workers_fds": r.workers_fds,
            })
        };
        sample.raw = json!({
            "pids": pids,
            "holder": held,
            "loadgen_none_held": none,
            "loadgen_held": load,
            "before": reading(before),
            "holding": reading(holding),
            "after_load": reading(after),
        });
        if (still_held as f64) < held_count {
            bail!("the workers hold {still_held} more descriptors than before, not {held_count}: {}", sample.raw);
        }
        Ok(sample)
    }
}
