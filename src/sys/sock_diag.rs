//! Asking the kernel whether sockets we handed to another process are still open
//! (`NETLINK_SOCK_DIAG`), without looking at that process's descriptor table.
//!
//! The cluster primary hands each connection to a worker and closes its own copy; afterwards the
//! only way to know whether the worker still holds it, without the worker's help (an unchanged
//! Node app says nothing when it closes a socket), is to ask the kernel about that one socket:
//! - TCP, up to [`DUMP_ABOVE`] sockets: an exact lookup by the connection's addresses, one hash
//!   lookup in the kernel per socket (about 3 µs each, with the answer), batched [`BATCH`] to a
//!   write. A socket no process holds any more is either gone (`ENOENT`) or orphaned (closing,
//!   inode 0); both count as closed.
//! - TCP, more: one dump per local port of the sockets on that port (the kernel filters by port
//!   as it walks its connection table; a few milliseconds whatever the count), matched against
//!   ours.
//! - Unix: the kernel's exact lookup by inode walks every Unix socket of the host, so one dump of
//!   the host's Unix sockets (inode numbers only) is read instead and matched against ours.
//!
//! No `unsafe` here: the netlink crates own the encoding.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags};
use netlink_packet_sock_diag::unix::{self, UnixRequest};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

/// Requests per write; their answers (about 100 bytes each) fit the socket's receive buffer.
const BATCH: usize = 64;

/// Past this many TCP sockets, dumping the sockets of their ports is cheaper than a lookup each.
pub(crate) const DUMP_ABOVE: usize = 2048;

/// `TCP_LISTEN`: an exact lookup whose connection is gone can fall through to the listener.
const TCP_LISTEN: u8 = 10;

/// Match any socket cookie (`INET_DIAG_NOCOOKIE`).
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// What identifies a socket to the kernel's socket diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SocketKey {
    /// A TCP connection, seen from our side.
    Tcp {
        /// Our address (the listener's, or `getsockname` for a wildcard listener).
        local: SocketAddr,
        /// The client's address.
        peer: SocketAddr,
    },
    /// A Unix stream socket, by its inode number.
    Unix(u64),
}

/// A `NETLINK_SOCK_DIAG` socket (blocking: the kernel answers while it handles the write, so a
/// read waits for nothing but that).
pub(crate) struct SockDiag {
    socket: netlink_sys::Socket,
    buffer: Vec<u8>,
}

impl std::fmt::Debug for SockDiag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockDiag").finish_non_exhaustive()
    }
}

impl SockDiag {
    /// Opens a diagnostics socket.
    pub(crate) fn new() -> io::Result<SockDiag> {
        let mut socket = netlink_sys::Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        Ok(SockDiag { socket, buffer: vec![0; 64 * 1024] })
    }

    /// For each key, whether some process still holds that socket open.
    pub(crate) fn still_open(&mut self, keys: &[SocketKey]) -> io::Result<Vec<bool>> {
        self.still_open_with(keys, DUMP_ABOVE)
    }

    fn still_open_with(&mut self, keys: &[SocketKey], dump_above: usize) -> io::Result<Vec<bool>> {
        let mut open = vec![false; keys.len()];
        let tcp: Vec<usize> = (0..keys.len()).filter(|&i| matches!(keys[i], SocketKey::Tcp { .. })).collect();
        if tcp.len() > dump_above {
            let mut ports: Vec<(u8, u16)> = tcp
                .iter()
                .filter_map(|&i| match keys[i] {
                    SocketKey::Tcp { local, peer } => Some((family_of(local, peer), local.port())),
                    SocketKey::Unix(_) => None,
                })
                .collect();
            ports.sort_unstable();
            ports.dedup();
            let mut live = HashSet::new();
            for (family, port) in ports {
                self.tcp_sockets_on(family, port, &mut live)?;
            }
            for &i in &tcp {
                if let SocketKey::Tcp { local, peer } = keys[i] {
                    open[i] = live.contains(&(canonical(local), canonical(peer)));
                }
            }
        } else {
            for batch in tcp.chunks(BATCH) {
                self.lookup_tcp(keys, batch, &mut open)?;
            }
        }
        if keys.iter().any(|k| matches!(k, SocketKey::Unix(_))) {
            let live = self.unix_inodes()?;
            for (key, open) in keys.iter().zip(open.iter_mut()) {
                if let SocketKey::Unix(inode) = key {
                    *open = live.contains(inode);
                }
            }
        }
        Ok(open)
    }

