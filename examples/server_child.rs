//! A child that serves on every listening TCP server (`net.Server`) it is handed: each connection
//! it accepts gets `served by <pid>` and is closed. The parent may keep accepting on the same
//! server — both processes serve.
//!
//! Works under a handoff parent or a Node parent (`child.send('server', server)`). Exits 0 when the
//! parent closes the channel.

use tokio::io::AsyncWriteExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Some(mut parent) = handoff::process::parent_channel()? else {
        eprintln!("server_child: no IPC channel; start me from a handoff or Node parent");
        std::process::exit(2);
    };
    let reply = format!("served by {}", std::process::id());
    let mut servers = tokio::task::JoinSet::new();
    while let Some(received) = parent.recv().await {
        let handle = match received {
            Ok(mut message) => message.take_handle(),
            Err(e) => {
                eprintln!("server_child: {e}");
                continue;
            }
        };
        let Some(handle) = handle else { continue };
        let listener: tokio::net::TcpListener = match handle.try_into() {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("server_child: {e}");
                continue;
            }
        };
        let reply = reply.clone();
        servers.spawn(async move {
            let mut retry = handoff::server::AcceptRetry::new();
            loop {
                let mut socket = match listener.accept().await {
                    Ok((socket, _)) => {
                        retry.accepted();
                        socket
                    }
                    Err(error) => match retry.wait(error).await {
                        Ok(()) => continue,
                        Err(error) => {
                            eprintln!("server_child: the listener failed: {error}");
                            return;
                        }
                    },
                };
                let reply = reply.clone();
                tokio::spawn(async move {
                    let _ = socket.write_all(reply.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
    }
    // The parent closed the channel: stop serving and exit.
    servers.abort_all();
    Ok(())
}
