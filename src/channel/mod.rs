//! The IPC channel: one end of an `AF_UNIX` stream socket pair, speaking Node's `json` protocol.
//!
//! A [`Channel`] is a [`Sender`] (cheap to clone) and a [`Receiver`]. Behind them runs a driver
//! task that owns the socket: it writes queued frames (several per system call when they are
//! small), reads and decodes frames, and answers the peer's protocol messages — `NODE_HANDLE_ACK`
//! and `NODE_HANDLE_NACK` — at once, whether or not anyone is reading, because a Node peer holds
//! every later message behind an unacknowledged handle.
//!
//! # Ordering
//! Messages arrive in the order they were sent. By default a handle is written only once the
//! previous one is acknowledged, and every message sent after a handle waits behind it — Node's
//! own rule. [`ChannelConfig::handle_window`] lets several handles be in flight when the peer is
//! also handoff (or Node: it copes with pipelined handles); then a handle the peer refuses
//! (`NACK`) is resent behind the ones written after it.
//!
//! # Errors on receive
//! A problem in what the peer sent — a malformed line, a frame over the size limit, a handle
//! without its descriptor, a descriptor with no handle — is an `Err` item in the receive stream;
//! the channel carries on with the next message. The stream ends (`None`) when the channel closes.

mod driver;
mod envelope;
pub mod frame;
pub mod json;
mod observe;
mod recycle;
mod socket;

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};

use crate::handle::{HandleError, IntoWire, ReceivedHandle};
pub use frame::{FrameError, StrayReason};
pub use observe::{InternalMessages, OBSERVER_BUFFER, OBSERVER_MESSAGES};

/// The error for a handle that was never queued: the value goes straight back.
fn unsent<H: IntoWire>(error: SendError, handle: H) -> SendHandleError<H::Back> {
    SendHandleError { error, handle: handle.unsent() }
}

/// What one queued frame costs beyond its bytes, charged against
/// [`ChannelConfig::send_buffer`]: the queue entry, the command that carried it to the driver, and
/// the allocation's own bookkeeping.
pub const FRAME_OVERHEAD: usize =
    std::mem::size_of::<Outgoing>() + std::mem::size_of::<Command>() + 32;

/// Settings for a channel. Start from [`ChannelConfig::default`].
///
/// # What a peer can make a channel hold
/// Every queue a peer can fill has a bound, and past it the channel stops reading (the peer's
/// writes then wait in the kernel) instead of growing:
///
/// | what | bound (default) |
/// |---|---|
/// | a message being assembled | [`max_frame_len`](Self::max_frame_len) (64 MiB) |
/// | nesting depth of a message | [`max_depth`](Self::max_depth) (1,000) |
/// | received messages and errors not yet taken, charged what they hold | [`recv_buffer`](Self::recv_buffer) (16 MiB), plus at most 0.75 MiB |
/// | received handles not yet taken (one descriptor each) | [`recv_handles`](Self::recv_handles) (128), plus one read's descriptors (at most 253) |
/// | protocol replies (ACK/NACK, socket counts) the peer has not read | [`reply_buffer`](Self::reply_buffer) (64 KiB), plus the replies to one read |
/// | internal messages per [`internal_messages`](Sender::internal_messages) observer | [`OBSERVER_BUFFER`] (1 MiB) and [`OBSERVER_MESSAGES`] (256) |
/// | sent messages the peer has not read, charged bytes + [`FRAME_OVERHEAD`] | [`send_buffer`](Self::send_buffer) (4 MiB), or one larger message |
/// | sent handles not yet acknowledged (one descriptor each) | [`send_handles`](Self::send_handles) (128) |
///
/// While one of our handles awaits the peer's acknowledgement, `recv_buffer` and
/// `recv_handles` double: the acknowledgement may sit behind what the peer sent since, and a task
/// that awaits the delivery before receiving would otherwise wait forever.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    max_frame_len: usize,
    max_depth: usize,
    send_buffer: usize,
    recv_buffer: usize,
    reply_buffer: usize,
    send_handles: usize,
    recv_handles: usize,
    handle_window: usize,
    max_retransmits: u8,
    linger: std::time::Duration,
    receive_internal: bool,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            max_frame_len: frame::DEFAULT_MAX_FRAME_LEN,
            max_depth: json::DEFAULT_MAX_DEPTH,
            send_buffer: 4 * 1024 * 1024,
            recv_buffer: 16 * 1024 * 1024,
            reply_buffer: 64 * 1024,
            send_handles: 128,
            recv_handles: 128,
            handle_window: 1,
            max_retransmits: 3,
            linger: std::time::Duration::from_secs(5),
            receive_internal: false,
        }
    }
}

