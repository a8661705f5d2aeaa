//! Handles: the OS objects a message can carry, and their conversion to and from the wire.
//!
//! Node knows five handle types, named in the `type` field of the `NODE_HANDLE` envelope
//! ([`HandleType`]). Every Rust type that can travel implements [`Handle`], the counterpart of
//! Node's `handleConversion` table: a *send* side (which `type`, `key` and `dgramType` to write,
//! and which descriptor to attach) and a *receive* side (turn a [`ReceivedHandle`] into the type,
//! or refuse it and give the handle back).
//!
//! | Rust type | sent as | received from |
//! |---|---|---|
//! | [`std::net::TcpStream`], [`tokio::net::TcpStream`] | `net.Socket` | `net.Socket`, `net.Native` |
//! | [`std::os::unix::net::UnixStream`], [`tokio::net::UnixStream`] | `net.Socket` | `net.Socket`, `net.Native` |
//! | [`std::net::TcpListener`], [`tokio::net::TcpListener`] | `net.Server` | `net.Server`, `net.Native` |
//! | [`std::os::unix::net::UnixListener`], [`tokio::net::UnixListener`] | `net.Server` | `net.Server`, `net.Native` |
//! | [`std::net::UdpSocket`], [`tokio::net::UdpSocket`] | `dgram.Socket` | `dgram.Socket`, `dgram.Native` |
//! | [`Native<T>`] around any of the above | `net.Native` / `dgram.Native` | the same |
//! | [`RawHandle`] (any descriptor, type chosen by the caller) | as chosen, checked | anything |
//! | [`OwnedFd`] | — (not sendable: it has no type) | anything |
//!
//! # Who owns the descriptor
//! Sending **by value** moves the descriptor into the channel: it is held until the peer
//! acknowledges it and then closed — Node's default for `net.Socket`. Sending **by reference**
//! (`&listener`) sends a duplicate and leaves yours open — Node's `keepOpen: true`, and the way to
//! share a listening server or UDP socket while still using it.
//!
//! # Blocking mode
//! `O_NONBLOCK` belongs to the open file description, which the sender and receiver of a handle
//! share. Conversions to tokio types set it (as libuv does on the Node side); conversions to std
//! types leave it as the sender had it, so a std socket from a Node peer is usually non-blocking.

mod net;
mod raw;
mod udp;
mod unix;

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub use crate::sys::FdKind;
pub use raw::RawHandle;

/// The `type` field of a `NODE_HANDLE` envelope: which object Node builds on the receiving side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandleType {
    /// `net.Socket`: a connected TCP or `AF_UNIX` stream socket.
    NetSocket,
    /// `net.Server`: a listening TCP or `AF_UNIX` socket.
    NetServer,
    /// `net.Native`: a raw TCP or pipe handle.
    NetNative,
    /// `dgram.Socket`: a bound UDP socket; needs `dgramType`.
    DgramSocket,
    /// `dgram.Native`: a raw UDP handle.
    DgramNative,
}

impl HandleType {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            HandleType::NetSocket => "net.Socket",
            HandleType::NetServer => "net.Server",
            HandleType::NetNative => "net.Native",
            HandleType::DgramSocket => "dgram.Socket",
            HandleType::DgramNative => "dgram.Native",
        }
    }

    /// Parses a wire name; `None` for a type Node does not define.
    pub fn from_wire(name: &str) -> Option<HandleType> {
        Some(match name {
            "net.Socket" => HandleType::NetSocket,
            "net.Server" => HandleType::NetServer,
            "net.Native" => HandleType::NetNative,
            "dgram.Socket" => HandleType::DgramSocket,
            "dgram.Native" => HandleType::DgramNative,
            _ => return None,
        })
    }

    /// Whether a descriptor of `kind` may travel under this type without breaking a Node peer
    /// (protocol doc §4.1, §4.2).
    pub fn accepts(self, kind: FdKind) -> bool {
        match self {
            HandleType::NetSocket => kind.is_stream(),
            HandleType::NetServer => kind.is_listener(),
            HandleType::NetNative => {
                matches!(
                    kind,
                    FdKind::TcpStream | FdKind::TcpListener | FdKind::UnixStream | FdKind::UnixListener
                )
            }
            HandleType::DgramSocket | HandleType::DgramNative => kind.is_udp(),
        }
    }
}

