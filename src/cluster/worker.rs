//! The worker side of Node's cluster protocol: a Rust program that serves a port it was given by a
//! cluster primary — handoff's, or Node's own — or, started on its own, binds the port itself.
//!
//! [`listen`] is all most programs need:
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! use tokio::io::AsyncWriteExt;
//! let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
//! let mut listener = handoff::cluster::listen(format!("127.0.0.1:{port}")).await?;
//! while let Ok((mut socket, _peer)) = listener.accept().await {
//!     tokio::spawn(async move { socket.write_all(b"hello\n").await });
//! }
//! // The primary asked this worker to stop (or went away): finish and exit.
//! # Ok(()) }
//! ```
//!
//! Under a primary (the process was started with `NODE_UNIQUE_ID` and an IPC channel), `listen`
//! asks the primary for the server (`queryServer`), exactly as a Node worker's `server.listen()`
//! does, and gets either the connections one by one (round-robin: each arrives as a `newconn`
//! handle, answered `accepted`) or the listening socket itself (shared: this process accepts).
//! When the primary sends `disconnect`, every listener stops (`accept` returns an error of kind
//! `NotConnected`), each server is reported closed, and the channel is closed; the program then
//! finishes the connections it has and exits. If the primary goes away, the same happens.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::protocol::{Act, ActKey, FromPrimary, ServerMessage, CLUSTER};
use crate::channel::{ChannelConfig, Message, Receiver, Sender};
use crate::handle::ReceivedHandle;
use crate::server::AcceptRetry;

/// Round-robin connections waiting for `accept` per listener; past this the worker answers
/// `accepted: false` and the primary gives the connection to another worker.
const ACCEPT_QUEUE: usize = 256;
/// How long the primary may take to answer `queryServer`.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The primary's answer to one of our messages, and the handle that came with it.
type Answer = (Value, Option<ReceivedHandle>);

/// This process's link to its cluster primary.
#[derive(Debug, Clone)]
pub struct Worker {
    link: Arc<Link>,
}

#[derive(Debug)]
struct Link {
    id: String,
    sender: Sender,
    /// Numbers our cluster messages, from 0 (`online`).
    seq: AtomicU64,
    /// Our messages awaiting an answer, by `seq`.
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    /// Round-robin servers: where the connections for each key go.
    round_robin: Mutex<HashMap<String, Arc<RoundRobinQueue>>>,
    /// Listens so far per `address:port:addressType:fd` (Node's `index`).
    indexes: Mutex<HashMap<String, u64>>,
    /// Keys of the servers this worker has, to report them closed on `disconnect`.
    keys: Mutex<Vec<String>>,
    /// True once the primary asked us to stop, or went away.
    stopping: watch::Sender<bool>,
    /// The user's messages, if someone asked for them ([`Worker::messages`]).
    messages: Mutex<Option<mpsc::Sender<Message>>>,
}

/// Connections handed over by the primary and not yet taken by `accept`. Each is answered
/// `accepted: true` only when `accept` takes it, so a connection this worker has not started on
/// goes back to the primary (answered `accepted: false`) if the worker stops, and the primary
/// gives it to another worker; if the worker dies, the primary sees no answer and does the same.
#[derive(Debug, Default)]
struct RoundRobinQueue {
    waiting: Mutex<VecDeque<(u64, TcpStream)>>,
    arrived: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl RoundRobinQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, TcpStream)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a connection if there is room (and the listener is open).
    fn offer(&self, seq: u64, stream: TcpStream) -> Result<(), TcpStream> {
        let mut waiting = self.lock();
        if self.closed.load(Ordering::SeqCst) || waiting.len() >= ACCEPT_QUEUE {
            return Err(stream);
        }
        waiting.push_back((seq, stream));
        drop(waiting);
        self.arrived.notify_one();
        Ok(())
    }

    /// Closes the queue; returns what was waiting (to be refused back to the primary).
    fn close(&self) -> Vec<u64> {
        self.closed.store(true, Ordering::SeqCst);
        self.arrived.notify_waiters();
        self.arrived.notify_one();
        self.lock().drain(..).map(|(seq, _stream)| seq).collect()
    }
}

