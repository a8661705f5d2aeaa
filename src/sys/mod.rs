//! The operating-system layer: the only module that sees raw file descriptors or uses `unsafe`.
//!
//! Everything above it works with [`OwnedFd`] and [`BorrowedFd`]. The pieces are:
//! - [`stream_socketpair`]: the channel's `AF_UNIX`/`SOCK_STREAM` pair, both ends close-on-exec;
//! - [`send_with_fds`] / [`recv_with_fds`]: `sendmsg`/`recvmsg` with `SCM_RIGHTS`, received fds
//!   close-on-exec (`MSG_CMSG_CLOEXEC`) and truncation (`MSG_CTRUNC`) reported;
//! - [`classify`]: what kind of object a descriptor refers to, asked of the kernel;
//! - [`install_fds_for_exec`]: the `dup2`s that put the child's channel end (and listeners) at
//!   their advertised numbers;
//! - [`adopt_inherited_fd`]: taking ownership of the channel fd a parent left us;
//! - [`sock_diag`]: whether sockets handed to another process are still open there.

pub(crate) mod sock_diag;

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// Most descriptors the kernel passes in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 253;

/// Creates a connected `AF_UNIX` stream socket pair, both ends close-on-exec and non-blocking.
pub(crate) fn stream_socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?)
}

/// Writes `bufs` with one `sendmsg`, attaching `fds` as `SCM_RIGHTS` when it is not empty.
///
/// Never raises `SIGPIPE` (`MSG_NOSIGNAL`) and never blocks (`MSG_DONTWAIT`). Returns how many
/// bytes the kernel took; when it is fewer than offered the fds have still gone out with the first
/// byte, which is what the receiver expects (they belong to the frame that byte starts).
pub(crate) fn send_with_fds(
    socket: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
    if fds.is_empty() {
        let mut control = SendAncillaryBuffer::default();
        return Ok(rustix::net::sendmsg(socket, bufs, &mut control, flags)?);
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut heap;
    let buffer: &mut [MaybeUninit<u8>] = if fds.len() <= 4 {
        &mut space
    } else {
        heap = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        &mut heap
    };
    let mut control = SendAncillaryBuffer::new(buffer);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many file descriptors for one message",
        ));
    }
    Ok(rustix::net::sendmsg(socket, bufs, &mut control, flags)?)
}

/// What one [`recv_with_fds`] call produced.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes read into the buffer; 0 means the peer closed its end.
    pub(crate) len: usize,
    /// The kernel dropped descriptors that did not fit (`MSG_CTRUNC`).
    pub(crate) control_truncated: bool,
}

/// Reads once with `recvmsg`, appending every descriptor that came with the bytes to `fds`.
///
/// Received descriptors are close-on-exec (`MSG_CMSG_CLOEXEC`). The control buffer has room for
/// the kernel's maximum per message, so truncation means a misbehaving kernel or peer; it is
/// reported, and whatever did arrive is still returned so the caller can close it.
pub(crate) fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Received> {
    let mut space =
        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(
        socket,
        &mut iov,
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    Ok(Received {
        len: msg.bytes,
        control_truncated: msg.flags.contains(ReturnFlags::CTRUNC),
    })
}

/// What a file descriptor refers to, as far as handle passing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A TCP socket (IPv4 or IPv6) that is listening.
    TcpListener,
    /// A TCP socket that is not listening (connected, or only bound).
    TcpStream,
    /// A UDP socket (IPv4).
    Udp4,
    /// A UDP socket (IPv6).
    Udp6,
    /// An `AF_UNIX` stream socket that is listening.
    UnixListener,
    /// An `AF_UNIX` stream socket that is not listening.
    UnixStream,
    /// An `AF_UNIX` datagram or seqpacket socket.
    UnixDatagram,
    /// A FIFO (named or anonymous pipe).
    Fifo,
    /// Anything else: a regular file, a terminal, another socket family.
    Other,
}

