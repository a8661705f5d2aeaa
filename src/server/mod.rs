//! Servers that keep count across processes: Node's `server.getConnections()` and
//! `server.close()` after the server's connections were handed to other processes.
//!
//! A [`Server`] accepts [`Connection`]s and counts those alive in this process. Sending one over a
//! channel (by value, like Node without `keepOpen`) takes it off the local count and puts the
//! server's connection key in the `NODE_HANDLE` envelope; the receiving process — handoff or Node
//! — files the socket under that key. The first such send on a channel adds the channel to the
//! server's list (Node's `SocketListSend`), so that:
//!
//! - [`Server::get_connections`] = local count + every channel's answer to
//!   `NODE_SOCKET_GET_COUNT`;
//! - [`Server::close`] stops accepting at once, sends `NODE_SOCKET_NOTIFY_CLOSE` on every
//!   channel, and resolves once every channel answered `NODE_SOCKET_ALL_CLOSED` (or closed) *and*
//!   the local connections are gone.
//!
//! The receiving half (Node's `SocketListReceive`) runs inside every channel and needs nothing
//! from user code: a received socket is remembered by inode and counts while any descriptor of
//! the process still refers to it, whatever type it was converted into.
//!
//! # Where this differs from Node
//! - `close()` also waits for the server's own connections (Node's `close` with workers stops
//!   counting them once the workers answered).
//! - A channel that closed counts as answered for `close()`, and is dropped from the list, so a
//!   dead child never makes `close()` or `get_connections()` hang. A child that goes away while
//!   a `get_connections()` request is in flight gives [`ServerError::ChildClosedBeforeReply`]
//!   naming it; asked again, the count no longer includes it.
//! - A handoff receiver answers requests for a key it never received (0 / all closed); Node does
//!   not answer them at all. A channel joins the list when a connection is queued on it, so a
//!   Node child that never received any of them (every attempt refused with a NACK, which a
//!   handoff sender never causes: it always attaches the descriptor) would leave `close()`
//!   waiting until that child exits.
//! - [`Server::bind`] keys a server by the port it got, not the one asked for, so servers bound
//!   to port 0 do not share a key (in Node they do, and count each other's connections).
//! - Sent with [`KeepOpen`], a connection is counted by both processes
//!   (as in Node), so `get_connections()` counts each process's copy, and `close()` waits for
//!   both copies to close — the connection is open until both are.
//!
//! # Examples
//! ```no_run
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! let server = handoff::server::Server::bind("127.0.0.1:0").await?;
//! let child = handoff::Command::new("node").arg("echo_child.js").spawn()?;
//! let connection = server.accept().await?;
//! child.send_handle(&"socket", connection).await?;
//! println!("{} connection(s)", server.get_connections().await?); // counts the child's too
//! server.close().await?; // resolves once the child has closed it
//! # Ok(()) }
//! ```

mod accept;
pub(crate) mod socket_list;

pub use accept::AcceptRetry;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;

use crate::handle::{downcast_held, FdKind, HandleError, HandleType, Held, IntoWire, KeepOpen, WireHandle};
use crate::Sender;
use socket_list::ReplyKind;

/// Longest server connection key accepted from a peer, in bytes. Node's keys are short
/// (`4:127.0.0.1:8080`, `-1:/path/of/socket:-1` with a path of at most 108 bytes); a longer one is
/// refused ([`RecvError::HandleRejected`](crate::RecvError::HandleRejected)), so a peer cannot make
/// a receiver keep megabytes per socket.
pub const MAX_KEY_LEN: usize = 1024;

/// Node's connection key for a server listening on `addr`: `<4|6>:<address>:<port>`.
///
/// Node builds it from the arguments given to `listen()`, so a Node server started on port 0
/// keeps port 0 in its key (`4:127.0.0.1:0`).
pub fn connection_key(addr: &SocketAddr) -> String {
    let family = if addr.is_ipv4() { 4 } else { 6 };
    format!("{family}:{}:{}", addr.ip(), addr.port())
}

