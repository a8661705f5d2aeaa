//! Process plumbing for the orchestrator and the roles: starting a role in its own process group
//! and reading its `BENCH` lines with deadlines, killing what is left, `/proc` readers (CPU time,
//! RSS), the descriptor limit, and finding `node`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Prefix of a role's result line on stdout: `BENCH {json}`.
pub const RESULT_PREFIX: &str = "BENCH ";

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Returns the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    }
}

/// Makes this process die with its parent (roles only): a killed orchestrator leaves no server
/// listening behind.
pub fn die_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number; getppid has no preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
        if libc::getppid() == 1 {
            libc::_exit(3);
        }
    }
}

/// A role process started by the orchestrator: its own process group (killed whole on drop), its
/// stdout read line by line, the tail of its stderr kept for error messages.
pub struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    killed: bool,
}

impl Proc {
    /// Starts `argv` (program and arguments) with `env` added; with `pin`, on that CPU only (its
    /// children inherit the affinity).
    pub fn spawn(name: &str, argv: &[String], env: &[(&str, String)], pin: Option<usize>) -> Result<Proc> {
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for (k, v) in env {
            command.env(k, v);
        }
        if let Some(cpu) = pin {
            // SAFETY: sched_setaffinity on ourselves (the forked child) with a local mask; no
            // allocation between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child =
            command.spawn().with_context(|| format!("starting {name}: {}", argv.join(" ")))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr_tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut tail = tail.lock().unwrap();
                if tail.len() >= 20 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        Ok(Proc { name: name.to_owned(), child, lines, stderr_tail, killed: false })
    }


    /// What the process wrote on stderr lately, for error messages.
    pub fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap();
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ended with:\n    {}", Vec::from(tail.clone()).join("\n    "))
        }
    }

    /// Reads stdout until a line starting with `prefix`; returns the rest of that line.
    pub fn wait_line(&mut self, prefix: &str, deadline: Instant) -> Result<String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{}: timed out waiting for {prefix:?}{}", self.name, self.stderr_tail())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Give the stderr reader a moment to collect the last words.
                    std::thread::sleep(Duration::from_millis(50));
                    let status = self.child.try_wait().ok().flatten();
                    bail!(
                        "{}: ended without printing {prefix:?} (exit status {}){}",
                        self.name,
                        status.map_or("unknown".into(), |s| s.to_string()),
                        self.stderr_tail()
                    )
                }
            }
        }
    }

    /// Reads stdout until the `BENCH` line of `role` (its `"role"` field) and parses it.
    pub fn wait_result(&mut self, role: &str, deadline: Instant) -> Result<serde_json::Value> {
        loop {
            let text = self.wait_line(RESULT_PREFIX, deadline)?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: bad result line {text:?}", self.name))?;
            if value.get("error").is_some() {
                bail!("{}: {} reported {}", self.name, value["role"], value["error"]);
            }
            if value["role"] == role {
                return Ok(value);
            }
        }
    }

    /// Waits for the process to exit; kills its group at the deadline.
    pub fn wait_exit(&mut self, deadline: Instant) -> Result<ExitStatus> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("{}: did not exit in time; killed{}", self.name, self.stderr_tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends SIGKILL to the whole process group and reaps the leader.
    pub fn kill(&mut self) {
        if self.killed {
            return;
        }
        self.killed = true;
        // SAFETY: kill() with a negative pid signals that process group; ours, made by
        // process_group(0) at spawn.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU time (user + system) a process has used so far, in seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name is in parentheses and may contain spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("bad stat line"))? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime), 1-based over the whole line; `rest` starts at field 3.
    let utime: u64 = fields.get(11).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    let stime: u64 = fields.get(12).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    Ok((utime + stime) as f64 / clock_ticks())
}

/// Machine-wide (busy, total) CPU time in clock ticks, all cores, from `/proc/stat`: busy is
/// everything but idle and iowait (so softirq time spent on loopback TCP counts), minus what the
/// `--spin` spinners used (they fill otherwise idle time).
pub fn machine_cpu() -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().find(|l| l.starts_with("cpu ")).ok_or_else(|| anyhow!("no cpu line"))?;
    let fields: Vec<f64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already)
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    Ok((total - idle - crate::spin::busy_ticks(), total))
}

/// `sysconf(_SC_CLK_TCK)`.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The highest-numbered CPU this process may run on.
pub fn last_allowed_cpu() -> usize {
    // SAFETY: sched_getaffinity fills a local cpu_set_t; CPU_ISSET reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 0;
        }
        (0..libc::CPU_SETSIZE as usize).rev().find(|&cpu| libc::CPU_ISSET(cpu, &set)).unwrap_or(0)
    }
}

/// `VmRSS` of a process in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    Ok(line.split_whitespace().nth(1).ok_or_else(|| anyhow!("bad VmRSS"))?.parse()?)
}

/// `node` on `PATH` (or `$HANDOFF_BENCH_NODE`).
pub fn find_node() -> Option<PathBuf> {
    if let Some(explicit) = std::env::var_os("HANDOFF_BENCH_NODE") {
        let path = PathBuf::from(explicit);
        return path.is_file().then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("node")).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Output of a command's first line, or `None`.
pub fn command_line_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty())
}

/// The machine, for the report.
pub fn machine_info(node: Option<&Path>) -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    serde_json::json!({
        "cpus": cpus,
        "cpu_model": model,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "rustc": command_line_output("rustc", &["--version"]),
        "node": node.and_then(|n| command_line_output(&n.to_string_lossy(), &["--version"])),
    })
}
