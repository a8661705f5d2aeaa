//! The seed's `child.js` in Rust: answers every socket it is handed with `Child handled it.`.
//!
//! Start it from a handoff parent (`cargo run --example parent`) or from Node
//! (`child_process.fork('child', [], {execPath: 'target/debug/examples/child'})`, or
//! `spawn(path, [], {stdio: [0, 1, 2, 'ipc']})`). Stray arguments are ignored (Node's `fork`
//! passes the script path). A `net.Socket` may be TCP or a Unix socket: both are answered;
//! anything else is reported and skipped. Exits 0 when the parent closes the channel.

use tokio::io::{AsyncWrite, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Some(mut parent) = handoff::process::parent_channel()? else {
        eprintln!("child: no IPC channel; start me from a handoff or Node parent");
        std::process::exit(2);
    };
    let mut answering = tokio::task::JoinSet::new();
    while let Some(received) = parent.recv().await {
        // Finished answers are reaped as we go, so the set holds only those in progress.
        while answering.try_join_next().is_some() {}
        let mut message = match received {
            Ok(message) => message,
            Err(e) => {
                eprintln!("child: {e}");
                continue;
            }
        };
        let is_socket = message.deserialize::<String>().is_ok_and(|m| m == "socket");
        let Some(handle) = message.take_handle().filter(|_| is_socket) else { continue };
        match tokio::net::TcpStream::try_from(handle) {
            Ok(socket) => {
                answering.spawn(answer(socket));
            }
            Err(not_tcp) => match not_tcp.into_handle().map(<tokio::net::UnixStream>::try_from) {
                Some(Ok(socket)) => {
                    answering.spawn(answer(socket));
                }
                Some(Err(e)) => eprintln!("child: skipping a handle: {e}"),
                None => eprintln!("child: skipping a handle that could not be set up"),
            },
        }
    }
    while answering.join_next().await.is_some() {}
    Ok(())
}

/// socket.end('Child handled it.'): write, then close our side.
async fn answer(mut socket: impl AsyncWrite + Unpin) {
    let _ = socket.write_all(b"Child handled it.").await;
    let _ = socket.shutdown().await;
}
