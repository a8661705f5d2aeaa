//! Connections still open per worker, for round-robin: the primary remembers which sockets it
//! handed to which worker and, when asked, asks the kernel which of those are still held by some
//! process ([`sys::sock_diag`](crate::sys::sock_diag)) — no scan of any process's descriptors,
//! and the same for an unchanged Node worker as for a Rust one.
//!
//! # Bounds
//! One entry (40 bytes) per handed connection not yet known to be closed. Closed entries
//! are found and dropped by every query, and by a prune that runs, off the supervisor's task,
//! each time the table has doubled since the last one (at least [`MIN_PRUNE`] entries): the table
//! holds at most about twice the connections open plus [`MIN_PRUNE`], and the work is amortized
//! O(1) per connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::sys::sock_diag::{SockDiag, SocketKey};

/// The table is pruned when it reaches this size, or twice its size after the last prune.
pub(crate) const MIN_PRUNE: usize = 32_768;

#[derive(Debug)]
struct Table {
    /// Handed connections in the order they were handed; a later entry with the same key (a new
    /// connection from the same client port) supersedes an earlier one. A `Vec`, not a map:
    /// handing a connection costs one push, and the sweep does the rest.
    entries: Vec<(SocketKey, u32)>,
    prune_at: usize,
    pruning: bool,
    /// A sweep holds the entries it asks about.
    sweeping: bool,
    /// Workers forgotten while a sweep held their entries.
    forgotten: Vec<u32>,
    /// The kernel refused the diagnostics socket: counts are unknown.
    unavailable: bool,
}

/// Which worker holds which handed connection. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct OpenConnections {
    table: Arc<Mutex<Table>>,
    /// One sweep at a time (a second would count without the entries the first holds).
    sweep: Arc<Mutex<()>>,
}

impl OpenConnections {
    pub(crate) fn new() -> OpenConnections {
        OpenConnections {
            table: Arc::new(Mutex::new(Table {
                entries: Vec::new(),
                prune_at: MIN_PRUNE,
                pruning: false,
                sweeping: false,
                forgotten: Vec::new(),
                unavailable: false,
            })),
            sweep: Arc::new(Mutex::new(())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every operation leaves the table consistent (a push, a retain, a swap), so a poisoned
        // lock is still usable.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `worker` accepted the connection `key`.
    pub(crate) fn handed(&self, worker: u32, key: SocketKey) {
        let mut table = self.lock();
        if table.unavailable {
            return;
        }
        table.entries.push((key, worker));
        if table.entries.len() >= table.prune_at && !table.pruning {
            table.pruning = true;
            let this = self.clone();
            tokio::task::spawn_blocking(move || {
                let _ = this.sweep();
            });
        }
    }

    /// `worker` exited: what it held is no longer its.
    pub(crate) fn forget_worker(&self, worker: u32) {
        let mut table = self.lock();
        table.entries.retain(|(_, w)| *w != worker);
        if table.sweeping {
            table.forgotten.push(worker);
        }
    }

    /// Open connections per worker, or `None` when the kernel cannot tell.
    ///
    /// # Cancel safety
    /// Cancel safe: the query runs to its end on a blocking thread either way.
    pub(crate) async fn count(&self) -> Option<HashMap<u32, u64>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sweep()).await.ok().flatten()
    }

    /// Asks the kernel about every entry, drops the closed and superseded ones, and counts the
    /// rest per worker. Entries handed meanwhile are kept as they are, for the next sweep.
    fn sweep(&self) -> Option<HashMap<u32, u64>> {
        let _one_at_a_time = self.sweep.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let snapshot: Vec<(SocketKey, u32)> = {
            let mut table = self.lock();
            if table.unavailable {
                table.pruning = false;
                return None;
            }
            table.sweeping = true;
            std::mem::take(&mut table.entries)
        };
        // The latest entry per key.
        let mut latest: HashMap<SocketKey, u32> = HashMap::with_capacity(snapshot.len());
        for (key, worker) in snapshot {
            latest.insert(key, worker);
        }
        let latest: Vec<(SocketKey, u32)> = latest.into_iter().collect();
        let keys: Vec<SocketKey> = latest.iter().map(|(k, _)| *k).collect();
        let open = SockDiag::new().and_then(|mut diag| diag.still_open(&keys));
        let mut table = self.lock();
        table.pruning = false;
        table.sweeping = false;
        let forgotten = std::mem::take(&mut table.forgotten);
        let open = match open {
            Ok(open) => open,
            Err(error) => {
                tracing::warn!(%error, "socket diagnostics unavailable: open connection counts are unknown");
                table.unavailable = true;
                table.entries = Vec::new();
                return None;
            }
        };
        let mut kept: Vec<(SocketKey, u32)> = latest
            .into_iter()
            .zip(open)
            .filter(|((_, worker), open)| *open && !forgotten.contains(worker))
            .map(|(entry, _)| entry)
            .collect();
        // Handed while we asked: newer, so after ours (they supersede ours on a key they share).
        kept.append(&mut table.entries);
        table.entries = kept;
        // Counted from the final table, so a connection handed meanwhile with the same key as one
        // of ours counts once.
        let mut latest: HashMap<SocketKey, u32> = HashMap::with_capacity(table.entries.len());
        for (key, worker) in &table.entries {
            latest.insert(*key, *worker);
        }
        let mut counts = HashMap::new();
        for worker in latest.values() {
            *counts.entry(*worker).or_insert(0) += 1;
        }
        table.prune_at = (table.entries.len() * 2).max(MIN_PRUNE);
        Some(counts)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(listener: &std::net::TcpListener) -> (std::net::TcpStream, std::net::TcpStream, SocketKey) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let key = SocketKey::Tcp { local: server.local_addr().unwrap(), peer };
        (client, server, key)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_follow_closes_and_the_table_is_pruned_as_it_doubles() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = OpenConnections::new();
        let mut kept = Vec::new();
        for i in 0..10 {
            let (client, server, key) = connection(&listener);
            open.handed(1 + i % 2, key);
            if i < 4 {
                kept.push((client, server));
            }
        }
        // 0 and 2 are worker 1's, 1 and 3 worker 2's.
        assert_eq!(open.count().await, Some(HashMap::from([(1, 2), (2, 2)])));
        assert_eq!(open.len(), 4, "the query dropped the closed entries");
        open.forget_worker(2);
        assert_eq!(open.count().await, Some(HashMap::from([(1, 2)])));

        // Closed connections past the prune size are dropped without any query. (Addresses of
        // connections that never were: real ones closed at once could reuse each other's.)
        let local = listener.local_addr().unwrap();
        for port in 0..MIN_PRUNE as u16 {
            open.handed(3, SocketKey::Tcp { local, peer: std::net::SocketAddr::from(([127, 0, 0, 1], 10_000 + port)) });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while open.len() > 100 {
            assert!(std::time::Instant::now() < deadline, "no prune: {} entries", open.len());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        drop(kept);
    }
}
