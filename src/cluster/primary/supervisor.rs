//! The primary's supervisor: one task that owns every piece of cluster state and acts on one
//! input at a time — accepted connections, workers' cluster messages, their channels closing and
//! processes exiting, timers, and the user's requests. Other tasks only carry inputs to it (accept
//! loops, one reader and one waiter per worker), so no state is shared and every decision sees a
//! consistent picture: a connection is in exactly one place (pending, or in one worker's
//! in-flight list) until a worker accepts it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::ffi::OsString;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;

use super::counts::OpenConnections;
use super::output;
use super::listeners::{self, Accepted, BoundAddr, Listener, SharedListener};
use super::{
    Event, Input, EVENTS, ListenAddr, Primary, PrimaryBuilder, PrimaryError, ReloadReport, Schedule,
    Status, WorkerOutput, WorkerStatus,
};
use crate::channel::{ChannelConfig, Sender};
use crate::cluster::protocol::{self, newconn, Act, Ack, FromWorker, Query, QueryReply, Sockname, CLUSTER};

/// Quick failures in a row after which a slot is reported as crash-looping.
const CRASH_LOOP: u32 = 5;
/// How often in-flight connections are checked against the accept timeout.
const TICK: Duration = Duration::from_millis(100);
/// How long after a worker exits its channel may stay open (a grandchild holding it) before its
/// unanswered connections go to others anyway.
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// Inputs waiting for the supervisor, at most (the tasks feeding it wait beyond).
const INPUTS: usize = 1024;

/// Most listeners workers can make the primary bind on addresses it was not given.
const MAX_ON_DEMAND: usize = 64;

/// What the [`Primary`] handle asks of the supervisor.
pub(crate) enum Request {
    WaitReady(oneshot::Sender<Result<(), PrimaryError>>),
    Status(oneshot::Sender<Status>),
    Reload(oneshot::Sender<Result<ReloadReport, PrimaryError>>),
    Stop { graceful: bool },
}

/// Starts a primary: checks the settings, binds, spawns the supervisor and the first workers.
pub(super) async fn start(config: PrimaryBuilder) -> Result<Primary, PrimaryError> {
    if config.workers == 0 {
        return Err(PrimaryError::Config("--workers must be at least 1".into()));
    }
    if config.listen.is_empty() && config.inherited.is_empty() {
        return Err(PrimaryError::Config("nothing to listen on: give at least one address".into()));
    }
    let program = resolve_program(&config.program, config.current_dir.as_deref())
        .map_err(|source| PrimaryError::Spawn { program: config.program.clone(), source })?;
    let mut bound = Vec::new();
    let nonblocking = config.schedule == Schedule::RoundRobin;
    for addr in &config.listen {
        if let ListenAddr::Unix(path) = addr {
            remove_stale_socket(path);
        }
        bound.push(Listener::bind(addr, nonblocking).map_err(PrimaryError::Listen)?);
    }
    for (_, fd) in &config.inherited {
        let fd = fd.try_clone().map_err(PrimaryError::Listen)?;
        bound.push(Listener::from_fd(fd, nonblocking).map_err(PrimaryError::Listen)?);
    }
    let addrs = bound.iter().map(|l| l.addr.clone()).collect();
    let (inputs_tx, inputs) = mpsc::channel(INPUTS);
    let (requests, requests_rx) = mpsc::channel(64);
    let (events, first_events) = broadcast::channel(EVENTS);
    let (stopped_tx, stopped) = watch::channel(false);
    let mut supervisor = Supervisor {
        program,
        listeners: Vec::new(),
        slots: (0..config.workers).map(|_| Slot::default()).collect(),
        workers: HashMap::new(),
        order: Vec::new(),
        cursor: 0,
        pending: Vec::new(),
        seq: 0,
        next_id: 1,
        generation: 1,
        timers: BinaryHeap::new(),
        timer_seq: 0,
        reload: None,
        stopping: None,
        ready_waiters: Vec::new(),
        ever_ready: false,
        events: events.clone(),
        inputs: inputs_tx,
        dispatched: 0,
        redispatched: 0,
        dropped: 0,
        open: OpenConnections::new(),
        output: (config.output == WorkerOutput::Prefixed).then(output::Sinks::start),
        on_demand: HashMap::new(),
        config,
    };
    for listener in bound {
        supervisor.add_listener(listener);
    }
    for slot in 0..supervisor.slots.len() {
        supervisor.fill_slot(slot);
    }
    if supervisor.workers.is_empty() {
        // Every spawn failed at once: the command cannot run at all.
        let reason = supervisor.slots[0].last_error.clone().unwrap_or_default();
        return Err(PrimaryError::Spawn {
            program: supervisor.config.program.clone(),
            source: std::io::Error::other(reason),
        });
    }
    let open = supervisor.open.clone();
    tokio::spawn(supervisor.run(inputs, requests_rx, stopped_tx));
    Ok(Primary { requests, events, first_events: std::sync::Mutex::new(Some(first_events)), addrs, stopped, open })
}

/// Finds `program` the way `execvp` will (a path, or a name on `PATH`), so that a missing command
/// is a clear error at start instead of workers failing one after another.
fn resolve_program(program: &OsString, cwd: Option<&std::path::Path>) -> std::io::Result<OsString> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &std::path::Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let path = std::path::Path::new(program);
    if path.components().count() > 1 || program.to_string_lossy().contains('/') {
        let full = match cwd {
            Some(cwd) if path.is_relative() => cwd.join(path),
            _ => path.to_path_buf(),
        };
        return if executable(&full) {
            Ok(program.clone())
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} is not an executable file", full.display())))
        };
    }
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join(path)).any(|p| executable(&p)))
        .unwrap_or(false);
    if found {
        Ok(program.clone())
    } else {
        Err(std::io::Error::new(std::io::ErrorKind::NotFound, "command not found on PATH"))
    }
}

/// A socket file left by a primary that was killed would make binding fail: remove it if nobody
/// listens on it any more.
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

