//! `handoff demo`: the seed's parent and child.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Arguments of `handoff demo`.
#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// Port to listen on, on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 1337)]
    port: u16,
    /// Connect this many times, print each answer, then exit (instead of serving forever).
    #[arg(long)]
    requests: Option<usize>,
    /// The child to fork, e.g. `-- node child.js` (default: this binary's `demo-child`).
    #[arg(last = true)]
    child: Vec<String>,
}

/// The parent: listen, fork the child, hand it every connection.
pub(crate) async fn parent(args: DemoArgs) -> anyhow::Result<()> {
    let server = handoff::server::Server::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{}", args.port))?;
    let mut command = match args.child.split_first() {
        Some((program, rest)) => {
            let mut command = handoff::Command::new(program);
            command.args(rest);
            command
        }
        None => {
            let mut command = handoff::Command::new(std::env::current_exe()?);
            command.arg("demo-child");
            command
        }
    };
    let mut child = command.kill_on_drop(true).spawn().context("cannot start the child")?;
    let addr = server.local_addr().expect("a TCP server");
    println!("listening on {addr}");
    let sender = child.sender().clone();
    let serve = async move {
        loop {
            // Waits out descriptor exhaustion instead of failing (connections queue meanwhile).
            let connection = server.accept().await?;
            // Queue it and accept on; the channel delivers handles in order, one ACK at a time,
            // and makes this wait while `send_handles` of them are unacknowledged.
            match sender.queue_handle(&"socket", connection).await {
                Ok(delivery) => {
                    tokio::spawn(async move {
                        if let Err(e) = delivery.await {
                            eprintln!("demo: could not hand a connection to the child: {e}");
                        }
                    });
                }
                // The child is gone; the caller reports its exit.
                Err(e) => eprintln!("demo: could not hand a connection to the child: {e}"),
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    match args.requests {
        None => {
            println!("try: curl --http0.9 {addr}");
            tokio::select! {
                served = serve => served,
                status = child.wait() => anyhow::bail!("the child exited: {}", status?),
            }
        }
        Some(n) => {
            let serving = tokio::spawn(serve);
            for i in 1..=n {
                println!("{i}: {}", request(addr).await?);
            }
            serving.abort();
            child.disconnect();
            let status = child.wait().await?;
            anyhow::ensure!(status.success(), "the child exited with {status}");
            Ok(())
        }
    }
}

/// One connection: read the answer until the server closes.
async fn request(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// The child: answer `Child handled it.` on every socket handed over with the message `"socket"`;
/// exit when the parent closes the channel.
pub(crate) async fn child() -> anyhow::Result<()> {
    let mut parent = handoff::process::parent_channel()?
        .context("demo-child must be started by `handoff demo` (no IPC channel)")?;
    let mut answering = tokio::task::JoinSet::new();
    while let Some(received) = parent.recv().await {
        // Finished answers are reaped as we go, so the set holds only those in progress.
        while answering.try_join_next().is_some() {}
        let mut message = match received {
            Ok(message) => message,
            Err(e) => {
                eprintln!("demo-child: {e}");
                continue;
            }
        };
        let is_socket = message.deserialize::<String>().is_ok_and(|m| m == "socket");
        let Some(handle) = message.take_handle().filter(|_| is_socket) else { continue };
        match tokio::net::TcpStream::try_from(handle) {
            Ok(mut socket) => {
                answering.spawn(async move {
                    let _ = socket.write_all(b"Child handled it.").await;
                    let _ = socket.shutdown().await;
                });
            }
            Err(e) => eprintln!("demo-child: skipping a handle: {e}"),
        }
    }
    while answering.join_next().await.is_some() {}
    Ok(())
}