impl ChannelConfig {
    /// Largest message accepted from the peer, in bytes (default 64 MiB). A longer one is
    /// discarded and reported as [`FrameError::TooLarge`]; memory stays bounded by this figure.
    pub fn max_frame_len(mut self, bytes: usize) -> Self {
        self.max_frame_len = bytes.max(1);
        self
    }
    /// Deepest nesting of arrays and objects accepted from the peer (default 1,000; plain
    /// `serde_json` stops at 128). A deeper message is discarded and reported as
    /// [`FrameError::TooDeep`]. handoff parses any depth up to it safely, and [`Message::value`] /
    /// [`Message::deserialize`] read it too. Node's `JSON.stringify` can write up to ~4,000
    /// levels; before raising the limit that far, mind that dropping a `serde_json::Value` that
    /// deep needs a large stack (see [`json::DEFAULT_MAX_DEPTH`]).
    pub fn max_depth(mut self, levels: usize) -> Self {
        self.max_depth = levels.max(1);
        self
    }
    /// Bytes of queued, unwritten messages after which `send` waits (default 4 MiB): the
    /// back-pressure a slow peer exerts. Each frame counts its bytes plus [`FRAME_OVERHEAD`], so
    /// a flood of tiny messages is bounded by its real memory. A single message larger than this
    /// is still sent, alone.
    pub fn send_buffer(mut self, bytes: usize) -> Self {
        // Kept within what one frame's permit count (u32) can express.
        self.send_buffer = bytes.clamp(1, 1 << 30);
        self
    }
    /// Bytes of received messages not yet taken by the [`Receiver`] after which the channel stops
    /// reading (default 16 MiB). Protocol replies keep flowing while under this figure. Errors
    /// count what they hold (the message of a refused handle, excerpts of bad input).
    pub fn recv_buffer(mut self, bytes: usize) -> Self {
        self.recv_buffer = bytes.max(1);
        self
    }
    /// Bytes of protocol replies (`NODE_HANDLE_ACK`/`NACK`, `NODE_SOCKET_COUNT`,
    /// `NODE_SOCKET_ALL_CLOSED`) the peer has not read yet after which the channel stops reading
    /// (default 64 KiB, about 1,300 replies). A peer that asks and never reads the answers is
    /// held there. Identical pending count replies are sent once.
    pub fn reply_buffer(mut self, bytes: usize) -> Self {
        self.reply_buffer = bytes.max(1);
        self
    }
    /// Handles (one descriptor each) queued or awaiting acknowledgement after which
    /// [`Sender::queue_handle`] waits (default 128; never fewer than
    /// [`handle_window`](Self::handle_window)).
    pub fn send_handles(mut self, handles: usize) -> Self {
        self.send_handles = handles.clamp(1, Semaphore::MAX_PERMITS);
        self
    }
    /// Received handles (one descriptor each) not yet taken by the [`Receiver`] after which the
    /// channel stops reading (default 128): a peer cannot fill this process's descriptor table.
    pub fn recv_handles(mut self, handles: usize) -> Self {
        self.recv_handles = handles.max(1);
        self
    }
    /// Delivers the internal messages handoff does not handle itself (`NODE_CLUSTER`, or any other
    /// `NODE_`-prefixed command but the handle and socket-list ones) through
    /// [`Receiver::recv`] too, in order with the user's messages, marked by
    /// [`Message::internal_cmd`] — also when they come with a handle. Off by default: then they
    /// are only shown to [`Sender::internal_messages`] observers, and a handle that comes with
    /// one is closed (as a Node process without a listener for it would). For programs that speak
    /// such a protocol themselves (handoff's cluster does).
    pub fn receive_internal(mut self, on: bool) -> Self {
        self.receive_internal = on;
        self
    }
    /// How long a channel whose runtime shuts down (`main` returned) keeps writing what is still
    /// queued before the process goes on exiting (default 5 s). Node keeps the process alive until
    /// pending writes finish; this is the same, bounded. `std::process::exit` skips it.
    pub fn linger(mut self, time: std::time::Duration) -> Self {
        self.linger = time;
        self
    }
    /// How many handles may await acknowledgement at once (default 1, Node's behaviour). Above 1,
    /// plain messages no longer wait behind handles already written; anything sent after a handle
    /// that is itself waiting for room in the window still waits behind it, to keep the order.
    pub fn handle_window(mut self, handles: usize) -> Self {
        self.handle_window = handles.max(1);
        self
    }
    /// How often a handle the peer answers with `NODE_HANDLE_NACK` is resent before giving up
    /// (default 3, as Node).
    pub fn max_retransmits(mut self, times: u8) -> Self {
        self.max_retransmits = times;
        self
    }
}

/// A message from the peer: its JSON text and, if it came with one, a handle.
#[derive(Debug)]
pub struct Message {
    json: String,
    handle: Option<ReceivedHandle>,
    /// The `cmd` of an internal message delivered because of
    /// [`ChannelConfig::receive_internal`].
    internal: Option<Box<str>>,
    /// For a large message: where its buffer goes when it is dropped (see [`recycle`]).
    recycle: Option<Arc<recycle::Recycler>>,
}

impl Drop for Message {
    fn drop(&mut self) {
        if let Some(recycler) = self.recycle.take() {
            recycler.give(std::mem::take(&mut self.json).into_bytes());
        }
    }
}

