//! TCP: `net.Socket` for connections, `net.Server` for listeners.

use super::{FdKind, HandleType};

/// Implements [`Handle`](super::Handle) and [`Shareable`](super::Shareable) for a std socket type
/// and its tokio counterpart.
///
/// `$wire` is the type written when sending; `$accepted` the wire types it can be built from;
/// `$kind_ok` which descriptor kinds it can be built from; `$describe` fills the envelope for a
/// descriptor of this type (it may ask the socket, e.g. for a UDP socket's family).
macro_rules! socket_handle {
    ($std:ty, $tokio:ty, $wire:expr, [$($accepted:expr),+], $kind_ok:expr, $describe:expr) => {
        impl $crate::handle::Handle for $std {
            fn into_wire(self) -> Result<$crate::handle::WireHandle, $crate::handle::HandleError> {
                let describe: fn(&$std) -> Option<$crate::handle::DgramType> = $describe;
                let dgram_type = describe(&self);
                Ok($crate::handle::WireHandle::trusted($wire, std::os::fd::OwnedFd::from(self), dgram_type))
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
                let describe: fn(&$std) -> Option<$crate::handle::DgramType> = $describe;
                Ok($crate::handle::WireHandle::trusted($wire, dup, describe(self)))
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
                let std = <$std>::from(dup);
                let describe: fn(&$std) -> Option<$crate::handle::DgramType> = $describe;
                let dgram_type = describe(&std);
                Ok($crate::handle::WireHandle::trusted($wire, std::os::fd::OwnedFd::from(std), dgram_type))
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
    |k| k == FdKind::TcpStream,
    |_| None
);

socket_handle!(
    std::net::TcpListener,
    tokio::net::TcpListener,
    HandleType::NetServer,
    [HandleType::NetServer, HandleType::NetNative],
    |k| k == FdKind::TcpListener,
    |_| None
);
