//! The two halves of Node's `lib/internal/socket_list.js`, per channel.
//!
//! - [`ReceiveLists`] (Node's `SocketListReceive`): on the side that *received* server sockets,
//!   the count of those still open, per server key, answering `NODE_SOCKET_GET_COUNT` and
//!   `NODE_SOCKET_NOTIFY_CLOSE`. It lives in the channel's driver task.
//! - [`Replies`] (the waiting half of Node's `SocketListSend`): on the side that *sent* them,
//!   the requests awaiting `NODE_SOCKET_COUNT` / `NODE_SOCKET_ALL_CLOSED`, matched by command and
//!   key, oldest first.
//!
//! # How a received socket is known to be closed
//! The user converts a received handle into whatever type they like (a tokio stream, a std
//! stream, an fd handed to another library), so there is no wrapper whose drop could be
//! observed. Instead each socket is remembered by its inode, and "open" means that some
//! descriptor of this process still refers to that inode (`/proc/self/fd`). That is exactly the
//! condition under which the connection is still held here: a socket sent on to another
//! process, or closed, stops counting; one duplicated stays counted until every copy is closed.
//! Entries are pruned on every count, and at least whenever the list doubles, so the lists never
//! grow with the number of sockets ever received.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::sys;

/// Received keyed sockets, per server key.
#[derive(Debug, Default)]
pub(crate) struct ReceiveLists {
    /// Inodes of the sockets received under each key (possibly already closed).
    sockets: HashMap<String, Vec<u64>>,
    /// Keys whose sender asked to be told when they reach zero.
    close_requested: HashSet<String>,
    /// Entries at the last prune; the next prune happens when the total doubles.
    entries_at_prune: usize,
}

impl ReceiveLists {
    /// Records a socket received under `key`.
    pub(crate) fn add(&mut self, key: &str, inode: u64) {
        self.sockets.entry(key.to_owned()).or_default().push(inode);
        let entries: usize = self.sockets.values().map(Vec::len).sum();
        if entries >= 2 * self.entries_at_prune.max(32) {
            self.prune();
        }
    }

    /// Forgets closed sockets (one scan of `/proc/self/fd`) and empty keys.
    fn prune(&mut self) {
        let open = sys::open_socket_inodes();
        for inodes in self.sockets.values_mut() {
            inodes.retain(|inode| open.contains(inode));
        }
        self.sockets.retain(|key, inodes| !inodes.is_empty() || self.close_requested.contains(key));
        self.entries_at_prune = self.sockets.values().map(Vec::len).sum();
    }

    /// How many sockets received under `key` are still open in this process.
    pub(crate) fn count(&mut self, key: &str) -> usize {
        self.prune();
        self.sockets.get(key).map_or(0, Vec::len)
    }

    /// The sender will close its server: returns true if `key` has no open socket now (answer
    /// at once); otherwise remembers to answer when it reaches zero ([`Self::now_closed`]).
    pub(crate) fn request_close(&mut self, key: &str) -> bool {
        if self.count(key) == 0 {
            return true;
        }
        self.close_requested.insert(key.to_owned());
        false
    }

    /// Whether any close request is waiting (the driver then checks periodically).
    pub(crate) fn has_close_requests(&self) -> bool {
        !self.close_requested.is_empty()
    }

    /// Keys with a close request whose sockets are now all closed; they are answered once.
    pub(crate) fn now_closed(&mut self) -> Vec<String> {
        self.prune();
        let done: Vec<String> = self
            .close_requested
            .iter()
            .filter(|key| self.sockets.get(*key).is_none_or(Vec::is_empty))
            .cloned()
            .collect();
        for key in &done {
            self.close_requested.remove(key);
            self.sockets.remove(key);
        }
        done
    }
}

/// Which reply a request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ReplyKind {
    /// `NODE_SOCKET_COUNT`, answering `NODE_SOCKET_GET_COUNT`.
    Count,
    /// `NODE_SOCKET_ALL_CLOSED`, answering `NODE_SOCKET_NOTIFY_CLOSE`.
    AllClosed,
}

/// Requests sent on a channel and awaiting their reply.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    state: Mutex<RepliesState>,
}

#[derive(Debug, Default)]
struct RepliesState {
    /// Set when the channel closed: no reply can come any more.
    closed: bool,
    waiting: HashMap<(ReplyKind, String), VecDeque<oneshot::Sender<usize>>>,
}

impl Replies {
    /// Registers a wait for the reply of `kind` for `key`; `None` if the channel is closed.
    pub(crate) fn wait(&self, kind: ReplyKind, key: &str) -> Option<oneshot::Receiver<usize>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        state.waiting.entry((kind, key.to_owned())).or_default().push_back(tx);
        Some(rx)
    }

    /// A reply arrived: resolves the oldest request waiting for it (others keep waiting for
    /// their own). A reply nobody waits for is ignored.
    pub(crate) fn resolve(&self, kind: ReplyKind, key: &str, value: usize) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (kind, key.to_owned());
        if let Some(queue) = state.waiting.get_mut(&slot) {
            while let Some(waiter) = queue.pop_front() {
                if waiter.send(value).is_ok() {
                    break; // one reply answers one request; skip requests whose caller gave up
                }
            }
            if queue.is_empty() {
                state.waiting.remove(&slot);
            }
        }
    }

    /// The channel closed: every waiting request fails.
    pub(crate) fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.closed = true;
        state.waiting.clear();
    }
}
