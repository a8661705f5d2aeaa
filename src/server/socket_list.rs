//! The two halves of Node's `lib/internal/socket_list.js`, per channel.
//!
//! - [`ReceiveLists`] (Node's `SocketListReceive`): on the side that *received* server sockets,
//!   the count of those still open, per server key, answering `NODE_SOCKET_GET_COUNT` and
//!   `NODE_SOCKET_NOTIFY_CLOSE`. It lives in the channel's driver task.
//! - [`Replies`] (the waiting half of Node's `SocketListSend`): on the side that *sent* them,
//!   the requests awaiting `NODE_SOCKET_COUNT` / `NODE_SOCKET_ALL_CLOSED`, matched by command and
//!   key.
//!
//! # How a received socket is known to be closed
//! The user converts a received handle into whatever type they like (a tokio stream, a std
//! stream, an `OwnedFd` handed to another library), so there is no wrapper whose drop could be
//! observed. Every conversion keeps the descriptor *number*, though, so each socket is remembered
//! by the number it arrived on and the identity (device, inode) of the socket behind it: it is
//! open while that number still refers to that socket. One `fstat` per socket checks it, with no
//! descriptor needed, so a full descriptor table cannot make a socket look closed; a check that
//! fails for any reason other than "no such descriptor" counts the socket as open. A socket sent
//! on to another process, or closed, stops counting; one moved to another number (`dup` then
//! close of the original) stops counting too, which is the one case this rule gets wrong.
//!
//! # What a request costs
//! A count checks only the sockets filed under its key, never the descriptor table. Checks are
//! also rationed: they may use at most 1/[`VERIFY_SHARE`] of the time that passes (a token
//! bucket), so a peer flooding requests for a key with thousands of sockets gets answers from the
//! last check — possibly counting a socket closed since, never forgetting an open one — instead
//! of burning a core.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::sys::{FdIdentity, Liveness};

/// Checks may use at most 1/`VERIFY_SHARE` of elapsed time.
const VERIFY_SHARE: u32 = 20;
/// Most check time saved up while idle.
const VERIFY_BURST: Duration = Duration::from_millis(50);

/// Received keyed sockets, per server key.
#[derive(Debug)]
pub(crate) struct ReceiveLists {
    /// The sockets received under each key (possibly closed since the last check). A set: the
    /// same socket arriving again on the same descriptor number (its first copy closed, the
    /// number reused) is one socket, not two.
    sockets: HashMap<Box<str>, HashSet<FdIdentity>>,
    /// Keys whose sender asked to be told when they reach zero.
    close_requested: HashSet<Box<str>>,
    /// Entries after the last full check; the next one happens when the total doubles.
    entries_at_prune: usize,
    entries: usize,
    /// Check time available (token bucket), and when it was last topped up.
    budget: Duration,
    budget_at: Instant,
}

impl Default for ReceiveLists {
    fn default() -> Self {
        ReceiveLists {
            sockets: HashMap::new(),
            close_requested: HashSet::new(),
            entries_at_prune: 0,
            entries: 0,
            budget: VERIFY_BURST,
            budget_at: Instant::now(),
        }
    }
}

impl ReceiveLists {
    /// Records a socket received under `key`.
    pub(crate) fn add(&mut self, key: &str, socket: FdIdentity) {
        let added = match self.sockets.get_mut(key) {
            Some(list) => list.insert(socket),
            None => {
                self.sockets.insert(key.into(), HashSet::from([socket]));
                true
            }
        };
        if !added {
            return;
        }
        self.entries += 1;
        // Amortised O(1) per socket received, whatever the budget: memory must not grow with
        // the number of sockets ever received.
        if self.entries >= 2 * self.entries_at_prune.max(32) {
            let keys: Vec<Box<str>> = self.sockets.keys().cloned().collect();
            for key in keys {
                self.verify(&key);
            }
            self.sockets.retain(|key, list| !list.is_empty() || self.close_requested.contains(key));
            self.entries_at_prune = self.entries;
        }
    }

    /// Drops the sockets of `key` that are known closed; returns the time it took.
    fn verify(&mut self, key: &str) -> Duration {
        let Some(list) = self.sockets.get_mut(key) else { return Duration::ZERO };
        let started = Instant::now();
        let before = list.len();
        list.retain(|socket| socket.liveness() != Liveness::Gone);
        self.entries -= before - list.len();
        started.elapsed()
    }

    /// Checks `key`'s sockets if the budget allows; otherwise the last check stands.
    fn verify_rationed(&mut self, key: &str) {
        let now = Instant::now();
        self.budget = (self.budget + (now - self.budget_at) / VERIFY_SHARE).min(VERIFY_BURST);
        self.budget_at = now;
        if self.budget.is_zero() {
            return;
        }
        let spent = self.verify(key);
        self.budget = self.budget.saturating_sub(spent);
    }

    /// How many sockets received under `key` are still open in this process.
    pub(crate) fn count(&mut self, key: &str) -> usize {
        self.verify_rationed(key);
        self.sockets.get(key).map_or(0, HashSet::len)
    }

    /// The sender will close its server: returns true if `key` has no open socket now (answer
    /// at once); otherwise remembers to answer when it reaches zero ([`Self::now_closed`]).
    pub(crate) fn request_close(&mut self, key: &str) -> bool {
        if self.count(key) == 0 {
            return true;
        }
        if !self.close_requested.contains(key) {
            self.close_requested.insert(key.into());
        }
        false
    }

    /// Whether any close request is waiting (the driver then checks periodically).
    pub(crate) fn has_close_requests(&self) -> bool {
        !self.close_requested.is_empty()
    }

    /// Keys with a close request whose sockets are now all closed; they are answered once.
    pub(crate) fn now_closed(&mut self) -> Vec<Box<str>> {
        let requested: Vec<Box<str>> = self.close_requested.iter().cloned().collect();
        let mut done = Vec::new();
        for key in requested {
            if self.count(&key) == 0 {
                self.close_requested.remove(&key);
                self.sockets.remove(&key);
                done.push(key);
            }
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
        let waiting = state.waiting.entry((kind, key.to_owned())).or_default();
        // Requests whose caller gave up (a cancelled get_connections) are forgotten here, so a
        // peer that never answers cannot make the list grow with every call.
        waiting.retain(|waiter| !waiter.is_closed());
        waiting.push_back(tx);
        Some(rx)
    }

    /// A reply arrived: it answers every request waiting for it, as in Node (each pending
    /// request there listens for the next matching reply). This is also what lets the peer send
    /// one reply for identical requests still pending on its side. A reply nobody waits for is
    /// ignored.
    pub(crate) fn resolve(&self, kind: ReplyKind, key: &str, value: usize) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(waiters) = state.waiting.remove(&(kind, key.to_owned())) {
            for waiter in waiters {
                let _ = waiter.send(value);
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
