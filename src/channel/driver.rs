//! The task that owns a channel's socket.
//!
//! One task per channel, so that the peer's protocol messages are answered whether or not user
//! code is reading. It keeps four queues:
//!
//! - `write_queue`: frames to write now, in order; the front one may be partly written;
//! - `held`: frames waiting behind unacknowledged handles (Node's ordering, protocol doc §4.3);
//! - `in_flight`: handles written and awaiting `NODE_HANDLE_ACK`/`NACK`, oldest first (the peer
//!   answers in the order it reads them, so answers match this queue front to back);
//! - the receiver's queue of decoded messages;
//!
//! and one more in the other direction: `owed`, the protocol replies (ACK/NACK, socket counts)
//! we owe the peer. They never wait behind our own handles (protocol doc §4.2), they go out
//! between frames, and they are bounded ([`ChannelConfig::reply_buffer`]): a peer that asks and
//! never reads the answers stops being read.
//!
//! # Who owns a sent descriptor
//! The [`PendingHandle`] owns the value sent (the user's socket itself, or the duplicate
//! `KeepOpen` made) from `send_handle` on: in `held` or `write_queue` until written, then in
//! `in_flight` until the peer answers. An ACK drops it, closing it (the peer has its own copy); a
//! NACK puts it back in `write_queue`; the retransmission limit or a closing channel hands it back
//! to the caller's [`Delivery`](super::Delivery), which gives it back as the type it was sent as.

