//! The control socket of `handoff run`, and its clients (`handoff status`, `reload`, `stop`).
//!
//! A Unix stream socket in a per-user directory (`$XDG_RUNTIME_DIR/handoff/`, else
//! `/tmp/handoff-UID/`, created mode 0700; an existing one must be ours and writable by nobody
//! else), the socket itself mode 0600; a connection from another user (`SO_PEERCRED`) is closed
//! unanswered. One request per connection: a JSON line
//! `{"cmd":"status"|"reload"|"stop"}`, answered by one JSON line. A socket file left by a
//! primary that was killed is replaced; one that a live primary answers on is an error.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use handoff::cluster::Primary;

/// Longest request line read.
const MAX_REQUEST: u64 = 4096;

/// The default control socket path for this user.
pub(crate) fn default_path() -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("handoff"),
        None => PathBuf::from(format!("/tmp/handoff-{}", rustix::process::geteuid().as_raw())),
    };
    dir.join("control.sock")
}

/// Binds the control socket at `path` (see the module docs for the rules).
pub(crate) async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Whoever can write the directory can replace the socket and answer in our name.
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        anyhow::bail!(
            "the control socket's directory {} is not private (it must be a directory of uid {me}, \
             writable by nobody else; it is {} of uid {} with mode {:o}): remove it, or pass \
             another --control path",
            dir.display(),
            if meta.is_dir() { "a directory" } else { "not a directory" },
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        if !existing.file_type().is_socket() {
            anyhow::bail!("{} exists and is not a socket: pass another --control path", path.display());
        }
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another handoff primary is running with control socket {} (stop it with `handoff \
                 stop --control {}`, or give this one another --control path)",
                path.display(),
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove the stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot create the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers control requests until the primary stops.
pub(crate) async fn serve(listener: UnixListener, primary: Arc<Primary>) {
    let me = rustix::process::geteuid();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, most likely: wait instead of spinning.
                tracing::warn!(%error, "control socket: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = rustix::net::sockopt::socket_peercred(&stream);
        if !peer.is_ok_and(|cred| cred.uid == me) {
            continue; // another user: closed unanswered
        }
        let primary = primary.clone();
        tokio::spawn(async move {
            let _ = answer(stream, &primary).await;
        });
    }
}

async fn answer(stream: UnixStream, primary: &Primary) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line).await?;
    let request: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let reply = match request.get("cmd").and_then(Value::as_str) {
        Some("status") => match primary.status().await {
            Ok(status) => json!({"ok": true, "status": status_json(&status)}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Some("reload") => match primary.reload().await {
            Ok(report) => json!({"ok": true, "generation": report.generation, "took_ms": report.took.as_millis() as u64}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Some("stop") => {
            write.write_all(format!("{}\n", json!({"ok": true})).as_bytes()).await?;
            primary.stop().await;
            return Ok(());
        }
        _ => json!({"ok": false, "error": "unknown request; expected {\"cmd\": \"status\" | \"reload\" | \"stop\"}"}),
    };
    write.write_all(format!("{reply}\n").as_bytes()).await
}

/// The status as JSON with plain numbers (milliseconds) for durations: a stable schema for
/// scripts.
pub(crate) fn status_json(status: &handoff::cluster::Status) -> Value {
    let workers: Vec<Value> = status
        .workers
        .iter()
        .map(|w| {
            json!({
                "id": w.id,
                "pid": w.pid,
                "generation": w.generation,
                "state": w.state,
                "connections_open": w.connections_open,
                "connections_handled": w.connections_handled,
                "restarts": w.restarts,
                "last_exit": w.last_exit,
                "uptime_ms": w.uptime.as_millis() as u64,
            })
        })
        .collect();
    json!({
        "generation": status.generation,
        "schedule": status.schedule,
        "listeners": status.listeners,
        "desired_workers": status.desired_workers,
        "workers": workers,
        "pending_connections": status.pending_connections,
        "reloading": status.reloading,
        "stopping": status.stopping,
        "connections_dispatched": status.connections_dispatched,
        "connections_redispatched": status.connections_redispatched,
        "connections_dropped": status.connections_dropped,
    })
}

/// Sends one request to the primary at `path` and returns its answer.
pub(crate) async fn request(path: &Path, cmd: &str) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!("no handoff primary answers on {} (is `handoff run` running? see --control)", path.display())
    })?;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{}\n", json!({"cmd": cmd})).as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read.take(16 << 20)).read_line(&mut line).await?;
    if line.is_empty() {
        anyhow::bail!("the primary closed the control connection without answering");
    }
    Ok(serde_json::from_str(&line)?)
}
