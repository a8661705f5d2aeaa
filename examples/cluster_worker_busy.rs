//! A slow cluster worker: it serves one connection at a time, taking `SERVE_MS` milliseconds
//! (default 1000) before it writes its pid (`pid=N\n`), and its accept loop also ticks a timer
//! (`tokio::select!` over `accept()` and a 1 ms interval), so `accept()` futures are dropped all
//! the time — a common shape for a worker that also does periodic work.
//!
//! The cluster tests use it to show that a busy worker is not mistaken for a wedged one and that
//! a dropped `accept()` loses no connection. Run it like `cluster_worker`:
//! `handoff run -- target/debug/examples/cluster_worker_busy`.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let serve = Duration::from_millis(std::env::var("SERVE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000));
    let mut listener = handoff::cluster::listen(format!("127.0.0.1:{port}")).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut socket, _)) = accepted else { break };
                tokio::time::sleep(serve).await;
                let _ = socket.write_all(format!("pid={}\n", std::process::id()).as_bytes()).await;
                let _ = socket.shutdown().await;
            }
            _ = tick.tick() => ticks += 1,
        }
    }
    eprintln!("cluster_worker_busy {}: stopped after {ticks} ticks", std::process::id());
    Ok(())
}
