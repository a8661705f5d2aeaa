//! Round trips of a small message.

use std::time::Duration;

use anyhow::{bail, Result};

use super::{num, run_pair};
use crate::harness::{node, rust, split_runtime, with_child, Ctx, MetricSpec, Sample, Scenario, VariantSpec};

pub struct RoundTrip;

impl Scenario for RoundTrip {
    fn name(&self) -> String {
        "rtt".into()
    }
    fn about(&self) -> String {
        "round trip of a 64-byte JSON object: the parent sends, the child sends it back; \
         percentiles over the measured round trips after a warm-up; both processes pinned to one \
         CPU (unless --rtt-unpinned)"
            .into()
    }
    fn variants(&self) -> Vec<VariantSpec> {
        vec![rust("handoff-rr"), rust("handoff-rr-mt"), node("rust→node"), node("node→rust"), node("node"), rust("bare")]
    }
    fn metrics(&self) -> Vec<MetricSpec> {
        vec![
            MetricSpec::new("p50_us", "rtt p50 (µs)")
                .lower_is_better()
                .ratio("handoff/node", "handoff-rr", "node")
                .ratio("handoff/bare", "handoff-rr", "bare")
                .ratio("handoff-mt/bare", "handoff-rr-mt", "bare"),
            MetricSpec::new("p99_us", "rtt p99 (µs)")
                .lower_is_better()
                .ratio("handoff/node", "handoff-rr", "node")
                .ratio("handoff/bare", "handoff-rr", "bare"),
        ]
    }
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample> {
        let count = ctx.rtt_count.to_string();
        let warmup = ctx.rtt_warmup.to_string();
        let common = ["--count", count.as_str(), "--warmup", warmup.as_str()];
        let ping = |imp: &str| {
            let mut args = vec!["rtt-ping", "--impl", imp];
            args.extend(common);
            ctx.role(&args)
        };
        let node_ping = || {
            let mut args = vec!["ping"];
            args.extend(common);
            ctx.node_script("rtt.js", &args)
        };
        let rust_echo = ctx.role(&["rtt-echo", "--impl", "handoff"]);
        let node_echo = ctx.node_script("rtt.js", &["echo"]);
        let (base, env) = split_runtime(variant);
        let argv = match base {
            "handoff-rr" => with_child(ping("handoff"), rust_echo),
            "rust→node" => with_child(ping("handoff"), node_echo),
            "node→rust" => with_child(node_ping(), rust_echo),
            "node" => with_child(node_ping(), node_echo),
            "bare" => with_child(ping("bare"), ctx.role(&["rtt-echo", "--impl", "bare"])),
            other => bail!("unknown variant {other}"),
        };
        let raw = run_pair(&format!("rtt/{variant}"), &argv, &env, ctx.rtt_pin, "rtt-ping", Duration::from_secs(120))?;
        let mut sample = Sample::default();
        sample.set("p50_us", num(&raw, "p50_us")?).set("p99_us", num(&raw, "p99_us")?);
        sample.set("mean_us", num(&raw, "mean_us")?);
        sample.raw = raw;
        Ok(sample)
    }
}