/// The process-wide link, made on first use.
static WORKER: Mutex<Option<Worker>> = Mutex::new(None);

impl Worker {
    /// The link to this process's cluster primary, or `None` if it was not started as a cluster
    /// worker (no `NODE_UNIQUE_ID`). The first call takes the IPC channel
    /// ([`parent_channel`](crate::process::parent_channel)) and tells the primary the worker is
    /// `online`; later calls return the same link. Needs a tokio runtime.
    pub fn connect() -> io::Result<Option<Worker>> {
        let mut current = WORKER.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(worker) = current.as_ref() {
            return Ok(Some(worker.clone()));
        }
        if std::env::var_os(crate::process::WORKER_ID_ENV).is_none() {
            return Ok(None);
        }
        let config = ChannelConfig::default().receive_internal(true).handle_window(64);
        let Some(channel) = crate::process::parent_channel_with_config(config)? else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "NODE_UNIQUE_ID is set but there is no IPC channel (NODE_CHANNEL_FD): a cluster \
                 worker must be started by its primary",
            ));
        };
        let id = crate::process::worker_id().unwrap_or_default().to_owned();
        let (sender, receiver) = channel.split();
        let link = Arc::new(Link {
            id,
            sender,
            seq: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            round_robin: Mutex::new(HashMap::new()),
            indexes: Mutex::new(HashMap::new()),
            keys: Mutex::new(Vec::new()),
            stopping: watch::channel(false).0,
            messages: Mutex::new(None),
        });
        let online = Act { cmd: CLUSTER, act: "online", seq: link.next_seq() };
        let sender = link.sender.clone();
        tokio::spawn(async move {
            let _ = sender.send_protocol(&online).await;
        });
        tokio::spawn(read_from_primary(link.clone(), receiver));
        let worker = Worker { link };
        *current = Some(worker.clone());
        Ok(Some(worker))
    }

    /// The worker id the primary gave (`NODE_UNIQUE_ID`), from 1.
    pub fn id(&self) -> &str {
        &self.link.id
    }

    /// The channel to the primary, for the program's own messages (`process.send` in Node).
    pub fn sender(&self) -> &Sender {
        &self.link.sender
    }

    /// The program's own messages from the primary (anything but the cluster protocol). Only the
    /// first call gets them; until it is made they are dropped.
    pub fn messages(&self) -> Option<mpsc::Receiver<Message>> {
        let mut slot = self.link.messages.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return None;
        }
        let (tx, rx) = mpsc::channel(256);
        *slot = Some(tx);
        Some(rx)
    }

    /// Resolves once the primary asked this worker to stop (`disconnect`) or went away.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn stopping(&self) {
        let mut stopping = self.link.stopping.subscribe();
        let _ = stopping.wait_for(|s| *s).await;
    }

    /// Asks the primary for the server on `addr`, as a Node worker's `server.listen()` does.
    ///
    /// # Cancel safety
    /// Not cancel safe: if dropped while waiting for the primary, the server may be set up on the
    /// primary's side without a listener here (its connections are then refused back to the
    /// primary, which gives them to other workers).
    pub async fn listen(&self, addr: impl tokio::net::ToSocketAddrs) -> io::Result<Listener> {
        let addr = resolve(addr).await?;
        let link = &self.link;
        if *link.stopping.borrow() {
            return Err(stopped());
        }
        let address = addr.ip().to_string();
        let address_type = if addr.is_ipv4() { 4 } else { 6 };
        let index = {
            let mut indexes = link.indexes.lock().unwrap_or_else(|p| p.into_inner());
            let next = indexes.entry(format!("{address}:{}:{address_type}:undefined", addr.port())).or_insert(0);
            *next += 1;
            *next - 1
        };
        let seq = link.next_seq();
        let (answer, answered) = oneshot::channel();
        link.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(seq, answer);
        let query = ServerMessage {
            cmd: CLUSTER,
            act: "queryServer",
            index,
            data: Value::Null,
            address: &address,
            port: addr.port(),
            address_type,
            flags: 0,
            backlog: false,
            seq,
        };
        if let Err(error) = link.sender.send_protocol(&query).await {
            link.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&seq);
            return Err(io::Error::other(error));
        }
        let (reply, handle) = match tokio::time::timeout(QUERY_TIMEOUT, answered).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => return Err(stopped()),
            Err(_) => {
                link.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&seq);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the cluster primary did not answer the query for {addr} within {QUERY_TIMEOUT:?}"),
                ))
            }
        };
        if let Some(errno) = reply.get("errno").and_then(Value::as_i64).filter(|e| *e != 0) {
            let os = io::Error::from_raw_os_error(-errno as i32);
            return Err(io::Error::new(os.kind(), format!("the cluster primary could not listen on {addr}: {os}")));
        }
        let key = reply.get("key").and_then(Value::as_str).unwrap_or_default().to_owned();
        let (mode, local_addr) = match handle {
            // Shared: the listening socket itself.
            Some(handle) => {
                let listener = shared_listener(handle.into_fd())?;
                let local = listener.local_addr()?;
                (Mode::Own(listener), local)
            }
            // Round-robin: connections come as `newconn`.
            None => {
                let queue = Arc::new(RoundRobinQueue::default());
                link.round_robin.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), queue.clone());
                let port = reply.pointer("/sockname/port").and_then(Value::as_u64).unwrap_or(addr.port().into());
                (Mode::RoundRobin(queue), SocketAddr::new(addr.ip(), port as u16))
            }
        };
        link.keys.lock().unwrap_or_else(|p| p.into_inner()).push(key.clone());
        let listening = ServerMessage {
            act: "listening",
            port: local_addr.port(),
            seq: link.next_seq(),
            ..query
        };
        link.sender.send_protocol(&listening).await.map_err(io::Error::other)?;
        Ok(Listener {
            mode,
            local_addr,
            stopping: Some(link.stopping.subscribe()),
            linked: Some((self.clone(), key)),
            taken: None,
        })
    }

    /// Stops this worker on its own initiative, as Node's `cluster.worker.disconnect()`: reports
    /// its servers closed, tells the primary it is leaving on purpose (`exitedAfterDisconnect`:
    /// not a crash; a handoff primary starts another worker in its place, with the crash backoff
    /// so a program that leaves at once every time is not restarted in a loop), waits for the
    /// primary's answer, and closes the channel.
    ///
    /// # Cancel safety
    /// Not cancel safe: the primary may have been told without the channel being closed.
    pub async fn disconnect(&self) {
        let link = &self.link;
        link.close_servers().await;
        let seq = link.next_seq();
        let (answer, answered) = oneshot::channel();
        link.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(seq, answer);
        let leaving = Act { cmd: CLUSTER, act: "exitedAfterDisconnect", seq };
        if link.sender.send_protocol(&leaving).await.is_ok() {
            let _ = tokio::time::timeout(QUERY_TIMEOUT, answered).await;
        }
        link.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&seq);
        link.sender.disconnect();
    }
}

