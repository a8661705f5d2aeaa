//! How the cluster's costs grow with the work (issue 10, "Scale"): worker count
//! ([`Workers`]), connections held open ([`Keepalive`]) and a long run with kills and reloads
//! ([`Soak`]). [`report`] prints their tables and draws their plots; [`workers_flat`] and
//! [`soak_ok`] are their targets.

mod keepalive;
mod plot;
mod soak;
mod workers;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

pub use keepalive::Keepalive;
pub use soak::Soak;
pub use workers::Workers;

use crate::harness::{format_number, median, Results};
use crate::targets::Status;

/// Open descriptors of a process (entries of `/proc/PID/fd`).
pub fn fd_count(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))?.count() as u64)
}

/// Lets a burst's last connections finish closing before an idle reading.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

/// Allowed distance of each point of the worker sweep from their median.
pub const FLAT_BAND: f64 = 0.2;

/// Medians of the sweep, one row per worker count measured:
/// (workers, handoff conn/s, bare conn/s, handoff primary µs/conn, bare primary µs/conn).
type SweepRow = (usize, Option<f64>, Option<f64>, Option<f64>, Option<f64>);

fn sweep(r: &Results) -> Option<Vec<SweepRow>> {
    let s = r.scenario("scale-workers")?;
    let rows: Vec<SweepRow> = workers::COUNTS
        .iter()
        .map(|&n| {
            let get = |imp: &str, key: &str| workers::variant(imp, n).and_then(|v| s.median(v, key));
            (
                n,
                get("handoff", "conn_per_s"),
                get("bare", "conn_per_s"),
                get("handoff", "primary_cpu_us_per_conn"),
                get("bare", "primary_cpu_us_per_conn"),
            )
        })
        .filter(|row| row.1.is_some() || row.2.is_some())
        .collect();
    (!rows.is_empty()).then_some(rows)
}

/// The handoff primary's CPU/conn at each worker count, and their median.
fn handoff_cpu(rows: &[SweepRow]) -> Option<(Vec<(usize, f64)>, f64)> {
    let points: Vec<(usize, f64)> = rows.iter().filter_map(|r| Some((r.0, r.3?))).collect();
    let mut values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let mid = median(&mut values)?;
    Some((points, mid))
}

/// Target: handoff's primary CPU per connection flat over the worker counts, each point within
/// ±[`FLAT_BAND`] of their median (every count measured).
pub fn workers_flat(r: &Results) -> (Status, String) {
    let Some((points, mid)) = sweep(r).as_deref().and_then(handoff_cpu) else {
        return (Status::NotMeasured, "scale-workers not measured".into());
    };
    if points.len() < workers::COUNTS.len() {
        return (Status::NotMeasured, format!("handoff measured at {} of {} worker counts", points.len(), workers::COUNTS.len()));
    }
    let worst = points.iter().map(|&(_, x)| x / mid - 1.0).fold(0.0f64, |a, d| if d.abs() > a.abs() { d } else { a });
    let listed: Vec<String> = points.iter().map(|(n, x)| format!("{n}:{x:.1}")).collect();
    (
        if worst.abs() <= FLAT_BAND { Status::Pass } else { Status::Miss },
        format!("µs/conn {} (median {mid:.1}, worst {:+.0}%; need within ±{:.0}%)", listed.join(" "), worst * 100.0, FLAT_BAND * 100.0),
    )
}

/// Target: the soak lost no connection but those a killed worker was serving (the Rust worker
/// serves one at a time, so at most one per kill: it answered `accepted`, so the primary closed
/// its copy, and it died before writing), and the primary's descriptors and RSS are flat.
pub fn soak_ok(r: &Results) -> (Status, String) {
    let Some(s) = r.scenario("scale-soak") else {
        return (Status::NotMeasured, "scale-soak not measured".into());
    };
    let get = |key: &str| s.median("handoff", key);
    let (Some(ok), Some(errors), Some(closed), Some(kills), Some(flat)) =
        (get("ok"), get("errors"), get("closed"), get("kills"), get("flat"))
    else {
        return (Status::NotMeasured, "scale-soak failed".into());
    };
    let (Some(f0), Some(f1), Some(r0), Some(r1)) =
        (get("fds_start"), get("fds_end"), get("rss_start_kib"), get("rss_end_kib"))
    else {
        return (Status::NotMeasured, "scale-soak failed".into());
    };
    let answered = errors == closed && closed <= kills;
    (
        if answered && flat >= 1.0 { Status::Pass } else { Status::Miss },
        format!(
            "{ok:.0} answered, {errors:.0} errors ({closed:.0} closed by a killed worker, {kills:.0} kills); \
             fds {f0:.0} -> {f1:.0}, RSS {r0:.0} -> {r1:.0} KiB (need no other error, at most 1 per kill, \
             fds ±{:.0}, RSS +{:.0} KiB)",
            soak::FLAT_FDS,
            soak::FLAT_RSS_KIB
        ),
    )
}

