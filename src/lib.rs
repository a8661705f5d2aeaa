//! # handoff
//!
//! Pass messages and live OS handles — TCP connections, listening servers, UDP sockets, Unix
//! sockets — between processes, speaking Node.js's `child_process` IPC protocol exactly, so a
//! Rust process can be the parent or the child of a real Node process.
//!
//! The layers, bottom up:
//! - `sys` (private): `sendmsg`/`recvmsg` with `SCM_RIGHTS`, descriptor classification
//!   ([`handle::FdKind`]); the only `unsafe` code.
//! - [`channel`]: framing ([`channel::frame`]) and the channel itself ([`Channel`], [`Sender`],
//!   [`Receiver`]), driven by its own task, with the handle acknowledgement queue.
//! - [`handle`]: one conversion per handle type ([`handle::Handle`]).
//! - [`process`]: spawn a child with a channel ([`Command`]), or attach to the parent's
//!   ([`process::parent_channel`]).
//! - [`server`]: a listener whose connection count and `close()` stay true after its
//!   connections were handed to other processes (Node's socket lists).
//! - [`cluster`]: one port served by many worker processes, as Node's `cluster`: a
//!   [`cluster::Primary`] (round-robin or shared, restarts, gated rolling reload, draining stop,
//!   no connection dropped) whose workers are unchanged Node apps, Rust programs using
//!   [`cluster::listen`] (which also run under Node's own primary), or `LISTEN_FDS` programs.
//!
//! See `ARCHITECTURE.md` for who owns a descriptor at every step, and `BENCHMARKS.md` for the
//! measured speed against Node and bare system calls.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! // Parent: hand every connection to a child (Node's `child.send('socket', socket)`).
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:1337").await?;
//! let child = handoff::Command::new("node").arg("child.js").spawn()?;
//! loop {
//!     let (socket, _) = listener.accept().await?;
//!     child.sender().send_handle(&"socket", socket).await?;
//! }
//! # }
//! ```
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! // Child: answer each socket it is handed.
//! use tokio::io::AsyncWriteExt;
//! let mut parent = handoff::process::parent_channel()?.expect("started with an IPC channel");
//! while let Some(message) = parent.recv().await {
//!     let mut message = message?;
//!     if let Some(handle) = message.take_handle() {
//!         let mut socket: tokio::net::TcpStream = handle.try_into()?;
//!         socket.write_all(b"Child handled it.").await?;
//!     }
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs, unreachable_pub, unsafe_op_in_unsafe_fn)]
#![deny(unsafe_code)]

pub mod channel;
pub mod cluster;
pub mod handle;
pub mod process;
pub mod server;
#[allow(unsafe_code)]
mod sys;

// Everything that appears in a public signature is also here, at the root, so one `use
// handoff::{...}` line covers a program; the modules hold the details.
pub use channel::{
    Channel, ChannelConfig, Delivery, FrameError, InternalMessage, InternalMessages, Message,
    Receiver, RecvError, SendError, SendHandleError, Sender,
};
pub use handle::{
    ConvertError, Handle, HandleError, HandleType, IntoWire, KeepOpen, Native, RawHandle,
    ReceivedHandle,
};
pub use process::{Child, Command};
pub use server::{AcceptRetry, Connection, Server, ServerError};

/// README.md's code, compiled as doctests so that the snippets stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
