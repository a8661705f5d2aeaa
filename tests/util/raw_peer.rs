//! A raw peer for channel tests: the far end of a socket pair driven by hand, sending exactly
//! the bytes and descriptors a test says and reading exactly what handoff writes (with the
//! descriptors attached to each line). Plus descriptor-identity helpers.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use handoff::{Channel, ChannelConfig};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde_json::json;
use tokio::io::Interest;

pub const ACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n";

pub const NACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n";

/// The far end of a channel, driven by hand: bytes and descriptors exactly as the test says.
/// The far end of a channel, driven by hand: bytes and descriptors exactly as the test says.
pub struct RawPeer {
    pub sock: tokio::net::UnixStream,
    /// Bytes read and not yet taken as frames.
    pub buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    pub base: usize,
    /// Received descriptors, each with the stream offset of the last byte of the read that
    /// brought it (Linux ends a read at the segment that carried descriptors, so that byte lies in
    /// the frame the sender attached them to).
    pub fds: Vec<(usize, OwnedFd)>,
}

/// A channel on one end of a fresh socket pair and a raw peer on the other.
/// A channel on one end of a fresh socket pair and a raw peer on the other.
pub fn raw_channel(config: ChannelConfig) -> (Channel, RawPeer) {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair");
    let channel = Channel::with_config(ours, config).expect("channel");
    let peer = std::os::unix::net::UnixStream::from(theirs);
    (channel, RawPeer::new(peer))
}

impl RawPeer {
    pub fn new(std: std::os::unix::net::UnixStream) -> RawPeer {
        std.set_nonblocking(true).unwrap();
        RawPeer {
            sock: tokio::net::UnixStream::from_std(std).unwrap(),
            buf: Vec::new(),
            base: 0,
            fds: Vec::new(),
        }
    }

