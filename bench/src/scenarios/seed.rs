//! The seed pipeline under load.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{finish_load, loadgen, num, start_server, warm_up, Load};
use crate::harness::{node, rust, split_runtime, with_child, Ctx, MetricSpec, Sample, Scenario, VariantSpec};
use crate::procs::{cpu_seconds, machine_cpu, Proc};

pub struct Seed;

impl Seed {
    /// The server command of a variant.
    pub fn server(ctx: &Ctx, variant: &str) -> Result<Vec<String>> {
        let rust_parent = || ctx.role(&["seed-parent", "--impl", "handoff"]);
        let rust_child = || ctx.role(&["seed-child", "--impl", "handoff"]);
        let node_parent = || ctx.node_script("seed.js", &["parent"]);
        let node_child = || ctx.node_script("seed.js", &["child"]);
        Ok(match variant {
            "handoff" => with_child(rust_parent(), rust_child()),
            "handoff-direct" => with_child(
                ctx.role(&["seed-parent", "--impl", "handoff"]),
                ctx.role(&["seed-child", "--impl", "handoff", "--lean"]),
            ),
            "handoff-await" => {
                with_child(ctx.role(&["seed-parent", "--impl", "handoff", "--send", "await"]), rust_child())
            }
            "rust→node" => with_child(rust_parent(), node_child()),
            "node→rust" => with_child(node_parent(), rust_child()),
            "node" => with_child(node_parent(), node_child()),
            "node-single" => ctx.node_script("seed.js", &["single"]),
            "bare" => with_child(
                ctx.role(&["seed-parent", "--impl", "bare"]),
                ctx.role(&["seed-child", "--impl", "bare"]),
            ),
            "bare-ack" => with_child(
                ctx.role(&["seed-parent", "--impl", "bare", "--ack"]),
                ctx.role(&["seed-child", "--impl", "bare", "--ack"]),
            ),
            other => bail!("unknown variant {other}"),
        })
    }

    /// Starts a server variant; returns it with its address and the pids of its processes.
    pub fn start(ctx: &Ctx, variant: &str) -> Result<(Proc, String, Vec<u32>)> {
        let (base, env) = split_runtime(variant);
        start_server(&format!("seed/{variant}"), &Seed::server(ctx, base)?, &env)
    }
}

fn cpu_total(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

impl Scenario for Seed {
    fn name(&self) -> String {
        "seed".into()
    }
    fn about(&self) -> String {
        "seed pipeline: a parent accepts on 127.0.0.1 and hands each connection to one child, which \
         writes `Child handled it.` and closes; the in-project load generator (one thread, on the \
         same 2 cores) makes one connection per request for a fixed time; CPU is the server \
         processes' utime+stime from /proc"
            .into()
    }
    fn variants(&self) -> Vec<VariantSpec> {
        vec![
            rust("handoff"),
            rust("handoff-direct"),
            rust("handoff-await"),
            rust("handoff-mt"),
            node("rust→node"),
            node("node→rust"),
            node("node"),
            node("node-single"),
            rust("bare"),
            rust("bare-ack"),
        ]
    }
    fn metrics(&self) -> Vec<MetricSpec> {
        vec![
            MetricSpec::new("conn_per_s", "seed (conn/s)")
                .ratio("handoff/node", "handoff", "node")
                .ratio("handoff-direct/node", "handoff-direct", "node")
                .ratio("handoff/node-single", "handoff", "node-single")
                .ratio("handoff/bare", "handoff", "bare")
                .ratio("handoff/bare-ack", "handoff", "bare-ack")
                .ratio("handoff-direct/bare-ack", "handoff-direct", "bare-ack")
                .ratio("handoff-mt/node", "handoff-mt", "node"),
            MetricSpec::new("cpu_us_per_conn", "seed server CPU (µs/conn)")
                .lower_is_better()
                .ratio("handoff/node", "handoff", "node")
                .ratio("handoff/bare", "handoff", "bare")
                .ratio("handoff/bare-ack", "handoff", "bare-ack")
                .ratio("handoff-direct/bare-ack", "handoff-direct", "bare-ack")
                .ratio("handoff-mt/bare", "handoff-mt", "bare"),
            MetricSpec::new("p50_us", "seed latency p50 (µs)").lower_is_better(),
            MetricSpec::new("p99_us", "seed latency p99 (µs)").lower_is_better(),
            MetricSpec::new("errors", "seed errors (count)").lower_is_better(),
            MetricSpec::new("loadgen_cpu_per_s", "seed loadgen CPU (cores)").lower_is_better(),
            MetricSpec::new("machine_busy", "seed machine busy (0-1)"),
        ]
    }
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample> {
        let (mut server, addr, pids) = Seed::start(ctx, variant)?;
        warm_up(ctx, &addr, &server)?;
        let cpu0 = cpu_total(&pids)?;
        let machine0 = machine_cpu()?;
        let timeout = Duration::from_secs_f64(ctx.seed_secs + 60.0);
        let load = loadgen(ctx, &addr, Load::Secs(ctx.seed_secs), timeout)
            .with_context(|| format!("load{}", server.stderr_tail()))?;
        let cpu1 = cpu_total(&pids).context("a server process died during the run")?;
        let machine1 = machine_cpu()?;
        let busy = (machine1.0 - machine0.0) / (machine1.1 - machine0.1).max(1e-9);
        let ok = finish_load(&load, &mut server)?;
        let mut sample = Sample::default();
        sample
            .set("conn_per_s", num(&load, "conn_per_s")?)
            .set("cpu_us_per_conn", (cpu1 - cpu0) * 1e6 / ok)
            .set("p50_us", num(&load, "p50_us")?)
            .set("p99_us", num(&load, "p99_us")?)
            .set("errors", num(&load, "errors")?)
            .set("ok", ok)
            .set("server_cpu_s", cpu1 - cpu0)
            .set("loadgen_cpu_per_s", num(&load, "cpu_s")? / num(&load, "secs")?)
            .set("machine_busy", busy);
        sample.raw = json!({ "loadgen": load, "pids": pids, "cpu_s": [cpu0, cpu1] });
        Ok(sample)
    }
}