impl Message {
    /// For an internal message (delivered only with [`ChannelConfig::receive_internal`]): its
    /// `cmd`, e.g. `NODE_CLUSTER`. `None` for the user's messages.
    pub fn internal_cmd(&self) -> Option<&str> {
        self.internal.as_deref()
    }
    /// The message as JSON text (for a message that carried a handle: the user's `msg`, without
    /// the `NODE_HANDLE` envelope).
    pub fn json(&self) -> &str {
        &self.json
    }
    /// The message parsed as a [`serde_json::Value`].
    ///
    /// Fails only for JSON that `serde_json` cannot represent as a `Value` although it validated
    /// it (none is known); it never panics.
    pub fn value(&self) -> Result<serde_json::Value, serde_json::Error> {
        json::from_str(&self.json)
    }
    /// The message parsed as `T` (at any depth the channel accepted, unlike `serde_json`'s
    /// 128-level default).
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        json::from_str(&self.json)
    }
    /// The handle that came with the message.
    pub fn handle(&self) -> Option<&ReceivedHandle> {
        self.handle.as_ref()
    }
    /// Takes the handle out of the message.
    pub fn take_handle(&mut self) -> Option<ReceivedHandle> {
        self.handle.take()
    }
    /// The JSON text and the handle.
    pub fn into_parts(mut self) -> (String, Option<ReceivedHandle>) {
        self.recycle = None; // the text is the caller's now
        (std::mem::take(&mut self.json), self.handle.take())
    }
}

/// An internal (`NODE_`-prefixed) message seen on the channel, for observers.
#[derive(Debug, Clone)]
pub struct InternalMessage {
    json: std::sync::Arc<str>,
    had_fd: bool,
}

impl InternalMessage {
    /// The message as received (for a `NODE_HANDLE`, the whole envelope), as JSON text.
    pub fn json(&self) -> &str {
        &self.json
    }
    /// The message parsed as a [`serde_json::Value`].
    pub fn value(&self) -> Result<serde_json::Value, serde_json::Error> {
        json::from_str(&self.json)
    }
    /// Whether a descriptor came with it.
    pub fn had_fd(&self) -> bool {
        self.had_fd
    }
}

/// Why a message could not be sent, or a handle not delivered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The channel has no room for this now ([`ChannelConfig::send_buffer`] or
    /// [`ChannelConfig::send_handles`] used up) and the caller asked not to wait; nothing was
    /// queued.
    #[error("the IPC channel's send queue is full; nothing was queued")]
    Busy,
    /// The channel is disconnected or closed (Node's `ERR_IPC_CHANNEL_CLOSED`); nothing was
    /// written.
    #[error("the IPC channel is closed (ERR_IPC_CHANNEL_CLOSED); the message was not sent")]
    Closed,
    /// The message could not be serialized; nothing was written.
    #[error("the message cannot be serialized as JSON: {0}")]
    Serialize(#[source] serde_json::Error),
    /// The message is an object whose `cmd` starts with `NODE_`: the peer would treat it as an
    /// internal message and never deliver it, or crash on it.
    #[error(
        "the message has cmd {cmd:?}: commands starting with NODE_ are internal to the IPC \
         protocol and a peer never delivers them; rename the field, or use send_internal"
    )]
    Reserved {
        /// The offending command.
        cmd: String,
    },
    /// The handle cannot be sent; nothing was written.
    #[error(transparent)]
    Handle(#[from] HandleError),
    /// The peer answered `NODE_HANDLE_NACK` to every attempt.
    #[error(
        "the peer did not receive the handle after {attempts} attempts (NODE_HANDLE_NACK each \
         time)"
    )]
    NotDelivered {
        /// How many times it was written.
        attempts: u16,
    },
    /// The channel closed before the peer acknowledged the handle.
    #[error(
        "the IPC channel closed before the peer acknowledged the handle ({})",
        if *written { "it had been written, so the peer may hold a copy" } else { "it was never written" }
    )]
    Disconnected {
        /// Whether it had been written (the peer may then have it too).
        written: bool,
    },
}

/// A problem with what the peer sent. The channel goes on after it.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// A framing problem: malformed line, over-long frame, stray descriptors, truncated frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A `NODE_HANDLE` message came without a descriptor; it was answered with
    /// `NODE_HANDLE_NACK`, so the peer may resend it.
    #[error("a {handle_type} handle message arrived without its file descriptor; answered NODE_HANDLE_NACK so the peer resends it")]
    HandleWithoutFd {
        /// The `type` it claimed.
        handle_type: String,
    },
    /// A handle arrived but could not be used (unknown `type`, or a descriptor of the wrong
    /// kind). It was acknowledged (so the peer does not resend it) and its descriptor closed.
    #[error("refused a {handle_type:?} handle from the peer ({reason}); its descriptor was closed. The message was: {message}")]
    HandleRejected {
        /// The user message that came with it, as JSON.
        message: String,
        /// The `type` field as sent.
        handle_type: String,
        /// Why it was refused.
        reason: String,
    },
    /// An internal message handoff could not act on (a socket-list request with an over-long
    /// key, or without one); it was ignored and not answered.
    #[error("ignored an internal {cmd} message from the peer: {reason}")]
    InternalRejected {
        /// Its `cmd` (an excerpt).
        cmd: String,
        /// Why it was ignored.
        reason: String,
    },
    /// The peer acknowledged a handle we had not sent (nothing was in flight).
    #[error("the peer sent {cmd} but no handle was awaiting acknowledgement; ignored")]
    UnexpectedAck {
        /// `NODE_HANDLE_ACK` or `NODE_HANDLE_NACK`.
        cmd: &'static str,
    },
    /// The kernel truncated the descriptors that came with a read (`MSG_CTRUNC`).
    #[error("the kernel dropped file descriptors the peer sent (MSG_CTRUNC); the messages they belonged to will be answered with NACK")]
    ControlTruncated,
    /// Reading from or writing to the channel failed; the channel is closing.
    #[error("IPC channel I/O failed: {0}")]
    Io(#[source] io::Error),
    /// [`Receiver::recv_as`] could not parse the message as the requested type; the message is
    /// given back, handle included.
    #[error("the message does not have the expected shape: {source}")]
    Deserialize {
        /// The message, untouched.
        message: Message,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
}

/// A handle that could not be sent or delivered, and the handle itself, given back as it was sent
/// (`()` for [`KeepOpen`](crate::handle::KeepOpen): yours never left you). Nothing is closed
/// behind your back, so a retry is one line:
///
/// ```no_run
/// # async fn f(a: &handoff::Sender, b: &handoff::Sender, socket: tokio::net::TcpStream)
/// # -> Result<(), handoff::SendHandleError<tokio::net::TcpStream>> {
/// if let Err(failed) = a.send_handle(&"socket", socket).await {
///     eprintln!("{failed}; trying the other child");
///     b.send_handle(&"socket", failed.handle).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{error}; the handle is given back in this error")]
pub struct SendHandleError<H> {
    /// What went wrong.
    #[source]
    pub error: SendError,
    /// The handle, as it was sent.
    pub handle: H,
}

impl<H> SendHandleError<H> {
    /// The reason and the handle.
    pub fn into_parts(self) -> (SendError, H) {
        (self.error, self.handle)
    }
}

/// A handle's delivery: resolves when the peer acknowledges it, or with the reason it was not
/// and the handle given back.
///
/// Dropping it does not cancel the delivery (a handle that then fails is dropped).
pub struct Delivery<H> {
    outcome: oneshot::Receiver<driver::Outcome>,
    give_back: fn(Box<dyn crate::handle::Held>) -> H,
}

impl<H> std::fmt::Debug for Delivery<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").finish_non_exhaustive()
    }
}

