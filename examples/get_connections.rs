//! A server that hands every connection to a child and still knows how many are open.
//!
//! ```text
//! get_connections [--port P] [-- CHILD_COMMAND ARGS...]
//! ```
//! Listens on 127.0.0.1:P (default 1337; 0 picks a free port; the address goes to stderr), forks
//! the child (default: the `echo_child` example next to this binary; otherwise the command, e.g.
//! `-- node echo_child.js`) and hands it every connection. Polls `get_connections()` every
//! 100 ms and prints `connections=N` on stdout each time the value changes. On SIGTERM it calls
//! `close()`, prints `closing`, then `closed` once every connection — in the child too — is
//! gone, and exits 0.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;

use handoff::server::Server;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let (port, child_command) = parse_args(std::env::args_os().skip(1))?;
    let mut terminate = signal(SignalKind::terminate())?;
    let server = Arc::new(Server::bind(("127.0.0.1", port)).await?);
    let mut command = match child_command.split_first() {
        Some((program, args)) => {
            let mut command = handoff::Command::new(program);
            command.args(args);
            command
        }
        None => handoff::Command::new(std::env::current_exe()?.with_file_name("echo_child")),
    };
    let child = command.kill_on_drop(true).spawn()?;
    eprintln!("listening on {}", server.local_addr().expect("a TCP server"));

    let accepting = {
        let (server, sender) = (server.clone(), child.sender().clone());
        tokio::spawn(async move {
            while let Ok(connection) = server.accept().await {
                if let Err(e) = sender.send_handle(&"socket", connection).await {
                    eprintln!("get_connections: could not hand a connection over: {e}");
                }
            }
        })
    };
    let polling = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                match server.get_connections().await {
                    Ok(n) if last != Some(n) => {
                        println!("connections={n}");
                        last = Some(n);
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("get_connections: {e}"),
                }
            }
        })
    };

    terminate.recv().await;
    println!("closing");
    server.close().await?;
    println!("closed");
    polling.abort();
    accepting.abort();
    child.disconnect();
    Ok(())
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
            _ => anyhow::bail!("usage: get_connections [--port P] [-- CHILD_COMMAND ARGS...]"),
        }
    }
    Ok((port, Vec::new()))
}
