//! The escape hatch: any descriptor, under a handle type the caller picks — still checked.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{ConvertError, Handle, HandleType, ReceivedHandle};

/// A descriptor sent under a handle type of the caller's choice.
///
/// Sending still asks the kernel what the descriptor is and refuses a kind that does not match
/// the type (a Node receiver would crash on it), and fills `dgramType` for UDP.
///
/// # Examples
/// ```
/// use handoff::handle::{HandleType, RawHandle};
/// let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// let raw = RawHandle::new(HandleType::NetNative, server.into());
/// ```
#[derive(Debug)]
pub struct RawHandle {
    handle_type: HandleType,
    fd: OwnedFd,
    key: Option<String>,
}

impl RawHandle {
    /// Wraps `fd` to be sent as `handle_type`.
    pub fn new(handle_type: HandleType, fd: OwnedFd) -> RawHandle {
        RawHandle { handle_type, fd, key: None }
    }
    /// Adds a server connection key (meaningful for `net.Socket` only).
    pub fn with_key(mut self, key: impl Into<String>) -> RawHandle {
        self.key = Some(key.into());
        self
    }
    /// The handle type it is sent as.
    pub fn handle_type(&self) -> HandleType {
        self.handle_type
    }
    /// The descriptor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for RawHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Handle for RawHandle {
    fn handle_type(&self) -> HandleType {
        self.handle_type
    }
    fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
    fn from_received(handle: ReceivedHandle) -> Result<Self, ConvertError> {
        Ok(RawHandle { handle_type: handle.handle_type, key: handle.key, fd: handle.fd })
    }
}

impl TryFrom<ReceivedHandle> for RawHandle {
    type Error = ConvertError;
    fn try_from(handle: ReceivedHandle) -> Result<Self, ConvertError> {
        RawHandle::from_received(handle)
    }
}
