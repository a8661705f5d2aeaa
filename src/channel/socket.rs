//! The channel's socket as the driver sees it: registered with tokio for reading only, and for
//! writing only while a write is waiting for room.
//!
//! # Why not `tokio::net::UnixStream`
//! A tokio stream registers for both directions at once, and an `AF_UNIX` socket signals
//! "writable" every time the peer reads one of our messages (the kernel frees the buffer it was
//! charged to and wakes whoever polls the socket for writing). A channel that sends a handle and
//! waits for its acknowledgement would then be woken twice per message, once for the
//! acknowledgement and once, for nothing, when the peer read the handle: a context switch per
//! message spent on readiness it never needed (the seed pipeline's profile showed a quarter of
//! its time there). Writes are attempted directly instead, and only one that finds the buffer full
//! (`EAGAIN`) registers a duplicate of the descriptor for writability, until the queue is empty.
//!
//! # Descriptor lifetime
//! The socket owns the descriptor; the write registration owns a duplicate of it (one more entry
//! in the descriptor table while a write waits, closed with the registration). Both are closed
//! when the socket is dropped.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::sys;

#[derive(Debug)]
pub(crate) struct ChannelSocket {
    /// The socket, registered for `READABLE` only.
    read: AsyncFd<OwnedFd>,
    /// A duplicate registered for `WRITABLE`, present while a write waits for room.
    write: Option<AsyncFd<OwnedFd>>,
}

impl ChannelSocket {
    /// Registers `fd` (non-blocking) with the current runtime for reading.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<ChannelSocket> {
        Ok(ChannelSocket { read: sys::register(fd, Interest::READABLE)?, write: None })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.read.get_ref().as_fd()
    }

    /// Waits until the socket is readable.
    ///
    /// # Cancel safety
    /// Cancel safe: readiness is kept until a read finds the socket empty.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.read.readable().await.map(drop)
    }

    /// Runs `read` if the socket was last seen readable; a `WouldBlock` from it clears that.
    pub(crate) fn try_read<R>(&self, read: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>) -> io::Result<R> {
        self.read.try_io(Interest::READABLE, |fd| read(fd.as_fd()))
    }

    /// A write found the socket's buffer full: register for writability (once) so that
    /// [`writable`](Self::writable) can wait. Registering reports the current state, so room
    /// that appeared since the write is not missed.
    pub(crate) fn write_blocked(&mut self) -> io::Result<()> {
        if self.write.is_none() {
            let dup = self.read.get_ref().try_clone()?;
            self.write = Some(sys::register(dup, Interest::WRITABLE)?);
        }
        Ok(())
    }

    /// Nothing waits to be written: stop being woken when the peer reads.
    pub(crate) fn write_idle(&mut self) {
        self.write = None;
    }

    /// Whether a write is waiting for room.
    pub(crate) fn is_write_blocked(&self) -> bool {
        self.write.is_some()
    }

    /// Waits until the socket may take more bytes, after [`write_blocked`](Self::write_blocked).
    ///
    /// # Cancel safety
    /// Cancel safe: readiness is cleared only once it was seen.
    pub(crate) async fn writable(&self) -> io::Result<()> {
        match &self.write {
            Some(write) => {
                write.writable().await?.clear_ready();
                Ok(())
            }
            None => std::future::pending().await,
        }
    }
}
