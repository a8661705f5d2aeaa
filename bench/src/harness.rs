//! The scenario framework: what a scenario declares ([`Scenario`]), how it is run (every variant,
//! `runs` times, interleaved), and how results are reduced (medians), printed (one line per
//! metric, with ratios) and saved (JSON with every raw sample).
//!
//! Adding a row: write a struct implementing [`Scenario`] (its variants, its metrics, and `run`,
//! which measures one variant once and returns a [`Sample`]), and add it to
//! [`crate::scenarios::registry`]. A target check, if any, goes in [`crate::targets::TARGETS`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Value};

/// Settings every scenario reads.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// This binary (every Rust role is `exe role NAME ...`).
    pub exe: PathBuf,
    /// `node`, if found.
    pub node: Option<PathBuf>,
    /// `bench/node`.
    pub node_dir: PathBuf,
    pub quick: bool,
    /// `--variants`: when not empty, only these variant ids run.
    pub variants: Vec<String>,
    pub runs: usize,
    /// How long each one-way message run sends.
    pub msg_secs: f64,
    /// Measured round trips per run, and unmeasured ones before.
    pub rtt_count: usize,
    pub rtt_warmup: usize,
    /// The CPU both round-trip processes are pinned to (`None`: `--rtt-unpinned`). Unpinned, a
    /// ping-pong on a 2-vCPU VM flips between ~9 µs (same CPU) and ~40 µs (cross-CPU wake-ups)
    /// from run to run.
    pub rtt_pin: Option<usize>,
    /// Handles per run (bounded by the descriptor limit).
    pub handles_count: usize,
    /// Seed pipeline: load duration, and connections made before it to warm up.
    pub seed_secs: f64,
    pub seed_warmup: u64,
    pub concurrency: usize,
    /// Connections in the memory run.
    pub memory_connections: u64,
    /// Scale: connections held open in the keep-alive run, and made in the soak.
    pub keepalive_connections: usize,
    pub soak_connections: u64,
}

impl Ctx {
    /// `exe role ARGS...`
    pub fn role(&self, args: &[&str]) -> Vec<String> {
        let mut argv = vec![self.exe.to_string_lossy().into_owned(), "role".to_owned()];
        argv.extend(args.iter().map(|s| s.to_string()));
        argv
    }

    /// `node bench/node/SCRIPT ARGS...`
    pub fn node_script(&self, script: &str, args: &[&str]) -> Vec<String> {
        let node = self.node.as_ref().map_or("node".into(), |n| n.to_string_lossy().into_owned());
        let mut argv = vec![node, self.node_dir.join(script).to_string_lossy().into_owned()];
        argv.extend(args.iter().map(|s| s.to_string()));
        argv
    }
}

/// handoff's processes run on a current-thread tokio runtime, as the README advises and the
/// examples do. A variant id ending in `-mt` runs the same processes as the id without it on the
/// multi-thread runtime (`#[tokio::main]`'s default; `HANDOFF_BENCH_RT=multi`). Returns the base
/// id and the environment to add.
pub fn split_runtime(variant: &str) -> (&str, Vec<(&'static str, String)>) {
    if let Some(base) = variant.strip_suffix("-mt") {
        return (base, vec![("HANDOFF_BENCH_RT", "multi".to_owned())]);
    }
    // glibc hands every allocation of 32 MiB or more back to the OS on free (its dynamic mmap
    // threshold stops at 32 MiB), so each such message is faulted in page by page again. This
    // variant raises the threshold, to show that cost is the allocator's, not the protocol's.
    if let Some(base) = variant.strip_suffix("-bigheap") {
        return (
            base,
            vec![
                ("MALLOC_MMAP_THRESHOLD_", (256usize << 20).to_string()),
                ("MALLOC_TRIM_THRESHOLD_", (512usize << 20).to_string()),
            ],
        );
    }
    (variant, Vec::new())
}

/// `parent ... -- child ...`
pub fn with_child(mut parent: Vec<String>, child: Vec<String>) -> Vec<String> {
    parent.push("--".into());
    parent.extend(child);
    parent
}

/// One variant of a scenario: a column of its lines.
#[derive(Debug, Clone)]
pub struct VariantSpec {
    pub id: &'static str,
    /// Skipped (printed `n/a`) when node is missing.
    pub needs_node: bool,
}

/// Shorthand for a variant that runs without node.
pub fn rust(id: &'static str) -> VariantSpec {
    VariantSpec { id, needs_node: false }
}

/// Shorthand for a variant that needs node.
pub fn node(id: &'static str) -> VariantSpec {
    VariantSpec { id, needs_node: true }
}

/// A ratio printed after a metric line: `label=num/den`.
#[derive(Debug, Clone)]
pub struct Ratio {
    pub label: &'static str,
    pub num: &'static str,
    pub den: &'static str,
}

/// One printed line: a value every variant reports.
#[derive(Debug, Clone)]
pub struct MetricSpec {
    /// Key in each [`Sample`].
    pub key: &'static str,
    /// Line title, unit included: `msg 64B (msg/s)`.
    pub title: String,
    pub lower_is_better: bool,
    pub ratios: Vec<Ratio>,
}

impl MetricSpec {
    pub fn new(key: &'static str, title: impl Into<String>) -> MetricSpec {
        MetricSpec { key, title: title.into(), lower_is_better: false, ratios: Vec::new() }
    }
    pub fn lower_is_better(mut self) -> MetricSpec {
        self.lower_is_better = true;
        self
    }
    pub fn ratio(mut self, label: &'static str, num: &'static str, den: &'static str) -> MetricSpec {
        self.ratios.push(Ratio { label, num, den });
        self
    }
}

/// What one run of one variant measured.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Metric key to value.
    pub values: BTreeMap<String, f64>,
    /// Whatever the roles reported, kept in the JSON file.
    pub raw: Value,
}

