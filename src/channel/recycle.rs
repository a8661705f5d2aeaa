//! The buffers of large frames, kept for the next large frames.
//!
//! # Why
//! A buffer of 32 MiB or more is, with glibc's allocator, a fresh `mmap` every time (its dynamic
//! mmap threshold stops growing at 32 MiB) and is returned to the system when freed, so every such
//! message had its pages faulted in (and zeroed) again, on both sides: about three times the cost
//! of copying it. A channel that sends or receives large messages back to back now reuses the
//! buffers of the last ones, whatever the allocator.
//!
//! # Bounds
//! Each direction of a channel keeps at most [`KEEP`] buffers, each of at least
//! [`RECYCLE_MIN`] bytes, together at most twice the channel's
//! [`ChannelConfig::max_frame_len`](super::ChannelConfig::max_frame_len) (128 MiB by default).
//! A sent frame is trimmed to its length first (the encoder reserves up to six times a string's
//! length); a received one has grown by doubling to at most `max_frame_len` rounded up to a power
//! of two (trimming it costs the 1 MiB messages a third of their rate, measured). They are dropped
//! after [`IDLE_DROP`] smaller frames in a row, and with the channel.
//!
//! Nothing here costs a small message more than one atomic load while no buffer is kept.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Smallest buffer worth keeping.
pub(crate) const RECYCLE_MIN: usize = 1024 * 1024;
/// Most buffers kept per direction: while message N is still queued (or held by the program),
/// N+1 is built in the buffer of N-1, and N's comes back for N+2.
const KEEP: usize = 2;
/// The most bytes kept per direction for a channel whose frames are at most `max_frame_len`:
/// two buffers of that size.
pub(crate) fn limit(max_frame_len: usize) -> usize {
    KEEP.saturating_mul(max_frame_len)
}

/// Small frames in a row after which the kept buffers are dropped.
const IDLE_DROP: usize = 64;

#[derive(Debug)]
pub(crate) struct Recycler {
    /// How many buffers `spares` holds: read without the lock on every frame.
    kept: AtomicUsize,
    /// Most bytes (capacity) kept in all.
    limit: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    spares: Vec<Vec<u8>>,
    /// Small frames since a spare was last used.
    idle: usize,
}

impl Recycler {
    /// Keeps at most `limit` bytes of buffers.
    pub(crate) fn new(limit: usize) -> Recycler {
        Recycler { kept: AtomicUsize::new(0), limit, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `buffer` (emptied) for a later large frame, if it is large.
    pub(crate) fn give(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() < RECYCLE_MIN || buffer.capacity() > self.limit {
            return;
        }
        buffer.clear();
        let mut inner = self.lock();
        inner.spares.push(buffer);
        // Over the count or the bytes: the smallest go first.
        inner.spares.sort_unstable_by_key(|b| std::cmp::Reverse(b.capacity()));
        while inner.spares.len() > KEEP || inner.spares.iter().map(Vec::capacity).sum::<usize>() > self.limit {
            inner.spares.pop();
        }
        self.kept.store(inner.spares.len(), Ordering::Relaxed);
    }

    /// A kept buffer (empty), the largest, if any.
    pub(crate) fn take(&self) -> Option<Vec<u8>> {
        if self.kept.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut inner = self.lock();
        let largest = (0..inner.spares.len()).max_by_key(|&i| inner.spares[i].capacity())?;
        let buffer = inner.spares.swap_remove(largest);
        self.kept.store(inner.spares.len(), Ordering::Relaxed);
        Some(buffer)
    }

    /// A large frame went by: the kept buffers are worth keeping.
    pub(crate) fn large_frame(&self) {
        if self.kept.load(Ordering::Relaxed) != 0 {
            self.lock().idle = 0;
        }
    }

    /// A frame too small to need a kept buffer went by: after [`IDLE_DROP`] in a row, the large
    /// messages are over and the buffers go.
    pub(crate) fn small_frame(&self) {
        if self.kept.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut inner = self.lock();
        inner.idle += 1;
        if inner.idle >= IDLE_DROP {
            inner.spares = Vec::new();
            inner.idle = 0;
            self.kept.store(0, Ordering::Relaxed);
        }
    }

    /// Bytes held (for tests and accounting).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.lock().spares.iter().map(Vec::capacity).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_largest_buffers_within_the_limit_and_drops_them_when_large_frames_stop() {
        let r = Recycler::new(6 << 20);
        r.give(Vec::with_capacity(1000)); // small: not kept
        assert_eq!(r.held(), 0);
        for mib in [1, 2, 3] {
            r.give(Vec::with_capacity(mib << 20));
        }
        assert_eq!(r.held(), (3 << 20) + (2 << 20), "the two largest");
        r.give(Vec::with_capacity(4 << 20));
        assert_eq!(r.held(), 4 << 20, "within the limit: 4 + 3 MiB would be over 6");
        r.give(Vec::with_capacity(7 << 20));
        assert_eq!(r.held(), 4 << 20, "larger than the limit: not kept");
        r.large_frame();
        for _ in 0..IDLE_DROP - 1 {
            r.small_frame();
        }
        assert_eq!(r.held(), 4 << 20);
        r.small_frame();
        assert_eq!(r.held(), 0);
        assert!(r.take().is_none());
    }
}
