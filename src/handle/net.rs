//! TCP: `net.Socket` for connections, `net.Server` for listeners.

use super::{FdKind, HandleType};

/// Implements [`Handle`](super::Handle) and [`Shareable`](super::Shareable) for a std socket type
/// and its tokio counterpart.
///
/// `$wire` is the type written when sending; `$accepted` the wire types it can be built from;
/// `$kind_ok` which descriptor kinds it can be built from.
macro_rules! socket_handle {
    ($std:ty, $tokio:ty, $wire:expr, [$($accepted:expr),+], $kind_ok:expr) => {
        impl $crate::handle::Handle for $std {
            /// Checked against the kernel: a std socket can be built from any descriptor in safe
            /// code (`From<OwnedFd>`), and a mislabelled one would crash a Node receiver.
            fn into_wire(self) -> Result<$crate::handle::WireHandle, $crate::handle::HandleError> {
                $crate::handle::WireHandle::new($wire, std::os::fd::OwnedFd::from(self))
            }
            fn from_received(
                handle: $crate::handle::ReceivedHandle,
            ) -> Result<Self, $crate::handle::ConvertError> {
                handle
                    .expect(&[$($accepted),+], $kind_ok, stringify!($std))
                    .map(<$std>::from)
            }
        }

        impl $crate::handle::Shareable for $std {
            fn describe(
                &self,
                dup: std::os::fd::OwnedFd,
            ) -> Result<$crate::handle::WireHandle, $crate::handle::HandleError> {
                $crate::handle::WireHandle::new($wire, dup)
            }
        }

        impl $crate::handle::Handle for $tokio {
            fn into_wire(self) -> Result<$crate::handle::WireHandle, $crate::handle::HandleError> {
                self.into_std().map_err($crate::handle::HandleError::Io)?.into_wire()
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

        impl $crate::handle::Shareable for $tokio {
            fn describe(
                &self,
                dup: std::os::fd::OwnedFd,
            ) -> Result<$crate::handle::WireHandle, $crate::handle::HandleError> {
                $crate::handle::WireHandle::new($wire, dup)
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
