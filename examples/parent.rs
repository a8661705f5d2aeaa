//! The seed's `parent.js` in Rust: listens on 127.0.0.1:P and hands every connection to a child.
//!
//! ```text
//! parent [--port P] [-- CHILD_COMMAND ARGS...]
//! ```
//! The default port is 1337 (0 picks a free one); the default child is the `child` example next
//! to this binary. Any command works, e.g. `-- node child.js`. Prints `listening on ADDR` once
//! ready, then `curl 127.0.0.1:P` prints `Child handled it.`. Exits when the child exits.
//!
//! As the seed does (`server.on('connection')`), connections come from a
//! [`Server`](handoff::server::Server), so each envelope carries the server's key and the child's
//! `getConnections()` counts them. While the process is out of descriptors, accepting waits and
//! connections queue in the backlog; while the child is slow to acknowledge, at most
//! `send_handles` connections wait in the channel and the rest in the backlog.

use std::ffi::OsString;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let (port, child_command) = parse_args(std::env::args_os().skip(1))?;
    let server = handoff::server::Server::bind(("127.0.0.1", port)).await?;
    let mut command = match child_command.split_first() {
        Some((program, args)) => {
            let mut command = handoff::Command::new(program);
            command.args(args);
            command
        }
        None => handoff::Command::new(std::env::current_exe()?.with_file_name("child")),
    };
    let mut child = command.kill_on_drop(true).spawn()?;
    println!("listening on {}", server.local_addr().expect("a TCP server"));
    let sender = child.sender().clone();
    loop {
        tokio::select! {
            accepted = server.accept() => {
                let connection = accepted?;
                // child.send('socket', socket): the connection is moved to the child and our
                // copy closed once the child acknowledges it. Accepting goes on meanwhile; the
                // channel keeps the handles in order behind each acknowledgement.
                match sender.queue_handle(&"socket", connection).await {
                    Ok(delivery) => {
                        tokio::spawn(async move {
                            if let Err(e) = delivery.await {
                                eprintln!("parent: could not hand the connection over: {e}");
                            }
                        });
                    }
                    // The child is gone; its exit is reported below.
                    Err(e) => eprintln!("parent: could not hand the connection over: {e}"),
                }
            }
            status = child.wait() => {
                let status = status?;
                eprintln!("parent: child exited with {status}");
                std::process::exit(status.code().unwrap_or(1));
            }
        }
    }
}

/// `[--port P] [-- COMMAND ARGS...]`
fn parse_args(mut args: impl Iterator<Item = OsString>) -> anyhow::Result<(u16, Vec<OsString>)> {
    let mut port = 1337;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--port") => {
                let value = args.next().ok_or_else(|| anyhow::anyhow!("--port needs a value"))?;
                port = value.to_string_lossy().parse()?;
            }
            Some("--") => return Ok((port, args.collect())),
            _ => anyhow::bail!("usage: parent [--port P] [-- CHILD_COMMAND ARGS...]"),
        }
    }
    Ok((port, Vec::new()))
}