use std::collections::{HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::envelope::{self, HandleEnvelope};
use super::frame::{Decoded, Decoder, Frame};
use super::socket::ChannelSocket;
use super::{
    carries_handle, excerpt, queued_cost, ChannelConfig, Command, InternalMessage, Message,
    Outgoing, RecvError, SendError, Shared,
};
use crate::handle::{DgramType, HandleType, Held, ReceivedHandle};
use crate::server::socket_list::{ReceiveLists, ReplyKind};
use crate::server::MAX_KEY_LEN;
use crate::sys;

/// Size of the read buffer: one `recvmsg` takes at most this much.
const READ_CHUNK: usize = 256 * 1024;
/// Smallest read when the receive budget is nearly used up.
const MIN_READ: usize = 4 * 1024;
/// Most bytes of `recv_buffer` one byte of input can be charged: an empty line (one byte) is
/// reported as a `Malformed` error holding the parser's message, about 165 bytes in all. Reads
/// are sized so that even such input cannot overshoot the budget by more than one small read.
const MAX_EXPANSION: usize = 192;
/// Reads per wake-up before yielding to the rest of the loop (fairness with writes).
const READS_PER_WAKE: usize = 16;
/// Most frames gathered into one `sendmsg`.
const MAX_IOVECS: usize = 128;
/// Most bytes gathered into one `sendmsg`.
const MAX_GATHER_BYTES: usize = 1024 * 1024;
/// Frames shorter than this are copied into one staging buffer before writing.
const SMALL_FRAME: usize = 4 * 1024;
/// Most bytes staged for one `sendmsg`.
const MAX_STAGED_BYTES: usize = 256 * 1024;
/// How often pending `NODE_SOCKET_NOTIFY_CLOSE` requests are re-checked.
const CLOSE_POLL: std::time::Duration = std::time::Duration::from_millis(50);
/// Most bytes of replies rendered for one write.
const REPLY_BATCH: usize = 16 * 1024;
/// What a reply waiting in `owed` is charged beyond its key, against `reply_buffer`: the queue
/// entry and the bytes it will be written as.
const REPLY_COST: usize = std::mem::size_of::<Reply>() + 32;
/// Bytes of a peer's string kept in an error message.
const EXCERPT: usize = 64;

/// How a handle's delivery ended: acknowledged, or failed with the value given back.
pub(crate) type Outcome = Result<(), (SendError, Box<dyn Held>)>;

/// A handle that has been queued and not yet acknowledged.
pub(crate) struct PendingHandle {
    /// The value sent; `None` only once it has been handed back or dropped.
    value: Option<Box<dyn Held>>,
    attempts: u16,
    done: Option<oneshot::Sender<Outcome>>,
    /// Its place in the channel's descriptor budget (`send_handles`), given back when it is
    /// resolved.
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for PendingHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingHandle")
            .field("fd", &self.value.as_ref().map(|v| v.as_fd()))
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl PendingHandle {
    pub(crate) fn new(
        value: Box<dyn Held>,
        done: oneshot::Sender<Outcome>,
        slot: OwnedSemaphorePermit,
    ) -> PendingHandle {
        PendingHandle { value: Some(value), attempts: 0, done: Some(done), _slot: slot }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.value.as_deref().expect("held until resolved").as_fd()
    }

    /// The channel closed before this handle was ever written: the value, for the caller's error.
    pub(crate) fn into_value(mut self) -> Box<dyn Held> {
        self.done.take();
        self.value.take().expect("held until resolved")
    }

    /// The peer acknowledged it: drop (close) our copy, tell the caller.
    fn acknowledged(mut self) {
        self.value.take();
        if let Some(done) = self.done.take() {
            let _ = done.send(Ok(()));
        }
    }

    /// It will not be delivered: hand the value back to the caller with the reason.
    fn fail(mut self, error: SendError) {
        if let (Some(done), Some(value)) = (self.done.take(), self.value.take()) {
            // If the caller dropped its Delivery, the value comes back here and is dropped.
            let _ = done.send(Err((error, value)));
        }
    }
}

impl Drop for PendingHandle {
    /// Never resolved (the driver went away without closing, e.g. it panicked): the caller still
    /// gets its value back.
    fn drop(&mut self) {
        if let (Some(done), Some(value)) = (self.done.take(), self.value.take()) {
            let _ = done.send(Err((SendError::Closed, value)));
        }
    }
}

/// A written handle frame kept for a possible retransmission.
#[derive(Debug)]
struct InFlight {
    bytes: Vec<u8>,
    handle: PendingHandle,
}

/// A protocol reply we owe the peer; rendered only when it is written, so a count is current.
#[derive(Debug)]
enum Reply {
    Ack,
    Nack,
    Count(Box<str>),
    AllClosed(Box<str>),
}

/// The replies we owe the peer, in order, and the batch being written.
#[derive(Debug, Default)]
struct Owed {
    queue: VecDeque<Reply>,
    /// What `queue` is charged against `reply_buffer`.
    bytes: usize,
    /// Keys with a count (or all-closed) reply in `queue`: an identical request is answered by it.
    counts: HashSet<Box<str>>,
    all_closed: HashSet<Box<str>>,
    /// The rendered batch, and how much of it is written. Once started it is finished before any
    /// other frame, and it is started only between frames.
    out: Vec<u8>,
    out_written: usize,
    /// A reply batch went last: the next write is a user frame's, so replies cannot starve them.
    user_turn: bool,
}

impl Owed {
    fn cost(reply: &Reply) -> usize {
        REPLY_COST
            + match reply {
                Reply::Ack | Reply::Nack => 0,
                // In the queue and in the set of pending keys.
                Reply::Count(key) | Reply::AllClosed(key) => 2 * key.len(),
            }
    }

    fn push(&mut self, reply: Reply) {
        let pending = match &reply {
            Reply::Count(key) => Some((&mut self.counts, key)),
            Reply::AllClosed(key) => Some((&mut self.all_closed, key)),
            Reply::Ack | Reply::Nack => None,
        };
        if let Some((pending, key)) = pending {
            if !pending.insert(key.clone()) {
                return; // the reply already owed answers this request too
            }
        }
        self.bytes += Owed::cost(&reply);
        self.queue.push_back(reply);
    }

    /// Nothing owed, nothing half-written.
    fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.out_written == self.out.len()
    }

    /// The peer is gone: nobody will read what we owe.
    fn clear(&mut self) {
        *self = Owed::default();
    }
}

pub(crate) struct Driver {
    socket: ChannelSocket,
    config: ChannelConfig,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    commands_open: bool,
    messages: mpsc::UnboundedSender<Result<Message, RecvError>>,
    decoder: Decoder,
    read_buf: Vec<u8>,
    decoded: Vec<Decoded>,
    write_queue: VecDeque<Outgoing>,
    /// Bytes of `write_queue`'s front frame already written.
    front_written: usize,
    held: VecDeque<Outgoing>,
    in_flight: VecDeque<InFlight>,
    /// Handles in `write_queue` or `in_flight`: the window they count against.
    handles_outstanding: usize,
    disconnecting: bool,
    /// Set when the socket is done (EOF, error, or disconnect completed).
    finished: bool,
    /// Server sockets received over this channel, per key (Node's `SocketListReceive`).
    socket_lists: ReceiveLists,
    /// When pending close requests are next re-checked.
    next_close_check: Instant,
    /// Writing failed because the peer closed its end; reading goes on until end-of-file.
    peer_gone: bool,
    /// Reused buffer into which small frames are copied for one write.
    staging: Vec<u8>,
    /// The user dropped every `Sender` (handoff's own uncounted ones may remain).
    senders_gone: bool,
    /// Replies we owe the peer.
    owed: Owed,
    /// The runtime is gone: the socket is used directly, without tokio's readiness (see
    /// [`Driver::linger`]).
    lingering: bool,
}

impl Driver {
    pub(crate) fn new(
        socket: ChannelSocket,
        config: ChannelConfig,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
        messages: mpsc::UnboundedSender<Result<Message, RecvError>>,
    ) -> Driver {
        Driver {
            socket,
            decoder: Decoder::new(config.max_frame_len)
                .with_max_depth(config.max_depth)
                .with_recycler(shared.recv_spares.clone()),
            config,
            shared,
            commands,
            commands_open: true,
            messages,
            read_buf: vec![0; READ_CHUNK],
            decoded: Vec::new(),
            write_queue: VecDeque::new(),
            front_written: 0,
            held: VecDeque::new(),
            in_flight: VecDeque::new(),
            handles_outstanding: 0,
            disconnecting: false,
            finished: false,
            socket_lists: ReceiveLists::default(),
            next_close_check: Instant::now(),
            peer_gone: false,
            staging: Vec::new(),
            senders_gone: false,
            owed: Owed::default(),
            lingering: false,
        }
    }

    /// Drives the channel until it closes. If the future is dropped first — even before it was
    /// ever polled (the runtime shut down: `main` returned right after sending) — what is still
    /// queued is written synchronously, for at most [`ChannelConfig::linger`], before the
    /// channel closes.
    pub(crate) fn run(self) -> impl std::future::Future<Output = ()> + Send + 'static {
        /// Owns the driver while it runs; dropped early, it lingers.
        struct Running(Option<Driver>);
        impl Drop for Running {
            fn drop(&mut self) {
                if let Some(mut driver) = self.0.take() {
                    driver.linger();
                    driver.close();
                }
            }
        }
        // Made here, not inside the async block, so that it exists (and lingers when dropped)
        // from the moment the future is created.
        let mut running = Running(Some(self));
        async move {
            running.0.as_mut().expect("set above").run_loop().await;
            running.0.take().expect("set above").close();
        }
    }

    async fn run_loop(&mut self) {
        loop {
            self.absorb_commands();
            if self.socket_lists.has_close_requests() && Instant::now() >= self.next_close_check {
                self.answer_closed_lists();
                self.next_close_check = Instant::now() + CLOSE_POLL;
            }
            if let Err(e) = self.write_ready() {
                if is_peer_gone(&e) {
                    // The peer closed its end: what it sent before is still to be read, up to
                    // the end-of-file that closes the channel.
                    self.peer_gone = true;
                    self.owed.clear();
                } else {
                    self.report(RecvError::Io(e));
                    break;
                }
            }
            if self.finished || self.done_disconnecting() || self.abandoned() {
                break;
            }
            let want_write = self.has_unwritten() && !self.peer_gone;
            if !want_write {
                self.socket.write_idle();
            } else if !self.socket.is_write_blocked() {
                // Not blocked, yet something is left: only possible if a write was cut short
                // without EAGAIN; wait for room the safe way.
                self.socket.write_blocked();
            }
            let may_read = self.may_read();
            // Not reading for want of room in the receive queue: wake when the user takes some.
            let recv_full = !may_read && self.recv_full();
            tokio::select! {
                biased;
                command = self.commands.recv(), if self.commands_open => match command {
                    Some(command) => self.on_command(command),
                    None => self.commands_open = false,
                },
                ready = self.socket.writable(), if want_write => {
                    if let Err(e) = ready {
                        self.report(RecvError::Io(e));
                        break;
                    }
                }
                ready = self.socket.readable(), if may_read => {
                    if let Err(e) = ready {
                        self.report(RecvError::Io(e));
                        break;
                    }
                    self.read_ready();
                }
                _ = self.shared.recv_space.notified(), if recv_full => {}
                _ = tokio::time::sleep_until(self.next_close_check), if self.socket_lists.has_close_requests() => {}
                _ = self.messages.closed(), if !self.messages.is_closed() => {}
            }
        }
    }

    /// The runtime dropped the driver before the channel closed (`main` returned while messages
    /// were queued): write them now, synchronously, reading the peer's acknowledgements where a
    /// frame waits behind a handle, for at most [`ChannelConfig::linger`]. A Node child's process
    /// stays alive until its pending writes finish; this is the bounded equivalent.
    fn linger(&mut self) {
        self.lingering = true;
        self.absorb_commands();
        let deadline = linger_deadline(self.config.linger);
        while !self.finished && !self.peer_gone {
            if let Err(e) = self.write_ready() {
                tracing::debug!(error = %e, "handoff channel: writing at exit failed");
                return;
            }
            // Frames held behind a handle move on only when its acknowledgement is read; reading
            // keeps to the same bounds as ever.
            let want_read = !self.held.is_empty() && self.may_read();
            let want_write = self.has_unwritten();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if (!want_write && !want_read) || self.peer_gone || left.is_zero() {
                return;
            }
            if sys::wait_socket(self.socket.fd(), want_read, want_write, left).is_err() {
                return;
            }
            if want_read {
                self.read_ready();
            }
        }
    }

    /// Anything queued that is not written yet: frames (also those held behind handles) or
    /// replies.
    fn has_unwritten(&self) -> bool {
        !self.write_queue.is_empty() || !self.owed.is_empty()
    }

    /// The receiver's queue is at its byte or descriptor budget. With the receiver gone nothing
    /// will ever drain it: then it never counts, or the channel would never read (and ACK, and see
    /// end-of-file) again.
    fn recv_full(&self) -> bool {
        self.recv_room() == 0
    }

    /// Bytes the receiver's queue may still take (`usize::MAX` with no receiver), 0 when it is at
    /// its byte or descriptor budget.
    ///
    /// While one of our handles awaits the peer's acknowledgement, both budgets double: the
    /// acknowledgement may sit behind what the peer sent since, and a user who awaits that
    /// delivery before receiving would otherwise wait forever (the peer, Node included, goes on
    /// sending as long as we read). A peer that withholds the acknowledgement still gets no more
    /// than twice the budgets.
    fn recv_room(&self) -> usize {
        if self.messages.is_closed() {
            return usize::MAX;
        }
        let factor = if self.in_flight.is_empty() { 1 } else { 2 };
        let handles = self.shared.recv_handles_queued.load(Ordering::SeqCst);
        if handles >= factor * self.config.recv_handles {
            return 0;
        }
        let queued = self.shared.recv_queued.load(Ordering::SeqCst);
        (factor * self.config.recv_buffer).saturating_sub(queued)
    }

    /// Whether to read now: room in the receive queue and in the replies we owe.
    fn may_read(&self) -> bool {
        !self.recv_full() && !self.replies_full()
    }

    /// How much one read may take: all of the buffer while the receive queue has room for what
    /// it could expand to, less as the queue fills (see [`MAX_EXPANSION`]).
    fn read_limit(&self) -> usize {
        (self.recv_room() / MAX_EXPANSION).clamp(MIN_READ, READ_CHUNK)
    }

    /// We owe the peer as many replies as we hold for it: read no more requests until it reads.
    fn replies_full(&self) -> bool {
        self.owed.bytes >= self.config.reply_buffer
    }

    /// All senders and the receiver are gone and nothing is left to do: close like a disconnect.
    fn abandoned(&self) -> bool {
        (!self.commands_open || self.senders_gone)
            && self.messages.is_closed()
            && self.write_queue.is_empty()
            && self.held.is_empty()
            && self.in_flight.is_empty()
            && self.owed.is_empty()
    }

    fn done_disconnecting(&self) -> bool {
        self.disconnecting
            && self.write_queue.is_empty()
            && self.held.is_empty()
            && self.in_flight.is_empty()
            && self.owed.is_empty()
    }

    /// One `sendmsg`, tried directly (see [`ChannelSocket`]); a full buffer registers for
    /// writability while the runtime runs (when lingering, [`Driver::linger`] polls instead).
    fn send(
        socket: &mut ChannelSocket,
        lingering: bool,
        bufs: &[IoSlice<'_>],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<usize> {
        let result = sys::send_with_fds(socket.fd(), bufs, fds);
        if let Err(e) = &result {
            if e.kind() == io::ErrorKind::WouldBlock && !lingering {
                socket.write_blocked();
            }
        }
        result
    }

    fn absorb_commands(&mut self) {
        while self.commands_open {
            match self.commands.try_recv() {
                Ok(command) => self.on_command(command),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.commands_open = false,
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Write(outgoing) => self.enqueue(outgoing),
            Command::Disconnect => self.disconnecting = true,
            Command::SendersGone => self.senders_gone = true,
        }
    }

    /// Puts a user frame in `write_queue`, or in `held` when it must wait behind handles.
    fn enqueue(&mut self, outgoing: Outgoing) {
        if self.may_write_now(&outgoing) {
            self.push_write(outgoing);
        } else {
            self.held.push_back(outgoing);
        }
    }

    fn may_write_now(&self, outgoing: &Outgoing) -> bool {
        if !self.held.is_empty() {
            return false;
        }
        let window = self.config.handle_window;
        if outgoing.handle.is_some() {
            self.handles_outstanding < window
        } else {
            // Node's rule (window 1): everything waits behind an unacknowledged handle.
            window > 1 || self.handles_outstanding == 0
        }
    }

    fn push_write(&mut self, outgoing: Outgoing) {
        if outgoing.handle.is_some() {
            self.handles_outstanding += 1;
        }
        self.write_queue.push_back(outgoing);
    }

    /// A handle was resolved: let waiting frames through.
    fn release_held(&mut self) {
        while let Some(next) = self.held.front() {
            let window = self.config.handle_window;
            let fits = if next.handle.is_some() {
                self.handles_outstanding < window
            } else {
                window > 1 || self.handles_outstanding == 0
            };
            if !fits {
                break;
            }
            let next = self.held.pop_front().expect("front exists");
            self.push_write(next);
        }
    }

    /// A protocol reply: never held behind our own handles (protocol doc §4.2).
    fn push_reply(&mut self, reply: Reply) {
        if !self.peer_gone {
            self.owed.push(reply);
        }
    }

    /// Renders the next batch of owed replies into `owed.out`.
    fn render_replies(&mut self) {
        let Driver { owed, socket_lists, .. } = self;
        owed.out.clear();
        owed.out_written = 0;
        while owed.out.len() < REPLY_BATCH {
            let Some(reply) = owed.queue.pop_front() else { break };
            owed.bytes -= Owed::cost(&reply);
            match reply {
                Reply::Ack => owed.out.extend_from_slice(envelope::ACK),
                Reply::Nack => owed.out.extend_from_slice(envelope::NACK),
                Reply::Count(key) => {
                    owed.counts.remove(&key);
                    let count = socket_lists.count(&key);
                    envelope::encode_count(&mut owed.out, &key, count);
                }
                Reply::AllClosed(key) => {
                    owed.all_closed.remove(&key);
                    envelope::encode_all_closed(&mut owed.out, &key);
                }
            }
        }
        owed.user_turn = true;
    }

    /// Writes as much as the socket takes without blocking: owed replies between frames (taking
    /// turns with the user's frames), then `write_queue`.
    fn write_ready(&mut self) -> io::Result<()> {
        if self.peer_gone {
            return Ok(());
        }
        loop {
            if self.owed.out_written < self.owed.out.len() {
                let result = Driver::send(&mut self.socket, self.lingering, &[IoSlice::new(&self.owed.out[self.owed.out_written..])], &[]);
                match result {
                    Ok(n) => self.owed.out_written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            let user_waits = !self.write_queue.is_empty() && self.owed.user_turn;
            if self.front_written == 0 && !self.owed.queue.is_empty() && !user_waits {
                self.render_replies();
                continue;
            }
            let Some(front) = self.write_queue.front() else { return Ok(()) };
            self.owed.user_turn = false;
            if front.bytes.is_empty() {
                let done = self.write_queue.pop_front().expect("front exists");
                self.on_written(done);
                continue;
            }
            let result = if let (Some(handle), 0) = (&front.handle, self.front_written) {
                // A handle frame starts its own sendmsg, carrying the fd with its first byte, and
                // nothing after it rides on that sendmsg (the receiver binds fds to the last
                // handle frame starting in a read).
                Driver::send(&mut self.socket, self.lingering, &[IoSlice::new(&front.bytes)], &[handle.fd()])
            } else if front.bytes.len() - self.front_written < SMALL_FRAME {
                // Small frames are copied into one buffer: the kernel's per-segment cost for a
                // writev of many tiny iovecs is far above a userspace memcpy.
                self.staging.clear();
                for (i, item) in self.write_queue.iter().enumerate() {
                    let bytes = if i == 0 { &item.bytes[self.front_written..] } else { &item.bytes[..] };
                    if i > 0 && (item.handle.is_some() || bytes.len() >= SMALL_FRAME) {
                        break;
                    }
                    self.staging.extend_from_slice(bytes);
                    if self.staging.len() >= MAX_STAGED_BYTES {
                        break;
                    }
                }
                Driver::send(&mut self.socket, self.lingering, &[IoSlice::new(&self.staging)], &[])
            } else {
                // Large frames go out as they are, gathered without copying.
                let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                let mut total = 0;
                for (i, item) in self.write_queue.iter().enumerate() {
                    if i > 0 && item.handle.is_some() {
                        break;
                    }
                    let bytes = if i == 0 { &item.bytes[self.front_written..] } else { &item.bytes[..] };
                    iov[count] = IoSlice::new(bytes);
                    count += 1;
                    total += bytes.len();
                    if count == MAX_IOVECS || total >= MAX_GATHER_BYTES {
                        break;
                    }
                }
                Driver::send(&mut self.socket, self.lingering, &iov[..count], &[])
            };
            match result {
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// `n` bytes from the front of `write_queue` are written.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let front = self.write_queue.front().expect("bytes were written from it");
            let left = front.bytes.len() - self.front_written;
            if n < left {
                self.front_written += n;
                return;
            }
            n -= left;
            self.front_written = 0;
            let done = self.write_queue.pop_front().expect("front exists");
            self.on_written(done);
        }
        // Zero-length markers (flush) right behind are complete too.
        while self.write_queue.front().is_some_and(|o| o.bytes.is_empty()) {
            let done = self.write_queue.pop_front().expect("front exists");
            self.on_written(done);
        }
    }

    fn on_written(&mut self, outgoing: Outgoing) {
        let Outgoing { bytes, handle, permits, written } = outgoing;
        if permits > 0 {
            self.shared.send_budget.add_permits(permits as usize);
        }
        if let Some(written) = written {
            let _ = written.send(Ok(()));
        }
        match handle {
            Some(handle) => self.in_flight.push_back(InFlight { bytes, handle }),
            // Its buffer serves the next large message (see `recycle`).
            None => self.shared.send_spares.give(bytes),
        }
    }

    fn read_ready(&mut self) {
        for i in 0..READS_PER_WAKE {
            // A budget filled by the last read: stop here, the peer's bytes wait in the kernel.
            if i > 0 && !self.may_read() {
                return;
            }
            let limit = self.read_limit();
            let mut fds = Vec::new();
            let mut drained_read = None;
            let buf = &mut self.read_buf[..limit];
            let socket = &self.socket;
            let mut read = |fd: std::os::fd::BorrowedFd<'_>| {
                let received = sys::recv_with_fds(fd, buf, &mut fds)?;
                // A short read that brought no descriptors found the socket's queue empty (the
                // kernel ends a read early only at a segment that carried descriptors), so say
                // WouldBlock here: tokio then clears the readiness it saw before this read
                // (never a newer one), sparing the read that would only return EAGAIN.
                if received.len > 0 && received.len < buf.len() && fds.is_empty() {
                    drained_read = Some(received);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(received)
            };
            let result = if self.lingering { read(socket.fd()) } else { socket.try_read(read) };
            let (result, drained) = match (result, drained_read) {
                (_, Some(received)) => (Ok(received), true),
                (result, None) => (result, false),
            };
            match result {
                Ok(received) => {
                    if received.control_truncated {
                        self.report(RecvError::ControlTruncated);
                    }
                    if received.len == 0 {
                        drop(fds);
                        self.on_eof();
                        return;
                    }
                    let mut decoded = std::mem::take(&mut self.decoded);
                    self.decoder.decode(&self.read_buf[..received.len], fds, &mut decoded);
                    for item in decoded.drain(..) {
                        self.on_decoded(item);
                    }
                    self.decoded = decoded;
                    if drained || received.len < limit {
                        // Drained (or stopped at descriptors): let the loop write replies
                        // before reading on.
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A peer that exits with our bytes unread resets the connection: that is how a
                // child usually goes away, and Node treats it as a plain disconnect too.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.on_eof();
                    return;
                }
                Err(e) => {
                    self.report(RecvError::Io(e));
                    self.on_eof();
                    return;
                }
            }
        }
    }

    fn on_eof(&mut self) {
        let mut decoded = Vec::new();
        self.decoder.finish(&mut decoded);
        for item in decoded {
            self.on_decoded(item);
        }
        self.finished = true;
    }

    fn on_decoded(&mut self, item: Decoded) {
        match item {
            Decoded::Frame(frame) => self.on_frame(frame),
            Decoded::Error(e) => self.report(RecvError::Frame(e)),
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        let Some(cmd) = frame.internal_cmd.as_deref() else {
            self.deliver(Message { json: frame.text, handle: None, internal: None, recycle: None });
            return;
        };
        if self.shared.observers.any() {
            let had_fd = frame.fd.is_some();
            self.shared.observers.publish(InternalMessage { json: frame.text.as_str().into(), had_fd });
        }
        match cmd {
            "NODE_HANDLE" => self.on_handle_frame(frame),
            "NODE_HANDLE_ACK" => self.on_ack(),
            "NODE_HANDLE_NACK" => self.on_nack(),
            "NODE_SOCKET_GET_COUNT" | "NODE_SOCKET_NOTIFY_CLOSE" | "NODE_SOCKET_COUNT"
            | "NODE_SOCKET_ALL_CLOSED" => self.on_socket_list(cmd, &frame.text),
            // Other internal commands are not for user code: delivered only to a receiver that
            // asked for them (a cluster speaks NODE_CLUSTER), dropped otherwise, as a Node
            // receiver drops internal messages it has no listener for.
            _ if self.config.receive_internal => {
                let internal = Some(cmd.into());
                self.deliver(Message { json: frame.text, handle: None, internal, recycle: None });
            }
            _ => {}
        }
    }

    fn on_handle_frame(&mut self, frame: Frame) {
        let envelope = envelope::parse_handle(&frame.text);
        let Some(fd) = frame.fd else {
            self.push_reply(Reply::Nack);
            let handle_type = envelope.map(|e| excerpt(&e.handle_type, EXCERPT)).unwrap_or_default();
            self.report(RecvError::HandleWithoutFd { handle_type });
            return;
        };
        // Exactly one ACK per handle message, before converting it — even for Node's
        // double-wrapped retransmission, and even if the handle is then refused.
        self.push_reply(Reply::Ack);
        let envelope = match envelope {
            Ok(envelope) => envelope,
            Err(e) => {
                drop(fd);
                self.report(RecvError::HandleRejected {
                    message: String::new(),
                    handle_type: String::new(),
                    reason: e.to_string(),
                });
                return;
            }
        };
        // A handle whose message is itself internal (Node's cluster sends connections and shared
        // listeners so): for a receiver that speaks that protocol only.
        let internal = super::frame::probe(&envelope.msg, usize::MAX).ok().flatten();
        if internal.is_some() && !self.config.receive_internal {
            tracing::debug!(cmd = ?internal, "closing a handle that came with an internal message nobody here speaks");
            return;
        }
        match check_handle(&envelope, fd) {
            Ok(handle) => self.deliver(Message {
                json: envelope.msg,
                handle: Some(handle),
                internal: internal.map(Into::into),
                recycle: None,
            }),
            Err(reason) => self.report(RecvError::HandleRejected {
                message: envelope.msg,
                handle_type: excerpt(&envelope.handle_type, EXCERPT),
                reason,
            }),
        }
    }

    fn on_ack(&mut self) {
        let Some(acked) = self.in_flight.pop_front() else {
            self.report(RecvError::UnexpectedAck { cmd: "NODE_HANDLE_ACK" });
            return;
        };
        self.handles_outstanding -= 1;
        acked.handle.acknowledged();
        self.release_held();
    }

    fn on_nack(&mut self) {
        let Some(InFlight { bytes, mut handle }) = self.in_flight.pop_front() else {
            self.report(RecvError::UnexpectedAck { cmd: "NODE_HANDLE_NACK" });
            return;
        };
        handle.attempts += 1;
        if handle.attempts > u16::from(self.config.max_retransmits) {
            self.handles_outstanding -= 1;
            let attempts = handle.attempts;
            handle.fail(SendError::NotDelivered { attempts });
            self.release_held();
            return;
        }
        // Resent unchanged (Node v20 wraps it again, which makes a Node receiver ACK twice).
        self.write_queue.push_back(Outgoing { bytes, handle: Some(handle), permits: 0, written: None });
    }

    /// Node's socket-list protocol (protocol doc §6).
    fn on_socket_list(&mut self, cmd: &str, text: &str) {
        #[derive(serde::Deserialize)]
        struct SocketListMessage {
            key: String,
            #[serde(default)]
            count: usize,
        }
        let message = match super::json::from_str::<SocketListMessage>(text) {
            Ok(message) if message.key.len() <= MAX_KEY_LEN => message,
            Ok(message) => {
                let reason = format!(
                    "its key is {} bytes long, over the {MAX_KEY_LEN}-byte limit (handoff::server::MAX_KEY_LEN); \
                     no socket is filed under such a key",
                    message.key.len()
                );
                self.report(RecvError::InternalRejected { cmd: cmd.to_owned(), reason });
                return;
            }
            Err(e) => {
                let reason = format!("it needs a string key and a numeric count: {}", excerpt(&e.to_string(), 200));
                self.report(RecvError::InternalRejected { cmd: cmd.to_owned(), reason });
                return;
            }
        };
        let key = message.key;
        match cmd {
            "NODE_SOCKET_GET_COUNT" => self.push_reply(Reply::Count(key.into())),
            "NODE_SOCKET_NOTIFY_CLOSE" => {
                // Checked within CLOSE_POLL; a check already due sooner (for another key) stays.
                self.next_close_check = self.next_close_check.min(Instant::now() + CLOSE_POLL);
                if self.socket_lists.request_close(&key) {
                    self.push_reply(Reply::AllClosed(key.into()));
                }
            }
            "NODE_SOCKET_COUNT" => self.shared.replies.resolve(ReplyKind::Count, &key, message.count),
            _ => self.shared.replies.resolve(ReplyKind::AllClosed, &key, 0),
        }
    }

    /// Answers the close requests whose sockets have all closed since they were asked.
    fn answer_closed_lists(&mut self) {
        for key in self.socket_lists.now_closed() {
            self.push_reply(Reply::AllClosed(key));
        }
    }

    fn deliver(&mut self, mut message: Message) {
        if message.json.capacity() >= super::recycle::RECYCLE_MIN {
            message.recycle = Some(self.shared.recv_spares.clone());
        }
        if let Some(handle) = &message.handle {
            if let (HandleType::NetSocket, Some(key)) = (handle.handle_type, &handle.key) {
                if let Ok(socket) = sys::FdIdentity::of(handle.fd.as_fd()) {
                    self.socket_lists.add(key, socket);
                }
            }
        }
        self.queue_for_user(Ok(message));
    }

    fn report(&mut self, error: RecvError) {
        tracing::debug!(%error, "handoff channel");
        self.queue_for_user(Err(error));
    }

    /// Hands an item to the receiver, counting it against `recv_buffer` (reading pauses above
    /// it). With no receiver left the item is dropped here, closing any handle it carries.
    fn queue_for_user(&mut self, item: Result<Message, RecvError>) {
        if self.messages.is_closed() {
            return;
        }
        self.shared.recv_queued.fetch_add(queued_cost(&item), Ordering::SeqCst);
        if carries_handle(&item) {
            self.shared.recv_handles_queued.fetch_add(1, Ordering::SeqCst);
        }
        let _ = self.messages.send(item);
    }

    /// Tears the channel down: closes the socket, fails what is pending, ends the streams.
    fn close(mut self) {
        self.shared.connected.store(false, Ordering::SeqCst);
        self.shared.send_budget.close();
        self.shared.handle_budget.close();
        self.commands.close();
        let front_partly_written = self.front_written > 0;
        let mut unwritten: Vec<(Outgoing, bool)> = Vec::new();
        for (i, outgoing) in self.write_queue.drain(..).enumerate() {
            unwritten.push((outgoing, i == 0 && front_partly_written));
        }
        unwritten.extend(self.held.drain(..).map(|o| (o, false)));
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Write(outgoing) = command {
                unwritten.push((outgoing, false));
            }
        }
        for (outgoing, partly_written) in unwritten {
            if let Some(handle) = outgoing.handle {
                handle.fail(SendError::Disconnected { written: partly_written });
            }
            if let Some(written) = outgoing.written {
                let _ = written.send(Err(SendError::Closed));
            }
        }
        for in_flight in self.in_flight.drain(..) {
            in_flight.handle.fail(SendError::Disconnected { written: true });
        }
        drop(self.socket);
        self.shared.replies.close();
        self.shared.observers.close();
        self.shared.closed.send_replace(true);
        self.shared.recv_space.notify_one();
    }
}

/// Checks a received handle against its envelope: a known type, a descriptor of the kind that
/// type promises, `dgramType` filled for UDP.
fn check_handle(envelope: &HandleEnvelope, fd: OwnedFd) -> Result<ReceivedHandle, String> {
    let Some(handle_type) = HandleType::from_wire(&envelope.handle_type) else {
        return Err(format!(
            "{:?} is not a handle type Node defines",
            excerpt(&envelope.handle_type, EXCERPT)
        ));
    };
    if let Some(key) = envelope.key.as_ref().filter(|key| key.len() > MAX_KEY_LEN) {
        return Err(format!(
            "its server key is {} bytes long, over the {MAX_KEY_LEN}-byte limit \
             (handoff::server::MAX_KEY_LEN; Node's keys are like 4:127.0.0.1:8080)",
            key.len()
        ));
    }
    let kind = sys::classify(fd.as_fd()).map_err(|e| format!("cannot inspect the descriptor: {e}"))?;
    if !handle_type.accepts(kind) {
        return Err(format!("the descriptor is {kind:?}, which a {handle_type} cannot be"));
    }
    let dgram_type = match handle_type {
        HandleType::DgramSocket | HandleType::DgramNative => envelope
            .dgram_type
            .as_deref()
            .and_then(DgramType::from_wire)
            .or_else(|| DgramType::of(kind)),
        _ => None,
    };
    Ok(ReceivedHandle { handle_type, kind, fd, key: envelope.key.clone(), dgram_type })
}

/// When lingering channels must give up: `linger` from now, or the deadline of another channel
/// already lingering in the same shutdown, whichever comes first — so a process with many
/// channels waits at most about `linger` in all, not once per channel.
fn linger_deadline(linger: std::time::Duration) -> std::time::Instant {
    use std::sync::Mutex;
    static SHARED: Mutex<Option<std::time::Instant>> = Mutex::new(None);
    let now = std::time::Instant::now();
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    let own = now + linger;
    match *shared {
        // Another channel of this shutdown is lingering until then.
        Some(deadline) if deadline > now => deadline.min(own),
        _ => {
            *shared = Some(own);
            own
        }
    }
}

/// Write errors that mean the peer has closed its end of the channel.
fn is_peer_gone(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset)
}
