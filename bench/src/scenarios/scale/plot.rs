//! The scale plots (SVG, through `plotters`).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::Value;

use super::SweepRow;

const HANDOFF: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const BARE: RGBColor = RGBColor(0x55, 0x55, 0x55);
const KILL: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const RELOAD: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);

fn create_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Upper end of an axis showing `values` (and 0).
fn top(values: impl Iterator<Item = f64>) -> f64 {
    let max = values.filter(|v| v.is_finite()).fold(0.0, f64::max);
    if max > 0.0 {
        max * 1.15
    } else {
        1.0
    }
}

/// `scale-workers.svg`: conn/s and primary CPU per connection against the worker count (log 2
/// axis), handoff and bare; on the CPU panel, the ±`band` corridor around handoff's median.
pub fn workers(path: &Path, rows: &[SweepRow], handoff_median: Option<f64>, band: f64) -> Result<()> {
    create_dir(path)?;
    let root = SVGBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled("cluster round-robin, Rust workers: cost by worker count", ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(550);
    let x = |n: usize| (n as f64).log2();
    let x_max = rows.iter().map(|r| x(r.0)).fold(0.0, f64::max) + 0.3;
    let x_label = |v: &f64| if v.fract() == 0.0 && *v >= 0.0 { format!("{}", 2f64.powf(*v)) } else { String::new() };

    type Pick = fn(&SweepRow) -> (Option<f64>, Option<f64>);
    let panels: [(&DrawingArea<SVGBackend, plotters::coord::Shift>, &str, &str, Pick); 2] = [
        (&left, "connections per second", "conn/s", |r| (r.1, r.2)),
        (&right, "primary CPU per connection", "µs/conn", |r| (r.3, r.4)),
    ];
    for (i, (area, caption, unit, pick)) in panels.into_iter().enumerate() {
        let y_max = top(rows.iter().flat_map(|r| {
            let (h, b) = pick(r);
            [h, b]
        }).flatten());
        let y_max = if i == 1 { y_max.max(handoff_median.map_or(0.0, |m| m * (1.0 + band) * 1.15)) } else { y_max };
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.3f64..x_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_labels(rows.len().max(2))
            .x_label_formatter(&x_label)
            .x_desc("workers")
            .y_desc(unit)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE)
            .draw()?;
        for (name, color, handoff) in [("handoff", HANDOFF, true), ("bare", BARE, false)] {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| {
                    let (h, b) = pick(r);
                    Some((x(r.0), if handoff { h? } else { b? }))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        if let (1, Some(mid)) = (i, handoff_median) {
            for (k, factor) in [1.0 - band, 1.0 + band].into_iter().enumerate() {
                let line = DashedLineSeries::new([(-0.3, mid * factor), (x_max, mid * factor)], 6, 4, HANDOFF.mix(0.6).into());
                let drawn = chart.draw_series(line)?;
                if k == 0 {
                    drawn.label(format!("handoff median ±{:.0}%", band * 100.0)).legend(|(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], HANDOFF.mix(0.6))
                    });
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// `soak.svg`: the primary's descriptors and RSS against connections served, with the kills and
/// reloads marked.
pub fn soak(path: &Path, series: &[Value], events: &[Value]) -> Result<()> {
    create_dir(path)?;
    let points: Vec<(f64, f64, f64)> = series
        .iter()
        .filter_map(|p| Some((p["connections"].as_f64()?, p["fds"].as_f64()?, p["rss_kib"].as_f64()? / 1024.0)))
        .collect();
    let marks: Vec<(f64, RGBColor)> = events
        .iter()
        .filter_map(|e| {
            let color = match e["kind"].as_str()? {
                "kill" => KILL,
                "reload" => RELOAD,
                _ => return None,
            };
            Some((e["connections"].as_f64()?, color))
        })
        .collect();
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "soak: the primary's descriptors and RSS (red: a worker SIGKILLed, green: rolling reload)",
        ("sans-serif", 20),
    )?;
    let (upper, lower) = root.split_vertically(300);
    type Pick = fn(&(f64, f64, f64)) -> f64;
    let panels: [(&DrawingArea<SVGBackend, plotters::coord::Shift>, &str, &str, Pick); 2] = [
        (&upper, "open descriptors (/proc/PID/fd; under load, connections in flight too)", "fds", |p| p.1),
        (&lower, "resident memory", "RSS (MiB)", |p| p.2),
    ];
    for (area, caption, unit, pick) in panels {
        let y_max = top(points.iter().map(pick));
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("connections served")
            .y_desc(unit)
            .x_label_formatter(&|v| format!("{}k", v / 1000.0))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE)
            .draw()?;
        for &(at, color) in &marks {
            chart.draw_series(LineSeries::new([(at, 0.0), (at, y_max)], color.mix(0.5)))?;
        }
        chart.draw_series(LineSeries::new(points.iter().map(|p| (p.0, pick(p))), HANDOFF.stroke_width(2)))?;
        chart.draw_series(points.iter().map(|p| Circle::new((p.0, pick(p)), 3, HANDOFF.filled())))?;
    }
    root.present()?;
    Ok(())
}
