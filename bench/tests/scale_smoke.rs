//! Keeps the scale scenarios from rotting: a very short pass of each through the real binary
//! (two points of the worker sweep, a few hundred held connections, a small soak with its kills
//! and reloads), checking the printed lines, the tables, the plots and the JSON.

use std::process::Command;

#[test]
fn scale_scenarios_print_their_tables_and_draw_their_plots() {
    let exe = env!("CARGO_BIN_EXE_handoff-bench");
    let dir = std::env::temp_dir().join(format!("handoff-bench-scale-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("scale.json");
    let plots = dir.join("plots");
    let out = Command::new(exe)
        .args(["--quick", "--runs", "1", "--only", "scale"])
        .args(["--variants", "handoff-1,bare-1,handoff-16,handoff"])
        .args(["--seed-secs", "0.3", "--keepalive-connections", "300", "--soak-connections", "3000"])
        .arg("--plots")
        .arg(&plots)
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("runs the bench binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);

    for title in [
        "scale-workers (conn/s)",
        "scale-workers primary CPU (µs/conn)",
        "keepalive primary RSS (B/held conn)",
        "keepalive fresh p99, held (µs)",
        "soak answered (connections)",
        "soak primary fds after (count)",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(title))
            .unwrap_or_else(|| panic!("no line {title:?} in:\n{stdout}\nstderr:\n{stderr}"));
        assert!(!line.contains("=ERR"), "a variant failed: {line}\nstderr:\n{stderr}");
        assert!(!line.contains('*'), "a run failed: {line}\nstderr:\n{stderr}");
    }
    assert!(stdout.contains("keepalive held (connections)    handoff=300"), "every connection held:\n{stdout}");
    assert!(stdout.contains("soak answered (connections)"), "{stdout}");
    // The sweep's table has the measured counts; the soak's series has its idle readings and its
    // kills and reloads (3000 connections: kills at 600, 1200, 1800, 2400).
    assert!(stdout.contains("scale-workers (medians)"), "{stdout}");
    for needle in ["idle before", "idle after", "kill at 600 connections", "reload done (generation 2", "worker back"] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    for plot in ["scale-workers.svg", "soak.svg"] {
        let svg = std::fs::read_to_string(plots.join(plot)).unwrap_or_else(|e| panic!("{plot}: {e}\n{stdout}"));
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{plot} has no line:\n{svg:.300}");
    }
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let soak = json["scenarios"].as_array().unwrap().iter().find(|s| s["name"] == "scale-soak").unwrap();
    let raw = &soak["variants"]["handoff"]["samples"][0]["raw"];
    assert!(raw["series"].as_array().unwrap().len() >= 20, "series: {}", raw["series"]);
    assert!(raw["lifecycle"].as_array().unwrap().iter().any(|e| e["kind"] == "ReloadFinished"), "{}", raw["lifecycle"]);
    let _ = std::fs::remove_dir_all(&dir);
}
