//! `--spin`: one busy loop per allowed CPU at `SCHED_IDLE` for the whole run, so that no core
//! drops into deep idle between the bench's wake-ups (issue 10: on a VM, a wake-up that has to
//! bring a halted vCPU back costs tens of µs and dominates any one-message-at-a-time pipeline).
//!
//! `SCHED_IDLE` needs no privilege and gives the spinners only the cycles nothing else wants: a
//! runnable normal task preempts them at once on wake-up. They are threads of the orchestrator
//! (not of any measured process), so they end with it, whatever way it ends. Per-process CPU
//! figures (`/proc/<pid>/stat` of the measured processes) never include them;
//! [`crate::procs::machine_cpu`] subtracts their time ([`busy_ticks`]) from the machine's busy
//! time, so "machine busy" keeps meaning the bench's own load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

/// Thread ids of the running spinners, for [`busy_ticks`].
static SPINNER_TIDS: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// The running spinners; dropping this stops and joins them.
pub struct Spinners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    cpus: Vec<usize>,
}

impl Spinners {
    /// Starts one spinner on each CPU this process may run on; returns once every one of them
    /// runs at `SCHED_IDLE` on its CPU (or fails, stopping those already started).
    pub fn start() -> Result<Spinners> {
        let cpus = allowed_cpus()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut spinners = Spinners { stop: stop.clone(), threads: Vec::new(), cpus: cpus.clone() };
        for &cpu in &cpus {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("spin-{cpu}"))
                .spawn(move || {
                    let setup = become_idle_spinner(cpu);
                    let ok = setup.is_ok();
                    let _ = ready_tx.send(setup);
                    if ok {
                        spin(&stop);
                    }
                })
                .context("starting a spinner thread")?;
            spinners.threads.push(thread);
            match ready_rx.recv() {
                Ok(Ok(tid)) => SPINNER_TIDS.lock().unwrap_or_else(|e| e.into_inner()).push(tid),
                Ok(Err(e)) => return Err(e.context(format!("spinner on CPU {cpu}"))),
                Err(_) => bail!("the spinner thread for CPU {cpu} ended before starting"),
            }
        }
        Ok(spinners)
    }

    /// The CPUs spun on.
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        SPINNER_TIDS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Pins the calling thread to `cpu` and switches it to `SCHED_IDLE`; returns its thread id.
fn become_idle_spinner(cpu: usize) -> Result<libc::pid_t> {
    // SAFETY: sched_setaffinity / sched_setscheduler with pid 0 act on the calling thread and
    // read local structs; gettid has no preconditions.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setscheduler(SCHED_IDLE)");
        }
        if libc::sched_getscheduler(0) != libc::SCHED_IDLE {
            bail!("the thread is not at SCHED_IDLE after sched_setscheduler");
        }
        Ok(libc::gettid())
    }
}

/// The busy loop. No `PAUSE` (`spin_loop` hint) in it: on KVM a tight `PAUSE` loop triggers
/// pause-loop exits, which would take the vCPU out of the guest, the very thing avoided here.
fn spin(stop: &AtomicBool) {
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        // Some work the compiler cannot drop, between checks of the flag.
        for _ in 0..1024 {
            n = std::hint::black_box(n.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    std::hint::black_box(n);
}

/// CPU time the running spinners have used, in clock ticks (the unit of `/proc/stat`); 0 when
/// there are none.
pub fn busy_ticks() -> f64 {
    let tids = SPINNER_TIDS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    tids.iter().filter_map(|&tid| thread_ticks(tid)).sum()
}

/// utime + stime of one of our threads, in clock ticks, from `/proc/self/task/<tid>/stat`.
fn thread_ticks(tid: libc::pid_t) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: sched_getaffinity fills a local cpu_set_t; CPU_ISSET reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        let cpus: Vec<usize> =
            (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect();
        if cpus.is_empty() {
            bail!("no CPU in this process's affinity mask");
        }
        Ok(cpus)
    }
}