/// Node's connection key for a server on the Unix socket `path`: `-1:<path>:-1`.
pub fn unix_connection_key(path: &Path) -> String {
    format!("-1:{}:-1", path.display())
}

/// Why a cross-process count or close failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A process holding this server's connections closed its channel before answering
    /// (Node's `ERR_CHILD_CLOSED_BEFORE_REPLY`). Asking again leaves it out.
    #[error(
        "{peer} closed its channel before answering how many of this server's connections it \
         holds (ERR_CHILD_CLOSED_BEFORE_REPLY); ask again to count without it"
    )]
    ChildClosedBeforeReply {
        /// The process, e.g. `child process 1234`.
        peer: String,
    },
    /// `close()` was already called (Node's `ERR_SERVER_NOT_RUNNING`).
    #[error("the server is already closed or closing (ERR_SERVER_NOT_RUNNING)")]
    NotRunning,
}

/// Shared by a server, its connections, and the channels that carry them.
#[derive(Debug)]
pub(crate) struct ServerState {
    key: String,
    /// Connections alive in this process.
    own: AtomicUsize,
    /// Notified when `own` drops to zero (what `close()` waits for). A plain counter: a watch
    /// channel would take eight locks per connection, accepted and sent alike.
    no_own: tokio::sync::Notify,
    /// Channels that were sent at least one of this server's connections.
    channels: Mutex<Vec<Sender>>,
}

impl ServerState {
    /// Adds the channel to the server's list, once; forgets closed channels on the way.
    pub(crate) fn add_channel(&self, sender: &Sender) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.retain(|c| !c.is_closed());
        if !channels.iter().any(|c| c.same_channel(sender)) {
            // Not counted as the user's: the list must not keep a dropped channel open.
            channels.push(sender.uncounted());
        }
    }

    /// The channels still open.
    fn live_channels(&self) -> Vec<Sender> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.retain(|c| !c.is_closed());
        channels.clone()
    }

    fn count_one(self: &Arc<Self>) -> CountGuard {
        self.own.fetch_add(1, Ordering::SeqCst);
        CountGuard(self.clone())
    }
}

/// Keeps one connection in its server's local count while it lives.
#[derive(Debug)]
struct CountGuard(Arc<ServerState>);

impl Drop for CountGuard {
    fn drop(&mut self) {
        if self.0.own.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.no_own.notify_waiters();
        }
    }
}

/// The listening socket, watched for readability only: connections are accepted with one
/// `accept4` each and registered with tokio only if this process reads or writes them (see
/// [`Connection`]), so one handed straight to another process costs no registration.
#[derive(Debug)]
struct Listener {
    readiness: AsyncFd<Arc<OwnedFd>>,
    /// What its connections are: `TcpStream` or `UnixStream`.
    conn_kind: FdKind,
}

impl Listener {
    fn new(fd: OwnedFd, conn_kind: FdKind) -> io::Result<Listener> {
        crate::sys::set_nonblocking(fd.as_fd(), true)?;
        Ok(Listener { readiness: crate::sys::watch_readable(Arc::new(fd))?, conn_kind })
    }
}

/// A listening TCP or Unix socket whose connections are counted across processes. See the
/// [module docs](self).
#[derive(Debug)]
pub struct Server {
    listener: Mutex<Option<Arc<Listener>>>,
    closing: AtomicBool,
    stop: watch::Sender<bool>,
    local_addr: Option<SocketAddr>,
    state: Arc<ServerState>,
}

