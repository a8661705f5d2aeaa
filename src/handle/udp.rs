//! UDP: `dgram.Socket`, always with the `dgramType` a Node receiver requires (taken from the
//! descriptor's address family by [`WireHandle::new`](super::WireHandle::new)).

use super::net::socket_handle;
use super::{FdKind, HandleType};

socket_handle!(
    std::net::UdpSocket,
    tokio::net::UdpSocket,
    HandleType::DgramSocket,
    [HandleType::DgramSocket, HandleType::DgramNative],
    FdKind::is_udp
);