impl FdKind {
    /// A stream socket Node can wrap in a `net.Socket` (TCP, `AF_UNIX` stream, or a FIFO).
    pub fn is_stream(self) -> bool {
        matches!(self, FdKind::TcpStream | FdKind::UnixStream | FdKind::Fifo)
    }
    /// A listening stream socket Node can wrap in a `net.Server`.
    pub fn is_listener(self) -> bool {
        matches!(self, FdKind::TcpListener | FdKind::UnixListener)
    }
    /// A UDP socket Node can wrap in a `dgram.Socket`.
    pub fn is_udp(self) -> bool {
        matches!(self, FdKind::Udp4 | FdKind::Udp6)
    }
}

/// Asks the kernel what `fd` is: `SO_DOMAIN`, `SO_TYPE` and `SO_ACCEPTCONN` for a socket, `fstat`
/// for anything else (`ENOTSOCK`). (`SO_PROTOCOL` alone would not do: a netlink or CAN socket can
/// report protocol 6, TCP's number.)
pub(crate) fn classify(fd: BorrowedFd<'_>) -> io::Result<FdKind> {
    use rustix::fs::FileType;
    let domain = match rustix::net::sockopt::socket_domain(fd) {
        Ok(domain) => domain,
        Err(rustix::io::Errno::NOTSOCK) => {
            let stat = rustix::fs::fstat(fd)?;
            return Ok(match FileType::from_raw_mode(stat.st_mode) {
                FileType::Fifo => FdKind::Fifo,
                _ => FdKind::Other,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let kind = rustix::net::sockopt::socket_type(fd)?;
    let inet = domain == AddressFamily::INET || domain == AddressFamily::INET6;
    Ok(if inet && kind == SocketType::STREAM {
        if rustix::net::sockopt::socket_acceptconn(fd)? {
            FdKind::TcpListener
        } else {
            FdKind::TcpStream
        }
    } else if inet && kind == SocketType::DGRAM {
        if domain == AddressFamily::INET {
            FdKind::Udp4
        } else {
            FdKind::Udp6
        }
    } else if domain == AddressFamily::UNIX && kind == SocketType::STREAM {
        if rustix::net::sockopt::socket_acceptconn(fd)? {
            FdKind::UnixListener
        } else {
            FdKind::UnixStream
        }
    } else if domain == AddressFamily::UNIX {
        FdKind::UnixDatagram
    } else {
        FdKind::Other
    })
}

/// Sets or clears `O_NONBLOCK` on the open file description behind `fd`.
///
/// The flag belongs to the file description, so a descriptor received from another process shares
/// it with the sender's copy.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
    Ok(rustix::io::ioctl_fionbio(fd, nonblocking)?)
}

/// Makes `fd` close-on-exec.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?)
}

/// A descriptor number and the identity (device, inode) of the file it referred to when
/// recorded: enough to tell later, without owning the descriptor, whether that number still
/// refers to the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FdIdentity {
    fd: RawFd,
    dev: u64,
    ino: u64,
}

/// What [`FdIdentity::liveness`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// The number still refers to the same file.
    Open,
    /// The number is closed, or refers to another file now.
    Gone,
    /// The check itself failed (not for want of the descriptor): treat as open.
    Unknown,
}

impl FdIdentity {
    /// Records what `fd` refers to now.
    pub(crate) fn of(fd: BorrowedFd<'_>) -> io::Result<FdIdentity> {
        use std::os::fd::AsRawFd;
        let stat = rustix::fs::fstat(fd)?;
        Ok(FdIdentity { fd: fd.as_raw_fd(), dev: stat.st_dev as u64, ino: stat.st_ino as u64 })
    }

    /// Whether the recorded number still refers to the recorded file: one `fstat`, which needs
    /// no free descriptor (so it works with the descriptor table full).
    pub(crate) fn liveness(&self) -> Liveness {
        let mut stat = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat only reads the metadata of whatever the number refers to and writes it
        // into our buffer; it neither closes nor uses the descriptor for I/O, so calling it on a
        // number we do not own (possibly closed, possibly reused) is harmless. The buffer is
        // read only when the call succeeded, which means the kernel filled it.
        let result = unsafe { libc::fstat(self.fd, stat.as_mut_ptr()) };
        if result != 0 {
            return match io::Error::last_os_error().raw_os_error() {
                Some(libc::EBADF) => Liveness::Gone,
                _ => Liveness::Unknown,
            };
        }
        // SAFETY: fstat returned 0, so it initialised `stat`.
        let stat = unsafe { stat.assume_init() };
        // The field types differ between architectures (u64 on x86_64).
        #[allow(clippy::unnecessary_cast)]
        if stat.st_dev as u64 == self.dev && stat.st_ino as u64 == self.ino {
            Liveness::Open
        } else {
            Liveness::Gone
        }
    }
}