impl<H> Delivery<H> {
    /// Whether the outcome is known (acknowledged, or failed), without waiting for it. Once it
    /// said yes, awaiting the delivery is no longer meaningful (its outcome was consumed).
    pub(crate) fn is_settled(&mut self) -> bool {
        !matches!(self.outcome.try_recv(), Err(oneshot::error::TryRecvError::Empty))
    }
}

impl<H> Future for Delivery<H> {
    type Output = Result<(), SendHandleError<H>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let give_back = self.give_back;
        Pin::new(&mut self.outcome).poll(cx).map(|outcome| match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err((error, value))) => Err(SendHandleError { error, handle: give_back(value) }),
            // The pending handle always reports (its Drop does, at the latest), with the value.
            Err(_) => unreachable!("a pending handle resolves its delivery before it is dropped"),
        })
    }
}

/// State shared by the senders, the receiver and the driver.
#[derive(Debug)]
struct Shared {
    /// False once `disconnect()` was called or the channel closed.
    connected: AtomicBool,
    /// Becomes true when the driver has finished and the socket is closed.
    closed: watch::Sender<bool>,
    /// Bytes of queued outgoing frames (permits), for back-pressure.
    send_budget: Arc<Semaphore>,
    send_buffer: usize,
    /// Handles queued or awaiting acknowledgement: one permit each (`send_handles`).
    handle_budget: Arc<Semaphore>,
    /// Bytes of decoded messages waiting in the receiver's queue.
    recv_queued: AtomicUsize,
    /// Handles (descriptors) waiting in the receiver's queue.
    recv_handles_queued: AtomicUsize,
    recv_space: Notify,
    observers: observe::Observers,
    /// Socket-list requests awaiting the peer's reply.
    replies: crate::server::socket_list::Replies,
    /// `Sender`s held by the user (see `Sender::counted`).
    user_senders: AtomicUsize,
    /// Who is at the other end, for error messages ("child process 1234").
    peer: std::sync::OnceLock<String>,
    /// Buffers of large frames kept for the next ones, per direction (see [`recycle`]).
    send_spares: recycle::Recycler,
    recv_spares: Arc<recycle::Recycler>,
}

/// A queued frame and what to do once it is written.
#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    handle: Option<driver::PendingHandle>,
    /// Back-pressure permits this frame holds; the driver returns them once it is written.
    permits: u32,
    written: Option<oneshot::Sender<Result<(), SendError>>>,
}

#[derive(Debug)]
enum Command {
    Write(Outgoing),
    Disconnect,
    /// The last user-held `Sender` is gone (handoff's own references do not count).
    SendersGone,
}

/// The sending half of a channel. Clone it freely; all clones feed the same ordered queue.
#[derive(Debug)]
pub struct Sender {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    /// Whether this handle counts as the user's: a channel whose user senders and receiver are
    /// all dropped closes, even if handoff itself (a `Server`'s list) still refers to it.
    counted: bool,
}

impl Clone for Sender {
    fn clone(&self) -> Sender {
        if self.counted {
            self.shared.user_senders.fetch_add(1, Ordering::SeqCst);
        }
        Sender { commands: self.commands.clone(), shared: self.shared.clone(), counted: self.counted }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if self.counted && self.shared.user_senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = self.commands.send(Command::SendersGone);
        }
    }
}

/// The receiving half of a channel.
#[derive(Debug)]
pub struct Receiver {
    messages: mpsc::UnboundedReceiver<Result<Message, RecvError>>,
    shared: Arc<Shared>,
}