impl Link {
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    /// Stops every listener and reports each server closed (Node's worker does so on
    /// `disconnect`); connections not yet accepted go back to the primary.
    async fn close_servers(&self) {
        self.stopping.send_replace(true);
        let queues: Vec<Arc<RoundRobinQueue>> =
            self.round_robin.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, q)| q).collect();
        for queue in queues {
            for seq in queue.close() {
                self.answer(seq, false).await;
            }
        }
        let keys = std::mem::take(&mut *self.keys.lock().unwrap_or_else(|p| p.into_inner()));
        for key in keys {
            let close = ActKey { cmd: CLUSTER, act: "close", key: &key, seq: self.next_seq() };
            let _ = self.sender.send_protocol(&close).await;
        }
    }

    /// A `newconn`: queued for the listener of `key` (answered when `accept` takes it), or
    /// refused at once (no such listener, or its queue is full).
    async fn on_newconn(&self, seq: u64, key: &str, handle: Option<ReceivedHandle>) {
        let stream = handle.and_then(|h| TcpStream::try_from(h).ok());
        let target = self.round_robin.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned();
        let queued = match (stream, target) {
            (Some(stream), Some(target)) => target.offer(seq, stream).is_ok(),
            _ => false,
        };
        if !queued {
            self.answer(seq, false).await;
        }
    }

    /// Answers the primary's `newconn` number `seq`.
    async fn answer(&self, seq: u64, accepted: bool) {
        let reply = super::protocol::accepted(seq, accepted, self.next_seq());
        let _ = self.sender.send_protocol_encoded(reply).await;
    }
}

