//! `handoff run` as an operator meets it: serving with no command, the control socket and its
//! commands, signals, exit codes, and every bad input refused clearly without spinning.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod util;

use util::{handoff, node_available};

fn node_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/node").join(name)
}

/// A fresh directory for this test's control socket.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("handoff-run-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Private whatever the umask: the primary refuses a control directory others can write.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// A running `handoff run`, its stderr lines collected in the background.
struct Running {
    child: Child,
    control: PathBuf,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Running {
    fn start(dir: &Path, args: &[&str]) -> Running {
        Running::start_with_env(dir, args, &[])
    }

    fn start_with_env(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Running {
        let control = dir.join("control.sock");
        let mut child = handoff()
            .arg("run")
            .arg("--control")
            .arg(&control)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for stream in [Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stdout.take().unwrap())] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let mut running = Running { child, control, addr: "0.0.0.0:0".parse().unwrap(), lines, log: Vec::new() };
        let line = running.wait_line("the start", |l| l.contains("handoff primary started"));
        let addr = line.split_whitespace().find_map(|w| w.strip_prefix("listen=")).unwrap();
        running.addr = addr.trim_end_matches(',').parse().unwrap();
        running.wait_line("all workers ready", |l| l.contains("all workers ready"));
        running
    }

    fn wait_line(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        if let Some(line) = self.log.iter().find(|l| matches(l)) {
            return line.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no line for {what} within 20 s; output:\n{}", self.log.join("\n")),
            }
        }
    }

    fn signal(&self, signal: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(), signal).unwrap();
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "handoff run did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn control(&self, command: &str) -> std::process::Output {
        handoff().arg(command).arg("--control").arg(&self.control).output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

fn body(answer: &str) -> &str {
    answer.split("\r\n\r\n").nth(1).unwrap_or_default().trim()
}

#[test]
fn run_with_no_command_serves_http_with_its_workers_pids() {
    let dir = scratch("builtin");
    let mut run = Running::start(&dir, &["--listen", "127.0.0.1:0", "--workers", "2"]);
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let answer = http_get(run.addr, "/");
        assert!(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"), "{answer}");
        pids.insert(body(&answer).parse::<u32>().unwrap());
    }
    assert_eq!(pids.len(), 2, "both workers answered: {pids:?}");

    // status: a table, and JSON with a stable schema.
    let table = run.control("status");
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("2/2 workers ready"), "{table}");
    let json = handoff().args(["status", "--json", "--control"]).arg(&run.control).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(status["workers"].as_array().unwrap().len(), 2);
    for worker in status["workers"].as_array().unwrap() {
        assert_eq!(worker["state"], "ready");
        assert_eq!(worker["generation"], 1);
        assert!(pids.contains(&(worker["pid"].as_u64().unwrap() as u32)));
    }
    assert_eq!(status["connections_dispatched"], 10);