/// Both halves of a channel. See the [module docs](self).
///
/// # Examples
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// let (a, mut b) = handoff::Channel::pair()?;
/// a.send(&serde_json::json!({"hello": "world"})).await.unwrap();
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// // KeepOpen: a duplicate goes, ours stays open (Node's keepOpen).
/// a.send_handle(&"server", handoff::handle::KeepOpen(&listener)).await.unwrap();
///
/// let first = b.recv().await.unwrap().unwrap();
/// assert_eq!(first.value().unwrap()["hello"], "world");
/// let mut second = b.recv().await.unwrap().unwrap();
/// let shared: tokio::net::TcpListener = second.take_handle().unwrap().try_into().unwrap();
/// assert_eq!(shared.local_addr()?, listener.local_addr()?);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Channel {
    sender: Sender,
    receiver: Receiver,
}

impl Channel {
    /// Drives `fd`, one end of an `AF_UNIX` stream socket pair, as a channel with the default
    /// settings. Must be called inside a tokio runtime; the driver task is spawned on it.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Channel> {
        Channel::with_config(fd, ChannelConfig::default())
    }

    /// Like [`from_fd`](Channel::from_fd), with `config`.
    pub fn with_config(fd: OwnedFd, config: ChannelConfig) -> io::Result<Channel> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            io::Error::other("a handoff channel must be created inside a tokio runtime")
        })?;
        crate::sys::set_nonblocking(std::os::fd::AsFd::as_fd(&fd), true)?;
        let socket = {
            let _guard = runtime.enter();
            socket::ChannelSocket::new(fd)?
        };
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            connected: AtomicBool::new(true),
            closed,
            send_budget: Arc::new(Semaphore::new(config.send_buffer)),
            send_buffer: config.send_buffer,
            handle_budget: Arc::new(Semaphore::new(config.send_handles.max(config.handle_window))),
            recv_queued: AtomicUsize::new(0),
            recv_handles_queued: AtomicUsize::new(0),
            recv_space: Notify::new(),
            observers: Default::default(),
            replies: Default::default(),
            user_senders: AtomicUsize::new(1),
            peer: std::sync::OnceLock::new(),
            send_spares: recycle::Recycler::new(recycle::limit(config.max_frame_len)),
            recv_spares: Arc::new(recycle::Recycler::new(recycle::limit(config.max_frame_len))),
        });
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (message_tx, messages) = mpsc::unbounded_channel();
        let driver = driver::Driver::new(socket, config, shared.clone(), command_rx, message_tx);
        runtime.spawn(driver.run());
        Ok(Channel {
            sender: Sender { commands, shared: shared.clone(), counted: true },
            receiver: Receiver { messages, shared },
        })
    }

    /// Two connected channels in this process (for tests and in-process handoff).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        Channel::pair_with_config(ChannelConfig::default())
    }

    /// Two connected channels with `config`.
    pub fn pair_with_config(config: ChannelConfig) -> io::Result<(Channel, Channel)> {
        let (a, b) = crate::sys::stream_socketpair()?;
        Ok((Channel::with_config(a, config.clone())?, Channel::with_config(b, config)?))
    }

    /// The sending half.
    pub fn sender(&self) -> &Sender {
        &self.sender
    }
    /// The receiving half.
    pub fn receiver(&mut self) -> &mut Receiver {
        &mut self.receiver
    }
    /// Splits into the two halves.
    pub fn split(self) -> (Sender, Receiver) {
        (self.sender, self.receiver)
    }

    /// See [`Receiver::recv`].
    pub async fn recv(&mut self) -> Option<Result<Message, RecvError>> {
        self.receiver.recv().await
    }
    /// See [`Receiver::recv_as`].
    pub async fn recv_as<T: DeserializeOwned>(
        &mut self,
    ) -> Option<Result<(T, Option<ReceivedHandle>), RecvError>> {
        self.receiver.recv_as().await
    }
}

/// A channel is its sender too: every [`Sender`] method (`send`, `send_handle`, `queue_handle`,
/// `flush`, `disconnect`, ...) works on it directly.
impl std::ops::Deref for Channel {
    type Target = Sender;
    fn deref(&self) -> &Sender {
        &self.sender
    }
}

impl Sender {
    /// Queues `message` (any `Serialize` value: one JSON line on the wire).
    ///
    /// Returns once the message is queued in order; it waits only while more than
    /// [`ChannelConfig::send_buffer`] bytes are queued (a slow peer's back-pressure). Use
    /// [`flush`](Sender::flush) to wait until it has been written.
    ///
    /// Objects whose `cmd` starts with `NODE_` are refused ([`SendError::Reserved`]): a peer
    /// treats them as internal and would drop them or crash.
    ///
    /// # Cancel safety
    /// Cancel safe: if the future is dropped before it completes, the message was not queued.
    pub async fn send<T: Serialize + ?Sized>(&self, message: &T) -> Result<(), SendError> {
        let bytes = self.encode_reusing(message)?;
        if let Some(cmd) = envelope::reserved_cmd(&bytes) {
            return Err(SendError::Reserved { cmd });
        }
        self.enqueue(bytes, None, None).await.map_err(|(error, _)| error)
    }