/// Reads the channel: cluster messages are acted on, the program's own are passed on.
async fn read_from_primary(link: Arc<Link>, mut receiver: Receiver) {
    while let Some(item) = receiver.recv().await {
        let Ok(mut message) = item else { continue };
        if message.internal_cmd() != Some(CLUSTER) {
            let subscriber = link.messages.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(subscriber) = subscriber {
                let _ = subscriber.send(message).await;
            }
            continue;
        }
        let handle = message.take_handle();
        match FromPrimary::parse_json(message.json()) {
            FromPrimary::NewConn { seq, key } => link.on_newconn(seq, &key, handle).await,
            FromPrimary::Disconnect => {
                link.close_servers().await;
                link.sender.disconnect();
            }
            FromPrimary::Reply { ack, message } => {
                let waiter = link.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&ack);
                if let Some(waiter) = waiter {
                    let _ = waiter.send((message, handle));
                }
            }
            FromPrimary::Other => {}
        }
    }
    // The primary is gone (or we disconnected): nothing more will come.
    link.stopping.send_replace(true);
    for (_, queue) in link.round_robin.lock().unwrap_or_else(|p| p.into_inner()).drain() {
        queue.close();
    }
    link.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// A shared listening socket from the primary: Node's primary sends it bound but not yet
/// listening (each worker calls `listen`); handoff's sends it listening. Either way it ends up
/// listening here.
fn shared_listener(fd: OwnedFd) -> io::Result<TcpListener> {
    let kind = crate::sys::classify(fd.as_fd())?;
    if !matches!(kind, crate::sys::FdKind::TcpListener | crate::sys::FdKind::TcpStream) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the cluster primary sent a {kind:?} descriptor as a shared TCP server"),
        ));
    }
    let socket = socket2::Socket::from(fd);
    socket.listen(511)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

async fn resolve(addr: impl tokio::net::ToSocketAddrs) -> io::Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the address resolved to nothing"))
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the cluster primary asked this worker to stop accepting")
}

/// Listens on `addr`: under a cluster primary (handoff's or Node's), through it ([`Worker::listen`]);
/// started on its own, by binding `addr` itself. The same program runs both ways.
///
/// # Cancel safety
/// As [`Worker::listen`].
pub async fn listen(addr: impl tokio::net::ToSocketAddrs) -> io::Result<Listener> {
    match Worker::connect()? {
        Some(worker) => worker.listen(addr).await,
        None => {
            let listener = TcpListener::bind(addr).await?;
            Ok(Listener { local_addr: listener.local_addr()?, mode: Mode::Own(listener), stopping: None, linked: None, taken: None })
        }
    }
}

/// A server a worker accepts connections on; see [`listen`].
#[derive(Debug)]
pub struct Listener {
    mode: Mode,
    local_addr: SocketAddr,
    /// Under a primary: becomes true when the worker must stop accepting.
    stopping: Option<watch::Receiver<bool>>,
    /// The worker and the server's key, under a primary.
    linked: Option<(Worker, String)>,
    /// Round-robin: a connection `accept` took from the queue and has not returned yet (kept
    /// here across its awaits, so a dropped `accept` future loses nothing).
    taken: Option<Taken>,
}

#[derive(Debug)]
struct Taken {
    seq: u64,
    stream: TcpStream,
    /// The primary was sent `accepted: true` for it.
    answered: bool,
}

