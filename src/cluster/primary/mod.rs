//! The cluster primary: owns the listening sockets and spreads their connections over worker
//! processes, which may be unchanged Node apps (`net`/`http` servers), Rust programs using
//! [`cluster::listen`](crate::cluster::listen), or — in shared mode — any program that takes
//! its listeners from `LISTEN_FDS`.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
//! use handoff::cluster::{Primary, Schedule};
//! let primary = Primary::builder("node")
//!     .arg("server.js") // calls http.createServer(...).listen(process.env.PORT)
//!     .workers(4)
//!     .listen("127.0.0.1:8080".parse()?)
//!     .schedule(Schedule::RoundRobin)
//!     .start()
//!     .await?;
//! primary.wait_ready().await?;
//! primary.reload().await?; // rolling, gated: the old generation serves until the new is ready
//! primary.stop().await; // drain: stop handing out, ask workers to finish, then signal them
//! # Ok(()) }
//! ```
//!
//! # What it guarantees
//! - **No connection is dropped by the primary.** In round-robin mode it keeps its own copy of
//!   each connection until a worker answers `accepted`; a refusal, the worker's death or its
//!   channel closing gives the same connection to another worker. A connection a worker accepted
//!   is that worker's. With no worker able to take connections, they wait (up to
//!   [`PrimaryBuilder::max_pending`], then in the kernel's backlog).
//! - **The listener outlives every worker**: it is closed only when the primary stops, so a
//!   client never sees a refused connection while the primary runs.
//! - **Crashes restart with backoff**, doubling from [`PrimaryBuilder::restart_delay`] to
//!   [`PrimaryBuilder::max_restart_delay`] and reset after [`PrimaryBuilder::stable_after`] of
//!   uptime; five quick failures in a row are reported as a crash loop.
//! - **Reloads are gated**: a new worker must be ready ([`Event::Ready`]: it reported
//!   `listening`) before an old one is drained; if it crashes or is not ready in time, the reload
//!   stops, the old workers keep serving, and [`Primary::reload`] says why.
//! - **Stopping drains**: no new connections are handed out, each worker gets the cluster
//!   protocol's `disconnect` (a Node worker then closes its servers and exits after its last
//!   connection, with no shutdown code of its own), then after the drain timeout `SIGTERM`, then
//!   `SIGKILL` to its process group.

mod counts;
mod listeners;
mod output;
mod supervisor;

use std::ffi::{OsStr, OsString};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use listeners::BoundAddr;
pub(crate) use listeners::{Accepted, Permit};

/// How connections are spread over workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// The primary accepts and hands each connection to the next free worker (Node's default,
    /// `SCHED_RR`).
    #[default]
    RoundRobin,
    /// Every worker gets the listening socket itself and accepts on it; the kernel spreads the
    /// connections (Node's `SCHED_NONE`). Workers that do not speak the cluster protocol find
    /// the listeners at descriptors 3.. with `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`
    /// set, as systemd passes them.
    Shared,
}

/// An address the primary listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address; port 0 picks a free one.
    Tcp(SocketAddr),
    /// A Unix socket path (an existing socket file there is replaced).
    Unix(PathBuf),
}

/// A string that is not a [`ListenAddr`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0:?} is not an address to listen on; use HOST:PORT (127.0.0.1:8080, [::1]:8080), PORT, or unix:/path")]
pub struct ParseListenAddrError(String);

impl std::str::FromStr for ListenAddr {
    type Err = ParseListenAddrError;
    /// `HOST:PORT` (`127.0.0.1:8080`, `[::1]:8080`), `PORT` alone (on 127.0.0.1), or
    /// `unix:/path`.
    fn from_str(text: &str) -> Result<ListenAddr, ParseListenAddrError> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(port) = text.parse::<u16>() {
            return Ok(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        text.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| ParseListenAddrError(text.to_owned()))
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> ListenAddr {
        ListenAddr::Tcp(addr)
    }
}

/// How worker output reaches the primary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerOutput {
    /// Workers write to the primary's stdout and stderr directly.
    #[default]
    Inherit,
    /// Each line a worker writes is copied to the primary's stdout or stderr prefixed with
    /// `[worker N] ` (lines longer than 64 KiB are split).
    Prefixed,
}

