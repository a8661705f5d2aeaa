//! Processes with a channel: spawning a child that has one ([`Command`]), and finding the one a
//! parent gave us ([`parent_channel`]).
//!
//! The protocol (doc §1): the parent creates an `AF_UNIX` stream socket pair, keeps one end, and
//! installs the other in the child at descriptor `N` (3 unless told otherwise), advertised as
//! `NODE_CHANNEL_FD=N` with `NODE_CHANNEL_SERIALIZATION_MODE=json`. The child takes the
//! descriptor, makes it close-on-exec, and removes both variables so its own children do not
//! attach to its channel.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, RawFd};
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use crate::channel::{Channel, ChannelConfig, Message, Receiver, RecvError, Sender};
use crate::sys;

/// The environment variable naming the child's channel descriptor.
pub const CHANNEL_FD_ENV: &str = "NODE_CHANNEL_FD";
/// The environment variable naming the serialization (`json` or `advanced`).
pub const SERIALIZATION_ENV: &str = "NODE_CHANNEL_SERIALIZATION_MODE";
/// The environment variable by which Node's cluster primary tells a worker its id. A process
/// that inherits it believes it is a cluster worker, so it is never passed on: [`Command`] removes
/// it from a child's environment (set it explicitly to start a worker), and [`parent_channel`]
/// removes it from this process's, as a Node worker does once it has read it.
pub const WORKER_ID_ENV: &str = "NODE_UNIQUE_ID";

/// The `NODE_UNIQUE_ID` this process was started with, taken by [`parent_channel`].
static WORKER_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The cluster worker id (`NODE_UNIQUE_ID`) this process was started with, once
/// [`parent_channel`] has taken it from the environment.
pub fn worker_id() -> Option<&'static str> {
    WORKER_ID.get().map(String::as_str)
}

/// A builder for a child process with an IPC channel, in the manner of
/// [`tokio::process::Command`] (and of Node's `child_process.fork`).
///
/// # Examples
/// ```no_run
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// let mut child = handoff::Command::new("node").arg("child.js").spawn()?;
/// child.send(&serde_json::json!({"hello": "child"})).await.unwrap();
/// if let Some(Ok(reply)) = child.recv().await {
///     println!("child said {}", reply.json());
/// }
/// child.disconnect();
/// let status = child.wait().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Command {
    inner: tokio::process::Command,
    /// The program, for error messages.
    program: std::ffi::OsString,
    slot: sys::ExecFds,
    /// Descriptors to pass at fixed numbers (listeners, systemd style), with the number each
    /// gets.
    passed: Vec<(std::sync::Arc<std::os::fd::OwnedFd>, RawFd)>,
    channel_fd: RawFd,
    config: ChannelConfig,
}

impl Command {
    /// A command running `program`, with the channel at descriptor 3 and stdio inherited.
    /// `NODE_UNIQUE_ID` is not inherited (see [`WORKER_ID_ENV`]).
    pub fn new(program: impl AsRef<OsStr>) -> Command {
        let program = program.as_ref().to_owned();
        let mut inner = tokio::process::Command::new(&program);
        inner.env_remove(WORKER_ID_ENV);
        let slot = sys::ExecFds::register(&mut inner);
        Command { inner, program, slot, passed: Vec::new(), channel_fd: 3, config: ChannelConfig::default() }
    }

    /// `node script`: a Node child, as `child_process.fork(script)` starts it.
    pub fn node(script: impl AsRef<Path>) -> Command {
        let mut command = Command::new("node");
        command.arg(script.as_ref());
        command
    }

