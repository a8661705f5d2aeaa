//! Scale (issue 10): one parent, many children, every channel busy at once. See
//! [`crate::roles::children`] for what the parent does.

use std::time::Duration;

use anyhow::{bail, Result};

use super::{num, run_pair};
use crate::harness::{node, rust, split_runtime, with_child, Ctx, MetricSpec, Sample, Scenario, VariantSpec};

pub struct Children {
    pub count: usize,
}

/// Messages in flight per channel: enough that no channel waits on a single round trip, few
/// enough that nothing queues beyond the socket buffers (32 × 65 bytes per direction).
const WINDOW: usize = 32;

impl Children {
    /// (warm-up, measured) seconds.
    fn timing(ctx: &Ctx) -> (f64, f64) {
        if ctx.quick {
            (0.2, 0.5)
        } else {
            (0.5, 1.5)
        }
    }
}

impl Scenario for Children {
    fn name(&self) -> String {
        format!("children-{}", self.count)
    }
    fn about(&self) -> String {
        format!(
            "one parent, {} children, each with its own channel; the parent keeps {WINDOW} 64-byte \
             messages in flight on every channel at once, each child echoes every message, each \
             echo is answered with the next message; msg/s = echoes received by the parent, all \
             channels; memory: parent VmRSS (and its anonymous part, RssAnon: without code paged in) \
             with every channel busy minus before the first spawn, per channel; children: VmRSS \
             and Pss",
            self.count
        )
    }
    fn variants(&self) -> Vec<VariantSpec> {
        vec![rust("handoff"), node("node"), rust("bare")]
    }
    fn metrics(&self) -> Vec<MetricSpec> {
        let n = self.name();
        vec![
            MetricSpec::new("rate", format!("{n} (msg/s)"))
                .ratio("handoff/node", "handoff", "node")
                .ratio("handoff/bare", "handoff", "bare"),
            MetricSpec::new("parent_cpu_us_per_msg", format!("{n} parent CPU (µs/msg)"))
                .lower_is_better()
                .ratio("handoff/node", "handoff", "node")
                .ratio("handoff/bare", "handoff", "bare"),
            MetricSpec::new("cpu_us_per_msg", format!("{n} all CPU (µs/msg)"))
                .lower_is_better()
                .ratio("handoff/node", "handoff", "node")
                .ratio("handoff/bare", "handoff", "bare"),
            MetricSpec::new("min_share", format!("{n} slowest channel (x mean)")),
            MetricSpec::new("parent_kib_per_channel", format!("{n} parent RSS KiB/channel"))
                .lower_is_better()
                .ratio("handoff/node", "handoff", "node")
                .ratio("handoff/bare", "handoff", "bare"),
            MetricSpec::new("parent_anon_kib_per_channel", format!("{n} parent anon KiB/channel"))
                .lower_is_better()
                .ratio("handoff/node", "handoff", "node")
                .ratio("handoff/bare", "handoff", "bare"),
            MetricSpec::new("child_rss_kib", format!("{n} child RSS (KiB)"))
                .lower_is_better()
                .ratio("handoff/node", "handoff", "node"),
            MetricSpec::new("child_pss_kib", format!("{n} child PSS (KiB)"))
                .lower_is_better()
                .ratio("handoff/node", "handoff", "node"),
        ]
    }
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample> {
        let (warmup, secs) = Children::timing(ctx);
        let (children, window) = (self.count.to_string(), WINDOW.to_string());
        let (warmup_s, secs_s) = (warmup.to_string(), secs.to_string());
        let common = [
            "--children",
            children.as_str(),
            "--window",
            window.as_str(),
            "--warmup",
            warmup_s.as_str(),
            "--secs",
            secs_s.as_str(),
        ];
        let rust_parent = |imp: &str| {
            let mut args = vec!["children-parent", "--impl", imp];
            args.extend(common);
            ctx.role(&args)
        };
        let (base, env) = split_runtime(variant);
        let argv = match base {
            "handoff" => with_child(rust_parent("handoff"), ctx.role(&["rtt-echo", "--impl", "handoff"])),
            "bare" => with_child(rust_parent("bare"), ctx.role(&["rtt-echo", "--impl", "bare"])),
            "node" => {
                let clk_tck = crate::procs::clock_ticks().to_string();
                let mut args = vec!["parent"];
                args.extend(common);
                args.extend(["--clk-tck", clk_tck.as_str()]);
                with_child(ctx.node_script("children.js", &args), ctx.node_script("rtt.js", &["echo"]))
            }
            other => bail!("unknown variant {other}"),
        };
        let timeout = Duration::from_secs_f64(90.0 + warmup + secs);
        let raw = run_pair(&format!("{}/{variant}", self.name()), &argv, &env, None, "children-parent", timeout)?;
        let (count, secs) = (num(&raw, "count")?, num(&raw, "secs")?);
        if count < 1.0 || secs <= 0.0 {
            bail!("nothing measured: {raw}");
        }
        let n = self.count as f64;
        let before = num(&raw, "parent_rss_before_kib")?;
        let active = num(&raw, "parent_rss_active_kib")?;
        let mut sample = Sample::default();
        sample
            .set("rate", count / secs)
            .set("parent_cpu_us_per_msg", num(&raw, "parent_cpu_s")? * 1e6 / count)
            .set("cpu_us_per_msg", (num(&raw, "parent_cpu_s")? + num(&raw, "children_cpu_s")?) * 1e6 / count)
            .set("min_share", num(&raw, "per_channel_min")? / num(&raw, "per_channel_mean")?.max(1e-9))
            .set("parent_kib_per_channel", (active - before) / n)
            .set("parent_ready_kib_per_channel", (num(&raw, "parent_rss_ready_kib")? - before) / n)
            .set(
                "parent_anon_kib_per_channel",
                (num(&raw, "parent_anon_active_kib")? - num(&raw, "parent_anon_before_kib")?) / n,
            )
            .set("child_rss_kib", num(&raw, "child_rss_kib_mean")?)
            .set("child_pss_kib", num(&raw, "child_pss_kib_mean")?)
            .set("count", count)
            .set("secs", secs);
        sample.raw = raw;
        Ok(sample)
    }
}
