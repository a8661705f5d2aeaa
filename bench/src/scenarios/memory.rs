//! The parent's memory over a long handoff seed run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::seed::Seed;
use super::{loadgen, num, Load};
use crate::harness::{rust, Ctx, MetricSpec, Sample, Scenario, VariantSpec};
use crate::procs::rss_kib;

pub struct Memory;

/// Growth allowed for "flat".
pub const FLAT_SLACK_KIB: f64 = 10.0 * 1024.0;

impl Scenario for Memory {
    fn name(&self) -> String {
        "memory".into()
    }
    fn about(&self) -> String {
        "handoff seed pipeline (Rust parent + Rust child) serving a fixed number of connections; \
         the parent's VmRSS sampled every 100 ms; flat = max <= start + 10 MiB"
            .into()
    }
    fn variants(&self) -> Vec<VariantSpec> {
        vec![rust("handoff")]
    }
    fn metrics(&self) -> Vec<MetricSpec> {
        vec![
            MetricSpec::new("rss_start_kib", "mem parent RSS start (KiB)"),
            MetricSpec::new("rss_max_kib", "mem parent RSS max (KiB)"),
            MetricSpec::new("rss_end_kib", "mem parent RSS end (KiB)"),
            MetricSpec::new("flat", "mem flat (1=yes)"),
            MetricSpec::new("conn_per_s", "mem run (conn/s)"),
        ]
    }
    fn runs(&self, _ctx: &Ctx) -> usize {
        1
    }
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample> {
        let (mut server, addr, pids) = Seed::start(ctx, variant)?;
        let parent = pids[0];
        let child = pids.get(1).copied();
        let idle = rss_kib(parent)?;
        let warm = loadgen(ctx, &addr, Load::Connections(1000), Duration::from_secs(60))?;
        if num(&warm, "errors")? > 0.0 {
            bail!("warm-up had errors: {warm}");
        }
        let start = rss_kib(parent)?;
        let series = Arc::new(Mutex::new(Vec::<(f64, u64)>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (series, stop) = (series.clone(), stop.clone());
            std::thread::spawn(move || {
                let t0 = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(kib) = rss_kib(parent) {
                        series.lock().unwrap().push((t0.elapsed().as_secs_f64(), kib));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let load = loadgen(ctx, &addr, Load::Connections(ctx.memory_connections), Duration::from_secs(180));
        stop.store(true, Ordering::SeqCst);
        sampler.join().expect("sampler");
        let load = load?;
        std::thread::sleep(Duration::from_millis(200));
        let end = rss_kib(parent).context("the parent died")?;
        let child_end = child.and_then(|c| rss_kib(c).ok());
        server.kill();
        let series = series.lock().unwrap().clone();
        let max = series.iter().map(|&(_, k)| k).max().unwrap_or(start).max(end).max(start);
        let mut sample = Sample::default();
        sample
            .set("rss_idle_kib", idle as f64)
            .set("rss_start_kib", start as f64)
            .set("rss_max_kib", max as f64)
            .set("rss_end_kib", end as f64)
            .set("flat", if (max as f64) <= start as f64 + FLAT_SLACK_KIB { 1.0 } else { 0.0 })
            .set("conn_per_s", num(&load, "conn_per_s")?)
            .set("ok", num(&load, "ok")?)
            .set("errors", num(&load, "errors")?);
        sample.raw = json!({
            "loadgen": load,
            "connections": ctx.memory_connections,
            "child_rss_end_kib": child_end,
            "rss_series": series.iter().map(|&(t, k)| json!([t, k])).collect::<Vec<_>>(),
        });
        Ok(sample)
    }
}