    /// Queues an internal message (`cmd` starting with `NODE_`) that handoff does not manage
    /// itself. Handle and socket-list commands are refused: sending them unasked would break a
    /// Node peer.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`send`](Sender::send).
    pub async fn send_internal(&self, message: &serde_json::Value) -> Result<(), SendError> {
        let cmd = message.get("cmd").and_then(|c| c.as_str()).unwrap_or_default();
        if !frame::is_internal_cmd(cmd) || envelope::is_managed_cmd(cmd) {
            return Err(SendError::Reserved { cmd: cmd.to_owned() });
        }
        let bytes = frame::encode(message).map_err(SendError::Serialize)?;
        self.enqueue(bytes, None, None).await.map_err(|(error, _)| error)
    }

    /// Sends `message` with `handle` and waits until the peer acknowledges it.
    ///
    /// `handle` by value is held until the acknowledgement, then dropped (closing it); wrapped in
    /// [`KeepOpen`](crate::handle::KeepOpen), a duplicate is sent and yours stays open (Node's
    /// `keepOpen`). See [`crate::handle`]. Whatever fails, the error gives the handle back as it
    /// was sent ([`SendHandleError`]).
    ///
    /// # Cancel safety
    /// Not cancel safe: once queued, the handle is sent even if this future is dropped; use
    /// [`queue_handle`](Sender::queue_handle) to keep track of it.
    pub async fn send_handle<T: Serialize + ?Sized, H: IntoWire>(
        &self,
        message: &T,
        handle: H,
    ) -> Result<(), SendHandleError<H::Back>> {
        self.queue_handle(message, handle).await?.await
    }

