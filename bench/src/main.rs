//! `handoff-bench`: handoff against Node.js and a bare-syscall reference, on the same machine, in
//! one run. See BENCHMARKS.md.
//!
//! ```text
//! cargo run --release -p handoff-bench                 # everything, ~7 minutes on 2 cores
//! cargo run --release -p handoff-bench -- --quick      # ~1 minute smoke run
//! cargo run --release -p handoff-bench -- --only msg-64B,seed --runs 5
//! cargo run --release -p handoff-bench -- --list
//! ```
//!
//! The same binary plays every role; the orchestrator starts them as child processes
//! (`handoff-bench role NAME ...`, hidden), directly or through `bench/node/*.js`.

mod bare;
mod harness;
mod payload;
mod procs;
mod roles;
mod scenarios;
mod spin;
mod targets;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use harness::{Ctx, Results};

#[derive(Debug, Parser)]
#[command(
    name = "handoff-bench",
    about = "Benchmarks handoff against Node.js and a bare-syscall reference (loopback only)",
    after_help = "Scenarios: run with --list. Results: one line per metric on stdout, progress on \
                  stderr, every sample in the JSON file."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// A short smoke run (about a minute): 1 run, shorter timings, fewer connections.
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (comma-separated; `msg` selects every `msg-*`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these variants (comma-separated ids, e.g. `handoff-rr,bare-each`); others print n/a.
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Runs per variant; medians are reported (default 3, 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Where to write the JSON results.
    #[arg(long)]
    json: Option<PathBuf>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Seconds each one-way message run sends (default 0.5, 0.2 with --quick).
    #[arg(long)]
    msg_secs: Option<f64>,
    /// Seconds of load per seed run (default 3, 1 with --quick).
    #[arg(long)]
    seed_secs: Option<f64>,
    /// Load generator concurrency (default 32).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Connections in the memory run (default 100000, 10000 with --quick).
    #[arg(long)]
    memory_connections: Option<u64>,
    /// Handles per handles run (default 8000, 2000 with --quick; capped by the fd limit).
    #[arg(long)]
    handles: Option<usize>,
    /// Do not pin the round-trip processes to one CPU.
    #[arg(long)]
    rtt_unpinned: bool,
    /// Measured round trips per run (default 10000, 2000 with --quick).
    #[arg(long)]
    rtt_count: Option<usize>,
    /// Connections held open in the scale-keepalive run (default 10000, 2000 with --quick;
    /// capped by the fd limit).
    #[arg(long)]
    keepalive_connections: Option<usize>,
    /// Connections in the scale-soak run (default 100000, 20000 with --quick).
    #[arg(long)]
    soak_connections: Option<u64>,
    /// Where the scale plots go (default bench/plots; with --quick, `plots` beside the JSON file).
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Keep every allowed CPU busy with a SCHED_IDLE busy loop for the whole run, so that no
    /// core sleeps in deep idle (see BENCHMARKS.md, spinner mode).
    #[arg(long)]
    spin: bool,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// A worker process (started by the orchestrator or by bench/node scripts).
    #[command(hide = true)]
    Role {
        #[command(subcommand)]
        role: roles::Role,
    },
}

fn main() -> ExitCode {
    let nofile = procs::raise_nofile_limit();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Sub::Role { role }) => roles::run(role).map(|()| ExitCode::SUCCESS),
        None => orchestrate(cli, nofile),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("handoff-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn orchestrate(cli: Cli, nofile: u64) -> Result<ExitCode> {
    let all = scenarios::registry();
    if cli.list {
        for s in &all {
            println!("{:<12} {}", s.name(), s.about());
            let ids: Vec<&str> = s.variants().iter().map(|v| v.id).collect();
            println!("{:<12} variants: {}", "", ids.join(", "));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let selected: Vec<_> = all
        .into_iter()
        .filter(|s| {
            let name = s.name();
            cli.only.is_empty()
                || cli.only.iter().any(|o| name == *o || name.starts_with(&format!("{o}-")))
        })
        .collect();
    if selected.is_empty() {
        bail!("--only {:?} matches no scenario (see --list)", cli.only);
    }

    let node = procs::find_node();
    if node.is_none() {
        if std::env::var_os("CI").is_some() {
            bail!("node is not on PATH and CI is set: the Node columns are required in CI");
        }
        eprintln!("warning: node not found on PATH; the Node columns will read n/a");
    }
    let quick = cli.quick;
    // The handles pool holds two descriptors per connection in the sending process.
    let handles_wanted = cli.handles.unwrap_or(if quick { 2000 } else { 8000 });
    let handles_cap = (nofile.saturating_sub(512) / 2).max(16) as usize;
    if handles_wanted > handles_cap {
        eprintln!(
            "note: descriptor limit {nofile}: handles per run lowered from {handles_wanted} to {handles_cap}"
        );
    }
    let ctx = Ctx {
        exe: std::env::current_exe().context("locating this binary")?,
        node,
        node_dir: std::env::var_os("HANDOFF_BENCH_NODE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node")),
        quick,
        variants: cli.variants.clone(),
        runs: cli.runs.unwrap_or(if quick { 1 } else { 3 }),
        msg_secs: cli.msg_secs.unwrap_or(if quick { 0.2 } else { 0.5 }),
        rtt_count: cli.rtt_count.unwrap_or(if quick { 2000 } else { 10_000 }),
        rtt_warmup: if quick { 200 } else { 1000 },
        rtt_pin: if cli.rtt_unpinned {
            None
        } else {
            Some(procs::last_allowed_cpu())
        },
        handles_count: handles_wanted.min(handles_cap),
        seed_secs: cli.seed_secs.unwrap_or(if quick { 1.0 } else { 3.0 }),
        seed_warmup: if quick { 200 } else { 1000 },
        concurrency: cli.concurrency,
        memory_connections: cli.memory_connections.unwrap_or(if quick { 10_000 } else { 100_000 }),
        keepalive_connections: cli
            .keepalive_connections
            .unwrap_or(if quick { 2000 } else { 10_000 })
            .min(nofile.saturating_sub(512) as usize),
        soak_connections: cli.soak_connections.unwrap_or(if quick { 20_000 } else { 100_000 }),
    };
    let json_path = cli.json.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("bench-results").join("latest.json")
    });
    // A smoke run does not overwrite the committed plots.
    let plots_dir = cli.plots.clone().unwrap_or_else(|| match (quick, json_path.parent()) {
        (true, Some(dir)) => dir.join("plots"),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plots"),
    });

    let machine = procs::machine_info(ctx.node.as_deref());
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    eprintln!(
        "handoff-bench: {} CPUs ({}), {} GiB, kernel {}, {}, node {}; {profile} build; runs={} \
         msg={}s seed={}s x{} handles={} rtt={} memory={} conns; spin={}",
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["rustc"].as_str().unwrap_or("rustc ?"),
        machine["node"].as_str().unwrap_or("n/a"),
        ctx.runs,
        ctx.msg_secs,
        ctx.seed_secs,
        ctx.concurrency,
        ctx.handles_count,
        ctx.rtt_count,
        ctx.memory_connections,
        cli.spin,
    );
    if cfg!(debug_assertions) && !quick {
        eprintln!("warning: a debug build; run with --release for real figures");
    }

    // Threads of this process, stopped when `_spinners` drops (and gone with the process anyway).
    let _spinners = if cli.spin {
        let spinners = spin::Spinners::start().context("--spin")?;
        eprintln!("spinning at SCHED_IDLE on CPUs {:?}", spinners.cpus());
        Some(spinners)
    } else {
        None
    };
    let started = Instant::now();
    let mut results = Results::default();
    for scenario in &selected {
        eprintln!("{}: {}", scenario.name(), scenario.about());
        let result = harness::run_scenario(&ctx, scenario.as_ref());
        result.print_lines(&mut std::io::stderr());
        results.scenarios.push(result);
    }
    let elapsed = started.elapsed().as_secs_f64();

    // The report: one line per metric, then the checks.
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(
        out,
        "handoff-bench ({profile}, {} CPUs {}, node {}, runs={}, spin={}, medians; * = some runs failed)",
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["node"].as_str().unwrap_or("n/a"),
        ctx.runs,
        cli.spin
    )?;
    for result in &results.scenarios {
        result.print_lines(&mut out);
    }
    scenarios::scale::report(&results, &plots_dir, &mut out)?;
    let linearity = targets::linearity(&results);
    if let Some((line, _)) = &linearity {
        writeln!(out, "{line}")?;
    }
    writeln!(out)?;
    writeln!(out, "targets (same run):")?;
    let checks = targets::check_all(&results);
    for (name, status, detail) in &checks {
        writeln!(out, "  {:<4}  {:<56} {}", status.as_str(), name, detail)?;
    }
    writeln!(out, "total {elapsed:.0} s")?;

    let report = json!({
        "version": 1,
        "profile": profile,
        "machine": machine,
        "config": {
            "quick": ctx.quick,
            "runs": ctx.runs,
            "msg_secs": ctx.msg_secs,
            "rtt_count": ctx.rtt_count,
            "rtt_warmup": ctx.rtt_warmup,
            "rtt_pinned_cpu": ctx.rtt_pin,
            "handles_count": ctx.handles_count,
            "seed_secs": ctx.seed_secs,
            "seed_warmup": ctx.seed_warmup,
            "concurrency": ctx.concurrency,
            "memory_connections": ctx.memory_connections,
            "keepalive_connections": ctx.keepalive_connections,
            "soak_connections": ctx.soak_connections,
            "runtime": std::env::var("HANDOFF_BENCH_RT").unwrap_or_else(|_| "current".into()),
            "nofile": nofile,
            "spin": cli.spin,
        },
        "elapsed_secs": elapsed,
        "scenarios": results.scenarios.iter().map(|s| s.to_json()).collect::<Vec<_>>(),
        "linearity": linearity.map(|(_, v)| v),
        "targets": checks.iter().map(|(name, status, detail)| json!({
            "name": name, "status": status.as_str(), "detail": detail,
        })).collect::<Vec<_>>(),
    });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    writeln!(out, "results written to {}", json_path.display())?;
    Ok(ExitCode::SUCCESS)
}