fn cell(x: Option<f64>) -> String {
    x.map_or("n/a".into(), format_number)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

/// The soak's sample (its only run), if it ran.
fn soak_raw(r: &Results) -> Option<&Value> {
    r.scenario("scale-soak")?.samples.get("handoff")?.first().map(|s| &s.raw)
}

/// Prints the worker table and the soak's time series, and draws `scale-workers.svg` and
/// `soak.svg` in `plots` for whichever of them ran. A plot that cannot be written is reported,
/// not fatal.
pub fn report(r: &Results, plots: &Path, out: &mut dyn Write) -> Result<()> {
    if let Some(rows) = sweep(r) {
        let cpu = handoff_cpu(&rows);
        writeln!(out)?;
        writeln!(out, "scale-workers (medians): conn/s and primary CPU per connection by worker count")?;
        writeln!(
            out,
            "  {:>7}  {:>10} {:>10} {:>6}  {:>13} {:>10} {:>6}  {:>11}",
            "workers", "handoff/s", "bare/s", "h/b", "handoff µs/c", "bare µs/c", "h/b", "h vs median"
        )?;
        for &(n, hc, bc, hu, bu) in &rows {
            let vs = match (hu, &cpu) {
                (Some(x), Some((_, mid))) => format!("{:+.0}%", (x / mid - 1.0) * 100.0),
                _ => "n/a".into(),
            };
            writeln!(
                out,
                "  {n:>7}  {:>10} {:>10} {:>6}  {:>13} {:>10} {:>6}  {vs:>11}",
                cell(hc),
                cell(bc),
                ratio(hc, bc),
                cell(hu),
                cell(bu),
                ratio(hu, bu)
            )?;
        }
        let path = plots.join("scale-workers.svg");
        match plot::workers(&path, &rows, cpu.map(|c| c.1), FLAT_BAND) {
            Ok(()) => writeln!(out, "  plot: {}", path.display())?,
            Err(e) => writeln!(out, "  plot: could not write {}: {e:#}", path.display())?,
        }
    }
    if let Some(raw) = soak_raw(r) {
        let empty = Vec::new();
        let series = raw["series"].as_array().unwrap_or(&empty);
        let events = raw["events"].as_array().unwrap_or(&empty);
        writeln!(out)?;
        writeln!(out, "scale-soak: the primary over the run (kills and reloads listed after)")?;
        writeln!(out, "  {:>11} {:>7} {:>5} {:>9}", "connections", "secs", "fds", "RSS KiB")?;
        for p in series {
            let int = |key: &str| p[key].as_u64().map_or("?".into(), |v| v.to_string());
            writeln!(
                out,
                "  {:>11} {:>7.2} {:>5} {:>9}  {}",
                int("connections"),
                p["secs"].as_f64().unwrap_or(f64::NAN),
                int("fds"),
                int("rss_kib"),
                p["what"].as_str().unwrap_or("")
            )?;
        }
        for e in events {
            let at = e["connections"].as_u64().map_or(String::new(), |c| format!(" at {c} connections"));
            let extra = match e["kind"].as_str() {
                Some("worker back") => format!(
                    " ({:.3} s after the kill; {} connections it had not taken went to the other worker)",
                    e["after_kill_secs"].as_f64().unwrap_or(f64::NAN),
                    e["redispatched"]
                ),
                Some("reload done") => match e["result"].get("failed") {
                    Some(why) => format!(" FAILED: {why}"),
                    None => format!(" (generation {}, {:.3} s)", e["result"]["generation"], e["took_secs"].as_f64().unwrap_or(f64::NAN)),
                },
                Some("kill") => format!(" (pid {})", e["pid"]),
                _ => String::new(),
            };
            writeln!(
                out,
                "  {:>7.2} s  {}{at}{extra}",
                e["secs"].as_f64().unwrap_or(f64::NAN),
                e["kind"].as_str().unwrap_or("?")
            )?;
        }
        let path = plots.join("soak.svg");
        match plot::soak(&path, series, events) {
            Ok(()) => writeln!(out, "  plot: {}", path.display())?,
            Err(e) => writeln!(out, "  plot: could not write {}: {e:#}", path.display())?,
        }
    }
    Ok(())
}