/// Settings for a [`Primary`]; see [`Primary::builder`].
#[derive(Debug, Clone)]
pub struct PrimaryBuilder {
    pub(crate) program: OsString,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) current_dir: Option<PathBuf>,
    pub(crate) workers: usize,
    pub(crate) listen: Vec<ListenAddr>,
    pub(crate) inherited: Vec<(String, std::sync::Arc<std::os::fd::OwnedFd>)>,
    pub(crate) schedule: Schedule,
    pub(crate) ready_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) kill_timeout: Duration,
    pub(crate) accept_timeout: Duration,
    pub(crate) restart_delay: Duration,
    pub(crate) max_restart_delay: Duration,
    pub(crate) stable_after: Duration,
    pub(crate) max_pending: usize,
    pub(crate) window: usize,
    pub(crate) output: WorkerOutput,
    pub(crate) silent_ready_after: Duration,
}

impl PrimaryBuilder {
    /// Adds an argument for the worker command.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }
    /// Adds arguments for the worker command.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }
    /// Sets an environment variable for the workers.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }
    /// The workers' working directory.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }
    /// How many workers serve at once (default: one per CPU).
    pub fn workers(mut self, count: usize) -> Self {
        self.workers = count;
        self
    }
    /// Listens on `addr` (more than once for several listeners). Workers get `PORT` and `HOST`
    /// from the first one (for a Unix path, `PORT` is the path), so `listen(process.env.PORT)`
    /// works. An address a worker asks for that is not one of these is bound on demand, as
    /// Node's primary does.
    pub fn listen(mut self, addr: ListenAddr) -> Self {
        self.listen.push(addr);
        self
    }
    /// Uses a socket that is already listening (from systemd's `LISTEN_FDS`, say), under `name`.
    pub fn listener(mut self, name: impl Into<String>, fd: std::os::fd::OwnedFd) -> Self {
        self.inherited.push((name.into(), std::sync::Arc::new(fd)));
        self
    }
    /// Round-robin (default) or shared.
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }
    /// How long a new worker may take to be ready (report `listening`) before it counts as
    /// failed (default 30 s).
    pub fn ready_timeout(mut self, time: Duration) -> Self {
        self.ready_timeout = time.min(MAX_DURATION);
        self
    }
    /// How long a draining worker may take to finish its connections and exit before it gets
    /// `SIGTERM` (default 30 s).
    pub fn drain_timeout(mut self, time: Duration) -> Self {
        self.drain_timeout = time.min(MAX_DURATION);
        self
    }
    /// How long after `SIGTERM` a worker gets `SIGKILL` (its whole process group; default 5 s).
    pub fn kill_timeout(mut self, time: Duration) -> Self {
        self.kill_timeout = time.min(MAX_DURATION);
        self
    }
    /// How long a worker's channel may take to acknowledge a connection it was handed before the
    /// worker is reported wedged (stopped, or its event loop blocked) and replaced (default
    /// 10 s). A worker whose channel acknowledges but whose program is slow to accept is busy,
    /// not wedged: it gets at most [`window`](PrimaryBuilder::window) connections meanwhile.
    pub fn accept_timeout(mut self, time: Duration) -> Self {
        self.accept_timeout = time.min(MAX_DURATION);
        self
    }
    /// First delay before restarting a crashed worker (default 100 ms); doubles with each quick
    /// failure.
    pub fn restart_delay(mut self, time: Duration) -> Self {
        self.restart_delay = time.min(MAX_DURATION);
        self
    }
    /// Longest delay between restarts (default 10 s).
    pub fn max_restart_delay(mut self, time: Duration) -> Self {
        self.max_restart_delay = time.min(MAX_DURATION);
        self
    }
    /// Uptime after which a worker's exit no longer counts as a quick failure (default 10 s).
    pub fn stable_after(mut self, time: Duration) -> Self {
        self.stable_after = time.min(MAX_DURATION);
        self
    }
    /// Connections accepted on one listener and waiting for a worker, at most (default 1024);
    /// past that the primary stops accepting there and clients wait in the kernel's backlog.
    pub fn max_pending(mut self, connections: usize) -> Self {
        self.max_pending = connections.max(1);
        self
    }
    /// Connections handed to one worker and not yet answered, at most (default 4; Node's own
    /// primary uses 1).
    pub fn window(mut self, connections: usize) -> Self {
        self.window = connections.max(1);
        self
    }
    /// How worker output is passed on.
    pub fn output(mut self, output: WorkerOutput) -> Self {
        self.output = output;
        self
    }
    /// In shared mode, a worker that never speaks the cluster protocol (a `LISTEN_FDS` program)
    /// counts as ready once it has run this long (default 1 s).
    pub fn silent_ready_after(mut self, time: Duration) -> Self {
        self.silent_ready_after = time.min(MAX_DURATION);
        self
    }

    /// Binds the listeners, starts the workers and returns the running primary. Workers become
    /// ready in the background: see [`Primary::wait_ready`].
    pub async fn start(self) -> Result<Primary, PrimaryError> {
        supervisor::start(self).await
    }
}

