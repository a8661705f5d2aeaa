//! `handoff worker-http`: the worker `handoff run` starts when it is given no command. An
//! HTTP/1.1 server (hyper) that answers every request with `200` and its pid as the body, served
//! through the cluster primary (`handoff::cluster::listen`) on `HOST:PORT`.
//!
//! When the primary asks it to stop, it stops accepting, lets each connection finish the request
//! in progress (keep-alive connections are told to close), then exits 0.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};

pub(crate) async fn run() -> anyhow::Result<()> {
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let mut listener = handoff::cluster::listen(format!("{host}:{port}")).await?;
    let body = Bytes::from(format!("{}\n", std::process::id()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    while let Ok((socket, _peer)) = listener.accept().await {
        let body = body.clone();
        let service = hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| {
            let body = body.clone();
            async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(socket), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    // Asked to stop (or the primary went away): finish what is in progress.
    graceful.shutdown().await;
    Ok(())
}