impl fmt::Display for HandleType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `dgramType` of a `dgram.Socket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DgramType {
    /// `"udp4"`
    Udp4,
    /// `"udp6"`
    Udp6,
}

impl DgramType {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            DgramType::Udp4 => "udp4",
            DgramType::Udp6 => "udp6",
        }
    }
    /// Parses a wire name.
    pub fn from_wire(name: &str) -> Option<DgramType> {
        match name {
            "udp4" => Some(DgramType::Udp4),
            "udp6" => Some(DgramType::Udp6),
            _ => None,
        }
    }
    /// The type that matches a UDP descriptor, if it is one.
    pub fn of(kind: FdKind) -> Option<DgramType> {
        match kind {
            FdKind::Udp4 => Some(DgramType::Udp4),
            FdKind::Udp6 => Some(DgramType::Udp6),
            _ => None,
        }
    }
}

/// A handle ready to be written: the descriptor and the envelope fields that describe it.
#[derive(Debug)]
pub struct WireHandle {
    pub(crate) handle_type: HandleType,
    pub(crate) fd: OwnedFd,
    pub(crate) key: Option<String>,
    pub(crate) dgram_type: Option<DgramType>,
    /// What the kernel says the descriptor is.
    pub(crate) kind: FdKind,
    /// The server whose connection this is: the channel it goes out on joins that server's
    /// socket lists (Node's `SocketListSend`).
    pub(crate) server: Option<std::sync::Arc<crate::server::ServerState>>,
}

impl WireHandle {
    /// Describes `fd` as `handle_type`, after asking the kernel that the descriptor really is of
    /// that kind (a mismatched kind kills a Node receiver). Fills `dgramType` for UDP.
    pub fn new(handle_type: HandleType, fd: OwnedFd) -> Result<WireHandle, HandleError> {
        let kind = crate::sys::classify(fd.as_fd()).map_err(HandleError::Io)?;
        if !handle_type.accepts(kind) {
            return Err(HandleError::KindMismatch { handle_type, kind });
        }
        let dgram_type =
            if handle_type == HandleType::DgramSocket { DgramType::of(kind) } else { None };
        Ok(WireHandle { handle_type, fd, key: None, dgram_type, kind, server: None })
    }

    /// Sets the server connection key written in the envelope (`net.Socket` only): the receiver
    /// files the socket under this key for its server's connection count.
    pub fn with_key(mut self, key: impl Into<String>) -> WireHandle {
        if self.handle_type == HandleType::NetSocket {
            self.key = Some(key.into());
        }
        self
    }

    /// The handle type.
    pub fn handle_type(&self) -> HandleType {
        self.handle_type
    }
}

/// A handle that arrived with a message: the descriptor, what the sender called it, and what the
/// kernel says it is.
///
/// Dropping it closes the descriptor. Convert it with [`ReceivedHandle::into`] or
/// [`Handle::from_received`].
#[derive(Debug)]
pub struct ReceivedHandle {
    pub(crate) handle_type: HandleType,
    pub(crate) kind: FdKind,
    pub(crate) fd: OwnedFd,
    pub(crate) key: Option<String>,
    pub(crate) dgram_type: Option<DgramType>,
}

impl ReceivedHandle {
    /// The `type` the sender wrote.
    pub fn handle_type(&self) -> HandleType {
        self.handle_type
    }
    /// What the descriptor is, according to the kernel.
    pub fn kind(&self) -> FdKind {
        self.kind
    }
    /// The server connection key from the envelope, if the sender's socket came from a server.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
    /// The `dgramType` from the envelope.
    pub fn dgram_type(&self) -> Option<DgramType> {
        self.dgram_type
    }
    /// Converts into `H`, or gives the handle back with the reason it does not fit.
    pub fn into<H: Handle>(self) -> Result<H, ConvertError> {
        H::from_received(self)
    }
    /// The raw descriptor, whatever it is.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Checks that this handle's type is one of `types` and its descriptor satisfies `kind_ok`.
    pub(crate) fn expect(
        self,
        types: &[HandleType],
        kind_ok: fn(FdKind) -> bool,
        wanted: &'static str,
    ) -> Result<OwnedFd, ConvertError> {
        if types.contains(&self.handle_type) && kind_ok(self.kind) {
            Ok(self.fd)
        } else {
            Err(ConvertError::Mismatch { handle: self, wanted })
        }
    }
}

impl AsFd for ReceivedHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One conversion per handle type: the seed's `handleConversion`.
///
/// Implement it to make your own type sendable and receivable. The send side returns the
/// descriptor and envelope fields ([`WireHandle`]); build it with [`WireHandle::new`], which checks
/// the descriptor's kind against the type so that nothing that would crash a Node peer is written.
///
/// # Examples
/// ```
/// use handoff::handle::{ConvertError, Handle, HandleError, HandleType, ReceivedHandle, WireHandle};
/// use std::os::fd::OwnedFd;
///
/// /// A connection that is always sent as a raw `net.Native`.
/// struct Backend(std::net::TcpStream);
///
/// impl Handle for Backend {
///     fn into_wire(self) -> Result<WireHandle, HandleError> {
///         WireHandle::new(HandleType::NetNative, OwnedFd::from(self.0))
///     }
///     fn from_received(handle: ReceivedHandle) -> Result<Self, ConvertError> {
///         handle.into::<std::net::TcpStream>().map(Backend)
///     }
/// }
/// ```
pub trait Handle: Sized {
    /// Send side: gives up the descriptor and says how to describe it.
    fn into_wire(self) -> Result<WireHandle, HandleError>;

