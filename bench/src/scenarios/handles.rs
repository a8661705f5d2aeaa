//! TCP sockets handed to a child.

use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::json;

use super::{num, run_pair};
use crate::harness::{node, rust, split_runtime, with_child, Ctx, MetricSpec, Sample, Scenario, VariantSpec};

pub struct Handles;

impl Scenario for Handles {
    fn name(&self) -> String {
        "handles".into()
    }
    fn about(&self) -> String {
        "connected TCP sockets (made beforehand on 127.0.0.1) sent one per message to a child that \
         acknowledges and closes each; handles/s at the receiver, first to last"
            .into()
    }
    fn variants(&self) -> Vec<VariantSpec> {
        vec![
            rust("handoff-w1"),
            rust("handoff-w64"),
            rust("handoff-w64-mt"),
            node("rust→node"),
            node("rust→node-w64"),
            node("node→rust"),
            node("node-socket"),
            node("node-native"),
            rust("bare-ack"),
            rust("bare-pipelined"),
        ]
    }
    fn metrics(&self) -> Vec<MetricSpec> {
        vec![MetricSpec::new("rate", "handles (handles/s)")
            .ratio("w1/node-socket", "handoff-w1", "node-socket")
            .ratio("w1/node-native", "handoff-w1", "node-native")
            .ratio("w1/bare-ack", "handoff-w1", "bare-ack")
            .ratio("rust→node-w64/node-socket", "rust→node-w64", "node-socket")
            .ratio("w64/bare-pipelined", "handoff-w64", "bare-pipelined")
            .ratio("w64-mt/bare-pipelined", "handoff-w64-mt", "bare-pipelined")]
    }
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample> {
        let count = ctx.handles_count.to_string();
        let n = count.as_str();
        let send = |imp: &str, extra: &[&str]| {
            let mut args = vec!["handles-send", "--impl", imp, "--count", n];
            args.extend(extra);
            ctx.role(&args)
        };
        let rust_recv = |window: &str| {
            ctx.role(&["handles-recv", "--impl", "handoff", "--count", n, "--window", window])
        };
        let node_send = |mode: &str| ctx.node_script("handles.js", &["send", "--count", n, "--mode", mode]);
        let node_recv = || ctx.node_script("handles.js", &["recv", "--count", n]);
        let bare_recv = || ctx.role(&["handles-recv", "--impl", "bare", "--count", n]);
        let (base, env) = split_runtime(variant);
        let argv = match base {
            "handoff-w1" => with_child(send("handoff", &["--window", "1"]), rust_recv("1")),
            "handoff-w64" => with_child(send("handoff", &["--window", "64"]), rust_recv("64")),
            "rust→node" => with_child(send("handoff", &["--window", "1"]), node_recv()),
            // Node acknowledges pipelined handles one by one (protocol doc §4.2): the same ACK
            // protocol, without waiting for each ACK before the next write.
            "rust→node-w64" => with_child(send("handoff", &["--window", "64"]), node_recv()),
            "node→rust" => with_child(node_send("socket"), rust_recv("1")),
            "node-socket" => with_child(node_send("socket"), node_recv()),
            "node-native" => with_child(node_send("native"), node_recv()),
            "bare-ack" => with_child(send("bare", &[]), bare_recv()),
            "bare-pipelined" => with_child(send("bare", &["--pipelined"]), bare_recv()),
            other => bail!("unknown variant {other}"),
        };
        let raw = run_pair(&format!("handles/{variant}"), &argv, &env, None, "handles-recv", Duration::from_secs(120))?;
        let (got, secs) = (num(&raw, "count")?, num(&raw, "secs")?);
        if got as usize != ctx.handles_count || secs <= 0.0 {
            bail!("the child received {got} of {} handles: {raw}", ctx.handles_count);
        }
        if num(&raw, "errors")? > 0.0 {
            bail!("the receiver reported errors: {raw}");
        }
        let mut sample = Sample { raw: json!({ "recv": raw }), ..Sample::default() };
        sample.set("rate", (got - 1.0) / secs).set("count", got).set("secs", secs);
        Ok(sample)
    }
}
