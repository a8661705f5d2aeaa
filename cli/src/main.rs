//! The `handoff` command line: a thin layer over the library.
//!
//! - `handoff run [--listen ADDR]... [--workers N] [--schedule rr|shared] [-- COMMAND ARGS...]`:
//!   a cluster primary (`handoff::cluster::Primary`) serving ADDR with N workers (default: a
//!   built-in HTTP server answering 200 with its pid); `handoff status`, `reload` and `stop` talk
//!   to it through its control socket.
//! - `handoff demo [--port P] [--requests N] [-- CHILD_COMMAND ARGS...]`: the seed's example. Listens
//!   on 127.0.0.1:P (default 1337), forks a child (by default this binary's own `demo-child`;
//!   otherwise the given command, e.g. `node child.js`) and hands it every connection, which the
//!   child answers with `Child handled it.`. With `--requests N` it connects N times itself, prints
//!   each answer and exits; otherwise it serves until interrupted (`curl --http0.9 127.0.0.1:1337`).

mod control;
mod demo;
mod http_worker;
mod run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "handoff", version, about = "Pass messages and live sockets between processes, Node-compatible")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Serve a port with worker processes (a cluster primary): round-robin or shared, restarts,
    /// rolling reload (SIGHUP), graceful stop (SIGINT/SIGTERM).
    Run(run::RunArgs),
    /// Print the running primary's workers.
    Status(run::ControlArgs),
    /// Rolling reload of the running primary's workers; fails if a new worker is not ready.
    Reload(run::ControlArgs),
    /// Stop the running primary gracefully.
    Stop(run::ControlArgs),
    /// Run the seed example: a parent that hands every TCP connection to a child process.
    Demo(demo::DemoArgs),
    /// The demo's child: answers each socket it is handed (run by `demo`, not by hand).
    #[command(hide = true)]
    DemoChild,
    /// The built-in HTTP worker (run by `run`, not by hand).
    #[command(hide = true)]
    WorkerHttp,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HANDOFF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let outcome = match cli.command {
        Commands::Run(args) => run::run(args).await,
        Commands::Status(args) => run::status(args).await,
        Commands::Reload(args) => run::reload(args).await,
        Commands::Stop(args) => run::stop(args).await,
        Commands::Demo(args) => demo::parent(args).await.map(|()| 0),
        Commands::DemoChild => demo::child().await.map(|()| 0),
        Commands::WorkerHttp => http_worker::run().await.map(|()| 0),
    };
    let code = outcome.unwrap_or_else(|error| {
        // One line per cause: what happened, then why.
        eprintln!("handoff: {error:#}");
        1
    });
    std::process::exit(code);
}