/// Waits until `socket` is readable (if `read`) or writable (if `write`), or hung up, for at
/// most `timeout`. For the synchronous paths that run without an event loop.
pub(crate) fn wait_socket(
    socket: BorrowedFd<'_>,
    read: bool,
    write: bool,
    timeout: std::time::Duration,
) -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags};
    let mut flags = PollFlags::empty();
    if read {
        flags |= PollFlags::IN;
    }
    if write {
        flags |= PollFlags::OUT;
    }
    let mut fds = [PollFd::new(&socket, flags)];
    let timeout = rustix::event::Timespec::try_from(timeout).unwrap_or(rustix::event::Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    });
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Registers a listening socket with tokio's reactor for readability, to accept on it without
/// tokio registering every accepted connection too.
pub(crate) fn watch_readable(
    fd: std::sync::Arc<OwnedFd>,
) -> io::Result<tokio::io::unix::AsyncFd<std::sync::Arc<OwnedFd>>> {
    // SAFETY: the AsyncFd owns a clone of the Arc, so the descriptor stays open and refers to the
    // same socket for as long as the AsyncFd exists (an OwnedFd closes only when the last clone
    // drops), and `Arc<OwnedFd>::as_raw_fd` always returns that same number. Callers never
    // replace the inner value (`get_mut`).
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}

/// Registers `fd` with tokio's reactor for `interest` only (a channel socket registered for
/// reading is not woken each time the peer reads what it wrote).
pub(crate) fn register(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and refers to the same file
    // description until the AsyncFd drops it, and `OwnedFd::as_raw_fd` always returns that same
    // number. Callers never replace the inner value (`get_mut`).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| e.into_parts().1)
}

/// Moves `fd` above the standard I/O numbers if it sits on one (a parent started with 0–2
/// closed hands those numbers out first), keeping it close-on-exec.
pub(crate) fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    Ok(rustix::io::fcntl_dupfd_cloexec(&fd, 3)?)
}

/// Returns whether `raw` is an open descriptor of an `AF_UNIX` stream socket.
fn is_unix_stream_socket(fd: BorrowedFd<'_>) -> bool {
    matches!(classify(fd), Ok(FdKind::UnixStream))
}

/// Most descriptors one spawn installs at chosen numbers (the channel and up to 16 listeners).
pub(crate) const MAX_EXEC_FDS: usize = 17;