impl Sample {
    pub fn set(&mut self, key: &str, value: f64) -> &mut Sample {
        self.values.insert(key.to_owned(), value);
        self
    }
}

/// A benchmark scenario: a group of lines sharing variants.
pub trait Scenario {
    /// Short name, used by `--only` (`msg-64B`; `--only msg` selects every `msg-*`).
    fn name(&self) -> String;
    /// One sentence: what is measured.
    fn about(&self) -> String;
    fn variants(&self) -> Vec<VariantSpec>;
    fn metrics(&self) -> Vec<MetricSpec>;
    /// How many times each variant runs (default `--runs`).
    fn runs(&self, ctx: &Ctx) -> usize {
        ctx.runs
    }
    /// Measures `variant` once. Must not leave processes behind (use [`crate::procs::Proc`]).
    fn run(&self, ctx: &Ctx, variant: &str) -> Result<Sample>;
}

/// Everything measured for one scenario.
#[derive(Debug)]
pub struct ScenarioResult {
    pub name: String,
    pub about: String,
    pub variants: Vec<VariantSpec>,
    pub metrics: Vec<MetricSpec>,
    pub samples: BTreeMap<&'static str, Vec<Sample>>,
    pub errors: BTreeMap<&'static str, Vec<String>>,
    /// Variants not run (node missing, or left out by `--variants`).
    pub skipped: Vec<&'static str>,
    pub secs: f64,
}

impl ScenarioResult {
    /// Median of `key` over the successful runs of `variant`.
    pub fn median(&self, variant: &str, key: &str) -> Option<f64> {
        let mut values: Vec<f64> = self
            .samples
            .get(variant)?
            .iter()
            .filter_map(|s| s.values.get(key).copied())
            .filter(|v| v.is_finite())
            .collect();
        median(&mut values)
    }

    /// The printed line of one metric.
    pub fn line(&self, metric: &MetricSpec) -> String {
        let mut line = format!("{:<30}", metric.title);
        for v in &self.variants {
            let value = if self.skipped.contains(&v.id) {
                "n/a".to_owned()
            } else {
                match self.median(v.id, metric.key) {
                    Some(x) => {
                        let partial = self.errors.get(v.id).is_some_and(|e| !e.is_empty());
                        format!("{}{}", format_number(x), if partial { "*" } else { "" })
                    }
                    None => "ERR".to_owned(),
                }
            };
            line.push_str(&format!("  {}={}", v.id, value));
        }
        for r in &metric.ratios {
            let text = match (self.median(r.num, metric.key), self.median(r.den, metric.key)) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
                _ => "n/a".to_owned(),
            };
            line.push_str(&format!("  {}={}", r.label, text));
        }
        line
    }

    pub fn print_lines(&self, out: &mut dyn std::io::Write) {
        for metric in &self.metrics {
            let _ = writeln!(out, "{}", self.line(metric));
        }
        for (variant, errors) in &self.errors {
            let prefix = format!("{}/{}: ", self.name, variant);
            for e in errors {
                let e = e.strip_prefix(&prefix).unwrap_or(e);
                let _ = writeln!(out, "  error: {prefix}{}", e.replace('\n', "\n    "));
            }
        }
    }

    pub fn to_json(&self) -> Value {
        let mut variants = serde_json::Map::new();
        for v in &self.variants {
            let samples = self.samples.get(v.id).map(Vec::as_slice).unwrap_or_default();
            let medians: serde_json::Map<String, Value> = self
                .metrics
                .iter()
                .map(|m| (m.key.to_owned(), json!(self.median(v.id, m.key))))
                .collect();
            variants.insert(
                v.id.to_owned(),
                json!({
                    "skipped": self.skipped.contains(&v.id),
                    "median": medians,
                    "samples": samples.iter().map(|s| json!({"values": s.values, "raw": s.raw})).collect::<Vec<_>>(),
                    "errors": self.errors.get(v.id).cloned().unwrap_or_default(),
                }),
            );
        }
        let metrics: Vec<Value> = self
            .metrics
            .iter()
            .map(|m| {
                let ratios: serde_json::Map<String, Value> = m
                    .ratios
                    .iter()
                    .map(|r| {
                        let value = match (self.median(r.num, m.key), self.median(r.den, m.key)) {
                            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                            _ => None,
                        };
                        (r.label.to_owned(), json!({"num": r.num, "den": r.den, "value": value}))
                    })
                    .collect();
                json!({
                    "key": m.key,
                    "title": m.title,
                    "lower_is_better": m.lower_is_better,
                    "line": self.line(m),
                    "ratios": ratios,
                })
            })
            .collect();
        json!({
            "name": self.name,
            "about": self.about,
            "secs": self.secs,
            "metrics": metrics,
            "variants": variants,
        })
    }
}

