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
//! Receiving is the standard conversion: `TcpStream::try_from(handle)`, or
//! `let stream: TcpStream = handle.try_into()?`; a handle that does not fit is given back in the
//! [`ConvertError`].
//!
//! # Who owns the descriptor
//! Sending **by value** moves the value into the channel: it is held, untouched, until the peer
//! acknowledges it and then dropped (closing it) — Node's default for `net.Socket`. If the send
//! fails at any point (the channel closed, the peer refused it every time, the descriptor is not
//! what its type says), the error gives the value back as it was sent
//! ([`SendHandleError::handle`](crate::channel::SendHandleError)), so retrying is one line. Wrapped
//! in [`KeepOpen`] (`KeepOpen(&listener)`), a duplicate is sent and yours stays open — Node's
//! `keepOpen: true`, and the way to share a listening server or UDP socket while still using it.
//!
//! # Blocking mode
//! `O_NONBLOCK` belongs to the open file description, which the sender and receiver of a handle
//! share. Conversions to tokio types set it (as libuv does on the Node side); conversions to std
//! types leave it as the sender had it, so a std socket from a Node peer is usually non-blocking.

mod net;
mod raw;
mod udp;
mod unix;

use std::any::Any;
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

pub(crate) use wire::{Held, WireHandle};

/// Types that appear in [`IntoWire`]'s hidden methods: public, so that the trait may name them,
/// but unreachable from outside handoff, which seals the trait.
mod wire {
use super::*;

/// A value being sent as a handle, held by the channel until the peer acknowledges it (then
/// dropped, which closes it) or the send fails (then given back).
pub trait Held: AsFd + Send {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

impl<T: AsFd + Send + 'static> Held for T {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// A handle ready to be written: the value that holds the descriptor and the envelope fields
/// that describe it (the descriptor's kind already checked against the type).
pub struct WireHandle {
    pub(crate) handle_type: HandleType,
    pub(crate) held: Box<dyn Held>,
    pub(crate) key: Option<String>,
    pub(crate) dgram_type: Option<DgramType>,
    /// The server whose connection this is: the channel it goes out on joins that server's
    /// socket lists (Node's `SocketListSend`).
    pub(crate) server: Option<std::sync::Arc<crate::server::ServerState>>,
}

impl fmt::Debug for WireHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireHandle")
            .field("handle_type", &self.handle_type)
            .field("fd", &self.held.as_fd())
            .field("key", &self.key)
            .field("dgram_type", &self.dgram_type)
            .finish()
    }
}

impl WireHandle {
    /// Describes `held` as `handle_type`, after asking the kernel that its descriptor really is
    /// of that kind (a mismatched kind kills a Node receiver); fills `dgramType` for UDP. On a
    /// mismatch `held` comes back with the error.
    pub(crate) fn new<T: AsFd + Send + 'static>(
        handle_type: HandleType,
        held: T,
        key: Option<String>,
    ) -> Result<WireHandle, (HandleError, T)> {
        let kind = match crate::sys::classify(held.as_fd()) {
            Ok(kind) => kind,
            Err(e) => return Err((HandleError::Io(e), held)),
        };
        if !handle_type.accepts(kind) {
            return Err((HandleError::KindMismatch { handle_type, kind }, held));
        }
        let dgram_type =
            if handle_type == HandleType::DgramSocket { DgramType::of(kind) } else { None };
        // Node reads a key on `net.Socket` only.
        let key = key.filter(|_| handle_type == HandleType::NetSocket);
        Ok(WireHandle { handle_type, held: Box::new(held), key, dgram_type, server: None })
    }

    /// Describes `held`, whose kind the caller knows for certain (it accepted the socket from its
    /// own listener), without asking the kernel again: the per-connection fast path.
    pub(crate) fn trusted<T: AsFd + Send + 'static>(
        handle_type: HandleType,
        kind: FdKind,
        held: T,
        key: Option<String>,
    ) -> WireHandle {
        debug_assert!(handle_type.accepts(kind));
        let dgram_type =
            if handle_type == HandleType::DgramSocket { DgramType::of(kind) } else { None };
        let key = key.filter(|_| handle_type == HandleType::NetSocket);
        WireHandle { handle_type, held: Box::new(held), key, dgram_type, server: None }
    }
}
}

/// A handle that arrived with a message: the descriptor, what the sender called it, and what the
/// kernel says it is.
///
/// Dropping it closes the descriptor. Convert it with `TryFrom` (`TcpStream::try_from(handle)`,
/// `handle.try_into()`), which every receivable type implements, or [`Handle::from_received`].
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

