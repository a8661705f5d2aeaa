//! The `handoff` command line.
//!
//! - `handoff demo [--port P] [--requests N] [-- CHILD_COMMAND ARGS...]`: the seed's example. Listens
//!   on 127.0.0.1:P (default 1337), forks a child (by default this binary's own `demo-child`;
//!   otherwise the given command, e.g. `node child.js`) and hands it every connection, which the
//!   child answers with `Child handled it.`. With `--requests N` it connects N times itself, prints
//!   each answer and exits; otherwise it serves until interrupted (`curl --http0.9 127.0.0.1:1337`).

mod demo;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "handoff", version, about = "Pass messages and live sockets between processes, Node-compatible")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the seed example: a parent that hands every TCP connection to a child process.
    Demo(demo::DemoArgs),
    /// The demo's child: answers each socket it is handed (run by `demo`, not by hand).
    #[command(hide = true)]
    DemoChild,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Commands::Demo(args) => demo::parent(args).await,
        Commands::DemoChild => demo::child().await,
    }
}