    /// Receive side: builds the value from a received handle, or returns the handle untouched.
    fn from_received(handle: ReceivedHandle) -> Result<Self, ConvertError>;
}

/// What can be passed to [`Sender::send_handle`](crate::Sender::send_handle): any [`Handle`] by
/// value (moved, and closed once the peer acknowledges it), a [`KeepOpen`] reference (a duplicate
/// is sent and yours stays open), or a prepared [`WireHandle`].
pub trait IntoWire {
    /// Produces the descriptor and envelope fields.
    fn into_wire_handle(self) -> Result<WireHandle, HandleError>;
}

impl<H: Handle> IntoWire for H {
    fn into_wire_handle(self) -> Result<WireHandle, HandleError> {
        self.into_wire()
    }
}

/// Node's `keepOpen: true`: sends a duplicate of the handle's descriptor and leaves the original
/// with the caller, who can go on using it (both processes then share the socket).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// use handoff::handle::KeepOpen;
/// let (a, _b) = handoff::Channel::pair()?;
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// a.send_handle(&"serve this too", KeepOpen(&listener)).await.unwrap();
/// listener.set_nonblocking(true)?; // still ours
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct KeepOpen<'a, H>(pub &'a H);

impl<H: AsFd + Shareable> IntoWire for KeepOpen<'_, H> {
    fn into_wire_handle(self) -> Result<WireHandle, HandleError> {
        let dup = self.0.as_fd().try_clone_to_owned().map_err(HandleError::Io)?;
        self.0.describe(dup)
    }
}

impl IntoWire for WireHandle {
    fn into_wire_handle(self) -> Result<WireHandle, HandleError> {
        Ok(self)
    }
}

/// Types whose duplicate can be sent while the original stays with the caller.
pub trait Shareable {
    /// Describes `dup`, a duplicate of `self`'s descriptor, as this type would.
    fn describe(&self, dup: OwnedFd) -> Result<WireHandle, HandleError>;
}

/// Why a handle could not be sent. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The descriptor is not what its `type` promises.
    #[error(
        "cannot send a {kind:?} descriptor as {handle_type}: a Node receiver would crash; \
         pick the handle type that matches the descriptor"
    )]
    KindMismatch {
        /// The type asked for.
        handle_type: HandleType,
        /// What the kernel says the descriptor is.
        kind: FdKind,
    },
    /// A system call failed while preparing the handle.
    #[error("preparing the handle failed: {0}")]
    Io(#[source] std::io::Error),
}