/// Puts each `sources[i]` at descriptor number `targets[i]` in a freshly forked child, without
/// close-on-exec, so that the program about to be executed inherits them there.
///
/// Every source is first duplicated above all targets (close-on-exec), then moved into place, so a
/// source that sits on another pair's target is never overwritten before it is copied. Runs
/// between `fork` and `exec`, so it only makes async-signal-safe system calls and allocates
/// nothing.
///
/// # Safety
/// Must only be called in a forked child before `exec` (a `pre_exec` hook): it overwrites whatever
/// the targets referred to, which in the parent could belong to someone else.
pub(crate) unsafe fn install_fds_for_exec(
    sources: &[RawFd; MAX_EXEC_FDS],
    targets: &[RawFd; MAX_EXEC_FDS],
    count: usize,
) -> io::Result<()> {
    let floor = targets[..count].iter().copied().max().unwrap_or(0) + 1;
    let mut temporary = [-1; MAX_EXEC_FDS];
    for i in 0..count {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) is async-signal-safe and only adds a descriptor to this
        // (forked, single-threaded) child's table; the caller guarantees we are in such a child.
        temporary[i] = unsafe { libc::fcntl(sources[i], libc::F_DUPFD_CLOEXEC, floor) };
        if temporary[i] < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for i in 0..count {
        // SAFETY: dup2 is async-signal-safe; it replaces the child's own copy of whatever was at
        // the target (the caller's contract) with a copy that is not close-on-exec.
        if unsafe { libc::dup2(temporary[i], targets[i]) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The descriptors a spawned child should find at chosen numbers, shared with the `pre_exec`
/// hook.
///
/// Each pair is packed as `(source << 32) | target`, `-1` for an unused one. The hook reads them
/// in the forked child, which has its own copy of memory, so plain atomics are enough.
#[derive(Debug, Clone)]
pub(crate) struct ExecFds(std::sync::Arc<[std::sync::atomic::AtomicI64; MAX_EXEC_FDS]>);

impl ExecFds {
    /// Registers the hook on `command` once; [`set`](Self::set) chooses the descriptors before
    /// each spawn.
    pub(crate) fn register(command: &mut tokio::process::Command) -> ExecFds {
        let slots = ExecFds(std::sync::Arc::new(std::array::from_fn(|_| {
            std::sync::atomic::AtomicI64::new(-1)
        })));
        let shared = slots.0.clone();
        let hook = move || {
            let mut sources = [-1; MAX_EXEC_FDS];
            let mut targets = [-1; MAX_EXEC_FDS];
            let mut count = 0;
            for slot in shared.iter() {
                let packed = slot.load(std::sync::atomic::Ordering::SeqCst);
                if packed >= 0 {
                    sources[count] = (packed >> 32) as RawFd;
                    targets[count] = (packed & 0xffff_ffff) as RawFd;
                    count += 1;
                }
            }
            // SAFETY: this hook runs in the forked child before exec, which is exactly
            // install_fds_for_exec's requirement.
            unsafe { install_fds_for_exec(&sources, &targets, count) }
        };
        // SAFETY: the hook only loads atomics and calls fcntl/dup2, all async-signal-safe, and
        // allocates nothing (fixed-size arrays on the stack), as code between fork and exec must.
        unsafe {
            command.pre_exec(hook);
        }
        slots
    }

    /// The next spawn installs each `(source, target)`; at most [`MAX_EXEC_FDS`].
    pub(crate) fn set(&self, pairs: &[(BorrowedFd<'_>, RawFd)]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        if pairs.len() > MAX_EXEC_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_EXEC_FDS} descriptors can be passed to a child"),
            ));
        }
        for (i, slot) in self.0.iter().enumerate() {
            let packed = pairs.get(i).map_or(-1, |(source, target)| {
                ((source.as_raw_fd() as i64) << 32) | (*target as i64 & 0xffff_ffff)
            });
            slot.store(packed, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    /// The next spawn installs nothing.
    pub(crate) fn clear(&self) {
        for slot in self.0.iter() {
            slot.store(-1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Occupies descriptor number `target` in this process, if it is free, for the duration of a
/// spawn: otherwise the pipe `std` creates to report `exec` errors could land on it and be
/// overwritten in the child by the channel.
pub(crate) fn reserve_fd_number(like: BorrowedFd<'_>, target: RawFd) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(like, target)?)
}

/// Whether the process already took its inherited channel fd (it can only be adopted once).
static ADOPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Takes ownership of descriptor `raw`, which a parent left open for us as the IPC channel.
///
/// Checks that `raw` is an open `AF_UNIX` stream socket, then makes it close-on-exec and
/// non-blocking, as a Node child does. A channel at a standard I/O number (0–2) is taken as a
/// duplicate above them, with `/dev/null` put back in its place. Succeeds at most once per
/// process.
pub(crate) fn adopt_inherited_fd(raw: RawFd) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "negative file descriptor"));
    }
    // SAFETY: fcntl(F_GETFD) only reads the descriptor's flags; it fails with EBADF for a number
    // that is not open, in which case we never make a BorrowedFd of it.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("file descriptor {raw} is not open: {}", io::Error::last_os_error()),
        ));
    }
    // A descriptor inherited across exec has no FD_CLOEXEC (exec would have closed it), while
    // every descriptor this process opened through std, tokio or rustix has it: one with the flag
    // belongs to someone in this process (tokio's signal socket, a file), and taking ownership
    // of it would close it twice.
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "file descriptor {raw} is close-on-exec, so this process opened it itself: it was \
                 not inherited from a parent and cannot be the IPC channel (is NODE_CHANNEL_FD \
                 stale or set by hand?)"
            ),
        ));
    }
    // SAFETY: `raw` is open (checked just above). It was not opened by this process's Rust code
    // (no FD_CLOEXEC, see above), so it is the descriptor the parent left for the channel and no
    // Rust owner here can close it while this borrow lives.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    if !is_unix_stream_socket(borrowed) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("file descriptor {raw} is not an AF_UNIX stream socket"),
        ));
    }
    if ADOPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the inherited IPC channel was already taken by this process",
        ));
    }
    if raw <= 2 {
        // Node lets a parent put the channel at a stdio index. Standard I/O belongs to std, so
        // take a close-on-exec duplicate above it and put /dev/null back at the stdio number:
        // the channel then closes when we drop it, and stdin/stdout/stderr stay valid.
        let channel = rustix::io::fcntl_dupfd_cloexec(borrowed, 3)?;
        let null = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        match raw {
            0 => rustix::stdio::dup2_stdin(&null)?,
            1 => rustix::stdio::dup2_stdout(&null)?,
            _ => rustix::stdio::dup2_stderr(&null)?,
        }
        set_nonblocking(channel.as_fd(), true)?;
        return Ok(channel);
    }
    // SAFETY: `raw` is open, above the standard I/O numbers, a connected AF_UNIX stream socket,
    // and was inherited across exec (no FD_CLOEXEC, checked above): no descriptor this process
    // opened through std, tokio or rustix can be it. It is the one the parent set aside for the
    // IPC channel by Node's convention (`NODE_CHANNEL_FD`), which `parent_channel` documents, and
    // the ADOPTED flag makes this the only owner handoff creates. Not excluded by these checks,
    // and excluded only by that convention: other code in this process that took ownership of the
    // same inherited descriptor (say, from LISTEN_FDS) or C code that opened one without
    // O_CLOEXEC, with NODE_CHANNEL_FD then pointed at it by mistake.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    set_cloexec(owned.as_fd())?;
    set_nonblocking(owned.as_fd(), true)?;
    Ok(owned)
}