/// One of the `workers` places the primary keeps filled.
#[derive(Debug, Default)]
struct Slot {
    /// The worker serving it (or starting to).
    worker: Option<u32>,
    /// Quick failures in a row.
    failures: u32,
    restarts: u64,
    last_exit: Option<String>,
    last_error: Option<String>,
    crash_loop_reported: bool,
    /// A restart is scheduled.
    restart_pending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Online,
    Ready,
    Wedged,
    Draining,
}

/// A connection between accept and a worker's `accepted`.
#[derive(Debug)]
struct Conn {
    listener: usize,
    accepted: Accepted,
    _permit: super::Permit,
    /// A worker that refused it (it goes elsewhere first).
    refused_by: Option<u32>,
}

#[derive(Debug)]
struct InFlight {
    seq: u64,
    conn: Conn,
    since: Instant,
    /// The worker's channel acknowledging the `newconn` (its transport, not its program, which
    /// may take its time to `accept`).
    delivery: crate::channel::Delivery<()>,
}

#[derive(Debug)]
struct WorkerState {
    id: u32,
    pid: u32,
    generation: u64,
    /// The slot it serves, or will serve once ready (a reload's replacement).
    slot: usize,
    sender: Sender,
    control: mpsc::Sender<i32>,
    phase: Phase,
    /// It spoke the cluster protocol.
    online: bool,
    /// Round-robin: the key of its server for each listener.
    servers: HashMap<usize, String>,
    in_flight: VecDeque<InFlight>,
    handled: u64,
    spawned_at: Instant,
    channel_open: bool,
    exited: bool,
    /// The primary asked it to go, or it said it leaves (`exitedAfterDisconnect`).
    leaving: bool,
    /// Why it is leaving, which decides what its exit means for its slot.
    leave: Leave,
    /// Replaces the worker of its slot once ready (reload, or a wedged worker).
    replaces: Option<u32>,
}

/// Why a worker leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// It is not leaving (an exit is a crash).
    No,
    /// The primary drained it (reload, stop, a ready replacement): the slot is taken care of.
    Drained,
    /// It said it leaves (`exitedAfterDisconnect`): restarted with the crash backoff, so a
    /// program that leaves at once every time is not restarted in a tight loop.
    OnItsOwn,
    /// The primary killed it as failed (not ready in time, wedged, channel lost): the slot
    /// restarts with the crash backoff and the failure counts towards a crash loop.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Fill the slot again.
    Restart(usize),
    /// The worker must be ready by now.
    ReadyDeadline(u32),
    /// A silent worker (shared mode) counts as ready by now.
    SilentReady(u32),
    /// The draining worker gets SIGTERM.
    Terminate(u32),
    /// The worker gets SIGKILL.
    Kill(u32),
    /// The worker exited a while ago and its channel is still open.
    ExitGrace(u32),
    /// Check for wedged workers.
    Tick,
}

#[derive(Debug)]
struct Reload {
    generation: u64,
    started: Instant,
    /// Slots still to replace.
    remaining: VecDeque<usize>,
    /// The replacement being started, and the worker it will replace.
    current: Option<(u32, Option<u32>)>,
    waiters: Vec<oneshot::Sender<Result<ReloadReport, PrimaryError>>>,
}

#[derive(Debug)]
struct Stopping {
    graceful: bool,
}

struct Supervisor {
    config: PrimaryBuilder,
    program: OsString,
    listeners: Vec<ListenerState>,
    slots: Vec<Slot>,
    workers: HashMap<u32, WorkerState>,
    /// Worker ids in the order they were spawned (round-robin order).
    order: Vec<u32>,
    cursor: usize,
    /// Per listener: connections waiting for a worker (each listener its own queue and budget,
    /// so connections nobody serves on one listener never hold up another's).
    pending: Vec<VecDeque<Conn>>,
    /// The primary's cluster message counter, one for all workers (as Node's).
    seq: u64,
    next_id: u32,
    generation: u64,
    timers: BinaryHeap<Reverse<(Instant, u64, Timer)>>,
    timer_seq: u64,
    reload: Option<Reload>,
    stopping: Option<Stopping>,
    ready_waiters: Vec<oneshot::Sender<Result<(), PrimaryError>>>,
    ever_ready: bool,
    events: broadcast::Sender<Event>,
    inputs: mpsc::Sender<Input>,
    dispatched: u64,
    redispatched: u64,
    dropped: u64,
    /// Round-robin: the connections each worker accepted, to count the open ones.
    open: OpenConnections,
    /// Where workers' output lines go ([`WorkerOutput::Prefixed`]).
    output: Option<output::Sinks>,
    /// Listeners bound because a worker asked for an address we were not given, by Node's key.
    on_demand: HashMap<String, usize>,
}

struct ListenerState {
    listener: Listener,
    /// Keys workers asked for that map to this listener (on-demand ones too).
    accepting: Option<tokio::task::JoinHandle<()>>,
}

