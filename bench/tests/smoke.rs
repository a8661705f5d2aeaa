//! Keeps the harness from rotting: a very short run of the fast scenarios, through the real
//! binary, checking the printed lines and the JSON file. Needs `node` under CI (the binary itself
//! refuses to run without it when `CI` is set, so this test fails rather than skips).

use std::path::PathBuf;
use std::process::Command;

fn node_on_path() -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("node").is_file()))
}

#[test]
fn quick_run_prints_every_line_and_writes_json() {
    let exe = env!("CARGO_BIN_EXE_handoff-bench");
    let dir = std::env::temp_dir().join(format!("handoff-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path: PathBuf = dir.join("smoke.json");
    let have_node = node_on_path();
    if std::env::var_os("CI").is_some() {
        assert!(have_node, "node must be on PATH under CI (the Node columns are part of the bench)");
    }

    let started = std::time::Instant::now();
    let out = Command::new(exe)
        .args(["--quick", "--runs", "1", "--only", "msg-64B,rtt,handles,seed,cluster-rr,cluster-shared,memory"])
        .args(["--msg-secs", "0.1", "--rtt-count", "300", "--handles", "300"])
        .args(["--seed-secs", "0.5", "--memory-connections", "2000"])
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("runs the bench binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    eprintln!("smoke run took {:.1} s", started.elapsed().as_secs_f64());

    // One line per metric, every variant with a number (n/a only for Node columns without node).
    for title in [
        "msg 64B (msg/s)",
        "rtt p50 (µs)",
        "rtt p99 (µs)",
        "handles (handles/s)",
        "seed (conn/s)",
        "seed server CPU (µs/conn)",
        "cluster-rr (conn/s)",
        "cluster-rr primary CPU (µs/conn)",
        "cluster-shared (conn/s)",
        "mem parent RSS max (KiB)",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(title))
            .unwrap_or_else(|| panic!("no line {title:?} in:\n{stdout}\nstderr:\n{stderr}"));
        assert!(!line.contains("=ERR"), "a variant failed: {line}\nstderr:\n{stderr}");
        assert!(!line.contains('*'), "a run failed: {line}\nstderr:\n{stderr}");
        if have_node {
            assert!(!line.contains("=n/a  ") || title.starts_with("mem"), "missing column: {line}");
        }
    }
    assert!(stdout.contains("handoff/node="), "ratios are printed:\n{stdout}");
    assert!(stdout.contains("targets (same run):"), "target checks are printed:\n{stdout}");

    // The JSON file: every scenario, every variant with its samples and medians.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("JSON written")).expect("valid JSON");
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scenarios.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["msg-64B", "rtt", "handles", "seed", "cluster-rr", "cluster-shared", "memory"]);
    for s in scenarios {
        let key = s["metrics"][0]["key"].as_str().unwrap();
        for (id, v) in s["variants"].as_object().unwrap() {
            if v["skipped"] == true {
                assert!(!have_node, "{}/{id} skipped although node is present", s["name"]);
                continue;
            }
            assert!(v["median"][key].is_number(), "{}/{id}: no median {key}: {v}", s["name"]);
            assert_eq!(v["samples"].as_array().unwrap().len(), 1, "{}/{id}", s["name"]);
        }
    }
    assert!(report["targets"].as_array().unwrap().len() >= 12);
    assert!(report["machine"]["cpus"].as_u64().unwrap() >= 1);
    let _ = std::fs::remove_dir_all(&dir);
}
