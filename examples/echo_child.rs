//! A child that serves every socket it is handed as an echo server: it writes back what it reads
//! until the client closes.
//!
//! Works under a handoff parent (`cargo run --example get_connections`) and under Node's
//! `child_process.fork` / `spawn(..., {stdio: [0, 1, 2, 'ipc']})`. When the parent closes the
//! channel it finishes the sessions in progress, then exits 0.

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Some(mut parent) = handoff::process::parent_channel()? else {
        eprintln!("echo_child: no IPC channel; start me from a handoff or Node parent");
        std::process::exit(2);
    };
    let mut sessions = tokio::task::JoinSet::new();
    while let Some(received) = parent.recv().await {
        // Finished sessions are reaped as we go, so the set holds only those in progress.
        while sessions.try_join_next().is_some() {}
        let handle = match received {
            Ok(mut message) => message.take_handle(),
            Err(e) => {
                eprintln!("echo_child: {e}");
                continue;
            }
        };
        let Some(handle) = handle else { continue };
        match handle.kind() {
            handoff::handle::FdKind::UnixStream => match tokio::net::UnixStream::try_from(handle) {
                Ok(socket) => {
                    sessions.spawn(echo(socket));
                }
                Err(e) => eprintln!("echo_child: {e}"),
            },
            _ => match tokio::net::TcpStream::try_from(handle) {
                Ok(socket) => {
                    sessions.spawn(echo(socket));
                }
                Err(e) => eprintln!("echo_child: {e}"),
            },
        }
    }
    while sessions.join_next().await.is_some() {}
    Ok(())
}

/// Copies what the client sends back to it; returns when the client closes.
async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(socket: S) {
    let (mut reader, mut writer) = tokio::io::split(socket);
    let _ = tokio::io::copy(&mut reader, &mut writer).await;
}
