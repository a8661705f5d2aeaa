//! Accepting through the errors that pass: [`AcceptRetry`].

use std::io;
use std::time::{Duration, Instant};

/// First pause after an accept failed for want of descriptors or memory.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// Longest pause between attempts while it keeps failing.
const LONGEST_PAUSE: Duration = Duration::from_millis(200);

/// What to do after `accept` failed.
///
/// An accept loop that ends on the first error stops serving for good when the process runs out
/// of descriptors for a moment (`EMFILE`), which is exactly when it is busiest. With this, a
/// loop waits instead: connections stay in the listen backlog until descriptors are free again,
/// then are served; none is refused or dropped. Errors that concern one connection only (it was
/// reset before it could be accepted) are skipped at once. Only the first failure of a run is
/// logged (`tracing` warning), and the recovery once.
///
/// [`Server::accept`](super::Server::accept) does this itself; use it directly in a loop over a
/// tokio or std listener:
///
/// ```no_run
/// # async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
/// let mut retry = handoff::server::AcceptRetry::new();
/// loop {
///     match listener.accept().await {
///         Ok((socket, _)) => {
///             retry.accepted();
///             // ... serve `socket`
///         }
///         Err(error) => retry.wait(error).await?, // Err only for a listener that is broken
///     }
/// }
/// # }
/// ```
#[derive(Debug, Default)]
pub struct AcceptRetry {
    /// When the current run of failures started, how many there were, and the next pause.
    failing: Option<(Instant, u64, Duration)>,
}

impl AcceptRetry {
    /// No failure yet.
    pub fn new() -> AcceptRetry {
        AcceptRetry::default()
    }

    /// `accept` failed with `error`: returns once it is worth calling `accept` again — at once
    /// for an error about one connection, after a pause (5 ms, doubling up to 200 ms) for
    /// descriptor or memory exhaustion — or gives the error back if the listener itself is
    /// unusable.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only skips the pause.
    pub async fn wait(&mut self, error: io::Error) -> io::Result<()> {
        match classify(&error) {
            Failure::Connection => Ok(()),
            Failure::Listener => Err(error),
            Failure::Resources => {
                let (_, count, pause) = self.failing.get_or_insert_with(|| {
                    tracing::warn!(
                        %error,
                        "accept failed: out of descriptors or memory; new connections wait in the \
                         listen backlog and are accepted once some are free"
                    );
                    (Instant::now(), 0, FIRST_PAUSE)
                });
                *count += 1;
                let sleep = *pause;
                *pause = (*pause * 2).min(LONGEST_PAUSE);
                tokio::time::sleep(sleep).await;
                Ok(())
            }
        }
    }

    /// `accept` succeeded: ends a run of failures (logged once).
    pub fn accepted(&mut self) {
        if let Some((since, count, _)) = self.failing.take() {
            tracing::info!(
                waited = ?since.elapsed(),
                failures = count,
                "accepting again after running out of descriptors or memory"
            );
        }
    }
}

enum Failure {
    /// About one connection (gone before it was accepted): skip it.
    Connection,
    /// The process is out of descriptors or memory: wait for some to free up.
    Resources,
    /// The listener itself is unusable.
    Listener,
}

fn classify(error: &io::Error) -> Failure {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Failure::Resources,
        // accept(2): errors of the connection being accepted, and network errors that Linux
        // passes on from it, "should be treated like EAGAIN by retrying".
        Some(
            libc::ECONNABORTED
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::EINTR
            | libc::EAGAIN,
        ) => Failure::Connection,
        _ => match error.kind() {
            io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock => Failure::Connection,
            _ => Failure::Listener,
        },
    }
}
