//! The primary's listening sockets: binding them, accepting on them (round-robin), and the
//! connections it hands over.
//!
//! A listener is bound once and kept until the primary stops, whatever the workers do: with no
//! worker alive, new clients wait in its backlog instead of being refused (Node's primary closes
//! it when the last worker leaves).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::{Input, ListenAddr};
use crate::handle::{FdKind, HandleError, HandleType, Held, IntoWire, WireHandle};
use crate::server::AcceptRetry;

/// Backlog of the primary's listening sockets.
pub(crate) const BACKLOG: i32 = 1024;

/// Where a bound listener is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    /// A TCP address (the port the system picked, for port 0).
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for BoundAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BoundAddr::Tcp(addr) => write!(f, "{addr}"),
            BoundAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A listening socket of the primary.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) addr: BoundAddr,
    pub(crate) fd: Arc<OwnedFd>,
    /// What the accepted sockets are.
    pub(crate) conn_kind: FdKind,
}

impl Listener {
    /// Binds and listens on `addr`; non-blocking when the primary accepts on it itself, blocking
    /// when it is only shared with workers (the flag is the socket's, shared with every worker,
    /// and a `LISTEN_FDS` program expects a blocking socket, as systemd passes it).
    pub(crate) fn bind(addr: &ListenAddr, nonblocking: bool) -> io::Result<Listener> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let (socket, conn_kind) = match addr {
            ListenAddr::Tcp(addr) => {
                let socket = Socket::new(Domain::for_address(*addr), Type::STREAM.cloexec(), None)?;
                socket.set_reuse_address(true)?;
                socket.bind(&SockAddr::from(*addr)).map_err(|e| bind_error(e, &addr.to_string()))?;
                (socket, FdKind::TcpStream)
            }
            ListenAddr::Unix(path) => {
                let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
                socket
                    .bind(&SockAddr::unix(path)?)
                    .map_err(|e| bind_error(e, &format!("unix:{}", path.display())))?;
                (socket, FdKind::UnixStream)
            }
        };
        socket.listen(BACKLOG)?;
        socket.set_nonblocking(nonblocking)?;
        Listener::adopt(OwnedFd::from(socket), conn_kind)
    }

    /// Takes an already listening socket (from systemd, or from a previous primary).
    pub(crate) fn from_fd(fd: OwnedFd, nonblocking: bool) -> io::Result<Listener> {
        let conn_kind = match crate::sys::classify(fd.as_fd())? {
            FdKind::TcpListener => FdKind::TcpStream,
            FdKind::UnixListener => FdKind::UnixStream,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("descriptor {} is a {other:?}, not a listening TCP or Unix socket", fd.as_raw_fd()),
                ))
            }
        };
        crate::sys::set_nonblocking(fd.as_fd(), nonblocking)?;
        Listener::adopt(fd, conn_kind)
    }

    fn adopt(fd: OwnedFd, conn_kind: FdKind) -> io::Result<Listener> {
        let socket = socket2::SockRef::from(&fd);
        let local = socket.local_addr()?;
        let addr = match local.as_socket() {
            Some(addr) => BoundAddr::Tcp(addr),
            None => BoundAddr::Unix(local.as_pathname().map(Path::to_path_buf).unwrap_or_default()),
        };
        Ok(Listener { addr, fd: Arc::new(fd), conn_kind })
    }
}

fn bind_error(error: io::Error, what: &str) -> io::Error {
    let hint = match error.kind() {
        io::ErrorKind::AddrInUse => " (another process listens there; stop it or pick another --listen)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
        _ => "",
    };
    io::Error::new(error.kind(), format!("cannot listen on {what}: {error}{hint}"))
}

/// A connection the primary accepted, shared between the primary (which keeps it until a worker
/// says `accepted`) and the channel carrying it to that worker.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    pub(crate) fd: Arc<OwnedFd>,
    pub(crate) kind: FdKind,
}

/// Sends a connection as `net.Native` (what Node's primary sends in `newconn`), without asking
/// the kernel what it is: the primary accepted it from its own listener.
impl IntoWire for Accepted {
    type Back = ();
    fn into_wire(self) -> Result<WireHandle, (HandleError, ())> {
        Ok(WireHandle::trusted(HandleType::NetNative, self.kind, self.fd))
    }
    fn give_back(_held: Box<dyn Held>) {}
    fn unsent(self) {}
}

/// A listening socket sent to a worker (shared mode): the primary keeps its own.
#[derive(Debug, Clone)]
pub(crate) struct SharedListener(pub(crate) Arc<OwnedFd>);

impl IntoWire for SharedListener {
    type Back = ();
    fn into_wire(self) -> Result<WireHandle, (HandleError, ())> {
        Ok(WireHandle::trusted(HandleType::NetNative, FdKind::TcpListener, self.0))
    }
    fn give_back(_held: Box<dyn Held>) {}
    fn unsent(self) {}
}

/// Accepts on `listener` for as long as the primary runs, passing each connection to the
/// supervisor. At most `budget` connections are waiting for a worker at once: past that, accepting
/// pauses and clients wait in the kernel's backlog.
pub(crate) async fn accept_loop(
    id: usize,
    listener: Arc<OwnedFd>,
    conn_kind: FdKind,
    budget: Arc<Semaphore>,
    inputs: mpsc::Sender<Input>,
) {
    let Ok(readiness) = crate::sys::watch_readable(listener) else {
        tracing::error!(listener = id, "cannot watch a listening socket");
        return;
    };
    let mut retry = AcceptRetry::new();
    loop {
        let Ok(permit) = budget.clone().acquire_owned().await else { return };
        let fd = loop {
            let Ok(mut ready) = readiness.readable().await else { return };
            match ready.try_io(|inner| {
                rustix::net::accept_with(inner.get_ref().as_fd(), rustix::net::SocketFlags::CLOEXEC)
                    .map_err(io::Error::from)
            }) {
                Ok(Ok(fd)) => {
                    retry.accepted();
                    break fd;
                }
                Ok(Err(error)) => {
                    if retry.wait(error).await.is_err() {
                        tracing::error!(listener = id, "the listening socket failed; no longer accepting");
                        return;
                    }
                }
                Err(_would_block) => continue,
            }
        };
        let accepted = Accepted { fd: Arc::new(fd), kind: conn_kind };
        if inputs.send(Input::Accepted { listener: id, conn: accepted, permit }).await.is_err() {
            return;
        }
    }
}

/// A permit for one connection between accept and a worker's `accepted`.
pub(crate) type Permit = OwnedSemaphorePermit;
