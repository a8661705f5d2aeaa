//! The seed's `child.js` in Rust: answers every socket it is handed with `Child handled it.`.
//!
//! Start it from a handoff parent (`cargo run --example parent`) or from Node
//! (`child_process.fork('child', [], {execPath: 'target/debug/examples/child'})`, or
//! `spawn(path, [], {stdio: [0, 1, 2, 'ipc']})`). Stray arguments are ignored (Node's `fork`
//! passes the script path). Exits 0 when the parent closes the channel.

use tokio::io::AsyncWriteExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Some(mut parent) = handoff::process::parent_channel()? else {
        eprintln!("child: no IPC channel; start me from a handoff or Node parent");
        std::process::exit(2);
    };
    let mut answering = tokio::task::JoinSet::new();
    while let Some(received) = parent.recv().await {
        let mut message = match received {
            Ok(message) => message,
            Err(e) => {
                eprintln!("child: {e}");
                continue;
            }
        };
        let is_socket = message.deserialize::<String>().is_ok_and(|m| m == "socket");
        if let (true, Some(handle)) = (is_socket, message.take_handle()) {
            let mut socket: tokio::net::TcpStream = handle.into()?;
            answering.spawn(async move {
                // socket.end('Child handled it.'): write, then close our side.
                let _ = socket.write_all(b"Child handled it.").await;
                let _ = socket.shutdown().await;
            });
        }
    }
    while answering.join_next().await.is_some() {}
    Ok(())
}