#[derive(Debug)]
enum Mode {
    /// Bound here, or shared by the primary: this process accepts.
    Own(TcpListener),
    /// The primary accepts and hands connections over.
    RoundRobin(Arc<RoundRobinQueue>),
}

impl Listener {
    /// The next connection. Fails only with `ErrorKind::NotConnected`, once the primary asked the
    /// worker to stop (or went away), or when the listening socket itself breaks; waits out
    /// descriptor exhaustion ([`AcceptRetry`]) and skips connections whose client is already
    /// gone.
    ///
    /// # Cancel safety
    /// Cancel safe: no connection is lost if the future is dropped.
    pub async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let mut stopping = self.stopping.clone();
        let Listener { mode, linked, taken, .. } = self;
        match mode {
            Mode::RoundRobin(queue) => loop {
                if taken.is_none() {
                    let arrived = queue.arrived.notified();
                    let next = queue.lock().pop_front();
                    match next {
                        Some((seq, stream)) => *taken = Some(Taken { seq, stream, answered: false }),
                        None if queue.closed.load(Ordering::SeqCst) => return Err(stopped()),
                        None => {
                            arrived.await;
                            continue;
                        }
                    }
                }
                // Taken: now it is ours (the primary closes its copy). The answer is on the wire
                // before the program touches the connection, so that if this process dies while
                // serving it the primary knows it was taken and does not hand it to another
                // worker (as Node's worker writes `accepted` synchronously before it emits
                // 'connection'). Answering twice (after a cancelled call) is harmless: the
                // primary ignores an answer it no longer waits for.
                if let Some((worker, _)) = linked.as_ref() {
                    let this = taken.as_mut().expect("taken above");
                    if !this.answered {
                        worker.link.answer(this.seq, true).await;
                        this.answered = true;
                    }
                    let _ = worker.link.sender.flush().await;
                }
                let Taken { stream, .. } = taken.take().expect("taken above");
                match stream.peer_addr() {
                    Ok(peer) => return Ok((stream, peer)),
                    // The client is already gone (reset while the connection was on its way):
                    // nothing to serve, take the next one.
                    Err(error) => {
                        tracing::debug!(%error, "skipping a connection whose client is gone");
                        continue;
                    }
                }
            },
            Mode::Own(listener) => {
                let mut retry = AcceptRetry::new();
                let stop = async {
                    match &mut stopping {
                        Some(stopping) => {
                            let _ = stopping.wait_for(|s| *s).await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok(connection) => {
                                retry.accepted();
                                return Ok(connection);
                            }
                            Err(error) => retry.wait(error).await?,
                        },
                        _ = &mut stop => return Err(stopped()),
                    }
                }
            }
        }
    }

    /// The address clients connect to (for round-robin, the primary's).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether connections come from a cluster primary (`true`) or this process bound the port
    /// itself.
    pub fn is_clustered(&self) -> bool {
        self.linked.is_some()
    }
}

impl Drop for Listener {
    /// Under a primary, reports the server closed (`act: close`), as Node's worker does.
    fn drop(&mut self) {
        let Some((worker, key)) = self.linked.take() else { return };
        let link = worker.link;
        link.round_robin.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        let mut refused = match &self.mode {
            Mode::RoundRobin(queue) => queue.close(),
            Mode::Own(_) => Vec::new(),
        };
        // Taken by an `accept` that was dropped before it answered: not ours yet, refused too.
        if let Some(taken) = self.taken.take().filter(|t| !t.answered) {
            refused.insert(0, taken.seq);
        }
        let mut keys = link.keys.lock().unwrap_or_else(|p| p.into_inner());
        let Some(at) = keys.iter().position(|k| *k == key) else { return };
        keys.remove(at);
        drop(keys);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for seq in refused {
                    link.answer(seq, false).await;
                }
                let close = ActKey { cmd: CLUSTER, act: "close", key: &key, seq: link.next_seq() };
                let _ = link.sender.send_protocol(&close).await;
            });
        }
    }
}

