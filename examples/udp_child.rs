//! A child that answers on every bound UDP socket (`dgram.Socket`) it is handed: each datagram goes
//! back to its sender prefixed with `<pid>:`.
//!
//! Works under a handoff parent or a Node parent (`child.send('udp', socket)`). Exits 0 when the
//! parent closes the channel.

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Some(mut parent) = handoff::process::parent_channel()? else {
        eprintln!("udp_child: no IPC channel; start me from a handoff or Node parent");
        std::process::exit(2);
    };
    let prefix = format!("{}:", std::process::id());
    let mut sockets = tokio::task::JoinSet::new();
    while let Some(received) = parent.recv().await {
        let handle = match received {
            Ok(mut message) => message.take_handle(),
            Err(e) => {
                eprintln!("udp_child: {e}");
                continue;
            }
        };
        let Some(handle) = handle else { continue };
        let socket: tokio::net::UdpSocket = match handle.try_into() {
            Ok(socket) => socket,
            Err(e) => {
                eprintln!("udp_child: {e}");
                continue;
            }
        };
        let prefix = prefix.clone();
        sockets.spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let mut reply = prefix.clone().into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, from).await;
            }
        });
    }
    sockets.abort_all();
    Ok(())
}
