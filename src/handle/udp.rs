//! UDP: `dgram.Socket`, always with the `dgramType` a Node receiver requires.

use super::net::socket_handle;
use super::{DgramType, FdKind, HandleType};

/// `udp4` or `udp6`, from the socket's bound address. A socket whose address cannot be read is
/// described from its descriptor instead, so `dgramType` is never missing.
fn dgram_type_of(socket: &std::net::UdpSocket) -> Option<DgramType> {
    use std::os::fd::AsFd;
    match socket.local_addr() {
        Ok(addr) if addr.is_ipv4() => Some(DgramType::Udp4),
        Ok(_) => Some(DgramType::Udp6),
        Err(_) => crate::sys::classify(socket.as_fd()).ok().and_then(DgramType::of),
    }
}

socket_handle!(
    std::net::UdpSocket,
    tokio::net::UdpSocket,
    HandleType::DgramSocket,
    [HandleType::DgramSocket, HandleType::DgramNative],
    FdKind::is_udp,
    |s| dgram_type_of(s)
);