/// What happened to a worker, or to the cluster.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was started.
    Spawned {
        /// Its id (`NODE_UNIQUE_ID`), from 1, never reused.
        worker: u32,
        /// Its process id.
        pid: u32,
        /// The generation it belongs to (1, then one more per reload).
        generation: u64,
    },
    /// The worker speaks the cluster protocol (`online`).
    Online {
        /// The worker.
        worker: u32,
    },
    /// The worker listens on `address` (`listening`).
    Listening {
        /// The worker.
        worker: u32,
        /// What it listens on, as the primary serves it.
        address: String,
    },
    /// The worker takes connections (its first `listening`, or a silent shared-mode worker's
    /// grace period).
    Ready {
        /// The worker.
        worker: u32,
    },
    /// The worker's channel closed.
    Disconnected {
        /// The worker.
        worker: u32,
    },
    /// The worker process exited.
    Exited {
        /// The worker.
        worker: u32,
        /// Its exit code, if it exited normally.
        code: Option<i32>,
        /// The signal that ended it, if any.
        signal: Option<i32>,
        /// Whether the primary asked it to go (drain, reload, stop) or it left on its own
        /// initiative (`exitedAfterDisconnect`).
        expected: bool,
    },
    /// A worker slot will be filled again after `delay`.
    Restarting {
        /// The worker that exited.
        worker: u32,
        /// How long until the new one starts.
        delay: Duration,
    },
    /// A slot's workers keep failing quickly; restarts go on at the longest delay.
    CrashLoop {
        /// The last worker that failed.
        worker: u32,
        /// Quick failures in a row.
        failures: u32,
    },
    /// A worker's channel did not acknowledge a connection within the accept timeout; it is
    /// being replaced.
    Wedged {
        /// The worker.
        worker: u32,
    },
    /// Connections given to a worker went to others instead.
    Redispatched {
        /// The worker they had been given to.
        worker: u32,
        /// How many.
        connections: usize,
        /// Why: `refused`, `worker gone`, `wedged`.
        reason: &'static str,
    },
    /// A rolling reload started (new workers get `generation`).
    ReloadStarted {
        /// The new generation.
        generation: u64,
    },
    /// A rolling reload finished: every slot serves with the new generation.
    ReloadFinished {
        /// The new generation.
        generation: u64,
        /// How long it took.
        took: Duration,
    },
    /// A rolling reload stopped; the workers not yet replaced keep serving.
    ReloadAborted {
        /// Why.
        reason: String,
    },
    /// A message a worker sent with `process.send` (not the cluster protocol).
    Message {
        /// The worker.
        worker: u32,
        /// The message as JSON text.
        json: String,
    },
    /// The primary is stopping: no new connections are handed out, workers drain.
    Stopping,
    /// Every worker has exited; the primary has stopped.
    Stopped,
}