    // The control socket is private.
    let mode = std::fs::metadata(&run.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // SIGHUP: a rolling reload.
    run.signal(rustix::process::Signal::HUP);
    run.wait_line("the reload", |l| l.contains("reload finished"));
    // Every ready worker is new at once; the old ones may still be finishing (draining).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let output = handoff().args(["status", "--json", "--control"]).arg(&run.control).output().unwrap();
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let workers = status["workers"].as_array().unwrap();
        for worker in workers.iter().filter(|w| w["state"] == "ready") {
            assert_eq!(worker["generation"], 2, "a ready worker of the old generation after the reload: {status}");
        }
        if workers.iter().all(|w| w["generation"] == 2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the old workers never left: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGTERM: drained, exit 0, control socket removed.
    run.signal(rustix::process::Signal::TERM);
    let status = run.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    assert!(!run.control.exists());
}

#[test]
fn worker_output_is_prefixed_with_its_id() {
    if !node_available() {
        return;
    }
    let dir = scratch("output");
    let script = dir.join("chatty.js");
    std::fs::write(&script, "console.log('hello from the worker'); require('net').createServer(s => s.end()).listen(process.env.PORT, process.env.HOST)").unwrap();
    let mut run = Running::start(&dir, &["--listen", "127.0.0.1:0", "--workers", "1", "--", "node", script.to_str().unwrap()]);
    run.wait_line("the worker's line", |l| l == "[worker 1] hello from the worker");
    let out = run.control("stop");
    assert!(out.status.success());
    assert_eq!(run.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn handoff_reload_fails_with_the_reason_when_the_new_version_crashes() {
    if !node_available() {
        return;
    }
    let dir = scratch("reload");
    let crash = dir.join("crash");
    // CRASH_FILE reaches the workers through the primary's environment.
    let app = node_script("http_app.js");
    let mut run = Running::start_with_env(
        &dir,
        &["--listen", "127.0.0.1:0", "--workers", "2", "--", "node", app.to_str().unwrap()],
        &[("CRASH_FILE", &crash)],
    );
    let before = body(&http_get(run.addr, "/")).to_owned();
    std::fs::write(&crash, "").unwrap();
    let out = run.control("reload");
    assert!(!out.status.success(), "reload to a crashing version must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("aborted") && stderr.contains("exited"), "{stderr}");
    // The old generation still serves.
    let pids: std::collections::BTreeSet<String> = (0..6).map(|_| body(&http_get(run.addr, "/")).to_owned()).collect();
    assert!(pids.contains(&before), "{pids:?}");
    std::fs::remove_file(&crash).unwrap();
    let out = run.control("reload");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    run.signal(rustix::process::Signal::TERM);
    assert_eq!(run.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn a_second_signal_stops_at_once() {
    if !node_available() {
        return;
    }
    let dir = scratch("second-signal");
    // A request that would hold the drain for 60 s.
    let mut run = Running::start(&dir, &["--listen", "127.0.0.1:0", "--workers", "1", "--drain-timeout", "60", "--", "node", node_script("http_app.js").to_str().unwrap()]);
    let addr = run.addr;
    let slow = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(b"GET /?slow=60000 HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
    });
    std::thread::sleep(Duration::from_millis(300));
    run.signal(rustix::process::Signal::TERM);
    run.wait_line("stopping", |l| l.contains("stopping"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(run.child.try_wait().unwrap().is_none(), "still draining the slow request");
    run.signal(rustix::process::Signal::INT);
    let started = Instant::now();
    run.wait_exit(Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(5));
    slow.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Bad input: clear errors, non-zero exits, no spinning
// ---------------------------------------------------------------------------------------------

fn run_fails(args: &[&str], within: Duration) -> String {
    let dir = scratch(&format!("fail-{}", args.len()));
    let started = Instant::now();
    let out = handoff().arg("run").arg("--control").arg(dir.join("c.sock")).args(args).output().unwrap();
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
    assert!(!out.status.success(), "expected a failure for {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_command_that_is_not_found_is_refused() {
    let stderr = run_fails(&["--listen", "127.0.0.1:0", "--", "no-such-command-handoff"], Duration::from_secs(10));
    assert!(stderr.contains("no-such-command-handoff") && stderr.contains("not found"), "{stderr}");
}

#[test]
fn a_port_in_use_is_refused() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let stderr = run_fails(&["--listen", &addr], Duration::from_secs(10));
    assert!(stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("in use"), "{stderr}");
}

#[test]
fn zero_workers_is_refused() {
    let stderr = run_fails(&["--listen", "127.0.0.1:0", "--workers", "0"], Duration::from_secs(10));
    assert!(stderr.contains("at least 1"), "{stderr}");
}

#[test]
fn a_worker_that_exits_at_once_every_time_ends_the_run() {
    let stderr = run_fails(&["--listen", "127.0.0.1:0", "--workers", "2", "--", "sh", "-c", "exit 7"], Duration::from_secs(20));
    assert!(stderr.contains("no worker became ready") && stderr.contains("code 7"), "{stderr}");
}

#[test]
fn a_bad_listen_address_is_refused() {
    let stderr = run_fails(&["--listen", "nowhere:port"], Duration::from_secs(10));
    assert!(stderr.contains("not an address to listen on"), "{stderr}");
}

#[test]
fn a_second_primary_on_the_same_control_socket_is_refused_and_a_stale_one_is_not() {
    let dir = scratch("control");
    let control = dir.join("control.sock");
    // A stale socket file (a killed primary's): replaced.
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    let mut run = Running::start(&dir, &["--listen", "127.0.0.1:0", "--workers", "1"]);
    let out = handoff().arg("run").arg("--control").arg(&control).args(["--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another handoff primary is running"), "{stderr}");
    assert!(http_get(run.addr, "/").contains(" 200 OK"), "the first one still serves");
    let out = run.control("stop");
    assert!(out.status.success());
    assert_eq!(run.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn a_control_directory_others_can_write_is_refused() {
    let dir = scratch("open-dir");
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = handoff().arg("run").arg("--control").arg(open.join("c.sock")).args(["--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not private") && stderr.contains("777"), "{stderr}");
    assert!(!open.join("c.sock").exists());
}

#[test]
fn a_control_path_that_is_not_a_socket_is_refused_and_left_alone() {
    let dir = scratch("not-socket");
    let file = dir.join("precious.txt");
    std::fs::write(&file, "precious").unwrap();
    let out = handoff().arg("run").arg("--control").arg(&file).args(["--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

#[test]
fn control_commands_without_a_primary_say_so() {
    let dir = scratch("nobody");
    for command in ["status", "reload", "stop"] {
        let out = handoff().arg(command).arg("--control").arg(dir.join("none.sock")).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no handoff primary answers"), "{command}: {stderr}");
    }
}