    /// Adds an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Command {
        self.inner.arg(arg);
        self
    }
    /// Adds arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.args(args);
        self
    }
    /// Sets an environment variable.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Command {
        self.inner.env(key, value);
        self
    }
    /// Removes an environment variable.
    pub fn env_remove(&mut self, key: impl AsRef<OsStr>) -> &mut Command {
        self.inner.env_remove(key);
        self
    }
    /// Sets the working directory.
    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Command {
        self.inner.current_dir(dir);
        self
    }
    /// Configures the child's standard input.
    pub fn stdin(&mut self, cfg: impl Into<Stdio>) -> &mut Command {
        self.inner.stdin(cfg);
        self
    }
    /// Configures the child's standard output.
    pub fn stdout(&mut self, cfg: impl Into<Stdio>) -> &mut Command {
        self.inner.stdout(cfg);
        self
    }
    /// Configures the child's standard error.
    pub fn stderr(&mut self, cfg: impl Into<Stdio>) -> &mut Command {
        self.inner.stderr(cfg);
        self
    }
    /// Kills the child when its [`Child`] is dropped.
    pub fn kill_on_drop(&mut self, kill: bool) -> &mut Command {
        self.inner.kill_on_drop(kill);
        self
    }
    /// The descriptor number the child finds its channel at (default 3; Node accepts any, and a
    /// `stdio` index such as 0 or 1 replaces that stream).
    pub fn channel_fd(&mut self, fd: RawFd) -> &mut Command {
        self.channel_fd = fd;
        self
    }
    /// Passes `fd` to the child at descriptor number `number` (as systemd passes listeners). The
    /// channel must be put at another number ([`channel_fd`](Command::channel_fd)).
    pub(crate) fn pass_fd(&mut self, fd: std::sync::Arc<std::os::fd::OwnedFd>, number: RawFd) -> &mut Command {
        self.passed.push((fd, number));
        self
    }
    /// Settings for the parent's end of the channel.
    pub fn channel_config(&mut self, config: ChannelConfig) -> &mut Command {
        self.config = config;
        self
    }
    /// The underlying tokio command, for anything not covered here.
    pub fn as_tokio_mut(&mut self) -> &mut tokio::process::Command {
        &mut self.inner
    }

    /// Starts the child with its channel. Must be called inside a tokio runtime.
    ///
    /// A failure names the program (`cannot spawn "no-such-cmd": No such file or directory`),
    /// keeps the [`io::ErrorKind`], and has the system's error as its source.
    pub fn spawn(&mut self) -> io::Result<Child> {
        if self.channel_fd < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "channel_fd must not be negative"));
        }
        let (ours, theirs) = sys::stream_socketpair()?;
        // In a process started with 0-2 closed the pair lands there, where std's stdio set-up in
        // the child would overwrite the channel end before it is moved into place.
        let (ours, theirs) = (sys::above_stdio(ours)?, sys::above_stdio(theirs)?);
        // The child end is put in place by dup2, which clears O_NONBLOCK nowhere: a Node child
        // expects a blocking descriptor and sets its own flags (protocol doc §1.3).
        sys::set_nonblocking(theirs.as_fd(), false)?;
        // Reserve the target numbers here while spawning, so std's exec-error pipe cannot land
        // on one and be overwritten in the child.
        let mut _reserved = Vec::new();
        let targets = std::iter::once(self.channel_fd).chain(self.passed.iter().map(|(_, n)| *n));
        for target in targets.filter(|n| *n > 2) {
            if let Ok(fd) = sys::reserve_fd_number(theirs.as_fd(), target) {
                _reserved.push(fd);
            }
        }
        self.inner
            .env(CHANNEL_FD_ENV, self.channel_fd.to_string())
            .env(SERIALIZATION_ENV, "json");
        let mut pairs = vec![(theirs.as_fd(), self.channel_fd)];
        pairs.extend(self.passed.iter().map(|(fd, n)| (fd.as_fd(), *n)));
        self.slot.set(&pairs)?;
        let spawned = self.inner.spawn();
        self.slot.clear();
        drop(theirs);
        let process = spawned.map_err(|source| {
            io::Error::new(source.kind(), SpawnError { program: self.program.clone(), source })
        })?;
        let (sender, receiver) = Channel::with_config(ours, self.config.clone())?.split();
        if let Some(pid) = process.id() {
            sender.set_peer(format!("child process {pid}"));
        }
        Ok(Child { process, sender, receiver: Some(receiver) })
    }
}

/// Why a child could not be started: the program, and what the system said.
#[derive(Debug, thiserror::Error)]
#[error("cannot spawn {program:?}: {source}")]
struct SpawnError {
    program: std::ffi::OsString,
    #[source]
    source: io::Error,
}

/// A running child process and the parent's end of its channel.
///
/// It is the channel's [`Sender`] (it derefs to one: `send`, `send_handle`, `queue_handle`,
/// `flush`, `internal_messages`, `peer`, `disconnect`, ...), plus the receiving side
/// ([`recv`](Child::recv), or [`take_receiver`](Child::take_receiver) to receive in another
/// task) and control of the process ([`wait`](Child::wait), [`kill`](Child::kill), ...). To send
/// from other tasks, clone the sender: `child.sender().clone()`.
///
/// Once the process is known to have exited ([`wait`](Child::wait), [`try_wait`](Child::try_wait)
/// or [`kill`](Child::kill) saw it), the channel refuses new sends
/// ([`SendError::Closed`](crate::SendError::Closed)): nobody will read them. What the child sent
/// before it exited can still be received.
#[derive(Debug)]
pub struct Child {
    process: tokio::process::Child,
    sender: Sender,
    receiver: Option<Receiver>,
}

impl std::ops::Deref for Child {
    type Target = Sender;
    fn deref(&self) -> &Sender {
        &self.sender
    }
}