impl Server {
    /// Listens on `addr` (anything tokio's `TcpListener::bind` takes: `"127.0.0.1:8080"`,
    /// `("127.0.0.1", 0)`, a `SocketAddr`). The key is [`connection_key`] of the address actually
    /// bound: with port
    /// 0 it names the port the system picked, where Node would keep `0` — so two servers on
    /// port 0 get different keys and never count each other's connections (a Node quirk,
    /// protocol doc §10.9). Use [`Server::from_tcp`] to choose the key.
    pub async fn bind(addr: impl tokio::net::ToSocketAddrs) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let key = connection_key(&listener.local_addr()?);
        Server::from_tcp(listener, key)
    }

    /// Listens on the Unix socket `path`; the key is
    /// [`unix_connection_key(path)`](unix_connection_key). Needs a tokio runtime.
    pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<Server> {
        let listener = UnixListener::bind(path.as_ref())?;
        Server::from_unix(listener, unix_connection_key(path.as_ref()))
    }

    /// Wraps a TCP listener, with the key a Node peer should file its connections under. Needs a
    /// tokio runtime.
    pub fn from_tcp(listener: TcpListener, key: impl Into<String>) -> io::Result<Server> {
        let local_addr = listener.local_addr().ok();
        let fd = OwnedFd::from(listener.into_std()?);
        Ok(Server::new(Listener::new(fd, FdKind::TcpStream)?, local_addr, key.into()))
    }

    /// Wraps a Unix listener, with the key a Node peer should file its connections under. Needs
    /// a tokio runtime.
    pub fn from_unix(listener: UnixListener, key: impl Into<String>) -> io::Result<Server> {
        let fd = OwnedFd::from(listener.into_std()?);
        Ok(Server::new(Listener::new(fd, FdKind::UnixStream)?, None, key.into()))
    }

    fn new(listener: Listener, local_addr: Option<SocketAddr>, key: String) -> Server {
        Server {
            listener: Mutex::new(Some(Arc::new(listener))),
            closing: AtomicBool::new(false),
            stop: watch::channel(false).0,
            local_addr,
            state: Arc::new(ServerState {
                key,
                own: AtomicUsize::new(0),
                no_own: tokio::sync::Notify::new(),
                channels: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The connection key written in the envelope of every connection sent.
    pub fn key(&self) -> &str {
        &self.state.key
    }

    /// The TCP address it listens on (`None` for a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Connections of this server alive in this process (not counting other processes).
    pub fn local_connections(&self) -> usize {
        self.state.own.load(Ordering::SeqCst)
    }

    /// Accepts the next connection. After [`close`](Server::close) it fails with
    /// `ErrorKind::NotConnected`. While the process is out of descriptors it waits (the
    /// connections queue in the listen backlog) instead of failing: see [`AcceptRetry`].
    ///
    /// # Cancel safety
    /// Cancel safe: no connection is lost if the future is dropped.
    pub async fn accept(&self) -> io::Result<Connection> {
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(not_running)?;
        let mut stop = self.stop.subscribe();
        let socket = tokio::select! {
            accepted = accept(&listener) => accepted?,
            _ = stop.wait_for(|stopped| *stopped) => return Err(not_running()),
        };
        Ok(Connection { socket, guard: Some(self.state.count_one()) })
    }

    /// Counts this server's connections in this process and in every process it sent some to.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it abandons the requests (replies are then ignored).
    pub async fn get_connections(&self) -> Result<usize, ServerError> {
        let own = self.local_connections();
        let mut requests = tokio::task::JoinSet::new();
        for channel in self.state.live_channels() {
            let key = self.state.key.clone();
            requests.spawn(async move {
                let count = channel.socket_list_request(ReplyKind::Count, &key).await;
                count.ok_or_else(|| ServerError::ChildClosedBeforeReply { peer: channel.peer().to_owned() })
            });
        }
        let mut total = own;
        while let Some(joined) = requests.join_next().await {
            // A peer's count is its own claim: never let it overflow ours.
            total = total.saturating_add(joined.expect("socket-list requests do not panic")?);
        }
        Ok(total)
    }

    /// Stops accepting at once, then waits until every connection of this server — here and in
    /// every process it was sent to — is closed. A process that exits (its channel closes)
    /// counts as having closed them. A second call returns [`ServerError::NotRunning`].
    ///
    /// # Cancel safety
    /// The server stops accepting as soon as this is first polled, whether or not it completes.
    pub async fn close(&self) -> Result<(), ServerError> {
        if self.closing.swap(true, Ordering::SeqCst) {
            return Err(ServerError::NotRunning);
        }
        self.listener.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.stop.send_replace(true);
        // Channels can still join while we wait (a connection held here may be sent on), so
        // repeat until a round finds no channel that was not asked yet.
        let mut asked: Vec<Sender> = Vec::new();
        loop {
            let fresh: Vec<Sender> = self
                .state
                .live_channels()
                .into_iter()
                .filter(|c| !asked.iter().any(|a| a.same_channel(c)))
                .collect();
            if fresh.is_empty() {
                break;
            }
            let mut requests = tokio::task::JoinSet::new();
            for channel in &fresh {
                let (channel, key) = (channel.clone(), self.state.key.clone());
                // A closed channel answers `None`: its process holds nothing any more.
                requests.spawn(async move { channel.socket_list_request(ReplyKind::AllClosed, &key).await });
            }
            while requests.join_next().await.is_some() {}
            asked.extend(fresh);
        }
        loop {
            let zero = self.state.no_own.notified();
            tokio::pin!(zero);
            // Registered before the check: a drop to zero in between still wakes us.
            zero.as_mut().enable();
            if self.state.own.load(Ordering::SeqCst) == 0 {
                break;
            }
            zero.await;
        }
        Ok(())
    }
}

fn not_running() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the server is closed")
}

/// Accepts one connection (non-blocking and close-on-exec from the start: no `FIONBIO` later),
/// waiting out descriptor exhaustion ([`AcceptRetry`]).
///
/// # Cancel safety
/// Cancel safe: a connection is either returned or still in the backlog.
async fn accept(listener: &Listener) -> io::Result<Socket> {
    use rustix::net::SocketFlags;
    let mut retry = AcceptRetry::new();
    loop {
        let accepted = listener
            .readiness
            .async_io(tokio::io::Interest::READABLE, |fd| {
                rustix::net::accept_with(fd, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC).map_err(io::Error::from)
            })
            .await;
        match accepted {
            Ok(fd) => {
                retry.accepted();
                return Ok(Socket::Accepted { fd, kind: listener.conn_kind });
            }
            Err(error) => retry.wait(error).await?,
        }
    }
}

/// A connection's socket: TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-socket connection.
    Unix(UnixStream),
}

/// A connection accepted by a [`Server`], counted while it lives in this process.
///
/// Read and write it directly (it implements tokio's `AsyncRead` and `AsyncWrite`), or hand it
/// to another process with [`Sender::send_handle`](crate::Sender::send_handle): sent by value it
/// leaves this process's count and joins the receiver's; sent with
/// [`KeepOpen`], both processes count it.
///
/// A connection is registered with tokio's reactor only when it is first read, written or
/// turned into a [`Stream`]: one sent straight to another process never is.
#[derive(Debug)]
pub struct Connection {
    socket: Socket,
    guard: Option<CountGuard>,
}

/// A connection's socket: as accepted, or registered with tokio.
#[derive(Debug)]
enum Socket {
    /// Accepted from our own listener (so its kind is known without asking the kernel), not
    /// registered yet.
    Accepted { fd: OwnedFd, kind: FdKind },
    Stream(Stream),
}

impl Socket {
    /// Registers the socket with tokio (once). Registers a duplicate and then closes the
    /// original, so that a failure leaves the connection as it was: with the descriptor table
    /// full, the first use fails with `EMFILE` and can be retried.
    fn stream(&mut self) -> io::Result<&mut Stream> {
        if let Socket::Accepted { fd, kind } = self {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(io::Error::other(
                    "a connection is registered with tokio when first used: use it inside a tokio runtime",
                ));
            }
            let fd = fd.try_clone()?;
            let stream = if *kind == FdKind::UnixStream {
                Stream::Unix(UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?)
            } else {
                Stream::Tcp(TcpStream::from_std(std::net::TcpStream::from(fd))?)
            };
            *self = Socket::Stream(stream);
        }
        match self {
            Socket::Stream(stream) => Ok(stream),
            Socket::Accepted { .. } => unreachable!("registered above"),
        }
    }

    fn into_stream(mut self) -> io::Result<Stream> {
        self.stream()?;
        match self {
            Socket::Stream(stream) => Ok(stream),
            Socket::Accepted { .. } => unreachable!("registered above"),
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Accepted { fd, .. } => fd.as_fd(),
            Socket::Stream(stream) => stream.as_fd(),
        }
    }
}

