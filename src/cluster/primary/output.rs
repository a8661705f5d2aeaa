//! Workers' output, passed through line by line with a `[worker N] ` prefix
//! ([`WorkerOutput::Prefixed`](super::WorkerOutput::Prefixed)).
//!
//! One writer task per stream owns our stdout (or stderr) and writes with tokio's non-blocking
//! handles, so a terminal or pipe that stops reading never blocks the primary's thread (the
//! supervisor, accepting, signals and the control socket go on). Lines reach the writer through
//! a bounded queue ([`QUEUED_LINES`]); when it is full, the workers' pipes are not read until
//! there is room, so a stuck output slows the workers that print, as writing to it directly
//! would, and nothing grows.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Longest line passed on whole; a longer one is cut into pieces of this size.
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// Lines waiting for a writer, per stream (so at most about 4 MiB).
pub(crate) const QUEUED_LINES: usize = 64;

/// The queues of the two writer tasks.
#[derive(Debug)]
pub(crate) struct Sinks {
    pub(crate) stdout: mpsc::Sender<Vec<u8>>,
    pub(crate) stderr: mpsc::Sender<Vec<u8>>,
}

impl Sinks {
    /// Starts the writers (on the current runtime).
    pub(crate) fn start() -> Sinks {
        Sinks { stdout: writer(tokio::io::stdout()), stderr: writer(tokio::io::stderr()) }
    }
}

fn writer(mut out: impl AsyncWrite + Unpin + Send + 'static) -> mpsc::Sender<Vec<u8>> {
    let (lines, mut queue) = mpsc::channel::<Vec<u8>>(QUEUED_LINES);
    tokio::spawn(async move {
        while let Some(line) = queue.recv().await {
            if out.write_all(&line).await.is_err() {
                // Our output is gone (closed pipe): drain quietly so workers never block on it.
                while queue.recv().await.is_some() {}
                return;
            }
            if queue.is_empty() {
                let _ = out.flush().await;
            }
        }
    });
    lines
}

/// Copies worker `id`'s output from `from` to `to`, line by line, prefixed with its id.
pub(crate) async fn forward(id: u32, mut from: impl AsyncRead + Unpin, to: mpsc::Sender<Vec<u8>>) {
    let prefix = format!("[worker {id}] ");
    let line = |bytes: &[u8]| {
        let mut out = Vec::with_capacity(prefix.len() + bytes.len() + 1);
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(bytes);
        out.push(b'\n');
        out
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let room = MAX_LINE - pending.len();
            match memchr::memchr(b'\n', &rest[..rest.len().min(room)]) {
                Some(end) => {
                    pending.extend_from_slice(&rest[..end]);
                    rest = &rest[end + 1..];
                }
                None if rest.len() >= room => {
                    pending.extend_from_slice(&rest[..room]);
                    rest = &rest[room..];
                }
                None => {
                    pending.extend_from_slice(rest);
                    break;
                }
            }
            if to.send(line(&pending)).await.is_err() {
                return;
            }
            pending.clear();
        }
    }
    if !pending.is_empty() {
        let _ = to.send(line(&pending)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(input: Vec<u8>) -> Vec<Vec<u8>> {
        let (to, mut from) = mpsc::channel(1024);
        forward(7, &input[..], to).await;
        let mut lines = Vec::new();
        while let Ok(line) = from.try_recv() {
            lines.push(line);
        }
        lines
    }

    #[tokio::test]
    async fn lines_are_prefixed_and_long_ones_cut() {
        let lines = lines_of(b"one\ntwo\nno newline".to_vec()).await;
        assert_eq!(lines, vec![b"[worker 7] one\n".to_vec(), b"[worker 7] two\n".to_vec(), b"[worker 7] no newline\n".to_vec()]);

        let mut long = vec![b'x'; MAX_LINE * 2 + 10];
        long.push(b'\n');
        let lines = lines_of(long).await;
        let lengths: Vec<usize> = lines.iter().map(|l| l.len() - "[worker 7] \n".len()).collect();
        assert_eq!(lengths, vec![MAX_LINE, MAX_LINE, 10]);
    }

    #[tokio::test]
    async fn a_stuck_output_holds_only_the_workers_pipe() {
        // Nobody takes the lines: the forwarder fills the queue and then waits (it does not read
        // more of the worker's pipe), without blocking the runtime (this test goes on).
        let (to, mut queue) = mpsc::channel(QUEUED_LINES);
        let (mut worker, pipe) = tokio::io::duplex(1 << 20);
        let forwarding = tokio::spawn(forward(1, pipe, to));
        let mut chunk_line = vec![b'y'; 1000];
        chunk_line.push(b'\n');
        for _ in 0..QUEUED_LINES + 10 {
            worker.write_all(&chunk_line).await.unwrap();
        }
        drop(worker);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!forwarding.is_finished(), "the forwarder waits for room");
        assert_eq!(queue.len(), QUEUED_LINES);
        // Once the output takes lines again, everything arrives.
        let mut received = 0;
        while queue.recv().await.is_some() {
            received += 1;
        }
        assert_eq!(received, QUEUED_LINES + 10);
        forwarding.await.unwrap();
    }
}
