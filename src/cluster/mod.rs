//! Node's `cluster`: one port served by many worker processes.
//!
//! - [`Primary`]: the primary side — binds the listeners, starts and supervises the workers,
//!   hands out connections (round-robin) or the listening socket itself (shared), restarts,
//!   reloads and drains. `handoff run` is a thin layer over it.
//! - [`listen`] / [`Worker`]: the worker side. A Rust program that calls
//!   `handoff::cluster::listen(addr)` serves `addr` on its own when started alone, and through
//!   the primary when started by one — handoff's, or Node's own `cluster` primary (point
//!   `cluster.setupPrimary({exec})` / `execPath` at the Rust binary).
//!
//! The wire protocol is Node's (`NODE_CLUSTER` messages, see `protocol`), so unchanged Node
//! workers and Rust workers mix freely.

pub mod primary;
mod protocol;
pub mod worker;

pub use primary::{
    BoundAddr, Event, EVENTS, MAX_DURATION, ListenAddr, ParseListenAddrError, Primary, PrimaryBuilder, PrimaryError, ReloadReport, Schedule,
    Status, WorkerOutput, WorkerStatus,
};
pub use worker::{listen, Listener, Worker};