    /// Queues `message` with `handle` and returns a [`Delivery`] that resolves on the peer's
    /// acknowledgement. Lets several handles be queued (and, with
    /// [`ChannelConfig::handle_window`], pipelined) without waiting for each. Waits while
    /// [`ChannelConfig::send_handles`] handles are unacknowledged.
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped before it completes, nothing was queued and the handle was dropped.
    pub async fn queue_handle<T: Serialize + ?Sized, H: IntoWire>(
        &self,
        message: &T,
        handle: H,
    ) -> Result<Delivery<H::Back>, SendHandleError<H::Back>> {
        let msg = match frame::encode_json(message) {
            Ok(msg) => msg,
            Err(e) => return Err(unsent(SendError::Serialize(e), handle)),
        };
        // A Node receiver hands `msg` on as an internal message if its `cmd` is one: refuse it
        // here as `send` does (an unsolicited ACK inside `msg` kills the peer).
        if let Some(cmd) = envelope::reserved_cmd(&msg) {
            return Err(unsent(SendError::Reserved { cmd }, handle));
        }
        if !self.is_connected() {
            return Err(unsent(SendError::Disconnected { written: false }, handle));
        }
        // One descriptor slot per handle until it is resolved, taken before anything is
        // prepared (a KeepOpen duplicate is made only once there is room): a peer that stops
        // answering makes this wait instead of pinning a descriptor per call.
        let slot = match self.shared.handle_budget.clone().try_acquire_owned() {
            Ok(slot) => Ok(slot),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.shared.handle_budget.clone().acquire_owned().await.map_err(|_| ())
            }
            Err(tokio::sync::TryAcquireError::Closed) => Err(()),
        };
        let Ok(slot) = slot else {
            return Err(unsent(SendError::Disconnected { written: false }, handle));
        };
        let mut wire = handle
            .into_wire()
            .map_err(|(error, handle)| SendHandleError { error: SendError::Handle(error), handle })?;
        if let Some(server) = wire.server.take() {
            // First keyed socket on this channel: the server will ask it for counts.
            server.add_channel(self);
        }
        let bytes = envelope::encode_handle(&msg, &wire);
        let (done, outcome) = oneshot::channel();
        let pending = driver::PendingHandle::new(wire.held, done, slot);
        if let Err((error, pending)) = self.enqueue(bytes, Some(pending), None).await {
            let handle = H::give_back(pending.expect("given back with its handle").into_value());
            return Err(SendHandleError { error, handle });
        }
        Ok(Delivery { outcome, give_back: H::give_back })
    }

    /// Waits until every message queued so far has been written to the channel.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops the waiting.
    pub async fn flush(&self) -> Result<(), SendError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Vec::new(), None, Some(tx)).await.map_err(|(error, _)| error)?;
        rx.await.unwrap_or(Err(SendError::Closed))
    }

    /// Disconnects: refuses new sends at once, writes what is already queued, waits for pending
    /// handle acknowledgements, then closes the channel. The peer sees end-of-file; both
    /// receivers then end. Calling it again does nothing.
    pub fn disconnect(&self) {
        if self.shared.connected.swap(false, Ordering::SeqCst) {
            let _ = self.commands.send(Command::Disconnect);
        }
    }

    /// False once [`disconnect`](Sender::disconnect) was called or the channel closed.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Resolves when the channel has closed (its socket is closed).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Subscribes to the internal messages this channel receives from now on (read-only: they are
    /// still handled by handoff). An observer holds at most [`OBSERVER_BUFFER`] bytes and
    /// [`OBSERVER_MESSAGES`] messages unread; past that it loses the oldest and is told how many.
    pub fn internal_messages(&self) -> InternalMessages {
        self.shared.observers.subscribe(self.is_closed())
    }

    /// Who is at the other end of the channel, as error messages name it.
    pub fn peer(&self) -> &str {
        self.shared.peer.get().map_or("the peer process", String::as_str)
    }

    /// The process at the other end is known to have exited: refuse new sends (nobody will read
    /// them), while what it sent before can still be received.
    pub(crate) fn peer_exited(&self) {
        self.shared.connected.store(false, Ordering::SeqCst);
    }

    pub(crate) fn set_peer(&self, peer: String) {
        let _ = self.shared.peer.set(peer);
    }

    /// A handle for handoff's own bookkeeping that does not keep the channel open.
    pub(crate) fn uncounted(&self) -> Sender {
        Sender { commands: self.commands.clone(), shared: self.shared.clone(), counted: false }
    }

    /// Whether `other` feeds the same channel.
    pub(crate) fn same_channel(&self, other: &Sender) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Whether the channel's socket is closed (not just disconnecting).
    pub(crate) fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    /// Queues an internal message of a protocol handoff speaks above the channel (`NODE_CLUSTER`),
    /// which [`send_internal`](Sender::send_internal) refuses to users.
    pub(crate) async fn send_protocol<T: Serialize + ?Sized>(&self, message: &T) -> Result<(), SendError> {
        let bytes = frame::encode(message).map_err(SendError::Serialize)?;
        self.enqueue(bytes, None, None).await.map_err(|(error, _)| error)
    }

    /// [`send_protocol`](Sender::send_protocol) of a message handoff encoded itself as compact
    /// JSON (no newline).
    pub(crate) async fn send_protocol_encoded(&self, mut json: Vec<u8>) -> Result<(), SendError> {
        json.push(b'\n');
        self.enqueue(json, None, None).await.map_err(|(error, _)| error)
    }

    /// Queues `handle` with an internal message (a `NODE_CLUSTER` one) as its `msg`, without
    /// waiting: fails with the handle given back when the channel has no room for it now.
    pub(crate) fn try_queue_protocol_handle<T: Serialize + ?Sized, H: IntoWire>(
        &self,
        message: &T,
        handle: H,
    ) -> Result<Delivery<H::Back>, SendHandleError<H::Back>> {
        match frame::encode_json(message) {
            Ok(msg) => self.try_queue_encoded_protocol_handle(msg, handle),
            Err(e) => Err(unsent(SendError::Serialize(e), handle)),
        }
    }

    /// [`try_queue_protocol_handle`](Sender::try_queue_protocol_handle) with the message already
    /// encoded as compact JSON by handoff itself (the cluster's per-connection `newconn`).
    pub(crate) fn try_queue_encoded_protocol_handle<H: IntoWire>(
        &self,
        msg: Vec<u8>,
        handle: H,
    ) -> Result<Delivery<H::Back>, SendHandleError<H::Back>> {
        if !self.is_connected() {
            return Err(unsent(SendError::Disconnected { written: false }, handle));
        }
        let Ok(slot) = self.shared.handle_budget.clone().try_acquire_owned() else {
            return Err(unsent(SendError::Busy, handle));
        };
        let wire = handle
            .into_wire()
            .map_err(|(error, handle)| SendHandleError { error: SendError::Handle(error), handle })?;
        let bytes = envelope::encode_handle(&msg, &wire);
        let (done, outcome) = oneshot::channel();
        let pending = driver::PendingHandle::new(wire.held, done, slot);
        let permits = (bytes.capacity() + FRAME_OVERHEAD).min(self.shared.send_buffer) as u32;
        let Ok(permit) = self.shared.send_budget.try_acquire_many(permits) else {
            let handle = H::give_back(pending.into_value());
            return Err(SendHandleError { error: SendError::Busy, handle });
        };
        permit.forget();
        let outgoing = Outgoing { bytes, handle: Some(pending), permits, written: None };
        if let Err(e) = self.commands.send(Command::Write(outgoing)) {
            let Command::Write(outgoing) = e.0 else { unreachable!("sent a write") };
            let pending = outgoing.handle.expect("sent with its handle");
            let handle = H::give_back(pending.into_value());
            return Err(SendHandleError { error: SendError::Disconnected { written: false }, handle });
        }
        Ok(Delivery { outcome, give_back: H::give_back })
    }

    /// Sends a socket-list request (`NODE_SOCKET_GET_COUNT` or `NODE_SOCKET_NOTIFY_CLOSE`) for
    /// `key` and waits for its reply. `None` if the channel closes first.
    pub(crate) async fn socket_list_request(
        &self,
        kind: crate::server::socket_list::ReplyKind,
        key: &str,
    ) -> Option<usize> {
        use crate::server::socket_list::ReplyKind;
        let reply = self.shared.replies.wait(kind, key)?;
        let cmd = match kind {
            ReplyKind::Count => "NODE_SOCKET_GET_COUNT",
            ReplyKind::AllClosed => "NODE_SOCKET_NOTIFY_CLOSE",
        };
        let bytes = frame::encode(&serde_json::json!({ "cmd": cmd, "key": key })).ok()?;
        self.enqueue(bytes, None, None).await.ok()?;
        reply.await.ok()
    }

    /// Encodes `message` into the buffer of an earlier large message if one is kept (see
    /// [`recycle`]); a small message found one is copied out of it, and the buffer kept.
    fn encode_reusing<T: Serialize + ?Sized>(&self, message: &T) -> Result<Vec<u8>, SendError> {
        let spares = &self.shared.send_spares;
        let mut bytes = frame::encode_into(message, spares.take().unwrap_or_default()).map_err(SendError::Serialize)?;
        if bytes.len() >= recycle::RECYCLE_MIN {
            spares.large_frame();
            // The encoder reserves up to six times a string's length for escapes: give back what
            // was not written (no copy for a large buffer), so that what is kept, and what the
            // send budget is charged, is what is used.
            bytes.shrink_to_fit();
            Ok(bytes)
        } else if bytes.capacity() >= recycle::RECYCLE_MIN {
            let small = bytes.as_slice().to_vec();
            spares.give(bytes);
            spares.small_frame();
            Ok(small)
        } else {
            Ok(bytes)
        }
    }

    /// Queues a frame in order, waiting for `send_buffer` room. On failure the pending handle,
    /// if any, comes back with the error.
    async fn enqueue(
        &self,
        bytes: Vec<u8>,
        handle: Option<driver::PendingHandle>,
        written: Option<oneshot::Sender<Result<(), SendError>>>,
    ) -> Result<(), (SendError, Option<driver::PendingHandle>)> {
        let closed = |handle: Option<driver::PendingHandle>| {
            let error = match handle {
                Some(_) => SendError::Disconnected { written: false },
                None => SendError::Closed,
            };
            (error, handle)
        };
        if !self.is_connected() {
            return Err(closed(handle));
        }
        let permits = (bytes.capacity() + FRAME_OVERHEAD).min(self.shared.send_buffer) as u32;
        // Fast path without an await point; the permits travel with the frame as a count (no
        // Arc clone per message) and the driver adds them back once the frame is written.
        let acquired = match self.shared.send_budget.try_acquire_many(permits) {
            Ok(permit) => Ok(permit),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.shared.send_budget.acquire_many(permits).await.map_err(|_| ())
            }
            Err(tokio::sync::TryAcquireError::Closed) => Err(()),
        };
        match acquired {
            Ok(permit) => permit.forget(),
            Err(()) => return Err(closed(handle)),
        }
        let outgoing = Outgoing { bytes, handle, permits, written };
        self.commands.send(Command::Write(outgoing)).map_err(|e| match e.0 {
            Command::Write(o) => closed(o.handle),
            Command::Disconnect | Command::SendersGone => (SendError::Closed, None),
        })
    }
}