/// Every timeout and delay of [`PrimaryBuilder`] is cut to this (a year): longer ones mean
/// "never" in practice, and a deadline must stay a time the clock can hold.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// How many lifecycle events a subscriber may fall behind before it loses the oldest.
pub const EVENTS: usize = 1024;

/// A worker as [`Primary::status`] reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WorkerStatus {
    /// Its id.
    pub id: u32,
    /// Its process id.
    pub pid: u32,
    /// Its generation.
    pub generation: u64,
    /// `starting`, `online`, `ready`, `wedged`, `draining` or `exiting`.
    pub state: &'static str,
    /// Connections it accepted and some process still holds open, when the primary can tell:
    /// round-robin (the primary knows which sockets it handed; the kernel's socket diagnostics
    /// say which are still held, one lookup per socket, no scan of the worker's descriptors).
    /// `None` in shared mode, where the kernel hands connections out unseen.
    pub connections_open: Option<u64>,
    /// Connections it accepted in all.
    pub connections_handled: u64,
    /// Restarts of its slot so far.
    pub restarts: u64,
    /// How the previous worker of its slot exited (`code 1`, `signal 9`).
    pub last_exit: Option<String>,
    /// How long it has run.
    pub uptime: Duration,
}

/// The cluster as [`Primary::status`] reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Status {
    /// The current generation.
    pub generation: u64,
    /// The listeners.
    pub listeners: Vec<String>,
    /// The scheduling mode (`rr` or `shared`).
    pub schedule: &'static str,
    /// Live workers.
    pub workers: Vec<WorkerStatus>,
    /// Workers the primary aims to keep serving.
    pub desired_workers: usize,
    /// Connections accepted and waiting for a worker.
    pub pending_connections: usize,
    /// Whether a reload is in progress.
    pub reloading: bool,
    /// Whether the primary is stopping.
    pub stopping: bool,
    /// Connections handed out in all.
    pub connections_dispatched: u64,
    /// Connections given to another worker after a refusal, a death or a wedge.
    pub connections_redispatched: u64,
    /// Connections the primary had to close without a worker taking them (only when stopping
    /// with no worker left).
    pub connections_dropped: u64,
}

/// A completed rolling reload.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadReport {
    /// The generation now serving.
    pub generation: u64,
    /// How long it took.
    pub took: Duration,
}

/// Why the primary could not start, or a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrimaryError {
    /// A setting is impossible (`--workers 0`, no listener).
    #[error("{0}")]
    Config(String),
    /// The worker command cannot be started.
    #[error("cannot start the worker command {program:?}: {source}")]
    Spawn {
        /// The program.
        program: OsString,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A listener could not be bound.
    #[error(transparent)]
    Listen(io::Error),
    /// No worker ever became ready: each failed again and again at start.
    #[error("no worker became ready: {0}")]
    NeverReady(String),
    /// A reload is already running.
    #[error("a reload is already in progress; wait for it to finish")]
    ReloadInProgress,
    /// The reload stopped; the workers not yet replaced keep serving.
    #[error("the reload was aborted and the previous workers keep serving: {0}")]
    ReloadAborted(String),
    /// The primary is stopping or has stopped.
    #[error("the primary is stopping")]
    Stopping,
}

/// A running cluster primary. See the [module docs](self).
#[derive(Debug)]
pub struct Primary {
    requests: mpsc::Sender<supervisor::Request>,
    events: broadcast::Sender<Event>,
    /// Subscribed at start, so the first [`Primary::events`] misses nothing.
    first_events: std::sync::Mutex<Option<broadcast::Receiver<Event>>>,
    addrs: Vec<BoundAddr>,
    stopped: watch::Receiver<bool>,
    open: counts::OpenConnections,
}

