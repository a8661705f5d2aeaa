//! The targets, checked against medians of the same run. Add a target: one entry in
//! [`TARGETS`].

use serde_json::{json, Value};

use crate::harness::Results;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Miss,
    /// Not measured in this run (scenario not selected, variant failed, node missing).
    NotMeasured,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Miss => "MISS",
            Status::NotMeasured => "n/a",
        }
    }
}

pub struct Target {
    pub name: &'static str,
    pub check: fn(&Results) -> (Status, String),
}

/// `num/den` of one metric in one scenario, against `bound` (at least, or at most).
fn ratio(
    r: &Results,
    scenario: &str,
    key: &str,
    num: &str,
    den: &str,
    bound: f64,
    at_least: bool,
) -> (Status, String) {
    match (r.median(scenario, num, key), r.median(scenario, den, key)) {
        (Some(a), Some(b)) if b > 0.0 => {
            let x = a / b;
            let pass = if at_least { x >= bound } else { x <= bound };
            let op = if at_least { ">=" } else { "<=" };
            (
                if pass { Status::Pass } else { Status::Miss },
                format!("{num}/{den} = {x:.2}x (need {op} {bound}x; {a:.4} vs {b:.4})"),
            )
        }
        _ => (Status::NotMeasured, format!("{scenario}: {num} or {den} not measured")),
    }
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "seed pipeline conn/s >= 3x Node (parent+child)",
        check: |r| ratio(r, "seed", "conn_per_s", "handoff", "node", 3.0, true),
    },
    Target {
        name: "seed pipeline CPU/conn <= 1.5x bare with ack",
        check: |r| ratio(r, "seed", "cpu_us_per_conn", "handoff-direct", "bare-ack", 1.5, false),
    },
    Target {
        name: "seed pipeline conn/s >= 0.8x bare with ack",
        check: |r| ratio(r, "seed", "conn_per_s", "handoff-direct", "bare-ack", 0.8, true),
    },
    Target {
        name: "messages 64 B msg/s >= 15x Node",
        check: |r| ratio(r, "msg-64B", "rate", "handoff-rr", "node", 15.0, true),
    },
    Target {
        name: "messages 64 KiB MB/s >= 8x Node",
        check: |r| ratio(r, "msg-64KiB", "rate", "handoff-rr", "node", 8.0, true),
    },
    Target {
        name: "large messages: 32 MiB MB/s >= 0.6x 1 MiB MB/s",
        check: |r| match (r.median("msg-32MiB", "handoff-rr", "rate"), r.median("msg-1MiB", "handoff-rr", "rate")) {
            (Some(big), Some(small)) if small > 0.0 => {
                let x = big / small;
                (
                    if x >= 0.6 { Status::Pass } else { Status::Miss },
                    format!("handoff-rr 32MiB/1MiB = {x:.2} ({big:.0} vs {small:.0} MB/s)"),
                )
            }
            _ => (Status::NotMeasured, "msg-1MiB or msg-32MiB not measured".into()),
        },
    },
    Target {
        name: "round trip p50 <= 1.3x bare",
        check: |r| ratio(r, "rtt", "p50_us", "handoff-rr", "bare", 1.3, false),
    },
    Target {
        name: "round trip p99 <= 1.5x bare",
        check: |r| ratio(r, "rtt", "p99_us", "handoff-rr", "bare", 1.5, false),
    },
    Target {
        name: "handles, window 1 (Node-compatible) >= 0.9x bare ack-per-fd",
        check: |r| ratio(r, "handles", "rate", "handoff-w1", "bare-ack", 0.9, true),
    },
    Target {
        name: "handles (Node-compatible ack) >= 3x Node net.Socket",
        check: |r| ratio(r, "handles", "rate", "handoff-w1", "node-socket", 3.0, true),
    },
    Target {
        name: "handles pipelined (both handoff) >= 0.9x bare pipelined",
        check: |r| ratio(r, "handles", "rate", "handoff-w64", "bare-pipelined", 0.9, true),
    },
    Target {
        name: "cluster rr: Node workers, handoff primary conn/s >= 1.5x Node's cluster",
        check: |r| ratio(r, "cluster-rr", "conn_per_s", "handoff+node", "node", 1.5, true),
    },
    Target {
        name: "cluster rr: primary CPU/conn <= 1.5x bare with ack (Rust workers)",
        check: |r| ratio(r, "cluster-rr", "primary_cpu_us_per_conn", "handoff", "bare", 1.5, false),
    },
    Target {
        name: "cluster rr: primary CPU/conn <= 1.5x bare with ack (Node workers)",
        check: |r| ratio(r, "cluster-rr", "primary_cpu_us_per_conn", "handoff+node", "bare", 1.5, false),
    },
    Target {
        name: "cluster rr: conn/s >= 0.8x bare (Rust workers)",
        check: |r| ratio(r, "cluster-rr", "conn_per_s", "handoff", "bare", 0.8, true),
    },
    Target {
        name: "cluster shared: conn/s >= 0.95x bare shared accept (Rust workers)",
        check: |r| ratio(r, "cluster-shared", "conn_per_s", "handoff", "bare", 0.95, true),
    },
    Target {
        name: "cluster shared: Node workers, handoff primary conn/s >= Node's cluster",
        check: |r| ratio(r, "cluster-shared", "conn_per_s", "handoff+node", "node", 1.0, true),
    },
    Target {
        name: "memory: parent RSS flat over the long seed run",
        check: |r| {
            let Some(m) = r.scenario("memory") else {
                return (Status::NotMeasured, "memory not measured".into());
            };
            match (m.median("handoff", "flat"), m.median("handoff", "rss_start_kib"), m.median("handoff", "rss_max_kib"), m.median("handoff", "rss_end_kib")) {
                (Some(flat), Some(start), Some(max), Some(end)) => (
                    if flat >= 1.0 { Status::Pass } else { Status::Miss },
                    format!("start {start:.0} KiB, max {max:.0} KiB, end {end:.0} KiB (need max <= start + 10240)"),
                ),
                _ => (Status::NotMeasured, "memory run failed".into()),
            }
        },
    },
    Target {
        name: "scale: primary CPU/conn flat over 1-16 workers (±20%)",
        check: crate::scenarios::scale::workers_flat,
    },
    Target {
        name: "scale soak: every connection answered, fds and RSS flat",
        check: crate::scenarios::scale::soak_ok,
    },
];

/// Per-variant 32 MiB / 1 MiB throughput: below 0.5 suggests a cost growing faster than size.
pub fn linearity(r: &Results) -> Option<(String, Value)> {
    let big = r.scenario("msg-32MiB")?;
    r.scenario("msg-1MiB")?;
    let mut line = format!("{:<30}", "linearity 32MiB/1MiB MB/s");
    let mut json = serde_json::Map::new();
    for v in &big.variants {
        let text = match (r.median("msg-32MiB", v.id, "rate"), r.median("msg-1MiB", v.id, "rate")) {
            (Some(a), Some(b)) if b > 0.0 => {
                let x = a / b;
                json.insert(v.id.into(), json!(x));
                format!("{x:.2}{}", if x < 0.5 { " QUADRATIC?" } else { "" })
            }
            _ => "n/a".into(),
        };
        line.push_str(&format!("  {}={}", v.id, text));
    }
    Some((line, Value::Object(json)))
}

/// Runs every check.
pub fn check_all(r: &Results) -> Vec<(&'static str, Status, String)> {
    TARGETS.iter().map(|t| {
        let (status, detail) = (t.check)(r);
        (t.name, status, detail)
    }).collect()
}
