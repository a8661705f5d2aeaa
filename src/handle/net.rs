//! TCP: `net.Socket` for connections, `net.Server` for listeners.

use super::{FdKind, HandleType};

/// Implements [`Handle`](super::Handle) and `TryFrom<ReceivedHandle>` for a std socket type and
/// its tokio counterpart.
///
/// `$wire` is the type written when sending; `$accepted` the wire types it can be built from;
/// `$kind_ok` which descriptor kinds it can be built from.
macro_rules! socket_handle {
    ($std:ty, $tokio:ty, $wire:expr, [$($accepted:expr),+], $kind_ok:expr) => {
        /// Sent as its type; the descriptor is checked against the kernel first (a std socket
        /// can be built from any descriptor in safe code, and a mislabelled one would crash a
        /// Node receiver).
        impl $crate::handle::Handle for $std {
            fn handle_type(&self) -> $crate::handle::HandleType {
                $wire
            }
            fn from_received(
                handle: $crate::handle::ReceivedHandle,
            ) -> Result<Self, $crate::handle::ConvertError> {
                handle
                    .expect(&[$($accepted),+], $kind_ok, stringify!($std))
                    .map(<$std>::from)
            }
        }

        impl TryFrom<$crate::handle::ReceivedHandle> for $std {
            type Error = $crate::handle::ConvertError;
            fn try_from(
                handle: $crate::handle::ReceivedHandle,
            ) -> Result<Self, $crate::handle::ConvertError> {
                <$std as $crate::handle::Handle>::from_received(handle)
            }
        }

        /// Sent as its type, registered with tokio until the peer acknowledges it; received
        /// into the current runtime, non-blocking.
        impl $crate::handle::Handle for $tokio {
            fn handle_type(&self) -> $crate::handle::HandleType {
                $wire
            }
            fn from_received(
                handle: $crate::handle::ReceivedHandle,
            ) -> Result<Self, $crate::handle::ConvertError> {
                $crate::handle::into_tokio(
                    handle,
                    stringify!($tokio),
                    &[$($accepted),+],
                    $kind_ok,
                    <$tokio>::from_std,
                )
            }
        }

        impl TryFrom<$crate::handle::ReceivedHandle> for $tokio {
            type Error = $crate::handle::ConvertError;
            fn try_from(
                handle: $crate::handle::ReceivedHandle,
            ) -> Result<Self, $crate::handle::ConvertError> {
                <$tokio as $crate::handle::Handle>::from_received(handle)
            }
        }
    };
}
pub(crate) use socket_handle;

socket_handle!(
    std::net::TcpStream,
    tokio::net::TcpStream,
    HandleType::NetSocket,
    [HandleType::NetSocket, HandleType::NetNative],
    |k| k == FdKind::TcpStream
);

socket_handle!(
    std::net::TcpListener,
    tokio::net::TcpListener,
    HandleType::NetServer,
    [HandleType::NetServer, HandleType::NetNative],
    |k| k == FdKind::TcpListener
);