impl Primary {
    /// Settings for a primary running `program` as its workers.
    pub fn builder(program: impl AsRef<OsStr>) -> PrimaryBuilder {
        PrimaryBuilder {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            listen: Vec::new(),
            inherited: Vec::new(),
            schedule: Schedule::RoundRobin,
            ready_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            kill_timeout: Duration::from_secs(5),
            accept_timeout: Duration::from_secs(10),
            restart_delay: Duration::from_millis(100),
            max_restart_delay: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
            max_pending: 1024,
            window: 4,
            output: WorkerOutput::Inherit,
            silent_ready_after: Duration::from_secs(1),
        }
    }

    /// The addresses it listens on, in the order given.
    pub fn local_addrs(&self) -> &[BoundAddr] {
        &self.addrs
    }

    /// Lifecycle events. The first call sees every event since [`PrimaryBuilder::start`] (the
    /// first workers' `Spawned` included); later calls see events from then on. A subscriber
    /// that falls more than [`EVENTS`] events behind loses the oldest (`Lagged`).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        let first = self.first_events.lock().unwrap_or_else(|p| p.into_inner()).take();
        first.unwrap_or_else(|| self.events.subscribe())
    }

    /// Waits until every worker slot has a ready worker, or fails when no worker ever became
    /// ready (each slot failed at start five times in a row).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait_ready(&self) -> Result<(), PrimaryError> {
        let (tx, rx) = oneshot::channel();
        self.request(supervisor::Request::WaitReady(tx)).await?;
        rx.await.unwrap_or(Err(PrimaryError::Stopping))
    }

    /// The workers and counters now.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn status(&self) -> Result<Status, PrimaryError> {
        let (tx, rx) = oneshot::channel();
        self.request(supervisor::Request::Status(tx)).await?;
        let mut status = rx.await.map_err(|_| PrimaryError::Stopping)?;
        if status.schedule == "rr" {
            if let Some(open) = self.open.count().await {
                for worker in &mut status.workers {
                    worker.connections_open = Some(open.get(&worker.id).copied().unwrap_or(0));
                }
            }
        }
        Ok(status)
    }

    /// A rolling reload: for each worker, start a new one, wait until it is ready, then drain the
    /// old one. Resolves when every slot serves with the new generation, or with the reason it
    /// stopped (the old workers then keep serving). One at a time: a second request fails with
    /// [`PrimaryError::ReloadInProgress`].
    ///
    /// # Cancel safety
    /// The reload goes on if the future is dropped.
    pub async fn reload(&self) -> Result<ReloadReport, PrimaryError> {
        let (tx, rx) = oneshot::channel();
        self.request(supervisor::Request::Reload(tx)).await?;
        rx.await.unwrap_or(Err(PrimaryError::Stopping))
    }

    /// Stops gracefully (see the module docs) and resolves once every worker has exited.
    /// Calling it again, or while stopping, waits for the same end.
    ///
    /// # Cancel safety
    /// The stop goes on if the future is dropped.
    pub async fn stop(&self) {
        let _ = self.requests.send(supervisor::Request::Stop { graceful: true }).await;
        self.stopped().await;
    }

    /// Stops at once: every worker's process group gets `SIGKILL`.
    ///
    /// # Cancel safety
    /// The stop goes on if the future is dropped.
    pub async fn kill(&self) {
        let _ = self.requests.send(supervisor::Request::Stop { graceful: false }).await;
        self.stopped().await;
    }

    /// Resolves once the primary has stopped (after [`stop`](Primary::stop) or
    /// [`kill`](Primary::kill)).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn stopped(&self) {
        let mut stopped = self.stopped.clone();
        let _ = stopped.wait_for(|s| *s).await;
    }

    async fn request(&self, request: supervisor::Request) -> Result<(), PrimaryError> {
        self.requests.send(request).await.map_err(|_| PrimaryError::Stopping)
    }
}

/// Messages from the primary's tasks to its supervisor.
pub(crate) enum Input {
    /// Connections accepted on `listener`, oldest first, each with its place in the budget.
    Accepted { listener: usize, conns: Vec<(Accepted, Permit)> },
    FromWorker { worker: u32, message: crate::channel::Message },
    ChannelClosed { worker: u32 },
    Exited { worker: u32, status: Option<std::process::ExitStatus> },
}