    /// Writes `bytes`, attaching `fds` (if any) to the first `sendmsg` only, as libuv does.
    pub async fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        assert!(!bytes.is_empty());
        let mut sent = 0;
        while sent < bytes.len() {
            let attach = if sent == 0 { fds } else { &[] };
            self.sock.writable().await.unwrap();
            let sock = &self.sock;
            let result = sock.try_io(Interest::WRITABLE, || {
                let mut space = vec![
                    MaybeUninit::<u8>::uninit();
                    rustix::cmsg_space!(ScmRights(attach.len().max(1)))
                ];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !attach.is_empty() {
                    assert!(control.push(SendAncillaryMessage::ScmRights(attach)));
                }
                rustix::net::sendmsg(
                    sock,
                    &[IoSlice::new(&bytes[sent..])],
                    &mut control,
                    SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
                )
                .map_err(io::Error::from)
            });
            match result {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("raw peer write failed: {e}"),
            }
        }
    }

    pub async fn write(&self, bytes: &[u8]) {
        self.send(bytes, &[]).await
    }

    /// One non-blocking `recvmsg`; `Ok(0)` is end-of-file.
    pub fn try_fill(&mut self) -> io::Result<usize> {
        let mut chunk = vec![0u8; 256 * 1024];
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let sock = &self.sock;
        let msg = sock.try_io(Interest::READABLE, || {
            rustix::net::recvmsg(
                sock,
                &mut [IoSliceMut::new(&mut chunk)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            )
            .map_err(io::Error::from)
        })?;
        assert!(
            !msg.flags.contains(ReturnFlags::CTRUNC),
            "control data truncated"
        );
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if msg.bytes == 0 {
            assert!(fds.is_empty(), "descriptors without bytes");
            return Ok(0);
        }
        let last = self.base + self.buf.len() + msg.bytes - 1;
        self.buf.extend_from_slice(&chunk[..msg.bytes]);
        self.fds.extend(fds.into_iter().map(|fd| (last, fd)));
        Ok(msg.bytes)
    }

    /// Waits for one read; returns 0 at end-of-file.
    pub async fn fill(&mut self) -> usize {
        loop {
            self.sock.readable().await.unwrap();
            match self.try_fill() {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("raw peer read failed: {e}"),
            }
        }
    }

    /// The next line handoff wrote (with its `\n`) and the descriptors attached to it.
    pub async fn frame(&mut self) -> (Vec<u8>, Vec<OwnedFd>) {
        super::within("a frame from handoff", async {
            loop {
                if let Some(i) = memchr::memchr(b'\n', &self.buf) {
                    let (start, end) = (self.base, self.base + i);
                    let line: Vec<u8> = self.buf.drain(..=i).collect();
                    self.base = end + 1;
                    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fds)
                        .into_iter()
                        .partition(|(at, _)| *at <= end);
                    self.fds = rest;
                    assert!(mine.iter().all(|(at, _)| *at >= start));
                    return (line, mine.into_iter().map(|(_, fd)| fd).collect());
                }
                assert!(
                    self.fill().await > 0,
                    "EOF from handoff before a complete frame"
                );
            }
        })
        .await
    }

    /// Reads the next frame, checks it is exactly `expected`, returns its descriptors.
    pub async fn expect_frame(&mut self, expected: &[u8]) -> Vec<OwnedFd> {
        let (line, fds) = self.frame().await;
        assert_eq!(
            String::from_utf8_lossy(&line),
            String::from_utf8_lossy(expected),
            "unexpected bytes from handoff"
        );
        fds
    }

    /// Nothing is waiting to be read right now.
    pub fn assert_quiet_now(&mut self) {
        match self.try_fill() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(0) => panic!("unexpected EOF from handoff"),
            Ok(_) => panic!(
                "unexpected bytes from handoff: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
            Err(e) => panic!("raw peer read failed: {e}"),
        }
        assert!(
            self.buf.is_empty(),
            "unread bytes: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        assert!(self.fds.is_empty(), "unread descriptors");
    }

    /// Nothing arrives for `wait`.
    pub async fn assert_silent(&mut self, wait: Duration) {
        tokio::time::sleep(wait).await;
        self.assert_quiet_now();
    }

    /// Reads until end-of-file, which must come with nothing before it.
    pub async fn expect_eof(&mut self) {
        super::within("EOF from handoff", async { while self.fill().await > 0 {} }).await;
        assert!(
            self.buf.is_empty(),
            "bytes before EOF: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        assert!(self.fds.is_empty());
    }
}

/// Identity of an open file (socket, regular file...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

pub fn file_id(fd: impl AsFd) -> FileId {
    let stat = rustix::fs::fstat(fd).unwrap();
    FileId {
        dev: stat.st_dev,
        ino: stat.st_ino,
    }
}

/// How many descriptors of this process refer to `id`.
/// How many descriptors of this process refer to `id`.
pub fn copies(id: FileId) -> usize {
    super::open_fds()
        .into_iter()
        .filter(|fd| {
            std::fs::metadata(format!("/proc/self/fd/{fd}"))
                .is_ok_and(|m| m.dev() == id.dev && m.ino() == id.ino)
        })
        .count()
}

/// Waits (up to 5 s) until exactly `n` descriptors of this process refer to `id`.
/// Waits (up to 5 s) until exactly `n` descriptors of this process refer to `id`.
pub async fn wait_copies(id: FileId, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = copies(id);
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{now} descriptors refer to {id:?}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A stream socket pair: send `.0` over the channel (then drop it here); `.1` sees EOF once every
/// copy of `.0` is closed.
/// A stream socket pair: send `.0` over the channel (then drop it here); `.1` sees EOF once every
/// copy of `.0` is closed.
pub fn probe() -> (OwnedFd, std::os::unix::net::UnixStream) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    (OwnedFd::from(a), b)
}

/// Waits until the other end of `watch` is closed everywhere (read returns EOF).
/// Waits until the other end of `watch` is closed everywhere (read returns EOF).
pub async fn assert_peer_closed(watch: &std::os::unix::net::UnixStream) {
    watch.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut byte = [0u8; 16];
    loop {
        match (&*watch).read(&mut byte) {
            Ok(0) => return,
            Ok(_) => panic!("unexpected data on a probe"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("probe read failed: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "a descriptor handoff received was not closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connected TCP pair: (client, server side).
/// A connected TCP pair: (client, server side).
pub fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

pub fn handle_line(handle_type: &str, msg: serde_json::Value) -> Vec<u8> {
    format!(
        "{}\n",
        json!({"cmd": "NODE_HANDLE", "type": handle_type, "msg": msg})
    )
    .into_bytes()
}
