//! `AF_UNIX` streams: `net.Socket` for connections (Node's pipes), `net.Server` for listeners.

use super::net::socket_handle;
use super::{FdKind, HandleType};

socket_handle!(
    std::os::unix::net::UnixStream,
    tokio::net::UnixStream,
    HandleType::NetSocket,
    [HandleType::NetSocket, HandleType::NetNative],
    |k| k == FdKind::UnixStream
);

socket_handle!(
    std::os::unix::net::UnixListener,
    tokio::net::UnixListener,
    HandleType::NetServer,
    [HandleType::NetServer, HandleType::NetNative],
    |k| k == FdKind::UnixListener
);
