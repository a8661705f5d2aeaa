//! Read-only observers of the internal messages a channel receives
//! ([`Sender::internal_messages`](super::Sender::internal_messages)).
//!
//! Each observer has its own queue, bounded by [`OBSERVER_BUFFER`] bytes and
//! [`OBSERVER_MESSAGES`] messages: past either, the oldest messages are dropped and the observer
//! is told how many it missed (like a lagging `tokio::sync::broadcast` receiver). A message
//! larger than the whole byte budget is never kept. The text is shared between observers, so
//! publishing costs one allocation whatever their number.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::Notify;

use super::InternalMessage;

/// Most bytes of internal messages one observer holds unread (1 MiB).
pub const OBSERVER_BUFFER: usize = 1024 * 1024;
/// Most internal messages one observer holds unread.
pub const OBSERVER_MESSAGES: usize = 256;

#[derive(Debug, Default)]
struct QueueState {
    messages: VecDeque<InternalMessage>,
    bytes: usize,
    /// Messages dropped since the observer last heard about it.
    missed: u64,
    closed: bool,
}

#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Notify,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The publishing side, held by the channel.
#[derive(Debug, Default)]
pub(crate) struct Observers {
    queues: Mutex<Vec<Weak<Queue>>>,
}

impl Observers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Queue>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new observer of the messages published from now on.
    pub(crate) fn subscribe(&self, closed: bool) -> InternalMessages {
        let queue = Arc::new(Queue::default());
        queue.lock().closed = closed;
        let mut queues = self.lock();
        queues.retain(|q| q.strong_count() > 0);
        queues.push(Arc::downgrade(&queue));
        InternalMessages { queue }
    }

    /// Whether anyone is observing (publishing is skipped otherwise).
    pub(crate) fn any(&self) -> bool {
        self.lock().iter().any(|q| q.strong_count() > 0)
    }

    /// Hands `message` to every observer, dropping the oldest where it does not fit.
    pub(crate) fn publish(&self, message: InternalMessage) {
        let cost = message.json.len();
        let mut queues = self.lock();
        queues.retain(|weak| {
            let Some(queue) = weak.upgrade() else { return false };
            {
                let mut state = queue.lock();
                if cost > OBSERVER_BUFFER {
                    state.missed += 1;
                } else {
                    while !state.messages.is_empty()
                        && (state.bytes + cost > OBSERVER_BUFFER
                            || state.messages.len() >= OBSERVER_MESSAGES)
                    {
                        let dropped = state.messages.pop_front().expect("not empty");
                        state.bytes -= dropped.json.len();
                        state.missed += 1;
                    }
                    state.bytes += cost;
                    state.messages.push_back(message.clone());
                }
            }
            queue.ready.notify_one();
            true
        });
    }

    /// The channel closed: observers end once they have taken what is queued.
    pub(crate) fn close(&self) {
        for queue in self.lock().drain(..).filter_map(|q| q.upgrade()) {
            queue.lock().closed = true;
            queue.ready.notify_one();
        }
    }
}

/// The internal messages a channel receives, for an observer: see
/// [`Sender::internal_messages`](super::Sender::internal_messages).
#[derive(Debug)]
pub struct InternalMessages {
    queue: Arc<Queue>,
}

impl InternalMessages {
    /// The next internal message; `Err(Lagged(n))` once after `n` were dropped because this
    /// observer fell behind; `Err(Closed)` when the channel has closed and everything was taken.
    ///
    /// # Cancel safety
    /// Cancel safe: no message is lost if the future is dropped.
    pub async fn recv(&mut self) -> Result<InternalMessage, RecvError> {
        let queue = self.queue.clone();
        loop {
            let notified = queue.ready.notified();
            match self.try_recv() {
                Ok(message) => return Ok(message),
                Err(TryRecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => return Err(RecvError::Closed),
                Err(TryRecvError::Empty) => notified.await,
            }
        }
    }

    /// Like [`recv`](Self::recv) without waiting: `Err(Empty)` when nothing is queued.
    pub fn try_recv(&mut self) -> Result<InternalMessage, TryRecvError> {
        let mut state = self.queue.lock();
        if state.missed > 0 {
            let missed = std::mem::take(&mut state.missed);
            return Err(TryRecvError::Lagged(missed));
        }
        match state.messages.pop_front() {
            Some(message) => {
                state.bytes -= message.json.len();
                Ok(message)
            }
            None if state.closed => Err(TryRecvError::Closed),
            None => Err(TryRecvError::Empty),
        }
    }
}