/// Removes an environment variable.
///
/// Kept here because from Rust 2024 on it is an `unsafe` operation: it races with `getenv` in
/// other threads. It is called while attaching the inherited channel, which programs do at
/// start-up before they read their environment elsewhere, as Node does.
pub(crate) fn remove_env(name: &str) {
    std::env::remove_var(name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_common_descriptors() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(classify(tcp.as_fd()).unwrap(), FdKind::TcpListener);
        let conn = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        assert_eq!(classify(conn.as_fd()).unwrap(), FdKind::TcpStream);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(classify(udp.as_fd()).unwrap(), FdKind::Udp4);
        let udp6 = std::net::UdpSocket::bind("[::1]:0");
        if let Ok(udp6) = udp6 {
            assert_eq!(classify(udp6.as_fd()).unwrap(), FdKind::Udp6);
        }
        let (a, _b) = stream_socketpair().unwrap();
        assert_eq!(classify(a.as_fd()).unwrap(), FdKind::UnixStream);
        let (d, _e) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert_eq!(classify(d.as_fd()).unwrap(), FdKind::UnixDatagram);
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert_eq!(classify(r.as_fd()).unwrap(), FdKind::Fifo);
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(classify(file.as_fd()).unwrap(), FdKind::Other);
    }

    #[test]
    fn fds_cross_a_socketpair_close_on_exec() {
        let (a, b) = stream_socketpair().unwrap();
        let (r, _w) = rustix::pipe::pipe().unwrap();
        let n = send_with_fds(a.as_fd(), &[IoSlice::new(b"x\n")], &[r.as_fd()]).unwrap();
        assert_eq!(n, 2);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let got = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(got.len, 2);
        assert!(!got.control_truncated);
        assert_eq!(fds.len(), 1);
        let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }
}
