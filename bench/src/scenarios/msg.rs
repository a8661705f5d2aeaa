//! One-way messages of one size.

use std::time::Duration;

use anyhow::{bail, Result};

use super::{num, run_pair};
use crate::harness::{node, rust, split_runtime, with_child, Ctx, MetricSpec, Sample, Scenario, VariantSpec};

pub struct Messages {
    pub size: usize,
    pub label: &'static str,
    /// Fewest messages per run, however long they take.
    pub min_count: u64,
}

impl Scenario for Messages {
    fn name(&self) -> String {
        format!("msg-{}", self.label)
    }
    fn about(&self) -> String {
        format!(
            "one-way {}-byte messages parent to child ({}); throughput at the receiver from the \
             start marker to the last message",
            self.size,
            if self.size == 64 { "a JSON object" } else { "a JSON string" }
        )
    }
    fn variants(&self) -> Vec<VariantSpec> {
        let mut variants = vec![rust("handoff-rr")];
        if self.size == 64 {
            variants.push(rust("handoff-rr-mt"));
        }
        if self.size >= 1024 * 1024 {
            variants.push(rust("handoff-rr-bigheap"));
        }
        variants.extend([
            node("rust→node"),
            node("node→rust"),
            node("node"),
            rust("bare-each"),
            rust("bare-batched"),
        ]);
        variants
    }
    fn metrics(&self) -> Vec<MetricSpec> {
        let title = if self.size == 64 {
            format!("msg {} (msg/s)", self.label)
        } else {
            format!("msg {} (MB/s)", self.label)
        };
        vec![MetricSpec::new("rate", title)
            .ratio("handoff/node", "handoff-rr", "node")
            .ratio("handoff/bare-each", "handoff-rr", "bare-each")
            .ratio("handoff/bare-batched", "handoff-rr", "bare-batched")]
        .into_iter()
        .map(|m| if self.size == 64 { m.ratio("handoff-mt/node", "handoff-rr-mt", "node") } else { m })
        .collect()
    }
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample> {
        let size = self.size.to_string();
        let secs = ctx.msg_secs.to_string();
        let min_count = self.min_count.to_string();
        let common = ["--size", size.as_str(), "--secs", secs.as_str(), "--min-count", min_count.as_str()];
        let send = |imp: &str, batched: bool| {
            let mut args = vec!["msg-send", "--impl", imp];
            if batched {
                args.push("--batched");
            }
            args.extend(common);
            ctx.role(&args)
        };
        let node_send = || {
            let mut args = vec!["send"];
            args.extend(common);
            ctx.node_script("msg.js", &args)
        };
        let rust_recv = ctx.role(&["msg-recv", "--impl", "handoff"]);
        let node_recv = ctx.node_script("msg.js", &["recv"]);
        let bare_recv = ctx.role(&["msg-recv", "--impl", "bare"]);
        let (base, env) = split_runtime(variant);
        let argv = match base {
            "handoff-rr" => with_child(send("handoff", false), rust_recv),
            "rust→node" => with_child(send("handoff", false), node_recv),
            "node→rust" => with_child(node_send(), rust_recv),
            "node" => with_child(node_send(), node_recv),
            "bare-each" => with_child(send("bare", false), bare_recv),
            "bare-batched" => with_child(send("bare", true), bare_recv),
            other => bail!("unknown variant {other}"),
        };
        let timeout = Duration::from_secs_f64(60.0 + ctx.msg_secs * 4.0);
        let raw = run_pair(&format!("{}/{variant}", self.name()), &argv, &env, None, "msg-recv", timeout)?;
        let (count, secs) = (num(&raw, "count")?, num(&raw, "secs")?);
        if count < 1.0 || secs <= 0.0 {
            bail!("nothing measured: {raw}");
        }
        if num(&raw, "errors")? > 0.0 {
            bail!("the receiver reported errors: {raw}");
        }
        let mut sample = Sample { raw, ..Sample::default() };
        let msg_per_s = count / secs;
        let mb_per_s = count * self.size as f64 / secs / 1e6;
        sample
            .set("rate", if self.size == 64 { msg_per_s } else { mb_per_s })
            .set("msg_per_s", msg_per_s)
            .set("mb_per_s", mb_per_s)
            .set("count", count)
            .set("secs", secs);
        Ok(sample)
    }
}