impl Child {
    /// The child's process id, until it has been waited for.
    pub fn id(&self) -> Option<u32> {
        self.process.id()
    }
    /// The channel's sending half (clone it to send from elsewhere).
    pub fn sender(&self) -> &Sender {
        &self.sender
    }
    /// The next message from the child; see [`Receiver::recv`]. `None` once the channel has
    /// closed and everything was taken, or if the receiver was taken
    /// ([`take_receiver`](Child::take_receiver)).
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Receiver::recv`].
    pub async fn recv(&mut self) -> Option<Result<Message, RecvError>> {
        self.receiver.as_mut()?.recv().await
    }
    /// The next message parsed as `T`; see [`Receiver::recv_as`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Receiver::recv`].
    pub async fn recv_as<T: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Option<Result<(T, Option<crate::handle::ReceivedHandle>), RecvError>> {
        self.receiver.as_mut()?.recv_as().await
    }
    /// The receiving half, to receive in another task while this one keeps control of the
    /// process (as `tokio::process::Child::stdout.take()`). `None` if already taken.
    pub fn take_receiver(&mut self) -> Option<Receiver> {
        self.receiver.take()
    }
    /// The receiving half, if not taken.
    pub fn receiver(&mut self) -> Option<&mut Receiver> {
        self.receiver.as_mut()
    }
    /// Waits for the child to exit. From then on the channel refuses new sends.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`tokio::process::Child::wait`].
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.process.wait().await?;
        self.sender.peer_exited();
        Ok(status)
    }
    /// The exit status, if the child has exited (the channel then refuses new sends).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let status = self.process.try_wait()?;
        if status.is_some() {
            self.sender.peer_exited();
        }
        Ok(status)
    }
    /// Sends `SIGKILL` and waits for the child to exit (the channel then refuses new sends).
    ///
    /// # Cancel safety
    /// Cancel safe, as [`tokio::process::Child::kill`].
    pub async fn kill(&mut self) -> io::Result<()> {
        self.process.kill().await?;
        self.sender.peer_exited();
        Ok(())
    }
    /// Sends `SIGKILL` without waiting.
    pub fn start_kill(&mut self) -> io::Result<()> {
        self.process.start_kill()
    }
    /// The tokio child, for its stdio pipes.
    pub fn process_mut(&mut self) -> &mut tokio::process::Child {
        &mut self.process
    }
    /// The tokio child (for its stdio pipes), the sender, and the receiver unless it was taken.
    pub fn into_parts(self) -> (tokio::process::Child, Sender, Option<Receiver>) {
        (self.process, self.sender, self.receiver)
    }
}

/// The channel this process's parent opened for it, if it was started with one
/// (`NODE_CHANNEL_FD` set) — by a handoff parent, Node's `child_process.fork`, or
/// `spawn(..., {stdio: [..., 'ipc']})`. `Ok(None)` when there is none.
///
/// Removes `NODE_CHANNEL_FD` and `NODE_CHANNEL_SERIALIZATION_MODE` from the environment, so
/// children this process starts do not attach to its channel, and `NODE_UNIQUE_ID` (kept for
/// [`worker_id`]), so they do not believe they are cluster workers. Call it early, before other
/// threads read the environment. Use [`parent_channel_with_config`] to set the child's end (for
/// instance the same [`ChannelConfig::handle_window`] as the parent's).
///
/// # Errors, and what a failure leaves behind
/// - Called outside a tokio runtime: nothing is taken or changed; call it again inside one.
/// - `NODE_CHANNEL_FD` is not a number, or names a descriptor that is not open, not an
///   inherited `AF_UNIX` stream socket (one this process opened itself is refused, and left to
///   its owner), or the parent asked for `advanced` serialization (not supported yet: only
///   `json`): the variables have been removed, and a descriptor that was adopted is closed.
///
/// Once it has run, with success or one of these errors, the variables are gone: a second call
/// returns `Ok(None)`.
pub fn parent_channel() -> io::Result<Option<Channel>> {
    parent_channel_with_config(ChannelConfig::default())
}

/// Like [`parent_channel`], with `config`.
pub fn parent_channel_with_config(config: ChannelConfig) -> io::Result<Option<Channel>> {
    let Some(fd_text) = std::env::var_os(CHANNEL_FD_ENV) else {
        return Ok(None);
    };
    // Checked before anything is taken: without a runtime the channel could not be driven, and
    // adopting the descriptor first would lose it for good.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other("parent_channel must be called inside a tokio runtime"));
    }
    let mode = std::env::var_os(SERIALIZATION_ENV);
    sys::remove_env(CHANNEL_FD_ENV);
    sys::remove_env(SERIALIZATION_ENV);
    if let Some(id) = std::env::var_os(WORKER_ID_ENV) {
        let _ = WORKER_ID.set(id.to_string_lossy().into_owned());
        sys::remove_env(WORKER_ID_ENV);
    }
    let fd: RawFd = fd_text.to_str().and_then(|t| t.trim().parse().ok()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{CHANNEL_FD_ENV}={fd_text:?} is not a file descriptor number"),
        )
    })?;
    // Adopted (close-on-exec from here on) even if it is then refused, so that it is closed
    // rather than leaked into this process's own children.
    let owned = sys::adopt_inherited_fd(fd)?;
    match mode.as_deref().map(|m| m.to_string_lossy()) {
        None => {}
        Some(m) if m == "json" => {}
        Some(m) => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the parent asked for {m:?} serialization; handoff speaks only \"json\" (start the child without serialization: 'advanced')"),
            ))
        }
    }
    let channel = Channel::with_config(owned, config)?;
    channel.sender().set_peer(format!("parent process {}", std::os::unix::process::parent_id()));
    Ok(Some(channel))
}