/// All scenario results of a run.
#[derive(Debug, Default)]
pub struct Results {
    pub scenarios: Vec<ScenarioResult>,
}

impl Results {
    pub fn scenario(&self, name: &str) -> Option<&ScenarioResult> {
        self.scenarios.iter().find(|s| s.name == name)
    }
    /// Median of `key` for `variant` of scenario `name`.
    pub fn median(&self, name: &str, variant: &str, key: &str) -> Option<f64> {
        self.scenario(name)?.median(variant, key)
    }
}

/// Runs every variant of `scenario` `runs` times, interleaving variants so that drift in the
/// machine's state spreads over all of them.
pub fn run_scenario(ctx: &Ctx, scenario: &dyn Scenario) -> ScenarioResult {
    let started = Instant::now();
    let name = scenario.name();
    let variants = scenario.variants();
    let metrics = scenario.metrics();
    let runs = scenario.runs(ctx).max(1);
    let mut result = ScenarioResult {
        name: name.clone(),
        about: scenario.about(),
        variants: variants.clone(),
        metrics: metrics.clone(),
        samples: BTreeMap::new(),
        errors: BTreeMap::new(),
        skipped: Vec::new(),
        secs: 0.0,
    };
    for v in &variants {
        let excluded = !ctx.variants.is_empty() && !ctx.variants.iter().any(|x| x == v.id);
        if excluded || (v.needs_node && ctx.node.is_none()) {
            result.skipped.push(v.id);
        }
    }
    for run in 0..runs {
        for v in &variants {
            if result.skipped.contains(&v.id) {
                continue;
            }
            // Let the previous run's processes finish exiting before measuring again.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let t = Instant::now();
            eprint!("  [{name} {}/{runs}] {:<16}", run + 1, v.id);
            match scenario.run(ctx, v.id) {
                Ok(sample) => {
                    let first = metrics.first().and_then(|m| sample.values.get(m.key).map(|x| (m, x)));
                    match first {
                        Some((m, x)) => eprintln!(
                            " {} {} ({:.1}s)",
                            format_number(*x),
                            m.title.split('(').nth(1).unwrap_or("").trim_end_matches(')'),
                            t.elapsed().as_secs_f64()
                        ),
                        None => eprintln!(" ok ({:.1}s)", t.elapsed().as_secs_f64()),
                    }
                    result.samples.entry(v.id).or_default().push(sample);
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    eprintln!(" FAILED ({:.1}s): {}", t.elapsed().as_secs_f64(), text.replace('\n', "\n      "));
                    result.errors.entry(v.id).or_default().push(text);
                }
            }
        }
    }
    result.secs = started.elapsed().as_secs_f64();
    result
}

/// Median (mean of the middle two for an even count).
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

/// `43.1M`, `206k`, `15.2`, `0.61`.
pub fn format_number(x: f64) -> String {
    let a = x.abs();
    if a >= 1e7 {
        format!("{:.1}M", x / 1e6)
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e5 {
        format!("{:.0}k", x / 1e3)
    } else if a >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 100.0 {
        format!("{:.0}", x)
    } else if a >= 10.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.2}", x)
    }
}
