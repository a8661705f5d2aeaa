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
use crate::sys::sock_diag::SocketKey;

/// Most connections one message from an accepting task carries to the supervisor.
const ACCEPT_BATCH: usize = 64;

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
#[derive(Debug, Clone)]
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
    /// How the kernel's socket diagnostics find it later, to count it open or closed.
    pub(crate) key: Option<SocketKey>,
}

/// Sends a connection as `net.Native` (what Node's primary sends in `newconn`), without asking
/// the kernel what it is: the primary accepted it from its own listener.
impl IntoWire for Accepted {
    type Back = ();
    fn into_wire(self) -> Result<WireHandle, (HandleError, ())> {
        Ok(WireHandle::trusted(HandleType::NetNative, self.kind, self.fd, None))
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
        Ok(WireHandle::trusted(HandleType::NetNative, FdKind::TcpListener, self.0, None))
    }
    fn give_back(_held: Box<dyn Held>) {}
    fn unsent(self) {}
}

/// Accepts on `listener` for as long as the primary runs, passing each connection to the
/// supervisor. At most `budget` connections are waiting for a worker at once: past that, accepting
/// pauses and clients wait in the kernel's backlog.
pub(crate) async fn accept_loop(
    id: usize,
    listener: &Listener,
    budget: Arc<Semaphore>,
    inputs: mpsc::Sender<Input>,
) {
    let conn_kind = listener.conn_kind;
    // Our side of each connection: the listener's address, unless it is a wildcard (then the
    // kernel says which of ours the client reached).
    let fixed_local = match listener.addr {
        BoundAddr::Tcp(addr) if !addr.ip().is_unspecified() => Some(addr),
        _ => None,
    };
    let Ok(readiness) = crate::sys::watch_readable(listener.fd.clone()) else {
        tracing::error!(listener = id, "cannot watch a listening socket");
        return;
    };
    let mut retry = AcceptRetry::new();
    let accept = |fd: &OwnedFd| {
        rustix::net::acceptfrom_with(fd.as_fd(), rustix::net::SocketFlags::CLOEXEC).map_err(io::Error::from)
    };
    loop {
        // Every connection waiting in the backlog now (up to the budget and ACCEPT_BATCH) goes to
        // the supervisor in one message: one wake-up of it per batch, not per connection.
        let Ok(first) = budget.clone().acquire_owned().await else { return };
        let mut permit = Some(first);
        let mut batch = Vec::new();
        while batch.is_empty() {
            let Ok(mut ready) = readiness.readable().await else { return };
            while batch.len() < ACCEPT_BATCH {
                let Some(this) = permit.take().or_else(|| budget.clone().try_acquire_owned().ok()) else { break };
                match ready.try_io(|inner| accept(inner.get_ref())) {
                    Ok(Ok((fd, peer))) => {
                        retry.accepted();
                        let key = socket_key(&fd, conn_kind, fixed_local, peer);
                        batch.push((Accepted { fd: Arc::new(fd), kind: conn_kind, key }, this));
                    }
                    Ok(Err(error)) => {
                        permit = Some(this);
                        if batch.is_empty() && retry.wait(error).await.is_err() {
                            tracing::error!(listener = id, "the listening socket failed; no longer accepting");
                            return;
                        }
                        // (With connections in hand, they go first; the error comes back next.)
                        break;
                    }
                    Err(_would_block) => {
                        permit = Some(this);
                        break;
                    }
                }
            }
        }
        if inputs.send(Input::Accepted { listener: id, conns: batch }).await.is_err() {
            return;
        }
    }
}

/// What identifies an accepted connection to the kernel's socket diagnostics: its addresses (TCP;
/// one `getsockname` only behind a wildcard listener) or its inode (Unix; one `fstat`).
fn socket_key(
    fd: &OwnedFd,
    kind: FdKind,
    fixed_local: Option<SocketAddr>,
    peer: Option<rustix::net::SocketAddrAny>,
) -> Option<SocketKey> {
    match kind {
        FdKind::TcpStream => {
            let peer = SocketAddr::try_from(peer?).ok()?;
            let local = match fixed_local {
                Some(local) => local,
                None => SocketAddr::try_from(rustix::net::getsockname(fd).ok()?).ok()?,
            };
            Some(SocketKey::Tcp { local, peer })
        }
        FdKind::UnixStream => Some(SocketKey::Unix(rustix::fs::fstat(fd).ok()?.st_ino)),
        _ => None,
    }
}

/// A permit for one connection between accept and a worker's `accepted`.
pub(crate) type Permit = OwnedSemaphorePermit;