impl Supervisor {
    async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut requests: mpsc::Receiver<Request>,
        stopped: watch::Sender<bool>,
    ) {
        self.schedule(Instant::now() + TICK, Timer::Tick);
        let mut requests_open = true;
        loop {
            let next = self.timers.peek().map(|Reverse((at, _, _))| *at);
            tokio::select! {
                biased;
                request = requests.recv(), if requests_open => match request {
                    Some(request) => self.on_request(request),
                    // The Primary handle is gone: stop as if asked.
                    None => {
                        requests_open = false;
                        self.begin_stop(true);
                    }
                },
                input = inputs.recv() => match input {
                    Some(input) => self.on_input(input),
                    None => break,
                },
                _ = sleep_until(next) => self.on_timers(),
            }
            self.dispatch();
            if self.stopping.is_some() && self.workers.is_empty() {
                break;
            }
        }
        // Connections still waiting had no worker to go to.
        self.dropped += self.pending.iter().map(|queue| queue.len() as u64).sum::<u64>();
        self.pending.clear();
        for listener in &mut self.listeners {
            if let Some(task) = listener.accepting.take() {
                task.abort();
            }
        }
        for waiter in self.ready_waiters.drain(..) {
            let _ = waiter.send(Err(PrimaryError::Stopping));
        }
        if let Some(reload) = self.reload.take() {
            for waiter in reload.waiters {
                let _ = waiter.send(Err(PrimaryError::Stopping));
            }
        }
        self.emit(Event::Stopped);
        stopped.send_replace(true);
    }

    fn emit(&self, event: Event) {
        tracing::debug!(?event, "cluster");
        let _ = self.events.send(event);
    }

    fn schedule(&mut self, at: Instant, timer: Timer) {
        self.timer_seq += 1;
        self.timers.push(Reverse((at, self.timer_seq, timer)));
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq += 1;
        seq
    }

    // -----------------------------------------------------------------------------------------
    // Listeners
    // -----------------------------------------------------------------------------------------

    fn add_listener(&mut self, listener: Listener) -> usize {
        let id = self.listeners.len();
        let accepting = (self.config.schedule == Schedule::RoundRobin).then(|| {
            let (budget, inputs) = (Arc::new(Semaphore::new(self.config.max_pending)), self.inputs.clone());
            let listener = listener.clone();
            tokio::spawn(async move { listeners::accept_loop(id, &listener, budget, inputs).await })
        });
        self.listeners.push(ListenerState { listener, accepting });
        self.pending.push(VecDeque::new());
        id
    }

    /// The listener serving a worker's query: one of ours with the same port (and address, when
    /// the worker names one we listen on specifically), or a new one bound on demand.
    fn listener_for(&mut self, query: &Query) -> Result<usize, std::io::Error> {
        use protocol::AddressKind;
        // Node's primary keeps one handle per key (address, port, type, fd, and the index of the
        // worker's server with those): every worker's first `listen(0)` shares one port.
        let key = query.key();
        if let Some(&found) = self.on_demand.get(&key) {
            return Ok(found);
        }
        match query.kind() {
            AddressKind::Udp => {
                return Err(std::io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            AddressKind::Pipe => {
                let path = query.host().unwrap_or_default();
                let found = self.listeners.iter().position(|l| {
                    matches!(&l.listener.addr, BoundAddr::Unix(p) if p.as_os_str() == path || p.ends_with(path))
                });
                if let Some(found) = found {
                    return Ok(found);
                }
                self.may_bind_on_demand()?;
                let addr = ListenAddr::Unix(path.into());
                remove_stale_socket(std::path::Path::new(path));
                let listener = Listener::bind(&addr, self.config.schedule == Schedule::RoundRobin)?;
                let id = self.add_listener(listener);
                self.on_demand.insert(key, id);
                return Ok(id);
            }
            AddressKind::Tcp4 | AddressKind::Tcp6 => {}
        }
        let port = query.port().unwrap_or(0);
        let Ok(port) = u16::try_from(port) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        let host: Option<std::net::IpAddr> = query.host().and_then(|h| h.parse().ok());
        if port != 0 {
            let found = self.listeners.iter().position(|l| match &l.listener.addr {
                BoundAddr::Tcp(addr) => {
                    addr.port() == port
                        && match host {
                            None => true,
                            Some(ip) => ip.is_unspecified() || addr.ip().is_unspecified() || addr.ip() == ip,
                        }
                }
                BoundAddr::Unix(_) => false,
            });
            if let Some(found) = found {
                return Ok(found);
            }
        }
        let ip = host.unwrap_or(match query.kind() {
            AddressKind::Tcp6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
            _ => std::net::Ipv4Addr::UNSPECIFIED.into(),
        });
        self.may_bind_on_demand()?;
        let listener = Listener::bind(&ListenAddr::Tcp((ip, port).into()), self.config.schedule == Schedule::RoundRobin)?;
        let id = self.add_listener(listener);
        self.on_demand.insert(key, id);
        Ok(id)
    }

    /// Workers may make the primary listen on addresses it was not given, up to
    /// [`MAX_ON_DEMAND`] of them (kept until the primary stops, like the others): a worker
    /// asking for more gets `EMFILE`, and the primary's descriptors stay bounded.
    fn may_bind_on_demand(&self) -> std::io::Result<()> {
        if self.on_demand.len() >= MAX_ON_DEMAND {
            tracing::warn!("workers asked for more than {MAX_ON_DEMAND} addresses of their own; refusing");
            return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Workers: spawning and their lifecycle
    // -----------------------------------------------------------------------------------------

    /// Starts a worker for `slot`, replacing `replaces` once ready (if given).
    fn spawn_worker(&mut self, slot: usize, replaces: Option<u32>, generation: u64) -> Option<u32> {
        let id = self.next_id;
        self.next_id += 1;
        match self.start_process(id) {
            Ok((pid, sender, control)) => {
                let now = Instant::now();
                self.workers.insert(
                    id,
                    WorkerState {
                        id,
                        pid,
                        generation,
                        slot,
                        sender,
                        control,
                        phase: Phase::Starting,
                        online: false,
                        servers: HashMap::new(),
                        in_flight: VecDeque::new(),
                        handled: 0,
                        spawned_at: now,
                        channel_open: true,
                        exited: false,
                        leaving: false,
                        leave: Leave::No,
                        replaces,
                    },
                );
                self.order.push(id);
                self.schedule(now + self.config.ready_timeout, Timer::ReadyDeadline(id));
                if self.config.schedule == Schedule::Shared {
                    self.schedule(now + self.config.silent_ready_after, Timer::SilentReady(id));
                }
                self.emit(Event::Spawned { worker: id, pid, generation });
                Some(id)
            }
            Err(error) => {
                tracing::error!(%error, "cannot start a worker");
                self.slots[slot].last_error = Some(error.to_string());
                None
            }
        }
    }

    /// Forks and execs one worker with its channel, and starts its reader and waiter tasks.
    fn start_process(&mut self, id: u32) -> std::io::Result<(u32, Sender, mpsc::Sender<i32>)> {
        let config = &self.config;
        let shared = config.schedule == Schedule::Shared;
        let mut command = if shared {
            // systemd's convention needs LISTEN_PID = the worker's own pid, known only in the
            // child: a shell sets it and execs the program in place (same pid).
            let mut command = crate::Command::new("/bin/sh");
            command.arg("-c").arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"");
            command.arg(&self.program);
            command
        } else {
            crate::Command::new(&self.program)
        };
        command.args(&config.args);
        for (key, value) in &config.env {
            command.env(key, value);
        }
        if let Some(dir) = &config.current_dir {
            command.current_dir(dir);
        }
        command.env(crate::process::WORKER_ID_ENV, id.to_string());
        match self.listeners.first().map(|l| &l.listener.addr) {
            Some(BoundAddr::Tcp(addr)) => {
                command.env("PORT", addr.port().to_string()).env("HOST", addr.ip().to_string());
            }
            Some(BoundAddr::Unix(path)) => {
                command.env("PORT", path.as_os_str());
            }
            None => {}
        }
        if shared {
            let names: Vec<String> = self.listeners.iter().enumerate().map(|(i, l)| listener_name(i, &l.listener.addr)).collect();
            for (i, listener) in self.listeners.iter().enumerate() {
                command.pass_fd(listener.listener.fd.clone(), 3 + i as i32);
            }
            command.channel_fd(3 + self.listeners.len() as i32);
            command.env("LISTEN_FDS", self.listeners.len().to_string());
            command.env("LISTEN_FDNAMES", names.join(":"));
        }
        command.kill_on_drop(true);
        command.as_tokio_mut().process_group(0);
        command.channel_config(ChannelConfig::default().receive_internal(true).handle_window(64));
        if config.output == WorkerOutput::Prefixed {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = command.spawn()?;
        let pid = child.id().unwrap_or(0);
        let sender = child.sender().clone();
        if let Some(output) = &self.output {
            if let Some(out) = child.process_mut().stdout.take() {
                tokio::spawn(output::forward(id, out, output.stdout.clone()));
            }
            if let Some(err) = child.process_mut().stderr.take() {
                tokio::spawn(output::forward(id, err, output.stderr.clone()));
            }
        }
        let mut receiver = child.take_receiver().expect("a new child has its receiver");
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            while let Some(item) = receiver.recv().await {
                let Ok(message) = item else { continue };
                if inputs.send(Input::FromWorker { worker: id, message }).await.is_err() {
                    return;
                }
            }
            let _ = inputs.send(Input::ChannelClosed { worker: id }).await;
        });
        let (control, mut signals) = mpsc::channel::<i32>(8);
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    status = child.wait() => {
                        let _ = inputs.send(Input::Exited { worker: id, status: status.ok() }).await;
                        return;
                    }
                    signal = signals.recv() => match signal {
                        // The whole process group: a worker's own children go too.
                        Some(signal) => signal_group(pid, signal),
                        None => std::future::pending::<()>().await,
                    },
                }
            }
        });
        Ok((pid, sender, control))
    }

    /// Starts a worker for an empty slot (at start, after a restart delay).
    fn fill_slot(&mut self, slot: usize) {
        self.slots[slot].restart_pending = false;
        if self.stopping.is_some() {
            return;
        }
        let generation = self.generation;
        match self.spawn_worker(slot, None, generation) {
            Some(id) => self.slots[slot].worker = Some(id),
            None => self.slot_failed(slot, None),
        }
    }

    /// The slot's worker failed (or could not start): restart after a growing delay.
    fn slot_failed(&mut self, slot: usize, worker: Option<u32>) {
        let state = &mut self.slots[slot];
        state.failures += 1;
        let failures = state.failures;
        let factor = 1u32 << (failures - 1).min(16);
        let delay = (self.config.restart_delay * factor).min(self.config.max_restart_delay);
        if failures >= CRASH_LOOP && !state.crash_loop_reported {
            state.crash_loop_reported = true;
            self.emit(Event::CrashLoop { worker: worker.unwrap_or(0), failures });
            tracing::error!(slot, failures, "workers keep failing at start; restarting every {delay:?}");
            self.check_never_ready();
        }
        self.restart_later(slot, worker, delay);
    }

    fn restart_later(&mut self, slot: usize, worker: Option<u32>, delay: Duration) {
        if self.stopping.is_some() || self.slots[slot].restart_pending {
            return;
        }
        self.slots[slot].restart_pending = true;
        self.slots[slot].restarts += 1;
        self.emit(Event::Restarting { worker: worker.unwrap_or(0), delay });
        self.schedule(Instant::now() + delay, Timer::Restart(slot));
    }

    /// Before any worker was ever ready, every slot crash-looping means the command cannot serve:
    /// whoever waits for readiness hears it.
    fn check_never_ready(&mut self) {
        if self.ever_ready || !self.slots.iter().all(|s| s.failures >= CRASH_LOOP) {
            return;
        }
        // The primary's own finding (not ready in time, cannot start) says more than the exit
        // status of a worker it killed for it.
        let reason = self.slots.iter().find_map(|s| s.last_error.clone().or_else(|| s.last_exit.clone()))
            .unwrap_or_else(|| "they exit at once".into());
        let message = format!(
            "every worker failed {CRASH_LOOP} times in a row before it was ready (last: {reason}){}",
            if self.config.schedule == Schedule::RoundRobin {
                "; in round-robin mode a worker must speak the cluster protocol (a Node server, or \
                 handoff::cluster::listen); programs that take LISTEN_FDS need --schedule shared"
            } else {
                ""
            }
        );
        for waiter in self.ready_waiters.drain(..) {
            let _ = waiter.send(Err(PrimaryError::NeverReady(message.clone())));
        }
    }

    fn on_ready(&mut self, id: u32) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        if !matches!(worker.phase, Phase::Starting | Phase::Online) {
            return;
        }
        worker.phase = Phase::Ready;
        let (slot, replaces) = (worker.slot, worker.replaces.take());
        self.emit(Event::Ready { worker: id });
        self.ever_ready = true;
        let holder = self.slots[slot].worker.filter(|&other| other != id && self.workers.get(&other).is_some_and(|w| !w.exited));
        match (replaces, holder) {
            // The replacement is ready: it takes the slot and the old one drains.
            (Some(old), Some(holder)) if holder == old => {
                self.slots[slot].worker = Some(id);
                self.drain(old, self.wedged(old));
            }
            // The slot is empty (the worker it was to replace died meanwhile): it is this one's.
            (_, None) => {
                self.slots[slot].worker = Some(id);
                self.slots[slot].restart_pending = false;
            }
            // Another worker took the slot meanwhile: one too many, this one goes.
            (_, Some(_)) => {
                self.drain(id, false);
            }
        }
        if self.reload.as_ref().and_then(|r| r.current).is_some_and(|(new, _)| new == id) {
            if let Some(reload) = &mut self.reload {
                reload.current = None;
            }
            self.reload_next();
        }
        self.answer_ready_waiters();
    }

    fn wedged(&self, id: u32) -> bool {
        self.workers.get(&id).is_some_and(|w| w.phase == Phase::Wedged)
    }

    fn all_slots_ready(&self) -> bool {
        self.slots.iter().all(|slot| {
            slot.worker.and_then(|id| self.workers.get(&id)).is_some_and(|w| w.phase == Phase::Ready)
        })
    }

    fn answer_ready_waiters(&mut self) {
        if self.all_slots_ready() {
            for waiter in self.ready_waiters.drain(..) {
                let _ = waiter.send(Ok(()));
            }
        }
    }

    /// Asks a worker to finish and go: no more connections; the cluster `disconnect` (a Node
    /// worker closes its servers and exits after its last connection); then SIGTERM after the
    /// drain timeout (at once for a wedged worker: it cannot drain).
    fn drain(&mut self, id: u32, now: bool) {
        let seq = self.next_seq();
        let (drain, kill) = (self.config.drain_timeout, self.config.kill_timeout);
        let Some(worker) = self.workers.get_mut(&id) else { return };
        if worker.leaving {
            return;
        }
        worker.leaving = true;
        worker.leave = Leave::Drained;
        worker.phase = Phase::Draining;
        let sender = worker.sender.clone();
        let control = worker.control.clone();
        if now {
            let _ = control.try_send(libc::SIGKILL);
            return;
        }
        if worker.online {
            tokio::spawn(async move {
                let _ = sender.send_protocol(&Act { cmd: CLUSTER, act: "disconnect", seq }).await;
            });
            self.schedule(Instant::now() + drain, Timer::Terminate(id));
            self.schedule(Instant::now() + drain + kill, Timer::Kill(id));
        } else {
            // It does not speak the cluster protocol (a LISTEN_FDS program): SIGTERM is how such
            // a program is asked to finish, as systemd asks it; SIGKILL after the drain timeout.
            let _ = control.try_send(libc::SIGTERM);
            self.schedule(Instant::now() + drain, Timer::Kill(id));
        }
    }

    // -----------------------------------------------------------------------------------------
    // Inputs
    // -----------------------------------------------------------------------------------------

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Accepted { listener, conns } => {
                for (conn, permit) in conns {
                    self.pending[listener].push_back(Conn { listener, accepted: conn, _permit: permit, refused_by: None });
                }
            }
            Input::FromWorker { worker, message } => self.on_worker_message(worker, message),
            Input::ChannelClosed { worker } => self.on_channel_closed(worker),
            Input::Exited { worker, status } => self.on_exited(worker, status),
        }
    }

    fn on_worker_message(&mut self, id: u32, mut message: crate::channel::Message) {
        if message.internal_cmd() != Some(CLUSTER) {
            if message.internal_cmd().is_none() {
                self.emit(Event::Message { worker: id, json: message.json().to_owned() });
            }
            return;
        }
        let handle = message.take_handle();
        drop(handle); // workers send no handles in the cluster protocol
        match FromWorker::parse_json(message.json()) {
            FromWorker::Online => {
                if let Some(worker) = self.workers.get_mut(&id) {
                    worker.online = true;
                    if worker.phase == Phase::Starting {
                        worker.phase = Phase::Online;
                    }
                }
                self.emit(Event::Online { worker: id });
            }
            FromWorker::QueryServer { seq, query } => self.on_query(id, seq, query),
            FromWorker::Listening { query } => {
                let address = match self.listener_for_existing(&query) {
                    Some(l) => self.listeners[l].listener.addr.to_string(),
                    None => query.key(),
                };
                self.emit(Event::Listening { worker: id, address });
                self.on_ready(id);
            }
            FromWorker::Close { key } => {
                if let Some(worker) = self.workers.get_mut(&id) {
                    worker.servers.retain(|_, k| *k != key);
                }
            }
            FromWorker::ExitedAfterDisconnect { seq } => {
                let reply_seq = self.next_seq();
                if let Some(worker) = self.workers.get_mut(&id) {
                    if !worker.leaving {
                        worker.leaving = true;
                        worker.leave = Leave::OnItsOwn;
                    }
                    let sender = worker.sender.clone();
                    tokio::spawn(async move {
                        let _ = sender.send_protocol(&Ack { cmd: CLUSTER, ack: seq, accepted: None, seq: reply_seq }).await;
                    });
                }
            }
            FromWorker::Reply { ack, accepted } => self.on_accepted(id, ack, accepted.unwrap_or(false)),
            FromWorker::Other => {}
        }
    }

    /// The listener a `listening` message refers to, without binding anything.
    fn listener_for_existing(&self, query: &Query) -> Option<usize> {
        let port = query.port()?;
        self.listeners.iter().position(|l| matches!(&l.listener.addr, BoundAddr::Tcp(a) if i64::from(a.port()) == port))
    }

    fn on_query(&mut self, id: u32, seq: u64, query: Query) {
        let Some(worker) = self.workers.get(&id) else { return };
        // Node's primary ignores the queries of a worker that is leaving.
        if worker.leaving {
            return;
        }
        let sender = worker.sender.clone();
        let key = query.key();
        let reply_seq = self.next_seq();
        let listener = self.listener_for(&query);
        let data = query.data.clone();
        match listener {
            Err(error) => {
                let reply = QueryReply {
                    cmd: CLUSTER,
                    errno: Some(protocol::uv_errno(&error)),
                    key: &key,
                    ack: seq,
                    data: &data,
                    sockname: None,
                    seq: reply_seq,
                };
                let bytes = serde_json::to_value(&reply).unwrap_or(Value::Null);
                tokio::spawn(async move {
                    let _ = sender.send_protocol(&bytes).await;
                });
            }
            Ok(listener) if self.config.schedule == Schedule::Shared => {
                let reply = QueryReply { cmd: CLUSTER, errno: Some(0), key: &key, ack: seq, data: &data, sockname: None, seq: reply_seq };
                let fd = SharedListener(self.listeners[listener].listener.fd.clone());
                let message = serde_json::to_value(&reply).unwrap_or(Value::Null);
                if let Err(e) = sender.try_queue_protocol_handle(&message, fd) {
                    tracing::warn!(worker = id, error = %e.error, "could not send the shared listener");
                }
            }
            Ok(listener) => {
                if let Some(worker) = self.workers.get_mut(&id) {
                    worker.servers.entry(listener).or_insert_with(|| key.clone());
                }
                let sockname = match &self.listeners[listener].listener.addr {
                    BoundAddr::Tcp(addr) => Some(Sockname::of(*addr)),
                    BoundAddr::Unix(_) => None,
                };
                let reply = QueryReply { cmd: CLUSTER, errno: None, key: &key, ack: seq, data: &data, sockname, seq: reply_seq };
                let message = serde_json::to_value(&reply).unwrap_or(Value::Null);
                tokio::spawn(async move {
                    let _ = sender.send_protocol(&message).await;
                });
            }
        }
    }

    /// A worker answered a `newconn`.
    fn on_accepted(&mut self, id: u32, ack: u64, accepted: bool) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        let Some(at) = worker.in_flight.iter().position(|f| f.seq == ack) else { return };
        let flight = worker.in_flight.remove(at).expect("found above");
        if accepted {
            // Ours is closed now: the connection is the worker's.
            worker.handled += 1;
            if let Some(key) = flight.conn.accepted.key {
                self.open.handed(id, key);
            }
            drop(flight);
        } else {
            let mut conn = flight.conn;
            conn.refused_by = Some(id);
            self.redispatched += 1;
            self.emit(Event::Redispatched { worker: id, connections: 1, reason: "refused" });
            self.pending[conn.listener].push_front(conn);
        }
    }

    fn on_channel_closed(&mut self, id: u32) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        worker.channel_open = false;
        // A round-robin worker without its channel gets no connection ever again, yet would hold
        // its slot for as long as it runs: it is replaced as failed.
        let orphaned = worker.online && !worker.exited && !worker.leaving && self.config.schedule == Schedule::RoundRobin;
        self.emit(Event::Disconnected { worker: id });
        self.take_back(id, "worker gone");
        if orphaned {
            tracing::warn!(worker = id, "the worker closed its channel but goes on running: replacing it");
            self.kill_now(id, Leave::Failed);
        }
        self.forget_if_done(id);
    }

    /// Every connection handed to `id` and not accepted goes back to the front of the queue, in
    /// order: that worker will not serve them.
    fn take_back(&mut self, id: u32, reason: &'static str) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        let flights: Vec<InFlight> = worker.in_flight.drain(..).collect();
        if flights.is_empty() {
            return;
        }
        let count = flights.len();
        for flight in flights.into_iter().rev() {
            self.pending[flight.conn.listener].push_front(flight.conn);
        }
        self.redispatched += count as u64;
        self.emit(Event::Redispatched { worker: id, connections: count, reason });
    }

    fn on_exited(&mut self, id: u32, status: Option<std::process::ExitStatus>) {
        use std::os::unix::process::ExitStatusExt;
        let Some(worker) = self.workers.get_mut(&id) else { return };
        worker.exited = true;
        let (code, signal) = (status.and_then(|s| s.code()), status.and_then(|s| s.signal()));
        let leave = worker.leave;
        let expected = matches!(leave, Leave::Drained | Leave::OnItsOwn);
        let (slot, was_ready, uptime) = (worker.slot, worker.phase == Phase::Ready || worker.phase == Phase::Draining, worker.spawned_at.elapsed());
        let channel_open = worker.channel_open;
        self.emit(Event::Exited { worker: id, code, signal, expected });
        let how = match (code, signal) {
            (_, Some(signal)) => format!("signal {signal}"),
            (Some(code), _) => format!("code {code}"),
            _ => "unknown".into(),
        };
        if channel_open {
            self.schedule(Instant::now() + EXIT_GRACE, Timer::ExitGrace(id));
        }
        let serving = self.slots[slot].worker == Some(id);
        // A replacement on its way takes the slot when ready (not a second worker for it).
        let replacement = self.workers.values().any(|w| w.replaces == Some(id) && !w.exited && !w.leaving);
        if serving {
            self.slots[slot].worker = None;
            self.slots[slot].last_exit = Some(how);
            if self.stopping.is_none() && !replacement {
                match leave {
                    // Drained without a replacement: fill the slot again at once.
                    Leave::Drained => self.restart_later(slot, Some(id), Duration::ZERO),
                    // It ran long enough to count as healthy: a fresh run of backoff.
                    Leave::No | Leave::OnItsOwn if was_ready && uptime >= self.config.stable_after => {
                        self.slots[slot].failures = 0;
                        self.slots[slot].crash_loop_reported = false;
                        self.slot_failed(slot, Some(id));
                    }
                    Leave::No | Leave::OnItsOwn | Leave::Failed => self.slot_failed(slot, Some(id)),
                }
            }
        } else if self.workers.get(&id).is_some_and(|w| w.replaces.is_some()) {
            // A replacement died before it was ready.
            self.replacement_failed(id, format!("new worker {id} exited ({how}) before it was ready"));
        }
        self.forget_if_done(id);
    }

    /// A worker that exited and whose channel closed is gone for good.
    fn forget_if_done(&mut self, id: u32) {
        let Some(worker) = self.workers.get(&id) else { return };
        if worker.exited && !worker.channel_open {
            self.open.forget_worker(id);
            self.workers.remove(&id);
            self.order.retain(|w| *w != id);
        }
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::WaitReady(waiter) => {
                if self.stopping.is_some() {
                    let _ = waiter.send(Err(PrimaryError::Stopping));
                } else {
                    self.ready_waiters.push(waiter);
                    self.answer_ready_waiters();
                    self.check_never_ready();
                }
            }
            Request::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Request::Reload(reply) => self.begin_reload(reply),
            Request::Stop { graceful } => self.begin_stop(graceful),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Timers
    // -----------------------------------------------------------------------------------------

    fn on_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            self.on_timer(timer);
        }
    }

    fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::Restart(slot) => {
                if self.slots[slot].worker.is_none() {
                    self.fill_slot(slot);
                } else {
                    self.slots[slot].restart_pending = false;
                }
            }
            Timer::ReadyDeadline(id) => {
                let Some(worker) = self.workers.get(&id) else { return };
                if matches!(worker.phase, Phase::Starting | Phase::Online) && !worker.leaving {
                    let reason = format!(
                        "worker {id} was not ready within {:?}{}",
                        self.config.ready_timeout,
                        if worker.online { "" } else { " and never spoke the cluster protocol" }
                    );
                    tracing::warn!("{reason}");
                    let (slot, serving) = (worker.slot, self.slots[worker.slot].worker == Some(id));
                    if serving {
                        self.slots[slot].last_error = Some(reason);
                        // Kill it: its exit then counts as a failure of the slot.
                        self.kill_now(id, Leave::Failed);
                    } else {
                        self.replacement_failed(id, reason);
                    }
                }
            }
            Timer::SilentReady(id) => {
                if self.workers.get(&id).is_some_and(|w| !w.online && !w.exited) {
                    self.on_ready(id);
                }
            }
            Timer::Terminate(id) => {
                if let Some(worker) = self.workers.get(&id).filter(|w| !w.exited) {
                    let _ = worker.control.try_send(libc::SIGTERM);
                }
            }
            Timer::Kill(id) => {
                if let Some(worker) = self.workers.get(&id).filter(|w| !w.exited) {
                    let _ = worker.control.try_send(libc::SIGKILL);
                }
            }
            Timer::ExitGrace(id) => {
                if let Some(worker) = self.workers.get_mut(&id) {
                    if worker.channel_open {
                        worker.channel_open = false;
                        self.take_back(id, "worker gone");
                        self.forget_if_done(id);
                    }
                }
            }
            Timer::Tick => {
                self.check_wedged();
                self.schedule(Instant::now() + TICK, Timer::Tick);
            }
        }
    }

    /// SIGKILL to the worker's process group; `leave` says what its exit will mean.
    fn kill_now(&mut self, id: u32, leave: Leave) {
        if let Some(worker) = self.workers.get_mut(&id) {
            if !worker.leaving || worker.leave == Leave::OnItsOwn {
                worker.leave = leave;
            }
            worker.leaving = true;
            let _ = worker.control.try_send(libc::SIGKILL);
        }
    }

    /// A worker whose channel has not acknowledged a connection within the accept timeout is
    /// wedged (stopped, or its event loop blocked): it gets no more, and a replacement is started;
    /// once that is ready the wedged one is killed and its connections go to others. A worker
    /// whose channel acknowledged its connections but whose program is slow to `accept` them is
    /// busy, not wedged: it gets no more than `window` and is left to finish.
    fn check_wedged(&mut self) {
        let timeout = self.config.accept_timeout;
        let wedged: Vec<u32> = self
            .workers
            .values_mut()
            .filter(|w| w.phase == Phase::Ready && !w.leaving)
            .filter_map(|w| {
                let stuck = w.in_flight.iter_mut().any(|f| f.since.elapsed() >= timeout && !f.delivery.is_settled());
                stuck.then_some(w.id)
            })
            .collect();
        for id in wedged {
            let Some(worker) = self.workers.get_mut(&id) else { continue };
            worker.phase = Phase::Wedged;
            let slot = worker.slot;
            tracing::warn!(worker = id, "worker did not answer a connection within {timeout:?}: wedged, replacing it");
            self.emit(Event::Wedged { worker: id });
            if self.stopping.is_some() {
                self.kill_now(id, Leave::Drained);
                continue;
            }
            let generation = self.generation;
            if self.spawn_worker(slot, Some(id), generation).is_none() {
                // No replacement possible now: kill it anyway, the slot restarts as after a crash.
                self.kill_now(id, Leave::Failed);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Dispatch (round-robin)
    // -----------------------------------------------------------------------------------------

    /// Hands waiting connections to free workers, in order, round-robin; each listener's queue
    /// on its own, up to the first connection no worker can take now.
    fn dispatch(&mut self) {
        for listener in 0..self.pending.len() {
            while let Some(front) = self.pending[listener].front() {
                let Some(id) = self.pick(listener, front.refused_by) else { break };
                let conn = self.pending[listener].pop_front().expect("looked at above");
                if let Err(conn) = self.hand_over(id, conn) {
                    self.pending[listener].push_front(conn);
                    break;
                }
            }
        }
    }

    /// The next free worker (round-robin) serving `listener`; one that refused the connection
    /// only if no other can take it.
    fn pick(&mut self, listener: usize, avoid: Option<u32>) -> Option<u32> {
        let window = self.config.window;
        let free = |w: &WorkerState| {
            w.phase == Phase::Ready && !w.leaving && w.channel_open && w.servers.contains_key(&listener) && w.in_flight.len() < window
        };
        let count = self.order.len();
        let mut fallback = None;
        for step in 0..count {
            let id = self.order[(self.cursor + step) % count];
            let Some(worker) = self.workers.get(&id) else { continue };
            if !free(worker) {
                continue;
            }
            if Some(id) == avoid {
                fallback = Some(id);
                continue;
            }
            self.cursor = (self.cursor + step + 1) % count;
            return Some(id);
        }
        fallback
    }

    fn hand_over(&mut self, id: u32, conn: Conn) -> Result<(), Conn> {
        let seq = self.next_seq();
        let Some(worker) = self.workers.get_mut(&id) else { return Err(conn) };
        let Some(key) = worker.servers.get(&conn.listener) else { return Err(conn) };
        match worker.sender.try_queue_encoded_protocol_handle(newconn(key, seq), conn.accepted.clone()) {
            // The delivery (the channel's acknowledgement) is not waited for: the worker's
            // `accepted` is what counts, and the channel closing is seen by its reader.
            Ok(delivery) => {
                worker.in_flight.push_back(InFlight { seq, conn, since: Instant::now(), delivery });
                self.dispatched += 1;
                Ok(())
            }
            Err(_) => Err(conn),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Reload and stop
    // -----------------------------------------------------------------------------------------

    fn begin_reload(&mut self, reply: oneshot::Sender<Result<ReloadReport, PrimaryError>>) {
        if self.stopping.is_some() {
            let _ = reply.send(Err(PrimaryError::Stopping));
            return;
        }
        if self.reload.is_some() {
            let _ = reply.send(Err(PrimaryError::ReloadInProgress));
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        self.emit(Event::ReloadStarted { generation });
        self.reload = Some(Reload {
            generation,
            started: Instant::now(),
            remaining: (0..self.slots.len()).collect(),
            current: None,
            waiters: vec![reply],
        });
        self.reload_next();
    }

    /// Starts the replacement for the next slot still on the old generation, or finishes.
    fn reload_next(&mut self) {
        loop {
            let Some(reload) = &mut self.reload else { return };
            if reload.current.is_some() {
                return;
            }
            let Some(slot) = reload.remaining.pop_front() else {
                let reload = self.reload.take().expect("checked above");
                let report = ReloadReport { generation: reload.generation, took: reload.started.elapsed() };
                self.emit(Event::ReloadFinished { generation: report.generation, took: report.took });
                for waiter in reload.waiters {
                    let _ = waiter.send(Ok(report.clone()));
                }
                return;
            };
            let generation = reload.generation;
            let old = self.slots[slot].worker;
            if old.and_then(|id| self.workers.get(&id)).is_some_and(|w| w.generation >= generation) {
                continue; // already new (restarted during the reload)
            }
            match self.spawn_worker(slot, old, generation) {
                Some(new) => {
                    if old.is_none() {
                        self.slots[slot].worker = Some(new);
                        self.slots[slot].restart_pending = false;
                    }
                    if let Some(reload) = &mut self.reload {
                        reload.current = Some((new, old));
                    }
                    return;
                }
                None => {
                    let reason = self.slots[slot].last_error.clone().unwrap_or_default();
                    self.abort_reload(format!("cannot start a new worker: {reason}"));
                    return;
                }
            }
        }
    }

    /// A replacement did not become ready: kill it; during a reload, stop the reload. The worker
    /// it was to replace serves on, unless it is wedged (it cannot serve: killed too, its
    /// connections go to others and its slot restarts as after a crash) or gone (its slot is
    /// empty: restarted as after a crash).
    fn replacement_failed(&mut self, id: u32, reason: String) {
        self.kill_now(id, Leave::Failed);
        let in_reload = self.reload.as_ref().and_then(|r| r.current).is_some_and(|(new, _)| new == id);
        let (slot, replaced) = match self.workers.get_mut(&id) {
            Some(worker) => (worker.slot, worker.replaces.take()),
            None => return,
        };
        if in_reload {
            self.abort_reload(reason);
        }
        if let Some(old) = replaced.filter(|&old| self.wedged(old)) {
            self.kill_now(old, Leave::Failed);
        }
        if self.slots[slot].worker.is_none() && self.stopping.is_none() {
            self.slot_failed(slot, Some(id));
        }
    }

    fn abort_reload(&mut self, reason: String) {
        let Some(reload) = self.reload.take() else { return };
        tracing::warn!("reload aborted: {reason}");
        self.emit(Event::ReloadAborted { reason: reason.clone() });
        for waiter in reload.waiters {
            let _ = waiter.send(Err(PrimaryError::ReloadAborted(reason.clone())));
        }
    }

    fn begin_stop(&mut self, graceful: bool) {
        match &mut self.stopping {
            Some(stopping) if stopping.graceful && !graceful => stopping.graceful = false,
            Some(_) => {}
            None => {
                self.stopping = Some(Stopping { graceful });
                self.emit(Event::Stopping);
                self.abort_reload("the primary is stopping".into());
                // Stop accepting; what was accepted is still handed out while workers are there.
                for listener in &mut self.listeners {
                    if let Some(task) = listener.accepting.take() {
                        task.abort();
                    }
                }
            }
        }
        let ids: Vec<u32> = self.workers.keys().copied().collect();
        for id in ids {
            if graceful {
                self.drain(id, false);
            } else {
                self.kill_now(id, Leave::Drained);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Status
    // -----------------------------------------------------------------------------------------

    fn status(&self) -> Status {
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .values()
            .filter(|w| !w.exited)
            .map(|w| WorkerStatus {
                id: w.id,
                pid: w.pid,
                generation: w.generation,
                state: match (w.phase, w.leaving) {
                    (_, true) if w.phase != Phase::Draining => "exiting",
                    (Phase::Starting, _) => "starting",
                    (Phase::Online, _) => "online",
                    (Phase::Ready, _) => "ready",
                    (Phase::Wedged, _) => "wedged",
                    (Phase::Draining, _) => "draining",
                },
                connections_open: None,
                connections_handled: w.handled,
                restarts: self.slots.get(w.slot).map_or(0, |s| s.restarts),
                last_exit: self.slots.get(w.slot).and_then(|s| s.last_exit.clone()),
                uptime: w.spawned_at.elapsed(),
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        Status {
            generation: self.generation,
            listeners: self.listeners.iter().map(|l| l.listener.addr.to_string()).collect(),
            schedule: match self.config.schedule {
                Schedule::RoundRobin => "rr",
                Schedule::Shared => "shared",
            },
            workers,
            desired_workers: self.slots.len(),
            pending_connections: self.pending.iter().map(VecDeque::len).sum(),
            reloading: self.reload.is_some(),
            stopping: self.stopping.is_some(),
            connections_dispatched: self.dispatched,
            connections_redispatched: self.redispatched,
            connections_dropped: self.dropped,
        }
    }
}

/// `LISTEN_FDNAMES` entry for a listener.
fn listener_name(index: usize, addr: &BoundAddr) -> String {
    match addr {
        BoundAddr::Tcp(addr) => format!("tcp-{}", addr.port()),
        BoundAddr::Unix(_) => format!("unix-{index}"),
    }
}

/// Sends `signal` to the worker's process group (it is its group's leader).
fn signal_group(pid: u32, signal: i32) {
    let (Some(pid), Some(signal)) = (
        rustix::process::Pid::from_raw(pid as i32),
        rustix::process::Signal::from_named_raw(signal),
    ) else {
        return;
    };
    if rustix::process::kill_process_group(pid, signal).is_err() {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}