/// A received handle could not become the requested type.
///
/// Where possible the handle is given back unharmed ([`ConvertError::into_handle`]).
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The sender's `type`, or the descriptor's kind, does not fit.
    #[error(
        "received a {} handle whose descriptor is {:?}; it cannot become {wanted}",
        handle.handle_type, handle.kind
    )]
    Mismatch {
        /// The handle, still open.
        handle: ReceivedHandle,
        /// The type asked for.
        wanted: &'static str,
    },
    /// A tokio type was asked for outside a tokio runtime.
    #[error("{wanted} needs a running tokio runtime; convert the handle inside one")]
    NoRuntime {
        /// The handle, still open.
        handle: ReceivedHandle,
        /// The type asked for.
        wanted: &'static str,
    },
    /// Setting the descriptor up failed; it has been closed.
    #[error("setting up the received {wanted} failed, and its descriptor was closed: {source}")]
    Io {
        /// The type asked for.
        wanted: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

impl ConvertError {
    /// The handle, if it is still open.
    pub fn into_handle(self) -> Option<ReceivedHandle> {
        match self {
            ConvertError::Mismatch { handle, .. } | ConvertError::NoRuntime { handle, .. } => {
                Some(handle)
            }
            ConvertError::Io { .. } => None,
        }
    }
}

/// Builds a tokio type from a received handle: checks it, needs a runtime, sets `O_NONBLOCK`.
pub(crate) fn into_tokio<S, T>(
    handle: ReceivedHandle,
    wanted: &'static str,
    types: &[HandleType],
    kind_ok: fn(FdKind) -> bool,
    build: impl FnOnce(S) -> std::io::Result<T>,
) -> Result<T, ConvertError>
where
    S: From<OwnedFd>,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(ConvertError::NoRuntime { handle, wanted });
    }
    let fd = handle.expect(types, kind_ok, wanted)?;
    crate::sys::set_nonblocking(fd.as_fd(), true)
        .and_then(|()| build(S::from(fd)))
        .map_err(|source| ConvertError::Io { wanted, source })
}

impl Handle for ReceivedHandle {
    /// A received handle can be forwarded as it came (type, key and `dgramType` kept).
    fn into_wire(self) -> Result<WireHandle, HandleError> {
        let mut wire = WireHandle::new(self.handle_type, self.fd)?;
        wire.key = self.key;
        Ok(wire)
    }
    fn from_received(handle: ReceivedHandle) -> Result<Self, ConvertError> {
        Ok(handle)
    }
}

/// Any received descriptor, untyped. (A bare fd has no handle type, so it is not sendable as is:
/// wrap it in [`RawHandle`] to send it.)
impl From<ReceivedHandle> for OwnedFd {
    fn from(handle: ReceivedHandle) -> OwnedFd {
        handle.fd
    }
}

/// Wraps a handle so it travels as Node's raw `net.Native` / `dgram.Native` instead of a
/// `net.Socket`, `net.Server` or `dgram.Socket`.
///
/// Node's cluster uses this form for shared listening sockets and round-robin connections.
#[derive(Debug)]
pub struct Native<T>(pub T);

impl<T: Handle> Handle for Native<T> {
    fn into_wire(self) -> Result<WireHandle, HandleError> {
        let mut wire = self.0.into_wire()?;
        wire.handle_type = match wire.handle_type {
            HandleType::DgramSocket | HandleType::DgramNative => HandleType::DgramNative,
            _ => HandleType::NetNative,
        };
        if !wire.handle_type.accepts(wire.kind) {
            return Err(HandleError::KindMismatch { handle_type: wire.handle_type, kind: wire.kind });
        }
        wire.key = None;
        wire.dgram_type = None;
        wire.server = None;
        Ok(wire)
    }
    fn from_received(handle: ReceivedHandle) -> Result<Self, ConvertError> {
        T::from_received(handle).map(Native)
    }
}
