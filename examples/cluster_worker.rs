//! A cluster worker: a TCP server that writes its pid (`pid=N\n`) on each connection and closes
//! it.
//!
//! Started alone it binds `HOST:PORT` itself (defaults `127.0.0.1` and `8080`); started by a
//! cluster primary — `handoff run -- cluster_worker`, or Node's own `cluster` with
//! `cluster.setupPrimary({ exec })` and `execPath` pointed at this binary — it serves through the
//! primary, round-robin or shared, whichever the primary uses. Arguments are ignored (Node's
//! primary passes its `exec` setting as the first). It exits 0 once the primary asks it to stop
//! (or goes away).

use tokio::io::AsyncWriteExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let mut listener = handoff::cluster::listen(format!("{host}:{port}")).await?;
    eprintln!(
        "cluster_worker {}: serving {} ({})",
        std::process::id(),
        listener.local_addr(),
        if listener.is_clustered() { "through the primary" } else { "alone" }
    );
    let reply = format!("pid={}\n", std::process::id());
    // Each connection is answered before the next is taken: a dozen bytes never wait for the
    // socket, and this way at most one connection is in progress at any moment (the one a
    // SIGKILL could catch mid-answer).
    while let Ok((mut socket, _peer)) = listener.accept().await {
        let _ = socket.write_all(reply.as_bytes()).await;
        let _ = socket.shutdown().await;
    }
    Ok(())
}
