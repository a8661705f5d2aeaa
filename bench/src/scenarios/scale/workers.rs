//! `scale-workers`: the round-robin cluster with 1, 2, 4, 8 and 16 Rust workers, handoff's primary
//! and the bare one in the same run.


use anyhow::{bail, Context, Result};

use super::super::cluster::measured_load;
use crate::harness::{rust, with_child, Ctx, MetricSpec, Sample, Scenario, VariantSpec};

/// Worker counts of the sweep.
pub const COUNTS: [usize; 5] = [1, 2, 4, 8, 16];

/// Variant ids, handoff and bare side by side for each count (so that the two of a pair run
/// next to each other in time), and the handoff/bare ratio of each count.
const VARIANTS: [&str; 10] =
    ["handoff-1", "bare-1", "handoff-2", "bare-2", "handoff-4", "bare-4", "handoff-8", "bare-8", "handoff-16", "bare-16"];
const RATIOS: [(&str, &str, &str); 5] = [
    ("h/b@1", "handoff-1", "bare-1"),
    ("h/b@2", "handoff-2", "bare-2"),
    ("h/b@4", "handoff-4", "bare-4"),
    ("h/b@8", "handoff-8", "bare-8"),
    ("h/b@16", "handoff-16", "bare-16"),
];

/// The variant id of `imp` (`handoff` or `bare`) with `workers` workers.
pub fn variant(imp: &str, workers: usize) -> Option<&'static str> {
    let id = format!("{imp}-{workers}");
    VARIANTS.iter().copied().find(|&v| v == id)
}

pub struct Workers;

impl Scenario for Workers {
    fn name(&self) -> String {
        "scale-workers".into()
    }
    fn about(&self) -> String {
        format!(
            "cluster round-robin with {COUNTS:?} Rust workers answering `Child handled it.`: \
             handoff = handoff's primary, bare = the bare primary (poll/accept/sendmsg, one ack \
             byte per connection); the seed's load generator; primary CPU from /proc; flat = every \
             handoff point within ±20% of their median"
        )
    }
    fn variants(&self) -> Vec<VariantSpec> {
        VARIANTS.iter().map(|&v| rust(v)).collect()
    }
    fn metrics(&self) -> Vec<MetricSpec> {
        let with_ratios = |mut m: MetricSpec| {
            for (label, num, den) in RATIOS {
                m = m.ratio(label, num, den);
            }
            m
        };
        vec![
            with_ratios(MetricSpec::new("conn_per_s", "scale-workers (conn/s)")),
            with_ratios(MetricSpec::new("primary_cpu_us_per_conn", "scale-workers primary CPU (µs/conn)").lower_is_better()),
            MetricSpec::new("cpu_us_per_conn", "scale-workers all CPU (µs/conn)").lower_is_better(),
            MetricSpec::new("p99_us", "scale-workers latency p99 (µs)").lower_is_better(),
            MetricSpec::new("errors", "scale-workers errors (count)").lower_is_better(),
        ]
    }
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample> {
        let Some((imp, workers)) = variant.rsplit_once('-') else { bail!("unknown variant {variant}") };
        let count: usize = workers.parse().with_context(|| format!("unknown variant {variant}"))?;
        let argv = with_child(
            ctx.role(&["cluster-primary", "--impl", imp, "--schedule", "rr", "--workers", workers]),
            ctx.role(&["cluster-worker", "--impl", imp]),
        );
        let mut sample = measured_load(ctx, &format!("scale-workers/{variant}"), &argv, count)?;
        sample.set("workers", count as f64);
        Ok(sample)
    }
}