impl Connection {
    /// The server's connection key.
    pub fn key(&self) -> &str {
        self.guard.as_ref().map_or("", |g| g.0.key.as_str())
    }
    /// The socket, registered with tokio on first use. Fails only if registering does: outside
    /// a tokio runtime, with the descriptor table full (`EMFILE`: registering needs one more for a
    /// moment; the connection is kept, try again), or with the reactor out of memory.
    pub fn stream_mut(&mut self) -> io::Result<&mut Stream> {
        self.socket.stream()
    }
    /// The socket alone, registered with tokio. It no longer counts as one of the server's
    /// connections.
    pub fn into_stream(self) -> io::Result<Stream> {
        let Connection { socket, guard } = self;
        drop(guard);
        socket.into_stream()
    }

    fn server(&self) -> Option<Arc<ServerState>> {
        self.guard.as_ref().map(|g| g.0.clone())
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// Sent by value, a connection leaves this process's count at once (as Node decrements
/// `_connections` at send time) and carries the server's key; the socket itself is held until the
/// peer acknowledges it. If the send fails it comes back as a `Connection`, counted again.
impl IntoWire for Connection {
    type Back = Connection;
    fn into_wire(mut self) -> Result<WireHandle, (HandleError, Connection)> {
        let server = self.server();
        let key = self.key().to_owned();
        self.guard.take();
        let known = match &self.socket {
            Socket::Accepted { kind, .. } => Some(*kind),
            Socket::Stream(_) => None,
        };
        let sent = SentConnection { socket: self.socket, server: server.clone() };
        let wire = match known {
            // Accepted from our own listener: its kind is known, the kernel need not be asked.
            Some(kind) => Ok(WireHandle::trusted(HandleType::NetSocket, kind, sent, Some(key))),
            None => WireHandle::new(HandleType::NetSocket, sent, Some(key)),
        };
        match wire {
            Ok(mut wire) => {
                wire.server = server;
                Ok(wire)
            }
            Err((error, sent)) => Err((error, sent.restore())),
        }
    }
    fn give_back(held: Box<dyn Held>) -> Connection {
        downcast_held::<SentConnection>(held).restore()
    }
    fn unsent(self) -> Connection {
        self
    }
}

/// Sent with `KeepOpen`, a connection is counted by both processes (as in Node).
impl IntoWire for KeepOpen<'_, Connection> {
    type Back = ();
    fn into_wire(self) -> Result<WireHandle, (HandleError, ())> {
        let dup = self.0.as_fd().try_clone_to_owned().map_err(|e| (HandleError::Io(e), ()))?;
        let mut wire = WireHandle::new(HandleType::NetSocket, dup, Some(self.0.key().to_owned()))
            .map_err(|(error, _dup)| (error, ()))?;
        wire.server = self.0.server();
        Ok(wire)
    }
    fn give_back(_dup: Box<dyn Held>) {}
    fn unsent(self) {}
}

/// A connection on its way to another process: the socket, and the server to count it under
/// again if it comes back.
struct SentConnection {
    socket: Socket,
    server: Option<Arc<ServerState>>,
}

impl SentConnection {
    fn restore(self) -> Connection {
        Connection { socket: self.socket, guard: self.server.map(|server| server.count_one()) }
    }
}

impl AsFd for SentConnection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

macro_rules! delegate_io {
    ($self:ident, $s:ident => $call:expr) => {{
        let stream = match $self.get_mut().socket.stream() {
            Ok(stream) => stream,
            Err(e) => return Poll::Ready(Err(e)),
        };
        match stream {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $call
            }
            Stream::Unix($s) => {
                let $s = Pin::new($s);
                $call
            }
        }
    }};
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate_io!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate_io!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_io!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_io!(self, s => s.poll_shutdown(cx))
    }
}