impl Receiver {
    /// The next message from the peer, an `Err` describing bad input (the channel goes on), or
    /// `None` once the channel has closed and every message has been taken.
    ///
    /// # Cancel safety
    /// Cancel safe: no message is lost if the future is dropped.
    pub async fn recv(&mut self) -> Option<Result<Message, RecvError>> {
        let item = self.messages.recv().await?;
        self.shared.recv_queued.fetch_sub(queued_cost(&item), Ordering::SeqCst);
        if carries_handle(&item) {
            self.shared.recv_handles_queued.fetch_sub(1, Ordering::SeqCst);
        }
        self.shared.recv_space.notify_one();
        Some(item)
    }

    /// The next message parsed as `T`, with its handle. A message that does not parse is returned
    /// whole in [`RecvError::Deserialize`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`recv`](Receiver::recv).
    pub async fn recv_as<T: DeserializeOwned>(
        &mut self,
    ) -> Option<Result<(T, Option<ReceivedHandle>), RecvError>> {
        Some(self.recv().await?.and_then(|mut message| match message.deserialize::<T>() {
            Ok(value) => Ok((value, message.take_handle())),
            Err(source) => Err(RecvError::Deserialize { message, source }),
        }))
    }
}

/// What a queued item counts against [`ChannelConfig::recv_buffer`]: the bytes it holds plus a
/// fixed overhead, so that a flood of tiny messages or of errors is bounded too.
fn queued_cost(item: &Result<Message, RecvError>) -> usize {
    const ITEM_OVERHEAD: usize = std::mem::size_of::<Result<Message, RecvError>>() + 32;
    ITEM_OVERHEAD
        + match item {
            Ok(message) => message.held_bytes(),
            Err(error) => error.held_bytes(),
        }
}

/// Whether a queued item holds a descriptor (counted against [`ChannelConfig::recv_handles`]).
fn carries_handle(item: &Result<Message, RecvError>) -> bool {
    matches!(item, Ok(Message { handle: Some(_), .. }))
}

impl Message {
    fn held_bytes(&self) -> usize {
        self.json.len() + self.handle.as_ref().and_then(|h| h.key.as_ref()).map_or(0, String::len)
    }
}

impl RecvError {
    /// Heap bytes this error keeps (strings that came from the peer, or were built from it).
    fn held_bytes(&self) -> usize {
        match self {
            RecvError::Frame(FrameError::Malformed { error, excerpt, .. }) => error.len() + excerpt.len(),
            RecvError::Frame(_) | RecvError::UnexpectedAck { .. } | RecvError::ControlTruncated => 0,
            RecvError::HandleWithoutFd { handle_type } => handle_type.len(),
            RecvError::HandleRejected { message, handle_type, reason } => {
                message.len() + handle_type.len() + reason.len()
            }
            RecvError::InternalRejected { cmd, reason } => cmd.len() + reason.len(),
            RecvError::Io(_) => 64,
            RecvError::Deserialize { message, .. } => message.held_bytes(),
        }
    }
}

/// At most `max` bytes of `text` (cut at a character boundary), with `…` when cut: what an error
/// keeps of a string the peer chose.
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
