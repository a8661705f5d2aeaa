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
//! when the socket is dropped. With the descriptor table full (or the reactor out of memory) no
//! duplicate can be registered: the write is then retried every [`RETRY`] until one can be, so a
//! process out of descriptors keeps its channel.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::sys;

/// How often a blocked write is retried when no duplicate could be registered.
const RETRY: Duration = Duration::from_millis(2);

#[derive(Debug)]
pub(crate) struct ChannelSocket {
    /// The socket, registered for `READABLE` only.
    read: AsyncFd<OwnedFd>,
    /// How a blocked write waits for room.
    write: WriteWait,
}

#[derive(Debug)]
enum WriteWait {
    /// Nothing waits.
    Idle,
    /// A duplicate registered for `WRITABLE`.
    Registered(AsyncFd<OwnedFd>),
    /// No duplicate could be made or registered: retry on a timer.
    Polling,
}

impl ChannelSocket {
    /// Registers `fd` (non-blocking) with the current runtime for reading.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<ChannelSocket> {
        Ok(ChannelSocket { read: sys::register(fd, Interest::READABLE)?, write: WriteWait::Idle })
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
    /// that appeared since the write is not missed. If no duplicate can be registered now, the
    /// wait is a short timer instead (and registering is tried again at the next block).
    pub(crate) fn write_blocked(&mut self) {
        if matches!(self.write, WriteWait::Registered(_)) {
            return;
        }
        let registered = self.read.get_ref().try_clone().and_then(|dup| sys::register(dup, Interest::WRITABLE));
        self.write = match registered {
            Ok(registration) => WriteWait::Registered(registration),
            Err(error) => {
                tracing::debug!(%error, "handoff channel: cannot watch for room to write; retrying on a timer");
                WriteWait::Polling
            }
        };
    }

    /// Nothing waits to be written: stop being woken when the peer reads.
    pub(crate) fn write_idle(&mut self) {
        self.write = WriteWait::Idle;
    }

    /// Whether a write is waiting for room.
    pub(crate) fn is_write_blocked(&self) -> bool {
        !matches!(self.write, WriteWait::Idle)
    }

    /// Waits until the socket may take more bytes, after [`write_blocked`](Self::write_blocked).
    ///
    /// # Cancel safety
    /// Cancel safe: readiness is cleared only once it was seen.
    pub(crate) async fn writable(&self) -> io::Result<()> {
        match &self.write {
            WriteWait::Registered(write) => {
                write.writable().await?.clear_ready();
                Ok(())
            }
            WriteWait::Polling => {
                tokio::time::sleep(RETRY).await;
                Ok(())
            }
            WriteWait::Idle => std::future::pending().await,
        }
    }
}
