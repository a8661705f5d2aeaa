//! The cluster under load: one port, two worker processes.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{finish_load, loadgen, num, start_server, warm_up, Load};
use crate::harness::{node, rust, with_child, Ctx, MetricSpec, Sample, Scenario, VariantSpec};
use crate::procs::{cpu_seconds, machine_cpu};

pub struct Cluster {
    /// `rr` or `shared`.
    pub schedule: &'static str,
}

impl Cluster {
    fn server(&self, ctx: &Ctx, variant: &str) -> Result<Vec<String>> {
        let primary = |imp: &str| ctx.role(&["cluster-primary", "--impl", imp, "--schedule", self.schedule]);
        Ok(match variant {
            "handoff" => with_child(primary("handoff"), ctx.role(&["cluster-worker", "--impl", "handoff"])),
            "handoff+node" => with_child(primary("handoff"), ctx.node_script("cluster.js", &["worker"])),
            "node" => ctx.node_script("cluster.js", &["primary", self.schedule]),
            "bare" => with_child(primary("bare"), ctx.role(&["cluster-worker", "--impl", "bare"])),
            other => bail!("unknown variant {other}"),
        })
    }
}

impl Scenario for Cluster {
    fn name(&self) -> String {
        format!("cluster-{}", self.schedule)
    }
    fn about(&self) -> String {
        let how = if self.schedule == "rr" {
            "round-robin: the primary accepts and hands each connection to a worker"
        } else {
            "shared: the workers accept on the primary's listener"
        };
        format!(
            "cluster, {how}; 2 workers answer `Child handled it.` and close; handoff = handoff's \
             primary + Rust workers (handoff::cluster::listen), handoff+node = handoff's primary + \
             an unchanged Node net app, node = Node's cluster, bare = poll/accept/sendmsg with one \
             ack byte per connection (rr) or blocking accept in each worker (shared); the seed's \
             load generator; CPU from /proc"
        )
    }
    fn variants(&self) -> Vec<VariantSpec> {
        vec![rust("handoff"), node("handoff+node"), node("node"), rust("bare")]
    }
    fn metrics(&self) -> Vec<MetricSpec> {
        let title = |what: &str| format!("cluster-{} {what}", self.schedule);
        let mut conn = MetricSpec::new("conn_per_s", title("(conn/s)"))
            .ratio("handoff+node/node", "handoff+node", "node")
            .ratio("handoff/node", "handoff", "node")
            .ratio("handoff/bare", "handoff", "bare");
        let mut metrics = Vec::new();
        if self.schedule == "rr" {
            metrics.push(conn);
            metrics.push(
                MetricSpec::new("primary_cpu_us_per_conn", title("primary CPU (µs/conn)"))
                    .lower_is_better()
                    .ratio("handoff/bare", "handoff", "bare")
                    .ratio("handoff+node/bare", "handoff+node", "bare")
                    .ratio("handoff/node", "handoff", "node"),
            );
        } else {
            conn = conn.ratio("bare/node", "bare", "node");
            metrics.push(conn);
        }
        metrics.extend([
            MetricSpec::new("cpu_us_per_conn", title("all CPU (µs/conn)"))
                .lower_is_better()
                .ratio("handoff/bare", "handoff", "bare")
                .ratio("handoff+node/node", "handoff+node", "node"),
            MetricSpec::new("p99_us", title("latency p99 (µs)")).lower_is_better(),
            MetricSpec::new("errors", title("errors (count)")).lower_is_better(),
        ]);
        metrics
    }
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample> {
        measured_load(ctx, &format!("{}/{variant}", self.name()), &self.server(ctx, variant)?, 2)
    }
}

/// Starts a cluster (`argv`: a primary with `workers` workers), warms it up, runs the load
/// generator for `ctx.seed_secs` and measures conn/s, the primary's and all processes' CPU per
/// connection, latency, errors and how busy the machine was.
pub fn measured_load(ctx: &Ctx, name: &str, argv: &[String], workers: usize) -> Result<Sample> {
    let (mut server, addr, pids) = start_server(name, argv, &[])?;
    if pids.len() != workers + 1 {
        bail!("expected a primary and {workers} workers, got pids {pids:?}");
    }
    let cpu = |pids: &[u32]| -> Result<f64> { pids.iter().map(|&p| cpu_seconds(p)).sum() };
    warm_up(ctx, &addr, &server)?;
    let (primary0, all0, machine0) = (cpu(&pids[..1])?, cpu(&pids)?, machine_cpu()?);
    let load = loadgen(ctx, &addr, Load::Secs(ctx.seed_secs), Duration::from_secs_f64(ctx.seed_secs + 60.0))
        .with_context(|| format!("load{}", server.stderr_tail()))?;
    let (primary1, all1, machine1) =
        (cpu(&pids[..1])?, cpu(&pids).context("a server process died during the run")?, machine_cpu()?);
    let ok = finish_load(&load, &mut server)?;
    let mut sample = Sample::default();
    sample
        .set("conn_per_s", num(&load, "conn_per_s")?)
        .set("primary_cpu_us_per_conn", (primary1 - primary0) * 1e6 / ok)
        .set("cpu_us_per_conn", (all1 - all0) * 1e6 / ok)
        .set("p50_us", num(&load, "p50_us")?)
        .set("p99_us", num(&load, "p99_us")?)
        .set("errors", num(&load, "errors")?)
        .set("machine_busy", (machine1.0 - machine0.0) / (machine1.1 - machine0.1).max(1e-9));
    sample.raw = json!({ "loadgen": load, "pids": pids });
    Ok(sample)
}