    /// Adds to `live` the (local, peer) addresses, made IPv6, of every TCP connection on local
    /// `port` that a process holds (inode not 0), in `family`.
    fn tcp_sockets_on(&mut self, family: u8, port: u16, live: &mut HashSet<(SocketAddr, SocketAddr)>) -> io::Result<()> {
        let mut socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
        socket_id.source_port = port;
        socket_id.cookie = NO_COOKIE;
        // Every state a held connection can be in: not listening, not TIME_WAIT (never held).
        let states = StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT - StateFlags::CLOSE;
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        });
        self.dump(request, |payload| {
            let header = InetResponseHeader::parse(payload).map_err(bad_answer)?;
            let id = &header.socket_id;
            if header.inode != 0 && id.source_port == port {
                live.insert((
                    canonical(SocketAddr::new(id.source_address, id.source_port)),
                    canonical(SocketAddr::new(id.destination_address, id.destination_port)),
                ));
            }
            Ok(())
        })
    }

    /// One exact lookup per key of `batch` (indexes into `keys`), in one write.
    fn lookup_tcp(&mut self, keys: &[SocketKey], batch: &[usize], open: &mut [bool]) -> io::Result<()> {
        let mut request = Vec::with_capacity(batch.len() * 80);
        for (seq, &index) in batch.iter().enumerate() {
            let SocketKey::Tcp { local, peer } = keys[index] else { continue };
            let family = family_of(local, peer);
            let (local_ip, peer_ip) = match family {
                AF_INET => (local.ip(), peer.ip()),
                _ => (canonical(local).ip(), canonical(peer).ip()),
            };
            let mut socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
            socket_id.source_port = local.port();
            socket_id.source_address = local_ip;
            socket_id.destination_port = peer.port();
            socket_id.destination_address = peer_ip;
            socket_id.cookie = NO_COOKIE;
            let message = SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id,
            });
            append(&mut request, message, NLM_F_REQUEST, seq as u32);
        }
        self.socket.send(&request, 0)?;
        // Exactly one answer per request: the socket, or an error (`ENOENT` when it is gone).
        // Only the fixed header of each answer is read (its attributes are skipped).
        let mut answered = 0;
        while answered < batch.len() {
            let size = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let mut at = 0;
            while at < size {
                let frame = NetlinkBuffer::new_checked(&self.buffer[at..size]).map_err(bad_answer)?;
                let length = frame.length() as usize;
                let seq = frame.sequence_number() as usize;
                if let Some(&index) = batch.get(seq) {
                    match frame.message_type() {
                        SOCK_DIAG_BY_FAMILY => {
                            let header = InetResponseHeader::parse(frame.payload()).map_err(bad_answer)?;
                            let SocketKey::Tcp { peer, .. } = keys[index] else { continue };
                            open[index] = header.inode != 0
                                && header.state != TCP_LISTEN
                                && header.socket_id.destination_port == peer.port();
                            answered += 1;
                        }
                        NLMSG_ERROR => {
                            let code = error_code(frame.payload());
                            if code != 0 && code != -libc::ENOENT {
                                return Err(io::Error::from_raw_os_error(-code));
                            }
                            answered += 1;
                        }
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                at += length.next_multiple_of(4);
            }
        }
        Ok(())
    }

    /// The inode numbers of every Unix socket of the host (of this network namespace).
    fn unix_inodes(&mut self) -> io::Result<HashSet<u64>> {
        let request = SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: unix::StateFlags::all(),
            inode: 0,
            show_flags: unix::ShowFlags::empty(),
            cookie: NO_COOKIE,
        });
        let mut inodes = HashSet::new();
        self.dump(request, |payload| {
            inodes.insert(u64::from(unix::UnixResponseHeader::parse(payload).map_err(bad_answer)?.inode));
            Ok(())
        })?;
        Ok(inodes)
    }

    /// Sends a dump request and hands the payload of each answer (its fixed header first) to
    /// `each`, until the kernel says done.
    fn dump(&mut self, request: SockDiagMessage, mut each: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(128);
        append(&mut bytes, request, NLM_F_REQUEST | NLM_F_DUMP, 0);
        self.socket.send(&bytes, 0)?;
        loop {
            let size = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let mut at = 0;
            while at < size {
                let frame = NetlinkBuffer::new_checked(&self.buffer[at..size]).map_err(bad_answer)?;
                match frame.message_type() {
                    SOCK_DIAG_BY_FAMILY => each(frame.payload())?,
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = error_code(frame.payload());
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                    }
                    _ => {}
                }
                let length = frame.length() as usize;
                if length == 0 {
                    break;
                }
                at += length.next_multiple_of(4);
            }
        }
    }
}