/// A value that can travel as a handle: the seed's `handleConversion`, one implementation per
/// type.
///
/// The send side says which `type` (and `key`) the envelope carries; handoff checks the
/// descriptor's kind against it (a mismatch would crash a Node receiver) and fills `dgramType`.
/// The receive side builds the value from a [`ReceivedHandle`], or gives the handle back.
/// Implement it to make your own type travel, and implement `TryFrom<ReceivedHandle>` by calling
/// [`from_received`](Handle::from_received) so that it converts the standard way.
///
/// # Examples
/// ```
/// use handoff::handle::{ConvertError, Handle, HandleType, ReceivedHandle};
/// use std::os::fd::{AsFd, BorrowedFd};
///
/// /// A connection that is always sent as a raw `net.Native`.
/// struct Backend(std::net::TcpStream);
///
/// impl AsFd for Backend {
///     fn as_fd(&self) -> BorrowedFd<'_> {
///         self.0.as_fd()
///     }
/// }
///
/// impl Handle for Backend {
///     fn handle_type(&self) -> HandleType {
///         HandleType::NetNative
///     }
///     fn from_received(handle: ReceivedHandle) -> Result<Self, ConvertError> {
///         std::net::TcpStream::try_from(handle).map(Backend)
///     }
/// }
///
/// impl TryFrom<ReceivedHandle> for Backend {
///     type Error = ConvertError;
///     fn try_from(handle: ReceivedHandle) -> Result<Self, ConvertError> {
///         Backend::from_received(handle)
///     }
/// }
/// ```
pub trait Handle: AsFd + Send + Sized + 'static {
    /// The envelope `type` this value is sent as.
    fn handle_type(&self) -> HandleType;

    /// The server connection key written in the envelope (meaningful for `net.Socket` only): the
    /// receiver files the socket under it for its server's connection count. None by default.
    fn key(&self) -> Option<&str> {
        None
    }

    /// Receive side: builds the value from a received handle, or returns the handle untouched.
    fn from_received(handle: ReceivedHandle) -> Result<Self, ConvertError>;
}

/// What can be passed to [`Sender::send_handle`](crate::Sender::send_handle): any [`Handle`] by
/// value (held until the peer acknowledges it, then dropped; given back if the send fails), a
/// [`KeepOpen`] reference (a duplicate is sent; yours stays open), or a server
/// [`Connection`](crate::server::Connection).
///
/// Implemented by handoff only (its methods name types private to handoff); implement
/// [`Handle`] for your own types.
pub trait IntoWire: Sized {
    /// What a failed send gives back: the value itself when sent by value, `()` for
    /// [`KeepOpen`] (yours never left you).
    type Back;
    /// Checks and describes the value; on failure gives it back.
    #[doc(hidden)]
    fn into_wire(self) -> Result<WireHandle, (HandleError, Self::Back)>;
    /// Turns the held value back into what the caller sent (the send failed).
    #[doc(hidden)]
    fn give_back(held: Box<dyn Held>) -> Self::Back;
    /// What the caller gets back when the send fails before the value was even described.
    #[doc(hidden)]
    fn unsent(self) -> Self::Back;
}

/// Recovers the value of type `T` that a channel held.
pub(crate) fn downcast_held<T: 'static>(held: Box<dyn Held>) -> T {
    *held
        .into_any()
        .downcast::<T>()
        .unwrap_or_else(|_| unreachable!("a channel gives back the value it was given"))
}

impl<H: Handle> IntoWire for H {
    type Back = H;
    fn into_wire(self) -> Result<WireHandle, (HandleError, H)> {
        let (handle_type, key) = (self.handle_type(), self.key().map(str::to_owned));
        WireHandle::new(handle_type, self, key)
    }
    fn give_back(held: Box<dyn Held>) -> H {
        downcast_held(held)
    }
    fn unsent(self) -> H {
        self
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

impl<H: Handle> IntoWire for KeepOpen<'_, H> {
    type Back = ();
    fn into_wire(self) -> Result<WireHandle, (HandleError, ())> {
        let dup = self.0.as_fd().try_clone_to_owned().map_err(|e| (HandleError::Io(e), ()))?;
        WireHandle::new(self.0.handle_type(), dup, self.0.key().map(str::to_owned))
            .map_err(|(error, _dup)| (error, ()))
    }
    fn give_back(_dup: Box<dyn Held>) {}
    fn unsent(self) {}
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
    /// A received handle can be forwarded as it came (type and key kept; `dgramType` taken from
    /// the descriptor again).
    fn handle_type(&self) -> HandleType {
        self.handle_type
    }
    fn key(&self) -> Option<&str> {
        self.key.as_deref()
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
/// Node's cluster uses this form for shared listening sockets and round-robin connections. A Node
/// receiver gets the raw libuv handle (`TCP`, `Pipe` or `UDP`), which it must wrap itself, e.g.
/// `new net.Socket({ handle })` for a connection or `net.createServer().listen(handle)` for a
/// listener.
#[derive(Debug)]
pub struct Native<T>(pub T);

impl<T: AsFd> AsFd for Native<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl<T: Handle> Handle for Native<T> {
    fn handle_type(&self) -> HandleType {
        match self.0.handle_type() {
            HandleType::DgramSocket | HandleType::DgramNative => HandleType::DgramNative,
            _ => HandleType::NetNative,
        }
    }
    fn from_received(handle: ReceivedHandle) -> Result<Self, ConvertError> {
        T::from_received(handle).map(Native)
    }
}

impl<T: Handle> TryFrom<ReceivedHandle> for Native<T> {
    type Error = ConvertError;
    fn try_from(handle: ReceivedHandle) -> Result<Self, ConvertError> {
        Native::from_received(handle)
    }
}