/// The error number of an `NLMSG_ERROR` payload (negative), 0 for an acknowledgement.
fn error_code(payload: &[u8]) -> i32 {
    payload.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn family_of(local: SocketAddr, peer: SocketAddr) -> u8 {
    if local.is_ipv4() && peer.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

/// The address with an IPv4 address written as IPv4-mapped IPv6, so that both spellings match.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(to_v6(addr.ip())), addr.port())
}

fn bad_answer(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad sock_diag answer: {error}"))
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Appends one request, with its header, to `buffer`.
fn append(buffer: &mut Vec<u8>, message: SockDiagMessage, flags: u16, seq: u32) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, message.into());
    packet.finalize();
    let start = buffer.len();
    buffer.resize(start + packet.buffer_len(), 0);
    packet.serialize(&mut buffer[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_tcp_connection_is_open_until_every_holder_closes_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let key = SocketKey::Tcp { local: server.local_addr().unwrap(), peer };
        let never = SocketKey::Tcp { local: server.local_addr().unwrap(), peer: "127.0.0.1:1".parse().unwrap() };
        let mut diag = SockDiag::new().unwrap();
        assert_eq!(diag.still_open(&[key, never]).unwrap(), vec![true, false]);
        let copy = server.as_fd().try_clone_to_owned().unwrap();
        drop(server);
        assert_eq!(diag.still_open(&[key]).unwrap(), vec![true], "a second descriptor still holds it");
        drop(copy);
        assert_eq!(diag.still_open(&[key]).unwrap(), vec![false]);
        drop(client);
    }

    #[test]
    fn many_lookups_span_batches() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut keep = Vec::new();
        let mut keys = Vec::new();
        for i in 0..(BATCH * 2 + 5) {
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, peer) = listener.accept().unwrap();
            keys.push(SocketKey::Tcp { local: server.local_addr().unwrap(), peer });
            if i % 3 == 0 {
                keep.push(server);
            }
            keep.push(client.try_clone().unwrap());
        }
        let want: Vec<bool> = (0..keys.len()).map(|i| i % 3 == 0).collect();
        let mut diag = SockDiag::new().unwrap();
        assert_eq!(diag.still_open_with(&keys, usize::MAX).unwrap(), want, "one lookup each");
        assert_eq!(diag.still_open_with(&keys, 0).unwrap(), want, "a dump of the port");
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_is_found_both_ways() {
        let Ok(listener) = std::net::TcpListener::bind("[::]:0") else { return }; // no IPv6 here
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        assert!(local.is_ipv6() && peer.is_ipv6(), "IPv4-mapped: {local} {peer}");
        let key = SocketKey::Tcp { local, peer };
        let mut diag = SockDiag::new().unwrap();
        assert_eq!(diag.still_open_with(&[key], usize::MAX).unwrap(), vec![true]);
        assert_eq!(diag.still_open_with(&[key], 0).unwrap(), vec![true]);
        drop(server);
        assert_eq!(diag.still_open_with(&[key], usize::MAX).unwrap(), vec![false]);
        assert_eq!(diag.still_open_with(&[key], 0).unwrap(), vec![false]);
        drop(client);
    }

    #[test]
    fn a_unix_socket_is_open_until_closed() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let inode = |s: &std::os::unix::net::UnixStream| rustix::fs::fstat(s).unwrap().st_ino;
        let key = SocketKey::Unix(inode(&a));
        let mut diag = SockDiag::new().unwrap();
        assert_eq!(diag.still_open(&[key, SocketKey::Unix(inode(&b))]).unwrap(), vec![true, true]);
        drop(a);
        assert_eq!(diag.still_open(&[key]).unwrap(), vec![false]);
    }
}
